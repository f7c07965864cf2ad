"""The base every fused_optim optimizer shares.

One step of any optimizer here is: collect and validate every group's (param, grad) pairs, refusing bad
input before any tensor changes; let the subclass compute its per-group Python scalars; split each
group by (device, dtype); resolve the impl once per device; call one functional step per split. The
functional steps of each optimizer (`_forloop_x`, `_foreach_x`, `_triton_x`, `_native_x`) share one
keyword-only signature and live next to the class, in its module.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from . import distributed as _dist
from . import kernels as _kernels
from . import lowstate as _low
from . import ops as _ops
from ._backends import IMPLS, auto_impl, best_fused_impl, impl_status
from .declaration import Declaration, Impl, register
from .declaration import check_betas as _check_betas  # noqa: F401 - the optimizer modules import these
from .declaration import check_range as _check_range  # noqa: F401
from .declaration import mark_amp as supports_amp
from ._scalars import host_scalar
from .lowbit import num_blocks as _lb_num_blocks

__all__ = ["FusedOptimizer", "supports_amp"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


#: a hyperparameter as a Python double; a 0-d tensor lr (schedulers) is read here, once per step
_as_float = host_scalar


def _check_counter(name: str, key: str, value: Any) -> None:
    """A group step counter: an int >= 0, or a one-element tensor (capturable)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name}: the group step counter {key!r} must be one number, got a tensor of "
                             f"{value.numel()} elements")
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: the group step counter {key!r} must be an int >= 0, got {value!r}")


#: dtypes an impl handles where it does not handle every floating dtype (checked before a step starts)
_IMPL_DTYPES: dict[str, tuple[torch.dtype, ...]] = {"triton": (torch.float32, torch.float16, torch.bfloat16)}


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


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
        if fused is False and impl in ("triton", "native"):
            raise ValueError(f"fused=False conflicts with impl={impl!r} (a fused impl); pass only one of them")
        if foreach is False and impl == "foreach":
            raise ValueError("foreach=False conflicts with impl='foreach'; pass only one of them")
        return impl
    if foreach:
        return "foreach"
    if fused:
        return "fused"
    if foreach is False:
        return "forloop"  # torch's convention: foreach=False is the for-loop implementation
    if fused is False:
        return "foreach"  # torch's convention: fused=False is never a fused kernel (its default there: foreach)
    return None


def _impl_function(impl: Impl) -> Callable[..., None]:
    """A declared impl's function, carrying its capabilities as the attributes the dispatcher reads
    (``fn.supports_amp``...); a kernel reference becomes a lazy launcher (no triton import here)."""
    fn = _kernels.resolve(impl.fn) if isinstance(impl.fn, str) else impl.fn
    for attr, value in impl.caps().items():
        if getattr(fn, attr, False) and not value:
            raise ValueError(f"{getattr(fn, '__qualname__', fn)} is marked {attr} but its declaration "
                             f"({impl.name!r}) says it is not; fix one of them")
        setattr(fn, attr, value)
    return fn


class FusedOptimizer(torch.optim.Optimizer):
    """A `torch.optim.Optimizer` with pluggable implementations (docs/spec.md §0).

    Subclasses set ``declaration`` (fused_optim/declaration.py), from which `__init_subclass__` derives
    `_impls` (impl name -> functional step), the state keys, the step counters, the capabilities and
    `_validate_group`; they implement `_step_group(group, params, grads)` (or `_update(batches)` when a
    step couples groups, like Adan's global clip), and call `self._dispatch(...)` with their tensor
    lists and Python scalars (docs/design.md, "One declaration").

    AMP: ``_step_supports_amp_scaling = True`` tells ``torch.amp.GradScaler`` to hand the optimizer its
    ``grad_scale`` and ``found_inf`` tensors (as attributes, or as ``step()`` keyword arguments) instead
    of unscaling and checking the grads itself, as it does for torch's fused optimizers. Then:

    - the grads are divided by ``grad_scale`` in place (``.grad`` ends unscaled, like torch's fused
      Adam), inside the kernel for impls marked with :func:`supports_amp`, else by one foreach pass;
    - when ``found_inf`` is nonzero the whole step is skipped: params, state, lazily created state and
      the step counters named in ``_group_counters`` stay as they were, and ``.grad`` stays scaled.
      The skip is decided on the host (``found_inf.item()``, one sync on an accelerator, the same one
      ``GradScaler`` does for every optimizer it cannot hand ``found_inf`` to) unless every impl of the
      step is AMP-aware, the optimizer has no step counters (Lion, GradientEquilibrium) and no
      param is on the CPU: then ``found_inf`` goes down to the kernels and nothing syncs. Optimizers
      whose host scalars depend on a counter (Gravity's ``t``, Adan's ``step``) need ``capturable``
      device counters for a sync-free skip.
    - Clipping before ``step`` (``clip_grad_norm_``) must see unscaled grads: call
      ``scaler.unscale_(opt)`` first; the scaler then passes ``grad_scale=None`` and only ``found_inf``.
    - Subclasses that read grads before `_dispatch` (Adan's global clip) return True from
      `_reads_grads_before_dispatch`, so the grads are unscaled before that read.

    Step counters: the group keys in ``_group_counters`` are 0-d float32 tensors, as torch keeps its
    ``step`` (created with the group, advanced in place by `_advance_counter`; an int in a checkpoint is
    converted). On the CPU unless capturable. In eager mode the class reads the count on the host (no
    sync) and computes its per-step scalars as Python doubles, upstream's; under torch.compile it gets
    the counter as a float64 tensor and the scalars are traced from it, so Dynamo never guards on the
    count and a compiled step does not recompile as the count grows.

    Capturable (CUDA graphs): classes with ``_supports_capturable`` take ``capturable=True`` (torch's
    flag, kept as the optimizer attribute ``capturable`` rather than a param-group key: Dynamo sets every
    group's ``"capturable"`` to True while tracing torch optimizers, which must not move our counters
    inside ``torch.compile``). Then the step counters live on the params' device, are advanced there
    (`_advance_counter`), and the per-step
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
    #: (state key, signed) of the state lists `_dispatch` receives that ``state_precision`` stores in bf16
    #: or 8 bits, in their order (fused_optim/lowstate.py); empty: the class takes no ``state_precision``
    _lowbit_states: tuple[tuple[str, bool], ...] = ()
    #: the class takes ``stochastic_rounding=True`` (bf16 / fp16 params rounded stochastically)
    _supports_stochastic_rounding = False

    _impls: dict[str, Callable[..., None]] = {}
    #: per-param state, as `_state_spec` declares it: tensors shaped, placed and typed like their param
    #: that a param's state holds all of once it has any (a step creates them together) ...
    _state_keys: tuple[str, ...] = ()
    #: ... param-shaped tensors a step creates when missing (a checkpoint may lack them) ...
    _optional_state_keys: tuple[str, ...] = ()
    #: ... and per-param scalars (a number or a one-element tensor; required when also in
    #: `_state_keys`). Any other key is refused.
    _scalar_state_keys: tuple[str, ...] = ()
    #: the required state exists from `add_param_group` on (Gravity's velocity): an empty entry is refused
    _state_from_init = False
    #: human name used in error messages
    _display_name = "optimizer"
    #: whether complex params are updated through torch.view_as_real (False: a clear error)
    _supports_complex = True
    _complex_reason = ""

    #: the optimizer's declaration (fused_optim/declaration.py); `__init_subclass__` derives the class
    #: attributes above from the one a subclass sets in its body
    declaration: Declaration | None = None
    #: (group key, check) per declared hyperparameter, run by `_validate_group` (precomputed per class)
    _validators: tuple[tuple[str, Callable[[Any], None]], ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        decl = cls.__dict__.get("declaration")
        if decl is None:
            return
        register(decl, cls)
        if decl.alias_of is not None:  # another spelling of its base class: everything else is inherited
            return
        cls._display_name = cls.__dict__.get("_display_name", cls.__name__)
        if decl.hypers:
            cls._validators = tuple((h.name, check) for h in decl.hypers if (check := h.checker()) is not None)
        if decl.state or decl.scalar_state:
            cls._lowbit_states = tuple((s.key, s.signed) for s in decl.state if s.lowbit)
            cls._supports_stochastic_rounding = bool(cls._lowbit_states)
            cls._state_keys = tuple(s.key for s in decl.state if not s.optional)
            cls._optional_state_keys = tuple(s.key for s in decl.state if s.optional)
            cls._scalar_state_keys = decl.scalar_state
        if decl.counters:
            cls._group_counters = decl.counters
        if decl.impls:
            cls._impls = {i.name: _impl_function(i) for i in decl.impls}
            cls._supports_capturable = any(i.capturable for i in decl.impls)
            cls._per_tensor_reduction = decl.per_tensor_reduction
            _ops.define(decl, cls)  # its torch.compile op (fused_optim/ops.py)

    def __init__(self, params, defaults: dict, *, maximize: bool = False, impl: str | None = None,
                 foreach: bool | None = None, fused: bool | None = None, capturable: bool = False,
                 state_precision: str = "fp32", stochastic_rounding: bool = False):
        self._impl_request = _resolve_request(impl, foreach, fused)
        self._impl_cache: dict[str, str] = {}
        defaults = dict(defaults, maximize=bool(maximize))
        if capturable and not self._supports_capturable:
            raise ValueError(f"{self._display_name} does not support capturable=True")
        _low.check_options(self._display_name, state_precision, stochastic_rounding)
        if state_precision != "fp32" and not self._lowbit_states:
            raise ValueError(f"{self._display_name} has no state to store in {state_precision!r}; "
                             "pass state_precision='fp32'")
        if stochastic_rounding and not self._supports_stochastic_rounding:
            raise ValueError(f"{self._display_name} does not support stochastic_rounding=True yet")
        #: per-step bookkeeping of the rounding key, mutated in place (a compiled step may not set
        #: attributes: older Dynamo refuses it): group index -> this step's counter; the tensor-index table
        self._rounding_steps: dict[int, int | Tensor] = {}
        self._tensor_index_cache: dict[str, Any] = {}
        #: fused_optim/lowstate.py: how the state is stored, whether bf16 params round stochastically
        self.state_precision = state_precision
        self.stochastic_rounding = bool(stochastic_rounding)
        if self._lowbit_on:
            # the generator's key: a seed from torch's generator (in every group, so in the state_dict)
            # and a rounding counter per group, advanced once per step (`_advance_rounding`)
            defaults["lowbit_seed"] = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            self._group_counters = (*type(self)._group_counters, "lowbit_step")
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
        impl = self._resolve_impl(device_type)
        self._impl_cache[device_type] = impl
        return impl

    def _resolve_impl(self, device_type: str) -> str:
        """What `impl_for` answers, without filling its cache (`__repr__` uses this: Dynamo calls repr
        on the optimizer while it builds guards, and a cache filled then fails its own guard)."""
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
        return impl

    def __repr__(self) -> str:
        """torch's listing of the param groups, headed by the impl: the request (auto = None) and what
        runs on each device of the params, e.g. `impl: auto (cpu: native)`."""
        def runs(device_type: str) -> str:
            try:
                return self._impl_cache.get(device_type) or self._resolve_impl(device_type)
            except RuntimeError:
                return "cannot run here (step() raises why)"

        devices = sorted({p.device.type for g in self.param_groups for p in g["params"]})
        where = ", ".join(f"{d}: {runs(d)}" for d in devices) or "no parameters"
        head, _, rest = super().__repr__().partition("\n")
        return f"{head}\nimpl: {self._impl_request or 'auto'} ({where})\n{rest}"

    def _state_dtype(self, p: Tensor) -> torch.dtype:
        """The dtype of `p`'s state on every impl: float32 for bfloat16/float16 params, else p's dtype.

        One policy for all impls, so a model trains the same way and its checkpoints load into any impl
        (README, "State dtype"): a bf16 running average with a decay of 0.998 or more never moves (the
        change is below half a bf16 ulp), so low-precision params keep fp32 moments, as mixed-precision
        training keeps fp32 master state."""
        return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype

    def _zeros_state(self, p: Tensor) -> Tensor:
        return torch.zeros_like(p, dtype=self._state_dtype(p), memory_format=torch.preserve_format)

    # ------------------------------------------------------------------ low-precision state
    @property
    def _lowbit_on(self) -> bool:
        """Whether state is stored below fp32 or params round stochastically (fused_optim/lowstate.py)."""
        return self.state_precision != "fp32" or self.stochastic_rounding

    def _state_format(self, p: Tensor, key: str) -> str:
        """How state `key` of `p` is stored: "fp32" (`_state_dtype`), "bf16" or "8bit"."""
        precision = self.state_precision
        if precision == "fp32" or key not in self._lowbit_keys():
            return "fp32"
        return _low.storage_format(precision, p)  # the global tensor: every rank of a DTensor decides alike

    def _lowbit_keys(self) -> dict[str, bool]:
        return dict(self._lowbit_states)

    def _new_state(self, p: Tensor, key: str, value: Tensor | None = None) -> None:
        """Set ``state[p][key]`` (zeros when `value` is None) in its storage format (`_state_format`): the
        way every step creates state, so a state is born in the optimizer's precision."""
        fmt = self._state_format(p, key)
        entries = _low.new_entries(key, fmt, self._lowbit_keys().get(key, True), p, value, self._state_dtype(p))
        if fmt == "8bit" and _dist.is_dtensor(p):  # per-shard scales, as a DTensor a checkpoint saves whole
            entries[key + _low.ABSMAX] = _dist.shard_block_scales(entries[key + _low.ABSMAX], entries[key],
                                                                  _lb_num_blocks)
        st = self.state[p]
        st.pop(key + _low.ABSMAX, None)
        st.update(entries)

    def _tensor_indices(self) -> dict[int, tuple[int, int]]:
        """id(param) -> (its position in the optimizer, its group's position): the generator's tensor index."""
        sig = tuple(len(g["params"]) for g in self.param_groups)
        cache = self._tensor_index_cache
        cached = cache.get("map")
        # keyed by id: valid while the groups hold the same params (a param swapped in place is a miss)
        last = next((g["params"][-1] for g in reversed(self.param_groups) if g["params"]), None)
        if cached is not None and cached[0] == sig and (last is None or id(last) in cached[1]):
            return cached[1]
        table: dict[int, tuple[int, int]] = {}
        n = 0
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                table[id(p)] = (n, gi)
                n += 1
        cache["map"] = (sig, table)
        return table

    def _advance_rounding(self, batches: list[tuple[dict, list[Tensor], list[Tensor]]]) -> None:
        """Advance each stepping group's rounding counter once (after AMP's skip decision): the step of the
        generator's key for this step's stochastic roundings."""
        if not self._lowbit_on:
            return
        steps = self._rounding_steps
        steps.clear()
        for gi, (group, params, _) in enumerate(batches):
            if params:
                steps[gi] = self._advance_counter(group, "lowbit_step", params)

    def _rounding_for(self, params: list[Tensor], idx: list[int], fmt: str, states: Sequence[list[Tensor]]
                      ) -> _low.Rounding:
        table = self._tensor_indices()
        if any(id(params[i]) not in table for i in idx):  # params replaced in a group since it was built
            self._tensor_index_cache.pop("map", None)
            table = self._tensor_indices()
        first = table[id(params[idx[0]])]
        step = self._rounding_steps.get(first[1], 0)
        group = self.param_groups[first[1]]
        keys = self._lowbit_states[:len(states)]
        absmax: tuple[list[Tensor], ...] = tuple([] for _ in keys)
        if fmt == "8bit":
            absmax = tuple([_low.local_scales(self.state[params[i]][key + _low.ABSMAX], self.state[params[i]][key])
                            for i in idx] for key, _ in keys)
        return _low.Rounding(fmt=fmt, signed=tuple(signed for _, signed in keys), absmax=absmax,
                             param_sr=self.stochastic_rounding, seed=int(group["lowbit_seed"]), step=step,
                             tensor_index=[table[id(params[i])][0] for i in idx])

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults, state and param_groups; an optimizer rebuilt from that lacks the
        # impl request, `capturable`, the group defaults... Keep every attribute except torch's hook
        # tables (torch drops them too: hooks are often unpicklable closures) and the impl cache (a
        # copy may land in a process where other backends are available: it resolves again).
        state = super().__getstate__()
        for key, value in self.__dict__.items():
            if (key not in state and not key.startswith("_optimizer_")
                    and key not in ("_impl_cache", "_state_checked", "_state_map", "_tensor_index_cache",
                                    "_rounding_steps")):
                state[key] = value
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_impl_cache", {})
        self.__dict__.setdefault("_rounding_steps", {})
        self.__dict__.setdefault("_tensor_index_cache", {})
        self.__dict__.setdefault("state_precision", "fp32")
        self.__dict__.setdefault("stochastic_rounding", False)
        self.__dict__.setdefault("_impl_request", None)
        self.__dict__.setdefault("capturable", False)
        self.__dict__.setdefault("_group_defaults", dict(self.defaults))

    # ------------------------------------------------------------------ param groups
    def add_param_group(self, param_group: dict) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        params = param_group["params"]
        if isinstance(params, set):  # torch's rule and message: a set's order changes between runs
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the "
                            "ordering of tensors in sets will change between runs. Please use a list instead.")
        params = [params] if isinstance(params, Tensor) else list(params)
        # named parameters, as torch (>= 2.6) takes them: (name, tensor) pairs, recorded as the group's
        # "param_names" (saved in state_dict()); all or none of a group's params are named
        names = [p[0] for p in params if isinstance(p, tuple)]
        if names:
            if len(names) != len(params) or any(len(p) != 2 for p in params):
                raise ValueError("all optimizer params should be with/without names. Some param names are missing")
            params = [p[1] for p in params]
            param_group["param_names"] = names
        param_group["params"] = params  # a generator is consumed above; torch must see the same list
        # Validated here, so both the constructor's defaults and every group's own values are checked
        # before the group exists.
        merged = dict(self.defaults)
        merged.update(param_group)
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
        self._validate_group(merged)
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
        _check_no_overlap(self._display_name, params, getattr(self, "param_groups", []))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for key in self._group_counters:  # each group its own counter tensor, from the first step on
            group[key] = group.get(key, 0)
            self._counter_tensor(group, key)

    def _validate_group(self, group: dict) -> None:
        """Refuse a hyperparameter outside its declared range (`Hyper.check`), naming it and the range."""
        for key, check in self._validators:
            check(group[key])

    # ------------------------------------------------------------------ step
    def _collect(self, group: dict, state_unchanged: bool | None = None) -> tuple[list[Tensor], list[Tensor]]:
        """Params with a grad and their grads; raises before anything changes.

        Each param's state is checked in the same pass (`_check_state`), through a record of its last
        check (`_state_checked`, keyed by id(p): a tensor's __hash__ is a Python call): while the state
        holds the same objects (`_state_unchanged`, once per step), a param whose grad and param (dtype,
        shape, device) still match its record costs one tuple comparison; any other goes through the
        grad and state checks.
        `state_unchanged`: `_state_unchanged()` already called for this step (None: call it here)."""
        params, grads = [], []
        strided = torch.strided
        spec = self._state_spec(group)
        track = (spec[0] or spec[1] or spec[2]) and not torch.compiler.is_compiling()
        checked = self.__dict__.get("_state_checked")
        if checked is None:
            checked = {}
            if track:  # no attribute set while compiling (older Dynamo refuses the mutation)
                self._state_checked = checked
        if track and state_unchanged is None:
            state_unchanged = self._state_unchanged()
        # a record is only valid while the state holds what it was checked with
        record = checked.get if track and state_unchanged else {}.get
        changed: list[Tensor] = []
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            # the grad against its param and the param against its record, in one comparison (in C)
            if (g.layout, g.dtype, g.shape, g.device, p.dtype, p.shape, p.device) != record(id(p)):
                if (g.layout is not strided or g.dtype is not p.dtype or g.shape != p.shape
                        or g.device != p.device):
                    self._refuse_grad(p, g)
                changed.append(p)
            params.append(p)
            grads.append(g)
        if params:
            self._check_group(group, params, changed if track else None)
        return params, grads

    def _state_unchanged(self) -> bool:
        """Whether `self.state` holds the same objects as at the last call: the same params mapped to the
        same per-param dicts, holding the same keys and values. If not, every record of `_collect` is
        dropped (a record stands for the state it was checked with). One pass in C over the whole state
        (about 0.1 µs per entry): cheaper than a per-param lookup (`self.state[p]` hashes through Python)."""
        state = self.state
        dicts = state.values()
        try:
            # ids of the params and of the state values; lengths and keys of the per-param dicts (which
            # dict holds them does not matter: a record stands for a param's keys and values)
            sig = (list(map(id, chain(state, chain.from_iterable(map(dict.values, dicts))))),
                   list(chain(map(len, dicts), chain.from_iterable(dicts))))
        except TypeError:  # an entry that is not a dict: every param is checked (and refused)
            self.__dict__.pop("_state_map", None)
            self.__dict__.get("_state_checked", {}).clear()
            return False
        snap = self.__dict__.get("_state_map")
        if snap is not None and snap[0] is state and snap[1] == sig:
            return True
        # held with it: every recorded param (a key here) and state value, so their ids stay unique
        self._state_map = (state, sig, list(state), list(chain.from_iterable(map(dict.values, dicts))))
        self.__dict__.get("_state_checked", {}).clear()
        return False

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

    def _check_group(self, group: dict, params: list[Tensor], changed: list[Tensor] | None = None) -> None:
        """What could otherwise fail mid-step, checked while collecting (every group is collected before
        any tensor changes, so no step is half-applied): hyperparameters edited into `param_groups` after
        construction are re-validated, and the impl of each device is resolved (an explicit impl that
        cannot run on one device must not raise after another device's params moved). A group holding
        an accelerator tensor hyperparameter (a capturable lr) is not re-read: that would sync the host."""
        if not any(isinstance(v, Tensor) and v.device.type != "cpu" for k, v in group.items()
                   if k != "params" and k not in self._group_counters):
            self._validate_group(group)
        for key in self._group_counters:
            _check_counter(self._display_name, key, group.get(key, 0))
        # attrgetter runs in C in eager mode; Dynamo cannot trace it, so a compiled step reads the attribute
        devices = {p.device for p in params} if torch.compiler.is_compiling() else set(map(_device_of, params))
        sharded = not _PLAIN_TYPES.issuperset(map(type, params)) and any(_dist.is_dtensor(p) for p in params)
        for device in devices:
            impl = self.impl_for(device)
            if sharded:
                self._runs(device, sharded)  # raises when the impl cannot run on shards
            if impl in _ops.OPAQUE_IMPLS and self.capturable and torch.compiler.is_compiling():
                raise RuntimeError(f"{self._display_name}: capturable=True inside torch.compile is not supported "
                                   "yet; compile the capturable=False step, or capture the eager capturable step "
                                   "with torch.cuda.graph")
            supported = _IMPL_DTYPES.get(impl)
            if supported is not None:
                for p in params:
                    if p.device == device and _real_dtype(p.dtype) not in supported:
                        raise TypeError(f"{self._display_name}: impl={impl!r} handles "
                                        f"{', '.join(map(str, supported))} tensors, got a {p.dtype} parameter of "
                                        f"shape {tuple(p.shape)}; use impl='foreach' (or 'native') for it")
        if self.capturable:
            self._check_capturable(devices, sharded)
        self._check_state(group, params if changed is None else changed)

    def _state_spec(self, group: dict) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        """(required, optional, scalar) per-param state keys of `group` (class attributes above)."""
        return self._state_keys, self._optional_state_keys, self._scalar_state_keys

    def _check_state(self, group: dict, params: list[Tensor]) -> None:
        """Every param's state fits it (keys, shape, device, dtype) before anything moves; a state edited
        or a model converted (``.double()``, ``.to(device)``) after the state was made is refused here
        rather than halfway through the step. Each param that passes is recorded with its signature
        (`_collect`); the checked tensors are held there, so their ids cannot be reused by new tensors
        while they count as checked."""
        spec = self._state_spec(group)
        required, optional, scalars = spec
        if not (required or optional or scalars):
            return
        state = self.state
        compiling = torch.compiler.is_compiling()  # then checked while tracing; Dynamo's guards re-trace
        checked = {} if compiling else self.__dict__.setdefault("_state_checked", {})
        for p in params:
            st = state.get(p)
            if self._state_problem(p, st or {}, spec, loading=False) is not None:
                self._refuse_state(group, p, spec)
            if compiling:
                continue
            if st:
                meta = (p.dtype, p.shape, p.device)
                # what `_collect` compares; p is a key of the state, held by `_state_unchanged`'s snapshot
                checked[id(p)] = (torch.strided, *meta, *meta)
            else:
                checked.pop(id(p), None)  # a reset state: let go of the old tensors

    def _refuse_state(self, group: dict, p: Tensor, spec) -> None:
        problem = self._state_problem(p, self.state.get(p, {}), spec, loading=False)
        gi = next(i for i, g in enumerate(self.param_groups) if g is group)
        pi = next(i for i, q in enumerate(group["params"]) if q is p)
        raise RuntimeError(f"{self._display_name}: the state of parameter {pi} of group {gi} (shape "
                           f"{tuple(p.shape)}, {p.dtype}, {p.device}) {problem}. The state no longer fits its "
                           "parameter (edited by hand, or the model converted with .to()/.double() after the "
                           "optimizer was built): recreate the optimizer, or load a state_dict that fits")

    def _state_problem(self, p: Tensor, st: dict, spec, *, loading: bool) -> str | None:
        """What is wrong with `st` as the state of `p` (None: nothing). `loading`: the state comes from a
        state_dict, whose tensors are still to be moved to `p`'s device and cast to the state dtype."""
        required, optional, scalars = spec
        if not st:
            if self._state_from_init and required:
                return f"is empty (expected {', '.join(map(repr, required))})"
            return None
        for key in required:
            if key not in st:
                return (f"lacks {key!r} (it holds {sorted(map(str, st))}, expected "
                        f"{sorted(required)}): a state_dict of another optimizer?")
        lowkeys = self._lowbit_keys()
        for key, v in st.items():
            if lowkeys and (key in lowkeys or key.endswith(_low.ABSMAX)):
                problem = self._lowbit_state_problem(p, st, key, v, lowkeys, loading=loading)
                if problem != "fp32":
                    if problem is not None:
                        return problem
                    continue
            if key in scalars:
                if isinstance(v, Tensor) and v.numel() != 1 or isinstance(v, bool) or not isinstance(v, (Tensor, int, float)):
                    return f"has {key!r} = {v!r} (expected a number or a one-element tensor)"
            elif key in required or key in optional:
                if not isinstance(v, Tensor):
                    return f"has {key!r} of type {type(v).__name__} (expected a tensor)"
                if v.shape != p.shape:
                    return f"has {key!r} of shape {tuple(v.shape)} (expected its parameter's {tuple(p.shape)})"
                if not (v.is_floating_point() or v.is_complex()) or v.is_complex() != p.is_complex():
                    return f"has {key!r} of dtype {v.dtype} (expected a {'complex' if p.is_complex() else 'floating'} dtype)"
                if loading:
                    continue
                if v.device != p.device:
                    return f"has {key!r} on {v.device} (expected its parameter's device, {p.device})"
                allowed = {p.dtype, self._state_dtype(p)}
                if p.dtype in _LOW_PRECISION:
                    allowed.add(torch.float32)
                if v.dtype not in allowed:
                    return f"has {key!r} of dtype {v.dtype} (expected {' or '.join(sorted(map(str, allowed)))})"
            else:
                return (f"holds an unknown key {key!r} (expected {sorted(required + optional + scalars)}): a "
                        "state_dict of another optimizer?")
        return None

    def _lowbit_state_problem(self, p: Tensor, st: dict, key: str, v: Any, lowkeys: dict[str, bool], *,
                              loading: bool) -> str | None:
        """`_state_problem` for a low-precision state key or its block scales: None (fine), a problem, or
        "fp32" (an fp32-form state: the ordinary checks apply). A state_dict may hold any precision
        (`load_state_dict` converts it); a live state must be in this optimizer's format."""
        if key.endswith(_low.ABSMAX):
            base = key[:-len(_low.ABSMAX)]
            if base not in lowkeys:
                return (f"holds an unknown key {key!r}: block scales of a state this optimizer does not "
                        "store in 8 bits")
            codes = st.get(base)
            if not (isinstance(codes, Tensor) and codes.dtype == torch.uint8):
                return f"has {key!r} (8-bit block scales) but {base!r} is not an 8-bit (uint8) tensor"
            if not isinstance(v, Tensor) or v.dtype != torch.float32:
                return f"has {key!r} that is not a float32 tensor of block scales"
            return self._scales_problem(key, v, p, codes, loading=loading)
        if not isinstance(v, Tensor):
            return f"has {key!r} of type {type(v).__name__} (expected a tensor)"
        fmt = self._state_format(p, key)
        if v.dtype == torch.uint8:
            if v.shape != p.shape:
                return f"has {key!r} of shape {tuple(v.shape)} (expected its parameter's {tuple(p.shape)})"
            if key + _low.ABSMAX not in st:
                return f"has {key!r} as 8-bit codes (uint8) without its block scales {key + _low.ABSMAX!r}"
            if not loading and fmt != "8bit":
                return (f"has {key!r} as 8-bit codes, but this optimizer stores it as {fmt} "
                        f"(state_precision={self.state_precision!r})")
            if not loading and v.device != p.device:
                return f"has {key!r} on {v.device} (expected its parameter's device, {p.device})"
            return None
        if loading or fmt == "fp32":
            return "fp32"
        if fmt == "8bit":
            return f"has {key!r} of dtype {v.dtype} (expected 8-bit codes, uint8: state_precision='8bit')"
        if v.shape != p.shape:
            return f"has {key!r} of shape {tuple(v.shape)} (expected its parameter's {tuple(p.shape)})"
        if v.dtype != torch.bfloat16:
            return f"has {key!r} of dtype {v.dtype} (expected torch.bfloat16: state_precision='bf16')"
        if v.device != p.device:
            return f"has {key!r} on {v.device} (expected its parameter's device, {p.device})"
        return None

    @staticmethod
    def _scales_problem(key: str, v: Tensor, p: Tensor, codes: Tensor, *, loading: bool) -> str | None:
        """What is wrong with `v` as the block scales of the 8-bit `codes` of param `p` (None: nothing). A
        DTensor param's codes have per-shard scales in the layout of `distributed.block_scales_layout`,
        which names the sharding: 8-bit state resumes only on the sharding it was saved with."""
        if _dist.is_dtensor(codes) != _dist.is_dtensor(p):
            return (f"has {key[:-len(_low.ABSMAX)]!r} as 8-bit codes that are "
                    f"{'a DTensor' if _dist.is_dtensor(codes) else 'a plain tensor'} for a "
                    f"{'sharded (DTensor)' if _dist.is_dtensor(p) else 'plain'} parameter: 8-bit state is blocked "
                    "per shard and resumes only on the sharding it was saved with; to change the sharding, "
                    "load it with that sharding into an optimizer with state_precision='fp32' and save again")
        if _dist.is_dtensor(p):
            (shards, blocks), _ = _dist.block_scales_layout(p, _lb_num_blocks)
            if tuple(v.shape) != (shards, blocks) or not _dist.is_dtensor(v):
                kind = "a DTensor" if _dist.is_dtensor(v) else "a plain tensor"
                return (f"has {key!r} of shape {tuple(v.shape)} ({kind}; expected a DTensor of shape "
                        f"{(shards, blocks)}: {blocks} block scales for each of the {shards} shards of "
                        f"{tuple(p.shape)} under placements {tuple(p.placements)}): 8-bit state is "
                        "blocked per shard and resumes only on the sharding it was saved with; to change "
                        "the sharding, load it with that sharding into an optimizer with "
                        "state_precision='fp32' (or 'bf16') and save again")
            return None
        if _dist.is_dtensor(v) or v.dim() != 1:
            return (f"has {key!r} of shape {tuple(v.shape)}{' (a DTensor)' if _dist.is_dtensor(v) else ''}: "
                    "block scales of a sharded (FSDP2) 8-bit state, and this parameter is not sharded; 8-bit "
                    "state resumes only on the sharding it was saved with (to change it, load it with that "
                    "sharding into an optimizer with state_precision='fp32' and save again)")
        local = codes if loading else impl_view(codes)
        if v.numel() != _lb_num_blocks(local.numel()):
            return (f"has {key!r} of {v.numel()} block scales (expected {_lb_num_blocks(local.numel())} for "
                    f"{local.numel()} codes)")
        return None

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

    def _counter_tensor(self, group: dict, key: str) -> Tensor:
        """The group's step counter `key` as its stored form (class docstring, "Step counters"): a 0-d
        float32 tensor, on the group's device with capturable=True, else on the CPU. A Python number (a
        checkpoint of an earlier version or of the upstream optimizer, a user's ``group["step"] = 0``) or
        a tensor of the other setting is converted, once."""
        value = group.get(key, 0)
        device = torch.device("cpu")
        if self.capturable and group["params"]:
            device = _dist.local(group["params"][0]).device
        if not isinstance(value, Tensor):
            value = torch.full((), float(value), dtype=torch.float32, device=device)
        elif value.device != device or value.dtype != torch.float32 or value.dim() != 0:
            value = value.detach().to(device=device, dtype=torch.float32).reshape(())
        else:
            return value
        group[key] = value
        return value

    def _advance_counter(self, group: dict, key: str, params: list[Tensor]) -> int | Tensor:
        """Add one to the group's step counter `key` (in place) and return its new value as the class
        computes its per-step scalars from it (torch's convention: advance, then use).

        - eager, host scalars: a Python int (reading the CPU counter is no sync);
        - under torch.compile: the counter as a float64 tensor, so the scalars derived from it are traced
          as tensor ops (Dynamo never guards on the count: no recompile per step), in the doubles the
          eager path computes;
        - capturable with an impl that reads device scalars (`_device_scalars`): the float32 device
          counter itself, advanced by ``found_inf == 0`` when AMP's skip is taken on the device."""
        value = self._counter_tensor(group, key)
        if torch.compiler.is_compiling():
            value.add_(1)
            return value.double()
        if self.capturable:
            found_inf = (self._amp_kwargs or {}).get("found_inf")
            if found_inf is None:
                value.add_(1)
            else:  # a skipped step must not advance it
                value.add_((found_inf.to(value.device, non_blocking=True) == 0).reshape(()))
            # a host-scalar impl runs capturable only on the CPU (`_check_capturable`): no sync to read it
            return value if self._device_scalars(params) else int(value.item())
        count = int(value.item()) + 1  # a CPU counter: read, then written back by a fill (cheaper than add_)
        value.fill_(count)
        return count

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
        # once per step, not per group (while compiling, nothing is recorded: see `_collect`)
        unchanged = None if torch.compiler.is_compiling() else self._state_unchanged()
        batches = [(group, *self._collect(group, unchanged)) for group in self.param_groups]
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        if self.skip_if_nonfinite:
            found_inf = _nonfinite_flag([g for _, _, gs in batches for g in gs], found_inf)
        if grad_scale is None and found_inf is None:
            self._advance_rounding(batches)
            self._update(batches)
            return loss
        if not self._begin_amp_step(batches, grad_scale, found_inf):
            return loss
        try:
            self._advance_rounding(batches)
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
        if sharded and found_inf is not None:
            # each rank found its own shards' inf/NaN: every rank must take the same skip decision (one
            # rank skipping alone would leave the shards of one tensor a step apart)
            found_inf = _dist.all_reduce_max_(found_inf.to(torch.float32, copy=True).reshape(()), grads)
        in_kernel = (bool(devices) and not self._reads_grads_before_dispatch()
                     and all(self._amp_in_kernel(self._runs(d, sharded)) for d in devices)
                     # fp16 params with stochastic rounding take the reference path (`_dispatch`)
                     and not (self._lowbit_on and self.stochastic_rounding
                              and any(g.dtype == torch.float16 for g in grads)))
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

    def _amp_in_kernel(self, fn: Callable[..., None]) -> bool:
        """Whether `fn` applies AMP's unscale and skip itself: an AMP-aware impl, unless low-precision
        state runs it on decoded copies (`lowstate.reference_step`), whose grads are not ``.grad``."""
        if self._lowbit_on and (not getattr(fn, "supports_lowbit", False) or torch.compiler.is_compiling()):
            return False
        return getattr(fn, "supports_amp", False)

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
        splits = [(device, dtype, part) for (device, dtype), idx in split_by_device_dtype(params).items()
                  for part in _dist.shard_splits(params, idx)]
        low = self._lowbit_on and bool(states)
        if low:  # one call per storage format (decided on the global tensor: the same on every rank)
            key = self._lowbit_states[0][0]
            by_fmt = [(device, dtype, [i for i in idx if self._state_format(params[i], key) == fmt], fmt)
                      for device, dtype, idx in splits for fmt in _low.PRECISIONS]
            splits = [(device, dtype, idx) for device, dtype, idx, _ in by_fmt if idx]
            fmts = [fmt for *_, idx, fmt in by_fmt if idx]
        elif self._lowbit_on:
            fmts = ["fp32"] * len(splits)
        for n_split, (device, dtype, idx) in enumerate(splits):
            impl = self.impl_for(device)
            fn = self._impls[impl]
            shard_ctx = contextlib.nullcontext()
            if _dist.is_dtensor(params[idx[0]]):
                impl, fn = self._shard_impl(impl, fn)
                numels = [params[i].numel() * (2 if params[i].is_complex() else 1) for i in idx]
                shard_ctx = _dist.shard_context(_dist.shard_groups(params[idx[0]]), device, numels,
                                                [params[i] for i in idx])
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
            if (impl in _ops.OPAQUE_IMPLS and torch.compiler.is_compiling() and self._per_tensor_reduction
                    and _dist.is_dtensor(params[idx[0]]) and _ops.op_for(type(self)) is not None):
                # the compiled op runs its kernel at run time, outside the shard context: its per-tensor
                # reduction would see only this rank's shard
                raise RuntimeError(f"{self._display_name}: impl={impl!r} inside torch.compile cannot finish its "
                                   "per-tensor reduction over sharded (DTensor, FSDP2) parameters; compile the "
                                   "step with impl='foreach', or run it eagerly")
            if self._lowbit_on:
                rounding = self._rounding_for(params, idx, fmts[n_split], states)
                if rounding.fmt == "fp32" and not rounding.param_sr:
                    pass  # full-precision state, nothing to round: the ordinary call
                elif getattr(fn, "supports_lowbit", False) and not torch.compiler.is_compiling():
                    with shard_ctx:
                        fn(sub_p, sub_g, *sub_s, **kwargs, **amp, lowbit=rounding)
                    continue
                else:  # the impl's fp32 update on decoded copies (`amp` is empty: see `_amp_in_kernel`)
                    def run(ps: list[Tensor], gs: list[Tensor], ss: list[list[Tensor]], impl=impl, fn=fn,
                            kwargs=kwargs, lr=lr) -> None:
                        if not (impl in _ops.OPAQUE_IMPLS and torch.compiler.is_compiling()
                                and _ops.run_as_op(type(self), impl, ps, gs, ss, dict(kwargs, lr=_as_float(lr))
                                                   if lr is not None else kwargs, {})):
                            fn(ps, gs, *ss, **kwargs)
                    dtypes32 = [self._state_dtype(params[i]) for i in idx]
                    with shard_ctx:
                        _low.reference_step(run, sub_p, sub_g, sub_s, rounding, dtypes32,
                                            chunked=not _dist.is_dtensor(params[idx[0]]))
                    continue
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
        """torch's loader, validated first, then every state tensor re-cast from the *saved* values to this
        impl's policy.

        Refused before anything changes (a ``ValueError`` naming the group or the saved param id and the
        key): another number of groups or of params in a group; group hyperparameters this optimizer
        refuses; a param's state missing a key, holding a key this optimizer does not know (a state_dict
        of another optimizer), or a tensor of another shape or kind than its param. Group keys the saved
        groups lack (upstream checkpoints have no ``maximize``...) keep their current values.

        torch casts floating state to the param's dtype, which would round fp32 state of bf16 params
        through bf16; copying from the saved tensors keeps it exact. Every tensor is copied, so two live
        optimizers never share a buffer (nor a counter) with each other or with the source dict.
        """
        # torch's pre-hooks first (they may rewrite the dict), then the checks on what will be loaded
        state_dict = state_dict.copy() if isinstance(state_dict, dict) else state_dict
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        self._check_loaded(state_dict)
        saved_state = state_dict["state"]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        previous = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        hooks = self._optimizer_load_state_dict_pre_hooks
        self._optimizer_load_state_dict_pre_hooks = type(hooks)()
        try:
            super().load_state_dict(state_dict)
        finally:
            self._optimizer_load_state_dict_pre_hooks = hooks
        for group, before in zip(self.param_groups, previous):
            for key, value in before.items():  # keys the checkpoint lacks keep this optimizer's values
                group.setdefault(key, value)
            for key, value in self._group_defaults.items():
                group.setdefault(key, value)
            for key in self._group_counters:  # never shared with the source dict; an int (older
                if isinstance(group.get(key), Tensor):  # checkpoints, upstream's) becomes the tensor form
                    group[key] = group[key].clone()
                self._counter_tensor(group, key)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid not in saved_state:
                continue
            for key, value in saved_state[pid].items():
                if not isinstance(value, Tensor):
                    continue
                if (value.is_floating_point() or value.is_complex()) and key not in self._scalar_state_keys:
                    self.state[p][key] = value.to(device=p.device, dtype=self._state_dtype(p), copy=True)
                else:  # counters and integer tensors stay where torch puts them, as copies
                    self.state[p][key] = self.state[p][key].clone()
            self._convert_loaded(p, saved_state[pid])
        self._impl_cache.clear()
        self.__dict__.pop("_state_checked", None)  # holds the replaced state tensors
        self.__dict__.pop("_state_map", None)

    def _convert_loaded(self, p: Tensor, saved: dict) -> None:
        """Store the loaded low-precision-capable state of `p` in this optimizer's format, from the saved
        tensors: 8-bit codes and bf16 kept as they are when the format matches, anything else decoded
        to fp32 and stored again (rounded to nearest; docs/lowbit.md §5)."""
        st = self.state[p]
        for key, signed in self._lowbit_states:
            v = saved.get(key)
            if not isinstance(v, Tensor):
                continue
            fmt = self._state_format(p, key)
            absmax = saved.get(key + _low.ABSMAX)
            if fmt == "8bit" and v.dtype == torch.uint8:  # (torch's loader cast the codes to p's dtype)
                st[key] = v.to(device=p.device, copy=True)
                st[key + _low.ABSMAX] = absmax.to(device=impl_view(p).device, dtype=torch.float32, copy=True)
            elif fmt == "bf16" and v.dtype == torch.bfloat16:
                st[key] = v.to(device=p.device, copy=True)
            elif fmt == "fp32" and v.dtype != torch.uint8:
                pass  # copied above in the state dtype
            else:
                local = v.to(p.device) if not _dist.is_dtensor(v) else v
                scales = None if absmax is None else _low.local_scales(absmax, local).to(impl_view(p).device)
                value = _low.decode(impl_view(local), scales, signed, self._state_dtype(p))
                if _dist.is_dtensor(p):
                    like = torch.zeros_like(p, dtype=value.dtype)
                    impl_view(like).copy_(value)
                    value = like
                self._new_state(p, key, value)
            if fmt != "8bit":
                st.pop(key + _low.ABSMAX, None)

    def _check_loaded(self, state_dict: Any) -> None:
        """Raise (before anything changes) if `state_dict` cannot be loaded here; see `load_state_dict`."""
        name = self._display_name
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"{name}: a state_dict is a dict with 'state' and 'param_groups', got "
                             f"{sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has a different number of parameter groups ({len(saved_groups)}, "
                             f"this {name} has {len(self.param_groups)})")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"loaded state dict contains a parameter group that doesn't match the size of "
                                 f"optimizer's group: group {gi} has {len(saved['params'])} params there, "
                                 f"{len(group['params'])} here")
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            merged = {**self._group_defaults, **{k: v for k, v in group.items() if k != "params"}, **saved,
                      "params": group["params"]}
            try:
                self._validate_group(merged)
                for key in self._group_counters:
                    _check_counter(name, key, merged.get(key, 0))
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"{name}: cannot load param group {gi} of the state dict: {exc}") from None
            spec = self._state_spec(merged)
            for pid, p in zip(saved["params"], group["params"]):
                st = state_dict["state"].get(pid)
                problem = self._state_problem(p, st if isinstance(st, dict) else {}, spec, loading=True)
                if problem is None and st is not None and not isinstance(st, dict):
                    problem = f"is a {type(st).__name__} (expected a dict)"
                if problem is not None:
                    raise ValueError(f"{name}: cannot load the state dict: the state of parameter {pid} (group "
                                     f"{gi}, shape {tuple(p.shape)}) {problem}; nothing was changed")


# ---------------------------------------------------------------------------------------------- overlap
_EXACT_OVERLAP_MAX = 1 << 22  # elements up to which an undecided layout is checked exactly (offsets enumerated)


def _offsets(t: Tensor) -> Tensor:
    """Every element's offset in `t`'s storage, in elements (for layouts no stride rule decides)."""
    span = sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1
    base = torch.arange(span, dtype=torch.int64)
    return torch.as_strided(base, t.shape, t.stride()).flatten() + t.storage_offset()


def _has_internal_overlap(t: Tensor) -> bool:
    """Whether two elements of `t` share memory (``expand``, ``as_strided`` with small strides)."""
    status = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: torch cannot tell (any non-contiguous)
    if status != 2:
        return status == 1
    reach = 0  # dims by increasing stride: each stride must step past everything the smaller dims reach
    for stride, size in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
        if stride <= reach:
            if t.numel() > _EXACT_OVERLAP_MAX:
                return True
            return _offsets(t).unique().numel() != t.numel()
        reach += (size - 1) * stride
    return False


def _storage_key(t: Tensor) -> tuple | None:
    """(device, storage address) of a plain tensor with memory, else None (meta, DTensor, empty)."""
    if type(t) not in _PLAIN_TYPES or t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # fake or functional tensors
        return None
    return (t.device, ptr) if ptr else None


def _byte_range(t: Tensor) -> tuple[int, int]:
    item = t.element_size()
    lo = t.storage_offset() * item
    return lo, lo + (sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1) * item


def _views_overlap(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors of one storage share an element (their byte ranges intersect)."""
    (alo, ahi), (blo, bhi) = _byte_range(a), _byte_range(b)
    if ahi <= blo or bhi <= alo:
        return False
    dense = all(t.numel() * t.element_size() == hi - lo for t, (lo, hi) in ((a, (alo, ahi)), (b, (blo, bhi))))
    if dense or a.element_size() != b.element_size() or max(a.numel(), b.numel()) > _EXACT_OVERLAP_MAX:
        return True
    # interleaved views (p[::2] and p[1::2]): compare the element offsets themselves
    return bool(torch.isin(_offsets(a), _offsets(b)).any())


def _check_no_overlap(name: str, params: list[Tensor], groups: list[dict]) -> None:
    """Refuse a param whose elements overlap each other or another param's (a view of another param):
    an in-place update would then apply twice to the shared memory, differently per impl. torch checks
    duplicates by identity only."""
    for i, p in enumerate(params):
        if _storage_key(p) is not None and _has_internal_overlap(p):
            raise ValueError(f"{name}: parameter {i} of the new group (shape {tuple(p.shape)}, stride "
                             f"{tuple(p.stride())}) has internally overlapping memory (e.g. made by .expand()): "
                             "an in-place update would apply several times to one element. Optimize a "
                             ".clone() (or .contiguous()) of it instead")
    by_storage: dict[tuple, list[tuple[int, int, bool, str, Tensor]]] = defaultdict(list)
    for gi, group in enumerate(groups):
        for j, q in enumerate(group["params"]):
            key = _storage_key(q)
            if key is not None:
                by_storage[key].append((*_byte_range(q), False, f"parameter {j} of group {gi}", q))
    new_keys = set()
    for i, p in enumerate(params):
        key = _storage_key(p)
        if key is not None:
            by_storage[key].append((*_byte_range(p), True, f"parameter {i} of the new group", p))
            new_keys.add(key)
    for key in new_keys:  # a sweep by start address: views of one flat buffer cost O(n log n), not O(n^2)
        active: list[tuple[int, int, bool, str, Tensor]] = []
        for entry in sorted(by_storage[key], key=lambda e: e[0]):
            lo, _, is_new, where, p = entry
            active = [a for a in active if a[1] > lo]
            for _, _, other_new, other_where, q in active:
                if (is_new or other_new) and _views_overlap(p, q):
                    first, second = (where, p), (other_where, q)
                    if not is_new:
                        first, second = second, first
                    raise ValueError(f"{name}: {first[0]} (shape {tuple(first[1].shape)}) overlaps in memory with "
                                     f"{second[0]} (shape {tuple(second[1].shape)}): they are views of one storage, "
                                     "so updating one changes the other. Optimize the base tensor once, or give "
                                     "each parameter its own memory (.clone())")
            active.append(entry)


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
    if not torch.compiler.is_compiling():  # Dynamo cannot trace attrgetter; it traces the loop below
        dtypes, devices = set(map(_dtype_of, tensors)), set(map(_device_of, tensors))
        if len(dtypes) == 1 and len(devices) == 1:  # the common case, in C
            return {(devices.pop(), dtypes.pop()): list(range(len(tensors)))}
    splits: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        splits[(t.device, t.dtype)].append(i)
    return splits


_device_of, _dtype_of = attrgetter("device"), attrgetter("dtype")


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
    first grad's device, computed without a host read (max|g| of each tensor is NaN/Inf iff it is).
    On DTensor (FSDP2) grads it reads this rank's shards, and returns a flag even when they are all
    empty: `_begin_amp_step` shares it over the shard group."""
    by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
    sharded = any(_dist.is_dtensor(g) for g in grads)
    for g in grads:
        g = impl_view(g)
        if g.numel():  # _foreach_norm(inf) raises on an empty tensor
            by_device[g.device].append(g)
    if not by_device and not sharded:
        return found_inf
    if not by_device:  # only empty shards here: still join the other ranks' reduction
        device = _dist.local(grads[0]).device
        flags = [torch.zeros((), dtype=torch.bool, device=device)]
    else:
        device = next(iter(by_device))
        flags = [(~torch.stack(torch._foreach_norm(gs, ord=float("inf"))).isfinite()).any().to(device,
                                                                                              non_blocking=True)
                 for gs in by_device.values()]
    flag = torch.stack(flags).any().float()
    if found_inf is not None:
        flag = torch.maximum(flag, found_inf.to(device, torch.float32, non_blocking=True).reshape(()))
    return flag


def params_of(model_or_params: torch.nn.Module | Iterable) -> Iterable:
    if isinstance(model_or_params, torch.nn.Module):
        return model_or_params.parameters()
    return model_or_params
