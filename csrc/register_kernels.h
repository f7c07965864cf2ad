// The kernel registrations of one backend, inside its TORCH_LIBRARY_IMPL block with FO_BACKEND defined
// as its namespace (fused_optim::cpu, fused_optim::cuda): every op of ops_list.h (its kernel is the
// backend's function of the same name), every rule of math/elementwise_rules.h (its generated
// kernel, run_elementwise<Rule>, and its lowbit op's, run_elementwise_lowbit<Rule>), and the lowbit
// ops of Adan, Gravity, NeuroOptima and Muon's two stages. No include guard: included once per backend.
#define FO_OP(name, schema) m.impl(#name, &FO_BACKEND::name);
#include "ops_list.h"
#undef FO_OP
#define FO_RULE(Rule)                                                                                        \
  fused_optim::register_elementwise<fused_optim::math::Rule,                                                 \
                                    &FO_BACKEND::run_elementwise<fused_optim::math::Rule>>(m);               \
  fused_optim::register_elementwise_lowbit<fused_optim::math::Rule,                                          \
                                           &FO_BACKEND::run_elementwise_lowbit<fused_optim::math::Rule>>(m);
FO_ELEMENTWISE_RULES(FO_RULE)
#undef FO_RULE
// the lowbit ops (docs/lowbit.md §5): each rule's above, Adan's, Gravity's, NeuroOptima's and Muon's
m.impl("adan_lowbit_", &FO_BACKEND::adan_lowbit_);
m.impl("gravity_lowbit_", &FO_BACKEND::gravity_lowbit_);
m.impl("neuro_optima_lowbit_", &FO_BACKEND::neuro_optima_lowbit_);
m.impl("muon_momentum_lowbit_", &FO_BACKEND::muon_momentum_lowbit_);
m.impl("muon_apply_lowbit_", &FO_BACKEND::muon_apply_lowbit_);
#undef FO_BACKEND
