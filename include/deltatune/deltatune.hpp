// deltatune's umbrella header: every public component, one line each.
// Leaves out the CUDA kernels (kernels/kron_sum_cuda.cuh): link deltatune::cuda for those.
#pragma once

#include <deltatune/core/error.hpp>         // Error, ShapeError, OptionError, CheckpointError: what deltatune throws
#include <deltatune/core/format.hpp>        // fmt, as LibTorch ships it, header-only
#include <deltatune/core/safetensors.hpp>   // read_safetensors, write_safetensors (atomic): Hugging Face's format
#include <deltatune/core/delta.hpp>         // DeltaModule and its families: WeightDelta, ActivationDelta, InputDelta
#include <deltatune/core/site.hpp>          // Sites: FrozenLinear, OutputSite, AttentionSite, PromptSite; find_sites
#include <deltatune/kernels/kron_sum.hpp>   // kron_sum, kron_sum_matmul: Kronecker sums with their own backward
#include <deltatune/backbones/checkpoint.hpp>  // read_hf_directory, read_torchscript, load_parameters: backbone weights
#include <deltatune/backbones/t5.hpp>          // T5Model, load_t5: native T5 (v1.0, v1.1 / Flan) with sites under HF names
