"""`create_optimizer(model_or_params, name, **kwargs)`: optimizers by lower-case name."""
from __future__ import annotations

import importlib
from collections.abc import Iterable

import torch

from .optimizer import params_of

# name -> "module:Class", imported on demand so the registry costs nothing at import
_REGISTRY: dict[str, str] = {
    "gravity": "fused_optim.gravity:Gravity",
    "lion": "fused_optim.lion:Lion",
    "adan": "fused_optim.adan:Adan",
    "gradientequilibrium": "fused_optim.equilibrium:GradientEquilibrium",
    "gradient_equilibrium": "fused_optim.equilibrium:GradientEquilibrium",
    "gradientequilibrum": "fused_optim.equilibrium:GradientEquilibrum",
    "lookahead": "fused_optim.lookahead:Lookahead.from_params",
    "sam": "fused_optim.sam:SAM",
    "neurooptima": "fused_optim.neuro_optima:NeuroOptima",
    "neuro_optima": "fused_optim.neuro_optima:NeuroOptima",
    "muon": "fused_optim.muon:Muon",
    "muonwithauxadam": "fused_optim.muon:MuonWithAuxAdam",
}


def register_optimizer(name: str, target: str | type) -> None:
    """Register `target` ("module:Class" or a class) under `name` (matched case-insensitively)."""
    _REGISTRY[name.lower()] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def optimizer_names() -> list[str]:
    return sorted(_REGISTRY)


def _lookup(name: str) -> type:
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"Unknown optimizer name: {name!r} (expected one of {', '.join(optimizer_names())})")
    module, _, cls = _REGISTRY[key].partition(":")
    obj = importlib.import_module(module)
    for part in cls.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve_optimizer(target):
    """A base optimizer for the composites: a class/callable as is, or a name: ours first, then a
    `torch.optim` class by case-insensitive name ("sgd", "adamw")."""
    if not isinstance(target, str):
        return target
    if target.lower() in _REGISTRY:
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
