// Filling a model's tensors from a file's, all or nothing. Every loader (backbone checkpoints,
// DeltaModel::load, peft's and adapters' layouts) says which file tensor fills which model
// tensor and gets back either the copies to make or one list of everything that does not fit,
// so that a bad file is refused whole, with every problem named, before anything is copied.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <deltatune/core/error.hpp>

// Internal to the loaders, hence in detail.
namespace deltatune::detail {

// One model tensor that a file must fill.
struct TensorSlot {
  std::string name;               // what messages call it (the model's name for it)
  std::vector<std::string> keys;  // the names the file may hold it under, tried in order
  torch::Tensor target;           // filled in place; F16 / BF16 in the file are widened to its dtype
  // The file's tensor as the target's value (default: as it is). Where it cannot be (an
  // undefined result, a c10::Error, or another shape than the target's) the slot is mismatched.
  std::function<torch::Tensor(const torch::Tensor&)> convert = {};
  bool optional = false;  // absent from the file: the target keeps its value
};

// Slots for tensors whose file names are their names.
inline std::vector<TensorSlot> slots_named_as_in_file(const std::map<std::string, torch::Tensor>& targets) {
  std::vector<TensorSlot> slots;
  for (const auto& [key, target] : targets) slots.push_back({key, {key}, target});
  return slots;
}

// "a, b, c" with at most `limit` names, then "and N more".
inline std::string list_names(const std::vector<std::string>& names, size_t limit = 12) {
  std::vector<std::string> shown(names.begin(), names.begin() + std::min(limit, names.size()));
  auto text = fmt::format("{}", fmt::join(shown, ", "));
  if (names.size() > limit) text += fmt::format(" and {} more", names.size() - limit);
  return text;
}

// The slots matched against a file: the copies to make, and what is missing, mismatched or
// left over (file tensors no slot asked for, less those `may_go_unused` accepts).
class TensorMatch {
 public:
  TensorMatch(const std::vector<TensorSlot>& slots, const std::map<std::string, torch::Tensor>& file,
              const std::function<bool(const std::string&)>& may_go_unused = {}) {
    std::set<std::string> used;
    for (const auto& slot : slots) {
      auto key = std::find_if(slot.keys.begin(), slot.keys.end(), [&](const auto& k) { return file.count(k) > 0; });
      if (key == slot.keys.end()) {
        if (!slot.optional) missing_.push_back(slot.name);
        continue;
      }
      used.insert(*key);
      match(slot, file.at(*key));
    }
    for (const auto& [key, tensor] : file)
      if (!used.count(key) && !(may_go_unused && may_go_unused(key))) unexpected_.push_back(key);
  }

  bool fits() const { return missing_.empty() && mismatched_.empty() && unexpected_.empty(); }

  // One line per kind of problem, each starting "\n  "; empty when the file fits.
  std::string problems() const {
    std::string text;
    auto add = [&](const char* kind, const std::vector<std::string>& names) {
      if (!names.empty()) text += fmt::format("\n  {} ({}): {}", kind, names.size(), list_names(names));
    };
    add("missing", missing_);
    add("unexpected", unexpected_);
    add("mismatched", mismatched_);
    return text;
  }

  // Copies every matched file tensor into its slot's target; only when the whole file fits.
  void copy() const {
    check<Error>(fits(), "TensorMatch::copy: the file does not fit:{}", problems());
    torch::NoGradGuard no_grad;
    for (const auto& [target, value] : copies_) target.copy_(value);
  }

 private:
  void match(const TensorSlot& slot, const torch::Tensor& stored) {
    torch::Tensor value = stored;
    if (slot.convert) {
      try {
        value = slot.convert(stored);
      } catch (const c10::Error&) {  // a reshape or narrow that the file's shape does not allow
        value = torch::Tensor();
      }
    }
    if (value.defined() && value.sizes() == slot.target.sizes()) {
      copies_.emplace_back(slot.target, value);
      return;
    }
    mismatched_.push_back(fmt::format("{} (file {} {}, model {} {})", slot.name, c10::toString(stored.scalar_type()),
                                      stored.sizes(), c10::toString(slot.target.scalar_type()), slot.target.sizes()));
  }

  std::vector<std::pair<torch::Tensor, torch::Tensor>> copies_;
  std::vector<std::string> missing_, unexpected_, mismatched_;
};

}  // namespace deltatune::detail
