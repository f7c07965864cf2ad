"""What the composites (Lookahead, SAM, NeuroOptima, Muon) share: the wrapper base class, the choice
of a fused part's impl, their kernels, and small helpers of their step.

docs/design.md "Layers and imports": the composite modules import this one and never each other's
private names; NeuroOptima composes SAM's and Lookahead's public functional drivers
(`sam_first_step` / `sam_second_step`, `lookahead_sync`).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import _native
from ._backends import auto_impl, impl_status
from .optimizer import FusedOptimizer

__all__ = ["WrappedOptimizer", "all_lr_zero", "check_k", "fused_kernel", "grads_of", "has_grads", "impl_of",
           "restore_grads"]


def fused_kernel(impl: str, module: str, name: str) -> Callable[..., Any]:
    """A composite part's fused kernel: for ``impl="triton"`` ``_triton_<name>`` of
    fused_optim/kernels/<module>.py, imported (with triton) on the first call; for ``impl="native"``
    ``_native_<name>`` of fused_optim/_native.py (csrc/ is built on the first call). Both take exactly
    the signature of the part's reference ``_forloop_<name>``."""
    if impl == "native":
        return getattr(_native, f"_native_{name}")
    if impl != "triton":
        raise ValueError(f"no fused kernel for impl {impl!r} (expected 'triton' or 'native')")
    attr = f"_triton_{name}"

    def launch(*args, **kwargs):
        from .kernels import kernel_module  # triton is imported here, on the first triton step

        return getattr(kernel_module(module), attr)(*args, **kwargs)

    launch.__name__ = launch.__qualname__ = attr
    return launch


def fused_kernels(module: str, name: str) -> dict[str, Callable[..., Any]]:
    """``{"triton": ..., "native": ...}`` of `fused_kernel`, to complete a part's impl table."""
    return {impl: fused_kernel(impl, module, name) for impl in ("triton", "native")}


def impl_of(optimizer: torch.optim.Optimizer, device: torch.device, impls: dict, requested: str | None) -> str:
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
    elif isinstance(optimizer, WrappedOptimizer):
        return impl_of(optimizer._inner, device, impls, None)
    elif optimizer.defaults.get("fused"):
        impl = auto_impl(torch.device(device).type)
    else:
        impl = "forloop" if optimizer.defaults.get("foreach") is False else "foreach"
    return impl if impl in impls else "foreach"


class WrappedOptimizer(torch.optim.Optimizer):
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


def check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"Invalid Lookahead k: {k!r} (expected an int >= 1)")


def all_lr_zero(groups: list[dict]) -> bool:
    return all("lr" in g and float(g["lr"]) == 0 for g in groups)


def grads_of(groups: list[dict]) -> list[tuple[Tensor, Tensor | None]]:
    """Every param with its current grad (a closure that raises gets them back, `restore_grads`)."""
    return [(p, p.grad) for g in groups for p in g["params"]]


def restore_grads(grads: list[tuple[Tensor, Tensor | None]]) -> None:
    for p, g in grads:
        p.grad = g


def has_grads(groups: list[dict]) -> bool:
    return any(p.grad is not None for g in groups for p in g["params"])
