"""The `impl="native"` functional steps: thin launchers of the compiled ops in csrc/.

Each has exactly its reference's signature (`_forloop_x` in the optimizer's module; for the composites'
fused parts, `_forloop_lookahead_sync`, `_forloop_sam_*`, and the two halves of `_forloop_muon` around
Newton–Schulz that `muon._fused_muon` calls) and calls one op
(two for the optimizers with a per-tensor reduction: `multi_tensor_stats`, then the update, which
reads the reduction from the device buffer: no `.item()`, no host sync). Op schemas and semantics:
csrc/ops_list.h and, for the elementwise rules, their declarations in csrc/math/<name>.h.

The four update launchers are AMP-aware (`fused_optim.declaration.mark_amp`): with the keyword-only
`grad_scale` (a 1-element fp32 tensor on the params' device) the kernels divide every grad by it,
rounded to the grad's dtype exactly as torch's in-place unscale stores it, write that value back into
the grads (non-contiguous ones included) and use it, the reductions included; with `found_inf != 0`
they write nothing at all (params, state, grads), reading the flag on the device. They also take
device scalars (``supports_tensor_lr``, ``supports_capturable``): ``lr``, Gravity's ``beta_hat`` and
Adan's bias corrections may be 0-d tensors, and Adan takes ``first_step``; on CUDA the kernels read
them from device memory (no host sync, so a step can be captured in a CUDA graph), on the CPU from the
CPU tensor, and derive the other scalars from them in fp32 as the Triton kernels do
(`fused_optim._scalars.device_scalar`, shared with the Triton launcher).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from torch import Tensor

from ._scalars import device_scalar
from .declaration import mark_amp as supports_amp  # the leaf module: the kernel layer imports no API

__all__ = ["native_elementwise", "_native_gravity", "_native_lion", "_native_adan", "_native_gradient_equilibrium",
           "_native_lookahead_sync", "_native_sam_norms", "_native_sam_perturb", "_native_sam_restore",
           "_native_muon_momentum", "_native_muon_momentum_lowbit", "_native_muon_apply", "_native_neuro_optima"]


def _ops():
    from . import _ext  # imported on the first native step: `import fused_optim` stays cheap

    return _ext.ops()


def _finish_sharded(stats: Tensor, params: list[Tensor], col: int, op: str) -> Tensor:
    """FSDP2 (DTensor local shards, fused_optim/distributed.py): finish column `col` of the per-tensor
    stats over the shard group with ONE all-reduce; a no-op without an active shard context. For the
    sum column the result is rescaled by local/global numel, because the kernel divides by the local
    element count and must get the global mean."""
    from .distributed import global_numels, host_values_to, reduce_per_tensor

    index = list(range(len(params)))
    numels = global_numels(index)
    if numels is None:
        return stats
    vals = torch.stack(reduce_per_tensor(list(stats[:, col].unbind()), index, op))
    if op == "sum":
        local = host_values_to([t.numel() for t in params], torch.float64, stats.device)
        total = host_values_to(numels, torch.float64, stats.device).clamp_min(1)
        vals = vals.double() * local / total
    out = stats.clone()
    out[:, col] = vals.to(stats.dtype)
    return out


@supports_amp
def _native_gravity(params: list[Tensor], grads: list[Tensor], vs: list[Tensor], *, lr: float | Tensor,
                    beta_hat: float | Tensor, maximize: bool, grad_scale: Tensor | None = None,
                    found_inf: Tensor | None = None, lowbit=None) -> None:
    """``lowbit``: a `fused_optim.lowstate.Rounding` (`_lowbit_step`: the op ``gravity_lowbit_``). The per-tensor
    max|g| is reduced once over the whole split, before the rows are divided between the op and the
    reference path (an FSDP2 split's shard reduction sees every tensor, on every rank alike)."""
    if not params:  # the dispatcher needs a tensor to pick the backend
        return
    ops = _ops()
    device = params[0].device
    lr, lr_t = device_scalar(lr, device)
    beta_hat, beta_hat_t = device_scalar(beta_hat, device)
    with torch.no_grad():
        # the reduction sees the unscaled grads the update then writes back (it only reads them)
        stats = _finish_sharded(ops.multi_tensor_stats(grads, None, 0.0, maximize, grad_scale), params, 0, "max")
    tail = (lr, beta_hat, maximize)
    if _lowbit_active(lowbit):
        def fp32_step(ps, gs, ss, rows):
            ops.gravity_(ps, gs, *ss, _rows_of(stats, rows), *tail, None, None, lr_t, beta_hat_t)

        def lowbit_op(ps, gs, ss, low_args, grad_scale, found_inf, rows):
            ops.gravity_lowbit_(ps, gs, *ss, *low_args, _rows_of(stats, rows), *tail, grad_scale, found_inf, lr_t,
                                beta_hat_t)

        _lowbit_step(fp32_step, lowbit_op, params, grads, [vs], lowbit, grad_scale, found_inf)
        return
    with torch.no_grad():
        ops.gravity_(params, grads, vs, stats, *tail, grad_scale, found_inf, lr_t, beta_hat_t)


# ------------------------------------------------------------------ low-precision state (docs/lowbit.md §5)
_STATE_FORMATS = {"fp32": 0, "bf16": 1, "8bit": 2}
#: param dtypes the lowbit ops take (fp32 math); float64 params run the reference path
_LOWBIT_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _lowbit_active(lowbit) -> bool:
    """Whether a `Rounding` asks for anything beyond the fp32 op: bf16 / 8-bit state or rounded params."""
    return lowbit is not None and (lowbit.fmt != "fp32" or lowbit.param_sr)


@functools.cache
def _lowbit_tables(signed: tuple[bool, ...], device: torch.device = torch.device("cpu")) -> Tensor:
    """The 8-bit maps of the state lists as the lowbit ops read them: [states, 2, 256] fp32 on `device`, per
    list its magnitudes then its thresholds (`fused_optim.lowbit.quant_tables`, zero-padded)."""
    from .lowbit import quant_tables

    out = torch.zeros(len(signed), 2, 256, dtype=torch.float32)
    for j, sgn in enumerate(signed):
        mags, thr = quant_tables(sgn)
        out[j, 0, :mags.numel()] = mags
        out[j, 1, :thr.numel()] = thr
    return out.to(device)


def _lowbit_in_op(params: list[Tensor], grads: list[Tensor], states, i: int, own_grad_dtype: bool = False) -> bool:
    """Whether tensor `i` runs in a lowbit op: on the CPU or CUDA, an fp32-math param dtype, dense row-major
    storage everywhere (the generator's element index is the flat row-major index). `own_grad_dtype`: the
    grads (Muon's: grads, or updates) may have any fp32-math dtype of their own."""
    p, g = params[i], grads[i]
    grad_ok = g.dtype in _LOWBIT_PARAM_DTYPES if own_grad_dtype else g.dtype == p.dtype
    return (p.device.type in ("cpu", "cuda") and p.dtype in _LOWBIT_PARAM_DTYPES and grad_ok
            and p.is_contiguous() and g.is_contiguous() and all(s[i].is_contiguous() for s in states))


def _lowbit_step(fp32_step: Callable, lowbit_op: Callable, params: list[Tensor], grads: list[Tensor],
                 states, low, grad_scale: Tensor | None, found_inf: Tensor | None, *, own_grad_dtype: bool = False,
                 dtype_of: list[Tensor] | None = None) -> None:
    """One step under `low` (a `fused_optim.lowstate.Rounding`): the tensors a lowbit op takes
    (`_lowbit_in_op`) in one pass of it, ``lowbit_op(params, grads, states, lowbit_args, grad_scale,
    found_inf, rows)``; the others (float64, other layouts) through `fused_optim.lowstate.reference_step`
    over ``fp32_step(params, grads, states, rows)``, the same bits. ``rows``: the positions of the lists a
    call holds in the launcher's (a per-tensor value computed over the whole split, Gravity's max|g|, is
    picked with it). AMP: on the reference path found_inf is read on the host (a skip leaves everything
    untouched) and the grads unscaled in place first. `own_grad_dtype`: see `_lowbit_in_op`; `dtype_of`:
    the tensors whose dtype gives the state's fp32-mode dtype (default: the params)."""
    from . import lowstate

    n = len(params)
    fast = [i for i in range(n) if _lowbit_in_op(params, grads, states, i, own_grad_dtype)]
    slow = sorted(set(range(n)) - set(fast))
    if slow:
        if found_inf is not None and bool(found_inf.item()):
            return
        if grad_scale is not None:
            gs = [grads[i] for i in slow]
            torch._foreach_div_(gs, grad_scale.to(gs[0].device))
        sub = low.take(slow)
        like = params if dtype_of is None else dtype_of
        dtype32 = [torch.float32 if like[i].dtype in (torch.bfloat16, torch.float16) else like[i].dtype
                   for i in slow]
        done = [0]  # reference_step calls in order over consecutive runs of the slow rows

        def call(ps, gs, ss):
            rows = slow[done[0]:done[0] + len(ps)]
            done[0] += len(ps)
            fp32_step(ps, gs, ss, rows)

        with torch.no_grad():
            lowstate.reference_step(call, [params[i] for i in slow], [grads[i] for i in slow],
                                    [[s[i] for i in slow] for s in states], sub, dtype32)
    if not fast:
        return
    sub = low if len(fast) == n else low.take(fast)
    device = params[fast[0]].device
    # a capturable step's counter is a tensor: the op reads it where it lives (on CUDA: no sync)
    step, step_tensor = ((0, sub.step.to(device, torch.float32).reshape(1)) if isinstance(sub.step, Tensor)
                         else (sub.step, None))
    fmt = _STATE_FORMATS[sub.fmt]
    absmax = [a for per_list in sub.absmax for a in per_list] if sub.fmt == "8bit" else []
    tables = _lowbit_tables(tuple(bool(x) for x in sub.signed), device) if sub.fmt == "8bit" else _NO_TABLES
    low_args = (absmax, tables, [int(bool(x)) for x in sub.signed], fmt, bool(sub.param_sr), int(sub.seed), step,
                step_tensor, list(sub.tensor_index))
    pick = (lambda xs: xs) if len(fast) == n else (lambda xs: [xs[i] for i in fast])
    with torch.no_grad():
        lowbit_op(pick(params), pick(grads), [pick(s) for s in states], low_args, grad_scale, found_inf, fast)


_NO_TABLES = torch.zeros(0, dtype=torch.float32)


def _rows_of(t: Tensor, rows: list[int]) -> Tensor:
    """Rows `rows` of `t`: a view when they are consecutive (the usual case: every row, or one run; no
    host-to-device index copy, so nothing a CUDA graph capture refuses), else a gather."""
    if rows and rows == list(range(rows[0], rows[0] + len(rows))):
        return t[rows[0]:rows[0] + len(rows)]
    return t[rows]


def native_elementwise(rule: str):
    """The launcher of the elementwise op ``fused_optim::<rule>_`` (one line of csrc/math/elementwise_rules.h;
    docs/design.md, "Adding a native elementwise op"): ``launcher(params, grads, *states, maximize,
    grad_scale=None, found_inf=None, **scalars)``, `scalars` the floats and flags the rule declares, by name.
    The declaration is read from the op's schema on the first call. A scalar the rule lets be a device
    tensor (its ``<name>_tensor`` argument) may be a 0-d tensor (capturable, tensor lr). AMP-aware
    (`supports_amp`'s contract). ``lowbit``: a `fused_optim.lowstate.Rounding` (`_lowbit_step`: the op
    ``<rule>_lowbit_``). Nothing here is specific to a rule."""
    layout: list[tuple] = []  # (number of state lists, float names, flag names, tensor-scalar names, all names)

    def read_layout() -> tuple:
        from . import _ext

        args = getattr(_ext.ops(), f"{rule}_").default._schema.arguments
        names, kinds = [a.name for a in args], [str(a.type) for a in args]
        m = names.index("maximize")  # floats and flags come before it, the tensor scalars after found_inf
        scalars = [n for n, k in zip(names[:m], kinds[:m]) if k == "float"]
        flags = [n for n, k in zip(names[:m], kinds[:m]) if k == "bool"]
        tensors = [n[:-len("_tensor")] for n in names[names.index("found_inf") + 1:]]
        return kinds.count("List[Tensor]") - 2, scalars, flags, tensors, set(scalars) | set(flags)

    def launcher(params: list[Tensor], grads: list[Tensor], *states: list[Tensor], maximize: bool,
                 grad_scale: Tensor | None = None, found_inf: Tensor | None = None, lowbit=None, **kwargs) -> None:
        if not params:  # the dispatcher needs a tensor to pick the backend
            return
        ops = _ops()  # loads the extension
        if not layout:
            layout.append(read_layout())
        n_states, scalars, flags, tensors, expected = layout[0]  # read once: this runs every step
        if len(states) != n_states or kwargs.keys() != expected:
            raise TypeError(f"native {rule}: expected {n_states} state lists and the keyword arguments "
                            f"{sorted(expected)}, got {len(states)} and {sorted(kwargs)}")
        device = params[0].device
        values = dict(kwargs)
        tensor_args = []
        for name in tensors:
            values[name], t = device_scalar(kwargs[name], device)
            tensor_args.append(t)
        for name in scalars:
            if isinstance(values[name], Tensor):
                raise TypeError(f"native {rule}: {name} must be a float (only {tensors} may be tensors)")
        tail = (*(values[n] for n in scalars), *(bool(values[n]) for n in flags), maximize)
        if _lowbit_active(lowbit):
            def fp32_step(ps, gs, ss, rows):
                launcher(ps, gs, *ss, maximize=maximize, **kwargs)

            def lowbit_op(ps, gs, ss, low_args, grad_scale, found_inf, rows):
                getattr(ops, f"{rule}_lowbit_")(ps, gs, *ss, *low_args, *tail, grad_scale, found_inf, *tensor_args)

            _lowbit_step(fp32_step, lowbit_op, params, grads, states, lowbit, grad_scale, found_inf)
            return
        with torch.no_grad():
            getattr(ops, f"{rule}_")(params, grads, *states, *tail, grad_scale, found_inf, *tensor_args)

    launcher.__name__ = launcher.__qualname__ = f"_native_{rule}"
    launcher.__doc__ = f"The native elementwise op fused_optim::{rule}_ (native_elementwise)."
    return launcher


# Lion (docs/spec.md §2): the rule of csrc/math/lion.h
_native_lion = supports_amp(native_elementwise("lion"))


@supports_amp
def _native_adan(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 exp_avg_diffs: list[Tensor], neg_pre_grads: list[Tensor], *, lr: float | Tensor, beta1: float,
                 beta2: float, beta3: float, bias_correction1: float | Tensor, bias_correction2: float | Tensor,
                 bias_correction3_sqrt: float | Tensor, eps: float, weight_decay: float, no_prox: bool,
                 clip: float | Tensor, maximize: bool, grad_scale: Tensor | None = None,
                 found_inf: Tensor | None = None, first_step: Tensor | None = None, lowbit=None) -> None:
    """`first_step` (capturable): a 0-d tensor, nonzero at the group's first step, when the class leaves
    ``neg_pre_grad = -clip·g`` to the kernel (it is then read on the device, like the bias corrections).
    ``lowbit``: a `fused_optim.lowstate.Rounding` (`_lowbit_step`: the op ``adan_lowbit_``)."""
    if not params:
        return
    if _lowbit_active(lowbit):
        def fp32_step(ps, gs, ss, rows):
            _native_adan(ps, gs, *ss, lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, bias_correction1=bias_correction1,
                         bias_correction2=bias_correction2, bias_correction3_sqrt=bias_correction3_sqrt, eps=eps,
                         weight_decay=weight_decay, no_prox=no_prox, clip=clip, maximize=maximize,
                         first_step=first_step)
    if len({isinstance(b, Tensor) for b in (bias_correction1, bias_correction2, bias_correction3_sqrt)}) > 1:
        raise TypeError("native Adan: pass the three bias corrections all as floats or all as 0-d tensors")
    device = params[0].device
    lr, lr_t = device_scalar(lr, device)
    bc1, bc1_t = device_scalar(bias_correction1, device)
    bc2, bc2_t = device_scalar(bias_correction2, device)
    bc3_sqrt, bc3_t = device_scalar(bias_correction3_sqrt, device)
    first_t = None if first_step is None else device_scalar(first_step, device)[1]
    if first_step is not None and first_t is None:  # a CPU flag for accelerator params, read on the host
        first_t = torch.full((), float(first_step), dtype=torch.float32, device=device)
    if isinstance(clip, Tensor):
        clip_t = clip.reshape(1).to(device=params[0].device, dtype=torch.float32)  # no copy when it is already so
    elif clip == 1.0:
        clip_t = None  # clipping off: the kernel multiplies by 1, exactly like the reference
    else:
        clip_t = torch.full((1,), clip, dtype=torch.float32, device=params[0].device)
    head = (lr, beta1, beta2, beta3, bc1, bc2, bc3_sqrt, eps, weight_decay, no_prox, clip_t, maximize)
    tail = (lr_t, bc1_t, bc2_t, bc3_t, first_t)
    states = (exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads)
    if _lowbit_active(lowbit):
        def lowbit_op(ps, gs, ss, low_args, grad_scale, found_inf, rows):
            _ops().adan_lowbit_(ps, gs, *ss, *low_args, *head, grad_scale, found_inf, *tail)

        _lowbit_step(fp32_step, lowbit_op, params, grads, states, lowbit, grad_scale, found_inf)
        return
    with torch.no_grad():
        _ops().adan_(params, grads, *states, *head, grad_scale, found_inf, *tail)


@supports_amp
def _native_gradient_equilibrium(params: list[Tensor], grads: list[Tensor], *, lr: float | Tensor,
                                 weight_decay: float, maximize: bool, grad_scale: Tensor | None = None,
                                 found_inf: Tensor | None = None) -> None:
    if not params:
        return
    ops = _ops()
    lr, lr_t = device_scalar(lr, params[0].device)
    with torch.no_grad():
        # the mean is of g + wd*p (L2 decay), so the reduction sees the params as addends
        stats = ops.multi_tensor_stats(grads, params if weight_decay != 0 else None, weight_decay, maximize,
                                       grad_scale)
        stats = _finish_sharded(stats, params, 1, "sum")
        ops.gradient_equilibrium_(params, grads, stats, lr, weight_decay, maximize, grad_scale, found_inf, lr_t)


# the per-tensor reductions are finished over FSDP2 shard groups (`_finish_sharded`)
_native_gravity.shard_aware = True
_native_gradient_equilibrium.shard_aware = True
for _fn in (_native_gravity, _native_lion, _native_adan, _native_gradient_equilibrium):
    # `lr` may be a 0-d tensor, read by the kernel (no .item(): FusedOptimizer._dispatch passes it as is)
    _fn.supports_tensor_lr = True
    # capturable (FusedOptimizer docstring): every per-step scalar may be a device tensor, read in the kernel
    _fn.supports_capturable = True


# ------------------------------------------------------------------ composites' fused parts
def _native_lookahead_sync(params: list[Tensor], slows: list[Tensor], *, alpha: float) -> None:
    """Lookahead's sync (docs/spec.md §5) in one op: ``p = p*alpha + (1-alpha)*slow``, then ``slow = p``."""
    if not params:
        return
    with torch.no_grad():
        _ops().lookahead_sync_(params, slows, alpha)


def _native_sam_norms(params: list[Tensor], grads: list[Tensor], *, adaptive: bool) -> Tensor:
    """Per-tensor L2 norms of ``(|p| if adaptive else 1) * g`` (docs/spec.md §6) in one reduction: a 1-D tensor on
    the params' device, float32 (float64 for float64 params, as the reference's norms)."""
    if not params:
        return torch.zeros(0, dtype=torch.float32)
    with torch.no_grad():
        return _ops().multi_tensor_l2norm(grads, params if adaptive else None)


def _native_sam_perturb(params: list[Tensor], grads: list[Tensor], old_params: list[Tensor], *, scale: Tensor,
                        adaptive: bool) -> None:
    """``old = p``; ``p += ((p*p if adaptive else 1) * g) * scale``; `scale` stays on the device (read by the
    kernel: no host sync)."""
    if not params:
        return
    dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    with torch.no_grad():
        _ops().sam_perturb_(params, grads, old_params, scale.to(device=params[0].device, dtype=dtype), adaptive)


def _native_sam_restore(params: list[Tensor], old_params: list[Tensor]) -> None:
    """``p = old``, bit for bit."""
    if not params:
        return
    with torch.no_grad():
        _ops().multi_tensor_copy_(params, old_params)


def _native_muon_momentum(grads: list[Tensor], momentum_buffers: list[Tensor], updates: list[Tensor], *,
                          momentum: float, nesterov: bool, maximize: bool) -> None:
    """Muon before Newton-Schulz (docs/spec.md §8): ``buf.lerp_(g, 1 - momentum)``; ``updates[i]`` = the Nesterov
    ``g.lerp(buf, momentum)`` (or buf), rounded to its dtype. grads are never written."""
    if not grads:
        return
    with torch.no_grad():
        _ops().muon_momentum_(grads, momentum_buffers, updates, momentum, nesterov, maximize)


def _native_muon_apply(params: list[Tensor], updates: list[Tensor], *, scales: list[float], lr: float,
                       weight_decay: float, lowbit=None) -> None:
    """Muon after Newton-Schulz (docs/spec.md §8): ``u = updates[i] * scales[i]`` (one rounding to u's dtype),
    ``p.mul_(1 - lr*wd)``, ``p.add_(u, alpha=-lr)``. ``lowbit`` (a `fused_optim.lowstate.Rounding` with
    ``param_sr``): bf16 / fp16 params rounded stochastically in the pass (the op ``muon_apply_lowbit_``)."""
    if not params:
        return
    scales = [float(s) for s in scales]
    if lowbit is not None and lowbit.param_sr and params[0].dtype in (torch.bfloat16, torch.float16):
        low = dataclasses.replace(lowbit, fmt="fp32", signed=(), absmax=())  # no state in this stage

        def fp32_step(ps, us, ss, rows):
            _ops().muon_apply_(ps, us, [scales[i] for i in rows], lr, weight_decay)

        def lowbit_op(ps, us, ss, low_args, grad_scale, found_inf, rows):
            _ops().muon_apply_lowbit_(ps, us, *low_args, [scales[i] for i in rows], lr, weight_decay)

        _lowbit_step(fp32_step, lowbit_op, params, updates, [], low, None, None, own_grad_dtype=True)
        return
    with torch.no_grad():
        _ops().muon_apply_(params, updates, scales, lr, weight_decay)


def _native_muon_momentum_lowbit(grads: list[Tensor], momentum_buffers: list[Tensor], updates: list[Tensor], *,
                                 momentum: float, nesterov: bool, maximize: bool, lowbit) -> None:
    """`_native_muon_momentum` with the buffers in ``lowbit.fmt`` (bf16 or 8-bit), decoded, updated and
    encoded in one pass (the op ``muon_momentum_lowbit_``); other layouts and float64 grads through
    `fused_optim.lowstate.reference_step` over the fp32 op, the same bits."""
    if not grads:
        return
    low = dataclasses.replace(lowbit, param_sr=False)  # this stage writes no param
    scalars = (momentum, nesterov, maximize)

    def fp32_step(us, gs, ss, rows):
        _ops().muon_momentum_(gs, ss[0], us, *scalars)

    def lowbit_op(us, gs, ss, low_args, grad_scale, found_inf, rows):
        _ops().muon_momentum_lowbit_(gs, ss[0], us, *low_args, *scalars)

    # the lowbit pass's list 0 is the Newton-Schulz input (bf16, written), list 1 the grads
    _lowbit_step(fp32_step, lowbit_op, updates, grads, [momentum_buffers], low, None, None, own_grad_dtype=True,
                 dtype_of=grads)


def _native_neuro_optima(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                         exp_avg_sqs: list[Tensor], exp_avg_diffs: list[Tensor], prev_grads: list[Tensor], *,
                         lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                         maximize: bool, lowbit=None) -> None:
    """NeuroOptima's core (docs/spec.md §7) in one op, the reference's op order. ``lowbit``: a
    `fused_optim.lowstate.Rounding` (`_lowbit_step`: the op ``neuro_optima_lowbit_``)."""
    if not params:
        return
    scalars = (lr, beta1, beta2, eps, weight_decay, maximize)
    if _lowbit_active(lowbit):
        def fp32_step(ps, gs, ss, rows):
            _ops().neuro_optima_(ps, gs, *ss, *scalars)

        def lowbit_op(ps, gs, ss, low_args, grad_scale, found_inf, rows):
            _ops().neuro_optima_lowbit_(ps, gs, *ss, *low_args, *scalars)

        _lowbit_step(fp32_step, lowbit_op, params, grads, [exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads],
                     lowbit, None, None)
        return
    with torch.no_grad():
        _ops().neuro_optima_(params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads, lr, beta1, beta2, eps,
                             weight_decay, maximize)


_native_neuro_optima.supports_lowbit = True  # the composite core has no declared impls to say it
