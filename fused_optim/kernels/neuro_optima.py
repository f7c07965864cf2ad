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

from .multi_tensor import (
    _chunk_coords,
    _div_rn,
    _load_f32,
    _store_f32,
    device_fn,
    device_guard,
    get_table,
    kernel_for,
    prepare,
)

BLOCK = 1024


@device_fn
def _neuro_optima_update(row, g_addr, offs, mask, lr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                         weight_decay, MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, P_KIND: tl.constexpr,
                         S_KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """The reference's per-element op order on one block."""
    p_addr = tl.load(row + 4)
    ea_addr = tl.load(row + 5)
    es_addr = tl.load(row + 6)
    ed_addr = tl.load(row + 7)
    pg_addr = tl.load(row + 8)
    p = _load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    g = _load_f32(g_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    exp_avg = _load_f32(ea_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    exp_avg_sq = _load_f32(es_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    exp_avg_diff = _load_f32(ed_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    prev_grad = _load_f32(pg_addr, offs, mask, S_KIND, ALIGNED, MASKED)
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
    u = _div_rn(exp_avg + exp_avg_diff * beta2, denom)
    # torch.sign: sign(0) = 0 and sign(NaN) = 0 (CPU and CUDA), so a NaN grad element leaves p as it is
    sign = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
    p = p - lr * sign
    _store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    _store_f32(ea_addr, offs, exp_avg, mask, S_KIND, ALIGNED, MASKED)
    _store_f32(es_addr, offs, exp_avg_sq, mask, S_KIND, ALIGNED, MASKED)
    _store_f32(ed_addr, offs, exp_avg_diff, mask, S_KIND, ALIGNED, MASKED)
    _store_f32(pg_addr, offs, g, mask, S_KIND, ALIGNED, MASKED)


@triton.jit
def _neuro_optima_kernel(
    meta_ptr,         # int64 [n, ROW]: numel, (reduction slots), param, exp_avg, exp_avg_sq, exp_avg_diff, prev_grad
    grad_ptrs_ptr,    # int64 [n]: grad addresses, refreshed every step
    chunks_ptr,       # int32 [n_chunks, 2]: (tensor, chunk) of each program
    lr,               # fp32 runtime args: a scheduler changing them never recompiles
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    weight_decay,
    MAXIMIZE: tl.constexpr,
    DECAY: tl.constexpr,      # weight_decay != 0 (the reference skips the add otherwise)
    P_KIND: tl.constexpr,     # dtype code of params and grads (0 fp32, 1 fp16, 2 bf16)
    S_KIND: tl.constexpr,     # dtype code of the four state tensors
    ALIGNED: tl.constexpr,    # every address 16-byte aligned: vector accesses
    ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t, row, offs, mask, full = _chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
    g_addr = tl.load(grad_ptrs_ptr + t)
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
    tensors, see `prepare`); zero-size tensors are skipped."""
    preps = prepare(params, grads, [exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads])
    # `prepare` returns the launches of the group (a list); earlier versions returned one or None
    preps = [] if preps is None else preps if isinstance(preps, list) else [preps]
    for prep in preps:
        table = get_table(prep, BLOCK)
        kernel = kernel_for(_neuro_optima_kernel, table.device)
        with device_guard(table.device):
            kernel[(table.n_chunks,)](table.meta, table.grad_ptrs, table.chunks, float(lr), float(beta1),
                                      1 - beta1, float(beta2), 1 - beta2, float(eps), float(weight_decay),
                                      MAXIMIZE=bool(maximize), DECAY=weight_decay != 0, P_KIND=prep.p_kind,
                                      S_KIND=prep.s_kind, ALIGNED=table.aligned, ROW=table.row, BLOCK=BLOCK,
                                      num_warps=4)
        prep.finish()
