"""The compiled extension (csrc/): loaded from an ahead-of-time build, or JIT-built on first use.

Order: `fused_optim._C` (built by `pip install --no-build-isolation .`, see setup.py), else a JIT
build of csrc/ with ninja through `torch.utils.cpp_extension.load`, cached under
`TORCH_EXTENSIONS_DIR` (default `~/.cache/torch_extensions`) and rebuilt only when a source or a
flag changes. The CUDA sources are compiled only when nvcc and a CUDA build of torch are present.

Nothing here runs at `import fused_optim`; the first `status()` / `ops()` call builds or loads, and
a failed build is recorded (with the compiler's output) instead of raised, so auto mode can fall
back to foreach with one warning while `impl="native"` raises with the error.

Environment: MAX_JOBS (parallel compiler jobs; default 2 here, the build is memory- and
CPU-heavy), TORCH_EXTENSIONS_DIR (cache), TORCH_CUDA_ARCH_LIST (CUDA targets; default: the visible
GPUs, or 9.0 when none is visible), CUDA_HOME (toolkit root; default: found from nvcc's real
path), FUSED_OPTIM_WITH_CUDA=0 (skip the CUDA sources), FUSED_OPTIM_NO_JIT=1 (never JIT-build),
FUSED_OPTIM_VERBOSE=1 (show the compiler commands).
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

from ._backends import ImplStatus
from ._ext_flags import DEFAULT_CUDA_ARCH, cuda_toolkit_root, cxx_flags, nvcc_flags, sources, want_cuda

__all__ = ["status", "ops", "load", "loaded", "csrc_dir"]

_ERROR_TAIL = 3000  # characters of compiler output kept in the error message

_lock = threading.Lock()
_loaded: str | None = None        # "aot" or "jit" once the ops are registered
_error: str | None = None         # why loading failed (with the compiler tail)
_cuda_error: str | None = None    # why the CUDA kernels are missing while the CPU ones loaded
_warned = False


def csrc_dir() -> Path:
    """Where the JIT build reads the sources: fused_optim/csrc in an installed package (setup.py
    ships them there), else csrc/ next to the package in a source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "csrc"
    return installed if (installed / "fused_optim.cpp").exists() else here.parent / "csrc"


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _ERROR_TAIL else "...\n" + text[-_ERROR_TAIL:]


def _jit_build(with_cuda: bool) -> None:
    root = csrc_dir()
    if not (root / "fused_optim.cpp").exists():
        raise RuntimeError(f"the C++ sources are not installed ({root} is missing); reinstall from a source "
                           "checkout or build ahead of time with `pip install --no-build-isolation .`")
    os.environ.setdefault("MAX_JOBS", "2")
    kwargs: dict = {}
    if with_cuda:
        # torch guesses CUDA_HOME once, when cpp_extension is imported, from the PATH (wrong for a
        # wrapper or symlinked nvcc): give it the real toolkit root, in the environment and the module
        root_cuda = cuda_toolkit_root()
        os.environ.setdefault("CUDA_HOME", root_cuda)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH  # nothing visible to target
        kwargs["extra_cuda_cflags"] = nvcc_flags()
    from torch.utils import cpp_extension

    if with_cuda:
        cpp_extension.CUDA_HOME = root_cuda
    cpp_extension.load(
        name="fused_optim_native_cuda" if with_cuda else "fused_optim_native_cpu",
        sources=sources(with_cuda, root),
        extra_cflags=cxx_flags(),
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(root)],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("FUSED_OPTIM_VERBOSE", "0") not in ("", "0"),
        **kwargs,
    )


def _error_text(exc: BaseException) -> str:
    """The exception and the compiler's output: torch puts ninja's output into the RuntimeError's
    message (not in verbose mode: it went to the console), a CalledProcessError carries it."""
    parts = [f"{type(exc).__name__}: {exc}"]
    out = getattr(exc, "output", None) or getattr(exc.__cause__, "output", None)
    if isinstance(out, (bytes, bytearray)):
        out = out.decode(errors="replace")
    if out and out.strip() not in parts[0]:
        parts.append(out)
    return _tail("\n".join(parts))


def load() -> ImplStatus:
    """Register the ops (AOT build, else JIT); idempotent and thread-safe. Never raises."""
    global _loaded, _error, _cuda_error
    with _lock:
        if _loaded is not None:
            return ImplStatus(True, "")
        if _error is not None:
            return ImplStatus(False, _error)
        try:
            import fused_optim._C  # noqa: F401  (ahead-of-time build: registers the ops on import)

            _loaded = "aot"
            return ImplStatus(True, "")
        except ImportError:
            pass
        if os.environ.get("FUSED_OPTIM_NO_JIT", "0") not in ("", "0"):
            _error = ("the extension is not built ahead of time and FUSED_OPTIM_NO_JIT is set; build it with "
                      "`pip install --no-build-isolation .`")
            return ImplStatus(False, _error)
        with_cuda, why_not = want_cuda()
        if not with_cuda:
            _cuda_error = f"the CUDA kernels were not built: {why_not}"
        try:
            _jit_build(with_cuda)
        except Exception as exc:  # a failed build must never break the optimizer
            if not with_cuda:
                _error = "building the native extension failed: " + _error_text(exc)
                return ImplStatus(False, _error)
            _cuda_error = "building the CUDA kernels failed: " + _error_text(exc)
            try:  # keep the CPU kernels when only the CUDA part does not build
                _jit_build(False)
            except Exception as exc_cpu:
                _error = "building the native extension failed: " + _error_text(exc_cpu)
                return ImplStatus(False, _error)
        _loaded = "jit"
        return ImplStatus(True, "")


def loaded() -> bool:
    """Whether the ops are registered already (never builds)."""
    return _loaded is not None


def _has_kernel(op: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_optim::{op}", key)


def status(device_type: str) -> ImplStatus:
    """Can the native kernels run on `device_type`? Builds or loads on first call; never raises."""
    global _warned
    st = load()
    if not st.available:
        if not _warned:
            _warned = True
            warnings.warn(f"fused_optim: the native extension is unavailable, falling back to other impls. "
                          f"{st.reason}", RuntimeWarning, stacklevel=3)
        return st
    if device_type == "cpu":
        return ImplStatus(True, "")
    if device_type == "cuda":
        if not _has_kernel("lion_", "CUDA"):
            return ImplStatus(False, _cuda_error or "the extension was built without its CUDA kernels")
        if not torch.cuda.is_available():
            return ImplStatus(False, "no CUDA device is available")
        return ImplStatus(True, "")
    return ImplStatus(False, f"the native kernels are built for cpu and cuda, not {device_type!r}")


def ops():
    """`torch.ops.fused_optim`, loading the extension first; raises with the build error if it failed."""
    st = load()
    if not st.available:
        raise RuntimeError(f"fused_optim native extension: {st.reason}")
    return torch.ops.fused_optim


#: every op of csrc/fused_optim.cpp (the report below lists those with a CPU kernel)
OPS = ("multi_tensor_stats", "gravity_", "lion_", "adan_", "gradient_equilibrium_", "multi_tensor_l2norm",
       "multi_tensor_copy_", "lookahead_sync_", "sam_perturb_", "muon_momentum_", "muon_apply_", "neuro_optima_")


def _main() -> int:
    """`python -m fused_optim._ext`: build or load now and report; exit 1 if the extension, or its
    CUDA part where nvcc and a CUDA torch are present, did not build (CI runs this)."""
    st = load()
    if not st.available:
        print(f"fused_optim native extension: FAILED\n{st.reason}")
        return 1
    wanted, why_not = want_cuda()
    cuda = _has_kernel("lion_", "CUDA")
    ops_cpu = [op for op in OPS if _has_kernel(op, "CPU")]
    print(f"fused_optim native extension: loaded ({_loaded}); CPU kernels: {', '.join(ops_cpu)}; "
          f"CUDA kernels: {'yes' if cuda else 'no - ' + (_cuda_error or why_not)}; "
          f"CUDA device: {'yes' if torch.cuda.is_available() else 'no'}")
    return 1 if wanted and not cuda else 0


if __name__ == "__main__":
    raise SystemExit(_main())
