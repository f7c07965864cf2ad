// Shared per-element helpers for the update rules in this folder.
//
// Every rule is a template over T, the math type: `float`/`double` (CUDA threads, CPU tails) or
// `at::vec::Vectorized<float/double>` (CPU main loops). The rules use only + - * / on T and the
// helpers below, so one source serves both backends; the Vectorized overloads live in
// csrc/cpu/vec_ops.h, which the CPU kernels include before these headers.
//
// The op order mirrors the reference (docs/spec.md, fused_optim/*.py `_forloop_x`) one torch op at a time:
// torch's CPU kernels compute `add_(x, alpha=a)` as fma(x, a, self), `addcmul_` as fma(v*t1, t2, self)
// and `addcdiv_` as self + (v*t1)/t2 (measured against torch 2.14), so the same roundings here give bit-equal fp32 results on the
// CPU (the CPU build uses -ffp-contract=off so the compiler adds no fma of its own).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace fused_optim {
namespace math {

// The CUDA intrinsics below run in device code and in the emulated CUDA test build (csrc/cuda/emulation/).
C10_HOST_DEVICE inline float fo_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__) || defined(FUSED_OPTIM_CUDA_EMULATION)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

C10_HOST_DEVICE inline double fo_fma(double a, double b, double c) {
#if defined(__CUDA_ARCH__) || defined(FUSED_OPTIM_CUDA_EMULATION)
  return __fma_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// torch.sign: +1, -1, or 0 for 0 and NaN (torch's CPU kernel maps NaN to 0 too)
template <typename T>
C10_HOST_DEVICE inline T fo_sign(T x) {
  return static_cast<T>((T(0) < x) - (x < T(0)));
}

// a*b rounded on its own. nvcc's default --fmad=true may fuse a product with an add of another
// statement into one fma; where a rule needs the rounded product itself (Adan's d = -clip*g + clip*g,
// exactly 0 at a param's first step, docs/spec.md §3) it says so with this. The CPU build never contracts
// (-ffp-contract=off); the Vectorized overloads are in csrc/cpu/vec_ops.h.
C10_HOST_DEVICE inline float fo_mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__) || defined(FUSED_OPTIM_CUDA_EMULATION)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline double fo_mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__) || defined(FUSED_OPTIM_CUDA_EMULATION)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

C10_HOST_DEVICE inline float fo_sqrt(float x) { return ::sqrtf(x); }
C10_HOST_DEVICE inline double fo_sqrt(double x) { return ::sqrt(x); }

C10_HOST_DEVICE inline float fo_abs(float x) { return ::fabsf(x); }
C10_HOST_DEVICE inline double fo_abs(double x) { return ::fabs(x); }

// max that propagates NaN, like torch.amax (fmax would drop it and hide a diverged gradient)
template <typename T>
C10_HOST_DEVICE inline T fo_max_nan(T a, T b) {
  return (a != a || a > b) ? a : b;
}

// AMP: grad / grad_scale as torch's in-place unscale (`torch._foreach_div_(grads, scale)`) stores it: an
// IEEE division in the math type M (fp32; fp64 for fp64 grads), rounded to the grad's storage type P.
// The update ops write this value back into the grad, and every use of the grad (the update, the
// multi_tensor_stats reduction) sees it, so in-kernel and separate unscaling give the same bits.
template <typename P, typename M>
C10_HOST_DEVICE inline M amp_unscale(M g, M grad_scale) {
  return static_cast<M>(static_cast<P>(g / grad_scale));
}

// The gradient an update sees: the maximize sign (exact) and an unscale without rounding to the
// storage type (the composites' ops pass unscale = false; the update ops use amp_unscale).
template <typename T, typename M>
C10_HOST_DEVICE inline T prepare_grad(T g, M grad_sign, bool unscale, M grad_scale) {
  g = g * T(grad_sign);
  if (unscale) {
    g = g / T(grad_scale);
  }
  return g;
}

}  // namespace math
}  // namespace fused_optim
