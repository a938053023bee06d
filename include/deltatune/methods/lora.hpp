// LoRA (Hu et al. 2021): W0 + (alpha / r) B A on a frozen Linear, A (r, in), B (out, r).
//
// A is Kaiming-uniform (a = sqrt 5, as nn.Linear and peft), B zero: the layer is unchanged
// at step 0. Dropout acts on the input of the low-rank path only. rsLoRA (Kalajdzievski
// 2023) scales by alpha / sqrt(r) instead. Parameter names as peft: lora_A, lora_B
// (peft keeps them as Linear submodules, lora_A.weight; the injector maps the names).
//
// DoRA (Liu et al. 2024; peft's use_dora): the weight split into a magnitude m (out) and a
// direction, W' = m * V / ||V|| with V = W0 + s B A and ||V|| each output row's norm. m starts
// at ||W0|| (the recipe sets it from the site's weight), so the layer is again unchanged at
// step 0. As the paper (section 4.3) and peft, ||V|| is treated as a constant in the backward,
// which saves the (out, in) gradient of V; the forward still forms V once per call to take
// its norms (peft does the same).
//
// PiSSA (Meng et al. 2024) and OLoRA (Büyükakyüz 2024; peft's init_lora_weights "pissa" /
// "olora") start A and B from the site's weight instead: PiSSA from its r principal singular
// triplets (B = U_r sqrt(S_r / s), A = sqrt(S_r / s) V_r^T), OLoRA from its QR decomposition
// (B = Q[:, :r], A = R[:r]). peft then overwrites the frozen weight with the residual
// W0 - s B0 A0; here the backbone stays untouched (other deltas may share it) and the delta
// subtracts s B0 A0 itself: W0 + s (B A - B0 A0), the same layer. B0 and A0 are frozen
// buffers, recomputed from the weight whenever the delta is built (also when it is loaded),
// never saved: the product B0 A0 is what counts, and it does not depend on the signs an SVD
// or QR routine picks.
#pragma once

#include <torch/torch.h>

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/delta_model.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/precision.hpp>
#include <deltatune/core/recipe.hpp>

namespace deltatune {

struct LoRAOptions {
  // Shapes 0: DeltaModel takes them from each site.
  LoRAOptions(int64_t in_features = 0, int64_t out_features = 0)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(int64_t, r) = 8;             // rank; the paper's GPT-3 runs use 1 to 64, peft's default is 8
  TORCH_ARG(double, alpha) = 8;          // scaling numerator; the paper sets alpha to the first r tried
  TORCH_ARG(double, dropout) = 0.0;      // on the low-rank path's input (peft lora_dropout)
  TORCH_ARG(bool, use_rslora) = false;   // scale alpha / sqrt(r) instead of alpha / r
  TORCH_ARG(bool, use_dora) = false;     // DoRA: a trained magnitude per output row
  TORCH_ARG(std::string, init) = "lora"; // "lora" (Kaiming A, zero B), "pissa" or "olora"
};

class LoRAImpl : public torch::nn::Cloneable<LoRAImpl>, public WeightDelta {
 public:
  explicit LoRAImpl(LoRAOptions options) : options(std::move(options)) { reset(); }

  void reset() override {
    const auto& o = options;
    detail::check<OptionError>(o.r() > 0, "LoRA: option r (rank) must be positive, got {}", o.r());
    detail::check<OptionError>(o.in_features() > 0 && o.out_features() > 0,
                               "LoRA: options in_features and out_features must be positive, got {} and {}",
                               o.in_features(), o.out_features());
    detail::check<OptionError>(o.dropout() >= 0 && o.dropout() < 1, "LoRA: option dropout must be in [0, 1), got {}",
                               o.dropout());
    detail::check<OptionError>(o.init() == "lora" || o.init() == "pissa" || o.init() == "olora",
                               "LoRA: option init must be \"lora\", \"pissa\" or \"olora\", got \"{}\"", o.init());
    detail::check<OptionError>(o.init() == "lora" || !o.use_dora(), "LoRA: init \"{}\" with use_dora is not supported "
                               "(peft's DoRA starts from LoRA's initialisation)", o.init());
    detail::check<OptionError>(o.init() == "lora" || o.r() <= std::min(o.in_features(), o.out_features()),
                               "LoRA: init \"{}\" takes r = {} components of a {} x {} weight, which has at most {}",
                               o.init(), o.r(), o.out_features(), o.in_features(), std::min(o.in_features(), o.out_features()));
    detail::check_parameters_fit(double(o.r()) * double(o.in_features() + o.out_features()),
                                 fmt::format("LoRA: r = {} on a {} x {} layer", o.r(), o.out_features(), o.in_features()));
    lora_A = register_parameter("lora_A", torch::empty({o.r(), o.in_features()}));
    lora_B = register_parameter("lora_B", torch::zeros({o.out_features(), o.r()}));
    // Ones until init_magnitude() sees the weight; a loaded delta's file replaces them.
    if (o.use_dora()) lora_magnitude_vector = register_parameter("lora_magnitude_vector", torch::ones({o.out_features()}));
    // Zeros until init_from_weight() sees the weight.
    if (starts_from_weight()) {
      lora_A_init = register_buffer("lora_A_init", torch::zeros_like(lora_A));
      lora_B_init = register_buffer("lora_B_init", torch::zeros_like(lora_B));
    }
    torch::NoGradGuard no_grad;
    torch::nn::init::kaiming_uniform_(lora_A, std::sqrt(5.0));
  }

  // PiSSA / OLoRA: A and B from the weight (see the header comment), kept as A0 and B0.
  // float32 at least, as peft decomposes.
  void init_from_weight(const torch::Tensor& base_weight) {
    detail::check<OptionError>(options.init() != "lora", "LoRA: init_from_weight is for init \"pissa\" or \"olora\"");
    torch::NoGradGuard no_grad;
    const auto w = base_weight.to(torch::promote_types(base_weight.scalar_type(), torch::kFloat32));
    const int64_t r = options.r();
    torch::Tensor a, b;
    if (options.init() == "pissa") {
      auto [u, s, vh] = torch::linalg_svd(w, /*full_matrices=*/false);
      const auto root = (s.narrow(0, 0, r) / scaling()).sqrt();
      a = root.unsqueeze(1) * vh.narrow(0, 0, r);
      b = u.narrow(1, 0, r) * root.unsqueeze(0);
    } else {
      auto [q, upper] = torch::linalg_qr(w);
      a = upper.narrow(0, 0, r);
      b = q.narrow(1, 0, r);
    }
    for (auto* t : {&lora_A, &lora_A_init}) t->copy_(a);
    for (auto* t : {&lora_B, &lora_B_init}) t->copy_(b);
  }

  // DoRA: m = ||W0 + s B A|| per output row, the layer's own magnitude (B is zero at init).
  void init_magnitude(const torch::Tensor& base_weight) {
    check_dora("init_magnitude");
    torch::NoGradGuard no_grad;
    lora_magnitude_vector.copy_(dora_norm(base_weight.to(lora_B.options())));
  }

  double scaling() const {
    return options.use_rslora() ? options.alpha() / std::sqrt(double(options.r())) : options.alpha() / options.r();
  }

  std::string method() const override { return "lora"; }
  nlohmann::json options_json() const override {
    return {{"in_features", options.in_features()}, {"out_features", options.out_features()}, {"r", options.r()},
            {"alpha", options.alpha()}, {"dropout", options.dropout()}, {"use_rslora", options.use_rslora()},
            {"use_dora", options.use_dora()}, {"init", options.init()}};
  }
  torch::nn::Module& module() override { return *this; }

  // (out, in) = s B A; DoRA: m / ||W0 + s B A|| (W0 + s B A) - W0, a row scaling once merged
  // (peft's merge, the norm taken from the weight being merged into).
  // PiSSA / OLoRA: s (B A - B0 A0).
  torch::Tensor delta_weight(const torch::Tensor& base_weight) override {
    auto low_rank = torch::mm(lora_B, lora_A) * scaling();
    if (starts_from_weight()) return low_rank - torch::mm(lora_B_init, lora_A_init) * scaling();
    if (!options.use_dora()) return low_rank;
    auto direction = base_weight + low_rank;
    return (lora_magnitude_vector / dora_norm(base_weight)).unsqueeze(1) * direction - base_weight;
  }

  // (..., in) -> (..., out): s B A dropout(x), never forming the (out, in) matrix; s scales
  // the (..., r) product, the narrowest tensor on the path. Dropout acts on x's copy in the
  // factors' float32 and keeps a one-byte mask (precision.hpp's LinearKeepingInput).
  // DoRA adds (g - 1) (x W0^T) + g s B A x, g = m / ||W0 + s B A||, so that the layer gives
  // g (x (W0 + s B A)^T) + b0. x W0^T is y0 - b0, but with dropout in training it is computed
  // from the dropped-out input (the same mask), as peft does. PiSSA / OLoRA subtract s B0 A0 x,
  // part of peft's residual weight and so without dropout.
  torch::Tensor delta_output(const torch::Tensor& x, const torch::Tensor& base_weight, const torch::Tensor& base_bias,
                             const torch::Tensor& base_output) override {
    const auto dropout = detail::InputDropout::draw(x, options.dropout(), is_training());
    const LowRankFactors low_rank{lora_A, lora_B, scaling()};
    if (starts_from_weight())
      return low_rank.output(x, dropout) - LowRankFactors{lora_A_init, lora_B_init, scaling()}.output(x);
    if (!options.use_dora()) return low_rank.output(x, dropout);
    auto g = lora_magnitude_vector / dora_norm(base_weight);
    // The frozen weight meets the dropped-out x in x's precision (precision.hpp's at_precision_of).
    auto base = base_bias.defined() ? base_output - base_bias : base_output;
    if (dropout.defined()) {
      const auto dropped = detail::MaskFunction::apply(x, dropout.kept, dropout.p);
      base = torch::nn::functional::linear(dropped, detail::at_precision_of(x, base_weight));
    }
    // g (s B A x) as s (g B) A x: g's gradient then keeps the (..., r) product, not the (..., out) one.
    return (g - 1) * base + LowRankFactors{lora_A, g.unsqueeze(1) * lora_B, scaling()}.output(x, dropout);
  }
  // x on a half-precision backbone as it comes: LowRankFactors::output's first product keeps it,
  // not a float32 copy.
  bool takes_half_input() const override { return true; }

  // s B A as one pair; PiSSA / OLoRA: s (B A - B0 A0) = [s B, -s B0] [A; A0], of rank 2r.
  // DoRA rescales by a norm of the whole weight and dropout acts per row: no such pair.
  std::optional<LowRankFactors> low_rank_factors() override {
    if (options.use_dora() || (options.dropout() > 0 && is_training())) return std::nullopt;
    if (!starts_from_weight()) return LowRankFactors{lora_A, lora_B, scaling()};
    return LowRankFactors{torch::cat({lora_A, lora_A_init}), torch::cat({lora_B, -lora_B_init}, 1), scaling()};
  }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::LoRA(in_features=" << options.in_features() << ", out_features=" << options.out_features()
           << ", r=" << options.r() << ", alpha=" << options.alpha() << ", dropout=" << options.dropout()
           << ", use_rslora=" << (options.use_rslora() ? "true" : "false")
           << ", use_dora=" << (options.use_dora() ? "true" : "false") << ", init=" << options.init() << ")";
  }

  LoRAOptions options;
  torch::Tensor lora_A, lora_B;
  torch::Tensor lora_magnitude_vector;  // DoRA's m (out); undefined without use_dora
  torch::Tensor lora_A_init, lora_B_init;  // PiSSA / OLoRA: A0, B0 (buffers); undefined otherwise

  bool starts_from_weight() const { return options.init() != "lora"; }

 private:
  // ||W0 + s B A|| per output row, detached (see the header comment).
  torch::Tensor dora_norm(const torch::Tensor& base_weight) {
    torch::NoGradGuard no_grad;
    return torch::linalg_vector_norm(base_weight + torch::mm(lora_B, lora_A) * scaling(), 2, {1});
  }
  void check_dora(const char* what) const {
    detail::check<OptionError>(options.use_dora(), "LoRA: {} is DoRA's; build the LoRA with use_dora(true)", what);
  }
};
TORCH_MODULE(LoRA);

// The shapes are absent from a recipe's options (0: DeltaModel takes them from each site).
inline LoRAOptions lora_options_from_json(const JsonFields& j) {
  return LoRAOptions(j.get<int64_t>("in_features", 0), j.get<int64_t>("out_features", 0))
      .r(j.get<int64_t>("r"))
      .alpha(j.get<double>("alpha"))
      .dropout(j.get<double>("dropout"))
      .use_rslora(j.get<bool>("use_rslora"))
      .use_dora(j.get<bool>("use_dora", false))  // absent from files written before DoRA
      .init(j.get<std::string>("init", "lora"));  // and before PiSSA
}

// LoRA on Linear sites (default, as peft: q, v on T5; query, value on BERT).
class LoRARecipe : public RecipeBase<LoRAOptions> {
 public:
  explicit LoRARecipe(LoRAOptions options)
      : RecipeBase(std::move(options), Site::Kind::linear, {{"t5", "q|v"}, {"bert", "query|value"}}) {}
  std::string method() const override { return "lora"; }
  nlohmann::json options_json() const override {
    return {{"r", options.r()}, {"alpha", options.alpha()}, {"dropout", options.dropout()},
            {"use_rslora", options.use_rslora()}, {"use_dora", options.use_dora()}, {"init", options.init()}};
  }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    auto lora = LoRA(LoRAOptions(options).in_features(site.linear->in_features).out_features(site.linear->out_features));
    if (options.use_dora()) lora->init_magnitude(site.linear->weight);
    if (lora->starts_from_weight()) lora->init_from_weight(site.linear->weight);
    return lora.ptr();
  }
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const LoRAOptions& o) { return std::make_shared<LoRARecipe>(o); }

// The method table's rows: r 8 with alpha = r (a command line's rank sets both), LoRA's GLUE
// learning rate (RoBERTa-base, 5e-4) on either backbone; DoRA the same, its direction being
// LoRA's and the magnitudes starting at the weights' own; PiSSA and OLoRA too, being LoRA
// started elsewhere (tools/lr_sweep measures how well each rate fits).
inline MethodInfo lora_method_info() {
  const auto preset = [](bool dora, const std::string& init) {
    return [dora, init](const PresetSizes& s) {
      const int64_t r = s.rank > 0 ? s.rank : 8;
      return make_recipe(LoRAOptions().r(r).alpha(double(r)).use_dora(dora).init(init));
    };
  };
  const std::map<std::string, double> rate = {{"t5", 5e-4}, {"bert", 5e-4}};
  return {{"lora"},
          [](const JsonFields& j) { return make_recipe(lora_options_from_json(j)); },
          {{"lora", "LoRA, r 8 (alpha = r) on q, v / query, value", rate, preset(false, "lora")},
           {"dora", "DoRA: LoRA r 8 (alpha = r) with trained magnitudes, on q, v / query, value", rate,
            preset(true, "lora")},
           {"pissa", "PiSSA: LoRA r 8 (alpha = r) from the weights' principal singular vectors, on q, v / query, value",
            rate, preset(false, "pissa")},
           {"olora", "OLoRA: LoRA r 8 (alpha = r) from the weights' QR decomposition, on q, v / query, value", rate,
            preset(false, "olora")}}};
}

// ---- Combining LoRA deltas (peft's add_weighted_adapter) ----

// How combine_lora() mixes its inputs, by peft's combination_type names:
//   "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune": A and B mixed separately,
//       each input weighted by sign(w s) sqrt(|w s|) (s its scaling), so that equal inputs
//       give back w s B A; inputs of one rank. The products' cross terms (B_1 A_2, ...) are
//       part of these methods, as in peft.
//   "cat": [B_1, B_2, ...] [w_1 s_1 A_1; w_2 s_2 A_2; ...], exactly sum w_i s_i B_i A_i, rank the sum.
//   "svd": sum w_i s_i B_i A_i, truncated to svd_rank by an SVD (B = U S, A = V^T).
// TIES (Yadav et al. 2023) keeps each input's `density` largest entries by magnitude and, per
// entry, only the inputs agreeing with the majority sign ("total": the sign of the sum;
// "frequency": the commoner sign), averaged; DARE (Yu et al. 2024) drops entries at random,
// keeping each with probability `density`, and rescales the kept by 1 / density;
// magnitude_prune keeps the `density` largest entries.
struct LoRACombineOptions {
  TORCH_ARG(std::string, how) = "svd";                   // peft's default combination_type
  TORCH_ARG(double, density) = 1.0;                      // ties, dare_*, magnitude_prune: the share kept
  TORCH_ARG(std::string, majority_sign_method) = "total";  // ties, dare_ties: "total" or "frequency"
  TORCH_ARG(int64_t, svd_rank) = 0;                      // svd: 0 takes the largest input rank
  TORCH_ARG(uint64_t, seed) = 0;                         // dare_*: the masks' CPU generator
};

namespace detail {

// The `density` largest entries of t by magnitude (peft's magnitude_based_pruning).
inline torch::Tensor keep_largest(const torch::Tensor& t, double density) {
  if (density >= 1) return t;
  const auto k = int64_t(density * double(t.numel()));
  auto mask = torch::zeros({t.numel()}, t.options());
  mask.index_fill_(0, std::get<1>(torch::topk(t.abs().reshape(-1), k)), 1);
  return t * mask.view(t.sizes());
}

// DARE's random drop: each entry kept with probability `density`, then rescaled by 1 / density.
inline torch::Tensor drop_and_rescale(const torch::Tensor& t, double density, at::Generator& generator) {
  if (density >= 1) return t;
  return t * torch::bernoulli(torch::full_like(t, density), generator) / density;
}

// One mixed tensor from each input's (already pruned) tensor and weight.
inline torch::Tensor mix(const std::vector<torch::Tensor>& tensors, const std::vector<double>& weights,
                         const LoRACombineOptions& o) {
  auto stacked = torch::stack(tensors);
  std::vector<int64_t> shape(size_t(stacked.dim()), 1);
  shape[0] = int64_t(weights.size());
  const auto w = torch::tensor(weights, stacked.options()).view(shape);
  const auto weighted = stacked * w;
  if (o.how() != "ties" && o.how() != "dare_ties") return weighted.sum(0);
  // The majority sign per entry, of the unweighted tensors (as peft), zeros voting for no one.
  const auto sign = stacked.sign();
  const auto votes = o.majority_sign_method() == "total" ? stacked.sum(0) : sign.sum(0);
  const auto agree = (sign == torch::where(votes >= 0, 1.0, -1.0).to(sign.scalar_type())).to(stacked.scalar_type());
  return (weighted * agree).sum(0) / torch::clamp(agree.sum(0), 1.0);
}

inline torch::Tensor combine_tensors(const std::vector<torch::Tensor>& tensors, const std::vector<double>& weights,
                                     const LoRACombineOptions& o, at::Generator& generator) {
  std::vector<torch::Tensor> pruned;
  for (const auto& t : tensors) {
    if (o.how() == "ties" || o.how() == "magnitude_prune") pruned.push_back(keep_largest(t, o.density()));
    else if (o.how() == "dare_linear" || o.how() == "dare_ties") pruned.push_back(drop_and_rescale(t, o.density(), generator));
    else pruned.push_back(t);
  }
  return mix(pruned, weights, o);
}

// One site's A and B from the inputs attached there, each weighted by w s (s its scaling).
inline std::pair<torch::Tensor, torch::Tensor> combined_factors(const std::vector<std::pair<LoRAImpl*, double>>& inputs,
                                                                const LoRACombineOptions& o, int64_t rank,
                                                                at::Generator& generator) {
  std::vector<torch::Tensor> as, bs;
  std::vector<double> weights;
  for (const auto& [lora, w] : inputs) {
    as.push_back(lora->lora_A);
    bs.push_back(lora->lora_B);
    weights.push_back(w * lora->scaling());
  }
  if (o.how() == "cat") {
    for (size_t i = 0; i < as.size(); ++i) as[i] = as[i] * weights[i];
    return {torch::cat(as, 0), torch::cat(bs, 1)};
  }
  if (o.how() == "svd") {
    auto delta = torch::zeros({bs[0].size(0), as[0].size(1)}, as[0].options());
    for (size_t i = 0; i < as.size(); ++i) delta += weights[i] * torch::mm(bs[i], as[i]);
    auto [u, s, vh] = torch::linalg_svd(delta, /*full_matrices=*/false);
    const auto k = std::min(rank, s.size(0));
    return {vh.narrow(0, 0, k), u.narrow(1, 0, k) * s.narrow(0, 0, k)};
  }
  // A and B mixed apart: sign(w s) sqrt(|w s|) on each, so that B A carries w s.
  for (auto& w : weights) w = (w >= 0 ? 1.0 : -1.0) * std::sqrt(std::abs(w));
  auto a = combine_tensors(as, weights, o, generator);  // all A first, then all B: peft's order of masks
  auto b = combine_tensors(bs, weights, o, generator);
  return {a, b};
}

}  // namespace detail

// Adds delta `name`: the LoRA deltas `inputs` ({name, weight}, weights of any sign) mixed as
// options.how() says, as peft's add_weighted_adapter mixes them (README: Combining deltas).
// Its sites are the inputs' sites together, and at each the inputs attached there take part;
// its scaling is 1 (alpha = r), the inputs' own scalings being folded into A and B. DoRA,
// PiSSA and OLoRA inputs are refused: their magnitudes and initial factors do not add up.
inline DeltaModel::Entry& combine_lora(DeltaModel& model, const std::string& name,
                                       const std::vector<std::pair<std::string, double>>& inputs,
                                       const LoRACombineOptions& options = {}) {
  const auto& o = options;
  static const std::set<std::string> hows = {"linear", "cat", "svd", "ties", "dare_linear", "dare_ties",
                                             "magnitude_prune"};
  detail::check<OptionError>(hows.count(o.how()), "combine_lora: option how must be one of {}, got \"{}\"",
                             fmt::join(hows, ", "), o.how());
  detail::check<OptionError>(o.density() >= 0 && o.density() <= 1, "combine_lora: option density must be in [0, 1], "
                             "got {}", o.density());
  detail::check<OptionError>(o.majority_sign_method() == "total" || o.majority_sign_method() == "frequency",
                             "combine_lora: option majority_sign_method must be \"total\" or \"frequency\", got \"{}\"",
                             o.majority_sign_method());
  detail::check<OptionError>(o.svd_rank() >= 0, "combine_lora: option svd_rank must be 0 or more, got {}", o.svd_rank());
  detail::check<OptionError>(!inputs.empty(), "combine_lora: no deltas to combine into '{}'", name);
  // Each site's inputs present there, with their weights, in the model's site order.
  std::map<std::string, std::vector<std::pair<LoRAImpl*, double>>> at_site;
  std::set<int64_t> ranks;
  int64_t rank_sum = 0;
  for (const auto& [input, weight] : inputs) {
    const auto it = model.deltas().find(input);
    detail::check<OptionError>(it != model.deltas().end(), "combine_lora: this model has no delta named '{}'", input);
    detail::check<OptionError>(std::isfinite(weight), "combine_lora: the weight of '{}' must be finite, got {}", input,
                               weight);
    for (const auto& a : it->second.attachments) {
      auto* lora = dynamic_cast<LoRAImpl*>(a.delta.get());
      detail::check<OptionError>(lora != nullptr, "combine_lora: delta '{}' is {}, not LoRA", input,
                                 it->second.recipe->method());
      detail::check<OptionError>(!lora->options.use_dora() && !lora->starts_from_weight(), "combine_lora: delta '{}' "
                                 "is {}, which combines with no other: only plain LoRA deltas do", input,
                                 lora->options.use_dora() ? "DoRA" : lora->options.init());
      at_site[a.site.name].emplace_back(lora, weight);
      ranks.insert(lora->options.r());
    }
    rank_sum += dynamic_cast<LoRAImpl&>(*it->second.attachments.front().delta).options.r();
  }
  int64_t rank = *ranks.rbegin();
  if (o.how() == "cat") {
    rank = rank_sum;
  } else if (o.how() == "svd") {
    rank = o.svd_rank() > 0 ? o.svd_rank() : rank;
  } else {
    detail::check<OptionError>(ranks.size() == 1, "combine_lora: \"{}\" mixes A and B entry by entry, so the deltas "
                               "need one rank; they have ranks {} (\"cat\" and \"svd\" take any)", o.how(),
                               fmt::join(ranks, ", "));
  }
  std::vector<std::string> sites;
  for (const auto& site : model.sites())
    if (at_site.count(site.name)) sites.push_back(site.name);
  auto& entry = model.add(name, LoRAOptions().r(rank).alpha(double(rank)), fmt::format("{}", fmt::join(sites, "|")));
  auto generator = at::detail::createCPUGenerator(o.seed());
  torch::NoGradGuard no_grad;
  for (auto& a : entry.attachments) {
    auto& target = dynamic_cast<LoRAImpl&>(*a.delta);
    auto [lora_a, lora_b] = detail::combined_factors(at_site.at(a.site.name), o, rank, generator);
    target.lora_A.zero_().narrow(0, 0, lora_a.size(0)).copy_(lora_a);
    target.lora_B.zero_().narrow(1, 0, lora_b.size(1)).copy_(lora_b);
  }
  return entry;
}

}  // namespace deltatune
