// What read_safetensors makes of each file named on the command line, for the differential
// test against Python's safetensors (tools/safetensors_differential.py prints the same there):
//   accept <file>                                   then, by name,
//     <tensor> <dtype> [<shape>] <FNV-1a 64 of its bytes, hex>
//   reject <file>                                   a deltatune::Error
//   crash <file>: <what>                            any other exception: a bug either way
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>

#include <torch/torch.h>

#include <deltatune/core/safetensors.hpp>

namespace {

std::uint64_t fnv1a(const torch::Tensor& t) {
  const auto bytes = t.contiguous();
  const auto* p = static_cast<const unsigned char*>(bytes.data_ptr());
  std::uint64_t h = 0xcbf29ce484222325ULL;
  for (std::size_t i = 0; i < bytes.nbytes(); ++i) h = (h ^ p[i]) * 0x100000001b3ULL;
  return h;
}

void dump(const std::string& path) {
  const auto name = std::filesystem::path(path).filename().string();
  try {
    const auto file = deltatune::read_safetensors(path);
    std::printf("accept %s\n", name.c_str());
    for (const auto& [key, t] : file.tensors) {
      const auto& dtype = deltatune::detail::safetensors_dtypes()[deltatune::detail::safetensors_dtype_index(t.scalar_type())];
      std::printf("  %s %s [%s] %016llx\n", key.c_str(), dtype.name, fmt::format("{}", fmt::join(t.sizes(), ", ")).c_str(),
                  static_cast<unsigned long long>(fnv1a(t)));
    }
  } catch (const deltatune::Error&) {
    std::printf("reject %s\n", name.c_str());
  } catch (const std::exception& e) {
    const std::string what = e.what();  // c10::Error's goes on with a backtrace: its first line
    std::printf("crash %s: %s\n", name.c_str(), what.substr(0, what.find('\n')).c_str());
  }
}

}  // namespace

int main(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) dump(argv[i]);
  return 0;
}
