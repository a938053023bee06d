// Atomic file writes: every file deltatune writes (checkpoints, configs, logs' snapshots)
// appears whole or not at all.
#pragma once

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include <deltatune/core/error.hpp>

namespace deltatune::detail {

// Owns the temporary file of an atomic write: closes it and, unless committed, removes it,
// so that no exit path (a throw included) leaves a half-written file behind.
struct TemporaryFile {
  std::string path;
  int fd = -1;
  bool committed = false;

  TemporaryFile(const TemporaryFile&) = delete;
  TemporaryFile& operator=(const TemporaryFile&) = delete;
  explicit TemporaryFile(std::string p) : path(std::move(p)) {}
  ~TemporaryFile() {
    if (fd >= 0) ::close(fd);
    if (!committed) ::unlink(path.c_str());
  }
};

// A span of bytes to write.
struct Bytes {
  const void* data;
  std::uint64_t size;
};

inline void write_all(TemporaryFile& file, const std::string& target, const char* who, Bytes bytes) {
  const char* p = static_cast<const char*>(bytes.data);
  std::uint64_t size = bytes.size;
  while (size > 0) {
    const ssize_t n = ::write(file.fd, p, static_cast<std::size_t>(std::min<std::uint64_t>(size, 1u << 30)));
    if (n < 0 && errno == EINTR) continue;
    check<CheckpointError>(n > 0, "{}: cannot write {} (via {}): {}", who, target, file.path, std::strerror(errno));
    p += n;
    size -= static_cast<std::uint64_t>(n);
  }
}

// Writes `pieces` one after another to `path.tmp-<pid>`, fsyncs, then renames it over
// `path`. On any failure the temporary file is removed and CheckpointError names `path`
// (`who` says which writer failed).
inline void write_file_atomically(const std::string& path, const std::vector<Bytes>& pieces, const char* who) {
  TemporaryFile tmp(path + ".tmp-" + std::to_string(::getpid()));
  tmp.fd = ::open(tmp.path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  check<CheckpointError>(tmp.fd >= 0, "{}: cannot write {}: cannot create {}: {}", who, path, tmp.path,
                         std::strerror(errno));
  for (const auto& piece : pieces) write_all(tmp, path, who, piece);
  // fsync before rename: otherwise a crash can leave the new name pointing at unwritten data.
  check<CheckpointError>(::fsync(tmp.fd) == 0, "{}: cannot write {}: fsync failed: {}", who, path,
                         std::strerror(errno));
  const int fd = tmp.fd;
  tmp.fd = -1;
  check<CheckpointError>(::close(fd) == 0, "{}: cannot write {}: close failed: {}", who, path, std::strerror(errno));
  check<CheckpointError>(std::rename(tmp.path.c_str(), path.c_str()) == 0, "{}: cannot write {}: rename from {} failed: {}",
                         who, path, tmp.path, std::strerror(errno));
  tmp.committed = true;
}

inline void write_text_atomically(const std::string& path, const std::string& text, const char* who) {
  write_file_atomically(path, {{text.data(), text.size()}}, who);
}

}  // namespace deltatune::detail
