"""Per-step scalars as kernel arguments: the one conversion every impl uses (docs/design.md, "Scalars").

A per-step scalar (lr, Gravity's beta_hat, Adan's bias corrections, its clip factor) reaches a kernel
as a Python float or as a 0-d tensor. A kernel that reads the tensor on the device never syncs the
host and never recompiles for a new value (capturable steps, tensor lr schedules). This leaf module
imports only torch, so the kernel layer (`kernels/`, `_native.py`) and the classes share it without
an import cycle.
"""
from __future__ import annotations

import torch
from torch import Tensor

#: the float `device_scalar` returns beside a tensor: never read by a kernel (it reads the tensor), and
#: finite and nonzero, so host arithmetic done on it before the launch cannot divide by zero
UNUSED = 1.0


def device_tensor(t: Tensor, device: torch.device) -> Tensor:
    """``t`` as the fp32 tensor on ``device`` whose first element a kernel loads (AMP's grad scale and
    inf flag, SAM's scale): no copy when it already is one, and no reshape (a view costs a few µs per
    step, and a pointer argument has no shape)."""
    return t.detach().to(device=device, dtype=torch.float32)


def device_scalar(x: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """``(value, tensor)`` of a per-step scalar for a kernel on ``device``.

    - a tensor on an accelerator, or any tensor for CPU params: ``(UNUSED, the 0-d fp32 tensor on
      device)``: the kernel loads it (no host sync, no recompile when it changes);
    - a CPU tensor for accelerator params: read here (no sync: it is host memory), ``(value, None)``;
    - a number: ``(float(x), None)``: the kernel takes it as an fp32 argument.
    """
    if isinstance(x, Tensor):
        if x.device.type != "cpu" or device.type == "cpu":
            return UNUSED, device_tensor(x, device).reshape(())  # 0-d, as the native ops take it
        x = x.item()
    return float(x), None


def host_scalar(x: float | Tensor) -> float:
    """A scalar as a Python double for an impl that takes floats only; a tensor is read here (one host
    sync when it lives on an accelerator)."""
    return x.item() if isinstance(x, Tensor) else float(x)
