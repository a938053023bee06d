// Tests of kernels/kron_sum.hpp: the fused CPU kernels, the factored paths and their
// gradients against the naive composition (a sum of torch::kron), per dtype.
#include <deltatune/kernels/kron_sum.hpp>

#include <atomic>

#include "test_support.hpp"

namespace kron_sum_test {

namespace dt = deltatune;
using dt::testing::close;
using dt::testing::describe_difference;
using dt::testing::tolerance_for;

namespace {

struct Shape {
  int64_t n, p, q;
};

// Odd sizes on purpose: n = 1, p or q = 1, primes, and the Compacter shapes.
const std::vector<Shape> kShapes = {{1, 1, 1}, {1, 5, 3}, {2, 3, 1}, {2, 1, 4}, {3, 7, 5},
                                    {4, 192, 6}, {4, 6, 192}, {12, 64, 2}, {5, 2, 11}};
const std::vector<torch::ScalarType> kDtypes = {torch::kFloat64, torch::kFloat32, torch::kFloat16, torch::kBFloat16};

std::string label(const Shape& s, torch::ScalarType dtype) {
  return fmt::format("n={} p={} q={} {}", s.n, s.p, s.q, c10::toString(dtype));
}

// The oracle: naive composition in float64 of the same (already rounded) inputs.
torch::Tensor naive(const torch::Tensor& A, const torch::Tensor& B) {
  return dt::detail::reference::naive_kron_sum(A.to(torch::kFloat64), B.to(torch::kFloat64));
}

}  // namespace

CATCH_TEST_CASE("kron_sum equals the sum of Kronecker products", "[kron_sum]") {
  torch::manual_seed(0);
  for (auto dtype : kDtypes) {
    for (const auto& s : kShapes) {
      auto A = torch::randn({s.n, s.n, s.n}).to(dtype);
      auto B = torch::randn({s.n, s.p, s.q}).to(dtype);
      auto W = dt::kron_sum(A, B);
      CATCH_INFO(label(s, dtype) << ": " << describe_difference(W, naive(A, B)));
      CATCH_CHECK(W.scalar_type() == dtype);
      CATCH_CHECK(close(W, naive(A, B), tolerance_for(dtype)));
    }
  }
}

CATCH_TEST_CASE("kron_sum gradients equal those of the naive composition", "[kron_sum]") {
  torch::manual_seed(1);
  for (auto dtype : kDtypes) {
    for (const auto& s : kShapes) {
      auto A = torch::randn({s.n, s.n, s.n}).to(dtype).requires_grad_();
      auto B = torch::randn({s.n, s.p, s.q}).to(dtype).requires_grad_();
      auto G = torch::randn({s.n * s.p, s.n * s.q}).to(dtype);
      dt::kron_sum(A, B).backward(G);

      auto A64 = A.detach().to(torch::kFloat64).requires_grad_();
      auto B64 = B.detach().to(torch::kFloat64).requires_grad_();
      dt::detail::reference::naive_kron_sum(A64, B64).backward(G.to(torch::kFloat64));
      // dA sums p*q products per element: scale the absolute tolerance with sqrt(p*q).
      auto tol = tolerance_for(dtype);
      tol.atol *= std::sqrt(double(s.p * s.q));
      CATCH_INFO(label(s, dtype) << ": dA " << describe_difference(A.grad(), A64.grad()) << ", dB "
                                 << describe_difference(B.grad(), B64.grad()));
      CATCH_CHECK(close(A.grad(), A64.grad(), tol));
      CATCH_CHECK(close(B.grad(), B64.grad(), tol));
    }
  }
}

CATCH_TEST_CASE("kron_sum passes a float64 finite-difference gradcheck", "[kron_sum][gradcheck]") {
  torch::manual_seed(2);
  for (const auto& s : std::vector<Shape>{{1, 2, 3}, {2, 3, 2}, {3, 1, 2}}) {
    auto A = torch::randn({s.n, s.n, s.n}, torch::kFloat64).requires_grad_();
    auto B = torch::randn({s.n, s.p, s.q}, torch::kFloat64).requires_grad_();
    auto s_ = torch::randn({s.n, s.p, 2}, torch::kFloat64).requires_grad_();
    auto t_ = torch::randn({s.n, 2, s.q}, torch::kFloat64).requires_grad_();
    CATCH_INFO("n=" << s.n << " p=" << s.p << " q=" << s.q);
    CATCH_CHECK(dt::testing::gradcheck([](const auto& in) { return dt::kron_sum(in[0], in[1]); }, {A, B}) < 1e-7);
    CATCH_CHECK(dt::testing::gradcheck([](const auto& in) { return dt::kron_sum(in[0], in[1], in[2]); },
                                       {A, s_, t_}) < 1e-7);
  }
}

CATCH_TEST_CASE("kron_sum matches the reference path on every shape and thread count", "[kron_sum]") {
  torch::manual_seed(3);
  const auto& ref = dt::detail::reference::kernels();
  const auto& cpu = dt::detail::cpu::kernels();
  const int threads = at::get_num_threads();
  // Tall enough that grad_A splits its rows over threads and sums the partials;
  // q = 2 takes the narrow-block loops, q = 8 the wide ones.
  for (int t : {1, 2})
  for (int64_t q : {8, 2}) {
    at::set_num_threads(t);
    auto A = torch::randn({4, 4, 4}, torch::kFloat64);
    auto B = torch::randn({4, 2048, q}, torch::kFloat64);
    auto G = torch::randn({4 * 2048, 4 * q}, torch::kFloat64);
    CATCH_INFO("threads=" << t << " q=" << q);
    CATCH_CHECK(close(cpu.forward(A, B), ref.forward(A, B), tolerance_for(torch::kFloat64)));
    CATCH_CHECK(close(cpu.grad_A(G, B), ref.grad_A(G, B), {1e-10, 1e-10}));
    CATCH_CHECK(close(cpu.grad_B(G, A), ref.grad_B(G, A), tolerance_for(torch::kFloat64)));
  }
  at::set_num_threads(threads);
}

// at::parallel_for, which splits the CPU kernels' rows, is inline in LibTorch's OpenMP build:
// code compiled without -fopenmp runs it on one thread, as ours did until the deltatune target
// carried the flag (cmake/torch_openmp.cmake). This TU is built as a user's would be.
CATCH_TEST_CASE("at::parallel_for in code built against deltatune runs on several threads", "[kron_sum][threads]") {
#if defined(__clang__)
  CATCH_WARN("OpenMP tests skipped: clang builds (sanitizers, fuzzers) compile without OpenMP, since clang's "
             "-fopenmp would load LLVM's libomp beside LibTorch's libgomp");
#else
  const int threads = at::get_num_threads();
  at::set_num_threads(2);
  std::atomic<int> in_parallel{0};
  at::parallel_for(0, 2, 1, [&](int64_t, int64_t) { in_parallel += at::in_parallel_region() ? 1 : 0; });
  at::set_num_threads(threads);
  CATCH_CHECK(in_parallel == 2);
#endif
}

CATCH_TEST_CASE("kron_sum takes non-contiguous operands", "[kron_sum]") {
  torch::manual_seed(4);
  auto A = torch::randn({3, 3, 3}, torch::kFloat64).transpose(1, 2).requires_grad_();  // a view: not contiguous
  auto B_full = torch::randn({3, 10, 8}, torch::kFloat64);
  auto B = B_full.index({torch::indexing::Slice(), torch::indexing::Slice(0, 10, 2)})
               .transpose(1, 2);  // (3, 8, 5), strided
  CATCH_REQUIRE_FALSE(A.is_contiguous());
  CATCH_REQUIRE_FALSE(B.is_contiguous());
  auto W = dt::kron_sum(A, B);
  CATCH_CHECK(close(W, naive(A, B), tolerance_for(torch::kFloat64)));
  W.sum().backward();
  auto A64 = A.detach().clone().requires_grad_();
  dt::detail::reference::naive_kron_sum(A64, B).sum().backward();
  CATCH_CHECK(close(A.grad(), A64.grad(), tolerance_for(torch::kFloat64)));
}

CATCH_TEST_CASE("kron_sum computes only the gradients that are needed", "[kron_sum]") {
  auto A = torch::randn({2, 2, 2}).requires_grad_();
  auto B = torch::randn({2, 3, 4});
  dt::kron_sum(A, B).sum().backward();
  CATCH_CHECK(A.grad().defined());
  CATCH_CHECK_FALSE(B.grad().defined());

  auto A2 = torch::randn({2, 2, 2});
  auto B2 = torch::randn({2, 3, 4}).requires_grad_();
  dt::kron_sum(A2, B2).sum().backward();
  CATCH_CHECK(B2.grad().defined());
  CATCH_CHECK_FALSE(A2.grad().defined());
}

CATCH_TEST_CASE("kron_sum of low-rank factors equals kron_sum of their product", "[kron_sum]") {
  torch::manual_seed(5);
  for (int64_t r : {1, 3}) {
    auto A = torch::randn({4, 4, 4}, torch::kFloat64).requires_grad_();
    auto s = torch::randn({4, 192, r}, torch::kFloat64).requires_grad_();
    auto t = torch::randn({4, r, 6}, torch::kFloat64).requires_grad_();
    auto W = dt::kron_sum(A, s, t);
    auto expected = naive(A, torch::bmm(s, t));
    CATCH_INFO("r=" << r);
    CATCH_CHECK(close(W, expected, tolerance_for(torch::kFloat64)));
  }
}

CATCH_TEST_CASE("kron_sum_matmul equals x times the Kronecker sum on both paths", "[kron_sum][factored]") {
  torch::manual_seed(6);
  using dt::KronSumPath;
  for (auto path : {KronSumPath::dense, KronSumPath::factored, KronSumPath::automatic}) {
    for (const auto& s : std::vector<Shape>{{1, 3, 2}, {4, 192, 6}, {4, 6, 192}, {3, 5, 1}}) {
      auto x = torch::randn({2, 3, s.n * s.p}, torch::kFloat64).requires_grad_();
      auto A = torch::randn({s.n, s.n, s.n}, torch::kFloat64).requires_grad_();
      auto B = torch::randn({s.n, s.p, s.q}, torch::kFloat64).requires_grad_();
      auto sf = torch::randn({s.n, s.p, 2}, torch::kFloat64).requires_grad_();
      auto tf = torch::randn({s.n, 2, s.q}, torch::kFloat64).requires_grad_();
      CATCH_INFO("path=" << int(path) << " n=" << s.n << " p=" << s.p << " q=" << s.q);

      auto y = dt::kron_sum_matmul(x, A, B, path);
      CATCH_CHECK(close(y, torch::matmul(x, naive(A, B)), tolerance_for(torch::kFloat64)));
      auto y_low = dt::kron_sum_matmul(x, A, sf, tf, path);
      CATCH_CHECK(close(y_low, torch::matmul(x, naive(A, torch::bmm(sf, tf))), {1e-10, 1e-10}));

      // Gradients of all five inputs against autograd through the naive composition.
      auto G = torch::randn_like(y);
      torch::autograd::backward({y, y_low}, {G, G});
      std::vector<torch::Tensor> ours = {x.grad(), A.grad(), B.grad(), sf.grad(), tf.grad()};
      std::vector<torch::Tensor> leaves;
      for (const auto& v : {x, A, B, sf, tf}) leaves.push_back(v.detach().clone().requires_grad_());
      auto y_ref = torch::matmul(leaves[0], naive(leaves[1], leaves[2]));
      auto y_low_ref = torch::matmul(leaves[0], naive(leaves[1], torch::bmm(leaves[3], leaves[4])));
      torch::autograd::backward({y_ref, y_low_ref}, {G, G});
      for (size_t i = 0; i < ours.size(); ++i) {
        CATCH_INFO("input " << i << ": " << describe_difference(ours[i], leaves[i].grad()));
        CATCH_CHECK(close(ours[i], leaves[i].grad(), {1e-9, 1e-9}));
      }
    }
  }
}

CATCH_TEST_CASE("kron_sum_matmul passes a float64 finite-difference gradcheck", "[kron_sum][factored][gradcheck]") {
  torch::manual_seed(7);
  using dt::KronSumPath;
  auto x = torch::randn({3, 2 * 3}, torch::kFloat64).requires_grad_();
  auto A = torch::randn({2, 2, 2}, torch::kFloat64).requires_grad_();
  auto B = torch::randn({2, 3, 2}, torch::kFloat64).requires_grad_();
  auto s = torch::randn({2, 3, 2}, torch::kFloat64).requires_grad_();
  auto t = torch::randn({2, 2, 2}, torch::kFloat64).requires_grad_();
  CATCH_CHECK(dt::testing::gradcheck(
                  [](const auto& in) { return dt::kron_sum_matmul(in[0], in[1], in[2], KronSumPath::factored); },
                  {x, A, B}) < 1e-7);
  CATCH_CHECK(dt::testing::gradcheck(
                  [](const auto& in) {
                    return dt::kron_sum_matmul(in[0], in[1], in[2], in[3], KronSumPath::factored);
                  },
                  {x, A, s, t}) < 1e-7);
}

CATCH_TEST_CASE("kron_sum rejects bad operands with messages that name the shapes", "[kron_sum][errors]") {
  using Catch::Matchers::Contains;
  auto A = torch::randn({4, 4, 4});
  CATCH_CHECK_THROWS_WITH(dt::kron_sum(torch::randn({4, 3, 4}), torch::randn({4, 2, 2})),
                          Contains("A must have shape (n, n, n)") && Contains("[4, 3, 4]"));
  CATCH_CHECK_THROWS_WITH(dt::kron_sum(A, torch::randn({3, 2, 2})),
                          Contains("B must have shape (n, p, q) with n = 4") && Contains("[3, 2, 2]"));
  CATCH_CHECK_THROWS_WITH(dt::kron_sum(A, torch::randn({4, 2, 2}, torch::kFloat64)),
                          Contains("B is Double") && Contains("A is Float"));
  CATCH_CHECK_THROWS_WITH(dt::kron_sum(A, torch::randn({4, 5, 1}), torch::randn({4, 2, 3})),
                          Contains("t must have shape (n, r, q) with n = 4 and r = 1") && Contains("[4, 2, 3]"));
  CATCH_CHECK_THROWS_WITH(dt::kron_sum_matmul(torch::randn({2, 10}), A, torch::randn({4, 3, 2})),
                          Contains("x must end in n*p = 12 features") && Contains("[2, 10]"));
  CATCH_CHECK_THROWS_AS(dt::kron_sum(A, torch::randn({4, 0, 2})), dt::ShapeError);
}

CATCH_TEST_CASE("automatic takes the factored path only for large low-rank layers", "[kron_sum][factored]") {
  using dt::detail::prefer_factored;
  CATCH_CHECK(prefer_factored(4, 256, 1024, 1));      // 1024x4096 LPHM: 17x faster factored
  CATCH_CHECK(prefer_factored(4, 1024, 256, 1));      // 4096x1024: 8x
  CATCH_CHECK_FALSE(prefer_factored(4, 192, 6, 1));   // Compacter's 768x24 on T5-base: a wash, stay dense
  CATCH_CHECK_FALSE(prefer_factored(4, 6, 192, 1));   // and its 24x768
  CATCH_CHECK_FALSE(prefer_factored(4, 256, 1024, 256));  // full rank: never factored
}

}  // namespace kron_sum_test
