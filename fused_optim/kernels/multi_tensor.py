"""Multi-tensor plumbing shared by every Triton kernel: cached device tables, dtype-exact loads/stores,
and the choice between compiled (CUDA) and interpreted (CPU) kernels.

One launch updates a whole (device, dtype) group. Instead of packing tensor addresses into kernel
arguments (torch's MultiTensorApply, ~110 tensors per launch), the addresses live in device tables
built on the host once per tensor list and cached:

- ``meta``  int64 ``[n, META + n_lists]``: per tensor its numel, the first partial-reduction slot, the
  number of slots and the elements per slot, then the base address of the param and of each state
  tensor. One row per tensor, so a program reads one cache line.
- ``chunks`` int32 ``[n_chunks, 2]``: (tensor, chunk) per program of the update kernel; element offsets
  are computed in int64, so tensors above 2^31 elements are fine.
- ``rchunks`` int32 ``[n_parts, 2]``: (tensor, slot) per program of the partial-reduction kernel.
- ``grad_ptrs`` int64 ``[n]``: grad addresses change between steps (``zero_grad(set_to_none=True)``),
  so they are a separate table refreshed with one pinned host-to-device copy, no sync, and only when
  the addresses actually changed. Kernels with several per-call lists (`prepare_lists`: SAM's grads
  and fresh ``old_params``, Muon's grads and update buffers) keep them interleaved in the same table,
  ``[n, n_dynamic]``, one row per tensor.

The cache key is the tuple of every address and size, so a table is never stale: a tensor that moved
(``p.data = ...``, ``load_state_dict``) simply misses the cache.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fused_optim._scalars import device_scalar, device_tensor  # absolute: also from the flavoured copies

#: int64 columns before the addresses in a ``meta`` row
META = 4
#: partial-reduction slots per tensor at most: the update kernel reduces them in one vector load
MAX_PARTS = 256
#: elements per vector step of the reduction kernel (a slot is a multiple of it)
RBLOCK = 2048
_CACHE_SIZE = 64

#: dtype codes of the ``*_KIND`` constexprs
KIND_FP32, KIND_FP16, KIND_BF16 = 0, 1, 2
_KINDS = {torch.float32: KIND_FP32, torch.float16: KIND_FP16, torch.bfloat16: KIND_BF16}


def dtype_kind(dtype: torch.dtype) -> int:
    try:
        return _KINDS[dtype]
    except KeyError:
        raise TypeError(f"the Triton kernels handle float32, float16 and bfloat16 tensors, got {dtype}; "
                        "use impl='foreach' for other dtypes") from None


# ------------------------------------------------------------------------------------------ jit helpers
# Kernels call only builtins and the jit functions of this package, never triton's own @jit library
# functions (tl.zeros, tl.max, tl.sum): those are decorated once, when triton is imported, so they have
# the wrong flavour in one of the two copies of this package (see `kernel_for`). Reductions go through
# the builtin tl.reduce with a combine function picked per flavour: in the interpreter triton's own
# combiners, which it recognises and runs as one numpy call; compiled, plain jit functions of ours.
def _decorating_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _fast_interpreted_device_fn():
    """A decorator for device functions (called from kernels) in the interpreted copy.

    triton's InterpretedFunction re-patches triton.language on every device-function call (an
    `inspect.getmembers` scan of the language modules, ~2 ms), although the kernel's launch has
    already patched it for the whole grid; skipping that makes the CPU tests ~5x faster. Falls back
    to plain `triton.jit` if this triton's interpreter lacks the hooks.
    """
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover
        return triton.jit
    if not hasattr(InterpretedFunction, "rewrite"):  # pragma: no cover
        return triton.jit

    class _DeviceFunction(InterpretedFunction):
        def __call__(self, *args, **kwargs):
            return self.rewrite()(*args, **kwargs)

    return _DeviceFunction


if _decorating_interpreted():
    device_fn = _fast_interpreted_device_fn()
    _max_combine = tl.standard._elementwise_max
    _sum_combine = tl.standard._sum_combine
else:
    device_fn = triton.jit

    @triton.jit
    def _max_combine(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _sum_combine(a, b):
        return a + b


# A fused multiply-add, rounded once, in both flavours. The interpreter's tl.fma is ``x*y + z`` in fp32
# numpy (two roundings), so there it is computed in fp64: the fp32 product is exact in fp64 and the sum
# is rounded to fp64 then to fp32, which differs from one rounding only when the fp64 sum lands exactly
# on an fp32 tie (about 2^-29 of random inputs). That gives the bits of torch's CPU `add(alpha=)` and
# `lerp` (at::vec::fmadd) under the interpreter too.
if _decorating_interpreted():
    @device_fn
    def _fma(x, y, z):
        """x*y + z rounded once (fp32 operands; see above). Scalar kernel arguments arrive here as Python
        floats: tl.cast rounds them to fp32 first, as the compiled kernel receives them."""
        x = tl.cast(tl.cast(x, tl.float32), tl.float64)
        y = tl.cast(tl.cast(y, tl.float32), tl.float64)
        z = tl.cast(tl.cast(z, tl.float32), tl.float64)
        return (x * y + z).to(tl.float32)
else:
    @device_fn
    def _fma(x, y, z):
        """x*y + z rounded once (fp32 operands)."""
        return tl.fma(x, y, z)


# A product rounded on its own. LLVM's NVPTX backend contracts a product into an fma with a later add
# even when the product has other uses (Adan's d = neg_pre_grad + g·clip: sm_90 PTX had
# `fma.rn.f32 d, g, clip, npg` beside the stored `mul.f32 g·clip`), and at a param's first step
# d = -round(g·clip) + g·clip must be exactly 0 (docs/spec.md §3). PTX never contracts `mul.rn` (an explicit
# rounding modifier); the interpreter (numpy) never contracts at all.
if _decorating_interpreted():
    @device_fn
    def _mul_rn(x, y):
        """x*y rounded once, on its own (fp32)."""
        return x * y
else:
    @device_fn
    def _mul_rn(x, y):
        """x*y rounded once, on its own (fp32): never fused into a later add."""
        x, y = tl.broadcast(x, y)
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32,
                                         is_pure=True, pack=1)


@device_fn
def _vmax(x):
    """max of a 1-D block, NaN if any element is NaN (torch's max; the combiners may drop NaNs)."""
    nan_or_zero = tl.reduce(tl.where(x != x, x, 0.0), 0, _sum_combine)  # noqa: PLR0124 (x != x: NaN)
    return tl.reduce(x, 0, _max_combine) + nan_or_zero


@device_fn
def _vsum(x):
    """sum of a 1-D block (a builtin reduction; see above)."""
    return tl.reduce(x, 0, _sum_combine)


@device_fn
def _chunk_coords(meta_ptr, chunks_ptr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    """(tensor index, row pointer, int64 offsets, mask, whether the chunk is full) of this program.

    Kernels branch on `full`: with a runtime numel the mask has no known constancy, which would make
    every masked access scalar; full chunks take an unmasked, vectorizable path and only each tensor's
    last chunk pays for the mask.
    """
    pid = tl.program_id(0)
    t = tl.load(chunks_ptr + 2 * pid).to(tl.int64)
    c = tl.load(chunks_ptr + 2 * pid + 1).to(tl.int64)
    row = meta_ptr + t * ROW
    numel = tl.load(row)
    start = c * BLOCK
    offs = start + tl.arange(0, BLOCK)
    return t, row, offs, offs < numel, start + BLOCK <= numel


@device_fn
def _update_coords(meta_ptr, grad_ptrs_ptr, chunks_ptr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    """`_chunk_coords` of an update kernel's program, with its tensor's grad address instead of the index:
    (row pointer, grad address, offsets, mask, whether the chunk is full)."""
    t, row, offs, mask, full = _chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
    return row, tl.load(grad_ptrs_ptr + t), offs, mask, full


@device_fn
def _div_rn(x, y):
    """x / y rounded to nearest (torch's division; plain `/` is approximate on the GPU). Broadcasts,
    which tl.math.div_rn does not."""
    x, y = tl.broadcast(x, y)
    return tl.math.div_rn(x, y)


@device_fn
def _div_rn_scalar(x, y):
    """`_div_rn` of a block by a scalar kernel argument (a tensor compiled, a float interpreted)."""
    return tl.math.div_rn(x, tl.full(x.shape, y, tl.float32))


@device_fn
def _ptr(addr, ELEM: tl.constexpr, ALIGNED: tl.constexpr):
    """A raw int64 address as a typed pointer; ALIGNED (every address of the launch is a multiple of 16
    bytes, checked on the host) lets the compiler use 128-bit accesses."""
    ptr = addr.to(tl.pointer_type(ELEM))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@device_fn
def _bits_to_f32(bits, KIND: tl.constexpr):
    """`_load_bits`' block as fp32 values (exact widening, as `_load_f32`)."""
    if KIND == 2:
        x = (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    elif KIND == 1:
        x = bits.to(tl.float16, bitcast=True).to(tl.float32)
    else:
        x = bits.to(tl.float32, bitcast=True)
    return x


@device_fn
def _load(ptr, mask, MASKED: tl.constexpr):
    """A block at typed ``ptr``: unmasked (vectorizable) unless MASKED; masked-off lanes read 0."""
    if MASKED:
        x = tl.load(ptr, mask=mask, other=0)
    else:
        x = tl.load(ptr)
    return x


@device_fn
def _store(ptr, x, mask, MASKED: tl.constexpr):
    """Store a block at typed ``ptr`` (masked only when MASKED, as `_load`)."""
    if MASKED:
        tl.store(ptr, x, mask=mask)
    else:
        tl.store(ptr, x)


@device_fn
def _load_f32(addr, offs, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Load as fp32 from a raw address. bf16 is read as raw bits and widened with a shift: exact, and the
    same on the GPU and in the interpreter (which has no native bf16)."""
    if KIND == 2:
        x = _bits_to_f32(_load(_ptr(addr, tl.uint16, ALIGNED) + offs, mask, MASKED), KIND)
    elif KIND == 1:
        x = _load(_ptr(addr, tl.float16, ALIGNED) + offs, mask, MASKED).to(tl.float32)
    else:
        x = _load(_ptr(addr, tl.float32, ALIGNED) + offs, mask, MASKED)
    return x


@device_fn
def _store_f32(addr, offs, x, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Store fp32 ``x`` in the tensor's dtype, rounding to nearest even. bf16 rounds with integer ops:
    the interpreter's fp32->bf16 cast truncates (docs/toolchain.md), the GPU's rounds to nearest even, and the
    integer form gives torch's bits on both."""
    if KIND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        lsb = (bits >> 16) & 1
        rounded = (bits + 0x7FFF + lsb) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        y = tl.where(is_nan, (bits >> 16) | 0x40, rounded).to(tl.uint16)  # NaN stays a (quiet) NaN
        ptr = _ptr(addr, tl.uint16, ALIGNED) + offs
    elif KIND == 1:
        y = x.to(tl.float16)
        ptr = _ptr(addr, tl.float16, ALIGNED) + offs
    else:
        y = x
        ptr = _ptr(addr, tl.float32, ALIGNED) + offs
    _store(ptr, y, mask, MASKED)


@device_fn
def _load_bits(addr, offs, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """The raw storage bits of a block (uint32 for fp32, uint16 for fp16/bf16): a copy through them is
    exact, NaN payloads included, where a float load/store could quiet a signaling NaN."""
    if KIND == 0:
        bits = _load(_ptr(addr, tl.uint32, ALIGNED) + offs, mask, MASKED)
    else:
        bits = _load(_ptr(addr, tl.uint16, ALIGNED) + offs, mask, MASKED)
    return bits


@device_fn
def _store_bits(addr, offs, bits, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """Store raw bits from `_load_bits` of the same KIND."""
    if KIND == 0:
        _store(_ptr(addr, tl.uint32, ALIGNED) + offs, bits, mask, MASKED)
    else:
        _store(_ptr(addr, tl.uint16, ALIGNED) + offs, bits, mask, MASKED)


@device_fn
def _round_to_kind(x, KIND: tl.constexpr):
    """fp32 ``x`` rounded to nearest even in the tensor dtype and widened back (exact for fp32): the value
    a store then a load would give, without the memory round trip."""
    if KIND == 2:
        bits = x.to(tl.uint32, bitcast=True)
        lsb = (bits >> 16) & 1
        rounded = ((bits + 0x7FFF + lsb) >> 16) << 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        x = tl.where(is_nan, x, rounded.to(tl.float32, bitcast=True))
    elif KIND == 1:
        x = x.to(tl.float16).to(tl.float32)
    return x


@device_fn
def _amp_go(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """Whether this program does its work: False when AMP's ``found_inf`` is nonzero (the whole step is
    skipped, every tensor left as it was), read on the device; always True without the flag."""
    if HAS_FOUND_INF:
        go = tl.load(found_inf_ptr) == 0.0
    else:
        go = True
    return go


@device_fn
def _amp_unscale(g, grad_scale_ptr, KIND: tl.constexpr):
    """``g / grad_scale`` as torch's in-place unscale of a ``KIND`` grad computes it: an IEEE division in
    fp32, rounded to the grad's dtype (the value written back to ``.grad`` and the one every later use,
    reductions included, must see)."""
    return _round_to_kind(_div_rn(g, tl.load(grad_scale_ptr)), KIND)


@device_fn
def _scalar(value, ptr, IS_TENSOR: tl.constexpr):
    """A per-step scalar of the launch (`Launch`, `DeviceScalar`): loaded from the device when IS_TENSOR
    (capturable / tensor lr), else the fp32 argument."""
    if IS_TENSOR:
        value = tl.load(ptr)
    return value


@device_fn
def _load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND: tl.constexpr, ALIGNED: tl.constexpr,
               MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MAXIMIZE: tl.constexpr):
    """A block of the grad as every update kernel uses it: unscaled (AMP) and written back unscaled, as
    torch's fused optimizers leave ``.grad``; then negated when maximizing (never stored negated)."""
    g = _load_f32(g_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    if HAS_GRAD_SCALE:
        g = _amp_unscale(g, grad_scale_ptr, P_KIND)
        _store_f32(g_addr, offs, g, mask, P_KIND, ALIGNED, MASKED)
    if MAXIMIZE:
        g = -g
    return g


@device_fn
def _load_row(row, LIST: tl.constexpr, offs, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr,
              MASKED: tl.constexpr):
    """(address, fp32 block) of this tensor's entry in static list LIST (0 the param, then each state
    list: the ``meta`` row's addresses after its 4 leading columns)."""
    addr = tl.load(row + 4 + LIST)
    return addr, _load_f32(addr, offs, mask, KIND, ALIGNED, MASKED)


@device_fn
def _load_partials(row, partials_ptr, MAX_PARTS: tl.constexpr):
    """This tensor's partial reductions (zero-padded) as one vector; the caller reduces it."""
    first = tl.load(row + 1)
    count = tl.load(row + 2)
    j = tl.arange(0, MAX_PARTS)
    return tl.load(partials_ptr + first + j, mask=j < count, other=0.0)


# ------------------------------------------------------------------------------------------ tables
class Table:
    """Device tables of one tensor list (see the module docstring); built by `get_table`."""

    __slots__ = (
        "chunks",
        "device",
        "grad_key",
        "grad_ptrs",
        "grads_aligned",
        "is_cuda",
        "max_parts",
        "meta",
        "n",
        "n_chunks",
        "n_dynamic",
        "n_parts",
        "partials",
        "rblock",
        "rchunks",
        "row",
        "static_aligned",
        "std",
    )

    def __init__(self, static: Sequence[Sequence[Tensor]], block: int, device: torch.device,
                 n_dynamic: int = 1):
        n = len(static[0])
        self.n, self.row, self.device = n, META + len(static), device
        self.n_dynamic = n_dynamic  # per-call lists, interleaved in grad_ptrs: [n, n_dynamic]
        # read at build time (not import time) so a test can shrink them to exercise multi-slot tensors
        self.max_parts, self.rblock = MAX_PARTS, RBLOCK
        meta, chunks, rchunks = [], [], []
        n_parts_total = 0
        for i in range(n):
            numel = static[0][i].numel()
            parts = min(self.max_parts, _cdiv(numel, self.rblock))
            span = _cdiv(_cdiv(numel, parts), self.rblock) * self.rblock  # per slot, a multiple of rblock
            parts = _cdiv(numel, span)
            meta.append([numel, n_parts_total, parts, span] + [lst[i].data_ptr() for lst in static])
            chunks.extend((i, c) for c in range(_cdiv(numel, block)))
            rchunks.extend((i, j) for j in range(parts))
            n_parts_total += parts
        self.static_aligned = all(a % 16 == 0 for r in meta for a in r[META:])
        self.meta = _upload(torch.tensor(meta, dtype=torch.int64), device)
        self.chunks = _upload(torch.tensor(chunks, dtype=torch.int32), device)
        self.n_chunks = len(chunks)
        self.rchunks = _upload(torch.tensor(rchunks, dtype=torch.int32), device)
        self.n_parts = len(rchunks)
        self.partials = torch.empty(self.n_parts, dtype=torch.float32, device=device)
        self.grad_ptrs = torch.empty(n * n_dynamic, dtype=torch.int64, device=device)
        self.grad_key: tuple | None = None
        self.grads_aligned = False
        # the table's part of every launch's standard arguments (`Launch.std`, in `_STD`'s order)
        self.std = (self.meta, self.grad_ptrs, self.grad_ptrs, self.chunks, self.rchunks, self.partials, self.row,
                    block, self.max_parts, self.rblock)
        self.is_cuda = device.type == "cuda"

    @property
    def aligned(self) -> bool:
        """Every address of the launch is 16-byte aligned (the ALIGNED constexpr of the kernels)."""
        return self.static_aligned and self.grads_aligned

    def set_grads(self, key: tuple[int, ...]) -> None:
        """Point the grad table at this step's grad addresses: one small async copy, and none if they did
        not move."""
        if key == self.grad_key:
            return
        if _capturing(self.device):
            raise RuntimeError("fused_optim (Triton): the grads moved since the last step, during CUDA graph "
                               "capture; a captured step must see the grads of the warm-up step at the same "
                               "addresses: zero them in place (optimizer.zero_grad(set_to_none=False)) and keep "
                               "the graph's inputs static")
        if key:  # a kernel without per-call lists (n_dynamic 0) has nothing to copy
            host = torch.tensor(key, dtype=torch.int64)
            if self.device.type == "cuda":
                # Pinned + non_blocking: no host sync. The caching host allocator keeps the pinned block
                # alive until the copy has run, and the copy is stream-ordered after the previous step's
                # kernels.
                self.grad_ptrs.copy_(host.pin_memory(), non_blocking=True)
            else:
                self.grad_ptrs.copy_(host)
        self.grad_key = key
        self.grads_aligned = all(a % 16 == 0 for a in key)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _upload(host: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)  # a pageable copy would sync the host
    return host.to(device)


_TABLES: OrderedDict[tuple, Table] = OrderedDict()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _new_table(prep: Prepared, block: int) -> Table:
    if _capturing(prep.key[0]):
        # its host-to-device copies would be captured from host buffers that are gone at replay
        raise RuntimeError("fused_optim (Triton): a tensor list seen for the first time during CUDA graph "
                           "capture; run one step (a warm-up, as torch's CUDA graph docs ask) before capturing, "
                           "and keep params and state contiguous (strided ones get fresh copies every step)")
    return Table(prep.static, block, prep.key[0], prep.n_dynamic)


def get_table(prep: Prepared, block: int, tag: str | None = None) -> Table:
    """The cached table of ``prep.static`` (params first, then each state list) with its grad table
    pointed at ``prep.grads``. ``tag`` keeps a kernel whose per-call list is not the grads (SAM's
    restore reads old_params, Muon's apply the updates) off the table the grad kernels share for the
    same static lists, which would otherwise re-upload its per-call table on every alternation. Under
    CUDA graph capture a table must already exist (`_new_table`)."""
    if not prep.cacheable:
        table = _new_table(prep, block)
        table.set_grads(prep.grad_addrs)
        return table
    key = (block, MAX_PARTS, RBLOCK, prep.n_dynamic, tag, *prep.key)
    table = _TABLES.get(key)
    if table is None:
        table = _new_table(prep, block)
        _TABLES[key] = table
        if len(_TABLES) > _CACHE_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    table.set_grads(prep.grad_addrs)
    return table


def clear_cache() -> None:
    _TABLES.clear()
    _CONSTANTS.clear()


_CONSTANTS: OrderedDict[tuple, Tensor] = OrderedDict()


def device_constants(values: Sequence[int] | Sequence[float], dtype: torch.dtype,
                     device: torch.device) -> Tensor:
    """A small read-only device vector of per-tensor values (output positions, Muon's scales), uploaded
    once per distinct tuple and then cached like the tables: the same list of tensors gives the same
    tuple every step, so a step costs a dict lookup, not a host-to-device copy. Kernels must not write it."""
    key = (device, dtype, tuple(values))
    out = _CONSTANTS.get(key)
    if out is None:
        out = _upload(torch.tensor(key[2], dtype=dtype), device)
        _CONSTANTS[key] = out
        if len(_CONSTANTS) > _CACHE_SIZE:
            _CONSTANTS.popitem(last=False)
    else:
        _CONSTANTS.move_to_end(key)
    return out


# ------------------------------------------------------------------------------------------ lists
class Prepared:
    """Non-empty tensors of a group, all contiguous, their addresses (the cache key), and how to write
    results back when they are contiguous stand-ins for strided tensors."""

    __slots__ = ("cacheable", "grad_addrs", "grad_writeback", "grads", "index", "key", "kinds", "n_dynamic",
                 "p_kind", "s_kind", "static", "writeback")

    def __init__(self, static, grads, p_kind, s_kind, writeback=(), grad_writeback=(), *, n_dynamic=1,
                 kinds=(), index=()):
        self.static, self.grads, self.p_kind, self.s_kind = static, grads, p_kind, s_kind
        # `prepare_lists` only: `grads` holds the n_dynamic per-call lists interleaved, `kinds` the dtype
        # code of every static then dynamic list, `index` each tensor's position in the caller's lists
        self.n_dynamic, self.kinds, self.index = n_dynamic, kinds, index
        self.writeback = writeback
        # (grad, contiguous copy) pairs: only when the kernel writes grads (AMP's unscale); not part of
        # the static table, so they do not affect caching
        self.grad_writeback = grad_writeback
        # stand-ins get fresh addresses every step: caching their table would only evict useful ones
        self.cacheable = not writeback
        self.key = (static[0][0].device, tuple(t.numel() for t in static[0]),
                    tuple(t.data_ptr() for lst in static for t in lst))
        self.grad_addrs = tuple(g.data_ptr() for g in grads)

    def finish(self) -> None:
        """Copy results of non-contiguous tensors back to their original storage."""
        for dst, src in (*self.writeback, *self.grad_writeback):
            dst.copy_(src)


def _contiguous_grads(grads: list[Tensor], write: bool = False) -> tuple[list[Tensor], list]:
    """Contiguous grads, and the (grad, copy) pairs to copy back when the kernel writes them (``write``)."""
    if all(g.is_contiguous() for g in grads):
        return grads, []
    out = [g.contiguous() for g in grads]  # the grad table is refreshed every step anyway
    return out, [(g, c) for g, c in zip(grads, out) if c is not g] if write else []


def check_lists(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[Sequence[Tensor]],
                numels: list[int], *, grad_dtype: torch.dtype | None = None) -> None:
    """Refuse inconsistent lists before a kernel reads raw addresses: a state or grad shorter than its
    param would be read and written out of bounds (heap corruption, not an exception). The class never
    passes such lists; a direct caller of a launcher may. A few attribute reads per tensor per step.
    ``grad_dtype``: the grads' one dtype when it is not the params' (a kernel with its own ``G_KIND``)."""
    n = len(params)
    if len(grads) != n or any(len(s) != n for s in states):
        raise ValueError(f"Triton launcher: list lengths differ (params {n}, grads {len(grads)}, states "
                         f"{[len(s) for s in states]}); pass one grad and one entry per state list per param")
    if not n:
        return
    dtype = params[0].dtype
    gdtype = dtype if grad_dtype is None else grad_dtype
    # fast path: one comprehension per list; the loops below only run to name the culprit
    if all([t.numel() for t in lst] == numels for lst in (grads, *states)) and \
            {t.dtype for t in params} == {dtype} and {g.dtype for g in grads} == {gdtype}:
        return  # devices are not compared per tensor (a third of this cost again): the class groups by device
    for name, lst, want in (("param", params, dtype), ("grad", grads, gdtype)):
        for i, t in enumerate(lst):
            if t.dtype != want:
                raise ValueError(f"Triton launcher: {name} {i} is {t.dtype}, expected {want} (one launch "
                                 "handles one (device, dtype) group)")
    for j, lst in enumerate((grads, *states)):
        for i, (t, m) in enumerate(zip(lst, numels)):
            what = "grad" if j == 0 else f"state list {j - 1} entry"
            if t.numel() != m:
                raise ValueError(f"Triton launcher: {what} {i} has {t.numel()} elements, its param has {m}")


def prepare_launches(params: Sequence[Tensor], grads: Sequence[Tensor],
                     states: Sequence[Sequence[Tensor]], *, write_grads: bool = False) -> list[Prepared]:
    """The launches of one group: none when every tensor is empty; one over the contiguous tensors
    (zero-size ones dropped); and, only if some param or state tensor is strided (rare: a strided view
    as a param), a second one over contiguous stand-ins that `Prepared.finish` copies back. Keeping
    those apart keeps the main table cached: a stand-in has a new address every step. ``write_grads``
    (the kernel writes the grads: AMP's unscale) also copies non-contiguous grads back in `finish`.

    This runs every step on the host, so it reads each tensor as few times as it can (~0.1-0.2 µs per
    attribute read): numel once, then contiguity and address once per list.
    """
    numels = [p.numel() for p in params]
    check_lists(params, grads, states, numels)
    keep = [i for i, n in enumerate(numels) if n > 0]
    if not keep:
        return []
    if len(keep) != len(numels):
        params = [params[i] for i in keep]
        grads = [grads[i] for i in keep]
        states = [[s[i] for i in keep] for s in states]
    p_kind = dtype_kind(params[0].dtype)
    s_dtypes = {t.dtype for s in states for t in s}
    if len(s_dtypes) > 1:
        raise TypeError("the Triton kernels need one state dtype per group, got "
                        f"{sorted(map(str, s_dtypes))}")
    s_kind = dtype_kind(s_dtypes.pop()) if s_dtypes else KIND_FP32
    lists = [list(params), *(list(s) for s in states)]
    grads = list(grads)
    if all(t.is_contiguous() for lst in lists for t in lst):
        gs, gwb = _contiguous_grads(grads, write_grads)
        return [Prepared(lists, gs, p_kind, s_kind, grad_writeback=gwb)]
    strided = [i for i in range(len(params)) if not all(lst[i].is_contiguous() for lst in lists)]
    plain = sorted(set(range(len(params))) - set(strided))
    out = []
    if plain:
        gs, gwb = _contiguous_grads([grads[i] for i in plain], write_grads)
        out.append(Prepared([[lst[i] for i in plain] for lst in lists], gs, p_kind, s_kind,
                            grad_writeback=gwb))
    writeback = []
    stand_ins = []
    for lst in lists:
        col = []
        for i in strided:
            t = lst[i]
            if not t.is_contiguous():
                c = t.contiguous()
                writeback.append((t, c))
                t = c
            col.append(t)
        stand_ins.append(col)
    gs, gwb = _contiguous_grads([grads[i] for i in strided], write_grads)
    out.append(Prepared(stand_ins, gs, p_kind, s_kind, writeback, gwb))
    return out


def prepare(params: Sequence[Tensor], grads: Sequence[Tensor],
            states: Sequence[Sequence[Tensor]], *, write_grads: bool = False) -> Prepared | None:
    """All of a group in one `Prepared` (strided tensors as stand-ins in the same table, which is then
    rebuilt every step), or None when every tensor is empty. `prepare_launches` keeps the common case
    cached by splitting the strided tensors off; this single-launch form is kept for callers that
    need exactly one launch."""
    launches = prepare_launches(params, grads, states, write_grads=write_grads)
    if len(launches) <= 1:
        return launches[0] if launches else None
    plain, strided = launches
    static = [a + b for a, b in zip(plain.static, strided.static)]
    return Prepared(static, plain.grads + strided.grads, plain.p_kind, plain.s_kind, strided.writeback,
                    [*plain.grad_writeback, *strided.grad_writeback])


def check_named_lists(lists: Sequence[Sequence[Tensor]], names: Sequence[str]) -> list[int]:
    """`check_lists` for `prepare_lists`: equal lengths and per-tensor numels across every list (the first
    one sets them), each list of one dtype, named in the message. Returns the numels of the first list.
    Raises ValueError before any kernel reads a raw address."""
    lengths = [len(lst) for lst in lists]
    if len(set(lengths)) > 1:
        raise ValueError("Triton launcher: list lengths differ ("
                         + ", ".join(f"{name} {m}" for name, m in zip(names, lengths)) + ")")
    numels = [t.numel() for t in lists[0]]
    for name, lst in zip(names[1:], lists[1:]):
        got = [t.numel() for t in lst]
        if got != numels:
            i = next(i for i, (a, b) in enumerate(zip(got, numels)) if a != b)
            raise ValueError(f"Triton launcher: {name}[{i}] has {got[i]} elements, {names[0]}[{i}] has "
                             f"{numels[i]}")
    for name, lst in zip(names, lists):
        if len({t.dtype for t in lst}) > 1:
            raise ValueError(f"Triton launcher: {name} mixes dtypes {sorted({str(t.dtype) for t in lst})}; "
                             "one launch handles one dtype per list")
    return numels


def prepare_lists(static: Sequence[Sequence[Tensor]], dynamic: Sequence[Sequence[Tensor]] = (), *,
                  names: Sequence[str], written: Sequence[str] = ()) -> list[Prepared]:
    """The launches of a kernel over per-tensor aligned lists, each of one dtype (its own ``*_KIND``).

    ``static`` lists keep their addresses from call to call (params, optimizer state): their addresses
    are in the cached ``meta`` table, ``static[0]`` first (its numels set the chunks). ``dynamic`` lists
    are fresh every call (grads, SAM's ``old_params``, Muon's update buffers): their addresses go in the
    per-call table (``grad_ptrs``, ``[n, n_dynamic]``), refreshed with one small copy, so a new buffer
    does not rebuild the cached table. ``names`` names every static then dynamic list for the errors;
    ``written`` names the lists the kernel writes.

    As in `prepare_launches`: zero-size tensors are dropped (``Prepared.index`` keeps the positions of
    the rest), and tensors with a non-contiguous static entry go to a second launch over contiguous
    stand-ins, copied back by `Prepared.finish` where written. A non-contiguous dynamic tensor is read
    through a contiguous copy (copied back if written). ``Prepared.kinds`` holds every list's dtype code.
    """
    lists = [*static, *dynamic]
    numels = check_named_lists(lists, names)
    keep = [i for i, m in enumerate(numels) if m > 0]
    if not keep:
        return []
    kinds = tuple(dtype_kind(lst[keep[0]].dtype) for lst in lists)
    strided = {i for i in keep if not all(lst[i].is_contiguous() for lst in static)}
    n_static = len(static)
    writes = [name in written for name in names]
    out = []
    for idx, stand_in in (([i for i in keep if i not in strided], False), (sorted(strided), True)):
        if not idx:
            continue
        writeback, dyn_writeback = [], []
        cols = []
        for j, lst in enumerate(lists):
            col = []
            for i in idx:
                t = lst[i]
                if not t.is_contiguous():
                    c = t.contiguous()
                    if writes[j]:
                        (writeback if j < n_static else dyn_writeback).append((t, c))
                    t = c
                col.append(t)
            cols.append(col)
        flat_dynamic = [t for row in zip(*cols[n_static:]) for t in row]  # interleaved, one row per tensor
        prep = Prepared(cols[:n_static], flat_dynamic, kinds[0], kinds[1] if n_static > 1 else KIND_FP32,
                        writeback, dyn_writeback, n_dynamic=len(dynamic), kinds=kinds, index=idx)
        prep.cacheable = not stand_in  # a stand-in has a new address every call
        out.append(prep)
    return out


# ------------------------------------------------------------------------------------------ launches
class DeviceScalar(NamedTuple):
    """A per-step scalar of a launch (`Launch.scalar`): ``value`` (fp32 kernel argument) or ``tensor``
    (a 0-d fp32 device tensor the kernel loads), as `fused_optim._scalars.device_scalar` gives them."""

    value: float
    tensor: Tensor | None


#: the standard parameters `Launch` fills in, in the order of `Launch.std` (`Table.std`, then the launch's own)
_STD = ("meta_ptr", "grad_ptrs_ptr", "dyn_ptrs_ptr", "chunks_ptr", "rchunks_ptr", "partials_ptr", "ROW", "BLOCK",
        "MAX_PARTS", "RBLOCK", "ALIGNED", "P_KIND", "S_KIND", "grad_scale_ptr", "found_inf_ptr", "HAS_GRAD_SCALE",
        "HAS_FOUND_INF")
#: standard parameters a launcher may pass itself (Muon's state dtype is its own list's, not the group's)
_OVERRIDABLE = ("P_KIND", "S_KIND")
_new_tuple = tuple.__new__


def _scalar_args(x, launch: Launch, name: str) -> tuple:
    """``(x, x_ptr, X_TENSOR)`` of a per-step scalar (see `Launch`)."""
    kind = type(x)
    if kind is float:
        return x, launch.unused, False
    if kind is DeviceScalar:
        value, tensor = x
    elif x is None:
        raise TypeError(f"the per-step scalar {name!r} is None; pass a float or a 0-d tensor")
    else:
        value, tensor = device_scalar(x, launch.device)
    return (value, launch.unused, False) if tensor is None else (value, tensor, True)


class _Binder:
    """How `Launch` calls one kernel, read once from its signature: ``bind(launch, args)``, generated
    code that returns every argument in the kernel's order (standard ones from ``launch.std`` by index,
    device scalars converted inline or by `_scalar_args`), so a launch builds no dict of arguments and
    matches no name."""

    __slots__ = ("bind", "caller", "name", "required")

    def __init__(self, kernel):
        names = list(kernel.arg_names)
        have = set(names)
        self.name = kernel.fn.__name__
        scalars = [n for n in names if f"{n}_ptr" in have and f"{n.upper()}_TENSOR" in have]
        derived = {f"{n}_ptr" for n in scalars} | {f"{n.upper()}_TENSOR" for n in scalars}
        self.caller = [n for n in names if n not in derived and (n not in _STD or n in _OVERRIDABLE)]
        self.required = [n for n in self.caller if n not in _OVERRIDABLE]
        optional = [n for n in self.caller if n in _OVERRIDABLE]
        # bind(launch, args): ``args`` is the launcher's keyword dict as received (re-binding it as
        # keywords would cost ~0.1 µs per argument); a missing name is a KeyError, one too many shows in
        # the count, and both are then named by `explain`
        lines = ["def bind(_launch, _args):", "    _std = _launch.std",
                 f"    _extra = len(_args) - {len(self.required)}"]
        for n in optional:
            lines += [f"    if {n!r} in _args: {n} = _args[{n!r}]; _extra -= 1",
                      f"    else: {n} = _std[{_STD.index(n)}]"]
        lines.append("    if _extra: raise TypeError")
        if scalars:
            lines.append("    _unused = _launch.unused")
        for n in scalars:  # host values inline (a call costs more than the test); the rest in _scalar_args
            ptr, flag = f"{n}_ptr", f"{n.upper()}_TENSOR"
            lines += [f"    {n} = _args[{n!r}]",
                      f"    if type({n}) is float: {ptr}, {flag} = _unused, False",
                      (f"    elif type({n}) is _DeviceScalar and {n}.tensor is None: "
                       f"{n}, {ptr}, {flag} = {n}.value, _unused, False"),
                      f"    else: {n}, {ptr}, {flag} = _scalar_args({n}, _launch, {n!r})"]
        local = {*optional, *scalars, *derived}
        args = [f"_std[{_STD.index(n)}]" if n in _STD and n not in _OVERRIDABLE else n if n in local
                else f"_args[{n!r}]" for n in names]
        lines.append(f"    return ({', '.join(args)},)")
        scope = {"_DeviceScalar": DeviceScalar, "_scalar_args": _scalar_args}
        exec("\n".join(lines), scope)  # noqa: S102 (generated from the kernel's own parameter names)
        self.bind = scope["bind"]

    def explain(self, args: dict) -> None:
        """Raise the TypeError naming what ``args`` lacks or has too many, if anything (after a failed `bind`)."""
        unknown = sorted(args.keys() - set(self.caller))
        missing = sorted(set(self.required) - args.keys())
        if unknown or missing:
            owned = [n for n in unknown if n in _STD]
            raise TypeError(f"{self.name}: unknown arguments {unknown}, missing {missing}"
                            + (f" ({owned}: the launch's own table, AMP and dtype arguments)" if owned else ""))


_BINDERS: dict[int, _Binder] = {}


class Launch:
    """One launch's worth of a group (a `Prepared` and its cached `Table`), and the one way every Triton
    kernel of this package is called (`__call__`). Kernels name their parameters by convention, so a
    launcher passes only what is its own:

    - table arguments, filled in for every kernel that declares them: ``meta_ptr``, ``grad_ptrs_ptr``
      (also as ``dyn_ptrs_ptr``: the per-call lists of `prepare_lists`), ``chunks_ptr``,
      ``rchunks_ptr``, ``partials_ptr``, ``ROW``, ``BLOCK``, ``MAX_PARTS``, ``RBLOCK``, ``ALIGNED``,
      ``P_KIND`` and ``S_KIND`` (the group's dtype codes; a launcher may pass its own);
    - AMP (`fused_optim.declaration.mark_amp`): ``grad_scale_ptr``, ``found_inf_ptr`` and the
      constexprs ``HAS_GRAD_SCALE``, ``HAS_FOUND_INF``; the values stay on the device (no host sync,
      and a new scale never recompiles), an absent one is any fp32 buffer, never read;
    - a per-step scalar: a kernel declaring ``x``, ``x_ptr`` and the constexpr ``X_TENSOR`` takes ``x``
      as a float or a tensor (or the `DeviceScalar` of `scalar`, when the launcher needs its host value
      too): the helper passes the fp32 value, the 0-d device tensor (or any fp32 buffer, never read) and
      whether it is one (`fused_optim._scalars.device_scalar`); the kernel reads
      ``_scalar(x, x_ptr, X_TENSOR)``.

    This runs per launch on the host, so the names are matched once per kernel (`_Binder`), and a
    launch passes its arguments by position, as a hand-written launch would.
    """

    __slots__ = ("device", "is_cuda", "prep", "std", "table", "unused")

    def __init__(self, prep: Prepared, table: Table, grad_scale: Tensor | None = None,
                 found_inf: Tensor | None = None):
        self.prep, self.table, self.device, self.is_cuda = prep, table, table.device, table.is_cuda
        self.unused = unused = table.partials
        self.std = (*table.std, table.static_aligned and table.grads_aligned, prep.p_kind, prep.s_kind,
                    unused if grad_scale is None else device_tensor(grad_scale, table.device),
                    unused if found_inf is None else device_tensor(found_inf, table.device),
                    grad_scale is not None, found_inf is not None)

    def scalar(self, x: float | Tensor) -> DeviceScalar:
        """A per-step scalar for this launch's device (`fused_optim._scalars.device_scalar`)."""
        if type(x) is float:  # the common case first: no isinstance against Tensor
            return _new_tuple(DeviceScalar, (x, None))
        if isinstance(x, Tensor):
            return _new_tuple(DeviceScalar, device_scalar(x, self.device))
        return _new_tuple(DeviceScalar, (float(x), None))  # not DeviceScalar(...): its __new__ is Python code

    def __call__(self, kernel, *, grid: int | None = None, num_warps: int = 4, options: dict | None = None,
                 **args) -> None:
        """Run ``kernel`` (a ``@triton.jit`` kernel of this package) over the table: the flavour for the
        device (`kernel_for`), on that device, ``grid`` programs (default: one per chunk). ``args`` are
        the kernel's own parameters by name; ``options`` extra compile options."""
        binder = _BINDERS.get(id(kernel))  # by id: a JITFunction hashes its source; kernels are never freed
        if binder is None:
            binder = _BINDERS[id(kernel)] = _Binder(kernel)
        try:
            call = binder.bind(self, args)
        except (KeyError, TypeError):
            binder.explain(args)
            raise
        k = kernel_for(kernel, self.device)  # looked up per launch: tools wrap it to record launches
        grid = (self.table.n_chunks if grid is None else grid,)
        if self.is_cuda:
            with torch.cuda.device(self.device):  # Triton launches on the current device
                k[grid](*call, num_warps=num_warps, **(options or {}))
        elif options is None:
            k[grid](*call, num_warps=num_warps)
        else:
            k[grid](*call, num_warps=num_warps, **options)


def launches(preps: list[Prepared], block: int, *, tag: str | None = None, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None) -> Iterator[Launch]:
    """A `Launch` per prepared launch of a group (`prepare_launches`, `prepare_lists`), on its cached
    table (`get_table`; ``tag``: see there); strided tensors are copied back (`Prepared.finish`) once
    the caller's loop body has launched."""
    for prep in preps:
        yield Launch(prep, get_table(prep, block, tag), grad_scale, found_inf)
        prep.finish()


def update_launches(params: Sequence[Tensor], grads: Sequence[Tensor], states: Sequence[Sequence[Tensor]],
                    block: int, grad_scale: Tensor | None = None,
                    found_inf: Tensor | None = None) -> Iterator[Launch]:
    """The launches of an optimizer's update over a (device, dtype) group: params, grads (unscaled in
    place under AMP) and the state lists (`prepare_launches`)."""
    preps = prepare_launches(params, grads, states, write_grads=grad_scale is not None)
    return launches(preps, block, grad_scale=grad_scale, found_inf=found_inf)


# ------------------------------------------------------------------------------------------ variants
def _interpret_scope(on: bool):
    """Temporarily set how `triton.jit` decorates (it reads TRITON_INTERPRET when decorating)."""
    @contextlib.contextmanager
    def scope():
        saved_env = os.environ.get("TRITON_INTERPRET")
        knobs = getattr(triton, "knobs", None)
        runtime = getattr(knobs, "runtime", None)
        saved_knob = runtime.__dict__.pop("interpret", None) if runtime is not None else None
        os.environ["TRITON_INTERPRET"] = "1" if on else "0"
        try:
            yield
        finally:
            if saved_env is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved_env
            if saved_knob is not None:
                runtime.__dict__["interpret"] = saved_knob
    return scope()


_PKG = __name__.rsplit(".", 1)[0]  # fused_optim.kernels


_JITFunction = triton.runtime.JITFunction


def _is_interpreted(fn) -> bool:
    return not isinstance(fn, _JITFunction)


def kernel_for(fn, device: torch.device):
    """`fn` (a kernel of this package) compiled for CUDA tensors, interpreted for CPU tensors.

    Which one `@triton.jit` makes is fixed by TRITON_INTERPRET at decoration time, process-wide. The
    tests need both in one process (CPU tensors interpreted, CUDA tensors compiled), and setting the
    variable globally would also turn torch.compile's Triton kernels into interpreted ones. So the
    other flavour is made by importing this package's source a second time under a private name
    with the variable set as needed; relative imports keep the copy self-contained.
    """
    want_interp = device.type != "cuda"
    if (not isinstance(fn, _JITFunction)) == want_interp:  # `_is_interpreted`, inline: this runs per launch
        return fn
    flavour = "_interpreted" if want_interp else "_compiled"
    pkg_name = f"{_PKG}.{flavour}"
    if pkg_name not in sys.modules:
        pkg = types.ModuleType(pkg_name)
        pkg.__path__ = list(sys.modules[_PKG].__path__)
        pkg.__package__ = pkg_name
        sys.modules[pkg_name] = pkg
    inner = fn.fn
    mod_name = f"{pkg_name}.{inner.__module__.rsplit('.', 1)[1]}"
    if mod_name not in sys.modules:
        with _interpret_scope(want_interp):
            importlib.import_module(mod_name)
    return getattr(sys.modules[mod_name], inner.__name__)
