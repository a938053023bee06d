// TorchScriptModel: any traced or scripted model as a backbone that DeltaModel attaches
// deltas to, with the same recipes and name patterns as the native backbones.
//
// It mirrors the archive's module tree as torch::nn::Modules holding the archive's own
// tensors, so that DeltaModel's sites, freezing, summary, merge, save and load work
// unchanged. Sites compute as the native backbones' do, through ops the graphs are rewritten
// to call the first time a delta is there:
// - Linear-like modules (their forward reads self.weight into aten::linear): that aten::linear
//   becomes deltatune::site_linear, the native FrozenLinear's product with its deltas;
// - norms with a 1-D weight and no bias (T5's RMS norm, where BitFit adds one): before each
//   forward their `weight` (and `bias`) attributes are rebound to W0 + dW, so autograd
//   reaches the delta, and put back after;
// - sublayers whose forward ends in a residual `aten::add(h, residual)`, optionally followed
//   by a child norm (BERT's BertSelfOutput / BertOutput, T5's T5Layer*): that end becomes
//   deltatune::finish_sublayer, which calls OutputSite::finish.
// Weights stored in bf16 or float16 (load_torchscript_model's dtype, set_frozen_dtype) run the
// graph under autocast in that dtype. Leaves out prompt and prefix sites (a traced graph has
// no place for extra positions) and frozen archives (torch.jit.freeze folds the weights into
// constants).
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
#include <deltatune/core/precision.hpp>
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

// Sites by id, for the ops the rewritten graphs call with the id of the site they stand for:
// deltatune::site_linear (a Linear's product) and deltatune::finish_sublayer (a sublayer's end).
template <class Site>
class SiteRegistry {
 public:
  static SiteRegistry& get() {
    static SiteRegistry registry;
    return registry;
  }
  int64_t add(Site* site) {
    const std::lock_guard<std::mutex> lock(mutex_);
    sites_[next_id_] = site;
    return next_id_++;
  }
  void remove(int64_t id) {
    const std::lock_guard<std::mutex> lock(mutex_);
    sites_.erase(id);
  }
  Site& at(int64_t id, const char* op) {
    Site* site = nullptr;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (auto it = sites_.find(id); it != sites_.end()) site = it->second;
    }
    check(site != nullptr, "{}: site {} is gone; the TorchScriptModel that rewrote this graph was destroyed, so run "
          "the model through a live one", op, id);
    return *site;
  }

 private:
  std::mutex mutex_;
  std::map<int64_t, Site*> sites_;
  int64_t next_id_ = 0;
};

// A site's entry in its registry, for as long as the site lives.
template <class Site>
class Registered {
 public:
  explicit Registered(Site* site) : id_(SiteRegistry<Site>::get().add(site)) {}
  ~Registered() { SiteRegistry<Site>::get().remove(id_); }
  Registered(const Registered&) = delete;
  Registered& operator=(const Registered&) = delete;
  int64_t id() const { return id_; }

 private:
  int64_t id_;
};

inline void register_site_ops();

// Inserts op(values..., id) before `last` and hands it the uses of `last`'s output (the
// caller removes the nodes it replaced).
inline void replace_by_site_op(jit::Node* last, const char* op, const std::vector<jit::Value*>& values, int64_t id) {
  register_site_ops();
  auto& graph = *last->owningGraph();
  const jit::WithInsertPoint before(last);
  std::vector<jit::NamedValue> inputs(values.begin(), values.end());
  inputs.emplace_back(graph.insertConstant(id));
  last->output()->replaceAllUsesWith(graph.insert(c10::Symbol::fromQualString(op), inputs));
}

// A Linear-like module of the archive (its forward feeds self.weight to aten::linear) as a
// WeightSite that computes as the native FrozenLinear: the first forward after a delta is
// attached replaces that aten::linear by deltatune::site_linear(x, id), which calls
// linear_with_deltas (the frozen product, then each delta's own, LoRA's x A^T B^T included).
// Its weight and bias are the archive's tensors, so a merge (in place) changes what both read.
class ScriptLinearSiteImpl : public torch::nn::Module, public WeightSite {
 public:
  explicit ScriptLinearSiteImpl(jit::Module target) : WeightSite(this), target_(std::move(target)), registered_(this) {
    mirror(*this, target_);
    // named_parameters() returns a dict by value: find() points into it, so it must outlive the lookup.
    const auto parameters = named_parameters(false);
    weight = parameters["weight"];
    if (const auto* b = parameters.find("bias")) bias = *b;
    out_features = weight.size(0);
    in_features = weight.size(1);
  }

  // Rewrites the graph once, when a delta is attached (running or merged: a merged BitFit
  // bias on a Linear without one exists only here); true when it did.
  bool prepare() {
    if (rewritten_ || deltas.slots().empty()) return false;
    auto* linear = weight_user(target_);
    std::vector<jit::Node*> reads{linear->input(1)->node(), linear->input(2)->node()};
    replace_by_site_op(linear, "deltatune::site_linear", {linear->input(0)}, registered_.id());
    linear->destroy();
    for (auto* read : reads)
      if (read->kind() == c10::prim::GetAttr && !read->hasUses()) read->destroy();
    rewritten_ = true;
    return true;
  }

  // deltatune::site_linear's kernel. Under autocast (the archive's graphs run under it where
  // its weights are half precision) x takes autocast's dtype, as aten::linear would, and the
  // site computes as on a native half-precision backbone, autocast off.
  torch::Tensor linear(torch::Tensor x) {
    const auto device = x.device().type();
    if (at::autocast::is_autocast_enabled(device) && x.is_floating_point())
      x = x.to(at::autocast::get_autocast_dtype(device));
    const AutocastOff off;
    return linear_with_deltas(x);
  }

 private:
  jit::Module target_;
  Registered<ScriptLinearSiteImpl> registered_;
  bool rewritten_ = false;
};
TORCH_MODULE(ScriptLinearSite);

// A bias-less norm of the archive (a 1-D weight, T5's RMS norm), as a WeightSite: bind()
// rebinds its `weight` (and `bias`) attributes to W0 + dW for one forward and restore() puts
// W0 back, so that a merge (in place on W0) lasts.
class ScriptNormSiteImpl : public torch::nn::Module, public WeightSite {
 public:
  explicit ScriptNormSiteImpl(jit::Module target) : WeightSite(this), target_(std::move(target)) {
    mirror(*this, target_);
    const auto parameters = named_parameters(false);
    weight = parameters["weight"];
    out_features = in_features = weight.size(0);
  }

  // Refuses a mixed batch that routes rows to a delta here: the rebound weight is the whole
  // batch's.
  void check_unrouted() {
    const auto* routing = deltas.routing();
    if (routing == nullptr) return;
    for (const auto& slot : deltas.slots())
      check<OptionError>(!slot.active || slot.merged || routing->rows.count(slot.name) == 0, "TorchScriptModel: rows "
                         "cannot be routed to delta '{}' at a norm of the archive ({}), whose weight is rebound for "
                         "the whole batch; route deltas on Linear layers and sublayers only", slot.name,
                         target_.type()->str());
  }

  // Sets the archive's weight and bias to W0 + sum dW and sum db of the running deltas.
  // Returns true when it had to give the graph a bias first (BitFit on T5): the caller then
  // rebuilds its plan.
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
  // Gives the forward graph a `bias` attribute, added after the norm's product with the weight.
  void add_bias_to_graph() {
    auto* user = weight_user(target_);
    check(user != nullptr && user->outputs().size() == 1, "TorchScriptModel: cannot find where {}'s forward uses "
          "its weight, so a bias cannot be added to it", target_.type()->str());
    target_.register_parameter("bias", torch::zeros({out_features}, weight.options()), /*is_buffer=*/false);
    auto& graph = *user->owningGraph();
    const jit::WithInsertPoint after(user->next());
    auto* bias_value = graph.insertGetAttr(graph.inputs()[0], "bias");
    auto* y = user->output();
    auto* sum = graph.insert(c10::aten::add, {y, bias_value});
    y->replaceAllUsesWith(sum);
    sum->node()->replaceInput(0, y);
    graph_has_bias_ = true;
  }

  jit::Module target_;
  bool graph_has_bias_ = false;
};
TORCH_MODULE(ScriptNormSite);

// A sublayer of the archive whose output activation deltas act on, as an OutputSite. The
// first forward with a delta running replaces the graph's residual add (and norm call) by
// deltatune::finish_sublayer(h, residual, id), which runs OutputSite::finish: the deltas,
// then the archive's own residual add and norm.
class ScriptOutputSiteImpl : public torch::nn::Module, public OutputSite {
 public:
  explicit ScriptOutputSiteImpl(jit::Module target) : target_(std::move(target)), registered_(this) {
    mirror(*this, target_);
    output_features = sublayer_width(target_);
    const auto end = find_sublayer_end(*forward_graph(target_));
    if (!end->norm_child.empty()) norm_ = target_.attr(end->norm_child).toModule();
  }

  // Rewrites the graph once, the first time a delta runs here; true when it did.
  bool prepare() {
    if (rewritten_ || output_deltas.running().empty()) return false;
    const auto end = *find_sublayer_end(*forward_graph(target_));
    replace_by_site_op(end.norm_call ? end.norm_call : end.add, "deltatune::finish_sublayer", {end.hidden, end.residual},
                       registered_.id());
    if (end.norm_call) end.norm_call->destroy();
    end.add->destroy();
    rewritten_ = true;
    return true;
  }

  // deltatune::finish_sublayer's kernel: (B, T, d) h and residual -> the sublayer's output,
  // deltas included, computed as on a native backbone (autocast off).
  torch::Tensor finish_sublayer(const torch::Tensor& hidden, const torch::Tensor& residual) {
    const AutocastOff off;
    LayerNormFn norm;
    if (norm_) norm = [this](const torch::Tensor& x) { return norm_->forward({x}).toTensor(); };
    return finish(hidden, residual, norm);
  }

 private:
  jit::Module target_;
  std::optional<jit::Module> norm_;
  Registered<ScriptOutputSiteImpl> registered_;
  bool rewritten_ = false;
};
TORCH_MODULE(ScriptOutputSite);

// Registered at run time, once, so that including the header defines nothing static. The
// kernels have no dispatch key (CompositeImplicitAutograd): autograd records the ops they run.
// The library is never destroyed: the dispatcher may outlive any static here.
inline void register_site_ops() {
  static const torch::Library* library = [] {
    auto* lib = new torch::Library(torch::Library::FRAGMENT, "deltatune", std::nullopt, __FILE__, __LINE__);
    lib->def("site_linear(Tensor x, int site) -> Tensor", [](const torch::Tensor& x, int64_t id) {
      return SiteRegistry<ScriptLinearSiteImpl>::get().at(id, "deltatune::site_linear").linear(x);
    });
    lib->def("finish_sublayer(Tensor hidden, Tensor residual, int site) -> Tensor",
             [](const torch::Tensor& hidden, const torch::Tensor& residual, int64_t id) {
               return SiteRegistry<ScriptOutputSiteImpl>::get().at(id, "deltatune::finish_sublayer")
                   .finish_sublayer(hidden, residual);
             });
    return lib;
  }();
  (void)library;
}

// Which proxy a module of the archive gets: a weight site, an output site, or a plain mirror.
inline std::shared_ptr<torch::nn::Module> make_script_proxy(const jit::Module& target) {
  if (auto* user = weight_user(target)) {
    if (user->kind() == c10::aten::linear) return ScriptLinearSite(target).ptr();
    return ScriptNormSite(target).ptr();
  }
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
      if (auto site = std::dynamic_pointer_cast<detail::ScriptLinearSiteImpl>(item.value())) linear_sites_.push_back(site);
      if (auto site = std::dynamic_pointer_cast<detail::ScriptNormSiteImpl>(item.value())) norm_sites_.push_back(site);
      if (auto site = std::dynamic_pointer_cast<detail::ScriptOutputSiteImpl>(item.value())) output_sites_.push_back(site);
    }
  }

  // The archive's forward on `inputs`, with every running delta: Linear products and
  // sublayer ends rewritten the first time a delta is there, norms' weights rebound for this
  // call. Frozen weights in half precision (set_frozen_dtype) run the graph as torch.autocast
  // in that dtype runs a model (products in it, what autocast keeps in float32 there), the
  // sites as on a native half-precision backbone.
  torch::IValue forward(std::vector<torch::IValue> inputs) {
    bool rewrote = false;
    for (auto& site : linear_sites_) rewrote |= site->prepare();
    for (auto& site : output_sites_) rewrote |= site->prepare();
    for (auto& site : norm_sites_) site->check_unrouted();
    const Rebinding rebinding(norm_sites_, rewrote);
    if (rewrote || !plan_) rebuild_plan();
    std::optional<AutocastGuard> autocast;
    if (const auto dtype = frozen_dtype(*this); is_half(dtype)) autocast.emplace(device_type(), dtype);
    torch::jit::Stack stack{module_._ivalue()};
    for (auto& input : inputs) stack.push_back(std::move(input));
    plan_->run(stack);
    return stack.front();
  }

  void train(bool on = true) override {
    torch::nn::Module::train(on);
    module_.train(on);
  }

  // The archive as it runs: its attributes hold W0 between forward passes; once a delta is
  // attached, its Linear layers call deltatune::site_linear.
  const torch::jit::Module& module() const { return module_; }

 private:
  // Binds every norm site for one forward, and restores them however it ends.
  class Rebinding {
   public:
    Rebinding(std::vector<std::shared_ptr<detail::ScriptNormSiteImpl>>& sites, bool& rewrote) : sites_(sites) {
      for (auto& site : sites_) rewrote |= site->bind();
    }
    ~Rebinding() {
      for (auto& site : sites_) site->restore();
    }

   private:
    std::vector<std::shared_ptr<detail::ScriptNormSiteImpl>>& sites_;
  };

  c10::DeviceType device_type() {
    const auto parameters = this->parameters();
    return parameters.empty() ? c10::kCPU : parameters.front().device().type();
  }

  // A fresh function over the forward graph: its executor inlines the submodules' graphs as
  // they are now, so rewritten graphs take effect (an archive's own executor keeps its first plan).
  void rebuild_plan() {
    for (const auto& m : module_.modules())
      for (const auto& method : m.get_methods()) torch::jit::toGraphFunction(method.function()).clear_optimized_graphs();
    plan_ = std::make_unique<torch::jit::GraphFunction>(c10::QualifiedName(std::string("deltatune_forward")), module_.get_method("forward").graph(),
                                                        nullptr);
  }

  torch::jit::Module module_;
  std::vector<std::shared_ptr<detail::ScriptLinearSiteImpl>> linear_sites_;
  std::vector<std::shared_ptr<detail::ScriptNormSiteImpl>> norm_sites_;
  std::vector<std::shared_ptr<detail::ScriptOutputSiteImpl>> output_sites_;
  std::unique_ptr<torch::jit::GraphFunction> plan_;
};
TORCH_MODULE(TorchScriptModel);

// A TorchScript archive (torch.jit.trace or torch.jit.script, then torch.jit.save) as a
// TorchScriptModel, on the CPU, its weights stored in `dtype` (bf16 or float16: half the
// memory, the archive's products in that precision, the deltas in float32).
inline TorchScriptModel load_torchscript_model(const std::string& path, torch::ScalarType dtype = torch::kFloat) {
  torch::jit::ExtraFilesMap no_extra_files;
  TorchScriptModel model(detail::load_script_archive(path, no_extra_files));
  set_frozen_dtype(*model, dtype);
  return model;
}

}  // namespace deltatune::backbones
