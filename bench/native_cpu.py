"""Native CPU step vs torch.optim.AdamW(fused=True) and the foreach impl on the GPT-2-small parameter set.

    python -m bench.native_cpu [--reps 9] [--threads 1] [--foreach-reps 2] [--only lion,adan]
    python -m bench.native_cpu --lowbit [--numel 4194304] [--reps 7] [--threads 1] [--only lion,adan,muon] [--no-reference]

One process, one shared set of params and grads; every optimizer keeps its own state. Steps are
interleaved (AdamW, then each candidate, per repetition) so machine noise hits all alike; the
medians and the spread (min..max) of wall time are printed with the ratio to AdamW, and the median
process CPU time (with --threads 1: the work a step costs even when other jobs share the cores).
Learning rates are tiny so params stay finite over the run. Results: bench/NOTES.md, "Native kernels".

``--lowbit``: one tensor of ``--numel`` fp32 params per state_precision (fp32, bf16, 8bit), the native
impl's lowbit op vs the same fp32 op through `fused_optim.lowstate.reference_step` (the impl's
``supports_lowbit`` off), interleaved; with the bytes a step must move at least (the floor: each
tensor read once and the written ones written once); "muon": Muon's momentum stage alone. Results:
bench/NOTES.md, "Low-precision state".
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.params import gpt2_shapes  # noqa: E402

import fused_optim as fo  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--foreach-reps", type=int, default=3)
    ap.add_argument("--only", default="lion,gravity,adan,equilibrium")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--lowbit", action="store_true", help="the lowbit ops vs the reference path, per precision")
    ap.add_argument("--numel", type=int, default=1 << 22, help="--lowbit: elements of the one param")
    ap.add_argument("--no-reference", action="store_true", help="--lowbit: the lowbit op only (the bf16 "
                    "reference path takes seconds a step)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.lowbit:
        return lowbit(args)
    torch.manual_seed(0)
    shapes = gpt2_shapes()
    params = [torch.randn(s).mul_(0.02).requires_grad_() for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in params)
    print(f"{len(params)} tensors, {n / 1e6:.1f}M params, torch {torch.__version__}, threads {torch.get_num_threads()}")
    adamw = torch.optim.AdamW(params, lr=1e-9, fused=True)
    makers = {
        "lion": lambda impl: fo.Lion(params, lr=1e-9, weight_decay=0.1, impl=impl),
        "gravity": lambda impl: fo.Gravity(params, lr=1e-9, impl=impl),
        "adan": lambda impl: fo.Adan(params, lr=1e-9, weight_decay=0.02, impl=impl),
        "equilibrium": lambda impl: fo.GradientEquilibrium(params, lr=1e-9, impl=impl),
    }
    for name in args.only.split(","):
        opts = {"adamw_fused": adamw.step, "native": makers[name]("native").step}
        fe = makers[name]("foreach") if args.foreach_reps else None
        for fn in opts.values():  # warm-up: state allocation, first-touch
            fn()
        times = {k: [] for k in opts}
        cpu = {k: [] for k in opts}
        if fe is not None:
            fe.step()
            times["foreach"] = []
        for r in range(args.reps):
            for k, fn in opts.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
            if fe is not None and r < args.foreach_reps:
                t0 = time.perf_counter()
                fe.step()
                times["foreach"].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        base = med["adamw_fused"]
        cmed = {k: statistics.median(v) for k, v in cpu.items()}
        for k, v in times.items():
            extra = (f"  cpu {cmed[k] * 1e3:7.1f} ms {cmed[k] / cmed['adamw_fused']:5.2f}x" if k in cmed else "")
            print(f"{name:12s} {k:12s} wall {med[k] * 1e3:8.1f} ms  [{min(v) * 1e3:.1f}..{max(v) * 1e3:.1f}]  "
                  f"{med[k] / base:5.2f}x AdamW{extra}")
        if fe is not None:
            print(f"{name:12s} foreach/native = {med['foreach'] / med['native']:.1f}x")
        del fe, opts
        import gc

        gc.collect()


#: state tensors per optimizer (Lion: exp_avg; Adan: exp_avg, exp_avg_sq, exp_avg_diff, neg_pre_grad)
_N_STATES = {"lion": 1, "adan": 4}
_STATE_BYTES = {"fp32": 4.0, "bf16": 2.0, "8bit": 1 + 4 / 256}


def lowbit(args):
    from fused_optim import _native

    fns = {"lion": _native._native_lion, "adan": _native._native_adan}
    n = args.numel
    print(f"1 tensor of {n / 2**20:.0f}Mi fp32 params, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'opt':5s} {'state':5s} {'path':9s} {'wall ms':>8s} {'range':>15s} {'floor MB':>8s} {'GB/s':>6s}")
    for name in args.only.split(","):
        if name == "muon":
            muon_momentum_stage(args)
        if name not in fns:
            continue
        for precision in ("fp32", "bf16", "8bit"):
            torch.manual_seed(0)
            p = torch.randn(n).mul_(0.02).requires_grad_()
            p.grad = torch.randn(n)
            cls = fo.Lion if name == "lion" else fo.Adan
            paths = ("fused",) if args.no_reference else ("fused", "reference")
            opts = {path: cls([p], lr=1e-9, impl="native", state_precision=precision) for path in paths}
            # the floor: params and state read and written, grads read (4 + 4 + 2 * state bytes per state)
            floor = n * (4 * 3 + 2 * _N_STATES[name] * _STATE_BYTES[precision])
            times = {k: [] for k in opts}
            for r in range(args.reps + 1):
                for path, opt in opts.items():
                    fn = fns[name]
                    fn.supports_lowbit = path == "fused"
                    try:
                        t0 = time.perf_counter()
                        opt.step()
                        dt = time.perf_counter() - t0
                    finally:
                        fn.supports_lowbit = True
                    if r:  # the first step allocates the state
                        times[path].append(dt)
            for path, v in times.items():
                if precision == "fp32" and path == "reference":
                    continue  # fp32 state: both run the fp32 op
                med = statistics.median(v)
                print(f"{name:5s} {precision:5s} {path:9s} {med * 1e3:8.1f} [{min(v) * 1e3:6.1f}..{max(v) * 1e3:6.1f}] "
                      f"{floor / 1e6:8.1f} {floor / med / 1e9:6.2f}")
            del opts


def muon_momentum_stage(args):
    """Muon's momentum stage alone (Newton-Schulz would dominate a CPU step): the lowbit op against the fp32 op
    through `reference_step`, per buffer format, on one ``--numel`` fp32 matrix; the floor reads the grad and
    the buffer, writes the buffer and the bf16 Newton-Schulz input."""
    from fused_optim import _native, lowbit as lb, lowstate

    n = args.numel
    torch.manual_seed(0)
    g = torch.randn(n // 1024, 1024)
    lowstate_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for precision in ("fp32", "bf16", "8bit"):
        if precision == "8bit":
            codes, scales = lb.quantize_blockwise(torch.randn(g.shape) * 1e-2, True)
            buf, absmax = codes, [scales]
        else:
            buf, absmax = (torch.randn(g.shape) * 1e-2).to(lowstate_dtype[precision]), []
        low = lowstate.Rounding(precision, (True,), (absmax,), False, 1234, 1, [0])
        u = torch.empty(g.shape, dtype=torch.bfloat16)
        floor = n * (4 + 2 * _STATE_BYTES[precision] + 2)
        if precision == "fp32":  # the fp32 op itself
            runs = {"fused": lambda: _native._native_muon_momentum([g], [buf], [u], momentum=0.95, nesterov=True,
                                                                   maximize=False)}
        else:
            runs = {"fused": lambda: _native._native_muon_momentum_lowbit([g], [buf], [u], momentum=0.95,
                                                                          nesterov=True, maximize=False, lowbit=low)}
        if not args.no_reference and precision != "fp32":
            runs["reference"] = lambda: lowstate.reference_step(
                lambda us, gs, ss: _native._native_muon_momentum(gs, ss[0], us, momentum=0.95, nesterov=True,
                                                                 maximize=False), [u], [g], [[buf]], low, [torch.float32])
        times = {k: [] for k in runs}
        for r in range(args.reps + 1):
            for path, run in runs.items():
                t0 = time.perf_counter()
                run()
                if r:
                    times[path].append(time.perf_counter() - t0)
        for path, v in times.items():
            med = statistics.median(v)
            print(f"{'muon':5s} {precision:5s} {path:9s} {med * 1e3:8.1f} [{min(v) * 1e3:6.1f}..{max(v) * 1e3:6.1f}] "
                  f"{floor / 1e6:8.1f} {floor / med / 1e9:6.2f}")


if __name__ == "__main__":
    main()
