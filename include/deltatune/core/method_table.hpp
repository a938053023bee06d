// The method table: one row per method, the one place the rest of deltatune (DeltaModel::load,
// the examples, the benchmarks, the tools) learns which methods exist. Each row is written
// in its method's header (methods/<name>.hpp); methods/method_table.hpp lists deltatune's own.
// A program adds its own method by adding a row to a copy of the table:
//   auto methods = deltatune::builtin_methods();
//   methods.add(my_method_info());
//   model.load("task", dir, methods);
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <deltatune/core/error.hpp>
#include <deltatune/core/json_file.hpp>
#include <deltatune/core/format.hpp>
#include <deltatune/core/recipe.hpp>

namespace deltatune {

// Sizes a command line may set on a preset; 0 keeps the preset's own.
struct PresetSizes {
  int64_t rank = 0;              // LoRA's r (alpha follows it)
  int64_t reduction_factor = 0;  // adapters' d / bottleneck
  int64_t virtual_tokens = 0;    // prompt and prefix tuning's P
};

// A method at its published defaults under a command-line name ("compacter++", "full"), as
// the examples, benchmarks and tools offer it.
struct MethodPreset {
  std::string name;
  std::string description;                      // one line, for --help
  std::map<std::string, double> learning_rate;  // peak learning rate per backbone model_type ("t5", "bert")
  std::function<std::shared_ptr<DeltaRecipe>(const PresetSizes&)> make;

  // The peak learning rate for a backbone's model_type; an error names the ones it has.
  double lr(const std::string& model_type) const {
    const auto it = learning_rate.find(model_type);
    if (it != learning_rate.end()) return it->second;
    std::vector<std::string> known;
    for (const auto& [type, value] : learning_rate) known.push_back(type);
    throw OptionError(fmt::format("method {} has no default learning rate for model_type '{}' (it has {}); pass one",
                                  name, model_type, fmt::join(known, ", ")));
  }
};

// One method: the names its recipes save under, how to rebuild a recipe from the options
// it saved, and its command-line presets.
struct MethodInfo {
  std::vector<std::string> names;  // DeltaRecipe::method() values ("adapter", "compacter", ...)
  std::function<std::shared_ptr<DeltaRecipe>(const JsonFields& options)> recipe_from_json;  // as options_json() wrote them
  std::vector<MethodPreset> presets;
};

class MethodTable {
 public:
  MethodTable() = default;
  explicit MethodTable(std::vector<MethodInfo> rows) {
    for (auto& row : rows) add(std::move(row));
  }

  // Adds a row; a method or preset name that is taken already is an error.
  MethodTable& add(MethodInfo row) {
    for (const auto& name : row.names)
      detail::check<OptionError>(find(name) == nullptr, "MethodTable: method '{}' is in the table already", name);
    for (const auto& preset : row.presets)
      detail::check<OptionError>(find_preset(preset.name) == nullptr, "MethodTable: preset '{}' is in the table already",
                                 preset.name);
    rows_.push_back(std::move(row));
    return *this;
  }

  const std::vector<MethodInfo>& rows() const { return rows_; }

  // The row that saves under `method`; `where` starts the error, which lists the known names.
  const MethodInfo& method(const std::string& method, const std::string& where) const {
    if (const auto* row = find(method)) return *row;
    throw CheckpointError(fmt::format("{}: method '{}' is not in the method table (it has {}); add its row to the "
                                      "table passed to DeltaModel::load", where, method, fmt::join(method_names(), ", ")));
  }
  const MethodPreset& preset(const std::string& name) const {
    if (const auto* preset = find_preset(name)) return *preset;
    throw OptionError(fmt::format("unknown method '{}'; choose from {}", name, fmt::join(preset_names(), ", ")));
  }

  std::vector<std::string> method_names() const {
    std::vector<std::string> out;
    for (const auto& row : rows_) out.insert(out.end(), row.names.begin(), row.names.end());
    return out;
  }
  std::vector<std::string> preset_names() const {
    std::vector<std::string> out;
    for (const auto& row : rows_)
      for (const auto& preset : row.presets) out.push_back(preset.name);
    return out;
  }

  const MethodInfo* find(const std::string& method) const {
    for (const auto& row : rows_)
      if (std::find(row.names.begin(), row.names.end(), method) != row.names.end()) return &row;
    return nullptr;
  }
  const MethodPreset* find_preset(const std::string& name) const {
    for (const auto& row : rows_)
      for (const auto& preset : row.presets)
        if (preset.name == name) return &preset;
    return nullptr;
  }

 private:
  std::vector<MethodInfo> rows_;
};

// The tag by which DeltaModel::load(name, dir) finds deltatune's own table, builtin_methods(),
// which methods/method_table.hpp defines above the core (as add() finds make_recipe).
template <class Table>
struct BuiltinMethodsTag {};

}  // namespace deltatune
