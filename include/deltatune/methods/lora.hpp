// LoRA (Hu et al. 2021): W0 + (alpha / r) B A on a frozen Linear, A (r, in), B (out, r).
//
// A is Kaiming-uniform (a = sqrt 5, as nn.Linear and peft), B zero: the layer is unchanged
// at step 0. Dropout acts on the input of the low-rank path only. rsLoRA (Kalajdzievski
// 2023) scales by alpha / sqrt(r) instead. Parameter names as peft: lora_A, lora_B
// (peft keeps them as Linear submodules, lora_A.weight; the injector maps the names).
#pragma once

#include <torch/torch.h>

#include <cmath>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/recipe.hpp>

namespace deltatune {

struct LoRAOptions {
  // Shapes 0: DeltaModel takes them from each site.
  LoRAOptions(int64_t in_features = 0, int64_t out_features = 0)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(int64_t, r) = 8;             // rank; the paper's GPT-3 runs use 1 to 64, peft's default is 8
  TORCH_ARG(double, alpha) = 8;          // scaling numerator; the paper sets alpha to the first r tried
  TORCH_ARG(double, dropout) = 0.0;      // on the low-rank path's input (peft lora_dropout)
  TORCH_ARG(bool, use_rslora) = false;   // scale alpha / sqrt(r) instead of alpha / r
};

class LoRAImpl : public torch::nn::Cloneable<LoRAImpl>, public WeightDelta {
 public:
  explicit LoRAImpl(LoRAOptions options) : options(std::move(options)) { reset(); }

  void reset() override {
    const auto& o = options;
    detail::check<OptionError>(o.r() > 0, "LoRA: option r (rank) must be positive, got {}", o.r());
    detail::check<OptionError>(o.in_features() > 0 && o.out_features() > 0,
                               "LoRA: options in_features and out_features must be positive, got {} and {}",
                               o.in_features(), o.out_features());
    detail::check<OptionError>(o.dropout() >= 0 && o.dropout() < 1, "LoRA: option dropout must be in [0, 1), got {}",
                               o.dropout());
    detail::check_parameters_fit(double(o.r()) * double(o.in_features() + o.out_features()),
                                 fmt::format("LoRA: r = {} on a {} x {} layer", o.r(), o.out_features(), o.in_features()));
    lora_A = register_parameter("lora_A", torch::empty({o.r(), o.in_features()}));
    lora_B = register_parameter("lora_B", torch::zeros({o.out_features(), o.r()}));
    torch::NoGradGuard no_grad;
    torch::nn::init::kaiming_uniform_(lora_A, std::sqrt(5.0));
  }

  double scaling() const {
    return options.use_rslora() ? options.alpha() / std::sqrt(double(options.r())) : options.alpha() / options.r();
  }

  std::string method() const override { return "lora"; }
  nlohmann::json options_json() const override {
    return {{"in_features", options.in_features()}, {"out_features", options.out_features()}, {"r", options.r()},
            {"alpha", options.alpha()}, {"dropout", options.dropout()}, {"use_rslora", options.use_rslora()}};
  }
  torch::nn::Module& module() override { return *this; }

  // (out, in) = s B A
  torch::Tensor delta_weight(const torch::Tensor& /*base_weight*/) override {
    return torch::mm(lora_B, lora_A) * scaling();
  }

  // (..., in) -> (..., out): s B A dropout(x), never forming the (out, in) matrix; s scales
  // the (..., r) product, the narrowest tensor on the path.
  torch::Tensor delta_output(const torch::Tensor& x, const torch::Tensor&, const torch::Tensor&) override {
    auto h = torch::nn::functional::dropout(x, torch::nn::functional::DropoutFuncOptions()
                                                   .p(options.dropout())
                                                   .training(is_training()));
    return torch::matmul(torch::matmul(h, lora_A.t()) * scaling(), lora_B.t());  // (..., r) then (..., out)
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::LoRA(in_features=" << options.in_features() << ", out_features=" << options.out_features()
           << ", r=" << options.r() << ", alpha=" << options.alpha() << ", dropout=" << options.dropout()
           << ", use_rslora=" << (options.use_rslora() ? "true" : "false") << ")";
  }

  LoRAOptions options;
  torch::Tensor lora_A, lora_B;
};
TORCH_MODULE(LoRA);

// The shapes are absent from a recipe's options (0: DeltaModel takes them from each site).
inline LoRAOptions lora_options_from_json(const JsonFields& j) {
  return LoRAOptions(j.get<int64_t>("in_features", 0), j.get<int64_t>("out_features", 0))
      .r(j.get<int64_t>("r"))
      .alpha(j.get<double>("alpha"))
      .dropout(j.get<double>("dropout"))
      .use_rslora(j.get<bool>("use_rslora"));
}

// LoRA on Linear sites (default, as peft: q, v on T5; query, value on BERT).
class LoRARecipe : public RecipeBase<LoRAOptions> {
 public:
  explicit LoRARecipe(LoRAOptions options)
      : RecipeBase(std::move(options), Site::Kind::linear, {{"t5", "q|v"}, {"bert", "query|value"}}) {}
  std::string method() const override { return "lora"; }
  nlohmann::json options_json() const override {
    return {{"r", options.r()}, {"alpha", options.alpha()}, {"dropout", options.dropout()},
            {"use_rslora", options.use_rslora()}};
  }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    return LoRA(LoRAOptions(options).in_features(site.linear->in_features).out_features(site.linear->out_features)).ptr();
  }
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const LoRAOptions& o) { return std::make_shared<LoRARecipe>(o); }

// The method table's row: r 8 with alpha = r (a command line's rank sets both), LoRA's GLUE
// learning rate (RoBERTa-base, 5e-4) on either backbone.
inline MethodInfo lora_method_info() {
  return {{"lora"},
          [](const JsonFields& j) { return make_recipe(lora_options_from_json(j)); },
          {{"lora", "LoRA, r 8 (alpha = r) on q, v / query, value", {{"t5", 5e-4}, {"bert", 5e-4}},
            [](const PresetSizes& s) {
              const int64_t r = s.rank > 0 ? s.rank : 8;
              return make_recipe(LoRAOptions().r(r).alpha(double(r)));
            }}}};
}

}  // namespace deltatune
