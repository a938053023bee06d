// Native T5 (v1.0 ReLU, v1.1 / Flan gated-GELU): an encoder-decoder built from sites under
// Hugging Face's module names, loaded from a Hugging Face folder or a TorchScript archive.
// Leaves out beam search and sampling (greedy decoding only), head pruning, model
// parallelism and T5's classification and question-answering heads.
#pragma once

#include <torch/torch.h>

#include <array>
#include <cmath>
#include <filesystem>
#include <functional>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <deltatune/backbones/checkpoint.hpp>
#include <deltatune/backbones/cross_entropy.hpp>
#include <deltatune/backbones/dropout.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/json_file.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/core/precision.hpp>
#include <deltatune/core/site.hpp>
#include <deltatune/kernels/rms_norm_cpu.hpp>

namespace deltatune::backbones {

// T5's hyper-parameters under config.json's keys; defaults are transformers' (t5-small).
struct T5Config {
  TORCH_ARG(int64_t, vocab_size) = 32128;
  TORCH_ARG(int64_t, d_model) = 512;
  TORCH_ARG(int64_t, d_kv) = 64;        // per head: the attention's inner size is num_heads * d_kv
  TORCH_ARG(int64_t, d_ff) = 2048;      // the feed-forward's hidden size
  TORCH_ARG(int64_t, num_layers) = 6;   // encoder blocks
  TORCH_ARG(std::optional<int64_t>, num_decoder_layers) = std::nullopt;  // decoder blocks; unset: num_layers
  TORCH_ARG(int64_t, num_heads) = 8;
  TORCH_ARG(int64_t, relative_attention_num_buckets) = 32;
  TORCH_ARG(int64_t, relative_attention_max_distance) = 128;  // positions farther apart share the last bucket
  TORCH_ARG(double, dropout_rate) = 0.1;
  TORCH_ARG(double, layer_norm_epsilon) = 1e-6;
  TORCH_ARG(std::string, feed_forward_proj) = "relu";  // "relu" (v1.0), "gated-gelu" (v1.1, Flan), "gated-silu", ...
  TORCH_ARG(bool, tie_word_embeddings) = true;   // lm_head reuses `shared`, logits scaled by d_model^-0.5 first
  TORCH_ARG(int64_t, pad_token_id) = 0;
  TORCH_ARG(int64_t, eos_token_id) = 1;
  TORCH_ARG(int64_t, decoder_start_token_id) = 0;
  // Ours, not config.json's (from_json leaves the default): whether dropout in training keeps
  // its masks' seeds or one-byte masks (backbones/dropout.hpp), or runs as torch's. On the CPU
  // the lean way holds less memory in a frozen-backbone step and takes less time (README's
  // "Benchmarks"); on CUDA it differs only in fusing ReLU with dropout.
  TORCH_ARG(bool, lean_dropout) = true;

 public:
  int64_t decoder_layers() const { return num_decoder_layers().value_or(num_layers()); }

  // Reads config.json's object; `where` names it in messages. A missing or mistyped key
  // throws CheckpointError; keys transformers gives defaults to take those defaults.
  static T5Config from_json(const nlohmann::json& json, const std::string& where);
};

}  // namespace deltatune::backbones

namespace deltatune::detail {

enum class T5Activation { relu, gelu, gelu_new, silu };

struct T5FeedForwardKind {
  bool gated;
  T5Activation activation;
};

// "relu", "gated-gelu", "gated-silu", ... as transformers reads feed_forward_proj:
// [gated-]act; "gated-gelu" means the tanh approximation (gelu_new), plain "gelu" the exact one.
inline std::optional<T5FeedForwardKind> parse_feed_forward_proj(const std::string& name) {
  const bool gated = name.rfind("gated-", 0) == 0;
  const std::string act = gated ? name.substr(6) : name;
  if (act == "relu") return T5FeedForwardKind{gated, T5Activation::relu};
  if (act == "gelu") return T5FeedForwardKind{gated, gated ? T5Activation::gelu_new : T5Activation::gelu};
  if (act == "gelu_new") return T5FeedForwardKind{gated, T5Activation::gelu_new};
  if (act == "silu" || act == "swish") return T5FeedForwardKind{gated, T5Activation::silu};
  return std::nullopt;
}

inline torch::Tensor activate(T5Activation activation, const torch::Tensor& x) {
  switch (activation) {
    case T5Activation::relu: return torch::relu(x);
    case T5Activation::gelu: return torch::gelu(x);
    case T5Activation::gelu_new: return torch::gelu(x, "tanh");
    case T5Activation::silu: return torch::silu(x);
  }
  return x;
}

// The config's values that no model can be built with, as one text ("" when none).
inline std::string t5_config_problems(const backbones::T5Config& c) {
  std::vector<std::string> problems;
  auto positive = [&](const char* key, int64_t value) {
    if (value < 1) problems.push_back(fmt::format("{} = {} (must be at least 1)", key, value));
  };
  positive("vocab_size", c.vocab_size());
  positive("d_model", c.d_model());
  positive("d_kv", c.d_kv());
  positive("d_ff", c.d_ff());
  positive("num_layers", c.num_layers());
  positive("num_decoder_layers", c.decoder_layers());
  positive("num_heads", c.num_heads());
  // Bidirectional bucketing gives half the buckets to each sign, and half of those are exact.
  if (c.relative_attention_num_buckets() < 4)
    problems.push_back(fmt::format("relative_attention_num_buckets = {} (must be at least 4)",
                                   c.relative_attention_num_buckets()));
  if (c.relative_attention_max_distance() <= c.relative_attention_num_buckets() / 2)
    problems.push_back(fmt::format("relative_attention_max_distance = {} (must exceed half the buckets, {})",
                                   c.relative_attention_max_distance(), c.relative_attention_num_buckets() / 2));
  if (c.dropout_rate() < 0 || c.dropout_rate() >= 1)
    problems.push_back(fmt::format("dropout_rate = {} (must be in [0, 1))", c.dropout_rate()));
  if (!(c.layer_norm_epsilon() > 0))
    problems.push_back(fmt::format("layer_norm_epsilon = {} (must be positive)", c.layer_norm_epsilon()));
  const auto ff = parse_feed_forward_proj(c.feed_forward_proj());
  if (!ff)
    problems.push_back(fmt::format("feed_forward_proj = \"{}\" (expected relu, gelu, gelu_new or silu, "
                                   "optionally gated-: \"gated-gelu\")", c.feed_forward_proj()));
  // The embedding looks these up: an id past the vocabulary would index out of range.
  const std::pair<const char*, int64_t> token_ids[] = {
      {"pad_token_id", c.pad_token_id()}, {"eos_token_id", c.eos_token_id()},
      {"decoder_start_token_id", c.decoder_start_token_id()}};
  for (const auto& [key, id] : token_ids)
    if (id < 0 || id >= c.vocab_size())
      problems.push_back(fmt::format("{} = {} (must be a token id, in [0, vocab_size = {}))", key, id, c.vocab_size()));
  if (problems.empty()) {
    const double d = double(c.d_model()), inner = double(c.num_heads()) * double(c.d_kv()),
                 ffn = d * double(c.d_ff()) * (ff->gated ? 3 : 2), vocab = double(c.vocab_size());
    const double parameters = vocab * d * (c.tie_word_embeddings() ? 1 : 2) +
                              double(c.num_layers()) * (4 * d * inner + ffn + 2 * d) +
                              double(c.decoder_layers()) * (8 * d * inner + ffn + 3 * d) +
                              2 * double(c.relative_attention_num_buckets() * c.num_heads()) + 2 * d;
    const auto memory = memory_problem(parameters);
    if (!memory.empty()) problems.push_back(fmt::format("the model {}", memory));
  }
  return fmt::format("{}", fmt::join(problems, "; "));
}

// Hugging Face T5's bucket of each relative position (key minus query): half the buckets for
// exact small distances, the rest logarithmic up to max_distance; bidirectional splits them by
// sign, causal (decoder) ones see only the past. Same operations in the same order as
// transformers, so that the float32 logarithm rounds alike.
inline torch::Tensor relative_position_bucket(torch::Tensor relative_position, bool bidirectional,
                                              int64_t num_buckets, int64_t max_distance) {
  auto buckets = torch::zeros_like(relative_position);
  if (bidirectional) {
    num_buckets /= 2;
    buckets = (relative_position > 0).to(torch::kLong) * num_buckets;
    relative_position = relative_position.abs();
  } else {
    relative_position = -torch::clamp_max(relative_position, 0);
  }
  const int64_t max_exact = num_buckets / 2;
  auto large = max_exact + (torch::log(relative_position.to(torch::kFloat) / double(max_exact)) /
                            std::log(double(max_distance) / double(max_exact)) * double(num_buckets - max_exact))
                               .to(torch::kLong);
  large = torch::clamp_max(large, num_buckets - 1);
  return buckets + torch::where(relative_position < max_exact, relative_position, large);
}

inline double lowest_value(torch::ScalarType dtype) {
  double lowest = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kHalf, torch::kBFloat16, dtype, "lowest_value",
                                  [&] { lowest = double(std::numeric_limits<scalar_t>::lowest()); });
  return lowest;
}

// transformers clamps float16 activations after every sublayer: T5's outgrow float16's range.
inline torch::Tensor clamp_float16(const torch::Tensor& h) {
  if (h.scalar_type() != torch::kHalf) return h;
  const double max = 65504.0;
  auto limit = torch::where(torch::isinf(h).any(), torch::scalar_tensor(max - 1000, h.options()),
                            torch::scalar_tensor(max, h.options()));
  return torch::clamp(h, -limit, limit);
}

// RMS norm w * x / sqrt(mean(x^2) + eps) as torch's rms_norm computes it (in float32 for half
// types, rounded once at the end), keeping only x as it came and one float32 statistic per row
// for backward. torch's composite version keeps a bf16 x's float32 copy for its square and
// product, twice x's bytes, and, where the weight trains, the float32 normalised x too (a sixth
// of what a bf16 T5-small's forward keeps with LoRA). A bf16 x on the CPU takes the one-pass
// kernels of kernels/rms_norm_cpu.hpp; other dtypes and devices torch's ops, the composite's own
// steps, bit for bit.
struct RMSNormFunction : torch::autograd::Function<RMSNormFunction> {
  static torch::ScalarType accumulate_type(const torch::Tensor& x) {
    return x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
  }

  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& w,
                               double eps) {
    if (cpu::rms_norm_applies(x, w)) {
      auto [y, rstd] = cpu::rms_norm_forward(x, w, eps);
      ctx->save_for_backward({x, w, rstd});
      return y;
    }
    const auto xf = x.to(accumulate_type(x));
    const auto rstd = torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps);
    ctx->save_for_backward({x, w, rstd});
    return (xf * rstd * w.to(xf.scalar_type())).to(x.scalar_type());
  }

  // The composite's own steps backwards: the products, rsqrt (-r^3 / 2), mean, square (2x).
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &rstd = saved[2];
    if (cpu::rms_norm_applies(x, w)) {
      auto [grad_x, grad_w] = cpu::rms_norm_backward(grads[0], x, w, rstd, ctx->needs_input_grad(1));
      return {grad_x, grad_w, {}};
    }
    const auto xf = x.to(accumulate_type(x));
    const auto grad = grads[0].to(xf.scalar_type());
    torch::Tensor grad_x, grad_w;
    if (ctx->needs_input_grad(1)) grad_w = (grad * (xf * rstd)).sum_to_size(w.sizes()).to(w.scalar_type());
    if (ctx->needs_input_grad(0)) {
      const auto grad_normalised = grad * w.to(xf.scalar_type());
      const auto grad_rstd = (grad_normalised * xf).sum_to_size(rstd.sizes());
      const auto grad_mean = -0.5 * grad_rstd * rstd.pow(3) / double(x.size(-1));
      grad_x = (grad_normalised * rstd + grad_mean * (2 * xf)).to(x.scalar_type());
    }
    return {grad_x, grad_w, {}};
  }
};

}  // namespace deltatune::detail

namespace deltatune::backbones {

inline T5Config T5Config::from_json(const nlohmann::json& json, const std::string& where) {
  const JsonFields f(json, where);
  const auto model_type = f.get<std::string>("model_type", "t5");
  detail::check<CheckpointError>(model_type == "t5" || model_type == "mt5",
                                 "{}: model_type is \"{}\"; load_t5 reads T5 (or mT5) checkpoints", where, model_type);
  T5Config c;
  c.vocab_size(f.get<int64_t>("vocab_size"))
      .d_model(f.get<int64_t>("d_model"))
      .d_kv(f.get<int64_t>("d_kv"))
      .d_ff(f.get<int64_t>("d_ff"))
      .num_layers(f.get<int64_t>("num_layers"))
      .num_heads(f.get<int64_t>("num_heads"));
  c.num_decoder_layers(f.get<int64_t>("num_decoder_layers", c.num_layers()))
      .relative_attention_num_buckets(f.get<int64_t>("relative_attention_num_buckets", c.relative_attention_num_buckets()))
      .relative_attention_max_distance(
          f.get<int64_t>("relative_attention_max_distance", c.relative_attention_max_distance()))
      .dropout_rate(f.get<double>("dropout_rate", c.dropout_rate()))
      .layer_norm_epsilon(f.get<double>("layer_norm_epsilon", c.layer_norm_epsilon()))
      .feed_forward_proj(f.get<std::string>("feed_forward_proj", c.feed_forward_proj()))
      .tie_word_embeddings(f.get<bool>("tie_word_embeddings", c.tie_word_embeddings()))
      .pad_token_id(f.get<int64_t>("pad_token_id", c.pad_token_id()))
      .eos_token_id(f.get<int64_t>("eos_token_id", c.eos_token_id()))
      .decoder_start_token_id(f.get<int64_t>("decoder_start_token_id", c.pad_token_id()));  // T5 starts from pad
  const auto problems = detail::t5_config_problems(c);
  detail::check<CheckpointError>(problems.empty(), "{}: {}", where, problems);
  return c;
}

// RMS layer norm without bias or mean subtraction, its statistic in float32 (torch's rms_norm
// accumulates half types in float32). A float32 input with a half-precision weight, as
// transformers: the result in the weight's precision; a half-precision input with a float32
// weight (trained, on a bf16 backbone): in the input's (precision.hpp). A weight site: BitFit
// adds the bias T5 leaves out (and merging gives the norm one).
class T5LayerNormImpl : public torch::nn::Module, public WeightSite {
 public:
  T5LayerNormImpl(int64_t d_model, double eps) : WeightSite(this), eps(eps) {
    in_features = out_features = d_model;
    weight = register_parameter("weight", torch::ones({d_model}));
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto y = normalize(x);
    if (bias.defined()) y = y + bias;
    return add_deltas(x, y);
  }

  double eps;

 private:
  torch::Tensor normalize(const torch::Tensor& x) {
    // torch's rms_norm's math, rounded once; for a half-precision x without keeping its float32
    // copy (detail::RMSNormFunction). A float32 x keeps torch's own: the same values, and
    // float32 runs the order of gradient sums they always had.
    if (is_half(x.scalar_type())) return detail::RMSNormFunction::apply(x, detail::at_precision_of(x, weight), eps);
    if (x.scalar_type() == weight.scalar_type()) return torch::rms_norm(x, {weight.size(0)}, weight, eps);
    auto variance = x.to(torch::kFloat).pow(2).mean(-1, /*keepdim=*/true);
    auto h = x * torch::rsqrt(variance + eps);
    if (weight.scalar_type() == torch::kHalf || weight.scalar_type() == torch::kBFloat16) h = h.to(weight.dtype());
    return weight * h;
  }
};
TORCH_MODULE(T5LayerNorm);

// Keys and values of one attention layer, heads split, (B, H, S, d_kv); the first `prefix`
// positions are those prefix deltas prepended.
struct T5KeyValue {
  torch::Tensor key, value;
  int64_t prefix = 0;
};

// One decoder block's cache: self-attention keys and values grow by each step, cross-attention
// ones are projected from the encoder output once.
struct T5BlockCache {
  T5KeyValue self_attention, cross_attention;
};

struct T5DecoderCache {
  std::vector<T5BlockCache> blocks;
  // Positions cached so far, prefix included: where the next decoder position sits.
  int64_t length() const { return blocks.empty() ? 0 : blocks[0].self_attention.key.size(2); }
};

// The additive float mask SDPA gets in one stack call, (B|1, H|1, Tq, Tk): the relative position
// bias plus the dtype's lowest value where a key is padding or, causally, in the future (the
// finite value transformers uses: a fully padded row stays uniform, not NaN). Queries sit at the
// last Tq of the Tk key positions, as in transformers with past keys: in self-attention a prefix
// of P keys shifts the queries to P..P+T-1 and a cache to its length. Made once per shape and
// shared by the layers, as transformers passes position_bias along; a layer with a prefix of
// another length gets its own.
class T5AttentionMask {
 public:
  using BiasFn = std::function<torch::Tensor(int64_t query_len, int64_t key_len)>;  // -> (1, H, Tq, Tk)

  // key_padding (B, S): 1 for a real token, 0 for padding; undefined when all keys count.
  // Prefix keys come before it and are always visible.
  T5AttentionMask(torch::Tensor key_padding, bool causal, BiasFn position_bias)
      : key_padding_(std::move(key_padding)), causal_(causal), position_bias_(std::move(position_bias)) {}

  // For queries of `options` (dtype and device).
  torch::Tensor get(int64_t prefix, int64_t query_len, int64_t key_len, const torch::TensorOptions& options) {
    auto& mask = memo_[{prefix, query_len, key_len}];
    if (!mask.defined()) mask = make(prefix, query_len, key_len, options);
    return mask;
  }

 private:
  torch::Tensor make(int64_t prefix, int64_t query_len, int64_t key_len, const torch::TensorOptions& options) const {
    auto mask = position_bias_ ? position_bias_(query_len, key_len).to(options)
                               : torch::zeros({1, 1, query_len, key_len}, options);
    const double lowest = detail::lowest_value(mask.scalar_type());
    if (key_padding_.defined()) {
      detail::check(key_padding_.size(1) + prefix == key_len,
                    "T5 attention: the mask covers {} keys plus {} prefix ones, the layer has {}",
                    key_padding_.size(1), prefix, key_len);
      auto hidden = key_padding_.to(mask.device()) == 0;  // (B, S)
      if (prefix > 0) hidden = torch::cat({torch::zeros({hidden.size(0), prefix}, hidden.options()), hidden}, 1);
      mask = mask.masked_fill(hidden.view({hidden.size(0), 1, 1, key_len}), lowest);
    }
    if (causal_) {
      auto options = torch::TensorOptions().dtype(torch::kLong).device(mask.device());
      auto query_position = torch::arange(key_len - query_len, key_len, options).unsqueeze(1);  // (Tq, 1)
      auto key_position = torch::arange(key_len, options).unsqueeze(0);                        // (1, Tk)
      mask = mask.masked_fill(key_position > query_position, lowest);
    }
    return mask;
  }

  torch::Tensor key_padding_;
  bool causal_;
  BiasFn position_bias_;
  std::map<std::array<int64_t, 3>, torch::Tensor> memo_;
};

// Multi-head attention without biases or score scaling (T5 folds 1/sqrt(d_kv) into the
// initialisation of q); a site for prefix keys and values. `relative_attention_bias` exists in
// each stack's first self-attention only; the stack shares it with later blocks.
class T5AttentionImpl : public torch::nn::Module, public AttentionSite {
 public:
  T5AttentionImpl(const T5Config& c, bool is_decoder, bool has_relative_attention_bias)
      : is_decoder(is_decoder),
        num_heads(c.num_heads()),
        d_kv(c.d_kv()),
        num_buckets(c.relative_attention_num_buckets()),
        max_distance(c.relative_attention_max_distance()),
        dropout_rate(c.dropout_rate()),
        lean_dropout(c.lean_dropout()) {
    const int64_t inner = c.num_heads() * c.d_kv();
    q = register_module("q", FrozenLinear(c.d_model(), inner, false));
    k = register_module("k", FrozenLinear(c.d_model(), inner, false));
    v = register_module("v", FrozenLinear(c.d_model(), inner, false));
    o = register_module("o", FrozenLinear(inner, c.d_model(), false));
    hidden_features = c.d_model();  // what a prefix is sized by
    key_value_features = inner;
    if (has_relative_attention_bias)
      relative_attention_bias = register_module("relative_attention_bias", torch::nn::Embedding(num_buckets, num_heads));
  }

  // x (B, Tq, d) -> (B, Tq, d). memory (B, S, d): what cross-attention attends to; undefined
  // for self-attention. With a cache, self-attention appends its keys and values to it and
  // cross-attention projects the memory on the first call only; prefixes enter on that call.
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& memory, T5AttentionMask& mask,
                        T5KeyValue* cache = nullptr) {
    auto query = split_heads(q(x));  // (B, H, Tq, d_kv)
    const bool first_call = cache == nullptr || !cache->key.defined();
    T5KeyValue kv;
    if (memory.defined() && !first_call) {
      kv = *cache;
    } else {
      kv = project(memory.defined() ? memory : x, first_call);
      if (!first_call) kv = {torch::cat({cache->key, kv.key}, 2), torch::cat({cache->value, kv.value}, 2), cache->prefix};
      if (cache != nullptr) *cache = kv;
    }
    auto bias = mask.get(kv.prefix, query.size(2), kv.key.size(2), query.options());
    auto out = detail::attention(query, kv.key, kv.value, bias, dropout_rate, is_training(), lean_dropout,
                                 /*scale=*/1.0);
    return o(out.transpose(1, 2).reshape({x.size(0), x.size(1), num_heads * d_kv}));
  }

  // (1, H, Tq, Tk): the learned bias of every key position relative to every query, the
  // queries at key positions Tk - Tq .. Tk - 1. Only the layer holding relative_attention_bias.
  torch::Tensor position_bias(int64_t query_len, int64_t key_len) {
    auto options = torch::TensorOptions().dtype(torch::kLong).device(relative_attention_bias->weight.device());
    auto relative = torch::arange(key_len, options).unsqueeze(0) -
                    torch::arange(key_len - query_len, key_len, options).unsqueeze(1);  // (Tq, Tk)
    auto buckets = detail::relative_position_bucket(relative, /*bidirectional=*/!is_decoder, num_buckets, max_distance);
    return relative_attention_bias(buckets).permute({2, 0, 1}).unsqueeze(0);
  }

  bool is_decoder;
  int64_t num_heads, d_kv, num_buckets, max_distance;
  double dropout_rate;
  bool lean_dropout;
  FrozenLinear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  torch::nn::Embedding relative_attention_bias{nullptr};

 private:
  // (B, S, inner) -> (B, H, S, d_kv)
  torch::Tensor split_heads(const torch::Tensor& t) const {
    return t.view({t.size(0), t.size(1), num_heads, d_kv}).transpose(1, 2);
  }

  // Keys and values of source (B, S, d), the prefix's (B, P, inner) put first when asked.
  T5KeyValue project(const torch::Tensor& source, bool with_prefix) {
    auto key = k(source), value = v(source);  // (B, S, inner)
    int64_t prefix = 0;
    if (with_prefix) {
      auto [prefix_key, prefix_value] = prefix_key_value(source.size(0));
      if (prefix_key.defined()) {
        prefix = prefix_key.size(1);
        key = torch::cat({prefix_key.to(key.dtype()), key}, 1);  // (B, P + S, inner)
        value = torch::cat({prefix_value.to(value.dtype()), value}, 1);
      }
    }
    return {split_heads(key), split_heads(value), prefix};
  }
};
TORCH_MODULE(T5Attention);

// The feed-forward body: wo(dropout(act(wi x))) (v1.0) or wo(dropout(act(wi_0 x) * wi_1 x)) (gated).
class T5DenseImpl : public torch::nn::Module {
 public:
  explicit T5DenseImpl(const T5Config& c) {
    const auto kind = detail::parse_feed_forward_proj(c.feed_forward_proj());
    detail::check<OptionError>(kind.has_value(), "T5: feed_forward_proj \"{}\" is not one of relu, gelu, gelu_new, "
                                                 "silu, optionally gated-", c.feed_forward_proj());
    gated = kind->gated;
    activation = kind->activation;
    if (gated) {
      wi_0 = register_module("wi_0", FrozenLinear(c.d_model(), c.d_ff(), false));
      wi_1 = register_module("wi_1", FrozenLinear(c.d_model(), c.d_ff(), false));
    } else {
      wi = register_module("wi", FrozenLinear(c.d_model(), c.d_ff(), false));
    }
    wo = register_module("wo", FrozenLinear(c.d_ff(), c.d_model(), false));
    dropout = register_module("dropout", Dropout(c.dropout_rate(), c.lean_dropout()));
  }

  // (B, T, d) -> (B, T, d_ff) -> (B, T, d)
  torch::Tensor forward(const torch::Tensor& x) {
    // transformers keeps wo in float32 when the rest is half precision; follow its dtype.
    return wo(hidden(x).to(wo->weight.scalar_type()));
  }

  bool gated;
  detail::T5Activation activation;
  FrozenLinear wi{nullptr}, wi_0{nullptr}, wi_1{nullptr}, wo{nullptr};
  Dropout dropout{nullptr};

 private:
  // dropout(act(wi x)) or dropout(act(wi_0 x) * wi_1 x); ReLU and dropout in one step, keeping one mask.
  torch::Tensor hidden(const torch::Tensor& x) {
    if (gated) return dropout(detail::activate(activation, wi_0(x)) * wi_1(x));
    if (activation == detail::T5Activation::relu)
      return detail::relu_dropout(wi(x), dropout->p, is_training(), dropout->lean);
    return dropout(detail::activate(activation, wi(x)));
  }
};
TORCH_MODULE(T5Dense);

// A sublayer `*.layer.{j}`: pre-norm, body, dropout, then the residual through
// OutputSite::finish, where activation deltas act (T5 has no layer norm after the residual).
class T5SublayerImpl : public torch::nn::Module, public OutputSite {
 public:
  T5LayerNorm layer_norm{nullptr};
  Dropout dropout{nullptr};

 protected:
  // After the body's registration, as transformers orders them.
  void register_norm_and_dropout(const T5Config& c) {
    layer_norm = register_module("layer_norm", T5LayerNorm(c.d_model(), c.layer_norm_epsilon()));
    dropout = register_module("dropout", Dropout(c.dropout_rate(), c.lean_dropout()));
    output_features = c.d_model();  // what an adapter is sized by
  }
  torch::Tensor finish_sublayer(const torch::Tensor& body_output, const torch::Tensor& residual) {
    return finish(dropout(body_output), residual, /*layer_norm=*/{});
  }
};

class T5LayerSelfAttentionImpl : public T5SublayerImpl {
 public:
  T5LayerSelfAttentionImpl(const T5Config& c, bool is_decoder, bool has_relative_attention_bias) {
    SelfAttention = register_module("SelfAttention", T5Attention(c, is_decoder, has_relative_attention_bias));
    register_norm_and_dropout(c);
  }

  torch::Tensor forward(const torch::Tensor& h, T5AttentionMask& mask, T5KeyValue* cache) {
    return finish_sublayer(SelfAttention->forward(layer_norm(h), {}, mask, cache), h);
  }

  T5Attention SelfAttention{nullptr};
};
TORCH_MODULE(T5LayerSelfAttention);

class T5LayerCrossAttentionImpl : public T5SublayerImpl {
 public:
  explicit T5LayerCrossAttentionImpl(const T5Config& c) {
    EncDecAttention = register_module("EncDecAttention", T5Attention(c, /*is_decoder=*/true, false));
    register_norm_and_dropout(c);
  }

  torch::Tensor forward(const torch::Tensor& h, const torch::Tensor& memory, T5AttentionMask& mask,
                        T5KeyValue* cache) {
    return finish_sublayer(EncDecAttention->forward(layer_norm(h), memory, mask, cache), h);
  }

  T5Attention EncDecAttention{nullptr};
};
TORCH_MODULE(T5LayerCrossAttention);

class T5LayerFFImpl : public T5SublayerImpl {
 public:
  explicit T5LayerFFImpl(const T5Config& c) {
    DenseReluDense = register_module("DenseReluDense", T5Dense(c));
    register_norm_and_dropout(c);
  }

  torch::Tensor forward(const torch::Tensor& h) { return finish_sublayer(DenseReluDense(layer_norm(h)), h); }

  T5Dense DenseReluDense{nullptr};
};
TORCH_MODULE(T5LayerFF);

// One block: `layer.0` self-attention, in the decoder `layer.1` cross-attention, then the feed-forward.
class T5BlockImpl : public torch::nn::Module {
 public:
  T5BlockImpl(const T5Config& c, bool is_decoder, bool has_relative_attention_bias) {
    layer = register_module("layer", torch::nn::ModuleList());
    self_attention = T5LayerSelfAttention(c, is_decoder, has_relative_attention_bias);
    layer->push_back(self_attention);
    if (is_decoder) {
      cross_attention = T5LayerCrossAttention(c);
      layer->push_back(cross_attention);
    }
    feed_forward = T5LayerFF(c);
    layer->push_back(feed_forward);
  }

  // h (B, T, d) -> (B, T, d); memory and cross_mask only in the decoder.
  torch::Tensor forward(torch::Tensor h, T5AttentionMask& self_mask, const torch::Tensor& memory,
                        T5AttentionMask* cross_mask, T5BlockCache* cache) {
    h = detail::clamp_float16(self_attention(h, self_mask, cache ? &cache->self_attention : nullptr));
    if (cross_attention)
      h = detail::clamp_float16(cross_attention(h, memory, *cross_mask, cache ? &cache->cross_attention : nullptr));
    return detail::clamp_float16(feed_forward(h));
  }

  torch::nn::ModuleList layer{nullptr};
  T5LayerSelfAttention self_attention{nullptr};
  T5LayerCrossAttention cross_attention{nullptr};
  T5LayerFF feed_forward{nullptr};
};
TORCH_MODULE(T5Block);

// The blocks of one side and the final layer norm. Takes embeddings: `shared` belongs to the model.
class T5StackImpl : public torch::nn::Module {
 public:
  T5StackImpl(const T5Config& c, bool is_decoder) {
    block = register_module("block", torch::nn::ModuleList());
    const int64_t n = is_decoder ? c.decoder_layers() : c.num_layers();
    for (int64_t i = 0; i < n; ++i) {
      blocks.push_back(T5Block(c, is_decoder, /*has_relative_attention_bias=*/i == 0));
      block->push_back(blocks.back());
      attention_sites.push_back(blocks.back()->self_attention->SelfAttention.get());
      if (blocks.back()->cross_attention) attention_sites.push_back(blocks.back()->cross_attention->EncDecAttention.get());
    }
    final_layer_norm = register_module("final_layer_norm", T5LayerNorm(c.d_model(), c.layer_norm_epsilon()));
    dropout = register_module("dropout", Dropout(c.dropout_rate(), c.lean_dropout()));
  }

  torch::nn::ModuleList block{nullptr};
  std::vector<T5Block> blocks;
  std::vector<AttentionSite*> attention_sites;  // every attention of the stack: a forward is one pass over them
  T5LayerNorm final_layer_norm{nullptr};
  Dropout dropout{nullptr};

 protected:
  // Block 0's relative position bias, which every block of the stack uses.
  T5AttentionMask::BiasFn position_bias() {
    auto attention = blocks.front()->self_attention->SelfAttention.ptr();
    return [attention](int64_t query_len, int64_t key_len) { return attention->position_bias(query_len, key_len); };
  }

  // h (B, T, d) -> (B, T, d): dropout, every block, final layer norm, dropout.
  torch::Tensor run(torch::Tensor h, T5AttentionMask& self_mask, const torch::Tensor& memory,
                    T5AttentionMask* cross_mask, T5DecoderCache* cache) {
    const ForwardPass pass(attention_sites);
    h = dropout(h);
    if (cache != nullptr) cache->blocks.resize(blocks.size());
    for (size_t i = 0; i < blocks.size(); ++i)
      h = blocks[i]->forward(h, self_mask, memory, cross_mask, cache ? &cache->blocks[i] : nullptr);
    return dropout(final_layer_norm(h));
  }
};

// The encoder stack `encoder`: where prompt deltas prepend their embeddings.
class T5EncoderImpl : public T5StackImpl, public PromptSite {
 public:
  explicit T5EncoderImpl(const T5Config& c) : T5StackImpl(c, /*is_decoder=*/false) {}

  // embeds (B, T, d), attention_mask (B, T) or undefined -> hidden (B, P + T, d) and the
  // mask (B, P + T) cross-attention uses, P prompt positions first (in a mixed batch, the
  // longest prompts' P: a row with shorter prompts, or none, has masked slots before them).
  std::pair<torch::Tensor, torch::Tensor> forward(const torch::Tensor& embeds, const torch::Tensor& attention_mask) {
    auto in = prepend_prompts(embeds, attention_mask);
    T5AttentionMask self_mask(in.mask, /*causal=*/false, position_bias());
    return {run(in.embeds, self_mask, {}, nullptr, nullptr), in.mask};
  }
};
TORCH_MODULE(T5Encoder);

class T5DecoderImpl : public T5StackImpl {
 public:
  explicit T5DecoderImpl(const T5Config& c) : T5StackImpl(c, /*is_decoder=*/true) {}

  // embeds (B, T, d) -> (B, T, d), attending causally to itself (and what the cache holds,
  // which it extends) and to encoder_hidden (B, S, d) where encoder_mask (B, S) is 1.
  torch::Tensor forward(const torch::Tensor& embeds, const torch::Tensor& encoder_hidden,
                        const torch::Tensor& encoder_mask, T5DecoderCache* cache = nullptr) {
    T5AttentionMask self_mask({}, /*causal=*/true, position_bias());
    T5AttentionMask cross_mask(encoder_mask, /*causal=*/false, nullptr);
    return run(embeds, self_mask, encoder_hidden, &cross_mask, cache);
  }
};
TORCH_MODULE(T5Decoder);

}  // namespace deltatune::backbones

namespace deltatune::detail {

// lm_head of a tied model: a FrozenLinear over `shared`'s weight that does not register it
// again, so that it loads, moves and counts once, as transformers ties them. A weight delta
// merged into it changes the embeddings too, as in transformers.
class T5TiedHeadImpl : public FrozenLinearImpl {
 public:
  explicit T5TiedHeadImpl(const torch::Tensor& embedding_weight)
      : FrozenLinearImpl(embedding_weight.size(1), embedding_weight.size(0), /*with_bias=*/false) {
    parameters_.erase("weight");
    weight = embedding_weight;
  }
};

}  // namespace deltatune::detail

namespace deltatune::backbones {

struct T5Output {
  torch::Tensor logits;                     // (B, T, vocab)
  torch::Tensor loss;                       // mean cross-entropy over labels other than -100; undefined without labels
  torch::Tensor encoder_last_hidden_state;  // (B, P + S, d), P prompt positions first
  torch::Tensor decoder_last_hidden_state;  // (B, T, d), before the tied-embedding rescale
};

// The encoder's output and the mask the decoder attends with (prompts included).
struct T5Encoded {
  torch::Tensor hidden;  // (B, P + S, d)
  torch::Tensor mask;    // (B, P + S), or undefined: every position counts
};

// T5ForConditionalGeneration: `shared` embeddings, `encoder`, `decoder`, `lm_head`. Every
// weight is frozen when built; deltas attached to its sites train.
class T5ModelImpl : public torch::nn::Module, public ReportsModelType {
 public:
  // "t5" for mT5 as well: the default sites are T5's (peft's tables give mt5 the same).
  std::string model_type() const override { return "t5"; }

  explicit T5ModelImpl(T5Config config) : config(std::move(config)) {
    const auto problems = detail::t5_config_problems(this->config);
    detail::check<OptionError>(problems.empty(), "T5Config: {}", problems);
    const auto& c = this->config;
    shared = register_module("shared", torch::nn::Embedding(c.vocab_size(), c.d_model()));
    encoder = register_module("encoder", T5Encoder(c));
    decoder = register_module("decoder", T5Decoder(c));
    encoder->embedding_table = shared->weight;  // prompt tuning starts from its rows
    lm_head = register_module("lm_head", c.tie_word_embeddings()
                                             ? FrozenLinear(std::shared_ptr<FrozenLinearImpl>(
                                                   std::make_shared<detail::T5TiedHeadImpl>(shared->weight)))
                                             : FrozenLinear(c.d_model(), c.vocab_size(), false));
    freeze(*this);
  }

  // Training and evaluation: input_ids (B, S) with attention_mask (B, S) (1 = token, 0 =
  // padding; undefined = no padding), and decoder_input_ids (B, T) or labels (B, T) or both;
  // from labels alone the decoder inputs are labels shifted right (shift_right).
  T5Output forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                   const torch::Tensor& decoder_input_ids, const torch::Tensor& labels = {}) {
    detail::check<OptionError>(decoder_input_ids.defined() || labels.defined(),
                               "T5Model::forward: give decoder_input_ids, labels, or both");
    const ForwardPass pass(attention_sites());  // encoder and decoder: a prefix over both computes once
    const auto encoded = encode(input_ids, attention_mask);
    const auto& decoder_ids = decoder_input_ids.defined() ? decoder_input_ids : shift_right(labels);
    T5Output out;
    out.encoder_last_hidden_state = encoded.hidden;
    out.decoder_last_hidden_state = decoder(shared(decoder_ids), encoded.hidden, encoded.mask);
    out.logits = lm_logits(out.decoder_last_hidden_state);
    if (labels.defined()) out.loss = detail::token_cross_entropy(out.logits, labels);  // float32 at least
    return out;
  }

  // Every attention site of the encoder, then of the decoder.
  std::vector<AttentionSite*> attention_sites() const {
    auto sites = encoder->attention_sites;
    sites.insert(sites.end(), decoder->attention_sites.begin(), decoder->attention_sites.end());
    return sites;
  }

  T5Encoded encode(const torch::Tensor& input_ids, const torch::Tensor& attention_mask) {
    detail::check<ShapeError>(input_ids.dim() == 2, "T5: input_ids must be (batch, length), got {}", input_ids.sizes());
    detail::check<ShapeError>(!attention_mask.defined() || attention_mask.sizes() == input_ids.sizes(),
                              "T5: attention_mask {} does not match input_ids {}", attention_mask.sizes(),
                              input_ids.sizes());
    auto [hidden, mask] = encoder(shared(input_ids), attention_mask);
    return {hidden, mask};
  }

  // Logits (B, T, vocab) of T more decoder positions; with a cache they follow the cached ones
  // and join them. One step of generation: T = 1.
  torch::Tensor decode(const torch::Tensor& decoder_input_ids, const T5Encoded& encoded, T5DecoderCache* cache) {
    return lm_logits(decoder(shared(decoder_input_ids), encoded.hidden, encoded.mask, cache));
  }

  // Greedy decoding with a key/value cache: (B, 1 + n) ids, decoder_start_token_id first, then
  // up to max_new_tokens tokens; a row that produced eos continues with pad; stops when every
  // row has. As transformers' generate(do_sample=False, num_beams=1). Runs in the current
  // mode: call eval() first for deterministic output.
  torch::Tensor generate_greedy(const torch::Tensor& input_ids, const torch::Tensor& attention_mask,
                                int64_t max_new_tokens) {
    detail::check<OptionError>(max_new_tokens >= 0, "T5: max_new_tokens must be at least 0, got {}", max_new_tokens);
    torch::NoGradGuard no_grad;
    const ForwardPass pass(attention_sites());  // one for the whole generation
    const auto encoded = encode(input_ids, attention_mask);
    const int64_t batch = input_ids.size(0);
    auto ids = torch::full({batch, 1}, config.decoder_start_token_id(), input_ids.options().dtype(torch::kLong));
    auto finished = torch::zeros({batch}, ids.options().dtype(torch::kBool));
    T5DecoderCache cache;
    for (int64_t step = 0; step < max_new_tokens && !finished.all().item<bool>(); ++step) {
      auto logits = decode(ids.narrow(1, ids.size(1) - 1, 1), encoded, &cache);  // (B, 1, vocab)
      auto next = logits.select(1, 0).argmax(-1).masked_fill(finished, config.pad_token_id());  // (B)
      ids = torch::cat({ids, next.unsqueeze(1)}, 1);
      finished = finished | (next == config.eos_token_id());
    }
    return ids;
  }

  // Decoder inputs from labels (B, T): decoder_start_token_id, then labels[:, :-1], -100 as pad.
  torch::Tensor shift_right(const torch::Tensor& labels) const {
    auto start = torch::full({labels.size(0), 1}, config.decoder_start_token_id(), labels.options());
    auto shifted = torch::cat({start, labels.narrow(1, 0, labels.size(1) - 1)}, 1);
    return shifted.masked_fill(shifted == -100, config.pad_token_id());
  }

  // decoder hidden (B, T, d) -> (B, T, vocab); tied heads rescale by d_model^-0.5 first (Mesh TensorFlow).
  torch::Tensor lm_logits(const torch::Tensor& hidden) {
    return lm_head(config.tie_word_embeddings() ? hidden * std::pow(double(config.d_model()), -0.5) : hidden);
  }

  T5Config config;
  torch::nn::Embedding shared{nullptr};
  T5Encoder encoder{nullptr};
  T5Decoder decoder{nullptr};
  FrozenLinear lm_head{nullptr};
};
TORCH_MODULE(T5Model);

struct T5LoadOptions {
  // The model's config.json content, instead of the checkpoint's (a TorchScript archive saved
  // without the extra file config.json needs it).
  TORCH_ARG(std::optional<nlohmann::json>, config) = std::nullopt;
  // Prefixes checkpoint names may carry: a wrapper module traced around the Hugging Face model.
  TORCH_ARG(std::vector<std::string>, prefixes) = {"model."};
  // T5Config::lean_dropout of the model built: false runs torch's dropout and attention.
  TORCH_ARG(bool, lean_dropout) = true;
  // The dtype its frozen weights are stored in, whatever the checkpoint's: float32, or bfloat16
  // (float16 on CUDA) for half the memory, deltas then training in float32 (precision.hpp). In
  // float16 the feed-forward wo stays float32, as transformers keeps it (_keep_in_fp32_modules):
  // its output overflows float16 in pretrained T5s.
  TORCH_ARG(torch::ScalarType, dtype) = torch::kFloat;
};

// The name mapping of a T5 checkpoint: embed_tokens copies of `shared`, the tied lm_head and
// the unused relative bias of old checkpoints' first cross-attention are ignored.
inline LoadOptions t5_load_options(const T5Config& config, std::vector<std::string> prefixes) {
  std::vector<std::string> ignored{R"((^|\.)(encoder|decoder)\.embed_tokens\.weight$)",
                                   R"((^|\.)decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$)"};
  if (config.tie_word_embeddings()) ignored.push_back(R"((^|\.)lm_head\.weight$)");
  return LoadOptions().prefixes(std::move(prefixes)).ignore_unexpected(std::move(ignored));
}

// A T5 from a Hugging Face folder (config.json + model.safetensors or a sharded index; F32,
// F16 or BF16, each loaded as options.dtype) or a TorchScript archive (config from its extra
// file config.json or the options), in eval mode with every weight frozen.
inline T5Model load_t5(const std::string& path, const T5LoadOptions& options = {}) {
  const auto checkpoint = read_checkpoint(path);
  const auto config = options.config() ? JsonFields(*options.config(), "T5LoadOptions::config")
                                       : config_fields(checkpoint, "pass T5LoadOptions().config(...)");
  T5Model model(T5Config::from_json(config.json(), config.where()).lean_dropout(options.lean_dropout()));
  set_frozen_dtype(*model, options.dtype());  // before loading: no float32 copy of a half-precision model
  if (options.dtype() == torch::kHalf)
    for (const auto& m : model->modules())
      if (auto dense = std::dynamic_pointer_cast<T5DenseImpl>(m)) set_frozen_dtype(*dense->wo, torch::kFloat);
  load_parameters(*model, checkpoint, t5_load_options(model->config, options.prefixes()));
  model->eval();
  return model;
}

}  // namespace deltatune::backbones
