"""Low-precision optimizer state: the numerical building blocks, pure torch (the reference).

Three pieces, each also in Triton (`fused_optim.kernels.lowbit`) and in C++ for host and device
(`csrc/math/lowbit.h`), with bit-identical results (docs/lowbit.md §1-§4):

- `philox4x32_10` and `random_bits`: a counter-based generator keyed by (seed, step, tensor index,
  element index), so every implementation draws the same 32 random bits for the same element.
- `stochastic_round_bf16`: fp32 -> bf16, unbiased.
- `quantize_blockwise` / `dequantize_blockwise`: 8-bit codes, one fp32 absmax scale per block of
  `QUANT_BLOCK` elements, a non-linear ("dynamic") map, signed or unsigned.

Every function here works on any device with int64 / fp32 tensor arithmetic only (no uint32 or
uint64 tensor ops, which torch lacks on some backends).
"""
from __future__ import annotations


import torch
from torch import Tensor

# ------------------------------------------------------------------------------------------ Philox
#: Philox4x32 round multipliers and Weyl key increments (Salmon et al., SC'11; Random123)
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10
_U32 = 0xFFFFFFFF
#: random words per Philox call: one element draws up to this many independent streams
STREAMS = 4


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(high, low) 32-bit halves of the 64-bit product a*m (a: int64 tensor of uint32 values, m: uint32).
    m is split into 16-bit halves so that no partial product leaves int64's range (a*m can reach 2^64):
    a*m = P*2^16 + Q with P = a*mh, Q = a*ml < 2^48, and P*2^16 = (P >> 16)*2^32 + (P & 0xFFFF)*2^16."""
    p = a * (m >> 16)
    low_sum = a * (m & 0xFFFF) + ((p & 0xFFFF) << 16)  # < 2^49
    return (p >> 16) + (low_sum >> 32), low_sum & _U32


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of the counter (c0, c1, c2, c3) under the key (k0, k1), all uint32 values held in
    int64 tensors (broadcast together) / Python ints. Returns the four output words as int64 tensors."""
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    k0, k1 = int(k0) & _U32, int(k1) & _U32
    for r in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        if r + 1 < PHILOX_ROUNDS:
            k0, k1 = (k0 + PHILOX_W0) & _U32, (k1 + PHILOX_W1) & _U32
    return c0, c1, c2, c3


def check_key(seed: int, step: int, tensor_index: int) -> None:
    """Raise a ValueError naming the bad part of a generator key (docs/lowbit.md §1)."""
    if not (isinstance(seed, int) and 0 <= seed < 2**63):
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if not (isinstance(step, int) and 0 <= step < 2**32):
        raise ValueError(f"step must be an int in [0, 2**32), got {step!r}")
    if not (isinstance(tensor_index, int) and 0 <= tensor_index < 2**31):
        raise ValueError(f"tensor_index must be an int in [0, 2**31), got {tensor_index!r}")


#: streams one element can draw: the param's and one per state tensor; stream ``s`` is word ``s % 4``
#: of the Philox call whose counter holds ``tensor_index + (s // 4) * 2**31`` (docs/lowbit.md §1)
MAX_STREAMS = 8


def stream_counter(tensor_index: int, stream: int) -> tuple[int, int]:
    """(counter word c2, output word) of `stream` of tensor `tensor_index` (docs/lowbit.md §1)."""
    if not 0 <= stream < MAX_STREAMS:
        raise ValueError(f"stream must be in [0, {MAX_STREAMS}), got {stream}")
    return tensor_index + (stream // STREAMS) * 2**31, stream % STREAMS


def random_bits(seed: int, step: int | Tensor, tensor_index: int, numel: int, *, offset: int = 0,
                device: torch.device | str = "cpu", streams: int = 1, stream: int | None = None) -> Tensor:
    """32 random bits per element ``offset .. offset+numel-1`` of a tensor, as int64 values in [0, 2^32).

    Key (k0, k1) = (low, high 32 bits of ``seed``); counter = (element index low 32 bits, element index
    high 32 bits, ``tensor_index``, ``step``). Stream ``s`` of an element is output word ``s`` of its
    Philox call, so one call gives an element up to `STREAMS` independent draws (e.g. one for the param,
    one per state tensor). Returns shape ``[numel]`` for ``streams == 1``, else ``[streams, numel]``.
    ``stream``: just that stream (``[numel]``), also beyond the fourth (`stream_counter`).
    ``step`` may be a 0-d integer-valued tensor (a step counter under torch.compile or on the device).
    """
    if isinstance(step, Tensor):
        check_key(seed, 0, tensor_index)
        step_c = step.reshape(()).to(device=device, dtype=torch.int64) & _U32
    else:
        check_key(seed, step, tensor_index)
        step_c = step
    if stream is not None:
        c2, word = stream_counter(tensor_index, stream)
        streams_needed = word + 1
    else:
        if not 1 <= streams <= STREAMS:
            raise ValueError(f"streams must be in [1, {STREAMS}], got {streams}")
        c2, word, streams_needed = tensor_index, None, streams
    elem = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    c2 = torch.full_like(elem, c2)
    c3 = torch.full_like(elem, step_c) if not isinstance(step_c, Tensor) else step_c.expand_as(elem)
    words = philox4x32_10(elem & _U32, elem >> 32, c2, c3, seed & _U32, seed >> 32)
    if word is not None:
        return words[word]
    return words[0] if streams_needed == 1 else torch.stack(words[:streams_needed])


def random_bits_many(seed: int, step: int | Tensor, tensor_indices: list[int], numels: list[int], stream: int,
                     device: torch.device | str = "cpu") -> list[Tensor]:
    """`random_bits(seed, step, t, n, stream=stream)` for every (t, n) of `tensor_indices` and `numels`, in
    one Philox evaluation over all their elements (many small tensors cost one pass, not one each)."""
    for t in tensor_indices:
        check_key(seed, 0 if isinstance(step, Tensor) else step, t)
    if not tensor_indices:
        return []
    c2s, word = zip(*(stream_counter(t, stream) for t in tensor_indices))
    word = word[0]
    total = sum(numels)
    counts = torch.tensor(numels, dtype=torch.int64, device=device)
    starts = torch.cumsum(counts, 0) - counts
    elem = torch.arange(total, dtype=torch.int64, device=device) - torch.repeat_interleave(starts, counts,
                                                                                           output_size=total)
    c2 = torch.repeat_interleave(torch.tensor(c2s, dtype=torch.int64, device=device), counts, output_size=total)
    if isinstance(step, Tensor):
        c3 = (step.reshape(()).to(device=device, dtype=torch.int64) & _U32).expand(total)
    else:
        c3 = torch.full((total,), step, dtype=torch.int64, device=device)
    words = philox4x32_10(elem & _U32, elem >> 32, c2, c3, seed & _U32, seed >> 32)
    return list(words[word].split(list(numels)))


# ------------------------------------------------------------------------------- stochastic rounding
def _f32_bits(x: Tensor) -> Tensor:
    """fp32 bit patterns as int64 values in [0, 2^32)."""
    return x.contiguous().view(torch.int32).to(torch.int64) & _U32


def check_sr_args(x: Tensor, bits: Tensor) -> None:
    """Raise naming the bad argument of a stochastic rounding call."""
    if x.dtype != torch.float32:
        raise TypeError(f"stochastic rounding: x must be fp32, got {x.dtype}")
    if bits.dtype != torch.int64 or bits.shape != x.shape:
        raise ValueError(f"stochastic rounding: bits must be an int64 tensor of x's shape {tuple(x.shape)} "
                         f"(from random_bits), got {bits.dtype} {tuple(bits.shape)}")


def stochastic_round_bf16_bits(x: Tensor, bits: Tensor) -> Tensor:
    """The bf16 bit patterns (int64 values in [0, 2^16)) of fp32 ``x`` rounded stochastically with the
    random words ``bits`` (int64 in [0, 2^32), same shape; the low 16 bits are used).

    Adds the random low 16 bits to the fp32 pattern and truncates: the magnitude rounds away from zero
    with probability (dropped part)/2^16, so E[result] = x exactly (docs/lowbit.md §2). ±0, ±inf and
    exact bf16 values are unchanged; NaN stays NaN (quiet, sign kept); a finite value above bf16's
    largest finite becomes ±inf with probability proportional to its distance from it.
    """
    check_sr_args(x, bits)
    b = _f32_bits(x)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    rounded = ((b + (bits & 0xFFFF)) & _U32) >> 16
    return torch.where(nan, (b | 0x00400000) >> 16, rounded)


def bf16_from_bits(b: Tensor) -> Tensor:
    """int64 values in [0, 2^16) as bf16 tensor."""
    return torch.where(b >= 0x8000, b - 0x10000, b).to(torch.int16).view(torch.bfloat16)


def stochastic_round_bf16(x: Tensor, bits: Tensor) -> Tensor:
    """`stochastic_round_bf16_bits` as a bf16 tensor of x's shape."""
    return bf16_from_bits(stochastic_round_bf16_bits(x, bits)).reshape(x.shape)


#: fp16's largest finite value and the ulp of its top binade: inf stands for 65504 + 32 = 2^16
_F16_MAX, _F16_TOP_ULP = 65504.0, 32.0


def stochastic_round_fp16(x: Tensor, bits: Tensor) -> Tensor:
    """fp32 ``x`` rounded stochastically to fp16 with the random words ``bits`` (int64 in [0, 2^32), x's
    shape; the high 24 bits are used).

    Between the two fp16 neighbours ``lo`` (toward zero) and ``hi`` of ``|x|``, ``x`` rounds away from
    zero when ``bits >> 8 < frac * 2^24``, ``frac = (|x| - lo) / (hi - lo)``: both differences are exact
    in fp32 and the gap is a power of two, so the probability is ``frac`` rounded up to a multiple of
    2^-24 (docs/lowbit.md §2). fp16's subnormals are handled by the same rule (the add-and-truncate
    trick of bf16 does not apply: fp16's exponent range is narrower than fp32's). ±0, ±inf, exact fp16
    values never move; NaN stays NaN (quiet, sign and top payload bits kept, as torch's CPU conversion);
    above 65504, inf stands for 2^16 (the next step of the top binade). The C++ and Triton twins
    (`sr_fp16_bits`) compute the same bits with integer operations in fp16's normal range.
    """
    check_sr_args(x, bits)
    a = x.abs()
    near = a.to(torch.float16)
    # lo: |x| rounded toward zero in fp16 (near, or one step below it when near rounded up)
    up = near.float() > a
    lo = torch.where(up, torch.nextafter(near, torch.zeros_like(near)), near).float()
    hi = torch.nextafter(lo.to(torch.float16), torch.full_like(near, float("inf"))).float()
    gap = torch.where(torch.isinf(hi), torch.full_like(hi, _F16_TOP_ULP), hi - lo)
    frac = (a - lo) / gap  # exact: both differences are exact and gap is a power of two
    threshold = frac * 2.0**24
    away = (bits >> 8).to(torch.float32) < threshold  # (bits >> 8) < 2^24: exact in fp32
    mag = torch.where(away, hi, lo)
    mag = torch.where(torch.isinf(a), a, mag)  # inf stays inf
    out = torch.copysign(mag, x).to(torch.float16)  # exact: mag is an fp16 value (or 2^16: inf)
    # NaN stays NaN: quiet, sign and the payload's top 9 bits kept (torch's CPU conversion, spelled out so
    # that every device and every kernel gives these bits)
    xb = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan_bits = ((xb >> 16) & 0x8000) | 0x7E00 | ((xb >> 13) & 0x3FF)
    nan = (nan_bits - ((nan_bits >> 15) << 16)).to(torch.int16).view(torch.float16)
    return torch.where(torch.isnan(x), nan, out)


# ---------------------------------------------------------------------------------- 8-bit blockwise
#: elements per quantization block (one fp32 absmax scale each): docs/lowbit.md §3
QUANT_BLOCK = 256
#: state bytes per element in 8-bit: one code plus a block's share of its fp32 scale
BYTES_PER_ELEMENT_8BIT = 1 + 4 / QUANT_BLOCK


def _dynamic_values(signed_bits: int, decades: int) -> list[float]:
    """The bitsandbytes "dynamic tree" magnitudes for ``signed_bits`` bits (fp64): for decade i (of
    `decades`, the top one [0.1, 1]) the 2^(i+1) midpoints of a linspace(0.1, 1) grid scaled by
    10^(i+1-decades), then 0 and 1."""
    vals = [0.0, 1.0]
    for i in range(decades):
        n = 2 ** (i + 1 + signed_bits - 1 - decades)
        b = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        vals += ((b[:-1] + b[1:]) / 2 * 10.0 ** (i + 1 - decades)).tolist()
    assert len(vals) == 2**signed_bits, len(vals)
    return sorted(vals)


def _build_tables(signed: bool) -> tuple[Tensor, Tensor]:
    # signed: 7 magnitude bits (6 decades down to 3.25e-6 of the absmax) and a sign bit;
    # unsigned: 8 bits (7 decades down to 3.25e-7): docs/lowbit.md §3
    mags = _dynamic_values(7, 6) if signed else _dynamic_values(8, 7)
    values = torch.tensor(mags, dtype=torch.float64)
    thresholds = ((values[:-1] + values[1:]) / 2).to(torch.float32)
    return values.to(torch.float32), thresholds


#: built once at import (1.5 KiB): a plain dict, which Dynamo reads as a constant; a functools.cache here
#: was a graph break inside every compiled low-precision step, and a compiled step resumed after it drew
#: other stochastic-rounding bits than the eager step
_TABLES = {True: _build_tables(True), False: _build_tables(False)}


def _tables_cpu(signed: bool) -> tuple[Tensor, Tensor]:
    return _TABLES[signed]


def quant_tables(signed: bool, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """(magnitudes, thresholds) of the 8-bit map, fp32. ``magnitudes`` ascends from 0 to 1 (128 entries
    signed, 256 unsigned); ``thresholds[k]`` is the fp32 midpoint of magnitudes k and k+1. The same
    tensors feed every implementation, so their codes agree bit for bit."""
    values, thresholds = _tables_cpu(bool(signed))
    return values.to(device), thresholds.to(device)


def code_values(signed: bool) -> Tensor:
    """The fp32 value (relative to the block scale) of each of the 256 codes."""
    mags, _ = _tables_cpu(bool(signed))
    if not signed:
        return mags.clone()
    return torch.cat([mags, -mags])


def num_blocks(numel: int) -> int:
    return -(-numel // QUANT_BLOCK)


def _blocked(x: Tensor) -> Tensor:
    """x flattened and zero-padded to whole blocks, ``[n_blocks, QUANT_BLOCK]`` (zeros change no absmax)."""
    flat = x.reshape(-1)
    pad = num_blocks(flat.numel()) * QUANT_BLOCK - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, QUANT_BLOCK)


def block_absmax(x: Tensor) -> Tensor:
    """The fp32 scale of each block of x: max |x| over the block, NaN if the block holds a NaN."""
    return _blocked(x).abs().amax(dim=1)


def quantize_blockwise(x: Tensor, signed: bool, *, check: bool = True) -> tuple[Tensor, Tensor]:
    """8-bit codes (uint8, x's shape) and fp32 block scales (``[num_blocks(x.numel())]``) of fp32 ``x``,
    flattened in memory order (contiguous) into blocks of `QUANT_BLOCK` elements.

    Each |x| / scale rounds to the nearest map magnitude (ties upward), decided without a division by
    comparing |x| against ``fl(threshold_k * scale)``; signed codes carry x's sign bit as bit 7.
    ``signed=False`` requires x >= 0 (a second moment): a negative value is an error (``check=False``:
    not checked, which reads the tensor on the host; a negative value then gets magnitude code 0..255 of
    its |x| and dequantizes positive).
    """
    if x.dtype != torch.float32:
        raise TypeError(f"quantize_blockwise: x must be fp32, got {x.dtype}")
    if check and not signed and bool((x < 0).any()):
        raise ValueError("quantize_blockwise: signed=False needs x >= 0 (use signed=True for a state "
                         "that can be negative)")
    blocks = _blocked(x.contiguous())
    scale = blocks.abs().amax(dim=1)
    _, thr = quant_tables(signed, x.device)
    a = blocks.abs()
    s = scale[:, None]
    # idx = #{k : a >= fl(thr_k * s)}: the rows of fl(thr * s) ascend (thr ascends, s >= 0), so a
    # batched search counts them; a NaN on either side compares false everywhere, so idx = 0 there
    table = thr[None, :] * s
    idx = torch.searchsorted(table, a.contiguous(), right=True)
    idx = torch.where(torch.isnan(a) | torch.isnan(s), 0, idx)
    if signed:
        neg = (blocks.view(torch.int32) < 0).to(torch.int64)  # the sign bit, also of -0 and -NaN
        idx = idx | (neg << 7)
    codes = idx.reshape(-1)[: x.numel()].to(torch.uint8).reshape(x.shape)
    return codes, scale


def dequantize_blockwise(codes: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """fp32 values of `quantize_blockwise`'s codes: ``±magnitude[code] * scale`` (one fp32 product)."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"dequantize_blockwise: codes must be uint8, got {codes.dtype}")
    n = codes.numel()
    if scales.numel() != num_blocks(n):
        raise ValueError(f"dequantize_blockwise: {n} codes need {num_blocks(n)} scales, got {scales.numel()}")
    mags, _ = quant_tables(signed, codes.device)
    c = codes.reshape(-1).to(torch.int64)
    s = scales.to(torch.float32).repeat_interleave(QUANT_BLOCK)[:n]
    if signed:
        v = mags[c & 0x7F] * s
        v = torch.where((c >> 7) == 1, -v, v)
    else:
        v = mags[c] * s
    return v.reshape(codes.shape)


def error_bound(x: Tensor, scales: Tensor, signed: bool) -> Tensor:
    """The documented per-element bound on |dequantize(quantize(x)) - x| (docs/lowbit.md §3): half the
    gap of the map interval holding |x|/scale, times the scale, plus 2^-22 of the scale (the fp32
    roundings of threshold and value) plus 2^-148 (those roundings among denormals). Finite blocks only."""
    mags, _ = quant_tables(signed, x.device)
    m64 = mags.double()
    s = scales.double().repeat_interleave(QUANT_BLOCK)[: x.numel()]
    r = (x.reshape(-1).double().abs() / s).nan_to_num(0.0).clamp(0, 1)
    k = torch.searchsorted(m64, r, right=True).clamp(1, m64.numel() - 1)
    half_gap = (m64[k] - m64[k - 1]) / 2
    return (half_gap * s + s * 2.0**-22 + 2.0**-148).reshape(x.shape)
