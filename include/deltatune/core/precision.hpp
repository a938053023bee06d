// Mixed precision: a frozen backbone stored in bfloat16 (or float16 on CUDA), half the bytes
// of float32, with its products on the CPU's and GPU's half-precision units, while what trains
// stays float32 (the deltas, the backbone parameters a method trains, a task head): an update
// of 1e-4 to a weight of 1 vanishes in bf16's 8 bits. Sites meet the two precisions:
// - the backbone's own layers compute in the activation's precision, a float32 trained weight
//   cast to it for the operation (what autocast does), its gradient reaching the float32 tensor;
// - a delta computes in its parameters' float32, its input cast up and its output cast back
//   (peft's autocast_adapter_dtype keeps adapters in float32 the same way); where its first
//   step is a product, backward keeps the half-precision input, not the float32 copy
//   (LinearFromHalf below).
// The numerically sensitive steps stay float32 where transformers keeps them: layer norm
// statistics, softmax accumulation, the loss.
#pragma once

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <optional>

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

// x W^T for a half-precision x and a float32 W, in float32, as site.hpp's in_delta_precision
// computes it, keeping x in its own precision for backward: autograd would keep the float32 copy
// of x that the product takes, for W's gradient, twice x's bytes at every delta that starts with
// a product (LoRA's A, an adapter's down projection). The copy is made again in backward,
// exactly: widening a half-precision value rounds nothing. Under autocast too the product is
// float32, as backward takes it. (A bias is added outside: an undefined tensor cannot be an
// autograd Function's input.)
struct LinearFromHalf : torch::autograd::Function<LinearFromHalf> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x, const torch::Tensor& W) {
    ctx->save_for_backward({x, W});
    const AutocastOff off;
    return torch::matmul(x.to(W.scalar_type()), W.t());
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &W = saved[1];
    const auto grad = grads[0].reshape({-1, W.size(0)});  // (N, out)
    torch::Tensor grad_x, grad_W;
    if (ctx->needs_input_grad(0)) grad_x = grad.matmul(W).reshape(x.sizes()).to(x.scalar_type());
    if (ctx->needs_input_grad(1)) grad_W = grad.t().matmul(x.reshape({-1, W.size(1)}).to(W.scalar_type()));
    return {grad_x, grad_W};
  }
};

// x W^T + b through LinearFromHalf.
inline torch::Tensor linear_from_half(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b) {
  const auto y = LinearFromHalf::apply(x, W);
  return b.defined() ? y + b : y;
}

// x W^T + b in W's precision for a delta that takes its input as it comes (WeightDelta::
// takes_half_input, a bottleneck adapter): through LinearFromHalf where x is half precision and
// W is not, keeping x rather than its float32 copy; x cast to W's dtype otherwise.
inline torch::Tensor linear_in_precision_of(const torch::Tensor& x, const torch::Tensor& W, const torch::Tensor& b = {}) {
  if (is_half(x.scalar_type()) && x.scalar_type() != W.scalar_type()) return linear_from_half(x, W, b);
  return torch::nn::functional::linear(x.to(W.scalar_type()), W, b);
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
