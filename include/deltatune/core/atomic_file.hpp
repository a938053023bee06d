// Atomic file writes: every file deltatune writes (checkpoints, configs, logs' snapshots)
// appears whole or not at all.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <memory>
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

// The folder that holds `path` ("." for a bare name).
inline std::string parent_folder(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

// fsyncs the folder holding `path`: a rename is durable only once its directory entry is on disk.
inline void sync_parent_folder(const std::string& path, const char* who) {
  const auto folder = parent_folder(path);
  const int fd = ::open(folder.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  check<CheckpointError>(fd >= 0, "{}: wrote {}, but cannot open its folder {} to fsync it: {}", who, path, folder,
                         std::strerror(errno));
  const bool synced = ::fsync(fd) == 0;
  const int fsync_errno = errno;
  ::close(fd);
  check<CheckpointError>(synced, "{}: wrote {}, but fsync of its folder {} failed: {}", who, path, folder,
                         std::strerror(fsync_errno));
}

// Writes `pieces` one after another to `path.tmp-<pid>`, fsyncs, renames it over `path` and
// fsyncs the folder. On any failure the temporary file is removed and CheckpointError names
// `path` (`who` says which writer failed).
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
  sync_parent_folder(path, who);
}

inline void write_text_atomically(const std::string& path, const std::string& text, const char* who) {
  write_file_atomically(path, {{text.data(), text.size()}}, who);
}

// The pid in a name of write_file_atomically's temporaries, `<name>.tmp-<pid>`; -1 for any other name.
inline long temporary_file_pid(const std::string& name) {
  const auto at = name.rfind(".tmp-");
  if (at == std::string::npos || at == 0 || at + 5 == name.size()) return -1;
  long pid = 0;
  for (std::size_t i = at + 5; i < name.size(); ++i) {
    const char c = name[i];
    if (c < '0' || c > '9' || pid > (std::numeric_limits<int>::max() - (c - '0')) / 10) return -1;
    pid = pid * 10 + (c - '0');
  }
  return pid;
}

// Removes the temporaries that write_file_atomically left in `folder` when its process was
// killed between write and rename: files named `<name>.tmp-<pid>` whose pid is this process's
// or no live process's (another live process may be writing its own). Call it while this
// process writes nothing in `folder`. Returns the paths removed; a missing folder has none.
inline std::vector<std::string> remove_stale_temporaries(const std::string& folder) {
  std::vector<std::string> removed;
  const std::unique_ptr<DIR, int (*)(DIR*)> dir(::opendir(folder.c_str()), &::closedir);
  if (!dir) return removed;
  for (const dirent* entry; (entry = ::readdir(dir.get())) != nullptr;) {
    const long pid = temporary_file_pid(entry->d_name);
    if (pid <= 0) continue;
    const bool ours = pid == ::getpid(), dead = ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
    const auto path = folder + "/" + entry->d_name;
    struct stat st {};
    if ((!ours && !dead) || ::lstat(path.c_str(), &st) != 0 || !S_ISREG(st.st_mode)) continue;
    const bool unlinked = ::unlink(path.c_str()) == 0;
    const int unlink_errno = errno;
    // ENOENT: another process removed it first.
    check<CheckpointError>(unlinked || unlink_errno == ENOENT, "cannot remove the stale temporary file {}: {}", path,
                           std::strerror(unlink_errno));
    if (unlinked) removed.push_back(path);
  }
  return removed;
}

}  // namespace deltatune::detail
