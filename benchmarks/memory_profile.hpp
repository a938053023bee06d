// Peak tensor memory of a step on the CPU, the analogue of CUDA's max_memory_allocated: the
// process's RSS also holds the allocator's retained and fragmented heap, which hides what the
// tensors themselves take. While an AllocationPeak lives, torch's CPU allocator reports each
// allocation and each free of what it allocated meanwhile (the hooks torch.profiler's
// profile_memory uses, so benchmarks/peft_bench.py measures the peer the same way).
#pragma once

#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <torch/torch.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

namespace deltatune::bench {

class AllocationPeak {
 public:
  AllocationPeak() : guard_(c10::DebugInfoKind::PROFILER_STATE, reporter_) {}

  // The highest of bytes allocated less bytes freed since construction.
  int64_t peak_bytes() const { return reporter_->peak(); }
  // Bytes allocated less bytes freed since construction: what is held now (tests/test_support.hpp
  // measures what a forward keeps for backward with it).
  int64_t live_bytes() const { return reporter_->live(); }

 private:
  class Reporter : public c10::MemoryReportingInfoBase {
   public:
    bool memoryProfilingEnabled() const override { return true; }
    void reportMemoryUsage(void*, int64_t alloc_size, size_t, size_t, c10::Device device) override {
      if (!device.is_cpu()) return;
      std::lock_guard<std::mutex> lock(mutex_);
      live_ += alloc_size;
      peak_ = std::max(peak_, live_);
    }
    int64_t peak() const {
      std::lock_guard<std::mutex> lock(mutex_);
      return peak_;
    }
    int64_t live() const {
      std::lock_guard<std::mutex> lock(mutex_);
      return live_;
    }

   private:
    mutable std::mutex mutex_;
    int64_t live_ = 0, peak_ = 0;
  };

  std::shared_ptr<Reporter> reporter_ = std::make_shared<Reporter>();
  c10::DebugInfoGuard guard_;
};

// Bytes of the storages under `tensors`, each counted once (tied weights, views).
inline int64_t storage_bytes(const std::vector<torch::Tensor>& tensors) {
  std::set<const void*> seen;
  int64_t bytes = 0;
  for (const auto& t : tensors)
    if (t.defined() && seen.insert(t.storage().data()).second) bytes += int64_t(t.storage().nbytes());
  return bytes;
}

}  // namespace deltatune::bench
