// A run's files: a JSONL log (one JSON object a line, flushed at once, so a crash loses at
// most the line being written) and whole files written atomically (temporary file + rename).
#pragma once

#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <deltatune/core/error.hpp>

namespace deltatune {

namespace detail {

// Writes `bytes` to `path.tmp-<pid>`, then renames it over `path`: readers see the old file or
// the whole new one, never a half-written one. (No fsync: plots and summaries are cheap to remake;
// checkpoints go through write_safetensors, which syncs.)
inline void write_file_atomic(const std::string& path, const std::string& bytes) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    check(out.is_open(), "cannot write {}: cannot create {}: {}", path, tmp, std::strerror(errno));
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    out.close();
    if (!out) std::remove(tmp.c_str());
    check(static_cast<bool>(out), "cannot write {}: writing {} failed (disk full?)", path, tmp);
  }
  const bool renamed = std::rename(tmp.c_str(), path.c_str()) == 0;
  if (!renamed) std::remove(tmp.c_str());
  check(renamed, "cannot write {}: rename from {} failed: {}", path, tmp, std::strerror(errno));
}

}  // namespace detail

// Appends one JSON object per line to a file and flushes each, for tail -f and for plotting.
//   deltatune::JsonlLogger log("out/log.jsonl");
//   log.log({{"step", 10}, {"loss", 0.52}});
class JsonlLogger {
 public:
  // Opens `path` for appending (a resumed run continues the same log), or truncates it.
  explicit JsonlLogger(std::string path, bool append = true)
      : path_(std::move(path)), out_(path_, append ? std::ios::app : std::ios::trunc) {
    detail::check(out_.is_open(), "JsonlLogger: cannot open {}: {}", path_, std::strerror(errno));
  }

  void log(const nlohmann::json& record) {
    detail::check(record.is_object(), "JsonlLogger: {}: a record must be a JSON object, not {}", path_,
                  record.type_name());
    out_ << record.dump() << '\n';
    out_.flush();
    detail::check(static_cast<bool>(out_), "JsonlLogger: writing {} failed (disk full?)", path_);
  }

  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
};

// Every record of a JSONL file, in order (for tests and for plotting a finished run).
inline std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::ifstream in(path);
  detail::check(in.is_open(), "read_jsonl: cannot open {}: {}", path, std::strerror(errno));
  std::vector<nlohmann::json> records;
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    if (line.empty()) continue;
    auto record = nlohmann::json::parse(line, nullptr, false);
    detail::check(!record.is_discarded(), "read_jsonl: {}:{}: not valid JSON", path, number);
    records.push_back(std::move(record));
  }
  return records;
}

}  // namespace deltatune
