"""GradientEquilibrium in two Triton launches per (device, dtype) group (SPEC §4): per-tensor sums of
``±g (+ wd·p)`` into slots, then ``p − lr·(g − mean)``, the update finishing each tensor's sum from its
slots. Bytes per element (fp32): reduction reads g (and p with weight decay), update reads p, g and
writes p: 16 B (20 B with weight decay).
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import (
    _chunk_coords,
    _div_rn,
    _load_f32,
    _load_partials,
    _store_f32,
    _vsum,
    device_fn,
    device_guard,
    get_table,
    kernel_for,
    prepare_launches,
)
from .reduce import OP_SUM, launch_partials

BLOCK = 2048


@device_fn
def _gradient_equilibrium_update(p_addr, g_addr, offs, mask, mean, lr, weight_decay, MAXIMIZE: tl.constexpr,
                                 DECAY: tl.constexpr, P_KIND: tl.constexpr, ALIGNED: tl.constexpr,
                                 MASKED: tl.constexpr):
    """``p - lr*(g - mean)`` on one block, ``g`` with the L2 term; ``mean`` of the tensor's ``g``."""
    p = _load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    g = _load_f32(g_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    if MAXIMIZE:
        g = -g
    if DECAY:
        g = g + weight_decay * p
    p = p - lr * (g - mean)
    _store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)


@triton.jit
def _gradient_equilibrium_kernel(
    meta_ptr,         # int64 [n, ROW]: numel, first slot, slot count, span, param address
    grad_ptrs_ptr,    # int64 [n]: grad addresses, refreshed every step
    chunks_ptr,       # int32 [n_chunks, 2]: (tensor, chunk) of each program
    partials_ptr,     # fp32 [n_parts]: sum of (±g + wd*p) per slot, from _partials_kernel
    lr,               # fp32 runtime args (no recompile when they change)
    weight_decay,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,      # weight_decay != 0: L2 term g + wd*p (SPEC §4 decision)
    P_KIND: tl.constexpr,     # dtype code of params and grads (0 fp32, 1 fp16, 2 bf16)
    ALIGNED: tl.constexpr,    # every address 16-byte aligned: vector accesses
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_PARTS: tl.constexpr,
):
    t, row, offs, mask, full = _chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
    total = _vsum(_load_partials(row, partials_ptr, MAX_PARTS))
    numel = tl.load(row).to(tl.float32)
    mean = _div_rn(tl.full([BLOCK], 0.0, tl.float32) + total, numel)
    p_addr = tl.load(row + 4)
    g_addr = tl.load(grad_ptrs_ptr + t)
    if full:
        _gradient_equilibrium_update(p_addr, g_addr, offs, mask, mean, lr, weight_decay, MAXIMIZE, DECAY,
                                     P_KIND, ALIGNED, False)
    else:
        _gradient_equilibrium_update(p_addr, g_addr, offs, mask, mean, lr, weight_decay, MAXIMIZE, DECAY,
                                     P_KIND, ALIGNED, True)


def _triton_gradient_equilibrium(params: list[Tensor], grads: list[Tensor], *, lr: float, weight_decay: float,
                                 maximize: bool) -> None:
    """GradientEquilibrium over a (device, dtype) group: reduce, then update; zero-size tensors skipped."""
    for prep in prepare_launches(params, grads, []):
        table = get_table(prep, BLOCK)
        decay = weight_decay != 0
        launch_partials(table, OP_SUM, prep.p_kind, negate=maximize, add_param=decay, coeff=weight_decay)
        kernel = kernel_for(_gradient_equilibrium_kernel, table.device)
        with device_guard(table.device):
            kernel[(table.n_chunks,)](table.meta, table.grad_ptrs, table.chunks, table.partials, float(lr),
                                      float(weight_decay), MAXIMIZE=bool(maximize), DECAY=decay,
                                      P_KIND=prep.p_kind, ALIGNED=table.aligned, ROW=table.row, BLOCK=BLOCK,
                                      MAX_PARTS=table.max_parts,
                                      num_warps=4)
        prep.finish()
