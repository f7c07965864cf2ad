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
#include "elementwise_registration.h"
#include "math/elementwise_rules.h"

// The lowbit ops (docs/lowbit.md §5): an update over bf16 or 8-bit state in one pass, with the arguments
// of LowbitArgs (elementwise.h) after the state lists; CPU (csrc/cpu/lowbit_updates.cpp) and CUDA
// (csrc/cuda/lowbit_updates.cuh) kernels. Each rule's is generated (`<kName>_lowbit_`); Adan's, Gravity's,
// NeuroOptima's and Muon's take their fp32 op's arguments (ops_list.h) with LowbitArgs after the state lists.
static std::string adan_lowbit_schema() {
  return "adan_lowbit_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
         "Tensor(e!)[] exp_avg_diffs, Tensor(f!)[] neg_pre_grads, " +
         fused_optim::lowbit_schema_args('g') +
         "float lr, float beta1, float beta2, float beta3, float bias_correction1, float bias_correction2, "
         "float bias_correction3_sqrt, float eps, float weight_decay, bool no_prox, Tensor? clip, bool maximize, "
         "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? lr_tensor=None, "
         "Tensor? bias_correction1_tensor=None, Tensor? bias_correction2_tensor=None, "
         "Tensor? bias_correction3_sqrt_tensor=None, Tensor? first_step=None) -> ()";
}
static std::string neuro_optima_lowbit_schema() {
  return "neuro_optima_lowbit_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
         "Tensor(d!)[] exp_avg_diffs, Tensor(e!)[] prev_grads, " +
         fused_optim::lowbit_schema_args('f') +
         "float lr, float beta1, float beta2, float eps, float weight_decay, bool maximize) -> ()";
}
static std::string gravity_lowbit_schema() {
  return "gravity_lowbit_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] vs, " +
         fused_optim::lowbit_schema_args('d') +
         "Tensor stats, float lr, float beta_hat, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, "
         "Tensor? lr_tensor=None, Tensor? beta_hat_tensor=None) -> ()";
}

// Muon's two stages (ops_list.h's muon_momentum_ / muon_apply_) with a bf16 / 8-bit momentum buffer and
// stochastically rounded bf16 params: LowbitArgs after the lists (the apply stage has no state list: its
// absmax is empty and only param_sr and the generator's key matter).
static std::string muon_momentum_lowbit_schema() {
  return "muon_momentum_lowbit_(Tensor[] grads, Tensor(a!)[] momentum_buffers, Tensor(b!)[] updates, " +
         fused_optim::lowbit_schema_args('c') + "float momentum, bool nesterov, bool maximize) -> ()";
}
static std::string muon_apply_lowbit_schema() {
  return "muon_apply_lowbit_(Tensor(a!)[] params, Tensor[] updates, " + fused_optim::lowbit_schema_args('b') +
         "float[] scales, float lr, float weight_decay) -> ()";
}

// The ops of ops_list.h, then one op per rule of math/elementwise_rules.h (Lion: math/lion.h), its schema
// generated from the rule's declaration (elementwise.h).
TORCH_LIBRARY(fused_optim, m) {
#define FO_OP(name, schema) m.def(#name schema);
#include "ops_list.h"
#undef FO_OP
#define FO_RULE(Rule)                                                            \
  m.def(fused_optim::elementwise_schema<fused_optim::math::Rule>().c_str()); \
  m.def(fused_optim::elementwise_schema<fused_optim::math::Rule>(true).c_str());
  FO_ELEMENTWISE_RULES(FO_RULE)
#undef FO_RULE
  m.def(adan_lowbit_schema().c_str());
  m.def(gravity_lowbit_schema().c_str());
  m.def(neuro_optima_lowbit_schema().c_str());
  m.def(muon_momentum_lowbit_schema().c_str());
  m.def(muon_apply_lowbit_schema().c_str());
}

// The CPU kernels (csrc/cpu/); the CUDA ones register next to their code (csrc/cuda/). The emulated CUDA
// test build (csrc/cuda/emulation/) compiles this file for the schemas only: there the CUDA kernels take
// the CPU key of their own namespace, and the CPU kernels are not linked in.
#ifndef FUSED_OPTIM_CUDA_EMULATION
TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
#define FO_BACKEND fused_optim::cpu
#include "register_kernels.h"
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
