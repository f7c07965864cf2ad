"""fused_optim: fast, faithful multi-tensor fused optimizers for PyTorch.

Every optimizer is a `torch.optim.Optimizer` with impls "forloop" (the reference), "foreach",
"triton" and "native", chosen per device (docs/spec.md §0). Importing this package is cheap: Triton and the
compiled extension are probed on first use, never at import.
"""
from __future__ import annotations

from ._backends import ImplStatus, available_impls
from .adan import Adan
from .equilibrium import GradientEquilibrium, GradientEquilibrum
from .gravity import Gravity
from .lion import Lion
from .lookahead import Lookahead
from .muon import Muon, MuonWithAuxAdam, muon_param_groups
from .neuro_optima import NeuroOptima
from .registry import create_optimizer, optimizer_names, register_optimizer
from .sam import SAM

__all__ = [
    "Adan",
    "GradientEquilibrium",
    "GradientEquilibrum",
    "Gravity",
    "ImplStatus",
    "Lion",
    "Lookahead",
    "Muon",
    "MuonWithAuxAdam",
    "NeuroOptima",
    "SAM",
    "available_impls",
    "create_optimizer",
    "muon_param_groups",
    "optimizer_names",
    "register_optimizer",
]
__version__ = "0.1.0"
