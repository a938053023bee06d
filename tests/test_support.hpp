// Helpers shared by the tests: per-dtype tolerances and a finite-difference gradcheck
// (LibTorch's C++ API has no torch.autograd.gradcheck).
#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

namespace deltatune::testing {

// Tolerances for a result computed in `dtype` and compared with a float64 reference of
// the same (rounded) inputs: about 8 units in the last place of the storage type over
// sums of a few dozen terms, as opmath accumulation leaves only the final rounding.
struct Tolerance {
  double rtol, atol;
};

inline Tolerance tolerance_for(torch::ScalarType dtype) {
  switch (dtype) {
    case torch::kFloat64: return {1e-12, 1e-12};
    case torch::kFloat32: return {1e-5, 1e-5};
    case torch::kFloat16: return {4e-3, 4e-3};    // 10 mantissa bits
    case torch::kBFloat16: return {3e-2, 3e-2};   // 7 mantissa bits
    default: throw std::invalid_argument("no tolerance for this dtype");
  }
}

inline bool close(const torch::Tensor& actual, const torch::Tensor& expected, Tolerance tol) {
  return actual.sizes() == expected.sizes() &&
         torch::allclose(actual.to(torch::kFloat64), expected.to(torch::kFloat64), tol.rtol, tol.atol);
}

inline std::string describe_difference(const torch::Tensor& actual, const torch::Tensor& expected) {
  if (actual.sizes() != expected.sizes()) return "shapes differ";
  return "max |difference| = " +
         std::to_string((actual.to(torch::kFloat64) - expected.to(torch::kFloat64)).abs().max().item<double>());
}

// Compares the analytic gradient of sum(f(inputs) * R), for a fixed random R, with
// central differences, element by element, for every input that requires grad.
// Inputs must be float64 and small. Returns the largest absolute difference.
inline double gradcheck(const std::function<torch::Tensor(const std::vector<torch::Tensor>&)>& f,
                        std::vector<torch::Tensor> inputs, double eps = 1e-6) {
  auto R = torch::randn_like(f(inputs).detach());
  auto loss = [&](const std::vector<torch::Tensor>& in) { return (f(in) * R).sum(); };
  for (auto& t : inputs) t.mutable_grad() = torch::Tensor();
  loss(inputs).backward();
  double worst = 0;
  torch::NoGradGuard no_grad;
  for (auto& t : inputs) {
    if (!t.requires_grad()) continue;
    auto flat = t.view(-1);
    auto analytic = t.grad().reshape(-1);
    for (int64_t e = 0; e < flat.numel(); ++e) {
      const double saved = flat[e].item<double>();
      flat[e] = saved + eps;
      const double up = loss(inputs).item<double>();
      flat[e] = saved - eps;
      const double down = loss(inputs).item<double>();
      flat[e] = saved;
      worst = std::max(worst, std::abs((up - down) / (2 * eps) - analytic[e].item<double>()));
    }
  }
  return worst;
}

}  // namespace deltatune::testing
