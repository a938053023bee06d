// A check that the process was linked with SentencePiece before LibTorch.
//
// libc10 (LibTorch) and Debian's libsentencepiece both export the global FLAGS_minloglevel:
// an int in c10, an absl::Flag<int> of 24 bytes in SentencePiece. The dynamic linker binds
// every reference to the first definition in load order. When libc10 comes first,
// SentencePiece's static constructor builds its flag over c10's int and the bytes after it,
// among them the mutex that c10::GetEventSampledHandler locks on every TorchScript forward,
// which then never returns. The target deltatune::deltatune links SentencePiece first; this
// check turns a program linked the other way into an error before the first forward.
#pragma once

#include <dlfcn.h>

#include <string>

#include <deltatune/core/error.hpp>

namespace deltatune::detail {

// The file of the loaded library that defines the global `symbol` the process binds to,
// or "" when none does.
inline std::string defining_library(const char* symbol) {
  void* address = dlsym(RTLD_DEFAULT, symbol);
  Dl_info info{};
  if (address == nullptr || dladdr(address, &info) == 0 || info.dli_fname == nullptr) return "";
  return info.dli_fname;
}

inline bool library_loaded(const char* soname) {
  void* handle = dlopen(soname, RTLD_LAZY | RTLD_NOLOAD);
  if (handle != nullptr) dlclose(handle);
  return handle != nullptr;
}

// Throws when SentencePiece is loaded and FLAGS_minloglevel is bound to libc10's definition
// (`owner`): SentencePiece has then already written over libc10's memory.
inline void check_link_order(bool sentencepiece_loaded, const std::string& owner) {
  check(!sentencepiece_loaded || owner.find("libc10") == std::string::npos,
        "this program links LibTorch before SentencePiece, so SentencePiece's FLAGS_minloglevel was "
        "built over libc10's ({}) and a TorchScript forward would hang on the memory it overwrote; "
        "link SentencePiece first: link deltatune::deltatune (it does so) before torch, or put "
        "-lsentencepiece before the LibTorch libraries on the link line",
        owner);
}

inline void check_link_order() {
  check_link_order(library_loaded("libsentencepiece.so.0"), defining_library("FLAGS_minloglevel"));
}

}  // namespace deltatune::detail
