"""The compiled extension (csrc/): loaded from an ahead-of-time build, or JIT-built on first use.

Order: `fused_optim._C` (built by `pip install --no-build-isolation .`, see setup.py), else a JIT
build of csrc/ with ninja through `torch.utils.cpp_extension.load`.

The JIT cache is content-addressed: a build lives in `<cache>/fused_optim_<cpu|cuda>_<hash>`, the
hash covering the sources, the flags, the compiler, torch, Python, the CUDA toolkit and targets, and
the CPU (`-march=native`). Two checkouts, versions or virtual environments therefore never rebuild
each other's copy (the same sources share one), and a finished build is loaded straight from its
directory without running ninja. Builds compile a snapshot of the sources copied into that directory,
under an exclusive file lock: a second process waits for the first and then loads its result, and a
build killed half way is resumed by the next one. The cache root is `TORCH_EXTENSIONS_DIR`, default
`~/.cache/torch_extensions`; delete `fused_optim_*` there to reclaim the space of old versions.

A build announces itself on stderr (what it compiles, about how long, where it is cached) and says
when it is done. Nothing here runs at `import fused_optim`; the first `status()` / `ops()` call builds
or loads, and a failed build is recorded (with the compiler's output) instead of raised, so auto mode
can fall back to foreach with one warning while `impl="native"` raises with the error.

The CUDA sources are compiled where a CUDA device is visible, or when asked for with
TORCH_CUDA_ARCH_LIST or FUSED_OPTIM_WITH_CUDA=1 (and then only with nvcc and a CUDA build of torch).

Environment: MAX_JOBS (parallel compiler jobs; default: the cores, at most 4 - each job needs ~1 GB),
TORCH_EXTENSIONS_DIR (cache root), TORCH_CUDA_ARCH_LIST (CUDA targets; default: the visible GPUs, or
9.0 when none is visible), CUDA_HOME (toolkit root; default: found from nvcc's real path),
FUSED_OPTIM_WITH_CUDA=1/0 (build / skip the CUDA sources), FUSED_OPTIM_NO_JIT=1 (never JIT-build),
FUSED_OPTIM_VERBOSE=1 (show the compiler commands).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import platform
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from ._ext_flags import DEFAULT_CUDA_ARCH, cuda_toolkit_root, cxx_flags, nvcc_flags, sources, want_cuda
from ._status import ImplStatus

__all__ = ["status", "ops", "load", "loaded", "csrc_dir", "probe", "buildable", "BuildSpec", "build_spec"]

_ERROR_TAIL = 3000  # characters of compiler output kept in the error message

_lock = threading.Lock()
_loaded: str | None = None        # "aot" or "jit" once the ops are registered
_error: str | None = None         # why loading failed (with the compiler tail)
_cuda_error: str | None = None    # why the CUDA kernels are missing while the CPU ones loaded
_warned = False
_where: str = ""                  # the loaded library's file

_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
_LDFLAGS = ["-fopenmp"]
_DONE = "build-complete"  # written into a build directory once its library is linked and loads

# Compiler CPU-seconds of one build, measured on the 2-core AMD EPYC of bench/NOTES.md ("Build time"):
# the CPU part's four translation units add up to ~CPU_CORE_S, the longest ~CPU_LONGEST_S; the CUDA part
# is one nvcc job of ~CUDA_ARCH_CORE_S per target architecture. Only for the announcement's estimate.
CPU_CORE_S, CPU_LONGEST_S, CUDA_ARCH_CORE_S = 56.0, 16.0, 120.0


def csrc_dir() -> Path:
    """Where the JIT build reads the sources: fused_optim/csrc in an installed package (setup.py
    ships them there), else csrc/ next to the package in a source checkout."""
    here = Path(__file__).resolve().parent
    installed = here / "csrc"
    return installed if (installed / "fused_optim.cpp").exists() else here.parent / "csrc"


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _ERROR_TAIL else "...\n" + text[-_ERROR_TAIL:]


def cache_root() -> Path:
    """TORCH_EXTENSIONS_DIR, else torch's default (~/.cache/torch_extensions, XDG_CACHE_HOME honoured)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "torch_extensions"


def _max_jobs() -> int:
    return int(os.environ.get("MAX_JOBS") or min(4, os.cpu_count() or 1))


def _cpu_signature() -> str:
    """-march=native ties a binary to the CPU's instruction set: a cache shared by machines of several
    CPU families (a home directory on NFS) must keep one build per family."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _cuda_arch_list() -> str:
    """The CUDA targets the build compiles for (torch reads TORCH_CUDA_ARCH_LIST, else the visible GPUs)."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return ";".join(f"{a}.{b}" for a, b in caps)
    return DEFAULT_CUDA_ARCH


class BuildSpec(NamedTuple):
    """One JIT build: what it compiles, with which flags, and where its cache directory is."""

    name: str                 # fused_optim_<cpu|cuda>_<hash>: the library's name, and its directory's
    directory: Path
    files: dict[str, bytes]   # csrc-relative path -> content: the snapshot that is compiled
    sources: list[str]        # csrc-relative paths of the translation units
    with_cuda: bool
    cflags: list[str]
    cuda_cflags: list[str]
    cuda_home: str | None
    cuda_arch_list: str | None


def build_spec(with_cuda: bool, root: Path | None = None) -> BuildSpec:
    """The build of `root` (default: csrc_dir()) and its hash-named cache directory. Reads the sources,
    compiles nothing."""
    root = Path(root) if root is not None else csrc_dir()
    if not (root / "fused_optim.cpp").exists():
        raise RuntimeError(f"the C++ sources are not installed ({root} is missing); reinstall from a source "
                           "checkout or build ahead of time with `pip install --no-build-isolation .`")
    files = {}
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).as_posix()
        if f.is_file() and f.suffix in _SOURCE_SUFFIXES and (with_cuda or not rel.startswith("cuda/")):
            files[rel] = f.read_bytes()
    srcs = [Path(s).relative_to(root).as_posix() for s in sources(with_cuda, root)]
    cflags = cxx_flags()
    cuda_cflags = nvcc_flags() if with_cuda else []
    cuda_home = cuda_toolkit_root() if with_cuda else None
    arch = _cuda_arch_list() if with_cuda else None
    h = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), f"{sys.version_info[0]}.{sys.version_info[1]}",
                 sys.platform, os.environ.get("CXX", "c++"), _cpu_signature(), repr(cflags), repr(_LDFLAGS),
                 repr(cuda_cflags), str(cuda_home), str(arch), repr(srcs)):
        h.update(part.encode() + b"\0")
    for rel, data in files.items():
        h.update(rel.encode() + b"\0" + hashlib.sha256(data).digest())
    name = f"fused_optim_{'cuda' if with_cuda else 'cpu'}_{h.hexdigest()[:16]}"
    return BuildSpec(name, cache_root() / name, files, srcs, with_cuda, cflags, cuda_cflags, cuda_home, arch)


def _library(spec: BuildSpec) -> Path:
    return spec.directory / f"{spec.name}.so"


def _is_built(spec: BuildSpec) -> bool:
    return (spec.directory / _DONE).exists() and _library(spec).exists()


@contextlib.contextmanager
def _file_lock(path: Path, on_wait=None):
    """An exclusive lock on `path`, held until the block ends or the process dies (flock: a killed
    build leaves no stale lock behind, unlike torch's lock file). `on_wait()` runs once if another
    process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # no flock here (Windows): torch's own lock file still guards the build dir
            yield
            return
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _say(msg: str) -> None:
    print(f"fused_optim: {msg}", file=sys.stderr, flush=True)


def _describe(spec: BuildSpec) -> str:
    """What a build compiles and about how long it takes here (on an otherwise idle machine)."""
    jobs = max(1, min(_max_jobs(), os.cpu_count() or 1))
    total, longest = CPU_CORE_S, CPU_LONGEST_S
    what = "the native CPU kernels"
    if spec.with_cuda:
        n_arch = len([a for a in spec.cuda_arch_list.replace(",", ";").replace(" ", ";").split(";") if a])
        cuda = CUDA_ARCH_CORE_S * max(1, n_arch)
        total, longest = total + cuda, max(longest, cuda)
        what = f"the native CPU and CUDA kernels (CUDA targets {spec.cuda_arch_list})"
    est = max(total / jobs, longest)
    took = f"about {round(est / 60)} min" if est >= 90 else f"about {max(10, round(est, -1)):.0f} s"
    return f"{what}, {took} with {jobs} compiler job{'s' if jobs > 1 else ''}"


def import_cpp_extension():
    """torch.utils.cpp_extension, imported without its `No CUDA runtime is found, using CUDA_HOME=...`
    line: torch prints it whenever a toolkit is installed on a machine without a GPU, which is the
    normal case for a CPU build here (a CUDA build without a GPU is asked for explicitly)."""
    if "torch.utils.cpp_extension" in sys.modules:
        return sys.modules["torch.utils.cpp_extension"]

    def not_the_notice(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")

    logger = logging.getLogger("torch.utils.cpp_extension")
    logger.addFilter(not_the_notice)
    out = io.StringIO()
    try:
        with contextlib.redirect_stderr(out):  # torch versions that print it
            from torch.utils import cpp_extension
    finally:
        logger.removeFilter(not_the_notice)
        rest = "".join(ln for ln in out.getvalue().splitlines(keepends=True)
                       if not ln.startswith("No CUDA runtime is found"))
        if rest:
            sys.stderr.write(rest)
    return cpp_extension


def _compile(spec: BuildSpec) -> None:
    """Compile and link spec's snapshot in its directory and load the library (the caller holds the lock)."""
    src = spec.directory / "src"
    if src.exists():  # a snapshot is only ever of the hashed content: rewrite it only if it differs
        if any(not (src / rel).is_file() or (src / rel).read_bytes() != data for rel, data in spec.files.items()):
            shutil.rmtree(src)
    if not src.exists():
        tmp = spec.directory / f"src.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, data in spec.files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(data)
        os.replace(tmp, src)
    # torch's own lock file: a build killed inside torch leaves it behind and the next one would wait on
    # it forever; under our lock nobody else is building here
    (spec.directory / "lock").unlink(missing_ok=True)
    os.environ.setdefault("MAX_JOBS", str(_max_jobs()))
    kwargs: dict = {}
    if spec.with_cuda:
        # torch guesses CUDA_HOME once, when cpp_extension is imported, from the PATH (wrong for a
        # wrapper or symlinked nvcc): give it the real toolkit root, in the environment and the module
        os.environ.setdefault("CUDA_HOME", spec.cuda_home)
        os.environ["TORCH_CUDA_ARCH_LIST"] = spec.cuda_arch_list
        kwargs["extra_cuda_cflags"] = spec.cuda_cflags
    cpp_extension = import_cpp_extension()
    if spec.with_cuda:
        cpp_extension.CUDA_HOME = spec.cuda_home
    cpp_extension.load(
        name=spec.name,
        sources=[str(src / rel) for rel in spec.sources],
        extra_cflags=spec.cflags,
        extra_ldflags=_LDFLAGS,
        extra_include_paths=[str(src)],
        build_directory=str(spec.directory),
        with_cuda=spec.with_cuda,
        is_python_module=False,
        verbose=os.environ.get("FUSED_OPTIM_VERBOSE", "0") not in ("", "0"),
        **kwargs,
    )


def _jit_build(with_cuda: bool) -> str:
    """Load the cached build of the current sources, or build it (announced, under the lock) and load it.
    Returns the library's path."""
    spec = build_spec(with_cuda)
    if _is_built(spec):
        torch.ops.load_library(str(_library(spec)))
        return str(_library(spec))
    spec.directory.mkdir(parents=True, exist_ok=True)
    lock = spec.directory.with_name(spec.name + ".lock")
    with _file_lock(lock, on_wait=lambda: _say(f"waiting for another process that is building the native "
                                                f"extension in {spec.directory}")):
        if _is_built(spec):  # the process we waited for built it
            torch.ops.load_library(str(_library(spec)))
            return str(_library(spec))
        _say(f"building {_describe(spec)}; once, then cached in {spec.directory}")
        t0 = time.perf_counter()
        _compile(spec)
        (spec.directory / _DONE).write_text(f"{spec.name}\n")
        _say(f"built the native extension in {time.perf_counter() - t0:.0f} s; cached in {spec.directory}")
    return str(_library(spec))


def buildable() -> ImplStatus:
    """Whether the extension is loaded or could be (an ahead-of-time build, or the sources with JIT builds
    allowed), without building or loading anything: not available only when it surely cannot be."""
    import importlib.util

    if _loaded is not None or _error is not None:
        return load()
    if importlib.util.find_spec("fused_optim._C") is not None:
        return ImplStatus(True, "built ahead of time")
    if os.environ.get("FUSED_OPTIM_NO_JIT", "0") not in ("", "0"):
        return ImplStatus(False, "not built ahead of time and FUSED_OPTIM_NO_JIT is set")
    if not (csrc_dir() / "fused_optim.cpp").exists():
        return ImplStatus(False, f"the C++ sources are not installed ({csrc_dir()} is missing)")
    return ImplStatus(True, "JIT-built on first use")


def probe(device_type: str = "cpu") -> ImplStatus:
    """What `status(device_type)` would say, without building anything: available once loaded, or when an
    ahead-of-time build or a finished JIT build of these sources exists; else not available, with what
    the first use would do."""
    if _loaded is not None or _error is not None:
        return status(device_type)
    import importlib.util

    aot = importlib.util.find_spec("fused_optim._C") is not None
    try:
        with_cuda, why_not = want_cuda()
        built = aot or _is_built(build_spec(with_cuda))
    except Exception as exc:
        return ImplStatus(False, f"{type(exc).__name__}: {exc}")
    if device_type not in ("cpu", "cuda"):
        return ImplStatus(False, f"the native kernels are built for cpu and cuda, not {device_type!r}")
    if device_type == "cuda" and not torch.cuda.is_available():
        return ImplStatus(False, "no CUDA device is available")
    if device_type == "cuda" and not aot and not with_cuda:
        return ImplStatus(False, f"the CUDA kernels are not built: {why_not}")
    if built:
        return ImplStatus(True, "built" + (" ahead of time" if aot else ", in the JIT cache"))
    if os.environ.get("FUSED_OPTIM_NO_JIT", "0") not in ("", "0"):
        return ImplStatus(False, "not built ahead of time and FUSED_OPTIM_NO_JIT is set")
    return ImplStatus(False, "not built yet: the first native step builds it (once, announced), or "
                             "`python -m fused_optim._ext` now")


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
    global _loaded, _error, _cuda_error, _where
    with _lock:
        if _loaded is not None:
            return ImplStatus(True, "")
        if _error is not None:
            return ImplStatus(False, _error)
        try:
            import fused_optim._C  # (ahead-of-time build: registers the ops on import)

            _loaded, _where = "aot", fused_optim._C.__file__
            return ImplStatus(True, "")
        except ImportError:
            pass
        if os.environ.get("FUSED_OPTIM_NO_JIT", "0") not in ("", "0"):
            _error = ("the extension is not built ahead of time and FUSED_OPTIM_NO_JIT is set; build it with "
                      "`pip install --no-build-isolation .`")
            return ImplStatus(False, _error)
        try:
            with_cuda, why_not = want_cuda()
        except ValueError as exc:  # a bad switch: say so, as a failed build would
            _error = str(exc)
            return ImplStatus(False, _error)
        if not with_cuda:
            _cuda_error = f"the CUDA kernels were not built: {why_not}"
        try:
            _where = _jit_build(with_cuda)
        except Exception as exc:  # a failed build must never break the optimizer
            if not with_cuda:
                _error = "building the native extension failed: " + _error_text(exc)
                return ImplStatus(False, _error)
            _cuda_error = "building the CUDA kernels failed: " + _error_text(exc)
            try:  # keep the CPU kernels when only the CUDA part does not build
                _where = _jit_build(False)
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


def op_names() -> list[str]:
    """Every op the loaded extension defines (csrc/ops_list.h and the elementwise rules), read from
    torch's registry rather than listed here, so a new rule shows up unchanged."""
    prefix = "fused_optim::"
    return sorted({n[len(prefix):].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith(prefix)})


def _main() -> int:
    """`python -m fused_optim._ext`: build or load now and report; exit 1 if the extension, or its
    CUDA part where nvcc and a CUDA torch are present, did not build (CI runs this)."""
    st = load()
    if not st.available:
        print(f"fused_optim native extension: FAILED\n{st.reason}")
        return 1
    wanted, why_not = want_cuda()
    cuda = _has_kernel("lion_", "CUDA")
    ops_cpu = [op for op in op_names() if _has_kernel(op, "CPU")]
    print(f"fused_optim native extension: loaded ({_loaded}: {_where}); CPU kernels: {', '.join(ops_cpu)}; "
          f"CUDA kernels: {'yes' if cuda else 'no - ' + (_cuda_error or why_not)}; "
          f"CUDA device: {'yes' if torch.cuda.is_available() else 'no'}")
    return 1 if wanted and not cuda else 0


if __name__ == "__main__":
    raise SystemExit(_main())
