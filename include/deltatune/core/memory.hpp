// A bound on sizes read from files and command lines: a forged vocab_size or LoRA rank is
// refused by name before torch's allocator fails with a backtrace, or before a delta's config
// asks for more parameters than the file beside it holds.
#pragma once

#include <unistd.h>

#include <string>

#include <deltatune/core/error.hpp>
#include <deltatune/core/format.hpp>

namespace deltatune::detail {

inline double physical_memory_bytes() {
  return double(::sysconf(_SC_PHYS_PAGES)) * double(::sysconf(_SC_PAGE_SIZE));
}

// "" when `elements` float32 values fit in this machine's memory, else what they would need.
// Doubles: the products of untrusted sizes overflow 64-bit integers.
inline std::string memory_problem(double elements) {
  const double gib = double(1 << 30), bytes = 4 * elements, memory = physical_memory_bytes();
  if (bytes <= memory) return "";
  return fmt::format("needs {:.3g} GiB for its float32 parameters, more than this machine's {:.3g} GiB of memory",
                     bytes / gib, memory / gib);
}

// While one lives on this thread, no delta module may have more than `elements` parameters.
// DeltaModel::load opens one when it rebuilds a delta from delta_config.json: the file beside
// it holds every parameter of that delta, so a module needing more than all of them comes from
// a forged or mismatched config, and is refused before it allocates (machine memory alone
// would let a rank read from the config allocate gigabytes, only to be refused afterwards).
class ParameterCap {
 public:
  ParameterCap(double elements, std::string source) : elements_(elements), source_(std::move(source)), outer_(current()) {
    current() = this;
  }
  ~ParameterCap() { current() = outer_; }
  ParameterCap(const ParameterCap&) = delete;
  ParameterCap& operator=(const ParameterCap&) = delete;

  // "" when a module of `elements` parameters is within the innermost cap, or none is open.
  static std::string problem(double elements) {
    const auto* cap = current();
    if (!cap || elements <= cap->elements_) return "";
    return fmt::format("needs {:.0f} parameters, more than the {:.0f} that {} holds for the whole delta", elements,
                       cap->elements_, cap->source_);
  }

 private:
  static const ParameterCap*& current() {
    thread_local const ParameterCap* cap = nullptr;
    return cap;
  }

  double elements_;
  std::string source_;
  const ParameterCap* outer_;
};

// Throws OptionError "<what> needs ..." when a module's `elements` float32 parameters cannot fit
// in memory, or exceed the open ParameterCap.
inline void check_parameters_fit(double elements, const std::string& what) {
  auto problem = memory_problem(elements);
  if (problem.empty()) problem = ParameterCap::problem(elements);
  check<OptionError>(problem.empty(), "{} {}", what, problem);
}

}  // namespace deltatune::detail
