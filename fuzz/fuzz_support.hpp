// Shared by the libFuzzer targets in fuzz/: where an input goes on disk, and what counts as a bug.
//
// Policy: a reader must refuse bad input with a deltatune::Error (CheckpointError, OptionError,
// ...) whose message names the file. Those are caught here. Anything else -- nlohmann's, torch's
// c10::Error, std::out_of_range, std::bad_alloc -- escapes LLVMFuzzerTestOneInput, std::terminate
// prints its what() and libFuzzer records the input as a crash, as it does for a sanitizer report.
#pragma once

#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <deltatune/core/error.hpp>

namespace deltatune::fuzz {

// One folder per process under $TMPDIR for the inputs and the fixed files beside them; what is
// written there is removed file by file at exit (never remove_all: LibTorch's copy crashes).
class Scratch {
 public:
  static Scratch& get() {
    static Scratch scratch;
    return scratch;
  }
  const std::string& dir() const { return dir_; }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }

  // A file kept for the whole run (a valid weights file beside the fuzzed config).
  void keep(const std::string& name, const std::vector<char>& bytes) {
    write(path(name), bytes.data(), bytes.size());
    adopt(name);
  }
  // A file something else wrote into the folder, to be removed at exit.
  void adopt(const std::string& name) { kept_.push_back(path(name)); }

  ~Scratch() {
    for (const auto& file : kept_) std::remove(file.c_str());
    rmdir(dir_.c_str());
  }

  static void write(const std::string& path, const void* data, std::size_t size) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    const bool ok = f && (size == 0 || std::fwrite(data, 1, size, f) == size);
    if (!f || std::fclose(f) != 0 || !ok) {
      std::perror(path.c_str());
      std::abort();  // the harness, not the reader, failed
    }
  }

 private:
  Scratch() {
    std::string pattern = (std::filesystem::temp_directory_path() / "deltatune-fuzz-XXXXXX").string();
    if (!mkdtemp(pattern.data())) {
      std::perror("mkdtemp");
      std::abort();
    }
    dir_ = pattern;
  }
  std::string dir_;
  std::vector<std::string> kept_;
};

// The fuzz input as file `name` in the scratch folder for one iteration.
class InputFile {
 public:
  InputFile(const std::string& name, const std::uint8_t* data, std::size_t size) : path_(Scratch::get().path(name)) {
    Scratch::write(path_, data, size);
  }
  ~InputFile() { std::remove(path_.c_str()); }
  InputFile(const InputFile&) = delete;
  InputFile& operator=(const InputFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// Runs one reader call; a deltatune::Error is the refusal bad input should get.
template <class Read>
int expect_refusal_or_success(Read&& read) {
  try {
    read();
  } catch (const deltatune::Error&) {
  }
  return 0;
}

// A file the corpus script wrote for the targets (tools/make_fuzz_corpus.py, assets/): from
// $DELTATUNE_FUZZ_ASSETS, else the build folder's. Empty where it is missing: the target then
// still runs, its reader refusing at the missing file.
inline std::vector<char> asset(const std::string& name) {
  const char* env = std::getenv("DELTATUNE_FUZZ_ASSETS");
  const std::string path = std::string(env ? env : DELTATUNE_FUZZ_ASSETS_DIR) + "/" + name;
  std::vector<char> bytes;
  if (std::FILE* f = std::fopen(path.c_str(), "rb")) {
    char buffer[65536];
    for (std::size_t n; (n = std::fread(buffer, 1, sizeof buffer, f)) > 0;) bytes.insert(bytes.end(), buffer, buffer + n);
    std::fclose(f);
  } else {
    std::fprintf(stderr, "fuzz: no asset %s (run tools/make_fuzz_corpus.py); the reader will refuse at it\n",
                 path.c_str());
  }
  return bytes;
}

}  // namespace deltatune::fuzz
