"""Timing: median and spread of single steps, warm-up excluded.

CPU: every candidate of a group is alive at once and the candidates take turns, one timed sample
each per round in a shuffled order, so load from other processes (this project's CI machine is
shared) lands on all of them alike instead of on whoever ran during a burst. Medians, not means.
CUDA: one candidate at a time (a 1B-parameter set leaves room for one optimizer's state), each
sample bracketed by CUDA events, so the host's launch timing does not enter except where the
device waits for it (which is exactly the launch-overhead cost we want to see).
"""
from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["FLOOR_KEY", "FLOOR_TOLERANCE", "Stats", "copy_bandwidth", "floor_stream", "rotating", "stats_of",
           "stream_bandwidth", "time_interleaved", "time_one"]


@dataclass(frozen=True)
class Stats:
    median_s: float
    p20_s: float
    p80_s: float
    min_s: float
    n: int


def _quantile(sorted_xs: list[float], q: float) -> float:
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    pos = q * (len(sorted_xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def stats_of(samples: list[float]) -> Stats:
    xs = sorted(samples)
    return Stats(statistics.median(xs), _quantile(xs, 0.2), _quantile(xs, 0.8), xs[0], len(xs))


def rotating(fns: list[Callable[[], object]]) -> Callable[[], None]:
    """One call of the next fn in turn: steps over replicas of a set that would sit in cache."""
    i = [0]

    def call() -> None:
        fns[i[0] % len(fns)]()
        i[0] += 1
    return call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inner_count(est_s: float, min_sample_s: float, cap: int = 64) -> int:
    """Steps per sample, so that a sample is long enough for the timer (sub-ms steps on a busy host)."""
    if est_s <= 0:
        return cap
    return max(1, min(cap, math.ceil(min_sample_s / est_s)))


def time_interleaved(fns: dict[str, Callable[[], None]], *, device: torch.device, warmup: int, reps: int,
                     min_sample_s: float = 2e-3, seed: int = 0,
                     on_round: Callable[[], None] | None = None) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Time every fn in `fns` in shuffled rounds; returns (per-step samples, total warm-up seconds)."""
    rng = random.Random(seed)
    keys = list(fns)
    warm_s = {k: 0.0 for k in keys}
    last = {k: 0.0 for k in keys}
    for _ in range(warmup):
        for k in keys:
            t0 = time.perf_counter()
            fns[k]()
            _sync(device)
            last[k] = time.perf_counter() - t0
            warm_s[k] += last[k]
    inner = {k: _inner_count(last[k], min_sample_s) for k in keys}
    samples: dict[str, list[float]] = {k: [] for k in keys}
    for _ in range(reps):
        rng.shuffle(keys)
        for k in keys:
            fn, n = fns[k], inner[k]
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            _sync(device)
            samples[k].append((time.perf_counter() - t0) / n)
        if on_round is not None:
            on_round()
    return samples, warm_s


def time_one(fn: Callable[[], None], *, device: torch.device, warmup: int, reps: int,
             min_sample_s: float = 1e-3) -> tuple[list[float], float]:
    """Time one fn alone; CUDA events on a GPU. Returns (per-step samples, total warm-up seconds)."""
    warm_s, last = 0.0, 0.0
    for _ in range(warmup):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        last = time.perf_counter() - t0
        warm_s += last
    n = _inner_count(last, min_sample_s)
    samples = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            for _ in range(n):
                fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [start.elapsed_time(end) / 1e3 / n for start, end in events]
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            samples.append((time.perf_counter() - t0) / n)
    return samples, warm_s


def copy_bandwidth(device: torch.device, nbytes: int, *, reps: int = 15) -> tuple[float, Stats]:
    """`dst.copy_(src)` in bytes/s (read + write counted: 2·nbytes per copy), median of reps: the reference
    beside the floor (`stream_bandwidth`). Not a limit on a CPU: its destination pays a read-for-ownership
    that an in-place update does not (committed CPU runs showed fused steps at 187-212 % of it)."""
    n = max(1, nbytes // 4)
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    samples, _ = time_one(lambda: dst.copy_(src), device=device, warmup=3, reps=reps, min_sample_s=0.0)
    st = stats_of(samples)
    return 2 * n * 4 / st.median_s, st


#: a step or kernel measured above this multiple of the floor is a measurement problem, not a result
FLOOR_TOLERANCE = 1.05


#: the floor's name among the candidates of an interleaved group (never a real candidate's key)
FLOOR_KEY = "<floor: in-place stream>"


def floor_stream(device: torch.device, nbytes: int) -> tuple[Callable[[], None], int]:
    """`(fn, bytes moved per call)`: the floor's stream (`x.neg_()`) over `nbytes`, to be timed as one more
    candidate of an interleaved group, so that on a shared machine the floor is measured in the same minutes
    as the group (a run-wide floor measured before and after let busy minutes flag quiet-minute rows)."""
    n = max(1, nbytes // 4)
    buf = torch.rand(n, device=device)
    return (lambda: buf.neg_()), 2 * n * 4


def stream_bandwidth(device: torch.device, nbytes: int, *, reps: int = 15) -> tuple[float, Stats]:
    """The floor: an in-place read-modify-write stream (`x.neg_()`) in bytes/s, read + write counted, on
    the threads torch uses in this process (the steps' threads), over a buffer of 2·nbytes (the working
    set of `copy_bandwidth(nbytes)`: several times the last-level cache, so it streams from memory).

    Every optimizer step and kernel here reads each byte it writes (in place) and reads some bytes it
    does not write: at best its bytes move at this rate, whether the memory system is limited by the
    reads (then the writes ride along, as here) or by the total traffic (GPUs). Per-tensor costs are
    left out on purpose: they are what a multi-tensor kernel is there to remove."""
    n = max(1, 2 * nbytes // 4)
    buf = torch.rand(n, device=device)
    samples, _ = time_one(lambda: buf.neg_(), device=device, warmup=3, reps=reps, min_sample_s=0.0)
    st = stats_of(samples)
    return 2 * n * 4 / st.median_s, st
