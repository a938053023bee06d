// load_adapters on a folder whose adapter_config.json is the input, beside the adapter.safetensors
// adapters saved for a Houlsby adapter on the tiny BERT classifier (assets/adapters_houlsby/).
#include "fuzz_support.hpp"
#include "tiny_bert.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  deltatune::fuzz::Scratch::get().keep("adapter.safetensors",
                                       deltatune::fuzz::asset("adapters_houlsby/adapter.safetensors"));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const deltatune::fuzz::InputFile file("adapter_config.json", data, size);
  return deltatune::fuzz::expect_refusal_or_success(
      [&] { deltatune::fuzz::load_adapters_onto_tiny_bert(deltatune::fuzz::Scratch::get().dir()); });
}
