"""Low-precision optimizer state and stochastically rounded params, as the optimizers store and update
them (docs/lowbit.md §5).

``state_precision``: "fp32" (each state tensor in the state dtype of its param, `FusedOptimizer._state_dtype`),
"bf16" (bf16 tensors, written with stochastic rounding) or "8bit" (uint8 codes shaped like the param, plus
``<key>_absmax``: one fp32 scale per block of `QUANT_BLOCK` elements, the dynamic map of docs/lowbit.md §3;
tensors below `MIN_8BIT_NUMEL` elements and complex params keep fp32 state). ``stochastic_rounding``: a
bf16 param's new value is rounded stochastically instead of to nearest.

The random bits are keyed by (seed, step, tensor index, element index): the optimizer's seed (drawn from
torch's generator at construction, kept in every param group as ``lowbit_seed``), the group's rounding
counter ``lowbit_step``, the param's position in the optimizer, and the element's flat index in the
tensor (in the local shard for a DTensor). Stream 0 rounds the param, stream ``1 + j`` state tensor ``j``.
fp16 params round stochastically too (`fused_optim.lowbit.stochastic_round_fp16`; the fused impls'
`sr_fp16_bits` give the same bits).

`reference_step` runs any fp32 impl under these formats: it decodes the state to fp32, runs the impl,
and encodes the result back. Impls declared ``lowbit`` do the same inside their own pass instead
(`Rounding` is what they receive). A leaf module: torch and `fused_optim.lowbit` only.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import lowbit as _lb

__all__ = ["ABSMAX", "MIN_8BIT_NUMEL", "PRECISIONS", "Rounding", "check_options", "decode", "encode_",
           "local_scales", "new_entries", "reference_step", "storage_format"]

PRECISIONS = ("fp32", "bf16", "8bit")
#: tensors with fewer elements keep fp32 state under "8bit" (bitsandbytes' rule: their state is a
#: negligible share of the memory, and small tensors are often norms and biases, sensitive to noise)
MIN_8BIT_NUMEL = 4096
#: the suffix of an 8-bit state tensor's block scales in ``optimizer.state[p]``
ABSMAX = "_absmax"
#: param dtypes `stochastic_rounding` rounds (fp32 and fp64 params are written as computed)
_SR_DTYPES = (torch.bfloat16, torch.float16)
#: elements decoded to fp32 at once by `reference_step` (64 MiB per fp32 temporary list)
CHUNK_NUMEL = 1 << 24


def check_options(name: str, state_precision: Any, stochastic_rounding: Any) -> None:
    """Refuse a bad ``state_precision`` / ``stochastic_rounding`` naming it and the allowed values."""
    if state_precision not in PRECISIONS:
        raise ValueError(f"{name}: invalid state_precision {state_precision!r} (expected one of "
                         f"{', '.join(map(repr, PRECISIONS))})")
    if not isinstance(stochastic_rounding, bool):
        raise TypeError(f"{name}: stochastic_rounding must be a bool, got {stochastic_rounding!r}")


def storage_format(precision: str, p: Tensor) -> str:
    """How the state of param `p` is stored under `precision`: "fp32" (its ordinary state dtype), "bf16"
    or "8bit". Decided on the whole tensor (a DTensor's global size), so every rank decides alike."""
    if precision == "fp32" or p.is_complex():
        return "fp32"
    if precision == "8bit" and p.numel() < MIN_8BIT_NUMEL:
        return "fp32"
    return precision


@dataclass
class Rounding:
    """What an impl declared ``lowbit`` receives as its ``lowbit=`` argument for one call, where every
    tensor of the call has the same `fmt` (docs/lowbit.md §5).

    ``fmt``: the state lists' storage ("fp32", "bf16": bf16 tensors, "8bit": uint8 codes);
    ``signed``: per state list, the 8-bit map (False: a non-negative state, the unsigned map);
    ``absmax``: per state list, each tensor's fp32 block scales ("8bit" only, else empty lists);
    ``param_sr``: round the param write stochastically (bf16 params); ``seed``, ``step`` (an int, or a
    0-d device tensor when capturable), ``tensor_index`` (per tensor): the generator's key, stream 0 the
    param's, stream ``1 + j`` state list ``j``'s."""
    fmt: str
    signed: tuple[bool, ...]
    absmax: tuple[list[Tensor], ...]
    param_sr: bool
    seed: int
    step: int | Tensor
    tensor_index: list[int]

    @property
    def needs_bits(self) -> bool:
        return self.param_sr or self.fmt == "bf16"

    def take(self, idx: Sequence[int]) -> Rounding:
        """The same rounding for the tensors ``idx`` of the call (their scales and tensor indices)."""
        return Rounding(self.fmt, self.signed, tuple([a[i] for i in idx] if a else [] for a in self.absmax),
                        self.param_sr, self.seed, self.step, [self.tensor_index[i] for i in idx])


def new_entries(key: str, fmt: str, signed: bool, like: Tensor, value: Tensor | None,
                dtype32: torch.dtype) -> dict[str, Tensor]:
    """The state entries that store `value` (None: zeros) as `key` of a param `like` in `fmt`; a conversion
    that is not a step (a new state, a checkpoint loaded into another precision) rounds to nearest."""
    if fmt == "fp32":
        if value is None:
            return {key: torch.zeros_like(like, dtype=dtype32, memory_format=torch.preserve_format)}
        return {key: value.to(dtype32, copy=True)}
    if fmt == "bf16":
        if value is None:
            return {key: torch.zeros_like(like, dtype=torch.bfloat16, memory_format=torch.preserve_format)}
        return {key: value.to(torch.bfloat16, copy=True)}
    local = _local(like)
    if value is None:
        codes = torch.zeros_like(like, dtype=torch.uint8, memory_format=torch.contiguous_format)
        return {key: codes, key + ABSMAX: torch.zeros(_lb.num_blocks(local.numel()), dtype=torch.float32,
                                                     device=local.device)}
    codes, scales = _lb.quantize_blockwise(_local(value).to(torch.float32), signed)
    out = torch.zeros_like(like, dtype=torch.uint8, memory_format=torch.contiguous_format)
    _local(out).copy_(codes)
    return {key: out, key + ABSMAX: scales}


def local_scales(absmax: Tensor, codes: Tensor) -> Tensor:
    """The block scales of this rank's `codes` (a DTensor's local shard, or the tensor), a 1-D view of
    `absmax`: of a DTensor param, its row of the per-shard scales (`distributed.block_scales_layout`)
    without the padding; of a plain tensor, itself (no view made: this runs per tensor and state every step)."""
    local = _local(absmax)
    if local is absmax:
        return absmax
    return local.reshape(-1)[:_lb.num_blocks(_local(codes).numel())]


def decode(stored: Tensor, absmax: Tensor | None, signed: bool, dtype32: torch.dtype) -> Tensor:
    """The state as a fresh tensor of `dtype32` (the fp32-mode state dtype), from any stored form."""
    if stored.dtype == torch.uint8:
        if absmax is None:
            raise ValueError("an 8-bit state tensor (uint8 codes) needs its block scales (the '<key>_absmax' entry)")
        return _lb.dequantize_blockwise(stored, absmax, signed).to(dtype32)
    return stored.to(dtype32, copy=True)


def encode_(stored: Tensor, absmax: Tensor | None, value: Tensor, signed: bool, bits: Tensor | None) -> None:
    """Write `value` into `stored` (and `absmax`) in place: 8-bit codes rounded to nearest, bf16 rounded
    stochastically with `bits` (round to nearest when None), anything else copied."""
    if stored.dtype == torch.uint8:
        codes, scales = _lb.quantize_blockwise(value.to(torch.float32), signed, check=False)
        stored.copy_(codes)
        absmax.copy_(scales)
    elif stored.dtype == torch.bfloat16 and bits is not None and value.dtype != torch.bfloat16:
        stored.copy_(_lb.stochastic_round_bf16(value.to(torch.float32).reshape(-1), bits).reshape(stored.shape))
    else:
        stored.copy_(value)


def _bits_many(low: Rounding, idx: Sequence[int], stream: int, tensors: Sequence[Tensor]) -> list[Tensor]:
    """`stream`'s random words of tensors ``tensors[i]`` for ``i`` in `idx`, in one Philox pass per device."""
    out: dict[int, Tensor] = {}
    by_device: dict[torch.device, list[int]] = {}
    for i in idx:
        by_device.setdefault(tensors[i].device, []).append(i)
    for device, ids in by_device.items():
        words = _lb.random_bits_many(low.seed, low.step, [low.tensor_index[i] for i in ids],
                                     [tensors[i].numel() for i in ids], stream, device)
        out.update(zip(ids, words))
    return [out[i] for i in idx]


def reference_step(call: Callable[[list[Tensor], list[Tensor], list[list[Tensor]]], None],
                   params: list[Tensor], grads: list[Tensor], states: Sequence[list[Tensor]], low: Rounding,
                   dtype32: Sequence[torch.dtype], *, chunked: bool = True) -> None:
    """Run the fp32 update `call(params, grads, states)` under `low`'s formats, `CHUNK_NUMEL` elements
    at a time: the state decoded to fp32 (`dtype32[i]`: tensor i's fp32-mode state dtype), bf16 params
    with stochastic rounding updated as fp32 copies; then every state tensor encoded back (bf16: rounded
    stochastically, stream ``1 + j``; 8-bit: to nearest) and each param rounded stochastically (stream 0).
    ``chunked=False``: one call (a per-tensor reduction over DTensor shards must see the whole split)."""
    n = len(params)
    start = 0
    while start < n:
        stop, total = start, 0
        while stop < n and (stop == start or not chunked or total + params[stop].numel() <= CHUNK_NUMEL):
            total += params[stop].numel()
            stop += 1
        idx = range(start, stop)
        sr = [low.param_sr and params[i].dtype in _SR_DTYPES for i in idx]
        p_in = [params[i].float() if r else params[i] for i, r in zip(idx, sr)]
        g_in = [grads[i].float() if r else grads[i] for i, r in zip(idx, sr)]
        if low.fmt == "fp32":
            s_in = [[s[i] for i in idx] for s in states]
        else:
            s_in = [[decode(s[i], low.absmax[j][i] if low.fmt == "8bit" else None, low.signed[j], dtype32[i])
                     for i in idx] for j, s in enumerate(states)]
        call(p_in, g_in, s_in)
        if low.fmt != "fp32":
            for j, s in enumerate(states):
                bits = _bits_many(low, idx, 1 + j, s) if low.fmt == "bf16" else [None] * len(idx)
                for k, i in enumerate(idx):
                    encode_(s[i], low.absmax[j][i] if low.fmt == "8bit" else None, s_in[j][k], low.signed[j],
                            bits[k])
        if any(sr):
            bits = _bits_many(low, [i for i, r in zip(idx, sr) if r], 0, params)
            for k, i in enumerate(i for i, r in zip(idx, sr) if r):
                p, x = params[i], p_in[idx.index(i)]
                rnd = _lb.stochastic_round_bf16 if p.dtype == torch.bfloat16 else _lb.stochastic_round_fp16
                p.copy_(rnd(x.reshape(-1), bits[k]).reshape(p.shape))
        start = stop


def _local(t: Tensor) -> Tensor:
    """A DTensor's local shard, anything else itself (no import of torch.distributed here)."""
    local = getattr(t, "_local_tensor", None)
    return t if local is None else local
