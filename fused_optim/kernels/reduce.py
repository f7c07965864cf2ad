"""Per-tensor reductions for every tensor of a group in one launch, deterministic and without atomics.

Each program reduces one slot (a contiguous span of one tensor, at most `MAX_PARTS` slots per tensor)
into ``table.partials``; the update kernel then loads its tensor's slots as one vector and finishes
the reduction itself. That gives two launches per step (reduce, update) with no buffer to zero and
the same bits every run, which float atomics would not give for sums. The cost is each update program
re-reading at most 256 floats of its tensor (1 KiB, L2-resident), against >= 8 KiB of its own traffic.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .multi_tensor import Table, _load_f32, _vmax, _vsum, device_fn, device_guard, kernel_for

OP_ABSMAX, OP_SUM = 0, 1


@device_fn
def _summand(g_addr, p_addr, offs, mask, coeff, OP: tl.constexpr, NEGATE: tl.constexpr,
             ADD_PARAM: tl.constexpr, P_KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """|g| (OP 0) or ±g [+ coeff*p] (OP 1) of one block, 0 where masked (neutral for both)."""
    g = _load_f32(g_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    if OP == 0:
        x = tl.abs(g)
    else:
        if NEGATE:
            g = -g
        if ADD_PARAM:
            g = g + coeff * _load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
        x = g
    if MASKED:
        x = tl.where(mask, x, 0.0)
    return x


@triton.jit
def _partials_kernel(
    meta_ptr,        # int64 [n, ROW]: numel, first slot, slot count, slot span, param address, ...
    grad_ptrs_ptr,   # int64 [n]: grad addresses
    rchunks_ptr,     # int32 [n_parts, 2]: (tensor, slot) of each program
    partials_ptr,    # fp32 [n_parts]: one partial result per slot (output)
    coeff,           # fp32: weight of the param in the summand g + coeff*p (OP_SUM with ADD_PARAM)
    OP: tl.constexpr,          # 0: max |g|, 1: sum of (+/-g [+ coeff*p])
    NEGATE: tl.constexpr,      # sum -g instead of g (maximize)
    ADD_PARAM: tl.constexpr,   # add coeff*p to every element first (GradientEquilibrium's L2 term)
    P_KIND: tl.constexpr,      # dtype code of params and grads
    ALIGNED: tl.constexpr,     # every address 16-byte aligned: vector accesses
    ROW: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(rchunks_ptr + 2 * pid).to(tl.int64)
    j = tl.load(rchunks_ptr + 2 * pid + 1).to(tl.int64)
    row = meta_ptr + t * ROW
    numel = tl.load(row)
    span = tl.multiple_of(tl.load(row + 3), RBLOCK)  # a multiple of RBLOCK by construction (Table)
    g_addr = tl.load(grad_ptrs_ptr + t)
    p_addr = tl.load(row + 4)
    start = j * span
    count = tl.minimum(span, numel - start)
    n_full = count // RBLOCK
    acc = tl.full([RBLOCK], 0.0, tl.float32)
    # full blocks unmasked (vector loads), then the slot's tail, if any, masked. A while loop: triton
    # 3.6's interpreter cannot take a loaded scalar as a range() bound.
    k = 0
    while k < n_full:
        offs = start + k * RBLOCK + tl.arange(0, RBLOCK)
        x = _summand(g_addr, p_addr, offs, offs < numel, coeff, OP, NEGATE, ADD_PARAM, P_KIND, ALIGNED, False)
        if OP == 0:
            acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)  # a NaN grad makes max|g| NaN
        else:
            acc += x
        k += 1
    offs = start + n_full * RBLOCK + tl.arange(0, RBLOCK)
    if n_full * RBLOCK < count:
        x = _summand(g_addr, p_addr, offs, offs < start + count, coeff, OP, NEGATE, ADD_PARAM, P_KIND,
                     ALIGNED, True)
        if OP == 0:
            acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)  # a NaN grad makes max|g| NaN
        else:
            acc += x
    if OP == 0:
        res = _vmax(acc)
    else:
        res = _vsum(acc)
    tl.store(partials_ptr + pid, res)


def launch_partials(table: Table, op: int, p_kind: int, *, negate: bool = False, add_param: bool = False,
                    coeff: float = 0.0) -> None:
    """Fill ``table.partials`` (the grads must already be in ``table.grad_ptrs``)."""
    kernel = kernel_for(_partials_kernel, table.device)
    with device_guard(table.device):
        kernel[(table.n_parts,)](table.meta, table.grad_ptrs, table.rchunks, table.partials, float(coeff),
                                 OP=op, NEGATE=bool(negate), ADD_PARAM=bool(add_param), P_KIND=p_kind,
                                 ALIGNED=table.aligned,
                                 ROW=table.row, RBLOCK=table.rblock, num_warps=8)
