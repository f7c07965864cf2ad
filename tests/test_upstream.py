"""Upstream compatibility (docs/spec.md §1-4): with the same seed and gradients, our optimizers follow the
implementations users run today, step for step."""
import importlib.util

import pytest
import torch

import fused_optim as fo
from spec_checks import clone_params, grads_for_step, make_params, roundtrip, set_grads, step_together
from upstream_refs import AutomlLion, SailAdan, SeedGradientEquilibrum, SeedGravity

SHAPES = [(1,), (7,), (13, 17), (129,), (2, 3, 5, 7)]  # upstream crashes on zero-size tensors


def _follow(ours_cls, ours_kw, theirs_cls, theirs_kw, impl, steps=10, seeded=False, missing=True):
    base = make_params(seed=21, shapes=SHAPES)
    pa, pb = clone_params(base), clone_params(base)
    torch.manual_seed(42)
    ours = ours_cls(pa, impl=impl, **ours_kw)
    torch.manual_seed(42)
    theirs = theirs_cls(pb, **theirs_kw)
    for step in range(1, steps + 1):
        grads = grads_for_step(base, step, missing=2 if missing and step == 4 else None)
        set_grads(pa, grads)
        set_grads(pb, grads)  # upstream Adan mutates its .grad: each side owns its copy
        ours.step()
        theirs.step()
        for i, (a, b) in enumerate(zip(pa, pb)):
            assert torch.equal(a, b), f"step {step}, param {i}: {(a - b).abs().max().item():.3g}"
    return ours, theirs, pa, pb


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
@pytest.mark.parametrize("kw", [dict(), dict(lr=0.05, alpha=0.2, beta=0.7)], ids=["default", "custom"])
def test_gravity_follows_the_seed_pytorch_gravity(impl, kw):
    ours, theirs, pa, pb = _follow(fo.Gravity, kw, SeedGravity, kw, impl)
    for a, b in zip(pa, pb):
        assert torch.equal(ours.state[a]["v"], theirs.state[b]["v"])  # same draw, same trajectory
    assert ours.param_groups[0]["t"] == theirs.param_groups[0]["t"]


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
@pytest.mark.parametrize("kw", [dict(lr=1e-3), dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1)],
                         ids=["default", "wd"])
def test_lion_follows_google_automl(impl, kw):
    ours, theirs, pa, pb = _follow(fo.Lion, kw, AutomlLion, kw, impl)
    for a, b in zip(pa, pb):
        assert torch.equal(ours.state[a]["exp_avg"], theirs.state[b]["exp_avg"])


ADAN_KW = [dict(lr=1e-2), dict(lr=1e-2, weight_decay=0.05), dict(lr=1e-2, weight_decay=0.05, no_prox=True),
           dict(lr=1e-2, max_grad_norm=1.0)]


@pytest.mark.parametrize("kw", ADAN_KW, ids=["default", "prox", "no_prox", "clip"])
def test_adan_follows_sail_sg(kw):
    ours, theirs, pa, pb = _follow(fo.Adan, kw, SailAdan, kw, "forloop")
    for a, b in zip(pa, pb):
        for key in ("exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"):
            assert torch.equal(ours.state[a][key], theirs.state[b][key]), key


@pytest.mark.parametrize("kw", ADAN_KW[:3], ids=["default", "prox", "no_prox"])
def test_adan_foreach_follows_sail_sg(kw):
    _follow(fo.Adan, kw, SailAdan, kw, "foreach")


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
def test_adan_loads_a_sail_sg_checkpoint_and_continues(impl):
    kw = dict(lr=1e-2, weight_decay=0.02)
    base = make_params(seed=5, shapes=SHAPES)
    pt = clone_params(base)
    theirs = SailAdan(pt, **kw)
    step_together(base, range(1, 5), (pt, theirs))
    ckpt = roundtrip({"p": [t.detach() for t in pt], "opt": theirs.state_dict()})
    po = [t.clone().requires_grad_() for t in ckpt["p"]]
    ours = fo.Adan(po, impl=impl, **kw)
    ours.load_state_dict(ckpt["opt"])
    step_together(base, range(5, 11), (pt, theirs), (po, ours))
    for a, b in zip(po, pt):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
def test_gradient_equilibrium_matches_the_seed_package(impl):
    _follow(fo.GradientEquilibrium, dict(lr=0.05), SeedGradientEquilibrum, dict(lr=0.05), impl)


def test_gradient_equilibrium_weight_decay_is_applied_unlike_upstream():
    p = [torch.ones(4, requires_grad=True) * torch.arange(4.0)]
    p = [p[0].detach().requires_grad_()]
    opt = fo.GradientEquilibrium(p, lr=0.1, weight_decay=0.5)
    p[0].grad = torch.zeros(4)
    opt.step()
    # g + wd*p = 0.5*[0,1,2,3], mean 0.75: p -= 0.1*(0.5*p - 0.75)
    expected = torch.arange(4.0) - 0.1 * (0.5 * torch.arange(4.0) - 0.75)
    torch.testing.assert_close(p[0].detach(), expected)


@pytest.mark.skipif(importlib.util.find_spec("timm") is None, reason="timm is not installed")
def test_adan_close_to_timm():
    from timm.optim import Adan as TimmAdan

    base = make_params(seed=9, shapes=SHAPES)
    pa, pb = clone_params(base), clone_params(base)
    ours, theirs = fo.Adan(pa, lr=1e-2, impl="forloop"), TimmAdan(pb, lr=1e-2)
    step_together(base, range(1, 21), (pa, ours), (pb, theirs))
    for a, b, p0 in zip(pa, pb, base):
        move = (b - p0).abs().max()
        assert (a - b).abs().max() <= 1e-4 * move + 1e-7


@pytest.mark.skipif(importlib.util.find_spec("ge") is None, reason="gradient-equilibrum is not installed")
def test_gradient_equilibrium_matches_the_installed_package():
    from ge.main import GradientEquilibrum as Upstream

    _follow(fo.GradientEquilibrium, dict(lr=0.05), Upstream, dict(lr=0.05), "forloop")
