"""Results out: CSV rows (documented columns), a console/Markdown table and a PNG plot."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

__all__ = [
    "KERNEL_COLUMNS",
    "META_COLUMNS",
    "STEP_COLUMNS",
    "markdown_table",
    "plot_kernels",
    "plot_steps",
    "step_rows",
    "summary_table",
    "update_readme",
    "write_csv",
]

#: in every row of both CSVs: where and on what the row was measured
META_COLUMNS = ["run_date", "device", "hardware", "driver", "torch", "cuda", "triton", "python", "commit",
                "threads", "copy_gbps"]
#: step CSV (`<date>-<device>.csv`); see bench/NOTES.md for each column's meaning
STEP_COLUMNS = META_COLUMNS + [
    "param_set", "n_tensors", "numel", "dtype", "optimizer", "impl", "source",
    "median_ms", "p20_ms", "p80_ms", "min_ms", "samples", "mode", "replicas",
    "bytes_per_param", "floor_ms", "achieved_gbps", "pct_of_floor", "vs_adamw_fused", "compile_s",
]
#: kernel CSV (`<date>-<device>-kernels.csv`)
KERNEL_COLUMNS = META_COLUMNS + [
    "kind", "kernel", "impl", "dtype", "n_tensors", "numel_per_tensor", "numel",
    "median_us", "p20_us", "p80_us", "samples", "bytes", "achieved_gbps", "pct_of_floor",
]


def _fmt(x, nd=3):
    if x is None or x == "":
        return ""
    if isinstance(x, float):
        return f"{x:.{nd}g}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.{nd}f}".rstrip("0").rstrip(".")
    return str(x)


def step_rows(results, meta: dict[str, str], copy_gbps: float, modes: dict) -> list[dict]:
    """CSV rows from StepResults; ratios against AdamW(fused) of the same (set, dtype) group."""
    ref = {}
    for r in results:
        if r.cand.key == "adamw/torch-fused":
            ref[(r.pset.name, r.dtype)] = r.stats.median_s
    rows = []
    for r in results:
        moved = r.bytes_per_param * r.pset.numel
        med = r.stats.median_s
        gbps = moved / med / 1e9
        floor_s = moved / (copy_gbps * 1e9)
        adamw = ref.get((r.pset.name, r.dtype))
        mode = modes.get((r.pset.name, r.dtype), ("", ""))[0]
        n_rep = r.replicas
        rows.append({**meta, "copy_gbps": round(copy_gbps, 2),
                     "param_set": r.pset.name, "n_tensors": r.pset.n_tensors, "numel": r.pset.numel,
                     "dtype": str(r.dtype).removeprefix("torch."), "optimizer": r.cand.optimizer,
                     "impl": r.cand.impl, "source": r.cand.source,
                     "median_ms": round(med * 1e3, 4), "p20_ms": round(r.stats.p20_s * 1e3, 4),
                     "p80_ms": round(r.stats.p80_s * 1e3, 4), "min_ms": round(r.stats.min_s * 1e3, 4),
                     "samples": r.stats.n, "mode": mode, "replicas": n_rep,
                     "bytes_per_param": r.bytes_per_param, "floor_ms": round(floor_s * 1e3, 4),
                     "achieved_gbps": round(gbps, 3), "pct_of_floor": round(100 * floor_s / med, 2),
                     "vs_adamw_fused": round(med / adamw, 3) if adamw else "",
                     "compile_s": round(r.compile_s, 2) if r.compile_s is not None else ""})
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def markdown_table(rows: list[dict]) -> str:
    """One table per (set, dtype): ms/step with spread, GB/s, % of copy floor, ratio to AdamW(fused)."""
    groups = _grouped(rows, "param_set", "dtype", "n_tensors", "numel")
    out = []
    for (pset, dtype, n, numel), rs in groups.items():
        out.append(f"**{pset}** ({n} tensors, {numel / 1e6:.1f}M params), {dtype}, "
                   f"copy floor {rs[0]['copy_gbps']} GB/s\n")
        out.append("| optimizer | impl | ms/step (p20–p80) | B/param | GB/s | % of copy | × AdamW fused |")
        out.append("|---|---|---|---|---|---|---|")
        for r in sorted(rs, key=lambda r: (r["optimizer"] != "adamw", r["optimizer"], r["median_ms"])):
            impl = f"**{r['impl']}**" if r["source"] == "fused_optim" else r["impl"]
            comp = f" (compile {r['compile_s']} s)" if r["compile_s"] != "" else ""
            out.append(f"| {r['optimizer']} | {impl}{comp} | {_fmt(r['median_ms'])} ({_fmt(r['p20_ms'])}–"
                       f"{_fmt(r['p80_ms'])}) | {r['bytes_per_param']} | {_fmt(r['achieved_gbps'])} | "
                       f"{_fmt(r['pct_of_floor'], 2)} | {_fmt(r['vs_adamw_fused'])} |")
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


def plot_steps(rows: list[dict], path: Path, title: str) -> None:
    """Per (set, dtype): time per step (log) and % of the copy floor, one bar per optimizer × impl."""
    from matplotlib.patches import Patch

    plt = _pyplot()
    groups = _grouped(rows, "param_set", "dtype")
    n = max(1, len(groups))
    width = max(8.0, 0.45 * max((len(v) for v in groups.values()), default=1) * 2)
    fig, axes = plt.subplots(n, 2, figsize=(width, 3.6 * n), squeeze=False)
    for i, ((pset, dtype), rs) in enumerate(groups.items()):
        rs = sorted(rs, key=lambda r: (r["optimizer"], r["median_ms"]))
        labels = [f"{r['optimizer']}/{r['impl']}" for r in rs]
        colors = [_COLORS.get(r["source"], "#2ca02c") for r in rs]
        x = range(len(rs))
        ax = axes[i][0]
        ax.bar(x, [r["median_ms"] for r in rs], color=colors,
               yerr=[[r["median_ms"] - r["p20_ms"] for r in rs], [r["p80_ms"] - r["median_ms"] for r in rs]],
               capsize=2)
        ax.set_yscale("log")
        ax.set_ylabel("ms per step (median, p20–p80)")
        ax.set_title(f"{pset}, {dtype}: time per step")
        ax = axes[i][1]
        ax.bar(x, [r["pct_of_floor"] for r in rs], color=colors)
        ax.axhline(100, color="k", lw=0.8, ls="--")
        ax.set_ylabel("% of copy bandwidth")
        ax.set_title(f"{pset}, {dtype}: achieved / copy floor ({rs[0]['copy_gbps']} GB/s)")
        for ax in axes[i]:
            ax.set_xticks(list(x))
            ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.legend(handles=[Patch(color=c, label=s) for s, c in _COLORS.items()], loc="upper right", ncol=3)
    fig.suptitle(title, fontsize=9, y=0.995, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_kernels(rows: list[dict], path: Path, title: str) -> None:
    """GB/s against tensor count (total elements fixed) for each kernel, one line per impl."""
    plt = _pyplot()
    groups = _grouped(rows, "kernel", "dtype")
    n = max(1, len(groups))
    cols = min(3, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.3 * nrows), squeeze=False)
    for i, ((kernel, dtype), rs) in enumerate(groups.items()):
        ax = axes[i // cols][i % cols]
        for (impl,), pts in _grouped(rs, "impl").items():
            pts.sort(key=lambda r: r["n_tensors"])
            ax.plot([r["n_tensors"] for r in pts], [r["achieved_gbps"] for r in pts], marker="o", label=impl)
        if rs and rs[0].get("copy_gbps"):
            ax.axhline(float(rs[0]["copy_gbps"]), color="k", lw=0.8, ls="--", label="copy floor")
        ax.set_xscale("log")
        ax.set_xlabel("tensors (same total elements)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{kernel} ({dtype})", fontsize=9)
        ax.legend(fontsize=7)
    for j in range(n, nrows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.suptitle(title, fontsize=9, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
