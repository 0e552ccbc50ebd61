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

// Hot loops are compiled twice, for AVX2+FMA and for the baseline ISA, and picked at load time, so the cached
// library stays portable across machines that share a home directory.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MSDA_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MSDA_CPU_MULTIVERSION
#endif

// kChannels > 0 fixes D at compile time (the common head sizes) so accumulators live in registers;
// kChannels == 0 handles any D.
template <typename scalar_t, int64_t kChannels>
struct Channels {
  int64_t runtime;
  inline int64_t count() const { return kChannels > 0 ? kChannels : runtime; }
};

template <typename scalar_t, int64_t kChannels>
inline void axpy(scalar_t* __restrict__ y, const scalar_t* __restrict__ x, scalar_t a, Channels<scalar_t, kChannels> c) {
  const int64_t n = c.count();
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

template <typename scalar_t, int64_t kChannels>
inline scalar_t dot(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, Channels<scalar_t, kChannels> c) {
  // Eight partial sums in a fixed order: vectorisable and still deterministic.
  const int64_t n = c.count();
  scalar_t partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int64_t j = 0; j < 8; ++j) {
      partial[j] += x[i + j] * y[i + j];
    }
  }
  for (; i < n; ++i) {
    partial[0] += x[i] * y[i];
  }
  return ((partial[0] + partial[1]) + (partial[2] + partial[3])) + ((partial[4] + partial[5]) + (partial[6] + partial[7]));
}

// Output rows [begin, end) of the (n, query, head) items.
template <typename scalar_t, int64_t kChannels>
inline void forward_items(const scalar_t* value, const LevelTable& levels, const scalar_t* locations,
                          const scalar_t* weights, scalar_t* output, const MsdaSizes& sz, int64_t begin,
                          int64_t end) {
  const Channels<scalar_t, kChannels> channels{sz.channels};
  const int64_t stride = sz.heads * sz.channels;
  const int64_t samples = sz.levels * sz.points;
  constexpr int64_t kBuffer = kChannels > 0 ? kChannels : 1;
  scalar_t fixed_accumulator[kBuffer];
  std::vector<scalar_t> dynamic_accumulator(kChannels > 0 ? 0 : sz.channels);
  scalar_t* accumulator = kChannels > 0 ? fixed_accumulator : dynamic_accumulator.data();
  for (int64_t item = begin; item < end; ++item) {
    const int64_t head = item % sz.heads;
    const int64_t batch = item / (sz.queries * sz.heads);
    const scalar_t* value_nm = value + batch * sz.positions * stride + head * sz.channels;
    const scalar_t* location = locations + item * samples * 2;
    const scalar_t* weight = weights + item * samples;
    for (int64_t i = 0; i < channels.count(); ++i) {
      accumulator[i] = 0;
    }
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
            axpy(accumulator, value_level + point.index[corner] * stride, *weight * point.weight[corner], channels);
          }
        }
      }
    }
    std::copy(accumulator, accumulator + channels.count(), output + item * sz.channels);
  }
}

// All queries of the (n, head) tasks [begin, end).
template <typename scalar_t, int64_t kChannels>
inline void backward_tasks(const scalar_t* value, const LevelTable& levels, const scalar_t* locations,
                           const scalar_t* weights, const scalar_t* grad_output, scalar_t* grad_value,
                           scalar_t* grad_locations, scalar_t* grad_weights, const MsdaSizes& sz, int64_t begin,
                           int64_t end) {
  const Channels<scalar_t, kChannels> channels{sz.channels};
  const int64_t stride = sz.heads * sz.channels;
  const int64_t samples = sz.levels * sz.points;
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
              corner_dot[corner] = dot(grad_out, value + offset, channels);
              axpy(grad_value + offset, grad_out, *weight * point.weight[corner], channels);
            }
          }
          bilinear_point_backward(point, corner_dot, *weight, height, width, *grad_weight, grad_location[0],
                                  grad_location[1]);
        }
      }
    }
  }
}

// Non-template entry points carry the multiversioning attribute; the channel count is dispatched inside.
#define MSDA_DISPATCH_CHANNELS(CHANNELS, FUNCTION, SCALAR, ...) \
  switch (CHANNELS) {                                          \
    case 16: FUNCTION<SCALAR, 16>(__VA_ARGS__); break;         \
    case 32: FUNCTION<SCALAR, 32>(__VA_ARGS__); break;         \
    case 64: FUNCTION<SCALAR, 64>(__VA_ARGS__); break;         \
    default: FUNCTION<SCALAR, 0>(__VA_ARGS__); break;          \
  }

#define MSDA_DEFINE_ENTRY_POINTS(SCALAR)                                                                         \
  MSDA_CPU_MULTIVERSION void forward_range(const SCALAR* value, const LevelTable& levels,                       \
                                           const SCALAR* locations, const SCALAR* weights, SCALAR* output,     \
                                           const MsdaSizes& sz, int64_t begin, int64_t end) {                  \
    MSDA_DISPATCH_CHANNELS(sz.channels, forward_items, SCALAR, value, levels, locations, weights, output, sz,   \
                           begin, end)                                                                         \
  }                                                                                                            \
  MSDA_CPU_MULTIVERSION void backward_range(const SCALAR* value, const LevelTable& levels,                     \
                                            const SCALAR* locations, const SCALAR* weights,                    \
                                            const SCALAR* grad_output, SCALAR* grad_value,                     \
                                            SCALAR* grad_locations, SCALAR* grad_weights, const MsdaSizes& sz, \
                                            int64_t begin, int64_t end) {                                      \
    MSDA_DISPATCH_CHANNELS(sz.channels, backward_tasks, SCALAR, value, levels, locations, weights, grad_output, \
                           grad_value, grad_locations, grad_weights, sz, begin, end)                           \
  }

MSDA_DEFINE_ENTRY_POINTS(float)
MSDA_DEFINE_ENTRY_POINTS(double)

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const LevelTable& levels, const scalar_t* locations,
                    const scalar_t* weights, scalar_t* output, const MsdaSizes& sz) {
  const int64_t items = sz.batch * sz.queries * sz.heads;
  const int64_t work_per_item = std::max<int64_t>(1, sz.levels * sz.points * sz.channels);
  at::parallel_for(0, items, std::max<int64_t>(1, 16384 / work_per_item), [&](int64_t begin, int64_t end) {
    forward_range(value, levels, locations, weights, output, sz, begin, end);
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* value, const LevelTable& levels, const scalar_t* locations,
                     const scalar_t* weights, const scalar_t* grad_output, scalar_t* grad_value,
                     scalar_t* grad_locations, scalar_t* grad_weights, const MsdaSizes& sz) {
  at::parallel_for(0, sz.batch * sz.heads, 1, [&](int64_t begin, int64_t end) {
    backward_range(value, levels, locations, weights, grad_output, grad_value, grad_locations, grad_weights, sz,
                   begin, end);
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
