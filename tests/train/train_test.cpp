// Tests of train/: schedule.hpp (golden: transformers, torch), progress.hpp, log.hpp, plot.hpp,
// checkpoint_state.hpp, loss_scale.hpp and trainer.hpp on tiny problems on the CPU.
#include <deltatune/backbones/bert.hpp>
#include <deltatune/core/delta_model.hpp>
#include <deltatune/methods/lora.hpp>
#include <deltatune/train/checkpoint_state.hpp>
#include <deltatune/train/log.hpp>
#include <deltatune/train/loss_scale.hpp>
#include <deltatune/train/plot.hpp>
#include <deltatune/train/progress.hpp>
#include <deltatune/train/schedule.hpp>
#include <deltatune/train/trainer.hpp>

#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <optional>
#include <sstream>

#include "test_support.hpp"

namespace train_test {

namespace dt = deltatune;

namespace {

uint32_t read_u32_be(const std::string& s, std::size_t at) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v = v << 8 | static_cast<uint8_t>(s[at + i]);
  return v;
}

// The pid of a process that has exited: a temporary named after it is stale.
pid_t dead_pid() {
  const pid_t child = ::fork();
  if (child == 0) ::_exit(0);
  int status = 0;
  ::waitpid(child, &status, 0);
  return child;
}

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// A batch of the synthetic logistic-regression problem: x (B, 4), y (B,).
struct Batch {
  torch::Tensor x, y;
};

// 8 batches of 16 points whose label is the sign of a fixed direction; shuffled per epoch by
// a generator seeded with the epoch, so batches depend on (epoch, index) only.
dt::BatchSource<Batch> logistic_source(const torch::Tensor& x, const torch::Tensor& y) {
  return {8, [x, y](int64_t epoch, int64_t index) {
            auto gen = at::make_generator<at::CPUGeneratorImpl>(1000 + epoch);
            const auto order = torch::randperm(128, gen).slice(0, index * 16, index * 16 + 16);
            return Batch{x.index_select(0, order), y.index_select(0, order)};
          }};
}

struct Logistic {
  torch::Tensor x, y, w, b;
  Logistic() {
    torch::manual_seed(0);
    x = torch::randn({128, 4}, torch::kFloat64);
    y = (x.matmul(torch::tensor({1.0, -2.0, 0.5, 1.5}, torch::kFloat64)) > 0).to(torch::kFloat64);
    w = torch::zeros({4}, torch::kFloat64).requires_grad_();
    b = torch::zeros({1}, torch::kFloat64).requires_grad_();
  }
  // Dropout on the input, so that the global generator matters for resuming.
  torch::Tensor loss(const Batch& batch) const {
    const auto logits = torch::dropout(batch.x, 0.1, /*train=*/true).matmul(w) + b;
    return torch::binary_cross_entropy_with_logits(logits, batch.y);
  }
  double accuracy() const {
    torch::NoGradGuard no_grad;
    return ((x.matmul(w) + b > 0).to(torch::kFloat64) == y).to(torch::kFloat64).mean().item<double>();
  }
  dt::Trainer<Batch> trainer(const dt::TrainerOptions& options, std::function<double()> evaluate = {}) {
    return dt::Trainer<Batch>(options, {{"w", w}, {"b", b}}, [this](const Batch& batch) { return loss(batch); },
                              logistic_source(x, y), evaluate ? evaluate : [this] { return accuracy(); });
  }
};

}  // namespace

CATCH_TEST_CASE("learning-rate schedules match transformers' step by step", "[schedule][golden]") {
  const auto dir = deltatune::testing::golden_dir("schedule");
  if (!dir) return;
  for (const auto& c : nlohmann::json::parse(std::ifstream(*dir / "schedule.json"))) {
    const dt::LrSchedule schedule{c.at("kind") == "linear" ? dt::ScheduleKind::kLinear : dt::ScheduleKind::kConstant,
                                  c.at("warmup"), c.at("total"), c.at("base_lr")};
    const auto lrs = c.at("lrs").get<std::vector<double>>();
    for (std::size_t s = 0; s < lrs.size(); ++s) CATCH_CHECK(schedule.lr(static_cast<int64_t>(s)) == lrs[s]);
  }
  auto param = torch::zeros({1}, torch::requires_grad());
  torch::optim::AdamW optimizer({param});
  dt::LrSchedule{dt::ScheduleKind::kLinear, 4, 10, 1e-2}.apply(optimizer, 2);
  CATCH_CHECK(optimizer.param_groups()[0].options().get_lr() == 5e-3);
  CATCH_CHECK(dt::warmup_steps(0.06, 1000) == 60);
  CATCH_CHECK(dt::warmup_steps(0.1, 15) == 2);
}

CATCH_TEST_CASE("clip_grad_norm matches torch.nn.utils.clip_grad_norm_", "[schedule][golden]") {
  const auto dir = deltatune::testing::golden_dir("schedule");
  if (!dir) return;
  const auto file = dt::read_safetensors((*dir / "clip.safetensors").string());
  const auto cases = nlohmann::json::parse(std::ifstream(*dir / "clip.json"));
  for (const auto& [name, c] : cases.items()) {
    std::vector<torch::Tensor> params;
    for (int i = 0; i < 2; ++i) {
      params.push_back(torch::zeros_like(file.tensors.at(name + ".grad." + std::to_string(i))).requires_grad_());
      params.back().mutable_grad() = file.tensors.at(name + ".grad." + std::to_string(i)).clone();
    }
    params.push_back(torch::zeros({2}, torch::requires_grad()));  // no gradient: skipped
    CATCH_CHECK(std::abs(dt::clip_grad_norm(params, c.at("max_norm")) - c.at("total_norm").get<double>()) <= 1e-12);
    for (int i = 0; i < 2; ++i)
      CATCH_CHECK(torch::allclose(params[i].grad(), file.tensors.at(name + ".clipped." + std::to_string(i)), 0, 1e-15));
  }
  // max_norm <= 0 measures without touching the gradients.
  auto p = torch::zeros({2}, torch::requires_grad());
  p.mutable_grad() = torch::tensor({3.0f, 4.0f});
  CATCH_CHECK(dt::clip_grad_norm({p}, 0) == 5.0);
  CATCH_CHECK(torch::equal(p.grad(), torch::tensor({3.0f, 4.0f})));
}

CATCH_TEST_CASE("micro_batches splits epochs into accumulated updates", "[schedule]") {
  CATCH_CHECK(dt::updates_per_epoch(10, 4) == 3);
  const auto first = dt::micro_batches(0, 10, 4), last = dt::micro_batches(2, 10, 4), next = dt::micro_batches(3, 10, 4);
  CATCH_CHECK((first.epoch == 0 && first.begin == 0 && first.end == 4));
  CATCH_CHECK((last.epoch == 0 && last.begin == 8 && last.end == 10 && last.count() == 2));
  CATCH_CHECK((next.epoch == 1 && next.begin == 0));
  CATCH_REQUIRE_THROWS_AS(dt::updates_per_epoch(10, 0), dt::OptionError);
}

CATCH_TEST_CASE("progress bar redraws on a terminal and writes lines otherwise", "[progress]") {
  CATCH_CHECK(dt::format_duration(7) == "0:07");
  CATCH_CHECK(dt::format_duration(3723) == "1:02:03");
  CATCH_CHECK(dt::format_duration(NAN) == "?");
  std::ostringstream tty, plain;
  dt::ProgressBar bar(100, tty, true), file(100, plain, false, /*every_s=*/1e9);
  for (int64_t step = 1; step <= 100; ++step) bar.update(step, 0.5), file.update(step, 0.5);
  bar.finish();
  const std::string redrawn = tty.str(), lines = plain.str();
  CATCH_CHECK(std::count(redrawn.begin(), redrawn.end(), '\r') == 100);
  // Not a terminal: the first and the last step only (every_s is far away).
  CATCH_CHECK(std::count(lines.begin(), lines.end(), '\n') == 2);
  CATCH_CHECK(lines.find('\r') == std::string::npos);
  CATCH_CHECK(bar.line(25, 0.12345, 5.0) == " 25/100 [######..................]  25% loss 0.1235 5.00 it/s ETA 0:15");
}

CATCH_TEST_CASE("JSONL logger writes one flushed object a line", "[log]") {
  dt::testing::TempDir dir;
  const auto path = dir.file("log.jsonl");
  {
    dt::JsonlLogger log(path, false);
    log.log({{"step", 1}, {"loss", 0.5}});
    CATCH_CHECK(dt::read_jsonl(path).size() == 1);  // flushed before the logger closes
    CATCH_REQUIRE_THROWS_WITH(log.log(nlohmann::json::array()), Catch::Contains("must be a JSON object"));
  }
  dt::JsonlLogger(path, true).log({{"step", 2}});
  const auto records = dt::read_jsonl(path);
  CATCH_REQUIRE(records.size() == 2);
  CATCH_CHECK(records[1].at("step") == 2);
}

CATCH_TEST_CASE("PNG writer: valid chunks, CRC-32, Adler-32 and the pixels drawn", "[plot]") {
  // Check values of the two checksums' specifications.
  CATCH_CHECK(dt::detail::crc32("123456789") == 0xCBF43926u);
  CATCH_CHECK(dt::detail::adler32("Wikipedia") == 0x11E60398u);
  dt::Canvas canvas(300, 250);  // 300 * 3 + 1 bytes a row: several stored blocks
  canvas.line(0, 0, 299, 249, {255, 0, 0});
  const std::string png = canvas.png();
  CATCH_REQUIRE(png.compare(0, 8, "\x89PNG\r\n\x1a\n") == 0);
  std::string idat;
  std::vector<std::string> types;
  for (std::size_t at = 8; at < png.size();) {
    const uint32_t length = read_u32_be(png, at);
    types.push_back(png.substr(at + 4, 4));
    CATCH_CHECK(dt::detail::crc32(png.substr(at + 4, 4 + length)) == read_u32_be(png, at + 8 + length));
    if (types.back() == "IDAT") idat = png.substr(at + 8, length);
    at += 12 + length;
  }
  CATCH_CHECK(types == std::vector<std::string>{"IHDR", "IDAT", "IEND"});
  CATCH_CHECK(read_u32_be(png, 16) == 300);
  std::string raw;  // inflate the stored blocks
  for (std::size_t at = 2; at + 4 < idat.size();) {
    const std::size_t n = static_cast<uint8_t>(idat[at + 1]) | static_cast<uint8_t>(idat[at + 2]) << 8;
    raw += idat.substr(at + 5, n);
    at += 5 + n;
  }
  CATCH_REQUIRE(raw.size() == 250u * (300 * 3 + 1));
  CATCH_CHECK(dt::detail::adler32(raw) == read_u32_be(idat, idat.size() - 4));
  const auto pixel = [&](int x, int y) { return raw.substr(std::size_t(y) * 901 + 1 + x * 3, 3); };
  CATCH_CHECK(pixel(0, 0) == std::string("\xff\x00\x00", 3));
  CATCH_CHECK(pixel(299, 249) == std::string("\xff\x00\x00", 3));
  CATCH_CHECK(pixel(299, 0) == std::string("\xff\xff\xff", 3));

  dt::testing::TempDir dir;
  dt::write_training_plot(dir.file("curves.png"), {{1, 2, 3}, {1.0, 0.5, NAN}}, {{2}, {0.9}});
  CATCH_CHECK(std::filesystem::file_size(dir.file("curves.png")) > 800u * 600 * 3);
}

CATCH_TEST_CASE("a restored training state continues bit-identically", "[checkpoint_state]") {
  // Linear regression with noise drawn from the global generator each step.
  const auto run = [](int64_t steps, const std::string& save_at, int64_t resume_steps) {
    torch::manual_seed(3);
    auto x = torch::randn({32, 3}), y = x.matmul(torch::tensor({1.0f, -1.0f, 2.0f}));
    auto w = torch::zeros({3}, torch::requires_grad());
    torch::optim::AdamW optimizer({w}, torch::optim::AdamWOptions(0.1).weight_decay(0.01));
    const dt::LrSchedule schedule{dt::ScheduleKind::kLinear, 2, 10, 0.1};
    int64_t step = 0;
    if (resume_steps < 0) {  // a resumed run: load instead of starting over
      step = dt::load_train_state(save_at, {{"w", w}}, optimizer).at("step");
      schedule.apply(optimizer, 0);  // the lr is restored anyway; show the state wins
      CATCH_CHECK(dt::LrSchedule::from_json({dt::load_train_state(save_at, {{"w", w}}, optimizer).at("schedule"), "schedule"}).total == 10);
    }
    for (; step < steps; ++step) {
      optimizer.zero_grad();
      ((x + 0.1 * torch::randn_like(x)).matmul(w) - y).pow(2).mean().backward();
      dt::clip_grad_norm({w}, 1.0);
      schedule.apply(optimizer, step);
      optimizer.step();
      if (step + 1 == resume_steps)
        dt::save_train_state(save_at, {{"w", w}}, optimizer, {{"step", step + 1}, {"schedule", schedule.to_json()}});
    }
    return w.detach().clone();
  };
  dt::testing::TempDir dir;
  const auto path = dir.file("state.safetensors");
  const auto uninterrupted = run(10, "", 0);
  run(4, path, 4);  // stops after 4 steps, having saved
  torch::manual_seed(99);  // the resumed process's generator starts elsewhere
  const auto resumed = run(10, path, -1);
  CATCH_CHECK(torch::equal(resumed, uninterrupted));

  auto other = torch::zeros({4}, torch::requires_grad());
  torch::optim::AdamW optimizer({other});
  CATCH_REQUIRE_THROWS_WITH(dt::load_train_state(path, {{"w", other}}, optimizer),
                            Catch::Contains("mismatched (3): param/w (file Float [3], model Float [4]), exp_avg/w"));
  CATCH_REQUIRE_THROWS_WITH(dt::load_train_state(path, {{"v", other}}, optimizer),
                            Catch::Contains("missing (1): param/v") && Catch::Contains("unexpected (4): exp_avg/w"));
}

CATCH_TEST_CASE("a damaged training state is refused by tensor name, before anything is restored",
                "[checkpoint_state]") {
  dt::testing::TempDir dir;
  auto a = torch::ones({3}, torch::requires_grad()), b = torch::ones({2, 2}, torch::requires_grad());
  torch::optim::AdamW optimizer({a, b});
  (a.sum() + b.sum()).backward();
  optimizer.step();
  const auto path = dir.file("state.safetensors");
  dt::save_train_state(path, {{"a", a}, {"b", b}}, optimizer, {{"step", 1}});
  const auto saved = dt::read_safetensors(path);
  // The same file with one change: a tensor dropped or replaced, or metadata dropped.
  const auto forged = [&](const std::string& tensor, std::optional<torch::Tensor> replacement,
                          const std::string& dropped_metadata = "") {
    auto tensors = saved.tensors;
    auto metadata = saved.metadata;
    if (replacement) tensors[tensor] = *replacement; else tensors.erase(tensor);
    metadata.erase(dropped_metadata);
    const auto forged_path = dir.file("forged.safetensors");
    dt::write_safetensors(forged_path, tensors, metadata);
    return forged_path;
  };
  auto fresh_a = torch::zeros({3}, torch::requires_grad()), fresh_b = torch::zeros({2, 2}, torch::requires_grad());
  torch::optim::AdamW fresh({fresh_a, fresh_b});
  const auto refuses = [&](const std::string& forged_path, const std::string& message) {
    CATCH_INFO(message);
    CATCH_REQUIRE_THROWS_AS(dt::load_train_state(forged_path, {{"a", fresh_a}, {"b", fresh_b}}, fresh), dt::CheckpointError);
    CATCH_REQUIRE_THROWS_WITH(dt::load_train_state(forged_path, {{"a", fresh_a}, {"b", fresh_b}}, fresh),
                              Catch::Contains(forged_path) && Catch::Contains(message));
    CATCH_CHECK(torch::equal(fresh_a, torch::zeros({3})));  // nothing restored
    CATCH_CHECK(fresh.state().empty());
  };
  // Each of these crashed (a null dereference) or threw a foreign exception before (issue 15).
  refuses(forged("param/a", std::nullopt), "missing (1): param/a");
  refuses(forged("exp_avg/b", std::nullopt), "missing (1): exp_avg/b");
  refuses(forged("param/c", torch::zeros({3})), "unexpected (1): param/c");
  refuses(forged("exp_avg_sq/b", torch::zeros({4})), "exp_avg_sq/b (file Float [4], model Float [2, 2])");
  refuses(forged("param/a", torch::zeros({3}, torch::kInt64)), "param/a (file Long [3], model Float [3])");
  refuses(forged("step/a", torch::zeros({2}, torch::kInt64)), "step/a (file Long [2], model Long [])");
  refuses(forged("step/a", torch::tensor(-1, torch::kInt64)), "step/a (file Long [], model Long [])");
  refuses(forged("rng.cpu", torch::zeros({5}, torch::kUInt8)), "rng.cpu (file Byte [5], model Byte [");
  // The right size, but no generator's state (found by the train_state fuzz target).
  refuses(forged("rng.cpu", torch::zeros_like(saved.tensors.at("rng.cpu"))), "tensor 'rng.cpu' is not a state of this "
          "generator");
  refuses(forged("param/a", saved.tensors.at("param/a"), "deltatune.adamw_groups"),
          "no deltatune.adamw_groups metadata");
  auto groups = nlohmann::json::parse(saved.metadata.at("deltatune.adamw_groups"));
  groups[0]["lr"] = "0.001";
  auto metadata = saved.metadata;
  metadata["deltatune.adamw_groups"] = groups.dump();
  dt::write_safetensors(dir.file("groups.safetensors"), saved.tensors, metadata);
  refuses(dir.file("groups.safetensors"), "metadata deltatune.adamw_groups[0]: \"lr\" is \"0.001\", expected a finite number");
  // By name, not by position: the parameters in another order restore the same values.
  CATCH_CHECK_NOTHROW(dt::load_train_state(path, {{"b", fresh_b}, {"a", fresh_a}}, fresh));
  CATCH_CHECK(torch::equal(fresh_a, a));
  CATCH_CHECK(torch::equal(fresh_b, b));
  CATCH_CHECK(fresh.state().size() == 2);
}

CATCH_TEST_CASE("AutocastGuard runs matmuls in bf16 on the CPU while in scope", "[trainer]") {
  const auto a = torch::randn({4, 4});
  {
    dt::AutocastGuard bf16(torch::kCPU);
    CATCH_CHECK(torch::mm(a, a).scalar_type() == torch::kBFloat16);
  }
  CATCH_CHECK(torch::mm(a, a).scalar_type() == torch::kFloat32);
  CATCH_CHECK(!at::autocast::is_autocast_enabled(torch::kCPU));
}

CATCH_TEST_CASE("Trainer's autocast runs loss_fn's products in its dtype and refuses one that is not half",
                "[trainer]") {
  auto w = torch::randn({4, 1}).requires_grad_();
  std::vector<torch::ScalarType> seen;
  auto loss_fn = [&](const Batch& b) {
    const auto y = torch::mm(b.x.to(torch::kFloat), w);
    seen.push_back(y.scalar_type());
    return y.to(torch::kFloat).square().mean();
  };
  const auto x = torch::randn({128, 4}, torch::kFloat64);
  const auto options = dt::TrainerOptions().max_steps(2).lr(1e-3).progress(false);
  dt::Trainer<Batch>(dt::TrainerOptions(options).autocast(torch::kBFloat16), {{"w", w}}, loss_fn,
                     logistic_source(x, x.select(1, 0)))
      .fit();
  CATCH_CHECK(seen == std::vector<torch::ScalarType>{torch::kBFloat16, torch::kBFloat16});
  CATCH_CHECK(w.scalar_type() == torch::kFloat32);  // the weights stay float32
  CATCH_CHECK(!at::autocast::is_autocast_enabled(torch::kCPU));
  seen.clear();
  dt::Trainer<Batch>(options, {{"w", w}}, loss_fn, logistic_source(x, x.select(1, 0))).fit();
  CATCH_CHECK(seen == std::vector<torch::ScalarType>{torch::kFloat32, torch::kFloat32});
  CATCH_REQUIRE_THROWS_WITH(
      dt::Trainer<Batch>(dt::TrainerOptions(options).autocast(torch::kFloat64), {{"w", w}}, loss_fn,
                         logistic_source(x, x.select(1, 0))),
      Catch::Contains("autocast in Double: give kBFloat16 or kHalf"));
}

CATCH_TEST_CASE("Trainer learns a logistic regression and writes its log and plot", "[trainer]") {
  dt::testing::TempDir dir;
  Logistic problem;
  const double before = problem.accuracy();
  int saves = 0;
  dt::Trainer<Batch> trainer(dt::TrainerOptions().epochs(10).lr(0.2).warmup_ratio(0.1).accumulation_steps(3)
                                 .output_dir(dir.path.string()).progress(false).log_every(2),
                             {{"w", problem.w}, {"b", problem.b}}, [&](const Batch& batch) { return problem.loss(batch); },
                             logistic_source(problem.x, problem.y), [&] { return problem.accuracy(); },
                             [&](const std::string& best) {
                               ++saves;
                               CATCH_CHECK(best == dir.file("best"));
                             });
  const auto summary = trainer.fit();
  CATCH_CHECK(summary.steps == 30);  // 10 epochs of ceil(8 / 3) updates
  CATCH_CHECK(trainer.schedule().warmup == 3);
  CATCH_CHECK(summary.best_metric > 0.9);
  CATCH_CHECK(before < 0.9);
  CATCH_CHECK(saves >= 1);
  CATCH_CHECK(summary.seconds_per_epoch.size() == 10);
  CATCH_CHECK(summary.peak_rss_bytes > 0);
  const auto log = dt::read_jsonl(dir.file("log.jsonl"));
  CATCH_CHECK(std::count_if(log.begin(), log.end(), [](const auto& r) { return r.contains("eval"); }) == 10);
  CATCH_CHECK(std::filesystem::exists(dir.file("curves.png")));
  CATCH_CHECK(std::filesystem::exists(dir.file("last/train_state.safetensors")));
}

CATCH_TEST_CASE("Trainer stops early after `patience` evaluations without improvement", "[trainer]") {
  Logistic problem;
  const std::vector<double> metrics{0.5, 0.7, 0.6, 0.7, 0.65, 0.9};
  std::size_t evals = 0;
  auto trainer = problem.trainer(dt::TrainerOptions().max_steps(100).eval_every(2).patience(3).progress(false),
                                 [&] { return metrics.at(evals++); });
  const auto summary = trainer.fit();
  CATCH_CHECK(summary.stopped_early);
  CATCH_CHECK(evals == 5);  // 0.7 at the 2nd, then 0.6, 0.7 (not better), 0.65
  CATCH_CHECK(summary.best_metric == 0.7);
  CATCH_CHECK(summary.best_step == 4);
  CATCH_CHECK(summary.steps == 10);
}

CATCH_TEST_CASE("Trainer seeds the global generator only when given a seed", "[trainer]") {
  const auto options = dt::TrainerOptions().max_steps(6).progress(false);
  // Unset, a run that draws nothing (no dropout here) leaves the caller's stream going on as if
  // it had not happened; a reseed to any fixed value would break that for one of two seeds.
  for (const uint64_t caller_seed : {1u, 2u}) {
    Logistic problem;
    torch::manual_seed(caller_seed);
    dt::Trainer<Batch>(options, {{"w", problem.w}, {"b", problem.b}},
                       [&](const Batch& batch) {
                         return torch::binary_cross_entropy_with_logits(batch.x.matmul(problem.w) + problem.b, batch.y);
                       },
                       logistic_source(problem.x, problem.y))
        .fit();
    const auto after = torch::rand({8});
    torch::manual_seed(caller_seed);
    CATCH_CHECK(torch::equal(after, torch::rand({8})));
  }
  // With the dropout in Logistic's loss: set, a seed gives one run whatever the generator held;
  // unset, the run follows the caller's generator.
  const auto run = [&](std::optional<uint64_t> seed, uint64_t caller_seed) {
    Logistic problem;
    torch::manual_seed(caller_seed);
    problem.trainer(dt::TrainerOptions(options).seed(seed)).fit();
    return problem.w.detach().clone();
  };
  CATCH_CHECK(torch::equal(run(5, 1), run(5, 2)));
  CATCH_CHECK_FALSE(torch::equal(run(std::nullopt, 1), run(std::nullopt, 2)));
  CATCH_CHECK(torch::equal(run(std::nullopt, 5), run(5, 1)));
}

CATCH_TEST_CASE("Trainer resumes an interrupted run to the same result", "[trainer]") {
  // Losses are logged every 4 updates and the state saved every 5: the state of update 10 holds
  // a window of two losses, and the crash in update 13 comes after the log line of update 12.
  const auto options = [](const std::string& dir) {
    return dt::TrainerOptions().max_steps(20).eval_every(5).log_every(4).lr(0.05).warmup_steps(3)
        .accumulation_steps(2).seed(7).output_dir(dir).progress(false);
  };
  dt::testing::TempDir whole, parts;
  Logistic a;
  const auto full = a.trainer(options(whole.path)).fit();

  Logistic b;
  int64_t calls = 0;
  dt::Trainer<Batch> crashing(options(parts.path), {{"w", b.w}, {"b", b.b}},
                              [&](const Batch& batch) {
                                // Dies in the middle of update 13, after the state of update 10 was saved.
                                if (++calls == 25) throw std::runtime_error("killed");
                                return b.loss(batch);
                              },
                              logistic_source(b.x, b.y), [&] { return b.accuracy(); });
  CATCH_REQUIRE_THROWS_WITH(crashing.fit(), "killed");
  // What a kill leaves besides: a torn last log line and a temporary of the next state.
  std::ofstream(parts.file("log.jsonl"), std::ios::app) << R"({"step": 13, "lo)";
  parts.write("last/train_state.safetensors.tmp-" + std::to_string(dead_pid()), "half-written");

  Logistic c;  // a new process: fresh tensors, the state comes from the file
  torch::manual_seed(12345);
  const auto resumed = c.trainer(options(parts.path)).fit();
  CATCH_CHECK(resumed.resumed_from == 10);
  CATCH_CHECK(resumed.steps == 20);
  CATCH_CHECK(torch::equal(c.w, a.w));
  CATCH_CHECK(torch::equal(c.b, a.b));
  CATCH_CHECK(resumed.best_metric == full.best_metric);
  CATCH_CHECK(resumed.best_step == full.best_step);
  // The log and curves too: the records after update 10 are not repeated, and the loss logged
  // at update 12 averages updates 9 to 12, as the uninterrupted run's does.
  const auto records = [](const std::string& dir, const char* field) {
    std::vector<nlohmann::json> out;
    for (const auto& r : dt::read_jsonl(dir + "/log.jsonl"))
      if (r.contains(field)) out.push_back(r);
    return out;
  };
  const auto losses = records(parts.path, "loss");
  CATCH_CHECK(losses.size() == 5);  // updates 4, 8, 12, 16, 20, each once
  CATCH_CHECK(losses == records(whole.path, "loss"));
  CATCH_CHECK(records(parts.path, "eval") == records(whole.path, "eval"));
  CATCH_CHECK((slurp(parts.file("curves.png")) == slurp(whole.file("curves.png"))));
  for (const auto& entry : std::filesystem::directory_iterator(parts.file("last")))
    CATCH_CHECK(entry.path().filename().string().find(".tmp-") == std::string::npos);

  // Changed options cannot continue the saved run.
  Logistic d;
  CATCH_REQUIRE_THROWS_WITH(d.trainer(options(parts.path).max_steps(30)).fit(), Catch::Contains("resume with the same options"));

  // Nor can a state whose JSON was edited: refused by field, not with nlohmann's exception.
  const auto state_path = parts.file("last/train_state.safetensors");
  auto state = dt::read_safetensors(state_path);
  auto json = nlohmann::json::parse(state.metadata.at("deltatune.train_state"));
  json["step"] = "10";
  state.metadata["deltatune.train_state"] = json.dump();
  dt::write_safetensors(state_path, state.tensors, state.metadata);
  Logistic e;
  CATCH_REQUIRE_THROWS_WITH(e.trainer(options(parts.path)).fit(),
                            Catch::Contains(state_path + ": metadata deltatune.train_state: \"step\" is \"10\", "
                                            "expected an integer"));
}

CATCH_TEST_CASE("LossScaler's scale moves as torch.amp.GradScaler's update kernel moves it", "[trainer][loss_scale]") {
  // The reference is GradScaler's own kernel (aten::_amp_update_scale_), fed the same overflow
  // pattern; factors that are not powers of two so that float32's rounding shows, and a run of
  // growth into float32's limit, where GradScaler stops growing.
  const auto follow = [](const dt::LossScaleOptions& o, const std::vector<bool>& finite) {
    dt::LossScaler ours(o);
    auto scale = torch::full({1}, o.init_scale(), torch::kFloat);
    auto tracker = torch::zeros({1}, torch::kInt);
    for (size_t i = 0; i < finite.size(); ++i) {
      ours.update(finite[i]);
      at::_amp_update_scale_(scale, tracker, torch::full({1}, finite[i] ? 0.0 : 1.0), o.growth_factor(),
                             o.backoff_factor(), o.growth_interval());
      CATCH_INFO("update " << i);
      CATCH_CHECK(ours.scale() == scale.item<float>());
      CATCH_CHECK(ours.growth_tracker() == tracker.item<int>());
    }
  };
  std::vector<bool> pattern;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(5);
  for (int i = 0; i < 200; ++i) pattern.push_back(torch::rand({1}, gen).item<double>() > 0.15);
  follow(dt::LossScaleOptions().init_scale(1000).growth_factor(1.7).backoff_factor(0.3).growth_interval(3), pattern);
  follow(dt::LossScaleOptions().init_scale(std::ldexp(1.0, 120)).growth_interval(1), std::vector<bool>(12, true));
  follow(dt::LossScaleOptions(), std::vector<bool>(4001, true));

  for (const auto& [options, field] :
       {std::pair(dt::LossScaleOptions().init_scale(0), "init_scale"), std::pair(dt::LossScaleOptions().init_scale(1e39), "init_scale"),
        std::pair(dt::LossScaleOptions().growth_factor(1), "growth_factor"),
        std::pair(dt::LossScaleOptions().backoff_factor(1), "backoff_factor"),
        std::pair(dt::LossScaleOptions().growth_interval(0), "growth_interval")})
    CATCH_CHECK_THROWS_WITH(dt::LossScaler(options), Catch::Contains(std::string("LossScaleOptions: ") + field));
}

CATCH_TEST_CASE("LossScaler divides every gradient by the scale and finds an inf or a NaN in any", "[trainer][loss_scale]") {
  auto a = torch::randn({3, 4}).requires_grad_(), b = torch::randn({5}, torch::kFloat64).requires_grad_();
  auto none = torch::randn({2}).requires_grad_();  // no gradient: left alone
  const dt::LossScaler scaler(dt::LossScaleOptions().init_scale(1024));
  scaler.scale((a * a).sum() + b.sum()).backward();
  CATCH_CHECK(torch::equal(a.grad(), 2 * a.detach() * 1024));
  CATCH_REQUIRE(scaler.unscale({a, b, none}));
  CATCH_CHECK(torch::equal(a.grad(), 2 * a.detach()));  // a power of two: exactly
  CATCH_CHECK(torch::equal(b.grad(), torch::ones_like(b)));
  CATCH_CHECK(!none.grad().defined());
  for (const double bad : {std::numeric_limits<double>::infinity(), std::nan("")}) {
    b.mutable_grad()[2] = bad;
    CATCH_CHECK_FALSE(scaler.unscale({a, b}));
    b.mutable_grad()[2] = 0;
  }
}

CATCH_TEST_CASE("Trainer with loss scaling trains as without it, skips an update whose gradients overflow, and "
                "resumes with the scale", "[trainer][loss_scale]") {
  // Scaling by a power of two and back is exact: a run with scaling ends where one without does.
  const auto plain = dt::TrainerOptions().max_steps(8).lr(0.05).seed(7).progress(false);
  const auto scaled = dt::TrainerOptions(plain).loss_scale(dt::LossScaleOptions().growth_interval(3));
  Logistic a, b;
  a.trainer(plain).fit();
  const auto summary = b.trainer(scaled).fit();
  CATCH_CHECK(torch::equal(a.w, b.w));
  CATCH_CHECK(torch::equal(a.b, b.b));
  CATCH_CHECK(summary.skipped_updates == 0);
  CATCH_CHECK(summary.loss_scale == 65536.0 * 4);  // grown after updates 3 and 6

  // Update 2's gradient overflows (its loss is finite): the tensors keep their values, the
  // scale halves, the log says so, and the scale grows again after 3 finite updates.
  const auto overflowing = [](Logistic& problem, int64_t& calls, int64_t die_at) {
    return [&problem, &calls, die_at](const Batch& batch) {
      if (++calls == die_at) throw std::runtime_error("killed");
      const auto loss = problem.loss(batch);
      if (calls != 2) return loss;
      return loss + 1e305 * (problem.w.sum() - problem.w.sum().detach());
    };
  };
  const auto options = [&](const std::string& dir) {
    return dt::TrainerOptions(scaled).eval_every(4).output_dir(dir);
  };
  dt::testing::TempDir whole, parts;
  Logistic c;
  int64_t calls = 0;
  std::vector<torch::Tensor> w_before;
  auto loss = overflowing(c, calls, -1);
  const auto recording = [&](const Batch& batch) {
    w_before.push_back(c.w.detach().clone());
    return loss(batch);
  };
  const auto full = dt::Trainer<Batch>(options(whole.path), {{"w", c.w}, {"b", c.b}}, recording,
                                       logistic_source(c.x, c.y), [&] { return c.accuracy(); })
                        .fit();
  CATCH_CHECK(full.skipped_updates == 1);
  CATCH_CHECK(torch::equal(w_before[1], w_before[2]));  // update 2 changed nothing
  CATCH_CHECK_FALSE(torch::equal(w_before[2], w_before[3]));
  CATCH_CHECK(full.loss_scale == 131072.0);  // halved at 2, doubled after 3 to 5 and after 6 to 8
  const auto log = dt::read_jsonl(whole.file("log.jsonl"));
  const auto skipped = std::find_if(log.begin(), log.end(), [](const auto& r) { return r.contains("skipped"); });
  CATCH_REQUIRE(skipped != log.end());
  CATCH_CHECK(skipped->at("step") == 2);
  CATCH_CHECK(skipped->at("loss_scale") == 32768.0);

  // Killed in update 7, after the state of update 4: the resumed run restores the scale and
  // its tracker, and ends where the whole run did.
  Logistic d;
  int64_t calls_d = 0;
  CATCH_REQUIRE_THROWS_WITH(dt::Trainer<Batch>(options(parts.path), {{"w", d.w}, {"b", d.b}},
                                               overflowing(d, calls_d, 7), logistic_source(d.x, d.y),
                                               [&] { return d.accuracy(); })
                                .fit(),
                            "killed");
  Logistic e;
  int64_t calls_e = 2;  // past the overflowing update
  const auto resumed = dt::Trainer<Batch>(options(parts.path), {{"w", e.w}, {"b", e.b}},
                                          overflowing(e, calls_e, -1), logistic_source(e.x, e.y),
                                          [&] { return e.accuracy(); })
                           .fit();
  CATCH_CHECK(resumed.resumed_from == 4);
  CATCH_CHECK(resumed.loss_scale == full.loss_scale);
  CATCH_CHECK(torch::equal(e.w, c.w));
  CATCH_CHECK(torch::equal(e.b, c.b));
}

CATCH_TEST_CASE("Trainer removes stale temporaries of atomic writes, and only those, when it starts",
                "[trainer][atomic_file]") {
  CATCH_CHECK(dt::detail::temporary_file_pid("log.jsonl.tmp-123") == 123);
  for (const char* name : {"log.jsonl", ".tmp-123", "log.jsonl.tmp-", "log.jsonl.tmp-12a", "x.tmp-99999999999"})
    CATCH_CHECK(dt::detail::temporary_file_pid(name) == -1);

  dt::testing::TempDir dir;
  for (const char* sub : {"last", "best", "best/head"}) std::filesystem::create_directory(dir.file(sub));
  const auto dead = std::to_string(dead_pid()), own = std::to_string(::getpid()), live = std::to_string(::getppid());
  const std::vector<std::string> stale{"log.jsonl.tmp-" + dead, "last/train_state.safetensors.tmp-" + dead,
                                       "best/head/adapter_model.safetensors.tmp-" + own};
  const std::vector<std::string> kept{"curves.png.tmp-" + live, "notes.tmp-12ab", ".tmp-" + dead, "data.tmp-",
                                      "best/x.tmp-99999999999"};
  for (const auto& name : stale) dir.write(name, "half-written");
  for (const auto& name : kept) dir.write(name, "not ours to remove");
  Logistic problem;
  problem.trainer(dt::TrainerOptions().max_steps(2).output_dir(dir.path.string()).progress(false)).fit();
  for (const auto& name : stale) CATCH_CHECK_FALSE(std::filesystem::exists(dir.file(name)));
  for (const auto& name : kept) CATCH_CHECK(std::filesystem::exists(dir.file(name)));
  CATCH_CHECK(std::filesystem::exists(dir.file("last/train_state.safetensors")));
}


// One AdamW update of x (W + B A)^T + c from seeded starting values, the tensors named as given
// (A, B, c): their changes. AdamW's first step is sign-like of size lr, so each change scales
// with its tensor's rate, and the tests compare changes between options.
struct OneUpdate {
  torch::Tensor x, target, W, A0, B0, c0;
  explicit OneUpdate(uint64_t seed) {
    torch::manual_seed(seed);
    x = torch::randn({16, 4}, torch::kFloat64), target = torch::randn({16, 3}, torch::kFloat64);
    W = torch::randn({3, 4}, torch::kFloat64);
    A0 = torch::randn({2, 4}, torch::kFloat64), B0 = torch::randn({3, 2}, torch::kFloat64);
    c0 = torch::randn({3}, torch::kFloat64);
  }
  std::vector<torch::Tensor> changes(const dt::TrainerOptions& options, const std::vector<std::string>& names,
                                     size_t groups) const {
    auto A = A0.clone().requires_grad_(), B = B0.clone().requires_grad_(), c = c0.clone().requires_grad_();
    dt::Trainer<Batch> trainer(dt::TrainerOptions(options).max_steps(1).max_grad_norm(0).progress(false),
                               {{names[0], A}, {names[1], B}, {names[2], c}},
                               [&](const Batch&) { return (torch::nn::functional::linear(x, W + B.mm(A), c) - target)
                                                        .pow(2).mean(); },
                               {1, [](int64_t, int64_t) { return Batch{}; }});
    trainer.fit();
    CATCH_CHECK(trainer.optimizer().param_groups().size() == groups);
    return {(A - A0).detach(), (B - B0).detach(), (c - c0).detach()};
  }
};

CATCH_TEST_CASE("LoRA+ moves B matrices and 1-D tensors at lr x ratio, the rest at lr", "[trainer][loraplus]") {
  // B's and c's changes scale by the ratio, A's does not; peft's create_loraplus_optimizer
  // sorts "lora_B" and ndim == 1 into the faster group.
  const OneUpdate problem(3);
  const std::vector<std::string> names{"q.lora_A", "q.lora_B", "q.bias"};
  const auto step = [&](double ratio) {
    return problem.changes(dt::TrainerOptions().lr(1e-2).loraplus_lr_ratio(ratio), names, ratio == 1 ? 1 : 2);
  };
  const auto plain = step(1), plus = step(16);
  dt::testing::check_matches(plus[0], plain[0], "A's change");
  dt::testing::check_matches(plus[1], plain[1] * 16, "B's change");
  dt::testing::check_matches(plus[2], plain[2] * 16, "the bias's change");
  CATCH_CHECK(plain[1].abs().min().item<double>() > 0);
  CATCH_CHECK(dt::loraplus_fast("encoder.q.lora_B", torch::zeros({3, 2})));
  CATCH_CHECK(dt::loraplus_fast("encoder.q.lora_magnitude_vector", torch::zeros({3})));
  CATCH_CHECK_FALSE(dt::loraplus_fast("encoder.q.lora_A", torch::zeros({2, 4})));
  CATCH_REQUIRE_THROWS_WITH(step(0), Catch::Contains("loraplus_lr_ratio must be a positive number"));
}

CATCH_TEST_CASE("lr_groups give the tensors a prefix names their own rate, ahead of LoRA+", "[trainer][lr_groups]") {
  // The bias is the head's (a group at 3 lr), so LoRA+ does not touch it.
  const OneUpdate problem(4);
  const std::vector<std::string> names{"deltas.lora.q.lora_A", "deltas.lora.q.lora_B", "classifier.bias"};
  const auto head = std::vector<dt::LrGroup>{{"classifier.", 3e-2}};
  const auto plain = problem.changes(dt::TrainerOptions().lr(1e-2), names, 1);
  const auto grouped = problem.changes(dt::TrainerOptions().lr(1e-2).lr_groups(head), names, 2);
  const auto both = problem.changes(dt::TrainerOptions().lr(1e-2).lr_groups(head).loraplus_lr_ratio(16), names, 3);
  dt::testing::check_matches(grouped[0], plain[0], "A's change, grouped");
  dt::testing::check_matches(grouped[1], plain[1], "B's change, grouped");
  dt::testing::check_matches(grouped[2], plain[2] * 3, "the head's change, grouped");
  dt::testing::check_matches(both[0], plain[0], "A's change, with LoRA+");
  dt::testing::check_matches(both[1], plain[1] * 16, "B's change, with LoRA+");
  dt::testing::check_matches(both[2], plain[2] * 3, "the head's change, with LoRA+");
  CATCH_CHECK(plain[2].abs().min().item<double>() > 0);

  // A prefix that names nothing, a rate that is no positive number: refused, by name.
  CATCH_REQUIRE_THROWS_WITH(problem.changes(dt::TrainerOptions().lr_groups({{"classifer.", 1e-3}}), names, 0),
                            Catch::Contains("the prefix 'classifer.' starts no trainable tensor's name") &&
                                Catch::Contains("'deltas.lora.q.lora_A'"));
  CATCH_REQUIRE_THROWS_WITH(problem.changes(dt::TrainerOptions().lr_groups({{"classifier.", 0}}), names, 0),
                            Catch::Contains("the group 'classifier.' has lr 0"));
  CATCH_REQUIRE_THROWS_WITH(problem.changes(dt::TrainerOptions().lr(-1), names, 0),
                            Catch::Contains("lr must be a positive number"));
}

CATCH_TEST_CASE("LoRA+ gives each tensor the rate peft's create_loraplus_optimizer gives it", "[trainer][loraplus][golden]") {
  const auto dir = deltatune::testing::golden_dir("loraplus");
  if (!dir) return;
  const auto golden = dt::read_json_file(*dir / "loraplus.json");
  auto bert = deltatune::backbones::load_bert((*dir / "bert").string());
  dt::DeltaModel model(bert);
  model.add("dora", dt::LoRAOptions().r(2).alpha(4).use_dora(true), "query|value");
  const auto named = model.named_trainable_parameters();
  dt::Trainer<Batch> trainer(dt::TrainerOptions().max_steps(1).lr(golden.at("lr")).loraplus_lr_ratio(golden.at("ratio"))
                                 .progress(false),
                             named, [](const Batch&) { return torch::zeros({}); },
                             {1, [](int64_t, int64_t) { return Batch{}; }});
  std::map<const void*, double> lr_of;  // by tensor
  for (auto& group : trainer.optimizer().param_groups())
    for (const auto& p : group.params()) lr_of[p.unsafeGetTensorImpl()] = group.options().get_lr();
  const auto& lrs = golden.at("lrs");
  CATCH_REQUIRE(named.size() == lrs.size());
  for (const auto& [name, tensor] : named) {
    const auto path = name.substr(std::string("deltas.dora.").size());  // peft's module path and tensor name
    CATCH_INFO("tensor " << name);
    CATCH_REQUIRE(lrs.contains(path));
    CATCH_CHECK(lr_of.at(tensor.unsafeGetTensorImpl()) == lrs.at(path).get<double>());
  }
}

}  // namespace train_test
