// Merge and unmerge are exact (core/site.hpp, WeightSite): after any number of cycles, and
// whatever order several deltas are merged and unmerged in, the frozen weights and biases are
// bit for bit the loaded ones, where subtracting what was added would drift (issue 15, item 9).
#include <deltatune/deltatune.hpp>

#include "test_support.hpp"

namespace merge_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;

namespace {

// A tiny random T5: bias-less Linears, so that BitFit's merge gives them biases.
bb::T5Model tiny_t5() {
  torch::manual_seed(5);
  return bb::T5Model(bb::T5Config().vocab_size(64).d_model(16).d_kv(4).d_ff(32).num_layers(2).num_heads(4)
                         .relative_attention_num_buckets(8).dropout_rate(0));
}

// LoRA on q and v, IA3 on k, v and wo (v shared: IA3 then scales a LoRA-merged weight) and
// BitFit on every Linear, each moved away from its init so that it changes the weights.
void add_deltas(dt::DeltaModel& model) {
  model.add("lora", dt::LoRAOptions().r(2).alpha(4));
  model.add("ia3", dt::IA3Options());
  model.add("bitfit", dt::BitFitOptions());
  torch::manual_seed(9);
  torch::NoGradGuard no_grad;
  for (const auto* name : {"lora", "ia3", "bitfit"})
    for (auto& [key, p] : model.named_delta_parameters(name)) p.add_(torch::randn_like(p) * 0.3);
}

std::map<std::string, torch::Tensor> frozen(torch::nn::Module& backbone) {
  std::map<std::string, torch::Tensor> out;
  for (const auto& p : backbone.named_parameters()) out[p.key()] = p.value().detach().clone();
  return out;
}

// The parameters that are not bit-identical to `loaded`, or that `loaded` lacks (a bias a
// merge gave a layer must go with the merge), or that are gone.
std::vector<std::string> changed(torch::nn::Module& backbone, const std::map<std::string, torch::Tensor>& loaded) {
  const auto now = frozen(backbone);
  std::vector<std::string> out;
  for (const auto& [name, t] : now)
    if (!loaded.count(name) || !torch::equal(t, loaded.at(name))) out.push_back(name);
  for (const auto& [name, t] : loaded)
    if (!now.count(name)) out.push_back(name + " (gone)");
  return out;
}

void check_identical(torch::nn::Module& backbone, const std::map<std::string, torch::Tensor>& loaded) {
  const auto differing = changed(backbone, loaded);
  CATCH_INFO("changed: " << fmt::format("{}", fmt::join(differing, ", ")));
  CATCH_CHECK(differing.empty());
}

torch::Tensor logits(bb::T5Model& t5) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(3);
  const auto ids = torch::randint(2, 64, {2, 6});
  return t5->forward(ids, torch::ones_like(ids), torch::randint(2, 64, {2, 3}), {}).logits;
}

}  // namespace

CATCH_TEST_CASE("1,000 merge and unmerge cycles leave the frozen weights bit-identical", "[core][merge]") {
  auto t5 = tiny_t5();
  dt::DeltaModel model(t5);
  add_deltas(model);
  const auto loaded = frozen(*t5);
  for (const auto* name : {"lora", "ia3", "bitfit"}) {
    CATCH_INFO("delta " << name);
    model.merge(name);
    CATCH_CHECK_FALSE(changed(*t5, loaded).empty());  // the merge changed the weights
    model.unmerge(name);
    for (int cycle = 1; cycle < 1000; ++cycle) {
      model.merge(name);
      model.unmerge(name);
    }
    check_identical(*t5, loaded);
  }
}

CATCH_TEST_CASE("merge A, merge B, unmerge A, unmerge B: B alone is what B runs as, and the weights come back exactly",
                "[core][merge]") {
  for (const auto& [a, b] : std::vector<std::pair<std::string, std::string>>{{"lora", "ia3"}, {"ia3", "lora"},
                                                                             {"bitfit", "ia3"}, {"ia3", "bitfit"}}) {
    CATCH_INFO("A = " << a << ", B = " << b);
    auto t5 = tiny_t5();
    dt::DeltaModel model(t5);
    add_deltas(model);
    const auto loaded = frozen(*t5);
    for (const auto& other : {"lora", "ia3", "bitfit"}) model.set_active(other, other == a || other == b);
    model.merge(a);
    model.merge(b);
    model.unmerge(a);
    model.deactivate(a);
    const auto b_merged = logits(t5);
    model.unmerge(b);
    check_identical(*t5, loaded);
    dt::testing::check_matches(b_merged, logits(t5), "logits with B merged against B running unmerged");
  }
}

}  // namespace merge_test
