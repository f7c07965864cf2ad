// NeuroOptima's per-tensor core (seed 003; NeuroGhostOutput/NeuroOptima neurooptima.py), docs/spec.md §7,
// one element: Adan-style moments, a Lion sign step. Reference: _forloop_neuro_optima.
#pragma once

#include "common.h"

namespace fused_optim {
namespace math {

template <typename M>
struct NeuroOptimaCoeffs {
  M beta1, one_minus_beta1;
  M beta2, one_minus_beta2;  // the second beta serves the difference and the squared moments (upstream)
  M eps;
  M neg_lr;
  M weight_decay;
  bool decay;  // weight_decay != 0: the reference skips the add then
  NeuroOptimaCoeffs(double lr, double b1, double b2, double eps_, double weight_decay_)
      : beta1(static_cast<M>(b1)), one_minus_beta1(static_cast<M>(1.0 - b1)), beta2(static_cast<M>(b2)),
        one_minus_beta2(static_cast<M>(1.0 - b2)), eps(static_cast<M>(eps_)), neg_lr(static_cast<M>(-lr)),
        weight_decay(static_cast<M>(weight_decay_)), decay(weight_decay_ != 0.0) {}
};

// g: the prepared gradient (maximize applied). prev_grad is rewritten with this step's g + wd*p.
template <typename T, typename M>
C10_HOST_DEVICE inline void neuro_optima_update(T& p, T g, T& exp_avg, T& exp_avg_sq, T& exp_avg_diff,
                                                T& prev_grad, const NeuroOptimaCoeffs<M>& c) {
  if (c.decay) {
    g = fo_fma(p, T(c.weight_decay), g);                                  // g.add(p, alpha=wd)
  }
  const T d = g - prev_grad;
  exp_avg = fo_fma(g, T(c.one_minus_beta1), exp_avg * T(c.beta1));        // mul_(b1).add_(g, alpha=1-b1)
  exp_avg_diff = fo_fma(d, T(c.one_minus_beta2), exp_avg_diff * T(c.beta2));
  exp_avg_sq = fo_fma(T(c.one_minus_beta2) * g, g, exp_avg_sq * T(c.beta2));  // addcmul_(g, g, 1-b2)
  const T denom = fo_sqrt(exp_avg_sq) + T(c.eps);                         // sqrt().add_(eps)
  const T u = (exp_avg + exp_avg_diff * T(c.beta2)) / denom;              // (m + b2*m_diff) / denom
  p = fo_fma(fo_sign(u), T(c.neg_lr), p);                                 // p.add_(sign(u), alpha=-lr)
  prev_grad = g;
}

}  // namespace math
}  // namespace fused_optim
