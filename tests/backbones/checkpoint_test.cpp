// Tests of backbones/checkpoint.hpp: Hugging Face folders (whole, sharded, F16/BF16), TorchScript
// archives, name mapping, and one error that lists every mismatch. Tiny tensors, no Python.
#include <deltatune/backbones/checkpoint.hpp>
#include <deltatune/backbones/t5.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "test_support.hpp"

namespace checkpoint_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

// A module with names as a backbone's: "proj.weight" (2, 3), "proj.bias" (2), "norm.weight" (2).
struct TinyImpl : torch::nn::Module {
  TinyImpl() {
    proj = register_module("proj", torch::nn::Linear(3, 2));
    norm = register_module("norm", torch::nn::LayerNorm(torch::nn::LayerNormOptions({2}).elementwise_affine(true)));
  }
  torch::nn::Linear proj{nullptr};
  torch::nn::LayerNorm norm{nullptr};
};
TORCH_MODULE(Tiny);

std::map<std::string, torch::Tensor> tiny_tensors(const std::string& prefix = "") {
  return {{prefix + "proj.weight", torch::arange(6, torch::kFloat32).reshape({2, 3}) / 7},
          {prefix + "proj.bias", torch::tensor({0.5f, -0.25f})},
          {prefix + "norm.weight", torch::tensor({1.5f, 2.5f})},
          {prefix + "norm.bias", torch::tensor({-1.0f, 1.0f})}};
}

void check_loaded(Tiny& tiny, const std::map<std::string, torch::Tensor>& expected) {
  for (const auto& p : tiny->named_parameters()) CATCH_CHECK(torch::equal(p.value(), expected.at(p.key())));
}

}  // namespace

CATCH_TEST_CASE("a Hugging Face folder with model.safetensors loads name to name", "[checkpoint]") {
  dt::testing::TempDir dir;
  dir.write("config.json", R"({"hidden_size": 2, "model_type": "tiny"})");
  dt::write_safetensors(dir.file("model.safetensors"), tiny_tensors());
  const auto checkpoint = bb::read_checkpoint(dir.path.string());
  CATCH_CHECK(checkpoint.config["hidden_size"] == 2);
  Tiny tiny;
  bb::load_parameters(*tiny, checkpoint);
  check_loaded(tiny, tiny_tensors());
}

CATCH_TEST_CASE("a sharded folder is read through its index", "[checkpoint]") {
  dt::testing::TempDir dir;
  dir.write("config.json", "{}");
  auto all = tiny_tensors();
  dt::write_safetensors(dir.file("model-00001-of-00002.safetensors"),
                        {{"proj.weight", all["proj.weight"]}, {"proj.bias", all["proj.bias"]}});
  dt::write_safetensors(dir.file("model-00002-of-00002.safetensors"),
                        {{"norm.weight", all["norm.weight"]}, {"norm.bias", all["norm.bias"]}});
  dir.write("model.safetensors.index.json", R"({"metadata": {}, "weight_map": {
      "proj.weight": "model-00001-of-00002.safetensors", "proj.bias": "model-00001-of-00002.safetensors",
      "norm.weight": "model-00002-of-00002.safetensors", "norm.bias": "model-00002-of-00002.safetensors"}})");
  Tiny tiny;
  bb::load_parameters(*tiny, bb::read_hf_directory(dir.path.string()));
  check_loaded(tiny, all);

  // The index names a tensor its shard does not hold.
  dir.write("model.safetensors.index.json", R"({"weight_map": {"lost.weight": "model-00001-of-00002.safetensors"}})");
  CATCH_REQUIRE_THROWS_AS(bb::read_hf_directory(dir.path.string()), dt::CheckpointError);
  CATCH_REQUIRE_THROWS_WITH(bb::read_hf_directory(dir.path.string()),
                            Contains("lost.weight") && Contains("model-00001-of-00002.safetensors"));
}

CATCH_TEST_CASE("F16 and BF16 checkpoints load into a float32 module, rounded once", "[checkpoint]") {
  for (auto dtype : {torch::kFloat16, torch::kBFloat16}) {
    dt::testing::TempDir dir;
    dir.write("config.json", "{}");
    std::map<std::string, torch::Tensor> stored, expected;
    for (const auto& [name, t] : tiny_tensors()) {
      stored[name] = (t * 1.1).to(dtype);
      expected[name] = stored[name].to(torch::kFloat32);
    }
    dt::write_safetensors(dir.file("model.safetensors"), stored);
    Tiny tiny;
    bb::load_parameters(*tiny, bb::read_hf_directory(dir.path.string()));
    CATCH_CHECK(tiny->proj->weight.scalar_type() == torch::kFloat32);
    check_loaded(tiny, expected);
  }
}

CATCH_TEST_CASE("missing, unexpected and mis-shaped tensors are listed in one error naming the folder",
                "[checkpoint]") {
  dt::testing::TempDir dir;
  dir.write("config.json", "{}");
  auto tensors = tiny_tensors();
  tensors.erase("proj.bias");
  tensors["proj.weight"] = torch::zeros({3, 2});
  tensors["extra.weight"] = torch::zeros({1});
  dt::write_safetensors(dir.file("model.safetensors"), tensors);
  Tiny tiny;
  const auto before = tiny->norm->weight.clone();
  const auto checkpoint = bb::read_hf_directory(dir.path.string());
  CATCH_REQUIRE_THROWS_AS(bb::load_parameters(*tiny, checkpoint), dt::CheckpointError);
  CATCH_REQUIRE_THROWS_WITH(bb::load_parameters(*tiny, checkpoint),
                            Contains(dir.path.string()) && Contains("missing (1): proj.bias") &&
                                Contains("unexpected (1): extra.weight") &&
                                Contains("mismatched (1): proj.weight (file Float [3, 2], model Float [2, 3])"));
  CATCH_CHECK(torch::equal(tiny->norm->weight, before));  // nothing copied when anything is wrong
}

CATCH_TEST_CASE("load options map head prefixes, aliases, ignored and allowed-missing names", "[checkpoint]") {
  bb::Checkpoint head{"head", {}, tiny_tensors("bert.")};
  head.tensors["cls.predictions.bias"] = torch::zeros({4});
  Tiny tiny;
  bb::load_parameters(*tiny, head, bb::LoadOptions().prefixes({"bert."}).ignore_unexpected({R"(^cls\.)"}));
  check_loaded(tiny, tiny_tensors());

  // The module under a prefix the checkpoint lacks: a head model loading a bare backbone.
  struct HeadImpl : torch::nn::Module {
    HeadImpl() { body = register_module("bert", Tiny()); }
    Tiny body{nullptr};
  };
  auto model = std::make_shared<HeadImpl>();
  bb::load_parameters(*model, bb::Checkpoint{"bare", {}, tiny_tensors()}, bb::LoadOptions().module_prefixes({"bert."}));
  check_loaded(model->body, tiny_tensors());

  // A tied weight stored once, and a tensor allowed to keep its initial value.
  auto tensors = tiny_tensors();
  tensors["shared.weight"] = tensors["proj.weight"];
  tensors.erase("proj.weight");
  tensors.erase("norm.bias");
  Tiny tied;
  const auto initial_bias = tied->norm->bias.clone();
  bb::load_parameters(*tied, bb::Checkpoint{"tied", {}, tensors},
                      bb::LoadOptions().aliases({{"proj.weight", "shared.weight"}}).allow_missing({R"(^norm\.bias$)"}));
  CATCH_CHECK(torch::equal(tied->proj->weight, tiny_tensors()["proj.weight"]));
  CATCH_CHECK(torch::equal(tied->norm->bias, initial_bias));
}

CATCH_TEST_CASE("a folder without config.json or weights is refused, naming what is missing", "[checkpoint]") {
  dt::testing::TempDir dir;
  dt::write_safetensors(dir.file("model.safetensors"), tiny_tensors());
  CATCH_REQUIRE_THROWS_AS(bb::read_hf_directory(dir.path.string()), dt::CheckpointError);
  CATCH_REQUIRE_THROWS_WITH(bb::read_checkpoint(dir.path.string()), Contains(dir.file("config.json")));

  dt::testing::TempDir empty;
  empty.write("config.json", "{}");
  CATCH_REQUIRE_THROWS_WITH(bb::read_hf_directory(empty.path.string()),
                            Contains(empty.path.string()) && Contains("model.safetensors"));
  CATCH_REQUIRE_THROWS_WITH(bb::read_checkpoint(empty.file("nothing")), Contains(empty.file("nothing")));
}

CATCH_TEST_CASE("a TorchScript archive gives its parameters by name and its config.json extra file", "[checkpoint]") {
  dt::testing::TempDir dir;
  torch::jit::Module inner("inner"), outer("outer");
  const auto tensors = tiny_tensors();
  inner.register_parameter("weight", tensors.at("proj.weight"), false);
  inner.register_parameter("bias", tensors.at("proj.bias"), false);
  outer.register_module("proj", inner);
  outer.register_buffer("position_ids", torch::arange(4));
  outer.save(dir.file("model.pt"), {{"config.json", R"({"hidden_size": 2})"}});

  const auto checkpoint = bb::read_checkpoint(dir.file("model.pt"));
  CATCH_CHECK(checkpoint.config["hidden_size"] == 2);
  CATCH_CHECK(torch::equal(checkpoint.tensors.at("proj.weight"), tensors.at("proj.weight")));
  CATCH_CHECK(torch::equal(checkpoint.tensors.at("position_ids"), torch::arange(4)));
  const auto config = bb::config_fields(checkpoint);
  CATCH_CHECK(config.get<int64_t>("hidden_size") == 2);
  CATCH_CHECK(config.get<double>("layer_norm_eps", 1e-12) == 1e-12);
  CATCH_REQUIRE_THROWS_WITH(config.get<int64_t>("vocab_size"),
                            Contains("model.pt (extra file config.json)") && Contains("\"vocab_size\""));
  CATCH_REQUIRE_THROWS_WITH(config.get<std::string>("hidden_size"), Contains("\"hidden_size\" is 2"));

  // Saved without the extra file: the error says how to add it.
  outer.save(dir.file("bare.pt"));
  CATCH_REQUIRE_THROWS_WITH(bb::config_fields(bb::read_checkpoint(dir.file("bare.pt"))),
                            Contains("bare.pt") && Contains("_extra_files"));
  // load_t5, which can also take the config from its options, says so as well.
  CATCH_REQUIRE_THROWS_WITH(bb::load_t5(dir.file("bare.pt")), Contains("bare.pt") && Contains("_extra_files") &&
                                                                  Contains("T5LoadOptions().config(...)"));
  // With one that is no object: the error says what is wrong with it.
  outer.save(dir.file("list.pt"), {{"config.json", "[]"}});
  CATCH_REQUIRE_THROWS_WITH(bb::read_checkpoint(dir.file("list.pt")),
                            Contains("list.pt") && Contains("config.json is a JSON array, not an object"));
}

CATCH_TEST_CASE("a file that is not a TorchScript archive is refused, naming it", "[checkpoint]") {
  dt::testing::TempDir dir;
  dir.write("weights.pt", "this is not a zip archive");
  CATCH_REQUIRE_THROWS_AS(bb::read_torchscript(dir.file("weights.pt")), dt::CheckpointError);
  CATCH_REQUIRE_THROWS_WITH(bb::read_checkpoint(dir.file("weights.pt")),
                            Contains(dir.file("weights.pt")) && Contains("TorchScript"));
}

}  // namespace checkpoint_test
