// A training run's resumable state in one safetensors file, written atomically: the trained
// tensors, AdamW's moments and step counts, the random generators (CPU and every CUDA
// device), and a JSON document of the rest (step, schedule, best metric: the caller's).
// Restoring it makes the next steps bit-identical to a run that never stopped.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Context.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <deltatune/core/error.hpp>
#include <deltatune/core/safetensors.hpp>

namespace deltatune {

namespace detail {

// The generators whose state a run depends on: the CPU one, then one per CUDA device.
inline std::vector<std::pair<std::string, at::Generator>> default_generators() {
  std::vector<std::pair<std::string, at::Generator>> generators{{"rng.cpu", at::detail::getDefaultCPUGenerator()}};
  if (torch::cuda::is_available())
    for (int64_t d = 0; d < static_cast<int64_t>(torch::cuda::device_count()); ++d)
      generators.emplace_back(fmt::format("rng.cuda.{}", d),
                              at::globalContext().defaultGenerator(at::Device(at::kCUDA, static_cast<int8_t>(d))));
  return generators;
}

inline torch::optim::AdamWOptions& adamw_options(torch::optim::OptimizerParamGroup& group) {
  return static_cast<torch::optim::AdamWOptions&>(group.options());
}

}  // namespace detail

// Writes `params`, the state of `optimizer` (an AdamW over exactly these params, in this
// order), the random generators and `state` to `path`. Throws CheckpointError naming the file.
//   deltatune::save_train_state("out/last/state.safetensors", params, optimizer, {{"step", step}});
inline void save_train_state(const std::string& path, const std::vector<torch::Tensor>& params,
                             torch::optim::AdamW& optimizer, const nlohmann::json& state) {
  std::map<std::string, torch::Tensor> tensors;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string p = fmt::format("param.{}", i);
    tensors[p] = params[i].detach().cpu();
    const auto found = optimizer.state().find(params[i].unsafeGetTensorImpl());
    if (found == optimizer.state().end()) continue;  // not yet stepped
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*found->second);
    tensors[p + ".step"] = torch::tensor(s.step(), torch::kInt64);
    tensors[p + ".exp_avg"] = s.exp_avg().cpu();
    tensors[p + ".exp_avg_sq"] = s.exp_avg_sq().cpu();
    if (s.max_exp_avg_sq().defined()) tensors[p + ".max_exp_avg_sq"] = s.max_exp_avg_sq().cpu();
  }
  for (const auto& [name, generator] : detail::default_generators()) tensors[name] = generator.get_state();
  nlohmann::json groups = nlohmann::json::array();
  for (auto& group : optimizer.param_groups()) {
    const auto& o = detail::adamw_options(group);
    groups.push_back({{"lr", o.lr()}, {"beta1", std::get<0>(o.betas())}, {"beta2", std::get<1>(o.betas())},
                      {"eps", o.eps()}, {"weight_decay", o.weight_decay()}, {"amsgrad", o.amsgrad()}});
  }
  write_safetensors(path, tensors,
                    {{"deltatune.train_state", state.dump()}, {"deltatune.adamw_groups", groups.dump()}});
}

namespace detail {

// A training state as read from its file, every tensor and metadata field checked before
// anything is restored: a damaged or forged file is refused whole, naming the tensor.
class SavedTrainState {
 public:
  // AdamW's options of one param group, as saved.
  struct Group {
    double lr, beta1, beta2, eps, weight_decay;
    bool amsgrad;
  };

  SavedTrainState(std::string path, const std::vector<torch::Tensor>& params, std::size_t num_groups)
      : path_(std::move(path)), file_(read_safetensors(path_)), state_(metadata_json("deltatune.train_state")) {
    read_groups(num_groups);
    check<CheckpointError>(!find(fmt::format("param.{}", params.size())),
                           "{}: the saved state holds more than {} parameters; resume with the same trainable "
                           "parameters, in the same order", path_, params.size());
    for (std::size_t i = 0; i < params.size(); ++i) check_parameter(i, params[i]);
    for (const auto& [name, generator] : default_generators())
      if (find(name)) like(name, generator.get_state());
  }

  // A tensor the file must hold, with the parameter's shape and dtype.
  const torch::Tensor& like(const std::string& name, const torch::Tensor& param) const {
    const auto* t = find(name);
    check<CheckpointError>(t != nullptr, "{}: the training state has no tensor '{}'; the file is damaged or was "
                           "written for other parameters: resume from another checkpoint or start afresh", path_, name);
    check<CheckpointError>(t->sizes() == param.sizes() && t->scalar_type() == param.scalar_type(),
                           "{}: {} is {} {}, the parameter {} {}", path_, name, c10::toString(t->scalar_type()),
                           t->sizes(), c10::toString(param.scalar_type()), param.sizes());
    return *t;
  }
  const torch::Tensor* find(const std::string& name) const {
    const auto found = file_.tensors.find(name);
    return found == file_.tensors.end() ? nullptr : &found->second;
  }
  // AdamW's step count for parameter i, or -1 where it was never stepped.
  int64_t step(std::size_t i) const {
    const auto* t = find(fmt::format("param.{}.step", i));
    return t == nullptr ? -1 : t->item<int64_t>();
  }
  const nlohmann::json& state() const { return state_; }
  const std::vector<Group>& groups() const { return groups_; }
  const std::string& path() const { return path_; }

 private:
  void check_parameter(std::size_t i, const torch::Tensor& param) const {
    const auto p = fmt::format("param.{}", i);
    like(p, param);
    const auto* step = find(p + ".step");
    if (step == nullptr) return;
    check<CheckpointError>(step->numel() == 1 && step->scalar_type() == torch::kInt64 && step->item<int64_t>() >= 0,
                           "{}: {}.step must be one non-negative int64 (AdamW's step count)", path_, p);
    like(p + ".exp_avg", param);
    like(p + ".exp_avg_sq", param);
    if (find(p + ".max_exp_avg_sq")) like(p + ".max_exp_avg_sq", param);
  }
  void read_groups(std::size_t num_groups) {
    const auto groups = metadata_json("deltatune.adamw_groups");
    check<CheckpointError>(groups.is_array() && groups.size() == num_groups, "{}: the saved state has {} optimizer "
                           "param groups, the optimizer {}", path_, groups.is_array() ? groups.size() : 0, num_groups);
    try {
      for (const auto& j : groups)
        groups_.push_back({j.at("lr").get<double>(), j.at("beta1").get<double>(), j.at("beta2").get<double>(),
                           j.at("eps").get<double>(), j.at("weight_decay").get<double>(), j.at("amsgrad").get<bool>()});
    } catch (const nlohmann::json::exception& e) {
      throw CheckpointError(fmt::format("{}: metadata deltatune.adamw_groups: {}", path_, e.what()));
    }
  }
  nlohmann::json metadata_json(const std::string& key) const {
    const auto found = file_.metadata.find(key);
    check<CheckpointError>(found != file_.metadata.end(), "{}: not a training state (no {} metadata)", path_, key);
    try {
      return nlohmann::json::parse(found->second);
    } catch (const nlohmann::json::exception& e) {
      throw CheckpointError(fmt::format("{}: metadata {} is not valid JSON: {}", path_, key, e.what()));
    }
  }

  std::string path_;
  SafetensorsFile file_;
  nlohmann::json state_;
  std::vector<Group> groups_;
};

}  // namespace detail

// Restores what save_train_state wrote into `params` (copied in place, on their devices),
// `optimizer` and the random generators, and returns the saved `state`. The params must match
// the saved ones in number, shapes and dtypes; CheckpointError names the file and the tensor
// that does not, or that is missing, before anything is changed.
inline nlohmann::json load_train_state(const std::string& path, const std::vector<torch::Tensor>& params,
                                       torch::optim::AdamW& optimizer) {
  const detail::SavedTrainState saved(path, params, optimizer.param_groups().size());
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string p = fmt::format("param.{}", i);
    params[i].copy_(saved.like(p, params[i]));
    auto* impl = params[i].unsafeGetTensorImpl();
    if (saved.step(i) < 0) {
      optimizer.state().erase(impl);
      continue;
    }
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    const auto device = params[i].device();
    s->step(saved.step(i));
    s->exp_avg(saved.like(p + ".exp_avg", params[i]).to(device));
    s->exp_avg_sq(saved.like(p + ".exp_avg_sq", params[i]).to(device));
    if (saved.find(p + ".max_exp_avg_sq")) s->max_exp_avg_sq(saved.like(p + ".max_exp_avg_sq", params[i]).to(device));
    optimizer.state()[impl] = std::move(s);
  }
  for (std::size_t g = 0; g < saved.groups().size(); ++g) {
    const auto& saved_group = saved.groups()[g];
    detail::adamw_options(optimizer.param_groups()[g])
        .lr(saved_group.lr).betas({saved_group.beta1, saved_group.beta2}).eps(saved_group.eps)
        .weight_decay(saved_group.weight_decay).amsgrad(saved_group.amsgrad);
  }
  for (auto& [name, generator] : detail::default_generators())
    if (const auto* state = saved.find(name)) generator.set_state(*state);
  return saved.state();
}

}  // namespace deltatune
