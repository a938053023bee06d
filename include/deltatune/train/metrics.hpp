// GLUE's metrics: accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation.
//
// Each agrees with scikit-learn / scipy to 1e-12 (tools/golden/metrics.py), degenerate cases
// included: MCC and F1 are 0 where their denominator is (sklearn), Pearson and Spearman are NaN
// for a constant input (scipy; a trainer counts NaN as no improvement). Predictions outside the
// label set (T5's -1 for an unreadable output) simply count as wrong.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#include <deltatune/core/error.hpp>

namespace deltatune {

namespace detail {

template <class T>
inline void check_metric_inputs(const char* metric, const std::vector<T>& predictions, const std::vector<T>& labels) {
  check<ShapeError>(predictions.size() == labels.size(), "{}: {} predictions for {} labels; pass one per example",
                    metric, predictions.size(), labels.size());
  check<ShapeError>(!labels.empty(), "{}: no examples", metric);
}

// Ranks 1..n with ties given the mean of the ranks they span (scipy.stats.rankdata "average").
inline std::vector<double> average_ranks(const std::vector<double>& x) {
  std::vector<std::size_t> order(x.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::size_t i, std::size_t j) { return x[i] < x[j]; });
  std::vector<double> ranks(x.size());
  for (std::size_t begin = 0, end; begin < order.size(); begin = end) {
    for (end = begin + 1; end < order.size() && x[order[end]] == x[order[begin]];) ++end;
    const double rank = 0.5 * static_cast<double>(begin + 1 + end);  // mean of begin+1 .. end
    for (std::size_t k = begin; k < end; ++k) ranks[order[k]] = rank;
  }
  return ranks;
}

}  // namespace detail

// Fraction of predictions equal to their label.
inline double accuracy(const std::vector<int64_t>& predictions, const std::vector<int64_t>& labels) {
  detail::check_metric_inputs("accuracy", predictions, labels);
  std::size_t correct = 0;
  for (std::size_t i = 0; i < labels.size(); ++i) correct += predictions[i] == labels[i];
  return static_cast<double>(correct) / static_cast<double>(labels.size());
}

// F1 of the positive class 1 (sklearn's f1_score, average="binary"); 0 when there is no true
// positive. A prediction other than 0 or 1 counts as the wrong class (T5's f1_score_with_invalid).
inline double f1_score(const std::vector<int64_t>& predictions, const std::vector<int64_t>& labels) {
  detail::check_metric_inputs("f1_score", predictions, labels);
  double tp = 0, fp = 0, fn = 0;
  for (std::size_t i = 0; i < labels.size(); ++i) {
    const bool positive = labels[i] == 1;
    const bool predicted = predictions[i] == 1 || (predictions[i] != 0 && !positive);
    tp += positive && predicted;
    fp += !positive && predicted;
    fn += positive && !predicted;
  }
  return tp == 0 ? 0.0 : 2 * tp / (2 * tp + fp + fn);
}

// Matthews correlation over any number of classes (sklearn's matthews_corrcoef, from the
// confusion matrix); 0 when predictions or labels are constant.
inline double matthews_corrcoef(const std::vector<int64_t>& predictions, const std::vector<int64_t>& labels) {
  detail::check_metric_inputs("matthews_corrcoef", predictions, labels);
  std::map<int64_t, double> true_count, predicted_count;
  double correct = 0;
  for (std::size_t i = 0; i < labels.size(); ++i) {
    true_count[labels[i]] += 1;
    predicted_count[predictions[i]] += 1;
    correct += predictions[i] == labels[i];
  }
  const double n = static_cast<double>(labels.size());
  double tp_dot = 0, tt_dot = 0, pp_dot = 0;
  for (const auto& [label, t] : true_count) {
    tt_dot += t * t;
    const auto p = predicted_count.find(label);
    if (p != predicted_count.end()) tp_dot += t * p->second;
  }
  for (const auto& [label, p] : predicted_count) pp_dot += p * p;
  const double cov_tp = correct * n - tp_dot, cov_tt = n * n - tt_dot, cov_pp = n * n - pp_dot;
  return cov_tt * cov_pp == 0 ? 0.0 : cov_tp / std::sqrt(cov_tt * cov_pp);
}

// Pearson's r (scipy.stats.pearsonr); NaN when either input is constant.
inline double pearson(const std::vector<double>& x, const std::vector<double>& y) {
  detail::check_metric_inputs("pearson", x, y);
  const double n = static_cast<double>(x.size());
  const double mx = std::accumulate(x.begin(), x.end(), 0.0) / n;
  const double my = std::accumulate(y.begin(), y.end(), 0.0) / n;
  double sxy = 0, sxx = 0, syy = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    sxy += (x[i] - mx) * (y[i] - my);
    sxx += (x[i] - mx) * (x[i] - mx);
    syy += (y[i] - my) * (y[i] - my);
  }
  if (sxx == 0 || syy == 0) return std::numeric_limits<double>::quiet_NaN();
  return std::clamp(sxy / std::sqrt(sxx * syy), -1.0, 1.0);
}

// Spearman's rho (scipy.stats.spearmanr): Pearson's r of the average ranks; NaN when either is constant.
inline double spearman(const std::vector<double>& x, const std::vector<double>& y) {
  detail::check_metric_inputs("spearman", x, y);
  return pearson(detail::average_ranks(x), detail::average_ranks(y));
}

// The metric called `name` ("accuracy", "f1", "matthews_corrcoef", "pearson", "spearman": a
// GlueTask's `metrics`) of predictions against labels, as doubles (class ids or scores).
inline double metric(const std::string& name, const std::vector<double>& predictions, const std::vector<double>& labels) {
  if (name == "pearson") return pearson(predictions, labels);
  if (name == "spearman") return spearman(predictions, labels);
  const auto ids = [](const std::vector<double>& v) { return std::vector<int64_t>(v.begin(), v.end()); };
  if (name == "accuracy") return accuracy(ids(predictions), ids(labels));
  if (name == "f1") return f1_score(ids(predictions), ids(labels));
  detail::check<OptionError>(name == "matthews_corrcoef", "metric: unknown metric '{}'; the metrics are accuracy, "
                             "f1, matthews_corrcoef, pearson, spearman", name);
  return matthews_corrcoef(ids(predictions), ids(labels));
}

}  // namespace deltatune
