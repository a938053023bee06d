// Dropout that keeps a one-byte mask for backward: the module the backbones use, dropout fused
// with ReLU, and attention with dropout on its probabilities, which it computes again in
// backward. With a frozen backbone, what these keep is most of a training step's memory
// (torch's CPU dropout keeps a float noise tensor, ReLU its float output, attention its
// probabilities twice), so keeping a quarter of the bytes matters.
#pragma once

#include <torch/torch.h>
#include <ATen/ExpandUtils.h>

#include <cmath>
#include <limits>
#include <optional>
#include <tuple>

namespace deltatune::detail {

inline double dropout_scale(double p) { return 1.0 / (1.0 - p); }

// dropout(x) as torch's, through at::native_dropout: its backward keeps the bool mask.
inline torch::Tensor dropout(const torch::Tensor& x, double p, bool training) {
  if (!training || p == 0.0) return x;
  return std::get<0>(at::native_dropout(x, p, /*train=*/true));
}

// dropout(relu(h)), keeping for backward one bool mask: kept by dropout and positive.
struct ReluDropoutFunction : torch::autograd::Function<ReluDropoutFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& h, double p) {
    auto [out, kept] = at::native_dropout(torch::relu(h), p, /*train=*/true);
    ctx->save_for_backward({kept.logical_and_(h > 0)});
    ctx->saved_data["p"] = p;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto kept = ctx->get_saved_variables()[0];
    return {at::native_dropout_backward(grads[0], kept, dropout_scale(ctx->saved_data["p"].toDouble())), {}};
  }
};

inline torch::Tensor relu_dropout(const torch::Tensor& h, double p, bool training) {
  if (!training || p == 0.0) return torch::relu(h);
  return ReluDropoutFunction::apply(h, p);
}

// Attention scores (B, H, Tq, Tk): scaled q k^T plus an additive mask, or -inf where a bool
// mask says not to attend.
inline torch::Tensor attention_scores(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& mask,
                                      double scale) {
  auto scores = (scale == 1.0 ? q : q * scale).matmul(k.transpose(-2, -1));
  if (!mask.defined()) return scores;
  if (mask.scalar_type() == torch::kBool)
    return scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  return scores + mask;
}

// dropout(softmax(scores)) @ v, keeping for backward q, k, v, the mask (one per stack, shared
// by its layers) and the bool dropout mask; backward computes the probabilities again rather
// than keeping them, as memory-efficient attention kernels do: (B, H, Tq, Tk) floats a layer
// are the largest thing a frozen layer would keep, and recomputing costs a matmul and a softmax.
struct AttentionFunction : torch::autograd::Function<AttentionFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const torch::Tensor& mask, double p, double scale) {
    // As torch's math: a row with every key masked attends to nothing rather than turning NaN.
    auto [dropped, kept] = at::native_dropout(at::_safe_softmax(attention_scores(q, k, mask, scale), -1), p, true);
    ctx->save_for_backward({q, k, v, mask, kept});
    ctx->saved_data["p"] = p;
    ctx->saved_data["scale"] = scale;
    return dropped.matmul(v);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &mask = saved[3], &kept = saved[4];
    const double scale = ctx->saved_data["scale"].toDouble();
    const double keep_scale = dropout_scale(ctx->saved_data["p"].toDouble());
    const auto& grad = grads[0];  // (B, H, Tq, d)
    const auto probs = at::_safe_softmax(attention_scores(q, k, mask, scale), -1);
    const auto scaled = [scale](torch::Tensor t) { return scale == 1.0 ? t : t * scale; };
    torch::Tensor grad_q, grad_k, grad_v, grad_mask;
    if (ctx->needs_input_grad(2))
      grad_v = at::native_dropout_backward(probs, kept, keep_scale).transpose(-2, -1).matmul(grad);
    const auto grad_probs = at::native_dropout_backward(grad.matmul(v.transpose(-2, -1)), kept, keep_scale);
    const auto grad_scores = at::_softmax_backward_data(grad_probs, probs, -1, probs.scalar_type());
    if (ctx->needs_input_grad(0)) grad_q = scaled(grad_scores.matmul(k));
    if (ctx->needs_input_grad(1)) grad_k = scaled(grad_scores.transpose(-2, -1).matmul(q));
    if (ctx->needs_input_grad(3)) grad_mask = at::sum_to(grad_scores, mask.sizes());
    return {grad_q, grad_k, grad_v, grad_mask, {}, {}};
  }
};

// Scaled dot-product attention: q (B, H, Tq, d), k and v (B, H, Tk, d), mask additive (float)
// or where to attend (bool), broadcast to (B, H, Tq, Tk). Training with dropout on the CPU,
// where torch's fused kernels take no dropout and its math keeps the probabilities, float noise
// and the dropped probabilities, it runs AttentionFunction; otherwise torch's kernels.
inline torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const std::optional<torch::Tensor>& mask, double p, bool training,
                               std::optional<double> scale = std::nullopt) {
  if (!training || p == 0.0 || !q.device().is_cpu())
    return torch::scaled_dot_product_attention(q, k, v, mask, training ? p : 0.0, /*is_causal=*/false, scale);
  return AttentionFunction::apply(q, k, v, mask.value_or(torch::Tensor()), p,
                                  scale.value_or(1.0 / std::sqrt(double(q.size(-1)))));
}

}  // namespace deltatune::detail

namespace deltatune::backbones {

// The backbones' dropout layers: torch's, keeping the one-byte mask above.
class DropoutImpl : public torch::nn::Cloneable<DropoutImpl> {
 public:
  explicit DropoutImpl(double p) : p(p) {}
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& x) { return detail::dropout(x, p, is_training()); }
  void pretty_print(std::ostream& stream) const override { stream << "deltatune::backbones::Dropout(p=" << p << ")"; }

  double p;
};
TORCH_MODULE(Dropout);

}  // namespace deltatune::backbones
