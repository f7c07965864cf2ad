"""Low-precision state in Triton: Philox, stochastic rounding to bf16 and 8-bit blockwise quantization as
device functions a fused update kernel calls on values it already holds, plus small standalone kernels
(used by the tests and for converting a whole tensor), and what the optimizers' lowbit kernels share:
tile coordinates, state loads and stores per storage format, and their launches (`lowbit_launches`). Bit-identical to the torch reference
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

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import lowbit as _ref
from . import multi_tensor as mt
from .multi_tensor import (
    _load,
    _load_f32,
    _max_combine,
    _ptr,
    _store,
    _store_f32,
    _sum_combine,
    device_fn,
    kernel_for,
)


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


@device_fn
def five_stream_words(seed, step, tensor_index, offs, PARAM_SR: tl.constexpr, FMT: tl.constexpr):
    """The words of streams 0..4 of an update with four state lists (Adan, NeuroOptima): 0 the param, 1 + j
    state list j; stream 4 is word 0 of the call at tensor index + 2^31 (docs/lowbit.md §5). Zeros where
    nothing is rounded stochastically (8-bit state is rounded to nearest)."""
    if PARAM_SR or FMT == 1:
        r0, r1, r2, r3 = random_words(seed, step, tensor_index, offs)
    else:
        r0 = 0
        r1 = 0
        r2 = 0
        r3 = 0
    if FMT == 1:
        r4, _, _, _ = random_words(seed, step, tensor_index + 2147483648, offs)
    else:
        r4 = 0
    return r0, r1, r2, r3, r4


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
def sr_fp16_bits(x, r):
    """fp16 bits (uint16) of fp32 ``x`` rounded stochastically with the uint32 random words ``r`` (high 24
    bits used): csrc/math/lowbit.h's ``sr_fp16_bits``, the same integer and exact fp32 operations."""
    b = x.to(tl.uint32, bitcast=True)
    a = b & 0x7FFFFFFF
    sign = (b >> 16) & 0x8000
    r24 = r >> 8
    nan = sign | 0x7E00 | ((a >> 13) & 0x3FF)
    normal = (a >> 13) - (112 << 10) + tl.where(r24 < ((a & 0x1FFF) << 11), 1, 0).to(tl.uint32)
    small = a < 0x38800000
    t = tl.where(small, a.to(tl.float32, bitcast=True), 0.0) * 16777216.0  # (other lanes: no cast overflow)
    m = t.to(tl.uint32)  # toward zero (t >= 0)
    threshold = (t - m.to(tl.float32)) * 16777216.0
    sub = m + tl.where(r24.to(tl.float32) < threshold, 1, 0).to(tl.uint32)
    mag = tl.where(a > 0x7F800000, nan, tl.where(a >= 0x47800000, sign | 0x7C00,
                                                 sign | tl.where(small, sub, normal)))
    return mag.to(tl.uint16)


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
def _sr_kernel(x_ptr, r_ptr, out_ptr, n, FP16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    r = tl.load(r_ptr + offs, mask=mask, other=0).to(tl.uint32)
    if FP16:
        h = sr_fp16_bits(x, r)
    else:
        h = sr_bf16_bits(x, r)
    tl.store(out_ptr + offs, h.to(tl.int16, bitcast=True), mask=mask)


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


def _stochastic_round(x: torch.Tensor, bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    _ref.check_sr_args(x, bits)
    x = x.contiguous()
    out = torch.empty(x.shape, dtype=torch.int16, device=x.device)
    n = x.numel()
    if n:
        kernel_for(_sr_kernel, x.device)[(triton.cdiv(n, _BLOCK),)](x, bits.contiguous(), out, n,
                                                                    FP16=dtype == torch.float16, BLOCK=_BLOCK)
    return out.view(dtype)


def stochastic_round_bf16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """`fused_optim.lowbit.stochastic_round_bf16` computed by `sr_bf16_bits`."""
    return _stochastic_round(x, bits, torch.bfloat16)


def stochastic_round_fp16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """`fused_optim.lowbit.stochastic_round_fp16` computed by `sr_fp16_bits`."""
    return _stochastic_round(x, bits, torch.float16)


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


# ------------------------------------------------------------------------------ fused update passes
# A lowbit-aware update kernel (Lion, Adan: `fused_optim.lowstate.Rounding`) loads its chunk as a
# ``[BLOCK // QUANT_BLOCK, QUANT_BLOCK]`` tile: the update chunks start at multiples of BLOCK (a
# multiple of QUANT_BLOCK) inside each tensor, so every row is one whole quantization block (the last
# one masked). Per state list the kernel dequantizes (8-bit: codes and the row's scale) or widens (bf16),
# runs the fp32 rule, and writes back: 8-bit codes with the new values' block absmax, bf16 rounded
# stochastically with stream ``1 + j``, the param (bf16 with stochastic rounding) with stream 0.

#: ``FMT`` constexpr of the state storage: the state dtype (S_KIND), bf16 bits, 8-bit codes
FMT_FP32, FMT_BF16, FMT_8BIT = 0, 1, 2
_FMTS = {"fp32": FMT_FP32, "bf16": FMT_BF16, "8bit": FMT_8BIT}


@device_fn
def tile_coords(meta_ptr, chunks_ptr, ROW: tl.constexpr, BLOCK: tl.constexpr, QB: tl.constexpr):
    """`multi_tensor._chunk_coords` as a tile of whole quantization blocks: (tensor index, row pointer,
    int64 offsets ``[BLOCK // QB, QB]`` (row-major flat indices in the tensor), their mask, the block
    indices ``[BLOCK // QB]``, which blocks exist, whether the chunk is full)."""
    ROWS: tl.constexpr = BLOCK // QB
    pid = tl.program_id(0)
    t = tl.load(chunks_ptr + 2 * pid).to(tl.int64)
    c = tl.load(chunks_ptr + 2 * pid + 1).to(tl.int64)
    row = meta_ptr + t * ROW
    numel = tl.load(row)
    blk = c * ROWS + tl.arange(0, ROWS)
    offs = blk[:, None] * QB + tl.arange(0, QB)[None, :]
    return t, row, offs, offs < numel, blk, blk * QB < numel, c * BLOCK + BLOCK <= numel


@device_fn
def rng_step(step, step_buf, ON_DEVICE: tl.constexpr):
    """The generator's step: the int argument, or (capturable) the device counter, as uint32 (its low
    32 bits, as `fused_optim.lowbit.random_bits` takes a tensor step)."""
    if ON_DEVICE:
        s = (tl.load(step_buf).to(tl.int64) & 0xFFFFFFFF).to(tl.uint32)
    else:
        s = tl.cast(tl.cast(step, tl.int64), tl.uint32)  # tl.cast: an int argument of 1 is a constexpr
    return s


@device_fn
def load_state(row, LIST: tl.constexpr, offs, mask, blk, blk_mask, scale_addr, mag_ptr, FMT: tl.constexpr,
               S_KIND: tl.constexpr, SIGNED: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """(address, fp32 tile) of static list LIST in its storage `FMT`; masked-off lanes read 0."""
    addr = tl.load(row + 4 + LIST)
    if FMT == 2:
        codes = _load(_ptr(addr, tl.uint8, ALIGNED) + offs, mask, MASKED)
        scale = tl.load(scale_addr.to(tl.pointer_type(tl.float32)) + blk, mask=blk_mask, other=0.0)
        x = tl.where(mask, dequantize_tile(codes, scale, mag_ptr, SIGNED), 0.0)  # 0 * inf in a masked lane
    elif FMT == 1:
        x = _load_f32(addr, offs, mask, 2, ALIGNED, MASKED)
    else:
        x = _load_f32(addr, offs, mask, S_KIND, ALIGNED, MASKED)
    return addr, x


@device_fn
def store_state(addr, offs, x, mask, blk, blk_mask, scale_addr, thr_ptr, r, FMT: tl.constexpr,
                S_KIND: tl.constexpr, SIGNED: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Write the fp32 tile `x` in its storage `FMT`: 8-bit codes to nearest with each row's new absmax
    (masked-off lanes count as 0, as the reference pads a short last block), bf16 rounded
    stochastically with the words `r`, else the state dtype rounded to nearest."""
    if FMT == 2:
        x = tl.where(mask, x, 0.0)
        scale = block_absmax(x)
        tl.store(scale_addr.to(tl.pointer_type(tl.float32)) + blk, scale, mask=blk_mask)
        _store(_ptr(addr, tl.uint8, ALIGNED) + offs, quantize_tile(x, scale, thr_ptr, SIGNED), mask, MASKED)
    elif FMT == 1:
        _store(_ptr(addr, tl.uint16, ALIGNED) + offs, sr_bf16_bits(x, r), mask, MASKED)
    else:
        _store_f32(addr, offs, x, mask, S_KIND, ALIGNED, MASKED)


@device_fn
def store_param(addr, offs, p, mask, r, P_KIND: tl.constexpr, PARAM_SR: tl.constexpr, ALIGNED: tl.constexpr,
                MASKED: tl.constexpr):
    """Write the param: bf16 or fp16 rounded stochastically with the words `r` when PARAM_SR, else to
    nearest."""
    if PARAM_SR:
        if P_KIND == 1:
            _store(_ptr(addr, tl.uint16, ALIGNED) + offs, sr_fp16_bits(p, r), mask, MASKED)
        else:
            _store(_ptr(addr, tl.uint16, ALIGNED) + offs, sr_bf16_bits(p, r), mask, MASKED)
    else:
        _store_f32(addr, offs, p, mask, P_KIND, ALIGNED, MASKED)


#: param dtypes a lowbit kernel rounds stochastically (PARAM_SR)
_SR_DTYPES = (torch.bfloat16, torch.float16)

_DEVICE_TABLES: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def device_tables(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """`fused_optim.lowbit.quant_tables` on `device`, uploaded once (no copy per step, none under capture)."""
    key = (bool(signed), device)
    out = _DEVICE_TABLES.get(key)
    if out is None:
        out = _DEVICE_TABLES[key] = _ref.quant_tables(signed, device)
    return out


def uses_lowbit_kernel(params, low) -> bool:
    """Whether a call with ``lowbit=low`` needs the lowbit kernel: state stored below fp32, or bf16 / fp16 params
    rounded stochastically. Otherwise the ordinary fp32 kernel runs, unchanged."""
    if low is None:
        return False
    return low.fmt != "fp32" or (low.param_sr and bool(params) and params[0].dtype in _SR_DTYPES)


class LowbitLaunch(NamedTuple):
    """A `multi_tensor.Launch` of a lowbit kernel and its extra arguments (`lowbit_launches`)."""

    launch: mt.Launch
    args: dict


def lowbit_launches(params, grads, states, low, block: int, grad_scale=None, found_inf=None, *, grad_dtype=None):
    """The launches of a lowbit-aware update (`uses_lowbit_kernel`) over one (device, dtype) group: as
    `multi_tensor.update_launches` (zero-size tensors dropped; a strided param or bf16 state goes to a
    second launch over contiguous, row-major stand-ins copied back after it, which is the order of the
    codes and of the generator's element index), with the arguments every lowbit kernel takes:
    ``aux_ptr`` (per tensor: its generator tensor index, then each state list's absmax address), the
    8-bit tables of each state list, ``seed``, the step (``rng_step``/``rng_step_buf``/
    ``RNG_STEP_ON_DEVICE``), ``FMT``, ``PARAM_SR`` and ``QB``. Bad state (the wrong dtype or scale
    count for ``low.fmt``) raises before anything is launched. ``grad_dtype``: the grads' dtype when a
    kernel reads them with its own ``G_KIND`` (Muon's momentum stage: list 0 is its update buffers)."""
    if block % _ref.QUANT_BLOCK:
        raise ValueError(f"lowbit update: BLOCK {block} is not a multiple of the quantization block "
                         f"{_ref.QUANT_BLOCK}")
    numels = [p.numel() for p in params]
    mt.check_lists(params, grads, states, numels, grad_dtype=grad_dtype)
    keep = [i for i, n in enumerate(numels) if n > 0]
    if not keep:
        return
    fmt = _FMTS[low.fmt]
    _check_state(states, low, keep)
    p_kind = mt.dtype_kind(params[0].dtype)
    s_kind = mt.dtype_kind(states[0][keep[0]].dtype) if fmt == FMT_FP32 and states else mt.KIND_FP32
    device = params[keep[0]].device
    lists = [list(params), *(list(s) for s in states)]
    strided = [i for i in keep if not all(lst[i].is_contiguous() for lst in lists)]
    strided_set = set(strided)
    plain = [i for i in keep if i not in strided_set]
    step = low.step
    on_device = isinstance(step, torch.Tensor)
    tables = [device_tables(signed, device) for signed in low.signed]
    base = {"seed": int(low.seed), "rng_step": 0 if on_device else int(step), "FMT": fmt, "QB": _ref.QUANT_BLOCK,
            "PARAM_SR": bool(low.param_sr) and p_kind in (mt.KIND_BF16, mt.KIND_FP16), "RNG_STEP_ON_DEVICE": on_device}
    for idx in (plain, strided):
        if not idx:
            continue
        writeback = []
        static = []
        for lst in lists:
            col = []
            for i in idx:
                t = lst[i]
                if not t.is_contiguous():
                    c = t.contiguous()
                    writeback.append((t, c))
                    t = c
                col.append(t)
            static.append(col)
        gs, gwb = mt._contiguous_grads([grads[i] for i in idx], grad_scale is not None)
        scales, scale_writeback = [], []
        aux = []
        for i in idx:
            aux.append(low.tensor_index[i])
            for j in range(len(states)):
                if fmt == FMT_8BIT:
                    a = low.absmax[j][i]
                    if not a.is_contiguous():
                        c = a.contiguous()
                        scale_writeback.append((a, c))
                        a = c
                    scales.append(a)
                    aux.append(a.data_ptr())
                else:
                    aux.append(0)
        prep = mt.Prepared(static, gs, p_kind, s_kind, [*writeback, *scale_writeback], gwb)
        launch = mt.Launch(prep, mt.get_table(prep, block, "lowbit"), grad_scale, found_inf)
        args = dict(base, aux_ptr=mt.device_constants(aux, torch.int64, device),
                    rng_step_buf=step.to(device) if on_device else launch.unused)
        for j, (mags, thr) in enumerate(tables):
            args[f"mag{j}_ptr"], args[f"thr{j}_ptr"] = mags, thr
        yield LowbitLaunch(launch, args)
        prep.finish()


def _check_state(states, low, keep) -> None:
    want = {"bf16": torch.bfloat16, "8bit": torch.uint8}.get(low.fmt)
    for j, lst in enumerate(states):
        for i in keep:
            t = lst[i]
            if want is not None and t.dtype != want:
                raise TypeError(f"lowbit update: state list {j} entry {i} is {t.dtype}, but the call's format "
                                f"{low.fmt!r} stores {want}")
            if low.fmt == "8bit":
                a = low.absmax[j][i]
                if a.dtype != torch.float32 or a.numel() != _ref.num_blocks(t.numel()):
                    raise ValueError(f"lowbit update: state list {j} entry {i} has {t.numel()} codes, which need "
                                     f"{_ref.num_blocks(t.numel())} fp32 block scales; got {a.numel()} "
                                     f"{a.dtype}")
