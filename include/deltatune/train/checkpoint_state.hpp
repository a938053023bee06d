// A training run's resumable state in one safetensors file, written atomically: the trained
// tensors, AdamW's moments and step counts, the random generators (CPU and every CUDA
// device), and a JSON document of the rest (step, schedule, best metric: the caller's).
// Restoring it makes the next steps bit-identical to a run that never stopped.
#pragma once

#include <map>
#include <string>
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

// Restores what save_train_state wrote into `params` (copied in place, on their devices),
// `optimizer` and the random generators, and returns the saved `state`. The params must match
// the saved ones in number and shapes; CheckpointError says which does not.
inline nlohmann::json load_train_state(const std::string& path, const std::vector<torch::Tensor>& params,
                                       torch::optim::AdamW& optimizer) {
  auto file = read_safetensors(path);
  const auto tensor = [&](const std::string& name) -> torch::Tensor* {
    const auto found = file.tensors.find(name);
    return found == file.tensors.end() ? nullptr : &found->second;
  };
  detail::check<CheckpointError>(file.metadata.count("deltatune.train_state") == 1,
                                 "{}: not a training state (no deltatune.train_state metadata)", path);
  detail::check<CheckpointError>(tensor(fmt::format("param.{}", params.size())) == nullptr &&
                                     (params.empty() || tensor(fmt::format("param.{}", params.size() - 1))),
                                 "{}: the saved state does not hold exactly {} parameters; resume with the same "
                                 "trainable parameters, in the same order", path, params.size());
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string p = fmt::format("param.{}", i);
    const auto& saved = *tensor(p);
    detail::check<CheckpointError>(saved.sizes() == params[i].sizes(), "{}: {} has shape {}, the parameter {}",
                                   path, p, saved.sizes(), params[i].sizes());
    params[i].copy_(saved);
    auto* impl = params[i].unsafeGetTensorImpl();
    if (tensor(p + ".step") == nullptr) {
      optimizer.state().erase(impl);
      continue;
    }
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    const auto device = params[i].device();
    s->step(tensor(p + ".step")->item<int64_t>());
    s->exp_avg(tensor(p + ".exp_avg")->to(device));
    s->exp_avg_sq(tensor(p + ".exp_avg_sq")->to(device));
    if (auto* m = tensor(p + ".max_exp_avg_sq")) s->max_exp_avg_sq(m->to(device));
    optimizer.state()[impl] = std::move(s);
  }
  const auto groups = nlohmann::json::parse(file.metadata.at("deltatune.adamw_groups"));
  detail::check<CheckpointError>(groups.size() == optimizer.param_groups().size(),
                                 "{}: {} optimizer param groups saved, the optimizer has {}", path, groups.size(),
                                 optimizer.param_groups().size());
  for (std::size_t g = 0; g < groups.size(); ++g) {
    auto& o = detail::adamw_options(optimizer.param_groups()[g]);
    o.lr(groups[g].at("lr")).eps(groups[g].at("eps")).weight_decay(groups[g].at("weight_decay"));
    o.betas({groups[g].at("beta1"), groups[g].at("beta2")}).amsgrad(groups[g].at("amsgrad"));
  }
  for (auto& [name, generator] : detail::default_generators())
    if (auto* saved = tensor(name)) generator.set_state(*saved);
  return nlohmann::json::parse(file.metadata.at("deltatune.train_state"));
}

}  // namespace deltatune
