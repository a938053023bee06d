// Checks a SentencePiece model's normalisation rules before libsentencepiece follows them.
//
// A model (spiece.model, a serialized sentencepiece.ModelProto) carries its rules as
// `precompiled_charsmap` bytes: a 4-byte size, a darts-clone double-array trie from input
// prefixes to offsets, then the NUL-terminated replacement strings those offsets point into.
// SentencePiece 0.1.97 (Debian's) walks the trie and reads the strings without bounds checks,
// so a forged charsmap makes it read outside its buffer (a crash, or garbage text). Here every
// trie state an input can reach is visited once and the charsmap is refused, naming the file,
// when a unit, an offset or a string lies outside it.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include <deltatune/core/error.hpp>

namespace deltatune::detail {

// One field of a protobuf message: its number and wire type, and for a length-delimited
// field (wire type 2) where its bytes lie.
struct ProtoField {
  uint64_t number = 0;
  int wire_type = 0;
  std::string_view bytes;
};

// The fields of the protobuf message `message` in order, or a CheckpointError naming `file`
// where the encoding is broken (SentencePiece would refuse such a model too).
inline std::vector<ProtoField> proto_fields(std::string_view message, const std::string& file) {
  std::size_t at = 0;
  const auto fail = [&](const char* what) {
    throw CheckpointError(fmt::format("T5Tokenizer: {} is not a SentencePiece model ({} at byte {}); pass the "
                                      "spiece.model file of a T5 checkpoint", file, what, at));
  };
  const auto varint = [&] {
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (at >= message.size()) fail("a number runs past the end");
      const auto byte = static_cast<uint8_t>(message[at++]);
      value |= uint64_t(byte & 0x7F) << shift;
      if ((byte & 0x80) == 0) return value;
    }
    fail("a number is longer than 10 bytes");
    return value;
  };
  std::vector<ProtoField> fields;
  while (at < message.size()) {
    const uint64_t key = varint();
    ProtoField field{key >> 3, static_cast<int>(key & 7), {}};
    if (field.wire_type == 0) {
      varint();
    } else if (field.wire_type == 1 || field.wire_type == 5) {
      const std::size_t width = field.wire_type == 1 ? 8 : 4;
      if (message.size() - at < width) fail("a fixed-size number runs past the end");
      at += width;
    } else if (field.wire_type == 2) {
      const uint64_t size = varint();
      if (size > message.size() - at) fail("a field's length runs past the end");
      field.bytes = message.substr(at, size);
      at += size;
    } else {
      fail("a field has an unknown wire type");
    }
    fields.push_back(field);
  }
  return fields;
}

// A double-array unit as darts-clone reads it (darts.h, DoubleArrayUnit).
struct DartsUnit {
  uint32_t bits;
  bool has_leaf() const { return ((bits >> 8) & 1) == 1; }
  uint32_t value() const { return bits & ((1U << 31) - 1); }
  uint32_t label() const { return bits & ((1U << 31) | 0xFF); }
  uint32_t offset() const { return (bits >> 10) << ((bits & (1U << 9)) >> 6); }
};

// Checks one precompiled_charsmap (`field` names it in messages). SentencePiece's prefix search
// reads unit (base ^ byte) for any input byte, so every reachable base's whole 256-unit block
// must lie in the trie; a leaf's value must start a NUL-terminated string in the tail; at most
// 32 rules may match one input (SentencePiece keeps 32 results on its stack).
inline void check_charsmap(std::string_view charsmap, const std::string& file, const char* field) {
  if (charsmap.empty()) return;  // no rules: identity normalisation
  const auto fail = [&](const std::string& what) {
    throw CheckpointError(fmt::format("T5Tokenizer: {} has a broken {} ({}); pass the spiece.model file of a T5 "
                                      "checkpoint", file, field, what));
  };
  if (charsmap.size() <= 4) fail("shorter than its 4-byte header");
  uint32_t trie_bytes = 0;
  std::memcpy(&trie_bytes, charsmap.data(), 4);
  if (trie_bytes > charsmap.size() - 4) fail(fmt::format("its trie of {} bytes runs past its {}", trie_bytes, charsmap.size()));
  const std::size_t units = trie_bytes / 4;
  const std::string_view strings = charsmap.substr(4 + trie_bytes);
  const auto unit = [&](std::size_t i) {
    DartsUnit u{0};
    std::memcpy(&u.bits, charsmap.data() + 4 + 4 * i, 4);
    return u;
  };
  constexpr int32_t kMaxMatches = 32;  // sentencepiece::normalizer::Normalizer::kMaxTrieResultsSize
  enum : uint8_t { kUnseen, kOnPath, kDone };
  std::vector<uint8_t> state(units, kUnseen);
  std::vector<int32_t> most_matches(units, 0);  // of a finished base: the most leaves an input meets from it
  struct Frame {
    uint32_t base;
    uint32_t next_label;
    int32_t most_matches;
  };
  std::vector<Frame> path;
  // Starts visiting `base`; false when it was visited before (its count is known).
  const auto enter = [&](uint32_t base) {
    if ((std::size_t(base) | 0xFF) >= units) fail(fmt::format("a trie unit points to {}, outside its {} units", base, units));
    if (state[base] == kOnPath) fail("its trie loops back on itself");
    if (state[base] == kDone) return false;
    state[base] = kOnPath;
    path.push_back({base, 0, 0});
    return true;
  };
  if (units == 0) fail("its trie is empty");
  enter(unit(0).offset());
  while (!path.empty()) {
    Frame& frame = path.back();
    if (frame.next_label == 256) {
      const Frame done = frame;
      state[done.base] = kDone;
      most_matches[done.base] = done.most_matches;
      path.pop_back();
      if (path.empty()) break;
      const DartsUnit edge = unit(path.back().base ^ (path.back().next_label - 1));
      path.back().most_matches = std::max(path.back().most_matches, int32_t(edge.has_leaf()) + done.most_matches);
      continue;
    }
    const uint32_t label = frame.next_label++;
    const DartsUnit edge = unit(frame.base ^ label);
    if (edge.label() != label) continue;
    const uint32_t child = (frame.base ^ label) ^ edge.offset();
    if (edge.has_leaf()) {
      if (child >= units) fail(fmt::format("a rule's value unit {} is outside its {} units", child, units));
      const uint32_t value = unit(child).value();
      if (value >= strings.size() || strings.find('\0', value) == std::string_view::npos)
        fail(fmt::format("a rule points to byte {} of its {} bytes of strings, past the last NUL", value, strings.size()));
    }
    const int32_t leaf = edge.has_leaf() ? 1 : 0;
    if (!enter(child)) frame.most_matches = std::max(frame.most_matches, leaf + most_matches[child]);
  }
  if (most_matches[unit(0).offset()] > kMaxMatches) fail(fmt::format("more than {} rules match one input", kMaxMatches));
}

// Checks the normaliser's and the denormaliser's charsmaps of a serialized ModelProto
// (sentencepiece_model.proto: ModelProto.normalizer_spec = 3, .denormalizer_spec = 5,
// NormalizerSpec.precompiled_charsmap = 2). Protobuf merges repeated occurrences of a message
// field, so the last charsmap of each spec is the one SentencePiece keeps.
inline void check_sentencepiece_charsmaps(std::string_view model, const std::string& file) {
  std::string_view normalizer, denormalizer;
  for (const auto& spec : proto_fields(model, file)) {
    if ((spec.number != 3 && spec.number != 5) || spec.wire_type != 2) continue;
    for (const auto& field : proto_fields(spec.bytes, file))
      if (field.number == 2 && field.wire_type == 2) (spec.number == 3 ? normalizer : denormalizer) = field.bytes;
  }
  check_charsmap(normalizer, file, "normalizer_spec.precompiled_charsmap");
  check_charsmap(denormalizer, file, "denormalizer_spec.precompiled_charsmap");
}

}  // namespace deltatune::detail
