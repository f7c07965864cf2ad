"""Adan as one Triton launch per (device, dtype) group (docs/spec.md §3; sail-sg `adan.py` op order).

The global clip factor stays on the device: the kernel reads the 0-d fp32 tensor the class computed
(no `.item()`), and ``neg_pre_grad`` (``-clip·g`` of this step, for the next one) is written by the same
kernel, so nothing else touches the grads. Bytes per element (fp32): read p, g, exp_avg, exp_avg_sq,
exp_avg_diff, neg_pre_grad (24 B), write all but g (20 B): 44 B (+4 B under AMP: the unscaled grad is
written back).

AMP (`fused_optim.optimizer.supports_amp`): ``g / grad_scale`` (rounded to the grad's dtype, as torch's
in-place unscale stores it) is the first thing done to g, stored back to ``.grad``, then maximize and
the clip apply as without AMP; every program does nothing when ``found_inf != 0``. The clip factor is
the caller's: with ``max_grad_norm > 0`` the class computes it from the grads before dispatch, so
`FusedOptimizer` unscales them first (one foreach pass, `_reads_grads_before_dispatch`) and this
kernel then gets no grad_scale: the same order, and the same bits, as the foreach path under AMP.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .multi_tensor import (
    _amp_go,
    _chunk_coords,
    _div_rn,
    _div_rn_scalar,
    _load_f32,
    _load_grad,
    _mul_rn,
    _store_f32,
    amp_args,
    device_fn,
    device_guard,
    get_table,
    kernel_for,
    prepare_launches,
    scalar_args,
)

BLOCK = 1024
CLIP_NONE, CLIP_VALUE, CLIP_TENSOR = 0, 1, 2


@device_fn
def _adan_update(row, g_addr, offs, mask, clip, beta1, one_minus_beta1, beta2, one_minus_beta2, beta3,
                 one_minus_beta3, bias_correction3_sqrt, eps, neg_step_size, neg_step_size_diff, decay,
                 grad_scale_ptr, first,
                 MAXIMIZE: tl.constexpr, NO_PROX: tl.constexpr, DECAY: tl.constexpr, CLIP: tl.constexpr,
                 P_KIND: tl.constexpr, S_KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
                 HAS_GRAD_SCALE: tl.constexpr, FIRST_TENSOR: tl.constexpr):
    """sail-sg's per-element op order on one block; ``neg_pre_grad`` is rewritten as ``-clip·g``. With
    FIRST_TENSOR, ``first != 0`` (the group's step is 1, read on the device) starts the difference from
    ``neg_pre_grad = -clip·g`` as the class does on the host otherwise, so ``d`` is exactly 0."""
    p_addr = tl.load(row + 4)
    ea_addr = tl.load(row + 5)
    es_addr = tl.load(row + 6)
    ed_addr = tl.load(row + 7)
    npg_addr = tl.load(row + 8)
    p = _load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    g = _load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    exp_avg = _load_f32(ea_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    exp_avg_sq = _load_f32(es_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    exp_avg_diff = _load_f32(ed_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    npg = _load_f32(npg_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    if CLIP:
        g = _mul_rn(g, clip)  # not contracted into d below: d is exactly 0 at a param's first step
    if FIRST_TENSOR:
        npg = tl.where(first != 0.0, -g, npg)
    d = npg + g                                   # g_k - g_{k-1}
    exp_avg = exp_avg * beta1 + one_minus_beta1 * g
    exp_avg_diff = exp_avg_diff * beta2 + one_minus_beta2 * d
    n = d * beta2 + g
    exp_avg_sq = exp_avg_sq * beta3 + (one_minus_beta3 * n) * n
    denom = _div_rn_scalar(tl.math.sqrt_rn(exp_avg_sq), bias_correction3_sqrt)
    denom = denom + eps
    if NO_PROX and DECAY:
        p = p * decay
    p = p + _div_rn(neg_step_size * exp_avg, denom)          # addcdiv: (value*t1)/t2, in order
    p = p + _div_rn(neg_step_size_diff * exp_avg_diff, denom)
    if DECAY and not NO_PROX:
        p = _div_rn_scalar(p, decay)
    _store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    _store_f32(ea_addr, offs, exp_avg, mask, S_KIND, ALIGNED, MASKED)
    _store_f32(es_addr, offs, exp_avg_sq, mask, S_KIND, ALIGNED, MASKED)
    _store_f32(ed_addr, offs, exp_avg_diff, mask, S_KIND, ALIGNED, MASKED)
    _store_f32(npg_addr, offs, -g, mask, S_KIND, ALIGNED, MASKED)


@triton.jit
def _adan_kernel(
    meta_ptr,          # int64 [n, ROW]: numel, (reduction slots), addresses of p, exp_avg, exp_avg_sq,
                       # exp_avg_diff, neg_pre_grad
    grad_ptrs_ptr,     # int64 [n]: grad addresses, refreshed every step
    chunks_ptr,        # int32 [n_chunks, 2]: (tensor, chunk) of each program
    clip_ptr,          # fp32 0-d: the global clip factor on the device (read when CLIP == 2)
    clip_value,        # fp32: the clip factor as a number (used when CLIP == 1)
    beta1, one_minus_beta1,            # fp32 runtime args: no recompile when they change
    beta2, one_minus_beta2,
    beta3, one_minus_beta3,
    bias_correction3_sqrt,
    eps,
    neg_step_size,                     # -lr / bias_correction1
    neg_step_size_diff,                # -lr * beta2 / bias_correction2
    decay,                             # no_prox: 1 - lr*wd (multiply first); else 1 + lr*wd (divide last)
    bias_correction1,                  # for the three above when lr or the corrections are read on the device
    bias_correction2,
    weight_decay,
    lr,
    lr_ptr,                            # fp32 0-d: lr on the device (read when LR_TENSOR)
    bc1_ptr,                           # fp32 0-d each: the bias corrections 1, 2 and sqrt(3) on the device
    bc2_ptr,                           # (capturable: computed there from the step counter), read when
    bc3_sqrt_ptr,                      # BC_TENSOR
    first_ptr,                         # fp32 0-d: 1.0 at the group's first step (read when FIRST_TENSOR)
    grad_scale_ptr,                    # fp32 0-d: AMP's loss scale (read when HAS_GRAD_SCALE)
    found_inf_ptr,                     # fp32 0-d: AMP's inf flag; nonzero skips the step (HAS_FOUND_INF)
    MAXIMIZE: tl.constexpr,
    NO_PROX: tl.constexpr,
    DECAY: tl.constexpr,               # weight_decay != 0
    CLIP: tl.constexpr,                # 0: no clip, 1: clip_value, 2: clip_ptr
    P_KIND: tl.constexpr,              # dtype code of params and grads (0 fp32, 1 fp16, 2 bf16)
    S_KIND: tl.constexpr,              # dtype code of the four state tensors
    ALIGNED: tl.constexpr,             # every address 16-byte aligned: vector accesses
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    LR_TENSOR: tl.constexpr,
    BC_TENSOR: tl.constexpr,
    FIRST_TENSOR: tl.constexpr,
):
    if _amp_go(found_inf_ptr, HAS_FOUND_INF):
        if LR_TENSOR or BC_TENSOR:
            # the float path's host scalars, in fp32 here (it rounds double results once)
            if LR_TENSOR:
                neg_lr = -tl.load(lr_ptr)
                if NO_PROX:
                    decay = 1.0 + neg_lr * weight_decay
                else:
                    decay = 1.0 - neg_lr * weight_decay
            else:
                neg_lr = -lr
            if BC_TENSOR:
                bias_correction1 = tl.load(bc1_ptr)
                bias_correction2 = tl.load(bc2_ptr)
                bias_correction3_sqrt = tl.load(bc3_sqrt_ptr)
            neg_step_size = _div_rn_scalar(neg_lr, bias_correction1)
            neg_step_size_diff = _div_rn_scalar(neg_lr * beta2, bias_correction2)
        if FIRST_TENSOR:
            first = tl.load(first_ptr)
        else:
            first = 0.0
        t, row, offs, mask, full = _chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
        g_addr = tl.load(grad_ptrs_ptr + t)
        if CLIP == 2:
            clip = tl.load(clip_ptr)
        else:
            clip = clip_value
        if full:
            _adan_update(row, g_addr, offs, mask, clip, beta1, one_minus_beta1, beta2, one_minus_beta2,
                         beta3, one_minus_beta3, bias_correction3_sqrt, eps, neg_step_size,
                         neg_step_size_diff, decay, grad_scale_ptr, first, MAXIMIZE, NO_PROX, DECAY, CLIP != 0,
                         P_KIND, S_KIND, ALIGNED, False, HAS_GRAD_SCALE, FIRST_TENSOR)
        else:
            _adan_update(row, g_addr, offs, mask, clip, beta1, one_minus_beta1, beta2, one_minus_beta2,
                         beta3, one_minus_beta3, bias_correction3_sqrt, eps, neg_step_size,
                         neg_step_size_diff, decay, grad_scale_ptr, first, MAXIMIZE, NO_PROX, DECAY, CLIP != 0,
                         P_KIND, S_KIND, ALIGNED, True, HAS_GRAD_SCALE, FIRST_TENSOR)


def _triton_adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 exp_avg_diffs: list[Tensor], neg_pre_grads: list[Tensor], *, lr: float | Tensor,
                 beta1: float, beta2: float, beta3: float, bias_correction1: float | Tensor,
                 bias_correction2: float | Tensor, bias_correction3_sqrt: float | Tensor, eps: float,
                 weight_decay: float, no_prox: bool, clip: float | Tensor, maximize: bool,
                 grad_scale: Tensor | None = None, found_inf: Tensor | None = None,
                 first_step: Tensor | None = None) -> None:
    """Adan over a (device, dtype) group in one launch; `clip` is read on the device when a tensor. AMP:
    see the module docstring. Device tensors ``lr``, the bias corrections and ``first_step`` (capturable:
    1.0 at the group's first step, when the class leaves ``neg_pre_grad`` to the kernel) are read by the
    kernel (`multi_tensor.scalar_args`)."""
    if len({isinstance(b, Tensor) for b in (bias_correction1, bias_correction2, bias_correction3_sqrt)}) > 1:
        raise TypeError("Triton Adan: pass the three bias corrections all as floats or all as 0-d tensors")
    for prep in prepare_launches(params, grads, [exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads],
                                 write_grads=grad_scale is not None):
        table = get_table(prep, BLOCK)
        kernel = kernel_for(_adan_kernel, table.device)
        gs_ptr, fi_ptr, has_gs, has_fi = amp_args(table, grad_scale, found_inf)
        lr_value, lr_ptr, lr_tensor = scalar_args(table, lr)
        bc1, bc1_ptr, bc_tensor = scalar_args(table, bias_correction1)
        bc2, bc2_ptr, _ = scalar_args(table, bias_correction2)
        bc3_sqrt, bc3_ptr, _ = scalar_args(table, bias_correction3_sqrt)
        _, first_ptr, first_tensor = scalar_args(table, 0.0 if first_step is None else first_step)
        if isinstance(clip, Tensor):
            clip_mode, clip_value = CLIP_TENSOR, 1.0
            clip_tensor = clip.detach().to(device=table.device, dtype=torch.float32)  # no-op when already so
        else:
            clip_mode = CLIP_NONE if clip == 1.0 else CLIP_VALUE
            clip_value, clip_tensor = float(clip), table.partials  # any fp32 pointer; never read
        decay = 1 - lr_value * weight_decay if no_prox else 1 + lr_value * weight_decay
        with device_guard(table.device):
            kernel[(table.n_chunks,)](
                table.meta, table.grad_ptrs, table.chunks, clip_tensor, clip_value,
                float(beta1), 1 - beta1, float(beta2), 1 - beta2, float(beta3), 1 - beta3,
                bc3_sqrt, float(eps), -lr_value / bc1 if not bc_tensor else 0.0,
                -lr_value * beta2 / bc2 if not bc_tensor else 0.0, decay, bc1, bc2,
                float(weight_decay), lr_value, lr_ptr, bc1_ptr, bc2_ptr, bc3_ptr, first_ptr, gs_ptr, fi_ptr,
                MAXIMIZE=bool(maximize), NO_PROX=bool(no_prox), DECAY=weight_decay != 0, CLIP=clip_mode,
                P_KIND=prep.p_kind, S_KIND=prep.s_kind, ALIGNED=table.aligned, ROW=table.row, BLOCK=BLOCK,
                HAS_GRAD_SCALE=has_gs, HAS_FOUND_INF=has_fi, LR_TENSOR=lr_tensor, BC_TENSOR=bc_tensor,
                FIRST_TENSOR=first_tensor, num_warps=4)
        prep.finish()
