// at::vec::Vectorized overloads of the math helpers (csrc/math/common.h), so the per-element rules
// in csrc/math/ instantiate for SIMD registers too. Include before the optimizer headers: the rules
// are templates that must see these overloads at their definition.
//
// Only fast when the translation unit is compiled with -DCPU_CAPABILITY_AVX2 (or AVX512) and a
// matching -m flag; otherwise Vectorized is a scalar emulation (see fused_optim/_ext.py).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "../math/common.h"

namespace fused_optim {
namespace math {

template <typename S>
using Vec = at::vec::Vectorized<S>;

inline Vec<float> fo_fma(const Vec<float>& a, const Vec<float>& b, const Vec<float>& c) {
  return at::vec::fmadd(a, b, c);
}
inline Vec<double> fo_fma(const Vec<double>& a, const Vec<double>& b, const Vec<double>& c) {
  return at::vec::fmadd(a, b, c);
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
}  // namespace fused_optim
