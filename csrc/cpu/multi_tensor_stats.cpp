// CPU kernels of the per-tensor reductions: multi_tensor_stats (max|x|, sum(x), sum(x^2) in one pass)
// and multi_tensor_l2norm (SAM's per-tensor norms of g or |p| * g).
//
// Each (row, chunk) item reduces into its own slot; the slots are then combined row by row in
// chunk order, so the result does not depend on the thread count. Sums run in fp32 registers over
// short blocks (16 values per lane and accumulator) and in fp64 across blocks and chunks (torch's own fp32 sum is a cascade, about as
// accurate).

#include "capability.h"  // first: before any ATen header

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/zeros.h>

#include <array>
#include <cmath>
#include <limits>

#include "../math/common.h"
#include "vec_ops.h"
#include "../math/sam.h"
#include "multi_tensor_cpu.h"

namespace fused_optim {
namespace cpu {
namespace {

struct Partial {
  double absmax;
  double sum;
  double sumsq;
};

// One item. `a` is the addend row or nullptr. UNSCALE / ADDEND are template flags so the hot loop
// has no branches; UNSCALE reduces the value the update ops write back, t / scale rounded to P
// (math::amp_unscale: torch's in-place unscale); four independent accumulators per statistic keep the add/fma latency chains
// from bounding the loop below memory speed (measured: one chain ran at 6 GB/s on one core).
template <typename P, bool UNSCALE, bool ADDEND>
Partial stats_chunk(const P* t, const P* a, int64_t begin, int64_t end, opmath_t<P> sign, opmath_t<P> scale,
                    opmath_t<P> alpha) {
  using M = opmath_t<P>;
  auto value = [&](M x, M y) {
    if (UNSCALE) x = math::amp_unscale<P>(x, scale);
    x = x * sign;
    return ADDEND ? math::fo_fma(y, alpha, x) : x;
  };
  M amax = 0;
  double sum = 0, sumsq = 0;
  int64_t i = begin;
  // bf16/fp16 widen to the same fp32 registers, element for element, as their fp32 upcast would
  // load: a reduced row gives the bits of the fp32 row t.float() (tests/test_native.py checks it)
  if constexpr (kVectorized<P, P> || kReduced<P>) {
    using V = at::vec::Vectorized<M>;
    constexpr int64_t kU = 4;                      // independent accumulators
    constexpr int64_t kStep = kU * V::size();
    constexpr int64_t kBlock = 16 * kStep;         // fp32 partial sums over 16 values per lane at most
    const V vsign(sign), vscale(scale), valpha(alpha);
    V vmax[kU], vsum[kU], vsq[kU];
    for (int u = 0; u < kU; ++u) vmax[u] = V(M(0));
    double vec_sumsq = 0;
    while (i + kStep <= end) {
      const int64_t stop = std::min(end - (end - i) % kStep, i + kBlock);
      for (int u = 0; u < kU; ++u) vsum[u] = vsq[u] = V(M(0));
      for (; i < stop; i += kStep) {
        V xs[kU], as[kU];  // xs[u] = elements [i + u*size, i + (u+1)*size), in registers of M
        for (int u = 0; u < kU; u += 2) {
          load2<M>(t + i + u * V::size(), xs[u], xs[u + 1]);
          if (UNSCALE) {
            xs[u] = xs[u] / vscale;
            xs[u + 1] = xs[u + 1] / vscale;
            round_through<P>(xs[u], xs[u + 1]);  // bf16/fp16: the rounded value the update writes back
          }
          if (ADDEND) load2<M>(a + i + u * V::size(), as[u], as[u + 1]);
        }
#pragma GCC unroll 4
        for (int u = 0; u < kU; ++u) {
          V x = xs[u] * vsign;
          if (ADDEND) x = math::fo_fma(as[u], valpha, x);
          const V ax = x.abs();
          vmax[u] = V::blendv(vmax[u], ax, ax > vmax[u]);  // NaN never wins here: see vec_sumsq below
          vsum[u] = vsum[u] + x;
          vsq[u] = math::fo_fma(x, x, vsq[u]);
        }
      }
      std::array<M, V::size()> s{}, q{};
      ((vsum[0] + vsum[1]) + (vsum[2] + vsum[3])).store(s.data());
      ((vsq[0] + vsq[1]) + (vsq[2] + vsq[3])).store(q.data());
      for (int64_t l = 0; l < V::size(); ++l) {
        sum += s[l];
        vec_sumsq += q[l];
      }
    }
    std::array<M, V::size()> mx{};
    at::vec::maximum(at::vec::maximum(vmax[0], vmax[1]), at::vec::maximum(vmax[2], vmax[3])).store(mx.data());
    for (int64_t l = 0; l < V::size(); ++l) {
      amax = math::fo_max_nan(amax, mx[l]);
    }
    // a NaN makes the sum of squares NaN (no inf - inf there: every term is >= 0); torch.amax propagates it
    if (vec_sumsq != vec_sumsq) {
      amax = std::numeric_limits<M>::quiet_NaN();
    }
    sumsq += vec_sumsq;
  }
  for (; i < end; ++i) {
    const M x = value(static_cast<M>(t[i]), ADDEND ? static_cast<M>(a[i]) : M(0));
    amax = math::fo_max_nan(amax, math::fo_abs(x));
    sum += x;
    sumsq += static_cast<double>(x) * x;
  }
  return {static_cast<double>(amax), sum, sumsq};
}

}  // namespace

at::Tensor multi_tensor_stats(at::TensorList tensors, c10::optional<at::TensorList> addends, double alpha,
                              bool negate, const c10::optional<at::Tensor>& grad_scale) {
  const char* op = "fused_optim::multi_tensor_stats";
  ReductionLists r = prepare_reduction(op, tensors, addends, "addends", 3, at::Device(at::kCPU));
  PreparedLists& pl = r.pl;
  const at::ScalarType dtype = r.dtype;
  at::Tensor& out = r.out;
  check_scalar_tensor(op, "grad_scale", grad_scale, at::Device(at::kCPU));
  if (pl.rows() == 0) {
    return out;
  }
  const auto items = make_chunks(pl);
  std::vector<Partial> partials(items.size());
  const bool unscale = grad_scale.has_value();
  const float scale = read_scalar(scalar_ptr(grad_scale), 1.0f);
  dispatch_param_state(op, dtype, dtype, [&](auto pt, auto) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    for_each_chunk(items, [&](int64_t k, const ChunkItem& it) {
      const P* t = pl.ptr<P>(0, it.row);
      const P* a = addends.has_value() ? pl.ptr<P>(1, it.row) : nullptr;
      const M sign(negate ? -1 : 1);
      if (unscale) {
        partials[k] = a ? stats_chunk<P, true, true>(t, a, it.begin, it.end, sign, M(scale), M(alpha))
                        : stats_chunk<P, true, false>(t, a, it.begin, it.end, sign, M(scale), M(alpha));
      } else {
        partials[k] = a ? stats_chunk<P, false, true>(t, a, it.begin, it.end, sign, M(scale), M(alpha))
                        : stats_chunk<P, false, false>(t, a, it.begin, it.end, sign, M(scale), M(alpha));
      }
    });
  });
  // Combine in chunk order (items are sorted by row, then by offset).
  std::vector<double> acc(pl.rows() * 3, 0.0);
  for (size_t k = 0; k < items.size(); ++k) {
    double* r = acc.data() + items[k].row * 3;
    r[0] = math::fo_max_nan(r[0], partials[k].absmax);
    r[1] += partials[k].sum;
    r[2] += partials[k].sumsq;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "multi_tensor_stats_out", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t j = 0; j < pl.rows() * 3; ++j) {
      o[j] = static_cast<scalar_t>(acc[j]);
    }
  });
  return out;
}

namespace {

// Sum of squares of x = |w| * t (WEIGHTED: SAM's adaptive norm) or x = t over one chunk, with the
// accumulation scheme of stats_chunk: fp32 fma chains over short blocks, fp64 across them.
template <typename P, bool WEIGHTED>
double sumsq_chunk(const P* t, const P* w, int64_t begin, int64_t end) {
  using M = opmath_t<P>;
  double sumsq = 0;
  int64_t i = begin;
  if constexpr (kVectorized<P, P> || kReduced<P>) {
    using V = at::vec::Vectorized<M>;
    constexpr int64_t kU = 4;
    constexpr int64_t kStep = kU * V::size();
    constexpr int64_t kBlock = 16 * kStep;
    V vsq[kU];
    while (i + kStep <= end) {
      const int64_t stop = std::min(end - (end - i) % kStep, i + kBlock);
      for (int u = 0; u < kU; ++u) vsq[u] = V(M(0));
      for (; i < stop; i += kStep) {
        V xs[kU], ws[kU];
        for (int u = 0; u < kU; u += 2) {
          load2<M>(t + i + u * V::size(), xs[u], xs[u + 1]);
          if (WEIGHTED) load2<M>(w + i + u * V::size(), ws[u], ws[u + 1]);
        }
#pragma GCC unroll 4
        for (int u = 0; u < kU; ++u) {
          const V x = math::sam_norm_value(ws[u], xs[u], WEIGHTED);
          vsq[u] = math::fo_fma(x, x, vsq[u]);
        }
      }
      std::array<M, V::size()> q{};
      ((vsq[0] + vsq[1]) + (vsq[2] + vsq[3])).store(q.data());
      for (int64_t l = 0; l < V::size(); ++l) {
        sumsq += q[l];
      }
    }
  }
  for (; i < end; ++i) {
    const M x = math::sam_norm_value(WEIGHTED ? static_cast<M>(w[i]) : M(0), static_cast<M>(t[i]), WEIGHTED);
    sumsq += static_cast<double>(x) * x;
  }
  return sumsq;
}

}  // namespace

at::Tensor multi_tensor_l2norm(at::TensorList tensors, c10::optional<at::TensorList> abs_weights) {
  const char* op = "fused_optim::multi_tensor_l2norm";
  ReductionLists r = prepare_reduction(op, tensors, abs_weights, "abs_weights", 0, at::Device(at::kCPU));
  PreparedLists& pl = r.pl;
  const at::ScalarType dtype = r.dtype;
  at::Tensor& out = r.out;
  if (pl.rows() == 0) {
    return out;
  }
  const auto items = make_chunks(pl);
  std::vector<double> partials(items.size());
  const bool weighted = abs_weights.has_value();
  dispatch_param_state(op, dtype, dtype, [&](auto pt, auto) {
    using P = typename decltype(pt)::type;
    for_each_chunk(items, [&](int64_t k, const ChunkItem& it) {
      const P* t = pl.ptr<P>(0, it.row);
      partials[k] = weighted ? sumsq_chunk<P, true>(t, pl.ptr<P>(1, it.row), it.begin, it.end)
                             : sumsq_chunk<P, false>(t, nullptr, it.begin, it.end);
    });
  });
  std::vector<double> acc(pl.rows(), 0.0);
  for (size_t k = 0; k < items.size(); ++k) {  // in chunk order: independent of the thread count
    acc[items[k].row] += partials[k];
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "multi_tensor_l2norm_out", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t j = 0; j < pl.rows(); ++j) {
      o[j] = static_cast<scalar_t>(std::sqrt(acc[j]));
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace fused_optim

