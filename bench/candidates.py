"""What a step benchmark compares: our optimizers under every impl that can run on the device, the
peers users run today (each only when installed), torch's AdamW as the yardstick, and a
`torch.compile`d foreach step.

Our impls are discovered, never listed: `fused_optim.available_impls(device)` says what can run and
each optimizer's `impl=` argument picks it, so impls added to the library show up here unchanged. So
are our optimizers: every declared one (fused_optim/declaration.py) gets a row, with its declared
defaults and a floor from its declared state, unless `_TUNED` gives it tuned hyperparameters.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import fused_optim

__all__ = ["OPTIMIZERS", "PEERS", "PRECISIONS", "Candidate", "OptSpec", "candidates_for", "ours_impls",
           "state_bytes_per_param", "state_elem_size"]

#: `state_precision` values a row can time (fused_optim/lowstate.py); fp32 rows are the plain impl names
PRECISIONS = ("fp32", "bf16", "8bit")


@dataclass(frozen=True)
class OptSpec:
    """One optimizer: how ours is built, the hyperparameters every implementation gets, and its floor.

    The floor counts the bytes a step must move per parameter (docs/spec.md's bandwidth floor): the param
    read and written, the grad read `grad_reads` times (a per-tensor reduction reads it once more),
    and each of `n_states` state tensors read and written. fp32: AdamW 28 B, Lion 20 B, Gravity 24 B,
    Adan 44 B, GradientEquilibrium 16 B, NeuroOptima's core 44 B.
    """
    name: str
    ours: str | None          # fused_optim.create_optimizer name; None: not ours (the yardstick)
    kwargs: dict[str, Any]
    grad_reads: int
    n_states: int

    def bytes_per_param(self, param_bytes: int, state_bytes: int) -> int:
        return 2 * param_bytes + self.grad_reads * param_bytes + 2 * self.n_states * state_bytes

    def bytes_per_param_measured(self, param_bytes: int, state_bytes_per_param: float) -> float:
        """The floor's bytes with the state's bytes as measured (`state_bytes_per_param`): 8-bit state is
        one code plus a block's share of its scale, read and written."""
        return 2 * param_bytes + self.grad_reads * param_bytes + 2 * state_bytes_per_param


#: the yardstick and the optimizers whose bench hyperparameters (or floor) are chosen by hand
_TUNED: list[OptSpec] = [
    OptSpec("adamw", None, dict(lr=1e-3, weight_decay=0.01), grad_reads=1, n_states=2),
    OptSpec("lion", "lion", dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1), grad_reads=1, n_states=1),
    OptSpec("gravity", "gravity", dict(lr=0.1, alpha=0.01, beta=0.9), grad_reads=2, n_states=1),
    OptSpec("adan", "adan", dict(lr=1e-3, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02),
            grad_reads=1, n_states=4),
    OptSpec("gradient_equilibrium", "gradient_equilibrium", dict(lr=0.01, weight_decay=0.0),
            grad_reads=2, n_states=0),
    # NeuroOptima's per-step core update (docs/spec.md §7): SAM's second forward/backward is the model's cost, not
    # the optimizer's, and Lookahead's sync runs every k steps; both are off here (sam_rho=0, a k that is
    # never reached) so the rows time the fused core, 44 B/param like Adan
    OptSpec("neurooptima", "neurooptima", dict(lr=1e-3, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-8,
                                              sam_rho=0.0, lookahead_k=1 << 30), grad_reads=1, n_states=4),
]


def _declared_specs() -> list[OptSpec]:
    """A spec for every declared optimizer with its own impls: its declared defaults, its state tensors,
    and one more grad read for a per-tensor reduction."""
    from fused_optim.declaration import declared

    return [OptSpec(name, name, decl.defaults, grad_reads=2 if decl.per_tensor_reduction else 1,
                    n_states=len(decl.state))
            for name, (decl, _) in declared().items() if decl.impls and decl.alias_of is None]


OPTIMIZERS: dict[str, OptSpec] = {s.name: s for s in _TUNED}
OPTIMIZERS.update((s.name, s) for s in _declared_specs() if s.name not in OPTIMIZERS)


@dataclass
class Candidate:
    optimizer: str
    impl: str                                   # our impl name, or the peer's label
    source: str                                 # "fused_optim", "torch" or "peer"
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer]
    compiled: bool = False
    note: str = ""
    key: str = field(init=False)

    def __post_init__(self):
        self.key = f"{self.optimizer}/{self.impl}"


@dataclass(frozen=True)
class Peer:
    optimizer: str
    impl: str            # label in the tables
    module: str          # what must be importable
    factory: Callable[[list[torch.Tensor], dict[str, Any]], torch.optim.Optimizer]
    devices: tuple[str, ...] = ("cpu", "cuda")
    pip: str = ""


def _attr(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _po(name):  # pytorch_optimizer
    return lambda ps, kw: _attr(f"pytorch_optimizer.{name}")(ps, **kw)


def _lion_pytorch(variant: str):
    def make(ps, kw):
        if variant == "foreach":
            return _attr("lion_pytorch.foreach.Lion")(ps, **kw)
        return _attr("lion_pytorch.Lion")(ps, use_triton=variant == "triton", **kw)
    return make


def _optimi(name):
    # torch-optimi's lr is required; its weight decay is decoupled and lr-scaled like ours by default
    return lambda ps, kw: _attr(f"optimi.{name}")(ps, **kw)


def _timm(name):
    return lambda ps, kw: _attr(f"timm.optim.{name}")(ps, **kw)


PEERS: list[Peer] = [
    Peer("adamw", "torch-fused", "torch", lambda ps, kw: torch.optim.AdamW(ps, fused=True, **kw)),
    Peer("adamw", "torch-foreach", "torch", lambda ps, kw: torch.optim.AdamW(ps, foreach=True, **kw)),
    Peer("lion", "pytorch_optimizer", "pytorch_optimizer", _po("Lion"), pip="pytorch_optimizer"),
    Peer("lion", "lion-pytorch", "lion_pytorch", _lion_pytorch("forloop"), pip="lion-pytorch"),
    Peer("lion", "lion-pytorch-foreach", "lion_pytorch.foreach", _lion_pytorch("foreach"), pip="lion-pytorch"),
    Peer("lion", "lion-pytorch-triton", "lion_pytorch", _lion_pytorch("triton"), devices=("cuda",),
         pip="lion-pytorch triton"),
    Peer("lion", "timm", "timm", _timm("Lion"), pip="timm"),
    Peer("lion", "optimi", "optimi", _optimi("Lion"), pip="torch-optimi"),
    # low-precision state peers (CUDA kernels): 8-bit Lion and AdamW, bf16 AdamW with stochastic rounding
    Peer("lion", "bnb-lion8bit", "bitsandbytes", lambda ps, kw: _attr("bitsandbytes.optim.Lion8bit")(ps, **kw),
         devices=("cuda",), pip="bitsandbytes"),
    Peer("adamw", "bnb-adamw8bit", "bitsandbytes", lambda ps, kw: _attr("bitsandbytes.optim.AdamW8bit")(ps, **kw),
         devices=("cuda",), pip="bitsandbytes"),
    Peer("adamw", "torchao-adamw8bit", "torchao.optim", lambda ps, kw: _attr("torchao.optim.AdamW8bit")(ps, **kw),
         devices=("cuda",), pip="torchao"),
    Peer("gravity", "pytorch_optimizer", "pytorch_optimizer", _po("Gravity"), pip="pytorch_optimizer"),
    Peer("adan", "pytorch_optimizer", "pytorch_optimizer", _po("Adan"), pip="pytorch_optimizer"),
    Peer("adan", "timm", "timm", _timm("Adan"), pip="timm"),
    Peer("adan", "optimi", "optimi", _optimi("Adan"), pip="torch-optimi"),
]


def _importable(module: str) -> tuple[bool, str]:
    """Installed and importable (a broken install is skipped with its error, not a crash)."""
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False, "not installed"
        importlib.import_module(module)
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any import failure of a peer only skips that peer
        return False, f"import failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def ours_impls(optimizer: str, device: torch.device, wanted: list[str] | None,
               allow_interpreted: bool = False) -> tuple[list[str], list[str]]:
    """Our impls that can run on `device` (from fused_optim.available_impls), plus a note per skipped one."""
    spec = OPTIMIZERS[optimizer]
    cls = fused_optim.registry._lookup(spec.ours)
    has = getattr(cls, "_impls", None)
    runnable, notes = [], []
    for impl, st in fused_optim.available_impls(device).items():
        if wanted is not None and impl not in wanted:
            continue
        if not st.available:
            notes.append(f"{optimizer}/{impl}: skipped, {st.reason}")
            continue
        if st.reason.startswith("interpreted") and not (allow_interpreted or (wanted and impl in wanted)):
            notes.append(f"{optimizer}/{impl}: skipped, {st.reason} (name it in --impls to time it anyway)")
            continue
        if has is not None and impl not in has:
            notes.append(f"{optimizer}/{impl}: skipped, {cls.__name__} has no {impl!r} impl yet")
            continue
        runnable.append(impl)
    return runnable, notes


def candidates_for(optimizer: str, device: torch.device, *, impls: list[str] | None, peers: list[str] | None,
                   compile_step: bool, precisions: list[str] | None = None) -> tuple[list[Candidate], list[str]]:
    """Candidates for one optimizer on `device`, and notes for what is skipped and why.

    `impls`: our impls to time (None: all that run here). `peers`: peer labels or module names to
    time (None: all installed; []: none). `precisions`: `state_precision` values besides fp32 to time
    (rows "<impl>+<precision>") for optimizers that store state in them: the impls named in `impls`, else
    the one auto mode picks on the device, and then only where it runs the fused low-precision pass (an
    impl without it runs its fp32 update on decoded copies: correct, not fast, and minutes per row at
    the CPU sets' sizes). None: ("bf16", "8bit") under that last rule.
    """
    spec = OPTIMIZERS[optimizer]
    cands: list[Candidate] = []
    notes: list[str] = []
    if spec.ours is not None:
        runnable, skipped = ours_impls(optimizer, device, impls)
        notes += skipped
        for impl in runnable:
            cands.append(Candidate(optimizer, impl, "fused_optim",
                                   lambda ps, impl=impl: fused_optim.create_optimizer(ps, spec.ours, impl=impl,
                                                                                      **spec.kwargs)))
        cls = fused_optim.registry._lookup(spec.ours)
        chosen = precisions if precisions is not None else ["bf16", "8bit"]
        low = [p for p in chosen if p != "fp32"] if getattr(cls, "_lowbit_states", ()) else []
        auto = fused_optim._backends.auto_impl(device.type)
        low_impls = runnable if impls else [i for i in runnable if i == auto]
        if precisions is None:
            low_impls = [i for i in low_impls if getattr(getattr(cls, "_impls", {}).get(i), "supports_lowbit", False)]
            if low and not low_impls:
                notes.append(f"{optimizer}: bf16/8bit state rows skipped: auto mode's impl here ({auto}) has no "
                             "fused low-precision pass (--precisions bf16,8bit times its reference path anyway)")
        for impl in low_impls if low else []:
            for prec in low:
                cands.append(Candidate(optimizer, f"{impl}+{prec}", "fused_optim",
                                       lambda ps, impl=impl, prec=prec: fused_optim.create_optimizer(
                                           ps, spec.ours, impl=impl, state_precision=prec, **spec.kwargs)))
        if compile_step and "foreach" in runnable:
            cands.append(Candidate(optimizer, "compiled-foreach", "fused_optim",
                                   lambda ps: fused_optim.create_optimizer(ps, spec.ours, impl="foreach",
                                                                           **spec.kwargs), compiled=True))
    for peer in PEERS:
        if peer.optimizer != optimizer:
            continue
        # torch's AdamW, the yardstick, is always timed; peers by label, module or pip name
        if not (peers is None or peer.module == "torch" or peer.impl in peers
                or peer.module.split(".")[0] in peers or peer.pip.split(" ")[0] in peers):
            continue
        if device.type not in peer.devices:
            notes.append(f"{optimizer}/{peer.impl}: skipped, runs on {'/'.join(peer.devices)} only")
            continue
        ok, why = _importable(peer.module)
        if not ok:
            hint = f" (pip install {peer.pip})" if peer.pip else ""
            notes.append(f"{optimizer}/{peer.impl}: skipped, {why}{hint}")
            continue
        cands.append(Candidate(optimizer, peer.impl, "torch" if peer.module == "torch" else "peer",
                               lambda ps, f=peer.factory: f(ps, dict(spec.kwargs))))
        if compile_step and peer.impl == "torch-foreach":
            cands.append(Candidate(optimizer, "torch-compiled", "torch",
                                   lambda ps, f=peer.factory: f(ps, dict(spec.kwargs)), compiled=True))
    return cands, notes


def state_bytes_per_param(opt: torch.optim.Optimizer, p: torch.Tensor) -> float:
    """Bytes of per-element state a step streams for `p`, per element of `p`, measured from
    ``opt.state[p]``: ours, the state tensors its update reads and writes (`_lowbit_states`: 8-bit codes
    with their block scales, bf16 or fp32 tensors; not NeuroOptima's slow weights, touched every k-th
    step only); anyone else's, every tensor but 0-d counters."""
    st = opt.state.get(p, {})
    keys = dict(getattr(opt, "_lowbit_states", ()))
    return sum(v.numel() * v.element_size() for k, v in st.items()
               if isinstance(v, torch.Tensor) and v.dim() > 0
               and (not keys or k in keys or k.removesuffix("_absmax") in keys)) / max(p.numel(), 1)


def state_elem_size(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """Element size of the optimizer's per-element state for `p` (ours keep fp32 state for bf16 params
    on every impl; torch's and most peers keep the param's dtype). Falls back to the param's when it has
    none."""
    for v in opt.state.get(p, {}).values():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() == p.numel() and v.numel() > 1:
            return v.element_size()
    return p.element_size()
