"""The base class's torch conventions: validation, closure, maximize, sparse/complex params, lr as a
tensor, impl resolution, add_param_group, create_optimizer."""
import pytest
import torch

import fused_optim as fo
from spec_checks import clone_params, grads_for_step, make_params, set_grads, step_together

ALL = [fo.Gravity, fo.Lion, fo.Adan, fo.GradientEquilibrium]


def _p(n=4):
    return [torch.randn(n, requires_grad=True)]


# ------------------------------------------------------------------ validation
BAD = [
    (fo.Gravity, dict(lr=0.0), "Invalid learning rate: 0.0"),
    (fo.Gravity, dict(lr=-1.0), "Invalid learning rate"),
    (fo.Gravity, dict(alpha=-0.1), "Invalid alpha value: -0.1"),
    (fo.Gravity, dict(beta=1.0), "Invalid beta value: 1.0"),
    (fo.Gravity, dict(beta=-0.5), "Invalid beta value"),
    (fo.Lion, dict(lr=-1e-3), "Invalid learning rate: -0.001"),
    (fo.Lion, dict(betas=(1.0, 0.99)), "Invalid beta parameter at index 0: 1.0"),
    (fo.Lion, dict(betas=(0.9, -0.1)), "Invalid beta parameter at index 1"),
    (fo.Lion, dict(betas=(0.9,)), "Invalid betas"),
    (fo.Lion, dict(weight_decay=-1.0), "Invalid weight_decay value: -1.0"),
    (fo.Adan, dict(lr=float("nan")), "Invalid learning rate: nan"),
    (fo.Adan, dict(betas=(0.98, 0.92, 1.5)), "Invalid beta parameter at index 2"),
    (fo.Adan, dict(betas=(0.9, 0.9)), "Invalid betas"),
    (fo.Adan, dict(eps=-1e-8), "Invalid epsilon value"),
    (fo.Adan, dict(weight_decay=-0.1), "Invalid weight_decay value"),
    (fo.Adan, dict(max_grad_norm=-1.0), "Invalid max_grad_norm value: -1.0"),
    (fo.GradientEquilibrium, dict(lr=-0.01), "Invalid learning rate"),
    (fo.GradientEquilibrium, dict(weight_decay=-0.01), "Invalid weight_decay value"),
]


@pytest.mark.parametrize("cls,kw,msg", BAD, ids=[f"{c.__name__}-{next(iter(k))}-{i}" for i, (c, k, _) in enumerate(BAD)])
def test_bad_hyperparameter_names_argument_and_range(cls, kw, msg):
    with pytest.raises(ValueError, match=msg) as info:
        cls(_p(), **kw)
    assert "expected" in str(info.value)  # the allowed range is part of the message


@pytest.mark.parametrize("cls", ALL)
def test_bad_value_in_a_param_group_is_refused(cls):
    opt = cls(_p())
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": _p(), "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_bad_impl_arguments():
    with pytest.raises(ValueError, match="Invalid impl: 'cuda'"):
        fo.Lion(_p(), impl="cuda")
    with pytest.raises(ValueError, match="mutually exclusive"):
        fo.Lion(_p(), foreach=True, fused=True)
    with pytest.raises(ValueError, match="conflicts"):
        fo.Lion(_p(), impl="forloop", foreach=True)


def test_non_float_params_refused():
    with pytest.raises(ValueError, match="floating-point"):
        fo.Lion([torch.zeros(3, dtype=torch.int64)])


# ------------------------------------------------------------------ step semantics
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("impl", ["forloop", "foreach"])
def test_sparse_grad_raises_before_any_change(cls, impl):
    a, b = torch.randn(5, requires_grad=True), torch.randn(5, requires_grad=True)
    opt = cls([{"params": [a]}, {"params": [b]}], impl=impl)
    a.grad = torch.randn(5)
    b.grad = torch.randn(5).to_sparse()
    a0, b0 = a.detach().clone(), b.detach().clone()
    state0 = {k: v.clone() for k, v in opt.state[a].items()} if a in opt.state else {}
    groups0 = [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert torch.equal(a, a0) and torch.equal(b, b0)  # nothing half-applied, even in the first group
    assert {k: v for k, v in opt.state[a].items()}.keys() == state0.keys()
    assert [dict((k, v) for k, v in g.items() if k != "params") for g in opt.param_groups] == groups0


@pytest.mark.parametrize("cls", ALL)
def test_closure_runs_with_grad_enabled_and_returns_loss(cls):
    model = torch.nn.Linear(3, 1)
    opt = cls(model.parameters())
    x = torch.randn(4, 3)
    seen = {}

    def closure():
        seen["grad_enabled"] = torch.is_grad_enabled()
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with torch.no_grad():
        loss = opt.step(closure)
    assert seen["grad_enabled"] is True
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0
    assert opt.step() is None


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("impl", ["forloop", "foreach"])
def test_maximize_equals_minimizing_the_negated_grads(cls, impl):
    pa = make_params(seed=7, shapes=[(5,), (3, 4)])
    pb = clone_params(pa)
    torch.manual_seed(0)
    a = cls(pa, impl=impl, maximize=True)
    torch.manual_seed(0)
    b = cls(pb, impl=impl)
    for step in range(1, 5):
        grads = grads_for_step(pa, step)
        set_grads(pa, grads)
        set_grads(pb, [-g for g in grads])
        a.step()
        b.step()
        assert all(torch.equal(x.grad, g) for x, g in zip(pa, grads))  # .grad untouched
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cls", ALL)
def test_lr_as_tensor_changed_mid_run(cls):
    pa = make_params(seed=2, shapes=[(6,), (2, 3)])
    pb = clone_params(pa)
    lr_t = torch.tensor(0.05)
    torch.manual_seed(0)
    a = cls(pa, lr=lr_t, impl="foreach")
    torch.manual_seed(0)
    b = cls(pb, lr=lr_t.item(), impl="forloop")  # the fp32 value of 0.05, as the tensor holds it
    for step in range(1, 7):
        if step == 4:
            lr_t.fill_(0.01)  # a scheduler writing into the tensor
            for g in b.param_groups:
                g["lr"] = lr_t.item()
        step_together(pa, [step], (pa, a), (pb, b))
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)


@pytest.mark.parametrize("cls", ALL)
def test_lr_scheduler_drives_the_groups(cls):
    p = _p()
    opt = cls(p, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        p[0].grad = torch.randn(4)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0125)


def test_gravity_zero_lr_later_is_allowed_and_zero_grad_stays_finite():
    p = torch.randn(5, requires_grad=True)
    opt = fo.Gravity([p], lr=0.1)
    p.grad = torch.zeros(5)
    opt.step()
    assert torch.isfinite(p).all() and torch.isfinite(opt.state[p]["v"]).all()
    opt.param_groups[0]["lr"] = 0.0
    before = p.detach().clone()
    p.grad = torch.randn(5)
    opt.step()
    assert torch.equal(p, before)


def test_gravity_add_param_group_draws_velocity():
    opt = fo.Gravity(_p(), lr=0.1, alpha=0.01)
    q = torch.randn(1000, requires_grad=True)
    opt.add_param_group({"params": [q], "lr": 0.5})
    v = opt.state[q]["v"]
    assert v.shape == q.shape and 0.01 < v.std().item() < 0.03  # std = alpha / lr = 0.02
    q.grad = torch.randn(1000)
    opt.step()
    with pytest.raises(ValueError, match="Invalid learning rate"):
        opt.add_param_group({"params": _p(), "lr": 0.0})


def test_zero_size_and_one_element_tensors():
    e, one = torch.randn(0, requires_grad=True), torch.randn(1, requires_grad=True)
    for cls in ALL:
        for impl in ("forloop", "foreach"):
            opt = cls([e, one], impl=impl)
            e.grad, one.grad = torch.randn(0), torch.randn(1)
            before = one.detach().clone()
            opt.step()
            if cls is fo.GradientEquilibrium:
                assert torch.equal(one, before)  # g - mean(g) = 0: a one-element tensor never moves


# ------------------------------------------------------------------ complex
@pytest.mark.parametrize("cls", [fo.Lion, fo.Adan])
@pytest.mark.parametrize("impl", ["forloop", "foreach"])
def test_complex_params_follow_their_real_view(cls, impl):
    torch.manual_seed(0)
    z = torch.randn(6, dtype=torch.complex64, requires_grad=True)
    r = torch.view_as_real(z.detach().clone()).clone().requires_grad_()
    a, b = cls([z], lr=0.01, impl=impl), cls([r], lr=0.01, impl=impl)
    for step in range(3):
        g = torch.randn(6, dtype=torch.complex64)
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        a.step()
        b.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    assert a.state[z]["exp_avg"].is_complex()


def test_impl_views_pass_plain_tensors_and_view_the_rest():
    """What `_dispatch` hands an impl: plain real tensors as they are (the per-step fast path), complex ones
    as their real view, other subclasses through `impl_view` (a DTensor's local shard: test_distributed)."""
    from fused_optim.optimizer import impl_views

    class Marked(torch.Tensor):
        pass

    a, b = torch.nn.Parameter(torch.randn(3)), torch.randn(4)
    lst = [a, b]
    out = impl_views(lst, None, torch.float32)
    assert out is not lst and out[0] is a and out[1] is b
    assert impl_views(lst, [1], torch.float32) == [b]
    z = torch.randn(2, dtype=torch.complex64)
    (v,) = impl_views([z], None, z.dtype)
    assert v.shape == (2, 2) and v.dtype == torch.float32 and v.data_ptr() == z.data_ptr()
    m = torch.randn(3).as_subclass(Marked)
    (w,) = impl_views([b, m], [1], torch.float32)
    assert w is m


@pytest.mark.parametrize("cls", [fo.Gravity, fo.GradientEquilibrium])
def test_complex_params_refused_where_undefined(cls):
    with pytest.raises(ValueError, match="complex"):
        cls([torch.randn(3, dtype=torch.complex64, requires_grad=True)])


# ------------------------------------------------------------------ impls and registry
def test_available_impls_reports_reasons():
    st = fo.available_impls("cpu")
    assert set(st) == {"forloop", "foreach", "triton", "native"}
    assert st["forloop"].available and st["foreach"].available
    for impl, s in st.items():
        assert s.available or s.reason, f"{impl}: unavailable without a reason"


def test_explicit_impl_that_cannot_run_raises_with_the_fix():
    st = fo.available_impls("cpu")
    missing = [i for i in ("triton", "native") if not st[i].available]
    if not missing:
        pytest.skip("every impl can run here")
    opt = fo.Lion(_p(), impl=missing[0])
    opt.param_groups[0]["params"][0].grad = torch.randn(4)
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        opt.step()


def test_auto_and_torch_style_flags_resolve():
    opt = fo.Lion(_p())
    assert opt.impl is None and opt.impl_for("cpu") in ("native", "foreach")
    assert fo.Lion(_p(), foreach=True).impl_for("cpu") == "foreach"
    assert fo.Lion(_p(), foreach=False).impl_for("cpu") == "forloop"


def test_create_optimizer_by_name():
    model = torch.nn.Linear(3, 2)
    opt = fo.create_optimizer(model, "Lion", lr=3e-4)
    assert isinstance(opt, fo.Lion) and opt.defaults["lr"] == 3e-4
    assert isinstance(fo.create_optimizer(model.parameters(), "gradientequilibrum"), fo.GradientEquilibrium)
    with pytest.raises(ValueError, match="Unknown optimizer name: 'sgdx'"):
        fo.create_optimizer(model, "sgdx")


def test_gradient_equilibrum_alias_accepts_seed_arguments():
    opt = fo.GradientEquilibrum(_p(), lr=0.01, max_iterations=10, tol=1e-3)
    assert isinstance(opt, fo.GradientEquilibrium)
