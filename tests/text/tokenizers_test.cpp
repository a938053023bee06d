// Tests of text/wordpiece_tokenizer.hpp and text/sentencepiece_tokenizer.hpp: behaviour on
// a tiny vocabulary and a tiny SentencePiece model made here, errors, and exact agreement
// with transformers' tokenizers on GLUE sentences and hard cases (fixture text_tokenizers).
#include <deltatune/text/sentencepiece_tokenizer.hpp>
#include <deltatune/text/wordpiece_tokenizer.hpp>

#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "test_support.hpp"

namespace tokenizers_test {

namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using deltatune::EncodeOptions;
using deltatune::Padding;
using deltatune::T5Tokenizer;
using deltatune::WordPieceTokenizer;
using Ids = std::vector<int64_t>;

namespace {

// Files under the system temp folder named for this process, removed one by one at the end.
struct TempFiles {
  std::vector<fs::path> made;
  fs::path path(const std::string& name) {
    made.push_back(fs::temp_directory_path() / ("deltatune_tokenizers_test_" + std::to_string(::getpid()) + "_" + name));
    return made.back();
  }
  ~TempFiles() {
    for (const auto& p : made) fs::remove(p);
  }
};

// ids 0..14: the specials, whole words, "##" continuations, punctuation, one CJK ideograph.
const char* const kTinyVocab[] = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able",
                                  "hello", "world", "!", ",", "cafe", "\xE4\xB8\xAD", "##s"};

fs::path tiny_vocab(TempFiles& files) {
  const auto path = files.path("vocab.txt");
  std::ofstream out(path, std::ios::binary);
  for (const char* token : kTinyVocab) out << token << '\n';
  return path;
}

Ids row(const torch::Tensor& t, int64_t b) {
  auto r = t[b].contiguous();
  return Ids(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel());
}

std::vector<std::vector<int64_t>> rows(const torch::Tensor& t) {
  std::vector<std::vector<int64_t>> out;
  for (int64_t b = 0; b < t.size(0); ++b) out.push_back(row(t, b));
  return out;
}

}  // namespace

CATCH_TEST_CASE("WordPieceTokenizer normalises, splits and pieces words as BERT", "[tokenizers]") {
  TempFiles files;
  WordPieceTokenizer tok(tiny_vocab(files));
  CATCH_CHECK(tok.vocab_size() == 15);
  // Lower-cased, accents stripped (é -> e), punctuation split off, longest match first with ##.
  CATCH_CHECK(tok.tokenize("Hello, WORLD! unaffable Café") == Ids{8, 11, 9, 10, 5, 6, 7, 12});
  // Whitespace of every kind separates; control characters vanish; a CJK ideograph is its own word.
  CATCH_CHECK(tok.tokenize(" hello\t\u00a0world\u200b\x01\xE4\xB8\xADhello ") == Ids{8, 9, 13, 8});
  // No cover of a word by the vocabulary: the whole word is [UNK]; so is a word over 100 characters.
  CATCH_CHECK(tok.tokenize("unaffablex hellos") == Ids{1, 8, 14});
  CATCH_CHECK(tok.tokenize(std::string(101, 'a') + " hello") == Ids{1, 8});
  // Special tokens written in the text are kept, case-sensitively.
  CATCH_CHECK(tok.tokenize("hello [MASK] [mask]") == Ids{8, 4, 1, 1, 1});
  CATCH_CHECK(tok.tokenize("").empty());
  // Cased: no lower-casing, no accent stripping unless asked.
  WordPieceTokenizer cased(tiny_vocab(files), deltatune::WordPieceOptions().lowercase(false));
  CATCH_CHECK(cased.tokenize("hello Hello café") == Ids{8, 1, 1});
  WordPieceTokenizer stripped(tiny_vocab(files), deltatune::WordPieceOptions().lowercase(false).strip_accents(true));
  CATCH_CHECK(stripped.tokenize("café") == Ids{12});
}

CATCH_TEST_CASE("WordPieceTokenizer adds [CLS] and [SEP], truncates longest first, pads and decodes", "[tokenizers]") {
  TempFiles files;
  WordPieceTokenizer tok(tiny_vocab(files));
  auto single = tok.encode("hello world");
  CATCH_CHECK(single.ids == Ids{2, 8, 9, 3});
  CATCH_CHECK(single.type_ids == Ids{0, 0, 0, 0});
  auto pair = tok.encode("hello", "world !");
  CATCH_CHECK(pair.ids == Ids{2, 8, 3, 9, 10, 3});
  CATCH_CHECK(pair.type_ids == Ids{0, 0, 0, 1, 1, 1});
  // Truncation keeps the specials; pairs lose tokens from the longer side first.
  CATCH_CHECK(tok.encode("hello world hello", 4).ids == Ids{2, 8, 9, 3});
  CATCH_CHECK(tok.encode("hello", "world world world world", 7).ids == Ids{2, 8, 3, 9, 9, 9, 3});
  CATCH_CHECK(tok.encode("hello hello hello", "world world world", 7).ids == Ids{2, 8, 8, 3, 9, 9, 3});
  CATCH_CHECK_THROWS_AS(tok.encode("hello", "world", 2), deltatune::OptionError);

  auto batch = tok.encode_batch({"hello", "hello world !"});
  CATCH_CHECK(rows(batch.input_ids) == std::vector<Ids>{{2, 8, 3, 0, 0}, {2, 8, 9, 10, 3}});
  CATCH_CHECK(rows(batch.attention_mask) == std::vector<Ids>{{1, 1, 1, 0, 0}, {1, 1, 1, 1, 1}});
  auto padded = tok.encode_batch({"hello"}, {"world"}, EncodeOptions().padding(Padding::kMaxLength).max_length(7));
  CATCH_CHECK(rows(padded.input_ids) == std::vector<Ids>{{2, 8, 3, 9, 3, 0, 0}});
  CATCH_CHECK(rows(padded.token_type_ids) == std::vector<Ids>{{0, 0, 0, 1, 1, 0, 0}});
  CATCH_CHECK_THROWS_AS(tok.encode_batch({"a"}, std::vector<std::string>{}), deltatune::ShapeError);
  CATCH_CHECK_THROWS_AS(tok.encode_batch({"a"}, EncodeOptions().padding(Padding::kMaxLength)), deltatune::OptionError);

  CATCH_CHECK(tok.decode({2, 8, 11, 9, 10, 5, 6, 7, 3}) == "hello, world! unaffable");
  CATCH_CHECK(tok.decode({2, 8, 3, 0}, /*skip_special_tokens=*/false) == "[CLS] hello [SEP] [PAD]");
  CATCH_CHECK_THROWS_AS(tok.decode({15}), deltatune::OptionError);
}

CATCH_TEST_CASE("Tokenizers name the file they cannot load", "[tokenizers]") {
  TempFiles files;
  const auto missing = files.path("missing.model");
  CATCH_CHECK_THROWS_AS(T5Tokenizer(missing), deltatune::CheckpointError);
  CATCH_CHECK_THROWS_WITH(T5Tokenizer(missing), Contains(missing.string()));
  CATCH_CHECK_THROWS_WITH(WordPieceTokenizer(files.path("missing.txt")), Contains("missing.txt"));
  const auto corrupt = files.path("corrupt.model");
  std::ofstream(corrupt, std::ios::binary) << "not a protobuf \xff\xff\xff\xff";
  CATCH_CHECK_THROWS_AS(T5Tokenizer(corrupt), deltatune::CheckpointError);
  CATCH_CHECK_THROWS_WITH(T5Tokenizer(corrupt), Contains(corrupt.string()));
  const auto no_specials = files.path("no_specials.txt");
  std::ofstream(no_specials) << "hello\nworld\n";
  CATCH_CHECK_THROWS_WITH(WordPieceTokenizer(no_specials), Contains("[PAD]") && Contains(no_specials.string()));
}

namespace {

// A 20-piece unigram model of three sentences with T5's special ids, trained here with
// SentencePiece's default normalisation rules (nmt_nfkc, a precompiled charsmap); its path.
fs::path train_tiny_model(TempFiles& files) {
  const auto corpus = files.path("corpus.txt");
  {
    std::ofstream out(corpus);
    for (int i = 0; i < 50; ++i) out << "the cat sat on the mat\nthe dog ate the cat food\nhello world again\n";
  }
  const auto prefix = files.path("tiny");
  files.path("tiny.vocab");
  const auto status = sentencepiece::SentencePieceTrainer::Train(
      "--input=" + corpus.string() + " --model_prefix=" + prefix.string() +
      " --vocab_size=20 --model_type=unigram --pad_id=0 --eos_id=1 --unk_id=2 --bos_id=-1 --minloglevel=2");
  CATCH_INFO("SentencePiece's trainer: " << status.ToString());
  CATCH_REQUIRE(status.ok());
  return files.path("tiny.model");
}

}  // namespace

CATCH_TEST_CASE("T5Tokenizer on a SentencePiece model trained here", "[tokenizers]") {
  TempFiles files;
  T5Tokenizer tok(train_tiny_model(files), /*extra_ids=*/3);
  CATCH_CHECK(tok.vocab_size() == 23);
  CATCH_CHECK(tok.id_to_token(22) == "<extra_id_0>");
  CATCH_CHECK(tok.id_to_token(20) == "<extra_id_2>");

  const Ids ids = tok.encode("the cat sat");
  CATCH_REQUIRE(ids.size() >= 2);
  CATCH_CHECK(ids.back() == 1);
  CATCH_CHECK(tok.decode(ids) == "the cat sat");
  // Sentinels written in the text are single tokens; decoding skips them unless asked.
  const Ids masked = tok.encode("the <extra_id_0> sat");
  CATCH_CHECK(std::count(masked.begin(), masked.end(), 22) == 1);
  CATCH_CHECK(tok.decode(masked) == "the sat");
  CATCH_CHECK(tok.decode(masked, /*skip_special_tokens=*/false) == "the<extra_id_0> sat</s>");
  // Truncation keeps </s>; padding is <pad> (0) with mask 0.
  CATCH_CHECK(tok.encode("the cat sat on the mat", 3).size() == 3);
  CATCH_CHECK(tok.encode("the cat sat on the mat", 3).back() == 1);
  auto batch = tok.encode_batch({"the cat", "the dog ate the cat food"}, EncodeOptions().max_length(40));
  CATCH_CHECK(batch.input_ids.size(1) == static_cast<int64_t>(tok.encode("the dog ate the cat food").size()));
  CATCH_CHECK(!batch.token_type_ids.defined());
  const auto short_row = row(batch.input_ids, 0);
  const auto short_ids = tok.encode("the cat");
  CATCH_CHECK(Ids(short_row.begin(), short_row.begin() + short_ids.size()) == short_ids);
  CATCH_CHECK(batch.attention_mask.sum(1)[0].item<int64_t>() == static_cast<int64_t>(short_ids.size()));
  CATCH_CHECK(row(batch.input_ids, 0).back() == 0);
  CATCH_CHECK_THROWS_AS(tok.decode({23}), deltatune::OptionError);
}

namespace {

std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Where the normaliser's precompiled_charsmap lies in a serialized model.
std::size_t charsmap_offset(const std::string& model, std::size_t& size) {
  for (const auto& spec : deltatune::detail::proto_fields(model, "model"))
    if (spec.number == 3)
      for (const auto& field : deltatune::detail::proto_fields(spec.bytes, "model"))
        if (field.number == 2) {
          size = field.bytes.size();
          return static_cast<std::size_t>(field.bytes.data() - model.data());
        }
  return std::string::npos;
}

uint32_t get_u32(const std::string& s, std::size_t at) {
  uint32_t v = 0;
  std::memcpy(&v, s.data() + at, 4);
  return v;
}
void put_u32(std::string& s, std::size_t at, uint32_t v) { std::memcpy(&s[at], &v, 4); }

}  // namespace

// SentencePiece follows a model's charsmap trie and string offsets unchecked: a forged one read
// outside its buffer (a fuzzer's crash in Normalizer::NormalizePrefix).
CATCH_TEST_CASE("T5Tokenizer refuses a forged normalisation charsmap, naming the file", "[tokenizers]") {
  TempFiles files;
  const auto tiny = train_tiny_model(files);
  const std::string model = read_bytes(tiny);
  std::size_t size = 0;
  const std::size_t at = charsmap_offset(model, size);
  CATCH_REQUIRE(at != std::string::npos);
  const uint32_t trie_bytes = get_u32(model, at);
  CATCH_REQUIRE(trie_bytes + 4 < size);
  const auto unit = [&](uint32_t i) { return deltatune::detail::DartsUnit{get_u32(model, at + 4 + 4 * i)}; };
  // A rule of the real trie: the first byte after the root with a leaf, and its value's unit.
  const uint32_t root = unit(0).offset();
  uint32_t value_unit = 0;
  for (uint32_t c = 1; c < 256 && value_unit == 0; ++c)
    if (unit(root ^ c).label() == c && unit(root ^ c).has_leaf()) value_unit = (root ^ c) ^ unit(root ^ c).offset();
  CATCH_REQUIRE(value_unit != 0);

  const auto refused = [&](const std::string& name, const std::function<void(std::string&)>& forge) {
    std::string forged = model;
    forge(forged);
    const auto path = files.path(name + ".model");
    std::ofstream(path, std::ios::binary) << forged;
    CATCH_INFO(name);
    CATCH_CHECK_THROWS_AS(T5Tokenizer(path), deltatune::CheckpointError);
    CATCH_CHECK_THROWS_WITH(T5Tokenizer(path), Contains(path.string()) && Contains("precompiled_charsmap"));
  };
  // SentencePiece checks the size field against the whole blob, header included.
  refused("trie_past_end", [&](std::string& m) { put_u32(m, at, static_cast<uint32_t>(size - 2)); });
  refused("root_outside", [&](std::string& m) { put_u32(m, at + 4, (trie_bytes / 4 + 1024) << 10); });
  refused("value_past_strings", [&](std::string& m) { put_u32(m, at + 4 + 4 * value_unit, 1U << 30); });
  refused("string_unterminated", [&](std::string& m) {
    put_u32(m, at + 4 + 4 * value_unit, static_cast<uint32_t>(size - 4 - trie_bytes - 1));
    m[at + size - 1] = 'x';
  });
  CATCH_CHECK(T5Tokenizer(tiny).encode("the cat").back() == 1);  // the unforged model loads
}

namespace {

// The fixture's cases, or nullopt (skipped) where it or the shared data is absent.
std::optional<nlohmann::json> golden_cases() {
  auto dir = deltatune::testing::golden_dir("text_tokenizers");
  if (!dir) return std::nullopt;
  if (!fs::exists(*dir / "cases.json")) {
    CATCH_WARN("tokenizer golden tests skipped: " << (*dir / "NOTE.txt").string() << " says why");
    return std::nullopt;
  }
  std::ifstream in(*dir / "cases.json");
  return nlohmann::json::parse(in);
}

// Checks one batch case against a tokenizer's BatchEncoding.
void check_batch(const nlohmann::json& c, const deltatune::BatchEncoding& got) {
  CATCH_INFO("batch starting " << c["texts"][0].get<std::string>());
  CATCH_CHECK(rows(got.input_ids) == c["input_ids"].get<std::vector<Ids>>());
  CATCH_CHECK(rows(got.attention_mask) == c["attention_mask"].get<std::vector<Ids>>());
  if (c.contains("token_type_ids")) CATCH_CHECK(rows(got.token_type_ids) == c["token_type_ids"].get<std::vector<Ids>>());
}

EncodeOptions options_of(const nlohmann::json& c) {
  return EncodeOptions()
      .max_length(c["max_length"].get<int64_t>())
      .padding(c["padding"] == "max_length" ? Padding::kMaxLength : Padding::kLongest);
}

// Checks every case with matches(case) (which records its own failures) and prints how many matched.
template <class Matches>
void count_matches(const nlohmann::json& cases, const std::string& what, Matches&& matches) {
  std::size_t matched = 0;
  for (const auto& c : cases) matched += matches(c) ? 1 : 0;
  fmt::print("{}: {}/{} match transformers exactly\n", what, matched, cases.size());
  CATCH_CHECK(matched == cases.size());
}

template <class Tokenizer>
void check_decode(const Tokenizer& tok, const nlohmann::json& cases, const std::string& name) {
  count_matches(cases, name + " decodings", [&](const nlohmann::json& c) {
    const auto got = tok.decode(c["ids"].get<Ids>(), c["skip_special_tokens"].get<bool>());
    CATCH_INFO("ids decoded: " << c["ids"].dump());
    CATCH_CHECK(got == c["text"].get<std::string>());
    return got == c["text"].get<std::string>();
  });
}

}  // namespace

CATCH_TEST_CASE("T5Tokenizer matches transformers' T5Tokenizer exactly", "[tokenizers][golden]") {
  auto cases = golden_cases();
  auto model = deltatune::testing::shared_data("tokenizers/t5/spiece.model");
  if (!cases || !model) return;
  const auto& t5 = (*cases)["t5"];
  T5Tokenizer tok(*model);
  CATCH_CHECK(tok.vocab_size() == t5["vocab_size"].get<int64_t>());
  count_matches(t5["encode"], "T5 sentences", [&](const nlohmann::json& c) {
    const auto got = tok.encode(c["text"].get<std::string>());
    CATCH_INFO("text: " << c["text"].get<std::string>());
    CATCH_CHECK(got == c["ids"].get<Ids>());
    return got == c["ids"].get<Ids>();
  });
  check_decode(tok, t5["decode"], "T5");
  for (const auto& c : t5["batch"]) check_batch(c, tok.encode_batch(c["texts"].get<std::vector<std::string>>(), options_of(c)));
}

CATCH_TEST_CASE("WordPieceTokenizer matches transformers' BertTokenizerFast exactly", "[tokenizers][golden]") {
  auto cases = golden_cases();
  auto vocab = deltatune::testing::shared_data("tokenizers/bert-base-uncased/vocab.txt");
  if (!cases || !vocab) return;
  const auto& bert = (*cases)["bert"];
  WordPieceTokenizer tok(*vocab);
  CATCH_CHECK(tok.vocab_size() == bert["vocab_size"].get<int64_t>());
  count_matches(bert["encode"], "BERT sentences and pairs", [&](const nlohmann::json& c) {
    const auto text = c["text"].get<std::string>();
    const auto got = c.contains("pair") ? tok.encode(text, c["pair"].get<std::string>()) : tok.encode(text);
    CATCH_INFO("text: " << text);
    CATCH_CHECK(got.ids == c["ids"].get<Ids>());
    CATCH_CHECK(got.type_ids == c["type_ids"].get<Ids>());
    return got.ids == c["ids"].get<Ids>() && got.type_ids == c["type_ids"].get<Ids>();
  });
  check_decode(tok, bert["decode"], "BERT");
  for (const auto& c : bert["batch"]) {
    const auto texts = c["texts"].get<std::vector<std::string>>();
    check_batch(c, c.contains("pairs") ? tok.encode_batch(texts, c["pairs"].get<std::vector<std::string>>(), options_of(c))
                                       : tok.encode_batch(texts, options_of(c)));
  }
}

namespace {

std::string utf8(char32_t cp) { return deltatune::detail::unicode::encode_utf8(std::u32string(1, cp)); }

// Words as JSON with every non-ASCII character escaped, readable whatever they hold.
std::string shown(const std::vector<std::string>& words) { return nlohmann::json(words).dump(-1, ' ', true); }

// What tokenizers gives for "a" + c + "b" where the fixture names its shape (text_unicode.py).
std::vector<std::string> shaped_words(const std::string& kind, const std::string& c) {
  if (kind == "kept") return {"a" + c + "b"};
  if (kind == "dropped") return {"ab"};
  if (kind == "space") return {"a", "b"};
  CATCH_REQUIRE(kind == "split");
  return {"a", c, "b"};
}

}  // namespace

CATCH_TEST_CASE("WordPieceTokenizer normalises and splits every code point as tokenizers does", "[tokenizers][golden]") {
  auto dir = deltatune::testing::golden_dir("text_unicode");
  if (!dir) return;
  std::ifstream in(*dir / "code_points.json");
  const auto data = nlohmann::json::parse(in);
  TempFiles files;
  const auto vocab = tiny_vocab(files);
  for (const auto& setting : data["settings"]) {
    const WordPieceTokenizer tok(vocab, deltatune::WordPieceOptions()
                                            .lowercase(setting["lowercase"].get<bool>())
                                            .strip_accents(setting["strip_accents"].get<bool>()));
    std::size_t seen = 0, differing = 0;
    std::string first_differences;
    const auto check = [&](char32_t cp, const std::vector<std::string>& expected) {
      ++seen;
      const auto got = tok.pre_tokenize("a" + utf8(cp) + "b");
      if (got == expected) return;
      if (++differing <= 10) {
        first_differences += fmt::format("\n  U+{:04X}: ours {}, tokenizers' {}", static_cast<uint32_t>(cp), shown(got),
                                         shown(expected));
      }
    };
    for (const auto& run : setting["runs"]) {
      const auto first = run[0].get<char32_t>(), last = run[1].get<char32_t>();
      const auto kind = run[2].get<std::string>();
      for (char32_t cp = first; cp <= last; ++cp) {
        check(cp, shaped_words(kind, utf8(cp)));
      }
    }
    for (const auto& other : setting["other"]) check(other[0].get<char32_t>(), other[1].get<std::vector<std::string>>());
    const auto name = setting["name"].get<std::string>();
    fmt::print("{}: {} of {} code points differ from tokenizers {}\n", name, differing, seen,
               data["tokenizers"].get<std::string>());
    CATCH_INFO(name << ": the first differences" << first_differences);
    CATCH_CHECK(seen == 0x110000 - 0x800);  // every code point but the surrogates
    CATCH_CHECK(differing == 0);
  }
}

}  // namespace tokenizers_test
