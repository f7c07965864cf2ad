"""Adan as one Triton launch per (device, dtype) group (docs/spec.md §3; sail-sg `adan.py` op order).

The global clip factor stays on the device: the kernel reads the 0-d fp32 tensor the class computed
(no `.item()`), and ``neg_pre_grad`` (``-clip·g`` of this step, for the next one) is written by the same
kernel, so nothing else touches the grads. Bytes per element (fp32): read p, g, exp_avg, exp_avg_sq,
exp_avg_diff, neg_pre_grad (24 B), write all but g (20 B): 44 B (+4 B under AMP: the unscaled grad is
written back).

AMP (`fused_optim.declaration.mark_amp`): ``g / grad_scale`` (rounded to the grad's dtype, as torch's
in-place unscale stores it) is the first thing done to g, stored back to ``.grad``, then maximize and
the clip apply as without AMP; every program does nothing when ``found_inf != 0``. The clip factor is
the caller's: with ``max_grad_norm > 0`` the class computes it from the grads before dispatch, so
`FusedOptimizer` unscales them first (one foreach pass, `_reads_grads_before_dispatch`) and this
kernel then gets no grad_scale: the same order, and the same bits, as the foreach path under AMP.
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

BLOCK = 1024


@mt.device_fn
def _adan_rule(p, g, exp_avg, exp_avg_sq, exp_avg_diff, npg, clip, beta1, one_minus_beta1, beta2, one_minus_beta2,
               beta3, one_minus_beta3, bias_correction3_sqrt, eps, neg_step_size, neg_step_size_diff, decay, first,
               NO_PROX: tl.constexpr, DECAY: tl.constexpr, CLIP: tl.constexpr, FIRST_STEP: tl.constexpr):
    """sail-sg's per-element op order in fp32: the new (p, exp_avg, exp_avg_sq, exp_avg_diff,
    neg_pre_grad = -clip·g). With FIRST_STEP, ``first != 0`` (the group's step is 1, capturable: read on
    the device) starts the difference from ``neg_pre_grad = -clip·g`` as the class does on the host
    otherwise, so ``d`` is exactly 0."""
    if CLIP:
        g = mt._mul_rn(g, clip)  # not contracted into d below: d is exactly 0 at a param's first step
    if FIRST_STEP:
        npg = tl.where(first != 0.0, -g, npg)
    d = npg + g                                   # g_k - g_{k-1}
    exp_avg = exp_avg * beta1 + one_minus_beta1 * g
    exp_avg_diff = exp_avg_diff * beta2 + one_minus_beta2 * d
    n = d * beta2 + g
    exp_avg_sq = exp_avg_sq * beta3 + (one_minus_beta3 * n) * n
    denom = mt._div_rn_scalar(tl.math.sqrt_rn(exp_avg_sq), bias_correction3_sqrt)
    denom = denom + eps
    if NO_PROX and DECAY:
        p = p * decay
    p = p + mt._div_rn(neg_step_size * exp_avg, denom)          # addcdiv: (value*t1)/t2, in order
    p = p + mt._div_rn(neg_step_size_diff * exp_avg_diff, denom)
    if DECAY and not NO_PROX:
        p = mt._div_rn_scalar(p, decay)
    return p, exp_avg, exp_avg_sq, exp_avg_diff, -g


@mt.device_fn
def _adan_update(row, g_addr, offs, mask, clip, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3,
                 one_minus_beta3, bias_correction3_sqrt, eps, neg_step_size, neg_step_size_diff, decay,
                 grad_scale_ptr, first,
                 MAXIMIZE: tl.constexpr, NO_PROX: tl.constexpr, DECAY: tl.constexpr, CLIP: tl.constexpr,
                 P_KIND: tl.constexpr, S_KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, FIRST_STEP: tl.constexpr):
    """`_adan_rule` on one block of fp32-format state; ``neg_pre_grad`` is rewritten as ``-clip·g``."""
    p_addr, p = mt._load_row(row, 0, offs, mask, P_KIND, ALIGNED, MASKED)
    g = mt._load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    ea_addr, exp_avg = mt._load_row(row, 1, offs, mask, S_KIND, ALIGNED, MASKED)
    es_addr, exp_avg_sq = mt._load_row(row, 2, offs, mask, S_KIND, ALIGNED, MASKED)
    ed_addr, exp_avg_diff = mt._load_row(row, 3, offs, mask, S_KIND, ALIGNED, MASKED)
    npg_addr, npg = mt._load_row(row, 4, offs, mask, S_KIND, ALIGNED, MASKED)
    p, exp_avg, exp_avg_sq, exp_avg_diff, npg = _adan_rule(
        p, g, exp_avg, exp_avg_sq, exp_avg_diff, npg, clip, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3,
        one_minus_beta3, bias_correction3_sqrt, eps, neg_step_size, neg_step_size_diff, decay, first, NO_PROX,
        DECAY, CLIP, FIRST_STEP)
    mt._store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    mt._store_f32(ea_addr, offs, exp_avg, mask, S_KIND, ALIGNED, MASKED)
    mt._store_f32(es_addr, offs, exp_avg_sq, mask, S_KIND, ALIGNED, MASKED)
    mt._store_f32(ed_addr, offs, exp_avg_diff, mask, S_KIND, ALIGNED, MASKED)
    mt._store_f32(npg_addr, offs, npg, mask, S_KIND, ALIGNED, MASKED)


@mt.device_fn
def _adan_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, mag1_ptr, thr1_ptr,
                        mag2_ptr, thr2_ptr, mag3_ptr, thr3_ptr, seed, step, clip, beta1, one_minus_beta1, beta2,
                        one_minus_beta2, beta3, one_minus_beta3, bias_correction3_sqrt, eps, neg_step_size,
                        neg_step_size_diff, decay, grad_scale_ptr, first,
                        MAXIMIZE: tl.constexpr, NO_PROX: tl.constexpr, DECAY: tl.constexpr, CLIP: tl.constexpr,
                        P_KIND: tl.constexpr, S_KIND: tl.constexpr, FMT: tl.constexpr, PARAM_SR: tl.constexpr,
                        SIGNED0: tl.constexpr, SIGNED1: tl.constexpr, SIGNED2: tl.constexpr, SIGNED3: tl.constexpr,
                        ALIGNED: tl.constexpr, MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                        FIRST_STEP: tl.constexpr):
    """`_adan_rule` on one tile of whole quantization blocks, state in storage FMT (`kernels.lowbit`)."""
    aux = aux_ptr + 5 * t  # tensor index, then the four states' absmax addresses
    tensor_index = tl.load(aux)
    s0 = tl.load(aux + 1)
    s1 = tl.load(aux + 2)
    s2 = tl.load(aux + 3)
    s3 = tl.load(aux + 4)
    p_addr, p = mt._load_row(row, 0, offs, mask, P_KIND, ALIGNED, MASKED)
    g = mt._load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    ea_addr, exp_avg = lb.load_state(row, 1, offs, mask, blk, blk_mask, s0, mag0_ptr, FMT, S_KIND, SIGNED0,
                                     ALIGNED, MASKED)
    es_addr, exp_avg_sq = lb.load_state(row, 2, offs, mask, blk, blk_mask, s1, mag1_ptr, FMT, S_KIND, SIGNED1,
                                        ALIGNED, MASKED)
    ed_addr, exp_avg_diff = lb.load_state(row, 3, offs, mask, blk, blk_mask, s2, mag2_ptr, FMT, S_KIND, SIGNED2,
                                          ALIGNED, MASKED)
    npg_addr, npg = lb.load_state(row, 4, offs, mask, blk, blk_mask, s3, mag3_ptr, FMT, S_KIND, SIGNED3, ALIGNED,
                                  MASKED)
    p, exp_avg, exp_avg_sq, exp_avg_diff, npg = _adan_rule(
        p, g, exp_avg, exp_avg_sq, exp_avg_diff, npg, clip, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3,
        one_minus_beta3, bias_correction3_sqrt, eps, neg_step_size, neg_step_size_diff, decay, first, NO_PROX,
        DECAY, CLIP, FIRST_STEP)
    r0, r1, r2, r3, r4 = lb.five_stream_words(seed, step, tensor_index, offs, PARAM_SR, FMT)
    lb.store_param(p_addr, offs, p, mask, r0, P_KIND, PARAM_SR, ALIGNED, MASKED)
    lb.store_state(ea_addr, offs, exp_avg, mask, blk, blk_mask, s0, thr0_ptr, r1, FMT, S_KIND, SIGNED0, ALIGNED,
                   MASKED)
    lb.store_state(es_addr, offs, exp_avg_sq, mask, blk, blk_mask, s1, thr1_ptr, r2, FMT, S_KIND, SIGNED1, ALIGNED,
                   MASKED)
    lb.store_state(ed_addr, offs, exp_avg_diff, mask, blk, blk_mask, s2, thr2_ptr, r3, FMT, S_KIND, SIGNED2,
                   ALIGNED, MASKED)
    lb.store_state(npg_addr, offs, npg, mask, blk, blk_mask, s3, thr3_ptr, r4, FMT, S_KIND, SIGNED3, ALIGNED,
                   MASKED)


@triton.jit
def _adan_kernel(
    meta_ptr, grad_ptrs_ptr, chunks_ptr, grad_scale_ptr, found_inf_ptr,  # `multi_tensor.Launch`
    clip, clip_ptr,                    # the global clip factor (CLIP_TENSOR: the class's device tensor)
    beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3,
    bias_correction3_sqrt, bias_correction3_sqrt_ptr, eps,
    neg_step_size,                     # -lr / bias_correction1
    neg_step_size_diff,                # -lr * beta2 / bias_correction2
    decay,                             # no_prox: 1 - lr*wd (multiply first); else 1 + lr*wd (divide last)
    bias_correction1, bias_correction1_ptr,  # for the three above when lr or the corrections are read on
    bias_correction2, bias_correction2_ptr,  # the device (capturable: computed there from the step counter)
    weight_decay, lr, lr_ptr,
    first_step, first_step_ptr,        # nonzero at the group's first step (read when FIRST_STEP)
    MAXIMIZE: tl.constexpr, NO_PROX: tl.constexpr,
    DECAY: tl.constexpr,               # weight_decay != 0
    CLIP: tl.constexpr,                # multiply g by the clip factor (off: clip == 1.0, a float)
    FIRST_STEP: tl.constexpr,          # the caller passed first_step (capturable)
    CLIP_TENSOR: tl.constexpr, LR_TENSOR: tl.constexpr, BIAS_CORRECTION1_TENSOR: tl.constexpr,
    BIAS_CORRECTION2_TENSOR: tl.constexpr, BIAS_CORRECTION3_SQRT_TENSOR: tl.constexpr,
    FIRST_STEP_TENSOR: tl.constexpr, P_KIND: tl.constexpr, S_KIND: tl.constexpr, ALIGNED: tl.constexpr,
    ROW: tl.constexpr, BLOCK: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
):
    if mt._amp_go(found_inf_ptr, HAS_FOUND_INF):
        if LR_TENSOR or BIAS_CORRECTION1_TENSOR:  # the three corrections are all tensors or none
            # the float path's host scalars, in fp32 here (it rounds double results once)
            neg_lr = -mt._scalar(lr, lr_ptr, LR_TENSOR)
            if LR_TENSOR:
                if NO_PROX:
                    decay = 1.0 + neg_lr * weight_decay
                else:
                    decay = 1.0 - neg_lr * weight_decay
            bias_correction1 = mt._scalar(bias_correction1, bias_correction1_ptr, BIAS_CORRECTION1_TENSOR)
            bias_correction2 = mt._scalar(bias_correction2, bias_correction2_ptr, BIAS_CORRECTION2_TENSOR)
            bias_correction3_sqrt = mt._scalar(bias_correction3_sqrt, bias_correction3_sqrt_ptr,
                                            BIAS_CORRECTION3_SQRT_TENSOR)
            neg_step_size = mt._div_rn_scalar(neg_lr, bias_correction1)
            neg_step_size_diff = mt._div_rn_scalar(neg_lr * beta2, bias_correction2)
        first = mt._scalar(first_step, first_step_ptr, FIRST_STEP_TENSOR)
        row, g_addr, offs, mask, full = mt._update_coords(meta_ptr, grad_ptrs_ptr, chunks_ptr, ROW, BLOCK)
        clip = mt._scalar(clip, clip_ptr, CLIP_TENSOR)
        if full:
            _adan_update(row, g_addr, offs, mask, clip, beta1, one_minus_beta1, beta2, one_minus_beta2,
                         beta3, one_minus_beta3, bias_correction3_sqrt, eps, neg_step_size,
                         neg_step_size_diff, decay, grad_scale_ptr, first, MAXIMIZE, NO_PROX, DECAY, CLIP,
                         P_KIND, S_KIND, ALIGNED, False, HAS_GRAD_SCALE, FIRST_STEP)
        else:
            _adan_update(row, g_addr, offs, mask, clip, beta1, one_minus_beta1, beta2, one_minus_beta2,
                         beta3, one_minus_beta3, bias_correction3_sqrt, eps, neg_step_size,
                         neg_step_size_diff, decay, grad_scale_ptr, first, MAXIMIZE, NO_PROX, DECAY, CLIP,
                         P_KIND, S_KIND, ALIGNED, True, HAS_GRAD_SCALE, FIRST_STEP)


@triton.jit
def _adan_lowbit_kernel(
    meta_ptr, grad_ptrs_ptr, chunks_ptr, grad_scale_ptr, found_inf_ptr,  # `multi_tensor.Launch`
    aux_ptr, mag0_ptr, thr0_ptr, mag1_ptr, thr1_ptr, mag2_ptr, thr2_ptr, mag3_ptr, thr3_ptr,  # `lowbit.lowbit_launches`
    seed, rng_step, rng_step_buf,
    clip, clip_ptr,                    # the global clip factor (CLIP_TENSOR: the class's device tensor)
    beta1, one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3,
    bias_correction3_sqrt, bias_correction3_sqrt_ptr, eps,
    neg_step_size,                     # -lr / bias_correction1
    neg_step_size_diff,                # -lr * beta2 / bias_correction2
    decay,                             # no_prox: 1 - lr*wd (multiply first); else 1 + lr*wd (divide last)
    bias_correction1, bias_correction1_ptr,  # for the three above when lr or the corrections are read on
    bias_correction2, bias_correction2_ptr,  # the device (capturable: computed there from the step counter)
    weight_decay, lr, lr_ptr,
    first_step, first_step_ptr,        # nonzero at the group's first step (read when FIRST_STEP)
    MAXIMIZE: tl.constexpr, NO_PROX: tl.constexpr,
    DECAY: tl.constexpr,               # weight_decay != 0
    CLIP: tl.constexpr,                # multiply g by the clip factor (off: clip == 1.0, a float)
    FIRST_STEP: tl.constexpr,          # the caller passed first_step (capturable)
    CLIP_TENSOR: tl.constexpr, LR_TENSOR: tl.constexpr, BIAS_CORRECTION1_TENSOR: tl.constexpr,
    BIAS_CORRECTION2_TENSOR: tl.constexpr, BIAS_CORRECTION3_SQRT_TENSOR: tl.constexpr,
    FIRST_STEP_TENSOR: tl.constexpr, P_KIND: tl.constexpr, S_KIND: tl.constexpr, ALIGNED: tl.constexpr,
    ROW: tl.constexpr, BLOCK: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    FMT: tl.constexpr, PARAM_SR: tl.constexpr, SIGNED0: tl.constexpr, SIGNED1: tl.constexpr, SIGNED2: tl.constexpr,
    SIGNED3: tl.constexpr, RNG_STEP_ON_DEVICE: tl.constexpr, QB: tl.constexpr,
):
    """`_adan_kernel` with bf16 / 8-bit state and stochastically rounded bf16 params (docs/lowbit.md §5)."""
    if mt._amp_go(found_inf_ptr, HAS_FOUND_INF):
        if LR_TENSOR or BIAS_CORRECTION1_TENSOR:  # the three corrections are all tensors or none
            # the float path's host scalars, in fp32 here (it rounds double results once)
            neg_lr = -mt._scalar(lr, lr_ptr, LR_TENSOR)
            if LR_TENSOR:
                if NO_PROX:
                    decay = 1.0 + neg_lr * weight_decay
                else:
                    decay = 1.0 - neg_lr * weight_decay
            bias_correction1 = mt._scalar(bias_correction1, bias_correction1_ptr, BIAS_CORRECTION1_TENSOR)
            bias_correction2 = mt._scalar(bias_correction2, bias_correction2_ptr, BIAS_CORRECTION2_TENSOR)
            bias_correction3_sqrt = mt._scalar(bias_correction3_sqrt, bias_correction3_sqrt_ptr,
                                            BIAS_CORRECTION3_SQRT_TENSOR)
            neg_step_size = mt._div_rn_scalar(neg_lr, bias_correction1)
            neg_step_size_diff = mt._div_rn_scalar(neg_lr * beta2, bias_correction2)
        first = mt._scalar(first_step, first_step_ptr, FIRST_STEP_TENSOR)
        step = lb.rng_step(rng_step, rng_step_buf, RNG_STEP_ON_DEVICE)
        t, row, offs, mask, blk, blk_mask, full = lb.tile_coords(meta_ptr, chunks_ptr, ROW, BLOCK, QB)
        g_addr = tl.load(grad_ptrs_ptr + t)
        clip = mt._scalar(clip, clip_ptr, CLIP_TENSOR)
        if full:
            _adan_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, mag1_ptr,
                                thr1_ptr, mag2_ptr, thr2_ptr, mag3_ptr, thr3_ptr, seed, step, clip, beta1,
                                one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3,
                                bias_correction3_sqrt, eps, neg_step_size, neg_step_size_diff, decay, grad_scale_ptr,
                                first, MAXIMIZE, NO_PROX, DECAY, CLIP, P_KIND, S_KIND, FMT, PARAM_SR, SIGNED0,
                                SIGNED1, SIGNED2, SIGNED3, ALIGNED, False, HAS_GRAD_SCALE, FIRST_STEP)
        else:
            _adan_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, mag1_ptr,
                                thr1_ptr, mag2_ptr, thr2_ptr, mag3_ptr, thr3_ptr, seed, step, clip, beta1,
                                one_minus_beta1, beta2, one_minus_beta2, beta3, one_minus_beta3,
                                bias_correction3_sqrt, eps, neg_step_size, neg_step_size_diff, decay, grad_scale_ptr,
                                first, MAXIMIZE, NO_PROX, DECAY, CLIP, P_KIND, S_KIND, FMT, PARAM_SR, SIGNED0,
                                SIGNED1, SIGNED2, SIGNED3, ALIGNED, True, HAS_GRAD_SCALE, FIRST_STEP)


def _triton_adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 exp_avg_diffs: list[Tensor], neg_pre_grads: list[Tensor], *, lr: float | Tensor,
                 beta1: float, beta2: float, beta3: float, bias_correction1: float | Tensor,
                 bias_correction2: float | Tensor, bias_correction3_sqrt: float | Tensor, eps: float,
                 weight_decay: float, no_prox: bool, clip: float | Tensor, maximize: bool,
                 grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                 first_step: Tensor | None = None, lowbit: Rounding | None = None) -> None:
    """Adan over a (device, dtype) group in one launch; `clip` is read on the device when a tensor. AMP:
    see the module docstring. Device tensors ``lr``, the bias corrections and ``first_step`` (capturable:
    1.0 at the group's first step, when the class leaves ``neg_pre_grad`` to the kernel) are read by the
    kernel (`multi_tensor.Launch`). ``lowbit``: bf16 / 8-bit state or stochastically rounded bf16 params, in
    the same single pass (`_adan_lowbit_kernel`)."""
    if len({isinstance(b, Tensor) for b in (bias_correction1, bias_correction2, bias_correction3_sqrt)}) > 1:
        raise TypeError("Triton Adan: pass the three bias corrections all as floats or all as 0-d tensors")
    states = [exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads]
    if lb.uses_lowbit_kernel(params, lowbit):
        signed = {f"SIGNED{j}": bool(lowbit.signed[j]) for j in range(len(states))}
        for launch, low_args in lb.lowbit_launches(params, grads, states, lowbit, BLOCK, grad_scale, found_inf):
            launch(_adan_lowbit_kernel, **_launch_args(launch, lr, beta1, beta2, beta3, bias_correction1,
                                                       bias_correction2, bias_correction3_sqrt, eps, weight_decay,
                                                       no_prox, clip, maximize, first_step), **low_args, **signed)
        return
    for launch in mt.update_launches(params, grads, states, BLOCK, grad_scale, found_inf):
        launch(_adan_kernel, **_launch_args(launch, lr, beta1, beta2, beta3, bias_correction1, bias_correction2,
                                            bias_correction3_sqrt, eps, weight_decay, no_prox, clip, maximize,
                                            first_step))


def _launch_args(launch: mt.Launch, lr, beta1, beta2, beta3, bias_correction1, bias_correction2,
                 bias_correction3_sqrt, eps, weight_decay, no_prox, clip, maximize, first_step) -> dict:
    """The scalar arguments both Adan kernels take, for `launch`'s device."""
    scalar = launch.scalar
    lr_s, bc1, bc2, clip_s = scalar(lr), scalar(bias_correction1), scalar(bias_correction2), scalar(clip)
    lr_v = lr_s.value  # host doubles below; the kernel recomputes them from any tensor it reads
    return {"lr": lr_s, "bias_correction1": bc1, "bias_correction2": bc2,
            "bias_correction3_sqrt": bias_correction3_sqrt, "eps": float(eps),
            "neg_step_size": -lr_v / bc1.value, "neg_step_size_diff": -lr_v * beta2 / bc2.value,
            "decay": 1 - lr_v * weight_decay if no_prox else 1 + lr_v * weight_decay,
            "weight_decay": float(weight_decay), "clip": clip_s,
            "CLIP": clip_s.tensor is not None or clip_s.value != 1.0,
            "first_step": 0.0 if first_step is None else first_step, "FIRST_STEP": first_step is not None,
            "beta1": float(beta1), "one_minus_beta1": 1 - beta1, "beta2": float(beta2), "one_minus_beta2": 1 - beta2,
            "beta3": float(beta3), "one_minus_beta3": 1 - beta3, "MAXIMIZE": bool(maximize),
            "NO_PROX": bool(no_prox), "DECAY": weight_decay != 0}
