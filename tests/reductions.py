"""Per-tensor reductions of a tensor list into one device fp32 buffer, with no host sync: the native
`multi_tensor_stats` op where it can run, else torch's multi-tensor norms.

A test helper, not library code: the library's fused paths compute these numbers inside their own
kernels (native: `multi_tensor_stats` then the update; Triton: `fused_optim/kernels/reduce.py`);
tests use this to check the native op's columns and the torch fallback against torch's reductions.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["OPS", "per_tensor_reduce"]

OPS = ("absmax", "sum", "sumsq")


_COLUMN = {"absmax": 0, "sum": 1, "sumsq": 2}
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _native_op():
    """The compiled reduction, or None while the extension is not loaded (this never builds it).

    `torch.ops.fused_optim.multi_tensor_stats` (csrc/fused_optim.cpp) computes all three statistics
    of every tensor in one pass (CPU: parallel over tensors and chunks; CUDA: one launch plus a small
    cleanup) into an [n, 3] buffer; this returns the requested column as fp32."""
    from fused_optim import _ext

    if not _ext.loaded():
        return None

    def reduce(tensors: list[Tensor], op: str) -> Tensor:
        flat = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
        device = flat[0].device
        if (not _ext.status(device.type).available or len({(t.device, t.dtype) for t in flat}) != 1
                or flat[0].dtype not in _NATIVE_DTYPES):
            return _torch_reduce(tensors, op, device)
        stats = torch.ops.fused_optim.multi_tensor_stats(flat)
        return stats[:, _COLUMN[op]].to(torch.float32, copy=True)

    return reduce


def per_tensor_reduce(tensors: Sequence[Tensor], op: str) -> Tensor:
    """``out[i] = op(tensors[i])`` for every tensor, as one fp32 tensor of shape ``[len(tensors)]`` on the
    tensors' device (all on one device; any float dtype, computed in fp32 or better).

    ``op``: ``"absmax"`` (max |x|), ``"sum"`` (sum x) or ``"sumsq"`` (sum x²). Zero-size tensors give 0
    (so Gravity's ``1/absmax`` is inf there, as for an all-zero grad). Empty list: a 0-element tensor.
    No `.item()`, no host sync; nothing is modified.

    NATIVE HOOK: once the extension in ``csrc/`` is loaded, its ``multi_tensor_stats`` op (one pass
    over the whole list, zero-size tensors -> 0) serves every call on a device it has kernels for, for
    lists of one float dtype; otherwise the torch fallback below runs. The fallback costs: absmax one
    ``_foreach_norm(inf)`` + a stack; sumsq one ``_foreach_norm(2)`` (squared afterwards, so within a
    rounding of the exact sum of squares) + a stack; sum one kernel per tensor, since torch has no
    multi-tensor sum.
    """
    if op not in OPS:
        raise ValueError(f"Invalid op: {op!r} (expected one of {OPS})")
    tensors = list(tensors)
    if not tensors:
        device = torch.device("cpu")
        return torch.empty(0, dtype=torch.float32, device=device)
    device = tensors[0].device
    native = _native_op()
    if native is not None:
        return native(tensors, op)
    return _torch_reduce(tensors, op, device)


def _torch_reduce(tensors: list[Tensor], op: str, device: torch.device) -> Tensor:
    flat = [torch.view_as_real(t) if t.is_complex() else t for t in tensors]
    nonempty = [t for t in flat if t.numel() > 0]  # _foreach_norm(inf) raises on an empty tensor
    if op == "sum":
        vals = [t.sum(dtype=torch.float32) for t in nonempty]
    elif nonempty:
        ord_ = float("inf") if op == "absmax" else 2.0
        vals = list(torch._foreach_norm(nonempty, ord_, dtype=torch.float32))
    else:
        vals = []
    if len(nonempty) == len(flat):
        out = torch.stack(vals)
    else:
        zero = torch.zeros((), dtype=torch.float32, device=device)  # made on the device: no copy, no sync
        it = iter(vals)
        out = torch.stack([next(it) if t.numel() > 0 else zero for t in flat])
    return out.square_() if op == "sumsq" else out
