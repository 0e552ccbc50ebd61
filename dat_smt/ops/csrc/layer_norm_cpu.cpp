// CPU inference kernel of LayerNorm over the last dimension of a contiguous (rows, C) tensor: the channels-last maps
// and token rows of DAT and SMT, whose 32-512 channels per pixel are short rows on which PyTorch's kernel takes 2-5x
// the time of a copy of the map (see dat_smt/ops/norm.py; PyTorch's LayerNorm serves autograd, other layouts
// and devices).
//
// Each row is read three times while it is in the L1 cache: its mean, its mean squared deviation from that mean (two
// passes, which keep the variance accurate where a single pass of sums and sums of squares would cancel), and the
// normalised, scaled and shifted result. Parallel over rows; results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "cpu_channel_row.h"
#include "cpu_vectors.h"

namespace dat_smt {
namespace {

constexpr int64_t kVectorLanes = kLanesOf<vec16>;

struct RowMoments {
  float mean, inverse_std;
};

DAT_SMT_CPU_INLINE RowMoments row_moments(const float* x, int64_t n, float eps) {
  int64_t i = 0;
  vec16 sums{};
  for (; i + kVectorLanes <= n; i += kVectorLanes) {
    sums += load<vec16>(x + i);
  }
  float sum = horizontal_sum(sums);
  for (; i < n; ++i) {
    sum += x[i];
  }
  const float mean = sum / static_cast<float>(n);
  const vec16 means = splat<vec16>(mean);
  vec16 squares{};
  for (i = 0; i + kVectorLanes <= n; i += kVectorLanes) {
    const vec16 deviation = load<vec16>(x + i) - means;
    squares += deviation * deviation;
  }
  float square_sum = horizontal_sum(squares);
  for (; i < n; ++i) {
    square_sum += (x[i] - mean) * (x[i] - mean);
  }
  return {mean, 1.0f / std::sqrt(square_sum / static_cast<float>(n) + eps)};
}

DAT_SMT_CPU_INLINE void normalize_row(const float* x, const float* weight, const float* bias, float* y, int64_t n,
                                      RowMoments moments) {
  const vec16 means = splat<vec16>(moments.mean), inverse_stds = splat<vec16>(moments.inverse_std);
  int64_t i = 0;
  for (; i + kVectorLanes <= n; i += kVectorLanes) {
    store(y + i, (load<vec16>(x + i) - means) * inverse_stds * load<vec16>(weight + i) + load<vec16>(bias + i));
  }
  for (; i < n; ++i) {
    y[i] = (x[i] - moments.mean) * moments.inverse_std * weight[i] + bias[i];
  }
}

DAT_SMT_CPU_MULTIVERSION void normalize_rows(const float* x, const float* weight, const float* bias, float* y,
                                             int64_t channels, float eps, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    const float* source = x + row * channels;
    normalize_row(source, weight, bias, y + row * channels, channels, row_moments(source, channels, eps));
  }
}

at::Tensor layer_norm_forward_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, double eps) {
  TORCH_CHECK(x.dim() >= 1 && x.is_contiguous() && x.size(-1) > 0,
              "x must be a contiguous tensor with a non-empty last dimension, got sizes ", x.sizes(), " and strides ",
              x.strides());
  const int64_t channels = x.size(-1);
  for (const auto* parameter : {&weight, &bias}) {
    TORCH_CHECK(!parameter->has_value() || (*parameter)->sizes() == at::IntArrayRef({channels}),
                "weight and bias must be (", channels, "), got ",
                parameter->has_value() ? (*parameter)->sizes() : at::IntArrayRef{});
  }
  for (const at::Tensor* t : {&x, weight.has_value() ? &*weight : &x, bias.has_value() ? &*bias : &x}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "expected float32 CPU tensors, got ",
                t->scalar_type(), " on ", t->device());
  }
  const at::Tensor scale = weight.has_value() ? weight->contiguous() : at::ones({channels}, x.options());
  const at::Tensor shift = bias.has_value() ? bias->contiguous() : at::zeros({channels}, x.options());
  at::Tensor out = at::empty_like(x);
  const float* x_data = x.data_ptr<float>();
  const float* scale_data = scale.data_ptr<float>();
  const float* shift_data = shift.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const float epsilon = static_cast<float>(eps);
  // about 64 KB of rows per task
  const int64_t grain = std::max<int64_t>(1, (16 << 10) / channels);
  at::parallel_for(0, x.numel() / channels, grain, [&](int64_t begin, int64_t end) {
    normalize_rows(x_data, scale_data, shift_data, out_data, channels, epsilon, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dat_smt_ext, CPU, m) {
  m.impl("layer_norm_forward", &layer_norm_forward_cpu);
}

}  // namespace dat_smt
