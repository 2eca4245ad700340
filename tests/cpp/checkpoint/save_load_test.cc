// Save on 1-3 ranks (threads as ranks, one writer each, as separate processes would), then read back arbitrary
// ranges and every resharded layout; compared bytewise with the reference tensors.
#include <random>

#include "checkpoint/checkpoint_testing.h"
#include "tessera/checkpoint/format.h"

namespace tessera::checkpoint {
namespace {

using testing::Contains;
using testing::DefaultTensors;
using testing::Local;
using testing::MakeTensor;
using testing::PathExists;
using testing::ReadsBack;
using testing::RefTensor;
using testing::SaveAllRanks;
using testing::TempDir;

class SaveLoadTest : public ::testing::TestWithParam<int> {};

TEST_P(SaveLoadTest, RoundTripsAndReshardsToAnyWorldSize) {
  const int world = GetParam();
  TempDir dir;
  const std::vector<RefTensor> tensors = DefaultTensors();
  for (const absl::Status& s : SaveAllRanks(dir.path(), 7, world, tensors)) ASSERT_TRUE(s.ok()) << s;

  auto storage = Local(dir.path());
  EXPECT_FALSE(PathExists(dir / ".tmp-step-0000000007"));
  EXPECT_EQ(testing::ReadFile(dir / "latest"), "7\n");
  auto steps = ListCommittedSteps(*storage);
  ASSERT_TRUE(steps.ok());
  EXPECT_EQ(*steps, std::vector<int64_t>{7});
  auto reader = CheckpointReader::Open(storage, 7);
  ASSERT_TRUE(reader.ok()) << reader.status();
  const Manifest& m = (*reader)->manifest();
  EXPECT_EQ(m.world_size, world);
  ASSERT_EQ(m.files.size(), static_cast<size_t>(world));
  ASSERT_EQ(m.rank_json.size(), static_cast<size_t>(world));
  EXPECT_EQ(m.rank_json[world - 1], "{\"rng\":" + std::to_string(100 + world - 1) + "}");
  EXPECT_EQ(m.global_json, "{\"epoch\":3}");
  ASSERT_EQ(m.tensors.size(), tensors.size());

  std::mt19937 rng(world);
  for (const RefTensor& t : tensors) {
    EXPECT_TRUE(ReadsBack(**reader, t, 0, t.numel()));
    // Loading on any world size: rank r of w reads its contiguous share, across piece boundaries.
    for (int w = 1; w <= 4; ++w) {
      for (int r = 0; r < w; ++r) {
        const int64_t lo = t.numel() * r / w, hi = t.numel() * (r + 1) / w;
        EXPECT_TRUE(ReadsBack(**reader, t, lo, hi - lo)) << "load world " << w << " rank " << r;
      }
    }
    for (int i = 0; i < 20 && t.numel() > 0; ++i) {
      const int64_t a = std::uniform_int_distribution<int64_t>(0, t.numel())(rng);
      const int64_t b = std::uniform_int_distribution<int64_t>(a, t.numel())(rng);
      EXPECT_TRUE(ReadsBack(**reader, t, a, b - a));
    }
  }
  EXPECT_TRUE((*reader)->VerifyAll().ok());
}

INSTANTIATE_TEST_SUITE_P(Worlds, SaveLoadTest, ::testing::Values(1, 2, 3));

TEST(SaveLoadTest, LargeTensorSpanningManyChunksAndWorkers) {
  TempDir dir;
  // 40 MiB + odd tail: several 16 MiB persist chunks, three workers.
  const std::vector<RefTensor> tensors = {MakeTensor("big", DType::kFloat32, {(40 << 18) + 3}, 9),
                                          MakeTensor("small", DType::kFloat16, {5}, 10)};
  WriterOptions opts;
  opts.threads = 3;
  for (const absl::Status& s : SaveAllRanks(dir.path(), 1, 2, tensors, opts)) ASSERT_TRUE(s.ok()) << s;
  auto reader = CheckpointReader::Open(Local(dir.path()), 1);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_TRUE(ReadsBack(**reader, tensors[0], 0, tensors[0].numel()));
  EXPECT_TRUE(ReadsBack(**reader, tensors[0], 12345, 7 << 20));
  EXPECT_TRUE(ReadsBack(**reader, tensors[1], 1, 3));
}

TEST(SaveLoadTest, SourcesMayChangeOnceStagedAndTheWriterIsReused) {
  TempDir dir;
  auto writer = CheckpointWriter::Create(Local(dir.path()), {});
  ASSERT_TRUE(writer.ok());
  for (int64_t step = 1; step <= 3; ++step) {
    RefTensor t = MakeTensor("w", DType::kFloat32, {1000}, static_cast<uint32_t>(step));
    const RefTensor reference = t;
    SaveRequest req;
    req.step = step;
    for (int64_t off = 0; off < 1000; off += 250) {
      req.pieces.push_back({"w", {1000}, off, BufferView{t.bytes.data() + off * 4, DType::kFloat32, 250, {}}});
    }
    auto handle = (*writer)->Save(req);
    ASSERT_TRUE(handle.ok()) << handle.status();
    ASSERT_TRUE((*handle)->WaitStaged(1).ok());
    std::memset(t.bytes.data(), 0, 500 * 4);  // pieces 0 and 1 are staged: the optimizer may update them
    ASSERT_TRUE((*handle)->WaitAllStaged().ok());
    std::fill(t.bytes.begin(), t.bytes.end(), 0xEE);
    ASSERT_TRUE((*handle)->Wait().ok()) << (*handle)->Wait();
    EXPECT_TRUE((*handle)->done());
    EXPECT_TRUE((*handle)->Wait().ok());  // idempotent
    EXPECT_FALSE((*handle)->WaitStaged(4).ok());
    auto reader = CheckpointReader::Open(Local(dir.path()), step);
    ASSERT_TRUE(reader.ok()) << reader.status();
    EXPECT_TRUE(ReadsBack(**reader, reference, 0, 1000));
  }
}

TEST(SaveLoadTest, AfterStagedRunsOncePieceIsCopiedAndBeforeItIsPublished) {
  TempDir dir;
  auto writer = CheckpointWriter::Create(Local(dir.path()), {});
  ASSERT_TRUE(writer.ok());
  RefTensor t = MakeTensor("w", DType::kFloat32, {900}, 3);
  const RefTensor reference = t;
  auto request = [&](int64_t step) {
    SaveRequest req;
    req.step = step;
    for (int64_t off = 0; off < 900; off += 300) {
      req.pieces.push_back({"w", {900}, off, BufferView{t.bytes.data() + off * 4, DType::kFloat32, 300, {}}});
    }
    return req;
  };
  // The hook overwrites the piece's source: its bytes are already in host memory, so the checkpoint keeps them.
  std::vector<int64_t> calls;
  SaveRequest ok = request(1);
  ok.after_staged = [&](int64_t i) {
    calls.push_back(i);
    std::memset(t.bytes.data() + i * 300 * 4, 0, 300 * 4);
    return absl::OkStatus();
  };
  auto handle = (*writer)->Save(std::move(ok));
  ASSERT_TRUE(handle.ok()) << handle.status();
  ASSERT_TRUE((*handle)->Wait().ok()) << (*handle)->Wait();
  EXPECT_EQ(calls, (std::vector<int64_t>{0, 1, 2}));
  auto reader = CheckpointReader::Open(Local(dir.path()), 1);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_TRUE(ReadsBack(**reader, reference, 0, 900));

  // An error fails the save with it; the piece it was about is never reported as staged, later ones never copied.
  calls.clear();
  SaveRequest bad = request(2);
  bad.after_staged = [&](int64_t i) {
    calls.push_back(i);
    return i == 1 ? absl::AbortedError("w changed in place") : absl::OkStatus();
  };
  handle = (*writer)->Save(std::move(bad));
  ASSERT_TRUE(handle.ok()) << handle.status();
  absl::Status s = (*handle)->Wait();
  EXPECT_TRUE(absl::IsAborted(s)) << s;
  EXPECT_TRUE(Contains(std::string(s.message()), "w changed in place"));
  EXPECT_TRUE((*handle)->WaitStaged(0).ok());
  EXPECT_FALSE((*handle)->WaitStaged(1).ok());
  EXPECT_EQ(calls, (std::vector<int64_t>{0, 1}));
  EXPECT_FALSE(PathExists(dir / "step-0000000002"));
}

TEST(SaveLoadTest, ReadRejectsWrongDtypeRangeAndName) {
  TempDir dir;
  const std::vector<RefTensor> tensors = DefaultTensors();
  for (const absl::Status& s : SaveAllRanks(dir.path(), 3, 1, tensors)) ASSERT_TRUE(s.ok()) << s;
  auto reader = CheckpointReader::Open(Local(dir.path()), 3);
  ASSERT_TRUE(reader.ok());
  std::vector<double> buf(8);
  absl::Status s = (*reader)->Read("model/w1", 0, BufferView{buf.data(), DType::kFloat64, 8, {}});
  EXPECT_TRUE(absl::IsInvalidArgument(s));
  EXPECT_TRUE(Contains(std::string(s.message()), "model/w1"));
  EXPECT_TRUE(Contains(std::string(s.message()), "float32"));
  EXPECT_TRUE(Contains(std::string(s.message()), "float64"));
  s = (*reader)->Read("tiny", 1, BufferView{buf.data(), DType::kFloat64, 2, {}});
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  s = (*reader)->Read("tiny", -1, BufferView{buf.data(), DType::kFloat64, 1, {}});
  EXPECT_TRUE(absl::IsInvalidArgument(s)) << s;
  s = (*reader)->Read("nope", 0, BufferView{buf.data(), DType::kFloat64, 1, {}});
  EXPECT_TRUE(absl::IsNotFound(s)) << s;
  EXPECT_TRUE((*reader)->Read("empty", 0, BufferView{nullptr, DType::kFloat32, 0, {}}).ok());
  EXPECT_TRUE(absl::IsNotFound(CheckpointReader::Open(Local(dir.path()), 4).status()));
}

TEST(SaveLoadTest, SaveRejectsBadRequestsUpFront) {
  TempDir dir;
  auto writer = CheckpointWriter::Create(Local(dir.path()), {});
  ASSERT_TRUE(writer.ok());
  std::vector<float> data(10);
  auto piece = [&](int64_t start, int64_t count) {
    return SavePiece{"w", {10}, start, BufferView{data.data(), DType::kFloat32, count, {}}};
  };
  SaveRequest overlap;
  overlap.pieces = {piece(0, 6), piece(5, 5)};
  EXPECT_TRUE(absl::IsInvalidArgument((*writer)->Save(overlap).status()));
  SaveRequest outside;
  outside.pieces = {piece(8, 3)};
  EXPECT_TRUE(absl::IsInvalidArgument((*writer)->Save(outside).status()));
  SaveRequest bad_rank;
  bad_rank.rank = 2;
  bad_rank.world_size = 2;
  EXPECT_TRUE(absl::IsInvalidArgument((*writer)->Save(bad_rank).status()));
  SaveRequest bad_json;
  bad_json.global_json = "[1]";
  EXPECT_TRUE(absl::IsInvalidArgument((*writer)->Save(bad_json).status()));
  SaveRequest mixed;
  mixed.pieces = {piece(0, 5), SavePiece{"w", {10}, 5, BufferView{data.data(), DType::kFloat16, 5, {}}}};
  EXPECT_TRUE(absl::IsInvalidArgument((*writer)->Save(mixed).status()));
#ifndef TESSERA_WITH_CUDA
  SaveRequest cuda;
  cuda.pieces = {SavePiece{"w", {10}, 0, BufferView{data.data(), DType::kFloat32, 10, Device::CUDA(0)}}};
  EXPECT_TRUE(absl::IsFailedPrecondition((*writer)->Save(cuda).status()));
#endif
  WriterOptions no_threads;
  no_threads.threads = 0;
  EXPECT_TRUE(absl::IsInvalidArgument(CheckpointWriter::Create(Local(dir.path()), no_threads).status()));
  WriterOptions typo;
  typo.crash_point = "after_lunch";
  EXPECT_TRUE(absl::IsInvalidArgument(CheckpointWriter::Create(Local(dir.path()), typo).status()));
  EXPECT_FALSE(PathExists(dir / "step-0000000000"));
}

}  // namespace
}  // namespace tessera::checkpoint
