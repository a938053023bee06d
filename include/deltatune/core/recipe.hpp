// DeltaRecipe: what DeltaModel::add takes. A method with its options, which makes the delta
// for each matched site, knows its default sites per backbone and writes its options as
// JSON (the method table reads them back, methods/method_table.hpp). Each method's recipe
// lives in its own header (methods/<name>.hpp); the core knows none of them.
#pragma once

#include <torch/torch.h>

#include <map>
#include <memory>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/site.hpp>

namespace deltatune {

// A method's default site pattern per backbone, keyed by the backbone's Hugging Face
// model_type ("t5", "bert"), as peft's TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING.
using DefaultSites = std::map<std::string, std::string>;

// Makes the deltas of one method. It may return the same delta for several sites (a prefix
// serves every attention layer) and hold modules shared by all its deltas (Compacter's A_i).
class DeltaRecipe {
 public:
  virtual ~DeltaRecipe() = default;
  // The name saved in delta_config.json, by which the method table finds the method again.
  virtual std::string method() const = 0;
  // The options that rebuild this recipe (MethodInfo::recipe_from_json reads them back).
  virtual nlohmann::json options_json() const = 0;
  // The site kinds its deltas act on: linear for weight deltas, output for adapters, ...
  virtual bool accepts(Site::Kind kind) const = 0;
  // Called once with every matched site and the backbone's model_type ("t5", "bert" or ""),
  // before make(): a prefix sizes its table by the sites, IA3 takes peft's feed-forward
  // modules for the backbone.
  virtual void prepare(const std::vector<const Site*>& /*sites*/, const std::string& /*model_type*/) {}
  virtual std::shared_ptr<DeltaModule> make(const Site& site) = 0;
  // Modules trained once for the whole delta, by name ("phm_rule" for Compacter's A).
  virtual std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> shared_modules() { return {}; }
  // The sites the method targets when add() is given no pattern, for a backbone's
  // model_type, as peft's default target modules; empty where it has none.
  virtual std::string default_pattern(const std::string& /*model_type*/) const { return ""; }
  // The backbone parameters, among `names`, that the method trains by definition
  // (Compacter: the layer norms; BitFit on BERT: the LayerNorm biases; spec-based tuning: all it trains).
  virtual std::vector<std::string> select_backbone_parameters(const std::vector<std::string>& /*names*/) const {
    return {};
  }
  // False for methods that only unfreeze backbone parameters (spec-based tuning): add() then matches no sites.
  virtual bool uses_sites() const { return true; }
};

// The parts most recipes share: options, the one site kind they act on, their default
// sites; a method's recipe adds method(), options_json() and make().
template <class Options>
class RecipeBase : public DeltaRecipe {
 public:
  RecipeBase(Options options, Site::Kind kind, DefaultSites defaults)
      : options(std::move(options)), kind_(kind), defaults_(std::move(defaults)) {}
  bool accepts(Site::Kind kind) const override { return kind == kind_; }
  std::string default_pattern(const std::string& model_type) const override {
    const auto it = defaults_.find(model_type);
    return it == defaults_.end() ? "" : it->second;
  }

  Options options;

 private:
  Site::Kind kind_;
  DefaultSites defaults_;
};

namespace detail {

// The names matching `regex` anywhere, in their order (for select_backbone_parameters).
inline std::vector<std::string> names_matching(const std::vector<std::string>& names, const char* regex) {
  const std::regex re(regex);
  std::vector<std::string> out;
  for (const auto& n : names)
    if (std::regex_search(n, re)) out.push_back(n);
  return out;
}

}  // namespace detail

}  // namespace deltatune
