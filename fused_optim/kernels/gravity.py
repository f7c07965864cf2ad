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

from typing import TYPE_CHECKING

import triton
import triton.language as tl
from torch import Tensor

from . import lowbit as lb
from . import multi_tensor as mt
from .reduce import OP_ABSMAX, launch_partials

if TYPE_CHECKING:
    from ..lowstate import Rounding

BLOCK = 2048


@mt.device_fn
def _gravity_rule(p, g, v, m, lr, beta_hat, one_minus_beta_hat):
    """The per-element rule in fp32, in the seed's op order: the new (p, v); ``m = 1/max|g|``."""
    r = mt._div_rn(g, m)
    r = r * r
    r = 1.0 + r
    zeta = mt._div_rn(g, r)
    v = v * beta_hat + one_minus_beta_hat * zeta
    p = p - lr * v
    return p, v


@mt.device_fn
def _gravity_update(row, g_addr, offs, mask, m, lr, beta_hat, one_minus_beta_hat,
                    grad_scale_ptr, MAXIMIZE: tl.constexpr, P_KIND: tl.constexpr, S_KIND: tl.constexpr,
                    ALIGNED: tl.constexpr,
                    MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The rule on one block of fp32-format state."""
    p_addr, p = mt._load_row(row, 0, offs, mask, P_KIND, ALIGNED, MASKED)
    g = mt._load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    v_addr, v = mt._load_row(row, 1, offs, mask, S_KIND, ALIGNED, MASKED)
    p, v = _gravity_rule(p, g, v, m, lr, beta_hat, one_minus_beta_hat)
    mt._store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    mt._store_f32(v_addr, offs, v, mask, S_KIND, ALIGNED, MASKED)


@mt.device_fn
def _gravity_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, seed, step, m,
                           lr, beta_hat, one_minus_beta_hat, grad_scale_ptr,
                           MAXIMIZE: tl.constexpr, P_KIND: tl.constexpr, S_KIND: tl.constexpr, FMT: tl.constexpr,
                           PARAM_SR: tl.constexpr, SIGNED0: tl.constexpr, ALIGNED: tl.constexpr,
                           MASKED: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr):
    """The rule on one tile of whole quantization blocks, state in storage FMT (`kernels.lowbit`)."""
    tensor_index = tl.load(aux_ptr + 2 * t)
    scale0 = tl.load(aux_ptr + 2 * t + 1)
    p_addr, p = mt._load_row(row, 0, offs, mask, P_KIND, ALIGNED, MASKED)
    g = mt._load_grad(g_addr, offs, mask, grad_scale_ptr, P_KIND, ALIGNED, MASKED, HAS_GRAD_SCALE, MAXIMIZE)
    v_addr, v = lb.load_state(row, 1, offs, mask, blk, blk_mask, scale0, mag0_ptr, FMT, S_KIND, SIGNED0, ALIGNED,
                              MASKED)
    p, v = _gravity_rule(p, g, v, m, lr, beta_hat, one_minus_beta_hat)
    if PARAM_SR or FMT == 1:
        r0, r1, _, _ = lb.random_words(seed, step, tensor_index, offs)  # stream 0 the param, 1 the state
    else:
        r0 = 0
        r1 = 0
    lb.store_param(p_addr, offs, p, mask, r0, P_KIND, PARAM_SR, ALIGNED, MASKED)
    lb.store_state(v_addr, offs, v, mask, blk, blk_mask, scale0, thr0_ptr, r1, FMT, S_KIND, SIGNED0, ALIGNED, MASKED)


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


@triton.jit
def _gravity_lowbit_kernel(meta_ptr, grad_ptrs_ptr, chunks_ptr, partials_ptr,  # `multi_tensor.Launch`
                           grad_scale_ptr, found_inf_ptr,
                           aux_ptr, mag0_ptr, thr0_ptr, seed, rng_step, rng_step_buf,  # `lowbit.lowbit_launches`
                           lr, lr_ptr, beta_hat, beta_hat_ptr, one_minus_beta_hat,
                           MAXIMIZE: tl.constexpr, LR_TENSOR: tl.constexpr, BETA_HAT_TENSOR: tl.constexpr,
                           P_KIND: tl.constexpr, S_KIND: tl.constexpr, FMT: tl.constexpr, PARAM_SR: tl.constexpr,
                           SIGNED0: tl.constexpr, RNG_STEP_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr,
                           ROW: tl.constexpr, BLOCK: tl.constexpr, QB: tl.constexpr, MAX_PARTS: tl.constexpr,
                           HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr):
    """`_gravity_kernel` with bf16 / 8-bit state and stochastically rounded bf16 params (docs/lowbit.md §5);
    the per-tensor max|g| comes from the same reduction launch before it."""
    if mt._amp_go(found_inf_ptr, HAS_FOUND_INF):
        lr = mt._scalar(lr, lr_ptr, LR_TENSOR)
        beta_hat = mt._scalar(beta_hat, beta_hat_ptr, BETA_HAT_TENSOR)
        if BETA_HAT_TENSOR:
            one_minus_beta_hat = 1.0 - beta_hat
        step = lb.rng_step(rng_step, rng_step_buf, RNG_STEP_ON_DEVICE)
        t, row, offs, mask, blk, blk_mask, full = lb.tile_coords(meta_ptr, chunks_ptr, ROW, BLOCK, QB)
        g_addr = tl.load(grad_ptrs_ptr + t)
        amax = mt._vmax(mt._load_partials(row, partials_ptr, MAX_PARTS))
        m = mt._div_rn(tl.full([BLOCK // QB, QB], 1.0, tl.float32), amax)
        if full:
            _gravity_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, seed,
                                   step, m, lr, beta_hat, one_minus_beta_hat, grad_scale_ptr, MAXIMIZE, P_KIND,
                                   S_KIND, FMT, PARAM_SR, SIGNED0, ALIGNED, False, HAS_GRAD_SCALE)
        else:
            _gravity_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, seed,
                                   step, m, lr, beta_hat, one_minus_beta_hat, grad_scale_ptr, MAXIMIZE, P_KIND,
                                   S_KIND, FMT, PARAM_SR, SIGNED0, ALIGNED, True, HAS_GRAD_SCALE)


def _triton_gravity(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], *, lr: float | Tensor,
                    beta_hat: float | Tensor, maximize: bool, grad_scale: Tensor | None = None,
                    found_inf: Tensor | None = None, lowbit: Rounding | None = None) -> None:
    """Gravity over a (device, dtype) group: reduce, then update; zero-size tensors are skipped. AMP: see
    the module docstring. Device tensors ``lr`` and ``beta_hat`` (capturable) are read by the kernel
    (`multi_tensor.Launch`). ``lowbit``: bf16 / 8-bit state or stochastically rounded bf16 params, in the
    same update pass (`_gravity_lowbit_kernel`, after the same reduction)."""
    if lb.uses_lowbit_kernel(params, lowbit):
        for launch, args in lb.lowbit_launches(params, grads, [vs], lowbit, BLOCK, grad_scale, found_inf):
            launch_partials(launch, OP_ABSMAX)
            beta_hat_s = launch.scalar(beta_hat)
            launch(_gravity_lowbit_kernel, **args, lr=lr, beta_hat=beta_hat_s, one_minus_beta_hat=1 - beta_hat_s.value,
                   MAXIMIZE=bool(maximize), SIGNED0=bool(lowbit.signed[0]))
        return
    for launch in mt.update_launches(params, grads, [vs], BLOCK, grad_scale, found_inf):
        launch_partials(launch, OP_ABSMAX)
        beta_hat_s = launch.scalar(beta_hat)
        launch(_gravity_kernel, lr=lr, beta_hat=beta_hat_s, one_minus_beta_hat=1 - beta_hat_s.value,
               MAXIMIZE=bool(maximize))
