// Per-operator profile of the benchmarks' C++ side: how often each ATen operator and autograd
// node ran and its self time (its own time, less the operators it called), from RecordFunction
// callbacks, the mechanism torch.profiler is built on, so that the names match the peer's
// profile. benchmarks/peft_bench.py --profile prints both side by side.
#pragma once

#include <ATen/record_function.h>
#include <nlohmann/json.hpp>

#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace deltatune::bench {

class OperatorProfile {
 public:
  struct Totals {
    int64_t calls = 0;
    double self_ms = 0;
  };

  // Records from now until the profile is destroyed, on every thread.
  OperatorProfile() {
    handle_ = at::addGlobalCallback(
        at::RecordFunctionCallback(&OperatorProfile::enter, &OperatorProfile::leave)
            .scopes({at::RecordScope::FUNCTION, at::RecordScope::BACKWARD_FUNCTION}));
  }
  ~OperatorProfile() { at::removeCallback(handle_); }
  OperatorProfile(const OperatorProfile&) = delete;
  OperatorProfile& operator=(const OperatorProfile&) = delete;

  // {"aten::mm": {"calls": n, "self_ms": t}, ...}, calls and times divided by `steps`.
  static nlohmann::json per_step(int steps) {
    std::lock_guard<std::mutex> lock(mutex());
    nlohmann::json out = nlohmann::json::object();
    for (const auto& [name, t] : totals())
      out[name] = {{"calls", double(t.calls) / steps}, {"self_ms", t.self_ms / steps}};
    return out;
  }

 private:
  using Clock = std::chrono::steady_clock;
  struct Frame {
    Clock::time_point start;
    double children_ms = 0;
  };

  // Each thread's open operators, innermost last: a parent's self time excludes its children's.
  static std::vector<Frame>& stack() {
    thread_local std::vector<Frame> frames;
    return frames;
  }
  static std::map<std::string, Totals>& totals() {
    static std::map<std::string, Totals> map;
    return map;
  }
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }

  static std::unique_ptr<at::ObserverContext> enter(const at::RecordFunction&) {
    stack().push_back({Clock::now(), 0});
    return nullptr;
  }
  static void leave(const at::RecordFunction& fn, at::ObserverContext*) {
    auto& frames = stack();
    if (frames.empty()) return;  // entered before the profile began
    const Frame frame = frames.back();
    frames.pop_back();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - frame.start).count();
    if (!frames.empty()) frames.back().children_ms += ms;
    std::lock_guard<std::mutex> lock(mutex());
    auto& t = totals()[fn.name()];
    t.calls += 1;
    t.self_ms += ms - frame.children_ms;
  }

  at::CallbackHandle handle_;
};

}  // namespace deltatune::bench
