"""Run a test's worker on WORLD gloo ranks (spawned processes) and collect what each rank wrote."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, out: Path) -> list[dict]:
    """Spawn `worker(rank, port, out_dir)` on `world` ranks; each writes ``rank{rank}.json`` into `out`."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import torch.multiprocessing as mp

    mp.start_processes(worker, args=(free_port(), str(out)), nprocs=world, join=True, start_method="spawn")
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


def finish_rank(results, rank: int, out_dir: str) -> None:
    """A worker's last act: write `results` as ``rank{rank}.json`` for `run_ranks`, wait for every rank,
    leave the process group."""
    import torch.distributed as dist

    with open(Path(out_dir) / f"rank{rank}.json", "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
