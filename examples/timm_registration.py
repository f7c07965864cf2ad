"""Register fused_optim's optimizers in timm's optimizer registry, then build them timm's way.

``register_with_timm()`` adds ``fusedlion``, ``fusedadan``, ``fusedgravity`` and ``fusedequilibrium``
(prefixed, so timm's own ``lion``/``adan`` stay as they are; no underscore, because timm reads
``lookahead_adamw``-style names as modifier_optimizer) to
``timm.optim``'s default registry, with the flags timm uses to decide which of its arguments to pass
(``eps``, ``betas``, ``momentum``). ``create_optimizer_v2`` then applies timm's usual treatment:
no weight decay on biases and norm weights (``filter_bias_and_bn``), layer decay, and so on.

Run: ``python examples/timm_registration.py``.
"""
from __future__ import annotations

import torch

from fused_optim import Adan, GradientEquilibrium, Gravity, Lion


def _without_weight_decay(cls):
    """timm always passes ``weight_decay`` (0 after moving it into param groups); Gravity has none."""
    def build(params, weight_decay: float = 0.0, **kwargs):
        if weight_decay:
            raise ValueError(f"{cls.__name__} has no weight decay (got weight_decay={weight_decay})")
        params = list(params)
        for group in params:  # timm's no-decay/decay groups carry a weight_decay key: only 0 is meaningful
            if isinstance(group, dict) and group.pop("weight_decay", 0.0):
                raise ValueError(f"{cls.__name__} has no weight decay; pass weight_decay=0")
        return cls(params, **kwargs)
    build.__name__ = cls.__name__
    return build


def register_with_timm(prefix: str = "fused", registry=None) -> list[str]:
    """Register the optimizers in `registry` (timm's default one if None); returns the names added."""
    from timm.optim._optim_factory import OptimInfo, default_registry

    if "_" in prefix:
        raise ValueError("timm splits optimizer names on '_' (modifier_optimizer): use a prefix without one")
    registry = default_registry if registry is None else registry
    infos = [
        OptimInfo(name=f"{prefix}lion", opt_class=Lion, description="fused_optim Lion (sign of interpolated momentum)",
                  has_eps=False, has_betas=True),
        OptimInfo(name=f"{prefix}adan", opt_class=Adan, description="fused_optim Adan (sail-sg op order)",
                  has_betas=True, num_betas=3),
        OptimInfo(name=f"{prefix}gravity", opt_class=_without_weight_decay(Gravity),
                  description="fused_optim Gravity (per-tensor max|g| bounded step)", has_eps=False),
        OptimInfo(name=f"{prefix}equilibrium", opt_class=GradientEquilibrium,
                  description="fused_optim GradientEquilibrium (g - mean(g))", has_eps=False),
    ]
    for info in infos:
        registry.register(info)
    return [info.name for info in infos]


if __name__ == "__main__":
    from timm.optim import create_optimizer_v2

    names = register_with_timm()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    for name in names:
        wd = 0.0 if name.endswith("gravity") else 0.05
        opt = create_optimizer_v2(model, opt=name, lr=1e-3, weight_decay=wd)
        print(f"{name:28s} -> {type(opt).__name__} with {len(opt.param_groups)} param groups")
