// Spec-based tuning: unfreeze a chosen part of the backbone itself, by parameter name only.
//
// Three selectors, united: the last k layers of each stack (a layer is what the layer
// pattern's group 1 numbers: "encoder.block.11.", "encoder.layer.5."), parameters whose
// name matches one of the globs ("*.SelfAttention.q.weight", "*.layer_norm.*"), and the
// layer norms. No parameters of its own, so not a DeltaModule: the injector reads the
// selection and sets requires_grad; it knows nothing of T5 or BERT beyond the patterns.
#pragma once

#include <torch/torch.h>

#include <fnmatch.h>

#include <map>
#include <charconv>
#include <regex>
#include <string>
#include <vector>

#include <deltatune/core/error.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/recipe.hpp>

namespace deltatune {

struct SpecTuningOptions {
  TORCH_ARG(int64_t, last_layers) = 0;                // k: the last k layers of every stack
  TORCH_ARG(std::string, layer_pattern) = R"(^(.*?\b(?:block|layer))\.(\d+)\.)";  // stack name, layer index
  TORCH_ARG(std::vector<std::string>, modules) = {};  // globs (fnmatch) over full parameter names
  TORCH_ARG(bool, layer_norms) = false;               // every layer norm (layer_norm, LayerNorm)
  TORCH_ARG(std::string, layer_norm_pattern) = R"((^|\.)(final_)?(layer_norm|LayerNorm)\.)";
};

namespace detail {

// An option's pattern as a regex; a pattern that is none (from a file or a user) is an OptionError naming it.
inline std::regex spec_regex(const std::string& pattern, const char* option) {
  try {
    return std::regex(pattern);
  } catch (const std::regex_error& e) {
    throw OptionError(fmt::format("SpecTuning: option {} '{}' is not a regular expression ({})", option, pattern,
                                  e.what()));
  }
}

// The layer index layer_pattern's second group caught in `name`.
inline int64_t spec_layer_index(const std::smatch& m, const std::string& name) {
  const std::string digits = m[2];
  int64_t index = 0;
  const auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), index);
  check<OptionError>(!digits.empty() && error == std::errc() && end == digits.data() + digits.size(),
                     "SpecTuning: option layer_pattern's second group caught '{}' in '{}', not a layer index", digits,
                     name);
  return index;
}

// Per stack (the text before the layer index), the largest layer index among the names.
inline std::map<std::string, int64_t> last_layer_index(const std::vector<std::string>& names, const std::regex& layer) {
  std::map<std::string, int64_t> last;
  std::smatch m;
  for (const auto& name : names)
    if (std::regex_search(name, m, layer)) {
      const auto index = spec_layer_index(m, name);
      const auto it = last.find(m[1]);
      last[m[1]] = it == last.end() ? index : std::max(it->second, index);
    }
  return last;
}

inline bool matches_any_glob(const std::string& name, const std::vector<std::string>& globs) {
  for (const auto& glob : globs)
    if (fnmatch(glob.c_str(), name.c_str(), 0) == 0) return true;
  return false;
}

}  // namespace detail

// The names among `names` that the options select, in their order.
inline std::vector<std::string> select_parameters(const std::vector<std::string>& names, const SpecTuningOptions& o) {
  detail::check<OptionError>(o.last_layers() >= 0, "SpecTuning: option last_layers must not be negative, got {}",
                             o.last_layers());
  const auto layer = detail::spec_regex(o.layer_pattern(), "layer_pattern");
  const auto layer_norm = detail::spec_regex(o.layer_norm_pattern(), "layer_norm_pattern");
  detail::check<OptionError>(layer.mark_count() >= 2,
                             "SpecTuning: option layer_pattern '{}' needs two groups: the stack and the layer index",
                             o.layer_pattern());
  const auto last = detail::last_layer_index(names, layer);
  std::vector<std::string> selected;
  std::smatch m;
  for (const auto& name : names) {
    const bool in_last = o.last_layers() > 0 && std::regex_search(name, m, layer) &&
                         detail::spec_layer_index(m, name) > last.at(m[1]) - o.last_layers();
    if (in_last || detail::matches_any_glob(name, o.modules()) ||
        (o.layer_norms() && std::regex_search(name, layer_norm)))
      selected.push_back(name);
  }
  return selected;
}

// The same over a module tree's named parameters.
inline std::vector<std::string> select_parameters(const torch::nn::Module& root, const SpecTuningOptions& o) {
  std::vector<std::string> names;
  for (const auto& item : root.named_parameters()) names.push_back(item.key());
  return select_parameters(names, o);
}

inline nlohmann::json spec_tuning_options_json(const SpecTuningOptions& o) {
  return {{"last_layers", o.last_layers()}, {"layer_pattern", o.layer_pattern()}, {"modules", o.modules()},
          {"layer_norms", o.layer_norms()}, {"layer_norm_pattern", o.layer_norm_pattern()}};
}

inline SpecTuningOptions spec_tuning_options_from_json(const JsonFields& j) {
  return SpecTuningOptions()
      .last_layers(j.get<int64_t>("last_layers"))
      .layer_pattern(j.get<std::string>("layer_pattern"))
      .modules(j.get<std::vector<std::string>>("modules"))
      .layer_norms(j.get<bool>("layer_norms"))
      .layer_norm_pattern(j.get<std::string>("layer_norm_pattern"));
}

// Spec-based tuning: backbone parameters chosen by name (the last k layers, chosen
// modules, layer norms) trained as they are; no delta modules.
class SpecTuningRecipe : public DeltaRecipe {
 public:
  explicit SpecTuningRecipe(SpecTuningOptions options) : options(std::move(options)) {}
  std::string method() const override { return "spec"; }
  nlohmann::json options_json() const override { return spec_tuning_options_json(options); }
  bool accepts(Site::Kind) const override { return false; }
  bool uses_sites() const override { return false; }
  std::shared_ptr<DeltaModule> make(const Site&) override { return nullptr; }
  std::string default_pattern(const std::string&) const override { return "re:.*"; }
  std::vector<std::string> select_backbone_parameters(const std::vector<std::string>& names) const override {
    return select_parameters(names, options);
  }

  SpecTuningOptions options;
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const SpecTuningOptions& o) { return std::make_shared<SpecTuningRecipe>(o); }

// The method table's row; its preset "full" trains every backbone weight (T5's fine-tuning
// 1e-4 in AdamW form, 3e-4; BERT's fine-tuning range top, 5e-5).
inline MethodInfo spec_tuning_method_info() {
  return {{"spec"},
          [](const JsonFields& j) { return make_recipe(spec_tuning_options_from_json(j)); },
          {{"full", "every backbone weight trained", {{"t5", 3e-4}, {"bert", 5e-5}},
            [](const PresetSizes&) { return make_recipe(SpecTuningOptions().modules({"*"})); }}}};
}

}  // namespace deltatune
