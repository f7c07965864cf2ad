"""Every declared optimizer, driven by its declaration (fused_optim/declaration.py; docs/design.md,
"One declaration"): a new optimizer with a declaration is covered here without editing a table.

For each declared optimizer with impls: every impl that runs here against the reference (forloop),
a state_dict round trip, AMP (grad_scale unscaled, found_inf skips), capturable, a compiled step
through its generated custom op, and each hyperparameter's declared range (below, above,
non-finite) refused with its name, at construction and when edited into a param group. The tight,
per-optimizer bounds live in the functional tests (docs/testing.md); these are the class-level
checks every optimizer must pass.
"""
from __future__ import annotations

import inspect

import pytest
import torch
from reliability_util import cpu_impls, declared_kwargs, triton_interpreter  # noqa: F401 - autouse fixture
from spec_checks import clone_params, grads_for_step, make_params, roundtrip, set_grads, state_tensors
from torch._dynamo.testing import CompileCounterWithBackend

import fused_optim  # noqa: F401 - declares every optimizer of the library
from fused_optim import ops
from fused_optim.declaration import declared

SHAPES = [(0,), (1,), (7,), (5, 6)]
STEPS = 4

#: (declaration, class) of every optimizer with its own impls (aliases and composites have none)
DECLARED = {name: (decl, cls) for name, (decl, cls) in sorted(declared().items())
            if decl.impls and decl.alias_of is None}


def _make(name, params, impl, **extra):
    decl, cls = DECLARED[name]
    torch.manual_seed(0)  # Gravity draws its velocity at construction
    return cls(params, **{**declared_kwargs(decl), **extra}, impl=impl)


def _impls(name):
    return [i for i in DECLARED[name][0].impl_names if i in cpu_impls()]


def _cases(pred=lambda decl, impl: True):
    return [pytest.param(name, impl, id=f"{name}-{impl}") for name, (decl, _) in DECLARED.items()
            for impl in _impls(name) if pred(decl, impl)]


def _lockstep(name, a_impl, b_impl, steps=STEPS, a_extra=None, b_extra=None, exact=False):
    pa = make_params(seed=3, shapes=SHAPES)
    pb = clone_params(pa)
    a = _make(name, pa, a_impl, **(a_extra or {}))
    b = _make(name, pb, b_impl, **(b_extra or {}))
    for k in range(1, steps + 1):
        grads = grads_for_step(pa, k, missing=1 if k == 2 else None)
        set_grads(pa, grads)
        set_grads(pb, grads)
        a.step()
        b.step()
        _assert_same(name, pa, a, pb, b, k, exact)
    return a, b, pa, pb


def _assert_same(name, pa, a, pb, b, k, exact):
    pairs = [(f"param {i}", x.detach(), y.detach()) for i, (x, y) in enumerate(zip(pa, pb))]
    sa, sb = state_tensors(a, pa), state_tensors(b, pb)
    assert [key for key, _ in sa] == [key for key, _ in sb], f"{name}: state keys differ"
    pairs += [(key, x, y) for (key, x), (_, y) in zip(sa, sb)]
    for what, x, y in pairs:
        if exact:
            assert torch.equal(x, y), f"{name}: {what} differs at step {k}"
        else:
            torch.testing.assert_close(x, y, rtol=1e-5 * k, atol=1e-6 * k, msg=f"{name}: {what} at step {k}")


# ----------------------------------------------------------------------------------- the declaration
@pytest.mark.parametrize("name", sorted(declared()))
def test_declaration_is_what_the_class_runs(name):
    """The class's tables are the declaration's: registry names, impls, state keys, counters; the
    constructor's defaults are the declared ones (a default changed in one place only fails here)."""
    decl, cls = declared()[name]
    assert cls.declaration is decl
    for alias in decl.names:
        target = fused_optim.registry._lookup(alias)
        assert target is cls or getattr(target, "__self__", None) is cls, alias
        assert alias in fused_optim.optimizer_names()
    if decl.alias_of is not None or not issubclass(cls, fused_optim.optimizer.FusedOptimizer):
        return
    sig = inspect.signature(cls.__init__).parameters
    for h in decl.hypers:
        assert h.name in sig and sig[h.name].default == h.default, f"{name}: {h.name}'s default"
    if decl.impls:
        assert list(cls._impls) == list(decl.impl_names)
        for impl in decl.impls:
            fn = cls._impls[impl.name]
            for attr, value in impl.caps().items():
                assert getattr(fn, attr, False) == value, f"{name}/{impl.name}: {attr}"
        assert ops.op_for(cls) == decl.name
    assert cls._state_keys == tuple(s.key for s in decl.state if not s.optional)
    assert cls._optional_state_keys == tuple(s.key for s in decl.state if s.optional)
    assert cls._group_counters == decl.counters


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_the_op_schema_is_the_declarations(name):
    decl, _ = DECLARED[name]
    schema = getattr(ops, name)._opoverload._schema
    args = [a.name for a in schema.arguments]
    assert args[:2 + len(decl.state)] == ["params", "grads", *decl.state_args]
    assert args[-3:] == ["maximize", "grad_scale", "found_inf"]
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    assert mutated == {"params", "grads", *decl.state_args}


def test_a_name_is_declared_once():
    from fused_optim.declaration import Declaration, declare

    with pytest.raises(ValueError, match="'lion' is declared twice"):
        declare(Declaration("lion2", aliases=("lion",)))(type("Other", (), {}))
    assert "lion2" not in declared()


# ------------------------------------------------------------------------------------ behaviour
@pytest.mark.parametrize(("name", "impl"), _cases(lambda decl, impl: impl != "forloop"))
def test_impl_matches_forloop(name, impl):
    _lockstep(name, impl, "forloop")


@pytest.mark.parametrize(("name", "impl"), _cases())
def test_state_dict_round_trip(name, impl):
    """Stepped, saved, loaded into a fresh optimizer: the two continue bit for bit, and the state holds
    exactly the declared keys."""
    decl, _ = DECLARED[name]
    params = make_params(seed=4, shapes=SHAPES)
    opt = _make(name, params, impl)
    for k in range(1, 3):
        set_grads(params, grads_for_step(params, k))
        opt.step()
    for p in params:
        keys = set(opt.state.get(p, {}))
        assert keys <= {s.key for s in decl.state} | set(decl.scalar_state)
        assert {s.key for s in decl.state if not s.optional} <= keys or not keys
    other = clone_params(params)
    new = _make(name, other, impl)
    new.load_state_dict(roundtrip(opt.state_dict()))
    for k in range(3, 5):
        grads = grads_for_step(params, k)
        set_grads(params, grads)
        set_grads(other, grads)
        opt.step()
        new.step()
        _assert_same(name, params, opt, other, new, k, exact=True)


@pytest.mark.parametrize(("name", "impl"), _cases())
def test_amp_grad_scale_and_found_inf(name, impl):
    """grad_scale: the step equals the unscaled step (powers of two divide exactly); found_inf: nothing
    moves."""
    pa = make_params(seed=5, shapes=SHAPES)
    pb = clone_params(pa)
    a, b = _make(name, pa, impl), _make(name, pb, impl)
    scale = torch.tensor(8.0)
    for k in range(1, 3):
        grads = grads_for_step(pa, k)
        set_grads(pa, [g * 8 for g in grads])
        set_grads(pb, grads)
        a.step(grad_scale=scale, found_inf=torch.tensor(0.0))
        b.step()
        _assert_same(name, pa, a, pb, b, k, exact=False)
    before = [p.detach().clone() for p in pa], [t.clone() for _, t in state_tensors(a, pa)]
    set_grads(pa, [g * 8 for g in grads_for_step(pa, 9)])
    a.step(grad_scale=scale, found_inf=torch.tensor(1.0))
    assert all(torch.equal(x, y) for x, y in zip(before[0], pa))
    assert all(torch.equal(x, y) for x, (_, y) in zip(before[1], state_tensors(a, pa)))


@pytest.mark.parametrize(("name", "impl"), _cases(lambda decl, impl: any(i.capturable for i in decl.impls)))
def test_capturable_matches(name, impl):
    """capturable=True (device counters, device scalars where the impl reads them) steps like the host
    path."""
    _lockstep(name, impl, impl, a_extra={"capturable": True})


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_compiled_step_through_the_generated_op(name, monkeypatch):
    """fullgraph torch.compile with the step as its generated custom op (the foreach impl routed through
    the op, as test_compile.py does): bit-equal to eager."""
    monkeypatch.setattr(ops, "OPAQUE_IMPLS", frozenset({"foreach"}))
    calls = []
    real = ops.run_as_op
    monkeypatch.setattr(ops, "run_as_op", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch._dynamo.reset()
    pa = make_params(seed=6, shapes=SHAPES)
    pb = clone_params(pa)
    eager, comp = _make(name, pa, "foreach"), _make(name, pb, "foreach")
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(comp.step, backend=counter, fullgraph=True)
    for k in range(1, STEPS + 1):
        grads = grads_for_step(pa, k)
        set_grads(pa, grads)
        set_grads(pb, grads)
        eager.step()
        step()
        _assert_same(name, pb, comp, pa, eager, k, exact=True)
    assert calls, f"{name}: the compiled step did not go through its op"


# ----------------------------------------------------------------------------------- validation
def _range_cases():
    out = []
    for name, (decl, _) in DECLARED.items():
        for h in decl.hypers:
            for bad in h.invalid_values():
                out.append(pytest.param(name, h.name, bad, id=f"{name}-{h.name}-{bad!r}"))
    return out


def _mentions(h, message):
    return (h.label or h.name).split("[")[0].rstrip("s") in message


@pytest.mark.parametrize(("name", "key", "bad"), _range_cases())
def test_hyperparameter_out_of_range_is_refused(name, key, bad):
    """At construction, and edited into a param group (then the step refuses it before any tensor
    changes)."""
    decl, cls = DECLARED[name]
    h = decl.hyper(key)
    with pytest.raises((ValueError, TypeError)) as exc:
        cls(make_params(seed=7, shapes=SHAPES), **{**declared_kwargs(decl), key: bad})
    assert _mentions(h, str(exc.value)), str(exc.value)
    params = make_params(seed=7, shapes=SHAPES)
    opt = _make(name, params, "forloop")
    opt.param_groups[0][key] = bad
    set_grads(params, grads_for_step(params, 1))
    before = [p.detach().clone() for p in params] + [t.clone() for _, t in state_tensors(opt, params)]
    counters = {c: float(opt.param_groups[0][c]) for c in decl.counters}
    with pytest.raises((ValueError, TypeError)) as exc:
        opt.step()
    assert _mentions(h, str(exc.value)), str(exc.value)
    after = [p.detach() for p in params] + [t for _, t in state_tensors(opt, params)]
    assert len(before) == len(after) and all(torch.equal(x, y) for x, y in zip(before, after))
    assert counters == {c: float(opt.param_groups[0][c]) for c in decl.counters}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_declared_defaults_are_valid(name):
    decl, _ = DECLARED[name]
    for h in decl.hypers:
        h.check(h.default)
