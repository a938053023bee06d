// Reading JSON from files (config.json, a safetensors index, a delta's config, peft's and
// adapters' configs, a training state), with errors that name the file and the field.
#pragma once

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

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

namespace detail {

template <class T>
struct IsVector : std::false_type {};
template <class T>
struct IsVector<std::vector<T>> : std::true_type {};

// `value` (the field `key` of the file `where`) as T, its JSON type checked strictly: 2.7 is
// not an integer, "yes" not a boolean, 1e999 not a number. nlohmann's own conversions would
// truncate the first and throw its exception, naming no file, for the second.
template <class T>
T json_as(const nlohmann::json& value, const std::string& where, const std::string& key) {
  auto expect = [&](bool ok, const char* expected) {
    check<CheckpointError>(ok, "{}: \"{}\" is {}, expected {}", where, key, value.dump(), expected);
  };
  if constexpr (std::is_same_v<T, nlohmann::json>) {
    return value;
  } else if constexpr (std::is_same_v<T, bool>) {
    expect(value.is_boolean(), "true or false");
    return value.get<bool>();
  } else if constexpr (std::is_integral_v<T>) {
    // nlohmann reads integers past int64 as unsigned: those do not fit either.
    expect(value.is_number_integer() &&
               (!value.is_number_unsigned() ||
                value.get<std::uint64_t>() <= std::uint64_t(std::numeric_limits<std::int64_t>::max())),
           "an integer");
    return value.get<T>();
  } else if constexpr (std::is_floating_point_v<T>) {
    expect(value.is_number() && std::isfinite(value.get<double>()), "a finite number");
    return value.get<T>();
  } else if constexpr (std::is_same_v<T, std::string>) {
    expect(value.is_string(), "a string");
    return value.get<std::string>();
  } else {
    static_assert(IsVector<T>::value, "json_as reads bool, integers, floating point, strings and vectors of them");
    expect(value.is_array(), "an array");
    T out;
    for (std::size_t i = 0; i < value.size(); ++i)
      out.push_back(json_as<typename T::value_type>(value[i], where, fmt::format("{}[{}]", key, i)));
    return out;
  }
}

}  // namespace detail

// A JSON object read field by field: every field's type is checked (detail::json_as), and every
// error is a CheckpointError naming the file (`where`) and the field, so that a damaged or forged
// file is refused with a message instead of nlohmann's exception or a silently truncated value.
//   JsonFields config(read_json_file(path), path);
//   const auto r = config.get<int64_t>("r");
//   config.check(r >= 1, "r", "must be at least 1");
class JsonFields {
 public:
  JsonFields(nlohmann::json json, std::string where) : json_(std::move(json)), where_(std::move(where)) {
    detail::check<CheckpointError>(json_.is_object(), "{}: expected a JSON object, got {}", where_,
                                   json_.type_name());
  }

  // Whether `key` is present and not null (transformers writes unset values as null).
  bool has(const std::string& key) const {
    const auto it = json_.find(key);
    return it != json_.end() && !it->is_null();
  }

  // json[key] as T; CheckpointError when absent or of another type.
  template <class T>
  T get(const std::string& key) const {
    detail::check<CheckpointError>(has(key), "{}: the field \"{}\" is missing", where_, key);
    return detail::json_as<T>(json_.at(key), where_, key);
  }

  // json[key] as T, or `fallback` when absent or null.
  template <class T>
  T get(const std::string& key, T fallback) const {
    return has(key) ? get<T>(key) : std::move(fallback);
  }

  // json[key] as T, or nullopt when absent or null.
  template <class T>
  std::optional<T> get_optional(const std::string& key) const {
    return has(key) ? std::optional<T>(get<T>(key)) : std::nullopt;
  }

  // The nested object json[key], read the same way; its errors name "<where>: <key>".
  JsonFields object(const std::string& key) const {
    return JsonFields(get<nlohmann::json>(key), fmt::format("{}: \"{}\"", where_, key));
  }

  // Throws CheckpointError "<where>: "<key>" is <value>: <why>" unless `ok`.
  void check(bool ok, const std::string& key, const std::string& why) const {
    detail::check<CheckpointError>(ok, "{}: \"{}\" is {}: {}", where_, key, has(key) ? json_.at(key).dump() : "missing",
                                   why);
  }

  const nlohmann::json& json() const { return json_; }
  const std::string& where() const { return where_; }

 private:
  nlohmann::json json_;
  std::string where_;
};

}  // namespace deltatune
