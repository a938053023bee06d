// A run's files: a JSONL log (one JSON object a line, flushed at once, so a crash loses at
// most the line being written).
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <deltatune/core/atomic_file.hpp>
#include <deltatune/core/error.hpp>

namespace deltatune {

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

// Cuts a run's log back to what a training state saved at `step` had seen: drops the records
// of later steps, which a resumed run logs again, and a line torn by a kill; keeps the rest in
// order. Rewritten atomically; a missing log is left missing.
inline void truncate_jsonl_after_step(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in.is_open()) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    const auto record = nlohmann::json::parse(line, nullptr, false);
    if (record.is_discarded() || !record.is_object()) continue;
    const auto found = record.find("step");
    if (found == record.end() || !found->is_number() || found->get<double>() <= static_cast<double>(step))
      kept += line + '\n';
  }
  detail::check(!in.bad(), "truncate_jsonl_after_step: reading {} failed: {}", path, std::strerror(errno));
  detail::write_text_atomically(path, kept, "truncate_jsonl_after_step");
}

}  // namespace deltatune
