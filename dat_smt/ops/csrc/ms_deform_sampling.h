// Bilinear sampling math of multi-scale deformable attention, shared by the CPU and the CUDA kernels.
//
// Everything here is inline and marked host+device under nvcc, so the CPU tests exercise the exact arithmetic
// the GPU runs. Conventions (Deformable DETR): a location (x, y) in [0, 1] maps to the pixel coordinate
// (x * W - 0.5, y * H - 0.5) (pixel centres at half-integers), corners outside the map read as zero, and a point
// with x <= -1, y <= -1, x >= W or y >= H contributes nothing (not even a gradient).
#pragma once

#include <cstdint>
#include <math.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#define MSDA_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define MSDA_HOST_DEVICE inline __attribute__((always_inline))
#define MSDA_UNROLL
#else
#define MSDA_HOST_DEVICE inline
#define MSDA_UNROLL
#endif

namespace dat_smt {

MSDA_HOST_DEVICE float msda_floor(float v) { return floorf(v); }
MSDA_HOST_DEVICE double msda_floor(double v) { return floor(v); }

// One sampling point: its four corners, in the order (y0, x0), (y0, x1), (y1, x0), (y1, x1).
template <typename acc_t>
struct BilinearPoint {
  int64_t index[4];  // row-major spatial index of the corner inside its level, -1 when the corner is outside
  acc_t weight[4];   // bilinear weight of the corner
  acc_t frac_x;      // x - x0
  acc_t frac_y;      // y - y0
};

// Fills `point` for the normalised location (loc_x, loc_y) in a height x width map. Returns false when the point
// lies entirely outside the map and is skipped (forward and backward).
template <typename acc_t>
MSDA_HOST_DEVICE bool bilinear_point(acc_t loc_x, acc_t loc_y, int64_t height, int64_t width,
                                     BilinearPoint<acc_t>& point) {
  const acc_t y = loc_y * static_cast<acc_t>(height) - static_cast<acc_t>(0.5);
  const acc_t x = loc_x * static_cast<acc_t>(width) - static_cast<acc_t>(0.5);
  // Written as a negated conjunction so that NaN locations are skipped too.
  if (!(y > static_cast<acc_t>(-1) && x > static_cast<acc_t>(-1) && y < static_cast<acc_t>(height) &&
        x < static_cast<acc_t>(width))) {
    return false;
  }
  const acc_t y0f = msda_floor(y);
  const acc_t x0f = msda_floor(x);
  const int64_t y0 = static_cast<int64_t>(y0f);
  const int64_t x0 = static_cast<int64_t>(x0f);
  const int64_t y1 = y0 + 1;
  const int64_t x1 = x0 + 1;
  const acc_t fy = y - y0f;
  const acc_t fx = x - x0f;
  const acc_t gy = static_cast<acc_t>(1) - fy;
  const acc_t gx = static_cast<acc_t>(1) - fx;
  const bool row0 = y0 >= 0;
  const bool row1 = y1 <= height - 1;
  const bool col0 = x0 >= 0;
  const bool col1 = x1 <= width - 1;
  point.index[0] = (row0 && col0) ? y0 * width + x0 : -1;
  point.index[1] = (row0 && col1) ? y0 * width + x1 : -1;
  point.index[2] = (row1 && col0) ? y1 * width + x0 : -1;
  point.index[3] = (row1 && col1) ? y1 * width + x1 : -1;
  point.weight[0] = gy * gx;
  point.weight[1] = gy * fx;
  point.weight[2] = fy * gx;
  point.weight[3] = fy * fx;
  point.frac_x = fx;
  point.frac_y = fy;
  return true;
}

// Bilinear sample of one channel. `channel_base` points at the channel in spatial position 0 of the level;
// consecutive spatial positions are `stride` elements apart.
template <typename scalar_t, typename acc_t>
MSDA_HOST_DEVICE acc_t bilinear_sample(const scalar_t* channel_base, int64_t stride,
                                       const BilinearPoint<acc_t>& point) {
  acc_t sample = 0;
MSDA_UNROLL
  for (int corner = 0; corner < 4; ++corner) {
    if (point.index[corner] >= 0) {
      sample += point.weight[corner] * static_cast<acc_t>(channel_base[point.index[corner] * stride]);
    }
  }
  return sample;
}

// Gradients of one (query, head, level, point) sample, given `corner_dot[c]` = sum over channels of
// grad_output * value at corner c (zero for corners outside the map):
//   grad_weight  = d loss / d attention_weight
//   grad_x/y     = d loss / d sampling_location (normalised coordinates, already scaled by W and H)
// The gradient of the value at corner c is attention_weight * point.weight[c] * grad_output (left to the caller).
template <typename acc_t>
MSDA_HOST_DEVICE void bilinear_point_backward(const BilinearPoint<acc_t>& point, const acc_t corner_dot[4],
                                              acc_t attention_weight, int64_t height, int64_t width,
                                              acc_t& grad_weight, acc_t& grad_x, acc_t& grad_y) {
  const acc_t fx = point.frac_x;
  const acc_t fy = point.frac_y;
  const acc_t gx = static_cast<acc_t>(1) - fx;
  const acc_t gy = static_cast<acc_t>(1) - fy;
  grad_weight = point.weight[0] * corner_dot[0] + point.weight[1] * corner_dot[1] +
                point.weight[2] * corner_dot[2] + point.weight[3] * corner_dot[3];
  const acc_t d_dx = gy * (corner_dot[1] - corner_dot[0]) + fy * (corner_dot[3] - corner_dot[2]);
  const acc_t d_dy = gx * (corner_dot[2] - corner_dot[0]) + fx * (corner_dot[3] - corner_dot[1]);
  grad_x = attention_weight * d_dx * static_cast<acc_t>(width);
  grad_y = attention_weight * d_dy * static_cast<acc_t>(height);
}

}  // namespace dat_smt
