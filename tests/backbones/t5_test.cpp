// Tests of backbones/t5.hpp: loading both checkpoint forms against transformers' outputs
// (tools/golden/t5.py), greedy decoding, frozen weights, dropout, sites and their wiring.
#include <deltatune/backbones/t5.hpp>
#include <deltatune/methods/lora.hpp>

#include <fstream>

#include "test_support.hpp"

namespace t5_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;
using dt::testing::close;
using dt::testing::describe_difference;

namespace {

// A tiny random model in the shape of the fixtures', for tests that need no reference.
bb::T5Config tiny_config(const std::string& feed_forward_proj = "gated-gelu") {
  return bb::T5Config()
      .vocab_size(50)
      .d_model(16)
      .d_kv(4)
      .d_ff(32)
      .num_layers(2)
      .num_decoder_layers(3)
      .num_heads(2)
      .relative_attention_num_buckets(8)
      .relative_attention_max_distance(20)
      .feed_forward_proj(feed_forward_proj)
      .tie_word_embeddings(false);
}

struct Batch {
  torch::Tensor input_ids, attention_mask, labels;
};

Batch tiny_batch() {
  torch::manual_seed(3);
  auto input_ids = torch::randint(2, 50, {2, 7}, torch::kLong);
  auto attention_mask = torch::ones_like(input_ids);
  attention_mask.index_put_({1, torch::indexing::Slice(5)}, 0);
  return {input_ids, attention_mask, torch::randint(2, 50, {2, 5}, torch::kLong)};
}

// dW = s W0 with one trained scalar s: the smallest weight delta that changes the layer.
class ScaleDelta : public torch::nn::Module, public dt::WeightDelta {
 public:
  ScaleDelta() { s = register_parameter("s", torch::full({}, 0.5)); }
  std::string method() const override { return "scale"; }
  nlohmann::json options_json() const override { return nlohmann::json::object(); }
  torch::nn::Module& module() override { return *this; }
  torch::Tensor delta_weight(const torch::Tensor& base_weight) override { return s * base_weight; }
  torch::Tensor s;
};

// Fixed prompt embeddings (P, d) and prefix keys/values (P, inner) at every attention site.
class FixedInputs : public torch::nn::Module, public dt::InputDelta {
 public:
  FixedInputs(int64_t d_model, int64_t inner) : prompt(torch::randn({2, d_model})), key(torch::randn({3, inner})),
                                                value(torch::randn({3, inner})) {}
  std::string method() const override { return "fixed"; }
  nlohmann::json options_json() const override { return nlohmann::json::object(); }
  torch::nn::Module& module() override { return *this; }
  int64_t num_virtual_tokens() const override { return 3; }
  torch::Tensor prompt_embeddings() override { return prompt; }
  std::pair<torch::Tensor, torch::Tensor> prefix_key_value(const std::string&) override { return {key, value}; }
  torch::Tensor prompt, key, value;
};

void check_close(const std::string& what, const torch::Tensor& actual, const torch::Tensor& expected) {
  dt::testing::check_matches(actual, expected, what);
}

}  // namespace

CATCH_TEST_CASE("T5 from Hugging Face folders and TorchScript archives matches transformers", "[t5][golden]") {
  const auto dir = dt::testing::golden_dir("t5");
  if (!dir) return;
  for (const std::string name : {"v1_0", "v1_1"}) {
    const auto io = dt::read_safetensors((*dir / name / "io.safetensors").string()).tensors;
    std::vector<std::pair<std::string, std::string>> forms{{"hf", ""}, {"model.pt", ""}, {"hf_half", "half_"}};
    if (name == "v1_1") forms.emplace_back("hf_sharded", "");
    for (const auto& [form, prefix] : forms) {
      CATCH_INFO(name << "/" << form);
      auto model = bb::load_t5((*dir / name / form).string());
      CATCH_CHECK_FALSE(model->is_training());
      CATCH_CHECK(model->config.lean_dropout());
      torch::NoGradGuard no_grad;
      const auto out = model->forward(io.at("input_ids"), io.at("attention_mask"), {}, io.at("labels"));
      check_close("encoder hidden", out.encoder_last_hidden_state, io.at(prefix + "encoder_hidden"));
      check_close("decoder hidden", out.decoder_last_hidden_state, io.at(prefix + "decoder_hidden"));
      check_close("logits", out.logits, io.at(prefix + "logits"));
      check_close("loss", out.loss.reshape(1), io.at(prefix + "loss"));
      const auto& expected_ids = io.at(prefix + "generated");
      auto ids = model->generate_greedy(io.at("input_ids"), io.at("attention_mask"), expected_ids.size(1) - 1);
      CATCH_CHECK(torch::equal(ids, expected_ids));
    }
  }
  // lean_dropout is ours, not config.json's: the loader's option reaches every dropout.
  auto plain = bb::load_t5((*dir / "v1_0" / "hf").string(), bb::T5LoadOptions().lean_dropout(false));
  CATCH_CHECK_FALSE(plain->config.lean_dropout());
  int lean = 0, plain_dropouts = 0;
  for (const auto& m : plain->modules()) {
    if (const auto d = std::dynamic_pointer_cast<bb::DropoutImpl>(m)) (d->lean ? lean : plain_dropouts)++;
    if (const auto a = std::dynamic_pointer_cast<bb::T5AttentionImpl>(m)) (a->lean_dropout ? lean : plain_dropouts)++;
  }
  CATCH_CHECK(lean == 0);
  CATCH_CHECK(plain_dropouts > 0);
}

// bf16 and fp16 (on the CPU here; CUDA is where fp16 trains). In fp16, wo stays float32 as in
// transformers, so the residual stream runs in float32 after the first feed-forward, as there.
CATCH_TEST_CASE("T5 loaded in bf16 or fp16 matches transformers' forward at that precision", "[t5][golden][precision]") {
  const auto dir = dt::testing::golden_dir("t5");
  if (!dir) return;
  for (const std::string name : {"v1_0", "v1_1"}) {
    for (const auto& [dtype, prefix] : {std::pair(torch::kBFloat16, "bf16"), std::pair(torch::kHalf, "fp16")}) {
      CATCH_INFO(name << " " << prefix);
      const auto io = dt::read_safetensors((*dir / name / "io.safetensors").string()).tensors;
      auto model = bb::load_t5((*dir / name / "hf").string(), bb::T5LoadOptions().dtype(dtype));
      for (const auto& p : model->named_parameters()) {
        const bool kept = dtype == torch::kHalf && p.key().find(".wo.") != std::string::npos;
        CATCH_CHECK(p.value().scalar_type() == (kept ? torch::kFloat : dtype));
      }
      CATCH_CHECK(io.at(std::string(prefix) + "_wo_dtype").item<bool>() == (dtype == torch::kHalf));
      torch::NoGradGuard no_grad;
      const auto out = model->forward(io.at("input_ids"), io.at("attention_mask"), {}, io.at("labels"));
      const auto p = std::string(prefix) + "_";
      dt::testing::check_half_matches(out.encoder_last_hidden_state, io.at(p + "encoder_hidden"),
                                      io.at("encoder_hidden"), "encoder hidden");
      dt::testing::check_half_matches(out.decoder_last_hidden_state, io.at(p + "decoder_hidden"),
                                      io.at("decoder_hidden"), "decoder hidden");
      dt::testing::check_half_matches(out.logits, io.at(p + "logits"), io.at("logits"), "logits");
      CATCH_CHECK(out.loss.scalar_type() == torch::kFloat);  // over the half-precision logits, in float32
      CATCH_CHECK(std::abs(out.loss.item<double>() - io.at("loss").item<double>()) <
                  0.02 * io.at("loss").item<double>());
    }
  }
}

// T5's layer norm against torch's rms_norm with autograd, in float32 and float64 (what a bf16
// x takes is checked below): the same forward and gradients bit for bit (the same steps
// backwards), less kept for backward where the weight trains.
CATCH_TEST_CASE("T5's RMS norm is torch's, keeping x and one statistic a row for backward", "[t5][precision]") {
  torch::manual_seed(17);
  for (const auto dtype : {torch::kDouble, torch::kFloat}) {
    CATCH_INFO(c10::toString(dtype));
    const auto x = (torch::randn({4, 16, 96}) * 3).to(dtype).requires_grad_();
    const auto w = (torch::rand({96}) + 0.5).to(dtype).requires_grad_();
    auto ours = [&] { return dt::detail::RMSNormFunction::apply(x, w, 1e-6); };
    auto theirs = [&] { return torch::rms_norm(x, {96}, w, 1e-6); };
    const auto y = ours(), y_ref = theirs();
    CATCH_CHECK(torch::equal(y, y_ref));
    const auto probe = torch::randn(y.sizes()).to(dtype);
    const auto g = torch::autograd::grad({(y * probe).sum()}, {x, w});
    const auto g_ref = torch::autograd::grad({(y_ref * probe).sum()}, {x, w});
    for (size_t i = 0; i < g.size(); ++i) {
      CATCH_INFO("gradient of " << (i == 0 ? "x" : "the weight"));
      CATCH_CHECK(torch::equal(g[i], g_ref[i]));
    }
    // torch's keeps x times its statistic for the weight's gradient.
    const int64_t saved = dt::testing::bytes_kept(theirs) - dt::testing::bytes_kept(ours);
    CATCH_INFO("ours keeps " << saved << " bytes less");
    CATCH_CHECK(saved >= x.numel() * int64_t(c10::elementSize(dtype)));
  }
}

// A bf16 x on the CPU takes the one-pass kernels (kernels/rms_norm_cpu.hpp): float32 math rounded
// once, so each output and gradient is within a bf16 rounding of the exact values (float64 on
// the same bf16 inputs), as torch's rms_norm's are, with gradients' cancellations allowed
// float32's error against their scale. A frozen bf16 weight (a bf16 backbone) and a float32
// trained one cast to bf16, which T5 takes it for; rows in more than one of the weight gradient's
// blocks, a row length that leaves a tail to every vector loop, a transposed x; the same bits at
// 1 and 3 threads. torch's keeps x's float32 copy for backward, ours x as it came.
CATCH_TEST_CASE("T5's RMS norm of a bf16 x is within a bf16 rounding of exact, the same at any thread count",
                "[t5][precision]") {
  torch::manual_seed(17);
  const int threads = at::get_num_threads();
  auto within_rounding = [](const torch::Tensor& ours, const torch::Tensor& exact) {
    const auto error = (ours.to(torch::kDouble) - exact).abs();
    const auto allowed = exact.abs() * std::ldexp(1.0, -8) + exact.abs().max() * 1e-5;
    return (error <= allowed).all().item<bool>();
  };
  for (const auto w_dtype : {torch::kBFloat16, torch::kFloat})
    for (const bool transposed : {false, true}) {
      const bool w_trains = w_dtype == torch::kFloat;
      CATCH_INFO(c10::toString(w_dtype) << " weight" << (w_trains ? ", trained" : "")
                                        << (transposed ? ", x transposed" : ""));
      auto x_data = (torch::randn({4, 35, 100}) * 3).to(torch::kBFloat16);
      if (transposed) x_data = x_data.transpose(0, 1).contiguous().transpose(0, 1);
      const auto x = x_data.requires_grad_();
      const auto w = (torch::rand({100}) + 0.5).to(w_dtype).requires_grad_(w_trains);
      const auto probe = torch::randn(x.sizes()).to(torch::kBFloat16);
      std::vector<torch::Tensor> inputs{x};
      if (w_trains) inputs.push_back(w);
      auto run = [&](auto&& norm) {
        const auto y = norm();
        auto result = torch::autograd::grad({(y * probe).sum()}, inputs);
        result.insert(result.begin(), y);
        return result;
      };
      const auto w_at_x = [&] { return dt::detail::at_precision_of(x, w); };
      auto ours = [&] { return dt::detail::RMSNormFunction::apply(x, w_at_x(), 1e-6); };
      auto theirs = [&] { return torch::rms_norm(x, {100}, w_at_x(), 1e-6); };
      // The exact values: float64 on the bf16 values both take.
      const auto xd = x.detach().to(torch::kDouble).requires_grad_();
      const auto wd = w_at_x().detach().to(torch::kDouble).requires_grad_(w_trains);
      const auto yd = xd * torch::rsqrt(xd.pow(2).mean(-1, true) + 1e-6) * wd;
      std::vector<torch::Tensor> inputs_d{xd};
      if (w_trains) inputs_d.push_back(wd);
      auto exact = torch::autograd::grad({(yd * probe.to(torch::kDouble)).sum()}, inputs_d);
      exact.insert(exact.begin(), yd.detach());

      at::set_num_threads(1);
      const auto one_thread = run(ours);
      at::set_num_threads(3);
      const auto three_threads = run(ours);
      at::set_num_threads(threads);
      const auto reference = run(theirs);
      for (size_t i = 0; i < exact.size(); ++i) {
        const char* const names[] = {"y", "gradient of x", "gradient of the weight"};
        CATCH_INFO(names[i]);
        CATCH_CHECK(one_thread[i].scalar_type() == reference[i].scalar_type());
        CATCH_CHECK(within_rounding(one_thread[i], exact[i]));
        CATCH_CHECK(within_rounding(reference[i], exact[i]));  // the bound holds for torch's too
        CATCH_CHECK(torch::equal(one_thread[i], three_threads[i]));
      }
      const int64_t saved = dt::testing::bytes_kept(theirs) - dt::testing::bytes_kept(ours);
      CATCH_INFO("ours keeps " << saved << " bytes less");
      CATCH_CHECK(saved >= x.numel() * 4);
    }
}

// T5's loss (backbones/cross_entropy.hpp) against torch's cross_entropy of the logits in float32,
// rows labelled -100 left out: in float64 the same loss and gradient to rounding; bf16 logits'
// loss within float32's error, and their gradient within a bf16 rounding of the exact one
// (float64 on the same bf16 logits), as torch's cast back is. Over more than one block of rows.
// torch's keeps float32 log-probabilities (N, V) and its backward allocates two more; ours keeps
// one float a row (the logits are the graph's already) and backward the gradient and one
// block's float32 copies. Through T5 in bf16: the loss keeps no more than the logits do.
CATCH_TEST_CASE("T5's loss is torch's cross-entropy, keeping the logits and one float a row for backward",
                "[t5][precision]") {
  torch::manual_seed(19);
  const int64_t rows = 600, vocab = 4000;  // 2.4 million logits: three blocks of rows
  auto labels = torch::randint(0, vocab, {rows}, torch::kLong);
  labels.index_put_({torch::indexing::Slice(0, rows, 7)}, -100);
  const auto counted = (labels != -100).sum().item<double>();
  auto theirs_of = [&](const torch::Tensor& logits) {
    return torch::nn::functional::cross_entropy(logits.to(torch::promote_types(logits.scalar_type(), torch::kFloat)),
                                                labels);
  };
  for (const auto dtype : {torch::kDouble, torch::kBFloat16}) {
    CATCH_INFO(c10::toString(dtype));
    const auto logits = (torch::randn({rows, vocab}) * 4).to(dtype).requires_grad_();
    auto ours = [&] { return dt::detail::token_cross_entropy(logits, labels); };
    auto theirs = [&] { return theirs_of(logits); };
    const auto loss = ours(), loss_ref = theirs();
    CATCH_CHECK(loss.scalar_type() == loss_ref.scalar_type());
    CATCH_CHECK(std::abs(loss.item<double>() - loss_ref.item<double>()) <=
                std::abs(loss_ref.item<double>()) * (dtype == torch::kDouble ? 1e-12 : 1e-6));
    const auto grad = torch::autograd::grad({loss * 3}, {logits})[0];
    const auto grad_ref = torch::autograd::grad({loss_ref * 3}, {logits})[0];
    CATCH_CHECK(grad.scalar_type() == dtype);
    // Exact: (softmax - onehot) 3 / count in float64 on the values both took, 0 on ignored rows.
    const auto x = logits.detach().to(torch::kDouble);
    const auto kept = (labels != -100).unsqueeze(1);
    auto exact = torch::softmax(x, 1).scatter_add(1, labels.clamp_min(0).unsqueeze(1),
                                                  -torch::ones({rows, 1}, x.options()));
    exact = exact * kept * (3 / counted);
    const auto error = (grad.to(torch::kDouble) - exact).abs(), error_ref = (grad_ref.to(torch::kDouble) - exact).abs();
    // bf16: a rounding of each entry, and float32's error against the largest.
    const double relative = dtype == torch::kDouble ? 1e-12 : std::ldexp(1.0, -8);
    const auto allowed = exact.abs() * relative + exact.abs().max() * (dtype == torch::kDouble ? 1e-12 : 1e-6);
    CATCH_CHECK((error <= allowed).all().item<bool>());
    CATCH_CHECK((error_ref <= allowed).all().item<bool>());  // the bound holds for torch's too
    CATCH_CHECK((grad.to(torch::kDouble) * kept.logical_not()).abs().max().item<double>() == 0);

    if (dtype != torch::kBFloat16) continue;
    const int64_t logit_floats = rows * vocab;
    const int64_t kept_ours = dt::testing::bytes_kept(ours), kept_theirs = dt::testing::bytes_kept(theirs);
    CATCH_INFO("kept: ours " << kept_ours << " bytes, torch's " << kept_theirs);
    CATCH_CHECK(kept_ours <= rows * 32);
    CATCH_CHECK(kept_theirs >= logit_floats * 4);
    auto backward_peak = [&](auto&& f) {
      const auto l = f();
      const dt::bench::AllocationPeak allocations;
      torch::autograd::grad({l}, {logits});
      return allocations.peak_bytes();
    };
    const int64_t block_floats = (int64_t(1) << 20) / vocab * vocab;
    const int64_t peak_ours = backward_peak(ours), peak_theirs = backward_peak(theirs);
    CATCH_INFO("backward's peak: ours " << peak_ours << " bytes, torch's " << peak_theirs);
    CATCH_CHECK(peak_ours <= logit_floats * 2 + block_floats * 8 + rows * 32);
    CATCH_CHECK(peak_theirs >= logit_floats * 8);
  }

  // Through T5 in bf16, with a LoRA so that there is a graph: the logits alone keep as much.
  auto config = tiny_config().vocab_size(vocab);
  bb::T5Model model(config);
  dt::set_frozen_dtype(*model, torch::kBFloat16);
  model->decoder->blocks[1]->cross_attention->EncDecAttention->v->deltas.attach(
      "toy", dt::LoRA(dt::LoRAOptions(config.d_model(), config.num_heads() * config.d_kv())).ptr());
  const auto batch = tiny_batch();
  const auto decoder_ids = model->shift_right(batch.labels);
  const int64_t with_loss = dt::testing::bytes_kept(
      [&] { return model->forward(batch.input_ids, batch.attention_mask, decoder_ids, batch.labels).loss; });
  const int64_t logits_only = dt::testing::bytes_kept(
      [&] { return model->forward(batch.input_ids, batch.attention_mask, decoder_ids).logits; });
  CATCH_INFO("the loss keeps " << with_loss << " bytes, the logits " << logits_only);
  CATCH_CHECK(with_loss - logits_only <= batch.labels.numel() * 32);

  CATCH_CHECK(std::isnan(dt::detail::token_cross_entropy(torch::randn({2, 5}), torch::full({2}, -100L)).item<double>()));
  CATCH_CHECK_THROWS_WITH(dt::detail::token_cross_entropy(torch::randn({2, 5}), torch::tensor({1L, 5L})),
                          Catch::Contains("outside the vocabulary of 5 tokens"));
  CATCH_CHECK_THROWS_WITH(dt::detail::token_cross_entropy(torch::randn({2, 3, 5}), torch::zeros({2, 4}, torch::kLong)),
                          Catch::Contains("labels [2, 4] do not match logits [2, 3, 5]"));
}

CATCH_TEST_CASE("T5 reports every checkpoint mismatch in one error, and config errors by key", "[t5][golden]") {
  const auto dir = dt::testing::golden_dir("t5");
  if (!dir) return;
  const auto path = (*dir / "v1_0" / "hf").string();
  auto config = bb::read_json_file(*dir / "v1_0" / "hf" / "config.json");
  config["d_ff"] = 48;
  config["num_layers"] = 3;
  try {
    bb::load_t5(path, bb::T5LoadOptions().config(config));
    CATCH_FAIL("a config that does not fit the weights was accepted");
  } catch (const dt::CheckpointError& e) {
    const std::string message = e.what();
    CATCH_CHECK_THAT(message, Catch::Contains("missing (") && Catch::Contains("encoder.block.2.layer.0.SelfAttention.q.weight"));
    CATCH_CHECK_THAT(message, Catch::Contains("mismatched (") &&
                                  Catch::Contains("encoder.block.0.layer.1.DenseReluDense.wi.weight (file Float [64, 32], model Float [48, 32])"));
  }
  config = bb::read_json_file(*dir / "v1_0" / "hf" / "config.json");
  config.erase("d_model");
  CATCH_REQUIRE_THROWS_WITH(bb::T5Config::from_json(config, "x/config.json"),
                            Catch::Contains("x/config.json") && Catch::Contains("\"d_model\" is missing"));
  config["d_model"] = "32";
  CATCH_REQUIRE_THROWS_WITH(bb::T5Config::from_json(config, "x/config.json"),
                            Catch::Contains("\"d_model\" is \"32\", expected an integer"));
  config["d_model"] = 32;
  config["feed_forward_proj"] = "gated-tanh";
  CATCH_REQUIRE_THROWS_AS(bb::T5Config::from_json(config, "x/config.json"), dt::CheckpointError);
}

CATCH_TEST_CASE("T5 configs holding values no model can take are refused by key, before allocating", "[t5]") {
  const nlohmann::json good = {{"vocab_size", 64}, {"d_model", 16}, {"d_kv", 4}, {"d_ff", 32}, {"num_layers", 2},
                               {"num_heads", 4}};
  CATCH_CHECK(bb::T5Config::from_json(good, "x/config.json").d_model() == 16);
  const std::vector<std::pair<nlohmann::json, std::string>> refused = {
      {{{"layer_norm_epsilon", -1}}, "layer_norm_epsilon = -1 (must be positive)"},
      {{{"decoder_start_token_id", 999}}, "decoder_start_token_id = 999 (must be a token id, in [0, vocab_size = 64))"},
      {{{"pad_token_id", -7}}, "pad_token_id = -7 (must be a token id"},
      {{{"d_model", 16.5}}, "\"d_model\" is 16.5, expected an integer"},
      {{{"dropout_rate", "0.1"}}, "\"dropout_rate\" is \"0.1\", expected a finite number"},
      {{{"vocab_size", int64_t(1) << 50}}, "GiB of memory"},
  };
  for (const auto& [change, part] : refused) {
    auto c = good;
    c.update(change);
    CATCH_CHECK_THROWS_WITH(bb::T5Config::from_json(c, "x/config.json"),
                            Catch::Contains("x/config.json") && Catch::Contains(part));
  }
  // A config.json that is valid JSON but no object says so (not "holds no config.json").
  dt::testing::TempDir dir;
  dir.write("config.json", "[]");
  CATCH_CHECK_THROWS_WITH(bb::load_t5(dir.path.string()),
                          Catch::Contains("config.json: expected a JSON object of the model's configuration, got array"));
}

CATCH_TEST_CASE("T5 is frozen, trains its deltas only, and drops out in training mode only", "[t5]") {
  bb::T5Model model(tiny_config());
  for (const auto& p : model->named_parameters()) {
    CATCH_INFO(p.key());
    CATCH_CHECK_FALSE(p.value().requires_grad());
  }
  const auto batch = tiny_batch();
  auto delta = std::make_shared<ScaleDelta>();
  model->decoder->blocks[1]->cross_attention->EncDecAttention->v->deltas.attach("toy", delta);

  model->train();
  auto a = model->forward(batch.input_ids, batch.attention_mask, {}, batch.labels);
  auto b = model->forward(batch.input_ids, batch.attention_mask, {}, batch.labels);
  CATCH_CHECK_FALSE(torch::allclose(a.logits, b.logits));
  a.loss.backward();
  CATCH_CHECK(delta->s.grad().defined());
  for (const auto& p : model->parameters()) CATCH_CHECK_FALSE(p.grad().defined());

  model->eval();
  torch::NoGradGuard no_grad;
  auto with_delta = model->forward(batch.input_ids, batch.attention_mask, {}, batch.labels).logits;
  CATCH_CHECK(torch::equal(with_delta, model->forward(batch.input_ids, batch.attention_mask, {}, batch.labels).logits));
  model->decoder->blocks[1]->cross_attention->EncDecAttention->v->deltas.set_active("toy", false);
  auto without = model->forward(batch.input_ids, batch.attention_mask, {}, batch.labels).logits;
  CATCH_CHECK((with_delta - without).abs().max().item<double>() > 1e-3);
}

CATCH_TEST_CASE("T5 lists its sites under Hugging Face names, and a tied head shares the embeddings", "[t5]") {
  bb::T5Model model(tiny_config("relu").tie_word_embeddings(true));
  std::map<std::string, dt::Site::Kind> sites;
  for (const auto& site : dt::find_sites(*model)) sites[site.name] = site.kind;
  using K = dt::Site::Kind;
  const std::vector<std::pair<std::string, K>> expected{
      {"encoder", K::prompt},
      {"encoder.block.1.layer.0", K::output},
      {"encoder.block.1.layer.0.SelfAttention", K::attention},
      {"encoder.block.1.layer.0.SelfAttention.q", K::linear},
      {"encoder.block.1.layer.0.SelfAttention.o", K::linear},
      {"encoder.block.0.layer.1", K::output},
      {"encoder.block.0.layer.1.DenseReluDense.wi", K::linear},
      {"decoder.block.2.layer.0.SelfAttention.v", K::linear},
      {"decoder.block.2.layer.1", K::output},
      {"decoder.block.2.layer.1.EncDecAttention", K::attention},
      {"decoder.block.2.layer.1.EncDecAttention.k", K::linear},
      {"decoder.block.2.layer.2", K::output},
      {"decoder.block.2.layer.2.DenseReluDense.wo", K::linear},
      {"decoder.block.2.layer.2.layer_norm", K::linear},  // weight sites: BitFit adds their bias
      {"encoder.final_layer_norm", K::linear},
      {"lm_head", K::linear}};
  for (const auto& [name, kind] : expected) {
    CATCH_INFO(name);
    CATCH_REQUIRE(sites.count(name) == 1);
    CATCH_CHECK(sites[name] == kind);
  }
  // Per encoder block 4 + 2 linears, 2 layer norms, 2 outputs, 1 attention; per decoder
  // block 8 + 2, 3, 3, 2; the two final layer norms, lm_head, the encoder's prompt site.
  CATCH_CHECK(sites.size() == 2 * (6 + 2 + 2 + 1) + 3 * (10 + 3 + 3 + 2) + 2 + 1 + 1);
  CATCH_CHECK(model->lm_head->weight.is_same(model->shared->weight));
  for (const auto& p : model->named_parameters()) CATCH_CHECK(p.key() != "lm_head.weight");
  CATCH_CHECK(model->named_parameters().contains("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"));
  CATCH_CHECK_FALSE(model->named_parameters().contains("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"));
}

CATCH_TEST_CASE("T5 decoding with the cache equals the full forward pass, prompts and prefixes attached", "[t5]") {
  bb::T5Model model(tiny_config());
  model->eval();
  torch::NoGradGuard no_grad;
  const auto batch = tiny_batch();
  auto inputs = std::make_shared<FixedInputs>(16, 8);
  for (auto& site : dt::find_sites(*model)) {
    if (site.prompt) site.prompt->prompt_deltas.attach("fixed", inputs);
    if (site.attention) site.attention->prefix_deltas.attach("fixed", inputs);
  }
  const auto decoder_ids = model->shift_right(batch.labels);
  const auto full = model->forward(batch.input_ids, batch.attention_mask, decoder_ids);
  CATCH_CHECK(full.encoder_last_hidden_state.size(1) == 2 + 7);  // the prompt's 2 positions first
  const auto encoded = model->encode(batch.input_ids, batch.attention_mask);
  bb::T5DecoderCache cache;
  std::vector<torch::Tensor> steps;
  for (int64_t t = 0; t < decoder_ids.size(1); ++t)
    steps.push_back(model->decode(decoder_ids.narrow(1, t, 1), encoded, &cache));
  CATCH_CHECK(cache.length() == 3 + decoder_ids.size(1));  // the prefix's 3 positions, then the tokens
  const auto stepped = torch::cat(steps, 1);
  CATCH_INFO(describe_difference(stepped, full.logits));
  CATCH_CHECK(close(stepped, full.logits, dt::testing::tolerance_for(torch::kFloat32)));
}

}  // namespace t5_test
