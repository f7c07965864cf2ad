"""All-or-nothing: a step, a load or a composite's closure that is refused changes nothing.

For every exported optimizer and composite and every impl that runs on the CPU, the params and the whole
state_dict are compared before and after each refused call:

- a param's state that no longer fits it (wrong shape, dtype, a missing or unknown key, the model
  converted with ``.double()``), or a dtype the chosen impl does not handle: refused by ``step()``
  before any counter, state or param changes;
- ``load_state_dict`` of another optimizer's state, of a wrong shape, missing key, another number of
  groups or params, or a non-finite hyperparameter: refused before anything loads, naming the param id
  and the key; checkpoints lacking only group keys (upstream ones) still load;
- SAM / NeuroOptima: a closure that raises at the perturbed point (KeyboardInterrupt included) leaves
  the params, grads and state as before the step;
- loaded state never shares storage with the source dict;
- Lookahead's sync never fails after the inner step ran.
"""
from __future__ import annotations

import math

import pytest
import torch

import fused_optim
from fused_optim.optimizer import FusedOptimizer
from reliability_util import (NEEDS_CLOSURE, Problem, assert_identical, combos, cpu_impls, exported_optimizers,
                              make_optimizer, make_params, run_steps, snapshot)
from reliability_util import triton_interpreter  # noqa: F401 (an autouse fixture)

IMPLS = cpu_impls()
OPTIMIZERS = exported_optimizers()
WITH_STATE = [c for c in OPTIMIZERS if c.__name__ not in ("GradientEquilibrium", "GradientEquilibrum")]


def _fused(opt) -> FusedOptimizer:
    """The optimizer that holds the state (a wrapper's inner one)."""
    return getattr(opt, "_inner", opt)


def _started(cls, impl, seed=0, steps=2):
    params = make_params(cls, seed)
    torch.manual_seed(seed)
    opt = make_optimizer(cls, params, impl)
    problem = Problem(params, seed=seed + 1)
    run_steps(opt, problem, steps)
    return opt, params, problem


def _one_step(opt, problem):
    run_steps(opt, problem, 1)


def _victim(opt):
    """The last param with state, and a param-shaped key of its state (not Muon's int `step`)."""
    inner = _fused(opt)
    params = [p for g in inner.param_groups for p in g["params"]]
    for p in reversed(params):
        st = inner.state.get(p)
        if st:
            key = next(k for k, v in st.items() if isinstance(v, torch.Tensor) and v.shape == p.shape)
            return p, key
    raise AssertionError("no param has state")


def _refused(opt, params, problem, exc=(RuntimeError, ValueError, TypeError), match=None):
    before = snapshot(opt, params)
    k = problem.k
    with pytest.raises(exc, match=match):
        _one_step(opt, problem)
    problem.k = k
    assert_identical(before, snapshot(opt, params))


# ---------------------------------------------------------------------------------------------- step
STATE_EDITS = {
    "wrong-shape": lambda st, key, p: st.__setitem__(key, torch.zeros(p.numel() + 1, dtype=st[key].dtype)),
    "wrong-dtype": lambda st, key, p: st.__setitem__(key, st[key].double()),
    "missing-key": lambda st, key, p: st.pop(key),
    "unknown-key": lambda st, key, p: st.__setitem__("momentum", torch.zeros_like(st[key])),
}


@pytest.mark.parametrize("edit", list(STATE_EDITS))
@pytest.mark.parametrize("cls,impl", combos(WITH_STATE, IMPLS))
def test_state_that_does_not_fit_is_refused_before_anything_changes(cls, impl, edit):
    opt, params, problem = _started(cls, impl)
    p, key = _victim(opt)
    st = _fused(opt).state[p]
    if edit == "missing-key" and key in _fused(opt)._optional_state_keys:
        key = _fused(opt)._state_spec(next(g for g in opt.param_groups if any(q is p for q in g["params"])))[0][0]
    STATE_EDITS[edit](st, key, p)
    if not st and not _fused(opt)._state_from_init:
        pytest.skip("its only state key removed: an empty state is a fresh one, created at the next step")
    name = "momentum" if edit == "unknown-key" else key
    _refused(opt, params, problem, match=f"parameter \\d+ of group \\d+.*{name}")


@pytest.mark.parametrize("cls,impl", combos(WITH_STATE, IMPLS))
def test_model_converted_to_double_after_the_state_exists_is_refused(cls, impl):
    """``model.double()`` replaces each param's data: the state (fp32) no longer fits; the native Gravity
    step used to raise a dtype error after its counter ``t`` had advanced."""
    opt, params, problem = _started(cls, impl)
    for p in params:
        p.data = p.data.double()
    problem.targets = [t.double() for t in problem.targets]
    problem.noise = [[n.double() for n in ns] for ns in problem.noise]
    _refused(opt, params, problem)


# besides the state edits: the model converted, two params' dicts swapped, a param's dict replaced
@pytest.mark.parametrize("edit", [*STATE_EDITS, "double", "swapped-dicts", "new-dict"])
@pytest.mark.parametrize("cls", WITH_STATE, ids=lambda c: c.__name__)
def test_edit_after_many_steps_is_refused(cls, edit):
    """After a few steps a param's checks are recorded and later steps only compare against the record
    (`_collect`): every edit must still invalidate it."""
    impl = "foreach" if "foreach" in IMPLS else IMPLS[0]
    opt, params, problem = _started(cls, impl, steps=4)
    inner = _fused(opt)
    p, key = _victim(opt)
    st = inner.state[p]
    if edit == "double":
        for q in params:
            q.data = q.data.double()
        problem.targets = [t.double() for t in problem.targets]
        problem.noise = [[n.double() for n in ns] for ns in problem.noise]
        _refused(opt, params, problem)
        return
    if edit == "swapped-dicts":
        other = next((q for q in inner.state if q is not p and inner.state[q] and q.shape != p.shape), None)
        if other is None:
            pytest.skip("no other param with state of another shape")
        inner.state[p], inner.state[other] = inner.state[other], inner.state[p]
        _refused(opt, params, problem, match="parameter \\d+ of group \\d+")
        return
    if edit == "new-dict":
        inner.state[p] = {**st, key: torch.zeros(p.numel() + 1, dtype=st[key].dtype)}
        _refused(opt, params, problem, match=f"parameter \\d+ of group \\d+.*{key}")
        return
    if edit == "missing-key" and key in inner._optional_state_keys:
        key = inner._state_spec(next(g for g in opt.param_groups if any(q is p for q in g["params"])))[0][0]
    STATE_EDITS[edit](st, key, p)
    if not st and not inner._state_from_init:
        pytest.skip("its only state key removed: an empty state is a fresh one, created at the next step")
    name = "momentum" if edit == "unknown-key" else key
    _refused(opt, params, problem, match=f"parameter \\d+ of group \\d+.*{name}")


@pytest.mark.skipif("triton" not in IMPLS, reason="triton is not importable")
@pytest.mark.parametrize("cls", [c for c in OPTIMIZERS if c.__name__ not in ("Muon", "MuonWithAuxAdam")],
                         ids=lambda c: c.__name__)
def test_dtype_the_impl_does_not_handle_is_refused_before_the_counters_move(cls):
    params = make_params(cls, 0, dtype=torch.float64)
    torch.manual_seed(0)
    opt = make_optimizer(cls, params, "triton")
    problem = Problem(params, seed=1)
    _refused(opt, params, problem, exc=TypeError, match="float64")


# ---------------------------------------------------------------------------------------------- load
def _sd_copy(sd):
    from reliability_util import _clone

    return _clone(sd)


def _load_refused(opt, params, sd, match):
    before = snapshot(opt, params)
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(sd)
    assert_identical(before, snapshot(opt, params))


@pytest.mark.parametrize("cls", WITH_STATE, ids=lambda c: c.__name__)
def test_load_of_another_optimizers_state_is_refused(cls):
    opt, params, _ = _started(cls, "foreach")
    other_params = [p.detach().clone().requires_grad_() for p in params]
    adamw = torch.optim.AdamW(other_params)
    for p in other_params:
        p.grad = torch.ones_like(p)
    adamw.step()
    _load_refused(opt, params, adamw.state_dict(), match="parameter \\d+.*(step|exp_avg|another optimizer)|betas")


@pytest.mark.parametrize("cls", [fused_optim.Adan, fused_optim.NeuroOptima, fused_optim.Gravity,
                                 fused_optim.Muon], ids=lambda c: c.__name__)
def test_load_of_a_lion_state_dict_is_refused(cls):
    opt, params, _ = _started(cls, "foreach")
    lion_params = [p.detach().clone().requires_grad_() for p in params]
    lion = fused_optim.Lion(lion_params)
    for p in lion_params:
        p.grad = torch.ones_like(p)
    lion.step()
    _load_refused(opt, params, lion.state_dict(), match="another optimizer|betas|unknown key|lacks")


LOAD_EDITS = {
    "wrong-shape": lambda st, key, p: st.__setitem__(key, torch.zeros(p.numel() + 1)),
    "not-a-tensor": lambda st, key, p: st.__setitem__(key, 1.0),
    "missing-key": lambda st, key, p: st.pop(key),
    "unknown-key": lambda st, key, p: st.__setitem__("momentum", torch.zeros(p.shape)),
}


@pytest.mark.parametrize("edit", list(LOAD_EDITS))
@pytest.mark.parametrize("cls", WITH_STATE, ids=lambda c: c.__name__)
def test_load_of_state_that_does_not_fit_is_refused_naming_param_and_key(cls, edit):
    opt, params, _ = _started(cls, "foreach")
    fresh_params = [p.detach().clone().requires_grad_() for p in params]
    torch.manual_seed(5)
    fresh = make_optimizer(cls, fresh_params, "foreach")
    sd = _sd_copy(opt.state_dict())
    pid = max(pid for pid, st in sd["state"].items()
              if any(isinstance(v, torch.Tensor) and v.ndim and k not in _wrapper_keys() for k, v in st.items()))
    st = sd["state"][pid]
    p = [q for g in fresh.param_groups for q in g["params"]][pid]
    required = _required_keys(fresh, p)
    key = next(k for k in st if k in required and isinstance(st[k], torch.Tensor))
    LOAD_EDITS[edit](st, key, p)
    if not set(st) - set(_wrapper_keys()) and not _fused(fresh)._state_from_init:
        pytest.skip("its only state key removed: an empty state is a fresh one, created at the next step")
    name = "momentum" if edit == "unknown-key" else key
    _load_refused(fresh, fresh_params, sd, match=f"parameter {pid}\\b.*{name}")


def _wrapper_keys():
    return ("lookahead_slow", "sam_old_param")


def _required_keys(opt, p):
    inner = _fused(opt)
    group = next(g for g in inner.param_groups if any(q is p for q in g["params"]))
    return inner._state_spec(group)[0]


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_load_with_another_number_of_groups_or_params_is_refused(cls):
    opt, params, _ = _started(cls, "foreach")
    sd = opt.state_dict()
    fewer = _sd_copy(sd)
    fewer["param_groups"][0]["params"] = fewer["param_groups"][0]["params"][:-1]
    _load_refused(opt, params, fewer, match="size|params")
    more = _sd_copy(sd)
    more["param_groups"].append(dict(more["param_groups"][0], params=[]))
    _load_refused(opt, params, more, match="number of parameter groups")


NON_FINITE_GROUP_VALUES = {
    "Gravity": ("lr", math.inf), "Lion": ("weight_decay", math.inf), "Adan": ("eps", math.inf),
    "GradientEquilibrium": ("lr", math.nan), "GradientEquilibrum": ("lr", math.inf),
    "NeuroOptima": ("lookahead_alpha", math.nan), "Muon": ("lr", math.inf), "MuonWithAuxAdam": ("lr", math.nan),
    "Lookahead": ("lookahead_alpha", math.nan), "SAM": ("rho", math.inf),
}


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_load_of_a_non_finite_hyperparameter_is_refused(cls):
    opt, params, _ = _started(cls, "foreach")
    # a declared optimizer without an entry (a newly added one): its first float hyperparameter, NaN
    key, value = NON_FINITE_GROUP_VALUES.get(cls.__name__) or next(
        (h.name, math.nan) for h in cls.declaration.hypers if h.kind == "float")
    sd = _sd_copy(opt.state_dict())
    for g in sd["param_groups"]:
        g[key] = value
    _load_refused(opt, params, sd, match=f"alpha|lr|rho|eps|weight_decay|{key}")


@pytest.mark.parametrize("cls", OPTIMIZERS, ids=lambda c: c.__name__)
def test_checkpoint_lacking_group_keys_loads_and_resumes(cls):
    """Upstream checkpoints have no ``maximize`` (and no impl keys): the group keeps its current value, and
    the resumed run follows the uninterrupted one exactly."""
    ref, ref_params, ref_problem = _started(cls, "foreach", steps=3)
    opt, params, problem = _started(cls, "foreach", steps=1)
    sd = _sd_copy(opt.state_dict())
    for g in sd["param_groups"]:
        g.pop("maximize", None)
    params2 = [p.detach().clone().requires_grad_() for p in params]
    torch.manual_seed(7)
    opt2 = make_optimizer(cls, params2, "foreach")
    opt2.load_state_dict(sd)
    assert all(g.get("maximize", False) is False for g in opt2.param_groups)
    problem2 = Problem(params2, seed=1)
    problem2.k = problem.k
    run_steps(opt2, problem2, 2)
    for a, b in zip(params2, ref_params):
        assert torch.equal(a, b)


def test_muon_load_keeps_an_adam_group_adam():
    """A saved group without ``use_muon`` keeps the current group's kind: it must not become a Muon
    group (the constructor default), and a use_muon group holding 1-D params is refused."""
    mats = [torch.randn(4, 3, requires_grad=True)]
    vecs = [torch.randn(5, requires_grad=True)]
    opt = fused_optim.MuonWithAuxAdam([{"params": mats, "use_muon": True}, {"params": vecs, "use_muon": False}])
    for p in mats + vecs:
        p.grad = torch.randn_like(p)
    opt.step()
    sd = _sd_copy(opt.state_dict())
    for g in sd["param_groups"]:
        g.pop("use_muon")
    opt.load_state_dict(sd)
    assert [g["use_muon"] for g in opt.param_groups] == [True, False]
    opt.step()
    bad = _sd_copy(opt.state_dict())
    bad["param_groups"][1]["use_muon"] = True
    bad["state"].pop(1)
    _load_refused(opt, mats + vecs, bad, match="1-D")


def test_muon_group_with_1d_params_refused_at_step_when_edited():
    mats = [torch.randn(4, 3, requires_grad=True)]
    vecs = [torch.randn(5, requires_grad=True)]
    opt = fused_optim.MuonWithAuxAdam([{"params": mats, "use_muon": True}, {"params": vecs, "use_muon": False}])
    opt.param_groups[1]["use_muon"] = True
    for p in mats + vecs:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in mats + vecs]
    with pytest.raises(ValueError, match="1-D"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, mats + vecs))


# ---------------------------------------------------------------------------------------------- sharing
def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)


@pytest.mark.parametrize("cls", WITH_STATE, ids=lambda c: c.__name__)
def test_loaded_state_never_shares_storage_with_the_source(cls):
    opt, params, _ = _started(cls, "foreach")
    sd = opt.state_dict()
    source = {t.untyped_storage().data_ptr() for t in _tensors(sd) if t.numel()}
    copies = []
    for seed in (1, 2):
        ps = [p.detach().clone().requires_grad_() for p in params]
        torch.manual_seed(seed)
        o = make_optimizer(cls, ps, "foreach")
        o.load_state_dict(sd)
        copies.append((o, ps))
        inner = _fused(o)
        loaded = [t for t in _tensors(dict(inner.state)) if t.numel()]
        loaded += [t for t in _tensors(getattr(o, "_slow", {})) if t.numel()]
        assert not {t.untyped_storage().data_ptr() for t in loaded} & source
    # the two loaded optimizers evolve independently of each other and of the source
    before = snapshot(copies[1][0], copies[1][1])
    run_steps(copies[0][0], Problem(copies[0][1], seed=9), 2)
    assert_identical(before, snapshot(copies[1][0], copies[1][1]))


def test_muon_adam_step_tensor_is_not_shared_with_the_source():
    """A checkpoint whose per-param Adam ``step`` is a tensor (torch's Adam layout): incremented in place
    by the loaded optimizer, it must not count for the source dict (or a second optimizer)."""
    vecs = [torch.randn(5, requires_grad=True)]
    opt = fused_optim.MuonWithAuxAdam([{"params": vecs, "use_muon": False}])
    vecs[0].grad = torch.randn(5)
    opt.step()
    sd = _sd_copy(opt.state_dict())
    sd["state"][0]["step"] = torch.tensor(1.0)
    a = fused_optim.MuonWithAuxAdam([{"params": [vecs[0].detach().clone().requires_grad_()], "use_muon": False}])
    b = fused_optim.MuonWithAuxAdam([{"params": [vecs[0].detach().clone().requires_grad_()], "use_muon": False}])
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    for o in (a, b):
        for p in o.param_groups[0]["params"]:
            p.grad = torch.randn(5)
    a.step()
    assert float(sd["state"][0]["step"]) == 1.0
    assert float(next(iter(b.state.values()))["step"]) == 1.0


# ---------------------------------------------------------------------------------------------- composites
class _Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.parametrize("error", [RuntimeError, _Interrupt], ids=["exception", "KeyboardInterrupt"])
@pytest.mark.parametrize("cls,impl", combos([c for c in OPTIMIZERS if c.__name__ in NEEDS_CLOSURE], IMPLS))
def test_closure_raising_at_the_perturbed_point_restores_everything(cls, impl, error):
    opt, params, problem = _started(cls, impl)
    calls = []

    def closure():
        calls.append(1)
        loss = problem.closure()
        if len(calls) == 1:  # the grads are present, so the first call is the evaluation at p + e(p)
            raise error("interrupted at the perturbed point")
        return loss

    problem.closure()  # grads present: step() perturbs at once, the closure's first call is at p + e(p)
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    before = snapshot(opt, params)
    with pytest.raises(error):
        opt.step(closure)
    assert_identical(before, snapshot(opt, params))
    for p, g in zip(params, grads):
        assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
    run_steps(opt, problem, 1)  # usable afterwards (not "first_step() called twice")


@pytest.mark.parametrize("impl", ["forloop", "foreach"])
def test_lookahead_sync_cannot_fail_after_the_inner_step(impl):
    """A slow weight that no longer fits its param (a converted model) or an alpha edited to NaN is
    refused before the inner optimizer steps."""
    params = make_params(fused_optim.Lion, 0)
    opt = fused_optim.Lookahead(fused_optim.Lion(params, impl=impl), k=2)
    problem = Problem(params, seed=1)
    run_steps(opt, problem, 1)
    opt.alpha = float("nan")
    _refused(opt, params, problem, match="alpha")
    opt.alpha = 0.5
    opt._slow[params[0]] = opt._slow[params[0]].double()
    _refused(opt, params, problem, match="slow weight")


def test_lookahead_load_of_nan_alpha_is_refused_before_the_inner_loads():
    params = make_params(fused_optim.Lion, 0)
    opt = fused_optim.Lookahead(fused_optim.Lion(params), k=2)
    run_steps(opt, Problem(params, seed=1), 3)
    sd = _sd_copy(opt.state_dict())
    for g in sd["param_groups"]:
        g["lookahead_alpha"] = float("nan")
        g["lr"] = 0.5  # would change the inner optimizer if it loaded first
    _load_refused(opt, params, sd, match="alpha")


def test_lookahead_refused_inner_step_captures_no_slow_weight():
    params = make_params(fused_optim.Lion, 0)
    opt = fused_optim.Lookahead(fused_optim.Lion(params), k=2)
    params[0].grad = torch.zeros_like(params[0])
    params[0].grad.data = torch.zeros(3)  # torch refuses `p.grad = bad`; `.data` slips past it
    with pytest.raises(RuntimeError):
        opt.step()
    assert opt._slow == {} and opt.lookahead_step == 0
