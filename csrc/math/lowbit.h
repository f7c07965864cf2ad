// Low-precision optimizer state, host and device: Philox4x32-10 keyed by (seed, step, tensor, element),
// stochastic rounding fp32 -> bf16, and 8-bit blockwise quantization with the dynamic map. Bit-identical
// to the torch reference fused_optim/lowbit.py and the Triton helpers fused_optim/kernels/lowbit.py
// (docs/lowbit.md §1-§4). Scalar (per-element) functions: a kernel calls them on values it holds.
//
// The map's tables (magnitudes, thresholds) are not repeated here: the caller passes pointers to the
// fp32 tensors of `fused_optim.lowbit.quant_tables`, so every implementation uses the same bits.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

namespace fused_optim {
namespace lowbit {

// elements per quantization block, one fp32 absmax scale each (docs/lowbit.md §3)
constexpr int kQuantBlock = 256;
// magnitudes of the signed map (7 bits + sign) and of the unsigned map (8 bits)
constexpr int kSignedMagnitudes = 128;
constexpr int kUnsignedMagnitudes = 256;

C10_HOST_DEVICE inline uint32_t f32_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

C10_HOST_DEVICE inline float f32_from_bits(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

C10_HOST_DEVICE inline uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct Philox4 {
  uint32_t w[4];
};

// Philox4x32-10 (Salmon et al., SC'11; the Random123 constants) of counter c under key (k0, k1).
C10_HOST_DEVICE inline Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                             uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    const uint32_t hi0 = mulhi32(c0, 0xD2511F53u), lo0 = c0 * 0xD2511F53u;
    const uint32_t hi1 = mulhi32(c2, 0xCD9E8D57u), lo1 = c2 * 0xCD9E8D57u;
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four random words of element `elem` of tensor `tensor` at `step` under `seed` (< 2^63): key = seed's
// low and high 32 bits, counter = (elem low, elem high, tensor, step). Word s is the element's stream s.
C10_HOST_DEVICE inline Philox4 random_words(uint64_t seed, uint32_t step, uint32_t tensor, uint64_t elem) {
  return philox4x32_10(static_cast<uint32_t>(elem), static_cast<uint32_t>(elem >> 32), tensor, step,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// The generator step of a float32 step counter (a capturable step): its integer value's low 32 bits, as
// the reference and the Triton kernels read a tensor step (to int64, then & (2^32 - 1)).
C10_HOST_DEVICE inline uint32_t step_of_counter(float counter) {
  return static_cast<uint32_t>(static_cast<uint64_t>(static_cast<int64_t>(counter)) & 0xFFFFFFFFu);
}

// bf16 bits of x rounded stochastically with the random word r (its low 16 bits): add, truncate. Unbiased;
// NaN stays NaN (quiet, sign kept); see docs/lowbit.md §2 for inf and overflow.
C10_HOST_DEVICE inline uint16_t sr_bf16_bits(float x, uint32_t r) {
  const uint32_t b = f32_bits(x);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((b | 0x00400000u) >> 16);
  return static_cast<uint16_t>((b + (r & 0xFFFFu)) >> 16);
}

// fp16 bits of x rounded stochastically with the random word r (its high 24 bits): between the two fp16
// neighbours of |x|, away from zero when r >> 8 < frac * 2^24 (docs/lowbit.md §5; the torch reference is
// fused_optim.lowbit.stochastic_round_fp16). In fp16's normal range frac * 2^24 is the 13 dropped mantissa
// bits times 2^11, an integer; below it (fp16 subnormals, steps of 2^-24) it is computed in fp32, where
// every operation is exact. Above 65504 inf stands for 2^16; NaN stays NaN (quiet, sign and the top
// payload bits kept, as torch's CPU conversion).
C10_HOST_DEVICE inline uint16_t sr_fp16_bits(float x, uint32_t r) {
  const uint32_t b = f32_bits(x);
  const uint32_t a = b & 0x7FFFFFFFu;
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t r24 = r >> 8;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));
  if (a >= 0x47800000u) return static_cast<uint16_t>(sign | 0x7C00u);  // |x| >= 2^16 (and inf): inf
  if (a >= 0x38800000u) {                                               // |x| >= 2^-14: fp16 normal
    const uint32_t lo = (a >> 13) - (112u << 10);                       // exponent rebiased 127 -> 15
    return static_cast<uint16_t>(sign | (lo + (r24 < ((a & 0x1FFFu) << 11) ? 1u : 0u)));
  }
  const float t = f32_from_bits(a) * 16777216.0f;  // |x| / 2^-24, below 1024: exact
  const uint32_t m = static_cast<uint32_t>(t);      // toward zero: the lower neighbour's bits
  const float threshold = (t - static_cast<float>(m)) * 16777216.0f;
  return static_cast<uint16_t>(sign | (m + (static_cast<float>(r24) < threshold ? 1u : 0u)));
}

// bf16 bits widened to fp32 (exact)
C10_HOST_DEVICE inline float bf16_bits_to_float(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }

// max |x| over n values; NaN if any is NaN (torch.amax), so the block's scale carries it
C10_HOST_DEVICE inline float block_absmax(const float* x, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    const float a = f32_from_bits(f32_bits(x[i]) & 0x7FFFFFFFu);
    if (a != a) return a;
    if (a > m) m = a;
  }
  return m;
}

// The 8-bit code of x in a block of scale `scale`: the nearest map magnitude to |x|/scale (ties upward),
// found by binary search on |x| >= thr[k] * scale (no division, so every implementation agrees); signed:
// 7 magnitude bits (thr: 127 thresholds) and x's sign bit as bit 7; unsigned: 8 bits (thr: 255).
// `thr` (and `mag` below): a pointer, or anything indexed like one (a CUDA kernel's shared copy).
template <bool Signed, typename Table>
C10_HOST_DEVICE inline uint8_t quantize_value(float x, float scale, const Table& thr) {
  const float a = f32_from_bits(f32_bits(x) & 0x7FFFFFFFu);
  int idx = 0;
  for (int step = Signed ? 64 : 128; step > 0; step >>= 1) {
    const int cand = idx + step;
    const float t = static_cast<float>(thr[cand - 1]) * scale;
    if (a >= t) idx = cand;
  }
  if (Signed) idx |= static_cast<int>(f32_bits(x) >> 31) << 7;
  return static_cast<uint8_t>(idx);
}

// A block's comparison table for quantize_scaled: out[k] = thr[k] * scale for the `count` thresholds (127
// signed, 255 unsigned), the products quantize_value forms per element.
C10_HOST_DEVICE inline void scaled_thresholds(const float* thr, float scale, int count, float* out) {
  for (int k = 0; k < count; ++k) out[k] = thr[k] * scale;
}

// quantize_value's code, searched in a block's scaled_thresholds table (the same comparisons, so the same
// code; branch-free steps, no multiply per element): for a CPU pass over a whole block.
template <bool Signed>
C10_HOST_DEVICE inline uint8_t quantize_scaled(float x, const float* table) {
  const float a = f32_from_bits(f32_bits(x) & 0x7FFFFFFFu);
  int idx = 0;
  for (int step = Signed ? 64 : 128; step > 0; step >>= 1) idx += (a >= table[idx + step - 1]) ? step : 0;
  if (Signed) idx |= static_cast<int>(f32_bits(x) >> 31) << 7;
  return static_cast<uint8_t>(idx);
}

// The fp32 value of an 8-bit code: ±mag[code] * scale (mag: the 128 signed or 256 unsigned magnitudes).
template <bool Signed, typename Table>
C10_HOST_DEVICE inline float dequantize_value(uint8_t code, float scale, const Table& mag) {
  if (Signed) {
    const float v = static_cast<float>(mag[code & 0x7F]) * scale;
    return (code >> 7) ? -v : v;
  }
  return static_cast<float>(mag[code]) * scale;
}

// |x| (the sign bit cleared; NaN stays NaN), as block_absmax compares it
C10_HOST_DEVICE inline float abs_bits(float x) { return f32_from_bits(f32_bits(x) & 0x7FFFFFFFu); }

}  // namespace lowbit
}  // namespace fused_optim
