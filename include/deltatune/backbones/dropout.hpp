// Dropout that keeps its mask's seed, or a one-byte mask, for backward: the module the backbones
// use, dropout fused with ReLU, and attention with dropout on its probabilities, which it
// computes again in backward. With a frozen backbone, what these keep is most of a training
// step's memory (torch's CPU dropout keeps a float noise tensor, ReLU its float output,
// attention its probabilities twice).
#pragma once

#include <ATen/ExpandUtils.h>
#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <optional>

#include <deltatune/core/dropout_mask.hpp>

namespace deltatune::detail {

// dropout(x) as torch's; `lean` keeps only the mask's seed (the backbone config's lean_dropout).
// Off the CPU torch's own dropout keeps a bool mask, in one kernel.
inline torch::Tensor dropout(const torch::Tensor& x, double p, bool training, bool lean) {
  if (!training || p == 0.0) return x;
  if (!x.device().is_cpu() || !lean) return torch::dropout(x, p, /*train=*/true);
  return SeededMaskFunction::apply(x, p);
}

// dropout(relu(h)) keeping one mask, where ReLU and dropout would keep a float tensor and a
// mask (where h was positive is not in a seed); off the CPU, as dropout above, torch's.
inline torch::Tensor relu_dropout(const torch::Tensor& h, double p, bool training, bool lean) {
  if (!training || p == 0.0) return torch::relu(h);
  if (!h.device().is_cpu() || !lean) return torch::dropout(torch::relu(h), p, /*train=*/true);
  return MaskFunction::apply(h, keep_mask(h, p).logical_and_(is_positive(h)), p);
}

// softmax(q k^T + mask) with dropout, times v, for q (B, H, Tq, d) already scaled and k, v (B,
// H, Tk, d) contiguous; mask undefined, additive (float) or where to attend (bool), broadcast to
// (B, H, Tq, Tk). Keeps q, k, v, the mask and the dropout's seed (SeededMask), and backward
// computes the probabilities again from them, as FlashAttention does: the same operations on
// the same tensors, so the same values. torch's math keeps the (B, H, Tq, Tk) probabilities
// both before and after dropout, and float noise; these grow with the square of the length,
// and were the largest thing a frozen layer kept (T5-small, batch 32, 128 tokens, bf16: 8 MB a
// layer).
struct DropoutAttentionFunction : torch::autograd::Function<DropoutAttentionFunction> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, const std::optional<torch::Tensor>& attention_mask, double p) {
    const auto dropout = SeededMask::draw(p);
    const auto mask = attention_mask.value_or(torch::Tensor());
    ctx->save_for_backward({q, k, v, mask});
    dropout.save(ctx);
    return dropout.apply(probabilities(q, k, mask)).matmul(v);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &q = saved[0], &k = saved[1], &v = saved[2], &mask = saved[3];
    const auto dropout = SeededMask::saved(ctx);
    const auto probs = probabilities(q, k, mask);
    const auto kept = dropout.mask(probs.sizes());  // for both products below
    const auto& grad = grads[0];                    // (B, H, Tq, d)
    torch::Tensor grad_q, grad_k, grad_v, grad_mask;
    if (ctx->needs_input_grad(2)) grad_v = apply_mask(probs, kept, dropout.p).transpose(-2, -1).matmul(grad);
    const bool mask_grad = mask.defined() && ctx->needs_input_grad(3);  // no edge without a mask
    if (ctx->needs_input_grad(0) || ctx->needs_input_grad(1) || mask_grad) {
      const auto grad_probs = apply_mask(grad.matmul(v.transpose(-2, -1)), kept, dropout.p);
      const auto grad_scores = at::_softmax_backward_data(grad_probs, probs, -1, probs.scalar_type());
      // An additive mask of another dtype promotes the scores; their product's operands are q's.
      const auto grad_product = grad_scores.to(q.scalar_type());
      if (ctx->needs_input_grad(0)) grad_q = grad_product.matmul(k);
      if (ctx->needs_input_grad(1)) grad_k = grad_product.transpose(-2, -1).matmul(q);
      if (mask_grad) grad_mask = at::sum_to(grad_scores, mask.sizes());
    }
    return {grad_q, grad_k, grad_v, grad_mask, {}};
  }

  static torch::Tensor probabilities(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& mask) {
    const auto scores = q.matmul(k.transpose(-2, -1));  // (B, H, Tq, Tk)
    if (!mask.defined()) return torch::softmax(scores, -1);
    // As torch's math: a row with every key masked attends to nothing rather than turning NaN.
    if (mask.scalar_type() == torch::kBool)
      return at::_safe_softmax(scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity()), -1);
    // An additive mask (the backbones' hold the dtype's lowest value, not -inf) leaves no row
    // without a finite score: the plain softmax, without _safe_softmax's checks of every row.
    return torch::softmax(scores + mask, -1);
  }
};

// Keys and values whose heads are a view of (B, T, H d), as the backbones split them, are made
// contiguous before their products: for k^T or v^T, matmul would copy the view transposed into
// (B H, d, T), element by element, where the contiguous copy moves rows of d and its
// transpose goes to the product as it is (T5-base, batch 8, bf16: 0.29 ms a transposing copy,
// 0.12 a contiguous one). No copy where they are contiguous already.
// Scaled dot-product attention: q (B, H, Tq, d), k and v (B, H, Tk, d), mask additive (float)
// or where to attend (bool), broadcast to (B, H, Tq, Tk). Training with dropout on the CPU,
// where torch's fused kernels take no dropout, DropoutAttentionFunction when `lean`; otherwise
// torch's.
inline torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                               const std::optional<torch::Tensor>& mask, double p, bool training, bool lean,
                               std::optional<double> scale = std::nullopt) {
  if (!training || p == 0.0 || !q.device().is_cpu() || !lean)
    return torch::scaled_dot_product_attention(q, k, v, mask, training ? p : 0.0, /*is_causal=*/false, scale);
  const double s = scale.value_or(1.0 / std::sqrt(double(q.size(-1))));
  return DropoutAttentionFunction::apply(s == 1.0 ? q : q * s, k.contiguous(), v.contiguous(), mask, p);
}

}  // namespace deltatune::detail

namespace deltatune::backbones {

// The backbones' dropout layers: torch's, keeping only the mask's seed (above) when `lean` (the
// backbone config's lean_dropout).
class DropoutImpl : public torch::nn::Cloneable<DropoutImpl> {
 public:
  DropoutImpl(double p, bool lean) : p(p), lean(lean) {}
  void reset() override {}
  torch::Tensor forward(const torch::Tensor& x) { return detail::dropout(x, p, is_training(), lean); }
  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::backbones::Dropout(p=" << p << ", lean=" << (lean ? "true" : "false") << ")";
  }

  double p;
  bool lean;
};
TORCH_MODULE(Dropout);

}  // namespace deltatune::backbones
