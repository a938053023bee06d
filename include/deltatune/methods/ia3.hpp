// IA3 (Liu et al. 2022, "(IA)^3"): learned vectors that rescale keys, values and the
// feed-forward inner activation, ones at init so the model is unchanged at step 0.
//
// On keys and values the vector l (out) scales the Linear's output: y = l * (x W0^T + b0).
// On the feed-forward output Linear (wo) it scales the input, which is the inner
// activation: y = (l * x) W0^T + b0. Both fold into W0 (and b0), so IA3 is mergeable.
// peft stores l as ia3_l of shape (out, 1) or (1, in); here it is flat (features).
#pragma once

#include <torch/torch.h>

#include <optional>
#include <string>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/recipe.hpp>

namespace deltatune {

struct IA3Options {
  // features 0: DeltaModel takes it (and feedforward) from each site.
  explicit IA3Options(int64_t features = 0) : features_(features) {}
  TORCH_ARG(int64_t, features);            // out_features (keys, values) or in_features (feed-forward)
  TORCH_ARG(bool, feedforward) = false;    // scale the input (the inner activation) instead of the output
  // For DeltaModel::add: the site pattern naming which matched sites scale their input, as
  // peft's feedforward_modules (matched the same way as the sites); unset: peft's default for
  // the backbone (T5 "wo", BERT "output.dense"); "": none.
  TORCH_ARG(std::optional<std::string>, feedforward_modules) = std::nullopt;
};

class IA3Impl : public torch::nn::Cloneable<IA3Impl>, public WeightDelta {
 public:
  explicit IA3Impl(IA3Options options) : options(std::move(options)) { reset(); }

  void reset() override {
    detail::check<OptionError>(options.features() > 0, "IA3: option features must be positive, got {}",
                               options.features());
    ia3_l = register_parameter("ia3_l", torch::ones({options.features()}));
  }

  // An output-scaling IA3 on a Linear with a bias scales the bias too; WeightDelta's
  // delta_bias sees only the weight, so the injector hands the frozen bias over here.
  void bind_base_bias(torch::Tensor base_bias) { base_bias_ = std::move(base_bias); }

  std::string method() const override { return "ia3"; }
  nlohmann::json options_json() const override {
    return {{"features", options.features()}, {"feedforward", options.feedforward()}};
  }
  torch::nn::Module& module() override { return *this; }

  // (out, in): (l - 1) scaling the rows (output) or the columns (feed-forward input) of W0.
  torch::Tensor delta_weight(const torch::Tensor& base_weight) override {
    check_features(base_weight);
    return base_weight * scale_shape(ia3_l - 1);
  }
  torch::Tensor delta_bias(const torch::Tensor& base_weight) override {
    if (options.feedforward() || !base_bias_.defined()) return {};
    check_features(base_weight);
    return base_bias_ * (ia3_l - 1);
  }

  // The additive form (l - 1) x W0^T of the feed-forward case costs a second product: Linear
  // sites take input_scale() instead and compute (l * x) W0^T + b0 in one.
  torch::Tensor delta_output(const torch::Tensor& x, const torch::Tensor& base_weight, const torch::Tensor&,
                             const torch::Tensor& base_output) override {
    check_features(base_weight);
    if (options.feedforward())  // a bf16 backbone's weight in the float32 delta's precision (precision.hpp)
      return torch::nn::functional::linear(x * (ia3_l - 1), base_weight.to(x.scalar_type()));
    return base_output * (ia3_l - 1);
  }
  torch::Tensor input_scale(const torch::Tensor& base_weight) override {
    if (!options.feedforward()) return {};
    check_features(base_weight);
    return ia3_l;
  }

  torch::Tensor output_scale(const torch::Tensor& base_weight) override {
    if (options.feedforward()) return {};
    check_features(base_weight);
    return ia3_l;
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::IA3(features=" << options.features()
           << ", feedforward=" << (options.feedforward() ? "true" : "false") << ")";
  }

  IA3Options options;
  torch::Tensor ia3_l;  // (features), ones at init

 private:
  // l as a column (out, 1) for output scaling or a row (1, in) for input scaling.
  torch::Tensor scale_shape(const torch::Tensor& l) const {
    return options.feedforward() ? l.unsqueeze(0) : l.unsqueeze(1);
  }
  void check_features(const torch::Tensor& base_weight) const {
    const int64_t size = base_weight.size(options.feedforward() ? 1 : 0);
    detail::check<ShapeError>(size == options.features(), "IA3: the layer's {} is {} but option features is {}",
                              options.feedforward() ? "in_features" : "out_features", size, options.features());
  }
  torch::Tensor base_bias_;
};
TORCH_MODULE(IA3);

inline IA3Options ia3_options_from_json(const JsonFields& j) {
  return IA3Options(j.get<int64_t>("features")).feedforward(j.get<bool>("feedforward"));
}

// IA3 on Linear sites (default, as peft: k, v, wo on T5; key, value, output.dense on BERT).
// The sites options.feedforward_modules names (default, as peft's feedforward mapping: wo /
// output.dense, which on BERT names the attention's output projection too) scale their
// input, the others their output, bias included.
class IA3Recipe : public RecipeBase<IA3Options> {
 public:
  explicit IA3Recipe(IA3Options options)
      : RecipeBase(std::move(options), Site::Kind::linear, {{"t5", "k|v|wo"}, {"bert", "key|value|output.dense"}}) {}
  std::string method() const override { return "ia3"; }
  nlohmann::json options_json() const override {
    const auto& ff = options.feedforward_modules();
    return {{"feedforward_modules", ff ? nlohmann::json(*ff) : nlohmann::json(nullptr)}};
  }
  void prepare(const std::vector<const Site*>& /*sites*/, const std::string& model_type) override {
    static const DefaultSites peft_feedforward{{"t5", "wo"}, {"bert", "output.dense"}};
    const auto default_ff = peft_feedforward.count(model_type) ? peft_feedforward.at(model_type) : "";
    const auto text = options.feedforward_modules().value_or(default_ff);
    feedforward_ = text.empty() ? std::nullopt : std::optional<SitePattern>(SitePattern(text));
  }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    const bool ff = feedforward_ && feedforward_->matches(site.name);
    auto delta = IA3(IA3Options(ff ? site.linear->in_features : site.linear->out_features).feedforward(ff));
    if (site.linear->bias.defined()) delta->bind_base_bias(site.linear->bias);
    return delta.ptr();
  }

 private:
  std::optional<SitePattern> feedforward_;
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const IA3Options& o) { return std::make_shared<IA3Recipe>(o); }

// The method table's row: peft's defaults at 3e-2, ten times T-Few's rate, which tools/lr_sweep
// measured better on BERT's built-in task (1.000 against 0.973), MiniLM's SST-2 (0.794 against
// 0.755) and T5's built-in task (0.820 against 0.570; the README's learning-rate table).
inline MethodInfo ia3_method_info() {
  return {{"ia3"},
          [](const JsonFields& j) {
            return make_recipe(IA3Options().feedforward_modules(j.get_optional<std::string>("feedforward_modules")));
          },
          {{"ia3", "IA3 on k, v, wo / key, value, output.dense (peft's sites)", {{"t5", 3e-2}, {"bert", 3e-2}},
            [](const PresetSizes&) { return make_recipe(IA3Options()); }}}};
}

}  // namespace deltatune
