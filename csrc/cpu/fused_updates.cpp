// CPU kernels of the fused update ops (gravity_, lion_, adan_, gradient_equilibrium_).
//
// Each op: host checks, then one parallel pass over (row, chunk) items. fp32 (and fp64) rows run
// whole at::vec::Vectorized registers through the per-element rules of csrc/math/ and finish with
// the same rules on scalars; bf16/fp16 rows widen one reduced register into two fp32 ones (load2),
// run the same fp32 rules and round once on store (store2), so they give the scalar loop's bits
// (fp32 state stays fp32; before this they ran the scalar loop only: slower than the forloop
// reference for Gravity, Adan and GradientEquilibrium, bench/NOTES.md). Nothing is allocated per step except for rows that need contiguous copies.

#include "capability.h"  // first: before any ATen header

#include <ATen/ATen.h>
#include <torch/library.h>

#include "../math/common.h"
#include "vec_ops.h"
#include "../math/adan.h"
#include "../math/equilibrium.h"
#include "../math/gravity.h"
#include "../math/lion.h"
#include "multi_tensor_cpu.h"

namespace fused_optim {
namespace cpu {
namespace {

const at::Device kCPU(at::kCPU);

// The maximize sign and the AMP unscale, read once per call.
template <typename M>
struct GradPrep {
  M sign;
  bool unscale;
  M scale;
  GradPrep(bool maximize, const c10::optional<at::Tensor>& grad_scale)
      : sign(maximize ? M(-1) : M(1)), unscale(grad_scale.has_value()), scale(M(host_scalar(grad_scale, 1.0f))) {}
  template <typename T>
  T operator()(const T& g) const {
    return math::prepare_grad(g, sign, unscale, scale);
  }
};

void lion_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, double lr, double beta1,
              double beta2, double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_scale,
              const c10::optional<at::Tensor>& found_inf) {
  const char* op = "fused_optim::lion_";
  check_scalar_tensor(op, "grad_scale", grad_scale, kCPU);
  check_scalar_tensor(op, "found_inf", found_inf, kCPU);
  PreparedLists pl = prepare_lists(op, {params, grads, exp_avgs}, {true, false, true});
  check_dtypes(op, pl, 2);
  if (pl.rows() == 0 || host_found_inf(found_inf)) {
    return;
  }
  const auto items = make_chunks(pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[2][0].scalar_type(), [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    const math::LionCoeffs<M> c(lr, beta1, beta2, weight_decay);
    const GradPrep<M> prep(maximize, grad_scale);
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      P* p = pl.ptr<P>(0, it.row);
      const P* g = pl.ptr<P>(1, it.row);
      S* m = pl.ptr<S>(2, it.row);
      int64_t i = it.begin;
      if constexpr (kVectorized<P, S>) {
        using V = at::vec::Vectorized<M>;
        for (; i + V::size() <= it.end; i += V::size()) {
          V pv = V::loadu(p + i), mv = V::loadu(m + i);
          math::lion_update(pv, prep(V::loadu(g + i)), mv, c);
          pv.store(p + i);
          mv.store(m + i);
        }
      }
      if constexpr (kReduced<P>) {
        using V = at::vec::Vectorized<M>;
        for (; i + 2 * V::size() <= it.end; i += 2 * V::size()) {
          V p0, p1, g0, g1, m0, m1;
          load2<M>(p + i, p0, p1);
          load2<M>(g + i, g0, g1);
          load2<M>(m + i, m0, m1);
          math::lion_update(p0, prep(g0), m0, c);
          math::lion_update(p1, prep(g1), m1, c);
          store2<M>(p + i, p0, p1);
          store2<M>(m + i, m0, m1);
        }
      }
      for (; i < it.end; ++i) {
        M pv = static_cast<M>(p[i]), mv = static_cast<M>(m[i]);
        math::lion_update(pv, prep(static_cast<M>(g[i])), mv, c);
        p[i] = static_cast<P>(pv);
        m[i] = static_cast<S>(mv);
      }
    });
  });
  pl.finish();
}

void gravity_cpu(at::TensorList params, at::TensorList grads, at::TensorList vs, const at::Tensor& stats,
                 double lr, double beta_hat, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                 const c10::optional<at::Tensor>& found_inf) {
  const char* op = "fused_optim::gravity_";
  check_scalar_tensor(op, "grad_scale", grad_scale, kCPU);
  check_scalar_tensor(op, "found_inf", found_inf, kCPU);
  PreparedLists pl = prepare_lists(op, {params, grads, vs}, {true, false, true});
  check_dtypes(op, pl, 2);
  check_stats(op, stats, pl.rows(), kCPU);
  if (pl.rows() == 0 || host_found_inf(found_inf)) {
    return;
  }
  const at::Tensor absmax = stats.select(1, 0).to(at::kDouble).contiguous();
  const double* absmax_ptr = absmax.data_ptr<double>();
  const auto items = make_chunks(pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[2][0].scalar_type(), [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    const math::GravityCoeffs<M> c(lr, beta_hat);
    const GradPrep<M> prep(maximize, grad_scale);
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      P* p = pl.ptr<P>(0, it.row);
      const P* g = pl.ptr<P>(1, it.row);
      S* v = pl.ptr<S>(2, it.row);
      const M m = math::gravity_m(static_cast<M>(absmax_ptr[it.row]));
      int64_t i = it.begin;
      if constexpr (kVectorized<P, S>) {
        using V = at::vec::Vectorized<M>;
        for (; i + V::size() <= it.end; i += V::size()) {
          V pv = V::loadu(p + i), vv = V::loadu(v + i);
          math::gravity_update(pv, prep(V::loadu(g + i)), vv, m, c);
          pv.store(p + i);
          vv.store(v + i);
        }
      }
      if constexpr (kReduced<P>) {
        using V = at::vec::Vectorized<M>;
        for (; i + 2 * V::size() <= it.end; i += 2 * V::size()) {
          V p0, p1, g0, g1, v0, v1;
          load2<M>(p + i, p0, p1);
          load2<M>(g + i, g0, g1);
          load2<M>(v + i, v0, v1);
          math::gravity_update(p0, prep(g0), v0, m, c);
          math::gravity_update(p1, prep(g1), v1, m, c);
          store2<M>(p + i, p0, p1);
          store2<M>(v + i, v0, v1);
        }
      }
      for (; i < it.end; ++i) {
        M pv = static_cast<M>(p[i]), vv = static_cast<M>(v[i]);
        math::gravity_update(pv, prep(static_cast<M>(g[i])), vv, m, c);
        p[i] = static_cast<P>(pv);
        v[i] = static_cast<S>(vv);
      }
    });
  });
  pl.finish();
}

void adan_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
              at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads, double lr, double beta1, double beta2,
              double beta3, double bias_correction1, double bias_correction2, double bias_correction3_sqrt,
              double eps, double weight_decay, bool no_prox, const c10::optional<at::Tensor>& clip, bool maximize,
              const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf) {
  const char* op = "fused_optim::adan_";
  check_scalar_tensor(op, "clip", clip, kCPU);
  check_scalar_tensor(op, "grad_scale", grad_scale, kCPU);
  check_scalar_tensor(op, "found_inf", found_inf, kCPU);
  PreparedLists pl = prepare_lists(op, {params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads},
                                   {true, false, true, true, true, true});
  check_dtypes(op, pl, 2);
  if (pl.rows() == 0 || host_found_inf(found_inf)) {
    return;
  }
  const float clip_value = host_scalar(clip, 1.0f);
  const auto items = make_chunks(pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[2][0].scalar_type(), [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    const math::AdanCoeffs<M> c(lr, beta1, beta2, beta3, bias_correction1, bias_correction2,
                                bias_correction3_sqrt, eps, weight_decay, no_prox);
    const GradPrep<M> prep(maximize, grad_scale);
    const M cl = static_cast<M>(clip_value);
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      P* p = pl.ptr<P>(0, it.row);
      const P* g = pl.ptr<P>(1, it.row);
      S* m = pl.ptr<S>(2, it.row);
      S* s = pl.ptr<S>(3, it.row);
      S* d = pl.ptr<S>(4, it.row);
      S* n = pl.ptr<S>(5, it.row);
      int64_t i = it.begin;
      if constexpr (kVectorized<P, S>) {
        using V = at::vec::Vectorized<M>;
        for (; i + V::size() <= it.end; i += V::size()) {
          V pv = V::loadu(p + i), mv = V::loadu(m + i), sv = V::loadu(s + i), dv = V::loadu(d + i),
            nv = V::loadu(n + i);
          math::adan_update(pv, prep(V::loadu(g + i)), mv, sv, dv, nv, cl, c);
          pv.store(p + i);
          mv.store(m + i);
          sv.store(s + i);
          dv.store(d + i);
          nv.store(n + i);
        }
      }
      if constexpr (kReduced<P>) {
        using V = at::vec::Vectorized<M>;
        for (; i + 2 * V::size() <= it.end; i += 2 * V::size()) {
          V p0, p1, g0, g1, m0, m1, s0, s1, d0, d1, n0, n1;
          load2<M>(p + i, p0, p1);
          load2<M>(g + i, g0, g1);
          load2<M>(m + i, m0, m1);
          load2<M>(s + i, s0, s1);
          load2<M>(d + i, d0, d1);
          load2<M>(n + i, n0, n1);
          math::adan_update(p0, prep(g0), m0, s0, d0, n0, cl, c);
          math::adan_update(p1, prep(g1), m1, s1, d1, n1, cl, c);
          store2<M>(p + i, p0, p1);
          store2<M>(m + i, m0, m1);
          store2<M>(s + i, s0, s1);
          store2<M>(d + i, d0, d1);
          store2<M>(n + i, n0, n1);
        }
      }
      for (; i < it.end; ++i) {
        M pv = static_cast<M>(p[i]), mv = static_cast<M>(m[i]), sv = static_cast<M>(s[i]),
          dv = static_cast<M>(d[i]), nv = static_cast<M>(n[i]);
        math::adan_update(pv, prep(static_cast<M>(g[i])), mv, sv, dv, nv, cl, c);
        p[i] = static_cast<P>(pv);
        m[i] = static_cast<S>(mv);
        s[i] = static_cast<S>(sv);
        d[i] = static_cast<S>(dv);
        n[i] = static_cast<S>(nv);
      }
    });
  });
  pl.finish();
}

void gradient_equilibrium_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& stats, double lr,
                              double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                              const c10::optional<at::Tensor>& found_inf) {
  const char* op = "fused_optim::gradient_equilibrium_";
  check_scalar_tensor(op, "grad_scale", grad_scale, kCPU);
  check_scalar_tensor(op, "found_inf", found_inf, kCPU);
  PreparedLists pl = prepare_lists(op, {params, grads}, {true, false});
  check_dtypes(op, pl, 2);
  check_stats(op, stats, pl.rows(), kCPU);
  if (pl.rows() == 0 || host_found_inf(found_inf)) {
    return;
  }
  const at::Tensor sums = stats.select(1, 1).to(at::kDouble).contiguous();
  const double* sum_ptr = sums.data_ptr<double>();
  const auto items = make_chunks(pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[0][0].scalar_type(), [&](auto pt, auto) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    const math::EquilibriumCoeffs<M> c(lr, weight_decay);
    const GradPrep<M> prep(maximize, grad_scale);
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      P* p = pl.ptr<P>(0, it.row);
      const P* g = pl.ptr<P>(1, it.row);
      // torch's mean: the sum in the math type, divided by numel in the math type
      const M mean = static_cast<M>(sum_ptr[it.row]) / static_cast<M>(pl.lists[0][it.row].numel());
      int64_t i = it.begin;
      if constexpr (kVectorized<P, P>) {
        using V = at::vec::Vectorized<M>;
        for (; i + V::size() <= it.end; i += V::size()) {
          V pv = V::loadu(p + i);
          const V x = math::equilibrium_value(pv, prep(V::loadu(g + i)), c);
          math::equilibrium_update(pv, x, mean, c);
          pv.store(p + i);
        }
      }
      if constexpr (kReduced<P>) {
        using V = at::vec::Vectorized<M>;
        for (; i + 2 * V::size() <= it.end; i += 2 * V::size()) {
          V p0, p1, g0, g1;
          load2<M>(p + i, p0, p1);
          load2<M>(g + i, g0, g1);
          const V x0 = math::equilibrium_value(p0, prep(g0), c);
          const V x1 = math::equilibrium_value(p1, prep(g1), c);
          math::equilibrium_update(p0, x0, mean, c);
          math::equilibrium_update(p1, x1, mean, c);
          store2<M>(p + i, p0, p1);
        }
      }
      for (; i < it.end; ++i) {
        M pv = static_cast<M>(p[i]);
        const M x = math::equilibrium_value(pv, prep(static_cast<M>(g[i])), c);
        math::equilibrium_update(pv, x, mean, c);
        p[i] = static_cast<P>(pv);
      }
    });
  });
  pl.finish();
}

}  // namespace
}  // namespace cpu
}  // namespace fused_optim

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("gravity_", &fused_optim::cpu::gravity_cpu);
  m.impl("lion_", &fused_optim::cpu::lion_cpu);
  m.impl("adan_", &fused_optim::cpu::adan_cpu);
  m.impl("gradient_equilibrium_", &fused_optim::cpu::gradient_equilibrium_cpu);
}
