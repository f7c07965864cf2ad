// The host side every lowbit op shares, CPU and CUDA (csrc/cpu/lowbit_updates.cpp,
// csrc/cuda/lowbit_updates.cuh): every argument of LowbitArgs and every tensor checked before anything
// is written, and the call's plan read from them (docs/lowbit.md §5).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <array>
#include <cstdint>
#include <vector>

#include "elementwise.h"
#include "math/lowbit.h"
#include "multi_tensor_lists.h"  // TypeTag

namespace fused_optim {
namespace lowbit {

// streams 1..7 for the state lists (fused_optim.lowbit.MAX_STREAMS = 8 with the param's)
constexpr int kMaxLowbitStates = 7;
enum StateFormat : int64_t { kFp32 = 0, kBf16 = 1, k8bit = 2 };

// One call's checked arguments. mags / thr point into `tables` (on the kernels' device).
struct LowbitPlan {
  int64_t rows = 0;
  int n_states = 0;
  StateFormat fmt = kFp32;
  bool param_sr = false;
  uint64_t seed = 0;
  uint32_t step = 0;
  const float* step_counter = nullptr;  // the step_tensor's data (read with step_of_counter), or null
  std::vector<int64_t> tensor_index;
  std::array<const float*, kMaxLowbitStates> mags{}, thr{};
  std::array<bool, kMaxLowbitStates> is_signed{};
};

// LowbitArgs from the lowbit arguments of an op with its own schema (adan_lowbit_)
inline LowbitArgs lowbit_args(at::TensorList absmax, const at::Tensor& tables, at::IntArrayRef signed_maps,
                              int64_t fmt, bool param_sr, int64_t seed, int64_t step,
                              const c10::optional<at::Tensor>& step_tensor, at::IntArrayRef tensor_index) {
  LowbitArgs l;
  l.absmax = absmax.vec();
  l.tables = tables;
  l.signed_maps = signed_maps.vec();
  l.fmt = fmt;
  l.param_sr = param_sr;
  l.seed = seed;
  l.step = step;
  l.step_tensor = step_tensor;
  l.tensor_index = tensor_index.vec();
  return l;
}

// What an op's lists allow beyond an update's (params, grads of the params' dtype, 1+ states): Muon's
// stages, whose list 1 (grads, or Newton-Schulz's updates) has a dtype of its own and whose apply stage
// has no state list.
struct PlanOptions {
  int min_states = 1;
  bool grads_own_dtype = false;
};

// Checks every argument (before anything is written) and reads the plan. lists: params, grads, states;
// every tensor (tables and absmax included) on `device`, the one the kernels run on.
inline LowbitPlan plan_lowbit(const char* op, const std::vector<at::TensorList>& lists, const LowbitArgs& l,
                              const at::Device& device, PlanOptions opt = {}) {
  LowbitPlan plan;
  plan.n_states = static_cast<int>(lists.size()) - 2;
  TORCH_CHECK(plan.n_states >= opt.min_states && plan.n_states <= kMaxLowbitStates, op, ": ", opt.min_states,
              " to ", kMaxLowbitStates, " state lists");
  plan.rows = static_cast<int64_t>(lists[0].size());
  for (size_t k = 1; k < lists.size(); ++k) {
    TORCH_CHECK(static_cast<int64_t>(lists[k].size()) == plan.rows, op, ": list ", k, " has ", lists[k].size(),
                " tensors, params has ", plan.rows);
  }
  TORCH_CHECK(l.fmt >= kFp32 && l.fmt <= k8bit, op, ": fmt must be 0 (fp32), 1 (bf16) or 2 (8bit), got ", l.fmt);
  plan.fmt = static_cast<StateFormat>(l.fmt);
  plan.param_sr = l.param_sr;
  TORCH_CHECK(l.seed >= 0, op, ": seed must be in [0, 2**63), got ", l.seed);
  plan.seed = static_cast<uint64_t>(l.seed);
  plan.step = static_cast<uint32_t>(static_cast<uint64_t>(l.step) & 0xFFFFFFFFu);  // the reference's step & (2^32-1)
  if (l.step_tensor.has_value()) {
    const at::Tensor& s = *l.step_tensor;
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == device, op,
                ": step_tensor must be a 1-element float32 tensor (the step counter) on ", device, ", got ",
                s.numel(), " elements of ", s.scalar_type(), " on ", s.device());
    plan.step_counter = s.data_ptr<float>();
  }
  TORCH_CHECK(static_cast<int64_t>(l.tensor_index.size()) == plan.rows, op, ": tensor_index needs ", plan.rows,
              " entries, got ", l.tensor_index.size());
  for (int64_t t : l.tensor_index) {
    TORCH_CHECK(t >= 0 && t < (int64_t(1) << 31), op, ": tensor_index must be in [0, 2**31), got ", t);
  }
  plan.tensor_index = l.tensor_index;
  const int64_t want_absmax = plan.fmt == k8bit ? plan.n_states * plan.rows : 0;
  TORCH_CHECK(static_cast<int64_t>(l.absmax.size()) == want_absmax, op, ": absmax needs ", want_absmax,
              " tensors (one per 8-bit state tensor), got ", l.absmax.size());
  if (plan.fmt == k8bit) {
    TORCH_CHECK(static_cast<int64_t>(l.signed_maps.size()) == plan.n_states, op, ": signed_maps needs ",
                plan.n_states, " entries, got ", l.signed_maps.size());
    const auto& t = l.tables;
    TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 3 &&
                    t.size(0) == plan.n_states && t.size(1) == 2 && t.size(2) == 256,
                op, ": tables must be a contiguous float32 tensor [", plan.n_states, ", 2, 256] on ", device);
    for (int j = 0; j < plan.n_states; ++j) {
      plan.is_signed[j] = l.signed_maps[j] != 0;
      plan.mags[j] = t.data_ptr<float>() + j * 512;
      plan.thr[j] = plan.mags[j] + 256;
    }
  }
  const auto pdt = plan.rows ? lists[0][0].scalar_type() : at::kFloat;
  TORCH_CHECK(pdt == at::kFloat || pdt == at::kBFloat16 || pdt == at::kHalf, op,
              ": params must be float32, bfloat16 or float16 (float64 runs fused_optim.lowstate.reference_step)");
  const auto sdt = plan.fmt == kFp32 ? at::kFloat : plan.fmt == kBf16 ? at::kBFloat16 : at::kByte;
  const auto gdt = !opt.grads_own_dtype ? pdt : plan.rows ? lists[1][0].scalar_type() : at::kFloat;
  TORCH_CHECK(gdt == at::kFloat || gdt == at::kBFloat16 || gdt == at::kHalf, op,
              ": list 1 must be float32, bfloat16 or float16, got ", gdt);
  for (int64_t i = 0; i < plan.rows; ++i) {
    const int64_t n = lists[0][i].numel();
    for (size_t k = 0; k < lists.size(); ++k) {
      const at::Tensor& t = lists[k][i];
      const auto want = k == 0 ? pdt : k == 1 ? gdt : sdt;
      TORCH_CHECK(t.device() == device, op, ": list ", k, " tensor ", i, " is on ", t.device(), ", expected ",
                  device, " (one device per call)");
      TORCH_CHECK(t.scalar_type() == want, op, ": list ", k, " tensor ", i, " must be ", want, ", got ",
                  t.scalar_type());
      TORCH_CHECK(t.numel() == n, op, ": list ", k, " tensor ", i, " has ", t.numel(), " elements, its param ", n);
      // the element index is the flat row-major index: dense row-major storage only (the launcher
      // sends other layouts to the reference path)
      TORCH_CHECK(t.is_contiguous(), op, ": list ", k, " tensor ", i, " must be contiguous");
    }
    if (plan.fmt == k8bit) {
      for (int j = 0; j < plan.n_states; ++j) {
        const at::Tensor& a = l.absmax[j * plan.rows + i];
        TORCH_CHECK(a.device() == device && a.scalar_type() == at::kFloat && a.is_contiguous() &&
                        a.numel() == (n + kQuantBlock - 1) / kQuantBlock,
                    op, ": absmax of state list ", j, " tensor ", i, " must be a contiguous float32 tensor of ",
                    (n + kQuantBlock - 1) / kQuantBlock, " block scales on ", device);
      }
    }
  }
  return plan;
}

// f(TypeTag<T>{}) for T the storage type of a float32 / bfloat16 / float16 list (plan_lowbit admits no other)
template <typename F>
void dispatch_type(at::ScalarType t, const F& f) {
  switch (t) {
    case at::kFloat:
      return f(TypeTag<float>{});
    case at::kBFloat16:
      return f(TypeTag<c10::BFloat16>{});
    default:
      return f(TypeTag<c10::Half>{});
  }
}

}  // namespace lowbit
}  // namespace fused_optim
