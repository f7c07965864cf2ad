// CPU stand-in of c10/cuda/CUDAStream.h for the emulated build (cuda_emulation.h): one stream, on which
// every emulated launch runs to completion before the launch call returns.
#pragma once

#include <c10/core/Device.h>

#include "../../cuda_emulation.h"

namespace c10 {
namespace cuda {

class CUDAStream {
 public:
  operator cudaStream_t() const { return reinterpret_cast<cudaStream_t>(uintptr_t{0x5eed}); }
  cudaStream_t stream() const { return *this; }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return CUDAStream(); }

}  // namespace cuda
}  // namespace c10

// what the capture check of multi_tensor_apply.cuh asks; tests switch the answer with _emu_set_capturing
inline cudaError_t cudaStreamIsCapturing(cudaStream_t stream, cudaStreamCaptureStatus* status) {
  TORCH_CHECK(stream != nullptr, "emulated cudaStreamIsCapturing: null stream");
  *status = ::fo_emu::settings().capturing ? cudaStreamCaptureStatusActive : cudaStreamCaptureStatusNone;
  return cudaSuccess;
}
