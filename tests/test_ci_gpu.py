"""`.ci/gpu`, the staged GPU run: its plan, its rehearsal on this CPU machine, and the two scripts it runs
(the kernel driver for compute-sanitizer, the correctness stage's test runner)."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"ci_{name}", REPO / ".ci" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _plan(*args: str) -> list[tuple[str, str, int]]:
    out = subprocess.run(["bash", ".ci/gpu", "--plan", *args], cwd=REPO, capture_output=True, text=True, check=True)
    return [(w[0], w[1] if len(w) == 3 else "", int(w[-1])) for w in (line.split() for line in out.stdout.splitlines())]


def test_plan_fits_the_window():
    """Default plan: at least 3 stages, the sanitizer among them, within 540 s; the total adds up."""
    lines = _plan()
    stages = [(n, s) for kind, n, s in lines if kind == "stage"]
    assert [n for n, _ in stages] == ["env", "sanitizer", "correctness", "bench"]
    assert lines[-1][0] == "total" and lines[-1][2] == sum(s for _, s in stages) <= 540
    slow = _plan("--slow")
    assert [n for k, n, _ in slow if k == "stage"][-1] == "slow"
    assert [n for k, n, _ in _plan("--only", "bench,env") if k == "stage"] == ["env", "bench"]  # run order kept
    assert _plan("--budget", "bench=30")[3] == ("stage", "bench", 30)
    bad = subprocess.run(["bash", ".ci/gpu", "--plan", "--budget", "bnech=30"], cwd=REPO, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "STAGE=SECONDS" in bad.stderr


def test_rehearsal_passes_without_a_gpu():
    """Every check a GPU-less machine can make: driver on the CPU, test selection, bench preset, the
    compute-sanitizer command lines (through the real tool when one is found), the install command."""
    proc = subprocess.run(["bash", ".ci/gpu", "--rehearse"], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    for check in ("env.install-dry-run", "sanitizer.driver-cpu", "sanitizer.memcheck-cmdline",
                  "sanitizer.racecheck-cmdline", "correctness.collect", "bench.preset"):
        assert re.search(rf"^ok +{re.escape(check)} ", proc.stdout, re.M), (check, proc.stdout)
    assert "rehearsal: every check passed" in proc.stdout


def test_kernel_driver_enumerates_every_kernel_from_the_sources():
    drv = _load("kernel_driver")
    ops = drv.native_cuda_ops()
    listed = re.findall(r"^FO_OP\((\w+),", (REPO / "csrc" / "ops_list.h").read_text(), re.M)
    assert set(listed) < set(ops) and len(listed) >= 11
    assert {"adan_", "lion_", "adan_lowbit_", "lion_lowbit_"} <= set(ops)
    rules = (REPO / "csrc" / "math" / "elementwise_rules.h").read_text().split("#define FO_ELEMENTWISE_RULES(X)")[1]
    by_name = re.findall(r'\.impl\(\s*"(\w+)"', (REPO / "csrc" / "register_kernels.h").read_text())
    # + two ops per rule (its update and its lowbit op) + the ops register_kernels.h names (Adan's and
    # Gravity's lowbit ops)
    assert len(ops) == len(set(ops)) == len(listed) + 2 * len(re.findall(r"X\((\w+)\)", rules)) + len(by_name)
    kernels = drv.triton_kernels()
    assert {"_lion_kernel", "_partials_kernel", "_sam_norms_finish_kernel", "_muon_apply_kernel"} <= set(kernels)
    assert "fn" not in kernels  # kernel_for's own parameter is not a kernel
    # every case's functional name exists for both impls
    for case in drv.CASES + drv._declared_cases(drv.CASES):
        assert set(drv.impl_fns(case.name)) == {"native", "triton"}


def test_kernel_driver_fails_when_a_kernel_has_no_case(monkeypatch, capsys):
    """A kernel nobody launches (here: Lion's, its case removed) fails the driver, naming the kernel."""
    import fused_optim
    import fused_optim._native as native
    import fused_optim.kernels as kernels

    if not fused_optim.available_impls("cpu")["native"].available:
        pytest.skip("native extension not built")
    drv = _load("kernel_driver")
    # the driver patches these to record launches: let monkeypatch put them back afterwards
    monkeypatch.setattr(native, "_ops", native._ops)
    mt = kernels.kernel_module("multi_tensor")  # every launch goes through its kernel_for (`Launch`)
    monkeypatch.setattr(mt, "kernel_for", mt.kernel_for)
    assert drv.main(["--device", "cpu", "--small", "--impls", "native"]) == 0
    monkeypatch.setattr(drv, "CASES", [c for c in drv.CASES if c.name != "lion"])
    monkeypatch.setattr(drv, "_declared_cases", lambda hand: [])  # else Lion gets the generic declared case
    assert drv.main(["--device", "cpu", "--small", "--impls", "native"]) == 1
    assert "never launched: native:lion_" in capsys.readouterr().out


def test_family_order_puts_one_test_per_kernel_family_first():
    gt = _load("gpu_tests")
    ids = ["tests/test_native.py::test_fp32[lion-cuda]", "tests/test_native.py::test_fp32[adan-cuda]",
           "tests/test_native.py::test_amp[lion-cuda]", "tests/test_triton.py::test_lion_matches[cuda]",
           "tests/test_triton_composites.py::test_sam_norms[cuda]", "tests/test_triton.py::test_same_thing[cuda]",
           "tests/test_native.py::test_fp32[gradient_equilibrium-cuda]", "tests/test_amp.py::test_amp[lion]",
           "tests/test_native.py::test_fp32[ge-cuda]"]
    assert gt.family(ids[4]) == ("tests/test_triton_composites.py", "sam")
    assert gt.family(ids[5]) == ("tests/test_triton.py", "test_same_thing")  # "same" is not SAM
    assert gt.family(ids[6]) == ("tests/test_native.py", "gradient_equilibrium")
    assert gt.family(ids[8]) == gt.family(ids[6])  # "ge" is GradientEquilibrium's short name in test ids
    # kernel files' families first (collection order), then the other files', then the rest
    assert gt.order(ids) == [ids[0], ids[1], ids[3], ids[4], ids[5], ids[6], ids[7], ids[2], ids[8]]


def test_correctness_runner_limits_each_test_and_survives_a_hang(tmp_path):
    """-x off; a test past its limit fails as `timeout`; one Python cannot interrupt is killed and pytest
    starts again on the rest; results are written as they come; the summary counts everything."""
    (tmp_path / "test_fake.py").write_text(
        "import signal, time, pytest\n"
        "def test_lion_ok(): pass\n"
        "def test_adan_fails(): assert False\n"
        "def test_gravity_slow(): time.sleep(60)\n"
        "def test_sam_hangs():\n"
        "    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})\n"
        "    time.sleep(60)\n"
        "def test_muon_skipped(): pytest.skip('x')\n"
        "def test_lion_again(): pass\n")
    out = tmp_path / "out"
    env = dict(__import__("os").environ, FUSED_OPTIM_CI_KILL_GRACE="2")
    proc = subprocess.run([sys.executable, str(REPO / ".ci" / "gpu_tests.py"), "--out", str(out), "--tag", "t",
                           "--marker", "not slow", "--per-test", "1.5", "--budget", "120",
                           str(tmp_path / "test_fake.py")], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 1  # a failure, a timeout and a kill
    assert "correctness: 2 passed, 1 failed, 1 timeout, 1 killed, 1 skipped" in proc.stdout, proc.stdout[-3000:]
    order = (out / "t-tests-order.txt").read_text().split("\n")
    assert [o.split("::")[1] for o in order] == ["test_lion_ok", "test_adan_fails", "test_gravity_slow",
                                                 "test_sam_hangs", "test_muon_skipped", "test_lion_again"]
    ends = [json.loads(line) for line in (out / "t-tests.jsonl").read_text().splitlines()]
    assert {e["nodeid"].split("::")[1]: e["outcome"] for e in ends if e["event"] == "end"}["test_gravity_slow"] \
        == "timeout"
