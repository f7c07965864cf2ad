"""`python -m bench.lowbit`: the 8-bit state map, measured (docs/lowbit.md §3), and its CPU cost.

``--maps``: quantization error of candidate 8-bit maps on real optimizer states (Adam and Adan moments
after a few hundred steps of a small MLP) and on heavy-tailed synthetic tensors. Per map: relative L2
error of the state, median per-element relative error, the fraction of nonzero elements that become
0, and, for second moments, the relative L2 error of the Adam direction m / (sqrt(v) + eps) computed
from the quantized v. Candidates: the dynamic map of `fused_optim.lowbit` (nearest), bitsandbytes'
own signed dynamic map (nearest), a linear absmax map (nearest), the linear map with stochastic
rounding.

``--speed``: quantize + dequantize throughput of the torch reference on CPU against an fp32 copy
(what the reference costs; the fused kernels dequantize and requantize inside the update pass).

Not part of `python -m bench` yet.
"""
from __future__ import annotations

import argparse
import time

import torch

from fused_optim import lowbit as L


# ----------------------------------------------------------------------------------------- maps
def _linear(x: torch.Tensor, signed: bool, stochastic: bool, gen: torch.Generator) -> torch.Tensor:
    blocks = L._blocked(x)
    s = blocks.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    levels = 127.0 if signed else 255.0
    y = blocks / s * levels
    if stochastic:
        q = torch.floor(y + torch.rand(y.shape, generator=gen))
    else:
        q = torch.round(y)
    return (q / levels * s).reshape(-1)[: x.numel()].reshape(x.shape)


def _bnb_signed_map() -> torch.Tensor:
    """bitsandbytes' create_dynamic_map(signed=True): 7 decades, +1 but no -1 (asymmetric)."""
    vals = [0.0, 1.0]
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float64)
        m = ((b[:-1] + b[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        vals += m + [-v for v in m]
    return torch.tensor(sorted(vals), dtype=torch.float64)


def _nearest_in(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    blocks = L._blocked(x).double()
    s = blocks.abs().amax(1, keepdim=True).clamp_min(1e-300)
    r = blocks / s
    mids = (table[1:] + table[:-1]) / 2
    k = torch.bucketize(r, mids)
    return (table[k] * s).float().reshape(-1)[: x.numel()].reshape(x.shape)


def _ours(x: torch.Tensor, signed: bool) -> torch.Tensor:
    return L.dequantize_blockwise(*L.quantize_blockwise(x, signed), signed)


def candidates(signed: bool, gen: torch.Generator):
    out = {"dynamic (ours)": lambda x: _ours(x, signed)}
    if signed:
        bnb = _bnb_signed_map()
        out["dynamic (bnb signed)"] = lambda x: _nearest_in(x, bnb)
    out["linear nearest"] = lambda x: _linear(x, signed, False, gen)
    out["linear stochastic"] = lambda x: _linear(x, signed, True, gen)
    return out


def _errors(x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    nz = x != 0
    rel = ((y - x).abs() / x.abs())[nz]
    return {"rel_l2": float((y - x).norm() / x.norm()), "median_rel": float(rel.median()),
            "zeroed": float(((y == 0) & nz).sum() / nz.sum())}


def _states(steps: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    """Adam and Adan state after `steps` steps on a small MLP regression (1M params, CPU)."""
    import fused_optim

    out = {}
    for name in ("adam", "adan"):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 512),
                                    torch.nn.GELU(), torch.nn.Linear(512, 64))
        teacher = torch.nn.Linear(256, 64)
        if name == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        else:
            opt = fused_optim.Adan(model.parameters(), lr=1e-3, impl="forloop")
        for _ in range(steps):
            xb = torch.randn(128, 256)
            loss = torch.nn.functional.mse_loss(model(xb), teacher(xb).detach().tanh())
            opt.zero_grad()
            loss.backward()
            opt.step()
        w = model[2].weight  # the 1024x512 layer: 512 Ki elements
        out[name] = {k: v.detach().clone() for k, v in opt.state[w].items()
                     if torch.is_tensor(v) and v.numel() == w.numel()}
    return out


def run_maps(steps: int = 300, seed: int = 0) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    rows = []
    states = _states(steps, seed)
    synth = {"student-t(2)": torch.distributions.StudentT(2.0).sample((1 << 19,)),
             "student-t(2)^2": torch.distributions.StudentT(2.0).sample((1 << 19,)) ** 2}
    tensors = [(f"{opt}.{k}", v) for opt, st in states.items() for k, v in st.items()] + list(synth.items())
    for name, x in tensors:
        signed = bool((x < 0).any())
        m = None
        if not signed and name.startswith("adam"):
            m = states["adam"]["exp_avg"]
        for cand, fn in candidates(signed, gen).items():
            y = fn(x)
            e = _errors(x, y)
            if m is not None:  # Adam's direction through the quantized second moment
                eps = 1e-8
                ref, got = m / (x.sqrt() + eps), m / (y.sqrt() + eps)
                e["dir_rel_l2"] = float((got - ref).norm() / ref.norm())
            rows.append((name, "signed" if signed else "unsigned", cand, e))
    return rows


# ---------------------------------------------------------------------------------------- speed
def run_speed(numel: int = 1 << 22, reps: int = 5) -> dict[str, float]:
    x = torch.randn(numel)
    def best(fn):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return min(ts)
    copy = best(lambda: x.clone())
    q = best(lambda: L.quantize_blockwise(x, True))
    codes, scales = L.quantize_blockwise(x, True)
    dq = best(lambda: L.dequantize_blockwise(codes, scales, True))
    gb = numel * 4 / 1e9
    return {"fp32 copy GB/s": gb / copy, "quantize GB/s (fp32 in)": gb / q,
            "dequantize GB/s (fp32 out)": gb / dq, "quantize / copy": q / copy, "dequantize / copy": dq / copy}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.lowbit", description=__doc__.split("\n")[0])
    ap.add_argument("--maps", action="store_true")
    ap.add_argument("--speed", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args(argv)
    if not (args.maps or args.speed):
        args.maps = args.speed = True
    if args.maps:
        print("| tensor | kind | map | rel L2 | median rel | zeroed | Adam direction rel L2 |")
        print("|---|---|---|---|---|---|---|")
        for name, kind, cand, e in run_maps(args.steps):
            d = f"{e['dir_rel_l2']:.4f}" if "dir_rel_l2" in e else ""
            print(f"| {name} | {kind} | {cand} | {e['rel_l2']:.4f} | {e['median_rel']:.4f} | {e['zeroed']:.4f} | {d} |")
    if args.speed:
        for k, v in run_speed().items():
            print(f"{k}: {v:.3f}")


if __name__ == "__main__":
    main()
