"""Whole-tensor updates on FSDP2 shards (2 processes, gloo, CPU): Muon, and every composite whose update
reads more than one element (SAM's norm, NeuroOptima, Lookahead, the non-finite skip).

One spawn runs every case (process start-up dominates). Each case trains a sharded model (fully_shard per
layer) and an unsharded copy on the same batches (both ranks feed the same batch, so FSDP2's averaged
gradient is the unsharded one exactly) and records, per step, the largest difference of params and
state, and how far the params moved. The Muon model mixes matrix shapes: square, tall with an odd row
count (uneven shards), wide, one row (fewer rows than ranks: rank 1's shard is empty), a 4-D filter
bank (flattened to a matrix) and a 3-D batch of matrices sharded on its batch dim; embeddings and
biases go to the Adam side.
"""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from torch import nn

from dist_util import finish_rank, run_ranks

WORLD = 2
STEPS = 4
# Newton–Schulz runs in bf16; a sharded step may batch matrices differently from the unsharded one
NS_TOL = 1e-3


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(11, 6)
        self.square = nn.Linear(6, 6)
        self.tall = nn.Linear(6, 9)       # weight (9, 6): 5 + 4 rows
        self.wide = nn.Linear(9, 4)       # weight (4, 9)
        self.row = nn.Linear(4, 1)        # weight (1, 4): rank 1 holds no row
        self.stack = nn.Parameter(torch.randn(3, 4, 5) * 0.3)  # 3 matrices: 2 + 1 per rank
        self.filters = nn.Parameter(torch.randn(3, 2, 2, 2) * 0.3)  # conv-like: a (3, 8) matrix, 2 + 1 rows

    def forward(self, x):
        h = torch.tanh(self.square(self.embed(x)))
        h = torch.tanh(self.wide(torch.tanh(self.tall(h))))
        side = torch.einsum("btk,skn->btn", h, self.stack).square().mean()
        side = side + (self.filters.reshape(3, -1)[:, :4] @ h.mean((0, 1))).square().sum()
        return self.row(h).squeeze(-1).mean(-1) + side


def _batch(step):
    g = torch.Generator().manual_seed(200 + step)
    return torch.randint(0, 11, (3, 5), generator=g), torch.randn(3, generator=g)


def _loss(model, step):
    x, y = _batch(step)
    return torch.nn.functional.mse_loss(model(x), y)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _compare(model, opt, ref_model, ref_opt, p0):
    diff = moved = 0.0
    for p, q, q0 in zip(model.parameters(), ref_model.parameters(), p0):
        diff = max(diff, (_full(p.detach()) - q.detach()).abs().max().item())
        moved = max(moved, (q.detach() - q0).abs().max().item())
        for key, v in ref_opt.state[q].items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim:
                diff = max(diff, (_full(opt.state[p][key]) - v).abs().max().item())
    return diff, moved


def _muon(impl, cls="Muon", **kw):
    def make(model):
        import fused_optim

        groups = fused_optim.muon_param_groups(model, lr=0.02, weight_decay=kw.get("weight_decay", 0.0),
                                               adam_lr=1e-2, adam_weight_decay=kw.get("weight_decay", 0.0))
        extra = {k: v for k, v in kw.items() if k != "weight_decay"}
        return getattr(fused_optim, cls)(groups, impl=impl, **extra)
    return make


MUON_CASES = {
    "muon_forloop": (_muon("forloop"), "cpu"),
    "muon_foreach_wd": (_muon("foreach", weight_decay=0.1, nesterov=False), "cpu"),
    "muon_foreach_aux": (_muon("foreach", cls="MuonWithAuxAdam", weight_decay=0.1), "cpu"),
    "muon_triton": (_muon("triton", weight_decay=0.1, maximize=True), "cpu"),
    "muon_native": (_muon("native", weight_decay=0.1), "cpu"),
    "muon_hsdp_1x2": (_muon("foreach", weight_decay=0.1), (1, 2)),   # Replicate x Shard(0)
    "muon_hsdp_2x1": (_muon("foreach"), (2, 1)),                      # replicas only: every rank whole
}


def _other(name):
    import fused_optim as fo

    return {
        "lookahead_lion": lambda m: fo.Lookahead(fo.Lion(m.parameters(), lr=1e-2, weight_decay=0.1), k=2, alpha=0.5),
        "neuro_optima": lambda m: fo.NeuroOptima(m.parameters(), lr=1e-2, weight_decay=0.01, sam_rho=0.05,
                                                 lookahead_k=2, impl="foreach"),
        "sam_adaptive_adan": lambda m: fo.SAM(m.parameters(), fo.Adan, rho=0.05, adaptive=True, lr=1e-2,
                                              max_grad_norm=0.5),
        "lion_skip_nonfinite": lambda m: fo.Lion(m.parameters(), lr=1e-2),
    }[name]


OTHER_CASES = ["lookahead_lion", "neuro_optima", "sam_adaptive_adan", "lion_skip_nonfinite"]


def _mixed(name):
    import fused_optim as fo

    return {
        "mixed_equilibrium": lambda m: fo.GradientEquilibrium(m.parameters(), lr=0.1, impl="foreach"),
        "mixed_adan_clip": lambda m: fo.Adan(m.parameters(), lr=1e-2, max_grad_norm=0.1, impl="foreach"),
        "mixed_adan_clip_forloop": lambda m: fo.Adan(m.parameters(), lr=1e-2, max_grad_norm=0.1, impl="forloop"),
        "mixed_sam": lambda m: fo.SAM(m.parameters(), fo.Lion, rho=0.05, lr=1e-2),
        "mixed_muon": _muon("foreach", weight_decay=0.1),
    }[name]


# a model only partly wrapped: the params of unwrapped modules stay plain tensors, whole on every rank,
# next to DTensors in the same lists (a sum must count them once, not once per rank)
MIXED_CASES = ["mixed_equilibrium", "mixed_adan_clip", "mixed_adan_clip_forloop", "mixed_sam", "mixed_muon"]
CLOSURE = {"neuro_optima", "sam_adaptive_adan"}


def _shard(model, mesh, partly=False):
    from torch.distributed.fsdp import fully_shard

    for m in (model.embed, model.square, model.tall, model.wide, model.row):
        if not partly or m in (model.square, model.tall):
            fully_shard(m, mesh=mesh)
    if not partly:
        fully_shard(model, mesh=mesh)
    return model


def _step(model, opt, step, closure_based, poison=False):
    def closure():
        opt.zero_grad()
        loss = _loss(model, step)
        loss.backward()
        return loss
    if closure_based:
        return opt.step(closure)
    closure()
    if poison:  # a NaN in rank 0's shard only: every rank must skip the step
        import torch.distributed as dist

        p = model.square.weight
        g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
        if not hasattr(p.grad, "to_local") or dist.get_rank() == 0:
            g.view(-1)[0] = float("nan")
    opt.step()


def _run_pair(make, mesh, steps, closure_based=False, poison_step=None, skip_nonfinite=False, ns_log=None,
              partly=False):
    ref_model = _Net()
    ref = make(ref_model)
    model = _shard(_Net(), mesh, partly) if mesh is not None else _Net()
    opt = make(model)
    for o in (ref, opt):
        o.skip_if_nonfinite = skip_nonfinite
    p0 = [q.detach().clone() for q in ref_model.parameters()]
    diffs, moved, counts, ref_counts = [], [], [], []
    for step in range(steps):
        if ns_log is not None:
            ns_log.clear()
        _step(ref_model, ref, step, closure_based, poison=step == poison_step)
        if ns_log is not None:
            ref_counts.append(sorted(ns_log))
            ns_log.clear()
        _step(model, opt, step, closure_based, poison=step == poison_step)
        if ns_log is not None:
            counts.append(sorted(ns_log))
        d, mv = _compare(model, opt, ref_model, ref, p0)
        diffs.append(d)
        moved.append(mv)
    return dict(diffs=diffs, moved=moved, counts=counts, ref_counts=ref_counts), (model, opt, ref_model, ref)


def _error(exc):
    import traceback

    traceback.print_exc()  # on stderr: the other rank may then hang in a collective and time out
    return {"error": f"{type(exc).__name__}: {exc}"}


def _count_newton_schulz(muon_mod):
    """Log every matrix Newton–Schulz sees from now on, as (rows, cols), batches unrolled; returns the
    log and the original function (to put back)."""
    log: list = []
    real = muon_mod.zeropower_via_newtonschulz5

    def counting_ns(G, steps):
        shape = tuple(G.shape)
        log.extend([shape[-2:]] * (shape[0] if len(shape) == 3 else 1))
        return real(G, steps)
    muon_mod.zeropower_via_newtonschulz5 = counting_ns
    return log, real


def _worker(rank, port, out_dir):
    import faulthandler

    faulthandler.dump_traceback_later(int(os.environ.get("DM_TIMEOUT", 240)), exit=True)  # a rank stuck in a collective fails the test
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TRITON_INTERPRET="1")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    import fused_optim
    import fused_optim.muon as muon_mod
    from fused_optim._backends import impl_status

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    mesh = init_device_mesh("cpu", (WORLD,))
    results = {}

    ns_log, real_ns = _count_newton_schulz(muon_mod)

    # bytes this rank sends through all_to_all_single (its own part excluded), per Muon case and step
    sent: list = []
    real_a2a = dist.all_to_all_single

    def counting_a2a(output, input, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        sent.append(sum(input_split_sizes) - input_split_sizes[dist.get_rank(group)])
        return real_a2a(output, input, output_split_sizes, input_split_sizes, group=group, **kw)
    dist.all_to_all_single = counting_a2a

    for name, (make, mesh_shape) in MUON_CASES.items():
        sent.clear()
        impl = name.split("_")[1]
        if impl in ("triton", "native") and not impl_status(impl, "cpu").available:
            results[name] = {"skip": f"{impl}: {impl_status(impl, 'cpu').reason}"}
            continue
        try:
            m = mesh if mesh_shape == "cpu" else init_device_mesh("cpu", mesh_shape, mesh_dim_names=("rep", "shard"))
            results[name], _ = _run_pair(make, m, STEPS, ns_log=ns_log)
            results[name]["a2a_bytes"] = list(sent)
        except Exception as exc:  # noqa: BLE001 - recorded per case
            results[name] = _error(exc)
    muon_mod.zeropower_via_newtonschulz5 = real_ns
    dist.all_to_all_single = real_a2a

    for name in OTHER_CASES:
        try:
            results[name], _ = _run_pair(_other(name), mesh, STEPS, closure_based=name in CLOSURE,
                                         poison_step=1 if name == "lion_skip_nonfinite" else None,
                                         skip_nonfinite=name == "lion_skip_nonfinite")
        except Exception as exc:  # noqa: BLE001
            results[name] = _error(exc)

    for name in MIXED_CASES:
        try:
            results[name], _ = _run_pair(_mixed(name), mesh, STEPS, closure_based=name == "mixed_sam", partly=True)
        except Exception as exc:  # noqa: BLE001
            results[name] = _error(exc)

    # DDP: plain tensors, averaged grads: the single-device step as it is
    try:
        from torch.nn.parallel import DistributedDataParallel

        make = _muon("foreach", weight_decay=0.1)
        ref_model, ddp = _Net(), DistributedDataParallel(_Net())
        ref, opt = make(ref_model), make(ddp.module)
        diffs = []
        for step in range(STEPS):
            for mdl, o in ((ref_model, ref), (ddp, opt)):
                o.zero_grad()
                _loss(mdl, step).backward()
                o.step()
            diffs.append(_compare(ddp.module, opt, ref_model, ref, [q for q in ref_model.parameters()])[0])
        results["muon_ddp"] = {"diffs": diffs}
    except Exception as exc:  # noqa: BLE001
        results["muon_ddp"] = _error(exc)

    # sharded checkpoint round trip: 2 steps, save, a fresh model + optimizer load it, 2 more steps ==
    # 4 uninterrupted steps
    try:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        make = _muon("foreach", weight_decay=0.1)
        _, (model, opt, _, _) = _run_pair(make, mesh, 2)
        path = os.path.join(out_dir, "ckpt")
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=path)
        model2 = _shard(_Net(), mesh)
        opt2 = make(model2)
        sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model2, sd["model"])
        set_optimizer_state_dict(model2, opt2, sd["optim"])
        for step in (2, 3):
            _step(model, opt, step, False)
            _step(model2, opt2, step, False)
        worst = 0.0
        for p, q in zip(model.parameters(), model2.parameters()):
            worst = max(worst, (_full(p.detach()) - _full(q.detach())).abs().max().item())
            for key, v in opt.state[p].items():
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.ndim:
                    worst = max(worst, (_full(v) - _full(opt2.state[q][key])).abs().max().item())
                    assert isinstance(opt2.state[q][key], DTensor), key
        results["checkpoint"] = {"diff": worst}
    except Exception as exc:  # noqa: BLE001
        results["checkpoint"] = _error(exc)

    # a compiled step runs a fused impl as an opaque op, at run time, outside the shard context: a
    # per-tensor reduction (Gravity's max|g|) must be refused there, not computed on the shard alone
    # (the tracing is simulated: the step runs eagerly with torch.compiler.is_compiling() True)
    fused = next((i for i in ("native", "triton") if impl_status(i, "cpu").available
                  and getattr(fused_optim.Gravity._impls[i], "shard_aware", False)), None)
    if fused is None:
        results["compiled_reduction"] = {"skip": "no shard-aware fused Gravity impl on this machine"}
    else:
        model = _shard(_Net(), mesh)
        opt = fused_optim.Gravity(model.parameters(), lr=0.05, impl=fused)
        _loss(model, 0).backward()
        real_is_compiling = torch.compiler.is_compiling
        torch.compiler.is_compiling = lambda: True
        try:
            opt.step()
            results["compiled_reduction"] = {"error_message": None}
        except RuntimeError as exc:
            results["compiled_reduction"] = {"error_message": str(exc)}
        finally:
            torch.compiler.is_compiling = real_is_compiling

    # layouts a row exchange cannot assemble: refused, naming the param and its placement
    refusals = {}
    for label, make_p in (("shard1", lambda: distribute_tensor(torch.randn(6, 4), mesh, [Shard(1)])),
                          ("partial", lambda: DTensor.from_local(torch.randn(6, 4), mesh, [Partial()]))):
        try:
            fused_optim.Muon([nn.Parameter(torch.randn(5, 5)), nn.Parameter(make_p())], lr=0.02)
            refusals[label] = None
        except ValueError as exc:
            refusals[label] = str(exc)
    results["refusals"] = refusals

    finish_rank(results, rank, out_dir)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_ranks(_worker, WORLD, tmp_path_factory.mktemp("dist_muon"))


def _case(results, name):
    if "skip" in results[0][name]:
        pytest.skip(results[0][name]["skip"])
    for rank, res in enumerate(results):
        assert "error" not in res[name], f"rank {rank}: {res[name]['error']}"
    return [res[name] for res in results]


@pytest.mark.parametrize("name", sorted(MUON_CASES))
def test_muon_sharded_equals_unsharded(results, name):
    for rank, r in enumerate(_case(results, name)):
        for step, (d, mv) in enumerate(zip(r["diffs"], r["moved"])):
            assert mv > 0.01, "the params must move for the comparison to mean anything"
            assert d <= NS_TOL, f"{name} rank {rank} step {step}: sharded differs by {d} (params moved {mv})"


@pytest.mark.parametrize("name", sorted(n for n, (_, shape) in MUON_CASES.items() if shape != (2, 1)))
def test_muon_each_matrix_orthogonalized_once(results, name):
    """Over both ranks, the matrices Newton–Schulz sees in a step are exactly the unsharded step's
    matrices (each whole, each once), and both ranks get work."""
    per_rank = _case(results, name)
    for step in range(STEPS):
        together = Counter()
        for r in per_rank:
            together.update(tuple(s) for s in r["counts"][step])
            assert r["counts"][step], f"step {step}: a rank orthogonalized nothing (the work is not split)"
        assert together == Counter(tuple(s) for s in per_rank[0]["ref_counts"][step]), step


@pytest.mark.parametrize("name", ["muon_foreach_wd", "muon_hsdp_1x2", "muon_triton"])
def test_muon_exchange_bytes_match_the_documented_formula(results, name):
    """Two all_to_all_single per step, each rank sending what `row_exchange_bytes` says (bf16)."""
    from fused_optim.distributed import row_exchange_bytes

    # the model's row-sharded Muon matrices (the 3-D one stays where it is)
    shapes = [(6, 6), (9, 6), (4, 9), (1, 4), (3, 8)]
    expected = row_exchange_bytes(shapes, WORLD)
    for rank, r in enumerate(_case(results, name)):
        per_call = r["a2a_bytes"]
        assert len(per_call) == 2 * STEPS, per_call
        assert [per_call[2 * s] + per_call[2 * s + 1] for s in range(STEPS)] == [expected[rank]] * STEPS


def test_owner_plan_balances_and_counts():
    from fused_optim.distributed import assign_owners, row_exchange_bytes

    gpt2 = [(3 * 768, 768), (768, 768), (4 * 768, 768), (768, 4 * 768)] * 12
    S = sum(m * n for m, n in gpt2)
    for w in (2, 4, 8):
        owners = assign_owners(gpt2, w)
        assert sorted(Counter(owners)) == list(range(w))  # every rank owns matrices
        # even shards, byte-balanced owners: 4S(w-1)/w^2 bytes per rank (README)
        assert max(row_exchange_bytes(gpt2, w)) <= 1.05 * 4 * S * (w - 1) / w ** 2
    # uneven rows (2 + 1, rank 0 owns): rank 1 sends its row, rank 0 sends it back its row of the result
    assert row_exchange_bytes([(3, 4)], 2) == [8, 8]
    # fewer rows than ranks: the owner (rank 0, the least loaded) holds every row, nothing moves
    assert row_exchange_bytes([(1, 4)], 2) == [0, 0]


def test_muon_replicas_orthogonalize_whole_matrices(results):
    # a (2, 1) mesh: the rows are not sharded; each replica runs the single-device step
    for r in _case(results, "muon_hsdp_2x1"):
        assert r["counts"] == r["ref_counts"]


@pytest.mark.parametrize("name", OTHER_CASES)
def test_composites_sharded_equals_unsharded(results, name):
    for rank, r in enumerate(_case(results, name)):
        for step, (d, mv) in enumerate(zip(r["diffs"], r["moved"])):
            # sums of per-shard partials (SAM's and Adan's norms) round differently from one sum
            assert d <= 1e-6, f"{name} rank {rank} step {step}: sharded differs by {d} (params moved {mv})"
        assert r["moved"][-1] > 1e-3


@pytest.mark.parametrize("name", MIXED_CASES)
def test_partly_sharded_model_equals_unsharded(results, name):
    for rank, r in enumerate(_case(results, name)):
        for step, (d, mv) in enumerate(zip(r["diffs"], r["moved"])):
            assert d <= 1e-6, f"{name} rank {rank} step {step}: sharded differs by {d} (params moved {mv})"


def test_skip_nonfinite_skips_on_every_rank(results):
    # step 1 has a NaN in rank 0's shard only: the params after step 1 equal those after step 0 on both
    # ranks and equal the unsharded run (which skipped too)
    for r in _case(results, "lion_skip_nonfinite"):
        assert r["moved"][1] == r["moved"][0]
        assert r["diffs"][1] == 0.0


def test_muon_ddp_unchanged(results):
    for r in _case(results, "muon_ddp"):
        assert r["diffs"] == [0.0] * STEPS


def test_muon_sharded_checkpoint_round_trip(results):
    for r in _case(results, "checkpoint"):
        assert r["diff"] == 0.0


def test_compiled_fused_reduction_on_shards_is_refused(results):
    for r in _case(results, "compiled_reduction"):
        msg = r["error_message"]
        assert msg and "torch.compile" in msg and "impl='foreach'" in msg, msg


@pytest.mark.parametrize("label,placement", [("shard1", "Shard(dim=1)"), ("partial", "Partial")])
def test_muon_refuses_layouts_it_cannot_assemble(results, label, placement):
    for res in results:
        msg = res["refusals"][label]
        assert msg is not None, f"{label} was accepted"
        assert "parameter 1 of param group 0" in msg and placement in msg and "use_muon=False" in msg, msg


def test_bench_naive_scheme_bytes():
    """`python -m bench --distributed`'s naive scheme: every rank sends its rows of every matrix to each
    other rank, 2S(w-1)/w bytes (README); the owner scheme's prediction for gpt2-124m on 2 ranks equals it."""
    from bench.distributed import gather_all_bytes, gpt2_muon_shapes
    from fused_optim.distributed import row_exchange_bytes

    shapes = gpt2_muon_shapes()
    S = sum(m * n for m, n in shapes)
    assert len(shapes) == 48 and S == 84_934_656
    for w in (2, 4, 8):
        assert gather_all_bytes(shapes, w) == [2 * S * (w - 1) // w] * w
    assert row_exchange_bytes(shapes, 2) == gather_all_bytes(shapes, 2)


def _hsdp_worker(rank, port, out_dir):
    import faulthandler

    faulthandler.dump_traceback_later(int(os.environ.get("DM_TIMEOUT", 240)), exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import fused_optim.muon as muon_mod

    dist.init_process_group("gloo", rank=rank, world_size=4)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rep", "shard"))
    ns_log, _ = _count_newton_schulz(muon_mod)
    try:
        res, _ = _run_pair(_muon("foreach", weight_decay=0.1), mesh, 3, ns_log=ns_log)
    except Exception as exc:  # noqa: BLE001
        res = _error(exc)
    finish_rank(res, rank, out_dir)


@pytest.mark.slow
def test_muon_hsdp_2x2_four_ranks(tmp_path):
    """HSDP with 2 replicas x 2 shards (4 processes): equal to unsharded; in each shard group the two
    ranks orthogonalize the step's matrices between them, each once."""
    per_rank = run_ranks(_hsdp_worker, 4, tmp_path)
    for rank, r in enumerate(per_rank):
        assert "error" not in r, f"rank {rank}: {r.get('error')}"
        assert max(r["diffs"]) <= NS_TOL, (rank, r["diffs"])
    for group in ((0, 1), (2, 3)):  # mesh rows: the shard groups
        for step in range(3):
            together = Counter()
            for rank in group:
                together.update(tuple(s) for s in per_rank[rank]["counts"][step])
            assert together == Counter(tuple(s) for s in per_rank[group[0]]["ref_counts"][step])
