// Tests of methods/recipes.hpp: every method attached through DeltaModel::add at its
// default sites on tiny random T5 and BERT models, table-driven: identity at init where
// the method promises it, only the delta (and what the method trains) changes under an
// optimizer, merge equals unmerged, and save -> load into a fresh model gives equal outputs.
#include <deltatune/deltatune.hpp>

#include "test_support.hpp"

namespace dt = deltatune;
namespace bb = deltatune::backbones;

namespace {

// A tiny model of each family, rebuilt identically from a seed, and a batch to run it on.
struct Backbone {
  std::string name;
  std::function<std::shared_ptr<torch::nn::Module>()> build;
  std::function<torch::Tensor(torch::nn::Module&)> run;  // logits
};

// Two rows of token ids (B, T) = (2, 6), the second padded after 4 tokens; the same every call.
std::pair<torch::Tensor, torch::Tensor> batch() {
  torch::manual_seed(3);
  auto ids = torch::randint(2, 64, {2, 6});
  auto mask = torch::ones_like(ids);
  mask[1].slice(0, 4).zero_();
  return {ids, mask};
}

std::vector<Backbone> backbones() {
  return {
      {"t5",
       [] {
         torch::manual_seed(7);
         return bb::T5Model(bb::T5Config().vocab_size(64).d_model(16).d_kv(4).d_ff(32).num_layers(2).num_heads(4)
                                .relative_attention_num_buckets(8).feed_forward_proj("gated-gelu")
                                .tie_word_embeddings(false))
             .ptr();
       },
       [](torch::nn::Module& m) {
         auto [ids, mask] = batch();
         return dynamic_cast<bb::T5ModelImpl&>(m).forward(ids, mask, torch::randint(2, 64, {2, 3}), {}).logits;
       }},
      {"bert",
       [] {
         torch::manual_seed(7);
         return bb::BertForSequenceClassification(bb::BertConfig().vocab_size(64).hidden_size(16).num_hidden_layers(2)
                                                      .num_attention_heads(4).intermediate_size(32)
                                                      .max_position_embeddings(32).num_labels(3))
             .ptr();
       },
       [](torch::nn::Module& m) {
         auto [ids, mask] = batch();
         return dynamic_cast<bb::BertForSequenceClassificationImpl&>(m).forward(ids, mask).logits;
       }},
  };
}

struct Method {
  std::string name;
  std::function<std::shared_ptr<dt::DeltaRecipe>()> recipe;
  bool identity_at_init;
};

std::vector<Method> methods() {
  return {
      {"lora", [] { return dt::make_recipe(dt::LoRAOptions().r(2).alpha(4)); }, true},
      {"ia3", [] { return dt::make_recipe(dt::IA3Options()); }, true},
      {"bitfit", [] { return dt::make_recipe(dt::BitFitOptions()); }, true},
      {"houlsby", [] { return dt::make_recipe(dt::houlsby_options().reduction_factor(4)); }, false},
      {"pfeiffer", [] { return dt::make_recipe(dt::pfeiffer_options().reduction_factor(4)); }, false},
      {"phm_adapter", [] { return dt::make_recipe(dt::phm_adapter_options(0, 2).reduction_factor(4)); }, false},
      {"compacter", [] { return dt::make_recipe(dt::compacter_options().reduction_factor(4)); }, false},
      {"compacter++", [] { return dt::make_recipe(dt::compacter_plus_plus_options().reduction_factor(4)); }, false},
      {"prompt", [] { return dt::make_recipe(dt::PromptTuningOptions(3).init(dt::PromptInit::sampled_vocabulary).sample_top_k(64)); },
       false},
      {"prefix", [] { return dt::make_recipe(dt::PrefixTuningOptions(3).hidden(8)); }, false},
      {"spec", [] { return dt::make_recipe(dt::SpecTuningOptions().last_layers(1)); }, false},
  };
}

std::map<std::string, torch::Tensor> snapshot(torch::nn::Module& m) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : m.named_parameters()) out[p.key()] = p.value().detach().clone();
  return out;
}

}  // namespace

CATCH_TEST_CASE("every method attaches at its default sites on T5 and BERT, trains alone, merges and round-trips",
                "[methods][recipes][delta_model]") {
  for (const auto& backbone : backbones()) {
    for (const auto& method : methods()) {
      CATCH_SECTION(backbone.name + " " + method.name) {
        auto module = backbone.build();
        module->train();  // dropout off below: the checks compare exact outputs
        module->eval();
        dt::DeltaModel model(module);
        const auto before = backbone.run(*module).detach();
        torch::manual_seed(11);
        auto& entry = model.add("task", method.recipe());
        CATCH_CHECK(model.backbone_family() == backbone.name);
        CATCH_CHECK((entry.attachments.size() > 0 || method.name == "spec"));
        const auto at_init = backbone.run(*module).detach();
        if (method.identity_at_init) CATCH_CHECK(torch::equal(at_init, before));

        // Only what the delta trains moves; every other backbone value stays bit-identical.
        const auto frozen = snapshot(*module);
        std::set<std::string> trained(entry.backbone_parameters.begin(), entry.backbone_parameters.end());
        auto params = model.trainable_parameters();
        CATCH_REQUIRE_FALSE(params.empty());
        torch::optim::AdamW opt(params, torch::optim::AdamWOptions(1e-2));
        for (int step = 0; step < 2; ++step) {
          opt.zero_grad();
          backbone.run(*module).pow(2).mean().backward();
          opt.step();
        }
        for (const auto& p : module->named_parameters())
          if (!trained.count(p.key())) CATCH_CHECK(torch::equal(p.value(), frozen.at(p.key())));
        const auto tuned = backbone.run(*module).detach();
        CATCH_CHECK_FALSE(torch::equal(tuned, at_init));

        const auto mergeable = !entry.attachments.empty() && entry.attachments.front().delta->mergeable();
        if (mergeable) {
          model.merge("task");
          CATCH_CHECK(torch::allclose(backbone.run(*module), tuned, 1e-5, 1e-5));
          CATCH_REQUIRE_THROWS_WITH(model.merge("task"), Catch::Contains("already merged"));
          model.unmerge("task");
          CATCH_CHECK(torch::allclose(backbone.run(*module), tuned, 1e-5, 1e-5));
        }

        dt::testing::TempDir tmp;
        const auto dir = tmp.path.string();
        model.save("task", dir);
        auto fresh = backbone.build();
        fresh->eval();
        dt::DeltaModel reloaded(fresh);
        torch::manual_seed(99);  // other initial values: load must overwrite all of them
        reloaded.add("task", method.recipe());
        reloaded.load("task", dir);
        CATCH_CHECK(torch::allclose(backbone.run(*fresh), tuned, 1e-6, 1e-6));
      }
    }
  }
}

CATCH_TEST_CASE("DeltaModel combines deltas at once and in stages, and a pattern naming nothing lists close sites",
                "[methods][recipes][delta_model]") {
  torch::manual_seed(7);
  bb::T5Model t5(bb::T5Config().vocab_size(64).d_model(16).d_kv(4).d_ff(32).num_layers(2).num_heads(4)
                     .relative_attention_num_buckets(8));
  t5->eval();
  dt::DeltaModel model(t5);
  model.add("adapter", dt::houlsby_options().reduction_factor(4));
  model.add("bitfit", dt::BitFitOptions());
  model.add("prompt", dt::PromptTuningOptions(2));
  const auto all = model.num_trainable_parameters();
  model.freeze_delta("adapter");  // stage two: the adapter is kept, the others train
  CATCH_CHECK(model.num_trainable_parameters() < all);
  const auto summary = model.summary();
  CATCH_CHECK_THAT(summary, Catch::Contains("delta 'prompt': prompt_tuning on 1 sites, 32 parameters"));
  CATCH_CHECK_THAT(summary, Catch::Contains("SelfAttention"));
  CATCH_REQUIRE_THROWS_WITH(model.add("x", dt::LoRAOptions(), "SelfAttention.qq"),
                            Catch::Contains("matches no site that lora acts on") &&
                                Catch::Contains("encoder.block.0.layer.0.SelfAttention.q"));
  CATCH_REQUIRE_THROWS_WITH(model.merge("adapter"), Catch::Contains("cannot be merged"));
}
