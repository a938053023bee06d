// A terminal progress bar: step/total, loss, rate and ETA; redrawn in place with \r on a
// terminal, plain periodic lines when the output is a file or a pipe (logs stay readable).
#pragma once

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <iostream>
#include <optional>
#include <string>

#include <deltatune/core/format.hpp>

namespace deltatune {

// "1:02:03", "4:05", "0:07"; "?" while unknown (no step done yet).
inline std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const auto s = static_cast<int64_t>(std::llround(seconds));
  return s >= 3600 ? fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60) : fmt::format("{}:{:02}", s / 60, s % 60);
}

// Shows the progress of `total` steps on `out`.
//   deltatune::ProgressBar bar(1000);
//   for (int64_t step = 1; step <= 1000; ++step) bar.update(step, loss);
//   bar.finish();
class ProgressBar {
 public:
  // `tty`: redraw in place; by default when `out` is std::cout and stdout is a terminal.
  // `every_s`: seconds between the plain lines written when not redrawing.
  explicit ProgressBar(int64_t total, std::ostream& out = std::cout, std::optional<bool> tty = std::nullopt,
                       double every_s = 30.0)
      : total_(total), out_(out), tty_(tty.value_or(&out == &std::cout && ::isatty(STDOUT_FILENO) == 1)),
        every_s_(every_s), start_(Clock::now()) {}

  // Records that `step` of the total are done with the latest `loss`; the first call sets where
  // the rate starts counting (a resumed run starts past 0).
  void update(int64_t step, double loss) {
    if (!first_step_) first_step_ = step - 1;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
    const bool due = step == total_ || step == *first_step_ + 1 || elapsed - last_print_ >= every_s_;
    if (!tty_ && !due) return;
    last_print_ = elapsed;
    out_ << (tty_ ? "\r" : "") << line(step, loss, elapsed) << (tty_ ? "" : "\n") << std::flush;
  }

  // Ends the redrawn line so that what follows starts on a fresh one.
  void finish() {
    if (tty_) out_ << '\n' << std::flush;
  }

  // The text shown for `step` done with `loss` after `elapsed` seconds since the first update.
  std::string line(int64_t step, double loss, double elapsed) const {
    constexpr int kWidth = 24;
    const double done = total_ > 0 ? static_cast<double>(step) / static_cast<double>(total_) : 1.0;
    const int filled = static_cast<int>(done * kWidth);
    const double rate = elapsed > 0 ? static_cast<double>(step - first_step_.value_or(0)) / elapsed : 0.0;
    return fmt::format("{:>{}}/{} [{}{}] {:3.0f}% loss {:.4f} {:.2f} it/s ETA {}", step, fmt::to_string(total_).size(),
                       total_, std::string(filled, '#'), std::string(kWidth - filled, '.'), 100 * done, loss, rate,
                       format_duration(rate > 0 ? static_cast<double>(total_ - step) / rate : NAN));
  }

 private:
  using Clock = std::chrono::steady_clock;
  int64_t total_;
  std::ostream& out_;
  bool tty_;
  double every_s_;
  Clock::time_point start_;
  std::optional<int64_t> first_step_;
  double last_print_ = -1e300;
};

}  // namespace deltatune
