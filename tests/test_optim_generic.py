"""torch's generic optimizer tests (``test/test_optim.py``, the OptimizerInfo suite), restated for our
optimizers and composites on every CPU impl. Written from what those tests check, not copied:

- ``state_dict`` is deterministic: loaded into a fresh optimizer (directly, through a ``deepcopy`` of
  the dict, and through ``torch.save``/``torch.load(weights_only=True)``) the run continues exactly;
- a state_dict saved by a named optimizer loads into an unnamed one and the reverse;
- the state_dict and load_state_dict hooks (pre, post, prepend) run, as torch runs them;
- the step pre/post hooks run around our ``step``;
- ``deepcopy`` keeps every public attribute;
- a step with no grads changes nothing; a step with grads leaves state for every param with a grad;
- ``repr`` works; an lr given as a 0-d tensor steps exactly as the same float.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch

from fused_optim.optimizer import FusedOptimizer
from reliability_util import (Problem, assert_identical, combos, cpu_impls, exported_optimizers, make_optimizer,
                              make_params, run_steps, snapshot)
from reliability_util import triton_interpreter  # noqa: F401 (an autouse fixture)

IMPLS = cpu_impls()
OPTIMIZERS = exported_optimizers()
CASES = combos(OPTIMIZERS, IMPLS)


def _build(cls, impl, seed=0, named=False, **kw):
    params = make_params(cls, seed)
    torch.manual_seed(seed)
    given = [(f"w{i}", p) for i, p in enumerate(params)] if named else params
    return make_optimizer(cls, given, impl, **kw), params


def _weights_only_roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


LOADERS = {"direct": lambda sd: sd, "deepcopy": copy.deepcopy, "weights_only": _weights_only_roundtrip}


@pytest.mark.parametrize("loader", list(LOADERS))
@pytest.mark.parametrize("cls,impl", CASES)
def test_state_dict_deterministic(cls, impl, loader):
    opt, params = _build(cls, impl)
    problem = Problem(params, seed=1)
    run_steps(opt, problem, 2)
    sd = LOADERS[loader](opt.state_dict())
    opt2, params2 = _build(cls, impl, seed=4)
    with torch.no_grad():
        for a, b in zip(params2, params):
            a.copy_(b)
    opt2.load_state_dict(sd)
    assert_identical(snapshot(opt, params), snapshot(opt2, params2))
    problem2 = Problem(params2, seed=1)
    problem2.k = problem.k
    run_steps(opt, problem, 2)
    run_steps(opt2, problem2, 2)
    assert_identical(snapshot(opt, params), snapshot(opt2, params2))


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_can_load_from_and_to_a_named_state_dict(cls):
    for save_named, load_named in ((True, False), (False, True)):
        opt, params = _build(cls, "foreach", named=save_named)
        problem = Problem(params, seed=1)
        run_steps(opt, problem, 2)
        opt2, params2 = _build(cls, "foreach", seed=4, named=load_named)
        with torch.no_grad():
            for a, b in zip(params2, params):
                a.copy_(b)
        opt2.load_state_dict(opt.state_dict())
        names = opt2.state_dict()["param_groups"][0].get("param_names")
        assert (names is not None) == (save_named or load_named)  # torch: saved names win, else ours stay
        problem2 = Problem(params2, seed=1)
        problem2.k = problem.k
        run_steps(opt, problem, 1)
        run_steps(opt2, problem2, 1)
        for a, b in zip(params, params2):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_state_dict_and_load_hooks_run_as_torch_runs_them(cls):
    opt, params = _build(cls, "foreach")
    run_steps(opt, Problem(params, seed=1), 1)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append("sd-post"))
    sd = opt.state_dict()
    if not isinstance(opt, FusedOptimizer):  # the wrappers build their dict from the inner optimizer's
        calls.extend(["sd-pre", "sd-post"])
    assert calls[:2] == ["sd-pre", "sd-post"]

    def rewrite(o, state_dict):  # a pre-hook may return a new dict: that one is loaded (and validated)
        calls.append("load-pre")
        state_dict = copy.deepcopy(state_dict)
        for g in state_dict["param_groups"]:
            g["lr"] = 0.125
        return state_dict

    opt2, _ = _build(cls, "foreach", seed=4)
    opt2.register_load_state_dict_pre_hook(rewrite)
    opt2.register_load_state_dict_pre_hook(lambda o, s: calls.append("load-pre-first"), prepend=True)
    opt2.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt2.load_state_dict(sd)
    if isinstance(opt2, FusedOptimizer):
        assert calls[2:] == ["load-pre-first", "load-pre", "load-post"]
        assert all(g["lr"] == 0.125 for g in opt2.param_groups)


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_step_pre_and_post_hooks_run(cls):
    opt, params = _build(cls, "foreach")
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    run_steps(opt, Problem(params, seed=1), 2)
    assert calls == ["pre", "post", "pre", "post"]


@pytest.mark.parametrize("cls,impl", CASES)
def test_deepcopy_copies_all_public_attrs(cls, impl):
    opt, params = _build(cls, impl)
    run_steps(opt, Problem(params, seed=1), 1)
    copied = copy.deepcopy(opt)
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    assert public == {k for k in copied.__dict__ if not k.startswith("_")}
    for key in public - {"state", "param_groups", "defaults"}:
        assert_identical(getattr(opt, key), getattr(copied, key), key)
    # torch's own __setstate__ adds its "differentiable" default to a copy
    assert_identical(opt.defaults, {k: copied.defaults[k] for k in opt.defaults}, "defaults")
    if isinstance(opt, FusedOptimizer):
        assert copied.impl == opt.impl and copied.capturable == opt.capturable


@pytest.mark.parametrize("cls,impl", CASES)
def test_step_is_noop_when_params_have_no_grad(cls, impl):
    opt, params = _build(cls, impl)
    before = snapshot(opt, params)
    if type(opt).__name__ in ("SAM", "NeuroOptima"):
        opt.step(lambda: torch.zeros(()))  # the closure computes no grads
    else:
        opt.step()
    after = snapshot(opt, params)
    assert_identical(before["params"], after["params"])
    for b, a in zip(before["state"]["state"].values(), after["state"]["state"].values()):
        assert_identical(b, a)


@pytest.mark.parametrize("cls,impl", CASES)
def test_state_exists_for_every_param_with_a_grad(cls, impl):
    opt, params = _build(cls, impl)
    run_steps(opt, Problem(params, seed=1), 1)
    inner = getattr(opt, "_inner", opt)
    spec_has_state = not isinstance(inner, FusedOptimizer) or any(
        inner._state_spec(g)[0] for g in inner.param_groups)
    if spec_has_state:
        assert all(inner.state.get(p) for p in params)
    repr(opt)  # torch's test_optimizer_can_be_printed


@pytest.mark.parametrize("cls,impl", [c for c in CASES if c.values[0].__name__ not in ("Lookahead",)])
def test_tensor_lr_steps_as_the_float(cls, impl):
    opt, params = _build(cls, impl)
    lr = opt.param_groups[0]["lr"]
    opt_t, params_t = _build(cls, impl, lr=torch.tensor(float(lr)))
    run_steps(opt, Problem(params, seed=1), 2)
    run_steps(opt_t, Problem(params_t, seed=1), 2)
    for a, b in zip(params, params_t):
        assert torch.equal(a, b)
