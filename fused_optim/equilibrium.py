"""GradientEquilibrium (seed package `gradient-equilibrum`): ``p ← p − lr·(g − mean(g))`` per tensor.

docs/spec.md §4. Upstream's weight decay is a no-op (the result of `grad.add(...)` is discarded); ours applies
the L2 term its docstring promises, ``g + wd·p``. With ``weight_decay=0`` it matches upstream bit for bit.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from ._foreach import mul_operand
from ._native import _native_gradient_equilibrium
from .declaration import FUSED, Declaration, Hyper, Impl
from .distributed import global_numels, reduce_per_tensor
from .optimizer import FusedOptimizer

__all__ = ["GradientEquilibrium", "GradientEquilibrum"]


def _forloop_gradient_equilibrium(params: list[Tensor], grads: list[Tensor], *, lr: float,
                                  weight_decay: float, maximize: bool) -> None:
    """Upstream's op sequence: ``eq = g - g.mean()``, then ``p -= lr * eq``."""
    for p, g in zip(params, grads):
        if p.numel() == 0:
            continue
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        eq = g - g.mean()
        p.sub_(lr * eq)


def _foreach_gradient_equilibrium(params: list[Tensor], grads: list[Tensor], *, lr: float,
                                  weight_decay: float, maximize: bool) -> None:
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    params = [params[i] for i in keep]
    grads = [grads[i] for i in keep]
    if maximize and keep:  # foreach ops refuse an empty list (a rank with only empty shards)
        grads = torch._foreach_neg(grads)
    if weight_decay != 0 and keep:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    numels = global_numels(keep)
    if numels is None:
        # torch has no foreach mean; per-tensor means are tiny kernels (one each), the update is multi-tensor
        means = [g.mean() for g in grads]
    else:
        # FSDP2 shards: local sums, one all-reduce SUM for all tensors (joined even with no local
        # elements), divided by the global sizes (fused_optim/distributed.py)
        sums = reduce_per_tensor([g.sum(dtype=torch.float32 if g.dtype in (torch.bfloat16, torch.float16)
                                        else g.dtype) for g in grads], keep, "sum")
        means = [(s / n).to(g.dtype) for s, n, g in zip(sums, numels, grads)]
    if not keep:
        return
    eq = torch._foreach_sub(grads, means)
    torch._foreach_mul_(eq, mul_operand(eq, lr))
    torch._foreach_sub_(params, eq)


#: docs/design.md, "One declaration"
GRADIENT_EQUILIBRIUM = Declaration(
    "gradient_equilibrium",
    aliases=("gradientequilibrium",),
    hypers=(Hyper("lr", 0.01, lo=0.0, label="learning rate", tensor=True),
            Hyper("weight_decay", 0.0, lo=0.0)),
    floats=("lr", "weight_decay"),
    per_tensor_reduction=True,  # mean(g) per tensor
    impls=(Impl("forloop", _forloop_gradient_equilibrium),
           Impl("foreach", _foreach_gradient_equilibrium, shard_aware=True),  # reduce_per_tensor
           Impl("triton", "fused_optim.kernels.equilibrium:_triton_gradient_equilibrium", **FUSED),
           Impl("native", _native_gradient_equilibrium, **FUSED, shard_aware=True)),
)


class GradientEquilibrium(FusedOptimizer):
    r"""Gradient Equilibrium: ``p ← p − lr·(g − mean(g))``, the mean over each whole tensor.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or 0-d Tensor): learning rate, ``>= 0`` (default: 0.01).
        weight_decay (float): L2 penalty added to the gradient, ``g + wd·p``, ``>= 0`` (default: 0).
        maximize, impl, foreach, fused, capturable: see :class:`fused_optim.Lion`.

    No state. A one-element tensor never moves (its gradient equals its mean).
    """

    declaration = GRADIENT_EQUILIBRIUM
    _supports_complex = False
    _complex_reason = "the mean over a torch.view_as_real view would mix real and imaginary parts"

    def __init__(self, params, lr: float | Tensor = 0.01, weight_decay: float = 0.0, *,
                 maximize: bool = False, impl: str | None = None, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay)
        super().__init__(params, defaults, maximize=maximize, impl=impl, foreach=foreach, fused=fused,
                         capturable=capturable)

    def _step_group(self, group, params, grads) -> None:
        self._dispatch(params, grads, [], lr=group["lr"],
                       weight_decay=float(group["weight_decay"]), maximize=group["maximize"])


class GradientEquilibrum(GradientEquilibrium):
    """The seed's spelling. Accepts and ignores its unused ``max_iterations`` and ``tol`` arguments."""

    declaration = replace(GRADIENT_EQUILIBRIUM, name="gradientequilibrum", aliases=(),
                          alias_of=GRADIENT_EQUILIBRIUM.name)

    def __init__(self, params, lr: float | Tensor = 0.01, max_iterations: int = 1000, tol: float = 1e-7,
                 weight_decay: float = 0.0, **kwargs):
        super().__init__(params, lr=lr, weight_decay=weight_decay, **kwargs)
