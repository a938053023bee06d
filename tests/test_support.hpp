// Helpers shared by the tests: per-dtype tolerances and a finite-difference gradcheck
// (LibTorch's C++ API has no torch.autograd.gradcheck).
#pragma once

#include <torch/torch.h>

#include <ftw.h>
#include <stdlib.h>

#include <cmath>
#include <cstdlib>
#include <limits>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "../benchmarks/memory_profile.hpp"
#include "test_pch.hpp"

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

// The golden tolerance model. A float32 result is compared with its reference relative to
// the reference's scale: max |actual - expected| / max |expected|. Summation order changes
// with the host's vector units and thread count, so an element-wise bound fails on small
// entries while the same check on the scale holds at any OMP_NUM_THREADS; a real defect
// (a wrong scale, a missing bias) shows as 1e-3 or more. Exact maths is checked in float64,
// both sides computed in float64, at kFloat64Relative.
inline constexpr double kFloat32Relative = 1e-4;
inline constexpr double kFloat64Relative = 1e-10;

// max |actual - expected| / max |expected| (the plain max |difference| where expected is all
// zeros); infinity where the shapes differ or either side holds NaN.
inline double relative_difference(const torch::Tensor& actual, const torch::Tensor& expected) {
  if (actual.sizes() != expected.sizes()) return std::numeric_limits<double>::infinity();
  if (actual.numel() == 0) return 0;
  const auto a = actual.detach().to(torch::kCPU, torch::kFloat64), e = expected.detach().to(torch::kCPU, torch::kFloat64);
  const double difference = (a - e).abs().max().item<double>(), scale = e.abs().max().item<double>();
  if (std::isnan(difference)) return std::numeric_limits<double>::infinity();
  return scale > 0 ? difference / scale : difference;
}

// Checks a half-precision `actual` against the reference computed at that precision
// (transformers with the weights loaded in bf16), relative to the reference's scale: within
// twice the reference's own rounding error, its distance from its float32 output, and at
// least one bf16 step (2^-8). Half precision rounds every operation, and two correct
// implementations round in other places; a real defect (a wrong scale, a float32 delta
// added in the wrong place) is many times that error.
inline void check_half_matches(const torch::Tensor& actual, const torch::Tensor& expected_half,
                               const torch::Tensor& expected_float32, const std::string& what) {
  CATCH_INFO(what);
  CATCH_CHECK(actual.scalar_type() == expected_half.scalar_type());
  const double reference_error = relative_difference(expected_half, expected_float32);
  const double tol = std::max(2 * reference_error, 1.0 / 256);
  const double difference = relative_difference(actual, expected_half);
  CATCH_INFO("relative difference " << difference << ", tolerance " << tol << " (the reference's own error "
                                    << reference_error << ")");
  CATCH_CHECK(difference <= tol);
}

// Checks `actual` against a reference computed by transformers, peft or adapters: relative
// to the reference's scale, at the tolerance of the dtype both sides computed in.
inline void check_matches(const torch::Tensor& actual, const torch::Tensor& expected, const std::string& what) {
  const double tol = expected.scalar_type() == torch::kFloat64 && actual.scalar_type() == torch::kFloat64
                         ? kFloat64Relative
                         : kFloat32Relative;
  const double relative = relative_difference(actual, expected);
  CATCH_INFO(what << ": shapes " << actual.sizes() << " / " << expected.sizes() << ", max |difference| / max |reference| = "
                  << relative << " (tolerance " << tol << ")");
  CATCH_CHECK(relative <= tol);
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

// The bytes that f's result and its autograd graph hold once f returns: what a forward keeps
// for backward, through the benchmarks' allocation reporter.
template <class F>
int64_t bytes_kept(F&& f) {
  const bench::AllocationPeak allocations;
  const torch::Tensor out = f();
  return allocations.live_bytes();
}

// Whether the CUDA cases can run here; where they cannot, says so in the words ctest reports
// as skipped (tests/CMakeLists.txt), once per test case.
inline bool cuda_or_skip() {
  if (torch::cuda::is_available()) return true;
  CATCH_WARN("CUDA tests skipped: no GPU visible");
  return false;
}

// A fresh folder under the system temp folder, removed with all it holds when the test ends.
// Removed with nftw, not std::filesystem::remove_all: libtorch.so exports its own copy of that
// symbol, which wins at link time and crashes (calls a null pointer) in LibTorch 2.11's pip wheel.
struct TempDir {
  std::filesystem::path path;
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "deltatune_test_XXXXXX").string();
    path = ::mkdtemp(pattern.data());
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    ::nftw(path.c_str(), [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
           FTW_DEPTH | FTW_PHYS);
  }
  std::string file(const std::string& name) const { return (path / name).string(); }
  void write(const std::string& name, const std::string& text) const { std::ofstream(file(name)) << text; }
  // Names of everything in the folder, to spot a leftover temporary file.
  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : std::filesystem::directory_iterator(path)) names.push_back(e.path().filename().string());
    return names;
  }
};

// Where the golden fixtures are: DELTATUNE_GOLDEN_DIR, else build/golden as compiled in.
inline std::filesystem::path golden_root() {
  const char* root = std::getenv("DELTATUNE_GOLDEN_DIR");
  return root != nullptr ? root : DELTATUNE_TEST_GOLDEN_DIR;
}

// Where a case writes files that a Python check run by ctest after it reads (peft_export,
// adapters_roundtrip): the folder in environment variable `env`, else build/<name>, beside
// the golden fixtures. An environment variable, not a compile definition, so that ccache
// shares the test objects between build folders.
inline std::filesystem::path python_check_dir(const char* env, const std::string& name) {
  const char* dir = std::getenv(env);
  return dir != nullptr ? std::filesystem::path(dir) : golden_root().parent_path() / name;
}

// The folder tools/golden/<name>.py wrote its fixtures to (ctest runs it first), or
// nullopt after a warning that makes ctest report the case as skipped: the folder is
// unknown (the test runner was started outside ctest) or the references are not installed.
inline std::optional<std::filesystem::path> golden_dir(const std::string& name) {
  const auto root = golden_root();
  const std::filesystem::path dir = root / name;
  if (std::filesystem::exists(root / "UNAVAILABLE")) {
    std::ifstream why(root / "UNAVAILABLE");
    std::string reason((std::istreambuf_iterator<char>(why)), std::istreambuf_iterator<char>());
    CATCH_WARN("golden tests skipped: " << reason);
    return std::nullopt;
  }
  if (!std::filesystem::exists(dir / "STAMP")) {
    CATCH_FAIL("golden fixture '" << name << "' is missing from " << root.string()
                                  << ": tools/golden/make_fixtures.py should have written it");
  }
  return dir;
}

// A folder of the real data beside the checkout (../shared/data/<relative>), or nullopt
// after a warning that makes ctest report the case as skipped: a user has none of it.
inline std::optional<std::filesystem::path> shared_data(const std::string& relative) {
  const char* root = std::getenv("DELTATUNE_SHARED_DATA");
  if (root == nullptr) root = DELTATUNE_TEST_SHARED_DATA;
  const auto dir = std::filesystem::path(root) / relative;
  if (!std::filesystem::exists(dir)) {
    CATCH_WARN("real-data tests skipped: " << dir.string() << " is not there (../shared/data beside the checkout, "
                                           << "or set DELTATUNE_SHARED_DATA)");
    return std::nullopt;
  }
  return dir;
}

}  // namespace deltatune::testing
