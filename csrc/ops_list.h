// Every op with its own kernels, named once: FO_OP(name, "schema after the name"). No include guard: an
// X-macro list, included with FO_OP defined, by csrc/fused_optim.cpp (the schemas and the CPU kernels,
// csrc/cpu/kernels.h) and csrc/cuda/fused_optim_cuda.cu (the CUDA kernels); each backend's kernel of
// op `name` is the function `name` of its namespace (fused_optim::cpu, fused_optim::cuda). The
// pure-elementwise rules are not here: each is one line of csrc/math/elementwise_rules.h.
// Conventions of the update ops: csrc/fused_optim.cpp.

// Per-tensor [max|x|, sum(x), sum(x^2)] of x = (negate ? -u : u) (+ alpha * addend), for every t in
// `tensors` (a non-empty list: the dispatcher picks the kernel from it), in one pass; u = t, or with
// grad_scale the unscaled grad the update ops write back (t / grad_scale rounded to t's dtype; t itself
// is only read here). An [n, 3] tensor on their device, float32 (float64 for float64 input). An empty
// tensor gives [0, 0, 0]. `addends` (same shapes, e.g. the params) is how GradientEquilibrium's L2
// term g + wd*p enters the mean; the combination is fma(a, alpha, x),
// the rounding of torch's add(alpha=).
FO_OP(multi_tensor_stats,
      "(Tensor[] tensors, Tensor[]? addends=None, float alpha=0., bool negate=False, "
      "Tensor? grad_scale=None) -> Tensor")

// Gravity (docs/spec.md §1): per tensor m = 1/stats[i,0]; zeta = g / (1 + (g/m)^2);
// v = beta_hat*v + (1-beta_hat)*zeta; p -= lr*v.
// Device scalars: lr_tensor, beta_hat_tensor.
FO_OP(gravity_,
      "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] vs, Tensor stats, float lr, "
      "float beta_hat, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, "
      "Tensor? lr_tensor=None, Tensor? beta_hat_tensor=None) -> ()")

// Adan (docs/spec.md §3), sail-sg op order. `clip` is the global clip factor as a 1-element float32
// tensor on the kernels' device (read there, no host sync), or None for no clipping.
// neg_pre_grads holds -clip*g of the previous step and is rewritten with this step's. Device scalars:
// lr_tensor; the three bias corrections (all or none); first_step (!= 0: the group's first step, the
// kernel sets neg_pre_grad = -clip*g before computing the difference, which is then exactly 0).
FO_OP(adan_,
      "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] exp_avg_diffs, Tensor(f!)[] neg_pre_grads, float lr, float beta1, float beta2, "
      "float beta3, float bias_correction1, float bias_correction2, float bias_correction3_sqrt, "
      "float eps, float weight_decay, bool no_prox, Tensor? clip, bool maximize, "
      "Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? lr_tensor=None, "
      "Tensor? bias_correction1_tensor=None, Tensor? bias_correction2_tensor=None, "
      "Tensor? bias_correction3_sqrt_tensor=None, Tensor? first_step=None) -> ()")

// GradientEquilibrium (docs/spec.md §4): x = g (+ wd*p); p -= lr*(x - mean(x)), mean = stats[i,1]/numel
// with stats = multi_tensor_stats(grads, params if wd else None, wd, maximize, grad_scale). Device
// scalar: lr_tensor.
FO_OP(gradient_equilibrium_,
      "(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor stats, float lr, float weight_decay, "
      "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? lr_tensor=None) -> ()")

// ---- composites: the fused parts of Lookahead, SAM, Muon and NeuroOptima ----

// Per-tensor L2 norm of x = |w| * t (abs_weights given: SAM's adaptive |p| * g) or x = t, for every t
// in `tensors` (non-empty list): a 1-D [n] tensor on their device, float32 (float64 for float64
// input); 0 for an empty tensor. Squares are summed in fp32 over short runs (CPU: <= 16 per lane;
// CUDA: one 65536-element chunk per block) and in fp64 across them, then the square root in fp64.
FO_OP(multi_tensor_l2norm,
      "(Tensor[] tensors, Tensor[]? abs_weights=None) -> Tensor")

// dst[i] = src[i], bit for bit (SAM's restore). One dtype per call (src the dst's); any strides.
FO_OP(multi_tensor_copy_,
      "(Tensor(a!)[] dst, Tensor[] src) -> ()")

// Lookahead (docs/spec.md §5): p = fma(slow, 1-alpha, p*alpha) (p.mul_(alpha).add_(slow, alpha=1-alpha)),
// then slow = p (the stored p). slows: the params' dtype, or float32 for bf16/fp16 params.
FO_OP(lookahead_sync_,
      "(Tensor(a!)[] params, Tensor(b!)[] slows, float alpha) -> ()")

// SAM (docs/spec.md §6): old = p; p += ((p*p if adaptive else 1) * g) * scale. `scale` is 1 float32 element
// on the params' device (rho / (norm + 1e-12), read there: no host sync). old_params: the params' dtype.
FO_OP(sam_perturb_,
      "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] old_params, Tensor scale, "
      "bool adaptive) -> ()")

// Muon (docs/spec.md §8), before Newton-Schulz: g' = maximize ? -g : g; buf = lerp(buf, g', 1-momentum);
// updates = lerp(g', buf, momentum) if nesterov else buf, rounded to the updates' dtype (bfloat16 or
// the grads'). Lerp with torch's roundings (csrc/math/muon.h). grads are read only; momentum_buffers:
// the grads' dtype, or float32 for bf16/fp16 grads.
FO_OP(muon_momentum_,
      "(Tensor[] grads, Tensor(a!)[] momentum_buffers, Tensor(b!)[] updates, float momentum, "
      "bool nesterov, bool maximize) -> ()")

// Muon (docs/spec.md §8), after Newton-Schulz: u = round_to_updates_dtype(updates * float32(scales[i]));
// p *= 1 - lr*wd (skipped when wd == 0: exact); p = fma(u, -lr, p). updates: bfloat16 or the params'
// dtype, params[i]'s numel, any strides (read in row-major order, as u.reshape(p.shape)).
FO_OP(muon_apply_,
      "(Tensor(a!)[] params, Tensor[] updates, float[] scales, float lr, float weight_decay) -> ()")

// NeuroOptima's core (docs/spec.md §7), the reference's op order: g' = (maximize ? -g : g) (+ wd*p);
// d = g' - prev; m = b1*m + (1-b1)*g'; diff = b2*diff + (1-b2)*d; v = b2*v + (1-b2)*g'^2;
// p -= lr*sign((m + b2*diff) / (sqrt(v) + eps)); prev = g'.
FO_OP(neuro_optima_,
      "(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] exp_avg_diffs, Tensor(e!)[] prev_grads, float lr, float beta1, float beta2, "
      "float eps, float weight_decay, bool maximize) -> ()")
