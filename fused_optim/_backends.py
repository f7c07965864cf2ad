"""Which implementations can run where, and why the others cannot.

Nothing here imports triton or builds the extension at import time: each probe runs on first use and
its answer is cached, so `import fused_optim` stays cheap and never fails.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ._status import ImplStatus

IMPLS = ("forloop", "foreach", "triton", "native")


_TRITON_IMPORT: list[ImplStatus] = []  # the probe's answer, once known


def _triton_import() -> ImplStatus:
    # A plain module-level cache rather than functools.lru_cache: Dynamo traces through lru_cache into
    # import_module (a graph break in torch.compile(opt.step)); a filled list is a constant to it.
    if not _TRITON_IMPORT:
        _TRITON_IMPORT.append(_probe_triton_import())
    return _TRITON_IMPORT[0]


def _probe_triton_import() -> ImplStatus:
    if importlib.util.find_spec("triton") is None:
        return ImplStatus(False, "triton is not installed (pip install triton)")
    try:
        importlib.import_module("triton")
    except Exception as exc:  # a broken install must not break the optimizer
        return ImplStatus(False, f"import triton failed: {type(exc).__name__}: {exc}")
    if importlib.util.find_spec("fused_optim.kernels") is None:
        return ImplStatus(False, "this build of fused_optim has no Triton kernels (fused_optim/kernels)")
    return ImplStatus(True, "")


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_status(device_type: str) -> ImplStatus:
    st = _triton_import()
    if not st.available:
        return st
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return ImplStatus(False, "no CUDA device is available")
        return ImplStatus(True, "")
    if device_type == "cpu":
        if triton_interpreted():
            return ImplStatus(True, "interpreted (TRITON_INTERPRET=1): for tests, slow")
        return ImplStatus(False, "Triton runs on CPU tensors only under TRITON_INTERPRET=1 "
                                 "(set before triton is imported); use impl='native' or 'foreach' on CPU")
    return ImplStatus(False, f"Triton kernels are not built for device type {device_type!r}")


def native_status(device_type: str) -> ImplStatus:
    if importlib.util.find_spec("fused_optim._ext") is None:
        return ImplStatus(False, "this build of fused_optim has no native extension (csrc/)")
    from fused_optim import _ext

    return _ext.status(device_type)


def impl_status(impl: str, device_type: str) -> ImplStatus:
    if impl in ("forloop", "foreach"):
        return ImplStatus(True, "")
    if impl == "triton":
        return triton_status(device_type)
    if impl == "native":
        return native_status(device_type)
    raise ValueError(f"Invalid impl: {impl!r} (expected one of {IMPLS} or None)")


def available_impls(device: str | torch.device | None = None) -> dict[str, ImplStatus]:
    """What can run on `device` (default: CUDA if present, else CPU) and, for the rest, why not.

    >>> fused_optim.available_impls("cpu")["native"]
    ImplStatus(available=True, reason='')
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    return {impl: impl_status(impl, device_type) for impl in IMPLS}


def auto_impl(device_type: str) -> str:
    """docs/spec.md §0 auto mode: CUDA -> triton, else native, else foreach; CPU -> native if built, else foreach.

    Interpreted Triton is never chosen automatically: it is a test vehicle, not a fast path.
    """
    order = ("triton", "native") if device_type == "cuda" else ("native",)
    for impl in order:
        if impl_status(impl, device_type).available:
            return impl
    return "foreach"


def best_fused_impl(device_type: str) -> str:
    """`fused=True`: the fastest compiled impl for the device; raises with the reasons if none can run."""
    order = ("triton", "native") if device_type == "cuda" else ("native",)
    reasons = []
    for impl in order:
        st = impl_status(impl, device_type)
        if st.available:
            return impl
        reasons.append(f"{impl}: {st.reason}")
    raise RuntimeError(f"fused=True but no fused implementation can run on {device_type}: "
                       + "; ".join(reasons) + ". Use impl='foreach', or build the extension "
                       "(pip install --no-build-isolation -e .)")
