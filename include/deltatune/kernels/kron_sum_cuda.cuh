// CUDA kernels of the Kronecker sum W = sum_k A_k (x) B_k and of its two gradients,
// registered as the "cuda" table of kernels/kernel_table.hpp.
//
// Include this header in exactly one CUDA translation unit of a program (the CMake
// target deltatune::cuda does it for you): at load time it plugs its table into
// detail::registered_cuda_kernels(). Like the CPU kernels, each kernel reads its
// operands and writes its result once and never forms the n separate Kronecker
// products; sums run in at::opmath_type<scalar_t>. Left out: tensor cores, vectorised
// (multi-element) loads, and the narrow-block tiling of the CPU kernels: a thread per
// element of W already writes whole warps for narrow W. Index conventions and the
// math: kernels/kernel_table.hpp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include <deltatune/kernels/kernel_table.hpp>

namespace deltatune::detail::cuda {

inline constexpr int kThreads = 256;      // threads per block, every kernel
inline constexpr int kChunkK = 4;         // values of k one thread of the gradients sums at once
inline constexpr int64_t kMaxGridY = 65535;

// x = quot * d + rem, walked forward by a fixed step: one 64-bit division per thread
// instead of one per element (64-bit division costs dozens of instructions on the GPU).
struct DivModWalker {
  int64_t quot, rem, d, step_quot, step_rem;

  __device__ __forceinline__ DivModWalker(int64_t x, int64_t divisor, int64_t step)
      : quot(x / divisor), rem(x % divisor), d(divisor), step_quot(step / divisor), step_rem(step % divisor) {}

  __device__ __forceinline__ void advance() {
    quot += step_quot;
    rem += step_rem;
    if (rem >= d) {
      rem -= d;
      ++quot;
    }
  }
};

// Sum over the 32 lanes of a warp; lane 0 holds the result.
template <class acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------
// Kernels

// W (n*p, n*q), a thread per element: W[row, col] = sum_k A[k,a,b] B[k,i,j] with
// row = a*p + i, col = b*q + j. A block covers tile_rows x tile_cols of W; when a whole
// row fits (n*q <= kThreads) tile_cols = n*q, so the tile is a contiguous run of W and
// narrow W (Compacter's 768x24) still writes whole warps. Threads along j read rows of
// B coalesced; A (n^3 numbers) and B (n*p*q) stay in L1/L2, read n and n^2 times.
// Rows loop with stride gridDim.y * tile_rows, as gridDim.y is capped at 65535.
template <class scalar_t>
__global__ void kron_sum_forward_kernel(const scalar_t* __restrict__ A, const scalar_t* __restrict__ B,
                                        scalar_t* __restrict__ W, int64_t n, int64_t p, int64_t q,
                                        int tile_rows, int tile_cols) {
  using acc_t = at::opmath_type<scalar_t>;
  const int local_row = threadIdx.x / tile_cols, local_col = threadIdx.x % tile_cols;
  const int64_t rows = n * p, cols = n * q, nn = n * n, pq = p * q;
  const int64_t col = int64_t(blockIdx.x) * tile_cols + local_col;
  const int64_t first_row = int64_t(blockIdx.y) * tile_rows + local_row;
  if (local_row >= tile_rows || col >= cols || first_row >= rows) return;
  const int64_t b = col / q, j = col % q;
  const int64_t row_step = int64_t(gridDim.y) * tile_rows;
  DivModWalker ai(first_row, p, row_step);  // (a, i) of row
  for (int64_t row = first_row; row < rows; row += row_step, ai.advance()) {
    const scalar_t* A_ab = A + ai.quot * n + b;  // A[k, a, b] = A_ab[k * n*n]
    const scalar_t* B_ij = B + ai.rem * q + j;   // B[k, i, j] = B_ij[k * p*q]
    acc_t sum = 0;
    for (int64_t k = 0; k < n; ++k, A_ab += nn, B_ij += pq) {
      sum += static_cast<acc_t>(*A_ab) * static_cast<acc_t>(*B_ij);
    }
    W[row * cols + col] = static_cast<scalar_t>(sum);
  }
}

// dB (n, p, q), a thread per (i, j) and per chunk of kChunkK values of k (blockIdx.y):
// dB[k,i,j] = sum_{a,b} G[a*p+i, b*q+j] A[k,a,b], n*n terms. Each G element read feeds
// kChunkK sums, so G is read ceil(n / kChunkK) times; threads run along (i, j), so
// reads of G rows and writes of dB coalesce. Grid-stride over the p*q pairs.
template <class scalar_t>
__global__ void kron_sum_grad_B_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ A,
                                       scalar_t* __restrict__ dB, int64_t n, int64_t p, int64_t q) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pq = p * q, cols = n * q, nn = n * n;
  const int64_t k0 = int64_t(blockIdx.y) * kChunkK;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  if (first >= pq) return;
  DivModWalker ij(first, q, step);  // (i, j) of m
  for (int64_t m = first; m < pq; m += step, ij.advance()) {
    acc_t sum[kChunkK] = {};
    for (int64_t a = 0; a < n; ++a) {
      const scalar_t* G_row = G + (a * p + ij.quot) * cols + ij.rem;  // G[a*p+i, b*q+j] = G_row[b*q]
      const scalar_t* A_a = A + k0 * nn + a * n;                        // A[k0+c, a, b] = A_a[c*n*n + b]
      for (int64_t b = 0; b < n; ++b) {
        const acc_t g = static_cast<acc_t>(G_row[b * q]);
#pragma unroll
        for (int c = 0; c < kChunkK; ++c) {
          if (k0 + c < n) sum[c] += static_cast<acc_t>(A_a[c * nn + b]) * g;
        }
      }
    }
#pragma unroll
    for (int c = 0; c < kChunkK; ++c) {
      if (k0 + c < n) dB[(k0 + c) * pq + m] = static_cast<scalar_t>(sum[c]);
    }
  }
}

// dA (n, n, n): dA[k,a,b] = sum_m Gab[m] B[k, m] over the p*q elements m = i*q + j of
// the block (a, b) of G. A split-K reduction: block (slice, a*n + b) = blockIdx.x and
// blockIdx.y = chunk of k sums one of `slices` contiguous ranges of m for kChunkK values
// of k, so that n = 1 with p*q = 4M still fills the GPU. Slice-major block order makes
// the n*n blocks of one slice, which read the same rows of B, run together and share
// them in L2. Each thread sums a strided range in registers; warp shuffles, then one
// shared-memory pass over the warps, give the block's sums, written to
// partial[slice, k, a, b]; the launcher adds the slices (no atomics: deterministic).
template <class scalar_t>
__global__ void kron_sum_grad_A_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ B,
                                       at::opmath_type<scalar_t>* __restrict__ partial, int64_t n, int64_t p,
                                       int64_t q, int64_t slice_len) {
  using acc_t = at::opmath_type<scalar_t>;
  static_assert(kThreads % 32 == 0 && kChunkK <= 32, "block reduction layout");
  __shared__ acc_t warp_sums[kChunkK][kThreads / 32];

  const int64_t pq = p * q, cols = n * q, nn = n * n;
  const int64_t slice = int64_t(blockIdx.x) / nn, ab = int64_t(blockIdx.x) % nn;
  const int64_t a = ab / n, b = ab % n;
  const int64_t k0 = int64_t(blockIdx.y) * kChunkK;
  const int64_t begin = slice * slice_len + threadIdx.x;
  const int64_t end = (slice + 1) * slice_len < pq ? (slice + 1) * slice_len : pq;
  const scalar_t* G_ab = G + a * p * cols + b * q;  // G[a*p+i, b*q+j] = G_ab[i*cols + j]
  const scalar_t* B_k0 = B + k0 * pq;               // B[k0+c, m]     = B_k0[c*p*q + m]

  acc_t sum[kChunkK] = {};
  if (begin < end) {
    DivModWalker ij(begin, q, kThreads);
    for (int64_t m = begin; m < end; m += kThreads, ij.advance()) {
      const acc_t g = static_cast<acc_t>(G_ab[ij.quot * cols + ij.rem]);
#pragma unroll
      for (int c = 0; c < kChunkK; ++c) {
        if (k0 + c < n) sum[c] += g * static_cast<acc_t>(B_k0[c * pq + m]);
      }
    }
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int c = 0; c < kChunkK; ++c) {
    const acc_t s = warp_sum(sum[c]);
    if (lane == 0) warp_sums[c][warp] = s;
  }
  __syncthreads();
  if (threadIdx.x < kChunkK && k0 + threadIdx.x < n) {
    const int c = threadIdx.x;
    acc_t total = 0;
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[c][w];
    partial[((slice * n + k0 + c) * n + a) * n + b] = total;
  }
}

// ---------------------------------------------------------------------------------
// Launchers: the table entries. Operands arrive contiguous, of one dtype, on one CUDA
// device, already checked (kernels/kron_sum.hpp); they run on the current stream.

inline int64_t ceil_div(int64_t x, int64_t y) { return (x + y - 1) / y; }

// W (n*p, n*q) = sum_k A[k] (x) B[k], contiguous.
inline torch::Tensor kron_sum_forward(const torch::Tensor& A, const torch::Tensor& B) {
  const int64_t n = B.size(0), p = B.size(1), q = B.size(2);
  const c10::cuda::CUDAGuard guard(B.device());
  auto W = torch::empty({n * p, n * q}, B.options());
  if (W.numel() == 0) return W;
  const int64_t cols = n * q;
  const int tile_cols = int(std::min<int64_t>(cols, kThreads));
  const int tile_rows = kThreads / tile_cols;
  const int threads = int(ceil_div(int64_t(tile_rows) * tile_cols, 32) * 32);
  const dim3 grid{unsigned(ceil_div(cols, tile_cols)), unsigned(std::min(ceil_div(n * p, tile_rows), kMaxGridY))};
  TORCH_CHECK(ceil_div(cols, tile_cols) <= std::numeric_limits<int32_t>::max(),
              "kron_sum (CUDA): W has too many columns (", cols, ") for one grid");
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.scalar_type(), "kron_sum_forward_cuda", [&] {
    kron_sum_forward_kernel<scalar_t><<<grid, threads, 0, stream>>>(
        A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), n, p, q, tile_rows, tile_cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return W;
}

// dA (n, n, n) from G (n*p, n*q) and B (n, p, q).
inline torch::Tensor kron_sum_grad_A(const torch::Tensor& G, const torch::Tensor& B) {
  const int64_t n = B.size(0), p = B.size(1), q = B.size(2), pq = p * q;
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t k_chunks = ceil_div(n, kChunkK);
  // About two waves of resident blocks (8 of 256 threads per SM), but at least 16
  // elements per thread, so the block reduction stays a small share of the work.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t wanted = ceil_div(2 * 8 * sms, n * n * k_chunks);
  const int64_t slice_len = ceil_div(pq, std::clamp<int64_t>(wanted, 1, ceil_div(pq, 16 * kThreads)));
  const int64_t slices = ceil_div(pq, slice_len);
  TORCH_CHECK(slices * n * n <= std::numeric_limits<int32_t>::max() && k_chunks <= kMaxGridY,
              "kron_sum (CUDA): n = ", n, " is too large for the grad_A grid");
  auto partial = torch::empty({slices, n, n, n}, G.options().dtype(at::toOpMathType(G.scalar_type())));
  const dim3 grid{unsigned(slices * n * n), unsigned(k_chunks)};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "kron_sum_grad_A_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kron_sum_grad_A_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        G.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), partial.data_ptr<acc_t>(), n, p, q, slice_len);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // (slices, n, n, n) -> (n, n, n), summed in opmath before the one rounding to dtype.
  auto dA = slices == 1 ? partial[0] : partial.sum(0);
  return dA.to(G.scalar_type()).contiguous();
}

// dB (n, p, q) from G (n*p, n*q) and A (n, n, n).
inline torch::Tensor kron_sum_grad_B(const torch::Tensor& G, const torch::Tensor& A) {
  const int64_t n = A.size(0), p = G.size(0) / n, q = G.size(1) / n;
  const c10::cuda::CUDAGuard guard(G.device());
  auto dB = torch::empty({n, p, q}, G.options());
  if (dB.numel() == 0) return dB;
  const int64_t k_chunks = ceil_div(n, kChunkK);
  TORCH_CHECK(k_chunks <= kMaxGridY, "kron_sum (CUDA): n = ", n, " is too large for the grad_B grid");
  // Enough blocks for a few waves; the kernel strides over whatever is left.
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t blocks = std::min(ceil_div(p * q, kThreads), ceil_div(32 * sms, k_chunks));
  const dim3 grid{unsigned(blocks), unsigned(k_chunks)};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "kron_sum_grad_B_cuda", [&] {
    kron_sum_grad_B_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        G.data_ptr<scalar_t>(), A.data_ptr<scalar_t>(), dB.data_ptr<scalar_t>(), n, p, q);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dB;
}

}  // namespace deltatune::detail::cuda

// Registration: C++17 inline variables are initialised once per program, however many
// translation units include this header.
namespace deltatune::detail {
inline const KronSumKernels cuda_kron_sum_kernels{"cuda", &cuda::kron_sum_forward, &cuda::kron_sum_grad_A,
                                                  &cuda::kron_sum_grad_B};
inline const bool cuda_kron_sum_registered = (registered_cuda_kernels() = &cuda_kron_sum_kernels, true);
}  // namespace deltatune::detail
