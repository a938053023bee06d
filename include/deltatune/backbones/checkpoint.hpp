// A backbone's pretrained weights: read from a Hugging Face directory (config.json plus
// model.safetensors or a sharded index) or a TorchScript archive, and loaded into a
// module name to name. Leaves out .bin (pickle) checkpoints: convert them to safetensors.
#pragma once

#include <torch/script.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include <deltatune/core/error.hpp>
#include <deltatune/core/json_file.hpp>
#include <deltatune/core/safetensors.hpp>
#include <deltatune/core/tensor_match.hpp>

namespace deltatune::backbones {

// Named tensors and the model's configuration, with where they came from for messages.
struct Checkpoint {
  std::string source;      // the folder or archive
  nlohmann::json config;   // config.json, an object; for a TorchScript archive its extra file config.json, or null
  std::map<std::string, torch::Tensor> tensors;
};

using deltatune::read_json_file;

}  // namespace deltatune::backbones

namespace deltatune::detail {

// model.safetensors.index.json: {"weight_map": {tensor name: shard file}}; every tensor it
// names must be in its shard.
inline std::map<std::string, torch::Tensor> read_sharded(const std::filesystem::path& index_path) {
  const auto index = read_json_file(index_path);
  detail::check<CheckpointError>(index.contains("weight_map") && index["weight_map"].is_object(),
                                            "{}: no \"weight_map\" object; is this a safetensors index?",
                                            index_path.string());
  std::map<std::string, std::vector<std::string>> names_by_shard;
  for (const auto& [name, shard] : index["weight_map"].items()) {
    detail::check<CheckpointError>(shard.is_string(), "{}: the shard of '{}' is not a file name",
                                              index_path.string(), name);
    names_by_shard[shard.get<std::string>()].push_back(name);
  }
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [shard, names] : names_by_shard) {
    const auto shard_path = (index_path.parent_path() / shard).string();
    auto file = read_safetensors(shard_path);
    for (const auto& name : names) {
      auto it = file.tensors.find(name);
      detail::check<CheckpointError>(it != file.tensors.end(),
                                                "{}: tensor '{}' is listed in {} but missing from the shard",
                                                shard_path, name, index_path.filename().string());
      tensors[name] = it->second;
    }
  }
  return tensors;
}

// A TorchScript archive on the CPU, with the extra files asked for; CheckpointError where it cannot be loaded.
inline torch::jit::Module load_script_archive(const std::string& path, torch::jit::ExtraFilesMap& extra_files) {
  try {
    return torch::jit::load(path, torch::kCPU, extra_files);
  } catch (const c10::Error& e) {
    throw CheckpointError(fmt::format("{}: not a loadable TorchScript archive ({})", path, e.what_without_backtrace()));
  }
}

}  // namespace deltatune::detail

namespace deltatune::backbones {

// A Hugging Face checkpoint folder: config.json and model.safetensors, or
// model.safetensors.index.json with its shards.
inline Checkpoint read_hf_directory(const std::string& dir) {
  namespace fs = std::filesystem;
  const fs::path root(dir);
  detail::check<CheckpointError>(fs::is_directory(root), "{}: not a folder (expected a Hugging Face "
                                                                    "checkpoint: config.json + model.safetensors)", dir);
  Checkpoint out{dir, read_json_file(root / "config.json"), {}};
  detail::check<CheckpointError>(out.config.is_object(), "{}: expected a JSON object of the model's configuration, "
                                 "got {}", (root / "config.json").string(), out.config.type_name());
  if (fs::exists(root / "model.safetensors")) {
    out.tensors = read_safetensors((root / "model.safetensors").string()).tensors;
  } else if (fs::exists(root / "model.safetensors.index.json")) {
    out.tensors = detail::read_sharded(root / "model.safetensors.index.json");
  } else {
    throw CheckpointError(fmt::format("{}: neither model.safetensors nor model.safetensors.index.json is there "
                                      "(pytorch_model.bin is not read: convert it to safetensors)", dir));
  }
  return out;
}

// A TorchScript archive (torch.jit.trace or torch.jit.script, then torch.jit.save): its
// parameters and buffers by name. A config.json saved as an extra file (_extra_files) is read too.
inline Checkpoint read_torchscript(const std::string& path) {
  torch::jit::ExtraFilesMap extra{{"config.json", ""}};
  auto archive = detail::load_script_archive(path, extra);
  Checkpoint out{path, nullptr, {}};
  if (!extra["config.json"].empty()) {
    try {
      out.config = nlohmann::json::parse(extra["config.json"]);
    } catch (const nlohmann::json::exception& e) {
      throw CheckpointError(fmt::format("{}: its config.json is not valid JSON ({})", path, e.what()));
    }
    detail::check<CheckpointError>(out.config.is_object(), "{}: its config.json is a JSON {}, not an object of the "
                                   "model's configuration", path, out.config.type_name());
  }
  for (const auto& p : archive.named_parameters(/*recurse=*/true)) out.tensors[p.name] = p.value.detach();
  for (const auto& b : archive.named_buffers(/*recurse=*/true)) out.tensors[b.name] = b.value.detach();
  return out;
}

// Where the checkpoint's config came from, for messages: "<dir>/config.json" or "<archive> (extra file config.json)".
inline std::string config_file(const Checkpoint& checkpoint) {
  return std::filesystem::is_directory(checkpoint.source)
             ? (std::filesystem::path(checkpoint.source) / "config.json").string()
             : fmt::format("{} (extra file config.json)", checkpoint.source);
}

// The checkpoint's config, read field by field (JsonFields: errors name the config file and the
// key). An archive saved without the config says how to add it, and `alternative`, where the
// loader has another way to give it.
inline JsonFields config_fields(const Checkpoint& checkpoint, const std::string& alternative = "") {
  detail::check<CheckpointError>(!checkpoint.config.is_null(), "{}: the archive holds no config.json; save it with "
                                 "torch.jit.save(module, path, _extra_files={{\"config.json\": "
                                 "model.config.to_json_string()}}){}", checkpoint.source,
                                 alternative.empty() ? "" : " or " + alternative);
  return JsonFields(checkpoint.config, config_file(checkpoint));
}

// A folder is read as a Hugging Face checkpoint, a file as a TorchScript archive.
inline Checkpoint read_checkpoint(const std::string& path) {
  detail::check<CheckpointError>(std::filesystem::exists(path), "{}: no such file or folder", path);
  return std::filesystem::is_directory(path) ? read_hf_directory(path) : read_torchscript(path);
}

// How checkpoint names map to a module's: Hugging Face heads prefix the backbone
// ("bert.", "transformer."), tied weights are stored once, and some tensors are unused.
struct LoadOptions {
  using NamePairs = std::vector<std::pair<std::string, std::string>>;
  // Prefixes a checkpoint name may carry before the module's name.
  TORCH_ARG(std::vector<std::string>, prefixes) = {};
  // Prefixes of the module's names that a checkpoint may lack: a head model ("bert.") loading
  // a bare backbone's checkpoint.
  TORCH_ARG(std::vector<std::string>, module_prefixes) = {};
  // Module name -> checkpoint names to try when it is absent (tied weights: "lm_head.weight" -> "shared.weight").
  TORCH_ARG(NamePairs, aliases) = {};
  // Checkpoint tensors that may go unused (regexes), as transformers' _keys_to_ignore_on_load_unexpected.
  TORCH_ARG(std::vector<std::string>, ignore_unexpected) = {};
  // Module tensors that may be missing and keep their initial values (regexes).
  TORCH_ARG(std::vector<std::string>, allow_missing) = {};
};

}  // namespace deltatune::backbones

namespace deltatune::detail {

inline bool matches_any(const std::string& name, const std::vector<std::string>& patterns) {
  for (const auto& p : patterns)
    if (std::regex_search(name, std::regex(p))) return true;
  return false;
}

}  // namespace deltatune::detail

namespace deltatune::backbones {

// Copies every parameter and buffer of `module` from the checkpoint, converting F16/BF16
// to the module's dtype. Missing, unexpected and mis-shaped tensors are gathered and
// reported in one CheckpointError; nothing is copied unless all is well.
inline void load_parameters(torch::nn::Module& module, const Checkpoint& checkpoint, const LoadOptions& options = {}) {
  // The checkpoint names a module tensor may have: its own, less a module prefix, an alias,
  // each of those with a checkpoint prefix.
  auto keys = [&](const std::string& name) {
    std::vector<std::string> candidates{name};
    for (const auto& prefix : options.module_prefixes())
      if (name.rfind(prefix, 0) == 0) candidates.push_back(name.substr(prefix.size()));
    for (const auto& [target, alias] : options.aliases())
      if (target == name) candidates.push_back(alias);
    for (const auto& candidate : std::vector<std::string>(candidates)) {
      for (const auto& prefix : options.prefixes()) candidates.push_back(prefix + candidate);
    }
    return candidates;
  };
  std::vector<detail::TensorSlot> slots;
  auto add = [&](const std::string& name, const torch::Tensor& target) {
    slots.push_back({name, keys(name), target, {}, detail::matches_any(name, options.allow_missing())});
  };
  for (const auto& p : module.named_parameters(/*recurse=*/true)) add(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/true)) add(b.key(), b.value());
  const detail::TensorMatch match(slots, checkpoint.tensors,
                          [&](const std::string& name) { return detail::matches_any(name, options.ignore_unexpected()); });
  detail::check<CheckpointError>(match.fits(),
                                 "{}: the checkpoint does not fit the model built from its config:{}\n"
                                 "Is it the architecture and size the config says?",
                                 checkpoint.source, match.problems());
  match.copy();  // into the module's own storage
}

}  // namespace deltatune::backbones
