"""`python -m bench --distributed` (= `python -m bench.distributed`): Muon's step on FSDP2 shards.

Spawns `--ranks` gloo processes on the CPU (or NCCL ones on as many GPUs), shards GPT-2's hidden matrices
(per block: attn c_attn (3d, d), attn c_proj (d, d), mlp c_fc (4d, d), mlp c_proj (d, 4d); nn.Linear
layout) on dim 0 as `fully_shard` does, and times one `Muon.step()` two ways:

- ``owner``: fused_optim's step (each matrix gathered to one owner rank, orthogonalized there once,
  its rows sent back: two all_to_all_single per step; README, "FSDP2 / DDP");
- ``gather-all``: the naive one (every rank all-gathers every momentum matrix, orthogonalizes all of
  them and keeps its rows), what Moonlight's distributed Muon does over ZeRO-1 data parallel ranks.

For each it reports the median step time and the bytes each rank sent (counted at the collectives,
excluding a rank's copy to itself), checks both give the same params, and prints the bytes per rank
that the full-size model (d=768, 12 layers: 85M Muon params) would send, from the same formula.
Newton–Schulz in bf16 is slow on a CPU without bf16 matrix units (about a minute per 768x768 matrix on
the 2-core development machine), so the CPU default divides d by `--scale` 8; the structure (shapes'
ratios, matrix count, load balance) is GPT-2's.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time


def gpt2_muon_shapes(d: int = 768, n_layer: int = 12) -> list[tuple[int, int]]:
    shapes = []
    for _ in range(n_layer):
        shapes += [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)]
    return shapes


def gather_all_bytes(shapes, world: int, element_size: int = 2) -> list[int]:
    """Bytes each rank sends in the naive scheme: its rows of every matrix to each other rank."""
    from fused_optim.distributed import _rows_of

    sent = [0] * world
    for rows, cols in shapes:
        for r in range(world):
            start, end = _rows_of(rows, world, r)
            sent[r] += (end - start) * cols * element_size * (world - 1)
    return sent


def _naive_step(params, grads, bufs, *, lr, momentum, weight_decay, nesterov, ns_steps):
    """Muon's step with every rank orthogonalizing every whole matrix (all-gather of the bf16 input)."""
    import torch
    import torch.distributed as dist

    from fused_optim.muon import _foreach_stages, _newton_schulz_list, _scale

    local_p = [p.to_local() for p in params]
    local_g = [g.to_local() for g in grads]
    local_b = [b.to_local() for b in bufs]
    outs = [torch.empty(g.shape, dtype=torch.bfloat16) for g in local_g]
    _foreach_stages.momentum(local_g, local_b, outs, momentum=momentum, nesterov=nesterov, maximize=False)
    world, me = dist.get_world_size(), dist.get_rank()
    chunks = [-(-p.shape[0] // world) for p in params]
    # all_gather needs equal sizes: pad each shard to the chunk (as FSDP2 does for its own all-gather)
    padded = [torch.nn.functional.pad(o, (0, 0, 0, c - o.shape[0])) for o, c in zip(outs, chunks)]
    flat = torch.cat([x.reshape(-1) for x in padded])
    gathered = torch.empty(world * flat.numel(), dtype=flat.dtype)
    dist.all_gather_into_tensor(gathered, flat)
    gathered = gathered.view(world, -1)
    full, off = [], 0
    for p, c in zip(params, chunks):
        n = c * p.shape[1]
        full.append(gathered[:, off:off + n].reshape(world * c, p.shape[1])[:p.shape[0]])
        off += n
    results = _newton_schulz_list(full, ns_steps, True)
    mine = [r[min(me * c, p.shape[0]):min((me + 1) * c, p.shape[0])] for r, p, c in zip(results, params, chunks)]
    _foreach_stages.apply(local_p, mine, scales=[_scale(p) for p in params], lr=lr, weight_decay=weight_decay)


def _worker(rank, port, args, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import fused_optim

    torch.set_num_threads(max(1, args.threads))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    mesh = init_device_mesh("cpu", (args.ranks,))
    shapes = gpt2_muon_shapes(768 // args.scale, args.layers)
    torch.manual_seed(0)
    full = [torch.randn(s) * 0.02 for s in shapes]
    grads = [torch.randn(s) for s in shapes]

    def fresh():
        params = [torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)])) for w in full]
        for p, g in zip(params, grads):
            p.grad = distribute_tensor(g, mesh, [Shard(0)])
        return params

    sent = [0]
    real_a2a, real_ag = dist.all_to_all_single, dist.all_gather_into_tensor

    def a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        me = dist.get_rank(group)
        splits = input_split_sizes or [input.numel() // dist.get_world_size(group)] * dist.get_world_size(group)
        sent[0] += (sum(splits) - splits[me]) * input.element_size()
        return real_a2a(output, input, output_split_sizes, input_split_sizes, group=group, **kw)

    def ag(output, input, group=None, **kw):
        sent[0] += input.numel() * input.element_size() * (dist.get_world_size(group) - 1)
        return real_ag(output, input, group=group, **kw)

    dist.all_to_all_single, dist.all_gather_into_tensor = a2a, ag
    hyper = dict(lr=0.02, momentum=0.95, weight_decay=0.01, nesterov=True, ns_steps=args.ns_steps)
    report = {}
    final = {}
    for mode in ("owner", "gather-all"):
        params = fresh()
        opt = fused_optim.Muon(params, impl="foreach", **hyper)
        if mode == "gather-all":
            for p in params:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [opt.state[p]["momentum_buffer"] for p in params]

            def step():
                with torch.no_grad():
                    _naive_step(params, [p.grad for p in params], bufs, **hyper)
        else:
            step = opt.step
        times = []
        for i in range(args.warmup + args.reps):
            sent[0] = 0
            dist.barrier()
            t0 = time.perf_counter()
            step()
            dist.barrier()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        final[mode] = [p.to_local().clone() for p in params]
        report[mode] = {"median_s": statistics.median(times), "min_s": min(times), "bytes_sent": sent[0]}
    dist.all_to_all_single, dist.all_gather_into_tensor = real_a2a, real_ag
    report["max_param_diff"] = max((a - b).abs().max().item() if a.numel() else 0.0
                                   for a, b in zip(final["owner"], final["gather-all"]))
    with open(f"{out_path}.{rank}", "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench --distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--layers", type=int, default=12, help="GPT-2 blocks (default 12: gpt2-124m)")
    p.add_argument("--scale", type=int, default=8, help="divide d=768 by this (default 8: bf16 NS is slow on CPU)")
    p.add_argument("--ns-steps", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1: ranks share the cores)")
    p.add_argument("--quick", action="store_true", help="2 layers, 1 rep")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.reps, args.warmup = 2, 1, 1

    import torch.multiprocessing as mp

    from fused_optim.distributed import assign_owners, row_exchange_bytes

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r")
        mp.start_processes(_worker, args=(_free_port(), args, out), nprocs=args.ranks, join=True,
                           start_method="spawn")
        per_rank = []
        for r in range(args.ranks):
            with open(f"{out}.{r}") as f:
                per_rank.append(json.load(f))
    d = 768 // args.scale
    shapes = gpt2_muon_shapes(d, args.layers)
    big = gpt2_muon_shapes(768, 12)
    owners = assign_owners(big, args.ranks)
    from fused_optim.distributed import _matrix_cost

    load = [sum(_matrix_cost(*s) for s, o in zip(big, owners) if o == r) for r in range(args.ranks)]
    print(f"Muon step, {len(shapes)} GPT-2 matrices (d={d}, {args.layers} layers), {args.ranks} gloo ranks, "
          f"bf16 Newton-Schulz x{args.ns_steps}, {args.threads} thread(s) per rank")
    print(f"{'scheme':<12} {'rank':>4} {'median step':>12} {'bytes sent':>12} {'predicted':>12} "
          f"{'gpt2-124m bytes/rank':>21}")
    predicted = {"owner": row_exchange_bytes(shapes, args.ranks),
                 "gather-all": gather_all_bytes(shapes, args.ranks)}
    full_size = {"owner": row_exchange_bytes(big, args.ranks), "gather-all": gather_all_bytes(big, args.ranks)}
    for mode in ("owner", "gather-all"):
        for r, rep in enumerate(per_rank):
            print(f"{mode:<12} {r:>4} {rep[mode]['median_s'] * 1e3:>10.1f}ms {rep[mode]['bytes_sent']:>12,} "
                  f"{predicted[mode][r]:>12,} {full_size[mode][r]:>21,}")
    print(f"max |owner - gather-all| over the params: {max(r['max_param_diff'] for r in per_rank):.3g}")
    print("gpt2-124m Newton-Schulz work per rank (owner scheme, multiply-adds per iteration): "
          + ", ".join(f"{x / 1e9:.2f}G" for x in load)
          + f" (gather-all: {sum(load) / 1e9:.2f}G on every rank)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "per_rank": per_rank, "predicted": predicted,
                       "gpt2_124m_bytes": full_size, "gpt2_124m_ns_load": load}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
