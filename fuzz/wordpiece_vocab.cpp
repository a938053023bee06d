// WordPieceTokenizer on any vocab.txt, then one encoding through it: the vocabulary must hold
// what encoding looks up, or be refused.
#include "fuzz_support.hpp"

#include <deltatune/text/wordpiece_tokenizer.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const deltatune::fuzz::InputFile file("vocab.txt", data, size);
  return deltatune::fuzz::expect_refusal_or_success([&] {
    const deltatune::WordPieceTokenizer tokenizer(file.path());
    tokenizer.encode("Hello, unaffable world!", "a pair", 16);
  });
}
