// The op schemas of the fused_optim extension: every op the Python package calls, in one place.
//
// Kernels are registered per backend: the CPU ones below (code in csrc/cpu/), the CUDA ones next to
// their code (csrc/cuda/*.cu); Python reaches them as torch.ops.fused_optim.<name>. Mutation
// annotations (a!) name every list written in place, so torch.compile / functionalization know what
// changes.
//
// Conventions shared by the update ops (`*_`):
// - row i of every list belongs to one parameter; all tensors of one call share a device and the
//   param dtype (fp32, fp64, bf16, fp16); state is the param's dtype or fp32 for bf16/fp16 params;
//   math runs in fp32 (fp64 for fp64 params). Zero-size rows are skipped. Any strides work (rows
//   whose tensors do not share one dense layout go through contiguous copies).
// - the Python doubles (lr, betas, bias corrections...) are computed by the optimizer class and
//   rounded once to the math type, never recomputed here (docs/spec.md).
// - capturable / device scalars (`*_tensor`, `first_step`: optional, 1 float32 element each, on the
//   kernels' device): given, they replace the float argument of the same name (which is then ignored),
//   and the scalars derived from them (1 - beta_hat, -lr/bc1, -lr*beta2/bc2, 1 -/+ lr*wd) are computed
//   in the math type by the kernel, in the Triton kernels' order (fused_optim/kernels/). On CUDA they
//   are read from device memory (no host sync: a CUDA graph can capture the step), on the CPU from
//   the CPU tensor.
// - AMP hooks, for torch.amp.GradScaler (fused_optim.optimizer.supports_amp): with `grad_scale`
//   (1 float32 element) the kernels compute g = grad / grad_scale as torch's in-place unscale stores
//   it (an IEEE division in the math type, rounded to the grad's dtype), write it back into `grads`
//   (their own storage, non-contiguous ones included) and use that value; `found_inf` (1 float32
//   element) != 0 skips the whole update, leaving params, state and grads untouched. On CUDA both are
//   read from device memory: no host sync.
// - `maximize` negates the gradient after the unscale (the negated value is never written).
// - `stats` is the [n, 3] output of multi_tensor_stats over the same rows, computed on the same
//   prepared gradient (same `maximize` as `negate`, same `grad_scale`): column 0 is max|x|,
//   column 1 sum(x), column 2 sum(x^2). Gravity reads column 0, GradientEquilibrium column 1.
//   Between the two calls a caller may all-reduce it (sharded tensors, FSDP2).

#include <torch/library.h>

#include "cpu/kernels.h"

TORCH_LIBRARY(fused_optim, m) {
  // Per-tensor [max|x|, sum(x), sum(x^2)] of x = (negate ? -u : u) (+ alpha * addend), for every t in
  // `tensors` (a non-empty list: the dispatcher picks the kernel from it), in one pass; u = t, or with
  // grad_scale the unscaled grad the update ops write back (t / grad_scale rounded to t's dtype; t itself
  // is only read here). An [n, 3] tensor on their device, float32 (float64 for float64 input). An empty tensor gives [0, 0, 0]. `addends` (same shapes, e.g. the params) is
  // how GradientEquilibrium's L2 term g + wd*p enters the mean; the combination is fma(a, alpha, x),
  // the rounding of torch's add(alpha=).
  m.def("multi_tensor_stats(Tensor[] tensors, Tensor[]? addends=None, float alpha=0., bool negate=False, "
        "Tensor? grad_scale=None) -> Tensor");

  // Gravity (docs/spec.md §1): per tensor m = 1/stats[i,0]; zeta = g / (1 + (g/m)^2);
  // v = beta_hat*v + (1-beta_hat)*zeta; p -= lr*v.
  // Device scalars: lr_tensor, beta_hat_tensor.
  m.def("gravity_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] vs, Tensor stats, float lr, "
        "float beta_hat, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, "
        "Tensor? lr_tensor=None, Tensor? beta_hat_tensor=None) -> ()");

  // Lion (docs/spec.md §2): p *= 1-lr*wd; p -= lr*sign(b1*m + (1-b1)*g); m = b2*m + (1-b2)*g.
  // Device scalar: lr_tensor.
  m.def("lion_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, float lr, float beta1, "
        "float beta2, float weight_decay, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, "
        "Tensor? lr_tensor=None) -> ()");

  // Adan (docs/spec.md §3), sail-sg op order. `clip` is the global clip factor as a 1-element float32
  // tensor on the kernels' device (read there, no host sync), or None for no clipping.
  // neg_pre_grads holds -clip*g of the previous step and is rewritten with this step's. Device scalars:
  // lr_tensor; the three bias corrections (all or none); first_step (!= 0: the group's first step, the
  // kernel sets neg_pre_grad = -clip*g before computing the difference, which is then exactly 0).
  m.def("adan_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
        "Tensor(e!)[] exp_avg_diffs, Tensor(f!)[] neg_pre_grads, float lr, float beta1, float beta2, "
        "float beta3, float bias_correction1, float bias_correction2, float bias_correction3_sqrt, "
        "float eps, float weight_decay, bool no_prox, Tensor? clip, bool maximize, "
        "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? lr_tensor=None, "
        "Tensor? bias_correction1_tensor=None, Tensor? bias_correction2_tensor=None, "
        "Tensor? bias_correction3_sqrt_tensor=None, Tensor? first_step=None) -> ()");

  // GradientEquilibrium (docs/spec.md §4): x = g (+ wd*p); p -= lr*(x - mean(x)), mean = stats[i,1]/numel
  // with stats = multi_tensor_stats(grads, params if wd else None, wd, maximize, grad_scale). Device
  // scalar: lr_tensor.
  m.def("gradient_equilibrium_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor stats, float lr, "
        "float weight_decay, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, "
        "Tensor? lr_tensor=None) -> ()");

  // ---- composites: the fused parts of Lookahead, SAM, Muon and NeuroOptima ----

  // Per-tensor L2 norm of x = |w| * t (abs_weights given: SAM's adaptive |p| * g) or x = t, for every t
  // in `tensors` (non-empty list): a 1-D [n] tensor on their device, float32 (float64 for float64
  // input); 0 for an empty tensor. Squares are summed in fp32 over short runs (CPU: <= 16 per lane;
  // CUDA: one 65536-element chunk per block) and in fp64 across them, then the square root in fp64.
  m.def("multi_tensor_l2norm(Tensor[] tensors, Tensor[]? abs_weights=None) -> Tensor");

  // dst[i] = src[i], bit for bit (SAM's restore). One dtype per call (src the dst's); any strides.
  m.def("multi_tensor_copy_(Tensor(a!)[] dst, Tensor[] src) -> ()");

  // Lookahead (docs/spec.md §5): p = fma(slow, 1-alpha, p*alpha) (p.mul_(alpha).add_(slow, alpha=1-alpha)),
  // then slow = p (the stored p). slows: the params' dtype, or float32 for bf16/fp16 params.
  m.def("lookahead_sync_(Tensor(a!)[] params, Tensor(b!)[] slows, float alpha) -> ()");

  // SAM (docs/spec.md §6): old = p; p += ((p*p if adaptive else 1) * g) * scale. `scale` is 1 float32 element
  // on the params' device (rho / (norm + 1e-12), read there: no host sync). old_params: the params' dtype.
  m.def("sam_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] old_params, Tensor scale, "
        "bool adaptive) -> ()");

  // Muon (docs/spec.md §8), before Newton-Schulz: g' = maximize ? -g : g; buf = lerp(buf, g', 1-momentum);
  // updates = lerp(g', buf, momentum) if nesterov else buf, rounded to the updates' dtype (bfloat16 or
  // the grads'). Lerp with torch's roundings (csrc/math/muon.h). grads are read only; momentum_buffers:
  // the grads' dtype, or float32 for bf16/fp16 grads.
  m.def("muon_momentum_(Tensor[] grads, Tensor(a!)[] momentum_buffers, Tensor(b!)[] updates, float momentum, "
        "bool nesterov, bool maximize) -> ()");

  // Muon (docs/spec.md §8), after Newton-Schulz: u = round_to_updates_dtype(updates * float32(scales[i]));
  // p *= 1 - lr*wd (skipped when wd == 0: exact); p = fma(u, -lr, p). updates: bfloat16 or the params'
  // dtype, params[i]'s numel, any strides (read in row-major order, as u.reshape(p.shape)).
  m.def("muon_apply_(Tensor(a!)[] params, Tensor[] updates, float[] scales, float lr, float weight_decay) -> ()");

  // NeuroOptima's core (docs/spec.md §7), the reference's op order: g' = (maximize ? -g : g) (+ wd*p);
  // d = g' - prev; m = b1*m + (1-b1)*g'; diff = b2*diff + (1-b2)*d; v = b2*v + (1-b2)*g'^2;
  // p -= lr*sign((m + b2*diff) / (sqrt(v) + eps)); prev = g'.
  m.def("neuro_optima_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "Tensor(d!)[] exp_avg_diffs, Tensor(e!)[] prev_grads, float lr, float beta1, float beta2, float eps, "
        "float weight_decay, bool maximize) -> ()");
}

// The CPU kernels (csrc/cpu/); the CUDA ones register next to their code (csrc/cuda/). The emulated CUDA
// test build (csrc/cuda/emulation/) compiles this file for the schemas only: there the CUDA kernels take
// the CPU key of their own namespace, and the CPU kernels are not linked in.
#ifndef FUSED_OPTIM_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  using namespace fused_optim::cpu;
  m.impl("multi_tensor_stats", &multi_tensor_stats_cpu);
  m.impl("gravity_", &gravity_cpu);
  m.impl("lion_", &lion_cpu);
  m.impl("adan_", &adan_cpu);
  m.impl("gradient_equilibrium_", &gradient_equilibrium_cpu);
  m.impl("multi_tensor_l2norm", &multi_tensor_l2norm_cpu);
  m.impl("multi_tensor_copy_", &multi_tensor_copy_cpu);
  m.impl("lookahead_sync_", &lookahead_sync_cpu);
  m.impl("sam_perturb_", &sam_perturb_cpu);
  m.impl("muon_momentum_", &muon_momentum_cpu);
  m.impl("muon_apply_", &muon_apply_cpu);
  m.impl("neuro_optima_", &neuro_optima_cpu);
}
#endif  // FUSED_OPTIM_CUDA_EMULATION

#ifdef FUSED_OPTIM_PYTHON_MODULE
// The ahead-of-time build (setup.py) is imported as the Python module fused_optim._C; importing it
// runs the registrations above. The JIT build is loaded with torch.ops.load_library and skips this.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fused_optim native ops (torch.ops.fused_optim)", -1,
                               nullptr};
  return PyModule_Create(&module);
}
#endif
