"""Gravity in two Triton launches per (device, dtype) group (docs/spec.md §1): per-tensor max|g| into slots,
then the update, which finishes each tensor's max from its slots (no `.item()`, no host sync).

Per element, in the seed's op order: ``m = 1/max|g|``, ``ζ = g / (1 + (g/m)²)``,
``v·β̂ + (1−β̂)·ζ``, ``p − lr·v``. Divisions are IEEE-rounded (`div_rn`) as in torch. Bytes per
element (fp32): reduction reads g (4 B), update reads p, g, v and writes p, v (20 B): 24 B (+4 B under
AMP: the unscaled grad is written back).

AMP (`fused_optim.declaration.mark_amp`): both launches divide g by ``grad_scale`` (rounded to the
grad's dtype, as torch's in-place unscale stores it) before using it, so max|g| is that of the unscaled
grads; the update stores the unscaled grad back. With ``found_inf != 0`` both launches do nothing.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import multi_tensor as mt
from .reduce import OP_ABSMAX, launch_partials

BLOCK = 2048


@mt.device_fn
def _gravity_update(row, g_addr, offs, mask, m, lr, beta_hat, one_minus_beta_hat,
                    grad_scale_ptr, MAXIMIZE: tl.constexpr, P_KIND: tl.constexpr, S_KIND: tl.constexpr,
                    ALIGNED: tl.constexpr,
                    MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The per-element rule, in the seed's op order, on one block; ``m = 1/max|g|`` of the tensor."""
    p_addr, p = mt._load_row(row, 0, offs, mask, P_KIND, ALIGNED, MASKED)
    g = mt._load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    v_addr, v = mt._load_row(row, 1, offs, mask, S_KIND, ALIGNED, MASKED)
    r = mt._div_rn(g, m)
    r = r * r
    r = 1.0 + r
    zeta = mt._div_rn(g, r)
    v = v * beta_hat + one_minus_beta_hat * zeta
    p = p - lr * v
    mt._store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    mt._store_f32(v_addr, offs, v, mask, S_KIND, ALIGNED, MASKED)


@triton.jit
def _gravity_kernel(meta_ptr, grad_ptrs_ptr, chunks_ptr, partials_ptr,  # `multi_tensor.Launch`; partials: max|g|
                    grad_scale_ptr, found_inf_ptr, lr, lr_ptr, beta_hat, beta_hat_ptr,
                    one_minus_beta_hat,  # 1 - beta_hat, in double on the host
                    MAXIMIZE: tl.constexpr, LR_TENSOR: tl.constexpr, BETA_HAT_TENSOR: tl.constexpr,
                    P_KIND: tl.constexpr, S_KIND: tl.constexpr, ALIGNED: tl.constexpr, ROW: tl.constexpr,
                    BLOCK: tl.constexpr, MAX_PARTS: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                    HAS_FOUND_INF: tl.constexpr):
    if mt._amp_go(found_inf_ptr, HAS_FOUND_INF):
        lr = mt._scalar(lr, lr_ptr, LR_TENSOR)
        beta_hat = mt._scalar(beta_hat, beta_hat_ptr, BETA_HAT_TENSOR)
        if BETA_HAT_TENSOR:
            one_minus_beta_hat = 1.0 - beta_hat  # in fp32 (the float path rounds the double 1 - beta_hat)
        row, g_addr, offs, mask, full = mt._update_coords(meta_ptr, grad_ptrs_ptr, chunks_ptr, ROW, BLOCK)
        amax = mt._vmax(mt._load_partials(row, partials_ptr, MAX_PARTS))
        # m = 1/max|g| is inf for an all-zero grad: g/m = 0, zeta = 0, no NaN (docs/spec.md §1)
        m = mt._div_rn(tl.full([BLOCK], 1.0, tl.float32), amax)
        if full:
            _gravity_update(row, g_addr, offs, mask, m, lr, beta_hat, one_minus_beta_hat,
                            grad_scale_ptr, MAXIMIZE, P_KIND, S_KIND, ALIGNED, False, HAS_GRAD_SCALE)
        else:
            _gravity_update(row, g_addr, offs, mask, m, lr, beta_hat, one_minus_beta_hat,
                            grad_scale_ptr, MAXIMIZE, P_KIND, S_KIND, ALIGNED, True, HAS_GRAD_SCALE)


def _triton_gravity(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], *, lr: float | Tensor,
                    beta_hat: float | Tensor, maximize: bool, grad_scale: Tensor | None = None,
                    found_inf: Tensor | None = None) -> None:
    """Gravity over a (device, dtype) group: reduce, then update; zero-size tensors are skipped. AMP: see
    the module docstring. Device tensors ``lr`` and ``beta_hat`` (capturable) are read by the kernel
    (`multi_tensor.Launch`)."""
    for launch in mt.update_launches(params, grads, [vs], BLOCK, grad_scale, found_inf):
        launch_partials(launch, OP_ABSMAX)
        beta_hat_s = launch.scalar(beta_hat)
        launch(_gravity_kernel, lr=lr, beta_hat=beta_hat_s, one_minus_beta_hat=1 - beta_hat_s.value,
               MAXIMIZE=bool(maximize))
