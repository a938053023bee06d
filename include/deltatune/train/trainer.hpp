// A small generic trainer for delta tuning: AdamW on the trainable tensors only, warm-up and
// decay, clipping, gradient accumulation, periodic evaluation with a best checkpoint and early
// stopping, resume from the last state, a progress bar, a JSONL log and a plot of the curves.
//
// Model-agnostic: it sees a list of tensors, a loss function of a batch, a batch source that
// gives batch i of epoch e, and callbacks to evaluate and to save the best model. With a
// DataParallel (train/distributed.hpp) each rank trains on its share of each batch and the
// gradients are averaged over the ranks; rank 0 alone writes. A float16 backbone trains with
// dynamic loss scaling (loss_scale, train/loss_scale.hpp); bf16 needs none.
#pragma once

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <deltatune/core/atomic_file.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/precision.hpp>
#include <deltatune/train/checkpoint_state.hpp>
#include <deltatune/train/distributed.hpp>
#include <deltatune/train/log.hpp>
#include <deltatune/train/loss_scale.hpp>
#include <deltatune/train/plot.hpp>
#include <deltatune/train/progress.hpp>
#include <deltatune/train/schedule.hpp>

namespace deltatune {

// A peak learning rate of its own for the trainable tensors whose names start with `prefix` (a
// new task head, say: "classifier."), on the same warm-up and decay as the rest; the optimizer
// param groups transformers users build by hand.
struct LrGroup {
  std::string prefix;
  double lr = 0;
};

// How to train; defaults follow Compacter's GLUE set-up where it fixes one (lr 3e-3, no weight
// decay, linear schedule) and transformers' Trainer elsewhere.
struct TrainerOptions {
  TORCH_ARG(int64_t, epochs) = 20;               // passes over the batch source (Compacter: 20 on GLUE)
  TORCH_ARG(int64_t, max_steps) = -1;            // optimizer updates; > 0 overrides epochs
  TORCH_ARG(double, lr) = 3e-3;                  // peak learning rate (Compacter: 3e-3)
  TORCH_ARG(double, weight_decay) = 0.0;         // AdamW's decoupled decay
  // LoRA+ (Hayou et al. 2024): LoRA's B matrices learn at lr times this (the paper and peft
  // suggest 16); 1: one rate for all. See loraplus_fast().
  TORCH_ARG(double, loraplus_lr_ratio) = 1.0;
  // Rates of their own by name prefix: a tensor in a group (the first whose prefix its name
  // starts with) trains at the group's lr, LoRA+ or not; each group must match a tensor.
  TORCH_ARG(std::vector<LrGroup>, lr_groups) = {};
  TORCH_ARG(double, warmup_ratio) = 0.0;         // share of the updates spent warming up
  TORCH_ARG(int64_t, warmup_steps) = -1;         // >= 0 overrides warmup_ratio (Compacter: 500)
  TORCH_ARG(ScheduleKind, schedule) = ScheduleKind::kLinear;  // decay to 0, or constant after warm-up
  TORCH_ARG(double, max_grad_norm) = 1.0;        // global-norm clipping; <= 0 turns it off
  TORCH_ARG(int64_t, accumulation_steps) = 1;    // micro-batches per optimizer update
  TORCH_ARG(int64_t, eval_every) = 0;            // evaluate every this many updates; 0: after each epoch
  TORCH_ARG(int64_t, patience) = 0;              // stop after this many evaluations without improvement; 0: never
  TORCH_ARG(bool, greater_is_better) = true;     // the dev metric's direction (false for a loss)
  // torch::manual_seed at the start of a fresh run; unset, the global generator stays as the caller left it.
  TORCH_ARG(std::optional<uint64_t>, seed) = std::nullopt;
  // Autocast around loss_fn on the parameters' device, in this dtype: kBFloat16, or kHalf (on
  // CUDA, with loss_scale): full fine-tuning's half precision, products in it over float32
  // weights (deltas on a half-precision backbone compute in float32 all the same). nullopt: none.
  TORCH_ARG(std::optional<torch::ScalarType>, autocast) = std::nullopt;
  // Dynamic loss scaling, for a backbone stored in float16: the loss scaled before backward,
  // the gradients unscaled before clipping, an update whose gradients overflowed skipped (it
  // still counts as a step: the schedule and the batches go on). nullopt: none.
  TORCH_ARG(std::optional<LossScaleOptions>, loss_scale) = std::nullopt;
  TORCH_ARG(std::string, output_dir) = "";       // log.jsonl, curves.png, best/, last/; "" writes nothing
  TORCH_ARG(bool, resume) = true;                // continue from output_dir/last/ when it holds a state
  TORCH_ARG(int64_t, log_every) = 10;            // updates between log lines of the mean loss
  TORCH_ARG(bool, progress) = true;              // a progress bar on stdout
  // Data parallelism: this process is one rank of the group, the batch source gives this rank's
  // share of each batch, the gradients are averaged over the ranks after each update's backward
  // and rank 0 alone writes output_dir (every rank reads it to resume). nullptr: one process.
  TORCH_ARG(std::shared_ptr<DataParallel>, data_parallel) = nullptr;
};

// Gives micro-batch `index` (0 <= index < batches_per_epoch) of epoch `epoch`. For a resumed run
// to repeat an uninterrupted one, a batch must depend on (epoch, index) only: shuffle with a
// generator seeded by the epoch, not the global one.
template <class Batch>
struct BatchSource {
  int64_t batches_per_epoch = 0;
  std::function<Batch(int64_t epoch, int64_t index)> batch;
};

// What a finished run did.
struct TrainSummary {
  int64_t steps = 0;                          // optimizer updates done, in all (a resumed run counts the earlier ones)
  int64_t resumed_from = 0;                   // the step the run resumed at; 0 for a fresh run
  double best_metric = std::numeric_limits<double>::quiet_NaN();
  int64_t best_step = -1;                     // the update after which the best evaluation ran; -1 if none
  bool stopped_early = false;
  double final_loss = std::numeric_limits<double>::quiet_NaN();  // mean loss of the last logged updates
  int64_t skipped_updates = 0;                // with loss_scale: updates skipped for a non-finite gradient (this process)
  double loss_scale = 1;                      // with loss_scale: the scale at the end
  std::vector<double> seconds_per_epoch;      // wall time of each epoch this process ran (evaluation included)
  int64_t peak_rss_bytes = 0;                 // VmHWM of /proc/self/status; 0 where there is none
};

// The process's peak resident memory (Linux's VmHWM), or 0 where /proc is absent.
inline int64_t peak_rss_bytes() {
  std::ifstream status("/proc/self/status");
  std::string key;
  for (int64_t kb; status >> key;)
    if (key == "VmHWM:" && status >> kb) return kb * 1024;
  return 0;
}

// LoRA+'s faster group, as peft's create_loraplus_optimizer sorts tensors: LoRA's B
// matrices, and every 1-D tensor (biases, DoRA's magnitudes, IA3's scales, a head's bias).
inline bool loraplus_fast(const std::string& name, const torch::Tensor& tensor) {
  return name.find("lora_B") != std::string::npos || tensor.dim() == 1;
}

// Trains `trainable` (by name: the training state is keyed by these names) by minimising
// `loss_fn` over the batches, evaluating as the options say.
//   deltatune::Trainer<Batch> trainer(options, model.named_trainable_parameters(), loss_fn, source,
//                                     [&] { return dev_accuracy(); }, [&](const std::string& dir) { save(dir); });
//   auto summary = trainer.fit();
template <class Batch>
class Trainer {
 public:
  Trainer(TrainerOptions options, NamedTensors trainable, std::function<torch::Tensor(const Batch&)> loss_fn,
          BatchSource<Batch> source, std::function<double()> evaluate = {},
          std::function<void(const std::string& dir)> save_best = {})
      : options_(std::move(options)), named_(std::move(trainable)), params_(tensors_of(named_)), loss_fn_(std::move(loss_fn)),
        source_(std::move(source)), evaluate_(std::move(evaluate)), save_best_(std::move(save_best)),
        rate_groups_(group_by_rate(named_, options_)),
        optimizer_(optimizer_groups(rate_groups_, options_), torch::optim::AdamWOptions(options_.lr())
                                                                 .weight_decay(options_.weight_decay())) {
    if (options_.loss_scale()) scaler_.emplace(*options_.loss_scale());
    check_options();
    if (auto group = options_.data_parallel()) {
      group->check_same("trainable tensors", describe(named_));
      sync_ = std::make_unique<GradientSync>(group, params_);
    }
    const int64_t per_epoch = updates_per_epoch(source_.batches_per_epoch, options_.accumulation_steps());
    const int64_t total = options_.max_steps() > 0 ? options_.max_steps() : options_.epochs() * per_epoch;
    schedule_ = {options_.schedule(),
                 options_.warmup_steps() >= 0 ? options_.warmup_steps() : warmup_steps(options_.warmup_ratio(), total),
                 total, options_.lr()};
  }

  // Runs to the end (or to early stopping) and returns what happened.
  TrainSummary fit() {
    start_or_resume();
    if (auto group = options_.data_parallel()) {
      // Every rank starts from rank 0's tensors, and a resumed run at the same step.
      group->check_same("the step training starts at (every rank reads output_dir/last/ to resume)",
                        std::to_string(summary_.steps));
      group->broadcast(params_, "the trainable tensors");
    }
    std::optional<ProgressBar> bar;
    if (options_.progress() && is_main()) bar.emplace(schedule_.total);
    auto epoch_start = std::chrono::steady_clock::now();
    while (summary_.steps < schedule_.total && !summary_.stopped_early) {
      const double loss = update();
      if (bar) bar->update(summary_.steps, loss);
      const bool epoch_end = summary_.steps % per_epoch() == 0;
      const bool last = summary_.steps == schedule_.total;
      if (options_.eval_every() > 0 ? summary_.steps % options_.eval_every() == 0 || last : epoch_end || last)
        evaluate_and_save();
      if (epoch_end) {
        const auto now = std::chrono::steady_clock::now();
        summary_.seconds_per_epoch.push_back(std::chrono::duration<double>(now - epoch_start).count());
        epoch_start = now;
      }
    }
    if (bar) bar->finish();
    summary_.peak_rss_bytes = peak_rss_bytes();
    if (writes())
      write_training_plot(options_.output_dir() + "/curves.png", loss_curve_, metric_curve_);
    return summary_;
  }

  torch::optim::AdamW& optimizer() { return optimizer_; }
  const LrSchedule& schedule() const { return schedule_; }

 private:
  void check_options() const {
    detail::check<OptionError>(!params_.empty(), "Trainer: no trainable tensors; pass the delta's parameters");
    for (const auto& [name, param] : named_)
      detail::check<OptionError>(param.requires_grad(), "Trainer: trainable tensor '{}' (shape {}) does not "
                                 "require grad", name, param.sizes());
    detail::check<OptionError>(options_.max_steps() > 0 || options_.epochs() > 0,
                               "Trainer: give epochs > 0 or max_steps > 0 (epochs {}, max_steps {})",
                               options_.epochs(), options_.max_steps());
    detail::check<OptionError>(static_cast<bool>(loss_fn_) && static_cast<bool>(source_.batch),
                               "Trainer: loss_fn and the batch source's function must be set");
    detail::check<OptionError>(options_.patience() == 0 || evaluate_, "Trainer: patience {} needs an evaluate "
                               "function", options_.patience());
    detail::check<OptionError>(!options_.autocast() || is_half(*options_.autocast()), "Trainer: autocast in {}: "
                               "give kBFloat16 or kHalf", c10::toString(options_.autocast().value_or(torch::kFloat)));
  }

  int64_t per_epoch() const { return updates_per_epoch(source_.batches_per_epoch, options_.accumulation_steps()); }
  bool is_main() const { return !options_.data_parallel() || options_.data_parallel()->is_main(); }
  bool writes() const { return !options_.output_dir().empty() && is_main(); }

  // The trainable tensors' names, shapes and dtypes, one a line: what every rank must agree on.
  static std::string describe(const NamedTensors& named) {
    std::string out;
    for (const auto& [name, t] : named) out += fmt::format("{} {} {}\n", name, t.sizes(), c10::toString(t.scalar_type()));
    return out;
  }
  std::string path(const std::string& name) const { return options_.output_dir() + "/" + name; }
  std::string state_path() const { return path("last/train_state.safetensors"); }

  void start_or_resume() {
    if (writes()) {
      for (const auto& dir : {options_.output_dir(), path("last"), path("best")}) ::mkdir(dir.c_str(), 0755);
      remove_stale_temporaries();
    }
    if (!options_.output_dir().empty()) {
      struct stat st {};
      if (options_.resume() && ::stat(state_path().c_str(), &st) == 0) return resume();
      if (writes()) log_.emplace(path("log.jsonl"), /*append=*/false);
    }
    if (options_.seed()) torch::manual_seed(*options_.seed());
  }

  // A kill between an atomic write and its rename leaves a temporary file that nothing else
  // removes: in the output folder, last/, best/ and the folders save_best writes in best/.
  void remove_stale_temporaries() const {
    std::vector<std::string> dirs{options_.output_dir(), path("last"), path("best")};
    std::error_code error;
    for (const auto& entry : std::filesystem::directory_iterator(path("best"), error))
      if (entry.is_directory(error)) dirs.push_back(entry.path().string());
    for (const auto& dir : dirs) detail::remove_stale_temporaries(dir);
  }

  void resume() {
    const JsonFields state(load_train_state(state_path(), named_, optimizer_),
                           state_path() + ": metadata deltatune.train_state");
    const auto saved = LrSchedule::from_json(state.object("schedule"));
    detail::check<CheckpointError>(saved.total == schedule_.total && saved.warmup == schedule_.warmup,
                                   "Trainer: {} was saved for {} updates ({} warm-up), these options give {} ({}); "
                                   "resume with the same options or another output_dir", state_path(), saved.total,
                                   saved.warmup, schedule_.total, schedule_.warmup);
    summary_.steps = summary_.resumed_from = state.get<int64_t>("step");
    state.check(summary_.steps >= 0 && summary_.steps <= schedule_.total, "step",
                fmt::format("must be in [0, {}], the run's updates", schedule_.total));
    summary_.best_step = state.get<int64_t>("best_step");
    if (summary_.best_step >= 0) summary_.best_metric = state.get<double>("best_metric");
    summary_.stopped_early = state.get<bool>("stopped_early");
    evals_without_improvement_ = state.get<int64_t>("evals_without_improvement");
    loss_curve_ = {state.get<std::vector<double>>("loss_x"), state.get<std::vector<double>>("loss_y")};
    metric_curve_.x = state.get<std::vector<double>>("metric_x");
    // An evaluation without a metric (NaN) is saved as null.
    for (const auto& y : state.get<std::vector<nlohmann::json>>("metric_y"))
      metric_curve_.y.push_back(y.is_null() ? NAN : detail::json_as<double>(y, state.where(), "metric_y"));
    // The losses since the last log line, so that the next one averages what an uninterrupted
    // run's would; a state saved without them starts an empty window.
    window_sum_ = state.get<double>("window_sum", 0.0);
    window_count_ = state.get<int64_t>("window_count", 0);
    restore_loss_scale(state);
    if (!writes()) return;
    // The steps after the saved one run again: their records must not appear twice.
    truncate_jsonl_after_step(path("log.jsonl"), summary_.steps);
    log_.emplace(path("log.jsonl"), /*append=*/true);
    log_->log({{"event", "resume"}, {"step", summary_.steps}});
  }

  // One optimizer update over its micro-batches; returns their mean loss.
  double update() {
    const auto range = micro_batches(summary_.steps, source_.batches_per_epoch, options_.accumulation_steps());
    optimizer_.zero_grad();
    double loss_sum = 0;
    for (int64_t i = range.begin; i < range.end; ++i) {
      if (sync_ && i == range.end - 1) sync_->arm();  // the earlier micro-batches accumulate locally
      const Batch batch = source_.batch(range.epoch, i);
      torch::Tensor loss;
      {
        std::optional<AutocastGuard> autocast;
        if (options_.autocast()) autocast.emplace(params_.front().device().type(), *options_.autocast());
        loss = loss_fn_(batch);
      }
      // Mean over the update's micro-batches, so that accumulation matches one large batch.
      const auto mean = loss / static_cast<double>(range.count());
      (scaler_ ? scaler_->scale(mean) : mean).backward();
      loss_sum += loss.detach().item<double>();
    }
    if (sync_) {
      sync_->finish();
      loss_sum = options_.data_parallel()->mean(loss_sum, "the update's loss");
    }
    // Every rank sees the same averaged gradients, so every rank skips the same updates.
    const bool finite = !scaler_ || scaler_->unscale(params_);
    double grad_norm = std::numeric_limits<double>::quiet_NaN();
    if (finite) {
      grad_norm = clip_grad_norm(params_, options_.max_grad_norm());
      schedule_.apply(optimizer_, summary_.steps, rate_groups_.scales);
      optimizer_.step();
    }
    if (scaler_) {
      scaler_->update(finite);
      summary_.skipped_updates += finite ? 0 : 1;
      summary_.loss_scale = scaler_->scale();
    }
    ++summary_.steps;
    const double loss = loss_sum / static_cast<double>(range.count());
    window_sum_ += loss, ++window_count_;
    if (!finite && log_)
      log_->log({{"step", summary_.steps}, {"skipped", "a gradient overflowed"}, {"loss_scale", scaler_->scale()}});
    if (summary_.steps % options_.log_every() == 0 || summary_.steps == schedule_.total) log_window(grad_norm);
    return loss;
  }

  void log_window(double grad_norm) {
    summary_.final_loss = window_sum_ / static_cast<double>(window_count_);
    loss_curve_.x.push_back(static_cast<double>(summary_.steps));
    loss_curve_.y.push_back(summary_.final_loss);
    if (log_) {
      nlohmann::json line{{"step", summary_.steps}, {"epoch", static_cast<double>(summary_.steps) / per_epoch()},
                          {"loss", summary_.final_loss}, {"lr", schedule_.lr(summary_.steps - 1)},
                          {"grad_norm", null_if_nan(grad_norm)}};
      if (scaler_) line["loss_scale"] = scaler_->scale();
      log_->log(line);
    }
    window_sum_ = 0, window_count_ = 0;
  }

  bool improves(double metric) const {
    if (std::isnan(metric)) return false;  // a degenerate evaluation (Pearson of a constant) is no progress
    if (summary_.best_step < 0) return true;
    return options_.greater_is_better() ? metric > summary_.best_metric : metric < summary_.best_metric;
  }

  void evaluate_and_save() {
    if (evaluate_) {
      const double metric = evaluate_();
      metric_curve_.x.push_back(static_cast<double>(summary_.steps));
      metric_curve_.y.push_back(metric);
      const bool better = improves(metric);
      if (better) {
        summary_.best_metric = metric, summary_.best_step = summary_.steps, evals_without_improvement_ = 0;
        if (save_best_ && writes()) save_best_(path("best"));
      } else if (options_.patience() > 0 && ++evals_without_improvement_ >= options_.patience()) {
        summary_.stopped_early = true;
      }
      if (log_)
        log_->log({{"step", summary_.steps}, {"eval", null_if_nan(metric)},
                   {"best", better}, {"stopped_early", summary_.stopped_early}});
    }
    if (writes()) save_state();
  }

  // The scale a run with loss scaling saved (a state saved without it, by a run without
  // scaling, starts from the options' init_scale).
  void restore_loss_scale(const JsonFields& state) {
    if (!scaler_ || !state.has("loss_scale")) return;
    scaler_->restore(state.get<double>("loss_scale"), state.get<int64_t>("loss_scale_growth_tracker"));
    summary_.loss_scale = scaler_->scale();
  }

  // Saved after evaluating, so that the state holds the generators as they are when training goes on.
  void save_state() {
    save_train_state(state_path(), named_, optimizer_,
                     {{"step", summary_.steps}, {"schedule", schedule_.to_json()}, {"best_step", summary_.best_step},
                      {"best_metric", summary_.best_step >= 0 ? summary_.best_metric : 0.0},
                      {"stopped_early", summary_.stopped_early},
                      {"evals_without_improvement", evals_without_improvement_},
                      {"loss_x", loss_curve_.x}, {"loss_y", loss_curve_.y},
                      {"metric_x", metric_curve_.x}, {"metric_y", nan_to_null(metric_curve_.y)},
                      {"window_sum", window_sum_}, {"window_count", window_count_},
                      {"loss_scale", scaler_ ? nlohmann::json(scaler_->scale()) : nlohmann::json()},
                      {"loss_scale_growth_tracker", scaler_ ? scaler_->growth_tracker() : 0}});
  }

  // JSON has no NaN: a skipped update's gradient norm, a degenerate metric, are written as null.
  static nlohmann::json null_if_nan(double x) { return std::isnan(x) ? nlohmann::json() : nlohmann::json(x); }
  static nlohmann::json nan_to_null(const std::vector<double>& v) {
    auto out = nlohmann::json::array();
    for (const double x : v) out.push_back(null_if_nan(x));
    return out;
  }

  // The trainable tensors grouped by peak learning rate; scales[g] is group g's rate over lr.
  struct RateGroups {
    std::vector<std::vector<torch::Tensor>> tensors;
    std::vector<double> scales;
  };

  // A tensor's peak rate over lr: its lr group's, else LoRA+'s ratio for the tensors
  // loraplus_fast() picks, else 1.
  static double rate_scale(const std::string& name, const torch::Tensor& tensor, const TrainerOptions& o) {
    for (const auto& group : o.lr_groups())
      if (name.rfind(group.prefix, 0) == 0) return group.lr / o.lr();
    return loraplus_fast(name, tensor) ? o.loraplus_lr_ratio() : 1.0;
  }

  // One optimizer group per distinct rate, in the order the tensors first take it: one group
  // unless LoRA+ or lr_groups give some tensors another rate.
  static RateGroups group_by_rate(const NamedTensors& named, const TrainerOptions& o) {
    check_rates(named, o);
    RateGroups out;
    for (const auto& [name, tensor] : named) {
      const double scale = rate_scale(name, tensor, o);
      const auto at = std::find(out.scales.begin(), out.scales.end(), scale);
      if (at == out.scales.end()) {
        out.scales.push_back(scale);
        out.tensors.push_back({tensor});
      } else {
        out.tensors[size_t(at - out.scales.begin())].push_back(tensor);
      }
    }
    return out;
  }

  // Before any group is built (torch's own checks would speak first): the rates must be positive
  // numbers, and a group's prefix must name something, or a typo would leave the tensors it
  // meant at lr without a word.
  static void check_rates(const NamedTensors& named, const TrainerOptions& o) {
    detail::check<OptionError>(std::isfinite(o.lr()) && o.lr() > 0, "Trainer: lr must be a positive number, got {}",
                               o.lr());
    detail::check<OptionError>(std::isfinite(o.loraplus_lr_ratio()) && o.loraplus_lr_ratio() > 0,
                               "Trainer: loraplus_lr_ratio must be a positive number, got {}", o.loraplus_lr_ratio());
    for (const auto& group : o.lr_groups()) {
      detail::check<OptionError>(std::isfinite(group.lr) && group.lr > 0, "Trainer: lr_groups: the group '{}' has lr "
                                 "{}; give a positive number", group.prefix, group.lr);
      const bool matches = std::any_of(named.begin(), named.end(), [&](const auto& item) {
        return item.first.rfind(group.prefix, 0) == 0;
      });
      detail::check<OptionError>(!group.prefix.empty() && matches, "Trainer: lr_groups: the prefix '{}' starts no "
                                 "trainable tensor's name (the first is '{}'); name tensors as "
                                 "DeltaModel::named_trainable_parameters() does", group.prefix,
                                 named.empty() ? std::string() : named.front().first);
    }
  }

  static std::vector<torch::optim::OptimizerParamGroup> optimizer_groups(const RateGroups& groups,
                                                                         const TrainerOptions& o) {
    std::vector<torch::optim::OptimizerParamGroup> out;
    for (size_t g = 0; g < groups.tensors.size(); ++g)
      out.emplace_back(groups.tensors[g], std::make_unique<torch::optim::AdamWOptions>(
                                              torch::optim::AdamWOptions(o.lr() * groups.scales[g])
                                                  .weight_decay(o.weight_decay())));
    return out;
  }

  static std::vector<torch::Tensor> tensors_of(const NamedTensors& named) {
    std::vector<torch::Tensor> out;
    for (const auto& [name, tensor] : named) out.push_back(tensor);
    return out;
  }

  TrainerOptions options_;
  NamedTensors named_;
  std::vector<torch::Tensor> params_;  // named_'s tensors, for the optimizer and clipping
  std::function<torch::Tensor(const Batch&)> loss_fn_;
  BatchSource<Batch> source_;
  std::function<double()> evaluate_;
  std::function<void(const std::string&)> save_best_;
  RateGroups rate_groups_;  // before optimizer_, which is built from it
  torch::optim::AdamW optimizer_;
  std::unique_ptr<GradientSync> sync_;  // with a DataParallel
  std::optional<LossScaler> scaler_;    // with loss_scale
  LrSchedule schedule_;
  TrainSummary summary_;
  std::optional<JsonlLogger> log_;
  Curve loss_curve_, metric_curve_;
  int64_t evals_without_improvement_ = 0;
  double window_sum_ = 0;
  int64_t window_count_ = 0;
};

}  // namespace deltatune
