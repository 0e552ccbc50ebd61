// Schemas of the extension operators; the CPU and CUDA files register their kernels for them. The public,
// autograd-aware operator dat_smt::ms_deform_attn is defined in Python on top of the first two;
// neighborhood_attention_forward, window_attention_forward, depthwise_conv2d_forward and layer_norm_forward (CPU
// only) are the inference paths of dat_smt.ops.neighborhood_attention_2d, of DAT's window attention, of
// dat_smt.ops.depthwise_conv2d and of dat_smt.ops.layer_norm.
#include <torch/library.h>

TORCH_LIBRARY(dat_smt_ext, m) {
  m.def(
      "ms_deform_attn_forward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, Tensor grad_output) -> (Tensor, Tensor, Tensor)");
  m.def(
      "neighborhood_attention_forward(Tensor q, Tensor k, Tensor v, Tensor rpb, int kernel_size, float scale) "
      "-> Tensor");
  m.def("window_attention_forward(Tensor qkv, Tensor bias, int window_size, int shift, int heads, float scale) "
        "-> Tensor");
  m.def("depthwise_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, bool gelu) -> Tensor");
  m.def("layer_norm_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> Tensor");
}
