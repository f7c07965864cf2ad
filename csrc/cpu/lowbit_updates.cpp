// CPU kernels of the lowbit ops (docs/lowbit.md §5): the update of an elementwise rule (Lion), Adan,
// Gravity or NeuroOptima's core over bf16 or 8-bit state, and stochastically rounded bf16 / fp16 params, in one
// pass per tensor; Muon's momentum stage over its bf16 / 8-bit buffer and its apply stage with rounded
// bf16 / fp16 params, the same pass with lists of their own.
//
// Per block of 256 elements (docs/lowbit.md §3): the param, the prepared grad (AMP unscale written
// back, maximize) and every state tensor decoded to fp32 local buffers (bf16 widened; 8-bit codes
// times the block's scale), the rule's fp32 math over the buffers with the element loop
// (for_each_element: the same per-element function and roundings as the fp32 op), then the state
// encoded (bf16: stochastic rounding, stream 1 + j; 8-bit: the block's new absmax over the buffer,
// then every code to nearest) and the param stored (bf16 with param_sr: stochastic rounding, stream
// 0). This is fused_optim.lowstate.reference_step over the fp32 op, bit for bit, without its fp32
// copies of the state. A found_inf step returns before anything is read or written.

#include "capability.h"  // first: before any ATen header

#include "kernels.h"

#include "../math/common.h"
#include "vec_ops.h"
#include "../math/adan.h"
#include "../math/elementwise_rules.h"
#include "../math/gravity.h"
#include "../math/muon.h"
#include "../math/neuro_optima.h"
#include "../lowbit_plan.h"
#include "../math/lowbit.h"
#include "element_loop.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <array>
#include <string>
#include <utility>

namespace fused_optim {
namespace cpu {
namespace {

namespace lb = ::fused_optim::lowbit;

using lb::k8bit;
using lb::kBf16;
using lb::kFp32;
using lb::LowbitPlan;

template <typename P>
inline void store_param(P* p, float x, bool sr, uint32_t word) {
  if constexpr (std::is_same<P, c10::BFloat16>::value) {
    if (sr) {
      *p = c10::BFloat16(lb::sr_bf16_bits(x, word), c10::BFloat16::from_bits());
      return;
    }
  } else if constexpr (std::is_same<P, c10::Half>::value) {
    if (sr) {
      *p = c10::Half(lb::sr_fp16_bits(x, word), c10::Half::from_bits());
      return;
    }
  }
  *p = static_cast<P>(x);
}

// The four Philox words of elements b0 .. b0+n-1 of tensor counter word c2: the header's per-element
// call in a loop of its own, which the compiler vectorizes (bf16 state's cost is mostly this).
void block_words(uint64_t seed, uint32_t step, uint32_t c2, int64_t b0, int64_t n, uint32_t (&w)[4][lb::kQuantBlock]) {
  for (int64_t e = 0; e < n; ++e) {
    const lb::Philox4 r = lb::random_words(seed, step, c2, static_cast<uint64_t>(b0 + e));
    w[0][e] = r.w[0];
    w[1][e] = r.w[1];
    w[2][e] = r.w[2];
    w[3][e] = r.w[3];
  }
}

// The codes of a block's n values against its scaled_thresholds table: lowbit.h's quantize_scaled, eight
// (AVX2) or sixteen (AVX512) elements at a time with gathered thresholds (the same comparisons, so the
// same codes; 3x faster than the scalar search here), then the scalar function for the tail.
template <bool Signed>
void quantize_block(const float* x, int64_t n, const float* table, uint8_t* out) {
  int64_t e = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  using V = at::vec::Vectorized<float>;
  using VI = at::vec::Vectorized<int32_t>;
  for (; e + V::size() <= n; e += V::size()) {
    const V xv = V::loadu(x + e);
    const V a = xv.abs();  // the sign bit cleared, NaN kept: compares false like the scalar |x|
    VI idx(0);
    for (int step = Signed ? 64 : 128; step > 0; step >>= 1) {
      const V t = at::vec::gather<sizeof(float)>(table, idx + VI(step - 1));
      idx = idx + (at::vec::cast<int32_t>(a >= t) & VI(step));  // the comparison's all-ones mask
    }
    if (Signed) idx = idx | ((at::vec::cast<int32_t>(xv) < VI(0)) & VI(128));  // x's sign bit as bit 7
    int32_t codes[V::size()];
    idx.store(codes);
    for (int k = 0; k < V::size(); ++k) out[e + k] = static_cast<uint8_t>(codes[k]);
  }
#endif
  for (; e < n; ++e) out[e] = lb::quantize_scaled<Signed>(x[e], table);
}

template <int NS, typename F, size_t... K>
inline void block_math(int64_t n, const F& f, float* pb, const float* gb, std::array<std::array<float, 256>, NS>& sb,
                       std::index_sequence<K...>) {
  for_each_element<float>(0, n, f, pb, gb, sb[K].data()...);
}

// The pass: row_update(row) gives tensor `row`'s fp32 element function update(p, g, s...) (T: float or
// Vec<float>; a per-tensor value such as Gravity's m is read there). P: list 0's storage (the params, or
// Muon's Newton-Schulz input), G: list 1's (the grads, or Muon's updates).
template <typename P, typename G, int NS, typename RowUpdate>
void lowbit_pass(const LowbitPlan& plan, const std::vector<at::TensorList>& lists, const LowbitArgs& l,
                 bool maximize, const c10::optional<at::Tensor>& grad_scale, const RowUpdate& row_update) {
  const bool unscale = grad_scale.has_value();
  const GradPrep<G, float, true> prep_unscale(maximize, grad_scale);
  const GradPrep<G, float, false> prep(maximize, grad_scale);
  std::vector<ChunkItem> items;
  for (int64_t i = 0; i < plan.rows; ++i) {
    const int64_t n = lists[0][i].numel();
    for (int64_t b = 0; b < n; b += kChunk) items.push_back({i, b, std::min(n, b + kChunk)});  // kChunk % 256 == 0
  }
  static_assert(kChunk % lb::kQuantBlock == 0, "chunks hold whole quantization blocks");
  const bool param_sr = plan.param_sr && !std::is_same<P, float>::value;  // bf16 and fp16 params
  const bool state_sr = plan.fmt == kBf16;
  for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
    const int64_t row = it.row;
    const auto update = row_update(row);
    const auto f = [&](auto& p, auto& g, auto&... s) { update(p, g, s...); };
    P* p = static_cast<P*>(lists[0][row].data_ptr());
    G* g = static_cast<G*>(lists[1][row].data_ptr());
    std::array<void*, NS> sp;
    std::array<float*, NS> absmax{};
    for (int j = 0; j < NS; ++j) {
      sp[j] = lists[2 + j][row].data_ptr();
      if (plan.fmt == k8bit) absmax[j] = l.absmax[j * plan.rows + row].data_ptr<float>();
    }
    const uint32_t ti = static_cast<uint32_t>(plan.tensor_index[row]);
    alignas(64) float pb[lb::kQuantBlock];
    alignas(64) float gb[lb::kQuantBlock];
    alignas(64) std::array<std::array<float, lb::kQuantBlock>, NS> sb;
    alignas(64) uint32_t words[2][4][lb::kQuantBlock];  // Philox words: counter word c2 = ti, ti + 2^31
    float table[lb::kUnsignedMagnitudes];                // a block's scaled thresholds
    for (int64_t b0 = it.begin; b0 < it.end; b0 += lb::kQuantBlock) {
      const int64_t n = std::min<int64_t>(lb::kQuantBlock, it.end - b0);
      const int64_t blk = b0 / lb::kQuantBlock;
      // decode
      for (int64_t e = 0; e < n; ++e) {
        pb[e] = static_cast<float>(p[b0 + e]);
        float x = static_cast<float>(g[b0 + e]);
        if (unscale) {
          gb[e] = prep_unscale(x);
          g[b0 + e] = static_cast<G>(x);  // the unscaled grad, exact in G (rounded through it)
        } else {
          gb[e] = prep(x);
        }
      }
      for (int j = 0; j < NS; ++j) {
        float* s = sb[j].data();
        if (plan.fmt == kFp32) {
          const float* src = static_cast<const float*>(sp[j]) + b0;
          for (int64_t e = 0; e < n; ++e) s[e] = src[e];
        } else if (plan.fmt == kBf16) {
          const uint16_t* src = static_cast<const uint16_t*>(sp[j]) + b0;
          for (int64_t e = 0; e < n; ++e) s[e] = lb::bf16_bits_to_float(src[e]);
        } else {
          const uint8_t* src = static_cast<const uint8_t*>(sp[j]) + b0;
          const float scale = absmax[j][blk];
          if (plan.is_signed[j]) {
            for (int64_t e = 0; e < n; ++e) s[e] = lb::dequantize_value<true>(src[e], scale, plan.mags[j]);
          } else {
            for (int64_t e = 0; e < n; ++e) s[e] = lb::dequantize_value<false>(src[e], scale, plan.mags[j]);
          }
        }
      }
      // the fp32 math, vectorized like the fp32 op
      block_math<NS>(n, f, pb, gb, sb, std::make_index_sequence<NS>{});
      // encode
      if (plan.fmt == k8bit) {
        for (int j = 0; j < NS; ++j) {
          const float* s = sb[j].data();
          uint8_t* dst = static_cast<uint8_t*>(sp[j]) + b0;
          const float scale = lb::block_absmax(s, n);
          absmax[j][blk] = scale;
          if (plan.is_signed[j]) {
            lb::scaled_thresholds(plan.thr[j], scale, lb::kSignedMagnitudes - 1, table);
            quantize_block<true>(s, n, table, dst);
          } else {
            lb::scaled_thresholds(plan.thr[j], scale, lb::kUnsignedMagnitudes - 1, table);
            quantize_block<false>(s, n, table, dst);
          }
        }
      } else if (plan.fmt == kFp32) {
        for (int j = 0; j < NS; ++j) {
          float* dst = static_cast<float*>(sp[j]) + b0;
          for (int64_t e = 0; e < n; ++e) dst[e] = sb[j][e];
        }
      }
      if (param_sr || state_sr) {
        // stream s: word s % 4 of the Philox call with counter word c2 = ti + (s / 4) * 2^31
        block_words(plan.seed, plan.step, ti, b0, n, words[0]);
        if (state_sr && NS >= 4) block_words(plan.seed, plan.step, ti + 0x80000000u, b0, n, words[1]);
        if (state_sr) {
          for (int j = 0; j < NS; ++j) {
            const uint32_t* r = words[(1 + j) / 4][(1 + j) % 4];
            uint16_t* dst = static_cast<uint16_t*>(sp[j]) + b0;
            for (int64_t e = 0; e < n; ++e) dst[e] = lb::sr_bf16_bits(sb[j][e], r[e]);
          }
        }
        for (int64_t e = 0; e < n; ++e) store_param(p + b0 + e, pb[e], param_sr, words[0][0][e]);
      } else {
        for (int64_t e = 0; e < n; ++e) store_param(p + b0 + e, pb[e], false, 0);
      }
    }
  });
}

// Runs the pass with P the params' storage type (row_update: see lowbit_pass).
template <int NS, typename RowUpdate>
void lowbit_dispatch(const char* op, const std::vector<at::TensorList>& lists, const LowbitArgs& l, bool maximize,
                     const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                     const RowUpdate& update) {
  LowbitPlan plan = lb::plan_lowbit(op, lists, l, at::Device(at::kCPU));
  if (plan.step_counter != nullptr) plan.step = lb::step_of_counter(*plan.step_counter);
  TORCH_CHECK(plan.n_states == NS, op, ": ", NS, " state lists expected");
  if (plan.rows == 0 || host_found_inf(found_inf)) return;  // AMP's skip: nothing read or written
  switch (lists[0][0].scalar_type()) {
    case at::kFloat:
      return lowbit_pass<float, float, NS>(plan, lists, l, maximize, grad_scale, update);
    case at::kBFloat16:
      return lowbit_pass<c10::BFloat16, c10::BFloat16, NS>(plan, lists, l, maximize, grad_scale, update);
    default:
      return lowbit_pass<c10::Half, c10::Half, NS>(plan, lists, l, maximize, grad_scale, update);
  }
}

// Muon's stages: list 0 stored as P (void: any of the three, dispatched), list 1 as G; no AMP
template <int NS, typename P, typename G, typename RowUpdate>
void muon_lowbit_pass(const char* op, const std::vector<at::TensorList>& lists, LowbitPlan plan, const LowbitArgs& l,
                      bool maximize, const RowUpdate& update) {
  if (plan.step_counter != nullptr) plan.step = lb::step_of_counter(*plan.step_counter);
  TORCH_CHECK(plan.n_states == NS, op, ": ", NS, " state lists expected");
  if (plan.rows == 0) return;
  if constexpr (std::is_void<P>::value) {
    lb::dispatch_type(lists[0][0].scalar_type(), [&](auto pt) {
      lowbit_pass<typename decltype(pt)::type, G, NS>(plan, lists, l, maximize, {}, update);
    });
  } else {
    lowbit_pass<P, G, NS>(plan, lists, l, maximize, {}, update);
  }
}

template <typename M>
M tensor_scalar(const c10::optional<at::Tensor>& t) {
  return static_cast<M>(read_scalar(scalar_ptr(t), 0.0f));
}

void check_scalars(const char* op, const c10::optional<at::Tensor>& grad_scale,
                   const c10::optional<at::Tensor>& found_inf, const std::vector<NamedScalar>& scalars) {
  const at::Device cpu(at::kCPU);
  check_scalar_tensor(op, "grad_scale", grad_scale, cpu);
  check_scalar_tensor(op, "found_inf", found_inf, cpu);
  for (const auto& s : scalars) check_scalar_tensor(op, s.name, *s.tensor, cpu);
}

template <typename Rule, size_t... K>
void run_rule_lowbit(const ElementwiseArgs& a, const LowbitArgs& l, std::index_sequence<K...>) {
  using Shape = RuleShape<Rule>;
  const char* op = a.op.c_str();
  check_scalars(op, a.grad_scale, a.found_inf, named_scalars(a.tensor_scalar_names, a.tensor_scalars));
  auto c = Rule::template coeffs<float>(a.scalars.data(), a.flags.data());
  for (int i = 0; i < Shape::kTensorScalars; ++i) {
    if (a.tensor_scalars[i].has_value()) Rule::set_tensor_scalar(c, i, tensor_scalar<float>(a.tensor_scalars[i]));
  }
  lowbit_dispatch<Shape::kStates>(op, a.list_refs(), l, a.maximize, a.grad_scale, a.found_inf, [&](int64_t) {
    return [&](auto& p, auto& g, auto&... s) { Rule::update(p, g, c, s...); };
  });
}

}  // namespace

template <typename Rule>
void run_elementwise_lowbit(const ElementwiseArgs& a, const LowbitArgs& l) {
  run_rule_lowbit<Rule>(a, l, std::make_index_sequence<RuleShape<Rule>::kStates>{});
}

#define FO_INSTANTIATE(Rule) template void run_elementwise_lowbit<math::Rule>(const ElementwiseArgs&, const LowbitArgs&);
FO_ELEMENTWISE_RULES(FO_INSTANTIATE)
#undef FO_INSTANTIATE

void adan_lowbit_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads, at::TensorList absmax,
                  const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt, bool param_sr, int64_t seed,
                  int64_t step, const OptTensor& step_tensor, at::IntArrayRef tensor_index, double lr, double beta1,
                  double beta2, double beta3, double bias_correction1, double bias_correction2,
                  double bias_correction3_sqrt, double eps,
                  double weight_decay, bool no_prox, const OptTensor& clip, bool maximize, const OptTensor& grad_scale,
                  const OptTensor& found_inf, const OptTensor& lr_tensor, const OptTensor& bias_correction1_tensor,
                  const OptTensor& bias_correction2_tensor, const OptTensor& bias_correction3_sqrt_tensor,
                  const OptTensor& first_step) {
  const char* op = "fused_optim::adan_lowbit_";
  check_scalar_tensor(op, "clip", clip, at::Device(at::kCPU));
  const bool bc_tensors = check_adan_bias_corrections(op, bias_correction1_tensor, bias_correction2_tensor,
                                                      bias_correction3_sqrt_tensor);
  check_scalars(op, grad_scale, found_inf,
                {{"lr_tensor", &lr_tensor},
                 {"bias_correction1_tensor", &bias_correction1_tensor},
                 {"bias_correction2_tensor", &bias_correction2_tensor},
                 {"bias_correction3_sqrt_tensor", &bias_correction3_sqrt_tensor},
                 {"first_step", &first_step}});
  const LowbitArgs l =
      lb::lowbit_args(absmax, tables, signed_maps, fmt, param_sr, seed, step, step_tensor, tensor_index);
  math::AdanCoeffs<float> c(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, bias_correction3_sqrt, eps,
                            weight_decay, no_prox);
  if (lr_tensor.has_value()) c.set_lr(tensor_scalar<float>(lr_tensor));
  if (bc_tensors) {
    c.set_bias_corrections(tensor_scalar<float>(bias_correction1_tensor), tensor_scalar<float>(bias_correction2_tensor),
                           tensor_scalar<float>(bias_correction3_sqrt_tensor));
  }
  if (lr_tensor.has_value() || bc_tensors) c.update_step_sizes();
  const float cl = read_scalar(scalar_ptr(clip), 1.0f);
  const bool first = read_scalar(scalar_ptr(first_step), 0.0f) != 0.0f;
  lowbit_dispatch<4>(op, {params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads}, l, maximize,
                     grad_scale, found_inf, [&](int64_t) {
                       return [&](auto& p, auto& g, auto& m, auto& s, auto& d, auto& n) {
                         math::adan_update(p, g, m, s, d, n, cl, c, first);
                       };
                     });
}

void gravity_lowbit_(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList absmax,
                     const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt, bool param_sr, int64_t seed,
                     int64_t step, const OptTensor& step_tensor, at::IntArrayRef tensor_index, const at::Tensor& stats,
                     double lr, double beta_hat, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf,
                     const OptTensor& lr_tensor, const OptTensor& beta_hat_tensor) {
  const char* op = "fused_optim::gravity_lowbit_";
  check_scalars(op, grad_scale, found_inf, {{"lr_tensor", &lr_tensor}, {"beta_hat_tensor", &beta_hat_tensor}});
  check_stats(op, stats, static_cast<int64_t>(params.size()), at::Device(at::kCPU));
  const LowbitArgs l =
      lb::lowbit_args(absmax, tables, signed_maps, fmt, param_sr, seed, step, step_tensor, tensor_index);
  math::GravityCoeffs<float> c(lr, beta_hat);
  if (lr_tensor.has_value()) c.set_lr(tensor_scalar<float>(lr_tensor));
  if (beta_hat_tensor.has_value()) c.set_beta_hat(tensor_scalar<float>(beta_hat_tensor));
  // max|g| per tensor, as gravity_ reads it (column 0, through double)
  const at::Tensor amax = stats.select(1, 0).to(at::kDouble).contiguous();
  const double* amax_ptr = amax.data_ptr<double>();
  lowbit_dispatch<1>(op, {params, grads, vs}, l, maximize, grad_scale, found_inf, [&](int64_t row) {
    const float m = math::gravity_m(static_cast<float>(amax_ptr[row]));
    return [&c, m](auto& p, auto& g, auto& v) { math::gravity_update(p, g, v, m, c); };
  });
}

void neuro_optima_lowbit_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList prev_grads,
                          at::TensorList absmax, const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt,
                          bool param_sr, int64_t seed, int64_t step, const OptTensor& step_tensor,
                          at::IntArrayRef tensor_index, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool maximize) {
  const char* op = "fused_optim::neuro_optima_lowbit_";
  const LowbitArgs l =
      lb::lowbit_args(absmax, tables, signed_maps, fmt, param_sr, seed, step, step_tensor, tensor_index);
  const math::NeuroOptimaCoeffs<float> c(lr, beta1, beta2, eps, weight_decay);
  // the pass hands the update g with maximize's sign applied, as neuro_optima_ prepares it (no AMP here)
  lowbit_dispatch<4>(op, {params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads}, l, maximize, {}, {},
                     [&](int64_t) {
                       return [&](auto& p, auto& g, auto& m, auto& v, auto& d, auto& q) {
                         math::neuro_optima_update(p, g, m, v, d, q, c);
                       };
                     });
}

void muon_momentum_lowbit_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList updates,
                           at::TensorList absmax, const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt,
                           bool param_sr, int64_t seed, int64_t step, const OptTensor& step_tensor,
                           at::IntArrayRef tensor_index, double momentum, bool nesterov, bool maximize) {
  const char* op = "fused_optim::muon_momentum_lowbit_";
  const LowbitArgs l =
      lb::lowbit_args(absmax, tables, signed_maps, fmt, param_sr, seed, step, step_tensor, tensor_index);
  // the pass's list 0 is the Newton-Schulz input (written, never read), list 1 the grads
  const std::vector<at::TensorList> lists{updates, grads, momentum_buffers};
  LowbitPlan plan = lb::plan_lowbit(op, lists, l, at::Device(at::kCPU), {1, true});
  TORCH_CHECK(plan.rows == 0 || updates[0].scalar_type() == at::kBFloat16, op,
              ": updates (the Newton-Schulz input) must be bfloat16");
  plan.param_sr = false;  // this stage writes no param
  const math::MuonMomentumCoeffs<float> c(momentum, nesterov);
  const auto update = [&](int64_t) {
    return [&c](auto& u, auto& g, auto& buf) { u = math::muon_momentum(g, buf, c); };
  };
  lb::dispatch_type(plan.rows ? grads[0].scalar_type() : at::kFloat, [&](auto gt) {
    muon_lowbit_pass<1, c10::BFloat16, typename decltype(gt)::type>(op, lists, plan, l, maximize, update);
  });
}

void muon_apply_lowbit_(at::TensorList params, at::TensorList updates, at::TensorList absmax,
                        const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt, bool param_sr, int64_t seed,
                        int64_t step, const OptTensor& step_tensor, at::IntArrayRef tensor_index,
                        at::ArrayRef<double> scales, double lr, double weight_decay) {
  const char* op = "fused_optim::muon_apply_lowbit_";
  const LowbitArgs l =
      lb::lowbit_args(absmax, tables, signed_maps, fmt, param_sr, seed, step, step_tensor, tensor_index);
  const std::vector<at::TensorList> lists{params, updates};
  const LowbitPlan plan = lb::plan_lowbit(op, lists, l, at::Device(at::kCPU), {0, true});
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == plan.rows, op, ": scales has ", scales.size(),
              " values, expected ", plan.rows, " (one per parameter)");
  const math::MuonApplyCoeffs<float> c(lr, weight_decay);
  const at::ScalarType udt = plan.rows ? updates[0].scalar_type() : at::kFloat;
  lb::dispatch_type(udt, [&](auto ut) {
    using U = typename decltype(ut)::type;
    muon_lowbit_pass<0, void, U>(op, lists, plan, l, false, [&](int64_t row) {
      const float sc = static_cast<float>(scales[row]);
      // muon_apply_'s math: upstream's `u *= scale` on u's dtype (fp32 product, one rounding to U)
      return [&c, sc](auto& p, auto& u) {
        using T = std::decay_t<decltype(p)>;
        math::muon_apply(p, round_through<U>(u * T(sc)), c);
      };
    });
  });
}

}  // namespace cpu
}  // namespace fused_optim
