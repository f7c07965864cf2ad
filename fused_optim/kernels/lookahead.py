"""Lookahead's sync as one Triton launch per (device, dtype) group (docs/spec.md §5; Zhang et al. 2019).

Per element, in the reference's op order (`fused_optim.lookahead._forloop_lookahead_sync`):
``p.mul_(alpha).add_(slow, alpha=1 - alpha)`` is ``fma(slow, 1 - alpha, p·alpha)`` on CPU (at::vec::fmadd),
then ``slow.copy_(p)``. With bf16/fp16 params the maths stays in fp32 registers and p is rounded once
(the reference rounds after the multiply and after the add); slow receives that rounded p, so both
hold the same value whether slow is in the params' dtype or fp32 (NeuroOptima keeps fp32 slow weights).

Bytes per element: read p, slow, write p, slow: 16 B in fp32; 12 B for bf16 params with fp32 slows;
8 B all bf16.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from . import multi_tensor as mt

BLOCK = 2048


@mt.device_fn
def _lookahead_update(p_addr, s_addr, offs, mask, alpha, one_minus_alpha, P_KIND: tl.constexpr,
                      S_KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    """The per-element rule, in the reference's op order, on one block."""
    p = mt._load_f32(p_addr, offs, mask, P_KIND, ALIGNED, MASKED)
    slow = mt._load_f32(s_addr, offs, mask, S_KIND, ALIGNED, MASKED)
    p = mt._round_to_kind(mt._fma(slow, one_minus_alpha, p * alpha), P_KIND)  # the value p holds, slow copies
    mt._store_f32(p_addr, offs, p, mask, P_KIND, ALIGNED, MASKED)
    mt._store_f32(s_addr, offs, p, mask, S_KIND, ALIGNED, MASKED)


@triton.jit
def _lookahead_kernel(meta_ptr, chunks_ptr,  # `multi_tensor.Launch`
                      alpha,  # fp32 runtime args: a new alpha never recompiles
                      one_minus_alpha,  # 1 - alpha, computed on the host in double like the reference's scalar
                      P_KIND: tl.constexpr,  # dtype code of params (0 fp32, 1 fp16, 2 bf16)
                      S_KIND: tl.constexpr,  # dtype code of slows (the params' or fp32)
                      ALIGNED: tl.constexpr, ROW: tl.constexpr, BLOCK: tl.constexpr):
    _, row, offs, mask, full = mt._chunk_coords(meta_ptr, chunks_ptr, ROW, BLOCK)
    p_addr = tl.load(row + 4)
    s_addr = tl.load(row + 5)
    if full:
        _lookahead_update(p_addr, s_addr, offs, mask, alpha, one_minus_alpha, P_KIND, S_KIND, ALIGNED, False)
    else:
        _lookahead_update(p_addr, s_addr, offs, mask, alpha, one_minus_alpha, P_KIND, S_KIND, ALIGNED, True)


def _triton_lookahead_sync(params: list[Tensor], slows: list[Tensor], *, alpha: float) -> None:
    """``p = alpha·p + (1 - alpha)·slow; slow = p`` over a (device, dtype) group in one launch (a second
    one only for strided tensors, see `multi_tensor.prepare_lists`); zero-size tensors are skipped.
    ``slows[i]`` has ``params[i]``'s numel, in the params' dtype or float32."""
    preps = mt.prepare_lists([params, slows], names=("params", "slows"), written=("params", "slows"))
    for launch in mt.launches(preps, BLOCK):
        launch(_lookahead_kernel, alpha=float(alpha), one_minus_alpha=1 - alpha)
