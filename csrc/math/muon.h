// Muon (Keller Jordan, KellerJordan/Muon muon.py), docs/spec.md §8: the elementwise stages around
// Newton-Schulz (which stays on torch matmuls).
#pragma once

#include <cmath>

#include "common.h"

namespace fused_optim {
namespace math {

// torch.lerp(start, end, w) with a scalar weight, as ATen's CPU kernel computes it (Lerp.h,
// lerp_vec: fmadd(coeff, end - start, base) with coeff = w, base = start when |w| < 0.5, else
// coeff = w - 1, base = end). Measured on torch 2.14 CPU: bit-equal in both branches, vector body
// and scalar tail alike. CUDA's contracted `start + w*(end-start)` / `end - (end-start)*(1-w)` are
// the same two fmas ((w - 1) = -(1 - w) exactly).
template <typename M>
struct LerpWeight {
  bool small;  // |w| < 0.5, in the math type (ATen's is_lerp_weight_small)
  M coeff;
  explicit LerpWeight(double w)
      : small(std::abs(static_cast<M>(w)) < M(0.5)), coeff(small ? static_cast<M>(w) : static_cast<M>(w) - M(1)) {}
};

template <typename T, typename M>
C10_HOST_DEVICE inline T fo_lerp(const T& start, const T& end, const LerpWeight<M>& w) {
  return fo_fma(T(w.coeff), end - start, w.small ? start : end);
}

template <typename M>
struct MuonMomentumCoeffs {
  LerpWeight<M> buf_weight;       // buf.lerp_(g, 1 - momentum)
  LerpWeight<M> nesterov_weight;  // g.lerp(buf, momentum)
  bool nesterov;
  MuonMomentumCoeffs(double momentum, bool nesterov_)
      : buf_weight(1.0 - momentum), nesterov_weight(momentum), nesterov(nesterov_) {}
};

// g: the prepared gradient (maximize applied). Returns u, the Newton-Schulz input (the new buf
// without Nesterov); the kernel rounds it to the updates' dtype on store.
template <typename T, typename M>
C10_HOST_DEVICE inline T muon_momentum(const T& g, T& buf, const MuonMomentumCoeffs<M>& c) {
  buf = fo_lerp(buf, g, c.buf_weight);
  return c.nesterov ? fo_lerp(g, buf, c.nesterov_weight) : buf;
}

template <typename M>
struct MuonApplyCoeffs {
  M decay;   // 1 - lr * weight_decay
  M neg_lr;  // -lr
  bool decayed;  // weight_decay != 0 (p * 1.0 is p exactly: skipping it changes nothing)
  MuonApplyCoeffs(double lr, double weight_decay)
      : decay(static_cast<M>(1.0 - lr * weight_decay)), neg_lr(static_cast<M>(-lr)), decayed(weight_decay != 0.0) {}
};

// u: the scaled Newton-Schulz output, already rounded to its storage dtype by the kernel (upstream's
// `u *= scale` on the bf16 tensor: fp32 product, one rounding). p.mul_(1 - lr*wd); p.add_(u, alpha=-lr).
template <typename T, typename M>
C10_HOST_DEVICE inline void muon_apply(T& p, const T& u, const MuonApplyCoeffs<M>& c) {
  if (c.decayed) {
    p = p * T(c.decay);
  }
  p = fo_fma(u, T(c.neg_lr), p);
}

}  // namespace math
}  // namespace fused_optim
