"""Convergence benchmark: every fused_optim optimizer against torch's SGD, Adam and AdamW on real data.

    python -m bench.convergence            # full CPU protocol (see PROTOCOL below), writes bench/results/convergence/
    python -m bench.convergence --quick    # one seed, two lr per optimizer, short budgets: a few minutes on 2 cores
    python -m bench.convergence --report-only --out DIR   # redo summary + plots from DIR/curves.csv

Speed per step is the `python -m bench` half; this is the other half: does the optimizer train, and
how fast in epochs and seconds? The seeds claim that NeuroOptima "reaches the target accuracy in fewer
epochs" and "generalizes better" than SGD/Adam/AdamW, that Gravity converges faster than Adam on
image classification, and that GradientEquilibrium "finds the equilibrium". This module measures
those things on data that ships with scikit-learn, so it runs offline on a fresh machine.

PROTOCOL (the same for every optimizer, so differences come from the optimizer alone)
  * Data: `sklearn.datasets.load_digits` (1,797 8x8 images, 10 classes) and `load_diabetes` (442
    patients, 10 features, regression), each split once, stratified where it applies, with
    `random_state=0` into 60% train / 20% validation / 20% test. Features are scaled with the train
    statistics only. Validation picks the learning rate (and the early-stopping epoch); test is
    reported at that epoch and never used for a choice.
  * Tasks: `digits_mlp` (64-128-128-10 ReLU MLP), `digits_cnn` (two 3x3 convs, max-pool, two linears),
    `diabetes` (10-64-64-1 ReLU MLP, MSE on the standardised target, metric R^2) and, when CUDA is
    present, `char_transformer` (2-layer causal transformer on a deterministically generated
    arithmetic corpus, metric next-character accuracy).
  * Same initialisation and data order for every optimizer: for seed s the model's initial weights
    come from `torch.manual_seed(s)` before building it and the minibatch order from a separate
    `torch.Generator` seeded with s, so optimizers that draw from the global RNG (Gravity's velocity)
    change neither. Same epoch budget and batch size for every optimizer; SAM and NeuroOptima
    evaluate the closure twice per step, which the time columns show.
  * Learning rate: a documented grid per optimizer (`OPTIMIZERS` below: six values half a decade
    apart, spanning three decades around the usual default; `--quick` keeps the two points nearest
    the default), every point trained with seed 0; the point with the best validation metric (ties:
    lower final validation loss) is chosen and then trained with seeds 1..N-1, which alone are
    reported (seed 0 won a selection on a small validation set, so it is biased upward). Everything
    else stays at each optimizer's documented default (listed in the table): no per-task tuning
    beyond the lr.
  * Recorded per epoch: full-train-set loss, validation loss and metric, test metric, and the
    wall-clock of the epoch's training steps (evaluation excluded). Threads are pinned
    (`--threads`, default 1) so timings on a shared machine are per core and comparable in one run.

Outputs in `--out`: `curves.csv` (every epoch of every run, sweep runs included), `runs.csv` (one row
per run), `summary.csv` / `summary.md` (per task and optimizer, at the chosen lr: mean ± std over
seeds of best validation metric, test metric at that epoch, epochs and seconds to the task's target),
`claims.md` (each seed claim checked with a stated rule), `convergence.png` (all tasks) and
`<task>.png`, `meta.json` (hardware, versions, protocol, skipped optimizers with the reason).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["OPTIMIZERS", "TASKS", "OptSpec", "Task", "available_optimizers", "main", "train_run"]

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "convergence"


# --------------------------------------------------------------------------------------------------
# Data and tasks
# --------------------------------------------------------------------------------------------------

@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device: torch.device) -> Data:
        return Data(*(t.to(device) for t in (self.x_train, self.y_train, self.x_val, self.y_val,
                                              self.x_test, self.y_test)))


def _split(x, y, stratify: bool):
    """60/20/20 split, fixed by random_state=0 so every run and every machine sees the same rows."""
    from sklearn.model_selection import train_test_split

    x_tr, x_rest, y_tr, y_rest = train_test_split(x, y, test_size=0.4, random_state=0,
                                                  stratify=y if stratify else None)
    x_va, x_te, y_va, y_te = train_test_split(x_rest, y_rest, test_size=0.5, random_state=0,
                                              stratify=y_rest if stratify else None)
    return x_tr, y_tr, x_va, y_va, x_te, y_te


def load_digits_data(image: bool) -> Data:
    from sklearn.datasets import load_digits

    ds = load_digits()
    x_tr, y_tr, x_va, y_va, x_te, y_te = _split(ds.data, ds.target, stratify=True)
    # pixel values are 0..16; per-feature standardisation with train statistics (constant border
    # pixels get std 1 so they stay 0)
    mean = x_tr.mean(0)
    std = x_tr.std(0)
    std[std == 0] = 1.0

    def prep(x):
        t = torch.tensor((x - mean) / std, dtype=torch.float32)
        return t.view(-1, 1, 8, 8) if image else t

    return Data(prep(x_tr), torch.tensor(y_tr), prep(x_va), torch.tensor(y_va), prep(x_te), torch.tensor(y_te))


def load_diabetes_data() -> Data:
    from sklearn.datasets import load_diabetes

    ds = load_diabetes()
    x_tr, y_tr, x_va, y_va, x_te, y_te = _split(ds.data, ds.target, stratify=False)
    xm, xs = x_tr.mean(0), x_tr.std(0)
    ym, ys = y_tr.mean(), y_tr.std()

    def px(x):
        return torch.tensor((x - xm) / xs, dtype=torch.float32)

    def py(y):
        return torch.tensor((y - ym) / ys, dtype=torch.float32).unsqueeze(1)

    return Data(px(x_tr), py(y_tr), px(x_va), py(y_va), px(x_te), py(y_te))


def _arithmetic_corpus(n_lines: int, seed: int) -> str:
    """Deterministic text: lines like '38+405=443' and '72-19=53'. The sums are learnable, so the
    next-character accuracy keeps rising with better optimisation instead of saturating on syntax."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        a, b = rng.randrange(1000), rng.randrange(1000)
        if rng.random() < 0.5:
            lines.append(f"{a}+{b}={a + b}")
        else:
            a, b = max(a, b), min(a, b)
            lines.append(f"{a}-{b}={a - b}")
    return "\n".join(lines) + "\n"


CHAR_VOCAB = "0123456789+-=\n"
CHAR_CONTEXT = 64


def load_char_data() -> Data:
    """Train/val/test are separately generated corpora (different generator seeds), cut into
    windows of CHAR_CONTEXT+1 characters; x is the window's first CHAR_CONTEXT, y the next ones."""
    stoi = {c: i for i, c in enumerate(CHAR_VOCAB)}

    def windows(text: str, stride: int):
        ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
        n = (len(ids) - CHAR_CONTEXT - 1) // stride
        idx = torch.arange(n).unsqueeze(1) * stride + torch.arange(CHAR_CONTEXT + 1)
        w = ids[idx]
        return w[:, :-1].contiguous(), w[:, 1:].contiguous()

    x_tr, y_tr = windows(_arithmetic_corpus(40_000, seed=1), stride=CHAR_CONTEXT // 2)
    x_va, y_va = windows(_arithmetic_corpus(4_000, seed=2), stride=CHAR_CONTEXT)
    x_te, y_te = windows(_arithmetic_corpus(4_000, seed=3), stride=CHAR_CONTEXT)
    return Data(x_tr, y_tr, x_va, y_va, x_te, y_te)


# Every model names its output layer `head` and any lookup table `embed`: `muon_param_groups` sends
# those (and every 1-D param) to Muon's Adam side, as Muon's authors prescribe (docs/spec.md §8).
class MLP(nn.Module):
    def __init__(self, d_in: int, hidden: Sequence[int], d_out: int):
        super().__init__()
        layers: list[nn.Module] = []
        for h in hidden:
            layers += [nn.Linear(d_in, h), nn.ReLU()]
            d_in = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.head(self.body(x))


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.body(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int = len(CHAR_VOCAB), d: int = 128, layers: int = 2, heads: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(CHAR_CONTEXT, d))
        block = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CHAR_CONTEXT), persistent=False)

    def forward(self, x):
        t = x.shape[1]
        h = self.embed(x) + self.pos[:t]
        h = self.body(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def _accuracy(out, y) -> float:
    return (out.argmax(-1) == y).float().mean().item()


def _r2(out, y) -> float:
    return 1.0 - (((out - y) ** 2).sum() / ((y - y.mean()) ** 2).sum()).item()


def _seq_ce(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@dataclass
class Task:
    name: str
    load: Callable[[], Data]
    build_model: Callable[[], nn.Module]
    loss: Callable
    metric: Callable              # higher is better
    metric_name: str
    target: float                 # validation metric that counts as "reached" for epochs/time to target
    epochs: int
    quick_epochs: int
    batch_size: int
    gpu_only: bool = False        # run by default only when CUDA is present
    steps_per_epoch: int | None = None   # None: one pass over the train set
    train_eval_rows: int | None = None   # train loss on the first N train rows (None: all of them)
    description: str = ""


TASKS: dict[str, Task] = {t.name: t for t in [
    Task("digits_mlp", lambda: load_digits_data(image=False), lambda: MLP(64, (128, 128), 10),
         F.cross_entropy, _accuracy, "accuracy", target=0.97, epochs=30, quick_epochs=5, batch_size=32,
         description="load_digits, 64-128-128-10 ReLU MLP, cross-entropy"),
    Task("digits_cnn", lambda: load_digits_data(image=True), SmallCNN,
         F.cross_entropy, _accuracy, "accuracy", target=0.98, epochs=20, quick_epochs=3, batch_size=32,
         description="load_digits as 1x8x8 images, conv16-conv32-pool-fc64-fc10, cross-entropy"),
    Task("diabetes", load_diabetes_data, lambda: MLP(10, (64, 64), 1),
         F.mse_loss, _r2, "R^2", target=0.45, epochs=60, quick_epochs=10, batch_size=16,
         description="load_diabetes, 10-64-64-1 ReLU MLP, MSE on the standardised target"),
    Task("char_transformer", load_char_data, CharTransformer,
         _seq_ce, _accuracy, "next-char accuracy", target=0.40, epochs=10, quick_epochs=2, batch_size=64,
         gpu_only=True, steps_per_epoch=200, train_eval_rows=2048,
         description="2-layer causal transformer (d=128) on a generated arithmetic corpus"),
]}


# --------------------------------------------------------------------------------------------------
# Optimizers: one table entry each; entries whose fused_optim names are not exported are skipped
# --------------------------------------------------------------------------------------------------

def _fo(name: str):
    import fused_optim

    return getattr(fused_optim, name)


def _build_muon(model: nn.Module, lr: float):
    """Muon on hidden >=2-D weights, Adam on the head, embeddings and 1-D params, through the library's
    own `muon_param_groups` (what a user calls). The Adam side runs at lr/20 (1e-3 at Muon's default
    0.02) so one grid scales both sides together; betas/eps stay Muon's Adam-side defaults (docs/spec.md §8).
    Top-level raw parameters (the transformer's learned positions) are embeddings too."""
    fo = __import__("fused_optim")
    top_level = [p for n, p in model.named_parameters() if "." not in n]
    return fo.Muon(fo.muon_param_groups(model, lr=lr, adam_lr=lr / 20, adam_params=top_level))


@dataclass
class OptSpec:
    name: str
    build: Callable[[nn.Module, float], torch.optim.Optimizer]
    grid: tuple[float, ...]        # the full lr grid (half a decade apart), documented in meta.json
    quick_grid: tuple[float, ...]  # --quick: the two points around the usual default
    family: str                    # "fused_optim" or "baseline"
    requires: tuple[str, ...] = ()  # names that must be exported by fused_optim
    settings: str = ""             # everything other than lr, for the record


def _half_decades(lo: float, n: int = 6) -> tuple[float, ...]:
    """lo, 3*lo, 10*lo, 30*lo, ...: six points span three decades, wide enough that no optimizer's
    best lr sat on the edge of its grid in the pilot runs (the summary shows the grid to check)."""
    return tuple(float(f"{lo * (10 ** (i // 2)) * (3 if i % 2 else 1):.3g}") for i in range(n))


_SGD_GRID = _half_decades(1e-3)        # 0.001 .. 0.3
_ADAM_GRID = _half_decades(1e-4)       # 1e-4 .. 3e-2
_SIGN_GRID = _half_decades(1e-5)       # Lion-style sign steps: 1e-5 .. 3e-3
_PLAIN_GRID = _half_decades(1e-2)      # Gravity and GE average (not accumulate) g: SGD without momentum

OPTIMIZERS: dict[str, OptSpec] = {s.name: s for s in [
    OptSpec("SGD", lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
            _SGD_GRID, (0.03, 0.1), "baseline", settings="momentum=0.9"),
    OptSpec("Adam", lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr),
            _ADAM_GRID, (1e-3, 3e-3), "baseline", settings="betas=(0.9, 0.999), eps=1e-8"),
    OptSpec("AdamW", lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr),
            _ADAM_GRID, (1e-3, 3e-3), "baseline", settings="betas=(0.9, 0.999), weight_decay=0.01"),
    OptSpec("Gravity", lambda m, lr: _fo("Gravity")(m.parameters(), lr=lr),
            _PLAIN_GRID, (0.1, 0.3), "fused_optim", ("Gravity",), settings="alpha=0.01, beta=0.9"),
    OptSpec("Lion", lambda m, lr: _fo("Lion")(m.parameters(), lr=lr),
            _SIGN_GRID, (1e-4, 3e-4), "fused_optim", ("Lion",), settings="betas=(0.9, 0.99), weight_decay=0"),
    OptSpec("Adan", lambda m, lr: _fo("Adan")(m.parameters(), lr=lr),
            _ADAM_GRID, (1e-3, 3e-3), "fused_optim", ("Adan",),
            settings="betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0"),
    OptSpec("GradientEquilibrium", lambda m, lr: _fo("GradientEquilibrium")(m.parameters(), lr=lr),
            _PLAIN_GRID, (0.03, 0.1), "fused_optim", ("GradientEquilibrium",), settings="weight_decay=0"),
    OptSpec("Lookahead(AdamW)",
            lambda m, lr: _fo("Lookahead")(torch.optim.AdamW(m.parameters(), lr=lr), k=5, alpha=0.5),
            _ADAM_GRID, (1e-3, 3e-3), "fused_optim", ("Lookahead",),
            settings="k=5, alpha=0.5 around torch AdamW (weight_decay=0.01)"),
    OptSpec("SAM(SGD)",
            lambda m, lr: _fo("SAM")(m.parameters(), torch.optim.SGD, rho=0.05, lr=lr, momentum=0.9),
            _SGD_GRID, (0.03, 0.1), "fused_optim", ("SAM",), settings="rho=0.05 around torch SGD momentum=0.9"),
    OptSpec("NeuroOptima",
            lambda m, lr: _fo("NeuroOptima")(m.parameters(), lr=lr, weight_decay=0.01, sam_rho=0.05,
                                             lookahead_k=5, lookahead_alpha=0.5, betas=(0.9, 0.999),
                                             eps=1e-8),
            (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2), (3e-4, 1e-3), "fused_optim", ("NeuroOptima",),
            settings="the seed's example: weight_decay=0.01, sam_rho=0.05, lookahead_k=5, "
                     "lookahead_alpha=0.5, betas=(0.9, 0.999), eps=1e-8"),
    OptSpec("Muon+Adam", _build_muon, _SGD_GRID, (0.01, 0.03), "fused_optim", ("Muon", "muon_param_groups"),
            settings="momentum=0.95, nesterov, ns_steps=5 on hidden >=2-D weights; head/embeddings/"
                     "1-D params on Adam(lr/20, betas=(0.9, 0.95), eps=1e-10)"),
]}


def _low_precision_variant(base: OptSpec, precision: str) -> OptSpec:
    """`base` with its state stored in `precision` (fused_optim/lowstate.py; docs/lowbit.md): the same lr
    grid, so the protocol's lr choice is redone for it, and everything else unchanged. Tensors under 4096
    elements keep fp32 state in 8 bits (the tasks' larger weight matrices are above it)."""
    cls = base.requires[0]
    kwargs = {"Lion": {}, "Adan": {}, "Gravity": {}}[cls]
    return OptSpec(f"{base.name}[{precision}]",
                   lambda m, lr: _fo(cls)(m.parameters(), lr=lr, state_precision=precision, **kwargs),
                   base.grid, base.quick_grid, "fused_optim", base.requires,
                   settings=f"{base.settings}, state_precision={precision!r}")


#: the low-precision state variants (python -m bench.convergence --optimizers 'Lion,Lion[8bit],...')
OPTIMIZERS.update((v.name, v) for v in (_low_precision_variant(OPTIMIZERS[b], prec)
                                        for b in ("Lion", "Adan", "Gravity") for prec in ("bf16", "8bit")))


def available_optimizers(names: Sequence[str] | None = None) -> tuple[list[OptSpec], dict[str, str]]:
    """The specs that can run now, and {name: why not} for the rest (composites land over time)."""
    import fused_optim

    run, skipped = [], {}
    for name in names or OPTIMIZERS:
        spec = OPTIMIZERS[name]
        missing = [r for r in spec.requires if not hasattr(fused_optim, r)]
        if missing:
            skipped[name] = f"fused_optim does not export {', '.join(missing)} yet"
        else:
            run.append(spec)
    return run, skipped


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------

_INIT_CACHE: dict[tuple[str, int], dict] = {}


def _initial_model(task: Task, seed: int, device: torch.device) -> nn.Module:
    """The same initial weights for every optimizer: built once per (task, seed) and copied."""
    key = (task.name, seed)
    if key not in _INIT_CACHE:
        torch.manual_seed(seed)
        _INIT_CACHE[key] = {k: v.clone() for k, v in task.build_model().state_dict().items()}
    model = task.build_model()
    model.load_state_dict(_INIT_CACHE[key])
    return model.to(device)


@torch.no_grad()
def _evaluate(model: nn.Module, task: Task, x, y, chunk: int = 4096) -> tuple[float, float]:
    model.eval()
    outs = [model(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    out = torch.cat(outs)
    model.train()
    return task.loss(out, y).item(), task.metric(out, y)


@dataclass
class RunResult:
    task: str
    optimizer: str
    lr: float
    seed: int
    phase: str                          # "sweep" (seed 0 over the grid) or "seeds" (chosen lr)
    epochs: list[dict] = field(default_factory=list)
    diverged: bool = False
    mean_drift: float = 0.0             # max over tensors of |mean(p_end) - mean(p_start)|
    impl: str = ""


def _impl_of(opt) -> str:
    for o in (opt, getattr(opt, "optimizer", None), getattr(opt, "base_optimizer", None)):
        if o is not None and hasattr(o, "impl_for"):
            try:
                return o.impl_for("cpu" if not torch.cuda.is_available() else "cuda")
            except (RuntimeError, ValueError):  # the impl label is informational only
                return ""
    return "torch"


def train_run(task: Task, spec: OptSpec, lr: float, seed: int, epochs: int, data: Data,
              device: torch.device, phase: str = "sweep") -> RunResult:
    """Train one (task, optimizer, lr, seed); evaluate after every epoch (epoch 0 = initial weights)."""
    model = _initial_model(task, seed, device)
    start_means = [p.detach().double().mean().item() for p in model.parameters()]
    torch.manual_seed(seed)  # optimizer-side draws (Gravity's velocity) are also fixed per seed
    opt = spec.build(model, lr)
    order = torch.Generator().manual_seed(seed)
    res = RunResult(task.name, spec.name, lr, seed, phase, impl=_impl_of(opt))
    n = len(data.x_train)

    def record(epoch: int, seconds: float):
        rows = slice(0, task.train_eval_rows)
        tr_loss, _ = _evaluate(model, task, data.x_train[rows], data.y_train[rows])
        va_loss, va_metric = _evaluate(model, task, data.x_val, data.y_val)
        _, te_metric = _evaluate(model, task, data.x_test, data.y_test)
        res.epochs.append(dict(epoch=epoch, train_loss=tr_loss, val_loss=va_loss, val_metric=va_metric,
                               test_metric=te_metric, epoch_seconds=seconds))
        return tr_loss

    record(0, 0.0)
    for epoch in range(1, epochs + 1):
        if task.steps_per_epoch is None:
            perm = torch.randperm(n, generator=order)
            batches = [perm[i:i + task.batch_size] for i in range(0, n, task.batch_size)]
        else:  # fixed-size epochs for the large corpus: random windows, same order for every optimizer
            idx = torch.randint(0, n, (task.steps_per_epoch, task.batch_size), generator=order)
            batches = list(idx)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for idx in batches:
            idx = idx.to(device)
            xb, yb = data.x_train[idx], data.y_train[idx]

            def closure(xb=xb, yb=yb):  # bound now; SAM-style optimizers call it twice per step
                opt.zero_grad(set_to_none=True)
                loss = task.loss(model(xb), yb)
                loss.backward()
                return loss

            opt.step(closure)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        tr_loss = record(epoch, seconds)
        if not math.isfinite(tr_loss) or tr_loss > 1e6:
            res.diverged = True
            break
    with torch.no_grad():
        res.mean_drift = max((abs(p.detach().double().mean().item() - m)
                              for p, m in zip(model.parameters(), start_means)), default=0.0)
    return res


# --------------------------------------------------------------------------------------------------
# Protocol driver, CSV, summary, plots
# --------------------------------------------------------------------------------------------------

CURVE_FIELDS = ["task", "optimizer", "lr", "seed", "phase", "epoch", "train_loss", "val_loss", "val_metric",
                "test_metric", "epoch_seconds", "cum_seconds"]
RUN_FIELDS = ["task", "optimizer", "lr", "seed", "phase", "epochs_run", "diverged", "initial_train_loss",
              "final_train_loss", "best_val_metric", "best_epoch", "test_metric_at_best", "final_val_metric",
              "epochs_to_target", "seconds_to_target", "median_epoch_seconds", "mean_drift", "impl"]


def _run_row(r: RunResult, target: float) -> dict:
    ep = r.epochs
    valid = [e for e in ep if math.isfinite(e["val_metric"])]
    best = max(valid[1:] or valid, key=lambda e: e["val_metric"]) if valid else None
    cum, reach_ep, reach_s = 0.0, None, None
    for e in ep:
        cum += e["epoch_seconds"]
        if reach_ep is None and e["epoch"] > 0 and e["val_metric"] >= target:
            reach_ep, reach_s = e["epoch"], cum
    secs = [e["epoch_seconds"] for e in ep[1:]]
    return dict(task=r.task, optimizer=r.optimizer, lr=r.lr, seed=r.seed, phase=r.phase,
                epochs_run=len(ep) - 1, diverged=int(r.diverged), initial_train_loss=ep[0]["train_loss"],
                final_train_loss=ep[-1]["train_loss"],
                best_val_metric=best["val_metric"] if best else float("nan"),
                best_epoch=best["epoch"] if best else "", test_metric_at_best=best["test_metric"] if best else
                float("nan"), final_val_metric=ep[-1]["val_metric"],
                epochs_to_target=reach_ep if reach_ep is not None else "",
                seconds_to_target=f"{reach_s:.4f}" if reach_s is not None else "",
                median_epoch_seconds=statistics.median(secs) if secs else float("nan"),
                mean_drift=r.mean_drift, impl=r.impl)


def _select_key(row: dict) -> tuple:
    """Best validation metric; a diverged or NaN run is never chosen; ties by lower final val loss."""
    v = float(row["best_val_metric"])
    if int(row["diverged"]) or not math.isfinite(v):
        return (-math.inf, -math.inf)
    return (round(v, 4), -float(row["final_val_loss"]))


class _Writer:
    """Appends every run to curves.csv / runs.csv as soon as it finishes, so an interrupted protocol
    still leaves its data (and `--report-only` can summarise it)."""

    def __init__(self, out: Path, fresh: bool):
        self.curves = out / "curves.csv"
        self.runs = out / "runs.csv"
        for path, fields in ((self.curves, CURVE_FIELDS), (self.runs, RUN_FIELDS)):
            if fresh or not path.exists():
                with path.open("w", newline="") as f:
                    csv.DictWriter(f, fields).writeheader()

    def add(self, r: RunResult, target: float) -> dict:
        cum = 0.0
        with self.curves.open("a", newline="") as f:
            w = csv.DictWriter(f, CURVE_FIELDS)
            for e in r.epochs:
                cum += e["epoch_seconds"]
                w.writerow(dict(task=r.task, optimizer=r.optimizer, lr=r.lr, seed=r.seed, phase=r.phase,
                                cum_seconds=f"{cum:.5f}", **{k: (f"{v:.6g}" if isinstance(v, float) else v)
                                                             for k, v in e.items()}))
        row = _run_row(r, target)
        with self.runs.open("a", newline="") as f:
            csv.DictWriter(f, RUN_FIELDS).writerow(row)
        row["final_val_loss"] = r.epochs[-1]["val_loss"]
        return row


def _fmt_lr(lr: float) -> str:
    return f"{lr:g}"


def run_protocol(tasks: list[Task], specs: list[OptSpec], seeds: int, quick: bool, device: torch.device,
                 out: Path, log=print) -> None:
    writer = _Writer(out, fresh=True)
    for task in tasks:
        data = task.load().to(device)
        epochs = task.quick_epochs if quick else task.epochs
        for spec in specs:
            grid = spec.quick_grid if quick else spec.grid
            sweep = []
            for lr in grid:
                t0 = time.perf_counter()
                r = train_run(task, spec, lr, 0, epochs, data, device, phase="sweep")
                row = writer.add(r, task.target)
                sweep.append(row)
                log(f"[{task.name}] {spec.name:<20} lr={_fmt_lr(lr):<7} seed=0 best val {task.metric_name} "
                    f"{row['best_val_metric']:.4f} train loss {row['initial_train_loss']:.3g}->"
                    f"{row['final_train_loss']:.3g}{' DIVERGED' if r.diverged else ''} "
                    f"({time.perf_counter() - t0:.1f}s)")
            best = max(sweep, key=_select_key)
            for seed in range(1, seeds):
                r = train_run(task, spec, best["lr"], seed, epochs, data, device, phase="seeds")
                row = writer.add(r, task.target)
                log(f"[{task.name}] {spec.name:<20} lr={_fmt_lr(best['lr']):<7} seed={seed} best val "
                    f"{task.metric_name} {row['best_val_metric']:.4f}")


def _read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _num(x: str) -> float:
    return float(x) if x not in ("", None) else float("nan")


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if math.isfinite(x)]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def chosen_runs(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Per (task, optimizer): the runs reported at the lr chosen on validation.

    Seed 0 chose the lr, so it is the luckiest draw of its grid on a small validation set (359 images,
    one image = 0.28 points): reporting it would favour noisy optimizers (winner's curse). With more
    than one seed the report uses seeds 1.. only; with one seed (--quick) the selection run is all there is."""
    out: dict[tuple[str, str], list[dict]] = {}
    keys = sorted({(r["task"], r["optimizer"]) for r in runs}, key=lambda k: k)
    for key in keys:
        rs = [r for r in runs if (r["task"], r["optimizer"]) == key]
        sweep = [r for r in rs if r["phase"] == "sweep"]
        for r in sweep:
            r.setdefault("final_val_loss", "nan")
        seeds = [r for r in rs if r["phase"] == "seeds"]
        if seeds:  # the driver already chose: the seeds phase ran at the chosen lr
            lr = seeds[0]["lr"]
        else:
            lr = max(sweep, key=_select_key_csv)["lr"]
        out[key] = [r for r in seeds if r["lr"] == lr] or [r for r in sweep if r["lr"] == lr]
    return out


def _select_key_csv(row: dict) -> tuple:
    v = _num(row["best_val_metric"])
    if int(row["diverged"]) or not math.isfinite(v):
        return (-math.inf, -math.inf)
    return (round(v, 4), -_num(row.get("final_val_loss", "nan")) if math.isfinite(
        _num(row.get("final_val_loss", "nan"))) else 0.0)


def summarize(out: Path) -> list[dict]:
    runs = _read_csv(out / "runs.csv")
    curves = _read_csv(out / "curves.csv")
    final_val_loss = {}
    for c in curves:
        final_val_loss[(c["task"], c["optimizer"], c["lr"], c["seed"], c["phase"])] = c["val_loss"]
    for r in runs:
        r["final_val_loss"] = final_val_loss.get((r["task"], r["optimizer"], r["lr"], r["seed"], r["phase"]), "nan")
    rows = []
    for (task, opt), rs in chosen_runs(runs).items():
        n = len(rs)
        reached = [r for r in rs if r["epochs_to_target"] != ""]
        best_m, best_s = _mean_std([_num(r["best_val_metric"]) for r in rs])
        test_m, test_s = _mean_std([_num(r["test_metric_at_best"]) for r in rs])
        fin_m, fin_s = _mean_std([_num(r["final_val_metric"]) for r in rs])
        loss_m, loss_s = _mean_std([_num(r["final_train_loss"]) for r in rs])
        ep_m, _ = _mean_std([_num(r["epochs_to_target"]) for r in reached])
        t_m, _ = _mean_std([_num(r["seconds_to_target"]) for r in reached])
        sec_m, _ = _mean_std([_num(r["median_epoch_seconds"]) for r in rs])
        sweep_lrs = sorted({_num(r["lr"]) for r in runs if (r["task"], r["optimizer"]) == (task, opt)})
        rows.append(dict(task=task, optimizer=opt, lr=rs[0]["lr"], grid=" ".join(_fmt_lr(x) for x in sweep_lrs),
                         seeds=n, best_val_mean=best_m, best_val_std=best_s, test_at_best_mean=test_m,
                         test_at_best_std=test_s, final_val_mean=fin_m, final_val_std=fin_s,
                         final_train_loss_mean=loss_m, final_train_loss_std=loss_s,
                         reached=f"{len(reached)}/{n}", epochs_to_target_mean=ep_m,
                         seconds_to_target_mean=t_m, seconds_per_epoch=sec_m,
                         diverged=sum(int(r["diverged"]) for r in rs),
                         mean_drift_max=max(_num(r["mean_drift"]) for r in rs)))
    fields = list(rows[0]) if rows else []
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return rows


def _summary_md(rows: list[dict], meta: dict) -> str:
    lines = []
    for task in [t for t in TASKS if any(r["task"] == t for r in rows)]:
        t = TASKS[task]
        lines += [f"### {task}: {t.description}", "",
                  (f"{t.epochs if not meta['quick'] else t.quick_epochs} epochs, batch {t.batch_size}; "
                   f"target: validation {t.metric_name} >= {t.target}. Mean ± std over seeds at the lr chosen "
                   "on validation (seed 0 picks the lr and is left out of the statistics when there are "
                   "others); test is measured at each run's best-validation epoch."), "",
                  (f"| optimizer | lr | best val {t.metric_name} | test {t.metric_name} | final train loss | "
                   "reached | epochs to target | s to target | s/epoch |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        trs = sorted([r for r in rows if r["task"] == task], key=lambda r: -r["best_val_mean"]
                     if math.isfinite(r["best_val_mean"]) else math.inf)
        for r in trs:
            def f(x, d=3):
                return "—" if not math.isfinite(x) else f"{x:.{d}f}"
            lines.append(
                f"| {r['optimizer']} | {r['lr']} | {f(r['best_val_mean'], 4)} ± {f(r['best_val_std'], 4)} | "
                f"{f(r['test_at_best_mean'], 4)} ± {f(r['test_at_best_std'], 4)} | "
                f"{r['final_train_loss_mean']:.1e} | {r['reached']} | {f(r['epochs_to_target_mean'], 1)} | "
                f"{f(r['seconds_to_target_mean'], 2)} | {f(r['seconds_per_epoch'], 3)} |")
        lines.append("")
    if meta.get("skipped"):
        lines.append("Skipped: " + "; ".join(f"{k} ({v})" for k, v in meta["skipped"].items()))
        lines.append("")
    return "\n".join(lines)


# one fixed colour per optimizer, so a line keeps its colour across tasks and runs
_COLORS = {"SGD": "#d62728", "Adam": "#1f77b4", "AdamW": "#17becf", "Gravity": "#2ca02c", "Lion": "#bcbd22",
           "Adan": "#ff7f0e", "GradientEquilibrium": "#8c564b", "Lookahead(AdamW)": "#9467bd",
           "SAM(SGD)": "#e377c2", "NeuroOptima": "#000000", "Muon+Adam": "#7f7f7f"}


def _style(opt: str) -> dict:
    baseline = OPTIMIZERS[opt].family == "baseline" if opt in OPTIMIZERS else False
    return dict(color=_COLORS.get(opt, "#aaaaaa"), linestyle="--" if baseline else "-",
                linewidth=1.3 if baseline else 1.6)


def plot(out: Path) -> list[Path]:
    """convergence.png (every task: train loss, validation metric per epoch and per second) and one
    PNG per task, at each optimizer's chosen lr: mean over seeds, band = min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _read_csv(out / "curves.csv")
    runs = _read_csv(out / "runs.csv")
    chosen = chosen_runs(runs)
    tasks = [t for t in TASKS if any(k[0] == t for k in chosen)]
    opts = list(dict.fromkeys(k[1] for k in chosen))
    by_run: dict[tuple, list[dict]] = {}
    for c in curves:
        by_run.setdefault((c["task"], c["optimizer"], c["lr"], c["seed"], c["phase"]), []).append(c)

    def series(task, opt, col):
        rs = chosen.get((task, opt), [])
        runs_ = [by_run[(task, opt, r["lr"], r["seed"], r["phase"])] for r in rs]
        if not runs_:
            return None
        n = min(len(x) for x in runs_)  # a diverged run stops early: plot the common prefix
        vals = [[_num(x[i][col]) for x in runs_] for i in range(n)]
        secs = [statistics.fmean(_num(x[i]["cum_seconds"]) for x in runs_) for i in range(n)]
        return (list(range(n)), secs, [statistics.fmean(v) for v in vals], [min(v) for v in vals],
                [max(v) for v in vals])

    def draw(axes_row, task):
        t = TASKS[task]
        for opt in opts:
            st = _style(opt)
            for ax, col, x_is_time in zip(axes_row, ("train_loss", "val_metric", "val_metric"), (0, 0, 1)):
                s = series(task, opt, col)
                if s is None:
                    continue
                ep, secs, mean, lo, hi = s
                x = secs if x_is_time else ep
                ax.plot(x, mean, label=opt, **st)
                if not x_is_time:
                    ax.fill_between(x, lo, hi, color=st["color"], alpha=0.12, linewidth=0)
        axes_row[0].set_yscale("log")
        axes_row[0].set_title(f"{task}: train loss (full train set)", fontsize=10)
        axes_row[1].set_title(f"{task}: validation {t.metric_name}", fontsize=10)
        axes_row[2].set_title(f"{task}: validation {t.metric_name} vs training time", fontsize=10)
        vals = [v for o in opts if (s := series(task, o, "val_metric")) for v in s[2][1:] if math.isfinite(v)]
        for ax in axes_row[1:]:
            ax.axhline(t.target, color="grey", linewidth=0.8, linestyle=":")
            if vals:  # zoom on the range where optimizers differ; slow starters enter from below
                top = max(vals)
                ax.set_ylim(max(min(vals), top - (0.25 if t.metric_name != "R^2" else 0.4)), top + 0.01)
        axes_row[0].set_xlabel("epoch")
        axes_row[1].set_xlabel("epoch")
        axes_row[2].set_xlabel("seconds of training (mean over seeds)")
        for ax in axes_row:
            ax.grid(alpha=0.3)

    written = []
    fig, axes = plt.subplots(len(tasks), 3, figsize=(16, 3.9 * len(tasks)), squeeze=False)
    for row_axes, task in zip(axes, tasks):
        draw(row_axes, task)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), frameon=False)
    fig.suptitle("Each optimizer at its lr chosen on validation: mean over seeds, band = min..max; "
                 "dashed = torch baselines; dotted = target", fontsize=11)
    fig.tight_layout(rect=(0, 0.06 if len(tasks) > 1 else 0.12, 1, 0.97))
    path = out / "convergence.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    for task in tasks:
        fig, ax = plt.subplots(1, 3, figsize=(16, 4.3))
        draw(ax, task)
        ax[1].legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        p = out / f"{task}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written


def _meta(args, tasks, specs, skipped, device) -> dict:
    import fused_optim

    try:
        import sklearn
        skv = sklearn.__version__
    except ImportError:  # pragma: no cover - the loaders need it anyway
        skv = None
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    try:  # the commit the numbers belong to ("+dirty" when the tree had local changes)
        import subprocess

        root = Path(__file__).resolve().parents[1]
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10, check=False).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fused_optim", "bench/convergence.py"],
                               cwd=root, capture_output=True, text=True, timeout=10, check=False).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(
        quick=args.quick, seeds=args.seeds, device=str(device), commit=commit,
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        python=platform.python_version(), torch=torch.__version__, fused_optim=fused_optim.__version__,
        sklearn=skv, started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        tasks={t.name: dict(description=t.description, epochs=t.quick_epochs if args.quick else t.epochs,
                            batch_size=t.batch_size, target=t.target, metric=t.metric_name) for t in tasks},
        optimizers={s.name: dict(grid=list(s.quick_grid if args.quick else s.grid), settings=s.settings,
                                 family=s.family) for s in specs},
        skipped=skipped,
    )


BASELINES = ("SGD", "Adam", "AdamW")


def _compare(a: list[float], b: list[float], higher_is_better: bool) -> str:
    """'better' / 'worse' when the difference of means exceeds two standard errors over seeds
    (Welch), else 'within noise'; with one seed there is no noise estimate and no verdict."""
    if len(a) < 2 or len(b) < 2:
        return "one seed: no verdict"
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    d = (ma - mb) if higher_is_better else (mb - ma)
    if d > 2 * se and d > 0:
        return "better"
    if -d > 2 * se and d < 0:
        return "worse"
    return "within noise"


def _verdict(results: dict[str, str]) -> str:
    vals = set(results.values())
    if vals == {"better"}:
        return "**held**"
    if "worse" in vals:
        return "**did not hold** (worse than " + ", ".join(k for k, v in results.items() if v == "worse") + ")"
    if "one seed: no verdict" in vals:
        return "no verdict (one seed)"
    better = [k for k, v in results.items() if v == "better"]
    return "**not shown**: within seed noise" + (f" (better only than {', '.join(better)})" if better else "")


def claims_md(out: Path) -> str:
    """The seeds' training-quality claims, each checked on this run's data with an explicit rule."""
    runs = _read_csv(out / "runs.csv")
    curves = _read_csv(out / "curves.csv")
    last_val_loss = {(c["task"], c["optimizer"], c["lr"], c["seed"], c["phase"]): c["val_loss"] for c in curves}
    for r in runs:
        r["final_val_loss"] = last_val_loss.get((r["task"], r["optimizer"], r["lr"], r["seed"], r["phase"]), "nan")
    chosen = chosen_runs(runs)
    tasks = [t for t in TASKS if any(k[0] == t for k in chosen)]

    def per_seed(task, opt, col, censor=None):
        vals = []
        for r in chosen.get((task, opt), []):
            v = _num(r[col])
            if not math.isfinite(v) and censor is not None:
                v = censor  # target never reached: counted as one epoch past the budget
            vals.append(v)
        return vals

    def cell(vals, reached=None, d=1):
        if not vals:
            return "—" + (f" ({reached})" if reached else "")
        m = statistics.fmean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        spec = f".{d}f" if isinstance(d, int) else d  # a format spec such as ".1e" for losses near 0
        txt = f"{m:{spec}} ± {sd:{spec}}"
        return txt + (f" ({reached})" if reached else "")

    lines = [("Rule: *better*/*worse* = the difference of the means over seeds exceeds two standard errors "
              "(Welch); otherwise *within noise*. A claim **held** on a task only if the optimizer was better "
              "than every comparator there. Each optimizer ran at its own lr chosen on validation."), ""]
    have = {k[1] for k in chosen}

    meta_path = out / "meta.json"
    budgets = json.loads(meta_path.read_text())["tasks"] if meta_path.exists() else {}

    def table(title, subject, comparators, col, higher, d, task_list, censor_epochs=False, reached_only=False):
        comps = [c for c in comparators if c in have]
        if not task_list:
            return
        if subject not in have or not comps:
            lines.extend([f"#### {title}", "", f"Not measured: {subject} or its comparators did not run.", ""])
            return
        lines.extend([f"#### {title}", "", "| task | " + " | ".join([subject, *comps]) + " | verdict |",
                      "|---" * (len(comps) + 3) + "|"])
        for task in task_list:
            cen = int(budgets.get(task, {}).get("epochs", TASKS[task].epochs)) + 1 if censor_epochs else None
            vals, notes = {}, {}
            for o in [subject, *comps]:
                rs = chosen.get((task, o), [])
                hit = sum(1 for r in rs if r["epochs_to_target"] != "")
                v = per_seed(task, o, col, cen)
                vals[o] = [x for x in v if math.isfinite(x)] if reached_only else v
                notes[o] = f"{hit}/{len(rs)} reached" if (censor_epochs or reached_only) else None
            res = {c: _compare(vals[subject], vals[c], higher) for c in comps}
            if reached_only:  # seconds exist only for runs that reached: fewer hits is simply worse
                hits = {o: int(notes[o].split("/")[0]) for o in vals}
                runs_n = min(len(chosen.get((task, o), [])) for o in vals)
                for c in comps:
                    if hits[subject] != hits[c] and runs_n > 1:
                        res[c] = "better" if hits[subject] > hits[c] else "worse"
            lines.append(f"| {task} | " + " | ".join(cell(vals[o], notes[o], d) for o in [subject, *comps])
                         + f" | {_verdict(res)} |")
        lines.append("")

    img = [t for t in tasks if t.startswith("digits") or t == "char_transformer"]
    table("NeuroOptima \"reaches the target accuracy in fewer epochs\" than SGD, Adam, AdamW "
          "(epochs to the task's validation target; not reached = budget + 1)",
          "NeuroOptima", BASELINES, "epochs_to_target", False, 1, tasks, censor_epochs=True)
    table("NeuroOptima \"generalizes better\" (held-out test metric at each run's best-validation epoch)",
          "NeuroOptima", BASELINES, "test_metric_at_best", True, 4, tasks)
    table("Gravity converges faster than Adam on image classification (epochs to target)",
          "Gravity", ("Adam",), "epochs_to_target", False, 1, img, censor_epochs=True)
    table("Gravity converges faster than Adam on image classification (seconds of training to target, "
          "over the runs that reached it)", "Gravity", ("Adam",), "seconds_to_target", False, 3, img,
          reached_only=True)
    table("Gravity vs Adam: final training loss (lower is better)", "Gravity", ("Adam",), "final_train_loss",
          False, ".1e", img)
    if "GradientEquilibrium" in have:
        lines.extend(["#### GradientEquilibrium \"finds the equilibrium\"", "",
                      ("Its update is `p -= lr*(g - mean(g))` per tensor, so each tensor's mean never moves: "
                       "it is gradient descent restricted to that hyperplane. Measured drift of the per-tensor "
                       "means from their initial values (max over tensors and seeds), beside SGD's:"), "",
                      "| task | GradientEquilibrium | SGD | GE best val vs SGD |", "|---|---|---|---|"])
        for task in tasks:
            ge = [_num(r["mean_drift"]) for r in chosen.get((task, "GradientEquilibrium"), [])]
            sgd = [_num(r["mean_drift"]) for r in chosen.get((task, "SGD"), [])]
            cmp_ = _compare(per_seed(task, "GradientEquilibrium", "best_val_metric"),
                            per_seed(task, "SGD", "best_val_metric"), True) if sgd else "—"
            lines.append(f"| {task} | {max(ge):.2e} | {max(sgd):.2e} | {cmp_} |" if ge and sgd else
                         f"| {task} | {max(ge):.2e} | — | — |")
        lines.append("")
    return "\n".join(lines)


def report(out: Path, meta: dict | None = None) -> list[dict]:
    if meta is None:
        meta_path = out / "meta.json"
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else dict(quick=False, skipped={})
    rows = summarize(out)
    (out / "summary.md").write_text(_summary_md(rows, meta))
    (out / "claims.md").write_text(claims_md(out))
    plot(out)
    return rows


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m bench.convergence", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed, the middle two lr of each grid, short budgets")
    p.add_argument("--seeds", type=int, default=None,
                   help="seeds per optimizer: seed 0 picks the lr, seeds 1..N-1 are reported (default 5; 1 with "
                        "--quick, where the selection run is reported)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated subset of {','.join(TASKS)} (default: all CPU tasks, plus "
                        "char_transformer when CUDA is present)")
    p.add_argument("--optimizers", default=None, help=f"comma-separated subset of {','.join(OPTIMIZERS)}")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: comparable timings "
                                                         "on a shared machine)")
    p.add_argument("--out", type=Path, default=None, help=f"output directory (default {DEFAULT_OUT}, "
                                                          "or its quick/ subfolder with --quick)")
    p.add_argument("--report-only", action="store_true", help="redo summary and plots from --out's CSVs")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 5
    if args.out is None:
        args.out = DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        for r in report(out):
            print(r["task"], r["optimizer"], r["lr"], f"{r['best_val_mean']:.4f}")
        return 0
    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.tasks:
        names = [n.strip() for n in args.tasks.split(",") if n.strip()]
        unknown = [n for n in names if n not in TASKS]
        if unknown:
            raise SystemExit(f"unknown task(s) {unknown}; expected some of {list(TASKS)}")
        tasks = [TASKS[n] for n in names]  # an explicit request runs a GPU task on the CPU too (small tests)
    else:
        tasks = [t for t in TASKS.values() if not t.gpu_only or device.type == "cuda"]
    opt_names = [n.strip() for n in args.optimizers.split(",")] if args.optimizers else None
    if opt_names:
        unknown = [n for n in opt_names if n not in OPTIMIZERS]
        if unknown:
            raise SystemExit(f"unknown optimizer(s) {unknown}; expected some of {list(OPTIMIZERS)}")
    specs, skipped = available_optimizers(opt_names)
    for name, why in skipped.items():
        print(f"skipping {name}: {why}")
    if device.type != "cuda" and not args.tasks:
        print("char_transformer skipped: it runs only when CUDA is present")
    meta = _meta(args, tasks, specs, skipped, device)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    t0 = time.perf_counter()
    run_protocol(tasks, specs, args.seeds, args.quick, device, out)
    meta["total_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    rows = report(out, meta)
    print((out / "summary.md").read_text())
    print(f"wrote {out} in {meta['total_seconds']} s ({len(rows)} task x optimizer rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
