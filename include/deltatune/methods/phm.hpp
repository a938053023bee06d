// PHM layers (Zhang et al. 2021; Compacter, Mahabadi et al. 2021): a Linear whose weight is
// the Kronecker sum W = sum_i A_i (x) B_i, built by the kron_sum kernels.
//
// PHMSharedFactors holds the n x n "rule" matrices A_i that several PHM layers share
// (Compacter shares one set across every adapter layer of the model); PHMLinear holds B_i,
// either full (PHM-Adapter) or as rank-r factors s_i t_i^T (Compacter's LPHM), and a bias.
// Layout as the compacter reference and adapters: W is (in, out) and y = x W + b.
// Initialisation as the compacter reference: each slice of B (or of s and t) glorot-uniform
// with gain sqrt(2); A normal with std 0.01 when a layer owns it, 1e-4 when shared.
// Deliberate difference: adapters 1.3.0 initialises B with xavier_normal gain 1 whatever
// `hypercomplex_nonlinearity` says (a truthiness test shadows the choice); we do what it asks.
#pragma once

#include <torch/torch.h>

#include <cmath>
#include <memory>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/kernels/kron_sum.hpp>

namespace deltatune {

// The rule matrices A (n, n, n), "phm_rule" as adapters names them.
struct PHMSharedFactorsOptions {
  explicit PHMSharedFactorsOptions(int64_t n) : n_(n) {}
  TORCH_ARG(int64_t, n);                  // number of Kronecker terms (phm_dim); the paper's n
  TORCH_ARG(double, init_std) = 1e-4;     // A ~ N(0, init_std^2): adapters' phm_init_range for shared rules
};

class PHMSharedFactorsImpl : public torch::nn::Cloneable<PHMSharedFactorsImpl> {
 public:
  explicit PHMSharedFactorsImpl(PHMSharedFactorsOptions options) : options(std::move(options)) { reset(); }

  void reset() override {
    detail::check<OptionError>(options.n() > 0, "PHMSharedFactors: option n must be positive, got {}", options.n());
    phm_rule = register_parameter("phm_rule", torch::empty({options.n(), options.n(), options.n()}));
    torch::NoGradGuard no_grad;
    phm_rule.normal_(0.0, options.init_std());
  }

  PHMSharedFactorsOptions options;
  torch::Tensor phm_rule;  // A (n, n, n)
};
TORCH_MODULE(PHMSharedFactors);

struct PHMLinearOptions {
  PHMLinearOptions(int64_t in_features, int64_t out_features) : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(int64_t, n) = 4;              // Kronecker terms; must divide in_features and out_features
  TORCH_ARG(int64_t, rank) = 0;           // 0: full B_i (PHM); r > 0: B_i = s_i t_i^T of rank r (Compacter: 1)
  TORCH_ARG(bool, bias) = true;           // phm_bias
  TORCH_ARG(double, rule_init_std) = 0.01;  // std of A when this layer owns it (not shared)
  TORCH_ARG(KronSumPath, path) = KronSumPath::automatic;  // how x W is computed, see kron_sum_matmul
};

namespace detail {

// Glorot-uniform with gain sqrt(2) on each (p, q) slice of a (n, p, q) tensor, as the
// compacter reference's glorot_uniform.
inline void glorot_uniform_slices_(torch::Tensor& t) {
  torch::NoGradGuard no_grad;
  for (int64_t i = 0; i < t.size(0); ++i) {
    auto slice = t[i];
    torch::nn::init::xavier_uniform_(slice, std::sqrt(2.0));
  }
}

inline nlohmann::json kron_path_json(KronSumPath path) {
  switch (path) {
    case KronSumPath::dense: return "dense";
    case KronSumPath::factored: return "factored";
    default: return "automatic";
  }
}

inline KronSumPath kron_path_from_json(const std::string& name) {
  if (name == "dense") return KronSumPath::dense;
  if (name == "factored") return KronSumPath::factored;
  check<OptionError>(name == "automatic", "PHMLinear: option path must be automatic, dense or factored, got '{}'", name);
  return KronSumPath::automatic;
}

}  // namespace detail

// The options options_json() wrote (its shared_rule says whether to pass shared factors).
inline PHMLinearOptions phm_linear_options_from_json(const JsonFields& j) {
  return PHMLinearOptions(j.get<int64_t>("in_features"), j.get<int64_t>("out_features"))
      .n(j.get<int64_t>("n"))
      .rank(j.get<int64_t>("rank"))
      .bias(j.get<bool>("bias"))
      .rule_init_std(j.get<double>("rule_init_std"))
      .path(detail::kron_path_from_json(j.get<std::string>("path")));
}

// A PHM (or low-rank PHM) Linear. As a module: forward(x) = x W + b. As a weight delta on a
// frozen Linear (the Kronecker reparameterisation of dW): dW = W^T, db = b.
class PHMLinearImpl : public torch::nn::Cloneable<PHMLinearImpl>, public WeightDelta {
 public:
  // `shared`: the rule A shared with other layers; null to own one (initialised with rule_init_std).
  explicit PHMLinearImpl(PHMLinearOptions options, PHMSharedFactors shared = nullptr)
      : options(std::move(options)), shared(std::move(shared)) {
    reset();
  }

  void reset() override {
    const auto& o = options;
    detail::check<OptionError>(o.n() > 0, "PHMLinear: option n must be positive, got {}", o.n());
    detail::check<OptionError>(o.in_features() % o.n() == 0 && o.out_features() % o.n() == 0,
                               "PHMLinear: option n = {} must divide in_features = {} and out_features = {}", o.n(),
                               o.in_features(), o.out_features());
    detail::check<OptionError>(o.rank() >= 0, "PHMLinear: option rank must be 0 (full B) or positive, got {}",
                               o.rank());
    detail::check<OptionError>(!shared || shared->options.n() == o.n(),
                               "PHMLinear: option n = {} differs from the shared factors' n = {}", o.n(),
                               shared ? shared->options.n() : 0);
    const auto [n, p, q] = blocks();
    detail::check_parameters_fit(double(n) * (o.rank() == 0 ? double(p) * double(q) : double(o.rank()) * double(p + q)),
                                 fmt::format("PHMLinear: n = {}, rank = {} on a {} x {} layer", n, o.rank(),
                                             o.out_features(), o.in_features()));
    if (o.rank() == 0) {
      W = register_parameter("W", torch::empty({n, p, q}));
      detail::glorot_uniform_slices_(W);
    } else {
      W_left = register_parameter("W_left", torch::empty({n, p, o.rank()}));
      W_right = register_parameter("W_right", torch::empty({n, o.rank(), q}));
      detail::glorot_uniform_slices_(W_left);
      detail::glorot_uniform_slices_(W_right);
    }
    if (o.bias()) b = register_parameter("b", torch::zeros({o.out_features()}));
    if (!shared) {
      phm_rule = register_parameter("phm_rule", torch::empty({n, n, n}));
      torch::NoGradGuard no_grad;
      phm_rule.normal_(0.0, o.rule_init_std());
    }
  }

  // A (n, n, n): this layer's own or the shared one.
  const torch::Tensor& rule() const { return shared ? shared->phm_rule : phm_rule; }

  // W (in, out) = sum_i A_i (x) B_i.
  torch::Tensor weight() const {
    return W.defined() ? kron_sum(rule(), W) : kron_sum(rule(), W_left, W_right);
  }

  // (..., in) -> (..., out)
  torch::Tensor forward(const torch::Tensor& x) {
    auto y = W.defined() ? kron_sum_matmul(x, rule(), W, options.path())
                         : kron_sum_matmul(x, rule(), W_left, W_right, options.path());
    return b.defined() ? y + b : y;
  }

  std::string method() const override { return "phm"; }
  nlohmann::json options_json() const override {
    return {{"in_features", options.in_features()}, {"out_features", options.out_features()}, {"n", options.n()},
            {"rank", options.rank()}, {"bias", options.bias()}, {"rule_init_std", options.rule_init_std()},
            {"shared_rule", static_cast<bool>(shared)}, {"path", detail::kron_path_json(options.path())}};
  }
  torch::nn::Module& module() override { return *this; }

  torch::Tensor delta_weight(const torch::Tensor& /*base_weight*/) override { return weight().t(); }
  torch::Tensor delta_bias(const torch::Tensor& /*base_weight*/) override { return b; }
  // A half-precision x meeting float32 factors (a bf16 backbone): the dense path's product keeps
  // x as it comes for backward, not its float32 copy (precision.hpp); the factored path, which
  // contracts x with A, s and t in turn, takes the copy.
  torch::Tensor delta_output(const torch::Tensor& x, const torch::Tensor&, const torch::Tensor&,
                             const torch::Tensor&) override {
    const auto dtype = rule().scalar_type();
    if (!is_half(x.scalar_type()) || x.scalar_type() == dtype) return forward(x);
    const auto [n, p, q] = blocks();
    if (detail::takes_factored_path(options.path(), n, p, q, W.defined() ? 0 : options.rank()))
      return forward(x.to(dtype));
    return detail::linear_in_precision_of(x, weight().t(), b);
  }
  bool takes_half_input() const override { return true; }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::PHMLinear(in_features=" << options.in_features()
           << ", out_features=" << options.out_features() << ", n=" << options.n() << ", rank=" << options.rank()
           << ", shared_rule=" << (shared ? "true" : "false") << ")";
  }

  PHMLinearOptions options;
  PHMSharedFactors shared;
  torch::Tensor W, W_left, W_right, b, phm_rule;

 private:
  // n and the (p, q) = (in / n, out / n) blocks of W = sum_i A_i (x) B_i, B_i being p x q.
  struct Blocks {
    int64_t n, p, q;
  };
  Blocks blocks() const {
    return {options.n(), options.in_features() / options.n(), options.out_features() / options.n()};
  }
};
TORCH_MODULE(PHMLinear);

}  // namespace deltatune
