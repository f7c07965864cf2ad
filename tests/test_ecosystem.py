"""Ecosystem: torch LR schedulers, Hugging Face Trainer, Lightning, timm registration.

The Trainer/Lightning/timm tests run the examples in `examples/` (so the examples stay working) and are
skipped, with the reason, where those packages are not installed; the `test` and `examples` extras
install them.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from fused_optim import SAM, Adan, GradientEquilibrium, Gravity, Lion

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"fused_optim_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _importorskip(name: str):
    return pytest.importorskip(name, reason=f"{name} is not installed (the `test` and `examples` extras "
                                            "install it)")


# ---------------------------------------------------------------------------------------------- schedulers
SCHEDULED = {
    "lion": lambda ps: Lion(ps, lr=1e-2, weight_decay=0.1, impl="foreach"),
    "adan": lambda ps: Adan(ps, lr=1e-2, weight_decay=0.02, impl="foreach"),
    "gravity": lambda ps: Gravity(ps, lr=0.05, impl="foreach"),
    "equilibrium": lambda ps: GradientEquilibrium(ps, lr=0.1, impl="foreach"),
}


@pytest.mark.parametrize("name", sorted(SCHEDULED))
def test_torch_lr_scheduler_drives_our_lr(name):
    """A torch scheduler edits group["lr"]; the step must use exactly that value: the same run with the
    same lr sequence written by hand is bit-identical."""
    make = SCHEDULED[name]
    torch.manual_seed(0)
    a = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    b = [p.detach().clone().requires_grad_() for p in a]
    torch.manual_seed(1)
    opt_a = make(a)
    torch.manual_seed(1)
    opt_b = make(b)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt_a, max_lr=opt_a.param_groups[0]["lr"] * 3, total_steps=8,
                                                cycle_momentum=False)
    lrs = []
    for step in range(7):
        g = torch.Generator().manual_seed(step)
        for p, q in zip(a, b):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        lrs.append(opt_a.param_groups[0]["lr"])
        opt_b.param_groups[0]["lr"] = lrs[-1]
        opt_a.step()
        opt_b.step()
        sched.step()
        for p, q in zip(a, b):
            assert torch.equal(p, q)
    assert len(set(lrs)) == len(lrs)  # the schedule really moved the lr every step


def test_scheduler_state_dict_round_trip_with_our_optimizer():
    p = torch.nn.Parameter(torch.randn(4))
    opt = Lion([p], lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(3):
        p.grad = torch.randn(4)
        opt.step()
        sched.step()
    opt2 = Lion([torch.nn.Parameter(p.detach().clone())], lr=1e-2)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(sched.state_dict())
    sched.step()
    sched2.step()
    assert math.isclose(opt.param_groups[0]["lr"], opt2.param_groups[0]["lr"], rel_tol=0, abs_tol=0)


# ---------------------------------------------------------------------------------------------- HF Trainer
def test_hf_trainer_with_optimizer_and_scheduler(tmp_path):
    _importorskip("transformers")
    _importorskip("accelerate")
    ex = _example("hf_trainer")
    trainer = ex.train_with_optimizer_and_scheduler(str(tmp_path), max_steps=12)
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, Lion)
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    assert lrs[1] > lrs[0] and lrs[-1] < max(lrs)  # warm-up then cosine decay reached our param groups
    losses = ex.losses(trainer)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert opt.state and all("exp_avg" in s for s in opt.state.values())


def test_hf_trainer_with_optimizer_cls_and_kwargs(tmp_path):
    _importorskip("transformers")
    _importorskip("accelerate")
    ex = _example("hf_trainer")
    used = []  # the lr of every group at every Adan step, as the step reads it

    def record(opt, args, kwargs):
        if isinstance(opt, Adan):
            used.append([g["lr"] for g in opt.param_groups])

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(record)
    try:
        trainer = ex.train_with_optimizer_cls(str(tmp_path), max_steps=12, lr=3e-3)
    finally:
        hook.remove()
    opt = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    assert isinstance(opt, Adan)
    # the example's learning_rate is what the optimizer trained at: 3e-3 at the first step, then the
    # linear decay of it (not Adan's default 1e-3)
    assert len(used) == 12 and all(lrs == [3e-3, 3e-3] for lrs in used[:1]), used[:2]
    assert all(math.isclose(lrs[0], 3e-3 * (12 - k) / 12, rel_tol=1e-9) for k, lrs in enumerate(used))
    # Trainer split the params into decay / no-decay groups and passed its learning rate
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.02]
    assert opt.defaults["max_grad_norm"] == 1.0 and opt.param_groups[0]["step"] == 12
    losses = ex.losses(trainer)
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------- Lightning
def test_lightning_configure_optimizers_with_closure():
    _importorskip("lightning")
    ex = _example("lightning_module")
    closures = []

    class RecordingLion(Lion):
        def step(self, closure=None, **kw):
            closures.append(closure is not None)
            return super().step(closure, **kw)

    module = ex.TinyRegressor(lambda params: RecordingLion(params, lr=2e-2, weight_decay=0.01))
    trainer = ex.fit(module, max_steps=24)
    assert closures and all(closures)  # Lightning stepped through the closure every time
    assert len(module.losses) == 24 == trainer.global_step
    assert sum(module.losses[-8:]) < 0.5 * sum(module.losses[:8])


def test_lightning_with_sam_calls_the_closure_twice():
    _importorskip("lightning")
    ex = _example("lightning_module")
    module = ex.TinyRegressor(lambda params: SAM(params, Lion, rho=0.05, lr=2e-2))
    ex.fit(module, max_steps=16)
    assert len(module.losses) == 32  # SAM evaluates the closure at the point and at the perturbed point
    assert sum(module.losses[-8:]) < sum(module.losses[:8])


# ---------------------------------------------------------------------------------------------- timm
def test_timm_registration_helper():
    _importorskip("timm")
    from timm.optim import create_optimizer_v2, list_optimizers

    ex = _example("timm_registration")
    names = ex.register_with_timm()
    assert set(names) <= set(list_optimizers())
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 2))
    expected = {"fusedlion": Lion, "fusedadan": Adan, "fusedgravity": Gravity, "fusedequilibrium": GradientEquilibrium}
    for name in names:
        wd = 0.0 if name == "fusedgravity" else 0.05
        opt = create_optimizer_v2(model, opt=name, lr=1e-2, weight_decay=wd)
        assert isinstance(opt, expected[name])
        model(torch.randn(4, 8)).sum().backward()
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="no weight decay"):
        create_optimizer_v2(model, opt="fusedgravity", lr=1e-2, weight_decay=0.05, filter_bias_and_bn=False)
