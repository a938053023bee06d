// GLUE TSV readers (the files of the GLUE distribution) and T5's text-to-text form of each task.
//
// The files are tab-separated with no quoting: a field runs to the next tab, quotes are text.
// Columns are found by the header's names, so train, dev and test files of one task (which
// differ: test has no label, MNLI's dev has five annotator labels) share one table row. CoLA's
// train and dev have no header (source, label, annotation, sentence); MRPC's files start with a
// UTF-8 byte order mark. Leaves out WNLI and the diagnostic set AX.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include <deltatune/core/error.hpp>

namespace deltatune {

// One sentence or sentence pair. `label` is the class id (-1 where the file has none, as in
// the test splits); STS-B instead has `score`, the similarity in [0, 5] (NaN where unlabelled).
struct GlueExample {
  std::string text_a;
  std::optional<std::string> text_b;
  int64_t label = -1;
  double score = std::numeric_limits<double>::quiet_NaN();
};

// T5's name for a text field and which of the example's texts it holds.
struct T5Field {
  std::string name;
  bool second;  // text_b rather than text_a
};

// What one GLUE task's files hold and how T5 casts it as text to text.
struct GlueTask {
  std::string name;                      // T5's benchmark name: "sst2", "mnli", ...
  std::string folder;                    // the GLUE distribution's folder: "SST-2", "MNLI", ...
  std::string text_a, text_b, label;     // header names of the columns; text_b "" for one sentence
  std::vector<std::string> headerless;   // column names of files without a header (CoLA), else empty
  std::vector<std::string> file_labels;  // label values as the files write them, by class id; empty: a score
  std::vector<std::string> t5_labels;    // T5's target word for each class id
  std::vector<T5Field> t5_fields;        // in T5's order: its feature names sorted alphabetically
  std::vector<std::string> metrics;      // as metrics.hpp names them, the task's main metric first
  bool regression() const { return file_labels.empty(); }
  int64_t num_labels() const { return regression() ? 1 : static_cast<int64_t>(file_labels.size()); }
};

// The eight GLUE tasks T5 and Compacter train on; label order as Hugging Face's `glue` dataset.
inline const std::vector<GlueTask>& glue_tasks() {
  static const std::vector<GlueTask> tasks = {
      {"cola", "CoLA", "sentence", "", "label", {"source", "label", "annotation", "sentence"}, {"0", "1"},
       {"unacceptable", "acceptable"}, {{"sentence", false}}, {"matthews_corrcoef"}},
      {"sst2", "SST-2", "sentence", "", "label", {}, {"0", "1"}, {"negative", "positive"},
       {{"sentence", false}}, {"accuracy"}},
      {"mrpc", "MRPC", "#1 String", "#2 String", "Quality", {}, {"0", "1"}, {"not_equivalent", "equivalent"},
       {{"sentence1", false}, {"sentence2", true}}, {"f1", "accuracy"}},
      {"stsb", "STS-B", "sentence1", "sentence2", "score", {}, {}, {},
       {{"sentence1", false}, {"sentence2", true}}, {"pearson", "spearman"}},
      {"qqp", "QQP", "question1", "question2", "is_duplicate", {}, {"0", "1"}, {"not_duplicate", "duplicate"},
       {{"question1", false}, {"question2", true}}, {"f1", "accuracy"}},
      {"mnli", "MNLI", "sentence1", "sentence2", "gold_label", {}, {"entailment", "neutral", "contradiction"},
       {"entailment", "neutral", "contradiction"}, {{"hypothesis", true}, {"premise", false}}, {"accuracy"}},
      {"qnli", "QNLI", "question", "sentence", "label", {}, {"entailment", "not_entailment"},
       {"entailment", "not_entailment"}, {{"question", false}, {"sentence", true}}, {"accuracy"}},
      {"rte", "RTE", "sentence1", "sentence2", "label", {}, {"entailment", "not_entailment"},
       {"entailment", "not_entailment"}, {{"sentence1", false}, {"sentence2", true}}, {"accuracy"}},
  };
  return tasks;
}

// The task named `name` (T5's name, "sst2", or the folder's, "SST-2"); throws OptionError otherwise.
inline const GlueTask& glue_task(const std::string& name) {
  std::vector<std::string> names;
  for (const auto& task : glue_tasks()) {
    if (task.name == name || task.folder == name) return task;
    names.push_back(task.name);
  }
  throw OptionError(fmt::format("glue_task: unknown GLUE task '{}'; the tasks are {}", name, fmt::join(names, ", ")));
}

namespace detail {

inline std::vector<std::string> split_tabs(const std::string& line) {
  std::vector<std::string> fields;
  std::size_t begin = 0;
  for (std::size_t tab; (tab = line.find('\t', begin)) != std::string::npos; begin = tab + 1)
    fields.push_back(line.substr(begin, tab - begin));
  fields.push_back(line.substr(begin));
  return fields;
}

// Position of `name` in `columns`, or -1.
inline int column_index(const std::vector<std::string>& columns, const std::string& name) {
  for (std::size_t i = 0; i < columns.size(); ++i)
    if (columns[i] == name) return static_cast<int>(i);
  return -1;
}

// Sets the label or score of `example` from the file's label field.
inline void parse_glue_label(const GlueTask& task, const std::string& value, GlueExample& example,
                             const std::string& where) {
  if (task.regression()) {
    char* end = nullptr;
    example.score = std::strtod(value.c_str(), &end);
    check(!value.empty() && *end == '\0', "{}: score '{}' in column '{}' is not a number", where, value, task.label);
    // strtod reads "nan", "inf" and "1e999" (as inf) too: none is a similarity.
    check(std::isfinite(example.score) && example.score >= 0 && example.score <= 5, "{}: score '{}' in column '{}' "
          "is not within [0, 5], {}'s similarity range", where, value, task.label, task.name);
    return;
  }
  example.label = column_index(task.file_labels, value);
  check(example.label >= 0, "{}: unknown {} label '{}' in column '{}'; the labels are {}", where, task.name, value,
        task.label, fmt::join(task.file_labels, ", "));
}

}  // namespace detail

// Reads one GLUE TSV file of `task`. `labelled` (train and dev) requires the label column;
// otherwise (a test split) a file without it gives unlabelled examples. Throws Error naming
// the file and line: missing file, missing column, a line with the wrong number of fields, an
// unknown label or a score outside [0, 5], a file with no examples.
//   auto dev = deltatune::read_glue_tsv(deltatune::glue_task("rte"), "glue/RTE/dev.tsv");
inline std::vector<GlueExample> read_glue_tsv(const GlueTask& task, const std::string& path, bool labelled = true) {
  std::ifstream in(path, std::ios::binary);
  detail::check(in.is_open(), "read_glue_tsv: cannot open {} (the {} task's TSV; download GLUE with its "
                "download_glue_data.py)", path, task.name);
  std::string line;
  std::getline(in, line);
  if (line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);  // MRPC's byte order mark
  if (!line.empty() && line.back() == '\r') line.pop_back();
  auto first = detail::split_tabs(line);
  // Headered iff the first line names the text column: CoLA's train and dev start with data.
  const bool header = detail::column_index(first, task.text_a) >= 0;
  detail::check(header || !task.headerless.empty(), "{}:1: the header has no column '{}' ({} expects columns "
                "'{}'{}); is this the {} task's file?", path, task.text_a, task.name, task.text_a,
                task.text_b.empty() ? "" : ", '" + task.text_b + "'", task.name);
  const auto columns = header ? first : task.headerless;
  const int a = detail::column_index(columns, task.text_a);
  const int b = task.text_b.empty() ? -1 : detail::column_index(columns, task.text_b);
  const int label = detail::column_index(columns, task.label);
  detail::check(task.text_b.empty() || b >= 0, "{}:1: the header has no column '{}'", path, task.text_b);
  // Without it every example would be unlabelled: T5 would learn "<unk>", BERT's loss would fail.
  detail::check(!labelled || label >= 0, "{}:1: the header has no label column '{}' (the columns are {}); {} train "
                "and dev files label every example (a test split reads with labelled = false)", path, task.label,
                fmt::join(columns, ", "), task.name);
  std::vector<GlueExample> examples;
  int64_t number = 1;
  auto add = [&](const std::string& text) {
    const auto fields = detail::split_tabs(text);
    const std::string where = fmt::format("{}:{}", path, number);
    detail::check(fields.size() == columns.size(), "{}: {} tab-separated fields where the {} expects {}; GLUE "
                  "files have no quoting, so a stray tab or line break inside a sentence breaks the line",
                  where, fields.size(), header ? "header" : task.name + " file", columns.size());
    GlueExample example;
    example.text_a = fields[a];
    if (b >= 0) example.text_b = fields[b];
    if (label >= 0) detail::parse_glue_label(task, fields[label], example, where);
    examples.push_back(std::move(example));
  };
  if (!header && !line.empty()) add(line);
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) add(line);
  }
  // A split without examples would leave training and metrics with nothing to work on.
  detail::check(!examples.empty(), "{}: holds no examples{}; is the file complete?", path,
                header ? " (only its header line)" : "");
  return examples;
}

// Reads `folder/<split>.tsv`: "train", "dev", "test" ("dev_matched", "dev_mismatched",
// "test_matched", "test_mismatched" for MNLI); only the test splits may lack labels.
//   auto train = deltatune::read_glue("glue/SST-2", "sst2", "train");
inline std::vector<GlueExample> read_glue(const std::string& folder, const std::string& task, const std::string& split) {
  return read_glue_tsv(glue_task(task), folder + "/" + split + ".tsv", /*labelled=*/split.rfind("test", 0) != 0);
}

// An example as T5 reads and writes it: "rte sentence1: ... sentence2: ..." -> "entailment".
struct T5Example {
  std::string source, target;
};

// STS-B's target as T5 writes it: the score rounded to a multiple of 0.2 with one decimal ("3.8").
// As T5's tf.round(label * 5) / 5 on float32: halves round to even.
inline std::string stsb_target(double score) {
  const float fifths = std::nearbyint(static_cast<float>(score) * 5.0f);
  return fmt::format("{:.1f}", fifths / 5.0f);
}

// T5's text-to-text form of `example` (the `glue` and `stsb` preprocessors of T5's code):
// the task name, then each field as "name: text" in T5's order; unlabelled examples get "<unk>".
inline T5Example to_t5(const GlueTask& task, const GlueExample& example) {
  T5Example out{task.name, ""};
  for (const auto& field : task.t5_fields) {
    detail::check(!field.second || example.text_b.has_value(), "to_t5: {} needs a second text ({}), the example "
                  "has none", task.name, field.name);
    out.source += " " + field.name + ": " + (field.second ? *example.text_b : example.text_a);
  }
  if (task.regression())
    out.target = std::isnan(example.score) ? "<unk>" : stsb_target(example.score);
  else
    out.target = example.label < 0 ? "<unk>" : task.t5_labels.at(static_cast<std::size_t>(example.label));
  return out;
}

// The class id T5's output `text` names, or -1 for any other text (T5 counts it as wrong).
inline int64_t from_t5_label(const GlueTask& task, const std::string& text) {
  return detail::column_index(task.t5_labels, text);
}

// STS-B's score in T5's output `text`, or -1 where it is no number (T5's string_to_float default).
inline double from_t5_score(const std::string& text) {
  char* end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  return !text.empty() && *end == '\0' ? value : -1.0;
}

}  // namespace deltatune
