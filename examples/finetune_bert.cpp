// finetune_bert: delta-tunes a frozen BERT with a classification (or, for STS-B, regression)
// head on a GLUE task. One delta-tuning method (or several, joined with '+') and the head
// train; the rest of BERT stays frozen. Evaluates on dev, saves the delta and the head,
// reloads them into a fresh model and checks that it predicts the same dev labels.
//
// The head (`classifier`, on the pooled [CLS] output) is new for every task, so every method
// trains it, as peft's modules_to_save and adapters' prediction heads do: it is a delta of its
// own here, "head" (spec tuning of classifier.*), saved and counted with the method's.
//
// With --model and --data it reads a Hugging Face BERT (a folder, e.g. sentence-transformers'
// all-MiniLM-L6-v2, or a TorchScript archive) and a GLUE folder. Without them it needs nothing
// from outside: it generates a small sentiment task and tunes a tiny BERT with RANDOM weights.
//   finetune_bert                                                    # built-in task, Houlsby adapters
//   finetune_bert --model all-MiniLM-L6-v2 --data glue/SST-2 --task sst2 --method lora
//
// With --combine it trains nothing: it loads the LoRA deltas of earlier runs, combines them
// (combine_lora, peft's add_weighted_adapter) and reports --task's dev metric for each delta
// alone and for the combination, with the head of the run trained on --task.
//   finetune_bert --model ... --data glue/SST-2 --task sst2 --combine runs/sst2,runs/mrpc --combine-how ties
#include "finetune_common.hpp"

#include <algorithm>
#include <iostream>
#include <numeric>
#include <string>
#include <vector>

namespace dt = deltatune;
namespace bb = deltatune::backbones;
using finetune::Flags;
using finetune::UsageError;

namespace {

const char* const kIntro = R"(finetune_bert: delta-tune a frozen BERT with a classification head on a GLUE task.

  --model DIR|FILE     Hugging Face BERT folder or TorchScript archive (default: a tiny BERT
                       with random weights, for the generated task)
  --tokenizer FILE     WordPiece vocab.txt (default: <model>/vocab.txt)
  --combine RUN,RUN... train nothing: the LoRA deltas of earlier runs (their --out folders, on this
                       backbone and --seed), each alone and combined, on --task's dev set, with the
                       head of the run trained on --task; writes <out>/combination.json
  --combine-how HOW    linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune (default ties)
  --combine-weights W,W...  one weight per run (default 1 each)
  --density X          ties, dare_*, magnitude_prune: the share of entries kept (default 0.5)
  --head-lr X          the new task head's peak learning rate (default: --lr, at which peft's
                       modules_to_save train too)
)";

// The examples' first texts: the built-in task's vocabulary.
std::vector<std::string> texts_of(const std::vector<dt::GlueExample>& data) {
  std::vector<std::string> out;
  for (const auto& e : data) out.push_back(e.text_a);
  return out;
}

// Token ids, segments and labels of every example.
struct Encoded {
  std::vector<std::vector<int64_t>> ids, types;
  std::vector<double> labels;
};

Encoded encode_all(const dt::WordPieceTokenizer& tok, const dt::GlueTask& task,
                   const std::vector<dt::GlueExample>& data, int64_t max_length) {
  Encoded out;
  for (const auto& e : data) {
    auto enc = e.text_b ? tok.encode(e.text_a, *e.text_b, max_length) : tok.encode(e.text_a, max_length);
    out.ids.push_back(std::move(enc.ids));
    out.types.push_back(std::move(enc.type_ids));
    out.labels.push_back(finetune::label_of(task, e));
  }
  return out;
}

struct Batch {
  torch::Tensor input_ids, attention_mask, token_type_ids;  // (B, T), padded to the batch's longest
  torch::Tensor labels;                                     // (B) class ids, or floats for regression
};

// The examples `pick`, on `device`.
Batch make_batch(const Encoded& data, const std::vector<int64_t>& pick, bool regression, int64_t pad_id,
                 const torch::Device& device) {
  auto raw = finetune::pad(data.ids, pick, -1);
  auto mask = raw.ge(0);
  std::vector<double> labels;
  for (const auto i : pick) labels.push_back(data.labels[size_t(i)]);
  auto y = torch::tensor(labels, torch::kDouble).to(regression ? torch::kFloat : torch::kLong);
  return {raw.masked_fill(~mask, pad_id).to(device), mask.to(device, torch::kLong),
          finetune::pad(data.types, pick, 0).to(device), y.to(device)};
}

// Dev predictions of `rows`: class ids (argmax), or the regression head's scores. Batches of
// similar lengths, so that little is padded; the answers come back in the order of `rows`.
std::vector<double> predict(bb::BertForSequenceClassification& bert, const Encoded& dev, bool regression,
                            int64_t pad_id, const std::vector<int64_t>& rows) {
  bert->eval();
  torch::NoGradGuard no_grad;
  std::vector<int64_t> order(rows.size());
  std::iota(order.begin(), order.end(), 0);
  const auto length = [&](int64_t k) { return dev.ids[size_t(rows[size_t(k)])].size(); };
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return length(a) < length(b); });
  std::vector<double> out(rows.size());
  for (size_t begin = 0; begin < order.size(); begin += 128) {
    std::vector<int64_t> pick;
    for (size_t k = begin; k < std::min(order.size(), begin + 128); ++k) pick.push_back(rows[size_t(order[k])]);
    const auto b = make_batch(dev, pick, regression, pad_id, bert->classifier->weight.device());
    auto logits = bert->forward(b.input_ids, b.attention_mask, b.token_type_ids).logits;  // (B, labels)
    auto answer = (regression ? logits.select(1, 0) : logits.argmax(1)).to(torch::kCPU, torch::kDouble).contiguous();
    for (size_t r = 0; r < pick.size(); ++r) out[size_t(order[begin + r])] = answer[int64_t(r)].item<double>();
  }
  bert->train();
  return out;
}

// Width 128, as the built-in T5's: Compacter's reduction 32 leaves a bottleneck of 4, which its
// n = 4 Kronecker factors divide.
bb::BertConfig tiny_config(int64_t vocab_size, int64_t num_labels) {
  return bb::BertConfig().vocab_size(vocab_size).hidden_size(128).num_hidden_layers(2).num_attention_heads(4)
      .intermediate_size(256).max_position_embeddings(256).num_labels(num_labels);
}

// A regression head starts at the training targets' mean (STS-B's: about 2.7 on 0..5). AdamW
// moves a bias about lr per step, so from 0 a delta-tuned head would spend its few hundred
// steps on the offset rather than on the ranking the metric measures.
void start_at_mean(bb::BertForSequenceClassificationImpl& bert, const std::vector<double>& targets) {
  torch::NoGradGuard no_grad;
  bert.classifier->bias.fill_(std::accumulate(targets.begin(), targets.end(), 0.0) / double(targets.size()));
}

// The backbone with its head, seeded, on --device: the head's initial values (and the tiny
// BERT's weights) come out the same in the fresh model of the reload check, whose fingerprint
// must match.
bb::BertForSequenceClassification load_backbone(const Flags& flags, const dt::GlueTask& task, int64_t vocab_size,
                                                const Encoded& train) {
  torch::manual_seed(uint64_t(flags.seed));
  const auto dtype = finetune::frozen_dtype(flags, finetune::parse_methods(flags.method));
  auto bert = flags.model.empty() ? bb::BertForSequenceClassification(tiny_config(vocab_size, task.num_labels()))
                                  : bb::load_bert_classifier(flags.model, task.num_labels(), true, dtype);
  dt::set_frozen_dtype(*bert, dtype);  // the tiny one's (a loaded one is already)
  if (task.regression()) start_at_mean(*bert, train.labels);
  bert->to(finetune::run_device(flags));
  bert->train();  // dropout while tuning; predict() switches to eval
  return bert;
}

// The method's deltas and the head: spec tuning of the classifier.
void attach_all(dt::DeltaModel& model, const std::vector<std::string>& methods, const Flags& flags, int64_t seed) {
  finetune::attach(model, methods, flags, seed);
  model.add("head", dt::SpecTuningOptions().modules({"classifier.*"}));
}

// The task's examples, tokenised, and the thread count set: where training and --combine start.
struct TaskData {
  finetune::Splits splits;
  dt::WordPieceTokenizer tok;
  Encoded train, dev;
};

TaskData read_task(const Flags& flags, const dt::GlueTask& task) {
  std::filesystem::create_directories(flags.out);
  auto splits = finetune::read_splits(flags, task);
  // Threads spin on a shared machine, and the tiny model's matrices are too small to split.
  if (flags.threads > 0 || splits.builtin) torch::set_num_threads(int(flags.threads > 0 ? flags.threads : 1));
  dt::WordPieceTokenizer tok(splits.builtin ? finetune::write_word_vocabulary(texts_of(splits.train), flags.out, "finetune_bert's vocab.txt")
                                            : finetune::tokenizer_path(flags.model, flags.tokenizer, "vocab.txt", "BERT's vocab.txt"));
  auto train = encode_all(tok, task, splits.train, flags.max_length);
  auto dev = encode_all(tok, task, splits.dev, flags.max_length);
  return {std::move(splits), std::move(tok), std::move(train), std::move(dev)};
}

// ---- --combine: earlier runs' LoRA deltas, each alone and combined, on one task's dev set ----

// An earlier run: its --out folder, the task it trained and its method (its best delta is
// <dir>/best/<method>, its head <dir>/best/head).
struct EarlierRun {
  std::string dir, task, method;
};

EarlierRun read_run(const std::string& dir) {
  const auto path = dir + "/results.json";
  if (!std::filesystem::exists(path))
    throw UsageError(fmt::format("--combine {}: no results.json there; give the --out folders of finished "
                                 "finetune_bert runs", dir));
  const dt::JsonFields results(dt::read_json_file(path), path);
  EarlierRun run{dir, results.get<std::string>("task"), results.get<std::string>("method")};
  if (finetune::parse_methods(run.method).size() != 1)
    throw UsageError(fmt::format("--combine {}: the run trained {}; give runs of one LoRA method", dir, run.method));
  return run;
}

std::vector<double> combine_weights(const Flags& flags, size_t runs) {
  if (flags.combine_weights.empty()) return std::vector<double>(runs, 1.0);
  std::vector<double> weights;
  for (const auto& w : finetune::split(flags.combine_weights, ','))
    weights.push_back(finetune::to_number<double>("--combine-weights", w));
  if (weights.size() != runs)
    throw UsageError(fmt::format("--combine-weights {}: {} weights for {} runs", flags.combine_weights, weights.size(), runs));
  return weights;
}

// Loads run `run`'s best delta as `name`; a delta of another backbone is named with the flags
// that make backbones differ (the head's shape and seeded initial values are part of it).
void load_run_delta(dt::DeltaModel& model, const std::string& name, const std::string& dir) {
  try {
    model.load(name, dir);
  } catch (const dt::CheckpointError& e) {
    throw dt::CheckpointError(fmt::format("--combine: {}\nthe runs must share --model, --seed and the number of "
                                          "labels, which the backbone and its new head come from", e.what()));
  }
}

int run_combination(const Flags& flags) {
  const auto& task = dt::glue_task(flags.task);
  std::vector<EarlierRun> runs;
  for (const auto& dir : finetune::split(flags.combine, ',')) runs.push_back(read_run(dir));
  if (runs.size() < 2) throw UsageError("--combine needs two or more run folders, separated by commas");
  const auto weights = combine_weights(flags, runs.size());
  const auto head = std::find_if(runs.begin(), runs.end(), [&](const EarlierRun& r) { return r.task == task.name; });
  if (head == runs.end())
    throw UsageError(fmt::format("--combine: no run was trained on --task {}, whose head the dev set needs", task.name));
  const auto data = read_task(flags, task);
  const auto& tok = data.tok;
  const auto& dev_ids = data.dev;
  auto bert = load_backbone(flags, task, tok.vocab_size(), data.train);
  dt::DeltaModel model(bert);
  std::vector<std::pair<std::string, double>> inputs;
  for (size_t i = 0; i < runs.size(); ++i) {
    inputs.emplace_back(fmt::format("run{}", i + 1), weights[i]);
    load_run_delta(model, inputs.back().first, runs[i].dir + "/best/" + runs[i].method);
  }
  load_run_delta(model, "head", head->dir + "/best/head");
  try {
    dt::combine_lora(model, "combined", inputs,
                     dt::LoRACombineOptions().how(flags.combine_how).density(flags.density).seed(uint64_t(flags.seed)));
  } catch (const dt::OptionError& e) {
    throw UsageError(fmt::format("--combine with --combine-how {}: {}", flags.combine_how, e.what()));
  }

  // Each delta alone (with the head), then the combination.
  const auto& metric_name = task.metrics.front();
  const auto how = fmt::format("{}{}", flags.combine_how,
                               flags.combine_how == "ties" || flags.combine_how.rfind("dare", 0) == 0 ||
                                       flags.combine_how == "magnitude_prune"
                                   ? fmt::format(", density {:g}", flags.density) : "");
  std::cout << fmt::format("\n| {:<30} | {:<40} | {:>12} |\n|{:-<32}|{:-<42}|{:->14}|\n", "delta",
                           "trained on", "dev " + metric_name, "", "", "");
  nlohmann::json results = {{"task", task.name}, {"metric", metric_name}, {"how", flags.combine_how},
                            {"density", flags.density}, {"weights", weights}, {"command", flags.command}};
  for (size_t i = 0; i <= runs.size(); ++i) {
    const auto name = i < runs.size() ? inputs[i].first : std::string("combined");
    for (const auto& [other, w] : inputs) model.set_active(other, other == name);
    model.set_active("combined", name == "combined");
    const auto rows = finetune::all_rows(int64_t(dev_ids.ids.size()));
    const double value = dt::metric(metric_name, predict(bert, dev_ids, task.regression(), tok.pad_id(), rows),
                                    dev_ids.labels);
    const auto label = i < runs.size() ? name : fmt::format("combined ({})", how);
    const auto source = i < runs.size() ? fmt::format("{} ({}, {})", runs[i].dir, runs[i].task, runs[i].method)
                                        : fmt::format("weights {}", fmt::join(weights, ", "));
    std::cout << fmt::format("| {:<30} | {:<40} | {:>12.4f} |\n", label, source, value);
    results["deltas"][name] = {{"metric", value}, {"run", i < runs.size() ? runs[i].dir : ""}};
  }
  dt::detail::write_text_atomically(flags.out + "/combination.json", results.dump(2) + "\n", "combination.json");
  std::cout << fmt::format("\nhead from {}; results {}/combination.json\n", head->dir, flags.out);
  return 0;
}

int run(const Flags& flags) {
  if (!flags.combine.empty()) return run_combination(flags);
  if (flags.pretrain_steps >= 0) throw UsageError("--pretrain-steps is finetune_t5's (its built-in T5); finetune_bert "
                                                  "has no pretraining stand-in");
  const auto& task = dt::glue_task(flags.task);
  const auto methods = finetune::parse_methods(flags.method);
  const auto ranks = finetune::join_launch(flags);
  const auto data = read_task(flags, task);
  const auto& splits = data.splits;
  const auto& tok = data.tok;
  const auto& train_ids = data.train;
  const auto& dev_ids = data.dev;
  std::cout << fmt::format("  e.g. \"{}\"{} -> {}\n", splits.train.front().text_a,
                           splits.train.front().text_b ? " / \"" + *splits.train.front().text_b + "\"" : "",
                           train_ids.labels.front());

  auto bert = load_backbone(flags, task, tok.vocab_size(), train_ids);
  finetune::check_delta_sizes(flags, *bert);
  if (splits.builtin)
    std::cout << fmt::format("backbone: a tiny BERT with RANDOM weights (vocabulary {} words, hidden {}, {} layers); "
                             "no pretrained model is used, so expect far less than a real BERT gets\n",
                             tok.vocab_size(), bert->config.hidden_size(), bert->config.num_hidden_layers());
  else
    std::cout << fmt::format("backbone: {} (pretrained, {}), a new {}-output head on the pooled [CLS]\n", flags.model,
                             finetune::backbone_role(methods), task.num_labels());

  dt::DeltaModel model(bert);
  attach_all(model, methods, flags, flags.seed);

  const bool regression = task.regression();
  const int64_t pad_id = tok.pad_id();
  const auto device = finetune::run_device(flags);
  finetune::Job<Batch> job;
  job.task = &task;
  job.family = "bert";
  job.deltas = methods;
  job.deltas.push_back("head");
  job.model = &model;
  job.loss_fn = [&bert](const Batch& b) {
    return bert->forward(b.input_ids, b.attention_mask, b.token_type_ids, b.labels).loss;
  };
  job.batches = finetune::shuffled_batches<Batch>(int64_t(train_ids.ids.size()), flags.batch_size, flags.seed,
                                                  [&](const std::vector<int64_t>& pick) {
                                                    return make_batch(train_ids, pick, regression, pad_id, device);
                                                  },
                                                  finetune::lengths_if_grouped(flags, train_ids.ids), ranks);
  job.train_examples = int64_t(train_ids.ids.size());
  job.default_epochs = splits.builtin ? 10 : 3;  // BERT's GLUE fine-tuning: 3 epochs
  job.builtin = splits.builtin;
  job.dev_labels = dev_ids.labels;
  job.predict = [&](const std::vector<int64_t>& rows) { return predict(bert, dev_ids, regression, pad_id, rows); };
  job.predict_reloaded = [&](const std::string& dir) {
    auto fresh = load_backbone(flags, task, tok.vocab_size(), train_ids);
    dt::DeltaModel reloaded(fresh);
    for (const auto& d : job.deltas) reloaded.load(d, dir + "/" + d);  // rebuilt from the saved files alone
    return predict(fresh, dev_ids, regression, pad_id, finetune::all_rows(int64_t(dev_ids.ids.size())));
  };
  job.head_parameters = bert->classifier->weight.numel() + bert->classifier->bias.numel();
  job.head_prefix = "classifier.";  // spec tuning trains it in place, under the backbone's names
  job.ranks = ranks;
  return finetune::tune(flags, job);
}

}  // namespace

int main(int argc, char** argv) {
  Flags defaults;
  defaults.out = "runs/finetune_bert";
  // Prompt tuning's 100 prompts are Lester et al.'s, for T5. On MiniLM (SST-2, 2,000 examples,
  // 3 epochs) 20 learn as well (dev accuracy 0.690 against 0.689) in half the time and memory:
  // README, "Prompt tuning on MiniLM".
  defaults.prompt_tokens = 20;
  return finetune::run_main(argc, argv, "finetune_bert", std::string(kIntro) + finetune::kCommonUsage, defaults, run);
}
