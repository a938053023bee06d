// finetune_t5: deltatune's main job end to end. Freezes a T5, attaches one delta-tuning
// method (or several, joined with '+'), trains only the delta on a GLUE task cast as text to
// text, evaluates on dev, saves the delta, reloads it into a fresh model and checks that the
// reloaded model predicts the same dev labels. Flags, methods and the run itself are shared
// with finetune_bert (finetune_common.hpp).
//
// With --model and --data it reads a Hugging Face T5 and a GLUE folder. Without them it needs
// nothing from outside: it generates a small sentiment task, builds a word-level vocabulary
// and a small random T5, pretrains that T5 fully on denoising the generated text (a stand-in
// for real pretraining), freezes it and tunes the delta.
//   finetune_t5                                            # the built-in task, Houlsby adapters
//   finetune_t5 --model t5-small --data glue/RTE --task rte --method lora
#include "finetune_common.hpp"

#include <algorithm>
#include <filesystem>
#include <iostream>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace dt = deltatune;
namespace bb = deltatune::backbones;
using finetune::Flags;
using finetune::split;
using finetune::Tokenizer;
using finetune::UsageError;

namespace {

const char* const kIntro = R"(finetune_t5: delta-tune a frozen T5 on a GLUE task (text to text).

  --model DIR|FILE     Hugging Face T5 folder or TorchScript archive (default: a small random
                       T5, pretrained here on denoising a generated task)
  --tokenizer FILE     SentencePiece model (default: <model>/spiece.model)
  --pretrain-steps N   the built-in T5's denoising updates (default 600)
)";

// The built-in T5's denoising updates unless --pretrain-steps says.
int64_t pretrain_steps(const Flags& flags) { return flags.pretrain_steps >= 0 ? flags.pretrain_steps : 600; }

// ---------------------------------------------------------------------------------------------
// Data: text-to-text pairs, and the tokenizer that turns them into ids.

struct Example {
  std::string source, target;
  double label;  // class id, or STS-B's score
};

std::vector<Example> to_text_to_text(const dt::GlueTask& task, const std::vector<dt::GlueExample>& data) {
  std::vector<Example> out;
  for (const auto& e : data) {
    const auto t5 = dt::to_t5(task, e);
    out.push_back({t5.source, t5.target, finetune::label_of(task, e)});
  }
  return out;
}

// Every source and target text: the built-in task's word-level vocabulary.
std::vector<std::string> texts_of(const std::vector<Example>& data) {
  std::vector<std::string> out;
  for (const auto& e : data) out.push_back(e.source), out.push_back(e.target);
  return out;
}

// Token ids of every example, and padded batches of them.
struct Encoded {
  std::vector<std::vector<int64_t>> source, target;
};

Encoded encode_all(const Tokenizer& tok, const std::vector<Example>& data, int64_t max_length) {
  Encoded out;
  for (const auto& e : data) {
    out.source.push_back(tok.encode(e.source, max_length));
    out.target.push_back(tok.encode(e.target, 16));
  }
  return out;
}

struct Batch {
  torch::Tensor input_ids, attention_mask, labels;  // (B, S), (B, S), (B, T) with -100 on padding
};

// The examples `pick`, on `device`.
Batch make_batch(const Encoded& data, const std::vector<int64_t>& pick, const torch::Device& device) {
  auto ids = finetune::pad(data.source, pick, 0).to(device);
  return {ids, (ids != 0).to(torch::kLong), finetune::pad(data.target, pick, -100).to(device)};
}

dt::BatchSource<Batch> batches(const Encoded& data, int64_t batch_size, int64_t seed, const torch::Device& device,
                               std::vector<int64_t> lengths = {}, const finetune::Ranks& ranks = {}) {
  return finetune::shuffled_batches<Batch>(
      int64_t(data.source.size()), batch_size, seed,
      [&data, device](const std::vector<int64_t>& pick) { return make_batch(data, pick, device); }, std::move(lengths),
      ranks);
}

// ---------------------------------------------------------------------------------------------
// Model: a pretrained T5, or the built-in small random one pretrained here on denoising.

bb::T5Config small_config(int64_t vocab_size) {
  return bb::T5Config().vocab_size(vocab_size).d_model(128).d_kv(32).d_ff(256).num_layers(2).num_heads(4)
      .relative_attention_num_buckets(16).dropout_rate(0.0).feed_forward_proj("gated-gelu");
}

bb::T5Model build_small_t5(int64_t vocab_size, int64_t seed) {
  torch::manual_seed(uint64_t(seed));
  return bb::T5Model(small_config(vocab_size));
}

// Denoising data from the train sources alone (no labels): 15% of the words (at least one)
// become <mask>, and the target lists the masked words in order.
Encoded denoising_data(const Encoded& train, int64_t mask_id, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Encoded out;
  for (const auto& source : train.source) {
    auto noisy = source;
    std::vector<int64_t> target;
    const size_t words = source.size() - 1;  // eos stays
    const size_t forced = rng() % words;
    for (size_t i = 0; i < words; ++i)
      if (i == forced || rng() % 100 < 15) target.push_back(noisy[i]), noisy[i] = mask_id;
    target.push_back(1);
    out.source.push_back(noisy);
    out.target.push_back(target);
  }
  return out;
}

// Trains every weight of the small T5 on denoising: the stand-in for pretraining. On the CPU
// whatever --device says: every rank of a launch must come out with the same weights, which
// CUDA's atomic adds (an embedding's backward) do not promise.
void pretrain_small_t5(bb::T5Model& t5, const Encoded& denoise, const Flags& flags) {
  for (auto& p : t5->parameters()) p.set_requires_grad(true);
  t5->train();
  auto loss_fn = [&t5](const Batch& b) { return t5->forward(b.input_ids, b.attention_mask, {}, b.labels).loss; };
  dt::Trainer<Batch> trainer(dt::TrainerOptions().max_steps(pretrain_steps(flags)).lr(3e-3).warmup_steps(50)
                                 .seed(uint64_t(flags.seed)).log_every(50),
                             dt::named_tensors(t5->named_parameters()), loss_fn,
                             batches(denoise, 64, flags.seed + 1, torch::kCPU));
  const auto summary = trainer.fit();
  std::cout << fmt::format("pretraining stand-in: {} updates, final denoising loss {:.3f}\n", summary.steps,
                           summary.final_loss);
  for (auto& p : t5->parameters()) p.set_requires_grad(false);
  t5->eval();
}

void save_backbone(bb::T5Model& t5, const std::string& path) {
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& p : t5->named_parameters()) tensors[p.key()] = p.value().detach();
  dt::write_safetensors(path, tensors, {{"format", "pt"}});
}

bb::T5Model load_backbone(const std::string& path, int64_t vocab_size) {
  bb::T5Model t5(small_config(vocab_size));
  auto file = dt::read_safetensors(path);
  torch::NoGradGuard no_grad;
  for (auto& p : t5->named_parameters()) {
    const auto it = file.tensors.find(p.key());
    dt::detail::check<dt::CheckpointError>(it != file.tensors.end() && it->second.sizes() == p.value().sizes(),
                                           "{}: no tensor {} of shape {}; it was written for another vocabulary or "
                                           "model size: delete it or choose another --out", path, p.key(),
                                           p.value().sizes());
    p.value().copy_(it->second);
  }
  t5->eval();
  return t5;
}

// ---------------------------------------------------------------------------------------------
// Evaluation: greedy decoding, the output text mapped back to a label (or score).

std::vector<double> predict(bb::T5Model& t5, const Tokenizer& tok, const dt::GlueTask& task, const Encoded& dev,
                            int64_t batch_size, const std::vector<int64_t>& rows) {
  t5->eval();
  std::vector<double> out;
  for (size_t begin = 0; begin < rows.size(); begin += size_t(batch_size)) {
    const std::vector<int64_t> pick(rows.begin() + begin, rows.begin() + std::min(rows.size(), begin + size_t(batch_size)));
    const auto b = make_batch(dev, pick, t5->parameters().front().device());
    const auto ids = t5->generate_greedy(b.input_ids, b.attention_mask, 5).cpu();
    for (int64_t r = 0; r < ids.size(0); ++r) {
      auto row = ids[r].slice(0, 1);
      const auto text = tok.decode(std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel()));
      out.push_back(task.regression() ? dt::from_t5_score(text) : double(dt::from_t5_label(task, text)));
    }
  }
  t5->train();
  return out;
}

// ---------------------------------------------------------------------------------------------

int run(const Flags& flags) {
  if (!flags.combine.empty()) throw UsageError("--combine is finetune_bert's (its task heads); finetune_t5 has none");
  if (flags.head_lr > 0) throw UsageError("--head-lr is finetune_bert's: T5 answers in words, with no task head");
  const auto& task = dt::glue_task(flags.task);
  const auto methods = finetune::parse_methods(flags.method);
  const auto ranks = finetune::join_launch(flags);
  std::filesystem::create_directories(flags.out);
  const auto splits = finetune::read_splits(flags, task);
  const bool builtin = splits.builtin;
  // Threads spin on a shared machine, and the built-in model's matrices are too small to split.
  if (flags.threads > 0 || builtin) torch::set_num_threads(int(flags.threads > 0 ? flags.threads : 1));
  const auto train = to_text_to_text(task, splits.train), dev = to_text_to_text(task, splits.dev);
  std::cout << fmt::format("  e.g. \"{}\" -> \"{}\"\n", train.front().source, train.front().target);

  // Model.
  std::optional<Tokenizer> tok;
  if (builtin) tok.emplace(texts_of(train));
  else tok.emplace(finetune::tokenizer_path(flags.model, flags.tokenizer, "spiece.model", "T5's spiece.model"));
  const auto train_ids = encode_all(*tok, train, flags.max_length);
  const auto dev_ids = encode_all(*tok, dev, flags.max_length);

  const auto backbone_path = flags.out + "/backbone.safetensors";
  bb::T5Model t5{nullptr};
  const bool pretrain_here = builtin && !(flags.resume && std::filesystem::exists(backbone_path));
  if (!builtin) {
    t5 = bb::load_t5(flags.model, bb::T5LoadOptions().dtype(finetune::frozen_dtype(flags, methods)));
    std::cout << fmt::format("backbone: {} (pretrained, {})\n", flags.model, finetune::backbone_role(methods));
  } else if (!pretrain_here) {
    t5 = load_backbone(backbone_path, tok->vocab_size());
    std::cout << fmt::format("backbone: the small T5 pretrained earlier, from {}\n", backbone_path);
  } else {
    t5 = build_small_t5(tok->vocab_size(), flags.seed);
    std::cout << fmt::format("backbone: a small T5 with RANDOM initial weights (vocabulary {} words, d_model {}, {} "
                             "layers); no pretrained model is used.\n  Stand-in for pretraining: all its weights "
                             "train for {} updates on denoising the train sentences (masked words, no labels).\n",
                             tok->vocab_size(), t5->config.d_model(), t5->config.num_layers(), pretrain_steps(flags));
  }
  finetune::check_delta_sizes(flags, *t5);  // before the pretraining a refused size would waste
  if (pretrain_here) {
    if (pretrain_steps(flags) > 0)
      pretrain_small_t5(t5, denoising_data(train_ids, tok->mask_id(), uint64_t(flags.seed)), flags);
    // Every rank pretrains alike (seeded, one thread; tune() compares the fingerprints), rank 0 saves.
    if (ranks.main()) save_backbone(t5, backbone_path);
  }
  dt::set_frozen_dtype(*t5, finetune::frozen_dtype(flags, methods));  // the built-in T5's, after pretraining in float32
  t5->to(finetune::run_device(flags));
  t5->train();  // dropout while tuning; predict() switches to eval

  // Delta, and the run.
  dt::DeltaModel model(t5);
  finetune::attach(model, methods, flags, flags.seed);
  finetune::Job<Batch> job;
  job.task = &task;
  job.family = "t5";
  job.deltas = methods;
  job.model = &model;
  job.loss_fn = [&t5](const Batch& b) { return t5->forward(b.input_ids, b.attention_mask, {}, b.labels).loss; };
  job.batches = batches(train_ids, flags.batch_size, flags.seed, finetune::run_device(flags),
                        finetune::lengths_if_grouped(flags, train_ids.source), ranks);
  job.train_examples = int64_t(train.size());
  job.default_epochs = builtin ? 10 : 20;  // Compacter's GLUE set-up: 20
  job.builtin = builtin;
  job.dev_labels = finetune::labels_of(task, splits.dev);
  job.predict = [&](const std::vector<int64_t>& rows) { return predict(t5, *tok, task, dev_ids, 128, rows); };
  job.predict_reloaded = [&](const std::string& dir) {
    auto fresh = builtin ? load_backbone(backbone_path, tok->vocab_size()) : bb::load_t5(flags.model);
    dt::set_frozen_dtype(*fresh, finetune::frozen_dtype(flags, methods));
    fresh->to(finetune::run_device(flags));
    dt::DeltaModel reloaded(fresh);
    for (const auto& m : methods) reloaded.load(m, dir + "/" + m);  // rebuilt from the saved files alone
    return predict(fresh, *tok, task, dev_ids, 128, finetune::all_rows(int64_t(dev_ids.source.size())));
  };
  job.ranks = ranks;
  return finetune::tune(flags, job);
}

}  // namespace

int main(int argc, char** argv) {
  Flags defaults;
  defaults.out = "runs/finetune_t5";
  return finetune::run_main(argc, argv, "finetune_t5", std::string(kIntro) + finetune::kCommonUsage, defaults, run);
}
