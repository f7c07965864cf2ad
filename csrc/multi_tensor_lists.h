// Host-side preparation of the tensor lists every op receives, shared by the CPU and CUDA backends.
//
// A kernel walks row i of the lists (params[i], grads[i], state[i]...) as flat arrays of numel
// elements, which is only valid when every tensor of the row lays its elements out in the same
// order. Rows where that fails (a sliced parameter with a contiguous grad, mixed strides) run on
// contiguous copies that are copied back after the kernel: slower, but never wrong.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace fused_optim {

struct PreparedLists {
  // lists[k][i]: list k, row i; same row count as the op's input (zero-size rows included, so
  // indices into per-tensor buffers such as the reduction output stay aligned)
  std::vector<std::vector<at::Tensor>> lists;
  std::vector<std::pair<at::Tensor, at::Tensor>> writeback;  // (original, contiguous copy)

  int64_t rows() const { return lists.empty() ? 0 : static_cast<int64_t>(lists[0].size()); }

  template <typename T>
  T* ptr(size_t list, int64_t row) const {
    return static_cast<T*>(lists[list][row].data_ptr());
  }

  // Copy the results computed in contiguous temporaries back into the caller's tensors.
  void finish() {
    for (auto& pr : writeback) {
      pr.first.copy_(pr.second);
    }
  }
};

inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  return a.sizes() == b.sizes() && a.strides() == b.strides();
}

// lists: the op's tensor lists, lists[0] the params (or the tensors of a reduction);
// mutated[k]: whether list k is written (only those need a write-back).
inline PreparedLists prepare_lists(const char* op, const std::vector<at::TensorList>& lists,
                                   const std::vector<bool>& mutated) {
  TORCH_CHECK(!lists.empty(), op, ": no tensor lists");
  const auto n = lists[0].size();
  for (size_t k = 1; k < lists.size(); ++k) {
    TORCH_CHECK(lists[k].size() == n, op, ": tensor list ", k, " has ", lists[k].size(),
                " tensors, expected ", n, " (one per parameter)");
  }
  PreparedLists out;
  out.lists.resize(lists.size());
  for (auto& l : out.lists) {
    l.reserve(n);
  }
  // every row against the first, not only within itself: the CUDA kernels run on lists[0][0]'s device
  // and would dereference a CPU or other-GPU pointer of a row that is merely consistent with itself
  const at::Device device = n > 0 ? lists[0][0].device() : at::Device(at::kCPU);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = lists[0][i];
    bool flat = ref.is_non_overlapping_and_dense();
    for (size_t k = 0; k < lists.size(); ++k) {
      const at::Tensor& t = lists[k][i];
      TORCH_CHECK(t.layout() == at::kStrided, op, ": sparse tensors are not supported");
      TORCH_CHECK(t.device() == device, op, ": tensor ", i, " of list ", k, " is on ", t.device(),
                  ", expected ", device, " (one device per call)");
      TORCH_CHECK(t.numel() == ref.numel(), op, ": tensor ", i, " of list ", k, " has ", t.numel(),
                  " elements, expected ", ref.numel());
      flat = flat && same_layout(t, ref) && t.is_non_overlapping_and_dense();
    }
    for (size_t k = 0; k < lists.size(); ++k) {
      const at::Tensor& t = lists[k][i];
      if (flat || t.numel() == 0) {
        out.lists[k].push_back(t);
      } else {
        at::Tensor c = t.contiguous();
        if (mutated[k] && !c.is_same(t)) {
          out.writeback.emplace_back(t, c);
        }
        out.lists[k].push_back(std::move(c));
      }
    }
  }
  return out;
}

// Lists [0, first_state): the param dtype (list 0: one supported dtype per call); lists
// [first_state, end): one state dtype, the param's or fp32 for bf16/fp16 params. Lists from `end` on
// follow their op's own rule (check_update_dtype).
inline void check_dtypes(const char* op, const PreparedLists& pl, size_t first_state, size_t end = SIZE_MAX) {
  end = std::min(end, pl.lists.size());
  for (int64_t i = 0; i < pl.rows(); ++i) {
    const auto pdt = pl.lists[0][i].scalar_type();
    TORCH_CHECK(pdt == at::kFloat || pdt == at::kDouble || pdt == at::kBFloat16 || pdt == at::kHalf, op,
                ": unsupported dtype ", pdt, " (float32, float64, bfloat16 and float16 are supported)");
    TORCH_CHECK(pdt == pl.lists[0][0].scalar_type(), op, ": one parameter dtype per call, got ",
                pl.lists[0][0].scalar_type(), " and ", pdt);
    for (size_t k = 1; k < first_state && k < end; ++k) {
      TORCH_CHECK(pl.lists[k][i].scalar_type() == pdt, op, ": gradient ", i, " has dtype ",
                  pl.lists[k][i].scalar_type(), ", its parameter ", pdt);
    }
    for (size_t k = first_state; k < end; ++k) {
      const auto sdt = pl.lists[k][i].scalar_type();
      TORCH_CHECK(sdt == pl.lists[first_state][0].scalar_type(), op, ": one state dtype per call");
      TORCH_CHECK(sdt == pdt || (sdt == at::kFloat && pdt != at::kDouble), op, ": state ", i,
                  " has dtype ", sdt, " for a ", pdt, " parameter (expected the parameter's dtype or float32)");
    }
  }
}

// List k (`name` in errors) has, row by row, the dtype of list 0 (`of`).
inline void check_same_dtype(const char* op, const PreparedLists& pl, size_t k, const char* name, const char* of) {
  for (int64_t i = 0; i < pl.rows(); ++i) {
    const auto dt = pl.lists[k][i].scalar_type(), ref = pl.lists[0][i].scalar_type();
    TORCH_CHECK(dt == ref, op, ": ", name, " ", i, " has dtype ", dt, ", ", of, " ", i, " ", ref,
                " (expected the same dtype)");
  }
}

// Muon's updates (list k, named `name` in errors): one dtype per call, bfloat16 (the dtype Newton-Schulz
// runs in) or `other` (the params'/grads' dtype).
inline void check_update_dtype(const char* op, const PreparedLists& pl, size_t k, const char* name,
                               at::ScalarType other) {
  for (int64_t i = 0; i < pl.rows(); ++i) {
    const auto dt = pl.lists[k][i].scalar_type();
    TORCH_CHECK(dt == at::kBFloat16 || dt == other, op, ": ", name, " ", i, " has dtype ", dt,
                " (expected bfloat16 or ", other, ")");
    TORCH_CHECK(dt == pl.lists[k][0].scalar_type(), op, ": one ", name, " dtype per call, got ",
                pl.lists[k][0].scalar_type(), " and ", dt);
  }
}

// The per-tensor [absmax, sum, sumsq] buffer that the update ops read.
inline void check_stats(const char* op, const at::Tensor& stats, int64_t rows, const at::Device& device) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == rows && stats.size(1) == 3 && stats.is_contiguous(), op,
              ": stats must be the contiguous [n, 3] output of multi_tensor_stats, got shape ", stats.sizes());
  TORCH_CHECK(stats.scalar_type() == at::kFloat || stats.scalar_type() == at::kDouble, op,
              ": stats must be float32 or float64");
  TORCH_CHECK(stats.device() == device || rows == 0, op, ": stats is on ", stats.device(), ", expected ", device);
}

// The host side of the reductions (multi_tensor_stats, multi_tensor_l2norm) on both backends: `tensors`
// and the optional `second` list (read only, same dtype; named `second_name` in errors) prepared, and
// the zero output [rows, cols] (cols 0: [rows]), float32 (float64 for float64 input), on the tensors'
// device (`empty_device` for an empty list).
struct ReductionLists {
  PreparedLists pl;
  at::ScalarType dtype;
  at::Tensor out;
};

inline ReductionLists prepare_reduction(const char* op, at::TensorList tensors,
                                        const c10::optional<at::TensorList>& second, const char* second_name,
                                        int64_t cols, const at::Device& empty_device) {
  std::vector<at::TensorList> in{tensors};
  if (second.has_value()) {
    in.push_back(*second);
  }
  ReductionLists r{prepare_lists(op, in, std::vector<bool>(in.size(), false)), at::kFloat, at::Tensor()};
  check_dtypes(op, r.pl, 1, 1);
  if (second.has_value()) {
    check_same_dtype(op, r.pl, 1, second_name, "tensors");
  }
  r.dtype = tensors.empty() ? at::kFloat : tensors[0].scalar_type();
  const at::Device device = tensors.empty() ? empty_device : tensors[0].device();
  const auto options = at::TensorOptions().dtype(r.dtype == at::kDouble ? at::kDouble : at::kFloat).device(device);
  r.out = cols > 0 ? at::zeros({r.pl.rows(), cols}, options) : at::zeros({r.pl.rows()}, options);
  return r;
}

// Optional 1-element tensors (AMP's grad_scale / found_inf, the clip factor, device scalars): float32, on
// the kernels' device (CUDA kernels read them there, no host sync) or on the CPU for CPU kernels.
inline void check_scalar_tensor(const char* op, const char* name, const c10::optional<at::Tensor>& t,
                                const at::Device& device) {
  if (!t.has_value()) {
    return;
  }
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, got ", t->numel());
  TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t->scalar_type());
  TORCH_CHECK(t->device() == device, op, ": ", name, " is on ", t->device(), ", expected ", device);
}

// Adan's three bias-correction tensors (capturable): all three or none; returns whether they are given.
inline bool check_adan_bias_corrections(const char* op, const c10::optional<at::Tensor>& bc1,
                                        const c10::optional<at::Tensor>& bc2,
                                        const c10::optional<at::Tensor>& bc3_sqrt) {
  const int given = int(bc1.has_value()) + int(bc2.has_value()) + int(bc3_sqrt.has_value());
  TORCH_CHECK(given == 0 || given == 3, op, ": pass the three bias-correction tensors together, or none (got ",
              given, ")");
  return given == 3;
}

}  // namespace fused_optim

namespace fused_optim {

// Math type of a storage type: fp32 registers for fp32/bf16/fp16 storage, fp64 for fp64.
template <typename P>
using opmath_t = std::conditional_t<std::is_same<P, double>::value, double, float>;

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<param type>, TypeTag<state type>) for the supported pairs: state in the param's
// dtype, or fp32 state for bf16/fp16 params (what FusedOptimizer gives the fused impls).
template <typename F>
void dispatch_param_state(const char* op, at::ScalarType p, at::ScalarType s, F&& f) {
  switch (p) {
    case at::kFloat:
      return f(TypeTag<float>{}, TypeTag<float>{});
    case at::kDouble:
      return f(TypeTag<double>{}, TypeTag<double>{});
    case at::kBFloat16:
      if (s == at::kFloat) return f(TypeTag<c10::BFloat16>{}, TypeTag<float>{});
      return f(TypeTag<c10::BFloat16>{}, TypeTag<c10::BFloat16>{});
    case at::kHalf:
      if (s == at::kFloat) return f(TypeTag<c10::Half>{}, TypeTag<float>{});
      return f(TypeTag<c10::Half>{}, TypeTag<c10::Half>{});
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", p);
  }
}

// Calls f(TypeTag<U>) for Muon's updates dtype U: bfloat16, or P (see check_update_dtype).
template <typename P, typename F>
void dispatch_update_type(at::ScalarType u, F&& f) {
  if (u == at::kBFloat16) {
    return f(TypeTag<c10::BFloat16>{});
  }
  return f(TypeTag<P>{});
}

// Muon's ops (momentum: grads, momentum_buffers, updates; apply: params, updates): the updates' dtype
// checked, then f(TypeTag<P>, TypeTag<S>, TypeTag<U>) with P list 0's storage type, S list `state`'s
// (P without one: state < 0) and U the updates' (list `updates`: bfloat16 or P).
template <typename F>
void dispatch_muon(const char* op, const PreparedLists& pl, int state, size_t updates, F&& f) {
  const auto pdt = pl.lists[0][0].scalar_type();
  check_update_dtype(op, pl, updates, "updates", pdt);
  dispatch_param_state(op, pdt, state >= 0 ? pl.lists[state][0].scalar_type() : pdt, [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    dispatch_update_type<P>(pl.lists[updates][0].scalar_type(), [&](auto ut) { f(pt, st, ut); });
  });
}

// ---- per-step scalars: a double, or a 1-element float32 tensor on the kernels' device -------------
//
// The one way every op takes "a float or a device tensor" (AMP's grad_scale / found_inf, the capturable
// lr, bias corrections...): the schema has the double and an optional tensor; the kernels get
// scalar_ptr(tensor), nullptr when it is not given, and read it with read_scalar where they use it:
// CUDA kernels in device memory (no host sync), CPU kernels in the CPU tensor.
inline const float* scalar_ptr(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<float>() : nullptr;
}

C10_HOST_DEVICE inline float read_scalar(const float* p, float if_none) { return p != nullptr ? *p : if_none; }

// An optional scalar tensor with its schema name, for check_scalar_tensor.
struct NamedScalar {
  const char* name;
  const c10::optional<at::Tensor>* tensor;
};

// The optional scalar tensors of a call, by name.
inline std::vector<NamedScalar> named_scalars(const std::vector<std::string>& names,
                                              const std::vector<c10::optional<at::Tensor>>& tensors) {
  std::vector<NamedScalar> out;
  for (size_t i = 0; i < names.size(); ++i) {
    out.push_back({names[i].c_str(), &tensors[i]});
  }
  return out;
}

// found_inf read on the host: only for CPU kernels (CUDA kernels read device memory).
inline bool host_found_inf(const c10::optional<at::Tensor>& found_inf) {
  return read_scalar(scalar_ptr(found_inf), 0.0f) != 0.0f;
}

}  // namespace fused_optim
