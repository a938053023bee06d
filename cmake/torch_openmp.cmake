# LibTorch's at::parallel_for, which the fused Kronecker-sum kernels and the dropout masks
# use, is inline in an OpenMP build of LibTorch (the torch wheel's): it spreads work over
# threads only in a translation unit compiled with -fopenmp, and without it every call runs
# on one thread. The target deltatune_torch_openmp compiles with -fopenmp and links the
# libgomp LibTorch itself loads (the wheel ships it in its lib folder), so that the process
# keeps one OpenMP runtime and one thread pool. GCC only: clang's -fopenmp calls LLVM's
# libomp, a second runtime; with clang, or a LibTorch without its own libgomp, the target is
# empty and those loops stay on one thread.
# Included by cmake/dependencies.cmake and by the package's deltatuneConfig.cmake, after
# Torch is found (TORCH_INSTALL_PREFIX).
if(NOT TARGET deltatune_torch_openmp)
  add_library(deltatune_torch_openmp INTERFACE IMPORTED GLOBAL)
  file(GLOB _deltatune_libgomp "${TORCH_INSTALL_PREFIX}/lib/libgomp*.so*")
  if(_deltatune_libgomp AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU")
    list(GET _deltatune_libgomp 0 _deltatune_libgomp)
    target_compile_options(deltatune_torch_openmp INTERFACE $<$<COMPILE_LANGUAGE:CXX>:-fopenmp>)
    target_link_libraries(deltatune_torch_openmp INTERFACE "${_deltatune_libgomp}")
  endif()
  unset(_deltatune_libgomp)
endif()
