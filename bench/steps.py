"""Step benchmarks: one `optimizer.step()` of every candidate over a parameter set.

For each (parameter set, dtype) the candidates of every selected optimizer form one group. On a CPU,
when their state fits in memory, the whole group is timed interleaved (see timing.py), so every
ratio in a row (against AdamW, against the copy floor) comes from the same minutes of the same
machine. Sets small enough to sit in the last-level cache are replicated and the replicas rotated,
so each timed step streams its data from memory, as a real step after forward/backward does.
"""
from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .candidates import OPTIMIZERS, Candidate, candidates_for, state_bytes_per_param, state_elem_size
from .env import available_memory_bytes, cache_bytes
from .params import ParamSet, make_params
from .timing import FLOOR_KEY, Stats, floor_stream, rotating, stats_of, time_interleaved, time_one

__all__ = ["StepResult", "replicas_for", "run_step_group"]


@dataclass
class StepResult:
    pset: ParamSet
    dtype: torch.dtype
    cand: Candidate
    stats: Stats
    bytes_per_param: float
    compile_s: float | None
    replicas: int = 1
    floor_gbps: float | None = None  # the floor timed in the same rounds (interleaved groups); else the run's
    state_bytes_per_param: float = 0.0  # measured from the optimizer's state (`state_bytes_per_param`)


def replicas_for(pset: ParamSet, dtype: torch.dtype, device: torch.device, max_replicas: int = 8) -> int:
    """Copies of the set to rotate through so the working set is >= 2x the last-level cache."""
    footprint = pset.numel * 3 * torch.finfo(dtype).bits // 8  # param, grad, one state: the least a step reads
    return max(1, min(max_replicas, math.ceil(2 * cache_bytes(device) / max(footprint, 1))))


def _probe_param(params: list[torch.Tensor]) -> torch.Tensor:
    return next((p for p in params if p.numel() > 1), params[0])


def run_step_group(pset: ParamSet, dtype: torch.dtype, device: torch.device, optimizers: list[str], *,
                   impls: list[str] | None, peers: list[str] | None, compile_step: bool, warmup: int, reps: int,
                   seed: int, notes: list[str], progress: Callable[[float], None] | None = None,
                   interleave: bool | None = None, mode_out: dict | None = None,
                   max_replicas: int = 8, precisions: list[str] | None = None) -> list[StepResult]:
    """Time every candidate of `optimizers` on `pset` in `dtype`; skipped or failing ones go to `notes`."""
    cands: list[Candidate] = []
    for name in optimizers:
        c, n = candidates_for(name, device, impls=impls, peers=peers, compile_step=compile_step,
                              precisions=precisions)
        cands += c
        for line in n:
            if line not in notes:
                notes.append(line)
    n_rep = replicas_for(pset, dtype, device, max_replicas)
    elem = torch.finfo(dtype).bits // 8
    # state of every candidate at once (+1 state tensor of slack for peers that keep more), plus params/grads
    need = n_rep * pset.numel * (2 * elem + sum((OPTIMIZERS[c.optimizer].n_states + 1) * 4 for c in cands))
    if interleave is None:
        interleave = device.type == "cpu" and need < 0.4 * available_memory_bytes(device)
    if mode_out is not None:
        mode_out["mode"] = "interleaved" if interleave else "sequential"
    tag = f"{pset.name}/{str(dtype).removeprefix('torch.')}"

    if compile_step:
        import torch._dynamo as dynamo

        # every compiled optimizer adds ~3 entries per frame (first step, second, dynamic step count)
        # to the cache of the shared `step` code; past the limit dynamo would silently run eager and
        # the row would time the wrong thing
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit"):
            if hasattr(dynamo.config, knob):
                setattr(dynamo.config, knob, max(getattr(dynamo.config, knob), 256))
    replicas = [make_params(pset, device, dtype, seed=seed + r) for r in range(n_rep)]

    def build(c: Candidate) -> tuple[Callable[[], None], torch.optim.Optimizer, float] | None:
        """Optimizers on every replica, one probe step each (state init, compilation); None if it fails."""
        try:
            t0 = time.perf_counter()
            # compiled: one replica. Rotating compiled steps of several optimizer instances measured
            # ~800 ms per 3-tensor Adan step here (each call walks every instance's guards and
            # graph-break resumes) against 0.04 ms for one instance; GPU sets exceed L2 anyway.
            opts = [c.make(ps) for ps in (replicas[:1] if c.compiled else replicas)]
            fns = [torch.compile(o.step) if c.compiled else o.step for o in opts]
            for f in fns:
                f()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return rotating(fns), opts[0], time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - a failing candidate is reported, the run goes on
            msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            notes.append(f"{c.key}: failed on {tag}: {type(exc).__name__}: {msg}")
            return None

    def result(c: Candidate, samples: list[float], opt, probe_s: float, warm_s: float) -> StepResult:
        st = stats_of(samples)
        p = _probe_param(replicas[0])
        spec = OPTIMIZERS[c.optimizer]
        state_b = state_bytes_per_param(opt, p)
        if c.source == "fused_optim":  # the state as stored (bf16, 8-bit codes + scales), measured
            bpp = round(spec.bytes_per_param_measured(p.element_size(), state_b), 3)
        else:  # a peer may keep extra state the floor does not count (counters, master weights)
            bpp = spec.bytes_per_param(p.element_size(), state_elem_size(opt, p))
        compile_s = None
        if c.compiled:  # what the first steps cost beyond steady state: tracing and code generation
            compile_s = max(0.0, probe_s + warm_s - (1 + warmup) * st.median_s)
        return StepResult(pset, dtype, c, st, bpp, compile_s, 1 if c.compiled else n_rep,
                          state_bytes_per_param=round(state_b, 3))

    failed: dict[str, Exception] = {}

    def guarded(key: str, fn: Callable[[], None]) -> Callable[[], None]:
        """A step that fails later than its probe (a peer's bug at step n) drops only that candidate."""
        def call() -> None:
            if key not in failed:
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001
                    failed[key] = exc
        return call

    def keep(c: Candidate) -> bool:
        if c.key in failed:
            exc = failed[c.key]
            notes.append(f"{c.key}: failed on {tag} while timed: {type(exc).__name__}: {str(exc)[:200]}")
            return False
        return True

    results: list[StepResult] = []
    if interleave:
        built = {}
        for c in cands:
            b = build(c)
            if b is not None:
                built[c.key] = (c, *b)
        fns = {k: guarded(k, v[1]) for k, v in built.items()}
        # the floor over the group's working set (params, grads, one state per replica; >= 2x the cache)
        floor_fn, floor_bytes = floor_stream(device, max(n_rep * pset.numel * 3 * elem, 2 * cache_bytes(device)))
        fns[FLOOR_KEY] = floor_fn
        samples, warm = time_interleaved(fns, device=device, warmup=warmup, reps=reps, seed=seed,
                                         on_round=(lambda: progress(1)) if progress else None)
        floor_gbps = floor_bytes / stats_of(samples.pop(FLOOR_KEY)).median_s / 1e9
        del fns, floor_fn
        for k, (c, _fn, opt, probe_s) in built.items():
            if keep(c):
                results.append(result(c, samples[k], opt, probe_s, warm[k]))
                results[-1].floor_gbps = floor_gbps
    else:
        for c in cands:
            b = build(c)
            if b is not None:
                fn, opt, probe_s = b
                samples, warm_s = time_one(guarded(c.key, fn), device=device, warmup=warmup, reps=reps)
                if keep(c):
                    results.append(result(c, samples, opt, probe_s, warm_s))
                del fn, opt, b
            if c.compiled:  # dynamo's caches hold the compiled frames and, through them, the state
                import torch._dynamo as dynamo

                dynamo.reset()
            # every optimizer's state is freed before the next is built (a 1B set holds one at a time)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if progress:
                progress(reps / len(cands))
    return results
