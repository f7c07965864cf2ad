"""Sharded (DTensor / FSDP2) parameters: kernels on local shards, collectives only for the reductions.

Under FSDP2 (`fully_shard`) every parameter, gradient and state tensor is a `DTensor` whose local
shard lives on this rank. Elementwise updates (Lion, Adan's update, the second half of Gravity and
GradientEquilibrium) are correct on the local shards as they are; the per-tensor reductions are not:
Gravity's ``max|g|`` and GradientEquilibrium's ``mean(g)`` range over the whole tensor, Adan's clip
norm and SAM's norm over every tensor. So:

- `FusedOptimizer._dispatch` runs every impl on the local shards (``to_local()``, sharing storage, so
  the in-place updates land in the DTensors) inside `shard_context`, which records the process groups
  of the mesh dimensions the tensors are sharded over and each tensor's global element count;
- impls with a per-tensor reduction finish it with `reduce_per_tensor`: ONE all-reduce (MAX or SUM)
  of a buffer holding every tensor's local value, whatever the number of tensors;
- global norms (Adan's clip, SAM) finish with `all_reduce_sum_` over the grads' shard groups;
- every rank calls every collective in the same order, also when some or all of its shards are empty
  (FSDP2 gives a rank an empty shard when a dim-0 size is smaller than the world size): empty shards
  contribute 0 (MAX over ``|g| >= 0``, or SUM), and impls call `reduce_per_tensor` before returning
  early on an all-empty list.

Without DTensors nothing here runs: `reduce_per_tensor` returns its input unchanged when no
`shard_context` is active, and the unsharded numerics are untouched. DDP needs nothing: its params
are plain tensors and its grads are already averaged when ``step()`` runs.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ShardContext", "all_reduce_sum_", "host_values_to", "is_dtensor", "local", "reduce_per_tensor",
           "shard_context", "shard_groups"]


def is_dtensor(t: object) -> bool:
    # imported lazily: torch.distributed.tensor is not needed (nor cheap) for unsharded training
    if type(t).__name__ != "DTensor":
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage), or `t` itself."""
    return t.to_local() if is_dtensor(t) else t


def shard_groups(t: Tensor) -> tuple:
    """Process groups of the mesh dimensions `t` is sharded over (Shard placements); empty if none."""
    if not is_dtensor(t):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(i) for i, pl in enumerate(t.placements) if pl.is_shard())


@dataclass(frozen=True)
class ShardContext:
    groups: tuple            # process groups to reduce over, in mesh-dim order
    device: torch.device     # where the reduction buffers live (the shards' device)
    numels: tuple[int, ...]  # global element count of each tensor of the split, in order


_CURRENT: contextvars.ContextVar[ShardContext | None] = contextvars.ContextVar("fused_optim_shard", default=None)


@contextlib.contextmanager
def shard_context(groups: Sequence, device: torch.device, numels: Sequence[int]) -> Iterator[None]:
    """Make `reduce_per_tensor` reduce over `groups` while an impl runs on local shards."""
    token = _CURRENT.set(ShardContext(tuple(groups), torch.device(device), tuple(int(n) for n in numels)))
    try:
        yield
    finally:
        _CURRENT.reset(token)


def current() -> ShardContext | None:
    return _CURRENT.get()


def reduce_per_tensor(values: Sequence[Tensor], index: Sequence[int], op: str) -> list[Tensor]:
    """Finish per-tensor reductions over the shard group with ONE collective for all tensors.

    `values[k]` is the local reduction (a 0-d tensor) of tensor ``index[k]`` of the split the impl
    received; tensors not in `index` (empty local shards) contribute 0. `op` is "max" (of values
    >= 0, like ``max|g|``) or "sum". Returns the reduced values for `index`, in the dtype of `values`.
    Outside a `shard_context` (no DTensors) returns `values` unchanged.
    """
    ctx = _CURRENT.get()
    if ctx is None:
        return list(values)
    dtype = values[0].dtype if len(values) else torch.float32
    # fp64 keeps sums of fp32 partials and every fp32/bf16/fp16 max exact in the buffer
    buf = torch.zeros(len(ctx.numels), dtype=torch.float64, device=ctx.device)
    rows = host_values_to(list(index), torch.long, ctx.device) if len(index) else None
    if len(values):
        buf[rows] = torch.stack(list(values)).to(torch.float64)
    reduce_op = {"max": dist.ReduceOp.MAX, "sum": dist.ReduceOp.SUM}[op]
    for group in ctx.groups:
        dist.all_reduce(buf, op=reduce_op, group=group)
    return list(buf[rows].to(dtype).unbind()) if len(index) else []


def host_values_to(values: Sequence[int] | Sequence[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small tensor of host values on `device`, without a host sync: on CUDA through pinned memory
    with a non_blocking copy (a pageable copy waits for the stream, i.e. for every queued kernel)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def global_numels(index: Sequence[int]) -> list[int] | None:
    """Global element counts of the split's tensors at `index` inside a `shard_context`, else None."""
    ctx = _CURRENT.get()
    return None if ctx is None else [ctx.numels[i] for i in index]


def all_reduce_sum_(total: Tensor, like: Sequence[Tensor]) -> Tensor:
    """Sum `total` (a local partial of a global sum over the tensors `like`) over their shard groups,
    in place; unchanged when `like` holds no DTensor. Every rank must call it (same `like` structure)."""
    groups = next((shard_groups(t) for t in like if is_dtensor(t)), ())
    for group in groups:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total
