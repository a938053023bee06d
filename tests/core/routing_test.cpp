// Tests of DeltaModel::route (core/delta_model.hpp, core/site.hpp): mixed batches on tiny
// random T5 and BERT with two LoRA deltas, two adapters, an IA3 and prompts, each row against that row
// run alone with only its delta active; gradients in training; low-rank deltas gathered into
// batched products, exact in float64; the errors.
#include <deltatune/deltatune.hpp>

#include <set>

#include "test_support.hpp"

namespace routing_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;

namespace {

constexpr int64_t kRows = 8;

// A tiny model without dropout, and its logits for the chosen rows of a fixed batch.
struct Backbone {
  std::string name;
  std::shared_ptr<torch::nn::Module> module;
  std::function<torch::Tensor(const torch::Tensor& rows)> run;
};

// (B, T) = (8, 6) token ids, odd rows padded after 4 tokens, and (8, 3) decoder ids.
struct Batch {
  torch::Tensor ids, mask, decoder_ids;
};
Batch batch() {
  torch::manual_seed(3);
  auto ids = torch::randint(2, 64, {kRows, 6});
  auto mask = torch::ones_like(ids);
  for (int64_t i = 1; i < kRows; i += 2) mask[i].slice(0, 4).zero_();
  return {ids, mask, torch::randint(2, 64, {kRows, 3})};
}

std::vector<Backbone> backbones() {
  torch::manual_seed(7);
  auto t5 = bb::T5Model(bb::T5Config().vocab_size(64).d_model(16).d_kv(4).d_ff(32).num_layers(2).num_heads(4)
                            .relative_attention_num_buckets(8).feed_forward_proj("gated-gelu")
                            .tie_word_embeddings(false).dropout_rate(0));
  auto bert = bb::BertForSequenceClassification(bb::BertConfig().vocab_size(64).hidden_size(16).num_hidden_layers(2)
                                                    .num_attention_heads(4).intermediate_size(32)
                                                    .max_position_embeddings(32).num_labels(3)
                                                    .hidden_dropout_prob(0).attention_probs_dropout_prob(0));
  const auto b = batch();
  // The chosen rows of t, on the model's device.
  auto pick = [](const torch::Tensor& t, const torch::Tensor& rows, const torch::Tensor& weight) {
    return t.index_select(0, rows).to(weight.device());
  };
  return {{"t5", t5.ptr(),
           [t5, b, pick](const torch::Tensor& rows) mutable {
             const auto& w = t5->shared->weight;
             return t5->forward(pick(b.ids, rows, w), pick(b.mask, rows, w), pick(b.decoder_ids, rows, w), {}).logits;
           }},
          {"bert", bert.ptr(), [bert, b, pick](const torch::Tensor& rows) mutable {
             const auto& w = bert->bert->embeddings->word_embeddings->weight;
             return bert->forward(pick(b.ids, rows, w), pick(b.mask, rows, w)).logits;
           }}};
}

const std::vector<std::string> kDeltas = {"lora_a", "lora_b", "adapter_a", "adapter_b", "ia3", "prompt"};

// Noise added to the named deltas' parameters, so that each changes the outputs (LoRA's B
// starts at zero, adapters near it, IA3 at one).
void perturb(dt::DeltaModel& model, const std::vector<std::string>& names, uint64_t seed) {
  torch::manual_seed(seed);
  torch::NoGradGuard no_grad;
  for (const auto& name : names)
    for (auto& [key, p] : model.named_delta_parameters(name)) p.add_(torch::randn_like(p) * 0.3);
}

// Every delta in kDeltas at its default sites, active and perturbed.
void add_deltas(dt::DeltaModel& model) {
  model.add("lora_a", dt::LoRAOptions().r(2).alpha(4));
  model.add("lora_b", dt::LoRAOptions().r(4).alpha(8));
  model.add("adapter_a", dt::houlsby_options().reduction_factor(4));
  model.add("adapter_b", dt::pfeiffer_options().reduction_factor(4));
  model.add("ia3", dt::IA3Options());
  model.add("prompt", dt::PromptTuningOptions(3));
  perturb(model, kDeltas, 11);
}

// A Houlsby adapter, a Pfeiffer adapter, a Compacter and a Compacter++ (reduction 4), named so:
// the bottleneck adapters the gathered-product tests mix.
void add_bottleneck_adapters(dt::DeltaModel& model) {
  model.add("houlsby", dt::houlsby_options().reduction_factor(4));
  model.add("pfeiffer", dt::pfeiffer_options().reduction_factor(4));
  model.add("compacter", dt::compacter_options().reduction_factor(4));
  model.add("compacter++", dt::compacter_plus_plus_options().reduction_factor(4));
}

// Only `name` active ("" or "__base__": none).
void activate_only(dt::DeltaModel& model, const std::string& name) {
  for (const auto& d : kDeltas) model.set_active(d, d == name);
}

const std::vector<std::string> kRouting = {"lora_a", "adapter_b", "__base__", "lora_b",
                                           "adapter_a", "", "prompt", "ia3"};

torch::Tensor all_rows() { return torch::arange(kRows); }

// The rows `routing` sends to `name`, as an index tensor.
torch::Tensor rows_of(const std::vector<std::string>& routing, const std::string& name) {
  std::vector<int64_t> rows;
  for (size_t i = 0; i < routing.size(); ++i)
    if (routing[i] == name || (name.empty() && routing[i] == "__base__")) rows.push_back(int64_t(i));
  return torch::tensor(rows, torch::kInt64);
}

double max_difference(const torch::Tensor& a, const torch::Tensor& b) { return (a - b).abs().max().item<double>(); }

// The model in float64 on `device`, eval mode, with `names` perturbed (seed): for the exact checks.
void prepare_float64(Backbone& backbone, dt::DeltaModel& model, const std::vector<std::string>& names, uint64_t seed,
                     torch::Device device = torch::kCPU) {
  backbone.module->to(device, torch::kFloat64);
  perturb(model, names, seed);
  backbone.module->eval();
}

// For each routing: the gathered mixed batch equals the one-by-one one (RouteOptions().gather
// (false)) and each row run alone with its delta only, to 1e-12 (a float64 model).
void check_gathered(Backbone& backbone, dt::DeltaModel& model, const std::vector<std::string>& names,
                    const std::vector<std::vector<std::string>>& routings) {
  for (const auto& routing : routings) {
    torch::Tensor gathered, one_by_one;
    {
      auto guard = model.route(routing);
      gathered = backbone.run(all_rows());
    }
    {
      auto guard = model.route(routing, dt::RouteOptions().gather(false));
      one_by_one = backbone.run(all_rows());
    }
    CATCH_CHECK(max_difference(gathered, one_by_one) < 1e-12);
    for (int64_t i = 0; i < kRows; ++i) {
      const auto& name = routing[size_t(i)];
      for (const auto& d : names) model.set_active(d, d == name);
      const auto alone = backbone.run(torch::tensor({i}));
      CATCH_INFO(backbone.name << " row " << i << " (" << name << ")");
      CATCH_CHECK(max_difference(gathered[i], alone[0]) < 1e-12);
    }
    for (const auto& d : names) model.set_active(d, true);
  }
}

}  // namespace

CATCH_TEST_CASE("A routed batch gives each row the output of that row run alone with only its delta", "[routing]") {
  for (auto& backbone : backbones()) {
    CATCH_SECTION(backbone.name) {
      dt::DeltaModel model(backbone.module);
      add_deltas(model);
      backbone.module->eval();
      torch::NoGradGuard no_grad;
      const auto unrouted = backbone.run(all_rows());
      torch::Tensor mixed;
      {
        auto routing = model.route(kRouting);
        CATCH_REQUIRE(model.routing() != nullptr);
        mixed = backbone.run(all_rows());
      }
      CATCH_CHECK(model.routing() == nullptr);
      CATCH_CHECK(torch::equal(backbone.run(all_rows()), unrouted));  // the plain path is untouched

      activate_only(model, "");
      const auto base = backbone.run(all_rows());
      for (int64_t i = 0; i < kRows; ++i) {
        const auto& name = kRouting[size_t(i)];
        activate_only(model, name == "__base__" ? "" : name);
        const auto alone = backbone.run(torch::tensor({i}));
        CATCH_INFO(backbone.name << " row " << i << " (" << name << "): " << max_difference(mixed[i], alone[0]));
        CATCH_CHECK(max_difference(mixed[i], alone[0]) < 1e-6);
        if (name != "" && name != "__base__") CATCH_CHECK(max_difference(alone[0], base[i]) > 1e-3);  // the delta acts
      }
    }
  }
}

// On a bf16 backbone (float32 deltas) a row's products run in a batch of 8 or of 1, whose bf16
// roundings may differ (here by up to 0.7% of the logits' scale): each row of the mixed batch is
// within 2% of the scale of the row run alone, where each delta moves it by more than twice that.
CATCH_TEST_CASE("On a bf16 backbone a routed batch gives each row the output of that row run alone", "[routing]") {
  for (auto& backbone : backbones()) {
    CATCH_SECTION(backbone.name) {
      dt::set_frozen_dtype(*backbone.module, torch::kBFloat16);
      dt::DeltaModel model(backbone.module);
      add_deltas(model);
      backbone.module->eval();
      torch::NoGradGuard no_grad;
      torch::Tensor mixed;
      {
        auto routing = model.route(kRouting);
        mixed = backbone.run(all_rows()).to(torch::kFloat);
      }
      activate_only(model, "");
      const auto base = backbone.run(all_rows()).to(torch::kFloat);
      const double scale = base.abs().max().item<double>();
      for (int64_t i = 0; i < kRows; ++i) {
        const auto& name = kRouting[size_t(i)];
        activate_only(model, name == "__base__" ? "" : name);
        const auto alone = backbone.run(torch::tensor({i})).to(torch::kFloat);
        CATCH_INFO(backbone.name << " row " << i << " (" << name << "): " << max_difference(mixed[i], alone[0])
                                 << " of " << scale);
        CATCH_CHECK(max_difference(mixed[i], alone[0]) < 2e-2 * scale);
        if (name != "" && name != "__base__") CATCH_CHECK(max_difference(alone[0], base[i]) > 4e-2 * scale);
      }
    }
  }
}

// Float32 and bf16 backbones (float32 deltas); in bf16 the rows' products, in batches of other
// sizes, round otherwise (here up to 1.3% of a gradient's size).
CATCH_TEST_CASE("In training, a routed batch sends each delta the gradients of its own rows only", "[routing]") {
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    for (auto& backbone : backbones()) {
      CATCH_SECTION(backbone.name + " " + c10::toString(dtype)) {
        dt::set_frozen_dtype(*backbone.module, dtype);
        dt::DeltaModel model(backbone.module);
        add_deltas(model);
        model.add("unused", dt::LoRAOptions().r(2));  // active, but no row names it
        backbone.module->train();
        const auto parameters = model.trainable_parameters();  // the deltas' and the adapters' layer norms
        auto clear_grads = [&] {
          for (auto p : parameters) p.mutable_grad() = torch::Tensor();
        };
        auto grads = [&] {
          std::vector<torch::Tensor> out;
          for (const auto& p : parameters) out.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
          return out;
        };
        torch::manual_seed(5);
        const auto weights = torch::randn_like(backbone.run(all_rows()), torch::kFloat).detach();

        clear_grads();
        {
          auto routing = model.route(kRouting);
          (backbone.run(all_rows()) * weights).sum().backward();
        }
        const auto routed = grads();
        for (auto& [key, p] : model.named_delta_parameters("unused")) CATCH_CHECK(!p.grad().defined());

        // The same loss as a sum over each delta's rows run alone with only that delta active.
        model.deactivate("unused");
        clear_grads();
        auto loss = torch::zeros({});
        for (const auto& name : {"", "lora_a", "lora_b", "adapter_a", "adapter_b", "ia3", "prompt"}) {
          activate_only(model, name);
          const auto rows = rows_of(kRouting, name);
          loss = loss + (backbone.run(rows) * weights.index_select(0, rows)).sum();
        }
        loss.backward();
        const auto alone = grads();
        // Relative to each gradient's size: sums over different batch splits.
        double worst = 0, smallest_delta_grad = 1e9;
        for (size_t i = 0; i < parameters.size(); ++i)
          worst = std::max(worst,
                           max_difference(routed[i], alone[i]) / std::max(1.0, alone[i].abs().max().item<double>()));
        for (const auto& name : kDeltas)
          for (auto& [key, p] : model.named_delta_parameters(name))
            smallest_delta_grad = std::min(smallest_delta_grad, p.grad().abs().max().item<double>());
        CATCH_INFO(backbone.name << ": largest relative gradient difference " << worst << ", smallest delta gradient "
                                 << smallest_delta_grad);
        CATCH_CHECK(worst < (dtype == torch::kFloat ? 1e-5 : 5e-2));
        CATCH_CHECK(smallest_delta_grad > 1e-6);  // every routed delta learns from its rows
      }
    }
  }
}

CATCH_TEST_CASE("Low-rank deltas share two batched products per site in a mixed batch, exactly in float64",
                "[routing]") {
  // Deltas whose output is x A^T B^T (LoRA of ranks 2 and 4, rsLoRA, PiSSA of rank 2 r, VeRA)
  // have their rows gathered (RowRouting::gather); DoRA beside them takes its own products
  // and IA3 one scale over the batch. In float64 the rows equal each row run alone and the one-by-one path.
  const std::vector<std::string> names = {"lora_r2", "lora_r4", "pissa", "vera", "dora", "ia3"};
  // With rows of the base and of other deltas beside them (the routed rows of x gathered), and
  // with every row on a low-rank delta (the factors gathered in row order, x as it is).
  const std::vector<std::vector<std::string>> routings = {
      {"lora_r2", "vera", "pissa", "__base__", "lora_r4", "dora", "ia3", "lora_r2"},
      {"pissa", "lora_r2", "vera", "lora_r4", "lora_r4", "lora_r2", "pissa", "vera"}};
  for (auto& backbone : backbones()) {
    CATCH_SECTION(backbone.name) {
      backbone.module->to(torch::kFloat64);
      dt::DeltaModel model(backbone.module);
      model.add("lora_r2", dt::LoRAOptions().r(2).alpha(4));
      model.add("lora_r4", dt::LoRAOptions().r(4).alpha(8).use_rslora(true));
      model.add("pissa", dt::LoRAOptions().r(2).alpha(2).init("pissa"));
      model.add("vera", dt::VeRAOptions().r(8));
      model.add("dora", dt::LoRAOptions().r(2).alpha(2).use_dora(true));
      model.add("ia3", dt::IA3Options());
      prepare_float64(backbone, model, names, 12);
      torch::NoGradGuard no_grad;

      // The factors are the delta: B A equals dW at every site; DoRA and IA3 have none.
      for (const auto& name : names) {
        for (const auto& a : model.deltas().at(name).attachments) {
          auto& delta = dynamic_cast<dt::WeightDelta&>(*a.delta);
          const auto factors = delta.low_rank_factors();
          CATCH_CHECK(factors.has_value() == (name != "dora" && name != "ia3"));
          if (!factors) continue;
          const auto& weight = a.site.linear->weight;
          CATCH_CHECK(max_difference(factors->B.mm(factors->A) * factors->scale, delta.delta_weight(weight)) < 1e-12);
        }
      }

      check_gathered(backbone, model, names, routings);
    }
  }
}

CATCH_TEST_CASE("Bottleneck adapters share two batched products per site in a mixed batch, exactly in float64",
                "[routing]") {
  // Houlsby adapters of two bottlenecks, Pfeiffer's (ReLU, reading the normalised output),
  // PHM-Adapter, Compacter and Compacter++ have their rows gathered by nonlinearity and input;
  // a LoRA and an IA3 (scaling keys, values and the feed-forward input) take the weight sites.
  const std::vector<std::string> names = {"houlsby", "houlsby_8", "pfeiffer", "phm", "compacter", "compacter++",
                                          "lora", "ia3"};
  const std::vector<std::vector<std::string>> routings = {
      {"houlsby", "pfeiffer", "compacter++", "__base__", "houlsby_8", "lora", "ia3", "phm"},
      {"compacter", "houlsby", "houlsby_8", "compacter", "phm", "houlsby_8", "compacter++", "pfeiffer"}};
  for (auto& backbone : backbones()) {
    CATCH_SECTION(backbone.name) {
      dt::DeltaModel model(backbone.module);
      add_bottleneck_adapters(model);
      model.add("houlsby_8", dt::houlsby_options().bottleneck(8));
      model.add("phm", dt::phm_adapter_options(0, 4).reduction_factor(4));
      model.add("lora", dt::LoRAOptions().r(2).alpha(4));
      model.add("ia3", dt::IA3Options());
      prepare_float64(backbone, model, names, 13);
      torch::NoGradGuard no_grad;

      // The factors are the adapter: act(h D^T + d) U^T + u equals its bottleneck.
      const auto h = torch::randn({3, 16}, torch::kFloat64);
      for (const auto& name : {"houlsby", "houlsby_8", "pfeiffer", "phm", "compacter", "compacter++"}) {
        for (const auto& a : model.deltas().at(name).attachments) {
          auto& adapter = dynamic_cast<dt::AdapterImpl&>(*a.delta);
          const auto f = adapter.bottleneck_factors();
          CATCH_REQUIRE(f.has_value());
          CATCH_CHECK(f->reads_normed == (adapter.options.placement() == dt::AdapterPlacement::pfeiffer));
          namespace F = torch::nn::functional;
          const auto via_factors = F::linear(f->activation(F::linear(h, f->down_weight, f->down_bias)), f->up_weight,
                                             f->up_bias);
          CATCH_CHECK(max_difference(via_factors, adapter.bottleneck_forward(h)) < 1e-12);
        }
      }
      check_gathered(backbone, model, names, routings);
    }
  }
}

CATCH_TEST_CASE("Prompts of different lengths share a mixed batch with other deltas and bare rows, exactly in float64",
                "[routing]") {
  // Each row's prompts end where its tokens begin, after masked slots (T5: the same relative
  // positions as alone; BERT: positions counted from the row's start, pooled there).
  const std::vector<std::string> names = {"prompt_3", "prompt_5", "lora", "adapter"};
  const std::vector<std::vector<std::string>> routings = {
      {"prompt_3", "prompt_5", "__base__", "lora", "prompt_5", "adapter", "prompt_3", ""},
      {"prompt_5", "prompt_3", "prompt_3", "prompt_5", "prompt_5", "prompt_3", "prompt_5", "prompt_3"}};
  for (auto& backbone : backbones()) {
    CATCH_SECTION(backbone.name) {
      dt::DeltaModel model(backbone.module);
      model.add("prompt_3", dt::PromptTuningOptions(3));
      model.add("prompt_5", dt::PromptTuningOptions(5).init(dt::PromptInit::sampled_vocabulary));
      model.add("lora", dt::LoRAOptions().r(2).alpha(4));
      model.add("adapter", dt::houlsby_options().reduction_factor(4));
      prepare_float64(backbone, model, names, 14);
      torch::NoGradGuard no_grad;
      check_gathered(backbone, model, names, routings);
    }
  }
}

CATCH_TEST_CASE("On CUDA, every routable method's rows in one mixed batch equal each row run alone, in float64",
                "[routing][cuda]") {
  if (!dt::testing::cuda_or_skip()) return;
  // The gathered products, the bottleneck adapters' Kronecker sums (the CUDA kernels) and the
  // prompts' slots on the GPU.
  const std::vector<std::string> names = {"lora_r2", "lora_r4", "vera",      "houlsby", "pfeiffer",
                                          "compacter", "compacter++", "ia3", "prompt_3", "prompt_5"};
  const std::vector<std::vector<std::string>> routings = {
      {"lora_r2", "houlsby", "prompt_3", "__base__", "compacter", "ia3", "vera", "prompt_5"},
      {"compacter++", "lora_r4", "pfeiffer", "lora_r2", "prompt_5", "compacter", "lora_r4", "houlsby"}};
  for (auto& backbone : backbones()) {
    CATCH_SECTION(backbone.name) {
      dt::DeltaModel model(backbone.module);
      model.add("lora_r2", dt::LoRAOptions().r(2).alpha(4));
      model.add("lora_r4", dt::LoRAOptions().r(4).alpha(8));
      model.add("vera", dt::VeRAOptions().r(8));
      add_bottleneck_adapters(model);
      model.add("ia3", dt::IA3Options());
      model.add("prompt_3", dt::PromptTuningOptions(3));
      model.add("prompt_5", dt::PromptTuningOptions(5));
      prepare_float64(backbone, model, names, 16, torch::kCUDA);
      torch::NoGradGuard no_grad;
      check_gathered(backbone, model, names, routings);
    }
  }
}

CATCH_TEST_CASE("Under one routing, a delta changed in place acts on its rows from the next forward on",
                "[routing]") {
  // Nothing a site gathers outlives a forward pass: a delta loaded or stepped while rows are
  // routed (a server's hot swap, generation's steps) takes effect at once, on its rows alone.
  for (auto& backbone : backbones()) {
    CATCH_SECTION(backbone.name) {
      dt::DeltaModel model(backbone.module);
      add_deltas(model);
      backbone.module->eval();
      torch::NoGradGuard no_grad;
      const std::vector<std::string> routing = {"lora_a", "lora_b", "lora_a", "__base__",
                                                "lora_b", "lora_a", "lora_b", "lora_a"};
      torch::Tensor first, again, changed, rerouted;
      {
        auto guard = model.route(routing);
        first = backbone.run(all_rows());
        again = backbone.run(all_rows());
        perturb(model, {"lora_b"}, 17);
        changed = backbone.run(all_rows());
      }
      {
        auto guard = model.route(routing);
        rerouted = backbone.run(all_rows());
      }
      CATCH_CHECK(torch::equal(first, again));
      CATCH_CHECK(torch::equal(changed, rerouted));
      const auto lora_b_rows = rows_of(routing, "lora_b");
      CATCH_CHECK(max_difference(changed.index_select(0, lora_b_rows), first.index_select(0, lora_b_rows)) > 1e-3);
      const auto lora_a_rows = rows_of(routing, "lora_a");
      CATCH_CHECK(torch::equal(changed.index_select(0, lora_a_rows), first.index_select(0, lora_a_rows)));
    }
  }
}

CATCH_TEST_CASE("Greedy generation over a mixed batch equals each row generated alone, token for token", "[routing]") {
  // The routing holds through the encoder and every cached decoder step: rows of two LoRAs, an
  // adapter, Compacter, IA3 and the bare T5, with some rows finishing before others.
  auto backbone = backbones().front();
  auto& t5 = dynamic_cast<bb::T5ModelImpl&>(*backbone.module);
  dt::DeltaModel model(backbone.module);
  add_deltas(model);
  model.add("compacter", dt::compacter_options().reduction_factor(4));
  perturb(model, {"compacter"}, 15);
  t5.eval();
  const std::vector<std::string> routing = {"lora_a", "compacter", "__base__", "lora_b", "adapter_a", "adapter_b",
                                            "prompt", "ia3"};
  const auto b = batch();
  torch::Tensor mixed;
  {
    auto guard = model.route(routing);
    mixed = t5.generate_greedy(b.ids, b.mask, 6);
  }
  std::vector<std::string> names = kDeltas;
  names.push_back("compacter");
  std::set<std::string> distinct;
  for (int64_t i = 0; i < kRows; ++i) {
    for (const auto& d : names) model.set_active(d, d == routing[size_t(i)]);
    const auto alone = t5.generate_greedy(b.ids.slice(0, i, i + 1), b.mask.slice(0, i, i + 1), 6)[0];
    CATCH_INFO("row " << i << " (" << routing[size_t(i)] << ")");
    // A row that ended early alone is padded in the batch, where others went on.
    const auto n = alone.size(0);
    CATCH_CHECK(torch::equal(mixed[i].slice(0, 0, n), alone));
    CATCH_CHECK((mixed[i].slice(0, n) == t5.config.pad_token_id()).all().item<bool>());
    distinct.insert(fmt::format("{}", fmt::join(std::vector<int64_t>(alone.data_ptr<int64_t>(),
                                                                     alone.data_ptr<int64_t>() + n), ",")));
  }
  CATCH_CHECK(distinct.size() > 3);  // the deltas answer differently: the check compares something
}

CATCH_TEST_CASE("DeltaModel::route refuses unknown, inactive, merged and unroutable deltas and a wrong row count",
                "[routing]") {
  auto backbone = backbones().front();  // t5
  dt::DeltaModel model(backbone.module);
  add_deltas(model);
  torch::NoGradGuard no_grad;

  CATCH_REQUIRE_THROWS_WITH(model.set_routing({}), Catch::Contains("needs one delta name"));
  CATCH_REQUIRE_THROWS_WITH(model.set_routing({"lora_a", "lora_c"}),
                            Catch::Contains("no delta named 'lora_c'; this model has: adapter_a, adapter_b, ia3, lora_a, lora_b, prompt"));
  model.deactivate("lora_b");
  CATCH_REQUIRE_THROWS_WITH(model.set_routing({"lora_b"}), Catch::Contains("delta 'lora_b' is inactive; activate('lora_b')"));
  model.activate("lora_b");

  model.merge("lora_a");
  CATCH_REQUIRE_THROWS_WITH(model.set_routing({"lora_b", "__base__"}),
                            Catch::Contains("delta 'lora_a' is merged") && Catch::Contains("unmerge('lora_a')"));
  model.unmerge("lora_a");

  model.add("prefix", dt::PrefixTuningOptions(2).hidden(8));
  CATCH_REQUIRE_THROWS_WITH(model.set_routing({"lora_a"}),
                            Catch::Contains("delta 'prefix' (prefix_tuning) is active") &&
                                Catch::Contains("deactivate('prefix')"));
  model.deactivate("prefix");
  CATCH_REQUIRE_THROWS_WITH(model.set_routing({"prefix"}), Catch::Contains("delta 'prefix' (prefix_tuning) cannot be routed"));
  CATCH_CHECK(model.routing() == nullptr);  // a refused routing leaves none behind

  {
    auto routing = model.route({"lora_a", "__base__", "adapter_b"});
    CATCH_REQUIRE_THROWS_WITH(backbone.run(all_rows()),
                              Catch::Contains("DeltaModel::route was given 3 row names, but a batch of 8 rows"));
    CATCH_REQUIRE_THROWS_WITH(model.merge("lora_a"), Catch::Contains("while rows are routed"));
    CATCH_CHECK(backbone.run(torch::arange(3)).size(0) == 3);
  }
  CATCH_CHECK(model.routing() == nullptr);
  CATCH_CHECK(backbone.run(all_rows()).size(0) == kRows);
}

CATCH_TEST_CASE("A routed batch matches peft's mixed-batch LoRA inference on a tiny T5", "[routing][golden]") {
  const auto dir = dt::testing::golden_dir("routing");
  if (!dir) return;
  auto t5 = bb::load_t5((*dir / "hf").string());
  t5->eval();
  dt::DeltaModel model(t5);
  const auto config = dt::read_json_file((*dir / "lora.json").string());
  torch::NoGradGuard no_grad;
  for (const auto& [name, options] : config.at("adapters").items()) {
    model.add(name, dt::LoRAOptions().r(options.at("r")).alpha(options.at("lora_alpha")), "q|v");
    auto file = dt::read_safetensors((*dir / (name + ".safetensors")).string()).tensors;
    const auto params = model.named_delta_parameters(name);
    CATCH_REQUIRE(params.size() == file.size());
    for (auto& [key, p] : params) p.copy_(file.at(key));
  }
  const auto io = dt::read_safetensors((*dir / "io.safetensors").string()).tensors;
  auto routing = model.route(config.at("rows").get<std::vector<std::string>>());
  const auto logits = t5->forward(io.at("input_ids"), io.at("attention_mask"), io.at("decoder_input_ids")).logits;
  dt::testing::check_matches(logits, io.at("logits"), "routed logits");
}

}  // namespace routing_test
