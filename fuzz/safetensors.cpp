// read_safetensors on any bytes.
#include "fuzz_support.hpp"

#include <deltatune/core/safetensors.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const deltatune::fuzz::InputFile file("model.safetensors", data, size);
  return deltatune::fuzz::expect_refusal_or_success([&] { deltatune::read_safetensors(file.path()); });
}
