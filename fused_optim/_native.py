"""The `impl="native"` functional steps: thin launchers of the compiled ops in csrc/.

Each has exactly its reference's signature (`_forloop_x` in the optimizer's module) and calls one op
(two for the optimizers with a per-tensor reduction: `multi_tensor_stats`, then the update, which
reads the reduction from the device buffer: no `.item()`, no host sync). Op schemas and semantics:
csrc/fused_optim.cpp. The extra keyword-only `grad_scale` / `found_inf` (1-element fp32 tensors on
the params' device) are the AMP hooks: the kernels divide the grads by `grad_scale` and skip the
whole update when `found_inf != 0`; `.grad` is never written.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["_native_gravity", "_native_lion", "_native_adan", "_native_gradient_equilibrium"]


def _ops():
    from . import _ext  # imported on the first native step: `import fused_optim` stays cheap

    return _ext.ops()


def _finish_sharded(stats: Tensor, params: list[Tensor], col: int, op: str) -> Tensor:
    """FSDP2 (DTensor local shards, fused_optim/distributed.py): finish column `col` of the per-tensor
    stats over the shard group with ONE all-reduce; a no-op without an active shard context. For the
    sum column the result is rescaled by local/global numel, because the kernel divides by the local
    element count and must get the global mean."""
    from .distributed import global_numels, reduce_per_tensor

    index = list(range(len(params)))
    numels = global_numels(index)
    if numels is None:
        return stats
    vals = torch.stack(reduce_per_tensor(list(stats[:, col].unbind()), index, op))
    if op == "sum":
        local = torch.tensor([t.numel() for t in params], dtype=torch.float64, device=stats.device)
        total = torch.tensor(numels, dtype=torch.float64, device=stats.device).clamp_min(1)
        vals = vals.double() * local / total
    out = stats.clone()
    out[:, col] = vals.to(stats.dtype)
    return out


def _native_gravity(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], *, lr: float, beta_hat: float,
                    maximize: bool, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    if not params:  # the dispatcher needs a tensor to pick the backend
        return
    ops = _ops()
    with torch.no_grad():
        stats = _finish_sharded(ops.multi_tensor_stats(grads, None, 0.0, maximize, grad_scale), params, 0, "max")
        ops.gravity_(params, grads, vs, stats, lr, beta_hat, maximize, grad_scale, found_inf)


def _native_lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *, lr: float, beta1: float,
                 beta2: float, weight_decay: float, maximize: bool, grad_scale: Tensor | None = None,
                 found_inf: Tensor | None = None) -> None:
    if not params:
        return
    with torch.no_grad():
        _ops().lion_(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, maximize, grad_scale, found_inf)


def _native_adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 exp_avg_diffs: list[Tensor], neg_pre_grads: list[Tensor], *, lr: float, beta1: float, beta2: float,
                 beta3: float, bias_correction1: float, bias_correction2: float, bias_correction3_sqrt: float,
                 eps: float, weight_decay: float, no_prox: bool, clip: float | Tensor, maximize: bool,
                 grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    if not params:
        return
    if isinstance(clip, Tensor):
        clip_t = clip.reshape(1).to(device=params[0].device, dtype=torch.float32)  # no copy when it is already so
    elif clip == 1.0:
        clip_t = None  # clipping off: the kernel multiplies by 1, exactly like the reference
    else:
        clip_t = torch.full((1,), clip, dtype=torch.float32, device=params[0].device)
    with torch.no_grad():
        _ops().adan_(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, lr, beta1, beta2, beta3,
                         bias_correction1, bias_correction2, bias_correction3_sqrt, eps, weight_decay, no_prox,
                         clip_t, maximize, grad_scale, found_inf)


def _native_gradient_equilibrium(params: list[Tensor], grads: list[Tensor], *, lr: float, weight_decay: float,
                                 maximize: bool, grad_scale: Tensor | None = None,
                                 found_inf: Tensor | None = None) -> None:
    if not params:
        return
    ops = _ops()
    with torch.no_grad():
        # the mean is of g + wd*p (L2 decay), so the reduction sees the params as addends
        stats = ops.multi_tensor_stats(grads, params if weight_decay != 0 else None, weight_decay, maximize,
                                       grad_scale)
        stats = _finish_sharded(stats, params, 1, "sum")
        ops.gradient_equilibrium_(params, grads, stats, lr, weight_decay, maximize, grad_scale, found_inf)


# the per-tensor reductions are finished over FSDP2 shard groups (`_finish_sharded`)
_native_gravity.shard_aware = True
_native_gradient_equilibrium.shard_aware = True
