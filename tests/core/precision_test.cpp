// Tests of mixed precision (core/precision.hpp and the sites that apply it): every method on
// tiny random T5 and BERT backbones stored in bfloat16 trains float32 deltas whose outputs and
// gradients follow the float32 model's; deltas saved from either precision load into the
// other; merging into a bf16 weight rounds once and unmerging restores it; loss scaling keeps
// a float16 backbone's small gradients. The backbones' bf16 forwards against transformers'
// are in t5_test.cpp and bert_test.cpp.
#include <deltatune/deltatune.hpp>

#include "test_support.hpp"

namespace precision_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;

namespace {

struct Batch {
  torch::Tensor ids, mask, decoder_ids, labels;
};

Batch batch(const torch::Device& device) {
  torch::manual_seed(3);
  auto ids = torch::randint(2, 64, {4, 6});
  auto mask = torch::ones_like(ids);
  mask[1].slice(0, 4).zero_();
  return {ids.to(device), mask.to(device), torch::randint(2, 64, {4, 3}).to(device),
          torch::tensor({0, 2, 1, 2}).to(device)};
}

// A tiny model without dropout (seeded: built twice, it is the same model), and its loss and
// outputs on the batch.
struct Backbone {
  std::shared_ptr<torch::nn::Module> module;
  std::function<std::pair<torch::Tensor, torch::Tensor>()> run;  // (loss, logits)
};

Backbone make(const std::string& family, const torch::Device& device = torch::kCPU) {
  const auto b = batch(device);
  torch::manual_seed(7);
  if (family == "t5") {
    auto t5 = bb::T5Model(bb::T5Config().vocab_size(64).d_model(32).d_kv(8).d_ff(64).num_layers(2).num_heads(4)
                              .relative_attention_num_buckets(8).feed_forward_proj("gated-gelu")
                              .tie_word_embeddings(false).dropout_rate(0));
    t5->to(device);
    return {t5.ptr(), [t5, b]() mutable {
              auto out = t5->forward(b.ids, b.mask, {}, b.decoder_ids);
              return std::make_pair(out.loss, out.logits);
            }};
  }
  auto bert = bb::BertForSequenceClassification(bb::BertConfig().vocab_size(64).hidden_size(32).num_hidden_layers(2)
                                                    .num_attention_heads(4).intermediate_size(64)
                                                    .max_position_embeddings(32).num_labels(3)
                                                    .hidden_dropout_prob(0).attention_probs_dropout_prob(0));
  bert->to(device);
  return {bert.ptr(), [bert, b]() mutable {
            auto out = bert->forward(b.ids, b.mask, {}, b.labels);
            return std::make_pair(out.loss, out.logits);
          }};
}

// Preset `method` at small sizes, its trained tensors perturbed (LoRA's B starts at zero, IA3 at one).
void add(dt::DeltaModel& model, const std::string& method) {
  dt::PresetSizes sizes;
  sizes.rank = 2;
  sizes.reduction_factor = 4;
  sizes.virtual_tokens = 3;
  torch::manual_seed(5);
  model.add(method, dt::builtin_methods().preset(method).make(sizes));
  torch::manual_seed(11);
  torch::NoGradGuard no_grad;
  for (auto& [key, p] : model.named_trainable_parameters()) p.add_(torch::randn_like(p) * 0.5);
}

double relative(const torch::Tensor& a, const torch::Tensor& b) { return dt::testing::relative_difference(a, b); }

// The named tensors' gradients, flattened and joined.
torch::Tensor gradients(dt::DeltaModel& model) {
  std::vector<torch::Tensor> out;
  for (auto& [key, p] : model.named_trainable_parameters()) out.push_back(p.grad().flatten().to(torch::kFloat64));
  return torch::cat(out);
}

// Every method of the method table on T5 and BERT stored in `dtype` on `device`: its trained
// tensors float32, its outputs and gradients those of the float32 model within half
// precision's rounding, which is a small part of what the delta changes.
void check_every_method(const torch::Device& device, torch::ScalarType dtype) {
  for (const std::string family : {"t5", "bert"}) {
    for (const auto& method : dt::builtin_methods().preset_names()) {
      CATCH_INFO(family << " " << method << " in " << c10::toString(dtype) << " on " << device);
      auto full = make(family, device), half = make(family, device);
      dt::set_frozen_dtype(*half.module, dtype);
      dt::DeltaModel reference(full.module), model(half.module);
      const auto bare = full.run().second.detach();
      add(reference, method);
      add(model, method);
      {  // the same delta on both: the float32 values of the reference
        torch::NoGradGuard no_grad;
        auto theirs = reference.named_trainable_parameters();
        auto ours = model.named_trainable_parameters();
        CATCH_REQUIRE(ours.size() == theirs.size());
        for (size_t i = 0; i < ours.size(); ++i) ours[i].second.copy_(theirs[i].second);
      }
      // What trains is float32; the rest of the backbone stays bf16 (all of it trains in full).
      for (const auto& [key, p] : model.named_trainable_parameters()) {
        CATCH_INFO(key);
        CATCH_CHECK(p.scalar_type() == torch::kFloat);
      }
      if (method != "full") CATCH_CHECK(dt::frozen_dtype(*half.module) == dtype);

      auto [loss_ref, logits_ref] = full.run();
      auto [loss, logits] = half.run();
      if (method != "full") CATCH_CHECK(logits.scalar_type() == dtype);
      CATCH_CHECK(loss.scalar_type() == torch::kFloat);
      // The delta acts as in float32: bf16's error is a small part of what the delta changes.
      const double changed = relative(logits_ref, bare), error = relative(logits, logits_ref);
      CATCH_INFO("the delta changes the logits by " << changed << " of their scale; bf16 differs by " << error);
      CATCH_CHECK(error < 0.1);
      CATCH_CHECK(error < 0.25 * changed);
      // Gradients reach every float32 tensor and point where the float32 model's do.
      loss_ref.backward();
      loss.backward();
      const auto g_ref = gradients(reference), g = gradients(model);
      CATCH_REQUIRE(torch::isfinite(g).all().item<bool>());
      const double cosine = (g * g_ref).sum().item<double>() / (g.norm() * g_ref.norm()).item<double>();
      CATCH_INFO("gradient cosine " << cosine);
      CATCH_CHECK(cosine > 0.99);
    }
  }
}

}  // namespace

CATCH_TEST_CASE("On a bf16 backbone every method trains float32 deltas that follow the float32 model",
                "[precision]") {
  check_every_method(torch::kCPU, torch::kBFloat16);
}

// bf16 on the tensor cores, and float16, which the GPU is where it trains.
CATCH_TEST_CASE("On CUDA, bf16 and fp16 backbones train float32 deltas that follow the float32 model",
                "[precision][cuda]") {
  if (!dt::testing::cuda_or_skip()) return;
  check_every_method(torch::kCUDA, torch::kBFloat16);
  check_every_method(torch::kCUDA, torch::kHalf);
}

// A backbone run under a caller's autocast (AutocastGuard, TrainerOptions().autocast): every
// method's deltas train, their gradients those of the run without it within bf16's rounding.
// On a bf16 backbone the float32 deltas compute in float32 as without it: autocast cast their
// products to bf16 before, and a delta's first product met its float32 weight in backward
// ("expected m1 and m2 to have the same dtype"). On either backbone Compacter's rank-one
// factors B = s t came out of autocast's bmm in bf16 for a float32 rule A, and the Kronecker
// sum refused the pair. A prefix's MLP ran in bf16 (gradient cosine 0.983 on the bf16 T5 in
// the clang build); it is float32 now, as without autocast. (Full fine-tuning trains every
// weight in float32: autocast is its bf16 path, and the examples check it.)
CATCH_TEST_CASE("Under autocast every method's deltas train as without it, on bf16 and float32 backbones",
                "[precision]") {
  for (const auto dtype : {torch::kBFloat16, torch::kFloat}) {
    for (const std::string family : {"t5", "bert"}) {
      for (const auto& method : dt::builtin_methods().preset_names()) {
        if (method == "full") continue;
        CATCH_INFO(family << " " << method << " on " << c10::toString(dtype));
        auto backbone = make(family);
        dt::set_frozen_dtype(*backbone.module, dtype);
        dt::DeltaModel model(backbone.module);
        add(model, method);
        backbone.run().first.backward();
        const auto g_ref = gradients(model);
        for (auto& [key, p] : model.named_trainable_parameters()) p.mutable_grad() = torch::Tensor();
        torch::Tensor loss;
        {
          dt::AutocastGuard autocast(torch::kCPU);
          loss = backbone.run().first;
        }
        loss.backward();
        const auto g = gradients(model);
        CATCH_REQUIRE(torch::isfinite(g).all().item<bool>());
        const double cosine = (g * g_ref).sum().item<double>() / (g.norm() * g_ref.norm()).item<double>();
        CATCH_INFO("gradient cosine " << cosine);
        CATCH_CHECK(cosine > 0.99);
      }
    }
  }
}

CATCH_TEST_CASE("A float16 backbone's small gradients flush to zero without loss scaling and survive with it",
                "[precision][loss_scale]") {
  // A loss 2^-24 of T5's: its gradients on the way back through float16 activations fall below
  // float16's smallest subnormal (6e-8). Scaled by 2^24 before backward and unscaled in the
  // float32 LoRA tensors, they are the float32 model's.
  const double tiny = std::ldexp(1.0, -24);
  auto full = make("t5"), half = make("t5");
  dt::set_frozen_dtype(*half.module, torch::kHalf);
  dt::DeltaModel reference(full.module), model(half.module);
  add(reference, "lora");
  add(model, "lora");
  {
    torch::NoGradGuard no_grad;
    auto theirs = reference.named_trainable_parameters(), ours = model.named_trainable_parameters();
    for (size_t i = 0; i < ours.size(); ++i) ours[i].second.copy_(theirs[i].second);
  }
  (full.run().first * tiny).backward();
  const auto g_ref = gradients(reference);
  CATCH_REQUIRE(g_ref.norm().item<double>() > 0);

  (half.run().first * tiny).backward();
  CATCH_CHECK(gradients(model).norm().item<double>() < 0.01 * g_ref.norm().item<double>());

  for (auto& [key, p] : model.named_trainable_parameters()) p.mutable_grad() = torch::Tensor();
  const dt::LossScaler scaler(dt::LossScaleOptions().init_scale(std::ldexp(1.0, 24)));
  scaler.scale(half.run().first * tiny).backward();
  std::vector<torch::Tensor> params;
  for (auto& [key, p] : model.named_trainable_parameters()) params.push_back(p);
  CATCH_REQUIRE(scaler.unscale(params));
  const auto g = gradients(model);
  const double cosine = (g * g_ref).sum().item<double>() / (g.norm() * g_ref.norm()).item<double>();
  CATCH_INFO("gradient cosine " << cosine << ", norms " << g.norm().item<double>() << " and "
                                << g_ref.norm().item<double>());
  CATCH_CHECK(cosine > 0.99);
  CATCH_CHECK(relative(g, g_ref) < 0.1);
}

// The first product of a float32 delta on a half-precision input (LoRA's A, an adapter's down
// projection), with and without a bias, and with one matrix a row (a mixed batch's gathered
// deltas): the float32 product autograd would take, keeping x.
CATCH_TEST_CASE("A float32 delta's first product on a bf16 input keeps the input, not its float32 copy",
                "[precision]") {
  torch::manual_seed(13);
  const auto x = torch::randn({4, 64, 256}).to(torch::kBFloat16).requires_grad_();
  for (const bool batched : {false, true}) {
    const auto W =
        (torch::randn(batched ? std::vector<int64_t>{4, 24, 256} : std::vector<int64_t>{24, 256}) * 0.1)
            .requires_grad_();
    for (const bool with_bias : {false, true}) {
      CATCH_INFO((batched ? "one matrix a row, " : "") << (with_bias ? "with" : "without") << " a bias");
      const auto bias =
          !with_bias ? torch::Tensor()
                     : torch::randn(batched ? std::vector<int64_t>{4, 24} : std::vector<int64_t>{24}).requires_grad_();
      auto ours = [&] { return dt::detail::linear_in_precision_of(x, W, bias); };
      auto autograd = [&] {
        const auto xs = x.to(torch::kFloat);
        if (!batched) return torch::nn::functional::linear(xs, W, bias);
        return with_bias ? torch::baddbmm(bias.unsqueeze(1), xs, W.transpose(1, 2)) : torch::bmm(xs, W.transpose(1, 2));
      };
      const auto y = ours(), y_ref = autograd();
      CATCH_CHECK(y.scalar_type() == torch::kFloat);
      if (with_bias) CATCH_CHECK(relative(y, y_ref) < 1e-6);  // the bias added after the product
      else CATCH_CHECK(torch::equal(y, y_ref));               // the same product
      const auto probe = torch::randn_like(y);
      std::vector<torch::Tensor> inputs{x, W};
      if (with_bias) inputs.push_back(bias);
      const auto g = torch::autograd::grad({(y * probe).sum()}, inputs);
      const auto g_ref = torch::autograd::grad({(y_ref * probe).sum()}, inputs);
      for (size_t i = 0; i < g.size(); ++i) {
        CATCH_INFO("gradient " << i);
        CATCH_CHECK(g[i].scalar_type() == g_ref[i].scalar_type());
        CATCH_CHECK(relative(g[i], g_ref[i]) < (i == 0 ? 1e-2 : 1e-6));  // x's in bf16, rounded once
      }
      // Autograd keeps x's float32 copy for W's gradient, 4 bytes an element; ours keeps x itself.
      const int64_t saved = dt::testing::bytes_kept(autograd) - dt::testing::bytes_kept(ours);
      CATCH_INFO("ours keeps " << saved << " bytes less; x's float32 copy is " << x.numel() * 4);
      CATCH_CHECK(saved >= x.numel() * 4);
    }
  }
}

// A weight delta's dropout on its own input (LoRA's, VeRA's) acts on the input's copy in the
// delta's float32, so that on a bf16 input too the kept elements scale by 1 / (1 - p) as in
// float32 (not by its bf16 rounding, 1.109375 for p = 0.1), and keeps the one-byte mask for
// backward, where torch's dropout keeps float32 noise and the dropped input, 8 bytes an element.
CATCH_TEST_CASE("A delta's dropout on its input scales in float32 and keeps a one-byte mask", "[precision]") {
  torch::manual_seed(17);
  const double p = 0.1;
  const auto W = (torch::randn({24, 256}) * 0.1).requires_grad_();
  for (const auto dtype : {torch::kFloat, torch::kBFloat16}) {
    CATCH_INFO(c10::toString(dtype) << " input");
    const auto x = torch::randn({4, 64, 256}).to(dtype).requires_grad_();
    auto mask = [&] {
      torch::manual_seed(31);
      return dt::detail::dropout_mask(x, p);
    };
    auto ours = [&] { return dt::detail::linear_in_precision_of(x, W, {}, {mask(), p}); };
    // torch's dropout, x * (mask / (1 - p)), on x's float32 copy, with our mask.
    auto autograd = [&] {
      return torch::nn::functional::linear(x.to(torch::kFloat) * (mask().to(torch::kFloat) / (1 - p)), W);
    };
    const auto y = ours(), y_ref = autograd();
    CATCH_CHECK(y.scalar_type() == torch::kFloat);
    CATCH_CHECK(relative(y, y_ref) < 1e-6);
    const auto kept = mask().to(torch::kDouble).mean().item<double>();
    CATCH_CHECK(std::abs(kept - (1 - p)) < 0.01);  // 65,536 draws: 0.01 is 8 standard deviations
    const auto probe = torch::randn_like(y);
    const auto g = torch::autograd::grad({(y * probe).sum()}, {x, W});
    const auto g_ref = torch::autograd::grad({(y_ref * probe).sum()}, {x, W});
    CATCH_CHECK(g[0].scalar_type() == dtype);
    CATCH_CHECK(relative(g[0], g_ref[0]) < (dtype == torch::kBFloat16 ? 1e-2 : 1e-6));  // bf16: rounded once
    CATCH_CHECK(relative(g[1], g_ref[1]) < 1e-6);
    const int64_t saved = dt::testing::bytes_kept(autograd) - dt::testing::bytes_kept(ours);
    CATCH_INFO("ours keeps " << saved << " bytes less; the float32 noise and dropped input are " << x.numel() * 8);
    CATCH_CHECK(saved >= x.numel() * 7);  // all but the mask's byte
  }
}

// A mixed batch's deltas of one kind take their rows together, in batched products with each
// row's factors gathered; on a bf16 input they keep its rows, not their float32 copy.
CATCH_TEST_CASE("A mixed batch's gathered deltas on a bf16 input keep the input, not its float32 copy",
                "[precision][routing]") {
  torch::manual_seed(37);
  const auto x = torch::randn({6, 16, 64}).to(torch::kBFloat16).requires_grad_();
  const auto h = torch::randn({6, 16, 64}).to(torch::kBFloat16);
  const std::vector<torch::Tensor> rows{torch::tensor({0, 3, 4}), torch::tensor({1, 2, 5})};  // every row taken
  auto factor = [](std::vector<int64_t> shape) { return (torch::randn(shape) * 0.2).requires_grad_(); };
  const std::vector<dt::LowRankFactors> low_rank{{factor({4, 64}), factor({64, 4}), 2.0},
                                                 {factor({2, 64}), factor({64, 2}), 0.5}};
  std::vector<dt::BottleneckFactors> bottlenecks(2);
  for (auto& f : bottlenecks) {
    f.down_weight = factor({8, 64}), f.down_bias = factor({8}), f.up_weight = factor({64, 8}), f.up_bias = factor({64});
    f.non_linearity = "relu", f.activation = [](const torch::Tensor& t) { return torch::relu(t); };
  }
  auto gathered_low_rank = [&](const torch::Tensor& input) {
    return dt::detail::GatheredLowRank({{low_rank[0], rows[0]}, {low_rank[1], rows[1]}}, 6).add(input, h);
  };
  auto gathered_bottlenecks = [&](const torch::Tensor& input) {
    return dt::detail::add_gathered_bottlenecks(input, h, {{bottlenecks[0], rows[0]}, {bottlenecks[1], rows[1]}});
  };
  using Gathered = std::function<torch::Tensor(const torch::Tensor&)>;
  for (const auto& [kind, run] : std::vector<std::pair<std::string, Gathered>>{
           {"low-rank deltas", gathered_low_rank}, {"bottleneck adapters", gathered_bottlenecks}}) {
    CATCH_INFO(kind);
    const auto& gathered = run;  // a lambda may not capture a structured binding in C++17 (clang refuses)
    auto ours = [&] { return gathered(x); };
    auto autograd = [&] { return gathered(x.to(torch::kFloat)); };  // the rows' float32 copy, as before
    const auto y = ours(), y_ref = autograd();
    CATCH_CHECK(y.scalar_type() == torch::kBFloat16);
    // The same float32 products, rounded alike; a bias added after the product, not in it.
    CATCH_CHECK(relative(y, y_ref) < 1e-3);
    std::vector<torch::Tensor> inputs{x};
    for (const auto& f : low_rank) inputs.insert(inputs.end(), {f.A, f.B});
    for (const auto& f : bottlenecks) inputs.insert(inputs.end(), {f.down_weight, f.down_bias, f.up_weight, f.up_bias});
    const auto probe = torch::randn_like(y, torch::kFloat);
    const auto g = torch::autograd::grad({(y * probe).sum()}, inputs, {}, {}, false, /*allow_unused=*/true);
    const auto g_ref = torch::autograd::grad({(y_ref * probe).sum()}, inputs, {}, {}, false, /*allow_unused=*/true);
    for (size_t i = 0; i < g.size(); ++i) {
      CATCH_INFO("gradient " << i);
      CATCH_CHECK(g[i].defined() == g_ref[i].defined());
      if (g[i].defined()) CATCH_CHECK(relative(g[i], g_ref[i].to(g[i].scalar_type())) < 1e-5);
    }
    const int64_t saved = dt::testing::bytes_kept(autograd) - dt::testing::bytes_kept(ours);
    CATCH_INFO("ours keeps " << saved << " bytes less; x's float32 copy is " << x.numel() * 4);
    CATCH_CHECK(saved >= x.numel() * 4);
  }
}

// LoRA where it has no single pair of factors (DoRA, dropout while training), VeRA with dropout,
// LoKr and PHM (its dense path) on a bf16 Linear: the delta computes in float32 from the bf16
// input it keeps, as a pair of factors does, where the site handing it the input's float32 copy
// kept that copy for its first product.
CATCH_TEST_CASE("Weight deltas on a bf16 Linear keep their bf16 input: DoRA, LoRA, PiSSA and VeRA with dropout, LoKr, PHM",
                "[precision]") {
  torch::manual_seed(19);
  // LoKr splits 64 = 8 x 8 and 48 = 6 x 8: W2 first is the cheaper order, as ours on bf16 takes.
  const int64_t in = 48, out = 64;
  const auto x = torch::randn({4, 32, in}).to(torch::kBFloat16).requires_grad_();
  using MakeDelta = std::function<std::shared_ptr<dt::WeightDelta>(dt::FrozenLinearImpl&)>;
  // Each delta drawn so that it acts. Dropout acts on x's float32 copy in either case, so that
  // it gives the same values on x and on that copy (the same seed draws the same mask).
  auto lora = [](dt::LoRAOptions options) -> MakeDelta {
    return [options](dt::FrozenLinearImpl& linear) {
      auto lora = dt::LoRA(options);
      torch::NoGradGuard no_grad;
      lora->lora_B.normal_(0, 0.3);
      if (options.use_dora()) lora->init_magnitude(linear.weight);
      if (lora->starts_from_weight()) lora->init_from_weight(linear.weight);
      return lora.ptr();
    };
  };
  const MakeDelta lokr = [&](dt::FrozenLinearImpl&) {
    auto lokr = dt::LoKr(dt::LoKrOptions(in, out).r(4));
    torch::NoGradGuard no_grad;
    lokr->lokr_w1.normal_(0, 0.3);
    return lokr.ptr();
  };
  const MakeDelta vera = [&](dt::FrozenLinearImpl&) {
    auto vera = dt::VeRA(dt::VeRAOptions(in, out).r(4).dropout(0.1), dt::VeRAProjection(4, in, out, 0));
    torch::NoGradGuard no_grad;
    vera->vera_lambda_b.normal_(0, 0.3);
    return vera.ptr();
  };
  const MakeDelta phm = [&](dt::FrozenLinearImpl&) { return dt::PHMLinear(dt::PHMLinearOptions(in, out).n(4)).ptr(); };
  const std::vector<std::pair<std::string, MakeDelta>> variants{
      {"DoRA", lora(dt::LoRAOptions(in, out).r(4).use_dora(true))},
      {"LoRA with dropout", lora(dt::LoRAOptions(in, out).r(4).dropout(0.1))},
      {"PiSSA with dropout", lora(dt::LoRAOptions(in, out).r(4).init("pissa").dropout(0.1))},
      {"VeRA with dropout", vera},
      {"PHM, dense", phm},
      {"LoKr", lokr}};
  for (const auto& [variant, make_delta] : variants) {
    CATCH_INFO(variant);
    dt::FrozenLinear linear(in, out, /*with_bias=*/true);
    dt::set_frozen_dtype(*linear, torch::kBFloat16);
    const auto delta = make_delta(*linear);
    linear->deltas.attach("delta", delta);
    delta->module().train();
    auto ours = [&] {
      torch::manual_seed(23);  // dropout's mask
      return linear->forward(x);
    };
    // The delta on x's float32 copy, as a site computes deltas that take no half input.
    auto autograd = [&] {
      torch::manual_seed(23);
      const auto y0 = torch::nn::functional::linear(x, linear->weight, linear->bias);
      return y0 + delta->delta_output(x.to(torch::kFloat), linear->weight, linear->bias, y0).to(torch::kBFloat16);
    };
    const auto y = ours(), y_ref = autograd();
    CATCH_CHECK(y.scalar_type() == torch::kBFloat16);
    CATCH_CHECK(relative(y, y_ref) < 1e-6);  // the same float32 products, rounded alike
    std::vector<torch::Tensor> inputs{x};
    for (const auto& p : delta->module().parameters()) inputs.push_back(p);
    const auto probe = torch::randn_like(y, torch::kFloat);
    const auto g = torch::autograd::grad({(y * probe).sum()}, inputs);
    const auto g_ref = torch::autograd::grad({(y_ref * probe).sum()}, inputs);
    for (size_t i = 0; i < g.size(); ++i) {
      CATCH_INFO("gradient " << i);
      // x's gradient is bf16: PiSSA's two terms each round to it before autograd sums them.
      CATCH_CHECK(relative(g[i], g_ref[i]) < (i == 0 ? 1e-2 : 1e-5));
    }
    const int64_t saved = dt::testing::bytes_kept(autograd) - dt::testing::bytes_kept(ours);
    CATCH_INFO("ours keeps " << saved << " bytes less; x's float32 copy is " << x.numel() * 4);
    CATCH_CHECK(saved >= x.numel() * 4);
  }
}

// DoRA's g scales the rows of B, not the (..., out) product s B A x, whose float32 copy g's
// gradient would keep (peft scales the product).
CATCH_TEST_CASE("DoRA's magnitude gradient keeps no output-sized product", "[precision]") {
  torch::manual_seed(29);
  const int64_t in = 64, out = 48;
  const auto x = torch::randn({4, 32, in}, torch::kDouble);
  const auto W = torch::randn({out, in}, torch::kDouble);
  auto lora = dt::LoRA(dt::LoRAOptions(in, out).r(4).use_dora(true));
  lora->to(torch::kDouble);
  {
    torch::NoGradGuard no_grad;
    lora->lora_B.normal_(0, 0.3);
    lora->init_magnitude(W);
    lora->lora_magnitude_vector.mul_(1.5);
  }
  const auto y0 = torch::nn::functional::linear(x, W);
  auto ours = [&] { return lora->delta_output(x, W, torch::Tensor(), y0); };
  // peft's arrangement: g times the (..., out) product.
  auto scaled_product = [&] {
    const auto norm = torch::linalg_vector_norm(W + torch::mm(lora->lora_B, lora->lora_A) * lora->scaling(), 2, {1});
    const auto g = lora->lora_magnitude_vector / norm.detach();
    const auto low_rank = torch::matmul(torch::matmul(x, lora->lora_A.t()) * lora->scaling(), lora->lora_B.t());
    return (g - 1) * y0 + g * low_rank;
  };
  const auto y = ours(), y_ref = scaled_product();
  CATCH_CHECK(relative(y, y_ref) < 1e-12);
  const std::vector<torch::Tensor> inputs{lora->lora_A, lora->lora_B, lora->lora_magnitude_vector};
  const auto probe = torch::randn_like(y);
  const auto g = torch::autograd::grad({(y * probe).sum()}, inputs);
  const auto g_ref = torch::autograd::grad({(y_ref * probe).sum()}, inputs);
  for (size_t i = 0; i < g.size(); ++i) {
    CATCH_INFO("gradient " << i);
    CATCH_CHECK(relative(g[i], g_ref[i]) < 1e-12);
  }
  const int64_t saved = dt::testing::bytes_kept(scaled_product) - dt::testing::bytes_kept(ours);
  // Ours keeps g B (out, r) instead.
  CATCH_INFO("ours keeps " << saved << " bytes less; the (..., out) product is " << y.numel() * 8);
  CATCH_CHECK(saved >= (y.numel() - lora->lora_B.numel()) * 8);
}

// A sublayer ending in a frozen bf16 layer norm, for the adapters' two placements.
struct NormedSublayerImpl : torch::nn::Module, dt::OutputSite {
  torch::Tensor weight, bias;
  explicit NormedSublayerImpl(int64_t d)
      : weight(torch::randn({d}).to(torch::kBFloat16)), bias(torch::randn({d}).to(torch::kBFloat16)) {}
  torch::Tensor forward(const torch::Tensor& h, const torch::Tensor& residual) {
    return finish(h, residual, [this](const torch::Tensor& x) {
      return torch::layer_norm(x, {x.size(-1)}, weight.to(x.scalar_type()), bias.to(x.scalar_type()));
    });
  }
};
TORCH_MODULE(NormedSublayer);

// An adapter's sublayer on a bf16 h (Houlsby's adapter reads h, Pfeiffer's the normalised
// output): the float32 computation of the delta, keeping its bf16 input for backward, not the
// float32 copies of h, the residual and the normalised output that casting them up makes.
CATCH_TEST_CASE("A bottleneck adapter on a bf16 sublayer keeps its bf16 input, in both placements", "[precision]") {
  const int64_t d = 64;
  torch::manual_seed(17);
  const auto h = torch::randn({4, 32, d}).to(torch::kBFloat16).requires_grad_();
  const auto residual = torch::randn({4, 32, d}).to(torch::kBFloat16);
  for (const auto placement : {dt::AdapterPlacement::houlsby, dt::AdapterPlacement::pfeiffer}) {
    const bool pfeiffer = placement == dt::AdapterPlacement::pfeiffer;
    CATCH_INFO((pfeiffer ? "Pfeiffer" : "Houlsby") << " placement");
    NormedSublayer sublayer(d);
    auto adapter = dt::Adapter(dt::AdapterOptions().d_model(d).reduction_factor(4).placement(placement));
    {
      torch::NoGradGuard no_grad;
      for (auto& p : adapter->parameters()) p.add_(torch::randn_like(p) * 0.3);
    }
    sublayer->output_deltas.attach("adapter", adapter.ptr());
    const auto norm = [&](const torch::Tensor& x) {
      return torch::layer_norm(x, {d}, sublayer->weight.to(x.scalar_type()), sublayer->bias.to(x.scalar_type()));
    };
    auto ours = [&] { return sublayer->forward(h, residual); };
    // The delta computing in float32 (what other deltas do): h and the residual cast up, the
    // adapter's placement and the sublayer's layer norms in float32.
    auto autograd = [&] {
      return adapter->forward_sublayer(h.to(torch::kFloat), residual.to(torch::kFloat), norm).to(torch::kBFloat16);
    };
    const auto y = ours(), y_ref = autograd();
    CATCH_CHECK(y.scalar_type() == torch::kBFloat16);
    // Houlsby's differs by rounding the same float32 values to bf16; Pfeiffer's also reads its
    // normalised output as the bf16 sublayer computes it, rounded to bf16.
    const double tolerance = pfeiffer ? 1e-2 : 1e-3;
    CATCH_CHECK(relative(y, y_ref) < tolerance);
    std::vector<torch::Tensor> inputs{h};
    for (const auto& p : adapter->parameters()) inputs.push_back(p);
    const auto probe = torch::randn_like(y, torch::kFloat);
    const auto g = torch::autograd::grad({(y * probe).sum()}, inputs);
    const auto g_ref = torch::autograd::grad({(y_ref * probe).sum()}, inputs);
    for (size_t i = 0; i < g.size(); ++i) {
      CATCH_INFO("gradient " << i);
      CATCH_CHECK(relative(g[i], g_ref[i]) < (i == 0 ? 2e-2 : tolerance));
    }
    const int64_t saved = dt::testing::bytes_kept(autograd) - dt::testing::bytes_kept(ours);
    CATCH_INFO("ours keeps " << saved << " bytes less; a float32 copy of h is " << h.numel() * 4);
    CATCH_CHECK(saved >= h.numel() * 4);
  }
}

CATCH_TEST_CASE("A delta saved from a bf16 backbone loads into the float32 one, and the reverse", "[precision]") {
  const dt::testing::TempDir tmp;
  const auto& dir = tmp.path;
  for (const std::string family : {"t5", "bert"}) {
    CATCH_INFO(family);
    auto full = make(family), half = make(family);
    dt::set_frozen_dtype(*half.module, torch::kBFloat16);
    dt::DeltaModel on_half(half.module);
    add(on_half, "adapter");
    on_half.save("adapter", (dir / family).string());
    // The file holds float32 tensors, whatever the backbone trained on.
    for (const auto& [key, t] : dt::read_safetensors((dir / family / "delta.safetensors").string()).tensors)
      CATCH_CHECK(t.scalar_type() == torch::kFloat);

    dt::DeltaModel on_full(full.module);
    on_full.load("adapter", (dir / family).string());
    auto theirs = on_half.named_trainable_parameters(), ours = on_full.named_trainable_parameters();
    CATCH_REQUIRE(ours.size() == theirs.size());
    for (size_t i = 0; i < ours.size(); ++i) CATCH_CHECK(torch::equal(ours[i].second, theirs[i].second));

    auto again = make(family);
    dt::set_frozen_dtype(*again.module, torch::kBFloat16);
    dt::DeltaModel reloaded(again.module);
    on_full.save("adapter", (dir / (family + "_full")).string());
    reloaded.load("adapter", (dir / (family + "_full")).string());
    CATCH_CHECK(torch::equal(again.run().second, half.run().second));
  }
}

CATCH_TEST_CASE("LoRA merged into a bf16 weight rounds once, and unmerging restores it bit for bit", "[precision]") {
  auto half = make("t5");
  dt::set_frozen_dtype(*half.module, torch::kBFloat16);
  dt::DeltaModel model(half.module);
  add(model, "lora");
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> before;
  for (const auto& p : half.module->parameters()) before.push_back(p.clone());
  const auto unmerged = half.run().second;
  model.merge("lora");
  const auto merged = half.run().second;
  CATCH_CHECK(merged.scalar_type() == torch::kBFloat16);
  // W0 + dW computed in float32 and stored once in bf16: the outputs differ by bf16's rounding.
  CATCH_CHECK(relative(merged, unmerged) < 0.05);
  model.unmerge("lora");
  const auto parameters = half.module->parameters();
  for (size_t i = 0; i < before.size(); ++i) CATCH_CHECK(torch::equal(parameters[i], before[i]));
  CATCH_CHECK(torch::equal(half.run().second, unmerged));
}

CATCH_TEST_CASE("set_frozen_dtype leaves what trains alone and refuses a dtype that is not floating", "[precision]") {
  auto bert = make("bert");
  dt::set_frozen_dtype(*bert.module, torch::kBFloat16);
  auto& model = dynamic_cast<bb::BertForSequenceClassificationImpl&>(*bert.module);
  CATCH_CHECK(model.classifier->weight.scalar_type() == torch::kFloat);  // the task head trains
  CATCH_CHECK(model.bert->embeddings->word_embeddings->weight.scalar_type() == torch::kBFloat16);
  CATCH_CHECK_THROWS_AS(dt::set_frozen_dtype(*bert.module, torch::kLong), dt::OptionError);
  // A method that trains backbone tensors (adapters' layer norms) gets them in float32; removing
  // the delta stores them as the rest of the backbone again.
  dt::DeltaModel deltas(bert.module);
  add(deltas, "adapter");
  const auto& norm = model.bert->encoder->layers.front()->output->layer_norm->weight;
  CATCH_CHECK(norm.scalar_type() == torch::kFloat);
  CATCH_CHECK(norm.requires_grad());
  deltas.remove("adapter");
  CATCH_CHECK(norm.scalar_type() == torch::kBFloat16);
  CATCH_CHECK_FALSE(norm.requires_grad());
}

}  // namespace precision_test
