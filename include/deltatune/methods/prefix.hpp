// Prefix tuning (Li & Liang 2021): P trained keys and values prepended in the attention
// layers it is attached to. DeltaModel::add's default is peft's: the decoder's self-attention
// on T5, every self-attention on BERT; a pattern puts it in every attention (the paper's
// encoder-decoder setup), encoder and cross-attention included.
//
// While training, the table is reparameterised as peft's PrefixEncoder does: an embedding
// E (P, d) through Linear(d, hidden) -> tanh -> Linear(hidden, L * 2 * inner), L the number
// of attention sites; eject() then computes it once and keeps plain parameters, which is
// all inference needs. Site i's key is column block 2i, its value block 2i + 1 (peft's
// past_key_values layout). Not an identity at init: attention gives the prefix columns
// weight however small their keys, so every output moves (none of peft's inits is one).
//
// Masks grow by P (the site prepends ones). T5's relative position bias: a site should
// treat the P prefix columns as the earliest key positions, queries at P .. P + T - 1, which
// is what transformers' T5 computes when peft hands the prefix over as past_key_values.
#pragma once

#include <torch/torch.h>

#include <string>
#include <vector>

#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/recipe.hpp>

namespace deltatune {

struct PrefixTuningOptions {
  // d_model 0 and no sites: DeltaModel takes them (and inner) from the attention sites.
  explicit PrefixTuningOptions(int64_t num_virtual_tokens, int64_t d_model = 0, std::vector<std::string> sites = {})
      : num_virtual_tokens_(num_virtual_tokens), d_model_(d_model), sites_(std::move(sites)) {}
  TORCH_ARG(int64_t, num_virtual_tokens);      // P; the paper uses 10 to 200
  TORCH_ARG(int64_t, d_model);                 // width of the embedding E that the MLP reads
  TORCH_ARG(std::vector<std::string>, sites);  // attention sites' module paths, in layer order
  TORCH_ARG(int64_t, inner) = 0;               // keys' width, heads x d_kv; 0: d_model
  TORCH_ARG(bool, prefix_projection) = true;   // train through the MLP (the paper), or the table directly
  TORCH_ARG(int64_t, hidden) = 512;            // the MLP's hidden width (the paper, peft's encoder_hidden_size)
};

class PrefixTuningImpl : public torch::nn::Cloneable<PrefixTuningImpl>, public InputDelta {
 public:
  explicit PrefixTuningImpl(PrefixTuningOptions options) : options(std::move(options)) { reset(); }

  int64_t inner() const { return options.inner() > 0 ? options.inner() : options.d_model(); }

  void reset() override {
    const auto& o = options;
    detail::check<OptionError>(o.num_virtual_tokens() > 0, "PrefixTuning: option num_virtual_tokens must be positive, got {}",
                               o.num_virtual_tokens());
    detail::check<OptionError>(o.d_model() > 0 && o.hidden() > 0 && o.inner() >= 0,
                               "PrefixTuning: options d_model = {}, hidden = {} must be positive, inner = {} not negative",
                               o.d_model(), o.hidden(), o.inner());
    detail::check<OptionError>(!o.sites().empty(), "PrefixTuning: option sites is empty; name the attention sites");
    const int64_t P = o.num_virtual_tokens(), out = int64_t(o.sites().size()) * 2 * inner();
    const double table = double(P) * double(out),
                 mlp = double(P) * double(o.d_model()) + double(o.hidden()) * double(o.d_model() + out);
    detail::check_parameters_fit(o.prefix_projection() ? mlp : table,
                                 fmt::format("PrefixTuning: {} positions over {} sites", P, o.sites().size()));
    if (!o.prefix_projection()) {
      embedding = register_parameter("embedding", torch::randn({P, out}));  // nn.Embedding's N(0, 1)
      return;
    }
    embedding = register_parameter("embedding", torch::randn({P, o.d_model()}));
    transform = register_module("transform", torch::nn::Sequential(torch::nn::Linear(o.d_model(), o.hidden()),
                                                                   torch::nn::Tanh(),
                                                                   torch::nn::Linear(o.hidden(), out)));
  }

  // (P, L * 2 * inner): the keys and values of every site.
  torch::Tensor key_values() { return transform.is_empty() ? embedding : transform->forward(embedding); }

  // Replaces the MLP by the table it computes; training may go on from the table.
  void eject() {
    if (transform.is_empty()) return;
    torch::Tensor table;
    {
      torch::NoGradGuard no_grad;
      table = key_values().clone();
    }
    unregister_module("transform");
    transform = torch::nn::Sequential(nullptr);
    embedding.set_data(table);  // the same parameter, now the table (P, L * 2 * inner)
    options.prefix_projection(false);
  }

  int64_t num_virtual_tokens() const override { return options.num_virtual_tokens(); }
  std::pair<torch::Tensor, torch::Tensor> prefix_key_value(const std::string& site) override {
    const auto& sites = options.sites();
    const auto it = std::find(sites.begin(), sites.end(), site);
    if (it == sites.end()) return {};
    const int64_t i = it - sites.begin();
    auto kv = pass_key_values().view({options.num_virtual_tokens(), int64_t(sites.size()), 2, inner()});  // (P, L, 2, inner)
    return {kv.select(1, i).select(1, 0), kv.select(1, i).select(1, 1)};  // (P, inner) each
  }

  void begin_pass() override {
    if (passes_++ == 0) table_ = torch::Tensor();
  }
  void end_pass() override {
    if (passes_ > 0 && --passes_ == 0) table_ = torch::Tensor();  // the table's graph is not kept between steps
  }

  std::string method() const override { return "prefix_tuning"; }
  nlohmann::json options_json() const override {
    const auto& o = options;
    return {{"num_virtual_tokens", o.num_virtual_tokens()}, {"d_model", o.d_model()}, {"sites", o.sites()},
            {"inner", o.inner()}, {"prefix_projection", o.prefix_projection()}, {"hidden", o.hidden()}};
  }
  torch::nn::Module& module() override { return *this; }

  void pretty_print(std::ostream& stream) const override {
    stream << "deltatune::PrefixTuning(num_virtual_tokens=" << options.num_virtual_tokens()
           << ", sites=" << options.sites().size() << ", inner=" << inner()
           << ", prefix_projection=" << (options.prefix_projection() ? "true" : "false") << ")";
  }

  PrefixTuningOptions options;
  torch::Tensor embedding;  // E (P, d) under the MLP, or the table (P, L * 2 * inner)
  torch::nn::Sequential transform{nullptr};

 private:
  // key_values() once per forward pass, not once per site: the MLP's output holds every
  // site's keys and values. Outside a pass (a direct call) it is computed afresh.
  torch::Tensor pass_key_values() {
    if (passes_ == 0) return key_values();
    if (!table_.defined()) table_ = key_values();
    return table_;
  }

  torch::Tensor table_;  // this pass's key_values()
  int64_t passes_ = 0;   // the ForwardPass scopes open around this prefix
};
TORCH_MODULE(PrefixTuning);

// d_model, sites and inner are absent from a recipe's options (DeltaModel takes them from the backbone).
inline PrefixTuningOptions prefix_tuning_options_from_json(const JsonFields& j) {
  return PrefixTuningOptions(j.get<int64_t>("num_virtual_tokens"), j.get<int64_t>("d_model", 0),
                             j.get<std::vector<std::string>>("sites", {}))
      .inner(j.get<int64_t>("inner", 0))
      .prefix_projection(j.get<bool>("prefix_projection"))
      .hidden(j.get<int64_t>("hidden"));
}

// Prefix tuning: one table of keys and values for every matched attention site (default:
// those peft's prefix reaches: T5's decoder self-attention, where transformers keeps the
// cache peft builds; BERT's self-attention), through its MLP while training.
class PrefixTuningRecipe : public RecipeBase<PrefixTuningOptions> {
 public:
  explicit PrefixTuningRecipe(PrefixTuningOptions options)
      : RecipeBase(std::move(options), Site::Kind::attention,
                   {{"t5", "re:(.*\\.)?decoder\\.block\\.\\d+\\.layer\\.0\\.SelfAttention"},
                    {"bert", "re:(.*\\.)?encoder\\.layer\\.\\d+\\.attention\\.self"}}) {}
  std::string method() const override { return "prefix_tuning"; }
  // As the prefix is now: after eject() it holds the table, with no MLP.
  nlohmann::json options_json() const override {
    const auto& o = prefix_ ? prefix_->options : options;
    return {{"num_virtual_tokens", o.num_virtual_tokens()}, {"prefix_projection", o.prefix_projection()},
            {"hidden", o.hidden()}};
  }
  void prepare(const std::vector<const Site*>& sites, const std::string& /*model_type*/) override {
    std::vector<std::string> names;
    for (const auto* site : sites) names.push_back(site->name);
    const auto* first = sites.front()->attention;
    prefix_ = PrefixTuning(PrefixTuningOptions(options).d_model(first->hidden_features).inner(first->key_value_features)
                               .sites(names));
  }
  std::shared_ptr<DeltaModule> make(const Site&) override { return prefix_.ptr(); }

 private:
  PrefixTuning prefix_{nullptr};
};

inline std::shared_ptr<DeltaRecipe> make_recipe(const PrefixTuningOptions& o) {
  return std::make_shared<PrefixTuningRecipe>(o);
}

// The method table's row: 30 prefix positions through the MLP; the prefix paper's 5e-4 on
// either backbone. P-tuning v2's 1e-2 for BERT-sized models trains the table directly: through
// the MLP it left MiniLM's SST-2 loss at ln 2 for a whole 10-epoch run, here and in peft alike,
// where 5e-4 learns on both sides (the README's learning-rate table, tools/lr_sweep).
inline MethodInfo prefix_tuning_method_info() {
  return {{"prefix_tuning"},
          [](const JsonFields& j) { return make_recipe(prefix_tuning_options_from_json(j)); },
          {{"prefix", "prefix tuning, 30 positions through the MLP, at peft's sites", {{"t5", 5e-4}, {"bert", 5e-4}},
            [](const PresetSizes& s) { return make_recipe(PrefixTuningOptions(s.virtual_tokens > 0 ? s.virtual_tokens : 30)); }}}};
}

}  // namespace deltatune
