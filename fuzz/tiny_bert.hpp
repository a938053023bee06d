// The backbone the delta, peft and adapters targets load onto: the tiny BERT that
// tools/make_fuzz_corpus.py saves adapters for, so that a valid config's weights fit it.
// Compiled once (tiny_bert.cpp) for the three targets: each would otherwise instantiate the
// DeltaModel and BERT code again, a minute apiece under the sanitizers.
#pragma once

#include <string>
#include <vector>

namespace deltatune::fuzz {

// Each reads the folder onto a fresh tiny BERT, so that no run sees another's deltas; the
// backbone is seeded, so that its fingerprint (DeltaModel::fingerprint) is the same in every process.
void load_delta_onto_tiny_bert(const std::string& dir);     // DeltaModel::load
void load_peft_onto_tiny_bert(const std::string& dir);      // load_peft
void load_adapters_onto_tiny_bert(const std::string& dir);  // load_adapters, onto a BertForSequenceClassification

// builtin_methods()'s preset names, and DeltaModel::save of delta "delta" of one preset, at its
// defaults, into `dir`: false where the preset does not apply to BERT.
std::vector<std::string> method_presets();
bool save_tiny_bert_delta(const std::string& preset, const std::string& dir);

}  // namespace deltatune::fuzz
