"""`create_optimizer(model_or_params, name, **kwargs)`: optimizers by lower-case name.

The names are the declarations' (fused_optim/declaration.py), plus those `register_optimizer` adds.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch

from .declaration import declared
from .optimizer import params_of

# names registered by users (`register_optimizer`): name -> "module:Class" (imported on demand) or a class
_REGISTRY: dict[str, str | type] = {}


def _declared() -> dict[str, Any]:
    """name -> what `create_optimizer` calls, for every declared optimizer and alias (its declaration's
    ``factory`` attribute, e.g. ``Lookahead.from_params``, or the class); `import fused_optim` has
    declared them all (fused_optim/declaration.py)."""
    out = {}
    for decl, cls in declared().values():
        target = getattr(cls, decl.factory) if decl.factory else cls
        for name in decl.names:
            out[name] = target
    return out


def register_optimizer(name: str, target: str | type) -> None:
    """Register `target` ("module:Class" or a class) under `name` (matched case-insensitively)."""
    _REGISTRY[name.lower()] = target


def optimizer_names() -> list[str]:
    return sorted(_declared().keys() | _REGISTRY.keys())


def _lookup(name: str) -> Any:
    key = name.lower()
    target = _REGISTRY.get(key)
    if target is None:
        target = _declared().get(key)
    if target is None:
        raise ValueError(f"Unknown optimizer name: {name!r} (expected one of {', '.join(optimizer_names())})")
    if not isinstance(target, str):
        return target
    module, _, cls = target.partition(":")  # a user's "module:Class"
    obj = importlib.import_module(module)
    for part in cls.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve_optimizer(target):
    """A base optimizer for the composites: a class/callable as is, or a name: ours first, then a
    `torch.optim` class by case-insensitive name ("sgd", "adamw")."""
    if not isinstance(target, str):
        return target
    if target.lower() in optimizer_names():
        return _lookup(target)
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if attr.lower() == target.lower() and isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            return obj
    raise ValueError(f"Unknown optimizer name: {target!r} (expected one of {', '.join(optimizer_names())} "
                     "or a torch.optim class name)")


def create_optimizer(model_or_params: torch.nn.Module | Iterable, name: str, **kwargs) -> torch.optim.Optimizer:
    """Build an optimizer by name: ``create_optimizer(model, "lion", lr=3e-4, weight_decay=0.1)``.

    `model_or_params` is an `nn.Module` (its ``parameters()`` are used) or anything a torch optimizer
    accepts (an iterable of tensors or of param-group dicts).
    """
    target = _lookup(name)
    if getattr(target, "_accepts_module", False) and isinstance(model_or_params, torch.nn.Module):
        return target(model_or_params, **kwargs)  # e.g. Muon: splits the model into Muon and Adam groups
    return target(params_of(model_or_params), **kwargs)
