// Bottleneck adapters on a sublayer's output: Houlsby et al. 2019, Pfeiffer et al. 2021,
// and their parameterised-hypercomplex forms, PHM-Adapter and Compacter(++) (Mahabadi et al. 2021).
//
// f(h) = up(act(down(h))), down: d -> m, up: m -> d, each a Linear or a PHMLinear; the
// adapter returns h + f(h). Placement follows adapters 1.3.0 so whole-model outputs match:
//   houlsby  (DoubleSeqBnConfig, Compacter): after attention and after the feed-forward
//            block; the sublayer then ends as usual: LN(h + f(h) + residual).
//   pfeiffer (SeqBnConfig, Compacter++): after the feed-forward block only; f reads the
//            sublayer's normalised output: x = LN(h + residual), then LN(f(x) + h + residual)
//            (adapters' original_ln_before; without a layer norm, LN is the identity).
// The layer norms trained with adapters are the backbone's: the injector unfreezes them
// (spec.hpp's layer_norms selector); they are not part of this module.
// Deliberate differences from adapters' defaults, following the papers: Linear projections
// are initialised N(0, 1e-2) truncated at 2 std, biases zero (Houlsby; adapters' default is
// "bert", N(0, 0.02) untruncated); Houlsby's nonlinearity is GELU (adapters' DoubleSeqBn: swish).
#pragma once

#include <torch/torch.h>

#include <cmath>
#include <optional>
#include <string>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/recipe.hpp>
#include <deltatune/methods/phm.hpp>

namespace deltatune {

enum class AdapterPlacement {
  houlsby,   // h + f(h) before the residual and layer norm (attention and feed-forward sites)
  pfeiffer,  // f of the normalised sublayer output, added to h (feed-forward site only)
};

struct AdapterOptions {
  // d_model 0: DeltaModel takes it from each output site.
  explicit AdapterOptions(int64_t d_model = 0) : d_model_(d_model) {}
  TORCH_ARG(int64_t, d_model);                 // the sublayer's output size d
  TORCH_ARG(int64_t, reduction_factor) = 16;   // m = d / reduction_factor (adapters' default)
  TORCH_ARG(int64_t, bottleneck) = 0;          // m itself where positive (Houlsby sweeps 8, 64, 256)
  TORCH_ARG(std::string, non_linearity) = "gelu";  // relu, gelu, gelu_new, swish (silu), tanh
  TORCH_ARG(double, init_std) = 1e-2;          // Linear projections: N(0, init_std) truncated at 2 std
  TORCH_ARG(AdapterPlacement, placement) = AdapterPlacement::houlsby;
  TORCH_ARG(int64_t, phm_n) = 0;               // > 0: both projections are PHMLinear with n terms
  TORCH_ARG(int64_t, phm_rank) = 0;            // PHM B_i full (0) or of rank r (Compacter: 1)
  TORCH_ARG(bool, shared_phm_rule) = true;     // PHM through DeltaModel: one rule A for all layers (adapters' default)
};

// Houlsby's adapter on a sublayer of width d.
inline AdapterOptions houlsby_options(int64_t d_model = 0) { return AdapterOptions(d_model); }
// Pfeiffer's adapter: feed-forward only, ReLU, reduction 16.
inline AdapterOptions pfeiffer_options(int64_t d_model = 0) {
  return AdapterOptions(d_model).non_linearity("relu").placement(AdapterPlacement::pfeiffer);
}
// PHM-Adapter: Houlsby placement, PHM projections with full B_i and their own A (the
// Compacter paper's baseline, n = 12 in its tables), reduction 32.
inline AdapterOptions phm_adapter_options(int64_t d_model = 0, int64_t n = 12) {
  return AdapterOptions(d_model).reduction_factor(32).phm_n(n);
}
// Compacter: Houlsby placement, LPHM projections (rank 1, n = 4) whose A is shared by
// every adapter layer (pass one PHMSharedFactors to all), GELU, reduction 32.
inline AdapterOptions compacter_options(int64_t d_model = 0) {
  return AdapterOptions(d_model).reduction_factor(32).phm_n(4).phm_rank(1);
}
// Compacter++: Compacter at the feed-forward site only (Pfeiffer placement).
inline AdapterOptions compacter_plus_plus_options(int64_t d_model = 0) {
  return compacter_options(d_model).placement(AdapterPlacement::pfeiffer);
}

namespace detail {

inline torch::Tensor adapter_activation(const std::string& name, const torch::Tensor& x) {
  if (name == "relu") return torch::relu(x);
  if (name == "gelu") return torch::gelu(x);
  if (name == "gelu_new") return torch::gelu(x, "tanh");
  if (name == "swish" || name == "silu") return torch::silu(x);
  if (name == "tanh") return torch::tanh(x);
  throw OptionError(fmt::format(
      "Adapter: option non_linearity '{}' is not one of relu, gelu, gelu_new, swish, silu, tanh", name));
}

// N(0, std^2) truncated to [-2 std, 2 std] in place, by inverting the normal CDF over a
// uniform draw on the kept interval (LibTorch's C++ init has no trunc_normal_).
inline void truncated_normal_(torch::Tensor& t, double std) {
  const double bound = std::erf(2.0 / std::sqrt(2.0));  // 2 Phi(2) - 1
  torch::NoGradGuard no_grad;
  t.uniform_(-bound, bound).erfinv_().mul_(std * std::sqrt(2.0)).clamp_(-2 * std, 2 * std);
}

inline const char* to_string(AdapterPlacement placement) {
  return placement == AdapterPlacement::pfeiffer ? "pfeiffer" : "houlsby";
}

}  // namespace detail

// The method's name in configs and summaries, from the options that make it that method.
inline std::string adapter_method(const AdapterOptions& o) {
  if (o.phm_n() == 0) return "adapter";
  if (o.phm_rank() == 0) return "phm_adapter";
  return o.placement() == AdapterPlacement::pfeiffer ? "compacter++" : "compacter";
}

inline nlohmann::json adapter_options_json(const AdapterOptions& o) {
  return {{"d_model", o.d_model()},       {"reduction_factor", o.reduction_factor()},
          {"bottleneck", o.bottleneck()}, {"non_linearity", o.non_linearity()},
          {"init_std", o.init_std()},     {"placement", detail::to_string(o.placement())},
          {"phm_n", o.phm_n()},           {"phm_rank", o.phm_rank()},
          {"shared_phm_rule", o.shared_phm_rule()}};
}

class AdapterImpl : public torch::nn::Cloneable<AdapterImpl>, public ActivationDelta {
 public:
  // `shared`: Compacter's rule matrices, shared with the other adapters; null for layers
  // that own theirs (PHM-Adapter) or have none (Linear projections).
  explicit AdapterImpl(AdapterOptions options, PHMSharedFactors shared = nullptr)
      : options(std::move(options)), shared(std::move(shared)) {
    reset();
  }

  int64_t bottleneck() const {
    return options.bottleneck() > 0 ? options.bottleneck() : std::max<int64_t>(1, options.d_model() / options.reduction_factor());
  }

  void reset() override {
    const auto& o = options;
    detail::check<OptionError>(o.d_model() > 0, "Adapter: option d_model must be positive, got {}", o.d_model());
    detail::check<OptionError>(o.reduction_factor() > 0, "Adapter: option reduction_factor must be positive, got {}",
                               o.reduction_factor());
    detail::check<OptionError>(o.bottleneck() >= 0, "Adapter: option bottleneck must be 0 (use reduction_factor) or positive, got {}",
                               o.bottleneck());
    detail::check<OptionError>(o.phm_n() >= 0, "Adapter: option phm_n must be 0 (Linear) or positive, got {}", o.phm_n());
    detail::adapter_activation(o.non_linearity(), torch::zeros({1}));  // rejects an unknown name now
    const int64_t d = o.d_model(), m = bottleneck();
    if (o.phm_n() > 0) {  // each PHMLinear checks its own, far fewer, parameters
      adapter_down = register_module("adapter_down", PHMLinear(phm(d, m), shared));
      adapter_up = register_module("adapter_up", PHMLinear(phm(m, d), shared));
      return;
    }
    detail::check_parameters_fit(2 * double(d) * double(m), fmt::format("Adapter: a bottleneck of {} on width {}", m, d));
    linear_down = register_module("adapter_down", torch::nn::Linear(d, m));
    linear_up = register_module("adapter_up", torch::nn::Linear(m, d));
    torch::NoGradGuard no_grad;
    for (auto* layer : {&linear_down, &linear_up}) {
      detail::truncated_normal_((*layer)->weight, o.init_std());
      (*layer)->bias.zero_();
    }
  }

  // (..., d) -> (..., d): the bottleneck f(h) alone.
  torch::Tensor bottleneck_forward(const torch::Tensor& h) {
    const bool phm_layers = !adapter_down.is_empty();
    auto down = phm_layers ? adapter_down(h) : linear_down(h);  // (..., m)
    down = detail::adapter_activation(options.non_linearity(), down);
    return phm_layers ? adapter_up(down) : linear_up(down);
  }

  torch::Tensor forward(const torch::Tensor& hidden) override { return hidden + bottleneck_forward(hidden); }

  torch::Tensor forward_sublayer(const torch::Tensor& hidden, const torch::Tensor& residual,
                                 const LayerNormFn& layer_norm) override {
    if (options.placement() == AdapterPlacement::houlsby) return end_sublayer(forward(hidden), residual, layer_norm);
    auto normed = layer_norm ? layer_norm(hidden + residual) : hidden + residual;
    return end_sublayer(hidden + bottleneck_forward(normed), residual, layer_norm);
  }

  // The projections as dense matrices (a PHMLinear's W = sum_i A_i (x) B_i is (in, out)).
  std::optional<BottleneckFactors> bottleneck_factors() override {
    BottleneckFactors f;
    if (adapter_down.is_empty()) {
      f.down_weight = linear_down->weight, f.down_bias = linear_down->bias;
      f.up_weight = linear_up->weight, f.up_bias = linear_up->bias;
    } else {
      f.down_weight = adapter_down->weight().t(), f.down_bias = phm_bias(*adapter_down);
      f.up_weight = adapter_up->weight().t(), f.up_bias = phm_bias(*adapter_up);
    }
    f.non_linearity = options.non_linearity();
    f.activation = [name = options.non_linearity()](const torch::Tensor& x) { return detail::adapter_activation(name, x); };
    f.reads_normed = options.placement() == AdapterPlacement::pfeiffer;
    return f;
  }

  std::string method() const override { return adapter_method(options); }
  nlohmann::json options_json() const override {
    auto j = adapter_options_json(options);
    j["shared_rule"] = static_cast<bool>(shared);
    return j;
  }
  torch::nn::Module& module() override { return *this; }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::Adapter(method=" << method() << ", d_model=" << options.d_model()
           << ", bottleneck=" << bottleneck() << ", non_linearity=" << options.non_linearity()
           << ", placement=" << detail::to_string(options.placement()) << ")";
  }

  AdapterOptions options;
  PHMSharedFactors shared;
  torch::nn::Linear linear_down{nullptr}, linear_up{nullptr};
  PHMLinear adapter_down{nullptr}, adapter_up{nullptr};

 private:
  static torch::Tensor phm_bias(PHMLinearImpl& layer) {
    return layer.b.defined() ? layer.b : torch::zeros({layer.options.out_features()}, layer.rule().options());
  }
  PHMLinearOptions phm(int64_t in, int64_t out) const {
    return PHMLinearOptions(in, out).n(options.phm_n()).rank(options.phm_rank());
  }
};
TORCH_MODULE(Adapter);

// d_model is absent from a recipe's options (0: DeltaModel takes it from each site).
inline AdapterOptions adapter_options_from_json(const JsonFields& j) {
  const auto placement = j.get<std::string>("placement");
  j.check(placement == "houlsby" || placement == "pfeiffer", "placement", "must be houlsby or pfeiffer");
  const auto phm_rank = j.get<int64_t>("phm_rank");
  return AdapterOptions(j.get<int64_t>("d_model", 0))
      .reduction_factor(j.get<int64_t>("reduction_factor"))
      .bottleneck(j.get<int64_t>("bottleneck"))
      .non_linearity(j.get<std::string>("non_linearity"))
      .init_std(j.get<double>("init_std"))
      .placement(placement == "pfeiffer" ? AdapterPlacement::pfeiffer : AdapterPlacement::houlsby)
      .phm_n(j.get<int64_t>("phm_n"))
      .phm_rank(phm_rank)
      .shared_phm_rule(j.get<bool>("shared_phm_rule", phm_rank > 0));  // files before the option: Compacter shared
}

// Houlsby's places: after self-attention and after the feed-forward block (not after T5's
// cross-attention), the setup behind the Compacter paper's parameter counts; Pfeiffer's:
// after the feed-forward block only. T5's feed-forward sublayer is `layer.1` in the encoder
// and `layer.2` in the decoder; BERT's is `encoder.layer.{i}.output`.
inline const DefaultSites kHoulsbySites{
    {"t5", "re:(.*\\.)?encoder\\.block\\.\\d+\\.layer\\.[01]|(.*\\.)?decoder\\.block\\.\\d+\\.layer\\.[02]"},
    {"bert", "re:(.*\\.)?encoder\\.layer\\.\\d+\\.(attention\\.output|output)"}};
inline const DefaultSites kPfeifferSites{
    {"t5", "re:(.*\\.)?encoder\\.block\\.\\d+\\.layer\\.1|(.*\\.)?decoder\\.block\\.\\d+\\.layer\\.2"},
    {"bert", "re:(.*\\.)?encoder\\.layer\\.\\d+\\.output"}};

// Bottleneck adapters on sublayer outputs, at Houlsby's or Pfeiffer's places as the options
// say; PHM rule matrices A_i are one set shared by all its adapters where the options ask
// (Compacter's, adapters' default). The layer norms train with them (Houlsby et al.,
// Mahabadi et al.).
class AdapterRecipe : public RecipeBase<AdapterOptions> {
 public:
  explicit AdapterRecipe(AdapterOptions options)
      : RecipeBase(options, Site::Kind::output,
                   options.placement() == AdapterPlacement::pfeiffer ? kPfeifferSites : kHoulsbySites) {
    if (options.phm_n() > 0 && options.shared_phm_rule())
      shared_ = PHMSharedFactors(PHMSharedFactorsOptions(options.phm_n()));
  }
  std::string method() const override { return adapter_method(options); }
  nlohmann::json options_json() const override { return adapter_options_json(options); }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    return Adapter(AdapterOptions(options).d_model(site.output->output_features), shared_).ptr();
  }
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> shared_modules() override {
    if (!shared_) return {};
    return {{"phm_rule", shared_.ptr()}};
  }
  std::vector<std::string> select_backbone_parameters(const std::vector<std::string>& names) const override {
    return detail::names_matching(names, "(layer_norm|LayerNorm)\\.(weight|bias)$");
  }

 private:
  PHMSharedFactors shared_{nullptr};
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const AdapterOptions& o) { return std::make_shared<AdapterRecipe>(o); }

// The method table's row: one method under four saved names, five presets. Learning rates:
// Compacter's table on T5 (3e-3 for all); on BERT Houlsby's and Pfeiffer's grids (1e-3 for
// few updates) and Compacter's 3e-3 for PHM layers.
inline MethodInfo adapter_method_info() {
  auto preset = [](std::string name, std::string description, double bert_lr, AdapterOptions (*options)()) {
    return MethodPreset{std::move(name), std::move(description), {{"t5", 3e-3}, {"bert", bert_lr}},
                        [options](const PresetSizes& s) {
                          auto o = options();
                          return make_recipe(s.reduction_factor > 0 ? o.reduction_factor(s.reduction_factor) : o);
                        }};
  };
  return {{"adapter", "phm_adapter", "compacter", "compacter++"},
          [](const JsonFields& j) { return make_recipe(adapter_options_from_json(j)); },
          {preset("adapter", "Houlsby adapters after attention and feed-forward", 1e-3, [] { return houlsby_options(); }),
           preset("pfeiffer", "Pfeiffer adapters after feed-forward", 1e-3, [] { return pfeiffer_options(); }),
           preset("phm", "PHM-Adapter, n 4, at Houlsby's places", 3e-3, [] { return phm_adapter_options(0, 4); }),
           preset("compacter", "Compacter at Houlsby's places", 3e-3, [] { return compacter_options(); }),
           preset("compacter++", "Compacter++ after feed-forward", 3e-3, [] { return compacter_plus_plus_options(); })}};
}

}  // namespace deltatune
