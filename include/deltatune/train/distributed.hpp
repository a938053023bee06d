// Data-parallel training on LibTorch's c10d: every rank holds the whole model and trains on its
// share of each global batch; after backward the trainable tensors' gradients are averaged over
// the ranks, so that every rank takes the same optimizer step. Only what trains is all-reduced:
// a delta's gradients are 0.05-2% of full fine-tuning's bytes.
//
// This header needs c10d's generic Backend and Store only; train/process_group.hpp makes the
// Gloo (CPU) or NCCL (CUDA) group from torchrun's environment variables. The Trainer takes a
// DataParallel through TrainerOptions::data_parallel.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/utils/lambda_post_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>
#include <torch/torch.h>

#include <deltatune/core/error.hpp>

namespace deltatune {

// A collective failed or timed out (a rank died, hung or lost its connection), or the ranks
// disagree about what they train; the message names the operation and the ranks.
class DistributedError : public Error {
 public:
  using Error::Error;
};

// This process's place in a launch, from torchrun's environment variables.
struct LaunchEnvironment {
  int64_t rank = 0;
  int64_t world_size = 1;
  int64_t local_rank = 0;         // the rank among this machine's processes (its GPU, with NCCL)
  std::string master_addr;        // where rank 0 serves the rendezvous store
  int64_t master_port = 0;

  // RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; nullopt when WORLD_SIZE is unset
  // (a plain single-process run). A variable that is missing or out of range is an OptionError
  // naming it.
  static std::optional<LaunchEnvironment> from_environment() {
    if (std::getenv("WORLD_SIZE") == nullptr) return std::nullopt;
    LaunchEnvironment env;
    env.world_size = variable("WORLD_SIZE", 1, 1 << 20);
    env.rank = variable("RANK", 0, env.world_size - 1);
    env.local_rank = std::getenv("LOCAL_RANK") ? variable("LOCAL_RANK", 0, env.world_size - 1) : env.rank;
    const char* addr = std::getenv("MASTER_ADDR");
    detail::check<OptionError>(addr != nullptr && *addr != '\0', "MASTER_ADDR is not set: with WORLD_SIZE {} give the "
                               "address of rank 0's machine (tools/launch sets it)", env.world_size);
    env.master_addr = addr;
    env.master_port = variable("MASTER_PORT", 1, 65535);
    return env;
  }

 private:
  static int64_t variable(const char* name, int64_t low, int64_t high) {
    const char* text = std::getenv(name);
    detail::check<OptionError>(text != nullptr, "{} is not set; launch with tools/launch or torchrun's variables "
                               "(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)", name);
    char* end = nullptr;
    const long long value = std::strtoll(text, &end, 10);
    detail::check<OptionError>(*text != '\0' && *end == '\0' && value >= low && value <= high,
                               "{}='{}': give a whole number in [{}, {}]", name, text, low, high);
    return value;
  }
};

// A process group and the collectives training needs. Every call is collective (all ranks make
// it, in the same order) and throws DistributedError, naming what it was doing, when another
// rank has died, hung past the timeout or disconnected.
class DataParallel {
 public:
  // `device`: where the group's own tensors (a mean, gathered values) go: the CPU for Gloo, this
  // rank's GPU for NCCL.
  DataParallel(c10::intrusive_ptr<c10d::Backend> group, c10::intrusive_ptr<c10d::Store> store,
               std::chrono::milliseconds timeout, int64_t bucket_bytes = int64_t(25) << 20,
               torch::Device device = torch::kCPU)
      : group_(std::move(group)), store_(std::move(store)), timeout_(timeout), bucket_bytes_(bucket_bytes),
        device_(device) {
    detail::check<OptionError>(bucket_bytes_ > 0, "DataParallel: bucket_bytes is {}; give a positive size", bucket_bytes_);
  }

  int64_t rank() const { return group_->getRank(); }
  int64_t world_size() const { return group_->getSize(); }
  bool is_main() const { return rank() == 0; }
  int64_t bucket_bytes() const { return bucket_bytes_; }
  c10d::Backend& group() { return *group_; }

  // Runs `f` (collectives on the group); a failure becomes a DistributedError naming `what`.
  template <class F>
  decltype(auto) guarded(const std::string& what, F&& f) {
    try {
      return f();
    } catch (const Error&) {
      throw;
    } catch (const std::exception& e) {
      std::string reason = e.what();
      reason = reason.substr(0, reason.find('\n'));  // c10's messages carry a backtrace after the first line
      throw DistributedError(fmt::format("rank {} of {}: {} failed: {}. Another rank exited, hung for longer than the "
                                         "timeout ({} s) or lost its connection; see its output", rank(), world_size(),
                                         what, reason, timeout_.count() / 1000.0));
    }
  }

  // Rank 0's values of `tensors`, in place on every rank.
  void broadcast(std::vector<torch::Tensor> tensors, const std::string& what) {
    guarded("broadcasting " + what, [&] {
      for (auto& t : tensors) {
        std::vector<torch::Tensor> one{t.detach()};
        group_->broadcast(one)->wait();
      }
    });
  }

  // The mean of `value` over the ranks.
  double mean(double value, const std::string& what) {
    std::vector<torch::Tensor> one{torch::tensor({value}, torch::TensorOptions(torch::kDouble).device(device_))};
    guarded("averaging " + what, [&] { group_->allreduce(one)->wait(); });
    return one[0].item<double>() / double(world_size());
  }

  // Every rank's `values`, concatenated in rank order.
  std::vector<double> gather(const std::vector<double>& values, const std::string& what) {
    return guarded("gathering " + what, [&] {
      const auto counts = all_gather(torch::tensor({int64_t(values.size())}, torch::kLong));
      const int64_t most = counts.max().item<int64_t>();
      auto mine = torch::zeros({most}, torch::kDouble);
      if (!values.empty()) mine.narrow(0, 0, int64_t(values.size())).copy_(torch::tensor(values, torch::kDouble));
      const auto all = all_gather(mine).view({world_size(), most});
      std::vector<double> out;
      for (int64_t r = 0; r < world_size(); ++r) {
        const auto row = all[r].narrow(0, 0, counts[r].item<int64_t>()).contiguous();
        out.insert(out.end(), row.data_ptr<double>(), row.data_ptr<double>() + row.numel());
      }
      return out;
    });
  }

  // Refuses to go on unless every rank holds the same `value` of `what` (its deltas, its
  // backbone's fingerprint): the message names both ranks and the first line that differs.
  void check_same(const std::string& what, const std::string& value) {
    const std::string key = fmt::format("deltatune/check/{}/", checks_++);
    guarded("comparing " + what, [&] {
      store_->set(key + std::to_string(rank()), std::vector<uint8_t>(value.begin(), value.end()));
      for (int64_t r = 0; r < world_size(); ++r) {
        const auto bytes = store_->get(key + std::to_string(r));
        const std::string theirs(bytes.begin(), bytes.end());
        if (theirs != value) {
          const auto [mine_line, their_line] = first_difference(value, theirs);
          throw DistributedError(fmt::format("rank {} and rank {} differ in {}: rank {} has '{}' where rank {} has '{}'; "
                                             "start every rank with the same model, deltas and flags", rank(), r, what,
                                             rank(), mine_line, r, their_line));
        }
      }
    });
  }

 private:
  // `t` (1-D, on the CPU) of every rank, concatenated in rank order, on the CPU.
  torch::Tensor all_gather(const torch::Tensor& t) {
    std::vector<std::vector<torch::Tensor>> out(1);
    std::vector<torch::Tensor> in{t.to(device_)};
    for (int64_t r = 0; r < world_size(); ++r) out[0].push_back(torch::empty_like(in[0]));
    group_->allgather(out, in)->wait();
    return torch::cat(out[0]).cpu();
  }

  // The first line where `a` and `b` differ, of each.
  static std::pair<std::string, std::string> first_difference(const std::string& a, const std::string& b) {
    std::size_t at = 0;
    for (;;) {
      const auto end_a = a.find('\n', at), end_b = b.find('\n', at);
      const auto line_a = a.substr(at, end_a - at), line_b = b.substr(at, end_b - at);
      if (line_a != line_b) return {line_a, line_b};
      if (end_a == std::string::npos || end_b == std::string::npos) {  // one ends where the other goes on
        const auto next = [](const std::string& s, std::size_t end) {
          return end == std::string::npos ? std::string("(nothing more)") : s.substr(end + 1, s.find('\n', end + 1) - end - 1);
        };
        return {next(a, end_a), next(b, end_b)};
      }
      at = end_a + 1;
    }
  }

  c10::intrusive_ptr<c10d::Backend> group_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::chrono::milliseconds timeout_;
  int64_t bucket_bytes_;
  torch::Device device_;
  int64_t checks_ = 0;  // a fresh store key for each check_same
};

// Averages the gradients of `params` over the ranks of a DataParallel, as torch's
// DistributedDataParallel does: the tensors are packed into buckets of about bucket_bytes, in
// reverse order (roughly the order backward produces their gradients), and each bucket is
// all-reduced as soon as backward has accumulated all of its gradients (a hook after each
// tensor's gradient accumulation), so that the communication overlaps the rest of backward.
// Buckets start in index order on every rank, since collectives pair up by order.
//   sync.arm();  loss.backward();  sync.finish();   // each tensor's .grad is now the ranks' mean
class GradientSync {
 public:
  GradientSync(std::shared_ptr<DataParallel> group, std::vector<torch::Tensor> params)
      : group_(std::move(group)), params_(std::move(params)) {
    plan_buckets();
    for (std::size_t i = 0; i < params_.size(); ++i) {
      auto accumulator = torch::autograd::impl::grad_accumulator(params_[i]);
      detail::check<OptionError>(accumulator != nullptr, "GradientSync: tensor {} (shape {}) is not a leaf that requires "
                                 "grad", i, params_[i].sizes());
      hooks_.push_back({accumulator, accumulator->add_post_hook(std::make_unique<torch::autograd::utils::LambdaPostHook>(
                                         [this, i](const torch::autograd::variable_list& outputs,
                                                   const torch::autograd::variable_list&) {
                                           on_gradient(i);
                                           return outputs;
                                         }))});
    }
  }
  ~GradientSync() {
    for (auto& hook : hooks_) hook.accumulator->del_post_hook(hook.key);
  }
  GradientSync(const GradientSync&) = delete;
  GradientSync& operator=(const GradientSync&) = delete;

  // The next backward's gradients are reduced: call before the backward of an update's last
  // micro-batch (the earlier ones accumulate locally, as DistributedDataParallel's no_sync).
  void arm() {
    std::lock_guard<std::mutex> lock(mutex_);
    armed_ = true;
  }

  // After that backward: starts the buckets no gradient completed (tensors this step did not
  // reach count as zero), waits for all, and leaves every tensor's .grad the ranks' mean.
  void finish() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (next_ < buckets_.size()) start(buckets_[next_++]);
      armed_ = false;
    }
    for (std::size_t b = 0; b < buckets_.size(); ++b) {
      auto& bucket = buckets_[b];
      group_->guarded(fmt::format("all-reducing gradient bucket {} of {}", b + 1, buckets_.size()),
                      [&] { bucket.work->wait(); });
      bucket.flat[0].div_(double(group_->world_size()));
      int64_t at = 0;
      for (const auto i : bucket.params) {
        auto& grad = params_[i].mutable_grad();
        const auto mean = bucket.flat[0].narrow(0, at, params_[i].numel()).view_as(params_[i]);
        if (grad.defined()) grad.copy_(mean); else grad = mean.clone();
        at += params_[i].numel();
      }
      bucket.ready = 0, bucket.work.reset(), bucket.flat.clear();
    }
    next_ = 0;
  }

  // Bytes each rank sends into the all-reduce per update (the buckets' sizes).
  int64_t bytes_per_update() const {
    int64_t bytes = 0;
    for (const auto& p : params_) bytes += p.numel() * int64_t(p.element_size());
    return bytes;
  }
  std::size_t bucket_count() const { return buckets_.size(); }

 private:
  struct Bucket {
    std::vector<std::size_t> params;     // indexes into params_
    int64_t bytes = 0;
    std::size_t ready = 0;               // gradients accumulated this backward
    std::vector<torch::Tensor> flat;     // the packed gradients, while reduced
    c10::intrusive_ptr<c10d::Work> work;
  };
  struct Hook {
    std::shared_ptr<torch::autograd::Node> accumulator;  // held: the tensor holds it weakly
    uintptr_t key;
  };

  // Buckets of one dtype and device each, filled from the last tensor back.
  void plan_buckets() {
    bucket_of_.assign(params_.size(), 0);
    for (std::size_t k = params_.size(); k-- > 0;) {
      const auto& p = params_[k];
      const int64_t bytes = p.numel() * int64_t(p.element_size());
      const bool fits = !buckets_.empty() && buckets_.back().bytes + bytes <= group_->bucket_bytes() &&
                        params_[buckets_.back().params.front()].options().type_equal(p.options());
      if (!fits) buckets_.emplace_back();
      buckets_.back().params.push_back(k);
      buckets_.back().bytes += bytes;
      bucket_of_[k] = buckets_.size() - 1;
    }
  }

  // A tensor's gradient is accumulated: start its bucket, and those after it, once complete.
  void on_gradient(std::size_t i) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!armed_) return;
    ++buckets_[bucket_of_[i]].ready;
    while (next_ < buckets_.size() && buckets_[next_].ready == buckets_[next_].params.size()) start(buckets_[next_++]);
  }

  void start(Bucket& bucket) {
    std::vector<torch::Tensor> grads;
    for (const auto i : bucket.params) {
      const auto& g = params_[i].grad();
      grads.push_back(g.defined() ? g.reshape(-1) : torch::zeros({params_[i].numel()}, params_[i].options()));
    }
    bucket.flat = {torch::cat(grads)};
    bucket.work = group_->guarded("starting a gradient all-reduce", [&] { return group_->group().allreduce(bucket.flat); });
  }

  std::shared_ptr<DataParallel> group_;
  std::vector<torch::Tensor> params_;
  std::vector<Bucket> buckets_;
  std::vector<std::size_t> bucket_of_;  // each tensor's bucket
  std::vector<Hook> hooks_;
  std::mutex mutex_;
  bool armed_ = false;
  std::size_t next_ = 0;  // the first bucket not started this backward
};

}  // namespace deltatune
