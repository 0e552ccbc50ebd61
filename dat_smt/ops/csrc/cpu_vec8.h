// Eight float lanes for the CPU kernels: a GCC vector (AVX2 or SSE2, depending on the DAT_SMT_CPU_MULTIVERSION
// clone that inlines it), or lane loops for other compilers.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_channel_row.h"

namespace dat_smt {

constexpr int64_t kLanes = 8;

// Exact (erf) GELU of one value: the vector GELU's tail lanes and its lane-loop fallback.
DAT_SMT_CPU_INLINE float gelu_scalar(float x) { return 0.5f * x * (1.0f + std::erf(x * 0.70710678118654752f)); }

#if defined(__GNUC__) && !defined(__clang__)
typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t ivec8 __attribute__((vector_size(32)));
typedef float unaligned_vec8 __attribute__((vector_size(32), aligned(4), may_alias));

DAT_SMT_CPU_INLINE vec8 load8(const float* x) { return *reinterpret_cast<const unaligned_vec8*>(x); }
DAT_SMT_CPU_INLINE void store8(float* y, vec8 v) { *reinterpret_cast<unaligned_vec8*>(y) = v; }
// (a shuffle of lane 0, which GCC turns into one broadcast; an initializer list of eight copies it does not)
DAT_SMT_CPU_INLINE vec8 splat8(float a) { return __builtin_shuffle(vec8{a}, ivec8{}); }
DAT_SMT_CPU_INLINE vec8 max8(vec8 a, vec8 b) { return a > b ? a : b; }

// exp for arguments <= 0, within 2 ulp; below -87.3 (and at -inf) it is 0.
DAT_SMT_CPU_INLINE vec8 exp_nonpositive(vec8 x) {
  const vec8 lowest = splat8(-87.3f);
  const vec8 clamped = x < lowest ? lowest : x;
  // n = round(x / ln 2) through the float mantissa (exact for |n| < 2^22), r = x - n ln 2 in two parts
  const vec8 magic = splat8(12582912.0f);
  const vec8 n = (clamped * splat8(1.44269504088896341f) + magic) - magic;
  const vec8 r = (clamped - n * splat8(0.693359375f)) + n * splat8(2.12194440e-4f);
  vec8 p = splat8(1.9875691500e-4f);
  p = p * r + splat8(1.3981999507e-3f);
  p = p * r + splat8(8.3334519073e-3f);
  p = p * r + splat8(4.1665795894e-2f);
  p = p * r + splat8(1.6666665459e-1f);
  p = p * r + splat8(5.0000001201e-1f);
  p = p * (r * r) + r + splat8(1.0f);
  const ivec8 exponent = (__builtin_convertvector(n, ivec8) + 127) << 23;
  vec8 two_to_n;
  std::memcpy(&two_to_n, &exponent, sizeof(two_to_n));
  return x < lowest ? vec8{} : p * two_to_n;
}

// Exact (erf) GELU, x / 2 * (1 + erf(x / sqrt 2)), with the erf of PyTorch's AVX2 GELU (Abramowitz and Stegun
// 7.1.26, absolute error below 1.5e-7): results agree with that F.gelu to float32 rounding, and with the exact GELU
// within 5e-7 over [-12, 12] (PyTorch's AVX-512 GELU: 1e-6).
DAT_SMT_CPU_INLINE vec8 gelu8(vec8 x) {
  const vec8 z = x * splat8(0.70710678118654752f);
  const vec8 a = z < 0.0f ? -z : z;
  const vec8 t = splat8(1.0f) / (splat8(0.3275911f) * a + splat8(1.0f));
  vec8 r = splat8(1.061405429f) * t + splat8(-1.453152027f);
  r = r * t + splat8(1.421413741f);
  r = r * t + splat8(-0.284496736f);
  r = r * t + splat8(0.254829592f);
  const vec8 erf_a = splat8(1.0f) - r * t * exp_nonpositive(-(z * z));
  return splat8(0.5f) * x * (splat8(1.0f) + (z < 0.0f ? -erf_a : erf_a));
}
#else
struct vec8 {
  float lane[kLanes];
  float operator[](int i) const { return lane[i]; }
};
#define DAT_SMT_LANEWISE(expression) \
  vec8 out;                          \
  for (int i = 0; i < kLanes; ++i) { \
    out.lane[i] = expression;        \
  }                                  \
  return out;
inline vec8 operator+(vec8 a, vec8 b) { DAT_SMT_LANEWISE(a.lane[i] + b.lane[i]) }
inline vec8 operator-(vec8 a, vec8 b) { DAT_SMT_LANEWISE(a.lane[i] - b.lane[i]) }
inline vec8 operator*(vec8 a, vec8 b) { DAT_SMT_LANEWISE(a.lane[i] * b.lane[i]) }
inline vec8& operator+=(vec8& a, vec8 b) { return a = a + b; }
inline vec8 load8(const float* x) { DAT_SMT_LANEWISE(x[i]) }
inline void store8(float* y, vec8 v) { std::copy(v.lane, v.lane + kLanes, y); }
inline vec8 splat8(float a) { DAT_SMT_LANEWISE(a) }
inline vec8 max8(vec8 a, vec8 b) { DAT_SMT_LANEWISE(std::max(a.lane[i], b.lane[i])) }
inline vec8 exp_nonpositive(vec8 x) { DAT_SMT_LANEWISE(x.lane[i] < -87.3f ? 0.0f : std::exp(x.lane[i])) }
inline vec8 gelu8(vec8 x) { DAT_SMT_LANEWISE(gelu_scalar(x.lane[i])) }
#undef DAT_SMT_LANEWISE
#endif

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

// Softmax numerators of a row of logits, `vectors` whole vectors, in place: exp(logit - the row's maximum), where
// lane_maxima are the lane-wise maxima of the row's vectors. Returns their sum. Padding lanes set to -inf become 0.
DAT_SMT_CPU_INLINE float exponentiate_in_place(float* row, int64_t vectors, vec8 lane_maxima) {
  const vec8 row_max = splat8(horizontal_max(lane_maxima));
  vec8 total{};
  for (int64_t c = 0; c < vectors; ++c) {
    const vec8 e = exp_nonpositive(load8(row + c * kLanes) - row_max);
    store8(row + c * kLanes, e);
    total += e;
  }
  return horizontal_sum(total);
}

}  // namespace dat_smt
