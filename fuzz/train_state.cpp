// load_train_state on any bytes, for one parameter "w" (2x3, float32) under a fresh AdamW: the
// layout tools/make_fuzz_corpus.py writes its seeds in.
#include "fuzz_support.hpp"

#include <torch/torch.h>

#include <deltatune/train/checkpoint_state.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const deltatune::fuzz::InputFile file("state.safetensors", data, size);
  auto w = torch::zeros({2, 3}, torch::requires_grad());
  torch::optim::AdamW optimizer({w});
  // The state restores the CPU generator; put it back so that runs stay independent.
  auto generator = at::detail::getDefaultCPUGenerator();
  const auto saved = generator.get_state();
  const int status = deltatune::fuzz::expect_refusal_or_success(
      [&] { deltatune::load_train_state(file.path(), {{"w", w}}, optimizer); });
  generator.set_state(saved);
  return status;
}
