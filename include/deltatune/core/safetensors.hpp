// Safetensors (Hugging Face's checkpoint format) read and written in C++: dense dtypes only, no mmap or lazy loads.
//
// Layout: an 8-byte little-endian header length N, N bytes of JSON (right-padded with spaces),
// then the data buffer. The JSON maps each tensor name to {"dtype", "shape", "data_offsets"}
// (offsets relative to the data buffer) plus an optional "__metadata__" of string to string.
// The writer lays files out byte for byte as the Python `safetensors` library does, so a
// checkpoint written here and one written there compare equal.
#pragma once

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <deltatune/core/atomic_file.hpp>
#include <deltatune/core/error.hpp>

// The tensors are copied to and from the file byte for byte; safetensors is little-endian.
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "deltatune's safetensors reader and writer assume a little-endian host"
#endif

namespace deltatune {

// Headers beyond this are refused before any allocation: a corrupt length must not ask for gigabytes.
inline constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;

// A safetensors file in memory: ordered maps, so writing the same contents gives the same bytes.
struct SafetensorsFile {
  std::map<std::string, torch::Tensor> tensors;
  std::map<std::string, std::string> metadata;
};

namespace detail {

struct SafetensorsDtype {
  const char* name;
  torch::ScalarType type;
  std::uint64_t size;  // bytes per element
};

// In the order the Python library lays tensors out (its Dtype enum, largest first), so that
// a tensor's position here is its sort key when writing.
inline const std::vector<SafetensorsDtype>& safetensors_dtypes() {
  using T = c10::ScalarType;
  static const std::vector<SafetensorsDtype> table = {
      {"U64", T::UInt64, 8},  {"I64", T::Long, 8},     {"F64", T::Double, 8},          {"F32", T::Float, 4},
      {"U32", T::UInt32, 4},  {"I32", T::Int, 4},      {"BF16", T::BFloat16, 2},       {"F16", T::Half, 2},
      {"U16", T::UInt16, 2},  {"I16", T::Short, 2},    {"F8_E4M3", T::Float8_e4m3fn, 1}, {"F8_E5M2", T::Float8_e5m2, 1},
      {"I8", T::Char, 1},     {"U8", T::Byte, 1},      {"BOOL", T::Bool, 1}};
  return table;
}

// Index into safetensors_dtypes() of the entry whose `field` equals `key`, or -1 if none does.
template <class Key, class Field>
inline int safetensors_dtype_index(const Key& key, Field SafetensorsDtype::*field) {
  const auto& table = safetensors_dtypes();
  for (std::size_t i = 0; i < table.size(); ++i)
    if (key == table[i].*field) return static_cast<int>(i);
  return -1;
}

inline int safetensors_dtype_index(const std::string& name) { return safetensors_dtype_index(name, &SafetensorsDtype::name); }
inline int safetensors_dtype_index(torch::ScalarType type) { return safetensors_dtype_index(type, &SafetensorsDtype::type); }

// "I64, F64, ...": the dtypes the table holds, for error messages.
inline std::string safetensors_dtype_names() {
  std::vector<std::string> names;
  for (const auto& dtype : safetensors_dtypes()) names.emplace_back(dtype.name);
  return fmt::format("{}", fmt::join(names, ", "));
}

// a * b, or false when it does not fit in 64 bits: shapes in a file are untrusted.
inline bool checked_mul(std::uint64_t a, std::uint64_t b, std::uint64_t& out) {
  if (a != 0 && b > std::numeric_limits<std::uint64_t>::max() / a) return false;
  out = a * b;
  return true;
}

// A JSON value that must be a non-negative integer; returns false for anything else
// (nlohmann parses every non-negative integer as unsigned; floats, strings, negatives and
// integers past 64 bits, which it parses as floats, all fail here).
inline bool json_to_u64(const nlohmann::json& value, std::uint64_t& out) {
  if (!value.is_number_unsigned()) return false;
  out = value.get<std::uint64_t>();
  return true;
}

// One tensor's entry, checked against the data buffer's size.
struct SafetensorsEntry {
  std::string name;
  int dtype;
  std::vector<std::int64_t> shape;
  std::uint64_t begin, end;
};

inline SafetensorsEntry parse_safetensors_entry(const std::string& path, const std::string& name,
                                                const nlohmann::json& entry, std::uint64_t data_bytes) {
  check<CheckpointError>(entry.is_object(), "{}: tensor '{}': entry must be a JSON object, got {}", path, name,
                         entry.type_name());
  for (const char* key : {"dtype", "shape", "data_offsets"})
    check<CheckpointError>(entry.contains(key), "{}: tensor '{}': entry has no \"{}\"", path, name, key);
  const auto& dtype = entry["dtype"];
  const auto& shape = entry["shape"];
  const auto& offsets = entry["data_offsets"];

  SafetensorsEntry out{name, -1, {}, 0, 0};
  check<CheckpointError>(dtype.is_string(), "{}: tensor '{}': \"dtype\" must be a string, got {}", path, name,
                         dtype.type_name());
  out.dtype = safetensors_dtype_index(dtype.get<std::string>());
  check<CheckpointError>(out.dtype >= 0,
                         "{}: tensor '{}': unknown dtype \"{}\" (supported: {})", path, name,
                         dtype.get<std::string>(), safetensors_dtype_names());

  check<CheckpointError>(shape.is_array(), "{}: tensor '{}': \"shape\" must be an array, got {}", path, name,
                         shape.type_name());
  std::uint64_t numel = 1;
  for (const auto& dim : shape) {
    std::uint64_t d = 0;
    check<CheckpointError>(!(dim.is_number_integer() && !dim.is_number_unsigned()),
                           "{}: tensor '{}': shape {} has a negative dimension", path, name, shape.dump());
    check<CheckpointError>(json_to_u64(dim, d) && d <= std::uint64_t(std::numeric_limits<std::int64_t>::max()),
                           "{}: tensor '{}': shape {} must hold non-negative integers", path, name, shape.dump());
    check<CheckpointError>(checked_mul(numel, d, numel), "{}: tensor '{}': shape {} overflows 64 bits", path, name,
                           shape.dump());
    out.shape.push_back(static_cast<std::int64_t>(d));
  }
  const auto& type = safetensors_dtypes()[out.dtype];
  std::uint64_t bytes = 0;
  check<CheckpointError>(checked_mul(numel, type.size, bytes), "{}: tensor '{}': {} x shape {} overflows 64 bits",
                         path, name, type.name, shape.dump());

  check<CheckpointError>(offsets.is_array() && offsets.size() == 2 && json_to_u64(offsets[0], out.begin) &&
                             json_to_u64(offsets[1], out.end),
                         "{}: tensor '{}': \"data_offsets\" must be [begin, end] of non-negative integers, got {}",
                         path, name, offsets.dump());
  check<CheckpointError>(out.begin <= out.end, "{}: tensor '{}': data_offsets [{}, {}] end before they begin", path,
                         name, out.begin, out.end);
  check<CheckpointError>(out.end <= data_bytes,
                         "{}: tensor '{}': data_offsets [{}, {}] run past the data buffer ({} bytes); is the file "
                         "truncated?",
                         path, name, out.begin, out.end, data_bytes);
  check<CheckpointError>(out.end - out.begin == bytes,
                         "{}: tensor '{}': data_offsets [{}, {}] hold {} bytes, but {} with shape {} needs {}", path,
                         name, out.begin, out.end, out.end - out.begin, type.name, shape.dump(), bytes);
  return out;
}

// The header's JSON, refused where Python's safetensors refuses it: a byte-order mark (which
// nlohmann would skip) or "__metadata__" twice. A tensor named twice keeps its last entry, as there.
inline nlohmann::json parse_safetensors_header(const std::string& path, const std::string& text) {
  check<CheckpointError>(text.rfind("\xEF\xBB\xBF", 0) != 0, "{}: header starts with a byte-order mark; not a "
                         "safetensors file?", path);
  int metadata_keys = 0;
  const auto count_metadata = [&](int depth, nlohmann::json::parse_event_t event, nlohmann::json& parsed) {
    if (depth == 1 && event == nlohmann::json::parse_event_t::key && parsed == "__metadata__") ++metadata_keys;
    return true;
  };
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(text, count_metadata);
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("{}: header is not valid JSON: {}", path, e.what()));
  }
  check<CheckpointError>(header.is_object(), "{}: header must be a JSON object, got {}", path, header.type_name());
  check<CheckpointError>(metadata_keys <= 1, "{}: header holds \"__metadata__\" {} times", path, metadata_keys);
  return header;
}

// "__metadata__": an object of strings, or null (none).
inline std::map<std::string, std::string> parse_safetensors_metadata(const std::string& path,
                                                                     const nlohmann::json& value) {
  std::map<std::string, std::string> out;
  if (value.is_null()) return out;
  check<CheckpointError>(value.is_object(), "{}: \"__metadata__\" must be an object of strings, got {}", path,
                         value.type_name());
  for (const auto& [key, item] : value.items()) {
    check<CheckpointError>(item.is_string(), "{}: \"__metadata__\" entry '{}' must be a string, got {}", path, key,
                           item.type_name());
    out[key] = item.get<std::string>();
  }
  return out;
}

// As Python's safetensors: the tensors, in the order of their offsets, tile the data buffer
// exactly, each beginning where the one before ends and the last ending at the file's end.
// No byte is shared by two tensors or hidden outside every tensor.
inline void check_safetensors_coverage(const std::string& path, const std::vector<SafetensorsEntry>& entries,
                                       std::uint64_t data_bytes) {
  std::vector<const SafetensorsEntry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const auto* a, const auto* b) { return std::tie(a->begin, a->end) < std::tie(b->begin, b->end); });
  std::uint64_t covered = 0;
  const SafetensorsEntry* previous = nullptr;
  for (const auto* e : by_offset) {
    check<CheckpointError>(e->begin <= covered, "{}: bytes [{}, {}) of the data buffer, before tensor '{}', belong to "
                           "no tensor", path, covered, e->begin, e->name);
    check<CheckpointError>(e->begin == covered, "{}: tensors '{}' [{}, {}] and '{}' [{}, {}] overlap in the data "
                           "buffer", path, previous ? previous->name : "", previous ? previous->begin : 0, covered,
                           e->name, e->begin, e->end);
    covered = e->end;
    previous = e;
  }
  check<CheckpointError>(covered == data_bytes, "{}: bytes [{}, {}) at the end of the data buffer belong to no tensor",
                         path, covered, data_bytes);
}

}  // namespace detail

// Reads a safetensors file into CPU tensors that own their memory. The file is checked whole
// before anything is allocated, by Python safetensors' rules (a file one of them refuses, the
// other refuses too); CheckpointError names the file and what is wrong.
//   auto file = deltatune::read_safetensors("adapter.safetensors");
//   torch::Tensor w = file.tensors.at("lora_A");
inline SafetensorsFile read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  detail::check<CheckpointError>(in.is_open(), "{}: cannot open safetensors file: {}", path, std::strerror(errno));
  const std::streamoff end_pos = in.tellg();
  detail::check<CheckpointError>(end_pos >= 0, "{}: cannot read safetensors file (not a regular file?)", path);
  const auto file_bytes = static_cast<std::uint64_t>(end_pos);
  detail::check<CheckpointError>(file_bytes >= 8,
                                 "{}: file is {} bytes, too short for the 8-byte header length of a safetensors file",
                                 path, file_bytes);

  unsigned char length_bytes[8];
  in.seekg(0);
  in.read(reinterpret_cast<char*>(length_bytes), 8);
  detail::check<CheckpointError>(bool(in), "{}: cannot read the header length", path);
  std::uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | length_bytes[i];
  detail::check<CheckpointError>(header_bytes <= kMaxHeaderBytes,
                                 "{}: header length {} exceeds the {}-byte bound; not a safetensors file?", path,
                                 header_bytes, kMaxHeaderBytes);
  detail::check<CheckpointError>(header_bytes <= file_bytes - 8,
                                 "{}: header length {} runs past the end of the file ({} bytes); is it truncated?",
                                 path, header_bytes, file_bytes);
  const std::uint64_t data_start = 8 + header_bytes;
  const std::uint64_t data_bytes = file_bytes - data_start;

  std::string text(static_cast<std::size_t>(header_bytes), '\0');
  in.read(text.data(), static_cast<std::streamsize>(header_bytes));
  detail::check<CheckpointError>(bool(in), "{}: cannot read the {}-byte header", path, header_bytes);
  const auto header = detail::parse_safetensors_header(path, text);

  SafetensorsFile out;
  std::vector<detail::SafetensorsEntry> entries;
  for (const auto& [name, value] : header.items()) {
    if (name == "__metadata__") {
      out.metadata = detail::parse_safetensors_metadata(path, value);
      continue;
    }
    entries.push_back(detail::parse_safetensors_entry(path, name, value, data_bytes));
  }
  detail::check_safetensors_coverage(path, entries, data_bytes);

  // Each tensor is read straight into its own storage: no second copy of the file in memory.
  for (const auto& e : entries) {
    const auto dtype = torch::dtype(detail::safetensors_dtypes()[e.dtype].type);
    const std::uint64_t bytes = e.end - e.begin;
    // Without elements, a shape may still overflow contiguous strides ([0, 2^32, 2^32]), which
    // torch::empty refuses; any strides describe an empty tensor.
    torch::Tensor t = bytes == 0 ? torch::empty_strided(e.shape, std::vector<std::int64_t>(e.shape.size(), 1), dtype)
                                 : torch::empty(e.shape, dtype);
    if (bytes > 0) {
      in.seekg(static_cast<std::streamoff>(data_start + e.begin));
      in.read(static_cast<char*>(t.data_ptr()), static_cast<std::streamsize>(bytes));
      detail::check<CheckpointError>(bool(in) && static_cast<std::uint64_t>(in.gcount()) == bytes,
                                     "{}: tensor '{}': cannot read bytes [{}, {}) of the data buffer", path, e.name,
                                     e.begin, e.end);
    }
    out.tensors.emplace(e.name, std::move(t));
  }
  return out;
}

// Writes tensors (copied to CPU, made contiguous) and metadata as a safetensors file, laid out
// as the Python library lays it out: data ordered by dtype (largest first) then name, the
// header padded with spaces to a multiple of 8 bytes. Metadata keys go in sorted order (Python
// writes them in its hash map's order, which varies per process, so with two or more keys the
// files agree on everything but that order). Empty metadata writes no "__metadata__".
// Atomic: the bytes go to `path.tmp-<pid>`, are fsync'ed, then renamed over `path`; on any
// failure the temporary file is removed and CheckpointError names the path.
//   deltatune::write_safetensors("adapter.safetensors", {{"lora_A", a}, {"lora_B", b}}, {{"format", "pt"}});
inline void write_safetensors(const std::string& path, const std::map<std::string, torch::Tensor>& tensors,
                              const std::map<std::string, std::string>& metadata = {}) {
  struct Item {
    int dtype;
    std::string name;
    torch::Tensor tensor;
  };
  std::vector<Item> items;
  for (const auto& [name, tensor] : tensors) {
    detail::check<CheckpointError>(name != "__metadata__", "write_safetensors: {}: \"__metadata__\" is reserved and "
                                   "cannot name a tensor", path);
    detail::check<CheckpointError>(tensor.defined(), "write_safetensors: {}: tensor '{}' is undefined", path, name);
    const int dtype = detail::safetensors_dtype_index(tensor.scalar_type());
    detail::check<CheckpointError>(dtype >= 0,
                                   "write_safetensors: {}: tensor '{}' has dtype {}, which safetensors files here do "
                                   "not hold ({})",
                                   path, name, c10::toString(tensor.scalar_type()), detail::safetensors_dtype_names());
    items.push_back({dtype, name, tensor.detach().to(torch::kCPU).contiguous()});
  }
  std::sort(items.begin(), items.end(),
            [](const Item& a, const Item& b) { return std::tie(a.dtype, a.name) < std::tie(b.dtype, b.name); });

  // ordered_json keeps insertion order, which is the Python library's: metadata, then data order.
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::uint64_t offset = 0;
  for (const auto& item : items) {
    const std::uint64_t bytes = item.tensor.nbytes();
    nlohmann::ordered_json entry = nlohmann::ordered_json::object();
    entry["dtype"] = detail::safetensors_dtypes()[item.dtype].name;
    entry["shape"] = item.tensor.sizes().vec();
    entry["data_offsets"] = {offset, offset + bytes};
    header[item.name] = std::move(entry);
    offset += bytes;
  }
  std::string text;
  try {
    text = header.dump();
  } catch (const nlohmann::json::exception& e) {
    throw CheckpointError(fmt::format("write_safetensors: {}: cannot encode the header (names and metadata must be "
                                      "UTF-8): {}",
                                      path, e.what()));
  }
  // Padding to a multiple of 8 puts the data buffer on an 8-byte boundary, as Python does.
  text.append((8 - text.size() % 8) % 8, ' ');

  unsigned char length_bytes[8];
  for (int i = 0; i < 8; ++i) length_bytes[i] = static_cast<unsigned char>(std::uint64_t(text.size()) >> (8 * i));

  std::vector<detail::Bytes> pieces{{length_bytes, 8}, {text.data(), text.size()}};
  for (const auto& item : items) pieces.push_back({item.tensor.data_ptr(), item.tensor.nbytes()});
  detail::write_file_atomically(path, pieces, "write_safetensors");
}

}  // namespace deltatune
