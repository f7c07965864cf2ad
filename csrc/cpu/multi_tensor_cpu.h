// The CPU multi-tensor driver: every non-empty row is cut into fixed-size chunks and
// at::parallel_for spreads the (row, chunk) items over the threads, so a list of many small tensors
// and a list of one huge tensor both keep every core busy.
#pragma once

#include <ATen/Parallel.h>

#include <vector>

#include "../multi_tensor_lists.h"

namespace fused_optim {
namespace cpu {

// 64K elements: 256 KiB per fp32 stream. Long enough sequential runs for the hardware prefetchers
// (measured on GPT-2 small, one thread: Lion at 0.79-0.80x of fused AdamW's CPU time, 0.81-0.84x with
// 16K chunks), and still ~1.9K items over 124M params to balance between threads.
constexpr int64_t kChunk = 65536;

struct ChunkItem {
  int64_t row;
  int64_t begin;
  int64_t end;
};

inline std::vector<ChunkItem> make_chunks(const PreparedLists& pl) {
  std::vector<ChunkItem> items;
  for (int64_t i = 0; i < pl.rows(); ++i) {
    const int64_t n = pl.lists[0][i].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      items.push_back({i, b, std::min(n, b + kChunk)});
    }
  }
  return items;
}

template <typename F>
void for_each_chunk(const std::vector<ChunkItem>& items, const F& f) {
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      f(k, items[k]);
    }
  });
}

// Whole-register loops of the math type (fp32/fp32 or fp64/fp64 storage); bf16/fp16 rows have their
// own loops that widen each reduced register into two fp32 ones (kReduced, load2/store2 in
// vec_ops.h). The scalar loop does the tails.
template <typename P, typename S>
constexpr bool kVectorized = std::is_same<P, S>::value && std::is_same<P, opmath_t<P>>::value;

inline float host_scalar(const c10::optional<at::Tensor>& t, float if_none) {
  return t.has_value() ? t->item<float>() : if_none;
}

}  // namespace cpu
}  // namespace fused_optim
