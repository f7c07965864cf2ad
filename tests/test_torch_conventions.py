"""torch.optim's conventions, for every exported optimizer and composite and every CPU impl.

- ``copy.deepcopy`` and ``pickle`` give an optimizer that steps exactly as the original would;
- named parameters (``model.named_parameters()``, named param groups) are taken as torch (>= 2.6)
  takes them, with ``param_names`` in the state_dict;
- ``fused=False`` never selects a fused impl, ``foreach=False`` is the for-loop;
- a param whose memory overlaps itself (``expand``) or another param (a view) is refused at
  ``add_param_group``, before the group exists.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import fused_optim
from fused_optim.optimizer import FusedOptimizer
from reliability_util import (Problem, assert_identical, combos, cpu_impls, exported_optimizers, make_optimizer,
                              make_params, run_steps, snapshot)
from reliability_util import triton_interpreter  # noqa: F401 (an autouse fixture)

IMPLS = cpu_impls()
OPTIMIZERS = exported_optimizers()
FUSED_CLASSES = [c for c in OPTIMIZERS if issubclass(c, FusedOptimizer)]


def _pickle_copy(obj):
    buf = io.BytesIO()
    pickle.dump(obj, buf)
    buf.seek(0)
    return pickle.load(buf)


COPIES = {"deepcopy": copy.deepcopy, "pickle": _pickle_copy}


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("cls,impl", combos(OPTIMIZERS, IMPLS))
def test_copy_steps_exactly_as_the_original(cls, impl, how):
    params = make_params(cls, 0)
    torch.manual_seed(0)
    opt = make_optimizer(cls, params, impl)
    problem = Problem(params, seed=1)
    run_steps(opt, problem, 2)
    params2, opt2 = COPIES[how]((params, opt))
    assert type(opt2) is type(opt)
    problem2 = Problem(params2, seed=1)
    problem2.k = problem.k
    assert_identical(snapshot(opt, params), snapshot(opt2, params2))
    run_steps(opt, problem, 3)
    run_steps(opt2, problem2, 3)
    assert_identical(snapshot(opt, params), snapshot(opt2, params2))
    for p, q in zip(params, params2):
        assert p.untyped_storage().data_ptr() != q.untyped_storage().data_ptr() or p.numel() == 0


# ---------------------------------------------------------------------------------------------- names
def _named(params):
    return [(f"layer{i}.weight", p) for i, p in enumerate(params)]


@pytest.mark.parametrize("cls,impl", combos(OPTIMIZERS, IMPLS))
def test_named_parameters_are_taken_as_torch_takes_them(cls, impl):
    params = make_params(cls, 0)
    named_params = [p.detach().clone().requires_grad_() for p in params]
    torch.manual_seed(0)
    plain = make_optimizer(cls, params, impl)
    torch.manual_seed(0)
    named = make_optimizer(cls, _named(named_params), impl)
    sd = named.state_dict()
    assert sd["param_groups"][0]["param_names"] == [n for n, _ in _named(params)]
    torch_sd = torch.optim.AdamW(_named(named_params)).state_dict()
    assert torch_sd["param_groups"][0]["param_names"] == sd["param_groups"][0]["param_names"]
    p1, p2 = Problem(params, seed=1), Problem(named_params, seed=1)
    run_steps(plain, p1, 2)
    run_steps(named, p2, 2)
    for a, b in zip(params, named_params):
        assert torch.equal(a, b)
    # the names survive a round trip, and a named checkpoint loads into a named optimizer
    again = [p.detach().clone().requires_grad_() for p in named_params]
    torch.manual_seed(3)
    other = make_optimizer(cls, _named(again), impl)
    other.load_state_dict(named.state_dict())
    assert other.state_dict()["param_groups"][0]["param_names"] == sd["param_groups"][0]["param_names"]


@pytest.mark.parametrize("cls", [c for c in OPTIMIZERS if c.__name__ != "Lookahead"], ids=lambda c: c.__name__)
def test_named_param_groups_and_mixing_rules(cls):
    params = make_params(cls, 0)
    extra = {"use_muon": True} if cls.__name__ == "MuonWithAuxAdam" else {}
    groups = [{"params": _named(params[:2]), **extra}, {"params": _named(params[2:4]), "lr": 0.003, **extra}]
    torch.manual_seed(0)
    opt = make_optimizer(cls, groups, "foreach") if cls.__name__ != "MuonWithAuxAdam" else cls(groups)
    names = [g["param_names"] for g in opt.state_dict()["param_groups"]]
    assert names == [["layer0.weight", "layer1.weight"], ["layer0.weight", "layer1.weight"]]
    with pytest.raises(ValueError, match="with/without names"):
        opt.add_param_group({"params": [params[4]], **extra})  # an unnamed group after named ones
    with pytest.raises(ValueError, match="names"):
        make_optimizer(cls, [("a", params[0]), params[1]], "foreach")


# ---------------------------------------------------------------------------------------------- impls
@pytest.mark.parametrize("cls", FUSED_CLASSES, ids=lambda c: c.__name__)
def test_fused_false_never_selects_a_fused_impl(cls):
    params = make_params(cls, 0)
    if cls.__name__ == "MuonWithAuxAdam":
        params = [{"params": params, "use_muon": True}]
    assert cls(params, fused=False).impl_for("cpu") not in ("triton", "native")
    assert cls(params, fused=False, foreach=False).impl_for("cpu") == "forloop"
    assert cls(params, foreach=False).impl_for("cpu") == "forloop"
    with pytest.raises(ValueError, match="fused"):
        cls(params, fused=False, impl="native")
    with pytest.raises(ValueError, match="fused"):
        cls(params, fused=False, impl="triton")


def test_composites_with_fused_false_use_no_fused_impl():
    params = make_params(fused_optim.Lion, 0)
    la = fused_optim.Lookahead(fused_optim.Lion(params, fused=False))
    assert la._impl_for(torch.device("cpu")) not in ("triton", "native")
    sam = fused_optim.SAM(params, fused_optim.Lion, fused=False)
    assert sam._impl_for(torch.device("cpu")) not in ("triton", "native")


# ---------------------------------------------------------------------------------------------- overlap
@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_params_with_overlapping_memory_are_refused(cls):
    def build(ps):
        return make_optimizer(cls, ps, "foreach")

    expanded = torch.randn(1, 3).expand(4, 3).requires_grad_()
    with pytest.raises(ValueError, match="internally overlapping"):
        build([expanded])
    base = torch.randn(6, 4)
    with pytest.raises(ValueError, match="overlaps in memory"):
        build([base[:4].requires_grad_(), base[2:].requires_grad_()])
    with pytest.raises(ValueError, match="overlaps in memory"):
        build([base.requires_grad_(), base.view(4, 6).requires_grad_()])
    # disjoint views of one buffer (e.g. a flat parameter's views) and interleaved ones are fine
    flat = torch.randn(8, 4)
    build([flat[:4].requires_grad_(), flat[4:].requires_grad_()])
    build([flat[:, ::2].requires_grad_(), flat[:, 1::2].requires_grad_()])


@pytest.mark.parametrize("cls", [c for c in OPTIMIZERS if c.__name__ != "Lookahead"], ids=lambda c: c.__name__)
def test_add_param_group_refuses_a_view_of_an_existing_param(cls):
    base = torch.randn(6, 4)
    first = base[:3].requires_grad_()
    torch.manual_seed(0)
    opt = make_optimizer(cls, [first], "foreach")
    groups_before = len(opt.param_groups)
    extra = {"use_muon": True} if "Muon" in cls.__name__ else {}
    with pytest.raises(ValueError, match="overlaps in memory with parameter 0 of group 0"):
        opt.add_param_group({"params": [base[2:].requires_grad_()], **extra})
    assert len(opt.param_groups) == groups_before
    opt.add_param_group({"params": [base[3:].requires_grad_()], **extra})  # adjacent, not overlapping
