"""Triton multi-tensor kernels: one launch per (device, dtype) group (docs/spec.md §0).

Importing this package does not import triton: the optimizers reference their launchers lazily (an
`Impl` of their declaration, ``"fused_optim.kernels.<module>:<launcher>"``, fused_optim/declaration.py),
and `lazy` turns such a reference into a function that imports the kernel module on its first call,
in the flavour `kernel_module` picks. Each launcher has exactly the signature of the optimizer's
reference (``_forloop_x``); the kernel and the launcher live in one file per optimizer, the shared
tables in `multi_tensor.py`. What each launcher supports (AMP, tensor lr, capturable) is said by the
declaration, not here.

The composites' fused parts (`lookahead.py`, `sam.py`, `muon.py` here) follow the functional
interface the composite classes call (``_triton_lookahead_sync``, ``_triton_sam_norms`` / ``_perturb`` /
``_restore``, ``_triton_muon_momentum`` / ``_apply``); they take no grad scale (the composites run
after the base optimizer's unscale, or around it).

This package is the kernel layer: it imports nothing of the API layer (docs/design.md, "Layers").
"""
from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable


def kernel_module(name: str):
    """Import the kernel module `name` of this package decorated in the same flavour (compiled or
    interpreted) as `multi_tensor`, whose jit helpers its kernels call.

    `triton.jit` reads TRITON_INTERPRET when it decorates. A test that sets the variable for itself
    would otherwise import a kernel module interpreted on top of a compiled `multi_tensor` (or the
    reverse), and the kernel would fail calling a helper of the other flavour."""
    full = f"{__name__}.{name}"
    mod = sys.modules.get(full)
    if mod is not None:
        return mod
    from . import multi_tensor as mt

    with mt._interpret_scope(mt._is_interpreted(mt._chunk_coords)):
        return importlib.import_module(full)


def lazy(module: str, attr: str) -> Callable[..., object]:
    """``kernel_module(module).<attr>`` as a function that imports the kernel module (and triton) on its
    first call, never before. Looked up on every call: `kernel_module` may hand out another flavour
    after a test drops the module."""
    def launcher(*args, **kwargs):
        return getattr(kernel_module(module), attr)(*args, **kwargs)

    launcher.__name__ = launcher.__qualname__ = attr
    launcher.__module__ = f"{__name__}.{module}"
    launcher.__doc__ = f"Lazy reference to `{__name__}.{module}.{attr}` (imported on the first call)."
    return launcher


@functools.cache
def resolve(ref: str) -> Callable[..., object]:
    """The function a declaration's ``"fused_optim.kernels.<module>:<attr>"`` reference names, lazily;
    one function per reference (the same object each time)."""
    module, _, attr = ref.partition(":")
    prefix = f"{__name__}."
    if not module.startswith(prefix) or not attr:
        raise ValueError(f"not a kernel reference: {ref!r} (expected '{prefix}<module>:<launcher>')")
    return lazy(module[len(prefix):], attr)


# the composites' fused parts, called by the composite classes
_triton_lookahead_sync = resolve("fused_optim.kernels.lookahead:_triton_lookahead_sync")
_triton_sam_norms = resolve("fused_optim.kernels.sam:_triton_sam_norms")
_triton_sam_perturb = resolve("fused_optim.kernels.sam:_triton_sam_perturb")
_triton_sam_restore = resolve("fused_optim.kernels.sam:_triton_sam_restore")
_triton_muon_momentum = resolve("fused_optim.kernels.muon:_triton_muon_momentum")
_triton_muon_apply = resolve("fused_optim.kernels.muon:_triton_muon_apply")

__all__ = ["_triton_lookahead_sync", "_triton_muon_apply", "_triton_muon_momentum", "_triton_sam_norms",
           "_triton_sam_perturb", "_triton_sam_restore", "kernel_module", "lazy", "resolve"]
