"""The Triton impls against the forloop reference (docs/spec.md §9), on CPU through the interpreter and, marked
``gpu``, compiled on CUDA.

CPU tensors always run the interpreted copy of the kernels (`fused_optim.kernels.multi_tensor.kernel_for`),
so nothing here sets TRITON_INTERPRET for the whole session; the class-level tests set it with
monkeypatch only because `available_impls` requires it for impl="triton" on CPU.

Tolerance (fp32): after step k, ``|triton - forloop| <= 4·k·eps·(|ref| + mean|ref|)`` per element, on
params and every state tensor — 4 ulp per element per step, measured against the tensor's scale so that
elements that are a cancellation of larger terms (moments near 0) are judged by their operands' ulp.
Where the kernel's op order equals torch's and no fused multiply-add is involved, results are exact.
"""
from __future__ import annotations

import math

import pytest
import torch

triton = pytest.importorskip("triton")

import fused_optim as fo
from fused_optim.adan import _forloop_adan
from fused_optim.equilibrium import _forloop_gradient_equilibrium
from fused_optim.gravity import _forloop_gravity
from fused_optim.kernels import multi_tensor
from fused_optim.kernels.adan import _triton_adan
from fused_optim.kernels.equilibrium import _triton_gradient_equilibrium
from fused_optim.kernels.gravity import _triton_gravity
from fused_optim.kernels.lion import _triton_lion
from fused_optim.lion import _forloop_lion
from reductions import per_tensor_reduce

_HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                             pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")])]
STEPS = 7
MISSING_STEP = 3  # one tensor has no grad on this step
GUARD = 64        # NaN guard band around every tensor: unwritten / out-of-bounds writes show
# sizes around the update blocks (1024 for Adan, 2048 for the rest) and the reduction block, odd ones,
# 0 and 1; the last entry is a non-contiguous view
SIZES = [0, 1, 2, 7, 31, 1023, 1024, 1025, 2047, 2048, 2049, 4099]
EPS32 = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------ fixtures
class Buffers:
    """Tensors carved from storages filled with a finite sentinel, so every write outside a tensor shows
    (a NaN sentinel would not: an update that reads NaN writes NaN back)."""

    SENTINEL = 12345.0

    def __init__(self, device):
        self.device = device
        self.storages: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (storage, mask, snapshot)

    def _register(self, base, mask):
        self.storages.append((base, mask, base.clone()))

    def make(self, values: torch.Tensor) -> torch.Tensor:
        n = values.numel()
        base = torch.full((n + 2 * GUARD,), self.SENTINEL, dtype=values.dtype, device=self.device)
        mask = torch.zeros(n + 2 * GUARD, dtype=torch.bool, device=self.device)
        mask[GUARD:GUARD + n] = True
        t = base[GUARD:GUARD + n].view(values.shape)
        t.copy_(values)
        self._register(base, mask)
        return t

    def make_strided(self, values: torch.Tensor) -> torch.Tensor:
        """A (rows, cols) non-contiguous view: every other column of a sentinel-filled storage."""
        rows, cols = values.shape
        base = torch.full((rows, 2 * cols), self.SENTINEL, dtype=values.dtype, device=self.device)
        mask = torch.zeros(rows, 2 * cols, dtype=torch.bool, device=self.device)
        mask[:, ::2] = True
        t = base[:, ::2]
        t.copy_(values)
        self._register(base, mask)
        return t

    def check_guards(self):
        for base, mask, snapshot in self.storages:
            assert torch.equal(base[~mask], snapshot[~mask]), "a kernel wrote outside its tensor"


def _make_group(device, dtype, buffers: Buffers, sizes=SIZES, strided=True, gen=None):
    shapes = [(n,) for n in sizes]
    tensors = [buffers.make(torch.randn(s, generator=gen).to(dtype).to(device)) for s in shapes]
    if strided:
        tensors.append(buffers.make_strided(torch.randn(5, 13, generator=gen).to(dtype).to(device)))
    return tensors


def _assert_close_steps(actual, expected, step, what, ulps=4):
    """|a - e| <= ulps·step·eps·(|e| + mean|e|): docs/spec.md §9's per-step ulp budget at the tensor's scale."""
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e.numel() == 0:
            continue
        a, e = a.double(), e.double()
        scale = e.abs() + e.abs().mean()
        bad = (a - e).abs() > ulps * step * EPS32 * scale
        assert not bad.any(), (f"{what}[{i}] (numel {e.numel()}) step {step}: {int(bad.sum())} elements off, "
                               f"max |diff| {(a - e).abs().max().item():.3e}")


def _spec(name):
    """(triton fn, forloop fn, number of state lists, state init, per-step scalars)"""
    if name == "lion":
        return _triton_lion, _forloop_lion, 1
    if name == "gravity":
        return _triton_gravity, _forloop_gravity, 1
    if name == "adan":
        return _triton_adan, _forloop_adan, 4
    return _triton_gradient_equilibrium, _forloop_gradient_equilibrium, 0


def _scalars(name, opts, step):
    if name == "lion":
        return dict(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=opts.get("wd", 0.0),
                    maximize=opts["maximize"])
    if name == "gravity":
        beta = 0.9
        return dict(lr=0.05, beta_hat=(beta * step + 1) / (step + 2), maximize=opts["maximize"])
    if name == "adan":
        b1, b2, b3 = 0.98, 0.92, 0.99
        return dict(lr=0.01, beta1=b1, beta2=b2, beta3=b3, bias_correction1=1 - b1 ** step,
                    bias_correction2=1 - b2 ** step, bias_correction3_sqrt=math.sqrt(1 - b3 ** step),
                    eps=1e-8,
                    weight_decay=opts.get("wd", 0.0), no_prox=opts.get("no_prox", False),
                    maximize=opts["maximize"])
    return dict(lr=0.05, weight_decay=opts.get("wd", 0.0), maximize=opts["maximize"])


def _run_pair(name, opts, device, sizes=SIZES, steps=STEPS, strided=True, check_every_step=True):
    """Run the triton impl on guarded tensors and forloop on copies for `steps` steps; compare."""
    tri_fn, ref_fn, _ = _spec(name)
    gen = torch.Generator().manual_seed(1234)
    buf = Buffers(device)
    params = _make_group(device, torch.float32, buf, sizes, strided, gen)
    ref_params = [p.clone() for p in params]
    states = []
    if name == "gravity" or name == "lion":
        init = [torch.randn(p.shape, generator=gen).to(device) * 0.1 for p in params]
        states = [[buf.make(x) if p.is_contiguous() else buf.make_strided(x) for p, x in zip(params, init)]]
    elif name == "adan":
        # moments start at zero, like the class; neg_pre_grad is set from the first grad below
        states = [[buf.make(torch.zeros(p.shape, device=device)) for p in params] for _ in range(3)]
        states.append([buf.make(torch.zeros(p.shape, device=device)) for p in params])
    ref_states = [[s.clone() for s in lst] for lst in states]
    clip_value = opts.get("clip")
    for step in range(1, steps + 1):
        grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
        idx = [i for i in range(len(params)) if not (step == MISSING_STEP and i == 3)]
        kw = _scalars(name, opts, step)
        if name == "adan":
            clip = 1.0 if clip_value is None else clip_value
            if step == 1:  # the class's first-step init: neg_pre_grad = -clip*g (of the maximized g)
                for lst in (states[3], ref_states[3]):
                    for s, g in zip(lst, grads):
                        s.copy_((g if opts["maximize"] else -g) * clip)
            tri_clip = torch.tensor(clip, device=device) if clip_value is not None else 1.0
            tri_fn([params[i] for i in idx], [grads[i] for i in idx],
                   *[[lst[i] for i in idx] for lst in states], clip=tri_clip, **kw)
            ref_fn([ref_params[i] for i in idx], [grads[i] for i in idx],
                   *[[lst[i] for i in idx] for lst in ref_states], clip=clip, **kw)
        else:
            tri_fn([params[i] for i in idx], [grads[i] for i in idx],
                   *[[lst[i] for i in idx] for lst in states], **kw)
            ref_fn([ref_params[i] for i in idx], [grads[i] for i in idx],
                   *[[lst[i] for i in idx] for lst in ref_states], **kw)
        if check_every_step or step == steps:
            _assert_close_steps(params, ref_params, step, "param")
            for k, (lst, ref_lst) in enumerate(zip(states, ref_states)):
                _assert_close_steps(lst, ref_lst, step, f"state{k}")
    buf.check_guards()
    return params, ref_params


# ------------------------------------------------------------------------------------------ fp32 vs forloop
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [dict(maximize=False), dict(maximize=True, wd=0.1)], ids=["plain", "max-wd"])
def test_lion_matches_forloop(device, opts):
    _run_pair("lion", opts, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [dict(maximize=False), dict(maximize=True)], ids=["plain", "maximize"])
def test_gravity_matches_forloop(device, opts):
    _run_pair("gravity", opts, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [dict(maximize=False), dict(maximize=True, wd=0.1)], ids=["plain", "max-wd"])
def test_gradient_equilibrium_matches_forloop(device, opts):
    _run_pair("ge", opts, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opts", [
    dict(maximize=False),
    dict(maximize=True, wd=0.05, clip=0.37),
    dict(maximize=False, wd=0.05, no_prox=True, clip=0.8),
], ids=["plain", "prox-clip-max", "noprox-clip"])
def test_adan_matches_forloop(device, opts):
    _run_pair("adan", opts, device)


def test_gravity_zero_grad_tensor_moves_without_nan():
    """All-zero grad: max|g| = 0, m = inf, zeta = 0 (docs/spec.md §1): v decays, p moves by -lr*beta_hat*v."""
    p, v, g = torch.randn(3000), torch.randn(3000), torch.zeros(3000)
    p_ref, v_ref = p.clone(), v.clone()
    _triton_gravity([p], [g], [v], lr=0.1, beta_hat=0.6, maximize=False)
    _forloop_gravity([p_ref], [g], [v_ref], lr=0.1, beta_hat=0.6, maximize=False)
    assert torch.isfinite(p).all() and torch.equal(v, v_ref) and torch.equal(p, p_ref)


def test_gravity_nan_grad_poisons_its_tensor_like_torch():
    """torch's max|g| is NaN when g holds a NaN, so the whole tensor becomes NaN; other tensors do not."""
    g = torch.randn(5000)
    g[4097] = float("nan")
    params = [torch.randn(5000), torch.randn(7)]
    grads = [g, torch.randn(7)]
    vs = [torch.randn(5000), torch.randn(7)]
    ref_p, ref_v = [p.clone() for p in params], [v.clone() for v in vs]
    _triton_gravity(params, grads, vs, lr=0.1, beta_hat=0.6, maximize=False)
    _forloop_gravity(ref_p, grads, ref_v, lr=0.1, beta_hat=0.6, maximize=False)
    assert params[0].isnan().all() and ref_p[0].isnan().all()
    assert torch.equal(params[1], ref_p[1])


def test_gravity_update_is_exact():
    """Gravity's kernel follows torch's op order with IEEE divisions and no contractible products on
    the interpreter: bit-identical to forloop."""
    params, ref = _run_pair("gravity", dict(maximize=False), "cpu", sizes=[5, 2049], steps=3, strided=False)
    for a, b in zip(params, ref):
        assert torch.equal(a, b)


def test_adan_neg_pre_grad_is_written_in_kernel():
    """After a step, neg_pre_grad holds -clip*g of that step, exactly (read back by the next step)."""
    n = 1500
    p, g = torch.randn(n), torch.randn(n)
    ea, es, ed = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    clip = torch.tensor(0.3)
    npg = -g * clip
    g2 = torch.randn(n)
    _triton_adan([p], [g2], [ea], [es], [ed], [npg], lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99,
                 bias_correction1=0.02, bias_correction2=0.08, bias_correction3_sqrt=0.1, eps=1e-8,
                 weight_decay=0.0, no_prox=False, clip=clip, maximize=False)
    assert torch.equal(npg, -(g2 * clip))


# ------------------------------------------------------------------------------------------ tables
def test_many_tensors_one_group_and_multi_slot_reductions(monkeypatch):
    """>= 200 tensors of mixed odd sizes in one launch (the tables and chunking), with reductions split
    into several slots per tensor (shrunk so that small tensors exercise it)."""
    monkeypatch.setattr(multi_tensor, "MAX_PARTS", 4)
    monkeypatch.setattr(multi_tensor, "RBLOCK", 64)
    gen = torch.Generator().manual_seed(7)
    sizes = [int(x) | 1 for x in torch.randint(1, 400, (200,), generator=gen)] + [0, 2049, 5001]
    for name in ("gravity", "ge", "lion"):
        _run_pair(name, dict(maximize=False), "cpu", sizes=sizes, steps=2, strided=False,
                  check_every_step=False)
    _run_pair("adan", dict(maximize=False, clip=0.5), "cpu", sizes=sizes, steps=2, strided=False,
              check_every_step=False)


def test_table_is_cached_and_grad_table_refreshed():
    multi_tensor.clear_cache()
    params = [torch.randn(n) for n in (3, 2500)]
    m = [torch.zeros_like(p) for p in params]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False)
    g1 = [torch.randn_like(p) for p in params]
    _triton_lion(params, g1, m, **kw)
    assert len(multi_tensor._TABLES) == 1
    table = next(iter(multi_tensor._TABLES.values()))
    # new grad tensors (zero_grad(set_to_none=True)): same table, grad addresses refreshed
    g2 = [torch.randn_like(p) for p in params]
    before = [p.clone() for p in params]
    _triton_lion(params, g2, m, **kw)
    assert len(multi_tensor._TABLES) == 1 and next(iter(multi_tensor._TABLES.values())) is table
    assert table.grad_key == tuple(g.data_ptr() for g in g2)
    ref = [b.clone() for b in before]
    m_ref = [torch.zeros_like(p) for p in params]
    _forloop_lion(ref, g1, m_ref, **kw)  # rebuild m's history: m after step 1 ...
    ref = [b.clone() for b in before]
    _forloop_lion(ref, g2, m_ref, **kw)  # ... then step 2 from the same params
    _assert_close_steps(params, ref, 2, "param")
    # a param that moved (p.data = ...) misses the cache instead of updating the old storage
    params[1].data = params[1].data.clone()
    _triton_lion(params, g2, m, **kw)
    assert len(multi_tensor._TABLES) == 2


def test_strided_params_do_not_evict_the_cached_table():
    """A strided param runs in its own launch over contiguous stand-ins, so the main table stays cached
    (a stand-in has a new address every step) and the strided one is written back."""
    multi_tensor.clear_cache()
    base = torch.randn(6, 20)
    params = [torch.randn(3000), base[:, ::2], torch.randn(5)]
    m = [torch.zeros(3000), torch.zeros(6, 10), torch.zeros(5)]
    ref_p, ref_m = [p.clone() for p in params], [x.clone() for x in m]
    kw = dict(lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False)
    for step in (1, 2):
        grads = [torch.randn_like(p) for p in params]
        _triton_lion(params, grads, m, **kw)
        _forloop_lion(ref_p, grads, ref_m, **kw)
        assert len(multi_tensor._TABLES) == 1
        _assert_close_steps(params, ref_p, step, "param")
    single = multi_tensor.prepare(params, grads, [m])
    assert len(single.static[0]) == 3 and len(single.writeback) == 1 and not single.cacheable


def test_int64_offsets_in_chunk_math():
    """The chunk table holds chunk indices, offsets are int64 products: no int32 overflow for >2^31."""
    t = multi_tensor.Table([[torch.empty(5000)]], 2048, torch.device("cpu"))
    assert t.meta.dtype == torch.int64 and t.n_chunks == 3
    assert t.chunks.tolist() == [[0, 0], [0, 1], [0, 2]]


def _compile_for_sm90(kernel, types: dict, consts: dict, num_warps: int = 4) -> str:
    """PTX of the compiled (not interpreted) kernel for an H100, built without a GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = multi_tensor.kernel_for(kernel, torch.device("cuda"))
    sig = {n: ("constexpr" if n in consts else types[n]) for n in k.arg_names}
    consts = {(k.arg_names.index(n),): v for n, v in consts.items()}  # index keys: every triton 3.x
    return triton.compile(ASTSource(k, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps}).asm["ptx"]


def test_kernels_compile_for_cuda_without_a_gpu():
    """The compiled path is checked on the CPU machine too: every kernel lowers to PTX for sm_90, and with
    16-byte-aligned tensors the full-chunk path uses 128-bit accesses (ld/st.global.v4)."""
    from fused_optim.kernels import adan, equilibrium, gravity, lion, reduce

    ptrs = {"meta_ptr": "*i64", "grad_ptrs_ptr": "*i64", "chunks_ptr": "*i32", "partials_ptr": "*fp32",
            "rchunks_ptr": "*i32", "clip_ptr": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
            "lr_ptr": "*fp32", "beta_hat_ptr": "*fp32", "bias_correction1_ptr": "*fp32",
            "bias_correction2_ptr": "*fp32", "bias_correction3_sqrt_ptr": "*fp32", "first_step_ptr": "*fp32"}

    def fp32(*names):
        return {n: "fp32" for n in names}

    cases = [
        (lion._lion_kernel, fp32("lr", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2",
                                 "weight_decay"),
         dict(MAXIMIZE=False, DECAY=True, P_KIND=2, S_KIND=0, ROW=6, BLOCK=lion.BLOCK), 4),
        (gravity._gravity_kernel, fp32("lr", "beta_hat", "one_minus_beta_hat"),
         dict(MAXIMIZE=True, P_KIND=0, S_KIND=0, ROW=6, BLOCK=gravity.BLOCK, MAX_PARTS=256,
              BETA_HAT_TENSOR=False), 4),
        (equilibrium._gradient_equilibrium_kernel, fp32("lr", "weight_decay"),
         dict(MAXIMIZE=True, DECAY=True, P_KIND=0, ROW=5, BLOCK=equilibrium.BLOCK, MAX_PARTS=256), 4),
        (adan._adan_kernel, fp32("clip", "first_step", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta3",
                                 "one_minus_beta3", "bias_correction3_sqrt", "eps", "neg_step_size",
                                 "neg_step_size_diff", "decay", "bias_correction1", "bias_correction2",
                                 "weight_decay", "lr"),
         dict(MAXIMIZE=False, NO_PROX=False, DECAY=True, CLIP=True, CLIP_TENSOR=True, P_KIND=0, S_KIND=0, ROW=9,
              BLOCK=adan.BLOCK, BIAS_CORRECTION1_TENSOR=False, BIAS_CORRECTION2_TENSOR=False,
              BIAS_CORRECTION3_SQRT_TENSOR=False, FIRST_STEP=False, FIRST_STEP_TENSOR=False), 4),
        (reduce._partials_kernel, fp32("coeff"),
         dict(OP=1, NEGATE=True, ADD_PARAM=True, P_KIND=0, ROW=5, RBLOCK=2048), 8),
    ]
    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this triton install has no CUDA backend")
    for kernel, scalars, consts, warps in cases:
        # the AMP and tensor-lr variants: tests/test_triton_amp.py
        amp_off = dict(HAS_GRAD_SCALE=False, HAS_FOUND_INF=False)
        if kernel is not reduce._partials_kernel:
            amp_off["LR_TENSOR"] = False
        ptx = _compile_for_sm90(kernel, {**ptrs, **scalars}, {**amp_off, **consts, "ALIGNED": True}, warps)
        assert "ld.global.v4" in ptx, kernel.fn.__name__
        if kernel is not reduce._partials_kernel:
            assert "st.global.v4" in ptx, kernel.fn.__name__
        if kernel is adan._adan_kernel:
            # g·clip rounded on its own (`_mul_rn`): contracted into d's fma, a param's first difference
            # was the product's rounding error instead of 0 (docs/spec.md §3)
            assert "mul.rn.f32" in ptx


# ------------------------------------------------------------------------------------------ low precision
def _lowp_run(name, dtype, device, steps=STEPS):
    """docs/spec.md §9: |triton(lowp, fp32 state) - forloop(fp64)| <= 2·|forloop(lowp) - forloop(fp64)| + atol."""
    tri_fn, ref_fn, _ = _spec(name)
    gen = torch.Generator().manual_seed(99)
    sizes = [1, 7, 1025, 2049]
    p0 = [torch.randn(n, generator=gen).to(dtype).to(device) for n in sizes]
    runs = {"tri": (dtype, torch.float32), "lowp": (dtype, dtype), "f64": (torch.float64, torch.float64)}
    P = {k: [p.to(pd).clone() for p in p0] for k, (pd, _) in runs.items()}
    if name == "gravity":
        s0 = [[torch.randn(n, generator=gen).to(device) * 0.1 for n in sizes]]
    elif name == "lion":
        s0 = [[torch.zeros(n, device=device) for n in sizes]]
    elif name == "adan":
        s0 = [[torch.zeros(n, device=device) for n in sizes] for _ in range(4)]
    else:
        s0 = []
    S = {k: [[s.to(sd).clone() for s in lst] for lst in s0] for k, (_, sd) in runs.items()}
    for step in range(1, steps + 1):
        g0 = [torch.randn(n, generator=gen).to(dtype).to(device) for n in sizes]
        kw = _scalars(name, dict(maximize=False, wd=0.05), step)
        for k, (pd, sd) in runs.items():
            fn = tri_fn if k == "tri" else ref_fn
            grads = [g.to(pd) for g in g0]
            extra = {}
            if name == "adan":
                extra["clip"] = 1.0
                if step == 1:
                    for s, g in zip(S[k][3], grads):
                        s.copy_(-g.to(sd))
            fn(P[k], grads, *S[k], **kw, **extra)
    # over all elements of the group at once: a max over one element is a coin toss between roundings
    tri, lowp, f64 = (torch.cat([t.double().flatten() for t in P[k]]) for k in ("tri", "lowp", "f64"))
    atol = torch.finfo(dtype).eps * f64.abs().max().item()  # one ulp of the dtype at the group's scale
    err = (tri - f64).abs().max().item()
    err_lp = (lowp - f64).abs().max().item()
    if not math.isfinite(err_lp):
        # forloop itself breaks in this dtype (fp16 Adan: eps=1e-8 and small exp_avg_sq flush to 0,
        # 0/0); fp32 state must not: bound by one rounding of p per step
        err_lp = steps * atol
    assert err <= 2 * err_lp + atol, (name, dtype, err, err_lp)
    for lst in S["tri"]:
        assert all(s.dtype == torch.float32 for s in lst)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["lion", "gravity", "adan", "ge"])
def test_low_precision_params_fp32_state(name, dtype, device):
    _lowp_run(name, dtype, device)


def test_bf16_store_rounds_to_nearest_even():
    """The interpreter's fp32->bf16 cast truncates; the kernels round with integer ops instead, so a bf16
    Lion step equals torch's fp32 maths rounded once to bf16 (round to nearest even), bit for bit."""
    gen = torch.Generator().manual_seed(5)
    n = 4099
    p = torch.randn(n, generator=gen).to(torch.bfloat16)
    g = torch.randn(n, generator=gen).to(torch.bfloat16)
    m = torch.randn(n, generator=gen)
    lr, wd, b1 = 3e-3, 0.37, 0.9
    c = m * b1 + g.float() * (1 - b1)
    expected = (p.float() * (1 - lr * wd) - lr * torch.sign(c)).to(torch.bfloat16)
    exact = p.float() * (1 - lr * wd) - lr * torch.sign(c)
    truncated = (exact.view(torch.int32) >> 16 << 16).view(torch.float32)
    assert not torch.equal(truncated.to(torch.bfloat16), expected)  # the data can tell the two apart
    _triton_lion([p], [g], [m], lr=lr, beta1=b1, beta2=0.99, weight_decay=wd, maximize=False)
    assert torch.equal(p, expected)


# ------------------------------------------------------------------------------------------ classes
@pytest.fixture
def interpret(monkeypatch):
    """impl='triton' on CPU is available only under TRITON_INTERPRET=1 (`_backends.triton_status`)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _class_case(name):
    if name == "lion":
        return fo.Lion, dict(lr=1e-2, weight_decay=0.1)
    if name == "gravity":
        return fo.Gravity, dict(lr=0.1)
    if name == "adan":
        return fo.Adan, dict(lr=1e-2, weight_decay=0.02, max_grad_norm=1.0)
    return fo.GradientEquilibrium, dict(lr=0.05, weight_decay=0.01)


def _class_pair(name, dtype, device):
    cls, kw = _class_case(name)
    torch.manual_seed(0)  # Gravity draws v at construction from the global RNG: same draws for both
    shapes = [(3, 5), (0,), (1,), (2049,), (17, 3)]
    base = [torch.randn(s, device=device).to(dtype) for s in shapes]
    pt = [torch.nn.Parameter(b.clone()) for b in base]
    pr = [torch.nn.Parameter(b.clone()) for b in base]
    torch.manual_seed(1)
    opt_t = cls(pt, impl="triton", **kw)
    torch.manual_seed(1)
    opt_r = cls(pr, impl="forloop", **kw)
    return opt_t, opt_r, pt, pr


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["lion", "gravity", "adan", "ge"])
def test_class_impl_triton_matches_forloop(name, device, interpret):
    opt_t, opt_r, pt, pr = _class_pair(name, torch.float32, device)
    gen = torch.Generator().manual_seed(3)
    for step in range(1, STEPS + 1):
        for i, (a, b) in enumerate(zip(pt, pr)):
            if step == MISSING_STEP and i == 0:
                a.grad = b.grad = None
                continue
            g = torch.randn(a.shape, generator=gen).to(device)
            a.grad, b.grad = g.clone(), g.clone()  # fresh grad storages every step: the grad table moves
        opt_t.step()
        opt_r.step()
        _assert_close_steps([p.detach() for p in pt], [p.detach() for p in pr], step, "param")
        for a, b in zip(pt, pr):
            for key, s in opt_r.state[b].items():
                if isinstance(s, torch.Tensor) and s.dim() > 0:
                    _assert_close_steps([opt_t.state[a][key]], [s], step, key)
    assert opt_t.impl_for(device) == "triton"


@pytest.mark.parametrize("name", ["lion", "adan"])
def test_class_bf16_keeps_fp32_state(name, interpret):
    opt_t, _, pt, _ = _class_pair(name, torch.bfloat16, "cpu")
    for p in pt:
        p.grad = torch.randn_like(p)
    opt_t.step()
    for p in pt:
        for key, s in opt_t.state[p].items():
            if isinstance(s, torch.Tensor) and s.dim() > 0:
                assert s.dtype == torch.float32, key
        assert p.dtype == torch.bfloat16 and torch.isfinite(p.float()).all()


def test_auto_never_picks_interpreted_triton(interpret):
    assert fo.Lion([torch.nn.Parameter(torch.randn(3))]).impl_for("cpu") != "triton"


# ------------------------------------------------------------------------------------------ reductions API
@pytest.mark.parametrize("op", ["absmax", "sum", "sumsq"])
def test_per_tensor_reduce(op):
    ts = [torch.randn(5), torch.empty(0), torch.randn(3, 4).to(torch.bfloat16), torch.randn(1)]
    out = per_tensor_reduce(ts, op)
    ref = {"absmax": lambda t: t.float().abs().max() if t.numel() else torch.tensor(0.0),
           "sum": lambda t: t.float().sum(), "sumsq": lambda t: t.float().square().sum()}[op]
    assert out.dtype == torch.float32 and out.shape == (4,)
    torch.testing.assert_close(out, torch.stack([ref(t) for t in ts]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="Invalid op"):
        per_tensor_reduce(ts, "mean")


# ------------------------------------------------------------------------------------------ GPU only
def _gpu_optimizers():
    out = []
    for name in ("lion", "gravity", "adan", "ge"):
        cls, kw = _class_case(name)
        shapes = [(257, 129), (3,), (4099,), (0,)]
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
        out.append((name, cls(params, impl="triton", **kw), params))
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")
def test_step_has_no_host_sync():
    """torch.cuda.set_sync_debug_mode('error') raises on any synchronizing call inside step()."""
    opts = _gpu_optimizers()
    for _, opt, params in opts:  # first step builds and uploads the tables (also sync-free, but compile)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for _, opt, params in opts:
            for _ in range(2):
                for p in params:
                    p.grad = torch.randn_like(p)  # new grad storages: the grad table is refreshed
                opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")
def test_launches_per_step():
    """1 launch for Lion and Adan (Adan's clip adds its own reduction kernels, from the class), 2 for
    Gravity and GradientEquilibrium: reduce, then update."""
    from torch.profiler import ProfilerActivity, profile

    expected = {"lion": 1, "gravity": 2, "ge": 2}
    for name, opt, params in _gpu_optimizers():
        if name == "adan":
            opt.defaults["max_grad_norm"] = 0.0  # the clip's own reduction is the class's, counted apart
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # compile and build tables outside the profile
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower()]
        assert len(kernels) == expected.get(name, 1), (name, [e.name for e in kernels])


# ------------------------------------------------------------------------------------------ launch helper
def test_launch_names_unknown_and_missing_kernel_arguments():
    """`multi_tensor.Launch` checks a kernel's arguments by name before launching: a misspelled one is
    named with the parameter it left out (the interpreter would drop it silently), and nothing runs."""
    from fused_optim.kernels import lion

    p, m = torch.randn(5), torch.zeros(5)
    before = p.clone()
    for launch in multi_tensor.update_launches([p], [torch.randn(5)], [[m]], lion.BLOCK):
        with pytest.raises(TypeError, match=r"unknown arguments \['beta_1'\], missing \['beta1'\]"):
            launch(lion._lion_kernel, lr=0.1, decay=1.0, weight_decay=0.0, beta_1=0.9, one_minus_beta1=0.1,
                   beta2=0.99, one_minus_beta2=0.01, MAXIMIZE=False, DECAY=False)
    assert torch.equal(p, before)



def test_launch_refuses_its_own_arguments_and_a_none_scalar():
    """The table, AMP and grid arguments are the launch's: a launcher passing one is told so (only the
    dtype codes may be overridden); a per-step scalar passed as None is named, not a float() error."""
    from fused_optim.kernels import lion

    p, m = torch.randn(5), torch.zeros(5)
    before = p.clone()
    kw = dict(lr=0.1, decay=1.0, weight_decay=0.0, beta1=0.9, one_minus_beta1=0.1, beta2=0.99,
              one_minus_beta2=0.01, MAXIMIZE=False, DECAY=False)
    for launch in multi_tensor.update_launches([p], [torch.randn(5)], [[m]], lion.BLOCK):
        with pytest.raises(TypeError, match=r"unknown arguments \['BLOCK', 'meta_ptr'\], missing \[\] "
                                            r"\(\['BLOCK', 'meta_ptr'\]: the launch's own"):
            launch(lion._lion_kernel, **kw, meta_ptr=m, BLOCK=4)
        with pytest.raises(TypeError, match=r"per-step scalar 'lr' is None"):
            launch(lion._lion_kernel, **{**kw, "lr": None})
    assert torch.equal(p, before)


def test_device_scalar_contract():
    """`fused_optim._scalars.device_scalar`: a number or a CPU tensor for accelerator params is a host
    value; a tensor a CPU kernel can read is passed on (0-d fp32), beside the never-read UNUSED value."""
    from fused_optim._scalars import UNUSED, device_scalar, host_scalar

    cpu = torch.device("cpu")
    assert device_scalar(0.25, cpu) == (0.25, None)
    value, t = device_scalar(torch.tensor([0.5], dtype=torch.float64), cpu)
    assert value == UNUSED and t.shape == () and t.dtype == torch.float32 and t.item() == 0.5
    assert device_scalar(torch.tensor(0.5), torch.device("cuda")) == (0.5, None)  # read on the host, no sync
    assert host_scalar(torch.tensor(0.5)) == 0.5 and host_scalar(2) == 2.0
