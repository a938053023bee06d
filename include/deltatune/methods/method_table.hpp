// deltatune's own methods, one row each (the rows live in the methods' headers): what
// DeltaModel::load rebuilds a saved delta from, and what the examples' --method, the
// benchmarks and tools/glue_table offer. A new method adds one line here.
#pragma once

#include <deltatune/core/method_table.hpp>
#include <deltatune/methods/adapter.hpp>
#include <deltatune/methods/bitfit.hpp>
#include <deltatune/methods/ia3.hpp>
#include <deltatune/methods/lokr.hpp>
#include <deltatune/methods/lora.hpp>
#include <deltatune/methods/prefix.hpp>
#include <deltatune/methods/prompt.hpp>
#include <deltatune/methods/spec.hpp>
#include <deltatune/methods/vera.hpp>

namespace deltatune {

inline const MethodTable& builtin_methods() {
  static const MethodTable table({
      spec_tuning_method_info(),  // "full" first: tools/glue_table runs the presets in this order
      adapter_method_info(),
      lora_method_info(),
      vera_method_info(),
      lokr_method_info(),
      bitfit_method_info(),
      ia3_method_info(),
      prefix_tuning_method_info(),
      prompt_tuning_method_info(),
  });
  return table;
}

// How DeltaModel::load(name, dir) finds this table (see BuiltinMethodsTag).
inline const MethodTable& builtin_methods(BuiltinMethodsTag<MethodTable>) { return builtin_methods(); }

}  // namespace deltatune
