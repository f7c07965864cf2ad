"""Lion as one Triton launch per (device, dtype) group (docs/spec.md §2; google/automl `lion_pytorch.py`).

Per element, in the reference's op order: ``p·(1 − lr·wd)``, ``c = m·β1 + g·(1 − β1)``,
``p − lr·sign(c)``, ``m·β2 + g·(1 − β2)``. Bytes per element (fp32): read p, g, m, write p, m = 20 B
(+4 B under AMP: the unscaled grad is written back).

AMP (`fused_optim.optimizer.supports_amp`): ``g / grad_scale`` in registers, stored back to ``.grad``;
every program does nothing when ``found_inf != 0``; both read on the device.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import (
    _amp_go,
    _chunk_coords,
    _load_f32,
    _load_grad,
    _store_f32,
    amp_args,
    device_fn,
    device_guard,
    get_table,
    kernel_for,
    lr_args,
    prepare_launches,
)

BLOCK = 2048


@device_fn
def _lion_update(p_addr, g_addr, m_addr, offs, mask, lr, decay, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, grad_scale_ptr,
                 MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, P_KIND: tl.constexpr, S_KIND: tl.constexpr,
                 ALIGNED: tl.constexpr, MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The per-element rule, in the reference's op order, on one block."""
    p = _load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    g = _load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    m = _load_f32(m_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    if DECAY:
        p = p * decay
    c = m * beta1 + g * one_minus_beta1
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))  # sign(0) = 0, like torch.sign
    p = p - lr * sign
    m = m * beta2 + g * one_minus_beta2
    _store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    _store_f32(m_addr, offs, m, mask, S_KIND, ALIGNED, MASKED)


@triton.jit
def _lion_kernel(
    meta_ptr,         # int64 [n, ROW]: numel, (reduction slots), param address, exp_avg address
    grad_ptrs_ptr,    # int64 [n]: grad addresses, refreshed every step
    chunks_ptr,       # int32 [n_chunks, 2]: (tensor, chunk) of each program
    lr,               # fp32 runtime args: a scheduler changing them never recompiles
    decay,            # 1 - lr*wd, computed on the host in double like the reference
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    weight_decay,     # for decay = 1 - lr*wd when lr is read on the device (LR_TENSOR)
    lr_ptr,           # fp32 0-d: lr on the device, read instead of `lr` when LR_TENSOR
    grad_scale_ptr,   # fp32 0-d: AMP's loss scale (read when HAS_GRAD_SCALE)
    found_inf_ptr,    # fp32 0-d: AMP's inf flag; nonzero skips the step (read when HAS_FOUND_INF)
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,      # weight_decay != 0 (skips a multiply by exactly 1 otherwise)
    P_KIND: tl.constexpr,     # dtype code of params and grads (0 fp32, 1 fp16, 2 bf16)
    S_KIND: tl.constexpr,     # dtype code of exp_avg
    ALIGNED: tl.constexpr,    # every address 16-byte aligned: vector accesses
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_TENSOR: tl.constexpr,
):
    if _amp_go(found_inf_ptr, HAS_FOUND_INF):
        if LR_TENSOR:
            lr = tl.load(lr_ptr)
            decay = 1.0 - lr * weight_decay  # in fp32 here (the float path rounds the double 1 - lr*wd)
        t, row, offs, mask, full = _chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
        p_addr = tl.load(row + 4)
        m_addr = tl.load(row + 5)
        g_addr = tl.load(grad_ptrs_ptr + t)
        if full:
            _lion_update(p_addr, g_addr, m_addr, offs, mask, lr, decay, beta1, one_minus_beta1, beta2,
                         one_minus_beta2, grad_scale_ptr, MAXIMIZE, DECAY, P_KIND, S_KIND, ALIGNED, False,
                         HAS_GRAD_SCALE)
        else:
            _lion_update(p_addr, g_addr, m_addr, offs, mask, lr, decay, beta1, one_minus_beta1, beta2,
                         one_minus_beta2, grad_scale_ptr, MAXIMIZE, DECAY, P_KIND, S_KIND, ALIGNED, True,
                         HAS_GRAD_SCALE)


def _triton_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float | Tensor,
                 beta1: float, beta2: float, weight_decay: float, maximize: bool,
                 grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    """Lion over a (device, dtype) group in one launch (a second one only for strided params, see
    `prepare_launches`); zero-size tensors are skipped. AMP: see the module docstring. A device tensor
    ``lr`` is read by the kernel (`multi_tensor.lr_args`)."""
    for prep in prepare_launches(params, grads, [exp_avgs], write_grads=grad_scale is not None):
        table = get_table(prep, BLOCK)
        kernel = kernel_for(_lion_kernel, table.device)
        gs_ptr, fi_ptr, has_gs, has_fi = amp_args(table, grad_scale, found_inf)
        lr_value, lr_ptr, lr_tensor = lr_args(table, lr)
        with device_guard(table.device):
            kernel[(table.n_chunks,)](table.meta, table.grad_ptrs, table.chunks, lr_value,
                                      1 - lr_value * weight_decay, float(beta1), 1 - beta1, float(beta2),
                                      1 - beta2, float(weight_decay), lr_ptr, gs_ptr, fi_ptr,
                                      MAXIMIZE=bool(maximize), DECAY=weight_decay != 0, P_KIND=prep.p_kind,
                                      S_KIND=prep.s_kind, ALIGNED=table.aligned, ROW=table.row, BLOCK=BLOCK,
                                      HAS_GRAD_SCALE=has_gs, HAS_FOUND_INF=has_fi, LR_TENSOR=lr_tensor,
                                      num_warps=4)
        prep.finish()
