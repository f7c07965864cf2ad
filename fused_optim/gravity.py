"""Gravity (Bahrami & Zadeh 2021, arXiv 2101.09192): a kinematic step bounded by the per-tensor max |g|.

Reference: the PyTorch port in the seed (docs/spec.md §1). The velocity is drawn at construction from the
global RNG, in group then parameter order, so that with the same `torch.manual_seed` this class follows
the seed's trajectory exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._foreach import mul_operand, take
from ._native import _native_gravity
from .declaration import FUSED, Declaration, Hyper, Impl, State
from .distributed import reduce_per_tensor
from .optimizer import FusedOptimizer, _as_float, _check_range

__all__ = ["Gravity"]


def _forloop_gravity(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], *, lr: float,
                     beta_hat: float, maximize: bool) -> None:
    """The literal seed op sequence (reciprocal, divide, square, add 1, divide), in place on v."""
    for p, g, v in zip(params, grads, vs):
        if p.numel() == 0:  # max() of an empty tensor raises upstream; nothing to update
            continue
        if maximize:
            g = -g
        m = 1 / torch.abs(g).max()
        zeta = g / (1 + (g / m) ** 2)
        v.mul_(beta_hat).add_((1 - beta_hat) * zeta)  # == beta_hat * v + (1 - beta_hat) * zeta, bit for bit
        p.sub_(lr * v)


def _foreach_gravity(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], *, lr: float,
                     beta_hat: float, maximize: bool) -> None:
    """Per-tensor maxima in one `_foreach_norm(ord=inf)`, then the same op order over the lists."""
    keep = [i for i, p in enumerate(params) if p.numel() > 0]  # _foreach_norm(inf) raises on empty
    maxima = torch._foreach_norm([grads[i] for i in keep], ord=float("inf")) if keep else []
    # On FSDP2 shards: one all-reduce MAX for all tensors, joined even with no local elements
    # (fused_optim/distributed.py); without DTensors this returns `maxima` unchanged.
    maxima = reduce_per_tensor(maxima, keep, "max")
    if not keep:
        return
    params, grads, vs = take(keep, params, grads, vs)
    if maximize:
        grads = torch._foreach_neg(grads)
    m = torch._foreach_reciprocal(maxima)
    r = torch._foreach_div(grads, m)
    torch._foreach_pow_(r, 2)
    torch._foreach_add_(r, 1)
    zeta = torch._foreach_div(grads, r)
    torch._foreach_mul_(zeta, mul_operand(zeta, 1 - beta_hat))
    torch._foreach_mul_(vs, mul_operand(vs, beta_hat))
    torch._foreach_add_(vs, zeta)
    torch._foreach_add_(params, torch._foreach_mul(vs, lr), alpha=-1)


#: docs/design.md, "One declaration"
GRAVITY = Declaration(
    "gravity",
    hypers=(Hyper("lr", 0.1, lo=0.0, label="learning rate", tensor=True),
            Hyper("alpha", 0.01, lo=0.0),
            Hyper("beta", 0.9, lo=0.0, hi=1.0, hi_open=True)),
    state=(State("v", "vs"),),
    counters=("t",),  # beta_hat depends on t: an AMP found_inf skip must not advance it
    floats=("lr", "beta_hat"),
    per_tensor_reduction=True,  # max|g| per tensor
    impls=(Impl("forloop", _forloop_gravity),
           Impl("foreach", _foreach_gravity, shard_aware=True),  # finishes max|g| with reduce_per_tensor
           Impl("triton", "fused_optim.kernels.gravity:_triton_gravity", **FUSED, lowbit=True),
           Impl("native", _native_gravity, **FUSED, shard_aware=True, lowbit=True)),
)


class Gravity(FusedOptimizer):
    r"""Gravity: ``m = 1/max|g|`` per tensor, ``ζ = g / (1 + (g/m)²)``, ``v ← β̂·v + (1−β̂)·ζ``, ``p ← p − lr·v``
    with ``β̂ = (β·t + 1)/(t + 2)`` and ``t`` the group's step count.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or 0-d Tensor): learning rate, ``lr > 0`` at construction (it sets the velocity's
            scale ``alpha / lr``); a scheduler may later set it to 0 (default: 0.1).
        alpha (float): standard deviation of the initial velocity times ``lr``, ``>= 0`` (default: 0.01).
        beta (float): velocity averaging, in [0, 1) (default: 0.9).
        maximize, impl, foreach, fused, capturable: see :class:`fused_optim.Lion`; with
            ``capturable=True`` ``t`` is a device tensor and ``β̂`` is computed on the device in fp32.

    State: ``v`` per param, drawn ``N(0, alpha/lr)`` at construction (and in ``add_param_group``);
    ``t`` per group (in ``state_dict()["param_groups"]``).
    """

    declaration = GRAVITY
    _state_from_init = True  # drawn in add_param_group: a state_dict without it cannot be resumed
    _supports_complex = False
    _complex_reason = "its per-tensor max|g| and g/(1+(g/m)^2) are defined for real values only"

    def __init__(self, params, lr: float | Tensor = 0.1, alpha: float = 0.01, beta: float = 0.9, *,
                 maximize: bool = False, impl: str | None = None, foreach: bool | None = None,
                 fused: bool | None = None, capturable: bool = False, state_precision: str = "fp32",
                 stochastic_rounding: bool = False):
        _check_range("lr", lr, lo=0.0, lo_open=True, label="learning rate")  # std = alpha / lr
        defaults = dict(lr=lr, alpha=alpha, beta=beta, t=0)
        super().__init__(params, defaults, maximize=maximize, impl=impl, foreach=foreach, fused=fused,
                         capturable=capturable, state_precision=state_precision,
                         stochastic_rounding=stochastic_rounding)

    def add_param_group(self, param_group: dict) -> None:
        lr = param_group.get("lr", self.defaults["lr"])
        _check_range("lr", lr, lo=0.0, lo_open=True, label="learning rate")
        super().add_param_group(param_group)
        # Upstream draws v once in __init__ for all groups (and KeyErrors on later groups); drawing here,
        # group by group in param order, consumes the RNG identically and covers add_param_group too.
        group = self.param_groups[-1]
        std = group["alpha"] / _as_float(group["lr"])
        for p in group["params"]:
            state = self.state[p]
            if "v" in state:
                continue
            v = torch.empty_like(p).normal_(mean=0.0, std=std)
            self._new_state(p, "v", v.to(self._state_dtype(p)))

    def _step_group(self, group, params, grads) -> None:
        # every step() call, before use, even with no grads (upstream)
        t = self._advance_counter(group, "t", params)
        beta = group["beta"]
        # a Python double; a float64 tensor under torch.compile; fp32 on the device (capturable)
        beta_hat = (beta * t + 1) / (t + 2)
        vs = [self.state[p]["v"] for p in params]
        self._dispatch(params, grads, [vs], lr=group["lr"], beta_hat=beta_hat,
                       maximize=group["maximize"])
