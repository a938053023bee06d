// BERT (Devlin et al., 2019) built from deltatune's sites, module for module and name for name
// as transformers' BertModel and BertForSequenceClassification, loaded from a Hugging Face
// folder or a TorchScript archive. Leaves out relative position embeddings, the decoder and
// cross-attention variants, the key/value cache and the pre-training and token-level heads.
//
// Sites (find_sites): every Linear is a FrozenLinear (`encoder.layer.{i}.attention.self.query`,
// ...`.key`, `.value`, `.attention.output.dense`, `.intermediate.dense`, `.output.dense`,
// `pooler.dense`, `classifier`); `encoder.layer.{i}.attention.output` and `encoder.layer.{i}.output`
// are OutputSites (before the residual and LayerNorm, where Houlsby places adapters);
// `encoder.layer.{i}.attention.self` is an AttentionSite; `embeddings` is a PromptSite.
#pragma once

#include <torch/torch.h>

#include <cmath>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <deltatune/backbones/checkpoint.hpp>
#include <deltatune/backbones/dropout.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/json_file.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/core/precision.hpp>
#include <deltatune/core/site.hpp>

namespace deltatune::backbones {

// The architecture, as config.json holds it; defaults are bert-base-uncased's.
struct BertConfig {
  TORCH_ARG(int64_t, vocab_size) = 30522;
  TORCH_ARG(int64_t, hidden_size) = 768;
  TORCH_ARG(int64_t, num_hidden_layers) = 12;
  TORCH_ARG(int64_t, num_attention_heads) = 12;
  TORCH_ARG(int64_t, intermediate_size) = 3072;
  // "gelu" (exact, erf), "gelu_new" or "gelu_pytorch_tanh" (tanh approximation), "relu".
  TORCH_ARG(std::string, hidden_act) = "gelu";
  TORCH_ARG(double, hidden_dropout_prob) = 0.1;
  TORCH_ARG(double, attention_probs_dropout_prob) = 0.1;
  TORCH_ARG(int64_t, max_position_embeddings) = 512;
  TORCH_ARG(int64_t, type_vocab_size) = 2;
  TORCH_ARG(double, layer_norm_eps) = 1e-12;
  // Standard deviation of a freshly initialised head (transformers' _init_weights).
  TORCH_ARG(double, initializer_range) = 0.02;
  // Outputs of the classification head; 1 makes it a regression head.
  TORCH_ARG(int64_t, num_labels) = 2;
  // "" (chosen from num_labels and the labels' dtype, as transformers), "regression",
  // "single_label_classification" or "multi_label_classification".
  TORCH_ARG(std::string, problem_type) = "";
  // Dropout before the classifier; none means hidden_dropout_prob.
  TORCH_ARG(std::optional<double>, classifier_dropout) = std::nullopt;
  // Ours, not config.json's (bert_config leaves the default): whether dropout in training keeps
  // its masks' seeds or one-byte masks (backbones/dropout.hpp), or runs as torch's, as
  // T5Config::lean_dropout.
  TORCH_ARG(bool, lean_dropout) = true;
};

}  // namespace deltatune::backbones

namespace deltatune::detail {

inline bool is_bert_activation(const std::string& name) {
  return name == "gelu" || name == "gelu_new" || name == "gelu_pytorch_tanh" || name == "relu";
}

inline torch::Tensor bert_activation(const torch::Tensor& x, const std::string& name) {
  if (name == "relu") return torch::relu(x);
  return torch::gelu(x, name == "gelu" ? "none" : "tanh");
}

// What is wrong with a config, or "" when nothing is: shared by the module (OptionError)
// and the loader (CheckpointError naming config.json).
inline std::string bert_config_problem(const backbones::BertConfig& c) {
  if (!is_bert_activation(c.hidden_act()))
    return fmt::format("hidden_act \"{}\" is not one of gelu, gelu_new, gelu_pytorch_tanh, relu", c.hidden_act());
  if (c.hidden_size() <= 0 || c.num_attention_heads() <= 0 || c.hidden_size() % c.num_attention_heads() != 0)
    return fmt::format("hidden_size {} is not a positive multiple of num_attention_heads {}", c.hidden_size(),
                       c.num_attention_heads());
  const std::pair<const char*, int64_t> sizes[] = {
      {"vocab_size", c.vocab_size()}, {"num_hidden_layers", c.num_hidden_layers()},
      {"intermediate_size", c.intermediate_size()}, {"max_position_embeddings", c.max_position_embeddings()},
      {"type_vocab_size", c.type_vocab_size()}, {"num_labels", c.num_labels()}};
  for (const auto& [key, size] : sizes)
    if (size < 1) return fmt::format("{} {} is below 1", key, size);
  const std::pair<const char*, double> dropouts[] = {
      {"hidden_dropout_prob", c.hidden_dropout_prob()},
      {"attention_probs_dropout_prob", c.attention_probs_dropout_prob()},
      {"classifier_dropout", c.classifier_dropout().value_or(0)}};
  for (const auto& [key, p] : dropouts)
    if (!(p >= 0 && p < 1)) return fmt::format("{} {} is not a probability in [0, 1)", key, p);
  if (!(c.layer_norm_eps() > 0)) return fmt::format("layer_norm_eps {} is not positive", c.layer_norm_eps());
  if (!(c.initializer_range() >= 0)) return fmt::format("initializer_range {} is negative", c.initializer_range());
  bool known_problem_type = false;
  for (const char* p : {"", "regression", "single_label_classification", "multi_label_classification"})
    known_problem_type |= c.problem_type() == p;
  if (!known_problem_type)
    return fmt::format("problem_type \"{}\" is not regression, single_label_classification or "
                       "multi_label_classification", c.problem_type());
  const double h = double(c.hidden_size());
  const double parameters =
      h * double(c.vocab_size() + c.max_position_embeddings() + c.type_vocab_size()) +
      double(c.num_hidden_layers()) * (4 * h * h + 2 * h * double(c.intermediate_size())) + h * (h + double(c.num_labels()));
  const auto memory = memory_problem(parameters);
  return memory.empty() ? "" : fmt::format("the model {}", memory);
}

// transformers' nn.LayerNorm with the config's eps.
inline torch::nn::LayerNorm bert_layer_norm(const backbones::BertConfig& c) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({c.hidden_size()}).eps(c.layer_norm_eps()));
}

// norm(x) in x's precision (its statistics in float32 either way): a weight and bias stored in
// another dtype (trained float32 ones on a bf16 backbone, or bf16 ones meeting a float32
// delta's sum) are cast for it, as autocast would.
inline torch::Tensor layer_norm(const torch::nn::LayerNorm& norm, const torch::Tensor& x) {
  const auto& o = norm->options;
  return torch::layer_norm(x, o.normalized_shape(), detail::at_precision_of(x, norm->weight),
                           detail::at_precision_of(x, norm->bias), o.eps());
}

}  // namespace deltatune::detail

namespace deltatune::backbones {

// Reads the architecture from a checkpoint's config.json; a missing key or a value the
// model cannot take throws CheckpointError naming the file and the key.
inline BertConfig bert_config(const Checkpoint& checkpoint) {
  const auto f = config_fields(checkpoint);
  const auto position_type = f.get<std::string>("position_embedding_type", "absolute");
  detail::check<CheckpointError>(position_type == "absolute",
                                 "{}: position_embedding_type \"{}\" is not supported (only \"absolute\")",
                                 f.where(), position_type);
  // transformers writes id2label, not num_labels, into config.json.
  const auto labels = f.get<nlohmann::json>("id2label", nlohmann::json::object());
  auto config = BertConfig()
                    .vocab_size(f.get<int64_t>("vocab_size"))
                    .hidden_size(f.get<int64_t>("hidden_size"))
                    .num_hidden_layers(f.get<int64_t>("num_hidden_layers"))
                    .num_attention_heads(f.get<int64_t>("num_attention_heads"))
                    .intermediate_size(f.get<int64_t>("intermediate_size"))
                    .hidden_act(f.get<std::string>("hidden_act"))
                    .hidden_dropout_prob(f.get<double>("hidden_dropout_prob"))
                    .attention_probs_dropout_prob(f.get<double>("attention_probs_dropout_prob"))
                    .max_position_embeddings(f.get<int64_t>("max_position_embeddings"))
                    .type_vocab_size(f.get<int64_t>("type_vocab_size"))
                    .layer_norm_eps(f.get<double>("layer_norm_eps"))
                    .initializer_range(f.get<double>("initializer_range", 0.02))
                    .num_labels(f.get<int64_t>("num_labels", labels.is_object() && !labels.empty() ? labels.size() : 2))
                    .problem_type(f.get<std::string>("problem_type", ""))
                    .classifier_dropout(f.get_optional<double>("classifier_dropout"));
  const auto problem = detail::bert_config_problem(config);
  detail::check<CheckpointError>(problem.empty(), "{}: {}", f.where(), problem);
  return config;
}

// Word, position and token-type embeddings, summed, then LayerNorm and dropout. Prompt
// deltas prepend their vectors to the word embeddings, before positions and token types are
// added, as peft's prompt tuning feeds inputs_embeds: positions run over P + T and the
// prompts take token type 0. Under a prefix of P keys, positions start at P, as transformers
// numbers tokens after the past keys that peft hands a prefix over as. In a mixed batch
// whose rows have prompts of different lengths, each row's positions count from its start.
class BertEmbeddingsImpl : public torch::nn::Module, public PromptSite {
 public:
  explicit BertEmbeddingsImpl(const BertConfig& c) : max_positions(c.max_position_embeddings()) {
    word_embeddings = register_module("word_embeddings", torch::nn::Embedding(c.vocab_size(), c.hidden_size()));
    position_embeddings = register_module(
        "position_embeddings", torch::nn::Embedding(c.max_position_embeddings(), c.hidden_size()));
    token_type_embeddings =
        register_module("token_type_embeddings", torch::nn::Embedding(c.type_vocab_size(), c.hidden_size()));
    layer_norm = register_module("LayerNorm", detail::bert_layer_norm(c));
    dropout = register_module("dropout", Dropout(c.hidden_dropout_prob(), c.lean_dropout()));
    embedding_table = word_embeddings->weight;  // prompt tuning starts from its rows
  }

  // input_ids (B, T), token_type_ids (B, T) or undefined (all 0), mask (B, T) or undefined,
  // and the first position (the first layer's prefix length) -> embeddings (B, P + T, d), the
  // mask grown to (B, P + T) (undefined stays undefined but in a mixed batch of prompts) and
  // each row's start (PromptedInput).
  PromptedInput forward(const torch::Tensor& input_ids, const torch::Tensor& token_type_ids, const torch::Tensor& mask,
                        int64_t first_position = 0) {
    auto in = prepend_prompts(word_embeddings(input_ids), mask);  // (B, P + T, d)
    const int64_t batch = in.embeds.size(0), length = in.embeds.size(1), prompts = length - input_ids.size(1);
    detail::check<ShapeError>(first_position + length <= max_positions,
                              "BERT takes at most max_position_embeddings = {} positions; got {} ({} of them prompts, "
                              "{} prefix)", max_positions, first_position + length, prompts, first_position);
    auto types = token_type_ids.defined() ? token_type_ids : torch::zeros_like(input_ids);
    if (prompts > 0) types = torch::cat({torch::zeros({batch, prompts}, types.options()), types}, 1);
    auto positions = torch::arange(first_position, first_position + length, input_ids.options().dtype(torch::kLong));
    if (in.start.defined()) positions = (positions.unsqueeze(0) - in.start.unsqueeze(1)).clamp_min(first_position);
    in.embeds = dropout(
        detail::layer_norm(layer_norm, in.embeds + token_type_embeddings(types) + position_embeddings(positions)));
    return in;  // the sum in transformers' order
  }

  int64_t max_positions;
  torch::nn::Embedding word_embeddings{nullptr}, position_embeddings{nullptr}, token_type_embeddings{nullptr};
  torch::nn::LayerNorm layer_norm{nullptr};
  Dropout dropout{nullptr};
};
TORCH_MODULE(BertEmbeddings);

// Multi-head self-attention through detail::attention (torch's kernels, or the lean dropout's
// math in CPU training). Prefix deltas prepend their keys and values after the projections;
// prefix positions are never masked.
class BertSelfAttentionImpl : public torch::nn::Module, public AttentionSite {
 public:
  explicit BertSelfAttentionImpl(const BertConfig& c)
      : heads(c.num_attention_heads()), dropout_p(c.attention_probs_dropout_prob()), lean_dropout(c.lean_dropout()) {
    query = register_module("query", FrozenLinear(c.hidden_size(), c.hidden_size(), true));
    key = register_module("key", FrozenLinear(c.hidden_size(), c.hidden_size(), true));
    value = register_module("value", FrozenLinear(c.hidden_size(), c.hidden_size(), true));
    hidden_features = key_value_features = c.hidden_size();  // what a prefix is sized by
  }

  // hidden (B, T, d), mask (B, T) bool (true: a token) or undefined -> (B, T, d).
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& mask) {
    const int64_t batch = hidden.size(0), length = hidden.size(1), d = hidden.size(2);
    auto k = key(hidden), v = value(hidden);
    auto attend = mask;
    if (auto [prefix_k, prefix_v] = prefix_key_value(batch); prefix_k.defined()) {  // (B, P, d)
      k = torch::cat({prefix_k.to(k.dtype()), k}, 1);                                // (B, P + T, d)
      v = torch::cat({prefix_v.to(v.dtype()), v}, 1);
      if (mask.defined()) attend = torch::cat({torch::ones({batch, prefix_k.size(1)}, mask.options()), mask}, 1);
    }
    auto split = [&](const torch::Tensor& t) {  // (B, L, d) -> (B, H, L, d / H)
      return t.view({batch, t.size(1), heads, d / heads}).transpose(1, 2);
    };
    std::optional<torch::Tensor> attn_mask;
    if (attend.defined()) attn_mask = attend.view({batch, 1, 1, attend.size(1)});  // keys only
    auto context = detail::attention(split(query(hidden)), split(k), split(v), attn_mask, dropout_p, is_training(),
                                     lean_dropout);  // (B, H, T, d / H)
    return context.transpose(1, 2).reshape({batch, length, d});
  }

  int64_t heads;
  double dropout_p;
  bool lean_dropout;
  FrozenLinear query{nullptr}, key{nullptr}, value{nullptr};
};
TORCH_MODULE(BertSelfAttention);

// A sublayer's end: dense, dropout, then residual and LayerNorm through the OutputSite, where
// activation deltas act. transformers' BertSelfOutput (`attention.output`, in = hidden_size)
// and BertOutput (`output`, in = intermediate_size) are this one module.
class BertSublayerOutputImpl : public torch::nn::Module, public OutputSite {
 public:
  BertSublayerOutputImpl(int64_t in_features, const BertConfig& c) {
    dense = register_module("dense", FrozenLinear(in_features, c.hidden_size(), true));
    output_features = c.hidden_size();  // what an adapter is sized by
    layer_norm = register_module("LayerNorm", detail::bert_layer_norm(c));
    dropout = register_module("dropout", Dropout(c.hidden_dropout_prob(), c.lean_dropout()));
  }

  // hidden (B, T, in), input_tensor (B, T, d) the sublayer's input -> (B, T, d).
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& input_tensor) {
    return finish(dropout(dense(hidden)), input_tensor,
                  [this](const torch::Tensor& t) { return detail::layer_norm(layer_norm, t); });
  }

  FrozenLinear dense{nullptr};
  torch::nn::LayerNorm layer_norm{nullptr};
  Dropout dropout{nullptr};
};
TORCH_MODULE(BertSublayerOutput);

// `attention`: self-attention ("self") and its output sublayer ("output").
class BertAttentionImpl : public torch::nn::Module {
 public:
  explicit BertAttentionImpl(const BertConfig& c) {
    self = register_module("self", BertSelfAttention(c));
    output = register_module("output", BertSublayerOutput(c.hidden_size(), c));
  }
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& mask) {
    return output(self(hidden, mask), hidden);
  }
  BertSelfAttention self{nullptr};
  BertSublayerOutput output{nullptr};
};
TORCH_MODULE(BertAttention);

// `intermediate`: the feed-forward block's first half, dense then activation.
class BertIntermediateImpl : public torch::nn::Module {
 public:
  explicit BertIntermediateImpl(const BertConfig& c) : activation(c.hidden_act()) {
    dense = register_module("dense", FrozenLinear(c.hidden_size(), c.intermediate_size(), true));
  }
  torch::Tensor forward(const torch::Tensor& hidden) {  // (B, T, d) -> (B, T, intermediate)
    return detail::bert_activation(dense(hidden), activation);
  }
  std::string activation;
  FrozenLinear dense{nullptr};
};
TORCH_MODULE(BertIntermediate);

// `encoder.layer.{i}`: attention, then the feed-forward block.
class BertLayerImpl : public torch::nn::Module {
 public:
  explicit BertLayerImpl(const BertConfig& c) {
    attention = register_module("attention", BertAttention(c));
    intermediate = register_module("intermediate", BertIntermediate(c));
    output = register_module("output", BertSublayerOutput(c.intermediate_size(), c));
  }
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& mask) {  // (B, T, d) -> (B, T, d)
    auto attended = attention(hidden, mask);
    return output(intermediate(attended), attended);
  }
  BertAttention attention{nullptr};
  BertIntermediate intermediate{nullptr};
  BertSublayerOutput output{nullptr};
};
TORCH_MODULE(BertLayer);

// `encoder`: the layers, under "layer.{i}".
class BertEncoderImpl : public torch::nn::Module {
 public:
  explicit BertEncoderImpl(const BertConfig& c) {
    auto list = register_module("layer", torch::nn::ModuleList());
    for (int64_t i = 0; i < c.num_hidden_layers(); ++i) {
      layers.push_back(BertLayer(c));
      list->push_back(layers.back());
      attention_sites.push_back(layers.back()->attention->self.get());
    }
  }
  torch::Tensor forward(torch::Tensor hidden, const torch::Tensor& mask) {
    const ForwardPass pass(attention_sites);  // a prefix computes once for all layers
    for (auto& layer : layers) hidden = layer(hidden, mask);
    return hidden;
  }
  std::vector<BertLayer> layers;
  std::vector<AttentionSite*> attention_sites;
};
TORCH_MODULE(BertEncoder);

// `pooler`: tanh(dense(first token)).
class BertPoolerImpl : public torch::nn::Module {
 public:
  explicit BertPoolerImpl(const BertConfig& c) {
    dense = register_module("dense", FrozenLinear(c.hidden_size(), c.hidden_size(), true));
  }
  // hidden (B, T, d), and each row's first position (B) or undefined (all 0) -> (B, d).
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& start = {}) {
    const auto first = start.defined() ? hidden.index({torch::arange(hidden.size(0), start.options()), start})
                                       : hidden.select(1, 0);
    return torch::tanh(dense(first));
  }
  FrozenLinear dense{nullptr};
};
TORCH_MODULE(BertPooler);

struct BertModelOutput {
  torch::Tensor last_hidden_state;  // (B, P + T, d), P the prompt deltas' length (0 without)
  torch::Tensor pooler_output;      // (B, d): of each row's first position, a prompt's where prompts run
  torch::Tensor attention_mask;     // (B, P + T) bool, for pooling over tokens; undefined if none was given (but
                                    // a mixed batch of prompts makes one)
};

// transformers' BertModel, every weight frozen when built (deltas bring the trained ones).
//   auto bert = deltatune::backbones::load_bert("all-MiniLM-L6-v2");
//   auto out = bert(input_ids, attention_mask);  // out.last_hidden_state (B, T, 384)
class BertModelImpl : public torch::nn::Module, public ReportsModelType {
 public:
  std::string model_type() const override { return "bert"; }

  explicit BertModelImpl(BertConfig config, bool add_pooling_layer = true) : config(std::move(config)) {
    const auto problem = detail::bert_config_problem(this->config);
    detail::check<OptionError>(problem.empty(), "BertModel: {}", problem);
    embeddings = register_module("embeddings", BertEmbeddings(this->config));
    encoder = register_module("encoder", BertEncoder(this->config));
    if (add_pooling_layer) pooler = register_module("pooler", BertPooler(this->config));
    freeze(*this);
  }

  // input_ids (B, T) integer; attention_mask (B, T), 1 or true for tokens, 0 for padding, or
  // undefined (all tokens); token_type_ids (B, T) or undefined (all segment 0).
  BertModelOutput forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                          const torch::Tensor& token_type_ids = {}) {
    detail::check<ShapeError>(input_ids.dim() == 2 && !input_ids.is_floating_point(),
                              "BertModel: input_ids must be (B, T) integers; got {} of {}", input_ids.sizes(),
                              c10::toString(input_ids.scalar_type()));
    for (const auto* t : {&attention_mask, &token_type_ids})
      detail::check<ShapeError>(!t->defined() || t->sizes() == input_ids.sizes(),
                                "BertModel: attention_mask and token_type_ids must be shaped as input_ids {}; got {}",
                                input_ids.sizes(), t->sizes());
    auto mask = attention_mask.defined() ? attention_mask.to(torch::kBool) : attention_mask;
    const int64_t prefix = encoder->layers.empty() ? 0 : encoder->layers.front()->attention->self->prefix_length();
    const auto in = embeddings(input_ids, token_type_ids, mask, prefix);  // (B, P + T, d)
    const auto hidden = encoder(in.embeds, in.mask);
    return {hidden, pooler ? pooler(hidden, in.start) : torch::Tensor(), in.mask};
  }

  BertConfig config;
  BertEmbeddings embeddings{nullptr};
  BertEncoder encoder{nullptr};
  BertPooler pooler{nullptr};
};
TORCH_MODULE(BertModel);

struct SequenceClassifierOutput {
  torch::Tensor loss;    // () where labels were given, else undefined
  torch::Tensor logits;  // (B, num_labels)
  BertModelOutput bert;
};

}  // namespace deltatune::backbones

namespace deltatune::detail {

// transformers' choice: regression (MSE) for one label, cross-entropy for integer labels,
// binary cross-entropy for float ones, unless problem_type says.
inline torch::Tensor sequence_classification_loss(const torch::Tensor& logits, const torch::Tensor& labels,
                                                  const backbones::BertConfig& c) {
  auto problem = c.problem_type();
  if (problem.empty())
    problem = c.num_labels() == 1 ? "regression"
              : labels.is_floating_point() ? "multi_label_classification"
                                           : "single_label_classification";
  if (is_half(logits.scalar_type()))  // the loss in float32 (precision.hpp)
    return sequence_classification_loss(logits.to(torch::kFloat), labels, c);
  if (problem == "regression") {
    auto target = labels.to(logits.dtype());
    return c.num_labels() == 1 ? torch::mse_loss(logits.squeeze(), target.squeeze()) : torch::mse_loss(logits, target);
  }
  if (problem == "single_label_classification")
    return torch::nn::functional::cross_entropy(logits.view({-1, c.num_labels()}), labels.view({-1}).to(torch::kLong));
  return torch::binary_cross_entropy_with_logits(logits, labels.to(logits.dtype()));
}

}  // namespace deltatune::detail

namespace deltatune::backbones {

// transformers' BertForSequenceClassification: BertModel under "bert", dropout, and a
// `classifier` on the pooled output. The backbone is frozen; the classifier, the task's
// head, is trained (a FrozenLinear so that weight deltas can act on it too, made trainable).
class BertForSequenceClassificationImpl : public torch::nn::Module, public ReportsModelType {
 public:
  std::string model_type() const override { return "bert"; }

  explicit BertForSequenceClassificationImpl(BertConfig config) : config(std::move(config)) {
    bert = register_module("bert", BertModel(this->config));
    dropout = register_module("dropout", Dropout(this->config.classifier_dropout().value_or(
                                                     this->config.hidden_dropout_prob()),
                                                 this->config.lean_dropout()));
    classifier = register_module("classifier", FrozenLinear(this->config.hidden_size(), this->config.num_labels(), true));
    reset_classifier();
  }

  // transformers' _init_weights for a head it did not find in the checkpoint.
  void reset_classifier() {
    torch::NoGradGuard no_grad;
    classifier->weight.normal_(0.0, config.initializer_range());
    classifier->bias.zero_();
    for (auto& p : classifier->parameters()) p.set_requires_grad(true);
  }

  // As BertModel's forward; labels (B) integers for classification, (B) floats for
  // regression, (B, num_labels) floats for multi-label; undefined for no loss.
  SequenceClassifierOutput forward(const torch::Tensor& input_ids, const torch::Tensor& attention_mask = {},
                                   const torch::Tensor& token_type_ids = {}, const torch::Tensor& labels = {}) {
    auto out = bert(input_ids, attention_mask, token_type_ids);
    auto logits = classifier(dropout(out.pooler_output));  // (B, num_labels)
    auto loss = labels.defined() ? detail::sequence_classification_loss(logits, labels, config) : torch::Tensor();
    return {loss, logits, std::move(out)};
  }

  BertConfig config;
  BertModel bert{nullptr};
  Dropout dropout{nullptr};
  FrozenLinear classifier{nullptr};
};
TORCH_MODULE(BertForSequenceClassification);

// Checkpoint names transformers does not load either: its position_ids / token_type_ids
// buffers (in older folders and every TorchScript archive) and pre-training heads.
inline std::vector<std::string> bert_ignored_tensors() {
  return {R"(embeddings\.(position_ids|token_type_ids)$)", R"(^cls\.)"};
}

// Older checkpoints (bert-base-uncased's among them) call LayerNorm parameters gamma and
// beta; transformers renames them on load, so `model`'s LayerNorms accept those names too.
inline LoadOptions::NamePairs bert_legacy_names(torch::nn::Module& model) {
  LoadOptions::NamePairs aliases;
  for (const auto& p : model.named_parameters()) {
    const auto& name = p.key();
    const auto dot = name.rfind('.');
    if (name.find("LayerNorm.") == std::string::npos) continue;
    aliases.emplace_back(name, name.substr(0, dot + 1) + (name.substr(dot + 1) == "weight" ? "gamma" : "beta"));
  }
  return aliases;
}

// A BertModel from a checkpoint read by read_checkpoint (a Hugging Face folder or a
// TorchScript archive) of a BertModel, or of a model holding one under "bert." such as
// BertForSequenceClassification; in eval mode, frozen. Missing, unexpected or mis-shaped
// tensors throw one CheckpointError listing them. lean_dropout: BertConfig::lean_dropout;
// dtype: what the frozen weights are stored in, whatever the checkpoint's (bfloat16 for half the
// memory, deltas then training in float32: precision.hpp).
inline BertModel load_bert(const Checkpoint& checkpoint, bool lean_dropout = true,
                           torch::ScalarType dtype = torch::kFloat) {
  BertModel model(bert_config(checkpoint).lean_dropout(lean_dropout));
  set_frozen_dtype(*model, dtype);
  auto ignored = bert_ignored_tensors();
  ignored.push_back(R"(^classifier\.)");
  load_parameters(*model, checkpoint,
                  LoadOptions().prefixes({"bert."}).aliases(bert_legacy_names(*model)).ignore_unexpected(ignored));
  model->eval();
  return model;
}

//   auto bert = deltatune::backbones::load_bert("all-MiniLM-L6-v2");  // a folder or a .pt archive
inline BertModel load_bert(const std::string& path, bool lean_dropout = true, torch::ScalarType dtype = torch::kFloat) {
  return load_bert(read_checkpoint(path), lean_dropout, dtype);
}

// A BertForSequenceClassification from a checkpoint of one (names under "bert.") or of a
// bare BertModel (its classifier then freshly initialised, as transformers does), in eval
// mode with the backbone frozen and the classifier trainable. num_labels defaults to the
// config's (its id2label); a classifier of another size in the checkpoint is an error. dtype:
// the frozen backbone's, as load_bert's; the classifier, trained, stays float32.
inline BertForSequenceClassification load_bert_classifier(const Checkpoint& checkpoint,
                                                          std::optional<int64_t> num_labels = std::nullopt,
                                                          bool lean_dropout = true,
                                                          torch::ScalarType dtype = torch::kFloat) {
  auto config = bert_config(checkpoint).lean_dropout(lean_dropout);
  if (num_labels) config.num_labels(*num_labels);
  BertForSequenceClassification model(config);
  set_frozen_dtype(*model, dtype);
  auto options = LoadOptions()
                     .module_prefixes({"bert."})
                     .aliases(bert_legacy_names(*model))
                     .ignore_unexpected(bert_ignored_tensors());
  if (!checkpoint.tensors.count("classifier.weight")) options.allow_missing({R"(^classifier\.)"});
  load_parameters(*model, checkpoint, options);
  model->eval();
  return model;
}

inline BertForSequenceClassification load_bert_classifier(const std::string& path,
                                                          std::optional<int64_t> num_labels = std::nullopt,
                                                          bool lean_dropout = true,
                                                          torch::ScalarType dtype = torch::kFloat) {
  return load_bert_classifier(read_checkpoint(path), num_labels, lean_dropout, dtype);
}

}  // namespace deltatune::backbones
