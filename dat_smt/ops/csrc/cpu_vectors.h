// Float vectors for the CPU kernels: GCC vectors of 8 lanes (one AVX2 register, or two SSE2 ones, depending on the
// DAT_SMT_CPU_MULTIVERSION clone that inlines them) and of 16 lanes (one AVX-512 register in the x86-64-v4 clone),
// or lane loops for other compilers. exp and GELU are written once for both widths, so that every width computes the
// same values.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <iterator>

#include "cpu_channel_row.h"

namespace dat_smt {

constexpr int64_t kLanes = 8;

// Exact (erf) GELU of one value: the tail of gelu_in_place and the lane-loop fallback.
DAT_SMT_CPU_INLINE float gelu_scalar(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

// Float lanes of a vector type V.
template <typename V>
constexpr int64_t kLanesOf = sizeof(V) / sizeof(float);

#if defined(__GNUC__) && !defined(__clang__)
template <int kWidth>
struct FloatVector {
  typedef float type __attribute__((vector_size(kWidth * sizeof(float))));
  typedef int32_t int_type __attribute__((vector_size(kWidth * sizeof(float))));
  typedef float unaligned_type __attribute__((vector_size(kWidth * sizeof(float)), aligned(4), may_alias));
};
typedef FloatVector<8>::type vec8;
typedef FloatVector<16>::type vec16;
template <typename V>
using IntVector = typename FloatVector<kLanesOf<V>>::int_type;

template <typename V>
DAT_SMT_CPU_INLINE V load(const float* x) {
  return *reinterpret_cast<const typename FloatVector<kLanesOf<V>>::unaligned_type*>(x);
}
template <typename V>
DAT_SMT_CPU_INLINE void store(float* y, V v) {
  *reinterpret_cast<typename FloatVector<kLanesOf<V>>::unaligned_type*>(y) = v;
}
// (a shuffle of lane 0, which GCC turns into one broadcast; an initializer list of copies it does not)
template <typename V>
DAT_SMT_CPU_INLINE V splat(float a) { return __builtin_shuffle(V{a}, IntVector<V>{}); }
DAT_SMT_CPU_INLINE vec8 max8(vec8 a, vec8 b) { return a > b ? a : b; }

// exp for arguments <= 0, within 2 ulp; below -87.3 (and at -inf) it is 0.
template <typename V>
DAT_SMT_CPU_INLINE V exp_nonpositive(V x) {
  const V lowest = splat<V>(-87.3f);
  const V clamped = x < lowest ? lowest : x;
  // n = round(x / ln 2) through the float mantissa (exact for |n| < 2^22), r = x - n ln 2 in two parts
  const V magic = splat<V>(12582912.0f);
  const V n = (clamped * splat<V>(1.44269504088896341f) + magic) - magic;
  const V r = (clamped - n * splat<V>(0.693359375f)) + n * splat<V>(2.12194440e-4f);
  V p = splat<V>(1.9875691500e-4f);
  p = p * r + splat<V>(1.3981999507e-3f);
  p = p * r + splat<V>(8.3334519073e-3f);
  p = p * r + splat<V>(4.1665795894e-2f);
  p = p * r + splat<V>(1.6666665459e-1f);
  p = p * r + splat<V>(5.0000001201e-1f);
  p = p * (r * r) + r + splat<V>(1.0f);
  const IntVector<V> exponent = (__builtin_convertvector(n, IntVector<V>) + 127) << 23;
  V two_to_n;
  std::memcpy(&two_to_n, &exponent, sizeof(two_to_n));
  return x < lowest ? V{} : p * two_to_n;
}

// Exact (erf) GELU, x / 2 * (1 + erf(x / sqrt 2)), with the erf of PyTorch's vectorised GELU (Abramowitz and Stegun
// 7.1.26, absolute error below 1.5e-7): results agree with PyTorch's AVX2 GELU to float32 rounding, and with the
// exact GELU within 5e-7 over [-12, 12] (PyTorch's AVX-512 GELU: 1e-6).
template <typename V>
DAT_SMT_CPU_INLINE V gelu(V x) {
  const V z = x * splat<V>(0.70710678118654752f);
  const V a = z < 0.0f ? -z : z;
  const V t = splat<V>(1.0f) / (splat<V>(0.3275911f) * a + splat<V>(1.0f));
  V r = splat<V>(1.061405429f) * t + splat<V>(-1.453152027f);
  r = r * t + splat<V>(1.421413741f);
  r = r * t + splat<V>(-0.284496736f);
  r = r * t + splat<V>(0.254829592f);
  const V erf_a = splat<V>(1.0f) - r * t * exp_nonpositive(-(z * z));
  return splat<V>(0.5f) * x * (splat<V>(1.0f) + (z < 0.0f ? -erf_a : erf_a));
}
#else
template <int kWidth>
struct FloatLanes {
  float lane[kWidth];
  float operator[](int i) const { return lane[i]; }
};
typedef FloatLanes<8> vec8;
typedef FloatLanes<16> vec16;
#define DAT_SMT_LANEWISE(expression)  \
  FloatLanes<kWidth> out;             \
  for (int i = 0; i < kWidth; ++i) {  \
    out.lane[i] = expression;         \
  }                                   \
  return out;
#define DAT_SMT_LANEWISE_FUNCTION(name, expression)                          \
  template <int kWidth>                                                      \
  inline FloatLanes<kWidth> name(FloatLanes<kWidth> a, FloatLanes<kWidth> b) { \
    DAT_SMT_LANEWISE(expression)                                             \
  }
DAT_SMT_LANEWISE_FUNCTION(operator+, a.lane[i] + b.lane[i])
DAT_SMT_LANEWISE_FUNCTION(operator-, a.lane[i] - b.lane[i])
DAT_SMT_LANEWISE_FUNCTION(operator*, a.lane[i] * b.lane[i])
DAT_SMT_LANEWISE_FUNCTION(max8, std::max(a.lane[i], b.lane[i]))
template <int kWidth>
inline FloatLanes<kWidth>& operator+=(FloatLanes<kWidth>& a, FloatLanes<kWidth> b) { return a = a + b; }
template <int kWidth>
inline FloatLanes<kWidth> exp_nonpositive(FloatLanes<kWidth> x) {
  DAT_SMT_LANEWISE(x.lane[i] < -87.3f ? 0.0f : std::exp(x.lane[i]))
}
template <int kWidth>
inline FloatLanes<kWidth> gelu(FloatLanes<kWidth> x) { DAT_SMT_LANEWISE(gelu_scalar(x.lane[i])) }
#undef DAT_SMT_LANEWISE_FUNCTION
#undef DAT_SMT_LANEWISE
template <typename V>
inline V load(const float* x) {
  V out;
  std::copy(x, x + kLanesOf<V>, out.lane);
  return out;
}
template <typename V>
inline void store(float* y, V v) { std::copy(std::begin(v.lane), std::end(v.lane), y); }
template <typename V>
inline V splat(float a) {
  V out;
  std::fill(std::begin(out.lane), std::end(out.lane), a);
  return out;
}
#endif

// GELU of n values in place, 16 lanes at a time (AVX-512 halves its cost against 8).
DAT_SMT_CPU_INLINE void gelu_in_place(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + kLanesOf<vec16> <= n; i += kLanesOf<vec16>) {
    store(x + i, gelu(load<vec16>(x + i)));
  }
  for (; i + kLanes <= n; i += kLanes) {
    store(x + i, gelu(load<vec8>(x + i)));
  }
  for (; i < n; ++i) {
    x[i] = gelu_scalar(x[i]);
  }
}

DAT_SMT_CPU_INLINE float horizontal_max(vec8 v) {
  float m = v[0];
  for (int lane = 1; lane < kLanes; ++lane) {
    m = std::max(m, v[lane]);
  }
  return m;
}

DAT_SMT_CPU_INLINE float horizontal_sum(vec8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

DAT_SMT_CPU_INLINE float horizontal_sum(vec16 v) {
  vec8 low, high;
  std::memcpy(&low, &v, sizeof(low));
  std::memcpy(&high, reinterpret_cast<const char*>(&v) + sizeof(low), sizeof(high));
  return horizontal_sum(low + high);
}

// Softmax numerators of a row of logits, `vectors` whole vectors, in place: exp(logit - the row's maximum), where
// lane_maxima are the lane-wise maxima of the row's vectors. Returns their sum. Padding lanes set to -inf become 0.
DAT_SMT_CPU_INLINE float exponentiate_in_place(float* row, int64_t vectors, vec8 lane_maxima) {
  const vec8 row_max = splat<vec8>(horizontal_max(lane_maxima));
  vec8 total{};
  for (int64_t c = 0; c < vectors; ++c) {
    const vec8 e = exp_nonpositive(load<vec8>(row + c * kLanes) - row_max);
    store(row + c * kLanes, e);
    total += e;
  }
  return horizontal_sum(total);
}

}  // namespace dat_smt
