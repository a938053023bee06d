// A BERT config.json, read as read_hf_directory reads it, then bert_config.
#include "fuzz_support.hpp"

#include <deltatune/backbones/bert.hpp>
#include <deltatune/core/json_file.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const deltatune::fuzz::InputFile file("config.json", data, size);
  return deltatune::fuzz::expect_refusal_or_success([&] {
    deltatune::backbones::Checkpoint checkpoint;
    checkpoint.source = deltatune::fuzz::Scratch::get().dir();
    checkpoint.config = deltatune::read_json_file(file.path());
    deltatune::backbones::bert_config(checkpoint);
  });
}
