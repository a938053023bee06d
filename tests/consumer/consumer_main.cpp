// The program both consumer projects build (find_package/, add_subdirectory/): checks
// kron_sum against a sum of torch::kron.
#include <deltatune/deltatune.hpp>

#include <iostream>

int main() {
  torch::manual_seed(0);
  const int64_t n = 2, p = 3, q = 5;
  auto A = torch::randn({n, n, n}, torch::kDouble);  // (n, n, n)
  auto B = torch::randn({n, p, q}, torch::kDouble);  // (n, p, q)

  torch::Tensor W = deltatune::kron_sum(A, B);  // (n*p, n*q)
  auto expected = torch::zeros({n * p, n * q}, torch::kDouble);
  for (int64_t i = 0; i < n; ++i) expected += torch::kron(A[i], B[i]);

  if (W.sizes() != expected.sizes() || !torch::allclose(W, expected, 1e-10, 1e-10)) {
    std::cerr << "consumer: kron_sum gave\n" << W << "\nexpected\n" << expected << "\n";
    return 1;
  }
  fmt::print("consumer: kron_sum matches the sum of torch::kron, W [{}]\n",
             fmt::join(W.sizes(), ", "));
  return 0;
}
