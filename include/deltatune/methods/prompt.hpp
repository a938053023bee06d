// Prompt tuning (Lester et al. 2021): P trained embeddings prepended to the encoder's input.
//
// Initialisation, as the paper's three options plus peft's text: uniform in
// [-init_range, init_range]; rows sampled from the first sample_top_k rows of the
// vocabulary (the paper samples the 5,000 most common tokens, which SentencePiece
// vocabularies order first); or the rows of given token ids (a tokenised text or class
// labels), repeated or cut to P as peft does. Methods know no tokenizer: pass the ids.
// The parameter is "embedding" (peft: prompt_encoder.<name>.embedding.weight).
#pragma once

#include <torch/torch.h>

#include <limits>
#include <string>
#include <vector>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/recipe.hpp>

namespace deltatune {

enum class PromptInit {
  uniform,             // U(-init_range, init_range): the paper's random init
  sampled_vocabulary,  // rows of the vocabulary drawn among the first sample_top_k
  token_ids,           // rows of init_token_ids: a tokenised text, class labels
};

struct PromptTuningOptions {
  // d_model 0: DeltaModel takes it from the prompt site's embedding table.
  explicit PromptTuningOptions(int64_t num_virtual_tokens, int64_t d_model = 0)
      : num_virtual_tokens_(num_virtual_tokens), d_model_(d_model) {}
  TORCH_ARG(int64_t, num_virtual_tokens);   // P; the paper's main runs use 100
  TORCH_ARG(int64_t, d_model);              // embedding width d
  TORCH_ARG(PromptInit, init) = PromptInit::uniform;
  TORCH_ARG(double, init_range) = 0.5;      // uniform bound, as the paper
  TORCH_ARG(int64_t, sample_top_k) = 5000;  // sampled_vocabulary draws among the first k rows
  TORCH_ARG(std::vector<int64_t>, init_token_ids) = {};  // token_ids: the rows to copy
};

namespace detail {

inline const char* to_string(PromptInit init) {
  switch (init) {
    case PromptInit::sampled_vocabulary: return "sampled_vocabulary";
    case PromptInit::token_ids: return "token_ids";
    default: return "uniform";
  }
}

// The P vocabulary rows the options ask for: (V, d) -> (P, d).
inline torch::Tensor prompt_init_rows(const PromptTuningOptions& o, const torch::Tensor& vocabulary) {
  detail::check<OptionError>(vocabulary.defined() && vocabulary.dim() == 2 && vocabulary.size(1) == o.d_model(),
                             "PromptTuning: option init {} needs the (vocabulary, d_model = {}) embedding table; got {}",
                             to_string(o.init()), o.d_model(),
                             vocabulary.defined() ? fmt::format("[{}]", fmt::join(vocabulary.sizes(), ", ")) : "none");
  const int64_t P = o.num_virtual_tokens(), V = vocabulary.size(0);
  torch::Tensor ids;
  if (o.init() == PromptInit::sampled_vocabulary) {
    ids = torch::randint(std::min(V, o.sample_top_k()), {P}, torch::kLong);
  } else {
    const auto& given = o.init_token_ids();
    detail::check<OptionError>(!given.empty(), "PromptTuning: option init_token_ids is empty but init is token_ids");
    for (int64_t id : given)
      detail::check<OptionError>(id >= 0 && id < V, "PromptTuning: option init_token_ids holds {}, outside [0, {})", id, V);
    std::vector<int64_t> repeated;
    for (int64_t i = 0; i < P; ++i) repeated.push_back(given[i % given.size()]);
    ids = torch::tensor(repeated, torch::kLong);
  }
  return vocabulary.detach().index_select(0, ids.to(vocabulary.device())).clone();
}

}  // namespace detail

inline nlohmann::json prompt_tuning_options_json(const PromptTuningOptions& o) {
  return {{"num_virtual_tokens", o.num_virtual_tokens()}, {"d_model", o.d_model()},
          {"init", detail::to_string(o.init())},          {"init_range", o.init_range()},
          {"sample_top_k", o.sample_top_k()},             {"init_token_ids", o.init_token_ids()}};
}

class PromptTuningImpl : public torch::nn::Cloneable<PromptTuningImpl>, public InputDelta {
 public:
  // `vocabulary`: the backbone's (V, d) embedding table; needed unless init is uniform.
  explicit PromptTuningImpl(PromptTuningOptions options, torch::Tensor vocabulary = {})
      : options(std::move(options)), vocabulary_(std::move(vocabulary)) {
    reset();
  }

  void reset() override {
    const auto& o = options;
    detail::check<OptionError>(o.num_virtual_tokens() > 0, "PromptTuning: option num_virtual_tokens must be positive, got {}",
                               o.num_virtual_tokens());
    detail::check<OptionError>(o.d_model() > 0, "PromptTuning: option d_model must be positive, got {}", o.d_model());
    detail::check_parameters_fit(double(o.num_virtual_tokens()) * double(o.d_model()),
                                 fmt::format("PromptTuning: {} prompts of width {}", o.num_virtual_tokens(), o.d_model()));
    if (o.init() == PromptInit::uniform) {
      embedding = register_parameter("embedding", torch::empty({o.num_virtual_tokens(), o.d_model()}));
      torch::NoGradGuard no_grad;
      embedding.uniform_(-o.init_range(), o.init_range());
    } else {
      embedding = register_parameter("embedding", detail::prompt_init_rows(o, vocabulary_).to(torch::kFloat));
    }
  }

  int64_t num_virtual_tokens() const override { return options.num_virtual_tokens(); }
  torch::Tensor prompt_embeddings() override { return embedding; }  // (P, d)

  std::string method() const override { return "prompt_tuning"; }
  nlohmann::json options_json() const override { return prompt_tuning_options_json(options); }
  torch::nn::Module& module() override { return *this; }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::PromptTuning(num_virtual_tokens=" << options.num_virtual_tokens()
           << ", d_model=" << options.d_model() << ", init=" << detail::to_string(options.init()) << ")";
  }

  PromptTuningOptions options;
  torch::Tensor embedding;  // (P, d)

 private:
  torch::Tensor vocabulary_;
};
TORCH_MODULE(PromptTuning);

inline PromptTuningOptions prompt_tuning_options_from_json(const JsonFields& j) {
  const auto init = j.get<std::string>("init");
  j.check(init == "uniform" || init == "sampled_vocabulary" || init == "token_ids", "init",
          "must be uniform, sampled_vocabulary or token_ids");
  return PromptTuningOptions(j.get<int64_t>("num_virtual_tokens"), j.get<int64_t>("d_model"))
      .init(init == "uniform" ? PromptInit::uniform
                              : init == "token_ids" ? PromptInit::token_ids : PromptInit::sampled_vocabulary)
      .init_range(j.get<double>("init_range"))
      .sample_top_k(j.get<int64_t>("sample_top_k"))
      .init_token_ids(j.get<std::vector<int64_t>>("init_token_ids"));
}

// Prompt tuning at the encoder's input (default: T5's encoder, BERT's embeddings); rows
// of the backbone's embedding table seed it where the options ask.
class PromptTuningRecipe : public RecipeBase<PromptTuningOptions> {
 public:
  explicit PromptTuningRecipe(PromptTuningOptions options)
      : RecipeBase(std::move(options), Site::Kind::prompt, {{"t5", "encoder"}, {"bert", "embeddings"}}) {}
  std::string method() const override { return "prompt_tuning"; }
  nlohmann::json options_json() const override { return prompt_tuning_options_json(options); }
  std::shared_ptr<DeltaModule> make(const Site& site) override {
    const auto& table = site.prompt->embedding_table;
    return PromptTuning(PromptTuningOptions(options).d_model(table.size(1)), table).ptr();
  }
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const PromptTuningOptions& o) {
  return std::make_shared<PromptTuningRecipe>(o);
}

// The method table's row: the paper's 100 prompts drawn from the whole vocabulary, its
// learning rate 0.3.
inline MethodInfo prompt_tuning_method_info() {
  return {{"prompt_tuning"},
          [](const JsonFields& j) { return make_recipe(prompt_tuning_options_from_json(j)); },
          {{"prompt", "prompt tuning, prompts from vocabulary rows (the paper: 100)", {{"t5", 3e-1}, {"bert", 3e-1}},
            [](const PresetSizes& s) {
              return make_recipe(PromptTuningOptions(s.virtual_tokens > 0 ? s.virtual_tokens : 100)
                                     .init(PromptInit::sampled_vocabulary)
                                     .sample_top_k(std::numeric_limits<int64_t>::max()));
            }}}};
}

}  // namespace deltatune
