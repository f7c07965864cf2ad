"""NeuroOptima's core update as one Triton launch per (device, dtype) group (docs/spec.md §7).

Per element, in the reference's op order (`fused_optim.neuro_optima._forloop_neuro_optima`): coupled L2
``g + wd·p``, ``d = g − prev_grad``, the three moments, ``p − lr·sign((m + b2·m_diff) / (sqrt(v) + eps))``,
``prev_grad = g``. SAM's perturb/restore and the Lookahead sync around it are separate multi-tensor
passes (they need the closure in between). Bytes per element (fp32): read p, g, exp_avg, exp_avg_sq,
exp_avg_diff, prev_grad (24 B), write all but g (20 B): 44 B.

Low-precision moments (docs/lowbit.md §5): `_neuro_optima_lowbit_kernel` runs the same rule
(`_neuro_optima_rule`) on tiles of whole quantization blocks, decoding and encoding the four moments in
the pass (streams: 0 the param, 1 + j moment j).
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
def _neuro_optima_rule(p, g, exp_avg, exp_avg_sq, exp_avg_diff, prev_grad, lr, beta1, one_minus_beta1, beta2,
                       one_minus_beta2, eps, weight_decay, DECAY: tl.constexpr):
    """The per-element rule in fp32, in the reference's op order (g: maximize applied): the new (p, exp_avg,
    exp_avg_sq, exp_avg_diff, prev_grad)."""
    # torch's add(x, alpha=a) is one fused multiply-add on CPU (at::vec::fmadd) and in CUDA builds; an
    # explicit fma gives the same rounding here
    if DECAY:
        g = tl.fma(p, weight_decay, g)            # coupled L2: g.add(p, alpha=wd)
    d = g - prev_grad
    exp_avg = tl.fma(g, one_minus_beta1, exp_avg * beta1)
    exp_avg_diff = tl.fma(d, one_minus_beta2, exp_avg_diff * beta2)
    exp_avg_sq = exp_avg_sq * beta2 + (one_minus_beta2 * g) * g
    denom = tl.math.sqrt_rn(exp_avg_sq) + eps
    u = mt._div_rn(exp_avg + exp_avg_diff * beta2, denom)
    # torch.sign: sign(0) = 0 and sign(NaN) = 0 (CPU and CUDA), so a NaN grad element leaves p as it is
    sign = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
    p = p - lr * sign
    return p, exp_avg, exp_avg_sq, exp_avg_diff, g


@mt.device_fn
def _neuro_optima_update(row, g_addr, offs, mask, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                         weight_decay, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, P_KIND: tl.constexpr,
                         S_KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """The reference's per-element op order on one block."""
    p_addr, p = mt._load_row(row, 0, offs, mask, P_KIND, ALIGNED, MASKED)
    g = mt._load_f32(g_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    ea_addr, exp_avg = mt._load_row(row, 1, offs, mask, S_KIND, ALIGNED, MASKED)
    es_addr, exp_avg_sq = mt._load_row(row, 2, offs, mask, S_KIND, ALIGNED, MASKED)
    ed_addr, exp_avg_diff = mt._load_row(row, 3, offs, mask, S_KIND, ALIGNED, MASKED)
    pg_addr, prev_grad = mt._load_row(row, 4, offs, mask, S_KIND, ALIGNED, MASKED)
    if MAXIMIZE:
        g = -g
    p, exp_avg, exp_avg_sq, exp_avg_diff, prev_grad = _neuro_optima_rule(
        p, g, exp_avg, exp_avg_sq, exp_avg_diff, prev_grad, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
        weight_decay, DECAY)
    mt._store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    mt._store_f32(ea_addr, offs, exp_avg, mask, S_KIND, ALIGNED, MASKED)
    mt._store_f32(es_addr, offs, exp_avg_sq, mask, S_KIND, ALIGNED, MASKED)
    mt._store_f32(ed_addr, offs, exp_avg_diff, mask, S_KIND, ALIGNED, MASKED)
    mt._store_f32(pg_addr, offs, prev_grad, mask, S_KIND, ALIGNED, MASKED)


@triton.jit
def _neuro_optima_kernel(meta_ptr, grad_ptrs_ptr, chunks_ptr,  # `multi_tensor.Launch`
                         lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                         MAXIMIZE: tl.constexpr,
                         DECAY: tl.constexpr,  # weight_decay != 0 (the reference skips the add otherwise)
                         P_KIND: tl.constexpr, S_KIND: tl.constexpr, ALIGNED: tl.constexpr, ROW: tl.constexpr,
                         BLOCK: tl.constexpr):
    row, g_addr, offs, mask, full = mt._update_coords(meta_ptr, grad_ptrs_ptr, chunks_ptr, ROW, BLOCK)
    if full:
        _neuro_optima_update(row, g_addr, offs, mask, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                             weight_decay, MAXIMIZE, DECAY, P_KIND, S_KIND, ALIGNED, False)
    else:
        _neuro_optima_update(row, g_addr, offs, mask, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                             weight_decay, MAXIMIZE, DECAY, P_KIND, S_KIND, ALIGNED, True)


@mt.device_fn
def _neuro_optima_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, mag1_ptr,
                                thr1_ptr, mag2_ptr, thr2_ptr, mag3_ptr, thr3_ptr, seed, step, lr, beta1,
                                one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                                MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, P_KIND: tl.constexpr,
                                S_KIND: tl.constexpr, FMT: tl.constexpr, PARAM_SR: tl.constexpr,
                                SIGNED0: tl.constexpr, SIGNED1: tl.constexpr, SIGNED2: tl.constexpr,
                                SIGNED3: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """`_neuro_optima_rule` on one tile of whole quantization blocks, state in storage FMT (`kernels.lowbit`)."""
    aux = aux_ptr + 5 * t  # tensor index, then the four states' absmax addresses
    tensor_index = tl.load(aux)
    s0 = tl.load(aux + 1)
    s1 = tl.load(aux + 2)
    s2 = tl.load(aux + 3)
    s3 = tl.load(aux + 4)
    p_addr, p = mt._load_row(row, 0, offs, mask, P_KIND, ALIGNED, MASKED)
    g = mt._load_f32(g_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    if MAXIMIZE:
        g = -g
    ea_addr, exp_avg = lb.load_state(row, 1, offs, mask, blk, blk_mask, s0, mag0_ptr, FMT, S_KIND, SIGNED0,
                                     ALIGNED, MASKED)
    es_addr, exp_avg_sq = lb.load_state(row, 2, offs, mask, blk, blk_mask, s1, mag1_ptr, FMT, S_KIND, SIGNED1,
                                        ALIGNED, MASKED)
    ed_addr, exp_avg_diff = lb.load_state(row, 3, offs, mask, blk, blk_mask, s2, mag2_ptr, FMT, S_KIND, SIGNED2,
                                          ALIGNED, MASKED)
    pg_addr, prev_grad = lb.load_state(row, 4, offs, mask, blk, blk_mask, s3, mag3_ptr, FMT, S_KIND, SIGNED3,
                                       ALIGNED, MASKED)
    p, exp_avg, exp_avg_sq, exp_avg_diff, prev_grad = _neuro_optima_rule(
        p, g, exp_avg, exp_avg_sq, exp_avg_diff, prev_grad, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
        weight_decay, DECAY)
    r0, r1, r2, r3, r4 = lb.five_stream_words(seed, step, tensor_index, offs, PARAM_SR, FMT)
    lb.store_param(p_addr, offs, p, mask, r0, P_KIND, PARAM_SR, ALIGNED, MASKED)
    lb.store_state(ea_addr, offs, exp_avg, mask, blk, blk_mask, s0, thr0_ptr, r1, FMT, S_KIND, SIGNED0, ALIGNED,
                   MASKED)
    lb.store_state(es_addr, offs, exp_avg_sq, mask, blk, blk_mask, s1, thr1_ptr, r2, FMT, S_KIND, SIGNED1, ALIGNED,
                   MASKED)
    lb.store_state(ed_addr, offs, exp_avg_diff, mask, blk, blk_mask, s2, thr2_ptr, r3, FMT, S_KIND, SIGNED2,
                   ALIGNED, MASKED)
    lb.store_state(pg_addr, offs, prev_grad, mask, blk, blk_mask, s3, thr3_ptr, r4, FMT, S_KIND, SIGNED3, ALIGNED,
                   MASKED)


@triton.jit
def _neuro_optima_lowbit_kernel(meta_ptr, grad_ptrs_ptr, chunks_ptr,  # `multi_tensor.Launch`
                                aux_ptr, mag0_ptr, thr0_ptr, mag1_ptr, thr1_ptr, mag2_ptr, thr2_ptr, mag3_ptr,
                                thr3_ptr, seed, rng_step, rng_step_buf,  # `lowbit.lowbit_launches`
                                lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                                MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, P_KIND: tl.constexpr,
                                S_KIND: tl.constexpr, FMT: tl.constexpr, PARAM_SR: tl.constexpr,
                                SIGNED0: tl.constexpr, SIGNED1: tl.constexpr, SIGNED2: tl.constexpr,
                                SIGNED3: tl.constexpr, RNG_STEP_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr,
                                ROW: tl.constexpr, BLOCK: tl.constexpr, QB: tl.constexpr):
    """`_neuro_optima_kernel` with bf16 / 8-bit moments and stochastically rounded bf16 params
    (docs/lowbit.md §5)."""
    step = lb.rng_step(rng_step, rng_step_buf, RNG_STEP_ON_DEVICE)
    t, row, offs, mask, blk, blk_mask, full = lb.tile_coords(meta_ptr, chunks_ptr, ROW, BLOCK, QB)
    g_addr = tl.load(grad_ptrs_ptr + t)
    if full:
        _neuro_optima_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, mag1_ptr,
                                    thr1_ptr, mag2_ptr, thr2_ptr, mag3_ptr, thr3_ptr, seed, step, lr, beta1,
                                    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, MAXIMIZE, DECAY,
                                    P_KIND, S_KIND, FMT, PARAM_SR, SIGNED0, SIGNED1, SIGNED2, SIGNED3, ALIGNED, False)
    else:
        _neuro_optima_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, mag1_ptr,
                                    thr1_ptr, mag2_ptr, thr2_ptr, mag3_ptr, thr3_ptr, seed, step, lr, beta1,
                                    one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, MAXIMIZE, DECAY,
                                    P_KIND, S_KIND, FMT, PARAM_SR, SIGNED0, SIGNED1, SIGNED2, SIGNED3, ALIGNED, True)


def _triton_neuro_optima(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], exp_avg_diffs: list[Tensor], prev_grads: list[Tensor], *,
                         lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                         maximize: bool, lowbit: Rounding | None = None) -> None:
    """NeuroOptima's core over a (device, dtype) group in one launch (a second one only for strided
    tensors, see `multi_tensor.prepare_launches`); zero-size tensors are skipped. ``lowbit``: bf16 / 8-bit
    moments or stochastically rounded bf16 params, in the same single pass (`_neuro_optima_lowbit_kernel`)."""
    states = [exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads]
    scalars = dict(lr=float(lr), beta1=float(beta1), one_minus_beta1=1 - beta1, beta2=float(beta2),
                   one_minus_beta2=1 - beta2, eps=float(eps), weight_decay=float(weight_decay),
                   MAXIMIZE=bool(maximize), DECAY=weight_decay != 0)
    if lb.uses_lowbit_kernel(params, lowbit):
        signed = {f"SIGNED{j}": bool(x) for j, x in enumerate(lowbit.signed)}
        for launch, args in lb.lowbit_launches(params, grads, states, lowbit, BLOCK):
            launch(_neuro_optima_lowbit_kernel, **args, **scalars, **signed)
        return
    for launch in mt.update_launches(params, grads, states, BLOCK):
        launch(_neuro_optima_kernel, **scalars)


_triton_neuro_optima.supports_lowbit = True  # called directly (the kernel driver) as through the class
