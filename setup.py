"""Packaging. The compiled extension (csrc/) is optional: a plain install never fails.

The pure-Python package (forloop/foreach/triton impls) always installs, and the C++/CUDA sources ship
inside it (fused_optim/csrc) so that `impl="native"` can JIT-build them on first use
(fused_optim/_ext.py). Ahead of time:

    pip install --no-build-isolation .        # needs torch installed first (the build links to it)

builds `fused_optim._C`: a CUDAExtension when the CUDA kernels are wanted (a CUDA device is visible,
or TORCH_CUDA_ARCH_LIST / FUSED_OPTIM_WITH_CUDA=1 asks for them) and a CUDA toolkit (CUDA_HOME, or
nvcc on the PATH) and a CUDA build of torch are present, else a CppExtension (the rule of
fused_optim/_ext_flags.py's want_cuda, shared with the JIT build). With build isolation (plain
`pip install .`) torch is not importable here and only the Python package installs. Switches:
  FUSED_OPTIM_BUILD=0      skip the ahead-of-time build
  FUSED_OPTIM_WITH_CUDA=0  build the CPU kernels only (=1: the CUDA ones too, without a visible GPU)
  FUSED_OPTIM_PORTABLE=1   no -march=native / AVX2 (a binary for other machines; the CPU kernels are
                           then much slower, see bench/NOTES.md)
  MAX_JOBS, TORCH_CUDA_ARCH_LIST as for any torch extension.
A compiler error never fails the install (the extension is optional); `fused_optim.available_impls()`
then falls back to the JIT build.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


class BuildPyWithSources(build_py):
    """Ship csrc/ as fused_optim/csrc, where fused_optim/_ext.py looks for the JIT build's sources."""

    def run(self):
        super().run()
        if CSRC.is_dir():
            dest = Path(self.build_lib) / "fused_optim" / "csrc"
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(CSRC, dest)


def _extensions():
    if os.environ.get("FUSED_OPTIM_BUILD", "1") == "0" or not CSRC.is_dir():
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # build isolation: torch is not visible here, install the Python package only
        return [], {}
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fo_ext_flags", ROOT / "fused_optim" / "_ext_flags.py")
    flags = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flags)

    portable = os.environ.get("FUSED_OPTIM_PORTABLE", "0") not in ("", "0")
    with_cuda, _ = flags.want_cuda()
    sources = [os.path.relpath(s, ROOT) for s in flags.sources(with_cuda, CSRC)]
    extra = {"cxx": flags.cxx_flags(native=not portable)}
    if with_cuda:
        cpp_extension.CUDA_HOME = flags.cuda_toolkit_root()
        os.environ.setdefault("CUDA_HOME", cpp_extension.CUDA_HOME)
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = flags.DEFAULT_CUDA_ARCH
        extra["nvcc"] = flags.nvcc_flags()
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    ext = ext_cls("fused_optim._C", sources, include_dirs=[str(CSRC)], extra_compile_args=extra,
                  extra_link_args=["-fopenmp"], define_macros=[("FUSED_OPTIM_PYTHON_MODULE", None)])
    ext.optional = True  # a compiler error must not fail the install: the JIT build remains
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _extensions()
cmdclass["build_py"] = BuildPyWithSources
setup(ext_modules=ext_modules, cmdclass=cmdclass)
