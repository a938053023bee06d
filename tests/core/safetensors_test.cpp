// Tests of core/safetensors.hpp: round trips, bytes identical to Python's, malformed files rejected, atomic writes;
// and of core/tensor_match.hpp, which every loader fills models through.
#include <deltatune/core/safetensors.hpp>
#include <deltatune/core/tensor_match.hpp>

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "test_support.hpp"

namespace safetensors_test {

namespace dt = deltatune;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

// tools/make_safetensors_golden.py with safetensors 0.8.0: save_file({"a": arange(6, float32).reshape(2, 3),
// "b": tensor([1, 2], int64)}, metadata={"format": "pt"}). 8 + 144 header bytes (one space of padding), then
// b (I64 sorts before F32) at [0, 16) and a at [16, 40).
const unsigned char kGolden[] = {
    0x90, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x7b, 0x22, 0x5f, 0x5f,
    0x6d, 0x65, 0x74, 0x61, 0x64, 0x61, 0x74, 0x61, 0x5f, 0x5f, 0x22, 0x3a,
    0x7b, 0x22, 0x66, 0x6f, 0x72, 0x6d, 0x61, 0x74, 0x22, 0x3a, 0x22, 0x70,
    0x74, 0x22, 0x7d, 0x2c, 0x22, 0x62, 0x22, 0x3a, 0x7b, 0x22, 0x64, 0x74,
    0x79, 0x70, 0x65, 0x22, 0x3a, 0x22, 0x49, 0x36, 0x34, 0x22, 0x2c, 0x22,
    0x73, 0x68, 0x61, 0x70, 0x65, 0x22, 0x3a, 0x5b, 0x32, 0x5d, 0x2c, 0x22,
    0x64, 0x61, 0x74, 0x61, 0x5f, 0x6f, 0x66, 0x66, 0x73, 0x65, 0x74, 0x73,
    0x22, 0x3a, 0x5b, 0x30, 0x2c, 0x31, 0x36, 0x5d, 0x7d, 0x2c, 0x22, 0x61,
    0x22, 0x3a, 0x7b, 0x22, 0x64, 0x74, 0x79, 0x70, 0x65, 0x22, 0x3a, 0x22,
    0x46, 0x33, 0x32, 0x22, 0x2c, 0x22, 0x73, 0x68, 0x61, 0x70, 0x65, 0x22,
    0x3a, 0x5b, 0x32, 0x2c, 0x33, 0x5d, 0x2c, 0x22, 0x64, 0x61, 0x74, 0x61,
    0x5f, 0x6f, 0x66, 0x66, 0x73, 0x65, 0x74, 0x73, 0x22, 0x3a, 0x5b, 0x31,
    0x36, 0x2c, 0x34, 0x30, 0x5d, 0x7d, 0x7d, 0x20, 0x01, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x3f, 0x00, 0x00, 0x00, 0x40,
    0x00, 0x00, 0x40, 0x40, 0x00, 0x00, 0x80, 0x40, 0x00, 0x00, 0xa0, 0x40,
};

std::string golden_bytes() { return std::string(reinterpret_cast<const char*>(kGolden), sizeof kGolden); }

std::map<std::string, torch::Tensor> golden_tensors() {
  return {{"a", torch::arange(6, torch::kFloat32).reshape({2, 3})}, {"b", torch::tensor({1, 2}, torch::kInt64)}};
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary) << bytes;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

// A safetensors file built by hand: header length, header JSON, data; `length` overrides the real length.
std::string make_file(const std::string& header, const std::string& data = "", uint64_t length = ~uint64_t(0)) {
  if (length == ~uint64_t(0)) length = header.size();
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(length >> (8 * i)));
  return out + header + data;
}

// Reading `bytes` must throw CheckpointError naming the file and holding each of `parts`.
void expect_rejected(const dt::testing::TempDir& dir, const std::string& bytes, const std::vector<std::string>& parts) {
  const std::string path = dir.file("bad.safetensors");
  write_bytes(path, bytes);
  try {
    dt::read_safetensors(path);
    CATCH_FAIL("read_safetensors accepted a bad file; expected: " << fmt::format("{}", fmt::join(parts, ", ")));
  } catch (const dt::CheckpointError& e) {
    const std::string what = e.what();
    CATCH_INFO(what);
    CATCH_CHECK_THAT(what, Contains(path));
    for (const auto& part : parts) CATCH_CHECK_THAT(what, Contains(part));
  }
}

}  // namespace

CATCH_TEST_CASE("safetensors round-trips every dtype, scalars, empty and strided tensors, and metadata",
                "[core][safetensors]") {
  torch::manual_seed(0);
  dt::testing::TempDir dir;
  const auto strided = torch::randn({4, 6});
  const std::map<std::string, torch::Tensor> tensors = {
      {"f32", torch::randn({3, 4})},
      {"f16", torch::randn({5}).to(torch::kFloat16)},
      {"bf16", torch::randn({2, 3}).to(torch::kBFloat16)},
      {"f64", torch::randn({2, 2, 2}, torch::kFloat64)},
      {"i64", torch::randint(-(int64_t(1) << 40), int64_t(1) << 40, {7}, torch::kInt64)},
      {"i32", torch::randint(-100000, 100000, {3, 1}, torch::kInt32)},
      {"i16", torch::randint(-30000, 30000, {4}, torch::kInt16)},
      {"i8", torch::randint(-128, 128, {9}, torch::kInt8)},
      {"u8", torch::randint(0, 256, {9}, torch::kUInt8)},
      {"bool", torch::rand({6}) > 0.5},
      {"scalar", torch::tensor(2.5)},
      {"empty", torch::zeros({0, 3})},
      {"transposed", strided.t()},                               // non-contiguous
      {"every_other", strided.index({torch::indexing::Slice(), torch::indexing::Slice(0, 6, 2)})},
  };
  const std::map<std::string, std::string> metadata = {{"format", "pt"}, {"note", "r=8, \"quoted\", ü"}};
  CATCH_REQUIRE_FALSE(tensors.at("transposed").is_contiguous());

  const std::string path = dir.file("round_trip.safetensors");
  dt::write_safetensors(path, tensors, metadata);
  // The data buffer starts on an 8-byte boundary.
  const std::string bytes = read_bytes(path);
  uint64_t header_bytes = 0;
  for (int i = 7; i >= 0; --i) header_bytes = (header_bytes << 8) | static_cast<unsigned char>(bytes[i]);
  CATCH_CHECK((8 + header_bytes) % 8 == 0);

  const auto file = dt::read_safetensors(path);
  CATCH_CHECK(file.metadata == metadata);
  CATCH_REQUIRE(file.tensors.size() == tensors.size());
  for (const auto& [name, expected] : tensors) {
    CATCH_INFO(name);
    CATCH_REQUIRE(file.tensors.count(name) == 1);
    const auto& got = file.tensors.at(name);
    CATCH_CHECK(got.scalar_type() == expected.scalar_type());
    CATCH_CHECK(got.sizes() == expected.sizes());
    CATCH_CHECK(got.is_contiguous());
    CATCH_CHECK(got.device().is_cpu());
    CATCH_CHECK(torch::equal(got, expected));
  }
  // Same contents, same bytes: writing what was read gives the file back.
  const std::string again = dir.file("again.safetensors");
  dt::write_safetensors(again, file.tensors, file.metadata);
  CATCH_CHECK(read_bytes(again) == bytes);
}

CATCH_TEST_CASE("safetensors reads the Python library's bytes and writes them back identically",
                "[core][safetensors]") {
  dt::testing::TempDir dir;
  const std::string golden = dir.file("golden.safetensors");
  write_bytes(golden, golden_bytes());
  const auto file = dt::read_safetensors(golden);
  CATCH_CHECK(file.metadata == std::map<std::string, std::string>{{"format", "pt"}});
  const auto expected = golden_tensors();
  CATCH_REQUIRE(file.tensors.size() == 2);
  for (const auto& [name, tensor] : expected) {
    CATCH_INFO(name);
    CATCH_CHECK(file.tensors.at(name).scalar_type() == tensor.scalar_type());
    CATCH_CHECK(torch::equal(file.tensors.at(name), tensor));
  }

  const std::string ours = dir.file("ours.safetensors");
  dt::write_safetensors(ours, expected, {{"format", "pt"}});
  CATCH_CHECK(read_bytes(ours) == golden_bytes());
}

CATCH_TEST_CASE("read_safetensors rejects malformed files with messages that name the file and tensor",
                "[core][safetensors][errors]") {
  dt::testing::TempDir dir;
  const std::string golden = golden_bytes();

  // Truncated anywhere: in the length, in the header, in the data.
  for (size_t cut : {0, 4, 7}) expect_rejected(dir, golden.substr(0, cut), {"too short"});
  for (size_t cut : {8, 20, 100, 151}) expect_rejected(dir, golden.substr(0, cut), {"runs past the end of the file"});
  for (size_t cut : {152, 160, 170, 191})
    expect_rejected(dir, golden.substr(0, cut), {"tensor 'a'", "run past the data buffer", "truncated"});
  for (size_t cut : {152, 160, 167}) {
    // With a intact (moved first), it is b that runs past the end.
    const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                               R"("b":{"dtype":"I64","shape":[2],"data_offsets":[8,24]}})";
    expect_rejected(dir, make_file(header, std::string(cut - 152 + 8, '\0')), {"tensor 'b'", "run past"});
  }

  std::string too_long = golden;
  too_long[0] = static_cast<char>(0xff);  // 255 header bytes in a 192-byte file
  expect_rejected(dir, too_long, {"header length 255", "runs past the end of the file (192 bytes)"});
  expect_rejected(dir, make_file("{}", "", dt::kMaxHeaderBytes + 1), {"header length 100000001", "exceeds"});
  expect_rejected(dir, make_file(R"({"a": {"dtype": )"), {"not valid JSON"});
  expect_rejected(dir, make_file("[1, 2]"), {"must be a JSON object", "array"});

  const std::string eight(8, '\0');
  expect_rejected(dir, make_file(R"({"w":{"dtype":"F8","shape":[1],"data_offsets":[0,1]}})", eight),
                  {"tensor 'w'", "unknown dtype \"F8\""});
  expect_rejected(dir, make_file(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", eight),
                  {"tensor 'w'", "[0, 16]", "run past the data buffer (8 bytes)"});
  expect_rejected(dir, make_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight),
                  {"tensor 'w'", "hold 8 bytes", "F32 with shape [3] needs 12"});
  expect_rejected(dir, make_file(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", eight),
                  {"tensor 'w'", "end before they begin"});
  expect_rejected(dir,
                  make_file(R"({"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                            R"("y":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                            std::string(12, '\0')),
                  {"'x' [0, 8]", "'y' [4, 12]", "overlap"});
  expect_rejected(dir, make_file(R"({"w":{"dtype":"F32","shape":[-1],"data_offsets":[0,0]}})"),
                  {"tensor 'w'", "negative dimension"});
  expect_rejected(dir, make_file(R"({"w":{"dtype":"I8","shape":[4294967296,4294967296],"data_offsets":[0,0]}})"),
                  {"tensor 'w'", "overflows"});
  expect_rejected(dir, make_file(R"({"w":{"dtype":"F32","shape":[1]}})"), {"tensor 'w'", "no \"data_offsets\""});
  expect_rejected(dir, make_file(R"({"w":{"dtype":"F32","shape":"1","data_offsets":[0,4]}})", eight),
                  {"tensor 'w'", "\"shape\" must be an array"});
  expect_rejected(dir, make_file(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", eight),
                  {"tensor 'w'", "\"data_offsets\" must be [begin, end]"});
  expect_rejected(dir, make_file(R"({"w":[1]})"), {"tensor 'w'", "must be a JSON object"});
  expect_rejected(dir, make_file(R"({"__metadata__":{"k":1}})"), {"\"__metadata__\" entry 'k' must be a string"});

  const std::string missing = dir.file("absent.safetensors");
  CATCH_CHECK_THROWS_WITH(dt::read_safetensors(missing), Contains(missing) && Contains("cannot open"));
  CATCH_CHECK_THROWS_AS(dt::read_safetensors(dir.path.string()), dt::CheckpointError);  // a directory
}

// Python's safetensors 0.8 gives these verdicts (the differential test compares both readers on the fuzz corpus):
// the tensors tile the data buffer exactly, a second "__metadata__" or a byte-order mark is refused, a tensor
// named twice keeps its last entry, and a shape without elements may overflow strides.
CATCH_TEST_CASE("read_safetensors accepts and refuses what Python's safetensors does", "[core][safetensors][errors]") {
  dt::testing::TempDir dir;
  auto u8 = [](const std::string& name, int begin, int end) {
    return fmt::format(R"("{}":{{"dtype":"U8","shape":[{}],"data_offsets":[{},{}]}})", name, end - begin, begin, end);
  };
  // Bytes no tensor covers, before, between and after the tensors: the issue's "x=[100]" case first.
  expect_rejected(dir, make_file("{" + u8("x", 3, 4) + "}", "abcd"), {"bytes [0, 3)", "before tensor 'x'", "no tensor"});
  expect_rejected(dir, make_file("{" + u8("x", 0, 1) + "}", "abcd"), {"bytes [1, 4) at the end", "no tensor"});
  expect_rejected(dir, make_file("{" + u8("x", 0, 1) + "," + u8("y", 2, 3) + "}", "abc"), {"bytes [1, 2)", "'y'"});
  // An empty tensor inside another's bytes overlaps it.
  expect_rejected(dir, make_file("{" + u8("y", 0, 2) + "," + u8("x", 1, 1) + "}", "ab"), {"'y' [0, 2]", "overlap"});
  expect_rejected(dir, make_file(R"({"__metadata__":{"a":"1"},"__metadata__":{"b":"2"}})"), {"\"__metadata__\" 2 times"});
  expect_rejected(dir, make_file("\xEF\xBB\xBF{}"), {"byte-order mark"});

  auto read = [&](const std::string& bytes) {
    const std::string path = dir.file("ok.safetensors");
    write_bytes(path, bytes);
    return dt::read_safetensors(path);
  };
  // A tensor named twice: the last entry holds.
  auto twice = read(make_file(R"({"x":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)" + u8("x", 0, 1) + "}", "a"));
  CATCH_CHECK(twice.tensors.at("x").sizes() == std::vector<int64_t>{1});
  CATCH_CHECK(twice.tensors.at("x").item<uint8_t>() == 'a');
  // [0, 2^32, 2^32] holds no element; its contiguous strides would overflow.
  auto empty = read(make_file(R"({"x":{"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}})"));
  CATCH_CHECK(empty.tensors.at("x").sizes() == std::vector<int64_t>{0, int64_t(1) << 32, int64_t(1) << 32});
  CATCH_CHECK(read(make_file(R"({"__metadata__":null})")).metadata.empty());
  // Empty tensors where the tiling allows them, and header padding of spaces either side.
  auto edges = read(make_file(" {" + u8("e", 0, 0) + "," + u8("y", 0, 1) + "," + u8("z", 1, 1) + "}  ", "a"));
  CATCH_CHECK(edges.tensors.size() == 3);
}

// The dtypes torch and safetensors share beyond the common ten: unsigned and 8-bit floats, compared by their bytes.
CATCH_TEST_CASE("safetensors round-trips unsigned and float8 tensors byte for byte", "[core][safetensors]") {
  dt::testing::TempDir dir;
  std::map<std::string, torch::Tensor> tensors;
  using T = c10::ScalarType;
  const std::vector<std::pair<std::string, T>> dtypes = {
      {"u16", T::UInt16}, {"u32", T::UInt32}, {"u64", T::UInt64}, {"e4m3", T::Float8_e4m3fn}, {"e5m2", T::Float8_e5m2}};
  for (const auto& [name, dtype] : dtypes)
    tensors[name] = torch::randint(0, 127, {3, 8}, torch::kUInt8).view(dtype);
  dt::write_safetensors(dir.file("x.safetensors"), tensors);
  const auto file = dt::read_safetensors(dir.file("x.safetensors"));
  for (const auto& [name, expected] : tensors) {
    CATCH_INFO(name);
    const auto& got = file.tensors.at(name);
    CATCH_CHECK(got.scalar_type() == expected.scalar_type());
    CATCH_CHECK(torch::equal(got.view(torch::kUInt8), expected.view(torch::kUInt8)));
  }
}

CATCH_TEST_CASE("write_safetensors replaces the file atomically and leaves nothing behind on failure",
                "[core][safetensors][errors]") {
  dt::testing::TempDir dir;
  const auto tensors = golden_tensors();

  const std::string nowhere = (dir.path / "no_such_dir" / "w.safetensors").string();
  CATCH_CHECK_THROWS_AS(dt::write_safetensors(nowhere, tensors), dt::CheckpointError);
  CATCH_CHECK_THROWS_WITH(dt::write_safetensors(nowhere, tensors), Contains(nowhere));
  CATCH_CHECK_FALSE(fs::exists(dir.path / "no_such_dir"));

  // Overwriting: the new contents replace the old, and no temporary file remains.
  const std::string path = dir.file("w.safetensors");
  dt::write_safetensors(path, {{"old", torch::ones({3})}});
  dt::write_safetensors(path, tensors, {{"format", "pt"}});
  CATCH_CHECK(read_bytes(path) == golden_bytes());
  CATCH_CHECK(dir.entries() == std::vector<std::string>{"w.safetensors"});

  // A failure after the temporary file is written (the rename, here onto a directory) removes it.
  const std::string taken = dir.file("taken");
  fs::create_directories(fs::path(taken) / "child");
  CATCH_CHECK_THROWS_WITH(dt::write_safetensors(taken, tensors), Contains(taken) && Contains("rename"));
  for (const auto& name : dir.entries()) CATCH_CHECK_THAT(name, !Contains(".tmp-"));

  // Tensors safetensors cannot hold are refused by name before anything is written.
  const std::string complex = dir.file("complex.safetensors");
  CATCH_CHECK_THROWS_WITH(dt::write_safetensors(complex, {{"z", torch::zeros({2}, torch::kComplexFloat)}}),
                          Contains(complex) && Contains("tensor 'z'"));
  CATCH_CHECK_FALSE(fs::exists(complex));
  CATCH_CHECK(dir.entries().size() == 2);  // w.safetensors and taken
}

CATCH_TEST_CASE("TensorMatch fills a model from a file all or nothing and names every problem", "[safetensors]") {
  const auto a = torch::zeros({2, 3}), b = torch::zeros({4}), c = torch::full({2}, 7.0), d = torch::zeros({3});
  const std::map<std::string, torch::Tensor> file{
      {"model.a", torch::arange(6, torch::kHalf).reshape({2, 3})},  // under a prefixed name, F16: widened
      {"b.flat", torch::ones({2, 2})},                              // converted to b's shape
      {"d", torch::ones({5})},                                      // the wrong shape
      {"extra", torch::ones({1})},
      {"ignored.bias", torch::ones({1})}};
  auto flatten = [](const torch::Tensor& t) { return t.reshape(-1); };
  std::vector<dt::detail::TensorSlot> slots{{"a", {"a", "model.a"}, a},
                                    {"b", {"b.flat"}, b, flatten},
                                    {"c", {"c"}, c, {}, /*optional=*/true},
                                    {"d", {"d"}, d}};
  auto ignore = [](const std::string& key) { return key.rfind("ignored.", 0) == 0; };

  const dt::detail::TensorMatch bad(slots, file, ignore);
  CATCH_CHECK_FALSE(bad.fits());
  CATCH_CHECK(bad.problems() == "\n  unexpected (1): extra\n  mismatched (1): d (file Float [5], model Float [3])");
  CATCH_CHECK_THROWS_AS(bad.copy(), dt::Error);
  CATCH_CHECK(torch::equal(a, torch::zeros({2, 3})));  // nothing copied

  slots.pop_back();
  slots.push_back({"e", {"e"}, torch::zeros({1})});
  const dt::detail::TensorMatch missing(slots, file, [](const std::string& key) { return key != "model.a"; });
  CATCH_CHECK(missing.problems() == "\n  missing (1): e");

  slots.pop_back();
  const dt::detail::TensorMatch good(slots, file, [&](const std::string& key) { return ignore(key) || key == "extra" || key == "d"; });
  CATCH_REQUIRE(good.fits());
  good.copy();
  CATCH_CHECK(torch::equal(a, torch::arange(6, torch::kFloat).reshape({2, 3})));
  CATCH_CHECK(torch::equal(b, torch::ones({4})));
  CATCH_CHECK(torch::equal(c, torch::full({2}, 7.0)));  // optional and absent: kept

  // A conversion the file's shape does not allow is a mismatch, not a crash.
  const dt::detail::TensorMatch unreshapeable({{"b", {"d"}, b, [](const torch::Tensor& t) { return t.reshape({2, 2}); }}},
                                      {{"d", torch::ones({5})}});
  CATCH_CHECK(unreshapeable.problems() == "\n  mismatched (1): b (file Float [5], model Float [4])");
  CATCH_CHECK(dt::detail::list_names({"a", "b", "c"}, 2) == "a, b and 1 more");
}

}  // namespace safetensors_test
