"""torch.compile and the torch.library custom ops of fused_optim/ops.py.

The compiled kernels (Triton, native) run as one opaque op per (device, dtype) split under
torch.compile; on the CPU the op route is exercised with the foreach impl (which the ops accept like
any impl) by adding it to `OPAQUE_IMPLS` for the test. Compiled runs must equal eager runs bit for bit
on params and every state tensor: the op calls the very same impl.
"""
from __future__ import annotations

import pytest
import torch
from spec_checks import (clone_params, grads_for_step, make_params, seeded_twins, set_grads, state_tensors,
                         step_together)
from torch._dynamo.testing import CompileCounterWithBackend

import fused_optim
from fused_optim import Adan, GradientEquilibrium, Gravity, Lion, ops
from fused_optim._backends import impl_status

SHAPES = [(0,), (1,), (7,), (13, 17), (129,)]

OPTIMIZERS = {
    "gravity": lambda ps, impl: Gravity(ps, lr=0.05, alpha=0.01, beta=0.9, impl=impl),
    "lion": lambda ps, impl: Lion(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, impl=impl),
    "adan": lambda ps, impl: Adan(ps, lr=1e-2, weight_decay=0.02, max_grad_norm=0.5, impl=impl),
    "equilibrium": lambda ps, impl: GradientEquilibrium(ps, lr=0.1, weight_decay=0.01, impl=impl),
}


def _lists(n_state, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(0,), (3,), (4, 5)]

    def mk():
        return [torch.randn(s, generator=g) for s in shapes]
    # state >= 0: valid for every optimizer (Adan's exp_avg_sq feeds a sqrt)
    return mk(), mk(), [[t.abs() for t in mk()] for _ in range(n_state)]


def _packed(*vals):
    return torch.tensor(vals, dtype=torch.float64)


OPCHECK_CASES = {
    "gravity": lambda impl: (ops.gravity, 1, (impl, _packed(0.1, 0.7)), {"maximize": False}),
    "lion": lambda impl: (ops.lion, 1, (impl, _packed(1e-3, 0.9, 0.99, 0.1)), {"maximize": True}),
    "adan": lambda impl: (ops.adan, 4,
                          (impl, _packed(1e-3, 0.98, 0.92, 0.99, 0.02, 0.08, 0.1, 1e-8, 0.01, 1.0), False,
                           None if impl == "forloop" else torch.tensor(0.5)), {"maximize": False}),
    "equilibrium": lambda impl: (ops.gradient_equilibrium, 0, (impl, _packed(0.1, 0.01)), {"maximize": False}),
}


def _skip_unavailable(impl):
    if impl == "triton":
        pytest.importorskip("triton", reason="triton is not installed")  # CPU tensors run interpreted
    if impl == "native" and not impl_status("native", "cpu").available:
        pytest.skip(impl_status("native", "cpu").reason)


@pytest.mark.parametrize("impl", ["forloop", "foreach", "triton", "native"])
@pytest.mark.parametrize("name", sorted(OPCHECK_CASES))
def test_opcheck(name, impl):
    """Schema (declared mutations), fake kernel and AOT dispatch of every op, for every impl."""
    _skip_unavailable(impl)
    op, n_state, rest, kwargs = OPCHECK_CASES[name](impl)
    params, grads, states = _lists(n_state)
    torch.library.opcheck(op, (params, grads, *states, *rest), kwargs)


@pytest.mark.parametrize("impl", ["triton", "native"])
@pytest.mark.parametrize("name", sorted(OPCHECK_CASES))
def test_opcheck_with_amp_arguments(name, impl):
    """The AMP-aware Triton and native launchers through the op: grad_scale unscales (and rewrites) the grads."""
    _skip_unavailable(impl)
    op, n_state, rest, kwargs = OPCHECK_CASES[name](impl)
    params, grads, states = _lists(n_state)
    kwargs = dict(kwargs, grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0))
    torch.library.opcheck(op, (params, grads, *states, *rest), kwargs)


def test_op_runs_the_impl_exactly():
    """Calling the op is calling the impl: same bits as the functional step."""
    params, grads, (exp_avgs,) = _lists(1, seed=3)
    p2, g2, e2 = [t.clone() for t in params], [t.clone() for t in grads], [t.clone() for t in exp_avgs]
    ops.lion(params, grads, exp_avgs, "foreach", _packed(1e-2, 0.9, 0.99, 0.1), maximize=False)
    fused_optim.lion._foreach_lion(p2, g2, e2, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)
    for a, b in zip(params + exp_avgs, p2 + e2):
        assert torch.equal(a, b)


def test_op_for_subclass_with_own_impls_is_none():
    class MyLion(Lion):
        _impls = dict(Lion._impls)

    assert ops.op_for(Lion) == "lion" and ops.op_for(MyLion) is None
    assert ops.op_for(type("L2", (Lion,), {})) == "lion"  # same impls: the op finds them


def _compare_compiled(name, impl, backend, steps=7, exact=True):
    eager_params = make_params(seed=11, shapes=SHAPES)
    comp_params = clone_params(eager_params)
    eager, comp = seeded_twins(OPTIMIZERS[name], eager_params, comp_params, impl)
    counter = CompileCounterWithBackend(backend)
    step = torch.compile(comp.step, backend=counter, fullgraph=True)  # fullgraph: a graph break fails
    for k in range(1, steps + 1):
        grads = grads_for_step(eager_params, k, missing=2 if k == 4 else None)
        set_grads(eager_params, grads)
        set_grads(comp_params, grads)
        eager.step()
        step()
        pairs = [(f"param {i}", a.detach(), b.detach()) for i, (a, b) in enumerate(zip(comp_params, eager_params))]
        pairs += [(key, a, b) for (key, a), (_, b) in zip(state_tensors(comp, comp_params),
                                                          state_tensors(eager, eager_params))]
        for what, a, b in pairs:
            if exact:
                assert torch.equal(a, b), f"{name}: {what} differs at step {k}"
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}: {what} at step {k}")
        assert comp.param_groups[0].get("t") == eager.param_groups[0].get("t")
    return counter


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_step_through_the_custom_op(name, monkeypatch):
    """fullgraph compile with the step as a custom op: no graph break, equal to eager, and the scalars
    that change every step (Gravity's beta_hat, Adan's bias corrections) do not recompile."""
    monkeypatch.setattr(ops, "OPAQUE_IMPLS", frozenset({"foreach"}))
    torch._dynamo.reset()
    counter = _compare_compiled(name, "foreach", "aot_eager")
    # first step (state created, impl cache filled), the missing-grad step (other list lengths), and
    # Adan's step==1 branch: a handful of frames, never one per step
    assert counter.frame_count <= 4, f"{name}: {counter.frame_count} compilations in 7 steps"


def test_compiled_foreach_step_with_inductor():
    """The foreach path is traced by Dynamo (no op) and compiled by Inductor, whose fused loops contract
    multiply-adds: close to eager (a near-cancelling momentum is a few ulp off), not bitwise."""
    torch._dynamo.reset()
    _compare_compiled("lion", "foreach", "inductor", steps=3, exact=False)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_triton_step_through_the_custom_op(name, monkeypatch):
    """The Triton launchers (interpreted on CPU tensors) are opaque to Dynamo: under fullgraph compile
    they run inside their op, equal to the eager Triton step bit for bit."""
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # impl="triton" is available on CPU only then
    if not impl_status("triton", "cpu").available:
        pytest.skip(impl_status("triton", "cpu").reason)
    torch._dynamo.reset()
    _compare_compiled(name, "triton", "aot_eager", steps=4)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_native_step(name):
    if not impl_status("native", "cpu").available:  # decided here, not at collection: that would build it
        pytest.skip("the native extension is not available: " + impl_status("native", "cpu").reason)
    torch._dynamo.reset()
    _compare_compiled(name, "native", "aot_eager")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["triton", "native"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_compiled_fused_step_cuda(name, impl):
    if not impl_status(impl, "cuda").available:
        pytest.skip(f"{impl}: {impl_status(impl, 'cuda').reason}")
    make = OPTIMIZERS[name]
    params = [p.detach().cuda().requires_grad_() for p in make_params(seed=5, shapes=SHAPES)]
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    torch.manual_seed(0)
    opt = make(params, impl)
    torch.manual_seed(0)
    ref = make(ref_params, impl)
    torch._dynamo.reset()
    step = torch.compile(opt.step, fullgraph=True)
    # The op runs the very same impl, so the step is bit-equal to eager, except Adan's: its global clip
    # factor min(max_grad_norm / (||g|| + eps), 1) is computed by the class outside the op, from torch
    # ops that Inductor compiles with its own reduction order and Triton's approximate fp32 division
    # (div.full; torch._inductor.config.eager_numerics.division_rounding is off by default), so the
    # factor may be an ulp or two off eager's. Measured with Inductor's CPU backend: 1 ulp of the params
    # from step 2 on. Adan's update is nearly invariant to a common scale of g, so the params stay within
    # test_compiled_foreach_step_with_inductor's tolerance.
    exact = name != "adan"
    for k in range(1, 8):
        grads = grads_for_step(params, k)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        step()
        ref.step()
        for i, (a, b) in enumerate(zip(params, ref_params)):
            if exact:
                assert torch.equal(a, b), f"{name}: param {i} differs at step {k}"
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name}: param {i} at step {k}")


def test_tensor_lr_reaches_impls_that_read_it_on_the_device(monkeypatch):
    """`fn.supports_tensor_lr`: a tensor lr is passed as is (no .item() in the class); other impls get
    the Python double. Both give the float-lr result."""
    seen = []

    def spy_lion(params, grads, exp_avgs, *, lr, **kw):
        seen.append(lr)
        fused_optim.lion._foreach_lion(params, grads, exp_avgs, lr=float(lr), **kw)

    spy_lion.supports_tensor_lr = True

    class SpyLion(Lion):
        _impls = dict(Lion._impls, foreach=spy_lion)

    params = make_params(seed=8, shapes=SHAPES)
    ref_params = clone_params(params)
    opt = SpyLion(params, lr=torch.tensor(1e-2), impl="foreach")
    ref = Lion(ref_params, lr=1e-2, impl="forloop")
    step_together(params, range(1, 4), (params, opt), (ref_params, ref))
    assert all(isinstance(lr, torch.Tensor) for lr in seen) and len(seen) == 3
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    plain = Lion(clone_params(params), lr=torch.tensor(1e-2), impl="foreach")  # foreach: a float
    calls = []
    monkeypatch.setattr(fused_optim.lion, "_foreach_lion", lambda *a, lr, **k: calls.append(lr))
    monkeypatch.setitem(Lion._impls, "foreach", fused_optim.lion._foreach_lion)
    set_grads(plain.param_groups[0]["params"], grads_for_step(params, 9))
    plain.step()
    assert calls and all(type(lr) is float for lr in calls)


def test_tensor_lr_on_the_triton_class_path(monkeypatch):
    """Gravity with a tensor lr on the Triton impl (interpreted on CPU): the launcher loads lr on the
    device, the result equals the float-lr run bit for bit (NOTES: Gravity's float path is the same op)."""
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not impl_status("triton", "cpu").available:
        pytest.skip(impl_status("triton", "cpu").reason)
    a = make_params(seed=12, shapes=SHAPES)
    b = clone_params(a)
    torch.manual_seed(0)
    opt_a = Gravity(a, lr=torch.tensor(0.05), impl="triton")
    torch.manual_seed(0)
    opt_b = Gravity(b, lr=0.05, impl="triton")
    for k in range(1, 4):
        grads = grads_for_step(a, k)
        set_grads(a, grads)
        set_grads(b, grads)
        opt_a.param_groups[0]["lr"].fill_(0.05 / k)  # a scheduler editing the tensor in place
        opt_b.param_groups[0]["lr"] = float(torch.tensor(0.05 / k))
        opt_a.step()
        opt_b.step()
        for x, y in zip(a, b):
            assert torch.equal(x, y)


# ------------------------------------------------------------------ step counters never recompile
def _counter_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5))


#: every optimizer and composite with a step counter of its own or of what it wraps (Lion and
#: GradientEquilibrium have none: they are the controls)
COUNTER_CASES = {
    "gravity": lambda m, impl: Gravity(m.parameters(), lr=0.05, impl=impl),
    "adan": lambda m, impl: Adan(m.parameters(), lr=1e-2, weight_decay=0.02, max_grad_norm=0.5, impl=impl),
    "adan-no-prox": lambda m, impl: Adan(m.parameters(), lr=1e-2, weight_decay=0.02, no_prox=True, impl=impl),
    "lion": lambda m, impl: Lion(m.parameters(), lr=1e-3, impl=impl),
    "equilibrium": lambda m, impl: GradientEquilibrium(m.parameters(), lr=0.1, impl=impl),
    "neuro_optima": lambda m, impl: fused_optim.NeuroOptima(m.parameters(), lr=1e-2, sam_rho=0.0,
                                                            lookahead_k=3, impl=impl),
    "lookahead-adan": lambda m, impl: fused_optim.Lookahead(Adan(m.parameters(), lr=1e-2, impl=impl), k=3),
    "muon": lambda m, impl: fused_optim.Muon(fused_optim.muon_param_groups(m), impl=impl),
}


def _counter_run(name, impl, mode, steps, compiled):
    model = _counter_model()
    opt = COUNTER_CASES[name](model, impl)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)) for _ in range(steps)]
    counter = CompileCounterWithBackend("aot_eager")
    counts = []

    def train(x, y):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    if mode == "step":  # torch.compile(opt.step), fullgraph: a graph break fails the test
        step = torch.compile(opt.step, backend=counter, fullgraph=True) if compiled else opt.step
        for x, y in data:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            step()
            counts.append(counter.frame_count)
    else:  # a whole training step compiled (Dynamo breaks the graph at backward, for every optimizer)
        fn = torch.compile(train, backend=counter) if compiled else train
        for x, y in data:
            fn(x, y)
            counts.append(counter.frame_count)
    return counts, [p.detach().clone() for p in model.parameters()]


def _torch_compiles_lerp_exactly() -> bool:
    """Whether torch's own compiled ``_foreach_lerp_`` equals its eager kernel bit for bit. torch 2.11's
    aot_eager decomposes lerp into ``a + w*(b - a)`` while the eager kernel switches formulas at w = 0.5:
    the last bit differs there whatever our code does (Muon's momentum and Adam side use lerp, as
    upstream does). Feature-detected, not version-checked."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4096, generator=g), torch.randn(4096, generator=g)

    def lerp(x, y):
        out = [x.clone()]
        torch._foreach_lerp_(out, [y], 0.05)
        return out[0]

    return torch.equal(lerp(a, b), torch.compile(lerp, backend="aot_eager", fullgraph=True)(a, b))


@pytest.mark.parametrize("mode", ["step", "train"])
@pytest.mark.parametrize("name", sorted(COUNTER_CASES))
def test_step_counters_never_recompile(name, mode):
    """12 compiled steps: everything is compiled by the end of step 2 (step 1 creates the state, which
    step 2's guards see), never again, as for torch's own AdamW, whose counters are tensors too. Before
    counters were tensors Dynamo guarded on ``param_groups[0]['step'] == 7`` and recompiled every step
    (Adan, Gravity, NeuroOptima, Muon's Adam side). The compiled run equals the eager one."""
    torch._dynamo.reset()
    counts, compiled = _counter_run(name, "foreach", mode, 12, compiled=True)
    assert counts[-1] == counts[1], f"{name}: compilations after each step: {counts}"
    _, eager = _counter_run(name, "foreach", mode, 12, compiled=False)
    exact = name != "muon" or _torch_compiles_lerp_exactly()
    for i, (a, b) in enumerate(zip(compiled, eager)):
        if exact:
            assert torch.equal(a, b), f"{name}: param {i} differs from the eager run"
        else:  # torch's own lerp rounding (above): a few ulp after 12 steps
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{name}: param {i} vs the eager run")


@pytest.mark.parametrize("name", ["gravity", "adan", "lion", "equilibrium"])
def test_step_counters_never_recompile_through_the_custom_op(name):
    """The compiled kernels run as custom ops under compile: the per-step scalars join the op's packed
    float64 tensor as graph values, never as guarded Python floats."""
    st = impl_status("native", "cpu")  # asked here, not at collection: collecting must build nothing
    if not st.available:
        pytest.skip(f"the native extension is not built here: {st.reason}")
    torch._dynamo.reset()
    counts, compiled = _counter_run(name, "native", "train", 12, compiled=True)
    assert counts[-1] == counts[1], f"{name}: compilations after each step: {counts}"
    _, eager = _counter_run(name, "native", "train", 12, compiled=False)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_torch_adamw_baseline_compiles_the_same_way():
    """The yardstick the test above holds us to: torch's AdamW compiles a whole training step without
    recompiling after its first steps."""
    torch._dynamo.reset()
    model = _counter_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(backend=counter)
    def train(x, y):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    counts = []
    for _ in range(12):
        train(torch.randn(8, 6), torch.randn(8, 5))
        counts.append(counter.frame_count)
    assert counts[-1] == counts[1], counts
