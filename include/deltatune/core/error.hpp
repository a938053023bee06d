// Exceptions deltatune throws: each message says what was wrong and what to do.
#pragma once

#include <stdexcept>
#include <string>
#include <utility>

#include <deltatune/core/format.hpp>

namespace deltatune {

// Base of every deltatune exception; catch this to catch them all.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A tensor or option has a shape, size or value the operation cannot take.
class ShapeError : public Error {
 public:
  using Error::Error;
};

// An options struct holds a value outside its domain (rank 0, n not dividing a dimension, ...).
class OptionError : public Error {
 public:
  using Error::Error;
};

// A checkpoint file is missing, unreadable, malformed or cannot be written; the message names the file.
class CheckpointError : public Error {
 public:
  using Error::Error;
};

namespace detail {

// Throws E with a fmt-formatted message when `ok` is false.
template <class E = Error, class... Args>
inline void check(bool ok, fmt::format_string<Args...> message, Args&&... args) {
  if (!ok) throw E(fmt::format(message, std::forward<Args>(args)...));
}

}  // namespace detail
}  // namespace deltatune
