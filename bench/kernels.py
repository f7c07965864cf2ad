"""Kernel microbenchmarks: each per-tensor reduction and each update alone, across tensor counts.

The total number of elements is fixed and split into 1 … thousands of tensors, so one plot shows
both regimes: few big tensors (bandwidth-bound) and many small ones (launch- and overhead-bound).

- reductions (absmax for Gravity, sum for GradientEquilibrium, sumsq for Adan's clip and SAM):
  `torch._foreach_norm` (+ stack; torch has no multi-tensor sum, so sum is a per-tensor loop), the
  native `torch.ops.fused_optim.multi_tensor_stats` (all three in one pass) when the extension is
  built, and the Triton partials kernel (`fused_optim.kernels.reduce`) where Triton compiles.
- updates: each optimizer's functional step (`Optimizer._impls[impl]`) called directly with
  prepared lists, without the class's bookkeeping, for every impl that can run here; torch's
  `_fused_adamw_` is the yardstick.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

import fused_optim
from fused_optim import registry

from .candidates import OPTIMIZERS, ours_impls
from .env import cache_bytes
from .timing import FLOOR_KEY, floor_stream, rotating, stats_of, time_interleaved, time_one

__all__ = ["KERNEL_GRIDS", "reduction_impls", "run_kernels", "update_impls"]

#: (total elements, tensor counts) per mode
KERNEL_GRIDS = {
    "quick": (1 << 18, (1, 32, 1024)),
    "cpu": (1 << 22, (1, 16, 256, 4096)),
    "cuda": (1 << 26, (1, 16, 256, 4096, 16384)),
    # `--preset gpu-window`: the two ends and the middle, in seconds on a GPU
    "window": (1 << 26, (1, 256, 16384)),
}


def _scalars(optimizer: str, step: int = 5) -> dict:
    """The Python scalars the class would pass at `step` (docs/spec.md: kernels receive them, never recompute)."""
    kw = OPTIMIZERS[optimizer].kwargs
    if optimizer == "lion":
        b1, b2 = kw["betas"]
        return dict(lr=kw["lr"], beta1=b1, beta2=b2, weight_decay=kw["weight_decay"], maximize=False)
    if optimizer == "gravity":
        return dict(lr=kw["lr"], beta_hat=(kw["beta"] * step + 1) / (step + 2), maximize=False)
    if optimizer == "adan":
        b1, b2, b3 = kw["betas"]
        return dict(lr=kw["lr"], beta1=b1, beta2=b2, beta3=b3, bias_correction1=1 - b1 ** step,
                    bias_correction2=1 - b2 ** step, bias_correction3_sqrt=math.sqrt(1 - b3 ** step),
                    eps=kw["eps"], weight_decay=kw["weight_decay"], no_prox=False, clip=1.0, maximize=False)
    if optimizer == "gradient_equilibrium":
        return dict(lr=kw["lr"], weight_decay=kw["weight_decay"], maximize=False)
    if optimizer == "neurooptima":
        b1, b2 = kw["betas"]
        return dict(lr=kw["lr"], beta1=b1, beta2=b2, eps=kw["eps"], weight_decay=kw["weight_decay"], maximize=False)
    return _recorded_scalars(optimizer, kw)


def _recorded_scalars(optimizer: str, kw: dict) -> dict:
    """The scalars a declared optimizer's class passes to its functional step at its first step, recorded
    with its forloop impl replaced by a recorder: a newly declared optimizer needs no entry above."""
    cls = registry._lookup(OPTIMIZERS[optimizer].ours)
    p = torch.nn.Parameter(torch.ones(1))
    p.grad = torch.ones(1)
    opt = cls([p], **kw, impl="forloop")
    seen: dict = {}
    opt._impls = {**cls._impls, "forloop": lambda params, grads, *states, **scalars: seen.update(scalars)}
    opt.step()
    return seen


def _lists(n: int, numel: int, dtype: torch.dtype, device: torch.device, n_states: int, state_dtype: torch.dtype,
           seed: int):
    g = torch.Generator(device=device).manual_seed(seed)

    def r(dt, scale=1.0):
        return [(torch.randn(numel, generator=g, device=device) * scale).to(dt) for _ in range(n)]
    # states: small positive values (Adan's exp_avg_sq under a sqrt; never zeros)
    return r(dtype), r(dtype, 1e-2), [[t.abs_() for t in r(state_dtype, 1e-3)] for _ in range(n_states)]


def update_impls(optimizer: str, device: torch.device, wanted: list[str] | None) -> tuple[list[str], list[str]]:
    if optimizer == "adamw":
        return (["torch-fused"], []) if hasattr(torch, "_fused_adamw_") else ([], ["adamw: no torch._fused_adamw_"])
    impls, notes = ours_impls(optimizer, device, wanted)
    return [i for i in impls if i != "forloop" or (wanted and "forloop" in wanted)], notes


def _update_fn(optimizer: str, impl: str, params, grads, states) -> Callable[[], None]:
    if optimizer == "adamw":
        steps = [torch.tensor(5.0, device=params[0].device) for _ in params]
        kw = OPTIMIZERS["adamw"].kwargs

        def fused_adamw():
            torch._fused_adamw_(params, grads, states[0], states[1], [], steps, lr=kw["lr"], beta1=0.9,
                                beta2=0.999, weight_decay=kw["weight_decay"], eps=1e-8, amsgrad=False,
                                maximize=False)
        return fused_adamw
    fn = registry._lookup(OPTIMIZERS[optimizer].ours)._impls[impl]
    scalars = _scalars(optimizer)
    return lambda: fn(params, grads, *states, **scalars)


def reduction_impls(device: torch.device, wanted: list[str] | None) -> tuple[dict[str, Callable], list[str]]:
    """impl -> make(grads, op) -> fn, for the reductions that can run here."""
    notes: list[str] = []
    makers: dict[str, Callable] = {}

    def torch_make(grads, op):
        if op == "sum":  # torch has no multi-tensor sum: one kernel per tensor
            return lambda: torch.stack([t.sum(dtype=torch.float32) for t in grads])
        ord_ = math.inf if op == "absmax" else 2.0
        return lambda: torch.stack(torch._foreach_norm(grads, ord_))
    makers["torch._foreach_norm"] = torch_make

    st = fused_optim.available_impls(device)  # the native probe loads (or JIT-builds) the extension
    if st["native"].available:
        ops = torch.ops.fused_optim
        if hasattr(ops, "multi_tensor_stats"):
            # csrc's op computes max|g|, sum and sum of squares together, in one pass over each tensor:
            # the same call is timed under each of the three names
            makers["native-stats"] = lambda grads, name: (lambda: ops.multi_tensor_stats(grads))
        elif hasattr(ops, "multi_tensor_reduce"):
            makers["native"] = lambda grads, name: (lambda: ops.multi_tensor_reduce(grads, name))
        else:
            notes.append("reduce/native: skipped, the extension registers no multi-tensor reduction op")
    else:
        notes.append(f"reduce/native: skipped, {st['native'].reason}")

    tri = st["triton"]
    if tri.available and (not tri.reason.startswith("interpreted") or (wanted and "triton" in wanted)):
        try:
            from fused_optim.kernels import reduce as kr
            from fused_optim.kernels.multi_tensor import Launch, get_table, prepare_launches

            def triton_make(grads, op):
                """The partials kernel alone, as the Triton Gravity/GE/SAM launchers call it (internal API:
                any change there makes this a note, not a crash)."""
                code = {"absmax": kr.OP_ABSMAX, "sum": kr.OP_SUM, "sumsq": kr.OP_SUMSQ}[op]
                launches = [Launch(prep, get_table(prep, 2048), None, None)
                            for prep in prepare_launches(grads, grads, [])]

                def run():
                    for launch in launches:
                        kr.launch_partials(launch, code)
                return run
            makers["triton"] = triton_make
        except Exception as exc:  # noqa: BLE001 - internal API moved: report, do not crash
            notes.append(f"reduce/triton: skipped, {type(exc).__name__}: {exc}")
    else:
        notes.append(f"reduce/triton: skipped, {tri.reason}")
    if wanted is not None:
        makers = {k: v for k, v in makers.items() if k == "torch._foreach_norm" or k.split("-")[0] in wanted}
    return makers, notes


def run_kernels(device: torch.device, dtype: torch.dtype, grid: tuple[int, tuple[int, ...]], optimizers: list[str],
                impls: list[str] | None, warmup: int, reps: int, notes: list[str], seed: int = 0,
                progress: Callable[[float], None] | None = None, max_replicas: int = 8) -> list[dict]:
    """Rows (without the run metadata) for every kernel × impl × tensor count."""
    total, counts = grid
    es = torch.finfo(dtype).bits // 8
    rows = []
    interleave = device.type == "cpu"
    red_makers, red_notes = reduction_impls(device, impls)
    for line in red_notes:
        if line not in notes:
            notes.append(line)
    upd = {}
    for name in ["adamw"] + [o for o in optimizers if o != "adamw"]:
        got, n = update_impls(name, device, impls)
        upd[name] = got
        for line in n:
            if line not in notes:
                notes.append(line)

    def measure(fns: dict[str, Callable], working_set: int) -> tuple[dict[str, list[float]], float | None]:
        """Samples per fn and, interleaved (CPU), the floor timed in the same rounds over the same bytes."""
        if interleave:
            floor_fn, floor_bytes = floor_stream(device, max(working_set, 2 * cache_bytes(device)))
            s = time_interleaved({**fns, FLOOR_KEY: floor_fn}, device=device, warmup=warmup, reps=reps,
                                 min_sample_s=1e-3, seed=seed)[0]
            return s, floor_bytes / stats_of(s.pop(FLOOR_KEY)).median_s / 1e9
        return {k: time_one(f, device=device, warmup=warmup, reps=reps)[0] for k, f in fns.items()}, None

    def add(kind, kernel, impl, n, per, samples, nbytes, floor_gbps):
        st = stats_of(samples)
        rows.append({"kind": kind, "kernel": kernel, "impl": impl, "dtype": str(dtype).removeprefix("torch."),
                     "n_tensors": n, "numel_per_tensor": per, "numel": n * per,
                     "median_us": round(st.median_s * 1e6, 3), "p20_us": round(st.p20_s * 1e6, 3),
                     "p80_us": round(st.p80_s * 1e6, 3), "samples": st.n, "bytes": nbytes,
                     "achieved_gbps": float(f"{nbytes / st.median_s / 1e9:.4g}"), "floor_gbps": floor_gbps})

    for n in counts:
        per = max(1, total // n)
        # replicas so every timed call streams from memory, not from the last-level cache
        n_rep = max(1, min(max_replicas, math.ceil(2 * cache_bytes(device) / (n * per * es * 3))))
        # reductions: one interleaved group per op; they read only the grads, so more replicas
        r_rep = max(1, min(max_replicas, math.ceil(2 * cache_bytes(device) / (n * per * es))))
        for op in ("absmax", "sum", "sumsq"):
            grads_r = [[(torch.randn(per, device=device) * 1e-2).to(dtype) for _ in range(n)] for _ in range(r_rep)]
            fns = {}
            for impl, make in red_makers.items():
                try:
                    made = [make(gs, op) for gs in grads_r]
                    if any(m is None for m in made):
                        continue
                    made[0]()
                except Exception as exc:  # noqa: BLE001 - one impl failing is a note, the run goes on
                    line = f"reduce/{impl}: failed: {type(exc).__name__}: {str(exc)[:160]}"
                    if line not in notes:
                        notes.append(line)
                    continue
                # torch has no multi-tensor sum: its "sum" is a per-tensor loop, labelled as such
                fns["torch.sum loop" if (impl == "torch._foreach_norm" and op == "sum") else impl] = rotating(made)
            got, floor = measure(fns, r_rep * n * per * es)
            for impl, s in got.items():
                add("reduce", op, impl, n, per, s, n * per * es, floor)
            del grads_r
            if progress:
                progress(1)
        # updates: all impls of one optimizer interleaved, each on its own copy of the lists
        for name, impl_list in upd.items():
            spec = OPTIMIZERS[name]
            fns, bpp = {}, {}
            for impl in impl_list:
                sdt = torch.float32 if (impl in ("triton", "native") and es < 4) else dtype
                reps_fns = []
                for r in range(n_rep):
                    ps, gs, ss = _lists(n, per, dtype, device, spec.n_states, sdt, seed + r)
                    reps_fns.append(_update_fn(name, impl, ps, gs, ss))
                try:
                    reps_fns[0]()
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"{name}/{impl} kernel: failed: {type(exc).__name__}: {str(exc)[:160]}")
                    continue
                fns[impl] = rotating(reps_fns)
                bpp[impl] = spec.bytes_per_param(es, torch.finfo(sdt).bits // 8)
            got, floor = measure(fns, n_rep * n * per * es * 3)
            for impl, s in got.items():
                add("update", name, impl, n, per, s, n * per * bpp[impl], floor)
            if progress:
                progress(1)
    return rows
