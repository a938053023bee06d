// The language-model loss over a vocabulary, keeping for backward the logits as they come and
// one log-sum-exp a row. torch's cross_entropy keeps its float32 log-probabilities, (N, V)
// floats, and its backward allocates two more (N, V) tensors, the nll gradient and the
// log-softmax one, before the cast back to the logits' dtype: for T5's 32,128-word vocabulary at
// batch 32 with 8 target tokens, 33 MB kept and 66 MB more at backward's start, over bf16 logits
// of 16 MB. This keeps no (N, V) copy (the logits are the lm_head's output, alive while the graph
// is) and backward writes the gradient in the logits' dtype, a block of rows at a time.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>

#include <deltatune/core/error.hpp>

namespace deltatune::detail {

// Mean over the rows not labelled ignore_index of -log softmax(logits)[label], logits (N, V)
// and labels (N) (token_cross_entropy below checks the shapes), as torch's cross_entropy of
// the logits in float32 (float64 logits: float64), NaN where every row is ignored, as torch.
struct TokenCrossEntropy : torch::autograd::Function<TokenCrossEntropy> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& logits,
                               const torch::Tensor& labels, int64_t ignore_index) {
    const auto valid = labels != ignore_index;
    const auto targets = labels.masked_fill(valid.logical_not(), 0).to(torch::kLong);
    check<ShapeError>(!((targets < 0) | (targets >= logits.size(1))).any().item<bool>(),
                      "cross entropy: a label is outside the vocabulary of {} tokens (0 to {}), and not {} "
                      "(ignored); check the labels' tokenizer",
                      logits.size(1), logits.size(1) - 1, ignore_index);
    const auto precision = accumulation_dtype(logits);
    auto lse = torch::empty({logits.size(0)}, logits.options().dtype(precision));
    for_row_blocks(logits, [&](int64_t first, int64_t rows) {
      lse.narrow(0, first, rows).copy_(torch::logsumexp(logits.narrow(0, first, rows).to(precision), 1));
    });
    const auto target_logits = logits.gather(1, targets.unsqueeze(1)).squeeze(1).to(precision);
    const auto count = valid.sum().to(precision);
    ctx->save_for_backward({logits, targets, valid, lse, count});
    return (lse - target_logits).masked_fill(valid.logical_not(), 0).sum() / count;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &logits = saved[0], &targets = saved[1], &valid = saved[2], &lse = saved[3], &count = saved[4];
    // d loss / d logits = (softmax(logits) - onehot(label)) grad / count on the rows counted.
    const auto row_weight = valid.to(lse.scalar_type()) * (grads[0].to(lse.scalar_type()) / count);
    auto grad_logits = torch::empty_like(logits);
    for_row_blocks(logits, [&](int64_t first, int64_t rows) {
      auto block = (logits.narrow(0, first, rows).to(lse.scalar_type()) - lse.narrow(0, first, rows).unsqueeze(1)).exp_();
      block.scatter_add_(1, targets.narrow(0, first, rows).unsqueeze(1), torch::full({rows, 1}, -1.0, block.options()));
      grad_logits.narrow(0, first, rows).copy_(block.mul_(row_weight.narrow(0, first, rows).unsqueeze(1)));
    });
    return {grad_logits, {}, {}};
  }

  static torch::ScalarType accumulation_dtype(const torch::Tensor& logits) {
    return torch::promote_types(logits.scalar_type(), torch::kFloat);
  }
  // f(first, rows) over blocks of about a million logits: each block's copy in the accumulation
  // dtype is what a step holds above the logits, not a copy of them all.
  template <class F>
  static void for_row_blocks(const torch::Tensor& logits, F&& f) {
    const int64_t n = logits.size(0),
                  block = std::max<int64_t>(1, (int64_t(1) << 20) / std::max<int64_t>(1, logits.size(1)));
    for (int64_t first = 0; first < n; first += block) f(first, std::min(block, n - first));
  }
};

// The loss of `logits` (..., V) against `labels` (...), ignoring ignore_index.
inline torch::Tensor token_cross_entropy(const torch::Tensor& logits, const torch::Tensor& labels,
                                         int64_t ignore_index = -100) {
  check<ShapeError>(logits.dim() >= 1 && labels.sizes() == logits.sizes().slice(0, logits.dim() - 1),
                    "cross entropy: labels {} do not match logits {}: one label a row of logits", labels.sizes(),
                    logits.sizes());
  return TokenCrossEntropy::apply(logits.reshape({-1, logits.size(-1)}), labels.reshape(-1), ignore_index);
}

}  // namespace deltatune::detail
