// Tests of each method's recipe (methods/<name>.hpp): every method attached through DeltaModel::add at its
// default sites on tiny random T5 and BERT models, table-driven: identity at init where
// the method promises it, only the delta (and what the method trains) changes under an
// optimizer, merge equals unmerged, and save -> load into a fresh model gives equal outputs.
#include <deltatune/deltatune.hpp>

#include <fstream>

#include "test_support.hpp"

namespace recipes_test {

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
      {"dora", [] { return dt::make_recipe(dt::LoRAOptions().r(2).alpha(4).use_dora(true)); }, true},
      {"pissa", [] { return dt::make_recipe(dt::LoRAOptions().r(2).alpha(4).init("pissa")); }, true},
      {"olora", [] { return dt::make_recipe(dt::LoRAOptions().r(2).alpha(4).init("olora")); }, true},
      {"vera", [] { return dt::make_recipe(dt::VeRAOptions().r(4)); }, true},
      {"lokr", [] { return dt::make_recipe(dt::LoKrOptions().r(1).alpha(3).decompose_both(true)); }, true},
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
        CATCH_CHECK(model.model_type() == backbone.name);
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
          if (!trained.count(p.key()) && p.key().rfind("deltas.", 0) != 0)
            CATCH_CHECK(torch::equal(p.value(), frozen.at(p.key())));
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
        // Into a fresh backbone with no add (the method table rebuilds it), and with an add.
        auto fresh = backbone.build();
        fresh->eval();
        dt::DeltaModel reloaded(fresh);
        CATCH_CHECK(reloaded.load("task", dir).recipe->method() == entry.recipe->method());
        CATCH_CHECK(torch::allclose(backbone.run(*fresh), tuned, 1e-6, 1e-6));
        CATCH_CHECK(reloaded.num_trainable_parameters() == model.num_trainable_parameters());
        auto fresh_added = backbone.build();
        fresh_added->eval();
        dt::DeltaModel added(fresh_added);
        torch::manual_seed(99);  // other initial values: load must overwrite all of them
        added.add("task", method.recipe());
        added.load("task", dir);
        CATCH_CHECK(torch::allclose(backbone.run(*fresh_added), tuned, 1e-6, 1e-6));
      }
    }
  }
}

CATCH_TEST_CASE("the backbone's to() and eval() reach every method's deltas", "[methods][recipes][delta_model]") {
  for (const auto& backbone : backbones()) {
    for (const auto& method : methods()) {
      CATCH_SECTION(backbone.name + " " + method.name) {
        auto module = backbone.build();
        module->eval();
        dt::DeltaModel model(module);
        model.add("task", method.recipe());
        for (auto& p : model.trainable_parameters()) p.data().add_(torch::randn_like(p) * 0.1);  // away from init
        const auto float32 = backbone.run(*module).detach();
        module->to(torch::kFloat64);
        for (const auto& p : module->parameters()) CATCH_CHECK(p.scalar_type() == torch::kFloat64);
        const auto float64 = backbone.run(*module);
        CATCH_CHECK(float64.scalar_type() == torch::kFloat64);
        dt::testing::check_matches(float64.to(torch::kFloat32), float32, "float64 against float32 logits");
      }
    }
  }
  // LoRA's dropout follows the backbone's train() and eval(): 0.5 is random in training only.
  for (const auto& backbone : backbones()) {
    auto module = backbone.build();
    dt::DeltaModel model(module);
    model.add("task", dt::LoRAOptions().r(2).dropout(0.5));  // added while the backbone trains
    for (auto& p : model.trainable_parameters()) p.data().normal_();
    module->eval();
    const auto evaluated = backbone.run(*module).detach();
    CATCH_CHECK(torch::equal(backbone.run(*module), evaluated));
    model.deactivate("task");
    const auto bare = backbone.run(*module).detach();
    model.activate("task");
    CATCH_CHECK_FALSE(torch::allclose(evaluated, bare));
    auto& lora = model.deltas().at("task").attachments.front().delta->module();
    CATCH_CHECK_FALSE(lora.is_training());
    module->train();
    CATCH_CHECK(lora.is_training());
  }
}

CATCH_TEST_CASE("DeltaModel::load refuses a config edited against its tensors or against the delta here",
                "[methods][recipes][delta_model]") {
  const auto t5 = backbones().front();
  auto module = t5.build();
  dt::DeltaModel model(module);
  model.add("task", dt::LoRAOptions().r(2).alpha(8));
  dt::testing::TempDir tmp;
  const auto dir = tmp.path.string();
  model.save("task", dir);
  auto edit = [&](const std::string& field, const nlohmann::json& value) {
    auto config = nlohmann::json::parse(std::ifstream(dir + "/delta_config.json"));
    config["options"][field] = value;
    std::ofstream(dir + "/delta_config.json") << config.dump(2);
  };

  edit("alpha", 4);  // the delta here says 8
  auto same = t5.build();
  dt::DeltaModel added(same);
  added.add("task", dt::LoRAOptions().r(2).alpha(8));
  CATCH_REQUIRE_THROWS_WITH(added.load("task", dir), Catch::Contains("delta_config.json: delta 'task' here is not the "
                                                                     "saved one: option 'alpha' is 8.0 here, 4 in the file"));
  edit("alpha", 8);
  edit("r", 7);  // over tensors of rank 2
  auto fresh = t5.build();
  dt::DeltaModel rebuilt(fresh);
  CATCH_REQUIRE_THROWS_WITH(rebuilt.load("task", dir), Catch::Contains("delta.safetensors does not fit delta 'task'") &&
                                                           Catch::Contains("lora_A"));
  CATCH_CHECK(rebuilt.deltas().empty());
  edit("r", 1 << 16);  // a forged rank is refused before it allocates, not after, by the file's size
  CATCH_REQUIRE_THROWS_WITH(rebuilt.load("task", dir), Catch::Contains("delta_config.json: the saved \"options\" make "
                                                                       "no lora: LoRA: r = 65536") &&
                                                           Catch::Contains("parameters, more than the") &&
                                                           Catch::Contains("delta.safetensors holds for the whole delta"));
  CATCH_CHECK(rebuilt.deltas().empty());
  edit("r", "seven");
  CATCH_REQUIRE_THROWS_WITH(rebuilt.load("task", dir),
                            Catch::Contains("delta_config.json: \"options\": \"r\" is \"seven\", expected an integer"));
  edit("r", 2.7);  // not truncated to 2
  CATCH_REQUIRE_THROWS_WITH(rebuilt.load("task", dir), Catch::Contains("\"r\" is 2.7, expected an integer"));
  edit("r", -2);  // of the right type, but no LoRA's
  CATCH_REQUIRE_THROWS_WITH(rebuilt.load("task", dir), Catch::Contains("delta_config.json: the saved \"options\" make "
                                                                       "no lora: LoRA: option r (rank) must be positive"));
  CATCH_CHECK(rebuilt.deltas().empty());
  std::ofstream(dir + "/delta_config.json") << "[]";
  CATCH_REQUIRE_THROWS_WITH(rebuilt.load("task", dir),
                            Catch::Contains("delta_config.json: expected a JSON object, got array"));
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

namespace {

// One row of the default-sites table: a fixture row of tools/golden/peft_defaults.py and our
// options for the method, peft's defaults where they differ (peft trains a prefix's table
// directly: its prefix_projection is false).
struct DefaultRow {
  std::string name;
  std::function<std::shared_ptr<dt::DeltaRecipe>()> recipe;
};

std::vector<DefaultRow> default_rows() {
  std::vector<DefaultRow> rows;
  for (const std::string backbone : {"t5", "bert"}) {
    rows.push_back({backbone + "_lora", [] { return dt::make_recipe(dt::LoRAOptions()); }});
    rows.push_back({backbone + "_ia3", [] { return dt::make_recipe(dt::IA3Options()); }});
    rows.push_back({backbone + "_prompt", [] { return dt::make_recipe(dt::PromptTuningOptions(3)); }});
    rows.push_back({backbone + "_prefix", [] { return dt::make_recipe(dt::PrefixTuningOptions(3).prefix_projection(false)); }});
  }
  return rows;
}

std::vector<std::string> sorted(std::vector<std::string> names) {
  std::sort(names.begin(), names.end());
  return names;
}

}  // namespace

CATCH_TEST_CASE("add() with no pattern adapts peft's default sites, with peft's outputs and gradients",
                "[recipes][peft][golden]") {
  auto dir = dt::testing::golden_dir("peft_defaults");
  if (!dir) return;
  for (const auto& row : default_rows()) {
    CATCH_INFO("row " << row.name);
    const bool t5 = row.name.rfind("t5_", 0) == 0;
    std::shared_ptr<torch::nn::Module> backbone =
        t5 ? std::static_pointer_cast<torch::nn::Module>(bb::load_t5((*dir / "t5").string()).ptr())
           : std::static_pointer_cast<torch::nn::Module>(bb::load_bert((*dir / "bert").string()).ptr());
    dt::DeltaModel model(backbone);
    const auto& entry = model.add("default", row.recipe());
    const auto info = dt::read_json_file(*dir / (row.name + ".json"));

    std::vector<std::string> sites, feedforward;
    for (const auto& a : entry.attachments) {
      sites.push_back(a.site.name);
      if (auto* ia3 = dynamic_cast<dt::IA3Impl*>(a.delta.get()); ia3 && ia3->options.feedforward())
        feedforward.push_back(a.site.name);
    }
    CATCH_CHECK(sorted(sites) == sorted(info.at("sites")));
    CATCH_CHECK(sorted(feedforward) == sorted(info.value("feedforward", std::vector<std::string>{})));
    CATCH_CHECK(model.num_trainable_parameters() == info.at("read").get<int64_t>());

    // peft's delta values, through load_peft's own mapping of its file to our parameters.
    const dt::JsonFields config(dt::read_json_file(*dir / row.name / "adapter_config.json"), row.name);
    dt::detail::copy_peft_tensors(entry, config, (*dir / row.name / "adapter_model.safetensors").string());
    const auto io = dt::read_safetensors((*dir / (row.name + ".safetensors")).string()).tensors;
    torch::Tensor output, loss;
    if (t5) {
      auto out = dynamic_cast<bb::T5ModelImpl&>(*backbone).forward(io.at("input_ids"), io.at("attention_mask"), {},
                                                                   io.at("labels"));
      output = out.logits;
      loss = out.loss;
    } else {
      output = dynamic_cast<bb::BertModelImpl&>(*backbone).forward(io.at("input_ids"), io.at("attention_mask"))
                   .last_hidden_state;
      const auto& R = io.at("R");
      loss = (output.narrow(1, output.size(1) - R.size(1), R.size(1)) * R).sum();
    }
    dt::testing::check_matches(output, io.at(t5 ? "logits" : "last_hidden_state"), "output");
    dt::testing::check_matches(loss.reshape(1), io.at("loss"), "loss");
    loss.backward();
    for (const auto& target : dt::detail::peft_slots(entry, config))
      dt::testing::check_matches(target.target.grad(), target.convert(io.at("grad." + target.name)),
                                 "gradient of " + target.name);
  }
}

}  // namespace recipes_test
