// Tests of core/error.hpp: the exception hierarchy and detail::check's formatting.
#include <deltatune/core/error.hpp>

namespace error_test {

namespace dt = deltatune;

CATCH_TEST_CASE("detail::check throws the named exception with a formatted message", "[core][errors]") {
  CATCH_CHECK_NOTHROW(dt::detail::check(true, "never {}", "shown"));
  try {
    dt::detail::check<dt::OptionError>(false, "LoRA: r must be > 0, got {}", 0);
    CATCH_FAIL("check(false, ...) did not throw");
  } catch (const dt::OptionError& e) {
    CATCH_CHECK(std::string(e.what()) == "LoRA: r must be > 0, got 0");
  }
  // Every deltatune exception is a deltatune::Error and a std::runtime_error.
  CATCH_CHECK_THROWS_AS(dt::detail::check<dt::ShapeError>(false, "x"), dt::Error);
  CATCH_CHECK_THROWS_AS(dt::detail::check<dt::ShapeError>(false, "x"), std::runtime_error);
}

}  // namespace error_test
