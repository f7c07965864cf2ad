"""NeuroOptima (seed `003_f15a17b62b033e5a.txt`): SAM + Adan-style momentum + Lion sign step + Lookahead.

docs/spec.md §7. The seed's README usage runs verbatim. The only published code (NeuroGhostOutput/NeuroOptima
`neurooptima.py`) calls ``loss.backward()`` on the closure's already-backpropagated loss (it crashes on
the README's own closure) and its "SAM" adds ``rho·g/||g||`` to p after every update and never takes
it back (a permanent gradient ascent). Ours is the true composition: real SAM (perturb by `sam_rho`,
re-evaluate the closure, restore exactly), then the per-tensor core below with the sharpness-aware
gradient, then Lookahead every `lookahead_k` steps with `lookahead_alpha`.

Core (upstream's per-tensor op order; ``b1, b2 = betas``; the second beta serves both the difference and
the squared moments, as upstream)::

    g = g + wd·p                          # coupled L2
    d = g − prev_grad                     # = g at the first step
    exp_avg      = b1·exp_avg      + (1−b1)·g
    exp_avg_diff = b2·exp_avg_diff + (1−b2)·d
    exp_avg_sq   = b2·exp_avg_sq   + (1−b2)·g²
    p -= lr·sign((exp_avg + b2·exp_avg_diff) / (sqrt(exp_avg_sq) + eps))
    prev_grad = g
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._composite import all_lr_zero, fused_kernels, grads_of, has_grads, restore_grads
from ._foreach import mul_operand
from .declaration import Declaration, Hyper, State
from .lookahead import lookahead_sync
from .optimizer import FusedOptimizer, _as_float, _nonfinite_flag, cuda_capturing
from .sam import sam_first_step, sam_second_step

__all__ = ["NeuroOptima"]


def _forloop_neuro_optima(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                          exp_avg_sqs: list[Tensor], exp_avg_diffs: list[Tensor], prev_grads: list[Tensor], *,
                          lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                          maximize: bool) -> None:
    """Upstream's per-tensor core, literally (the reference)."""
    for p, g, exp_avg, exp_avg_sq, exp_avg_diff, prev_grad in zip(params, grads, exp_avgs, exp_avg_sqs,
                                                                  exp_avg_diffs, prev_grads):
        if maximize:
            g = -g
        if weight_decay != 0:
            g = g.add(p, alpha=weight_decay)
        grad_diff = g - prev_grad
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_diff.mul_(beta2).add_(grad_diff, alpha=1 - beta2)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = exp_avg_sq.sqrt().add_(eps)
        update = (exp_avg + beta2 * exp_avg_diff) / denom
        p.add_(update.sign(), alpha=-lr)
        prev_grad.copy_(g)


def _foreach_neuro_optima(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                          exp_avg_sqs: list[Tensor], exp_avg_diffs: list[Tensor], prev_grads: list[Tensor], *,
                          lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                          maximize: bool) -> None:
    """The same op order over whole lists (`b2·diff` then `+ exp_avg`, never a fused add-with-alpha,
    which would round differently)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    grad_diffs = torch._foreach_sub(grads, prev_grads)
    beta1_, beta2_ = mul_operand(params, beta1), mul_operand(params, beta2)  # bf16: see mul_operand
    torch._foreach_mul_(exp_avgs, beta1_)
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_diffs, beta2_)
    torch._foreach_add_(exp_avg_diffs, grad_diffs, alpha=1 - beta2)
    torch._foreach_mul_(exp_avg_sqs, beta2_)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_mul(exp_avg_diffs, beta2_)
    torch._foreach_add_(update, exp_avgs)
    torch._foreach_div_(update, denom)
    torch._foreach_sign_(update)
    torch._foreach_add_(params, update, alpha=-lr)
    torch._foreach_copy_(prev_grads, grads)


#: docs/design.md, "One declaration" (its impls are its parts', picked per call: no `impls` here)
NEURO_OPTIMA = Declaration(
    "neurooptima",
    aliases=("neuro_optima",),
    hypers=(Hyper("lr", 1e-3, lo=0.0, label="learning rate", tensor=True),
            Hyper("weight_decay", 0.0, lo=0.0),
            Hyper("sam_rho", 0.05, lo=0.0),
            Hyper("lookahead_k", 5, kind="int", lo=1, label="Lookahead k"),
            Hyper("lookahead_alpha", 0.5, lo=0.0, hi=1.0),
            Hyper("betas", (0.9, 0.999), kind="betas", n=2),
            Hyper("eps", 1e-8, lo=0.0, label="epsilon value")),
    state=(State("exp_avg", "exp_avgs"), State("exp_avg_sq", "exp_avg_sqs", signed=False),
           State("exp_avg_diff", "exp_avg_diffs"), State("prev_grad", "prev_grads"),
           State("slow_param", "slow_params", optional=True, lowbit=False)),  # captured at a param's first core update
    counters=("step",),
)


class NeuroOptima(FusedOptimizer):
    r"""SAM → Adan-momentum/Lion-sign core → Lookahead, with the seed's constructor.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or 0-d Tensor): sign-step size, ``>= 0`` (default: 1e-3).
        weight_decay (float): coupled L2 added to the gradient, ``>= 0`` (default: 0).
        sam_rho (float): SAM radius, ``>= 0``; 0 disables SAM (one closure call per step) (default: 0.05).
        lookahead_k (int): core steps per Lookahead sync, ``>= 1`` (default: 5).
        lookahead_alpha (float): Lookahead's slow step, in [0, 1] (default: 0.5).
        betas (tuple[float, float]): ``b1`` for the gradient moment, ``b2`` for the difference and the
            squared moments, each in [0, 1) (default: (0.9, 0.999)).
        eps (float): added to ``sqrt(exp_avg_sq)``, ``>= 0`` (default: 1e-8).
        maximize, impl, foreach, fused: see :class:`fused_optim.Lion`. ``impl`` picks the implementation
            of every part: the core update, SAM's norms/perturb/restore and the Lookahead sync (on
            ``triton`` and ``native`` each part is one multi-tensor kernel per (device, dtype) split).

    ``step(closure)``: the closure (with or without ``zero_grad``) computes the loss, calls
    ``backward`` and returns the loss; it runs under ``torch.enable_grad()``. With ``sam_rho > 0`` a
    closure is required: ``step`` calls it at ``p`` (unless the params already have grads, which are
    then used), perturbs ``p`` along the global gradient direction by ``sam_rho``, calls it again, restores
    ``p`` exactly, applies the core update with the sharpness-aware grads, and sets the grads to None.
    Returns the closure's loss: at ``p`` when ``step`` evaluated it there, else (grads on entry) at the
    perturbed point, the only point ``step`` evaluated. ``step()`` without a closure at
    lr=0 in every group (how torch.distributed.checkpoint materialises state) runs the core alone.

    State: ``exp_avg``, ``exp_avg_sq``, ``exp_avg_diff``, ``prev_grad`` and Lookahead's ``slow_param``
    per param (captured before its first core update); ``step`` per group. All of it is in
    ``state_dict()``, so a round trip resumes bit-exactly.
    """

    declaration = NEURO_OPTIMA
    # GradScaler cannot drive a closure-based step (it refuses closures), and the SAM evaluation needs
    # one: let the scaler unscale and check the grads itself (the sam_rho=0 path) instead of handing
    # grad_scale/found_inf to a step that would have to apply them twice.
    _step_supports_amp_scaling = False

    def __init__(self, params, lr: float | Tensor = 1e-3, weight_decay: float = 0.0, sam_rho: float = 0.05,
                 lookahead_k: int = 5, lookahead_alpha: float = 0.5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, *, maximize: bool = False,
                 impl: str | None = None, foreach: bool | None = None, fused: bool | None = None,
                 state_precision: str = "fp32", stochastic_rounding: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, sam_rho=sam_rho, lookahead_k=lookahead_k,
                        lookahead_alpha=lookahead_alpha, betas=tuple(betas) if isinstance(betas, list) else betas,
                        eps=eps, step=0)
        super().__init__(params, defaults, maximize=maximize, impl=impl, foreach=foreach, fused=fused,
                         state_precision=state_precision, stochastic_rounding=stochastic_rounding)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One SAM + core + (every k-th step) Lookahead step; see the class docstring."""
        if cuda_capturing():  # the k-step choice and the counters are host values
            raise RuntimeError(self._capture_refusal())
        sam = any(float(g["sam_rho"]) > 0 for g in self.param_groups)
        if closure is None and all_lr_zero(self.param_groups):
            sam = False  # a state-initialising call at lr=0 (torch.distributed.checkpoint): see SAM.step
        loss = None
        if sam:
            if closure is None:
                raise RuntimeError("NeuroOptima with sam_rho > 0 needs a closure (it re-evaluates the loss "
                                   "at the perturbed point): optimizer.step(closure); or pass sam_rho=0")
            if not has_grads(self.param_groups):
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                self._collect(group)  # refuse bad grads before SAM moves anything
            grads = grads_of(self.param_groups)
            saved = sam_first_step(self.param_groups, rho_of=lambda g: g["sam_rho"], adaptive_of=lambda g: False,
                                   impl_for=self.impl_for)
            self.zero_grad(set_to_none=True)
            try:
                with torch.enable_grad():
                    perturbed_loss = closure()
            except BaseException:  # KeyboardInterrupt too: params and grads back as before the step
                sam_second_step(saved)
                restore_grads(grads)
                raise
            sam_second_step(saved)
            if loss is None:
                loss = perturbed_loss
        elif closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = [(group, *self._collect(group)) for group in self.param_groups]
        if self.skip_if_nonfinite:
            # the grads the core reads decide (SAM's restore is an exact copy, so a NaN perturbation
            # leaves no trace); the base class's found_inf path skips the whole core update
            found_inf = _nonfinite_flag([g for _, _, gs in batches for g in gs], None)
            if found_inf is not None:
                if self._begin_amp_step(batches, None, found_inf):
                    try:
                        self._advance_rounding(batches)
                        self._update(batches)
                    finally:
                        self._amp_kwargs = None
                if sam:
                    self.zero_grad(set_to_none=True)
                return loss
        self._advance_rounding(batches)
        self._update(batches)
        if sam:
            self.zero_grad(set_to_none=True)
        return loss

    def _step_group(self, group, params, grads) -> None:
        step = self._advance_counter(group, "step", params)  # an int, or a tensor under torch.compile
        exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads = [], [], [], []
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff", "prev_grad"):
                    self._new_state(p, key)
            if "slow_param" not in state:  # Lookahead's slow weight: p before its first update
                state["slow_param"] = p.detach().to(self._state_dtype(p), copy=True)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            exp_avg_diffs.append(state["exp_avg_diff"])
            prev_grads.append(state["prev_grad"])
        beta1, beta2 = group["betas"]
        self._dispatch(params, grads, [exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads],
                       lr=_as_float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
                       weight_decay=float(group["weight_decay"]), maximize=group["maximize"])
        due = step % group["lookahead_k"] == 0
        if isinstance(due, Tensor) or due:
            synced = [p for p in group["params"] if "slow_param" in self.state.get(p, ())]
            lookahead_sync(synced, [self.state[p]["slow_param"] for p in synced],
                           alpha=float(group["lookahead_alpha"]), impl_for=self.impl_for,
                           due=due if isinstance(due, Tensor) else None)

    _impls = {"forloop": _forloop_neuro_optima, "foreach": _foreach_neuro_optima,
              **fused_kernels("neuro_optima", "neuro_optima")}  # one launch each; triton loads on first use
    # the fused cores decode and encode bf16 / 8-bit moments in their own pass (docs/lowbit.md §5)
    _impls["triton"].supports_lowbit = True
