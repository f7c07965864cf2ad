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
- global norms (Adan's clip, SAM) finish with `global_sum`: the DTensors' partials all-reduced over
  their shard group, the partials of plain tensors (params FSDP2 left unsharded, whole on every rank)
  added once; `FusedOptimizer._dispatch` splits plain tensors and DTensors of different layouts into
  separate impl calls (`shard_splits`), so a per-tensor reduction never all-reduces a plain tensor;
- every rank calls every collective in the same order, also when some or all of its shards are empty
  (FSDP2 gives a rank an empty shard when a dim-0 size is smaller than the world size): empty shards
  contribute 0 (MAX over ``|g| >= 0``, or SUM), and impls call `reduce_per_tensor` before returning
  early on an all-empty list;
- an update that is a function of the whole matrix (Muon's Newton–Schulz) cannot be finished by a
  reduction: `orthogonalize_row_shards` gathers each row-sharded matrix to ONE owner rank of the
  shard group (owners balanced by cost), runs the function there (batched), and sends each rank its
  rows back: two ``all_to_all_single`` per shard group and step, whatever the number of matrices.
  `row_shard_refusal` names the layouts it cannot assemble (Shard on a dim other than 0, Partial,
  tensor-parallel strided shards, rows sharded over two mesh dims), which are refused before a step.

Without DTensors nothing here runs: `reduce_per_tensor` returns its input unchanged when no
`shard_context` is active, and the unsharded numerics are untouched. DDP needs nothing: its params
are plain tensors and its grads are already averaged when ``step()`` runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ShardContext", "all_reduce_max_", "all_reduce_sum_", "block_scales_layout", "global_sum",
           "host_values_to", "is_dtensor", "local", "orthogonalize_row_shards", "reduce_per_tensor",
           "row_exchange_bytes", "row_shard_refusal", "shard_block_scales", "shard_context", "shard_groups",
           "shard_splits"]


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
    tensors: tuple = ()      # the split's tensors themselves (DTensors: global shape, mesh, placements)


_CURRENT: contextvars.ContextVar[ShardContext | None] = contextvars.ContextVar("fused_optim_shard", default=None)
# How many shard contexts are open, in any thread. `current()` reads the ContextVar only when one is:
# unsharded steps (nearly all) then never call ContextVar.get, which Dynamo cannot trace on every torch
# (torch 2.11 breaks the graph there, so a compiled step of an unsharded model would stop being one graph).
_OPEN = [0]
_OPEN_LOCK = threading.Lock()


def _count_open(delta: int) -> None:
    if torch.compiler.is_compiling():  # traced: a lock is not traceable, and the trace runs in one thread
        _OPEN[0] += delta
    else:
        with _OPEN_LOCK:
            _OPEN[0] += delta


@contextlib.contextmanager
def shard_context(groups: Sequence, device: torch.device, numels: Sequence[int],
                  tensors: Sequence[Tensor] = ()) -> Iterator[None]:
    """Make `reduce_per_tensor` reduce over `groups` while an impl runs on local shards; `tensors` (the
    split's DTensors) let whole-matrix updates find their global shapes and shard groups."""
    token = _CURRENT.set(ShardContext(tuple(groups), torch.device(device), tuple(int(n) for n in numels),
                                      tuple(tensors)))
    _count_open(1)
    try:
        yield
    finally:
        _count_open(-1)
        _CURRENT.reset(token)


def current() -> ShardContext | None:
    """The shard context of this thread's running impl, None outside one."""
    return _CURRENT.get() if _OPEN[0] else None


def reduce_per_tensor(values: Sequence[Tensor], index: Sequence[int], op: str) -> list[Tensor]:
    """Finish per-tensor reductions over the shard group with ONE collective for all tensors.

    `values[k]` is the local reduction (a 0-d tensor) of tensor ``index[k]`` of the split the impl
    received; tensors not in `index` (empty local shards) contribute 0. `op` is "max" (of values
    >= 0, like ``max|g|``) or "sum". Returns the reduced values for `index`, in the dtype of `values`.
    Outside a `shard_context` (no DTensors) returns `values` unchanged.
    """
    ctx = current()
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
    ctx = current()
    return None if ctx is None else [ctx.numels[i] for i in index]


def all_reduce_max_(flag: Tensor, like: Sequence[Tensor]) -> Tensor:
    """Max of `flag` over the shard groups of the tensors `like`, in place (a per-rank decision every
    rank must share, like "some grad is not finite"); unchanged when `like` holds no DTensor."""
    groups = next((shard_groups(t) for t in like if is_dtensor(t)), ())
    for group in groups:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag


def global_sum(partials: Tensor, like: Sequence[Tensor]) -> Tensor:
    """The sum of `partials` (1-D: ``partials[k]`` is this rank's partial sum over tensor ``like[k]``) over
    whole tensors: DTensors' partials summed over their shard group, plain tensors' (the same on every
    rank: a param FSDP2 left unsharded) counted once, not once per rank."""
    sharded = [k for k, t in enumerate(like) if is_dtensor(t)]
    if len(sharded) == len(like):
        return all_reduce_sum_(partials.sum(), like)
    if not sharded:
        return partials.sum()
    plain = [k for k, t in enumerate(like) if not is_dtensor(t)]
    sharded_sum = partials[host_values_to(sharded, torch.long, partials.device)].sum()
    return (all_reduce_sum_(sharded_sum, [like[k] for k in sharded])
            + partials[host_values_to(plain, torch.long, partials.device)].sum())


_PLAIN = frozenset((Tensor, torch.nn.Parameter))


def shard_splits(tensors: Sequence[Tensor], idx: list[int]) -> list[list[int]]:
    """`idx` split into runs that share a layout: plain tensors together, DTensors by (mesh, sharded mesh
    dims), so every impl call of a split reduces over one set of process groups (and plain tensors,
    whole on every rank, over none). `[idx]` itself when `idx` holds no DTensor."""
    sel = tensors if len(idx) == len(tensors) else [tensors[i] for i in idx]
    if _PLAIN.issuperset(map(type, sel)):  # runs every step of every optimizer: one C-level type test each
        return [idx]
    parts: dict[tuple | None, list[int]] = {}
    for i in idx:
        t = tensors[i]
        key = ((id(t.device_mesh), tuple(d for d, pl in enumerate(t.placements) if pl.is_shard()))
               if is_dtensor(t) else None)
        parts.setdefault(key, []).append(i)
    return list(parts.values())


def all_reduce_sum_(total: Tensor, like: Sequence[Tensor]) -> Tensor:
    """Sum `total` (a local partial of a global sum over the tensors `like`) over their shard groups,
    in place; unchanged when `like` holds no DTensor. Every rank must call it (same `like` structure)."""
    groups = next((shard_groups(t) for t in like if is_dtensor(t)), ())
    for group in groups:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total


# ------------------------------------------------------------------------------ 8-bit block scales
def block_scales_layout(codes: Tensor, blocks_of) -> tuple[tuple[int, int], list]:
    """The global shape ``(shards, blocks)`` and placements of the block scales of the 8-bit codes of a
    DTensor param (docs/lowbit.md §5): each shard's blocks start at its own first element, so the scales
    are per shard; they are stored as one row per shard of a ``[shards, blocks]`` DTensor (``blocks``:
    `blocks_of` of the largest shard, torch.chunk's first; shorter shards pad their row with zeros),
    sharded over the same mesh dims as the param and replicated over the others. A checkpoint
    (``torch.distributed.checkpoint``) then saves every rank's row, and its shape names the sharding it
    belongs to."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = codes.device_mesh
    largest = list(codes.shape)
    shards = 1
    placements: list = []
    for i, pl in enumerate(codes.placements):
        if pl.is_shard():
            dim = pl.dim % max(codes.dim(), 1)
            largest[dim] = -(-largest[dim] // mesh.size(i))
            shards *= mesh.size(i)
            placements.append(Shard(0))
        elif pl.is_replicate():
            placements.append(Replicate())
        else:
            raise ValueError(f"8-bit state of a DTensor with placement {pl} on mesh dim {i}: only Shard and "
                             "Replicate placements hold a parameter; use state_precision='bf16' or 'fp32'")
    numel = 1
    for n in largest:
        numel *= n
    return (shards, blocks_of(numel)), placements


def shard_block_scales(scales: Tensor, codes: Tensor, blocks_of) -> Tensor:
    """This rank's block scales `scales` (1-D) of DTensor `codes` as the DTensor of `block_scales_layout`."""
    from torch.distributed.tensor import DTensor

    (shards, blocks), placements = block_scales_layout(codes, blocks_of)
    if scales.numel() > blocks:
        raise RuntimeError(f"a shard of {local(codes).numel()} elements has {scales.numel()} blocks, more than "
                           f"the {blocks} of the largest shard its layout allows (placements {codes.placements})")
    row = torch.zeros(1, blocks, dtype=scales.dtype, device=scales.device)
    row[0, :scales.numel()] = scales
    return DTensor.from_local(row, codes.device_mesh, placements, run_check=False, shape=(shards, blocks),
                              stride=(blocks, 1))


# ------------------------------------------------------------------------------ whole-matrix updates
def row_shard_refusal(t: Tensor) -> str | None:
    """Why the whole matrix of DTensor `t` cannot be assembled from its rows by
    `orthogonalize_row_shards`, or None when it can (a plain tensor, or Shard(0) on at most one mesh
    dimension of size > 1 with every other dimension Replicate: FSDP2's and HSDP's layout)."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Shard

    rows_sharded = 0
    for i, pl in enumerate(t.placements):
        if pl.is_replicate():
            continue
        if pl.is_partial():
            return f"{pl} on mesh dim {i} (a pending reduction, not a shard)"
        if type(pl) is not Shard:  # _StridedShard: FSDP2 on top of tensor parallelism
            return f"{pl} on mesh dim {i} (a strided shard: FSDP2 combined with tensor parallelism)"
        if pl.dim != 0:
            return f"{pl} on mesh dim {i} (sharded on dim {pl.dim}, not on the rows)"
        if t.device_mesh.size(i) > 1:
            rows_sharded += 1
    if rows_sharded > 1:
        return "Shard(0) on more than one mesh dim (rows sharded twice, e.g. FSDP over tensor parallel rows)"
    return None


def _row_group(t: Tensor) -> tuple | None:
    """(mesh, mesh dim) whose process group shards `t`'s rows, or None when every rank holds all rows."""
    if not is_dtensor(t):
        return None
    for i, pl in enumerate(t.placements):
        if pl.is_shard() and t.device_mesh.size(i) > 1:
            return t.device_mesh, i
    return None


def _rows_of(n_rows: int, world: int, coord: int) -> tuple[int, int]:
    """Rows [start, end) of shard `coord`: DTensor's Shard(0) split (torch.chunk: ceil(n/world) rows per
    shard, the last ones shorter or empty)."""
    chunk = -(-n_rows // world)
    start = min(coord * chunk, n_rows)
    return start, min(start + chunk, n_rows)


def _matrix_cost(rows: int, cols: int) -> int:
    # Newton–Schulz on (s, l), s = min: X Xᵀ (s²l), A·A (s³), B·X (s²l) multiply-adds per iteration
    s, l_ = min(rows, cols), max(rows, cols)
    return s * s * (2 * l_ + s)


def assign_owners(shapes: Sequence[tuple[int, int]], world: int) -> list[int]:
    """The rank that orthogonalizes each matrix: largest cost first, each to the least loaded rank (ties:
    the lower rank). Deterministic from the shapes, so every rank computes the same plan."""
    load = [0] * world
    owners = [0] * len(shapes)
    for k in sorted(range(len(shapes)), key=lambda k: (-_matrix_cost(*shapes[k]), k)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[k] = r
        load[r] += _matrix_cost(*shapes[k])
    return owners


def row_exchange_bytes(shapes: Sequence[tuple[int, int]], world: int, element_size: int = 2) -> list[int]:
    """Bytes each rank sends (= receives, summed over ranks) in one `orthogonalize_row_shards` of
    matrices of `shapes` over `world` ranks: its rows of the matrices it does not own, plus the other
    ranks' rows of the results it owns. Index: the rank."""
    owners = assign_owners(shapes, world)
    sent = [0] * world
    for (rows, cols), owner in zip(shapes, owners):
        for r in range(world):
            start, end = _rows_of(rows, world, r)
            if r != owner:
                sent[r] += (end - start) * cols * element_size       # rows to the owner
                sent[owner] += (end - start) * cols * element_size   # the result's rows back
    return sent


def _as_bytes(t: Tensor) -> Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def orthogonalize_row_shards(local_rows: Sequence[Tensor], like: Sequence[Tensor],
                             orthogonalize) -> list[Tensor]:
    """``orthogonalize`` of each whole matrix, computed once per shard group, returned as this rank's rows.

    `local_rows[k]` is this rank's block of rows (2-D, any dtype; empty where the shard is) of the
    matrix whose parameter is `like[k]` (a DTensor accepted by `row_shard_refusal`; its matrix is
    ``(size(0), numel / size(0))``). `orthogonalize(list of whole matrices)` returns a list of
    same-shape, same-dtype results; it runs on each matrix's owner rank only (`assign_owners`), on the
    owner's matrices together (so it can batch them by shape). Per shard group: one
    ``all_to_all_single`` carries every rank's rows to the owners, one carries the results' rows back
    (bytes per rank: `row_exchange_bytes`). Every rank of the group must call this with the same
    tensors in the same order (empty shards included). Matrices whose rows are not sharded (plain
    tensors, a mesh dim of size 1) are orthogonalized here, locally.
    """
    out: list[Tensor | None] = [None] * len(local_rows)
    by_group: dict[tuple, list[int]] = {}
    local_only = []
    for k, t in enumerate(like):
        key = _row_group(t)
        if key is None:
            local_only.append(k)
        else:
            by_group.setdefault((id(key[0]), key[1]), []).append(k)
    if local_only:
        for k, r in zip(local_only, orthogonalize([local_rows[k] for k in local_only])):
            out[k] = r
    for idx in by_group.values():  # insertion order: the same on every rank
        mesh, dim = _row_group(like[idx[0]])
        group = mesh.get_group(dim)
        world, me = mesh.size(dim), mesh.get_local_rank(dim)
        shapes = [(like[k].shape[0], like[k].numel() // max(like[k].shape[0], 1)) for k in idx]
        dtypes = [local_rows[k].dtype for k in idx]
        esize = [torch.empty((), dtype=d).element_size() for d in dtypes]
        rows = [[_rows_of(m, world, r) for r in range(world)] for m, _ in shapes]
        for j, k in enumerate(idx):
            start, end = rows[j][me]
            if tuple(local_rows[k].shape) != (end - start, shapes[j][1]):
                raise RuntimeError(f"a row shard of shape {tuple(local_rows[k].shape)} does not match rows "
                                   f"[{start}, {end}) of the {shapes[j]} matrix of a {tuple(like[k].shape)} "
                                   f"parameter sharded {like[k].placements}: not DTensor's Shard(0) split")
        owners = assign_owners(shapes, world)
        mine = [j for j in range(len(idx)) if owners[j] == me]

        def nbytes(j: int, r: int) -> int:
            start, end = rows[j][r]
            return (end - start) * shapes[j][1] * esize[j]

        device = local_rows[idx[0]].device
        # 1. every rank's rows to the owner (self included: all_to_all copies its own part)
        send = [_as_bytes(local_rows[idx[j]]) for d in range(world) for j in range(len(idx)) if owners[j] == d]
        in_splits = [sum(nbytes(j, me) for j in range(len(idx)) if owners[j] == d) for d in range(world)]
        out_splits = [sum(nbytes(j, s) for j in mine) for s in range(world)]
        recv = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
        dist.all_to_all_single(recv, torch.cat(send) if send else recv.new_empty(0), out_splits, in_splits,
                               group=group)
        whole = {j: torch.empty(shapes[j], dtype=dtypes[j], device=device) for j in mine}
        offset = 0
        for s in range(world):
            for j in mine:
                n = nbytes(j, s)
                start, end = rows[j][s]
                whole[j][start:end].view(-1).view(torch.uint8).copy_(recv[offset:offset + n])
                offset += n
        # 2. the owner's matrices, together
        results = dict(zip(mine, orthogonalize([whole[j] for j in mine]))) if mine else {}
        for j in mine:
            if results[j].shape != whole[j].shape or results[j].dtype != dtypes[j]:
                raise RuntimeError("orthogonalize must return each matrix's shape and dtype")
        # 3. each rank its rows of the results
        send = [_as_bytes(results[j][slice(*rows[j][d])]) for d in range(world) for j in mine]
        in_splits = [sum(nbytes(j, d) for j in mine) for d in range(world)]
        out_splits = [sum(nbytes(j, me) for j in range(len(idx)) if owners[j] == s) for s in range(world)]
        recv = torch.empty(sum(out_splits), dtype=torch.uint8, device=device)
        dist.all_to_all_single(recv, torch.cat(send) if send else recv.new_empty(0), out_splits, in_splits,
                               group=group)
        offset = 0
        for s in range(world):
            for j in range(len(idx)):
                if owners[j] != s:
                    continue
                n = nbytes(j, me)
                start, end = rows[j][me]
                out[idx[j]] = recv[offset:offset + n].view(dtypes[j]).view(end - start, shapes[j][1])
                offset += n
    return out  # type: ignore[return-value]
