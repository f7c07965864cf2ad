// The CPU kernels' entry points, registered for the CPU dispatch key in csrc/fused_optim.cpp: one
// function per op of csrc/ops.def, named like the op, plus the generic elementwise op's runner.
//
// Declared here, and registered in one translation unit, so that the kernel files include only the
// light ATen headers below: torch/library.h and ATen/ATen.h cost ~7-10 s of parsing per file, a large
// part of the build (bench/NOTES.md, "Build time").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include "../elementwise.h"

namespace fused_optim {
namespace cpu {

using OptTensor = c10::optional<at::Tensor>;

// each rule of csrc/math/elementwise_rules.h (instantiated in fused_updates.cpp)
template <typename Rule>
void run_elementwise(const ElementwiseArgs& args);
// its op over low-precision state, `<kName>_lowbit_` (lowbit_updates.cpp)
template <typename Rule>
void run_elementwise_lowbit(const ElementwiseArgs& args, const LowbitArgs& lowbit);

// the ops of csrc/ops.def; schemas and semantics there
void gravity_(at::TensorList params, at::TensorList grads, at::TensorList vs, const at::Tensor& stats, double lr,
              double beta_hat, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf,
              const OptTensor& lr_tensor, const OptTensor& beta_hat_tensor);
void adan_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads, double lr, double beta1, double beta2,
           double beta3, double bias_correction1, double bias_correction2, double bias_correction3_sqrt, double eps,
           double weight_decay, bool no_prox, const OptTensor& clip, bool maximize, const OptTensor& grad_scale,
           const OptTensor& found_inf, const OptTensor& lr_tensor, const OptTensor& bias_correction1_tensor,
           const OptTensor& bias_correction2_tensor, const OptTensor& bias_correction3_sqrt_tensor,
           const OptTensor& first_step);
// adan_ over low-precision state (csrc/fused_optim.cpp, adan_lowbit_schema; lowbit_updates.cpp)
void adan_lowbit_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads, at::TensorList absmax,
                  const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt, bool param_sr, int64_t seed,
                  int64_t step, const OptTensor& step_tensor, at::IntArrayRef tensor_index, double lr, double beta1,
                  double beta2, double beta3, double bias_correction1, double bias_correction2,
                  double bias_correction3_sqrt, double eps,
                  double weight_decay, bool no_prox, const OptTensor& clip, bool maximize, const OptTensor& grad_scale,
                  const OptTensor& found_inf, const OptTensor& lr_tensor, const OptTensor& bias_correction1_tensor,
                  const OptTensor& bias_correction2_tensor, const OptTensor& bias_correction3_sqrt_tensor,
                  const OptTensor& first_step);
// gravity_ over low-precision state (csrc/fused_optim.cpp, gravity_lowbit_schema; lowbit_updates.cpp)
void gravity_lowbit_(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList absmax,
                     const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt, bool param_sr, int64_t seed,
                     int64_t step, const OptTensor& step_tensor, at::IntArrayRef tensor_index, const at::Tensor& stats,
                     double lr, double beta_hat, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf,
                     const OptTensor& lr_tensor, const OptTensor& beta_hat_tensor);
// neuro_optima_ over low-precision state (csrc/fused_optim.cpp, neuro_optima_lowbit_schema; lowbit_updates.cpp)
void neuro_optima_lowbit_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList prev_grads,
                          at::TensorList absmax, const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt,
                          bool param_sr, int64_t seed, int64_t step, const OptTensor& step_tensor,
                          at::IntArrayRef tensor_index, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool maximize);
void gradient_equilibrium_(at::TensorList params, at::TensorList grads, const at::Tensor& stats, double lr,
                           double weight_decay, bool maximize, const OptTensor& grad_scale, const OptTensor& found_inf,
                           const OptTensor& lr_tensor);
void lookahead_sync_(at::TensorList params, at::TensorList slows, double alpha);
void sam_perturb_(at::TensorList params, at::TensorList grads, at::TensorList old_params, const at::Tensor& scale,
                  bool adaptive);
void multi_tensor_copy_(at::TensorList dst, at::TensorList src);
void muon_momentum_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList updates, double momentum,
                    bool nesterov, bool maximize);
void muon_apply_(at::TensorList params, at::TensorList updates, at::ArrayRef<double> scales, double lr,
                 double weight_decay);
void muon_momentum_lowbit_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList updates,
                           at::TensorList absmax, const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt,
                           bool param_sr, int64_t seed, int64_t step, const OptTensor& step_tensor,
                           at::IntArrayRef tensor_index, double momentum, bool nesterov, bool maximize);
void muon_apply_lowbit_(at::TensorList params, at::TensorList updates, at::TensorList absmax,
                        const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt, bool param_sr, int64_t seed,
                        int64_t step, const OptTensor& step_tensor, at::IntArrayRef tensor_index,
                        at::ArrayRef<double> scales, double lr, double weight_decay);
void neuro_optima_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList exp_avg_diffs, at::TensorList prev_grads, double lr, double beta1, double beta2,
                   double eps, double weight_decay, bool maximize);
at::Tensor multi_tensor_stats(at::TensorList tensors, c10::optional<at::TensorList> addends, double alpha,
                              bool negate, const OptTensor& grad_scale);
at::Tensor multi_tensor_l2norm(at::TensorList tensors, c10::optional<at::TensorList> abs_weights);

}  // namespace cpu
}  // namespace fused_optim
