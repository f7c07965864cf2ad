// Included first by every CPU translation unit, before any ATen header: selects the widest
// at::vec::Vectorized implementation the compiler targets (-march=native in fused_optim/_ext_flags.py).
// Without a CPU_CAPABILITY_* macro, Vectorized<float> is a scalar emulation (docs/toolchain.md: 18x slower).
// AVX512 needs F/BW/DQ/VL, like torch's own AVX512 kernels.
#pragma once

#if !defined(CPU_CAPABILITY) && !defined(FUSED_OPTIM_NO_VEC)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#endif
