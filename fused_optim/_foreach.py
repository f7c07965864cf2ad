"""Helpers for the `foreach` impls: torch's multi-tensor ops with the reference's rounding."""
from __future__ import annotations

import torch
from torch import Tensor

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def take(index: list[int], *lists: list[Tensor]) -> tuple[list[Tensor], ...]:
    """The entries at `index` of each list: the foreach impls drop the zero-size tensors, which some
    multi-tensor ops refuse (`_foreach_norm(inf)`) and none needs."""
    return tuple([[lst[i] for i in index] for lst in lists])


def mul_operand(tensors: list[Tensor], value: float | Tensor) -> float | Tensor:
    """`value` as the factor of an in-place `torch._foreach_mul_` over `tensors`.

    On CPU, `torch._foreach_mul_(bf16_or_fp16_list, python_float)` rounds the scalar to the list's dtype
    before multiplying (0.998 becomes 1.0 in bf16: weight decay and momentum decay vanish), whereas
    `Tensor.mul_` and the foreach overload taking a 0-d fp32 tensor multiply by the fp32 value (measured:
    957 of 1,000 bf16 elements differed from `mul_` with the float, 0 with the tensor). fp32/fp64 lists
    keep the float, which matches `mul_` bit for bit."""
    if isinstance(value, Tensor):  # a per-step scalar traced under torch.compile (float64, CPU)
        return value.to(device=tensors[0].device, dtype=torch.float32) if tensors else value
    if tensors and tensors[0].dtype in _LOW_PRECISION:
        # torch.full: a fill on the device (torch.tensor(value, device=cuda) would be a pageable copy, a sync)
        return torch.full((), value, dtype=torch.float32, device=tensors[0].device)
    return value


def addcdiv_(tensors: list[Tensor], tensors1: list[Tensor], tensors2: list[Tensor],
             value: float | Tensor) -> None:
    """``torch._foreach_addcdiv_(tensors, tensors1, tensors2, value=value)``. A 0-d tensor `value` (a per-step
    scalar traced under torch.compile) would be read on the host (a graph break), and the overload taking
    a tensor of values has no fake kernel: the same ``value * t1 / t2`` (the CPU kernel's order) is then
    spelled out in three foreach ops, which Inductor fuses back into one loop."""
    if not isinstance(value, Tensor):
        torch._foreach_addcdiv_(tensors, tensors1, tensors2, value=value)
        return
    update = torch._foreach_mul(tensors1, value.to(device=tensors1[0].device, dtype=torch.float32))
    torch._foreach_div_(update, tensors2)
    torch._foreach_add_(tensors, update)
