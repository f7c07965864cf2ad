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


def sweep(ops):
    """One call of every op for every storage-type combination the host code dispatches to, AMP and not."""
    fp = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    sizes = (5, 1030)  # a vector body and a scalar tail

    def rnd(dt, positive=False):
        return [(torch.rand(n) + 0.5 if positive else torch.randn(n)).to(dt) for n in sizes]

    for p_dt in fp:
        m_dt = torch.float64 if p_dt == torch.float64 else torch.float32
        for s_dt in {p_dt, m_dt}:
            for amp in (False, True):
                scale = dict(grad_scale=torch.full((1,), 2.0), found_inf=torch.zeros(1)) if amp else {}
                gs, ga = (scale.get("grad_scale"), scale.get("found_inf"))
                p, g = rnd(p_dt), rnd(p_dt)
                stats = ops.multi_tensor_stats(g, p, 0.1, False, gs)
                ops.lion_(p, g, rnd(s_dt), 1e-3, 0.9, 0.99, 0.1, False, gs, ga)
                ops.gravity_(p, g, rnd(s_dt), stats, 1e-3, 0.9, False, gs, ga)
                ops.adan_(p, g, rnd(s_dt), rnd(s_dt, True), rnd(s_dt), rnd(s_dt), 1e-3, 0.98, 0.92, 0.99, 0.1, 0.1,
                          0.3, 1e-8, 0.02, False, None, False, gs, ga)
                ops.gradient_equilibrium_(p, g, stats, 1e-3, 0.0, False, gs, ga)
            ops.lookahead_sync_(rnd(p_dt), rnd(s_dt), 0.5)
            ops.neuro_optima_(rnd(p_dt), rnd(p_dt), rnd(s_dt), rnd(s_dt, True), rnd(s_dt), rnd(s_dt), 1e-3, 0.9,
                              0.99, 1e-8, 0.0, False)
            for u_dt in {torch.bfloat16, p_dt}:
                ops.muon_momentum_(rnd(p_dt), rnd(s_dt), rnd(u_dt), 0.95, True, False)
        for u_dt in {torch.bfloat16, p_dt}:
            ops.muon_apply_(rnd(p_dt), rnd(u_dt), [1.0, 2.0], 1e-3, 0.1)
        ops.multi_tensor_stats(rnd(p_dt))
        ops.multi_tensor_l2norm(rnd(p_dt))
        ops.multi_tensor_l2norm(rnd(p_dt), rnd(p_dt))
        ops.sam_perturb_(rnd(p_dt), rnd(p_dt), rnd(p_dt), torch.tensor(0.1, dtype=torch.float64 if p_dt ==
                                                                                torch.float64 else torch.float32),
                         True)
    for dt in (torch.uint8, torch.float16, torch.float32, torch.float64):
        ops.multi_tensor_copy_([torch.zeros(n, dtype=dt) for n in sizes], [torch.ones(n, dtype=dt) for n in sizes])
