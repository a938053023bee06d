// CPU kernels of the Kronecker sum W = sum_k A_k (x) B_k and of its two gradients.
//
// Each kernel reads its operands once and writes its result once: the n separate
// Kronecker products are never formed. Work is split over output rows with
// at::parallel_for; the innermost loops run over contiguous rows of B or of the
// gradient, which the compiler vectorises (cpu_loops.hpp). Sums run in at::opmath_type<scalar_t>
// (float for half and bfloat16). Index conventions: kernels/kernel_table.hpp.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/torch.h>

#include <algorithm>
#include <vector>

#include <deltatune/kernels/cpu_loops.hpp>
#include <deltatune/kernels/kernel_table.hpp>

namespace deltatune::detail::cpu {

// W row (a, i) = [ sum_k A[k,a,b] * B[k,i,:] for b in 0..n ]   (length n*q)
template <class scalar_t>
void forward_rows(const scalar_t* A, const scalar_t* B, scalar_t* W, int64_t n, int64_t p, int64_t q,
                  int64_t row_begin, int64_t row_end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(n * q);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t a = row / p, i = row % p;
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t k = 0; k < n; ++k) {
      const scalar_t* B_row = B + (k * p + i) * q;
      const scalar_t* A_row = A + (k * n + a) * n;
      for (int64_t b = 0; b < n; ++b) axpy(acc.data() + b * q, static_cast<acc_t>(A_row[b]), B_row, q);
    }
    std::copy(acc.begin(), acc.end(), W + row * n * q);
  }
}

// dB[:, i, :] gathers the rows (a, i) of G for every a, so each task owns a set of i
// and reads each row of G once: dB[k,i,:] += A[k,a,b] * G[a*p+i, b*q : b*q+q].
template <class scalar_t>
void grad_B_slices(const scalar_t* G, const scalar_t* A, scalar_t* dB, int64_t n, int64_t p, int64_t q,
                   int64_t i_begin, int64_t i_end) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> acc(n * q);  // [k, j] for the current i
  for (int64_t i = i_begin; i < i_end; ++i) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t a = 0; a < n; ++a) {
      const scalar_t* G_row = G + (a * p + i) * n * q;
      for (int64_t k = 0; k < n; ++k) {
        const scalar_t* A_row = A + (k * n + a) * n;
        for (int64_t b = 0; b < n; ++b) axpy(acc.data() + k * q, static_cast<acc_t>(A_row[b]), G_row + b * q, q);
      }
    }
    for (int64_t k = 0; k < n; ++k) std::copy_n(acc.data() + k * q, q, dB + (k * p + i) * q);
  }
}

// dA[k,a,b] is a reduction over all p*q elements of the block (a, b) of G, so each
// task sums its rows into a partial (n, n, n) of its own; the partials are added after.
template <class scalar_t>
void grad_A_rows(const scalar_t* G, const scalar_t* B, at::opmath_type<scalar_t>* partial, int64_t n, int64_t p,
                 int64_t q, int64_t row_begin, int64_t row_end) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t a = row / p, i = row % p;
    const scalar_t* G_row = G + row * n * q;
    for (int64_t k = 0; k < n; ++k) {
      const scalar_t* B_row = B + (k * p + i) * q;
      acc_t* out = partial + (k * n + a) * n;
      for (int64_t b = 0; b < n; ++b) out[b] += dot<acc_t>(G_row + b * q, B_row, q);
    }
  }
}

// Blocks narrower than a vector (q < kLanes: Compacter's 768x24 layer at n = 4 has
// q = 6, PHM's at n = 12 has q = 2) would leave the loops above a few iterations
// long. For those, the kernels work on whole rows of n*q, with B's row i tiled n
// times and A's coefficients repeated q times,
//   tiles[k][b*q + j] = B[k, i, j]        A_wide[k][a][b*q + j] = A[k, a, b]
// so that every product is one elementwise multiply-add of length n*q. Tasks own
// a set of i, so that each tile serves the n rows (a, i) that share it.
template <class acc_t>
inline bool is_narrow(int64_t q) { return q < kLanes<acc_t>; }

// out[0:len] += x[0:len] * y[0:len]
template <class acc_t, class x_t>
inline void multiply_add(acc_t* __restrict out, const x_t* __restrict x, const acc_t* __restrict y, int64_t len) {
  for (int64_t j = 0; j < len; ++j) out[j] += static_cast<acc_t>(x[j]) * y[j];
}

template <class acc_t, class scalar_t>
std::vector<acc_t> widen_A(const scalar_t* A, int64_t n, int64_t q) {
  std::vector<acc_t> wide(n * n * n * q);
  for (int64_t kab = 0; kab < n * n * n; ++kab) std::fill_n(wide.data() + kab * q, q, static_cast<acc_t>(A[kab]));
  return wide;
}

template <class acc_t, class scalar_t>
void tile_B_row(const scalar_t* B, int64_t n, int64_t p, int64_t q, int64_t i, acc_t* tiles) {
  for (int64_t k = 0; k < n; ++k) {
    acc_t* tile = tiles + k * n * q;
    for (int64_t j = 0; j < q; ++j) tile[j] = static_cast<acc_t>(B[(k * p + i) * q + j]);
    for (int64_t b = 1; b < n; ++b) std::copy_n(tile, q, tile + b * q);
  }
}

template <class scalar_t>
void forward_narrow_slices(const scalar_t* A, const scalar_t* B, scalar_t* W, int64_t n, int64_t p, int64_t q,
                           int64_t i_begin, int64_t i_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = n * q;
  const auto A_wide = widen_A<acc_t>(A, n, q);
  std::vector<acc_t> tiles(n * width), acc(width);
  for (int64_t i = i_begin; i < i_end; ++i) {
    tile_B_row(B, n, p, q, i, tiles.data());
    for (int64_t a = 0; a < n; ++a) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = 0; k < n; ++k) {
        multiply_add(acc.data(), A_wide.data() + (k * n + a) * width, tiles.data() + k * width, width);
      }
      std::copy(acc.begin(), acc.end(), W + (a * p + i) * width);
    }
  }
}

// acc[k][b*q + j] sums A[k,a,b] G[a*p+i, b*q+j] over a; dB[k,i,j] folds the n blocks.
template <class scalar_t>
void grad_B_narrow_slices(const scalar_t* G, const scalar_t* A, scalar_t* dB, int64_t n, int64_t p, int64_t q,
                          int64_t i_begin, int64_t i_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = n * q;
  const auto A_wide = widen_A<acc_t>(A, n, q);
  std::vector<acc_t> acc(n * width);
  for (int64_t i = i_begin; i < i_end; ++i) {
    std::fill(acc.begin(), acc.end(), acc_t(0));
    for (int64_t a = 0; a < n; ++a) {
      const scalar_t* G_row = G + (a * p + i) * width;
      for (int64_t k = 0; k < n; ++k) {
        multiply_add(acc.data() + k * width, G_row, A_wide.data() + (k * n + a) * width, width);
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      for (int64_t j = 0; j < q; ++j) {
        acc_t sum = 0;
        for (int64_t b = 0; b < n; ++b) sum += acc[k * width + b * q + j];
        dB[(k * p + i) * q + j] = static_cast<scalar_t>(sum);
      }
    }
  }
}

// acc[k][a][b*q + j] sums G[a*p+i, b*q+j] B[k,i,j] over i; the partial folds the q lanes.
template <class scalar_t>
void grad_A_narrow_slices(const scalar_t* G, const scalar_t* B, at::opmath_type<scalar_t>* partial, int64_t n,
                          int64_t p, int64_t q, int64_t i_begin, int64_t i_end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t width = n * q;
  std::vector<acc_t> tiles(n * width), acc(n * n * width, acc_t(0));
  for (int64_t i = i_begin; i < i_end; ++i) {
    tile_B_row(B, n, p, q, i, tiles.data());
    for (int64_t a = 0; a < n; ++a) {
      const scalar_t* G_row = G + (a * p + i) * width;
      for (int64_t k = 0; k < n; ++k) {
        multiply_add(acc.data() + (k * n + a) * width, G_row, tiles.data() + k * width, width);
      }
    }
  }
  for (int64_t kab = 0; kab < n * n * n; ++kab) {
    for (int64_t j = 0; j < q; ++j) partial[kab] += acc[kab * q + j];
  }
}

inline torch::Tensor forward(const torch::Tensor& A, const torch::Tensor& B) {
  const int64_t n = B.size(0), p = B.size(1), q = B.size(2);
  auto W = torch::empty({n * p, n * q}, B.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.scalar_type(), "kron_sum_cpu", [&] {
    const scalar_t* a = A.data_ptr<scalar_t>();
    const scalar_t* b = B.data_ptr<scalar_t>();
    scalar_t* w = W.data_ptr<scalar_t>();
    if (is_narrow<at::opmath_type<scalar_t>>(q)) {
      at::parallel_for(0, p, grain_rows(n * n * q), [&](int64_t begin, int64_t end) {
        forward_narrow_slices(a, b, w, n, p, q, begin, end);
      });
    } else {
      at::parallel_for(0, n * p, grain_rows(n * q), [&](int64_t begin, int64_t end) {
        forward_rows(a, b, w, n, p, q, begin, end);
      });
    }
  });
  return W;
}

inline torch::Tensor grad_B(const torch::Tensor& G, const torch::Tensor& A) {
  const int64_t n = A.size(0), p = G.size(0) / n, q = G.size(1) / n;
  auto dB = torch::empty({n, p, q}, G.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, G.scalar_type(), "kron_sum_grad_B_cpu", [&] {
    const scalar_t* g = G.data_ptr<scalar_t>();
    const scalar_t* a = A.data_ptr<scalar_t>();
    scalar_t* db = dB.data_ptr<scalar_t>();
    const bool narrow = is_narrow<at::opmath_type<scalar_t>>(q);
    at::parallel_for(0, p, grain_rows(n * n * q), [&](int64_t begin, int64_t end) {
      if (narrow) {
        grad_B_narrow_slices(g, a, db, n, p, q, begin, end);
      } else {
        grad_B_slices(g, a, db, n, p, q, begin, end);
      }
    });
  });
  return dB;
}

inline torch::Tensor grad_A(const torch::Tensor& G, const torch::Tensor& B) {
  const int64_t n = B.size(0), p = B.size(1), q = B.size(2);
  const auto acc_dtype = at::toOpMathType(B.scalar_type());
  auto partials = torch::zeros({at::get_num_threads(), n, n, n}, B.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, B.scalar_type(), "kron_sum_grad_A_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = G.data_ptr<scalar_t>();
    const scalar_t* b = B.data_ptr<scalar_t>();
    acc_t* parts = partials.data_ptr<acc_t>();
    auto own_partial = [&] { return parts + at::get_thread_num() * n * n * n; };
    if (is_narrow<acc_t>(q)) {
      at::parallel_for(0, p, grain_rows(n * n * q), [&](int64_t begin, int64_t end) {
        grad_A_narrow_slices(g, b, own_partial(), n, p, q, begin, end);
      });
    } else {
      at::parallel_for(0, n * p, grain_rows(n * q), [&](int64_t begin, int64_t end) {
        grad_A_rows(g, b, own_partial(), n, p, q, begin, end);
      });
    }
  });
  return partials.sum(0).to(B.scalar_type());
}

inline const KronSumKernels& kernels() {
  static const KronSumKernels table{"cpu", &forward, &grad_A, &grad_B};
  return table;
}

}  // namespace deltatune::detail::cpu
