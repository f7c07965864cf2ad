// The list of the pure-elementwise update rules (docs/design.md, "Adding a native elementwise op"): each
// becomes the op fused_optim::<kName>_ with CPU and CUDA kernels generated from its declaration
// (csrc/elementwise.h). One #include and one X(...) entry per rule.
#pragma once

#include "lion.h"

#define FO_ELEMENTWISE_RULES(X) X(Lion)
