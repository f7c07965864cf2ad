"""Lion as one Triton launch per (device, dtype) group (docs/spec.md §2; google/automl `lion_pytorch.py`).

Per element, in the reference's op order: ``p·(1 − lr·wd)``, ``c = m·β1 + g·(1 − β1)``,
``p − lr·sign(c)``, ``m·β2 + g·(1 − β2)``. Bytes per element (fp32): read p, g, m, write p, m = 20 B
(+4 B under AMP: the unscaled grad is written back).

AMP (`fused_optim.declaration.mark_amp`): ``g / grad_scale`` in registers, stored back to ``.grad``;
every program does nothing when ``found_inf != 0``; both read on the device.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl
from torch import Tensor

from . import lowbit as lb
from . import multi_tensor as mt

if TYPE_CHECKING:
    from ..lowstate import Rounding

BLOCK = 2048


@mt.device_fn
def _lion_rule(p, g, m, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, DECAY: tl.constexpr):
    """The per-element rule in fp32, in the reference's op order: the new (p, m)."""
    if DECAY:
        p = p * decay
    c = m * beta1 + g * one_minus_beta1
    sign = tl.where(c > 0, 1.0, tl.where(c < 0, -1.0, 0.0))  # sign(0) = 0, like torch.sign
    p = p - lr * sign
    m = m * beta2 + g * one_minus_beta2
    return p, m


@mt.device_fn
def _lion_update(row, g_addr, offs, mask, lr, decay, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, grad_scale_ptr,
                 MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, P_KIND: tl.constexpr, S_KIND: tl.constexpr,
                 ALIGNED: tl.constexpr, MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The rule on one block of fp32-format state."""
    p_addr, p = mt._load_row(row, 0, offs, mask, P_KIND, ALIGNED, MASKED)
    g = mt._load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    m_addr, m = mt._load_row(row, 1, offs, mask, S_KIND, ALIGNED, MASKED)
    p, m = _lion_rule(p, g, m, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, DECAY)
    mt._store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    mt._store_f32(m_addr, offs, m, mask, S_KIND, ALIGNED, MASKED)


@triton.jit
def _lion_kernel(meta_ptr, grad_ptrs_ptr, chunks_ptr, grad_scale_ptr, found_inf_ptr,  # `multi_tensor.Launch`
                 lr, lr_ptr, weight_decay,  # lr (or lr_ptr: LR_TENSOR); weight_decay for decay then
                 decay,  # 1 - lr*wd, computed on the host in double like the reference
                 beta1, one_minus_beta1, beta2, one_minus_beta2,
                 MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, LR_TENSOR: tl.constexpr, P_KIND: tl.constexpr,
                 S_KIND: tl.constexpr, ALIGNED: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    if mt._amp_go(found_inf_ptr, HAS_FOUND_INF):
        lr = mt._scalar(lr, lr_ptr, LR_TENSOR)
        if LR_TENSOR:
            decay = 1.0 - lr * weight_decay  # in fp32 here (the float path rounds the double 1 - lr*wd)
        row, g_addr, offs, mask, full = mt._update_coords(meta_ptr, grad_ptrs_ptr, chunks_ptr, ROW, BLOCK)
        if full:
            _lion_update(row, g_addr, offs, mask, lr, decay, beta1, one_minus_beta1, beta2,
                         one_minus_beta2, grad_scale_ptr, MAXIMIZE, DECAY, P_KIND, S_KIND, ALIGNED, False,
                         HAS_GRAD_SCALE)
        else:
            _lion_update(row, g_addr, offs, mask, lr, decay, beta1, one_minus_beta1, beta2,
                         one_minus_beta2, grad_scale_ptr, MAXIMIZE, DECAY, P_KIND, S_KIND, ALIGNED, True,
                         HAS_GRAD_SCALE)


@mt.device_fn
def _lion_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, seed, step,
                        lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, grad_scale_ptr,
                        MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, P_KIND: tl.constexpr, S_KIND: tl.constexpr,
                        FMT: tl.constexpr, PARAM_SR: tl.constexpr, SIGNED0: tl.constexpr, ALIGNED: tl.constexpr,
                        MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The rule on one tile of whole quantization blocks, state in storage FMT (`kernels.lowbit`)."""
    tensor_index = tl.load(aux_ptr + 2 * t)
    scale0 = tl.load(aux_ptr + 2 * t + 1)
    p_addr, p = mt._load_row(row, 0, offs, mask, P_KIND, ALIGNED, MASKED)
    g = mt._load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    m_addr, m = lb.load_state(row, 1, offs, mask, blk, blk_mask, scale0, mag0_ptr, FMT, S_KIND, SIGNED0, ALIGNED,
                              MASKED)
    p, m = _lion_rule(p, g, m, lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, DECAY)
    if PARAM_SR or FMT == 1:
        r0, r1, _, _ = lb.random_words(seed, step, tensor_index, offs)  # stream 0 the param, 1 the state
    else:
        r0 = 0
        r1 = 0
    lb.store_param(p_addr, offs, p, mask, r0, P_KIND, PARAM_SR, ALIGNED, MASKED)
    lb.store_state(m_addr, offs, m, mask, blk, blk_mask, scale0, thr0_ptr, r1, FMT, S_KIND, SIGNED0, ALIGNED, MASKED)


@triton.jit
def _lion_lowbit_kernel(meta_ptr, grad_ptrs_ptr, chunks_ptr, grad_scale_ptr, found_inf_ptr,  # `multi_tensor.Launch`
                        aux_ptr, mag0_ptr, thr0_ptr, seed, rng_step, rng_step_buf,  # `lowbit.lowbit_launches`
                        lr, lr_ptr, weight_decay, decay, beta1, one_minus_beta1, beta2, one_minus_beta2,
                        MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, LR_TENSOR: tl.constexpr,
                        P_KIND: tl.constexpr, S_KIND: tl.constexpr, FMT: tl.constexpr, PARAM_SR: tl.constexpr,
                        SIGNED0: tl.constexpr, RNG_STEP_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr,
                        ROW: tl.constexpr, BLOCK: tl.constexpr, QB: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                        HAS_FOUND_INF: tl.constexpr):
    """`_lion_kernel` with bf16 / 8-bit state and stochastically rounded bf16 params (docs/lowbit.md §5)."""
    if mt._amp_go(found_inf_ptr, HAS_FOUND_INF):
        lr = mt._scalar(lr, lr_ptr, LR_TENSOR)
        if LR_TENSOR:
            decay = 1.0 - lr * weight_decay
        step = lb.rng_step(rng_step, rng_step_buf, RNG_STEP_ON_DEVICE)
        t, row, offs, mask, blk, blk_mask, full = lb.tile_coords(meta_ptr, chunks_ptr, ROW, BLOCK, QB)
        g_addr = tl.load(grad_ptrs_ptr + t)
        if full:
            _lion_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, seed, step,
                                lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, grad_scale_ptr,
                                MAXIMIZE, DECAY, P_KIND, S_KIND, FMT, PARAM_SR, SIGNED0, ALIGNED, False,
                                HAS_GRAD_SCALE)
        else:
            _lion_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, seed, step,
                                lr, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, grad_scale_ptr,
                                MAXIMIZE, DECAY, P_KIND, S_KIND, FMT, PARAM_SR, SIGNED0, ALIGNED, True,
                                HAS_GRAD_SCALE)


def _triton_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float | Tensor,
                 beta1: float, beta2: float, weight_decay: float, maximize: bool,
                 grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                 lowbit: Rounding | None = None) -> None:
    """Lion over a (device, dtype) group in one launch (a second one only for strided params, see
    `multi_tensor.prepare_launches`); zero-size tensors are skipped. AMP: see the module docstring. A
    device tensor ``lr`` is read by the kernel (`multi_tensor.Launch`). ``lowbit``: bf16 / 8-bit state or
    stochastically rounded bf16 params, in the same single pass (`_lion_lowbit_kernel`)."""
    if lb.uses_lowbit_kernel(params, lowbit):
        for launch, args in lb.lowbit_launches(params, grads, [exp_avgs], lowbit, BLOCK, grad_scale, found_inf):
            lr_s = launch.scalar(lr)
            launch(_lion_lowbit_kernel, **args, lr=lr_s, decay=1 - lr_s.value * weight_decay,
                   weight_decay=float(weight_decay), beta1=float(beta1), one_minus_beta1=1 - beta1,
                   beta2=float(beta2), one_minus_beta2=1 - beta2, MAXIMIZE=bool(maximize), DECAY=weight_decay != 0,
                   SIGNED0=bool(lowbit.signed[0]))
        return
    for launch in mt.update_launches(params, grads, [exp_avgs], BLOCK, grad_scale, found_inf):
        lr_s = launch.scalar(lr)
        launch(_lion_kernel, lr=lr_s, decay=1 - lr_s.value * weight_decay, weight_decay=float(weight_decay),
               beta1=float(beta1), one_minus_beta1=1 - beta1, beta2=float(beta2), one_minus_beta2=1 - beta2,
               MAXIMIZE=bool(maximize), DECAY=weight_decay != 0)
