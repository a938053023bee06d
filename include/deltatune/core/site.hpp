// Sites: the named places in a backbone where deltas act (DESIGN.md, layer 3).
//
// A backbone is built from modules that are sites: FrozenLinear (weight deltas; layer
// norms may be weight sites too), a
// sublayer that is an OutputSite (activation deltas on its output, before the residual),
// an attention that is an AttentionSite (prefix keys and values) and an input that is a
// PromptSite (prompt embeddings). find_sites() walks a module tree and returns every site
// under its Hugging Face module path, so backbones know nothing of methods and methods
// nothing of backbones. Sites hold shared references to the deltas attached to them;
// DeltaModel registers the deltas themselves in the backbone's module tree, under `deltas`.
// Weight, output and prompt sites also run mixed batches, each delta on its own rows (RowRouting).
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/precision.hpp>

namespace deltatune {

// A mixed batch (DeltaModel::route): which batch rows each delta acts on. Deltas it does
// not name act on no row; rows no delta names run through the bare site.
struct RowRouting {
  int64_t batch = 0;                          // the number of rows routed
  std::map<std::string, torch::Tensor> rows;  // delta name -> (n) int64 row indices, n > 0
  // Low-rank deltas' and bottleneck adapters' rows in two batched products per site, each row's
  // factors gathered (WeightDelta::low_rank_factors, ActivationDelta::bottleneck_factors);
  // false: each delta's rows in products of their own, as peft's mixed batch (for comparison).
  bool gather = true;
};

namespace detail {

// The rows that deltas gathered at a site compute, together. A row takes one delta at most
// (DeltaModel::route), so where the deltas take every row of the batch, the rows are the
// batch's own in order: the input is used as it is and the outputs added as they are.
// Otherwise the deltas' rows, concatenated, are gathered from the input and added back.
struct GatheredRows {
  torch::Tensor rows;   // (n): each delta's rows in turn
  torch::Tensor delta;  // (n): the delta of each computed row, an index into the deltas
  bool every_row = false;

  GatheredRows(const std::vector<torch::Tensor>& delta_rows, int64_t batch) {
    rows = torch::cat(delta_rows);
    delta = delta_of_rows(delta_rows);
    every_row = rows.size(0) == batch;
    if (every_row) delta = torch::empty_like(delta).index_put_({rows}, delta);  // in row order
  }
  // Delta k on each of its rows, as cat(delta_rows) holds them, built on the host from the row
  // counts: one copy to the device, not one operation per delta.
  static torch::Tensor delta_of_rows(const std::vector<torch::Tensor>& delta_rows) {
    std::vector<int64_t> which;
    for (size_t k = 0; k < delta_rows.size(); ++k)
      which.insert(which.end(), static_cast<size_t>(delta_rows[k].size(0)), static_cast<int64_t>(k));
    return torch::tensor(which, torch::kLong).to(delta_rows.front().device());
  }
  // The computed rows of x (B, ..., in), flattened to (n, L, in).
  torch::Tensor input(const torch::Tensor& x) const {
    const auto xs = every_row ? x : x.index_select(0, rows);
    return xs.reshape({xs.size(0), -1, xs.size(-1)});
  }
  // y (B, ..., out) plus the computed rows' outputs (n, L, out) at their rows.
  torch::Tensor add(const torch::Tensor& y, const torch::Tensor& out) const {
    auto shape = y.sizes().vec();
    shape.front() = out.size(0);
    const auto outputs = out.to(y.dtype()).view(shape);
    return every_row ? y + outputs : y.index_add(0, rows, outputs);
  }
  // Per-delta tensors, each zero-padded at its end of dimension `dim` to the largest size
  // there, stacked, and gathered per computed row: (n, ...).
  torch::Tensor per_row(const std::vector<torch::Tensor>& tensors, int64_t dim) const {
    int64_t size = 0;
    for (const auto& t : tensors) size = std::max(size, t.size(dim));
    std::vector<torch::Tensor> padded;
    for (const auto& t : tensors) {
      std::vector<int64_t> pad(2 * static_cast<size_t>(t.dim()), 0);  // (last dim's left, right, ...)
      pad[2 * static_cast<size_t>(t.dim() - 1 - dim) + 1] = size - t.size(dim);
      padded.push_back(size == t.size(dim) ? t : torch::constant_pad_nd(t, pad));
    }
    return torch::stack(padded).index_select(0, delta);
  }
};

// Low-rank deltas' rows with each row's factors, gathered: y plus x_i A_k^T B_k^T on each row i
// of x (B, ..., in) that low-rank delta k takes, all in two batched products. Each delta's
// factors are zero-padded to the largest rank (a zero row of A and column of B add nothing), so
// that the cost follows the rows, not the number of deltas.
struct GatheredLowRank {
  GatheredRows rows;
  torch::Tensor A, B;  // (n, rank, in), (n, out, rank)

  GatheredLowRank(const std::vector<std::pair<LowRankFactors, torch::Tensor>>& deltas, int64_t batch)
      : rows(rows_of(deltas), batch) {
    std::vector<torch::Tensor> As, Bs;
    std::vector<double> scales;
    for (const auto& [factors, delta_rows] : deltas)
      As.push_back(factors.A), Bs.push_back(factors.B), scales.push_back(factors.scale);
    A = rows.per_row(As, 0);
    B = rows.per_row(Bs, 1);
    if (std::any_of(scales.begin(), scales.end(), [](double s) { return s != 1.0; }))
      B = B * torch::tensor(scales, torch::kFloat64).to(B.options()).index_select(0, rows.delta).view({-1, 1, 1});
  }
  // A half-precision x's rows are kept as they come for backward, not their float32 copy.
  torch::Tensor add(const torch::Tensor& x, const torch::Tensor& y) const {
    return rows.add(y, torch::bmm(linear_in_precision_of(rows.input(x), A), transposed_operand(B)));
  }

 private:
  static std::vector<torch::Tensor> rows_of(const std::vector<std::pair<LowRankFactors, torch::Tensor>>& deltas) {
    std::vector<torch::Tensor> out;
    for (const auto& delta : deltas) out.push_back(delta.second);
    return out;
  }
};

// f(x) = act(x D^T + d) U^T + u in the factors' precision, x kept as it comes for backward
// (through LinearKeepingInput where it is half precision and they are not).
inline torch::Tensor bottleneck_output(const BottleneckFactors& f, const torch::Tensor& x) {
  const auto down = f.activation(linear_in_precision_of(x, f.down_weight, f.down_bias));
  return torch::nn::functional::linear(down, f.up_weight, f.up_bias);
}

// h plus f_k(x_i) on each row i of x (B, ..., d) that bottleneck adapter k takes, for adapters
// of one nonlinearity, in two batched products: bottlenecks zero-padded to the largest (a zero
// unit adds nothing, act(0) = 0) and gathered per row. One adapter alone takes plain products.
inline torch::Tensor add_gathered_bottlenecks(const torch::Tensor& x, const torch::Tensor& h,
                                              const std::vector<std::pair<BottleneckFactors, torch::Tensor>>& deltas) {
  const auto& act = deltas.front().first.activation;
  std::vector<torch::Tensor> downs, down_biases, ups, up_biases, rows;
  for (const auto& [f, delta_rows] : deltas) {
    downs.push_back(f.down_weight), down_biases.push_back(f.down_bias);
    ups.push_back(f.up_weight), up_biases.push_back(f.up_bias), rows.push_back(delta_rows);
  }
  const GatheredRows gathered(rows, x.size(0));
  if (deltas.size() == 1) return gathered.add(h, bottleneck_output(deltas.front().first, gathered.input(x)));
  // (n, L, m), in the adapters' precision; a half-precision x's rows kept as they come.
  const auto down = linear_in_precision_of(gathered.input(x), gathered.per_row(downs, 0),
                                           gathered.per_row(down_biases, 0));
  return gathered.add(h, linear_in_precision_of(act(down), gathered.per_row(ups, 1), gathered.per_row(up_biases, 0)));
}

// f(x) for a delta that computes in its own precision (precision.hpp): x cast to `dtype`, the
// delta_precision of a half-precision activation meeting float32 parameters, f's result cast
// back, autocast off (it would cast f's products back down); f(x) where there is none.
template <class F>
torch::Tensor in_delta_precision(std::optional<torch::ScalarType> dtype, const torch::Tensor& x, F&& f) {
  if (!dtype) return f(x);
  const AutocastOff off;
  return f(x.to(*dtype)).to(x.scalar_type());
}

}  // namespace detail

// The deltas attached to one site, in attachment order, each with a name (the DeltaModel's
// name for it), whether it is active, and, for weight deltas, whether it is merged.
template <class Delta>
class DeltaSlots {
 public:
  struct Slot {
    std::string name;
    std::shared_ptr<Delta> delta;
    bool active = true;
    bool merged = false;
  };

  void attach(const std::string& name, std::shared_ptr<Delta> delta) {
    detail::check<OptionError>(find(name) == nullptr, "a delta named '{}' is already attached here", name);
    slots_.push_back({name, std::move(delta)});
  }
  void detach(const std::string& name) {
    const auto* slot = &at(name);
    detail::check(!slot->merged, "delta '{}' is merged; unmerge it before removing it", name);
    slots_.erase(slots_.begin() + (slot - slots_.data()));
  }
  void set_active(const std::string& name, bool active) { at(name).active = active; }
  // Forgets every delta and the routing (the DeltaModel that attached them is gone).
  void clear() {
    slots_.clear();
    routing_.reset();
  }

  Slot* find(const std::string& name) {
    for (auto& slot : slots_)
      if (slot.name == name) return &slot;
    return nullptr;
  }
  Slot& at(const std::string& name) {
    auto* slot = find(name);
    detail::check(slot != nullptr, "no delta named '{}' is attached here", name);
    return *slot;
  }
  const std::vector<Slot>& slots() const { return slots_; }

  // The deltas that take part in a forward pass: active and not folded into the weights.
  std::vector<Delta*> running() const {
    std::vector<Delta*> out;
    for (const auto& slot : slots_)
      if (slot.active && !slot.merged) out.push_back(slot.delta.get());
    return out;
  }

  // Set by DeltaModel for a mixed batch, null otherwise: sites then call routed(), not running().
  const RowRouting* routing() const { return routing_.get(); }
  void set_routing(std::shared_ptr<const RowRouting> routing) { routing_ = std::move(routing); }

  // Under routing: each running delta that some row uses, with those rows' indices on `device`.
  // A batch of another size than the routing's is an error: its rows would go to the wrong deltas.
  std::vector<std::pair<Delta*, torch::Tensor>> routed(int64_t batch, const torch::Device& device) const {
    detail::check<ShapeError>(batch == routing_->batch, "DeltaModel::route was given {} row names, but a batch of {} "
                              "rows reached a routed site; route one name per row of the batch", routing_->batch, batch);
    std::vector<std::pair<Delta*, torch::Tensor>> out;
    for (const auto& slot : slots_) {
      auto it = routing_->rows.find(slot.name);
      if (slot.active && !slot.merged && it != routing_->rows.end()) out.emplace_back(slot.delta.get(), it->second.to(device));
    }
    return out;
  }

 private:
  std::vector<Slot> slots_;
  std::shared_ptr<const RowRouting> routing_;
};

// Sets requires_grad to false on every parameter: backbones are frozen when built.
inline void freeze(torch::nn::Module& module) {
  for (auto& p : module.parameters()) p.set_requires_grad(false);
}

// A frozen weight W (out, in), or a layer norm's scale (d), with an optional bias (out),
// that weight deltas act on: the module that owns them registers them as "weight" and
// "bias" and computes linear_with_deltas(x) (a Linear) or add_deltas(x, y) on its own output y.
class WeightSite {
 public:
  virtual ~WeightSite() = default;
  int64_t in_features = 0, out_features = 0;
  torch::Tensor weight, bias;
  DeltaSlots<WeightDelta> deltas;

  // Folds the delta into weight and bias (zero overhead at inference); refuses a delta
  // that is already merged or whose dW holds NaN or infinity. The first merge at a site keeps
  // an exact copy of the weight and bias (memory: one copy of the layer while anything is
  // merged here), so that unmerge can restore them bit for bit.
  void merge(const std::string& name) {
    auto& slot = deltas.at(name);
    detail::check(!slot.merged, "delta '{}' is already merged into this layer", name);
    torch::NoGradGuard no_grad;
    auto dW = slot.delta->delta_weight(weight);
    auto db = slot.delta->delta_bias(weight);
    detail::check(torch::isfinite(dW).all().item<bool>() && (!db.defined() || torch::isfinite(db).all().item<bool>()),
                  "delta '{}' holds NaN or infinite values; it was not merged", name);
    if (merge_order_.empty()) unmerged_ = {weight.clone(), bias.defined() ? bias.clone() : torch::Tensor()};
    fold(dW, db);
    slot.merged = true;
    merge_order_.push_back(name);
  }

  // Restores the weight and bias as they were before the first merge and folds the deltas
  // still merged back in, in merge order: subtracting dW would round otherwise than adding
  // it did (and IA3 would divide), so cycles of merge and unmerge would drift. A change made
  // to the weight while merged (a layer norm an adapter trains) is undone with the merge.
  void unmerge(const std::string& name) {
    auto& slot = deltas.at(name);
    detail::check(slot.merged, "delta '{}' is not merged into this layer", name);
    torch::NoGradGuard no_grad;
    slot.merged = false;
    merge_order_.erase(std::find(merge_order_.begin(), merge_order_.end(), name));
    weight.copy_(unmerged_.weight);
    if (unmerged_.bias.defined()) bias.copy_(unmerged_.bias);
    else if (bias.defined()) drop_bias();
    for (const auto& merged : merge_order_) {
      auto& delta = *deltas.at(merged).delta;
      fold(delta.delta_weight(weight), delta.delta_bias(weight));
    }
    if (merge_order_.empty()) unmerged_ = {};
  }

  // Forgets every delta here; merged ones stay folded into the weight and bias, as peft's
  // merge_and_unload leaves them (DeltaModel's destructor).
  void release_deltas() {
    deltas.clear();
    merge_order_.clear();
    unmerged_ = {};
  }

 protected:
  explicit WeightSite(torch::nn::Module* owner) : owner_(owner) {}

  // y, the frozen layer's output for input x, plus every running delta's contribution.
  torch::Tensor add_deltas(const torch::Tensor& x, const torch::Tensor& y) {
    if (deltas.routing()) return add_routed_outputs(x, y, deltas.routed(x.size(0), x.device()));
    return add_outputs(x, y, deltas.running());
  }

  // The frozen Linear x W^T + b with its running deltas, in one product where deltas scale
  // its input (IA3 on a feed-forward layer): (x * s) W^T + b, s = 1 + sum (s_i - 1), equal to
  // adding each one's delta_output; then the other deltas add their outputs in attachment order.
  torch::Tensor linear_with_deltas(const torch::Tensor& x) {
    if (deltas.routing()) return routed_linear_with_deltas(x);
    torch::Tensor scale;
    std::vector<WeightDelta*> additive;
    for (auto* delta : deltas.running()) {
      auto s = delta->input_scale(weight);
      if (!s.defined()) additive.push_back(delta);
      else scale = scale.defined() ? scale + (s - 1) : s;
    }
    return add_outputs(x, frozen_linear(scale.defined() ? x * detail::at_precision_of(x, scale) : x), additive);
  }

 private:
  using Routed = std::vector<std::pair<WeightDelta*, torch::Tensor>>;

  // x W^T + b in x's precision (a trained float32 weight or bias on a half-precision backbone is
  // cast for the product, as autocast would).
  torch::Tensor frozen_linear(const torch::Tensor& x) {
    return torch::nn::functional::linear(x, detail::at_precision_of(x, weight), detail::at_precision_of(x, bias));
  }

  torch::Tensor add_outputs(const torch::Tensor& x, torch::Tensor y, const std::vector<WeightDelta*>& running) {
    for (auto* delta : running) y = y + output_of(*delta, x, y);
    return y;
  }
  // One delta's output on x, y0 the frozen layer's: in the delta's precision, returned in y0's.
  // A low-rank delta, or one that takes x as it comes, on a half-precision x keeps x, not its
  // float32 copy, for backward.
  torch::Tensor output_of(WeightDelta& delta, const torch::Tensor& x, const torch::Tensor& y0) {
    const auto dtype = detail::delta_precision(delta.module(), x);
    if (dtype) {
      const detail::AutocastOff off;  // as in in_delta_precision
      if (const auto f = delta.low_rank_factors()) return f->output(x).to(y0.scalar_type());
      if (delta.takes_half_input()) return delta.delta_output(x, weight, bias, y0).to(y0.scalar_type());
    }
    const auto out = detail::in_delta_precision(dtype, x, [&](const torch::Tensor& xs) {
      return delta.delta_output(xs, weight, bias, y0);
    });
    return out.to(y0.scalar_type());
  }

  // A mixed batch: each delta's output on its own rows of x (B, ..., in) only, added to
  // those rows of y0 (B, ..., out). Two or more low-rank deltas take their rows together in
  // two batched products (detail::GatheredLowRank); the others, and a low-rank
  // delta alone, take products of their own, as peft's mixed batch does for every delta.
  torch::Tensor add_routed_outputs(const torch::Tensor& x, const torch::Tensor& y0, const Routed& routed) {
    const auto plan = plan_low_rank(routed, x.size(0));
    auto y = plan.gathered ? plan.gathered->add(x, y0) : y0;
    for (const size_t i : plan.one_by_one) {
      const auto& [delta, rows] = routed[i];
      y = y.index_add(0, rows, output_of(*delta, x.index_select(0, rows), y0.index_select(0, rows)));
    }
    return y;
  }

  // Which routed deltas a mixed batch gathers (two or more low-rank ones) and which take
  // products of their own (the others, and a low-rank delta alone: cheaper than a gather).
  struct LowRankPlan {
    std::optional<detail::GatheredLowRank> gathered;
    std::vector<size_t> one_by_one;  // indices into the routed deltas
  };
  LowRankPlan plan_low_rank(const Routed& routed, int64_t batch) {
    std::vector<std::pair<LowRankFactors, torch::Tensor>> low_rank;
    LowRankPlan plan;
    for (size_t i = 0; i < routed.size(); ++i) {
      auto factors = deltas.routing()->gather ? routed[i].first->low_rank_factors() : std::nullopt;
      if (factors) low_rank.emplace_back(std::move(*factors), routed[i].second);
      else plan.one_by_one.push_back(i);
    }
    if (low_rank.size() > 1) {
      plan.gathered.emplace(low_rank, batch);
    } else if (low_rank.size() == 1) {
      plan.one_by_one.clear();
      for (size_t i = 0; i < routed.size(); ++i) plan.one_by_one.push_back(i);
    }
    return plan;
  }

  // A mixed batch through the Linear: each input- or output-scaling delta's scale on its own
  // rows of one (B, in) or (B, out) scale (a row takes one delta), so that the whole batch is
  // still one product and one multiplication; then the other deltas' outputs on their rows
  // (which the output scale leaves as they are: it is 1 there).
  torch::Tensor routed_linear_with_deltas(const torch::Tensor& x) {
    Scales input_scales, output_scales;
    Routed additive;
    for (auto& [delta, rows] : deltas.routed(x.size(0), x.device())) {
      if (auto s = delta->input_scale(weight); s.defined()) input_scales.emplace_back(s, rows);
      else if (auto s = delta->output_scale(weight); s.defined()) output_scales.emplace_back(s, rows);
      else additive.emplace_back(delta, rows);
    }
    const auto input_scale = row_scales(x, in_features, input_scales);
    auto y = frozen_linear(input_scale.defined() ? x * input_scale : x);
    if (const auto output_scale = row_scales(y, out_features, output_scales); output_scale.defined()) y = y * output_scale;
    return add_routed_outputs(x, y, additive);
  }

  // Each scale s (features) on its own rows of a (B, features) scale, 1 elsewhere, viewed as
  // (B, 1, ..., 1, features) to broadcast over like's middle dimensions; undefined for none.
  using Scales = std::vector<std::pair<torch::Tensor, torch::Tensor>>;  // (scale, rows)
  static torch::Tensor row_scales(const torch::Tensor& like, int64_t features, const Scales& scales) {
    if (scales.empty()) return {};
    auto scale = torch::ones({like.size(0), features}, like.options());
    for (const auto& [s, rows] : scales) scale = scale.index_copy(0, rows, s.to(like.dtype()).expand({rows.size(0), -1}));
    std::vector<int64_t> shape(like.dim(), 1);
    shape.front() = like.size(0);
    shape.back() = features;
    return scale.view(shape);
  }

  // Adds dW and db (computed before either changes: IA3's db reads the bias).
  void fold(const torch::Tensor& dW, const torch::Tensor& db) {
    // A bias delta on a layer without one (BitFit on T5) gives it a frozen bias to fold into.
    if (db.defined() && !bias.defined())
      bias = owner_->register_parameter("bias", torch::zeros_like(db, weight.options()), false);
    weight.add_(dW);
    if (db.defined()) bias.add_(db);
  }

  // Removes the bias a merge gave a layer that had none. torch::nn::Module has no
  // unregister_parameter; its protected table is reachable through a derived class.
  void drop_bias() {
    struct Table : torch::nn::Module {
      static void erase(torch::nn::Module& module, const std::string& key) { (module.*&Table::parameters_).erase(key); }
    };
    Table::erase(*owner_, "bias");
    bias = torch::Tensor();
  }

  struct Unmerged {
    torch::Tensor weight, bias;  // bias undefined: the layer had none
  };

  torch::nn::Module* owner_;
  Unmerged unmerged_;                      // while a delta is merged: the weight and bias before the first merge
  std::vector<std::string> merge_order_;  // the deltas merged here, in the order they were
};

// y = x W^T + b with frozen W (out, in) and b (out), under the names "weight" and "bias"
// so that checkpoints load name to name; plus the weight deltas attached to it.
class FrozenLinearImpl : public torch::nn::Module, public WeightSite {
 public:
  FrozenLinearImpl(int64_t in_features, int64_t out_features, bool with_bias) : WeightSite(this) {
    this->in_features = in_features;
    this->out_features = out_features;
    weight = register_parameter("weight", torch::empty({out_features, in_features}), false);
    if (with_bias) bias = register_parameter("bias", torch::zeros({out_features}), false);
    // PyTorch's nn.Linear initialisation, so that a backbone built at random is usable.
    torch::NoGradGuard no_grad;
    torch::nn::init::kaiming_uniform_(weight, std::sqrt(5.0));
  }

  // (..., in) -> (..., out): the frozen layer plus every running delta's contribution.
  torch::Tensor forward(const torch::Tensor& x) { return linear_with_deltas(x); }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::FrozenLinear(in_features=" << in_features << ", out_features=" << out_features
           << ", bias=" << (bias.defined() ? "true" : "false") << ", deltas=" << deltas.slots().size() << ")";
  }
};
TORCH_MODULE(FrozenLinear);

// A sublayer whose output activation deltas act on: T5's `*.layer.{j}`, BERT's
// `*.attention.output` and `*.output`. The sublayer calls finish(h, residual, layer_norm)
// instead of ending itself.
class OutputSite {
 public:
  virtual ~OutputSite() = default;
  DeltaSlots<ActivationDelta> output_deltas;
  int64_t output_features = 0;  // the width d of h, set by the backbone: adapters are built to it

 protected:
  // Deltas apply in attachment order; the last one decides how the sublayer ends (the
  // default: h + f(h), then the backbone's own residual and layer norm).
  torch::Tensor finish(torch::Tensor h, const torch::Tensor& residual, const LayerNormFn& layer_norm) {
    if (output_deltas.routing()) return finish_routed(h, residual, layer_norm);
    const auto running = output_deltas.running();
    if (running.empty()) return ActivationDelta::end_sublayer(h, residual, layer_norm);
    for (size_t i = 0; i + 1 < running.size(); ++i)
      h = detail::in_delta_precision(detail::delta_precision(running[i]->module(), h), h,
                                     [&](const torch::Tensor& x) { return running[i]->forward(x); });
    return delta_sublayer(*running.back(), h, residual, layer_norm);
  }

  // The sublayer's end through `delta`, in its precision: h and the residual cast to it, the
  // layer norm taking them in it, the end cast back.
  // A bottleneck adapter on a half-precision h keeps its input, not a float32 copy, for
  // backward: h, or the normalised output as the bare sublayer computes it (as a mixed batch's
  // gathered adapters read it).
  static torch::Tensor delta_sublayer(ActivationDelta& delta, const torch::Tensor& h, const torch::Tensor& residual,
                                      const LayerNormFn& layer_norm) {
    const auto dtype = detail::delta_precision(delta.module(), h);
    if (dtype) {
      const detail::AutocastOff off;  // as in in_delta_precision
      if (const auto f = delta.bottleneck_factors()) {
        const auto x = f->reads_normed ? ActivationDelta::end_sublayer(h, residual, layer_norm) : h;
        const auto out = detail::bottleneck_output(*f, x);  // float32
        return ActivationDelta::end_sublayer(h + out, residual.to(out.scalar_type()), layer_norm).to(h.scalar_type());
      }
    }
    return detail::in_delta_precision(dtype, h, [&](const torch::Tensor& x) {
      return delta.forward_sublayer(x, residual.to(x.scalar_type()), layer_norm);
    });
  }

  // A mixed batch: h and residual (B, T, d). Bottleneck adapters add f(x) to their own rows
  // of h, those of one nonlinearity and input together (detail::add_gathered_bottlenecks), and
  // every row ends as the bare sublayer does; then each other delta's rows are replaced by
  // the delta's ending of those rows alone.
  torch::Tensor finish_routed(const torch::Tensor& h, const torch::Tensor& residual, const LayerNormFn& layer_norm) {
    using Gathered = std::vector<std::pair<BottleneckFactors, torch::Tensor>>;
    std::map<std::pair<bool, std::string>, Gathered> bottlenecks;  // by (reads_normed, nonlinearity)
    std::vector<std::pair<ActivationDelta*, torch::Tensor>> own;
    for (const auto& [delta, rows] : output_deltas.routed(h.size(0), h.device())) {
      auto factors = output_deltas.routing()->gather ? delta->bottleneck_factors() : std::nullopt;
      if (!factors) own.emplace_back(delta, rows);
      else bottlenecks[{factors->reads_normed, factors->non_linearity}].emplace_back(std::move(*factors), rows);
    }
    auto hidden = h;
    torch::Tensor normed;  // the bare sublayer's output, for adapters that read it (computed once)
    for (const auto& [key, group] : bottlenecks) {
      if (key.first && !normed.defined()) normed = ActivationDelta::end_sublayer(h, residual, layer_norm);
      hidden = detail::add_gathered_bottlenecks(key.first ? normed : h, hidden, group);
    }
    auto out = ActivationDelta::end_sublayer(hidden, residual, layer_norm);
    for (const auto& [delta, rows] : own)
      out = out.index_copy(0, rows, delta_sublayer(*delta, h.index_select(0, rows), residual.index_select(0, rows),
                                                   layer_norm));
    return out;
  }
};

// An attention layer that prefix deltas prepend keys and values to.
class AttentionSite {
 public:
  virtual ~AttentionSite() = default;
  DeltaSlots<InputDelta> prefix_deltas;
  std::string site_name;  // set by DeltaModel when it attaches a prefix: prefix deltas keep one key/value pair per site
  int64_t hidden_features = 0;     // the model width d the attention reads, set by the backbone
  int64_t key_value_features = 0;  // heads x d_head: the width of the keys and values prepended

  // The number of key positions the running prefix deltas prepend here.
  int64_t prefix_length() const {
    int64_t n = 0;
    for (auto* delta : prefix_deltas.running()) n += delta->num_virtual_tokens();
    return n;
  }

 protected:
  // The (B, P, inner) keys and values to prepend, or undefined tensors when no prefix runs.
  // The deltas compute them in their own precision (a prefix MLP's float32 products), under
  // autocast too; the attention casts them to its keys' dtype.
  std::pair<torch::Tensor, torch::Tensor> prefix_key_value(int64_t batch) {
    const detail::AutocastOff off;
    std::vector<torch::Tensor> keys, values;
    for (auto* delta : prefix_deltas.running()) {
      auto [key, value] = delta->prefix_key_value(site_name);
      if (!key.defined()) continue;
      keys.push_back(key);
      values.push_back(value);
    }
    if (keys.empty()) return {};
    return {torch::cat(keys).unsqueeze(0).expand({batch, -1, -1}),
            torch::cat(values).unsqueeze(0).expand({batch, -1, -1})};
  }
};

// One forward pass through some attention sites, opened by a backbone around the stack or
// model that holds them: their running prefix deltas see begin_pass() once before any site
// asks for keys and values, and end_pass() when the scope ends.
class ForwardPass {
 public:
  explicit ForwardPass(const std::vector<AttentionSite*>& sites) {
    for (auto* site : sites)
      for (auto* delta : site->prefix_deltas.running())
        if (std::find(deltas_.begin(), deltas_.end(), delta) == deltas_.end()) deltas_.push_back(delta);
    for (auto* delta : deltas_) delta->begin_pass();
  }
  ForwardPass(const ForwardPass&) = delete;
  ForwardPass& operator=(const ForwardPass&) = delete;
  ~ForwardPass() {
    for (auto* delta : deltas_) delta->end_pass();
  }

 private:
  std::vector<InputDelta*> deltas_;
};

// What PromptSite::prepend_prompts returns.
struct PromptedInput {
  torch::Tensor embeds;  // (B, P + T, d)
  torch::Tensor mask;    // (B, P + T); undefined where none was given and every position is seen
  // (B) int64: the position each row begins at, after the empty prompt slots of a mixed batch
  // (rows with shorter prompts, or none); undefined where every row begins at 0.
  torch::Tensor start;
};

// The input of an encoder that prompt deltas prepend trained embeddings to: T5's
// `encoder`, BERT's `embeddings` (before position embeddings are added).
class PromptSite {
 public:
  virtual ~PromptSite() = default;
  DeltaSlots<InputDelta> prompt_deltas;
  torch::Tensor embedding_table;  // the (V, d) word embeddings, set by the backbone: prompts start from its rows

 protected:
  // embeds (B, T, d) -> (B, P + T, d); mask (B, T) -> (B, P + T), prompts always visible.
  // An undefined mask stays undefined.
  PromptedInput prepend_prompts(const torch::Tensor& embeds, const torch::Tensor& mask) {
    if (prompt_deltas.routing() != nullptr) return prepend_routed_prompts(embeds, mask);
    std::vector<torch::Tensor> prompts;
    for (auto* delta : prompt_deltas.running())
      if (auto p = delta->prompt_embeddings(); p.defined()) prompts.push_back(p.to(embeds.dtype()));
    if (prompts.empty()) return {embeds, mask, {}};
    const int64_t batch = embeds.size(0);
    auto prompt = torch::cat(prompts).unsqueeze(0).expand({batch, -1, -1});  // (B, P, d)
    auto new_mask = mask;
    if (mask.defined()) new_mask = torch::cat({torch::ones({batch, prompt.size(1)}, mask.options()), mask}, 1);
    return {torch::cat({prompt, embeds}, 1), new_mask, {}};
  }

 private:
  // A mixed batch (DeltaModel::route): each row's prompts, its delta's or none, end where its
  // tokens begin, in as many slots as the longest prompts take; the slots before them are
  // masked. A row then sees what it sees alone, at the same distances (T5's relative
  // positions); BERT numbers positions from each row's start and pools there.
  PromptedInput prepend_routed_prompts(const torch::Tensor& embeds, const torch::Tensor& mask) {
    using torch::indexing::Slice;
    const int64_t batch = embeds.size(0);
    std::vector<std::pair<torch::Tensor, torch::Tensor>> routed;  // (P, d) prompts, their rows
    int64_t slots = 0;
    for (const auto& [delta, rows] : prompt_deltas.routed(batch, embeds.device())) {
      auto p = delta->prompt_embeddings();
      if (!p.defined()) continue;
      slots = std::max(slots, p.size(0));
      routed.emplace_back(p.to(embeds.dtype()), rows);
    }
    if (routed.empty()) return {embeds, mask, {}};
    auto prompts = torch::zeros({batch, slots, embeds.size(2)}, embeds.options());
    auto lengths = torch::zeros({batch}, embeds.options().dtype(torch::kLong));
    for (const auto& [p, rows] : routed) {
      const int64_t P = p.size(0);
      prompts.index_put_({rows, Slice(slots - P, torch::indexing::None)}, p.expand({rows.size(0), P, p.size(1)}));
      lengths.index_fill_(0, rows, P);
    }
    const auto start = slots - lengths;  // (B)
    const auto seen = torch::arange(slots, lengths.options()).unsqueeze(0) >= start.unsqueeze(1);  // (B, slots)
    const auto tokens = mask.defined() ? mask : torch::ones({batch, embeds.size(1)}, seen.options());
    return {torch::cat({prompts, embeds}, 1), torch::cat({seen.to(tokens.dtype()), tokens}, 1), start};
  }
};

// What a backbone says of itself: its Hugging Face model_type ("t5", "bert"), by which each
// method's default sites are keyed (DeltaRecipe::default_pattern).
class ReportsModelType {
 public:
  virtual ~ReportsModelType() = default;
  virtual std::string model_type() const = 0;
};

// The model_type a backbone reports, or "" where it reports none.
inline std::string model_type_of(const torch::nn::Module& backbone) {
  const auto* reporter = dynamic_cast<const ReportsModelType*>(&backbone);
  return reporter ? reporter->model_type() : "";
}

// One site found in a backbone: its module path and the one interface it offers.
struct Site {
  enum class Kind { linear, output, attention, prompt };
  std::string name;
  Kind kind;
  std::shared_ptr<torch::nn::Module> module;  // keeps the site alive
  WeightSite* linear = nullptr;  // a FrozenLinear, or a layer norm that weight deltas act on
  OutputSite* output = nullptr;
  AttentionSite* attention = nullptr;
  PromptSite* prompt = nullptr;
};

inline const char* to_string(Site::Kind kind) {
  switch (kind) {
    case Site::Kind::linear: return "linear";
    case Site::Kind::output: return "output";
    case Site::Kind::attention: return "attention";
    case Site::Kind::prompt: return "prompt";
  }
  return "unknown";
}

// Every site under `root`, in module order, named by module path ("encoder.block.0.layer.0.SelfAttention.q").
inline std::vector<Site> find_sites(torch::nn::Module& root) {
  std::vector<Site> sites;
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    const auto& module = item.value();
    if (auto* linear = dynamic_cast<WeightSite*>(module.get()))
      sites.push_back({item.key(), Site::Kind::linear, module, linear});
    if (auto* output = dynamic_cast<OutputSite*>(module.get()))
      sites.push_back({item.key(), Site::Kind::output, module, nullptr, output});
    if (auto* attention = dynamic_cast<AttentionSite*>(module.get()))
      sites.push_back({item.key(), Site::Kind::attention, module, nullptr, nullptr, attention});
    if (auto* prompt = dynamic_cast<PromptSite*>(module.get()))
      sites.push_back({item.key(), Site::Kind::prompt, module, nullptr, nullptr, nullptr, prompt});
  }
  return sites;
}

namespace detail {

// Glob over a dotted name: `*` and `?` as in a shell; a pattern without a dot also
// matches the last component(s), as peft's target_modules does ("q" matches "...SelfAttention.q").
inline std::regex glob_to_regex(const std::string& glob) {
  std::string re;
  for (char c : glob) {
    if (c == '*') re += ".*";
    else if (c == '?') re += '.';
    else if (std::string("\\^$.|+()[]{}").find(c) != std::string::npos) re += std::string("\\") + c;
    else re += c;
  }
  return std::regex("(.*\\.)?" + re);
}

}  // namespace detail

// Which sites a pattern names. "re:<regex>" is a regular expression over the whole site
// name; anything else is one or more globs separated by '|' ("*.layer.1|*.layer.2", "q|v").
class SitePattern {
 public:
  explicit SitePattern(std::string text) : text_(std::move(text)) {
    try {
      if (text_.rfind("re:", 0) == 0) {
        alternatives_.emplace_back(text_.substr(3));
      } else {
        size_t start = 0;
        while (start <= text_.size()) {
          const size_t bar = std::min(text_.find('|', start), text_.size());
          const auto glob = text_.substr(start, bar - start);
          detail::check<OptionError>(!glob.empty(), "site pattern '{}' has an empty alternative", text_);
          alternatives_.push_back(detail::glob_to_regex(glob));
          start = bar + 1;
        }
      }
    } catch (const std::regex_error& e) {
      throw OptionError(fmt::format("site pattern '{}' is not a valid regular expression: {}", text_, e.what()));
    }
  }
  bool matches(const std::string& name) const {
    return std::any_of(alternatives_.begin(), alternatives_.end(),
                       [&](const std::regex& re) { return std::regex_match(name, re); });
  }
  const std::string& text() const { return text_; }

 private:
  std::string text_;
  std::vector<std::regex> alternatives_;
};

}  // namespace deltatune
