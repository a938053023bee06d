// BERT's tokenizer, ours: the normalisation and pre-tokenisation of Hugging Face's
// BertTokenizerFast (drop control characters, space out CJK ideographs, strip accents,
// lower-case; split at whitespace and punctuation), greedy longest-match-first WordPiece
// over vocab.txt, and the [CLS] a [SEP] b [SEP] template with segment ids.
// Unicode properties come from text/unicode.hpp (its header lists the limits).
#pragma once

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <deltatune/core/error.hpp>
#include <deltatune/text/encoding.hpp>
#include <deltatune/text/unicode.hpp>

namespace deltatune {

// How text is normalised before WordPiece; the defaults are bert-base-uncased's.
struct WordPieceOptions {
  // Lower-case the text (uncased checkpoints); cased ones need false.
  TORCH_ARG(bool, lowercase) = true;
  // Strip accents (NFD, combining marks dropped); unset: as `lowercase`, as Hugging Face does.
  TORCH_ARG(std::optional<bool>, strip_accents) = std::nullopt;
  // Put spaces around CJK ideographs, so that each is a word.
  TORCH_ARG(bool, tokenize_chinese_chars) = true;
  // Longer words (in characters) become [UNK] whole.
  TORCH_ARG(int64_t, max_input_chars_per_word) = 100;
};

// Encodes text (or pairs of texts) to BERT's token ids and back, as transformers'
// BertTokenizerFast does.
//
//   deltatune::WordPieceTokenizer tok("bert-base-uncased/vocab.txt");
//   auto batch = tok.encode_batch({"The cat sat."}, {"It was tired."}, deltatune::EncodeOptions().max_length(128));
//   // batch.input_ids, batch.attention_mask, batch.token_type_ids: (B, T) int64
class WordPieceTokenizer {
 public:
  // Loads vocab.txt: one token a line, its id the line number (from 0).
  explicit WordPieceTokenizer(const std::filesystem::path& vocab_txt, WordPieceOptions options = {})
      : options_(std::move(options)), vocab_(std::make_shared<Vocabulary>(read_vocabulary(vocab_txt))) {
    for (const char* token : {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}) {
      const auto it = vocab_->ids.find(token);
      detail::check<CheckpointError>(it != vocab_->ids.end(),
                                     "WordPieceTokenizer: the vocabulary {} has no {} line; pass a BERT vocab.txt",
                                     vocab_txt.string(), token);
      specials_.push_back({token, it->second});
    }
  }

  int64_t vocab_size() const { return static_cast<int64_t>(vocab_->tokens.size()); }
  int64_t pad_id() const { return specials_[0].id; }
  int64_t unk_id() const { return specials_[1].id; }
  int64_t cls_id() const { return specials_[2].id; }
  int64_t sep_id() const { return specials_[3].id; }

  std::string id_to_token(int64_t id) const {
    detail::check<OptionError>(id >= 0 && id < vocab_size(),
                               "WordPieceTokenizer: token id {} is outside the vocabulary [0, {})", id, vocab_size());
    return vocab_->tokens[id];
  }

  // The token ids of text, without [CLS] and [SEP]; special tokens written in the text
  // ("[MASK]") become their ids.
  std::vector<int64_t> tokenize(std::string_view text) const {
    return detail::ids_with_special_tokens(text, specials_, [this](std::string_view plain, std::vector<int64_t>& ids) {
      for (const auto& word : split_words(normalize(plain))) append_wordpieces(ids, word);
    });
  }

  // The words of text WordPiece pieces: normalised, then split at whitespace and punctuation,
  // as the normalizer and pre_tokenizer of BertTokenizerFast's backend give them (special
  // tokens written in the text are not looked for here).
  std::vector<std::string> pre_tokenize(std::string_view text) const {
    std::vector<std::string> words;
    for (const auto& word : split_words(normalize(text))) words.push_back(detail::unicode::encode_utf8(word));
    return words;
  }

  // [CLS] text [SEP], cut to max_length tokens (the specials kept) unless it is 0.
  Encoding encode(std::string_view text, int64_t max_length = 0) const {
    auto a = tokenize(text);
    const int64_t budget = detail::content_budget(max_length, 2);
    if (budget >= 0 && static_cast<int64_t>(a.size()) > budget) a.resize(budget);
    return assemble(a, nullptr);
  }

  // [CLS] a [SEP] b [SEP], segment 0 then 1, cut longest first to max_length unless it is 0.
  Encoding encode(std::string_view text, std::string_view pair, int64_t max_length = 0) const {
    auto a = tokenize(text);
    auto b = tokenize(pair);
    const auto [n1, n2] = detail::longest_first(static_cast<int64_t>(a.size()), static_cast<int64_t>(b.size()),
                                                detail::content_budget(max_length, 3));
    a.resize(n1);
    b.resize(n2);
    return assemble(a, &b);
  }

  // A batch of texts as (B, T) input_ids, attention_mask and token_type_ids, padded with [PAD].
  BatchEncoding encode_batch(const std::vector<std::string>& texts, const EncodeOptions& options = {}) const {
    std::vector<Encoding> encodings;
    encodings.reserve(texts.size());
    for (const auto& text : texts) encodings.push_back(encode(text, options.max_length()));
    return detail::pad_batch(encodings, options, pad_id(), /*with_type_ids=*/true);
  }

  // A batch of pairs (texts[i], pairs[i]), as above.
  BatchEncoding encode_batch(const std::vector<std::string>& texts, const std::vector<std::string>& pairs,
                             const EncodeOptions& options = {}) const {
    detail::check<ShapeError>(texts.size() == pairs.size(),
                              "WordPieceTokenizer: {} first texts but {} second texts; pass one of each per pair",
                              texts.size(), pairs.size());
    std::vector<Encoding> encodings;
    encodings.reserve(texts.size());
    for (std::size_t i = 0; i < texts.size(); ++i) encodings.push_back(encode(texts[i], pairs[i], options.max_length()));
    return detail::pad_batch(encodings, options, pad_id(), /*with_type_ids=*/true);
  }

  // The text of ids, as Hugging Face decodes BERT: tokens joined by spaces, "##" pieces
  // glued to the one before, then its clean-up of spaces before punctuation and clitics.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = true) const {
    std::string text;
    bool first = true;
    for (int64_t id : ids) {
      if (skip_special_tokens && is_special(id)) continue;
      const std::string token = id_to_token(id);
      std::string piece;
      if (!first && token.compare(0, 2, "##") == 0) {
        piece = token.substr(2);
      } else {
        piece = (first ? "" : " ") + token;
      }
      text += clean_up_spaces(piece);  // the decoder's clean-up, token by token
      first = false;
    }
    return clean_up_spaces(text);  // transformers' clean_up_tokenization_spaces, on the whole text
  }

 private:
  struct Vocabulary {
    std::vector<std::string> tokens;
    std::unordered_map<std::string, int64_t> ids;
  };

  static Vocabulary read_vocabulary(const std::filesystem::path& vocab_txt) {
    std::ifstream in(vocab_txt, std::ios::binary);
    detail::check<CheckpointError>(in.good(), "WordPieceTokenizer: cannot open the vocabulary {}; pass a BERT vocab.txt",
                                   vocab_txt.string());
    Vocabulary vocab;
    for (std::string line; std::getline(in, line);) {
      vocab.ids[line] = static_cast<int64_t>(vocab.tokens.size());  // a repeated token keeps its last line, as HF
      vocab.tokens.push_back(line);
    }
    detail::check<CheckpointError>(!vocab.tokens.empty(), "WordPieceTokenizer: the vocabulary {} is empty",
                                   vocab_txt.string());
    return vocab;
  }

  bool is_special(int64_t id) const {
    for (const auto& s : specials_) {
      if (s.id == id) return true;
    }
    return false;
  }

  // BertNormalizer: drop NUL, U+FFFD and control characters, whitespace to ' ', spaces
  // around CJK ideographs, then strip accents, then lower-case.
  std::u32string normalize(std::string_view text) const {
    std::u32string cleaned;
    for (char32_t c : detail::unicode::decode_utf8(text)) {
      if (detail::unicode::is_dropped(c)) continue;
      const bool spaced = options_.tokenize_chinese_chars() && detail::unicode::is_cjk(c);
      if (spaced) cleaned += U' ';
      cleaned += detail::unicode::is_whitespace(c) ? U' ' : c;
      if (spaced) cleaned += U' ';
    }
    if (options_.strip_accents().value_or(options_.lowercase())) {
      std::u32string stripped;
      for (char32_t c : cleaned) detail::unicode::append_stripped(stripped, c);
      cleaned = std::move(stripped);
    }
    if (options_.lowercase()) {
      std::u32string lowered;
      for (char32_t c : cleaned) detail::unicode::append_lower(lowered, c);
      cleaned = std::move(lowered);
    }
    return cleaned;
  }

  // BertPreTokenizer: words end at whitespace (dropped) and punctuation (a word of its own).
  static std::vector<std::u32string> split_words(const std::u32string& text) {
    std::vector<std::u32string> words;
    std::u32string word;
    for (char32_t c : text) {
      const bool space = detail::unicode::is_whitespace(c), punct = detail::unicode::is_punctuation(c);
      if ((space || punct) && !word.empty()) {
        words.push_back(word);
        word.clear();
      }
      if (punct) words.push_back(std::u32string(1, c));
      if (!space && !punct) word += c;
    }
    if (!word.empty()) words.push_back(std::move(word));
    return words;
  }

  // Greedy longest-match-first: the longest vocabulary entry at the start, then the longest
  // "##" entry at each following position; a word with no such cover is one [UNK].
  void append_wordpieces(std::vector<int64_t>& ids, const std::u32string& word) const {
    if (static_cast<int64_t>(word.size()) > options_.max_input_chars_per_word()) {
      ids.push_back(unk_id());
      return;
    }
    std::vector<int64_t> pieces;
    for (std::size_t start = 0; start < word.size();) {
      std::size_t end = word.size();
      auto found = vocab_->ids.end();
      for (; end > start; --end) {
        const std::string candidate =
            (start > 0 ? "##" : "") + detail::unicode::encode_utf8(std::u32string_view(word).substr(start, end - start));
        found = vocab_->ids.find(candidate);
        if (found != vocab_->ids.end()) break;
      }
      if (end == start) {
        ids.push_back(unk_id());
        return;
      }
      pieces.push_back(found->second);
      start = end;
    }
    ids.insert(ids.end(), pieces.begin(), pieces.end());
  }

  Encoding assemble(const std::vector<int64_t>& a, const std::vector<int64_t>* b) const {
    Encoding e;
    e.ids.push_back(cls_id());
    e.ids.insert(e.ids.end(), a.begin(), a.end());
    e.ids.push_back(sep_id());
    e.type_ids.assign(e.ids.size(), 0);
    if (b != nullptr) {
      e.ids.insert(e.ids.end(), b->begin(), b->end());
      e.ids.push_back(sep_id());
      e.type_ids.resize(e.ids.size(), 1);
    }
    return e;
  }

  // transformers' clean-up: no space before . ? ! , and around clitics ("do n't" -> "don't").
  static std::string clean_up_spaces(std::string text) {
    static const std::pair<std::string_view, std::string_view> kRules[] = {
        {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"},
        {" n't", "n't"}, {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
    for (const auto& [from, to] : kRules) {
      std::string out;
      std::size_t at = 0;
      for (std::size_t hit; (hit = text.find(from, at)) != std::string::npos; at = hit + from.size()) {
        out.append(text, at, hit - at).append(to);
      }
      text = out.append(text, at, std::string::npos);
    }
    return text;
  }

  WordPieceOptions options_;
  std::shared_ptr<const Vocabulary> vocab_;  // shared: copies of a tokenizer use one vocabulary
  std::vector<detail::SpecialToken> specials_;
};

}  // namespace deltatune
