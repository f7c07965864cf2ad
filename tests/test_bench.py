"""The benchmark harness (`python -m bench`): end to end on CPU, impl discovery, peers, the floor."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_optim
from fused_optim.declaration import declared
from bench import candidates as bc
from bench.candidates import OPTIMIZERS, PEERS, candidates_for
from bench.params import PARAM_SETS, make_params
from bench.report import KERNEL_COLUMNS, STEP_COLUMNS
from bench.timing import stats_of

REPO = Path(__file__).resolve().parent.parent
#: every declared optimizer with impls of its own: each gets a bench row without a table edit
OURS = [name for name, (decl, _) in declared().items() if decl.impls and decl.alias_of is None]


def _read(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        return list(r.fieldnames or []), list(r)


def test_quick_end_to_end(tmp_path):
    """`python -m bench --quick` as a user runs it: CSVs with the documented columns, PNGs, metadata."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    csvs = sorted(tmp_path.glob("*-cpu.csv"))
    assert len(csvs) == 1
    cols, rows = _read(csvs[0])
    assert cols == STEP_COLUMNS
    got = {(r["param_set"], r["optimizer"], r["impl"]) for r in rows}
    for pset in ("gpt2-tiny", "many-small-tiny"):
        assert (pset, "adamw", "torch-fused") in got
        for opt in OURS:
            for impl in ("forloop", "foreach"):  # today's impls; others join when available_impls says so
                assert (pset, opt, impl) in got, (pset, opt, impl)
    if ("gpt2-tiny", "lion", "native") in got:  # auto mode's impl here, with the fused low-precision pass
        for opt in ("lion", "adan", "gravity"):
            assert {("gpt2-tiny", opt, "native+bf16"), ("gpt2-tiny", opt, "native+8bit")} <= got
    for r in rows:
        assert r["hardware"] and r["torch"] == torch.__version__ and r["commit"] and r["triton"]
        med, p20, p80 = float(r["median_ms"]), float(r["p20_ms"]), float(r["p80_ms"])
        assert 0 < p20 <= med <= p80 and math.isfinite(p80)
        spec = OPTIMIZERS[r["optimizer"]]
        if "+" in r["impl"]:  # a state_precision row: the floor's bytes from the state as measured
            # both columns are rounded to 3 decimals (the floor's from the unrounded state bytes, which it
            # counts twice): 0.0005 + 2 x 0.0005 apart at most
            assert float(r["bytes_per_param"]) == pytest.approx(
                spec.bytes_per_param_measured(4, float(r["state_bytes_per_param"])), abs=1.5e-3 + 1e-9)
        else:
            assert float(r["bytes_per_param"]) == spec.bytes_per_param(4, 4)
        gbps = float(r["achieved_gbps"])
        expected = float(r["bytes_per_param"]) * int(r["numel"]) / (med * 1e-3) / 1e9
        assert gbps == pytest.approx(expected, rel=1e-2)
        assert float(r["pct_of_floor"]) == pytest.approx(100 * gbps / float(r["floor_gbps"]), rel=2e-2)
        assert float(r["pct_of_copy"]) == pytest.approx(100 * gbps / float(r["copy_gbps"]), rel=2e-2)
        assert r["floor_check"] == ("ok" if float(r["pct_of_floor"]) <= 105 else "above floor: measurement problem")
        assert float(r["vs_adamw_fused"]) > 0
    kcols, krows = _read(next(tmp_path.glob("*-cpu-kernels.csv")))
    assert kcols == KERNEL_COLUMNS
    kinds = {(r["kind"], r["kernel"], r["impl"]) for r in krows}
    assert {("reduce", "absmax", "torch._foreach_norm"), ("update", "lion", "foreach"),
            ("update", "adamw", "torch-fused")} <= kinds
    for png in ("*-cpu.png", "*-cpu-kernels.png"):
        path = next(tmp_path.glob(png))
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    meta = json.loads(next(tmp_path.glob("*-cpu.json")).read_text())
    assert meta["copy_gbps_before"] > 0 and meta["floor_gbps_before"] > 0 and meta["threads"] == "1"
    assert "| optimizer | impl |" in proc.stdout
    for peer in PEERS:  # every peer is either timed or skipped with a note saying why
        if "cpu" not in peer.devices:
            continue
        timed = (peer.optimizer, peer.impl) in {(r["optimizer"], r["impl"]) for r in rows}
        assert timed or any(n.startswith(f"{peer.optimizer}/{peer.impl}: skipped") for n in meta["notes"]), peer


def test_missing_peers_are_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    """A peer that is not installed is a note in the output, never a crash."""
    real = importlib.util.find_spec
    hidden = {"pytorch_optimizer", "lion_pytorch", "timm", "optimi"}
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.split(".")[0] in hidden else real(name, *a, **k))
    from bench.__main__ import main

    threads = torch.get_num_threads()
    try:
        rc = main(["--quick", "--sets", "many-small-tiny", "--optimizers", "lion,adan", "--no-kernels", "--reps", "2",
                   "--no-plot", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    out = capsys.readouterr().out
    # one line per reason: the optimizers that share it are listed in it
    assert "pytorch_optimizer (lion, adan): skipped, not installed (pip install pytorch_optimizer)" in out
    assert "timm (lion, adan): skipped, not installed (pip install timm)" in out
    notes = out.split("notes:\n", 1)[1].splitlines()
    assert len(notes) == len(set(notes)), notes
    _, rows = _read(next(tmp_path.glob("*.csv")))
    assert {r["source"] for r in rows} == {"fused_optim", "torch"}
    assert {(r["optimizer"], r["impl"]) for r in rows} >= {("lion", "foreach"), ("adan", "forloop")}


def test_impls_are_discovered_from_available_impls(monkeypatch):
    """A new impl shows up in the harness as soon as available_impls says it runs and the class has it."""
    calls = []

    def fake_native(params, grads, exp_avgs, **kw):
        calls.append(len(params))
        fused_optim.lion._foreach_lion(params, grads, exp_avgs, **kw)

    monkeypatch.setitem(fused_optim.Lion._impls, "native", fake_native)
    real = fused_optim.available_impls

    def fake_available(device=None):
        st = dict(real(device))
        st["native"] = fused_optim.ImplStatus(True, "")
        return st
    monkeypatch.setattr(fused_optim, "available_impls", fake_available)
    monkeypatch.setattr(fused_optim._backends, "available_impls", fake_available)
    monkeypatch.setattr(fused_optim._backends, "native_status", lambda dt: fused_optim.ImplStatus(True, ""))
    cands, notes = candidates_for("lion", torch.device("cpu"), impls=None, peers=["torch"], compile_step=False)
    assert [c.impl for c in cands if c.source == "fused_optim"] == ["forloop", "foreach", "native"]
    opt = next(c for c in cands if c.impl == "native").make(make_params(PARAM_SETS["many-small-tiny"], "cpu",
                                                                        torch.float32))
    opt.step()
    assert calls == [200]
    # an optimizer whose class lacks an impl the library reports is a note, not a candidate
    monkeypatch.setattr(fused_optim.Adan, "_impls", {k: v for k, v in fused_optim.Adan._impls.items() if k != "native"})
    cands, notes = candidates_for("adan", torch.device("cpu"), impls=None, peers=["torch"], compile_step=False)
    assert "native" not in [c.impl for c in cands]
    assert any(n.startswith("adan/native: skipped, Adan has no 'native' impl") for n in notes)


def test_bytes_per_param_is_the_spec_floor():
    fp32 = {name: spec.bytes_per_param(4, 4) for name, spec in OPTIMIZERS.items()}
    assert fp32 == {"adamw": 28, "lion": 20, "gravity": 24, "adan": 44, "gradient_equilibrium": 16,
                    "neurooptima": 44}
    # bf16 params with their fp32 state: p read+write 2+2, grad(s) 2 each, state 4+4 each
    assert OPTIMIZERS["lion"].bytes_per_param(2, 4) == 14
    assert OPTIMIZERS["adan"].bytes_per_param(2, 4) == 38
    p = torch.zeros(4, dtype=torch.bfloat16)
    p.grad = torch.ones(4, dtype=torch.bfloat16)
    opt = fused_optim.Lion([p], impl="foreach")
    opt.step()
    assert bc.state_elem_size(opt, p) == 4  # fp32 state for bf16 params on every impl: the bytes follow it


def test_param_sets_have_the_shapes_users_train():
    gpt2 = PARAM_SETS["gpt2-124m"]
    assert gpt2.n_tensors == 148 and gpt2.numel == 124_439_808  # HF GPT-2 small
    llama = PARAM_SETS["llama-1b"]
    assert llama.cuda_only and 1.2e9 < llama.numel < 1.3e9
    small = PARAM_SETS["many-small"]
    sizes = [math.prod(s) for s in small.shapes]
    assert small.n_tensors == 2000 and min(sizes) >= 1 and max(sizes) <= 65536 and len(set(sizes)) > 500
    assert PARAM_SETS["huge"].numel >= 1 << 28 and PARAM_SETS["huge"].cuda_only
    mini = PARAM_SETS["gpt2-mini"]
    assert mini.n_tensors == 148 and not mini.cuda_only
    ps = make_params(PARAM_SETS["gpt2-tiny"], "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.grad is not None and p.grad.abs().sum() > 0 for p in ps)


def test_stats_median_and_spread():
    st = stats_of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (st.median_s, st.min_s, st.n) == (3.0, 1.0, 5)
    assert st.p20_s == pytest.approx(1.8) and st.p80_s == pytest.approx(4.2)


@pytest.mark.parametrize("peer", [p for p in PEERS if "cpu" in p.devices], ids=lambda p: f"{p.optimizer}/{p.impl}")
def test_installed_peer_adapters_step(peer):
    """Each peer adapter builds and steps with our hyperparameters (skipped where the peer is absent)."""
    ok, why = bc._importable(peer.module)
    if not ok:
        pytest.skip(f"{peer.module}: {why}")
    ps = make_params(PARAM_SETS["many-small-tiny"], "cpu", torch.float32)
    before = [p.clone() for p in ps]
    opt = peer.factory(ps, dict(OPTIMIZERS[peer.optimizer].kwargs))
    for _ in range(2):
        opt.step()
    assert all(torch.isfinite(p).all() for p in ps)
    assert any(not torch.equal(a, b) for a, b in zip(before, ps))


def test_update_readme_replaces_only_its_block(tmp_path):
    from bench.report import update_readme

    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table:cpu:start -->\nold table\n<!-- bench-table:cpu:end -->\nrest\n")
    assert update_readme(readme, "cpu", "| new | table |")
    assert readme.read_text() == ("intro\n<!-- bench-table:cpu:start -->\n| new | table |\n"
                                  "<!-- bench-table:cpu:end -->\nrest\n")
    assert not update_readme(readme, "cuda", "x")  # no markers: nothing written, the caller notes it


def test_list_names_sets_impls_and_peers(capsys):
    from bench.__main__ import main

    assert main(["--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "gpt2-124m" in out and "[cuda only]" in out and "foreach" in out and "adamw/torch-fused" in out


def test_a_candidate_failing_mid_run_is_dropped_with_a_note(monkeypatch):
    """A peer that breaks at its 3rd step must not take the group (or the run) down with it."""
    from bench import steps
    from bench.candidates import Candidate

    class Flaky(torch.optim.SGD):
        calls = 0

        def step(self, closure=None):
            Flaky.calls += 1
            if Flaky.calls == 3:
                raise RuntimeError("boom at step 3")
            return super().step(closure)

    real = steps.candidates_for

    def with_flaky(name, device, **kw):
        cands, notes = real(name, device, **kw)
        if name == "lion":
            cands.append(Candidate("lion", "flaky", "peer", lambda ps: Flaky(ps, lr=1e-3)))
        return cands, notes
    monkeypatch.setattr(steps, "candidates_for", with_flaky)
    notes: list[str] = []
    res = steps.run_step_group(PARAM_SETS["many-small-tiny"], torch.float32, torch.device("cpu"), ["adamw", "lion"],
                               impls=["foreach"], peers=["torch"], compile_step=False, warmup=1, reps=2, seed=0,
                               notes=notes, max_replicas=1)
    assert {r.cand.key for r in res} == {"adamw/torch-fused", "adamw/torch-foreach", "lion/foreach"}
    assert any(n.startswith("lion/flaky: failed on many-small-tiny/float32 while timed: RuntimeError: boom") for n in notes)


def test_triton_reduction_makers_run(monkeypatch):
    """The kernels table's Triton reductions (the partials kernel alone) build and run for every op name,
    here interpreted on the CPU: `python -m bench` on a GPU must not meet them for the first time."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from bench.kernels import reduction_impls

    makers, notes = reduction_impls(torch.device("cpu"), ["triton"])
    assert "triton" in makers, notes
    grads = [torch.randn(n) for n in (0, 3, 2049)]
    for op in ("absmax", "sum", "sumsq"):
        makers["triton"](grads, op)()


def _step_result(optimizer, impl, source, median_s, pset="many-small-tiny", dtype=torch.float32):
    from bench.candidates import Candidate
    from bench.steps import StepResult
    from bench.timing import Stats

    return StepResult(PARAM_SETS[pset], dtype, Candidate(optimizer, impl, source, lambda ps: None),
                      Stats(median_s, median_s * 0.9, median_s * 1.1, median_s * 0.8, 5),
                      OPTIMIZERS[optimizer].bytes_per_param(4, 4), None)


def test_a_row_faster_than_the_floor_is_flagged_not_printed():
    """At 10 GB/s of floor, a step moving its bytes at 20 GB/s is a measurement problem: the table says so
    instead of printing 200 %; rows under the floor print their percentage."""
    from bench import report

    numel = PARAM_SETS["many-small-tiny"].numel
    fast = _step_result("lion", "native", "fused_optim", 20 * numel / 20e9)   # 20 B/param at 20 GB/s
    slow = _step_result("adamw", "torch-fused", "torch", 28 * numel / 5e9)   # 28 B/param at 5 GB/s
    rows = report.step_rows([fast, slow], {}, copy_gbps=4.0, modes={}, floor_gbps=10.0)
    by = {r["optimizer"]: r for r in rows}
    assert by["lion"]["pct_of_floor"] == pytest.approx(200) and by["lion"]["floor_check"] != "ok"
    assert by["adamw"]["pct_of_floor"] == pytest.approx(50) and by["adamw"]["floor_check"] == "ok"
    assert by["adamw"]["pct_of_copy"] == pytest.approx(125)  # copy_ is a reference, not the floor
    md = report.markdown_table(rows)
    lion_line = next(line for line in md.splitlines() if line.startswith("| lion"))
    assert "measurement problem" in lion_line and "200" not in lion_line
    assert "| 50 |" in next(line for line in md.splitlines() if line.startswith("| adamw"))
    krows = report.kernel_rows([{"achieved_gbps": 10.6}, {"achieved_gbps": 10.4}], {}, copy_gbps=5.0, floor_gbps=10.0)
    assert [r["floor_check"] for r in krows] == ["above floor: measurement problem", "ok"]


def test_the_floor_is_a_floor_for_the_native_steps():
    """Measured: native Lion moves its 20 B/param at most ~the in-place stream's rate (it read 179 % of
    `copy_`'s on this CPU, which is why `copy_` is no floor). Interleaved, so load hits both alike."""
    from bench.timing import stream_bandwidth, time_interleaved

    if not fused_optim.available_impls("cpu")["native"].available:
        pytest.skip("native extension not built")
    n = (96 << 20) // 12  # p, g, m: 96 MiB, several times the last-level cache
    p, g, m = torch.randn(n), torch.randn(n) * 1e-2, torch.randn(n) * 1e-3
    buf = torch.rand(2 * (48 << 20) // 4)  # stream_bandwidth's working set for 48 MiB: the same 96 MiB
    ops = torch.ops.fused_optim
    samples, _ = time_interleaved(
        {"lion": lambda: ops.lion_([p], [g], [m], 1e-9, 0.9, 0.99, 0.0, False), "floor": lambda: buf.neg_()},
        device=torch.device("cpu"), warmup=2, reps=9, min_sample_s=0)
    lion_gbps = 20 * n / stats_of(samples["lion"]).median_s / 1e9
    floor_gbps = 2 * buf.numel() * 4 / stats_of(samples["floor"]).median_s / 1e9
    assert lion_gbps <= 1.25 * floor_gbps, (lion_gbps, floor_gbps)
    assert stream_bandwidth(torch.device("cpu"), 8 << 20, reps=3)[0] > 0


def test_gpu_window_preset_parses_and_resolves(capsys):
    """.ci/gpu's bench stage: the preset's sets, dtypes and kernel grid exist; --dry-run needs no GPU."""
    from bench.__main__ import PRESETS, expand_presets, main

    assert main(["--preset", "gpu-window", "--device", "cuda", "--dry-run", "--reps", "3"]) == 0
    out = capsys.readouterr().out
    assert "sets ['gpt2-124m', 'many-small']" in out and "'bfloat16'" in out and "reps 3" in out
    assert expand_presets(["--preset=gpu-window", "--reps", "3"]) == PRESETS["gpu-window"] + ["--reps", "3"]
    with pytest.raises(SystemExit):
        expand_presets(["--preset", "nope"])


def test_max_seconds_writes_what_ran_and_says_what_did_not(tmp_path):
    from bench.__main__ import main

    threads = torch.get_num_threads()
    try:
        rc = main(["--quick", "--max-seconds", "0", "--no-plot", "--out", str(tmp_path), "--optimizers", "lion"])
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    meta = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert meta["cut_short"] and any("not run, --max-seconds 0 reached" in n for n in meta["notes"])


def _rows_for_plots(peer: bool):
    from bench import report

    res = []
    for pset in ("many-small-tiny", "gpt2-tiny"):
        # the two sets measure different orderings: the bars must still stand in one order
        k = 1 if pset == "gpt2-tiny" else -1
        res += [_step_result("adamw", "torch-fused", "torch", 1e-3, pset),
                _step_result("lion", "foreach", "fused_optim", 1e-3 * (2 + k), pset),
                _step_result("lion", "native", "fused_optim", 1e-3 * (2 - k), pset),
                _step_result("lion", "forloop", "fused_optim", 0.2, pset)]  # past 5x AdamW: cut, labelled
        if peer:
            res.append(_step_result("lion", "timm", "peer", 3e-3, pset))
    return report.step_rows(res, {}, copy_gbps=1.0, modes={}, floor_gbps=2.0)


def test_step_plot_reads_without_the_issue_beside_it():
    from bench import report

    plt = report._pyplot()
    fig = report.steps_figure(_rows_for_plots(peer=False), "t")
    try:
        legend = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
        assert legend == ["fused_optim (ours)", "torch (yardstick)"]  # no "peer" when none ran
        axes = fig.axes
        ticks = [[t.get_text() for t in ax.get_xticklabels()] for ax in axes]
        assert all(t == ticks[0] for t in ticks) and ticks[0][0] == "adamw/torch-fused"
        assert ticks[0][1:] == ["lion/forloop", "lion/foreach", "lion/native"]  # by impl, never by time
        for ax in axes:
            assert ax.get_ylim()[0] == 0 and ax.get_yscale() == "linear"
        assert "lower is better" in axes[0].get_ylabel() and "higher is better" in axes[1].get_ylabel()
        assert any("200" in t.get_text() for t in axes[0].texts)  # the cut forloop bar carries its value
    finally:
        plt.close(fig)
    fig = report.steps_figure(_rows_for_plots(peer=True), "t")
    try:
        assert "peer" in [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    finally:
        plt.close(fig)


def test_kernel_plot_states_the_element_count_and_starts_at_zero():
    from bench import report

    rows = [{"kind": "update", "kernel": "lion", "impl": impl, "dtype": "float32", "n_tensors": n,
             "numel": 1 << 18, "achieved_gbps": g} for impl, g0 in (("foreach", 3.0), ("native", 9.0))
            for n, g in ((1, g0), (32, g0 / 2), (1024, g0 / 4))]
    rows = report.kernel_rows(rows, {}, copy_gbps=4.0, floor_gbps=10.0)
    plt = report._pyplot()
    fig = report.kernels_figure(rows, "t")
    try:
        ax = fig.axes[0]
        assert "2^18" in ax.get_xlabel() and "0.262M elements" in ax.get_xlabel()
        assert ax.get_ylim()[0] == 0 and "higher is better" in ax.get_ylabel()
    finally:
        plt.close(fig)


def test_collapse_notes_prints_each_reason_once():
    from bench.__main__ import collapse_notes

    why = "skipped, Triton runs on CPU tensors only under TRITON_INTERPRET=1 (set before: import)"
    notes = ["threads: 1 (load average 3.0)", f"lion/triton: {why}", "lion/native: skipped, built: no",
             f"adan/triton: {why}", f"gravity/triton: {why}", "set big: skipped, GPU only"]
    assert collapse_notes(notes) == ["threads: 1 (load average 3.0)", f"triton (lion, adan, gravity): {why}",
                                     "lion/native: skipped, built: no", "set big: skipped, GPU only"]
