// Dropout masks of one byte an element: drawn from a counter-based generator seeded by torch's
// global one, applied in one vectorised pass, and autograd Functions that keep for backward only
// the mask, or only its seed. The backbones' dropout (backbones/dropout.hpp) and a weight delta's
// dropout on its own input (InputDropout below, applied by precision.hpp's LinearKeepingInput)
// draw and apply them.
#pragma once

#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <mutex>

#include <deltatune/kernels/cpu_loops.hpp>

namespace deltatune::detail {

// SplitMix64's output function (Steele, Lea and Flood, "Fast splittable pseudorandom number
// generators", 2014): a bijective mix of a 64-bit counter whose outputs on consecutive
// counters pass BigCrush.
inline uint64_t splitmix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Output i of SplitMix64's stream from seed: its counter advances by the golden ratio's 2^64.
inline constexpr uint64_t kGoldenGamma = 0x9E3779B97F4A7C15ULL;
inline uint64_t splitmix64_counter(uint64_t seed, uint64_t i) { return seed + i * kGoldenGamma; }
inline uint64_t splitmix64_output(uint64_t seed, uint64_t i) { return splitmix64(splitmix64_counter(seed, i)); }

// One 64-bit draw from the global CPU generator: what manual_seed sets and a training state
// saves, so that masks follow the seed and a resumed run draws what an uninterrupted one would.
inline uint64_t draw_from_default_generator() {
  auto generator = at::detail::getDefaultCPUGenerator();
  const std::lock_guard<std::mutex> lock(generator.mutex());
  return at::check_generator<at::CPUGeneratorImpl>(generator)->random64();
}

// out[2j] and out[2j + 1] = whether the low and the high 32 bits of output first + j of
// SplitMix64's stream from seed fall below threshold: no branch, so that it vectorises, and the
// counters stepped from the first, so that the vector loop adds where it would multiply.
inline void draw_kept_pairs(uint64_t seed, uint64_t first, uint64_t threshold, uint8_t* __restrict out, int64_t len) {
  const uint64_t counter = splitmix64_counter(seed, first);
  for (int64_t j = 0; j < len; ++j) {
    const uint64_t bits = splitmix64(counter + uint64_t(j) * kGoldenGamma);
    out[2 * j] = (bits & 0xFFFFFFFFULL) < threshold;
    out[2 * j + 1] = (bits >> 32) < threshold;
  }
}

// One draw of dropout's mask, contiguous, of like's shape: true, with probability 1 - p, where
// an element is kept. torch's CPU bernoulli_ draws each element from one Mersenne Twister
// under a lock, one thread at a time, which took a quarter of a T5 training step here. This
// draws one seed from the global generator and gives element pair i the two 32-bit halves of
// SplitMix64's output i of that seed's stream: independent draws, which at::parallel_for
// splits over threads where the program is built with OpenMP, the same whatever the count or
// the instruction set (kernels/cpu_loops.hpp).
// An element is kept when its 32 bits fall below (1 - p) 2^32 (torch's float uniform
// resolves 2^-24). The mask is a function of the seed: drawn again from it, it is the same
// (SeededMaskFunction below keeps the seed for backward, not the mask).
inline torch::Tensor keep_mask(c10::IntArrayRef sizes, double p, uint64_t seed) {
  auto kept = torch::empty(sizes, torch::TensorOptions().dtype(torch::kBool));
  const auto threshold = static_cast<uint64_t>(std::llround((1.0 - p) * 4294967296.0));
  auto* out = reinterpret_cast<uint8_t*>(kept.data_ptr<bool>());
  const int64_t n = kept.numel(), pairs = n / 2;
  at::parallel_for(0, pairs, 8192, [&](int64_t begin, int64_t end) {
    cpu::with_widest_vectors([&] {
      cpu::in_blocks(end - begin, [&](int64_t i, int64_t len) {
        draw_kept_pairs(seed, uint64_t(begin + i), threshold, out + 2 * (begin + i), len);
      });
    });
  });
  if (n % 2 == 1) {  // the last element: the low half of the next pair
    uint8_t last[2];
    draw_kept_pairs(seed, uint64_t(pairs), threshold, last, 1);
    out[n - 1] = last[0];
  }
  return kept;
}
inline torch::Tensor keep_mask(const torch::Tensor& like, double p) {
  TORCH_CHECK(like.device().is_cpu(), "keep_mask draws masks on the CPU");
  return keep_mask(like.sizes(), p, draw_from_default_generator());
}

// out[0:len] = whether bfloat16 bits x are positive: from the least subnormal, 0x0001, to
// infinity, 0x7F80, one unsigned comparison (zeros, the sign bit's half and NaNs are not).
inline void positive_bits(const uint16_t* __restrict x, uint8_t* __restrict out, int64_t len) {
  for (int64_t j = 0; j < len; ++j) out[j] = uint16_t(x[j] - 1u) < 0x7F80u;
}

// h > 0, a bool tensor of h's shape (contiguous). For bfloat16 on the CPU one vectorised pass
// over the bits, where torch's comparison took 1.3 ms for a T5-base feed-forward's 3.1 million
// elements at batch 8 (2 threads; this takes 0.1, 0.06 with AVX2 or AVX-512). Other dtypes
// and devices: torch's.
inline torch::Tensor is_positive(const torch::Tensor& h) {
  if (!h.device().is_cpu() || h.scalar_type() != torch::kBFloat16) return (h > 0).contiguous();
  const auto in = h.contiguous();
  auto out = torch::empty(in.sizes(), in.options().dtype(torch::kBool));
  const uint16_t* x = cpu::bf16_bits(in);
  auto* positive = reinterpret_cast<uint8_t*>(out.data_ptr<bool>());
  at::parallel_for(0, in.numel(), cpu::kGrainElements, [&](int64_t begin, int64_t end) {
    cpu::with_widest_vectors([&] {
      cpu::in_blocks(end - begin,
                     [&](int64_t i, int64_t len) { positive_bits(x + begin + i, positive + begin + i, len); });
    });
  });
  return out;
}

// out[0:len] = x * (scale * kept), in float; bfloat16 widened and rounded back
// (kernels/cpu_loops.hpp, whose fixed-width blocks call these).
inline void scale_kept(const float* __restrict x, const uint8_t* __restrict kept, float* __restrict out, float scale,
                       int64_t len) {
  for (int64_t j = 0; j < len; ++j) out[j] = x[j] * (scale * float(kept[j]));
}
inline void scale_kept(const uint16_t* __restrict x, const uint8_t* __restrict kept, uint16_t* __restrict out,
                       float scale, int64_t len) {
  for (int64_t j = 0; j < len; ++j) out[j] = cpu::round_to_bf16(cpu::widen_bf16(x[j]) * (scale * float(kept[j])));
}

// x / (1 - p) where kept, 0 elsewhere: x times the mask's 0 or 1 / (1 - p), as torch's dropout
// (so a dropped infinity is NaN there too). For float32 and bfloat16 on the CPU one vectorised
// pass that reads the bool mask as it is: at::where takes ten times as long, in a scalar loop,
// after x * scale made a tensor of x's size, and torch's dropout first copies the mask to x's
// dtype. Other dtypes (float64 in the exact tests, float16) take at::where.
inline torch::Tensor apply_mask(const torch::Tensor& x, const torch::Tensor& kept, double p) {
  const auto dtype = x.scalar_type();
  if (!x.device().is_cpu() || (dtype != torch::kFloat && dtype != torch::kBFloat16) || kept.sizes() != x.sizes() ||
      !kept.is_contiguous())
    return at::where(kept, x * (1.0 / (1.0 - p)), 0);
  const auto in = x.contiguous();
  auto out = torch::empty_like(in);
  const auto scale = static_cast<float>(1.0 / (1.0 - p));
  const auto* mask = reinterpret_cast<const uint8_t*>(kept.data_ptr<bool>());
  auto run = [&](const auto* from, auto* to) {
    at::parallel_for(0, in.numel(), cpu::kGrainElements, [&](int64_t begin, int64_t end) {
      cpu::with_widest_vectors([&] {
        cpu::in_blocks(end - begin, [&](int64_t i, int64_t len) {
          scale_kept(from + begin + i, mask + begin + i, to + begin + i, scale, len);
        });
      });
    });
  };
  if (dtype == torch::kFloat) {
    run(in.data_ptr<float>(), out.data_ptr<float>());
  } else {
    run(cpu::bf16_bits(in), cpu::bf16_bits(out));
  }
  return out;
}

// x masked as kept, keeping only the bool mask for backward; for dropout(relu(h)), kept is
// also false where h is not positive.
struct MaskFunction : torch::autograd::Function<MaskFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& kept, double p) {
    ctx->save_for_backward({kept});
    ctx->saved_data["p"] = p;
    return apply_mask(x, kept, p);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {apply_mask(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["p"].toDouble()), {}, {}};
  }
};

// A dropout mask kept for backward as its seed and rate: keep_mask draws the same mask from
// them again. A byte an element less kept, for a second draw that takes 0.3 ms per 1.6 million
// elements (2 threads, AVX-512; BENCHMARKS.md).
struct SeededMask {
  uint64_t seed;
  double p;

  // A seed from the global generator, as keep_mask(like, p) draws.
  static SeededMask draw(double p) { return {draw_from_default_generator(), p}; }
  torch::Tensor mask(c10::IntArrayRef sizes) const { return keep_mask(sizes, p, seed); }
  // x / (1 - p) where the mask keeps it, 0 elsewhere (apply_mask).
  torch::Tensor apply(const torch::Tensor& x) const { return apply_mask(x, mask(x.sizes()), p); }

  void save(torch::autograd::AutogradContext* ctx) const {
    ctx->saved_data["seed"] = static_cast<int64_t>(seed);
    ctx->saved_data["p"] = p;
  }
  static SeededMask saved(torch::autograd::AutogradContext* ctx) {
    return {static_cast<uint64_t>(ctx->saved_data["seed"].toInt()), ctx->saved_data["p"].toDouble()};
  }
};

// x dropped out, keeping only the mask's seed for backward (SeededMask).
struct SeededMaskFunction : torch::autograd::Function<SeededMaskFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, double p) {
    const auto dropout = SeededMask::draw(p);
    dropout.save(ctx);
    return dropout.apply(x);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    return {SeededMask::saved(ctx).apply(grads[0]), {}};
  }
};

// Where dropout p keeps an element of `like` (bool, like's shape, contiguous): keep_mask on the
// CPU; elsewhere one uniform draw an element from the device's generator, kept below 1 - p.
inline torch::Tensor dropout_mask(const torch::Tensor& like, double p) {
  if (like.device().is_cpu()) return keep_mask(like, p);
  return torch::rand(like.sizes(), like.options().dtype(torch::kFloat)) < 1.0 - p;
}

// A weight delta's dropout on its own input (LoRA's lora_dropout, VeRA's vera_dropout): where
// it keeps an element (dropout_mask above) and its probability p; none where `kept` is undefined.
struct InputDropout {
  torch::Tensor kept;
  double p = 0.0;

  // Drawn for x while training with p > 0; none otherwise.
  static InputDropout draw(const torch::Tensor& x, double p, bool training) {
    if (!training || p <= 0) return {};
    return {dropout_mask(x, p), p};
  }
  bool defined() const { return kept.defined(); }
};

}  // namespace deltatune::detail
