// BitFit (Ben Zaken et al. 2022): train only bias terms.
//
// As a weight delta, a BitFit is a trained offset db (out) added to a frozen Linear's bias,
// zero at init, so the model is unchanged at step 0: training db is training b0 + db (same
// gradients). Where the backbone has no bias (T5), db is the added bias itself (on q, k, v,
// o, wi, wo and the LM head); layer norms take one through add_to(). Merging into a Linear
// without a bias gives it a frozen bias (WeightSite::merge), removed again by unmerge.
#pragma once

#include <torch/torch.h>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/recipe.hpp>

namespace deltatune {

struct BitFitOptions {
  // features 0: DeltaModel takes it from each site.
  explicit BitFitOptions(int64_t features = 0) : features_(features) {}
  TORCH_ARG(int64_t, features);  // the layer's output size: out_features, or d_model for a layer norm
};

class BitFitImpl : public torch::nn::Cloneable<BitFitImpl>, public WeightDelta {
 public:
  explicit BitFitImpl(BitFitOptions options) : options(std::move(options)) { reset(); }

  void reset() override {
    detail::check<OptionError>(options.features() > 0, "BitFit: option features must be positive, got {}",
                               options.features());
    bias = register_parameter("bias", torch::zeros({options.features()}));
  }

  // (..., features) + bias: for outputs that are not a Linear's (layer norms).
  torch::Tensor add_to(const torch::Tensor& y) { return y + bias; }

  std::string method() const override { return "bitfit"; }
  nlohmann::json options_json() const override { return {{"features", options.features()}}; }
  torch::nn::Module& module() override { return *this; }

  torch::Tensor delta_weight(const torch::Tensor& base_weight) override { return torch::zeros_like(base_weight); }
  torch::Tensor delta_bias(const torch::Tensor& /*base_weight*/) override { return bias; }
  torch::Tensor delta_output(const torch::Tensor& x, const torch::Tensor& base_weight, const torch::Tensor&,
                             const torch::Tensor&) override {
    detail::check<ShapeError>(base_weight.size(0) == options.features(),
                              "BitFit: the layer has {} outputs but option features is {}", base_weight.size(0),
                              options.features());
    return bias.expand(output_shape(x));
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::BitFit(features=" << options.features() << ")";
  }

  BitFitOptions options;
  torch::Tensor bias;

 private:
  std::vector<int64_t> output_shape(const torch::Tensor& x) const {
    auto shape = x.sizes().vec();
    shape.back() = options.features();
    return shape;
  }
};
TORCH_MODULE(BitFit);

inline BitFitOptions bitfit_options_from_json(const JsonFields& j) { return BitFitOptions(j.get<int64_t>("features")); }

// BitFit: a trained bias on every Linear (added where the backbone has none, an offset
// to the frozen one where it has), and the backbone's LayerNorm biases where they exist.
class BitFitRecipe : public RecipeBase<BitFitOptions> {
 public:
  explicit BitFitRecipe(BitFitOptions options = BitFitOptions())
      : RecipeBase(std::move(options), Site::Kind::linear, {{"t5", "re:.*"}, {"bert", "re:.*"}}) {}
  std::string method() const override { return "bitfit"; }
  nlohmann::json options_json() const override { return nlohmann::json::object(); }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    return BitFit(BitFitOptions(site.linear->out_features)).ptr();
  }
  std::vector<std::string> select_backbone_parameters(const std::vector<std::string>& names) const override {
    return detail::names_matching(names, "LayerNorm\\.bias$");
  }
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const BitFitOptions& o) { return std::make_shared<BitFitRecipe>(o); }

// The method table's row: 1e-2, ten times BitFit's 1e-3, where tools/lr_sweep measured it
// better on BERT's built-in task (0.995 against 0.910), MiniLM's SST-2 (0.783 against 0.744)
// and T5's built-in task (0.688 against 0.652; the README's learning-rate table).
inline MethodInfo bitfit_method_info() {
  return {{"bitfit"},
          [](const JsonFields&) { return make_recipe(BitFitOptions()); },
          {{"bitfit", "BitFit: every bias, added where the backbone has none", {{"t5", 1e-2}, {"bert", 1e-2}},
            [](const PresetSizes&) { return make_recipe(BitFitOptions()); }}}};
}

}  // namespace deltatune
