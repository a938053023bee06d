// Tests of backbones/bert.hpp against transformers (tools/golden/bert.py, tools/golden/minilm.py):
// Hugging Face folders and TorchScript archives of tiny random models, real MiniLM weights,
// frozen weights, dropout, and the sites deltas attach to.
#include <deltatune/backbones/bert.hpp>

#include <fstream>
#include <regex>

#include "test_support.hpp"

namespace bert_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

using Tensors = std::map<std::string, torch::Tensor>;

Tensors read(const fs::path& file) { return dt::read_safetensors(file.string()).tensors; }

void check_close(const torch::Tensor& actual, const torch::Tensor& expected, const std::string& what) {
  dt::testing::check_matches(actual, expected, what);
}

// The golden inputs through `model` (labels of the kind `labels` names), compared with transformers'.
void check_matches(bb::BertForSequenceClassification& model, const fs::path& dir, const std::string& golden,
                   const std::string& labels) {
  const auto x = read(dir / "inputs.safetensors");
  const auto expected = read(dir / (golden + ".safetensors"));
  torch::NoGradGuard no_grad;
  auto out = model(x.at("input_ids"), x.at("attention_mask"), x.at("token_type_ids"), x.at(labels));
  check_close(out.bert.last_hidden_state, expected.at("last_hidden_state"), golden + " last_hidden_state");
  check_close(out.bert.pooler_output, expected.at("pooler_output"), golden + " pooler_output");
  check_close(out.logits, expected.at("logits"), golden + " logits");
  check_close(out.loss.reshape({1}), expected.at("loss"), golden + " loss");
}

// A weight delta adding a fixed dW: enough to see that a FrozenLinear site runs it.
struct ShiftImpl : torch::nn::Module, dt::WeightDelta {
  explicit ShiftImpl(const torch::Tensor& dw) { this->dw = register_parameter("dw", dw.clone()); }
  std::string method() const override { return "shift"; }
  nlohmann::json options_json() const override { return nlohmann::json::object(); }
  torch::nn::Module& module() override { return *this; }
  torch::Tensor delta_weight(const torch::Tensor&) override { return dw; }
  torch::Tensor dw;
};

// An activation delta h + h: doubles a sublayer's output before the residual and LayerNorm.
struct DoubleImpl : torch::nn::Module, dt::ActivationDelta {
  std::string method() const override { return "double"; }
  nlohmann::json options_json() const override { return nlohmann::json::object(); }
  torch::nn::Module& module() override { return *this; }
  torch::Tensor forward(const torch::Tensor& h) override { return h + h; }
};

// Fixed prompt embeddings, or fixed prefix keys and values at every attention site.
struct FixedInputImpl : torch::nn::Module, dt::InputDelta {
  FixedInputImpl(torch::Tensor prompt, torch::Tensor key, torch::Tensor value)
      : prompt(std::move(prompt)), key(std::move(key)), value(std::move(value)) {}
  std::string method() const override { return "fixed"; }
  nlohmann::json options_json() const override { return nlohmann::json::object(); }
  torch::nn::Module& module() override { return *this; }
  int64_t num_virtual_tokens() const override { return (prompt.defined() ? prompt : key).size(0); }
  torch::Tensor prompt_embeddings() override { return prompt; }
  std::pair<torch::Tensor, torch::Tensor> prefix_key_value(const std::string&) override { return {key, value}; }
  torch::Tensor prompt, key, value;
};

dt::Site site(torch::nn::Module& model, const std::string& name, dt::Site::Kind kind) {
  for (auto& s : dt::find_sites(model))
    if (s.name == name && s.kind == kind) return s;
  throw std::runtime_error("no site " + name);
}

}  // namespace

CATCH_TEST_CASE("BERT from Hugging Face folders matches transformers within 1e-5", "[bert][golden]") {
  const auto dir = dt::testing::golden_dir("bert");
  if (!dir) return;
  for (const char* folder : {"cls", "cls_sharded"}) {
    auto model = bb::load_bert_classifier((*dir / folder).string());
    CATCH_CHECK(model->config.num_labels() == 3);
    check_matches(model, *dir, "cls", "labels_cls");
  }
  auto reg = bb::load_bert_classifier((*dir / "reg").string());
  CATCH_CHECK(reg->config.num_labels() == 1);
  check_matches(reg, *dir, "reg", "labels_reg");

  // The bare backbone from a head's checkpoint (names under "bert."): hidden states and pooled output.
  auto bert = bb::load_bert((*dir / "cls").string());
  const auto x = read(*dir / "inputs.safetensors");
  const auto expected = read(*dir / "cls.safetensors");
  auto out = bert(x.at("input_ids"), x.at("attention_mask"), x.at("token_type_ids"));
  check_close(out.last_hidden_state, expected.at("last_hidden_state"), "load_bert last_hidden_state");
  check_close(out.pooler_output, expected.at("pooler_output"), "load_bert pooler_output");

  // lean_dropout is ours, not config.json's: the loaders' argument reaches every dropout.
  CATCH_CHECK(bert->config.lean_dropout());
  auto plain = bb::load_bert_classifier((*dir / "cls").string(), std::nullopt, /*lean_dropout=*/false);
  CATCH_CHECK_FALSE(plain->config.lean_dropout());
  CATCH_CHECK_FALSE(bb::load_bert((*dir / "cls").string(), /*lean_dropout=*/false)->config.lean_dropout());
  int lean = 0, plain_dropouts = 0;
  for (const auto& m : plain->modules()) {
    if (const auto d = std::dynamic_pointer_cast<bb::DropoutImpl>(m)) (d->lean ? lean : plain_dropouts)++;
    if (const auto a = std::dynamic_pointer_cast<bb::BertSelfAttentionImpl>(m))
      (a->lean_dropout ? lean : plain_dropouts)++;
  }
  CATCH_CHECK(lean == 0);
  CATCH_CHECK(plain_dropouts > 0);
}

CATCH_TEST_CASE("BERT from traced TorchScript archives matches transformers within 1e-5", "[bert][golden]") {
  const auto dir = dt::testing::golden_dir("bert");
  if (!dir) return;
  auto cls = bb::load_bert_classifier((*dir / "cls.pt").string());
  check_matches(cls, *dir, "cls", "labels_cls");
  auto reg = bb::load_bert_classifier((*dir / "reg.pt").string());
  check_matches(reg, *dir, "reg", "labels_reg");
}

// transformers' outputs of the float32 model with its weights rounded to F16 / BF16 are what a
// loader into float32 must compute: the same 1e-5 holds. (Against the unrounded model the
// differences are the rounding's, about 1e-3 for F16 and 1e-2 for BF16.)
CATCH_TEST_CASE("F16 and BF16 folders load into float32 and match within 1e-5", "[bert][golden]") {
  const auto dir = dt::testing::golden_dir("bert");
  if (!dir) return;
  auto f16 = bb::load_bert_classifier((*dir / "cls_f16").string());
  check_matches(f16, *dir, "cls_f16", "labels_cls");
  auto bf16 = bb::load_bert_classifier((*dir / "reg_bf16").string());
  check_matches(bf16, *dir, "reg_bf16", "labels_reg");
}

CATCH_TEST_CASE("BERT loaded in bfloat16 computes in bf16 and matches transformers' bf16 forward",
                "[bert][golden][precision]") {
  const auto dir = dt::testing::golden_dir("bert");
  if (!dir) return;
  auto model = bb::load_bert_classifier((*dir / "cls").string(), std::nullopt, true, torch::kBFloat16);
  for (const auto& p : model->bert->parameters()) CATCH_CHECK(p.scalar_type() == torch::kBFloat16);
  for (const auto& p : model->classifier->parameters()) CATCH_CHECK(p.scalar_type() == torch::kFloat);  // trained
  const auto x = read(*dir / "inputs.safetensors");
  const auto half = read(*dir / "cls_bf16_forward.safetensors"), full = read(*dir / "cls.safetensors");
  torch::NoGradGuard no_grad;
  auto out = model(x.at("input_ids"), x.at("attention_mask"), x.at("token_type_ids"), x.at("labels_cls"));
  dt::testing::check_half_matches(out.bert.last_hidden_state, half.at("last_hidden_state"), full.at("last_hidden_state"),
                                  "last_hidden_state");
  dt::testing::check_half_matches(out.bert.pooler_output, half.at("pooler_output"), full.at("pooler_output"),
                                  "pooler_output");
  dt::testing::check_half_matches(out.logits, half.at("logits"), full.at("logits"), "logits");
  CATCH_CHECK(out.loss.scalar_type() == torch::kFloat);  // over the bf16 logits, in float32
  CATCH_CHECK(std::abs(out.loss.item<double>() - full.at("loss").item<double>()) < 0.02 * full.at("loss").item<double>());
}

CATCH_TEST_CASE("a bare BertModel checkpoint gets a fresh, trainable classifier", "[bert][golden]") {
  const auto dir = dt::testing::golden_dir("bert");
  if (!dir) return;
  auto model = bb::load_bert_classifier((*dir / "base").string(), 3);
  const auto x = read(*dir / "inputs.safetensors");
  const auto expected = read(*dir / "cls.safetensors");
  auto out = model(x.at("input_ids"), x.at("attention_mask"), x.at("token_type_ids"));
  check_close(out.bert.last_hidden_state, expected.at("last_hidden_state"), "base last_hidden_state");
  CATCH_CHECK(out.logits.sizes() == torch::IntArrayRef({3, 3}));
  CATCH_CHECK(torch::equal(model->classifier->bias, torch::zeros({3})));
  const double std = model->classifier->weight.std().item<double>();
  CATCH_CHECK(std > 0.01);  // normal(0, 0.02) over 96 draws
  CATCH_CHECK(std < 0.03);
  for (const auto& p : model->named_parameters())
    CATCH_CHECK(p.value().requires_grad() == (p.key().rfind("classifier.", 0) == 0));
  // A head checkpoint of another size is an error, not a silent re-initialisation.
  CATCH_REQUIRE_THROWS_WITH(bb::load_bert_classifier((*dir / "cls").string(), 2),
                            Contains("mismatched (2): classifier.weight") && Contains("classifier.bias"));
}

CATCH_TEST_CASE("LayerNorm parameters named gamma and beta, as in older checkpoints, load", "[bert][golden]") {
  const auto dir = dt::testing::golden_dir("bert");
  if (!dir) return;
  auto checkpoint = bb::read_checkpoint((*dir / "cls").string());
  bb::Checkpoint legacy{checkpoint.source, checkpoint.config, {}};
  for (const auto& [name, tensor] : checkpoint.tensors) {
    auto renamed = std::regex_replace(name, std::regex(R"(LayerNorm\.weight$)"), "LayerNorm.gamma");
    legacy.tensors[std::regex_replace(renamed, std::regex(R"(LayerNorm\.bias$)"), "LayerNorm.beta")] = tensor;
  }
  CATCH_REQUIRE(legacy.tensors.count("bert.embeddings.LayerNorm.gamma"));
  auto model = bb::load_bert_classifier(legacy);
  check_matches(model, *dir, "cls", "labels_cls");
}

CATCH_TEST_CASE("the regression head's loss is the mean squared error", "[bert][golden]") {
  const auto dir = dt::testing::golden_dir("bert");
  if (!dir) return;
  auto reg = bb::load_bert_classifier((*dir / "reg").string());
  const auto x = read(*dir / "inputs.safetensors");
  auto out = reg(x.at("input_ids"), x.at("attention_mask"), x.at("token_type_ids"), x.at("labels_reg"));
  CATCH_CHECK(out.logits.sizes() == torch::IntArrayRef({3, 1}));
  const auto mse = (out.logits.squeeze(1) - x.at("labels_reg")).pow(2).mean();
  check_close(out.loss, mse, "regression loss");
}

CATCH_TEST_CASE("all-MiniLM-L6-v2 through the folder loader matches transformers and sentence-transformers",
                "[bert][golden]") {
  const auto dir = dt::testing::golden_dir("minilm");
  if (!dir) return;
  nlohmann::json info = nlohmann::json::parse(std::ifstream(*dir / "minilm.json"));
  if (info["model_dir"].is_null()) {
    CATCH_WARN("real-model tests skipped: " << info["reason"].get<std::string>());
    return;
  }
  auto bert = bb::load_bert(info["model_dir"].get<std::string>());
  const auto expected = read(*dir / "minilm.safetensors");
  torch::NoGradGuard no_grad;
  auto out = bert(expected.at("input_ids"), expected.at("attention_mask"), expected.at("token_type_ids"));
  check_close(out.last_hidden_state, expected.at("last_hidden_state"), "MiniLM last_hidden_state");
  check_close(out.pooler_output, expected.at("pooler_output"), "MiniLM pooler_output");
  // sentence-transformers: the mean over the sentence's tokens, L2-normalised.
  auto mask = out.attention_mask.unsqueeze(-1).to(torch::kFloat32);  // (B, T, 1)
  auto mean = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9);
  auto embedding = torch::nn::functional::normalize(mean, torch::nn::functional::NormalizeFuncOptions().dim(1));
  check_close(embedding, expected.at("sentence_embedding"), "MiniLM sentence embedding");
}

CATCH_TEST_CASE("a BERT config lacking a key or holding a bad value names config.json and the key", "[bert]") {
  const nlohmann::json good = {{"vocab_size", 10}, {"hidden_size", 8}, {"num_hidden_layers", 1},
                               {"num_attention_heads", 2}, {"intermediate_size", 16}, {"hidden_act", "gelu_new"},
                               {"hidden_dropout_prob", 0.1}, {"attention_probs_dropout_prob", 0.1},
                               {"max_position_embeddings", 16}, {"type_vocab_size", 2}, {"layer_norm_eps", 1e-12},
                               {"id2label", {{"0", "a"}, {"1", "b"}, {"2", "c"}}}};
  const auto config = bb::bert_config({"m.pt", good, {}});
  CATCH_CHECK(config.num_labels() == 3);
  CATCH_CHECK(config.hidden_act() == "gelu_new");
  auto without = good;
  without.erase("num_attention_heads");
  CATCH_REQUIRE_THROWS_AS(bb::bert_config({"m.pt", without, {}}), dt::CheckpointError);
  CATCH_REQUIRE_THROWS_WITH(bb::bert_config({"m.pt", without, {}}),
                            Contains("config.json") && Contains("\"num_attention_heads\""));
  auto bad = good;
  bad["hidden_act"] = "swish";
  CATCH_REQUIRE_THROWS_WITH(bb::bert_config({"m.pt", bad, {}}), Contains("config.json") && Contains("swish"));
  CATCH_REQUIRE_THROWS_AS(bb::BertModel(bb::BertConfig().hidden_size(10).num_attention_heads(3)), dt::OptionError);

  // Values no model can take, refused by key before anything is allocated; none truncated.
  const std::vector<std::pair<nlohmann::json, std::vector<std::string>>> refused = {
      {{{"layer_norm_eps", -1}}, {"layer_norm_eps -1 is not positive"}},
      {{{"hidden_size", 16.7}}, {"\"hidden_size\" is 16.7, expected an integer"}},
      {{{"hidden_dropout_prob", 2.0}}, {"hidden_dropout_prob", "not a probability in [0, 1)"}},
      {{{"classifier_dropout", -0.5}}, {"classifier_dropout -0.5 is not a probability"}},
      {{{"vocab_size", -1}}, {"vocab_size -1 is below 1"}},
      {{{"intermediate_size", 0}}, {"intermediate_size 0 is below 1"}},
      {{{"vocab_size", 1e12}}, {"\"vocab_size\"", "expected an integer"}},
      {{{"vocab_size", int64_t(1) << 50}}, {"the model needs", "GiB of memory"}},
      {{{"hidden_act", nullptr}}, {"the field \"hidden_act\" is missing"}},
  };
  for (const auto& [change, parts] : refused) {
    auto c = good;
    c.update(change);
    CATCH_INFO(change.dump());
    try {
      bb::bert_config({"m.pt", c, {}});
      CATCH_FAIL("accepted");
    } catch (const dt::CheckpointError& e) {
      CATCH_CHECK_THAT(e.what(), Contains("m.pt (extra file config.json)"));
      for (const auto& part : parts) CATCH_CHECK_THAT(e.what(), Contains(part));
    }
  }
}

CATCH_TEST_CASE("BERT is frozen when built, dropout runs in train mode only", "[bert]") {
  torch::manual_seed(0);
  const auto config = bb::BertConfig().vocab_size(50).hidden_size(16).num_hidden_layers(2).num_attention_heads(2)
                          .intermediate_size(32).max_position_embeddings(16);
  bb::BertForSequenceClassification model(config);
  for (const auto& p : model->bert->parameters()) CATCH_CHECK_FALSE(p.requires_grad());
  for (const auto& p : model->classifier->parameters()) CATCH_CHECK(p.requires_grad());

  const auto ids = torch::randint(1, 50, {2, 6});
  const auto mask = torch::tensor({{1, 1, 1, 1, 1, 1}, {1, 1, 1, 0, 0, 0}});
  model->train();
  CATCH_CHECK_FALSE(torch::equal(model(ids, mask).logits, model(ids, mask).logits));
  model->eval();
  const auto logits = model(ids, mask).logits;
  CATCH_CHECK(torch::equal(logits, model(ids, mask).logits));
  // Training the head: only the classifier receives gradients.
  model(ids, mask, torch::Tensor(), torch::tensor({0, 1})).loss.backward();
  CATCH_CHECK(model->classifier->weight.grad().defined());
  for (const auto& p : model->bert->parameters()) CATCH_CHECK_FALSE(p.grad().defined());
}

CATCH_TEST_CASE("find_sites lists BERT's sites under their Hugging Face names", "[bert]") {
  bb::BertForSequenceClassification model(bb::BertConfig().vocab_size(20).hidden_size(8).num_hidden_layers(2)
                                               .num_attention_heads(2).intermediate_size(16).max_position_embeddings(8));
  std::vector<std::string> found;
  for (const auto& s : dt::find_sites(*model)) found.push_back(s.name + " " + dt::to_string(s.kind));
  std::vector<std::string> expected{"bert.embeddings prompt"};
  for (int i = 0; i < 2; ++i) {
    const auto layer = "bert.encoder.layer." + std::to_string(i);
    for (const char* s : {".attention.self attention", ".attention.self.query linear", ".attention.self.key linear",
                          ".attention.self.value linear", ".attention.output output",
                          ".attention.output.dense linear", ".intermediate.dense linear", ".output output",
                          ".output.dense linear"})
      expected.push_back(layer + s);
  }
  expected.insert(expected.end(), {"bert.pooler.dense linear", "classifier linear"});
  CATCH_CHECK(found == expected);
}

CATCH_TEST_CASE("deltas attached at BERT's sites change its output", "[bert]") {
  torch::manual_seed(1);
  bb::BertModel bert(bb::BertConfig().vocab_size(30).hidden_size(8).num_hidden_layers(2).num_attention_heads(2)
                         .intermediate_size(16).max_position_embeddings(12));
  bert->eval();
  const auto ids = torch::randint(1, 30, {2, 5});
  const auto types = torch::tensor({{0, 0, 1, 1, 1}, {0, 1, 1, 0, 0}});
  const auto mask = torch::tensor({{1, 1, 1, 1, 1}, {1, 1, 1, 0, 0}});
  const auto base = bert(ids, mask, types).last_hidden_state;

  CATCH_SECTION("a weight delta on a FrozenLinear, running or merged") {
    auto shift = std::make_shared<ShiftImpl>(0.1 * torch::randn({8, 8}));
    auto query = site(*bert, "encoder.layer.1.attention.self.query", dt::Site::Kind::linear);
    query.linear->deltas.attach("toy", shift);
    const auto shifted = bert(ids, mask, types).last_hidden_state;
    CATCH_CHECK((shifted - base).abs().max().item<double>() > 1e-3);
    query.linear->merge("toy");
    check_close(bert(ids, mask, types).last_hidden_state, shifted, "merged");
    query.linear->unmerge("toy");
    query.linear->deltas.detach("toy");
    check_close(bert(ids, mask, types).last_hidden_state, base, "detached");
  }
  CATCH_SECTION("an activation delta on a sublayer's output") {
    auto output = site(*bert, "encoder.layer.0.output", dt::Site::Kind::output);
    output.output->output_deltas.attach("toy", std::make_shared<DoubleImpl>());
    CATCH_CHECK((bert(ids, mask, types).last_hidden_state - base).abs().max().item<double>() > 1e-3);
    output.output->output_deltas.set_active("toy", false);
    CATCH_CHECK(torch::equal(bert(ids, mask, types).last_hidden_state, base));
  }
  CATCH_SECTION("prompts are word embeddings prepended before positions and token types") {
    // Prompts equal to the embeddings of tokens 3 and 4 act as those tokens prepended to
    // the input with token type 0 and a visible mask.
    const auto prompt_ids = torch::tensor({3, 4});
    auto prompt = bert->embeddings->word_embeddings(prompt_ids).detach();
    auto embeddings = site(*bert, "embeddings", dt::Site::Kind::prompt);
    embeddings.prompt->prompt_deltas.attach("toy", std::make_shared<FixedInputImpl>(prompt, torch::Tensor(),
                                                                                  torch::Tensor()));
    auto out = bert(ids, mask, types);
    CATCH_CHECK(out.last_hidden_state.sizes() == torch::IntArrayRef({2, 7, 8}));
    CATCH_CHECK(out.attention_mask.sizes() == torch::IntArrayRef({2, 7}));
    embeddings.prompt->prompt_deltas.detach("toy");
    auto as_tokens = bert(torch::cat({prompt_ids.expand({2, 2}), ids}, 1), torch::cat({torch::ones({2, 2}, mask.options()), mask}, 1),
                          torch::cat({torch::zeros({2, 2}, types.options()), types}, 1));
    check_close(out.last_hidden_state, as_tokens.last_hidden_state, "prompt as tokens");
    check_close(out.pooler_output, as_tokens.pooler_output, "prompt pooled");
  }
  CATCH_SECTION("prefix keys and values at every attention, never masked") {
    auto prefix = std::make_shared<FixedInputImpl>(torch::Tensor(), torch::randn({3, 8}), torch::randn({3, 8}));
    for (auto& s : dt::find_sites(*bert))
      if (s.kind == dt::Site::Kind::attention) s.attention->prefix_deltas.attach("toy", prefix);
    auto with_prefix = bert(ids, mask, types).last_hidden_state;
    CATCH_CHECK(with_prefix.sizes() == base.sizes());
    CATCH_CHECK((with_prefix - base).abs().max().item<double>() > 1e-3);
    // The padded row equals the same 3 tokens alone: padding masked, prefix positions seen.
    using torch::indexing::Slice;
    auto alone = bert(ids.index({Slice(1, 2), Slice(0, 3)}), torch::Tensor(), types.index({Slice(1, 2), Slice(0, 3)}));
    check_close(with_prefix.index({Slice(1, 2), Slice(0, 3)}), alone.last_hidden_state, "prefix with padding");
  }
}

}  // namespace bert_test
