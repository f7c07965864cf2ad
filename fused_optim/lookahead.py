"""Lookahead (Zhang et al. 2019, arXiv 1907.08610): k fast steps forward, one interpolation back.

docs/spec.md §5. `Lookahead(optimizer, k=5, alpha=0.5)` wraps any optimizer, ours or torch's. Its
`param_groups` and `state` *are* the inner optimizer's (the same objects), so LR schedulers, `zero_grad`
and code that reads `optimizer.state[p]` work through the wrapper. Every k inner steps:
``p.mul_(alpha).add_(slow, alpha=1 - alpha)``, then ``slow.copy_(p)``. Slow weights are captured at the
start of a param's first step (not at construction), so a checkpoint loaded in between is not lost.

The sync is a functional step with the project's impl pattern, one signature, registered in
`_sync_impls`: `_forloop_lookahead_sync` (the reference), `_foreach_lookahead_sync` (three multi-tensor
ops), and one fused multi-tensor kernel per (device, dtype) split for `triton`
(fused_optim/kernels/lookahead.py) and `native` (csrc/). Fused: read p and slow, write both (16 B per
fp32 element), against 40 B for the three foreach passes.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ._composite import WrappedOptimizer, check_k, fused_kernels, impl_of
from ._foreach import mul_operand
from .declaration import Declaration, declare
from .optimizer import (_IMPL_DTYPES, _check_range, _real_dtype, cuda_capturing, impl_views,
                        split_by_device_dtype)

__all__ = ["Lookahead"]


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _forloop_lookahead_sync(params: list[Tensor], slows: list[Tensor], *, alpha: float) -> None:
    """docs/spec.md §5, one tensor at a time: ``p = alpha*p + (1-alpha)*slow`` then ``slow = p``."""
    for p, slow in zip(params, slows):
        p.mul_(alpha).add_(slow, alpha=1 - alpha)
        slow.copy_(p)


def _foreach_lookahead_sync(params: list[Tensor], slows: list[Tensor], *, alpha: float) -> None:
    """The same op order over whole lists: one multi-tensor op per list and op."""
    torch._foreach_mul_(params, mul_operand(params, alpha))
    torch._foreach_add_(params, slows, alpha=1 - alpha)
    torch._foreach_copy_(slows, params)


_sync_impls: dict[str, Callable[..., None]] = {
    "forloop": _forloop_lookahead_sync,
    "foreach": _foreach_lookahead_sync,
    **fused_kernels("lookahead", "lookahead_sync"),  # triton is imported on the first triton sync
}


def _masked_lookahead_sync(params: list[Tensor], slows: list[Tensor], *, alpha: float, due: Tensor) -> None:
    """The sync where the 0-d bool tensor `due` is true, else nothing changes: the every-k choice as data,
    for a step traced by torch.compile (a Python branch on a tensor counter would be a graph break, one
    on an int counter a recompile per step). Same op order as the reference; Inductor fuses it."""
    synced = torch._foreach_mul(params, mul_operand(params, alpha))
    torch._foreach_add_(synced, slows, alpha=1 - alpha)
    synced = [torch.where(due, s, p) for s, p in zip(synced, params)]
    torch._foreach_copy_(slows, [torch.where(due, s.to(slow.dtype), slow) for s, slow in zip(synced, slows)])
    torch._foreach_copy_(params, synced)


def lookahead_sync(params: list[Tensor], slows: list[Tensor], *, alpha: float,
                   impl_for: Callable[[torch.device], str], due: Tensor | None = None) -> None:
    """Run the sync once per (device, dtype) split of `params` (`slows` match `params` one to one); with
    `due` (a 0-d bool tensor, under torch.compile) only where it is true (`_masked_lookahead_sync`)."""
    for (device, dtype), idx in split_by_device_dtype(params).items():
        if due is not None:
            _masked_lookahead_sync(impl_views(params, idx, dtype), impl_views(slows, idx, dtype), alpha=alpha,
                                   due=due.to(device))
            continue
        impl = impl_for(device)
        fn = _sync_impls.get(impl, _foreach_lookahead_sync)
        # DTensor (FSDP2) params: an elementwise update of the local shards is the whole update
        fn(impl_views(params, idx, dtype), impl_views(slows, idx, dtype), alpha=alpha)


@declare(Declaration("lookahead", factory="from_params"))  # docs/design.md, "One declaration"
class Lookahead(WrappedOptimizer):
    r"""Lookahead around any optimizer: every ``k`` inner steps, ``p ← α·p + (1 − α)·slow``, ``slow ← p``.

    Args:
        optimizer: the inner ("fast") optimizer, ours or torch's. Its ``param_groups`` and ``state`` are
            shared with this wrapper (schedulers built on the wrapper drive the inner optimizer).
        k (int): inner steps per synchronization, ``>= 1`` (default: 5).
        alpha (float): slow-weight step size, in [0, 1] (default: 0.5).
        impl (str, optional): the sync's impl, "forloop", "foreach", "triton" or "native"; None follows
            the inner optimizer (ours: its impl on each device; torch's: "forloop" for ``foreach=False``,
            else "foreach").

    ``step(closure)`` passes the closure to the inner optimizer and returns its loss. ``state_dict()``
    is the inner optimizer's in torch's layout, with each param's slow weight (``lookahead_slow``) in its
    state entry and ``lookahead_k``, ``lookahead_alpha``, ``lookahead_step`` (a 0-d float32 tensor, like
    every step counter here; an int one loads) in every group, so it
    survives torch.distributed.checkpoint's helpers; a round trip resumes bit-exactly. A checkpoint of
    the bare inner optimizer also loads (the slow weights are then captured at the next step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5, *,
                 impl: str | None = None):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Lookahead wraps a torch.optim.Optimizer, got {type(optimizer).__name__}")
        check_k(k)
        _check_range("alpha", alpha, lo=0.0, hi=1.0, label="Lookahead alpha")
        if impl is not None and impl not in _sync_impls:
            raise ValueError(f"Invalid impl for Lookahead's sync: {impl!r} (expected one of "
                             f"{sorted(_sync_impls)} or None to follow the inner optimizer)")
        self._bind(optimizer, dict(optimizer.defaults, lookahead_k=k, lookahead_alpha=alpha))
        self.k = int(k)
        self.alpha = float(alpha)
        #: syncs counted so far; a 0-d float32 CPU tensor advanced in place, like the other step counters
        #: (README, "torch.compile"): under torch.compile an int attribute is guarded on or, mutated in a
        #: compiled frame, lost, so the slow weights never synced
        self.lookahead_step = torch.zeros((), dtype=torch.float32)
        self._impl_request = impl
        self._slow: dict[Tensor, Tensor] = {}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The wrapped optimizer (the name timm and lookahead_pytorch use)."""
        return self._inner

    @classmethod
    def from_params(cls, params, base_optimizer: str | type | Callable[..., torch.optim.Optimizer],
                    k: int = 5, alpha: float = 0.5, **base_kwargs) -> Lookahead:
        """``Lookahead(base_optimizer(params, **base_kwargs), k, alpha)``; `base_optimizer` may be a name
        known to :func:`fused_optim.create_optimizer` (what ``create_optimizer(model, "lookahead", ...)``
        calls)."""
        from .registry import _resolve_optimizer

        return cls(_resolve_optimizer(base_optimizer)(params, **base_kwargs), k=k, alpha=alpha)

    def _impl_for(self, device: torch.device) -> str:
        return impl_of(self._inner, device, _sync_impls, self._impl_request)

    @torch.no_grad()
    def _new_slow(self) -> dict[Tensor, Tensor]:
        """Slow weights of the params that have none yet: p before its first step."""
        return {p: p.detach().clone(memory_format=torch.preserve_format) for p in self._param_list()
                if p not in self._slow}

    def _check_sync(self) -> None:
        """What the sync needs, checked before the inner step runs (it must not fail after it): k and
        alpha (attributes a user may edit), every slow weight shaped, typed and placed like its param,
        and the sync's impl able to run on the params' dtypes."""
        check_k(self.k)
        _check_range("alpha", self.alpha, lo=0.0, hi=1.0, label="Lookahead alpha")
        checked: set[tuple[torch.device, torch.dtype]] = set()
        for i, p in enumerate(self._param_list()):
            slow = self._slow.get(p)
            if slow is not None and (slow.shape != p.shape or slow.dtype != p.dtype or slow.device != p.device):
                raise RuntimeError(f"Lookahead: the slow weight of parameter {i} ({tuple(slow.shape)}, {slow.dtype}, "
                                   f"{slow.device}) no longer fits its parameter ({tuple(p.shape)}, {p.dtype}, "
                                   f"{p.device}): was the model converted (.to(), .double()) after training "
                                   "started? Recreate the optimizer, or load a state_dict that fits")
            if (p.device, p.dtype) in checked:
                continue
            checked.add((p.device, p.dtype))
            supported = _IMPL_DTYPES.get(self._impl_for(p.device))
            if supported is not None and _real_dtype(p.dtype) not in supported:
                raise TypeError(f"Lookahead: the sync's impl {self._impl_for(p.device)!r} handles "
                                f"{', '.join(map(str, supported))} tensors, got a {p.dtype} parameter {i}; pass "
                                "impl='foreach' to Lookahead")

    def step(self, closure: Callable[[], Any] | None = None):
        """One inner step (with `closure`, if given); every k-th also synchronizes the slow weights."""
        if cuda_capturing():
            raise RuntimeError("Lookahead: step() is being captured in a CUDA graph, which it does not support: "
                               "whether a step syncs the slow weights (every k-th) is decided on the host, so "
                               "the graph would freeze that choice. Run its step outside the graph")
        self._check_sync()
        new_slow = self._new_slow()  # kept only once the inner step succeeded: a refused step changes nothing
        loss = self._inner.step() if closure is None else self._inner.step(closure)
        self._slow.update(new_slow)
        if torch.compiler.is_compiling():  # traced: the every-k choice as data (`_masked_lookahead_sync`)
            with torch.no_grad():
                self.lookahead_step.add_(1)
            self._sync(due=self.lookahead_step.double() % self.k == 0)
            return loss
        count = int(self.lookahead_step.item()) + 1  # a CPU tensor: no sync; a fill is cheaper than add_
        self.lookahead_step.fill_(count)
        if count % self.k == 0:
            self.sync()
        return loss

    def sync(self) -> None:
        """Pull every param toward its slow weight and store the result as the new slow weight."""
        self._sync(None)

    @torch.no_grad()
    def _sync(self, due: Tensor | None) -> None:
        params = [p for p in self._param_list() if p in self._slow]
        lookahead_sync(params, [self._slow[p] for p in params], alpha=self.alpha, impl_for=self._impl_for,
                       due=due)

    def state_dict(self) -> dict[str, Any]:
        """torch's layout, so torch.distributed.checkpoint's helpers (which keep only ``state`` and
        ``param_groups``) carry everything: each param's inner state plus ``lookahead_slow``; each group
        plus ``lookahead_k``, ``lookahead_alpha`` and ``lookahead_step`` (one counter, repeated)."""
        return self._pack_extra({p: {"lookahead_slow": s} for p, s in self._slow.items()},
                                {"lookahead_k": self.k, "lookahead_alpha": self.alpha,
                                 "lookahead_step": self.lookahead_step.clone()})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra, group_extra = self._load_with_extra(state_dict, ("lookahead_slow",), _GROUP_KEYS, _check_group_extra)
        if "lookahead_step" not in group_extra:  # the bare inner optimizer's checkpoint: slow weights
            self._slow = {}                      # are captured again at the next step
            self.lookahead_step = torch.zeros((), dtype=torch.float32)
            return
        self.k = int(group_extra["lookahead_k"])
        self.alpha = float(group_extra["lookahead_alpha"])
        step = group_extra["lookahead_step"]  # an int in checkpoints of earlier versions
        self.lookahead_step = torch.tensor(float(step.item() if isinstance(step, Tensor) else step),
                                           dtype=torch.float32)
        self._slow = {p: e["lookahead_slow"] for p, e in extra.items()}

    def __repr__(self) -> str:
        return f"Lookahead(k={self.k}, alpha={self.alpha}, optimizer={self._inner!r})"


_GROUP_KEYS = ("lookahead_k", "lookahead_alpha", "lookahead_step")


def _check_group_extra(group_extra: dict[str, Any]) -> None:
    """Lookahead's scalars of a state dict (refused before anything loads)."""
    if "lookahead_step" not in group_extra:
        return
    try:
        check_k(group_extra.get("lookahead_k"))
        _check_range("alpha", group_extra.get("lookahead_alpha"), lo=0.0, hi=1.0, label="Lookahead alpha")
        step = group_extra["lookahead_step"]  # a 0-d tensor, or an int in checkpoints of earlier versions
        if isinstance(step, Tensor):
            value = step.item() if step.numel() == 1 else -1.0
            if not (math.isfinite(value) and value >= 0 and value == int(value)):
                raise ValueError(f"Invalid lookahead_step: {step!r} (expected one whole number >= 0)")
        elif isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Invalid lookahead_step: {step!r} (expected an int >= 0)")
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"Lookahead: cannot load the state dict: {exc}; nothing was changed") from None
