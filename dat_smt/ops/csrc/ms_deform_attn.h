// Host-side declarations shared by the CPU and CUDA implementations of the dat_smt_ext MSDA operators.
#pragma once

#include <ATen/ATen.h>

namespace dat_smt {

// Sizes of one MSDA call, read from the tensor shapes.
struct MsdaSizes {
  int64_t batch;        // N
  int64_t positions;    // S
  int64_t heads;        // M
  int64_t channels;     // D
  int64_t queries;      // Lq
  int64_t levels;       // L
  int64_t points;       // P
};

// Checks ranks, sizes, dtypes and devices (the Python wrapper gives friendlier messages first; these checks
// keep the kernels memory safe when the operator is called directly) and returns the sizes.
inline MsdaSizes check_msda_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, "value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, "spatial_shapes must be (L, 2), got ",
              spatial_shapes.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "sampling_locations must be (N, Lq, M, L, P, 2), got ", sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, "attention_weights must be (N, Lq, M, L, P), got ",
              attention_weights.sizes());
  MsdaSizes sizes{value.size(0), value.size(1), value.size(2), value.size(3), sampling_locations.size(1),
                  spatial_shapes.size(0), sampling_locations.size(4)};
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == sizes.levels,
              "level_start_index must be (L,) with L = ", sizes.levels, ", got ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.size(0) == sizes.batch && sampling_locations.size(2) == sizes.heads &&
                  sampling_locations.size(3) == sizes.levels,
              "sampling_locations ", sampling_locations.sizes(), " does not match value ", value.sizes(),
              " and spatial_shapes ", spatial_shapes.sizes());
  TORCH_CHECK(attention_weights.sizes() == sampling_locations.sizes().slice(0, 5), "attention_weights ",
              attention_weights.sizes(), " must equal sampling_locations.shape[:-1] ", sampling_locations.sizes());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "spatial_shapes and level_start_index must be int64");
  TORCH_CHECK(sampling_locations.scalar_type() == value.scalar_type() &&
                  attention_weights.scalar_type() == value.scalar_type(),
              "value, sampling_locations and attention_weights must share a dtype");
  for (const auto* tensor : {&spatial_shapes, &level_start_index, &sampling_locations, &attention_weights}) {
    TORCH_CHECK(tensor->device() == value.device(), "all MSDA inputs must be on ", value.device());
  }
  return sizes;
}

}  // namespace dat_smt
