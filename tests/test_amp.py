"""AMP: GradScaler hands grad_scale/found_inf to step() (`_step_supports_amp_scaling`).

The scaled run must equal the unscaled run bit for bit (GradScaler's scales are powers of two, so the
unscale is exact), `.grad` must end unscaled like torch's fused Adam leaves it, and a found_inf step
must change nothing: params, state, lazily created state, step counters, and the (still scaled) grads.
"""
from __future__ import annotations

import pytest
import torch
from spec_checks import (ScaledTwin, clone_params, grads_for_step, make_params, seeded_twins, set_grads,
                         state_tensors, tiny_model)

import fused_optim
from fused_optim import Adan, GradientEquilibrium, Gravity, Lion
from fused_optim._backends import impl_status
from fused_optim.optimizer import supports_amp

SHAPES = [(0,), (1,), (7,), (13, 17), (129,)]

OPTIMIZERS = {
    "gravity": lambda ps, impl: Gravity(ps, lr=0.05, alpha=0.01, beta=0.9, impl=impl),
    "lion": lambda ps, impl: Lion(ps, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, impl=impl),
    "adan": lambda ps, impl: Adan(ps, lr=1e-2, weight_decay=0.02, impl=impl),
    "adan_clip": lambda ps, impl: Adan(ps, lr=1e-2, weight_decay=0.02, max_grad_norm=0.5, impl=impl),
    "equilibrium": lambda ps, impl: GradientEquilibrium(ps, lr=0.1, weight_decay=0.01, impl=impl),
}


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            [(k, v.clone()) for k, v in state_tensors(opt, params)],
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def _assert_same(a, b, what):
    pa, sa, ga = a
    pb, sb, gb = b
    for i, (x, y) in enumerate(zip(pa, pb)):
        assert torch.equal(x, y), f"{what}: param {i} differs"
    assert [k for k, _ in sa] == [k for k, _ in sb], f"{what}: state keys differ"
    for (k, x), (_, y) in zip(sa, sb):
        assert torch.equal(x, y), f"{what}: state {k} differs"
    assert ga == gb, f"{what}: param groups (step counters) differ"


@pytest.mark.parametrize("impl", ["forloop", "foreach", "triton", "native"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_scaled_step_equals_unscaled_and_inf_step_changes_nothing(name, impl, monkeypatch):
    """7 steps with grads scaled by 2^k and grad_scale passed, one of them with found_inf: identical to
    the plain run that never saw the skipped step. The Triton launchers are AMP-aware (they unscale in
    the kernel and write the unscaled grad back); the others are unscaled by the base class."""
    if impl == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # impl="triton" is available on CPU tensors only then
        if not impl_status("triton", "cpu").available:
            pytest.skip(impl_status("triton", "cpu").reason)
    if impl == "native" and not impl_status("native", "cpu").available:
        pytest.skip(impl_status("native", "cpu").reason)
    make = OPTIMIZERS[name]
    torch.manual_seed(0)
    ref_params = make_params(seed=3, shapes=SHAPES)
    amp_params = clone_params(ref_params)
    ref, amp = seeded_twins(make, ref_params, amp_params, impl)
    skip_at = 4
    for step in range(1, 9):
        grads = grads_for_step(ref_params, step, missing=1 if step == 3 else None)
        scale = 2.0 ** (step + 5)
        if step == skip_at:
            bad = [None if g is None else g * scale for g in grads]
            bad[2] = torch.full_like(bad[2], float("inf"))
            set_grads(amp_params, bad)
            before = _snapshot(amp, amp_params)
            amp.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(1.0))
            _assert_same(_snapshot(amp, amp_params), before, f"{name} found_inf step")
            for p, g in zip(amp_params, bad):  # a skipped step leaves .grad as it was (scaled)
                assert (p.grad is None) == (g is None) and (g is None or torch.equal(p.grad, g))
            continue
        set_grads(ref_params, grads)
        set_grads(amp_params, [None if g is None else g * scale for g in grads])
        ref.step()
        amp.step(grad_scale=torch.tensor(scale), found_inf=torch.tensor(0.0))
        _assert_same(_snapshot(amp, amp_params), _snapshot(ref, ref_params), f"{name} step {step}")
        for p, q in zip(amp_params, ref_params):  # .grad ends unscaled, as torch's fused Adam leaves it
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("name", ["gravity", "lion", "adan"])
def test_cpu_grad_scaler_loop_matches_plain_training(name):
    """torch.amp.GradScaler("cpu") drives our step through the attributes it sets; a step whose loss is
    poisoned with inf is skipped (and the scale backs off) while the plain run simply omits it."""
    run = ScaledTwin(OPTIMIZERS[name], "foreach")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
    for step, poison in run.steps(8, scaler):
        scale_before = scaler.get_scale()  # backward does not change it
        scaler.step(run.opt_amp)
        scaler.update()
        assert not hasattr(run.opt_amp, "found_inf")  # GradScaler removes what it set
        if poison:
            assert scaler.get_scale() == scale_before / 2
        for p, q in zip(run.model_amp.parameters(), run.model_ref.parameters()):
            assert torch.equal(p, q), f"{name}: diverged at step {step}"


def test_unscale_then_clip_then_step():
    """The documented recipe for clipping: scaler.unscale_ first; step then gets grad_scale=None."""
    model_ref, model_amp = tiny_model(), tiny_model()
    opt_ref = Lion(model_ref.parameters(), lr=1e-2, impl="foreach")
    opt_amp = Lion(model_amp.parameters(), lr=1e-2, impl="foreach")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = torch.randn(4, 6), torch.randn(4, 3)
    for _ in range(3):
        for m, o in ((model_ref, opt_ref), (model_amp, opt_amp)):
            o.zero_grad()
        torch.nn.functional.mse_loss(model_ref(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model_ref.parameters(), 0.1)
        opt_ref.step()
        scaler.scale(torch.nn.functional.mse_loss(model_amp(x), y)).backward()
        scaler.unscale_(opt_amp)
        torch.nn.utils.clip_grad_norm_(model_amp.parameters(), 0.1)
        scaler.step(opt_amp)
        scaler.update()
    for p, q in zip(model_amp.parameters(), model_ref.parameters()):
        assert torch.equal(p, q)


def test_amp_aware_impl_gets_the_tensors_and_others_do_not():
    """The `supports_amp` contract: a marked impl receives grad_scale on its device and the base class
    does not unscale for it; on the CPU found_inf is resolved on the host (no reason to pass it)."""
    seen = []

    @supports_amp
    def amp_lion(params, grads, exp_avgs, *, grad_scale=None, found_inf=None, **scalars):
        seen.append((grad_scale, found_inf))
        if grad_scale is not None:
            torch._foreach_div_(grads, grad_scale)  # the contract: leave the grads unscaled
        fused_optim.lion._foreach_lion(params, grads, exp_avgs, **scalars)

    class AmpLion(Lion):
        _impls = dict(Lion._impls, foreach=amp_lion)

    params = make_params(seed=4, shapes=SHAPES)
    ref_params = clone_params(params)
    opt, ref = AmpLion(params, lr=1e-2, impl="foreach"), Lion(ref_params, lr=1e-2, impl="foreach")
    grads = grads_for_step(params, 1)
    set_grads(params, [g * 64 for g in grads])
    set_grads(ref_params, grads)
    opt.step(grad_scale=torch.tensor(64.0), found_inf=torch.tensor(0.0))
    ref.step()
    assert len(seen) == 1 and float(seen[0][0]) == 64.0 and seen[0][1] is None
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
    opt.step()  # no AMP: the impl gets no AMP keywords at all
    assert seen[-1] == (None, None)


def test_step_without_scaler_attributes_is_plain():
    params = make_params(seed=6, shapes=SHAPES)
    opt = Lion(params, lr=1e-2, impl="foreach")
    set_grads(params, grads_for_step(params, 1))
    opt.step()
    assert opt._amp_kwargs is None and Lion._step_supports_amp_scaling


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["gravity", "lion", "adan", "equilibrium"])
def test_cuda_fp16_autocast_grad_scaler(name):
    """fp16 autocast with a CUDA GradScaler and the auto (fused) impl: equal to the same optimizer fed
    the unscaled grads by hand, and a poisoned step is skipped."""
    make = OPTIMIZERS[name]
    dev = "cuda"
    model = tiny_model().to(dev)
    ref_model = tiny_model().to(dev)
    opt, ref = seeded_twins(make, list(model.parameters()), list(ref_model.parameters()), None, seed=1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)
    data = torch.Generator().manual_seed(5)
    for step in range(7):
        x, y = torch.randn(4, 6, generator=data).to(dev), torch.randn(4, 3, generator=data).to(dev)
        opt.zero_grad()
        with torch.autocast("cuda", dtype=torch.float16):
            loss = torch.nn.functional.mse_loss(model(x), y)
        if step == 3:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        if step != 3:  # the reference gets the same grads, unscaled by hand
            for p, q in zip(model.parameters(), ref_model.parameters()):
                q.grad = p.grad / scaler.get_scale()
            ref.step()
        scaler.step(opt)
        scaler.update()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
