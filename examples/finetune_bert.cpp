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
#include "finetune_common.hpp"

#include <cctype>
#include <iostream>
#include <numeric>
#include <set>
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
)";

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

Batch make_batch(const Encoded& data, const std::vector<int64_t>& pick, bool regression, int64_t pad_id) {
  auto raw = finetune::pad(data.ids, pick, -1);
  auto mask = raw.ge(0);
  std::vector<double> labels;
  for (const auto i : pick) labels.push_back(data.labels[size_t(i)]);
  auto y = torch::tensor(labels, torch::kDouble).to(regression ? torch::kFloat : torch::kLong);
  return {raw.masked_fill(~mask, pad_id), mask.to(torch::kLong), finetune::pad(data.types, pick, 0), y};
}

// Dev predictions: class ids (argmax), or the regression head's scores. Batches of similar
// lengths, so that little is padded; the answers come back in the data's order.
std::vector<double> predict(bb::BertForSequenceClassification& bert, const Encoded& dev, bool regression,
                            int64_t pad_id) {
  bert->eval();
  torch::NoGradGuard no_grad;
  std::vector<int64_t> order(dev.ids.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return dev.ids[a].size() < dev.ids[b].size(); });
  std::vector<double> out(dev.ids.size());
  for (size_t begin = 0; begin < order.size(); begin += 128) {
    const std::vector<int64_t> pick(order.begin() + begin, order.begin() + std::min(order.size(), begin + 128));
    const auto b = make_batch(dev, pick, regression, pad_id);
    auto logits = bert->forward(b.input_ids, b.attention_mask, b.token_type_ids).logits;  // (B, labels)
    auto answer = (regression ? logits.select(1, 0) : logits.argmax(1)).to(torch::kDouble).contiguous();
    for (size_t r = 0; r < pick.size(); ++r) out[size_t(pick[r])] = answer[int64_t(r)].item<double>();
  }
  bert->train();
  return out;
}

// The built-in task's vocabulary, written as a vocab.txt: BERT's specials, then every word and
// punctuation mark of the generated text, lower-cased and split as BERT's pre-tokeniser does.
std::string write_builtin_vocabulary(const std::vector<dt::GlueExample>& corpus, const std::string& dir) {
  std::set<std::string> words;
  for (const auto& e : corpus) {
    std::string word;
    for (const char c : e.text_a + " ") {
      if (std::isalnum(static_cast<unsigned char>(c))) {
        word += char(std::tolower(static_cast<unsigned char>(c)));
        continue;
      }
      if (!word.empty()) words.insert(word), word.clear();
      if (!std::isspace(static_cast<unsigned char>(c))) words.insert(std::string(1, c));
    }
  }
  std::string text;
  for (const char* special : {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}) text += std::string(special) + "\n";
  for (const auto& w : words) text += w + "\n";
  const auto path = dir + "/vocab.txt";
  dt::detail::write_text_atomically(path, text, "finetune_bert's vocab.txt");
  return path;
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

// The backbone with its head, seeded: the head's initial values (and the tiny BERT's weights)
// come out the same in the fresh model of the reload check, whose fingerprint must match.
bb::BertForSequenceClassification load_backbone(const Flags& flags, const dt::GlueTask& task, int64_t vocab_size,
                                                const Encoded& train) {
  torch::manual_seed(uint64_t(flags.seed));
  auto bert = flags.model.empty() ? bb::BertForSequenceClassification(tiny_config(vocab_size, task.num_labels()))
                                  : bb::load_bert_classifier(flags.model, task.num_labels());
  if (task.regression()) start_at_mean(*bert, train.labels);
  bert->train();  // dropout while tuning; predict() switches to eval
  return bert;
}

// The method's deltas and the head: spec tuning of the classifier.
void attach_all(dt::DeltaModel& model, const std::vector<std::string>& methods, const Flags& flags, int64_t seed) {
  finetune::attach(model, methods, flags, seed);
  model.add("head", dt::SpecTuningOptions().modules({"classifier.*"}));
}

int run(const Flags& flags) {
  if (flags.pretrain_steps >= 0) throw UsageError("--pretrain-steps is finetune_t5's (its built-in T5); finetune_bert "
                                                  "has no pretraining stand-in");
  const auto& task = dt::glue_task(flags.task);
  const auto methods = finetune::parse_methods(flags.method);
  std::filesystem::create_directories(flags.out);
  const auto splits = finetune::read_splits(flags, task);
  // Threads spin on a shared machine, and the tiny model's matrices are too small to split.
  if (flags.threads > 0 || splits.builtin) torch::set_num_threads(int(flags.threads > 0 ? flags.threads : 1));

  const auto vocab = splits.builtin ? write_builtin_vocabulary(splits.train, flags.out)
                                    : finetune::tokenizer_path(flags, "vocab.txt", "BERT's vocab.txt");
  const dt::WordPieceTokenizer tok(vocab);
  const auto train_ids = encode_all(tok, task, splits.train, flags.max_length);
  const auto dev_ids = encode_all(tok, task, splits.dev, flags.max_length);
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
                                                    return make_batch(train_ids, pick, regression, pad_id);
                                                  });
  job.train_examples = int64_t(train_ids.ids.size());
  job.default_epochs = splits.builtin ? 10 : 3;  // BERT's GLUE fine-tuning: 3 epochs
  job.builtin = splits.builtin;
  job.dev_labels = dev_ids.labels;
  job.predict = [&] { return predict(bert, dev_ids, regression, pad_id); };
  job.predict_reloaded = [&](const std::string& dir) {
    auto fresh = load_backbone(flags, task, tok.vocab_size(), train_ids);
    dt::DeltaModel reloaded(fresh);
    for (const auto& d : job.deltas) reloaded.load(d, dir + "/" + d);  // rebuilt from the saved files alone
    return predict(fresh, dev_ids, regression, pad_id);
  };
  job.head_parameters = bert->classifier->weight.numel() + bert->classifier->bias.numel();
  return finetune::tune(flags, job);
}

}  // namespace

int main(int argc, char** argv) {
  Flags defaults;
  defaults.out = "runs/finetune_bert";
  return finetune::run_main(argc, argv, "finetune_bert", std::string(kIntro) + finetune::kCommonUsage, defaults, run);
}
