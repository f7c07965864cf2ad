// The kernel registrations of one backend, inside its TORCH_LIBRARY_IMPL block with FO_BACKEND defined
// as its namespace (fused_optim::cpu, fused_optim::cuda): every op of ops_list.h (its kernel is the
// backend's function of the same name) and every rule of math/elementwise_rules.h (its generated
// kernel, run_elementwise<Rule>). No include guard: included once per backend.
#define FO_OP(name, schema) m.impl(#name, &FO_BACKEND::name);
#include "ops_list.h"
#undef FO_OP
#define FO_RULE(Rule) \
  fused_optim::register_elementwise<fused_optim::math::Rule, &FO_BACKEND::run_elementwise<fused_optim::math::Rule>>(m);
FO_ELEMENTWISE_RULES(FO_RULE)
#undef FO_RULE
#undef FO_BACKEND
