// Reading a JSON file (config.json, a safetensors index, a delta's config), with errors
// that name the file.
#pragma once

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include <deltatune/core/error.hpp>

namespace deltatune {

inline nlohmann::json read_json_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  detail::check<CheckpointError>(in.is_open(), "{}: cannot open the file", path.string());
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("{}: not valid JSON ({})", path.string(), e.what()));
  }
}

}  // namespace deltatune
