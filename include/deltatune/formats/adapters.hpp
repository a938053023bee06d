// adapters' (AdapterHub, adapters 1.3.0) checkpoint layout for bottleneck adapters: Houlsby,
// Pfeiffer, PHM-Adapter, Compacter and Compacter++ attached through DeltaModel, saved so that
// `model.load_adapter(dir, use_safetensors=True)` reads them, and loaded from what
// `model.save_adapter(dir, name, use_safetensors=True)` writes.
//
// A folder holds
//   adapter_config.json  {"config": BnConfig's fields, "hidden_size", "model_type", "name", "version"}
//   adapter.safetensors  "<module>.adapters.<name>.adapter_down.0.weight", ".adapter_up.bias", ...;
//                        PHM: ".adapter_down.0.W" (or W_left, W_right), ".b", ".phm_rule" when each
//                        layer owns its rule, else one "<base>shared_parameters.<name>.phm_rule"
// where <module> is the sublayer's Hugging Face path, which is our site name
// ("encoder.block.0.layer.1", "bert.encoder.layer.0.attention.output"), and <base> the path
// of the base model that holds the shared parameters ("bert." in BertForSequenceClassification,
// "" in T5ForConditionalGeneration, which is its own base model). adapters 1.3.0 itself does
// not save a shared rule under a key without <base> (its filter wants ".shared_parameters."):
// a T5 Compacter saved by adapters lacks its rule, and this loader refuses it as missing.
// adapters loads the rule from our files (tools/adapters_roundtrip.py checks it).
// adapters writes pickle (pytorch_adapter.bin) unless given use_safetensors=True; pickle is
// not read or written here. adapters' format has no place for the backbone layer norms that
// deltatune trains with an adapter (adapters freezes them): save writes them, where they
// are trained, to deltatune_backbone.safetensors beside, which adapters ignores; load reads
// it back where present. Not supported, refused on load with the key and value named:
// parallel adapters, gating, scaling other than 1, adapter-own layer norms, invertible and
// cross-attention adapters, leave_out, dropout, per-layer reduction factors, factorised or
// frozen PHM rules, shared PHM weights, PHM without bias. Init options (init_weights,
// phm_c_init, phm_init_range, hypercomplex_nonlinearity) only decide fresh weights, which a
// load replaces, so they are accepted and not used.
//   auto entry = deltatune::load_adapters(model, "checkpoints/rte_compacter");
//   deltatune::save_adapters(model, "rte", "out/rte_adapters");
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <deltatune/core/atomic_file.hpp>
#include <deltatune/core/delta_model.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/json_file.hpp>
#include <deltatune/core/safetensors.hpp>
#include <deltatune/core/tensor_match.hpp>
#include <deltatune/methods/adapter.hpp>

namespace deltatune {

inline constexpr const char* kAdaptersConfigFile = "adapter_config.json";
inline constexpr const char* kAdaptersWeightsFile = "adapter.safetensors";
inline constexpr const char* kAdaptersBackboneFile = "deltatune_backbone.safetensors";

namespace detail {

using deltatune::detail::check;

// BnConfig fields whose only value deltatune implements, with that value (also BnConfig's default).
inline const nlohmann::json& adapters_fixed_fields() {
  static const nlohmann::json fixed = {
      {"is_parallel", false},        {"original_ln_after", true},      {"residual_before_ln", true},
      {"adapter_residual_before_ln", false}, {"ln_before", false},     {"ln_after", false},
      {"use_gating", false},         {"scaling", 1.0},                 {"cross_adapter", false},
      {"inv_adapter", nullptr},      {"inv_adapter_reduction_factor", nullptr}, {"leave_out", nlohmann::json::array()},
      {"dropout", 0.0},              {"stochastic_depth", 0.0},        {"factorized_phm_rule", false},
      {"shared_W_phm", false},       {"learn_phm", true},              {"phm_bias", true},
      {"init_weights_seed", nullptr}};
  return fixed;
}

inline const char* const kAdaptersActivations[] = {"relu", "gelu", "gelu_new", "swish", "silu", "tanh"};

// "t5" for mT5 too: deltatune's T5 reads both.
inline std::string family_of_model_type(const std::string& model_type) {
  return model_type == "mt5" ? "t5" : model_type;
}

// Our parameter name inside an Adapter -> adapters' name inside its Adapter: the down
// projection is the first entry of adapters' nn.Sequential(down, activation).
inline std::string adapters_parameter_name(const std::string& ours) {
  const std::string down = "adapter_down.";
  return ours.rfind(down, 0) == 0 ? "adapter_down.0." + ours.substr(down.size()) : ours;
}

// The path of the base model in front of every site ("bert." in BertForSequenceClassification):
// where adapters keeps shared parameters.
inline std::string base_model_prefix(const DeltaModel& model) {
  for (const auto& site : model.sites()) {
    const auto at = site.name.find("encoder.");
    if (at != std::string::npos) return site.name.substr(0, at);
  }
  return "";
}

// The output sites adapters puts an adapter at for this placement on this backbone.
inline std::vector<std::string> adapters_sites(const DeltaModel& model, const AdapterRecipe& recipe) {
  const SitePattern pattern(recipe.default_pattern(model.model_type()));
  std::vector<std::string> out;
  for (const auto& site : model.sites())
    if (site.kind == Site::Kind::output && pattern.matches(site.name)) out.push_back(site.name);
  return out;
}

inline const DeltaModel::Entry& entry_of(const DeltaModel& model, const std::string& name) {
  auto it = model.deltas().find(name);
  check<OptionError>(it != model.deltas().end(), "adapters format: the model has no delta named '{}'", name);
  return it->second;
}

inline const AdapterRecipe& adapter_recipe(const DeltaModel::Entry& entry, const std::string& name) {
  const auto* recipe = dynamic_cast<const AdapterRecipe*>(entry.recipe.get());
  check<OptionError>(recipe != nullptr, "adapters format: delta '{}' is a {}; adapters' bottleneck layout holds "
                     "Houlsby, Pfeiffer, PHM and Compacter adapters only", name, entry.recipe->method());
  return *recipe;
}

// The reduction factor adapters needs to give bottleneck m on width d: int(d // rf) == m.
inline nlohmann::json reduction_factor_json(const AdapterOptions& o, int64_t d) {
  if (o.bottleneck() == 0) return o.reduction_factor();
  check<OptionError>(d % o.bottleneck() == 0, "adapters format: bottleneck {} does not divide the width {}; adapters "
                     "sizes adapters by a reduction factor d / m only", o.bottleneck(), d);
  return d / o.bottleneck();
}

}  // namespace detail

// adapters' BnConfig dict for these options on a model of width `hidden_size`, with every
// field adapters writes (values deltatune does not implement at their defaults).
inline nlohmann::json adapters_bn_config(const AdapterOptions& o, int64_t hidden_size) {
  const bool pfeiffer = o.placement() == AdapterPlacement::pfeiffer;
  auto config = detail::adapters_fixed_fields();
  config.update({{"mh_adapter", !pfeiffer},
                 {"output_adapter", true},
                 {"original_ln_before", pfeiffer},
                 {"reduction_factor", detail::reduction_factor_json(o, hidden_size)},
                 {"non_linearity", o.non_linearity()},
                 // Our Linear init is adapters' "houlsby"; adapters 1.3.0 fails to build PHM
                 // layers with it (it reads a .weight they lack), so those say "bert".
                 {"init_weights", o.phm_n() > 0 ? "bert" : "houlsby"},
                 {"phm_layer", o.phm_n() > 0},
                 {"phm_dim", o.phm_n() > 0 ? o.phm_n() : 4},
                 {"factorized_phm_W", o.phm_rank() > 0},
                 {"phm_rank", o.phm_rank() > 0 ? o.phm_rank() : 1},
                 {"shared_phm_rule", o.shared_phm_rule()},
                 {"phm_c_init", "normal"},
                 {"phm_init_range", 1e-4},
                 {"hypercomplex_nonlinearity", "glorot-uniform"}});
  return config;
}

namespace detail {

// adapters' reduction_factor: an integer, or a number whose bottleneck hidden_size / factor
// (rounded down, as adapters) is a size.
inline void read_reduction_factor(const JsonFields& config, int64_t hidden_size, AdapterOptions& o) {
  const auto rf = config.get<nlohmann::json>("reduction_factor");
  config.check(rf.is_number(), "reduction_factor", "expected a number (per-layer mappings are not supported)");
  if (rf.is_number_integer()) {
    const auto factor = config.get<int64_t>("reduction_factor");
    config.check(factor >= 1, "reduction_factor", "must be at least 1");
    o.reduction_factor(factor);
    return;
  }
  const double bottleneck = std::floor(double(hidden_size) / config.get<double>("reduction_factor"));
  // 2^53: the largest size a double holds exactly; the adapter's own memory check bounds it further.
  config.check(bottleneck >= 1 && bottleneck <= 9007199254740992.0, "reduction_factor",
               fmt::format("hidden_size {} / reduction_factor must give a bottleneck between 1 and 2^53", hidden_size));
  o.bottleneck(static_cast<int64_t>(bottleneck));
}

}  // namespace detail

// The AdapterOptions an adapters BnConfig dict describes for a model of width
// `hidden_size`. Refuses, naming the file, the key and its value, a field of the wrong type
// (CheckpointError) and what deltatune does not implement (OptionError).
inline AdapterOptions adapter_options_from_adapters(const JsonFields& config, int64_t hidden_size) {
  using detail::check;
  const auto& where = config.where();
  const auto architecture = config.get<nlohmann::json>("architecture", nullptr);
  check<OptionError>(architecture.is_null(), "{}: architecture {} is not a bottleneck adapter (adapters writes no "
                     "architecture for those); deltatune reads Houlsby, Pfeiffer, PHM and Compacter adapters here",
                     where, architecture.dump());
  for (const auto& [key, value] : detail::adapters_fixed_fields().items())
    if (config.json().contains(key))
      check<OptionError>(config.json().at(key) == value, "{}: {} = {} is not supported (deltatune implements {} = {} "
                         "only)", where, key, config.json().at(key).dump(), key, value.dump());
  const bool mh = config.get<bool>("mh_adapter");
  const bool output = config.get<bool>("output_adapter");
  const bool ln_before = config.get<bool>("original_ln_before", false);
  check<OptionError>(output && (mh != ln_before), "{}: mh_adapter = {}, output_adapter = {}, original_ln_before = {} "
                     "is not a supported placement: Houlsby (true, true, false) or Pfeiffer (false, true, true)",
                     where, mh, output, ln_before);

  AdapterOptions o;
  o.placement(mh ? AdapterPlacement::houlsby : AdapterPlacement::pfeiffer);
  detail::read_reduction_factor(config, hidden_size, o);

  auto activation = config.get<std::string>("non_linearity");
  std::transform(activation.begin(), activation.end(), activation.begin(), [](unsigned char c) { return std::tolower(c); });
  const bool known = std::any_of(std::begin(detail::kAdaptersActivations), std::end(detail::kAdaptersActivations),
                                 [&](const char* a) { return activation == a; });
  check<OptionError>(known, "{}: non_linearity = \"{}\" is not supported (relu, gelu, gelu_new, swish, silu, tanh)",
                     where, activation);
  o.non_linearity(activation);
  if (config.get<std::string>("init_weights", "bert") == "bert") o.init_std(0.02);

  if (config.get<bool>("phm_layer", false)) {
    o.phm_n(config.get<int64_t>("phm_dim", 4));
    o.phm_rank(config.get<bool>("factorized_phm_W", true) ? config.get<int64_t>("phm_rank", 1) : 0);
    o.shared_phm_rule(config.get<bool>("shared_phm_rule", true));
  }
  return o;
}

// Every tensor of delta `name` under adapters' key: the live parameters, so that their
// gradients can be read too.
inline std::map<std::string, torch::Tensor> adapters_state_dict(const DeltaModel& model, const std::string& name) {
  const auto& entry = detail::entry_of(model, name);
  detail::adapter_recipe(entry, name);
  std::map<std::string, torch::Tensor> out;
  for (const auto& a : entry.attachments)
    for (const auto& p : a.delta->module().named_parameters())
      out[fmt::format("{}.adapters.{}.{}", a.site.name, name, detail::adapters_parameter_name(p.key()))] = p.value();
  for (const auto& [module_name, module] : entry.recipe->shared_modules())
    for (const auto& p : module->named_parameters())
      out[fmt::format("{}shared_parameters.{}.{}", detail::base_model_prefix(model), name, p.key())] = p.value();
  return out;
}

// Writes delta `name` (an adapter added through DeltaModel at adapters' places) to `dir` in
// adapters' layout; each file atomically. Deltas at other places are refused: adapters
// names no sites, only a placement.
inline void save_adapters(DeltaModel& model, const std::string& name, const std::string& dir) {
  const auto& entry = detail::entry_of(model, name);
  const auto& recipe = detail::adapter_recipe(entry, name);
  std::vector<std::string> sites;
  for (const auto& a : entry.attachments) sites.push_back(a.site.name);
  const auto expected = detail::adapters_sites(model, recipe);
  detail::check<OptionError>(sites == expected, "adapters format: delta '{}' sits at [{}], but adapters puts a {} "
                             "adapter at [{}] and cannot record other places", name, fmt::join(sites, ", "),
                             deltatune::detail::to_string(recipe.options.placement()), fmt::join(expected, ", "));
  const int64_t hidden = entry.attachments.front().site.output->output_features;
  const nlohmann::json config = {{"config", adapters_bn_config(recipe.options, hidden)},
                                 {"hidden_size", hidden},
                                 {"model_type", model.model_type()},
                                 {"model_name", ""},
                                 {"name", name},
                                 {"version", "deltatune"}};
  std::filesystem::create_directories(dir);
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [key, t] : adapters_state_dict(model, name)) tensors[key] = t.detach();
  write_safetensors(dir + "/" + kAdaptersWeightsFile, tensors, {{"format", "pt"}});
  if (!entry.backbone_parameters.empty()) {
    std::map<std::string, torch::Tensor> backbone;
    const auto params = model.backbone().named_parameters();
    for (const auto& key : entry.backbone_parameters) backbone[key] = params[key].detach();
    write_safetensors(dir + "/" + kAdaptersBackboneFile, backbone, {{"format", "pt"}});
  }
  deltatune::detail::write_text_atomically(dir + "/" + kAdaptersConfigFile, config.dump(2) + "\n",
                                           "save_adapters");
}

namespace detail {

inline std::map<std::string, torch::Tensor> backbone_targets(DeltaModel& model, const DeltaModel::Entry& entry) {
  std::map<std::string, torch::Tensor> out;
  const auto params = model.backbone().named_parameters();
  for (const auto& key : entry.backbone_parameters) out[key] = params[key];
  return out;
}

}  // namespace detail

// Reads an adapter folder in adapters' layout, adds it to `model` as delta `name` (default:
// the name in its config) at adapters' places, with the options its config gives, and
// copies its weights in. All or nothing: on any error (options deltatune does not
// implement, another model type or width, a missing, misshapen or unexpected tensor) the
// delta is removed again and the error names the file, the key or the tensor.
inline const DeltaModel::Entry& load_adapters(DeltaModel& model, const std::string& dir, std::string name = "") {
  using deltatune::detail::check;
  const auto config_path = dir + "/" + kAdaptersConfigFile;
  const auto weights_path = dir + "/" + kAdaptersWeightsFile;
  const JsonFields file(read_json_file(config_path), config_path);
  check<CheckpointError>(std::filesystem::exists(weights_path), "{}: no such file{}; adapters writes it with "
                         "model.save_adapter(dir, name, use_safetensors=True)", weights_path,
                         std::filesystem::exists(dir + "/pytorch_adapter.bin") ? " (pytorch_adapter.bin, pickle, is "
                         "there but is not read)" : "");
  const auto saved_type = file.get<std::string>("model_type", model.model_type());
  check<CheckpointError>(detail::family_of_model_type(saved_type) == model.model_type(), "{}: model_type is \"{}\", "
                         "but this model is \"{}\"", config_path, saved_type, model.model_type());
  const auto hidden = file.get<int64_t>("hidden_size");
  const auto options = adapter_options_from_adapters(file.object("config"), hidden);
  if (name.empty()) name = file.get<std::string>("name");
  const auto tensors = read_safetensors(weights_path).tensors;
  const auto backbone_path = dir + "/" + kAdaptersBackboneFile;
  const bool has_backbone = std::filesystem::exists(backbone_path);
  const auto backbone = has_backbone ? read_safetensors(backbone_path).tensors : std::map<std::string, torch::Tensor>{};

  const auto& entry = model.add(name, options);
  std::string problems;
  for (const auto& a : entry.attachments)
    if (a.site.output->output_features != hidden)
      problems += fmt::format("\n  site {} is {} wide, the config's hidden_size is {}", a.site.name,
                              a.site.output->output_features, hidden);
  const detail::TensorMatch weights(detail::slots_named_as_in_file(adapters_state_dict(model, name)), tensors);
  const detail::TensorMatch trained_backbone(detail::slots_named_as_in_file(has_backbone ? detail::backbone_targets(model, entry)
                                                                         : std::map<std::string, torch::Tensor>{}),
                                     backbone);
  if (!weights.fits()) problems += fmt::format("\n  in {}:{}", kAdaptersWeightsFile, weights.problems());
  if (!trained_backbone.fits()) problems += fmt::format("\n  in {}:{}", kAdaptersBackboneFile, trained_backbone.problems());
  if (!problems.empty()) {
    model.remove(name);
    throw CheckpointError(fmt::format("{} does not fit the model's {} adapter:{}", dir, adapter_method(options), problems));
  }
  weights.copy();
  trained_backbone.copy();
  return entry;
}

}  // namespace deltatune
