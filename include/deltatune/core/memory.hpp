// A bound on sizes read from files and command lines: a forged vocab_size or LoRA rank is
// refused by name before torch's allocator fails with a backtrace.
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

// Throws OptionError "<what> needs ... GiB ..." when a module's `elements` float32 parameters cannot fit.
inline void check_parameters_fit(double elements, const std::string& what) {
  const auto problem = memory_problem(elements);
  check<OptionError>(problem.empty(), "{} {}", what, problem);
}

}  // namespace deltatune::detail
