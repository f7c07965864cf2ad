"""foreach vs forloop (docs/spec.md §9): same op order on CPU, so params and every state tensor are bit-equal
after every step, over adversarial lists with a missing grad on one step."""
import pytest
import torch

import fused_optim as fo
from spec_checks import (assert_lowp_close, clone_params, grads_for_step, make_params, set_grads,
                         state_tensors)

CASES = [
    ("gravity", fo.Gravity, {}),
    ("gravity-maximize", fo.Gravity, dict(lr=0.05, alpha=0.1, beta=0.5, maximize=True)),
    ("lion", fo.Lion, {}),
    ("lion-wd", fo.Lion, dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)),
    ("lion-maximize", fo.Lion, dict(lr=1e-2, weight_decay=0.1, maximize=True)),
    ("adan", fo.Adan, {}),
    ("adan-wd", fo.Adan, dict(lr=1e-2, weight_decay=0.05)),
    ("adan-noprox", fo.Adan, dict(lr=1e-2, weight_decay=0.05, no_prox=True)),
    # with clipping, foreach keeps the clip factor on the device (_foreach_norm) while forloop sums
    # squares in upstream's order: the factor differs in the last bits, so these compare with tolerance
    ("adan-clip", fo.Adan, dict(lr=1e-2, max_grad_norm=0.5)),
    ("adan-clip-maximize", fo.Adan, dict(lr=1e-2, max_grad_norm=0.5, weight_decay=0.02, maximize=True)),
    ("ge", fo.GradientEquilibrium, {}),
    ("ge-wd", fo.GradientEquilibrium, dict(lr=0.1, weight_decay=0.1)),
    ("ge-maximize", fo.GradientEquilibrium, dict(lr=0.1, maximize=True)),
]


def _lockstep(cls, kw, dtype, impls, steps=8):
    """Build one optimizer per (impl, dtype) on identical params and step them on identical grads.
    Gravity's velocity is drawn once and copied, so every run starts from the same state."""
    runs = []
    base = make_params(seed=3, dtype=dtype)
    for impl, run_dtype in impls:
        ps = [q.detach().to(run_dtype).requires_grad_() if run_dtype != dtype else q
              for q in clone_params(base)]
        torch.manual_seed(0)
        runs.append((ps, cls(ps, impl=impl, **kw)))
    if cls is fo.Gravity:
        for ps, opt in runs[1:]:
            for p, p0 in zip(ps, runs[0][0]):
                opt.state[p]["v"] = runs[0][1].state[p0]["v"].to(opt.state[p]["v"].dtype, copy=True)
    for step in range(1, steps + 1):
        grads = grads_for_step(base, step, missing=2 if step == 3 else None)
        for ps, opt in runs:
            set_grads(ps, [None if g is None else g.to(ps[0].dtype) for g in grads])
        before = [p.grad.clone() if p.grad is not None else None for p in runs[-1][0]]
        for _, opt in runs:
            opt.step()
        # .grad is never modified, also with maximize and clipping
        for p, g in zip(runs[-1][0], before):
            assert (p.grad is None and g is None) or torch.equal(p.grad, g)
        yield step, runs


def _pairs(runs, i, j):
    (pa, oa), (pb, ob) = runs[i], runs[j]
    sa, sb = state_tensors(oa, pa), state_tensors(ob, pb)
    assert [k for k, _ in sa] == [k for k, _ in sb]
    return [(f"param{n}", a, b) for n, (a, b) in enumerate(zip(pa, pb))] + \
           [(k, a, b) for (k, a), (_, b) in zip(sa, sb)]


@pytest.mark.parametrize("name,cls,kw", CASES, ids=[c[0] for c in CASES])
def test_foreach_matches_forloop_fp32(name, cls, kw):
    originals = None
    for step, runs in _lockstep(cls, kw, torch.float32, [("forloop", torch.float32), ("foreach", torch.float32)]):
        if originals is None:
            originals = [p.detach().clone() for p in make_params(seed=3)]
        for what, a, b in _pairs(runs, 1, 0):
            if "clip" in name:
                torch.testing.assert_close(a, b, rtol=1e-5 * step, atol=1e-6, msg=f"step {step} {what}")
            else:
                assert torch.equal(a, b), f"step {step} {what}"
    # the update did something on every non-empty param (no silent no-op), except GE's 1-element param
    moved = [not torch.equal(p.detach(), o) for p, o in zip(runs[1][0], originals) if p.numel() > 0]
    assert sum(moved) >= len(moved) - 1


@pytest.mark.parametrize("name,cls,kw", CASES, ids=[c[0] for c in CASES])
def test_foreach_bf16(name, cls, kw):
    """bf16 params (fp32 state on both, README "State dtype"): bit-equal to forloop (in-place foreach
    multiplies take a 0-d fp32 factor, see fused_optim._foreach.mul_operand); with clipping, whose factor
    differs in its last bits, the docs/spec.md §9 low-precision rule against a float64 forloop run, the state
    held to bf16's atol."""
    impls = [("forloop", torch.float64), ("forloop", torch.bfloat16), ("foreach", torch.bfloat16)]
    for step, runs in _lockstep(cls, kw, torch.bfloat16, impls):
        hi = _pairs(runs, 0, 0)
        for (what, ref_lo, new), (_, hi_t, _) in zip(_pairs(runs, 1, 2), hi):
            if "clip" in name:
                assert_lowp_close(new, ref_lo, hi_t, f"step {step} {what}", dtype=torch.bfloat16)
            else:
                assert torch.equal(new, ref_lo), f"step {step} {what}"


def test_param_groups_with_different_dtypes_and_hyperparameters():
    torch.manual_seed(0)
    a = [torch.randn(10, requires_grad=True), torch.randn(3, 4, dtype=torch.bfloat16, requires_grad=True)]
    b = [torch.randn(5, dtype=torch.float64, requires_grad=True)]
    ref_a, ref_b = clone_params(a), clone_params(b)
    opt = fo.Lion([{"params": a}, {"params": b, "lr": 0.5, "weight_decay": 0.1}], lr=0.1, impl="foreach")
    ref = fo.Lion([{"params": ref_a}, {"params": ref_b, "lr": 0.5, "weight_decay": 0.1}], lr=0.1,
                  impl="forloop")
    for step in range(1, 8):
        for ps in (a + b, ref_a + ref_b):
            set_grads(ps, grads_for_step(a + b, step))
        opt.step()
        ref.step()
    for x, y in zip(a + b, ref_a + ref_b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("clip", [1.0, 0.37])
def test_adan_update_bitwise_for_a_given_clip(clip):
    """The clip factor aside, the foreach update is the forloop update bit for bit."""
    from fused_optim.adan import _foreach_adan, _forloop_adan

    kw = dict(lr=1e-2, beta1=0.98, beta2=0.92, beta3=0.99, bias_correction1=0.0396,
              bias_correction2=0.1536, bias_correction3_sqrt=0.141, eps=1e-8, weight_decay=0.02,
              no_prox=False, clip=clip, maximize=False)
    ps = make_params(seed=5)
    lists = [[torch.randn_like(p) for p in ps] for _ in range(5)]
    lists[1] = [t.abs() for t in lists[1]]  # exp_avg_sq >= 0
    copies = [[t.clone() for t in lst] for lst in [ps, *lists]]
    grads = [torch.randn_like(p) for p in ps]
    with torch.no_grad():
        _forloop_adan(*[[t.detach() for t in lst] for lst in [ps, grads, *lists[:4]]], **kw)
        _foreach_adan(*[[t.detach() for t in lst] for lst in [copies[0], grads, *copies[1:5]]], **kw)
    for a, b in zip(ps + sum(lists[:4], []), copies[0] + sum(copies[1:5], [])):
        assert torch.equal(a, b)
