// Dynamic loss scaling for training through a float16 backbone, as torch.amp.GradScaler does it.
// float16 keeps 5 exponent bits: a gradient below 6e-8 flushes to zero on its way back through
// the half-precision activations, and small deltas' gradients often are. The loss is multiplied
// by a large scale before backward, so the gradients are too; they are divided by it again in
// the float32 tensors that train, before clipping and the update. An update whose gradients
// overflowed (inf or NaN) is skipped and the scale halved; after `growth_interval` finite
// updates in a row it doubles. bf16 has float32's exponent range and needs none of this.
//   deltatune::LossScaler scaler;                       // or TrainerOptions().loss_scale(...)
//   scaler.scale(loss).backward();
//   const bool finite = scaler.unscale(params);         // false when a gradient overflowed
//   if (finite) optimizer.step();
//   scaler.update(finite);
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <utility>
#include <vector>

#include <ATen/ops/_amp_foreach_non_finite_check_and_unscale.h>
#include <torch/torch.h>

#include <deltatune/core/error.hpp>

namespace deltatune {

// GradScaler's defaults.
struct LossScaleOptions {
  TORCH_ARG(double, init_scale) = 65536.0;   // 2^16
  TORCH_ARG(double, growth_factor) = 2.0;    // after growth_interval finite updates in a row
  TORCH_ARG(double, backoff_factor) = 0.5;   // after an update with a non-finite gradient
  TORCH_ARG(int64_t, growth_interval) = 2000;
};

class LossScaler {
 public:
  explicit LossScaler(LossScaleOptions options = {})
      : options_(options), scale_(static_cast<float>(options.init_scale())) {
    const auto& o = options_;
    detail::check<OptionError>(std::isfinite(static_cast<float>(o.init_scale())) && o.init_scale() > 0,
                               "LossScaleOptions: init_scale must be a positive number, got {}", o.init_scale());
    detail::check<OptionError>(std::isfinite(o.growth_factor()) && o.growth_factor() > 1,
                               "LossScaleOptions: growth_factor must be above 1, got {}", o.growth_factor());
    detail::check<OptionError>(o.backoff_factor() > 0 && o.backoff_factor() < 1,
                               "LossScaleOptions: backoff_factor must be in (0, 1), got {}", o.backoff_factor());
    detail::check<OptionError>(o.growth_interval() >= 1, "LossScaleOptions: growth_interval must be >= 1, got {}",
                               o.growth_interval());
  }

  float scale() const { return scale_; }
  // Finite updates in a row since the scale last changed.
  int64_t growth_tracker() const { return growth_tracker_; }

  torch::Tensor scale(const torch::Tensor& loss) const { return loss * scale_; }

  // Divides the gradient of every tensor in `params` that has one by the scale, in place;
  // false where any of them holds an inf or a NaN (then the update must not be applied).
  // One fused pass per device and dtype, GradScaler's unscale_.
  bool unscale(const std::vector<torch::Tensor>& params) const {
    std::map<std::pair<std::string, torch::ScalarType>, std::vector<torch::Tensor>> groups;
    for (const auto& p : params)
      if (p.grad().defined()) groups[{p.grad().device().str(), p.grad().scalar_type()}].push_back(p.grad());
    bool finite = true;
    for (auto& [key, grads] : groups) {
      const auto on = torch::TensorOptions().device(grads.front().device()).dtype(torch::kFloat);
      auto found_inf = torch::zeros({1}, on);
      const auto inv_scale = torch::full({1}, static_cast<float>(1.0 / scale_), on);
      at::_amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale);
      finite = finite && found_inf.item<float>() == 0;
    }
    return finite;
  }

  // After each update: the scale backs off when its gradients were not finite, and grows after
  // growth_interval finite ones in a row (GradScaler's update; a growth that would overflow
  // the scale is not taken).
  void update(bool finite) {
    if (!finite) {
      scale_ = static_cast<float>(scale_ * options_.backoff_factor()), growth_tracker_ = 0;
      return;
    }
    if (++growth_tracker_ < options_.growth_interval()) return;
    const auto grown = static_cast<float>(scale_ * options_.growth_factor());
    if (std::isfinite(grown)) scale_ = grown;
    growth_tracker_ = 0;
  }

  // What a resumed run continues from (Trainer's state).
  void restore(double scale, int64_t growth_tracker) {
    detail::check<CheckpointError>(std::isfinite(static_cast<float>(scale)) && scale > 0 && growth_tracker >= 0,
                                   "LossScaler: a saved scale {} with growth tracker {} cannot be restored; a "
                                   "scale is a positive number", scale, growth_tracker);
    scale_ = static_cast<float>(scale), growth_tracker_ = growth_tracker;
  }

 private:
  LossScaleOptions options_;
  float scale_;  // float32, as GradScaler keeps it (its products round as the reference's do)
  int64_t growth_tracker_ = 0;
};

}  // namespace deltatune
