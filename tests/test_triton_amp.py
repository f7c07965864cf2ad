"""AMP inside the Triton kernels (`supports_amp`): grad_scale divided out in registers, the unscaled grad
stored back to ``.grad``, and every program a no-op when ``found_inf != 0``, read on the device.

CPU tensors run the interpreted kernels (see tests/test_triton.py); the same tests marked ``gpu`` run
compiled on CUDA. Three runs side by side, over 8 steps:

- ``amp``: the Triton impl given the *scaled* grads, ``grad_scale`` and ``found_inf``;
- ``pre``: the Triton impl given grads unscaled beforehand by torch (``_foreach_div_``, what
  `FusedOptimizer` does for impls that are not AMP-aware): must be bit-identical to ``amp`` (params,
  every state tensor, and ``.grad``), in fp32 and bf16, also for a scale that is not a power of two
  (the unscaled grad is rounded to the grad's dtype exactly as torch rounds it);
- ``ref``: forloop on the pre-unscaled grads, within docs/spec.md §9's fp32 budget (tests/test_triton.py).

One step has ``found_inf = 1`` with an inf planted in the scaled grads: every param, state tensor and
grad of ``amp`` must be unchanged, bit for bit (the other runs skip that step).
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from spec_checks import ScaledTwin
from test_triton import Buffers, _assert_close_steps, _compile_for_sm90, _scalars, _spec

import fused_optim as fo

_HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                             pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")])]
STEPS = 8
# (grad_scale, found_inf) per step: None = not passed. Step 3's scale is not a power of two; step 4 is
# skipped with found_inf; step 5 is the `scaler.unscale_(opt)` recipe (found_inf only, grads already
# unscaled); step 6 is skipped by found_inf without a grad scale.
SCHEDULE = {1: (2.0 ** 10, 0.0), 2: (2.0 ** 16, 0.0), 3: (3.0, 0.0), 4: (2.0 ** 12, 1.0), 5: (None, 0.0),
            6: (None, 1.0), 7: (0.5, 0.0), 8: (2.0 ** 8, None)}
SIZES = [0, 1, 7, 1025, 2049]


def _lists(name, device, dtype, buf, gen):
    """Params (guarded, one strided view among them) and state lists for one run, as fresh tensors."""
    params = [buf.make(torch.randn(n, generator=gen).to(dtype).to(device)) for n in SIZES]
    params.append(buf.make_strided(torch.randn(5, 13, generator=gen).to(dtype).to(device)))
    params.append(buf.make(torch.randn(13, 5, generator=gen).to(dtype).to(device)))  # gets a transposed grad
    n_states = {"gravity": 1, "lion": 1, "adan": 4, "ge": 0}[name]
    sdtype = torch.float32  # the Triton impls' state dtype for every param dtype
    states = []
    for _ in range(n_states):
        init = [(torch.randn(p.shape, generator=gen) * 0.1 if name in ("gravity", "lion")
                 else torch.zeros(p.shape)).to(sdtype).to(device) for p in params]
        states.append([buf.make(x) if p.is_contiguous() else buf.make_strided(x)
                       for p, x in zip(params, init)])
    return params, states


def _copy(lists):
    return [[t.clone() for t in lst] for lst in lists]


def _grad_like(buf, p, values):
    """A guarded grad with p's layout, except p's last (13, 5) param which gets a non-contiguous grad,
    so the kernels' write-back of a strided grad is checked too."""
    if p.shape == (13, 5) and p.is_contiguous():
        g = buf.make_strided(values.t().contiguous())  # (5, 13) view, every other column
        return g.t()
    return buf.make(values) if p.is_contiguous() else buf.make_strided(values)


def _run(name, dtype, device, opts):
    tri_fn, ref_fn, _ = _spec(name)
    gen = torch.Generator().manual_seed(21)
    buf = Buffers(device)
    params, states = _lists(name, device, dtype, buf, gen)
    pre_p, pre_s = [p.clone() for p in params], _copy(states)
    ref_p, ref_s = [p.clone() for p in params], _copy(states)
    clip_value = opts.get("clip")
    for step in range(1, STEPS + 1):
        scale, inf = SCHEDULE[step]
        grads = [torch.randn(p.shape, generator=gen).to(dtype).to(device) for p in params]
        # grads as a GradScaler leaves them: scaled (exact for powers of two; the 3.0 step rounds, and its
        # unscale rounds again, as torch's would), an inf in one element when the step is skipped
        scaled = [g * scale for g in grads] if scale is not None else [g.clone() for g in grads]
        if inf:
            scaled[3].view(-1)[5] = float("inf")
        amp_g = [_grad_like(buf, p, s) for p, s in zip(params, scaled)]
        kw = _scalars(name, opts, step)
        extra, ref_extra = {}, {}
        if name == "adan":
            extra["clip"] = torch.tensor(clip_value, device=device) if clip_value is not None else 1.0
            ref_extra["clip"] = 1.0 if clip_value is None else clip_value
        amp_kw = dict(grad_scale=None if scale is None else torch.tensor(scale, device=device),
                      found_inf=None if inf is None else torch.tensor(inf, device=device))
        if inf:
            before = [t.clone() for t in (*params, *amp_g, *(s for lst in states for s in lst))]
            tri_fn(params, amp_g, *states, **kw, **extra, **amp_kw)
            after = (*params, *amp_g, *(s for lst in states for s in lst))
            for i, (a, b) in enumerate(zip(after, before)):
                assert torch.equal(a, b), f"{name} step {step}: tensor {i} changed under found_inf"
            continue
        unscaled = [s.clone() for s in scaled]
        if scale is not None:
            torch._foreach_div_(unscaled, torch.tensor(scale, device=device))
        if name == "adan" and step == 1:  # the class's first-step init: -clip*g (of the maximized g)
            c = ref_extra["clip"]
            for lst in (states[3], pre_s[3], ref_s[3]):
                for s, g in zip(lst, unscaled):
                    s.copy_((g if opts["maximize"] else -g).to(s.dtype) * c)
        tri_fn(params, amp_g, *states, **kw, **extra, **amp_kw)
        tri_fn(pre_p, unscaled, *pre_s, **kw, **extra)
        for i, (a, b) in enumerate(zip(amp_g, unscaled)):
            assert torch.equal(a, b), f"{name} step {step}: .grad {i} is not torch's unscaled grad"
        for i, (a, b) in enumerate(zip(params, pre_p)):
            assert torch.equal(a, b), f"{name} step {step}: param {i} differs from the pre-unscaled run"
        for k, (lst, pre) in enumerate(zip(states, pre_s)):
            for i, (a, b) in enumerate(zip(lst, pre)):
                assert torch.equal(a, b), f"{name} step {step}: state{k}[{i}] differs from the pre-unscaled"
        if dtype == torch.float32:
            ref_fn(ref_p, unscaled, *ref_s, **kw, **ref_extra)
            _assert_close_steps(params, ref_p, step, "param")
            for k, (lst, ref) in enumerate(zip(states, ref_s)):
                _assert_close_steps(lst, ref, step, f"state{k}")
    buf.check_guards()


CASES = [("lion", dict(maximize=False, wd=0.1)), ("gravity", dict(maximize=True)),
         ("ge", dict(maximize=True, wd=0.1)), ("adan", dict(maximize=False, wd=0.02)),
         ("adan", dict(maximize=True, wd=0.02, no_prox=True, clip=0.37))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,opts", CASES, ids=["lion", "gravity", "ge", "adan", "adan-clip"])
def test_in_kernel_amp_matches_pre_unscaled_and_forloop(name, opts, dtype, device):
    _run(name, dtype, device, opts)


# ------------------------------------------------------------------------------------------ tensor lr
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,opts", CASES[:4] + [("adan", dict(maximize=False, wd=0.02, no_prox=True))],
                         ids=["lion", "gravity", "ge", "adan", "adan-noprox"])
def test_tensor_lr_is_read_on_the_device(name, opts, device):
    """``lr`` as a 0-d device tensor (`supports_tensor_lr`), changed every step like a scheduler would:
    Gravity and GE use it as is (bit-identical to the float lr); Lion's 1 - lr*wd and Adan's step sizes
    are then computed in fp32 in the kernel instead of in double on the host (docs/spec.md §9 budget). Under
    AMP at the same time."""
    tri_fn, _, n_states = _spec(name)
    gen = torch.Generator().manual_seed(8)
    params = [torch.randn(n, generator=gen).to(device) for n in (1, 7, 2049)]
    states = [[torch.randn(p.shape, generator=gen).to(device).abs() * 0.1 for p in params]
              for _ in range(n_states)]
    f_params, f_states = [p.clone() for p in params], _copy(states)
    for step in range(1, 8):
        grads = [torch.randn(p.shape, generator=gen).to(device) for p in params]
        kw = _scalars(name, opts, step)
        kw["lr"] = kw["lr"] * 0.8 ** step
        extra = {"clip": 1.0} if name == "adan" else {}
        lr_t = torch.tensor(kw["lr"], device=device)
        scale = torch.tensor(2.0 ** 9, device=device)
        tri_fn(params, [g * scale for g in grads], *states, **dict(kw, lr=lr_t), **extra, grad_scale=scale,
               found_inf=torch.zeros((), device=device))
        tri_fn(f_params, grads, *f_states, **kw, **extra)
        exact = name in ("gravity", "ge")
        for lst, f_lst in zip([params, *states], [f_params, *f_states]):
            if exact:
                assert all(torch.equal(a, b) for a, b in zip(lst, f_lst)), (name, step)
            else:
                _assert_close_steps(lst, f_lst, step, name)


# ------------------------------------------------------------------------------------------ classes
@pytest.fixture
def interpret(monkeypatch):
    """impl='triton' on CPU is available only under TRITON_INTERPRET=1 (`_backends.triton_status`)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


OPTIMIZERS = {
    "gravity": lambda ps: fo.Gravity(ps, lr=0.05, impl="triton"),
    "lion": lambda ps: fo.Lion(ps, lr=1e-3, weight_decay=0.1, impl="triton"),
    "adan": lambda ps: fo.Adan(ps, lr=1e-2, weight_decay=0.02, impl="triton"),
    "adan_clip": lambda ps: fo.Adan(ps, lr=1e-2, weight_decay=0.02, max_grad_norm=0.5, impl="triton"),
    "ge": lambda ps: fo.GradientEquilibrium(ps, lr=0.1, weight_decay=0.01, impl="triton"),
}
# the launcher each class's impl="triton" calls, to see what reached it
_LAUNCHERS = {"gravity": ("gravity", "_triton_gravity"), "lion": ("lion", "_triton_lion"),
              "adan": ("adan", "_triton_adan"), "adan_clip": ("adan", "_triton_adan"),
              "ge": ("equilibrium", "_triton_gradient_equilibrium")}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_cpu_grad_scaler_drives_the_triton_kernels(name, interpret, monkeypatch):
    """torch.amp.GradScaler("cpu") with impl="triton": bit-identical to plain training (powers-of-two
    scales), a poisoned step skipped (params, state, step counters), .grad left unscaled. Without a
    clip the grad scale reaches the kernel; Adan with max_grad_norm gets grads the class unscaled
    first (its clip norm must see unscaled grads), as its foreach path does."""
    import importlib

    mod_name, attr = _LAUNCHERS[name]
    mod = importlib.import_module(f"fused_optim.kernels.{mod_name}")
    real = getattr(mod, attr)
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("grad_scale"))
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, attr, spy)
    run = ScaledTwin(OPTIMIZERS[name])
    model_ref, model_amp, opt_ref, opt_amp = run.model_ref, run.model_amp, run.opt_ref, run.opt_amp
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    for step, poison in run.steps(5, scaler):
        scaled = [p.grad.clone() for p in model_amp.parameters()]
        groups_before = [{k: v for k, v in g.items() if k != "params"} for g in opt_amp.param_groups]
        scaler.step(opt_amp)
        scaler.update()
        if poison:
            for p, g in zip(model_amp.parameters(), scaled):
                # a skipped step leaves .grad as it was (scaled, inf/NaN here: compared as bits)
                assert torch.equal(p.grad.view(torch.int32), g.view(torch.int32))
            groups = [{k: v for k, v in g.items() if k != "params"} for g in opt_amp.param_groups]
            assert groups == groups_before
        else:
            for p, q in zip(model_amp.parameters(), model_ref.parameters()):
                assert torch.equal(p.grad, q.grad), f"{name}: .grad not unscaled at step {step}"
        for p, q in zip(model_amp.parameters(), model_ref.parameters()):
            assert torch.equal(p, q), f"{name}: diverged at step {step}"
            for key, s in opt_ref.state[q].items():
                t = opt_amp.state[p][key]
                assert torch.equal(t, s) if isinstance(s, torch.Tensor) else t == s, (name, step, key)
    assert [g.get("step", g.get("t")) for g in opt_amp.param_groups] == \
        [g.get("step", g.get("t")) for g in opt_ref.param_groups]
    amp_calls = [s for s in seen if s is not None]
    if name == "adan_clip":
        assert not amp_calls  # unscaled by the class before its clip norm
    else:
        assert amp_calls, f"{name}: the grad scale never reached the kernel"


# ------------------------------------------------------------------------------------------ compiled
def test_amp_kernels_compile_for_cuda_without_a_gpu():
    """With HAS_GRAD_SCALE and HAS_FOUND_INF on (and every per-step scalar read on the device, as
    ``capturable=True`` runs them), every kernel still lowers to sm_90 PTX with 128-bit accesses on its
    full-chunk path (the grad store included)."""
    from triton.backends import backends

    from fused_optim.kernels import adan, equilibrium, gravity, lion, reduce

    if "nvidia" not in backends:
        pytest.skip("this triton install has no CUDA backend")
    ptrs = {"meta_ptr": "*i64", "grad_ptrs_ptr": "*i64", "chunks_ptr": "*i32", "partials_ptr": "*fp32",
            "rchunks_ptr": "*i32", "clip_ptr": "*fp32", "grad_scale_ptr": "*fp32", "found_inf_ptr": "*fp32",
            "lr_ptr": "*fp32", "beta_hat_ptr": "*fp32", "bias_correction1_ptr": "*fp32",
            "bias_correction2_ptr": "*fp32", "bias_correction3_sqrt_ptr": "*fp32", "first_step_ptr": "*fp32"}
    f32 = dict.fromkeys(["lr", "decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "beta_hat",
                         "one_minus_beta_hat", "weight_decay", "clip", "first_step", "beta3", "one_minus_beta3",
                         "bias_correction3_sqrt", "eps", "neg_step_size", "neg_step_size_diff", "coeff",
                         "bias_correction1", "bias_correction2"], "fp32")
    amp = dict(HAS_GRAD_SCALE=True, HAS_FOUND_INF=True, ALIGNED=True)

    cases = [
        (lion._lion_kernel, dict(MAXIMIZE=False, DECAY=True, P_KIND=2, S_KIND=0, ROW=6, BLOCK=lion.BLOCK), 4),
        (gravity._gravity_kernel,
         dict(MAXIMIZE=True, P_KIND=0, S_KIND=0, ROW=6, BLOCK=gravity.BLOCK, MAX_PARTS=256,
              BETA_HAT_TENSOR=True), 4),
        (equilibrium._gradient_equilibrium_kernel,
         dict(MAXIMIZE=True, DECAY=True, P_KIND=1, ROW=5, BLOCK=equilibrium.BLOCK, MAX_PARTS=256), 4),
        (adan._adan_kernel,
         dict(MAXIMIZE=False, NO_PROX=False, DECAY=True, CLIP=True, CLIP_TENSOR=True, P_KIND=0, S_KIND=0, ROW=9,
              BLOCK=adan.BLOCK, BIAS_CORRECTION1_TENSOR=True, BIAS_CORRECTION2_TENSOR=True,
              BIAS_CORRECTION3_SQRT_TENSOR=True, FIRST_STEP=True, FIRST_STEP_TENSOR=True), 4),
        (reduce._partials_kernel, dict(OP=0, NEGATE=False, ADD_PARAM=False, P_KIND=2, ROW=6, RBLOCK=2048), 8),
    ]
    for kernel, consts, warps in cases:
        if kernel is not reduce._partials_kernel:
            consts = {**consts, "LR_TENSOR": True}  # lr read on the device
        ptx = _compile_for_sm90(kernel, {**ptrs, **f32}, {**consts, **amp}, warps)
        assert "ld.global.v4" in ptx or "ld.global.v2" in ptx, kernel.fn.__name__
        if kernel is not reduce._partials_kernel:
            assert "st.global.v4" in ptx or "st.global.v2" in ptx, kernel.fn.__name__


# ------------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize("name", ["lion", "ge"])
def test_found_inf_skip_on_the_device_has_no_host_sync(name):
    """Lion and GradientEquilibrium have no Python step counter, so on CUDA found_inf goes down to the
    kernels: a skipped step and a normal one, both with no host sync, under sync debug mode."""
    make = OPTIMIZERS[name]
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(257, 129), (3,), (4099,), (0,)]]
    opt = make(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # compile and build the tables outside the checked region
    scale = torch.tensor(2.0 ** 10, device="cuda")
    grads = [torch.randn_like(p) for p in params]
    torch.cuda.synchronize()
    before = [p.detach().clone() for p in params]
    try:
        torch.cuda.set_sync_debug_mode("error")
        for p, g in zip(params, grads):
            p.grad = g * scale
        opt.step(grad_scale=scale, found_inf=torch.ones((), device="cuda"))
        skipped = [p.detach().clone() for p in params]
        opt.step(grad_scale=scale, found_inf=torch.zeros((), device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(skipped, before))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # unscaled in the kernel
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before) if p.numel())


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="no CUDA")
@pytest.mark.parametrize("name,opts", CASES, ids=["lion", "gravity", "ge", "adan", "adan-clip"])
def test_tensor_lr_and_amp_launch_without_host_sync(name, opts):
    """The functional impls with a device lr, grad_scale and found_inf (and Adan's device clip): nothing
    is read on the host, under sync debug mode."""
    tri_fn, _, n_states = _spec(name)
    params = [torch.randn(n, device="cuda") for n in (3, 4099)]
    states = [[torch.zeros_like(p) for p in params] for _ in range(n_states)]
    kw = _scalars(name, opts, 2)
    kw["lr"] = torch.tensor(kw["lr"], device="cuda")
    if name == "adan":
        kw["clip"] = torch.tensor(opts.get("clip", 1.0), device="cuda")
    scale = torch.tensor(2.0 ** 9, device="cuda")

    def step():
        tri_fn(params, [torch.randn_like(p) for p in params], *states, **kw, grad_scale=scale,
               found_inf=torch.zeros((), device="cuda"))

    step()  # compile and build the tables first
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for _ in range(2):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
