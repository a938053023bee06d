// read_glue_tsv on any bytes; the first byte picks the task (CoLA headerless, the pair tasks,
// STS-B's scores), the rest is the file.
#include "fuzz_support.hpp"

#include <deltatune/train/glue.hpp>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0) return 0;
  const auto& tasks = deltatune::glue_tasks();
  const auto& task = tasks[data[0] % tasks.size()];
  const deltatune::fuzz::InputFile file("dev.tsv", data + 1, size - 1);
  return deltatune::fuzz::expect_refusal_or_success([&] { deltatune::read_glue_tsv(task, file.path()); });
}
