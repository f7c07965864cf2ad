"""Low-precision state in Triton: Philox, stochastic rounding to bf16 and 8-bit blockwise quantization as
device functions a fused update kernel calls on values it already holds, plus small standalone kernels
(used by the tests and for converting a whole tensor). Bit-identical to the torch reference
`fused_optim.lowbit` and to csrc/math/lowbit.h (docs/lowbit.md §1-§4).

The Philox rounds are written out with uint32 ops rather than calling ``tl.philox``/``tl.randint``:
triton's generator is the same Philox4x32-10 (same constants, key = (seed low, seed high)) and
``tl.philox(seed, c0, c1, c2, c3)`` would take our counter, but it is a triton ``@jit`` library function
and this package's kernels call only builtins and their own device functions (see
`fused_optim.kernels.multi_tensor`, `kernel_for`). The tests check the two agree.

Quantization works on a 2-D tile ``[ROWS, QUANT_BLOCK]`` whose rows are whole quantization blocks, so
a block's absmax is one reduction along axis 1: a kernel that loads its state in that shape can
dequantize, do its fp32 math and requantize in the same pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import lowbit as _ref
from .multi_tensor import _max_combine, _sum_combine, device_fn, kernel_for


# ------------------------------------------------------------------------------------------ Philox
@device_fn
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of uint32 blocks (c0..c3) under the uint32 key (k0, k1): four uint32 blocks."""
    for r in tl.static_range(10):
        hi0 = tl.math.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.math.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@device_fn
def random_words(seed, step, tensor_index, offs):
    """The four Philox words of elements ``offs`` (int64) of tensor ``tensor_index`` at ``step`` under
    ``seed`` (int64 in [0, 2^63)): the key/counter layout of `fused_optim.lowbit.random_bits`."""
    seed = seed.to(tl.int64)
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    offs = offs.to(tl.int64)
    c0 = (offs & 0xFFFFFFFF).to(tl.uint32)
    c1 = (offs >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + tensor_index.to(tl.uint32)
    c3 = zero + step.to(tl.uint32)
    k0 = zero + k0
    k1 = zero + k1
    return philox4x32_10(c0, c1, c2, c3, k0, k1)


# ------------------------------------------------------------------------------- stochastic rounding
@device_fn
def sr_bf16_bits(x, r):
    """bf16 bits (uint16) of fp32 ``x`` rounded stochastically with the uint32 random words ``r`` (low 16
    bits used): add, truncate; NaN kept quiet (docs/lowbit.md §2)."""
    b = x.to(tl.uint32, bitcast=True)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    rounded = (b + (r & 0xFFFF)) >> 16
    return tl.where(nan, (b | 0x00400000) >> 16, rounded).to(tl.uint16)


@device_fn
def sr_bf16(x, r):
    """`sr_bf16_bits` widened back to fp32: the value a bf16 store would hold, for in-kernel math."""
    return (sr_bf16_bits(x, r).to(tl.uint32) << 16).to(tl.float32, bitcast=True)


# ---------------------------------------------------------------------------------- 8-bit blockwise
@device_fn
def block_absmax(x):
    """Per-row max |x| of a ``[ROWS, QUANT_BLOCK]`` fp32 tile, NaN for a row holding a NaN (as torch.amax)."""
    a = tl.abs(x)
    nan_or_zero = tl.reduce(tl.where(a != a, a, 0.0), 1, _sum_combine)  # noqa: PLR0124
    return tl.reduce(a, 1, _max_combine) + nan_or_zero


@device_fn
def quantize_tile(x, scale, thr_ptr, SIGNED: tl.constexpr):
    """uint8 codes of a ``[ROWS, QUANT_BLOCK]`` fp32 tile given each row's scale (`block_absmax`) and the
    map's fp32 thresholds (`fused_optim.lowbit.quant_tables`): nearest magnitude by binary search on
    ``|x| >= threshold * scale``, the sign bit as bit 7 when SIGNED."""
    a = tl.abs(x)
    s = scale[:, None]
    idx = tl.full(x.shape, 0, tl.int32)
    if SIGNED:
        STEP0: tl.constexpr = 64
        NSTEPS: tl.constexpr = 7
    else:
        STEP0: tl.constexpr = 128
        NSTEPS: tl.constexpr = 8
    for i in tl.static_range(NSTEPS):
        cand = idx + (STEP0 >> i)
        t = tl.load(thr_ptr + cand - 1)
        idx = tl.where(a >= t * s, cand, idx)
    if SIGNED:
        idx = idx | ((x.to(tl.uint32, bitcast=True) >> 31).to(tl.int32) << 7)
    return idx.to(tl.uint8)


@device_fn
def dequantize_tile(codes, scale, mag_ptr, SIGNED: tl.constexpr):
    """fp32 values of uint8 ``codes`` ``[ROWS, QUANT_BLOCK]`` with per-row ``scale``: ±magnitude * scale."""
    c = codes.to(tl.int32)
    s = scale[:, None]
    if SIGNED:
        v = tl.load(mag_ptr + (c & 0x7F)) * s
        v = tl.where((c >> 7) == 1, -v, v)
    else:
        v = tl.load(mag_ptr + c) * s
    return v


# ---------------------------------------------------------------------------------- standalone kernels
@triton.jit
def _random_kernel(out_ptr, n, seed, step, tensor_index, offset, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    w0, w1, w2, w3 = random_words(seed, step, tensor_index, offs + offset)
    base = out_ptr + offs
    tl.store(base, w0.to(tl.int64), mask=mask)
    tl.store(base + n, w1.to(tl.int64), mask=mask)
    tl.store(base + 2 * n, w2.to(tl.int64), mask=mask)
    tl.store(base + 3 * n, w3.to(tl.int64), mask=mask)


@triton.jit
def _sr_bf16_kernel(x_ptr, r_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + offs, mask=mask, other=0).to(tl.uint32)
    tl.store(out_ptr + offs, sr_bf16_bits(x, r).to(tl.int16, bitcast=True), mask=mask)


@triton.jit
def _quantize_kernel(x_ptr, codes_ptr, scales_ptr, thr_ptr, n, SIGNED: tl.constexpr, ROWS: tl.constexpr,
                     QB: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * QB + tl.arange(0, QB)[None, :]
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    scale = block_absmax(x)
    tl.store(scales_ptr + rows, scale, mask=rows * QB < n)
    tl.store(codes_ptr + offs, quantize_tile(x, scale, thr_ptr, SIGNED), mask=mask)


@triton.jit
def _dequantize_kernel(codes_ptr, scales_ptr, mag_ptr, out_ptr, n, SIGNED: tl.constexpr, ROWS: tl.constexpr,
                       QB: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    offs = rows[:, None] * QB + tl.arange(0, QB)[None, :]
    mask = offs < n
    codes = tl.load(codes_ptr + offs, mask=mask, other=0)
    scale = tl.load(scales_ptr + rows, mask=rows * QB < n, other=0.0)
    tl.store(out_ptr + offs, dequantize_tile(codes, scale, mag_ptr, SIGNED), mask=mask)


_BLOCK = 1024
_ROWS = 4


def random_bits(seed: int, step: int, tensor_index: int, numel: int, *, offset: int = 0,
                device: torch.device | str = "cpu", streams: int = 1) -> torch.Tensor:
    """`fused_optim.lowbit.random_bits` computed by the Triton generator."""
    _ref.check_key(seed, step, tensor_index)
    device = torch.device(device)
    out = torch.empty(4, numel, dtype=torch.int64, device=device)
    if numel:
        kernel_for(_random_kernel, device)[(triton.cdiv(numel, _BLOCK),)](
            out, numel, seed, step, tensor_index, offset, BLOCK=_BLOCK)
    return out[0] if streams == 1 else out[:streams]


def stochastic_round_bf16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """`fused_optim.lowbit.stochastic_round_bf16` computed by `sr_bf16_bits`."""
    _ref.check_sr_args(x, bits)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.int16, device=x.device)
    n = x.numel()
    if n:
        kernel_for(_sr_bf16_kernel, x.device)[(triton.cdiv(n, _BLOCK),)](
            x, bits.contiguous(), out, n, BLOCK=_BLOCK)
    return out.view(torch.bfloat16)


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_optim.lowbit.quantize_blockwise` computed by `quantize_tile`."""
    if x.dtype != torch.float32:
        raise TypeError(f"quantize_blockwise: x must be fp32, got {x.dtype}")
    x = x.contiguous()
    n = x.numel()
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    scales = torch.empty(_ref.num_blocks(n), dtype=torch.float32, device=x.device)
    _, thr = _ref.quant_tables(signed, x.device)
    if n:
        kernel_for(_quantize_kernel, x.device)[(triton.cdiv(scales.numel(), _ROWS),)](
            x, codes, scales, thr, n, SIGNED=bool(signed), ROWS=_ROWS, QB=_ref.QUANT_BLOCK)
    return codes, scales


def dequantize_blockwise(codes: torch.Tensor, scales: torch.Tensor, signed: bool) -> torch.Tensor:
    """`fused_optim.lowbit.dequantize_blockwise` computed by `dequantize_tile`."""
    codes = codes.contiguous()
    n = codes.numel()
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    mags, _ = _ref.quant_tables(signed, codes.device)
    if n:
        kernel_for(_dequantize_kernel, codes.device)[(triton.cdiv(_ref.num_blocks(n), _ROWS),)](
            codes, scales.contiguous(), mags, out, n, SIGNED=bool(signed), ROWS=_ROWS, QB=_ref.QUANT_BLOCK)
    return out
