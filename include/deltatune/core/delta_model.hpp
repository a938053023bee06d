// DeltaModel: the injector. Attaches named deltas to a frozen backbone's sites by name
// patterns, says what is trained, summarises, activates and deactivates, merges, routes
// the rows of a mixed batch to different deltas, and saves and loads delta-only
// checkpoints. Methods reach it through a DeltaRecipe.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <map>
#include <memory>
#include <regex>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include <deltatune/core/atomic_file.hpp>
#include <deltatune/core/delta.hpp>
#include <deltatune/core/error.hpp>
#include <deltatune/core/json_file.hpp>
#include <deltatune/core/memory.hpp>
#include <deltatune/core/method_table.hpp>
#include <deltatune/core/precision.hpp>
#include <deltatune/core/recipe.hpp>
#include <deltatune/core/safetensors.hpp>
#include <deltatune/core/site.hpp>
#include <deltatune/core/tensor_match.hpp>

namespace deltatune {

namespace detail {

// Levenshtein distance, for "did you mean" lists.
inline size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = up;
    }
  }
  return row[b.size()];
}

// The modules under `deltas` that only hold others (deltas.<name>.encoder.block.0...).
struct DeltaTree : torch::nn::Module {
  DeltaTree() : torch::nn::Module("deltatune::DeltaTree") {}
};

// Registers `module` under `root` at a dotted path, making the DeltaTree nodes on the way.
inline void register_at_path(torch::nn::Module& root, const std::string& path,
                             const std::shared_ptr<torch::nn::Module>& module) {
  torch::nn::Module* node = &root;
  size_t start = 0;
  for (size_t dot; (dot = path.find('.', start)) != std::string::npos; start = dot + 1) {
    const auto key = path.substr(start, dot - start);
    const auto children = node->named_children();
    const auto* child = children.find(key);
    if (child == nullptr) {
      node = node->register_module(key, std::make_shared<DeltaTree>()).get();
      continue;
    }
    node = child->get();
    check(dynamic_cast<DeltaTree*>(node) != nullptr, "cannot register a delta at '{}': '{}' holds a delta already "
          "(sites of one delta must not nest)", path, path.substr(0, dot));
  }
  check(node->named_children().find(path.substr(start)) == nullptr, "cannot register a delta at '{}': the path is "
        "taken (sites of one delta must not nest)", path);
  node->register_module(path.substr(start), module);
}

}  // namespace detail

// How DeltaModel::route runs a mixed batch.
struct RouteOptions {
  // Low-rank deltas (LoRA, PiSSA, OLoRA, VeRA) at a site take their rows together in two batched
  // products, each row's factors gathered, and so do bottleneck adapters (Houlsby, Pfeiffer,
  // PHM-Adapter, Compacter, Compacter++); false: each delta in products of its own, as peft's
  // mixed batch (whose cost grows with the number of deltas; kept for comparison). IA3's
  // scales are one (B, features) scale either way.
  TORCH_ARG(bool, gather) = true;
};

// A frozen backbone and the named deltas attached to it. The deltas are registered in the
// backbone's own module tree, under `deltas.<name>.<site path>` (shared modules under
// `deltas.<name>.<module>`), so that the backbone's to(), train(), eval() and
// named_parameters() reach them; the checkpoint's own names are left as loaded. One
// DeltaModel per backbone at a time: destroying it detaches its deltas.
//   deltatune::DeltaModel model(backbone);
//   model.add("sst2", deltatune::LoRAOptions().r(8), "q|v");
//   auto opt = torch::optim::AdamW(model.trainable_parameters(), 1e-3);
class DeltaModel {
 public:
  // The child of the backbone that holds every delta.
  static constexpr const char* kDeltasModule = "deltas";

  // One attached delta at one site.
  struct Attachment {
    Site site;
    std::shared_ptr<DeltaModule> delta;
  };
  // A named delta: its recipe, its attachments, whether it runs.
  struct Entry {
    std::shared_ptr<DeltaRecipe> recipe;
    std::vector<Attachment> attachments;
    std::vector<std::string> backbone_parameters;  // the backbone parameters it trains, by name
    bool active = true;
    std::shared_ptr<torch::nn::Module> module;     // deltas.<name>: its deltas by site path, its shared modules
  };

  // Freezes every backbone parameter; only deltas (and what they train by definition) learn.
  explicit DeltaModel(std::shared_ptr<torch::nn::Module> backbone) : backbone_(std::move(backbone)) {
    detail::check(backbone_ != nullptr, "DeltaModel needs a backbone, got a null module");
    for (const auto& child : backbone_->named_children())
      detail::check(child.key() != kDeltasModule, "this backbone has a DeltaModel already (its module '{}' holds the "
                    "deltas); add deltas through that one, or destroy it first", kDeltasModule);
    sites_ = find_sites(*backbone_);
    freeze(*backbone_);
    fingerprint_ = compute_fingerprint();
    deltas_ = backbone_->register_module(kDeltasModule, std::make_shared<detail::DeltaTree>());
  }
  template <class ModuleHolder, class = decltype(std::declval<ModuleHolder>().ptr())>
  explicit DeltaModel(const ModuleHolder& backbone) : DeltaModel(std::static_pointer_cast<torch::nn::Module>(backbone.ptr())) {}

  DeltaModel(const DeltaModel&) = delete;
  DeltaModel& operator=(const DeltaModel&) = delete;
  // Movable while no RoutingGuard of it is alive (a guard points to the model it came from).
  DeltaModel(DeltaModel&&) = default;
  DeltaModel& operator=(DeltaModel&&) = delete;

  // Detaches every delta from the backbone. A merged delta stays folded into the weights
  // (peft's merge_and_unload); the backbone parameters the deltas trained keep requires_grad.
  ~DeltaModel() {
    if (!backbone_) return;  // moved from
    for (auto& site : sites_) {
      if (site.kind == Site::Kind::linear) site.linear->release_deltas();
      else for_slots(site, [](auto& slots) { slots.clear(); });
    }
    backbone_->unregister_module(kDeltasModule);
  }

  torch::nn::Module& backbone() { return *backbone_; }
  const std::vector<Site>& sites() const { return sites_; }
  const std::map<std::string, Entry>& deltas() const { return entries_; }

  // Attaches the recipe's deltas under `name` at every site `pattern` matches. A pattern
  // that matches nothing, or only sites the method cannot act on, is an error that lists
  // the closest site names.
  Entry& add(const std::string& name, std::shared_ptr<DeltaRecipe> recipe, const std::string& pattern) {
    check_new_name(name);
    std::vector<const Site*> matched;
    if (recipe->uses_sites()) {
      const SitePattern matcher(pattern);
      std::vector<const Site*> wrong_kind;
      for (const auto& site : sites_) {
        if (!matcher.matches(site.name)) continue;
        (recipe->accepts(site.kind) ? matched : wrong_kind).push_back(&site);
      }
      if (matched.empty()) throw OptionError(no_match_message(*recipe, matcher, wrong_kind));
    }
    return add_at(name, std::move(recipe), matched);
  }

  // Attaches at the method's default sites for this backbone's model_type (LoRA: q and v on
  // T5, query and value on BERT, as peft).
  Entry& add(const std::string& name, std::shared_ptr<DeltaRecipe> recipe) {
    const auto type = model_type();
    const auto pattern = recipe->default_pattern(type);
    detail::check<OptionError>(!pattern.empty(), "{} has no default sites on this backbone (model_type '{}'); pass a "
                               "pattern to add('{}', ..., pattern)", recipe->method(), type, name);
    return add(name, std::move(recipe), pattern);
  }

  // The backbone's Hugging Face model_type ("t5", "bert"), as it reports it (ReportsModelType);
  // "" for a backbone that reports none. Default sites are keyed by it.
  std::string model_type() const { return model_type_of(*backbone_); }

  // add(name, options[, pattern]) with a method's options (LoRAOptions, AdapterOptions,
  // ...): the method's header turns them into its recipe (make_recipe).
  template <class Options, class = decltype(make_recipe(std::declval<const Options&>()))>
  Entry& add(const std::string& name, const Options& options, const std::string& pattern) {
    return add(name, make_recipe(options), pattern);
  }
  template <class Options, class = decltype(make_recipe(std::declval<const Options&>()))>
  Entry& add(const std::string& name, const Options& options) {
    return add(name, make_recipe(options));
  }

  // Detaches and forgets a delta (unmerge it first if merged).
  void remove(const std::string& name) {
    auto& entry = at(name);
    for (auto& a : entry.attachments) for_slots(a, [&](auto& slots) { slots.detach(name); });
    auto released = backbone_parameters(entry);
    entries_.erase(name);
    deltas_->unregister_module(name);
    for (const auto& [other, e] : entries_)  // still trained by another delta: leave it trainable
      for (const auto& p : backbone_parameters(e))
        released.erase(std::remove_if(released.begin(), released.end(), [&](const torch::Tensor& r) { return r.is_same(p); }),
                       released.end());
    const auto dtype = frozen_dtype(*backbone_);  // frozen again, stored as the rest of the backbone
    for (auto& p : released) {
      p.set_requires_grad(false);
      if (p.scalar_type() != dtype && p.is_floating_point()) p.set_data(p.detach().to(dtype));
    }
  }

  // Inactive deltas stay attached but take no part in forward passes.
  void set_active(const std::string& name, bool active) {
    auto& entry = at(name);
    entry.active = active;
    for (auto& a : entry.attachments) for_slots(a, [&](auto& slots) { slots.set_active(name, active); });
  }
  void activate(const std::string& name) { set_active(name, true); }
  void deactivate(const std::string& name) { set_active(name, false); }

  // Stops training a delta (for staged combinations: train one, freeze it, train the next).
  void freeze_delta(const std::string& name) {
    for (auto& p : delta_parameters(at(name))) p.set_requires_grad(false);
  }

  // Folds a weight delta into the frozen weights: zero inference overhead. Into a bf16 or fp16
  // weight, W0 + dW is computed in float32 and rounded once to the weight's dtype, so the merged
  // layer differs from the unmerged one by that rounding (unmerge restores W0 bit for bit).
  void merge(const std::string& name) {
    auto& entry = at(name);
    detail::check(!routing_, "cannot merge delta '{}' while rows are routed (DeltaModel::route): it would act on every "
                  "row; clear the routing first", name);
    for (const auto& a : entry.attachments)
      detail::check(a.delta->mergeable(), "delta '{}' ({}) acts on {} sites and cannot be merged; only weight deltas "
                    "(those on linear sites) can", name, entry.recipe->method(), to_string(a.site.kind));
    std::vector<WeightSite*> done;
    try {
      for (auto& a : entry.attachments) {
        a.site.linear->merge(name);
        done.push_back(a.site.linear);
      }
    } catch (...) {  // all or nothing: undo the layers already merged
      for (auto* linear : done) linear->unmerge(name);
      throw;
    }
  }
  void unmerge(const std::string& name) {
    for (auto& a : at(name).attachments) a.site.linear->unmerge(name);
  }

  // The row name that runs through the bare backbone, as peft's adapter_names ("" does too).
  static constexpr const char* base_row = "__base__";

  // Ends a routing when it goes out of scope, putting back the routing it replaced.
  class RoutingGuard {
   public:
    RoutingGuard(RoutingGuard&& other) noexcept
        : model_(std::exchange(other.model_, nullptr)), previous_(std::move(other.previous_)) {}
    RoutingGuard(const RoutingGuard&) = delete;
    RoutingGuard& operator=(const RoutingGuard&) = delete;
    RoutingGuard& operator=(RoutingGuard&&) = delete;
    ~RoutingGuard() {
      if (model_) model_->apply_routing(std::move(previous_));
    }

   private:
    friend class DeltaModel;
    RoutingGuard(DeltaModel* model, std::shared_ptr<const RowRouting> previous)
        : model_(model), previous_(std::move(previous)) {}
    DeltaModel* model_;
    std::shared_ptr<const RowRouting> previous_;
  };

  // A mixed batch (peft's adapter_names): in the forward passes that follow, row i runs
  // through delta per_row[i] alone, or the bare backbone where it is "" or "__base__";
  // each delta computes on its own rows only, so gradients reach it from those rows only.
  // Weight, activation and prompt deltas can be routed (prompts of different lengths, or
  // none, end where each row's tokens begin: PromptSite); deltas no row names act on no row.
  // Refused while a delta is merged or a prefix is active (they would act on every row).
  // Backbone parameters a method trains (adapters' layer norms) are the backbone's, shared
  // by every row. Until the guard ends:
  //   auto routing = model.route({"sst2", "__base__", "rte"});
  [[nodiscard]] RoutingGuard route(const std::vector<std::string>& per_row, const RouteOptions& options = {}) {
    auto previous = routing_;
    set_routing(per_row, options);
    return RoutingGuard(this, std::move(previous));
  }
  void set_routing(const std::vector<std::string>& per_row, const RouteOptions& options = {}) {
    apply_routing(make_routing(per_row, options));
  }
  void clear_routing() { apply_routing(nullptr); }
  // The routing in force, or null when every row runs through every active delta.
  const RowRouting* routing() const { return routing_.get(); }
  // Throws unless rows can be routed to delta `name` (route() checks every name it is given):
  // it must be active and act through sites that route rows, not through a prefix's keys
  // (every row's attention) nor with no sites (a method that trains the backbone itself).
  void check_routable(const std::string& name) {
    auto& entry = at(name);
    const bool routable = !entry.attachments.empty() && !acts_on_every_row(entry);
    detail::check<OptionError>(routable, "delta '{}' ({}) cannot be routed per row: only weight, activation and "
                               "prompt deltas (on linear, output and prompt sites) can; a prefix adds keys to every "
                               "row's attention and a delta with no sites trains the backbone itself", name,
                               entry.recipe->method());
    detail::check<OptionError>(entry.active, "delta '{}' is inactive; activate('{}') before routing rows to it", name, name);
  }

  // What an optimizer should see, by name: every active delta's parameters that require grad
  // ("deltas.<delta>.<site>.<parameter>", each once), then the backbone parameters the
  // methods train by definition (under their own names). Training state is keyed by these names.
  std::vector<std::pair<std::string, torch::Tensor>> named_trainable_parameters() {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    std::set<const void*> seen;
    auto take = [&](const std::string& key, const torch::Tensor& p) {
      if (p.requires_grad() && seen.insert(p.unsafeGetTensorImpl()).second) out.emplace_back(key, p);
    };
    for (auto& [name, entry] : entries_)
      if (entry.active)
        for (auto& [key, p] : named_delta_parameters(name)) take(fmt::format("{}.{}.{}", kDeltasModule, name, key), p);
    for (auto& [key, p] : backbone_named_parameters()) take(key, p);
    return out;
  }
  std::vector<torch::Tensor> trainable_parameters() {
    std::vector<torch::Tensor> out;
    for (auto& [key, p] : named_trainable_parameters()) out.push_back(p);
    return out;
  }

  // Every parameter of a delta, each once, by its name under deltas.<name>: "<site>.<param>"
  // for per-site deltas, "<module>.<param>" for shared modules; a delta serving several
  // sites is named after the first. These are the names in delta.safetensors.
  std::vector<std::pair<std::string, torch::Tensor>> named_delta_parameters(const std::string& name) {
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (const auto& p : at(name).module->named_parameters()) out.emplace_back(p.key(), p.value());
    return out;
  }

  // The backbone's own parameters, the deltas left out.
  int64_t num_backbone_parameters() const {
    int64_t n = 0;
    for (const auto& [key, p] : backbone_named_parameters()) n += p.numel();
    return n;
  }
  int64_t num_trainable_parameters() {
    int64_t n = 0;
    for (const auto& p : trainable_parameters()) n += p.numel();
    return n;
  }

  // The backbone's sites that carry deltas, as a tree of name components, each with its
  // deltas and their parameter counts; then the totals and the trained share.
  std::string summary() {
    std::string out;
    std::vector<std::string> previous;
    for (const auto& site : sites_) {
      auto line = site_deltas(site);
      if (line.empty()) continue;
      const auto parts = split_name(site.name);
      size_t common = 0;
      while (common < previous.size() && common + 1 < parts.size() && previous[common] == parts[common]) ++common;
      for (size_t i = common; i + 1 < parts.size(); ++i) out += fmt::format("{:{}}{}\n", "", 2 * i, parts[i]);
      out += fmt::format("{:{}}{} [{}] {}\n", "", 2 * (parts.size() - 1), parts.back(), to_string(site.kind), line);
      previous = parts;
    }
    const auto trained = num_trainable_parameters(), total = num_backbone_parameters();
    for (auto& [name, entry] : entries_) {
      const auto backbone_trained = count(backbone_parameters(entry));
      out += fmt::format("delta '{}': {} on {} sites, {} parameters{}, {}\n", name, entry.recipe->method(),
                         entry.attachments.size(), count(delta_parameters(entry)),
                         backbone_trained ? fmt::format(" + {} backbone parameters it trains", backbone_trained) : "",
                         entry.active ? "active" : "inactive");
    }
    out += fmt::format("trainable: {} of {} backbone parameters ({:.4f}%)\n", trained, total,
                       total ? 100.0 * double(trained) / double(total) : 0.0);
    return out;
  }

  // Writes delta `name` to `dir`: delta.safetensors (its parameters, and the backbone
  // parameters it trains) and delta_config.json (method, options, pattern sites, the
  // backbone's fingerprint). Kilobytes, not the model; each file written atomically.
  void save(const std::string& name, const std::string& dir) {
    auto& entry = at(name);
    std::filesystem::create_directories(dir);
    std::map<std::string, torch::Tensor> tensors;
    for (auto& [key, p] : named_delta_parameters(name)) tensors[key] = p.detach();
    for (const auto& key : entry.backbone_parameters) tensors["backbone." + key] = backbone_parameter(key).detach();
    nlohmann::json sites = nlohmann::json::array();
    for (const auto& a : entry.attachments) sites.push_back(a.site.name);
    nlohmann::json config = {{"format", "deltatune-delta/1"}, {"method", entry.recipe->method()},
                             {"options", entry.recipe->options_json()}, {"sites", sites},
                             {"backbone_fingerprint", fingerprint_}};
    write_safetensors(dir + "/delta.safetensors", tensors, {{"format", "pt"}});
    detail::write_text_atomically(dir + "/delta_config.json", config.dump(2) + "\n", "DeltaModel::save");
  }

  // Reads a delta written by save() into delta `name`, and returns it.
  // - Where the model has no delta of that name, the file alone rebuilds it: `methods` (by
  //   default deltatune's own, builtin_methods()) makes the recipe from the saved method and
  //   options, attached at the saved sites.
  // - Where it has one, it must agree with the file: method, every option, every site.
  // Either way a checkpoint from another backbone, any disagreement (naming the field or the
  // sites), or other tensor names, shapes or dtypes (one error listing every difference) is
  // refused, and the model is left as it was. A config whose sizes would make a module with
  // more parameters than delta.safetensors holds is refused before that module is allocated.
  Entry& load(const std::string& name, const std::string& dir, const MethodTable& methods) {
    const auto config_path = dir + "/delta_config.json", tensors_path = dir + "/delta.safetensors";
    const auto config = read_delta_config(config_path);
    const auto saved = read_safetensors(tensors_path).tensors;
    const bool rebuilt = !entries_.count(name);
    if (rebuilt) {
      const detail::ParameterCap cap(double(count(saved)), tensors_path);
      add_saved(name, config, config_path, methods);
    }
    try {
      auto& entry = at(name);
      check_agrees(name, entry, config, config_path);
      copy_saved_tensors(name, entry, saved, tensors_path);
      return entry;
    } catch (...) {
      if (rebuilt) remove(name);
      throw;
    }
  }
  template <class Table = MethodTable>
  Entry& load(const std::string& name, const std::string& dir) {
    return load(name, dir, builtin_methods(BuiltinMethodsTag<Table>{}));
  }

  // The backbone's parameter names, shapes and first values, hashed when the DeltaModel is
  // built: a delta cannot be loaded onto another model, or other weights, by mistake. Not the
  // dtype: a delta trained on a bf16 backbone loads onto the float32 one and the reverse.
  const std::string& fingerprint() const { return fingerprint_; }

 private:
  void check_new_name(const std::string& name) const {
    detail::check<OptionError>(!name.empty() && name.find('.') == std::string::npos,
                               "delta name '{}' must be non-empty and hold no '.'", name);
    detail::check<OptionError>(!entries_.count(name), "a delta named '{}' exists already; remove() it first", name);
  }

  // add() once the sites are known: makes the deltas, attaches them, registers them under
  // deltas.<name>, and unfreezes the backbone parameters the method trains.
  Entry& add_at(const std::string& name, std::shared_ptr<DeltaRecipe> recipe, const std::vector<const Site*>& matched) {
    std::vector<std::string> names;
    for (const auto& [key, p] : backbone_named_parameters()) names.push_back(key);
    Entry entry{recipe, {}, recipe->select_backbone_parameters(names), true, nullptr};
    detail::check<OptionError>(recipe->uses_sites() || !entry.backbone_parameters.empty(),
                               "{} selects no backbone parameter; check its options", recipe->method());
    if (!matched.empty()) recipe->prepare(matched, model_type());
    for (const auto* site : matched) entry.attachments.push_back({*site, recipe->make(*site)});
    for (auto& a : entry.attachments) attach(name, a);
    entry.module = register_deltas(name, entry);
    place(*entry.module);
    for (auto& p : backbone_parameters(entry)) {
      if (is_half(p.scalar_type())) p.set_data(p.detach().to(torch::kFloat));  // trains in float32 (precision.hpp)
      p.set_requires_grad(true);
    }
    return entries_[name] = std::move(entry);
  }

  // New deltas join the backbone's device; on a half-precision backbone they stay in float32,
  // the precision they train in (precision.hpp).
  void place(torch::nn::Module& deltas) const {
    const auto parameters = backbone_->parameters();
    if (!parameters.empty()) deltas.to(parameters.front().device());
    for (auto& p : deltas.parameters())
      if (is_half(p.scalar_type())) p.set_data(p.detach().to(torch::kFloat));
  }

  // deltas.<name>: each delta module under its (first) site's path, the shared modules beside.
  std::shared_ptr<torch::nn::Module> register_deltas(const std::string& name, Entry& entry) {
    auto root = std::make_shared<detail::DeltaTree>();
    std::set<const torch::nn::Module*> seen;
    for (auto& a : entry.attachments) {
      auto& module = a.delta->module();
      if (seen.insert(&module).second)
        detail::register_at_path(*root, a.site.name, std::shared_ptr<torch::nn::Module>(a.delta, &module));
    }
    for (const auto& [key, module] : entry.recipe->shared_modules()) root->register_module(key, module);
    return deltas_->register_module(name, root);
  }

  // The backbone's own parameters by name: everything but the deltas.
  std::vector<std::pair<std::string, torch::Tensor>> backbone_named_parameters() const {
    const auto prefix = std::string(kDeltasModule) + ".";
    std::vector<std::pair<std::string, torch::Tensor>> out;
    for (const auto& p : backbone_->named_parameters())
      if (p.key().rfind(prefix, 0) != 0) out.emplace_back(p.key(), p.value());
    return out;
  }

  // delta_config.json's fields, their types checked: what save() wrote.
  struct SavedDelta {
    std::string method;
    JsonFields options;
    std::vector<std::string> sites;
  };

  // delta_config.json, read field by field: a file from another backbone is refused here.
  SavedDelta read_delta_config(const std::string& path) const {
    detail::check<CheckpointError>(std::filesystem::exists(path), "{}: cannot open the delta's config (was it "
                                   "written by DeltaModel::save?)", path);
    const JsonFields config(read_json_file(path), path);
    const auto fingerprint = config.get<std::string>("backbone_fingerprint", "none");
    detail::check<CheckpointError>(fingerprint == fingerprint_, "{}: the delta was trained on another backbone "
                                   "(fingerprint {} here, {} there); load it onto the model it was trained with",
                                   path, fingerprint_, fingerprint);
    return {config.get<std::string>("method"), config.object("options"),
            config.get<std::vector<std::string>>("sites")};
  }

  // A delta rebuilt from its config alone: the method table's recipe, at the saved sites.
  void add_saved(const std::string& name, const SavedDelta& saved, const std::string& path,
                 const MethodTable& methods) {
    check_new_name(name);
    const auto recipe = methods.method(saved.method, path).recipe_from_json(saved.options);
    std::vector<const Site*> matched;
    for (const auto& site_name : saved.sites) {
      const auto it = std::find_if(sites_.begin(), sites_.end(), [&](const Site& site) {
        return site.name == site_name && recipe->accepts(site.kind);
      });
      detail::check<CheckpointError>(it != sites_.end(), "{}: site '{}' is not a site this backbone has for {}", path,
                                     site_name, recipe->method());
      matched.push_back(&*it);
    }
    detail::check<CheckpointError>(!recipe->uses_sites() || !matched.empty(), "{}: field 'sites' is empty", path);
    try {
      add_at(name, recipe, matched);
    } catch (const OptionError& e) {  // options of the right types, but values no delta takes
      throw CheckpointError(fmt::format("{}: the saved \"options\" make no {}: {}", path, saved.method, e.what()));
    }
  }

  // The delta here and the saved one: the same method, options and sites, or an error naming
  // every field and site that differs.
  void check_agrees(const std::string& name, const Entry& entry, const SavedDelta& saved,
                    const std::string& path) const {
    detail::check<CheckpointError>(saved.method == entry.recipe->method(), "{}: the delta is a {}, but '{}' here "
                                   "is a {}", path, saved.method, name, entry.recipe->method());
    std::vector<std::string> problems;
    const auto here = entry.recipe->options_json();
    const auto& there = saved.options.json();
    std::set<std::string> fields;
    for (const auto& [key, value] : here.items()) fields.insert(key);
    for (const auto& [key, value] : there.items()) fields.insert(key);
    for (const auto& field : fields) {
      const auto a = here.value(field, nlohmann::json()), b = there.value(field, nlohmann::json());
      if (a != b) problems.push_back(fmt::format("option '{}' is {} here, {} in the file", field, a.dump(), b.dump()));
    }
    std::vector<std::string> attached;
    for (const auto& a : entry.attachments) attached.push_back(a.site.name);
    if (attached != saved.sites)
      problems.push_back(fmt::format("sites differ: {} here, {} in the file (first here: {}; first in the file: {})",
                                     attached.size(), saved.sites.size(), attached.empty() ? "none" : attached[0],
                                     saved.sites.empty() ? "none" : saved.sites[0]));
    detail::check<CheckpointError>(problems.empty(), "{}: delta '{}' here is not the saved one: {}", path, name,
                                   fmt::join(problems, "; "));
  }

  // The saved tensors into the delta: the same names, shapes and dtypes as save() wrote, so
  // that a delta cannot change precision unnoticed; nothing is copied unless all fit.
  void copy_saved_tensors(const std::string& name, const Entry& entry, const std::map<std::string, torch::Tensor>& saved,
                          const std::string& path) {
    auto slot = [](const std::string& key, const torch::Tensor& target) {
      return detail::TensorSlot{key, {key}, target, [dtype = target.scalar_type()](const torch::Tensor& t) {
                                  return t.scalar_type() == dtype ? t : torch::Tensor();
                                }};
    };
    std::vector<detail::TensorSlot> slots;
    for (auto& [key, p] : named_delta_parameters(name)) slots.push_back(slot(key, p));
    for (const auto& key : entry.backbone_parameters) slots.push_back(slot("backbone." + key, backbone_parameter(key)));
    const detail::TensorMatch match(slots, saved);
    detail::check<CheckpointError>(match.fits(), "{} does not fit delta '{}':{}", path, name, match.problems());
    match.copy();
  }

  // Row indices per routed delta, after checking that each name is routable (check_routable)
  // and that no delta would act on every row regardless.
  std::shared_ptr<const RowRouting> make_routing(const std::vector<std::string>& per_row, const RouteOptions& options) {
    detail::check<OptionError>(!per_row.empty(), "DeltaModel::route needs one delta name (or \"{}\") per batch row, "
                               "got none", base_row);
    for (auto& [name, entry] : entries_) {
      detail::check(!is_merged(name, entry), "delta '{}' is merged into the backbone's weights, so every row would get "
                    "it; unmerge('{}') before routing rows", name, name);
      detail::check(!entry.active || !acts_on_every_row(entry), "delta '{}' ({}) is active and adds keys to every "
                    "row's attention, so rows cannot leave it out; deactivate('{}') before routing rows", name,
                    entry.recipe->method(), name);
    }
    std::map<std::string, std::vector<int64_t>> rows;
    for (size_t i = 0; i < per_row.size(); ++i) {
      const auto& name = per_row[i];
      if (name.empty() || name == base_row) continue;
      if (!rows.count(name)) check_routable(name);
      rows[name].push_back(static_cast<int64_t>(i));
    }
    auto routing = std::make_shared<RowRouting>();
    routing->batch = static_cast<int64_t>(per_row.size());
    routing->gather = options.gather();
    const auto parameters = backbone_->parameters();
    const auto device = parameters.empty() ? torch::Device(torch::kCPU) : parameters.front().device();
    for (const auto& [name, indices] : rows) routing->rows[name] = torch::tensor(indices, torch::kInt64).to(device);
    return routing;
  }

  static bool acts_on_every_row(const Entry& entry) {
    return std::any_of(entry.attachments.begin(), entry.attachments.end(),
                       [](const Attachment& a) { return a.site.kind == Site::Kind::attention; });
  }
  static bool is_merged(const std::string& name, const Entry& entry) {
    return std::any_of(entry.attachments.begin(), entry.attachments.end(), [&](const Attachment& a) {
      return a.site.kind == Site::Kind::linear && a.site.linear->deltas.at(name).merged;
    });
  }

  // Hands the routing to every site that routes rows (weight, output and prompt sites); null ends it.
  void apply_routing(std::shared_ptr<const RowRouting> routing) {
    routing_ = std::move(routing);
    for (auto& site : sites_) {
      if (site.kind == Site::Kind::linear) site.linear->deltas.set_routing(routing_);
      if (site.kind == Site::Kind::output) site.output->output_deltas.set_routing(routing_);
      if (site.kind == Site::Kind::prompt) site.prompt->prompt_deltas.set_routing(routing_);
    }
  }

  Entry& at(const std::string& name) {
    auto it = entries_.find(name);
    if (it == entries_.end()) {
      std::vector<std::string> names;
      for (const auto& [n, e] : entries_) names.push_back(n);
      throw OptionError(fmt::format("no delta named '{}'; this model has: {}", name,
                                    names.empty() ? "none" : fmt::format("{}", fmt::join(names, ", "))));
    }
    return it->second;
  }

  // Calls f on the slot list of the attachment's site that fits its delta's family.
  template <class F>
  static void for_slots(Attachment& a, F&& f) { for_slots(a.site, std::forward<F>(f)); }
  template <class F>
  static void for_slots(const Site& site, F&& f) {
    switch (site.kind) {
      case Site::Kind::linear: f(site.linear->deltas); break;
      case Site::Kind::output: f(site.output->output_deltas); break;
      case Site::Kind::attention: f(site.attention->prefix_deltas); break;
      case Site::Kind::prompt: f(site.prompt->prompt_deltas); break;
    }
  }

  void attach(const std::string& name, Attachment& a) {
    auto cast = [&](auto* typed) {
      detail::check(typed != nullptr, "method {} made a {} delta for {} site '{}'", a.delta->method(),
                    to_string(a.delta->family()), to_string(a.site.kind), a.site.name);
    };
    switch (a.site.kind) {
      case Site::Kind::linear: {
        auto d = std::dynamic_pointer_cast<WeightDelta>(a.delta);
        cast(d.get());
        a.site.linear->deltas.attach(name, d);
        break;
      }
      case Site::Kind::output: {
        auto d = std::dynamic_pointer_cast<ActivationDelta>(a.delta);
        cast(d.get());
        a.site.output->output_deltas.attach(name, d);
        break;
      }
      case Site::Kind::attention:
      case Site::Kind::prompt: {
        auto d = std::dynamic_pointer_cast<InputDelta>(a.delta);
        cast(d.get());
        if (a.site.kind == Site::Kind::attention) a.site.attention->site_name = a.site.name;  // the prefix's key
        (a.site.kind == Site::Kind::attention ? a.site.attention->prefix_deltas : a.site.prompt->prompt_deltas)
            .attach(name, d);
        break;
      }
    }
  }

  torch::Tensor backbone_parameter(const std::string& key) const {
    // named_parameters() returns a dict by value: find() points into it, so it must outlive the lookup.
    const auto parameters = backbone_->named_parameters();
    const auto* p = parameters.find(key);
    detail::check(p != nullptr, "the backbone has no parameter '{}'", key);
    return *p;
  }
  std::vector<torch::Tensor> backbone_parameters(const Entry& entry) const {
    std::vector<torch::Tensor> out;
    for (const auto& key : entry.backbone_parameters) out.push_back(backbone_parameter(key));
    return out;
  }

  static std::vector<torch::Tensor> delta_parameters(const Entry& entry) { return entry.module->parameters(); }

  static int64_t count(const std::vector<torch::Tensor>& tensors) {
    int64_t n = 0;
    for (const auto& t : tensors) n += t.numel();
    return n;
  }
  static int64_t count(const std::map<std::string, torch::Tensor>& tensors) {
    int64_t n = 0;
    for (const auto& [key, t] : tensors) n += t.numel();
    return n;
  }

  std::string site_deltas(const Site& site) const {
    std::vector<std::string> parts;
    for (const auto& [name, entry] : entries_)
      for (const auto& a : entry.attachments)
        if (a.site.name == site.name && a.site.kind == site.kind)
          parts.push_back(fmt::format("{}: {} ({} params{})", name, entry.recipe->method(), a.delta->num_parameters(),
                                      entry.active ? "" : ", inactive"));
    return fmt::format("{}", fmt::join(parts, "; "));
  }

  static std::vector<std::string> split_name(const std::string& name) {
    std::vector<std::string> parts;
    size_t start = 0;
    for (size_t dot; (dot = name.find('.', start)) != std::string::npos; start = dot + 1)
      parts.push_back(name.substr(start, dot - start));
    parts.push_back(name.substr(start));
    return parts;
  }

  std::string no_match_message(const DeltaRecipe& recipe, const SitePattern& pattern,
                               const std::vector<const Site*>& wrong_kind) const {
    if (!wrong_kind.empty())
      return fmt::format("pattern '{}' matches {} site(s), such as '{}' ({}), but {} acts on none of them", pattern.text(),
                         wrong_kind.size(), wrong_kind.front()->name, to_string(wrong_kind.front()->kind),
                         recipe.method());
    // Compared with as many trailing name components as the pattern has: "SelfAttention.qq"
    // is one edit from "...layer.0.SelfAttention.q".
    const auto components = std::count(pattern.text().begin(), pattern.text().end(), '.') + 1;
    std::vector<std::pair<size_t, std::string>> ranked;
    for (const auto& site : sites_) {
      if (!recipe.accepts(site.kind)) continue;
      const auto parts = split_name(site.name);
      const auto first = parts.size() > size_t(components) ? parts.size() - components : 0;
      std::vector<std::string> tail(parts.begin() + first, parts.end());
      ranked.emplace_back(detail::edit_distance(pattern.text(), fmt::format("{}", fmt::join(tail, "."))), site.name);
    }
    std::sort(ranked.begin(), ranked.end());
    std::vector<std::string> closest;
    for (size_t i = 0; i < std::min<size_t>(5, ranked.size()); ++i) closest.push_back(ranked[i].second);
    return fmt::format("pattern '{}' matches no site that {} acts on; closest names: {}", pattern.text(),
                       recipe.method(), closest.empty() ? "none" : fmt::format("{}", fmt::join(closest, ", ")));
  }

  std::string compute_fingerprint() const {
    std::uint64_t hash = 1469598103934665603ull;  // FNV-1a
    auto mix = [&](const std::string& text) {
      for (unsigned char c : text) hash = (hash ^ c) * 1099511628211ull;
    };
    // The values rounded to bfloat16 first, as a bf16 backbone stores them: a float32 model
    // and its bf16 copy hash alike. (A float16 copy of a float32 checkpoint rounds twice and
    // may not: its deltas load where the checkpoint was float16, or the backbone is.)
    for (const auto& p : backbone_->named_parameters())
      mix(fmt::format("{}:{}:{:.6e};", p.key(), p.value().sizes(),
                      p.value().detach().flatten().slice(0, 0, 16).to(torch::kBFloat16).to(torch::kFloat64).sum()
                          .item<double>()));
    return fmt::format("{:016x}", hash);
  }

  std::shared_ptr<torch::nn::Module> backbone_;
  std::shared_ptr<torch::nn::Module> deltas_;  // the backbone's child `deltas`: one DeltaTree per named delta
  std::vector<Site> sites_;
  std::map<std::string, Entry> entries_;
  std::string fingerprint_;
  std::shared_ptr<const RowRouting> routing_;  // see route()
};

}  // namespace deltatune
