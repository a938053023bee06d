// Loops the CPU kernels share (kron_sum_cpu.hpp, rms_norm_cpu.hpp, core/dropout_mask.hpp),
// written for GCC's -O2 vectoriser, which is what a program built with CMake's Release flags
// gets: fixed-width blocks, __restrict operands, bit casts it can vectorise.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace deltatune::detail::cpu {

// Rows below this many output elements per task are not worth a thread.
inline constexpr int64_t kGrainElements = 32768;

inline int64_t grain_rows(int64_t row_elements) {
  return std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row_elements));
}

// Inner loops run in blocks of kLanes (256 bits of acc_t) with __restrict
// operands: a fixed-width block with no possible aliasing is vectorised at -O2 too,
// where GCC's cheap cost model refuses loops of unknown length, and the kLanes
// independent partial sums let a float dot product vectorise without -ffast-math.
template <class acc_t>
inline constexpr int64_t kLanes = 32 / sizeof(acc_t);

// out[0:len] += c * row[0:len]
template <class acc_t, class scalar_t>
inline void axpy(acc_t* __restrict out, acc_t c, const scalar_t* __restrict row, int64_t len) {
  constexpr int64_t L = kLanes<acc_t>;
  int64_t j = 0;
  for (; j + L <= len; j += L) {
    for (int64_t u = 0; u < L; ++u) out[j + u] += c * static_cast<acc_t>(row[j + u]);
  }
  for (; j < len; ++j) out[j] += c * static_cast<acc_t>(row[j]);
}

template <class acc_t, class scalar_t>
inline acc_t dot(const scalar_t* __restrict x, const scalar_t* __restrict y, int64_t len) {
  constexpr int64_t L = kLanes<acc_t>;
  if (len < L) {  // PHM layers with n = 12 have q = 2: lanes would cost more than they save
    acc_t sum = 0;
    for (int64_t j = 0; j < len; ++j) sum += static_cast<acc_t>(x[j]) * static_cast<acc_t>(y[j]);
    return sum;
  }
  acc_t lanes[L] = {};
  int64_t j = 0;
  for (; j + L <= len; j += L) {
    for (int64_t u = 0; u < L; ++u) lanes[u] += static_cast<acc_t>(x[j + u]) * static_cast<acc_t>(y[j + u]);
  }
  acc_t sum = 0;
  for (; j < len; ++j) sum += static_cast<acc_t>(x[j]) * static_cast<acc_t>(y[j]);
  for (int64_t u = 0; u < L; ++u) sum += lanes[u];
  return sum;
}

// f(begin, length) over [0, len) in blocks of kBlock elements, then the tail: f inlined on a
// constant length is vectorised at -O2, where the same loop over len is not.
template <int64_t kBlock = 32, class F>
inline void in_blocks(int64_t len, F&& f) {
  int64_t i = 0;
  for (; i + kBlock <= len; i += kBlock) f(i, kBlock);
  if (i < len) f(i, len - i);
}

// f(), compiled for the widest vectors the CPU has: AVX-512 (F, DQ, BW, VL), else AVX2, else
// the build's target. Wrap the body of a parallel_for in it. Code built with a compiler's
// defaults targets x86-64's SSE2, where bfloat16's widening and rounding below take twice as
// long and 64-bit multiplies do not vectorise (2 threads: apply_mask on 786k bf16 elements
// 0.18 ms, 0.09 with AVX2, 0.07 to 0.09 with AVX-512; keep_mask's SplitMix64 on 3.1 million
// elements 1.16, 0.76, 0.38). For loops whose results no instruction set changes: integer
// maths, and float maths with no a * b + c, which AVX-512F's FMA would contract and round
// once, not twice (AVX2 here goes without FMA). `flatten` inlines every call f makes, so that all of it
// is compiled for the target: the inliner otherwise may keep f, called from two places, out of
// line and compiled for the default (keep_mask's loop ran at SSE2's speed that way).
// (rms_norm_cpu.hpp's rows, whose sums FMA would contract, gained nothing from AVX2, measured.)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <class F>
__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl"), flatten)) void run_for_avx512(F& f) {
  f();
}
template <class F>
__attribute__((target("avx2"), flatten)) void run_for_avx2(F& f) {
  f();
}
inline bool cpu_has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
  return has;
}
inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
template <class F>
inline void with_widest_vectors(F&& f) {
  if (cpu_has_avx512()) return run_for_avx512(f);
  if (cpu_has_avx2()) return run_for_avx2(f);
  f();
}
#else
template <class F>
inline void with_widest_vectors(F&& f) {
  f();
}
#endif

// bfloat16 bits widened to float (shifted up), and a float rounded to bfloat16's nearest even
// as c10's conversion does (a NaN to 0x7FC0), with no branch: c10's own conversions go through
// std::memcpy, which the vectoriser does not take.
inline float widen_bf16(uint16_t bits) { return __builtin_bit_cast(float, uint32_t(bits) << 16); }
inline uint16_t round_to_bf16(float y) {
  const uint32_t u = __builtin_bit_cast(uint32_t, y), rounded = (u + ((u >> 16) & 1u) + 0x7FFFu) >> 16;
  return uint16_t((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded);
}

// A bfloat16 tensor's elements as their bits, for the loops above.
inline const uint16_t* bf16_bits(const at::Tensor& t) {
  return reinterpret_cast<const uint16_t*>(t.data_ptr<at::BFloat16>());
}
inline uint16_t* bf16_bits(at::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); }

}  // namespace deltatune::detail::cpu
