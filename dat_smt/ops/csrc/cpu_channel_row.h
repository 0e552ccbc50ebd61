// Shared by the CPU kernels: ISA multiversioning and a row of head channels held in vector registers.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(_MSC_VER)
#define __restrict__ __restrict
#endif

// Hot loops are compiled for AVX-512, for AVX2+FMA and for the baseline ISA, and picked at load time, so the cached
// library stays portable across machines that share a home directory.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define DAT_SMT_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DAT_SMT_CPU_MULTIVERSION
#endif

// Helpers called from a multiversioned entry point must be inlined into it to be compiled for its ISA.
#if defined(__GNUC__)
#define DAT_SMT_CPU_INLINE inline __attribute__((always_inline))
#else
#define DAT_SMT_CPU_INLINE inline
#endif

namespace dat_smt {

// The D channels of one (query, head) row. kChannels > 0 fixes D at compile time (the common head sizes): the
// row is then an array of 32-byte vectors (GCC/Clang vector extensions) that stays in registers and compiles to
// AVX2 or SSE2 depending on the clone. kChannels == 0 handles any D with plain loops. Every reduction runs in a
// fixed order, so results are deterministic.
template <typename scalar_t, int64_t kChannels, typename Enable = void>
class ChannelRow {
 public:
  explicit ChannelRow(int64_t channels) : data_(channels) {}
  DAT_SMT_CPU_INLINE void zero() { std::fill(data_.begin(), data_.end(), scalar_t(0)); }
  DAT_SMT_CPU_INLINE void load(const scalar_t* x) { std::copy(x, x + data_.size(), data_.begin()); }
  DAT_SMT_CPU_INLINE void store(scalar_t* y) const { std::copy(data_.begin(), data_.end(), y); }
  // this += a * x
  DAT_SMT_CPU_INLINE void add_scaled(const scalar_t* __restrict__ x, scalar_t a) {
    const int64_t n = static_cast<int64_t>(data_.size());
    for (int64_t i = 0; i < n; ++i) {
      data_[i] += a * x[i];
    }
  }
  // y += a * this
  DAT_SMT_CPU_INLINE void scaled_add_to(scalar_t* __restrict__ y, scalar_t a) const {
    const int64_t n = static_cast<int64_t>(data_.size());
    for (int64_t i = 0; i < n; ++i) {
      y[i] += a * data_[i];
    }
  }
  DAT_SMT_CPU_INLINE scalar_t dot(const scalar_t* __restrict__ x) const {
    scalar_t partial[4] = {0, 0, 0, 0};
    const int64_t n = static_cast<int64_t>(data_.size());
    for (int64_t i = 0; i < n; ++i) {
      partial[i % 4] += data_[i] * x[i];
    }
    return (partial[0] + partial[1]) + (partial[2] + partial[3]);
  }

 private:
  std::vector<scalar_t> data_;
};

#if defined(__GNUC__)
constexpr int64_t kVectorBytes = 32;
#define DAT_SMT_CPU_UNROLL _Pragma("GCC unroll 16")

template <typename scalar_t, int64_t kChannels>
class ChannelRow<scalar_t, kChannels,
                 std::enable_if_t<(kChannels > 0 && (kChannels * sizeof(scalar_t)) % kVectorBytes == 0)>> {
 public:
  typedef scalar_t vec_t __attribute__((vector_size(kVectorBytes)));
  // The same vector, for unaligned loads and stores from tensor memory.
  typedef scalar_t unaligned_vec_t __attribute__((vector_size(kVectorBytes), aligned(alignof(scalar_t)), may_alias));
  static constexpr int64_t kLanes = kVectorBytes / sizeof(scalar_t);
  static constexpr int64_t kVectors = kChannels / kLanes;

  explicit ChannelRow(int64_t) {}
  DAT_SMT_CPU_INLINE void zero() {
    DAT_SMT_CPU_UNROLL
    for (int64_t v = 0; v < kVectors; ++v) {
      data_[v] = vec_t{};
    }
  }
  DAT_SMT_CPU_INLINE void load(const scalar_t* x) {
    DAT_SMT_CPU_UNROLL
    for (int64_t v = 0; v < kVectors; ++v) {
      data_[v] = load_vector(x + v * kLanes);
    }
  }
  DAT_SMT_CPU_INLINE void store(scalar_t* y) const {
    DAT_SMT_CPU_UNROLL
    for (int64_t v = 0; v < kVectors; ++v) {
      *reinterpret_cast<unaligned_vec_t*>(y + v * kLanes) = data_[v];
    }
  }
  DAT_SMT_CPU_INLINE void add_scaled(const scalar_t* __restrict__ x, scalar_t a) {
    DAT_SMT_CPU_UNROLL
    for (int64_t v = 0; v < kVectors; ++v) {
      data_[v] += a * load_vector(x + v * kLanes);
    }
  }
  DAT_SMT_CPU_INLINE void scaled_add_to(scalar_t* __restrict__ y, scalar_t a) const {
    DAT_SMT_CPU_UNROLL
    for (int64_t v = 0; v < kVectors; ++v) {
      *reinterpret_cast<unaligned_vec_t*>(y + v * kLanes) = load_vector(y + v * kLanes) + a * data_[v];
    }
  }
  DAT_SMT_CPU_INLINE scalar_t dot(const scalar_t* __restrict__ x) const {
    vec_t sum = data_[0] * load_vector(x);
    DAT_SMT_CPU_UNROLL
    for (int64_t v = 1; v < kVectors; ++v) {
      sum += data_[v] * load_vector(x + v * kLanes);
    }
    scalar_t total = 0;
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      total += sum[lane];
    }
    return total;
  }

 private:
  DAT_SMT_CPU_INLINE static vec_t load_vector(const scalar_t* x) {
    return *reinterpret_cast<const unaligned_vec_t*>(x);
  }
  vec_t data_[kVectors];
};
#endif

}  // namespace dat_smt
