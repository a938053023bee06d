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
#include <deltatune/core/json_file.hpp>
#include <deltatune/core/safetensors.hpp>
#include <deltatune/core/tensor_match.hpp>

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

// Trained tensors by name (DeltaModel::named_trainable_parameters()): the training state is
// keyed by these names, so it survives a reordering and names what is missing.
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// A module's named_parameters() as NamedTensors, to train a whole module by name.
inline NamedTensors named_tensors(const torch::OrderedDict<std::string, torch::Tensor>& tensors) {
  NamedTensors out;
  for (const auto& item : tensors) out.emplace_back(item.key(), item.value());
  return out;
}

namespace detail {

// The file's key for one part of a parameter's state: "param/<name>", "exp_avg/<name>", ...
inline std::string state_key(const char* part, const std::string& name) { return fmt::format("{}/{}", part, name); }

}  // namespace detail

// Writes `params`, the state of `optimizer` (an AdamW over exactly these params), the random
// generators and `state` to `path`, each tensor under its parameter's name. Throws
// CheckpointError naming the file.
//   deltatune::save_train_state("out/last/state.safetensors", model.named_trainable_parameters(),
//                               optimizer, {{"step", step}});
inline void save_train_state(const std::string& path, const NamedTensors& params, torch::optim::AdamW& optimizer,
                             const nlohmann::json& state) {
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [name, param] : params) {
    detail::check<OptionError>(!tensors.count(detail::state_key("param", name)), "save_train_state: two parameters "
                               "are named '{}'", name);
    tensors[detail::state_key("param", name)] = param.detach().cpu();
    const auto found = optimizer.state().find(param.unsafeGetTensorImpl());
    if (found == optimizer.state().end()) continue;  // not yet stepped
    const auto& s = static_cast<const torch::optim::AdamWParamState&>(*found->second);
    tensors[detail::state_key("step", name)] = torch::tensor(s.step(), torch::kInt64);
    tensors[detail::state_key("exp_avg", name)] = s.exp_avg().cpu();
    tensors[detail::state_key("exp_avg_sq", name)] = s.exp_avg_sq().cpu();
    if (s.max_exp_avg_sq().defined()) tensors[detail::state_key("max_exp_avg_sq", name)] = s.max_exp_avg_sq().cpu();
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

// A training state as read from its file: metadata checked, then every tensor matched by name
// against the parameters (TensorMatch), so that a damaged or forged file is refused whole,
// naming each tensor that is missing, unexpected or of another shape or dtype, before
// anything is restored.
class SavedTrainState {
 public:
  // AdamW's options of one param group, as saved.
  struct Group {
    double lr, beta1, beta2, eps, weight_decay;
    bool amsgrad;
  };
  // Where one parameter's AdamW state lands once the file is copied; step -1: never stepped.
  struct Moments {
    torch::Tensor step, exp_avg, exp_avg_sq, max_exp_avg_sq;
  };

  SavedTrainState(std::string path, const NamedTensors& params, std::size_t num_groups)
      : path_(std::move(path)), file_(read_safetensors(path_)), state_(metadata_json("deltatune.train_state")) {
    read_groups(num_groups);
    std::vector<TensorSlot> slots;
    for (const auto& [name, param] : params) add_parameter(slots, name, param);
    for (const auto& [name, generator] : default_generators()) {
      if (!file_.tensors.count(name)) continue;  // a state saved without this device's generator
      generators_.emplace_back(generator, generator.get_state());
      slots.push_back({name, {name}, generators_.back().second, same_dtype(generators_.back().second)});
    }
    match_ = std::make_unique<TensorMatch>(slots, file_.tensors);
    check<CheckpointError>(match_->fits(), "{} does not fit these trainable parameters (resume with the parameters "
                           "the run saved, by name, or start afresh):{}", path_, match_->problems());
    for (const auto& [name, generator] : default_generators())
      if (file_.tensors.count(name)) check_generator_state(name, generator);
  }

  // Copies the parameters, moments and generator states into place.
  void copy() const { match_->copy(); }

  const std::vector<Moments>& moments() const { return moments_; }
  // Sets the generators to their saved states (after copy()).
  void restore_generators() {
    for (auto& [generator, state] : generators_) generator.set_state(state);
  }
  const nlohmann::json& state() const { return state_; }
  const std::vector<Group>& groups() const { return groups_; }

 private:
  // A generator state of the right size may still hold bytes no generator takes: tried on a
  // copy first, so that a file is refused before anything is restored from it.
  void check_generator_state(const std::string& name, const at::Generator& generator) const {
    try {
      generator.clone().set_state(file_.tensors.at(name));
    } catch (const c10::Error& e) {
      throw CheckpointError(fmt::format("{}: tensor '{}' is not a state of this generator ({})", path_, name,
                                        e.what_without_backtrace()));
    }
  }

  // The file's tensor where its dtype is the target's; else it fits no slot.
  static std::function<torch::Tensor(const torch::Tensor&)> same_dtype(const torch::Tensor& target) {
    return [dtype = target.scalar_type()](const torch::Tensor& t) { return t.scalar_type() == dtype ? t : torch::Tensor(); };
  }

  void add_parameter(std::vector<TensorSlot>& slots, const std::string& name, const torch::Tensor& param) {
    slots.push_back({state_key("param", name), {state_key("param", name)}, param, same_dtype(param)});
    Moments m;
    m.step = torch::full({}, -1, torch::kInt64);
    if (file_.tensors.count(state_key("step", name))) {
      slots.push_back({state_key("step", name), {state_key("step", name)}, m.step, [](const torch::Tensor& t) {
                         const bool ok = t.dim() == 0 && t.scalar_type() == torch::kInt64 && t.item<int64_t>() >= 0;
                         return ok ? t : torch::Tensor();  // AdamW's step count: one non-negative int64
                       }});
      auto moment = [&](const char* part, torch::Tensor& target, bool optional) {
        target = torch::zeros_like(param);
        slots.push_back({state_key(part, name), {state_key(part, name)}, target, same_dtype(param), optional});
      };
      moment("exp_avg", m.exp_avg, false);
      moment("exp_avg_sq", m.exp_avg_sq, false);
      if (file_.tensors.count(state_key("max_exp_avg_sq", name))) moment("max_exp_avg_sq", m.max_exp_avg_sq, false);
    }
    moments_.push_back(std::move(m));
  }

  void read_groups(std::size_t num_groups) {
    const auto groups = metadata_json("deltatune.adamw_groups");
    check<CheckpointError>(groups.is_array() && groups.size() == num_groups, "{}: the saved state has {} optimizer "
                           "param groups, the optimizer {}", path_, groups.is_array() ? groups.size() : 0, num_groups);
    for (std::size_t g = 0; g < groups.size(); ++g) {
      const JsonFields j(groups[g], fmt::format("{}: metadata deltatune.adamw_groups[{}]", path_, g));
      groups_.push_back({j.get<double>("lr"), j.get<double>("beta1"), j.get<double>("beta2"), j.get<double>("eps"),
                         j.get<double>("weight_decay"), j.get<bool>("amsgrad")});
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
  std::vector<Moments> moments_;  // one per parameter, in the caller's order
  std::vector<std::pair<at::Generator, torch::Tensor>> generators_;
  std::unique_ptr<TensorMatch> match_;
};

}  // namespace detail

// Restores what save_train_state wrote into `params` (copied in place, on their devices),
// `optimizer` and the random generators, and returns the saved `state`. Every tensor is found
// by its parameter's name; CheckpointError names the file and each tensor that is missing,
// left over, or of another shape or dtype, before anything is changed.
inline nlohmann::json load_train_state(const std::string& path, const NamedTensors& params,
                                       torch::optim::AdamW& optimizer) {
  detail::SavedTrainState saved(path, params, optimizer.param_groups().size());
  saved.copy();
  for (std::size_t i = 0; i < params.size(); ++i) {
    const auto& m = saved.moments()[i];
    auto* impl = params[i].second.unsafeGetTensorImpl();
    if (m.step.item<int64_t>() < 0) {
      optimizer.state().erase(impl);
      continue;
    }
    auto s = std::make_unique<torch::optim::AdamWParamState>();
    s->step(m.step.item<int64_t>());
    s->exp_avg(m.exp_avg);
    s->exp_avg_sq(m.exp_avg_sq);
    if (m.max_exp_avg_sq.defined()) s->max_exp_avg_sq(m.max_exp_avg_sq);
    optimizer.state()[impl] = std::move(s);
  }
  for (std::size_t g = 0; g < saved.groups().size(); ++g) {
    const auto& saved_group = saved.groups()[g];
    detail::adamw_options(optimizer.param_groups()[g])
        .lr(saved_group.lr).betas({saved_group.beta1, saved_group.beta2}).eps(saved_group.eps)
        .weight_decay(saved_group.weight_decay).amsgrad(saved_group.amsgrad);
  }
  saved.restore_generators();
  return saved.state();
}

}  // namespace deltatune
