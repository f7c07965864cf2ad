// CPU kernels of the composites' fused parts: lookahead_sync_, sam_perturb_,
// multi_tensor_copy_ (SAM's restore), muon_momentum_, muon_apply_, neuro_optima_.
//
// Same driver as fused_updates.cpp: host checks, then one parallel pass over (row, chunk) items.
// These ops mix storage dtypes in one row (fp32 slow weights or momentum for bf16 params, bf16
// Newton-Schulz updates for fp32 params), so their vector loops run pairs of math-type registers
// through load2/store2 whenever every list of the op allows it (kWide: fp32 math over any mix of
// fp32/bf16/fp16, or fp64 throughout) and the scalar loop does the tails and the rest. Stores round
// once, to nearest even, like the scalar loop's conversions: both give the same bits.

#include "capability.h"  // first: before any ATen header

#include "kernels.h"

#include <cstring>

#include "../math/common.h"
#include "vec_ops.h"
#include "../math/lookahead.h"
#include "../math/muon.h"
#include "../math/neuro_optima.h"
#include "../math/sam.h"
#include "multi_tensor_cpu.h"

namespace fused_optim {
namespace cpu {
namespace {

const at::Device kCPU(at::kCPU);

template <typename M>
constexpr int64_t kPair = 2 * at::vec::Vectorized<M>::size();  // elements per load2/store2

}  // namespace

void lookahead_sync_cpu(at::TensorList params, at::TensorList slows, double alpha) {
  const char* op = "fused_optim::lookahead_sync_";
  PreparedLists pl = prepare_lists(op, {params, slows}, {true, true});
  check_dtypes(op, pl, 1);
  if (pl.rows() == 0) {
    return;
  }
  const auto items = make_chunks(pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[1][0].scalar_type(), [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    const math::LookaheadCoeffs<M> c(alpha);
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      P* p = pl.ptr<P>(0, it.row);
      S* s = pl.ptr<S>(1, it.row);
      int64_t i = it.begin;
      if constexpr (kWide<M, P, S>) {
        using V = at::vec::Vectorized<M>;
        for (; i + kPair<M> <= it.end; i += kPair<M>) {
          V p0, p1, s0, s1;
          load2<M>(p + i, p0, p1);
          load2<M>(s + i, s0, s1);
          p0 = math::lookahead_interpolate(p0, s0, c);
          p1 = math::lookahead_interpolate(p1, s1, c);
          round_through<P>(p0, p1);  // slow.copy_(p): the stored (rounded) param
          store2<M>(p + i, p0, p1);
          store2<M>(s + i, p0, p1);
        }
      }
      for (; i < it.end; ++i) {
        const P v = static_cast<P>(math::lookahead_interpolate(static_cast<M>(p[i]), static_cast<M>(s[i]), c));
        p[i] = v;
        s[i] = static_cast<S>(static_cast<M>(v));
      }
    });
  });
  pl.finish();
}

namespace {

// SAM's scale: one float32 (or float64, for float64 params) element on the CPU.
double sam_scale(const char* op, const at::Tensor& scale, const at::Device& device) {
  TORCH_CHECK(scale.numel() == 1, op, ": scale must have one element, got ", scale.numel());
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble, op,
              ": scale must be float32 (float64 for float64 params), got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == device, op, ": scale is on ", scale.device(), ", expected ", device);
  return scale.item<double>();
}

}  // namespace

void sam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList old_params,
                     const at::Tensor& scale, bool adaptive) {
  const char* op = "fused_optim::sam_perturb_";
  const double scale_value = sam_scale(op, scale, kCPU);
  PreparedLists pl = prepare_lists(op, {params, grads, old_params}, {true, false, true});
  check_dtypes(op, pl, 1, 1);
  check_same_dtype(op, pl, 1, "grads", "params");
  check_same_dtype(op, pl, 2, "old_params", "params");
  if (pl.rows() == 0) {
    return;
  }
  const auto items = make_chunks(pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[0][0].scalar_type(), [&](auto pt, auto) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    const M sc = static_cast<M>(scale_value);
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      P* p = pl.ptr<P>(0, it.row);
      const P* g = pl.ptr<P>(1, it.row);
      P* old = pl.ptr<P>(2, it.row);
      int64_t i = it.begin;
      if constexpr (kWide<M, P>) {
        using V = at::vec::Vectorized<M>;
        const V vsc(sc);
        for (; i + kPair<M> <= it.end; i += kPair<M>) {
          std::memcpy(old + i, p + i, kPair<M> * sizeof(P));  // old_p = p, bit for bit
          V p0, p1, g0, g1;
          load2<M>(p + i, p0, p1);
          load2<M>(g + i, g0, g1);
          p0 = math::sam_perturb(p0, g0, vsc, adaptive);
          p1 = math::sam_perturb(p1, g1, vsc, adaptive);
          store2<M>(p + i, p0, p1);
        }
      }
      for (; i < it.end; ++i) {
        old[i] = p[i];
        p[i] = static_cast<P>(math::sam_perturb(static_cast<M>(p[i]), static_cast<M>(g[i]), sc, adaptive));
      }
    });
  });
  pl.finish();
}

void multi_tensor_copy_cpu(at::TensorList dst, at::TensorList src) {
  const char* op = "fused_optim::multi_tensor_copy_";
  PreparedLists pl = prepare_lists(op, {dst, src}, {true, false});
  check_same_dtype(op, pl, 1, "src", "dst");  // a bit copy keeps the dtype
  for (int64_t i = 1; i < pl.rows(); ++i) {       // one dtype per call, as on CUDA (one launch)
    TORCH_CHECK(pl.lists[0][i].scalar_type() == pl.lists[0][0].scalar_type(), op, ": one dtype per call, got ",
                pl.lists[0][0].scalar_type(), " and ", pl.lists[0][i].scalar_type());
  }
  const auto items = make_chunks(pl);
  for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
    const int64_t size = pl.lists[0][it.row].element_size();
    std::memcpy(static_cast<char*>(pl.lists[0][it.row].data_ptr()) + it.begin * size,
                static_cast<const char*>(pl.lists[1][it.row].data_ptr()) + it.begin * size,
                (it.end - it.begin) * size);
  });
  pl.finish();
}

void muon_momentum_cpu(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList updates,
                       double momentum, bool nesterov, bool maximize) {
  const char* op = "fused_optim::muon_momentum_";
  PreparedLists pl = prepare_lists(op, {grads, momentum_buffers, updates}, {false, true, true});
  check_dtypes(op, pl, 1, 2);  // momentum_buffers: the grads' dtype, or fp32 for bf16/fp16 grads
  if (pl.rows() == 0) {
    return;
  }
  const auto gdt = pl.lists[0][0].scalar_type();
  check_update_dtype(op, pl, 2, "updates", gdt);
  const auto items = make_chunks(pl);
  dispatch_param_state(op, gdt, pl.lists[1][0].scalar_type(), [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    dispatch_update_type<P>(pl.lists[2][0].scalar_type(), [&](auto ut) {
      using U = typename decltype(ut)::type;
      const math::MuonMomentumCoeffs<M> c(momentum, nesterov);
      const M sign = maximize ? M(-1) : M(1);
      for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
        const P* g = pl.ptr<P>(0, it.row);
        S* b = pl.ptr<S>(1, it.row);
        U* u = pl.ptr<U>(2, it.row);
        int64_t i = it.begin;
        if constexpr (kWide<M, P, S, U>) {
          using V = at::vec::Vectorized<M>;
          for (; i + kPair<M> <= it.end; i += kPair<M>) {
            V g0, g1, b0, b1;
            load2<M>(g + i, g0, g1);
            load2<M>(b + i, b0, b1);
            const V u0 = math::muon_momentum(math::prepare_grad(g0, sign, false, M(1)), b0, c);
            const V u1 = math::muon_momentum(math::prepare_grad(g1, sign, false, M(1)), b1, c);
            store2<M>(b + i, b0, b1);
            store2<M>(u + i, u0, u1);
          }
        }
        for (; i < it.end; ++i) {
          M bv = static_cast<M>(b[i]);
          const M uv = math::muon_momentum(math::prepare_grad(static_cast<M>(g[i]), sign, false, M(1)), bv, c);
          b[i] = static_cast<S>(bv);
          u[i] = static_cast<U>(uv);
        }
      });
    });
  });
  pl.finish();
}

void muon_apply_cpu(at::TensorList params, at::TensorList updates, at::ArrayRef<double> scales, double lr,
                    double weight_decay) {
  const char* op = "fused_optim::muon_apply_";
  TORCH_CHECK(scales.size() == params.size(), op, ": scales has ", scales.size(), " values, expected ",
              params.size(), " (one per parameter)");
  PreparedLists pl = prepare_lists(op, {params, updates}, {true, false});
  check_dtypes(op, pl, 1, 1);
  if (pl.rows() == 0) {
    return;
  }
  const auto pdt = pl.lists[0][0].scalar_type();
  check_update_dtype(op, pl, 1, "updates", pdt);
  const auto items = make_chunks(pl);
  dispatch_param_state(op, pdt, pdt, [&](auto pt, auto) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    dispatch_update_type<P>(pl.lists[1][0].scalar_type(), [&](auto ut) {
      using U = typename decltype(ut)::type;
      using MU = opmath_t<U>;  // `u *= scale` on the bf16 tensor: fp32 product with float32(scale)
      const math::MuonApplyCoeffs<M> c(lr, weight_decay);
      for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
        P* p = pl.ptr<P>(0, it.row);
        const U* u = pl.ptr<U>(1, it.row);
        const MU sc = static_cast<MU>(scales[it.row]);
        int64_t i = it.begin;
        if constexpr (kWide<M, P, U>) {  // here MU is M
          using V = at::vec::Vectorized<M>;
          const V vsc(sc);
          for (; i + kPair<M> <= it.end; i += kPair<M>) {
            V p0, p1, u0, u1;
            load2<M>(p + i, p0, p1);
            load2<M>(u + i, u0, u1);
            u0 = u0 * vsc;
            u1 = u1 * vsc;
            round_through<U>(u0, u1);  // upstream's in-place `u *= scale`: one rounding to u's dtype
            math::muon_apply(p0, u0, c);
            math::muon_apply(p1, u1, c);
            store2<M>(p + i, p0, p1);
          }
        }
        for (; i < it.end; ++i) {
          M pv = static_cast<M>(p[i]);
          math::muon_apply(pv, static_cast<M>(round_through<U>(static_cast<MU>(u[i]) * sc)), c);
          p[i] = static_cast<P>(pv);
        }
      });
    });
  });
  pl.finish();
}

void neuro_optima_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList prev_grads, double lr,
                      double beta1, double beta2, double eps, double weight_decay, bool maximize) {
  const char* op = "fused_optim::neuro_optima_";
  PreparedLists pl = prepare_lists(op, {params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads},
                                   {true, false, true, true, true, true});
  check_dtypes(op, pl, 2);
  if (pl.rows() == 0) {
    return;
  }
  const auto items = make_chunks(pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[2][0].scalar_type(), [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    const math::NeuroOptimaCoeffs<M> c(lr, beta1, beta2, eps, weight_decay);
    const M sign = maximize ? M(-1) : M(1);
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      P* p = pl.ptr<P>(0, it.row);
      const P* g = pl.ptr<P>(1, it.row);
      S* m = pl.ptr<S>(2, it.row);
      S* v = pl.ptr<S>(3, it.row);
      S* d = pl.ptr<S>(4, it.row);
      S* pg = pl.ptr<S>(5, it.row);
      int64_t i = it.begin;
      if constexpr (kWide<M, P, S>) {
        using V = at::vec::Vectorized<M>;
        for (; i + kPair<M> <= it.end; i += kPair<M>) {
          V p0, p1, g0, g1, m0, m1, v0, v1, d0, d1, q0, q1;
          load2<M>(p + i, p0, p1);
          load2<M>(g + i, g0, g1);
          load2<M>(m + i, m0, m1);
          load2<M>(v + i, v0, v1);
          load2<M>(d + i, d0, d1);
          load2<M>(pg + i, q0, q1);
          math::neuro_optima_update(p0, math::prepare_grad(g0, sign, false, M(1)), m0, v0, d0, q0, c);
          math::neuro_optima_update(p1, math::prepare_grad(g1, sign, false, M(1)), m1, v1, d1, q1, c);
          store2<M>(p + i, p0, p1);
          store2<M>(m + i, m0, m1);
          store2<M>(v + i, v0, v1);
          store2<M>(d + i, d0, d1);
          store2<M>(pg + i, q0, q1);
        }
      }
      for (; i < it.end; ++i) {
        M pv = static_cast<M>(p[i]), mv = static_cast<M>(m[i]), vv = static_cast<M>(v[i]),
          dv = static_cast<M>(d[i]), qv = static_cast<M>(pg[i]);
        math::neuro_optima_update(pv, math::prepare_grad(static_cast<M>(g[i]), sign, false, M(1)), mv, vv, dv, qv, c);
        p[i] = static_cast<P>(pv);
        m[i] = static_cast<S>(mv);
        v[i] = static_cast<S>(vv);
        d[i] = static_cast<S>(dv);
        pg[i] = static_cast<S>(qv);
      }
    });
  });
  pl.finish();
}

}  // namespace cpu
}  // namespace fused_optim

