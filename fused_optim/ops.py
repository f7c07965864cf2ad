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

Op schemas: ``fused_optim_step::<optimizer>(params!, grads!, <state lists>!, str impl, Tensor scalars,
<bool flags>, Tensor? grad_scale, Tensor? found_inf) -> ()``. ``scalars`` is a float64 CPU tensor of
the impl's float scalars in the order of `_FLOATS` (a Dynamo `float` argument would be specialized and
recompile every step); the bools (``maximize``, Adan's ``no_prox``) stay arguments. Adan's ``clip``, a
0-d device tensor on the non-reference paths, travels as ``clip_tensor: Tensor?`` (its float slot is
then unused). ``grad_scale`` and ``found_inf`` reach impls marked with
`fused_optim.optimizer.supports_amp` only.

This module imports only torch at import time: the impl is looked up when the op runs, so the
Triton/native impls registered in the optimizer classes' ``_impls`` are picked up without changes here.
"""
import importlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["NAMESPACE", "OPAQUE_IMPLS", "op_for", "run_as_op"]

NAMESPACE = "fused_optim_step"

#: impls that run as one opaque custom op under torch.compile
OPAQUE_IMPLS = frozenset({"triton", "native"})

# op name -> "module:Class" whose `_impls` holds the functional steps
_CLASSES = {
    "gravity": "fused_optim.gravity:Gravity",
    "lion": "fused_optim.lion:Lion",
    "adan": "fused_optim.adan:Adan",
    "gradient_equilibrium": "fused_optim.equilibrium:GradientEquilibrium",
}


def _impl_fn(name: str, impl: str) -> Callable[..., None]:
    module, _, cls = _CLASSES[name].partition(":")
    impls = getattr(importlib.import_module(module), cls)._impls
    if impl not in impls:
        raise RuntimeError(f"{NAMESPACE}::{name}: no {impl!r} impl (available: {sorted(impls)})")
    return impls[impl]


def _run(name: str, impl: str, lists: list, scalars: dict, grad_scale: Tensor | None,
         found_inf: Tensor | None) -> None:
    fn = _impl_fn(name, impl)
    if grad_scale is not None or found_inf is not None:
        if not getattr(fn, "supports_amp", False):
            raise RuntimeError(f"{NAMESPACE}::{name}: impl {impl!r} does not take grad_scale/found_inf "
                               "(it is not marked with fused_optim.optimizer.supports_amp)")
        fn(*lists, **scalars, grad_scale=grad_scale, found_inf=found_inf)
    else:
        fn(*lists, **scalars)


# The float scalars of each op, in the order they are packed into its `scalars` tensor.
_FLOATS = {
    "gravity": ("lr", "beta_hat"),
    "lion": ("lr", "beta1", "beta2", "weight_decay"),
    "adan": ("lr", "beta1", "beta2", "beta3", "bias_correction1", "bias_correction2", "bias_correction3_sqrt",
             "eps", "weight_decay", "clip"),
    "gradient_equilibrium": ("lr", "weight_decay"),
}


def _floats(name: str, scalars: Tensor) -> dict[str, float]:
    return dict(zip(_FLOATS[name], scalars.tolist()))


@torch.library.custom_op(f"{NAMESPACE}::gravity", mutates_args=("params", "grads", "vs"))
def gravity(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], impl: str, scalars: Tensor,
            maximize: bool, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    _run("gravity", impl, [params, grads, vs], dict(_floats("gravity", scalars), maximize=maximize),
         grad_scale, found_inf)


@gravity.register_fake
def _gravity_fake(params, grads, vs, impl, scalars, maximize, grad_scale=None, found_inf=None):
    return None


@torch.library.custom_op(f"{NAMESPACE}::lion", mutates_args=("params", "grads", "exp_avgs"))
def lion(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], impl: str, scalars: Tensor,
         maximize: bool, grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    _run("lion", impl, [params, grads, exp_avgs], dict(_floats("lion", scalars), maximize=maximize),
         grad_scale, found_inf)


@lion.register_fake
def _lion_fake(params, grads, exp_avgs, impl, scalars, maximize, grad_scale=None, found_inf=None):
    return None


@torch.library.custom_op(f"{NAMESPACE}::adan",
                         mutates_args=("params", "grads", "exp_avgs", "exp_avg_sqs", "exp_avg_diffs",
                                       "neg_pre_grads"))
def adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
         exp_avg_diffs: list[Tensor], neg_pre_grads: list[Tensor], impl: str, scalars: Tensor, no_prox: bool,
         clip_tensor: Tensor | None, maximize: bool, grad_scale: Tensor | None = None,
         found_inf: Tensor | None = None) -> None:
    kw = _floats("adan", scalars)
    if clip_tensor is not None:
        kw["clip"] = clip_tensor
    _run("adan", impl, [params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads],
         dict(kw, no_prox=no_prox, maximize=maximize), grad_scale, found_inf)


@adan.register_fake
def _adan_fake(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads, impl, scalars, no_prox,
               clip_tensor, maximize, grad_scale=None, found_inf=None):
    return None


@torch.library.custom_op(f"{NAMESPACE}::gradient_equilibrium", mutates_args=("params", "grads"))
def gradient_equilibrium(params: list[Tensor], grads: list[Tensor], impl: str, scalars: Tensor, maximize: bool,
                         grad_scale: Tensor | None = None, found_inf: Tensor | None = None) -> None:
    _run("gradient_equilibrium", impl, [params, grads],
         dict(_floats("gradient_equilibrium", scalars), maximize=maximize), grad_scale, found_inf)


@gradient_equilibrium.register_fake
def _gradient_equilibrium_fake(params, grads, impl, scalars, maximize, grad_scale=None, found_inf=None):
    return None


_OPS = {"gravity": gravity, "lion": lion, "adan": adan, "gradient_equilibrium": gradient_equilibrium}
_QUALNAMES = {v: k for k, v in _CLASSES.items()}


def op_for(cls: type) -> str | None:
    """The op name of an optimizer class (or its nearest wrapped base), None for classes without one.

    A subclass that replaces ``_impls`` has its own impls, which the op would not find: no op then."""
    for c in cls.__mro__:
        name = _QUALNAMES.get(f"{c.__module__}:{c.__qualname__}")
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
    kwargs = dict(scalars)
    if name == "adan":
        clip = kwargs["clip"]
        kwargs["clip"], kwargs["clip_tensor"] = (1.0, clip) if isinstance(clip, Tensor) else (clip, None)
    # The float scalars travel as one float64 CPU tensor: a `float` argument of a custom op is
    # specialized by Dynamo (a recompile whenever Gravity's beta_hat or Adan's bias corrections change,
    # i.e. every step), a tensor is a graph input. float64 keeps the Python doubles exact.
    # A scalar derived from a step counter under torch.compile is already a float64 CPU tensor (the class
    # computed it from the counter): it joins the pack as a graph value, never read on the host.
    packed = torch.stack([_f64(kwargs.pop(k)) for k in _FLOATS[name]])
    _OPS[name](params, grads, *states, impl, packed, **kwargs, **amp)
    return True
