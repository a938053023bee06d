// T5Tokenizer on any spiece.model (SentencePiece's protobuf), then one encoding through it.
#include "fuzz_support.hpp"

#include <deltatune/text/sentencepiece_tokenizer.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const deltatune::fuzz::InputFile file("spiece.model", data, size);
  return deltatune::fuzz::expect_refusal_or_success([&] {
    const deltatune::T5Tokenizer tokenizer(file.path());
    tokenizer.decode(tokenizer.encode("translate English to German: Hello <extra_id_0> world"));
  });
}
