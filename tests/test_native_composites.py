"""The composites' fused parts in csrc/ against their forloop references (docs/spec.md §5-9).

Functions under test (fused_optim/_native.py, driven by fused_optim/lookahead.py, sam.py, muon.py and neuro_optima.py):
``_native_lookahead_sync``, ``_native_sam_norms``, ``_native_sam_perturb``, ``_native_sam_restore``,
``_native_muon_momentum``, ``_native_muon_apply``, ``_native_neuro_optima``.

Exactness (fp32, CPU): every written tensor is asserted bit-equal to the reference after each of
STEPS calls with fresh random inputs, except the SAM norms (a reduction: torch's fp32 norm is itself
several ulp off for long tensors; ours sums in fp64) which are held within 2 ulp of the exact norm and
within 4 ulp + torch's own error of the reference. NeuroOptima's params are exact too although torch's
CPU sqrt is not correctly rounded (ours is): the denominator is positive and only its sign-free
quotient's sign reaches p. CUDA: docs/spec.md §9's 4 ulp per element per call (nvcc contracts into fma).
bf16/fp16 params: docs/spec.md §9's low-precision rule (spec_checks.assert_lowp_close vs a float64 run of the
reference), with fp32 state where the interface allows it.
"""
from __future__ import annotations

import math

import pytest
import torch
from spec_checks import ADVERSARIAL_SHAPES, LOWP_ATOL, ulp_distance

from fused_optim import _ext
from fused_optim._native import (
    _native_lookahead_sync,
    _native_muon_apply,
    _native_muon_momentum,
    _native_neuro_optima,
    _native_sam_norms,
    _native_sam_perturb,
    _native_sam_restore,
)
from fused_optim.lookahead import _forloop_lookahead_sync
from fused_optim.muon import _as_matrix, _forloop_muon, _scale, zeropower_via_newtonschulz5
from fused_optim.neuro_optima import _forloop_neuro_optima
from fused_optim.sam import _forloop_sam_norms, _forloop_sam_perturb, _forloop_sam_restore

_OPS = ("multi_tensor_l2norm", "multi_tensor_copy_", "lookahead_sync_", "sam_perturb_", "muon_momentum_",
        "muon_apply_", "neuro_optima_")
_HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                             pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA device")])]
STEPS = 7
GUARD = 8  # NaN band around each tensor's storage: an out-of-bounds write shows
# docs/spec.md §9's sizes, one tensor over the 65536-element chunk, then a transposed view (dense, not
# contiguous) and a strided one (every other column: not dense, runs through contiguous copies)
SHAPES = list(ADVERSARIAL_SHAPES) + [(65537,)]
LAYOUTS = ["contiguous"] * len(SHAPES) + ["transposed", "strided"]
SHAPES = SHAPES + [(12, 9), (5, 7)]
LOWP_SHAPES = [s for s in SHAPES if s != (65537,)]  # three runs each: the chunk-crossing size only in fp32


def _has_op(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{op}", key)


@pytest.fixture(scope="module", autouse=True)
def _native_built():
    st = _ext.status("cpu")
    if not st.available:
        pytest.skip(f"the native extension is not available: {st.reason}")
    missing = [op for op in _OPS if not _has_op(op, "CPU")]
    if missing:
        pytest.skip(f"the loaded native extension predates the composite ops {missing}; rebuild it")


@pytest.fixture(params=DEVICES)
def device(request):
    """Every test runs on the CPU and, where the CUDA extension has the composite ops, on CUDA."""
    _need(request.param)
    return request.param


def _need(device):
    if device == "cuda":
        st = _ext.status("cuda")
        if not st.available:
            pytest.skip(st.reason)
        if not _has_op("neuro_optima_", "CUDA"):
            pytest.skip("the loaded CUDA extension predates the composite ops; rebuild it")


# ---------------------------------------------------------------------------------------------- tensors
class Place:
    """Tensors of SHAPES/LAYOUTS in NaN-filled storages (guard bands, strided gaps); `check` fails if a
    kernel wrote outside its tensors."""

    def __init__(self, device):
        self.device = device
        self.outside = []  # (storage, mask of the elements that must stay NaN)

    def __call__(self, values, dtype, layout, poison=False):
        shape = values.shape
        n = values.numel()
        if layout == "strided":
            base = torch.full((shape[0], 2 * shape[1]), float("nan"), dtype=dtype, device=self.device)
            t = base[:, ::2]
            mask = torch.ones(base.shape, dtype=torch.bool, device=self.device)
            mask[:, ::2] = False
        else:
            base = torch.full((n + 2 * GUARD,), float("nan"), dtype=dtype, device=self.device)
            if layout == "transposed":
                t = base[GUARD:GUARD + n].view(shape[1], shape[0]).t()
            else:
                t = base[GUARD:GUARD + n].view(shape)
            mask = torch.ones(base.shape, dtype=torch.bool, device=self.device)
            mask[GUARD:GUARD + n] = False
        if not poison:
            t.copy_(values)
        self.outside.append((base, mask))
        return t

    def list(self, values, dtype, poison=False):
        return [self(v, dtype, lay, poison) for v, lay in zip(values, LAYOUTS)]

    def check(self):
        for base, mask in self.outside:
            assert torch.isnan(base[mask].float()).all(), "a kernel wrote outside its tensor"


def _randn(seed, shapes=None, scale=1.0, positive=False):
    """Fresh random float64 values (never zeros) for every shape."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes or SHAPES:
        x = torch.randn(s, generator=g, dtype=torch.float64) * scale
        out.append(x.abs() + 1e-3 if positive else x)
    return out


def _to(values, dtype, device):
    return [v.to(device=device, dtype=dtype, copy=True) for v in values]  # never an alias of `values`


def _assert_exact(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        a, e = a.detach().cpu(), e.detach().cpu()
        assert a.dtype == e.dtype and a.shape == e.shape, f"{what}[{i}]: {a.dtype}{list(a.shape)} != {e.dtype}{list(e.shape)}"
        same = (a == e) | (torch.isnan(a) & torch.isnan(e))
        assert same.all(), f"{what}[{i}] differs in {int((~same).sum())} elements"


def _lowp_close(actual, lowp_ref, high_ref, dtype, what):
    """docs/spec.md §9 (spec_checks.assert_lowp_close) on the stored values: `actual` may be fp32 state for
    `dtype` params (compared as stored, not rounded to `dtype`)."""
    if actual.numel() == 0:
        return
    hi = high_ref.detach().cpu().double()
    err = (actual.detach().cpu().double() - hi).abs().max().item()
    ref_err = (lowp_ref.detach().cpu().double() - hi).abs().max().item()
    assert not math.isnan(err), f"{what}: NaN"
    assert err <= 2 * ref_err + LOWP_ATOL[dtype], f"{what}: error {err:.3g} > 2 x reference error {ref_err:.3g} + atol"


def _assert_close(actual, expected, step, what):
    """docs/spec.md §9: 4 ulp per element per call, at the tensor's scale."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a.numel() == 0:
            continue
        a, e = a.detach().cpu().double(), e.detach().cpu()
        eps = torch.finfo(e.dtype).eps
        e = e.double()
        bad = (a - e).abs() > 4 * step * eps * (e.abs() + e.abs().mean())
        assert not bad.any(), f"{what}[{i}] after call {step}: {int(bad.sum())} elements beyond 4 ulp/call"


def _check(device, actual, expected, step, what):
    if device == "cpu":
        _assert_exact(actual, expected, what)
    else:
        _assert_close(actual, expected, step, what)


# ------------------------------------------------------------------------------------------- Lookahead
@pytest.mark.parametrize("alpha", [0.5, 0.3, 0.8])
def test_lookahead_sync_fp32(device, alpha):
    place = Place(device)
    slow0 = _randn(1)
    ref_p, ref_s = _to(slow0, torch.float32, device), _to(slow0, torch.float32, device)
    nat_p, nat_s = place.list(slow0, torch.float32), place.list(slow0, torch.float32)
    for k in range(1, STEPS + 1):
        fresh = _randn(100 + k)  # the inner optimizer moved the params
        for a, b, v in zip(ref_p, nat_p, fresh):
            a.copy_(v)
            b.copy_(v)
        _forloop_lookahead_sync(ref_p, ref_s, alpha=alpha)
        _native_lookahead_sync(nat_p, nat_s, alpha=alpha)
        _check(device, nat_p, ref_p, k, "params")
        _check(device, nat_s, ref_s, k, "slows")
    place.check()


def _lowp_runs(dtype, state_dtype, device, run):
    """run(p_dtype, s_dtype, native) -> list of (name, tensors): the float64 reference, the reference in
    `dtype`, the native op with `dtype` params and `state_dtype` state."""
    return (run(torch.float64, torch.float64, False), run(dtype, dtype, False), run(dtype, state_dtype, True))


def _lowp_pair(seed, dtype):
    """Params and grads (`_randn` of `seed` and `seed + 100`, LOWP_SHAPES) rounded to `dtype`, held in
    float64 (exact), so the float64 and `dtype` runs start from the same values."""
    return tuple([v.to(dtype).double() for v in _randn(s, LOWP_SHAPES)] for s in (seed, seed + 100))


# the SAM low-precision tests' grid: each dtype, plain and adaptive
SAM_LOWP_GRID = pytest.mark.parametrize("dtype,adaptive", [(d, a) for a in (False, True)
                                                            for d in (torch.bfloat16, torch.float16)])


def _assert_lowp(hi, lowp, nat, dtype):
    for (name, h), (_, lo), (_, n) in zip(hi, lowp, nat):
        for i, (a, b, c) in enumerate(zip(n, lo, h)):
            _lowp_close(a, b, c, dtype, f"{name}[{i}]")


@pytest.mark.parametrize("dtype,state", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                         (torch.float16, torch.float32)])
def test_lookahead_sync_lowp(device, dtype, state):

    def run(p_dtype, s_dtype, native):
        slows = [v.to(dtype).to(device=device, dtype=s_dtype) for v in _randn(1, LOWP_SHAPES)]
        params = [torch.empty_like(s, dtype=p_dtype) for s in slows]
        for k in range(1, STEPS + 1):
            for p, v in zip(params, _randn(100 + k, LOWP_SHAPES)):
                p.copy_(v.to(dtype))  # fresh params, representable in the low precision
            (_native_lookahead_sync if native else _forloop_lookahead_sync)(params, slows, alpha=0.3)
        if native:  # slow = the stored param, exactly (slow.copy_(p))
            for p, s in zip(params, slows):
                assert s.dtype == s_dtype and torch.equal(s.to(dtype), p)
        return [("params", params), ("slows", slows)]

    _assert_lowp(*_lowp_runs(dtype, state, device, run), dtype)


# ------------------------------------------------------------------------------------------------ SAM

@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_norms_fp32(device, adaptive):
    place = Place(device)
    for k in range(1, STEPS + 1):
        pv, gv = _randn(200 + k), _randn(300 + k, scale=3.0)
        params, grads = place.list(pv, torch.float32), place.list(gv, torch.float32)
        out = _native_sam_norms(params, grads, adaptive=adaptive)
        assert out.shape == (len(params),) and out.dtype == torch.float32 and out.device.type == device
        ref = (_forloop_sam_norms(_to(pv, torch.float32, device), _to(gv, torch.float32, device),
                                            adaptive=adaptive)).float().cpu()
        # the exact norm of the same fp32 product
        exact = torch.stack([((p.float().abs() if adaptive else 1.0) * g.float()).double().norm()
                             for p, g in zip(pv, gv)]).float()
        out = out.cpu()
        assert out[0] == 0 and ref[0] == 0  # the zero-size tensor
        # CPU: fp32 fma chains of <= 16 squares per lane, fp64 beyond; CUDA: ~128 squares per thread
        # in fp32, then a tree of fp32 block sums
        to_exact = 2 if device == "cpu" else 8
        assert int(ulp_distance(out, exact).max()) <= to_exact, f"native norm beyond {to_exact} ulp of the exact norm"
        allowed = to_exact + 2 + ulp_distance(ref, exact)
        assert (ulp_distance(out, ref) <= allowed).all(), "native norm beyond a few ulp + torch's own error"
    place.check()


@SAM_LOWP_GRID
def test_sam_norms_lowp(device, dtype, adaptive):
    for k in range(1, STEPS + 1):
        pv, gv = _lowp_pair(200 + k, dtype)
        hi = (_forloop_sam_norms(pv, gv, adaptive=adaptive))
        lowp = (_forloop_sam_norms(_to(pv, dtype, device), _to(gv, dtype, device), adaptive=adaptive))
        nat = _native_sam_norms(_to(pv, dtype, device), _to(gv, dtype, device), adaptive=adaptive)
        assert nat.dtype == torch.float32
        _lowp_close(nat, lowp, hi, dtype, f"norms call {k}")


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_perturb_and_restore_fp32(device, adaptive):
    place = Place(device)
    for k in range(1, STEPS + 1):
        pv, gv = _randn(400 + k), _randn(500 + k)
        scale = torch.tensor(0.05 * k / 7.3, dtype=torch.float32, device=device)
        ref_p, grads = _to(pv, torch.float32, device), _to(gv, torch.float32, device)
        ref_old = [torch.empty_like(p) for p in ref_p]
        _forloop_sam_perturb(ref_p, grads, ref_old, scale=scale, adaptive=adaptive)
        nat_p = place.list(pv, torch.float32)
        nat_old = place.list(pv, torch.float32, poison=True)  # written whole: NaN until the kernel runs
        _native_sam_perturb(nat_p, place.list(gv, torch.float32), nat_old, scale=scale, adaptive=adaptive)
        _check(device, nat_p, ref_p, 1, "perturbed params")
        _assert_exact(nat_old, ref_old, "old_params")  # a copy: exact everywhere
        _forloop_sam_restore(ref_p, ref_old)
        for p in nat_p:
            p.fill_(float("nan"))  # restore writes every element
        _native_sam_restore(nat_p, nat_old)
        _assert_exact(nat_p, ref_p, "restored params")
        _assert_exact(nat_p, _to(pv, torch.float32, device), "restored params vs the originals")
    place.check()


@SAM_LOWP_GRID
def test_sam_perturb_lowp(device, dtype, adaptive):
    for k in range(1, STEPS + 1):
        pv, gv = _lowp_pair(400 + k, dtype)
        scale = 0.05 * k / 7.3
        runs = []
        for p_dtype, native in ((torch.float64, False), (dtype, False), (dtype, True)):
            p, g = _to(pv, p_dtype, device), _to(gv, p_dtype, device)
            old = [torch.full_like(t, float("nan")) for t in p]
            s = torch.tensor(scale, dtype=torch.float64 if p_dtype == torch.float64 else torch.float32, device=device)
            (_native_sam_perturb if native else _forloop_sam_perturb)(p, g, old, scale=s, adaptive=adaptive)
            runs.append((p, old))
        (hi_p, _), (lo_p, _), (nat_p, nat_old) = runs
        for i in range(len(pv)):
            _lowp_close(nat_p[i], lo_p[i], hi_p[i], dtype, f"param{i} call {k}")
            assert torch.equal(nat_old[i].cpu().view(torch.int16), _to(pv, dtype, "cpu")[i].view(torch.int16))


def test_sam_restore_copies_bits():
    """A bit copy (NaN payloads, -0 and subnormals included), for 2-, 4- and 8-byte dtypes."""
    g = torch.Generator().manual_seed(3)
    for dtype, itype in ((torch.bfloat16, torch.int16), (torch.float16, torch.int16), (torch.float32, torch.int32),
                         (torch.float64, torch.int64)):
        size = torch.empty(0, dtype=dtype).element_size()
        bits = [torch.randint(0, 256, (n * size,), generator=g, dtype=torch.uint8).view(itype)
                for n in (0, 1, 77, 70001)]
        src = [b.view(dtype) for b in bits]
        dst = [torch.full_like(s, float("nan")) for s in src]
        _native_sam_restore(dst, src)
        for d, b in zip(dst, bits):
            assert torch.equal(d.view(itype), b)


# ----------------------------------------------------------------------------------------------- Muon
def _muon_momentum_ref(grads, bufs, updates, *, momentum, nesterov, maximize):
    """The elementwise stage of `_forloop_muon` before Newton-Schulz, literally: then `X = u.bfloat16()`
    (here: rounded to each update's dtype)."""
    for g, buf, out in zip(grads, bufs, updates):
        if maximize:
            g = -g
        buf.lerp_(g, 1 - momentum)
        u = g.lerp(buf, momentum) if nesterov else buf
        out.copy_(u.to(out.dtype))


def _muon_apply_ref(params, updates, *, scales, lr, weight_decay):
    """The elementwise stage of `_forloop_muon` after Newton-Schulz, literally (`u *= scale` on the
    Newton-Schulz output, in its dtype)."""
    for p, u, scale in zip(params, updates, scales):
        u = u.clone()
        u *= scale
        p.mul_(1 - lr * weight_decay)
        p.add_(u.reshape(p.shape), alpha=-lr)


MUON_CASES = [{"momentum": 0.95, "nesterov": True, "maximize": False}, {"momentum": 0.9, "nesterov": False, "maximize": True},
              {"momentum": 0.3, "nesterov": True, "maximize": True}]


@pytest.mark.parametrize("upd_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(MUON_CASES)))
def test_muon_momentum_fp32(device, upd_dtype, case):
    kw = MUON_CASES[case]
    place = Place(device)
    b0 = _randn(600, scale=0.1)
    ref_b, nat_b = _to(b0, torch.float32, device), place.list(b0, torch.float32)
    for k in range(1, STEPS + 1):
        gv = _randn(700 + k)
        ref_u = [torch.empty(s, dtype=upd_dtype, device=device) for s in SHAPES]
        _muon_momentum_ref(_to(gv, torch.float32, device), ref_b, ref_u, **kw)
        grads = place.list(gv, torch.float32)
        before = [g.clone() for g in grads]
        # NS input: contiguous, grads' shape; poisoned
        nat_u = [place(torch.zeros(s, dtype=torch.float64), upd_dtype, "contiguous", poison=True) for s in SHAPES]
        _native_muon_momentum(grads, nat_b, nat_u, **kw)
        _check(device, nat_b, ref_b, k, "momentum_buffers")
        if device == "cpu" or upd_dtype == torch.float32:
            _check(device, nat_u, ref_u, k, "updates")
        else:  # bf16 of values within 4 ulp (fp32): one bf16 ulp at most
            for a, e in zip(nat_u, ref_u):
                assert a.numel() == 0 or int(ulp_distance(a.cpu(), e.cpu()).max()) <= 1
        _assert_exact(grads, before, "grads (never written)")
    place.check()


@pytest.mark.parametrize("dtype,state", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                         (torch.float16, torch.float32)])
def test_muon_momentum_lowp(device, dtype, state):
    kw = MUON_CASES[0]

    def run(g_dtype, s_dtype, native):
        bufs = [v.to(dtype).to(device=device, dtype=s_dtype) for v in _randn(600, LOWP_SHAPES, scale=0.1)]
        ups = []
        for k in range(1, STEPS + 1):
            grads = [v.to(dtype).to(device=device, dtype=g_dtype) for v in _randn(700 + k, LOWP_SHAPES)]
            # the float64 run keeps u in float64 (the exact value the bf16 update rounds)
            u_dtype = torch.float64 if g_dtype == torch.float64 else torch.bfloat16
            ups = [torch.full(s, float("nan"), dtype=u_dtype, device=device) for s in LOWP_SHAPES]
            (_native_muon_momentum if native else _muon_momentum_ref)(grads, bufs, ups, **kw)
        return [("bufs", bufs), ("updates", ups)]

    _assert_lowp(*_lowp_runs(dtype, state, device, run), dtype)


# Muon's scale max(1, rows/cols) ** 0.5 for a few shapes, and 1 (x * 1.0 is skipped upstream-exact)
_SCALES = [1.0, math.sqrt(3.0), math.sqrt(1.5), 1.0, math.sqrt(129 / 7)]


def _scales(n=None):
    return [_SCALES[i % len(_SCALES)] for i in range(len(SHAPES) if n is None else n)]


def _ns_like(values, dtype, device, transposed_every=3):
    """Newton-Schulz outputs: `dtype`, some of them transposed views (upstream transposes back)."""
    out = []
    for i, v in enumerate(values):
        if v.dim() == 2 and i % transposed_every == 0:
            out.append(v.t().contiguous().to(device=device, dtype=dtype).t())  # non-contiguous, v's shape
        else:
            out.append(v.to(device=device, dtype=dtype))
    return out


@pytest.mark.parametrize("upd_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_muon_apply_fp32(device, upd_dtype, weight_decay):
    place = Place(device)
    p0 = _randn(800)
    ref_p, nat_p = _to(p0, torch.float32, device), place.list(p0, torch.float32)
    for k in range(1, STEPS + 1):
        uv = _randn(900 + k, scale=0.5)
        ups = _ns_like(uv, upd_dtype, device)
        assert any(not u.is_contiguous() for u in ups)
        before = [u.clone() for u in ups]
        kw = {"scales": _scales(), "lr": 0.02 * k, "weight_decay": weight_decay}
        _muon_apply_ref(ref_p, ups, **kw)
        _native_muon_apply(nat_p, ups, **kw)
        _check(device, nat_p, ref_p, k, "params")
        _assert_exact(ups, before, "updates (never written)")
    place.check()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_muon_apply_lowp(device, dtype):

    def run(p_dtype, _, native):
        params = [v.to(dtype).to(device=device, dtype=p_dtype) for v in _randn(800, LOWP_SHAPES)]
        for k in range(1, STEPS + 1):
            uv = [v.bfloat16().double() for v in _randn(900 + k, LOWP_SHAPES, scale=0.5)]
            # the NS output is bf16 whatever the params; the float64 run scales it exactly
            ups = _ns_like(uv, torch.float64 if p_dtype == torch.float64 else torch.bfloat16, device)
            (_native_muon_apply if native else _muon_apply_ref)(params, ups, scales=_scales(len(LOWP_SHAPES)), lr=0.02,
                                                                 weight_decay=0.1)
        return [("params", params)]

    _assert_lowp(*_lowp_runs(dtype, dtype, device, run), dtype)


def test_muon_end_to_end_matches_forloop_fp32():
    """momentum kernel -> the reference's Newton-Schulz on the bf16 updates -> apply kernel, per tensor:
    bit-equal to `_forloop_muon` (params and momentum) on the CPU over STEPS steps."""
    g = torch.Generator().manual_seed(5)
    shapes = [(13, 17), (31, 7), (4, 3, 2, 5), (64, 64)]
    p0 = [torch.randn(s, generator=g) for s in shapes]
    ref_p, nat_p = [p.clone() for p in p0], [p.clone() for p in p0]
    ref_b, nat_b = [torch.zeros_like(p) for p in p0], [torch.zeros_like(p) for p in p0]
    kw = {"lr": 0.02, "momentum": 0.95, "weight_decay": 0.01, "nesterov": True, "ns_steps": 5, "maximize": False}
    for _ in range(STEPS):
        grads = [torch.randn(s, generator=g) for s in shapes]
        _forloop_muon(ref_p, grads, ref_b, **kw)
        ups = [torch.full(gr.shape, float("nan"), dtype=torch.bfloat16) for gr in grads]
        _native_muon_momentum(grads, nat_b, ups, momentum=kw["momentum"], nesterov=True, maximize=False)
        outs = [zeropower_via_newtonschulz5(_as_matrix(u), steps=5) for u in ups]
        _native_muon_apply(nat_p, [o.reshape(p.shape) for o, p in zip(outs, nat_p)],
                           scales=[_scale(gr) for gr in grads], lr=kw["lr"], weight_decay=kw["weight_decay"])
        _assert_exact(nat_b, ref_b, "momentum")
        _assert_exact(nat_p, ref_p, "params")


# --------------------------------------------------------------------------------------- NeuroOptima
NEURO_CASES = [{"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "maximize": False},
               {"lr": 3e-3, "beta1": 0.5, "beta2": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": True}]


def _neuro_state(device, dtype, place=None, shapes=None):
    vals = [_randn(1000, shapes, scale=0.1), _randn(1001, shapes, scale=0.01, positive=True),
            _randn(1002, shapes, scale=0.1), _randn(1003, shapes)]
    if place is None:
        return [[v.to(device=device, dtype=dtype) for v in lst] for lst in vals]
    return [place.list(lst, dtype) for lst in vals]


def _assert_sign_steps_close(nat_p, ref_p, ref_s, kw):
    """docs/spec.md §9 for sign steps (CUDA: nvcc contracts m + b2*diff into one fma): params within 4 ulp, except
    elements whose sign argument m + b2*diff (the reference's new state) is within 8 ulp of 0 at the
    operands' scale, which may flip (a difference of lr or 2*lr)."""
    for i, (a, e) in enumerate(zip(nat_p, ref_p)):
        if a.numel() == 0:
            continue
        a, e = a.cpu().double(), e.cpu().double()
        m, diff = ref_s[0][i].cpu().double(), ref_s[2][i].cpu().double()
        num, mag = m + kw["beta2"] * diff, m.abs() + (kw["beta2"] * diff).abs()
        near_zero = num.abs() <= 8 * torch.finfo(torch.float32).eps * mag
        eps = torch.finfo(torch.float32).eps
        bad = ((a - e).abs() > 4 * eps * (e.abs() + e.abs().mean())) & ~near_zero
        assert not bad.any(), f"params[{i}]: {int(bad.sum())} elements differ beyond 4 ulp away from sign ties"


@pytest.mark.parametrize("case", range(len(NEURO_CASES)))
def test_neuro_optima_fp32(device, case):
    kw = NEURO_CASES[case]
    place = Place(device)
    p0 = _randn(1100)
    ref_p, nat_p = _to(p0, torch.float32, device), place.list(p0, torch.float32)
    ref_s, nat_s = _neuro_state(device, torch.float32), _neuro_state(device, torch.float32, place)
    for k in range(1, STEPS + 1):
        gv = _randn(1200 + k)
        _forloop_neuro_optima(ref_p, _to(gv, torch.float32, device), *ref_s, **kw)
        grads = place.list(gv, torch.float32)
        before = [x.clone() for x in grads]
        _native_neuro_optima(nat_p, grads, *nat_s, **kw)
        for name, a, e in zip(("exp_avgs", "exp_avg_sqs", "exp_avg_diffs", "prev_grads"), nat_s, ref_s):
            _check(device, a, e, k, name)
        if device == "cpu":
            _assert_exact(nat_p, ref_p, "params")
        else:
            _assert_sign_steps_close(nat_p, ref_p, ref_s, kw)
            for a_l, e_l in zip([nat_p, *nat_s], [ref_p, *ref_s]):  # a flip must not carry over: resync
                for a, e in zip(a_l, e_l):
                    a.copy_(e)
        _assert_exact(grads, before, "grads (never written)")
    place.check()


@pytest.mark.parametrize("dtype,state", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                         (torch.float16, torch.float32)])
def test_neuro_optima_lowp(device, dtype, state):
    kw = dict(NEURO_CASES[0], lr=1e-3)

    def run(p_dtype, s_dtype, native):
        params = [v.to(dtype).to(device=device, dtype=p_dtype) for v in _randn(1100, LOWP_SHAPES)]
        st = [[t.to(dtype).to(s_dtype) for t in lst] for lst in _neuro_state(device, torch.float64, shapes=LOWP_SHAPES)]
        for k in range(1, STEPS + 1):
            grads = [v.to(dtype).to(device=device, dtype=p_dtype) for v in _randn(1200 + k, LOWP_SHAPES)]
            (_native_neuro_optima if native else _forloop_neuro_optima)(params, grads, *st, **kw)
        return [("params", params)] + list(zip(("exp_avgs", "exp_avg_sqs", "exp_avg_diffs", "prev_grads"), st))

    _assert_lowp(*_lowp_runs(dtype, state, device, run), dtype)


# ------------------------------------------------------------------------------------------- float64
def test_float64_all(device):
    """float64 params and state (native only): docs/spec.md §9's tolerance, every op from the same inputs."""
    pv, gv = _randn(1), _randn(2)

    def two(*lists):  # identical float64 inputs for the reference and the native call
        return [[_to(v, torch.float64, device) for v in lists] for _ in range(2)]

    (a, sa), (b, sb) = two(pv, gv)
    _forloop_lookahead_sync(a, sa, alpha=0.3)
    _native_lookahead_sync(b, sb, alpha=0.3)
    _assert_close(b + sb, a + sa, 1, "lookahead")
    (a, ga), (b, gb) = two(pv, gv)
    n = _native_sam_norms(b, gb, adaptive=True)
    assert n.dtype == torch.float64
    _assert_close([n], [(_forloop_sam_norms(a, ga, adaptive=True))], 1, "norms")
    olds_a, olds_b = [torch.empty_like(t) for t in a], [torch.empty_like(t) for t in b]
    scale = torch.tensor(0.01, dtype=torch.float64, device=device)
    _forloop_sam_perturb(a, ga, olds_a, scale=scale, adaptive=True)
    _native_sam_perturb(b, gb, olds_b, scale=scale, adaptive=True)
    _assert_close(b + olds_b, a + olds_a, 1, "perturb")
    (ba, ga), (bb, gb) = two(pv, gv)
    ua, ub = [torch.empty_like(t) for t in ga], [torch.empty_like(t) for t in gb]
    _muon_momentum_ref(ga, ba, ua, **MUON_CASES[0])
    _native_muon_momentum(gb, bb, ub, **MUON_CASES[0])
    _assert_close(bb + ub, ba + ua, 1, "muon momentum")
    (a, ua), (b, ub) = two(pv, gv)
    _muon_apply_ref(a, ua, scales=_scales(), lr=0.02, weight_decay=0.1)
    _native_muon_apply(b, ub, scales=_scales(), lr=0.02, weight_decay=0.1)
    _assert_close(b, a, 1, "muon apply")
    (a, ga), (b, gb) = two(pv, gv)
    st_a, st_b = _neuro_state(device, torch.float64), _neuro_state(device, torch.float64)
    _forloop_neuro_optima(a, ga, *st_a, **NEURO_CASES[0])
    _native_neuro_optima(b, gb, *st_b, **NEURO_CASES[0])
    _assert_close(b + [t for lst in st_b for t in lst], a + [t for lst in st_a for t in lst], 1, "neuro_optima")


# ------------------------------------------------------------- bf16/fp16 vector loops vs the scalar loop
_SLICE = 7  # below one load2 pair (16 fp32 lanes with AVX2, 32 with AVX512): only the scalar loop runs


def _sliced(lst):
    return [t[j:j + _SLICE] for t in lst for j in range(0, t.numel(), _SLICE)]


@pytest.mark.parametrize("dtype,state", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                         (torch.float16, torch.float32)])
def test_lowp_vector_loops_bit_equal_scalar_loop(dtype, state):
    """The CPU kernels' mixed-dtype rows run load2/store2 register pairs; the same ops on 7-element views
    of the same storage run only the scalar loop. Both give the same bits on every written tensor."""
    sizes = [1003, 65, 4099]
    g = torch.Generator().manual_seed(13)

    def rnd(dt, scale=1.0, positive=False):
        out = [torch.randn(n, generator=g) * scale for n in sizes]
        return [(x.abs() + 1e-3 if positive else x).to(dt) for x in out]

    p0, s0, g0 = rnd(dtype), [rnd(state, 0.1), rnd(state, 0.01, True), rnd(state, 0.1), rnd(state)], rnd(dtype)
    u0 = rnd(torch.bfloat16)
    results = {}
    for label in ("vector", "scalar"):
        cut = (lambda x: x) if label == "vector" else _sliced
        p, s = [t.clone() for t in p0], [[t.clone() for t in lst] for lst in s0]
        olds = [torch.full_like(t, float("nan")) for t in p]
        ups = [torch.full(t.shape, float("nan"), dtype=torch.bfloat16) for t in p]
        _native_lookahead_sync(cut(p), cut(s[0]), alpha=0.3)
        _native_sam_perturb(cut(p), cut(g0), cut(olds), scale=torch.tensor(0.07), adaptive=True)
        _native_muon_momentum(cut(g0), cut(s[1]), cut(ups), momentum=0.95, nesterov=True, maximize=True)
        rows = len(cut(p))
        _native_muon_apply(cut(p), cut(u0), scales=[1.2247] * rows, lr=0.02, weight_decay=0.1)
        _native_neuro_optima(cut(p), cut(g0), *[cut(x) for x in s], **NEURO_CASES[0])
        results[label] = [p, olds, ups, *s]
    for j, (a_l, b_l) in enumerate(zip(results["vector"], results["scalar"])):
        for a, b in zip(a_l, b_l):
            assert torch.equal(a, b), f"written list {j}: vector and scalar loops differ"


# ------------------------------------------------------------------------------------- many tensors
def test_many_tensors_one_call(device):
    """211 tensors of mixed odd sizes (zero-size ones among them) in one call of every op: the CUDA launch
    table's row search and the CPU chunk list, against the references."""
    g = torch.Generator().manual_seed(21)
    sizes = [0 if i % 37 == 5 else int(torch.randint(1, 1500, (1,), generator=g)) | 1 for i in range(211)]
    shapes = [(n,) for n in sizes]

    def fresh(seed, **kw):
        return [v.float().to(device) for v in _randn(seed, shapes, **kw)]

    p, s, gr = fresh(1), fresh(2), fresh(3)
    a, b = [t.clone() for t in p], [t.clone() for t in p]
    sa, sb = [t.clone() for t in s], [t.clone() for t in s]
    _forloop_lookahead_sync(a, sa, alpha=0.3)
    _native_lookahead_sync(b, sb, alpha=0.3)
    _check(device, b + sb, a + sa, 1, "lookahead")
    ref = (_forloop_sam_norms(p, gr, adaptive=True)).cpu()
    out = _native_sam_norms(p, gr, adaptive=True).cpu()
    assert (ulp_distance(out, ref) <= 8).all()
    a, b = [t.clone() for t in p], [t.clone() for t in p]
    oa, ob = [torch.empty_like(t) for t in p], [torch.full_like(t, float("nan")) for t in p]
    _forloop_sam_perturb(a, gr, oa, scale=torch.tensor(0.3, device=device), adaptive=True)
    _native_sam_perturb(b, gr, ob, scale=torch.tensor(0.3, device=device), adaptive=True)
    _check(device, b, a, 1, "perturb")
    _assert_exact(ob, oa, "old_params")
    b = [torch.full_like(t, float("nan")) for t in p]
    _native_sam_restore(b, ob)
    _assert_exact(b, p, "restore")
    ba, bb = [t.clone() for t in s], [t.clone() for t in s]
    ua = [torch.empty_like(t, dtype=torch.bfloat16) for t in gr]
    ub = [torch.full_like(t, float("nan"), dtype=torch.bfloat16) for t in gr]
    _muon_momentum_ref(gr, ba, ua, **MUON_CASES[0])
    _native_muon_momentum(gr, bb, ub, **MUON_CASES[0])
    _check(device, bb, ba, 1, "muon momentum")
    if device == "cpu":
        _assert_exact(ub, ua, "muon updates")
    a, b = [t.clone() for t in p], [t.clone() for t in p]
    _muon_apply_ref(a, ua, scales=_scales(len(p)), lr=0.02, weight_decay=0.1)
    _native_muon_apply(b, ua, scales=_scales(len(p)), lr=0.02, weight_decay=0.1)
    _check(device, b, a, 1, "muon apply")
    a, b = [t.clone() for t in p], [t.clone() for t in p]
    st = [fresh(4, scale=0.1), fresh(5, scale=0.01, positive=True), fresh(6, scale=0.1), fresh(7)]
    st_a, st_b = [[t.clone() for t in lst] for lst in st], [[t.clone() for t in lst] for lst in st]
    kw = NEURO_CASES[0]
    _forloop_neuro_optima(a, gr, *st_a, **kw)
    _native_neuro_optima(b, gr, *st_b, **kw)
    for x, y in zip(st_b, st_a):
        _check(device, x, y, 1, "neuro_optima state")
    if device == "cpu":
        _assert_exact(b, a, "neuro_optima params")
    else:
        _assert_sign_steps_close(b, a, st_a, kw)


# ------------------------------------------------------------------------------------ edge cases, errors
def test_zero_size_and_empty_lists():
    z = [torch.zeros(0), torch.zeros(0, 3)]
    _native_lookahead_sync(z, [t.clone() for t in z], alpha=0.5)
    out = _native_sam_norms(z, z, adaptive=True)
    assert out.tolist() == [0.0, 0.0]
    _native_sam_perturb(z, z, [t.clone() for t in z], scale=torch.tensor(1.0), adaptive=False)
    _native_sam_restore(z, [t.clone() for t in z])
    _native_muon_momentum(z, [t.clone() for t in z], [t.bfloat16() for t in z], momentum=0.9, nesterov=True,
                          maximize=False)
    _native_muon_apply(z, [t.bfloat16() for t in z], scales=[1.0, 1.0], lr=0.1, weight_decay=0.1)
    _native_neuro_optima(z, z, *[[t.clone() for t in z] for _ in range(4)], **NEURO_CASES[0])
    # empty lists: nothing to do, nothing raised
    assert _native_sam_norms([], [], adaptive=False).numel() == 0
    _native_lookahead_sync([], [], alpha=0.5)
    _native_sam_restore([], [])
    _native_muon_apply([], [], scales=[], lr=0.1, weight_decay=0.0)


def _bad_calls(device):
    """(name, call, regex, tensors that must be unchanged): each call raises before it writes."""
    f32 = {"device": device}
    p, s = [torch.ones(5, **f32), torch.ones(3, **f32)], [torch.full((5,), 2.0, **f32), torch.full((3,), 2.0, **f32)]
    bad = [
        ("lookahead lengths", lambda: _native_lookahead_sync(p, s[:1], alpha=0.5), "has 1 tensors, expected 2", p),
        ("lookahead numel", lambda: _native_lookahead_sync(p, [s[0], torch.ones(4, **f32)], alpha=0.5),
         "has 4 elements, expected 3", p),
        ("lookahead dtype", lambda: _native_lookahead_sync(p, [x.double() for x in s], alpha=0.5), "dtype", p),
        ("lookahead fp16 slow for fp32", lambda: _native_lookahead_sync(p, [x.half() for x in s], alpha=0.5),
         "dtype", p),
        ("norms dtype", lambda: _native_sam_norms(p, [x.double() for x in s], adaptive=True),
         "abs_weights 0 has dtype Float", p),
        ("perturb old dtype", lambda: _native_sam_perturb(p, s, [x.double() for x in p], scale=torch.tensor(
            1.0, device=device), adaptive=False), "old_params 0 has dtype Double", p),
        ("perturb scale", lambda: _native_sam_perturb(p, s, [x.clone() for x in p], scale=torch.ones(2, device=device),
                                                      adaptive=False), "scale must have one element", p),
        ("restore dtype", lambda: _native_sam_restore(p, [x.double() for x in s]), "src 0 has dtype Double", p),
        ("restore numel", lambda: _native_sam_restore(p, [s[0], torch.ones(2, **f32)]), "elements", p),
        ("momentum updates dtype", lambda: _native_muon_momentum(p, s, [x.half() for x in p], momentum=0.9,
                                                                 nesterov=True, maximize=False),
         "expected bfloat16 or Float", s),
        ("momentum buf dtype", lambda: _native_muon_momentum(p, [x.double() for x in s], [x.bfloat16() for x in p],
                                                             momentum=0.9, nesterov=True, maximize=False),
         "dtype", p),
        ("momentum lengths", lambda: _native_muon_momentum(p, s, [p[0].bfloat16()], momentum=0.9, nesterov=True,
                                                           maximize=False), "expected 2", s),
        ("apply scales", lambda: _native_muon_apply(p, [x.bfloat16() for x in s], scales=[1.0], lr=0.1,
                                                    weight_decay=0.0), "scales has 1 values, expected 2", p),
        ("apply updates dtype", lambda: _native_muon_apply(p, [x.half() for x in s], scales=[1.0, 1.0], lr=0.1,
                                                           weight_decay=0.0), "expected bfloat16 or Float", p),
        ("apply numel", lambda: _native_muon_apply(p, [s[0].bfloat16(), torch.ones(4, dtype=torch.bfloat16,
                                                                                    device=device)],
                                                   scales=[1.0, 1.0], lr=0.1, weight_decay=0.0), "elements", p),
        ("neuro state dtype", lambda: _native_neuro_optima(p, s, s, s, s, [x.double() for x in s],
                                                           **NEURO_CASES[0]), "dtype", p),
        ("neuro lengths", lambda: _native_neuro_optima(p, s, s, s, s[:1], s, **NEURO_CASES[0]), "expected 2", p),
        ("int params", lambda: _native_lookahead_sync([x.int() for x in p], [x.int() for x in s], alpha=0.5),
         "unsupported dtype", p),
    ]
    return bad, p, s


def test_bad_input_raises_before_writing(device):
    bad, p, s = _bad_calls(device)
    for name, call, match, _ in bad:
        snapshot = [t.clone() for t in p + s]
        with pytest.raises(RuntimeError, match=match):
            call()
        _assert_exact(p + s, snapshot, f"{name}: tensors written before the error")


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA device")
def test_mixed_devices_raise():
    _need("cuda")
    p = [torch.ones(5, device="cuda"), torch.ones(3)]
    s = [torch.ones(5, device="cuda"), torch.ones(3, device="cuda")]
    with pytest.raises(RuntimeError, match="expected cuda"):
        _native_lookahead_sync(p, s, alpha=0.5)
    with pytest.raises(RuntimeError, match="scale is on"):  # the op itself (the launcher moves the scale)
        torch.ops.fused_optim.sam_perturb_(s, s, [t.clone() for t in s], torch.ones(1), False)
    assert torch.equal(p[0].cpu(), torch.ones(5)) and torch.equal(s[1].cpu(), torch.ones(3))
