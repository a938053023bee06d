// finetune_t5: deltatune's main job end to end. Freezes a T5, attaches one delta-tuning
// method (or several, joined with '+'), trains only the delta on a GLUE task cast as text to
// text, evaluates on dev, saves the delta, reloads it into a fresh model and checks that the
// reloaded model predicts the same dev labels.
//
// With --model and --data it reads a Hugging Face T5 and a GLUE folder. Without them it needs
// nothing from outside: it generates a small sentiment task, builds a word-level vocabulary
// and a small random T5, pretrains that T5 fully on denoising the generated text (a stand-in
// for real pretraining), freezes it and tunes the delta.
//   finetune_t5                                            # the built-in task, Houlsby adapters
//   finetune_t5 --model t5-small --data glue/RTE --task rte --method lora
#include <deltatune/deltatune.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <map>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace dt = deltatune;
namespace bb = deltatune::backbones;

namespace {

// ---------------------------------------------------------------------------------------------
// Flags.

struct Flags {
  std::string model, tokenizer, data, task = "sst2", method = "adapter", out = "runs/finetune_t5";
  double lr = 0;                 // 0: the method's published default (method_lr)
  int64_t epochs = 0;            // 0: 10 on the built-in task, 20 (Compacter's GLUE set-up) on GLUE
  int64_t batch_size = 32;
  int64_t max_steps = -1;
  int64_t seed = 42;
  int64_t max_length = 128;      // source tokens, eos included
  int64_t train_size = 3000;     // built-in task: generated train examples
  int64_t dev_size = 400;        // built-in task: generated dev examples
  int64_t pretrain_steps = 600;  // built-in task: full training of the random T5 on denoising
  int64_t reduction_factor = 0;  // adapters: 0 = the method's default
  int64_t lora_r = 8;
  int64_t virtual_tokens = 0;    // prompt / prefix: 0 = 100 / 30
  int64_t threads = 0;           // 0: 1 on the built-in task (small matrices), else LibTorch's default
  bool resume = false;
};

const char* const kUsage = R"(finetune_t5: delta-tune a frozen T5 on a GLUE task (text to text).

  --model DIR|FILE     Hugging Face T5 folder or TorchScript archive (default: a small random
                       T5, pretrained here on denoising a generated task)
  --tokenizer FILE     SentencePiece model (default: <model>/spiece.model)
  --data DIR           GLUE task folder with train.tsv and dev.tsv (default: a generated task)
  --task NAME          sst2, cola, mrpc, qqp, stsb, mnli, qnli, rte (default sst2)
  --method M[+M...]    adapter, pfeiffer, phm, compacter, compacter++, lora, bitfit, ia3,
                       prefix, prompt, full (default adapter: Houlsby's); e.g. adapter+bitfit
  --lr X               peak learning rate (default: the method's, printed)
  --epochs N           passes over train (default 10 built-in, 20 GLUE)
  --batch-size N       (default 32)
  --max-steps N        optimizer updates; overrides --epochs
  --seed N             (default 42)
  --max-length N       source tokens (default 128)
  --reduction-factor N adapters' d / m (default: the method's)
  --lora-r N           LoRA rank (default 8)
  --virtual-tokens N   prompt / prefix length (default 100 / 30)
  --threads N          CPU threads (default 1 on the built-in task, else LibTorch's)
  --train-size N, --dev-size N, --pretrain-steps N   the built-in task's size (3000, 400, 600)
  --out DIR            log.jsonl, curves.png, best/, last/, delta/ (default runs/finetune_t5)
  --resume             continue from <out>/last/
  --help
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// `v` as a whole number (stoll) or real (stod); anything else, trailing text included, is a usage error.
template <class T>
T to_number(const std::string& flag, const std::string& v) {
  try {
    size_t used = 0;
    const T x = std::is_integral_v<T> ? T(std::stoll(v, &used)) : T(std::stod(v, &used));
    if (used == v.size()) return x;
  } catch (const std::exception&) {
  }
  throw UsageError(fmt::format("{} expects {}, got '{}'", flag, std::is_integral_v<T> ? "an integer" : "a number", v));
}

std::optional<Flags> parse_flags(int argc, char** argv) {
  Flags f;
  std::map<std::string, std::string*> strings{{"--model", &f.model}, {"--tokenizer", &f.tokenizer},
                                              {"--data", &f.data},   {"--task", &f.task},
                                              {"--method", &f.method}, {"--out", &f.out}};
  std::map<std::string, int64_t*> ints{{"--epochs", &f.epochs},         {"--batch-size", &f.batch_size},
                                       {"--max-steps", &f.max_steps},   {"--seed", &f.seed},
                                       {"--max-length", &f.max_length}, {"--train-size", &f.train_size},
                                       {"--dev-size", &f.dev_size},     {"--pretrain-steps", &f.pretrain_steps},
                                       {"--reduction-factor", &f.reduction_factor}, {"--lora-r", &f.lora_r},
                                       {"--virtual-tokens", &f.virtual_tokens}, {"--threads", &f.threads}};
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") return std::nullopt;
    if (flag == "--resume") {
      f.resume = true;
      continue;
    }
    if (i + 1 >= argc) throw UsageError(fmt::format("{} needs a value (see --help)", flag));
    const std::string value = argv[++i];
    if (strings.count(flag)) *strings[flag] = value;
    else if (ints.count(flag)) *ints[flag] = to_number<int64_t>(flag, value);
    else if (flag == "--lr") f.lr = to_number<double>(flag, value);
    else throw UsageError(fmt::format("unknown flag '{}' (see --help)", flag));
  }
  if (f.batch_size < 1 || f.train_size < 1 || f.dev_size < 1 || f.max_length < 4 || f.pretrain_steps < 0)
    throw UsageError("--batch-size, --train-size, --dev-size must be positive, --max-length at least 4, "
                     "--pretrain-steps at least 0");
  if (f.data.empty() != f.model.empty())
    throw UsageError("give --model and --data together (a GLUE folder needs a pretrained T5 and its tokenizer), "
                     "or neither for the built-in task");
  return f;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, sep);)
    if (!part.empty()) out.push_back(part);
  return out;
}

// ---------------------------------------------------------------------------------------------
// Data: text-to-text pairs, and the tokenizer that turns them into ids.

struct Example {
  std::string source, target;
  double label;  // class id, or STS-B's score
};

// The built-in task: short movie reviews from templates, labelled by the sentiment of the two
// opinion words they carry (both of one polarity), among neutral words that carry none.
std::vector<Example> generate_reviews(int64_t n, uint64_t seed) {
  static const std::vector<std::string> good{"great", "wonderful", "moving", "brilliant", "charming", "superb",
                                             "delightful", "gripping", "clever", "beautiful", "fun", "touching"};
  static const std::vector<std::string> bad{"awful", "boring", "dull", "terrible", "clumsy", "tedious",
                                            "painful", "bland", "weak", "silly", "messy", "forgettable"};
  static const std::vector<std::string> subjects{"the film", "this movie", "the plot", "the acting", "the script",
                                                 "the ending", "the cast", "the score", "the director's work",
                                                 "the story", "the dialogue", "the second half"};
  static const std::vector<std::string> fillers{"honestly", "really", "quite", "at times", "overall",
                                                "in the end", "for me", "frankly", "mostly", "somehow"};
  static const std::vector<std::string> templates{"{s} was {a} and {b} .", "{f} , {s} is {a} , even {b} .",
                                                  "{s} felt {a} ; {f} {b} .", "a {a} , {b} night at the cinema .",
                                                  "{f} {s} turned out {a} and {b} .", "what a {a} and {b} picture ."};
  std::mt19937_64 rng(seed);
  auto pick = [&](const std::vector<std::string>& v) { return v[rng() % v.size()]; };
  auto fill = [](std::string t, const std::string& key, const std::string& value) {
    for (size_t at; (at = t.find(key)) != std::string::npos;) t.replace(at, key.size(), value);
    return t;
  };
  std::vector<Example> out;
  for (int64_t i = 0; i < n; ++i) {
    const bool positive = rng() % 2 == 0;
    const auto& words = positive ? good : bad;
    auto text = fill(fill(fill(fill(pick(templates), "{s}", pick(subjects)), "{f}", pick(fillers)), "{a}",
                          pick(words)), "{b}", pick(words));
    // The same GLUE casting as SST-2: "sst2 sentence: ..." -> "positive" / "negative".
    const auto t5 = dt::to_t5(dt::glue_task("sst2"), {text, std::nullopt, positive ? 1 : 0});
    out.push_back({t5.source, t5.target, positive ? 1.0 : 0.0});
  }
  return out;
}

std::vector<Example> read_glue_split(const std::string& folder, const dt::GlueTask& task, const std::string& split) {
  std::vector<Example> out;
  for (const auto& e : dt::read_glue(folder, task.name, split)) {
    const auto t5 = dt::to_t5(task, e);
    out.push_back({t5.source, t5.target, task.regression() ? e.score : double(e.label)});
  }
  return out;
}

// Either T5's SentencePiece tokenizer or a word-level vocabulary of the generated text
// (pad 0, eos 1, unk 2, <mask> 3, then every word seen, sorted: the same ids every run).
class Tokenizer {
 public:
  explicit Tokenizer(const std::string& spiece) : spiece_(std::make_shared<dt::T5Tokenizer>(spiece)) {}
  explicit Tokenizer(const std::vector<Example>& corpus) {
    std::set<std::string> words;
    for (const auto& e : corpus)
      for (const auto* text : {&e.source, &e.target})
        for (const auto& w : split(*text, ' ')) words.insert(w);
    words_ = {"<pad>", "</s>", "<unk>", "<mask>"};
    words_.insert(words_.end(), words.begin(), words.end());
    for (size_t i = 0; i < words_.size(); ++i) ids_[words_[i]] = int64_t(i);
  }
  int64_t vocab_size() const { return spiece_ ? spiece_->vocab_size() : int64_t(words_.size()); }
  int64_t mask_id() const { return 3; }  // word-level vocabulary only
  // Ids with eos last, at most max_length of them.
  std::vector<int64_t> encode(const std::string& text, int64_t max_length) const {
    if (spiece_) return spiece_->encode(text, max_length);
    std::vector<int64_t> ids;
    for (const auto& w : split(text, ' ')) {
      const auto it = ids_.find(w);
      ids.push_back(it == ids_.end() ? 2 : it->second);
    }
    if (int64_t(ids.size()) > max_length - 1) ids.resize(size_t(max_length - 1));
    ids.push_back(1);
    return ids;
  }
  std::string decode(const std::vector<int64_t>& ids) const {
    if (spiece_) return spiece_->decode(ids);
    std::vector<std::string> words;
    for (const auto id : ids)
      if (id > 3 && id < vocab_size()) words.push_back(words_[size_t(id)]);
    return fmt::format("{}", fmt::join(words, " "));
  }

 private:
  std::shared_ptr<dt::T5Tokenizer> spiece_;
  std::vector<std::string> words_;
  std::map<std::string, int64_t> ids_;
};

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

torch::Tensor pad(const std::vector<std::vector<int64_t>>& rows, const std::vector<int64_t>& pick, int64_t value) {
  size_t width = 1;
  for (const auto i : pick) width = std::max(width, rows[size_t(i)].size());
  auto out = torch::full({int64_t(pick.size()), int64_t(width)}, value, torch::kLong);
  for (size_t r = 0; r < pick.size(); ++r) {
    const auto& row = rows[size_t(pick[r])];
    out[int64_t(r)].narrow(0, 0, int64_t(row.size())).copy_(torch::tensor(row, torch::kLong));
  }
  return out;
}

Batch make_batch(const Encoded& data, const std::vector<int64_t>& pick) {
  auto ids = pad(data.source, pick, 0);
  return {ids, (ids != 0).to(torch::kLong), pad(data.target, pick, -100)};
}

// Micro-batch `index` of epoch `epoch`: a permutation seeded by (seed, epoch), so that a
// resumed run sees the batches an uninterrupted one would.
dt::BatchSource<Batch> batches(const Encoded& data, int64_t batch_size, int64_t seed) {
  const int64_t n = int64_t(data.source.size());
  return {(n + batch_size - 1) / batch_size, [&data, n, batch_size, seed](int64_t epoch, int64_t index) {
            std::vector<int64_t> order(size_t(n), 0);
            std::iota(order.begin(), order.end(), 0);
            std::shuffle(order.begin(), order.end(), std::mt19937_64(uint64_t(seed) * 1000003u + uint64_t(epoch)));
            const auto begin = order.begin() + index * batch_size;
            return make_batch(data, std::vector<int64_t>(begin, begin + std::min(batch_size, n - index * batch_size)));
          }};
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

// Trains every weight of the small T5 on denoising: the stand-in for pretraining.
void pretrain_small_t5(bb::T5Model& t5, const Encoded& denoise, const Flags& flags) {
  for (auto& p : t5->parameters()) p.set_requires_grad(true);
  t5->train();
  auto loss_fn = [&t5](const Batch& b) { return t5->forward(b.input_ids, b.attention_mask, {}, b.labels).loss; };
  dt::Trainer<Batch> trainer(dt::TrainerOptions().max_steps(flags.pretrain_steps).lr(3e-3).warmup_steps(50)
                                 .seed(uint64_t(flags.seed)).log_every(50),
                             t5->parameters(), loss_fn, batches(denoise, 64, flags.seed + 1));
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
// Delta: each method's options at its published defaults, attached one after another.

const std::vector<std::string> kMethods{"adapter", "pfeiffer", "phm", "compacter", "compacter++", "lora",
                                        "bitfit",  "ia3",      "prefix", "prompt", "full"};

// Peak learning rates as the papers tune them (Compacter's table for adapters and Compacter,
// LoRA's GLUE runs, BitFit's, IA3's T-Few, the prompt/prefix papers, T5's fine-tuning 1e-4 in AdamW form).
double method_lr(const std::string& method) {
  static const std::map<std::string, double> lr{{"adapter", 3e-3},  {"pfeiffer", 3e-3}, {"phm", 3e-3},
                                                {"compacter", 3e-3}, {"compacter++", 3e-3}, {"lora", 5e-4},
                                                {"bitfit", 1e-3},   {"ia3", 3e-3},      {"prefix", 5e-4},
                                                {"prompt", 3e-1},   {"full", 3e-4}};
  return lr.at(method);
}

void add_method(dt::DeltaModel& model, const std::string& method, const Flags& flags) {
  auto adapter = [&](dt::AdapterOptions o) {
    model.add(method, flags.reduction_factor > 0 ? o.reduction_factor(flags.reduction_factor) : o);
  };
  if (method == "adapter") adapter(dt::houlsby_options());
  else if (method == "pfeiffer") adapter(dt::pfeiffer_options());
  else if (method == "phm") adapter(dt::phm_adapter_options(0, 4));
  else if (method == "compacter") adapter(dt::compacter_options());
  else if (method == "compacter++") adapter(dt::compacter_plus_plus_options());
  else if (method == "lora") model.add(method, dt::LoRAOptions().r(flags.lora_r).alpha(double(flags.lora_r)));
  else if (method == "bitfit") model.add(method, dt::BitFitOptions());
  else if (method == "ia3") model.add(method, dt::IA3Options());
  else if (method == "prefix") model.add(method, dt::PrefixTuningOptions(flags.virtual_tokens ? flags.virtual_tokens : 30));
  else if (method == "prompt")
    model.add(method, dt::PromptTuningOptions(flags.virtual_tokens ? flags.virtual_tokens : 100)
                          .init(dt::PromptInit::sampled_vocabulary).sample_top_k(model.backbone().named_parameters()
                                                                                     ["shared.weight"].size(0)));
  else if (method == "full") model.add(method, dt::SpecTuningOptions().modules({"*"}));
}

std::vector<std::string> parse_methods(const std::string& text) {
  const auto methods = split(text, '+');
  if (methods.empty()) throw UsageError("--method is empty; choose from " + fmt::format("{}", fmt::join(kMethods, ", ")));
  for (const auto& m : methods)
    if (std::find(kMethods.begin(), kMethods.end(), m) == kMethods.end())
      throw UsageError(fmt::format("unknown method '{}'; choose from {} (combine with '+')", m, fmt::join(kMethods, ", ")));
  return methods;
}

void attach(dt::DeltaModel& model, const std::vector<std::string>& methods, const Flags& flags, int64_t seed) {
  torch::manual_seed(uint64_t(seed));  // the deltas' initial values: the same for the reload check
  for (const auto& m : methods) add_method(model, m, flags);
}

// ---------------------------------------------------------------------------------------------
// Evaluation: greedy decoding, the output text mapped back to a label (or score).

std::vector<double> predict(bb::T5Model& t5, const Tokenizer& tok, const dt::GlueTask& task, const Encoded& dev,
                            int64_t batch_size) {
  t5->eval();
  std::vector<double> out;
  for (int64_t begin = 0; begin < int64_t(dev.source.size()); begin += batch_size) {
    std::vector<int64_t> pick;
    for (int64_t i = begin; i < std::min<int64_t>(begin + batch_size, int64_t(dev.source.size())); ++i) pick.push_back(i);
    const auto b = make_batch(dev, pick);
    const auto ids = t5->generate_greedy(b.input_ids, b.attention_mask, 5);
    for (int64_t r = 0; r < ids.size(0); ++r) {
      auto row = ids[r].slice(0, 1);
      const auto text = tok.decode(std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + row.numel()));
      out.push_back(task.regression() ? dt::from_t5_score(text) : double(dt::from_t5_label(task, text)));
    }
  }
  t5->train();
  return out;
}

std::vector<double> labels_of(const std::vector<Example>& data) {
  std::vector<double> out;
  for (const auto& e : data) out.push_back(e.label);
  return out;
}

// The dev metric a model that always answers the most frequent class gets.
double majority_baseline(const dt::GlueTask& task, const std::vector<double>& labels) {
  if (task.regression()) return 0.0;
  std::map<double, int64_t> counts;
  for (const auto l : labels) ++counts[l];
  const auto top = std::max_element(counts.begin(), counts.end(), [](auto& a, auto& b) { return a.second < b.second; });
  return dt::metric(task.metrics.front(), std::vector<double>(labels.size(), top->first), labels);
}

// ---------------------------------------------------------------------------------------------

int run(const Flags& flags) {
  const auto& task = dt::glue_task(flags.task);
  const auto methods = parse_methods(flags.method);
  std::filesystem::create_directories(flags.out);
  const bool builtin = flags.data.empty();
  // Threads spin on a shared machine, and the built-in model's matrices are too small to split.
  if (flags.threads > 0 || builtin) torch::set_num_threads(int(flags.threads > 0 ? flags.threads : 1));

  // Data.
  std::vector<Example> train, dev;
  if (builtin) {
    if (task.name != "sst2") throw UsageError("the built-in task is sentiment (sst2); give --data for --task " + task.name);
    train = generate_reviews(flags.train_size, uint64_t(flags.seed));
    dev = generate_reviews(flags.dev_size, uint64_t(flags.seed) + 7919);
  } else {
    train = read_glue_split(flags.data, task, "train");
    dev = read_glue_split(flags.data, task, task.name == "mnli" ? "dev_matched" : "dev");
  }
  std::cout << fmt::format("task {}: {} train, {} dev examples{}\n  e.g. \"{}\" -> \"{}\"\n", task.name, train.size(),
                           dev.size(), builtin ? " (generated here: movie-review sentences from templates, seeded)" : "",
                           train.front().source, train.front().target);

  // Model.
  std::optional<Tokenizer> tok;
  if (builtin) tok.emplace(train);
  else {
    const std::filesystem::path model_path(flags.model);
    const auto spiece = !flags.tokenizer.empty() ? flags.tokenizer
                        : std::filesystem::is_directory(model_path) ? (model_path / "spiece.model").string()
                                                                    : (model_path.parent_path() / "spiece.model").string();
    if (!std::filesystem::exists(spiece))
      throw UsageError(fmt::format("no tokenizer at {}; pass --tokenizer FILE (T5's spiece.model)", spiece));
    tok.emplace(spiece);
  }
  const auto train_ids = encode_all(*tok, train, flags.max_length);
  const auto dev_ids = encode_all(*tok, dev, flags.max_length);

  const auto backbone_path = flags.out + "/backbone.safetensors";
  bb::T5Model t5{nullptr};
  if (!builtin) {
    t5 = bb::load_t5(flags.model);
    std::cout << fmt::format("backbone: {} (pretrained, frozen)\n", flags.model);
  } else if (flags.resume && std::filesystem::exists(backbone_path)) {
    t5 = load_backbone(backbone_path, tok->vocab_size());
    std::cout << fmt::format("backbone: the small T5 pretrained earlier, from {}\n", backbone_path);
  } else {
    t5 = build_small_t5(tok->vocab_size(), flags.seed);
    std::cout << fmt::format("backbone: a small T5 with RANDOM initial weights (vocabulary {} words, d_model {}, {} "
                             "layers); no pretrained model is used.\n  Stand-in for pretraining: all its weights "
                             "train for {} updates on denoising the train sentences (masked words, no labels).\n",
                             tok->vocab_size(), t5->config.d_model(), t5->config.num_layers(), flags.pretrain_steps);
    if (flags.pretrain_steps > 0)
      pretrain_small_t5(t5, denoising_data(train_ids, tok->mask_id(), uint64_t(flags.seed)), flags);
    save_backbone(t5, backbone_path);
  }
  t5->train();  // dropout while tuning; predict() switches to eval

  // Delta.
  dt::DeltaModel model(t5);
  attach(model, methods, flags, flags.seed);
  double lr = flags.lr;
  if (lr <= 0) lr = method_lr(methods.front());
  const int64_t epochs = flags.epochs > 0 ? flags.epochs : builtin ? 10 : 20;
  // Compacter's 500 warm-up updates on GLUE, 10 on the built-in task; never more than a tenth of the run.
  const int64_t updates = flags.max_steps > 0 ? flags.max_steps
                          : epochs * ((int64_t(train.size()) + flags.batch_size - 1) / flags.batch_size);
  const int64_t warmup = std::min<int64_t>(builtin ? 10 : 500, updates / 10);
  std::cout << model.summary();
  std::cout << fmt::format("hyper-parameters: method {}, lr {:g} ({}), {}, batch {}, AdamW, linear decay, warm-up "
                           "{} updates, seed {}\n", flags.method, lr, flags.lr > 0 ? "given" : "the method's default",
                           flags.max_steps > 0 ? fmt::format("{} updates", flags.max_steps)
                                               : fmt::format("{} epochs", epochs),
                           flags.batch_size, warmup, flags.seed);

  // Train.
  const auto dev_labels = labels_of(dev);
  const auto& metric_name = task.metrics.front();
  auto evaluate = [&] { return dt::metric(metric_name, predict(t5, *tok, task, dev_ids, 128), dev_labels); };
  auto save_best = [&](const std::string& dir) {
    for (const auto& m : methods) model.save(m, dir + "/" + m);
  };
  auto loss_fn = [&t5](const Batch& b) { return t5->forward(b.input_ids, b.attention_mask, {}, b.labels).loss; };
  dt::Trainer<Batch> trainer(dt::TrainerOptions().epochs(epochs).max_steps(flags.max_steps).lr(lr)
                                 .warmup_steps(warmup).seed(uint64_t(flags.seed)).output_dir(flags.out)
                                 .resume(flags.resume),
                             model.trainable_parameters(), loss_fn, batches(train_ids, flags.batch_size, flags.seed),
                             evaluate, save_best);
  const auto summary = trainer.fit();

  // Evaluate the final model; save its delta, reload it into a fresh model, compare.
  const auto predictions = predict(t5, *tok, task, dev_ids, 128);
  const double final_metric = dt::metric(metric_name, predictions, dev_labels);
  const auto delta_dir = flags.out + "/delta";
  for (const auto& m : methods) model.save(m, delta_dir + "/" + m);
  auto fresh = builtin ? load_backbone(backbone_path, tok->vocab_size()) : bb::load_t5(flags.model);
  dt::DeltaModel reloaded(fresh);
  attach(reloaded, methods, flags, flags.seed + 1);  // other initial values: load must overwrite them
  for (const auto& m : methods) reloaded.load(m, delta_dir + "/" + m);
  const auto again = predict(fresh, *tok, task, dev_ids, 128);
  const auto same = int64_t(std::count_if(again.begin(), again.end(), [&, i = size_t(0)](double p) mutable {
    return p == predictions[i++];
  }));
  std::cout << fmt::format("reload check: delta saved to {}/, loaded into a fresh {} backbone: {} of {} dev "
                           "predictions equal ({})\n", delta_dir, builtin ? "pretrained stand-in" : "T5", same,
                           again.size(), same == int64_t(again.size()) ? "OK" : "MISMATCH");

  // Closing table.
  double epoch_seconds = 0;
  for (const auto s : summary.seconds_per_epoch) epoch_seconds += s;
  const auto per_epoch = summary.seconds_per_epoch.empty() ? std::string("-")
                         : fmt::format("{:.1f} s", epoch_seconds / double(summary.seconds_per_epoch.size()));
  const auto trained = model.num_trainable_parameters(), total = model.num_backbone_parameters();
  std::cout << "\n"
            << fmt::format("| {:<14} | {:>16} | {:>9} | {:>10} | {:>9} | {:>26} | {:>9} |\n", "method", "trained params",
                           "share", "time/epoch", "peak RSS", "best dev " + metric_name, "majority")
            << fmt::format("|{:-<16}|{:->18}|{:->11}|{:->12}|{:->11}|{:->28}|{:->11}|\n", "", "", "", "", "", "", "")
            << fmt::format("| {:<14} | {:>16} | {:>8.3f}% | {:>10} | {:>6} MB | {:>26} | {:>9} |\n", flags.method,
                           trained, 100.0 * double(trained) / double(total), per_epoch,
                           summary.peak_rss_bytes / (1024 * 1024),
                           fmt::format("{:.4f} (step {})", summary.best_metric, summary.best_step),
                           fmt::format("{:.4f}", majority_baseline(task, dev_labels)));
  std::cout << fmt::format("\nfinal dev {} {:.4f}; log {}/log.jsonl, curves {}/curves.png, best delta {}/best/, "
                           "final delta {}/\n", metric_name, final_metric, flags.out, flags.out, flags.out, delta_dir);
  return same == int64_t(again.size()) ? 0 : 3;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const auto flags = parse_flags(argc, argv);
    if (!flags) {
      std::cout << kUsage;
      return 0;
    }
    return run(*flags);
  } catch (const UsageError& e) {
    std::cerr << "finetune_t5: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "finetune_t5: " << e.what() << "\n";
    return 1;
  }
}
