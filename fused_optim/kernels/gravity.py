"""Gravity in two Triton launches per (device, dtype) group (docs/spec.md §1): per-tensor max|g| into slots,
then the update, which finishes each tensor's max from its slots (no `.item()`, no host sync).

Per element, in the seed's op order: ``m = 1/max|g|``, ``ζ = g / (1 + (g/m)²)``,
``v·β̂ + (1−β̂)·ζ``, ``p − lr·v``. Divisions are IEEE-rounded (`div_rn`) as in torch. Bytes per
element (fp32): reduction reads g (4 B), update reads p, g, v and writes p, v (20 B): 24 B (+4 B under
AMP: the unscaled grad is written back).

AMP (`fused_optim.optimizer.supports_amp`): both launches divide g by ``grad_scale`` (rounded to the
grad's dtype, as torch's in-place unscale stores it) before using it, so max|g| is that of the unscaled
grads; the update stores the unscaled grad back. With ``found_inf != 0`` both launches do nothing.
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
    _vmax,
    amp_args,
    device_fn,
    device_guard,
    get_table,
    kernel_for,
    prepare_launches,
    scalar_args,
)
from .reduce import OP_ABSMAX, launch_partials

BLOCK = 2048


@device_fn
def _gravity_update(p_addr, g_addr, v_addr, offs, mask, m, lr, beta_hat, one_minus_beta_hat,
                    grad_scale_ptr, MAXIMIZE: tl.constexpr, P_KIND: tl.constexpr, S_KIND: tl.constexpr,
                    ALIGNED: tl.constexpr,
                    MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The per-element rule, in the seed's op order, on one block; ``m = 1/max|g|`` of the tensor."""
    p = _load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    g = _load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    v = _load_f32(v_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    r = _div_rn(g, m)
    r = r * r
    r = 1.0 + r
    zeta = _div_rn(g, r)
    v = v * beta_hat + one_minus_beta_hat * zeta
    p = p - lr * v
    _store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    _store_f32(v_addr, offs, v, mask, S_KIND, ALIGNED, MASKED)


@triton.jit
def _gravity_kernel(
    meta_ptr,         # int64 [n, ROW]: numel, first slot, slot count, span, param address, v address
    grad_ptrs_ptr,    # int64 [n]: grad addresses, refreshed every step
    chunks_ptr,       # int32 [n_chunks, 2]: (tensor, chunk) of each program
    partials_ptr,     # fp32 [n_parts]: max|g| per slot, from _partials_kernel
    lr,               # fp32 runtime args (no recompile when they change)
    beta_hat,
    one_minus_beta_hat,
    lr_ptr,           # fp32 0-d: lr on the device, read instead of `lr` when LR_TENSOR
    beta_hat_ptr,     # fp32 0-d: beta_hat on the device (capturable), read when BETA_HAT_TENSOR
    grad_scale_ptr,   # fp32 0-d: AMP's loss scale (read when HAS_GRAD_SCALE)
    found_inf_ptr,    # fp32 0-d: AMP's inf flag; nonzero skips the step (read when HAS_FOUND_INF)
    MAXIMIZE: tl.constexpr,
    P_KIND: tl.constexpr,     # dtype code of params and grads (0 fp32, 1 fp16, 2 bf16)
    S_KIND: tl.constexpr,     # dtype code of v
    ALIGNED: tl.constexpr,    # every address 16-byte aligned: vector accesses
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    MAX_PARTS: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    BETA_HAT_TENSOR: tl.constexpr,
):
    if _amp_go(found_inf_ptr, HAS_FOUND_INF):
        if LR_TENSOR:
            lr = tl.load(lr_ptr)
        if BETA_HAT_TENSOR:
            beta_hat = tl.load(beta_hat_ptr)
            one_minus_beta_hat = 1.0 - beta_hat  # in fp32 (the float path rounds the double 1 - beta_hat)
        t, row, offs, mask, full = _chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
        amax = _vmax(_load_partials(row, partials_ptr, MAX_PARTS))
        # m = 1/max|g| is inf for an all-zero grad: g/m = 0, zeta = 0, no NaN (docs/spec.md §1)
        m = _div_rn(tl.full([BLOCK], 1.0, tl.float32), amax)
        p_addr = tl.load(row + 4)
        v_addr = tl.load(row + 5)
        g_addr = tl.load(grad_ptrs_ptr + t)
        if full:
            _gravity_update(p_addr, g_addr, v_addr, offs, mask, m, lr, beta_hat, one_minus_beta_hat,
                            grad_scale_ptr, MAXIMIZE, P_KIND, S_KIND, ALIGNED, False, HAS_GRAD_SCALE)
        else:
            _gravity_update(p_addr, g_addr, v_addr, offs, mask, m, lr, beta_hat, one_minus_beta_hat,
                            grad_scale_ptr, MAXIMIZE, P_KIND, S_KIND, ALIGNED, True, HAS_GRAD_SCALE)


def _triton_gravity(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], *, lr: float | Tensor,
                    beta_hat: float | Tensor, maximize: bool, grad_scale: Tensor | None = None,
                    found_inf: Tensor | None = None) -> None:
    """Gravity over a (device, dtype) group: reduce, then update; zero-size tensors are skipped. AMP: see
    the module docstring. Device tensors ``lr`` and ``beta_hat`` (capturable) are read by the kernel
    (`multi_tensor.scalar_args`)."""
    for prep in prepare_launches(params, grads, [vs], write_grads=grad_scale is not None):
        table = get_table(prep, BLOCK)
        launch_partials(table, OP_ABSMAX, prep.p_kind, grad_scale=grad_scale, found_inf=found_inf)
        kernel = kernel_for(_gravity_kernel, table.device)
        gs_ptr, fi_ptr, has_gs, has_fi = amp_args(table, grad_scale, found_inf)
        lr_value, lr_ptr, lr_tensor = scalar_args(table, lr)
        bh_value, bh_ptr, bh_tensor = scalar_args(table, beta_hat)
        with device_guard(table.device):
            kernel[(table.n_chunks,)](table.meta, table.grad_ptrs, table.chunks, table.partials, lr_value,
                                      bh_value, 1 - bh_value, lr_ptr, bh_ptr, gs_ptr, fi_ptr,
                                      MAXIMIZE=bool(maximize), P_KIND=prep.p_kind, S_KIND=prep.s_kind,
                                      ALIGNED=table.aligned, ROW=table.row, BLOCK=BLOCK,
                                      MAX_PARTS=table.max_parts, HAS_GRAD_SCALE=has_gs, HAS_FOUND_INF=has_fi,
                                      LR_TENSOR=lr_tensor, BETA_HAT_TENSOR=bh_tensor, num_warps=4)
        prep.finish()
