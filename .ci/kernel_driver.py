"""Launch every native CUDA op and every Triton kernel of fused_optim once, on small adversarial lists.

`.ci/gpu` runs it under compute-sanitizer (memcheck over everything, then racecheck over the
reductions); `.ci/gpu --rehearse` runs it on the CPU (the native CPU ops, Triton interpreted), so a
wrong signature or a missing case shows up before a GPU minute is spent.

    python .ci/kernel_driver.py [--device cuda|cpu] [--only all|reductions] [--list]

The kernels are enumerated from the sources, not listed here: every `m.impl("op", ...)` registered
for CUDA in csrc/cuda/*.cu and every kernel a launcher in fused_optim/kernels/*.py launches through
`multi_tensor.Launch`. Each launch is recorded (the native ops through the namespace `fused_optim._native`
calls, the Triton kernels through `kernel_for`), and the run fails if any enumerated kernel of the
selection was not launched, so a new kernel without a case here fails CI.

Adversarial lists: sizes 0, 1, 3 and 5 (below one vector), 2,047, 65,536 (one native chunk) and
65,537 / 131,075 (one element or a partial vector past a chunk); fp32 and bf16 params (fp32 state);
every tensor once at a 16-byte aligned address and once one element off (the scalar paths); the
update ops once more with AMP (grad scale, found_inf) and device-tensor scalars (capturable).
Exit status 0 when every launch returned and every enumerated kernel of the selection ran.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the checkout's package wins
    sys.path.insert(0, str(REPO))

SIZES = (0, 1, 3, 5, 2047, 65536, 65537, 131075)
#: --small (the CPU rehearsal: interpreted Triton takes ~0.3 s per 1M elements): the same cases, no chunk edges
SMALL_SIZES = (0, 1, 3, 5, 2047)


# ------------------------------------------------------------------------------ enumeration (no torch)
def native_cuda_ops(root: Path = REPO) -> list[str]:
    """Ops with a CUDA kernel: the CUDA registration block (csrc/register_kernels.h) registers every op of
    csrc/ops_list.h (`FO_OP(name, ...)`), every rule of csrc/math/elementwise_rules.h (`X(Rule)`, whose
    op is its declaration's `kName` + "_", and its lowbit op `kName` + "_lowbit_" where register_kernels.h
    registers those) and the ops register_kernels.h names; plus any op the block registers by name."""
    csrc = root / "csrc"
    cu = "\n".join(src.read_text() for src in sorted((csrc / "cuda").glob("*.cu")))
    block = re.search(r"TORCH_LIBRARY_IMPL\(\s*fused_optim\s*,\s*CUDA\s*,\s*\w+\s*\)\s*\{(.*?)\n\}", cu, re.S)
    if block is None:
        return []
    ops: list[str] = re.findall(r'\.impl\(\s*"(\w+)"', block.group(1))
    if "register_kernels.h" in block.group(1):
        shared = (csrc / "register_kernels.h").read_text()
        ops += re.findall(r"^FO_OP\((\w+),", (csrc / "ops_list.h").read_text(), re.M)
        ops += re.findall(r'\.impl\(\s*"(\w+)"', shared)
        suffixes = ["_"] + (["_lowbit_"] if "register_elementwise_lowbit" in shared else [])
        rules = (csrc / "math" / "elementwise_rules.h").read_text().split("#define FO_ELEMENTWISE_RULES(X)", 1)[1]
        math = "\n".join(h.read_text() for h in sorted((csrc / "math").glob("*.h")))
        for rule in re.findall(r"X\((\w+)\)", rules):
            found = re.search(rf"struct {rule} {{.*?kName = \"(\w+)\"", math, re.S)
            if found:
                ops += [found.group(1) + suffix for suffix in suffixes]
    return sorted(set(ops))


def triton_kernels(root: Path = REPO) -> list[str]:
    """Kernels the launchers of fused_optim/kernels launch: the names passed to the shared launch helper
    (`multi_tensor.Launch`, called as ``launch(kernel, ...)``), which hands them to `kernel_for`. Every
    @triton.jit function of a kernel module (multi_tensor.py holds the shared device functions) must be
    one of them, or be called by one: a kernel launched some other way would escape the sanitizer."""
    launched: set[str] = set()
    jitted: dict[str, str] = {}
    for src in sorted((root / "fused_optim" / "kernels").glob("*.py")):
        # multi_tensor.py: the shared device functions; lowbit.py: the low-precision device functions the
        # optimizers' lowbit kernels call (docs/lowbit.md §5), and kernels that are test harnesses of
        # tests/test_lowbit.py
        if src.name in ("multi_tensor.py", "lowbit.py"):
            continue
        text = src.read_text()
        launched |= set(re.findall(r"\blaunch\(\s*(\w+)\s*[,)]", text))
        for name in re.findall(r"@triton\.jit\s*\ndef\s+(\w+)", text):
            jitted[name] = src.name
    stray = sorted(f"{jitted[n]}:{n}" for n in set(jitted) - launched)
    if stray:
        raise SystemExit(f"kernel_driver: @triton.jit kernels not launched through multi_tensor.Launch: {stray}; "
                         "launch them with it so that this driver sees them")
    return sorted(launched)


# ------------------------------------------------------------------------------ cases
@dataclass(frozen=True)
class Case:
    name: str            # the functional name: fused_optim._native._native_<name>, kernels._triton_<name>
    run: Callable        # run(fn, make, device, variant) -> None
    reduction: bool      # reads a reduction (shared memory: racecheck's business)
    amp: bool = False    # also the AMP / device-scalar variant (the hand-written cases: AMP_CASES)


class Lists:
    """Fresh tensors of SIZES (plus `extra` sizes) on `device`, aligned or one element off."""

    def __init__(self, device, misaligned: bool, sizes=SIZES, seed: int = 0):
        import torch

        self.torch, self.device, self.misaligned, self.sizes = torch, device, misaligned, sizes
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, dtype, scale: float = 1.0, positive: bool = False):
        torch = self.torch
        out = []
        for n in self.sizes:
            x = torch.randn(n + 1, generator=self.gen) * scale
            if positive:
                x = x.abs() + 1e-3
            x = x.to(device=self.device, dtype=dtype)
            out.append(x[1:] if self.misaligned else x[:n].clone())  # clone: a fresh, aligned allocation
        return out


def _scalar(torch, device, x: float, variant: str):
    """A per-step scalar: a Python float, or (capturable variant) a 0-d fp32 device tensor."""
    return torch.tensor(x, dtype=torch.float32, device=device) if variant == "amp" else x


def _amp(torch, device, variant: str) -> dict:
    if variant != "amp":
        return {}
    return {"grad_scale": torch.tensor([1024.0], device=device), "found_inf": torch.zeros(1, device=device)}


def _state_dtype(torch, dtype):
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def case_lion(fn, make, dtype, variant):
    import torch
    d = make.device
    p, g, m = make(dtype), make(dtype, 1e-2), make(_state_dtype(torch, dtype), 1e-3)
    fn(p, g, m, lr=_scalar(torch, d, 1e-3, variant), beta1=0.9, beta2=0.99, weight_decay=0.1, maximize=False,
       **_amp(torch, d, variant))


def case_gravity(fn, make, dtype, variant):
    import torch
    d = make.device
    p, g, v = make(dtype), make(dtype, 1e-2), make(_state_dtype(torch, dtype), 1e-3)
    fn(p, g, v, lr=_scalar(torch, d, 1e-3, variant), beta_hat=_scalar(torch, d, 0.9, variant), maximize=False,
       **_amp(torch, d, variant))


def case_adan(fn, make, dtype, variant):
    import torch
    d = make.device
    sd = _state_dtype(torch, dtype)
    p, g = make(dtype), make(dtype, 1e-2)
    m, v, dd, npg = make(sd, 1e-3), make(sd, 1e-3, positive=True), make(sd, 1e-3), make(sd, 1e-2)
    b1, b2, b3, step = 0.98, 0.92, 0.99, 3
    extra = {}
    if variant == "amp":  # capturable: every per-step scalar a device tensor, and the device first-step flag
        extra["first_step"] = torch.zeros((), device=d)
    fn(p, g, m, v, dd, npg, lr=_scalar(torch, d, 1e-3, variant), beta1=b1, beta2=b2, beta3=b3,
       bias_correction1=_scalar(torch, d, 1 - b1 ** step, variant),
       bias_correction2=_scalar(torch, d, 1 - b2 ** step, variant),
       bias_correction3_sqrt=_scalar(torch, d, math.sqrt(1 - b3 ** step), variant), eps=1e-8, weight_decay=0.02,
       no_prox=False, clip=(torch.tensor([0.5], device=d) if variant == "amp" else 0.5), maximize=False,
       **_amp(torch, d, variant), **extra)


def case_gradient_equilibrium(fn, make, dtype, variant):
    import torch
    d = make.device
    p, g = make(dtype), make(dtype, 1e-2)
    fn(p, g, lr=_scalar(torch, d, 1e-3, variant), weight_decay=0.01, maximize=False, **_amp(torch, d, variant))


def case_neuro_optima(fn, make, dtype, variant):
    import torch
    sd = _state_dtype(torch, dtype)
    p, g = make(dtype), make(dtype, 1e-2)
    m, v, dd, prev = make(sd, 1e-3), make(sd, 1e-3, positive=True), make(sd, 1e-3), make(sd, 1e-2)
    fn(p, g, m, v, dd, prev, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, maximize=False)


def case_lookahead_sync(fn, make, dtype, variant):
    import torch
    fn(make(dtype), make(_state_dtype(torch, dtype)), alpha=0.5)


def case_sam_norms(fn, make, dtype, variant):
    p, g = make(dtype), make(dtype, 1e-2)
    for adaptive in (False, True):
        norms = fn(p, g, adaptive=adaptive)
        assert norms.numel() == len(p), (norms.shape, len(p))


def case_sam_perturb(fn, make, dtype, variant):
    import torch
    p, g, old = make(dtype), make(dtype, 1e-2), make(dtype)
    for adaptive in (False, True):
        fn(p, g, old, scale=torch.tensor(0.05, device=make.device), adaptive=adaptive)


def case_sam_restore(fn, make, dtype, variant):
    fn(make(dtype), make(dtype))


def case_muon_momentum(fn, make, dtype, variant):
    import torch
    g, buf, u = make(dtype, 1e-2), make(_state_dtype(torch, dtype), 1e-2), make(torch.bfloat16)
    for nesterov in (True, False):
        fn(g, buf, u, momentum=0.95, nesterov=nesterov, maximize=False)


def case_muon_apply(fn, make, dtype, variant):
    import torch
    p, u = make(dtype), make(torch.bfloat16, 1e-2)
    fn(p, u, scales=[0.2 + 0.1 * i for i in range(len(p))], lr=1e-3, weight_decay=0.1)


def _declared_scalars(name: str) -> dict:
    """The functional step's scalars and flags for declared optimizer `name`, as its class computes them
    at its first step from its declared defaults (a zero weight decay made nonzero): the class runs one
    step on a CPU tensor with its forloop impl replaced by a recorder, so nothing here knows the rule."""
    import torch

    from fused_optim.declaration import declared

    decl, cls = declared()[name]
    kwargs = decl.defaults
    for h in decl.hypers:  # the rule tests/reliability_util.py's declared_kwargs follows
        if h.kind == "float" and h.default == 0 and h.hi is None:
            kwargs[h.name] = 0.02
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 0.5)
    opt = cls([p], **kwargs, impl="forloop")
    seen: dict = {}
    opt._impls = {**cls._impls, "forloop": lambda params, grads, *states, **kw: seen.update(kw)}
    opt.step()
    return seen


def case_declared(name: str) -> Callable:
    """The case of a declared optimizer without one of its own (a pure-elementwise rule added later):
    its state lists in the state dtype, its scalars from `_declared_scalars`; the AMP variant passes
    `lr` and the declared tensor scalars as device tensors, with AMP's grad scale and flag."""
    def run(fn, make, dtype, variant):
        import torch

        from fused_optim.declaration import declared

        decl = declared()[name][0]
        d = make.device
        p, g = make(dtype), make(dtype, 1e-2)
        states = [make(_state_dtype(torch, dtype), 1e-3) for _ in decl.state]
        tensors = ("lr", *decl.tensor_floats)
        kwargs = {k: (_scalar(torch, d, float(v), variant) if k in tensors else v)
                  for k, v in _declared_scalars(name).items()}
        fn(p, g, *states, **kwargs, **_amp(torch, d, variant))
    return run


def case_lowbit(name: str, signed: tuple[bool, ...] | None = None, kwargs: dict | None = None) -> Callable:
    """A declared optimizer's low-precision pass (docs/lowbit.md §5) on its impl: "plain" its state as 8-bit
    codes and block scales, "misaligned" (every tensor a view one element off) bf16 state with bf16 params
    rounded stochastically. An impl without the pass runs its fp32 kernel through
    `lowstate.reference_step`, as the optimizer class does. `signed` (per state list) and `kwargs` (the
    functional step's scalars): for a composite's part, which has no declared state of its own."""
    def run(fn, make, dtype, variant):
        import torch

        from fused_optim import lowbit, lowstate
        from fused_optim.declaration import declared

        sig = signed if signed is not None else tuple(s.signed for s in declared()[name][0].state)
        p, g = make(dtype), make(dtype, 1e-2)
        fmt = "bf16" if variant == "misaligned" else "8bit"
        states, absmax = [], []
        for s_signed in sig:
            vals = make(torch.float32, 1e-3, positive=not s_signed)
            if fmt == "bf16":
                states.append([v.to(torch.bfloat16) if not make.misaligned else _shifted(v, torch.bfloat16)
                               for v in vals])
                absmax.append([])
            else:
                codes, scales = zip(*(lowbit.quantize_blockwise(v.contiguous(), s_signed) for v in vals))
                states.append(list(codes))
                absmax.append(list(scales))
        rounding = lowstate.Rounding(fmt=fmt, signed=sig, absmax=tuple(absmax),
                                     param_sr=dtype == torch.bfloat16 and fmt == "bf16", seed=1234, step=3,
                                     tensor_index=list(range(len(p))))
        kw = kwargs if kwargs is not None else _declared_scalars(name)
        if getattr(fn, "supports_lowbit", False):
            fn(p, g, *states, **kw, lowbit=rounding)
        else:
            lowstate.reference_step(lambda ps, gs, ss: fn(ps, gs, *ss, **kw), p, g, states, rounding,
                                    [_state_dtype(torch, dtype)] * len(p))
    return run


def case_muon_lowbit(fn, make, dtype, variant):
    """Muon's whole step (momentum, Newton-Schulz, apply) on column matrices with its momentum buffer as 8-bit
    codes ("plain") or bf16 and bf16 params rounded stochastically ("misaligned"): the low-precision
    kernels of both stages (docs/lowbit.md §5)."""
    import torch

    from fused_optim import lowbit, lowstate

    col = [t.view(-1, 1) for t in make(dtype)]
    g = [t.view(-1, 1) for t in make(dtype, 1e-2)]
    vals = make(torch.float32, 1e-2)
    fmt = "bf16" if variant == "misaligned" else "8bit"
    if fmt == "bf16":
        bufs = [(_shifted(v, torch.bfloat16) if make.misaligned else v.to(torch.bfloat16)).view(-1, 1) for v in vals]
        absmax = []
    else:
        codes, absmax = zip(*(lowbit.quantize_blockwise(v.contiguous(), True) for v in vals))
        bufs, absmax = [c.view(-1, 1) for c in codes], list(absmax)
    rounding = lowstate.Rounding(fmt=fmt, signed=(True,), absmax=(absmax,),
                                 param_sr=dtype == torch.bfloat16 and fmt == "bf16", seed=1234, step=3,
                                 tensor_index=list(range(len(col))))
    fn(col, g, bufs, lr=0.02, momentum=0.95, weight_decay=0.1, nesterov=True, ns_steps=2, maximize=False,
       lowbit=rounding)


def _shifted(t, dtype):
    """`t` converted to `dtype` as a view one element into a one-longer buffer (a misaligned tensor)."""
    import torch

    buf = torch.empty(t.numel() + 1, dtype=dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t.to(dtype))
    return view


def _lowbit_cases() -> list[Case]:
    """A low-precision case for every declared optimizer whose Triton or native impl has the pass, for
    NeuroOptima's core (a composite's part) and for Muon's two stages. Each reduces in shared memory (the
    native CUDA pass: every 8-bit block's absmax), so racecheck runs them."""
    import fused_optim  # noqa: F401 - declares every optimizer of the library
    from fused_optim.declaration import declared

    cases = [Case(f"{name}_lowbit", case_lowbit(name), True)
             for name, (decl, _) in sorted(declared().items())
             if decl.alias_of is None and {"triton", "native"} <= set(decl.impl_names)
             and any(i.lowbit for i in decl.impls)]
    neuro = case_lowbit("neuro_optima", signed=(True, False, True, True),
                        kwargs=dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.01, maximize=False))
    return cases + [Case("neuro_optima_lowbit", neuro, True), Case("muon_lowbit", case_muon_lowbit, True)]


def _declared_cases(hand: list[Case]) -> list[Case]:
    """A generic case for every declared optimizer with triton and native impls and no case in `hand`."""
    import fused_optim  # noqa: F401 - declares every optimizer of the library
    from fused_optim.declaration import declared

    have = {c.name for c in hand}
    return [Case(name, case_declared(name), decl.per_tensor_reduction, amp=True)
            for name, (decl, _) in sorted(declared().items())
            if name not in have and decl.alias_of is None and {"triton", "native"} <= set(decl.impl_names)]


CASES = [
    Case("lion", case_lion, False),
    Case("gravity", case_gravity, True),
    Case("adan", case_adan, False),
    Case("gradient_equilibrium", case_gradient_equilibrium, True),
    Case("neuro_optima", case_neuro_optima, False),
    Case("lookahead_sync", case_lookahead_sync, False),
    Case("sam_norms", case_sam_norms, True),
    Case("sam_perturb", case_sam_perturb, False),
    Case("sam_restore", case_sam_restore, False),
    Case("muon_momentum", case_muon_momentum, False),
    Case("muon_apply", case_muon_apply, False),
]
#: the cases with AMP / device-scalar variants (the base optimizers' update ops)
AMP_CASES = {"lion", "gravity", "adan", "gradient_equilibrium"}


# ------------------------------------------------------------------------------ recording launches
def _install_recorders(launched: set[str]) -> None:
    """Record each native op called through fused_optim._native and each Triton kernel handed to
    `kernel_for` (`multi_tensor.Launch` calls it right before the launch)."""
    import importlib
    import pkgutil

    import torch

    import fused_optim._native as native
    import fused_optim.kernels as kernels

    class _Ops:
        def __getattr__(self, name):
            real = getattr(torch.ops.fused_optim, name)

            def call(*args, **kwargs):
                launched.add(f"native:{name}")
                return real(*args, **kwargs)
            return call

    real_ops = native._ops
    native._ops = lambda: (real_ops(), _Ops())[1]  # real_ops() loads (or reports) the extension first
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = kernels.kernel_module(info.name) if info.name != "multi_tensor" else \
            importlib.import_module("fused_optim.kernels.multi_tensor")
        kf = getattr(mod, "kernel_for", None)
        if kf is None or getattr(kf, "_recording", False):
            continue

        def recording(fn, device, _kf=kf):
            launched.add(f"triton:{getattr(fn, 'fn', fn).__name__}")
            return _kf(fn, device)
        recording._recording = True
        mod.kernel_for = recording


def impl_fns(name: str) -> dict[str, Callable]:
    import fused_optim._native as native
    import fused_optim.kernels as kernels

    from fused_optim.declaration import declared

    # a declared optimizer's launcher is its declaration's (lazy) reference; the composites' parts are
    # the package's attributes or their kernel module's
    base = name.removesuffix("_lowbit")  # a low-precision case runs the same functional step
    decl = declared().get(base)
    # (an optimizer whose impls its class tables by hand, Muon, counts too)
    if decl is not None and {"native", "triton"} <= set(getattr(decl[1], "_impls", {})):
        return {"native": decl[1]._impls["native"], "triton": decl[1]._impls["triton"]}
    tri = getattr(kernels, f"_triton_{base}", None) or getattr(kernels.kernel_module(base), f"_triton_{base}")
    return {"native": getattr(native, f"_native_{base}"), "triton": tri}


def expected(only: str) -> set[str]:
    """The kernels a run of selection `only` must launch (racecheck: the ones that reduce)."""
    nat = {f"native:{o}" for o in native_cuda_ops()}
    tri = {f"triton:{k}" for k in triton_kernels()}
    if only == "reductions":  # the lowbit ops reduce each 8-bit block's absmax in shared memory
        nat = {f"native:{o}" for o in ("multi_tensor_stats", "multi_tensor_l2norm")} | \
            {f"native:{o}" for o in native_cuda_ops() if o.endswith("_lowbit_")}
        tri = {f"triton:{k}" for k in ("_partials_kernel", "_sam_norms_finish_kernel", "_gravity_kernel",
                                       "_gradient_equilibrium_kernel")}
    return nat | tri


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--only", choices=("all", "reductions"), default="all")
    ap.add_argument("--impls", default="native,triton")
    ap.add_argument("--small", action="store_true", help=f"sizes {SMALL_SIZES} only (the CPU rehearsal)")
    ap.add_argument("--list", action="store_true", help="enumerate the kernels and the cases, run nothing")
    args = ap.parse_args(argv)

    if args.device == "cpu" and "triton" in args.impls:
        # Triton on CPU tensors is its interpreter, chosen when triton is imported: before anything imports it
        os.environ.setdefault("TRITON_INTERPRET", "1")
    want = expected(args.only)
    all_cases = CASES + _declared_cases(CASES) + _lowbit_cases()
    cases = [c for c in all_cases if args.only == "all" or c.reduction]
    if args.list:
        print(f"native CUDA ops ({len(native_cuda_ops())}): {', '.join(native_cuda_ops())}")
        print(f"Triton kernels ({len(triton_kernels())}): {', '.join(triton_kernels())}")
        print(f"cases ({len(cases)}, --only {args.only}): {', '.join(c.name for c in cases)}")
        print(f"kernels this selection must launch: {len(want)}")
        return 0

    import torch

    import fused_optim

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    status = fused_optim.available_impls(device)
    for impl in impls:
        st = status.get(impl)
        if st is None or not st.available:
            print(f"kernel_driver: impl {impl} cannot run on {device}: {st.reason if st else 'unknown impl'}")
            return 1
    amp_cases = AMP_CASES | {c.name for c in all_cases if c.amp}
    launched: set[str] = set()
    _install_recorders(launched)
    failures = 0
    t0 = time.perf_counter()
    for case in cases:
        fns = impl_fns(case.name)
        for impl in impls:
            for dtype in (torch.float32, torch.bfloat16):
                for variant in ("plain", "misaligned") + (("amp",) if case.name in amp_cases else ()):
                    label = f"{impl}/{case.name} {str(dtype).removeprefix('torch.')} {variant}"
                    try:
                        make = Lists(device, variant == "misaligned", SMALL_SIZES if args.small else SIZES)
                        case.run(fns[impl], make, dtype, variant)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)  # a kernel fault is charged to this case
                        print(f"ok    {label}", flush=True)
                    except Exception as exc:  # noqa: BLE001 - every case runs; the summary counts the failures
                        failures += 1
                        print(f"FAIL  {label}: {type(exc).__name__}: {exc}", flush=True)
                        traceback.print_exc(limit=4)
    want = {k for k in want if k.split(":")[0] in impls}
    missing = sorted(want - launched)
    print(f"kernel_driver on {device}: {len(cases)} cases, {len(launched & want)}/{len(want)} kernels launched, "
          f"{failures} failed, {time.perf_counter() - t0:.1f} s")
    if missing:
        print(f"kernel_driver: never launched: {', '.join(missing)} (add a case for them)")
    return 1 if failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
