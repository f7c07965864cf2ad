// Adan (Xie et al. 2022; sail-sg adan.py, = timm), docs/spec.md §3, one element.
#pragma once

#include "common.h"

namespace fused_optim {
namespace math {

template <typename M>
struct AdanCoeffs {
  M beta1, one_minus_beta1;
  M beta2, one_minus_beta2;
  M beta3, one_minus_beta3;
  M bias_correction3_sqrt;
  M eps;
  M neg_step_size;       // -lr / bias_correction1
  M neg_step_size_diff;  // -lr * beta2 / bias_correction2
  M decay;               // no_prox: 1 - lr*wd (multiply before); else 1 + lr*wd (divide after)
  bool no_prox;
  // the inputs of the three above in the math type, for the device-scalar setters below
  M lr, bias_correction1, bias_correction2, weight_decay;
  AdanCoeffs(double lr_, double b1, double b2, double b3, double bc1, double bc2, double bc3_sqrt,
             double eps_, double weight_decay_, bool no_prox_)
      : beta1(static_cast<M>(b1)), one_minus_beta1(static_cast<M>(1.0 - b1)),
        beta2(static_cast<M>(b2)), one_minus_beta2(static_cast<M>(1.0 - b2)),
        beta3(static_cast<M>(b3)), one_minus_beta3(static_cast<M>(1.0 - b3)),
        bias_correction3_sqrt(static_cast<M>(bc3_sqrt)), eps(static_cast<M>(eps_)),
        neg_step_size(static_cast<M>(-(lr_ / bc1))), neg_step_size_diff(static_cast<M>(-(lr_ * b2 / bc2))),
        decay(static_cast<M>(no_prox_ ? 1.0 - lr_ * weight_decay_ : 1.0 + lr_ * weight_decay_)),
        no_prox(no_prox_), lr(static_cast<M>(lr_)), bias_correction1(static_cast<M>(bc1)),
        bias_correction2(static_cast<M>(bc2)), weight_decay(static_cast<M>(weight_decay_)) {}

  // Values read from tensors (capturable: the bias corrections come from the device step counter; a
  // scheduled lr): the derived scalars in the math type, in the Triton kernel's order with LR_TENSOR /
  // BC_TENSOR. Call set_lr and/or set_bias_corrections, then update_step_sizes.
  C10_HOST_DEVICE void set_lr(M lr_) {
    lr = lr_;
    const M neg_lr = -lr_;
    decay = no_prox ? M(1) + neg_lr * weight_decay : M(1) - neg_lr * weight_decay;
  }
  C10_HOST_DEVICE void set_bias_corrections(M bc1, M bc2, M bc3_sqrt) {
    bias_correction1 = bc1;
    bias_correction2 = bc2;
    bias_correction3_sqrt = bc3_sqrt;
  }
  C10_HOST_DEVICE void update_step_sizes() {
    const M neg_lr = -lr;
    neg_step_size = neg_lr / bias_correction1;
    neg_step_size_diff = (neg_lr * beta2) / bias_correction2;
  }
};

// g: the prepared gradient (maximize, unscale); clip: the global clip factor (1 when off).
// neg_pre_grad holds -clip*g_{k-1} on entry and -clip*g_k on exit. `first` (capturable: the group's
// step is 1, read from a tensor) starts the difference here, neg_pre_grad = -clip*g, as the class does
// on the host otherwise: d is then exactly 0.
template <typename T, typename M>
C10_HOST_DEVICE inline void adan_update(T& p, T g, T& exp_avg, T& exp_avg_sq, T& exp_avg_diff,
                                        T& neg_pre_grad, M clip, const AdanCoeffs<M>& c, bool first = false) {
  g = fo_mul_rn(g, T(clip));  // rounded before d below, which is then exactly 0 at a first step
  if (first) {
    neg_pre_grad = T(0) - g;
  }
  T d = neg_pre_grad + g;                                             // g_k - g_{k-1}
  exp_avg = fo_fma(g, T(c.one_minus_beta1), exp_avg * T(c.beta1));
  exp_avg_diff = fo_fma(d, T(c.one_minus_beta2), exp_avg_diff * T(c.beta2));
  T n = d * T(c.beta2) + g;                                           // n = b2*d + g
  exp_avg_sq = fo_fma(T(c.one_minus_beta3) * n, n, exp_avg_sq * T(c.beta3));  // addcmul_(n, n, 1-b3)
  T denom = fo_sqrt(exp_avg_sq) / T(c.bias_correction3_sqrt) + T(c.eps);
  if (c.no_prox) {
    p = p * T(c.decay);
  }
  p = p + (T(c.neg_step_size) * exp_avg) / denom;                     // two addcdiv_, in this order
  p = p + (T(c.neg_step_size_diff) * exp_avg_diff) / denom;
  if (!c.no_prox) {
    p = p / T(c.decay);
  }
  neg_pre_grad = T(0) - g;                                            // zero_().add_(g, alpha=-1)
}

}  // namespace math
}  // namespace fused_optim
