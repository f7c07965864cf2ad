"""Muon's two elementwise stages around Newton–Schulz (docs/spec.md §8; KellerJordan/Muon `muon.py`), each one
Triton launch per (device, dtype) group. Newton–Schulz itself stays on torch matmuls.

- momentum (`_muon_momentum_kernel`): ``g' = ±g``; ``buf.lerp_(g', 1 - momentum)``; ``u = g'.lerp(buf,
  momentum)`` (Nesterov, with the new buf) or ``buf``; ``updates = u`` rounded to the update buffer's
  dtype (bf16: Newton–Schulz's ``X = u.bfloat16()``). ``torch.lerp`` in fp32 is one fma per element on
  CPU (ATen `cpu/LerpKernel.cpp`, measured on torch 2.14 for both branches and every tail):
  ``fma(w, end - start, start)`` for ``|w| < 0.5``, else ``fma(w - 1, end - start, end)``; the kernel
  computes exactly that, so fp32 results are bit-identical to the reference on CPU. The branch is taken
  on the runtime weight (no recompile when momentum changes). Bytes per element: read g, buf, write
  buf, u: 14 B for fp32 grads and state with bf16 updates; 12 B with bf16 grads.
- apply (`_muon_apply_kernel`): ``u = round(float(update) · scale, update dtype)`` (upstream's
  ``u *= scale`` on the bf16 Newton–Schulz output, one rounding), ``p · (1 − lr·wd)`` (skipped when
  wd == 0: exact), ``fma(u, −lr, p)`` (``p.add_(u, alpha=-lr)`` on CPU). The per-tensor scale is read
  from a small device vector, cached by `multi_tensor.device_constants` while the scales do not change
  (they come from the shapes). A transposed (non-contiguous) update is read through a contiguous copy.
  Bytes per element: read p, u, write p: 10 B for fp32 params with bf16 updates.

Grads and update buffers are per-call lists (`multi_tensor.prepare_lists`): the cached table holds the
momentum buffers (momentum) or the params (apply).

Low-precision state (docs/lowbit.md §5): `_muon_momentum_lowbit_kernel` decodes the momentum buffer
(bf16, or 8-bit codes and their block's scale), runs the same fp32 lerps, and encodes it again (8-bit:
the new block absmax and codes to nearest; bf16: rounded stochastically with stream 1) in the same pass,
one quantization block per tile row (`kernels.lowbit`); Newton–Schulz's input is computed from the fp32
buffer before encoding, as the reference computes it on its decoded copy. `_muon_apply_kernel` with
``PARAM_SR`` writes bf16 / fp16 params rounded stochastically with stream 0.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import lowbit as lb
from . import multi_tensor as mt

BLOCK = 2048


@mt.device_fn
def _lerp(start, end, weight):
    """torch.lerp(start, end, weight) in fp32 with a scalar weight, as ATen's CPU kernel rounds it."""
    # a no-op compiled; interpreted, scalar arguments are Python floats, and `weight - 1` must be the fp32
    # subtraction torch does (exact for weight >= 0.5), not a double one rounded afterwards
    weight = tl.cast(weight, tl.float32)
    diff = end - start
    if (weight < 0.5) & (weight > -0.5):
        out = mt._fma(weight, diff, start)
    else:
        out = mt._fma(weight - 1.0, diff, end)
    return out


# ------------------------------------------------------------------------------------------ momentum
@mt.device_fn
def _muon_momentum_update(buf_addr, g_addr, u_addr, offs, mask, momentum, one_minus_momentum,
                          NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, S_KIND: tl.constexpr,
                          G_KIND: tl.constexpr, U_KIND: tl.constexpr, ALIGNED: tl.constexpr,
                          MASKED: tl.constexpr):
    """The reference's per-element op order on one block."""
    g = mt._load_f32(g_addr, offs, mask, G_KIND, ALIGNED, MASKED)
    if MAXIMIZE:
        g = -g
    buf = mt._load_f32(buf_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    buf = mt._round_to_kind(_lerp(buf, g, one_minus_momentum), S_KIND)  # Nesterov reads the stored buf
    mt._store_f32(buf_addr, offs, buf, mask, S_KIND, ALIGNED, MASKED)
    if NESTEROV:
        u = _lerp(g, buf, momentum)
    else:
        u = buf
    mt._store_f32(u_addr, offs, u, mask, U_KIND, ALIGNED, MASKED)


@triton.jit
def _muon_momentum_kernel(meta_ptr, dyn_ptrs_ptr, chunks_ptr,  # `multi_tensor.Launch`: dyn = (grad, update)
                          momentum,  # fp32 runtime args: a new momentum never recompiles
                          one_minus_momentum,  # 1 - momentum, in double on the host like the reference's scalar
                          NESTEROV: tl.constexpr,  # u = g.lerp(buf, momentum) instead of buf
                          MAXIMIZE: tl.constexpr,
                          S_KIND: tl.constexpr,  # dtype code of the momentum buffers (0 fp32, 1 fp16, 2 bf16)
                          G_KIND: tl.constexpr,  # dtype code of the grads (read only)
                          U_KIND: tl.constexpr,  # dtype code of the update buffers (bf16 for Newton-Schulz)
                          ALIGNED: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    t, row, offs, mask, full = mt._chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
    buf_addr = tl.load(row + 4)
    g_addr = tl.load(dyn_ptrs_ptr + 2 * t)
    u_addr = tl.load(dyn_ptrs_ptr + 2 * t + 1)
    if full:
        _muon_momentum_update(buf_addr, g_addr, u_addr, offs, mask, momentum, one_minus_momentum, NESTEROV,
                              MAXIMIZE, S_KIND, G_KIND, U_KIND, ALIGNED, False)
    else:
        _muon_momentum_update(buf_addr, g_addr, u_addr, offs, mask, momentum, one_minus_momentum, NESTEROV,
                              MAXIMIZE, S_KIND, G_KIND, U_KIND, ALIGNED, True)


def _triton_muon_momentum(grads: list[Tensor], momentum_buffers: list[Tensor], updates: list[Tensor], *,
                          momentum: float, nesterov: bool, maximize: bool) -> None:
    """Muon's momentum stage over a (device, dtype) group in one launch (a second one only for strided
    buffers): updates the buffers and writes each ``updates[i]`` whole; grads are only read."""
    preps = mt.prepare_lists([momentum_buffers], [grads, updates], names=("momentum_buffers", "grads", "updates"),
                          written=("momentum_buffers", "updates"))
    for launch in mt.launches(preps, BLOCK):
        s_kind, g_kind, u_kind = launch.prep.kinds
        launch(_muon_momentum_kernel, momentum=float(momentum), one_minus_momentum=1 - momentum,
               NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), S_KIND=s_kind, G_KIND=g_kind, U_KIND=u_kind)


@mt.device_fn
def _muon_momentum_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr, seed,
                                 step, momentum, one_minus_momentum, NESTEROV: tl.constexpr,
                                 MAXIMIZE: tl.constexpr, G_KIND: tl.constexpr, P_KIND: tl.constexpr,
                                 S_KIND: tl.constexpr, FMT: tl.constexpr, SIGNED0: tl.constexpr,
                                 ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """`_muon_momentum_update` on one tile of whole quantization blocks, the buffer in storage FMT; list 0
    of the table is the update buffers (P_KIND), list 1 the momentum buffers."""
    tensor_index = tl.load(aux_ptr + 2 * t)
    scale0 = tl.load(aux_ptr + 2 * t + 1)
    u_addr = tl.load(row + 4)
    g = mt._load_f32(g_addr, offs, mask, G_KIND, ALIGNED, MASKED)
    if MAXIMIZE:
        g = -g
    buf_addr, buf = lb.load_state(row, 1, offs, mask, blk, blk_mask, scale0, mag0_ptr, FMT, S_KIND, SIGNED0,
                                  ALIGNED, MASKED)
    buf = _lerp(buf, g, one_minus_momentum)  # fp32: the reference's decoded copy
    if NESTEROV:
        u = _lerp(g, buf, momentum)
    else:
        u = buf
    mt._store_f32(u_addr, offs, u, mask, P_KIND, ALIGNED, MASKED)
    if FMT == 1:
        _, r1, _, _ = lb.random_words(seed, step, tensor_index, offs)  # stream 1: state list 0
    else:
        r1 = 0
    lb.store_state(buf_addr, offs, buf, mask, blk, blk_mask, scale0, thr0_ptr, r1, FMT, S_KIND, SIGNED0, ALIGNED,
                   MASKED)


@triton.jit
def _muon_momentum_lowbit_kernel(meta_ptr, grad_ptrs_ptr, chunks_ptr,  # `multi_tensor.Launch`
                                 aux_ptr, mag0_ptr, thr0_ptr, seed, rng_step, rng_step_buf,  # `lowbit_launches`
                                 momentum, one_minus_momentum,
                                 NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                                 G_KIND: tl.constexpr,  # dtype code of the grads (read only)
                                 P_KIND: tl.constexpr,  # dtype code of the update buffers (list 0)
                                 S_KIND: tl.constexpr, FMT: tl.constexpr, PARAM_SR: tl.constexpr,
                                 SIGNED0: tl.constexpr, RNG_STEP_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr,
                                 ROW: tl.constexpr, BLOCK: tl.constexpr, QB: tl.constexpr):
    """`_muon_momentum_kernel` with a bf16 / 8-bit momentum buffer (docs/lowbit.md §5); PARAM_SR is
    unused (this stage writes no param)."""
    step = lb.rng_step(rng_step, rng_step_buf, RNG_STEP_ON_DEVICE)
    t, row, offs, mask, blk, blk_mask, full = lb.tile_coords(meta_ptr, chunks_ptr, ROW, BLOCK, QB)
    g_addr = tl.load(grad_ptrs_ptr + t)
    if full:
        _muon_momentum_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr,
                                     seed, step, momentum, one_minus_momentum, NESTEROV, MAXIMIZE, G_KIND, P_KIND,
                                     S_KIND, FMT, SIGNED0, ALIGNED, False)
    else:
        _muon_momentum_lowbit_update(t, row, g_addr, offs, mask, blk, blk_mask, aux_ptr, mag0_ptr, thr0_ptr,
                                     seed, step, momentum, one_minus_momentum, NESTEROV, MAXIMIZE, G_KIND, P_KIND,
                                     S_KIND, FMT, SIGNED0, ALIGNED, True)


def _triton_muon_momentum_lowbit(grads: list[Tensor], momentum_buffers: list[Tensor], updates: list[Tensor], *,
                                 momentum: float, nesterov: bool, maximize: bool, lowbit) -> None:
    """`_triton_muon_momentum` with the buffers in ``lowbit.fmt`` (bf16 or 8-bit), one launch per group
    (a second one only for strided tensors, through contiguous stand-ins)."""
    g_dtype = grads[0].dtype if grads else torch.float32
    for launch, args in lb.lowbit_launches(updates, grads, [momentum_buffers], lowbit, BLOCK, grad_dtype=g_dtype):
        launch(_muon_momentum_lowbit_kernel, **args, momentum=float(momentum), one_minus_momentum=1 - momentum,
               NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), G_KIND=mt.dtype_kind(g_dtype),
               SIGNED0=bool(lowbit.signed[0]))


# ------------------------------------------------------------------------------------------ apply
@mt.device_fn
def _muon_apply_update(p_addr, u_addr, offs, mask, scale, neg_lr, decay, r, DECAY: tl.constexpr,
                       P_KIND: tl.constexpr, U_KIND: tl.constexpr, PARAM_SR: tl.constexpr, ALIGNED: tl.constexpr,
                       MASKED: tl.constexpr):
    """The reference's per-element op order on one block; ``scale`` is this tensor's. PARAM_SR: the bf16
    param is rounded stochastically with the words `r`."""
    u = mt._round_to_kind(mt._load_f32(u_addr, offs, mask, U_KIND, ALIGNED, MASKED) * scale, U_KIND)
    p = mt._load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    if DECAY:
        p = p * decay
    p = mt._fma(u, neg_lr, p)
    lb.store_param(p_addr, offs, p, mask, r, P_KIND, PARAM_SR, ALIGNED, MASKED)


@triton.jit
def _muon_apply_kernel(meta_ptr, dyn_ptrs_ptr, chunks_ptr,  # `multi_tensor.Launch`: dyn = Newton-Schulz output
                       scales_ptr,  # fp32 [n]: per-tensor scale max(1, rows/cols)**0.5, cached on the device
                       neg_lr,  # fp32 runtime args: -lr and 1 - lr*wd (host doubles, as the reference's scalars)
                       decay,
                       tidx_ptr, seed, rng_step, rng_step_buf,  # PARAM_SR: the generator's key (per tensor)
                       DECAY: tl.constexpr,  # weight_decay != 0 (the multiply by exactly 1 is skipped otherwise)
                       P_KIND: tl.constexpr,  # dtype code of params (0 fp32, 1 fp16, 2 bf16)
                       U_KIND: tl.constexpr,  # dtype code of the updates (bf16, or the params')
                       PARAM_SR: tl.constexpr,  # bf16 / fp16 params rounded stochastically (stream 0)
                       RNG_STEP_ON_DEVICE: tl.constexpr,
                       ALIGNED: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    t, row, offs, mask, full = mt._chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
    p_addr = tl.load(row + 4)
    u_addr = tl.load(dyn_ptrs_ptr + t)
    scale = tl.load(scales_ptr + t)
    if PARAM_SR:
        step = lb.rng_step(rng_step, rng_step_buf, RNG_STEP_ON_DEVICE)
        r, _, _, _ = lb.random_words(seed, step, tl.load(tidx_ptr + t), offs)
    else:
        r = 0
    if full:
        _muon_apply_update(p_addr, u_addr, offs, mask, scale, neg_lr, decay, r, DECAY, P_KIND, U_KIND, PARAM_SR,
                           ALIGNED, False)
    else:
        _muon_apply_update(p_addr, u_addr, offs, mask, scale, neg_lr, decay, r, DECAY, P_KIND, U_KIND, PARAM_SR,
                           ALIGNED, True)


def _triton_muon_apply(params: list[Tensor], updates: list[Tensor], *, scales: list[float], lr: float,
                       weight_decay: float, lowbit=None) -> None:
    """Muon's update stage over a (device, dtype) group in one launch (a second one only for strided
    params): ``p = p·(1 − lr·wd) − lr·round(u·scale)``. ``updates[i]`` has ``params[i]``'s numel (any
    shape, e.g. the 2-D Newton–Schulz output of a conv weight) and may be non-contiguous. ``lowbit``
    (`fused_optim.lowstate.Rounding`, aligned with `params`): bf16 / fp16 params with ``param_sr`` are rounded
    stochastically (stream 0 of the generator, element index row-major)."""
    if len(scales) != len(params):
        raise ValueError(f"Triton launcher: list lengths differ (params {len(params)}, scales {len(scales)})")
    sr = lowbit is not None and lowbit.param_sr and bool(params) and params[0].dtype in lb._SR_DTYPES
    step = lowbit.step if sr else 0
    on_device = isinstance(step, Tensor)
    preps = mt.prepare_lists([params], [updates], names=("params", "updates"), written=("params",))
    for launch in mt.launches(preps, BLOCK, tag="muon_apply"):  # per-call list: the updates, not grads
        scales_t = mt.device_constants([float(scales[i]) for i in launch.prep.index], torch.float32, launch.device)
        tidx = (mt.device_constants([int(lowbit.tensor_index[i]) for i in launch.prep.index], torch.int64,
                                    launch.device) if sr else launch.unused)
        launch(_muon_apply_kernel, scales_ptr=scales_t, neg_lr=-float(lr), decay=1 - lr * weight_decay,
               tidx_ptr=tidx, seed=int(lowbit.seed) if sr else 0, rng_step=0 if on_device else int(step),
               rng_step_buf=step.to(launch.device) if on_device else launch.unused, DECAY=weight_decay != 0,
               U_KIND=launch.prep.kinds[1], PARAM_SR=sr, RNG_STEP_ON_DEVICE=on_device)
