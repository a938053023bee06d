// Kronecker sums W = sum_k A_k (x) B_k, the weights of PHM and Compacter layers, and
// their product with an input, each with its own backward.
//
//   kron_sum(A, B)              A (n, n, n), B (n, p, q)            -> W (n*p, n*q)
//   kron_sum(A, s, t)           B_k = s_k t_k, s (n, p, r), t (n, r, q)
//   kron_sum_matmul(x, A, B)    x (..., n*p) -> x W (..., n*q), with W built (dense)
//   kron_sum_matmul(x, A, s, t)   or applied factor by factor (factored), see KronSumPath
//
// The fused kernels (CPU here, CUDA in kron_sum_cuda.cuh) never form the n separate
// Kronecker products that the reference implementations stack and sum. First-order
// gradients only: the backward passes are not themselves differentiable.
#pragma once

#include <torch/torch.h>

#include <deltatune/core/error.hpp>
#include <deltatune/core/precision.hpp>
#include <deltatune/kernels/kernel_table.hpp>
#include <deltatune/kernels/kron_sum_cpu.hpp>
#include <deltatune/kernels/kron_sum_reference.hpp>

namespace deltatune {

// How kron_sum_matmul computes x W.
enum class KronSumPath {
  automatic,  // the faster of the two for the shapes, by the rule in detail::prefer_factored
  dense,      // build W with the fused kernel, then one matrix product
  factored,   // never build W (nor B for the low-rank form): contract x with A, s and t in turn
};

namespace detail {

inline std::string shape_of(const torch::Tensor& t) { return fmt::format("[{}]", fmt::join(t.sizes(), ", ")); }

// The kernel table for the tensor's device: the fused kernels where compiled in,
// else the ATen reference path (which runs anywhere).
inline const KronSumKernels& kron_sum_kernels_for(const torch::Tensor& t) {
  if (t.is_cpu()) return cpu::kernels();
  if (t.is_cuda()) {
    if (const KronSumKernels* cuda = registered_cuda_kernels()) return *cuda;
    TORCH_WARN_ONCE(
        "deltatune: the fused CUDA kron_sum kernels are not compiled into this program; using the ATen "
        "path. Link the CMake target deltatune::cuda (or include <deltatune/kernels/kron_sum_cuda.cuh> "
        "in one .cu file) to get them.");
  }
  return reference::kernels();
}

inline void check_same_kind(const char* op, const torch::Tensor& A, const char* name, const torch::Tensor& other) {
  check<ShapeError>(other.scalar_type() == A.scalar_type() && other.device() == A.device(),
                    "{}: {} is {} on {} but A is {} on {}; convert them to one dtype and device", op, name,
                    c10::toString(other.scalar_type()), other.device().str(), c10::toString(A.scalar_type()),
                    A.device().str());
}

// A (n, n, n), floating point: the shared factor of every form.
inline void check_A(const char* op, const torch::Tensor& A) {
  check<ShapeError>(A.dim() == 3 && A.size(0) == A.size(1) && A.size(1) == A.size(2) && A.size(0) > 0,
                    "{}: A must have shape (n, n, n) with n > 0, got {}", op, shape_of(A));
  check<ShapeError>(at::isFloatingType(A.scalar_type()), "{}: A must be floating point, got {}", op,
                    c10::toString(A.scalar_type()));
}

inline void check_factors(const char* op, const torch::Tensor& A, const torch::Tensor& B) {
  check_A(op, A);
  check<ShapeError>(B.dim() == 3 && B.size(0) == A.size(0) && B.size(1) > 0 && B.size(2) > 0,
                    "{}: B must have shape (n, p, q) with n = {} (from A) and p, q > 0, got {}", op, A.size(0),
                    shape_of(B));
  check_same_kind(op, A, "B", B);
}

inline void check_low_rank_factors(const char* op, const torch::Tensor& A, const torch::Tensor& s,
                                   const torch::Tensor& t) {
  check_A(op, A);
  const int64_t n = A.size(0);
  check<ShapeError>(s.dim() == 3 && s.size(0) == n && s.size(1) > 0 && s.size(2) > 0,
                    "{}: s must have shape (n, p, r) with n = {} (from A), got {}", op, n, shape_of(s));
  check<ShapeError>(t.dim() == 3 && t.size(0) == n && t.size(1) == s.size(2) && t.size(2) > 0,
                    "{}: t must have shape (n, r, q) with n = {} and r = {} (from s), got {}", op, n, s.size(2),
                    shape_of(t));
  check_same_kind(op, A, "s", s);
  check_same_kind(op, A, "t", t);
}

inline void check_input(const char* op, const torch::Tensor& x, const torch::Tensor& A, int64_t in_features) {
  check<ShapeError>(x.dim() >= 1 && x.size(-1) == in_features,
                    "{}: x must end in n*p = {} features, got shape {}", op, in_features, shape_of(x));
  check_same_kind(op, A, "x", x);
}

// W = sum_k A_k (x) B_k through the device's fused kernels.
struct KronSumFunction : torch::autograd::Function<KronSumFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& A, const torch::Tensor& B) {
    auto a = A.contiguous(), b = B.contiguous();
    ctx->save_for_backward({a, b});
    return kron_sum_kernels_for(a).forward(a, b);
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& A = saved[0];
    const auto& B = saved[1];
    const auto G = grads[0].contiguous();
    const auto& kernels = kron_sum_kernels_for(A);
    torch::Tensor dA, dB;
    if (ctx->needs_input_grad(0)) dA = kernels.grad_A(G, B);
    if (ctx->needs_input_grad(1)) dB = kernels.grad_B(G, A);
    return {dA, dB};
  }
};

// Shape of x with its last dimension replaced.
inline std::vector<int64_t> with_last_dim(torch::IntArrayRef shape, int64_t last) {
  auto out = shape.vec();
  out.back() = last;
  return out;
}

// x W without W, with X = x as (M, n_a, p):
//   U[m,(b,k),i] = sum_a A[k,a,b] X[m,a,i]          (M, n*n, p)
//   y[m,b,j]     = sum_{k,i} U[m,(b,k),i] B[k,i,j]  one (M*n, n*p) x (n*p, q) product.
// U is n times the size of x, so backward recomputes it rather than keeping it.
struct KronSumMatmulFunction : torch::autograd::Function<KronSumMatmulFunction> {
  // A as [(b,k), a], so that U = A_bk_a X is one broadcast matrix product.
  static torch::Tensor A_bk_a(const torch::Tensor& A) {
    const int64_t n = A.size(0);
    return A.permute({2, 0, 1}).reshape({n * n, n});
  }

  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& A,
                               const torch::Tensor& B) {
    const int64_t n = B.size(0), p = B.size(1), q = B.size(2);
    auto X = x.reshape({-1, n, p});
    ctx->save_for_backward({X, A, B});
    ctx->saved_data["x_shape"] = x.sizes().vec();
    auto U = torch::matmul(A_bk_a(A), X);                     // (M, n*n, p)
    auto y = U.view({-1, n * p}).mm(B.reshape({n * p, q}));  // (M*n, q)
    return y.view(with_last_dim(x.sizes(), n * q));
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &X = saved[0], &A = saved[1], &B = saved[2];
    const int64_t n = B.size(0), p = B.size(1), q = B.size(2), M = X.size(0);
    const auto gy = grads[0].reshape({M * n, q});  // [(m,b), j]
    const auto Abk = A_bk_a(A);
    torch::Tensor dx, dA, dB;
    if (ctx->needs_input_grad(2)) dB = torch::matmul(Abk, X).view({M * n, n * p}).t().mm(gy).view({n, p, q});
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1)) {
      const auto dU = gy.mm(B.reshape({n * p, q}).t()).view({M, n * n, p});  // [m, (b,k), i]
      if (ctx->needs_input_grad(0)) dx = torch::matmul(Abk.t(), dU).view(ctx->saved_data["x_shape"].toIntVector());
      if (ctx->needs_input_grad(1)) {
        // dA[k,a,b] = sum_{m,i} dU[m,(b,k),i] X[m,a,i]
        auto dAbk = dU.permute({1, 0, 2}).reshape({n * n, M * p}).mm(X.permute({0, 2, 1}).reshape({M * p, n}));
        dA = dAbk.view({n, n, n}).permute({1, 2, 0}).contiguous();
      }
    }
    return {dx, dA, dB};
  }
};

// x W for W = sum_k A_k (x) s_k t_k without W or B, with X = x as (M*n_a, p):
//   Z[(m,a),(k,l)] = sum_i X[(m,a),i] s[k,i,l]       one (M*n, p) x (p, n*r) product
//   V[m,b,k,l]     = sum_a A[k,a,b] Z[m,a,k,l]       (M, n, n, r)
//   y[(m,b),j]     = sum_{k,l} V[(m,b),(k,l)] t[k,l,j]  one (M*n, n*r) x (n*r, q) product
// Z and V hold n*r numbers per row of X, far fewer than x itself, so both are kept.
struct LowRankKronSumMatmulFunction : torch::autograd::Function<LowRankKronSumMatmulFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& A,
                               const torch::Tensor& s, const torch::Tensor& t) {
    const int64_t n = s.size(0), p = s.size(1), r = s.size(2), q = t.size(2);
    auto X = x.reshape({-1, p});                                       // (M*n, p)
    auto S = s.permute({1, 0, 2}).reshape({p, n * r});                 // [i, (k,l)]
    auto Z = X.mm(S).view({-1, n, n, r});                              // (M, n_a, n_k, r)
    auto V = torch::einsum("makl,kab->mbkl", {Z, A}).reshape({-1, n * r});  // (M*n, n*r)
    ctx->save_for_backward({X, A, s, t, Z, V});
    ctx->saved_data["x_shape"] = x.sizes().vec();
    return V.mm(t.reshape({n * r, q})).view(with_last_dim(x.sizes(), n * q));
  }

  static torch::autograd::tensor_list backward(torch::autograd::AutogradContext* ctx,
                                               torch::autograd::tensor_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &X = saved[0], &A = saved[1], &s = saved[2], &t = saved[3], &Z = saved[4], &V = saved[5];
    const int64_t n = s.size(0), p = s.size(1), r = s.size(2), q = t.size(2);
    const auto gy = grads[0].reshape({-1, q});  // [(m,b), j]
    torch::Tensor dx, dA, ds, dt;
    if (ctx->needs_input_grad(3)) dt = V.t().mm(gy).view({n, r, q});
    if (!(ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || ctx->needs_input_grad(2))) return {dx, dA, ds, dt};
    const auto dV = gy.mm(t.reshape({n * r, q}).t()).view({-1, n, n, r});  // (M, n_b, n_k, r)
    if (ctx->needs_input_grad(1)) dA = torch::einsum("makl,mbkl->kab", {Z, dV});
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(2)) {
      const auto dZ = torch::einsum("mbkl,kab->makl", {dV, A}).reshape({-1, n * r});  // (M*n, n*r)
      if (ctx->needs_input_grad(2)) ds = X.t().mm(dZ).view({p, n, r}).permute({1, 0, 2}).contiguous();
      if (ctx->needs_input_grad(0)) {
        dx = dZ.mm(s.permute({1, 0, 2}).reshape({p, n * r}).t()).view(ctx->saved_data["x_shape"].toIntVector());
      }
    }
    return {dx, dA, ds, dt};
  }
};

// Whether the factored path beats building W, counting multiply-adds per row of x:
// dense pays n*p*n*q for the product (W itself is built once per call, not per row);
// factored pays n*r*(n*p + n*q) + n^3*r in three thin products. With full-rank B
// the factored path does the dense product's multiply-adds plus the contraction with
// A, over activations n times the size of x: measured 0.06x to 1.4x the speed of
// dense and up to 18% more memory, so automatic stays dense for it (kron_sum_matmul
// with B never asks this rule). kFactoredOverhead prices the thin products against one
// large one: on CPU (benchmarks/kron_sum_bench, 1024 tokens, fp32) the two paths are
// within noise of each other for Compacter's 768x24 and 24x768 layers at n = 4, and
// factored is 8-17x faster at 1024x4096 and 4096x1024; 8 keeps the small layers dense.
inline bool prefer_factored(int64_t n, int64_t p, int64_t q, int64_t r) {
  constexpr double kFactoredOverhead = 8.0;
  const double dense = double(n * p) * double(n * q);
  const double factored = double(n * r) * double(n * p + n * q + n * n);
  return kFactoredOverhead * factored < dense;
}

// Whether kron_sum_matmul takes the factored path on `path`: where asked, or, under automatic,
// for a low-rank B (r > 0; 0 for a full B) where prefer_factored says so.
inline bool takes_factored_path(KronSumPath path, int64_t n, int64_t p, int64_t q, int64_t r) {
  return path == KronSumPath::factored || (path == KronSumPath::automatic && r > 0 && prefer_factored(n, p, q, r));
}

}  // namespace detail

// W (n*p, n*q) = sum_k A[k] (x) B[k] for A (n, n, n) and B (n, p, q), in one pass.
inline torch::Tensor kron_sum(const torch::Tensor& A, const torch::Tensor& B) {
  detail::check_factors("kron_sum", A, B);
  return detail::KronSumFunction::apply(A, B);
}

// W = sum_k A[k] (x) (s[k] t[k]) for s (n, p, r) and t (n, r, q): Compacter's LPHM weight.
// B = s t is formed first: it costs n*p*q*r, a 1/n^2 share of the Kronecker sum
// itself, while summing rank-r terms inside the kernel would multiply that by r.
// B is formed in the factors' precision, also under autocast (which would round it to bf16, and
// the kernel takes A and B alike).
inline torch::Tensor kron_sum(const torch::Tensor& A, const torch::Tensor& s, const torch::Tensor& t) {
  detail::check_low_rank_factors("kron_sum", A, s, t);
  const detail::AutocastOff off;
  return detail::KronSumFunction::apply(A, torch::bmm(s, t));
}

// x W for W = kron_sum(A, B), x (..., n*p) -> (..., n*q). The factored path applies
// A and B to x in turn and never builds W; automatic picks dense for full-rank B.
inline torch::Tensor kron_sum_matmul(const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& B,
                                     KronSumPath path = KronSumPath::automatic) {
  detail::check_factors("kron_sum_matmul", A, B);
  detail::check_input("kron_sum_matmul", x, A, A.size(0) * B.size(1));
  if (detail::takes_factored_path(path, A.size(0), B.size(1), B.size(2), 0))
    return detail::KronSumMatmulFunction::apply(x, A, B);
  return torch::matmul(x, kron_sum(A, B));
}

// x W for W = kron_sum(A, s, t), Compacter's LPHM layer. The factored path costs
// n*r*(in + out) per row instead of in*out, which wins for large layers.
inline torch::Tensor kron_sum_matmul(const torch::Tensor& x, const torch::Tensor& A, const torch::Tensor& s,
                                     const torch::Tensor& t, KronSumPath path = KronSumPath::automatic) {
  detail::check_low_rank_factors("kron_sum_matmul", A, s, t);
  const int64_t n = A.size(0), p = s.size(1), r = s.size(2), q = t.size(2);
  detail::check_input("kron_sum_matmul", x, A, n * p);
  if (detail::takes_factored_path(path, n, p, q, r)) return detail::LowRankKronSumMatmulFunction::apply(x, A, s, t);
  return torch::matmul(x, kron_sum(A, s, t));
}

}  // namespace deltatune
