// SAM (Foret et al. 2021; davda54 sam.py), docs/spec.md §6, one element of the norm and of the perturbation.
#pragma once

#include "common.h"

namespace fused_optim {
namespace math {

// The value whose per-tensor L2 norm SAM takes: (|p| if adaptive else 1) * g (1.0 * g is g exactly).
template <typename T>
C10_HOST_DEVICE inline T sam_norm_value(const T& p, const T& g, bool adaptive) {
  return adaptive ? fo_abs(p) * g : g;
}

// e = (pow(p, 2) if adaptive else 1.0) * g * scale; p.add_(e). torch's pow(p, 2) is p * p (measured,
// bit-equal on the CPU), and the products associate left to right as in the reference.
template <typename T>
C10_HOST_DEVICE inline T sam_perturb(const T& p, const T& g, const T& scale, bool adaptive) {
  const T e = (adaptive ? (p * p) * g : g) * scale;
  return p + e;
}

}  // namespace math
}  // namespace fused_optim
