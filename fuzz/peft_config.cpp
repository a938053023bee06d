// load_peft on a folder whose adapter_config.json is the input, beside the adapter_model.safetensors
// peft saved for a LoRA on the tiny BERT (assets/peft_lora/).
#include "fuzz_support.hpp"
#include "tiny_bert.hpp"

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  deltatune::fuzz::Scratch::get().keep("adapter_model.safetensors",
                                       deltatune::fuzz::asset("peft_lora/adapter_model.safetensors"));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const deltatune::fuzz::InputFile file("adapter_config.json", data, size);
  return deltatune::fuzz::expect_refusal_or_success(
      [&] { deltatune::fuzz::load_peft_onto_tiny_bert(deltatune::fuzz::Scratch::get().dir()); });
}
