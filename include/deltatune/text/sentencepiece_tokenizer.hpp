// T5's tokenizer: a SentencePiece model (spiece.model) read through libsentencepiece,
// with Hugging Face's T5 conventions: `</s>` (id 1) closes every sequence, `<pad>` is 0,
// `<unk>` 2, and the 100 sentinels <extra_id_0>..<extra_id_99> sit above the model's
// pieces, counting down (<extra_id_0> is the last id). Single sequences only: T5 puts
// both sentences of a pair task into one text ("mrpc sentence1: ... sentence2: ...").
#pragma once

#include <sentencepiece_processor.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <deltatune/core/error.hpp>
#include <deltatune/text/encoding.hpp>
#include <deltatune/text/sentencepiece_charsmap.hpp>

namespace deltatune {

// Encodes text to T5's token ids and back, as transformers' T5Tokenizer(Fast) does.
//
//   deltatune::T5Tokenizer tok("t5-small/spiece.model");
//   auto batch = tok.encode_batch({"translate English to German: Hi", "cola sentence: Them ran."},
//                                 deltatune::EncodeOptions().max_length(64));
//   // batch.input_ids, batch.attention_mask: (B, T) int64
class T5Tokenizer {
 public:
  // Loads spiece.model; `extra_ids` sentinels are appended above its pieces, as Hugging Face does.
  explicit T5Tokenizer(const std::filesystem::path& spiece_model, int64_t extra_ids = 100)
      : model_(std::make_shared<sentencepiece::SentencePieceProcessor>()), extra_ids_(extra_ids) {
    detail::check<CheckpointError>(std::filesystem::is_regular_file(spiece_model),
                                   "T5Tokenizer: the SentencePiece model {} does not exist; pass the spiece.model "
                                   "file of a T5 checkpoint",
                                   spiece_model.string());
    // Read here and checked before SentencePiece parses the same bytes: it trusts the charsmap.
    const std::string bytes = read_model(spiece_model);
    detail::check_sentencepiece_charsmaps(bytes, spiece_model.string());
    sentencepiece::util::Status status;
    try {  // a forged model can make SentencePiece's trie builder throw its own exceptions
      status = model_->LoadFromSerializedProto(bytes);
    } catch (const std::exception& e) {
      status = sentencepiece::util::Status(sentencepiece::util::StatusCode::kInternal, e.what());
    }
    detail::check<CheckpointError>(status.ok(),
                                   "T5Tokenizer: {} is not a SentencePiece model ({}); pass the spiece.model file "
                                   "of a T5 checkpoint",
                                   spiece_model.string(), status.ToString());
    detail::check<OptionError>(extra_ids >= 0, "T5Tokenizer: extra_ids is {}; pass 0 or more (T5 uses 100)",
                               extra_ids);
    pad_id_ = required_piece("<pad>", spiece_model);
    eos_id_ = required_piece("</s>", spiece_model);
    specials_ = {{"<pad>", pad_id_}, {"</s>", eos_id_}, {"<unk>", unk_id()}};
    for (int64_t i = 0; i < extra_ids_; ++i) specials_.push_back({extra_id(i), model_size() + extra_ids_ - 1 - i});
  }

  // The model's pieces plus the sentinels (32100 for T5).
  int64_t vocab_size() const { return model_size() + extra_ids_; }
  int64_t pad_id() const { return pad_id_; }
  int64_t eos_id() const { return eos_id_; }
  int64_t unk_id() const { return model_->unk_id(); }

  // The token (piece) of an id: "▁Hello", "</s>", "<extra_id_0>".
  std::string id_to_token(int64_t id) const {
    check_id(id);
    return id < model_size() ? model_->IdToPiece(static_cast<int>(id)) : extra_id(model_size() + extra_ids_ - 1 - id);
  }

  // The token ids of text, without `</s>`: special tokens written in the text ("<extra_id_0>")
  // become their ids, the text between them goes through SentencePiece.
  std::vector<int64_t> tokenize(std::string_view text) const {
    return detail::ids_with_special_tokens(text, specials_, [this](std::string_view plain, std::vector<int64_t>& ids) {
      std::vector<int> pieces;
      const auto status = model_->Encode(plain, &pieces);
      detail::check<Error>(status.ok(), "T5Tokenizer: SentencePiece could not encode the text ({})", status.ToString());
      ids.insert(ids.end(), pieces.begin(), pieces.end());
    });
  }

  // The ids of text followed by `</s>`, cut to max_length tokens (`</s>` kept) unless it is 0.
  std::vector<int64_t> encode(std::string_view text, int64_t max_length = 0) const {
    auto ids = tokenize(text);
    const int64_t budget = detail::content_budget(max_length, 1);
    if (budget >= 0 && static_cast<int64_t>(ids.size()) > budget) ids.resize(budget);
    ids.push_back(eos_id_);
    return ids;
  }

  // A batch of texts as (B, T) input_ids and attention_mask, padded with <pad> on the right.
  BatchEncoding encode_batch(const std::vector<std::string>& texts, const EncodeOptions& options = {}) const {
    std::vector<Encoding> encodings;
    encodings.reserve(texts.size());
    for (const auto& text : texts) encodings.push_back({encode(text, options.max_length()), {}});
    return detail::pad_batch(encodings, options, pad_id_, /*with_type_ids=*/false);
  }

  // The text of ids, as Hugging Face's fast tokenizer decodes: pieces joined with "▁" made
  // a space, the first piece's dropped; special tokens left out unless asked for.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = true) const {
    static const std::string kSpaceMark = "\xE2\x96\x81";  // U+2581, SentencePiece's word boundary
    std::string text;
    bool first = true;
    for (int64_t id : ids) {
      check_id(id);
      if (skip_special_tokens && is_special(id)) continue;
      const std::string token = id_to_token(id);
      for (std::size_t i = 0; i < token.size();) {
        if (token.compare(i, kSpaceMark.size(), kSpaceMark) == 0) {
          if (!first) text += ' ';
          i += kSpaceMark.size();
        } else {
          text += token[i++];
        }
      }
      first = false;
    }
    return text;
  }

 private:
  static std::string read_model(const std::filesystem::path& spiece_model) {
    std::ifstream in(spiece_model, std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    detail::check<CheckpointError>(!in.bad(), "T5Tokenizer: could not read {}; check its permissions",
                                   spiece_model.string());
    return bytes;
  }

  int64_t model_size() const { return model_->GetPieceSize(); }

  int64_t required_piece(const char* piece, const std::filesystem::path& spiece_model) const {
    const int64_t id = model_->PieceToId(piece);
    detail::check<CheckpointError>(id != unk_id(), "T5Tokenizer: the SentencePiece model {} has no piece {}; pass a T5 model",
                                   spiece_model.string(), piece);
    return id;
  }

  static std::string extra_id(int64_t i) { return "<extra_id_" + std::to_string(i) + ">"; }

  bool is_special(int64_t id) const {
    return id == pad_id_ || id == eos_id_ || id == unk_id() || id >= model_size();
  }

  void check_id(int64_t id) const {
    detail::check<OptionError>(id >= 0 && id < vocab_size(), "T5Tokenizer: token id {} is outside the vocabulary [0, {})",
                               id, vocab_size());
  }

  // Shared: copies of a tokenizer use one loaded model (SentencePiece encodes from const methods).
  std::shared_ptr<sentencepiece::SentencePieceProcessor> model_;
  int64_t extra_ids_;
  std::vector<detail::SpecialToken> specials_;
  int64_t pad_id_, eos_id_;
};

}  // namespace deltatune
