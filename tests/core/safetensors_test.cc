#include "core/safetensors.h"

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "common/file.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "testing/test_util.h"

namespace sae {
namespace {

using ::testing::HasSubstr;

std::string WriteRaw(const std::string& dir, const std::string& name, const std::string& header,
                     const std::string& data, int64_t header_len_override = -1) {
  const std::string path = dir + "/" + name;
  std::ofstream out(path, std::ios::binary);
  uint64_t len = header_len_override >= 0 ? static_cast<uint64_t>(header_len_override) : header.size();
  for (int i = 0; i < 8; ++i) out.put(static_cast<char>((len >> (8 * i)) & 0xff));
  out << header << data;
  return path;
}

// The reader every config, hyperparams, tokenizer and index file goes
// through: a directory or a missing file is an error naming the path (an
// std::ifstream on a directory opens, then reads nothing).
TEST(FileTest, ReadsFilesAndNamesThePathOfWhatItCannotRead) {
  const std::string dir = testing::MakeTempDir("file-test");
  std::ofstream(dir + "/a.json", std::ios::binary) << std::string("{\"x\": 1}\0tail", 14);
  std::ofstream(dir + "/empty.json", std::ios::binary).flush();
  absl::StatusOr<std::string> text = ReadFileToString(dir + "/a.json");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, std::string("{\"x\": 1}\0tail", 14));
  text = ReadFileToString(dir + "/empty.json");
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text, "");
  const absl::Status directory = ReadFileToString(dir).status();
  EXPECT_EQ(directory.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(directory.message(), HasSubstr(dir + ": is a directory"));
  const absl::Status missing = ReadFileToString(dir + "/b.json").status();
  EXPECT_EQ(missing.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.message(), HasSubstr(dir + "/b.json: cannot open: No such file or directory"));
  std::ifstream in;
  EXPECT_EQ(OpenInputFile(dir, &in).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(OpenInputFile(dir + "/a.json", &in).ok());
}

TEST(DTypeTest, Bf16RoundsToNearestEven) {
  EXPECT_EQ(F32ToBf16(1.0f), 0x3f80);
  EXPECT_EQ(Bf16ToF32(0x3f80), 1.0f);
  // 1 + 2^-8 is exactly halfway between two bf16 values: ties go to even.
  EXPECT_EQ(F32ToBf16(1.00390625f), 0x3f80);
  EXPECT_EQ(F32ToBf16(1.01171875f), 0x3f82);
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(NAN))));
}

TEST(DTypeTest, F16RoundTripsRepresentableValues) {
  for (float v : {0.0f, 1.0f, -2.5f, 65504.0f, 6.103515625e-05f, 5.960464477539063e-08f}) {
    EXPECT_EQ(F16ToF32(F32ToF16(v)), v) << v;
  }
  EXPECT_TRUE(std::isinf(F16ToF32(F32ToF16(1e6f))));
}

TEST(SafetensorsTest, RoundTripsEveryDType) {
  const std::string dir = testing::MakeTempDir("st-roundtrip");
  const std::vector<float> values = {1.0f, -2.0f, 0.5f, 3.25f, -0.125f, 7.0f};
  ASSERT_TRUE(
      WriteSafetensors(dir + "/a.safetensors",
                       {MakeTensor("f32", DType::kF32, {2, 3}, values),
                        MakeTensor("bf16", DType::kBF16, {3, 2}, values), MakeTensor("f16", DType::kF16, {6}, values)},
                       {{"format", "pt"}})
          .ok());
  auto file = SafetensorsFile::Open(dir + "/a.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  for (const char* name : {"f32", "bf16", "f16"}) {
    const HostTensor& t = (*file)->tensors().at(name);
    std::vector<float> back(t.numel());
    ConvertToF32(t.data, t.dtype, back.size(), back.data());
    EXPECT_EQ(back, values) << name;
  }
  EXPECT_EQ((*file)->tensors().at("bf16").shape, (std::vector<int64_t>{3, 2}));
}

// The streaming writer: header first, tensors in the declared order (here
// not the name order), under PATH.partial until Finish.
TEST(SafetensorsTest, WriterStreamsDeclaredTensors) {
  const std::string dir = testing::MakeTempDir("st-writer");
  const std::string path = dir + "/w.safetensors";
  const std::vector<float> b = {1.5f, -2.0f, 3.0f}, a = {4.0f, 5.0f};
  {
    auto writer = SafetensorsWriter::Create(path, {{"b.0", DType::kF32, {3}}, {"a.0", DType::kF32, {1, 2}}});
    ASSERT_TRUE(writer.ok()) << writer.status();
    EXPECT_TRUE(std::filesystem::exists(path + ".partial"));
    EXPECT_FALSE(std::filesystem::exists(path));
    // Out of order, the wrong size, unfinished: refused.
    EXPECT_EQ((*writer)->Append("a.0", a.data(), 8).code(), absl::StatusCode::kFailedPrecondition);
    const absl::Status short_write = (*writer)->Append("b.0", b.data(), 8);
    EXPECT_EQ(short_write.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(short_write.message(), ::testing::HasSubstr("\"b.0\" of 8 bytes written where \"b.0\" of 12 bytes"));
    ASSERT_TRUE((*writer)->Append("b.0", b.data(), 12).ok());
    EXPECT_THAT((*writer)->Finish().message(), ::testing::HasSubstr("1 of the 2 declared tensors written"));
    ASSERT_TRUE((*writer)->Append("a.0", a.data(), 8).ok());
    EXPECT_EQ((*writer)->Append("c", a.data(), 0).code(), absl::StatusCode::kFailedPrecondition);
    ASSERT_TRUE((*writer)->Finish().ok());
  }
  EXPECT_FALSE(std::filesystem::exists(path + ".partial"));
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<float> back(3);
  ConvertToF32((*file)->tensors().at("b.0").data, DType::kF32, 3, back.data());
  EXPECT_EQ(back, b);
  back.resize(2);
  ConvertToF32((*file)->tensors().at("a.0").data, DType::kF32, 2, back.data());
  EXPECT_EQ(back, a);
  EXPECT_EQ((*file)->tensors().at("a.0").shape, (std::vector<int64_t>{1, 2}));

  // A writer given up on leaves no file, not even the partial one.
  {
    auto writer = SafetensorsWriter::Create(dir + "/dropped.safetensors", {{"x", DType::kF32, {1}}});
    ASSERT_TRUE(writer.ok()) << writer.status();
  }
  EXPECT_FALSE(std::filesystem::exists(dir + "/dropped.safetensors.partial"));
  EXPECT_FALSE(std::filesystem::exists(dir + "/dropped.safetensors"));

  // Names must be unique and not empty; the header must stay under the
  // 100 MiB readers accept (refused as soon as it passes, naming the count).
  auto repeated = SafetensorsWriter::Create(dir + "/r.safetensors", {{"x", DType::kF32, {1}}, {"x", DType::kF32, {2}}});
  EXPECT_EQ(repeated.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(repeated.status().message(), ::testing::HasSubstr("tensor name \"x\" is reserved or repeated"));
  size_t made = 0;
  const std::string prefix(20000, 'h');  // long names reach the limit sooner
  auto huge = SafetensorsWriter::Create(dir + "/h.safetensors", 10'000'000, [&](size_t i) {
    ++made;
    return TensorSpec{absl::StrCat(i, prefix), DType::kF32, {100, 4096}};
  });
  EXPECT_EQ(huge.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(huge.status().message(), ::testing::HasSubstr("the header of 10000000 tensors would pass the 100 MiB"));
  EXPECT_LT(made, 10'000u);
  EXPECT_FALSE(std::filesystem::exists(dir + "/h.safetensors.partial"));
}

// A writer kept (set_keep_partial) leaves PATH.partial; Continue() goes on
// from its whole tensors, in whole multiples, after checking that its header
// is the one the same declaration makes.
TEST(SafetensorsTest, ContinueGoesOnFromTheWholeTensors) {
  const std::string dir = testing::MakeTempDir("st-continue");
  const std::string path = dir + "/c.safetensors", whole = dir + "/whole.safetensors";
  const std::vector<TensorSpec> specs = {
      {"p", DType::kF32, {2}}, {"q", DType::kF32, {2}}, {"r", DType::kF32, {2}}, {"s", DType::kF32, {2}}};
  auto spec = [&](size_t i) { return specs[i]; };
  const float data[4][2] = {{1, 2}, {3, 4}, {5, 6}, {7, 8}};
  auto write = [&](SafetensorsWriter& writer, size_t from, size_t to) {
    for (size_t i = from; i < to; ++i) ASSERT_TRUE(writer.Append(specs[i].name, data[i], 8).ok()) << i;
  };
  {
    auto writer = SafetensorsWriter::Create(whole, specs);
    ASSERT_TRUE(writer.ok()) << writer.status();
    write(**writer, 0, 4);
    ASSERT_TRUE((*writer)->Finish().ok());
  }
  const absl::StatusOr<std::string> expected = ReadFileToString(whole);
  ASSERT_TRUE(expected.ok());
  auto stop_after = [&](size_t n, const std::string& torn) {
    auto writer = SafetensorsWriter::Create(path, specs);
    ASSERT_TRUE(writer.ok()) << writer.status();
    write(**writer, 0, n);
    (*writer)->set_keep_partial(true);
    ASSERT_TRUE((*writer)->Flush().ok());
    writer->reset();
    std::ofstream(path + ".partial", std::ios::binary | std::ios::app) << torn;
  };

  // Three whole tensors and a torn fourth: at most 2 asked, in pairs.
  stop_after(3, "xyz");
  auto continued = SafetensorsWriter::Continue(path, specs.size(), spec, {}, 2, 2);
  ASSERT_TRUE(continued.ok()) << continued.status();
  EXPECT_EQ((*continued)->written(), 2u);
  write(**continued, 2, 4);
  ASSERT_TRUE((*continued)->Finish().ok());
  EXPECT_EQ(ReadFileToString(path).value(), *expected);
  EXPECT_FALSE(std::filesystem::exists(path + ".partial"));

  // Three whole, in pairs: two kept (the third is cut off).
  stop_after(3, "");
  continued = SafetensorsWriter::Continue(path, specs.size(), spec, {}, 4, 2);
  ASSERT_TRUE(continued.ok()) << continued.status();
  EXPECT_EQ((*continued)->written(), 2u);
  continued->reset();  // not kept: removed
  EXPECT_FALSE(std::filesystem::exists(path + ".partial"));

  // Another declaration's file; a file shorter than the header; none.
  stop_after(1, "");
  std::vector<TensorSpec> other = specs;
  other[3].shape = {3};
  continued = SafetensorsWriter::Continue(
      path, other.size(), [&](size_t i) { return other[i]; }, {}, 4);
  EXPECT_EQ(continued.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(continued.status().message(), ::testing::HasSubstr("its header is not the one this run writes"));
  std::filesystem::resize_file(path + ".partial", 20);
  continued = SafetensorsWriter::Continue(path, specs.size(), spec, {}, 4);
  EXPECT_THAT(continued.status().message(), ::testing::HasSubstr("shorter than the header this run writes"));
  std::filesystem::remove(path + ".partial");
  continued = SafetensorsWriter::Continue(path, specs.size(), spec, {}, 4);
  EXPECT_EQ(continued.status().code(), absl::StatusCode::kNotFound);
}

TEST(SafetensorsTest, ShardedStoreUsesTheIndex) {
  const std::string dir = testing::MakeTempDir("st-sharded");
  ASSERT_TRUE(WriteSafetensors(dir + "/s1.safetensors", {MakeTensor("a", DType::kF32, {1}, {1})}).ok());
  ASSERT_TRUE(WriteSafetensors(dir + "/s2.safetensors", {MakeTensor("b", DType::kF32, {2}, {2, 3})}).ok());
  std::ofstream(dir + "/model.safetensors.index.json")
      << R"({"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})";
  auto store = TensorStore::Open(dir);
  ASSERT_TRUE(store.ok()) << store.status();
  EXPECT_EQ((*store)->size(), 2u);
  EXPECT_THAT((*store)->FileOf("b"), HasSubstr("s2.safetensors"));
  auto missing = (*store)->Get("c");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(missing.status().message(), HasSubstr("\"c\""));
  auto wrong = (*store)->GetWithShape("b", {3});
  EXPECT_THAT(wrong.status().message(), HasSubstr("s2.safetensors"));
  EXPECT_THAT(wrong.status().message(), HasSubstr("expected [3]"));
}

TEST(SafetensorsTest, DuplicateTensorAcrossShardsIsAnError) {
  const std::string dir = testing::MakeTempDir("st-dup");
  ASSERT_TRUE(WriteSafetensors(dir + "/s1.safetensors", {MakeTensor("a", DType::kF32, {1}, {1})}).ok());
  ASSERT_TRUE(WriteSafetensors(dir + "/s2.safetensors", {MakeTensor("a", DType::kF32, {1}, {1})}).ok());
  auto store = TensorStore::Open(dir);
  EXPECT_THAT(store.status().message(), HasSubstr("also appears in"));
}

struct BadFile {
  const char* name;
  std::string header;
  std::string data;
  int64_t header_len;
  const char* expect;
};

TEST(SafetensorsTest, BadFilesNameTheFileAndTheField) {
  const std::string dir = testing::MakeTempDir("st-bad");
  const std::vector<BadFile> cases = {
      {"short", "", "", -1, "too short"},
      {"huge_header", "{}", "", 1 << 20, "exceeds the file size"},
      {"not_json", "{oops", "", -1, "not a JSON object"},
      {"no_dtype", R"({"t": {"shape": [1], "data_offsets": [0, 4]}})", std::string(4, '\0'), -1, "\"dtype\""},
      {"bad_dtype", R"({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}})", std::string(4, '\0'), -1,
       "unsupported dtype"},
      {"bad_offsets", R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", std::string(4, '\0'), -1,
       "outside the data section"},
      {"size_mismatch", R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}})", std::string(8, '\0'), -1,
       "needs 8"},
      {"negative_shape", R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})", std::string(4, '\0'), -1,
       "\"shape\""},
      // A shape whose element count overflows int64 (and would need more than the file).
      {"overflowing_shape", R"({"t": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 0]}})", "",
       -1, "needs more bytes"},
      {"huge_dim", R"({"t": {"dtype": "F32", "shape": [9223372036854775808, 0], "data_offsets": [0, 0]}})", "", -1,
       "\"shape\" has 9223372036854775808"},
      {"repeated_name",
       R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
       std::string(8, '\0'), -1, "\"t\" appears twice"},
      {"overlap",
       R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}})",
       std::string(8, '\0'), -1, "tensors overlap"},
      {"gap",
       R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
           "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}})",
       std::string(12, '\0'), -1, "a gap at byte 4"},
      {"trailing_bytes", R"({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})", std::string(12, '\0'), -1,
       "end at byte 4 of a 12-byte data section"},
  };
  for (const BadFile& c : cases) {
    std::string path;
    if (std::string(c.name) == "short") {
      path = dir + "/short.safetensors";
      std::ofstream(path) << "abc";
    } else {
      path = WriteRaw(dir, std::string(c.name) + ".safetensors", c.header, c.data, c.header_len);
    }
    auto file = SafetensorsFile::Open(path);
    ASSERT_FALSE(file.ok()) << c.name;
    EXPECT_THAT(file.status().message(), HasSubstr(path)) << c.name;
    EXPECT_THAT(file.status().message(), HasSubstr(c.expect)) << c.name;
  }
  EXPECT_EQ(SafetensorsFile::Open(dir + "/absent.safetensors").status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace sae
