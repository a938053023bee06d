// Layer-level golden tests: deltatune's methods against peft and adapters (fixtures from
// tools/golden/methods.py): same weights, same inputs, outputs and gradients within 1e-4 of the reference's scale.
#include <deltatune/deltatune.hpp>

#include "test_support.hpp"

namespace golden_methods_test {

namespace dt = deltatune;

namespace {

struct Golden {
  std::map<std::string, torch::Tensor> t;
  const torch::Tensor& at(const std::string& name) const {
    auto it = t.find(name);
    if (it == t.end()) throw std::runtime_error("golden fixture has no tensor " + name);
    return it->second;
  }
};

std::optional<Golden> load(const std::string& name) {
  auto dir = dt::testing::golden_dir("methods");
  if (!dir) return std::nullopt;
  return Golden{dt::read_safetensors((*dir / (name + ".safetensors")).string()).tensors};
}

// Copies every "param.<prefix><name>" into the module's parameter <name> (with `keep`,
// <prefix><name>): every one the fixture has must exist, with its shape.
void load_params(torch::nn::Module& m, const Golden& g, const std::string& prefix = "", bool keep = false) {
  torch::NoGradGuard no_grad;
  auto params = m.named_parameters();
  for (const auto& [key, value] : g.t) {
    if (key.rfind("param." + prefix, 0) != 0) continue;
    const auto name = key.substr(keep ? 6 : 6 + prefix.size());
    auto* p = params.find(name);
    CATCH_REQUIRE(p != nullptr);
    CATCH_REQUIRE(p->sizes() == value.sizes());
    p->copy_(value);
  }
}

void check_close(const torch::Tensor& actual, const torch::Tensor& expected, const std::string& what) {
  dt::testing::check_matches(actual, expected, what);
}

// y (the output) and the gradients of sum(y * R) of every parameter the fixture has.
void check_output_and_grads(const torch::Tensor& y, const Golden& g,
                            const std::vector<std::pair<std::string, torch::Tensor>>& params) {
  check_close(y, g.at("y"), "output");
  (y * g.at("R")).sum().backward();
  for (const auto& [name, p] : params) check_close(p.grad(), g.at("grad." + name), "gradient of " + name);
}

std::vector<std::pair<std::string, torch::Tensor>> named(torch::nn::Module& m, const std::string& prefix = "") {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& item : m.named_parameters()) out.emplace_back(prefix + item.key(), item.value());
  return out;
}

// A frozen Linear holding the reference's base weights.
dt::FrozenLinear base_linear(const Golden& g) {
  const auto& w = g.at("base.weight");
  dt::FrozenLinear base(w.size(1), w.size(0), true);
  torch::NoGradGuard no_grad;
  base->weight.copy_(w);
  base->bias.copy_(g.at("base.bias"));
  return base;
}

}  // namespace

CATCH_TEST_CASE("LoRA matches peft's LoraLayer", "[methods][golden][lora]") {
  for (const std::string name : {"lora", "rslora"}) {
    auto g = load(name);
    if (!g) return;
    auto base = base_linear(*g);
    auto lora = dt::LoRA(dt::LoRAOptions(8, 6).r(2).alpha(4).use_rslora(name == "rslora"));
    load_params(*lora, *g);
    base->deltas.attach(name, lora.ptr());
    check_output_and_grads(base(g->at("x")), *g, named(*lora));
  }
}

CATCH_TEST_CASE("IA3 matches peft's IA3Layer on keys and on the feed-forward output", "[methods][golden][ia3]") {
  for (const std::string name : {"ia3_k", "ia3_wo"}) {
    auto g = load(name);
    if (!g) return;
    auto base = base_linear(*g);
    const bool feedforward = name == "ia3_wo";
    auto ia3 = dt::IA3(dt::IA3Options(feedforward ? 8 : 6).feedforward(feedforward));
    load_params(*ia3, *g);
    base->deltas.attach("s", ia3.ptr());
    check_output_and_grads(base(g->at("x")), *g, named(*ia3));
  }
}

namespace {

void check_adapter(const std::string& name, dt::AdapterOptions options, bool shared_rule) {
  auto g = load(name);
  if (!g) return;
  auto shared = shared_rule ? dt::PHMSharedFactors(dt::PHMSharedFactorsOptions(options.phm_n())) : nullptr;
  auto adapter = dt::Adapter(options, shared);
  load_params(*adapter, *g, "adapter_", /*keep=*/true);  // the adapter's own parameters
  auto params = named(*adapter);
  if (shared_rule) {
    load_params(*shared, *g, "shared.");
    params.emplace_back("shared.phm_rule", shared->phm_rule);
  }
  torch::nn::LayerNorm ln(torch::nn::LayerNormOptions({options.d_model()}));
  {
    torch::NoGradGuard no_grad;
    ln->weight.copy_(g->at("ln.weight"));
    ln->bias.copy_(g->at("ln.bias"));
  }
  auto y = adapter->forward_sublayer(g->at("x"), g->at("residual"), [&](const torch::Tensor& t) { return ln(t); });
  check_output_and_grads(y, *g, params);
}

}  // namespace

CATCH_TEST_CASE("Adapters match adapters' Houlsby, Pfeiffer, PHM and Compacter layers", "[methods][golden][adapter]") {
  CATCH_SECTION("houlsby") { check_adapter("houlsby", dt::houlsby_options(16).reduction_factor(4), false); }
  CATCH_SECTION("pfeiffer") { check_adapter("pfeiffer", dt::pfeiffer_options(16).reduction_factor(4), false); }
  CATCH_SECTION("phm_adapter") {
    check_adapter("phm_adapter", dt::phm_adapter_options(16, 2).reduction_factor(4), false);
  }
  CATCH_SECTION("compacter") { check_adapter("compacter", dt::compacter_options(16).reduction_factor(2), true); }
  CATCH_SECTION("compacter++") {
    check_adapter("compacter_pp", dt::compacter_plus_plus_options(16).reduction_factor(2), true);
  }
}

CATCH_TEST_CASE("PrefixTuning's MLP matches peft's PrefixEncoder", "[methods][golden][prefix]") {
  auto g = load("prefix");
  if (!g) return;
  std::vector<std::string> sites = {"s0", "s1", "s2"};
  auto prefix = dt::PrefixTuning(dt::PrefixTuningOptions(3, 8, sites).hidden(10));
  load_params(*prefix, *g);
  check_output_and_grads(prefix->key_values(), *g, named(*prefix));
}

CATCH_TEST_CASE("PromptTuning matches peft's PromptEmbedding", "[methods][golden][prompt]") {
  auto g = load("prompt");
  if (!g) return;
  auto prompt = dt::PromptTuning(dt::PromptTuningOptions(4, 8));
  load_params(*prompt, *g);
  check_output_and_grads(prompt->prompt_embeddings(), *g, named(*prompt));
}

}  // namespace golden_methods_test
