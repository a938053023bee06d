// formats/peft.hpp against Python peft: adapters peft wrote (tools/golden/peft_models.py)
// load here with peft's outputs and gradients (float32 and float64) and write back as peft wrote them;
// adapters written here are checked by peft itself in tools/peft_roundtrip.py (ctest
// peft_roundtrip, after the hidden case [peft_export] wrote them); errors name file and key.
#include <deltatune/deltatune.hpp>

#include "test_support.hpp"

namespace peft_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;
namespace fs = std::filesystem;
using dt::testing::check_matches;

namespace {

const std::vector<std::string> kCases = {"t5_lora",   "t5_rslora", "t5_ia3",  "t5_prompt", "t5_prefix",  "t5_prefix_3_2",
                                         "bert_lora", "t5_dora",   "bert_dora", "t5_pissa", "bert_olora",
                                         "t5_vera",   "bert_vera_seed", "t5_lokr", "bert_lokr"};
// The cases whose delta starts from the weights (init_lora_weights "pissa" / "olora").
bool starts_from_weights(const std::string& c) { return c == "t5_pissa" || c == "bert_olora"; }

bool is_t5(const std::string& c) { return c.rfind("t5_", 0) == 0; }
// The fixture folder of the case's base model: t5_3_2 has 3 encoder and 2 decoder layers,
// t5_gated (float64 fixtures) is T5 v1.1's gated GELU.
std::string base_of(const std::string& c) {
  if (c == "t5_prefix_3_2") return "t5_3_2";
  if (c.rfind("t5_gated_", 0) == 0) return "t5_gated";
  return is_t5(c) ? "t5" : "bert";
}

// A backbone from the fixture folder with the peft adapter `c` loaded as delta "default"
// (only added, at its initialisation, without the file's tensors).
struct Loaded {
  std::shared_ptr<torch::nn::Module> backbone;
  std::unique_ptr<dt::DeltaModel> model;
  std::map<std::string, torch::Tensor> io;
  nlohmann::json config;

  // The fixture's loss (T5: cross-entropy on labels; BERT: sum(hidden * R)) and output.
  std::pair<torch::Tensor, torch::Tensor> run() {
    if (auto* t5 = dynamic_cast<bb::T5ModelImpl*>(backbone.get())) {
      auto out = t5->forward(io.at("input_ids"), io.at("attention_mask"), {}, io.at("labels"));
      return {out.loss, out.logits};
    }
    auto hidden = dynamic_cast<bb::BertModelImpl&>(*backbone).forward(io.at("input_ids"), io.at("attention_mask"))
                      .last_hidden_state;
    return {(hidden * io.at("R")).sum(), hidden};
  }
  std::string output_name() const {
    return dynamic_cast<bb::T5ModelImpl*>(backbone.get()) ? "logits" : "last_hidden_state";
  }
};

Loaded load_case(const fs::path& dir, const std::string& c, bool with_file_tensors = true) {
  Loaded l;
  const auto base = (dir / base_of(c)).string();
  l.backbone = is_t5(c) ? std::static_pointer_cast<torch::nn::Module>(bb::load_t5(base).ptr())
                        : std::static_pointer_cast<torch::nn::Module>(bb::load_bert(base).ptr());
  l.model = std::make_unique<dt::DeltaModel>(l.backbone);
  l.io = dt::read_safetensors((dir / (c + ".safetensors")).string()).tensors;
  l.config = dt::read_json_file(dir / c / "adapter_config.json");
  if (with_file_tensors) {
    dt::load_peft(*l.model, (dir / c).string());
  } else {
    const auto plan = dt::detail::peft_plan(*l.model, {l.config, "adapter_config.json"});
    l.model->add("default", plan.recipe, plan.pattern);
  }
  return l;
}

// The case's output, loss and the gradient of every trained adapter-file tensor (VeRA's
// projections are frozen) against the reference's, in the dtype the fixture was computed in
// (float64: at 1e-10).
void check_outputs_and_gradients(Loaded& l) {
  auto [loss, output] = l.run();
  check_matches(output, l.io.at(l.output_name()), l.output_name());
  check_matches(loss.reshape(1), l.io.at("loss"), "loss");
  loss.backward();
  auto targets = dt::detail::peft_slots(l.model->deltas().at("default"), {l.config, "adapter_config.json"});
  targets.erase(std::remove_if(targets.begin(), targets.end(), [](const auto& t) { return !t.target.requires_grad(); }),
                targets.end());
  size_t grads = 0;
  for (const auto& [key, t] : l.io) grads += key.rfind("grad.", 0) == 0;
  CATCH_CHECK(targets.size() == grads);
  for (const auto& target : targets)
    check_matches(target.target.grad(), target.convert(l.io.at("grad." + target.name)), "gradient of " + target.name);
}

nlohmann::json sorted_lists(nlohmann::json j) {
  for (auto& [key, value] : j.items())
    if (value.is_array()) std::sort(value.begin(), value.end());
  return j;
}

// A tiny random T5 for the error cases, which need no reference.
bb::T5Model tiny_t5() {
  torch::manual_seed(7);
  return bb::T5Model(bb::T5Config().vocab_size(40).d_model(16).d_kv(4).d_ff(32).num_layers(2).num_heads(4)
                         .relative_attention_num_buckets(8).relative_attention_max_distance(20));
}

}  // namespace

CATCH_TEST_CASE("peft adapters load with peft's outputs and gradients, and save as peft saved them", "[peft][golden]") {
  auto dir = dt::testing::golden_dir("peft_models");
  if (!dir) return;
  for (const auto& c : kCases) {
    CATCH_INFO("case " << c);
    auto l = load_case(*dir, c);
    check_outputs_and_gradients(l);

    // Written back: peft's tensor names and shapes, and the values the model reads, key for
    // key: peft's SEQ_2_SEQ_LM prompt has 2P rows of which prompt tuning reads P, and its
    // prefix table pairs that no decoder layer reads; those we write as zeros.
    dt::testing::TempDir out;
    dt::save_peft(*l.model, "default", out.path.string(),
                  dt::PeftSaveOptions().save_projection(l.config.value("save_projection", true)));
    auto ours = dt::read_safetensors(out.file("adapter_model.safetensors")).tensors;
    auto theirs = dt::read_safetensors((*dir / c / "adapter_model.safetensors").string()).tensors;
    CATCH_REQUIRE(ours.size() == theirs.size());
    const auto targets = dt::detail::peft_slots(l.model->deltas().at("default"), {l.config, "adapter_config.json"});
    CATCH_REQUIRE(targets.size() == theirs.size());
    for (const auto& target : targets) {
      CATCH_INFO("tensor " << target.name);
      CATCH_REQUIRE(ours.count(target.name));
      CATCH_CHECK(ours.at(target.name).sizes() == theirs.at(target.name).sizes());
      CATCH_CHECK(torch::equal(target.convert(ours.at(target.name)), target.convert(theirs.at(target.name))));
    }
    auto config = sorted_lists(dt::read_json_file(out.file("adapter_config.json")));
    auto reference = sorted_lists(l.config);
    for (auto* j : {&config, &reference}) j->erase("base_model_name_or_path");
    CATCH_CHECK(config.dump(1) == reference.dump(1));
  }
}

// PiSSA and OLoRA read the weights: A and B start as peft starts them (each rank component
// up to its sign, which SVD and QR routines may pick either way, B A does not change), the
// gradients there are peft's, and one SGD step from there gives peft's loss and output.
CATCH_TEST_CASE("PiSSA and OLoRA start from the weights as peft does and take its first step", "[peft][golden]") {
  auto dir = dt::testing::golden_dir("peft_models");
  if (!dir) return;
  for (const std::string c : {"t5_pissa", "bert_olora"}) {
    CATCH_INFO("case " << c);
    auto l = load_case(*dir, c, /*with_file_tensors=*/false);
    l.run().first.backward();
    for (const auto& a : l.model->deltas().at("default").attachments) {
      auto& lora = dynamic_cast<dt::LoRAImpl&>(*a.delta);
      const auto key = dt::detail::kPeftKeyPrefix + a.site.name;
      const auto& peft_a = l.io.at("init." + key + ".lora_A.weight");
      const auto sign = (lora.lora_A * peft_a).sum(1).sign();  // (r)
      check_matches(lora.lora_A * sign.unsqueeze(1), peft_a, key + " initial A");
      check_matches(lora.lora_B * sign, l.io.at("init." + key + ".lora_B.weight"), key + " initial B");
      check_matches(lora.lora_A.grad() * sign.unsqueeze(1), l.io.at("init_grad." + key + ".lora_A.weight"),
                    key + " gradient of A at the start");
      check_matches(lora.lora_B.grad() * sign, l.io.at("init_grad." + key + ".lora_B.weight"),
                    key + " gradient of B at the start");
    }
    torch::optim::SGD(l.model->trainable_parameters(), 0.1).step();
    torch::NoGradGuard no_grad;
    auto [loss, output] = l.run();
    check_matches(loss.reshape(1), l.io.at("stepped.loss"), "loss after one step");
    check_matches(output, l.io.at("stepped." + l.output_name()), l.output_name() + " after one step");
  }
}

// combine_lora against peft's add_weighted_adapter (tools/golden/combine.py, which says where
// the fixtures' peft differs from 0.18.1's): the mixed A and B at every site (svd: their
// product, as an SVD may pick either sign per component), and the BERT's output with the
// mixed delta alone active.
CATCH_TEST_CASE("combine_lora mixes LoRA deltas as peft's add_weighted_adapter does", "[peft][golden][combine]") {
  auto dir = dt::testing::golden_dir("combine");
  if (!dir) return;
  for (const std::string how : {"linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"}) {
    CATCH_INFO("how " << how);
    auto bert = bb::load_bert((*dir / "bert").string());
    bert->eval();
    dt::DeltaModel model(bert);
    for (const std::string input : {"task_a", "task_b", "task_c", "task_d"})
      dt::load_peft(model, (*dir / "inputs" / input).string(), input);
    const bool svd = how == "svd", pruned = how != "linear" && how != "cat" && !svd;
    dt::combine_lora(model, how, {{svd ? "task_c" : "task_a", 0.7}, {svd ? "task_d" : "task_b", -0.4}},
                     dt::LoRACombineOptions().how(how).density(pruned ? 0.5 : 1.0).seed(7));
    const auto io = dt::read_safetensors((*dir / (how + ".safetensors")).string()).tensors;
    size_t sites = 0;
    for (const auto& [key, t] : io) sites += key.find(".lora_A.") != std::string::npos;
    CATCH_CHECK(model.deltas().at(how).attachments.size() == sites);
    for (const auto& a : model.deltas().at(how).attachments) {
      const auto& lora = dynamic_cast<dt::LoRAImpl&>(*a.delta);
      const auto key = dt::detail::kPeftKeyPrefix + a.site.name;
      const auto &A = io.at(key + ".lora_A.weight"), &B = io.at(key + ".lora_B.weight");
      if (svd) {
        check_matches(torch::mm(lora.lora_B, lora.lora_A), torch::mm(B, A), key + " B A");
      } else {
        check_matches(lora.lora_A, A, key + " A");
        check_matches(lora.lora_B, B, key + " B");
      }
    }
    for (const std::string input : {"task_a", "task_b", "task_c", "task_d"}) model.deactivate(input);
    torch::NoGradGuard no_grad;
    check_matches(bert->forward(io.at("input_ids"), io.at("attention_mask")).last_hidden_state,
                  io.at("last_hidden_state"), "last_hidden_state with the mixed delta");
  }
}

// Properties no reference is needed for: "cat" and a full-rank "svd" of weights 1 and 1 are
// the two deltas active together; mixed deltas save and load like any other; bad requests
// are refused by name.
CATCH_TEST_CASE("combine_lora: cat and full-rank svd add the deltas up, and bad requests are refused", "[peft][combine]") {
  auto t5 = tiny_t5();
  t5->eval();
  dt::DeltaModel model(t5);
  model.add("a", dt::LoRAOptions().r(2).alpha(4));
  model.add("b", dt::LoRAOptions().r(3).alpha(3).use_rslora(true), "q|k");
  for (auto& p : model.trainable_parameters()) {
    torch::NoGradGuard no_grad;
    p.normal_(0, 0.3);
  }
  const auto ids = torch::randint(2, 40, {2, 5}), decoder_ids = torch::randint(2, 40, {2, 3});
  auto logits = [&] { return t5->forward(ids, {}, decoder_ids).logits.detach(); };
  const auto both = logits();
  for (const std::string how : {"cat", "svd"}) {
    CATCH_INFO("how " << how);
    auto& mixed = dt::combine_lora(model, how, {{"a", 1.0}, {"b", 1.0}}, dt::LoRACombineOptions().how(how).svd_rank(5));
    CATCH_CHECK(dynamic_cast<dt::LoRAImpl&>(*mixed.attachments.front().delta).options.r() == 5);
    model.deactivate("a");
    model.deactivate("b");
    CATCH_CHECK(torch::allclose(logits(), both, 1e-4, 1e-5));
    dt::testing::TempDir saved;
    model.save(how, saved.path.string());
    dt::DeltaModel fresh(tiny_t5());
    fresh.load(how, saved.path.string());
    model.activate("a");
    model.activate("b");
    model.remove(how);
  }
  CATCH_REQUIRE_THROWS_WITH(dt::combine_lora(model, "m", {{"a", 1.0}, {"b", 1.0}}, dt::LoRACombineOptions().how("linear")),
                            Catch::Contains("need one rank; they have ranks 2, 3"));
  CATCH_REQUIRE_THROWS_WITH(dt::combine_lora(model, "m", {{"a", 1.0}}, dt::LoRACombineOptions().how("average")),
                            Catch::Contains("option how must be one of") && Catch::Contains("got \"average\""));
  CATCH_REQUIRE_THROWS_WITH(dt::combine_lora(model, "m", {{"a", 1.0}}, dt::LoRACombineOptions().how("ties").density(2)),
                            "combine_lora: option density must be in [0, 1], got 2");
  CATCH_REQUIRE_THROWS_WITH(dt::combine_lora(model, "m", {{"nope", 1.0}}), "combine_lora: this model has no delta named 'nope'");
  model.add("dora", dt::LoRAOptions().r(2).use_dora(true));
  CATCH_REQUIRE_THROWS_WITH(dt::combine_lora(model, "m", {{"a", 1.0}, {"dora", 1.0}}), Catch::Contains("'dora' is DoRA"));
  model.add("ia3", dt::IA3Options());
  CATCH_REQUIRE_THROWS_WITH(dt::combine_lora(model, "m", {{"ia3", 1.0}}), "combine_lora: delta 'ia3' is ia3, not LoRA");
  CATCH_CHECK_FALSE(model.deltas().count("m"));
}

// LoKr splits each size into its two factors' sides as peft's factorization() does, for every
// dimension up to 1100 at each factor the fixture holds.
CATCH_TEST_CASE("LoKr splits sizes as peft's factorization does", "[peft][golden][lokr]") {
  auto dir = dt::testing::golden_dir("peft_models");
  if (!dir) return;
  const auto table = dt::read_safetensors((*dir / "lokr_factorization.safetensors").string()).tensors;
  const auto column = [&](const char* name) { return table.at(name).contiguous(); };
  const auto dimension = column("dimension"), factor = column("factor"), m = column("m"), n = column("n");
  std::vector<int64_t> ours_m, ours_n;
  for (int64_t i = 0; i < dimension.numel(); ++i) {
    const auto [a, b] = dt::lokr_factorization(dimension[i].item<int64_t>(), factor[i].item<int64_t>());
    ours_m.push_back(a);
    ours_n.push_back(b);
  }
  CATCH_REQUIRE(dimension.numel() > 6000);
  CATCH_CHECK(torch::equal(torch::tensor(ours_m), m));
  CATCH_CHECK(torch::equal(torch::tensor(ours_n), n));
}

// Exact maths: the backbone and its peft adapter in float64 against transformers + peft in
// float64 without their float32 islands (tools/golden/float64.py), at 1e-10 relative to the
// reference's scale. Where float32 can only bound rounding, this shows the maths is the same.
CATCH_TEST_CASE("peft adapters in float64 match transformers + peft in float64", "[peft][golden][float64]") {
  auto dir = dt::testing::golden_dir("float64");
  if (!dir) return;
  for (const std::string c : {"t5_lora", "t5_ia3", "t5_prompt", "t5_prefix", "t5_gated_lora", "bert_lora", "bert_ia3",
                              "t5_dora", "bert_dora", "t5_vera", "bert_vera", "t5_lokr", "bert_lokr"}) {
    CATCH_INFO("case " << c);
    auto l = load_case(*dir, c);
    l.backbone->to(torch::kFloat64);
    for (auto& [key, p] : l.model->named_delta_parameters("default")) p.set_data(p.data().to(torch::kFloat64));
    CATCH_REQUIRE(l.io.at(l.output_name()).scalar_type() == torch::kFloat64);
    check_outputs_and_gradients(l);
  }
}

// Writes adapters trained one step here, with this model's outputs, for tools/peft_roundtrip.py
// (ctest peft_export, then peft_roundtrip): the base model is the fixture's, named in
// base_model_name_or_path as a peft user would find it.
CATCH_TEST_CASE("peft adapters trained here are written for Python peft to check", "[.][peft_export]") {
  auto dir = dt::testing::golden_dir("peft_models");
  if (!dir) return;
  const auto out = dt::testing::python_check_dir("DELTATUNE_PEFT_EXPORT_DIR", "peft_export");
  fs::create_directories(out);
  fs::remove(out / "cases.json");  // written last: its absence says the export did not finish
  auto cases = kCases;
  for (const auto& c : kCases) {
    CATCH_INFO("case " << c);
    auto l = load_case(*dir, c);
    auto params = l.model->trainable_parameters();
    torch::optim::SGD sgd(params, 0.5);
    l.run().first.backward();
    sgd.step();
    const auto base = fs::absolute(*dir / base_of(c)).string();
    dt::save_peft(*l.model, "default", (out / c).string(), dt::PeftSaveOptions().base_model_name_or_path(base));
    torch::NoGradGuard no_grad;
    std::map<std::string, torch::Tensor> io{{"output", l.run().second}};
    for (const auto* key : {"input_ids", "attention_mask", "labels", "R"})
      if (l.io.count(key)) io[key] = l.io.at(key);
    dt::write_safetensors((out / (c + ".safetensors")).string(), io);
    CATCH_CHECK(!torch::equal(io.at("output"), l.io.at(l.output_name())));  // the step changed the delta
    if (starts_from_weights(c)) {  // also as the plain LoRA of rank 2r that peft's conversion writes
      dt::save_peft(*l.model, "default", (out / (c + "_as_lora")).string(),
                    dt::PeftSaveOptions().base_model_name_or_path(base).convert_to_lora(true));
      dt::write_safetensors((out / (c + "_as_lora.safetensors")).string(), io);
      cases.push_back(c + "_as_lora");
    }
  }
  dt::detail::write_text_atomically((out / "cases.json").string(), nlohmann::json(cases).dump() + "\n", "peft_test");
}

CATCH_TEST_CASE("peft files that do not fit are refused with the file and key named", "[peft]") {
  auto t5 = tiny_t5();
  dt::DeltaModel model(t5);
  model.add("a", dt::LoRAOptions().r(2).alpha(4));
  dt::testing::TempDir dir;
  dt::save_peft(model, "a", dir.path.string());
  CATCH_CHECK(dt::read_json_file(dir.file("adapter_config.json")).at("target_modules") ==
              nlohmann::json({"q", "v"}));
  const auto config = dt::read_json_file(dir.file("adapter_config.json"));
  const auto weights = dt::read_safetensors(dir.file("adapter_model.safetensors")).tensors;
  const auto config_path = dir.file("adapter_config.json"), weights_path = dir.file("adapter_model.safetensors");
  auto fresh = [] { return dt::DeltaModel(tiny_t5()); };
  {
    auto m = fresh();
    auto& entry = dt::load_peft(m, dir.path.string(), "b");
    CATCH_CHECK(entry.attachments.size() == model.deltas().at("a").attachments.size());
  }
  auto expect_error = [&](const std::vector<std::string>& parts) {
    auto m = fresh();
    try {
      dt::load_peft(m, dir.path.string());
      CATCH_FAIL("load_peft accepted a file that does not fit");
    } catch (const dt::Error& e) {
      for (const auto& part : parts) CATCH_CHECK_THAT(e.what(), Catch::Contains(part));
    }
    CATCH_CHECK(m.deltas().empty());  // all or nothing
  };

  auto c = config;
  c["peft_type"] = "LOHA";
  dir.write("adapter_config.json", c.dump());
  expect_error({config_path, "peft_type \"LOHA\" is not supported"});

  c = config;
  c["lora_bias"] = true;
  c["rank_pattern"] = {{"q", 4}};
  dir.write("adapter_config.json", c.dump());
  expect_error({config_path, "lora_bias = true", "rank_pattern = {\"q\":4}"});

  // A randomised SVD (peft's "pissa_niter_K") cannot be redone here with peft's result.
  c = config;
  c["init_lora_weights"] = "pissa_niter_4";
  dir.write("adapter_config.json", c.dump());
  expect_error({config_path, "init_lora_weights = \"pissa_niter_4\""});

  // DoRA's magnitudes are missing from a plain LoRA's file: named by key.
  c = config;
  c["use_dora"] = true;
  dir.write("adapter_config.json", c.dump());
  expect_error({weights_path, "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_magnitude_vector"});

  // Fields of the wrong type, missing or sized past any memory: named, nothing truncated.
  const std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>> refused = {
      {[](auto& j) { j["r"] = 2.7; }, "\"r\" is 2.7, expected an integer"},
      {[](auto& j) { j["use_rslora"] = "yes"; }, "\"use_rslora\" is \"yes\", expected true or false"},
      {[](auto& j) { j.erase("target_modules"); }, "the field \"target_modules\" is missing"},
      {[](auto& j) { j["r"] = int64_t(1) << 50; }, "GiB of memory"},
  };
  for (const auto& [change, part] : refused) {
    c = config;
    change(c);
    dir.write("adapter_config.json", c.dump());
    expect_error({config_path, part});
  }
  dir.write("adapter_config.json", "[]");
  expect_error({config_path, "expected a JSON object, got array"});

  dir.write("adapter_config.json", config.dump());
  auto w = weights;
  const std::string stray = "base_model.model.encoder.block.9.layer.0.SelfAttention.q.lora_A.weight";
  const std::string bad = "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight";
  w[stray] = torch::zeros({2, 16});
  w[bad] = torch::zeros({3, 16});
  dt::write_safetensors(weights_path, w);
  expect_error({weights_path, "unexpected (1): " + stray, "mismatched (1): " + bad + " (file Float [3, 16], model Float [2, 16])"});

  w = weights;
  w.erase(bad);
  dt::write_safetensors(weights_path, w);
  expect_error({weights_path, "missing (1): " + bad});

  dt::write_safetensors(weights_path, weights);
  const auto size = fs::file_size(weights_path);
  fs::resize_file(weights_path, size - 40);
  expect_error({weights_path, "truncated"});
}

CATCH_TEST_CASE("save_peft refuses what peft cannot express, saying why", "[peft]") {
  auto t5 = tiny_t5();
  dt::DeltaModel model(t5);
  dt::testing::TempDir dir;
  model.add("bitfit", dt::BitFitOptions());
  CATCH_REQUIRE_THROWS_WITH(dt::save_peft(model, "bitfit", dir.path.string()),
                            Catch::Contains("no layout for bitfit") && Catch::Contains("DeltaModel::save"));
  model.add("everywhere", dt::PrefixTuningOptions(2), "re:.*(SelfAttention|EncDecAttention)");  // encoder, cross too
  CATCH_REQUIRE_THROWS_WITH(dt::save_peft(model, "everywhere", dir.path.string()),
                            Catch::Contains("exactly the decoder's self-attention") &&
                                Catch::Contains("encoder.block.0.layer.0.SelfAttention"));
  // Two encoder layers, so peft's table has two pairs, and both decoder layers read pair 0:
  // only equal prefixes can be written.
  model.add("decoder", dt::PrefixTuningOptions(2).prefix_projection(false), dt::detail::t5_prefix_pattern());
  CATCH_REQUIRE_THROWS_WITH(dt::save_peft(model, "decoder", dir.path.string()),
                            Catch::Contains("layers 0 and 1 one prefix (key/value pair 0 of 2"));
  // Fewer encoder than decoder layers: peft's own forward fails on such a T5.
  dt::DeltaModel short_encoder(bb::T5Model(bb::T5Config().vocab_size(40).d_model(16).d_kv(4).d_ff(32).num_heads(4)
                                               .num_layers(1).num_decoder_layers(2)));
  short_encoder.add("decoder", dt::PrefixTuningOptions(2).prefix_projection(false), dt::detail::t5_prefix_pattern());
  CATCH_REQUIRE_THROWS_WITH(dt::save_peft(short_encoder, "decoder", dir.path.string()),
                            Catch::Contains("1 encoder but 2 decoder layers") && Catch::Contains("DeltaModel::save"));
  CATCH_CHECK(dir.entries().empty());  // nothing written by a refused save
  model.add("lora_norm", dt::LoRAOptions().r(2), "layer_norm");
  CATCH_REQUIRE_THROWS_WITH(dt::save_peft(model, "lora_norm", dir.path.string()),
                            Catch::Contains("Linear layers only") && Catch::Contains("layer_norm"));
  CATCH_REQUIRE_THROWS_WITH(dt::save_peft(model, "nope", dir.path.string()), Catch::Contains("no delta named 'nope'"));
}

}  // namespace peft_test
