"""The base every fused_optim optimizer shares.

One step of any optimizer here is: collect and validate every group's (param, grad) pairs, refusing bad
input before any tensor changes; let the subclass compute its per-group Python scalars; split each
group by (device, dtype); resolve the impl once per device; call one functional step per split. The
functional steps of each optimizer (`_forloop_x`, `_foreach_x`, `_triton_x`, `_native_x`) share one
keyword-only signature and live next to the class, in its module.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from . import distributed as _dist
from . import ops as _ops
from ._backends import IMPLS, auto_impl, best_fused_impl, impl_status

__all__ = ["FusedOptimizer", "supports_amp"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


def supports_amp(fn: Callable[..., None]) -> Callable[..., None]:
    """Mark an impl that handles AMP itself (the contract is in `FusedOptimizer`'s docstring, "AMP").

    A marked impl also accepts the keyword-only arguments ``grad_scale: Tensor | None`` and
    ``found_inf: Tensor | None`` (0-d fp32 tensors on the impl's device, or None). It must divide every
    grad by ``grad_scale`` and write the unscaled grad back into ``grads`` (torch's fused optimizers
    leave ``.grad`` unscaled), and when ``found_inf != 0`` it must leave params, state and grads
    untouched, reading ``found_inf`` on the device (no host sync). Unmarked impls never see these
    arguments: the base class unscales and skips for them.
    """
    fn.supports_amp = True
    return fn


def _check_range(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, hi_open: bool = False, label: str | None = None) -> None:
    """Raise torch's style of error ("Invalid learning rate: -1.0") plus the allowed range."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got {value.numel()} elements")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}: {value!r}")
    ok = not math.isnan(value)
    if lo is not None:
        ok = ok and (value > lo if lo_open else value >= lo)
    if hi is not None:
        ok = ok and (value < hi if hi_open else value <= hi)
    if not ok:
        lo_s = "" if lo is None else f"{lo} {'<' if lo_open else '<='} "
        hi_s = "" if hi is None else f" {'<' if hi_open else '<='} {hi}"
        raise ValueError(f"Invalid {label or name + ' value'}: {value} (expected {lo_s}{name}{hi_s})")


def _check_betas(betas: Any, n: int) -> None:
    if not isinstance(betas, (tuple, list)) or len(betas) != n:
        raise ValueError(f"Invalid betas: {betas!r} (expected a tuple of {n} floats in [0, 1))")
    for i, b in enumerate(betas):
        _check_range(f"betas[{i}]", b, lo=0.0, hi=1.0, hi_open=True, label=f"beta parameter at index {i}")


def _as_float(x: float | Tensor) -> float:
    """A hyperparameter as a Python double; a 0-d tensor lr (schedulers) is read here, once per step."""
    return x.item() if isinstance(x, Tensor) else float(x)


@torch.compiler.assume_constant_result
def _probe_impl(req: str | None, device_type: str) -> tuple[str, str]:
    """``(impl, "")`` for the impl `req` resolves to on `device_type`, or ``("", why not)``.

    The availability probes import triton and load (or build) the extension, which Dynamo cannot trace:
    when the first resolution happens inside ``torch.compile(opt.step)``, this runs once at trace time
    and its answer is a constant of the graph (no graph break)."""
    if req is None:
        return auto_impl(device_type), ""
    if req == "fused":
        try:
            return best_fused_impl(device_type), ""
        except RuntimeError as exc:
            return "", str(exc)
    st = impl_status(req, device_type)
    return (req, "") if st.available else ("", st.reason)


def _resolve_request(impl: str | None, foreach: bool | None, fused: bool | None) -> str | None:
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"Invalid impl: {impl!r} (expected one of {IMPLS} or None for auto)")
    if foreach and fused:
        raise ValueError("foreach=True and fused=True are mutually exclusive; pass one of them (or impl=...)")
    if impl is not None:
        if foreach and impl != "foreach":
            raise ValueError(f"foreach=True conflicts with impl={impl!r}; pass only one of them")
        if fused and impl not in ("triton", "native"):
            raise ValueError(f"fused=True conflicts with impl={impl!r}; pass only one of them")
        return impl
    if foreach:
        return "foreach"
    if fused:
        return "fused"
    if foreach is False and fused in (None, False):
        return "forloop"  # torch's convention: foreach=False is the for-loop implementation
    return None


class FusedOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` with pluggable implementations (SPEC §0).

    Subclasses set `_impls` (impl name -> functional step), implement `_validate_group(group)` and
    `_step_group(group, params, grads)` (or `_update(batches)` when a step couples groups, like Adan's
    global clip), and call `self._dispatch(...)` with their tensor lists and Python scalars.

    AMP: ``_step_supports_amp_scaling = True`` tells ``torch.amp.GradScaler`` to hand the optimizer its
    ``grad_scale`` and ``found_inf`` tensors (as attributes, or as ``step()`` keyword arguments) instead
    of unscaling and checking the grads itself, as it does for torch's fused optimizers. Then:

    - the grads are divided by ``grad_scale`` in place (``.grad`` ends unscaled, like torch's fused
      Adam), inside the kernel for impls marked with :func:`supports_amp`, else by one foreach pass;
    - when ``found_inf`` is nonzero the whole step is skipped: params, state, lazily created state and
      the step counters named in ``_group_counters`` stay as they were, and ``.grad`` stays scaled.
      The skip is decided on the host (``found_inf.item()``, one sync on an accelerator, the same one
      ``GradScaler`` does for every optimizer it cannot hand ``found_inf`` to) unless every impl of the
      step is AMP-aware, the optimizer has no Python step counters (Lion, GradientEquilibrium) and no
      param is on the CPU: then ``found_inf`` goes down to the kernels and nothing syncs. Optimizers
      whose Python scalars depend on a counter (Gravity's ``t``, Adan's ``step``) need ``capturable``
      device counters for a sync-free skip.
    - Clipping before ``step`` (``clip_grad_norm_``) must see unscaled grads: call
      ``scaler.unscale_(opt)`` first; the scaler then passes ``grad_scale=None`` and only ``found_inf``.
    - Subclasses that read grads before `_dispatch` (Adan's global clip) return True from
      `_reads_grads_before_dispatch`, so the grads are unscaled before that read.

    Capturable (CUDA graphs): classes with ``_supports_capturable`` take ``capturable=True`` (torch's
    flag, kept as the optimizer attribute ``capturable`` rather than a param-group key: Dynamo sets every
    group's ``"capturable"`` to True while tracing torch optimizers, which must not switch our counters
    to tensors inside ``torch.compile``). Then the group step counters in ``_group_counters`` are 0-d
    float32 tensors on the params' device, advanced on the device (`_advance_counter`), and the per-step
    scalars derived from them are computed there in fp32; impls marked ``fn.supports_capturable = True``
    (the Triton and native kernels) read them, and ``lr`` when it is a device tensor, from device memory,
    so a step issues no host sync and can be captured in a CUDA graph and replayed. An AMP ``found_inf`` is then applied on the device
    too (the counters advance by ``found_inf == 0``). Other impls run with ``capturable=True`` on the
    CPU (reading a CPU counter is no sync) and refuse accelerator params with the fix in the message.

    Non-finite gradients: by default NaN/Inf in a grad flow through the update exactly as through the
    reference (``forloop``) on every impl, at no cost. With ``opt.skip_if_nonfinite = True`` the step
    first reduces every grad to one device flag (a multi-tensor max-abs, no host read) and hands it to
    the AMP path above as ``found_inf``: a step with any NaN/Inf grad is skipped whole, with the same
    sync rules (none when the kernels take ``found_inf``, else one host read of the flag).
    """

    #: torch.amp.GradScaler: give step() grad_scale/found_inf instead of unscaling (see "AMP" above)
    _step_supports_amp_scaling = True
    #: param-group keys that count steps; a found_inf skip leaves them unchanged (see "AMP" above)
    _group_counters: tuple[str, ...] = ()
    #: skip the whole step when any grad holds NaN/Inf (see "Non-finite gradients" above)
    skip_if_nonfinite: bool = False
    #: the update reads a reduction over each whole tensor (Gravity's max|g|, GradientEquilibrium's mean):
    #: on DTensor shards only impls marked ``fn.shard_aware = True`` (they finish it with
    #: `fused_optim.distributed.reduce_per_tensor`) may run; see `_shard_impl`
    _per_tensor_reduction = False

    #: the class takes ``capturable=True`` (see "Capturable" above)
    _supports_capturable = False

    _impls: dict[str, Callable[..., None]] = {}
    #: human name used in error messages
    _display_name = "optimizer"
    #: whether complex params are updated through torch.view_as_real (False: a clear error)
    _supports_complex = True
    _complex_reason = ""

    def __init__(self, params, defaults: dict, *, maximize: bool = False, impl: str | None = None,
                 foreach: bool | None = None, fused: bool | None = None, capturable: bool = False):
        self._impl_request = _resolve_request(impl, foreach, fused)
        self._impl_cache: dict[str, str] = {}
        defaults = dict(defaults, maximize=bool(maximize))
        if capturable and not self._supports_capturable:
            raise ValueError(f"{self._display_name} does not support capturable=True")
        #: see the class docstring, "Capturable"; a checkpoint's counters follow this setting at the next step
        self.capturable = bool(capturable)
        self._group_defaults = dict(defaults)  # torch later adds keys of its own (differentiable) to defaults
        super().__init__(params, defaults)

    # ------------------------------------------------------------------ impl resolution
    @property
    def impl(self) -> str | None:
        """The requested impl (None = auto). `impl_for(device)` gives what actually runs there."""
        return self._impl_request

    def impl_for(self, device: torch.device | str) -> str:
        device_type = torch.device(device).type
        cached = self._impl_cache.get(device_type)
        if cached is not None:
            return cached
        req = self._impl_request
        impl, why = _probe_impl(req, device_type)
        if not impl:
            if req == "fused":
                raise RuntimeError(why)
            raise RuntimeError(f"{self._display_name}: impl={req!r} cannot run on {device_type}: {why}. "
                               "Pass impl=None (auto) or impl='foreach' to use what is available; "
                               "fused_optim.available_impls() lists what was found.")
        if impl not in self._impls:
            if req is None:  # auto never raises: fall back to what this optimizer has
                impl = "foreach"
            else:
                raise RuntimeError(f"{self._display_name} has no {impl!r} implementation yet; "
                                   f"available: {sorted(self._impls)}")
        self._impl_cache[device_type] = impl
        return impl

    def __repr__(self) -> str:
        """torch's listing of the param groups, headed by the impl: the request (auto = None) and what
        runs on each device of the params, e.g. `impl: auto (cpu: native)`."""
        def runs(device_type: str) -> str:
            try:
                return self.impl_for(device_type)
            except RuntimeError:
                return "cannot run here (step() raises why)"

        devices = sorted({p.device.type for g in self.param_groups for p in g["params"]})
        where = ", ".join(f"{d}: {runs(d)}" for d in devices) or "no parameters"
        head, _, rest = super().__repr__().partition("\n")
        return f"{head}\nimpl: {self._impl_request or 'auto'} ({where})\n{rest}"

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        """Fused impls keep fp32 state for bf16/fp16 params (SPEC §9); the references use p's dtype."""
        if p.dtype in _LOW_PRECISION and self.impl_for(p.device) in ("triton", "native"):
            return torch.float32
        return p.dtype

    def _zeros_state(self, p: Tensor) -> Tensor:
        return torch.zeros_like(p, dtype=self._state_dtype(p), memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        # Validated here, so both the constructor's defaults and every group's own values are checked
        # before the group exists.
        merged = dict(self.defaults)
        merged.update({k: v for k, v in param_group.items() if k != "params"})
        self._validate_group(merged)
        params = param_group["params"]
        if isinstance(params, set):  # torch's rule and message: a set's order changes between runs
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                            "ordering of tensors in sets will change between runs. Please use a list instead.")
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group["params"] = params  # a generator is consumed above; torch must see the same list
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"{self._display_name} can only optimize Tensors, but one of the params is "
                                f"{type(p).__name__}")
            if not (p.is_floating_point() or p.is_complex()):
                raise ValueError(f"{self._display_name} can only optimize floating-point or complex tensors, "
                                 f"got a parameter of dtype {p.dtype}; convert it with .float()")
            if p.is_complex() and not self._supports_complex:
                raise ValueError(f"{self._display_name} does not support complex parameters: "
                                 f"{self._complex_reason}. Optimize torch.view_as_real(p) as a real "
                                 "parameter instead if a per-component update is what you want")
        # torch only warns on a duplicate inside a group (and its cross-group message names no tensor);
        # a tensor listed twice would be updated twice per step, so both are refused here, by position.
        seen: dict[int, int] = {}
        for i, p in enumerate(params):
            seen.setdefault(id(p), i)
        for i, p in enumerate(params):
            if seen[id(p)] != i:
                raise ValueError(f"{self._display_name}: parameter {i} (shape {tuple(p.shape)}) of a param group "
                                 f"is the same tensor as parameter {seen[id(p)]}; list each parameter once")
        for gi, group in enumerate(getattr(self, "param_groups", [])):
            for p in group["params"]:
                if id(p) in seen:
                    raise ValueError(f"some parameters appear in more than one parameter group: parameter "
                                     f"{seen[id(p)]} (shape {tuple(p.shape)}) of the new group is already in "
                                     f"group {gi}")
        super().add_param_group(param_group)

    def _validate_group(self, group: dict) -> None:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    # ------------------------------------------------------------------ step
    def _collect(self, group: dict) -> tuple[list[Tensor], list[Tensor]]:
        """Params with a grad and their grads; raises before anything changes."""
        params, grads = [], []
        strided = torch.strided
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            # one cheap test per grad (this runs every step); layouts and dtypes are singletons
            if g.layout is not strided or g.dtype is not p.dtype or g.shape != p.shape or g.device != p.device:
                self._refuse_grad(p, g)
            params.append(p)
            grads.append(g)
        if params:
            self._check_group(group, params)
        return params, grads

    def _refuse_grad(self, p: Tensor, g: Tensor) -> None:
        """Raise the error that names what is wrong with a param's grad (`_collect`)."""
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(f"{self._display_name} does not support sparse gradients; "
                               "use a dense gradient (e.g. nn.Embedding(sparse=False))")
        if g.shape != p.shape:
            raise RuntimeError(f"{self._display_name}: a gradient of shape {tuple(g.shape)} does not match "
                               f"its parameter of shape {tuple(p.shape)}")
        raise RuntimeError(f"{self._display_name}: a gradient ({g.dtype}, {g.device}) does not match "
                           f"its parameter ({p.dtype}, {p.device}); grads must have the param's "
                           "dtype and device")

    def _check_group(self, group: dict, params: list[Tensor]) -> None:
        """What could otherwise fail mid-step, checked while collecting (every group is collected before
        any tensor changes, so no step is half-applied): hyperparameters edited into `param_groups` after
        construction are re-validated, and the impl of each device is resolved (an explicit impl that
        cannot run on one device must not raise after another device's params moved). A group holding
        an accelerator tensor hyperparameter (a capturable lr) is not re-read: that would sync the host."""
        if not any(isinstance(v, Tensor) and v.device.type != "cpu" for k, v in group.items()
                   if k != "params" and k not in self._group_counters):
            self._validate_group(group)
        devices = {p.device for p in params}
        for device in devices:
            self.impl_for(device)
        if self.capturable:
            self._check_capturable(devices, any(_dist.is_dtensor(p) for p in params))

    def _check_capturable(self, devices: set[torch.device], sharded: bool) -> None:
        if len(devices) > 1:
            raise ValueError(f"{self._display_name}: capturable=True needs each param group on one device (its step "
                             f"counter lives there), got {sorted(map(str, devices))}; split the group by device")
        device = next(iter(devices))
        if device.type != "cpu" and not getattr(self._runs(device, sharded), "supports_capturable", False):
            raise RuntimeError(f"{self._display_name}: capturable=True on {device.type} needs impl='triton' or "
                               f"impl='native' (impl {self.impl_for(device)!r} reads its step-dependent scalars on "
                               "the host, a sync that a CUDA graph cannot capture); pass impl='triton', "
                               "impl='native' or capturable=False")

    def _runs(self, device: torch.device, sharded: bool) -> Callable[..., None]:
        """The impl function `_dispatch` calls on `device` (on DTensor shards it may fall back to foreach)."""
        impl = self.impl_for(device)
        return self._shard_impl(impl, self._impls[impl])[1] if sharded else self._impls[impl]

    def _advance_counter(self, group: dict, key: str) -> int | Tensor:
        """Add one to the group's step counter `key` and return it (torch's convention: before use).

        A Python int normally. With ``capturable=True`` a 0-d float32 tensor on the group's device,
        advanced there: by ``found_inf == 0`` when AMP's skip is taken on the device (the counter must
        not move on a skipped step), else by 1. A counter of the other kind (a checkpoint saved with
        the other setting) is converted first."""
        value = group.get(key, 0)
        if not self.capturable:
            group[key] = (int(value.item()) if isinstance(value, Tensor) else value) + 1
            return group[key]
        device = _dist.local(group["params"][0]).device if group["params"] else torch.device("cpu")
        if not isinstance(value, Tensor):
            value = torch.full((), float(value), dtype=torch.float32, device=device)
        elif value.device != device or value.dtype != torch.float32:
            value = value.to(device=device, dtype=torch.float32)
        found_inf = (self._amp_kwargs or {}).get("found_inf")
        if found_inf is not None:
            value.add_((found_inf.to(device, non_blocking=True) == 0).reshape(()))
        else:
            value.add_(1)
        group[key] = value
        return value

    def _device_scalars(self, params: list[Tensor]) -> bool:
        """Whether this split's impl reads step-dependent scalars as device tensors (capturable impls);
        otherwise the class reads a capturable counter on the host (only ever a CPU one: see
        `_check_capturable`)."""
        return bool(params) and getattr(self._runs(params[0].device, _dist.is_dtensor(params[0])),
                                        "supports_capturable", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, grad_scale: Tensor | None = None,
             found_inf: Tensor | None = None):
        """Performs a single optimization step.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss; it runs under
                ``torch.enable_grad()``.
            grad_scale, found_inf (Tensor, optional): AMP loss scale and inf flag (class docstring,
                "AMP"); by default read from the attributes ``torch.amp.GradScaler.step`` sets.
        """
        if not self.capturable and cuda_capturing():
            raise RuntimeError(self._capture_refusal())
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        batches = [(group, *self._collect(group)) for group in self.param_groups]
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if self.skip_if_nonfinite:
            found_inf = _nonfinite_flag([g for _, _, gs in batches for g in gs], found_inf)
        if grad_scale is None and found_inf is None:
            self._update(batches)
            return loss
        if not self._begin_amp_step(batches, grad_scale, found_inf):
            return loss
        try:
            self._update(batches)
        finally:
            self._amp_kwargs = None
        return loss

    _amp_kwargs: dict[str, Tensor | None] | None = None

    def _capture_refusal(self) -> str:
        """Why a step with host-side per-step values cannot be captured, and the fix (as torch's own
        optimizers refuse a capture without capturable=True)."""
        if self._supports_capturable:
            return (f"{self._display_name}: step() is being captured in a CUDA graph, but capturable is False: its "
                    "per-step values (step counters, the scalars derived from them) are host values the graph "
                    "would freeze at capture time. Construct it with capturable=True (impl='triton' or "
                    "impl='native')")
        return (f"{self._display_name}: step() is being captured in a CUDA graph, which it does not support "
                "(capturable=True is not implemented for it: its per-step values are host values the graph "
                "would freeze at capture time); run its step outside the graph")

    def _reads_grads_before_dispatch(self) -> bool:
        """True when the step reads grads before `_dispatch` (then AMP unscales them first)."""
        return False

    def _begin_amp_step(self, batches: list[tuple[dict, list[Tensor], list[Tensor]]],
                        grad_scale: Tensor | None, found_inf: Tensor | None) -> bool:
        """Apply the AMP contract (class docstring) before `_update`; False means "skip this step".

        Sets `self._amp_kwargs` to what `_dispatch` passes on to AMP-aware impls. Any other source of a
        found_inf flag (a non-finite check) can use this same path.
        """
        grads = [g for _, _, gs in batches for g in gs]
        devices = {g.device for g in grads}
        sharded = any(_dist.is_dtensor(g) for g in grads)
        in_kernel = (bool(devices) and not self._reads_grads_before_dispatch()
                     and all(getattr(self._runs(d, sharded), "supports_amp", False) for d in devices))
        # counters advance on the device only when capturable (`_advance_counter`); a CPU skip is decided
        # on the host (no sync there), except in capturable mode, which keeps one code path everywhere
        device_skip = in_kernel and (self.capturable or (not self._group_counters
                                                    and all(d.type != "cpu" for d in devices)))
        if found_inf is not None and not device_skip:
            if found_inf.item():  # host read; see the class docstring for when this is a sync
                return False
            found_inf = None
        if grad_scale is not None and not in_kernel:
            by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
            for g in grads:
                by_device[g.device].append(impl_view(g))
            for device, gs in by_device.items():
                # GradScaler's scales are powers of two, so dividing is exact (as in torch's fused Adam)
                torch._foreach_div_(gs, grad_scale.to(device, non_blocking=True))
            grad_scale = None
        self._amp_kwargs = {"grad_scale": grad_scale, "found_inf": found_inf} if in_kernel else None
        return True

    def _update(self, batches: list[tuple[dict, list[Tensor], list[Tensor]]]) -> None:
        for group, params, grads in batches:
            self._step_group(group, params, grads)

    def _step_group(self, group: dict, params: list[Tensor], grads: list[Tensor]) -> None:
        raise NotImplementedError  # pragma: no cover

    def _dispatch(self, params: list[Tensor], grads: list[Tensor], states: Sequence[list[Tensor]],
                  **scalars: Any) -> None:
        """Split by (device, dtype), resolve the impl per device and run one functional step per split.

        Complex tensors are passed as `torch.view_as_real` views, so every impl sees real tensors.
        DTensor (FSDP2) tensors are passed as their local shards, inside a `distributed.shard_context`
        that lets the impl finish its per-tensor reductions over the shard group.
        """
        if not params:
            return
        for (device, dtype), idx in split_by_device_dtype(params).items():
            impl = self.impl_for(device)
            fn = self._impls[impl]
            shard_ctx = contextlib.nullcontext()
            if _dist.is_dtensor(params[idx[0]]):
                impl, fn = self._shard_impl(impl, fn)
                numels = [params[i].numel() * (2 if params[i].is_complex() else 1) for i in idx]
                shard_ctx = _dist.shard_context(_dist.shard_groups(params[idx[0]]), device, numels)
                device = _dist.local(params[idx[0]]).device
            sub_p = impl_views(params, idx, dtype)
            sub_g = impl_views(grads, idx, dtype)
            sub_s = [impl_views(s, idx, dtype) for s in states]
            kwargs = scalars
            lr = scalars.get("lr")
            if lr is not None and not (isinstance(lr, Tensor) and getattr(fn, "supports_tensor_lr", False)):
                # a tensor lr reaches only impls that read it on the device (fn.supports_tensor_lr: no
                # .item(), no host sync); the others get the Python double they are written for
                kwargs = dict(scalars, lr=_as_float(lr))
            amp = {}
            if self._amp_kwargs is not None and getattr(fn, "supports_amp", False):
                amp = {k: None if v is None else v.to(device, non_blocking=True)
                       for k, v in self._amp_kwargs.items()}
            # Under torch.compile a compiled kernel runs as one opaque custom op (fused_optim/ops.py):
            # Dynamo cannot trace a Triton launcher or an extension call without a fake kernel.
            if impl in _ops.OPAQUE_IMPLS and torch.compiler.is_compiling() and self.capturable:
                # the ops pack their scalars as one host float64 tensor (fused_optim/ops.py); device
                # scalars would need a second schema
                raise RuntimeError(f"{self._display_name}: capturable=True inside torch.compile is not supported "
                                   "yet; compile the capturable=False step, or capture the eager capturable step "
                                   "with torch.cuda.graph")
            if (impl in _ops.OPAQUE_IMPLS and torch.compiler.is_compiling()
                    and _ops.run_as_op(type(self), impl, sub_p, sub_g, sub_s, dict(kwargs, lr=_as_float(lr))
                                       if lr is not None else kwargs, amp)):
                continue
            with shard_ctx:
                fn(sub_p, sub_g, *sub_s, **kwargs, **amp)

    def _shard_impl(self, impl: str, fn: Callable[..., None]) -> tuple[str, Callable[..., None]]:
        """The impl that runs on DTensor local shards: every impl of an elementwise update; for a
        per-tensor reduction only shard-aware ones (auto mode falls back to foreach, which is)."""
        if not self._per_tensor_reduction or getattr(fn, "shard_aware", False):
            return impl, fn
        if self._impl_request is None and getattr(self._impls.get("foreach"), "shard_aware", False):
            return "foreach", self._impls["foreach"]
        raise RuntimeError(f"{self._display_name}: impl={impl!r} cannot run on sharded (DTensor, FSDP2) "
                           "parameters: its per-tensor reduction would see only this rank's shard. Use "
                           "impl='foreach' (its reduction is all-reduced over the shard group).")

    # ------------------------------------------------------------------ state dict
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, then every state tensor re-cast from the *saved* values to this impl's policy.

        torch casts floating state to the param's dtype, which would round fp32 state of bf16 params
        through bf16; copying from the saved tensors keeps it exact. Copies never share storage with
        the source dict, so two live optimizers never update one buffer.
        """
        saved_state = state_dict["state"]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # checkpoints of upstream optimizers lack our keys (maximize, ...)
            for key, value in self._group_defaults.items():
                group.setdefault(key, value)
            for key in self._group_counters:  # a capturable counter: never shared with the source dict
                if isinstance(group.get(key), Tensor):
                    group[key] = group[key].clone()
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            for key, value in saved_state[pid].items():
                if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()) and key != "step":
                    dtype = self._state_dtype(p) if p.is_floating_point() or p.is_complex() else value.dtype
                    self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)
        self._impl_cache.clear()


def cuda_capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph. False while torch.compile traces
    (its cudagraphs capture compiled code) and before CUDA is initialized, so a CPU run never starts it."""
    # is_compiling() first: Dynamo folds it to a constant, so it never traces the CUDA queries
    return (not torch.compiler.is_compiling() and torch.cuda.is_initialized()
            and torch.cuda.is_current_stream_capturing())


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def split_by_device_dtype(tensors: Sequence[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """The indices of `tensors` per (device, dtype), in order: one impl call per split."""
    splits: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        splits[(t.device, t.dtype)].append(i)
    return splits


# tensors of exactly these types reach an impl as they are; any other (a DTensor, another subclass)
# goes through `impl_view`
_PLAIN_TYPES = frozenset((Tensor, torch.nn.Parameter))


def impl_view(t: Tensor) -> Tensor:
    """What an impl sees of `t`: a DTensor's local shard (sharing its storage), a complex tensor as its
    `torch.view_as_real` view (so every impl sees real tensors), anything else itself."""
    return _real(_dist.local(t))


def impl_views(tensors: Sequence[Tensor], idx: list[int] | None, dtype: torch.dtype) -> list[Tensor]:
    """`impl_view` of ``tensors[i]`` for ``i`` in `idx` (sorted, as `split_by_device_dtype` gives them; None:
    all), a new list. ``dtype`` is the split's: every list of a split (params, grads, state) is real when
    it is.

    This runs for every list of every step: plain real tensors, the common case, are taken as they are
    after one C-level type test each (~20 ns; `impl_view` per tensor costs ~0.4 µs)."""
    sel = list(tensors) if idx is None or len(idx) == len(tensors) else [tensors[i] for i in idx]
    if not dtype.is_complex and _PLAIN_TYPES.issuperset(map(type, sel)):
        return sel
    return [impl_view(t) for t in sel]


def _nonfinite_flag(grads: list[Tensor], found_inf: Tensor | None) -> Tensor | None:
    """1.0 when any grad holds NaN/Inf (or `found_inf` is already set), else 0.0: a 0-d fp32 tensor on the
    first grad's device, computed without a host read (max|g| of each tensor is NaN/Inf iff it is)."""
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    for g in grads:
        if g.numel():  # _foreach_norm(inf) raises on an empty tensor
            by_device[g.device].append(_real(g))
    if not by_device:
        return found_inf
    device = next(iter(by_device))
    flags = [(~torch.stack(torch._foreach_norm(gs, ord=float("inf"))).isfinite()).any().to(device, non_blocking=True)
             for gs in by_device.values()]
    flag = torch.stack(flags).any().float()
    if found_inf is not None:
        flag = torch.maximum(flag, found_inf.to(device, torch.float32, non_blocking=True).reshape(()))
    return flag


def params_of(model_or_params: torch.nn.Module | Iterable) -> Iterable:
    if isinstance(model_or_params, torch.nn.Module):
        return model_or_params.parameters()
    return model_or_params
