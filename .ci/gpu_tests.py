"""The correctness stage of `.ci/gpu`: the `gpu` tests in an order that pays off when the window is cut.

    python .ci/gpu_tests.py --out DIR --tag TAG [--marker EXPR] [--budget S] [--per-test S] [--collect-only]

One test per kernel family first (the family: the test file and the kernel or optimizer its id names,
e.g. test_native.py/adan), then the rest in collection order; `-x` off; a per-test time limit; a
deadline after which no test starts. Results go to DIR/TAG-tests.jsonl one line per test as it
finishes (so a killed stage keeps what ran), and the summary line to DIR/TAG-tests.txt and stdout.

The time limit needs no plugin from outside (the GPU machine has no network and pytest-timeout may be
absent): this file is also the pytest plugin (`-p gpu_tests`). A test over its limit gets a SIGALRM
that fails it with `TestTimeout`; one stuck where Python cannot interrupt it (a hung kernel, a
blocking CUDA call) is killed with the whole process by faulthandler a little later, and this runner
starts pytest again on the tests not yet run, recording that one as `killed`.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_ENV_ORDER, _ENV_RESULTS, _ENV_DEADLINE, _ENV_LIMIT = ("FUSED_OPTIM_CI_ORDER", "FUSED_OPTIM_CI_RESULTS",
                                                      "FUSED_OPTIM_CI_DEADLINE", "FUSED_OPTIM_CI_TEST_LIMIT")
#: words naming a kernel family in a test id, most specific first; short names the tests use map to one family
FAMILY_WORDS = ("gradient_equilibrium", "equilibrium", "ge", "neuro_optima", "neurooptima", "lookahead", "gravity",
                "lion", "adan", "sam", "muon", "stats", "l2norm")
SYNONYMS = {"equilibrium": "gradient_equilibrium", "ge": "gradient_equilibrium", "neurooptima": "neuro_optima"}
# after the soft limit, faulthandler ends a process that Python could not interrupt
KILL_GRACE_S = float(os.environ.get("FUSED_OPTIM_CI_KILL_GRACE", "15"))


def family(nodeid: str) -> tuple[str, str]:
    """(test file, kernel family) of a test id; a test naming no family is its own (its function)."""
    path, _, rest = nodeid.partition("::")
    low = rest.lower()
    for word in FAMILY_WORDS:
        if re.search(rf"(?<![a-z]){word}(?![a-z])", low):
            return path, SYNONYMS.get(word, word)
    return path, rest.split("[")[0]


def order(nodeids: list[str]) -> list[str]:
    """The first test of each family, the kernel test files' (native, triton) before the others' (AMP,
    capture, compile, checkpoints: slower, and they build on the kernels), then every other test, each
    part in collection order."""
    seen, first, rest = set(), [], []
    for nid in nodeids:
        fam = family(nid)
        (rest if fam in seen else first).append(nid)
        seen.add(fam)
    first.sort(key=lambda nid: not re.search(r"native|triton", nid.partition("::")[0]))  # stable: keeps the order
    return first + rest


# ------------------------------------------------------------------------------ the pytest plugin
class TestTimeout(Exception):
    """The test ran past the per-test limit (the correctness stage of .ci/gpu)."""


def _write(record: dict) -> None:
    path = os.environ.get(_ENV_RESULTS)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a killed process must leave the start record behind


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: order only what runs
def pytest_collection_modifyitems(session, config, items):
    path = os.environ.get(_ENV_ORDER)
    if not path:
        return
    wanted = Path(path).read_text().split("\n") if Path(path).exists() else []
    if not wanted:  # first run: this collection defines the order
        wanted = order([it.nodeid for it in items])
        Path(path).write_text("\n".join(wanted))
    done = set()
    results = os.environ.get(_ENV_RESULTS)
    if results and Path(results).exists():
        for line in Path(results).read_text().splitlines():
            rec = json.loads(line)
            done.add(rec["nodeid"])  # a started test is never retried: it may hang again
    rank = {nid: i for i, nid in enumerate(wanted)}
    keep = sorted((it for it in items if it.nodeid in rank and it.nodeid not in done), key=lambda it: rank[it.nodeid])
    dropped = [it for it in items if it.nodeid not in rank or it.nodeid in done]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    items[:] = keep


def _alarm(signum, frame):
    raise TestTimeout(f"over the per-test limit of {os.environ.get(_ENV_LIMIT)} s")


_REPORTS: dict[str, list] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Start record, soft limit (SIGALRM), hard limit (faulthandler ends the process)."""
    import faulthandler

    limit = float(os.environ.get(_ENV_LIMIT, "0") or 0)
    _write({"nodeid": item.nodeid, "event": "start", "t": time.time()})
    if limit > 0:
        signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
        faulthandler.dump_traceback_later(limit + KILL_GRACE_S, exit=True)
    try:
        yield
    finally:
        if limit > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
            faulthandler.cancel_dump_traceback_later()
    outcome, duration, timed_out = "passed", 0.0, False
    for rep in _REPORTS.pop(item.nodeid, []):
        duration += rep.duration
        if "TestTimeout" in str(rep.longrepr or ""):
            timed_out = True
        if rep.failed:
            outcome = "failed" if rep.when == "call" else "error"
        elif rep.skipped and outcome == "passed":
            outcome = "skipped"
    _write({"nodeid": item.nodeid, "event": "end", "outcome": "timeout" if timed_out else outcome,
            "duration": round(duration, 3)})
    deadline = float(os.environ.get(_ENV_DEADLINE, "0") or 0)
    if deadline and time.time() >= deadline:
        item.session.shouldstop = "the correctness stage's time budget is spent"


def pytest_runtest_logreport(report):
    _REPORTS.setdefault(report.nodeid, []).append(report)


# ------------------------------------------------------------------------------ the runner
def _results(path: Path) -> tuple[dict[str, str], dict[str, float]]:
    outcome: dict[str, str] = {}
    dur: dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["event"] == "start":
                outcome.setdefault(rec["nodeid"], "killed")
            else:
                outcome[rec["nodeid"]] = rec["outcome"]
                dur[rec["nodeid"]] = rec["duration"]
    return outcome, dur


def summary_line(outcome: dict[str, str], planned: int, elapsed: float) -> str:
    counts = {k: sum(1 for v in outcome.values() if v == k)
              for k in ("passed", "failed", "error", "timeout", "killed", "skipped")}
    not_run = max(0, planned - len(outcome))
    parts = [f"{counts['passed']} passed", f"{counts['failed']} failed"]
    parts += [f"{n} {k}" for k, n in counts.items() if k not in ("passed", "failed") and n]
    if not_run:
        parts.append(f"{not_run} not run (budget)")
    return "correctness: " + ", ".join(parts) + f" in {elapsed:.0f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--marker", default="gpu and not slow")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds after which no test starts")
    ap.add_argument("--per-test", type=float, default=60.0, help="seconds per test (0: no limit)")
    ap.add_argument("--collect-only", action="store_true", help="collect and order, print the first pass, run nothing")
    args, extra = ap.parse_known_args(argv)

    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    order_file = args.out / f"{args.tag}-tests-order.txt"
    results = args.out / f"{args.tag}-tests.jsonl"
    for f in (order_file, results):
        f.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent), str(REPO), env.get("PYTHONPATH", "")])
    env.update({_ENV_ORDER: str(order_file), _ENV_RESULTS: str(results), _ENV_DEADLINE: str(t0 + args.budget),
                _ENV_LIMIT: str(args.per_test)})
    base = [sys.executable, "-m", "pytest", "-p", "gpu_tests", "-p", "no:cacheprovider", "-q", "-m", args.marker, *extra]
    if args.collect_only:
        proc = subprocess.run(base + ["--collect-only"], cwd=REPO, env=env, capture_output=True, text=True)
        planned = [n for n in order_file.read_text().split("\n") if n] if order_file.exists() else []
        n_first = len({family(n) for n in planned})
        print(f"collected {len(planned)} tests ({args.marker!r}), {n_first} families; first pass:")
        for nid in planned[:n_first]:
            print("  " + nid)
        if proc.returncode != 0 or not planned:
            print(proc.stdout[-3000:] + proc.stderr[-3000:])
            print("correctness: the test selection did not collect")
            return 1
        return 0

    runs = 0
    while True:
        runs += 1
        killed_before = sum(1 for v in _results(results)[0].values() if v == "killed")
        # the stage's own `timeout` is the last resort; a run killed by faulthandler returns here
        subprocess.run(base, cwd=REPO, env=env)
        planned = [n for n in order_file.read_text().split("\n") if n] if order_file.exists() else []
        outcome, _ = _results(results)
        left = [n for n in planned if n not in outcome]
        killed = sum(1 for v in outcome.values() if v == "killed")
        if not planned or not left or killed == killed_before or time.time() >= t0 + args.budget or runs > 50:
            break  # done, out of time, or pytest stopped for another reason than a killed test
        print(f"correctness: a test was killed (see the log); {len(left)} tests left: starting pytest again",
              flush=True)
    outcome, dur = _results(results)
    line = summary_line(outcome, len(planned), time.time() - t0)
    bad = [f"{v:8s} {n}" for n, v in outcome.items() if v not in ("passed", "skipped")]
    slowest = sorted(dur.items(), key=lambda kv: -kv[1])[:10]
    text = "\n".join([line, "", "not passed:", *bad, "", "slowest:", *(f"{d:8.1f} s {n}" for n, d in slowest)])
    (args.out / f"{args.tag}-tests.txt").write_text(text + "\n")
    print(text)
    return 0 if planned and all(v in ("passed", "skipped") for v in outcome.values()) and len(outcome) == len(planned) \
        else 1


if __name__ == "__main__":
    sys.exit(main())
