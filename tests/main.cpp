// The test runner's main(): Catch2's own. Built without the precompiled header,
// which already holds catch.hpp without its implementation.
#define CATCH_CONFIG_MAIN
#define CATCH_CONFIG_PREFIX_ALL
#include <catch2/catch.hpp>
