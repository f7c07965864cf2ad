// A small multi-tensor launcher: one kernel launch walks every chunk of every tensor of a list.
//
// Like torch's MultiTensorApply.cuh and apex, tensors are cut into fixed chunks and each CUDA block
// takes one chunk. Unlike them, the per-tensor metadata (pointers, numel, first chunk) lives in a
// small device table copied from pinned memory with the launch, not in kernel arguments: any
// number of tensors runs in ONE launch, and every offset is int64 (apex's int32 offsets crash above
// 2^31 elements). Zero-size tensors never enter the table. A block finds its tensor by binary
// search over the rows' first-chunk indices.
#pragma once

#ifdef FUSED_OPTIM_CUDA_EMULATION  // the emulated test build: CUDA's execution model on the CPU
#include "emulation/cuda_emulation.h"
#endif

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstring>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../multi_tensor_lists.h"

namespace fused_optim {
namespace cuda {

constexpr int64_t kChunk = 65536;  // elements per block
constexpr int kThreads = 512;      // threads per block
constexpr int kVec = 4;            // elements per thread per iteration (one 16-byte fp32 load)

// ---- what the emulated test build (emulation/cuda_emulation.h) replaces ------------------------------
// The kernels and launchers are the same code in both builds; only these few definitions differ.

#ifdef FUSED_OPTIM_CUDA_EMULATION
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;  // the emulated device holds CPU tensors
inline at::TensorOptions staging_options() { return at::TensorOptions(); }  // no GPU to pin memory for
// `__shared__ T name[N]`: a per-block region whose every access the emulator checks
#define FO_SHARED_ARRAY(T, name, N) FO_EMU_SHARED_ARRAY(T, name, N)
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
inline at::TensorOptions staging_options() { return at::TensorOptions().pinned_memory(true); }
#define FO_SHARED_ARRAY(T, name, N) __shared__ T name[N]
#endif

// Every kernel launch of the library: Kernel<<<grid, block, 0, stream>>>(args...), checked.
template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, cudaStream_t stream, const Args&... args) {
#ifdef FUSED_OPTIM_CUDA_EMULATION
  (void)stream;  // the emulated stream runs each launch to completion, in order
  ::fo_emu::launch<Kernel>(grid, block, args...);
#else
  Kernel<<<grid, block, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

template <int D>
struct TensorRow {
  int64_t row;          // index into the op's lists (and into per-tensor buffers such as stats)
  int64_t numel;
  int64_t chunk_begin;  // global index of this tensor's first chunk
  void* ptrs[D];        // list k's tensor of this row
};

// A launch's rows on the device: TensorRow<D>, or an op's own row type (a first-chunk index named
// chunk_begin, found by find_row).
template <typename Row>
struct RowTable {
  at::Tensor table;  // device copy of the rows (kept alive until the kernels are queued)
  const Row* rows = nullptr;
  int64_t nrows = 0;
  int64_t nchunks = 0;
};
template <int D>
using LaunchTable = RowTable<TensorRow<D>>;

// A pinned staging tensor whose non_blocking copy to `device` was just queued. Under CUDA graph capture
// that copy is a memcpy node that re-reads the host buffer at every replay, so the buffer must never be
// handed out again. torch 2.14's CachingHostAllocator already refuses to reuse blocks allocated during
// capture; older ones (2.11 on the GPU machine) may recycle it once freed, and replays would then read
// whatever was written there. So, while the stream is capturing, keep it for the life of the process:
// 24 + 8*D bytes per tensor per captured launch (~10 KiB for GPT-2's 148; torch itself leaks such blocks by
// design since PR #167507); never freed, the block also never gets an event recorded on a capturing
// stream. The list is never destroyed: no host-allocator call at exit.
inline void keep_staging_if_capturing(const at::Tensor& host, const at::Device& device) {
  // what c10::cuda::currentStreamCaptureStatusMayInitCtx() asks, on the stream the copy went to
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(device.index()), &status));
  if (status == cudaStreamCaptureStatusNone) {
    return;
  }
  static std::mutex mutex;
  static auto* kept = new std::vector<at::Tensor>();
  std::lock_guard<std::mutex> lock(mutex);
  kept->push_back(host);
}

// The rows (nchunks chunks in all) copied to `device`. Pinned staging + non_blocking copy: the caching
// host allocator keeps the staging buffer until the copy on the current stream has run, so nothing
// waits for the GPU here.
template <typename Row>
RowTable<Row> upload_rows(const std::vector<Row>& rows, int64_t nchunks, const at::Device& device) {
  RowTable<Row> out;
  out.nrows = static_cast<int64_t>(rows.size());
  out.nchunks = nchunks;
  if (rows.empty()) {
    return out;
  }
  const int64_t bytes = out.nrows * static_cast<int64_t>(sizeof(Row));
  at::Tensor host = at::empty({bytes}, staging_options().dtype(at::kByte));
  std::memcpy(host.data_ptr(), rows.data(), bytes);
  out.table = host.to(device, /*non_blocking=*/true);
  keep_staging_if_capturing(host, device);
  out.rows = reinterpret_cast<const Row*>(out.table.data_ptr());
  return out;
}

template <int D>
LaunchTable<D> make_table(const PreparedLists& pl) {
  TORCH_CHECK(static_cast<int>(pl.lists.size()) == D, "multi_tensor_apply: expected ", D, " lists");
  std::vector<TensorRow<D>> rows;
  int64_t chunks = 0;
  for (int64_t i = 0; i < pl.rows(); ++i) {
    const int64_t n = pl.lists[0][i].numel();
    if (n == 0) {
      continue;
    }
    TensorRow<D> r{};
    r.row = i;
    r.numel = n;
    r.chunk_begin = chunks;
    for (int k = 0; k < D; ++k) {
      r.ptrs[k] = pl.lists[k][i].defined() ? pl.lists[k][i].data_ptr() : nullptr;  // null: optional list
    }
    rows.push_back(r);
    chunks += (n + kChunk - 1) / kChunk;
  }
  return upload_rows(rows, chunks, rows.empty() ? at::Device(at::kCPU) : pl.lists[0][rows[0].row].device());
}

template <typename Row>
__device__ inline const Row& find_row(const Row* rows, int64_t nrows, int64_t chunk) {
  int64_t lo = 0, hi = nrows - 1;  // the last row whose first chunk is <= chunk
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (rows[mid].chunk_begin <= chunk) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return rows[lo];
}

// Calls f(row, chunk, begin, end) for this block's chunk; the whole launch is skipped when
// found_inf (optional, device memory) is non-zero.
template <int D, typename F>
__global__ void __launch_bounds__(kThreads) multi_tensor_apply_kernel(const TensorRow<D>* rows, int64_t nrows,
                                                                      const float* found_inf, F f) {
  if (found_inf != nullptr && *found_inf != 0.0f) {
    return;
  }
  const int64_t chunk = blockIdx.x;
  // a copy, in registers: through a reference into the table every store may alias the row's pointers,
  // so nvcc reloaded them after each store and split each 16-byte vector store into four 4-byte ones
  // (PTX of the fp32 Lion kernel: ld.global.v4.f32 but st.global.f32 x4)
  const TensorRow<D> row = find_row(rows, nrows, chunk);
  const int64_t begin = (chunk - row.chunk_begin) * kChunk;
  const int64_t end = begin + kChunk < row.numel ? begin + kChunk : row.numel;
  f(row, chunk, begin, end);
}

template <int D, typename F>
void multi_tensor_apply(const LaunchTable<D>& t, const float* found_inf, const F& f) {
  if (t.nchunks == 0) {
    return;
  }
  TORCH_CHECK(t.nchunks < (int64_t(1) << 31), "multi_tensor_apply: too many chunks");
  launch<multi_tensor_apply_kernel<D, F>>(static_cast<unsigned>(t.nchunks), kThreads,
                                          c10::cuda::getCurrentCUDAStream(), t.rows, t.nrows, found_inf, f);
}

// ---- element loops ---------------------------------------------------------------------------

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

template <typename T>
__device__ inline bool is_aligned(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec) == 0;
}

// ---- element loops over lists of different dtypes ------------------------------------------------
//
// One loop for every op: `elementwise_typed` takes the storage type of every list, ListTypes<T0, T1, ...>
// (the composite ops mix three in one row: Muon's fp16 grads, fp32 momentum, bf16 Newton-Schulz input);
// `elementwise` is its form for the update ops (P for the first NP lists, S for the rest).

template <typename... Ts>
struct ListTypes {
  template <int K>
  using at = std::tuple_element_t<K, std::tuple<Ts...>>;
};

template <typename F, int... K>
__device__ inline void static_for_impl(const F& f, std::integer_sequence<int, K...>) {
  (f(std::integral_constant<int, K>{}), ...);
}

// f(std::integral_constant<int, k>) for k = 0..N-1, unrolled at compile time (per-list types)
template <int N, typename F>
__device__ inline void static_for(const F& f) {
  static_for_impl(f, std::make_integer_sequence<int, N>{});
}

template <int D, typename Types, typename M, typename Op, typename Ctx>
__device__ inline void elementwise_typed(const TensorRow<D>& row, int64_t begin, int64_t end, const Op& op,
                                         const Ctx& ctx) {
  bool aligned = true;
  static_for<D>([&](auto kc) {
    using T = typename Types::template at<decltype(kc)::value>;
    aligned = aligned && is_aligned<T>(row.ptrs[decltype(kc)::value]);
  });
  int64_t scalar_begin = begin;
  if (aligned) {
    const int64_t vec_end = begin + (end - begin) / kVec * kVec;
    for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
         i += static_cast<int64_t>(blockDim.x) * kVec) {
      M v[kVec][D];
      static_for<D>([&](auto kc) {
        constexpr int k = decltype(kc)::value;
        using T = typename Types::template at<k>;
        const auto x = *reinterpret_cast<const AlignedVec<T, kVec>*>(static_cast<const T*>(row.ptrs[k]) + i);
#pragma unroll
        for (int j = 0; j < kVec; ++j) v[j][k] = static_cast<M>(x.val[j]);
      });
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        op(v[j], ctx);
      }
      static_for<D>([&](auto kc) {
        constexpr int k = decltype(kc)::value;
        using T = typename Types::template at<k>;
        if constexpr (((Op::kWrites >> k) & 1u) != 0) {
          AlignedVec<T, kVec> x;
#pragma unroll
          for (int j = 0; j < kVec; ++j) x.val[j] = static_cast<T>(v[j][k]);
          *reinterpret_cast<AlignedVec<T, kVec>*>(static_cast<T*>(row.ptrs[k]) + i) = x;
        }
      });
    }
    scalar_begin = vec_end;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
    M v[D];
    static_for<D>([&](auto kc) {
      constexpr int k = decltype(kc)::value;
      using T = typename Types::template at<k>;
      v[k] = static_cast<M>(static_cast<const T*>(row.ptrs[k])[i]);
    });
    op(v, ctx);
    static_for<D>([&](auto kc) {
      constexpr int k = decltype(kc)::value;
      using T = typename Types::template at<k>;
      if constexpr (((Op::kWrites >> k) & 1u) != 0) {
        static_cast<T*>(row.ptrs[k])[i] = static_cast<T>(v[k]);
      }
    });
  }
}

// Runs op(vals, ctx) on every element of [begin, end) of a row whose first NP lists hold P
// (params, grads) and the rest S (state).
template <int D, int NP, typename P, typename S, typename Seq = std::make_integer_sequence<int, D>>
struct SplitTypes;
template <int D, int NP, typename P, typename S, int... K>
struct SplitTypes<D, NP, P, S, std::integer_sequence<int, K...>> {
  using type = ListTypes<std::conditional_t<(K < NP), P, S>...>;
};

template <int D, int NP, typename P, typename S, typename M, typename Op, typename Ctx>
__device__ inline void elementwise(const TensorRow<D>& row, int64_t begin, int64_t end, const Op& op,
                                   const Ctx& ctx) {
  elementwise_typed<D, typename SplitTypes<D, NP, P, S>::type, M>(row, begin, end, op, ctx);
}

}  // namespace cuda
}  // namespace fused_optim
