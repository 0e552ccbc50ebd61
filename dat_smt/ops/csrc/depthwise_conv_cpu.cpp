// CPU inference kernel of a 'same'-padded depthwise conv (odd square kernel, stride 1) on channels-last maps,
// optionally followed by exact GELU: DAT++'s and SMT's MLP convs and DAT++'s local perception units (see
// dat_smt/ops/depthwise.py, whose PyTorch formulation serves autograd and other layouts and devices).
//
// One pass over the map: each output row is computed from the k input rows around it, with the bias, and the
// activation applied while the row is in cache, where a conv and then an activation would each sweep the (often 4x
// expanded) map through memory. Vectors run along the channels, which are contiguous: 16 lanes, one AVX-512
// register (two AVX2 ones). Rows above and below the map read a row of zeros, columns past its sides are skipped.
// Parallel over output rows; results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_channel_row.h"
#include "cpu_vectors.h"

namespace dat_smt {
namespace {

// A group of channels is two 16-lane vectors (one AVX-512 register each, two AVX2 ones): their accumulators are
// independent FMA chains.
constexpr int kGroupVectors = 2;
constexpr int64_t kGroupChannels = kGroupVectors * kLanesOf<vec16>;

struct ConvSizes {
  int64_t batch, height, width, channels, kernel;
  bool gelu;
};

// Width of the channel group that starts at channel c: whole groups, then single vectors, then single channels.
DAT_SMT_CPU_INLINE int64_t group_width(int64_t c, int64_t channels) {
  return c + kGroupChannels <= channels ? kGroupChannels : (c + kLanes <= channels ? kLanes : 1);
}

// Output pixel x of one row, kVectors vectors V of channels from c on. `rows[ky]` is input row y + ky - kernel / 2, or
// a row of zeros outside the map; `taps` are the group's (k * k, kVectors * lanes) taps. kChecked skips the taps past
// the left or right edge. kKernel > 0 fixes the kernel size at compile time (3, the size of these networks), so the
// tap loops unroll.
template <typename V, int kKernel, int kVectors, bool kChecked>
DAT_SMT_CPU_INLINE void convolve_pixel(const float* const* rows, const float* taps, const float* bias, float* out,
                                       int64_t x, int64_t c, const ConvSizes& sz) {
  const int64_t k = kKernel > 0 ? kKernel : sz.kernel, radius = k / 2, channels = sz.channels;
  const int64_t kx_begin = kChecked ? std::max<int64_t>(0, radius - x) : 0;
  const int64_t kx_end = kChecked ? std::min<int64_t>(k, sz.width + radius - x) : k;
  constexpr int64_t lanes = kLanesOf<V>;
  V acc[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    acc[v] = load<V>(bias + c + v * lanes);
  }
  for (int64_t ky = 0; ky < k; ++ky) {
    for (int64_t kx = kx_begin; kx < kx_end; ++kx) {
      const float* tap = taps + (ky * k + kx) * kVectors * lanes;
      const float* input = rows[ky] + (x - radius + kx) * channels + c;
      for (int v = 0; v < kVectors; ++v) {
        acc[v] += load<V>(tap + v * lanes) * load<V>(input + v * lanes);
      }
    }
  }
  for (int v = 0; v < kVectors; ++v) {
    store(out + x * channels + c + v * lanes, acc[v]);
  }
}

DAT_SMT_CPU_INLINE void convolve_pixel_scalar(const float* const* rows, const float* taps, const float* bias,
                                              float* out, int64_t x, int64_t c, const ConvSizes& sz) {
  const int64_t k = sz.kernel, radius = k / 2, channels = sz.channels;
  const int64_t kx_begin = std::max<int64_t>(0, radius - x), kx_end = std::min<int64_t>(k, sz.width + radius - x);
  float acc = bias[c];
  for (int64_t ky = 0; ky < k; ++ky) {
    for (int64_t kx = kx_begin; kx < kx_end; ++kx) {
      acc += taps[ky * k + kx] * rows[ky][(x - radius + kx) * channels + c];
    }
  }
  out[x * channels + c] = acc;
}

// Output pixel x of the channel group of `width` channels from c on (see group_width), whose taps are group_taps.
template <int kKernel, bool kChecked>
DAT_SMT_CPU_INLINE void convolve_group_pixel(const float* const* rows, const float* group_taps, const float* bias,
                                             float* out, int64_t x, int64_t c, int64_t width, const ConvSizes& sz) {
  if (width == kGroupChannels) {
    convolve_pixel<vec16, kKernel, kGroupVectors, kChecked>(rows, group_taps, bias, out, x, c, sz);
  } else if (width == kLanes) {
    convolve_pixel<vec8, kKernel, 1, kChecked>(rows, group_taps, bias, out, x, c, sz);
  } else {
    convolve_pixel_scalar(rows, group_taps, bias, out, x, c, sz);
  }
}

// Pixels outer, channels inner: consecutive loads walk along the channels of a few rows, where channels outer would
// step through the rows a whole pixel at a time (convolve_rows says where channels outer wins nonetheless).
template <int kKernel, bool kChecked>
DAT_SMT_CPU_INLINE void convolve_pixel_channels(const float* const* rows, const float* taps, const float* bias,
                                                float* out, int64_t x, const ConvSizes& sz) {
  const int64_t taps_per_channel = sz.kernel * sz.kernel;
  for (int64_t c = 0, width; c < sz.channels; c += width) {
    width = group_width(c, sz.channels);
    convolve_group_pixel<kKernel, kChecked>(rows, taps + c * taps_per_channel, bias, out, x, c, width, sz);
  }
}

template <int kKernel>
DAT_SMT_CPU_INLINE void convolve_row(const float* const* rows, const float* taps, const float* bias, float* out,
                                     const ConvSizes& sz) {
  const int64_t radius = sz.kernel / 2, edge = std::min(radius, sz.width);
  const int64_t interior_end = std::max(edge, sz.width - radius);
  for (int64_t x = 0; x < edge; ++x) {
    convolve_pixel_channels<kKernel, true>(rows, taps, bias, out, x, sz);
  }
  for (int64_t x = edge; x < interior_end; ++x) {
    convolve_pixel_channels<kKernel, false>(rows, taps, bias, out, x, sz);
  }
  for (int64_t x = interior_end; x < sz.width; ++x) {
    convolve_pixel_channels<kKernel, true>(rows, taps, bias, out, x, sz);
  }
}

// One output row of a 3x3 conv, one vector of channels from c on, in a whole group whose packed taps (kGroupChannels
// apart) start at taps: the 9 taps stay in registers and the 3x3 input window slides along the row in registers, so
// each input vector is loaded once rather than once per tap (columns past the sides are zero vectors, which add
// nothing).
template <typename V>
DAT_SMT_CPU_INLINE void slide_vector3(const float* const* rows, const float* taps, const float* bias, float* out,
                                      int64_t c, const ConvSizes& sz) {
  const int64_t channels = sz.channels;
  V tap[9], left[3] = {}, middle[3], right[3];
  for (int i = 0; i < 9; ++i) {
    tap[i] = load<V>(taps + i * kGroupChannels);
  }
  for (int ky = 0; ky < 3; ++ky) {
    middle[ky] = load<V>(rows[ky] + c);
  }
  const V bias_vector = load<V>(bias + c);
  for (int64_t x = 0; x < sz.width; ++x) {
    const bool inside = x + 1 < sz.width;
    V acc = bias_vector;
    for (int ky = 0; ky < 3; ++ky) {
      right[ky] = inside ? load<V>(rows[ky] + (x + 1) * channels + c) : V{};
      acc += tap[3 * ky] * left[ky];
      acc += tap[3 * ky + 1] * middle[ky];
      acc += tap[3 * ky + 2] * right[ky];
      left[ky] = middle[ky];
      middle[ky] = right[ky];
    }
    store(out + x * channels + c, acc);
  }
}

// A 3x3 conv's output row with channels outer: whole groups slide vector by vector, the narrower groups at the end
// go pixel by pixel.
DAT_SMT_CPU_INLINE void slide_row3(const float* const* rows, const float* taps, const float* bias, float* out,
                                   const ConvSizes& sz) {
  for (int64_t c = 0, width; c < sz.channels; c += width) {
    width = group_width(c, sz.channels);
    const float* group_taps = taps + c * 9;
    if (width == kGroupChannels) {
      for (int v = 0; v < kGroupVectors; ++v) {
        slide_vector3<vec16>(rows, group_taps + v * kLanesOf<vec16>, bias, out, c + v * kLanesOf<vec16>, sz);
      }
    } else {
      for (int64_t x = 0; x < sz.width; ++x) {
        convolve_group_pixel<3, true>(rows, group_taps, bias, out, x, c, width, sz);
      }
    }
  }
}

// Pixels outer keeps one pixel's taps and input window, k * k * 2 floats per channel, in the L1 cache while its
// channels are walked. Past the 48 KB of an AVX-512 Xeon's L1 cache (1024 channels at 3x3, the widest MLP maps of
// DAT++ and SMT) they are reloaded from L2 on every pixel, and channels outer with the window in registers wins by
// 20-35%; below it pixels outer wins by up to a third, as channels outer strides through the rows where pixels
// outer streams them. (CPUs with a 32 KB L1 cache may gain from channels outer at 512 channels too; not measured.)
constexpr int64_t kL1Bytes = 48 << 10;

DAT_SMT_CPU_MULTIVERSION void convolve_rows(const float* input, const float* taps, const float* bias, float* out,
                                            const ConvSizes& sz, int64_t begin, int64_t end) {
  const int64_t k = sz.kernel, radius = k / 2, row_size = sz.width * sz.channels;
  const bool slide = k == 3 && 2 * k * k * sz.channels * static_cast<int64_t>(sizeof(float)) > kL1Bytes;
  const std::vector<float> zeros(row_size, 0.0f);
  std::vector<const float*> rows(k);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / sz.height, y = row % sz.height;
    for (int64_t ky = 0; ky < k; ++ky) {
      const int64_t source = y + ky - radius;
      rows[ky] = source >= 0 && source < sz.height ? input + (b * sz.height + source) * row_size : zeros.data();
    }
    float* out_row = out + row * row_size;
    if (slide) {
      slide_row3(rows.data(), taps, bias, out_row, sz);
    } else if (k == 3) {
      convolve_row<3>(rows.data(), taps, bias, out_row, sz);
    } else {
      convolve_row<0>(rows.data(), taps, bias, out_row, sz);
    }
    if (sz.gelu) {
      gelu_in_place(out_row, row_size);
    }
  }
}

// The (C, 1, k, k) weight with each channel group's taps together, (k * k, group width) from channel c * k * k on:
// a group then reads one small block instead of k * k rows of a (k * k, C) table, which for the wide maps lie a
// multiple of 4 KB apart, all in one L1 cache set.
at::Tensor pack_taps(const at::Tensor& weight) {
  const int64_t channels = weight.size(0), taps_per_channel = weight.size(2) * weight.size(3);
  const at::Tensor table = weight.reshape({channels, taps_per_channel}).contiguous();
  at::Tensor packed = at::empty({channels * taps_per_channel}, weight.options());
  const float* source = table.data_ptr<float>();
  float* target = packed.data_ptr<float>();
  for (int64_t c = 0; c < channels;) {
    const int64_t width = group_width(c, channels);
    for (int64_t tap = 0; tap < taps_per_channel; ++tap) {
      for (int64_t lane = 0; lane < width; ++lane) {
        target[c * taps_per_channel + tap * width + lane] = source[(c + lane) * taps_per_channel + tap];
      }
    }
    c += width;
  }
  return packed;
}

at::Tensor depthwise_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias, bool gelu) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "x must be a channels-last (B, C, H, W) map, got sizes ", x.sizes(), " and strides ", x.strides());
  const int64_t channels = x.size(1), kernel = weight.size(-1);
  TORCH_CHECK(weight.sizes() == at::IntArrayRef({channels, 1, kernel, kernel}) && kernel % 2 == 1,
              "weight must be (", channels, ", 1, k, k) with k odd, got ", weight.sizes());
  TORCH_CHECK(!bias.has_value() || bias->sizes() == at::IntArrayRef({channels}), "bias must be (", channels,
              "), got ", bias.has_value() ? bias->sizes() : at::IntArrayRef{});
  for (const at::Tensor* t : {&x, &weight, bias.has_value() ? &*bias : &weight}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "expected float32 CPU tensors, got ",
                t->scalar_type(), " on ", t->device());
  }
  const at::Tensor taps = pack_taps(weight);
  const at::Tensor bias_values =
      bias.has_value() ? bias->contiguous() : at::zeros({channels}, weight.options());
  at::Tensor out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  const ConvSizes sz{x.size(0), x.size(2), x.size(3), channels, kernel, gelu};
  const float* input = x.data_ptr<float>();
  const float* taps_data = taps.data_ptr<float>();
  const float* bias_data = bias_values.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, sz.batch * sz.height, 1, [&](int64_t begin, int64_t end) {
    convolve_rows(input, taps_data, bias_data, out_data, sz, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dat_smt_ext, CPU, m) {
  m.impl("depthwise_conv2d_forward", &depthwise_conv2d_forward_cpu);
}

}  // namespace dat_smt
