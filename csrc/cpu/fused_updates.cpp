// CPU kernels of the fused update ops: the elementwise rules of csrc/math/elementwise_rules.h (one
// generic op each: Lion), gravity_, adan_ and gradient_equilibrium_.
//
// Each op: host checks (prepare_update), then one parallel pass over (row, chunk) items, each chunk
// through for_each_element (element_loop.h: vector registers of the math type, bf16/fp16 widened to
// fp32, then scalars) with the per-element rules of csrc/math/. Nothing is allocated per step except
// for rows that need contiguous copies.
//
// AMP (fused_optim.optimizer.supports_amp): with grad_scale, each grad element is divided by it,
// rounded to the grad's dtype, stored back and then used (GradPrep): the separate foreach unscale pass
// and its extra read and write of every grad are saved. Device scalars (lr_tensor, ...: capturable)
// are read from their CPU tensors once per call and the derived scalars computed in the math type by
// the setters of csrc/math/ (the Triton kernels' order).

#include "capability.h"  // first: before any ATen header

#include "kernels.h"

#include "../math/common.h"
#include "vec_ops.h"
#include "../math/adan.h"
#include "../math/elementwise_rules.h"
#include "../math/equilibrium.h"
#include "../math/gravity.h"
#include "element_loop.h"

#include <tuple>

namespace fused_optim {
namespace cpu {
namespace {

// The value of an optional device-scalar tensor in the math type (a CPU tensor here: no sync).
template <typename M>
M tensor_scalar(const c10::optional<at::Tensor>& t) {
  return static_cast<M>(read_scalar(scalar_ptr(t), 0.0f));
}

}  // namespace

template <typename Rule>
void run_elementwise(const ElementwiseArgs& a) {
  using Shape = RuleShape<Rule>;
  const char* op = a.op.c_str();
  PreparedLists pl = prepare_update(op, a.list_refs(), a.grad_scale, a.found_inf,
                                    named_scalars(a.tensor_scalar_names, a.tensor_scalars));
  update_loop(op, pl, a.maximize, a.grad_scale, a.found_inf,
              [&](auto pt, auto st, const auto& grad, const auto& items) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    auto c = Rule::template coeffs<M>(a.scalars.data(), a.flags.data());
    for (int i = 0; i < Shape::kTensorScalars; ++i) {
      if (a.tensor_scalars[i].has_value()) {
        Rule::set_tensor_scalar(c, i, tensor_scalar<M>(a.tensor_scalars[i]));
      }
    }
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      const auto f = [&](auto& p, auto& g, auto&... s) { Rule::update(p, grad(g), c, s...); };
      std::array<S*, Shape::kStates> st_ptr;
      for (int k = 0; k < Shape::kStates; ++k) st_ptr[k] = pl.ptr<S>(2 + k, it.row);
      std::apply(
          [&](auto... sp) {
            for_each_element<M>(it.begin, it.end, f, pl.ptr<P>(0, it.row), grad.ptr(pl, it.row), sp...);
          },
          st_ptr);
    });
  });
}

#define FO_INSTANTIATE(Rule) template void run_elementwise<math::Rule>(const ElementwiseArgs&);
FO_ELEMENTWISE_RULES(FO_INSTANTIATE)
#undef FO_INSTANTIATE

void gravity_(at::TensorList params, at::TensorList grads, at::TensorList vs, const at::Tensor& stats, double lr,
              double beta_hat, bool maximize, const c10::optional<at::Tensor>& grad_scale,
              const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor,
              const c10::optional<at::Tensor>& beta_hat_tensor) {
  const char* op = "fused_optim::gravity_";
  PreparedLists pl = prepare_update(op, {params, grads, vs}, grad_scale, found_inf,
                                    {{"lr_tensor", &lr_tensor}, {"beta_hat_tensor", &beta_hat_tensor}});
  check_stats(op, stats, pl.rows(), at::Device(at::kCPU));
  const at::Tensor absmax = stats.select(1, 0).to(at::kDouble).contiguous();
  const double* absmax_ptr = absmax.data_ptr<double>();
  update_loop(op, pl, maximize, grad_scale, found_inf, [&](auto pt, auto st, const auto& grad, const auto& items) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    math::GravityCoeffs<M> c(lr, beta_hat);
    if (lr_tensor.has_value()) c.set_lr(tensor_scalar<M>(lr_tensor));
    if (beta_hat_tensor.has_value()) c.set_beta_hat(tensor_scalar<M>(beta_hat_tensor));
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      const M m = math::gravity_m(static_cast<M>(absmax_ptr[it.row]));
      for_each_element<M>(
          it.begin, it.end, [&](auto& p, auto& g, auto& v) { math::gravity_update(p, grad(g), v, m, c); },
          pl.ptr<P>(0, it.row), grad.ptr(pl, it.row), pl.ptr<S>(2, it.row));
    });
  });
}

void adan_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads, double lr, double beta1, double beta2,
           double beta3, double bias_correction1, double bias_correction2, double bias_correction3_sqrt,
           double eps, double weight_decay, bool no_prox, const c10::optional<at::Tensor>& clip, bool maximize,
           const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
           const c10::optional<at::Tensor>& lr_tensor, const c10::optional<at::Tensor>& bias_correction1_tensor,
           const c10::optional<at::Tensor>& bias_correction2_tensor,
           const c10::optional<at::Tensor>& bias_correction3_sqrt_tensor,
           const c10::optional<at::Tensor>& first_step) {
  const char* op = "fused_optim::adan_";
  check_scalar_tensor(op, "clip", clip, at::Device(at::kCPU));
  const bool bc_tensors = check_adan_bias_corrections(op, bias_correction1_tensor, bias_correction2_tensor,
                                                      bias_correction3_sqrt_tensor);
  PreparedLists pl = prepare_update(op, {params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads},
                                    grad_scale, found_inf,
                                    {{"lr_tensor", &lr_tensor},
                                     {"bias_correction1_tensor", &bias_correction1_tensor},
                                     {"bias_correction2_tensor", &bias_correction2_tensor},
                                     {"bias_correction3_sqrt_tensor", &bias_correction3_sqrt_tensor},
                                     {"first_step", &first_step}});
  const float clip_value = read_scalar(scalar_ptr(clip), 1.0f);
  const bool first = read_scalar(scalar_ptr(first_step), 0.0f) != 0.0f;
  update_loop(op, pl, maximize, grad_scale, found_inf, [&](auto pt, auto st, const auto& grad, const auto& items) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    math::AdanCoeffs<M> c(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, bias_correction3_sqrt, eps,
                          weight_decay, no_prox);
    if (lr_tensor.has_value()) c.set_lr(tensor_scalar<M>(lr_tensor));
    if (bc_tensors) {
      c.set_bias_corrections(tensor_scalar<M>(bias_correction1_tensor), tensor_scalar<M>(bias_correction2_tensor),
                             tensor_scalar<M>(bias_correction3_sqrt_tensor));
    }
    if (lr_tensor.has_value() || bc_tensors) c.update_step_sizes();
    const M cl = static_cast<M>(clip_value);
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      for_each_element<M>(
          it.begin, it.end,
          [&](auto& p, auto& g, auto& m, auto& s, auto& d, auto& n) {
            math::adan_update(p, grad(g), m, s, d, n, cl, c, first);
          },
          pl.ptr<P>(0, it.row), grad.ptr(pl, it.row), pl.ptr<S>(2, it.row), pl.ptr<S>(3, it.row),
          pl.ptr<S>(4, it.row), pl.ptr<S>(5, it.row));
    });
  });
}

void gradient_equilibrium_(at::TensorList params, at::TensorList grads, const at::Tensor& stats, double lr,
                           double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                           const c10::optional<at::Tensor>& found_inf,
                           const c10::optional<at::Tensor>& lr_tensor) {
  const char* op = "fused_optim::gradient_equilibrium_";
  PreparedLists pl = prepare_update(op, {params, grads}, grad_scale, found_inf, {{"lr_tensor", &lr_tensor}});
  check_stats(op, stats, pl.rows(), at::Device(at::kCPU));
  const at::Tensor sums = stats.select(1, 1).to(at::kDouble).contiguous();
  const double* sum_ptr = sums.data_ptr<double>();
  update_loop(op, pl, maximize, grad_scale, found_inf, [&](auto pt, auto, const auto& grad, const auto& items) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    math::EquilibriumCoeffs<M> c(lr, weight_decay);
    if (lr_tensor.has_value()) c.set_lr(tensor_scalar<M>(lr_tensor));
    for_each_chunk(items, [&](int64_t, const ChunkItem& it) {
      // torch's mean: the sum in the math type, divided by numel in the math type
      const M mean = static_cast<M>(sum_ptr[it.row]) / static_cast<M>(pl.lists[0][it.row].numel());
      for_each_element<M>(
          it.begin, it.end,
          [&](auto& p, auto& g) { math::equilibrium_update(p, math::equilibrium_value(p, grad(g), c), mean, c); },
          pl.ptr<P>(0, it.row), grad.ptr(pl, it.row));
    });
  });
}

}  // namespace cpu
}  // namespace fused_optim
