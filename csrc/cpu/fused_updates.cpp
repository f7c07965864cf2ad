// CPU kernels of the fused update ops (gravity_, lion_, adan_, gradient_equilibrium_).
//
// Each op: host checks, then one parallel pass over (row, chunk) items. fp32 (and fp64) rows run
// whole at::vec::Vectorized registers through the per-element rules of csrc/math/ and finish with
// the same rules on scalars; bf16/fp16 rows widen one reduced register into two fp32 ones (load2),
// run the same fp32 rules and round once on store (store2), so they give the scalar loop's bits
// (fp32 state stays fp32; before this they ran the scalar loop only: slower than the forloop
// reference for Gravity, Adan and GradientEquilibrium, bench/NOTES.md). Nothing is allocated per step
// except for rows that need contiguous copies.
//
// AMP (fused_optim.optimizer.supports_amp): with grad_scale, each grad element is divided by it,
// rounded to the grad's dtype, stored back and then used (GradIO): the separate foreach unscale pass
// and its extra read and write of every grad are saved. Device scalars (lr_tensor, ...: capturable)
// are read from their CPU tensors once per call and the derived scalars computed in the math type by
// the setters of csrc/math/ (the Triton kernels' order).

#include "capability.h"  // first: before any ATen header

#include "kernels.h"

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

// A runtime bool as a compile-time constant: the hot loops get no branch on it.
template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The grad as every update uses it, P its storage type: with UNSCALE, g / grad_scale rounded to P
// (math::amp_unscale) and written back into the grad, as torch's in-place unscale leaves it; then the
// maximize sign (exact; the negated value is never written).
template <typename P, typename M, bool UNSCALE>
struct GradIO {
  using V = at::vec::Vectorized<M>;
  M sign;
  M scale;
  V vsign;
  V vscale;
  GradIO(bool maximize, const c10::optional<at::Tensor>& grad_scale)
      : sign(maximize ? M(-1) : M(1)), scale(static_cast<M>(host_scalar(grad_scale, 1.0f))), vsign(sign),
        vscale(scale) {}
  // one register, P the math type (fp32 or fp64 storage)
  V load(P* g) const {
    V x = V::loadu(g);
    if constexpr (UNSCALE) {
      x = x / vscale;
      x.store(g);
    }
    return x * vsign;
  }
  // one reduced (bf16/fp16) register as two fp32 ones: divide, round once to P on the store, reuse the
  // rounded values (the vector narrowing rounds to nearest even like torch's own vectorized unscale)
  void load2(P* g, V& lo, V& hi) const {
    cpu::load2<M>(g, lo, hi);
    if constexpr (UNSCALE) {
      const auto r = at::vec::convert_from_float<P>(lo / vscale, hi / vscale);
      r.store(g);
      std::tie(lo, hi) = at::vec::convert_to_float<P>(r);
    }
    lo = lo * vsign;
    hi = hi * vsign;
  }
  M scalar(P* g) const {
    M x = static_cast<M>(*g);
    if constexpr (UNSCALE) {
      const P r = static_cast<P>(x / scale);
      *g = r;
      x = static_cast<M>(r);
    }
    return x * sign;
  }
};

// The value of an optional device-scalar tensor (a CPU tensor here: reading it is no sync).
inline float device_scalar(const c10::optional<at::Tensor>& t) { return host_scalar(t, 0.0f); }

}  // namespace

void lion_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, double lr, double beta1,
              double beta2, double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_scale,
              const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor) {
  const char* op = "fused_optim::lion_";
  check_scalar_tensor(op, "grad_scale", grad_scale, kCPU);
  check_scalar_tensor(op, "found_inf", found_inf, kCPU);
  check_scalar_tensor(op, "lr_tensor", lr_tensor, kCPU);
  PreparedLists pl = prepare_lists(op, {params, grads, exp_avgs}, {true, grad_scale.has_value(), true});
  check_dtypes(op, pl, 2);
  if (pl.rows() == 0 || host_found_inf(found_inf)) {
    return;
  }
  const auto items = make_chunks(pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[2][0].scalar_type(), [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    math::LionCoeffs<M> c(lr, beta1, beta2, weight_decay);
    if (lr_tensor.has_value()) {
      c.set_lr(static_cast<M>(device_scalar(lr_tensor)));
    }
    dispatch_bool(grad_scale.has_value(), [&](auto unscale) {
      const GradIO<P, M, decltype(unscale)::value> gio(maximize, grad_scale);
      for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
        P* p = pl.ptr<P>(0, it.row);
        P* g = pl.ptr<P>(1, it.row);
        S* m = pl.ptr<S>(2, it.row);
        int64_t i = it.begin;
        if constexpr (kVectorized<P, S>) {
          using V = at::vec::Vectorized<M>;
          for (; i + V::size() <= it.end; i += V::size()) {
            V pv = V::loadu(p + i), mv = V::loadu(m + i);
            math::lion_update(pv, gio.load(g + i), mv, c);
            pv.store(p + i);
            mv.store(m + i);
          }
        }
        if constexpr (kReduced<P>) {
          using V = at::vec::Vectorized<M>;
          for (; i + 2 * V::size() <= it.end; i += 2 * V::size()) {
            V p0, p1, g0, g1, m0, m1;
            load2<M>(p + i, p0, p1);
            gio.load2(g + i, g0, g1);
            load2<M>(m + i, m0, m1);
            math::lion_update(p0, g0, m0, c);
            math::lion_update(p1, g1, m1, c);
            store2<M>(p + i, p0, p1);
            store2<M>(m + i, m0, m1);
          }
        }
        for (; i < it.end; ++i) {
          M pv = static_cast<M>(p[i]), mv = static_cast<M>(m[i]);
          math::lion_update(pv, gio.scalar(g + i), mv, c);
          p[i] = static_cast<P>(pv);
          m[i] = static_cast<S>(mv);
        }
      });
    });
  });
  pl.finish();
}

void gravity_cpu(at::TensorList params, at::TensorList grads, at::TensorList vs, const at::Tensor& stats,
                 double lr, double beta_hat, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                 const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor,
                 const c10::optional<at::Tensor>& beta_hat_tensor) {
  const char* op = "fused_optim::gravity_";
  check_scalar_tensor(op, "grad_scale", grad_scale, kCPU);
  check_scalar_tensor(op, "found_inf", found_inf, kCPU);
  check_scalar_tensor(op, "lr_tensor", lr_tensor, kCPU);
  check_scalar_tensor(op, "beta_hat_tensor", beta_hat_tensor, kCPU);
  PreparedLists pl = prepare_lists(op, {params, grads, vs}, {true, grad_scale.has_value(), true});
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
    math::GravityCoeffs<M> c(lr, beta_hat);
    if (lr_tensor.has_value()) {
      c.set_lr(static_cast<M>(device_scalar(lr_tensor)));
    }
    if (beta_hat_tensor.has_value()) {
      c.set_beta_hat(static_cast<M>(device_scalar(beta_hat_tensor)));
    }
    dispatch_bool(grad_scale.has_value(), [&](auto unscale) {
      const GradIO<P, M, decltype(unscale)::value> gio(maximize, grad_scale);
      for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
        P* p = pl.ptr<P>(0, it.row);
        P* g = pl.ptr<P>(1, it.row);
        S* v = pl.ptr<S>(2, it.row);
        const M m = math::gravity_m(static_cast<M>(absmax_ptr[it.row]));
        int64_t i = it.begin;
        if constexpr (kVectorized<P, S>) {
          using V = at::vec::Vectorized<M>;
          for (; i + V::size() <= it.end; i += V::size()) {
            V pv = V::loadu(p + i), vv = V::loadu(v + i);
            math::gravity_update(pv, gio.load(g + i), vv, m, c);
            pv.store(p + i);
            vv.store(v + i);
          }
        }
        if constexpr (kReduced<P>) {
          using V = at::vec::Vectorized<M>;
          for (; i + 2 * V::size() <= it.end; i += 2 * V::size()) {
            V p0, p1, g0, g1, v0, v1;
            load2<M>(p + i, p0, p1);
            gio.load2(g + i, g0, g1);
            load2<M>(v + i, v0, v1);
            math::gravity_update(p0, g0, v0, m, c);
            math::gravity_update(p1, g1, v1, m, c);
            store2<M>(p + i, p0, p1);
            store2<M>(v + i, v0, v1);
          }
        }
        for (; i < it.end; ++i) {
          M pv = static_cast<M>(p[i]), vv = static_cast<M>(v[i]);
          math::gravity_update(pv, gio.scalar(g + i), vv, m, c);
          p[i] = static_cast<P>(pv);
          v[i] = static_cast<S>(vv);
        }
      });
    });
  });
  pl.finish();
}

void adan_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
              at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads, double lr, double beta1, double beta2,
              double beta3, double bias_correction1, double bias_correction2, double bias_correction3_sqrt,
              double eps, double weight_decay, bool no_prox, const c10::optional<at::Tensor>& clip, bool maximize,
              const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
              const c10::optional<at::Tensor>& lr_tensor, const c10::optional<at::Tensor>& bias_correction1_tensor,
              const c10::optional<at::Tensor>& bias_correction2_tensor,
              const c10::optional<at::Tensor>& bias_correction3_sqrt_tensor,
              const c10::optional<at::Tensor>& first_step) {
  const char* op = "fused_optim::adan_";
  check_scalar_tensor(op, "clip", clip, kCPU);
  check_scalar_tensor(op, "grad_scale", grad_scale, kCPU);
  check_scalar_tensor(op, "found_inf", found_inf, kCPU);
  check_scalar_tensor(op, "lr_tensor", lr_tensor, kCPU);
  check_scalar_tensor(op, "bias_correction1_tensor", bias_correction1_tensor, kCPU);
  check_scalar_tensor(op, "bias_correction2_tensor", bias_correction2_tensor, kCPU);
  check_scalar_tensor(op, "bias_correction3_sqrt_tensor", bias_correction3_sqrt_tensor, kCPU);
  check_scalar_tensor(op, "first_step", first_step, kCPU);
  const bool bc_tensors = check_adan_bias_corrections(op, bias_correction1_tensor, bias_correction2_tensor,
                                                      bias_correction3_sqrt_tensor);
  PreparedLists pl = prepare_lists(op, {params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads},
                                   {true, grad_scale.has_value(), true, true, true, true});
  check_dtypes(op, pl, 2);
  if (pl.rows() == 0 || host_found_inf(found_inf)) {
    return;
  }
  const float clip_value = host_scalar(clip, 1.0f);
  const bool first = device_scalar(first_step) != 0.0f;
  const auto items = make_chunks(pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[2][0].scalar_type(), [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    math::AdanCoeffs<M> c(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, bias_correction3_sqrt, eps,
                          weight_decay, no_prox);
    if (lr_tensor.has_value()) {
      c.set_lr(static_cast<M>(device_scalar(lr_tensor)));
    }
    if (bc_tensors) {
      c.set_bias_corrections(static_cast<M>(device_scalar(bias_correction1_tensor)),
                             static_cast<M>(device_scalar(bias_correction2_tensor)),
                             static_cast<M>(device_scalar(bias_correction3_sqrt_tensor)));
    }
    if (lr_tensor.has_value() || bc_tensors) {
      c.update_step_sizes();
    }
    const M cl = static_cast<M>(clip_value);
    dispatch_bool(grad_scale.has_value(), [&](auto unscale) {
      const GradIO<P, M, decltype(unscale)::value> gio(maximize, grad_scale);
      for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
        P* p = pl.ptr<P>(0, it.row);
        P* g = pl.ptr<P>(1, it.row);
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
            math::adan_update(pv, gio.load(g + i), mv, sv, dv, nv, cl, c, first);
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
            gio.load2(g + i, g0, g1);
            load2<M>(m + i, m0, m1);
            load2<M>(s + i, s0, s1);
            load2<M>(d + i, d0, d1);
            load2<M>(n + i, n0, n1);
            math::adan_update(p0, g0, m0, s0, d0, n0, cl, c, first);
            math::adan_update(p1, g1, m1, s1, d1, n1, cl, c, first);
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
          math::adan_update(pv, gio.scalar(g + i), mv, sv, dv, nv, cl, c, first);
          p[i] = static_cast<P>(pv);
          m[i] = static_cast<S>(mv);
          s[i] = static_cast<S>(sv);
          d[i] = static_cast<S>(dv);
          n[i] = static_cast<S>(nv);
        }
      });
    });
  });
  pl.finish();
}

void gradient_equilibrium_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& stats, double lr,
                              double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                              const c10::optional<at::Tensor>& found_inf,
                              const c10::optional<at::Tensor>& lr_tensor) {
  const char* op = "fused_optim::gradient_equilibrium_";
  check_scalar_tensor(op, "grad_scale", grad_scale, kCPU);
  check_scalar_tensor(op, "found_inf", found_inf, kCPU);
  check_scalar_tensor(op, "lr_tensor", lr_tensor, kCPU);
  PreparedLists pl = prepare_lists(op, {params, grads}, {true, grad_scale.has_value()});
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
    math::EquilibriumCoeffs<M> c(lr, weight_decay);
    if (lr_tensor.has_value()) {
      c.set_lr(static_cast<M>(device_scalar(lr_tensor)));
    }
    dispatch_bool(grad_scale.has_value(), [&](auto unscale) {
      const GradIO<P, M, decltype(unscale)::value> gio(maximize, grad_scale);
      for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
        P* p = pl.ptr<P>(0, it.row);
        P* g = pl.ptr<P>(1, it.row);
        // torch's mean: the sum in the math type, divided by numel in the math type
        const M mean = static_cast<M>(sum_ptr[it.row]) / static_cast<M>(pl.lists[0][it.row].numel());
        int64_t i = it.begin;
        if constexpr (kVectorized<P, P>) {
          using V = at::vec::Vectorized<M>;
          for (; i + V::size() <= it.end; i += V::size()) {
            V pv = V::loadu(p + i);
            const V x = math::equilibrium_value(pv, gio.load(g + i), c);
            math::equilibrium_update(pv, x, mean, c);
            pv.store(p + i);
          }
        }
        if constexpr (kReduced<P>) {
          using V = at::vec::Vectorized<M>;
          for (; i + 2 * V::size() <= it.end; i += 2 * V::size()) {
            V p0, p1, g0, g1;
            load2<M>(p + i, p0, p1);
            gio.load2(g + i, g0, g1);
            const V x0 = math::equilibrium_value(p0, g0, c);
            const V x1 = math::equilibrium_value(p1, g1, c);
            math::equilibrium_update(p0, x0, mean, c);
            math::equilibrium_update(p1, x1, mean, c);
            store2<M>(p + i, p0, p1);
          }
        }
        for (; i < it.end; ++i) {
          M pv = static_cast<M>(p[i]);
          const M x = math::equilibrium_value(pv, gio.scalar(g + i), c);
          math::equilibrium_update(pv, x, mean, c);
          p[i] = static_cast<P>(pv);
        }
      });
    });
  });
  pl.finish();
}

}  // namespace cpu
}  // namespace fused_optim

