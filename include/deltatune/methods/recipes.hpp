// How each method attaches to a backbone: the DeltaRecipe that DeltaModel::add builds from
// a method's options, filling in what each site tells (its widths, its attention layers),
// with peft's default target sites per backbone.
//   model.add("sst2", deltatune::LoRAOptions().r(8).alpha(16), "q|v");
//   model.add("rte", deltatune::compacter_options());   // every feed-forward and attention output
#pragma once

#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include <deltatune/core/delta_model.hpp>
#include <deltatune/methods/adapter.hpp>
#include <deltatune/methods/bitfit.hpp>
#include <deltatune/methods/ia3.hpp>
#include <deltatune/methods/lora.hpp>
#include <deltatune/methods/prefix.hpp>
#include <deltatune/methods/prompt.hpp>
#include <deltatune/methods/spec.hpp>

namespace deltatune {

namespace detail {

// Default sites, as peft's TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING and adapters'
// placements name them. T5's feed-forward output is `layer.1` in the encoder and
// `layer.2` in the decoder; BERT's is `encoder.layer.{i}.output`.
struct DefaultSites {
  std::string t5, bert;
  std::string for_backbone(const std::string& backbone) const {
    return backbone == "t5" ? t5 : backbone == "bert" ? bert : "";
  }
};
inline const DefaultSites kAttentionQueryValue{"q|v", "query|value"};
// IA3's sites and, among them, those that scale their input (peft's feedforward mapping):
// on BERT "output.dense" names the attention's output projection as well as the feed-forward one.
inline const DefaultSites kIA3Sites{"k|v|wo", "key|value|output.dense"};
inline const DefaultSites kIA3FeedForward{"wo", "output.dense"};
inline const DefaultSites kEveryLinear{"re:.*", "re:.*"};
// Houlsby's places: after self-attention and after the feed-forward block (not after T5's
// cross-attention), the setup behind the Compacter paper's parameter counts.
inline const DefaultSites kAttentionAndFeedForwardSublayers{
    "re:(.*\\.)?encoder\\.block\\.\\d+\\.layer\\.[01]|(.*\\.)?decoder\\.block\\.\\d+\\.layer\\.[02]",
    "re:(.*\\.)?encoder\\.layer\\.\\d+\\.(attention\\.output|output)"};
inline const DefaultSites kFeedForwardSublayer{"re:(.*\\.)?encoder\\.block\\.\\d+\\.layer\\.1|(.*\\.)?decoder\\.block\\.\\d+\\.layer\\.2",
                                               "re:(.*\\.)?encoder\\.layer\\.\\d+\\.output"};
// The attention layers peft's prefix tuning reaches: on T5 the decoder's self-attention only
// (transformers discards the cross-attention cache peft builds), on BERT every self-attention.
inline const char* const kT5DecoderSelfAttention = "re:(.*\\.)?decoder\\.block\\.\\d+\\.layer\\.0\\.SelfAttention";
inline const DefaultSites kPeftPrefixSites{kT5DecoderSelfAttention, "re:(.*\\.)?encoder\\.layer\\.\\d+\\.attention\\.self"};
inline const DefaultSites kEncoderInput{"encoder", "embeddings"};
// The layer norms adapters and Compacter train with their deltas (Houlsby et al., Mahabadi et al.).
inline const char* const kLayerNormParameters = "(layer_norm|LayerNorm)\\.(weight|bias)$";

inline std::vector<std::string> names_matching(const std::vector<std::string>& names, const char* regex) {
  const std::regex re(regex);
  std::vector<std::string> out;
  for (const auto& n : names)
    if (std::regex_search(n, re)) out.push_back(n);
  return out;
}

// The parts every recipe shares: a method name, options, the site kind it acts on and
// its default sites; subclasses say how to make one delta.
template <class Options>
class RecipeBase : public DeltaRecipe {
 public:
  RecipeBase(Options options, Site::Kind kind, DefaultSites defaults)
      : options(std::move(options)), kind_(kind), defaults_(std::move(defaults)) {}
  bool accepts(Site::Kind kind) const override { return kind == kind_; }
  std::string default_pattern(const std::string& backbone) const override { return defaults_.for_backbone(backbone); }

  Options options;

 private:
  Site::Kind kind_;
  DefaultSites defaults_;
};

}  // namespace detail

// LoRA on Linear sites (default: q, v / query, value).
class LoRARecipe : public detail::RecipeBase<LoRAOptions> {
 public:
  explicit LoRARecipe(LoRAOptions options)
      : RecipeBase(std::move(options), Site::Kind::linear, detail::kAttentionQueryValue) {}
  std::string method() const override { return "lora"; }
  nlohmann::json options_json() const override {
    return {{"r", options.r()}, {"alpha", options.alpha()}, {"dropout", options.dropout()},
            {"use_rslora", options.use_rslora()}};
  }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    return LoRA(LoRAOptions(options).in_features(site.linear->in_features).out_features(site.linear->out_features)).ptr();
  }
};

// IA3 on Linear sites (default, as peft: k, v, wo on T5; key, value, output.dense on BERT).
// The sites options.feedforward_modules names (default, as peft: wo / output.dense) scale
// their input, the others their output, bias included.
class IA3Recipe : public detail::RecipeBase<IA3Options> {
 public:
  explicit IA3Recipe(IA3Options options) : RecipeBase(std::move(options), Site::Kind::linear, detail::kIA3Sites) {}
  std::string method() const override { return "ia3"; }
  nlohmann::json options_json() const override {
    const auto& ff = options.feedforward_modules();
    return {{"feedforward_modules", ff ? nlohmann::json(*ff) : nlohmann::json(nullptr)}};
  }
  void prepare(const std::vector<const Site*>& /*sites*/, const std::string& backbone) override {
    const auto text = options.feedforward_modules().value_or(detail::kIA3FeedForward.for_backbone(backbone));
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

// BitFit: a trained bias on every Linear (added where the backbone has none, an offset
// to the frozen one where it has), and the backbone's LayerNorm biases where they exist.
class BitFitRecipe : public detail::RecipeBase<BitFitOptions> {
 public:
  explicit BitFitRecipe(BitFitOptions options = BitFitOptions())
      : RecipeBase(std::move(options), Site::Kind::linear, detail::kEveryLinear) {}
  std::string method() const override { return "bitfit"; }
  nlohmann::json options_json() const override { return nlohmann::json::object(); }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    return BitFit(BitFitOptions(site.linear->out_features)).ptr();
  }
  std::vector<std::string> select_backbone_parameters(const std::vector<std::string>& names) const override {
    return detail::names_matching(names, "LayerNorm\\.bias$");
  }
};

// Bottleneck adapters on sublayer outputs: Houlsby and PHM-Adapter after attention and
// feed-forward, Pfeiffer and Compacter++ after feed-forward only; PHM rule matrices A_i
// are one set shared by all its adapters where the options ask (Compacter's, adapters' default). The layer norms train with them.
class AdapterRecipe : public detail::RecipeBase<AdapterOptions> {
 public:
  explicit AdapterRecipe(AdapterOptions options)
      : RecipeBase(options, Site::Kind::output,
                   options.placement() == AdapterPlacement::pfeiffer ? detail::kFeedForwardSublayer
                                                                     : detail::kAttentionAndFeedForwardSublayers) {
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
    return detail::names_matching(names, detail::kLayerNormParameters);
  }

 private:
  PHMSharedFactors shared_{nullptr};
};

// Prompt tuning at the encoder's input (default: T5's encoder, BERT's embeddings); rows
// of the backbone's embedding table seed it where the options ask.
class PromptTuningRecipe : public detail::RecipeBase<PromptTuningOptions> {
 public:
  explicit PromptTuningRecipe(PromptTuningOptions options)
      : RecipeBase(std::move(options), Site::Kind::prompt, detail::kEncoderInput) {}
  std::string method() const override { return "prompt_tuning"; }
  nlohmann::json options_json() const override { return prompt_tuning_options_json(options); }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    const auto& table = site.prompt->embedding_table;
    return PromptTuning(PromptTuningOptions(options).d_model(table.size(1)), table).ptr();
  }
};

// Prefix tuning: one table of keys and values for every matched attention site (default:
// those peft's prefix reaches, T5's decoder self-attention, BERT's self-attention), through
// its MLP while training.
class PrefixTuningRecipe : public detail::RecipeBase<PrefixTuningOptions> {
 public:
  explicit PrefixTuningRecipe(PrefixTuningOptions options)
      : RecipeBase(std::move(options), Site::Kind::attention, detail::kPeftPrefixSites) {}
  std::string method() const override { return "prefix_tuning"; }
  nlohmann::json options_json() const override {
    return {{"num_virtual_tokens", options.num_virtual_tokens()}, {"prefix_projection", options.prefix_projection()},
            {"hidden", options.hidden()}};
  }
  void prepare(const std::vector<const Site*>& sites, const std::string& /*backbone*/) override {
    std::vector<std::string> names;
    for (const auto* site : sites) names.push_back(site->name);
    const auto* first = sites.front()->attention;
    prefix_ = PrefixTuning(PrefixTuningOptions(options).d_model(first->hidden_features).inner(first->key_value_features)
                               .sites(names));
  }
  std::shared_ptr<DeltaModule> make(const Site&) override { return prefix_.ptr(); }

 private:
  PrefixTuning prefix_{nullptr};
};

// Spec-based tuning: backbone parameters chosen by name (the last k layers, chosen
// modules, layer norms) trained as they are; no delta modules.
class SpecTuningRecipe : public DeltaRecipe {
 public:
  explicit SpecTuningRecipe(SpecTuningOptions options) : options(std::move(options)) {}
  std::string method() const override { return "spec"; }
  nlohmann::json options_json() const override {
    return {{"last_layers", options.last_layers()}, {"layer_pattern", options.layer_pattern()},
            {"modules", options.modules()}, {"layer_norms", options.layer_norms()},
            {"layer_norm_pattern", options.layer_norm_pattern()}};
  }
  bool accepts(Site::Kind) const override { return false; }
  bool uses_sites() const override { return false; }
  std::shared_ptr<DeltaModule> make(const Site&) override { return nullptr; }
  std::string default_pattern(const std::string&) const override { return "re:.*"; }
  std::vector<std::string> select_backbone_parameters(const std::vector<std::string>& names) const override {
    return select_parameters(names, options);
  }

  SpecTuningOptions options;
};

// What DeltaModel::add(name, options, ...) turns a method's options into.
inline std::shared_ptr<DeltaRecipe> make_recipe(const LoRAOptions& o) { return std::make_shared<LoRARecipe>(o); }
inline std::shared_ptr<DeltaRecipe> make_recipe(const IA3Options& o) { return std::make_shared<IA3Recipe>(o); }
inline std::shared_ptr<DeltaRecipe> make_recipe(const BitFitOptions& o) { return std::make_shared<BitFitRecipe>(o); }
inline std::shared_ptr<DeltaRecipe> make_recipe(const AdapterOptions& o) { return std::make_shared<AdapterRecipe>(o); }
inline std::shared_ptr<DeltaRecipe> make_recipe(const PromptTuningOptions& o) {
  return std::make_shared<PromptTuningRecipe>(o);
}
inline std::shared_ptr<DeltaRecipe> make_recipe(const PrefixTuningOptions& o) {
  return std::make_shared<PrefixTuningRecipe>(o);
}
inline std::shared_ptr<DeltaRecipe> make_recipe(const SpecTuningOptions& o) { return std::make_shared<SpecTuningRecipe>(o); }

}  // namespace deltatune
