"""GradientEquilibrium in two Triton launches per (device, dtype) group (docs/spec.md §4): per-tensor sums of
``±g (+ wd·p)`` into slots, then ``p − lr·(g − mean)``, the update finishing each tensor's sum from its
slots. Bytes per element (fp32): reduction reads g (and p with weight decay), update reads p, g and
writes p: 16 B (20 B with weight decay); +4 B under AMP (the unscaled grad is written back).

AMP (`fused_optim.optimizer.supports_amp`): both launches divide g by ``grad_scale`` (rounded to the
grad's dtype, as torch's in-place unscale stores it) before using it: the sum is over the unscaled grads
(``sum(g/s)`` is not ``sum(g)/s`` in general). The update stores the unscaled grad back. With
``found_inf != 0`` both launches do nothing.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import (
    _amp_go,
    _chunk_coords,
    _div_rn,
    _load_f32,
    _load_grad,
    _load_partials,
    _store_f32,
    _vsum,
    amp_args,
    device_fn,
    device_guard,
    get_table,
    kernel_for,
    lr_args,
    prepare_launches,
)
from .reduce import OP_SUM, launch_partials

BLOCK = 2048


@device_fn
def _gradient_equilibrium_update(p_addr, g_addr, offs, mask, mean, lr, weight_decay, grad_scale_ptr,
                                 MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, P_KIND: tl.constexpr,
                                 ALIGNED: tl.constexpr, MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """``p - lr*(g - mean)`` on one block, ``g`` with the L2 term; ``mean`` of the tensor's ``g``."""
    p = _load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    g = _load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
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
    lr_ptr,           # fp32 0-d: lr on the device, read instead of `lr` when LR_TENSOR
    grad_scale_ptr,   # fp32 0-d: AMP's loss scale (read when HAS_GRAD_SCALE)
    found_inf_ptr,    # fp32 0-d: AMP's inf flag; nonzero skips the step (read when HAS_FOUND_INF)
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,      # weight_decay != 0: L2 term g + wd*p (docs/spec.md §4 decision)
    P_KIND: tl.constexpr,     # dtype code of params and grads (0 fp32, 1 fp16, 2 bf16)
    ALIGNED: tl.constexpr,    # every address 16-byte aligned: vector accesses
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_PARTS: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_TENSOR: tl.constexpr,
):
    if _amp_go(found_inf_ptr, HAS_FOUND_INF):
        if LR_TENSOR:
            lr = tl.load(lr_ptr)
        t, row, offs, mask, full = _chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
        total = _vsum(_load_partials(row, partials_ptr, MAX_PARTS))
        numel = tl.load(row).to(tl.float32)
        mean = _div_rn(tl.full([BLOCK], 0.0, tl.float32) + total, numel)
        p_addr = tl.load(row + 4)
        g_addr = tl.load(grad_ptrs_ptr + t)
        if full:
            _gradient_equilibrium_update(p_addr, g_addr, offs, mask, mean, lr, weight_decay, grad_scale_ptr,
                                         MAXIMIZE, DECAY, P_KIND, ALIGNED, False, HAS_GRAD_SCALE)
        else:
            _gradient_equilibrium_update(p_addr, g_addr, offs, mask, mean, lr, weight_decay, grad_scale_ptr,
                                         MAXIMIZE, DECAY, P_KIND, ALIGNED, True, HAS_GRAD_SCALE)


def _triton_gradient_equilibrium(params: list[Tensor], grads: list[Tensor], *, lr: float | Tensor,
                                 weight_decay: float, maximize: bool, grad_scale: Tensor | None = None,
                                 found_inf: Tensor | None = None) -> None:
    """GradientEquilibrium over a (device, dtype) group: reduce, then update; zero-size tensors skipped.
    AMP: see the module docstring. A device tensor ``lr`` is read by the kernel (`multi_tensor.lr_args`)."""
    for prep in prepare_launches(params, grads, [], write_grads=grad_scale is not None):
        table = get_table(prep, BLOCK)
        decay = weight_decay != 0
        launch_partials(table, OP_SUM, prep.p_kind, negate=maximize, add_param=decay, coeff=weight_decay,
                        grad_scale=grad_scale, found_inf=found_inf)
        kernel = kernel_for(_gradient_equilibrium_kernel, table.device)
        gs_ptr, fi_ptr, has_gs, has_fi = amp_args(table, grad_scale, found_inf)
        lr_value, lr_ptr, lr_tensor = lr_args(table, lr)
        with device_guard(table.device):
            kernel[(table.n_chunks,)](table.meta, table.grad_ptrs, table.chunks, table.partials, lr_value,
                                      float(weight_decay), lr_ptr, gs_ptr, fi_ptr, MAXIMIZE=bool(maximize),
                                      DECAY=decay, P_KIND=prep.p_kind, ALIGNED=table.aligned, ROW=table.row,
                                      BLOCK=BLOCK, MAX_PARTS=table.max_parts, HAS_GRAD_SCALE=has_gs,
                                      HAS_FOUND_INF=has_fi, LR_TENSOR=lr_tensor, num_warps=4)
        prep.finish()
