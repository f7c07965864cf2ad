"""A tensor with more than 2^31 elements updates correctly: element offsets are int64 everywhere (apex's
multi-tensor kernels crash above 2^31, docs/design.md).

Values depend on the index (a pattern, not a constant), so an offset that wrapped at 2^31 reads or
writes the wrong element and shows up in the checked windows: the start, both sides of 2^31, the end.
The expectation for a window is computed from a copy of it taken before the step (Lion is elementwise;
GradientEquilibrium's mean is taken by torch over the whole tensor in float64 chunks).

- GPU (marked gpu and slow): every fused impl available on CUDA, Lion with bf16 params (fp32 state) and
  GradientEquilibrium with fp16 params, ~17 GB at most.
- CPU native (marked slow, skipped below 12 GiB of available memory): GradientEquilibrium in fp16,
  8.6 GB. A strided view cannot stand in for the big tensor here: the native CPU path copies a non-dense
  view into a contiguous temporary (csrc/multi_tensor_lists.h), so the offsets a view reaches are
  torch's, not ours; only a real >2^31-element tensor exercises the kernels' chunk offsets.
"""
from __future__ import annotations

import pytest
import torch

import fused_optim

N = 2**31 + 2**14 + 5  # past int32, not a multiple of any block or chunk size
CHUNK = 2**26
W = 4096


def _windows() -> list[slice]:
    return [slice(0, W), slice(2**31 - W, 2**31 + W), slice(N - W, N)]


def _pattern(n: int, dtype: torch.dtype, device: str, a: int, b: int, scale: float, shift: float) -> torch.Tensor:
    """((i * a) % b) * scale + shift, filled chunk by chunk (an int64 arange of N would take 17 GB)."""
    out = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, CHUNK):
        idx = torch.arange(start, min(n, start + CHUNK), device=device)
        out[start:start + idx.numel()] = ((idx * a) % b).to(torch.float32) * scale + shift
    return out


def _mean64(t: torch.Tensor) -> float:
    return sum(t[s:s + CHUNK].double().sum().item() for s in range(0, t.numel(), CHUNK)) / t.numel()


def _check_lion(impl: str, device: str) -> None:
    lr, wd = 0.05, 0.1
    p = _pattern(N, torch.bfloat16, device, 7, 251, 1 / 251, 0.0).requires_grad_()
    p.grad = _pattern(N, torch.bfloat16, device, 5, 13, 1.0, -6.0)  # sign varies with the index; 0 at some
    before = {w.start: (p.detach()[w].float().clone(), p.grad[w].float().clone()) for w in _windows()}
    opt = fused_optim.Lion([p], lr=lr, betas=(0.9, 0.99), weight_decay=wd, impl=impl)
    opt.step()
    m = opt.state[p]["exp_avg"]
    for w in _windows():
        p0, g = before[w.start]
        want_p = p0 * (1 - lr * wd) - lr * torch.sign(g * (1 - 0.9))
        want_m = g * (1 - 0.99)
        got_p = p.detach()[w].float()
        # one bf16 ulp of rounding; a misplaced element is off by ~2*lr or by the pattern's step
        assert torch.allclose(got_p, want_p, rtol=2**-7, atol=2**-9), f"{impl}: params wrong in {w}"
        assert torch.allclose(m[w].float(), want_m, rtol=2**-7, atol=1e-6), f"{impl}: exp_avg wrong in {w}"


def _check_equilibrium(impl: str, device: str) -> None:
    lr = 0.25
    p = _pattern(N, torch.float16, device, 3, 97, 1 / 97, 0.0).requires_grad_()
    p.grad = _pattern(N, torch.float16, device, 11, 17, 0.125, -1.0)
    mean = _mean64(p.grad)
    before = {w.start: (p.detach()[w].float().clone(), p.grad[w].float().clone()) for w in _windows()}
    opt = fused_optim.GradientEquilibrium([p], lr=lr, impl=impl)
    opt.step()
    for w in _windows():
        p0, g = before[w.start]
        want = p0 - lr * (g - mean)
        assert torch.allclose(p.detach()[w].float(), want, rtol=2**-10, atol=2**-11), f"{impl}: params wrong in {w}"


def _cuda_fused_impls() -> list[str]:
    if not torch.cuda.is_available():
        return ["none"]
    impls = [i for i, st in fused_optim.available_impls("cuda").items() if st.available and i in ("triton", "native")]
    return impls or ["none"]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("opt", ["lion", "equilibrium"])
@pytest.mark.parametrize("impl", _cuda_fused_impls())
def test_more_than_2_31_elements_cuda(impl, opt):
    if impl == "none":
        pytest.skip("needs CUDA and a fused impl")
    free, _ = torch.cuda.mem_get_info()
    if free < 20 * 2**30:
        pytest.skip(f"needs ~20 GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    try:
        (_check_lion if opt == "lion" else _check_equilibrium)(impl, "cuda")
    finally:
        torch.cuda.empty_cache()


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@pytest.mark.slow
def test_more_than_2_31_elements_cpu_native():
    if not fused_optim.available_impls("cpu")["native"].available:
        pytest.skip("the native extension is not available")
    if _available_memory() < 12 * 2**30:
        pytest.skip("needs ~12 GiB of available memory (two 4.3 GB fp16 tensors and copies of windows)")
    _check_equilibrium("native", "cpu")
