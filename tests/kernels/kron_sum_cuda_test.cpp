// Tests of kernels/kron_sum_cuda.cuh: the fused CUDA kernels, registered by linking
// deltatune::cuda into this runner, against a float64 CPU oracle (a sum of torch::kron,
// and einsum for the gradients), per dtype. Without a visible GPU only the registration
// is checked and the rest is skipped with a warning.
#include <deltatune/kernels/kernel_table.hpp>
#include <deltatune/kernels/kron_sum.hpp>

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

namespace kron_sum_cuda_test {

namespace dt = deltatune;

// The CUDA cases' helpers, left out without CUDA, where they would go unused (-Wunused-function).
#ifdef DELTATUNE_TESTS_HAVE_CUDA
namespace {

struct Shape {
  int64_t n, p, q;
};

// n = 1, 2, 4, 12; p or q = 1; non-square blocks; Compacter's 768x24 and 24x768 at n = 4;
// n*q > 256 (column tiles, one partial); p*q = 4M (grad_A split over many slices); and
// n*p > 65535 * 256 rows of one column (the forward's row loop past the grid's y limit).
const std::vector<Shape> kShapes = {{1, 1, 1},    {1, 5, 3},       {2, 3, 1},   {2, 1, 4},
                                    {3, 7, 5},    {4, 192, 6},     {4, 6, 192}, {12, 64, 2},
                                    {12, 3, 5},   {2, 33, 129},    {5, 2, 11},  {1, 2048, 2048},
                                    {1, (int64_t(1) << 24) + 7, 1}};
const std::vector<torch::ScalarType> kDtypes = {torch::kFloat64, torch::kFloat32, torch::kFloat16, torch::kBFloat16};

// The inputs are rounded to dtype before the oracle sees them, so what is left is the
// kernel's sum in opmath (float for half types: 2^-24 per addition) and the one final
// rounding to dtype: half an ulp, 2^-53, 2^-24, 2^-11 and 2^-8 of the value for float64,
// float32, float16 and bfloat16. fp16 gets 4 half-ulps (2e-3) and bf16 5 (2e-2); fp32
// (1e-5) and fp64 (1e-12) leave room for the accumulated error of sums of up to 16M
// terms, which the kernels split into short per-thread runs and a tree.
double rtol_for(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat64: return 1e-12;
    case torch::kFloat32: return 1e-5;
    case torch::kFloat16: return 2e-3;
    case torch::kBFloat16: return 2e-2;
    default: throw std::invalid_argument("no tolerance for this dtype");
  }
}

// |actual - expected| <= rtol * (|expected| + sqrt(terms)) element by element. A sum of
// `terms` products of standard normals is about sqrt(terms) in size, and its rounding
// error scales with that, not with the sum itself, which can cancel to near zero.
bool close(const torch::Tensor& actual, const torch::Tensor& expected, double rtol, int64_t terms,
           std::string& report) {
  std::ostringstream out;
  if (actual.sizes() != expected.sizes()) {
    out << "shape " << actual.sizes() << " but expected " << expected.sizes();
    report = out.str();
    return false;
  }
  const auto diff = (actual.cpu().to(torch::kFloat64) - expected).abs();
  const auto bound = rtol * (expected.abs() + std::sqrt(double(terms)));
  out << "max |difference| = " << diff.max().item<double>() << ", max difference / bound = "
      << (diff / bound).max().item<double>();
  report = out.str();
  return (diff <= bound).all().item<bool>();
}

std::string label(const Shape& s, torch::ScalarType dtype) {
  return "n=" + std::to_string(s.n) + " p=" + std::to_string(s.p) + " q=" + std::to_string(s.q) + " " +
         c10::toString(dtype);
}

// The oracle, in float64 on the CPU from the same (rounded) inputs.
torch::Tensor oracle_forward(const torch::Tensor& A, const torch::Tensor& B) {
  auto A64 = A.cpu().to(torch::kFloat64), B64 = B.cpu().to(torch::kFloat64);
  auto W = torch::kron(A64[0], B64[0]);
  for (int64_t k = 1; k < A64.size(0); ++k) W += torch::kron(A64[k], B64[k]);
  return W;
}

// G (n*p, n*q) as (a, i, b, j).
torch::Tensor oracle_blocks(const torch::Tensor& G, const Shape& s) {
  return G.cpu().to(torch::kFloat64).view({s.n, s.p, s.n, s.q});
}

torch::Tensor oracle_grad_A(const torch::Tensor& G, const torch::Tensor& B, const Shape& s) {
  return torch::einsum("aibj,kij->kab", {oracle_blocks(G, s), B.cpu().to(torch::kFloat64)});
}

torch::Tensor oracle_grad_B(const torch::Tensor& G, const torch::Tensor& A, const Shape& s) {
  return torch::einsum("aibj,kab->kij", {oracle_blocks(G, s), A.cpu().to(torch::kFloat64)});
}

}  // namespace
#endif

CATCH_TEST_CASE("the CUDA kron_sum kernels are registered by linking deltatune::cuda", "[kron_sum][cuda]") {
#ifdef DELTATUNE_TESTS_HAVE_CUDA
  // Registration happens at load time and needs no GPU, so this runs everywhere.
  CATCH_REQUIRE(dt::detail::registered_cuda_kernels() != nullptr);
  CATCH_CHECK(std::string(dt::detail::registered_cuda_kernels()->name) == "cuda");
#else
  CATCH_WARN("CUDA tests skipped: deltatune was configured without CUDA (DELTATUNE_HAS_CUDA is off)");
#endif
}

CATCH_TEST_CASE("CUDA kron_sum kernels equal the float64 oracle", "[kron_sum][cuda]") {
#ifdef DELTATUNE_TESTS_HAVE_CUDA
  if (!dt::testing::cuda_or_skip()) return;
  // CUDA tensors dispatch to the registered kernels.
  CATCH_CHECK(std::string(dt::detail::kron_sum_kernels_for(torch::randn({2, 2, 2}, torch::kCUDA)).name) == "cuda");
  const auto& kernels = *dt::detail::registered_cuda_kernels();
  torch::manual_seed(3);
  for (auto dtype : kDtypes) {
    for (const auto& s : kShapes) {
      const auto options = torch::TensorOptions().dtype(dtype).device(torch::kCUDA);
      const auto A = torch::randn({s.n, s.n, s.n}).to(options);
      const auto B = torch::randn({s.n, s.p, s.q}).to(options);
      const auto G = torch::randn({s.n * s.p, s.n * s.q}).to(options);
      const double rtol = rtol_for(dtype);
      std::string report;

      const auto W = kernels.forward(A, B);
      CATCH_INFO(label(s, dtype) << " forward");
      CATCH_CHECK(W.scalar_type() == dtype);
      CATCH_CHECK(W.device() == A.device());
      const bool forward_ok = close(W, oracle_forward(A, B), rtol, s.n, report);
      CATCH_INFO(report);
      CATCH_CHECK(forward_ok);

      const auto dA = kernels.grad_A(G, B);
      CATCH_CHECK(dA.scalar_type() == dtype);
      const bool grad_A_ok = close(dA, oracle_grad_A(G, B, s), rtol, s.p * s.q, report);
      CATCH_INFO("grad_A: " << report);
      CATCH_CHECK(grad_A_ok);

      const auto dB = kernels.grad_B(G, A);
      CATCH_CHECK(dB.scalar_type() == dtype);
      const bool grad_B_ok = close(dB, oracle_grad_B(G, A, s), rtol, s.n * s.n, report);
      CATCH_INFO("grad_B: " << report);
      CATCH_CHECK(grad_B_ok);
    }
  }
#else
  CATCH_WARN("CUDA tests skipped: deltatune was configured without CUDA (DELTATUNE_HAS_CUDA is off)");
#endif
}

}  // namespace kron_sum_cuda_test
