"""The native update ops under AMP and with device scalars (capturable).

AMP (`fused_optim.optimizer.supports_amp`): with ``grad_scale`` the kernels write ``g / grad_scale``
back into the grads with the bits of torch's in-place unscale (``torch._foreach_div_``: an IEEE
division in fp32, fp64 for fp64 grads, rounded to the grad's dtype), and every use of the grad sees that
value, the per-tensor reductions included. So a step on scaled grads with ``grad_scale`` must equal,
bit for bit, the same op without AMP on grads unscaled by torch beforehand: params, every state tensor
and the grads. Scales: GradScaler's 2^16 and 3.0, whose quotients round (in fp32, and again to
bf16/fp16). With ``found_inf != 0`` nothing is written: params, state, grads.

Device scalars: ``lr`` (all four), Gravity's ``beta_hat``, Adan's bias corrections and ``first_step``
as 1-element fp32 tensors, read by the kernel (from the CPU tensor on the CPU); the derived scalars are
computed in fp32, so the result tracks the forloop reference within docs/spec.md §9's 4 ulp per element per
step, and is exact where fp32 and the double path agree (Gravity: ``1 - beta_hat`` is exact in fp32 for
``beta_hat`` in [0.5, 1]). CUDA variants are marked ``gpu``.
"""
from __future__ import annotations

import math

import pytest
import torch
from test_native import _built, _need  # noqa: F401 - _built: the module's autouse "extension built" check

import fused_optim as fo
from fused_optim import _ext
from fused_optim._native import _native_adan, _native_gradient_equilibrium, _native_gravity, _native_lion
from fused_optim.adan import _forloop_adan
from fused_optim.equilibrium import _forloop_gradient_equilibrium
from fused_optim.gravity import _forloop_gravity
from fused_optim.lion import _forloop_lion

_HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                             pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA device")])]
GUARD = 8
# 0, 1, vector tails (AVX2/AVX512 widths and reduced-register pairs), a CPU/CUDA chunk + 1
SIZES = [0, 1, 7, 17, 33, 1025, 65537]
STRIDED = [(5, 7), (6, 4)]  # non-contiguous views (every other column of a NaN storage)
SCALES = [2.0 ** 16, 3.0]
STEPS = 7
B1, B2, B3 = 0.98, 0.92, 0.99


class Place:
    """Tensors in NaN-guarded storages (contiguous, or every other column for the strided shapes), so an
    out-of-bounds or wrong-storage write shows; `guards_intact` checks them."""

    def __init__(self, device):
        self.device = device
        self.bases = []

    def put(self, values, strided):
        if strided:
            rows, cols = values.shape
            base = torch.full((rows, 2 * cols), float("nan"), dtype=values.dtype, device=self.device)
            t = base[:, ::2]
            self.bases.append((base, lambda b: b[:, 1::2]))
        else:
            n = values.numel()
            base = torch.full((n + 2 * GUARD,), float("nan"), dtype=values.dtype, device=self.device)
            t = base[GUARD:GUARD + n].view(values.shape)
            self.bases.append((base, lambda b, n=n: torch.cat([b[:GUARD], b[GUARD + n:]])))
        t.copy_(values)
        return t

    def lists(self, values_lists, strided_grads_only=False):
        """Place each list; the last len(STRIDED) rows strided (only the grads' with `strided_grads_only`:
        a strided grad beside a contiguous param, the layout-mismatch path)."""
        out = []
        k = len(values_lists[0]) - len(STRIDED)
        for j, lst in enumerate(values_lists):
            strided = (j == 1) if strided_grads_only else True
            out.append([self.put(v, i >= k and strided) for i, v in enumerate(lst)])
        return out

    def guards_intact(self):
        return all(torch.isnan(outside(base)).all() for base, outside in self.bases)


def _randn(shapes, dtype, seed, scale=1.0, positive=False):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g, dtype=torch.float64) * scale for s in shapes]
    return [(x.abs() if positive else x).to(dtype) for x in out]


SHAPES = [(n,) for n in SIZES] + STRIDED


def _adan_kw(step, **kw):
    base = dict(lr=1e-2, beta1=B1, beta2=B2, beta3=B3, bias_correction1=1 - B1 ** step,
                bias_correction2=1 - B2 ** step, bias_correction3_sqrt=math.sqrt(1 - B3 ** step), eps=1e-8,
                weight_decay=0.02, no_prox=False, clip=1.0, maximize=False)
    base.update(kw)
    return base


# name -> (native, forloop, state lists (count, positive?), kwargs(step, device))
CASES = {
    "lion": (_native_lion, _forloop_lion, [False],
             lambda k, d: dict(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False)),
    "lion_maximize": (_native_lion, _forloop_lion, [False],
                      lambda k, d: dict(lr=3e-3, beta1=0.5, beta2=0.9, weight_decay=0.0, maximize=True)),
    "gravity": (_native_gravity, _forloop_gravity, [False],
                lambda k, d: dict(lr=0.1, beta_hat=(0.9 * k + 1) / (k + 2), maximize=False)),
    "gravity_maximize": (_native_gravity, _forloop_gravity, [False],
                         lambda k, d: dict(lr=0.05, beta_hat=(0.5 * k + 1) / (k + 2), maximize=True)),
    "adan": (_native_adan, _forloop_adan, [False, True, False, False], lambda k, d: _adan_kw(k)),
    "adan_noprox_clip_max": (_native_adan, _forloop_adan, [False, True, False, False],
                             lambda k, d: _adan_kw(k, no_prox=True, maximize=True,
                                                   clip=torch.tensor(0.37, device=d))),
    "equilibrium": (_native_gradient_equilibrium, _forloop_gradient_equilibrium, [],
                    lambda k, d: dict(lr=0.05, weight_decay=0.0, maximize=False)),
    "equilibrium_wd_max": (_native_gradient_equilibrium, _forloop_gradient_equilibrium, [],
                           lambda k, d: dict(lr=0.05, weight_decay=0.1, maximize=True)),
}


def _state_dtype(dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _setup(name, dtype, device, strided_grads_only=False, seed=0, place=None):
    """(params, scaled grads, state lists) placed in guarded storages."""
    _, _, state_spec, _ = CASES[name]
    place = place or Place(device)
    vals = [_randn(SHAPES, dtype, seed)]
    vals.append(_randn(SHAPES, dtype, seed + 1, scale=1000.0))  # "scaled" grads: large, not multiples
    for j, positive in enumerate(state_spec):
        vals.append(_randn(SHAPES, _state_dtype(dtype), seed + 2 + j, scale=0.1, positive=positive))
    lists = place.lists(vals, strided_grads_only)
    return lists[0], lists[1], lists[2:], place


def _snapshot(lists):
    return [[t.clone() for t in lst] for lst in lists]


def _assert_equal(actual, expected, what):
    for j, (a_l, e_l) in enumerate(zip(actual, expected)):
        for i, (a, e) in enumerate(zip(a_l, e_l)):
            same = torch.equal(a, e) or (a.numel() == e.numel() and torch.equal(a.isnan(), e.isnan())
                                         and torch.equal(a[~a.isnan()], e[~e.isnan()]))
            assert same, f"{what}: list {j} row {i} differs (max |d| {(a - e).abs().nan_to_num().max():.3g})"


# ------------------------------------------------------------------------------------------------ AMP
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_amp_equals_torch_unscale_then_plain_step(name, dtype, scale, device):
    """grad_scale in the kernel == torch's foreach unscale, then the op without AMP: the grads written back
    and every param and state bit, on contiguous and non-contiguous rows; nothing outside them written."""
    _need(device)
    native, _, _, kwargs = CASES[name]
    kw = kwargs(1, device)
    params, grads, states, place = _setup(name, dtype, device)
    ref_lists = _snapshot([params, grads, *states])
    ref_p, ref_g, ref_s = ref_lists[0], ref_lists[1], ref_lists[2:]
    gs = torch.tensor(scale, device=device)
    torch._foreach_div_(ref_g, gs)  # what FusedOptimizer does for an impl that is not AMP-aware
    native(ref_p, ref_g, *ref_s, **kw)
    native(params, grads, *states, **kw, grad_scale=gs, found_inf=torch.zeros((), device=device))
    _assert_equal([grads], [ref_g], f"{name} grads written back")
    _assert_equal([params, *states], [ref_p, *ref_s], f"{name} params/state")
    assert place.guards_intact(), "a kernel wrote outside its tensor"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["lion", "gravity", "adan_noprox_clip_max", "equilibrium_wd_max"])
def test_amp_strided_grad_beside_contiguous_param(name, dtype, device):
    """A non-contiguous grad of a contiguous param (the rows run on contiguous copies): the unscaled
    values land back in the grad's own storage."""
    _need(device)
    native, _, _, kwargs = CASES[name]
    kw = kwargs(2, device)
    params, grads, states, place = _setup(name, dtype, device, strided_grads_only=True, seed=5)
    assert not grads[-1].is_contiguous() and params[-1].is_contiguous()
    ref = _snapshot([params, grads, *states])
    gs = torch.tensor(3.0, device=device)
    torch._foreach_div_(ref[1], gs)
    native(ref[0], ref[1], *ref[2:], **kw)
    native(params, grads, *states, **kw, grad_scale=gs)
    _assert_equal([params, grads, *states], ref, name)
    assert place.guards_intact()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_found_inf_writes_nothing(name, dtype, device):
    """found_inf != 0: params, state and the (still scaled) grads keep every bit, strided rows included."""
    _need(device)
    native, _, _, kwargs = CASES[name]
    params, grads, states, place = _setup(name, dtype, device, seed=9)
    before = _snapshot([params, grads, *states])
    grads[2].view(-1)[0] = float("inf")  # what set the flag
    before[1][2].view(-1)[0] = float("inf")
    native(params, grads, *states, **kwargs(1, device), grad_scale=torch.tensor(2.0 ** 16, device=device),
           found_inf=torch.ones((), device=device))
    _assert_equal([params, grads, *states], before, f"{name} after a found_inf step")
    assert place.guards_intact()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_stats_see_the_rounded_unscaled_grad(dtype, device):
    """multi_tensor_stats with grad_scale reduces exactly what the update ops write back: its output equals
    the stats of torch's unscaled grads without grad_scale (plain, negated, with addends)."""
    _need(device)
    ops = _ext.ops()
    ts = [t.to(device) for t in _randn(SHAPES, dtype, 21, scale=1000.0)]
    ps = [t.to(device) for t in _randn(SHAPES, dtype, 22)]
    gs = torch.tensor(3.0, device=device)
    unscaled = torch._foreach_div(ts, gs)
    if dtype != torch.float32:  # the rounding to the grad's dtype matters for these inputs
        assert any(not torch.equal(u.float(), t.float() / 3.0) for u, t in zip(unscaled, ts) if t.numel())
    for args in ((None, 0.0, False), (None, 0.0, True), (ps, 0.25, True)):
        got = ops.multi_tensor_stats(ts, *args, gs)
        exp = ops.multi_tensor_stats(unscaled, *args)
        assert torch.equal(got, exp), f"stats with grad_scale differ ({args[1:]})"
    for t, t0 in zip(ts, _randn(SHAPES, dtype, 21, scale=1000.0)):  # the reduction only reads
        assert torch.equal(t.cpu(), t0)


@pytest.mark.parametrize("name", ["gravity", "lion", "adan", "equilibrium"])
def test_class_unscales_in_the_kernel(name, monkeypatch):
    """FusedOptimizer hands grad_scale to the AMP-aware native impl: no separate foreach unscale pass, and
    `.grad` ends unscaled with torch's bits (Adan still unscales first where it reads grads before the
    kernel, documented: with max_grad_norm > 0, and at a param's first step, whose neg_pre_grad = -clip*g
    comes from its grad)."""
    make = {"gravity": lambda ps: fo.Gravity(ps, lr=0.05, impl="native"),
            "lion": lambda ps: fo.Lion(ps, lr=1e-3, weight_decay=0.1, impl="native"),
            "adan": lambda ps: fo.Adan(ps, lr=1e-2, weight_decay=0.02, impl="native", capturable=True),
            "equilibrium": lambda ps: fo.GradientEquilibrium(ps, lr=0.1, weight_decay=0.01, impl="native")}[name]
    calls = []
    real = torch._foreach_div_
    monkeypatch.setattr(torch, "_foreach_div_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    shapes = [(0,), (1,), (7,), (13, 17), (129,)]
    params = [torch.nn.Parameter(t) for t in _randn(shapes, torch.bfloat16, 31)]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch.manual_seed(0)
    opt = make(params)
    torch.manual_seed(0)
    ref = make(ref_params)
    for step in range(1, 4):
        grads = _randn(shapes, torch.bfloat16, 40 + step, scale=2.0 ** 10)
        for p, q, g in zip(params, ref_params, grads):
            p.grad = g.clone()
            q.grad = torch._foreach_div([g.clone()], torch.tensor(3.0))[0]  # torch's unscale, by hand
        calls.clear()
        opt.step(grad_scale=torch.tensor(3.0), found_inf=torch.tensor(0.0))
        if not (name == "adan" and step == 1):
            assert not calls, "the base class unscaled the grads for an AMP-aware impl"
        ref.step()
        for p, q in zip(params, ref_params):
            assert torch.equal(p.grad, q.grad) and torch.equal(p, q)


def test_adan_clip_norm_still_unscales_first(monkeypatch):
    calls = []
    real = torch._foreach_div_
    monkeypatch.setattr(torch, "_foreach_div_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    params = [torch.nn.Parameter(torch.randn(9)) for _ in range(2)]
    opt = fo.Adan(params, lr=1e-2, max_grad_norm=0.5, impl="native")
    for p in params:
        p.grad = torch.randn(9) * 64
    opt.step(grad_scale=torch.tensor(64.0), found_inf=torch.tensor(0.0))
    assert len(calls) == 1


def test_native_launchers_are_marked():
    for fn in (_native_gravity, _native_lion, _native_adan, _native_gradient_equilibrium):
        assert fn.supports_amp and fn.supports_tensor_lr and fn.supports_capturable


# --------------------------------------------------------------------------------- schemas (opcheck)
def _op_args(name):
    """(op, args, kwargs) of a direct call of the C++ op with AMP arguments and device scalars."""
    g = torch.Generator().manual_seed(3)
    shapes = [(0,), (3,), (4, 5)]
    mk = lambda positive=False: [(torch.randn(s, generator=g).abs() if positive else torch.randn(s, generator=g))
                                 for s in shapes]
    ops = torch.ops.fused_optim
    amp = dict(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(0.0), lr_tensor=torch.tensor(0.01))
    params, grads = mk(), mk()
    if name == "lion":
        return ops.lion_.default, (params, grads, mk(), 0.1, 0.9, 0.99, 0.1, False), amp
    if name == "gravity":
        stats = ops.multi_tensor_stats(grads, None, 0.0, False, amp["grad_scale"])
        return ops.gravity_.default, (params, grads, mk(), stats, 0.1, 0.5, False), dict(
            amp, beta_hat_tensor=torch.tensor(0.7))
    if name == "adan":
        return ops.adan_.default, (params, grads, mk(), mk(True), mk(), mk(), 1e-3, 0.98, 0.92, 0.99, 1.0, 1.0, 1.0,
                                   1e-8, 0.01, False, torch.tensor([0.5]), False), dict(
            amp, bias_correction1_tensor=torch.tensor(0.02), bias_correction2_tensor=torch.tensor(0.08),
            bias_correction3_sqrt_tensor=torch.tensor(0.1), first_step=torch.tensor(1.0))
    stats = ops.multi_tensor_stats(grads, params, 0.01, False, amp["grad_scale"])
    return ops.gradient_equilibrium_.default, (params, grads, stats, 0.1, 0.01, False), amp


@pytest.mark.parametrize("name", ["lion", "gravity", "adan", "equilibrium"])
def test_op_schema_declares_the_grad_writes(name):
    """torch.library.opcheck's schema test: every list the op writes (the grads under AMP included) is
    annotated mutable, nothing unannotated changes."""
    _ext.ops()
    op, args, kwargs = _op_args(name)
    grads_before = [t.clone() for t in args[1]]
    torch.library.opcheck(op, args, kwargs, test_utils=("test_schema",))
    op(*args, **kwargs)
    assert any(not torch.equal(a, b) for a, b in zip(args[1], grads_before) if a.numel()), "no grad was written"


# ------------------------------------------------------------------------------------ device scalars
def _scalar(x, device):
    return torch.tensor(x, dtype=torch.float32, device=device)


def _device_kwargs(name, kw, k, device):
    """The kwargs with the per-step scalars as fp32 device tensors, computed as the classes do with
    capturable=True (from a float32 step counter on the device)."""
    kw = dict(kw)
    step = torch.full((), float(k), dtype=torch.float32, device=device)
    kw["lr"] = _scalar(kw["lr"], device)
    if name.startswith("gravity"):
        beta = {"gravity": 0.9, "gravity_maximize": 0.5}[name]
        kw["beta_hat"] = (beta * step + 1) / (step + 2)
    elif name.startswith("adan"):
        kw["bias_correction1"] = 1.0 - torch.pow(B1, step)
        kw["bias_correction2"] = 1.0 - torch.pow(B2, step)
        kw["bias_correction3_sqrt"] = torch.sqrt(1.0 - torch.pow(B3, step))
        kw["first_step"] = (step == 1).float()
    return kw


def _close(actual, expected, k, what):
    """docs/spec.md §9: 4 ulp per element per step at the tensor's scale."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e.numel() == 0:
            continue
        a, e = a.detach().cpu().double(), e.detach().cpu().double()
        eps = torch.finfo(torch.float32).eps
        tol = 4 * k * eps * (e.abs() + e.abs().mean())
        assert ((a - e).abs() <= tol).all(), f"{what}[{i}] after step {k}: max |d| {(a - e).abs().max():.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_device_scalars_track_forloop(name, device):
    """8 steps with every per-step scalar a device tensor (Adan's neg_pre_grad poisoned with NaN: the
    kernel sets it at the first step) against the forloop reference with Python doubles: params and every
    state tensor within docs/spec.md §9; Adan's first difference exactly 0."""
    _need(device)
    native, forloop, state_spec, kwargs = CASES[name]
    shapes = [(n,) for n in (1, 7, 33, 1025, 4099)] + STRIDED
    place = Place(device)
    p0 = _randn(shapes, torch.float32, 51)
    s0 = [_randn(shapes, torch.float32, 52 + j, scale=0.1, positive=pos) for j, pos in enumerate(state_spec)]
    nat = place.lists([p0, *s0])
    ref = [[t.clone().to(device) for t in lst] for lst in [p0, *s0]]
    adan = name.startswith("adan")
    if adan:
        for t in nat[4]:
            t.fill_(float("nan"))  # the capturable class leaves neg_pre_grad to the kernel
        for t in nat[3] + ref[3]:
            t.zero_()  # exp_avg_diff starts at zero (the class's first use): it then stays 0 at step 1
    for k in range(1, 9):
        grads = [t.to(device) for t in _randn(shapes, torch.float32, 60 + k)]
        kw = kwargs(k, device)
        if adan and k == 1:  # the host path's first step: neg_pre_grad = -clip*g (of the maximized g)
            clip = kw["clip"].item() if isinstance(kw["clip"], torch.Tensor) else kw["clip"]
            for t, g in zip(ref[4], grads):
                t.copy_((g if kw["maximize"] else -g) * clip)
        forloop(ref[0], grads, *ref[1:], **kw)
        native(nat[0], grads, *nat[1:], **_device_kwargs(name, kw, k, device))
        _close(nat[0], ref[0], k, f"{name} params")
        for j in range(1, len(ref)):
            _close(nat[j], ref[j], k, f"{name} state{j - 1}")
        if adan and k == 1:
            for t in nat[3]:
                assert torch.count_nonzero(t) == 0, "Adan's first-step difference is not exactly 0"
    assert place.guards_intact()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["gravity", "gravity_maximize", "equilibrium_wd_max", "lion_maximize"])
def test_device_scalars_exact_where_fp32_is_exact(name, device):
    """Gravity's 1 - beta_hat is exact in fp32 for beta_hat in [0.5, 1], GradientEquilibrium reads lr alone,
    Lion without weight decay reads lr alone: the tensor path then equals the float path given the
    tensors' values, bit for bit (the float arguments passed alongside are junk: the tensors win)."""
    _need(device)
    native, _, state_spec, kwargs = CASES[name]
    shapes = [(n,) for n in (1, 7, 33, 1025)] + STRIDED
    p0 = _randn(shapes, torch.float32, 71)
    s0 = [_randn(shapes, torch.float32, 72 + j, scale=0.1) for j, _ in enumerate(state_spec)]
    a = [[t.clone().to(device) for t in lst] for lst in [p0, *s0]]
    b = [[t.clone().to(device) for t in lst] for lst in [p0, *s0]]
    ops = _ext.ops()
    for k in range(1, STEPS + 1):
        grads = [t.to(device) for t in _randn(shapes, torch.float32, 80 + k)]
        kw = _device_kwargs(name, kwargs(k, device), k, device)
        floats = {key: float(v) for key, v in kw.items() if isinstance(v, torch.Tensor)}
        native(a[0], grads, *a[1:], **dict(kw, **floats))
        if name.startswith("gravity"):
            stats = ops.multi_tensor_stats(grads, None, 0.0, kw["maximize"])
            ops.gravity_(b[0], grads, b[1], stats, 123.0, 0.25, kw["maximize"], lr_tensor=kw["lr"],
                         beta_hat_tensor=kw["beta_hat"])
        elif name.startswith("equilibrium"):
            stats = ops.multi_tensor_stats(grads, b[0], kw["weight_decay"], kw["maximize"])
            ops.gradient_equilibrium_(b[0], grads, stats, 123.0, kw["weight_decay"], kw["maximize"],
                                      lr_tensor=kw["lr"])
        else:
            ops.lion_(b[0], grads, b[1], 123.0, kw["beta1"], kw["beta2"], 0.0, kw["maximize"], lr_tensor=kw["lr"])
        _assert_equal(b, a, f"{name} step {k}")


@pytest.mark.parametrize("device", DEVICES)
def test_device_scalars_with_amp(device):
    """Both at once (capturable + GradScaler): Adan with every scalar a tensor and grad_scale, equal to the
    device-scalar run on torch-unscaled grads; a found_inf step writes nothing."""
    _need(device)
    name = "adan_noprox_clip_max"
    params, grads, states, place = _setup(name, torch.bfloat16, device, seed=90)
    for t in states[2]:
        t.zero_()  # exp_avg_diff at its first use
    for t in states[3]:
        t.fill_(float("nan"))  # neg_pre_grad: set by the kernel at the first step
    ref = _snapshot([params, grads, *states])
    kw = _device_kwargs(name, CASES[name][3](1, device), 1, device)
    gs = torch.tensor(2.0 ** 16, device=device)
    skipped = _snapshot([params, grads, *states])
    _native_adan(skipped[0], skipped[1], *skipped[2:], **kw, grad_scale=gs, found_inf=torch.ones((), device=device))
    _assert_equal(skipped, _snapshot([params, grads, *states]), "found_inf step")
    torch._foreach_div_(ref[1], gs)
    _native_adan(ref[0], ref[1], *ref[2:], **kw)
    _native_adan(params, grads, *states, **kw, grad_scale=gs, found_inf=torch.zeros((), device=device))
    _assert_equal([params, grads, *states], ref, name)
    for t in states[2]:
        assert torch.count_nonzero(t) == 0  # first step: d == 0 exactly
    assert place.guards_intact()


def test_device_scalar_errors_are_clear():
    ops = _ext.ops()
    p, g, s = [torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3)]
    with pytest.raises(RuntimeError, match="lr_tensor must be float32"):
        ops.lion_(p, g, s, 0.1, 0.9, 0.99, 0.0, False, lr_tensor=torch.tensor(0.1, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="bias-correction tensors together"):
        ops.adan_(p, g, s, s, s, s, 1e-3, 0.98, 0.92, 0.99, 1.0, 1.0, 1.0, 1e-8, 0.0, False, None, False,
                  bias_correction1_tensor=torch.tensor(0.1))
    with pytest.raises(TypeError, match="all as floats or all as 0-d tensors"):
        _native_adan(p, g, s, s, s, s, **dict(_adan_kw(1), bias_correction1=torch.tensor(0.1)))


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("cls", [fo.Lion, fo.GradientEquilibrium])
def test_cuda_amp_skip_is_sync_free(cls):
    """Lion and GradientEquilibrium have no step counters: with the AMP-aware native kernels the found_inf
    skip is taken on the device, so a GradScaler-style step syncs nothing (capturable=False)."""
    _need("cuda")
    params = [torch.nn.Parameter(torch.randn(n, device="cuda")) for n in (3, 4099, 65537)]
    opt = cls(params, lr=1e-2, impl="native")
    for p in params:
        p.grad = torch.randn_like(p) * 1024
    opt.step(grad_scale=torch.full((), 1024.0, device="cuda"), found_inf=torch.zeros((), device="cuda"))
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    try:
        torch.cuda.set_sync_debug_mode("error")
        opt.step(grad_scale=torch.full((), 1024.0, device="cuda"), found_inf=torch.ones((), device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
