"""The composites (docs/spec.md §5-8) on their fused impls, end to end: Lookahead, SAM, NeuroOptima and Muon with
``triton`` (interpreted on the CPU) and ``native`` against the same classes on ``forloop``, on a small model
with real closures, over >= 7 steps, with a spy that shows the fused parts really ran.

The fused parts themselves are held to docs/spec.md §9 at the functional level (bit for bit where the op order
allows) in tests/test_triton_composites.py and tests/test_native_composites.py; here the question is
whether the classes route every part to them and still follow the reference. Where every part is exact on
the CPU (Lookahead's sync, Muon's two stages around torch's Newton–Schulz) the whole trajectory must be
bit-identical; SAM's norm is a reduction (a few ulp from torch's), so SAM and NeuroOptima are compared
with a tolerance.
"""
from __future__ import annotations

import pytest
import torch
from test_composites import TinyNet, _tiny_batch, _tiny_closure, batch, closure_for, make_data, make_model
from torch import nn

import fused_optim as fo
from fused_optim import lookahead as la
from fused_optim import muon as mu
from fused_optim import neuro_optima as no
from fused_optim import sam as sm

FUSED = ["triton", "native"]


@pytest.fixture(params=FUSED)
def fused_impl(request, monkeypatch):
    impl = request.param
    if impl == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # available_impls: impl="triton" runs on CPU only so
    st = fo.available_impls("cpu")[impl]
    if not st.available:
        pytest.skip(f"{impl}: {st.reason}")
    return impl


def _spy(monkeypatch, table: dict, key: str, calls: list, name: str):
    """Wrap ``table[key]`` (a functional step or a `_SamImpl`) so each call is recorded in `calls`."""
    entry = table[key]

    def wrap(fn, label):
        def spy(*args, **kwargs):
            calls.append(label)
            return fn(*args, **kwargs)
        return spy

    if isinstance(entry, sm._SamImpl):
        monkeypatch.setitem(table, key, sm._SamImpl(*(wrap(f, f"{name}.{f.__name__}") for f in entry)))
    else:
        monkeypatch.setitem(table, key, wrap(entry, name))


def _assert_params(model, ref, exact: bool, what: str, atol: float = 0.0):
    for i, (p, q) in enumerate(zip(model.parameters(), ref.parameters())):
        if exact:
            assert torch.equal(p, q), f"{what}[{i}]: max diff {(p - q).abs().max().item():.3g}"
        else:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=atol, msg=f"{what}[{i}]")


def test_lookahead_fused_sync_is_bit_exact(fused_impl, monkeypatch):
    """Lookahead(SGD) with the fused sync: the sync runs as the fused kernel and the trajectory, slow
    weights included, is the forloop one bit for bit."""
    calls: list = []
    _spy(monkeypatch, la._sync_impls, fused_impl, calls, "sync")
    data = make_data()
    model, ref = make_model(), make_model()
    opt = la.Lookahead(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, foreach=False), k=3, alpha=0.4,
                       impl=fused_impl)
    ref_opt = la.Lookahead(torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9, foreach=False), k=3,
                           alpha=0.4, impl="forloop")
    for step in range(1, 10):
        xb, yb = batch(step, data)
        opt.step(closure_for(model, opt, xb, yb))
        ref_opt.step(closure_for(ref, ref_opt, xb, yb))
        _assert_params(model, ref, True, f"params@{step}")
    assert calls == ["sync"] * 3
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(opt._slow[p], ref_opt._slow[q])


def test_lookahead_follows_our_inner_optimizer(fused_impl, monkeypatch):
    calls: list = []
    _spy(monkeypatch, la._sync_impls, fused_impl, calls, "sync")
    model = make_model()
    opt = la.Lookahead(fo.Lion(model.parameters(), lr=1e-3, impl=fused_impl), k=2)
    data = make_data()
    for step in range(1, 5):
        opt.step(closure_for(model, opt, *batch(step, data)))
    assert calls == ["sync"] * 2


def test_lookahead_explicit_impl_that_cannot_run_raises(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = make_model()
    opt = la.Lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=1, impl="triton")
    closure = closure_for(model, opt, *batch(0, make_data()))
    with pytest.raises(RuntimeError, match="impl='triton' cannot run on cpu"):
        opt.step(closure)


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_fused_parts_follow_reference(fused_impl, adaptive, monkeypatch):
    """SAM around GradientEquilibrium: norms, perturbation and restore all run fused (the base's impl),
    and the trajectory stays within fp32 rounding of the forloop one."""
    calls: list = []
    _spy(monkeypatch, sm._impls, fused_impl, calls, "sam")
    data = make_data()
    model, ref = make_model(), make_model()
    rho = 0.5 if adaptive else 0.05
    opt = fo.SAM(model.parameters(), fo.GradientEquilibrium, rho=rho, adaptive=adaptive, lr=0.05, impl=fused_impl)
    ref_opt = fo.SAM(ref.parameters(), fo.GradientEquilibrium, rho=rho, adaptive=adaptive, lr=0.05, impl="forloop")
    for step in range(1, 9):
        xb, yb = batch(step, data)
        loss = opt.step(closure_for(model, opt, xb, yb))
        ref_loss = ref_opt.step(closure_for(ref, ref_opt, xb, yb))
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-7)
        _assert_params(model, ref, False, f"params@{step}", atol=1e-6)
    names = {c.rsplit("_", 1)[-1] for c in calls}
    assert names == {"norms", "perturb", "restore"}, calls
    assert calls.count(f"sam._{fused_impl}_sam_perturb") == 8


def test_neuro_optima_fused_follows_reference(fused_impl, monkeypatch):
    """NeuroOptima on a fused impl: the core, SAM's three parts and the Lookahead sync all run fused; the
    trajectory follows forloop's (sign steps: an element whose momentum sits within rounding of 0 may
    step the other way, so the check is on the bulk of the elements and a bound on the rest)."""
    calls: list = []
    _spy(monkeypatch, sm._impls, fused_impl, calls, "sam")
    _spy(monkeypatch, la._sync_impls, fused_impl, calls, "sync")
    _spy(monkeypatch, no.NeuroOptima._impls, fused_impl, calls, "core")
    data = make_data()
    model, ref = make_model(), make_model()
    kw = dict(lr=1e-2, weight_decay=0.01, sam_rho=0.05, lookahead_k=3, lookahead_alpha=0.5)
    opt = fo.NeuroOptima(model.parameters(), impl=fused_impl, **kw)
    ref_opt = fo.NeuroOptima(ref.parameters(), impl="forloop", **kw)
    steps = 7
    for step in range(1, steps + 1):
        xb, yb = batch(step, data)
        opt.step(closure_for(model, opt, xb, yb))
        ref_opt.step(closure_for(ref, ref_opt, xb, yb))
    diffs = torch.cat([(p - q).abs().flatten() for p, q in zip(model.parameters(), ref.parameters())])
    assert (diffs > 1e-5).float().mean() <= 0.05, f"{int((diffs > 1e-5).sum())} of {diffs.numel()} elements apart"
    assert diffs.max() <= 2 * kw["lr"] * steps  # a flipped sign moves an element by 2 lr per step at most
    assert calls.count("core") == steps and calls.count("sync") == steps // 3
    assert {c.rsplit("_", 1)[-1] for c in calls if c.startswith("sam")} == {"norms", "perturb", "restore"}
    for p in model.parameters():
        assert opt.state[p]["slow_param"].dtype == p.dtype


def test_muon_fused_is_bit_exact(fused_impl, monkeypatch):
    """Muon on a fused impl: two multi-tensor kernels around torch's Newton–Schulz, the same bits as the
    forloop reference on every param and state tensor, and ``.grad`` untouched."""
    model, ref = TinyNet(), TinyNet()
    opt = fo.Muon(fo.muon_param_groups(model, weight_decay=0.1, adam_weight_decay=0.01), impl=fused_impl)
    ref_opt = fo.Muon(fo.muon_param_groups(ref, weight_decay=0.1, adam_weight_decay=0.01), impl="forloop")
    calls: list = []
    _spy(monkeypatch, mu.Muon._impls, fused_impl, calls, "muon")
    for step in range(1, 9):
        opt.step(_tiny_closure(model, opt, step))
        grads = [p.grad.clone() for p in model.parameters()]
        ref_opt.step(_tiny_closure(ref, ref_opt, step))
        _assert_params(model, ref, True, f"params@{step}")
        for p, q in zip(model.parameters(), ref.parameters()):
            for key, value in ref_opt.state[q].items():
                got = opt.state[p][key]
                assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, key
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert calls == ["muon"] * 8


def test_muon_fused_bf16_params(fused_impl):
    """bf16 params, fp32 momentum (the fused impls' state policy): within bf16 rounding of the fp32 run."""
    model, ref = TinyNet(), TinyNet()
    model.to(torch.bfloat16)
    opt = fo.Muon(fo.muon_param_groups(model), impl=fused_impl)
    ref_opt = fo.Muon(fo.muon_param_groups(ref), impl="forloop")
    for step in range(1, 8):
        tokens, img, y = _tiny_batch(step)
        for m, o, x in ((model, opt, img.bfloat16()), (ref, ref_opt, img)):
            o.zero_grad()
            nn.functional.cross_entropy(m(tokens, x).float(), y).backward()
            o.step()
    for p in model.parameters():  # fp32 state on both sides (the Adam side runs on upcast grads)
        assert all(v.dtype == torch.float32 for v in opt.state[p].values() if isinstance(v, torch.Tensor))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.float(), q, rtol=0, atol=0.05)

