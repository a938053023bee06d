// A T5 config.json: parsed (a parse error is ours to report too), then T5Config::from_json.
#include "fuzz_support.hpp"

#include <deltatune/backbones/t5.hpp>
#include <deltatune/core/json_file.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const deltatune::fuzz::InputFile file("config.json", data, size);
  return deltatune::fuzz::expect_refusal_or_success(
      [&] { deltatune::backbones::T5Config::from_json(deltatune::read_json_file(file.path()), file.path()); });
}
