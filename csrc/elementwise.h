// The generic elementwise update op: one op per rule of csrc/math/elementwise_rules.h, its schema, CPU
// and CUDA kernels all derived from the rule's declaration (docs/design.md, "Adding a native elementwise
// op").
//
// A rule (csrc/math/lion.h is one) declares, as static members:
//   kName            the op's name without the trailing underscore ("lion" -> fused_optim::lion_)
//   kStates          its state lists, space-separated names (after `params` and `grads` in the schema)
//   kScalars         its float arguments, in schema order
//   kFlags           its bool arguments, in schema order
//   kTensorScalars   the scalars (a subset of kScalars) that may also be given as a
//                    1-element float32 device tensor `<name>_tensor` (capturable, tensor lr)
//   Coeffs<M>        the per-call coefficients in the math type M
//   coeffs<M>(const double* scalars, const bool* flags)  -> Coeffs<M>, from the Python doubles
//   set_tensor_scalar(Coeffs<M>&, int i, M v)   (host and device) kTensorScalars[i] read from its tensor
//   update(T& p, const T& g, const Coeffs<M>& c, T&... states)   (host and device) one element; T is M
//                    or at::vec::Vectorized<M>; g is the prepared gradient (AMP unscale, maximize sign)
// The schema is then
//   <kName>_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] <state>..., float <scalar>...,
//            bool <flag>..., bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None,
//            Tensor? <tensor scalar>_tensor=None...) -> ()
// with the AMP and device-scalar conventions of csrc/fused_optim.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <array>
#include <string>
#include <vector>

namespace fused_optim {

// Number of space-separated words of a declaration string.
constexpr int count_words(const char* s) {
  int n = 0;
  bool in_word = false;
  for (; *s != '\0'; ++s) {
    const bool space = *s == ' ';
    n += (!space && !in_word) ? 1 : 0;
    in_word = !space;
  }
  return n;
}

inline std::vector<std::string> split_words(const char* s) {
  std::vector<std::string> out;
  std::string w;
  for (; ; ++s) {
    if (*s == ' ' || *s == '\0') {
      if (!w.empty()) out.push_back(w);
      w.clear();
      if (*s == '\0') break;
    } else {
      w += *s;
    }
  }
  return out;
}

// The list count (params, grads, states) and the argument counts of a rule's op.
template <typename Rule>
struct RuleShape {
  static constexpr int kStates = count_words(Rule::kStates);
  static constexpr int kLists = 2 + kStates;
  static constexpr int kScalars = count_words(Rule::kScalars);
  static constexpr int kFlags = count_words(Rule::kFlags);
  static constexpr int kTensorScalars = count_words(Rule::kTensorScalars);
  static constexpr int kArgs = kLists + kScalars + kFlags + 3 + kTensorScalars;
  static_assert(kFlags <= 16, "at most 16 flags (ElementwiseArgs::flags)");
};

// One call of a rule's op, unpacked from the dispatcher's stack in schema order.
struct ElementwiseArgs {
  std::string op;                                // "fused_optim::<kName>_", for errors
  std::vector<std::vector<at::Tensor>> lists;  // params, grads, then the rule's states
  std::vector<double> scalars;
  std::array<bool, 16> flags{};
  bool maximize = false;
  c10::optional<at::Tensor> grad_scale;
  c10::optional<at::Tensor> found_inf;
  std::vector<c10::optional<at::Tensor>> tensor_scalars;  // kTensorScalars order
  std::vector<std::string> tensor_scalar_names;           // their schema names, "<scalar>_tensor"

  std::vector<at::TensorList> list_refs() const {
    return std::vector<at::TensorList>(lists.begin(), lists.end());
  }
};

// The low-precision-state arguments of a lowbit op (`<kName>_lowbit_`, `adan_lowbit_`), in schema order
// after the state lists (docs/lowbit.md §5; fused_optim.lowstate.Rounding on the Python side):
//   absmax       8-bit: the block scales, state list j's tensor i at j * rows + i (else empty)
//   tables       [states, 2, 256] fp32: per state list its map's magnitudes, then its thresholds
//   signed_maps  per state list: 1 the signed map, 0 the unsigned one
//   fmt          the state storage: 0 the ordinary fp32 state, 1 bf16 (stochastic rounding), 2 8-bit codes
//   param_sr     round bf16 / fp16 params stochastically (stream 0); state list j rounds with stream 1 + j
//   seed, step, tensor_index   the generator's key (docs/lowbit.md §1)
//   step_tensor  given (capturable): the step is this 1-element float32 counter on the kernels' device, read
//                there (its integer value's low 32 bits; no host sync on CUDA), and `step` is ignored
struct LowbitArgs {
  std::vector<at::Tensor> absmax;
  at::Tensor tables;
  std::vector<int64_t> signed_maps;
  int64_t fmt = 0;
  bool param_sr = false;
  int64_t seed = 0;
  int64_t step = 0;
  c10::optional<at::Tensor> step_tensor;
  std::vector<int64_t> tensor_index;
};

// The schema text of LowbitArgs, `alias` the absmax list's mutation letter.
inline std::string lowbit_schema_args(char alias) {
  return std::string("Tensor(") + alias + "!)[] absmax, Tensor tables, int[] signed_maps, int fmt, bool param_sr, " +
         "int seed, int step, Tensor? step_tensor, int[] tensor_index, ";
}

template <typename Rule>
std::string elementwise_op_name() {
  return std::string(Rule::kName) + "_";
}

// The rule's op over low-precision state: `<kName>_lowbit_`.
template <typename Rule>
std::string elementwise_lowbit_op_name() {
  return std::string(Rule::kName) + "_lowbit_";
}

}  // namespace fused_optim
