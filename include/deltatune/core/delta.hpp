// DeltaModule: the one interface every delta method implements, in three families
// by where the delta acts (DESIGN.md): on a Linear's weights, on a sublayer's
// output, or on the model's input.
//
// A method is a torch::nn::Module (its trained parameters are that module's
// parameters) that also implements one of WeightDelta, ActivationDelta or
// InputDelta. Methods know nothing of T5 or BERT: a backbone site calls them.
#pragma once

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <string>

namespace deltatune {

enum class DeltaFamily {
  weight,      // W0 + dW(theta), b0 + db(theta): LoRA, PHM reparameterisation, BitFit, IA3
  activation,  // h + f(h) on a sublayer's output: Adapter, PHM-Adapter, Compacter(++)
  input,       // trained vectors prepended to the embeddings or attention keys/values: prompt, prefix
};

inline const char* to_string(DeltaFamily family) {
  switch (family) {
    case DeltaFamily::weight: return "weight";
    case DeltaFamily::activation: return "activation";
    case DeltaFamily::input: return "input";
  }
  return "unknown";
}

class DeltaModule {
 public:
  virtual ~DeltaModule() = default;

  // The method's name in configs and summaries: "lora", "compacter", ...
  virtual std::string method() const = 0;
  virtual DeltaFamily family() const = 0;
  // The options it was built with; delta checkpoints store them beside the weights.
  virtual nlohmann::json options_json() const = 0;
  // The module that owns the trained parameters (for our methods, the method itself).
  virtual torch::nn::Module& module() = 0;

  // Only weight deltas can be folded into the frozen weights for zero-overhead inference.
  bool mergeable() const { return family() == DeltaFamily::weight; }

  int64_t num_parameters() {
    int64_t count = 0;
    for (const auto& p : module().parameters()) count += p.numel();
    return count;
  }
};

// Acts on a frozen Linear y = x W0^T + b0, W0 (out, in), through its weight and bias.
class WeightDelta : public DeltaModule {
 public:
  DeltaFamily family() const final { return DeltaFamily::weight; }

  // dW, of W0's shape. Merging adds it to W0; unmerging subtracts it.
  virtual torch::Tensor delta_weight(const torch::Tensor& base_weight) = 0;
  // db, of shape (out), or an undefined tensor where the method leaves the bias alone.
  virtual torch::Tensor delta_bias(const torch::Tensor& /*base_weight*/) { return {}; }

  // y = x (W0 + dW)^T + (b0 + db). Methods with a cheaper route (LoRA's x A^T B^T)
  // override it; the result must stay equal to the merged layer's.
  virtual torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& base_weight,
                                const torch::Tensor& base_bias) {
    auto bias = base_bias;
    if (auto db = delta_bias(base_weight); db.defined()) bias = bias.defined() ? bias + db : db;
    return torch::nn::functional::linear(x, base_weight + delta_weight(base_weight), bias);
  }
};

// Acts on a sublayer's output h (..., d): returns the new output, residual included.
class ActivationDelta : public DeltaModule {
 public:
  DeltaFamily family() const final { return DeltaFamily::activation; }
  virtual torch::Tensor forward(const torch::Tensor& hidden) = 0;
};

// Prepends trained vectors to the input embeddings (prompt) or to every attention
// layer's keys and values (prefix); masks grow by num_virtual_tokens().
class InputDelta : public DeltaModule {
 public:
  DeltaFamily family() const final { return DeltaFamily::input; }
  virtual int64_t num_virtual_tokens() const = 0;
};

}  // namespace deltatune
