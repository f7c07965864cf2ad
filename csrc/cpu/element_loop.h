// The one element loop of the CPU ops, and the host side the update ops share.
//
// for_each_element runs a per-element function over one chunk of a row: pairs of at::vec::Vectorized
// registers of the math type while every list allows it (kWide: fp32/fp64 storage, or bf16/fp16
// widened to fp32 by load2/store2), then the same function on scalars for the tail and for the
// dtype mixes that do not vectorize. The function is written once, as a generic lambda over the
// value type (M or Vec<M>), with the rules of csrc/math/; both paths round the same way (fma once,
// IEEE division and square root, round-to-nearest-even on the narrowing store), so the vector and
// scalar paths give the same bits.
#pragma once

#include <array>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "multi_tensor_cpu.h"
#include "vec_ops.h"

namespace fused_optim {
namespace cpu {

// A list the function writes but never reads (Muon's updates): stored, not loaded.
template <typename T>
struct Out {
  T* ptr;
};

template <typename A>
struct ListArg;
template <typename T>
struct ListArg<T*> {  // read and written
  using type = T;
  static constexpr bool kLoad = true, kStore = true;
  static T* ptr(T* a) { return a; }
};
template <typename T>
struct ListArg<const T*> {  // read only
  using type = T;
  static constexpr bool kLoad = true, kStore = false;
  static const T* ptr(const T* a) { return a; }
};
template <typename T>
struct ListArg<Out<T>> {  // written only
  using type = T;
  static constexpr bool kLoad = false, kStore = true;
  static T* ptr(Out<T> a) { return a.ptr; }
};

namespace detail {

template <typename M, typename A>
inline void load(A a, int64_t i, math::Vec<M>& lo, math::Vec<M>& hi) {
  if constexpr (ListArg<A>::kLoad) load2<M>(ListArg<A>::ptr(a) + i, lo, hi);
}
template <typename M, typename A>
inline void store(A a, int64_t i, const math::Vec<M>& lo, const math::Vec<M>& hi) {
  if constexpr (ListArg<A>::kStore) store2<M>(ListArg<A>::ptr(a) + i, lo, hi);
}
template <typename M, typename A>
inline void load(A a, int64_t i, M& x) {
  if constexpr (ListArg<A>::kLoad) x = static_cast<M>(ListArg<A>::ptr(a)[i]);
}
template <typename M, typename A>
inline void store(A a, int64_t i, M x) {
  if constexpr (ListArg<A>::kStore) ListArg<A>::ptr(a)[i] = static_cast<typename ListArg<A>::type>(x);
}

template <typename M, typename F, typename... A, size_t... K>
void for_each_element(int64_t begin, int64_t end, const F& f, std::index_sequence<K...>, A... a) {
  constexpr size_t N = sizeof...(A);
  int64_t i = begin;
  if constexpr (kWide<M, typename ListArg<A>::type...>) {
    using V = math::Vec<M>;
    constexpr int64_t kStep = 2 * V::size();
    for (; i + kStep <= end; i += kStep) {
      std::array<V, N> lo, hi;
      (load<M>(a, i, lo[K], hi[K]), ...);
      f(lo[K]...);
      f(hi[K]...);
      (store<M>(a, i, lo[K], hi[K]), ...);
    }
  }
  for (; i < end; ++i) {
    std::array<M, N> x{};
    (load<M>(a, i, x[K]), ...);
    f(x[K]...);
    (store<M>(a, i, x[K]), ...);
  }
}

}  // namespace detail

// f(x0, x1, ...) for the elements [begin, end) of the lists `a` (T*: read and written, const T*: read,
// Out<T>: written), each x the element(s) in the math type M, by reference; written lists are stored
// back after f.
template <typename M, typename F, typename... A>
void for_each_element(int64_t begin, int64_t end, const F& f, A... a) {
  detail::for_each_element<M>(begin, end, f, std::index_sequence_for<A...>{}, a...);
}

// The grad as every update uses it, P its storage type: with UNSCALE, g / grad_scale rounded to P
// (math::amp_unscale) replaces the loaded value, which the loop stores back into the grad (as torch's
// in-place unscale leaves it); then the maximize sign (exact; the negated value is never written).
template <typename P, typename M, bool UNSCALE>
struct GradPrep {
  M sign;
  M scale;
  GradPrep(bool maximize, const c10::optional<at::Tensor>& grad_scale)
      : sign(maximize ? M(-1) : M(1)), scale(static_cast<M>(read_scalar(scalar_ptr(grad_scale), 1.0f))) {}
  template <typename X>
  X operator()(X& g) const {
    if constexpr (UNSCALE) {
      g = round_through<P>(g / X(scale));
    }
    return g * X(sign);
  }
  // the grads' row: written under AMP, read only otherwise
  std::conditional_t<UNSCALE, P*, const P*> ptr(const PreparedLists& pl, int64_t row) const {
    return pl.ptr<P>(1, row);
  }
};

// The host prologue of an update op (lists 0 and 1: params and grads; the rest: state): the optional
// scalar tensors checked, the lists prepared (the grads are written under AMP), their dtypes checked.
inline PreparedLists prepare_update(const char* op, const std::vector<at::TensorList>& lists,
                                    const c10::optional<at::Tensor>& grad_scale,
                                    const c10::optional<at::Tensor>& found_inf,
                                    const std::vector<NamedScalar>& scalars) {
  const at::Device cpu(at::kCPU);
  check_scalar_tensor(op, "grad_scale", grad_scale, cpu);
  check_scalar_tensor(op, "found_inf", found_inf, cpu);
  for (const auto& s : scalars) {
    check_scalar_tensor(op, s.name, *s.tensor, cpu);
  }
  std::vector<bool> mutated(lists.size(), true);
  mutated[1] = grad_scale.has_value();
  PreparedLists pl = prepare_lists(op, lists, mutated);
  check_dtypes(op, pl, 2);
  return pl;
}

// Runs body(TypeTag<P>, TypeTag<S>, grad, items) with the storage types of the prepared update lists and
// their GradPrep; nothing when there are no rows or found_inf is set (AMP: the step is skipped). S is P
// for ops without state lists.
template <typename Body>
void update_loop(const char* op, PreparedLists& pl, bool maximize, const c10::optional<at::Tensor>& grad_scale,
                 const c10::optional<at::Tensor>& found_inf, const Body& body) {
  if (pl.rows() == 0 || host_found_inf(found_inf)) {
    return;
  }
  const auto items = make_chunks(pl);
  const auto pdt = pl.lists[0][0].scalar_type();
  const auto sdt = pl.lists.size() > 2 ? pl.lists[2][0].scalar_type() : pdt;
  dispatch_param_state(op, pdt, sdt, [&](auto pt, auto st) {
    using P = typename decltype(pt)::type;
    using M = opmath_t<P>;
    if (grad_scale.has_value()) {
      body(pt, st, GradPrep<P, M, true>(maximize, grad_scale), items);
    } else {
      body(pt, st, GradPrep<P, M, false>(maximize, grad_scale), items);
    }
  });
  pl.finish();
}

}  // namespace cpu
}  // namespace fused_optim
