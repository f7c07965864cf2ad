"""Packaging. The compiled extension (csrc/) is optional: a plain install never fails.

The pure-Python package (forloop/foreach/triton impls) always installs. The native extension is built
ahead of time only when asked (FUSED_OPTIM_BUILD=1) or when csrc/ exists and a toolchain is present;
FUSED_OPTIM_BUILD=0 skips it. Without it, `impl="native"` JIT-builds on first use (see fused_optim/_ext.py).
"""
from setuptools import setup

setup()
