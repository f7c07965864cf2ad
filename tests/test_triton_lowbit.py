"""The Triton Lion, Adan and Gravity kernels with bf16 / 8-bit state and stochastically rounded bf16 params
(docs/lowbit.md §5), interpreted on the CPU.

The oracle is `fused_optim.lowstate.reference_step` over the *same* Triton fp32 kernel (the impl with
``supports_lowbit`` switched off): decode the state, run the kernel, encode back. The fused kernel does
that in its own pass, so params, codes, block scales and bf16 bits must be equal bit for bit (a
comparison with impl="forloop" would also see the fp32 rule's own ulp differences: torch's CPU
``add(alpha=)`` is a fused multiply-add).
"""
from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch

pytest.importorskip("triton")

import fused_optim as fo
from fused_optim.kernels import lowbit as klb
from fused_optim.kernels import multi_tensor
from fused_optim.kernels.lion import _triton_lion
from fused_optim.lowstate import Rounding

# 8-bit state from 4096 elements on (smaller tensors keep fp32 state, a second call); 257 and 5000 end in a
# partial quantization block and a partial update chunk; the (64, 80) param is a transposed view (strided)
SHAPES = [(5000,), (80, 64), (257,), (4096,), (1,)]
STRIDED = 1

OPTIMIZERS = {
    "lion": lambda ps, **kw: fo.Lion(ps, lr=1e-2, **kw),
    "adan": lambda ps, **kw: fo.Adan(ps, lr=1e-2, **kw),
    "gravity": lambda ps, **kw: fo.Gravity(ps, lr=1e-2, **kw),
}
#: the first state tensor of each (its storage dtype shows the format)
FIRST_STATE = {"lion": "exp_avg", "adan": "exp_avg", "gravity": "v"}
# the hyperparameters of the second variant of each test: decay, maximize (and Adan's prox form)
VARIANTS = {
    "lion": [{}, {"weight_decay": 0.1, "maximize": True}],
    "adan": [{}, {"weight_decay": 0.05, "maximize": True, "no_prox": True}],
    "gravity": [{}, {"maximize": True}],
}


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    """impl='triton' on CPU is available only under TRITON_INTERPRET=1 (`_backends.triton_status`)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_params(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(SHAPES):
        if i == STRIDED:
            p = torch.randn(shape[::-1], generator=gen).to(dtype).t()  # a leaf, not contiguous
        else:
            p = torch.randn(shape, generator=gen).to(dtype)
        out.append(p.requires_grad_())
    assert STRIDED >= len(out) or not out[STRIDED].is_contiguous()
    return out


def set_grads(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


class fused_off:
    """The reference path: the same Triton impl run through `lowstate.reference_step`."""

    def __init__(self, opt):
        self.fn = opt._impls["triton"]

    def __enter__(self):
        assert self.fn.supports_lowbit  # declared lowbit: else this test compares the reference with itself
        self.fn.supports_lowbit = False

    def __exit__(self, *exc):
        self.fn.supports_lowbit = True


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of `t` in row-major order: NaN == NaN, -0 != +0."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_same(opt_a, params_a, opt_b, params_b, what: str) -> None:
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert torch.equal(bits(a), bits(b)), f"{what}: param {i} differs"
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert sa.keys() == sb.keys(), what
        for key, v in sa.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == sb[key].dtype, (what, i, key)
                assert torch.equal(bits(v), bits(sb[key])), f"{what}: param {i} state {key!r} differs"
            else:
                assert v == sb[key], (what, i, key)


def run_steps(opt, params, *, fused: bool, steps: int = 3) -> None:
    """`steps` steps with fresh grads each, through the fused pass or the reference path."""
    ctx = fused_off(opt) if not fused else contextlib.nullcontext()
    for step in range(steps):
        set_grads(params, step)
        with ctx:
            opt.step()


def run(name: str, precision: str, sr: bool, dtype: torch.dtype, hyper: dict, *, fused: bool, steps: int = 3):
    params = make_params(dtype)
    torch.manual_seed(0)  # the optimizer's seed is drawn from torch's generator
    opt = OPTIMIZERS[name](params, impl="triton", state_precision=precision, stochastic_rounding=sr, **hyper)
    run_steps(opt, params, fused=fused, steps=steps)
    return opt, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "sr"])
@pytest.mark.parametrize("precision", ["bf16", "8bit"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_fused_pass_equals_reference_step(name, precision, sr, dtype):
    """Three steps of the fused kernel equal the reference path bit for bit: params (rounded
    stochastically when bf16 and asked), bf16 state bits, 8-bit codes and block scales, also for a
    strided param, a partial last block, and the tensors that keep fp32 state. Half the cases with
    weight decay and maximize."""
    hyper = VARIANTS[name][sr]
    a, pa = run(name, precision, sr, dtype, hyper, fused=True)
    b, pb = run(name, precision, sr, dtype, hyper, fused=False)
    key = FIRST_STATE[name]
    assert a.state[pa[0]][key].dtype == (torch.bfloat16 if precision == "bf16" else torch.uint8)
    assert a.state[pa[2]][key].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    assert_same(a, pa, b, pb, f"{name} {precision} sr={sr} {dtype} {hyper}")


# Muon's momentum buffer: 2-D and 3-D params (8-bit from 4096 elements), a transposed one, a small one
MUON_SHAPES = [(80, 64), (64, 80), (3, 50, 30), (16, 8), (33, 129)]


def muon_params(dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype) for s in MUON_SHAPES]
    params[1] = torch.randn(MUON_SHAPES[1][::-1], generator=gen).to(dtype).t()  # strided
    return [p.requires_grad_() for p in params]


def run_muon(precision: str, sr: bool, dtype: torch.dtype, hyper: dict, *, fused: bool, steps: int = 3):
    params = muon_params(dtype)
    torch.manual_seed(0)
    opt = fo.Muon(params, lr=0.02, impl="triton", state_precision=precision, stochastic_rounding=sr, **hyper)
    run_steps(opt, params, fused=fused, steps=steps)
    return opt, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "sr"])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "8bit"])
def test_muon_fused_pass_equals_reference_step(precision, sr, dtype):
    """Muon's momentum stage decodes, updates and encodes its bf16 / 8-bit buffer in the kernel's pass,
    and its apply stage rounds bf16 params stochastically: three steps equal the reference path over the
    same fp32 kernels bit for bit (Newton–Schulz in between is the same torch code on the same input).
    Half the cases with weight decay, maximize and without Nesterov."""
    if precision == "fp32" and not (sr and dtype != torch.float32):
        pytest.skip("nothing to round: the ordinary kernels run")
    hyper = {"weight_decay": 0.1, "maximize": True, "nesterov": False} if sr else {}
    a, pa = run_muon(precision, sr, dtype, hyper, fused=True)
    b, pb = run_muon(precision, sr, dtype, hyper, fused=False)
    want = {"fp32": torch.float32, "bf16": torch.bfloat16, "8bit": torch.uint8}[precision]
    assert a.state[pa[0]]["momentum_buffer"].dtype == want
    assert a.state[pa[3]]["momentum_buffer"].dtype == (torch.float32 if precision != "bf16" else want)
    assert_same(a, pa, b, pb, f"muon {precision} sr={sr} {dtype} {hyper}")
    assert any(not torch.equal(p, q) for p, q in zip(pa, muon_params(dtype)))  # the steps moved something


def test_muon_lowbit_launches(monkeypatch):
    """8-bit momentum and bf16 params rounded stochastically: the lowbit momentum kernel and the apply
    kernel, one launch each per step for contiguous params (the small param's fp32 state: the plain
    momentum kernel, a call of its own)."""
    seen = _record_launches(monkeypatch)
    params = [torch.randn(80, 64, dtype=torch.bfloat16).requires_grad_(),
              torch.randn(96, 64, dtype=torch.bfloat16).requires_grad_()]
    opt = fo.Muon(params, lr=0.02, impl="triton", state_precision="8bit", stochastic_rounding=True)
    set_grads(params, 0)
    opt.step()
    assert seen == ["_muon_momentum_lowbit_kernel", "_muon_apply_kernel"], seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "sr"])
@pytest.mark.parametrize("precision", ["bf16", "8bit"])
def test_neuro_optima_fused_pass_equals_reference_step(precision, sr, dtype):
    """NeuroOptima's core (SAM off, Lookahead every 2 steps) decodes and encodes its four moments in the
    kernel's pass: three steps equal the reference path over the same fp32 kernel bit for bit, also the
    Lookahead slow weights (a copy of the weights, in their dtype). Half the cases with coupled weight
    decay and maximize."""
    hyper = {"weight_decay": 0.05, "maximize": True} if sr else {}
    out = []
    for fused in (True, False):
        params = make_params(dtype)
        torch.manual_seed(0)
        opt = fo.NeuroOptima(params, lr=1e-2, sam_rho=0.0, lookahead_k=2, impl="triton", state_precision=precision,
                             stochastic_rounding=sr, **hyper)
        run_steps(opt, params, fused=fused)
        out.append((opt, params))
    (a, pa), (b, pb) = out
    assert a.state[pa[0]]["exp_avg"].dtype == (torch.bfloat16 if precision == "bf16" else torch.uint8)
    assert_same(a, pa, b, pb, f"neuro {precision} sr={sr} {dtype} {hyper}")


def test_adan_clip_equals_reference_step():
    """Adan's global clip factor (a device tensor the class computes) reaches the lowbit kernel too."""
    hyper = {"max_grad_norm": 1.0, "weight_decay": 0.02}
    a, pa = run("adan", "8bit", True, torch.bfloat16, hyper, fused=True)
    b, pb = run("adan", "8bit", True, torch.bfloat16, hyper, fused=False)
    assert_same(a, pa, b, pb, "adan clip")


@pytest.mark.parametrize("precision", ["bf16", "8bit"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_capturable_grad_scaler(name, precision):
    """capturable=True: the generator's step is read from the device counter, and AMP's unscale and skip
    happen in the kernel. Equal to the reference path (which unscales and skips on the host) at every
    step; the poisoned step leaves params, codes, scales and bf16 state untouched."""
    results = []
    for fused in (True, False):
        params = make_params(torch.bfloat16)
        torch.manual_seed(0)
        opt = OPTIMIZERS[name](params, impl="triton", state_precision=precision, stochastic_rounding=True,
                               capturable=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
        ctx = fused_off(opt) if not fused else contextlib.nullcontext()
        snapshots = []
        for step in range(4):
            gen = torch.Generator().manual_seed(7 + step)
            targets = [torch.randn(p.shape, generator=gen) for p in params]
            loss = sum((p.float() * t).sum() for p, t in zip(params, targets))
            if step == 2:
                loss = loss * float("inf")
            opt.zero_grad()
            scaler.scale(loss).backward()
            before = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in params]))
            with ctx:
                scaler.step(opt)
            scaler.update()
            if step == 2:
                sd, ps = before
                for p, q in zip(params, ps):
                    assert torch.equal(p.detach(), q), "a skipped step changed a param"
                for i, st in sd["state"].items():
                    for key, v in st.items():
                        now = opt.state_dict()["state"][i][key]
                        if isinstance(v, torch.Tensor):
                            assert torch.equal(now, v), f"a skipped step changed state {key!r} of param {i}"
            snapshots.append((copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]))
        assert isinstance(opt.param_groups[0]["lowbit_step"], torch.Tensor)
        results.append(snapshots)
    for step, ((sd_a, ps_a), (sd_b, ps_b)) in enumerate(zip(*results)):
        for i, (p, q) in enumerate(zip(ps_a, ps_b)):
            assert torch.equal(p, q), f"step {step}: param {i}"
        for i, st in sd_a["state"].items():
            for key, v in st.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, sd_b["state"][i][key]), f"step {step}: state {key!r} of param {i}"


@pytest.mark.parametrize("precision", ["bf16", "8bit"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_dict_round_trip_resumes_bit_exactly(name, precision):
    """Two steps, a checkpoint (through torch.save), then two more steps in a fresh optimizer equal four
    uninterrupted steps: the seed and the rounding counter travel in the param groups."""
    hyper = VARIANTS[name][1]
    full, p_full = run(name, precision, True, torch.bfloat16, hyper, fused=True, steps=4)
    half, p_half = run(name, precision, True, torch.bfloat16, hyper, fused=True, steps=2)
    buf = io.BytesIO()
    torch.save(half.state_dict(), buf)
    buf.seek(0)
    params = [p.detach().clone().requires_grad_() for p in p_half]
    resumed = OPTIMIZERS[name](params, impl="triton", state_precision=precision, stochastic_rounding=True, **hyper)
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    for step in (2, 3):
        set_grads(params, step)
        resumed.step()
    assert_same(full, p_full, resumed, params, f"{name} {precision} resumed")


def _record_launches(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = multi_tensor.kernel_for

    def spy(fn, device):
        seen.append(fn.fn.__name__ if hasattr(fn, "fn") else fn.__name__)
        return real(fn, device)

    monkeypatch.setattr(multi_tensor, "kernel_for", spy)
    return seen


def test_fp32_calls_launch_the_unchanged_kernel(monkeypatch):
    """stochastic_rounding=True with fp32 params and fp32 state has nothing to round: the call reaches
    the launcher with ``lowbit=`` but launches the ordinary fp32 kernel, with the bits of an optimizer
    without the option."""
    seen = _record_launches(monkeypatch)
    a, pa = run("lion", "fp32", True, torch.float32, {}, fused=True)
    assert seen and set(seen) == {"_lion_kernel"}, seen
    params = make_params(torch.float32)
    plain = fo.Lion(params, lr=1e-2, impl="triton")
    for step in range(3):
        set_grads(params, step)
        plain.step()
    for p, q in zip(pa, params):
        assert torch.equal(p, q)
        assert torch.equal(a.state[p]["exp_avg"], plain.state[q]["exp_avg"])


def test_one_lowbit_launch_per_call(monkeypatch):
    """bf16 state over contiguous params: one launch per step, of the lowbit kernel."""
    seen = _record_launches(monkeypatch)
    params = [torch.randn(n).requires_grad_() for n in (5000, 300, 1)]
    opt = fo.Adan(params, lr=1e-2, impl="triton", state_precision="bf16")
    for step in range(2):
        set_grads(params, step)
        opt.step()
    assert seen == ["_adan_lowbit_kernel"] * 2, seen


def test_neuro_optima_one_lowbit_launch_per_step(monkeypatch):
    """NeuroOptima's core with 8-bit moments over contiguous params: one launch of the lowbit kernel per
    step (the Lookahead sync, every 2 steps, is its own kernel)."""
    seen = _record_launches(monkeypatch)
    params = [torch.randn(n).requires_grad_() for n in (5000, 4096)]
    opt = fo.NeuroOptima(params, lr=1e-2, sam_rho=0.0, lookahead_k=2, impl="triton", state_precision="8bit")
    for step in range(2):
        set_grads(params, step)
        opt.step()
    assert [k for k in seen if k.startswith("_neuro")] == ["_neuro_optima_lowbit_kernel"] * 2, seen


def _rounding(fmt: str, absmax=((),)) -> Rounding:
    return Rounding(fmt=fmt, signed=(True,), absmax=tuple(list(a) for a in absmax), param_sr=False, seed=3,
                    step=1, tensor_index=[0])


def test_state_of_the_wrong_format_is_refused_before_any_write():
    """A launcher call whose state does not match ``lowbit.fmt`` raises, naming it, and writes nothing."""
    p, g, m = torch.randn(4096), torch.randn(4096), torch.randn(4096)
    before = (p.clone(), m.clone())
    with pytest.raises(TypeError, match="state list 0 entry 0 is torch.float32.*'8bit'"):
        _triton_lion([p], [g], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False,
                     lowbit=_rounding("8bit", ([torch.zeros(16)],)))
    codes = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(ValueError, match="need 16 fp32 block scales; got 15"):
        _triton_lion([p], [g], [codes], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0, maximize=False,
                     lowbit=_rounding("8bit", ([torch.zeros(15)],)))
    assert torch.equal(p, before[0]) and torch.equal(m, before[1]) and not codes.any()


def test_update_blocks_hold_whole_quantization_blocks():
    """The tile layout the kernels rely on: each update chunk is whole 256-element blocks."""
    from fused_optim.kernels import adan, lion
    from fused_optim.lowbit import QUANT_BLOCK

    assert lion.BLOCK % QUANT_BLOCK == 0 and adan.BLOCK % QUANT_BLOCK == 0
    with pytest.raises(ValueError, match="not a multiple of the quantization block"):
        list(klb.lowbit_launches([torch.zeros(8)], [torch.zeros(8)], [[torch.zeros(8)]], _rounding("bf16"), 1000))


def _compile_for_sm90(kernel, types: dict, consts: dict) -> str:
    """PTX of the compiled (not interpreted) kernel for an H100, built without a GPU (as tests/test_triton.py)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = multi_tensor.kernel_for(kernel, torch.device("cuda"))
    sig = {n: ("constexpr" if n in consts else types.get(n, "fp32")) for n in k.arg_names}
    consts = {(k.arg_names.index(n),): v for n, v in consts.items()}
    return triton.compile(ASTSource(k, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": 4}).asm["ptx"]


@pytest.mark.parametrize("fmt", [klb.FMT_BF16, klb.FMT_8BIT], ids=["bf16", "8bit"])
def test_lowbit_kernels_compile_for_cuda_without_a_gpu(fmt):
    """The compiled path lowers to PTX for sm_90 (no GPU ran it: the interpreter tests above are the
    bit-exactness check), with a device step, AMP and a rounded bf16 param."""
    from triton.backends import backends

    from fused_optim.kernels import adan, gravity, lion

    if "nvidia" not in backends:
        pytest.skip("this triton install has no CUDA backend")
    types = {n: "*i64" for n in ("meta_ptr", "grad_ptrs_ptr", "aux_ptr")}
    types.update({"chunks_ptr": "*i32", "seed": "i64", "rng_step": "i32"})
    for n in ("partials_ptr", "grad_scale_ptr", "found_inf_ptr", "rng_step_buf", "lr_ptr", "beta_hat_ptr",
              "clip_ptr", "bias_correction1_ptr", "bias_correction2_ptr", "bias_correction3_sqrt_ptr",
              "first_step_ptr", *(f"{x}{j}_ptr" for x in ("mag", "thr") for j in range(4))):
        types[n] = "*fp32"
    common = dict(FMT=fmt, PARAM_SR=True, RNG_STEP_ON_DEVICE=True, P_KIND=2, S_KIND=0, ALIGNED=True, QB=256,
                  HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, MAXIMIZE=True, LR_TENSOR=True)
    cases = [
        (lion._lion_lowbit_kernel, dict(DECAY=True, SIGNED0=True, ROW=6, BLOCK=lion.BLOCK)),
        (gravity._gravity_lowbit_kernel, dict(SIGNED0=True, ROW=6, BLOCK=gravity.BLOCK, MAX_PARTS=256,
                                              BETA_HAT_TENSOR=True)),
        (adan._adan_lowbit_kernel, dict(NO_PROX=False, DECAY=True, CLIP=True, CLIP_TENSOR=True, ROW=9,
                                        BLOCK=adan.BLOCK, BIAS_CORRECTION1_TENSOR=True, BIAS_CORRECTION2_TENSOR=True,
                                        BIAS_CORRECTION3_SQRT_TENSOR=True, FIRST_STEP=True, FIRST_STEP_TENSOR=True,
                                        SIGNED0=True, SIGNED1=False, SIGNED2=True, SIGNED3=True)),
    ]
    # a host step of 1 reaches a compiled kernel as a constexpr (triton specializes the int 1)
    cases.append((lion._lion_lowbit_kernel, dict(cases[0][1], RNG_STEP_ON_DEVICE=False, rng_step=1)))
    for kernel, consts in cases:
        ptx = _compile_for_sm90(kernel, types, {**common, **consts})
        assert "mul.hi.u32" in ptx, kernel.fn.__name__  # the Philox rounds (stochastic rounding of the param)
    # NeuroOptima's core (no AMP, no device scalars: the composite runs it with host scalars)
    from fused_optim.kernels import muon, neuro_optima

    neuro = dict(FMT=fmt, PARAM_SR=True, RNG_STEP_ON_DEVICE=True, P_KIND=2, S_KIND=0, ALIGNED=True, QB=256,
                 MAXIMIZE=True, DECAY=True, SIGNED0=True, SIGNED1=False, SIGNED2=True, SIGNED3=True, ROW=9,
                 BLOCK=neuro_optima.BLOCK)
    assert "mul.hi.u32" in _compile_for_sm90(neuro_optima._neuro_optima_lowbit_kernel, types, neuro)
    # Muon: the momentum stage's buffer (the Philox rounds only for bf16 state) and the apply stage's param

    types.update({"dyn_ptrs_ptr": "*i64", "scales_ptr": "*fp32", "tidx_ptr": "*i64"})
    mom = dict(FMT=fmt, PARAM_SR=False, RNG_STEP_ON_DEVICE=True, G_KIND=0, P_KIND=2, S_KIND=0, ALIGNED=True,
               QB=256, NESTEROV=True, MAXIMIZE=True, SIGNED0=True, ROW=6, BLOCK=muon.BLOCK)
    ptx = _compile_for_sm90(muon._muon_momentum_lowbit_kernel, types, mom)
    assert ("mul.hi.u32" in ptx) == (fmt == klb.FMT_BF16)
    apply = dict(DECAY=True, P_KIND=2, U_KIND=2, PARAM_SR=True, RNG_STEP_ON_DEVICE=True, ALIGNED=True, ROW=5,
                 BLOCK=muon.BLOCK)
    assert "mul.hi.u32" in _compile_for_sm90(muon._muon_apply_kernel, types, apply)
