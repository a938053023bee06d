// VeRA (Kopiczko et al. 2024, "Vector-based Random Matrix Adaptation"; peft's VeraConfig):
// W0 + diag(b) B diag(d) A on a frozen Linear, where A (r, in) and B (out, r) are random,
// frozen and shared by every site of the delta, and only the vectors d (r) and b (out) train.
//
// As peft: one A of (r, largest in_features) and one B of (largest out_features, r) over the
// delta's sites, each site reading A[:, :in] and B[:out, :]; both Kaiming-uniform with gain
// sqrt 2 (bound sqrt(6 / fan_in)), drawn in that order from a CPU generator seeded with
// projection_prng_key, so that the same key gives peft's matrices; d starts at d_initial
// (0.1) and b at zero, so the layer is unchanged at step 0. Dropout acts on the input of the
// VeRA path. The projections are saved with the delta (peft's save_projection = true), as
// frozen parameters of the shared module "vera_projection".
#pragma once

#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/recipe.hpp>

namespace deltatune {

struct VeRAOptions {
  // Shapes 0: DeltaModel takes them from each site.
  VeRAOptions(int64_t in_features = 0, int64_t out_features = 0)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(int64_t, r) = 256;                  // the shared projections' rank (peft's default)
  TORCH_ARG(double, d_initial) = 0.1;           // d's starting value (the paper's and peft's)
  TORCH_ARG(double, dropout) = 0.0;             // on the VeRA path's input (peft vera_dropout)
  TORCH_ARG(int64_t, projection_prng_key) = 0;  // seeds A and B (peft's projection_prng_key)
};

// The frozen A (r, max_in) and B (max_out, r) every VeRA layer of one delta reads.
class VeRAProjectionImpl : public torch::nn::Cloneable<VeRAProjectionImpl> {
 public:
  VeRAProjectionImpl(int64_t r, int64_t max_in, int64_t max_out, int64_t seed)
      : r_(r), max_in_(max_in), max_out_(max_out), seed_(seed) {
    reset();
  }

  void reset() override {
    detail::check<OptionError>(r_ > 0 && max_in_ > 0 && max_out_ > 0,
                               "VeRA: r and the layers' sizes must be positive, got r = {} on {} x {}", r_, max_out_,
                               max_in_);
    detail::check_parameters_fit(double(r_) * double(max_in_ + max_out_),
                                 fmt::format("VeRA: r = {} on layers up to {} x {}", r_, max_out_, max_in_));
    auto generator = at::detail::createCPUGenerator(static_cast<uint64_t>(seed_));
    torch::NoGradGuard no_grad;
    auto a = kaiming_uniform({r_, max_in_}, generator);
    auto b = kaiming_uniform({max_out_, r_}, generator);
    vera_A = register_parameter("vera_A", a, /*requires_grad=*/false);
    vera_B = register_parameter("vera_B", b, /*requires_grad=*/false);
  }

  torch::Tensor vera_A, vera_B;

 private:
  // peft's _kaiming_init: uniform in +-sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in the columns.
  static torch::Tensor kaiming_uniform(std::vector<int64_t> shape, at::Generator& generator) {
    const double bound = std::sqrt(3.0) * std::sqrt(2.0) / std::sqrt(double(shape[1]));
    return torch::empty(shape).uniform_(-bound, bound, generator);
  }

  int64_t r_, max_in_, max_out_, seed_;
};
TORCH_MODULE(VeRAProjection);

class VeRAImpl : public torch::nn::Cloneable<VeRAImpl>, public WeightDelta {
 public:
  VeRAImpl(VeRAOptions options, VeRAProjection projection)
      : options(std::move(options)), projection(std::move(projection)) {
    reset();
  }

  void reset() override {
    const auto& o = options;
    detail::check<OptionError>(o.r() > 0, "VeRA: option r must be positive, got {}", o.r());
    detail::check<OptionError>(o.dropout() >= 0 && o.dropout() < 1, "VeRA: option dropout must be in [0, 1), got {}",
                               o.dropout());
    detail::check<OptionError>(projection && projection->vera_A.size(0) == o.r() &&
                                   projection->vera_A.size(1) >= o.in_features() &&
                                   projection->vera_B.size(0) >= o.out_features(),
                               "VeRA: a {} x {} layer at r = {} needs shared projections at least that large",
                               o.out_features(), o.in_features(), o.r());
    vera_lambda_d = register_parameter("vera_lambda_d", torch::full({o.r()}, o.d_initial()));
    vera_lambda_b = register_parameter("vera_lambda_b", torch::zeros({o.out_features()}));
  }

  std::string method() const override { return "vera"; }
  nlohmann::json options_json() const override {
    return {{"in_features", options.in_features()}, {"out_features", options.out_features()}, {"r", options.r()},
            {"d_initial", options.d_initial()}, {"dropout", options.dropout()},
            {"projection_prng_key", options.projection_prng_key()}};
  }
  torch::nn::Module& module() override { return *this; }

  // (out, in) = (b * B_s) (d * A_s): A_s, B_s this layer's slices of the shared projections.
  torch::Tensor delta_weight(const torch::Tensor&) override {
    return torch::mm(vera_lambda_b.unsqueeze(1) * sliced_B(), vera_lambda_d.unsqueeze(1) * sliced_A());
  }

  // (..., in) -> (..., out): b * (B_s (d * (A_s dropout(x)))), as peft, never forming (out, in).
  torch::Tensor delta_output(const torch::Tensor& x, const torch::Tensor&, const torch::Tensor&,
                             const torch::Tensor&) override {
    const auto dropout = detail::InputDropout::draw(x, options.dropout(), is_training());
    const auto projected = detail::linear_in_precision_of(x, sliced_A(), {}, dropout);  // (..., r)
    return vera_lambda_b * torch::nn::functional::linear(vera_lambda_d * projected, sliced_B());
  }
  // x on a half-precision backbone as it comes: the first product keeps it, not a float32 copy.
  bool takes_half_input() const override { return true; }

  // diag(l_b) B diag(l_d) A as the pair (diag(l_d) A, diag(l_b) B); not with dropout in training.
  std::optional<LowRankFactors> low_rank_factors() override {
    if (options.dropout() > 0 && is_training()) return std::nullopt;
    return LowRankFactors{vera_lambda_d.unsqueeze(1) * sliced_A(), vera_lambda_b.unsqueeze(1) * sliced_B()};
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::VeRA(in_features=" << options.in_features() << ", out_features=" << options.out_features()
           << ", r=" << options.r() << ", dropout=" << options.dropout() << ")";
  }

  VeRAOptions options;
  VeRAProjection projection;            // shared with the delta's other layers, registered once by the recipe
  torch::Tensor vera_lambda_d;          // (r), d_initial at init
  torch::Tensor vera_lambda_b;          // (out), zeros at init

 private:
  torch::Tensor sliced_A() const { return projection->vera_A.narrow(1, 0, options.in_features()); }
  torch::Tensor sliced_B() const { return projection->vera_B.narrow(0, 0, options.out_features()); }
};
TORCH_MODULE(VeRA);

inline VeRAOptions vera_options_from_json(const JsonFields& j) {
  return VeRAOptions(j.get<int64_t>("in_features", 0), j.get<int64_t>("out_features", 0))
      .r(j.get<int64_t>("r"))
      .d_initial(j.get<double>("d_initial"))
      .dropout(j.get<double>("dropout"))
      .projection_prng_key(j.get<int64_t>("projection_prng_key"));
}

// VeRA on Linear sites (default, as peft: q, v on T5; query, value on BERT); the shared
// projections sized by the largest matched layer, as peft's _find_dim.
class VeRARecipe : public RecipeBase<VeRAOptions> {
 public:
  explicit VeRARecipe(VeRAOptions options)
      : RecipeBase(std::move(options), Site::Kind::linear, {{"t5", "q|v"}, {"bert", "query|value"}}) {}
  std::string method() const override { return "vera"; }
  nlohmann::json options_json() const override {
    return {{"r", options.r()}, {"d_initial", options.d_initial()}, {"dropout", options.dropout()},
            {"projection_prng_key", options.projection_prng_key()}};
  }
  void prepare(const std::vector<const Site*>& sites, const std::string&) override {
    int64_t max_in = 0, max_out = 0;
    for (const auto* site : sites) {
      max_in = std::max(max_in, site->linear->in_features);
      max_out = std::max(max_out, site->linear->out_features);
    }
    projection_ = VeRAProjection(options.r(), max_in, max_out, options.projection_prng_key());
  }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    return VeRA(VeRAOptions(options).in_features(site.linear->in_features).out_features(site.linear->out_features),
                projection_)
        .ptr();
  }
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> shared_modules() override {
    return {{"vera_projection", projection_.ptr()}};
  }

 private:
  VeRAProjection projection_{nullptr};
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const VeRAOptions& o) { return std::make_shared<VeRARecipe>(o); }

// The method table's row: peft's r 256 and d_initial 0.1. Only vectors train, so they take
// larger steps than LoRA's matrices: 4e-2, ten times the lower end of the paper's RoBERTa-base
// GLUE rates, where tools/lr_sweep measured it better on BERT's built-in task (1.000 against
// 0.980), MiniLM's SST-2 (0.787 against 0.727) and T5's built-in task (0.983 against 0.573;
// the README's learning-rate table).
inline MethodInfo vera_method_info() {
  return {{"vera"},
          [](const JsonFields& j) { return make_recipe(vera_options_from_json(j)); },
          {{"vera", "VeRA, r 256 shared random projections, trained scaling vectors, on q, v / query, value",
            {{"t5", 4e-2}, {"bert", 4e-2}}, [](const PresetSizes& s) {
              return make_recipe(VeRAOptions().r(s.rank > 0 ? s.rank : 256));
            }}}};
}

}  // namespace deltatune
