"""Build and load the emulated test build of the CUDA kernels (csrc/cuda/emulation/, README "Emulated CUDA
kernels"): csrc/cuda/fused_optim_cuda.cu compiled by the host compiler against our emulation of CUDA's
execution model, registered as ``torch.ops.fused_optim_emu`` for CPU tensors.

Built with torch.utils.cpp_extension.load under its own name (cached in TORCH_EXTENSIONS_DIR like the
library's JIT build, rebuilt when a source or header changes). ``sanitize=True`` is the AddressSanitizer +
UndefinedBehaviorSanitizer variant; it can only be loaded by a process started with the ASan runtime
preloaded (`sanitizer_env`), which `tests/test_cuda_emulated.py` runs as a subprocess.
"""
from __future__ import annotations

import os
import re
import subprocess
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EMULATION = ROOT / "csrc" / "cuda" / "emulation"
NAME = "fused_optim_cuda_emulated"
SANITIZED_NAME = "fused_optim_cuda_emulated_asan"

# -O1: the build, not the kernels, is what CI waits for; -ffp-contract=off: no fma the source does not ask for
_FLAGS = ["-O1", "-ffp-contract=off", "-fno-strict-aliasing"]
_SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize=vptr", "-fno-sanitize-recover=undefined",
             "-fno-omit-frame-pointer", "-g1"]

_loaded: dict[bool, object] = {}


def build(sanitize: bool = False, load: bool = True):
    """Compile (if needed) and load the emulated ops; returns ``torch.ops.fused_optim_emu``."""
    if sanitize in _loaded:
        return _loaded[sanitize]
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", "2")
    cflags = _FLAGS + (_SANITIZE if sanitize else [])
    cpp_extension.load(
        name=SANITIZED_NAME if sanitize else NAME,
        sources=[str(EMULATION / "emulated_ops.cpp")],
        extra_cflags=cflags,
        extra_ldflags=_SANITIZE[:1] if sanitize else [],
        # first on the include path: the CPU stand-ins of c10/cuda/*.h
        extra_include_paths=[str(EMULATION), str(ROOT / "csrc")],
        with_cuda=False,
        is_python_module=False,
        verbose=os.environ.get("FUSED_OPTIM_VERBOSE", "0") not in ("", "0"),
    )
    _loaded[sanitize] = torch.ops.fused_optim_emu
    return _loaded[sanitize]


def sanitizer_env() -> dict[str, str]:
    """The environment of a process that can load the sanitized build: the compiler's ASan runtime first."""
    lib = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True,
                         check=True).stdout.strip()
    env = dict(os.environ)
    env["LD_PRELOAD"] = lib
    # leaks: Python and torch keep allocations until exit by design; the stack-use-after-return check
    # does not follow the emulator's fiber switches
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    return env


@contextmanager
def emulated_native():
    """Route fused_optim's native launchers (fused_optim._native, fused_optim._ext.ops) to the emulated
    CUDA ops for the duration: the whole path from the Python launcher to the kernel runs, on CPU tensors."""
    from fused_optim import _ext, _native

    ops = build()
    saved = (_native._ops, _ext.ops)
    _native._ops = lambda: ops
    _ext.ops = lambda: ops
    try:
        yield ops
    finally:
        _native._ops, _ext.ops = saved


def launches(ops=None) -> dict[str, int]:
    """Every kernel instantiation compiled into the build and how often it was launched."""
    ops = ops or build()
    out = {}
    for line in ops._emu_launches().splitlines():
        name, count = line.rsplit("\t", 1)
        out[name] = int(count)
    return out


class _Twin:
    """Calls each op on the emulated build and, on clones of the same inputs, on `ref` (the native CPU ops,
    independently held to the forloop reference): every written tensor and the result must agree within
    2 ulp of its dtype at the tensor's scale (the reductions add in another order)."""

    def __init__(self, ops, ref):
        self.ops, self.ref = ops, ref

    def __getattr__(self, name):
        def call(*args):
            if self.ref is None:
                return getattr(self.ops, name)(*args)
            twin = [[t.clone() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                    else a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            out = getattr(self.ops, name)(*args)
            expected = getattr(self.ref, name)(*twin)
            pairs = [(out, expected)] if isinstance(out, torch.Tensor) else []
            for a, b in zip(args, twin):
                if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
                    pairs += list(zip(a, b))
            for i, (x, y) in enumerate(pairs):
                if not x.is_floating_point():
                    assert torch.equal(x, y), f"{name}: tensor {i} differs from the native CPU op"
                    continue
                eps = torch.finfo(y.dtype).eps
                x, y = x.double(), y.double()
                bound = 2 * eps * (y.abs() + y.abs().mean())
                assert ((x - y).abs() <= bound).all(), (f"{name} ({y.dtype}): tensor {i} differs from the native "
                                                        f"CPU op by up to {(x - y).abs().max().item():.3g}")
            return out
        return call


def elementwise_ops(root: Path = ROOT) -> list[str]:
    """The op of each rule of csrc/math/elementwise_rules.h: its declaration's ``kName`` + "_"."""
    rules = (root / "csrc" / "math" / "elementwise_rules.h").read_text().split("#define FO_ELEMENTWISE_RULES(X)", 1)[1]
    headers = "\n".join(h.read_text() for h in sorted((root / "csrc" / "math").glob("*.h")))
    return [re.search(rf'struct {rule} {{.*?kName = "(\w+)"', headers, re.S).group(1) + "_"
            for rule in re.findall(r"X\((\w+)\)", rules)]


def _call_rule(ops, name, p, g, state, gs, fi):
    """One call of an elementwise rule's op read from its schema (a rule added after the calls of `sweep`):
    fresh state lists, every float 0.1 (a valid rate, beta and decay), every flag False."""
    args = getattr(torch.ops.fused_optim_emu, name).default._schema.arguments
    kinds = [str(a.type) for a in args[:[a.name for a in args].index("maximize")]]
    getattr(ops, name)(p, g, *[state() for _ in range(kinds.count("List[Tensor]") - 2)],
                       *[0.1] * kinds.count("float"), *[False] * kinds.count("bool"), False, gs, fi)


def sweep(ops, ref=None):
    """One call of every op for every storage-type combination the host code dispatches to, AMP and not;
    with `ref` (torch.ops.fused_optim on the CPU) every call is checked against the native CPU kernels."""
    ops = _Twin(ops, ref)
    fp = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    sizes = (5, 1030)  # a vector body and a scalar tail

    def rnd(dt, positive=False):
        return [(torch.rand(n) + 0.5 if positive else torch.randn(n)).to(dt) for n in sizes]

    for p_dt in fp:
        m_dt = torch.float64 if p_dt == torch.float64 else torch.float32  # the math type
        for s_dt in {p_dt, m_dt}:
            for amp in (False, True):
                gs, fi = (torch.full((1,), 2.0), torch.zeros(1)) if amp else (None, None)
                p, g = rnd(p_dt), rnd(p_dt)
                stats = ops.multi_tensor_stats(g, p, 0.1, False, gs)
                ops.lion_(p, g, rnd(s_dt), 1e-3, 0.9, 0.99, 0.1, False, gs, fi)
                ops.gravity_(p, g, rnd(s_dt), stats, 1e-3, 0.9, False, gs, fi)
                adan_state = [rnd(s_dt), rnd(s_dt, True), rnd(s_dt), rnd(s_dt)]
                ops.adan_(p, g, *adan_state, 1e-3, 0.98, 0.92, 0.99, 0.1, 0.1, 0.3, 1e-8, 0.02, False, None,
                          False, gs, fi)
                ops.gradient_equilibrium_(p, g, stats, 1e-3, 0.0, False, gs, fi)
                for name in elementwise_ops():
                    if name != "lion_":  # called above with chosen scalars
                        _call_rule(ops, name, p, g, lambda: rnd(s_dt), gs, fi)
            ops.lookahead_sync_(rnd(p_dt), rnd(s_dt), 0.5)
            neuro_state = [rnd(s_dt), rnd(s_dt, True), rnd(s_dt), rnd(s_dt)]
            ops.neuro_optima_(rnd(p_dt), rnd(p_dt), *neuro_state, 1e-3, 0.9, 0.99, 1e-8, 0.0, False)
            for u_dt in {torch.bfloat16, p_dt}:
                ops.muon_momentum_(rnd(p_dt), rnd(s_dt), rnd(u_dt), 0.95, True, False)
        for u_dt in {torch.bfloat16, p_dt}:
            ops.muon_apply_(rnd(p_dt), rnd(u_dt), [1.0, 2.0], 1e-3, 0.1)
        ops.multi_tensor_stats(rnd(p_dt))
        ops.multi_tensor_l2norm(rnd(p_dt))
        ops.multi_tensor_l2norm(rnd(p_dt), rnd(p_dt))
        ops.sam_perturb_(rnd(p_dt), rnd(p_dt), rnd(p_dt), torch.tensor(0.1, dtype=m_dt), True)
    lowbit_sweep(ops)
    for dt in (torch.uint8, torch.float16, torch.float32, torch.float64):  # the bit copy: 1, 2, 4, 8 bytes
        dst, src = [torch.zeros(n, dtype=dt) for n in sizes], [torch.ones(n, dtype=dt) for n in sizes]
        ops.multi_tensor_copy_(dst, src)
        assert all(torch.equal(d, s) for d, s in zip(dst, src)), f"multi_tensor_copy_ of {dt}"


def lowbit_tables(signed):
    """Tables shaped as the lowbit ops read them ([states, 2, 256]: magnitudes, then thresholds), a linear
    map per list: the sweep checks the kernels against the CPU ops on the same tables, so any increasing map
    will do, and this module imports nothing of fused_optim (the sanitizer run)."""
    out = torch.zeros(len(signed), 2, 256)
    for j, sgn in enumerate(signed):
        n = 128 if sgn else 256
        mags = torch.linspace(0, 1, n)
        out[j, 0, :n] = mags
        out[j, 1, :n - 1] = (mags[1:] + mags[:-1]) / 2
    return out


def lowbit_sweep(ops, sizes=(5, 1030)):
    """The lowbit ops (each rule's ``<name>lowbit_``, Adan's, Gravity's, NeuroOptima's, Muon's) for every param
    storage type, AMP and not (where the op takes it), every state format: fp32 state with stochastically
    rounded params, bf16, 8-bit."""
    g = torch.Generator().manual_seed(11)

    def state(fmt, positive):
        if fmt == 2:
            return [torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) for n in sizes]
        x = [torch.rand(n, generator=g) + 0.5 if positive else torch.randn(n, generator=g) for n in sizes]
        return [t.to(torch.bfloat16) if fmt == 1 else t for t in x]

    for p_dt in (torch.float32, torch.bfloat16, torch.float16):
        for amp in (False, True):
            gs, fi = (torch.full((1,), 2.0), torch.zeros(1)) if amp else (None, None)
            for fmt in (0, 1, 2):
                for name in elementwise_ops():
                    rule = name[:-1]
                    args = getattr(torch.ops.fused_optim_emu, f"{rule}_lowbit_").default._schema.arguments
                    kinds = [str(a.type) for a in args[:[a.name for a in args].index("maximize")]]
                    n_states = kinds.count("List[Tensor]") - 3  # params, grads, absmax
                    _call_lowbit(ops, f"{rule}_lowbit_", [False] * n_states, fmt, p_dt, sizes, state, g,
                                 [0.1] * (kinds.count("float")), [False] * (kinds.count("bool") - 1), gs, fi)
                # Adan: the second moment non-negative (its unsigned map)
                _call_lowbit(ops, "adan_lowbit_", [True, False, True, True], fmt, p_dt, sizes, state, g,
                             [1e-3, 0.98, 0.92, 0.99, 0.1, 0.1, 0.3, 1e-8, 0.02], [False, None], gs, fi)
                # Gravity: the per-tensor max|g| (stats column 0) before the floats
                _call_lowbit(ops, "gravity_lowbit_", [True], fmt, p_dt, sizes, state, g, [1e-3, 0.9], [], gs, fi,
                             stats=True)
                if not amp:  # NeuroOptima's core takes no AMP arguments (the grads are only read)
                    _call_lowbit(ops, "neuro_optima_lowbit_", [True, False, True, True], fmt, p_dt, sizes, state, g,
                                 [1e-3, 0.9, 0.99, 1e-8, 0.02], [], None, None, amp_args=False)
    # Muon's stages: the momentum stage (bf16 Newton-Schulz input) for every grad dtype and buffer format,
    # the apply stage (stochastically rounded params) for every (param, update) dtype pair
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    for g_dt in dtypes:
        for fmt in (0, 1, 2):
            gr = [torch.randn(n, generator=g).to(g_dt) for n in sizes]
            absmax = [torch.rand((n + 255) // 256, generator=g) + 0.5 for n in sizes] if fmt == 2 else []
            tables = lowbit_tables([True]) if fmt == 2 else torch.zeros(0)
            ops.muon_momentum_lowbit_(gr, state(fmt, False), [torch.empty(n, dtype=torch.bfloat16) for n in sizes],
                                      absmax, tables, [1], fmt, False, 3, 7, None, [0, 1], 0.95, True, False)
    for p_dt in dtypes:
        for u_dt in dtypes:
            ops.muon_apply_lowbit_([torch.randn(n, generator=g).to(p_dt) for n in sizes],
                                   [torch.randn(n, generator=g).to(u_dt) for n in sizes], [], torch.zeros(0), [], 0,
                                   True, 3, 7, None, [0, 1], [1.0, 2.0], 1e-3, 0.1)


def _call_lowbit(ops, op, signed, fmt, p_dt, sizes, state, g, floats, flags, gs, fi, stats=False, amp_args=True):
    p = [torch.randn(n, generator=g).to(p_dt) for n in sizes]
    gr = [torch.randn(n, generator=g).to(p_dt) for n in sizes]
    before = ()
    if stats:
        st = torch.zeros(len(sizes), 3)
        st[:, 0] = torch.stack([t.float().abs().amax() for t in gr])
        before = (st,)
    states = [state(fmt, not sgn) for sgn in signed]
    absmax = [torch.rand((n + 255) // 256, generator=g) + 0.5 for _ in signed for n in sizes] if fmt == 2 else []
    tables = lowbit_tables(signed) if fmt == 2 else torch.zeros(0)
    getattr(ops, op)(p, gr, *states, absmax, tables, [int(x) for x in signed], fmt, fmt != 1, 3, 7, None, [0, 1],
                     *before, *floats, *flags, False, *((gs, fi) if amp_args else ()))
