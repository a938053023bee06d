// LoRA (Hu et al. 2021): W0 + (alpha / r) B A on a frozen Linear, A (r, in), B (out, r).
//
// A is Kaiming-uniform (a = sqrt 5, as nn.Linear and peft), B zero: the layer is unchanged
// at step 0. Dropout acts on the input of the low-rank path only. rsLoRA (Kalajdzievski
// 2023) scales by alpha / sqrt(r) instead. Parameter names as peft: lora_A, lora_B
// (peft keeps them as Linear submodules, lora_A.weight; the injector maps the names).
//
// DoRA (Liu et al. 2024; peft's use_dora): the weight split into a magnitude m (out) and a
// direction, W' = m * V / ||V|| with V = W0 + s B A and ||V|| each output row's norm. m starts
// at ||W0|| (the recipe sets it from the site's weight), so the layer is again unchanged at
// step 0. As the paper (section 4.3) and peft, ||V|| is treated as a constant in the backward,
// which saves the (out, in) gradient of V; the forward still forms V once per call to take
// its norms (peft does the same).
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
  TORCH_ARG(bool, use_dora) = false;     // DoRA: a trained magnitude per output row
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
    // Ones until init_magnitude() sees the weight; a loaded delta's file replaces them.
    if (o.use_dora()) lora_magnitude_vector = register_parameter("lora_magnitude_vector", torch::ones({o.out_features()}));
    torch::NoGradGuard no_grad;
    torch::nn::init::kaiming_uniform_(lora_A, std::sqrt(5.0));
  }

  // DoRA: m = ||W0 + s B A|| per output row, the layer's own magnitude (B is zero at init).
  void init_magnitude(const torch::Tensor& base_weight) {
    check_dora("init_magnitude");
    torch::NoGradGuard no_grad;
    lora_magnitude_vector.copy_(dora_norm(base_weight.to(lora_B.options())));
  }

  double scaling() const {
    return options.use_rslora() ? options.alpha() / std::sqrt(double(options.r())) : options.alpha() / options.r();
  }

  std::string method() const override { return "lora"; }
  nlohmann::json options_json() const override {
    return {{"in_features", options.in_features()}, {"out_features", options.out_features()}, {"r", options.r()},
            {"alpha", options.alpha()}, {"dropout", options.dropout()}, {"use_rslora", options.use_rslora()},
            {"use_dora", options.use_dora()}};
  }
  torch::nn::Module& module() override { return *this; }

  // (out, in) = s B A; DoRA: m / ||W0 + s B A|| (W0 + s B A) - W0, a row scaling once merged
  // (peft's merge, the norm taken from the weight being merged into).
  torch::Tensor delta_weight(const torch::Tensor& base_weight) override {
    auto low_rank = torch::mm(lora_B, lora_A) * scaling();
    if (!options.use_dora()) return low_rank;
    auto direction = base_weight + low_rank;
    return (lora_magnitude_vector / dora_norm(base_weight)).unsqueeze(1) * direction - base_weight;
  }

  // (..., in) -> (..., out): s B A dropout(x), never forming the (out, in) matrix; s scales
  // the (..., r) product, the narrowest tensor on the path.
  // DoRA adds (g - 1) (x W0^T) + g s B A x, g = m / ||W0 + s B A||, so that the layer gives
  // g (x (W0 + s B A)^T) + b0. x W0^T is y0 - b0, but with dropout in training it is computed
  // from the dropped-out input, as peft does.
  torch::Tensor delta_output(const torch::Tensor& x, const torch::Tensor& base_weight, const torch::Tensor& base_bias,
                             const torch::Tensor& base_output) override {
    const bool dropping = options.dropout() > 0 && is_training();
    auto h = dropping ? torch::nn::functional::dropout(x, torch::nn::functional::DropoutFuncOptions()
                                                              .p(options.dropout())
                                                              .training(true))
                      : x;
    auto low_rank = torch::matmul(torch::matmul(h, lora_A.t()) * scaling(), lora_B.t());  // (..., r) then (..., out)
    if (!options.use_dora()) return low_rank;
    auto g = lora_magnitude_vector / dora_norm(base_weight);
    auto base = dropping ? torch::nn::functional::linear(h, base_weight)
                         : (base_bias.defined() ? base_output - base_bias : base_output);
    return (g - 1) * base + g * low_rank;
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::LoRA(in_features=" << options.in_features() << ", out_features=" << options.out_features()
           << ", r=" << options.r() << ", alpha=" << options.alpha() << ", dropout=" << options.dropout()
           << ", use_rslora=" << (options.use_rslora() ? "true" : "false")
           << ", use_dora=" << (options.use_dora() ? "true" : "false") << ")";
  }

  LoRAOptions options;
  torch::Tensor lora_A, lora_B;
  torch::Tensor lora_magnitude_vector;  // DoRA's m (out); undefined without use_dora

 private:
  // ||W0 + s B A|| per output row, detached (see the header comment).
  torch::Tensor dora_norm(const torch::Tensor& base_weight) {
    torch::NoGradGuard no_grad;
    return torch::linalg_vector_norm(base_weight + torch::mm(lora_B, lora_A) * scaling(), 2, {1});
  }
  void check_dora(const char* what) const {
    detail::check<OptionError>(options.use_dora(), "LoRA: {} is DoRA's; build the LoRA with use_dora(true)", what);
  }
};
TORCH_MODULE(LoRA);

// The shapes are absent from a recipe's options (0: DeltaModel takes them from each site).
inline LoRAOptions lora_options_from_json(const JsonFields& j) {
  return LoRAOptions(j.get<int64_t>("in_features", 0), j.get<int64_t>("out_features", 0))
      .r(j.get<int64_t>("r"))
      .alpha(j.get<double>("alpha"))
      .dropout(j.get<double>("dropout"))
      .use_rslora(j.get<bool>("use_rslora"))
      .use_dora(j.get<bool>("use_dora", false));  // absent from files written before DoRA
}

// LoRA on Linear sites (default, as peft: q, v on T5; query, value on BERT).
class LoRARecipe : public RecipeBase<LoRAOptions> {
 public:
  explicit LoRARecipe(LoRAOptions options)
      : RecipeBase(std::move(options), Site::Kind::linear, {{"t5", "q|v"}, {"bert", "query|value"}}) {}
  std::string method() const override { return "lora"; }
  nlohmann::json options_json() const override {
    return {{"r", options.r()}, {"alpha", options.alpha()}, {"dropout", options.dropout()},
            {"use_rslora", options.use_rslora()}, {"use_dora", options.use_dora()}};
  }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    auto lora = LoRA(LoRAOptions(options).in_features(site.linear->in_features).out_features(site.linear->out_features));
    if (options.use_dora()) lora->init_magnitude(site.linear->weight);
    return lora.ptr();
  }
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const LoRAOptions& o) { return std::make_shared<LoRARecipe>(o); }

// The method table's rows: r 8 with alpha = r (a command line's rank sets both), LoRA's GLUE
// learning rate (RoBERTa-base, 5e-4) on either backbone; DoRA the same, its direction being
// LoRA's and the magnitudes starting at the weights' own.
inline MethodInfo lora_method_info() {
  const auto preset = [](bool dora) {
    return [dora](const PresetSizes& s) {
      const int64_t r = s.rank > 0 ? s.rank : 8;
      return make_recipe(LoRAOptions().r(r).alpha(double(r)).use_dora(dora));
    };
  };
  return {{"lora"},
          [](const JsonFields& j) { return make_recipe(lora_options_from_json(j)); },
          {{"lora", "LoRA, r 8 (alpha = r) on q, v / query, value", {{"t5", 5e-4}, {"bert", 5e-4}}, preset(false)},
           {"dora", "DoRA: LoRA r 8 (alpha = r) with trained magnitudes, on q, v / query, value",
            {{"t5", 5e-4}, {"bert", 5e-4}}, preset(true)}}};
}

}  // namespace deltatune
