// CPU stand-in of c10/cuda/CUDAGuard.h for the emulated build (cuda_emulation.h): the emulated device is
// the CPU, so the guard only checks that it is given that device.
#pragma once

#include <c10/core/Device.h>
#include <c10/util/Exception.h>

#include "../../cuda_emulation.h"

namespace c10 {
namespace cuda {

class CUDAGuard {
 public:
  explicit CUDAGuard(c10::Device device) {
    TORCH_CHECK(device.is_cpu(), "emulated CUDAGuard: the emulated kernels run on CPU tensors, got ", device);
  }
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

}  // namespace cuda
}  // namespace c10
