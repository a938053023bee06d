// Table-driven tests over every delta method: shapes, identity at init where promised,
// gradients only into the delta, merge, bad options, options round trips, the
// Compacter paper's parameter shares on T5-base shapes, and the spec selectors.
#include <ATen/record_function.h>
#include <deltatune/deltatune.hpp>

#include <set>

#include "test_support.hpp"

namespace methods_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;
using dt::testing::close;
using dt::testing::describe_difference;

namespace {

constexpr double kTol = 1e-5;

// Moves every parameter away from its init so that merge and gradients see a real delta.
void perturb(torch::nn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& p : m.parameters()) p.add_(torch::randn_like(p) * 0.1);
}

struct WeightCase {
  std::string name;
  bool identity_at_init;
  std::function<std::shared_ptr<dt::WeightDelta>(int64_t in, int64_t out)> make;
};

std::vector<WeightCase> weight_cases() {
  return {
      {"lora", true, [](int64_t in, int64_t out) { return dt::LoRA(dt::LoRAOptions(in, out).r(2).alpha(4)).ptr(); }},
      {"rslora", true,
       [](int64_t in, int64_t out) { return dt::LoRA(dt::LoRAOptions(in, out).r(4).use_rslora(true)).ptr(); }},
      {"bitfit", true, [](int64_t, int64_t out) { return dt::BitFit(dt::BitFitOptions(out)).ptr(); }},
      {"ia3", true, [](int64_t, int64_t out) { return dt::IA3(dt::IA3Options(out)).ptr(); }},
      {"ia3_feedforward", true,
       [](int64_t in, int64_t) { return dt::IA3(dt::IA3Options(in).feedforward(true)).ptr(); }},
      {"phm_linear", false, [](int64_t in, int64_t out) { return dt::PHMLinear(dt::PHMLinearOptions(in, out).n(2)).ptr(); }},
      {"lphm_linear", false,
       [](int64_t in, int64_t out) { return dt::PHMLinear(dt::PHMLinearOptions(in, out).n(4).rank(1)).ptr(); }},
  };
}

std::vector<torch::Tensor> snapshot(torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

bool bit_identical(torch::nn::Module& m, const std::vector<torch::Tensor>& before) {
  auto now = m.parameters();
  for (size_t i = 0; i < now.size(); ++i)
    if (!torch::equal(now[i], before[i])) return false;
  return true;
}

// Three AdamW steps on the delta's parameters (plus `extra`); the loss reaches the backbone too.
void train_steps(std::vector<torch::Tensor> params, const std::function<torch::Tensor()>& loss) {
  torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
  for (int step = 0; step < 3; ++step) {
    opt.zero_grad();
    loss().backward();
    opt.step();
  }
}

}  // namespace

CATCH_TEST_CASE("weight deltas: shapes, identity at init, merge, unmerge, gradients", "[methods][lora][bitfit][ia3][phm]") {
  for (const auto& c : weight_cases()) {
    CATCH_SECTION(c.name) {
      torch::manual_seed(0);
      dt::FrozenLinear base(8, 12, /*with_bias=*/true);
      {
        torch::NoGradGuard no_grad;
        base->bias.normal_();
      }
      auto delta = c.make(8, 12);
      // Output-scaling IA3 folds into the bias too: the injector hands it the frozen bias.
      if (auto* ia3 = dynamic_cast<dt::IA3Impl*>(delta.get())) ia3->bind_base_bias(base->bias);
      base->deltas.attach("d", delta);
      auto x = torch::randn({3, 5, 8});
      auto y0 = torch::nn::functional::linear(x, base->weight, base->bias);
      auto y = base(x);
      CATCH_CHECK(y.sizes() == torch::IntArrayRef({3, 5, 12}));
      if (c.identity_at_init) CATCH_CHECK(torch::equal(y, y0));
      else CATCH_CHECK_FALSE(torch::allclose(y, y0));

      perturb(delta->module());
      auto frozen = snapshot(*base);
      train_steps(delta->module().parameters(), [&] { return base(x).pow(2).mean(); });
      CATCH_CHECK(bit_identical(*base, frozen));
      CATCH_CHECK_FALSE(base->weight.grad().defined());
      for (auto& p : delta->module().parameters()) CATCH_CHECK(p.grad().defined());

      torch::NoGradGuard no_grad;
      auto unmerged = base(x);
      base->merge("d");
      auto merged = base(x);
      CATCH_INFO(describe_difference(merged, unmerged));
      CATCH_CHECK(close(merged, unmerged, {kTol, kTol}));
      CATCH_REQUIRE_THROWS_WITH(base->merge("d"), "delta 'd' is already merged into this layer");
      base->unmerge("d");
      CATCH_CHECK(bit_identical(*base, frozen));  // unmerge restores the copy merge kept
      CATCH_CHECK(close(base(x), unmerged, {kTol, kTol}));
    }
  }
}

// A weight delta's dropout while training (peft's lora_dropout, vera_dropout) in float64, against
// peft's formulas on x dropped out with the mask the delta draws (the same seed): LoRA s B A x_d,
// PiSSA s B A x_d - s B0 A0 x, DoRA (g - 1) W0 x_d + g s B A x_d with g = m / ||W0 + s B A||
// (one mask for both terms), VeRA b * (B (d * (A x_d))); none of it in eval().
CATCH_TEST_CASE("a weight delta's dropout drops its input once, with peft's formulas", "[methods][lora][vera]") {
  torch::manual_seed(41);
  const int64_t in = 12, out = 10;
  const double p = 0.25;
  const auto x = torch::randn({3, 5, in}, torch::kDouble);
  const auto W0 = torch::randn({out, in}, torch::kDouble);
  const auto y0 = torch::nn::functional::linear(x, W0);
  auto dropped = [&] {
    torch::manual_seed(43);
    return x * dt::detail::dropout_mask(x, p).to(torch::kDouble) / (1 - p);
  };
  auto product = [](const torch::Tensor& t, const torch::Tensor& A, const torch::Tensor& B) {
    return t.matmul(A.t()).matmul(B.t());
  };
  auto lora = [&](dt::LoRAOptions options) {
    auto lora = dt::LoRA(options.dropout(p));
    lora->to(torch::kDouble);
    perturb(*lora);
    if (lora->starts_from_weight()) lora->init_from_weight(W0);
    if (options.use_dora()) {
      lora->init_magnitude(W0);
      torch::NoGradGuard no_grad;
      lora->lora_magnitude_vector.mul_(1.5);
    }
    return lora;
  };
  auto vera = dt::VeRA(dt::VeRAOptions(in, out).r(4).dropout(p), dt::VeRAProjection(4, in, out, 0));
  vera->to(torch::kDouble);
  vera->projection->to(torch::kDouble);  // shared by a delta's layers, not one layer's submodule
  perturb(*vera);
  auto plain = lora(dt::LoRAOptions(in, out).r(3)), pissa = lora(dt::LoRAOptions(in, out).r(3).init("pissa")),
             dora = lora(dt::LoRAOptions(in, out).r(3).use_dora(true));
  const double s = plain->scaling();
  const auto dora_BA = s * dora->lora_B.mm(dora->lora_A);
  const auto g = dora->lora_magnitude_vector / (W0 + dora_BA).norm(2, 1);
  const std::vector<std::tuple<std::string, dt::WeightDelta*, std::function<torch::Tensor()>>> cases{
      {"LoRA", plain.get(), [&] { return s * product(dropped(), plain->lora_A, plain->lora_B); }},
      {"PiSSA", pissa.get(),
       [&] {
         return s *
                (product(dropped(), pissa->lora_A, pissa->lora_B) - product(x, pissa->lora_A_init, pissa->lora_B_init));
       }},
      {"DoRA", dora.get(),
       [&] {
         const auto x_d = dropped();
         return (g - 1) * x_d.matmul(W0.t()) + g * s * product(x_d, dora->lora_A, dora->lora_B);
       }},
      {"VeRA", vera.get(), [&] {
         return vera->vera_lambda_b *
                (vera->vera_lambda_d * dropped().matmul(vera->projection->vera_A.t())).matmul(vera->projection->vera_B.t());
       }}};
  for (const auto& [name, delta, reference] : cases) {
    CATCH_INFO(name);
    torch::NoGradGuard no_grad;
    delta->module().train();
    torch::manual_seed(43);
    const auto y = delta->delta_output(x, W0, torch::Tensor(), y0);
    const auto y_ref = reference();
    CATCH_INFO(describe_difference(y, y_ref));
    CATCH_CHECK(close(y, y_ref, dt::testing::tolerance_for(torch::kFloat64)));
    delta->module().eval();
    const auto evaluated = delta->delta_output(x, W0, torch::Tensor(), y0);
    CATCH_CHECK(torch::equal(evaluated, delta->delta_output(x, W0, torch::Tensor(), y0)));
    CATCH_CHECK_FALSE(torch::allclose(evaluated, y, 1e-3, 1e-3));  // the mask dropped something
  }
}

CATCH_TEST_CASE("BitFit adds zero biases where the backbone has none, and merges into a bias the layer gains",
                "[methods][bitfit]") {
  dt::FrozenLinear base(6, 4, /*with_bias=*/false);
  auto bitfit = dt::BitFit(dt::BitFitOptions(4));
  base->deltas.attach("b", bitfit.ptr());
  auto x = torch::randn({2, 6});
  CATCH_CHECK(torch::equal(base(x), torch::nn::functional::linear(x, base->weight)));
  {
    torch::NoGradGuard no_grad;
    bitfit->bias.normal_();
  }
  const auto tuned = base(x).detach();
  base->merge("b");
  CATCH_REQUIRE(base->bias.defined());
  CATCH_CHECK_FALSE(base->bias.requires_grad());
  CATCH_CHECK(torch::allclose(base(x), tuned, 1e-6, 1e-6));
  {
    torch::NoGradGuard no_grad;
    bitfit->bias.zero_();
  }
  auto h = torch::randn({2, 3, 4});
  CATCH_CHECK(torch::equal(bitfit->add_to(h), h));  // a layer norm's added bias, zero at init
}

CATCH_TEST_CASE("IA3 on a biased Linear scales the bias too when merged", "[methods][ia3]") {
  dt::FrozenLinear base(5, 3, true);
  {
    torch::NoGradGuard no_grad;
    base->bias.normal_();
  }
  auto ia3 = dt::IA3(dt::IA3Options(3));
  ia3->bind_base_bias(base->bias);
  perturb(*ia3);
  base->deltas.attach("s", ia3.ptr());
  auto x = torch::randn({4, 5});
  torch::NoGradGuard no_grad;
  auto expected = torch::nn::functional::linear(x, base->weight, base->bias) * ia3->ia3_l;
  CATCH_CHECK(close(base(x), expected, {kTol, kTol}));
  base->merge("s");
  CATCH_CHECK(close(base(x), expected, {kTol, kTol}));
}

namespace {

// Counts the calls of the named ATen operators while it lives, through RecordFunction
// callbacks as benchmarks/op_profile.hpp does.
class OpCount {
 public:
  explicit OpCount(std::set<std::string> names) {
    names_() = std::move(names);
    count() = 0;
    handle_ = at::addThreadLocalCallback(at::RecordFunctionCallback(&OpCount::enter).scopes({at::RecordScope::FUNCTION}));
  }
  ~OpCount() { at::removeCallback(handle_); }
  OpCount(const OpCount&) = delete;
  OpCount& operator=(const OpCount&) = delete;
  int64_t calls() const { return count(); }

 private:
  static int64_t& count() {
    thread_local int64_t n = 0;
    return n;
  }
  static std::set<std::string>& names_() {
    thread_local std::set<std::string> names;
    return names;
  }
  static std::unique_ptr<at::ObserverContext> enter(const at::RecordFunction& fn) {
    if (names_().count(fn.name())) ++count();
    return nullptr;
  }
  at::CallbackHandle handle_;
};

// The matrix products: what aten::linear and matmul end in.
const std::set<std::string> kProducts = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"};

}  // namespace

CATCH_TEST_CASE("IA3 on a feed-forward layer scales the frozen Linear's input: one product, the old sum's values",
                "[methods][ia3]") {
  // Two feed-forward IA3s and a LoRA on one biased Linear, in float64: (x * (l1 + l2 - 1)) W^T + b
  // plus LoRA's output must equal the additive form x W^T + b + sum of each delta_output.
  torch::manual_seed(5);
  dt::FrozenLinear base(6, 4, true);
  base->to(torch::kFloat64);
  {
    torch::NoGradGuard no_grad;
    base->bias.normal_();
  }
  auto ia3_a = dt::IA3(dt::IA3Options(6).feedforward(true)), ia3_b = dt::IA3(dt::IA3Options(6).feedforward(true));
  auto lora = dt::LoRA(dt::LoRAOptions(6, 4).r(2));
  for (auto* m : std::initializer_list<torch::nn::Module*>{ia3_a.get(), ia3_b.get(), lora.get()}) {
    m->to(torch::kFloat64);
    perturb(*m);
  }
  base->deltas.attach("a", ia3_a.ptr());
  base->deltas.attach("lora", lora.ptr());
  base->deltas.attach("b", ia3_b.ptr());
  auto x = torch::randn({3, 5, 6}, torch::kFloat64).requires_grad_(true);
  auto R = torch::randn({3, 5, 4}, torch::kFloat64);
  const std::vector<torch::Tensor> inputs = {x, ia3_a->ia3_l, ia3_b->ia3_l, lora->lora_A, lora->lora_B};
  auto y = base(x);
  auto grads = torch::autograd::grad({(y * R).sum()}, inputs);
  auto y0 = torch::nn::functional::linear(x, base->weight, base->bias);
  auto old = y0 + ia3_a->delta_output(x, base->weight, base->bias, y0) +
             lora->delta_output(x, base->weight, base->bias, y0) + ia3_b->delta_output(x, base->weight, base->bias, y0);
  auto old_grads = torch::autograd::grad({(old * R).sum()}, inputs);
  CATCH_CHECK((y - old).abs().max().item<double>() < 1e-12);
  for (size_t i = 0; i < inputs.size(); ++i) {
    CATCH_INFO("gradient " << i);
    CATCH_CHECK((grads[i] - old_grads[i]).abs().max().item<double>() < 1e-12);
  }

  // Alone on a layer, forward is one product, as the bare layer.
  base->deltas.detach("lora");
  base->deltas.detach("b");
  torch::NoGradGuard no_grad;
  OpCount count(kProducts);
  base(x);
  CATCH_CHECK(count.calls() == 1);
}

CATCH_TEST_CASE("IA3 at peft's sites adds no matrix product to a T5's forward", "[methods][ia3]") {
  torch::manual_seed(3);
  auto t5 = dt::backbones::T5Model(dt::backbones::T5Config().vocab_size(40).d_model(16).d_kv(4).d_ff(32).num_layers(2)
                                       .num_heads(4).relative_attention_num_buckets(8).dropout_rate(0));
  dt::DeltaModel model(t5);
  model.add("ia3", dt::IA3Options());  // k, v (output scaling) and wo (input scaling) in every block
  auto ids = torch::randint(2, 40, {2, 5}), decoder_ids = torch::randint(2, 40, {2, 3});
  torch::NoGradGuard no_grad;
  auto products = [&] {
    OpCount count(kProducts);
    t5->forward(ids, {}, decoder_ids, {});
    return count.calls();
  };
  const auto with_ia3 = products();
  model.deactivate("ia3");
  CATCH_CHECK(with_ia3 == products());
}

namespace {

struct ActivationCase {
  std::string name;
  std::function<dt::Adapter(dt::PHMSharedFactors)> make;
};

std::vector<ActivationCase> activation_cases() {
  const int64_t d = 16;
  return {
      {"houlsby", [=](dt::PHMSharedFactors) { return dt::Adapter(dt::houlsby_options(d).reduction_factor(4)); }},
      {"pfeiffer", [=](dt::PHMSharedFactors) { return dt::Adapter(dt::pfeiffer_options(d).reduction_factor(4)); }},
      {"phm_adapter", [=](dt::PHMSharedFactors) { return dt::Adapter(dt::phm_adapter_options(d, 2).reduction_factor(4)); }},
      {"compacter", [=](dt::PHMSharedFactors s) { return dt::Adapter(dt::compacter_options(d).reduction_factor(2), s); }},
      {"compacter++",
       [=](dt::PHMSharedFactors s) { return dt::Adapter(dt::compacter_plus_plus_options(d).reduction_factor(2), s); }},
  };
}

}  // namespace

CATCH_TEST_CASE("activation deltas: shapes, placement, gradients only into the delta", "[methods][adapter][compacter]") {
  for (const auto& c : activation_cases()) {
    CATCH_SECTION(c.name) {
      torch::manual_seed(1);
      auto shared = dt::PHMSharedFactors(dt::PHMSharedFactorsOptions(4));
      auto adapter = c.make(shared);
      const bool plain = c.name == "houlsby" || c.name == "pfeiffer";
      CATCH_CHECK(adapter->method() == (plain ? "adapter" : c.name));
      // A frozen sublayer: body Linear, residual, layer norm.
      dt::FrozenLinear body(16, 16, true);
      torch::nn::LayerNorm ln(torch::nn::LayerNormOptions({16}));
      dt::freeze(*ln);
      auto x = torch::randn({2, 3, 16});
      auto sublayer = [&] {
        auto h = body(x);
        return adapter->forward_sublayer(h, x, [&](const torch::Tensor& t) { return ln(t); });
      };
      CATCH_CHECK(sublayer().sizes() == x.sizes());

      // The placement, written out.
      torch::Tensor expected;
      {
        auto h = body(x);
        if (adapter->options.placement() == dt::AdapterPlacement::houlsby)
          expected = ln(h + adapter->bottleneck_forward(h) + x);
        else
          expected = ln(h + adapter->bottleneck_forward(ln(h + x)) + x);
      }
      CATCH_CHECK(close(sublayer(), expected, {kTol, kTol}));

      // Linear adapters are near-identity: |f(h)| is about std^2 * d * m of |h|.
      if (adapter->options.phm_n() == 0) {
        auto h = torch::randn({4, 16});
        CATCH_CHECK((adapter->forward(h) - h).abs().max().item<double>() < 1e-2);
      }

      auto params = adapter->parameters();
      const bool uses_shared = adapter->options.phm_rank() > 0;
      if (uses_shared) params.push_back(shared->phm_rule);
      auto frozen = snapshot(*body);
      auto frozen_ln = snapshot(*ln);
      train_steps(params, [&] { return sublayer().pow(2).mean(); });
      CATCH_CHECK(bit_identical(*body, frozen));
      CATCH_CHECK(bit_identical(*ln, frozen_ln));
      for (auto& p : params) CATCH_CHECK(p.grad().defined());
    }
  }
}

CATCH_TEST_CASE("Compacter layers share one rule A, counted once", "[methods][compacter]") {
  auto shared = dt::PHMSharedFactors(dt::PHMSharedFactorsOptions(4));
  auto a = dt::Adapter(dt::compacter_options(256), shared);
  auto b = dt::Adapter(dt::compacter_plus_plus_options(256), shared);
  CATCH_CHECK(a->bottleneck() == 8);
  CATCH_CHECK(a->adapter_down->rule().is_same(b->adapter_up->rule()));
  for (const auto& item : a->named_parameters()) CATCH_CHECK(item.key().find("phm_rule") == std::string::npos);
  // Own rule (PHM-Adapter): initialised N(0, 0.01); shared: N(0, 1e-4).
  CATCH_CHECK(shared->phm_rule.abs().max().item<double>() < 1e-3);
  auto own = dt::Adapter(dt::phm_adapter_options(256, 4));
  CATCH_CHECK(own->adapter_down->phm_rule.defined());
}

CATCH_TEST_CASE("bad options are refused with the option and value named", "[methods][options]") {
  CATCH_REQUIRE_THROWS_WITH(dt::LoRA(dt::LoRAOptions(8, 8).r(0)), "LoRA: option r (rank) must be positive, got 0");
  CATCH_REQUIRE_THROWS_WITH(dt::LoRA(dt::LoRAOptions(8, 8).dropout(1.5)), "LoRA: option dropout must be in [0, 1), got 1.5");
  CATCH_REQUIRE_THROWS_WITH(dt::LoRA(dt::LoRAOptions(8, 8).init("loftq")),
                            "LoRA: option init must be \"lora\", \"pissa\" or \"olora\", got \"loftq\"");
  CATCH_REQUIRE_THROWS_WITH(dt::LoRA(dt::LoRAOptions(8, 6).r(7).init("olora")),
                            "LoRA: init \"olora\" takes r = 7 components of a 6 x 8 weight, which has at most 6");
  CATCH_REQUIRE_THROWS_WITH(dt::LoRA(dt::LoRAOptions(8, 8).init("pissa").use_dora(true)),
                            Catch::Contains("init \"pissa\" with use_dora is not supported"));
  CATCH_REQUIRE_THROWS_WITH(dt::VeRAProjection(0, 8, 8, 0),
                            "VeRA: r and the layers' sizes must be positive, got r = 0 on 8 x 8");
  CATCH_REQUIRE_THROWS_WITH(dt::VeRA(dt::VeRAOptions(16, 8).r(4), dt::VeRAProjection(4, 8, 8, 0)),
                            "VeRA: a 8 x 16 layer at r = 4 needs shared projections at least that large");
  CATCH_REQUIRE_THROWS_WITH(dt::LoKr(dt::LoKrOptions(8, 8).r(0)), "LoKr: option r (rank) must be positive, got 0");
  CATCH_REQUIRE_THROWS_WITH(dt::LoKr(dt::LoKrOptions(8, 8).decompose_factor(0)),
                            Catch::Contains("LoKr: option decompose_factor must be -1") && Catch::Contains("got 0"));
  CATCH_REQUIRE_THROWS_WITH(dt::LoKr(dt::LoKrOptions(8, 8).rank_dropout(1)),
                            "LoKr: option rank_dropout must be in [0, 1), got 1");
  CATCH_REQUIRE_THROWS_WITH(dt::LoKr(dt::LoKrOptions(8, 8).init("random")),
                            "LoKr: option init must be \"peft\" or \"lycoris\", got \"random\"");
  CATCH_REQUIRE_THROWS_WITH(dt::PHMLinear(dt::PHMLinearOptions(10, 8).n(4)),
                            "PHMLinear: option n = 4 must divide in_features = 10 and out_features = 8");
  CATCH_REQUIRE_THROWS_WITH(dt::PHMLinear(dt::PHMLinearOptions(8, 8).n(0)), "PHMLinear: option n must be positive, got 0");
  CATCH_REQUIRE_THROWS_WITH(dt::PHMLinear(dt::PHMLinearOptions(8, 8).n(2), dt::PHMSharedFactors(dt::PHMSharedFactorsOptions(4))),
                            "PHMLinear: option n = 2 differs from the shared factors' n = 4");
  CATCH_REQUIRE_THROWS_WITH(dt::Adapter(dt::compacter_options(64)),
                            "PHMLinear: option n = 4 must divide in_features = 64 and out_features = 2");
  CATCH_REQUIRE_THROWS_WITH(dt::Adapter(dt::AdapterOptions(16).non_linearity("sigmoid")),
                            "Adapter: option non_linearity 'sigmoid' is not one of relu, gelu, gelu_new, swish, silu, tanh");
  CATCH_REQUIRE_THROWS_WITH(dt::IA3(dt::IA3Options(0)), "IA3: option features must be positive, got 0");
  CATCH_REQUIRE_THROWS_WITH(dt::BitFit(dt::BitFitOptions(-1)), "BitFit: option features must be positive, got -1");
  CATCH_REQUIRE_THROWS_WITH(dt::PromptTuning(dt::PromptTuningOptions(0, 8)),
                            "PromptTuning: option num_virtual_tokens must be positive, got 0");
  CATCH_REQUIRE_THROWS_WITH(dt::PromptTuning(dt::PromptTuningOptions(2, 8).init(dt::PromptInit::sampled_vocabulary)),
                            "PromptTuning: option init sampled_vocabulary needs the (vocabulary, d_model = 8) embedding table; got none");
  CATCH_REQUIRE_THROWS_WITH(dt::PrefixTuning(dt::PrefixTuningOptions(2, 8, {})),
                            "PrefixTuning: option sites is empty; name the attention sites");
  CATCH_REQUIRE_THROWS_WITH(dt::select_parameters(std::vector<std::string>{}, dt::SpecTuningOptions().last_layers(-2)),
                            "SpecTuning: option last_layers must not be negative, got -2");
  // A weight delta on a layer of another size says which size.
  dt::FrozenLinear base(4, 6, false);
  auto ia3 = dt::IA3(dt::IA3Options(5));
  CATCH_REQUIRE_THROWS_WITH(ia3->delta_weight(base->weight), "IA3: the layer's out_features is 6 but option features is 5");
}

CATCH_TEST_CASE("options_json round-trips for every method", "[methods][options]") {
  auto lora = dt::LoRA(dt::LoRAOptions(8, 4).r(2).alpha(16).dropout(0.1).use_rslora(true));
  CATCH_CHECK(dt::LoRA(dt::lora_options_from_json({lora->options_json(), "test"}))->options_json() == lora->options_json());
  auto ia3 = dt::IA3(dt::IA3Options(8).feedforward(true));
  CATCH_CHECK(dt::IA3(dt::ia3_options_from_json({ia3->options_json(), "test"}))->options_json() == ia3->options_json());
  auto bitfit = dt::BitFit(dt::BitFitOptions(3));
  CATCH_CHECK(dt::BitFit(dt::bitfit_options_from_json({bitfit->options_json(), "test"}))->options_json() == bitfit->options_json());
  auto phm = dt::PHMLinear(dt::PHMLinearOptions(8, 4).n(2).rank(1).path(dt::KronSumPath::factored));
  CATCH_CHECK(dt::PHMLinear(dt::phm_linear_options_from_json({phm->options_json(), "test"}))->options_json() == phm->options_json());
  auto adapter = dt::Adapter(dt::pfeiffer_options(32).bottleneck(8).phm_n(2));
  CATCH_CHECK(dt::Adapter(dt::adapter_options_from_json({adapter->options_json(), "test"}))->options_json() == adapter->options_json());
  auto prompt = dt::PromptTuning(dt::PromptTuningOptions(3, 4).init(dt::PromptInit::token_ids).init_token_ids({1, 2}),
                                 torch::randn({5, 4}));
  const auto prompt_options = dt::prompt_tuning_options_from_json({prompt->options_json(), "test"});
  CATCH_CHECK(dt::PromptTuning(prompt_options, torch::randn({5, 4}))->options_json() == prompt->options_json());
  auto prefix = dt::PrefixTuning(dt::PrefixTuningOptions(2, 8, {"a", "b"}).inner(4).hidden(6));
  CATCH_CHECK(dt::PrefixTuning(dt::prefix_tuning_options_from_json({prefix->options_json(), "test"}))->options_json() ==
              prefix->options_json());
  auto spec = dt::SpecTuningOptions().last_layers(2).modules({"*.q.weight"}).layer_norms(true);
  CATCH_CHECK(dt::spec_tuning_options_json(dt::spec_tuning_options_from_json({dt::spec_tuning_options_json(spec), "test"})) ==
              dt::spec_tuning_options_json(spec));

  // Each field's JSON type is checked, naming the file and the field: nothing truncated, no nlohmann exception.
  auto edited = [&](const std::string& field, const nlohmann::json& value) {
    auto j = lora->options_json();
    j[field] = value;
    return dt::JsonFields(j, "saved.json");
  };
  CATCH_CHECK_THROWS_WITH(dt::lora_options_from_json(edited("r", 2.7)), "saved.json: \"r\" is 2.7, expected an integer");
  CATCH_CHECK_THROWS_WITH(dt::lora_options_from_json(edited("use_rslora", "yes")),
                          "saved.json: \"use_rslora\" is \"yes\", expected true or false");
  CATCH_CHECK_THROWS_WITH(dt::lora_options_from_json(edited("r", nullptr)), "saved.json: the field \"r\" is missing");
  CATCH_CHECK_THROWS_WITH(dt::lora_options_from_json(edited("alpha", std::numeric_limits<double>::infinity())), Catch::Contains("expected a finite number"));
  CATCH_CHECK_THROWS_WITH(dt::lora_options_from_json(edited("r", 9223372036854775808u)),
                          Catch::Contains("expected an integer"));
  CATCH_CHECK_THROWS_AS(dt::lora_options_from_json({nlohmann::json::array(), "saved.json"}), dt::CheckpointError);
}

CATCH_TEST_CASE("spec tuning refuses a pattern that is no regex, or whose group is no layer index", "[methods][options]") {
  const std::vector<std::string> names{"encoder.layer.0.dense.weight", "encoder.layer.1.dense.weight"};
  CATCH_CHECK_THROWS_WITH(dt::select_parameters(names, dt::SpecTuningOptions().last_layers(1).layer_pattern("([")),
                          Catch::Contains("SpecTuning: option layer_pattern '([' is not a regular expression"));
  CATCH_CHECK_THROWS_WITH(dt::select_parameters(names, dt::SpecTuningOptions().layer_norms(true).layer_norm_pattern("*")),
                          Catch::Contains("option layer_norm_pattern '*'"));
  CATCH_CHECK_THROWS_WITH(
      dt::select_parameters(names, dt::SpecTuningOptions().last_layers(1).layer_pattern(R"(^(encoder)\.(layer))")),
      Catch::Contains("second group caught 'layer' in 'encoder.layer.0.dense.weight', not a layer index"));
  CATCH_CHECK(dt::select_parameters(names, dt::SpecTuningOptions().last_layers(1)) ==
              std::vector<std::string>{"encoder.layer.1.dense.weight"});
}

CATCH_TEST_CASE("delta modules refuse sizes past the machine's memory before allocating", "[methods][options]") {
  const int64_t huge = int64_t(1) << 50;
  auto refused = [](const std::function<void()>& make, const std::string& what) {
    CATCH_CHECK_THROWS_WITH(make(), Catch::Contains(what) && Catch::Contains("GiB of memory"));
  };
  refused([&] { dt::LoRA(dt::LoRAOptions(512, 512).r(huge)); }, "LoRA: r = 1125899906842624 on a 512 x 512 layer needs");
  refused([&] { dt::Adapter(dt::houlsby_options(512).bottleneck(huge)); }, "Adapter: a bottleneck of 1125899906842624");
  refused([&] { dt::PromptTuning(dt::PromptTuningOptions(huge, 512)); }, "PromptTuning: 1125899906842624 prompts");
  refused([&] { dt::PrefixTuning(dt::PrefixTuningOptions(huge, 512, {"a"}).inner(64)); }, "PrefixTuning:");
  refused([&] { dt::PHMLinear(dt::PHMLinearOptions(512, 512).n(4).rank(huge)); }, "PHMLinear: n = 4");
}

CATCH_TEST_CASE("prompt tuning: P embeddings from the vocabulary or uniform", "[methods][prompt]") {
  auto vocabulary = torch::randn({10, 4});
  auto text = dt::PromptTuning(dt::PromptTuningOptions(5, 4).init(dt::PromptInit::token_ids).init_token_ids({7, 2}),
                               vocabulary);
  CATCH_CHECK(text->prompt_embeddings().sizes() == torch::IntArrayRef({5, 4}));
  CATCH_CHECK(torch::equal(text->embedding[0], vocabulary[7]));
  CATCH_CHECK(torch::equal(text->embedding[3], vocabulary[2]));  // ids repeated to P
  auto sampled = dt::PromptTuning(
      dt::PromptTuningOptions(6, 4).init(dt::PromptInit::sampled_vocabulary).sample_top_k(3), vocabulary);
  for (int64_t i = 0; i < 6; ++i) {
    auto row = sampled->embedding[i];
    CATCH_CHECK((torch::equal(row, vocabulary[0]) || torch::equal(row, vocabulary[1]) || torch::equal(row, vocabulary[2])));
  }
  auto uniform = dt::PromptTuning(dt::PromptTuningOptions(50, 4));
  CATCH_CHECK(uniform->embedding.abs().max().item<double>() <= 0.5);
  CATCH_CHECK(uniform->num_virtual_tokens() == 50);
  // Gradients reach the prompt, not the vocabulary it came from.
  auto frozen = vocabulary.clone();
  train_steps({text->embedding}, [&] { return torch::cat({text->prompt_embeddings(), vocabulary}).pow(2).sum(); });
  CATCH_CHECK(torch::equal(vocabulary, frozen));
  CATCH_CHECK_FALSE(torch::equal(text->embedding[0], vocabulary[7]));
}

CATCH_TEST_CASE("prefix tuning: keys and values per site, through the MLP, then ejected", "[methods][prefix]") {
  const std::vector<std::string> sites = {"encoder.block.0.layer.0.SelfAttention",
                                          "decoder.block.0.layer.0.SelfAttention",
                                          "decoder.block.0.layer.1.EncDecAttention"};
  auto prefix = dt::PrefixTuning(dt::PrefixTuningOptions(3, 8, sites).inner(6).hidden(10));
  CATCH_CHECK(prefix->key_values().sizes() == torch::IntArrayRef({3, 3 * 2 * 6}));
  for (size_t i = 0; i < sites.size(); ++i) {
    auto [key, value] = prefix->prefix_key_value(sites[i]);
    CATCH_CHECK(key.sizes() == torch::IntArrayRef({3, 6}));
    auto all = prefix->key_values().detach();
    CATCH_CHECK(torch::equal(key.detach(), all.slice(1, 12 * i, 12 * i + 6)));
    CATCH_CHECK(torch::equal(value.detach(), all.slice(1, 12 * i + 6, 12 * i + 12)));
  }
  CATCH_CHECK_FALSE(prefix->prefix_key_value("encoder.block.1.layer.0.SelfAttention").first.defined());

  train_steps(prefix->parameters(), [&] {
    auto [k, v] = prefix->prefix_key_value(sites[2]);
    return (k * v).sum();
  });
  for (auto& p : prefix->parameters()) CATCH_CHECK(p.grad().defined());

  auto before = prefix->key_values().detach().clone();
  const auto mlp_params = prefix->parameters().size();
  prefix->eject();
  CATCH_CHECK(mlp_params == 5);
  CATCH_CHECK(prefix->parameters().size() == 1);
  CATCH_CHECK(prefix->num_parameters() == 3 * 36);
  CATCH_CHECK(torch::equal(prefix->key_values(), before));
  CATCH_CHECK(prefix->options_json()["prefix_projection"] == false);
}

CATCH_TEST_CASE("prefix tuning runs its MLP once per forward pass, and afresh outside one", "[methods][prefix]") {
  const std::vector<std::string> sites = {"encoder.block.0.layer.0.SelfAttention",
                                          "decoder.block.0.layer.0.SelfAttention",
                                          "decoder.block.0.layer.1.EncDecAttention"};
  auto prefix = dt::PrefixTuning(dt::PrefixTuningOptions(3, 8, sites).inner(6).hidden(10));
  const auto params = prefix->parameters();
  auto grads = [&](const torch::Tensor& loss) {
    prefix->zero_grad();
    loss.backward();
    std::vector<torch::Tensor> out;
    for (const auto& p : params) out.push_back(p.grad().clone());
    return out;
  };
  // Two passes in a row, each backpropagated: the gradients of the MLP's table used directly.
  for (int pass = 0; pass < 2; ++pass) {
    prefix->begin_pass();
    auto loss = torch::zeros({});
    for (const auto& site : sites) {
      auto [k, v] = prefix->prefix_key_value(site);
      loss = loss + (k * v).sum();
    }
    prefix->end_pass();
    const auto cached = grads(loss);
    auto kv = prefix->key_values().view({3, 3, 2, 6});  // (P, L, 2, inner)
    const auto direct = grads((kv.select(2, 0) * kv.select(2, 1)).sum());
    for (size_t i = 0; i < params.size(); ++i) CATCH_CHECK(torch::allclose(cached[i], direct[i], 1e-5, 1e-6));
  }
  auto step = [&] {
    torch::NoGradGuard no_grad;
    for (auto& p : prefix->parameters()) p.add_(0.5);
  };
  // One table serves the sites of a pass, nested passes included; the next pass computes anew.
  prefix->begin_pass();
  prefix->begin_pass();
  const auto first = prefix->prefix_key_value(sites[0]).first;
  prefix->end_pass();
  CATCH_CHECK(first._base().is_same(prefix->prefix_key_value(sites[1]).first._base()));
  prefix->end_pass();
  step();
  prefix->begin_pass();
  CATCH_CHECK(torch::equal(prefix->prefix_key_value(sites[2]).first.detach(),
                           prefix->key_values().detach().slice(1, 24, 30)));
  prefix->end_pass();
  // Outside a pass every call computes afresh: a step in place shows at once.
  step();
  CATCH_CHECK(torch::equal(prefix->prefix_key_value(sites[2]).first.detach(),
                           prefix->key_values().detach().slice(1, 24, 30)));
  CATCH_CHECK_FALSE(prefix->prefix_key_value(sites[0]).first._base().is_same(prefix->prefix_key_value(sites[1]).first._base()));
}

CATCH_TEST_CASE("spec-based selectors: last layers, chosen names, layer norms", "[methods][spec]") {
  const std::vector<std::string> names = {
      "shared.weight",
      "encoder.block.0.layer.0.SelfAttention.q.weight",
      "encoder.block.0.layer.0.layer_norm.weight",
      "encoder.block.1.layer.1.DenseReluDense.wi.weight",
      "encoder.block.2.layer.0.SelfAttention.q.weight",
      "encoder.final_layer_norm.weight",
      "decoder.block.0.layer.2.DenseReluDense.wo.weight",
      "decoder.block.1.layer.1.EncDecAttention.k.weight",
      "encoder.layer.3.attention.output.LayerNorm.bias",
      "encoder.layer.4.output.dense.bias",
  };
  using V = std::vector<std::string>;
  // Per stack: encoder.block ends at 2, decoder.block at 1, BERT's encoder.layer at 4.
  CATCH_CHECK(dt::select_parameters(names, dt::SpecTuningOptions().last_layers(1)) ==
              V{"encoder.block.2.layer.0.SelfAttention.q.weight", "decoder.block.1.layer.1.EncDecAttention.k.weight",
                "encoder.layer.4.output.dense.bias"});
  CATCH_CHECK(dt::select_parameters(names, dt::SpecTuningOptions().modules({"*.SelfAttention.q.*", "shared.*"})) ==
              V{"shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
                "encoder.block.2.layer.0.SelfAttention.q.weight"});
  CATCH_CHECK(dt::select_parameters(names, dt::SpecTuningOptions().layer_norms(true)) ==
              V{"encoder.block.0.layer.0.layer_norm.weight", "encoder.final_layer_norm.weight",
                "encoder.layer.3.attention.output.LayerNorm.bias"});
  CATCH_CHECK(dt::select_parameters(names, dt::SpecTuningOptions()).empty());
}

namespace {

// T5-base from its shapes: d_model 768, d_ff 3072, 12 + 12 layers, 12 heads x 64,
// vocabulary 32128 (shared embeddings tied to the LM head), 32 relative-position buckets.
struct T5Shapes {
  int64_t d = 768, d_ff = 3072, layers = 12, vocab = 32128, heads = 12, buckets = 32;
  int64_t backbone() const {
    const int64_t attention = 4 * d * d, ffn = 2 * d * d_ff;
    const int64_t encoder = layers * (attention + ffn + 2 * d) + heads * buckets + d;
    const int64_t decoder = layers * (2 * attention + ffn + 3 * d) + heads * buckets + d;
    return vocab * d + encoder + decoder;
  }
  int64_t layer_norms() const { return (2 * layers + 3 * layers + 2) * d; }
};

// Adapters over T5: after self-attention and feed-forward in every encoder and decoder
// block (houlsby: 48 on T5-base; adapters adds none after cross-attention), or after the
// feed-forward block only (pfeiffer: 24). Each counted by building it.
int64_t adapter_parameters(const dt::AdapterOptions& options, const T5Shapes& t5, dt::PHMSharedFactors shared) {
  dt::Adapter one(options, shared);
  const int64_t per_block = options.placement() == dt::AdapterPlacement::houlsby ? 2 : 1;
  return 2 * t5.layers * per_block * one->num_parameters();
}

}  // namespace

CATCH_TEST_CASE("parameter shares on T5-base shapes match the Compacter paper", "[methods][compacter][counts]") {
  const T5Shapes t5;
  CATCH_CHECK(t5.backbone() == 222903552);
  auto shared = dt::PHMSharedFactors(dt::PHMSharedFactorsOptions(4));
  const auto percent = [&](int64_t trained) { return std::round(1e5 * double(trained) / t5.backbone()) / 1e3; };
  // Compacter and Compacter++: one shared A (64) plus the layer norms, trained with them.
  const int64_t compacter = adapter_parameters(dt::compacter_options(768), t5, shared) + 64 + t5.layer_norms();
  const int64_t compacter_pp = adapter_parameters(dt::compacter_plus_plus_options(768), t5, shared) + 64 + t5.layer_norms();
  // PHM-Adapter, n = 12: each PHM layer owns its A (12^3), full B.
  const int64_t phm_adapter = adapter_parameters(dt::phm_adapter_options(768, 12), t5, nullptr) + t5.layer_norms();
  CATCH_CHECK(compacter == 161728);
  CATCH_CHECK(compacter_pp == 104704);
  CATCH_CHECK(phm_adapter == 398976);
  CATCH_CHECK(percent(compacter) == 0.073);
  CATCH_CHECK(percent(compacter_pp) == 0.047);
  CATCH_CHECK(percent(phm_adapter) == 0.179);
}

CATCH_TEST_CASE("a prefix through its MLP is computed once per forward pass, opened by the backbone",
                "[methods][prefix]") {
  // A ReLU T5 has no tanh of its own: each aten::tanh is one run of the prefix's MLP.
  torch::manual_seed(3);
  bb::T5Model t5(bb::T5Config().vocab_size(64).d_model(16).d_kv(4).d_ff(32).num_layers(2).num_heads(4)
                     .relative_attention_num_buckets(8));
  dt::DeltaModel model(t5);
  model.add("prefix", dt::PrefixTuningOptions(3).hidden(8), "re:.*Attention");  // all 6 attention layers
  const auto ids = torch::randint(2, 64, {2, 5}), labels = torch::randint(2, 64, {2, 3});
  torch::optim::AdamW opt(model.trainable_parameters(), torch::optim::AdamWOptions(1e-2));
  torch::Tensor previous;
  for (int step = 0; step < 2; ++step) {
    OpCount tanh({"aten::tanh"});
    opt.zero_grad();
    const auto out = t5->forward(ids, {}, {}, labels);
    CATCH_CHECK(tanh.calls() == 1);  // encoder and decoder: one pass of the model
    out.loss.backward();
    opt.step();
    if (previous.defined()) CATCH_CHECK_FALSE(torch::equal(out.logits, previous));  // the step's new prefix is used
    previous = out.logits.detach();
  }
  t5->eval();
  {
    OpCount tanh({"aten::tanh"});
    t5->generate_greedy(ids, {}, 4);
    CATCH_CHECK(tanh.calls() == 1);  // one pass for the whole generation
  }
  // Values changed where autograd's version counters do not see it (through .data()): the next
  // pass computes from them, as nothing is kept from the last one.
  const auto before = t5->forward(ids, {}, {}, labels).logits.detach();
  for (auto& p : model.trainable_parameters()) p.data().add_(1.0);
  CATCH_CHECK_FALSE(torch::allclose(t5->forward(ids, {}, {}, labels).logits, before));
}

}  // namespace methods_test
