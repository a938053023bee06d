// Tests of core/delta_model.hpp: patterns, freezing, activation, merging, summary and the
// delta-only checkpoint round trip, on a toy two-layer backbone with a toy low-rank delta.
#include <deltatune/core/delta_model.hpp>

#include <fstream>
#include <optional>
#include <set>

#include "test_support.hpp"

namespace delta_model_test {

namespace dt = deltatune;

namespace {

// x B A (a rank-1 low-rank delta), B zero at init so the model starts unchanged.
struct RankOneImpl : torch::nn::Module, dt::WeightDelta {
  RankOneImpl(int64_t in, int64_t out)
      : A(register_parameter("A", torch::randn({1, in}))), B(register_parameter("B", torch::zeros({out, 1}))) {}
  torch::Tensor A, B;
  std::string method() const override { return "rank_one"; }
  nlohmann::json options_json() const override { return {{"r", 1}}; }
  torch::nn::Module& module() override { return *this; }
  torch::Tensor delta_weight(const torch::Tensor&) override { return B.matmul(A); }
};

struct RankOneRecipe : dt::DeltaRecipe {
  explicit RankOneRecipe(int64_t r = 1) : r(r) {}  // r is only compared: the deltas are rank one
  std::string method() const override { return "rank_one"; }
  nlohmann::json options_json() const override { return {{"r", r}}; }
  bool accepts(dt::Site::Kind kind) const override { return kind == dt::Site::Kind::linear; }
  std::shared_ptr<dt::DeltaModule> make(const dt::Site& site) override {
    return std::make_shared<RankOneImpl>(site.linear->in_features, site.linear->out_features);
  }
  std::vector<std::string> select_backbone_parameters(const std::vector<std::string>& names) const override {
    std::vector<std::string> out;
    for (const auto& n : names)
      if (n.size() > 11 && n.compare(n.size() - 11, 11, "norm.weight") == 0) out.push_back(n);
    return out;
  }
  int64_t r;
};

// A method table that knows rank_one, as a program adds its own method.
dt::MethodTable rank_one_table() {
  return dt::MethodTable({{{"rank_one"},
                           [](const dt::JsonFields& j) { return std::make_shared<RankOneRecipe>(j.get<int64_t>("r")); },
                           {}}});
}

struct LayerImpl : torch::nn::Module, dt::OutputSite {
  dt::FrozenLinear query = register_module("query", dt::FrozenLinear(6, 6, true));
  dt::FrozenLinear value = register_module("value", dt::FrozenLinear(6, 6, true));
  torch::nn::LayerNorm norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({6})));
  torch::Tensor forward(const torch::Tensor& x) {
    return finish(value(torch::tanh(query(x))), x, [&](const torch::Tensor& t) { return norm(t); });
  }
};
TORCH_MODULE(Layer);

struct ToyBackboneImpl : torch::nn::Module {
  Layer layer0 = register_module("layer0", Layer()), layer1 = register_module("layer1", Layer());
  torch::Tensor forward(const torch::Tensor& x) { return layer1(layer0(x)); }
};
TORCH_MODULE(ToyBackbone);

}  // namespace

CATCH_TEST_CASE("DeltaModel attaches by glob, suffix and regex, and names the closest sites when nothing matches",
                "[core][delta_model]") {
  ToyBackbone backbone;
  dt::DeltaModel model(backbone);
  auto recipe = std::make_shared<RankOneRecipe>();
  CATCH_CHECK(model.add("a", recipe, "query").attachments.size() == 2);          // suffix, as peft
  CATCH_CHECK(model.add("b", recipe, "layer1.*").attachments.size() == 2);       // glob
  CATCH_CHECK(model.add("c", recipe, "re:layer0\\.(query|value)").attachments.size() == 2);
  CATCH_CHECK(model.add("d", recipe, "layer0.query|layer1.value").attachments.size() == 2);
  CATCH_REQUIRE_THROWS_WITH(model.add("e", recipe, "querry"),
                            Catch::Contains("pattern 'querry' matches no site that rank_one acts on") &&
                                Catch::Contains("layer0.query"));
  CATCH_REQUIRE_THROWS_WITH(model.add("e", recipe, "layer0"), Catch::Contains("(output), but rank_one acts on none"));
  CATCH_REQUIRE_THROWS_WITH(model.add("a", recipe, "query"), Catch::Contains("'a' exists already"));
  CATCH_REQUIRE_THROWS_WITH(model.add("e", recipe, "re:("), Catch::Contains("not a valid regular expression"));
  CATCH_REQUIRE_THROWS_WITH(model.remove("zz"), Catch::Contains("no delta named 'zz'; this model has: a, b, c, d"));
  model.remove("d");
  CATCH_CHECK(model.deltas().size() == 3);
}

CATCH_TEST_CASE("DeltaModel trains only the delta and what its method trains, merge, deactivate, save and load",
                "[core][delta_model]") {
  torch::manual_seed(1);
  ToyBackbone backbone;
  dt::DeltaModel model(backbone);
  auto x = torch::randn({4, 6});
  const auto before = backbone(x).detach();
  std::vector<torch::Tensor> frozen_before;
  for (const auto& p : backbone->named_parameters())
    if (p.key().find("norm.weight") == std::string::npos) frozen_before.push_back(p.value().clone());

  model.add("task", std::make_shared<RankOneRecipe>(), "query|value");
  CATCH_CHECK(torch::equal(backbone(x), before));  // B = 0: unchanged at step 0
  // 4 deltas x (6 + 6) plus the two layer norms' weights (6 each) that the method trains.
  CATCH_CHECK(model.num_trainable_parameters() == 4 * 12 + 2 * 6);

  torch::optim::Adam opt(model.trainable_parameters(), 1e-2);
  for (int step = 0; step < 5; ++step) {
    opt.zero_grad();
    (backbone(x) - 1).pow(2).mean().backward();
    opt.step();
  }
  const auto tuned = backbone(x).detach();
  CATCH_CHECK_FALSE(torch::allclose(tuned, before));
  size_t i = 0;
  for (const auto& p : backbone->named_parameters())
    if (p.key().find("norm.weight") == std::string::npos && p.key().rfind("deltas.", 0) != 0)
      CATCH_CHECK(torch::equal(p.value(), frozen_before[i++]));
  CATCH_CHECK(i == frozen_before.size());

  const auto summary = model.summary();
  CATCH_CHECK_THAT(summary, Catch::Contains("layer0\n  query [linear] task: rank_one (12 params)"));
  CATCH_CHECK_THAT(summary, Catch::Contains("trainable: 60 of 192 backbone parameters (31.2500%)"));
  CATCH_CHECK_THAT(summary, Catch::Contains("delta 'task': rank_one on 4 sites, 48 parameters + 12 backbone parameters it trains, active"));

  model.merge("task");
  CATCH_CHECK(torch::allclose(backbone(x), tuned, 1e-5, 1e-5));
  model.unmerge("task");
  model.deactivate("task");
  CATCH_CHECK(model.trainable_parameters().size() == 2);  // the layer norms alone
  model.activate("task");

  dt::testing::TempDir tmp;
  const auto dir = tmp.file("task");  // save() creates it
  model.save("task", dir);
  std::ifstream config(dir + "/delta_config.json");
  CATCH_CHECK(nlohmann::json::parse(config).at("sites").size() == 4);

  // Same backbone, no add: the method table rebuilds the delta from the files alone, and the
  // trained output comes back exactly.
  const auto methods = rank_one_table();
  torch::manual_seed(1);
  ToyBackbone same;
  dt::DeltaModel reloaded(same);
  CATCH_CHECK(reloaded.load("task", dir, methods).attachments.size() == 4);
  CATCH_CHECK(torch::allclose(same(x), tuned, 1e-6, 1e-6));
  CATCH_CHECK(reloaded.num_trainable_parameters() == 4 * 12 + 2 * 6);
  // Added first, the same way: load checks that it agrees, then fills it.
  torch::manual_seed(1);
  ToyBackbone same_added;
  dt::DeltaModel added(same_added);
  added.add("task", std::make_shared<RankOneRecipe>(), "query|value");
  added.load("task", dir, methods);
  CATCH_CHECK(torch::allclose(same_added(x), tuned, 1e-6, 1e-6));

  // Another backbone (other weights) is refused; so is a delta attached elsewhere, or one
  // whose options differ from the file's, naming what differs; nothing is left behind.
  torch::manual_seed(2);
  ToyBackbone other;
  dt::DeltaModel elsewhere(other);
  CATCH_REQUIRE_THROWS_WITH(elsewhere.load("task", dir, methods), Catch::Contains("trained on another backbone"));
  CATCH_CHECK(elsewhere.deltas().empty());
  torch::manual_seed(1);
  ToyBackbone same_again;
  dt::DeltaModel partial(same_again);
  partial.add("task", std::make_shared<RankOneRecipe>(), "query");
  CATCH_REQUIRE_THROWS_WITH(partial.load("task", dir, methods),
                            Catch::Contains("delta 'task' here is not the saved one") &&
                                Catch::Contains("sites differ: 2 here, 4 in the file"));
  partial.remove("task");
  partial.add("task", std::make_shared<RankOneRecipe>(2), "query|value");
  CATCH_REQUIRE_THROWS_WITH(partial.load("task", dir, methods), Catch::Contains("option 'r' is 2 here, 1 in the file"));
  partial.remove("task");
  CATCH_REQUIRE_THROWS_WITH(partial.load("task", dir, dt::MethodTable()),
                            Catch::Contains("method 'rank_one' is not in the method table"));
  CATCH_CHECK(partial.deltas().empty());
  CATCH_REQUIRE_THROWS_WITH(partial.load("task", "/nonexistent", methods), Catch::Contains("cannot open the delta's config"));
}

CATCH_TEST_CASE("DeltaModel puts the deltas in the backbone's module tree: to(), names, one model per backbone",
                "[core][delta_model]") {
  torch::manual_seed(1);
  ToyBackbone backbone;
  const auto x = torch::randn({3, 6});
  const auto bare = backbone(x).detach();
  std::optional<dt::DeltaModel> model(std::in_place, backbone);
  model->add("task", std::make_shared<RankOneRecipe>(), "query|value");
  for (auto& [key, p] : model->named_delta_parameters("task")) p.data().normal_();
  const auto tuned = backbone(x).detach();

  // Under stable names beside the checkpoint's own, which stay as they were.
  std::set<std::string> names;
  for (const auto& p : backbone->named_parameters()) names.insert(p.key());
  CATCH_CHECK(names.count("deltas.task.layer0.query.A"));
  CATCH_CHECK(names.count("deltas.task.layer1.value.B"));
  CATCH_CHECK(names.count("layer0.query.weight"));
  CATCH_CHECK(model->named_trainable_parameters().front().first == "deltas.task.layer0.query.A");
  CATCH_CHECK(model->num_backbone_parameters() == 192);

  // The backbone's to() reaches every delta: float64 in, float64 out, the same function.
  backbone->to(torch::kFloat64);
  for (const auto& p : model->trainable_parameters()) CATCH_CHECK(p.scalar_type() == torch::kFloat64);
  const auto y = backbone(x.to(torch::kFloat64));
  CATCH_CHECK(y.scalar_type() == torch::kFloat64);
  CATCH_CHECK(torch::allclose(y.to(torch::kFloat32), tuned, 1e-5, 1e-5));
  backbone->to(torch::kFloat32);

  // One DeltaModel per backbone; destroying it detaches its deltas (a merged one stays merged).
  CATCH_REQUIRE_THROWS_WITH(dt::DeltaModel(backbone), Catch::Contains("this backbone has a DeltaModel already"));
  model.reset();
  CATCH_CHECK(torch::allclose(backbone(x), bare));
  torch::Tensor merged_output;
  {
    dt::DeltaModel next(backbone);
    next.add("task", std::make_shared<RankOneRecipe>(), "query|value");
    for (auto& [key, p] : next.named_delta_parameters("task")) p.data().normal_();
    merged_output = backbone(x).detach();
    next.merge("task");
  }
  CATCH_CHECK(torch::allclose(backbone(x), merged_output, 1e-5, 1e-5));
  CATCH_CHECK_FALSE(torch::allclose(backbone(x), bare, 1e-3, 1e-3));
}

}  // namespace delta_model_test
