// Mixed precision: a frozen backbone stored in bfloat16 (or float16 on CUDA), half the bytes
// of float32, with its products on the CPU's and GPU's half-precision units, while what trains
// stays float32 (the deltas, the backbone parameters a method trains, a task head): an update
// of 1e-4 to a weight of 1 vanishes in bf16's 8 bits. Sites meet the two precisions:
// - the backbone's own layers compute in the activation's precision, a float32 trained weight
//   cast to it for the operation (what autocast does), its gradient reaching the float32 tensor;
// - a delta computes in its parameters' float32, its input cast up and its output cast back
//   (peft's autocast_adapter_dtype keeps adapters in float32 the same way); where its first
//   step is a product, backward keeps the half-precision input, not the float32 copy
//   (LinearKeepingInput below).
// The numerically sensitive steps stay float32 where transformers keeps them: layer norm
// statistics, softmax accumulation, the loss.
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <optional>

#include <deltatune/core/dropout_mask.hpp>
#include <deltatune/core/error.hpp>

namespace deltatune {

inline bool is_half(torch::ScalarType dtype) { return dtype == torch::kBFloat16 || dtype == torch::kHalf; }

// Stores `module`'s frozen floating parameters and floating buffers in `dtype`; those that
// require grad (deltas, a task head, what a method trains) keep theirs. Load a backbone in
// bf16 this way, before its deltas are added (DeltaModel keeps what it trains in float32):
//   deltatune::set_frozen_dtype(*t5, torch::kBFloat16);  // or T5LoadOptions().dtype(...)
inline void set_frozen_dtype(torch::nn::Module& module, torch::ScalarType dtype) {
  detail::check<OptionError>(c10::isFloatingType(dtype), "set_frozen_dtype: {} is not a floating dtype",
                             c10::toString(dtype));
  torch::NoGradGuard no_grad;
  auto convert = [&](torch::Tensor& t) {
    if (t.defined() && t.is_floating_point() && t.scalar_type() != dtype) t.set_data(t.to(dtype));
  };
  for (auto& p : module.parameters())
    if (!p.requires_grad()) convert(p);
  for (auto& b : module.buffers()) convert(b);
}

// The dtype `module` stores its frozen weights in: that of its first frozen floating
// parameter; float32 where it has none.
inline torch::ScalarType frozen_dtype(const torch::nn::Module& module) {
  for (const auto& p : module.parameters())
    if (!p.requires_grad() && p.is_floating_point()) return p.scalar_type();
  return torch::kFloat;
}

// bf16 (or `dtype`) autocast on `device` while in scope, as Python's torch.autocast: the
// C++ API has the same thread-local switches (at::autocast), without a guard.
//   { deltatune::AutocastGuard bf16(torch::kCPU); auto y = model(x); }  // matmuls in bf16
class AutocastGuard {
 public:
  explicit AutocastGuard(at::DeviceType device, at::ScalarType dtype = at::kBFloat16)
      : device_(device), was_enabled_(at::autocast::is_autocast_enabled(device)),
        old_dtype_(at::autocast::get_autocast_dtype(device)) {
    at::autocast::set_autocast_enabled(device, true);
    at::autocast::set_autocast_dtype(device, dtype);
    at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    // The outermost guard drops the casts it cached, as torch.autocast's __exit__ does.
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(device_, was_enabled_);
    at::autocast::set_autocast_dtype(device_, old_dtype_);
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  at::DeviceType device_;
  bool was_enabled_;
  at::ScalarType old_dtype_;
};

namespace detail {

// Autocast off while in scope, for computations whose dtypes are chosen (a float32 delta on a
// half-precision activation): autocast would cast their products to its dtype.
struct AutocastOff {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// `t` (a weight, bias or scale) as a backbone operation on activation `x` takes it: in x's
// dtype. Only mixed precision stores them apart: a float32 trained tensor meeting a bf16
// activation is cast down (its gradient reaching it in float32), a bf16 frozen one meeting
// a float32 activation (where a method trains the embeddings) up.
inline torch::Tensor at_precision_of(const torch::Tensor& x, const torch::Tensor& t) {
  if (!t.defined() || t.scalar_type() == x.scalar_type() || !t.is_floating_point() || !x.is_floating_point())
    return t;
  return t.to(x.scalar_type());
}

// x W^T in W's precision, keeping x as it comes for backward, not its copy in W's precision:
// for a half-precision x and a float32 W autograd would keep the float32 copy the product
// takes, for W's gradient, twice x's bytes at every delta that starts with a product (LoRA's
// A, an adapter's down projection). Backward makes the copy again, exactly: widening rounds
// nothing. With a dropout mask it computes dropout(x) W^T: the kept elements of the copy scaled
// by 1 / (1 - p) in W's precision, as on a float32 backbone, and backward keeps the one-byte
// mask where torch's dropout keeps float noise and the dropped input. W is (out, in) for x
// (..., in), or one matrix a row, (n, out, in) for x (n, L, in) (a mixed batch's gathered
// deltas). Under autocast too the product is in W's precision, as backward takes it. (A bias
// is added outside, where autograd sums its gradient.)
struct LinearKeepingInput : torch::autograd::Function<LinearKeepingInput> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& W,
                               const std::optional<torch::Tensor>& kept, double p) {
    const auto mask = kept.value_or(torch::Tensor());
    ctx->save_for_backward({x, W, mask});
    ctx->saved_data["p"] = p;
    const AutocastOff off;
    return product(input(x, W, mask, p), W);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &W = saved[1], &kept = saved[2];
    const double p = ctx->saved_data["p"].toDouble();
    const auto& grad = grads[0];  // (..., out) or (n, L, out)
    torch::Tensor grad_x, grad_W;
    if (ctx->needs_input_grad(0)) {
      grad_x = grad.matmul(W);
      grad_x = (kept.defined() ? apply_mask(grad_x, kept, p) : grad_x).to(x.scalar_type());
    }
    if (ctx->needs_input_grad(1)) {
      const auto input_W = input(x, W, kept, p);
      grad_W = W.dim() == 3 ? torch::bmm(grad.transpose(1, 2), input_W)
                            : grad.reshape({-1, W.size(0)}).t().mm(input_W.reshape({-1, W.size(1)}));
    }
    return {grad_x, grad_W, {}, {}};
  }

  // x in W's precision, dropped out where a mask is given.
  static torch::Tensor input(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& kept, double p) {
    const auto xs = x.to(W.scalar_type());
    return kept.defined() ? apply_mask(xs, kept, p) : xs;
  }
  // x W^T for W (out, in), or row by row for W (n, out, in).
  static torch::Tensor product(const torch::Tensor& x, const torch::Tensor& W) {
    return W.dim() == 3 ? torch::bmm(x, W.transpose(1, 2)) : torch::matmul(x, W.t());
  }
};

// B^T, B's last two dimensions swapped, as the second operand of a low-rank delta's second
// product h B^T, B (out, r) or one a row (n, out, r). Below rank 16 on the CPU a contiguous
// copy, not the transposed view: autograd then computes B's gradient as h^T grad and h's as
// grad B with B column-major, where for the view it computes (grad^T h)^T and grad B with B
// row-major, layouts in which the CPU's float32 BLAS runs these narrow products 3 to 7 times
// slower (rank 8, 4096 rows: 5.0 ms against 0.7, and 1.8 against 0.8; batched, rank 8, 32 x 128
// rows: 3.2 ms against 2.3 for the product forward and backward). From rank 16 the view's
// layouts are as fast or faster. The copy is r x out floats a matrix.
inline torch::Tensor transposed_operand(const torch::Tensor& B) {
  const auto transposed = B.transpose(-2, -1);
  return B.device().is_cpu() && B.size(-1) < 16 ? transposed.contiguous() : transposed;
}

// x W^T + b in W's precision for a delta that takes its input as it comes (WeightDelta::
// takes_half_input, a bottleneck adapter), with its dropout on x if any: through
// LinearKeepingInput where x is half precision and W is not, or where there is dropout;
// x cast to W's dtype otherwise. W (out, in) and b (out), or one a row: (n, out, in) and (n, out)
// for x (n, L, in).
inline torch::Tensor linear_in_precision_of(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b = {},
                                            const InputDropout& dropout = {}) {
  const bool batched = W.dim() == 3;
  if (dropout.defined() || (is_half(x.scalar_type()) && x.scalar_type() != W.scalar_type())) {
    const auto kept = dropout.defined() ? std::optional(dropout.kept) : std::nullopt;
    const auto y = LinearKeepingInput::apply(x, W, kept, dropout.p);
    return !b.defined() ? y : y + (batched ? b.unsqueeze(1) : b);
  }
  const auto xs = x.to(W.scalar_type());
  if (!batched) return torch::nn::functional::linear(xs, W, b);
  return b.defined() ? torch::baddbmm(b.unsqueeze(1), xs, W.transpose(1, 2)) : torch::bmm(xs, W.transpose(1, 2));
}

// The dtype a delta computes in when activation `x` reaches it: its parameters' where x is
// half precision and they are not; nullopt where no cast is needed (the same dtype, or a
// float32 or float64 activation, which deltas always take as it is).
inline std::optional<torch::ScalarType> delta_precision(torch::nn::Module& delta, const torch::Tensor& x) {
  if (!is_half(x.scalar_type())) return std::nullopt;
  for (const auto& p : delta.parameters(/*recurse=*/true))
    if (p.is_floating_point()) return p.scalar_type() == x.scalar_type() ? std::nullopt : std::optional(p.scalar_type());
  return std::nullopt;
}

}  // namespace detail

}  // namespace deltatune
