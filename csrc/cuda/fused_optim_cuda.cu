// CUDA kernels of every fused_optim op, in one translation unit (nvcc with torch's headers is the
// slowest part of the build: one .cu keeps a cold build near a minute per architecture).
//
// multi_tensor_stats: one launch of multi_tensor_apply writes a [max|x|, sum, sumsq] partial per
// chunk, then a small cleanup launch (one block per tensor) combines each tensor's partials in
// chunk order: deterministic, no atomics. The update ops are one multi_tensor_apply launch each,
// with the per-element rules of csrc/math/ in fp32 (fp64 for fp64) registers. grad_scale,
// found_inf, the Adan clip factor and the stats are read from device memory: no host sync.
// The composites' fused parts follow the same pattern at the end of this file.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../elementwise_registration.h"
#include "../math/adan.h"
#include "../math/common.h"
#include "../math/elementwise_rules.h"
#include "../math/equilibrium.h"
#include "../math/gravity.h"
#include "../math/lookahead.h"
#include "../math/muon.h"
#include "../math/neuro_optima.h"
#include "../math/sam.h"
#include "multi_tensor_apply.cuh"

namespace fused_optim {
namespace cuda {
namespace {

template <typename M>
__device__ inline M read_scale(const float* grad_scale) {
  return static_cast<M>(read_scalar(grad_scale, 1.0f));
}

// A runtime bool as a compile-time constant (the AMP unscale: whether the kernel writes the grads).
template <typename F>
void dispatch_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// ---- updates ---------------------------------------------------------------------------------
//
// Each Op reads its per-block values once in context(): the AMP scale, a per-row scalar (Gravity's m,
// GradientEquilibrium's mean, Adan's clip) and its coefficients, whose device scalars (capturable: lr,
// beta_hat, Adan's bias corrections and first step; nullptr when not given) are read from device
// memory and the derived values computed in the math type by the setters of csrc/math/. With UNSCALE
// the grad (list 1, storage type P) is replaced by g / grad_scale rounded to P (math::amp_unscale),
// which the element loop stores back (kWrites bit 1): `.grad` ends unscaled, as torch leaves it.

// Device scalars of an update op: scalar_ptr of the optional tensors (nullptr: not given, the float
// arguments hold).
struct DeviceScalars {
  const float* lr = nullptr;
  const float* beta_hat = nullptr;
  const float* bc1 = nullptr;
  const float* bc2 = nullptr;
  const float* bc3_sqrt = nullptr;
  const float* first_step = nullptr;
};

// The grad as the update uses it; v is list 1's element, rewritten with the unscaled value under AMP.
template <typename P, bool UNSCALE, typename M>
__device__ inline M use_grad(M& v, M scale, M sign) {
  if constexpr (UNSCALE) {
    v = math::amp_unscale<P>(v, scale);
  }
  return v * sign;
}

constexpr unsigned grad_bit(bool unscale) { return unscale ? 0b10u : 0u; }

// The op of a rule of csrc/math/elementwise_rules.h (csrc/elementwise.h): lists params, grads, then the
// rule's states; its tensor scalars read once per block and handed to Rule::set_tensor_scalar.
template <typename Rule, typename P, typename M, bool UNSCALE>
struct RuleOp {
  using Shape = RuleShape<Rule>;
  using Coeffs = typename Rule::template Coeffs<M>;
  static constexpr unsigned kWrites = ((1u << Shape::kLists) - 1u) & ~0b10u | grad_bit(UNSCALE);  // (+ grads)
  Coeffs c;
  M sign;
  const float* grad_scale;
  const float* tensors[Shape::kTensorScalars > 0 ? Shape::kTensorScalars : 1];
  struct Ctx {
    M scale;
    Coeffs c;
  };
  __device__ Ctx context(const TensorRow<Shape::kLists>&) const {
    Ctx x{read_scale<M>(grad_scale), c};
    for (int i = 0; i < Shape::kTensorScalars; ++i) {
      if (tensors[i] != nullptr) Rule::set_tensor_scalar(x.c, i, static_cast<M>(*tensors[i]));
    }
    return x;
  }
  __device__ void operator()(M (&v)[Shape::kLists], const Ctx& x) const {
    update(v, x, std::make_integer_sequence<int, Shape::kStates>{});
  }
  template <int... K>
  __device__ void update(M (&v)[Shape::kLists], const Ctx& x, std::integer_sequence<int, K...>) const {
    Rule::update(v[0], use_grad<P, UNSCALE>(v[1], x.scale, sign), x.c, v[2 + K]...);
  }
};

template <typename P, typename M, bool UNSCALE>
struct GravityOp {
  static constexpr unsigned kWrites = 0b101u | grad_bit(UNSCALE);  // params, vs (+ grads)
  math::GravityCoeffs<M> c;
  M sign;
  const float* grad_scale;
  DeviceScalars dev;
  const M* stats;
  struct Ctx {
    M scale;
    M m;
    math::GravityCoeffs<M> c;
  };
  __device__ Ctx context(const TensorRow<3>& row) const {
    Ctx x{read_scale<M>(grad_scale), math::gravity_m(stats[row.row * 3]), c};
    if (dev.lr != nullptr) x.c.set_lr(static_cast<M>(*dev.lr));
    if (dev.beta_hat != nullptr) x.c.set_beta_hat(static_cast<M>(*dev.beta_hat));
    return x;
  }
  __device__ void operator()(M (&v)[3], const Ctx& x) const {
    math::gravity_update(v[0], use_grad<P, UNSCALE>(v[1], x.scale, sign), v[2], x.m, x.c);
  }
};

template <typename P, typename M, bool UNSCALE>
struct AdanOp {
  static constexpr unsigned kWrites = 0b111101u | grad_bit(UNSCALE);  // all but the grads (+ grads)
  math::AdanCoeffs<M> c;
  M sign;
  const float* grad_scale;
  DeviceScalars dev;
  const float* clip;
  struct Ctx {
    M scale;
    M clip;
    bool first;
    math::AdanCoeffs<M> c;
  };
  __device__ Ctx context(const TensorRow<6>&) const {
    Ctx x{read_scale<M>(grad_scale), clip != nullptr ? static_cast<M>(*clip) : M(1),
          dev.first_step != nullptr && *dev.first_step != 0.0f, c};
    if (dev.lr != nullptr) x.c.set_lr(static_cast<M>(*dev.lr));
    if (dev.bc1 != nullptr) {
      x.c.set_bias_corrections(static_cast<M>(*dev.bc1), static_cast<M>(*dev.bc2), static_cast<M>(*dev.bc3_sqrt));
    }
    if (dev.lr != nullptr || dev.bc1 != nullptr) x.c.update_step_sizes();
    return x;
  }
  __device__ void operator()(M (&v)[6], const Ctx& x) const {
    math::adan_update(v[0], use_grad<P, UNSCALE>(v[1], x.scale, sign), v[2], v[3], v[4], v[5], x.clip, x.c,
                      x.first);
  }
};

template <typename P, typename M, bool UNSCALE>
struct EquilibriumOp {
  static constexpr unsigned kWrites = 0b1u | grad_bit(UNSCALE);  // params (+ grads)
  math::EquilibriumCoeffs<M> c;
  M sign;
  const float* grad_scale;
  DeviceScalars dev;
  const M* stats;
  struct Ctx {
    M scale;
    M mean;
    math::EquilibriumCoeffs<M> c;
  };
  __device__ Ctx context(const TensorRow<2>& row) const {
    Ctx x{read_scale<M>(grad_scale), stats[row.row * 3 + 1] / static_cast<M>(row.numel), c};
    if (dev.lr != nullptr) x.c.set_lr(static_cast<M>(*dev.lr));
    return x;
  }
  __device__ void operator()(M (&v)[2], const Ctx& x) const {
    const M val = math::equilibrium_value(v[0], use_grad<P, UNSCALE>(v[1], x.scale, sign), x.c);
    math::equilibrium_update(v[0], val, x.mean, x.c);
  }
};

// Lists 0 and 1 (params, grads) are stored as P, the rest as S.
template <int D, typename P, typename S, typename M, typename Op>
struct UpdateFunctor {
  Op op;
  __device__ void operator()(const TensorRow<D>& row, int64_t, int64_t begin, int64_t end) const {
    elementwise<D, 2, P, S, M>(row, begin, end, op, op.context(row));
  }
};

// The host side every update op shares: device guard, list checks, the table, one launch. make_op(P, S,
// UNSCALE) returns the Op (the type tags and std::bool_constant as arguments). The grads are a mutated
// list under AMP (non-contiguous ones are copied back by pl.finish()).
template <int D, typename MakeOp>
void launch_update(const char* op_name, const std::vector<at::TensorList>& lists, std::vector<bool> mutated,
                   const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
                   const std::vector<NamedScalar>& scalars,
                   const MakeOp& make_op) {
  mutated[1] = grad_scale.has_value();
  PreparedLists pl = prepare_lists(op_name, lists, mutated);
  if (pl.rows() == 0) {
    return;
  }
  check_dtypes(op_name, pl, 2);
  const at::Device device = pl.lists[0][0].device();
  TORCH_CHECK(device.type() == kKernelDevice, op_name, ": CUDA kernel called with tensors on ", device);
  check_scalar_tensor(op_name, "grad_scale", grad_scale, device);
  check_scalar_tensor(op_name, "found_inf", found_inf, device);
  for (const auto& s : scalars) {
    check_scalar_tensor(op_name, s.name, *s.tensor, device);
  }
  c10::cuda::CUDAGuard guard(device);
  const LaunchTable<D> table = make_table<D>(pl);
  const auto sdt = D > 2 ? pl.lists[2][0].scalar_type() : pl.lists[0][0].scalar_type();
  dispatch_param_state(op_name, pl.lists[0][0].scalar_type(), sdt, [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    // without state lists (GradientEquilibrium) S is P: the fp32-state pairs would be dead kernels
    if constexpr (D > 2 || std::is_same<P, S>::value) {
      dispatch_bool(grad_scale.has_value(), [&](auto unscale) {
        auto op = make_op(pt, st, unscale);
        UpdateFunctor<D, P, S, M, decltype(op)> f{op};
        multi_tensor_apply<D>(table, scalar_ptr(found_inf), f);
      });
    }
  });
  pl.finish();
}

template <typename M>
const M* stats_ptr(const char* op, const at::Tensor& stats, int64_t rows, const at::Device& device) {
  check_stats(op, stats, rows, device);
  TORCH_CHECK(stats.scalar_type() == c10::CppTypeToScalarType<M>::value, op,
              ": stats dtype does not match the math type; pass the output of multi_tensor_stats");
  return stats.data_ptr<M>();
}

// make_op of Rule's op (launch_update; launch_lowbit): the RuleOp of storage type P from the op's arguments.
template <typename Rule>
auto rule_op_maker(const ElementwiseArgs& a) {
  return [&a](auto pt, auto, auto unscale) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    RuleOp<Rule, P, M, decltype(unscale)::value> op{Rule::template coeffs<M>(a.scalars.data(), a.flags.data()),
                                                    a.maximize ? M(-1) : M(1), scalar_ptr(a.grad_scale), {}};
    for (int i = 0; i < RuleShape<Rule>::kTensorScalars; ++i) {
      op.tensors[i] = scalar_ptr(a.tensor_scalars[i]);
    }
    return op;
  };
}

template <typename Rule>
void run_elementwise(const ElementwiseArgs& a) {
  using Shape = RuleShape<Rule>;
  launch_update<Shape::kLists>(a.op.c_str(), a.list_refs(), std::vector<bool>(Shape::kLists, true), a.grad_scale,
                               a.found_inf, named_scalars(a.tensor_scalar_names, a.tensor_scalars),
                               rule_op_maker<Rule>(a));
}

// make_op of Gravity's op (gravity_, gravity_lowbit_): the GravityOp of storage type P; m from `stats`.
auto gravity_op_maker(const char* op, at::TensorList params, const at::Tensor& stats, double lr, double beta_hat,
                      bool maximize, const c10::optional<at::Tensor>& grad_scale,
                      const c10::optional<at::Tensor>& lr_tensor,
                      const c10::optional<at::Tensor>& beta_hat_tensor) {
  DeviceScalars dev;
  dev.lr = scalar_ptr(lr_tensor);
  dev.beta_hat = scalar_ptr(beta_hat_tensor);
  const float* gs = scalar_ptr(grad_scale);
  return [=](auto pt, auto, auto unscale) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    return GravityOp<P, M, decltype(unscale)::value>{
        math::GravityCoeffs<M>(lr, beta_hat), maximize ? M(-1) : M(1), gs, dev,
        stats_ptr<M>(op, stats, static_cast<int64_t>(params.size()), params[0].device())};
  };
}

void gravity_(at::TensorList params, at::TensorList grads, at::TensorList vs, const at::Tensor& stats,
              double lr, double beta_hat, bool maximize, const c10::optional<at::Tensor>& grad_scale,
              const c10::optional<at::Tensor>& found_inf, const c10::optional<at::Tensor>& lr_tensor,
              const c10::optional<at::Tensor>& beta_hat_tensor) {
  const char* op = "fused_optim::gravity_";
  launch_update<3>(op, {params, grads, vs}, {true, false, true}, grad_scale, found_inf,
                   {{"lr_tensor", &lr_tensor}, {"beta_hat_tensor", &beta_hat_tensor}},
                   gravity_op_maker(op, params, stats, lr, beta_hat, maximize, grad_scale, lr_tensor, beta_hat_tensor));
}

// make_op of Adan's op (adan_, adan_lowbit_): the AdanOp of storage type P from the op's arguments.
auto adan_op_maker(double lr, double beta1, double beta2, double beta3, double bias_correction1,
                   double bias_correction2, double bias_correction3_sqrt, double eps, double weight_decay,
                   bool no_prox, const c10::optional<at::Tensor>& clip, bool maximize,
                   const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& lr_tensor,
                   const c10::optional<at::Tensor>& bias_correction1_tensor,
                   const c10::optional<at::Tensor>& bias_correction2_tensor,
                   const c10::optional<at::Tensor>& bias_correction3_sqrt_tensor,
                   const c10::optional<at::Tensor>& first_step) {
  DeviceScalars dev;
  dev.lr = scalar_ptr(lr_tensor);
  dev.bc1 = scalar_ptr(bias_correction1_tensor);
  dev.bc2 = scalar_ptr(bias_correction2_tensor);
  dev.bc3_sqrt = scalar_ptr(bias_correction3_sqrt_tensor);
  dev.first_step = scalar_ptr(first_step);
  const float* gs = scalar_ptr(grad_scale);
  const float* cl = scalar_ptr(clip);
  return [=](auto pt, auto, auto unscale) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    return AdanOp<P, M, decltype(unscale)::value>{
        math::AdanCoeffs<M>(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, bias_correction3_sqrt, eps,
                            weight_decay, no_prox),
        maximize ? M(-1) : M(1), gs, dev, cl};
  };
}

// Adan's optional device scalars, named for check_scalar_tensor (adan_, adan_lowbit_).
std::vector<NamedScalar> adan_scalars(const c10::optional<at::Tensor>& clip,
                                      const c10::optional<at::Tensor>& lr_tensor,
                                      const c10::optional<at::Tensor>& bias_correction1_tensor,
                                      const c10::optional<at::Tensor>& bias_correction2_tensor,
                                      const c10::optional<at::Tensor>& bias_correction3_sqrt_tensor,
                                      const c10::optional<at::Tensor>& first_step) {
  return {{"clip", &clip},
          {"lr_tensor", &lr_tensor},
          {"bias_correction1_tensor", &bias_correction1_tensor},
          {"bias_correction2_tensor", &bias_correction2_tensor},
          {"bias_correction3_sqrt_tensor", &bias_correction3_sqrt_tensor},
          {"first_step", &first_step}};
}

void adan_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
           at::TensorList exp_avg_diffs, at::TensorList neg_pre_grads, double lr, double beta1, double beta2,
           double beta3, double bias_correction1, double bias_correction2, double bias_correction3_sqrt,
           double eps, double weight_decay, bool no_prox, const c10::optional<at::Tensor>& clip, bool maximize,
           const c10::optional<at::Tensor>& grad_scale, const c10::optional<at::Tensor>& found_inf,
           const c10::optional<at::Tensor>& lr_tensor, const c10::optional<at::Tensor>& bias_correction1_tensor,
           const c10::optional<at::Tensor>& bias_correction2_tensor,
           const c10::optional<at::Tensor>& bias_correction3_sqrt_tensor,
           const c10::optional<at::Tensor>& first_step) {
  const char* op = "fused_optim::adan_";
  check_adan_bias_corrections(op, bias_correction1_tensor, bias_correction2_tensor, bias_correction3_sqrt_tensor);
  launch_update<6>(op, {params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, neg_pre_grads},
                   {true, false, true, true, true, true}, grad_scale, found_inf,
                   adan_scalars(clip, lr_tensor, bias_correction1_tensor, bias_correction2_tensor,
                                bias_correction3_sqrt_tensor, first_step),
                   adan_op_maker(lr, beta1, beta2, beta3, bias_correction1, bias_correction2, bias_correction3_sqrt,
                                 eps, weight_decay, no_prox, clip, maximize, grad_scale, lr_tensor,
                                 bias_correction1_tensor, bias_correction2_tensor, bias_correction3_sqrt_tensor,
                                 first_step));
}

void gradient_equilibrium_(at::TensorList params, at::TensorList grads, const at::Tensor& stats, double lr,
                           double weight_decay, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                           const c10::optional<at::Tensor>& found_inf,
                           const c10::optional<at::Tensor>& lr_tensor) {
  const char* op = "fused_optim::gradient_equilibrium_";
  DeviceScalars dev;
  launch_update<2>(op, {params, grads}, {true, false}, grad_scale, found_inf, {{"lr_tensor", &lr_tensor}},
                   [&](auto pt, auto, auto unscale) {
                     using P = typename decltype(pt)::type;
                     using M = opmath_t<P>;
                     dev.lr = scalar_ptr(lr_tensor);
                     return EquilibriumOp<P, M, decltype(unscale)::value>{
                         math::EquilibriumCoeffs<M>(lr, weight_decay), maximize ? M(-1) : M(1),
                         scalar_ptr(grad_scale), dev,
                         stats_ptr<M>(op, stats, static_cast<int64_t>(params.size()), params[0].device())};
                   });
}

// ---- multi_tensor_stats ----------------------------------------------------------------------

// Block-wide reduction of one value; every thread gets the result. `scratch` (a FO_SHARED_ARRAY of T)
// holds one slot per warp.
// combine must have 0 as identity (sums, and maxima of non-negative values).
template <typename T, typename Scratch, typename F>
__device__ inline T block_reduce(T v, Scratch scratch, const F& combine) {
  for (int offset = 16; offset > 0; offset /= 2) {
    v = combine(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = (blockDim.x + 31) / 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? scratch[lane] : T(0);  // 0: the identity of + and of max over |x| >= 0
    for (int offset = 16; offset > 0; offset /= 2) {
      v = combine(v, __shfl_down_sync(0xffffffffu, v, offset));
    }
    if (lane == 0) scratch[0] = v;
  }
  __syncthreads();
  return scratch[0];
}

struct MaxNan {
  template <typename T>
  __device__ T operator()(T a, T b) const { return math::fo_max_nan(a, b); }
};
struct Add {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

// The launch side of both reductions: a table of two columns (the second null when the op's second list
// is not given), the device guard, then launch(TypeTag<P>, table) for the input's storage type; nothing
// for an all-empty input (the output stays zero).
template <typename Launch>
void launch_reduction(const char* op, ReductionLists& r, const Launch& launch) {
  if (r.pl.rows() == 0) {
    return;
  }
  if (r.pl.lists.size() == 1) {
    r.pl.lists.push_back(std::vector<at::Tensor>(r.pl.lists[0].size(), at::Tensor()));
  }
  c10::cuda::CUDAGuard guard(r.out.device());
  const LaunchTable<2> table = make_table<2>(r.pl);
  if (table.nchunks == 0) {
    return;
  }
  dispatch_param_state(op, r.dtype, r.dtype, [&](auto pt, auto) { launch(pt, table); });
}

template <typename P, typename M>
struct StatsFunctor {
  M* partials;  // [nchunks, 3]
  M sign;
  bool has_addend;
  M alpha;
  const float* grad_scale;

  // t unscaled as the update ops write it back (rounded to P), then the sign
  __device__ void accumulate(M t, M a, M scale, M& amax, M& sum, M& sq) const {
    M x = (grad_scale != nullptr ? math::amp_unscale<P>(t, scale) : t) * sign;
    if (has_addend) {
      x = math::fo_fma(a, alpha, x);
    }
    amax = math::fo_max_nan(amax, math::fo_abs(x));
    sum += x;
    sq = math::fo_fma(x, x, sq);
  }

  __device__ void operator()(const TensorRow<2>& row, int64_t chunk, int64_t begin, int64_t end) const {
    FO_SHARED_ARRAY(M, scratch, kThreads / 32);
    const P* t = static_cast<const P*>(row.ptrs[0]);
    const P* a = static_cast<const P*>(row.ptrs[1]);  // nullptr without addends
    const M scale = read_scale<M>(grad_scale);
    M amax = 0, sum = 0, sq = 0;
    int64_t i0 = begin;
    if (is_aligned<P>(t) && (a == nullptr || is_aligned<P>(a))) {
      const int64_t vec_end = begin + (end - begin) / kVec * kVec;
      for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
           i += static_cast<int64_t>(blockDim.x) * kVec) {
        const auto tv = *reinterpret_cast<const AlignedVec<P, kVec>*>(t + i);
        AlignedVec<P, kVec> av{};
        if (a != nullptr) av = *reinterpret_cast<const AlignedVec<P, kVec>*>(a + i);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          accumulate(static_cast<M>(tv.val[j]), static_cast<M>(av.val[j]), scale, amax, sum, sq);
        }
      }
      i0 = vec_end;
    }
    for (int64_t i = i0 + threadIdx.x; i < end; i += blockDim.x) {
      accumulate(static_cast<M>(t[i]), a != nullptr ? static_cast<M>(a[i]) : M(0), scale, amax, sum, sq);
    }
    amax = block_reduce(amax, scratch, MaxNan{});
    sum = block_reduce(sum, scratch, Add{});
    sq = block_reduce(sq, scratch, Add{});
    if (threadIdx.x == 0) {
      partials[chunk * 3 + 0] = amax;
      partials[chunk * 3 + 1] = sum;
      partials[chunk * 3 + 2] = sq;
    }
  }
};

// One block per non-empty tensor: its chunks' partials, in order; sums in fp64.
template <typename M>
__global__ void stats_cleanup_kernel(const TensorRow<2>* rows, const M* partials, M* out) {
  FO_SHARED_ARRAY(double, dscratch, 32);
  FO_SHARED_ARRAY(M, mscratch, 32);
  const TensorRow<2>& row = rows[blockIdx.x];
  const int64_t nch = (row.numel + kChunk - 1) / kChunk;
  M amax = 0;
  double sum = 0, sq = 0;
  for (int64_t c = threadIdx.x; c < nch; c += blockDim.x) {
    const M* p = partials + (row.chunk_begin + c) * 3;
    amax = math::fo_max_nan(amax, p[0]);
    sum += static_cast<double>(p[1]);
    sq += static_cast<double>(p[2]);
  }
  amax = block_reduce(amax, mscratch, MaxNan{});
  sum = block_reduce(sum, dscratch, Add{});
  sq = block_reduce(sq, dscratch, Add{});
  if (threadIdx.x == 0) {
    out[row.row * 3 + 0] = amax;
    out[row.row * 3 + 1] = static_cast<M>(sum);
    out[row.row * 3 + 2] = static_cast<M>(sq);
  }
}

at::Tensor multi_tensor_stats(at::TensorList tensors, c10::optional<at::TensorList> addends, double alpha,
                              bool negate, const c10::optional<at::Tensor>& grad_scale) {
  const char* op = "fused_optim::multi_tensor_stats";
  ReductionLists r = prepare_reduction(op, tensors, addends, "addends", 3, at::Device(kKernelDevice));
  check_scalar_tensor(op, "grad_scale", grad_scale, r.out.device());
  launch_reduction(op, r, [&](auto pt, const LaunchTable<2>& table) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    at::Tensor partials = at::empty({table.nchunks * 3}, r.out.options());
    StatsFunctor<P, M> f{partials.data_ptr<M>(), negate ? M(-1) : M(1), addends.has_value(), static_cast<M>(alpha),
                         scalar_ptr(grad_scale)};
    multi_tensor_apply<2>(table, nullptr, f);
    launch<stats_cleanup_kernel<M>>(static_cast<unsigned>(table.nrows), 256, c10::cuda::getCurrentCUDAStream(),
                                    table.rows, partials.data_ptr<M>(), r.out.data_ptr<M>());
  });
  return r.out;
}

// ---- composites: Lookahead, SAM, Muon, NeuroOptima ------------------------------------
//
// Update functors over elementwise_typed (per-list storage types: these ops mix fp32 state or bf16
// Newton-Schulz buffers with the params' dtype), the rules of csrc/math/, one launch per op. The SAM
// scale and Muon's per-tensor scales are read from device memory.

// One launch of `Op` over rows whose lists are stored as `Types`; Op::context(row) gives the per-row
// values (an SAM scale, a Muon scale) once per block.
template <int D, typename Types, typename M, typename Op>
struct CompositeFunctor {
  Op op;
  __device__ void operator()(const TensorRow<D>& row, int64_t, int64_t begin, int64_t end) const {
    elementwise_typed<D, Types, M>(row, begin, end, op, op.context(row));
  }
};

struct NoCtx {};

// The prologue every composite update shares: a CUDA device, its guard, the launch table.
template <int D>
struct CompositeLaunch {
  at::Device device;
  c10::cuda::CUDAGuard guard;
  LaunchTable<D> table;
  CompositeLaunch(const char* op, const PreparedLists& pl)
      : device(checked_cuda_device(op, pl)), guard(device), table(make_table<D>(pl)) {}
  static at::Device checked_cuda_device(const char* op, const PreparedLists& pl) {
    const at::Device device = pl.lists[0][0].device();
    TORCH_CHECK(device.type() == kKernelDevice, op, ": CUDA kernel called with tensors on ", device);
    return device;
  }
};

template <typename P, typename M>
struct LookaheadOp {
  static constexpr unsigned kWrites = 0b11;  // params, slows
  math::LookaheadCoeffs<M> c;
  __device__ NoCtx context(const TensorRow<2>&) const { return {}; }
  __device__ void operator()(M (&v)[2], const NoCtx&) const {
    // slow.copy_(p): the stored (rounded) param
    const M p = static_cast<M>(static_cast<P>(math::lookahead_interpolate(v[0], v[1], c)));
    v[0] = p;
    v[1] = p;
  }
};

void lookahead_sync_(at::TensorList params, at::TensorList slows, double alpha) {
  const char* op = "fused_optim::lookahead_sync_";
  PreparedLists pl = prepare_lists(op, {params, slows}, {true, true});
  if (pl.rows() == 0) {
    return;
  }
  check_dtypes(op, pl, 1);
  CompositeLaunch<2> launch(op, pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[1][0].scalar_type(), [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    CompositeFunctor<2, ListTypes<P, S>, M, LookaheadOp<P, M>> f{{math::LookaheadCoeffs<M>(alpha)}};
    multi_tensor_apply<2>(launch.table, nullptr, f);
  });
  pl.finish();
}

template <typename M>
struct SamPerturbOp {
  static constexpr unsigned kWrites = 0b101;  // params, old_params
  const M* scale;
  bool adaptive;
  __device__ M context(const TensorRow<3>&) const { return *scale; }
  __device__ void operator()(M (&v)[3], const M& sc) const {
    v[2] = v[0];  // old_p = p (exact: the math type holds every value of the storage type)
    v[0] = math::sam_perturb(v[0], v[1], sc, adaptive);
  }
};

void sam_perturb_(at::TensorList params, at::TensorList grads, at::TensorList old_params,
                  const at::Tensor& scale, bool adaptive) {
  const char* op = "fused_optim::sam_perturb_";
  PreparedLists pl = prepare_lists(op, {params, grads, old_params}, {true, false, true});
  if (pl.rows() == 0) {
    return;
  }
  check_dtypes(op, pl, 1, 1);
  check_same_dtype(op, pl, 1, "grads", "params");
  check_same_dtype(op, pl, 2, "old_params", "params");
  const at::Device device = CompositeLaunch<3>::checked_cuda_device(op, pl);
  TORCH_CHECK(scale.numel() == 1, op, ": scale must have one element, got ", scale.numel());
  TORCH_CHECK(scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble, op,
              ": scale must be float32 (float64 for float64 params), got ", scale.scalar_type());
  TORCH_CHECK(scale.device() == device, op, ": scale is on ", scale.device(), ", expected ", device);
  CompositeLaunch<3> launch(op, pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[0][0].scalar_type(), [&](auto pt, auto) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    // in the math type, on the device (a no-op when it already is; never read on the host)
    const at::Tensor sc = scale.reshape({1}).to(c10::CppTypeToScalarType<M>::value);
    CompositeFunctor<3, ListTypes<P, P, P>, M, SamPerturbOp<M>> f{{sc.data_ptr<M>(), adaptive}};
    multi_tensor_apply<3>(launch.table, nullptr, f);
  });
  pl.finish();
}

template <typename U>
struct CopyOp {
  static constexpr unsigned kWrites = 0b1;  // dst
  __device__ NoCtx context(const TensorRow<2>&) const { return {}; }
  __device__ void operator()(U (&v)[2], const NoCtx&) const { v[0] = v[1]; }
};

// The unsigned integer of each element size: a copy of the bits (NaN payloads included).
template <typename F>
void dispatch_bits(const char* op, int64_t element_size, F&& f) {
  switch (element_size) {
    case 1: return f(TypeTag<uint8_t>{});
    case 2: return f(TypeTag<uint16_t>{});
    case 4: return f(TypeTag<uint32_t>{});
    case 8: return f(TypeTag<uint64_t>{});
    default: TORCH_CHECK(false, op, ": unsupported element size ", element_size);
  }
}

void multi_tensor_copy_(at::TensorList dst, at::TensorList src) {
  const char* op = "fused_optim::multi_tensor_copy_";
  PreparedLists pl = prepare_lists(op, {dst, src}, {true, false});
  if (pl.rows() == 0) {
    return;
  }
  check_same_dtype(op, pl, 1, "src", "dst");  // a bit copy keeps the dtype
  for (int64_t i = 1; i < pl.rows(); ++i) {
    TORCH_CHECK(pl.lists[0][i].scalar_type() == pl.lists[0][0].scalar_type(), op, ": one dtype per call, got ",
                pl.lists[0][0].scalar_type(), " and ", pl.lists[0][i].scalar_type());
  }
  CompositeLaunch<2> launch(op, pl);
  dispatch_bits(op, pl.lists[0][0].element_size(), [&](auto bt) {
    using U = typename decltype(bt)::type;
    CompositeFunctor<2, ListTypes<U, U>, U, CopyOp<U>> f{{}};
    multi_tensor_apply<2>(launch.table, nullptr, f);
  });
  pl.finish();
}

template <typename U, typename M>
struct MuonMomentumOp {
  static constexpr unsigned kWrites = 0b110;  // momentum_buffers, updates (grads are read only)
  math::MuonMomentumCoeffs<M> c;
  M sign;
  __device__ NoCtx context(const TensorRow<3>&) const { return {}; }
  __device__ void operator()(M (&v)[3], const NoCtx&) const {
    v[2] = math::muon_momentum(math::prepare_grad(v[0], sign, false, M(1)), v[1], c);
  }
};

void muon_momentum_(at::TensorList grads, at::TensorList momentum_buffers, at::TensorList updates,
                    double momentum, bool nesterov, bool maximize) {
  const char* op = "fused_optim::muon_momentum_";
  PreparedLists pl = prepare_lists(op, {grads, momentum_buffers, updates}, {false, true, true});
  if (pl.rows() == 0) {
    return;
  }
  check_dtypes(op, pl, 1, 2);
  CompositeLaunch<3> launch(op, pl);
  dispatch_muon(op, pl, 1, 2, [&](auto pt, auto st, auto ut) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    using U = typename decltype(ut)::type;
    CompositeFunctor<3, ListTypes<P, S, U>, M, MuonMomentumOp<U, M>> f{
        {math::MuonMomentumCoeffs<M>(momentum, nesterov), maximize ? M(-1) : M(1)}};
    multi_tensor_apply<3>(launch.table, nullptr, f);
  });
  pl.finish();
}

template <typename U, typename M>
struct MuonApplyOp {
  static constexpr unsigned kWrites = 0b1;  // params
  using MU = opmath_t<U>;  // `u *= scale` on the bf16 tensor: fp32 product with float32(scale)
  math::MuonApplyCoeffs<M> c;
  const double* scales;    // one per row of the op's lists
  __device__ MU context(const TensorRow<2>& row) const { return static_cast<MU>(scales[row.row]); }
  __device__ void operator()(M (&v)[2], const MU& sc) const {
    const M u = static_cast<M>(static_cast<U>(static_cast<MU>(v[1]) * sc));  // one rounding to u's dtype
    math::muon_apply(v[0], u, c);
  }
};

// Muon's per-tensor scales on `device`: they travel like the launch table (pinned staging, copied with the
// launch, no host sync; kept alive while a CUDA graph is captured, whose replays re-read it, see make_table)
at::Tensor device_scales(at::ArrayRef<double> scales, const at::Device& device) {
  at::Tensor host = at::empty({static_cast<int64_t>(scales.size())}, staging_options().dtype(at::kDouble));
  std::memcpy(host.data_ptr(), scales.data(), scales.size() * sizeof(double));
  at::Tensor dev = host.to(device, /*non_blocking=*/true);
  keep_staging_if_capturing(host, device);
  return dev;
}

void muon_apply_(at::TensorList params, at::TensorList updates, at::ArrayRef<double> scales, double lr,
                 double weight_decay) {
  const char* op = "fused_optim::muon_apply_";
  TORCH_CHECK(scales.size() == params.size(), op, ": scales has ", scales.size(), " values, expected ",
              params.size(), " (one per parameter)");
  PreparedLists pl = prepare_lists(op, {params, updates}, {true, false});
  if (pl.rows() == 0) {
    return;
  }
  check_dtypes(op, pl, 1, 1);
  CompositeLaunch<2> launch(op, pl);
  const at::Tensor dev_scales = device_scales(scales, launch.device);
  dispatch_muon(op, pl, -1, 1, [&](auto pt, auto, auto ut) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    using U = typename decltype(ut)::type;
    CompositeFunctor<2, ListTypes<P, U>, M, MuonApplyOp<U, M>> f{
        {math::MuonApplyCoeffs<M>(lr, weight_decay), dev_scales.data_ptr<double>()}};
    multi_tensor_apply<2>(launch.table, nullptr, f);
  });
  pl.finish();
}

template <typename M>
struct NeuroOptimaOp {
  static constexpr unsigned kWrites = 0b111101;  // all but the grads
  math::NeuroOptimaCoeffs<M> c;
  M sign;
  __device__ NoCtx context(const TensorRow<6>&) const { return {}; }
  __device__ void operator()(M (&v)[6], const NoCtx&) const {
    math::neuro_optima_update(v[0], math::prepare_grad(v[1], sign, false, M(1)), v[2], v[3], v[4], v[5], c);
  }
};

void neuro_optima_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList exp_avg_diffs, at::TensorList prev_grads, double lr,
                   double beta1, double beta2, double eps, double weight_decay, bool maximize) {
  const char* op = "fused_optim::neuro_optima_";
  PreparedLists pl = prepare_lists(op, {params, grads, exp_avgs, exp_avg_sqs, exp_avg_diffs, prev_grads},
                                   {true, false, true, true, true, true});
  if (pl.rows() == 0) {
    return;
  }
  check_dtypes(op, pl, 2);
  CompositeLaunch<6> launch(op, pl);
  dispatch_param_state(op, pl.lists[0][0].scalar_type(), pl.lists[2][0].scalar_type(), [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using S = typename decltype(st)::type;
    using M = opmath_t<P>;
    CompositeFunctor<6, ListTypes<P, P, S, S, S, S>, M, NeuroOptimaOp<M>> f{
        {math::NeuroOptimaCoeffs<M>(lr, beta1, beta2, eps, weight_decay), maximize ? M(-1) : M(1)}};
    multi_tensor_apply<6>(launch.table, nullptr, f);
  });
  pl.finish();
}

// ---- multi_tensor_l2norm: SAM's per-tensor norms ------------------------------------------------

// Per chunk: the sum of squares of x = |w| * t (weights given) or t, into partials[chunk].
template <typename P, typename M>
struct SumSqFunctor {
  M* partials;  // [nchunks]
  bool weighted;

  __device__ void operator()(const TensorRow<2>& row, int64_t chunk, int64_t begin, int64_t end) const {
    FO_SHARED_ARRAY(M, scratch, kThreads / 32);
    const P* t = static_cast<const P*>(row.ptrs[0]);
    const P* w = static_cast<const P*>(row.ptrs[1]);  // nullptr without weights
    M sq = 0;
    int64_t i0 = begin;
    if (is_aligned<P>(t) && (w == nullptr || is_aligned<P>(w))) {
      const int64_t vec_end = begin + (end - begin) / kVec * kVec;
      for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
           i += static_cast<int64_t>(blockDim.x) * kVec) {
        const auto tv = *reinterpret_cast<const AlignedVec<P, kVec>*>(t + i);
        AlignedVec<P, kVec> wv{};
        if (weighted) wv = *reinterpret_cast<const AlignedVec<P, kVec>*>(w + i);
#pragma unroll
        for (int j = 0; j < kVec; ++j) {
          const M x = math::sam_norm_value(static_cast<M>(wv.val[j]), static_cast<M>(tv.val[j]), weighted);
          sq = math::fo_fma(x, x, sq);
        }
      }
      i0 = vec_end;
    }
    for (int64_t i = i0 + threadIdx.x; i < end; i += blockDim.x) {
      const M x = math::sam_norm_value(weighted ? static_cast<M>(w[i]) : M(0), static_cast<M>(t[i]), weighted);
      sq = math::fo_fma(x, x, sq);
    }
    sq = block_reduce(sq, scratch, Add{});
    if (threadIdx.x == 0) {
      partials[chunk] = sq;
    }
  }
};

// One block per non-empty tensor: its chunks' partials summed in fp64, then the square root.
template <typename M>
__global__ void l2norm_cleanup_kernel(const TensorRow<2>* rows, const M* partials, M* out) {
  FO_SHARED_ARRAY(double, scratch, 32);
  const TensorRow<2>& row = rows[blockIdx.x];
  const int64_t nch = (row.numel + kChunk - 1) / kChunk;
  double sq = 0;
  for (int64_t c = threadIdx.x; c < nch; c += blockDim.x) {
    sq += static_cast<double>(partials[row.chunk_begin + c]);
  }
  sq = block_reduce(sq, scratch, Add{});
  if (threadIdx.x == 0) {
    out[row.row] = static_cast<M>(::sqrt(sq));
  }
}

at::Tensor multi_tensor_l2norm(at::TensorList tensors, c10::optional<at::TensorList> abs_weights) {
  const char* op = "fused_optim::multi_tensor_l2norm";
  ReductionLists r = prepare_reduction(op, tensors, abs_weights, "abs_weights", 0, at::Device(kKernelDevice));
  launch_reduction(op, r, [&](auto pt, const LaunchTable<2>& table) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    at::Tensor partials = at::empty({table.nchunks}, r.out.options());
    SumSqFunctor<P, M> f{partials.data_ptr<M>(), abs_weights.has_value()};
    multi_tensor_apply<2>(table, nullptr, f);
    launch<l2norm_cleanup_kernel<M>>(static_cast<unsigned>(table.nrows), 256, c10::cuda::getCurrentCUDAStream(),
                                     table.rows, partials.data_ptr<M>(), r.out.data_ptr<M>());
  });
  return r.out;
}

}  // namespace
}  // namespace cuda
}  // namespace fused_optim

// the lowbit ops: the Ops above over bf16 / 8-bit state
#include "lowbit_updates.cuh"

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
#define FO_BACKEND fused_optim::cuda
#include "../register_kernels.h"
}
