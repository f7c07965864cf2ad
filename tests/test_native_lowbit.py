"""The native lowbit ops (docs/lowbit.md §5): Lion, Adan, Gravity, NeuroOptima's core and Muon's two stages over
bf16 / 8-bit state and stochastically rounded bf16 params in one pass (CPU; CUDA under `-m gpu`, and emulated by
tests/test_cuda_emulated.py), against `fused_optim.lowstate.reference_step` over the *same* native fp32 op
(the impl's ``supports_lowbit`` switched off), bit for bit: params, bf16 state bits, 8-bit codes and block
scales, every step.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from fused_optim import Adan, Gravity, Lion, Muon, NeuroOptima, _native
from fused_optim._backends import impl_status
from fused_optim.muon import _native_muon



@pytest.fixture(autouse=True)
def _native_built():
    """Skip when the extension cannot be built, decided when a test runs: collecting builds nothing
    (tests/conftest.py)."""
    st = impl_status("native", "cpu")
    if not st.available:
        pytest.skip(f"native: {st.reason}")

# 8-bit needs 4096 elements: 5000, 64x80, 4096 and 4099 are 8-bit (4099: a last block of 3, below one
# vector register), 257 and 1 keep fp32 state (another call)
SHAPES = [(5000,), (64, 80), (257,), (4096,), (1,), (4099,)]

MAKERS = {
    "lion": lambda ps, **kw: Lion(ps, lr=3e-2, betas=(0.9, 0.99), impl="native", **kw),
    "lion_wd_max": lambda ps, **kw: Lion(ps, lr=3e-2, betas=(0.8, 0.95), weight_decay=0.3, maximize=True,
                                         impl="native", **kw),
    "adan": lambda ps, **kw: Adan(ps, lr=1e-2, impl="native", **kw),
    "adan_wd_max_clip": lambda ps, **kw: Adan(ps, lr=1e-2, weight_decay=0.02, maximize=True, max_grad_norm=0.5,
                                              impl="native", **kw),
    "adan_prox": lambda ps, **kw: Adan(ps, lr=1e-2, weight_decay=0.05, no_prox=True, impl="native", **kw),
    "gravity": lambda ps, **kw: Gravity(ps, lr=3e-2, impl="native", **kw),
    "gravity_max": lambda ps, **kw: Gravity(ps, lr=1e-2, alpha=0.05, beta=0.8, maximize=True, impl="native", **kw),
    # sam_rho=0: a step without a closure; a Lookahead sync every 2nd step (its slow weights stay fp32)
    "neuro": lambda ps, **kw: NeuroOptima(ps, lr=1e-2, sam_rho=0.0, lookahead_k=2, impl="native", **kw),
    "neuro_wd_max": lambda ps, **kw: NeuroOptima(ps, lr=1e-2, sam_rho=0.0, weight_decay=0.05, maximize=True,
                                                 impl="native", **kw),
}
FNS = {"lion": _native._native_lion, "adan": _native._native_adan, "gravity": _native._native_gravity,
       "neuro": _native._native_neuro_optima}
#: the op each family's fused pass calls
LOWBIT_OPS = {"lion": "lion_lowbit_", "adan": "adan_lowbit_", "gravity": "gravity_lowbit_",
              "neuro": "neuro_optima_lowbit_"}


@contextlib.contextmanager
def reference_path(name):
    """The dispatcher runs the same native fp32 op through `reference_step` (the oracle)."""
    fn = FNS[name.split("_")[0]]
    assert fn.supports_lowbit
    fn.supports_lowbit = False
    try:
        yield
    finally:
        fn.supports_lowbit = True


@contextlib.contextmanager
def ops_called():
    """The names of the native ops the launchers call meanwhile (through `_native._ops`)."""
    called: set[str] = set()
    real = _native._ops

    class Recording:
        def __getattr__(self, name):
            called.add(name)
            return getattr(real(), name)

    _native._ops = Recording
    try:
        yield called
    finally:
        _native._ops = real


def make_params(dtype, seed=0, shapes=SHAPES, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


def grads_for(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    return [(torch.randn(p.shape, generator=g) * (0.5 + step)).to(p.device, p.dtype) for p in params]


def bits(t):
    """Exact comparison form: integer views (so -0 != +0 and NaN payloads count)."""
    t = t.detach()
    return {torch.float32: lambda: t.view(torch.int32), torch.bfloat16: lambda: t.view(torch.int16),
            torch.float16: lambda: t.view(torch.int16)}.get(t.dtype, lambda: t)()


def snapshot(opt, params):
    out = [("param", i, bits(p).clone()) for i, p in enumerate(params)]
    for i, p in enumerate(params):
        for k, v in sorted(opt.state[p].items()):
            if isinstance(v, torch.Tensor):
                out.append((k, i, bits(v).clone()))
    return out


def assert_same(a, b, what):
    assert [x[:2] for x in a] == [x[:2] for x in b], what
    for (k, i, x), (_, _, y) in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y), f"{what}: {k} of param {i} differs"


def twins(name, dtype, device="cpu", **kw):
    pa = make_params(dtype, device=device)
    pb = [p.detach().clone().requires_grad_() for p in pa]
    torch.manual_seed(7)
    a = MAKERS[name](pa, **kw)
    torch.manual_seed(7)
    b = MAKERS[name](pb, **kw)
    return pa, a, pb, b


def run_steps(name, params, opt, steps, reference):
    ctx = reference_path(name) if reference else contextlib.nullcontext()
    with ctx:
        for step in steps:
            for p, g in zip(params, grads_for(params, step)):
                p.grad = g
            opt.step()


@pytest.mark.parametrize("precision,sr", [("bf16", False), ("bf16", True), ("8bit", False), ("8bit", True),
                                          ("fp32", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_lowbit_op_equals_reference_step(name, dtype, precision, sr):
    """4 steps: every param, bf16 state, 8-bit code and block scale equal the reference path's."""
    if precision == "fp32" and dtype == torch.float32:
        pytest.skip("fp32 state and fp32 params: nothing to round, the ordinary op runs")
    pa, a, pb, b = twins(name, dtype, state_precision=precision, stochastic_rounding=sr)
    for step in range(1, 5):
        with ops_called() as called:
            run_steps(name, pa, a, [step], reference=False)
        assert LOWBIT_OPS[name.split("_")[0]] in called  # the fused pass ran
        run_steps(name, pb, b, [step], reference=True)
        assert_same(snapshot(a, pa), snapshot(b, pb), f"{name} {precision} sr={sr} step {step}")
    if precision == "8bit":
        assert any(v.dtype == torch.uint8 for v in a.state[pa[0]].values())  # the 8-bit path did run
    if sr and dtype == torch.bfloat16:  # the rounding is stochastic: not all to nearest
        near = make_params(dtype)
        torch.manual_seed(7)
        c = MAKERS[name](near, state_precision=precision, stochastic_rounding=False)
        run_steps(name, near, c, range(1, 5), reference=False)
        assert any(not torch.equal(bits(x), bits(y)) for x, y in zip(pa, near))


@pytest.mark.gpu
@pytest.mark.parametrize("precision,sr", [("bf16", False), ("bf16", True), ("8bit", False), ("8bit", True),
                                          ("fp32", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(MAKERS))
def test_cuda_lowbit_op_equals_reference_step(name, dtype, precision, sr):
    """On a GPU: the CUDA lowbit op against `reference_step` over the CUDA fp32 op (the same per-element Op
    compiled into both kernels), 4 steps, bit for bit; AMP with the skip read on the device."""
    if precision == "fp32" and dtype == torch.float32:
        pytest.skip("fp32 state and fp32 params: nothing to round, the ordinary op runs")
    pa, a, pb, b = twins(name, dtype, device="cuda", state_precision=precision, stochastic_rounding=sr)
    for step in range(1, 5):
        run_steps(name, pa, a, [step], reference=False)
        run_steps(name, pb, b, [step], reference=True)
        assert_same(snapshot(a, pa), snapshot(b, pb), f"cuda {name} {precision} sr={sr} step {step}")
    if name.startswith("neuro"):
        return  # closure-based: GradScaler unscales its grads itself (no grad_scale in its step)
    scale = torch.tensor(64.0, device="cuda")
    for p, q, g in zip(pa, pb, grads_for(pa, 5)):
        p.grad = (g.float() * 64).to(g.dtype)
        q.grad = g.clone()
    a.step(grad_scale=scale, found_inf=torch.tensor(0.0, device="cuda"))
    with reference_path(name):
        b.step()
    assert_same(snapshot(a, pa), snapshot(b, pb), f"cuda {name} {precision} sr={sr} AMP step")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "8bit"])
@pytest.mark.parametrize("name", ["lion", "adan", "gravity"])
def test_cuda_graph_capture_of_the_lowbit_op(name, precision):
    """capturable=True on CUDA: the lowbit op reads the rounding step from the device counter (no host
    sync), so one captured step replayed 3 times equals 4 eager steps bit for bit (params, codes, block
    scales, bf16 state), and the counter advanced on the device."""
    kw = {"state_precision": precision, "stochastic_rounding": True, "capturable": True}
    pa, a, pb, b = twins(name, torch.bfloat16, device="cuda", **kw)
    grads = grads_for(pa, 1)
    static = [torch.zeros_like(p) for p in pa]
    for p, s in zip(pa, static):
        p.grad = s
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        for s, g in zip(static, grads):
            s.copy_(g)
        a.step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        a.step()
    for i in range(3):
        for s, g in zip(static, grads):
            s.copy_(g * (i + 2))
        graph.replay()
    for i in range(4):
        for p, g in zip(pb, grads):
            p.grad = g * (i + 1)
        b.step()
    torch.cuda.synchronize()
    assert_same(snapshot(a, pa), snapshot(b, pb), f"{name} {precision}: graph replays against eager steps")
    assert a.param_groups[0]["lowbit_step"].item() == 4


@pytest.mark.parametrize("name", ["lion_wd_max", "adan_wd_max_clip", "gravity_max"])
@pytest.mark.parametrize("precision", ["bf16", "8bit"])
def test_amp_scaled_step_and_found_inf_skip(name, precision):
    """grad_scale in the op equals the reference path (which unscales first), grads written back unscaled; a
    found_inf step through the optimizer leaves params, codes, block scales, bf16 state and the grads untouched
    (on CPU the class reads found_inf first; the op's own skip: `test_launcher_found_inf_skips_everything`)."""
    pa, a, pb, b = twins(name, torch.bfloat16, state_precision=precision, stochastic_rounding=True)
    for step in range(1, 6):
        scale = 2.0 ** (step + 4)
        grads = grads_for(pa, step)
        if step == 3:
            for p, g in zip(pa, grads):
                p.grad = g * scale
            pa[1].grad[0, 0] = float("inf")
            before = snapshot(a, pa)
            held = [p.grad.clone() for p in pa]
            a.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(1.0))
            assert_same(snapshot(a, pa), before, f"{name} found_inf step")
            assert all(torch.equal(bits(p.grad), bits(h)) for p, h in zip(pa, held))
            continue
        for p, q, g in zip(pa, pb, grads):
            p.grad = (g.float() * scale).to(g.dtype)
            q.grad = g.clone()
        a.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(0.0))
        with reference_path(name):
            b.step()
        assert_same(snapshot(a, pa), snapshot(b, pb), f"{name} step {step}")
        for p, q in zip(pa, pb):  # the op wrote the unscaled grads back
            assert torch.equal(bits(p.grad), bits(q.grad))


@pytest.mark.parametrize("name", ["lion", "adan", "gravity", "neuro"])
@pytest.mark.parametrize("precision", ["bf16", "8bit"])
def test_state_dict_round_trip_resumes_bit_exactly(name, precision):
    """3 steps, state_dict into a fresh optimizer, 2 more: the same as 5 uninterrupted steps."""
    pa, a, pb, b = twins(name, torch.bfloat16, state_precision=precision, stochastic_rounding=True)
    run_steps(name, pa, a, range(1, 6), reference=False)
    run_steps(name, pb, b, range(1, 4), reference=False)
    sd = b.state_dict()
    torch.manual_seed(123)  # another construction seed: the loaded one must win
    c = MAKERS[name](pb, state_precision=precision, stochastic_rounding=True)
    c.load_state_dict(sd)
    run_steps(name, pb, c, range(4, 6), reference=False)
    assert_same(snapshot(c, pb), snapshot(a, pa), f"{name} resumed")


@pytest.mark.parametrize("name", ["lion_wd_max", "adan_wd_max_clip", "gravity_max"])
def test_capturable_tensor_step_and_lr(name):
    """capturable=True (the rounding step a CPU tensor) with a tensor lr: the op equals the reference path."""
    pa, a, pb, b = twins(name, torch.bfloat16, state_precision="8bit", stochastic_rounding=True, capturable=True)
    for opt in (a, b):
        for group in opt.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]))
    for step in range(1, 4):
        run_steps(name, pa, a, [step], reference=False)
        run_steps(name, pb, b, [step], reference=True)
        assert isinstance(a.param_groups[0]["lowbit_step"], torch.Tensor)
        assert_same(snapshot(a, pa), snapshot(b, pb), f"{name} capturable step {step}")


@pytest.mark.parametrize("name", ["lion", "adan", "gravity", "neuro"])
@pytest.mark.parametrize("precision", ["bf16", "8bit"])
def test_nonfinite_values_as_the_reference(name, precision):
    """inf and NaN grads (no AMP guard): the same bits as the reference path, NaN for NaN (an 8-bit block with
    an inf or NaN state gets a non-finite scale: docs/lowbit.md §3)."""
    pa, a, pb, b = twins(name, torch.bfloat16, state_precision=precision, stochastic_rounding=True)
    for step in range(1, 4):
        for params, opt, ref in ((pa, a, False), (pb, b, True)):
            grads = grads_for(params, step)
            grads[0][300] = float("inf") if step == 1 else float("nan")
            grads[3][4095] = -float("inf")
            for p, g in zip(params, grads):
                p.grad = g
            with reference_path(name) if ref else contextlib.nullcontext():
                opt.step()
        for (k, i, x), (_, _, y) in zip(snapshot(a, pa), snapshot(b, pb)):
            if x.dtype == torch.uint8:
                assert torch.equal(x, y), f"{k} of param {i}"
            else:
                fx, fy = x.view(torch.bfloat16 if x.dtype == torch.int16 else torch.float32), \
                    y.view(torch.bfloat16 if y.dtype == torch.int16 else torch.float32)
                assert torch.equal(fx.isnan(), fy.isnan()), f"{k} of param {i}: NaN positions"
                assert torch.equal(x[~fx.isnan()], y[~fy.isnan()]), f"{k} of param {i}"
    assert any(not bool(v.float().isfinite().all()) for p in pa for v in a.state[p].values()
               if isinstance(v, torch.Tensor) and v.dtype != torch.uint8)  # the non-finite values reached the state


def test_other_layouts_and_float64_take_the_reference_path():
    """A non-contiguous param and float64 params are not taken by the op: the launcher sends them through
    `reference_step` (the same bits), in the same step as the contiguous ones."""
    g = torch.Generator().manual_seed(0)
    pa = [torch.randn(80, 64, generator=g).t().clone().requires_grad_(),  # (64, 80), column-major
          torch.randn(5000, generator=g).requires_grad_()]
    assert not pa[0].is_contiguous()
    pb = [p.detach().clone().requires_grad_() for p in pa]  # clone keeps the strides
    torch.manual_seed(7)
    a = Lion(pa, lr=1e-2, impl="native", state_precision="bf16")
    torch.manual_seed(7)
    b = Lion(pb, lr=1e-2, impl="native", state_precision="bf16")
    run_steps("lion", pa, a, range(1, 4), reference=False)
    run_steps("lion", pb, b, range(1, 4), reference=True)
    assert_same(snapshot(a, pa), snapshot(b, pb), "mixed layouts")
    p64 = [torch.randn(4096, dtype=torch.float64, requires_grad=True)]
    q64 = [p64[0].detach().clone().requires_grad_()]
    torch.manual_seed(7)
    c = Lion(p64, lr=1e-2, impl="native", state_precision="8bit")
    torch.manual_seed(7)
    d = Lion(q64, lr=1e-2, impl="native", state_precision="8bit")
    run_steps("lion", p64, c, range(1, 3), reference=False)
    run_steps("lion", q64, d, range(1, 3), reference=True)
    assert_same(snapshot(c, p64), snapshot(d, q64), "float64")


def test_gravity_rows_split_between_op_and_reference_path():
    """Gravity's max|g| is reduced once over the whole split: with a non-contiguous param between contiguous
    ones (the op takes rows 0 and 2, the reference path row 1), each row still gets its own tensor's m,
    and the step equals the reference path's bit for bit."""
    g = torch.Generator().manual_seed(3)
    pa = [torch.randn(5000, generator=g).to(torch.bfloat16).requires_grad_(),
          torch.randn(80, 64, generator=g).t().clone().to(torch.bfloat16).requires_grad_(),
          (torch.randn(4099, generator=g) * 7).to(torch.bfloat16).requires_grad_()]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    assert not pa[1].is_contiguous()
    kw = {"state_precision": "8bit", "stochastic_rounding": True}
    torch.manual_seed(7)
    a = MAKERS["gravity"](pa, **kw)
    torch.manual_seed(7)
    b = MAKERS["gravity"](pb, **kw)
    for step in range(1, 4):
        for params in (pa, pb):
            for i, (p, gr) in enumerate(zip(params, grads_for(params, step))):
                p.grad = gr * (1 + 10 * i)  # a different max|g| per tensor
        a.step()
        with reference_path("gravity"):
            b.step()
        assert_same(snapshot(a, pa), snapshot(b, pb), f"gravity step {step}")


@pytest.mark.parametrize("name", ["lion_wd_max", "adan_wd_max_clip", "gravity_max"])
def test_amp_on_the_reference_path_of_the_launcher(name):
    """AMP where the launcher sends tensors to `reference_step` (here a non-contiguous one; CUDA takes the
    same path): a scaled step equals the unscaled one on the reference path, every grad ends unscaled, and
    a found_inf step changes nothing (on CPU params the class itself reads found_inf first: the launchers'
    own skip is `test_launcher_found_inf_skips_everything`)."""
    g = torch.Generator().manual_seed(0)
    pa = [torch.randn(80, 64, generator=g).t().clone().to(torch.bfloat16).requires_grad_(),
          torch.randn(5000, generator=g).to(torch.bfloat16).requires_grad_()]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    assert not pa[0].is_contiguous() and not pb[0].is_contiguous()
    kw = {"state_precision": "8bit", "stochastic_rounding": True}
    torch.manual_seed(7)
    a = MAKERS[name](pa, **kw)
    torch.manual_seed(7)
    b = MAKERS[name](pb, **kw)
    for step in range(1, 4):
        grads = grads_for(pa, step)
        scale = 2.0 ** (step + 3)
        for p in pa:
            p.grad = None
        for p, q, gr in zip(pa, pb, grads):
            p.grad = torch.empty_like(p).copy_(gr.float() * scale)
            q.grad = torch.empty_like(q).copy_(gr)
        if step == 2:
            before = snapshot(a, pa)
            a.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(1.0))
            assert_same(snapshot(a, pa), before, f"{name} found_inf step")
            continue
        a.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(0.0))
        with reference_path(name):
            b.step()
        assert_same(snapshot(a, pa), snapshot(b, pb), f"{name} step {step}")
        for p, q in zip(pa, pb):
            assert torch.equal(bits(p.grad), bits(q.grad))


def _launch(name, p, g, state_lists, absmax, fmt, **amp):
    """One launcher call with a Rounding, as the dispatcher makes it."""
    from fused_optim.lowstate import Rounding

    signed = (True, False, True, True) if name == "adan" else (True,)
    low = Rounding(fmt=fmt, signed=signed, absmax=tuple(absmax), param_sr=True, seed=5, step=3,
                   tensor_index=list(range(len(p))))
    if name == "gravity":
        _native._native_gravity(p, g, *state_lists, lr=1e-2, beta_hat=0.9, maximize=False, lowbit=low, **amp)
    elif name == "lion":
        _native._native_lion(p, g, *state_lists, lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False,
                             lowbit=low, **amp)
    else:
        _native._native_adan(p, g, *state_lists, lr=1e-2, beta1=0.02, beta2=0.08, beta3=0.01, bias_correction1=0.5,
                             bias_correction2=0.5, bias_correction3_sqrt=0.7, eps=1e-8, weight_decay=0.0,
                             no_prox=False, clip=1.0, maximize=False, lowbit=low, **amp)


@pytest.mark.parametrize("contiguous", [True, False], ids=["op", "reference_path"])
@pytest.mark.parametrize("fmt", ["bf16", "8bit"])
@pytest.mark.parametrize("name", ["lion", "adan", "gravity"])
def test_launcher_found_inf_skips_everything(name, fmt, contiguous):
    """The launchers themselves (as the dispatcher calls them on CUDA, where found_inf stays on the device):
    found_inf != 0 leaves params, grads, codes, block scales and bf16 state untouched, on the op and on the
    reference path; found_inf == 0 with grad_scale updates and unscales the grads."""
    g0 = torch.Generator().manual_seed(0)
    n_states = 4 if name == "adan" else 1
    base = torch.randn(64, 80, generator=g0).to(torch.bfloat16)
    p = [base.clone() if contiguous else base.t().contiguous().t()]
    assert p[0].is_contiguous() == contiguous
    g = [(torch.randn(64, 80, generator=g0) * 64).to(torch.bfloat16)]
    if fmt == "8bit":
        m = [torch.randint(0, 256, (64, 80), dtype=torch.uint8, generator=g0) for _ in range(n_states)]
        absmax = [[torch.rand(20, generator=g0) + 0.5] for _ in range(n_states)]
    else:
        m = [torch.randn(64, 80, generator=g0).abs().to(torch.bfloat16) for _ in range(n_states)]
        absmax = [[] for _ in range(n_states)]
    def everything():
        return p + g + m + [a for lst in absmax for a in lst]

    keep = [t.clone() for t in everything()]
    _launch(name, p, g, [[t] for t in m], absmax, fmt, grad_scale=torch.tensor(64.0), found_inf=torch.tensor(1.0))
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(everything(), keep))
    _launch(name, p, g, [[t] for t in m], absmax, fmt, grad_scale=torch.tensor(64.0), found_inf=torch.tensor(0.0))
    assert not torch.equal(bits(p[0]), bits(keep[0]))
    assert torch.equal(g[0], (keep[1].float() / 64).to(torch.bfloat16))


def test_op_refuses_bad_arguments_before_writing():
    """The op checks every tensor before it writes any: a wrong absmax size is refused, nothing changes."""
    from fused_optim import _ext

    ops = _ext.ops()
    p = torch.randn(4096)
    g = torch.randn(4096)
    m = torch.zeros(4096, dtype=torch.uint8)
    keep = p.clone()
    tables = _native._lowbit_tables((True,))
    with pytest.raises(RuntimeError, match="absmax of state list 0 tensor 0"):
        ops.lion_lowbit_([p], [g], [m], [torch.zeros(3)], tables, [1], 2, False, 1, 1, None, [0], 1e-2, 0.9, 0.99, 0.0,
                         False)
    with pytest.raises(RuntimeError, match="fmt must be"):
        ops.lion_lowbit_([p], [g], [m], [], tables, [1], 5, False, 1, 1, None, [0], 1e-2, 0.9, 0.99, 0.0, False)
    with pytest.raises(RuntimeError, match="must be BFloat16"):
        ops.lion_lowbit_([p], [g], [m], [], tables, [1], 1, False, 1, 1, None, [0], 1e-2, 0.9, 0.99, 0.0, False)
    assert torch.equal(p, keep)


# ------------------------------------------------------------------------------------------------ Muon
# Muon's matrices: 2-D and 3-D (a batch), 8-bit from 4096 elements, a transposed one (its grad and
# buffer are strided too: the reference path inside the launcher), a small one (fp32 state, another call)
MUON_SHAPES = [(80, 64), (3, 50, 30), (33, 129), (16, 8)]


def muon_twins(dtype, device="cpu", transposed=False, **kw):
    g = torch.Generator().manual_seed(3)
    pa = [torch.randn(s, generator=g).to(device, dtype) for s in MUON_SHAPES]
    if transposed:
        pa.append(torch.randn(96, 64, generator=g).to(device, dtype).t())
    pa = [p.requires_grad_() for p in pa]
    pb = [p.detach().clone().requires_grad_() for p in pa]
    opts = []
    for ps in (pa, pb):
        torch.manual_seed(7)
        opts.append(Muon(ps, lr=0.02, impl="native", **kw))
    return pa, opts[0], pb, opts[1]


def muon_steps(params, opt, steps, reference):
    fn = _native_muon
    for step in steps:
        for p, g in zip(params, grads_for(params, step)):
            p.grad = g
        if reference:
            assert fn.supports_lowbit
            fn.supports_lowbit = False
        try:
            opt.step()
        finally:
            fn.supports_lowbit = True


@pytest.mark.parametrize("hyper", [{}, {"weight_decay": 0.1, "maximize": True, "nesterov": False}],
                         ids=["default", "wd_max_plain"])
@pytest.mark.parametrize("precision,sr", [("bf16", False), ("bf16", True), ("8bit", False), ("8bit", True),
                                          ("fp32", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_muon_lowbit_ops_equal_reference_step(dtype, precision, sr, hyper):
    """Muon's momentum stage over its bf16 / 8-bit buffer and its apply stage with stochastically rounded
    bf16 params, 3 steps, against the reference path over the same native fp32 ops, bit for bit."""
    if precision == "fp32" and dtype == torch.float32:
        pytest.skip("fp32 state and no bf16 / fp16 param to round: the ordinary ops run")
    pa, a, pb, b = muon_twins(dtype, transposed=True, state_precision=precision, stochastic_rounding=sr, **hyper)
    with ops_called() as called:
        muon_steps(pa, a, [1], reference=False)
    if precision != "fp32":
        assert "muon_momentum_lowbit_" in called
    if sr and dtype != torch.float32:
        assert "muon_apply_lowbit_" in called
    muon_steps(pb, b, [1], reference=True)
    assert_same(snapshot(a, pa), snapshot(b, pb), f"muon {precision} sr={sr} {dtype} step 1")
    muon_steps(pa, a, [2, 3], reference=False)
    muon_steps(pb, b, [2, 3], reference=True)
    assert_same(snapshot(a, pa), snapshot(b, pb), f"muon {precision} sr={sr} {dtype} steps 2-3")


@pytest.mark.gpu
@pytest.mark.parametrize("precision,sr", [("bf16", True), ("8bit", False), ("8bit", True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_muon_lowbit_ops_equal_reference_step(dtype, precision, sr):
    """On a GPU: Muon's CUDA lowbit stages against the reference path over its CUDA fp32 ops."""
    pa, a, pb, b = muon_twins(dtype, device="cuda", state_precision=precision, stochastic_rounding=sr)
    muon_steps(pa, a, [1, 2, 3], reference=False)
    muon_steps(pb, b, [1, 2, 3], reference=True)
    assert_same(snapshot(a, pa), snapshot(b, pb), f"cuda muon {precision} sr={sr} {dtype}")


def test_muon_lowbit_ops_refuse_bad_arguments():
    """The momentum stage's Newton-Schulz input must be bf16; the apply stage needs one scale per param."""
    ops = _native._ops()
    g, buf = torch.randn(4096), torch.zeros(4096, dtype=torch.bfloat16)
    u = torch.empty(4096)
    tables = torch.zeros(0)
    with pytest.raises(RuntimeError, match="updates .*must be bfloat16"):
        ops.muon_momentum_lowbit_([g], [buf], [u], [], tables, [1], 1, False, 3, 1, None, [0], 0.9, True, False)
    p = torch.randn(4096, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="scales has 2 values, expected 1"):
        ops.muon_apply_lowbit_([p], [p.clone()], [], tables, [], 0, True, 3, 1, None, [0], [1.0, 2.0], 0.1, 0.0)
    assert not buf.any()
