// The CPU multi-tensor driver: every non-empty row is cut into fixed-size chunks and
// at::parallel_for spreads the (row, chunk) items over the threads by element count, so a list of
// many small tensors and a list of one huge tensor both keep every core busy, while a small list
// (under 2 * kGrain elements) stays on the calling thread.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
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

// Elements per thread at least: an op on fewer than 2 * kGrain elements runs on the calling thread,
// a bigger one on min(threads, elements / kGrain) threads. Measured on 2 cores (bench/NOTES.md,
// "Native kernels"): on idle cores a parallel region costs < 1 us; on 64K-256K elements a second
// thread saved 0-35% for a few big tensors but slowed lists of small tensors by up to 1.9x (their
// per-row host work, ~0.4-0.5 us a tensor, is not split); with other jobs on the cores every region
// waited 4-12 ms (scheduler ticks) for the second thread. A grain of one item sent even 3 tensors of
// 100 elements to the pool; torch's GRAIN_SIZE (32K) would still send 200 small ones (107K elements).
constexpr int64_t kGrain = kChunk;

// Runs f(k, items[k]) for every item. The items are split by element count, not item count (they
// hold 1 to kChunk elements), into contiguous runs, one per task. Every item is computed alone,
// whatever the split, so results do not depend on the thread count (the reductions combine their
// per-item partials in item order afterwards).
template <typename F>
void for_each_chunk(const std::vector<ChunkItem>& items, const F& f) {
  const int64_t n = static_cast<int64_t>(items.size());
  int64_t total = 0;
  for (const auto& it : items) {
    total += it.end - it.begin;
  }
  const int64_t tasks = std::min<int64_t>(at::get_num_threads(), total / kGrain);
  if (tasks <= 1 || at::in_parallel_region()) {
    for (int64_t k = 0; k < n; ++k) {
      f(k, items[k]);
    }
    return;
  }
  std::vector<int64_t> start(n);  // start[k]: elements before item k
  for (int64_t k = 1; k < n; ++k) {
    start[k] = start[k - 1] + (items[k - 1].end - items[k - 1].begin);
  }
  // task t: the items that start in [t * total / tasks, (t + 1) * total / tasks)
  auto first = [&](int64_t t) {
    return static_cast<int64_t>(std::lower_bound(start.begin(), start.end(), t * total / tasks) -
                                start.begin());
  };
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = first(begin), stop = first(end); k < stop; ++k) {
      f(k, items[k]);
    }
  });
}

// Whole-register loops of the math type (fp32/fp32 or fp64/fp64 storage); bf16/fp16 rows have their
// own loops that widen each reduced register into two fp32 ones (kReduced, load2/store2 in
// vec_ops.h). The scalar loop does the tails.
template <typename P, typename S>
constexpr bool kVectorized = std::is_same<P, S>::value && std::is_same<P, opmath_t<P>>::value;

}  // namespace cpu
}  // namespace fused_optim
