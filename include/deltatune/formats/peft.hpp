// Hugging Face peft adapters: a delta written in peft 0.18.1's layout, so that Python's
// PeftModel.from_pretrained runs it with equal outputs, and a peft adapter folder read as a delta.
//
// A peft folder holds adapter_config.json (peft_type and the method's options, every key
// peft 0.18.1 writes) and adapter_model.safetensors, keyed by the Hugging Face module path
// under "base_model.model." without the adapter name:
//   LoRA    <module>.lora_A.weight (r, in), <module>.lora_B.weight (out, r); rsLoRA by use_rslora;
//           DoRA (use_dora) adds <module>.lora_magnitude_vector (out); init_lora_weights
//           "pissa" / "olora" keeps A and B as trained, and whoever loads redoes the decomposition
//           (or convert_to_lora writes a plain LoRA of rank 2r)
//   VeRA    <module>.vera_lambda_b (out), <module>.vera_lambda_d (r), and the shared
//           base_model.vera_A (r, largest in), base_model.vera_B (largest out, r) unless
//           save_projection is false (then drawn again from projection_prng_key, as peft does)
//   LoKr    <module>.lokr_w1 (a, b) or lokr_w1_a (a, r) and lokr_w1_b (r, b), and the same for W2
//   IA3     <module>.ia3_l: (out, 1) scaling the output, (1, in) for feedforward_modules
//   prompt  prompt_embeddings (P * num_transformer_submodules, d); T5's encoder reads rows [0, P)
//   prefix  prompt_embeddings (P, L * 2 * token_dim): the keys and values, after the MLP
// What is supported: LoRA, VeRA, LoKr and IA3 on T5 and BERT (Linear sites only, as peft); prompt and
// prefix tuning on T5 (task SEQ_2_SEQ_LM). What peft 0.18.1 does with a T5 prefix, and so
// what can be exchanged: it reaches only the decoder's self-attention (the cross-attention
// cache it builds is discarded), and decoder layer i reads key/value pair 2i mod L of its
// table, L = num_layers, which peft takes from the T5 config's num_layers: the encoder's
// layer count, whatever the decoder's (a T5 with fewer encoder than decoder layers fails in
// peft's own forward). A prefix here must therefore sit on exactly the decoder's
// self-attention sites, and decoder layers that read one pair (i and i + L/2 for an even L)
// must hold equal prefixes; anything else is refused, naming the sites. Our encoder
// prefixes have no peft form.
// BitFit has none either: peft 0.18.1 has no bias-only method (no "BEFT"), and its
// bias="all" trains existing biases beside LoRA weights, while T5 has no biases at all:
// save_peft refuses BitFit, adapters and Compacter, pointing to DeltaModel::save.
// peft options that change outputs and have no counterpart here (inits that need data or
// randomness: pissa_niter_K, corda, eva, loftq; rank_pattern, modules_to_save, bias, layers_to_transform, ...) are refused by key and value;
// dropout is read but acts only in training. Adapter weights of any float dtype are read
// (widened as the backbone loaders widen F16 / BF16); every other mismatch (missing or
// unexpected key, shape, dtype) is listed in one error naming the file, and nothing is added then.
//   deltatune::save_peft(model, "sst2", "out/sst2-peft", PeftSaveOptions().base_model_name_or_path("t5-small"));
//   auto& entry = deltatune::load_peft(model, "hub/some-t5-lora");   // added as delta "default"
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <deltatune/backbones/bert.hpp>
#include <deltatune/backbones/t5.hpp>
#include <deltatune/core/atomic_file.hpp>
#include <deltatune/core/delta_model.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/json_file.hpp>
#include <deltatune/core/safetensors.hpp>
#include <deltatune/core/tensor_match.hpp>
#include <deltatune/methods/ia3.hpp>
#include <deltatune/methods/lokr.hpp>
#include <deltatune/methods/lora.hpp>
#include <deltatune/methods/prefix.hpp>
#include <deltatune/methods/prompt.hpp>
#include <deltatune/methods/vera.hpp>

namespace deltatune {

struct PeftSaveOptions {
  TORCH_ARG(std::string, base_model_name_or_path) = "";  // where a peft user finds the base model (hub id or folder)
  // PiSSA / OLoRA: write a plain LoRA of rank 2r, A' = [A; A0], B' = [B, -B0] (peft's
  // save_pretrained with path_initial_model_for_weight_conversion), which needs no
  // decomposition at load and also loads where PiSSA is unknown. Otherwise written as peft
  // saves by default: init_lora_weights "pissa" / "olora", and peft redoes the decomposition.
  TORCH_ARG(bool, convert_to_lora) = false;
  // VeRA: write the shared A and B (peft's save_projection); false writes only their seed,
  // from which peft and deltatune draw them again.
  TORCH_ARG(bool, save_projection) = true;
};

namespace detail {

inline const char* const kPeftConfigFile = "adapter_config.json";
inline const char* const kPeftWeightsFile = "adapter_model.safetensors";
inline const char* const kPeftKeyPrefix = "base_model.model.";
inline const char* const kPeftVersion = "0.18.1";  // the layout written and read here

// Layer `layer` reads pair (key block 2p, value block 2p + 1) p of peft's table: with
// num_transformer_submodules M = 2 (T5) peft doubles the (P, 2L, ...) blocks to 4L and hands
// each layer four consecutive ones, so p = 2 layer mod L; with M = 1 (BERT) p = layer.
inline int64_t peft_prefix_pair(int64_t layer, int64_t num_layers, int64_t submodules) {
  return (submodules * layer) % num_layers;
}

// peft's (P, L * 2 * inner) table -> ours (P, S * 2 * inner), S layers, site i = layer i.
inline torch::Tensor prefix_table_from_peft(const torch::Tensor& peft, int64_t num_layers, int64_t submodules,
                                            int64_t sites) {
  const int64_t P = peft.size(0);
  auto pairs = peft.reshape({P, num_layers, 2, -1});  // (P, L, 2, inner)
  std::vector<int64_t> index;
  for (int64_t i = 0; i < sites; ++i) index.push_back(peft_prefix_pair(i, num_layers, submodules));
  return pairs.index_select(1, torch::tensor(index, torch::kLong)).reshape({P, -1});  // (P, S * 2 * inner)
}

// Ours (P, S * 2 * inner) -> peft's (P, L * 2 * inner), L >= S; pairs no layer reads stay
// zero. Two layers that peft gives one pair must hold equal prefixes.
inline torch::Tensor prefix_table_to_peft(const torch::Tensor& ours, const std::vector<std::string>& sites,
                                          int64_t num_layers) {
  const int64_t P = ours.size(0), S = int64_t(sites.size());
  auto from = ours.reshape({P, S, 2, -1});                            // (P, S, 2, inner)
  auto out = torch::zeros({P, num_layers, 2, from.size(3)}, ours.options());  // (P, L, 2, inner)
  std::map<int64_t, int64_t> writer;                                  // pair -> the layer that wrote it
  for (int64_t i = 0; i < S; ++i) {
    const auto pair = peft_prefix_pair(i, num_layers, 2);  // T5
    const auto [it, fresh] = writer.emplace(pair, i);
    check<OptionError>(fresh || torch::equal(from.select(1, i), from.select(1, it->second)),
                       "save_peft: peft 0.18.1 gives the T5 decoder layers {} and {} one prefix (key/value pair {} of "
                       "{}, one per encoder layer), but sites {} and {} hold different ones; give them equal prefixes, "
                       "or save with DeltaModel::save", it->second, i, pair, num_layers, sites[it->second], sites[i]);
    out.select(1, pair).copy_(from.select(1, i));
  }
  return out.reshape({P, -1});
}

inline bool is_linear_site(const Site& site) {
  return site.kind == Site::Kind::linear && dynamic_cast<FrozenLinearImpl*>(site.module.get()) != nullptr;
}

inline std::string last_component(const std::string& name) { return name.substr(name.rfind('.') + 1); }

// target_modules for these sites: their last name components ("q", "v") where those name
// exactly these among the Linear sites, as peft's defaults do; otherwise the full names.
inline std::vector<std::string> peft_target_modules(const std::vector<std::string>& chosen, const DeltaModel& model) {
  std::set<std::string> short_names, wanted(chosen.begin(), chosen.end()), matched;
  for (const auto& name : chosen) short_names.insert(last_component(name));
  for (const auto& site : model.sites())
    if (is_linear_site(site) && short_names.count(last_component(site.name))) matched.insert(site.name);
  if (matched == wanted) return {short_names.begin(), short_names.end()};
  return {wanted.begin(), wanted.end()};
}

// peft's target_modules (or feedforward_modules) as a site pattern: a list names modules by
// their path or its last components (our globs without wildcards), a string is a full-match regex.
inline std::string site_pattern_from_peft(const nlohmann::json& value, const std::string& key, const std::string& where) {
  if (value.is_string()) {
    const std::string text = value;
    check<OptionError>(text != "all-linear", "{}: {} = \"all-linear\" is not supported; list the module names",
                       where, key);
    return "re:" + text;
  }
  check<OptionError>(value.is_array() && !value.empty(), "{}: {} must be a list of module names or a regex, got {}",
                     where, key, value.dump());
  std::vector<std::string> names;
  for (const auto& item : value) {
    check<OptionError>(item.is_string() && item.get<std::string>().find_first_of("*?|") == std::string::npos &&
                           !item.get<std::string>().empty(),
                       "{}: {} holds {}, not a module name", where, key, item.dump());
    names.push_back(item);
  }
  return fmt::format("{}", fmt::join(names, "|"));
}

// peft options that leave outputs as ours compute them: anything else holding a value other
// than its neutral one (null, false, empty) is refused, so that no adapter runs differently here.
inline void check_peft_options(const nlohmann::json& config, const std::set<std::string>& understood,
                               const std::string& where) {
  static const std::set<std::string> ignored = {
      "peft_type", "peft_version", "task_type", "base_model_name_or_path", "revision", "inference_mode",
      "auto_mapping", "megatron_core", "qalora_group_size",  // used only with the features that need them
      "lora_dropout", "vera_dropout", "init_ia3_weights", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
      "tokenizer_kwargs",  // initialisation and training only: the file's values replace them
      "fan_in_fan_out"};   // peft resets it to false on torch Linear layers, which all sites here are
  std::vector<std::string> problems;
  for (const auto& [key, value] : config.items()) {
    if (understood.count(key) || ignored.count(key)) continue;
    const bool neutral = value.is_null() || value == false || (value.is_string() && (value == "" || value == "none")) ||
                         ((value.is_object() || value.is_array()) && value.empty());
    if (!neutral) problems.push_back(fmt::format("{} = {}", key, value.dump()));
  }
  // pissa and olora are redone here from the weights; the others (pissa_niter_K's randomised
  // SVD, corda, eva, loftq) need data or randomness that cannot be repeated.
  const auto init = config.value("init_lora_weights", nlohmann::json(true));
  if (!(init.is_boolean() || init == "gaussian" || init == "pissa" || init == "olora"))
    problems.push_back(fmt::format("init_lora_weights = {}", init.dump()));
  check<OptionError>(problems.empty(), "{}: peft options deltatune does not support (they would change the outputs): {}",
                     where, fmt::join(problems, ", "));
}

// What T5 prompt and prefix tuning need from the backbone.
inline backbones::T5ModelImpl& peft_t5(DeltaModel& model, const std::string& method, const std::string& where) {
  auto* t5 = dynamic_cast<backbones::T5ModelImpl*>(&model.backbone());
  check<OptionError>(t5 != nullptr, "{}: {} in peft's layout is supported on T5 (T5Model) only", where, method);
  return *t5;
}

// The keys peft 0.18.1 writes for each type, with its defaults, our values filled in by the
// caller. T5 adapters are SEQ_2_SEQ_LM ones; a bare BertModel has no task, and peft then
// records the class, which AutoPeftModel loads the base with.
inline nlohmann::json peft_config_base(DeltaModel& model, const std::string& peft_type, const PeftSaveOptions& options) {
  const bool t5 = dynamic_cast<backbones::T5ModelImpl*>(&model.backbone()) != nullptr;
  const bool bert = dynamic_cast<backbones::BertModelImpl*>(&model.backbone()) != nullptr;
  const auto auto_mapping = bert ? nlohmann::json{{"base_model_class", "BertModel"},
                                                  {"parent_library", "transformers.models.bert.modeling_bert"}}
                                 : nlohmann::json(nullptr);
  return {{"auto_mapping", auto_mapping}, {"base_model_name_or_path", options.base_model_name_or_path()},
          {"inference_mode", true}, {"modules_to_save", nullptr}, {"peft_type", peft_type},
          {"peft_version", kPeftVersion}, {"revision", nullptr},
          {"task_type", t5 ? nlohmann::json("SEQ_2_SEQ_LM") : nlohmann::json(nullptr)}};
}

inline nlohmann::json number(double x) {  // 16, not 16.0, where peft users wrote an integer
  return x == double(int64_t(x)) ? nlohmann::json(int64_t(x)) : nlohmann::json(x);
}

// The delta's attachments as the one module type `Impl`, or an error naming the method.
template <class Impl>
std::vector<std::pair<std::string, Impl*>> peft_deltas(const DeltaModel::Entry& entry, const std::string& name) {
  std::vector<std::pair<std::string, Impl*>> out;
  for (const auto& a : entry.attachments) {
    auto* impl = dynamic_cast<Impl*>(a.delta.get());
    check<OptionError>(impl != nullptr, "save_peft: delta '{}' ({}) holds a {} at {}", name, entry.recipe->method(),
                       a.delta->method(), a.site.name);
    out.emplace_back(a.site.name, impl);
  }
  return out;
}

inline void check_linear_sites(const DeltaModel::Entry& entry, const std::string& method, const std::string& who) {
  for (const auto& a : entry.attachments)
    check<OptionError>(is_linear_site(a.site), "{}: peft's {} acts on Linear layers only, not on {} ({})", who, method,
                       a.site.name, to_string(a.site.kind));
}

// The tensors and config of one delta in peft's layout.
struct PeftAdapter {
  std::map<std::string, torch::Tensor> tensors;
  nlohmann::json config;
};

inline PeftAdapter peft_lora(DeltaModel& model, const DeltaModel::Entry& entry, const std::string& name,
                             const PeftSaveOptions& options) {
  check_linear_sites(entry, "LoRA", "save_peft");
  PeftAdapter out;
  std::vector<std::string> sites;
  const auto deltas = peft_deltas<LoRAImpl>(entry, name);
  const auto& o = deltas.front().second->options;
  // B A - B0 A0 = [B, -B0] [A; A0]: rank 2r at the same scaling (alpha doubled, or times sqrt 2 with rsLoRA).
  const bool convert = options.convert_to_lora() && o.init() != "lora";
  for (const auto& [site, lora] : deltas) {
    out.tensors[kPeftKeyPrefix + site + ".lora_A.weight"] =
        convert ? torch::cat({lora->lora_A, lora->lora_A_init}, 0) : lora->lora_A;
    out.tensors[kPeftKeyPrefix + site + ".lora_B.weight"] =
        convert ? torch::cat({lora->lora_B, -lora->lora_B_init}, 1) : lora->lora_B;
    if (lora->options.use_dora()) out.tensors[kPeftKeyPrefix + site + ".lora_magnitude_vector"] = lora->lora_magnitude_vector;
    sites.push_back(site);
  }
  const auto alpha = convert ? o.alpha() * (o.use_rslora() ? std::sqrt(2.0) : 2.0) : o.alpha();
  const auto init = convert || o.init() == "lora" ? nlohmann::json(true) : nlohmann::json(o.init());
  out.config = peft_config_base(model, "LORA", options);
  out.config.update({{"alora_invocation_tokens", nullptr}, {"alpha_pattern", nlohmann::json::object()},
                     {"arrow_config", nullptr}, {"bias", "none"}, {"corda_config", nullptr},
                     {"ensure_weight_tying", false}, {"eva_config", nullptr}, {"exclude_modules", nullptr},
                     {"fan_in_fan_out", false}, {"init_lora_weights", init}, {"layer_replication", nullptr},
                     {"layers_pattern", nullptr}, {"layers_to_transform", nullptr},
                     {"loftq_config", nlohmann::json::object()}, {"lora_alpha", number(alpha)},
                     {"lora_bias", false}, {"lora_dropout", o.dropout()}, {"megatron_config", nullptr},
                     {"megatron_core", "megatron.core"}, {"qalora_group_size", 16}, {"r", convert ? 2 * o.r() : o.r()},
                     {"rank_pattern", nlohmann::json::object()}, {"target_modules", peft_target_modules(sites, model)},
                     {"target_parameters", nullptr}, {"trainable_token_indices", nullptr}, {"use_dora", o.use_dora()},
                     {"use_qalora", false}, {"use_rslora", o.use_rslora()}});
  return out;
}

inline PeftAdapter peft_ia3(DeltaModel& model, const DeltaModel::Entry& entry, const std::string& name,
                            const PeftSaveOptions& options) {
  check_linear_sites(entry, "IA3", "save_peft");
  PeftAdapter out;
  std::vector<std::string> sites, feedforward;
  for (const auto& [site, ia3] : peft_deltas<IA3Impl>(entry, name)) {
    const bool ff = ia3->options.feedforward();
    out.tensors[kPeftKeyPrefix + site + ".ia3_l"] = ff ? ia3->ia3_l.unsqueeze(0) : ia3->ia3_l.unsqueeze(1);
    sites.push_back(site);
    if (ff) feedforward.push_back(site);
  }
  out.config = peft_config_base(model, "IA3", options);
  out.config.update({{"exclude_modules", nullptr}, {"fan_in_fan_out", false},
                     {"feedforward_modules", feedforward.empty() ? std::vector<std::string>{}
                                                                 : peft_target_modules(feedforward, model)},
                     {"init_ia3_weights", true}, {"target_modules", peft_target_modules(sites, model)}});
  return out;
}

inline nlohmann::json peft_prompt_learning_config(DeltaModel& model, const std::string& peft_type,
                                                  const backbones::T5Config& c, int64_t P, int64_t token_dim,
                                                  const PeftSaveOptions& options) {
  auto config = peft_config_base(model, peft_type, options);
  config.update({{"num_attention_heads", c.num_heads()}, {"num_layers", c.num_layers()},  // peft's: the encoder's
                 {"num_transformer_submodules", 2}, {"num_virtual_tokens", P}, {"token_dim", token_dim}});
  return config;
}

inline PeftAdapter peft_prompt(DeltaModel& model, const DeltaModel::Entry& entry, const std::string& name,
                               const PeftSaveOptions& options) {
  auto& t5 = peft_t5(model, "prompt tuning", "save_peft");
  const auto deltas = peft_deltas<PromptTuningImpl>(entry, name);
  check<OptionError>(deltas.size() == 1 && deltas.front().first == "encoder",
                     "save_peft: peft's T5 prompt tuning prepends to the encoder only; delta '{}' is at {}", name,
                     deltas.front().first);
  const auto& embedding = deltas.front().second->embedding;  // (P, d)
  const int64_t P = embedding.size(0);
  PeftAdapter out;
  // peft sizes a SEQ_2_SEQ_LM prompt for encoder and decoder (2P rows); its prompt tuning
  // reads only the first P, so the rest is written as zeros.
  out.tensors["prompt_embeddings"] = torch::cat({embedding, torch::zeros_like(embedding)});  // (2P, d)
  out.config = peft_prompt_learning_config(model, "PROMPT_TUNING", t5.config, P, embedding.size(1), options);
  out.config.update({{"prompt_tuning_init", "RANDOM"}, {"prompt_tuning_init_text", nullptr},
                     {"tokenizer_kwargs", nullptr}, {"tokenizer_name_or_path", nullptr}});
  return out;
}

// The T5 sites peft's prefix tuning reaches: the prefix recipe's default sites there.
inline std::string t5_prefix_pattern() { return PrefixTuningRecipe(PrefixTuningOptions(1)).default_pattern("t5"); }

inline PeftAdapter peft_prefix(DeltaModel& model, const DeltaModel::Entry& entry, const std::string& name,
                               const PeftSaveOptions& options) {
  auto& t5 = peft_t5(model, "prefix tuning", "save_peft");
  auto* prefix = peft_deltas<PrefixTuningImpl>(entry, name).front().second;
  std::vector<std::string> expected;
  const SitePattern decoder_self(t5_prefix_pattern());
  for (const auto& site : model.sites())
    if (site.kind == Site::Kind::attention && decoder_self.matches(site.name)) expected.push_back(site.name);
  check<OptionError>(prefix->options.sites() == expected,
                     "save_peft: peft's T5 prefix tuning reaches exactly the decoder's self-attention ({}); delta '{}' "
                     "is at {}; add it with no pattern (peft's sites) or the pattern \"{}\"", fmt::join(expected, ", "), name,
                     fmt::join(prefix->options.sites(), ", "), t5_prefix_pattern());
  const int64_t L = t5.config.num_layers(), inner = prefix->inner();
  check<OptionError>(L >= t5.config.decoder_layers(), "save_peft: peft 0.18.1 gives a T5 prefix one key/value pair "
                     "per encoder layer, and this T5 has {} encoder but {} decoder layers, which peft's forward cannot "
                     "run; save delta '{}' with DeltaModel::save", L, t5.config.decoder_layers(), name);
  torch::Tensor table;
  {
    torch::NoGradGuard no_grad;
    table = prefix_table_to_peft(prefix->key_values(), expected, L);  // (P, L * 2 * inner)
  }
  PeftAdapter out;
  out.tensors["prompt_embeddings"] = table;
  out.config = peft_prompt_learning_config(model, "PREFIX_TUNING", t5.config, prefix->options.num_virtual_tokens(), inner,
                                           options);
  out.config.update({{"encoder_hidden_size", prefix->options.prefix_projection() ? prefix->options.hidden() : inner},
                     {"prefix_projection", prefix->options.prefix_projection()}});
  return out;
}

// peft's layout for each method that has one, by DeltaRecipe::method().
using PeftWriter = PeftAdapter (*)(DeltaModel&, const DeltaModel::Entry&, const std::string&, const PeftSaveOptions&);
inline PeftAdapter peft_vera(DeltaModel& model, const DeltaModel::Entry& entry, const std::string& name,
                             const PeftSaveOptions& options) {
  check_linear_sites(entry, "VeRA", "save_peft");
  PeftAdapter out;
  std::vector<std::string> sites;
  const auto deltas = peft_deltas<VeRAImpl>(entry, name);
  for (const auto& [site, vera] : deltas) {
    out.tensors[kPeftKeyPrefix + site + ".vera_lambda_b"] = vera->vera_lambda_b;
    out.tensors[kPeftKeyPrefix + site + ".vera_lambda_d"] = vera->vera_lambda_d;
    sites.push_back(site);
  }
  const auto* first = deltas.front().second;
  if (options.save_projection()) {
    out.tensors["base_model.vera_A"] = first->projection->vera_A;
    out.tensors["base_model.vera_B"] = first->projection->vera_B;
  }
  const auto& o = first->options;
  out.config = peft_config_base(model, "VERA", options);
  out.config.update({{"bias", "none"}, {"d_initial", o.d_initial()}, {"fan_in_fan_out", false}, {"init_weights", true},
                     {"layers_pattern", nullptr}, {"layers_to_transform", nullptr}, {"modules_to_save", nullptr},
                     {"projection_prng_key", o.projection_prng_key()}, {"r", o.r()},
                     {"save_projection", options.save_projection()},
                     {"target_modules", peft_target_modules(sites, model)}, {"vera_dropout", o.dropout()}});
  return out;
}

inline PeftAdapter peft_lokr(DeltaModel& model, const DeltaModel::Entry& entry, const std::string& name,
                             const PeftSaveOptions& options) {
  check_linear_sites(entry, "LoKr", "save_peft");
  PeftAdapter out;
  std::vector<std::string> sites;
  const auto deltas = peft_deltas<LoKrImpl>(entry, name);
  for (const auto& [site, lokr] : deltas) {
    for (const auto& item : lokr->named_parameters(false))
      out.tensors[kPeftKeyPrefix + site + "." + item.key()] = item.value();
    sites.push_back(site);
  }
  const auto& o = deltas.front().second->options;
  out.config = peft_config_base(model, "LOKR", options);
  out.config.update({{"alpha", number(o.alpha())}, {"alpha_pattern", nlohmann::json::object()},
                     {"decompose_both", o.decompose_both()}, {"decompose_factor", o.decompose_factor()},
                     {"exclude_modules", nullptr},
                     {"init_weights", o.init() == "peft" ? nlohmann::json(true) : nlohmann::json(o.init())},
                     {"layers_pattern", nullptr}, {"layers_to_transform", nullptr},
                     {"module_dropout", o.module_dropout()}, {"r", o.r()}, {"rank_dropout", o.rank_dropout()},
                     {"rank_dropout_scale", o.rank_dropout_scale()}, {"rank_pattern", nlohmann::json::object()},
                     {"target_modules", peft_target_modules(sites, model)}, {"use_effective_conv2d", false}});
  return out;
}

inline const std::map<std::string, PeftWriter>& peft_writers() {
  static const std::map<std::string, PeftWriter> writers{
      {"lora", peft_lora}, {"vera", peft_vera}, {"lokr", peft_lokr}, {"ia3", peft_ia3}, {"prompt_tuning", peft_prompt}, {"prefix_tuning", peft_prefix}};
  return writers;
}

}  // namespace detail

// Writes delta `name` of `model` into `dir` as peft 0.18.1 writes an adapter
// (adapter_config.json, adapter_model.safetensors), each file atomically: Python's
// PeftModel.from_pretrained(base_model, dir) then computes what `model` computes. LoRA, VeRA, LoKr, IA3
// (T5, BERT), prompt and prefix tuning (T5); other methods, and placements peft cannot
// express, are refused with the reason.
inline void save_peft(DeltaModel& model, const std::string& name, const std::string& dir,
                      const PeftSaveOptions& options = {}) {
  const auto it = model.deltas().find(name);
  detail::check<OptionError>(it != model.deltas().end(), "save_peft: this model has no delta named '{}'", name);
  const auto& entry = it->second;
  const auto method = entry.recipe->method();
  detail::check<OptionError>(entry.backbone_parameters.empty(), "save_peft: delta '{}' ({}) trains backbone parameters "
                             "too, which peft's layout cannot hold; use DeltaModel::save", name, method);
  const auto writer = detail::peft_writers().find(method);
  if (writer == detail::peft_writers().end())
    throw OptionError(fmt::format("save_peft: peft 0.18.1 has no layout for {} (delta '{}'): it knows LoRA, VeRA, LoKr, IA3, prompt "
                                  "and prefix tuning here{}; use DeltaModel::save", method, name,
                                  method == "bitfit" ? ", and no bias-only method (its bias=\"all\" comes with LoRA "
                                                       "weights and T5 has no biases to train)" : ""));
  const auto adapter = writer->second(model, entry, name, options);
  std::filesystem::create_directories(dir);
  std::map<std::string, torch::Tensor> tensors;
  for (auto& [key, t] : adapter.tensors) tensors[key] = t.detach().contiguous();
  write_safetensors((std::filesystem::path(dir) / detail::kPeftWeightsFile).string(), tensors, {{"format", "pt"}});
  detail::write_text_atomically((std::filesystem::path(dir) / detail::kPeftConfigFile).string(),
                                adapter.config.dump(2) + "\n", "save_peft");
}

namespace detail {

// What a peft config asks for here: the recipe, and the sites its target_modules name, as
// a site pattern.
struct PeftPlan {
  std::shared_ptr<DeltaRecipe> recipe;
  std::string pattern;
};

inline PeftPlan peft_plan(DeltaModel& model, const JsonFields& c) {
  const auto& where = c.where();
  const auto type = c.get<std::string>("peft_type");
  const auto target_modules = [&] {
    return site_pattern_from_peft(c.get<nlohmann::json>("target_modules"), "target_modules", where);
  };
  if (type == "LORA") {
    check_peft_options(c.json(), {"r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "init_lora_weights"},
                       where);
    const auto init = c.get<nlohmann::json>("init_lora_weights", true);
    auto options = LoRAOptions().r(c.get<int64_t>("r")).alpha(c.get<double>("lora_alpha"))
                       .use_rslora(c.get<bool>("use_rslora", false)).use_dora(c.get<bool>("use_dora", false))
                       .dropout(c.get<double>("lora_dropout", 0.0))
                       .init(init == "pissa" || init == "olora" ? init.get<std::string>() : "lora");
    return {make_recipe(options), target_modules()};
  }
  if (type == "VERA") {
    check_peft_options(c.json(), {"r", "target_modules", "projection_prng_key", "save_projection", "d_initial",
                                  "init_weights"}, where);
    auto options = VeRAOptions().r(c.get<int64_t>("r")).d_initial(c.get<double>("d_initial", 0.1))
                       .dropout(c.get<double>("vera_dropout", 0.0))
                       .projection_prng_key(c.get<int64_t>("projection_prng_key", 0));
    return {make_recipe(options), target_modules()};
  }
  if (type == "LOKR") {
    check_peft_options(c.json(), {"r", "alpha", "rank_dropout", "rank_dropout_scale", "module_dropout",
                                  "decompose_both", "decompose_factor", "target_modules", "init_weights"}, where);
    const auto init = c.get<nlohmann::json>("init_weights", true);
    auto options = LoKrOptions().r(c.get<int64_t>("r")).alpha(c.get<double>("alpha"))
                       .rank_dropout(c.get<double>("rank_dropout", 0.0))
                       .rank_dropout_scale(c.get<bool>("rank_dropout_scale", false))
                       .module_dropout(c.get<double>("module_dropout", 0.0))
                       .decompose_both(c.get<bool>("decompose_both", false))
                       .decompose_factor(c.get<int64_t>("decompose_factor", -1))
                       .init(init == "lycoris" ? "lycoris" : "peft");
    return {make_recipe(options), target_modules()};
  }
  if (type == "IA3") {
    check_peft_options(c.json(), {"target_modules", "feedforward_modules"}, where);
    // As peft: no feedforward_modules means its default for the backbone, an empty list none.
    const auto ff = c.get<nlohmann::json>("feedforward_modules", nullptr);
    auto options = IA3Options();
    if (!ff.is_null())
      options.feedforward_modules(ff.is_array() && ff.empty() ? "" : site_pattern_from_peft(ff, "feedforward_modules", where));
    return {make_recipe(options), target_modules()};
  }
  const std::set<std::string> prompt_keys = {"num_virtual_tokens", "token_dim", "num_transformer_submodules",
                                             "num_attention_heads", "num_layers"};
  if (type == "PROMPT_TUNING") {
    check_peft_options(c.json(), prompt_keys, where);
    auto& t5 = peft_t5(model, "prompt tuning", where);
    const auto dim = c.get<int64_t>("token_dim");
    check<OptionError>(dim == t5.config.d_model(), "{}: token_dim = {} but the T5's d_model is {}", where, dim,
                       t5.config.d_model());
    return {make_recipe(PromptTuningOptions(c.get<int64_t>("num_virtual_tokens"))), "encoder"};
  }
  if (type == "PREFIX_TUNING") {
    auto keys = prompt_keys;
    keys.insert({"encoder_hidden_size", "prefix_projection"});  // the MLP's: the file holds its output
    check_peft_options(c.json(), keys, where);
    auto& t5 = peft_t5(model, "prefix tuning", where);
    const auto& tc = t5.config;
    const auto task = c.get<nlohmann::json>("task_type", nullptr);
    const auto submodules = c.get<int64_t>("num_transformer_submodules", 2);
    check<OptionError>(task == "SEQ_2_SEQ_LM" && submodules == 2, "{}: a T5 prefix needs task_type SEQ_2_SEQ_LM with "
                       "num_transformer_submodules 2, got {} and {}", where, task.dump(), submodules);
    const auto L = c.get<int64_t>("num_layers"), heads = c.get<int64_t>("num_attention_heads"),
               dim = c.get<int64_t>("token_dim");
    check<OptionError>(L >= tc.decoder_layers() && heads == tc.num_heads() && dim == tc.num_heads() * tc.d_kv(),
                       "{}: num_layers = {}, num_attention_heads = {}, token_dim = {} do not fit this T5 (at least {} "
                       "decoder layers, {} heads, {} = heads x d_kv)", where, L, heads, dim, tc.decoder_layers(),
                       tc.num_heads(), tc.num_heads() * tc.d_kv());
    return {make_recipe(PrefixTuningOptions(c.get<int64_t>("num_virtual_tokens")).prefix_projection(false)),
            t5_prefix_pattern()};
  }
  throw OptionError(fmt::format("{}: peft_type \"{}\" is not supported; deltatune reads LORA, VERA, LOKR, IA3, PROMPT_TUNING and "
                                "PREFIX_TUNING", where, type));
}

// Each parameter of the new delta with its file key and the file tensor's conversion from
// peft's layout; a tensor that is not floating point fits none.
inline std::vector<TensorSlot> peft_slots(const DeltaModel::Entry& entry, const JsonFields& c) {
  std::vector<TensorSlot> out;
  using Convert = std::function<torch::Tensor(const torch::Tensor&)>;
  auto add = [&](const std::string& key, const torch::Tensor& parameter, const Convert& convert) {
    out.push_back({key, {key}, parameter, [convert](const torch::Tensor& t) {
                     return t.is_floating_point() ? convert(t) : torch::Tensor();
                   }});
  };
  const auto same = [](const torch::Tensor& t) { return t; };
  const auto method = entry.recipe->method();
  for (const auto& a : entry.attachments) {
    const auto module = kPeftKeyPrefix + a.site.name;
    if (auto* lora = dynamic_cast<LoRAImpl*>(a.delta.get())) {
      add(module + ".lora_A.weight", lora->lora_A, same);
      add(module + ".lora_B.weight", lora->lora_B, same);
      if (lora->options.use_dora()) add(module + ".lora_magnitude_vector", lora->lora_magnitude_vector, same);
    } else if (auto* ia3 = dynamic_cast<IA3Impl*>(a.delta.get())) {
      add(module + ".ia3_l", ia3->ia3_l, [](const torch::Tensor& t) { return t.reshape(-1); });
    } else if (auto* vera = dynamic_cast<VeRAImpl*>(a.delta.get())) {
      add(module + ".vera_lambda_b", vera->vera_lambda_b, same);
      add(module + ".vera_lambda_d", vera->vera_lambda_d, same);
    } else if (auto* lokr = dynamic_cast<LoKrImpl*>(a.delta.get())) {
      for (const auto& item : lokr->named_parameters(false)) add(module + "." + item.key(), item.value(), same);
    }
  }
  if (method == "vera" && c.get<bool>("save_projection", true)) {  // else drawn from the seed when the delta was made
    const auto& projection = dynamic_cast<VeRAImpl&>(*entry.attachments.front().delta).projection;
    add("base_model.vera_A", projection->vera_A, same);
    add("base_model.vera_B", projection->vera_B, same);
  }
  if (method == "prompt_tuning") {
    auto* prompt = dynamic_cast<PromptTuningImpl*>(entry.attachments.front().delta.get());
    const int64_t P = prompt->options.num_virtual_tokens();
    add("prompt_embeddings", prompt->embedding, [P](const torch::Tensor& t) { return t.narrow(0, 0, P); });
  } else if (method == "prefix_tuning") {
    auto* prefix = dynamic_cast<PrefixTuningImpl*>(entry.attachments.front().delta.get());
    const int64_t L = c.get<int64_t>("num_layers"), M = c.get<int64_t>("num_transformer_submodules", 2),
                  S = int64_t(entry.attachments.size());
    add("prompt_embeddings", prefix->embedding,
        [L, M, S](const torch::Tensor& t) { return prefix_table_from_peft(t, L, M, S); });
  }
  return out;
}

// The file's tensors into the delta's parameters, or one error listing every mismatch.
inline void copy_peft_tensors(const DeltaModel::Entry& entry, const JsonFields& c, const std::string& path) {
  const TensorMatch match(peft_slots(entry, c), read_safetensors(path).tensors);
  check<CheckpointError>(match.fits(), "{} does not fit the peft config beside it on this model (shapes as peft "
                         "stores them; an unexpected tensor names no site of this delta):{}", path, match.problems());
  match.copy();
}

}  // namespace detail

// Reads the peft adapter in `dir` (adapter_config.json, adapter_model.safetensors) and adds
// it to `model` as delta `name` ("default", peft's name), at the sites its target_modules
// name, with the file's values. Unsupported peft types or options, and a file that does not
// fit, are errors naming the file and key; the model is then left as it was.
inline DeltaModel::Entry& load_peft(DeltaModel& model, const std::string& dir, const std::string& name = "default") {
  const auto config_path = (std::filesystem::path(dir) / detail::kPeftConfigFile).string();
  detail::check<CheckpointError>(std::filesystem::exists(config_path), "{}: no peft adapter config there (peft's "
                                 "save_pretrained writes {} and {})", config_path, detail::kPeftConfigFile,
                                 detail::kPeftWeightsFile);
  const JsonFields config(read_json_file(config_path), config_path);
  auto plan = detail::peft_plan(model, config);
  DeltaModel::Entry* entry = nullptr;
  try {
    entry = &model.add(name, plan.recipe, plan.pattern);
  } catch (const OptionError& e) {
    throw OptionError(fmt::format("{}: {}", config_path, e.what()));
  }
  try {
    if (const auto m = plan.recipe->method(); m == "lora" || m == "vera" || m == "lokr" || m == "ia3")
      detail::check_linear_sites(*entry, plan.recipe->method(), config_path);
    detail::copy_peft_tensors(*entry, config, (std::filesystem::path(dir) / detail::kPeftWeightsFile).string());
  } catch (...) {
    model.remove(name);
    throw;
  }
  return *entry;
}

}  // namespace deltatune
