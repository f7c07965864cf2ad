"""Long runs: no growth of allocated memory, no growth of step time, bit-identical run to run.

Memory is watched three ways: tracemalloc (Python allocations: a cache keyed per step, a list that
grows), the number of live tensors the garbage collector can see (a tensor kept per step), and on CUDA
`torch.cuda.memory_allocated`. Step time is CPU time per step (`time.process_time`, so other
processes on a shared machine do not count), compared as the median of an early window against the
median of a late window with a generous factor: this catches O(steps) work per step, not speed.

The 10,000-step runs are marked `slow`; the default run does a shorter version of the same checks.
"""
from __future__ import annotations

import gc
import statistics
import sys
from array import array
import time
import tracemalloc

import pytest
import torch

from reliability_util import (SLOW_IMPLS, Problem, assert_identical, combos, cpu_impls, exported_optimizers,
                              make_optimizer, run_steps, snapshot)
from reliability_util import triton_interpreter  # noqa: F401 (an autouse fixture)

IMPLS = cpu_impls()
OPTIMIZERS = exported_optimizers()
# lazily created state, caches, allocator free lists: Adan's forloop (a host-read clip per step) keeps
# adding Python memory blocks for ~300 steps before it levels off
WARMUP = 300


def _tiny_params(cls, seed: int, device: str = "cpu") -> list[torch.Tensor]:
    """A few small tensors (one zero-size): the per-step overhead is what a leak or a growing loop shows in."""
    g = torch.Generator().manual_seed(seed)
    muon = cls.__name__.startswith("Muon")
    shapes = [(4, 3), (3, 5), (0, 2)] if muon else [(4, 3), (7,), (1,), (0,)]
    return [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no __class__ hooks


def _long_run(cls, impl: str, steps: int, device: str = "cpu", monitor: bool = True, traced: int = 0) -> dict:
    """`steps` monitored steps after a warm-up, then `traced` more under tracemalloc (it slows every
    Python allocation ~20x, so the short test traces a slice and counts blocks for the rest). Monitored
    runs use one intra-op thread: on a shared machine, threads spinning at a barrier would be billed as
    this process's CPU time."""
    threads = torch.get_num_threads()
    if monitor:
        torch.set_num_threads(1)
    try:
        return _run(cls, impl, steps, device, monitor, traced)
    finally:
        torch.set_num_threads(threads)


def _run(cls, impl: str, steps: int, device: str, monitor: bool, traced: int) -> dict:
    params = _tiny_params(cls, 0, device)
    torch.manual_seed(0)
    opt = make_optimizer(cls, params, impl)
    problem = Problem(params, seed=1)

    def one_step():
        run_steps(opt, problem, 1)

    if not monitor:
        for _ in range(steps):
            one_step()
        return dict(result=snapshot(opt, params))
    for _ in range(WARMUP if impl not in SLOW_IMPLS else 10):
        one_step()
    cuda = device == "cuda"
    times = array("d", bytes(8 * steps))  # preallocated: the measurement itself must not allocate
    # Autograd graphs are cycles, so only what survives a collection counts as growth. Freezing what
    # exists now keeps each collection (and the tensor census) to the objects this run creates.
    gc.collect()
    gc.freeze()
    try:
        return _monitored(opt, params, one_step, steps, traced, times, cuda)
    finally:
        gc.unfreeze()


def _monitored(opt, params, one_step, steps, traced, times, cuda) -> dict:
    blocks = []
    for i in range(steps):
        if i in (steps // 3, 2 * steps // 3):  # between steps: the current grads and state exist each time
            blocks.append(sys.getallocatedblocks() if gc.collect() >= 0 else 0)
        if i == steps // 3:
            tensors_mid = _live_tensors()
            cuda_mid = torch.cuda.memory_allocated() if cuda else 0
        t0 = time.process_time()
        one_step()
        times[i] = time.process_time() - t0
    if cuda:
        torch.cuda.synchronize()
    blocks1 = sys.getallocatedblocks() if gc.collect() >= 0 else 0
    tensors1 = _live_tensors()
    cuda1 = torch.cuda.memory_allocated() if cuda else 0
    traced_growth = 0
    if traced:
        tracemalloc.start()
        traced0 = tracemalloc.get_traced_memory()[0]
        for _ in range(traced):
            one_step()
        gc.collect()
        traced_growth = tracemalloc.get_traced_memory()[0] - traced0
        tracemalloc.stop()
    # a leak grows the block count in both of the last two thirds; a one-time event (a dict resized, a
    # free list grown) in one of them only, so the smaller of the two is the measure
    return dict(traced_growth=traced_growth, block_growth=min(blocks[1] - blocks[0], blocks1 - blocks[1]),
                tensor_growth=tensors1 - tensors_mid,
                cuda_growth=cuda1 - cuda_mid,
                early=statistics.median(times[:steps // 3]), late=statistics.median(times[-(steps // 3):]),
                result=snapshot(opt, params))


def _check(run: dict, steps: int, traced: int, impl: str | None) -> None:
    # A leak of one small object per step is >= 1 block and ~50 B/step; below the bounds is noise. The
    # Triton interpreter patches triton.language classes at every launch (class-dict resizes of several
    # KiB come and go), so interpreted runs get a fixed allowance: compiled kernels are checked on GPU.
    blocks, traced_bytes = (256, 32 * 1024) if impl in SLOW_IMPLS else (32, 8 * 1024)
    # torch itself drifts by up to ~0.5 block/step on some paths (objects made by `.item()` and by the
    # optimizer's record_function hook, seen with tracemalloc); a leaked object is >= 1 block/step
    assert run["block_growth"] < blocks + 3 * (steps // 3) // 4, (
        f"{run['block_growth']} more Python memory blocks in each of the last two thirds of {steps} steps")
    assert run["traced_growth"] < traced_bytes + 16 * traced, (
        f"tracemalloc: Python allocations grew by {run['traced_growth']} B")
    assert run["tensor_growth"] <= 0, f"{run['tensor_growth']} more live tensors after {steps} steps"
    assert run["cuda_growth"] == 0, f"torch.cuda.memory_allocated grew by {run['cuda_growth']} B"
    assert run["late"] <= 3 * run["early"] + 100e-6, (
        f"step time grew: median {run['early'] * 1e6:.0f} us early, {run['late'] * 1e6:.0f} us late")


def _steps(impl: str, n: int) -> int:
    return max(30, n // 50) if impl in SLOW_IMPLS else n  # interpreted Triton: fewer steps, same checks


def _run_and_check(cls, impl, steps, traced, same_seed_steps, device="cpu"):
    """The monitored run (one thread); then two unmonitored runs of `same_seed_steps` with the default
    threads must be bit-identical (run to run, same seed)."""
    _check(_long_run(cls, impl, steps, device, traced=traced), steps, traced, impl)
    first = _long_run(cls, impl, same_seed_steps, device, monitor=False)
    second = _long_run(cls, impl, same_seed_steps, device, monitor=False)
    assert_identical(first["result"], second["result"], "run 2 vs run 1")


@pytest.mark.parametrize("cls,impl", combos(OPTIMIZERS, IMPLS))
def test_short_run_no_growth_and_deterministic(cls, impl):
    _run_and_check(cls, impl, _steps(impl, 300), traced=6 if impl in SLOW_IMPLS else 60,
                   same_seed_steps=_steps(impl, 100))


@pytest.mark.slow
@pytest.mark.parametrize("cls,impl", combos(OPTIMIZERS, IMPLS))
def test_10k_steps_no_growth_and_deterministic(cls, impl):
    # tracemalloc slows each step ~20x: 2,000 of the 10,000 steps run under it
    _run_and_check(cls, impl, _steps(impl, 10_000), traced=_steps(impl, 2_000), same_seed_steps=_steps(impl, 10_000))


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_10k_steps_cuda_no_growth_and_deterministic(cls):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _run_and_check(cls, None, 10_000, traced=1_000, same_seed_steps=10_000, device="cuda")
