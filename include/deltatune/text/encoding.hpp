// What the tokenizers return (Encoding, BatchEncoding) and the rules they share, Hugging
// Face's: special tokens found in raw text, longest-first truncation of pairs, right padding.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <deltatune/core/error.hpp>

namespace deltatune {

// Where a batch's sequences are padded to.
enum class Padding {
  kLongest,    // the longest sequence of the batch
  kMaxLength,  // EncodeOptions::max_length
};

// How a batch is encoded.
struct EncodeOptions {
  // Tokens per sequence, special tokens included; longer ones are truncated. 0: no limit.
  TORCH_ARG(int64_t, max_length) = 0;
  // Pad to the longest sequence (Hugging Face's padding=True) or to max_length.
  TORCH_ARG(Padding, padding) = Padding::kLongest;
};

// One sequence's token ids, special tokens included, and each token's segment (0 or 1).
struct Encoding {
  std::vector<int64_t> ids;
  std::vector<int64_t> type_ids;
};

// A padded batch: int64 tensors of shape (B, T).
struct BatchEncoding {
  torch::Tensor input_ids;
  torch::Tensor attention_mask;  // 1 on tokens, 0 on padding
  torch::Tensor token_type_ids;  // segment ids (0 on padding); undefined for tokenizers without segments (T5)
};

namespace detail {

// A special token as it may appear in raw text, with its id.
struct SpecialToken {
  std::string text;
  int64_t id;
};

// A stretch of text between special tokens (id -1) or one special token.
struct TextSpan {
  std::string_view text;
  int64_t special_id;
};

// Splits text at the special tokens it contains, case-sensitively and before any
// normalisation, taking at each position the leftmost and then longest match (as the
// added-token matcher of Hugging Face's tokenizers does).
inline std::vector<TextSpan> split_special_tokens(std::string_view text, const std::vector<SpecialToken>& specials) {
  std::vector<TextSpan> spans;
  std::size_t plain_from = 0;
  for (std::size_t i = 0; i < text.size();) {
    const SpecialToken* best = nullptr;
    for (const auto& s : specials) {
      if (text.compare(i, s.text.size(), s.text) == 0 && (best == nullptr || s.text.size() > best->text.size())) best = &s;
    }
    if (best == nullptr) {
      ++i;
      continue;
    }
    if (i > plain_from) spans.push_back({text.substr(plain_from, i - plain_from), -1});
    spans.push_back({text.substr(i, best->text.size()), best->id});
    i += best->text.size();
    plain_from = i;
  }
  if (plain_from < text.size()) spans.push_back({text.substr(plain_from), -1});
  return spans;
}

// The ids of text: the special tokens in it (split_special_tokens) as their ids, the text
// between them through encode_plain(std::string_view, std::vector<int64_t>& append_to).
template <class EncodePlain>
std::vector<int64_t> ids_with_special_tokens(std::string_view text, const std::vector<SpecialToken>& specials,
                                             EncodePlain&& encode_plain) {
  std::vector<int64_t> ids;
  for (const auto& span : split_special_tokens(text, specials)) {
    if (span.special_id >= 0) {
      ids.push_back(span.special_id);
    } else {
      encode_plain(span.text, ids);
    }
  }
  return ids;
}

// The room left for content once `specials` special tokens are added, or no limit (-1).
inline int64_t content_budget(int64_t max_length, int64_t specials) {
  if (max_length == 0) return -1;
  check<OptionError>(max_length >= specials,
                     "max_length {} leaves no room for the {} special tokens every sequence carries; pass at least {}",
                     max_length, specials, specials);
  return max_length - specials;
}

// How many tokens of two segments of n1 and n2 tokens to keep within `budget`, as the
// tokenizers library's longest-first strategy: cut only the longer segment if that is
// enough, else keep budget/2 of the first and the rest of the second (swapped where the
// first is the longer).
inline std::pair<int64_t, int64_t> longest_first(int64_t len1, int64_t len2, int64_t budget) {
  if (budget < 0 || len1 + len2 <= budget) return {len1, len2};
  int64_t n1 = len1, n2 = len2;
  const bool swap = n1 > n2;
  if (swap) std::swap(n1, n2);
  n2 = n1 > budget ? n1 : std::max(n1, budget - n1);
  if (n1 + n2 > budget) {
    n1 = budget / 2;
    n2 = n1 + budget % 2;
  }
  if (swap) std::swap(n1, n2);
  return {std::min(n1, len1), std::min(n2, len2)};
}

// Stacks encodings into (B, T) tensors, padding on the right with pad_id (segment 0, mask 0).
inline BatchEncoding pad_batch(const std::vector<Encoding>& encodings, const EncodeOptions& options, int64_t pad_id,
                               bool with_type_ids) {
  check<OptionError>(options.padding() != Padding::kMaxLength || options.max_length() > 0,
                     "padding to max_length needs EncodeOptions::max_length set (it is 0)");
  int64_t T = options.padding() == Padding::kMaxLength ? options.max_length() : 0;
  for (const auto& e : encodings) T = std::max<int64_t>(T, static_cast<int64_t>(e.ids.size()));
  const auto B = static_cast<int64_t>(encodings.size());
  auto ids = torch::full({B, T}, pad_id, torch::kInt64);  // (B, T)
  auto mask = torch::zeros({B, T}, torch::kInt64);
  auto types = torch::zeros({B, T}, torch::kInt64);
  auto ids_a = ids.accessor<int64_t, 2>();
  auto mask_a = mask.accessor<int64_t, 2>();
  auto types_a = types.accessor<int64_t, 2>();
  for (int64_t b = 0; b < B; ++b) {
    const auto& e = encodings[b];
    for (std::size_t t = 0; t < e.ids.size(); ++t) {
      ids_a[b][t] = e.ids[t];
      mask_a[b][t] = 1;
      if (with_type_ids) types_a[b][t] = e.type_ids[t];
    }
  }
  return {ids, mask, with_type_ids ? types : torch::Tensor()};
}

}  // namespace detail
}  // namespace deltatune
