"""Parameter sets named after what users train: the tensor shapes an optimizer step walks over.

Only shapes matter to an optimizer step (its cost is the bytes it moves plus a per-tensor and
per-launch overhead), so each set is a list of shapes, built with fresh random data, never zeros.
Sets marked ``cuda_only`` need more memory or bandwidth than a CPU run should spend; each has a
scaled-down CPU variant with the same structure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["PARAM_SETS", "ParamSet", "default_sets", "make_params", "quick_sets"]


@dataclass(frozen=True)
class ParamSet:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    description: str
    cuda_only: bool = False
    numel: int = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "numel", sum(math.prod(s) for s in self.shapes))

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)


def gpt2_shapes(n_layer: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> list[tuple[int, ...]]:
    """HF GPT-2's parameters in `model.parameters()` order: wte, wpe, per block (ln_1, attn.c_attn,
    attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj; weights and biases), ln_f. 12 layers: 148 tensors, 124.4M."""
    shapes: list[tuple[int, ...]] = [(vocab, d), (ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,),                    # ln_1
                   (d, 3 * d), (3 * d,),          # attn.c_attn (Conv1D: in x out)
                   (d, d), (d,),                  # attn.c_proj
                   (d,), (d,),                    # ln_2
                   (d, 4 * d), (4 * d,),          # mlp.c_fc
                   (4 * d, d), (d,)]              # mlp.c_proj
    shapes += [(d,), (d,)]                        # ln_f
    return shapes


def llama_shapes(n_layer: int = 16, d: int = 2048, ffn: int = 8192, vocab: int = 128256,
                 n_heads: int = 32, n_kv_heads: int = 8) -> list[tuple[int, ...]]:
    """Llama-3.2-1B's parameters (tied embedding, GQA): embed, per layer (q, k, v, o, gate, up, down,
    two RMSNorms), final norm: 146 tensors, 1.24B params."""
    kv = d // n_heads * n_kv_heads
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(n_layer):
        shapes += [(d, d), (kv, d), (kv, d), (d, d),
                   (ffn, d), (ffn, d), (d, ffn),
                   (d,), (d,)]
    shapes.append((d,))
    return shapes


def many_small_shapes(n: int, max_numel: int, seed: int = 0) -> list[tuple[int, ...]]:
    """`n` 1-D tensors with sizes log-uniform in [1, max_numel]: biases, norms, LoRA adapters, the
    regime where per-tensor launch and Python overhead dominate the bytes."""
    g = torch.Generator().manual_seed(seed)
    logs = torch.rand(n, generator=g, dtype=torch.float64) * math.log(max_numel)
    return [(max(1, min(max_numel, round(math.exp(x)))),) for x in logs.tolist()]


PARAM_SETS: dict[str, ParamSet] = {s.name: s for s in [
    ParamSet("gpt2-124m", tuple(gpt2_shapes()), "GPT-2 small: 148 tensors, 124.4M params"),
    ParamSet("llama-1b", tuple(llama_shapes()), "Llama-3.2-1B shapes: 146 tensors, 1.24B params",
             cuda_only=True),
    ParamSet("many-small", tuple(many_small_shapes(2000, 65536)),
             "2,000 tensors of 1-64K elements (log-uniform): the launch-overhead regime"),
    ParamSet("huge", ((1 << 28,),), "one tensor of 2^28 elements", cuda_only=True),
    # CPU variants: same structure, fewer bytes, so a CPU run takes minutes, not hours
    ParamSet("gpt2-mini", tuple(gpt2_shapes(d=256, vocab=16384)),
             "GPT-2 structure at d=256, vocab 16K (CPU): 148 tensors, 13.9M params"),
    ParamSet("many-small-cpu", tuple(many_small_shapes(500, 16384)),
             "500 tensors of 1-16K elements (log-uniform, CPU)"),
    ParamSet("big-cpu", ((1 << 23,),), "one tensor of 2^23 elements (CPU)"),
    # --quick: a smoke test of the whole pipeline in about a minute on 2 CPU cores
    ParamSet("gpt2-tiny", tuple(gpt2_shapes(n_layer=12, d=64, vocab=4096, ctx=256)),
             "GPT-2 structure at d=64, vocab 4K (--quick): 148 tensors, 0.9M params"),
    ParamSet("many-small-tiny", tuple(many_small_shapes(200, 4096)),
             "200 tensors of 1-4K elements (--quick)"),
]}


def default_sets(device_type: str) -> list[str]:
    if device_type == "cuda":
        return ["gpt2-124m", "llama-1b", "many-small", "huge"]
    return ["gpt2-mini", "many-small-cpu", "big-cpu"]


def quick_sets(device_type: str) -> list[str]:
    if device_type == "cuda":
        return ["gpt2-124m", "many-small"]
    return ["gpt2-tiny", "many-small-tiny"]


def make_params(pset: ParamSet, device: torch.device | str, dtype: torch.dtype, *, seed: int = 0,
                grad_scale: float = 1e-2) -> list[torch.Tensor]:
    """Leaf tensors of the set's shapes with random values and random grads attached (never zeros:
    zeros would hide denormal and sign-path costs and make reductions trivial)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: 1B params in seconds
    params = []
    for shape in pset.shapes:
        p = torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)
        p.grad = (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * grad_scale).to(dtype)
        params.append(p)
    return params
