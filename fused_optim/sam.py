"""SAM, sharpness-aware minimization (Foret et al. 2021, arXiv 2010.01412), adaptive variant (ASAM).

docs/spec.md §6; reference: davda54 `sam.py`. ``step(closure)``: global gradient norm (on the device, never
read on the host), perturb ``p += (p² if adaptive else 1)·g·rho/(norm + 1e-12)``, re-evaluate the closure
at the perturbed point, restore the exact old params (a copy, not ``p.data = old`` as upstream, which
swaps storage under anything holding a reference), then the base optimizer's step.

The three parts (per-tensor norms, perturb, restore) are functional steps with one signature per part
and impls side by side (`_forloop_sam_*` is davda54's op order, `_foreach_sam_*` the multi-tensor form,
`triton` and `native` one multi-tensor kernel per part and (device, dtype) split: the norms in one
reduction into a device buffer, the save of ``p`` and the perturbation in one pass), registered in
`_impls`; `sam_first_step` / `sam_second_step` drive them and are shared with `NeuroOptima`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import distributed as _dist
from ._composite import (WrappedOptimizer, all_lr_zero, fused_kernel, grads_of, has_grads, impl_of,
                         restore_grads)
from .declaration import Declaration, declare
from .optimizer import FusedOptimizer, _check_range, impl_views, split_by_device_dtype

__all__ = ["SAM"]


# ---------------------------------------------------------------------------------------- functional
def _forloop_sam_norms(params: list[Tensor], grads: list[Tensor], *, adaptive: bool) -> Tensor:
    """davda54: ``((|p| if adaptive else 1.0) * g).norm(p=2)`` per tensor, as one 1-D tensor (fp32 for
    fp32/bf16/fp16 params) on the params' device. Every impl returns this shape, so a fused impl can
    write all norms into one buffer."""
    return _stack_norms([((torch.abs(p) if adaptive else 1.0) * g).norm(p=2) for p, g in zip(params, grads)])


def _foreach_sam_norms(params: list[Tensor], grads: list[Tensor], *, adaptive: bool) -> Tensor:
    if adaptive:
        grads = torch._foreach_mul(torch._foreach_abs(params), grads)
    return _stack_norms(list(torch._foreach_norm(grads, 2)))


def _stack_norms(norms: list[Tensor]) -> Tensor:
    # a bf16/fp16 norm is exact in fp32; the fused impls accumulate in fp32 and return fp32
    out = torch.stack(norms)
    return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out


def _forloop_sam_perturb(params: list[Tensor], grads: list[Tensor], old_params: list[Tensor], *,
                         scale: Tensor, adaptive: bool) -> None:
    """Save ``p`` into `old_params`, then davda54's ``p.add_((p**2 if adaptive else 1.0) * g * scale)``.
    `scale` is a 0-d tensor on the params' device (``±rho / (norm + 1e-12)``)."""
    for p, g, old in zip(params, grads, old_params):
        old.copy_(p)
        e_w = (torch.pow(p, 2) if adaptive else 1.0) * g * scale.to(p)
        p.add_(e_w)


def _foreach_sam_perturb(params: list[Tensor], grads: list[Tensor], old_params: list[Tensor], *,
                         scale: Tensor, adaptive: bool) -> None:
    torch._foreach_copy_(old_params, params)
    s = scale.to(params[0]) if params else scale
    e_w = torch._foreach_mul(torch._foreach_pow(params, 2), grads) if adaptive else grads
    e_w = torch._foreach_mul(e_w, s)  # 1.0 * g is g exactly, so the non-adaptive product matches davda54
    torch._foreach_add_(params, e_w)


def _forloop_sam_restore(params: list[Tensor], old_params: list[Tensor]) -> None:
    for p, old in zip(params, old_params):
        p.copy_(old)


def _foreach_sam_restore(params: list[Tensor], old_params: list[Tensor]) -> None:
    torch._foreach_copy_(params, old_params)


class _SamImpl(NamedTuple):
    norms: Callable[..., list[Tensor]]
    perturb: Callable[..., None]
    restore: Callable[..., None]


_impls: dict[str, _SamImpl] = {
    "forloop": _SamImpl(_forloop_sam_norms, _forloop_sam_perturb, _forloop_sam_restore),
    "foreach": _SamImpl(_foreach_sam_norms, _foreach_sam_perturb, _foreach_sam_restore),
    **{impl: _SamImpl(*(fused_kernel(impl, "sam", f"sam_{part}") for part in _SamImpl._fields))
       for impl in ("triton", "native")},  # triton is imported on the first triton step
}


class _Saved(NamedTuple):
    impl: str
    params: list[Tensor]
    old_params: list[Tensor]


def sam_first_step(groups: list[dict], *, rho_of: Callable[[dict], float], adaptive_of: Callable[[dict], bool],
                   impl_for: Callable[[torch.device], str]) -> list[_Saved]:
    """Perturb every param with a grad; return what `sam_second_step` needs to restore them.

    The norm is davda54's: per-tensor norms in group and param order, stacked on the first param's
    device, ``torch.norm(·, p=2)``; it never leaves the device. A group whose params have ``maximize``
    set moves against the gradient (the sharpness-aware point of a maximization)."""
    batches = []
    for group in groups:
        params = [p for p in group["params"] if p.grad is not None]
        if params:
            batches.append((group, params, [p.grad for p in params]))
    if not batches:
        return []
    shared_device = batches[0][1][0].device
    parts: list[Tensor] = []  # per-tensor norms, one 1-D tensor per (device, dtype) split
    order: list[int] = []     # the group/param position of each entry of torch.cat(parts)
    base = 0
    for group, params, grads in batches:
        adaptive = bool(adaptive_of(group))
        for (device, dtype), idx in split_by_device_dtype(params).items():
            fn = _impls[_sam_impl(impl_for(device))].norms
            # DTensor (FSDP2) params: the kernels see the local shards (fused_optim/distributed.py)
            parts.append(fn(impl_views(params, idx, dtype), impl_views(grads, idx, dtype),
                            adaptive=adaptive).to(shared_device))
            order.extend(base + i for i in idx)
        base += len(params)
    norms = parts[0] if len(parts) == 1 else torch.cat(parts)
    if order != list(range(len(order))):  # several splits: back to davda54's group/param order
        inverse = [0] * len(order)
        for k, pos in enumerate(order):
            inverse[pos] = k
        norms = norms[_dist.host_values_to(inverse, torch.long, norms.device)]
    all_grads = [g for _, _, gs in batches for g in gs]
    if any(_dist.is_dtensor(g) for g in all_grads):
        # shard norms -> one all-reduced sum of squares over the shard group (every rank joins)
        grad_norm = _dist.global_sum(norms.square(), all_grads).sqrt()
    else:
        grad_norm = torch.norm(norms, p=2)
    saved: list[_Saved] = []
    for group, params, grads in batches:
        rho = float(rho_of(group))
        if rho == 0:
            continue
        scale = (-rho if group.get("maximize", False) else rho) / (grad_norm + 1e-12)
        adaptive = bool(adaptive_of(group))
        for (device, dtype), idx in split_by_device_dtype(params).items():
            impl = _sam_impl(impl_for(device))
            ps = [params[i] for i in idx]
            olds = [torch.empty_like(p) for p in ps]
            _impls[impl].perturb(impl_views(ps, None, dtype), impl_views(grads, idx, dtype),
                                 impl_views(olds, None, dtype), scale=scale.to(device), adaptive=adaptive)
            saved.append(_Saved(impl, ps, olds))
    return saved


def _sam_impl(impl: str) -> str:
    # an optimizer's fused impl without a SAM kernel yet runs the multi-tensor form (same op order)
    return impl if impl in _impls else "foreach"


def sam_second_step(saved: list[_Saved]) -> None:
    """Put every perturbed param back exactly."""
    for impl, params, old_params in saved:
        dtype = params[0].dtype  # one (device, dtype) split per entry
        _impls[impl].restore(impl_views(params, None, dtype), impl_views(old_params, None, dtype))


# ---------------------------------------------------------------------------------------- the class
@declare(Declaration("sam"))  # docs/design.md, "One declaration"
class SAM(WrappedOptimizer):
    r"""Sharpness-aware minimization around a base optimizer (davda54's API).

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        base_optimizer: the base optimizer's class (or any callable ``(param_groups, **kw) -> Optimizer``,
            or a name known to :func:`fused_optim.create_optimizer`), built on SAM's groups.
        rho (float): neighbourhood radius, ``>= 0`` (default: 0.05); per group as ``group["rho"]``.
        adaptive (bool): ASAM's scale-invariant neighbourhood (``|p|`` in the norm, ``p²`` in the
            perturbation) (default: False); per group as ``group["adaptive"]``.
        **base_kwargs: passed to `base_optimizer` (``lr``, ``momentum``, ``impl``...).

    ``step(closure)``: the closure zeroes the grads, computes the loss, calls ``backward`` and returns
    the loss; it runs under ``torch.enable_grad()``. If no param has a grad, ``step`` first calls the
    closure; if they have (the caller ran forward/backward, davda54's contract) those grads are used.
    Returns the closure's loss: at the unperturbed point ``p`` when ``step`` evaluated it there (no grads
    on entry), else at the perturbed point ``p + e(p)``, the only point ``step`` evaluated.
    The grads are set to None at the end, so a later ``step(closure)`` never mistakes the perturbed
    gradients for fresh ones. Without a closure ``step`` raises, except at lr=0 in every group (how
    torch.distributed.checkpoint materialises state): then it is the base step alone. ``first_step()`` / ``second_step()`` are davda54's two halves.

    ``param_groups`` and ``state`` are the base optimizer's. ``state_dict()`` is the base optimizer's
    (plus each param's ``sam_old_param`` when taken between ``first_step`` and ``second_step``).
    The norms, perturbation and restore follow the base optimizer's impl on each device (ours: its
    impl; torch's: ``forloop`` for ``foreach=False``, the fused kernels for ``fused=True``, the
    multi-tensor form otherwise).
    """

    def __init__(self, params, base_optimizer: str | type | Callable[..., torch.optim.Optimizer],
                 rho: float = 0.05, adaptive: bool = False, **base_kwargs):
        from .registry import _resolve_optimizer

        _check_range("rho", rho, lo=0.0, label="SAM rho")
        if isinstance(params, Tensor):
            raise TypeError("params argument given to SAM should be an iterable of Tensors or dicts, but got "
                            + torch.typename(params))
        groups = list(params)
        if not groups:
            raise ValueError("optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [dict(g) for g in groups]
        for g in groups:
            self._fill_group(g, rho, adaptive)
        inner = _resolve_optimizer(base_optimizer)(groups, **base_kwargs)
        self._bind(inner, dict(inner.defaults, rho=rho, adaptive=adaptive))
        self._saved: list[_Saved] = []

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        return self._inner

    def _fill_group(self, group: dict, rho: float, adaptive: bool) -> None:
        group.setdefault("rho", rho)
        group.setdefault("adaptive", adaptive)
        _check_range("rho", group["rho"], lo=0.0, label="SAM rho")

    def add_param_group(self, param_group: dict) -> None:
        param_group = dict(param_group)
        self._fill_group(param_group, self.defaults["rho"], self.defaults["adaptive"])
        self._inner.add_param_group(param_group)

    def _impl_for(self, device: torch.device) -> str:
        return impl_of(self._inner, device, _impls, None)

    def _check_before_perturbing(self) -> None:
        """Everything that could refuse the step, checked before any param moves: SAM's own group
        values (they may have been edited into the groups), and the grads as the base optimizer will
        see them (ours: its own collection, which also re-validates its hyperparameters)."""
        for group in self.param_groups:
            _check_range("rho", group["rho"], lo=0.0, label="SAM rho")
            if not isinstance(group["adaptive"], bool):
                raise TypeError(f"SAM adaptive must be a bool, got {group['adaptive']!r}")
        if isinstance(self._inner, FusedOptimizer):
            for group in self.param_groups:
                self._inner._collect(group)
            return
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError("SAM does not support sparse gradients (its perturbation is dense)")
                if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                    raise RuntimeError(f"SAM: a gradient ({tuple(g.shape)}, {g.dtype}, {g.device}) does not match "
                                       f"its parameter ({tuple(p.shape)}, {p.dtype}, {p.device})")

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Move to the sharpness-aware point ``p + e(p)`` (and remember ``p``)."""
        if self._saved:
            raise RuntimeError("SAM.first_step() called twice without second_step() in between")
        self._check_before_perturbing()
        self._saved = sam_first_step(self.param_groups, rho_of=lambda g: g["rho"],
                                     adaptive_of=lambda g: g["adaptive"], impl_for=self._impl_for)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``p`` exactly and take the base optimizer's step with the current (perturbed) grads."""
        sam_second_step(self._saved)
        self._saved = []
        self._inner.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], Any] | None = None):
        if closure is None:
            if all_lr_zero(self.param_groups):
                # torch.distributed.checkpoint (and loaders like it) materialise an empty optimizer's
                # state with step(closure=None) at lr=0: nothing moves and nothing needs evaluating, so
                # the base step alone does what is asked
                return self._inner.step()
            raise RuntimeError("SAM requires a closure that zeroes the grads, computes the loss, calls "
                               "backward and returns the loss: optimizer.step(closure); or call "
                               "first_step() and second_step() around your own second forward/backward")
        loss = None
        if not has_grads(self.param_groups):
            with torch.enable_grad():
                loss = closure()
        grads = grads_of(self.param_groups)
        self.first_step(zero_grad=True)
        try:
            with torch.enable_grad():
                perturbed_loss = closure()
        except BaseException:  # KeyboardInterrupt too: never leave the params at the perturbed point
            with torch.no_grad():
                sam_second_step(self._saved)
            self._saved = []
            restore_grads(grads)
            raise
        self.second_step()
        self.zero_grad(set_to_none=True)
        return perturbed_loss if loss is None else loss

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's, in torch's layout; between ``first_step`` and ``second_step`` each
        perturbed param's entry also holds ``sam_old_param`` (the point ``second_step`` restores)."""
        return self._pack_extra({p: {"sam_old_param": o} for _, ps, olds in self._saved for p, o in zip(ps, olds)},
                                {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for gi, group in enumerate(state_dict.get("param_groups", []) if isinstance(state_dict, dict) else []):
            try:  # SAM's own group values, before anything loads (the base optimizer knows only its own)
                _check_range("rho", group.get("rho", self.defaults["rho"]), lo=0.0, label="SAM rho")
                if not isinstance(group.get("adaptive", False), bool):
                    raise TypeError(f"SAM adaptive must be a bool, got {group['adaptive']!r}")
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"SAM: cannot load param group {gi} of the state dict: {exc}; nothing was "
                                "changed") from None
        extra, _ = self._load_with_extra(state_dict, ("sam_old_param",), ())
        self._saved = [_Saved("forloop", list(extra), [e["sam_old_param"] for e in extra.values()])] if extra else []

    def __repr__(self) -> str:
        return f"SAM(base_optimizer={self._inner!r})"
