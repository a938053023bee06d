// Precompiled for every test: torch first, since torch/torch.h defines CHECK;
// the tests use Catch2's prefixed macros (CATCH_CHECK, CATCH_REQUIRE, ...).
#pragma once
#include <torch/torch.h>
#define CATCH_CONFIG_PREFIX_ALL
#include <catch2/catch.hpp>
