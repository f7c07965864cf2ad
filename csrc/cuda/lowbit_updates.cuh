// CUDA kernels of the lowbit ops (docs/lowbit.md §5): an elementwise rule's update (Lion), Adan's, Gravity's
// or NeuroOptima's core over bf16 or 8-bit state and stochastically rounded bf16 / fp16 params (and Muon's two
// stages: its bf16 / 8-bit momentum buffer, its rounded params), in one pass: the
// CUDA twin of csrc/cpu/lowbit_updates.cpp, with the same per-element Ops as the fp32 ops of
// fused_optim_cuda.cu (this file is part of that translation unit, included at its end).
//
// One block per 65536-element chunk (multi_tensor_apply's chunking), 512 threads: each pass of the block
// takes 512 consecutive elements, one per thread, i.e. two whole quantization blocks (threads 0-255 and
// 256-511; chunks start on block boundaries). A thread decodes its element's state to fp32 registers
// (bf16 widened; 8-bit: code times the block's scale, from the map copied to shared memory once per
// block), runs the Op (the fp32 op's math, AMP unscale written back), then encodes: bf16 state rounded
// stochastically (stream 1 + j), 8-bit: the quantization block's new absmax (a max over its 256 threads:
// warp shuffles, then the 8 warps' maxima in shared memory) and the element's code to nearest; the param
// stored rounded to nearest, or stochastically (bf16 / fp16 params with param_sr, stream 0). found_inf and a
// capturable step's counter are read on the device: no host sync, so a CUDA graph can capture the step;
// a skipped step reads and writes nothing.
#pragma once

#include "../lowbit_plan.h"
#include "../math/lowbit.h"

namespace fused_optim {
namespace cuda {
namespace {

namespace lb = ::fused_optim::lowbit;

constexpr int kQuantBlock = lb::kQuantBlock;
constexpr int kWarpsPerQuantBlock = kQuantBlock / 32;
static_assert(kThreads % kQuantBlock == 0 && kChunk % kThreads == 0,
              "a pass of the block covers whole quantization blocks; chunks start on their boundaries");

// A row of a lowbit launch: the TensorRow fields find_row reads, the block scales of each 8-bit state
// tensor, and the tensor's counter word of the generator (docs/lowbit.md §1).
template <int NS>
struct LowbitRow {
  int64_t row;
  int64_t numel;
  int64_t chunk_begin;
  void* ptrs[2 + NS];                // params, grads, the NS state lists
  float* absmax[NS > 0 ? NS : 1];    // nullptr unless 8-bit (Muon's apply stage has no state list)
  uint32_t tensor;
};

// What every block of a launch reads besides its row (kernel arguments, no device memory).
template <int NS>
struct LowbitKernelArgs {
  int fmt;               // lb::StateFormat
  bool param_sr;         // bf16 and fp16 params only (the host clears it for fp32)
  uint64_t seed;
  uint32_t step;
  const float* step_counter;  // capturable: the device step counter (lb::step_of_counter), else null
  const float* tables;   // [NS, 2, 256]: per list its map's magnitudes, then its thresholds (8-bit)
  bool is_signed[NS > 0 ? NS : 1];
};

// One list's map in the block's shared copy of the tables, indexed like the pointer lowbit.h takes.
template <typename Shared>
struct SharedMap {
  const Shared& tables;
  int offset;
  __device__ float operator[](int k) const { return static_cast<float>(tables[offset + k]); }
};
template <typename Shared>
__device__ inline SharedMap<Shared> shared_map(const Shared& tables, int offset) {
  return SharedMap<Shared>{tables, offset};
}

// P: list 0's storage (params, or Muon's Newton-Schulz input), G: list 1's (grads, or Muon's updates)
template <int NS, typename P, typename G, typename Op>
__global__ void __launch_bounds__(kThreads) lowbit_update_kernel(const LowbitRow<NS>* rows, int64_t nrows,
                                                                 const float* found_inf, LowbitKernelArgs<NS> a,
                                                                 Op op) {
  if (found_inf != nullptr && *found_inf != 0.0f) {
    return;
  }
  constexpr int kLists = NS > 0 ? NS : 1;  // array sizes (Muon's apply stage has no state list)
  FO_SHARED_ARRAY(float, tables, kLists * 512);
  FO_SHARED_ARRAY(float, scratch, kLists * (kThreads / 32));
  const int64_t chunk = blockIdx.x;
  const LowbitRow<NS> row = find_row(rows, nrows, chunk);
  const int64_t begin = (chunk - row.chunk_begin) * kChunk;
  const int64_t end = begin + kChunk < row.numel ? begin + kChunk : row.numel;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, half = tid / kQuantBlock;
  const bool q8 = a.fmt == lb::k8bit, sr_state = a.fmt == lb::kBf16;
  const uint32_t step = a.step_counter != nullptr ? lb::step_of_counter(*a.step_counter) : a.step;
  if (q8) {
    for (int k = tid; k < NS * 512; k += kThreads) tables[k] = a.tables[k];
    __syncthreads();
  }
  TensorRow<2 + NS> base{};
  base.row = row.row;
  base.numel = row.numel;
  const auto ctx = op.context(base);
  P* p = static_cast<P*>(row.ptrs[0]);
  G* g = static_cast<G*>(row.ptrs[1]);
  for (int64_t pass = begin; pass < end; pass += kThreads) {
    const int64_t i = pass + tid;
    const bool in = i < end;
    const int64_t blk = (pass + half * kQuantBlock) / kQuantBlock;  // this thread's quantization block
    float v[2 + NS];
    if (in) {
      v[0] = static_cast<float>(p[i]);
      v[1] = static_cast<float>(g[i]);
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        if (a.fmt == lb::kFp32) {
          v[2 + j] = static_cast<const float*>(row.ptrs[2 + j])[i];
        } else if (sr_state) {
          v[2 + j] = lb::bf16_bits_to_float(static_cast<const uint16_t*>(row.ptrs[2 + j])[i]);
        } else {
          const uint8_t code = static_cast<const uint8_t*>(row.ptrs[2 + j])[i];
          const float scale = row.absmax[j][blk];
          const auto mag = shared_map(tables, j * 512);
          v[2 + j] = a.is_signed[j] ? lb::dequantize_value<true>(code, scale, mag)
                                    : lb::dequantize_value<false>(code, scale, mag);
        }
      }
      op(v, ctx);  // the fp32 op's math; under AMP v[1] becomes the unscaled grad
      if constexpr (((Op::kWrites >> 1) & 1u) != 0) g[i] = static_cast<G>(v[1]);
    }
    if (NS > 0 && q8) {
      // every state's new block scale: max |s| over the quantization block's 256 threads (0 past the end)
      float m[kLists];
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        m[j] = in ? lb::abs_bits(v[2 + j]) : 0.0f;
        for (int offset = 16; offset > 0; offset /= 2) {
          m[j] = math::fo_max_nan(m[j], __shfl_down_sync(0xffffffffu, m[j], offset));
        }
      }
      __syncthreads();  // the previous pass has read scratch
      if (lane == 0) {
#pragma unroll
        for (int j = 0; j < NS; ++j) scratch[j * (kThreads / 32) + warp] = m[j];
      }
      __syncthreads();
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        float scale = 0.0f;
        for (int w = 0; w < kWarpsPerQuantBlock; ++w) {
          scale = math::fo_max_nan(scale, static_cast<float>(scratch[j * (kThreads / 32) +
                                                                     half * kWarpsPerQuantBlock + w]));
        }
        if (in) {
          const auto thr = shared_map(tables, j * 512 + 256);
          static_cast<uint8_t*>(row.ptrs[2 + j])[i] = a.is_signed[j] ? lb::quantize_value<true>(v[2 + j], scale, thr)
                                                                     : lb::quantize_value<false>(v[2 + j], scale, thr);
          if (i % kQuantBlock == 0) row.absmax[j][blk] = scale;  // the block's first element writes it
        }
      }
    }
    if (!in) {
      continue;
    }
    const bool sr_param = a.param_sr && !std::is_same<P, float>::value;  // bf16 and fp16 params
    lb::Philox4 w0{}, w1{};
    if (sr_param || sr_state) w0 = lb::random_words(a.seed, step, row.tensor, static_cast<uint64_t>(i));
    if (sr_state && NS >= 4) w1 = lb::random_words(a.seed, step, row.tensor + 0x80000000u, static_cast<uint64_t>(i));
    if (a.fmt == lb::kFp32) {
#pragma unroll
      for (int j = 0; j < NS; ++j) static_cast<float*>(row.ptrs[2 + j])[i] = v[2 + j];
    } else if (sr_state) {
#pragma unroll
      for (int j = 0; j < NS; ++j) {
        // stream s = 1 + j: word s % 4 of the call with counter word tensor + (s / 4) * 2^31
        const uint32_t r = (1 + j) < 4 ? w0.w[(1 + j) % 4] : w1.w[(1 + j) % 4];
        static_cast<uint16_t*>(row.ptrs[2 + j])[i] = lb::sr_bf16_bits(v[2 + j], r);
      }
    }
    if constexpr (std::is_same<P, c10::BFloat16>::value) {
      if (sr_param) {
        p[i] = c10::BFloat16(lb::sr_bf16_bits(v[0], w0.w[0]), c10::BFloat16::from_bits());
        continue;
      }
    } else if constexpr (std::is_same<P, c10::Half>::value) {
      if (sr_param) {
        p[i] = c10::Half(lb::sr_fp16_bits(v[0], w0.w[0]), c10::Half::from_bits());
        continue;
      }
    }
    p[i] = static_cast<P>(v[0]);
  }
}

// The host side of every lowbit op: the checks (lowbit_plan.h), the rows, one launch. make_op(TypeTag<P>,
// TypeTag<float>, UNSCALE) gives the fp32 op's Op for params stored as P. Muon's stages: `opt` (the checks:
// list 1 of its own dtype; no state list), FixedP / FixedG the storage of lists 0 / 1 where the op fixes it
// (both void: P dispatched and G = P; FixedP: G dispatched; FixedG: P dispatched), so only kernels an op
// can launch are compiled; `param_sr`: false for a stage that writes no param.
template <int NS, typename FixedP = void, typename FixedG = void, typename MakeOp>
void launch_lowbit(const char* op_name, const std::vector<at::TensorList>& lists, const LowbitArgs& l,
                   const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                   const std::vector<NamedScalar>& scalars, const MakeOp& make_op, lb::PlanOptions opt = {},
                   bool param_sr = true) {
  TORCH_CHECK(static_cast<int>(lists.size()) == 2 + NS, op_name, ": ", NS, " state lists expected");
  if (lists[0].empty()) {
    return;
  }
  const at::Device device = lists[0][0].device();
  TORCH_CHECK(device.type() == kKernelDevice, op_name, ": CUDA kernel called with tensors on ", device);
  const lb::LowbitPlan plan = lb::plan_lowbit(op_name, lists, l, device, opt);
  check_scalar_tensor(op_name, "grad_scale", grad_scale, device);
  check_scalar_tensor(op_name, "found_inf", found_inf, device);
  for (const auto& s : scalars) {
    check_scalar_tensor(op_name, s.name, *s.tensor, device);
  }
  c10::cuda::CUDAGuard guard(device);
  std::vector<LowbitRow<NS>> rows;
  int64_t chunks = 0;
  for (int64_t i = 0; i < plan.rows; ++i) {
    const int64_t n = lists[0][i].numel();
    if (n == 0) {
      continue;
    }
    LowbitRow<NS> r{};
    r.row = i;
    r.numel = n;
    r.chunk_begin = chunks;
    for (int k = 0; k < 2 + NS; ++k) r.ptrs[k] = lists[k][i].data_ptr();
    for (int j = 0; j < NS; ++j) {
      r.absmax[j] = plan.fmt == lb::k8bit ? l.absmax[j * plan.rows + i].data_ptr<float>() : nullptr;
    }
    r.tensor = static_cast<uint32_t>(plan.tensor_index[i]);
    rows.push_back(r);
    chunks += (n + kChunk - 1) / kChunk;
  }
  if (rows.empty()) {
    return;
  }
  TORCH_CHECK(chunks < (int64_t(1) << 31), op_name, ": too many chunks");
  const RowTable<LowbitRow<NS>> table = upload_rows(rows, chunks, device);
  LowbitKernelArgs<NS> args{};
  args.fmt = static_cast<int>(plan.fmt);
  args.param_sr = param_sr && plan.param_sr && lists[0][0].scalar_type() != at::kFloat;  // bf16, fp16 params
  args.seed = plan.seed;
  args.step = plan.step;
  args.step_counter = plan.step_counter;
  args.tables = plan.fmt == lb::k8bit ? l.tables.data_ptr<float>() : nullptr;
  for (int j = 0; j < NS; ++j) args.is_signed[j] = plan.is_signed[j];
  const auto run = [&](auto pt, auto gt) {
    using P = typename decltype(pt)::type;
    using G = typename decltype(gt)::type;
    dispatch_bool(grad_scale.has_value(), [&](auto unscale) {
      auto op = make_op(pt, TypeTag<float>{}, unscale);
      launch<lowbit_update_kernel<NS, P, G, decltype(op)>>(static_cast<unsigned>(chunks), kThreads,
                                                            c10::cuda::getCurrentCUDAStream(), table.rows,
                                                            table.nrows, scalar_ptr(found_inf), args, op);
    });
  };
  const auto with_p = [&](auto pt) {
    if constexpr (!std::is_void<FixedG>::value) {
      run(pt, TypeTag<FixedG>{});
    } else if constexpr (!std::is_void<FixedP>::value) {  // list 1 of its own dtype (Muon's grads)
      lb::dispatch_type(lists[1][0].scalar_type(), [&](auto gt) { run(pt, gt); });
    } else {
      run(pt, pt);
    }
  };
  if constexpr (!std::is_void<FixedP>::value) {
    with_p(TypeTag<FixedP>{});
  } else {
    lb::dispatch_type(lists[0][0].scalar_type(), with_p);
  }
}

// Rule's `<kName>_lowbit_` op (registered with the rule's generated schema, elementwise_registration.h)
template <typename Rule>
void run_elementwise_lowbit(const ElementwiseArgs& a, const LowbitArgs& l) {
  launch_lowbit<RuleShape<Rule>::kStates>(a.op.c_str(), a.list_refs(), l, a.grad_scale, a.found_inf,
                                          named_scalars(a.tensor_scalar_names, a.tensor_scalars),
                                          rule_op_maker<Rule>(a));
}

void adan_lowbit_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads, at::TensorList absmax,
                  const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt, bool param_sr, int64_t seed,
                  int64_t step, const c10::optional<at::Tensor>& step_tensor,
                  at::IntArrayRef tensor_index, double lr, double beta1, double beta2, double beta3,
                  double bias_correction1, double bias_correction2, double bias_correction3_sqrt, double eps,
                  double weight_decay, bool no_prox, const c10::optional<at::Tensor>& clip, bool maximize,
                  const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                  const c10::optional<at::Tensor>& lr_tensor,
                  const c10::optional<at::Tensor>& bias_correction1_tensor,
                  const c10::optional<at::Tensor>& bias_correction2_tensor,
                  const c10::optional<at::Tensor>& bias_correction3_sqrt_tensor,
                  const c10::optional<at::Tensor>& first_step) {
  const char* op = "fused_optim::adan_lowbit_";
  check_adan_bias_corrections(op, bias_correction1_tensor, bias_correction2_tensor, bias_correction3_sqrt_tensor);
  launch_lowbit<4>(op, {params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads},
                   lb::lowbit_args(absmax, tables, signed_maps, fmt, param_sr, seed, step, step_tensor, tensor_index),
                   grad_scale, found_inf,
                   adan_scalars(clip, lr_tensor, bias_correction1_tensor, bias_correction2_tensor,
                                bias_correction3_sqrt_tensor, first_step),
                   adan_op_maker(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, bias_correction3_sqrt,
                                 eps, weight_decay, no_prox, clip, maximize, grad_scale, lr_tensor,
                                 bias_correction1_tensor, bias_correction2_tensor, bias_correction3_sqrt_tensor,
                                 first_step));
}

void gravity_lowbit_(at::TensorList params, at::TensorList grads, at::TensorList vs, at::TensorList absmax,
                     const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt, bool param_sr, int64_t seed,
                     int64_t step, const c10::optional<at::Tensor>& step_tensor, at::IntArrayRef tensor_index,
                     const at::Tensor& stats, double lr, double beta_hat, bool maximize,
                     const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                     const c10::optional<at::Tensor>& lr_tensor,
                     const c10::optional<at::Tensor>& beta_hat_tensor) {
  const char* op = "fused_optim::gravity_lowbit_";
  launch_lowbit<1>(op, {params, grads, vs},
                   lb::lowbit_args(absmax, tables, signed_maps, fmt, param_sr, seed, step, step_tensor, tensor_index),
                   grad_scale, found_inf, {{"lr_tensor", &lr_tensor}, {"beta_hat_tensor", &beta_hat_tensor}},
                   gravity_op_maker(op, params, stats, lr, beta_hat, maximize, grad_scale, lr_tensor, beta_hat_tensor));
}

void neuro_optima_lowbit_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList prev_grads,
                          at::TensorList absmax, const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt,
                          bool param_sr, int64_t seed, int64_t step, const c10::optional<at::Tensor>& step_tensor,
                          at::IntArrayRef tensor_index, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool maximize) {
  launch_lowbit<4>("fused_optim::neuro_optima_lowbit_",
                   {params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads},
                   lb::lowbit_args(absmax, tables, signed_maps, fmt, param_sr, seed, step, step_tensor, tensor_index),
                   c10::nullopt, c10::nullopt, {}, [&](auto, auto, auto) {
                     // neuro_optima_'s Op: maximize's sign inside, no AMP (the grads are only read)
                     return NeuroOptimaOp<float>{math::NeuroOptimaCoeffs<float>(lr, beta1, beta2, eps, weight_decay),
                                                 maximize ? -1.0f : 1.0f};
                   });
}

// Muon's momentum stage in the pass's layout: v[0] the Newton-Schulz input (written), v[1] the grad, v[2]
// the buffer; the math of muon_momentum_'s MuonMomentumOp
struct MuonMomentumLowbitOp {
  static constexpr unsigned kWrites = 0b101;  // updates, momentum_buffers (grads are read only)
  math::MuonMomentumCoeffs<float> c;
  float sign;
  __device__ NoCtx context(const TensorRow<3>&) const { return {}; }
  __device__ void operator()(float (&v)[3], const NoCtx&) const {
    v[0] = math::muon_momentum(math::prepare_grad(v[1], sign, false, 1.0f), v[2], c);
  }
};

void muon_momentum_lowbit_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList updates,
                           at::TensorList absmax, const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt,
                           bool param_sr, int64_t seed, int64_t step, const c10::optional<at::Tensor>& step_tensor,
                           at::IntArrayRef tensor_index, double momentum, bool nesterov, bool maximize) {
  const char* op = "fused_optim::muon_momentum_lowbit_";
  TORCH_CHECK(updates.empty() || updates[0].scalar_type() == at::kBFloat16, op,
              ": updates (the Newton-Schulz input) must be bfloat16");
  const MuonMomentumLowbitOp mop{math::MuonMomentumCoeffs<float>(momentum, nesterov), maximize ? -1.0f : 1.0f};
  launch_lowbit<1, c10::BFloat16>(op, {updates, grads, momentum_buffers},
                   lb::lowbit_args(absmax, tables, signed_maps, fmt, param_sr, seed, step, step_tensor, tensor_index),
                   c10::nullopt, c10::nullopt, {}, [&](auto, auto, auto) { return mop; }, {1, true},
                   /*param_sr=*/false);
}

void muon_apply_lowbit_(at::TensorList params, at::TensorList updates, at::TensorList absmax,
                        const at::Tensor& tables, at::IntArrayRef signed_maps, int64_t fmt, bool param_sr, int64_t seed,
                        int64_t step, const c10::optional<at::Tensor>& step_tensor, at::IntArrayRef tensor_index,
                        at::ArrayRef<double> scales, double lr, double weight_decay) {
  const char* op = "fused_optim::muon_apply_lowbit_";
  TORCH_CHECK(scales.size() == params.size(), op, ": scales has ", scales.size(), " values, expected ",
              params.size(), " (one per parameter)");
  if (params.empty()) {
    return;
  }
  const at::Tensor dev_scales = device_scales(scales, params[0].device());
  const math::MuonApplyCoeffs<float> c(lr, weight_decay);
  lb::dispatch_type(updates.empty() ? at::kFloat : updates[0].scalar_type(), [&](auto ut) {
    using U = typename decltype(ut)::type;
    // muon_apply_'s Op (v[0] the param, v[1] the update), its row's scale read on the device
    const MuonApplyOp<U, float> aop{c, dev_scales.data_ptr<double>()};
    launch_lowbit<0, void, U>(op, {params, updates},
                     lb::lowbit_args(absmax, tables, signed_maps, fmt, param_sr, seed, step, step_tensor,
                                     tensor_index),
                     c10::nullopt, c10::nullopt, {}, [&](auto, auto, auto) { return aop; }, {0, true});
  });
}

}  // namespace
}  // namespace cuda
}  // namespace fused_optim
