"""Shared pieces of the reliability tests (validation, checkpoints, long runs, faults).

The tests are parametrized over every impl `fused_optim.available_impls("cpu")` reports available and
over every optimizer class `fused_optim` exports, so new impls and classes join automatically; a class
without a factory here makes `test_every_exported_optimizer_has_a_factory` fail rather than go untested.

Run as a script (`python reliability_util.py MANIFEST`), it resumes checkpoints in a fresh process:
see `resume_cases`.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable

import torch

import fused_optim

# Interpreted Triton is ~1000x slower than compiled: the reliability tests give it tiny tensors and few
# steps (docs/spec.md §0: it is a test vehicle on CPU).
SLOW_IMPLS = ("triton",)


def cpu_impls() -> list[str]:
    """Impls that can run on CPU, decided without building anything (this runs at collection). Triton
    counts when its kernels are importable: the tests that take it set TRITON_INTERPRET=1 themselves
    (`triton_interpreter`), never for the whole session. Native counts when the extension is built or
    can be built; should its build then fail, conftest.py skips the native tests with the reason."""
    from fused_optim import _ext
    from fused_optim._backends import _triton_import

    out = ["forloop", "foreach"]
    if _triton_import().available:
        out.append("triton")
    if _ext.buildable().available:
        out.append("native")
    return out


def has_impl(cls: type, impl: str | None) -> bool:
    """Whether `cls` implements `impl` (wrappers: their inner Lion does)."""
    if impl is None or cls.__name__ in ("Lookahead", "SAM"):
        cls = fused_optim.Lion if cls.__name__ in ("Lookahead", "SAM") else cls
    impls = getattr(cls, "_impls", None)
    return impl is None or impls is None or impl in impls


def combos(optimizers: list[type], impls: list[str]) -> list:
    """(class, impl) pairs where the class has the impl, as pytest params with readable ids."""
    import pytest

    return [pytest.param(cls, impl, id=f"{cls.__name__}-{impl}") for cls in optimizers for impl in impls
            if has_impl(cls, impl)]


def _triton_interpreter_fixture():
    import pytest

    @pytest.fixture(autouse=True)
    def triton_interpreter(monkeypatch):
        """impl='triton' on CPU tensors needs TRITON_INTERPRET=1 (`available_impls`); set per test, never
        for the session. The kernels are imported first, outside the flag: `@triton.jit` fixes the
        flavour of a kernel at decoration time, process-wide."""
        if "triton" in cpu_impls():
            import fused_optim.kernels  # noqa: F401
            monkeypatch.setenv("TRITON_INTERPRET", "1")

    return triton_interpreter


triton_interpreter = _triton_interpreter_fixture()


def exported_optimizers() -> list[type]:
    """Every declared optimizer class (fused_optim/declaration.py), by name: a new one joins every test
    that takes this list."""
    from fused_optim.declaration import declared

    return sorted({cls for _, cls in declared().values()}, key=lambda c: c.__name__)


def declared_kwargs(decl) -> dict:
    """A declared optimizer's defaults, with a nonzero value where a zero default would skip a code path
    (weight decay, Adan's clip): the arguments the generic tests build a newly declared optimizer with."""
    kw = decl.defaults
    for h in decl.hypers:
        if h.kind == "float" and h.default == 0 and h.hi is None:
            kw[h.name] = 0.02
    return kw


# The constructor arguments each test uses: non-default values, so that every option's code path runs
# (weight decay, Adan's global clip, ...). Composites follow docs/spec.md §5-8 signatures.
_KWARGS: dict[str, dict] = {
    "Gravity": dict(lr=0.1, alpha=0.01, beta=0.9),
    "Lion": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1),
    "Adan": dict(lr=1e-2, betas=(0.98, 0.92, 0.99), eps=1e-8, weight_decay=0.02, max_grad_norm=1.0),
    "GradientEquilibrium": dict(lr=0.05, weight_decay=0.01),
    "GradientEquilibrum": dict(lr=0.05, weight_decay=0.01),
    "NeuroOptima": dict(lr=1e-2, weight_decay=0.01, sam_rho=0.05, lookahead_k=3, lookahead_alpha=0.5,
                        betas=(0.9, 0.999), eps=1e-8),
    "Muon": dict(lr=0.02, momentum=0.95, weight_decay=0.01),
    "MuonWithAuxAdam": dict(lr=0.02, momentum=0.95, weight_decay=0.01),
}
# composites whose step() needs a closure (docs/spec.md §6-7)
NEEDS_CLOSURE = ("SAM", "NeuroOptima")
FACTORY_NAMES = set(_KWARGS) | {"Lookahead", "SAM"}


def make_optimizer(cls: type, params: list[torch.Tensor], impl: str | None, **overrides) -> torch.optim.Optimizer:
    name = cls.__name__
    if name == "Lookahead":
        inner = fused_optim.Lion(params, lr=1e-2, weight_decay=0.1, impl=impl)
        return cls(inner, **{"k": 3, "alpha": 0.5, **overrides})
    if name == "SAM":
        return cls(params, fused_optim.Lion, **{"rho": 0.05, "lr": 1e-2, "weight_decay": 0.1, "impl": impl,
                                                 **overrides})
    if name == "MuonWithAuxAdam":  # upstream's API: every group says use_muon
        params = [{"params": params, "use_muon": True}]
    # an optimizer without chosen arguments here (a newly declared one) runs at its declared defaults,
    # a zero weight decay made nonzero (`declared_kwargs`)
    if name in _KWARGS:
        kwargs = _KWARGS[name]
    elif getattr(cls, "declaration", None) is not None and cls.declaration.hypers:
        kwargs = declared_kwargs(cls.declaration)
    else:
        raise KeyError(f"no reliability-test factory for {name}: it declares no hyperparameters; "
                       "add its arguments to _KWARGS in tests/reliability_util.py")
    return cls(params, impl=impl, **{**kwargs, **overrides})


def param_shapes(cls: type) -> list[tuple[int, ...]]:
    """Odd sizes, a scalar-like tensor and a zero-size one; Muon takes only matrices (docs/spec.md §8): a batch
    of matrices and a zero-size matrix stand in for the odd cases there."""
    if issubclass(cls, getattr(fused_optim, "Muon", ())):
        return [(5, 7), (8, 3), (3, 4, 2), (4, 4), (0, 3)]
    return [(5, 7), (13,), (3, 4, 2), (1,), (0,)]


def make_params(cls: type, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in param_shapes(cls)]


class Problem:
    """A deterministic loss whose gradient depends on the params and on the step index (a cycle of noise
    tensors), so a resumed run sees exactly the gradients the uninterrupted one saw."""

    def __init__(self, params: list[torch.Tensor], seed: int = 1234, period: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.params = params
        self.targets = [torch.randn(p.shape, generator=g).to(p) for p in params]
        self.noise = [[torch.randn(p.shape, generator=g).to(p) for p in params] for _ in range(period)]
        self.period = period
        self.k = 0

    def closure(self) -> torch.Tensor:
        for p in self.params:
            p.grad = None
        noise = self.noise[self.k % self.period]
        loss = sum(((p - t) ** 2).sum() + (p * n).sum() for p, t, n in zip(self.params, self.targets, noise))
        loss.backward()
        return loss.detach()


def run_steps(opt: torch.optim.Optimizer, problem: Problem, n: int, hook: Callable[[int], None] | None = None) -> None:
    """n steps; `problem.k` counts steps across calls (and is saved in checkpoints)."""
    closure_only = type(opt).__name__ in NEEDS_CLOSURE
    for _ in range(n):
        if closure_only:
            opt.step(problem.closure)
        else:
            problem.closure()
            opt.step()
        problem.k += 1
        if hook is not None:
            hook(problem.k)


def snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict:
    """Params and every tensor/number of the state dict, cloned: what must be unchanged or identical."""
    sd = opt.state_dict()
    return {"params": [p.detach().clone() for p in params], "state": _clone(sd)}


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


def assert_identical(a, b, path: str = "") -> None:
    """Bit-identical (NaN == NaN at the same place, -0.0 != 0.0 not distinguished by torch.equal)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.shape == b.shape and a.dtype == b.dtype, f"{path}: {a.shape}/{a.dtype} vs {b.shape}/{b.dtype}"
        a_, b_ = a.detach().cpu(), b.detach().cpu()
        if a_.is_floating_point():
            same = (a_ == b_) | (a_.isnan() & b_.isnan())
        else:
            same = a_ == b_
        if not bool(same.all()):
            diff = (a_.double() - b_.double()).abs().nan_to_num(float("inf")).max().item()
            raise AssertionError(f"{path}: {int((~same).sum())} of {a_.numel()} elements differ (max |diff| {diff})")
        return
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_identical(a[k], b[k], f"{path}.{k}")
        return
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{path}[{i}]")
        return
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return
    assert a == b, f"{path}: {a!r} != {b!r}"


# ---------------------------------------------------------------------------------------------- checkpoints
class TinyModel(torch.nn.Module):
    """Holds the params under stable names, for torch.distributed.checkpoint's FQN-keyed state dicts."""

    def __init__(self, params: list[torch.Tensor]):
        super().__init__()
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone()) for p in params])


def build_case(cls_name: str, impl: str, seed: int, dcp: bool, device: str = "cpu", init_seed: int | None = None):
    """Params (from `init_seed`, default `seed`), the optimizer and the problem (always from `seed`):
    a resumed run builds with another init_seed to show that the checkpoint, not the init, decides."""
    cls = getattr(fused_optim, cls_name)
    init_seed = seed if init_seed is None else init_seed
    params = make_params(cls, init_seed, device=device)
    model = None
    if dcp:
        model = TinyModel(params)
        params = list(model.ps)
    torch.manual_seed(init_seed)  # Gravity draws its velocity here
    opt = make_optimizer(cls, params, impl)
    return params, model, opt, Problem(params, seed=seed + 1)


def save_checkpoint(path: str, params, model, opt, problem: Problem, dcp: bool) -> None:
    if dcp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        blob = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt), "k": problem.k}
    else:
        blob = {"params": [p.detach() for p in params], "optim": opt.state_dict(), "k": problem.k}
    torch.save(blob, path)


def load_checkpoint(path: str, params, model, opt, problem: Problem, dcp: bool, device: str = "cpu") -> None:
    blob = torch.load(path, map_location=device, weights_only=True)
    if dcp:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(model, blob["model"])
        set_optimizer_state_dict(model, opt, blob["optim"])
    else:
        with torch.no_grad():
            for p, saved in zip(params, blob["params"]):
                p.copy_(saved)
        opt.load_state_dict(blob["optim"])
    problem.k = blob["k"]


def resume_cases(manifest_path: str) -> None:
    """Fresh-process half of the checkpoint tests: for every case, build a fresh optimizer with
    `impl_load`, load the checkpoint, run the remaining steps and save params + state."""
    with open(manifest_path) as f:
        cases = json.load(f)
    for case in cases:
        try:
            device = case.get("device", "cpu")
            params, model, opt, problem = build_case(case["cls"], case["impl_load"], case["seed"], case["dcp"],
                                                     device=device, init_seed=case["seed"] + 99)
            load_checkpoint(case["ckpt"], params, model, opt, problem, case["dcp"], device=device)
            run_steps(opt, problem, case["steps"])
            torch.save({"params": [p.detach() for p in params], "state": opt.state_dict()}, case["out"])
        except Exception as exc:  # reported per case by the parent test
            with open(case["out"] + ".err", "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")


if __name__ == "__main__":
    resume_cases(sys.argv[1])
