// CPU inference kernel of (shifted) window attention with relative position bias, as in Swin and DAT v1's local
// blocks (see dat_smt/dat.py, WindowAttention, whose PyTorch formulation serves autograd and other devices).
//
// The input is the qkv projection of the whole padded map, (B, H, W, 3 * channels) with unit channel stride. Each
// window gathers its tokens' rows, at the positions the cyclic shift puts in that window, and writes its results
// back to those positions, so the partition, the roll, their inverses and the (windows, heads, N, N) shift mask are
// never materialised. Tokens of a shifted window that come from different regions of the map are kept apart by
// adding -100 to their logits, as the reference mask does.
//
// Per (window, head) the logits are a small GEMM, Q K^T, with K transposed in the window's scratch copy: blocks of
// query rows accumulate whole rows of logits in vector registers, and the value product is blocked the same way.
// Parallel over windows; results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_channel_row.h"
#include "cpu_vectors.h"

namespace dat_smt {
namespace {

constexpr int64_t kCacheLine = 64;
constexpr float kShiftMaskValue = -100.0f;

struct WindowSizes {
  int64_t batch, height, width, channels, heads, head_dim, window, shift;
  int64_t tokens;         // window * window
  int64_t padded_tokens;  // tokens rounded up to whole vectors
  float scale;
  int64_t stride_b, stride_h, stride_w;  // of qkv, in elements
};

// Region of a rolled coordinate along one axis: the reference mask separates the last `window` rows (columns) of
// the rolled map into the `window - shift` that were not wrapped and the `shift` that were.
DAT_SMT_CPU_INLINE int64_t shift_region(int64_t rolled, int64_t length, int64_t window, int64_t shift) {
  return rolled < length - window ? 0 : (rolled < length - shift ? 1 : 2);
}

struct TokenPosition {
  int64_t rolled_y, rolled_x;  // in the shifted map, which the windows tile
  int64_t qkv_offset, out_offset;
};

// Where token t of a window is: the window tiles the map rolled by -shift, so the token comes from (and its result
// goes to) the position `shift` further on, cyclically.
DAT_SMT_CPU_INLINE TokenPosition token_position(int64_t window, int64_t t, const WindowSizes& sz) {
  const int64_t windows_w = sz.width / sz.window, windows_per_image = (sz.height / sz.window) * windows_w;
  const int64_t b = window / windows_per_image;
  const int64_t rolled_y = (window % windows_per_image) / windows_w * sz.window + t / sz.window;
  const int64_t rolled_x = window % windows_w * sz.window + t % sz.window;
  const int64_t y = (rolled_y + sz.shift) % sz.height, x = (rolled_x + sz.shift) % sz.width;
  return {rolled_y, rolled_x, b * sz.stride_b + y * sz.stride_h + x * sz.stride_w,
          ((b * sz.height + y) * sz.width + x) * sz.channels};
}

#if defined(__GNUC__)
#define DAT_SMT_PREFETCH(address) __builtin_prefetch(address)
#else
#define DAT_SMT_PREFETCH(address)
#endif

// logits[r][:] = sum_d q[r][d] * keys_t[d][:] for kRows query rows, over all padded key columns.
template <int kRows>
DAT_SMT_CPU_INLINE void query_key_rows(const float* const* q, const float* keys_t, float* logits,
                                       const WindowSizes& sz) {
  const int64_t vectors = sz.padded_tokens / kLanes;
  for (int64_t c = 0; c < vectors; c += 2) {
    const bool pair = c + 1 < vectors;
    vec8 acc[kRows][2] = {};
    for (int64_t d = 0; d < sz.head_dim; ++d) {
      const float* key_row = keys_t + d * sz.padded_tokens + c * kLanes;
      const vec8 k0 = load<vec8>(key_row);
      const vec8 k1 = pair ? load<vec8>(key_row + kLanes) : splat<vec8>(0.0f);
      for (int r = 0; r < kRows; ++r) {
        const vec8 qd = splat<vec8>(q[r][d]);
        acc[r][0] += qd * k0;
        acc[r][1] += qd * k1;
      }
    }
    for (int r = 0; r < kRows; ++r) {
      store(logits + r * sz.padded_tokens + c * kLanes, acc[r][0]);
      if (pair) {
        store(logits + r * sz.padded_tokens + (c + 1) * kLanes, acc[r][1]);
      }
    }
  }
}

// out[r][:] = inverse_total[r] * sum_n weights[r][n] * v[n][:] for kRows rows, kVectors * 8 channels at a time.
template <int kRows, int kVectors>
DAT_SMT_CPU_INLINE void weight_value_rows(const float* weights, const float* const* v, const float* inverse_total,
                                          float* const* out, int64_t channel, const WindowSizes& sz) {
  vec8 acc[kRows][kVectors] = {};
  for (int64_t n = 0; n < sz.tokens; ++n) {
    const float* value = v[n] + channel;
    for (int c = 0; c < kVectors; ++c) {
      const vec8 vn = load<vec8>(value + c * kLanes);
      for (int r = 0; r < kRows; ++r) {
        acc[r][c] += splat<vec8>(weights[r * sz.padded_tokens + n]) * vn;
      }
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int c = 0; c < kVectors; ++c) {
      store(out[r] + channel + c * kLanes, acc[r][c] * splat<vec8>(inverse_total[r]));
    }
  }
}

template <int kRows>
DAT_SMT_CPU_INLINE void weight_value_block(const float* weights, const float* const* v, const float* inverse_total,
                                           float* const* out, const WindowSizes& sz) {
  int64_t channel = 0;
  for (; channel + 2 * kLanes <= sz.head_dim; channel += 2 * kLanes) {
    weight_value_rows<kRows, 2>(weights, v, inverse_total, out, channel, sz);
  }
  for (; channel + kLanes <= sz.head_dim; channel += kLanes) {
    weight_value_rows<kRows, 1>(weights, v, inverse_total, out, channel, sz);
  }
  for (; channel < sz.head_dim; ++channel) {
    for (int r = 0; r < kRows; ++r) {
      float total = 0.0f;
      for (int64_t n = 0; n < sz.tokens; ++n) {
        total += weights[r * sz.padded_tokens + n] * v[n][channel];
      }
      out[r][channel] = total * inverse_total[r];
    }
  }
}

// Softmax numerators of one row of logits (scaled, biased, masked) in place; returns their sum.
DAT_SMT_CPU_INLINE float exponentiate_row(float* row, const float* bias, const float* mask_row, const WindowSizes& sz) {
  const int64_t vectors = sz.padded_tokens / kLanes;
  const vec8 scale = splat<vec8>(sz.scale);
  vec8 maximum = splat<vec8>(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < vectors; ++c) {
    vec8 logit = load<vec8>(row + c * kLanes) * scale + load<vec8>(bias + c * kLanes);
    if (mask_row != nullptr) {
      logit += load<vec8>(mask_row + c * kLanes);
    }
    store(row + c * kLanes, logit);
    maximum = max8(maximum, logit);
  }
  return exponentiate_in_place(row, vectors, maximum);
}

// Prefetch the qkv rows of tokens [begin, end).
DAT_SMT_CPU_INLINE void prefetch_tokens(const float* const* token_qkv, int64_t begin, int64_t end,
                                        const WindowSizes& sz) {
  const int64_t row_bytes = 3 * sz.channels * static_cast<int64_t>(sizeof(float));
  for (int64_t t = begin; t < end; ++t) {
    const char* row = reinterpret_cast<const char*>(token_qkv[t]);
    for (int64_t byte = 0; byte < row_bytes; byte += kCacheLine) {
      DAT_SMT_PREFETCH(row + byte);
    }
  }
}

template <int kRows>
DAT_SMT_CPU_INLINE void attend_query_block(const float* const* q, const float* const* v, float* const* out,
                                           const float* keys_t, const float* bias, const float* mask, float* logits,
                                           const WindowSizes& sz, int64_t first_row) {
  query_key_rows<kRows>(q + first_row, keys_t, logits, sz);
  float inverse_total[kRows];
  for (int r = 0; r < kRows; ++r) {
    const int64_t row = first_row + r;
    const float* mask_row = mask != nullptr ? mask + row * sz.padded_tokens : nullptr;
    inverse_total[r] =
        1.0f / exponentiate_row(logits + r * sz.padded_tokens, bias + row * sz.padded_tokens, mask_row, sz);
  }
  weight_value_block<kRows>(logits, v, inverse_total, out + first_row, sz);
}

DAT_SMT_CPU_MULTIVERSION void attend_windows(const float* qkv, const float* padded_bias, float* out,
                                             const WindowSizes& sz, int64_t begin, int64_t end) {
  const int64_t n = sz.tokens, np = sz.padded_tokens, ws = sz.window, dim = sz.head_dim;
  std::vector<const float*> token_qkv(n), next_token_qkv(n);
  std::vector<float*> token_out(n);
  std::vector<const float*> q(n), v(n);
  std::vector<float*> head_out(n);
  std::vector<int64_t> region(n);
  // the window's q and v rows, head-major, and its keys transposed per head (zero in the padding columns)
  std::vector<float> queries(sz.heads * n * dim), values(sz.heads * n * dim), keys_t(sz.heads * dim * np, 0.0f);
  std::vector<float> mask(n * np);
  constexpr int kBlock = 4;
  std::vector<float> logits(kBlock * np);
  for (int64_t window = begin; window < end; ++window) {
    bool mixed = false;
    for (int64_t t = 0; t < n; ++t) {
      const TokenPosition position = token_position(window, t, sz);
      token_qkv[t] = qkv + position.qkv_offset;
      token_out[t] = out + position.out_offset;
      if (window + 1 < end) {
        next_token_qkv[t] = qkv + token_position(window + 1, t, sz).qkv_offset;
      }
      if (sz.shift > 0) {
        region[t] = 3 * shift_region(position.rolled_y, sz.height, ws, sz.shift) +
                    shift_region(position.rolled_x, sz.width, ws, sz.shift);
        mixed = mixed || region[t] != region[0];
      }
    }
    if (mixed) {
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < np; ++j) {
          mask[i * np + j] = j < n && region[i] != region[j] ? kShiftMaskValue : 0.0f;
        }
      }
    }
    // Read each token's qkv row once, front to back: the projection just wrote qkv and it is far larger than the
    // caches, and whole rows stream where per-head slices of them would miss line by line.
    for (int64_t t = 0; t < n; ++t) {
      const float* row = token_qkv[t];
      for (int64_t h = 0; h < sz.heads; ++h) {
        std::copy(row + h * dim, row + (h + 1) * dim, queries.data() + (h * n + t) * dim);
        const float* key = row + sz.channels + h * dim;
        for (int64_t d = 0; d < dim; ++d) {
          keys_t[(h * dim + d) * np + t] = key[d];
        }
        std::copy(row + 2 * sz.channels + h * dim, row + 2 * sz.channels + (h + 1) * dim,
                  values.data() + (h * n + t) * dim);
      }
    }
    const float* window_mask = mixed ? mask.data() : nullptr;
    for (int64_t h = 0; h < sz.heads; ++h) {
      if (window + 1 < end) {  // the next window's rows, a share per head
        prefetch_tokens(next_token_qkv.data(), h * n / sz.heads, (h + 1) * n / sz.heads, sz);
      }
      for (int64_t t = 0; t < n; ++t) {
        q[t] = queries.data() + (h * n + t) * dim;
        v[t] = values.data() + (h * n + t) * dim;
        head_out[t] = token_out[t] + h * dim;
      }
      const float* head_keys_t = keys_t.data() + h * dim * np;
      const float* bias = padded_bias + h * n * np;
      int64_t row = 0;
      for (; row + kBlock <= n; row += kBlock) {
        attend_query_block<kBlock>(q.data(), v.data(), head_out.data(), head_keys_t, bias, window_mask,
                                   logits.data(), sz, row);
      }
      for (; row < n; ++row) {
        attend_query_block<1>(q.data(), v.data(), head_out.data(), head_keys_t, bias, window_mask, logits.data(),
                              sz, row);
      }
    }
  }
}

at::Tensor window_attention_forward_cpu(const at::Tensor& qkv_in, const at::Tensor& bias_in, int64_t window_size,
                                        int64_t shift, int64_t heads, double scale) {
  TORCH_CHECK(qkv_in.dim() == 4, "qkv must be (B, H, W, 3 * channels), got ", qkv_in.sizes());
  for (const auto* t : {&qkv_in, &bias_in}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "expected float32 CPU tensors, got ",
                t->scalar_type(), " on ", t->device());
  }
  const int64_t height = qkv_in.size(1), width = qkv_in.size(2);
  TORCH_CHECK(window_size > 0 && height % window_size == 0 && width % window_size == 0,
              "the map (", height, "x", width, ") must be a whole number of windows of ", window_size);
  TORCH_CHECK(shift >= 0 && shift < window_size, "shift must be in [0, window_size), got ", shift);
  TORCH_CHECK(heads > 0 && qkv_in.size(3) % (3 * heads) == 0, "qkv's last dimension (", qkv_in.size(3),
              ") must be 3 * heads * head_dim with heads = ", heads);
  const int64_t tokens = window_size * window_size;
  TORCH_CHECK(bias_in.sizes() == at::IntArrayRef({heads, tokens, tokens}), "bias must be (heads, ", tokens, ", ",
              tokens, "), got ", bias_in.sizes());
  const at::Tensor qkv = qkv_in.stride(3) == 1 ? qkv_in : qkv_in.contiguous();
  const int64_t channels = qkv.size(3) / 3;
  const int64_t padded_tokens = (tokens + kLanes - 1) / kLanes * kLanes;
  // padding columns get -inf, so they take no weight
  at::Tensor padded_bias = at::full({heads, tokens, padded_tokens}, -std::numeric_limits<float>::infinity(),
                                    bias_in.options());
  padded_bias.narrow(2, 0, tokens).copy_(bias_in);
  const WindowSizes sz{qkv.size(0), height, width, channels, heads, channels / heads, window_size, shift, tokens,
                       padded_tokens, static_cast<float>(scale), qkv.stride(0), qkv.stride(1), qkv.stride(2)};
  at::Tensor out = at::empty({sz.batch, height, width, channels}, qkv.options());
  const float* qkv_data = qkv.data_ptr<float>();
  const float* bias_data = padded_bias.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t windows = sz.batch * (height / window_size) * (width / window_size);
  at::parallel_for(0, windows, 1, [&](int64_t begin, int64_t end) {
    attend_windows(qkv_data, bias_data, out_data, sz, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(dat_smt_ext, CPU, m) {
  m.impl("window_attention_forward", &window_attention_forward_cpu);
}

}  // namespace dat_smt
