"""Results out: CSV rows (documented columns), a console/Markdown table and a PNG plot."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

__all__ = [
    "KERNEL_COLUMNS",
    "META_COLUMNS",
    "kernel_rows",
    "kernels_figure",
    "STEP_COLUMNS",
    "markdown_table",
    "plot_kernels",
    "plot_steps",
    "step_rows",
    "steps_figure",
    "summary_table",
    "update_readme",
    "write_csv",
]

#: in every row of both CSVs: where and on what the row was measured
META_COLUMNS = ["run_date", "device", "hardware", "driver", "torch", "cuda", "triton", "python", "commit",
                "threads", "floor_gbps", "copy_gbps"]
#: step CSV (`<date>-<device>.csv`); see bench/NOTES.md for each column's meaning
STEP_COLUMNS = META_COLUMNS + [
    "param_set", "n_tensors", "numel", "dtype", "optimizer", "impl", "source",
    "median_ms", "p20_ms", "p80_ms", "min_ms", "samples", "mode", "replicas",
    "bytes_per_param", "state_bytes_per_param", "floor_ms", "achieved_gbps", "pct_of_floor", "pct_of_copy", "floor_check",
    "vs_adamw_fused", "compile_s",
]
#: kernel CSV (`<date>-<device>-kernels.csv`)
KERNEL_COLUMNS = META_COLUMNS + [
    "kind", "kernel", "impl", "dtype", "n_tensors", "numel_per_tensor", "numel",
    "median_us", "p20_us", "p80_us", "samples", "bytes", "achieved_gbps", "pct_of_floor", "pct_of_copy",
    "floor_check",
]
#: `floor_check` of a row measured faster than the floor allows (FLOOR_TOLERANCE): its numbers are not shown
ABOVE_FLOOR = "above floor: measurement problem"


def _fmt(x, nd=3):
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.{nd}f}".rstrip("0").rstrip(".")
    return str(x)


def _floor_check(pct_of_floor: float) -> str:
    from .timing import FLOOR_TOLERANCE

    return ABOVE_FLOOR if pct_of_floor > 100 * FLOOR_TOLERANCE else "ok"


def step_rows(results, meta: dict[str, str], copy_gbps: float, modes: dict, floor_gbps: float | None = None) -> list[dict]:
    """CSV rows from StepResults; ratios against AdamW(fused) of the same (set, dtype) group and against
    the floor (`floor_gbps`: the in-place stream of bench/timing.py; the copy when not given)."""
    floor_gbps = floor_gbps or copy_gbps
    ref = {}
    for r in results:
        if r.cand.key == "adamw/torch-fused":
            ref[(r.pset.name, r.dtype)] = r.stats.median_s
    rows = []
    for r in results:
        moved = r.bytes_per_param * r.pset.numel
        med = r.stats.median_s
        gbps = moved / med / 1e9
        floor = getattr(r, "floor_gbps", None) or floor_gbps  # timed with the group when it was interleaved
        floor_s = moved / (floor * 1e9)
        adamw = ref.get((r.pset.name, r.dtype))
        mode = modes.get((r.pset.name, r.dtype), ("", ""))[0]
        n_rep = r.replicas
        pct = round(100 * floor_s / med, 2)
        rows.append({**meta, "floor_gbps": round(floor, 2), "copy_gbps": round(copy_gbps, 2),
                     "param_set": r.pset.name, "n_tensors": r.pset.n_tensors, "numel": r.pset.numel,
                     "dtype": str(r.dtype).removeprefix("torch."), "optimizer": r.cand.optimizer,
                     "impl": r.cand.impl, "source": r.cand.source,
                     "median_ms": round(med * 1e3, 4), "p20_ms": round(r.stats.p20_s * 1e3, 4),
                     "p80_ms": round(r.stats.p80_s * 1e3, 4), "min_ms": round(r.stats.min_s * 1e3, 4),
                     "samples": r.stats.n, "mode": mode, "replicas": n_rep,
                     "bytes_per_param": r.bytes_per_param,
                     "state_bytes_per_param": getattr(r, "state_bytes_per_param", ""),
                     "floor_ms": round(floor_s * 1e3, 4),
                     "achieved_gbps": float(f"{gbps:.4g}"), "pct_of_floor": pct,
                     "pct_of_copy": round(100 * gbps / copy_gbps, 2), "floor_check": _floor_check(pct),
                     "vs_adamw_fused": round(med / adamw, 3) if adamw else "",
                     "compile_s": round(r.compile_s, 2) if r.compile_s is not None else ""})
    return rows


def kernel_rows(rows: list[dict], meta: dict[str, str], copy_gbps: float, floor_gbps: float) -> list[dict]:
    """The kernel rows of bench/kernels.py with the run metadata and both ratios added (in place); a row's
    own `floor_gbps` (timed in the same rounds, CPU) wins over the run's."""
    for r in rows:
        floor = r.get("floor_gbps") or floor_gbps
        pct = round(100 * r["achieved_gbps"] / floor, 2)
        r.update(meta, floor_gbps=round(floor, 2), copy_gbps=round(copy_gbps, 2), pct_of_floor=pct,
                 pct_of_copy=round(100 * r["achieved_gbps"] / copy_gbps, 2), floor_check=_floor_check(pct))
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    """One table per (set, dtype): ms/step with spread, GB/s, % of the floor, ratio to AdamW(fused). A row
    above the floor (`floor_check`) shows the flag instead of its GB/s and percentage."""
    groups = _grouped(rows, "param_set", "dtype", "n_tensors", "numel")
    out = []
    for (pset, dtype, n, numel), rs in groups.items():
        out.append(f"**{pset}** ({n} tensors, {numel / 1e6:.1f}M params), {dtype}; floor: in-place stream "
                   f"{rs[0]['floor_gbps']} GB/s (copy_ {rs[0]['copy_gbps']} GB/s)\n")
        out.append("| optimizer | impl | ms/step (p20–p80) | B/param | GB/s | % of floor | × AdamW fused |")
        out.append("|---|---|---|---|---|---|---|")
        for r in sorted(rs, key=lambda r: (r["optimizer"] != "adamw", r["optimizer"], r["median_ms"])):
            impl = f"**{r['impl']}**" if r["source"] == "fused_optim" else r["impl"]
            comp = f" (compile {r['compile_s']} s)" if r["compile_s"] != "" else ""
            ok = r.get("floor_check", "ok") == "ok"
            gbps, pct = (_fmt(r["achieved_gbps"]), _fmt(r["pct_of_floor"], 2)) if ok else ("—", ABOVE_FLOOR)
            out.append(f"| {r['optimizer']} | {impl}{comp} | {_fmt(r['median_ms'])} ({_fmt(r['p20_ms'])}–"
                       f"{_fmt(r['p80_ms'])}) | {r['bytes_per_param']} | {gbps} | {pct} | "
                       f"{_fmt(r['vs_adamw_fused'])} |")
        out.append("")
    return "\n".join(out)


def summary_table(rows: list[dict]) -> str:
    """Per (set, dtype) and optimizer: our fastest impl, the fastest peer, both against AdamW(fused)."""
    best: dict = {}
    adamw: dict = {}
    for r in rows:
        key = (r["param_set"], r["dtype"])
        if r["optimizer"] == "adamw":
            if r["impl"] == "torch-fused":
                adamw[key] = r
            continue
        slot = best.setdefault((key, r["optimizer"]), {})
        side = "ours" if r["source"] == "fused_optim" else "peer"
        if side not in slot or r["median_ms"] < slot[side]["median_ms"]:
            slot[side] = r
    out = ["| set | optimizer | ours: fastest impl | ms | × AdamW fused | fastest peer | ms | × AdamW fused |",
           "|---|---|---|---|---|---|---|---|"]
    for ((pset, dtype), opt), slot in best.items():
        cells = []
        for side in ("ours", "peer"):
            r = slot.get(side)
            cells += ([r["impl"], _fmt(r["median_ms"]), _fmt(r["vs_adamw_fused"])] if r else ["—", "", ""])
        name = f"{pset}" + ("" if dtype == "float32" else f" {dtype}")
        out.append(f"| {name} | {opt} | " + " | ".join(cells) + " |")
    sets = {}
    for key, r in adamw.items():
        sets[key] = f"{key[0]}: {_fmt(r['median_ms'])} ms"
    if sets:
        out.append("")
        out.append("AdamW(fused) per step: " + "; ".join(sets.values()) + ".")
    return "\n".join(out)


def update_readme(readme: Path, device_type: str, text: str) -> bool:
    """Replace the README block between `<!-- bench-table:<device>:start/end -->`; False if absent."""
    start, end = f"<!-- bench-table:{device_type}:start -->", f"<!-- bench-table:{device_type}:end -->"
    s = readme.read_text()
    i, j = s.find(start), s.find(end)
    if i < 0 or j < i:
        return False
    readme.write_text(s[:i + len(start)] + "\n" + text.strip() + "\n" + s[j:])
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI machines
    import matplotlib.pyplot as plt
    return plt


def _grouped(rows: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    groups = defaultdict(list)
    for r in rows:
        groups[tuple(r[k] for k in keys)].append(r)
    return groups


_COLORS = {"fused_optim": "#1f77b4", "torch": "#7f7f7f", "peer": "#ff7f0e"}
_SOURCE_LABEL = {"fused_optim": "fused_optim (ours)", "torch": "torch (yardstick)", "peer": "peer"}
#: our impls in the order a reader meets them: reference first, then the fused ones
_IMPL_RANK = {"forloop": 0, "foreach": 1, "compiled-foreach": 2, "triton": 3, "native": 4}
_SOURCE_RANK = {"torch": 0, "fused_optim": 1, "peer": 2}


def _bar_key(r: dict) -> tuple:
    """One order for every panel: AdamW first, then optimizers by name; within one, torch, ours (by impl),
    then the peers by name. Never by the measured time, so a bar keeps its place from panel to panel."""
    return (r["optimizer"] != "adamw", r["optimizer"], _SOURCE_RANK.get(r["source"], 3),
            _IMPL_RANK.get(r["impl"], 9), r["impl"])


def _above(r: dict) -> bool:
    return r.get("floor_check", "ok") not in ("ok", "")


def _save(figure, rows: list[dict], path: Path, title: str) -> None:
    plt = _pyplot()
    fig = figure(rows, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(rows: list[dict], path: Path, title: str) -> None:
    """Per (set, dtype): time per step and % of the floor, one bar per optimizer × impl, the same bars in the
    same places in every panel; both y axes linear from 0."""
    _save(steps_figure, rows, path, title)


def steps_figure(rows: list[dict], title: str):
    """The figure of `plot_steps` (kept open: the caller saves and closes it)."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    groups = _grouped(rows, "param_set", "dtype")
    order = sorted({(r["optimizer"], r["impl"]): r for r in rows}.values(), key=_bar_key)
    slots = {(r["optimizer"], r["impl"]): i for i, r in enumerate(order)}
    labels = [f"{r['optimizer']}/{r['impl']}" for r in order]
    n = max(1, len(groups))
    width = max(8.0, 0.32 * len(order) * 2)
    fig, axes = plt.subplots(n, 2, figsize=(width, 3.9 * n), squeeze=False)
    for i, ((pset, dtype), rs) in enumerate(groups.items()):
        x = [slots[(r["optimizer"], r["impl"])] for r in rs]
        colors = [_COLORS.get(r["source"], "#2ca02c") for r in rs]
        med = [float(r["median_ms"]) for r in rs]
        # the time axis is linear from 0; bars past 5x AdamW(fused) are cut at the top and carry their value
        ref = [float(r["median_ms"]) for r in rs if r["optimizer"] == "adamw" and r["impl"] == "torch-fused"]
        cap = 5 * ref[0] if ref else max(med)
        top = 1.15 * max([m for m in med if m <= cap] or [cap])
        ax = axes[i][0]
        shown = [min(m, top) for m in med]
        err_lo = [0 if m > top else m - float(r["p20_ms"]) for m, r in zip(med, rs)]
        err_hi = [0 if m > top else min(float(r["p80_ms"]), top) - m for m, r in zip(med, rs)]
        ax.bar(x, shown, color=colors, yerr=[err_lo, err_hi], capsize=2)
        for xi, m in zip(x, med):
            if m > top:
                ax.text(xi, top, f"{_fmt(m)} ↑", rotation=90, ha="center", va="top", fontsize=6, color="w")
        ax.set_ylim(0, top)
        ax.set_ylabel("ms per step (median, p20–p80)\nlower is better")
        ax.set_title(f"{pset} ({rs[0]['n_tensors']} tensors), {dtype}: time per step", fontsize=9)
        ax = axes[i][1]
        ok = [(xi, float(r["pct_of_floor"]), c) for xi, r, c in zip(x, rs, colors) if not _above(r)]
        ax.bar([o[0] for o in ok], [o[1] for o in ok], color=[o[2] for o in ok])
        for xi, r in zip(x, rs):
            if _above(r):
                ax.text(xi, 2, "above floor:\nmeasurement\nproblem", rotation=90, ha="center", va="bottom",
                        fontsize=6, color="#d62728")
        ax.axhline(100, color="k", lw=0.8, ls="--")
        ax.set_ylim(0, 110)
        ax.set_ylabel("% of the floor\nhigher is better")
        ax.set_title(f"{pset}, {dtype}: % of the floor (in-place stream {rs[0]['floor_gbps']} GB/s;\n"
                     f"copy_ {rs[0]['copy_gbps']} GB/s for reference)", fontsize=9)
        for ax in axes[i]:
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
            ax.set_xlim(-0.6, len(labels) - 0.4)
    present = {r["source"] for r in rows}  # "peer" only when a peer ran
    fig.suptitle(title, fontsize=9, y=0.995, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.985 - 0.07 / n))
    fig.legend(handles=[Patch(color=c, label=_SOURCE_LABEL[s]) for s, c in _COLORS.items() if s in present],
               loc="upper left", bbox_to_anchor=(0.01, 0.995 - 0.025 / n), ncol=3, fontsize=8, frameon=False)
    return fig


def _pow2(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n > 0 and n & (n - 1) == 0 else f"{n:,}"


def plot_kernels(rows: list[dict], path: Path, title: str) -> None:
    """GB/s against tensor count (total elements fixed, stated) for each kernel, one line per impl (the same
    colour for an impl in every panel), the floor and copy_ as lines; y from 0."""
    _save(kernels_figure, rows, path, title)


def kernels_figure(rows: list[dict], title: str):
    """The figure of `plot_kernels` (kept open: the caller saves and closes it)."""
    plt = _pyplot()
    groups = _grouped(rows, "kernel", "dtype")
    impls = sorted({r["impl"] for r in rows})
    cmap = plt.get_cmap("tab10")
    color = {impl: cmap(i % 10) for i, impl in enumerate(impls)}
    n = max(1, len(groups))
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.8 * cols, 3.5 * nrows), squeeze=False)
    for i, ((kernel, dtype), rs) in enumerate(groups.items()):
        ax = axes[i // cols][i % cols]
        for impl in impls:
            pts = sorted((r for r in rs if r["impl"] == impl), key=lambda r: r["n_tensors"])
            if not pts:
                continue
            good = [r for r in pts if not _above(r)]
            ax.plot([r["n_tensors"] for r in good], [float(r["achieved_gbps"]) for r in good], marker="o",
                    color=color[impl], label=impl)
            bad = [r for r in pts if _above(r)]
            if bad:  # drawn on the floor line, not at their value
                ax.plot([r["n_tensors"] for r in bad], [float(r["floor_gbps"]) for r in bad], ls="none",
                        marker="x", ms=8, color=color[impl])
        if rs and rs[0].get("floor_gbps"):
            floors = sorted({r["n_tensors"]: float(r["floor_gbps"]) for r in rs}.items())  # timed per point on CPU
            ax.plot([f[0] for f in floors], [f[1] for f in floors], color="k", lw=0.9, ls="--")
            ax.axhline(float(rs[0]["copy_gbps"]), color="k", lw=0.7, ls=":")
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        total = int(rs[0]["numel"])
        ax.set_xlabel(f"tensors ({_pow2(total)} = {total / 1e6:.3g}M elements in all)", fontsize=8)
        ax.set_ylabel("GB/s (higher is better)", fontsize=8)
        ax.set_title(f"{rs[0]['kind']} {kernel} ({dtype})", fontsize=9)
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color[i], marker="o", label=i) for i in impls]
    handles += [Line2D([], [], color="k", ls="--", label="floor: in-place stream"),
                Line2D([], [], color="k", ls=":", label="copy_ (reference)")]
    if any(_above(r) for r in rows):
        handles.append(Line2D([], [], color="grey", marker="x", ls="none", ms=8,
                              label="above the floor: a measurement problem (cache?), drawn on the floor"))
    fig.suptitle(title, fontsize=9, x=0.01, y=0.995, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.975 - 0.1 / nrows))
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.01, 0.99 - 0.03 / nrows), ncol=5, fontsize=7,
               frameon=False)
    return fig
