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

from ._backends import auto_impl, impl_status
from ._foreach import mul_operand
from ._native import _native_lookahead_sync
from .declaration import Declaration, declare
from .kernels import _triton_lookahead_sync  # lazy: triton is imported on the first triton sync
from .optimizer import (_IMPL_DTYPES, FusedOptimizer, _check_range, _real_dtype, cuda_capturing, impl_views,
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
    "triton": _triton_lookahead_sync,
    "native": _native_lookahead_sync,
}


def _impl_of(optimizer: torch.optim.Optimizer, device: torch.device, impls: dict, requested: str | None) -> str:
    """The impl a wrapper's own fused part uses on `device`.

    An explicit request wins (and raises, with the reason, where it cannot run); otherwise it follows
    the wrapped optimizer: ours resolves per device (`impl_for`); torch's ``foreach=False`` means the
    for-loop, ``fused=True`` the best fused impl of the device (as auto mode picks it), anything else
    the multi-tensor ``foreach`` form. A part the wrapper has no kernel for runs the ``foreach`` form
    (same op order, so the same numbers on CPU)."""
    impl = requested
    if impl is not None:
        if impl not in impls:
            raise RuntimeError(f"no {requested!r} implementation of this composite's fused part; "
                               f"available: {sorted(impls)}")
        st = impl_status(impl, torch.device(device).type)
        if not st.available:
            raise RuntimeError(f"impl={impl!r} cannot run on {torch.device(device).type}: {st.reason}. Pass "
                               "impl=None to follow the wrapped optimizer, or impl='foreach'")
        return impl
    if isinstance(optimizer, FusedOptimizer):
        impl = optimizer.impl_for(device)
    elif isinstance(optimizer, _WrappedOptimizer):
        return _impl_of(optimizer._inner, device, impls, None)
    elif optimizer.defaults.get("fused"):
        impl = auto_impl(torch.device(device).type)
    else:
        impl = "forloop" if optimizer.defaults.get("foreach") is False else "foreach"
    return impl if impl in impls else "foreach"


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


class _WrappedOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` whose `param_groups` and `state` are those of `self._inner`.

    torch's `Optimizer.__init__` would copy the groups into a new list (and `load_state_dict` of the
    inner optimizer replaces its list), so the wrapper reads them through properties instead: an LR
    scheduler's `group["lr"] = ...` lands in the inner optimizer's groups, always. Only the hook tables
    and the step patching of torch's base are set up (through `Optimizer.__setstate__`, which is what
    torch itself uses to rebuild them after unpickling).
    """

    _inner: torch.optim.Optimizer

    def _bind(self, inner: torch.optim.Optimizer, defaults: dict[str, Any]) -> None:
        self.__dict__["_inner"] = inner
        torch.optim.Optimizer.__setstate__(self, {"defaults": dict(defaults)})
        self._warned_capturable_if_run_uncaptured = True

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self._inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._inner.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self._inner.state

    @state.setter
    def state(self, value) -> None:
        self._inner.state = value

    def add_param_group(self, param_group: dict) -> None:
        self._inner.add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        # every attribute but torch's hook tables, which torch's own pickling drops too (hooks are often
        # unpicklable closures); `__setstate__` rebuilds them empty
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        torch.optim.Optimizer.__setstate__(self, {})

    def _param_list(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _pack_extra(self, per_param: dict[Tensor, dict[str, Tensor]], per_group: dict[str, Any]) -> dict[str, Any]:
        """The inner optimizer's state_dict with the wrapper's tensors added to each param's entry and its
        scalars to each group (copies of the inner dicts: torch's state_dict shares the live ones)."""
        sd = self._inner.state_dict()
        ids = {p: i for i, p in enumerate(self._param_list())}
        saved_ids = [pid for g in sd["param_groups"] for pid in g["params"]]
        state = dict(sd["state"])
        for p, extra in per_param.items():
            if p in ids:
                pid = saved_ids[ids[p]]
                state[pid] = {**state.get(pid, {}), **extra}
        return {"state": state, "param_groups": [{**g, **per_group} for g in sd["param_groups"]]}

    def _load_with_extra(self, state_dict: dict[str, Any], param_keys: tuple[str, ...],
                         group_keys: tuple[str, ...], check: Callable[[dict[str, Any]], None] | None = None,
                         ) -> tuple[dict[Tensor, dict[str, Tensor]], dict[str, Any]]:
        """Load the inner optimizer from `state_dict` minus the wrapper's keys; return those keys per
        current param (copied onto the param's device and dtype: two live optimizers must never share
        a buffer) and the first group's wrapper scalars. torch's rule maps saved ids to params: ids are
        positions in the groups' param lists, group after group.

        Nothing changes when the dict is refused: the wrapper's tensors (shaped like their param) and
        scalars (`check`) are validated before the inner optimizer loads (and validates) the rest."""
        name = type(self).__name__
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{name}: a state_dict is a dict with 'state' and 'param_groups'")
        inner_state, extra = {}, {}
        for pid, st in state_dict["state"].items():
            st = dict(st)
            found = {k: st.pop(k) for k in param_keys if k in st}
            if found:
                extra[pid] = found
            if st:
                inner_state[pid] = st
        groups = [{k: v for k, v in g.items() if k not in group_keys} for g in state_dict["param_groups"]]
        group_extra = {k: v for k, v in state_dict["param_groups"][0].items() if k in group_keys} \
            if state_dict["param_groups"] else {}
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        by_id = dict(zip(saved_ids, self._param_list()))
        same_layout = [len(g["params"]) for g in state_dict["param_groups"]] == [len(g["params"])
                                                                               for g in self.param_groups]
        if same_layout:  # else the inner optimizer's loader refuses the dict, with torch's message
            for pid, found in extra.items():
                p = by_id.get(pid)
                for key, v in found.items():
                    if p is None or not isinstance(v, Tensor) or v.shape != p.shape or v.is_complex() != p.is_complex() \
                            or not (v.is_floating_point() or v.is_complex()):
                        what = (f"a {type(v).__name__}" if not isinstance(v, Tensor)
                                else f"a {v.dtype} tensor of shape {tuple(v.shape)}")
                        where = "no parameter" if p is None else f"its parameter of shape {tuple(p.shape)}, {p.dtype}"
                        raise ValueError(f"{name}: cannot load the state dict: {key!r} of parameter {pid} is {what}, "
                                         f"for {where}; nothing was changed")
            if check is not None:
                check(group_extra)
        self._inner.load_state_dict({"state": inner_state, "param_groups": groups})
        out = {}
        for pid, found in extra.items():
            p = by_id[pid]
            out[p] = {k: v.to(device=p.device, dtype=p.dtype, copy=True) for k, v in found.items()}
        return out, group_extra


@declare(Declaration("lookahead", factory="from_params"))  # docs/design.md, "One declaration"
class Lookahead(_WrappedOptimizer):
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
        _check_k(k)
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
        return _impl_of(self._inner, device, _sync_impls, self._impl_request)

    @torch.no_grad()
    def _new_slow(self) -> dict[Tensor, Tensor]:
        """Slow weights of the params that have none yet: p before its first step."""
        return {p: p.detach().clone(memory_format=torch.preserve_format) for p in self._param_list()
                if p not in self._slow}

    def _check_sync(self) -> None:
        """What the sync needs, checked before the inner step runs (it must not fail after it): k and
        alpha (attributes a user may edit), every slow weight shaped, typed and placed like its param,
        and the sync's impl able to run on the params' dtypes."""
        _check_k(self.k)
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
        _check_k(group_extra.get("lookahead_k"))
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


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid Lookahead k: {k!r} (expected an int >= 1)")
