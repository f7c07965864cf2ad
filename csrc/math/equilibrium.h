// GradientEquilibrium (seed package gradient-equilibrum), docs/spec.md §4, one element.
#pragma once

#include "common.h"

namespace fused_optim {
namespace math {

template <typename M>
struct EquilibriumCoeffs {
  M lr;
  M weight_decay;
  bool decay;  // weight_decay != 0: the reference skips the add entirely then
  EquilibriumCoeffs(double lr_, double weight_decay_)
      : lr(static_cast<M>(lr_)), weight_decay(static_cast<M>(weight_decay_)), decay(weight_decay_ != 0.0) {}
  C10_HOST_DEVICE void set_lr(M lr_) { lr = lr_; }  // lr read from a tensor (capturable / scheduled)
};

// The value whose per-tensor mean the update subtracts: g (+ wd*p, L2 decay as g.add(p, alpha=wd)).
// The reduction and the update both call this, so they see the same bits.
template <typename T, typename M>
C10_HOST_DEVICE inline T equilibrium_value(const T& p, const T& g, const EquilibriumCoeffs<M>& c) {
  return c.decay ? fo_fma(p, T(c.weight_decay), g) : g;
}

// mean = sum / numel of equilibrium_value over the tensor.
template <typename T, typename M>
C10_HOST_DEVICE inline void equilibrium_update(T& p, const T& x, M mean, const EquilibriumCoeffs<M>& c) {
  T eq = x - T(mean);
  p = p - T(c.lr) * eq;  // p.sub_(lr * eq)
}

}  // namespace math
}  // namespace fused_optim
