// t5_bench: our T5 (backbones/t5.hpp) at T5-base's shape with random weights: a forward pass
// (eval, no grad) and a forward + backward pass (training mode, gradients to the layer norms
// only, as delta tuning backpropagates through the frozen backbone), median milliseconds.
// benchmarks/t5_bench.py runs this and transformers with the same flags and prints the ratios.
//
// Prints one JSON line (prefix "JSON ").
//   t5_bench [--d-model 768] [--layers 12] [--heads 12] [--d-kv 64] [--d-ff 3072] [--vocab 32128]
//            [--ffn relu|gated-gelu] [--batch 8] [--src 128] [--tgt 8] [--reps 5] [--warmup 1]
#include <deltatune/backbones/t5.hpp>

#include "timing.hpp"

#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace bb = deltatune::backbones;

namespace {

double median_ms(const std::function<void()>& step, int reps, int warmup) {
  return deltatune::bench::median(deltatune::bench::times_ms(step, reps, warmup));
}

}  // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags{{"--d-model", "768"}, {"--layers", "12"}, {"--heads", "12"},
                                           {"--d-kv", "64"},     {"--d-ff", "3072"},  {"--vocab", "32128"},
                                           {"--ffn", "relu"},    {"--batch", "8"},    {"--src", "128"},
                                           {"--tgt", "8"},       {"--reps", "5"},     {"--warmup", "1"}};
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!flags.count(argv[i])) {
      std::cerr << "t5_bench: unknown flag " << argv[i] << "\n";
      return 2;
    }
    flags[argv[i]] = argv[i + 1];
  }
  auto num = [&](const char* flag) { return std::stoll(flags[flag]); };
  const auto config = bb::T5Config()
                          .d_model(num("--d-model"))
                          .num_layers(num("--layers"))
                          .num_heads(num("--heads"))
                          .d_kv(num("--d-kv"))
                          .d_ff(num("--d-ff"))
                          .vocab_size(num("--vocab"))
                          .feed_forward_proj(flags["--ffn"])
                          .tie_word_embeddings(flags["--ffn"] == "relu");
  torch::manual_seed(0);
  bb::T5Model model(config);
  for (auto& p : model->named_parameters())
    if (p.key().find("layer_norm.weight") != std::string::npos) p.value().set_requires_grad(true);
  const int64_t batch = num("--batch"), src = num("--src"), tgt = num("--tgt");
  auto input_ids = torch::randint(2, config.vocab_size(), {batch, src}, torch::kLong);
  auto attention_mask = torch::ones_like(input_ids);
  auto labels = torch::randint(2, config.vocab_size(), {batch, tgt}, torch::kLong);
  const int reps = int(num("--reps")), warmup = int(num("--warmup"));

  model->eval();
  const double forward = median_ms(
      [&] {
        torch::NoGradGuard no_grad;
        model->forward(input_ids, attention_mask, {}, labels);
      },
      reps, warmup);
  model->train();
  const double backward = median_ms(
      [&] {
        model->zero_grad();
        model->forward(input_ids, attention_mask, {}, labels).loss.backward();
      },
      reps, warmup);
  std::cout << fmt::format("JSON {{\"impl\":\"deltatune\",\"threads\":{},\"forward_ms\":{:.3f},"
                           "\"forward_backward_ms\":{:.3f}}}\n",
                           at::get_num_threads(), forward, backward);
  return 0;
}
