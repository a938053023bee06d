// finetune_common.hpp: what examples/finetune_t5 and examples/finetune_bert share: their
// flags, the built-in generated task and its tokenizers, each method's published options and
// learning rate, shuffled batches, and the run itself (train the delta, save it, reload it
// into a fresh backbone, check the predictions, print the closing table, write results.json).
// examples/serve_deltas takes the generated task, its tokenizers and the flag helpers.
#pragma once

#include <deltatune/deltatune.hpp>
#include <deltatune/train/process_group.hpp>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <filesystem>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace finetune {

namespace dt = deltatune;

// ---------------------------------------------------------------------------------------------
// Flags.

struct Flags {
  std::string model, tokenizer, data, task = "sst2", method = "adapter", out;
  double lr = 0;                 // 0: the method's published default (method_lr)
  double loraplus_ratio = 1;     // LoRA+: B matrices (and 1-D tensors) at lr x this
  double head_lr = 0;            // finetune_bert: the task head's peak rate; 0: lr, as the delta's
  int64_t epochs = 0;            // 0: the program's default
  int64_t batch_size = 32;
  int64_t max_steps = -1;
  int64_t seed = 42;
  int64_t max_length = 128;      // tokens per example, special tokens included
  int64_t max_train = 0;         // > 0: a seeded random subset of this many train examples
  int64_t train_size = 3000;     // built-in task: generated train examples
  int64_t dev_size = 400;        // built-in task: generated dev examples
  int64_t pretrain_steps = -1;   // finetune_t5's built-in task only; -1: its default
  int64_t reduction_factor = 0;  // adapters: 0 = the method's default
  int64_t lora_r = 8;
  int64_t virtual_tokens = 0;    // prompt / prefix: 0 = prompt_tokens / 30
  int64_t prompt_tokens = 100;   // prompt tuning's length unless --virtual-tokens: the program's default
  int64_t threads = 0;           // 0: 1 on the built-in task (small matrices), else LibTorch's default
  std::string combine;           // finetune_bert: earlier runs whose LoRA deltas are combined, not trained
  std::string combine_how = "ties";
  std::string precision = "fp32";  // fp32, bf16 or fp16 (CUDA): the frozen backbone stored in half precision
  std::string device = "cpu";      // cpu or cuda: where the model trains
  std::string combine_weights;   // one per run; empty: 1 each
  double density = 0.5;          // ties, dare_*, magnitude_prune: the share of entries kept
  double dist_timeout = 300;     // seconds a rank waits for the others before it gives up
  bool resume = false;
  bool group_by_length = false;  // batches of similar lengths (transformers' group_by_length)
  bool list_methods = false;     // print the --method names, one a line, and stop
  std::string command;           // the command line, for results.json
};

// The flags both programs take, for their --help after their own --model / --tokenizer lines.
inline const char* const kCommonUsage = R"(  --data DIR           GLUE task folder with train.tsv and dev.tsv (default: a generated task)
  --task NAME          sst2, cola, mrpc, qqp, stsb, mnli, qnli, rte (default sst2)
  --method M[+M...]    a method listed below (default adapter: Houlsby's); e.g. adapter+bitfit
  --lr X               peak learning rate (default: the method's, listed below)
  --loraplus-ratio X   LoRA+: LoRA's B matrices and 1-D tensors learn at lr x X (peft's
                       create_loraplus_optimizer; 16 is the paper's suggestion; default 1: off)
  --epochs N           passes over train (default: the program's, printed)
  --batch-size N       (default 32)
  --max-steps N        optimizer updates; overrides --epochs
  --seed N             (default 42)
  --max-length N       tokens per example (default 128); batches are padded to their longest
  --max-train N        train on a seeded random N of the train examples (default: all)
  --reduction-factor N adapters' d / m (default: the method's; at most the model's width)
  --lora-r N           LoRA rank (default 8; at most the model's width)
  --virtual-tokens N   prompt / prefix length (default 100 / 30, prompt 20 on BERT; at most 1024)
  --threads N          CPU threads (default 1 on the built-in task, else LibTorch's)
  --precision P        fp32, bf16 or fp16: the frozen backbone's weights in bfloat16 (half the memory, the
                       CPU's and GPU's bf16 products) or float16 (CUDA only, with dynamic loss scaling), the
                       deltas, head and optimizer state in float32; with --method full, autocast over float32
                       weights (default fp32)
  --device D           cpu or cuda: where the model trains (default cpu; under tools/launch each rank takes
                       the GPU of its LOCAL_RANK and NCCL)
  --train-size N, --dev-size N   the built-in task's size (default 3000, 400)
  --out DIR            log.jsonl, curves.png, best/, last/, delta/, results.json
  --resume             continue from <out>/last/
  --group-by-length    batches of examples of similar lengths, less padding: each shuffled run of 50
                       batches sorted by length (transformers' group_by_length; default: off)
  --dist-timeout S     under tools/launch (or torchrun): seconds a rank waits for the others, at the start
                       and in each all-reduce, before it exits with an error (default 300)
  --list-methods       print the methods, one a line, and stop
  --help

Data parallel: tools/launch -n 2 <program> <flags> starts 2 ranks; each trains on --batch-size examples
of every global batch of 2 x --batch-size, the delta's gradients are averaged over the ranks, rank 0
alone prints and writes --out (README: Data-parallel training).
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

// The values a whole-number flag may take when given. The lower bounds refuse what Flags'
// defaults would otherwise silently stand in for (0 or -1 there means "the default"); the
// upper ones refuse sizes no run can hold before anything allocates them. Bounds that depend
// on the model (--lora-r, --reduction-factor) are check_delta_sizes's.
struct Range {
  int64_t min, max;
};

inline const std::map<std::string, Range>& int_ranges() {
  constexpr int64_t kAny = std::numeric_limits<int64_t>::max();
  static const std::map<std::string, Range> ranges{
      {"--epochs", {1, 1'000'000}},         {"--batch-size", {1, 1'000'000}},   {"--max-steps", {1, 1'000'000'000}},
      {"--seed", {0, kAny}},                {"--max-length", {4, 1'000'000}},   {"--max-train", {0, kAny}},
      {"--train-size", {1, 10'000'000}},    {"--dev-size", {1, 10'000'000}},    {"--pretrain-steps", {0, 1'000'000'000}},
      {"--reduction-factor", {1, kAny}},    {"--lora-r", {1, kAny}},
      {"--virtual-tokens", {1, 1024}},  // prompt and prefix tuning's papers use 10 to 200
      {"--threads", {1, 1024}}};
  return ranges;
}

inline void check_range(const std::string& flag, int64_t value) {
  const auto range = int_ranges().at(flag);
  if (value < range.min) throw UsageError(fmt::format("{} {}: must be at least {}", flag, value, range.min));
  if (value > range.max) throw UsageError(fmt::format("{} {}: must be at most {}", flag, value, range.max));
}

// The flags over `defaults`; nullopt for --help.
inline std::optional<Flags> parse_flags(int argc, char** argv, Flags f) {
  std::map<std::string, std::string*> strings{{"--model", &f.model}, {"--tokenizer", &f.tokenizer},
                                              {"--data", &f.data},   {"--task", &f.task},
                                              {"--method", &f.method}, {"--out", &f.out},
                                              {"--combine", &f.combine}, {"--combine-how", &f.combine_how},
                                              {"--combine-weights", &f.combine_weights}, {"--precision", &f.precision},
                                              {"--device", &f.device}};
  std::map<std::string, int64_t*> ints{{"--epochs", &f.epochs},         {"--batch-size", &f.batch_size},
                                       {"--max-steps", &f.max_steps},   {"--seed", &f.seed},
                                       {"--max-length", &f.max_length}, {"--max-train", &f.max_train},
                                       {"--train-size", &f.train_size}, {"--dev-size", &f.dev_size},
                                       {"--pretrain-steps", &f.pretrain_steps},
                                       {"--reduction-factor", &f.reduction_factor}, {"--lora-r", &f.lora_r},
                                       {"--virtual-tokens", &f.virtual_tokens}, {"--threads", &f.threads}};
  for (int i = 0; i < argc; ++i) f.command += (i ? " " : "") + std::string(argv[i]);
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") return std::nullopt;
    if (flag == "--resume" || flag == "--list-methods" || flag == "--group-by-length") {
      (flag == "--resume" ? f.resume : flag == "--list-methods" ? f.list_methods : f.group_by_length) = true;
      continue;
    }
    if (i + 1 >= argc) throw UsageError(fmt::format("{} needs a value (see --help)", flag));
    const std::string value = argv[++i];
    if (strings.count(flag)) *strings[flag] = value;
    else if (ints.count(flag)) check_range(flag, *ints[flag] = to_number<int64_t>(flag, value));
    else if (flag == "--lr" || flag == "--loraplus-ratio" || flag == "--head-lr") {
      // 0 stands for the method's rate in Flags; stod also reads "nan" and "inf".
      const double x = to_number<double>(flag, value);
      if (!(std::isfinite(x) && x > 0)) throw UsageError(fmt::format("{} {}: must be a positive number", flag, value));
      (flag == "--lr" ? f.lr : flag == "--head-lr" ? f.head_lr : f.loraplus_ratio) = x;
    } else if (flag == "--dist-timeout") {
      const double x = to_number<double>(flag, value);
      if (!(x > 0 && x <= 86400)) throw UsageError(fmt::format("{} {}: give seconds in (0, 86400]", flag, value));
      f.dist_timeout = x;
    } else if (flag == "--density") {
      const double x = to_number<double>(flag, value);
      if (!(x > 0 && x <= 1)) throw UsageError(fmt::format("{} {}: must be in (0, 1]", flag, value));
      f.density = x;
    } else throw UsageError(fmt::format("unknown flag '{}' (see --help)", flag));
  }
  if (f.precision != "fp32" && f.precision != "bf16" && f.precision != "fp16")
    throw UsageError(fmt::format("--precision {}: choose fp32, bf16 or fp16", f.precision));
  if (f.device != "cpu" && f.device != "cuda")
    throw UsageError(fmt::format("--device {}: choose cpu or cuda", f.device));
  // float16's 5 exponent bits need loss scaling, and its products are fast on GPUs only.
  if (f.precision == "fp16" && f.device != "cuda")
    throw UsageError("--precision fp16: float16 trains on CUDA only (add --device cuda); on the CPU use bf16, the "
                     "same memory with float32's range");
  if (f.device == "cuda" && !torch::cuda::is_available())
    throw UsageError("--device cuda: LibTorch sees no CUDA device here (torch::cuda::is_available() is false); "
                     "leave --device out to train on the CPU");
  if (f.data.empty() != f.model.empty())
    throw UsageError("give --model and --data together (a GLUE folder needs a pretrained model and its tokenizer), "
                     "or neither for the built-in task");
  return f;
}

// The backbone's width: the largest smaller side of its weight matrices (d_model for T5 and
// BERT), the most a LoRA rank can use and the most an adapter's d can be divided by.
inline int64_t backbone_width(const torch::nn::Module& backbone) {
  int64_t width = 0;
  for (const auto& p : backbone.named_parameters())
    if (p.value().dim() == 2) width = std::max(width, std::min(p.value().size(0), p.value().size(1)));
  return width;
}

// Refuses delta sizes the backbone cannot hold, before any delta allocates them (a rank of a
// billion ended in an allocator error).
inline void check_delta_sizes(const Flags& flags, const torch::nn::Module& backbone) {
  const int64_t width = backbone_width(backbone);
  if (flags.lora_r > width)
    throw UsageError(fmt::format("--lora-r {}: must be at most {}, the backbone's width (a rank above a layer's width "
                                 "adds nothing)", flags.lora_r, width));
  if (flags.reduction_factor > width)
    throw UsageError(fmt::format("--reduction-factor {}: must be at most {}, the backbone's width (a larger factor "
                                 "leaves an adapter bottleneck under one unit)", flags.reduction_factor, width));
}

// Refuses a --model that is not there: otherwise the first complaint is a tokenizer's.
inline void check_model_exists(const Flags& flags) {
  if (!flags.model.empty() && !std::filesystem::exists(flags.model))
    throw dt::Error(fmt::format("--model {}: the model folder is missing (give a Hugging Face model folder or a "
                                "TorchScript archive)", flags.model));
}

inline std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string part; std::getline(in, part, sep);)
    if (!part.empty()) out.push_back(part);
  return out;
}

// The tokenizer file `name` beside `model`: in the folder, or beside a TorchScript archive;
// `tokenizer` (the --tokenizer flag) overrides it. `what` says which file it is.
inline std::string tokenizer_path(const std::string& model, const std::string& tokenizer, const std::string& name,
                                  const std::string& what) {
  const std::filesystem::path folder(model);
  const auto path = !tokenizer.empty()                        ? tokenizer
                    : std::filesystem::is_directory(folder) ? (folder / name).string()
                                                            : (folder.parent_path() / name).string();
  if (!std::filesystem::exists(path))
    throw UsageError(fmt::format("no tokenizer at {}; pass --tokenizer FILE ({})", path, what));
  return path;
}

// ---------------------------------------------------------------------------------------------
// Data.

// The built-in task: short movie reviews from templates, labelled by the sentiment of the two
// opinion words they carry (both of one polarity), among neutral words that carry none.
inline std::vector<dt::GlueExample> generate_reviews(int64_t n, uint64_t seed) {
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
  std::vector<dt::GlueExample> out;
  for (int64_t i = 0; i < n; ++i) {
    const bool positive = rng() % 2 == 0;
    const auto& words = positive ? good : bad;
    auto text = fill(fill(fill(fill(pick(templates), "{s}", pick(subjects)), "{f}", pick(fillers)), "{a}",
                          pick(words)), "{b}", pick(words));
    out.push_back({text, std::nullopt, positive ? 1 : 0});
  }
  return out;
}

// The train and dev examples: generated (sst2 only), or read from the GLUE folder; train cut
// to a seeded random --max-train of them.
struct Splits {
  std::vector<dt::GlueExample> train, dev;
  bool builtin = false;
};

inline Splits read_splits(const Flags& flags, const dt::GlueTask& task) {
  Splits s;
  s.builtin = flags.data.empty();
  if (s.builtin) {
    if (task.name != "sst2") throw UsageError("the built-in task is sentiment (sst2); give --data for --task " + task.name);
    s.train = generate_reviews(flags.train_size, uint64_t(flags.seed));
    s.dev = generate_reviews(flags.dev_size, uint64_t(flags.seed) + 7919);
  } else {
    s.train = dt::read_glue(flags.data, task.name, "train");
    s.dev = dt::read_glue(flags.data, task.name, task.name == "mnli" ? "dev_matched" : "dev");
  }
  const auto full = s.train.size();
  if (flags.max_train > 0 && size_t(flags.max_train) < full) {
    std::shuffle(s.train.begin(), s.train.end(), std::mt19937_64(uint64_t(flags.seed) + 104729));
    s.train.resize(size_t(flags.max_train));
  }
  std::cout << fmt::format("task {}: {} train{}, {} dev examples{}\n", task.name, s.train.size(),
                           s.train.size() < full ? fmt::format(" (a seeded random subset of {})", full) : "",
                           s.dev.size(), s.builtin ? " (generated here: movie-review sentences from templates, seeded)" : "");
  return s;
}

// The label a metric compares: the class id, or STS-B's score.
inline double label_of(const dt::GlueTask& task, const dt::GlueExample& e) {
  return task.regression() ? e.score : double(e.label);
}

inline std::vector<double> labels_of(const dt::GlueTask& task, const std::vector<dt::GlueExample>& data) {
  std::vector<double> out;
  for (const auto& e : data) out.push_back(label_of(task, e));
  return out;
}

// The dev metric a model that always answers the most frequent class gets.
inline double majority_baseline(const dt::GlueTask& task, const std::vector<double>& labels) {
  if (task.regression()) return 0.0;
  std::map<double, int64_t> counts;
  for (const auto l : labels) ++counts[l];
  const auto top = std::max_element(counts.begin(), counts.end(), [](auto& a, auto& b) { return a.second < b.second; });
  return dt::metric(task.metrics.front(), std::vector<double>(labels.size(), top->first), labels);
}

// Rows padded with `value` to the longest of the picked ones: (B, longest).
inline torch::Tensor pad(const std::vector<std::vector<int64_t>>& rows, const std::vector<int64_t>& pick, int64_t value) {
  size_t width = 1;
  for (const auto i : pick) width = std::max(width, rows[size_t(i)].size());
  auto out = torch::full({int64_t(pick.size()), int64_t(width)}, value, torch::kLong);
  for (size_t r = 0; r < pick.size(); ++r) {
    const auto& row = rows[size_t(pick[r])];
    out[int64_t(r)].narrow(0, 0, int64_t(row.size())).copy_(torch::tensor(row, torch::kLong));
  }
  return out;
}

// The order of epoch `epoch` over n examples: a permutation seeded by (seed, epoch), so that a
// resumed run sees the batches an uninterrupted one would. With `lengths`, as transformers'
// LengthGroupedSampler: each run of 50 batches of the permutation sorted by length, longest
// first, so that a batch pads little; the runs, and so the batches, stay in shuffled order.
inline std::vector<int64_t> epoch_order(int64_t n, int64_t batch_size, int64_t seed, int64_t epoch,
                                        const std::vector<int64_t>& lengths) {
  std::vector<int64_t> order(size_t(n), 0);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937_64(uint64_t(seed) * 1000003u + uint64_t(epoch)));
  if (lengths.empty()) return order;
  const int64_t run = 50 * batch_size;
  for (int64_t begin = 0; begin < n; begin += run)
    std::stable_sort(order.begin() + begin, order.begin() + std::min(n, begin + run),
                     [&](int64_t a, int64_t b) { return lengths[size_t(a)] > lengths[size_t(b)]; });
  return order;
}

// --device: the CPU, or this process's GPU: under a launch LOCAL_RANK's, as the NCCL group
// takes it.
inline torch::Device run_device(const Flags& flags) {
  if (flags.device == "cpu") return torch::kCPU;
  const auto env = dt::LaunchEnvironment::from_environment();
  return {torch::kCUDA, c10::DeviceIndex(env ? env->local_rank : 0)};
}

// This process's place among the ranks of a data-parallel launch (world 1: alone).
struct Ranks {
  std::shared_ptr<dt::DataParallel> group;  // nullptr alone
  int64_t rank() const { return group ? group->rank() : 0; }
  int64_t world() const { return group ? group->world_size() : 1; }
  bool main() const { return rank() == 0; }
};

// Joins the launch tools/launch or torchrun describes (WORLD_SIZE set and above 1). Every rank
// but 0 stops printing to stdout: rank 0 speaks for the run; errors still reach stderr.
inline Ranks join_launch(const Flags& flags) {
  const auto env = dt::LaunchEnvironment::from_environment();
  if (!env || env->world_size == 1) return {};
  Ranks ranks{dt::start_data_parallel(*env, dt::DistributedOptions().timeout_seconds(flags.dist_timeout)
                                                  .device(run_device(flags)))};
  if (!ranks.main()) std::cout.rdbuf(nullptr);
  return ranks;
}

// This rank's share of micro-batch `index` of epoch `epoch`: each global batch holds batch_size
// examples per rank, in epoch_order (`lengths` empty: no grouping), and rank r takes its r-th
// slice. As torch's DistributedSampler, an epoch's order is padded with its first examples to a
// multiple of the ranks, so that the last global batch splits evenly; alone, nothing is added
// and the batches are those of one process with the global batch size.
template <class Batch>
dt::BatchSource<Batch> shuffled_batches(int64_t n, int64_t batch_size, int64_t seed,
                                        std::function<Batch(const std::vector<int64_t>&)> make,
                                        std::vector<int64_t> lengths = {}, const Ranks& ranks = {}) {
  const int64_t world = ranks.world(), rank = ranks.rank(), global = batch_size * world;
  const int64_t padded = (n + world - 1) / world * world;
  auto order = std::make_shared<std::pair<int64_t, std::vector<int64_t>>>(-1, std::vector<int64_t>());  // (epoch, its order)
  return {(padded + global - 1) / global, [=](int64_t epoch, int64_t index) {
            if (order->first != epoch) {
              *order = {epoch, epoch_order(n, global, seed, epoch, lengths)};
              for (int64_t i = 0; int64_t(order->second.size()) < padded; ++i) order->second.push_back(order->second[size_t(i)]);
            }
            const int64_t share = std::min(global, padded - index * global) / world;
            const auto begin = order->second.begin() + index * global + rank * share;
            return make(std::vector<int64_t>(begin, begin + share));
          }};
}

// This rank's contiguous share of n rows, [rank n / world, (rank + 1) n / world).
inline std::vector<int64_t> shard(int64_t n, const Ranks& ranks) {
  std::vector<int64_t> rows;
  for (int64_t i = ranks.rank() * n / ranks.world(); i < (ranks.rank() + 1) * n / ranks.world(); ++i) rows.push_back(i);
  return rows;
}

// Every dev row, in order.
inline std::vector<int64_t> all_rows(int64_t n) { return shard(n, {}); }

// Each example's length, for --group-by-length (empty without it).
template <class Sequences>
std::vector<int64_t> lengths_if_grouped(const Flags& flags, const Sequences& sequences) {
  std::vector<int64_t> out;
  if (flags.group_by_length)
    for (const auto& s : sequences) out.push_back(int64_t(s.size()));
  return out;
}

// ---------------------------------------------------------------------------------------------
// Tokenizers of the built-in backbones' generated text (and T5's SentencePiece).

// A vocab.txt of generated text, in `dir`, for a BERT WordPieceTokenizer: BERT's specials, then
// every word and punctuation mark of `corpus`, lower-cased and split as BERT's pre-tokeniser does.
inline std::string write_word_vocabulary(const std::vector<std::string>& corpus, const std::string& dir,
                                         const char* what) {
  std::set<std::string> words;
  for (const auto& text : corpus) {
    std::string word;
    for (const char c : text + " ") {
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
  dt::detail::write_text_atomically(path, text, what);
  return path;
}

// T5's tokenizer: its SentencePiece model, or a word-level vocabulary of generated text (pad
// 0, eos 1, unk 2, <mask> 3, then every word of `corpus`, sorted: the same ids every run).
class Tokenizer {
 public:
  explicit Tokenizer(const std::string& spiece) : spiece_(std::make_shared<dt::T5Tokenizer>(spiece)) {}
  explicit Tokenizer(const std::vector<std::string>& corpus) {
    std::set<std::string> words;
    for (const auto& text : corpus)
      for (const auto& w : split(text, ' ')) words.insert(w);
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

// ---------------------------------------------------------------------------------------------
// Delta: each method's options at its published defaults, attached one after another.

// The methods --method offers: the method table's presets (methods/<name>.hpp), in its order.
inline std::vector<std::string> method_names() { return dt::builtin_methods().preset_names(); }

// A preset's peak learning rate on a backbone family ("t5", "bert"), as its paper tunes it.
inline double method_lr(const std::string& method, const std::string& family) {
  return dt::builtin_methods().preset(method).lr(family);
}

// The end of --help: every method's default learning rate on each backbone family.
inline std::string method_lr_usage() {
  std::string out = "\nMethods and default peak learning rates (--lr overrides them; the first method of a "
                    "combination decides):\n";
  for (const auto& name : method_names()) {
    const auto& preset = dt::builtin_methods().preset(name);
    out += fmt::format("  {:<12} T5 {:<6g} BERT {:<6g} {}\n", name, preset.lr("t5"), preset.lr("bert"), preset.description);
  }
  return out;
}

inline void add_method(dt::DeltaModel& model, const std::string& method, const Flags& flags) {
  dt::PresetSizes sizes;
  sizes.rank = flags.lora_r;
  sizes.reduction_factor = flags.reduction_factor;
  sizes.virtual_tokens = flags.virtual_tokens > 0 ? flags.virtual_tokens : method == "prompt" ? flags.prompt_tokens : 0;
  model.add(method, dt::builtin_methods().preset(method).make(sizes));
}

// --precision: the dtype the frozen backbone's weights are stored in. With --method full
// every weight trains, in float32, and the half precision is autocast's instead (Trainer's
// autocast option). float16 trains with dynamic loss scaling either way.
inline bool trains_every_weight(const std::vector<std::string>& methods) {
  return std::find(methods.begin(), methods.end(), "full") != methods.end();
}
inline std::optional<torch::ScalarType> half_precision(const Flags& flags) {
  if (flags.precision == "bf16") return torch::kBFloat16;
  if (flags.precision == "fp16") return torch::kHalf;
  return std::nullopt;
}
inline torch::ScalarType frozen_dtype(const Flags& flags, const std::vector<std::string>& methods) {
  const auto half = half_precision(flags);
  return half && !trains_every_weight(methods) ? *half : torch::kFloat;
}
inline std::string precision_line(const Flags& flags, const std::vector<std::string>& methods) {
  const auto half = half_precision(flags);
  if (!half) return "precision: float32\n";
  const auto type = *half == torch::kHalf ? "float16" : "bfloat16";
  const auto scaling = *half == torch::kHalf ? ", dynamic loss scaling" : "";
  if (trains_every_weight(methods))
    return fmt::format("precision: {} autocast (products in {}, every weight in float32{})\n", flags.precision, type,
                       scaling);
  return fmt::format("precision: {} (the frozen backbone's weights in {}; deltas, head and optimizer state in "
                     "float32{})\n", flags.precision, type, scaling);
}

// What the run does to the pretrained backbone, for the line that names it.
inline std::string backbone_role(const std::vector<std::string>& methods) {
  return trains_every_weight(methods) ? "every weight trained (--method full)" : "frozen";
}

// "--method adapter+bitfit" -> {adapter, bitfit}. Each step takes the longest method name that
// ends at a '+' or at the end, so that the pluses of "compacter++" stay in its name.
inline std::vector<std::string> parse_methods(const std::string& text) {
  const auto known = method_names();
  if (text.empty()) throw UsageError(fmt::format("--method is empty; choose from {}", fmt::join(known, ", ")));
  std::vector<std::string> methods;
  for (size_t at = 0;;) {
    std::string name;
    for (const auto& m : known) {
      const size_t end = at + m.size();
      if (m.size() > name.size() && text.compare(at, m.size(), m) == 0 && (end == text.size() || text[end] == '+'))
        name = m;
    }
    if (name.empty()) {
      const auto next = text.find('+', at);
      throw UsageError(fmt::format("unknown method '{}'; choose from {} (combine with '+')",
                                   text.substr(at, next == std::string::npos ? next : next - at), fmt::join(known, ", ")));
    }
    methods.push_back(name);
    at += name.size();
    if (at == text.size()) return methods;
    ++at;  // the '+' between two methods
  }
}

inline void attach(dt::DeltaModel& model, const std::vector<std::string>& methods, const Flags& flags, int64_t seed) {
  torch::manual_seed(uint64_t(seed));  // the deltas' initial values: the same for the reload check
  for (const auto& m : methods) add_method(model, m, flags);
}

// ---------------------------------------------------------------------------------------------
// The run: what a program hands over once its data, backbone and deltas are ready.

template <class Batch>
struct Job {
  const dt::GlueTask* task = nullptr;
  std::string family;                // "t5" or "bert": the learning-rate column
  std::vector<std::string> deltas;   // every delta to save and reload: the methods, and a head where there is one
  dt::DeltaModel* model = nullptr;
  std::function<torch::Tensor(const Batch&)> loss_fn;
  dt::BatchSource<Batch> batches;
  int64_t train_examples = 0;
  int64_t default_epochs = 3;
  bool builtin = false;
  std::vector<double> dev_labels;
  // Dev predictions of `model` for the given dev rows, in their order.
  std::function<std::vector<double>(const std::vector<int64_t>& rows)> predict;
  // Loads the deltas saved in the folder into a fresh backbone and returns its dev predictions.
  std::function<std::vector<double>(const std::string& delta_dir)> predict_reloaded;
  int64_t head_parameters = 0;       // of the trained count: the task head's (0 where the model has none)
  std::string head_prefix;           // the head's trainable tensors' names start so (--head-lr); "" without one
  Ranks ranks;                       // of a data-parallel launch (join_launch); alone by default
};

// The summary's "delta '<name>': <method> on ..." lines joined in one: where two ranks' deltas
// differ, it is the first line that differs and says how (the site tree above would not).
inline std::string delta_lines(const std::string& summary) {
  std::vector<std::string> deltas;
  std::istringstream in(summary);
  for (std::string line; std::getline(in, line);)
    if (line.rfind("delta '", 0) == 0) deltas.push_back(line);
  return fmt::format("{}\n", fmt::join(deltas, "; "));
}

// The closing table's one row, and results.json beside the run's other outputs.
inline void report(const Flags& flags, const dt::GlueTask& task, dt::DeltaModel& model, const dt::TrainSummary& summary,
                   double final_metric, double majority, int64_t head_parameters, double lr, int64_t epochs,
                   int64_t train_examples, bool reload_ok, int64_t ranks) {
  double epoch_seconds = 0;
  for (const auto s : summary.seconds_per_epoch) epoch_seconds += s;
  const double per_epoch = summary.seconds_per_epoch.empty() ? 0.0 : epoch_seconds / double(summary.seconds_per_epoch.size());
  const auto trained = model.num_trainable_parameters(), total = model.num_backbone_parameters();
  const double share = 100.0 * double(trained) / double(total);
  const auto& metric_name = task.metrics.front();
  const auto trained_text = head_parameters ? fmt::format("{} ({} head)", trained, head_parameters) : fmt::format("{}", trained);
  std::cout << "\n"
            << fmt::format("| {:<14} | {:>22} | {:>9} | {:>10} | {:>9} | {:>26} | {:>9} |\n", "method", "trained params",
                           "share", "time/epoch", "peak RSS", "best dev " + metric_name, "majority")
            << fmt::format("|{:-<16}|{:->24}|{:->11}|{:->12}|{:->11}|{:->28}|{:->11}|\n", "", "", "", "", "", "", "")
            << fmt::format("| {:<14} | {:>22} | {:>8.3f}% | {:>10} | {:>6} MB | {:>26} | {:>9} |\n", flags.method,
                           trained_text, share, summary.seconds_per_epoch.empty() ? "-" : fmt::format("{:.1f} s", per_epoch),
                           summary.peak_rss_bytes / (1024 * 1024),
                           fmt::format("{:.4f} (step {})", summary.best_metric, summary.best_step),
                           fmt::format("{:.4f}", majority));
  if (head_parameters)
    std::cout << fmt::format("trained params count everything the optimizer updates, the task head included; share "
                             "is of all {} parameters of the model, head included\n", total);
  const nlohmann::json results = {
      {"task", task.name}, {"method", flags.method}, {"metric", metric_name},
      {"best_metric", summary.best_metric}, {"best_step", summary.best_step}, {"final_metric", final_metric},
      {"majority", majority}, {"trained_params", trained}, {"head_params", head_parameters}, {"model_params", total},
      {"share_percent", share}, {"seconds_per_epoch", per_epoch}, {"epochs_timed", summary.seconds_per_epoch.size()},
      {"peak_rss_mb", summary.peak_rss_bytes / (1024 * 1024)}, {"train_examples", train_examples}, {"epochs", epochs},
      {"lr", lr}, {"head_lr", head_parameters ? nlohmann::json(flags.head_lr > 0 ? flags.head_lr : lr) : nlohmann::json()},
      {"steps", summary.steps}, {"skipped_updates", summary.skipped_updates}, {"reload_ok", reload_ok}, {"precision", flags.precision},
      {"device", flags.device}, {"ranks", ranks},
      {"command", flags.command}};
  dt::detail::write_text_atomically(flags.out + "/results.json", results.dump(2) + "\n", "results.json");
}

// The task head's own rate, where --head-lr gives one.
template <class Batch>
std::vector<dt::LrGroup> head_lr_groups(const Flags& flags, const Job<Batch>& job) {
  if (flags.head_lr <= 0) return {};
  return {{job.head_prefix, flags.head_lr}};
}

// Trains the job's deltas, saves them, reloads them into a fresh backbone and compares the
// dev predictions; prints the closing table. Returns the exit status: 0, or 3 on a mismatch.
template <class Batch>
int tune(const Flags& flags, Job<Batch>& job) {
  const auto& task = *job.task;
  auto& model = *job.model;
  const auto methods = parse_methods(flags.method);
  const double lr = flags.lr > 0 ? flags.lr : method_lr(methods.front(), job.family);
  const int64_t epochs = flags.epochs > 0 ? flags.epochs : job.default_epochs;
  // Compacter's 500 warm-up updates on GLUE, 10 on the built-in task; never more than a tenth of the run.
  const int64_t updates = flags.max_steps > 0 ? flags.max_steps
                          : epochs * ((job.train_examples + flags.batch_size - 1) / flags.batch_size);
  const int64_t warmup = std::min<int64_t>(job.builtin ? 10 : 500, updates / 10);
  std::cout << model.summary() << precision_line(flags, methods) << fmt::format("device: {}\n", run_device(flags).str());
  std::cout << fmt::format("hyper-parameters: method {}, lr {:g} ({}){}{}, {}, batch {}{}, AdamW, linear decay, warm-up "
                           "{} updates, seed {}\n", flags.method, lr, flags.lr > 0 ? "given" : "the method's default",
                           flags.head_lr > 0 ? fmt::format(", head lr {:g}", flags.head_lr) : "",
                           flags.loraplus_ratio != 1 ? fmt::format(", LoRA+ ratio {:g}", flags.loraplus_ratio) : "",
                           flags.max_steps > 0 ? fmt::format("{} updates", flags.max_steps)
                                               : fmt::format("{} epochs", epochs),
                           flags.batch_size, flags.group_by_length ? " (batches grouped by length)" : "", warmup,
                           flags.seed);

  const auto& ranks = job.ranks;
  if (ranks.group) {
    std::cout << fmt::format("data parallel: {} ranks, each {} examples of every global batch of {}; gradients "
                             "averaged over the ranks, rank 0 writes {}\n", ranks.world(), flags.batch_size,
                             flags.batch_size * ranks.world(), flags.out);
    ranks.group->check_same("the backbone, its deltas and the hyper-parameters",
                            fmt::format("backbone fingerprint {}\n{}lr {}, epochs {}, batch {}, seed {}, max steps {}\n{}",
                                        model.fingerprint(), delta_lines(model.summary()), lr, epochs, flags.batch_size,
                                        flags.seed, flags.max_steps, model.summary()));
  }

  // Train; the last evaluation's predictions are the final model's (nothing changes after it).
  // Each rank predicts its share of the dev set; every rank gets all, in order.
  const auto& metric_name = task.metrics.front();
  std::vector<double> predictions;
  const auto predict_dev = [&] {
    const auto mine = job.predict(shard(int64_t(job.dev_labels.size()), ranks));
    return ranks.group ? ranks.group->gather(mine, "the dev predictions") : mine;
  };
  auto evaluate = [&] {
    predictions = predict_dev();
    return dt::metric(metric_name, predictions, job.dev_labels);
  };
  auto save_all = [&](const std::string& dir) {
    for (const auto& d : job.deltas) model.save(d, dir + "/" + d);
  };
  dt::Trainer<Batch> trainer(dt::TrainerOptions().epochs(epochs).max_steps(flags.max_steps).lr(lr)
                                 .loraplus_lr_ratio(flags.loraplus_ratio)
                                 .lr_groups(head_lr_groups(flags, job))
                                 .warmup_steps(warmup).seed(uint64_t(flags.seed)).output_dir(flags.out)
                                 .resume(flags.resume)
                                 .autocast(trains_every_weight(methods) ? half_precision(flags) : std::nullopt)
                                 .loss_scale(flags.precision == "fp16" ? std::optional(dt::LossScaleOptions())
                                                                       : std::nullopt)
                                 .data_parallel(ranks.group),
                             model.named_trainable_parameters(), job.loss_fn, job.batches, evaluate, save_all);
  const auto summary = trainer.fit();
  if (predictions.empty()) predictions = predict_dev();  // a resumed run that had finished already
  if (!ranks.main()) return 0;  // rank 0 saves, checks the reload and reports, alone
  const double final_metric = dt::metric(metric_name, predictions, job.dev_labels);

  // Save the delta, reload it into a fresh backbone, compare.
  const auto delta_dir = flags.out + "/delta";
  save_all(delta_dir);
  const auto again = job.predict_reloaded(delta_dir);
  const auto same = int64_t(std::count_if(again.begin(), again.end(), [&, i = size_t(0)](double p) mutable {
    return p == predictions[i++];
  }));
  const bool ok = same == int64_t(again.size());
  std::cout << fmt::format("reload check: delta saved to {}/, loaded into a fresh backbone: {} of {} dev "
                           "predictions equal ({})\n", delta_dir, same, again.size(), ok ? "OK" : "MISMATCH");

  report(flags, task, model, summary, final_metric, majority_baseline(task, job.dev_labels), job.head_parameters, lr,
         epochs, job.train_examples, ok, ranks.world());
  std::cout << fmt::format("\nfinal dev {} {:.4f}; log {}/log.jsonl, curves {}/curves.png, best delta {}/best/, "
                           "final delta {}/, results {}/results.json\n", metric_name, final_metric, flags.out, flags.out,
                           flags.out, delta_dir, flags.out);
  return ok ? 0 : 3;
}

// main() of both programs: parse, run, and turn errors into messages and exit codes.
inline int run_main(int argc, char** argv, const std::string& program, const std::string& usage, const Flags& defaults,
                    const std::function<int(const Flags&)>& run) {
  try {
    const auto flags = parse_flags(argc, argv, defaults);
    if (!flags) {
      std::cout << usage << method_lr_usage();
      return 0;
    }
    if (flags->list_methods) {
      for (const auto& name : method_names()) std::cout << name << "\n";
      return 0;
    }
    check_model_exists(*flags);
    return run(*flags);
  } catch (const UsageError& e) {
    std::cerr << program << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << program << ": " << e.what() << "\n";
    return 1;
  }
}

}  // namespace finetune
