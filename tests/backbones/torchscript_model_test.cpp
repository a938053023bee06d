// Tests of backbones/torchscript_model.hpp: the traced T5 and BERT archives of the golden
// fixtures (tools/golden/t5.py, bert.py) with deltas attached through DeltaModel, against
// the native backbones loaded from the same archives with the same delta weights.
#include <deltatune/backbones/torchscript_model.hpp>

#include <deltatune/backbones/bert.hpp>
#include <deltatune/backbones/t5.hpp>
#include <deltatune/methods/phm.hpp>
#include <deltatune/core/delta_model.hpp>
#include <deltatune/methods/method_table.hpp>

#include <algorithm>
#include <iterator>
#include <set>

#include "test_support.hpp"

namespace torchscript_model_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;

namespace {

// One archive, loaded natively and as a TorchScriptModel; the archive's names are the
// native ones behind `prefix` (T5's trace wraps the model as "model").
struct Fixture {
  std::string label, prefix, path;
  std::shared_ptr<torch::nn::Module> native;
  std::function<torch::Tensor()> native_logits;
  bb::TorchScriptModel traced{nullptr};
  std::function<torch::Tensor(bb::TorchScriptModel&)> logits_of;  // a TorchScriptModel of the archive on the inputs
  torch::Tensor traced_logits() { return logits_of(traced); }
};

Fixture t5_fixture(const std::filesystem::path& dir, const std::string& version) {
  const auto io = dt::read_safetensors((dir / version / "io.safetensors").string()).tensors;
  const auto path = (dir / version / "model.pt").string();
  const auto ids = io.at("input_ids"), mask = io.at("attention_mask"), decoder_ids = io.at("decoder_input_ids");
  auto native = bb::load_t5(path);
  auto traced = bb::load_torchscript_model(path);
  return {"t5 " + version, "model.", path, native.ptr(),
          [=]() mutable { return native->forward(ids, mask, decoder_ids).logits; }, traced,
          [=](bb::TorchScriptModel& model) { return model->forward({ids, mask, decoder_ids}).toTensor(); }};
}

Fixture bert_fixture(const std::filesystem::path& dir) {
  const auto x = dt::read_safetensors((dir / "inputs.safetensors").string()).tensors;
  const auto ids = x.at("input_ids"), mask = x.at("attention_mask"), types = x.at("token_type_ids");
  const auto path = (dir / "cls.pt").string();
  auto native = bb::load_bert_classifier(path);
  auto traced = bb::load_torchscript_model(path);
  return {"bert cls", "", path, native.ptr(), [=]() mutable { return native->forward(ids, mask, types).logits; }, traced,
          [=](bb::TorchScriptModel& model) {
            return model->forward({ids, mask, types}).toTupleRef().elements()[0].toTensor();
          }};
}

// Every fixture whose golden files exist (none, after a "tests skipped" warning, where they do not).
std::vector<Fixture> fixtures() {
  std::vector<Fixture> out;
  if (const auto t5 = dt::testing::golden_dir("t5"))
    for (const std::string version : {"v1_0", "v1_1"}) out.push_back(t5_fixture(*t5, version));
  if (const auto bert = dt::testing::golden_dir("bert")) out.push_back(bert_fixture(*bert));
  return out;
}

// PHM reparameterisation of a Linear's weight, W0 + sum_i A_i (x) B_i: no recipe ships it.
class PHMWeightRecipe : public dt::RecipeBase<dt::PHMLinearOptions> {
 public:
  PHMWeightRecipe() : RecipeBase(dt::PHMLinearOptions(0, 0).n(4), dt::Site::Kind::linear, {}) {}
  std::string method() const override { return "phm"; }
  nlohmann::json options_json() const override { return {{"n", options.n()}}; }
  std::shared_ptr<dt::DeltaModule> make(const dt::Site& site) override {
    return dt::PHMLinear(dt::PHMLinearOptions(options).in_features(site.linear->in_features)
                             .out_features(site.linear->out_features)).ptr();
  }
};

struct Method {
  std::string label;
  std::function<std::shared_ptr<dt::DeltaRecipe>()> recipe;
  std::string pattern;  // empty: the method's default sites
};

std::vector<Method> methods() {
  return {
      {"lora", [] { return dt::make_recipe(dt::LoRAOptions().r(4).alpha(8)); }, ""},
      {"ia3", [] { return dt::make_recipe(dt::IA3Options()); }, ""},
      // Every Linear and T5 norm of both stacks (and BERT's pooler and classifier); T5 v1.0's
      // lm_head reads the shared embeddings in the trace, so it is no site there.
      {"bitfit", [] { return dt::make_recipe(dt::BitFitOptions()); }, "re:.*(coder|pooler|classifier).*"},
      {"phm", [] { return std::make_shared<PHMWeightRecipe>(); }, "o|wo|output.dense"},
      {"houlsby", [] { return dt::make_recipe(dt::houlsby_options()); }, ""},
      {"pfeiffer", [] { return dt::make_recipe(dt::pfeiffer_options()); }, ""},
  };
}

std::map<std::string, torch::Tensor> by_name(const std::vector<std::pair<std::string, torch::Tensor>>& named) {
  return {named.begin(), named.end()};
}

// The traced model's tensor for a native name: the same name behind the archive's prefix,
// or as it is (modules a delta shares, such as Compacter's rule).
torch::Tensor counterpart(const std::map<std::string, torch::Tensor>& traced, const Fixture& f, const std::string& name) {
  auto it = traced.find(f.prefix + name);
  if (it == traced.end()) it = traced.find(name);
  CATCH_INFO("native tensor " << name);
  CATCH_REQUIRE(it != traced.end());
  return it->second;
}

// Random delta weights on the native side (LoRA's zero B included), copied to the traced side.
void same_random_deltas(dt::DeltaModel& native, dt::DeltaModel& traced, const Fixture& f) {
  torch::NoGradGuard no_grad;
  const auto traced_params = by_name(traced.named_delta_parameters("d"));
  const auto native_params = native.named_delta_parameters("d");
  CATCH_REQUIRE(native_params.size() == traced_params.size());
  for (auto& [name, p] : native_params) {
    p.add_(torch::randn_like(p) * 0.2);
    counterpart(traced_params, f, name).copy_(p);
  }
}

void check_close(const std::string& what, const torch::Tensor& actual, const torch::Tensor& expected) {
  dt::testing::check_matches(actual, expected, what);
}

// With deltas, each side sums in another order (x (W0 + dW)^T against x W0^T + x dW^T):
// compared relative to the largest entry (1e-5 for logits, 1e-4 for gradients, which sum
// over every position and logit).
void check_relative(const std::string& what, const torch::Tensor& actual, const torch::Tensor& expected, double rtol) {
  const double scale = std::max(1.0, expected.abs().max().item<double>());
  const double difference = (actual - expected).abs().max().item<double>();
  CATCH_INFO(what << ": max |difference| " << difference << ", largest entry " << scale);
  CATCH_CHECK(difference <= rtol * scale);
}

// A native and a traced DeltaModel with delta "d" of `method` at the same sites, same weights.
struct Pair {
  dt::DeltaModel native, traced;
};
Pair attach(const Fixture& f, const Method& method) {
  Pair pair{dt::DeltaModel(f.native), dt::DeltaModel(f.traced)};
  for (auto* model : {&pair.native, &pair.traced}) {
    if (method.pattern.empty()) model->add("d", method.recipe());
    else model->add("d", method.recipe(), method.pattern);
  }
  CATCH_REQUIRE(pair.native.deltas().at("d").attachments.size() == pair.traced.deltas().at("d").attachments.size());
  same_random_deltas(pair.native, pair.traced, f);
  return pair;
}

torch::Tensor named_parameter(torch::nn::Module& module, const std::string& name) {
  const auto parameters = module.named_parameters();  // find() points into this dict
  const auto* p = parameters.find(name);
  CATCH_INFO("parameter " << name);
  CATCH_REQUIRE(p != nullptr);
  return *p;
}

}  // namespace

CATCH_TEST_CASE("TorchScriptModel finds the native backbones' weight and sublayer sites under the archive's names",
                "[torchscript][golden]") {
  for (auto& f : fixtures()) {
    CATCH_INFO(f.label);
    std::set<std::string> native, traced;
    for (const auto& site : dt::find_sites(*f.native))
      if (site.kind == dt::Site::Kind::linear || site.kind == dt::Site::Kind::output)
        native.insert(f.prefix + site.name + " " + dt::to_string(site.kind));
    for (const auto& site : dt::find_sites(*f.traced)) traced.insert(site.name + " " + dt::to_string(site.kind));
    std::vector<std::string> only_native, only_traced;
    std::set_difference(native.begin(), native.end(), traced.begin(), traced.end(), std::back_inserter(only_native));
    std::set_difference(traced.begin(), traced.end(), native.begin(), native.end(), std::back_inserter(only_traced));
    CATCH_CHECK(only_traced.empty());
    CATCH_INFO("only native: " << fmt::format("{}", fmt::join(only_native, ", ")));
    // T5 v1.0 ties lm_head to the embeddings: the trace passes it the shared weight.
    CATCH_CHECK(only_native == (f.label == "t5 v1_0" ? std::vector<std::string>{"model.lm_head linear"}
                                                     : std::vector<std::string>{}));
    CATCH_CHECK(traced.count(f.prefix.empty() ? "bert.encoder.layer.0.attention.self.query linear"
                                              : "model.encoder.block.0.layer.0.SelfAttention.q linear"));
  }
}

CATCH_TEST_CASE("TorchScriptModel with no delta computes the archive's own outputs", "[torchscript][golden]") {
  for (auto& f : fixtures()) {
    CATCH_INFO(f.label);
    torch::NoGradGuard no_grad;
    check_close("logits", f.traced_logits(), f.native_logits());
  }
}

CATCH_TEST_CASE("Deltas on TorchScriptModel give the native outputs and gradients", "[torchscript][golden]") {
  for (auto& f : fixtures()) {
    for (const auto& method : methods()) {
      CATCH_INFO(f.label << ", " << method.label);
      torch::manual_seed(7);
      auto pair = attach(f, method);
      check_relative("logits", f.traced_logits(), f.native_logits(), 1e-5);

      const auto native_out = f.native_logits(), traced_out = f.traced_logits();
      const auto R = torch::randn_like(native_out);
      (native_out * R).sum().backward();
      (traced_out * R).sum().backward();
      const auto traced_params = by_name(pair.traced.named_delta_parameters("d"));
      for (const auto& [name, p] : pair.native.named_delta_parameters("d")) {
        const auto q = counterpart(traced_params, f, name);
        CATCH_REQUIRE(q.grad().defined());
        check_relative("grad of " + name, q.grad(), p.grad(), 1e-4);
      }
      // The backbone parameters a method trains (layer norms with adapters, BERT's LayerNorm
      // biases with BitFit) learn through the archive's graph too.
      for (const auto& name : pair.native.deltas().at("d").backbone_parameters) {
        const auto q = named_parameter(*f.traced, f.prefix + name);
        CATCH_REQUIRE(q.grad().defined());
        check_relative("grad of backbone " + name, q.grad(), named_parameter(*f.native, name).grad(), 1e-4);
      }
      pair.native.remove("d");
      pair.traced.remove("d");
      for (auto* model : {&pair.native, &pair.traced})
        for (auto& p : model->backbone().parameters()) p.mutable_grad() = torch::Tensor();
    }
  }
}

CATCH_TEST_CASE("Training a delta on TorchScriptModel leaves the archive's weights frozen, merging keeps the outputs",
                "[torchscript][golden]") {
  for (auto& f : fixtures()) {
    for (const auto& method : {methods()[0], methods()[1], methods()[2]}) {  // LoRA, IA3, BitFit (biases added on T5)
      CATCH_INFO(f.label << ", " << method.label);
      torch::manual_seed(11);
      auto pair = attach(f, method);
      const auto& first_site = pair.traced.deltas().at("d").attachments.front().site;
      const auto w_name = first_site.name + ".weight";
      auto w0 = first_site.linear->weight;
      const auto w0_before = w0.clone();
      CATCH_CHECK_FALSE(w0.requires_grad());

      auto trainable = pair.traced.trainable_parameters();
      std::vector<torch::Tensor> before;
      for (const auto& p : trainable) before.push_back(p.clone());
      torch::optim::AdamW optimizer(trainable, torch::optim::AdamWOptions(1e-2));
      f.traced_logits().square().mean().backward();
      optimizer.step();
      CATCH_CHECK(torch::equal(w0, w0_before));
      // Between forwards the archive holds W0 itself, the tensor a merge changes in place.
      for (const auto& p : f.traced->module().named_parameters())
        if (p.name == w_name) CATCH_CHECK(p.value.is_same(w0));
      bool changed = false;
      for (size_t i = 0; i < trainable.size(); ++i) changed |= !torch::equal(trainable[i], before[i]);
      CATCH_CHECK(changed);

      torch::NoGradGuard no_grad;
      const auto unmerged = f.traced_logits();
      pair.traced.merge("d");
      check_close("merged logits", f.traced_logits(), unmerged);
      if (method.label != "bitfit") CATCH_CHECK_FALSE(torch::equal(w0, w0_before));
      pair.traced.unmerge("d");
      check_close("unmerged weight", w0, w0_before);
      check_close("unmerged logits", f.traced_logits(), unmerged);
      pair.native.remove("d");
      pair.traced.remove("d");
    }
  }
}

// The archive loaded with its weights in bf16 (half the bytes): the graph under bf16 autocast,
// every method's deltas (and the backbone tensors a method trains) in float32, following the
// float32 archive's outputs and gradients within bf16's rounding (as the native backbones in
// precision_test.cpp).
CATCH_TEST_CASE("TorchScriptModel with bf16 weights trains float32 deltas that follow the float32 archive",
                "[torchscript][golden][precision]") {
  for (auto& f : fixtures()) {
    const auto bare = f.traced_logits().detach();
    auto bare_half = bb::load_torchscript_model(f.path, torch::kBFloat16);
    const double bare_error = dt::testing::relative_difference(f.logits_of(bare_half).to(torch::kFloat), bare);
    for (const auto& method : methods()) {
      CATCH_INFO(f.label << ", " << method.label << "; bf16 without a delta differs by " << bare_error);
      auto half = bb::load_torchscript_model(f.path, torch::kBFloat16);
      int64_t half_bytes = 0, full_bytes = 0;
      for (const auto& p : half->parameters()) half_bytes += int64_t(p.nbytes());
      for (const auto& p : f.traced->parameters()) full_bytes += int64_t(p.nbytes());
      CATCH_CHECK(2 * half_bytes == full_bytes);
      torch::manual_seed(7);
      auto pair = attach(f, method);
      dt::DeltaModel model(half);
      if (method.pattern.empty()) model.add("d", method.recipe());
      else model.add("d", method.recipe(), method.pattern);
      {
        torch::NoGradGuard no_grad;
        const auto theirs = pair.traced.named_trainable_parameters();
        auto ours = model.named_trainable_parameters();
        CATCH_REQUIRE(ours.size() == theirs.size());
        for (size_t i = 0; i < ours.size(); ++i) {
          CATCH_INFO(ours[i].first);
          CATCH_CHECK(ours[i].second.scalar_type() == torch::kFloat);
          ours[i].second.copy_(theirs[i].second);
        }
      }
      CATCH_CHECK(dt::frozen_dtype(*half) == torch::kBFloat16);
      const auto reference = f.traced_logits(), logits = f.logits_of(half);
      CATCH_CHECK(logits.scalar_type() == torch::kBFloat16);
      const double changed = dt::testing::relative_difference(reference, bare);
      const double error = dt::testing::relative_difference(logits.to(torch::kFloat), reference);
      CATCH_INFO("the delta changes the logits by " << changed << " of their scale; bf16 differs by " << error);
      // bf16's error is a small part of what the delta changes or, where the delta changes less
      // than bf16 rounds (IA3 on the tiny BERT), no more than half again the bare archive's.
      CATCH_CHECK(error < 0.05);
      CATCH_CHECK(error < std::max(0.25 * changed, 1.5 * bare_error));
      const auto R = torch::randn_like(reference);
      (reference * R).sum().backward();
      (logits.to(torch::kFloat) * R).sum().backward();
      std::vector<torch::Tensor> g, g_ref;
      const auto theirs = pair.traced.named_trainable_parameters();
      for (const auto& [name, p] : model.named_trainable_parameters()) {
        CATCH_INFO(name);
        CATCH_REQUIRE(p.grad().defined());
        g.push_back(p.grad().flatten().to(torch::kFloat64));
      }
      for (const auto& [name, p] : theirs) g_ref.push_back(p.grad().flatten().to(torch::kFloat64));
      const auto a = torch::cat(g), b = torch::cat(g_ref);
      const double cosine = (a * b).sum().item<double>() / (a.norm() * b.norm()).item<double>();
      CATCH_INFO("gradient cosine " << cosine);
      CATCH_CHECK(cosine > 0.99);
      pair.native.remove("d");
      pair.traced.remove("d");
      for (auto& p : pair.traced.backbone().parameters()) p.mutable_grad() = torch::Tensor();
    }
  }
}

// A mixed batch on an archive: each row as the whole batch gives it with only its delta
// active, as on the native backbones (the rewritten Linear layers and sublayer ends route
// rows through the native sites' code). A norm's deltas, rebound for the whole batch, are
// refused by name, and the model runs on after.
CATCH_TEST_CASE("TorchScriptModel routes a mixed batch's rows to their own deltas", "[torchscript][golden][routing]") {
  for (auto& f : fixtures()) {
    CATCH_INFO(f.label);
    dt::DeltaModel model(f.traced);
    torch::manual_seed(3);
    const std::vector<std::string> names{"lora", "ia3", "adapter"};
    model.add("lora", dt::LoRAOptions().r(4));
    model.add("ia3", dt::IA3Options());
    model.add("adapter", dt::houlsby_options());
    torch::NoGradGuard no_grad;
    for (auto& p : model.trainable_parameters()) p.add_(torch::randn_like(p) * 0.2);
    const auto unrouted = f.traced_logits();
    for (const std::vector<std::string>& routing :
         std::vector<std::vector<std::string>>{{"lora", "adapter", "__base__"}, {"ia3", "lora", "adapter"}}) {
      torch::Tensor mixed;
      {
        auto guard = model.route(routing);
        mixed = f.traced_logits();
      }
      for (size_t i = 0; i < routing.size(); ++i) {
        for (const auto& d : names) model.set_active(d, d == routing[i]);
        CATCH_INFO("row " << i << " (" << routing[i] << ")");
        check_relative("routed row", mixed[int64_t(i)], f.traced_logits()[int64_t(i)], 1e-5);
      }
      for (const auto& d : names) model.set_active(d, true);
    }
    if (f.prefix.empty()) continue;  // BERT's norms have biases: no norm sites
    model.add("bitfit", dt::BitFitOptions(), "re:.*layer_norm");
    {
      auto guard = model.route({"bitfit", "lora", "bitfit"});
      CATCH_CHECK_THROWS_WITH(f.traced_logits(), Catch::Contains("rows cannot be routed to delta 'bitfit'") &&
                                                     Catch::Contains("T5LayerNorm"));
    }
    model.remove("bitfit");
    CATCH_CHECK(torch::allclose(f.traced_logits(), unrouted));
  }
}

CATCH_TEST_CASE("TorchScriptModel refuses patterns that match none of its sites, naming the pattern",
                "[torchscript][golden]") {
  for (auto& f : fixtures()) {
    dt::DeltaModel model(f.traced);
    CATCH_REQUIRE_THROWS_WITH(model.add("d", dt::LoRAOptions(), "no_such_layer"),
                              Catch::Contains("pattern 'no_such_layer' matches no site that lora acts on"));
    CATCH_REQUIRE_THROWS_WITH(model.add("d", dt::houlsby_options(), "q|query"),
                              Catch::Contains("pattern 'q|query' matches") && Catch::Contains("acts on none of them"));
  }
}

CATCH_TEST_CASE("deltatune::deltatune links SentencePiece before LibTorch, the other order is refused by name",
                "[torchscript]") {
  // This binary links SentencePiece (the T5 tokenizer's tests use it) through deltatune's target.
  CATCH_REQUIRE(dt::detail::library_loaded("libsentencepiece.so.0"));
  CATCH_CHECK_THAT(dt::detail::defining_library("FLAGS_minloglevel"), Catch::Contains("libsentencepiece"));
  CATCH_CHECK_NOTHROW(dt::detail::check_link_order());
  // What a program linked torch-first would see.
  const std::string c10 = "/venv/lib/python3.11/site-packages/torch/lib/libc10.so";
  CATCH_CHECK_THROWS_WITH(dt::detail::check_link_order(true, c10),
                          Catch::Contains(c10) && Catch::Contains("link SentencePiece first"));
  CATCH_CHECK_NOTHROW(dt::detail::check_link_order(false, c10));
}

}  // namespace torchscript_model_test
