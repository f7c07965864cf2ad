// CPU stand-in of c10/cuda/CUDAException.h for the emulated build (cuda_emulation.h): the emulated
// runtime calls return cudaSuccess or throw, and an emulated launch throws on a kernel error.
#pragma once

#include "../../cuda_emulation.h"

#define C10_CUDA_CHECK(EXPR)                                                                    \
  do {                                                                                          \
    const cudaError_t fo_emu_err = (EXPR);                                                      \
    TORCH_CHECK(fo_emu_err == cudaSuccess, "emulated CUDA call failed: ", #EXPR);               \
  } while (0)

#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaSuccess)
