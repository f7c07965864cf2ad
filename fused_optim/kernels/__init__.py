"""Triton multi-tensor kernels: one launch per (device, dtype) group (docs/spec.md §0).

Importing this package does not import triton: the optimizer modules register these launchers in
their ``_impls`` at import, and triton is loaded on the first triton step. Each launcher has exactly
the signature of the optimizer's reference (``_forloop_x``); the kernel and the real launcher live in
one file per optimizer, the shared tables in `multi_tensor.py`. All four are AMP-aware
(`supports_amp`): the grad scale is divided out and the found_inf skip taken inside the kernels.

The composites' fused parts (`lookahead.py`, `sam.py`, `muon.py` here) follow the functional
interface the composite classes call (``_triton_lookahead_sync``, ``_triton_sam_norms`` / ``_perturb`` /
``_restore``, ``_triton_muon_momentum`` / ``_apply``); they take no grad scale (the composites run
after the base optimizer's unscale, or around it).

``fn.supports_tensor_lr = True`` (set below) says an impl takes ``lr`` as a 0-d tensor and reads it on
the device (no ``.item()``, no recompile): a caller holding a device tensor lr (capturable / scheduled)
may pass it as is instead of converting it with ``_as_float`` (`FusedOptimizer._dispatch` does).
``fn.supports_capturable = True`` says every step-dependent scalar (Gravity's ``beta_hat``, Adan's bias
corrections and ``first_step``) may be a device tensor too (``capturable=True``, `multi_tensor.scalar_args`).
"""
from __future__ import annotations

import importlib
import sys

from torch import Tensor

from ..optimizer import supports_amp


def kernel_module(name: str):
    """Import the kernel module `name` of this package decorated in the same flavour (compiled or
    interpreted) as `multi_tensor`, whose jit helpers its kernels call.

    `triton.jit` reads TRITON_INTERPRET when it decorates. A test that sets the variable for itself
    would otherwise import a kernel module interpreted on top of a compiled `multi_tensor` (or the
    reverse), and the kernel would fail calling a helper of the other flavour."""
    full = f"{__name__}.{name}"
    mod = sys.modules.get(full)
    if mod is not None:
        return mod
    from . import multi_tensor as mt

    with mt._interpret_scope(mt._is_interpreted(mt._chunk_coords)):
        return importlib.import_module(full)


@supports_amp
def _triton_gravity(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], *, lr: float | Tensor,
                    beta_hat: float | Tensor, maximize: bool, grad_scale: Tensor | None = None,
                    found_inf: Tensor | None = None) -> None:
    fn = kernel_module("gravity")._triton_gravity

    fn(params, grads, vs, lr=lr, beta_hat=beta_hat, maximize=maximize, grad_scale=grad_scale,
       found_inf=found_inf)


@supports_amp
def _triton_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float | Tensor,
                 beta1: float, beta2: float, weight_decay: float, maximize: bool,
                 grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    fn = kernel_module("lion")._triton_lion

    fn(params, grads, exp_avgs, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, maximize=maximize,
       grad_scale=grad_scale, found_inf=found_inf)


@supports_amp
def _triton_adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 exp_avg_diffs: list[Tensor], neg_pre_grads: list[Tensor], *, lr: float | Tensor,
                 beta1: float, beta2: float, beta3: float, bias_correction1: float | Tensor,
                 bias_correction2: float | Tensor, bias_correction3_sqrt: float | Tensor, eps: float,
                 weight_decay: float, no_prox: bool, clip: float | Tensor, maximize: bool, grad_scale: Tensor | None = None,
                 found_inf: Tensor | None = None, first_step: Tensor | None = None) -> None:
    fn = kernel_module("adan")._triton_adan

    fn(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, lr=lr, beta1=beta1, beta2=beta2,
       beta3=beta3, bias_correction1=bias_correction1, bias_correction2=bias_correction2,
       bias_correction3_sqrt=bias_correction3_sqrt, eps=eps, weight_decay=weight_decay, no_prox=no_prox,
       clip=clip, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, first_step=first_step)


@supports_amp
def _triton_gradient_equilibrium(params: list[Tensor], grads: list[Tensor], *, lr: float | Tensor,
                                 weight_decay: float,
                                 maximize: bool, grad_scale: Tensor | None = None,
                                 found_inf: Tensor | None = None) -> None:
    fn = kernel_module("equilibrium")._triton_gradient_equilibrium

    fn(params, grads, lr=lr, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
       found_inf=found_inf)


for _fn in (_triton_gravity, _triton_lion, _triton_adan, _triton_gradient_equilibrium):
    _fn.supports_tensor_lr = True
    # capturable (FusedOptimizer docstring): every per-step scalar may be a device tensor, read in the kernel
    _fn.supports_capturable = True


# ------------------------------------------------------------------------------------------ composites
def _triton_lookahead_sync(params: list[Tensor], slows: list[Tensor], *, alpha: float) -> None:
    fn = kernel_module("lookahead")._triton_lookahead_sync

    fn(params, slows, alpha=alpha)


def _triton_sam_norms(params: list[Tensor], grads: list[Tensor], *, adaptive: bool) -> Tensor:
    fn = kernel_module("sam")._triton_sam_norms

    return fn(params, grads, adaptive=adaptive)


def _triton_sam_perturb(params: list[Tensor], grads: list[Tensor], old_params: list[Tensor], *, scale: Tensor,
                        adaptive: bool) -> None:
    fn = kernel_module("sam")._triton_sam_perturb

    fn(params, grads, old_params, scale=scale, adaptive=adaptive)


def _triton_sam_restore(params: list[Tensor], old_params: list[Tensor]) -> None:
    fn = kernel_module("sam")._triton_sam_restore

    fn(params, old_params)


def _triton_muon_momentum(grads: list[Tensor], momentum_buffers: list[Tensor], updates: list[Tensor], *,
                          momentum: float, nesterov: bool, maximize: bool) -> None:
    fn = kernel_module("muon")._triton_muon_momentum

    fn(grads, momentum_buffers, updates, momentum=momentum, nesterov=nesterov, maximize=maximize)


def _triton_muon_apply(params: list[Tensor], updates: list[Tensor], *, scales: list[float], lr: float,
                       weight_decay: float) -> None:
    fn = kernel_module("muon")._triton_muon_apply

    fn(params, updates, scales=scales, lr=lr, weight_decay=weight_decay)


__all__ = ["_triton_adan", "_triton_gradient_equilibrium", "_triton_gravity", "_triton_lion",
           "_triton_lookahead_sync", "_triton_muon_apply", "_triton_muon_momentum", "_triton_sam_norms",
           "_triton_sam_perturb", "_triton_sam_restore", "kernel_module"]
