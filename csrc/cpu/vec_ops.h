// at::vec::Vectorized overloads of the math helpers (csrc/math/common.h), so the per-element rules
// in csrc/math/ instantiate for SIMD registers too. Include before the optimizer headers: the rules
// are templates that must see these overloads at their definition.
//
// Only fast when the translation unit is compiled with -DCPU_CAPABILITY_AVX2 (or AVX512) and a
// matching -m flag; otherwise Vectorized is a scalar emulation (see fused_optim/_ext.py).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <tuple>
#include <type_traits>

#include "../math/common.h"

namespace fused_optim {
namespace math {

template <typename S>
using Vec = at::vec::Vectorized<S>;

// One rounding, like the scalar std::fma of the tails. AVX2/AVX512 fmadd is a fused instruction;
// the generic (no capability: FUSED_OPTIM_PORTABLE) at::vec::fmadd is a*b + c, rounded twice,
// which broke the bit-equality with the reference (Lion, Adan), so that build fuses per lane.
template <typename S>
inline Vec<S> fo_fma_vec(const Vec<S>& a, const Vec<S>& b, const Vec<S>& c) {
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  return at::vec::fmadd(a, b, c);
#else
  S x[Vec<S>::size()], y[Vec<S>::size()], z[Vec<S>::size()];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int64_t i = 0; i < Vec<S>::size(); ++i) {
    x[i] = std::fma(x[i], y[i], z[i]);
  }
  return Vec<S>::loadu(x);
#endif
}
inline Vec<float> fo_mul_rn(const Vec<float>& a, const Vec<float>& b) { return a * b; }
inline Vec<double> fo_mul_rn(const Vec<double>& a, const Vec<double>& b) { return a * b; }
inline Vec<float> fo_fma(const Vec<float>& a, const Vec<float>& b, const Vec<float>& c) { return fo_fma_vec(a, b, c); }
inline Vec<double> fo_fma(const Vec<double>& a, const Vec<double>& b, const Vec<double>& c) {
  return fo_fma_vec(a, b, c);
}

template <typename S>
inline Vec<S> fo_sign_vec(const Vec<S>& x) {
  const Vec<S> zero(S(0)), one(S(1));
  return ((zero < x) & one) - ((x < zero) & one);  // comparisons are all-ones masks; NaN -> 0
}
inline Vec<float> fo_sign(const Vec<float>& x) { return fo_sign_vec(x); }
inline Vec<double> fo_sign(const Vec<double>& x) { return fo_sign_vec(x); }

inline Vec<float> fo_sqrt(const Vec<float>& x) { return x.sqrt(); }
inline Vec<double> fo_sqrt(const Vec<double>& x) { return x.sqrt(); }

inline Vec<float> fo_abs(const Vec<float>& x) { return x.abs(); }
inline Vec<double> fo_abs(const Vec<double>& x) { return x.abs(); }

inline Vec<float> fo_max_nan(const Vec<float>& a, const Vec<float>& b) { return at::vec::maximum(a, b); }
inline Vec<double> fo_max_nan(const Vec<double>& a, const Vec<double>& b) { return at::vec::maximum(a, b); }

}  // namespace math

namespace cpu {

// bf16/fp16 rows run the fp32 rules on two Vectorized<float> per Vectorized<BFloat16/Half>
// (2 * Vec<float>::size() elements). The widening is exact and the narrowing rounds to nearest
// even like c10's scalar conversion, so these loops give the scalar loop's bits (NaN payloads
// aside: at::vec writes 0xffff where c10 writes 0x7fc0 for bf16).
template <typename T>
constexpr bool kReduced = at::vec::is_reduced_floating_point_v<T>;

// 2 * Vec<M>::size() elements of T (M itself, or a reduced type when M is float) as two registers.
template <typename M, typename T>
inline void load2(const T* ptr, math::Vec<M>& lo, math::Vec<M>& hi) {
  if constexpr (std::is_same<T, M>::value) {
    lo = math::Vec<M>::loadu(ptr);
    hi = math::Vec<M>::loadu(ptr + math::Vec<M>::size());
  } else {
    static_assert(std::is_same<M, float>::value && kReduced<T>, "load2: float math for bf16/fp16 storage");
    static_assert(math::Vec<T>::size() == 2 * math::Vec<float>::size(), "one reduced register = two fp32");
    std::tie(lo, hi) = at::vec::convert_to_float<T>(math::Vec<T>::loadu(ptr));
  }
}

template <typename M, typename T>
inline void store2(T* ptr, const math::Vec<M>& lo, const math::Vec<M>& hi) {
  if constexpr (std::is_same<T, M>::value) {
    lo.store(ptr);
    hi.store(ptr + math::Vec<M>::size());
  } else {
    static_assert(std::is_same<M, float>::value && kReduced<T>, "store2: float math for bf16/fp16 storage");
    at::vec::convert_from_float<T>(lo, hi).store(ptr);
  }
}

// Whether every storage type Ts of a loop loads into pairs of Vec<M> with load2/store2: M itself, or
// bf16/fp16 with fp32 math. The composite ops' loops (mixed param/state/update dtypes) run such pairs.
template <typename M, typename... Ts>
constexpr bool kWide = ((std::is_same<Ts, M>::value || (std::is_same<M, float>::value && kReduced<Ts>)) && ...);

// Round fp32 registers to T's precision and back, as a store to T and a reload would (RNE, like
// c10's scalar conversion); a no-op when T is the math type.
template <typename T, typename M>
inline void round_through(math::Vec<M>& lo, math::Vec<M>& hi) {
  if constexpr (!std::is_same<T, M>::value) {
    std::tie(lo, hi) = at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(lo, hi));
  }
}

template <typename T, typename M>
inline M round_through(M x) {
  return static_cast<M>(static_cast<T>(x));
}

// One register: the same rounding lane by lane.
template <typename T, typename M>
inline math::Vec<M> round_through(const math::Vec<M>& x) {
  if constexpr (std::is_same<T, M>::value) {
    return x;
  } else {
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(x, x)));
  }
}

}  // namespace cpu
}  // namespace fused_optim
