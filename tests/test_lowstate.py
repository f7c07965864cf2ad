"""Low-precision optimizer state and stochastically rounded params in the optimizers (docs/lowbit.md §5):
every optimizer that takes ``state_precision`` on every impl against the reference (forloop), state
bytes per parameter, resume, conversion between precisions on load, stochastic rounding's effect and
reproducibility, non-finite values, AMP and bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from reliability_util import cpu_impls, triton_interpreter  # noqa: F401 - autouse fixture
from spec_checks import roundtrip

import fused_optim as fo
from fused_optim import lowbit as L
from fused_optim import lowstate

#: every optimizer with low-precision state, as (name, factory(params, **kw))
OPTIMIZERS = {
    "lion": lambda ps, **kw: fo.Lion(ps, lr=1e-3, weight_decay=0.1, **kw),
    "adan": lambda ps, **kw: fo.Adan(ps, lr=1e-3, weight_decay=0.02, **kw),
    "gravity": lambda ps, **kw: fo.Gravity(ps, lr=0.05, **kw),
    "neuro_optima": lambda ps, **kw: fo.NeuroOptima(ps, lr=1e-3, sam_rho=0.0, lookahead_k=2, **kw),
    "muon": lambda ps, **kw: fo.Muon([{"params": [p for p in ps if p.ndim >= 2]},
                                      {"params": [p for p in ps if p.ndim < 2], "use_muon": False}], **kw),
}
#: a tensor above the 8-bit threshold (4096), a matrix above it, one below it
SHAPES = [(4500,), (64, 80), (33,)]
PRECISIONS = ["bf16", "8bit"]


def _params(dtype=torch.float32, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def _make(name, params, impl="forloop", **kw):
    torch.manual_seed(0)  # Gravity's velocity and the rounding seed come from torch's generator
    return OPTIMIZERS[name](params, impl=impl, **kw)


def _grads(params, step, scale=1.0):
    g = torch.Generator().manual_seed(100 + step)
    return [(torch.randn(p.shape, generator=g) * scale).to(p.dtype) for p in params]


def _run(opt, params, steps, start=1):
    for k in range(start, start + steps):
        for p, g in zip(params, _grads(params, k)):
            p.grad = g.clone()
        opt.step()


def _decoded(opt, p):
    """Every state tensor of p as fp32 values (8-bit codes dequantized)."""
    st = opt.state[p]
    signed = dict(opt._lowbit_states)
    out = {}
    for key, v in st.items():
        if key.endswith(lowstate.ABSMAX) or not isinstance(v, torch.Tensor) or v.dim() == 0:
            continue
        out[key] = lowstate.decode(v, st.get(key + lowstate.ABSMAX), signed.get(key, True), torch.float32)
    return out


def _impls(name):
    return [i for i in ("foreach", "triton", "native") if i in cpu_impls()]


CASES = [pytest.param(n, i, prec, id=f"{n}-{i}-{prec}") for n in OPTIMIZERS for i in _impls(n) for prec in PRECISIONS]


# ------------------------------------------------------------------------------------ storage
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("prec", ["fp32", *PRECISIONS])
def test_state_is_stored_in_its_precision(name, prec):
    ps = _params()
    opt = _make(name, ps, state_precision=prec)
    _run(opt, ps, 2)
    keys = dict(opt._lowbit_states)
    for p in ps:
        for key in keys:
            if key not in opt.state[p]:
                continue
            v = opt.state[p][key]
            if prec == "bf16":
                assert v.dtype == torch.bfloat16
            elif prec == "8bit" and p.numel() >= lowstate.MIN_8BIT_NUMEL:
                assert v.dtype == torch.uint8 and v.shape == p.shape
                absmax = opt.state[p][key + lowstate.ABSMAX]
                assert absmax.dtype == torch.float32 and absmax.numel() == L.num_blocks(p.numel())
            else:
                assert v.dtype == torch.float32
                assert key + lowstate.ABSMAX not in opt.state[p]


def _state_bytes(opt, p):
    keys = dict(opt._lowbit_states)
    return sum(v.numel() * v.element_size() for k, v in opt.state[p].items()
               if isinstance(v, torch.Tensor) and (k in keys or k.removesuffix(lowstate.ABSMAX) in keys))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_state_bytes_per_parameter(name):
    """Measured from ``optimizer.state``: 4 B per state tensor in fp32, 2 in bf16, 1 + 4/256 in 8 bits."""
    big = (64, 80)
    n_states = {"lion": 1, "adan": 4, "gravity": 1, "neuro_optima": 4, "muon": 1}[name]
    for prec, per in (("fp32", 4.0), ("bf16", 2.0), ("8bit", 1 + 4 / 256)):
        ps = _params(shapes=[big])
        opt = _make(name, ps, state_precision=prec)
        _run(opt, ps, 1)
        assert _state_bytes(opt, ps[0]) / ps[0].numel() == pytest.approx(n_states * per), prec


# ------------------------------------------------------------------------------- against forloop
@pytest.mark.parametrize(("name", "impl", "prec"), CASES)
def test_impl_matches_forloop(name, impl, prec):
    """Params, and the state as values, against the reference over several steps, fp32 and bf16 params
    (stochastic rounding on for bf16). Where an impl's fp32 update equals forloop's bit for bit (Lion,
    Gravity, Muon's momentum) so does everything stored; elsewhere a 1-ulp difference of the fp32 value
    can flip a rounding, bounded here by one bf16 step or one 8-bit code."""
    for dtype in (torch.float32, torch.bfloat16):
        pa, pb = _params(dtype), _params(dtype)
        kw = dict(state_precision=prec, stochastic_rounding=dtype == torch.bfloat16)
        a, b = _make(name, pa, "forloop", **kw), _make(name, pb, impl, **kw)
        _run(a, pa, 3)
        _run(b, pb, 3)
        lr = 0.05 if name == "gravity" else 0.02 if name == "muon" else 1e-3
        for x, y in zip(pa, pb):
            x, y = x.detach().float(), y.detach().float()
            # a flipped rounding of a bf16 param moves it by one bf16 step (2^-8 relative at most)
            ulp = 2 * x.abs().max().item() * 2**-8 if dtype == torch.bfloat16 else 0.0
            torch.testing.assert_close(y, x, rtol=0, atol=lr * 0.05 + ulp)
            for key, va in _decoded(a, x).items():
                vb = _decoded(b, y)[key]
                scale = va.abs().max().item() or 1.0
                torch.testing.assert_close(vb, va, rtol=0.02, atol=scale * 0.01, msg=f"{key} ({dtype})")


@pytest.mark.parametrize("prec", PRECISIONS)
def test_lion_is_bit_identical_on_the_torch_impls(prec):
    """forloop and foreach compute Lion's fp32 update identically, so the stored codes, scales and bf16
    bits (and the stochastically rounded bf16 params) are identical: the generator is keyed, not
    stateful. (The fused impls are compared with their own fp32 kernel in tests/test_*_lowbit.py.)"""
    runs = {}
    for impl in ["forloop", "foreach"]:
        ps = _params(torch.bfloat16)
        opt = _make("lion", ps, impl, state_precision=prec, stochastic_rounding=True)
        _run(opt, ps, 3)
        runs[impl] = (ps, opt)
    ref_p, ref = runs.pop("forloop")
    for impl, (ps, opt) in runs.items():
        for x, y in zip(ref_p, ps):
            assert torch.equal(x, y), impl
            for key, v in ref.state[x].items():
                assert torch.equal(v, opt.state[y][key]), (impl, key)


# ------------------------------------------------------------------------------ stochastic rounding
@pytest.mark.parametrize("impl", ["forloop", *_impls("lion")])
def test_stochastic_rounding_moves_bf16_params_by_less_than_half_an_ulp(impl):
    """bf16 params at 1.0, 100 Lion steps of lr 1e-3 (below half of bf16's ulp under 1): round to
    nearest never moves them; stochastic rounding moves their mean to 0.9, within a few standard errors."""
    means = {}
    for sr in (False, True):
        p = torch.ones(4096, dtype=torch.bfloat16, requires_grad=True)
        opt = fo.Lion([p], lr=1e-3, impl=impl, stochastic_rounding=sr)
        for _ in range(100):
            p.grad = torch.ones_like(p)
            opt.step()
        means[sr] = p.double().mean().item()
    assert means[False] == 1.0
    # each element is a sum of 100 unbiased roundings, each of variance <= (ulp/2)^2, ulp = 2^-8 under 1
    stderr = math.sqrt(100) * 2**-9 / math.sqrt(4096)
    assert abs(means[True] - 0.9) < 5 * stderr


def test_stochastic_rounding_is_reproducible_and_seeded_from_torch():
    def run(seed):
        torch.manual_seed(seed)
        p = torch.ones(5000, dtype=torch.bfloat16, requires_grad=True)
        opt = fo.Lion([p], lr=1e-3, stochastic_rounding=True, impl="foreach")
        for _ in range(3):
            p.grad = torch.ones_like(p)
            opt.step()
        return p.detach().clone(), opt.param_groups[0]["lowbit_seed"]

    (a, sa), (b, sb), (c, sc) = run(1), run(1), run(2)
    assert sa == sb != sc
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_fp16_params_round_stochastically():
    p = torch.ones(4096, dtype=torch.float16, requires_grad=True)
    opt = fo.Lion([p], lr=1e-4, stochastic_rounding=True, impl="foreach")  # 1e-4 < half fp16's ulp (2^-12)
    for _ in range(100):
        p.grad = torch.ones_like(p)
        opt.step()
    stderr = math.sqrt(100) * 2**-12 / math.sqrt(4096)
    assert abs(p.double().mean().item() - 0.99) < 5 * stderr


def test_fp16_stochastic_rounding_is_unbiased_and_exact_where_it_must_be():
    x = torch.tensor([1.0, 0.0, -0.0, 65504.0, -2.0**-24, float("inf"), -float("inf")])
    for s in range(5):
        y = L.stochastic_round_fp16(x, L.random_bits(s, 0, 0, x.numel()))
        assert torch.equal(y.float(), x) and torch.equal(torch.signbit(y), torch.signbit(x))
    assert L.stochastic_round_fp16(torch.tensor([float("nan")]), L.random_bits(0, 0, 0, 1)).isnan().all()
    for v in (1.0 + 2**-12 + 2**-14, -3e-8, 1e-6, 65500.0, 7.77e-5):
        n = 1 << 16
        x = torch.full((n,), v)
        y = L.stochastic_round_fp16(x, L.random_bits(7, 0, 0, n)).double()
        ulp = (y.max() - y.min()).item() if y.unique().numel() > 1 else 0.0
        assert y.unique().numel() <= 2
        assert abs(y.mean().item() - x[0].item()) < 5 * ulp / 2 / math.sqrt(n) + 1e-12, v
    # above the largest finite value inf stands for 2^16: 65519 becomes inf with probability 15/32
    y = L.stochastic_round_fp16(torch.full((1 << 16,), 65519.0), L.random_bits(3, 0, 0, 1 << 16))
    assert set(y.float().unique().tolist()) == {65504.0, math.inf}
    assert abs(y.isinf().double().mean().item() - 15 / 32) < 5 * math.sqrt(0.25 / (1 << 16))


# ----------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("prec", PRECISIONS)
def test_resume_is_bit_exact(name, prec):
    """Three steps, a torch.save/load round trip into a fresh optimizer (another seed drawn), three more
    steps: identical to six uninterrupted steps (the seed and the rounding counter are in the groups)."""
    pa = _params(torch.bfloat16)
    a = _make(name, pa, state_precision=prec, stochastic_rounding=True)
    _run(a, pa, 6)
    pb = _params(torch.bfloat16)
    b = _make(name, pb, state_precision=prec, stochastic_rounding=True)
    _run(b, pb, 3)
    sd = roundtrip(b.state_dict())
    pc = [p.detach().clone().requires_grad_() for p in pb]
    torch.manual_seed(123)
    c = OPTIMIZERS[name](pc, impl="forloop", state_precision=prec, stochastic_rounding=True)
    c.load_state_dict(sd)
    _run(c, pc, 3, start=4)
    for x, y in zip(pa, pc):
        assert torch.equal(x, y)
        for key, v in a.state[x].items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, c.state[y][key]), key


def test_checkpoint_holds_the_codes_as_they_are():
    ps = _params()
    opt = _make("adan", ps, state_precision="8bit")
    _run(opt, ps, 2)
    saved = opt.state_dict()["state"][0]
    assert saved["exp_avg"].dtype == torch.uint8 and saved["exp_avg_absmax"].dtype == torch.float32
    assert sum(v.numel() * v.element_size() for k, v in saved.items() if isinstance(v, torch.Tensor) and v.dim()) \
        == pytest.approx(4 * (1 + 4 / 256) * ps[0].numel(), rel=0.01)


@pytest.mark.parametrize(("src", "dst"), [("fp32", "8bit"), ("8bit", "fp32"), ("bf16", "8bit"), ("8bit", "bf16"),
                                          ("fp32", "bf16"), ("bf16", "fp32")])
def test_loading_converts_between_precisions(src, dst):
    ps = _params()
    a = _make("adan", ps, state_precision=src)
    _run(a, ps, 2)
    qs = [p.detach().clone().requires_grad_() for p in ps]
    b = _make("adan", qs, state_precision=dst)
    b.load_state_dict(roundtrip(a.state_dict()))
    for p, q in zip(ps, qs):
        va, vb = _decoded(a, p), _decoded(b, q)
        assert va.keys() == vb.keys()
        for key in va:
            fmt = b._state_format(q, key)
            stored = b.state[q][key]
            if fmt == "8bit":
                codes, scales = L.quantize_blockwise(va[key], key != "exp_avg_sq")
                assert torch.equal(stored, codes) and torch.equal(b.state[q][key + "_absmax"], scales)
            elif fmt == "bf16":
                assert torch.equal(stored, va[key].to(torch.bfloat16))
            else:
                assert stored.dtype == torch.float32 and torch.equal(stored, va[key])
    _run(b, qs, 1, start=3)  # and it steps


# ------------------------------------------------------------------------------- non-finite, AMP
@pytest.mark.parametrize("prec", PRECISIONS)
def test_a_nan_grad_propagates_as_in_fp32_state(prec):
    """The param update of the step reads the NaN where fp32 state does; the stored state holds it in
    its element (bf16) or in its 256-element block (8-bit: the block's scale is NaN, docs/lowbit.md §3)."""
    results = {}
    for p_ in ("fp32", prec):
        ps = _params(shapes=[(5000,)])
        opt = _make("lion", ps, state_precision=p_)
        g = _grads(ps, 1)[0]
        g[300] = float("nan")
        ps[0].grad = g
        opt.step()
        results[p_] = (ps[0].detach().clone(), _decoded(opt, ps[0])["exp_avg"])
    assert torch.equal(results[prec][0].isnan(), results["fp32"][0].isnan())
    nan_state = results[prec][1].isnan().nonzero().flatten().tolist()
    assert nan_state == ([300] if prec == "bf16" else list(range(256, 512)))


@pytest.mark.parametrize("impl", ["forloop", *_impls("adan")])
def test_amp_found_inf_skips_everything(impl):
    ps = _params(torch.bfloat16)
    opt = _make("adan", ps, impl, state_precision="8bit", stochastic_rounding=True)
    _run(opt, ps, 1)
    before = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in ps]))
    for p, g in zip(ps, _grads(ps, 2)):
        p.grad = g
    opt.step(grad_scale=torch.tensor(4.0), found_inf=torch.tensor(1.0))
    sd, params = opt.state_dict(), ps
    for x, y in zip(before[1], params):
        assert torch.equal(x, y)
    for pid, st in before[0]["state"].items():
        for key, v in st.items():
            assert torch.equal(v, sd["state"][pid][key]), key
    assert int(sd["param_groups"][0]["lowbit_step"]) == int(before[0]["param_groups"][0]["lowbit_step"])
    # and a scaled step equals the unscaled one
    qs = [x.detach().clone().requires_grad_() for x in ps]
    ref = _make("adan", qs, impl, state_precision="8bit", stochastic_rounding=True)
    ref.load_state_dict(copy.deepcopy(opt.state_dict()))
    grads = _grads(ps, 3)
    for p, q, g in zip(ps, qs, grads):
        p.grad, q.grad = g * 8, g.clone()
    opt.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0))
    ref.step()
    for x, y in zip(ps, qs):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------------------ bad input
def test_bad_options_are_refused_with_their_name():
    ps = _params()
    with pytest.raises(ValueError, match="state_precision 'int4'"):
        fo.Lion(ps, state_precision="int4")
    with pytest.raises(TypeError, match="stochastic_rounding must be a bool"):
        fo.Lion(ps, stochastic_rounding=1)
    with pytest.raises(ValueError, match="state_precision 'fp16'"):
        fo.Muon([torch.randn(8, 8, requires_grad=True)], state_precision="fp16")


def test_state_in_another_format_is_refused_before_anything_moves():
    ps = _params()
    opt = _make("lion", ps, state_precision="8bit")
    _run(opt, ps, 1)
    before = [p.detach().clone() for p in ps]
    opt.state[ps[0]]["exp_avg"] = torch.zeros_like(ps[0])  # an fp32 tensor where 8-bit codes belong
    with pytest.raises(RuntimeError, match="expected 8-bit codes"):
        _run(opt, ps, 1, start=2)
    assert all(torch.equal(x, y) for x, y in zip(before, ps))
    bad = opt.state_dict()
    bad["state"][1]["exp_avg_absmax"] = torch.zeros(3)
    fresh = _make("lion", _params(), state_precision="8bit")
    with pytest.raises(ValueError, match="block scales"):
        fresh.load_state_dict(bad)


def test_small_and_complex_params_keep_fp32_state():
    ps = [torch.randn(100, requires_grad=True), torch.randn(5000, dtype=torch.complex64, requires_grad=True)]
    opt = fo.Lion(ps, state_precision="8bit", impl="foreach")
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[ps[0]]["exp_avg"].dtype == torch.float32
    assert opt.state[ps[1]]["exp_avg"].dtype == torch.complex64


def test_readme_memory_table_is_measured():
    """The README's table of state bytes per parameter element is what ``optimizer.state`` holds."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = re.findall(r"^\| (Lion|Adan|Gravity|NeuroOptima|Muon[^|]*|GradientEquilibrium) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$",
                      text, re.M)
    assert len(rows) == 6
    factories = {"Lion": "lion", "Adan": "adan", "Gravity": "gravity", "NeuroOptima": "neuro_optima"}
    for name, *cells in rows:
        for prec, cell in zip(("fp32", "bf16", "8bit"), cells):
            cell = cell.strip()
            ps = _params(shapes=[(64, 80)])
            if name == "GradientEquilibrium":
                if prec != "fp32":
                    assert cell == "—"
                    continue
                opt = fo.GradientEquilibrium(ps)
            elif name.startswith("Muon"):
                opt = fo.Muon(ps, state_precision=prec)
            else:
                opt = _make(factories[name], ps, state_precision=prec)
            _run(opt, ps, 1)
            measured = sum(v.numel() * v.element_size() for v in opt.state.get(ps[0], {}).values()
                           if isinstance(v, torch.Tensor) and v.dim() > 0) / ps[0].numel()
            assert measured == pytest.approx(float(cell), abs=0.005), (name, prec)


@pytest.mark.parametrize(("impl", "prec"), [("foreach", "bf16"), ("native", "8bit")])
def test_compiled_step_equals_eager(impl, prec):
    """Under torch.compile the step runs the reference path around the impl (its custom op for a fused
    impl): the same bits as eagerly, the rounding counter traced (no recompile per step)."""
    if impl not in cpu_impls():
        pytest.skip(f"{impl} does not run here")
    import torch._dynamo

    torch._dynamo.reset()
    pa, pb = _params(torch.bfloat16), _params(torch.bfloat16)
    a = _make("adan", pa, impl, state_precision=prec, stochastic_rounding=True)
    b = _make("adan", pb, impl, state_precision=prec, stochastic_rounding=True)
    step = torch.compile(b.step, backend="aot_eager")
    for k in range(1, 4):
        for p, q, g in zip(pa, pb, _grads(pa, k)):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        step()
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
        for key, v in a.state[x].items():
            assert torch.equal(v, b.state[y][key]), key


def test_a_deepcopy_steps_as_the_original():
    """The copy's params are new tensors: the generator's tensor index follows them, not the ids of the
    original's (no stale id table survives the copy)."""
    ps = _params(torch.bfloat16)
    a = _make("lion", ps, "foreach", state_precision="8bit", stochastic_rounding=True)
    _run(a, ps, 2)
    b = copy.deepcopy(a)
    qs = [p for g in b.param_groups for p in g["params"]]
    _run(a, ps, 2, start=3)
    _run(b, qs, 2, start=3)
    for x, y in zip(ps, qs):
        assert torch.equal(x, y)
        for key, v in a.state[x].items():
            assert torch.equal(v, b.state[y][key]), key
