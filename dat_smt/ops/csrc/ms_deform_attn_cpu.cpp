// CPU kernels of multi-scale deformable attention.
//
// value is (N, S, M, D): the D channels of one head at one position are contiguous, so every bilinear corner is
// an axpy / dot product over D contiguous elements held in vector registers. Corners outside the map and points
// outside it are skipped before any channel work. float16/bfloat16 inputs are computed in float32.
//
// Forward: parallel over (n, query, head) items; each item owns its D outputs.
// Backward: parallel over (n, head) tasks; a task owns grad_value[n, :, m, :] as well as the location / weight
// gradients of its (n, *, m) entries and walks the queries in a fixed order, so there are no atomics and the
// result is bit-identical run to run whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#include <tuple>
#include <vector>

#include "cpu_channel_row.h"
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

// Output rows [begin, end) of the (n, query, head) items.
template <typename scalar_t, int64_t kChannels>
DAT_SMT_CPU_INLINE void forward_items(const scalar_t* value, const LevelTable& levels, const scalar_t* locations,
                                      const scalar_t* weights, scalar_t* output, const MsdaSizes& sz, int64_t begin,
                                      int64_t end) {
  const int64_t stride = sz.heads * sz.channels;
  const int64_t samples = sz.levels * sz.points;
  ChannelRow<scalar_t, kChannels> accumulator(sz.channels);
  for (int64_t item = begin; item < end; ++item) {
    const int64_t head = item % sz.heads;
    const int64_t batch = item / (sz.queries * sz.heads);
    const scalar_t* value_nm = value + batch * sz.positions * stride + head * sz.channels;
    const scalar_t* location = locations + item * samples * 2;
    const scalar_t* weight = weights + item * samples;
    accumulator.zero();
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
            accumulator.add_scaled(value_level + point.index[corner] * stride, *weight * point.weight[corner]);
          }
        }
      }
    }
    accumulator.store(output + item * sz.channels);
  }
}

// All queries of the (n, head) tasks [begin, end).
template <typename scalar_t, int64_t kChannels>
DAT_SMT_CPU_INLINE void backward_tasks(const scalar_t* value, const LevelTable& levels, const scalar_t* locations,
                                       const scalar_t* weights, const scalar_t* grad_output, scalar_t* grad_value,
                                       scalar_t* grad_locations, scalar_t* grad_weights, const MsdaSizes& sz,
                                       int64_t begin, int64_t end) {
  const int64_t stride = sz.heads * sz.channels;
  const int64_t samples = sz.levels * sz.points;
  ChannelRow<scalar_t, kChannels> grad_out(sz.channels);
  // [begin, end) is a range of flattened (n, head) tasks; per batch, walk the queries once and visit this range's
  // heads of each query (better locality than one pass per head). Every grad_value element still receives its
  // contributions in query order, whatever the split, so results do not depend on the thread count.
  for (int64_t batch_head = begin; batch_head < end;) {
    const int64_t batch = batch_head / sz.heads;
    const int64_t head_begin = batch_head % sz.heads;
    const int64_t head_end = std::min(sz.heads, head_begin + (end - batch_head));
    batch_head += head_end - head_begin;
    for (int64_t query = 0; query < sz.queries; ++query) {
      for (int64_t head = head_begin; head < head_end; ++head) {
        const int64_t value_offset = batch * sz.positions * stride + head * sz.channels;
        const int64_t item = (batch * sz.queries + query) * sz.heads + head;
        grad_out.load(grad_output + item * sz.channels);
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
                corner_dot[corner] = grad_out.dot(value + offset);
                grad_out.scaled_add_to(grad_value + offset, *weight * point.weight[corner]);
              }
            }
            bilinear_point_backward(point, corner_dot, *weight, height, width, *grad_weight, grad_location[0],
                                    grad_location[1]);
          }
        }
      }
    }
  }
}

// Non-template entry points carry the multiversioning attribute; the channel count is dispatched inside.
#define MSDA_DISPATCH_CHANNELS(CHANNELS, FUNCTION, SCALAR, ...) \
  switch (CHANNELS) {                                          \
    case 8: FUNCTION<SCALAR, 8>(__VA_ARGS__); break;           \
    case 16: FUNCTION<SCALAR, 16>(__VA_ARGS__); break;         \
    case 32: FUNCTION<SCALAR, 32>(__VA_ARGS__); break;         \
    case 64: FUNCTION<SCALAR, 64>(__VA_ARGS__); break;         \
    default: FUNCTION<SCALAR, 0>(__VA_ARGS__); break;          \
  }

#define MSDA_DEFINE_ENTRY_POINTS(SCALAR)                                                                        \
  DAT_SMT_CPU_MULTIVERSION void forward_range(const SCALAR* value, const LevelTable& levels,                    \
                                              const SCALAR* locations, const SCALAR* weights, SCALAR* output,   \
                                              const MsdaSizes& sz, int64_t begin, int64_t end) {                \
    MSDA_DISPATCH_CHANNELS(sz.channels, forward_items, SCALAR, value, levels, locations, weights, output, sz,   \
                           begin, end)                                                                          \
  }                                                                                                             \
  DAT_SMT_CPU_MULTIVERSION void backward_range(const SCALAR* value, const LevelTable& levels,                   \
                                               const SCALAR* locations, const SCALAR* weights,                  \
                                               const SCALAR* grad_output, SCALAR* grad_value,                   \
                                               SCALAR* grad_locations, SCALAR* grad_weights,                    \
                                               const MsdaSizes& sz, int64_t begin, int64_t end) {               \
    MSDA_DISPATCH_CHANNELS(sz.channels, backward_tasks, SCALAR, value, levels, locations, weights, grad_output, \
                           grad_value, grad_locations, grad_weights, sz, begin, end)                            \
  }

MSDA_DEFINE_ENTRY_POINTS(float)
MSDA_DEFINE_ENTRY_POINTS(double)

// Runs fn(begin, end) over [0, count) in chunks that the threads take from a shared counter rather than one static
// slice each, so a thread that loses its core (shared machines) does not hold up the others. Callers only use
// it where the split cannot change results.
template <typename Function>
void parallel_chunks(int64_t count, int64_t chunk, const Function& fn) {
  const int64_t chunks = (count + chunk - 1) / chunk;
  std::atomic<int64_t> next_chunk{0};
  at::parallel_for(0, std::min<int64_t>(chunks, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    for (int64_t index = next_chunk.fetch_add(1); index < chunks; index = next_chunk.fetch_add(1)) {
      fn(index * chunk, std::min(count, (index + 1) * chunk));
    }
  });
}

template <typename scalar_t>
void forward_kernel(const scalar_t* value, const LevelTable& levels, const scalar_t* locations,
                    const scalar_t* weights, scalar_t* output, const MsdaSizes& sz) {
  const int64_t items = sz.batch * sz.queries * sz.heads;
  const int64_t work_per_item = std::max<int64_t>(1, sz.levels * sz.points * sz.channels);
  // Items are independent, so the split never changes results.
  parallel_chunks(items, std::max<int64_t>(1, 65536 / work_per_item), [&](int64_t begin, int64_t end) {
    forward_range(value, levels, locations, weights, output, sz, begin, end);
  });
}

template <typename scalar_t>
void backward_kernel(const scalar_t* value, const LevelTable& levels, const scalar_t* locations,
                     const scalar_t* weights, const scalar_t* grad_output, scalar_t* grad_value,
                     scalar_t* grad_locations, scalar_t* grad_weights, const MsdaSizes& sz) {
  // Chunks of a few (n, head) tasks: each grad_value element belongs to one task and receives its contributions
  // in query order, so neither the chunking nor the thread that runs a chunk changes the result.
  const int64_t tasks = sz.batch * sz.heads;
  const int64_t chunk = std::max<int64_t>(1, tasks / (2 * std::max(1, at::get_num_threads())));
  parallel_chunks(tasks, chunk, [&](int64_t begin, int64_t end) {
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
