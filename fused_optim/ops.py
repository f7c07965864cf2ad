"""The fused steps as `torch.library` custom ops, so `torch.compile(opt.step)` sees one opaque op per step.

Dynamo cannot trace into a Triton launcher that builds pointer tables from ``data_ptr()``, nor into a
compiled extension without a fake kernel; wrapping the whole functional step of an impl in a custom
op with a fake kernel (no outputs, only declared in-place mutations) gives the compiler what it
needs: the op's schema and that it mutates params, state and (under AMP) grads. At run time the op
calls the same impl function the eager path calls, so compiled and eager steps are the same kernels.

Under `torch.compile`, `FusedOptimizer._dispatch` routes an impl through its op when the impl is in
`OPAQUE_IMPLS` (the compiled kernels). The `foreach` path is left to Dynamo, which traces its
`torch._foreach_*` ops into the graph (Inductor can then fuse them); the ops still accept every impl
name, which is how the tests check them on the CPU.

The ops are generated from the optimizers' declarations (fused_optim/declaration.py; docs/design.md,
"One declaration"): a declared class gets its op when it is defined (`define`), so this module names
no optimizer and imports none. Op schemas: ``fused_optim_step::<name>(params!, grads!, <state
lists>!, str impl, Tensor scalars, <bool flags but maximize>, <Tensor? x_tensor per tensor float>,
bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()``. ``scalars`` is a float64 CPU
tensor of the declaration's ``floats`` in order (a Dynamo `float` argument would be specialized and
recompile every step); the bools (``maximize``, Adan's ``no_prox``) stay arguments. A float that may be
a 0-d device tensor (Adan's ``clip`` on the non-reference paths, ``tensor_floats``) travels as
``<name>_tensor: Tensor?`` (its float slot is then unused). ``grad_scale`` and ``found_inf`` reach
impls declared ``amp=True`` only.

This module imports only torch and the declarations' vocabulary: the impl is looked up in the class's
``_impls`` when the op runs (a test may replace one there).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .declaration import Declaration

__all__ = ["NAMESPACE", "OPAQUE_IMPLS", "define", "op_for", "run_as_op"]

NAMESPACE = "fused_optim_step"

#: impls that run as one opaque custom op under torch.compile
OPAQUE_IMPLS = frozenset({"triton", "native"})

#: op name -> (declaration, the declared class whose `_impls` the op calls, the op)
_OPS: dict[str, tuple[Declaration, type, Any]] = {}
#: declared class -> its op name
_OWNERS: dict[type, str] = {}


def _arg_names(decl: Declaration) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(the mutated list arguments, every argument) of `decl`'s op, in schema order."""
    lists = ("params", "grads", *decl.state_args)
    flags = tuple(f for f in decl.flags if f != "maximize")
    tensors = tuple(f"{k}_tensor" for k in decl.tensor_floats)
    return lists, (*lists, "impl", "scalars", *flags, *tensors, "maximize", "grad_scale", "found_inf")


def schema(decl: Declaration) -> str:
    """The op's schema string, built from the declaration (module docstring)."""
    lists, names = _arg_names(decl)
    parts = [f"Tensor({chr(ord('a') + i)}!)[] {n}" for i, n in enumerate(lists)]
    parts += ["str impl", "Tensor scalars"]
    parts += [f"bool {f}" for f in decl.flags if f != "maximize"]
    parts += [f"Tensor? {k}_tensor" for k in decl.tensor_floats]
    parts += ["bool maximize", "Tensor? grad_scale=None", "Tensor? found_inf=None"]
    assert len(parts) == len(names)
    return f"({', '.join(parts)}) -> ()"


def _runner(name: str) -> Callable[..., None]:
    """The op's kernel: unpack the arguments by the declaration and call the class's impl."""
    def run(*args: Any) -> None:
        decl, cls, _ = _OPS[name]
        lists, names = _arg_names(decl)
        bound = dict(zip(names, args))  # the dispatcher passes every argument positionally, trailing defaults cut
        kw: dict[str, Any] = dict(zip(decl.floats, bound["scalars"].tolist()))
        for k in decl.tensor_floats:
            if bound[f"{k}_tensor"] is not None:
                kw[k] = bound[f"{k}_tensor"]
        kw.update((f, bound[f]) for f in decl.flags)
        _run(name, cls, bound["impl"], [bound[n] for n in lists], kw, bound.get("grad_scale"),
             bound.get("found_inf"))
    run.__name__ = name
    return run


def _run(name: str, cls: type, impl: str, lists: list, scalars: dict, grad_scale: Tensor | None,
         found_inf: Tensor | None) -> None:
    impls = cls._impls
    if impl not in impls:
        raise RuntimeError(f"{NAMESPACE}::{name}: no {impl!r} impl (available: {sorted(impls)})")
    fn = impls[impl]
    if grad_scale is not None or found_inf is not None:
        if not getattr(fn, "supports_amp", False):
            raise RuntimeError(f"{NAMESPACE}::{name}: impl {impl!r} does not take grad_scale/found_inf "
                               "(its declaration does not say amp=True)")
        fn(*lists, **scalars, grad_scale=grad_scale, found_inf=found_inf)
    else:
        fn(*lists, **scalars)


def define(decl: Declaration, cls: type) -> None:
    """Define `decl`'s op (once per process; a class declared again, e.g. its module reloaded, takes the
    op over) and make it this module's attribute ``ops.<name>``."""
    if not decl.has_op:
        return
    known = _OPS.get(decl.name)
    if known is not None:
        if known[0].floats != decl.floats or schema(known[0]) != schema(decl):
            raise ValueError(f"{NAMESPACE}::{decl.name} is already defined with another schema "
                             f"({schema(known[0])}); an optimizer name must be unique")
        _OPS[decl.name] = (decl, cls, known[2])
        _OWNERS[cls] = decl.name
        return
    op = torch.library.custom_op(f"{NAMESPACE}::{decl.name}", _runner(decl.name),
                                 mutates_args=_arg_names(decl)[0], schema=schema(decl))
    op.register_fake(_fake)
    _OPS[decl.name] = (decl, cls, op)
    _OWNERS[cls] = decl.name
    globals()[decl.name] = op


def _fake(*args: Any) -> None:
    return None


def op_for(cls: type) -> str | None:
    """The op name of an optimizer class (or its nearest declared base), None for classes without one.

    A subclass that replaces ``_impls`` has its own impls, which the op would not find: no op then."""
    for c in cls.__mro__:
        name = _OWNERS.get(c)  # a dict lookup: Dynamo traces it (not a class's __dict__)
        if name is not None:
            return name if cls._impls is c._impls else None
    return None


def _f64(x: float | Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).reshape(())
    return torch.scalar_tensor(x, dtype=torch.float64)


def run_as_op(cls: type, impl: str, params: list[Tensor], grads: list[Tensor], states: list[list[Tensor]],
              scalars: dict[str, Any], amp: dict[str, Tensor | None]) -> bool:
    """Call the op of `cls` for one (device, dtype) split; False when `cls` has no op (call the impl)."""
    name = op_for(cls)
    if name is None:
        return False
    decl, _, op = _OPS[name]
    kwargs = dict(scalars)
    for k in decl.tensor_floats:
        value = kwargs[k]
        kwargs[k], kwargs[f"{k}_tensor"] = (1.0, value) if isinstance(value, Tensor) else (value, None)
    # The float scalars travel as one float64 CPU tensor: a `float` argument of a custom op is
    # specialized by Dynamo (a recompile whenever Gravity's beta_hat or Adan's bias corrections change,
    # i.e. every step), a tensor is a graph input. float64 keeps the Python doubles exact.
    # A scalar derived from a step counter under torch.compile is already a float64 CPU tensor (the class
    # computed it from the counter): it joins the pack as a graph value, never read on the host.
    packed = torch.stack([_f64(kwargs.pop(k)) for k in decl.floats])
    op(params, grads, *states, impl, packed, **kwargs, **amp)
    return True
