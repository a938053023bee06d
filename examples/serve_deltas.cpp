// serve_deltas: one frozen backbone in memory, many deltas, a stream of requests that each
// name their delta. Requests are batched (up to --batch-size of them, or what came within
// --max-wait-ms of the first), and each batch runs in one forward pass over mixed deltas
// (DeltaModel::route): classification on BERT, each delta's rows with the task head its run
// trained; greedy generation with the key/value cache on T5. Deltas are added and removed
// while serving, with no backbone reload.
//
// Requests are JSON lines, on stdin or in a file:
//   {"id": 7, "delta": "sst2", "text": "a gripping , touching film ."}
//   {"id": 8, "delta": "mrpc", "text": "He left .", "text_pair": "He went away ."}    BERT's sentence pairs
//   {"add": "rte", "path": "runs/rte/best/lora"}      a delta saved by DeltaModel::save
//   {"remove": "sst2"}
// and each request gets one line back, in the order answered:
//   {"id": 7, "delta": "sst2", "label": 1, "scores": [0.1, 0.9], "latency_ms": 3.1, "batch": 0, "batch_size": 64}
// ("text" in place of label and scores on T5; "error" for a request that cannot be served).
//
// With no --model it needs nothing from outside: a tiny random BERT (or T5, --backbone t5),
// deltas it makes with random values (by default LoRA, Houlsby adapter, Compacter, IA3) saved
// and loaded back as any delta, and generated requests that remove and re-add one midway.
//   serve_deltas --verify                          # each answer checked against the request run alone
//   serve_deltas --model all-MiniLM-L6-v2 --delta sst2=runs/sst2/best/lora
//                --delta mrpc=runs/mrpc/best/lora --requests requests.jsonl
#include "finetune_common.hpp"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <fstream>
#include <iostream>
#include <mutex>
#include <thread>

namespace dt = deltatune;
namespace bb = deltatune::backbones;
using finetune::UsageError;
using Clock = std::chrono::steady_clock;

namespace {

const char* const kUsage = R"(serve_deltas: serve many deltas on one frozen BERT or T5, requests batched over mixed deltas.

  --model DIR|FILE     Hugging Face BERT or T5 folder or TorchScript archive (default: a tiny
                       random backbone, with deltas made here)
  --backbone bert|t5   what --model is, or which tiny backbone to build (default: --model's
                       config.json model_type, else bert)
  --tokenizer FILE     vocab.txt (BERT) or spiece.model (T5) (default: beside --model)
  --delta NAME=DIR     serve the delta DeltaModel::save wrote to DIR under NAME (repeatable); on
                       BERT its task head comes from DIR/../head (finetune_bert's best/head)
  --labels N           BERT: the label count of the runs' heads (default 2)
  --seed N             BERT: the finetune_bert runs' --seed, which their backbone's new head
                       was drawn with (default 42)
  --requests FILE      JSON lines; - for stdin (default: generated requests)
  --out FILE           the answers, JSON lines (default: stdout)
  --batch-size N       requests per forward pass at most (default 64)
  --max-wait-ms N      how long a batch waits for more requests after its first (default 5)
  --max-length N       tokens per request text at most (default 128)
  --max-new-tokens N   T5: tokens generated per answer at most (default 8)
  --demo-deltas M,M... without --model: the deltas made, the method table's presets of those
                       names (default lora,adapter,compacter,prompt,ia3)
  --demo-requests N    the generated requests' count (default 256)
  --work DIR           where the tiny backbone's vocabulary, deltas and requests go (default
                       runs/serve_deltas)
  --threads N          torch threads (default: torch's own; the tiny backbone: 1)
  --verify             also answer each request alone, its delta the only one active and no
                       routing; a difference is reported and the exit status is 3
)";

struct Flags {
  std::string model, backbone, tokenizer, requests, out, work = "runs/serve_deltas";
  std::string demo_deltas = "lora,adapter,compacter,prompt,ia3";
  std::vector<std::pair<std::string, std::string>> deltas;  // --delta NAME=DIR, in order
  int64_t labels = 2, seed = 42, batch_size = 64, max_wait_ms = 5, max_length = 128, max_new_tokens = 8;
  int64_t demo_requests = 256, threads = 0;
  bool verify = false;
};

// Whole-number flags and the values they may take.
const std::map<std::string, std::pair<int64_t, int64_t>>& int_flags() {
  static const std::map<std::string, std::pair<int64_t, int64_t>> ranges{
      {"--labels", {1, 100000}},      {"--seed", {0, INT64_MAX}},        {"--batch-size", {1, 65536}},
      {"--max-wait-ms", {0, 600000}}, {"--max-length", {3, 100000}},     {"--max-new-tokens", {1, 100000}},
      {"--demo-requests", {1, 10000000}}, {"--threads", {1, 4096}}};
  return ranges;
}

int64_t& int_field(Flags& f, const std::string& flag) {
  if (flag == "--labels") return f.labels;
  if (flag == "--seed") return f.seed;
  if (flag == "--batch-size") return f.batch_size;
  if (flag == "--max-wait-ms") return f.max_wait_ms;
  if (flag == "--max-length") return f.max_length;
  if (flag == "--max-new-tokens") return f.max_new_tokens;
  if (flag == "--demo-requests") return f.demo_requests;
  return f.threads;
}

// The flags; nullopt for --help.
std::optional<Flags> parse_flags(int argc, char** argv) {
  Flags f;
  const std::map<std::string, std::string*> text{{"--model", &f.model},       {"--backbone", &f.backbone},
                                                 {"--tokenizer", &f.tokenizer}, {"--requests", &f.requests},
                                                 {"--out", &f.out},           {"--work", &f.work},
                                                 {"--demo-deltas", &f.demo_deltas}};
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") return std::nullopt;
    if (flag == "--verify") {
      f.verify = true;
      continue;
    }
    const bool known = text.count(flag) || int_flags().count(flag) || flag == "--delta";
    if (!known) throw UsageError(fmt::format("unknown flag '{}'; --help lists them", flag));
    if (i + 1 >= argc) throw UsageError(fmt::format("{} needs a value", flag));
    const std::string value = argv[++i];
    if (text.count(flag)) {
      *text.at(flag) = value;
    } else if (flag == "--delta") {
      const auto eq = value.find('=');
      if (eq == std::string::npos || eq == 0 || eq + 1 == value.size())
        throw UsageError(fmt::format("--delta expects NAME=DIR, got '{}'", value));
      f.deltas.emplace_back(value.substr(0, eq), value.substr(eq + 1));
    } else {
      const auto n = finetune::to_number<int64_t>(flag, value);
      const auto [low, high] = int_flags().at(flag);
      if (n < low || n > high) throw UsageError(fmt::format("{} must be in [{}, {}], got {}", flag, low, high, n));
      int_field(f, flag) = n;
    }
  }
  if (!f.backbone.empty() && f.backbone != "bert" && f.backbone != "t5")
    throw UsageError(fmt::format("--backbone must be bert or t5, got '{}'", f.backbone));
  if (f.model.empty() && !f.deltas.empty())
    throw UsageError("--delta needs the --model the deltas were trained on (without --model, deltas are made here)");
  if (!f.model.empty() && !std::filesystem::exists(f.model))
    throw UsageError(fmt::format("--model {}: no such file or folder", f.model));
  return f;
}

// --model's kind: --backbone, else its config.json's model_type, else BERT.
std::string backbone_kind(const Flags& flags) {
  if (!flags.backbone.empty()) return flags.backbone;
  const auto config = flags.model + "/config.json";
  if (flags.model.empty() || !std::filesystem::exists(config)) return "bert";
  const auto type = dt::read_json_file(config).value("model_type", std::string("bert"));
  return type == "t5" ? "t5" : "bert";
}

// ---------------------------------------------------------------------------------------------
// Requests in, answers out.

// A line of the request stream: a request, or a command that changes the deltas served.
struct Item {
  enum class Kind { request, add, remove, bad } kind = Kind::request;
  nlohmann::json id;
  std::string delta, text, pair, path, error;  // pair: BERT's second text; error: why a bad line is refused
  Clock::time_point arrived;
};

// One line, parsed; a malformed line becomes a `bad` item that names what is wrong.
Item parse_line(const std::string& line, int64_t number) {
  Item item;
  item.arrived = Clock::now();
  item.id = number;
  try {
    const auto j = nlohmann::json::parse(line);
    if (!j.is_object()) throw std::runtime_error("not a JSON object");
    auto text_field = [&](const char* key) {
      if (!j.contains(key) || !j[key].is_string()) throw std::runtime_error(fmt::format("no string field \"{}\"", key));
      return j[key].get<std::string>();
    };
    if (j.contains("add")) {
      item.kind = Item::Kind::add, item.delta = text_field("add"), item.path = text_field("path");
    } else if (j.contains("remove")) {
      item.kind = Item::Kind::remove, item.delta = text_field("remove");
    } else {
      if (j.contains("id")) item.id = j["id"];
      item.delta = j.contains("delta") ? text_field("delta") : std::string("__base__");
      item.text = text_field("text");
      if (j.contains("text_pair")) item.pair = text_field("text_pair");
    }
  } catch (const std::exception& e) {
    item.kind = Item::Kind::bad;
    item.error = fmt::format("request line {}: {}; a request is {{\"id\": ..., \"delta\": NAME, \"text\": TEXT}}",
                             number, e.what());
  }
  return item;
}

// Lines read on a thread of their own, so that a batch can wait for more while one runs.
class RequestQueue {
 public:
  explicit RequestQueue(std::istream& in) : reader_([this, &in] { read(in); }) {}
  ~RequestQueue() { reader_.join(); }

  // The next batch: commands one at a time; else up to `size` requests, waiting until `wait`
  // after the first one arrived for more. Empty at the end of the stream.
  std::vector<Item> next(int64_t size, std::chrono::milliseconds wait) {
    std::unique_lock<std::mutex> lock(mutex_);
    ready_.wait(lock, [&] { return !items_.empty() || ended_; });
    if (items_.empty()) return {};
    if (items_.front().kind != Item::Kind::request) return {take()};
    const auto deadline = items_.front().arrived + wait;
    ready_.wait_until(lock, deadline, [&] { return ended_ || requests_in_front() >= size; });
    std::vector<Item> batch;
    for (int64_t n = std::min(size, requests_in_front()); n > 0; --n) batch.push_back(take());
    return batch;
  }

 private:
  void read(std::istream& in) {
    std::string line;
    for (int64_t number = 1; std::getline(in, line); ++number) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      auto item = parse_line(line, number);
      std::lock_guard<std::mutex> lock(mutex_);
      items_.push_back(std::move(item));
      ready_.notify_one();
    }
    std::lock_guard<std::mutex> lock(mutex_);
    ended_ = true;
    ready_.notify_one();
  }
  int64_t requests_in_front() const {
    int64_t n = 0;
    while (n < int64_t(items_.size()) && items_[size_t(n)].kind == Item::Kind::request) ++n;
    return n;
  }
  Item take() {  // the mutex held
    auto item = std::move(items_.front());
    items_.pop_front();
    return item;
  }

  std::mutex mutex_;
  std::condition_variable ready_;
  std::deque<Item> items_;
  bool ended_ = false;
  std::thread reader_;  // last: it starts once the rest is built
};

// ---------------------------------------------------------------------------------------------
// The backbones: a batch of texts, each with its delta, in; one answer each out.

class Backbone {
 public:
  virtual ~Backbone() = default;
  virtual dt::DeltaModel& model() = 0;
  // Answers for the requests, each run with its delta (a model's delta or "__base__"): routed
  // per row, or, where `routed` is false, through every active delta (--verify: one row, one delta).
  virtual std::vector<nlohmann::json> answer(const std::vector<const Item*>& requests, bool routed = true) = 0;
  // Why the backbone cannot answer this request, or "" where it can.
  virtual std::string refuses(const Item& /*request*/) const { return ""; }
  // A delta was loaded from `dir` as `name` (BERT: its head too), or is about to be removed.
  virtual void added(const std::string& /*name*/, const std::string& /*dir*/) {}
  virtual void removed(const std::string& /*name*/) {}
};

// Rows padded with `value` to the longest: (B, longest).
torch::Tensor pad_rows(const std::vector<std::vector<int64_t>>& rows, int64_t value) {
  std::vector<int64_t> all(rows.size());
  std::iota(all.begin(), all.end(), 0);
  return finetune::pad(rows, all, value);
}

// run(), with rows routed to `deltas` where `routed`.
template <class Run>
torch::Tensor with_routing(dt::DeltaModel& model, const std::vector<std::string>& deltas, bool routed, Run run) {
  if (!routed) return run();
  auto routing = model.route(deltas);
  return run();
}

// BERT: the pooled [CLS] of each row through its delta, then the task head its run trained.
class BertBackbone : public Backbone {
 public:
  BertBackbone(bb::BertForSequenceClassification bert, dt::WordPieceTokenizer tok, int64_t max_length)
      : bert_(std::move(bert)), tok_(std::move(tok)), model_(bert_), max_length_(max_length) {
    bert_->eval();
  }
  dt::DeltaModel& model() override { return model_; }

  std::vector<nlohmann::json> answer(const std::vector<const Item*>& requests, bool routed) override {
    std::vector<std::vector<int64_t>> ids, types;
    std::vector<std::string> deltas;
    for (const auto* r : requests) {
      auto e = r->pair.empty() ? tok_.encode(r->text, max_length_) : tok_.encode(r->text, r->pair, max_length_);
      ids.push_back(std::move(e.ids)), types.push_back(std::move(e.type_ids)), deltas.push_back(r->delta);
    }
    const auto raw = pad_rows(ids, -1), mask = raw.ge(0);
    torch::NoGradGuard no_grad;
    const auto pooled = with_routing(model_, deltas, routed, [&] {
      return bert_->bert->forward(raw.masked_fill(~mask, tok_.pad_id()), mask.to(torch::kLong), pad_rows(types, 0))
          .pooler_output;
    });
    std::vector<nlohmann::json> out(requests.size());
    for (const auto& [name, rows] : rows_by_delta(deltas)) {
      const auto index = torch::tensor(rows, torch::kLong);
      const auto& head = heads_.count(name) ? heads_.at(name) : Head{bert_->classifier->weight, bert_->classifier->bias};
      const auto scores = torch::softmax(torch::nn::functional::linear(pooled.index_select(0, index), head.weight,
                                                                      head.bias), -1).to(torch::kDouble).contiguous();
      for (size_t r = 0; r < rows.size(); ++r) {
        const auto row = scores[int64_t(r)];
        out[size_t(rows[r])] = {{"label", row.argmax().item<int64_t>()},
                                {"scores", std::vector<double>(row.data_ptr<double>(), row.data_ptr<double>() + row.numel())}};
      }
    }
    return out;
  }

  // The head finetune_bert trained with the delta, saved beside it (its best/head).
  void added(const std::string& name, const std::string& dir) override {
    const auto path = (std::filesystem::path(dir).parent_path() / "head" / "delta.safetensors").string();
    dt::detail::check<dt::CheckpointError>(std::filesystem::exists(path), "delta '{}': no task head at {}; a BERT "
                                           "delta is served with the head its run trained (finetune_bert saves it "
                                           "as head/ beside the delta)", name, path);
    const auto tensors = dt::read_safetensors(path).tensors;
    auto tensor = [&](const std::string& key, std::vector<int64_t> shape) {
      const auto it = tensors.find(key);
      dt::detail::check<dt::CheckpointError>(it != tensors.end() && it->second.sizes() == c10::IntArrayRef(shape),
                                             "{}: needs tensor {} of shape {} (the head of a run with --labels {} on "
                                             "this model)", path, key, fmt::format("{}", shape), shape.front());
      return it->second.to(bert_->classifier->weight.dtype());
    };
    const auto labels = bert_->classifier->weight.size(0), width = bert_->classifier->weight.size(1);
    heads_[name] = {tensor("backbone.classifier.weight", {labels, width}), tensor("backbone.classifier.bias", {labels})};
  }
  void removed(const std::string& name) override { heads_.erase(name); }

 private:
  struct Head {
    torch::Tensor weight, bias;
  };
  static std::map<std::string, std::vector<int64_t>> rows_by_delta(const std::vector<std::string>& deltas) {
    std::map<std::string, std::vector<int64_t>> rows;
    for (size_t i = 0; i < deltas.size(); ++i) rows[deltas[i]].push_back(int64_t(i));
    return rows;
  }

  bb::BertForSequenceClassification bert_;
  dt::WordPieceTokenizer tok_;
  dt::DeltaModel model_;
  int64_t max_length_;
  std::map<std::string, Head> heads_;
};

// T5: greedy generation, every row through its delta at every step.
class T5Backbone : public Backbone {
 public:
  T5Backbone(bb::T5Model t5, finetune::Tokenizer tok, int64_t max_length, int64_t max_new_tokens)
      : t5_(std::move(t5)), tok_(std::move(tok)), model_(t5_), max_length_(max_length), max_new_tokens_(max_new_tokens) {
    t5_->eval();
  }
  dt::DeltaModel& model() override { return model_; }
  std::string refuses(const Item& request) const override {
    if (request.pair.empty()) return "";
    return "T5 reads one text: give the input as its delta was trained on it (e.g. \"rte sentence1: ... "
           "sentence2: ...\"), with no text_pair";
  }

  std::vector<nlohmann::json> answer(const std::vector<const Item*>& requests, bool routed) override {
    std::vector<std::vector<int64_t>> ids;
    std::vector<std::string> deltas;
    for (const auto* r : requests) ids.push_back(tok_.encode(r->text, max_length_)), deltas.push_back(r->delta);
    const auto input = pad_rows(ids, t5_->config.pad_token_id());
    const auto mask = pad_rows(ids, -1).ge(0).to(torch::kLong);
    const auto generated = with_routing(model_, deltas, routed, [&] {
      return t5_->generate_greedy(input, mask, max_new_tokens_).contiguous();  // (B, 1 + n)
    });
    std::vector<nlohmann::json> out;
    for (int64_t r = 0; r < generated.size(0); ++r) {
      std::vector<int64_t> tokens;
      for (int64_t t = 1; t < generated.size(1); ++t) {
        const auto id = generated[r][t].item<int64_t>();
        if (id == t5_->config.eos_token_id() || id == t5_->config.pad_token_id()) break;
        tokens.push_back(id);
      }
      out.push_back({{"text", tok_.decode(tokens)}, {"tokens", tokens}});
    }
    return out;
  }

 private:
  bb::T5Model t5_;
  finetune::Tokenizer tok_;
  dt::DeltaModel model_;
  int64_t max_length_, max_new_tokens_;
};

// ---------------------------------------------------------------------------------------------
// The server: deltas added and removed, batches answered.

// Refuses a delta whose saved backbone tensors (adapters' layer norms) differ from this
// backbone's: every row shares them, so loading them would change every other delta's rows.
void check_shared_tensors_unchanged(dt::DeltaModel& model, const std::string& name, const std::string& dir) {
  const auto path = dir + "/delta.safetensors";
  dt::detail::check<dt::CheckpointError>(std::filesystem::exists(path), "delta '{}': no {} (give the folder "
                                         "DeltaModel::save wrote, e.g. a finetune run's best/<method>)", name, path);
  std::map<std::string, torch::Tensor> backbone;
  for (const auto& p : model.backbone().named_parameters()) backbone[p.key()] = p.value();
  for (const auto& [key, tensor] : dt::read_safetensors(path).tensors) {
    if (key.rfind("backbone.", 0) != 0) continue;
    const auto it = backbone.find(key.substr(9));
    const bool same = it != backbone.end() && it->second.sizes() == tensor.sizes() &&
                      torch::equal(it->second, tensor.to(it->second.dtype()));
    dt::detail::check<dt::OptionError>(same, "delta '{}' ({}) changed the backbone's {}, which every request "
                                       "shares; it cannot be served beside other deltas; serve it on a "
                                       "backbone of its own",
                                       name, path, key.substr(9));
  }
}

class Server {
 public:
  Server(std::unique_ptr<Backbone> backbone, const Flags& flags, std::ostream& out)
      : backbone_(std::move(backbone)), flags_(flags), out_(out) {}

  // Loads a saved delta, with no change to the backbone: a delta that would change tensors
  // every row shares (layer norms an adapter trained) is refused, as is one that cannot be
  // routed per row (prefix tuning's keys reach every row; spec tuning trains the backbone).
  void add(const std::string& name, const std::string& dir) {
    auto& model = backbone_->model();
    dt::detail::check<dt::OptionError>(!model.deltas().count(name), "delta '{}' is served already; remove it first", name);
    check_shared_tensors_unchanged(model, name, dir);
    const auto start = Clock::now();
    const auto& entry = model.load(name, dir);
    const auto method = entry.recipe->method();
    try {
      model.check_routable(name);
      backbone_->added(name, dir);
    } catch (...) {
      model.remove(name);
      throw;
    }
    const auto ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    const auto [parameters, bytes] = delta_size(name);
    std::cerr << fmt::format("serve_deltas: delta '{}' ({}, {} parameters, {:.1f} KB) loaded from {} in {:.1f} ms; "
                             "the backbone was not reloaded\n", name, method, parameters, double(bytes) / 1024, dir, ms);
  }

  void remove(const std::string& name) {
    auto& model = backbone_->model();
    dt::detail::check<dt::OptionError>(model.deltas().count(name) > 0, "no delta '{}' is served", name);
    backbone_->removed(name);
    model.remove(name);
    std::cerr << fmt::format("serve_deltas: delta '{}' removed\n", name);
  }

  // Answers every line of `in`; returns the exit status (3: --verify found a difference).
  int serve(std::istream& in) {
    RequestQueue queue(in);
    const auto wait = std::chrono::milliseconds(flags_.max_wait_ms);
    const auto start = Clock::now();
    for (auto items = queue.next(flags_.batch_size, wait); !items.empty();
         items = queue.next(flags_.batch_size, wait)) {
      if (items.front().kind == Item::Kind::request) answer(items);
      else command(items.front());
    }
    report(std::chrono::duration<double>(Clock::now() - start).count());
    return mismatches_ ? 3 : 0;
  }

 private:
  void command(const Item& item) {
    try {
      if (item.kind == Item::Kind::bad) throw std::runtime_error(item.error);
      if (item.kind == Item::Kind::add) add(item.delta, item.path);
      else remove(item.delta);
    } catch (const std::exception& e) {
      write({{"id", item.id}, {"error", e.what()}});
    }
  }

  // One forward pass for the batch's servable requests; the others get an error each.
  void answer(const std::vector<Item>& items) {
    std::vector<const Item*> served;
    for (const auto& item : items) {
      const bool known = item.delta == "__base__" || item.delta.empty() || backbone_->model().deltas().count(item.delta);
      const auto problem = known ? backbone_->refuses(item)
                                 : fmt::format("no delta '{}' is served; served: {}", item.delta, served_names());
      if (problem.empty()) served.push_back(&item);
      else write({{"id", item.id}, {"delta", item.delta}, {"error", problem}});
    }
    if (served.empty()) return;
    const auto begin = Clock::now();
    const auto answers = backbone_->answer(served);
    const auto done = Clock::now();
    forwards_.push_back(std::chrono::duration<double, std::milli>(done - begin).count());
    for (size_t i = 0; i < served.size(); ++i) {
      auto line = answers[i];
      line["id"] = served[i]->id;
      line["delta"] = served[i]->delta;
      line["latency_ms"] = std::chrono::duration<double, std::milli>(done - served[i]->arrived).count();
      line["batch"] = batches_;
      line["batch_size"] = served.size();
      latencies_.push_back(line["latency_ms"].get<double>());
      if (flags_.verify) verify(*served[i], answers[i], line);
      write(line);
    }
    ++batches_;
  }

  // The request alone: its delta the only one active, no routing.
  void verify(const Item& item, const nlohmann::json& answer, nlohmann::json& line) {
    auto& model = backbone_->model();
    std::map<std::string, bool> was;
    for (const auto& [name, entry] : model.deltas()) was[name] = entry.active, model.set_active(name, name == item.delta);
    auto alone = backbone_->answer({&item}, /*routed=*/false).front();
    for (const auto& [name, active] : was) model.set_active(name, active);
    const bool same = alone.contains("tokens") ? alone["tokens"] == answer["tokens"] : same_scores(alone, answer);
    line["verified"] = same;
    if (!same) ++mismatches_, line["alone"] = alone;
  }
  // Equal labels, and scores equal to float32 rounding (a batch sums in another order).
  static bool same_scores(const nlohmann::json& a, const nlohmann::json& b) {
    if (a["label"] != b["label"]) return false;
    for (size_t i = 0; i < a["scores"].size(); ++i)
      if (std::abs(a["scores"][i].get<double>() - b["scores"][i].get<double>()) > 1e-5) return false;
    return true;
  }

  void write(const nlohmann::json& line) { out_ << line.dump() << "\n" << std::flush; }

  std::string served_names() const {
    std::vector<std::string> names;
    for (const auto& [name, entry] : backbone_->model().deltas()) names.push_back(name);
    return names.empty() ? "none" : fmt::format("{}", fmt::join(names, ", "));
  }
  // A delta's parameter count and bytes.
  std::pair<int64_t, int64_t> delta_size(const std::string& name) {
    int64_t count = 0, bytes = 0;
    for (const auto& [key, p] : backbone_->model().named_delta_parameters(name)) {
      count += p.numel();
      bytes += p.numel() * p.element_size();
    }
    return {count, bytes};
  }

  // Throughput, latency (from a request's arrival to its answer, waiting included) and the
  // forward passes' own time, on stderr.
  void report(double seconds) const {
    auto quantile = [](std::vector<double> v, double q) {
      std::sort(v.begin(), v.end());
      return v.empty() ? 0.0 : v[size_t(q * double(v.size() - 1))];
    };
    const auto& l = latencies_;
    std::cerr << fmt::format("serve_deltas: {} requests in {} batches, {:.1f} s, {:.1f} requests/s; latency p50 {:.1f} "
                             "ms, p95 {:.1f} ms, max {:.1f} ms; a batch's forward p50 {:.1f} ms{}\n", l.size(), batches_,
                             seconds, seconds > 0 ? double(l.size()) / seconds : 0.0, quantile(l, 0.5),
                             quantile(l, 0.95), quantile(l, 1.0), quantile(forwards_, 0.5),
                             flags_.verify ? fmt::format("; verified {} of {} answers equal to the request run alone",
                                                         int64_t(l.size()) - mismatches_, l.size())
                                           : "");
  }

  std::unique_ptr<Backbone> backbone_;
  const Flags& flags_;
  std::ostream& out_;
  int64_t batches_ = 0, mismatches_ = 0;
  std::vector<double> latencies_, forwards_;  // ms: each answer's, each batch's forward
};

// ---------------------------------------------------------------------------------------------
// The backbone: --model, or a tiny random one with deltas made here.

// The generated reviews' texts: the tiny backbones' vocabulary and the generated requests.
std::vector<std::string> review_texts(int64_t n) {
  std::vector<std::string> out;
  for (const auto& e : finetune::generate_reviews(n, 1)) out.push_back(e.text_a);
  return out;
}

std::unique_ptr<Backbone> make_backbone(const Flags& flags, const std::string& kind) {
  const bool tiny = flags.model.empty();
  if (kind == "t5") {
    auto tok = tiny ? finetune::Tokenizer(review_texts(2000))
                    : finetune::Tokenizer(
                          finetune::tokenizer_path(flags.model, flags.tokenizer, "spiece.model", "T5's spiece.model"));
    torch::manual_seed(uint64_t(flags.seed));
    auto t5 = tiny ? bb::T5Model(bb::T5Config().vocab_size(tok.vocab_size()).d_model(128).d_kv(32).d_ff(256)
                                     .num_layers(2).num_heads(4).dropout_rate(0))
                   : bb::load_t5(flags.model);
    return std::make_unique<T5Backbone>(t5, std::move(tok), flags.max_length, flags.max_new_tokens);
  }
  std::filesystem::create_directories(flags.work);
  dt::WordPieceTokenizer tok(tiny ? finetune::write_word_vocabulary(review_texts(2000), flags.work, "serve_deltas' vocab.txt")
                                  : finetune::tokenizer_path(flags.model, flags.tokenizer, "vocab.txt", "BERT's vocab.txt"));
  // Seeded as finetune_bert seeds it, so that the new head is the one its runs started from
  // (it is part of the backbone's fingerprint, which their deltas carry).
  torch::manual_seed(uint64_t(flags.seed));
  auto bert = tiny ? bb::BertForSequenceClassification(bb::BertConfig().vocab_size(tok.vocab_size()).hidden_size(128)
                                                           .num_hidden_layers(2).num_attention_heads(4)
                                                           .intermediate_size(256).max_position_embeddings(256)
                                                           .num_labels(flags.labels))
                   : bb::load_bert_classifier(flags.model, flags.labels);
  return std::make_unique<BertBackbone>(bert, std::move(tok), flags.max_length);
}

// The tiny backbone's deltas: --demo-deltas, the method table's presets of those names, with
// random values (so that each changes the answers), saved as finetune runs save theirs,
// <work>/deltas/<name>/delta with a BERT head beside it. The backbone's own tensors are left as
// they are.
std::vector<std::pair<std::string, std::string>> make_demo_deltas(Backbone& backbone, const Flags& flags, bool bert) {
  auto& model = backbone.model();
  std::vector<std::pair<std::string, std::string>> made;
  torch::manual_seed(uint64_t(flags.seed) + 1);
  for (const auto& name : finetune::split(flags.demo_deltas, ',')) {
    const auto dir = fmt::format("{}/deltas/{}", flags.work, name);
    try {
      model.add(name, dt::builtin_methods().preset(name).make({}));
    } catch (const dt::OptionError& e) {
      throw UsageError(fmt::format("--demo-deltas {}: {}", flags.demo_deltas, e.what()));
    }
    torch::NoGradGuard no_grad;
    for (auto& [key, p] : model.named_delta_parameters(name)) p.add_(torch::randn_like(p) * 0.5);
    model.save(name, dir + "/delta");
    model.remove(name);
    if (bert) {  // a head of random values as finetune_bert saves its own: head/delta.safetensors
      const auto weight = model.backbone().named_parameters()["classifier.weight"];
      std::filesystem::create_directories(dir + "/head");
      dt::write_safetensors(dir + "/head/delta.safetensors",
                            {{"backbone.classifier.weight", torch::randn_like(weight)},
                             {"backbone.classifier.bias", torch::randn({weight.size(0)})}},
                            {{"format", "pt"}});
    }
    made.emplace_back(name, dir + "/delta");
  }
  return made;
}

// The generated requests: reviews sent to each delta and the bare backbone in turn; midway the
// last delta is removed, and added back a quarter later (its requests go to the first meanwhile).
std::string write_demo_requests(const Flags& flags, const std::vector<std::pair<std::string, std::string>>& deltas) {
  const auto texts = review_texts(flags.demo_requests);
  std::string lines;
  const int64_t n = flags.demo_requests, k = int64_t(deltas.size()) + 1;
  const auto& [last, last_path] = deltas.back();
  for (int64_t i = 0; i < n; ++i) {
    if (i == n / 2) lines += nlohmann::json{{"remove", last}}.dump() + "\n";
    if (i == 3 * n / 4) lines += nlohmann::json{{"add", last}, {"path", last_path}}.dump() + "\n";
    auto name = i % k == k - 1 ? std::string("__base__") : deltas[size_t(i % k)].first;
    if (name == last && i >= n / 2 && i < 3 * n / 4) name = deltas.front().first;
    lines += nlohmann::json{{"id", i}, {"delta", name}, {"text", texts[size_t(i)]}}.dump() + "\n";
  }
  const auto path = flags.work + "/requests.jsonl";
  dt::detail::write_text_atomically(path, lines, "serve_deltas' generated requests");
  return path;
}

int run(const Flags& flags) {
  const auto kind = backbone_kind(flags);
  if (flags.threads > 0 || flags.model.empty()) torch::set_num_threads(int(flags.threads > 0 ? flags.threads : 1));
  auto backbone = make_backbone(flags, kind);
  auto deltas = flags.deltas;
  if (flags.model.empty()) deltas = make_demo_deltas(*backbone, flags, kind == "bert");
  auto requests = flags.requests;
  if (requests.empty()) requests = write_demo_requests(flags, deltas);

  std::ofstream file;
  if (!flags.out.empty()) {
    file.open(flags.out);
    if (!file) throw UsageError(fmt::format("--out {}: cannot write there", flags.out));
  }
  Server server(std::move(backbone), flags, flags.out.empty() ? std::cout : file);
  for (const auto& [name, dir] : deltas) server.add(name, dir);
  std::cerr << fmt::format("serve_deltas: {} on {}, {} deltas; requests from {}, batches of up to {} waiting {} ms\n",
                           flags.model.empty() ? "a tiny random " + kind : flags.model, kind, deltas.size(),
                           requests == "-" ? "stdin" : requests, flags.batch_size, flags.max_wait_ms);
  if (requests == "-") return server.serve(std::cin);
  std::ifstream in(requests);
  if (!in) throw UsageError(fmt::format("--requests {}: cannot read it", requests));
  return server.serve(in);
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
    std::cerr << "serve_deltas: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "serve_deltas: " << e.what() << "\n";
    return 1;
  }
}
