"""docs/spec.md §9 comparison helpers shared by the test files: ulp distances, sign-flip accounting,
adversarial tensor lists and a small driver that runs an optimizer for k steps."""
from __future__ import annotations

import io
from collections.abc import Callable

import torch
from torch import Tensor

# sizes of docs/spec.md §9: 0, 1, primes, block±1, a 4-D tensor and a non-contiguous view (made in make_params)
ADVERSARIAL_SHAPES = [(0,), (1,), (7,), (13, 17), (127,), (129,), (1023,), (1025,), (2, 3, 5, 7), (31, 37)]


_INT_OF = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
           torch.bfloat16: (torch.int16, 0x7FFF), torch.float16: (torch.int16, 0x7FFF)}


def ordered_int(t: Tensor) -> Tensor:
    """The dtype's bits mapped to integers whose order is the float order, so a difference counts ulps
    of that dtype."""
    int_dtype, mag = _INT_OF[t.dtype]
    i = t.detach().contiguous().view(int_dtype).to(torch.int64)
    return torch.where(i < 0, -(i & mag), i)


def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    return (ordered_int(a) - ordered_int(b)).abs()


def assert_ulp_close(actual: Tensor, expected: Tensor, max_ulp: int, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if actual.numel() == 0:
        return
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), f"{what}: NaN pattern differs"
    d = ulp_distance(actual[~nan_a], expected[~nan_e])
    worst = int(d.max()) if d.numel() else 0
    assert worst <= max_ulp, f"{what}: {worst} ulp apart (allowed {max_ulp})"


def make_params(seed: int = 0, dtype: torch.dtype = torch.float32, shapes=ADVERSARIAL_SHAPES,
                device: str = "cpu") -> list[Tensor]:
    """Fresh random params (never zeros) of adversarial sizes, plus a non-contiguous view as a leaf."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    base = torch.randn(9, 12, generator=g).to(device=device, dtype=dtype)
    params.append(base.t())  # non-contiguous: (12, 9) with strides (1, 12)
    return [p.requires_grad_() for p in params]


def clone_params(params: list[Tensor]) -> list[Tensor]:
    """Exact copies that keep each param's strides (a non-contiguous view stays non-contiguous)."""
    out = []
    for p in params:
        q = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
        q.copy_(p.detach())
        out.append(q.requires_grad_())
    return out


def grads_for_step(params: list[Tensor], step: int, seed: int = 1234, missing: int | None = None) -> list:
    """Deterministic fresh gradients for `step`; the param at index `missing` gets none that step."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for i, p in enumerate(params):
        if i == missing:
            out.append(None)
            continue
        out.append(torch.randn(p.shape, generator=g).to(device=p.device, dtype=p.dtype))
    return out


def set_grads(params: list[Tensor], grads: list) -> None:
    for p, g in zip(params, grads):
        if g is None:
            p.grad = None
        else:
            grad = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
            grad.copy_(g)
            p.grad = grad


def run_steps(make_opt: Callable[[list[Tensor]], torch.optim.Optimizer], params: list[Tensor], steps: int,
              missing_at: tuple[int, int] | None = (3, 2), check: Callable | None = None,
              seed: int = 1234):
    """Run `steps` steps with fresh grads; `missing_at=(step, index)` drops one grad on one step.
    `check(step, opt)` is called after every step."""
    opt = make_opt(params)
    for step in range(1, steps + 1):
        missing = missing_at[1] if missing_at and missing_at[0] == step else None
        set_grads(params, grads_for_step(params, step, seed=seed, missing=missing))
        opt.step()
        if check is not None:
            check(step, opt)
    return opt


def seeded_twins(make: Callable[..., torch.optim.Optimizer], params_a: list[Tensor], params_b: list[Tensor],
                 *args, seed: int = 0) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """``make(params_a, *args)`` and ``make(params_b, *args)``, each built right after
    ``torch.manual_seed(seed)``: Gravity draws v at construction, so both runs must draw the same."""
    torch.manual_seed(seed)
    a = make(params_a, *args)
    torch.manual_seed(seed)
    return a, make(params_b, *args)


def step_together(base: list[Tensor], steps, *runs: tuple[list[Tensor], torch.optim.Optimizer]) -> None:
    """For each k of `steps`: the same ``grads_for_step(base, k)`` set on every run's params, then every
    run's optimizer steps, in order."""
    for k in steps:
        grads = grads_for_step(base, k)
        for params, _ in runs:
            set_grads(params, grads)
        for _, opt in runs:
            opt.step()


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


class ScaledTwin:
    """Plain training of one tiny model and ``torch.amp.GradScaler`` training of its twin, with twin
    optimizers ``make(params, *args)`` (`seeded_twins`, seed 1), on the same data."""

    def __init__(self, make: Callable[..., torch.optim.Optimizer], *args):
        self.model_ref, self.model_amp = tiny_model(), tiny_model()
        self.opt_ref, self.opt_amp = seeded_twins(make, list(self.model_ref.parameters()),
                                                  list(self.model_amp.parameters()), *args, seed=1)

    def steps(self, n: int, scaler, poison_step: int = 2):
        """Yields ``(step, poison)`` after the plain step (none at the poisoned step) and the scaled
        backward of the twin (its loss times inf at the poisoned step); the caller steps the scaler."""
        data = torch.Generator().manual_seed(5)
        for step in range(n):
            x, y = torch.randn(4, 6, generator=data), torch.randn(4, 3, generator=data)
            poison = step == poison_step
            if not poison:
                self.opt_ref.zero_grad()
                torch.nn.functional.mse_loss(self.model_ref(x), y).backward()
                self.opt_ref.step()
            self.opt_amp.zero_grad()
            loss = torch.nn.functional.mse_loss(self.model_amp(x), y)
            if poison:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            yield step, poison


def state_tensors(opt: torch.optim.Optimizer, params: list[Tensor]) -> list[tuple[str, Tensor]]:
    out = []
    for i, p in enumerate(params):
        for k, v in sorted(opt.state.get(p, {}).items()):
            if isinstance(v, Tensor):
                out.append((f"param{i}.{k}", v))
    return out


def roundtrip(state_dict: dict) -> dict:
    """Through torch.save/torch.load as a real checkpoint does (docs/toolchain.md: never share live tensors)."""
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


LOWP_ATOL = {torch.bfloat16: 1e-2, torch.float16: 1e-3}


def assert_lowp_close(actual: Tensor, lowp_ref: Tensor, high_ref: Tensor, what: str = "",
                      dtype: torch.dtype | None = None) -> None:
    """docs/spec.md §9 for bf16/fp16: the error against a float64 reference is at most twice the error of the
    reference run in the same low precision, plus the atol of `dtype`, the params' dtype (default:
    `actual`'s; the fp32 state of bf16/fp16 params is held to its params' atol)."""
    if actual.numel() == 0:
        return
    hi = high_ref.double()
    err = (actual.double() - hi).abs().max().item()
    ref_err = (lowp_ref.double() - hi).abs().max().item()
    bound = 2 * ref_err + LOWP_ATOL[dtype or actual.dtype]
    assert err <= bound, f"{what}: error {err:.3g} > 2 x reference error {ref_err:.3g} + atol"
