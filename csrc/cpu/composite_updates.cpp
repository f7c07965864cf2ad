// CPU kernels of the composites' fused parts: lookahead_sync_, sam_perturb_,
// multi_tensor_copy_ (SAM's restore), muon_momentum_, muon_apply_, neuro_optima_.
//
// Same driver as fused_updates.cpp: host checks, then one parallel pass over (row, chunk) items, each
// through for_each_element (element_loop.h). These ops mix storage dtypes in one row (fp32 slow weights
// or momentum for bf16 params, bf16 Newton-Schulz updates for fp32 params): the loop vectorizes
// whenever every list allows it (kWide) and runs scalars otherwise.

#include "capability.h"  // first: before any ATen header

#include "kernels.h"

#include <cstring>

#include "../math/common.h"
#include "vec_ops.h"
#include "../math/lookahead.h"
#include "../math/muon.h"
#include "../math/neuro_optima.h"
#include "../math/sam.h"
#include "element_loop.h"

namespace fused_optim {
namespace cpu {
namespace {

const at::Device kCPU(at::kCPU);

}  // namespace

void lookahead_sync_(at::TensorList params, at::TensorList slows, double alpha) {
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
      for_each_element<M>(
          it.begin, it.end,
          [&](auto& p, auto& s) {
            p = round_through<P>(math::lookahead_interpolate(p, s, c));  // the stored (rounded) param
            s = p;                                                        // slow.copy_(p)
          },
          pl.ptr<P>(0, it.row), pl.ptr<S>(1, it.row));
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

void sam_perturb_(at::TensorList params, at::TensorList grads, at::TensorList old_params,
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
      // old_p = p, bit for bit
      std::memcpy(pl.ptr<P>(2, it.row) + it.begin, p + it.begin, (it.end - it.begin) * sizeof(P));
      for_each_element<M>(
          it.begin, it.end,
          [&](auto& pv, const auto& g) { pv = math::sam_perturb(pv, g, std::decay_t<decltype(pv)>(sc), adaptive); },
          p, static_cast<const P*>(pl.ptr<P>(1, it.row)));
    });
  });
  pl.finish();
}

void multi_tensor_copy_(at::TensorList dst, at::TensorList src) {
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

void muon_momentum_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList updates,
                    double momentum, bool nesterov, bool maximize) {
  const char* op = "fused_optim::muon_momentum_";
  PreparedLists pl = prepare_lists(op, {grads, momentum_buffers, updates}, {false, true, true});
  check_dtypes(op, pl, 1, 2);  // momentum_buffers: the grads' dtype, or fp32 for bf16/fp16 grads
  if (pl.rows() == 0) {
    return;
  }
  const auto items = make_chunks(pl);
  dispatch_muon(op, pl, 1, 2, [&](auto pt, auto st, auto ut) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    using U = typename decltype(ut)::type;
    const math::MuonMomentumCoeffs<M> c(momentum, nesterov);
    const M sign = maximize ? M(-1) : M(1);
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      for_each_element<M>(
          it.begin, it.end,
          [&](const auto& g, auto& b, auto& u) {
            u = math::muon_momentum(math::prepare_grad(g, sign, false, M(1)), b, c);
          },
          static_cast<const P*>(pl.ptr<P>(0, it.row)), pl.ptr<S>(1, it.row), Out<U>{pl.ptr<U>(2, it.row)});
    });
  });
  pl.finish();
}

void muon_apply_(at::TensorList params, at::TensorList updates, at::ArrayRef<double> scales, double lr,
                 double weight_decay) {
  const char* op = "fused_optim::muon_apply_";
  TORCH_CHECK(scales.size() == params.size(), op, ": scales has ", scales.size(), " values, expected ",
              params.size(), " (one per parameter)");
  PreparedLists pl = prepare_lists(op, {params, updates}, {true, false});
  check_dtypes(op, pl, 1, 1);
  if (pl.rows() == 0) {
    return;
  }
  const auto items = make_chunks(pl);
  dispatch_muon(op, pl, -1, 1, [&](auto pt, auto, auto ut) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    using U = typename decltype(ut)::type;
    using MU = opmath_t<U>;  // `u *= scale` on the bf16 tensor: fp32 product with float32(scale)
    const math::MuonApplyCoeffs<M> c(lr, weight_decay);
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      const MU sc = static_cast<MU>(scales[it.row]);
      for_each_element<M>(
          it.begin, it.end,
          [&](auto& p, const auto& u) {
            // upstream's in-place `u *= scale` on u's dtype: the product in MU, one rounding to U
            if constexpr (std::is_same<std::decay_t<decltype(u)>, M>::value) {
              math::muon_apply(p, static_cast<M>(round_through<U>(static_cast<MU>(u) * sc)), c);
            } else {  // vectorized: MU is M
              math::muon_apply(p, round_through<U>(u * decltype(u)(sc)), c);
            }
          },
          pl.ptr<P>(0, it.row), static_cast<const U*>(pl.ptr<U>(1, it.row)));
    });
  });
  pl.finish();
}

void neuro_optima_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
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
      for_each_element<M>(
          it.begin, it.end,
          [&](auto& p, const auto& g, auto& m, auto& v, auto& d, auto& q) {
            math::neuro_optima_update(p, math::prepare_grad(g, sign, false, M(1)), m, v, d, q, c);
          },
          pl.ptr<P>(0, it.row), static_cast<const P*>(pl.ptr<P>(1, it.row)), pl.ptr<S>(2, it.row),
          pl.ptr<S>(3, it.row), pl.ptr<S>(4, it.row), pl.ptr<S>(5, it.row));
    });
  });
  pl.finish();
}

}  // namespace cpu
}  // namespace fused_optim

