"""The Triton kernels of the composites' fused parts
against their forloop references (docs/spec.md §5, §6, §8, tolerances §9), on CPU through the interpreter and,
marked ``gpu``, compiled on CUDA.

Every function runs >= 7 calls with fresh random inputs on `spec_checks.ADVERSARIAL_SHAPES` plus a
non-contiguous view, its written tensors carved out of sentinel-filled storage (an out-of-bounds write
shows) and, where it writes a whole tensor without reading it (old_params, Muon's updates, restore's
params), poisoned with NaN first (an unwritten element shows).

fp32 on CPU is asserted bit for bit: the kernels follow torch's CPU roundings op for op (fma for
``add(alpha=)`` and ``lerp``, products rounded one by one), and the interpreter computes the fma in fp64
(`multi_tensor._fma`). On CUDA the fma-based results are held to docs/spec.md §9's 4 ulp (torch's CUDA kernels
get their fmas from nvcc's contraction, not from an explicit op); copies and SAM's perturbation (compiled
without fp fusion) stay exact. Norms: within a few ulp of the float64 norm of the fp32 product and of
torch's. bf16/fp16: `spec_checks.assert_lowp_close` against a float64 forloop run.

Muon's two stages have no separate reference in `fused_optim.muon`: `_ref_muon_momentum` and
`_ref_muon_apply` below are `_forloop_muon`'s lines before and after Newton–Schulz, verbatim.
"""
from __future__ import annotations

import pytest
import torch
from spec_checks import ADVERSARIAL_SHAPES, LOWP_ATOL, assert_lowp_close, assert_ulp_close

triton = pytest.importorskip("triton")

import fused_optim.kernels as fk
from fused_optim.kernels import kernel_module, multi_tensor
from fused_optim.lookahead import _forloop_lookahead_sync
from fused_optim.muon import _as_matrix, _scale
from fused_optim.sam import _forloop_sam_norms, _forloop_sam_perturb, _forloop_sam_restore

_HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                             pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")])]
CALLS = 7
GUARD = 32
SENTINEL = 12345.0
NAN = float("nan")


# ------------------------------------------------------------------------------------------ references
def _ref_muon_momentum(grads, momentum_buffers, updates, *, momentum, nesterov, maximize):
    """`fused_optim.muon._forloop_muon` up to Newton–Schulz's input ``X = u.bfloat16()``."""
    for g, buf, upd in zip(grads, momentum_buffers, updates):
        if maximize:
            g = -g
        buf.lerp_(g, 1 - momentum)
        u = g.lerp(buf, momentum) if nesterov else buf
        upd.copy_(u)  # rounds to the update's dtype, as u.bfloat16()


def _ref_muon_apply(params, updates, *, scales, lr, weight_decay):
    """`fused_optim.muon._forloop_muon` after Newton–Schulz: ``u *= scale`` on the NS output, decay, add."""
    for p, upd, scale in zip(params, updates, scales):
        u = upd.clone()
        u *= scale
        p.mul_(1 - lr * weight_decay)
        p.add_(u.reshape(p.shape), alpha=-lr)


# ------------------------------------------------------------------------------------------ fixtures
class Guarded:
    """Tensors (any strides) carved out of sentinel-filled storages; `check` fails on a write outside."""

    def __init__(self):
        self.regions: list[tuple[torch.Tensor, int, int, torch.Tensor]] = []

    def like(self, t: torch.Tensor, dtype=None) -> torch.Tensor:
        dtype = dtype or t.dtype
        span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())) if t.numel() else 0
        base = torch.full((span + 2 * GUARD,), SENTINEL, dtype=dtype, device=t.device)
        out = base.as_strided(t.shape, t.stride(), GUARD)
        out.copy_(t)
        self.regions.append((base, GUARD, GUARD + span, base.clone()))
        return out

    def check(self):
        for base, lo, hi, snap in self.regions:
            assert torch.equal(base[:lo], snap[:lo]) and torch.equal(base[hi:], snap[hi:]), \
                "a kernel wrote outside its tensor"


def _shapes_like(device, dtype, gen, shapes=ADVERSARIAL_SHAPES, strided=True) -> list[torch.Tensor]:
    """Fresh random tensors of `shapes` (as `spec_checks.make_params`), the last a transposed view."""
    out = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    if strided:
        out.append(torch.randn(9, 12, generator=gen).to(device=device, dtype=dtype).t())
    return out


def _randn_like(ts, gen, dtype=None, scale=1.0):
    """Fresh random tensors with each tensor's shape and strides."""
    out = []
    for t in ts:
        x = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)
        x.copy_(torch.randn(t.shape, generator=gen) * scale)
        out.append(x)
    return out


def _clone(ts, dtype=None):
    """Copies that keep strides (optionally in another dtype)."""
    out = []
    for t in ts:
        c = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)
        c.copy_(t)
        out.append(c)
    return out


def _fma_ulp(device) -> int:
    return 0 if device == "cpu" else 4


def _assert_all_ulp(actual, expected, max_ulp, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.dtype == e.dtype and a.stride() == e.stride(), f"{what}[{i}]"
        assert_ulp_close(a, e, max_ulp, f"{what}[{i}]")


def _assert_lowp(actual, lowp_ref, high_ref, dtype, what):
    """`assert_lowp_close` over the whole list at once (a max over one element is a coin toss between
    roundings); fp32 outputs (state, norms) of a low-precision run get the run's dtype atol."""
    a = torch.cat([t.detach().double().flatten() for t in actual])
    lo = torch.cat([t.detach().double().flatten() for t in lowp_ref])
    hi = torch.cat([t.detach().double().flatten() for t in high_ref])
    if actual[0].dtype in LOWP_ATOL:
        assert_lowp_close(a.to(actual[0].dtype), lo.to(actual[0].dtype), hi, what)
    else:
        err = (a - hi).abs().max().item()
        ref_err = (lo - hi).abs().max().item()
        assert err <= 2 * ref_err + LOWP_ATOL[dtype], f"{what}: error {err:.3g} > 2 x {ref_err:.3g} + atol"


# ------------------------------------------------------------------------------------------ Lookahead
@pytest.mark.parametrize("device", DEVICES)
def test_lookahead_sync_matches_forloop(device):
    gen = torch.Generator().manual_seed(0)
    buf = Guarded()
    params = [buf.like(p) for p in _shapes_like(device, torch.float32, gen)]
    slows = [buf.like(p) for p in _clone(params)]
    ref_p, ref_s = _clone(params), _clone(slows)
    for call in range(CALLS):
        alpha = (0.5, 0.3, 0.8, 0.05, 0.95, 0.5, 0.61)[call]  # runtime arg: no recompile
        for p, q, d in zip(params, ref_p, _randn_like(params, gen, scale=0.1)):  # the fast steps
            p.add_(d)
            q.add_(d)
        fk._triton_lookahead_sync(params, slows, alpha=alpha)
        _forloop_lookahead_sync(ref_p, ref_s, alpha=alpha)
        _assert_all_ulp(params, ref_p, _fma_ulp(device), f"call {call} param")
        _assert_all_ulp(slows, ref_s, _fma_ulp(device), f"call {call} slow")
        for p, s in zip(params, slows):
            assert torch.equal(p, s)  # slow = p, exactly
    buf.check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("slow_dtype", ["fp32", "same"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lookahead_sync_low_precision(dtype, slow_dtype, device):
    gen = torch.Generator().manual_seed(1)
    p0 = _shapes_like(device, dtype, gen)
    sd = torch.float32 if slow_dtype == "fp32" else dtype
    tri_p, tri_s = _clone(p0), _clone(p0, sd)
    lp_p, lp_s = _clone(p0), _clone(p0)
    hi_p, hi_s = _clone(p0, torch.float64), _clone(p0, torch.float64)
    for call in range(CALLS):
        alpha = 0.5 if call % 2 else 0.3
        d = _randn_like(p0, gen, dtype=torch.float32, scale=0.1)
        for lst in (tri_p, lp_p, hi_p):
            for p, x in zip(lst, d):
                p.add_(x.to(p.dtype))
        fk._triton_lookahead_sync(tri_p, tri_s, alpha=alpha)
        _forloop_lookahead_sync(lp_p, lp_s, alpha=alpha)
        _forloop_lookahead_sync(hi_p, hi_s, alpha=alpha)
        _assert_lowp(tri_p, lp_p, hi_p, dtype, f"call {call} param")
        _assert_lowp(tri_s, lp_s, hi_s, dtype, f"call {call} slow")
        for p, s in zip(tri_p, tri_s):
            assert s.dtype == sd and torch.equal(s, p.to(sd))  # slow holds the rounded p


# ------------------------------------------------------------------------------------------ SAM
def _norm_truth(params, grads, adaptive):
    """float64 norm of the fp32 product the reference materializes."""
    out = []
    for p, g in zip(params, grads):
        prod = (p.abs() * g) if adaptive else g
        out.append(prod.double().norm().float() if prod.numel() else torch.zeros((), device=p.device))
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_sam_norms_match_torch(adaptive, device):
    gen = torch.Generator().manual_seed(2)
    params = _shapes_like(device, torch.float32, gen)
    for call in range(CALLS):
        grads = _randn_like(params, gen)
        norms = fk._triton_sam_norms(params, grads, adaptive=adaptive)
        assert norms.dtype == torch.float32 and norms.shape == (len(params),)
        assert norms.device == params[0].device
        ref = (_forloop_sam_norms(params, grads, adaptive=adaptive))
        assert_ulp_close(norms, ref, 4, f"call {call} vs torch")
        assert_ulp_close(norms, _norm_truth(params, grads, adaptive), 2, f"call {call} vs float64")
        assert norms[0].item() == 0.0  # the zero-size tensor
        params = _randn_like(params, gen)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_sam_norms_low_precision(adaptive, device):
    gen = torch.Generator().manual_seed(3)
    for call in range(CALLS):
        params = _shapes_like(device, torch.bfloat16, gen)
        grads = _randn_like(params, gen)
        tri = fk._triton_sam_norms(params, grads, adaptive=adaptive)
        lowp = (_forloop_sam_norms(params, grads, adaptive=adaptive))
        hi = (_forloop_sam_norms(_clone(params, torch.float64), _clone(grads, torch.float64),
                                            adaptive=adaptive))
        _assert_lowp([tri], [lowp], [hi], torch.bfloat16, f"call {call} norms")


def _sam_scale(params, grads, adaptive, rho=0.05, sign=1.0):
    """SAM's scale as `fused_optim.sam.sam_first_step` computes it: on the device, 0-d fp32."""
    norms = (_forloop_sam_norms(params, grads, adaptive=adaptive)).float()
    return (sign * rho) / (torch.norm(norms, p=2) + 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
def test_sam_perturb_and_restore_match_forloop(adaptive, device):
    gen = torch.Generator().manual_seed(4)
    buf = Guarded()
    params = [buf.like(p) for p in _shapes_like(device, torch.float32, gen)]
    ref_p = _clone(params)
    for call in range(CALLS):
        grads = _randn_like(params, gen)
        scale = _sam_scale(params, grads, adaptive, sign=-1.0 if call == 3 else 1.0)  # maximize: -rho
        olds = [buf.like(torch.full_like(p, NAN)) for p in params]  # poisoned: every element is written
        ref_olds = [torch.empty_like(p) for p in ref_p]
        fk._triton_sam_perturb(params, grads, olds, scale=scale, adaptive=adaptive)
        _forloop_sam_perturb(ref_p, grads, ref_olds, scale=scale, adaptive=adaptive)
        _assert_all_ulp(params, ref_p, 0, f"call {call} perturbed param")
        _assert_all_ulp(olds, ref_olds, 0, f"call {call} old_param")
        for p in params:  # the closure's step would move p; restore must undo any change, exactly
            p.fill_(NAN)
        fk._triton_sam_restore(params, olds)
        _forloop_sam_restore(ref_p, ref_olds)
        _assert_all_ulp(params, ref_p, 0, f"call {call} restored param")
        for p, q in zip(params, ref_p):  # then the base optimizer's step
            d = torch.randn(p.shape, generator=gen).to(device) * 0.1
            p.add_(d)
            q.add_(d)
    buf.check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("adaptive", [False, True], ids=["plain", "adaptive"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sam_perturb_low_precision(dtype, adaptive, device):
    gen = torch.Generator().manual_seed(5)
    for call in range(CALLS):
        p0 = _shapes_like(device, dtype, gen)
        grads = _randn_like(p0, gen)
        scale = _sam_scale(p0, grads, adaptive, rho=0.5)
        runs = {}
        for name, dt in (("tri", dtype), ("lowp", dtype), ("hi", torch.float64)):
            ps, gs = _clone(p0, dt), _clone(grads, dt)
            olds = [torch.full_like(p, NAN) for p in ps]
            fn = fk._triton_sam_perturb if name == "tri" else _forloop_sam_perturb
            fn(ps, gs, olds, scale=scale, adaptive=adaptive)
            runs[name] = (ps, olds)
        _assert_lowp(runs["tri"][0], runs["lowp"][0], runs["hi"][0], dtype, f"call {call} param")
        for o, p in zip(runs["tri"][1], p0):
            assert torch.equal(o.view(torch.int16), p.view(torch.int16))  # old = p, bits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sam_restore_is_a_bit_copy(dtype, device):
    gen = torch.Generator().manual_seed(6)
    int_of = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    snan = {torch.float32: 0x7F800001, torch.bfloat16: 0x7F81, torch.float16: 0x7C01}[dtype]
    for _ in range(CALLS):
        olds = _shapes_like(device, dtype, gen)
        olds[1].view(int_of).fill_(snan)  # a signaling NaN: a float load/store could quiet it
        params = [torch.full_like(o, NAN) for o in olds]
        fk._triton_sam_restore(params, olds)
        for p, o in zip(params, olds):
            assert torch.equal(p.contiguous().view(int_of), o.contiguous().view(int_of))


# ------------------------------------------------------------------------------------------ Muon
MOMENTUM_CASES = [
    {"momentum": 0.95, "nesterov": True, "maximize": False},  # lerp weights 0.05 (small branch), 0.95
    {"momentum": 0.3, "nesterov": True, "maximize": True},    # 0.7 (large branch), 0.3 (small)
    {"momentum": 0.5, "nesterov": False, "maximize": False},  # 0.5: the large branch
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("u_dtype", [torch.bfloat16, torch.float32], ids=["bf16-updates", "fp32-updates"])
@pytest.mark.parametrize("case", MOMENTUM_CASES, ids=["nesterov", "nesterov-max", "plain"])
def test_muon_momentum_matches_forloop(case, u_dtype, device):
    gen = torch.Generator().manual_seed(7)
    buf = Guarded()
    shapes_src = _shapes_like(device, torch.float32, gen)
    bufs = [buf.like(b) for b in _randn_like(shapes_src, gen, scale=0.1)]
    ref_bufs = _clone(bufs)
    for call in range(CALLS):
        grads = _randn_like(shapes_src, gen)  # strided like their params
        # poisoned: every element must be written
        updates = [buf.like(torch.full(g.shape, NAN, dtype=u_dtype, device=device)) for g in grads]
        ref_updates = [torch.empty(g.shape, dtype=u_dtype, device=device) for g in grads]
        grads_before = _clone(grads)
        fk._triton_muon_momentum(grads, bufs, updates, **case)
        _ref_muon_momentum(grads, ref_bufs, ref_updates, **case)
        _assert_all_ulp(bufs, ref_bufs, _fma_ulp(device), f"call {call} momentum_buffer")
        # a bf16 update is the rounded fp32 u: an fma ulp of u may move it by one bf16 ulp at a tie
        _assert_all_ulp(updates, ref_updates, min(_fma_ulp(device), 1), f"call {call} update")
        _assert_all_ulp(grads, grads_before, 0, "grads are never written")
    buf.check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("state", ["fp32", "same"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_muon_momentum_low_precision(dtype, state, device):
    case = {"momentum": 0.95, "nesterov": True, "maximize": False}
    gen = torch.Generator().manual_seed(8)
    src = _shapes_like(device, dtype, gen)
    b0 = _randn_like(src, gen, scale=0.1)
    sd = torch.float32 if state == "fp32" else dtype
    bufs = {"tri": _clone(b0, sd), "lowp": _clone(b0), "hi": _clone(b0, torch.float64)}
    for call in range(CALLS):
        g0 = _randn_like(src, gen)
        ups = {}
        for name, dt in (("tri", dtype), ("lowp", dtype), ("hi", torch.float64)):
            u_dt = torch.bfloat16 if name != "hi" else torch.float64
            ups[name] = [torch.full(g.shape, NAN, dtype=u_dt, device=device) for g in g0]
            fn = fk._triton_muon_momentum if name == "tri" else _ref_muon_momentum
            fn(_clone(g0, dt), bufs[name], ups[name], **case)
        _assert_lowp(ups["tri"], ups["lowp"], ups["hi"], dtype, f"call {call} update")
        _assert_lowp(bufs["tri"], bufs["lowp"], bufs["hi"], dtype, f"call {call} momentum_buffer")
        assert all(b.dtype == sd for b in bufs["tri"])


def _ns_outputs(params, gen, dtype=torch.bfloat16):
    """Stand-ins for Newton–Schulz's outputs: the matrix shape of each param (4-D -> (out, -1)), and for
    tall matrices the transposed-back (non-contiguous) view NS returns. With upstream's scales."""
    ups, scales = [], []
    for p in params:
        m = _as_matrix(p) if p.ndim >= 2 else p
        if m.ndim == 2 and m.size(0) > m.size(1):
            u = torch.randn(m.shape[::-1], generator=gen).to(device=p.device, dtype=dtype).mT
        else:
            u = torch.randn(m.shape, generator=gen).to(device=p.device, dtype=dtype)
        ups.append(u)
        scales.append(_scale(p) if p.ndim >= 2 else 1.0)
    return ups, scales


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("u_dtype", [torch.bfloat16, torch.float32], ids=["bf16-updates", "fp32-updates"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1], ids=["no-wd", "wd"])
def test_muon_apply_matches_forloop(weight_decay, u_dtype, device):
    gen = torch.Generator().manual_seed(9)
    buf = Guarded()
    # + a tall matrix: a scale != 1 inside the main launch (the strided view has its own)
    params = [buf.like(p) for p in _shapes_like(device, torch.float32, gen, [*ADVERSARIAL_SHAPES, (37, 5)])]
    ref_p = _clone(params)
    for call in range(CALLS):
        ups, scales = _ns_outputs(params, gen, u_dtype)
        assert any(not u.is_contiguous() for u in ups) and any(s != 1 for s in scales)
        lr = (0.02, 0.01, 0.3)[call % 3]
        fk._triton_muon_apply(params, ups, scales=scales, lr=lr, weight_decay=weight_decay)
        _ref_muon_apply(ref_p, ups, scales=scales, lr=lr, weight_decay=weight_decay)
        _assert_all_ulp(params, ref_p, _fma_ulp(device), f"call {call} param")
    buf.check()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_muon_apply_low_precision(dtype, device):
    gen = torch.Generator().manual_seed(10)
    p0 = _shapes_like(device, dtype, gen)
    ps = {"tri": _clone(p0), "lowp": _clone(p0), "hi": _clone(p0, torch.float64)}
    for call in range(CALLS):
        ups, scales = _ns_outputs(p0, gen, dtype)
        fk._triton_muon_apply(ps["tri"], ups, scales=scales, lr=0.05, weight_decay=0.1)
        _ref_muon_apply(ps["lowp"], ups, scales=scales, lr=0.05, weight_decay=0.1)
        _ref_muon_apply(ps["hi"], [u.double() for u in ups], scales=scales, lr=0.05, weight_decay=0.1)
        _assert_lowp(ps["tri"], ps["lowp"], ps["hi"], dtype, f"call {call} param")


# ------------------------------------------------------------------------------------------ many tensors
def test_many_tensors_of_odd_sizes(monkeypatch):
    """>= 200 tensors of mixed odd sizes (tables and chunking) through every function, with the norms'
    reduction split into several slots per tensor (shrunk so that small tensors exercise it)."""
    monkeypatch.setattr(multi_tensor, "MAX_PARTS", 4)
    monkeypatch.setattr(multi_tensor, "RBLOCK", 64)
    gen = torch.Generator().manual_seed(11)
    sizes = [int(x) | 1 for x in torch.randint(1, 400, (200,), generator=gen)] + [0, 2049, 5001, 0, 3]
    shapes = [(n,) for n in sizes]
    params = _shapes_like("cpu", torch.float32, gen, shapes, strided=False)
    ref_p = _clone(params)
    for call in range(2):
        grads = _randn_like(params, gen)
        for adaptive in (False, True):
            norms = fk._triton_sam_norms(params, grads, adaptive=adaptive)
            assert_ulp_close(norms, (_forloop_sam_norms(params, grads, adaptive=adaptive)), 4,
                             "norms")
        scale = _sam_scale(params, grads, True)
        olds = [torch.full_like(p, NAN) for p in params]
        ref_olds = [torch.empty_like(p) for p in params]
        fk._triton_sam_perturb(params, grads, olds, scale=scale, adaptive=True)
        _forloop_sam_perturb(ref_p, grads, ref_olds, scale=scale, adaptive=True)
        _assert_all_ulp(params, ref_p, 0, "perturbed")
        fk._triton_sam_restore(params, olds)
        _forloop_sam_restore(ref_p, ref_olds)
        _assert_all_ulp(params, ref_p, 0, "restored")
        slows = _randn_like(params, gen)
        ref_slows = _clone(slows)
        fk._triton_lookahead_sync(params, slows, alpha=0.4)
        _forloop_lookahead_sync(ref_p, ref_slows, alpha=0.4)
        _assert_all_ulp(params, ref_p, 0, "synced")
        bufs = _randn_like(params, gen)
        ref_bufs = _clone(bufs)
        ups = [torch.full(p.shape, NAN, dtype=torch.bfloat16) for p in params]
        ref_ups = [torch.empty_like(u) for u in ups]
        fk._triton_muon_momentum(grads, bufs, ups, momentum=0.9, nesterov=True, maximize=False)
        _ref_muon_momentum(grads, ref_bufs, ref_ups, momentum=0.9, nesterov=True, maximize=False)
        _assert_all_ulp(bufs, ref_bufs, 0, "momentum_buffer")
        _assert_all_ulp(ups, ref_ups, 0, "update")
        scales = [1.0 + (i % 5) / 3 for i in range(len(params))]
        fk._triton_muon_apply(params, ups, scales=scales, lr=0.02, weight_decay=0.01)
        _ref_muon_apply(ref_p, ups, scales=scales, lr=0.02, weight_decay=0.01)
        _assert_all_ulp(params, ref_p, 0, "applied")


def test_zero_size_tensors_are_skipped():
    empty = [torch.empty(0), torch.empty(0, 3)]
    assert torch.equal(fk._triton_sam_norms(empty, [torch.empty_like(t) for t in empty], adaptive=True),
                       torch.zeros(2))
    fk._triton_lookahead_sync(empty, [torch.empty_like(t) for t in empty], alpha=0.5)
    fk._triton_sam_perturb(empty, empty, [torch.empty_like(t) for t in empty], scale=torch.tensor(1.0),
                           adaptive=False)
    fk._triton_sam_restore(empty, [torch.empty_like(t) for t in empty])
    fk._triton_muon_momentum(empty, _clone(empty), _clone(empty, torch.bfloat16), momentum=0.9, nesterov=True,
                             maximize=False)
    fk._triton_muon_apply(empty, _clone(empty, torch.bfloat16), scales=[1.0, 1.0], lr=0.1, weight_decay=0.1)
    assert fk._triton_sam_norms([], [], adaptive=False).shape == (0,)


# ------------------------------------------------------------------------------------------ launches
class LaunchCounter:
    """Wraps `multi_tensor.kernel_for` (every launch goes through it: `multi_tensor.Launch`): records
    (kernel name, launch kwargs) per launch."""

    def __init__(self, monkeypatch):
        self.launches: list[tuple[str, dict]] = []
        monkeypatch.setattr(multi_tensor, "kernel_for", self._wrap(multi_tensor.kernel_for))

    def _wrap(self, real):
        counter = self

        def kernel_for(fn, device):
            kernel = real(fn, device)

            class Launcher:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        counter.launches.append((fn.fn.__name__, kwargs))
                        return kernel[grid](*args, **kwargs)
                    return launch
            return Launcher()
        return kernel_for

    def take(self) -> list[str]:
        names = [n for n, _ in self.launches]
        self.launches.clear()
        return names


def _run_all(params, grads):
    """(name, call) of every function on `params` (fp32); the calls allocate only on the device (the
    no-host-sync test runs them)."""
    scale = torch.full((), 0.1, device=params[0].device)  # SAM's scale lives on the device
    yield "norms", lambda: fk._triton_sam_norms(params, grads, adaptive=True)
    yield "perturb", lambda: fk._triton_sam_perturb(params, grads, [torch.empty_like(p) for p in params],
                                                    scale=scale, adaptive=False)
    yield "restore", lambda: fk._triton_sam_restore(params, _clone(params))
    yield "lookahead", lambda: fk._triton_lookahead_sync(params, _clone(params), alpha=0.5)
    yield "momentum", lambda: fk._triton_muon_momentum(grads, _clone(params), _clone(params, torch.bfloat16),
                                                       momentum=0.9, nesterov=True, maximize=False)
    yield "apply", lambda: fk._triton_muon_apply(params, _clone(params, torch.bfloat16),
                                                 scales=[1.5] * len(params), lr=0.1, weight_decay=0.1)


def test_one_launch_per_call_whatever_the_number_of_tensors(monkeypatch):
    """One launch per call for the elementwise kernels, two for the norms (partials, finish), for a list
    of 300 tensors; a strided tensor adds one launch over its contiguous stand-in (`prepare_lists`)."""
    counter = LaunchCounter(monkeypatch)
    gen = torch.Generator().manual_seed(12)
    params = [torch.randn(int(n), generator=gen) for n in torch.randint(1, 50, (300,), generator=gen)]
    params.append(torch.empty(0))
    expected = {"norms": ["_partials_kernel", "_sam_norms_finish_kernel"], "perturb": ["_sam_perturb_kernel"],
                "restore": ["_sam_restore_kernel"], "lookahead": ["_lookahead_kernel"],
                "momentum": ["_muon_momentum_kernel"], "apply": ["_muon_apply_kernel"]}
    for name, run in _run_all(params, _randn_like(params, gen)):
        run()
        assert counter.take() == expected[name], name
    strided = [*params[:5], torch.randn(6, 7, generator=gen).t()]
    for name, run in _run_all(strided, _randn_like(strided, gen)):
        run()
        assert counter.take() == expected[name] * 2, name
    # SAM's perturbation is compiled without fp fusion (see fused_optim/kernels/sam.py)
    fk._triton_sam_perturb(params, params, _clone(params), scale=torch.tensor(0.1), adaptive=True)
    assert counter.launches[0][1]["enable_fp_fusion"] is False


def test_tables_stay_cached_with_fresh_per_call_buffers():
    """SAM's old_params, grads and Muon's update buffers are new tensors every step: they go in the
    per-call table, so the cached table of the static lists is reused; Muon's scales are cached too."""
    multi_tensor.clear_cache()
    gen = torch.Generator().manual_seed(13)
    params = _shapes_like("cpu", torch.float32, gen, strided=False)
    bufs = _randn_like(params, gen)
    for _ in range(3):
        grads = _randn_like(params, gen)
        fk._triton_sam_norms(params, grads, adaptive=False)
        olds = [torch.empty_like(p) for p in params]
        fk._triton_sam_perturb(params, grads, olds, scale=torch.tensor(0.1), adaptive=False)
        fk._triton_sam_restore(params, olds)
        fk._triton_muon_momentum(grads, bufs, [torch.empty(p.shape, dtype=torch.bfloat16) for p in params],
                                 momentum=0.9, nesterov=True, maximize=False)
        fk._triton_muon_apply(params, [torch.randn(p.shape).bfloat16() for p in params],
                              scales=[2.0] * len(params), lr=0.1, weight_decay=0.0)
    # norms (params; grads), perturb (params; grads, olds), restore (params; olds, its own tag so that it
    # does not re-point the grads' table), momentum (buffers; grads, updates), apply (params; updates)
    assert len(multi_tensor._TABLES) == 5
    nonempty = tuple(g.data_ptr() for g in grads if g.numel())
    assert any(t.grad_key == nonempty for t in multi_tensor._TABLES.values())  # norms': still the grads
    assert len(multi_tensor._CONSTANTS) == 2  # the norms' output positions, the apply's scales


# ------------------------------------------------------------------------------------------ bad input
def _bad_calls(params):
    n = len(params)
    short = params[:-1]
    wrong = [torch.randn(p.numel() + 1) for p in params]
    bf = [torch.empty(p.shape, dtype=torch.bfloat16) for p in params]
    s = torch.tensor(0.1)
    return [
        lambda: fk._triton_lookahead_sync(params, _clone(short), alpha=0.5),
        lambda: fk._triton_lookahead_sync(params, wrong, alpha=0.5),
        lambda: fk._triton_sam_norms(params, short, adaptive=True),
        lambda: fk._triton_sam_norms(params, wrong, adaptive=False),
        lambda: fk._triton_sam_perturb(params, _clone(params), short, scale=s, adaptive=False),
        lambda: fk._triton_sam_perturb(params, wrong, _clone(params), scale=s, adaptive=False),
        lambda: fk._triton_sam_perturb(params, _clone(params), bf, scale=s, adaptive=False),
        lambda: fk._triton_sam_restore(params, short),
        lambda: fk._triton_sam_restore(params, wrong),
        lambda: fk._triton_sam_restore(params, bf),
        lambda: fk._triton_muon_momentum(params, _clone(params), bf[:-1], momentum=0.9, nesterov=True,
                                         maximize=False),
        lambda: fk._triton_muon_momentum(params, wrong, bf, momentum=0.9, nesterov=True, maximize=False),
        lambda: fk._triton_muon_apply(params, bf, scales=[1.0] * (n - 1), lr=0.1, weight_decay=0.0),
        lambda: fk._triton_muon_apply(params, bf[:-1], scales=[1.0] * n, lr=0.1, weight_decay=0.0),
        lambda: fk._triton_muon_apply(params, [torch.empty(p.numel() + 2, dtype=torch.bfloat16)
                                               for p in params], scales=[1.0] * n, lr=0.1, weight_decay=0.0),
    ]


def test_bad_input_raises_before_writing():
    gen = torch.Generator().manual_seed(14)
    params = [torch.randn(n, generator=gen) for n in (5, 2049, 3)]
    before = _clone(params)
    for i, call in enumerate(_bad_calls(params)):
        with pytest.raises(ValueError, match="Triton launcher"):
            call()
        _assert_all_ulp(params, before, 0, f"bad call {i} wrote")


# ------------------------------------------------------------------------------------------ compiled
def test_hyperparameters_are_runtime_arguments():
    """A new alpha / momentum / lr / scale never recompiles: none of them is a constexpr."""
    lk, sm, mu = kernel_module("lookahead"), kernel_module("sam"), kernel_module("muon")
    for kernel, names in ((lk._lookahead_kernel, ("alpha", "one_minus_alpha")),
                          (mu._muon_momentum_kernel, ("momentum", "one_minus_momentum")),
                          (mu._muon_apply_kernel, ("neg_lr", "decay", "scales_ptr")),
                          (sm._sam_perturb_kernel, ("scale_ptr",))):
        compiled = multi_tensor.kernel_for(kernel, torch.device("cuda"))  # a JITFunction in any flavour
        constexprs = {p.name for p in compiled.params if p.is_constexpr}
        assert not constexprs & set(names), kernel.fn.__name__


def test_kernels_compile_for_cuda_without_a_gpu():
    """Every new kernel lowers to PTX for sm_90; with 16-byte-aligned tensors the full-chunk path uses
    128-bit accesses, and SAM's perturbation compiled as launched (no fp fusion) has no fma."""
    from triton.backends import backends
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "nvidia" not in backends:
        pytest.skip("this triton install has no CUDA backend")
    lk, sm, mu = kernel_module("lookahead"), kernel_module("sam"), kernel_module("muon")
    types = {"meta_ptr": "*i64", "dyn_ptrs_ptr": "*i64", "chunks_ptr": "*i32", "partials_ptr": "*fp32",
             "pos_ptr": "*i32", "out_ptr": "*fp32", "scale_ptr": "*fp32", "scales_ptr": "*fp32",
             "tidx_ptr": "*i64", "seed": "i64", "rng_step": "i32", "rng_step_buf": "*fp32",
             **{n: "fp32" for n in ("alpha", "one_minus_alpha", "momentum", "one_minus_momentum", "neg_lr",
                                    "decay")}}
    cases = [
        (lk._lookahead_kernel, {"P_KIND": 2, "S_KIND": 0, "ROW": 6, "BLOCK": lk.BLOCK}, {}, True),
        (sm._sam_perturb_kernel, {"ADAPTIVE": True, "P_KIND": 0, "ROW": 5, "BLOCK": sm.BLOCK},
         {"enable_fp_fusion": False}, True),
        (sm._sam_restore_kernel, {"P_KIND": 2, "ROW": 5, "BLOCK": sm.BLOCK}, {}, True),
        (sm._sam_norms_finish_kernel, {"ROW": 5, "MAX_PARTS": 256}, {}, False),
        (mu._muon_momentum_kernel, {"NESTEROV": True, "MAXIMIZE": True, "S_KIND": 0, "G_KIND": 2, "U_KIND": 2,
                                    "ROW": 5, "BLOCK": mu.BLOCK}, {}, True),
        (mu._muon_apply_kernel, {"DECAY": True, "P_KIND": 0, "U_KIND": 2, "PARAM_SR": False,
                                 "RNG_STEP_ON_DEVICE": False, "ROW": 5, "BLOCK": mu.BLOCK}, {}, True),
    ]
    for kernel, consts, options, vector in cases:
        k = multi_tensor.kernel_for(kernel, torch.device("cuda"))
        if "ALIGNED" in k.arg_names:
            consts = {**consts, "ALIGNED": True}
        sig = {n: ("constexpr" if n in consts else types[n]) for n in k.arg_names}
        cs = {(k.arg_names.index(n),): v for n, v in consts.items()}
        ptx = triton.compile(ASTSource(k, sig, constexprs=cs), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 4, **options}).asm["ptx"]
        if vector:
            assert "ld.global.v4" in ptx and "st.global.v4" in ptx, kernel.fn.__name__
        if kernel is sm._sam_perturb_kernel:
            assert "fma.rn.f32" not in ptx


# ------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")
def test_no_host_sync_on_cuda():
    """torch.cuda.set_sync_debug_mode('error') raises on any synchronizing call inside the functions."""
    gen = torch.Generator().manual_seed(15)
    params = _shapes_like("cuda", torch.float32, gen)
    grads = [_randn_like(params, gen) for _ in range(3)]  # host-to-device copies: before the check
    for _, run in _run_all(params, grads[0]):  # compile, build and upload the tables first
        run()
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for step in (1, 2):  # fresh grads: the per-call table is refreshed
            for _, run in _run_all(params, grads[step]):
                run()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


_OUR_KERNELS = {"_partials_kernel", "_sam_norms_finish_kernel", "_sam_perturb_kernel", "_sam_restore_kernel",
                "_lookahead_kernel", "_muon_momentum_kernel", "_muon_apply_kernel"}


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")
def test_launches_per_call_on_cuda():
    """One launch per call (two for the norms) for 200 tensors; torch's own kernels the test's setup
    runs (clones, fills) are not counted."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(16)
    sizes = torch.randint(1, 5000, (200,), generator=gen)
    params = [torch.randn(int(n), generator=gen).cuda() for n in sizes]
    for name, run in _run_all(params, _randn_like(params, gen)):
        run()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        ours = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                and e.name.startswith(tuple(_OUR_KERNELS))]
        assert len(ours) == (2 if name == "norms" else 1), (name, ours)


def test_muon_lerp_weights_round_like_torch():
    """The kernels receive torch's scalars: Python doubles (1 - momentum computed in double) rounded once
    to fp32, and ``w - 1`` in fp32 (exact for w >= 0.5), as ATen's lerp; odd momenta included."""
    gen = torch.Generator().manual_seed(17)
    x, y = torch.randn(4099, generator=gen), torch.randn(4099, generator=gen)
    for m in (0.9, 0.123456789, 0.987654321, 0.55):
        b, r = x.clone(), x.clone()
        ups, ref_ups = [torch.empty(4099)], [torch.empty(4099)]
        fk._triton_muon_momentum([y], [b], ups, momentum=m, nesterov=True, maximize=False)
        _ref_muon_momentum([y], [r], ref_ups, momentum=m, nesterov=True, maximize=False)
        assert torch.equal(b, r) and torch.equal(ups[0], ref_ups[0]), m
