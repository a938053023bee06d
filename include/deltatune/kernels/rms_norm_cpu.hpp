// RMS norm of a bfloat16 activation on the CPU, y = w x / sqrt(mean(x^2) + eps) over the last
// dimension, and its backward, each one pass a row in float32, rounded once to bfloat16: the
// math of torch's rms_norm on a half-precision input, whose composite form takes a dozen passes
// over the activation (casts up and down, square, mean, three products; backward twice that):
// a bf16 T5-base LoRA step at batch 8 took 1.60 s with those, 1.55 s with these (2 threads).
// Rows are independent, so the result is the same whatever the thread count; the weight's
// gradient sums fixed blocks of rows in order, so it is too. backbones/t5.hpp's RMSNormFunction
// calls these (and torch's ops for other dtypes and devices).
#pragma once

#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <cmath>
#include <tuple>
#include <vector>

#include <deltatune/kernels/cpu_loops.hpp>

namespace deltatune::detail::cpu {

// out[0:len] = x widened to float
inline void widen_row(const uint16_t* __restrict x, float* __restrict out, int64_t len) {
  in_blocks(len, [&](int64_t i, int64_t n) {
    for (int64_t j = i; j < i + n; ++j) out[j] = widen_bf16(x[j]);
  });
}

// One row of the forward: its 1 / sqrt(mean(x^2) + eps), and y = (x r) w rounded once.
inline float rms_norm_row(const float* __restrict x, const float* __restrict w, uint16_t* __restrict y, int64_t len,
                          float eps) {
  const float r = 1.0f / std::sqrt(dot<float>(x, x, len) / float(len) + eps);
  in_blocks(len, [&](int64_t i, int64_t n) {
    for (int64_t j = i; j < i + n; ++j) y[j] = round_to_bf16(x[j] * r * w[j]);
  });
  return r;
}

// One row of the backward, the forward's steps in reverse (g w, then rsqrt's -r^3 / 2, the
// mean and the square's 2x): grad_x = g w r - (sum(g w x) r^3 / len) x, rounded once; and
// where grad_w_sum is given, g x r added to it.
inline void rms_norm_backward_row(const uint16_t* __restrict g, const float* __restrict x, const float* __restrict w,
                                  float r, float* __restrict gw, uint16_t* __restrict grad_x,
                                  float* __restrict grad_w_sum, int64_t len) {
  in_blocks(len, [&](int64_t i, int64_t n) {
    for (int64_t j = i; j < i + n; ++j) gw[j] = widen_bf16(g[j]) * w[j];
  });
  const float grad_mean = -0.5f * dot<float>(gw, x, len) * (r * r * r) / float(len);
  in_blocks(len, [&](int64_t i, int64_t n) {
    for (int64_t j = i; j < i + n; ++j) grad_x[j] = round_to_bf16(gw[j] * r + grad_mean * (2 * x[j]));
  });
  if (grad_w_sum == nullptr) return;
  in_blocks(len, [&](int64_t i, int64_t n) {
    for (int64_t j = i; j < i + n; ++j) grad_w_sum[j] += widen_bf16(g[j]) * (x[j] * r);
  });
}

// Whether these kernels take x and w: bfloat16 on the CPU, w one value per element of a row.
inline bool rms_norm_applies(const torch::Tensor& x, const torch::Tensor& w) {
  return x.is_cpu() && w.is_cpu() && x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16 &&
         x.dim() >= 1 && w.dim() == 1 && w.size(0) == x.size(-1);
}

inline std::vector<float> widened(const torch::Tensor& w) {
  std::vector<float> out(w.numel());
  widen_row(bf16_bits(w), out.data(), w.numel());
  return out;
}

// y (x's shape, bfloat16) and the float32 statistic r, (..., 1), that backward takes.
inline std::tuple<torch::Tensor, torch::Tensor> rms_norm_forward(const torch::Tensor& x_in, const torch::Tensor& w_in,
                                                                 double eps) {
  const auto x = x_in.contiguous();
  const int64_t len = x.size(-1), rows = len == 0 ? 0 : x.numel() / len;
  auto stat_sizes = x.sizes().vec();
  stat_sizes.back() = 1;
  auto y = torch::empty_like(x);
  auto r = torch::empty(stat_sizes, x.options().dtype(torch::kFloat));
  const auto w = widened(w_in.contiguous());
  const uint16_t* xs = bf16_bits(x);
  uint16_t* ys = bf16_bits(y);
  float* rs = r.data_ptr<float>();
  at::parallel_for(0, rows, grain_rows(len), [&](int64_t begin, int64_t end) {
    std::vector<float> row(len);
    for (int64_t i = begin; i < end; ++i) {
      widen_row(xs + i * len, row.data(), len);
      rs[i] = rms_norm_row(row.data(), w.data(), ys + i * len, len, float(eps));
    }
  });
  return {y, r};
}

// grad_x (bfloat16) and, where with_grad_w, grad_w (bfloat16, summed in float32: in blocks of
// kRowsPerSum rows, each block's sum its own, the blocks added in order after).
inline std::tuple<torch::Tensor, torch::Tensor> rms_norm_backward(const torch::Tensor& grad_in,
                                                                  const torch::Tensor& x_in, const torch::Tensor& w_in,
                                                                  const torch::Tensor& r, bool with_grad_w) {
  constexpr int64_t kRowsPerSum = 64;
  const auto x = x_in.contiguous(), grad = grad_in.contiguous();
  const int64_t len = x.size(-1), rows = len == 0 ? 0 : x.numel() / len;
  const int64_t blocks = (rows + kRowsPerSum - 1) / kRowsPerSum;
  auto grad_x = torch::empty_like(x);
  std::vector<float> block_sums(with_grad_w ? blocks * len : 0, 0.0f);
  const auto w = widened(w_in.contiguous());
  const uint16_t *xs = bf16_bits(x), *gs = bf16_bits(grad);
  uint16_t* gxs = bf16_bits(grad_x);
  const float* rs = r.data_ptr<float>();
  at::parallel_for(0, blocks, std::max<int64_t>(1, grain_rows(len) / kRowsPerSum), [&](int64_t begin, int64_t end) {
    std::vector<float> row(len), gw(len);
    for (int64_t block = begin; block < end; ++block) {
      float* sum = with_grad_w ? block_sums.data() + block * len : nullptr;
      for (int64_t i = block * kRowsPerSum; i < std::min(rows, (block + 1) * kRowsPerSum); ++i) {
        widen_row(xs + i * len, row.data(), len);
        rms_norm_backward_row(gs + i * len, row.data(), w.data(), rs[i], gw.data(), gxs + i * len, sum, len);
      }
    }
  });
  if (!with_grad_w) return {grad_x, torch::Tensor()};
  auto grad_w = torch::zeros({len}, torch::TensorOptions().dtype(torch::kFloat));
  float* total = grad_w.data_ptr<float>();
  for (int64_t block = 0; block < blocks; ++block)
    for (int64_t j = 0; j < len; ++j) total[j] += block_sums[block * len + j];
  return {grad_x, grad_w.to(torch::kBFloat16)};
}

}  // namespace deltatune::detail::cpu
