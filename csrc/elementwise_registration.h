// Schema and boxed kernel of each rule's op (csrc/elementwise.h), for the TORCH_LIBRARY blocks of
// csrc/fused_optim.cpp (CPU) and csrc/cuda/fused_optim_cuda.cu (CUDA). The kernels are boxed: one
// function per rule reads the dispatcher's stack, whatever the rule's argument count.
#pragma once

#include <torch/library.h>

#include "elementwise.h"

namespace fused_optim {

// The op's schema; `lowbit`: the `<kName>_lowbit_` op's, LowbitArgs after the state lists.
template <typename Rule>
std::string elementwise_schema(bool lowbit = false) {
  std::string s = (lowbit ? elementwise_lowbit_op_name<Rule>() : elementwise_op_name<Rule>()) + "(";
  char alias = 'a';
  std::vector<std::string> lists{"params", "grads"};
  for (const auto& w : split_words(Rule::kStates)) lists.push_back(w);
  for (const auto& w : lists) s += std::string("Tensor(") + alias++ + "!)[] " + w + ", ";
  if (lowbit) s += lowbit_schema_args(alias++);
  for (const auto& w : split_words(Rule::kScalars)) s += "float " + w + ", ";
  for (const auto& w : split_words(Rule::kFlags)) s += "bool " + w + ", ";
  s += "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None";
  for (const auto& w : split_words(Rule::kTensorScalars)) s += ", Tensor? " + w + "_tensor=None";
  return s + ") -> ()";
}

inline c10::optional<at::Tensor> optional_tensor(const c10::IValue& v) {
  return v.isNone() ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(v.toTensor());
}

// The boxed kernel of Rule's op: unpacks the stack into ElementwiseArgs and calls Run.
template <typename Rule, void (*Run)(const ElementwiseArgs&)>
void boxed_elementwise(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  using Shape = RuleShape<Rule>;
  const auto in = torch::jit::last(*stack, Shape::kArgs);
  ElementwiseArgs a;
  a.op = "fused_optim::" + elementwise_op_name<Rule>();
  for (const auto& w : split_words(Rule::kTensorScalars)) a.tensor_scalar_names.push_back(w + "_tensor");
  size_t k = 0;
  for (int i = 0; i < Shape::kLists; ++i) a.lists.push_back(in[k++].toTensorVector());
  for (int i = 0; i < Shape::kScalars; ++i) a.scalars.push_back(in[k++].toDouble());
  for (int i = 0; i < Shape::kFlags; ++i) a.flags[i] = in[k++].toBool();
  a.maximize = in[k++].toBool();
  a.grad_scale = optional_tensor(in[k++]);
  a.found_inf = optional_tensor(in[k++]);
  for (int i = 0; i < Shape::kTensorScalars; ++i) a.tensor_scalars.push_back(optional_tensor(in[k++]));
  Run(a);
  torch::jit::drop(*stack, Shape::kArgs);
}

// The boxed kernel of Rule's `<kName>_lowbit_` op: ElementwiseArgs and LowbitArgs, then Run.
template <typename Rule, void (*Run)(const ElementwiseArgs&, const LowbitArgs&)>
void boxed_elementwise_lowbit(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  using Shape = RuleShape<Rule>;
  constexpr int kLowbitArgs = 9;
  const auto in = torch::jit::last(*stack, Shape::kArgs + kLowbitArgs);
  ElementwiseArgs a;
  LowbitArgs l;
  a.op = "fused_optim::" + elementwise_lowbit_op_name<Rule>();
  for (const auto& w : split_words(Rule::kTensorScalars)) a.tensor_scalar_names.push_back(w + "_tensor");
  size_t k = 0;
  for (int i = 0; i < Shape::kLists; ++i) a.lists.push_back(in[k++].toTensorVector());
  l.absmax = in[k++].toTensorVector();
  l.tables = in[k++].toTensor();
  l.signed_maps = in[k++].toIntVector();
  l.fmt = in[k++].toInt();
  l.param_sr = in[k++].toBool();
  l.seed = in[k++].toInt();
  l.step = in[k++].toInt();
  l.step_tensor = optional_tensor(in[k++]);
  l.tensor_index = in[k++].toIntVector();
  for (int i = 0; i < Shape::kScalars; ++i) a.scalars.push_back(in[k++].toDouble());
  for (int i = 0; i < Shape::kFlags; ++i) a.flags[i] = in[k++].toBool();
  a.maximize = in[k++].toBool();
  a.grad_scale = optional_tensor(in[k++]);
  a.found_inf = optional_tensor(in[k++]);
  for (int i = 0; i < Shape::kTensorScalars; ++i) a.tensor_scalars.push_back(optional_tensor(in[k++]));
  Run(a, l);
  torch::jit::drop(*stack, Shape::kArgs + kLowbitArgs);
}

template <typename Rule, void (*Run)(const ElementwiseArgs&, const LowbitArgs&)>
void register_elementwise_lowbit(torch::Library& m) {
  m.impl(elementwise_lowbit_op_name<Rule>().c_str(),
         torch::CppFunction::makeFromBoxedFunction<&boxed_elementwise_lowbit<Rule, Run>>());
}

template <typename Rule, void (*Run)(const ElementwiseArgs&)>
void register_elementwise(torch::Library& m) {
  m.impl(elementwise_op_name<Rule>().c_str(),
         torch::CppFunction::makeFromBoxedFunction<&boxed_elementwise<Rule, Run>>());
}

}  // namespace fused_optim
