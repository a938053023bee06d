// delta_bench: one row of benchmarks/peft_bench.py on our side, in its own process: a T5
// loaded with load_t5 from a Hugging Face folder, one delta-tuning method attached through
// DeltaModel, then either training steps (zero_grad, forward, backward, AdamW on the trainable
// parameters) or inference forwards (eval, no grad), median milliseconds and peak memory.
//
// Prints one JSON line (prefix "JSON ").
//   delta_bench --model DIR --method M [--mode train|infer] [--batch 8] [--src 128] [--tgt 8]
//               [--steps 5] [--warmup 2] [--threads 0] [--device cpu|cuda] [--profile 0|1]
//               [--interleave N] [--mixed K --gather 0|1] [--backbone t5|bert] [--precision fp32|bf16]
//               [--lean-dropout 0|1]
// Methods: any preset of the method table (deltatune::builtin_methods(), the examples' --method);
// lora-dropout (LoRA with dropout 0.1); for --mode infer also bare (no delta) and lora-merged.
//
// Peak memory: on CPU the process's RSS high-water mark (VmHWM), reset after loading the
// model so that the checkpoint's transient copy does not count (load_peak_mb reports it); on
// CUDA the caching allocator's peak allocated bytes. On CPU also alloc_mb, the tensors at rest
// plus the most a step allocates above them (torch's allocator reports), and, training,
// kept_mb: the tensor bytes a forward keeps for backward, live once it returns.
//
// --interleave N (inference, a method): after the timed steps, N forwards of the model with the
// method alternate with N of a second, bare copy of the backbone, and the median of the N
// paired ratios is reported (interleaved_ratio): both see the same machine, however it drifts.
//
// --mixed K (inference, --method lora): K LoRA deltas (r 8 on q, v, B drawn at random so that
// each acts), batch row i routed to delta i mod K (DeltaModel::route); --gather 1 runs their rows
// in batched products with gathered factors, --gather 0 one delta at a time, as peft does.
// benchmarks/routing_bench.py runs it against peft's mixed batch. --backbone bert: the same on a
// BERT (MiniLM), inference only (bert_infer).
//
// --precision bf16 (T5): the frozen backbone loaded in bfloat16, the deltas and optimizer state
// in float32 (core/precision.hpp); --method full trains every weight in float32 under bf16
// autocast instead, as peft_bench.py runs the peers.
//
// Under tools/launch (--mode train): each rank trains on its own batch of --batch rows and the
// trainable tensors' gradients are all-reduced after backward (GradientSync), as the Trainer
// does; rank 0 prints, with "ranks" and "allreduce_bytes" (what each rank sends in per step).
// benchmarks/data_parallel_bench.py runs it at 1 and 2 ranks.
//
// --profile 1: after the timed steps, as many again under an operator profile (op_profile.hpp),
// printed per step with those steps' median time as a second line (prefix "OPS ").
#include <deltatune/deltatune.hpp>
#include <deltatune/train/process_group.hpp>

#include "memory_profile.hpp"
#include "op_profile.hpp"
#include "timing.hpp"

#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#ifdef DELTATUNE_BENCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace dt = deltatune;
using dt::bench::median;
using dt::bench::times_ms;

namespace {

// "VmHWM" or "VmRSS" of this process in MiB, from /proc/self/status; -1 where unreadable.
double proc_status_mb(const std::string& field) {
  std::ifstream status("/proc/self/status");
  std::string line;
  while (std::getline(status, line))
    if (line.rfind(field + ":", 0) == 0) return std::stod(line.substr(field.size() + 1)) / 1024.0;  // kB
  return -1;
}

// Resets VmHWM to the current RSS (Linux >= 4.0), so the next reading is the peak from now on.
void reset_peak_rss() { std::ofstream("/proc/self/clear_refs") << "5"; }

double peak_mb([[maybe_unused]] const torch::Device& device) {
#ifdef DELTATUNE_BENCH_CUDA
  namespace allocator = c10::cuda::CUDACachingAllocator;
  if (device.is_cuda())
    return double(allocator::getDeviceStats(device.has_index() ? device.index() : 0).allocated_bytes[0].peak) / (1 << 20);
#endif
  return proc_status_mb("VmHWM");
}

void reset_peak([[maybe_unused]] const torch::Device& device) {
#ifdef DELTATUNE_BENCH_CUDA
  if (device.is_cuda()) return c10::cuda::CUDACachingAllocator::resetPeakStats(device.has_index() ? device.index() : 0);
#endif
  reset_peak_rss();
}

// The method as the method table's preset of that name (the examples' --method) makes it:
// LoRA r 8 on q, v; IA3 on k, v, wo; prefix 30 positions through the MLP; prompt 100; the
// adapters' paper settings; full: every backbone parameter. peft_bench.py gives the peers
// the same sizes (LoRA's alpha, which does not change the cost, aside). "lora-merged" is
// LoRA folded into the weights, "lora-dropout" LoRA with the dropout 0.1 on its input that peft
// recipes commonly set (lora_dropout), "bare" no delta.
void add_method(dt::DeltaModel& model, const std::string& method) {
  if (method == "bare") return;
  const auto& table = dt::builtin_methods();
  const auto& preset = table.preset(method == "lora-merged" || method == "lora-dropout" ? "lora" : method);
  if (method == "lora-dropout") {  // the lora preset's recipe, rebuilt from its options with the dropout set
    auto options = preset.make({})->options_json();
    options["dropout"] = 0.1;
    model.add("lora", table.method("lora", "delta_bench").recipe_from_json(dt::JsonFields(options, "lora-dropout")));
    return;
  }
  model.add(preset.name, preset.make({}));
  if (method == "lora-merged") model.merge("lora");
}

// K LoRA deltas as the "lora" preset makes them, B random (at 0 a delta would add nothing), and
// the routing that sends batch row i to delta i mod K.
std::vector<std::string> add_mixed_loras(dt::DeltaModel& model, int64_t k, int64_t batch) {
  const auto& preset = dt::builtin_methods().preset("lora");
  std::vector<std::string> names, per_row;
  for (int64_t i = 0; i < k; ++i) {
    names.push_back(fmt::format("lora{}", i));
    model.add(names.back(), preset.make({}));
    torch::NoGradGuard no_grad;
    for (auto& [key, p] : model.named_delta_parameters(names.back()))
      if (key.find("lora_B") != std::string::npos) p.normal_(0, 0.01);
  }
  for (int64_t row = 0; row < batch; ++row) per_row.push_back(names[size_t(row % k)]);
  return per_row;
}

// n forwards of `step` alternating with n of `bare_step`: their medians and the median of the
// n ratios step / bare_step, each pair timed back to back.
nlohmann::json interleaved(const std::function<void()>& step, const std::function<void()>& bare_step, int n,
                           const torch::Device& device) {
  std::vector<double> with, without, ratios;
  for (int i = 0; i < n; ++i) {
    with.push_back(times_ms(step, 1, 0, device)[0]);
    without.push_back(times_ms(bare_step, 1, 0, device)[0]);
    ratios.push_back(with.back() / without.back());
  }
  return {{"interleaved_ms", median(with)}, {"interleaved_bare_ms", median(without)},
          {"interleaved_ratio", median(ratios)}};
}

// The CPU figure beside the RSS, as the peer's: the tensors at rest (weights, buffers, deltas,
// optimizer state) plus the most that one more step allocates above them.
nlohmann::json allocated_mb(const std::function<void()>& step, const std::vector<torch::Tensor>& at_rest) {
  const double rest = double(deltatune::bench::storage_bytes(at_rest)) / (1 << 20);
  const deltatune::bench::AllocationPeak peak;
  step();
  return {{"rest_mb", rest}, {"alloc_mb", rest + double(peak.peak_bytes()) / (1 << 20)}};
}

// What a training forward keeps for backward: the tensor bytes live once it returns, held by
// its graph (the backward after it frees them).
double kept_mb(const std::function<torch::Tensor()>& forward) {
  torch::Tensor loss;
  double kept = 0;
  {
    const deltatune::bench::AllocationPeak peak;
    loss = forward();
    kept = double(peak.live_bytes()) / (1 << 20);
  }
  loss.backward();
  return kept;
}

std::vector<torch::Tensor> at_rest(const dt::backbones::T5Model& backbone, const std::vector<torch::Tensor>& params,
                                   const torch::optim::AdamW& optimizer) {
  auto tensors = backbone->parameters();
  for (const auto& b : backbone->buffers()) tensors.push_back(b);
  tensors.insert(tensors.end(), params.begin(), params.end());
  for (const auto& entry : optimizer.state()) {
    const auto& state = static_cast<const torch::optim::AdamWParamState&>(*entry.second);
    tensors.insert(tensors.end(), {state.exp_avg(), state.exp_avg_sq(), state.max_exp_avg_sq()});
  }
  return tensors;
}

// --backbone bert, inference only: a BertModel loaded with load_bert from a Hugging Face folder
// (all-MiniLM-L6-v2), bare or with --mixed K LoRA deltas routed, input_ids and attention_mask
// (B, --src) per forward, --interleave N as for T5; the same JSON line, without the T5-only figures.
int bert_infer(std::map<std::string, std::string>& flags, const torch::Device& device) {
  auto num = [&](const char* flag) { return std::stoll(flags[flag]); };
  const int64_t batch = num("--batch"), src = num("--src"), mixed = num("--mixed");
  if (flags["--mode"] != "infer" || (mixed == 0) != (flags["--method"] == "bare"))
    throw dt::OptionError("delta_bench: --backbone bert runs inference (--mode infer) of --method bare, or of lora "
                          "with --mixed K");
  auto backbone = dt::backbones::load_bert(flags["--model"]);
  dt::DeltaModel model(backbone);
  torch::manual_seed(0);
  const auto per_row = mixed > 0 ? add_mixed_loras(model, mixed, batch) : std::vector<std::string>{};
  model.backbone().to(device);
  backbone->eval();
  const auto input_ids = torch::randint(2, backbone->config.vocab_size(), {batch, src}, torch::kLong).to(device);
  const auto attention_mask = torch::ones_like(input_ids);
  const auto options = dt::RouteOptions().gather(num("--gather") != 0);
  const std::function<void()> step = [&] {
    torch::NoGradGuard no_grad;
    if (mixed == 0) {
      backbone->forward(input_ids, attention_mask);
      return;
    }
    auto routing = model.route(per_row, options);
    backbone->forward(input_ids, attention_mask);
  };
  reset_peak(device);
  const auto times = times_ms(step, int(num("--steps")), int(num("--warmup")), device);
  nlohmann::json result{{"impl", "deltatune"},   {"backbone", "bert"},          {"method", flags["--method"]},
                        {"mode", "infer"},       {"threads", at::get_num_threads()}, {"times_ms", times},
                        {"median_ms", median(times)}, {"peak_mb", peak_mb(device)}};
  if (mixed > 0) result.update({{"mixed", mixed}, {"gather", num("--gather") != 0}});
  if (mixed > 0 && num("--interleave") > 0) {
    auto bare = dt::backbones::load_bert(flags["--model"]);
    bare->to(device);
    bare->eval();
    const auto bare_step = [&] {
      torch::NoGradGuard no_grad;
      bare->forward(input_ids, attention_mask);
    };
    result.update(interleaved(step, bare_step, int(num("--interleave")), device));
  }
  std::cout << "JSON " << result.dump() << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  std::map<std::string, std::string> flags{{"--model", ""},    {"--method", "full"}, {"--mode", "train"},
                                           {"--batch", "8"},   {"--src", "128"},     {"--tgt", "8"},
                                           {"--steps", "5"},   {"--warmup", "2"},    {"--threads", "0"},
                                           {"--device", "cpu"}, {"--lr", "1e-4"}, {"--profile", "0"},
                                           {"--interleave", "0"}, {"--mixed", "0"}, {"--gather", "1"},
                                           {"--backbone", "t5"}, {"--precision", "fp32"}, {"--lean-dropout", "1"}};
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!flags.count(argv[i])) throw dt::OptionError(fmt::format("delta_bench: unknown flag {}", argv[i]));
    flags[argv[i]] = argv[i + 1];
  }
  auto num = [&](const char* flag) { return std::stoll(flags[flag]); };
  if (num("--threads") > 0) at::set_num_threads(int(num("--threads")));
  const torch::Device device(flags["--device"]);
  const auto launch = dt::LaunchEnvironment::from_environment();
  const auto group = launch && launch->world_size > 1 ? dt::start_data_parallel(*launch) : nullptr;
  if (group && !group->is_main()) std::cout.rdbuf(nullptr);  // rank 0 reports
  if (group && (flags["--mode"] != "train" || num("--profile") != 0))
    throw dt::OptionError("delta_bench: under tools/launch it times training steps (--mode train), without --profile");
  if (flags["--backbone"] == "bert") return bert_infer(flags, device);
  if (flags["--backbone"] != "t5") throw dt::OptionError("delta_bench: --backbone is t5 or bert, got " + flags["--backbone"]);
  const std::string method = flags["--method"];
  const bool train = flags["--mode"] == "train";

  const auto& precision = flags["--precision"];
  if (precision != "fp32" && precision != "bf16")
    throw dt::OptionError("delta_bench: --precision is fp32 or bf16, got " + precision);
  const bool bf16 = precision == "bf16", autocast = bf16 && method == "full";
  const auto dtype = bf16 && !autocast ? torch::kBFloat16 : torch::kFloat;
  const auto load_options = dt::backbones::T5LoadOptions().dtype(dtype).lean_dropout(num("--lean-dropout") != 0);
  auto backbone = dt::backbones::load_t5(flags["--model"], load_options);
  dt::DeltaModel model(backbone);
  const int64_t batch = num("--batch"), src = num("--src"), tgt = num("--tgt"), mixed = num("--mixed");
  torch::manual_seed(0);
  if (mixed > 0 && (train || method != "lora"))
    throw dt::OptionError("delta_bench: --mixed K runs inference (--mode infer) of --method lora");
  const auto per_row = mixed > 0 ? add_mixed_loras(model, mixed, batch) : std::vector<std::string>{};
  if (mixed == 0) add_method(model, method);
  model.backbone().to(device);  // the deltas with it: they are in its module tree
  const double load_peak = proc_status_mb("VmHWM");

  const auto vocab = backbone->config.vocab_size();
  torch::manual_seed(uint64_t(group ? group->rank() : 0) + 1);  // each rank its own batch
  auto input_ids = torch::randint(2, vocab, {batch, src}, torch::kLong).to(device);
  auto attention_mask = torch::ones_like(input_ids);
  auto labels = torch::randint(2, vocab, {batch, tgt}, torch::kLong).to(device);
  const auto params = model.trainable_parameters();
  torch::optim::AdamW optimizer(params, torch::optim::AdamWOptions(std::stod(flags["--lr"])));
  std::unique_ptr<dt::GradientSync> sync;
  if (group && train) sync = std::make_unique<dt::GradientSync>(group, params);

  std::function<void()> step;
  const auto train_forward = [&] {
    std::optional<dt::AutocastGuard> guard;
    if (autocast) guard.emplace(device.type());
    return backbone->forward(input_ids, attention_mask, {}, labels).loss;
  };
  if (train) {
    backbone->train();
    step = [&] {
      optimizer.zero_grad();
      if (sync) sync->arm();
      train_forward().backward();
      if (sync) sync->finish();
      optimizer.step();
    };
  } else if (mixed > 0) {
    backbone->eval();
    step = [&] {
      torch::NoGradGuard no_grad;
      auto routing = model.route(per_row, dt::RouteOptions().gather(num("--gather") != 0));
      backbone->forward(input_ids, attention_mask, {}, labels);
    };
  } else {
    backbone->eval();
    step = [&] {
      torch::NoGradGuard no_grad;
      std::optional<dt::AutocastGuard> guard;
      if (autocast) guard.emplace(device.type());
      backbone->forward(input_ids, attention_mask, {}, labels);
    };
  }
  reset_peak(device);
  const auto times = times_ms(step, int(num("--steps")), int(num("--warmup")), device);
  int64_t trainable = 0;
  for (const auto& p : params) trainable += p.numel();
  nlohmann::json result{{"impl", "deltatune"},         {"method", method},
                        {"mode", flags["--mode"]},     {"threads", at::get_num_threads()},
                        {"times_ms", times},           {"median_ms", median(times)},
                        {"peak_mb", peak_mb(device)},  {"load_peak_mb", load_peak},
                        {"trainable", trainable},      {"precision", precision},
                        {"ranks", group ? group->world_size() : 1},
                        {"allreduce_bytes", sync ? sync->bytes_per_update() : 0}};
  if (mixed > 0) result.update({{"mixed", mixed}, {"gather", num("--gather") != 0}});
  if (!train && method != "bare" && num("--interleave") > 0) {
    auto bare = dt::backbones::load_t5(flags["--model"], load_options);
    bare->to(device);
    bare->eval();
    const auto bare_step = [&] {
      torch::NoGradGuard no_grad;
      bare->forward(input_ids, attention_mask, {}, labels);
    };
    result.update(interleaved(step, bare_step, int(num("--interleave")), device));
  }
  if (device.is_cuda()) {
    result["alloc_mb"] = result["peak_mb"];  // max_memory_allocated already
  } else if (!sync) {  // (its steps would be collectives on rank 0 alone)
    if (train) result["kept_mb"] = kept_mb(train_forward);
    optimizer.zero_grad();  // gradients are not at rest: the step makes them
    result.update(allocated_mb(step, at_rest(backbone, params, optimizer)));
  }
  std::cout << "JSON " << result.dump() << "\n";
  if (num("--profile") != 0) {
    const deltatune::bench::OperatorProfile profile;
    const auto profiled = times_ms(step, int(num("--steps")), 0, device);
    std::cout << "OPS " << nlohmann::json{{"step_ms", median(profiled)}, {"ops", profile.per_step(int(num("--steps")))}}.dump()
              << "\n";
  }
  return 0;
} catch (const std::exception& e) {
  std::cerr << "delta_bench: " << e.what() << "\n";
  return 1;
}
