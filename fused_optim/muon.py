"""Muon (Keller Jordan 2024, KellerJordan/Muon `muon.py`): momentum orthogonalized by Newton–Schulz.

docs/spec.md §8. For ≥2-D hidden weights; embeddings, output heads and 1-D params (gains, biases) belong to an
Adam side, as upstream's `MuonWithAuxAdam`: groups carry ``use_muon`` and `Muon` runs upstream's Adam
update for ``use_muon=False`` groups. :func:`muon_param_groups` builds both groups from a model.

Muon update per ≥2-D param (upstream's op order; ``p.grad`` is never mutated, upstream lerps into it)::

    momentum.lerp_(g, 1 - beta)
    u = g.lerp(momentum, beta) if nesterov else momentum
    u = u.reshape(len(u), -1) if u.ndim == 4
    X = NS5(u)  in bf16: transpose if rows > cols, X /= ||X||_F + 1e-7,
                ns_steps × (A = X Xᵀ; B = b·A + c·A @ A; X = a·X + B @ X), transpose back
    u = X · max(1, g.size(-2) / g.size(-1)) ** 0.5          # of the original grad, as upstream
    p.mul_(1 - lr·wd); p.add_(u.reshape(p.shape), alpha=-lr)

(a, b, c) = (3.4445, −4.7750, 2.0315); upstream writes ``c * A @ A``, which Python evaluates as
``(c·A) @ A``, and so do we. Newton–Schulz runs on torch matmuls (cuBLAS on GPU) in every impl, batched
over same-shape matrices (one batched matmul per iteration). Around it, `foreach` runs one multi-tensor op
per elementwise stage; `triton` and `native` (`_fused_muon`) run two multi-tensor kernels in all: momentum +
Nesterov + the bf16 cast into Newton–Schulz's input, then scale + decay + update.

On FSDP2 (DTensor) params every impl runs its two elementwise stages on the local shards and
Newton–Schulz on each whole matrix, once in the shard group (`_row_sharded_muon`,
`distributed.orthogonalize_row_shards`); layouts whose matrix cannot be assembled from row shards are
refused (`_refuse_unassemblable`). README, "FSDP2 / DDP".
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from . import distributed as _dist
from . import lowstate as _low
from ._composite import fused_kernel
from ._foreach import mul_operand, take
from .declaration import Declaration
from .optimizer import FusedOptimizer, _as_float, _check_betas, _check_range, impl_views

__all__ = ["Muon", "MuonWithAuxAdam", "muon_param_groups", "zeropower_via_newtonschulz5"]

_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G: Tensor, steps: int) -> Tensor:
    """Approximate ``U Vᵀ`` of ``G = U S Vᵀ`` (batched over leading dims) in bf16: upstream's quintic
    iteration, whose singular values land in roughly [0.7, 1.2] rather than exactly 1."""
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz orthogonalizes matrices; got a {G.ndim}-D tensor")
    a, b, c = _NS_COEFFS
    X = G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def _as_matrix(u: Tensor) -> Tensor:
    # conv filters (out, in, kh, kw) -> (out, in*kh*kw); reshape, not upstream's view, so a
    # channels-last momentum buffer works too (same values)
    return u.reshape(len(u), -1) if u.ndim == 4 else u


def _scale(g: Tensor) -> float:
    return max(1, g.size(-2) / g.size(-1)) ** 0.5


# ------------------------------------------------------------------------------------- Muon impls
def _forloop_muon(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
                  momentum: float, weight_decay: float, nesterov: bool, ns_steps: int, maximize: bool) -> None:
    """Upstream's `muon_update` + step, one tensor at a time (the reference)."""
    if _dist.current() is not None:
        return _row_sharded_muon(_forloop_stages, params, grads, momentum_buffers, lr=lr, momentum=momentum,
                                 weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps, maximize=maximize)
    for p, g, buf in zip(params, grads, momentum_buffers):
        if p.numel() == 0:
            continue
        if maximize:
            g = -g
        g = g.to(buf.dtype)  # fp32 momentum of a bf16/fp16 param (`_state_dtype`): lerp in fp32
        buf.lerp_(g, 1 - momentum)
        u = g.lerp(buf, momentum) if nesterov else buf
        u = zeropower_via_newtonschulz5(_as_matrix(u), steps=ns_steps)
        u *= _scale(g)
        p.mul_(1 - lr * weight_decay)
        p.add_(u.reshape(p.shape), alpha=-lr)


def _batched_newton_schulz(us: list[Tensor], steps: int, scales: list[float]) -> list[Tensor]:
    """Newton–Schulz then ``*= scale`` for a list: matrices of one shape and scale share one batched
    matmul per iteration and one multiply.

    The scale is applied per batch with ``Tensor.mul_`` on purpose: on CPU, ``torch._foreach_mul_`` of
    a bf16 list rounds the scalar to bf16 first (measured: it differs from ``mul_`` by one bf16 ulp),
    while upstream's ``update *= scale`` multiplies by the fp32 scalar."""
    out: list[Tensor | None] = [None] * len(us)
    by_key: dict[tuple[tuple[int, ...], float], list[int]] = defaultdict(list)
    for i, (u, scale) in enumerate(zip(us, scales)):
        by_key[(tuple(u.shape), scale)].append(i)
    for (shape, scale), idx in by_key.items():
        if len(idx) == 1 or len(shape) != 2:
            for i in idx:
                X = zeropower_via_newtonschulz5(us[i], steps)
                if scale != 1:  # x * 1.0 is x exactly
                    X *= scale
                out[i] = X
            continue
        X = zeropower_via_newtonschulz5(torch.stack([us[i] for i in idx]), steps)
        if scale != 1:
            X *= scale
        for j, i in enumerate(idx):
            out[i] = X[j]
    return out  # type: ignore[return-value]


def _foreach_muon(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
                  momentum: float, weight_decay: float, nesterov: bool, ns_steps: int, maximize: bool) -> None:
    """One multi-tensor op per elementwise stage; Newton–Schulz batched by shape."""
    if _dist.current() is not None:
        return _row_sharded_muon(_foreach_stages, params, grads, momentum_buffers, lr=lr, momentum=momentum,
                                 weight_decay=weight_decay, nesterov=nesterov, ns_steps=ns_steps, maximize=maximize)
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if not keep:
        return
    params, grads, momentum_buffers = take(keep, params, grads, momentum_buffers)
    if maximize:
        grads = torch._foreach_neg(grads)
    if grads[0].dtype != momentum_buffers[0].dtype:  # fp32 momentum of bf16/fp16 params: lerp in fp32
        grads = [g.to(momentum_buffers[0].dtype) for g in grads]
    torch._foreach_lerp_(momentum_buffers, grads, 1 - momentum)
    us = torch._foreach_lerp(grads, momentum_buffers, momentum) if nesterov else momentum_buffers
    us = _batched_newton_schulz([_as_matrix(u) for u in us], ns_steps, [_scale(g) for g in grads])
    if weight_decay != 0:  # upstream multiplies by 1.0 otherwise: exact, so skipping it changes nothing
        torch._foreach_mul_(params, mul_operand(params, 1 - lr * weight_decay))
    torch._foreach_add_(params, [u.reshape(p.shape) for u, p in zip(us, params)], alpha=-lr)


def _fused_muon(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
                momentum: float, weight_decay: float, nesterov: bool, ns_steps: int, maximize: bool,
                momentum_kernel, apply_kernel, lowbit: _low.Rounding | None = None) -> None:
    """Muon with its elementwise stages as two multi-tensor kernels around torch's Newton–Schulz.

    1. `momentum_kernel`: ``buf.lerp_(g, 1-β)``, the Nesterov ``g.lerp(buf, β)``, rounded to bf16 and
       written straight into one stacked buffer per matrix shape: Newton–Schulz's input, so neither the
       bf16 cast nor the batching stack costs a pass of its own.
    2. Newton–Schulz on torch matmuls (cuBLAS), one batched matmul per iteration per shape.
    3. `apply_kernel`: ``u·scale`` (rounded to bf16, as upstream's ``u *= scale``), the decoupled decay and
       ``p − lr·u`` in one pass.

    ``lowbit`` (`fused_optim.lowstate.Rounding`, docs/lowbit.md §5): a bf16 / 8-bit momentum buffer is
    decoded, updated and encoded inside the momentum kernel's pass, and bf16 / fp16 params with stochastic
    rounding are rounded inside the apply kernel's.
    """
    if _dist.current() is not None:
        return _row_sharded_muon(_fused_stages(momentum_kernel, apply_kernel), params, grads, momentum_buffers,
                                 lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                                 ns_steps=ns_steps, maximize=maximize, lowbit=lowbit)
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    if not keep:
        return
    low = None if lowbit is None else lowbit.take(keep)
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in keep:
        by_shape[tuple(_as_matrix(grads[i]).shape)].append(i)
    inputs: dict[int, Tensor] = {}
    stacks = []
    for shape, idx in by_shape.items():
        stack = torch.empty((len(idx), *shape), dtype=torch.bfloat16, device=grads[idx[0]].device)
        for j, i in enumerate(idx):
            inputs[i] = stack[j].view(grads[i].shape)
        stacks.append((shape, idx, stack))
    _momentum_stage(momentum_kernel, [grads[i] for i in keep], [momentum_buffers[i] for i in keep],
                    [inputs[i] for i in keep], momentum=momentum, nesterov=nesterov, maximize=maximize, lowbit=low)
    outputs: dict[int, Tensor] = {}
    for shape, idx, stack in stacks:
        if len(idx) > 1 and len(shape) == 2:  # one batched Newton–Schulz (as `_batched_newton_schulz`)
            X = zeropower_via_newtonschulz5(stack, ns_steps)
            outputs.update((i, X[j]) for j, i in enumerate(idx))
        else:
            outputs.update((i, zeropower_via_newtonschulz5(stack[j], ns_steps)) for j, i in enumerate(idx))
    ps = [params[i] for i in keep]
    _apply_stage(apply_kernel, ps, [outputs[i].reshape(p.shape) for i, p in zip(keep, ps)],
                 scales=[_scale(grads[i]) for i in keep], lr=lr, weight_decay=weight_decay, lowbit=low)


def _momentum_stage(kernel, grads, bufs, outs, *, momentum, nesterov, maximize, lowbit) -> None:
    """A fused impl's momentum stage: its ``<kernel>_lowbit`` twin when the buffers are stored below fp32."""
    if lowbit is not None and lowbit.fmt != "fp32":
        _MOMENTUM_LOWBIT[kernel](grads, bufs, outs, momentum=momentum, nesterov=nesterov, maximize=maximize,
                                 lowbit=lowbit)
    else:
        kernel(grads, bufs, outs, momentum=momentum, nesterov=nesterov, maximize=maximize)


def _apply_stage(kernel, params, updates, *, scales, lr, weight_decay, lowbit) -> None:
    """A fused impl's apply stage; it rounds bf16 / fp16 params stochastically itself when ``lowbit.param_sr``."""
    if lowbit is not None and lowbit.param_sr:
        kernel(params, updates, scales=scales, lr=lr, weight_decay=weight_decay, lowbit=lowbit)
    else:
        kernel(params, updates, scales=scales, lr=lr, weight_decay=weight_decay)


# the two elementwise stages' kernels per fused impl (triton is imported on the first triton step)
_FUSED_STAGES = {impl: {"momentum_kernel": fused_kernel(impl, "muon", "muon_momentum"),
                        "apply_kernel": fused_kernel(impl, "muon", "muon_apply")} for impl in ("triton", "native")}
#: each fused impl's momentum stage with a bf16 / 8-bit buffer (docs/lowbit.md §5)
_MOMENTUM_LOWBIT = {_FUSED_STAGES[impl]["momentum_kernel"]: fused_kernel(impl, "muon", "muon_momentum_lowbit")
                    for impl in ("triton", "native")}


def _triton_muon(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
                 momentum: float, weight_decay: float, nesterov: bool, ns_steps: int, maximize: bool,
                 lowbit: _low.Rounding | None = None) -> None:
    """`_fused_muon` with the Triton kernels (fused_optim/kernels/muon.py); triton loads on first use."""
    _fused_muon(params, grads, momentum_buffers, lr=lr, momentum=momentum, weight_decay=weight_decay,
                nesterov=nesterov, ns_steps=ns_steps, maximize=maximize, lowbit=lowbit, **_FUSED_STAGES["triton"])


_triton_muon.supports_lowbit = True  # Muon's impls are not declared (use_muon decides the state)


def _native_muon(params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor], *, lr: float,
                 momentum: float, weight_decay: float, nesterov: bool, ns_steps: int, maximize: bool,
                 lowbit: _low.Rounding | None = None) -> None:
    """`_fused_muon` with the compiled kernels (csrc/, fused_optim/_native.py)."""
    _fused_muon(params, grads, momentum_buffers, lr=lr, momentum=momentum, weight_decay=weight_decay,
                nesterov=nesterov, ns_steps=ns_steps, maximize=maximize, lowbit=lowbit, **_FUSED_STAGES["native"])


_native_muon.supports_lowbit = True


# ------------------------------------------------------------------------------------- FSDP2 (DTensor)
class _Stages(NamedTuple):
    """An impl's two elementwise stages, on local shards, for the sharded pipeline (same op order and
    rounding as the impl's single-device step, so a sharded step equals the unsharded one).

    momentum(grads, bufs, outs, momentum=, nesterov=, maximize=): update `bufs`, write Newton–Schulz's
        input (the momentum, or its Nesterov blend) rounded to bf16 into `outs`.
    apply(params, updates, scales=, lr=, weight_decay=): ``u·scale`` rounded to bf16, the decoupled
        decay, ``p − lr·u``.
    batched: whether Newton–Schulz batches same-shape matrices (the forloop reference does not).
    """
    momentum: Any
    apply: Any
    batched: bool


def _forloop_momentum(grads, bufs, outs, *, momentum, nesterov, maximize):
    for g, buf, out in zip(grads, bufs, outs):
        if maximize:
            g = -g
        buf.lerp_(g, 1 - momentum)
        out.copy_(g.lerp(buf, momentum) if nesterov else buf)  # X = G.bfloat16(): one rounding


def _forloop_apply(params, updates, *, scales, lr, weight_decay):
    for p, u, scale in zip(params, updates, scales):
        u = u * scale  # upstream's bf16 `u *= scale`
        p.mul_(1 - lr * weight_decay)
        p.add_(u, alpha=-lr)


def _foreach_momentum(grads, bufs, outs, *, momentum, nesterov, maximize):
    if maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_lerp_(bufs, grads, 1 - momentum)
    torch._foreach_copy_(outs, torch._foreach_lerp(grads, bufs, momentum) if nesterov else bufs)


def _foreach_apply(params, updates, *, scales, lr, weight_decay):
    # per tensor mul_, not _foreach_mul_: see `_batched_newton_schulz` (the scalar's rounding)
    updates = [u if scale == 1 else u * scale for u, scale in zip(updates, scales)]
    if weight_decay != 0:
        torch._foreach_mul_(params, mul_operand(params, 1 - lr * weight_decay))
    torch._foreach_add_(params, updates, alpha=-lr)


def _fused_stages(momentum_kernel, apply_kernel) -> _Stages:
    return _Stages(momentum_kernel, apply_kernel, True)


_forloop_stages = _Stages(_forloop_momentum, _forloop_apply, False)
_foreach_stages = _Stages(_foreach_momentum, _foreach_apply, True)


def _newton_schulz_list(mats: list[Tensor], steps: int, batched: bool) -> list[Tensor]:
    # looked up through the module at call time (tests count the matrices it sees)
    if batched:
        return _batched_newton_schulz(mats, steps, [1.0] * len(mats))
    return [zeropower_via_newtonschulz5(m, steps) for m in mats]


def _row_sharded_muon(stages: _Stages, params: list[Tensor], grads: list[Tensor], momentum_buffers: list[Tensor],
                      *, lr: float, momentum: float, weight_decay: float, nesterov: bool, ns_steps: int,
                      maximize: bool, lowbit: _low.Rounding | None = None) -> None:
    """Muon on DTensor (FSDP2) local shards, whole-matrix: momentum on the shards; each 2-D (or flattened
    4-D) matrix gathered to one owner rank of its shard group, orthogonalized there once, its rows sent
    back (`distributed.orthogonalize_row_shards`); the update applied on the shards. A 3-D param sharded
    on dim 0 holds whole matrices on each rank: orthogonalized where they are. Every rank calls the
    exchange, also with empty shards. The scale comes from the global shape."""
    whole = _dist.current().tensors
    outs = [torch.empty(g.shape, dtype=torch.bfloat16, device=g.device) for g in grads]
    keep = [i for i, g in enumerate(grads) if g.numel() > 0]
    low = None if lowbit is None else lowbit.take(keep)  # (only the fused stages are given one)
    if keep:
        _momentum_stage(stages.momentum, [grads[i] for i in keep], [momentum_buffers[i] for i in keep],
                        [outs[i] for i in keep], momentum=momentum, nesterov=nesterov, maximize=maximize, lowbit=low)
    rows_sharded = [i for i, t in enumerate(whole) if t.ndim != 3]
    batch_sharded = [i for i, t in enumerate(whole) if t.ndim == 3 and outs[i].numel() > 0]
    updates: list[Tensor | None] = [None] * len(params)
    if rows_sharded:
        # (local rows, global columns): 4-D filters flatten as `_as_matrix`; an empty shard keeps its width
        mats = [outs[i].reshape(len(outs[i]), whole[i].numel() // max(len(whole[i]), 1)) for i in rows_sharded]
        results = _dist.orthogonalize_row_shards(mats, [whole[i] for i in rows_sharded],
                                                 lambda full: _newton_schulz_list(full, ns_steps, stages.batched))
        for i, r in zip(rows_sharded, results):
            updates[i] = r
    if batch_sharded:
        for i, r in zip(batch_sharded, _newton_schulz_list([outs[i] for i in batch_sharded], ns_steps,
                                                           stages.batched)):
            updates[i] = r
    if keep:
        _apply_stage(stages.apply, [params[i] for i in keep], [updates[i].reshape(params[i].shape) for i in keep],
                     scales=[_scale(whole[i]) for i in keep], lr=lr, weight_decay=weight_decay, lowbit=low)


# ------------------------------------------------------------------------------------- Adam side
def _forloop_muon_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], *, lr: float, beta1: float, beta2: float,
                       bias_correction1: float, bias_correction2: float, eps: float, weight_decay: float,
                       maximize: bool) -> None:
    """Upstream's `adam_update` + step (lerp form, bias corrections as Python doubles)."""
    for p, g, exp_avg, exp_avg_sq in zip(params, grads, exp_avgs, exp_avg_sqs):
        if maximize:
            g = -g
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.lerp_(g.square(), 1 - beta2)
        update = (exp_avg / bias_correction1) / ((exp_avg_sq / bias_correction2).sqrt() + eps)
        p.mul_(1 - lr * weight_decay)
        p.add_(update, alpha=-lr)


def _foreach_muon_adam(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], *, lr: float, beta1: float, beta2: float,
                       bias_correction1: float, bias_correction2: float, eps: float, weight_decay: float,
                       maximize: bool) -> None:
    if maximize:
        grads = torch._foreach_neg(grads)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1 - beta2)
    denom = torch._foreach_div(exp_avg_sqs, bias_correction2)
    torch._foreach_sqrt_(denom)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, bias_correction1)
    torch._foreach_div_(update, denom)
    if weight_decay != 0:
        torch._foreach_mul_(params, mul_operand(params, 1 - lr * weight_decay))
    torch._foreach_add_(params, update, alpha=-lr)


_adam_impls = {"forloop": _forloop_muon_adam, "foreach": _foreach_muon_adam}


# ------------------------------------------------------------------------------------- grouping
_HEAD_NAMES = frozenset({"head", "lm_head", "classifier", "output", "out_head", "fc_out", "wte", "wpe"})


def muon_param_groups(model: nn.Module, *, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                      adam_lr: float = 3e-4, adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-10,
                      adam_weight_decay: float = 0.0, adam_params: Iterable[Tensor] = ()) -> list[dict[str, Any]]:
    """Split `model`'s trainable params into a Muon group and an Adam group (upstream's recipe).

    Adam side: params with ``ndim < 2``; params of ``nn.Embedding``/``nn.EmbeddingBag`` modules; params
    whose dotted name has a component containing "embed" or equal to one of ``head, lm_head,
    classifier, output, out_head, fc_out, wte, wpe``; anything in `adam_params` (pass your output layer
    here when it has another name). Everything else (hidden ≥2-D weights) goes to Muon. Empty groups
    are left out.
    """
    forced = {id(p) for p in adam_params}
    embedding_params = {id(p) for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
                        for p in m.parameters(recurse=False)}
    muon, adam = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        parts = name.lower().split(".")[:-1]
        to_adam = (p.ndim < 2 or id(p) in forced or id(p) in embedding_params
                   or any("embed" in c or c in _HEAD_NAMES for c in parts))
        (adam if to_adam else muon).append(p)
    groups = []
    if muon:
        groups.append(dict(params=muon, lr=lr, momentum=momentum, weight_decay=weight_decay, use_muon=True))
    if adam:
        groups.append(dict(params=adam, lr=adam_lr, betas=adam_betas, eps=adam_eps,
                           weight_decay=adam_weight_decay, use_muon=False))
    return groups


# ------------------------------------------------------------------------------------- the class
class Muon(FusedOptimizer):
    r"""Muon for ≥2-D hidden weights, with upstream's auxiliary Adam for ``use_muon=False`` groups.

    Args:
        params: iterable of parameters or dicts defining parameter groups, or an ``nn.Module`` (split
            with :func:`muon_param_groups`). Groups default to ``use_muon=True``, whose params must be
            ≥2-D (3-D params are a batch of matrices, 4-D conv filters are flattened to 2-D).
        lr (float or 0-d Tensor): Muon's learning rate, in units of spectral norm per update
            (default: 0.02).
        momentum (float): in [0, 1) (default: 0.95).
        weight_decay (float): decoupled (AdamW-style) decay, ``>= 0`` (default: 0).
        nesterov (bool): Nesterov momentum (default: True).
        ns_steps (int): Newton–Schulz iterations, ``>= 0`` (default: 5).
        adam_lr, adam_betas, adam_eps (keyword-only): defaults of ``use_muon=False`` groups (upstream's
            3e-4, (0.9, 0.95), 1e-10); their ``weight_decay`` defaults to `weight_decay`.
        maximize, impl, foreach, fused: see :class:`fused_optim.Lion`.

    State: ``momentum_buffer`` (Muon params); ``exp_avg``, ``exp_avg_sq`` and ``step`` (Adam params),
    upstream's layout, with ``step`` a 0-d float32 CPU tensor as in torch's Adam (an int ``step`` of an
    older or upstream checkpoint is converted at the next step). Params without a grad are skipped
    (upstream fills them with zero grads, i.e. decays and moves them; we never touch ``.grad``).
    """

    #: names only: its validation and state layout depend on each group's ``use_muon`` (hand-written below)
    declaration = Declaration("muon")
    _supports_complex = False
    _complex_reason = "Newton-Schulz orthogonalization is defined here for real matrices"
    _accepts_module = True  # create_optimizer(model, "muon") passes the model, to split it
    #: the momentum buffer may be stored in bf16 / 8 bits; the auxiliary Adam's state stays fp32
    _lowbit_states = (("momentum_buffer", True),)
    _supports_stochastic_rounding = True
    _impls = {"forloop": _forloop_muon, "foreach": _foreach_muon, "triton": _triton_muon, "native": _native_muon}

    def __init__(self, params, lr: float | Tensor = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 nesterov: bool = True, ns_steps: int = 5, *, adam_lr: float = 3e-4,
                 adam_betas: tuple[float, float] = (0.9, 0.95), adam_eps: float = 1e-10, maximize: bool = False,
                 impl: str | None = None, foreach: bool | None = None, fused: bool | None = None,
                 state_precision: str = "fp32", stochastic_rounding: bool = False):
        if isinstance(params, nn.Module):
            params = muon_param_groups(params, lr=_as_float(lr), momentum=momentum, weight_decay=weight_decay,
                                       adam_lr=adam_lr, adam_betas=adam_betas, adam_eps=adam_eps,
                                       adam_weight_decay=weight_decay)
        self._adam_defaults = dict(lr=adam_lr, betas=tuple(adam_betas), eps=adam_eps)
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        ns_steps=ns_steps, use_muon=True, betas=tuple(adam_betas), eps=adam_eps)
        super().__init__(params, defaults, maximize=maximize, impl=impl, foreach=foreach, fused=fused,
                         state_precision=state_precision, stochastic_rounding=stochastic_rounding)

    def add_param_group(self, param_group: dict) -> None:
        param_group = dict(param_group)
        if not param_group.get("use_muon", True):
            for key, value in self._adam_defaults.items():
                param_group.setdefault(key, value)
        else:
            params = param_group["params"]
            if isinstance(params, set):  # torch's rule and message, before a set is listed
                raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                                "ordering of tensors in sets will change between runs. Please use a list instead.")
            params = [params] if isinstance(params, Tensor) else list(params)
            param_group["params"] = params
            # (name, tensor) pairs are unpacked by the base class; the layout check needs the tensors
            tensors = [q[1] if isinstance(q, tuple) and len(q) == 2 else q for q in params]
            _refuse_unassemblable(len(getattr(self, "param_groups", [])), tensors, tensors)
        super().add_param_group(param_group)  # a use_muon=True group's params are checked in _validate_group

    def _state_spec(self, group: dict) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        if group["use_muon"]:
            return ("momentum_buffer",), (), ()
        return ("exp_avg", "exp_avg_sq", "step"), (), ("step",)

    def _check_group(self, group: dict, params: list[Tensor], changed: list[Tensor] | None = None) -> None:
        super()._check_group(group, params, changed)
        if group["use_muon"]:  # a layout changed after construction is refused before anything moves
            _refuse_unassemblable(next(i for i, g in enumerate(self.param_groups) if g is group), group["params"],
                                  params)

    def _validate_group(self, group: dict) -> None:
        _check_range("lr", group["lr"], lo=0.0, label="learning rate")
        _check_range("weight_decay", group["weight_decay"], lo=0.0)
        if not isinstance(group["use_muon"], bool):
            raise TypeError(f"use_muon must be a bool, got {group['use_muon']!r}")
        if group["use_muon"]:
            for i, p in enumerate(group.get("params", ())):
                if isinstance(p, Tensor) and p.ndim < 2:
                    raise ValueError(f"Muon orthogonalizes matrices, but a use_muon=True group has a {p.ndim}-D "
                                     f"parameter (parameter {i}, shape {tuple(p.shape)}); put embeddings, heads "
                                     "and 1-D params in a use_muon=False (Adam) group, e.g. "
                                     "Muon(muon_param_groups(model))")
            _check_range("momentum", group["momentum"], lo=0.0, hi=1.0, hi_open=True)
            steps = group["ns_steps"]
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
                raise ValueError(f"Invalid ns_steps: {steps!r} (expected an int >= 0)")
        else:
            _check_betas(group["betas"], 2)
            _check_range("eps", group["eps"], lo=0.0, label="epsilon value")

    def _step_group(self, group, params, grads) -> None:
        if group["use_muon"]:
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    self._new_state(p, "momentum_buffer")
                bufs.append(state["momentum_buffer"])
            self._dispatch(params, grads, [bufs], lr=_as_float(group["lr"]), momentum=float(group["momentum"]),
                           weight_decay=float(group["weight_decay"]), nesterov=bool(group["nesterov"]),
                           ns_steps=int(group["ns_steps"]), maximize=group["maximize"])
            return
        # Adam side: upstream counts steps per param; params that share a count share one call. The counts
        # are 0-d float32 CPU tensors, torch's Adam form (class docstring).
        steps = []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = self._zeros_state(p)
                state["exp_avg_sq"] = self._zeros_state(p)
            step = state.get("step", 0)
            if not isinstance(step, Tensor) or step.dtype != torch.float32 or step.device.type != "cpu":
                # a new param, or an int count of an earlier checkpoint or of upstream's
                step = state["step"] = torch.tensor(float(step), dtype=torch.float32)
            steps.append(step)
        if not steps:
            return
        by_step: dict[int | Tensor, list[int]] = defaultdict(list)
        if torch.compiler.is_compiling():
            # traced: each param's bias corrections from its own counter (float64 tensor ops, no guard on
            # the count), one call per param; Inductor fuses them
            torch._foreach_add_(steps, 1)
            for i, step in enumerate(steps):
                by_step[step.double()].append(i)
        else:
            for i, step in enumerate(steps):  # CPU counters: read, written back by a fill (cheapest)
                count = int(step.item()) + 1
                step.fill_(count)
                by_step[count].append(i)
        beta1, beta2 = group["betas"]
        for step, idx in by_step.items():
            ps = [params[i] for i in idx]
            self._dispatch_adam(ps, [grads[i] for i in idx], [self.state[p]["exp_avg"] for p in ps],
                                [self.state[p]["exp_avg_sq"] for p in ps], lr=_as_float(group["lr"]),
                                beta1=float(beta1), beta2=float(beta2), bias_correction1=1 - beta1 ** step,
                                bias_correction2=1 - beta2 ** step, eps=float(group["eps"]),
                                weight_decay=float(group["weight_decay"]), maximize=group["maximize"])

    def _dispatch_adam(self, params, grads, exp_avgs, exp_avg_sqs, **scalars) -> None:
        splits: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
        for i, p in enumerate(params):
            splits[(p.device, p.dtype)].append(i)
        for (device, dtype), idx in splits.items():
            fn = _adam_impls.get(self.impl_for(device), _foreach_muon_adam)
            # elementwise: DTensors (FSDP2) update through their local shards, also next to plain tensors
            gs, states = impl_views(grads, idx, dtype), impl_views(exp_avgs, idx, dtype)
            sqs = impl_views(exp_avg_sqs, idx, dtype)
            if self.stochastic_rounding and dtype in (torch.bfloat16, torch.float16):
                # bf16/fp16 params round stochastically here too: the fp32 update on fp32 copies
                # (fused_optim/lowstate.py), the key's tensor index the param's position in the optimizer
                def run(ps, gs_, ss, fn=fn):
                    fn(ps, gs_, ss[0], ss[1], **scalars)
                _low.reference_step(run, impl_views(params, idx, dtype), gs, [states, sqs],
                                    self._rounding_for(params, idx, "fp32", []),
                                    [torch.float32] * len(idx))
                continue
            if states[0].dtype != gs[0].dtype:
                # fp32 state for bf16/fp16 params (`_state_dtype`): the Adam side's multi-tensor ops run
                # in fp32 on upcast grads
                gs = [g.to(states[0].dtype) for g in gs]
            fn(impl_views(params, idx, dtype), gs, states, sqs, **scalars)


def _refuse_unassemblable(group_index: int, group_params: list, params: list) -> None:
    """Muon's update of a DTensor is computed on its whole matrix, assembled from row shards; refuse,
    naming the param and its placement, a layout that cannot be assembled that way."""
    for p in params:
        why = _dist.row_shard_refusal(p) if isinstance(p, Tensor) else None
        if why is not None:
            i = next(j for j, q in enumerate(group_params) if q is p)
            raise ValueError(f"Muon: parameter {i} of param group {group_index} (shape {tuple(p.shape)}, placements "
                             f"{tuple(p.placements)} on a mesh of shape {tuple(p.device_mesh.shape)}) cannot be "
                             f"orthogonalized as a whole matrix: {why}. Muon supports DTensor params sharded on "
                             "dim 0 over one mesh dim, replicated over the others (fully_shard's default "
                             "Shard(0), FSDP2 or HSDP); put this param in a use_muon=False (Adam) group, or "
                             "shard it on dim 0")


class MuonWithAuxAdam(Muon):
    """Upstream's ``MuonWithAuxAdam(param_groups)``: every group must say ``use_muon``; Muon groups default
    to lr=0.02, momentum=0.95, weight_decay=0 and Adam groups to lr=3e-4, betas=(0.9, 0.95), eps=1e-10,
    weight_decay=0, as upstream."""

    declaration = Declaration("muonwithauxadam", alias_of="muon")

    def __init__(self, param_groups: Iterable[dict[str, Any]], **kwargs):
        param_groups = list(param_groups)
        for group in param_groups:
            if not isinstance(group, dict) or "use_muon" not in group:
                raise ValueError("MuonWithAuxAdam needs param groups that each set use_muon=True or False "
                                 "(see fused_optim.muon_param_groups)")
        super().__init__(param_groups, **kwargs)
