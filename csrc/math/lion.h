// Lion (Chen et al. 2023; google/automl lion_pytorch.py), docs/spec.md §2, one element.
#pragma once

#include "common.h"

namespace fused_optim {
namespace math {

// Python doubles from the optimizer, rounded once to the math type M (as torch rounds a Python
// scalar operand to the tensor's opmath type).
template <typename M>
struct LionCoeffs {
  M decay;            // 1 - lr * weight_decay
  M neg_lr;           // -lr
  M beta1;
  M one_minus_beta1;  // 1 - beta1
  M beta2;
  M one_minus_beta2;  // 1 - beta2
  M weight_decay;     // for set_lr
  LionCoeffs(double lr, double beta1_, double beta2_, double weight_decay_)
      : decay(static_cast<M>(1.0 - lr * weight_decay_)), neg_lr(static_cast<M>(-lr)),
        beta1(static_cast<M>(beta1_)), one_minus_beta1(static_cast<M>(1.0 - beta1_)),
        beta2(static_cast<M>(beta2_)), one_minus_beta2(static_cast<M>(1.0 - beta2_)),
        weight_decay(static_cast<M>(weight_decay_)) {}
  // lr read from a tensor (capturable / scheduled): the decay in the math type, as the Triton kernel
  // computes it with LR_TENSOR (the float path rounds the double 1 - lr*wd once instead)
  C10_HOST_DEVICE void set_lr(M lr) {
    decay = M(1) - lr * weight_decay;
    neg_lr = -lr;
  }
};

template <typename T, typename M>
C10_HOST_DEVICE inline void lion_update(T& p, const T& g, T& exp_avg, const LionCoeffs<M>& c) {
  p = p * T(c.decay);                                           // p.mul_(1 - lr*wd), with the old p
  T u = exp_avg * T(c.beta1) + g * T(c.one_minus_beta1);        // two muls and an add
  p = fo_fma(fo_sign(u), T(c.neg_lr), p);                       // p.add_(sign(u), alpha=-lr)
  exp_avg = fo_fma(g, T(c.one_minus_beta2), exp_avg * T(c.beta2));  // mul_(b2).add_(g, alpha=1-b2)
}

// The rule's declaration: the op fused_optim::lion_ and its kernels are generated from it (csrc/elementwise.h;
// docs/design.md, "Adding a native elementwise op").
struct Lion {
  static constexpr const char* kName = "lion";                           // the op fused_optim::lion_
  static constexpr const char* kStates = "exp_avgs";                     // state lists, after params, grads
  static constexpr const char* kScalars = "lr beta1 beta2 weight_decay";  // float arguments
  static constexpr const char* kFlags = "";                              // bool arguments
  static constexpr const char* kTensorScalars = "lr";                    // also as `<name>_tensor`
  template <typename M>
  using Coeffs = LionCoeffs<M>;
  template <typename M>
  static Coeffs<M> coeffs(const double* s, const bool*) {
    return Coeffs<M>(s[0], s[1], s[2], s[3]);
  }
  template <typename M>
  C10_HOST_DEVICE static void set_tensor_scalar(Coeffs<M>& c, int, M v) {
    c.set_lr(v);
  }
  template <typename T, typename M>
  C10_HOST_DEVICE static void update(T& p, const T& g, const Coeffs<M>& c, T& exp_avg) {
    lion_update(p, g, exp_avg, c);
  }
};

}  // namespace math
}  // namespace fused_optim
