// The emulated test build of the CUDA kernels (tests/cuda_emulation.py builds it; never part of the library).
//
// fused_optim_cuda.cu and the op schemas of fused_optim.cpp, compiled by the host compiler against
// cuda_emulation.h and the CPU stand-ins of c10/cuda/ in this folder, registered as torch.ops.fused_optim_emu
// with the CPU dispatch key: the ops take CPU tensors and run the CUDA kernels through the emulator, so
// the real extension (torch.ops.fused_optim) can be loaded beside it. Plus a few ops that steer the
// emulator (seed, graph-capture answer) and report which kernel instantiations ran.
#include "cuda_emulation.h"

#include <torch/library.h>

// Re-target the registration blocks of the included sources: schemas and kernels under fused_optim_emu,
// the kernels for CPU tensors.
#undef TORCH_LIBRARY
#define TORCH_LIBRARY(ns, m) TORCH_LIBRARY_FRAGMENT(fused_optim_emu, m)
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(fused_optim_emu, CPU, m, C10_UID)

#include "../../fused_optim.cpp"
#include "../fused_optim_cuda.cu"

namespace fo_emu {
namespace {

// A deliberately racy block reduction (a missing barrier between the write and the reads): the test that
// the emulator's race detector and schedule catch what they are there to catch.
__global__ void racy_sum_kernel(const float* x, float* out) {
  FO_SHARED_ARRAY(float, slots, 64);
  slots[threadIdx.x] = x[threadIdx.x];
  if (threadIdx.x == 0) {
    float s = 0;
    for (unsigned i = 0; i < blockDim.x; ++i) s += slots[i];  // no __syncthreads() before: a race
    *out = s;
  }
}

__global__ void shuffle_probe_kernel(const int* mode, float* out) {
  const float v = static_cast<float>(threadIdx.x);
  float r = 0;
  switch (*mode) {
    case 0: r = __shfl_down_sync(0xffffffffu, v, 3); break;
    case 1: r = __shfl_xor_sync(0xffffffffu, v, 5); break;
    case 2: r = __shfl_up_sync(0xffffffffu, v, 2); break;
    case 3: r = __shfl_sync(0xffffffffu, v, 7); break;
    case 4: r = __shfl_down_sync(0x0000ffffu, v, 1); break;  // lanes 16..31 not in the mask: misuse
    default: break;
  }
  out[threadIdx.x] = r;
}

// Reads one element past the end of x: the sanitizer build's own check (it must report it).
__global__ void read_past_end_kernel(const float* x, int64_t n, float* out) {
  if (threadIdx.x == 0) *out = x[n];
}

std::string launches() {
  std::lock_guard<std::mutex> lock(registry().mutex);
  std::string out;
  for (const auto& [name, count] : registry().launches) {
    out += name + "\t" + std::to_string(count) + "\n";
  }
  return out;
}

void reset_launches() {
  std::lock_guard<std::mutex> lock(registry().mutex);
  for (auto& kv : registry().launches) kv.second = 0;
}

void set_seed(int64_t seed) { settings().seed = static_cast<uint64_t>(seed); }
void set_capturing(bool capturing) { settings().capturing = capturing; }

at::Tensor racy_sum(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && x.numel() >= 1 && x.numel() <= 64,
              "racy_sum: 1..64 contiguous float32 values");
  at::Tensor out = at::zeros({1}, x.options());
  fused_optim::cuda::launch<racy_sum_kernel>(1, static_cast<unsigned>(x.numel()), nullptr, x.data_ptr<float>(),
                                             out.data_ptr<float>());
  return out;
}

at::Tensor shuffle_probe(int64_t mode) {
  at::Tensor m = at::full({1}, mode, at::kInt);
  at::Tensor out = at::zeros({32}, at::kFloat);
  fused_optim::cuda::launch<shuffle_probe_kernel>(1, 32, nullptr, m.data_ptr<int>(), out.data_ptr<float>());
  return out;
}

at::Tensor read_past_end(const at::Tensor& x) {
  TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat, "read_past_end: contiguous float32");
  at::Tensor out = at::zeros({1}, x.options());
  fused_optim::cuda::launch<read_past_end_kernel>(1, 32, nullptr, x.data_ptr<float>(), x.numel(),
                                                  out.data_ptr<float>());
  return out;
}

}  // namespace
}  // namespace fo_emu

TORCH_LIBRARY_FRAGMENT(fused_optim_emu, m) {
  m.def("_emu_launches() -> str", &fo_emu::launches);
  m.def("_emu_reset_launches() -> ()", &fo_emu::reset_launches);
  m.def("_emu_set_seed(int seed) -> ()", &fo_emu::set_seed);
  m.def("_emu_set_capturing(bool capturing) -> ()", &fo_emu::set_capturing);
  m.def("_emu_racy_sum(Tensor x) -> Tensor", &fo_emu::racy_sum);
  m.def("_emu_shuffle_probe(int mode) -> Tensor", &fo_emu::shuffle_probe);
  m.def("_emu_read_past_end(Tensor x) -> Tensor", &fo_emu::read_past_end);
}
