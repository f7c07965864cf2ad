"""state_dict round trips: save after k steps, load into a fresh optimizer (same or other impl) through
torch.save/torch.load, continue: bit-identical to the uninterrupted run."""
import pytest
import torch

import fused_optim as fo
from spec_checks import clone_params, grads_for_step, make_params, roundtrip, set_grads, state_tensors

CASES = [
    (fo.Gravity, dict(lr=0.05)),
    (fo.Lion, dict(lr=1e-2, weight_decay=0.1)),
    (fo.Adan, dict(lr=1e-2, weight_decay=0.02)),
    (fo.GradientEquilibrium, dict(lr=0.1, weight_decay=0.01)),
]
IMPL_PAIRS = [("forloop", "forloop"), ("foreach", "foreach"), ("forloop", "foreach"), ("foreach", "forloop")]


def _step(opt, params, step):
    set_grads(params, grads_for_step(params, step, missing=1 if step == 2 else None))
    opt.step()


@pytest.mark.parametrize("cls,kw", CASES, ids=[c.__name__ for c, _ in CASES])
@pytest.mark.parametrize("save_impl,load_impl", IMPL_PAIRS, ids=[f"{a}-to-{b}" for a, b in IMPL_PAIRS])
def test_resume_is_bit_identical(cls, kw, save_impl, load_impl):
    total, k = 8, 4
    base = make_params(seed=11)
    # uninterrupted run, in the impl we resume with (fp32 forloop and foreach are bit-equal)
    ref_p = clone_params(base)
    torch.manual_seed(0)
    ref = cls(ref_p, impl=load_impl, **kw)
    for step in range(1, total + 1):
        _step(ref, ref_p, step)

    p = clone_params(base)
    torch.manual_seed(0)
    first = cls(p, impl=save_impl, **kw)
    for step in range(1, k + 1):
        _step(first, p, step)
    ckpt = roundtrip({"params": [t.detach() for t in p], "optim": first.state_dict()})

    resumed_p = [t.clone().requires_grad_() for t in ckpt["params"]]
    torch.manual_seed(123)  # a different seed: Gravity's fresh draw must be overwritten by the checkpoint
    second = cls(resumed_p, impl=load_impl, **kw)
    second.load_state_dict(ckpt["optim"])
    for step in range(k + 1, total + 1):
        _step(second, resumed_p, step)

    for a, b in zip(resumed_p, ref_p):
        assert torch.equal(a, b)
    for (ka, a), (kb, b) in zip(state_tensors(second, resumed_p), state_tensors(ref, ref_p)):
        assert ka == kb and torch.equal(a, b), ka
    assert [ {k: v for k, v in g.items() if k != "params"} for g in second.param_groups] == \
           [ {k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]


def test_state_dict_layout_matches_upstream_keys():
    p = make_params(seed=1, shapes=[(3,)])[:1]
    opt = fo.Adan(p)
    p[0].grad = torch.randn(3)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"exp_avg", "exp_avg_sq", "exp_avg_diff", "neg_pre_grad"}
    assert sd["param_groups"][0]["step"] == 1
    g = fo.Gravity(p)
    assert set(g.state_dict()["state"][0]) == {"v"} and g.state_dict()["param_groups"][0]["t"] == 0
    lion = fo.Lion(p)
    lion.step()
    p[0].grad = torch.randn(3)
    lion.step()
    assert set(lion.state_dict()["state"][0]) == {"exp_avg"}


def test_loaded_state_does_not_share_storage_with_the_source():
    p = make_params(seed=1, shapes=[(4,)])[:1]
    a = fo.Lion(p)
    p[0].grad = torch.randn(4)
    a.step()
    q = clone_params(p)
    b = fo.Lion(q)
    b.load_state_dict(a.state_dict())  # live-to-live, no save/load in between
    assert b.state[q[0]]["exp_avg"].data_ptr() != a.state[p[0]]["exp_avg"].data_ptr()


def test_bf16_params_keep_their_state_dtype_through_a_round_trip():
    p = [torch.randn(8, dtype=torch.bfloat16, requires_grad=True)]
    a = fo.Adan(p, impl="foreach")
    p[0].grad = torch.randn(8, dtype=torch.bfloat16)
    a.step()
    q = clone_params(p)
    b = fo.Adan(q, impl="foreach")
    b.load_state_dict(roundtrip(a.state_dict()))
    for key, v in b.state[q[0]].items():
        assert v.dtype == a.state[p[0]][key].dtype and torch.equal(v, a.state[p[0]][key])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("cls,kw", CASES, ids=[c.__name__ for c, _ in CASES])
def test_load_across_devices(cls, kw):
    p = make_params(seed=2)
    torch.manual_seed(0)
    a = cls(p, impl="foreach", **kw)
    for step in range(1, 4):
        _step(a, p, step)
    q = [t.detach().cuda().requires_grad_() for t in p]
    b = cls(q, impl="foreach", **kw)
    b.load_state_dict(roundtrip(a.state_dict()))
    for (ka, x), (_, y) in zip(state_tensors(b, q), state_tensors(a, p)):
        assert x.device.type == "cuda" and torch.equal(x.cpu(), y), ka


# ------------------------------------------------------------------ one state dtype on every impl
def _impls_here():
    from fused_optim._backends import impl_status

    return [i for i in ("forloop", "foreach", "triton", "native") if impl_status(i, "cpu").available]


STATE_DTYPE_CASES = {
    "gravity": lambda ps, i: fo.Gravity(ps, lr=0.05, impl=i),
    "lion": lambda ps, i: fo.Lion(ps, lr=1e-3, impl=i),
    "adan": lambda ps, i: fo.Adan(ps, lr=1e-2, max_grad_norm=1.0, impl=i),
    "neuro_optima": lambda ps, i: fo.NeuroOptima(ps, lr=1e-2, sam_rho=0.0, impl=i),
    "muon": lambda ps, i: fo.Muon([dict(params=ps[:1]), dict(params=ps[1:], use_muon=False)], impl=i),
    "lookahead": lambda ps, i: fo.Lookahead(fo.Adan(ps, lr=1e-2, impl=i), k=2),
    "sam": lambda ps, i: fo.SAM(ps, fo.Lion, rho=0.05, lr=1e-3, impl=i),
}


def _state_run(name, impl, dtype, steps=3):
    g = torch.Generator().manual_seed(5)
    ps = [torch.randn(6, 5, generator=g).to(dtype).requires_grad_(),
          torch.randn(7, generator=g).to(dtype).requires_grad_()]
    torch.manual_seed(0)
    opt = STATE_DTYPE_CASES[name](ps, impl)
    for k in range(steps):
        gk = torch.Generator().manual_seed(50 + k)
        grads = [torch.randn(p.shape, generator=gk).to(dtype) for p in ps]
        for p, gr in zip(ps, grads):
            p.grad = gr.clone()
        if name == "sam":
            def closure():
                for p, gr in zip(ps, grads):
                    p.grad = (gr * 0.5).clone()
                return torch.zeros(())
            opt.step(closure)
        else:
            opt.step()
    return ps, opt


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("name", sorted(STATE_DTYPE_CASES))
def test_one_state_dtype_on_every_impl(name, dtype, monkeypatch):
    """bf16/fp16 params: fp32 state on every impl (README "State dtype"); other dtypes: the param's. A
    checkpoint of any impl loads into any other with every state tensor unchanged (dtype and bits)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # impl="triton" runs on CPU tensors interpreted
    impls = [i for i in _impls_here() if not (i == "triton" and dtype == torch.float64)]  # no fp64 kernels
    want = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    for impl in impls:
        ps, opt = _state_run(name, impl, dtype)
        sd = opt.state_dict()
        tensors = [(k, v) for st in sd["state"].values() for k, v in st.items()
                   if isinstance(v, torch.Tensor) and v.dim() and k != "lookahead_slow"]
        assert tensors, f"{name}/{impl}: no state"
        for key, value in tensors:
            assert value.dtype == want, f"{name}/{impl}: state {key!r} is {value.dtype}, expected {want}"
        for other in impls:
            q = [p.detach().clone().requires_grad_() for p in ps]
            torch.manual_seed(0)
            dst = STATE_DTYPE_CASES[name](q, other)
            dst.load_state_dict(roundtrip(sd))
            for pid, st in dst.state_dict()["state"].items():
                for key, value in st.items():
                    if isinstance(value, torch.Tensor) and value.dim():
                        src = sd["state"][pid][key]
                        assert value.dtype == src.dtype and torch.equal(value, src), (impl, other, key)
