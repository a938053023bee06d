// Tests of train/distributed.hpp and train/process_group.hpp, and of the Trainer's data
// parallelism: ranks of a Gloo group on threads of this process (one HashStore between them)
// against one process that trains on the whole batch. The launched, multi-process runs are the
// example.*.distributed ctests (examples/CMakeLists.txt).
#include <deltatune/backbones/t5.hpp>
#include <deltatune/core/delta_model.hpp>
#include <deltatune/methods/method_table.hpp>
#include <deltatune/train/distributed.hpp>
#include <deltatune/train/process_group.hpp>
#include <deltatune/train/trainer.hpp>

#include <stdlib.h>
#include <torch/csrc/distributed/c10d/HashStore.hpp>
#include <unistd.h>

#include <exception>
#include <fstream>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "test_support.hpp"

namespace distributed_test {

namespace dt = deltatune;
namespace bb = deltatune::backbones;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

// Runs rank(r, group) for r = 0..world-1, each on a thread with its own Gloo group (one
// HashStore between them), and rethrows the first rank's failure. Catch2's assertions are not
// thread-safe: the ranks return what they saw and the test checks it afterwards.
void on_ranks(int64_t world, const std::function<void(int64_t, std::shared_ptr<dt::DataParallel>)>& rank,
              int64_t bucket_bytes = int64_t(25) << 20) {
  // c10d's flight recorder (a process-wide log of collectives) crashed now and then inserting
  // records of two groups' threads at once; in a launch each process has one group. Off here,
  // before the first group reads the variable.
  ::setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/1);
  const auto timeout = std::chrono::milliseconds(20000);
  c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::HashStore>();
  std::vector<std::exception_ptr> failures(static_cast<std::size_t>(world));
  std::vector<std::thread> threads;
  for (int64_t r = 0; r < world; ++r)
    threads.emplace_back([&, r] {
      try {
        dt::LaunchEnvironment env;
        env.rank = r, env.world_size = world, env.master_addr = "127.0.0.1";
        rank(r, std::make_shared<dt::DataParallel>(dt::detail::gloo_group(store, env, timeout), store, timeout,
                                                   bucket_bytes));
      } catch (...) {
        failures[size_t(r)] = std::current_exception();
      }
    });
  for (auto& t : threads) t.join();
  for (const auto& f : failures)
    if (f) std::rethrow_exception(f);
}

// A folder under the system temp folder for this process; its files removed one by one at the end.
struct TempDir {
  fs::path path;
  explicit TempDir(const std::string& name)
      : path(fs::temp_directory_path() / ("deltatune_distributed_test_" + std::to_string(::getpid()) + "_" + name)) {
    fs::create_directories(path);
  }
  ~TempDir() {
    std::error_code error;
    std::vector<fs::path> files, dirs{path};
    for (const auto& e : fs::recursive_directory_iterator(path, error)) (e.is_directory() ? dirs : files).push_back(e.path());
    for (const auto& f : files) fs::remove(f, error);
    for (auto d = dirs.rbegin(); d != dirs.rend(); ++d) fs::remove(*d, error);
  }
};

}  // namespace

CATCH_TEST_CASE("GradientSync's bucketed all-reduce equals a plain all-reduce of every gradient", "[distributed]") {
  // Three layers, a bias-free one and a tensor no loss reaches (its mean gradient is zero).
  struct Net {
    torch::nn::Linear a{8, 16}, b{16, 4}, c{torch::nn::LinearOptions(4, 3).bias(false)};
    torch::Tensor unused = torch::randn({5}).requires_grad_();
    std::vector<torch::Tensor> params() {
      auto out = a->parameters();
      for (const auto& m : {b->parameters(), c->parameters()}) out.insert(out.end(), m.begin(), m.end());
      out.push_back(unused);
      return out;
    }
    torch::Tensor loss(const torch::Tensor& x) { return c(torch::tanh(b(torch::relu(a(x))))).pow(2).mean(); }
  };
  std::vector<Net> nets;
  std::vector<torch::Tensor> inputs;
  for (int64_t r = 0; r < 2; ++r) {
    torch::manual_seed(1);  // the same weights on both ranks, as after the start's broadcast
    nets.emplace_back();
    inputs.push_back(torch::randn({6, 8}) * double(r + 1));  // each rank its own data
  }
  std::vector<std::vector<torch::Tensor>> plain(2), bucketed(2);
  std::vector<std::size_t> buckets(2);
  on_ranks(2, [&](int64_t r, std::shared_ptr<dt::DataParallel> group) {
    auto params = nets[size_t(r)].params();
    nets[size_t(r)].loss(inputs[size_t(r)]).backward();
    for (const auto& p : params) {
      std::vector<torch::Tensor> g{p.grad().defined() ? p.grad().clone() : torch::zeros_like(p)};
      group->group().allreduce(g)->wait();
      plain[size_t(r)].push_back(g[0].div_(2.0));
      p.mutable_grad() = torch::Tensor();
    }
    dt::GradientSync sync(group, params);
    buckets[size_t(r)] = sync.bucket_count();
    sync.arm();
    nets[size_t(r)].loss(inputs[size_t(r)]).backward();
    sync.finish();
    for (const auto& p : params) bucketed[size_t(r)].push_back(p.grad().clone());
  }, /*bucket_bytes=*/256);
  CATCH_CHECK(buckets[0] >= 3);  // 256 bytes: the larger tensors each in a bucket of their own
  for (std::size_t r = 0; r < 2; ++r)
    for (std::size_t i = 0; i < plain[r].size(); ++i) {
      CATCH_INFO("rank " << r << ", tensor " << i);
      CATCH_CHECK(torch::equal(bucketed[r][i], plain[r][i]));
      CATCH_CHECK(torch::equal(bucketed[r][i], bucketed[0][i]));
    }
  CATCH_CHECK(plain[0].back().abs().max().item<float>() == 0.0f);  // the tensor no loss reached
  CATCH_CHECK(plain[0].front().abs().max().item<float>() > 0.0f);
}

namespace {

struct Batch {
  torch::Tensor ids, labels;
};

// Global batch `step` of 8 examples; every sequence of one length, so that the token mean of the
// whole batch is the mean of its halves' (the two ranks' losses).
Batch global_batch(int64_t step) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(100 + step);
  return {torch::randint(2, 64, {8, 6}, gen, torch::kLong), torch::randint(2, 64, {8, 4}, gen, torch::kLong)};
}

// Rank `rank`'s share of each of 4 global batches an epoch.
dt::BatchSource<Batch> share_of(int64_t rank, int64_t world) {
  const int64_t each = 8 / world;
  return {4, [rank, each](int64_t epoch, int64_t index) {
            const auto b = global_batch(epoch * 4 + index);
            return Batch{b.ids.narrow(0, rank * each, each), b.labels.narrow(0, rank * each, each)};
          }};
}

// A tiny T5 without dropout with preset `method`, seeded: built twice, it is the same model.
struct Tuned {
  bb::T5Model t5;
  std::unique_ptr<dt::DeltaModel> model;
};

Tuned tuned(const std::string& method) {
  torch::manual_seed(7);
  auto t5 = bb::T5Model(bb::T5Config().vocab_size(64).d_model(32).d_kv(8).d_ff(64).num_layers(2).num_heads(4)
                            .relative_attention_num_buckets(8).tie_word_embeddings(false).dropout_rate(0));
  auto model = std::make_unique<dt::DeltaModel>(t5);
  dt::PresetSizes sizes;
  sizes.rank = 4;
  sizes.reduction_factor = 4;
  model->add(method, dt::builtin_methods().preset(method).make(sizes));
  return {t5, std::move(model)};
}

// What a run leaves: the loss of each update (log.jsonl) and the trained tensors.
struct Run {
  std::vector<double> losses;
  std::vector<torch::Tensor> tensors;
  int64_t resumed_from = 0;
};

std::vector<double> logged_losses(const fs::path& dir) {
  std::vector<double> out;
  std::ifstream in(dir / "log.jsonl");
  for (std::string line; std::getline(in, line);) {
    const auto record = nlohmann::json::parse(line);
    if (record.contains("loss")) out.push_back(record["loss"].get<double>());
  }
  return out;
}

// Raised by a loss function to stop a run part-way, as a killed process would.
struct Interrupted : std::runtime_error {
  Interrupted() : std::runtime_error("interrupted") {}
};

// Tensors made without a dtype are `dtype` while in scope (the models, their deltas, their
// optimizer state): float64 checks the maths, float32 what runs.
struct DefaultDtype {
  caffe2::TypeMeta old = torch::get_default_dtype();
  explicit DefaultDtype(torch::ScalarType dtype) { torch::set_default_dtype(c10::scalarTypeToTypeMeta(dtype)); }
  ~DefaultDtype() { torch::set_default_dtype(old); }
};

// Trains `method` in `dtype` for 4 updates (the state saved after update 2) on `world` ranks (1:
// no group), each on its share of the batches; with `stop_at`, the run ends as that update starts.
Run train(const std::string& method, torch::ScalarType dtype, int64_t world, const fs::path& out, int64_t stop_at = 0) {
  const DefaultDtype default_dtype(dtype);
  std::vector<Tuned> models;
  for (int64_t r = 0; r < world; ++r) models.push_back(tuned(method));
  std::vector<Run> runs(static_cast<std::size_t>(world));
  const auto rank = [&](int64_t r, std::shared_ptr<dt::DataParallel> group) {
    auto& t5 = models[size_t(r)].t5;
    int64_t updates = 0;
    auto loss = [&](const Batch& b) {
      if (++updates == stop_at) throw Interrupted();
      return t5->forward(b.ids, torch::ones_like(b.ids), {}, b.labels).loss;
    };
    dt::Trainer<Batch> trainer(dt::TrainerOptions().max_steps(4).lr(1e-2).log_every(1).eval_every(2).progress(false)
                                   .output_dir(out.string()).data_parallel(group),
                               models[size_t(r)].model->named_trainable_parameters(), loss, share_of(r, world));
    try {
      runs[size_t(r)].resumed_from = trainer.fit().resumed_from;
    } catch (const Interrupted&) {
    }
    for (const auto& [name, t] : models[size_t(r)].model->named_trainable_parameters())
      runs[size_t(r)].tensors.push_back(t.detach().clone());
  };
  if (world == 1) rank(0, nullptr);
  else on_ranks(world, rank);
  for (std::size_t r = 1; r < runs.size(); ++r)
    for (std::size_t i = 0; i < runs[0].tensors.size(); ++i) CATCH_CHECK(torch::equal(runs[r].tensors[i], runs[0].tensors[i]));
  runs[0].losses = logged_losses(out);
  return runs[0];
}

// The same losses and trained tensors within `relative` of their scale.
void check_same_run(const Run& got, const Run& expected, double relative) {
  CATCH_REQUIRE(got.losses.size() == expected.losses.size());
  for (std::size_t s = 0; s < got.losses.size(); ++s) {
    CATCH_INFO("update " << s + 1 << ": loss " << got.losses[s] << ", one process " << expected.losses[s]);
    CATCH_CHECK(std::abs(got.losses[s] - expected.losses[s]) <= relative * std::abs(expected.losses[s]));
  }
  CATCH_REQUIRE(got.tensors.size() == expected.tensors.size());
  for (std::size_t i = 0; i < got.tensors.size(); ++i) {
    const double difference = dt::testing::relative_difference(got.tensors[i], expected.tensors[i]);
    CATCH_INFO("trained tensor " << i << ": relative difference " << difference);
    CATCH_CHECK(difference <= relative);
  }
}

}  // namespace

// In float64 the two runs are the same maths (1e-10). In float32 the halves' means round
// otherwise than the whole batch's: the losses agree within 1e-6, the tensors after 4 AdamW
// updates within 1e-4 of their scale. AdamW divides each gradient entry by its own running
// size, so an entry whose terms cancel carries its rounding into the update at full size:
// full fine-tuning's cross-attention key weights, whose gradient passes softmax's Jacobian,
// differ by up to 3.4e-5 (the deltas by up to 4.2e-6), and by other amounts when BLAS sums
// in another order (another build of the loss, a loaded machine). A rank updating from its own
// gradients alone would move entries by up to the learning rate, 1e-2, an update otherwise.
CATCH_TEST_CASE("Two ranks of half the batch train as one process with the whole batch", "[distributed]") {
  for (const std::string method : {"lora", "adapter", "compacter", "full"}) {
    CATCH_INFO("method " << method);
    TempDir one("one_" + method), two("two_" + method), one32("one32_" + method), two32("two32_" + method);
    const auto expected = train(method, torch::kDouble, 1, one.path);
    CATCH_CHECK(expected.losses.size() == 4);
    check_same_run(train(method, torch::kDouble, 2, two.path), expected, 1e-10);
    const auto expected32 = train(method, torch::kFloat, 1, one32.path);
    const auto got32 = train(method, torch::kFloat, 2, two32.path);
    for (std::size_t s = 0; s < got32.losses.size(); ++s)
      CATCH_CHECK(std::abs(got32.losses[s] - expected32.losses[s]) <= 1e-6 * std::abs(expected32.losses[s]));
    check_same_run(got32, expected32, 1e-4);
  }
}

CATCH_TEST_CASE("A run of two ranks resumes in one process, and the reverse", "[distributed]") {
  TempDir reference("reference"), two_then_one("two_then_one"), one_then_two("one_then_two");
  const auto expected = train("lora", torch::kDouble, 1, reference.path);
  train("lora", torch::kDouble, 2, two_then_one.path, /*stop_at=*/3);
  const auto resumed_alone = train("lora", torch::kDouble, 1, two_then_one.path);
  CATCH_CHECK(resumed_alone.resumed_from == 2);
  check_same_run(resumed_alone, expected, 1e-10);
  train("lora", torch::kDouble, 1, one_then_two.path, /*stop_at=*/3);
  const auto resumed_on_two = train("lora", torch::kDouble, 2, one_then_two.path);
  CATCH_CHECK(resumed_on_two.resumed_from == 2);
  check_same_run(resumed_on_two, expected, 1e-10);
}

CATCH_TEST_CASE("Ranks that train different deltas are refused at the start, naming both", "[distributed]") {
  std::vector<std::string> messages(2);
  on_ranks(2, [&](int64_t r, std::shared_ptr<dt::DataParallel> group) {
    auto t = tuned(r == 0 ? "lora" : "adapter");
    try {
      dt::Trainer<Batch> trainer(dt::TrainerOptions().max_steps(1).progress(false).data_parallel(group),
                                 t.model->named_trainable_parameters(), [](const Batch&) { return torch::zeros({}); },
                                 share_of(r, 2));
    } catch (const dt::DistributedError& e) {
      messages[size_t(r)] = e.what();
    }
  });
  CATCH_CHECK_THAT(messages[0], Contains("rank 0 and rank 1 differ in trainable tensors") && Contains("lora_A"));
  CATCH_CHECK_THAT(messages[1], Contains("rank 1 and rank 0 differ in trainable tensors") && Contains("adapter"));
}

CATCH_TEST_CASE("A collective another rank never joins fails after the timeout, naming it", "[distributed]") {
  ::setenv("TORCH_FR_BUFFER_SIZE", "0", /*overwrite=*/1);  // as on_ranks
  c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::HashStore>();
  std::string message;
  std::vector<std::thread> threads;
  for (int64_t r = 0; r < 2; ++r)
    threads.emplace_back([&, r] {
      dt::LaunchEnvironment env;
      env.rank = r, env.world_size = 2, env.master_addr = "127.0.0.1";
      const auto timeout = std::chrono::milliseconds(1500);
      dt::DataParallel group(dt::detail::gloo_group(store, env, timeout), store, timeout);
      if (r == 1) return std::this_thread::sleep_for(std::chrono::milliseconds(4000));  // hangs, then leaves
      try {
        group.mean(1.0, "the update's loss");
      } catch (const dt::DistributedError& e) {
        message = e.what();
      }
    });
  for (auto& t : threads) t.join();
  CATCH_CHECK_THAT(message, Contains("rank 0 of 2: averaging the update's loss failed") && Contains("1.5 s"));
}

// NCCL at world size 1 where a GPU is present: the group joins, a CUDA tensor's gradients come
// back through the all-reduce unchanged, a broadcast keeps rank 0's values.
CATCH_TEST_CASE("GradientSync over NCCL on a GPU", "[distributed][cuda]") {
  if (!dt::testing::cuda_or_skip()) return;
#ifndef DELTATUNE_WITH_NCCL
  CATCH_WARN("NCCL tests skipped: built without nccl.h (DELTATUNE_WITH_NCCL)");
#else
  dt::LaunchEnvironment env;
  env.master_addr = "127.0.0.1";
  c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::HashStore>();
  const auto timeout = std::chrono::milliseconds(60000);
  auto group = std::make_shared<dt::DataParallel>(dt::detail::nccl_group(store, env, timeout), store, timeout,
                                                  int64_t(25) << 20, torch::Device(torch::kCUDA, 0));
  torch::manual_seed(0);
  auto w = torch::randn({64, 32}, torch::kCUDA).requires_grad_();
  auto x = torch::randn({8, 64}, torch::kCUDA);
  x.matmul(w).pow(2).mean().backward();
  const auto expected = w.grad().clone();
  w.mutable_grad() = torch::Tensor();
  dt::GradientSync sync(group, {w});
  sync.arm();
  x.matmul(w).pow(2).mean().backward();
  sync.finish();
  CATCH_CHECK(torch::equal(w.grad(), expected));
  const auto before = w.detach().clone();
  group->broadcast({w}, "the weight");
  CATCH_CHECK(torch::equal(w.detach(), before));
  CATCH_CHECK(group->mean(3.0, "a number") == 3.0);
  CATCH_CHECK(group->gather({1.0, 2.0}, "two numbers") == std::vector<double>{1.0, 2.0});
#endif
}

CATCH_TEST_CASE("LaunchEnvironment reads torchrun's variables and names a bad one", "[distributed]") {
  const auto set = [](const char* name, const char* value) { value ? ::setenv(name, value, 1) : ::unsetenv(name); };
  const auto restore = [&] {
    for (const char* name : {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}) set(name, nullptr);
  };
  restore();
  CATCH_CHECK(!dt::LaunchEnvironment::from_environment());
  set("WORLD_SIZE", "2"), set("RANK", "1"), set("MASTER_ADDR", "10.0.0.1"), set("MASTER_PORT", "29400");
  const auto env = dt::LaunchEnvironment::from_environment();
  CATCH_REQUIRE(env);
  CATCH_CHECK(env->rank == 1);
  CATCH_CHECK(env->local_rank == 1);
  CATCH_CHECK(env->master_port == 29400);
  set("RANK", "2");
  CATCH_CHECK_THROWS_WITH(dt::LaunchEnvironment::from_environment(), Contains("RANK='2'") && Contains("[0, 1]"));
  set("RANK", "1"), set("MASTER_PORT", "29x");
  CATCH_CHECK_THROWS_WITH(dt::LaunchEnvironment::from_environment(), Contains("MASTER_PORT='29x'"));
  set("MASTER_PORT", "29400"), set("MASTER_ADDR", nullptr);
  CATCH_CHECK_THROWS_WITH(dt::LaunchEnvironment::from_environment(), Contains("MASTER_ADDR is not set"));
  restore();
}

}  // namespace distributed_test
