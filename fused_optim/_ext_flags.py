"""Sources and compiler flags of the native extension, shared by the JIT build (fused_optim/_ext.py)
and the ahead-of-time one (setup.py, which loads this file by path: keep it free of package imports).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

DEFAULT_CUDA_ARCH = "9.0"  # when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: one arch, short build


def sources(with_cuda: bool, root: Path) -> list[str]:
    files = [root / "fused_optim.cpp", *sorted((root / "cpu").glob("*.cpp"))]
    if with_cuda:
        files += sorted((root / "cuda").glob("*.cu"))
    return [str(f) for f in files]


def cxx_flags(native: bool = True) -> list[str]:
    """Host compiler flags. at::vec::Vectorized<float> is a scalar emulation and at::parallel_for is
    serial unless the translation unit gets a CPU capability (csrc/cpu/capability.h derives it from
    the -march target) and OpenMP (docs/toolchain.md: 636 ms vs 35 ms for a Lion step on GPT-2 small).
    -ffp-contract=off stops the compiler from fusing a*b+c where
    torch rounds twice, so fp32 results match the reference bit for bit. `native=False` (portable
    builds) drops -march=native, hence the vector capability: correct on any x86-64, much slower."""
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if native and sys.platform.startswith("linux") and platform.machine().lower() in ("x86_64", "amd64"):
        flags += ["-march=native"]  # csrc/cpu/capability.h then picks AVX512 or AVX2 for at::vec
    return flags


def nvcc_flags() -> list[str]:
    """torch adds the C++ standard and the -gencode list. No --use_fast_math: it would change the
    division and sqrt roundings the reference relies on."""
    return ["-O3", "--expt-relaxed-constexpr"]


def cuda_toolkit_root() -> str | None:
    """CUDA_HOME if set, else the toolkit root of the nvcc on the PATH. torch's own guess (the parent of
    `which nvcc`) is wrong for a symlinked or wrapper nvcc such as /usr/local/bin/nvcc, and the link
    then fails with `cannot find -lcudart`: take nvcc's real path, and if that is not a toolkit (a
    wrapper script), ask nvcc itself where it lives (`--dryrun` prints its TOP directory)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        return None
    root = Path(os.path.realpath(nvcc)).parent.parent
    if _is_toolkit(root):
        return str(root)
    try:
        out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True,
                             timeout=60)
        for line in (out.stdout + out.stderr).splitlines():
            if line.startswith("#$ TOP="):
                top = Path(os.path.realpath(line.split("=", 1)[1].strip()))  # <root>/bin/..
                if _is_toolkit(top):
                    return str(top)
    except (OSError, subprocess.SubprocessError):
        pass
    return str(root)


def _is_toolkit(root: Path) -> bool:
    return (root / "bin" / "nvcc").exists() and ((root / "include" / "cuda_runtime.h").exists()
                                                 or any(root.glob("targets/*/include/cuda_runtime.h")))


def want_cuda() -> tuple[bool, str]:
    """Build the CUDA sources? Asked for (FUSED_OPTIM_WITH_CUDA=1, or TORCH_CUDA_ARCH_LIST naming the
    targets) or a CUDA device visible, and then only with nvcc and a CUDA build of torch. Compiling
    them takes longer than the CPU part, so a machine with a toolkit but no GPU skips them unless asked.
    Returns (build them, why not)."""
    import torch

    switch = os.environ.get("FUSED_OPTIM_WITH_CUDA", "").strip()
    if switch == "0":
        return False, "FUSED_OPTIM_WITH_CUDA=0"
    if switch not in ("", "1"):
        raise ValueError(f"FUSED_OPTIM_WITH_CUDA={switch!r}: use 1 (build the CUDA kernels), 0 (skip them) "
                         "or leave it unset (build them where a CUDA device is visible)")
    asked = switch == "1" or bool(os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip())
    if torch.version.cuda is None:
        return False, "this torch is not a CUDA build"
    if not asked and not torch.cuda.is_available():
        return False, ("no CUDA device is visible (set TORCH_CUDA_ARCH_LIST or FUSED_OPTIM_WITH_CUDA=1 "
                       "to build them anyway)")
    root = cuda_toolkit_root()
    if root is None or not os.path.exists(os.path.join(root, "bin", "nvcc")):
        return False, "nvcc was not found (set CUDA_HOME to the CUDA toolkit root)"
    return True, ""
