// CPU kernels of multi-scale deformable attention.
//
// value is (N, S, M, D): the D channels of one head at one position are contiguous, so every bilinear corner is
// an axpy / dot product over D contiguous elements, which the compiler vectorises. Corners outside the map and
// points outside it are skipped before any channel work.
//
// Forward: parallel over (n, query, head); each item owns its D outputs.
// Backward: parallel over (n, head); each task walks all queries in a fixed order and owns grad_value[n, :, m, :]
// as well as grad_sampling_locations / grad_attention_weights of its (n, *, m) entries, so there are no atomics
// and the result is bit-identical run to run whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "ms_deform_attn.h"
#include "ms_deform_sampling.h"

namespace dat_smt {
namespace {

struct LevelTable {
  std::vector<int64_t> height;
  std::vector<int64_t> width;
  std::vector<int64_t> start;
};

LevelTable read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index, int64_t positions) {
  const auto shapes = spatial_shapes.contiguous();
  const auto starts = level_start_index.contiguous();
  const int64_t* shape_data = shapes.data_ptr<int64_t>();
  const int64_t* start_data = starts.data_ptr<int64_t>();
  const int64_t levels = shapes.size(0);
  LevelTable table;
  int64_t total = 0;
  for (int64_t level = 0; level < levels; ++level) {
    const int64_t height = shape_data[2 * level];
    const int64_t width = shape_data[2 * level + 1];
    const int64_t start = start_data[level];
    TORCH_CHECK(height > 0 && width > 0, "spatial_shapes must be positive, got (", height, ", ", width,
                ") at level ", level);
    TORCH_CHECK(start >= 0 && start + height * width <= positions, "level ", level, " (start ", start, ", ",
                height, "x", width, ") does not fit in value with S = ", positions);
    table.height.push_back(height);
    table.width.push_back(width);
    table.start.push_back(start);
    total += height * width;
  }
  TORCH_CHECK(total == positions, "value has S = ", positions, " positions but spatial_shapes sum to ", total);
  return table;
}

template <typename scalar_t>
inline void axpy(scalar_t* __restrict__ y, const scalar_t* __restrict__ x, scalar_t a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

template <typename scalar_t>
inline scalar_t dot(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n) {
  // Four partial sums let the compiler vectorise without reassociating a single chain; the order is fixed, so
  // results stay deterministic.
  scalar_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += x[i] * y[i];
    s1 += x[i + 1] * y[i + 1];
    s2 += x[i + 2] * y[i + 2];
    s3 += x[i + 3] * y[i + 3];
  }
  for (; i < n; ++i) {
    s0 += x[i] * y[i];
  }
  return (s0 + s1) + (s2 + s3);
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const LevelTable& levels, const scalar_t* locations,
                    const scalar_t* weights, scalar_t* output, const MsdaSizes& sz) {
  const int64_t stride = sz.heads * sz.channels;
  const int64_t samples = sz.levels * sz.points;
  const int64_t items = sz.batch * sz.queries * sz.heads;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, samples * sz.channels));
  at::parallel_for(0, items, grain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> accumulator(sz.channels);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item % sz.heads;
      const int64_t batch = item / (sz.queries * sz.heads);
      const scalar_t* value_nm = value + batch * sz.positions * stride + head * sz.channels;
      const scalar_t* location = locations + item * samples * 2;
      const scalar_t* weight = weights + item * samples;
      std::fill(accumulator.begin(), accumulator.end(), scalar_t(0));
      for (int64_t level = 0; level < sz.levels; ++level) {
        const int64_t height = levels.height[level];
        const int64_t width = levels.width[level];
        const scalar_t* value_level = value_nm + levels.start[level] * stride;
        for (int64_t point_id = 0; point_id < sz.points; ++point_id, location += 2, ++weight) {
          BilinearPoint<scalar_t> point;
          if (!bilinear_point(location[0], location[1], height, width, point)) {
            continue;
          }
          for (int corner = 0; corner < 4; ++corner) {
            if (point.index[corner] >= 0) {
              axpy(accumulator.data(), value_level + point.index[corner] * stride, *weight * point.weight[corner],
                   sz.channels);
            }
          }
        }
      }
      std::copy(accumulator.begin(), accumulator.end(), output + item * sz.channels);
    }
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* value, const LevelTable& levels, const scalar_t* locations,
                     const scalar_t* weights, const scalar_t* grad_output, scalar_t* grad_value,
                     scalar_t* grad_locations, scalar_t* grad_weights, const MsdaSizes& sz) {
  const int64_t stride = sz.heads * sz.channels;
  const int64_t samples = sz.levels * sz.points;
  at::parallel_for(0, sz.batch * sz.heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task % sz.heads;
      const int64_t batch = task / sz.heads;
      const int64_t value_offset = batch * sz.positions * stride + head * sz.channels;
      for (int64_t query = 0; query < sz.queries; ++query) {
        const int64_t item = (batch * sz.queries + query) * sz.heads + head;
        const scalar_t* grad_out = grad_output + item * sz.channels;
        const scalar_t* location = locations + item * samples * 2;
        const scalar_t* weight = weights + item * samples;
        scalar_t* grad_location = grad_locations + item * samples * 2;
        scalar_t* grad_weight = grad_weights + item * samples;
        for (int64_t level = 0; level < sz.levels; ++level) {
          const int64_t height = levels.height[level];
          const int64_t width = levels.width[level];
          const int64_t level_offset = value_offset + levels.start[level] * stride;
          for (int64_t point_id = 0; point_id < sz.points;
               ++point_id, location += 2, grad_location += 2, ++weight, ++grad_weight) {
            BilinearPoint<scalar_t> point;
            if (!bilinear_point(location[0], location[1], height, width, point)) {
              continue;  // gradients stay zero
            }
            scalar_t corner_dot[4] = {0, 0, 0, 0};
            for (int corner = 0; corner < 4; ++corner) {
              if (point.index[corner] >= 0) {
                const int64_t offset = level_offset + point.index[corner] * stride;
                corner_dot[corner] = dot(grad_out, value + offset, sz.channels);
                axpy(grad_value + offset, grad_out, *weight * point.weight[corner], sz.channels);
              }
            }
            bilinear_point_backward(point, corner_dot, *weight, height, width, *grad_weight, grad_location[0],
                                    grad_location[1]);
          }
        }
      }
    }
  });
}

bool needs_upcast(const at::Tensor& tensor) {
  return tensor.scalar_type() == at::kHalf || tensor.scalar_type() == at::kBFloat16;
}

at::Tensor compute_input(const at::Tensor& tensor, bool upcast) {
  return upcast ? tensor.to(at::kFloat).contiguous() : tensor.contiguous();
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights) {
  const MsdaSizes sz =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const LevelTable levels = read_levels(spatial_shapes, level_start_index, sz.positions);
  const bool upcast = needs_upcast(value);
  const auto value_c = compute_input(value, upcast);
  const auto locations_c = compute_input(sampling_locations, upcast);
  const auto weights_c = compute_input(attention_weights, upcast);
  auto output = at::empty({sz.batch, sz.queries, sz.heads * sz.channels}, value_c.options());
  AT_DISPATCH_FLOATING_TYPES(value_c.scalar_type(), "ms_deform_attn_forward_cpu", [&] {
    forward_kernel<scalar_t>(value_c.data_ptr<scalar_t>(), levels, locations_c.data_ptr<scalar_t>(),
                             weights_c.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), sz);
  });
  return upcast ? output.to(value.scalar_type()) : output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const MsdaSizes sz =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.numel() == sz.batch * sz.queries * sz.heads * sz.channels,
              "grad_output must be (N, Lq, M * D), got ", grad_output.sizes());
  const LevelTable levels = read_levels(spatial_shapes, level_start_index, sz.positions);
  const bool upcast = needs_upcast(value);
  const auto value_c = compute_input(value, upcast);
  const auto locations_c = compute_input(sampling_locations, upcast);
  const auto weights_c = compute_input(attention_weights, upcast);
  const auto grad_output_c = grad_output.to(value_c.scalar_type()).contiguous();
  auto grad_value = at::zeros_like(value_c);
  auto grad_locations = at::zeros_like(locations_c);
  auto grad_weights = at::zeros_like(weights_c);
  AT_DISPATCH_FLOATING_TYPES(value_c.scalar_type(), "ms_deform_attn_backward_cpu", [&] {
    backward_kernel<scalar_t>(value_c.data_ptr<scalar_t>(), levels, locations_c.data_ptr<scalar_t>(),
                              weights_c.data_ptr<scalar_t>(), grad_output_c.data_ptr<scalar_t>(),
                              grad_value.data_ptr<scalar_t>(), grad_locations.data_ptr<scalar_t>(),
                              grad_weights.data_ptr<scalar_t>(), sz);
  });
  if (upcast) {
    const auto dtype = value.scalar_type();
    return {grad_value.to(dtype), grad_locations.to(dtype), grad_weights.to(dtype)};
  }
  return {grad_value, grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(dat_smt_ext, CPU, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace dat_smt
