// formats/adapters.hpp against the adapters library, whole models: tiny T5 and BERT with
// adapters' Houlsby, Pfeiffer, PHM and Compacter(++) adapters (tools/golden/adapters_models.py),
// loaded from adapters' own files; logits and the gradients of every adapter tensor within
// 1e-4 of the reference's scale. Also writes our own saves for tools/adapters_roundtrip.py (ctest runs it next), and
// checks the errors.
#include <deltatune/deltatune.hpp>
#include <deltatune/formats/adapters.hpp>

#include "test_support.hpp"

namespace adapters_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;
namespace fs = std::filesystem;

namespace {

const std::vector<std::string> kCases = {"houlsby", "pfeiffer", "phm", "phm_shared", "compacter", "compacter_pp"};

// A backbone from the fixture's hf/ folder and its forward on the fixture's batch.
struct Backbone {
  std::shared_ptr<torch::nn::Module> module;
  std::function<torch::Tensor()> logits;
};

Backbone load_backbone(const std::string& model, const fs::path& dir) {
  const auto io = dt::read_safetensors((dir / "io.safetensors").string()).tensors;
  if (model == "t5") {
    auto t5 = bb::load_t5((dir / "hf").string());
    t5->eval();
    return {t5.ptr(), [=]() mutable {
              return t5->forward(io.at("input_ids"), io.at("attention_mask"), io.at("decoder_input_ids")).logits;
            }};
  }
  auto bert = bb::load_bert_classifier((dir / "hf").string());
  bert->eval();
  return {bert.ptr(), [=]() mutable {
            return bert->forward(io.at("input_ids"), io.at("attention_mask"), io.at("token_type_ids")).logits;
          }};
}

void check_close(const torch::Tensor& actual, const torch::Tensor& expected, const std::string& what) {
  dt::testing::check_matches(actual, expected, what);
}

// Copies a fixture's adapter folder to `to`, file by file.
void copy_folder(const fs::path& from, const fs::path& to) {
  fs::create_directories(to);
  for (const auto& e : fs::directory_iterator(from)) fs::copy_file(e.path(), to / e.path().filename());
}

}  // namespace

CATCH_TEST_CASE("adapters' whole-model adapters load and match its logits and gradients", "[formats][adapters][golden]") {
  auto root = dt::testing::golden_dir("adapters_models");
  if (!root) return;
  const std::map<std::string, std::string> methods = {{"houlsby", "adapter"},      {"pfeiffer", "adapter"},
                                                      {"phm", "phm_adapter"},      {"phm_shared", "phm_adapter"},
                                                      {"compacter", "compacter"}, {"compacter_pp", "compacter++"}};
  for (const std::string model_name : {"t5", "bert"}) {
    for (const auto& c : kCases) {
      CATCH_INFO(model_name << " " << c);
      const auto dir = *root / model_name;
      auto backbone = load_backbone(model_name, dir);
      dt::DeltaModel model(backbone.module);
      const auto& entry = dt::load_adapters(model, (dir / c).string());
      CATCH_CHECK(entry.recipe->method() == methods.at(c));
      const auto golden = dt::read_safetensors((dir / (c + ".safetensors")).string()).tensors;
      auto logits = backbone.logits();
      check_close(logits, golden.at("logits"), "logits");
      (logits * golden.at("R")).sum().backward();
      const auto state = dt::adapters_state_dict(model, c);
      size_t grads = 0;
      for (const auto& [key, g] : golden) grads += key.rfind("grad.", 0) == 0;
      CATCH_CHECK(state.size() == grads);  // every tensor adapters has, and no other
      for (const auto& [key, p] : state) check_close(p.grad(), golden.at("grad." + key), "gradient of " + key);

      // Our save of changed weights, for tools/adapters_roundtrip.py; and back in C++.
      torch::manual_seed(5);
      {
        torch::NoGradGuard no_grad;
        for (auto& [key, p] : state) p.add_(torch::randn_like(p), 0.1);
      }
      const auto out = dt::testing::python_check_dir("DELTATUNE_ADAPTERS_ROUNDTRIP_DIR", "adapters_roundtrip") /
                       model_name / c;
      dt::save_adapters(model, c, out.string());
      torch::NoGradGuard no_grad;
      const auto ours = backbone.logits();
      dt::write_safetensors((out.parent_path() / (c + ".safetensors")).string(), {{"logits", ours}});
      auto again = load_backbone(model_name, dir);
      dt::DeltaModel reloaded(again.module);
      dt::load_adapters(reloaded, out.string());
      CATCH_CHECK(torch::equal(again.logits(), ours));
    }
  }
}

CATCH_TEST_CASE("adapters' configs become the matching AdapterOptions and back", "[formats][adapters]") {
  const auto compacter = dt::compacter_options();
  const auto config = dt::adapters_bn_config(compacter, 768);
  CATCH_CHECK(config.at("mh_adapter") == true);
  CATCH_CHECK(config.at("phm_layer") == true);
  CATCH_CHECK(config.at("factorized_phm_W") == true);
  CATCH_CHECK(config.at("shared_phm_rule") == true);
  const auto back = dt::adapter_options_from_adapters({config, "test"}, 768);
  CATCH_CHECK(back.phm_n() == 4);
  CATCH_CHECK(back.phm_rank() == 1);
  CATCH_CHECK(back.reduction_factor() == 32);
  CATCH_CHECK(back.non_linearity() == "gelu");
  const auto pfeiffer = dt::adapter_options_from_adapters(
      {dt::adapters_bn_config(dt::pfeiffer_options().bottleneck(48), 768), "test"}, 768);
  CATCH_CHECK(pfeiffer.placement() == dt::AdapterPlacement::pfeiffer);
  CATCH_CHECK(pfeiffer.reduction_factor() == 16);
  // A float reduction factor sizes the bottleneck as adapters does: int(d // rf).
  auto float_rf = config;
  float_rf["reduction_factor"] = 10.5;
  CATCH_CHECK(dt::adapter_options_from_adapters({float_rf, "test"}, 768).bottleneck() == 73);
  CATCH_REQUIRE_THROWS_WITH(dt::adapters_bn_config(dt::houlsby_options().bottleneck(7), 768),
                            Catch::Contains("bottleneck 7 does not divide the width 768"));
}

CATCH_TEST_CASE("adapters-format errors name the key, the tensor and the file", "[formats][adapters][golden]") {
  auto root = dt::testing::golden_dir("adapters_models");
  if (!root) return;
  const auto source = *root / "bert" / "houlsby";
  dt::testing::TempDir tmp;
  auto edited = [&](const std::string& folder, const std::function<void(nlohmann::json&)>& edit) {
    const auto dir = tmp.path / folder;
    copy_folder(source, dir);
    auto config = dt::read_json_file(dir / "adapter_config.json");
    edit(config);
    std::ofstream(dir / "adapter_config.json") << config.dump();
    return dir.string();
  };
  auto fresh = [&] { return load_backbone("bert", *root / "bert"); };
  auto backbone = fresh();
  dt::DeltaModel model(backbone.module);

  CATCH_SECTION("wrong architecture") {
    const auto dir = edited("lora", [](auto& c) { c["config"]["architecture"] = "lora"; });
    CATCH_REQUIRE_THROWS_WITH(dt::load_adapters(model, dir), Catch::Contains("architecture \"lora\""));
  }
  CATCH_SECTION("unsupported option") {
    const auto dir = edited("parallel", [](auto& c) { c["config"]["is_parallel"] = true; });
    CATCH_REQUIRE_THROWS_WITH(dt::load_adapters(model, dir), Catch::Contains("is_parallel = true is not supported"));
    const auto ln = edited("ln", [](auto& c) { c["config"]["original_ln_before"] = true; });
    CATCH_REQUIRE_THROWS_WITH(dt::load_adapters(model, ln), Catch::Contains("original_ln_before = true"));
  }
  CATCH_SECTION("fields of the wrong type or past any size") {
    const auto rf = edited("rf", [](auto& c) { c["config"]["reduction_factor"] = 1e-300; });
    CATCH_REQUIRE_THROWS_WITH(dt::load_adapters(model, rf),
                              Catch::Contains("\"reduction_factor\" is 1e-300") && Catch::Contains("bottleneck between 1"));
    const auto ln = edited("ln_text", [](auto& c) { c["config"]["original_ln_before"] = "yes"; });
    CATCH_REQUIRE_THROWS_WITH(dt::load_adapters(model, ln),
                              Catch::Contains("\"original_ln_before\" is \"yes\", expected true or false"));
    const auto hidden = edited("hidden", [](auto& c) { c.erase("hidden_size"); });
    CATCH_REQUIRE_THROWS_WITH(dt::load_adapters(model, hidden), Catch::Contains("the field \"hidden_size\" is missing"));
    CATCH_CHECK(model.deltas().empty());
  }
  CATCH_SECTION("another model type") {
    const auto dir = edited("t5", [](auto& c) { c["model_type"] = "t5"; });
    CATCH_REQUIRE_THROWS_WITH(dt::load_adapters(model, dir), Catch::Contains("model_type is \"t5\""));
  }
  const std::string key = "bert.encoder.layer.1.output.adapters.houlsby.adapter_up.weight";
  auto edit_weights = [&](const std::function<void(std::map<std::string, torch::Tensor>&)>& edit) {
    const auto dir = edited("weights", [](auto&) {});
    auto tensors = dt::read_safetensors(dir + "/adapter.safetensors").tensors;
    edit(tensors);
    dt::write_safetensors(dir + "/adapter.safetensors", tensors);
    return dir;
  };
  CATCH_SECTION("missing tensor") {
    const auto dir = edit_weights([&](auto& t) { t.erase(key); });
    CATCH_REQUIRE_THROWS_WITH(dt::load_adapters(model, dir), Catch::Contains("missing (1): " + key));
  }
  CATCH_SECTION("shape mismatch") {
    const auto dir = edit_weights([&](auto& t) { t[key] = torch::zeros({16, 3}); });
    CATCH_REQUIRE_THROWS_WITH(dt::load_adapters(model, dir),
                              Catch::Contains("mismatched (1): " + key + " (file Float [16, 3], model Float [16, 4])"));
  }
  CATCH_SECTION("pickle only") {
    const auto dir = edited("pickle", [](auto&) {});
    fs::remove(dir + "/adapter.safetensors");
    std::ofstream(dir + "/pytorch_adapter.bin") << "pickle";
    CATCH_REQUIRE_THROWS_WITH(dt::load_adapters(model, dir), Catch::Contains("use_safetensors=True"));
  }
  CATCH_SECTION("a LoRA delta is not an adapter") {
    model.add("lora", dt::LoRAOptions().r(2));
    CATCH_REQUIRE_THROWS_WITH(dt::save_adapters(model, "lora", tmp.file("out")),
                              Catch::Contains("delta 'lora' is a lora"));
  }
  CATCH_CHECK(model.deltas().count("houlsby") == 0);  // a refused load leaves nothing attached
}

}  // namespace adapters_test
