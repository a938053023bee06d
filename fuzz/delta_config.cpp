// DeltaModel::load on a folder whose delta_config.json is the input, beside the delta.safetensors
// of a LoRA delta saved from the tiny BERT.
#include "fuzz_support.hpp"
#include "tiny_bert.hpp"

#include <cstdlib>

namespace {

// The corpus: one delta_config.json per method preset. Only a program can write them, since each
// holds the backbone's fingerprint; tools/fuzz runs the target with DELTATUNE_FUZZ_WRITE_SEEDS=<dir>.
void write_seeds(const std::string& out) {
  std::filesystem::create_directories(out);
  const auto scratch = deltatune::fuzz::Scratch::get().path("seed");
  std::filesystem::create_directory(scratch);
  for (const auto& preset : deltatune::fuzz::method_presets()) {
    if (!deltatune::fuzz::save_tiny_bert_delta(preset, scratch)) continue;
    std::filesystem::copy_file(scratch + "/delta_config.json", out + "/" + preset + ".json",
                               std::filesystem::copy_options::overwrite_existing);
    for (const char* file : {"/delta_config.json", "/delta.safetensors"}) std::filesystem::remove(scratch + file);
  }
  std::filesystem::remove(scratch);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  auto& scratch = deltatune::fuzz::Scratch::get();
  if (const char* seeds = std::getenv("DELTATUNE_FUZZ_WRITE_SEEDS")) {
    write_seeds(seeds);
    std::exit(0);
  }
  deltatune::fuzz::save_tiny_bert_delta("lora", scratch.dir());
  std::filesystem::remove(scratch.path("delta_config.json"));
  scratch.adopt("delta.safetensors");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const deltatune::fuzz::InputFile file("delta_config.json", data, size);
  return deltatune::fuzz::expect_refusal_or_success(
      [&] { deltatune::fuzz::load_delta_onto_tiny_bert(deltatune::fuzz::Scratch::get().dir()); });
}
