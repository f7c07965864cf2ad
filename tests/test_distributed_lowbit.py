"""Low-precision state on FSDP2 shards (DTensor params), CPU, 2 processes, gloo (docs/lowbit.md §5).

The model's weight is 128x64 (8192 elements, above the 8-bit threshold); fully_shard's Shard(0) gives
each rank 64 rows = 4096 elements, a whole number of 256-element blocks, so the 8-bit blocks of the
shards are the unsharded tensor's blocks and the 8-bit run equals the unsharded one bit for bit. bf16
state is rounded stochastically with the element index counted from each shard's start, so rank 1's
bits differ from the unsharded run's: that case checks the state's form and closeness.

Checkpoints: 8-bit block scales are per shard, stored as a DTensor with one row per shard
(`distributed.block_scales_layout`), so `torch.distributed.checkpoint` saves every rank's scales and a
resumed run equals the uninterrupted one bit for bit; a state_dict of sharded 8-bit state refuses to load
into unsharded params, naming the fix.
"""
from __future__ import annotations

import os

import pytest
import torch
from dist_util import finish_rank, run_ranks

from fused_optim import Adan, Lion, Muon

WORLD = 2
STEPS = 3
CASES = {
    "lion-8bit-foreach": (Lion, "8bit", "foreach"),
    "lion-8bit-triton": (Lion, "8bit", "triton"),
    "adan-8bit-foreach": (Adan, "8bit", "foreach"),
    "muon-8bit-triton": (Muon, "8bit", "triton"),  # momentum on the shards, Newton-Schulz on the whole matrix
    "lion-bf16-foreach": (Lion, "bf16", "foreach"),
}


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))


def _params(cls, model):
    """Muon takes the model (its matrices to Muon, the rest to its Adam side); the others its params."""
    return model if cls is Muon else model.parameters()


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 64, generator=g), torch.randn(8, 1, generator=g)


def _step(model, opt, step):
    x, y = _batch(step)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def _worker(rank, port, out_dir):
    import faulthandler

    faulthandler.dump_traceback_later(200, exit=True)
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    from fused_optim import lowstate

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}
    for name, (cls, prec, impl) in CASES.items():
        ref_model = _model()
        ref = cls(_params(cls, ref_model), lr=1e-2, impl=impl, state_precision=prec)
        model = _model()
        fully_shard(model, mesh=mesh)
        opt = cls(_params(cls, model), lr=1e-2, impl=impl, state_precision=prec)
        opt.param_groups[0]["lowbit_seed"] = ref.param_groups[0]["lowbit_seed"]
        for s in range(STEPS):
            _step(ref_model, ref, s)
            _step(model, opt, s)
        w, rw = model[0].weight, ref_model[0].weight
        st = opt.state[w]
        signed = dict(opt._lowbit_states)
        worst_p = max((p.full_tensor() - q).abs().max().item()
                      for p, q in zip(model.parameters(), ref_model.parameters()))
        worst_s = 0.0
        for key in signed:
            if key not in st:
                continue
            local = st[key].to_local() if hasattr(st[key], "to_local") else st[key]
            scales = st.get(key + lowstate.ABSMAX)
            scales = None if scales is None else lowstate.local_scales(scales, st[key])
            mine = lowstate.decode(local, scales, signed[key], torch.float32)
            rows = local.shape[0]
            ref_st = ref.state[rw]
            full = lowstate.decode(ref_st[key], ref_st.get(key + lowstate.ABSMAX), signed[key], torch.float32)
            worst_s = max(worst_s, (mine - full[rank * rows:(rank + 1) * rows]).abs().max().item())
        first = "momentum_buffer" if cls is Muon else "exp_avg"
        results[name] = {"param": worst_p, "state": worst_s, "dtype": str(st[first].dtype),
                         "dtensor": hasattr(st[first], "to_local")}
    results["dcp"] = _dcp_resume(mesh, out_dir)
    results["plain_into_unsharded"] = _plain_into_unsharded(mesh)
    finish_rank(results, rank, out_dir)


def _dcp_resume(mesh, out_dir):
    """Save with torch.distributed.checkpoint after 2 steps, resume a fresh model and optimizer (other
    init, other seed) from it, run 2 more steps: bit for bit the uninterrupted run, and the scales saved
    from every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    out = {}
    for name, impl in (("adan-native", "native"), ("lion-foreach", "foreach")):
        cls = Adan if name.startswith("adan") else Lion
        ckpt = os.path.join(out_dir, f"dcp-{name}")
        model = _model()
        fully_shard(model, mesh=mesh)
        opt = cls(model.parameters(), lr=1e-2, impl=impl, state_precision="8bit")
        for s in range(2):
            _step(model, opt, s)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=ckpt)
        for s in range(2, 4):
            _step(model, opt, s)
        torch.manual_seed(7)
        model2 = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 1))
        fully_shard(model2, mesh=mesh)
        opt2 = cls(model2.parameters(), lr=1e-2, impl=impl, state_precision="8bit")
        _step(model2, opt2, 9)  # live state to load into
        msd2, osd2 = get_state_dict(model2, opt2)
        blob = {"model": msd2, "optim": osd2}
        dcp.load(blob, checkpoint_id=ckpt)
        set_state_dict(model2, opt2, model_state_dict=blob["model"], optim_state_dict=blob["optim"])
        for s in range(2, 4):
            _step(model2, opt2, s)
        params = max((a.full_tensor() - b.full_tensor()).abs().max().item()
                     for a, b in zip(model.parameters(), model2.parameters()))
        w, w2 = model[0].weight, model2[0].weight
        states = all(torch.equal(opt.state[w][k].full_tensor(), opt2.state[w2][k].full_tensor())
                     for k in opt.state[w] if k != "step")
        scales = opt.state[w]["exp_avg_absmax"]
        out[name] = {"param": params, "state_equal": states, "scales": [type(scales).__name__, list(scales.shape)]}
    return out


def _plain_into_unsharded(mesh):
    """opt.state_dict() of sharded 8-bit state loaded into the same model unsharded: refused, nothing changed;
    into an fp32 optimizer on the same sharding: decoded; that fp32 state into an 8-bit one: quantized per
    shard."""
    from torch.distributed.fsdp import fully_shard

    from fused_optim import lowstate

    model = _model()
    fully_shard(model, mesh=mesh)
    opt = Lion(model.parameters(), lr=1e-2, impl="foreach", state_precision="8bit")
    _step(model, opt, 0)
    saved = opt.state_dict()
    # the way through: the same sharding, fp32 state (decoded from this rank's codes and scales)
    fp32 = Lion(model.parameters(), lr=1e-2, impl="foreach")
    fp32.load_state_dict(saved)
    w = model[0].weight
    st = opt.state[w]
    want = lowstate.decode(st["exp_avg"].to_local(), lowstate.local_scales(st["exp_avg_absmax"], st["exp_avg"]),
                           True, torch.float32)
    converted = torch.equal(fp32.state[w]["exp_avg"].to_local(), want) and "exp_avg_absmax" not in fp32.state[w]
    # and back: the fp32 sharded state into a fresh 8-bit optimizer is quantized per shard, scales a DTensor
    back = Lion(model.parameters(), lr=1e-2, impl="foreach", state_precision="8bit")
    back.load_state_dict(fp32.state_dict())
    codes, scales = back.state[w]["exp_avg"], back.state[w]["exp_avg_absmax"]
    from fused_optim import lowbit

    want_codes, want_scales = lowbit.quantize_blockwise(want, True)
    converted = (converted and torch.equal(codes.to_local(), want_codes)
                 and torch.equal(lowstate.local_scales(scales, codes), want_scales)
                 and type(scales).__name__ == "DTensor")
    plain = _model()
    opt2 = Lion(plain.parameters(), lr=1e-2, impl="foreach", state_precision="8bit")
    try:
        opt2.load_state_dict(saved)
    except ValueError as exc:
        return {"error": str(exc), "state_empty": not opt2.state, "converted": converted}
    return {"error": None}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("fsdp2_lowbit"))


@pytest.mark.parametrize("name", [n for n in CASES if "8bit" in n])
def test_8bit_shards_equal_the_unsharded_run(results, name):
    for rank in results:
        assert rank[name] == {"param": 0.0, "state": 0.0, "dtype": "torch.uint8", "dtensor": True}


@pytest.mark.parametrize("name", ["adan-native", "lion-foreach"])
def test_8bit_dcp_resume_is_bit_exact(results, name):
    for rank in results:
        assert rank["dcp"][name] == {"param": 0.0, "state_equal": True, "scales": ["DTensor", [2, 16]]}


def test_sharded_8bit_state_dict_refuses_unsharded_params(results):
    for rank in results:
        r = rank["plain_into_unsharded"]
        assert r["error"] is not None and "resumes only on the sharding it was saved with" in r["error"], r
        assert "exp_avg" in r["error"] and r["state_empty"] and r["converted"]


def test_bf16_state_on_shards(results):
    for rank in results:
        r = rank["lion-bf16-foreach"]
        assert r["dtype"] == "torch.bfloat16" and r["dtensor"]
        assert r["param"] <= 3 * 1e-2  # Lion moves each element by lr per step; a flipped rounding of the
        assert r["state"] < 0.05       # state can flip a sign there, never more than that
