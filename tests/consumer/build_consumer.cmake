# Builds and runs one consumer project the way a user would (cmake -P, from ctest):
# optionally installs deltatune into a fresh prefix first, then configures the
# consumer from scratch, builds it and runs its executable.
#   -DCONSUMER_SOURCE=... -DCONSUMER_BINARY=...  the consumer project and its build folder
#   -DGENERATOR=... -DMAKE_PROGRAM=... -DCXX_COMPILER=... -DBUILD_TYPE=... (the configuration installed)
#   -DCXX_LAUNCHER=... -DPREFIX_PATH=...         lists, with '|' for ';' (ctest splits on ';')
#   -DINSTALL_FROM=<deltatune build> -DINSTALL_PREFIX=<prefix>   install first (find_package)
#   -DEXTRA_ARGS=...                             more -D options for the consumer, '|'-separated
cmake_minimum_required(VERSION 3.22)

foreach(var CONSUMER_SOURCE CONSUMER_BINARY GENERATOR CXX_COMPILER)
  if(NOT DEFINED ${var} OR "${${var}}" STREQUAL "")
    message(FATAL_ERROR "build_consumer.cmake: pass -D${var}=...")
  endif()
endforeach()
foreach(var CXX_LAUNCHER PREFIX_PATH EXTRA_ARGS)
  string(REPLACE "|" ";" ${var} "${${var}}")
endforeach()

# Runs a command, echoing it; stops the test with its exit status on failure.
function(run what)
  execute_process(COMMAND ${ARGN} COMMAND_ECHO STDOUT RESULT_VARIABLE status)
  if(NOT status EQUAL 0)
    message(FATAL_ERROR "consumer test: ${what} failed (${status})")
  endif()
endfunction()

# From scratch each time: a stale prefix or cache would hide a broken package.
file(REMOVE_RECURSE "${CONSUMER_BINARY}")
if(INSTALL_FROM)
  file(REMOVE_RECURSE "${INSTALL_PREFIX}")
  run("installing deltatune" "${CMAKE_COMMAND}" --install "${INSTALL_FROM}" --prefix "${INSTALL_PREFIX}"
      --config "${BUILD_TYPE}")
  list(PREPEND PREFIX_PATH "${INSTALL_PREFIX}")
endif()

# The settings go in through an initial cache (-C): lists keep their ';' there. No build type:
# the consumer checks that the package compiles, links and runs, and its one torch translation
# unit builds in a fraction of the time without optimisation or debug information.
set(init "${CONSUMER_BINARY}-init.cmake")
file(WRITE "${init}" "set(CMAKE_CXX_COMPILER [==[${CXX_COMPILER}]==] CACHE FILEPATH \"\")
set(CMAKE_BUILD_TYPE \"\" CACHE STRING \"\")
set(CMAKE_PREFIX_PATH [==[${PREFIX_PATH}]==] CACHE STRING \"\")
set(CMAKE_CXX_COMPILER_LAUNCHER [==[${CXX_LAUNCHER}]==] CACHE STRING \"\")
")
if(MAKE_PROGRAM)
  file(APPEND "${init}" "set(CMAKE_MAKE_PROGRAM [==[${MAKE_PROGRAM}]==] CACHE FILEPATH \"\")\n")
endif()
run("configuring the consumer" "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE}" -B "${CONSUMER_BINARY}" -G "${GENERATOR}"
    -C "${init}" ${EXTRA_ARGS})
# One translation unit; one job keeps the machine's two cores for ctest's other tests.
run("building the consumer" "${CMAKE_COMMAND}" --build "${CONSUMER_BINARY}" --parallel 1)
run("running the consumer" "${CONSUMER_BINARY}/consumer")
