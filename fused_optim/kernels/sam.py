"""SAM's fused parts (docs/spec.md §6; davda54 `sam.py`): per-tensor gradient norms, the perturbation and the
exact restore, each a multi-tensor Triton launch per (device, dtype) group.

- norms: one partials launch over every tensor (`reduce._partials_kernel`, sum of g² or of (|p|·g)²,
  deterministic, no atomics), then `_sam_norms_finish_kernel`, one small program per tensor, sums the
  tensor's partials and takes the square root into a 1-D fp32 device tensor (0 for a zero-size
  tensor). Bytes per element: read g (4 B fp32), adaptive also p (8 B).
- perturb: ``old = p`` (the raw bits), then davda54's ``p += ((p**2 if adaptive else 1) * g) * scale``
  with ``scale`` read from device memory (``rho / (norm + 1e-12)``, computed on the device: no host
  sync). Each product is rounded as torch rounds it (fp32: bit-identical to the reference); the kernel
  is compiled with ``enable_fp_fusion=False`` so the GPU does not contract ``e·scale + p`` into one fma
  either (torch's separate kernels round the product). Bytes per element: read p, g, write p, old:
  16 B fp32.
- restore: ``p = old`` as a raw-bit copy. 8 B fp32.

``grads`` and ``old_params`` are per-call lists (`multi_tensor.prepare_lists`): SAM allocates fresh
``old_params`` every step, so they sit in the small per-call table and the cached table of the params
is not rebuilt.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import multi_tensor as mt
from .reduce import OP_SUMSQ, OP_SUMSQ_ABS_PARAM, launch_partials

BLOCK = 2048


# ------------------------------------------------------------------------------------------ norms
@triton.jit
def _sam_norms_finish_kernel(meta_ptr, partials_ptr,  # `multi_tensor.Launch`: sums of squares per slot
                             pos_ptr,  # int32 [n]: where tensor t's norm goes in out (the caller's positions)
                             out_ptr,  # fp32 [len(params)]: the norms (output)
                             ROW: tl.constexpr, MAX_PARTS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    total = mt._vsum(mt._load_partials(meta_ptr + t * ROW, partials_ptr, MAX_PARTS))
    norm = tl.math.sqrt_rn(tl.full([1], total, tl.float32))  # correctly rounded, as torch's sqrt
    pos = tl.load(pos_ptr + t).to(tl.int64)
    tl.store(out_ptr + pos + tl.arange(0, 1), norm)


def _triton_sam_norms(params: list[Tensor], grads: list[Tensor], *, adaptive: bool) -> Tensor:
    """Per-tensor L2 norms of ``(|p| if adaptive else 1) * g`` as a 1-D fp32 tensor on the params' device,
    ``len(params)`` long (0 for a zero-size tensor): two launches (partials, finish), no host sync."""
    preps = mt.prepare_lists([params], [grads], names=("params", "grads"))
    if not params:
        return torch.empty(0, dtype=torch.float32)
    if grads[0].dtype != params[0].dtype:
        raise ValueError(f"Triton launcher: grads are {grads[0].dtype}, params {params[0].dtype}; SAM's "
                         "norms read both in one dtype")
    device = params[0].device
    covered = sum(len(prep.index) for prep in preps)
    # every position written by a finish program unless some tensor is empty (its norm is 0)
    out = (torch.empty if covered == len(params) else torch.zeros)(len(params), dtype=torch.float32,
                                                                   device=device)
    op = OP_SUMSQ_ABS_PARAM if adaptive else OP_SUMSQ
    for launch in mt.launches(preps, BLOCK):
        launch_partials(launch, op)
        launch(_sam_norms_finish_kernel, grid=launch.table.n, out_ptr=out,
               pos_ptr=mt.device_constants(launch.prep.index, torch.int32, launch.device))
    return out


# ------------------------------------------------------------------------------------------ perturb
@mt.device_fn
def _sam_perturb_update(p_addr, g_addr, old_addr, offs, mask, scale, ADAPTIVE: tl.constexpr,
                        P_KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """old = p; p += ((p*p if ADAPTIVE) * g) * scale, in the reference's op order, on one block."""
    bits = mt._load_bits(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    mt._store_bits(old_addr, offs, bits, mask, P_KIND, ALIGNED, MASKED)
    p = mt._bits_to_f32(bits, P_KIND)
    g = mt._load_f32(g_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    if ADAPTIVE:
        e = (p * p) * g   # torch.pow(p, 2) is p*p, one rounding
    else:
        e = g             # davda54's 1.0 * g is g exactly
    e = e * scale
    mt._store_f32(p_addr, offs, p + e, mask, P_KIND, ALIGNED, MASKED)


@triton.jit
def _sam_perturb_kernel(meta_ptr, dyn_ptrs_ptr, chunks_ptr,  # `multi_tensor.Launch`: dyn = (grad, old_param)
                        scale_ptr,  # fp32 0-d: rho / (norm + 1e-12), on the device (never read by the host)
                        ADAPTIVE: tl.constexpr,  # ASAM: the perturbation is scaled by p^2
                        P_KIND: tl.constexpr, ALIGNED: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    t, row, offs, mask, full = mt._chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
    p_addr = tl.load(row + 4)
    g_addr = tl.load(dyn_ptrs_ptr + 2 * t)
    old_addr = tl.load(dyn_ptrs_ptr + 2 * t + 1)
    scale = tl.load(scale_ptr)
    if full:
        _sam_perturb_update(p_addr, g_addr, old_addr, offs, mask, scale, ADAPTIVE, P_KIND, ALIGNED, False)
    else:
        _sam_perturb_update(p_addr, g_addr, old_addr, offs, mask, scale, ADAPTIVE, P_KIND, ALIGNED, True)


def _check_same_dtype(params: list[Tensor], others: list[Tensor], name: str) -> None:
    if params and others and others[0].dtype != params[0].dtype:
        raise ValueError(f"Triton launcher: {name} are {others[0].dtype}, params {params[0].dtype}; they "
                         "must match")


def _triton_sam_perturb(params: list[Tensor], grads: list[Tensor], old_params: list[Tensor], *,
                        scale: Tensor, adaptive: bool) -> None:
    """``old = p; p += (p**2 if adaptive else 1) * g * scale`` over a (device, dtype) group in one launch
    (a second one only for strided tensors); ``scale`` is a 0-d device tensor read by the kernel."""
    preps = mt.prepare_lists([params], [grads, old_params], names=("params", "grads", "old_params"),
                          written=("params", "old_params"))
    _check_same_dtype(params, grads, "grads")
    _check_same_dtype(params, old_params, "old_params")
    for launch in mt.launches(preps, BLOCK):
        # a no-op for SAM's scale (a 0-d fp32 tensor on the params' device)
        launch(_sam_perturb_kernel, scale_ptr=mt.device_tensor(scale, launch.device), ADAPTIVE=bool(adaptive),
               options={"enable_fp_fusion": False})


# ------------------------------------------------------------------------------------------ restore
@mt.device_fn
def _sam_restore_copy(p_addr, old_addr, offs, mask, P_KIND: tl.constexpr, ALIGNED: tl.constexpr,
                      MASKED: tl.constexpr):
    bits = mt._load_bits(old_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    mt._store_bits(p_addr, offs, bits, mask, P_KIND, ALIGNED, MASKED)


@triton.jit
def _sam_restore_kernel(meta_ptr, dyn_ptrs_ptr, chunks_ptr,  # `multi_tensor.Launch`: dyn = old_param
                        P_KIND: tl.constexpr, ALIGNED: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    t, row, offs, mask, full = mt._chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
    p_addr = tl.load(row + 4)
    old_addr = tl.load(dyn_ptrs_ptr + t)
    if full:
        _sam_restore_copy(p_addr, old_addr, offs, mask, P_KIND, ALIGNED, False)
    else:
        _sam_restore_copy(p_addr, old_addr, offs, mask, P_KIND, ALIGNED, True)


def _triton_sam_restore(params: list[Tensor], old_params: list[Tensor]) -> None:
    """``p = old`` exactly (a bit copy) over a (device, dtype) group in one launch (a second one only for
    strided tensors)."""
    preps = mt.prepare_lists([params], [old_params], names=("params", "old_params"), written=("params",))
    _check_same_dtype(params, old_params, "old_params")
    for launch in mt.launches(preps, BLOCK, tag="sam_restore"):  # per-call list: old_params, not grads
        launch(_sam_restore_kernel)
