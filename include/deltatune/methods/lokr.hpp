// LoKr (peft's LoKrConfig, from LyCORIS; Kronecker adapters as in Edalati et al. 2022, "KronA"):
// W0 + s (W1 (x) W2) on a frozen Linear, s = alpha / r.
//
// As peft 0.18.1: out = a c and in = b d, each split by lokr_factorization() (the factor pair
// nearest the square root, or decompose_factor and the rest), W1 (a, b) the smaller factor and
// W2 (c, d) the larger. W2 is a rank-r product w2_a w2_b when r is under half its larger side,
// W1 only with decompose_both; otherwise each is a full matrix. peft's init: W1 (or w1_a) zero,
// the rest Kaiming-uniform (a = sqrt 5), so the layer is unchanged at step 0; init "lycoris"
// zeroes W2 (or w2_b) instead. rank_dropout drops output rows of the delta while training
// (rescaled by the kept share with rank_dropout_scale); module_dropout skips the whole delta.
//
// The forward never forms the (out, in) matrix: (W1 (x) W2) x = vec(W1 X W2^T) for X = x as a
// (b, d) matrix, two thin products of a b d + a d c multiply-adds per row (or b d c + a b c, the
// cheaper order is taken) instead of a b c d; 768 x 768 at r 8 costs 43k instead of 590k. The
// fused kron_sum kernels (kernels/kron_sum.hpp) build PHM's sums of n products of n x n factors;
// one product of rectangular factors is not of that form, and their factored path, which never
// builds W either, is what this forward does. Merging builds s W1 (x) W2 once.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/precision.hpp>
#include <deltatune/core/recipe.hpp>

namespace deltatune {

// peft's factorization(dimension, factor): (m, n) with m n = dimension and m <= n. A positive
// factor that divides the dimension gives (factor, dimension / factor); otherwise the pair is
// walked up from (1, dimension) while the sum m + n does not grow and m stays within the factor
// (-1: no bound), which ends at the divisor pair nearest the square root.
inline std::pair<int64_t, int64_t> lokr_factorization(int64_t dimension, int64_t factor = -1) {
  if (factor > 0 && dimension % factor == 0) return {factor, dimension / factor};
  if (factor == -1) factor = dimension;
  int64_t m = 1, n = dimension;
  while (m < n) {
    int64_t new_m = m + 1;
    while (dimension % new_m != 0) ++new_m;
    const int64_t new_n = dimension / new_m;
    if (new_m + new_n > m + n || new_m > factor) break;
    m = new_m;
    n = new_n;
  }
  return {std::min(m, n), std::max(m, n)};
}

struct LoKrOptions {
  // Shapes 0: DeltaModel takes them from each site.
  LoKrOptions(int64_t in_features = 0, int64_t out_features = 0)
      : in_features_(in_features), out_features_(out_features) {}
  TORCH_ARG(int64_t, in_features);
  TORCH_ARG(int64_t, out_features);
  TORCH_ARG(int64_t, r) = 8;                  // the factors' rank where they are low-rank (peft's default)
  TORCH_ARG(double, alpha) = 8;               // s = alpha / r (peft's default)
  TORCH_ARG(double, rank_dropout) = 0.0;      // share of the delta's output rows dropped while training
  TORCH_ARG(bool, rank_dropout_scale) = false;  // rescale the kept rows by 1 / their share
  TORCH_ARG(double, module_dropout) = 0.0;    // chance of skipping the delta in a training step
  TORCH_ARG(bool, decompose_both) = false;    // W1 low-rank too (when r is under half its larger side)
  TORCH_ARG(int64_t, decompose_factor) = -1;  // -1: split sizes near their square root; else this factor
  TORCH_ARG(std::string, init) = "peft";      // "peft": W1 starts at zero; "lycoris": W2 does
};

class LoKrImpl : public torch::nn::Cloneable<LoKrImpl>, public WeightDelta {
 public:
  explicit LoKrImpl(LoKrOptions options) : options(std::move(options)) { reset(); }

  void reset() override {
    const auto& o = options;
    check_options();
    std::tie(a_, c_) = lokr_factorization(o.out_features(), o.decompose_factor());
    std::tie(b_, d_) = lokr_factorization(o.in_features(), o.decompose_factor());
    const bool full_w1 = !(o.decompose_both() && 2 * o.r() < std::max(a_, b_));
    const bool full_w2 = !(2 * o.r() < std::max(c_, d_));
    const auto size = [&](bool full, int64_t rows, int64_t cols) {
      return full ? double(rows) * double(cols) : double(o.r()) * double(rows + cols);
    };
    detail::check_parameters_fit(size(full_w1, a_, b_) + size(full_w2, c_, d_),
                                 fmt::format("LoKr: r = {} on a {} x {} layer", o.r(), o.out_features(), o.in_features()));
    register_factor("lokr_w1", full_w1, a_, b_, lokr_w1, lokr_w1_a, lokr_w1_b);
    register_factor("lokr_w2", full_w2, c_, d_, lokr_w2, lokr_w2_a, lokr_w2_b);
    initialise();
  }

  std::string method() const override { return "lokr"; }
  nlohmann::json options_json() const override {
    const auto& o = options;
    return {{"in_features", o.in_features()}, {"out_features", o.out_features()}, {"r", o.r()}, {"alpha", o.alpha()},
            {"rank_dropout", o.rank_dropout()}, {"rank_dropout_scale", o.rank_dropout_scale()},
            {"module_dropout", o.module_dropout()}, {"decompose_both", o.decompose_both()},
            {"decompose_factor", o.decompose_factor()}, {"init", o.init()}};
  }
  torch::nn::Module& module() override { return *this; }

  double scaling() const { return options.alpha() / double(options.r()); }
  // W1 (a, b) and W2 (c, d), formed from their low-rank factors where they have them.
  torch::Tensor w1() const { return lokr_w1.defined() ? lokr_w1 : torch::mm(lokr_w1_a, lokr_w1_b); }
  torch::Tensor w2() const { return lokr_w2.defined() ? lokr_w2 : torch::mm(lokr_w2_a, lokr_w2_b); }

  // (out, in) = s W1 (x) W2, peft's make_kron.
  torch::Tensor delta_weight(const torch::Tensor&) override { return torch::kron(w1(), w2()) * scaling(); }

  // (..., in) -> (..., out): s vec(W1 X W2^T), X = x as (b, d), never forming (out, in).
  torch::Tensor delta_output(const torch::Tensor& x, const torch::Tensor&, const torch::Tensor&,
                             const torch::Tensor&) override {
    auto shape = x.sizes().vec();
    shape.back() = options.out_features();
    if (is_training() && options.module_dropout() > 0 && torch::rand({1}).item<double>() <= options.module_dropout())
      return torch::zeros(shape, x.options());
    const auto X = x.reshape({-1, b_, d_});
    // The cheaper order; a half-precision x takes W2 first, in a product that keeps x, not the
    // float32 copy W1's product would keep.
    const bool w1_first = !is_half(x.scalar_type()) && a_ * b_ * d_ + a_ * d_ * c_ <= b_ * d_ * c_ + a_ * b_ * c_;
    const auto Y = w1_first ? torch::matmul(torch::matmul(w1(), X), w2().t())                // (M, a, d), (M, a, c)
                            : torch::matmul(w1(), detail::linear_in_precision_of(X, w2()));  // (M, b, c), (M, a, c)
    auto y = Y.reshape(shape) * scaling();
    if (is_training() && options.rank_dropout() > 0) y = y * rank_dropout_mask(y.options());
    return y;
  }
  bool takes_half_input() const override { return true; }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::LoKr(in_features=" << options.in_features() << ", out_features=" << options.out_features()
           << ", W1=" << a_ << "x" << b_ << (lokr_w1.defined() ? "" : " low-rank") << ", W2=" << c_ << "x" << d_
           << (lokr_w2.defined() ? "" : " low-rank") << ", r=" << options.r() << ", alpha=" << options.alpha() << ")";
  }

  LoKrOptions options;
  // Each factor is either full (lokr_w1, lokr_w2) or low-rank (lokr_w*_a (rows, r), lokr_w*_b
  // (r, cols)), peft's names; the other form is undefined.
  torch::Tensor lokr_w1, lokr_w1_a, lokr_w1_b;  // W1 (a, b), zero at peft's init
  torch::Tensor lokr_w2, lokr_w2_a, lokr_w2_b;  // W2 (c, d)

 private:
  void check_options() const {
    const auto& o = options;
    detail::check<OptionError>(o.r() > 0, "LoKr: option r (rank) must be positive, got {}", o.r());
    detail::check<OptionError>(o.in_features() > 0 && o.out_features() > 0,
                               "LoKr: options in_features and out_features must be positive, got {} and {}",
                               o.in_features(), o.out_features());
    detail::check<OptionError>(std::isfinite(o.alpha()), "LoKr: option alpha must be finite, got {}", o.alpha());
    detail::check<OptionError>(o.rank_dropout() >= 0 && o.rank_dropout() < 1,
                               "LoKr: option rank_dropout must be in [0, 1), got {}", o.rank_dropout());
    detail::check<OptionError>(o.module_dropout() >= 0 && o.module_dropout() < 1,
                               "LoKr: option module_dropout must be in [0, 1), got {}", o.module_dropout());
    detail::check<OptionError>(o.decompose_factor() == -1 || o.decompose_factor() > 0,
                               "LoKr: option decompose_factor must be -1 (sizes split near their square root) or "
                               "positive, got {}", o.decompose_factor());
    detail::check<OptionError>(o.init() == "peft" || o.init() == "lycoris",
                               "LoKr: option init must be \"peft\" or \"lycoris\", got \"{}\"", o.init());
  }

  void register_factor(const std::string& name, bool full, int64_t rows, int64_t cols, torch::Tensor& whole,
                       torch::Tensor& left, torch::Tensor& right) {
    if (full) {
      whole = register_parameter(name, torch::empty({rows, cols}));
    } else {
      left = register_parameter(name + "_a", torch::empty({rows, options.r()}));
      right = register_parameter(name + "_b", torch::empty({options.r(), cols}));
    }
  }

  // peft's reset_adapter_parameters (init "peft") and reset_adapter_parameters_lycoris_way:
  // one factor's zero makes the product zero, the others Kaiming-uniform.
  void initialise() {
    torch::NoGradGuard no_grad;
    const auto kaiming = [](torch::Tensor& t) {
      if (t.defined()) torch::nn::init::kaiming_uniform_(t, std::sqrt(5.0));
    };
    for (auto* t : {&lokr_w1, &lokr_w1_a, &lokr_w1_b, &lokr_w2, &lokr_w2_a, &lokr_w2_b}) kaiming(*t);
    auto& zero = options.init() == "peft" ? (lokr_w1.defined() ? lokr_w1 : lokr_w1_a)
                                          : (lokr_w2.defined() ? lokr_w2 : lokr_w2_b);
    zero.zero_();
  }

  // peft's rank dropout: each output row kept with probability 1 - rank_dropout, the kept
  // rows divided by their share when rank_dropout_scale.
  torch::Tensor rank_dropout_mask(const torch::TensorOptions& to) const {
    auto keep = (torch::rand({options.out_features()}) > options.rank_dropout()).to(torch::kFloat);
    if (options.rank_dropout_scale()) keep = keep / keep.mean();
    return keep.to(to);
  }

  int64_t a_ = 0, b_ = 0, c_ = 0, d_ = 0;  // W1 (a, b), W2 (c, d): out = a c, in = b d
};
TORCH_MODULE(LoKr);

inline LoKrOptions lokr_options_from_json(const JsonFields& j) {
  return LoKrOptions(j.get<int64_t>("in_features", 0), j.get<int64_t>("out_features", 0))
      .r(j.get<int64_t>("r"))
      .alpha(j.get<double>("alpha"))
      .rank_dropout(j.get<double>("rank_dropout"))
      .rank_dropout_scale(j.get<bool>("rank_dropout_scale"))
      .module_dropout(j.get<double>("module_dropout"))
      .decompose_both(j.get<bool>("decompose_both"))
      .decompose_factor(j.get<int64_t>("decompose_factor"))
      .init(j.get<std::string>("init"));
}

// LoKr on Linear sites (default, as peft: q, v on T5; query, value on BERT).
class LoKrRecipe : public RecipeBase<LoKrOptions> {
 public:
  explicit LoKrRecipe(LoKrOptions options)
      : RecipeBase(std::move(options), Site::Kind::linear, {{"t5", "q|v"}, {"bert", "query|value"}}) {}
  std::string method() const override { return "lokr"; }
  nlohmann::json options_json() const override {
    const auto& o = options;
    return {{"r", o.r()}, {"alpha", o.alpha()}, {"rank_dropout", o.rank_dropout()},
            {"rank_dropout_scale", o.rank_dropout_scale()}, {"module_dropout", o.module_dropout()},
            {"decompose_both", o.decompose_both()}, {"decompose_factor", o.decompose_factor()}, {"init", o.init()}};
  }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    return LoKr(LoKrOptions(options).in_features(site.linear->in_features).out_features(site.linear->out_features))
        .ptr();
  }
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const LoKrOptions& o) { return std::make_shared<LoKrRecipe>(o); }

// The method table's row: peft's r 8 and alpha 8 (a command line's rank sets both). W1 starts
// at zero and its gradient passes through W2, whose Kaiming entries are of size 1 / sqrt(d), so
// a step moves the delta less than one of LoRA's: on MiniLM's SST-2 tools/lr_sweep measured
// 0.509 at LoRA's 5e-4, 0.763 at 2e-3 and 0.820 at 8e-3, hence 8e-3 on BERT; on T5's
// built-in task 0.652 at 2e-3 and 0.993 at 2e-2, hence 2e-2 (the README's learning-rate table).
inline MethodInfo lokr_method_info() {
  return {{"lokr"},
          [](const JsonFields& j) { return make_recipe(lokr_options_from_json(j)); },
          {{"lokr", "LoKr, W1 (x) W2 with r 8 (alpha = r), on q, v / query, value",
            {{"t5", 2e-2}, {"bert", 8e-3}}, [](const PresetSizes& s) {
              const int64_t r = s.rank > 0 ? s.rank : 8;
              return make_recipe(LoKrOptions().r(r).alpha(double(r)));
            }}}};
}

}  // namespace deltatune
