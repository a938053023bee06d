// The three raw Kronecker-sum kernels, as a table per device, and the registry that
// lets a CUDA translation unit plug its table in at load time.
//
// Every entry takes contiguous tensors of one dtype on one device, already checked
// by the caller (kernels/kron_sum.hpp), and returns a new contiguous tensor.
// With A (n, n, n) indexed [k, a, b], B (n, p, q) indexed [k, i, j] and
// W (n*p, n*q) indexed [a*p + i, b*q + j]:
//   forward: W[a*p+i, b*q+j]   = sum_k A[k, a, b] * B[k, i, j]
//   grad_A:  dA[k, a, b]       = sum_{i,j} G[a*p+i, b*q+j] * B[k, i, j]
//   grad_B:  dB[k, i, j]       = sum_{a,b} G[a*p+i, b*q+j] * A[k, a, b]
// Sums run in at::opmath_type<scalar_t> (float for half and bfloat16).
#pragma once

#include <torch/torch.h>

namespace deltatune::detail {

struct KronSumKernels {
  const char* name;  // "cpu", "cuda", "reference": shown in messages and benchmarks
  torch::Tensor (*forward)(const torch::Tensor& A, const torch::Tensor& B);
  torch::Tensor (*grad_A)(const torch::Tensor& G, const torch::Tensor& B);
  torch::Tensor (*grad_B)(const torch::Tensor& G, const torch::Tensor& A);
};

// Set by including <deltatune/kernels/kron_sum_cuda.cuh> in one CUDA translation
// unit of the program (the deltatune::cuda CMake target does this for you).
inline const KronSumKernels*& registered_cuda_kernels() {
  static const KronSumKernels* table = nullptr;
  return table;
}

}  // namespace deltatune::detail
