"""Lion (Chen et al. 2023, arXiv 2302.06675): sign of an interpolated momentum.

Reference: google/automl `lion_pytorch.py` (lucidrains' default `Lion` is bit-identical); docs/spec.md §2.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._foreach import mul_operand
from ._native import _native_lion
from .declaration import FUSED, Declaration, Hyper, Impl, State
from .optimizer import FusedOptimizer

__all__ = ["Lion"]


def _forloop_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float,
                  beta1: float, beta2: float, weight_decay: float, maximize: bool) -> None:
    """The literal upstream op sequence, one tensor at a time (the reference)."""
    for p, g, exp_avg in zip(params, grads, exp_avgs):
        if maximize:
            g = -g
        p.mul_(1 - lr * weight_decay)
        c = exp_avg * beta1 + g * (1 - beta1)
        p.add_(torch.sign(c), alpha=-lr)
        exp_avg.mul_(beta2).add_(g, alpha=1 - beta2)


def _foreach_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float,
                  beta1: float, beta2: float, weight_decay: float, maximize: bool) -> None:
    """The same op order with torch._foreach_* (one kernel per op per list)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        torch._foreach_mul_(params, mul_operand(params, 1 - lr * weight_decay))
    c = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(c, torch._foreach_mul(grads, 1 - beta1))
    torch._foreach_sign_(c)
    torch._foreach_add_(params, c, alpha=-lr)
    torch._foreach_mul_(exp_avgs, mul_operand(exp_avgs, beta2))
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta2)


#: docs/design.md, "One declaration"
LION = Declaration(
    "lion",
    hypers=(Hyper("lr", 1e-4, lo=0.0, label="learning rate", tensor=True),
            Hyper("betas", (0.9, 0.99), kind="betas", n=2),
            Hyper("weight_decay", 0.0, lo=0.0)),
    state=(State("exp_avg", "exp_avgs"),),
    floats=("lr", "beta1", "beta2", "weight_decay"),
    impls=(Impl("forloop", _forloop_lion),
           Impl("foreach", _foreach_lion),
           Impl("triton", "fused_optim.kernels.lion:_triton_lion", **FUSED, lowbit=True),  # lazy: triton on the first step
           Impl("native", _native_lion, lowbit=True, **FUSED)),
)


class Lion(FusedOptimizer):
    r"""Lion: ``p ← p·(1 − lr·wd) − lr·sign(β1·m + (1 − β1)·g)``, then ``m ← β2·m + (1 − β2)·g``.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or 0-d Tensor): learning rate, ``lr >= 0`` (default: 1e-4).
        betas (tuple[float, float]): interpolation (β1) and momentum (β2) coefficients, each in [0, 1)
            (default: (0.9, 0.99)).
        weight_decay (float): decoupled weight decay, ``>= 0`` (default: 0).
        maximize (bool): maximize the objective instead of minimizing; ``.grad`` is never modified.
        impl (str, optional): "forloop", "foreach", "triton", "native" or None for auto (docs/spec.md §0).
        foreach, fused (bool, optional): torch-style spellings of ``impl``.
        capturable (bool): keep every per-step value on the device so a step can be captured in a CUDA
            graph (``FusedOptimizer`` docstring, "Capturable"): on CUDA it needs ``impl="triton"`` or
            ``impl="native"``; pass ``lr`` as a CUDA tensor to change it between replays (default: False).
        state_precision (str): "fp32" (default), "bf16" (stochastically rounded) or "8bit" (blockwise
            codes and fp32 scales; tensors under 4096 elements stay fp32): docs/lowbit.md.
        stochastic_rounding (bool): round bf16 params stochastically on every write (default: False).

    State: ``exp_avg`` (zeros at a param's first step). No step counter.
    """

    declaration = LION

    def __init__(self, params, lr: float | Tensor = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, impl: str | None = None,
                 foreach: bool | None = None, fused: bool | None = None, capturable: bool = False,
                 state_precision: str = "fp32", stochastic_rounding: bool = False):
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas,
                        weight_decay=weight_decay)
        super().__init__(params, defaults, maximize=maximize, impl=impl, foreach=foreach, fused=fused,
                         capturable=capturable, state_precision=state_precision,
                         stochastic_rounding=stochastic_rounding)

    def _step_group(self, group, params, grads) -> None:
        exp_avgs = []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                self._new_state(p, "exp_avg")
            exp_avgs.append(state["exp_avg"])
        beta1, beta2 = group["betas"]
        self._dispatch(params, grads, [exp_avgs], lr=group["lr"], beta1=float(beta1),
                       beta2=float(beta2), weight_decay=float(group["weight_decay"]),
                       maximize=group["maximize"])
