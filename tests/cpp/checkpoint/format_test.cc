// The on-disk format: header and JSON round trips, and rejection (DataLoss naming the field) of damaged or
// hostile inputs. The fuzzer (tests/cpp/fuzz/checkpoint_parse_fuzz.cc) covers what these hand-written cases miss.
#include "tessera/checkpoint/format.h"

#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace tessera::checkpoint {
namespace {

::testing::AssertionResult Contains(const std::string& s, const std::string& sub) {
  if (s.find(sub) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << sub << "' not in: " << s;
}

absl::Span<const uint8_t> Bytes(const std::string& s) {
  return absl::MakeConstSpan(reinterpret_cast<const uint8_t*>(s.data()), s.size());
}

TEST(FileHeaderTest, RoundTripsAndIsExactly64LittleEndianBytes) {
  FileHeader h{1, 3, 8, 1234567890123, 987654321};
  const std::string enc = EncodeFileHeader(h);
  ASSERT_EQ(enc.size(), 64u);
  EXPECT_EQ(enc.substr(0, 8), "TSRCKPT1");
  EXPECT_EQ(static_cast<uint8_t>(enc[12]), 3);  // rank, little-endian at offset 12
  EXPECT_EQ(static_cast<uint8_t>(enc[16]), 8);  // world_size at 16
  for (int i = 40; i < 56; ++i) EXPECT_EQ(enc[i], 0) << "reserved byte " << i;
  auto back = ParseFileHeader(Bytes(enc));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->version, 1u);
  EXPECT_EQ(back->rank, 3);
  EXPECT_EQ(back->world_size, 8);
  EXPECT_EQ(back->step, 1234567890123);
  EXPECT_EQ(back->data_bytes, 987654321);
}

TEST(FileHeaderTest, EverySingleBitFlipIsCaught) {
  const std::string enc = EncodeFileHeader(FileHeader{1, 0, 2, 7, 4096});
  for (int byte = 0; byte < 64; ++byte) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bad = enc;
      bad[byte] = static_cast<char>(bad[byte] ^ (1 << bit));
      auto r = ParseFileHeader(Bytes(bad));
      ASSERT_FALSE(r.ok()) << "flip of byte " << byte << " bit " << bit << " went unnoticed";
      EXPECT_TRUE(absl::IsDataLoss(r.status()));
    }
  }
}

TEST(FileHeaderTest, ShortInputIsDataLossWithoutReadingPastIt) {
  const std::string enc = EncodeFileHeader(FileHeader{});
  for (size_t n : {0, 1, 8, 63}) {
    auto r = ParseFileHeader(Bytes(enc).subspan(0, n));
    ASSERT_FALSE(r.ok());
    EXPECT_TRUE(absl::IsDataLoss(r.status()));
    EXPECT_TRUE(Contains(std::string(r.status().message()), "truncated"));
  }
}

TEST(FileHeaderTest, RankOutsideWorldIsRejectedEvenWithAValidChecksum) {
  auto r = ParseFileHeader(Bytes(EncodeFileHeader(FileHeader{1, 5, 4, 0, 0})));
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(std::string(r.status().message()), "rank 5"));
  EXPECT_FALSE(ParseFileHeader(Bytes(EncodeFileHeader(FileHeader{2, 0, 1, 0, 0}))).ok());  // unknown version
  EXPECT_FALSE(ParseFileHeader(Bytes(EncodeFileHeader(FileHeader{1, 0, 1, -1, 0}))).ok());
  EXPECT_FALSE(ParseFileHeader(Bytes(EncodeFileHeader(FileHeader{1, 0, 1, 0, -5}))).ok());
}

TEST(NamesTest, Layout) {
  EXPECT_EQ(StepDirName(12), "step-0000000012");
  EXPECT_EQ(TmpStepDirName(12), ".tmp-step-0000000012");
  EXPECT_EQ(RankFileName(3), "rank-00003.bin");
  EXPECT_EQ(RankIndexName(3), "rank-00003.json");
}

TEST(ChecksumTest, IsXXH3OfTheBytes) {
  // XXH3-64 of the empty input (seed 0), from the xxHash reference implementation.
  EXPECT_EQ(Checksum("", 0), 0x2D06800538D394C2ull);
  EXPECT_NE(Checksum("a", 1), Checksum("b", 1));
}

// Two ranks, two tensors; "b" is split across both files.
Manifest ValidManifest() {
  Manifest m;
  m.step = 42;
  m.world_size = 2;
  m.files = {{"rank-00000.bin", 0, 64 + 40 + 8}, {"rank-00001.bin", 1, 64 + 8}};
  m.tensors.push_back({"a", DType::kFloat32, {2, 5}, {{0, 64, 0, 10, 0x0123456789abcdefull}}});
  m.tensors.push_back({"b", DType::kBFloat16, {8}, {{0, 104, 0, 4, 1}, {1, 64, 4, 4, 0xffffffffffffffffull}}});
  m.global_json = R"({"epoch":3,"nested":{"x":[1,2.5,"s"]}})";
  m.rank_json = {R"({"rng":1})", "{}"};
  return m;
}

TEST(ManifestTest, RoundTrips) {
  const Manifest m = ValidManifest();
  const std::string text = SerializeManifest(m);
  EXPECT_TRUE(Contains(text, "\"format\": \"tessera-checkpoint\""));
  EXPECT_TRUE(Contains(text, "\"xxh3\": \"0123456789abcdef\""));
  EXPECT_TRUE(Contains(text, "\"dtype\": \"bfloat16\""));
  auto back = ParseManifest(text);
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->step, 42);
  EXPECT_EQ(back->world_size, 2);
  ASSERT_EQ(back->files.size(), 2u);
  EXPECT_EQ(back->files[1].name, "rank-00001.bin");
  EXPECT_EQ(back->files[1].bytes, 72);
  ASSERT_EQ(back->tensors.size(), 2u);
  EXPECT_EQ(back->tensors[1].dtype, DType::kBFloat16);
  EXPECT_EQ(back->tensors[0].shape, (std::vector<int64_t>{2, 5}));
  EXPECT_EQ(back->tensors[1].pieces[1].xxh3, 0xffffffffffffffffull);
  EXPECT_EQ(back->tensors[1].pieces[1].file, 1);
  EXPECT_EQ(back->rank_json[0], R"({"rng":1})");
  EXPECT_EQ(back->global_json, m.global_json);
  EXPECT_EQ(SerializeManifest(*back), text);  // stable
}

// Each case: a substring replaced in the valid manifest's JSON, and a word the error must contain.
struct Mutation {
  const char* from;
  const char* to;
  const char* expect;
};

TEST(ManifestTest, RejectsMalformedInputsWithDataLossNamingTheField) {
  const std::string good = SerializeManifest(ValidManifest());
  const Mutation cases[] = {
      {"\"tessera-checkpoint\"", "\"something-else\"", "format"},
      {"\"version\": 1", "\"version\": 2", "version"},
      {"\"version\": 1", "\"version\": \"1\"", "version"},
      {"\"step\": 42", "\"step\": -1", "step"},
      {"\"step\": 42", "\"step\": 4.5", "step"},
      {"\"step\": 42", "\"step\": 18446744073709551615", "step"},
      {"\"world_size\": 2", "\"world_size\": 0", "world_size"},
      {"\"world_size\": 2", "\"world_size\": 3", "ranks"},  // ranks[] length must match
      {"\"dtype\": \"float32\"", "\"dtype\": \"int8\"", "dtype"},
      {"\"shape\": [\n    2,\n    5\n   ]", "\"shape\": [2, -5]", "shape"},
      {"\"shape\": [\n    2,\n    5\n   ]", "\"shape\": [4294967296, 4294967296]", "overflow"},
      {"\"shape\": [\n    2,\n    5\n   ]", "\"shape\": [2, 6]", "cover"},      // 10 of 12 elements covered
      {"\"shape\": [\n    2,\n    5\n   ]", "\"shape\": [3, 3]", "outside"},    // piece past numel
      {"\"name\": \"b\"", "\"name\": \"a\"", "duplicate"},
      {"\"name\": \"rank-00001.bin\"", "\"name\": \"../../etc/passwd\"", "files[1].name"},
      {"\"name\": \"rank-00001.bin\"", "\"name\": \"rank-00000.bin\"", "duplicate file"},
      {"\"xxh3\": \"0123456789abcdef\"", "\"xxh3\": \"0123456789abcdeg\"", "xxh3"},
      {"\"xxh3\": \"0123456789abcdef\"", "\"xxh3\": \"123\"", "xxh3"},
      {"\"xxh3\": \"0123456789abcdef\"", "\"xxh3\": 5", "xxh3"},
      {"\"offset\": 64,\n     \"start\": 0,\n     \"count\": 10", "\"offset\": 63,\n\"start\": 0, \"count\": 10",
       "offset"},
      {"\"offset\": 104", "\"offset\": 9223372036854775807", "offset"},  // offset + bytes overflows
      {"\"file\": 1", "\"file\": 2", "file"},
      {"\"file\": 1", "\"file\": -1", "file"},
      {"\"start\": 4", "\"start\": 3", "overlaps"},
      {"\"count\": 4,\n     \"xxh3\": \"0000000000000001\"", "\"count\": 3, \"xxh3\": \"0000000000000001\"", "gap"},
      {"\"count\": 10", "\"count\": 0", "count"},
      {"\"global\": {", "\"global\": [{", "json"},   // breaks syntax
      {"\"global\": {", "\"globl\": {", "global"},  // missing
      {"\"ranks\": [", "\"ranks\": [5, ", "ranks"},
      {"\"bytes\": 72", "\"bytes\": 10", "bytes"},
      {"\"rank\": 1,", "\"rank\": 2,", "rank"},
      {"\"tensors\": [", "\"tensors\": {\"x\": [", "json"},
  };
  for (const Mutation& c : cases) {
    const size_t at = good.find(c.from);
    ASSERT_NE(at, std::string::npos) << "test bug: '" << c.from << "' not in\n" << good;
    std::string bad = good;
    bad.replace(at, std::strlen(c.from), c.to);
    auto r = ParseManifest(bad, "/ckpt/step-42/manifest.json");
    ASSERT_FALSE(r.ok()) << "accepted: " << c.from << " -> " << c.to;
    EXPECT_TRUE(absl::IsDataLoss(r.status())) << r.status();
    EXPECT_TRUE(Contains(std::string(r.status().message()), c.expect)) << c.from << " -> " << c.to;
    EXPECT_TRUE(Contains(std::string(r.status().message()), "/ckpt/step-42/manifest.json"));
  }
}

TEST(ManifestTest, RejectsNonJsonTruncationAndDeepNesting) {
  const std::string good = SerializeManifest(ValidManifest());
  for (size_t n = 0; n < good.size(); n += 7) EXPECT_FALSE(ParseManifest(good.substr(0, n)).ok()) << n;
  EXPECT_FALSE(ParseManifest("[]").ok());
  EXPECT_FALSE(ParseManifest("\xff\xfe").ok());
  std::string deep = good;
  deep.replace(deep.find("\"global\": {"), 11, "\"global\": {\"d\":" + std::string(100000, '[') + "1" +
                                                   std::string(100000, ']') + ",");
  auto r = ParseManifest(deep);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(std::string(r.status().message()), "nested"));
}

RankIndex ValidIndex(int rank) {
  RankIndex r;
  r.rank = rank;
  r.world_size = 2;
  r.step = 42;
  r.file = {RankFileName(rank), rank, 64 + 16};
  r.tensors.push_back({"t", DType::kFloat32, {8}, {{0, 64, rank * 4, 4, 100u + rank}}});
  r.rank_json = rank == 0 ? R"({"r":0})" : R"({"r":1})";
  r.global_json = R"({"g":true})";
  return r;
}

TEST(RankIndexTest, RoundTripsAndMerges) {
  std::vector<RankIndex> parsed;
  for (int rank : {1, 0}) {  // merge must not depend on order
    auto back = ParseRankIndex(SerializeRankIndex(ValidIndex(rank)), "idx");
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->rank, rank);
    EXPECT_EQ(back->file.name, RankFileName(rank));
    parsed.push_back(*back);
  }
  auto m = MergeRankIndexes(parsed);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->files[0].name, "rank-00000.bin");
  ASSERT_EQ(m->tensors.size(), 1u);
  ASSERT_EQ(m->tensors[0].pieces.size(), 2u);
  EXPECT_EQ(m->tensors[0].pieces[1].file, 1);
  EXPECT_EQ(m->tensors[0].pieces[1].start, 4);
  EXPECT_EQ(m->tensors[0].pieces[1].xxh3, 101u);
  EXPECT_EQ(m->global_json, R"({"g":true})");
  EXPECT_EQ(m->rank_json[1], R"({"r":1})");
  EXPECT_TRUE(ParseManifest(SerializeManifest(*m)).ok());
}

TEST(RankIndexTest, MergeRejectsMissingDuplicateOrInconsistentRanks) {
  EXPECT_FALSE(MergeRankIndexes({}).ok());
  EXPECT_FALSE(MergeRankIndexes({ValidIndex(0)}).ok());                  // rank 1 missing
  EXPECT_FALSE(MergeRankIndexes({ValidIndex(0), ValidIndex(0)}).ok());   // rank 0 twice
  RankIndex other_step = ValidIndex(1);
  other_step.step = 41;
  EXPECT_FALSE(MergeRankIndexes({ValidIndex(0), other_step}).ok());
  RankIndex other_dtype = ValidIndex(1);
  other_dtype.tensors[0].dtype = DType::kFloat16;
  other_dtype.file.bytes = 64 + 8;
  auto r = MergeRankIndexes({ValidIndex(0), other_dtype});
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(Contains(std::string(r.status().message()), "'t'"));
  RankIndex overlap = ValidIndex(1);
  overlap.tensors[0].pieces[0].start = 2;  // [2, 6) overlaps rank 0's [0, 4)
  EXPECT_FALSE(MergeRankIndexes({ValidIndex(0), overlap}).ok());
  RankIndex hole = ValidIndex(1);
  hole.tensors[0].shape = {9};  // element 8 in no piece (and the shapes disagree)
  EXPECT_FALSE(MergeRankIndexes({ValidIndex(0), hole}).ok());
}

TEST(RankIndexTest, RejectsMalformed) {
  const std::string good = SerializeRankIndex(ValidIndex(1));
  const Mutation cases[] = {
      {"\"tessera-rank-index\"", "\"tessera-checkpoint\"", "format"},
      {"\"rank\": 1,\n \"world_size\"", "\"rank\": 2,\n \"world_size\"", "rank"},
      {"\"file\": 0", "\"file\": 1", "file"},
      {"\"rank_extra\": {", "\"rank_extra\": [{", "json"},
      {"\"bytes\": 80", "\"bytes\": 79", "offset"},
  };
  for (const Mutation& c : cases) {
    const size_t at = good.find(c.from);
    ASSERT_NE(at, std::string::npos) << "test bug: '" << c.from << "' not in\n" << good;
    std::string bad = good;
    bad.replace(at, std::strlen(c.from), c.to);
    auto r = ParseRankIndex(bad, "rank-00001.json");
    ASSERT_FALSE(r.ok()) << c.from << " -> " << c.to;
    EXPECT_TRUE(absl::IsDataLoss(r.status()));
    EXPECT_TRUE(Contains(std::string(r.status().message()), c.expect)) << c.from << " -> " << c.to;
  }
}

}  // namespace
}  // namespace tessera::checkpoint
