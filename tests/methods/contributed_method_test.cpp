// CONTRIBUTING.md's add-a-method checklist, followed in this one file for a throwaway method,
// "outer" (dW = s b a^T on Linear sites, b zero at init): its options, module, recipe with
// default sites per model_type, JSON round trip and method-table row. Then end to end on a
// tiny BERT: add at the default sites, one training step, save, load into a fresh backbone
// with no add (the table rebuilds it), merge.
#include <deltatune/deltatune.hpp>

#include <cmath>

#include "test_support.hpp"

namespace contributed_method_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;

namespace {

// 1. Options, LibTorch style: sizes 0 until the recipe takes them from each site.
struct OuterOptions {
  OuterOptions(int64_t in_features = 0, int64_t out_features = 0) : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(double, scale) = 1.0;
};

// 2. The module: a weight delta, so DeltaModel can also merge it.
class OuterImpl : public torch::nn::Cloneable<OuterImpl>, public dt::WeightDelta {
 public:
  explicit OuterImpl(OuterOptions options) : options(std::move(options)) { reset(); }
  void reset() override {
    a = register_parameter("a", torch::randn({options.in_features()}) / std::sqrt(double(options.in_features())));
    b = register_parameter("b", torch::zeros({options.out_features()}));
  }
  std::string method() const override { return "outer"; }
  nlohmann::json options_json() const override {
    return {{"in_features", options.in_features()}, {"out_features", options.out_features()}, {"scale", options.scale()}};
  }
  torch::nn::Module& module() override { return *this; }
  torch::Tensor delta_weight(const torch::Tensor& /*base_weight*/) override { return torch::outer(b, a) * options.scale(); }

  OuterOptions options;
  torch::Tensor a, b;
};
TORCH_MODULE(Outer);

// 3. The recipe: site kind, default sites per backbone model_type, options as JSON.
class OuterRecipe : public dt::RecipeBase<OuterOptions> {
 public:
  explicit OuterRecipe(OuterOptions options)
      : RecipeBase(std::move(options), dt::Site::Kind::linear, {{"t5", "o"}, {"bert", "attention.output.dense"}}) {}
  std::string method() const override { return "outer"; }
  nlohmann::json options_json() const override { return {{"scale", options.scale()}}; }
  std::shared_ptr<dt::DeltaModule> make(const dt::Site& site) override {
    return Outer(OuterOptions(site.linear->in_features, site.linear->out_features).scale(options.scale())).ptr();
  }
};

// 4. make_recipe, so that model.add(name, OuterOptions()) works.
std::shared_ptr<dt::DeltaRecipe> make_recipe(const OuterOptions& o) { return std::make_shared<OuterRecipe>(o); }

// 5. The table row: saved name, JSON back to a recipe, command-line preset with its learning rates.
dt::MethodInfo outer_method_info() {
  return {{"outer"},
          [](const dt::JsonFields& j) { return make_recipe(OuterOptions().scale(j.get<double>("scale"))); },
          {{"outer", "rank-one outer product on attention outputs", {{"t5", 1e-3}, {"bert", 2e-3}},
            [](const dt::PresetSizes&) { return make_recipe(OuterOptions()); }}}};
}

bb::BertForSequenceClassification tiny_bert() {
  torch::manual_seed(7);
  bb::BertForSequenceClassification bert(bb::BertConfig().vocab_size(64).hidden_size(16).num_hidden_layers(2)
                                             .num_attention_heads(4).intermediate_size(32)
                                             .max_position_embeddings(32).num_labels(3));
  bert->eval();
  return bert;
}

}  // namespace

CATCH_TEST_CASE("a method added through the checklist in one file trains, saves, loads with no add and merges",
                "[methods][method_table]") {
  auto methods = dt::builtin_methods();
  methods.add(outer_method_info());
  CATCH_CHECK(methods.preset("outer").lr("bert") == 2e-3);
  CATCH_REQUIRE_THROWS_WITH(methods.add(outer_method_info()), Catch::Contains("method 'outer' is in the table already"));

  const auto ids = torch::randint(2, 64, {2, 5});
  auto bert = tiny_bert();
  dt::DeltaModel model(bert);
  CATCH_CHECK(model.add("task", OuterOptions().scale(2.0)).attachments.size() == 2);  // BERT's default: 2 layers
  const auto at_init = bert->forward(ids).logits.detach();
  torch::optim::AdamW opt(model.trainable_parameters(), torch::optim::AdamWOptions(1e-2));
  bert->forward(ids).logits.pow(2).mean().backward();
  opt.step();
  const auto tuned = bert->forward(ids).logits.detach();
  CATCH_CHECK_FALSE(torch::allclose(tuned, at_init));

  dt::testing::TempDir tmp;
  model.save("task", tmp.path.string());
  auto fresh = tiny_bert();
  dt::DeltaModel reloaded(fresh);
  CATCH_REQUIRE_THROWS_WITH(reloaded.load("task", tmp.path.string()),
                            Catch::Contains("method 'outer' is not in the method table"));
  const auto& entry = reloaded.load("task", tmp.path.string(), methods);
  CATCH_CHECK(entry.recipe->options_json() == nlohmann::json{{"scale", 2.0}});
  CATCH_CHECK(torch::equal(fresh->forward(ids).logits, tuned));
  reloaded.merge("task");
  dt::testing::check_matches(fresh->forward(ids).logits, tuned, "merged against unmerged logits");
}

}  // namespace contributed_method_test
