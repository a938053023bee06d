// The fused CUDA kron_sum kernels, as the one translation unit that registers them:
// the INTERFACE source of the CMake target deltatune::cuda.
#include <deltatune/kernels/kron_sum_cuda.cuh>
