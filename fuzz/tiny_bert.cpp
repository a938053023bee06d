#include "tiny_bert.hpp"

#include <torch/torch.h>

#include <deltatune/backbones/bert.hpp>
#include <deltatune/core/delta_model.hpp>
#include <deltatune/formats/adapters.hpp>
#include <deltatune/formats/peft.hpp>
#include <deltatune/methods/method_table.hpp>

namespace deltatune::fuzz {
namespace {

template <class Model = backbones::BertModel>
DeltaModel tiny_bert() {
  torch::manual_seed(0);
  return DeltaModel(Model(backbones::BertConfig().vocab_size(64).hidden_size(16).num_hidden_layers(2)
                              .num_attention_heads(4).intermediate_size(32).max_position_embeddings(32)
                              .type_vocab_size(2)));
}

}  // namespace

void load_delta_onto_tiny_bert(const std::string& dir) { tiny_bert().load("fuzz", dir); }

void load_peft_onto_tiny_bert(const std::string& dir) {
  auto model = tiny_bert();
  load_peft(model, dir);
}

void load_adapters_onto_tiny_bert(const std::string& dir) {
  auto model = tiny_bert<backbones::BertForSequenceClassification>();
  load_adapters(model, dir);
}

std::vector<std::string> method_presets() { return builtin_methods().preset_names(); }

bool save_tiny_bert_delta(const std::string& preset, const std::string& dir) {
  auto model = tiny_bert();
  try {
    model.add("delta", builtin_methods().preset(preset).make({}));
  } catch (const Error&) {
    return false;
  }
  model.save("delta", dir);
  return true;
}

}  // namespace deltatune::fuzz
