// The Kronecker sum written with ATen operations: the oracle the fused kernels are
// tested against, and the path taken on devices with no fused kernel compiled in.
//
// naive_kron_sum is what the reference implementations (compacter, adapters) do:
// n dense Kronecker products, stacked and summed. The table entries instead write
// each operation as one matrix product and a permutation, which any device runs.
#pragma once

#include <torch/torch.h>

#include <deltatune/kernels/kernel_table.hpp>

namespace deltatune::detail::reference {

// sum_k torch::kron(A[k], B[k]): n products of the full size of W.
inline torch::Tensor naive_kron_sum(const torch::Tensor& A, const torch::Tensor& B) {
  std::vector<torch::Tensor> products;
  for (int64_t k = 0; k < A.size(0); ++k) products.push_back(torch::kron(A[k], B[k]));
  return torch::stack(products).sum(0);
}

// W[(a,i),(b,j)] = sum_k A[k,a,b] B[k,i,j]: (n*n, n) x (n, p*q) then (a,b,i,j) -> (a,i,b,j).
inline torch::Tensor forward(const torch::Tensor& A, const torch::Tensor& B) {
  const int64_t n = B.size(0), p = B.size(1), q = B.size(2);
  return A.reshape({n, n * n}).t().mm(B.reshape({n, p * q})).view({n, n, p, q}).permute({0, 2, 1, 3}).reshape({n * p, n * q});
}

// G viewed as (a, i, b, j) and permuted to ((a,b), (i,j)).
inline torch::Tensor blocks_of(const torch::Tensor& G, int64_t n) {
  const int64_t p = G.size(0) / n, q = G.size(1) / n;
  return G.view({n, p, n, q}).permute({0, 2, 1, 3}).reshape({n * n, p * q});
}

inline torch::Tensor grad_A(const torch::Tensor& G, const torch::Tensor& B) {
  const int64_t n = B.size(0);
  return B.reshape({n, -1}).mm(blocks_of(G, n).t()).view({n, n, n});
}

inline torch::Tensor grad_B(const torch::Tensor& G, const torch::Tensor& A) {
  const int64_t n = A.size(0), p = G.size(0) / n, q = G.size(1) / n;
  return A.reshape({n, n * n}).mm(blocks_of(G, n)).view({n, p, q});
}

inline const KronSumKernels& kernels() {
  static const KronSumKernels table{"reference", &forward, &grad_A, &grad_B};
  return table;
}

}  // namespace deltatune::detail::reference
