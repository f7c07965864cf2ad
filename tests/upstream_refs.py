"""Upstream optimizers as their users run them, restated from the published code for the compatibility
tests (docs/spec.md §1-4). Each keeps upstream's quirks that matter for trajectories: Gravity's out-of-place
velocity and construction-time draw, Adan's in-place clip of .grad and its state keys."""
from __future__ import annotations

import math

import torch
from torch.optim import Optimizer


class SeedGravity(Optimizer):
    """The seed's PyTorch Gravity (seed 001), unchanged in behaviour."""

    def __init__(self, params, lr=0.1, alpha=0.01, beta=0.9):
        super().__init__(params, dict(lr=lr, alpha=alpha, beta=beta, t=0))
        for group in self.param_groups:
            std = group["alpha"] / group["lr"]
            for p in group["params"]:
                self.state[p]["v"] = torch.empty_like(p).normal_(mean=0.0, std=std)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, beta = group["lr"], group["beta"]
            group["t"] += 1
            t = group["t"]
            beta_hat = (beta * t + 1) / (t + 2)
            for p in group["params"]:
                if p.grad is not None:
                    state = self.state[p]
                    m = 1 / torch.abs(p.grad).max()
                    zeta = p.grad / (1 + (p.grad / m) ** 2)
                    state["v"] = beta_hat * state["v"] + (1 - beta_hat) * zeta
                    p -= lr * state["v"]


class AutomlLion(Optimizer):
    """google/automl lion_pytorch.py."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data.mul_(1 - group["lr"] * group["weight_decay"])
                grad = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                beta1, beta2 = group["betas"]
                update = exp_avg * beta1 + grad * (1 - beta1)
                p.add_(torch.sign(update), alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


class SailAdan(Optimizer):
    """sail-sg adan.py (single-tensor path), including its in-place clip of .grad and the eps of the
    last group in the clip (a loop variable leaking in upstream)."""

    def __init__(self, params, lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.0,
                 max_grad_norm=0.0, no_prox=False):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      max_grad_norm=max_grad_norm, no_prox=no_prox))

    @torch.no_grad()
    def step(self, closure=None):
        if self.defaults["max_grad_norm"] > 0:
            device = self.param_groups[0]["params"][0].device
            norm = torch.zeros(1, device=device)
            max_grad_norm = torch.tensor(self.defaults["max_grad_norm"], device=device)
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        norm.add_(p.grad.pow(2).sum())
            norm = torch.sqrt(norm)
            clip = torch.clamp(max_grad_norm / (norm + group["eps"]), max=1.0).item()
        else:
            clip = 1.0
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            group["step"] = group.get("step", 0) + 1
            bc1, bc2 = 1.0 - beta1 ** group["step"], 1.0 - beta2 ** group["step"]
            bc3_sqrt = math.sqrt(1.0 - beta3 ** group["step"])
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    state["exp_avg_diff"] = torch.zeros_like(p)
                if "neg_pre_grad" not in state or group["step"] == 1:
                    state["neg_pre_grad"] = p.grad.clone().mul_(-clip)
                grad = p.grad
                exp_avg, exp_avg_sq, exp_avg_diff = state["exp_avg"], state["exp_avg_sq"], state["exp_avg_diff"]
                npg = state["neg_pre_grad"]
                grad.mul_(clip)
                npg.add_(grad)
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_diff.mul_(beta2).add_(npg, alpha=1 - beta2)
                npg.mul_(beta2).add_(grad)
                exp_avg_sq.mul_(beta3).addcmul_(npg, npg, value=1 - beta3)
                denom = ((exp_avg_sq).sqrt() / bc3_sqrt).add_(eps)
                step_size_diff = lr * beta2 / bc2
                step_size = lr / bc1
                if group["no_prox"]:
                    p.mul_(1 - lr * wd)
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                    p.addcdiv_(exp_avg_diff, denom, value=-step_size_diff)
                else:
                    p.addcdiv_(exp_avg, denom, value=-step_size)
                    p.addcdiv_(exp_avg_diff, denom, value=-step_size_diff)
                    p.div_(1 + lr * wd)
                npg.zero_().add_(grad, alpha=-1.0)


class SeedGradientEquilibrum(Optimizer):
    """gradient-equilibrum 0.0.3 ge/main.py step (its weight decay is a discarded no-op)."""

    def __init__(self, params, lr=0.01, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad.data
                if group["weight_decay"] != 0:
                    grad.add(p.data, alpha=group["weight_decay"])
                equilibrum_grad = grad - grad.mean()
                p.data -= group["lr"] * equilibrum_grad
