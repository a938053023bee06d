// Tests of backbones/dropout.hpp and core/dropout_mask.hpp: each lean operation against the same operations
// composed from torch's with autograd, applying the mask keep_mask draws from the same seed;
// keep_mask's draws; and the backbones' lean_dropout option, per model.
#include <deltatune/backbones/bert.hpp>
#include <deltatune/backbones/dropout.hpp>

#include <set>

#include "test_support.hpp"

namespace dropout_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;
using dt::testing::close;
using dt::testing::describe_difference;

namespace {

constexpr double kDropout = 0.3;

torch::Tensor leaf(std::vector<int64_t> shape) { return torch::randn(shape, torch::kDouble).requires_grad_(true); }

// Gradients of sum(out * R) for a fixed random R.
std::vector<torch::Tensor> grads_of(const torch::Tensor& out, const std::vector<torch::Tensor>& inputs) {
  torch::manual_seed(99);
  return torch::autograd::grad({(out * torch::randn_like(out)).sum()}, inputs);
}

void check_same(const torch::Tensor& ours, const torch::Tensor& reference, const std::vector<torch::Tensor>& inputs) {
  CATCH_CHECK(close(ours, reference, {1e-12, 1e-12}));
  const auto ours_grads = grads_of(ours, inputs), reference_grads = grads_of(reference, inputs);
  for (size_t i = 0; i < inputs.size(); ++i) {
    CATCH_INFO("input " << i << ": " << describe_difference(ours_grads[i], reference_grads[i]));
    CATCH_CHECK(close(ours_grads[i], reference_grads[i], {1e-12, 1e-12}));
  }
}

// The mask the operation under test draws first after torch::manual_seed(seed), as a float.
torch::Tensor mask_after_seed(uint64_t seed, std::vector<int64_t> shape) {
  torch::manual_seed(seed);
  return dt::detail::keep_mask(torch::empty(shape, torch::kDouble), kDropout).to(torch::kDouble) / (1 - kDropout);
}

// torch's math for attention with dropout, the probabilities dropped by `scaled_mask`.
torch::Tensor reference_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& scores_mask, double scale, const torch::Tensor& scaled_mask) {
  auto scores = (q * scale).matmul(k.transpose(-2, -1));
  scores = scores_mask.scalar_type() == torch::kBool
               ? scores.masked_fill(scores_mask.logical_not(), -std::numeric_limits<double>::infinity())
               : scores + scores_mask;
  return (at::_safe_softmax(scores, -1) * scaled_mask).matmul(v);
}

// Whether the autograd graph behind `out` has a node whose name contains `part`: the lean
// Functions' (MaskFunction, SeededMaskFunction, DropoutAttentionFunction) tell the lean way from
// torch's.
bool has_node(const torch::Tensor& out, const std::string& part) {
  std::set<torch::autograd::Node*> seen;
  std::vector<torch::autograd::Node*> todo{out.grad_fn().get()};
  while (!todo.empty()) {
    auto* node = todo.back();
    todo.pop_back();
    if (node == nullptr || !seen.insert(node).second) continue;
    if (node->name().find(part) != std::string::npos) return true;
    for (const auto& edge : node->next_edges()) todo.push_back(edge.function.get());
  }
  return false;
}

}  // namespace

CATCH_TEST_CASE("dropout keeps torch's distribution and is the identity when not training", "[dropout]") {
  auto x = leaf({64, 32});
  CATCH_CHECK(dt::detail::dropout(x, kDropout, /*training=*/false, /*lean=*/true).is_same(x));
  CATCH_CHECK(dt::detail::dropout(x, 0.0, /*training=*/true, /*lean=*/true).is_same(x));
  torch::manual_seed(5);
  const auto ours = dt::detail::dropout(x, kDropout, true, true);
  check_same(ours, x * mask_after_seed(5, {64, 32}), {x});
  // Every element is dropped or scaled by 1 / (1 - p).
  const auto kept = ours != 0;
  CATCH_CHECK(close(ours.masked_select(kept), x.masked_select(kept) / (1 - kDropout), {1e-12, 1e-12}));
  CATCH_CHECK(std::abs(kept.to(torch::kDouble).mean().item<double>() - (1 - kDropout)) < 0.05);
}

// The tests above run in float64, which apply_mask hands to at::where; its own loop takes
// float32 and bfloat16. Each element as at::where(kept, x * scale, 0) rounds it, bit for bit:
// odd sizes (a block's tail), a transposed x, at 1 and 3 threads (the parallel_for's split).
CATCH_TEST_CASE("apply_mask scales kept float32 and bfloat16 elements as torch rounds them, and zeroes the rest",
                "[dropout]") {
  torch::manual_seed(11);
  const int threads = at::get_num_threads();
  for (const auto dtype : {torch::kFloat, torch::kBFloat16})
    for (const auto& shape : std::vector<std::vector<int64_t>>{{1}, {3, 37}, {8, 64, 129}, {2, 4, 33, 65}})
      for (const bool transposed : {false, true})
        for (const int t : {1, 3}) {
          at::set_num_threads(t);
          auto x = (torch::randn(shape) * 100).to(dtype);
          if (transposed) x = x.transpose(0, -1);
          const auto kept = torch::rand(x.sizes()) > kDropout;
          const auto ours = dt::detail::apply_mask(x, kept, kDropout);
          const auto reference = at::where(kept, x * (1.0 / (1.0 - kDropout)), 0);
          CATCH_INFO(c10::toString(dtype) << " " << x.sizes() << " transposed " << transposed << " threads " << t);
          CATCH_CHECK(ours.scalar_type() == dtype);
          CATCH_CHECK(torch::equal(ours, reference));
          CATCH_CHECK(ours.masked_select(kept.logical_not()).abs().sum().item<double>() == 0.0);
        }
  at::set_num_threads(threads);
  // As torch's dropout multiplies by its mask: a dropped infinity is NaN, a kept one stays infinite.
  const auto x = torch::tensor({INFINITY, INFINITY, -2.0f}), kept = torch::tensor({true, false, false});
  const auto ours = dt::detail::apply_mask(x, kept, 0.5);
  CATCH_CHECK(std::isinf(ours[0].item<float>()));
  CATCH_CHECK(std::isnan(ours[1].item<float>()));
  CATCH_CHECK(ours[2].item<float>() == 0.0f);
}

CATCH_TEST_CASE("relu_dropout is dropout(relu(h)) with torch's gradient", "[dropout]") {
  auto h = leaf({4, 8, 16});
  CATCH_CHECK(torch::equal(dt::detail::relu_dropout(h, kDropout, /*training=*/false, /*lean=*/true), torch::relu(h)));
  torch::manual_seed(7);
  const auto ours = dt::detail::relu_dropout(h, kDropout, true, true);
  check_same(ours, torch::relu(h) * mask_after_seed(7, {4, 8, 16}), {h});
}

// relu_dropout's mask: keep_mask's draw where h > 0 (is_positive). bfloat16 on the CPU takes
// its own pass over the bits: against torch's h > 0 element for element, on the values at the
// edges of "positive" (zeros, the least subnormal either side of 0, infinities, NaN of either
// sign, the largest finite), on odd sizes (a block's tail) and a transposed h, at 1 and 3 threads.
CATCH_TEST_CASE("is_positive is torch's h > 0, bfloat16's edge values included", "[dropout]") {
  const int threads = at::get_num_threads();
  const auto edges = torch::tensor(
      {0.0f, -0.0f, 9.2e-41f, -9.2e-41f, INFINITY, -INFINITY, NAN, -NAN, 3.38e38f, -3.38e38f});
  for (const auto dtype : {torch::kBFloat16, torch::kFloat})
    for (const auto& shape : std::vector<std::vector<int64_t>>{{10}, {3, 37}, {8, 64, 129}})
      for (const bool transposed : {false, true})
        for (const int t : {1, 3}) {
          at::set_num_threads(t);
          auto h = torch::randn(shape);
          h.view({-1}).narrow(0, 0, 10).copy_(edges);
          h = h.to(dtype);
          if (transposed) h = h.transpose(0, -1);
          CATCH_INFO(c10::toString(dtype) << " " << h.sizes() << " transposed " << transposed << " threads " << t);
          CATCH_CHECK(torch::equal(dt::detail::is_positive(h), h > 0));
        }
  at::set_num_threads(threads);
  CATCH_CHECK(dt::detail::is_positive(edges.to(torch::kBFloat16)).to(torch::kInt).sum().item<int>() == 3);
}

// The lean masks are drawn on the CPU; off it the backbones' dropout, ReLU-dropout and
// attention are torch's. relu_dropout drew keep_mask's CPU mask there and threw: a T5 with a
// ReLU feed-forward (v1.0, T5-base) could not train on a GPU with dropout.
CATCH_TEST_CASE("On CUDA, dropout, relu_dropout and attention in training are torch's", "[dropout][cuda]") {
  if (!dt::testing::cuda_or_skip()) return;
  const auto cuda = torch::TensorOptions().device(torch::kCUDA);
  const auto h = torch::randn({4, 8, 64}, cuda).requires_grad_();
  const auto q = torch::randn({1, 2, 3, 4}, cuda).requires_grad_();
  const auto dropped = dt::detail::dropout(h, kDropout, /*training=*/true, /*lean=*/true);
  const auto relu_dropped = dt::detail::relu_dropout(h, kDropout, true, true);
  const auto attended = dt::detail::attention(q, q, q, std::nullopt, kDropout, true, true);
  for (const auto& y : {dropped, relu_dropped, attended}) {
    CATCH_CHECK(y.is_cuda());
    CATCH_CHECK(!has_node(y, "MaskFunction"));
    CATCH_CHECK(!has_node(y, "DropoutAttentionFunction"));
  }
  // dropout(relu(h)): zero where h is not positive, h / (1 - p) or 0 elsewhere.
  const auto kept = relu_dropped != 0;
  CATCH_CHECK(!(kept & (h <= 0)).any().item<bool>());
  CATCH_CHECK(torch::allclose(relu_dropped.masked_select(kept), (h / (1 - kDropout)).masked_select(kept)));
  relu_dropped.sum().backward();
  CATCH_CHECK(torch::equal(h.grad() != 0, kept));
}

CATCH_TEST_CASE("attention with dropout in training matches torch's math, additive mask included", "[dropout]") {
  auto q = leaf({2, 3, 5, 4}), k = leaf({2, 3, 6, 4}), v = leaf({2, 3, 6, 4});
  auto bias = leaf({1, 3, 5, 6});  // T5's position bias is trained in full fine-tuning
  torch::manual_seed(11);
  const auto ours = dt::detail::attention(q, k, v, bias, kDropout, /*training=*/true, /*lean=*/true, /*scale=*/1.0);
  check_same(ours, reference_attention(q, k, v, bias, 1.0, mask_after_seed(11, {2, 3, 5, 6})), {q, k, v, bias});
}

CATCH_TEST_CASE("attention with a bool mask scales by 1/sqrt(d) and leaves a fully masked row zero", "[dropout]") {
  auto q = leaf({2, 2, 3, 4}), k = leaf({2, 2, 5, 4}), v = leaf({2, 2, 5, 4});
  auto attend = torch::ones({2, 1, 1, 5}, torch::kBool);
  attend.index_put_({1, 0, 0, torch::indexing::Slice(3)}, false);
  torch::manual_seed(13);
  const auto ours = dt::detail::attention(q, k, v, attend, kDropout, /*training=*/true, /*lean=*/true);
  check_same(ours, reference_attention(q, k, v, attend, 0.5, mask_after_seed(13, {2, 2, 3, 5})), {q, k, v});

  attend.index_put_({0}, false);
  const auto masked = dt::detail::attention(q, k, v, attend, kDropout, true, true);
  CATCH_CHECK(torch::equal(masked[0], torch::zeros_like(masked[0])));
  CATCH_CHECK(torch::isfinite(masked).all().item<bool>());
}

// What backward keeps (the gradients are checked against torch's above, with the generator
// moved on before backward): plain dropout and attention's dropout keep their mask's seed and
// draw the mask again, where a one-byte mask would add a byte an element, and attention
// computes its probabilities again, where keeping them would add (B, H, Tq, Tk) floats.
CATCH_TEST_CASE("lean dropout and attention keep their masks' seeds for backward, not the masks", "[dropout]") {
  const auto x = torch::randn({64, 256}).requires_grad_();
  const int64_t dropped_bytes = x.numel() * 4;  // the result
  CATCH_CHECK(dt::testing::bytes_kept([&] { return dt::detail::dropout(x, kDropout, true, true); }) <=
              dropped_bytes + 256);
  const auto q = torch::randn({2, 4, 32, 16}).requires_grad_(), k = torch::randn({2, 4, 48, 16}).requires_grad_(),
             v = torch::randn({2, 4, 48, 16}).requires_grad_();
  // The result and q scaled for its product (k and v are contiguous: kept as they are).
  const int64_t attention_bytes = (2 * 4 * 32 * 16 + q.numel()) * 4;
  CATCH_CHECK(dt::testing::bytes_kept([&] {
                return dt::detail::attention(q, k, v, std::nullopt, kDropout, /*training=*/true, /*lean=*/true);
              }) <= attention_bytes + 256);
}

CATCH_TEST_CASE("attention outside CPU training is torch's fused kernel", "[dropout]") {
  auto q = leaf({1, 2, 3, 4}), k = leaf({1, 2, 3, 4}), v = leaf({1, 2, 3, 4});
  const auto bias = torch::randn({1, 2, 3, 3}, torch::kDouble);
  const auto expected = torch::scaled_dot_product_attention(q, k, v, bias, 0.0, false, 1.0);
  CATCH_CHECK(torch::equal(dt::detail::attention(q, k, v, bias, kDropout, /*training=*/false, true, 1.0), expected));
  CATCH_CHECK(torch::equal(dt::detail::attention(q, k, v, bias, 0.0, /*training=*/true, true, 1.0), expected));
}

CATCH_TEST_CASE("lean = false runs torch's dropout and attention", "[dropout]") {
  auto x = leaf({4, 8}), q = leaf({1, 2, 3, 4}), k = leaf({1, 2, 3, 4}), v = leaf({1, 2, 3, 4});
  for (const bool lean : {false, true}) {
    CATCH_INFO("lean " << lean);
    torch::manual_seed(17);
    const auto dropped = dt::detail::dropout(x, kDropout, /*training=*/true, lean);
    const auto relu_dropped = dt::detail::relu_dropout(x, kDropout, true, lean);
    const auto attended = dt::detail::attention(q, k, v, std::nullopt, kDropout, true, lean);
    CATCH_CHECK(has_node(dropped, "MaskFunction") == lean);
    CATCH_CHECK(has_node(relu_dropped, "MaskFunction") == lean);
    CATCH_CHECK(has_node(attended, "DropoutAttentionFunction") == lean);
    if (lean) continue;  // the cases above check it against torch's math
    torch::manual_seed(17);
    CATCH_CHECK(torch::equal(dropped, torch::dropout(x, kDropout, true)));
    CATCH_CHECK(torch::equal(relu_dropped, torch::dropout(torch::relu(x), kDropout, true)));
    CATCH_CHECK(torch::equal(attended, torch::scaled_dot_product_attention(q, k, v, std::nullopt, kDropout)));
  }
}

CATCH_TEST_CASE("two BERTs in one process, one lean and one not, each train their own way", "[dropout]") {
  const auto config = bb::BertConfig().vocab_size(50).hidden_size(16).num_hidden_layers(1).num_attention_heads(2)
                          .intermediate_size(32).max_position_embeddings(16);
  CATCH_CHECK(config.lean_dropout());
  torch::manual_seed(0);
  bb::BertModel lean(config), plain(bb::BertConfig(config).lean_dropout(false));
  const auto lean_weights = lean->named_parameters();
  for (auto& p : plain->named_parameters()) p.value().detach().copy_(lean_weights[p.key()]);
  const auto ids = torch::randint(1, 50, {2, 6});
  std::vector<torch::Tensor> out, grads;
  for (auto* model : {&lean, &plain}) {
    (*model)->train();
    const auto& table = (*model)->embeddings->word_embeddings->weight.set_requires_grad(true);
    torch::manual_seed(3);
    out.push_back((*model)(ids).last_hidden_state);
    grads.push_back(torch::autograd::grad({(out.back() * out.back()).sum()}, {table})[0]);
  }
  CATCH_CHECK(has_node(out[0], "MaskFunction"));
  CATCH_CHECK(has_node(out[0], "DropoutAttentionFunction"));
  CATCH_CHECK_FALSE(has_node(out[1], "MaskFunction"));
  CATCH_CHECK_FALSE(has_node(out[1], "DropoutAttentionFunction"));
  // Dropout acted both ways (eval mode differs), and the lean model's masks follow the seed.
  for (auto* model : {&lean, &plain}) {
    (*model)->eval();
    CATCH_CHECK_FALSE(close((*model)(ids).last_hidden_state, out[model == &lean ? 0 : 1], {1e-3, 1e-3}));
  }
  lean->train();
  torch::manual_seed(3);
  CATCH_CHECK(torch::equal(lean(ids).last_hidden_state, out[0]));
}

CATCH_TEST_CASE("keep_mask draws independent masks at rate 1 - p, following the seed, at any thread count",
                "[dropout]") {
  // Binomial bounds at 6 standard deviations: a correct generator fails them once in 10^9 runs.
  const int64_t n = int64_t(1) << 22;
  const auto like = torch::empty({n});
  for (const double p : {0.1, 0.3, 0.5}) {
    CATCH_INFO("p " << p);
    torch::manual_seed(21);
    const auto kept = dt::detail::keep_mask(like, p).to(torch::kDouble);
    const auto within = [&](const torch::Tensor& draws, double rate) {
      const double sd = std::sqrt(rate * (1 - rate) / double(draws.numel()));
      CATCH_INFO("rate " << draws.mean().item<double>() << ", expected " << rate << " +- " << sd);
      CATCH_CHECK(std::abs(draws.mean().item<double>() - rate) < 6 * sd);
    };
    within(kept, 1 - p);
    // Neighbours (within and across the pairs one 64-bit output gives) and elements 7 apart are
    // kept together at the product of their rates.
    within(kept.slice(0, 0, n - 1) * kept.slice(0, 1), (1 - p) * (1 - p));
    within(kept.slice(0, 1, n - 1, 2) * kept.slice(0, 2, n, 2), (1 - p) * (1 - p));
    within(kept.slice(0, 0, n - 7) * kept.slice(0, 7), (1 - p) * (1 - p));
    // The next draw is another mask, independent of this one.
    within(kept * dt::detail::keep_mask(like, p).to(torch::kDouble), (1 - p) * (1 - p));
  }
  CATCH_CHECK(dt::detail::keep_mask(like, 0.0).all().item<bool>());

  // The seed decides the mask, whatever the thread count (restored after).
  const int threads = at::get_num_threads();
  std::vector<torch::Tensor> masks;
  for (const int t : {1, 3}) {
    at::set_num_threads(t);
    torch::manual_seed(8);
    masks.push_back(dt::detail::keep_mask(torch::empty({5, 100001}), 0.2));
  }
  at::set_num_threads(threads);
  CATCH_CHECK(torch::equal(masks[0], masks[1]));
  CATCH_CHECK(masks[0].sizes() == torch::IntArrayRef({5, 100001}));

  // Element pair i is the halves of SplitMix64's output i, whatever instruction set draws them
  // (AVX-512 where the CPU has it): the definition, one output at a time, for an odd count.
  torch::manual_seed(8);
  const uint64_t seed = dt::detail::draw_from_default_generator();
  const auto threshold = static_cast<uint64_t>(std::llround(0.8 * 4294967296.0));
  auto expected = torch::empty({5 * 100001}, torch::kBool);
  bool* kept = expected.data_ptr<bool>();
  for (int64_t i = 0; i < expected.numel(); ++i) {
    const uint64_t bits = dt::detail::splitmix64_output(seed, uint64_t(i / 2));
    kept[i] = ((i % 2 == 0 ? bits : bits >> 32) & 0xFFFFFFFFULL) < threshold;
  }
  CATCH_CHECK(torch::equal(masks[0].flatten(), expected));
}

}  // namespace dropout_test
