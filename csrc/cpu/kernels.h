// The CPU kernels' entry points, registered for the CPU dispatch key in csrc/fused_optim.cpp.
//
// Declared here, and registered in one translation unit, so that the kernel files include only the
// light ATen headers below: torch/library.h and ATen/ATen.h cost ~7-10 s of parsing per file, a large
// part of the build (bench/NOTES.md, "Build time").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

namespace fused_optim {
namespace cpu {

void lion_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, double lr, double beta1,
              double beta2, double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_scale,
              const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor);

void gravity_cpu(at::TensorList params, at::TensorList grads, at::TensorList vs, const at::Tensor& stats,
                 double lr, double beta_hat, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                 const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor,
                 const c10::optional<at::Tensor>& beta_hat_tensor);

void adan_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
              at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads, double lr, double beta1, double beta2,
              double beta3, double bias_correction1, double bias_correction2, double bias_correction3_sqrt,
              double eps, double weight_decay, bool no_prox, const c10::optional<at::Tensor>& clip, bool maximize,
              const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
              const c10::optional<at::Tensor>& lr_tensor, const c10::optional<at::Tensor>& bias_correction1_tensor,
              const c10::optional<at::Tensor>& bias_correction2_tensor,
              const c10::optional<at::Tensor>& bias_correction3_sqrt_tensor,
              const c10::optional<at::Tensor>& first_step);

void gradient_equilibrium_cpu(at::TensorList params, at::TensorList grads, const at::Tensor& stats, double lr,
                              double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                              const c10::optional<at::Tensor>& found_inf,
                              const c10::optional<at::Tensor>& lr_tensor);

void lookahead_sync_cpu(at::TensorList params, at::TensorList slows, double alpha);

void sam_perturb_cpu(at::TensorList params, at::TensorList grads, at::TensorList old_params,
                     const at::Tensor& scale, bool adaptive);

void multi_tensor_copy_cpu(at::TensorList dst, at::TensorList src);

void muon_momentum_cpu(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList updates,
                       double momentum, bool nesterov, bool maximize);

void muon_apply_cpu(at::TensorList params, at::TensorList updates, at::ArrayRef<double> scales, double lr,
                    double weight_decay);

void neuro_optima_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList prev_grads, double lr,
                      double beta1, double beta2, double eps, double weight_decay, bool maximize);

at::Tensor multi_tensor_stats_cpu(at::TensorList tensors, c10::optional<at::TensorList> addends, double alpha,
                                  bool negate, const c10::optional<at::Tensor>& grad_scale);

at::Tensor multi_tensor_l2norm_cpu(at::TensorList tensors, c10::optional<at::TensorList> abs_weights);

}  // namespace cpu
}  // namespace fused_optim
