"""Per-tensor reductions for every tensor of a group in one launch, deterministic and without atomics.

Each program reduces one slot (a contiguous span of one tensor, at most `MAX_PARTS` slots per tensor)
into ``table.partials``; the update kernel then loads its tensor's slots as one vector and finishes
the reduction itself. That gives two launches per step (reduce, update) with no buffer to zero and
the same bits every run, which float atomics would not give for sums. The cost is each update program
re-reading at most 256 floats of its tensor (1 KiB, L2-resident), against >= 8 KiB of its own traffic.

AMP: with a grad scale each element is unscaled (and rounded to the grad's dtype) before it is reduced,
so the result is the reduction of the grads the update then writes back: for max|g| that equals
``max|g| / s`` (division by s > 0, correctly rounded, is monotonic), for sums it is not in general.
With ``found_inf`` set every program returns at once; the update kernel skips too, so the stale
partials are never read. The grads themselves are written back only by the update kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import multi_tensor as mt

#: what `_partials_kernel` reduces per tensor: max |g|; sum of ±g [+ coeff·p]; sum of g²; sum of (|p|·g)²
#: (the last two: SAM's per-tensor norms, plain and adaptive, davda54 `sam.py`)
OP_ABSMAX, OP_SUM, OP_SUMSQ, OP_SUMSQ_ABS_PARAM = 0, 1, 2, 3


@mt.device_fn
def _summand(g_addr, p_addr, offs, mask, coeff, grad_scale_ptr, OP: tl.constexpr, NEGATE: tl.constexpr,
             ADD_PARAM: tl.constexpr, P_KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
             HAS_GRAD_SCALE: tl.constexpr):
    """|g| (OP 0), ±g [+ coeff*p] (OP 1), g (OP 2) or |p|*g (OP 3, rounded to fp32 as the reference's
    product tensor is) of one block, 0 where masked (neutral for all); g unscaled first under AMP. OPs 2
    and 3 are squared by the caller."""
    g = mt._load_f32(g_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    if HAS_GRAD_SCALE:
        g = mt._amp_unscale(g, grad_scale_ptr, P_KIND)
    if OP == 0:
        x = tl.abs(g)
    elif OP == 2:
        x = g
    elif OP == 3:
        x = tl.abs(mt._load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)) * g
    else:
        if NEGATE:
            g = -g
        if ADD_PARAM:
            g = g + coeff * mt._load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
        x = g
    if MASKED:
        x = tl.where(mask, x, 0.0)
    return x


@triton.jit
def _partials_kernel(
    meta_ptr, grad_ptrs_ptr, rchunks_ptr, partials_ptr,  # `multi_tensor.Launch`: one slot per program
    grad_scale_ptr, found_inf_ptr,  # AMP: g unscaled first; found_inf: nothing to do
    coeff,           # fp32: weight of the param in the summand g + coeff*p (OP_SUM with ADD_PARAM)
    OP: tl.constexpr,          # 0: max |g|, 1: sum of (+/-g [+ coeff*p]), 2: sum of g^2, 3: sum of (|p|*g)^2
    NEGATE: tl.constexpr,      # sum -g instead of g (maximize)
    ADD_PARAM: tl.constexpr,   # add coeff*p to every element first (GradientEquilibrium's L2 term)
    P_KIND: tl.constexpr, ALIGNED: tl.constexpr, ROW: tl.constexpr, RBLOCK: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):
    if mt._amp_go(found_inf_ptr, HAS_FOUND_INF):
        _partials_body(meta_ptr, grad_ptrs_ptr, rchunks_ptr, partials_ptr, coeff, grad_scale_ptr, OP, NEGATE,
                       ADD_PARAM, P_KIND, ALIGNED, ROW, RBLOCK, HAS_GRAD_SCALE)


@mt.device_fn
def _accumulate(acc, x, OP: tl.constexpr):
    """One block into the running max (OP 0) or sum (OP 1) or sum of squares (OPs 2, 3)."""
    if OP == 0:
        acc = tl.maximum(acc, x, propagate_nan=tl.PropagateNan.ALL)  # a NaN grad makes max|g| NaN
    elif OP == 1:
        acc += x
    else:
        acc += x * x
    return acc


@mt.device_fn
def _partials_body(meta_ptr, grad_ptrs_ptr, rchunks_ptr, partials_ptr, coeff, grad_scale_ptr,
                   OP: tl.constexpr, NEGATE: tl.constexpr, ADD_PARAM: tl.constexpr, P_KIND: tl.constexpr,
                   ALIGNED: tl.constexpr, ROW: tl.constexpr, RBLOCK: tl.constexpr,
                   HAS_GRAD_SCALE: tl.constexpr):
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
        x = _summand(g_addr, p_addr, offs, offs < numel, coeff, grad_scale_ptr, OP, NEGATE, ADD_PARAM, P_KIND,
                     ALIGNED, False, HAS_GRAD_SCALE)
        acc = _accumulate(acc, x, OP)
        k += 1
    offs = start + n_full * RBLOCK + tl.arange(0, RBLOCK)
    if n_full * RBLOCK < count:
        x = _summand(g_addr, p_addr, offs, offs < start + count, coeff, grad_scale_ptr, OP, NEGATE, ADD_PARAM,
                     P_KIND, ALIGNED, True, HAS_GRAD_SCALE)
        acc = _accumulate(acc, x, OP)
    if OP == 0:
        res = mt._vmax(acc)
    else:
        res = mt._vsum(acc)  # sums of squares too: the caller takes the square root
    tl.store(partials_ptr + pid, res)


def launch_partials(launch: mt.Launch, op: int, *, negate: bool = False, add_param: bool = False,
                    coeff: float = 0.0) -> None:
    """Fill ``launch.table.partials`` (its grads, and AMP's scale and flag, as the launch holds them; the
    module docstring)."""
    launch(_partials_kernel, grid=launch.table.n_parts, num_warps=8, coeff=float(coeff), OP=op,
           NEGATE=bool(negate), ADD_PARAM=bool(add_param))
