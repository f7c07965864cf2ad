"""GradientEquilibrium in two Triton launches per (device, dtype) group (docs/spec.md §4): per-tensor sums of
``±g (+ wd·p)`` into slots, then ``p − lr·(g − mean)``, the update finishing each tensor's sum from its
slots. Bytes per element (fp32): reduction reads g (and p with weight decay), update reads p, g and
writes p: 16 B (20 B with weight decay); +4 B under AMP (the unscaled grad is written back).

AMP (`fused_optim.declaration.mark_amp`): both launches divide g by ``grad_scale`` (rounded to the
grad's dtype, as torch's in-place unscale stores it) before using it: the sum is over the unscaled grads
(``sum(g/s)`` is not ``sum(g)/s`` in general). The update stores the unscaled grad back. With
``found_inf != 0`` both launches do nothing.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import multi_tensor as mt
from .reduce import OP_SUM, launch_partials

BLOCK = 2048


@mt.device_fn
def _gradient_equilibrium_update(row, g_addr, offs, mask, mean, lr, weight_decay, grad_scale_ptr,
                                 MAXIMIZE: tl.constexpr, DECAY: tl.constexpr, P_KIND: tl.constexpr,
                                 ALIGNED: tl.constexpr, MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """``p - lr*(g - mean)`` on one block, ``g`` with the L2 term; ``mean`` of the tensor's ``g``."""
    p_addr, p = mt._load_row(row, 0, offs, mask, P_KIND, ALIGNED, MASKED)
    g = mt._load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    if DECAY:
        g = g + weight_decay * p
    p = p - lr * (g - mean)
    mt._store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)


@triton.jit
def _gradient_equilibrium_kernel(meta_ptr, grad_ptrs_ptr, chunks_ptr,  # `multi_tensor.Launch`
                                 partials_ptr,  # sum of (±g + wd*p) per slot, from reduce.py
                                 grad_scale_ptr, found_inf_ptr, lr, lr_ptr, weight_decay,
                                 MAXIMIZE: tl.constexpr,
                                 DECAY: tl.constexpr,  # weight_decay != 0: L2 term g + wd*p (docs/spec.md §4)
                                 LR_TENSOR: tl.constexpr, P_KIND: tl.constexpr, ALIGNED: tl.constexpr,
                                 ROW: tl.constexpr, BLOCK: tl.constexpr, MAX_PARTS: tl.constexpr,
                                 HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    if mt._amp_go(found_inf_ptr, HAS_FOUND_INF):
        lr = mt._scalar(lr, lr_ptr, LR_TENSOR)
        row, g_addr, offs, mask, full = mt._update_coords(meta_ptr, grad_ptrs_ptr, chunks_ptr, ROW, BLOCK)
        total = mt._vsum(mt._load_partials(row, partials_ptr, MAX_PARTS))
        numel = tl.load(row).to(tl.float32)
        mean = mt._div_rn(tl.full([BLOCK], 0.0, tl.float32) + total, numel)
        if full:
            _gradient_equilibrium_update(row, g_addr, offs, mask, mean, lr, weight_decay, grad_scale_ptr,
                                         MAXIMIZE, DECAY, P_KIND, ALIGNED, False, HAS_GRAD_SCALE)
        else:
            _gradient_equilibrium_update(row, g_addr, offs, mask, mean, lr, weight_decay, grad_scale_ptr,
                                         MAXIMIZE, DECAY, P_KIND, ALIGNED, True, HAS_GRAD_SCALE)


def _triton_gradient_equilibrium(params: list[Tensor], grads: list[Tensor], *, lr: float | Tensor,
                                 weight_decay: float, maximize: bool, grad_scale: Tensor | None = None,
                                 found_inf: Tensor | None = None) -> None:
    """GradientEquilibrium over a (device, dtype) group: reduce, then update; zero-size tensors skipped.
    AMP: see the module docstring. A device tensor ``lr`` is read by the kernel (`multi_tensor.Launch`)."""
    decay = weight_decay != 0
    for launch in mt.update_launches(params, grads, [], BLOCK, grad_scale, found_inf):
        launch_partials(launch, OP_SUM, negate=maximize, add_param=decay, coeff=weight_decay)
        launch(_gradient_equilibrium_kernel, lr=lr, weight_decay=float(weight_decay),
               MAXIMIZE=bool(maximize), DECAY=decay)
