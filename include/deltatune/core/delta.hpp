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

#include <functional>
#include <optional>
#include <string>
#include <utility>

#include <deltatune/core/precision.hpp>

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

// A weight delta of low rank, dW = scale B A with A (r, in) and B (out, r). The scale stays a
// number so that a mixed batch applies every delta's in one multiplication, not one per delta.
struct LowRankFactors {
  torch::Tensor A, B;
  double scale = 1.0;

  // scale x A^T B^T, (..., r) then (..., out), in the factors' precision whatever x's (a
  // half-precision x kept as it is for backward, precision.hpp), with the delta's dropout on x if any.
  torch::Tensor output(const torch::Tensor& x, const detail::InputDropout& dropout = {}) const {
    return torch::matmul(detail::linear_in_precision_of(x, A, {}, dropout) * scale, detail::transposed_operand(B));
  }
};

// Acts on a frozen Linear y = x W0^T + b0, W0 (out, in), through its weight and bias.
class WeightDelta : public DeltaModule {
 public:
  DeltaFamily family() const final { return DeltaFamily::weight; }

  // dW, of W0's shape. Merging adds it to W0 (unmerging restores W0 from a copy).
  virtual torch::Tensor delta_weight(const torch::Tensor& base_weight) = 0;
  // db, of shape (out), or an undefined tensor where the method leaves the bias alone.
  virtual torch::Tensor delta_bias(const torch::Tensor& /*base_weight*/) { return {}; }

  // What the delta adds to the frozen layer's output y0 = x W0^T + b0: x dW^T + db.
  // Additive, so that several deltas on one layer sum. Methods with a cheaper route
  // override it (LoRA: s B A x; IA3: (l - 1) y0; DoRA rescales y0 - b0, hence b0, which is
  // undefined on a layer without a bias); it must equal the merged layer's change.
  virtual torch::Tensor delta_output(const torch::Tensor& x, const torch::Tensor& base_weight,
                                     const torch::Tensor& /*base_bias*/, const torch::Tensor& /*base_output*/) {
    return torch::nn::functional::linear(x, delta_weight(base_weight), delta_bias(base_weight));
  }

  // A delta that is a scale s (in) of the Linear's input returns it here (IA3 on a
  // feed-forward layer); undefined otherwise. A Linear site then computes (x * s) W0^T + b0,
  // one product, where adding delta_output would take a second one.
  virtual torch::Tensor input_scale(const torch::Tensor& /*base_weight*/) { return {}; }
  // A delta that is a scale s (out) of the Linear's output, y0 * s, returns it here (IA3 on
  // keys and values); undefined otherwise. A mixed batch scales each row by its delta's s in
  // one product over the batch, where each delta's delta_output would take its rows apart.
  virtual torch::Tensor output_scale(const torch::Tensor& /*base_weight*/) { return {}; }

  // A delta whose delta_output is scale x A^T B^T, of rank r at most (LoRA, PiSSA, VeRA), returns
  // its factors here; empty otherwise (DoRA, LoKr, IA3, dropout in training). A mixed batch
  // (DeltaModel::route) gathers each row's factors and runs the rows of every such delta at a
  // site in two batched products, where each other delta takes products of its own.
  virtual std::optional<LowRankFactors> low_rank_factors() { return std::nullopt; }

  // Whether delta_output takes a half-precision x as it comes and computes in its float32
  // parameters' precision itself, keeping x, not a float32 copy of it, for backward (LoRA, with
  // DoRA, PiSSA or dropout too; LoKr). A Linear site hands the others x cast to their precision.
  virtual bool takes_half_input() const { return false; }

  // y = x (W0 + dW)^T + (b0 + db): the layer with this delta alone.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& base_weight, const torch::Tensor& base_bias) {
    if (auto scale = input_scale(base_weight); scale.defined())
      return torch::nn::functional::linear(x * scale, base_weight, base_bias);
    auto y0 = torch::nn::functional::linear(x, base_weight, base_bias);
    return y0 + delta_output(x, base_weight, base_bias, y0);
  }
};

// How a sublayer ends once its body produced h: the backbone's layer norm over h + residual
// (BERT, post-norm), or h + residual alone when there is none (T5, pre-norm).
using LayerNormFn = std::function<torch::Tensor(const torch::Tensor&)>;

// A bottleneck adapter's f(x) = act(x D^T + d) U^T + u as dense matrices: D (m, in), d (m),
// U (out, m), u (out). act maps 0 to 0, so that bottleneck units padded with zeros add nothing.
struct BottleneckFactors {
  torch::Tensor down_weight, down_bias, up_weight, up_bias;
  std::string non_linearity;  // act's name: adapters with the same one share batched products
  std::function<torch::Tensor(const torch::Tensor&)> activation;
  // The sublayer ends as end_sublayer(h + f(x), residual, layer_norm), where x is h itself, or,
  // where this is true, the sublayer's normalised output end_sublayer(h, residual, layer_norm).
  bool reads_normed = false;
};

// Acts on a sublayer's output h (..., d), before the residual and layer norm.
class ActivationDelta : public DeltaModule {
 public:
  DeltaFamily family() const final { return DeltaFamily::activation; }

  // The new output, the delta's own skip connection included: h + f(h) for an adapter.
  virtual torch::Tensor forward(const torch::Tensor& hidden) = 0;

  // The sublayer's end with this delta: by default forward(h), then the backbone's own
  // end. Placements around the residual and layer norm (adapters' original_ln_before)
  // override it.
  virtual torch::Tensor forward_sublayer(const torch::Tensor& hidden, const torch::Tensor& residual,
                                         const LayerNormFn& layer_norm) {
    return end_sublayer(forward(hidden), residual, layer_norm);
  }

  // A bottleneck adapter whose forward_sublayer is as BottleneckFactors says returns its
  // factors here (computed from its parameters, so gradients reach them); empty otherwise. A
  // mixed batch (DeltaModel::route) gathers each row's factors and runs the rows of every
  // such adapter at a site in two batched products.
  virtual std::optional<BottleneckFactors> bottleneck_factors() { return std::nullopt; }

  static torch::Tensor end_sublayer(const torch::Tensor& hidden, const torch::Tensor& residual,
                                    const LayerNormFn& layer_norm) {
    return layer_norm ? layer_norm(hidden + residual) : hidden + residual;
  }
};

// Prepends trained vectors to an encoder's input embeddings (prompt) or to attention
// layers' keys and values (prefix); masks grow by num_virtual_tokens().
class InputDelta : public DeltaModule {
 public:
  DeltaFamily family() const final { return DeltaFamily::input; }
  virtual int64_t num_virtual_tokens() const = 0;

  // Prompt: the (P, d) embeddings prepended to every sequence; undefined for a prefix.
  virtual torch::Tensor prompt_embeddings() { return {}; }
  // Prefix: the (P, inner) keys and values prepended at the attention site named `site`
  // (e.g. "decoder.block.1.layer.1.EncDecAttention"); undefined where it adds none.
  virtual std::pair<torch::Tensor, torch::Tensor> prefix_key_value(const std::string& /*site*/) { return {}; }

  // A forward pass through the sites begins, or ends (ForwardPass, which the backbones open):
  // a delta computed from its parameters (a prefix through its MLP) computes once in between
  // and keeps nothing after. Passes may nest (a model's forward around its stacks').
  virtual void begin_pass() {}
  virtual void end_pass() {}
};

}  // namespace deltatune
