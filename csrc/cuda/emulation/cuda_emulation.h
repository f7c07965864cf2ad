// CUDA's execution model on the CPU, for the emulated test build of csrc/cuda/ (tests/cuda_emulation.py).
//
// The kernels of fused_optim_cuda.cu are compiled unchanged by the host compiler against this header and
// the CPU stand-ins of c10/cuda/*.h next to it. A launch (fused_optim::cuda::launch) runs every block of
// the grid, in a seeded random order, one after the other; the threads of a block are fibers (a small stack switch;
// ucontext off x86-64),
// so __syncthreads() is a real barrier and a warp shuffle a real exchange between the 32 lanes of a warp.
// Between two synchronisation points the fibers run in a seeded random order: a missing barrier shows as
// a read of a slot nobody wrote yet. Shared memory (FO_SHARED_ARRAY) is fresh per block, filled with 0xff
// bytes (NaN in every float type), and every access is checked: a word written by one thread and read or
// written by another in the same barrier interval, or read before any write, stops the launch with an
// error naming the kernel (a shared-memory race detector; warp-synchronous shared-memory code, which the
// kernels do not use, would be reported too).
//
// Not modelled: timing, the weak memory model across blocks, concurrent streams (the emulated stream runs
// every launch at once, in order) and the GPU's fma contraction (this build compiles with
// -ffp-contract=off); see README, "Emulated CUDA kernels".
#pragma once

#define FUSED_OPTIM_CUDA_EMULATION 1

#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#define FO_EMU_UCONTEXT 1
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define FO_EMU_ASAN 1
#endif

// ---- CUDA keywords -----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};

// ---- runtime API stand-ins (the host code's calls) ------------------------------------------------------
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorLaunchFailure = 4 };
enum cudaStreamCaptureStatus {
  cudaStreamCaptureStatusNone = 0,
  cudaStreamCaptureStatusActive = 1,
  cudaStreamCaptureStatusInvalidated = 2
};

namespace fo_emu {

// ---- fiber context switch -------------------------------------------------------------------------------
// x86-64: switch(from, to) pushes the callee-saved registers and the FP control words on the current
// stack, stores the stack pointer in *from and resumes the stack `to` (a few ns; ucontext's swapcontext
// makes two signal-mask system calls per switch, which dominated the emulation's time).
#ifndef FO_EMU_UCONTEXT
extern "C" void fo_emu_switch(void** from, void* to);
asm(R"(
    .text
    .p2align 4
    .hidden fo_emu_switch
    .type fo_emu_switch, @function
fo_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fo_emu_switch, .-fo_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
inline void switch_context(Context& from, Context& to) { fo_emu_switch(&from.sp, to.sp); }
// A context that starts `entry` (which never returns) on the stack [base, base + size).
inline void make_context(Context& c, char* base, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(base + size) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top);
#ifdef FO_EMU_ASAN
  // the previous fiber on this stack ended by switching away, not by returning: the redzones of its frames
  // are still poisoned (the kernels' frames are a few KiB deep)
  const size_t used = size < (32u << 10) ? size : (32u << 10);
  ASAN_UNPOISON_MEMORY_REGION(base + size - used, used);
#endif
  slot[-1] = 0;                                     // entry's return address: none
  slot[-2] = reinterpret_cast<uint64_t>(entry);     // where the first switch returns to
  for (int i = 3; i <= 8; ++i) slot[-i] = 0;        // rbp rbx r12 r13 r14 r15
  uint32_t mxcsr;
  uint16_t fcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fcw));
  auto* ctl = reinterpret_cast<unsigned char*>(&slot[-9]);
  std::memcpy(ctl, &mxcsr, 4);
  std::memcpy(ctl + 4, &fcw, 2);
  c.sp = &slot[-9];
}
#else
struct Context {
  ucontext_t uc;
};
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
inline void make_context(Context& c, char* base, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = base;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
#endif

// ---- the state of the emulator (one per OS thread: each runs its own launches) ------------------------------

inline thread_local uint3 thread_idx{0, 0, 0};
inline thread_local uint3 block_idx{0, 0, 0};
inline thread_local dim3 block_dim{1, 1, 1};
inline thread_local dim3 grid_dim{1, 1, 1};

struct Settings {
  uint64_t seed = 0;
  bool capturing = false;  // what cudaStreamIsCapturing answers (tests take the graph-capture path with it)
};
inline Settings& settings() {
  static Settings s;
  return s;
}

// Every kernel instantiation compiled into the build, with its launch count (the coverage test).
struct Registry {
  std::mutex mutex;
  std::map<std::string, int64_t> launches;
};
inline Registry& registry() {
  static auto* r = new Registry();  // never destroyed: a late launch at exit finds it
  return *r;
}

inline std::string clean_name(std::string s) {
  for (const char* junk : {"fused_optim::cuda::", "{anonymous}::", "(anonymous namespace)::", "fused_optim::",
                           "c10::", "std::"}) {
    for (size_t pos; (pos = s.find(junk)) != std::string::npos;) s.erase(pos, std::strlen(junk));
  }
  return s;
}

// "X" of a pretty function name "... [with auto Kernel = X; ...]" (GCC) or "[Kernel = X]" (clang).
inline std::string kernel_of(const std::string& f) {
  const auto at = f.find("Kernel = ");
  if (at == std::string::npos) return f;
  std::string s;
  int depth = 0;
  for (size_t i = at + 9; i < f.size(); ++i) {
    const char c = f[i];
    if (depth == 0 && (c == ';' || c == ']')) break;
    depth += (c == '<' || c == '(') - (c == '>' || c == ')');
    s += c;
  }
  return clean_name(s);
}

// The name of a kernel instantiation, registered when the library is loaded.
template <auto Kernel>
struct KernelInfo {
  static const std::string& name() {
    static const std::string n = kernel_of(__PRETTY_FUNCTION__);
    return n;
  }
  // instantiated with every launch<Kernel>: registers the kernel when the library is loaded
  static inline const bool registered = [] {
    std::lock_guard<std::mutex> lock(registry().mutex);
    registry().launches.emplace(name(), 0);
    return true;
  }();
};

// ---- one block: its threads as fibers ------------------------------------------------------------------------

enum class Wait { kRunnable, kBarrier, kWarp, kDone };
enum class Shfl { kNone, kDown, kUp, kXor, kIdx, kSyncWarp };

struct Fiber {
  Context ctx;
  Wait wait = Wait::kRunnable;
  // a warp collective in flight: what the lane brought and what it gets back
  Shfl shfl = Shfl::kNone;
  unsigned mask = 0;
  int arg = 0;  // delta, lane mask or source lane
  int width = 32;
  uint64_t value = 0;
  uint64_t result = 0;
  void* fake_stack = nullptr;  // ASan's fake-stack handle of this fiber while it is switched out
};

// A shared-memory word's history in the current barrier interval (the race detector).
struct WordState {
  uint32_t write_epoch = 0, writer = 0;  // epoch 0: never written in this block
  uint32_t read_epoch = 0, reader = 0;   // reader kMany: several threads read it
};
constexpr uint32_t kMany = 0xffffffffu;

struct SharedBlock {
  std::vector<unsigned char> bytes;
  std::vector<WordState> words;  // one per 4 bytes
};

struct Block {
  const char* kernel = "";
  unsigned nthreads = 0;
  std::vector<Fiber> fibers;
  char* stacks = nullptr;  // nthreads * stack_size bytes
  size_t stack_size = 0;
  Context sched;
  const void* sched_stack_bottom = nullptr;
  size_t sched_stack_size = 0;
  void* sched_fake_stack = nullptr;
  unsigned current = 0;
  uint32_t epoch = 1;  // barrier intervals, from 1
  std::mt19937_64 rng;
  std::vector<unsigned> runnable;
  unsigned live = 0, at_barrier = 0;
  void (*body)(void*) = nullptr;
  void* body_arg = nullptr;
  std::exception_ptr error;
  std::string failure;  // an emulation error (race, deadlock, shuffle misuse)
  // shared memory: one region per declaration site, fresh for every block
  std::unordered_map<const void*, SharedBlock> shared;
};

inline thread_local Block* g_block = nullptr;

[[noreturn]] inline void fail_block(const std::string& what);

inline void switch_to_scheduler(Block& b, bool finished) {
  Fiber& f = b.fibers[b.current];
#ifdef FO_EMU_ASAN
  __sanitizer_start_switch_fiber(finished ? nullptr : &f.fake_stack, b.sched_stack_bottom, b.sched_stack_size);
#endif
  switch_context(f.ctx, b.sched);
#ifdef FO_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &b.sched_stack_bottom, &b.sched_stack_size);
#endif
  (void)finished;
}

inline void fiber_main() {
  Block& b = *g_block;
#ifdef FO_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.sched_stack_bottom, &b.sched_stack_size);
#endif
  try {
    b.body(b.body_arg);
  } catch (...) {
    if (!b.error) b.error = std::current_exception();
  }
  b.fibers[b.current].wait = Wait::kDone;
  switch_to_scheduler(b, true);
}

// Called by a fiber at a synchronisation point: back to the scheduler until it is released.
inline void block_yield(Wait why) {
  Block& b = *g_block;
  b.fibers[b.current].wait = why;
  switch_to_scheduler(b, false);
  if (!b.failure.empty()) {
    throw std::runtime_error(b.failure);  // the block is being torn down
  }
}

inline unsigned lane_of(unsigned tid) { return tid % 32; }

// The warp of `tid` has reached a complete collective: compute every participant's result, release them.
inline bool try_release_warp(Block& b, unsigned tid) {
  const unsigned base = tid - lane_of(tid);
  const Fiber& me = b.fibers[tid];
  const unsigned mask = me.mask;
  for (unsigned l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const unsigned t = base + l;
    if (t >= b.nthreads) {
      fail_block("lane " + std::to_string(l) + " of warp " + std::to_string(base / 32) +
                 " is named in a warp mask but does not exist (blockDim " + std::to_string(b.nthreads) + ")");
    }
    const Fiber& o = b.fibers[t];
    if (o.wait == Wait::kDone) {
      fail_block("lane " + std::to_string(l) + " of warp " + std::to_string(base / 32) +
                 " exited before a warp collective that names it in its mask");
    }
    if (o.wait != Wait::kWarp) return false;  // not there yet
    if (o.mask != mask || o.shfl != me.shfl) {
      fail_block("the lanes of warp " + std::to_string(base / 32) + " reached different warp collectives");
    }
  }
  for (unsigned l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    Fiber& f = b.fibers[base + l];
    if (f.shfl != Shfl::kSyncWarp) {
      const int width = f.width;
      const int seg = static_cast<int>(l) / width * width, in = static_cast<int>(l) % width;
      int src = static_cast<int>(l);
      switch (f.shfl) {
        case Shfl::kDown: src = in + f.arg < width ? static_cast<int>(l) + f.arg : static_cast<int>(l); break;
        case Shfl::kUp: src = in - f.arg >= 0 ? static_cast<int>(l) - f.arg : static_cast<int>(l); break;
        case Shfl::kXor: src = seg + ((in ^ f.arg) % width); break;
        case Shfl::kIdx: src = seg + (f.arg % width); break;
        default: break;
      }
      if (!((mask >> src) & 1u)) {
        fail_block("lane " + std::to_string(l) + " of warp " + std::to_string(base / 32) + " reads lane " +
                   std::to_string(src) + ", which is not in the shuffle's mask");
      }
      f.result = b.fibers[base + src].value;
    }
    f.wait = Wait::kRunnable;
    b.runnable.push_back(base + l);
  }
  return true;
}

inline void release_barrier(Block& b) {
  b.at_barrier = 0;
  ++b.epoch;
  for (unsigned t = 0; t < b.nthreads; ++t) {
    if (b.fibers[t].wait == Wait::kBarrier) {
      b.fibers[t].wait = Wait::kRunnable;
      b.runnable.push_back(t);
    }
  }
}

inline void run_block(Block& b) {
  const unsigned n = b.nthreads;
  b.fibers.assign(n, Fiber{});
  b.runnable.clear();
  b.live = n;
  b.at_barrier = 0;
  b.epoch = 1;
  b.error = nullptr;
  b.failure.clear();
  b.shared.clear();
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = b.fibers[t];
    make_context(f.ctx, b.stacks + static_cast<size_t>(t) * b.stack_size, b.stack_size, fiber_main);
    b.runnable.push_back(t);
  }
  while (b.live > 0) {
    if (b.runnable.empty()) {
      if (b.at_barrier == b.live) {
        release_barrier(b);  // every thread still running waits at __syncthreads
        continue;
      }
      std::ostringstream os;
      os << "deadlock: " << b.at_barrier << " of " << b.live
         << " live threads wait at __syncthreads, the others at a warp collective that never completes";
      b.failure = os.str();
      break;
    }
    const size_t pick = static_cast<size_t>(b.rng() % b.runnable.size());
    const unsigned t = b.runnable[pick];
    b.runnable[pick] = b.runnable.back();
    b.runnable.pop_back();
    b.current = t;
    thread_idx = uint3{t, 0, 0};
#ifdef FO_EMU_ASAN
    __sanitizer_start_switch_fiber(&b.sched_fake_stack, b.stacks + static_cast<size_t>(t) * b.stack_size,
                                   b.stack_size);
#endif
    switch_context(b.sched, b.fibers[t].ctx);
#ifdef FO_EMU_ASAN
    __sanitizer_finish_switch_fiber(b.sched_fake_stack, nullptr, nullptr);
#endif
    if (b.error || !b.failure.empty()) break;
    Fiber& f = b.fibers[t];
    switch (f.wait) {
      case Wait::kDone: --b.live; break;
      case Wait::kBarrier: ++b.at_barrier; break;
      case Wait::kWarp:
        try {
          try_release_warp(b, t);
        } catch (const std::runtime_error&) {  // b.failure says why
        }
        break;
      case Wait::kRunnable: b.runnable.push_back(t); break;
    }
    if (!b.failure.empty()) break;
  }
  // fibers left suspended by an error are abandoned (their stacks are reused by the next block)
}

[[noreturn]] inline void fail_block(const std::string& what) {
  Block& b = *g_block;
  if (b.failure.empty()) b.failure = std::string(b.kernel) + ", block " + std::to_string(block_idx.x) + ": " + what;
  throw std::runtime_error(b.failure);
}

// ---- device-side API: barriers, warp collectives, shared memory ----------------------------------------------

inline void syncthreads() { block_yield(Wait::kBarrier); }

template <typename T>
inline T warp_collective(Shfl kind, unsigned mask, T v, int arg, int width) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value, "shuffle of a large type");
  Block& b = *g_block;
  const unsigned lane = lane_of(b.current);
  if (!((mask >> lane) & 1u)) {
    fail_block("lane " + std::to_string(lane) + " calls a warp collective whose mask does not name it");
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail_block("shuffle width must be a power of 2 <= 32");
  Fiber& f = b.fibers[b.current];
  f.shfl = kind;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.value = 0;
  std::memcpy(&f.value, &v, sizeof(T));
  block_yield(Wait::kWarp);
  T out;
  std::memcpy(&out, &f.result, sizeof(T));
  f.shfl = Shfl::kNone;
  return out;
}

// A read or write of shared word `w` (4 bytes) of region `r` by the current thread.
inline void shared_access(SharedBlock& r, size_t first_byte, size_t bytes, bool write, const char* what) {
  Block& b = *g_block;
  const uint32_t me = b.current, e = b.epoch;
  for (size_t w = first_byte / 4; w <= (first_byte + bytes - 1) / 4; ++w) {
    WordState& s = r.words[w];
    std::string race;
    if (write) {
      if (s.write_epoch == e && s.writer != me) {
        race = "written by threads " + std::to_string(s.writer) + " and " + std::to_string(me);
      } else if (s.read_epoch == e && s.reader != me) {
        race = "read by thread " + (s.reader == kMany ? std::string("(several)") : std::to_string(s.reader)) +
               " and written by thread " + std::to_string(me);
      }
      s.write_epoch = e;
      s.writer = me;
    } else {
      if (s.write_epoch == 0) {
        race = "read by thread " + std::to_string(me) + " before any thread wrote it";
      } else if (s.write_epoch == e && s.writer != me) {
        race = "written by thread " + std::to_string(s.writer) + " and read by thread " + std::to_string(me);
      }
      if (s.read_epoch != e) {
        s.read_epoch = e;
        s.reader = me;
      } else if (s.reader != me) {
        s.reader = kMany;
      }
    }
    if (!race.empty()) {
      fail_block(std::string("shared-memory race on ") + what + " (byte " + std::to_string(w * 4) + "): " + race +
                 " in the same barrier interval (a missing __syncthreads)");
    }
  }
}

template <typename T>
class SharedRef {
 public:
  SharedRef(SharedBlock* r, size_t i, const char* name) : r_(r), i_(i), name_(name) {}
  operator T() const {
    shared_access(*r_, i_ * sizeof(T), sizeof(T), false, name_);
    T v;
    std::memcpy(&v, r_->bytes.data() + i_ * sizeof(T), sizeof(T));
    return v;
  }
  SharedRef& operator=(const T& v) {
    shared_access(*r_, i_ * sizeof(T), sizeof(T), true, name_);
    std::memcpy(r_->bytes.data() + i_ * sizeof(T), &v, sizeof(T));
    return *this;
  }
  SharedRef& operator=(const SharedRef& o) { return *this = static_cast<T>(o); }

 private:
  SharedBlock* r_;
  size_t i_;
  const char* name_;
};

// `__shared__ T name[N]` of the emulated build: one region per declaration site and block.
template <typename T>
class SharedArray {
 public:
  SharedArray(SharedBlock* r, size_t n, const char* name) : r_(r), n_(n), name_(name) {}
  SharedRef<T> operator[](int64_t i) const {
    if (i < 0 || static_cast<size_t>(i) >= n_) {
      fail_block(std::string("shared array ") + name_ + " indexed at " + std::to_string(i) + ", size " +
                 std::to_string(n_));
    }
    return SharedRef<T>(r_, static_cast<size_t>(i), name_);
  }

 private:
  SharedBlock* r_;
  size_t n_;
  const char* name_;
};

template <typename T, size_t N>
SharedArray<T> shared_array(const void* site, const char* name) {
  Block& b = *g_block;
  auto it = b.shared.find(site);
  if (it == b.shared.end()) {
    SharedBlock r;
    r.bytes.assign(N * sizeof(T), 0xff);  // NaN in every float type: a read of an unwritten slot shows
    r.words.assign((N * sizeof(T) + 3) / 4, WordState{});
    it = b.shared.emplace(site, std::move(r)).first;
  }
  return SharedArray<T>(&it->second, N, name);
}

// ---- launch ------------------------------------------------------------------------------------------------

template <typename Call>
void call_body(void* p) {
  (*static_cast<Call*>(p))();
}

inline uint64_t next_launch_seed() {
  static std::atomic<uint64_t> counter{0};
  return settings().seed * 0x9E3779B97F4A7C15ull + counter.fetch_add(1);
}

template <auto Kernel, typename... Args>
void launch(dim3 grid, dim3 block, const Args&... args) {
  (void)KernelInfo<Kernel>::registered;
  const std::string& name = KernelInfo<Kernel>::name();
  TORCH_CHECK(block.y == 1 && block.z == 1 && grid.y == 1 && grid.z == 1,
              "emulated launch of ", name, ": only 1-D grids and blocks are emulated");
  TORCH_CHECK(block.x >= 1 && block.x <= 1024, "emulated launch of ", name, ": ", block.x, " threads per block");
  {
    std::lock_guard<std::mutex> lock(registry().mutex);
    ++registry().launches[name];
  }
  if (grid.x == 0) return;
  Block b;
  b.kernel = name.c_str();
  b.nthreads = block.x;
#ifdef FO_EMU_ASAN
  b.stack_size = 256 * 1024;
#else
  b.stack_size = 64 * 1024;
#endif
  // the fiber stacks, reused by every launch of this OS thread (never touched beyond what fibers use)
  static thread_local std::unique_ptr<char[]> stacks;
  static thread_local size_t stacks_bytes = 0;
  const size_t need = static_cast<size_t>(block.x) * b.stack_size;
  if (stacks_bytes < need) {
    stacks.reset(new char[need]);
    stacks_bytes = need;
  }
  b.stacks = stacks.get();
  b.rng.seed(next_launch_seed());
  Block* const outer = g_block;
  g_block = &b;
  grid_dim = grid;
  block_dim = block;
  // the kernel's arguments, copied as a launch copies them
  auto call = [args...]() { Kernel(args...); };
  b.body = &call_body<decltype(call)>;
  b.body_arg = &call;
  std::vector<unsigned> order(grid.x);
  for (unsigned i = 0; i < grid.x; ++i) order[i] = i;
  std::shuffle(order.begin(), order.end(), b.rng);  // blocks run in no particular order on a GPU
  std::string failure;
  std::exception_ptr error;
  for (unsigned blk : order) {
    block_idx = uint3{blk, 0, 0};
    run_block(b);
    if (!b.failure.empty() || b.error) {
      failure = b.failure;
      error = b.error;
      break;
    }
  }
  g_block = outer;
  if (error && failure.empty()) std::rethrow_exception(error);
  TORCH_CHECK(failure.empty(), "emulated CUDA kernel ", failure);
}

}  // namespace fo_emu

// ---- device built-ins ----------------------------------------------------------------------------------------

#define threadIdx (::fo_emu::thread_idx)
#define blockIdx (::fo_emu::block_idx)
#define blockDim (::fo_emu::block_dim)
#define gridDim (::fo_emu::grid_dim)
constexpr int warpSize = 32;

inline void __syncthreads() { ::fo_emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::fo_emu::warp_collective<int>(::fo_emu::Shfl::kSyncWarp, mask, 0, 0, 32);
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::fo_emu::warp_collective<T>(::fo_emu::Shfl::kDown, mask, v, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return ::fo_emu::warp_collective<T>(::fo_emu::Shfl::kUp, mask, v, static_cast<int>(delta), width);
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return ::fo_emu::warp_collective<T>(::fo_emu::Shfl::kXor, mask, v, lane_mask, width);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::fo_emu::warp_collective<T>(::fo_emu::Shfl::kIdx, mask, v, src_lane, width);
}

// Correctly rounded arithmetic (the CUDA intrinsics that forbid contraction; -ffp-contract=off here).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}

// `__shared__ T name[N]` (multi_tensor_apply.cuh's FO_SHARED_ARRAY): a checked per-block region.
#define FO_EMU_SHARED_ARRAY(T, name, N)                                                \
  static const char fo_emu_site_##name = 0;                                            \
  const ::fo_emu::SharedArray<T> name = ::fo_emu::shared_array<T, (N)>(&fo_emu_site_##name, #name)
