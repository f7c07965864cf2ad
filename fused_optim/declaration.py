"""One declaration per optimizer: what the rest of the library derives its tables from (docs/design.md,
"One declaration").

A `Declaration` sits in the optimizer's module, next to its reference step, and names: the optimizer's
registry names, its hyperparameters (defaults, valid ranges), its state layout, the functional step's
scalars and flags, and its impls with what each supports. From it come the class's `_impls`, state
keys and hyperparameter validation (`fused_optim/optimizer.py`), `create_optimizer`'s names
(`fused_optim/registry.py`), the `torch.compile` custom ops (`fused_optim/ops.py`), the bench's
candidates and the generic tests (tests/test_declared.py).

This module is a leaf: it imports only the standard library and torch, and importing a declaration
imports no kernel and builds nothing (an impl may be a lazy ``"module:attr"`` reference).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["FUSED", "Declaration", "Hyper", "Impl", "State", "check_betas", "check_int", "check_range",
           "declare", "declared", "mark_amp", "register"]


# --------------------------------------------------------------------------------------------- checks
def check_range(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False, hi_open: bool = False, label: str | None = None) -> None:
    """Raise torch's style of error ("Invalid learning rate: -1.0") plus the allowed range."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got {value.numel()} elements")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    # inf is refused too: no update rule here is defined at an infinite hyperparameter, and the impls
    # would disagree on the NaN/Inf they produce
    ok = math.isfinite(value)
    if lo is not None:
        ok = ok and (value > lo if lo_open else value >= lo)
    if hi is not None:
        ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_s = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
        hi_s = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
        raise ValueError(f"Invalid {label or name + ' value'}: {value} (expected {lo_s}{name}{hi_s}, finite)")


def check_betas(betas: Any, n: int) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != n:
        raise ValueError(f"Invalid betas: {betas!r} (expected a tuple of {n} floats in [0, 1))")
    for i, b in enumerate(betas):
        check_range(f"betas[{i}]", b, lo=0.0, hi=1.0, hi_open=True, label=f"beta parameter at index {i}")


def check_int(name: str, value: Any, *, lo: int, label: str | None = None) -> None:
    """An integer hyperparameter (Lookahead's ``k``): an int, not a bool, ``>= lo``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"Invalid {label or name}: {value!r} (expected an int >= {lo})")


def mark_amp(fn: Callable[..., None]) -> Callable[..., None]:
    """Mark an impl that handles AMP itself (the contract is in `FusedOptimizer`'s docstring, "AMP").

    A marked impl also accepts the keyword-only arguments ``grad_scale: Tensor | None`` and
    ``found_inf: Tensor | None`` (0-d fp32 tensors on the impl's device, or None). It must divide every
    grad by ``grad_scale`` and write the unscaled grad back into ``grads`` (torch's fused optimizers
    leave ``.grad`` unscaled), and when ``found_inf != 0`` it must leave params, state and grads
    untouched, reading ``found_inf`` on the device (no host sync). Unmarked impls never see these
    arguments: the base class unscales and skips for them.

    Here, in the leaf module, so the kernel layer can mark its launchers without importing the API.
    A declared impl gets the mark from its `Impl.amp` instead.
    """
    fn.supports_amp = True
    return fn


# ---------------------------------------------------------------------------------------- the parts
@dataclass(frozen=True)
class Hyper:
    """One hyperparameter of a param group.

    ``kind``: "float" (a number, or a one-element tensor where ``tensor`` is set: ``lr``), "int" (an
    int ``>= lo``), "betas" (a tuple of ``n`` numbers each in [0, 1)), "bool" or "other" (not
    checked). ``lo``/``hi`` bound a float, open or closed; ``label`` is the wording of torch's message
    ("learning rate").
    """
    name: str
    default: Any
    kind: str = "float"
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    label: str | None = None
    n: int = 0
    tensor: bool = False
    doc: str = ""

    def check(self, value: Any) -> None:
        """Raise the error naming this hyperparameter and its range when `value` is outside it."""
        if self.kind == "float":
            check_range(self.name, value, lo=self.lo, hi=self.hi, lo_open=self.lo_open, hi_open=self.hi_open,
                        label=self.label)
        elif self.kind == "int":
            check_int(self.name, value, lo=int(self.lo or 0), label=self.label)
        elif self.kind == "betas":
            check_betas(value, self.n)

    def checker(self) -> Callable[[Any], None] | None:
        """`check` as one precomputed function (the class runs it every step, so a valid plain float
        passes in a few comparisons; anything else takes `check`'s path, which raises the message),
        None for unchecked kinds."""
        if self.kind == "float":
            # a missing bound is an open infinite one, so the comparisons alone refuse NaN and +-inf
            lo, hi = -math.inf if self.lo is None else self.lo, math.inf if self.hi is None else self.hi
            lo_strict, hi_strict = self.lo_open or self.lo is None, self.hi_open or self.hi is None
            slow = self.check

            def check_float(value: Any) -> None:
                if value.__class__ is float and ((lo < value) if lo_strict else (lo <= value)) and (
                        (value < hi) if hi_strict else (value <= hi)):
                    return
                slow(value)
            return check_float
        if self.kind == "betas":
            n, slow = self.n, self.check

            def check_betas_fast(value: Any) -> None:
                if value.__class__ is tuple and len(value) == n:
                    for b in value:
                        if not (b.__class__ is float and 0.0 <= b < 1.0):
                            break
                    else:
                        return
                slow(value)
            return check_betas_fast
        if self.kind == "int":
            return self.check
        return None

    def invalid_values(self) -> list[Any]:
        """Values just outside the range (and non-finite ones) that `check` refuses: for the tests."""
        if self.kind == "betas":
            return [(0.5,) * (self.n - 1), (0.5,) * (self.n - 1) + (1.0,), (-0.1,) + (0.5,) * (self.n - 1),
                    (float("nan"),) * self.n]
        if self.kind == "int":
            lo = int(self.lo or 0)
            return [lo - 1, float(lo), True]
        if self.kind != "float":
            return []
        out: list[Any] = [float("nan"), float("inf"), float("-inf")]
        if self.lo is not None:
            out.append(self.lo if self.lo_open else self.lo - 1e-3)
        if self.hi is not None:
            out.append(self.hi if self.hi_open else self.hi + 1e-3)
        return out


@dataclass(frozen=True)
class State:
    """One per-param state tensor: its key in ``opt.state[p]`` and the functional step's list argument
    that holds it (Lion's ``exp_avg`` travels in ``exp_avgs``). ``optional``: a step creates it when
    missing (a checkpoint may lack it); else a param's state holds it from its first step on.
    ``lowbit``: stored in the optimizer's ``state_precision`` (bf16 / 8-bit; a weight copy such as
    Lookahead's slow param is not); ``signed``: can be negative (False: a second moment, the unsigned
    8-bit map). Low-precision states come first in the step's argument order (docs/lowbit.md §5)."""
    key: str
    arg: str
    optional: bool = False
    lowbit: bool = True
    signed: bool = True


@dataclass(frozen=True)
class Impl:
    """One implementation of the functional step and what it supports.

    ``fn``: the function, or a lazy ``"package.module:attr"`` reference resolved on its first call
    (a kernel module: triton is imported then, never at import). ``amp``: takes ``grad_scale`` and
    ``found_inf`` (`mark_amp`); ``tensor_lr``: reads a 0-d tensor ``lr`` on the device;
    ``capturable``: every per-step scalar may be a device tensor; ``shard_aware``: finishes its
    per-tensor reduction over DTensor shard groups; ``lowbit``: takes ``lowbit=`` (a
    `fused_optim.lowstate.Rounding`) and reads and writes bf16 / 8-bit state and rounds the param itself,
    in its own pass (else the class runs it on fp32 copies, `fused_optim.lowstate.reference_step`)."""
    name: str
    fn: Callable[..., None] | str
    amp: bool = False
    tensor_lr: bool = False
    capturable: bool = False
    shard_aware: bool = False
    lowbit: bool = False

    def caps(self) -> dict[str, bool]:
        """The capabilities as the function attributes the dispatcher reads (``fn.supports_amp``...)."""
        return {"supports_amp": self.amp, "supports_tensor_lr": self.tensor_lr,
                "supports_capturable": self.capturable, "shard_aware": self.shard_aware,
                "supports_lowbit": self.lowbit}


#: what a compiled kernel impl supports: all of it (the shard awareness is per optimizer)
FUSED = dict(amp=True, tensor_lr=True, capturable=True)


@dataclass(frozen=True)
class Declaration:
    """Everything about one optimizer that more than one place needs.

    ``name``: the canonical lower-case name (registry, custom op, test ids); ``aliases``: more
    `create_optimizer` names. ``hypers``: the param-group hyperparameters (the class validates them
    every step, `FusedOptimizer._validate_group`). ``state``: the per-param state tensors, in the
    functional step's argument order; ``scalar_state``: per-param non-tensor state keys;
    ``counters``: group step counters (``group["step"]``). ``floats``: the functional step's float
    scalars in order (``tensor_floats``: those that may also be a 0-d tensor the op passes through as
    ``<name>_tensor``); ``flags``: its bool arguments, ``maximize`` last. ``impls``: forloop first (the
    reference). ``per_tensor_reduction``: the update reads a reduction over each whole tensor, so on
    DTensor shards only ``shard_aware`` impls may run. ``factory``: for a composite, the attribute
    `create_optimizer` calls instead of the class. ``alias_of``: a second spelling of another declared
    class (no op of its own)."""
    name: str
    hypers: tuple[Hyper, ...] = ()
    state: tuple[State, ...] = ()
    scalar_state: tuple[str, ...] = ()
    counters: tuple[str, ...] = ()
    floats: tuple[str, ...] = ()
    tensor_floats: tuple[str, ...] = ()
    flags: tuple[str, ...] = ("maximize",)
    impls: tuple[Impl, ...] = ()
    per_tensor_reduction: bool = False
    aliases: tuple[str, ...] = ()
    factory: str | None = None
    alias_of: str | None = None
    doc: str = field(default="", compare=False)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    @property
    def defaults(self) -> dict[str, Any]:
        return {h.name: h.default for h in self.hypers}

    def hyper(self, name: str) -> Hyper:
        for h in self.hypers:
            if h.name == name:
                return h
        raise KeyError(f"{self.name} declares no hyperparameter {name!r}")

    @property
    def state_args(self) -> tuple[str, ...]:
        return tuple(s.arg for s in self.state)

    @property
    def impl_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.impls)

    @property
    def has_op(self) -> bool:
        """Whether this optimizer runs as one `torch.library` op under torch.compile (fused_optim/ops.py)."""
        return bool(self.impls) and self.alias_of is None


# -------------------------------------------------------------------------------------- the table
_DECLARED: dict[str, tuple[Declaration, type]] = {}


def register(decl: Declaration, cls: type) -> None:
    """List `cls` under `decl`'s names in the table the registry, the ops and the tests read
    (`declared`); refuse a name another class already holds."""
    for name in decl.names:
        for other_decl, other in _DECLARED.values():
            if name in other_decl.names and other.__qualname__ != cls.__qualname__:
                raise ValueError(f"optimizer name {name!r} is declared twice: by {other.__qualname__} and "
                                 f"{cls.__qualname__}")
    _DECLARED[decl.name] = (decl, cls)


def declare(decl: Declaration) -> Callable[[type], type]:
    """Class decorator for a class outside `FusedOptimizer` (the wrapping composites): attach `decl` as
    ``cls.declaration`` and `register` it. A `FusedOptimizer` subclass sets ``declaration = ...`` in its
    body instead; the base class derives its tables from it and registers it."""
    def attach(cls: type) -> type:
        cls.declaration = decl
        register(decl, cls)
        return cls
    return attach


def declared() -> dict[str, tuple[Declaration, type]]:
    """Canonical name -> (declaration, class) of every declared optimizer (`import fused_optim` declares
    all of the library's)."""
    return dict(_DECLARED)
