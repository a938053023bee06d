// Tests of train/glue.hpp (TSV readers, T5 text-to-text) and train/metrics.hpp (golden: sklearn, scipy).
#include <deltatune/train/glue.hpp>
#include <deltatune/train/metrics.hpp>

#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

#include "test_support.hpp"

namespace glue_test {

namespace dt = deltatune;

namespace {

// A TSV file in the temporary folder, removed when the test ends.
struct TempTsv {
  std::string path;
  explicit TempTsv(const std::string& name, const std::string& text)
      : path((std::filesystem::temp_directory_path() / ("deltatune_glue_" + name)).string()) {
    std::ofstream(path, std::ios::binary) << text;
  }
  ~TempTsv() { std::remove(path.c_str()); }
};

}  // namespace

CATCH_TEST_CASE("GLUE readers parse each task's layout from small files", "[glue]") {
  TempTsv cola("cola.tsv", "gj04\t1\t\tThe sailors rode the breeze.\ngj04\t0\t*\tThe more books.\n");
  auto examples = dt::read_glue_tsv(dt::glue_task("cola"), cola.path);
  CATCH_REQUIRE(examples.size() == 2);
  CATCH_CHECK(examples[0].text_a == "The sailors rode the breeze.");
  CATCH_CHECK(!examples[0].text_b.has_value());
  CATCH_CHECK(examples[1].label == 0);

  TempTsv cola_test("cola_test.tsv", "index\tsentence\n0\tBill whistled past the house.\n");
  CATCH_CHECK(dt::read_glue_tsv(dt::glue_task("cola"), cola_test.path, /*labelled=*/false).at(0).label == -1);

  // MRPC: byte order mark, header with spaces and '#', quotes that are text, CRLF endings.
  TempTsv mrpc("mrpc.tsv", "\xEF\xBB\xBFQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\r\n1\t1\t2\t\"A\" b\tc \"d\r\n");
  examples = dt::read_glue_tsv(dt::glue_task("MRPC"), mrpc.path);
  CATCH_REQUIRE(examples.size() == 1);
  CATCH_CHECK(examples[0].text_a == "\"A\" b");
  CATCH_CHECK(*examples[0].text_b == "c \"d");
  CATCH_CHECK(examples[0].label == 1);

  TempTsv stsb("stsb.tsv", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
                           "0\tg\tf\t2012\t1\tn\tn\tA plane.\tAn air plane.\t3.800\n");
  examples = dt::read_glue_tsv(dt::glue_task("stsb"), stsb.path);
  CATCH_CHECK(examples.at(0).score == 3.8);
  CATCH_CHECK(examples[0].label == -1);

  // MNLI dev: five annotator labels, the gold one by name; label order as HF's glue.
  TempTsv mnli("mnli.tsv", "index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tlabel2\t"
                           "label3\tlabel4\tlabel5\tgold_label\n0\t1\t1e\tslate\t(\t(\t(\t(\tPremise.\tHypothesis.\t"
                           "neutral\tentailment\tneutral\tneutral\tneutral\tneutral\n");
  examples = dt::read_glue(std::filesystem::temp_directory_path().string(), "mnli", "deltatune_glue_mnli");
  CATCH_CHECK(examples.at(0).label == 1);
  CATCH_CHECK(examples[0].text_a == "Premise.");

  TempTsv qnli("qnli.tsv", "index\tquestion\tsentence\tlabel\n0\tWho?\tHe.\tnot_entailment\n");
  CATCH_CHECK(dt::read_glue_tsv(dt::glue_task("qnli"), qnli.path).at(0).label == 1);
}

CATCH_TEST_CASE("GLUE readers name the file, line and fix in their errors", "[glue]") {
  const auto& sst2 = dt::glue_task("sst2");
  CATCH_REQUIRE_THROWS_WITH(dt::read_glue_tsv(sst2, "/nonexistent/dev.tsv"),
                            Catch::Contains("cannot open /nonexistent/dev.tsv"));
  TempTsv columns("columns.tsv", "sentence\tlabel\ngood\t1\nbad\t0\textra\n");
  CATCH_REQUIRE_THROWS_WITH(dt::read_glue_tsv(sst2, columns.path),
                            Catch::Contains(columns.path + ":3: 3 tab-separated fields where the header expects 2"));
  TempTsv label("label.tsv", "sentence\tlabel\ngood\tpositive\n");
  CATCH_REQUIRE_THROWS_WITH(dt::read_glue_tsv(sst2, label.path),
                            Catch::Contains(label.path + ":2: unknown sst2 label 'positive'") &&
                                Catch::Contains("the labels are 0, 1"));
  TempTsv header("header.tsv", "text\tlabel\ngood\t1\n");
  CATCH_REQUIRE_THROWS_WITH(dt::read_glue_tsv(sst2, header.path), Catch::Contains("has no column 'sentence'"));
  // Only a header: the examples took .front() of the empty list and crashed (issue 15).
  TempTsv empty("empty.tsv", "sentence\tlabel\n");
  CATCH_REQUIRE_THROWS_WITH(dt::read_glue_tsv(sst2, empty.path),
                            Catch::Contains(empty.path + ": holds no examples (only its header line)"));
  TempTsv blank("blank.tsv", "");
  CATCH_REQUIRE_THROWS_WITH(dt::read_glue_tsv(dt::glue_task("cola"), blank.path),
                            Catch::Contains(blank.path + ": holds no examples"));
  // A misnamed label column read as a test split's: every label -1, T5 trained on "<unk>".
  TempTsv misnamed("misnamed.tsv", "sentence\tlabels\ngood\t1\n");
  CATCH_REQUIRE_THROWS_WITH(dt::read_glue_tsv(sst2, misnamed.path),
                            Catch::Contains(misnamed.path + ":1: the header has no label column 'label'") &&
                                Catch::Contains("the columns are sentence, labels"));
  CATCH_CHECK(dt::read_glue_tsv(sst2, misnamed.path, /*labelled=*/false).at(0).label == -1);
  dt::testing::TempDir folder;  // read_glue: only a test split may lack labels
  folder.write("test.tsv", "index\tsentence\n0\tgood\n");
  folder.write("dev.tsv", "index\tsentence\n0\tgood\n");
  CATCH_CHECK(dt::read_glue(folder.path.string(), "sst2", "test").at(0).label == -1);
  CATCH_REQUIRE_THROWS_WITH(dt::read_glue(folder.path.string(), "sst2", "dev"),
                            Catch::Contains(folder.file("dev.tsv") + ":1: the header has no label column"));
  // STS-B's similarity is a finite number in [0, 5]; strtod alone read these.
  for (const char* score : {"nan", "1e999", "-3", "inf", "5.2"}) {
    TempTsv stsb("stsb_bad.tsv", std::string("sentence1\tsentence2\tscore\nA.\tB.\t2.5\nC.\tD.\t") + score + "\n");
    CATCH_REQUIRE_THROWS_WITH(dt::read_glue_tsv(dt::glue_task("stsb"), stsb.path),
                              Catch::Contains(stsb.path + ":3: score '" + score + "' in column 'score' is not within [0, 5]"));
  }
  TempTsv stsb_edges("stsb_edges.tsv", "sentence1\tsentence2\tscore\nA.\tB.\t0\nC.\tD.\t5.000\n");
  CATCH_CHECK(dt::read_glue_tsv(dt::glue_task("stsb"), stsb_edges.path).at(1).score == 5.0);
  CATCH_REQUIRE_THROWS_WITH(dt::glue_task("wnli"), Catch::Contains("unknown GLUE task 'wnli'"));
  CATCH_REQUIRE_THROWS_AS(dt::glue_task("wnli"), dt::OptionError);
}

CATCH_TEST_CASE("GLUE readers read the real GLUE files", "[glue][data]") {
  struct Expected {
    const char* task;
    const char* split;
    std::size_t count;
  };
  // Line counts minus the header (CoLA's train and dev have none).
  for (const auto& e : {Expected{"cola", "train", 8551}, Expected{"cola", "dev", 1043}, Expected{"sst2", "train", 67349},
                        Expected{"sst2", "dev", 872}, Expected{"mrpc", "train", 3668}, Expected{"mrpc", "dev", 408},
                        Expected{"stsb", "train", 5749}, Expected{"stsb", "dev", 1500}}) {
    const auto& task = dt::glue_task(e.task);
    const auto folder = deltatune::testing::shared_data("glue/" + task.folder);
    if (!folder) return;
    const auto examples = dt::read_glue(folder->string(), e.task, e.split);
    CATCH_CHECK(examples.size() == e.count);
    for (const auto& example : examples) {
      CATCH_REQUIRE(!example.text_a.empty());
      CATCH_REQUIRE(example.text_b.has_value() == !task.text_b.empty());
      if (task.regression())
        CATCH_REQUIRE((example.score >= 0 && example.score <= 5));
      else
        CATCH_REQUIRE((example.label >= 0 && example.label < task.num_labels()));
    }
  }
  if (auto mrpc = deltatune::testing::shared_data("glue/MRPC")) {
    const auto dev = dt::read_glue(mrpc->string(), "mrpc", "dev");
    CATCH_CHECK(dev[0].label == 1);
    CATCH_CHECK(dev[0].text_b->front() == '"');  // an unbalanced quote, kept as text
    CATCH_CHECK(dt::to_t5(dt::glue_task("mrpc"), dev[0]).target == "equivalent");
  }
}

CATCH_TEST_CASE("T5 text-to-text form of the GLUE tasks and its inverse", "[glue]") {
  const dt::GlueExample pair{"The premise.", std::string("The hypothesis."), 2};
  auto t5 = dt::to_t5(dt::glue_task("mnli"), pair);
  CATCH_CHECK(t5.source == "mnli hypothesis: The hypothesis. premise: The premise.");
  CATCH_CHECK(t5.target == "contradiction");
  CATCH_CHECK(dt::to_t5(dt::glue_task("sst2"), {"a film .", std::nullopt, 1}).source == "sst2 sentence: a film .");
  CATCH_CHECK(dt::to_t5(dt::glue_task("sst2"), {"a film .", std::nullopt, 1}).target == "positive");
  CATCH_CHECK(dt::to_t5(dt::glue_task("cola"), {"x", std::nullopt, 0}).target == "unacceptable");
  CATCH_CHECK(dt::to_t5(dt::glue_task("qqp"), {"q1?", std::string("q2?"), 0}).source == "qqp question1: q1? question2: q2?");
  CATCH_CHECK(dt::to_t5(dt::glue_task("qnli"), {"Who?", std::string("He."), 0}).source == "qnli question: Who? sentence: He.");
  CATCH_CHECK(dt::to_t5(dt::glue_task("rte"), {"a", std::string("b"), -1}).target == "<unk>");
  dt::GlueExample sts{"a", std::string("b")};
  sts.score = 3.8;
  t5 = dt::to_t5(dt::glue_task("stsb"), sts);
  CATCH_CHECK(t5.source == "stsb sentence1: a sentence2: b");
  CATCH_CHECK(t5.target == "3.8");
  // T5 rounds label * 5 to even in float32: 2.5 * 5 = 12.5 -> 12 -> 2.4; 0.1 -> 0.0; 4.75 -> 4.8.
  CATCH_CHECK(dt::stsb_target(2.5) == "2.4");
  CATCH_CHECK(dt::stsb_target(0.1) == "0.0");
  CATCH_CHECK(dt::stsb_target(4.75) == "4.8");
  CATCH_CHECK(dt::stsb_target(5.0) == "5.0");
  CATCH_CHECK(dt::from_t5_label(dt::glue_task("mrpc"), "not_equivalent") == 0);
  CATCH_CHECK(dt::from_t5_label(dt::glue_task("mrpc"), "maybe") == -1);
  CATCH_CHECK(dt::from_t5_score("3.8") == 3.8);
  CATCH_CHECK(dt::from_t5_score("three") == -1.0);
  for (const auto& task : dt::glue_tasks())
    for (int64_t id = 0; id < static_cast<int64_t>(task.t5_labels.size()); ++id)
      CATCH_CHECK(dt::from_t5_label(task, dt::to_t5(task, {"a", std::string("b"), id}).target) == id);
}

CATCH_TEST_CASE("metrics match scikit-learn and scipy", "[metrics][golden]") {
  const auto dir = deltatune::testing::golden_dir("metrics");
  if (!dir) return;
  const auto golden = nlohmann::json::parse(std::ifstream(*dir / "metrics.json"));
  const auto close = [](double actual, const nlohmann::json& expected) {
    return expected.is_null() ? std::isnan(actual) : std::abs(actual - expected.get<double>()) <= 1e-12;
  };
  for (const auto& c : golden.at("classification")) {
    const auto p = c.at("predictions").get<std::vector<int64_t>>(), y = c.at("labels").get<std::vector<int64_t>>();
    CATCH_CHECK(close(dt::accuracy(p, y), c.at("accuracy")));
    CATCH_CHECK(close(dt::matthews_corrcoef(p, y), c.at("matthews_corrcoef")));
    if (!c.at("f1").is_null()) CATCH_CHECK(close(dt::f1_score(p, y), c.at("f1")));
  }
  for (const auto& c : golden.at("regression")) {
    const auto x = c.at("x").get<std::vector<double>>(), y = c.at("y").get<std::vector<double>>();
    CATCH_CHECK(close(dt::pearson(x, y), c.at("pearson")));
    CATCH_CHECK(close(dt::spearman(x, y), c.at("spearman")));
    CATCH_CHECK(close(dt::metric("spearman", x, y), c.at("spearman")));
  }
}

CATCH_TEST_CASE("metrics define their degenerate cases and check their inputs", "[metrics]") {
  CATCH_CHECK(dt::matthews_corrcoef({0, 0, 0}, {0, 1, 1}) == 0.0);
  CATCH_CHECK(dt::f1_score({0, 0}, {0, 0}) == 0.0);
  CATCH_CHECK(std::isnan(dt::pearson({1, 1, 1}, {1, 2, 3})));
  // T5's invalid prediction counts as the wrong class: here a false negative and a false positive.
  CATCH_CHECK(dt::f1_score({-1, -1, 1}, {1, 0, 1}) == 2.0 / 4.0);
  CATCH_CHECK(dt::metric("accuracy", {1, 0}, {1, 1}) == 0.5);
  CATCH_REQUIRE_THROWS_WITH(dt::accuracy({1}, {1, 0}), Catch::Contains("1 predictions for 2 labels"));
  CATCH_REQUIRE_THROWS_AS(dt::metric("bleu", {1}, {1}), dt::OptionError);
}

}  // namespace glue_test
