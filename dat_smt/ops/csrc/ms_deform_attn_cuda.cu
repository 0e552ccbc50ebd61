// CUDA kernels of multi-scale deformable attention.
//
// One warp per (n, query, head): lanes stride over the D channels, so loads of a corner's channel vector are
// coalesced. The bilinear math comes from ms_deform_sampling.h (shared with the CPU kernel). Backward: each
// lane accumulates its channels' contributions to the four corner dot products, a warp reduction finishes them
// and lane 0 writes the location / weight gradients (owned by this warp, no atomics); grad_value is scattered
// with atomics into an accumulator of the compute type (float for half/bfloat16, cast back at the end).
// All indices are 64-bit and the launch path never reads device memory on the host.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <tuple>

#include "ms_deform_attn.h"
#include "ms_deform_sampling.h"

namespace dat_smt {
namespace {

constexpr int kWarp = 32;
constexpr int kThreads = 256;

struct KernelSizes {
  int64_t positions, heads, channels, queries, levels, points, items;
};

KernelSizes kernel_sizes(const MsdaSizes& sz) {
  return {sz.positions, sz.heads, sz.channels, sz.queries, sz.levels, sz.points, sz.batch * sz.queries * sz.heads};
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                               const int64_t* __restrict__ level_start_index,
                               const scalar_t* __restrict__ locations, const scalar_t* __restrict__ weights,
                               scalar_t* __restrict__ output, KernelSizes sz) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = thread / kWarp;  // (n, query, head), uniform across the warp
  const int lane = static_cast<int>(thread % kWarp);
  if (item >= sz.items) {
    return;
  }
  const int64_t head = item % sz.heads;
  const int64_t batch = item / (sz.queries * sz.heads);
  const int64_t stride = sz.heads * sz.channels;
  const int64_t samples = sz.levels * sz.points;
  const scalar_t* value_nm = value + batch * sz.positions * stride + head * sz.channels;
  for (int64_t channel = lane; channel < sz.channels; channel += kWarp) {
    const scalar_t* location = locations + item * samples * 2;
    const scalar_t* weight = weights + item * samples;
    acc_t accumulator = 0;
    for (int64_t level = 0; level < sz.levels; ++level) {
      const int64_t height = spatial_shapes[2 * level];
      const int64_t width = spatial_shapes[2 * level + 1];
      const scalar_t* channel_base = value_nm + level_start_index[level] * stride + channel;
      for (int64_t point_id = 0; point_id < sz.points; ++point_id, location += 2, ++weight) {
        BilinearPoint<acc_t> point;
        if (bilinear_point(static_cast<acc_t>(location[0]), static_cast<acc_t>(location[1]), height, width,
                           point)) {
          accumulator += static_cast<acc_t>(*weight) * bilinear_sample(channel_base, stride, point);
        }
      }
    }
    output[item * sz.channels + channel] = static_cast<scalar_t>(accumulator);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(0xffffffffu, v, offset);
  }
  return v;
}

template <typename scalar_t, typename acc_t>
__global__ void backward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ spatial_shapes,
                                const int64_t* __restrict__ level_start_index,
                                const scalar_t* __restrict__ locations, const scalar_t* __restrict__ weights,
                                const scalar_t* __restrict__ grad_output, acc_t* __restrict__ grad_value,
                                scalar_t* __restrict__ grad_locations, scalar_t* __restrict__ grad_weights,
                                KernelSizes sz) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t item = thread / kWarp;
  const int lane = static_cast<int>(thread % kWarp);
  if (item >= sz.items) {
    return;  // whole warps exit together: the shuffles below always see 32 active lanes
  }
  const int64_t head = item % sz.heads;
  const int64_t batch = item / (sz.queries * sz.heads);
  const int64_t stride = sz.heads * sz.channels;
  const int64_t samples = sz.levels * sz.points;
  const int64_t value_offset = batch * sz.positions * stride + head * sz.channels;
  const scalar_t* grad_out = grad_output + item * sz.channels;
  for (int64_t level = 0; level < sz.levels; ++level) {
    const int64_t height = spatial_shapes[2 * level];
    const int64_t width = spatial_shapes[2 * level + 1];
    const int64_t level_offset = value_offset + level_start_index[level] * stride;
    for (int64_t point_id = 0; point_id < sz.points; ++point_id) {
      const int64_t sample = item * samples + level * sz.points + point_id;
      BilinearPoint<acc_t> point;
      if (!bilinear_point(static_cast<acc_t>(locations[2 * sample]), static_cast<acc_t>(locations[2 * sample + 1]),
                          height, width, point)) {
        continue;  // uniform across the warp; gradients stay zero
      }
      const acc_t weight = static_cast<acc_t>(weights[sample]);
      acc_t corner_dot[4] = {0, 0, 0, 0};
      for (int64_t channel = lane; channel < sz.channels; channel += kWarp) {
        const acc_t grad = static_cast<acc_t>(grad_out[channel]);
#pragma unroll
        for (int corner = 0; corner < 4; ++corner) {
          if (point.index[corner] >= 0) {
            const int64_t offset = level_offset + point.index[corner] * stride + channel;
            corner_dot[corner] += grad * static_cast<acc_t>(value[offset]);
            gpuAtomicAdd(grad_value + offset, weight * point.weight[corner] * grad);
          }
        }
      }
#pragma unroll
      for (int corner = 0; corner < 4; ++corner) {
        corner_dot[corner] = warp_sum(corner_dot[corner]);
      }
      if (lane == 0) {
        acc_t grad_weight, grad_x, grad_y;
        bilinear_point_backward(point, corner_dot, weight, height, width, grad_weight, grad_x, grad_y);
        grad_weights[sample] = static_cast<scalar_t>(grad_weight);
        grad_locations[2 * sample] = static_cast<scalar_t>(grad_x);
        grad_locations[2 * sample + 1] = static_cast<scalar_t>(grad_y);
      }
    }
  }
}

unsigned int num_blocks(int64_t items) {
  const int64_t blocks = (items * kWarp + kThreads - 1) / kThreads;
  TORCH_CHECK(blocks <= 0x7fffffff, "MSDA: too many (n, query, head) items for one launch: ", items);
  return static_cast<unsigned int>(blocks);
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights) {
  const MsdaSizes sz =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  const c10::cuda::CUDAGuard guard(value.device());
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  auto output = at::empty({sz.batch, sz.queries, sz.heads * sz.channels}, value.options());
  const KernelSizes ks = kernel_sizes(sz);
  if (ks.items == 0 || sz.channels == 0) {
    return output.zero_();
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t><<<num_blocks(ks.items), kThreads, 0, stream>>>(
        value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(),
        locations_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(), output.data_ptr<scalar_t>(), ks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& value, const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
    const at::Tensor& sampling_locations, const at::Tensor& attention_weights, const at::Tensor& grad_output) {
  const MsdaSizes sz =
      check_msda_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention_weights);
  TORCH_CHECK(grad_output.numel() == sz.batch * sz.queries * sz.heads * sz.channels,
              "grad_output must be (N, Lq, M * D), got ", grad_output.sizes());
  const c10::cuda::CUDAGuard guard(value.device());
  const auto value_c = value.contiguous();
  const auto shapes_c = spatial_shapes.contiguous();
  const auto starts_c = level_start_index.contiguous();
  const auto locations_c = sampling_locations.contiguous();
  const auto weights_c = attention_weights.contiguous();
  const auto grad_output_c = grad_output.to(value.scalar_type()).contiguous();
  const auto compute_type = at::toOpMathType(value.scalar_type());
  auto grad_value = at::zeros(value.sizes(), value.options().dtype(compute_type));
  auto grad_locations = at::zeros_like(locations_c);
  auto grad_weights = at::zeros_like(weights_c);
  const KernelSizes ks = kernel_sizes(sz);
  if (ks.items > 0 && sz.channels > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, value.scalar_type(), "ms_deform_attn_backward_cuda", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          backward_kernel<scalar_t, acc_t><<<num_blocks(ks.items), kThreads, 0, stream>>>(
              value_c.data_ptr<scalar_t>(), shapes_c.data_ptr<int64_t>(), starts_c.data_ptr<int64_t>(),
              locations_c.data_ptr<scalar_t>(), weights_c.data_ptr<scalar_t>(), grad_output_c.data_ptr<scalar_t>(),
              grad_value.data_ptr<acc_t>(), grad_locations.data_ptr<scalar_t>(), grad_weights.data_ptr<scalar_t>(),
              ks);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
  return {grad_value.to(value.scalar_type()), grad_locations, grad_weights};
}

}  // namespace

TORCH_LIBRARY_IMPL(dat_smt_ext, CUDA, m) {
  m.impl("ms_deform_attn_forward", &ms_deform_attn_forward_cuda);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cuda);
}

}  // namespace dat_smt
