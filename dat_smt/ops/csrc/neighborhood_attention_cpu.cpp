// CPU inference kernel of 2-d neighborhood attention with relative position bias (natten 0.14 semantics: each
// query attends to the kernel x kernel keys around it, the window shifted inward at the borders; see
// dat_smt/ops/neighborhood.py, whose PyTorch formulation serves autograd and other devices).
//
// q, k and v are (B, heads, H, W, D) views with unit stride over D (typically of one qkv projection output): every
// (query, head) item reads its neighbours' key and value rows in place, so no halo or index tensor is ever built.
// Parallel over (b, row) tasks that each own their output rows; results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <vector>

#include "cpu_channel_row.h"
#include "cpu_vectors.h"

namespace dat_smt {
namespace {

struct NeighborhoodSizes {
  int64_t batch, heads, height, width, channels, kernel;
  float scale;
  // element strides over (B, heads, H, W) of q, k and v
  std::array<int64_t, 4> q_strides, k_strides, v_strides;
};

template <int64_t kChannels>
DAT_SMT_CPU_INLINE void attend_rows(const float* q, const float* k, const float* v, const float* rpb, float* out,
                                    const NeighborhoodSizes& sz, int64_t begin, int64_t end) {
  const int64_t kernel = sz.kernel;
  const int64_t span = 2 * kernel - 1;
  ChannelRow<float, kChannels> query(sz.channels);
  ChannelRow<float, kChannels> accumulator(sz.channels);
  // whole vectors of logits for the softmax, the padding reset to -inf (which exponentiates to 0) for each item
  const int64_t logit_vectors = (kernel * kernel + kLanes - 1) / kLanes;
  std::vector<float> logits(logit_vectors * kLanes);
  const auto& qs = sz.q_strides;
  const auto& ks = sz.k_strides;
  const auto& vs = sz.v_strides;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / sz.height;
    const int64_t i = task % sz.height;
    const int64_t top = std::clamp<int64_t>(i - kernel / 2, 0, sz.height - kernel);
    for (int64_t j = 0; j < sz.width; ++j) {
      const int64_t left = std::clamp<int64_t>(j - kernel / 2, 0, sz.width - kernel);
      float* out_row = out + ((b * sz.height + i) * sz.width + j) * sz.heads * sz.channels;
      for (int64_t h = 0; h < sz.heads; ++h) {
        const float* bias = rpb + (h * span + top - i + kernel - 1) * span + left - j + kernel - 1;
        const float* keys = k + b * ks[0] + h * ks[1] + top * ks[2] + left * ks[3];
        const float* values = v + b * vs[0] + h * vs[1] + top * vs[2] + left * vs[3];
        query.load(q + b * qs[0] + h * qs[1] + i * qs[2] + j * qs[3]);
        for (int64_t dy = 0; dy < kernel; ++dy) {
          for (int64_t dx = 0; dx < kernel; ++dx) {
            logits[dy * kernel + dx] = query.dot(keys + dy * ks[2] + dx * ks[3]) * sz.scale + bias[dy * span + dx];
          }
        }
        std::fill(logits.begin() + kernel * kernel, logits.end(), -std::numeric_limits<float>::infinity());
        vec8 maximum = load<vec8>(logits.data());
        for (int64_t c = 1; c < logit_vectors; ++c) {
          maximum = max8(maximum, load<vec8>(logits.data() + c * kLanes));
        }
        const float inverse_total = 1.0f / exponentiate_in_place(logits.data(), logit_vectors, maximum);
        accumulator.zero();
        for (int64_t dy = 0; dy < kernel; ++dy) {
          for (int64_t dx = 0; dx < kernel; ++dx) {
            accumulator.add_scaled(values + dy * vs[2] + dx * vs[3], logits[dy * kernel + dx] * inverse_total);
          }
        }
        accumulator.store(out_row + h * sz.channels);
      }
    }
  }
}

DAT_SMT_CPU_MULTIVERSION void attend_range(const float* q, const float* k, const float* v, const float* rpb,
                                           float* out, const NeighborhoodSizes& sz, int64_t begin, int64_t end) {
  switch (sz.channels) {
    case 32:
      attend_rows<32>(q, k, v, rpb, out, sz, begin, end);
      break;
    case 64:
      attend_rows<64>(q, k, v, rpb, out, sz, begin, end);
      break;
    default:
      attend_rows<0>(q, k, v, rpb, out, sz, begin, end);
  }
}

std::array<int64_t, 4> leading_strides(const at::Tensor& x) {
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3)};
}

at::Tensor neighborhood_attention_forward_cpu(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                              const at::Tensor& rpb_in, int64_t kernel_size, double scale) {
  TORCH_CHECK(q_in.dim() == 5, "q must be (B, heads, H, W, head_dim), got ", q_in.sizes());
  TORCH_CHECK(k_in.sizes() == q_in.sizes() && v_in.sizes() == q_in.sizes(),
              "q, k and v must share one shape, got ", q_in.sizes(), ", ", k_in.sizes(), ", ", v_in.sizes());
  for (const auto* t : {&q_in, &k_in, &v_in, &rpb_in}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "expected float32 CPU tensors, got ",
                t->scalar_type(), " on ", t->device());
  }
  const int64_t heads = q_in.size(1), height = q_in.size(2), width = q_in.size(3);
  TORCH_CHECK(kernel_size > 0 && kernel_size % 2 == 1 && kernel_size <= height && kernel_size <= width,
              "kernel_size must be odd and at most the map size (", height, "x", width, "), got ", kernel_size);
  TORCH_CHECK(rpb_in.sizes() == at::IntArrayRef({heads, 2 * kernel_size - 1, 2 * kernel_size - 1}),
              "rpb must be (heads, 2k-1, 2k-1), got ", rpb_in.sizes());
  const auto unit_channel_stride = [](const at::Tensor& x) { return x.stride(4) == 1 ? x : x.contiguous(); };
  const at::Tensor q = unit_channel_stride(q_in), k = unit_channel_stride(k_in), v = unit_channel_stride(v_in);
  const at::Tensor rpb = rpb_in.contiguous();
  const NeighborhoodSizes sz{q.size(0), heads, height, width, q.size(4), kernel_size, static_cast<float>(scale),
                             leading_strides(q), leading_strides(k), leading_strides(v)};
  at::Tensor out = at::empty({sz.batch, height, width, heads, sz.channels}, q.options());
  const float* q_data = q.data_ptr<float>();
  const float* k_data = k.data_ptr<float>();
  const float* v_data = v.data_ptr<float>();
  const float* rpb_data = rpb.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  at::parallel_for(0, sz.batch * height, 1, [&](int64_t begin, int64_t end) {
    attend_range(q_data, k_data, v_data, rpb_data, out_data, sz, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dat_smt_ext, CPU, m) {
  m.impl("neighborhood_attention_forward", &neighborhood_attention_forward_cpu);
}

}  // namespace dat_smt
