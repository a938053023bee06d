// Learning-rate schedules with warm-up (as transformers' get_linear_schedule_with_warmup and
// get_constant_schedule_with_warmup), gradient clipping by global norm, and the bookkeeping of
// gradient accumulation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <deltatune/core/error.hpp>
#include <deltatune/core/json_file.hpp>

namespace deltatune {

enum class ScheduleKind { kLinear, kConstant };

// Warm-up from 0 over `warmup` steps, then linear decay to 0 at `total` (kLinear) or constant
// (kConstant). The update of step s (0-based) uses base_lr * factor(s), as transformers' LambdaLR
// does when scheduler.step() follows optimizer.step(): with warm-up, the first update has lr 0.
//   deltatune::LrSchedule schedule{deltatune::ScheduleKind::kLinear, 500, 10000, 3e-3};
//   schedule.apply(optimizer, step);  // before optimizer.step()
struct LrSchedule {
  ScheduleKind kind = ScheduleKind::kLinear;
  int64_t warmup = 0;
  int64_t total = 1;
  double base_lr = 1e-3;

  double factor(int64_t step) const {
    const auto s = static_cast<double>(step);
    if (step < warmup) return s / static_cast<double>(std::max<int64_t>(1, warmup));
    if (kind == ScheduleKind::kConstant) return 1.0;
    return std::max(0.0, static_cast<double>(total - step) / static_cast<double>(std::max<int64_t>(1, total - warmup)));
  }
  double lr(int64_t step) const { return base_lr * factor(step); }

  // Sets every param group of `optimizer` to the rate of `step`, times the group's entry of
  // `group_scales` where it has one (LoRA+'s faster group).
  void apply(torch::optim::Optimizer& optimizer, int64_t step, const std::vector<double>& group_scales = {}) const {
    auto& groups = optimizer.param_groups();
    for (std::size_t g = 0; g < groups.size(); ++g)
      groups[g].options().set_lr(lr(step) * (g < group_scales.size() ? group_scales[g] : 1.0));
  }

  nlohmann::json to_json() const {
    return {{"kind", kind == ScheduleKind::kLinear ? "linear" : "constant"},
            {"warmup", warmup}, {"total", total}, {"base_lr", base_lr}};
  }
  static LrSchedule from_json(const JsonFields& j) {
    const auto kind = j.get<std::string>("kind");
    j.check(kind == "linear" || kind == "constant", "kind", "must be linear or constant");
    return {kind == "linear" ? ScheduleKind::kLinear : ScheduleKind::kConstant, j.get<int64_t>("warmup"),
            j.get<int64_t>("total"), j.get<double>("base_lr")};
  }
};

// Warm-up steps for a ratio of the total, rounded up as transformers' get_warmup_steps does.
inline int64_t warmup_steps(double ratio, int64_t total) {
  detail::check<OptionError>(ratio >= 0 && ratio <= 1, "warmup_steps: warm-up ratio {} is outside [0, 1]", ratio);
  return static_cast<int64_t>(std::ceil(ratio * static_cast<double>(total)));
}

// Scales the gradients of `params` so that their global 2-norm is at most `max_norm` (torch.nn.
// utils.clip_grad_norm_: factor max_norm / (norm + 1e-6), capped at 1) and returns the norm before
// clipping. max_norm <= 0 only measures. Parameters without a gradient are skipped.
inline double clip_grad_norm(const std::vector<torch::Tensor>& params, double max_norm) {
  // An infinite bound makes torch's factor 1 exactly, so the gradients stay bit for bit.
  return torch::nn::utils::clip_grad_norm_(params, max_norm > 0 ? max_norm : std::numeric_limits<double>::infinity());
}

// Which micro-batches one optimizer update takes under gradient accumulation: update `step`
// (counted from the start of training) of an epoch of `batches` micro-batches, `accumulation`
// at a time; the epoch's last update takes what is left. Derived from the step alone, so a
// resumed run picks up at the same batch.
struct MicroBatches {
  int64_t epoch, begin, end;  // batches [begin, end) of epoch `epoch`
  int64_t count() const { return end - begin; }
};

// Optimizer updates per epoch: ceil(batches / accumulation).
inline int64_t updates_per_epoch(int64_t batches, int64_t accumulation) {
  detail::check<OptionError>(batches > 0, "updates_per_epoch: the batch source has {} batches per epoch", batches);
  detail::check<OptionError>(accumulation > 0, "updates_per_epoch: accumulation steps must be >= 1, not {}",
                             accumulation);
  return (batches + accumulation - 1) / accumulation;
}

inline MicroBatches micro_batches(int64_t step, int64_t batches, int64_t accumulation) {
  const int64_t per_epoch = updates_per_epoch(batches, accumulation);
  const int64_t begin = (step % per_epoch) * accumulation;
  return {step / per_epoch, begin, std::min(begin + accumulation, batches)};
}

}  // namespace deltatune
