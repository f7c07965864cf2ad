"""NeuroOptima's core update as one Triton launch per (device, dtype) group (docs/spec.md §7).

Per element, in the reference's op order (`fused_optim.neuro_optima._forloop_neuro_optima`): coupled L2
``g + wd·p``, ``d = g − prev_grad``, the three moments, ``p − lr·sign((m + b2·m_diff) / (sqrt(v) + eps))``,
``prev_grad = g``. SAM's perturb/restore and the Lookahead sync around it are separate multi-tensor
passes (they need the closure in between). Bytes per element (fp32): read p, g, exp_avg, exp_avg_sq,
exp_avg_diff, prev_grad (24 B), write all but g (20 B): 44 B.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import multi_tensor as mt

BLOCK = 1024


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
    mt._store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    mt._store_f32(ea_addr, offs, exp_avg, mask, S_KIND, ALIGNED, MASKED)
    mt._store_f32(es_addr, offs, exp_avg_sq, mask, S_KIND, ALIGNED, MASKED)
    mt._store_f32(ed_addr, offs, exp_avg_diff, mask, S_KIND, ALIGNED, MASKED)
    mt._store_f32(pg_addr, offs, g, mask, S_KIND, ALIGNED, MASKED)


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


def _triton_neuro_optima(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], exp_avg_diffs: list[Tensor], prev_grads: list[Tensor], *,
                         lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                         maximize: bool) -> None:
    """NeuroOptima's core over a (device, dtype) group in one launch (a second one only for strided
    tensors, see `multi_tensor.prepare_launches`); zero-size tensors are skipped."""
    for launch in mt.update_launches(params, grads, [exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads], BLOCK):
        launch(_neuro_optima_kernel, lr=float(lr), beta1=float(beta1), one_minus_beta1=1 - beta1,
               beta2=float(beta2), one_minus_beta2=1 - beta2, eps=float(eps), weight_decay=float(weight_decay),
               MAXIMIZE=bool(maximize), DECAY=weight_decay != 0)
