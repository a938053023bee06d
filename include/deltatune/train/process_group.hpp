// The process group of a launch (tools/launch, torchrun, or the same variables set by hand):
// a TCPStore at MASTER_ADDR:MASTER_PORT, served by rank 0, then Gloo for CPU tensors or NCCL
// for CUDA ones, with a timeout after which a collective that another rank never joins fails.
//
// Gloo's and NCCL's headers come in here only: compile with -DUSE_C10D_GLOO and gloo's headers
// (Debian's libgloo-dev; the torch wheel carries the library but not the headers), and for
// NCCL -DDELTATUNE_WITH_NCCL and nccl.h (LibTorch's CMake defines USE_C10D_NCCL whether or not
// nccl.h is there). CMake: link deltatune::distributed, which adds them.
//   auto env = deltatune::LaunchEnvironment::from_environment();   // nullopt: not launched
//   auto group = deltatune::start_data_parallel(*env, deltatune::DistributedOptions().timeout_seconds(120));
//   trainer_options.data_parallel(group);
#pragma once

#include <chrono>
#include <memory>
#include <string>

#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef DELTATUNE_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif
#include <torch/torch.h>

#include <deltatune/core/error.hpp>
#include <deltatune/train/distributed.hpp>

#ifndef USE_C10D_GLOO
#error "deltatune/train/process_group.hpp needs -DUSE_C10D_GLOO and gloo's headers (link deltatune::distributed)"
#endif

namespace deltatune {

struct DistributedOptions {
  // Where the tensors live: the CPU (Gloo) or CUDA (NCCL, one GPU per rank: LOCAL_RANK's).
  TORCH_ARG(torch::Device, device) = torch::kCPU;
  // How long a rank waits for the others: at the rendezvous and in each collective. A rank that
  // died fails the others at once (its connections close); one that hangs, after this.
  TORCH_ARG(double, timeout_seconds) = 300;
  // Gradients are all-reduced in buckets of about this many MiB (DistributedDataParallel's 25).
  TORCH_ARG(double, bucket_mib) = 25;
};

namespace detail {

inline c10::intrusive_ptr<c10d::Backend> gloo_group(const c10::intrusive_ptr<c10d::Store>& store, const LaunchEnvironment& env,
                                                    std::chrono::milliseconds timeout) {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  // On one machine the loopback device; across machines the interface this host's name resolves to.
  const bool local = env.master_addr == "127.0.0.1" || env.master_addr == "localhost";
  options->devices.push_back(local ? c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1")
                                   : c10d::ProcessGroupGloo::createDefaultDevice());
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, int(env.rank), int(env.world_size), options);
}

inline c10::intrusive_ptr<c10d::Backend> nccl_group([[maybe_unused]] const c10::intrusive_ptr<c10d::Store>& store,
                                                    [[maybe_unused]] const LaunchEnvironment& env,
                                                    [[maybe_unused]] std::chrono::milliseconds timeout) {
#ifdef DELTATUNE_WITH_NCCL
  c10::cuda::set_device(c10::DeviceIndex(env.local_rank));  // one GPU per rank of this machine
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, int(env.rank), int(env.world_size), options);
#else
  throw OptionError("DistributedOptions: a CUDA device needs NCCL, and this program was built without it; build "
                    "with -DDELTATUNE_WITH_NCCL and nccl.h (CMake: deltatune::distributed where nccl.h is found)");
#endif
}

}  // namespace detail

// Joins the launch `env` describes; returns once every rank has joined (or throws a
// DistributedError after the timeout, naming the address).
inline std::shared_ptr<DataParallel> start_data_parallel(const LaunchEnvironment& env,
                                                         const DistributedOptions& options = {}) {
  detail::check<OptionError>(options.timeout_seconds() > 0 && options.timeout_seconds() <= 86400,
                             "DistributedOptions: timeout_seconds is {}; give a number of seconds in (0, 86400]",
                             options.timeout_seconds());
  detail::check<OptionError>(options.bucket_mib() > 0, "DistributedOptions: bucket_mib is {}; give a positive size",
                             options.bucket_mib());
  const auto timeout = std::chrono::milliseconds(int64_t(options.timeout_seconds() * 1000));
  try {
    c10d::TCPStoreOptions store_options;
    store_options.port = uint16_t(env.master_port);
    store_options.isServer = env.rank == 0;
    store_options.numWorkers = size_t(env.world_size);
    store_options.waitWorkers = true;
    store_options.timeout = timeout;
    c10::intrusive_ptr<c10d::Store> store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, store_options);
    auto group = options.device().is_cuda() ? detail::nccl_group(store, env, timeout) : detail::gloo_group(store, env, timeout);
    const auto device = options.device().is_cuda() ? torch::Device(torch::kCUDA, c10::DeviceIndex(env.local_rank))
                                                   : torch::Device(torch::kCPU);
    return std::make_shared<DataParallel>(group, store, timeout, int64_t(options.bucket_mib() * (1 << 20)), device);
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    std::string reason = e.what();
    throw DistributedError(fmt::format("rank {} of {}: could not join the process group at {}:{} within {} s: {}. Start "
                                       "every rank (tools/launch -n {}), with the same MASTER_ADDR and MASTER_PORT",
                                       env.rank, env.world_size, env.master_addr, env.master_port,
                                       options.timeout_seconds(), reason.substr(0, reason.find('\n')), env.world_size));
  }
}

}  // namespace deltatune
