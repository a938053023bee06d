// Tests of core/delta.hpp: what the DeltaModule interface provides to every method,
// exercised through two toy deltas.
#include <deltatune/core/delta.hpp>

namespace delta_test {

namespace dt = deltatune;

namespace {

// dW = scale * W0 and db = scale: a weight delta with one trained number.
struct ToyScaleImpl : torch::nn::Module, dt::WeightDelta {
  torch::Tensor scale = register_parameter("scale", torch::full({1}, 0.5));
  std::string method() const override { return "toy_scale"; }
  nlohmann::json options_json() const override { return {{"init", 0.5}}; }
  torch::nn::Module& module() override { return *this; }
  torch::Tensor delta_weight(const torch::Tensor& W0) override { return scale * W0; }
  torch::Tensor delta_bias(const torch::Tensor& W0) override { return scale.expand({W0.size(0)}); }
};

// h + up(down(h)): an activation delta with two small Linears.
struct ToyAdapterImpl : torch::nn::Module, dt::ActivationDelta {
  torch::nn::Linear down = register_module("down", torch::nn::Linear(8, 2));
  torch::nn::Linear up = register_module("up", torch::nn::Linear(2, 8));
  std::string method() const override { return "toy_adapter"; }
  nlohmann::json options_json() const override { return {{"bottleneck", 2}}; }
  torch::nn::Module& module() override { return *this; }
  torch::Tensor forward(const torch::Tensor& h) override { return h + up(torch::relu(down(h))); }
};

}  // namespace

CATCH_TEST_CASE("a weight delta's default forward equals the merged Linear", "[core][delta]") {
  ToyScaleImpl delta;
  dt::DeltaModule& as_delta = delta;
  CATCH_CHECK(as_delta.family() == dt::DeltaFamily::weight);
  CATCH_CHECK(as_delta.mergeable());
  CATCH_CHECK(std::string(dt::to_string(as_delta.family())) == "weight");
  CATCH_CHECK(as_delta.num_parameters() == 1);
  CATCH_CHECK(as_delta.options_json().at("init") == 0.5);

  auto W0 = torch::randn({3, 4}), b0 = torch::randn({3}), x = torch::randn({5, 4});
  auto merged = torch::nn::functional::linear(x, W0 * 1.5, b0 + 0.5);
  CATCH_CHECK(torch::allclose(delta.forward(x, W0, b0), merged, 1e-6, 1e-6));
  // With no base bias, db alone is added.
  CATCH_CHECK(torch::allclose(delta.forward(x, W0, {}), torch::nn::functional::linear(x, W0 * 1.5, torch::full({3}, 0.5)),
                              1e-6, 1e-6));
  // Gradients reach the delta's parameter through the default forward.
  delta.forward(x, W0, b0).sum().backward();
  CATCH_CHECK(delta.scale.grad().defined());
}

CATCH_TEST_CASE("an activation delta is not mergeable and counts its parameters", "[core][delta]") {
  ToyAdapterImpl delta;
  dt::DeltaModule& as_delta = delta;
  CATCH_CHECK(as_delta.family() == dt::DeltaFamily::activation);
  CATCH_CHECK_FALSE(as_delta.mergeable());
  CATCH_CHECK(as_delta.num_parameters() == 8 * 2 + 2 + 2 * 8 + 8);
  auto h = torch::randn({2, 8});
  CATCH_CHECK(delta.forward(h).sizes() == h.sizes());
}

}  // namespace delta_test
