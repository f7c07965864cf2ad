"""`python -m bench`: what one optimizer step costs here, against peers and against the hardware.

Runs on CUDA if present, else CPU. For each parameter set and dtype it times one `step()` of every
fused_optim optimizer under every impl that can run here (discovered through
`fused_optim.available_impls`), torch's AdamW (fused and foreach: the yardstick), the installed peers
(pytorch_optimizer, lion-pytorch, timm, torch-optimi; missing ones are skipped with a note) and,
with --compile (default on CUDA), a `torch.compile`d foreach step. Then each reduction and update
kernel alone across tensor counts. Writes bench/results/<date>-<device>.csv (+ -kernels.csv, .png,
.md, .json) and prints the table. Method and columns: bench/NOTES.md.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
#: named argument sets (`--preset NAME`); arguments given after it override its own
PRESETS = {
    # the bench stage of `.ci/gpu` (a short GPU window): the sets and dtypes that answer "how fast, against
    # fused AdamW and the peers, how close to the floor", in about a minute on an H100/H200
    "gpu-window": ["--sets", "gpt2-124m,many-small", "--dtypes", "fp32,bf16", "--reps", "8", "--warmup", "2",
                   "--no-compile", "--kernel-grid", "window"],
}
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}


def _csv_list(s: str | None) -> list[str] | None:
    if s is None:
        return None
    return [x.strip() for x in s.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    from .candidates import OPTIMIZERS
    from .params import PARAM_SETS

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named set of the arguments below (gpu-window: .ci/gpu's bench stage); later ones override")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve and check every argument, print what would run, run nothing (no device needed)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new (set, dtype) group or kernel sweep after this many seconds; what ran is written")
    p.add_argument("--kernel-grid", choices=("quick", "cpu", "cuda", "window"), default=None,
                   help="kernel sweep: quick, cpu, cuda or window (default: the device's; quick with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (about a minute on 2 CPU cores): small sets, few repetitions, no compile")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    p.add_argument("--optimizers", default=None,
                   help=f"comma-separated subset of {','.join(OPTIMIZERS)} (default: all; adamw is always the yardstick)")
    p.add_argument("--impls", default=None,
                   help="our impls to time, e.g. foreach,native (default: every impl that runs here, "
                        "interpreted Triton excluded)")
    p.add_argument("--peers", default=None,
                   help="peers to time: labels or package names (pytorch_optimizer, lion_pytorch, timm, optimi), "
                        "'none', or 'all' (default: all installed)")
    p.add_argument("--dtypes", default=None, help="comma-separated: fp32,bf16,fp16 (default: fp32)")
    p.add_argument("--precisions", default=None,
                   help="state_precision values to time besides the fp32 rows: bf16,8bit (default: both, where the "
                        "impl runs a fused low-precision pass); the rows run the impls named in --impls, else "
                        "auto mode's impl")
    p.add_argument("--sets", default=None,
                   help=f"parameter sets: {','.join(PARAM_SETS)} (default: the device's; see --list)")
    p.add_argument("--reps", type=int, default=None, help="timed samples per candidate (default 15; quick 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per candidate (default 3; quick 2)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="also time torch.compile'd foreach steps (default on CUDA; on CPU the compile takes minutes)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-steps", action="store_true", help="skip the step benchmarks")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel microbenchmarks")
    p.add_argument("--threads", default="auto",
                   help="torch CPU threads: a number, or 'auto' (default): torch's default, but 1 when the "
                        "machine is already busy (load average above half its cores) or with --quick")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    p.add_argument("--tag", default="", help="suffix for the output file names")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--update-readme", action="store_true",
                   help="put this run's summary table into README.md (between its bench-table markers)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list parameter sets, optimizers, impls and peers, then exit")
    p.add_argument("--distributed", action="store_true",
                   help="run Muon's FSDP2 benchmark instead (python -m bench.distributed; other args go to it)")
    p.add_argument("--convergence", action="store_true",
                   help="run the convergence benchmark instead (python -m bench.convergence; other args go to it)")
    return p


def _list(device) -> None:
    from .candidates import OPTIMIZERS, PEERS, _importable
    from .params import PARAM_SETS

    print("parameter sets:")
    for s in PARAM_SETS.values():
        print(f"  {s.name:16s} {s.n_tensors:5d} tensors {s.numel / 1e6:9.2f}M  {s.description}"
              + ("  [cuda only]" if s.cuda_only else ""))
    print("optimizers:", ", ".join(OPTIMIZERS))
    from fused_optim import _backends, _ext

    print(f"impls on {device}:")
    for impl in _backends.IMPLS:  # listing builds nothing: native says whether it is built yet
        st = _ext.probe(device.type) if impl == "native" else _backends.impl_status(impl, device.type)
        print(f"  {impl:8s} {'yes' if st.available else 'no '} {st.reason}")
    print("peers:")
    for peer in PEERS:
        ok, why = _importable(peer.module)
        print(f"  {peer.optimizer}/{peer.impl:22s} {'installed' if ok else why}"
              + ("" if device.type in peer.devices else f" (runs on {'/'.join(peer.devices)} only)"))


def collapse_notes(notes: list[str]) -> list[str]:
    """Each note once: "lion/triton: skipped, why" and "adan/triton: skipped, why" (the same reason for
    several optimizers) print as "triton (lion, adan): skipped, why". The JSON keeps every note."""
    import re

    groups: dict[tuple[str, str], list[str]] = {}
    order: list[tuple[str, str] | str] = []
    for line in notes:
        m = re.match(r"([\w.-]+)/([^:\s]+): (.*)$", line, flags=re.S)
        if m is None:
            order.append(line)
            continue
        key = (m.group(2), m.group(3))
        if key not in groups:
            groups[key] = []
            order.append(key)
        groups[key].append(m.group(1))
    out = []
    for item in order:
        if isinstance(item, str):
            out.append(item)
        else:
            names = groups[item]
            out.append(f"{names[0]}/{item[0]}: {item[1]}" if len(names) == 1
                       else f"{item[0]} ({', '.join(names)}): {item[1]}")
    return out


def _pick_threads(arg: str, quick: bool, notes: list[str]) -> int | None:
    """Threads for a CPU run. On an oversubscribed machine every OpenMP barrier waits for a descheduled
    sibling thread: measured here (2 cores, load 7), torch's fused AdamW on 0.9M params took 484 ms per
    step with 2 threads and 5.6 ms with 1. One thread then measures the code, not the scheduler."""
    if arg != "auto":
        return int(arg)
    if quick:
        return 1
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if cores > 1 and load > 0.5 * cores:
        notes.append(f"threads: 1 (load average {load:.1f} on {cores} cores: other processes are running; "
                     "pass --threads N to override)")
        return 1
    return None


def expand_presets(argv: list[str]) -> list[str]:
    """`--preset NAME` (or `--preset=NAME`) replaced by its arguments, in place: later arguments override."""
    out: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        name = a.split("=", 1)[1] if a.startswith("--preset=") else (argv[i + 1] if a == "--preset" and i + 1 < len(argv)
                                                                     else None)
        if name is None:
            out.append(a)
            continue
        if a == "--preset":
            next(it, None)
        if name not in PRESETS:
            raise SystemExit(f"python -m bench: unknown --preset {name!r}; choose from {sorted(PRESETS)}")
        out += PRESETS[name]
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--distributed" in argv:
        argv.remove("--distributed")
        from . import distributed

        return distributed.main(argv)
    if "--convergence" in argv:
        argv.remove("--convergence")
        try:
            from . import convergence
        except ImportError as exc:
            print(f"python -m bench --convergence: bench/convergence.py is not available ({exc})", file=sys.stderr)
            return 2
        return convergence.main(argv)
    args = build_parser().parse_args(expand_presets(argv))

    import torch

    from . import env, report
    from .candidates import OPTIMIZERS
    from .kernels import KERNEL_GRIDS, run_kernels
    from .params import PARAM_SETS, default_sets, quick_sets
    from .steps import replicas_for, run_step_group
    from .timing import copy_bandwidth, stream_bandwidth

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available() and not args.dry_run:
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    if args.list:
        _list(device)
        return 0
    notes: list[str] = []

    optimizers = _csv_list(args.optimizers) or list(OPTIMIZERS)
    bad = [o for o in optimizers if o not in OPTIMIZERS]
    if bad:
        print(f"unknown optimizer(s) {bad}; choose from {list(OPTIMIZERS)}", file=sys.stderr)
        return 2
    if "adamw" not in optimizers:
        optimizers = ["adamw"] + optimizers
    set_names = _csv_list(args.sets) or (quick_sets if args.quick else default_sets)(device.type)
    bad = [s for s in set_names if s not in PARAM_SETS]
    if bad:
        print(f"unknown parameter set(s) {bad}; choose from {list(PARAM_SETS)}", file=sys.stderr)
        return 2
    sets = []
    for s in set_names:
        if PARAM_SETS[s].cuda_only and device.type != "cuda":
            notes.append(f"set {s}: skipped, GPU only (use its CPU variant)")
        else:
            sets.append(PARAM_SETS[s])
    try:
        dtypes = [getattr(torch, DTYPES[d.lower()]) for d in (_csv_list(args.dtypes) or ["fp32"])]
    except KeyError as exc:
        print(f"unknown dtype {exc}; choose from fp32, bf16, fp16", file=sys.stderr)
        return 2
    impls = _csv_list(args.impls)
    from .candidates import PRECISIONS
    precisions = _csv_list(args.precisions)
    bad = [x for x in precisions or () if x not in PRECISIONS]
    if bad:
        print(f"unknown precision {bad[0]!r}; choose from {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    peers = _csv_list(args.peers)
    if peers == ["all"]:
        peers = None
    elif peers == ["none"]:
        peers = ["torch"]  # the yardstick stays
    reps = args.reps or (6 if args.quick else 15)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    # --quick is a smoke test: two replicas only (its sets partly sit in cache; the full run rotates up to 8)
    max_replicas = 2 if args.quick else 8
    compile_step = args.compile if args.compile is not None else (device.type == "cuda" and not args.quick)
    kernel_grid = KERNEL_GRIDS[args.kernel_grid or ("quick" if args.quick else
                                                    ("cuda" if device.type == "cuda" else "cpu"))]
    if args.dry_run:
        print(f"python -m bench on {device}: sets {[s.name for s in sets]}, dtypes "
              f"{[str(d).removeprefix('torch.') for d in dtypes]}, optimizers {optimizers}, impls {impls or 'all'}, "
              f"peers {peers or 'all installed'}, reps {reps}, warmup {warmup}, compile {compile_step}, "
              f"kernels {'off' if args.no_kernels else kernel_grid}, steps {'off' if args.no_steps else 'on'}, "
              f"max seconds {args.max_seconds}, out {args.out}")
        for line in notes:
            print("  " + line)
        return 0
    if device.type == "cpu":
        threads = _pick_threads(args.threads, args.quick, notes)
        if threads:
            torch.set_num_threads(threads)

    meta = env.run_metadata(device)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    base = f"{stamp}-{env.device_slug(device)}{('-' + args.tag) if args.tag else ''}"
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def over_budget() -> bool:
        return args.max_seconds is not None and time.perf_counter() - t_start > args.max_seconds

    # the floor (an in-place stream) and copy_ beside it, on a buffer several times the last-level cache,
    # before and after the benchmarks; the best of each is the device's figure
    copy_bytes = max(8 * env.cache_bytes(device), (1 << 30) if device.type == "cuda" else 256 << 20)
    if args.quick:
        copy_bytes = min(copy_bytes, 256 << 20)
    floor_before, _ = stream_bandwidth(device, copy_bytes)
    bw_before, _ = copy_bandwidth(device, copy_bytes)
    print(f"{meta['hardware']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} | "
          f"threads {meta['threads']} | floor {floor_before / 1e9:.1f} GB/s | copy {bw_before / 1e9:.1f} GB/s",
          flush=True)

    try:
        from tqdm import tqdm
    except ImportError:  # the bar is a convenience; the run does not need it
        tqdm = None
    total = (0 if args.no_steps else len(sets) * len(dtypes) * reps) + \
        (0 if args.no_kernels else len(dtypes) * len(kernel_grid[1]) * (3 + len(optimizers)))
    bar = tqdm(total=total, desc="bench", unit="round", dynamic_ncols=True, leave=False) if tqdm else None

    def progress(n: float) -> None:
        if bar is not None:
            bar.update(n)

    step_results, modes, kernel_rows = [], {}, []
    written: list[Path] = []

    def write(floor_gbps: float, copy_gbps: float, final: bool) -> None:
        """The CSVs (after every group, so a run cut short keeps what it measured) and, at the end, the
        tables, plots and the README block."""
        written.clear()
        rows = report.step_rows(step_results, meta, copy_gbps, modes, floor_gbps=floor_gbps)
        title = (f"{meta['hardware']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} | "
                 f"{meta['run_date']} | floor (in-place stream) {floor_gbps:.1f} GB/s | copy_ {copy_gbps:.1f} GB/s")
        if rows:
            path = args.out / f"{base}.csv"
            report.write_csv(path, rows, report.STEP_COLUMNS)
            written.append(path)
        krows = report.kernel_rows([dict(r) for r in kernel_rows], meta, copy_gbps, floor_gbps)
        if krows:
            report.write_csv(args.out / f"{base}-kernels.csv", krows, report.KERNEL_COLUMNS)
            written.append(args.out / f"{base}-kernels.csv")
        if not final:
            return
        if rows:
            md = report.markdown_table(rows)
            summary = report.summary_table(rows)
            (args.out / f"{base}.md").write_text(f"{title}\n\n{summary}\n\n{md}")
            written.append(args.out / f"{base}.md")
            print(md)
            print(summary + "\n")
            if args.update_readme:
                readme = Path(__file__).resolve().parent.parent / "README.md"
                path = args.out / f"{base}.csv"
                rel = path.relative_to(readme.parent) if path.is_relative_to(readme.parent) else path
                block = (f"{meta['hardware']}, torch {meta['torch']}, {meta['threads']} thread(s), commit "
                         f"{meta['commit']}, {meta['run_date'][:10]}; floor (in-place stream) {floor_gbps:.1f} GB/s, "
                         f"copy_ {copy_gbps:.1f} GB/s. Time per step (median) and its ratio to AdamW(fused) in the "
                         f"same run; every impl, peer and spread in [{rel.name}]({rel}).\n\n{summary}")
                if not report.update_readme(readme, device.type, block):
                    notes.append(f"--update-readme: no bench-table:{device.type} markers in {readme}")
            if not args.no_plot:
                report.plot_steps(rows, args.out / f"{base}.png", title)
                written.append(args.out / f"{base}.png")
        if krows and not args.no_plot:
            report.plot_kernels(krows, args.out / f"{base}-kernels.png", title)
            written.append(args.out / f"{base}-kernels.png")

    cut = False

    def start(label: str, shown: str) -> bool:
        """Whether to run the group `label`: not once --max-seconds is spent (said in the notes); else
        `shown` on the progress bar."""
        nonlocal cut
        if over_budget():
            cut = True
            notes.append(f"{label}: not run, --max-seconds {args.max_seconds:g} reached")
            return False
        if bar is not None:
            bar.set_postfix_str(shown)
        return True

    if not args.no_steps:
        for pset in sets:
            for dtype in dtypes:
                name = f"{pset.name} {str(dtype).removeprefix('torch.')}"
                if not start(f"set {name}", name):
                    continue
                mode: dict = {}
                # auto: compile on CUDA, where a set has at most 256 tensors (2,000 take many minutes)
                compile_here = compile_step if args.compile is not None else (compile_step and pset.n_tensors <= 256)
                if compile_step and not compile_here:
                    line = f"set {pset.name}: compiled steps skipped ({pset.n_tensors} tensors; --compile forces them)"
                    if line not in notes:
                        notes.append(line)
                res = run_step_group(pset, dtype, device, optimizers, impls=impls, peers=peers,
                                     compile_step=compile_here, warmup=warmup, reps=reps, seed=args.seed,
                                     notes=notes, progress=progress, mode_out=mode,
                                     max_replicas=max_replicas, precisions=precisions)
                modes[(pset.name, dtype)] = (mode.get("mode", ""), replicas_for(pset, dtype, device, max_replicas))
                step_results += res
                write(floor_before / 1e9, bw_before / 1e9, final=False)
    if not args.no_kernels:
        for dtype in dtypes:
            name = f"kernels {str(dtype).removeprefix('torch.')}"
            if not start(name, name):
                continue
            kernel_rows += run_kernels(device, dtype, kernel_grid, optimizers, impls, warmup, reps, notes,
                                       seed=args.seed, progress=progress, max_replicas=max_replicas)
            write(floor_before / 1e9, bw_before / 1e9, final=False)
    if bar is not None:
        bar.close()
    floor_after, _ = stream_bandwidth(device, copy_bytes)
    bw_after, _ = copy_bandwidth(device, copy_bytes)
    # the hardware's limit is the best seen in this run
    floor_gbps, copy_gbps = max(floor_before, floor_after) / 1e9, max(bw_before, bw_after) / 1e9
    elapsed = time.perf_counter() - t_start
    write(floor_gbps, copy_gbps, final=True)
    run_info = {**meta, "floor_gbps_before": round(floor_before / 1e9, 2), "floor_gbps_after": round(floor_after / 1e9, 2),
                "copy_gbps_before": round(bw_before / 1e9, 2), "copy_gbps_after": round(bw_after / 1e9, 2),
                "copy_bytes": copy_bytes, "elapsed_s": round(elapsed, 1), "argv": argv, "cut_short": cut,
                "sets": [s.name for s in sets], "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
                "reps": reps, "warmup": warmup, "compile": compile_step, "kernel_grid": list(kernel_grid),
                "notes": notes}
    (args.out / f"{base}.json").write_text(json.dumps(run_info, indent=2, default=str) + "\n")
    written.append(args.out / f"{base}.json")
    if notes:
        print("notes:")
        for line in collapse_notes(notes):
            print("  " + line)
    above = sum(1 for r in report.step_rows(step_results, meta, copy_gbps, modes, floor_gbps=floor_gbps)
                if r["floor_check"] != "ok")
    if above:
        print(f"{above} step row(s) measured above the floor: a measurement problem (see bench/NOTES.md, "
              "'The floor'); their GB/s and % are not shown")
    print(f"floor (in-place stream) {floor_gbps:.1f} GB/s (before {floor_before / 1e9:.1f}, after "
          f"{floor_after / 1e9:.1f}); copy_ {copy_gbps:.1f} GB/s (before {bw_before / 1e9:.1f}, after "
          f"{bw_after / 1e9:.1f}); {elapsed:.0f} s; wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
