# What deltatune needs from outside: LibTorch (from the torch wheel; tools/setup
# passes its CMake folder), nlohmann-json and SentencePiece (Debian; T5's tokenizer).
# The package config (cmake/deltatuneConfig.cmake.in) finds the same.
find_package(Torch REQUIRED)
find_package(nlohmann_json 3.10 REQUIRED)
# SentencePiece ships no CMake package, only a pkg-config file: its imported target is
# PkgConfig::sentencepiece, global so that a parent project sees it too.
find_package(PkgConfig REQUIRED)
pkg_check_modules(sentencepiece REQUIRED IMPORTED_TARGET GLOBAL sentencepiece)
include(${CMAKE_CURRENT_LIST_DIR}/torch_openmp.cmake)

# Vendored with add_subdirectory, deltatune's parent links deltatune::deltatune, whose
# usage requirements name Torch's imported targets (torch_cpu, torch_cuda, CUDA::...).
# CMake looks those names up in the parent's folder, where they are invisible unless
# global: make every target these find_package calls imported global.
# (find_package(... GLOBAL) does this from CMake 3.24; we require 3.22.)
if(NOT PROJECT_IS_TOP_LEVEL)
  get_directory_property(_deltatune_imported IMPORTED_TARGETS)
  foreach(_deltatune_target IN LISTS _deltatune_imported)
    get_target_property(_deltatune_global ${_deltatune_target} IMPORTED_GLOBAL)
    if(NOT _deltatune_global)
      set_target_properties(${_deltatune_target} PROPERTIES IMPORTED_GLOBAL TRUE)
    endif()
  endforeach()
endif()
