"""``capturable=True`` (`FusedOptimizer` docstring, "Capturable"): step counters live on the device,
the per-step scalars derived from them are computed there, the Triton and native kernels read them from
device memory, an AMP skip is taken on the device, and a step can be captured in a CUDA graph.

On the CPU the Triton kernels run interpreted and the native CPU kernels run as built, and both read the
same device-scalar arguments (CPU tensors), so every code path but the graph capture itself is checked
here; the host-scalar impls (forloop, foreach) read the CPU counter on the host and must give the
non-capturable bits exactly. The CUDA graph tests are marked ``gpu``.
"""
from __future__ import annotations

import io

import pytest
import torch
from spec_checks import ADVERSARIAL_SHAPES, make_params

import fused_optim as fo
from fused_optim._backends import impl_status

_HAS_CUDA = torch.cuda.is_available()
STEPS = 8
CASES = {
    "gravity": (fo.Gravity, dict(lr=0.05)),
    "lion": (fo.Lion, dict(lr=1e-2, weight_decay=0.1)),
    "adan": (fo.Adan, dict(lr=1e-2, weight_decay=0.02)),
    "adan-clip-noprox": (fo.Adan, dict(lr=1e-2, weight_decay=0.02, max_grad_norm=1.0, no_prox=True)),
    "ge": (fo.GradientEquilibrium, dict(lr=0.05, weight_decay=0.01)),
}
COUNTER = {fo.Gravity: "t", fo.Adan: "step"}
EPS32 = torch.finfo(torch.float32).eps
#: impls that read the per-step scalars as device tensors (``fn.supports_capturable``)
DEVICE_SCALAR_IMPLS = ["triton", "native"]


@pytest.fixture(params=DEVICE_SCALAR_IMPLS)
def device_impl(request, monkeypatch):
    """A device-scalar impl on the CPU: Triton interpreted, or the native CPU kernels."""
    if request.param == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # available_impls: impl="triton" runs on CPU only so
    elif not impl_status("native", "cpu").available:
        pytest.skip(impl_status("native", "cpu").reason)
    return request.param


def _impls_on_cpu() -> list[str]:
    """The host-scalar impls available here."""
    return [i for i, st in fo.available_impls("cpu").items() if st.available and i not in DEVICE_SCALAR_IMPLS]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]


def _run(name, impl, capturable, steps=STEPS, params=None, restart_at=None):
    cls, kw = CASES[name]
    torch.manual_seed(0)  # Gravity draws v at construction
    params = make_params(0, shapes=ADVERSARIAL_SHAPES) if params is None else params
    opt = cls(params, impl=impl, capturable=capturable, **kw)
    for step in range(1, steps + 1):
        for p, g in zip(params, _grads(params, step)):
            p.grad = None if (step == 3 and p.numel() == 7) else g  # a missing grad on one step
        opt.step()
        if step == restart_at:
            opt.restart_opt()
    return params, opt


def _close(actual, expected, steps, what):
    """fp32 device scalars (capturable) differ from the host's double-rounded ones by an ulp or so: 4 ulp
    per element per step, against the tensor's scale (as tests/test_triton.py judges Triton)."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e.numel():
            tol = 4 * steps * EPS32 * (e.abs() + e.abs().mean())
            assert ((a - e).abs() <= tol).all(), f"{what}[{i}]: max diff {(a - e).abs().max().item():.3g}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_host_scalar_impls_are_exact_on_cpu(name):
    """On the CPU the counter is a CPU tensor and the host-scalar impls read it: same doubles, same bits."""
    _, ref_opt = _run(name, "forloop", False)
    for impl in _impls_on_cpu():
        ps, opt = _run(name, impl, True)
        exp, _ = _run(name, impl, False)
        for i, (a, b) in enumerate(zip(ps, exp)):
            assert torch.equal(a, b), f"{impl} param{i}"
        key = COUNTER.get(CASES[name][0])
        if key:
            counter = opt.param_groups[0][key]
            assert isinstance(counter, torch.Tensor) and counter.dtype == torch.float32 and counter.ndim == 0
            assert counter.item() == ref_opt.param_groups[0][key] == STEPS


@pytest.mark.parametrize("name", sorted(CASES))
def test_device_scalars_match_reference(device_impl, name):
    """The interpreted Triton kernels and the native CPU kernels, with every step scalar read from a (CPU)
    tensor, track the forloop reference on params and state; Adan's first-step neg_pre_grad is taken in
    the kernel."""
    ref, ref_opt = _run(name, "forloop", False)
    ps, opt = _run(name, device_impl, True)
    _close(ps, ref, STEPS, f"{name} params")
    for i, (p, q) in enumerate(zip(ps, ref)):
        for key, value in ref_opt.state[q].items():
            _close([opt.state[p][key]], [value], STEPS, f"{name} param{i}.{key}")


def test_adan_first_step_difference_is_exactly_zero_in_kernel(device_impl):
    """sail-sg: d = g_1 - g_0 with g_0 := g_1, so exp_avg_diff is exactly 0 after the first step; the
    capturable kernel gets that from step == 1 on the device, also after restart_opt()."""
    for restart in (None, 2):
        ps, opt = _run("adan", device_impl, True, steps=3 if restart else 1, restart_at=restart)
        if restart:
            assert opt.param_groups[0]["step"].item() == 1  # zeroed in place at step 2, advanced once
        for p in ps:
            if p in opt.state:
                # restart zeroes the moments; the step after it starts the difference again from 0
                assert torch.count_nonzero(opt.state[p]["exp_avg_diff"]) == 0
    ref, _ = _run("adan", "forloop", False, steps=3, restart_at=2)
    ps, _ = _run("adan", device_impl, True, steps=3, restart_at=2)
    _close(ps, ref, 3, "adan after restart")


def test_adan_late_param_starts_its_difference_at_zero(device_impl):
    """A param whose first grad arrives after the group's first step starts from neg_pre_grad = -clip*g
    like upstream (its first difference is 0), with the counter on the device as well."""
    runs = {}
    for name, (i, cap) in {"ref": ("forloop", False), "cap": (device_impl, True)}.items():
        torch.manual_seed(0)
        params = make_params(0, shapes=[(7,), (13, 17)])
        opt = fo.Adan(params, impl=i, capturable=cap, lr=1e-2, weight_decay=0.02)
        for step in range(1, 6):
            for k, (p, g) in enumerate(zip(params, _grads(params, step))):
                p.grad = None if (k == 1 and step < 3) else g  # param 1 joins at step 3
            opt.step()
            if step == 3:
                assert torch.count_nonzero(opt.state[params[1]]["exp_avg_diff"]) == 0
        runs[name] = params
    _close(runs["cap"], runs["ref"], 5, "late param")


def test_restart_keeps_the_counter_tensor(device_impl):
    _, opt = _run("adan", device_impl, True, steps=2)
    counter = opt.param_groups[0]["step"]
    opt.restart_opt()
    assert opt.param_groups[0]["step"] is counter and counter.item() == 0  # a captured graph reads it


@pytest.mark.parametrize("name", ["gravity", "adan", "lion"])
def test_found_inf_skip_on_the_device_keeps_counters(device_impl, name):
    """With capturable=True the AMP skip is taken by the kernels (no host read of found_inf in Python; the
    native CPU kernels read the CPU tensor themselves) and the counters advance by found_inf == 0: a
    skipped step leaves params, state, grads and counter as they were."""
    params, opt = _run(name, device_impl, True, steps=2)
    key = COUNTER.get(CASES[name][0])
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for p in params for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    counter_before = opt.param_groups[0][key].item() if key else None
    reads = []
    found_inf = torch.ones(())
    real_item = torch.Tensor.item

    def item(t):
        if t is found_inf:
            reads.append(1)
        return real_item(t)

    for p, g in zip(params, _grads(params, 9)):
        p.grad = g * 1024
    scaled = [p.grad.clone() for p in params]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "item", item)
        opt.step(grad_scale=torch.tensor(1024.0), found_inf=found_inf)
    assert not reads, "found_inf was read on the host"
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, scaled)), "a skipped step wrote the grads"
    after = {k: v for p in params for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
    assert all(torch.equal(after[k], v) for k, v in state_before.items())
    if key:
        assert opt.param_groups[0][key].item() == counter_before
    opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.zeros(()))
    assert any(not torch.equal(a, b) for a, b in zip(params, before) if a.numel())
    if key:
        assert opt.param_groups[0][key].item() == counter_before + 1


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", ["gravity", "adan"])
def test_state_dict_roundtrip_and_conversion(name):
    """A capturable checkpoint resumes bit-exactly (its counter copied, never shared with the source), and
    checkpoints move between the two settings: the counter is a 0-d float32 tensor in both (on the device
    with capturable=True, else on the CPU), the loading optimizer's setting decides where it lives."""
    cls, kw = CASES[name]
    key = COUNTER[cls]
    full, _ = _run(name, "foreach", False, steps=6)
    for src_cap, dst_cap in ((True, True), (True, False), (False, True)):
        params, opt = _run(name, "foreach", src_cap, steps=3)
        sd = opt.state_dict()
        torch.manual_seed(0)
        new = cls(params, impl="foreach", capturable=dst_cap, **kw)
        new.load_state_dict(_roundtrip(sd) if dst_cap else sd)
        assert new.param_groups[0][key] is not opt.param_groups[0][key]
        for step in range(4, 7):
            for p, g in zip(params, _grads(params, step)):
                p.grad = g
            new.step()
        assert all(torch.equal(a, b) for a, b in zip(params, full)), (src_cap, dst_cap)
        counter = new.param_groups[0][key]
        assert isinstance(counter, torch.Tensor) and counter.dtype == torch.float32 and counter.item() == 6


def test_capturable_refused_where_unsupported():
    with pytest.raises(TypeError, match="capturable"):  # the composites do not take the flag (yet)
        fo.Muon([torch.nn.Parameter(torch.randn(4, 4))], capturable=True)
    opt = fo.Lion([torch.nn.Parameter(torch.randn(3))], capturable=True)
    assert opt.capturable is True and "capturable" not in opt.param_groups[0]  # see FusedOptimizer, "Capturable"
    assert fo.Lion([torch.nn.Parameter(torch.randn(3))]).capturable is False


# ------------------------------------------------------------------------------------------ GPU only
def _cuda_case(name, impl):
    cls, kw = CASES[name]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(257, 129), (3,), (4099,), (0,), (64,)]]
    kw = dict(kw, lr=torch.tensor(kw["lr"], device="cuda"))
    return params, cls(params, impl=impl, capturable=True, **kw)


def _need_cuda_impl(impl):
    st = impl_status(impl, "cuda")
    if not st.available:
        pytest.skip(st.reason)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize("impl", DEVICE_SCALAR_IMPLS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_graph_capture_and_replay(name, impl):
    """Warm up, capture one step, replay it: the same bits as the same steps run eagerly; an lr tensor
    changed in place between replays takes effect; counters advance on the device."""
    _need_cuda_impl(impl)
    params, opt = _cuda_case(name, impl)
    ref_params, ref = _cuda_case(name, impl)
    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(p.shape, device="cuda", generator=g) for p in params]
    static = [torch.zeros_like(p) for p in params]
    for p, s in zip(params, static):
        p.grad = s
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside capture: compiles the kernels, builds the tables
        for s, gr in zip(static, grads):
            s.copy_(gr)
        opt.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    lrs = [1.0, 1.0, 0.5, 0.25]
    for i, scale in enumerate(lrs):
        opt.param_groups[0]["lr"].mul_(scale)  # in place: the graph reads this address
        for s, gr in zip(static, grads):
            s.copy_(gr * (i + 1))
        graph.replay()
    # eager: warm-up step + one step per replay, same grads and lrs
    for p, gr in zip(ref_params, grads):
        p.grad = gr.clone()
    ref.step()
    for i, scale in enumerate(lrs):
        ref.param_groups[0]["lr"].mul_(scale)
        for p, gr in zip(ref_params, grads):
            p.grad = gr * (i + 1)
        ref.step()
    torch.cuda.synchronize()
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b)
    key = COUNTER.get(CASES[name][0])
    if key:
        assert opt.param_groups[0][key].item() == 1 + len(lrs)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize("impl", DEVICE_SCALAR_IMPLS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_capturable_step_has_no_host_sync(name, impl):
    _need_cuda_impl(impl)
    params, opt = _cuda_case(name, impl)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    # Adan with max_grad_norm > 0 decides an AMP skip on the host by design (Adan's docstring: the clip
    # norm must see unscaled grads, so the class unscales first and reads found_inf, one sync): that
    # case is stepped with grad_scale alone, which keeps its unscale, clip and device counter checked
    with_found_inf = not CASES[name][1].get("max_grad_norm")
    try:
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(2):
            amp = {"grad_scale": torch.ones((), device="cuda")}
            if with_found_inf:
                amp["found_inf"] = torch.zeros((), device="cuda")
            opt.step(**amp)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")
def test_capturable_refuses_host_scalar_impls_on_cuda():
    params, opt = _cuda_case("adan", impl="foreach")
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="impl='triton'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


# ------------------------------------------------------------------ capture without capturable=True
def _pretend_capturing(monkeypatch):
    """What `fused_optim.optimizer.cuda_capturing` sees inside `torch.cuda.graph`, on a machine without one."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_capture_without_capturable_is_refused_before_any_change(name, monkeypatch):
    """As torch's optimizers do: a captured step would freeze the host counters and scalars."""
    cls, kw = CASES[name]
    torch.manual_seed(0)
    params = make_params(0, shapes=[(3, 4), (5,)])
    for p in params:
        p.grad = torch.randn_like(p)
    opt = cls(params, impl="forloop", **kw)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = io.BytesIO()
    torch.save(opt.state_dict(), state)
    _pretend_capturing(monkeypatch)
    with pytest.raises(RuntimeError, match="capturable=True"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    saved = torch.load(io.BytesIO(state.getvalue()))
    assert str(opt.state_dict()["param_groups"]) == str(saved["param_groups"])  # counters unchanged


def test_capturable_step_passes_the_capture_check(device_impl, monkeypatch):
    cls, kw = CASES["adan"]
    params = make_params(0, shapes=[(3, 4), (5,)])
    for p in params:
        p.grad = torch.randn_like(p)
    opt = cls(params, impl=device_impl, capturable=True, **kw)
    _pretend_capturing(monkeypatch)
    opt.step()  # the guard lets it through (on the CPU nothing is actually captured)
    assert opt.param_groups[0]["step"].item() == 1


def test_composites_that_decide_on_the_host_refuse_capture(monkeypatch):
    params = make_params(0, shapes=[(4, 3), (6,)])
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    opts = {
        "Lookahead": fo.Lookahead(fo.Lion(params, lr=1e-2, impl="forloop", capturable=True), k=2),
        "NeuroOptima": fo.NeuroOptima(params, sam_rho=0.0),
        "Muon": fo.Muon([p for p in params if p.ndim == 2], lr=0.02),
    }
    _pretend_capturing(monkeypatch)
    for name, opt in opts.items():
        with pytest.raises(RuntimeError, match=f"{name}: step\\(\\) is being captured in a CUDA graph"):
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")
def test_cuda_graph_capture_without_capturable_raises():
    params = [torch.randn(64, device="cuda", requires_grad=True)]
    params[0].grad = torch.randn_like(params[0])
    opt = fo.Gravity(params, lr=0.05)
    opt.step()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capturable=True"):
        with torch.cuda.graph(graph):
            opt.step()


def test_capturable_adan_amp_step_reads_no_tensor_on_the_host(device_impl):
    """On CUDA any `bool(tensor)` in the step is a host sync (test_capturable_step_has_no_host_sync, gpu):
    Adan's "does the step read its grads before dispatch" test once compared the device counter to 0."""
    params, opt = _run("adan", device_impl, True, steps=2)
    for p, g in zip(params, _grads(params, 9)):
        p.grad = g * 1024
    reads = []
    real_bool = torch.Tensor.__bool__

    def spy(t):
        reads.append(tuple(t.shape))
        return real_bool(t)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "__bool__", spy)
        opt.step(grad_scale=torch.tensor(1024.0), found_inf=torch.zeros(()))
    assert not reads, f"bool() of tensors of shapes {reads} during a capturable step"
