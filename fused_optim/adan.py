"""Adan (Xie et al. 2022, arXiv 2208.06677): Nesterov-style adaptive momentum on g and its difference.

Reference: sail-sg `adan.py` (timm's `Adan` follows it); docs/spec.md §3. State keys and layout match theirs,
so their checkpoints load here and continue the same trajectory. Betas are the code's (1 − the paper's).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._foreach import addcdiv_, mul_operand
from ._native import _native_adan
from .declaration import FUSED, Declaration, Hyper, Impl, State
from .distributed import all_reduce_sum_, is_dtensor, local
from .optimizer import FusedOptimizer, _check_range

__all__ = ["Adan"]


def _forloop_adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                  exp_avg_sqs: list[Tensor], exp_avg_diffs: list[Tensor], neg_pre_grads: list[Tensor], *,
                  lr: float, beta1: float, beta2: float, beta3: float, bias_correction1: float,
                  bias_correction2: float, bias_correction3_sqrt: float, eps: float, weight_decay: float,
                  no_prox: bool, clip: float | Tensor, maximize: bool) -> None:
    """sail-sg's `_single_tensor_adan`, without mutating the grad. `neg_pre_grads` holds ``-clip·g_{k-1}``
    (initialised by the class to ``-clip·g`` at a param's first step, so ``d`` is exactly 0 then)."""
    step_size = lr / bias_correction1
    step_size_diff = lr * beta2 / bias_correction2
    for p, g, exp_avg, exp_avg_sq, exp_avg_diff, npg in zip(params, grads, exp_avgs, exp_avg_sqs,
                                                            exp_avg_diffs, neg_pre_grads):
        if maximize:
            g = -g
        g = g * clip  # upstream: grad.mul_(clip) in place; we keep .grad intact
        npg.add_(g)  # d = g_k - g_{k-1}
        exp_avg.mul_(beta1).add_(g, alpha=1 - beta1)
        exp_avg_diff.mul_(beta2).add_(npg, alpha=1 - beta2)
        npg.mul_(beta2).add_(g)  # n = b2*d + g
        exp_avg_sq.mul_(beta3).addcmul_(npg, npg, value=1 - beta3)
        denom = (exp_avg_sq.sqrt() / bias_correction3_sqrt).add_(eps)
        if no_prox:
            p.mul_(1 - lr * weight_decay)
            p.addcdiv_(exp_avg, denom, value=-step_size)
            p.addcdiv_(exp_avg_diff, denom, value=-step_size_diff)
        else:
            p.addcdiv_(exp_avg, denom, value=-step_size)
            p.addcdiv_(exp_avg_diff, denom, value=-step_size_diff)
            p.div_(1 + lr * weight_decay)
        npg.zero_().add_(g, alpha=-1.0)


def _foreach_adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                  exp_avg_sqs: list[Tensor], exp_avg_diffs: list[Tensor], neg_pre_grads: list[Tensor], *,
                  lr: float, beta1: float, beta2: float, beta3: float, bias_correction1: float,
                  bias_correction2: float, bias_correction3_sqrt: float, eps: float, weight_decay: float,
                  no_prox: bool, clip: float | Tensor, maximize: bool) -> None:
    """sail-sg's `_multi_tensor_adan` op order over whole lists."""
    step_size = lr / bias_correction1
    step_size_diff = lr * beta2 / bias_correction2
    if maximize:
        grads = torch._foreach_neg(grads)
    grads = torch._foreach_mul(grads, clip)
    torch._foreach_add_(neg_pre_grads, grads)
    torch._foreach_mul_(exp_avgs, mul_operand(exp_avgs, beta1))
    torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
    torch._foreach_mul_(exp_avg_diffs, mul_operand(exp_avg_diffs, beta2))
    torch._foreach_add_(exp_avg_diffs, neg_pre_grads, alpha=1 - beta2)
    torch._foreach_mul_(neg_pre_grads, mul_operand(neg_pre_grads, beta2))
    torch._foreach_add_(neg_pre_grads, grads)
    torch._foreach_mul_(exp_avg_sqs, mul_operand(exp_avg_sqs, beta3))
    torch._foreach_addcmul_(exp_avg_sqs, neg_pre_grads, neg_pre_grads, value=1 - beta3)
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction3_sqrt)
    torch._foreach_add_(denom, eps)
    if no_prox:
        torch._foreach_mul_(params, mul_operand(params, 1 - lr * weight_decay))
        addcdiv_(params, exp_avgs, denom, -step_size)
        addcdiv_(params, exp_avg_diffs, denom, -step_size_diff)
    else:
        addcdiv_(params, exp_avgs, denom, -step_size)
        addcdiv_(params, exp_avg_diffs, denom, -step_size_diff)
        torch._foreach_div_(params, 1 + lr * weight_decay)
    torch._foreach_zero_(neg_pre_grads)
    torch._foreach_add_(neg_pre_grads, grads, alpha=-1.0)


#: docs/design.md, "One declaration"
ADAN = Declaration(
    "adan",
    hypers=(Hyper("lr", 1e-3, lo=0.0, label="learning rate", tensor=True),
            Hyper("betas", (0.98, 0.92, 0.99), kind="betas", n=3),
            Hyper("eps", 1e-8, lo=0.0, label="epsilon value"),
            Hyper("weight_decay", 0.0, lo=0.0),
            Hyper("max_grad_norm", 0.0, lo=0.0),
            Hyper("no_prox", False, kind="bool")),
    state=(State("exp_avg", "exp_avgs"), State("exp_avg_sq", "exp_avg_sqs", signed=False),
           State("exp_avg_diff", "exp_avg_diffs"),
           State("neg_pre_grad", "neg_pre_grads", optional=True)),  # -clip*g of the last step
    counters=("step",),  # the bias corrections depend on it: an AMP found_inf skip must not advance it
    floats=("lr", "beta1", "beta2", "beta3", "bias_correction1", "bias_correction2", "bias_correction3_sqrt",
            "eps", "weight_decay", "clip"),
    tensor_floats=("clip",),  # the global clip factor stays on the device on the non-reference paths
    flags=("no_prox", "maximize"),
    impls=(Impl("forloop", _forloop_adan),
           Impl("foreach", _foreach_adan),
           Impl("triton", "fused_optim.kernels.adan:_triton_adan", **FUSED, lowbit=True),
           Impl("native", _native_adan, lowbit=True, **FUSED)),
)


class Adan(FusedOptimizer):
    r"""Adan with sail-sg's op order, proximal (default) or decoupled (``no_prox=True``) weight decay.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr (float or 0-d Tensor): learning rate, ``>= 0`` (default: 1e-3).
        betas (tuple[float, float, float]): coefficients of the gradient, gradient-difference and squared
            moments, each in [0, 1) (default: (0.98, 0.92, 0.99)).
        eps (float): added to the denominator, ``>= 0`` (default: 1e-8).
        weight_decay (float): ``>= 0`` (default: 0).
        max_grad_norm (float): global gradient-norm clip over every param of every group, ``>= 0``;
            0 disables it (default: 0). The clip uses the constructor's ``max_grad_norm`` and the first
            group's ``eps``, like upstream. ``.grad`` is never modified (upstream scales it in place).
        no_prox (bool): decoupled decay ``p·(1 − lr·wd)`` before the update instead of the proximal
            ``p / (1 + lr·wd)`` after it (default: False).
        maximize, impl, foreach, fused, capturable: see :class:`fused_optim.Lion`; with
            ``capturable=True`` ``step`` is a device tensor, the bias corrections are computed on the
            device in fp32, and a param's first-step ``neg_pre_grad = -clip·g`` is taken by the kernel
            (it reads ``step == 1`` on the device). Under AMP with ``max_grad_norm > 0`` the grads are
            unscaled before the clip norm and ``found_inf`` is read on the host (one sync).

    State (sail-sg/timm layout): ``exp_avg``, ``exp_avg_sq``, ``exp_avg_diff``, ``neg_pre_grad`` per
    param; ``step`` per group.
    """

    declaration = ADAN

    def _reads_grads_before_dispatch(self) -> bool:
        # Under AMP these reads must see unscaled grads: the global clip norm, and a param's first step,
        # which initialises neg_pre_grad = -clip*g from its grad (`_adan_group`).
        # Capturable: the group's own first step (step == 1, only known on the device) is taken in the
        # kernel from the unscaled grad; a param seen for the first time is still initialised here (a
        # late param joins at step > 1), so that step reads its grads — a warm-up step, never a captured one.
        # (A group at step 0 has no neg_pre_grad unless capturable: `restart_opt` and `load_state_dict` drop
        # it there, so reading the counter, a tensor, is never needed.)
        if self.defaults["max_grad_norm"] > 0:
            return True
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and "neg_pre_grad" not in self.state.get(p, ()):
                    return True
        return False

    def __init__(self, params, lr: float | Tensor = 1e-3, betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
                 eps: float = 1e-8, weight_decay: float = 0.0, max_grad_norm: float = 0.0,
                 no_prox: bool = False, *, maximize: bool = False, impl: str | None = None,
                 foreach: bool | None = None, fused: bool | None = None, capturable: bool = False,
                 state_precision: str = "fp32", stochastic_rounding: bool = False):
        _check_range("max_grad_norm", max_grad_norm, lo=0.0)
        defaults = dict(lr=lr, betas=tuple(betas) if isinstance(betas, list) else betas, eps=eps,
                        weight_decay=weight_decay, max_grad_norm=max_grad_norm, no_prox=no_prox)
        super().__init__(params, defaults, maximize=maximize, impl=impl, foreach=foreach, fused=fused,
                         capturable=capturable, state_precision=state_precision,
                         stochastic_rounding=stochastic_rounding)

    @torch.no_grad()
    def restart_opt(self) -> None:
        """Zero the three moments and every group's step (upstream's restart); `neg_pre_grad` is
        re-initialised at the next step because the step count is back to 1 then."""
        for group in self.param_groups:
            # zeroed in place: a captured CUDA graph (capturable) keeps reading the counter's address
            self._counter_tensor(group, "step").zero_()
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                    if key in state:
                        state[key].zero_()
                if not self.capturable:
                    # set again from the grad at the next step, as at a param's first (capturable keeps the
                    # buffer, whose address a graph holds, and its kernel reads step == 1 on the device)
                    state.pop("neg_pre_grad", None)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.capturable:
            return
        for group in self.param_groups:  # a checkpoint taken after a restart (upstream's keeps the buffer)
            if group["step"].item() == 0:  # CPU counter: no sync
                for p in group["params"]:
                    self.state.get(p, {}).pop("neg_pre_grad", None)

    def _global_clip(self, batches) -> float | Tensor:
        """``min(max_grad_norm / (||g||_2 + eps), 1)`` over every grad of every group, or 1.0.

        The reference impls compute it like upstream, a sum of per-tensor squares then `.item()`;
        other impls keep it on the device as a 0-d fp32 tensor (no host sync)."""
        max_grad_norm = self.defaults["max_grad_norm"]
        if max_grad_norm <= 0:
            return 1.0
        grads = [g for _, _, gs in batches for g in gs]
        if not grads:
            return 1.0
        device = grads[0].device
        eps = self.param_groups[0]["eps"]
        if self.impl_for(device) == "forloop":
            total = None
            for part in _sharded_then_plain(grads):  # FSDP2: shards' partial sums all-reduced, plain once
                sub = torch.zeros(1, device=device)
                for g in part:
                    sub.add_(_real_flat(local(g)).pow(2).sum().to(device))
                sub = all_reduce_sum_(sub, part)
                total = sub if total is None else total + sub
            norm = torch.sqrt(total)
            return torch.clamp(torch.tensor(max_grad_norm, device=device) / (norm + eps), max=1.0).item()
        return self._device_clip(grads, max_grad_norm, eps)

    def _device_clip(self, grads: list[Tensor], max_grad_norm: float, eps: float) -> Tensor:
        device = grads[0].device
        total = None
        for part in _sharded_then_plain(grads):  # FSDP2: one all-reduce of the shards' partials, plain once
            by_device: dict[torch.device, list[Tensor]] = {}
            for g in part:
                by_device.setdefault(g.device, []).append(_real_flat(local(g)))
            sq = [torch.stack(torch._foreach_norm(gs, 2)).float().square().sum().to(device)
                  for gs in by_device.values()]
            sub = all_reduce_sum_(torch.stack(sq).sum(), part)
            total = sub if total is None else total + sub
        return torch.clamp(max_grad_norm / (total.sqrt() + eps), max=1.0)

    def _update(self, batches) -> None:
        clip = self._global_clip(batches)
        for group, params, grads in batches:
            self._adan_group(group, params, grads, clip)

    def _adan_group(self, group, params, grads, clip) -> None:
        step = self._advance_counter(group, "step", params)
        # a tensor: capturable device scalars (fp32), or the float64 counter under torch.compile
        device_scalars = isinstance(step, Tensor) and self.capturable and not torch.compiler.is_compiling()
        beta1, beta2, beta3 = group["betas"]
        exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads = [], [], [], []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "exp_avg" not in state:
                for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff"):
                    self._new_state(p, key)
            if "neg_pre_grad" not in state or (not isinstance(step, Tensor) and step == 1):
                # (capturable: the kernel also sets it where the group's step is 1, read on the device; under
                # torch.compile a group at step 0 has no neg_pre_grad: see `restart_opt`)
                # -clip*g (of the maximized g): the first difference is then exactly 0
                sign_g = g if group["maximize"] else -g
                self._new_state(p, "neg_pre_grad", sign_g.to(self._state_dtype(p)) * clip)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            exp_avg_diffs.append(state["exp_avg_diff"])
            neg_pre_grads.append(state["neg_pre_grad"])
        if isinstance(step, Tensor):  # capturable: fp32 on the device, as torch's capturable Adam
            first = {"first_step": (step == 1).float()} if device_scalars else {}
            bias_corrections = (1.0 - torch.pow(beta1, step), 1.0 - torch.pow(beta2, step),
                                torch.sqrt(1.0 - torch.pow(beta3, step)))
        else:
            first = {}
            bias_corrections = (1.0 - beta1 ** step, 1.0 - beta2 ** step, math.sqrt(1.0 - beta3 ** step))
        bc1, bc2, bc3_sqrt = bias_corrections
        self._dispatch(params, grads, [exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads],
                       lr=group["lr"], beta1=float(beta1), beta2=float(beta2), beta3=float(beta3),
                       bias_correction1=bc1, bias_correction2=bc2, bias_correction3_sqrt=bc3_sqrt,
                       eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
                       no_prox=bool(group["no_prox"]), clip=clip, maximize=group["maximize"], **first)


def _sharded_then_plain(grads: list[Tensor]) -> list[list[Tensor]]:
    """The grads as [DTensors, plain tensors], leaving out an empty part: a plain grad is whole on every
    rank, so its square sum must not join the shards' all-reduce."""
    sharded = [g for g in grads if is_dtensor(g)]
    if not sharded or len(sharded) == len(grads):
        return [grads]
    return [sharded, [g for g in grads if not is_dtensor(g)]]


def _real_flat(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t
