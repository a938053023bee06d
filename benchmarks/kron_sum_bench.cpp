// kron_sum_bench: the fused Kronecker sum against what the reference implementations
// do (n dense torch::kron products, stacked and summed) and against one einsum, and
// the dense against the factored kron_sum_matmul. Forward + backward, median time
// and peak bytes allocated, on CPU (and CUDA when a GPU is visible).
//
// Prints a table, then one JSON line per row (prefix "JSON "), with the ratios.
//   kron_sum_bench [--device cpu|cuda] [--dtype float32|float64|bfloat16|float16] [--seconds S]
#include <deltatune/kernels/kron_sum.hpp>

#include <c10/core/CPUAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <functional>
#include <iostream>
#include <string>
#include <vector>

namespace dt = deltatune;

namespace {

// Counts the bytes of live CPU tensors and their high-water mark: the exact peak
// memory of a step, free of the noise of RSS.
class TrackingCpuAllocator final : public c10::Allocator {
 public:
  explicit TrackingCpuAllocator(c10::Allocator* base) : base_(base) {}

  c10::DataPtr allocate(size_t bytes) override {
    auto inner = base_->allocate(bytes);
    void* data = inner.get();
    const int64_t now = live_ += int64_t(bytes);
    int64_t seen = peak_.load();
    while (now > seen && !peak_.compare_exchange_weak(seen, now)) {
    }
    return {data, new Block{std::move(inner), bytes, this}, &release, inner.device()};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  void reset_peak() { peak_ = live_.load(); }
  int64_t peak_above(int64_t baseline) const { return peak_.load() - baseline; }
  int64_t live() const { return live_.load(); }

 private:
  struct Block {
    c10::DataPtr inner;
    size_t bytes;
    TrackingCpuAllocator* owner;
  };
  static void release(void* ctx) {
    auto* block = static_cast<Block*>(ctx);
    block->owner->live_ -= int64_t(block->bytes);
    delete block;
  }

  c10::Allocator* base_;
  std::atomic<int64_t> live_{0}, peak_{0};
};

TrackingCpuAllocator* install_tracking_allocator() {
  static TrackingCpuAllocator tracker(c10::GetCPUAllocator());
  c10::SetCPUAllocator(&tracker, /*priority=*/255);
  return &tracker;
}

// CUDA: the caching allocator's own counters of bytes handed out to tensors.
using CudaStat = c10::CachingDeviceAllocator::StatType;
int64_t cuda_live_bytes(const torch::Device& d) {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(d.index() < 0 ? 0 : d.index())
      .allocated_bytes[size_t(CudaStat::AGGREGATE)]
      .current;
}
int64_t cuda_peak_bytes(const torch::Device& d) {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(d.index() < 0 ? 0 : d.index())
      .allocated_bytes[size_t(CudaStat::AGGREGATE)]
      .peak;
}
void reset_cuda_peak(const torch::Device& d) { c10::cuda::CUDACachingAllocator::resetPeakStats(d.index() < 0 ? 0 : d.index()); }

struct Measure {
  double median_ms;
  int64_t peak_bytes;
};

// Median wall time of `step` over repetitions filling about `seconds`, and the peak
// bytes it allocated above what was live before it (CPU: tracked; CUDA: allocator stats).
Measure measure(const std::function<void()>& step, const torch::Device& device, TrackingCpuAllocator* tracker,
                double seconds) {
  auto sync = [&] {
    if (device.is_cuda()) torch::cuda::synchronize();
  };
  step();  // warm-up: first-touch allocations, lazy initialisation
  sync();
  const int64_t baseline = device.is_cuda() ? cuda_live_bytes(device) : tracker->live();
  if (device.is_cuda()) reset_cuda_peak(device);
  tracker->reset_peak();
  std::vector<double> times;
  const auto start = std::chrono::steady_clock::now();
  while (times.size() < 5 || (times.size() < 1000 && std::chrono::duration<double>(
                                                             std::chrono::steady_clock::now() - start)
                                                                 .count() < seconds)) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    sync();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  const int64_t peak = device.is_cuda() ? cuda_peak_bytes(device) - baseline : tracker->peak_above(baseline);
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return {times[times.size() / 2], peak};
}

struct Shape {
  int64_t n, in, out;
};

std::string mib(int64_t bytes) { return fmt::format("{:.2f}", double(bytes) / (1 << 20)); }

}  // namespace

int main(int argc, char** argv) {
  std::string device_name = "cpu", dtype_name = "float32";
  double seconds = 1.0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i];
    if (flag == "--device") device_name = argv[i + 1];
    else if (flag == "--dtype") dtype_name = argv[i + 1];
    else if (flag == "--seconds") seconds = std::stod(argv[i + 1]);
    else {
      std::cerr << "kron_sum_bench: unknown flag " << flag << " (flags: --device, --dtype, --seconds)\n";
      return 2;
    }
  }
  const torch::Device device(device_name);
  const auto dtype = dtype_name == "float64"    ? torch::kFloat64
                     : dtype_name == "bfloat16" ? torch::kBFloat16
                     : dtype_name == "float16"  ? torch::kFloat16
                                                : torch::kFloat32;
  auto* tracker = install_tracking_allocator();
  const auto options = torch::TensorOptions().dtype(dtype).device(device);
  torch::manual_seed(0);

  fmt::print("kron_sum_bench: {} {} threads={} median of >= 5 runs over {} s per figure\n", device.str(), dtype_name,
             at::get_num_threads(), seconds);
  fmt::print("\n== building W = sum_i A_i (x) B_i, forward + backward ==\n");
  fmt::print("{:>3} {:>11} | {:>9} {:>9} {:>9} | {:>8} {:>8} {:>8} | {:>7} {:>7} {:>7} {:>7}\n", "n", "W", "fused ms",
             "naive ms", "einsum ms", "fused MiB", "naive MiB", "einsum MiB", "t naive", "t einsum", "m naive",
             "m einsum");
  const std::vector<Shape> shapes = {{4, 768, 24}, {4, 24, 768}, {12, 768, 24}, {12, 24, 768}, {4, 1024, 4096}};
  for (const auto& s : shapes) {
    const int64_t p = s.in / s.n, q = s.out / s.n;
    auto A = torch::randn({s.n, s.n, s.n}, options).requires_grad_();
    auto B = torch::randn({s.n, p, q}, options).requires_grad_();
    auto G = torch::randn({s.in, s.out}, options);
    auto run = [&](auto&& build) {
      return measure(
          [&] {
            A.mutable_grad() = torch::Tensor();
            B.mutable_grad() = torch::Tensor();
            build().backward(G);
          },
          device, tracker, seconds);
    };
    const auto fused = run([&] { return dt::kron_sum(A, B); });
    const auto naive = run([&] { return dt::detail::reference::naive_kron_sum(A, B); });
    const auto einsum = run([&] { return torch::einsum("kab,kij->aibj", {A, B}).reshape({s.in, s.out}); });
    const double t_naive = naive.median_ms / fused.median_ms, t_einsum = einsum.median_ms / fused.median_ms;
    const double m_naive = double(naive.peak_bytes) / double(fused.peak_bytes);
    const double m_einsum = double(einsum.peak_bytes) / double(fused.peak_bytes);
    fmt::print("{:>3} {:>11} | {:>9.3f} {:>9.3f} {:>9.3f} | {:>8} {:>8} {:>8} | {:>7.2f} {:>7.2f} {:>7.2f} {:>7.2f}\n",
               s.n, fmt::format("{}x{}", s.in, s.out), fused.median_ms, naive.median_ms, einsum.median_ms,
               mib(fused.peak_bytes), mib(naive.peak_bytes), mib(einsum.peak_bytes), t_naive, t_einsum, m_naive,
               m_einsum);
    fmt::print(
        "JSON {{\"bench\":\"kron_sum\",\"device\":\"{}\",\"dtype\":\"{}\",\"threads\":{},\"n\":{},\"in\":{},\"out\":{},"
        "\"fused_ms\":{:.4f},\"naive_ms\":{:.4f},\"einsum_ms\":{:.4f},\"fused_peak_bytes\":{},\"naive_peak_bytes\":{},"
        "\"einsum_peak_bytes\":{},\"speedup_vs_naive\":{:.2f},\"speedup_vs_einsum\":{:.2f},"
        "\"memory_naive_over_fused\":{:.2f},\"memory_einsum_over_fused\":{:.2f}}}\n",
        device.str(), dtype_name, at::get_num_threads(), s.n, s.in, s.out, fused.median_ms, naive.median_ms,
        einsum.median_ms, fused.peak_bytes, naive.peak_bytes, einsum.peak_bytes, t_naive, t_einsum, m_naive, m_einsum);
  }

  // x W with W built (dense) or applied factor by factor, for the LPHM (rank-1) layers
  // of Compacter and the full-rank PHM layers, at a GLUE batch of 8 x 128 tokens.
  fmt::print("\n== x W for x (1024 tokens, in): dense (build W, one product) vs factored, forward + backward ==\n");
  fmt::print("{:>3} {:>11} {:>5} | {:>9} {:>11} | {:>9} {:>11} | {:>13} {:>9}\n", "n", "W", "rank", "dense ms",
             "factored ms", "dense MiB", "factored MiB", "dense/factored", "automatic");
  const std::vector<std::pair<Shape, int64_t>> layers = {{{4, 768, 24}, 1},  {{4, 24, 768}, 1},
                                                         {{4, 1024, 4096}, 1}, {{4, 4096, 1024}, 1},
                                                         {{12, 768, 24}, 1}, {{4, 768, 24}, 0},
                                                         {{4, 1024, 4096}, 0}};
  for (const auto& [s, layer_rank] : layers) {
    const int64_t rank = layer_rank;  // a copy the lambdas can capture (C++17 lambdas cannot capture a binding)
    const int64_t p = s.in / s.n, q = s.out / s.n;
    auto x = torch::randn({1024, s.in}, options).requires_grad_();
    auto A = torch::randn({s.n, s.n, s.n}, options).requires_grad_();
    auto B = torch::randn({s.n, p, q}, options).requires_grad_();
    auto sf = torch::randn({s.n, p, std::max<int64_t>(rank, 1)}, options).requires_grad_();
    auto tf = torch::randn({s.n, std::max<int64_t>(rank, 1), q}, options).requires_grad_();
    auto G = torch::randn({1024, s.out}, options);
    auto run = [&](dt::KronSumPath path) {
      return measure(
          [&] {
            for (auto* t : {&x, &A, &B, &sf, &tf}) t->mutable_grad() = torch::Tensor();
            auto y = rank > 0 ? dt::kron_sum_matmul(x, A, sf, tf, path) : dt::kron_sum_matmul(x, A, B, path);
            y.backward(G);
          },
          device, tracker, seconds);
    };
    const auto dense = run(dt::KronSumPath::dense);
    const auto factored = run(dt::KronSumPath::factored);
    const bool automatic_factored = rank > 0 && dt::detail::prefer_factored(s.n, p, q, rank);
    const double ratio = dense.median_ms / factored.median_ms;
    fmt::print("{:>3} {:>11} {:>5} | {:>9.3f} {:>11.3f} | {:>9} {:>11} | {:>13.2f} {:>9}\n", s.n,
               fmt::format("{}x{}", s.in, s.out), rank > 0 ? std::to_string(rank) : "full", dense.median_ms,
               factored.median_ms, mib(dense.peak_bytes), mib(factored.peak_bytes), ratio,
               automatic_factored ? "factored" : "dense");
    fmt::print(
        "JSON {{\"bench\":\"kron_sum_matmul\",\"device\":\"{}\",\"dtype\":\"{}\",\"threads\":{},\"tokens\":1024,"
        "\"n\":{},\"in\":{},\"out\":{},\"rank\":{},\"dense_ms\":{:.4f},\"factored_ms\":{:.4f},\"dense_peak_bytes\":{},"
        "\"factored_peak_bytes\":{},\"dense_over_factored\":{:.2f},\"automatic\":\"{}\"}}\n",
        device.str(), dtype_name, at::get_num_threads(), s.n, s.in, s.out, rank > 0 ? std::to_string(rank) : "\"full\"",
        dense.median_ms, factored.median_ms, dense.peak_bytes, factored.peak_bytes, ratio,
        automatic_factored ? "factored" : "dense");
  }
  return 0;
}
