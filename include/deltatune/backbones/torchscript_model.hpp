// TorchScriptModel: any traced or scripted model as a backbone that DeltaModel attaches
// deltas to, with the same recipes and name patterns as the native backbones.
//
// It mirrors the archive's module tree as torch::nn::Modules holding the archive's own
// tensors, so that DeltaModel's sites, freezing, summary, merge, save and load work
// unchanged. Weight sites are modules whose forward reads self.weight into aten::linear
// (Linear-like), and norms with a 1-D weight and no bias (T5's RMS norm, where BitFit adds
// one); before each forward their `weight` (and `bias`) attributes are rebound to W0 + dW,
// so autograd reaches the delta, and put back after. Output sites are sublayers whose
// forward ends in a residual `aten::add(h, residual)`, optionally followed by a child norm
// (BERT's BertSelfOutput / BertOutput, T5's T5Layer*): when activation deltas run there,
// that end of the graph is replaced by the op deltatune::finish_sublayer, which calls
// OutputSite::finish as the native backbones do. Leaves out prompt and prefix sites (a
// traced graph has no place for extra positions) and frozen archives (torch.jit.freeze
// folds the weights into constants).
#pragma once

#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/ir/constants.h>
#include <torch/csrc/jit/ir/ir.h>
#include <torch/library.h>
#include <torch/script.h>
#include <torch/torch.h>

#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include <deltatune/backbones/checkpoint.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/link_order.hpp>
#include <deltatune/core/site.hpp>

namespace deltatune::detail {

namespace jit = torch::jit;

// A module's forward graph, or null where it has none (containers, unused modules).
inline std::shared_ptr<jit::Graph> forward_graph(const jit::Module& module) {
  auto method = module.find_method("forward");
  return method ? method->graph() : nullptr;
}

// The prim::GetAttr[name](self) node in a module's graph, or null.
inline jit::Node* self_attribute(jit::Graph& graph, const std::string& name) {
  for (auto* node : graph.nodes())
    if (node->kind() == c10::prim::GetAttr && node->s(c10::attr::name) == name && node->input() == graph.inputs()[0])
      return node;
  return nullptr;
}

// The one node that uses self.weight, if the module is a weight site: aten::linear with it
// as the weight (Linear-like), or anything for a 1-D weight without a bias (an RMS norm).
inline jit::Node* weight_user(const jit::Module& module) {
  if (!module.hasattr("weight") || !module.attr("weight").isTensor()) return nullptr;
  const auto weight = module.attr("weight").toTensor();
  const bool has_bias = module.hasattr("bias") && module.attr("bias").isTensor();
  auto graph = forward_graph(module);
  auto* read = graph ? self_attribute(*graph, "weight") : nullptr;
  if (read == nullptr || read->output()->uses().size() != 1) return nullptr;
  auto* user = read->output()->uses()[0].user;
  if (weight.dim() == 2 && user->kind() == c10::aten::linear && user->input(1) == read->output()) return user;
  if (weight.dim() == 1 && !has_bias) return user;
  return nullptr;
}

// The end of a sublayer: `aten::add(h, residual)` (either order, alpha 1) where h comes from
// a submodule call (the body, its dropout) and the residual from elsewhere, returned as it
// is or through one child's call (the norm of a post-norm sublayer).
struct SublayerEnd {
  jit::Node* add = nullptr;
  jit::Value* hidden = nullptr;
  jit::Value* residual = nullptr;
  jit::Node* norm_call = nullptr;  // the child call on h + residual, or null
  std::string norm_child;          // that child's attribute name
};

inline bool returned(jit::Graph& graph, jit::Value* value) {
  auto* out = graph.outputs().at(0);
  if (out == value) return true;
  if (out->node()->kind() != c10::prim::TupleConstruct) return false;
  for (auto* v : out->node()->inputs())
    if (v == value) return true;
  return false;
}

inline std::optional<SublayerEnd> find_sublayer_end(jit::Graph& graph) {
  auto from_call = [](jit::Value* v) { return v->node()->kind() == c10::prim::CallMethod; };
  for (auto* node : graph.nodes()) {
    if (node->kind() != c10::aten::add || node->inputs().size() != 3) continue;
    const auto alpha = jit::toIValue(node->input(2));
    if (!alpha || !alpha->isInt() || alpha->toInt() != 1) continue;
    auto *a = node->input(0), *b = node->input(1);
    if (from_call(a) == from_call(b)) continue;
    SublayerEnd end{node, from_call(a) ? a : b, from_call(a) ? b : a, /*norm_call=*/nullptr, /*norm_child=*/""};
    if (returned(graph, node->output())) return end;
    const auto& uses = node->output()->uses();
    if (uses.size() != 1 || uses[0].user->kind() != c10::prim::CallMethod || uses[0].offset != 1) continue;
    auto* call = uses[0].user;
    auto* callee = call->input(0)->node();
    if (call->inputs().size() != 2 || !returned(graph, call->output()) || callee->kind() != c10::prim::GetAttr ||
        callee->input() != graph.inputs()[0])
      continue;
    end.norm_call = call;
    end.norm_child = callee->s(c10::attr::name);
    return end;
  }
  return std::nullopt;
}

// The width d of a sublayer's output: its first child with a 1-D weight (its norm).
inline int64_t sublayer_width(const jit::Module& module) {
  for (const auto& child : module.named_children())
    if (child.value.hasattr("weight") && child.value.attr("weight").isTensor() &&
        child.value.attr("weight").toTensor().dim() == 1)
      return child.value.attr("weight").toTensor().size(0);
  return 0;
}

// Registers `target`'s own parameters and buffers (the same tensors) in `proxy`, and a
// proxy for each child: the mirrored tree carries the archive's names and weights.
inline void mirror(torch::nn::Module& proxy, const jit::Module& target);

// A Linear-like module or a bias-less norm of the archive, as a WeightSite. Its weight and
// bias are the archive's tensors; bind() rebinds the archive's attributes to W0 + dW for
// one forward and restore() puts W0 back, so that a merge (in place on W0) lasts.
class ScriptWeightSiteImpl : public torch::nn::Module, public WeightSite {
 public:
  explicit ScriptWeightSiteImpl(jit::Module target) : WeightSite(this), target_(std::move(target)) {
    mirror(*this, target_);
    // named_parameters() returns a dict by value: find() points into it, so it must outlive the lookup.
    const auto parameters = named_parameters(false);
    weight = parameters["weight"];
    if (const auto* b = parameters.find("bias")) bias = *b;
    out_features = weight.size(0);
    in_features = weight.dim() == 2 ? weight.size(1) : weight.size(0);
    graph_has_bias_ = bias.defined();
  }

  // Sets the archive's weight and bias to W0 + sum dW and b0 + sum db of the running
  // deltas. Returns true when it had to give the graph a bias first (BitFit on T5): the
  // caller then rebuilds its plan.
  bool bind() {
    auto w = weight, b = bias;
    for (auto* delta : deltas.running()) {
      w = w + delta->delta_weight(weight);
      if (auto db = delta->delta_bias(weight); db.defined()) b = b.defined() ? b + db : db;
    }
    const bool rewrote = b.defined() && !graph_has_bias_;
    if (rewrote) add_bias_to_graph();
    target_.setattr("weight", w);
    if (b.defined()) target_.setattr("bias", b);
    return rewrote;
  }

  void restore() {
    target_.setattr("weight", weight);
    if (graph_has_bias_) target_.setattr("bias", bias.defined() ? bias : torch::zeros({out_features}, weight.options()));
  }

 private:
  // Gives the forward graph a `bias` attribute: aten::linear's missing bias, or + bias after
  // the norm's product with the weight.
  void add_bias_to_graph() {
    auto* user = weight_user(target_);
    check(user != nullptr && user->outputs().size() == 1, "TorchScriptModel: cannot find where {}'s forward uses "
          "its weight, so a bias cannot be added to it", target_.type()->str());
    target_.register_parameter("bias", torch::zeros({out_features}, weight.options()), /*is_buffer=*/false);
    auto& graph = *user->owningGraph();
    const jit::WithInsertPoint after(user->next());
    auto* bias_value = graph.insertGetAttr(graph.inputs()[0], "bias");
    if (user->kind() == c10::aten::linear && user->input(2)->type()->kind() == c10::TypeKind::NoneType) {
      user->moveAfter(bias_value->node());
      user->replaceInput(2, bias_value);
    } else {
      auto* y = user->output();
      auto* sum = graph.insert(c10::aten::add, {y, bias_value});
      y->replaceAllUsesWith(sum);
      sum->node()->replaceInput(0, y);
    }
    graph_has_bias_ = true;
  }

  jit::Module target_;
  bool graph_has_bias_ = false;
};
TORCH_MODULE(ScriptWeightSite);

class ScriptOutputSiteImpl;

// Output sites by id, for the op deltatune::finish_sublayer that the rewritten graphs call.
struct ScriptSiteRegistry {
  std::mutex mutex;
  std::map<int64_t, ScriptOutputSiteImpl*> sites;
  int64_t next_id = 0;

  static ScriptSiteRegistry& get() {
    static ScriptSiteRegistry registry;
    return registry;
  }
};

inline void register_finish_sublayer_op();

// A sublayer of the archive whose output activation deltas act on, as an OutputSite. The
// first forward with a delta running replaces the graph's residual add (and norm call) by
// deltatune::finish_sublayer(h, residual, id), which runs OutputSite::finish: the deltas,
// then the archive's own residual add and norm.
class ScriptOutputSiteImpl : public torch::nn::Module, public OutputSite {
 public:
  explicit ScriptOutputSiteImpl(jit::Module target) : target_(std::move(target)) {
    mirror(*this, target_);
    output_features = sublayer_width(target_);
    const auto end = find_sublayer_end(*forward_graph(target_));
    if (!end->norm_child.empty()) norm_ = target_.attr(end->norm_child).toModule();
    auto& registry = ScriptSiteRegistry::get();
    const std::lock_guard<std::mutex> lock(registry.mutex);
    id_ = registry.next_id++;
    registry.sites[id_] = this;
  }
  ~ScriptOutputSiteImpl() override {
    auto& registry = ScriptSiteRegistry::get();
    const std::lock_guard<std::mutex> lock(registry.mutex);
    registry.sites.erase(id_);
  }

  // Rewrites the graph once, the first time a delta runs here; true when it did.
  bool prepare() {
    if (rewritten_ || output_deltas.running().empty()) return false;
    register_finish_sublayer_op();
    auto graph = forward_graph(target_);
    const auto end = *find_sublayer_end(*graph);
    auto* last = end.norm_call ? end.norm_call : end.add;
    const jit::WithInsertPoint before(last);
    auto* out = graph->insert(c10::Symbol::fromQualString("deltatune::finish_sublayer"),
                              {end.hidden, end.residual, graph->insertConstant(id_)});
    last->output()->replaceAllUsesWith(out);
    if (end.norm_call) end.norm_call->destroy();
    end.add->destroy();
    rewritten_ = true;
    return true;
  }

  // (B, T, d) h and residual -> the sublayer's output, deltas included.
  torch::Tensor finish_sublayer(const torch::Tensor& hidden, const torch::Tensor& residual) {
    LayerNormFn norm;
    if (norm_) norm = [this](const torch::Tensor& x) { return norm_->forward({x}).toTensor(); };
    return finish(hidden, residual, norm);
  }

 private:
  jit::Module target_;
  std::optional<jit::Module> norm_;
  int64_t id_ = 0;
  bool rewritten_ = false;
};
TORCH_MODULE(ScriptOutputSite);

inline torch::Tensor finish_sublayer_kernel(const torch::Tensor& hidden, const torch::Tensor& residual, int64_t id) {
  ScriptOutputSiteImpl* site = nullptr;
  {
    auto& registry = ScriptSiteRegistry::get();
    const std::lock_guard<std::mutex> lock(registry.mutex);
    auto it = registry.sites.find(id);
    if (it != registry.sites.end()) site = it->second;
  }
  check(site != nullptr, "deltatune::finish_sublayer: site {} is gone; the TorchScriptModel that rewrote this graph "
        "was destroyed, so run the model through a live one", id);
  return site->finish_sublayer(hidden, residual);
}

// Registered at run time, once, so that including the header defines nothing static. The
// kernel has no dispatch key (CompositeImplicitAutograd): autograd records the ops it runs.
// The library is never destroyed: the dispatcher may outlive any static here.
inline void register_finish_sublayer_op() {
  static const torch::Library* library = [] {
    auto* lib = new torch::Library(torch::Library::FRAGMENT, "deltatune", std::nullopt, __FILE__, __LINE__);
    lib->def("finish_sublayer(Tensor hidden, Tensor residual, int site) -> Tensor", &finish_sublayer_kernel);
    return lib;
  }();
  (void)library;
}

// Which proxy a module of the archive gets: a weight site, an output site, or a plain mirror.
inline std::shared_ptr<torch::nn::Module> make_script_proxy(const jit::Module& target) {
  if (weight_user(target) != nullptr) return ScriptWeightSite(target).ptr();
  if (auto graph = forward_graph(target); graph && find_sublayer_end(*graph) && sublayer_width(target) > 0)
    return ScriptOutputSite(target).ptr();
  auto proxy = std::make_shared<torch::nn::Module>(target.type()->name() ? target.type()->name()->name() : "Module");
  mirror(*proxy, target);
  return proxy;
}

inline void mirror(torch::nn::Module& proxy, const jit::Module& target) {
  for (const auto& p : target.named_parameters(/*recurse=*/false))
    proxy.register_parameter(p.name, p.value, p.value.requires_grad());
  for (const auto& b : target.named_buffers(/*recurse=*/false)) proxy.register_buffer(b.name, b.value);
  for (const auto& child : target.named_children()) proxy.register_module(child.name, make_script_proxy(child.value));
}

}  // namespace deltatune::detail

namespace deltatune::backbones {

// A traced or scripted model as a frozen backbone: sites under the archive's module paths
// ("bert.encoder.layer.0.attention.self.query", "model.encoder.block.0.layer.0.SelfAttention.q"),
// forward through the archive's own graph with the attached deltas.
//   auto model = deltatune::backbones::load_torchscript_model("model.pt");
//   deltatune::DeltaModel deltas(model);
//   deltas.add("sst2", deltatune::LoRAOptions().r(8), "query|value");
//   auto logits = model->forward({ids, mask, types}).toTuple()->elements()[0].toTensor();
class TorchScriptModelImpl : public torch::nn::Module, public ReportsModelType {
 public:
  // The model_type of the first transformers class in the archive's module tree, from its
  // type's qualified name ("__torch__.transformers.models.bert.modeling_bert.BertModel":
  // "bert"), so that a wrapper traced around a transformers model reports it; "" for any
  // other model.
  std::string model_type() const override {
    static const std::regex hf_class(R"(\btransformers\.models\.(\w+)\.modeling_)");
    for (const auto& m : module_.modules()) {
      const auto& type = m.type()->name();
      std::smatch match;
      const auto name = type ? type->qualifiedName() : std::string();
      if (std::regex_search(name, match, hf_class)) return match[1] == "mt5" ? "t5" : match[1].str();
    }
    return "";
  }

  // Shares `module`'s tensors (a merge changes them) but not its graphs: deltas rewrite a clone.
  explicit TorchScriptModelImpl(const torch::jit::Module& module) : module_(module.clone(/*inplace=*/true)) {
    detail::check_link_order();
    detail::mirror(*this, module_);
    freeze(*this);
    for (const auto& item : named_modules("", /*include_self=*/false)) {
      if (auto site = std::dynamic_pointer_cast<detail::ScriptWeightSiteImpl>(item.value())) weight_sites_.push_back(site);
      if (auto site = std::dynamic_pointer_cast<detail::ScriptOutputSiteImpl>(item.value())) output_sites_.push_back(site);
    }
  }

  // The archive's forward on `inputs`, with every running delta: weights rebound for this
  // call, sublayer ends rewritten the first time an activation delta runs there.
  torch::IValue forward(std::vector<torch::IValue> inputs) {
    bool rewrote = false;
    for (auto& site : output_sites_) rewrote |= site->prepare();
    const Rebinding rebinding(weight_sites_, rewrote);
    if (rewrote || !plan_) rebuild_plan();
    torch::jit::Stack stack{module_._ivalue()};
    for (auto& input : inputs) stack.push_back(std::move(input));
    plan_->run(stack);
    return stack.front();
  }

  void train(bool on = true) override {
    torch::nn::Module::train(on);
    module_.train(on);
  }

  // The archive as it runs: its attributes hold W0 between forward passes.
  const torch::jit::Module& module() const { return module_; }

 private:
  // Binds every weight site for one forward, and restores them however it ends.
  class Rebinding {
   public:
    Rebinding(std::vector<std::shared_ptr<detail::ScriptWeightSiteImpl>>& sites, bool& rewrote) : sites_(sites) {
      for (auto& site : sites_) rewrote |= site->bind();
    }
    ~Rebinding() {
      for (auto& site : sites_) site->restore();
    }

   private:
    std::vector<std::shared_ptr<detail::ScriptWeightSiteImpl>>& sites_;
  };

  // A fresh function over the forward graph: its executor inlines the submodules' graphs as
  // they are now, so rewritten graphs take effect (an archive's own executor keeps its first plan).
  void rebuild_plan() {
    for (const auto& m : module_.modules())
      for (const auto& method : m.get_methods()) torch::jit::toGraphFunction(method.function()).clear_optimized_graphs();
    plan_ = std::make_unique<torch::jit::GraphFunction>(c10::QualifiedName(std::string("deltatune_forward")), module_.get_method("forward").graph(),
                                                        nullptr);
  }

  torch::jit::Module module_;
  std::vector<std::shared_ptr<detail::ScriptWeightSiteImpl>> weight_sites_;
  std::vector<std::shared_ptr<detail::ScriptOutputSiteImpl>> output_sites_;
  std::unique_ptr<torch::jit::GraphFunction> plan_;
};
TORCH_MODULE(TorchScriptModel);

// A TorchScript archive (torch.jit.trace or torch.jit.script, then torch.jit.save) as a
// TorchScriptModel, on the CPU.
inline TorchScriptModel load_torchscript_model(const std::string& path) {
  torch::jit::ExtraFilesMap no_extra_files;
  return TorchScriptModel(detail::load_script_archive(path, no_extra_files));
}

}  // namespace deltatune::backbones
