// The commit protocol: nothing is visible before every rank is durable, `latest` and retention, a missing rank,
// and what a kill -9 at each crash point leaves (children killed by the writer's own SIGKILL).
#include <signal.h>
#include <sys/wait.h>

#include <chrono>

#include "checkpoint/checkpoint_testing.h"
#include "tessera/checkpoint/format.h"

namespace tessera::checkpoint {
namespace {

using testing::Contains;
using testing::DefaultTensors;
using testing::Local;
using testing::PathExists;
using testing::ReadsBack;
using testing::RefTensor;
using testing::SaveAllRanks;
using testing::TempDir;

TEST(CommitTest, NothingIsCommittedBeforeEveryRankIsDone) {
  TempDir dir;
  const std::vector<RefTensor> tensors = DefaultTensors();
  std::vector<absl::Status> rank0;
  std::thread t0([&] { rank0 = SaveAllRanks(dir.path(), 5, 2, tensors, {}, {0}); });
  // Rank 0's own part is durable (its index is its done marker), but rank 1 has not saved yet.
  const std::string idx0 = dir / ".tmp-step-0000000005/rank-00000.json";
  for (int i = 0; i < 2000 && !PathExists(idx0); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_TRUE(PathExists(idx0));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(PathExists(dir / "step-0000000005"));
  EXPECT_FALSE(PathExists(dir / "latest"));
  std::vector<absl::Status> rank1 = SaveAllRanks(dir.path(), 5, 2, tensors, {}, {1});
  t0.join();
  ASSERT_TRUE(rank0[0].ok()) << rank0[0];
  ASSERT_TRUE(rank1[0].ok()) << rank1[0];
  EXPECT_TRUE(PathExists(dir / "step-0000000005/manifest.json"));
  EXPECT_FALSE(PathExists(dir / ".tmp-step-0000000005"));
  auto latest = ReadLatest(*Local(dir.path()));
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, std::optional<int64_t>(5));
}

TEST(CommitTest, RetentionKeepsTheNewestKeepLast) {
  TempDir dir;
  WriterOptions opts;
  opts.keep_last = 2;
  const std::vector<RefTensor> tensors = {testing::MakeTensor("w", DType::kFloat32, {64}, 1)};
  for (int64_t step : {10, 20, 30, 40}) {
    for (const absl::Status& s : SaveAllRanks(dir.path(), step, 2, tensors, opts)) ASSERT_TRUE(s.ok()) << s;
  }
  auto steps = ListCommittedSteps(*Local(dir.path()));
  ASSERT_TRUE(steps.ok());
  EXPECT_EQ(*steps, (std::vector<int64_t>{40, 30}));
  EXPECT_EQ(testing::ReadFile(dir / "latest"), "40\n");
  // Re-saving an older step (training resumed from an earlier checkpoint) replaces it and is never pruned itself.
  for (const absl::Status& s : SaveAllRanks(dir.path(), 30, 2, tensors, opts)) ASSERT_TRUE(s.ok()) << s;
  for (const absl::Status& s : SaveAllRanks(dir.path(), 5, 1, tensors, opts)) ASSERT_TRUE(s.ok()) << s;
  steps = ListCommittedSteps(*Local(dir.path()));
  EXPECT_EQ(*steps, (std::vector<int64_t>{40, 30, 5}));
  EXPECT_EQ(testing::ReadFile(dir / "latest"), "5\n");
  auto reader = CheckpointReader::Open(Local(dir.path()), 5);
  ASSERT_TRUE(reader.ok()) << reader.status();
  EXPECT_EQ((*reader)->manifest().world_size, 1);
  EXPECT_TRUE(ReadsBack(**reader, tensors[0], 0, 64));
  auto names = Local(dir.path())->List("");
  ASSERT_TRUE(names.ok());
  for (const std::string& name : *names) EXPECT_NE(name.rfind(".tmp-", 0), 0u) << name;
}

TEST(CommitTest, KeepLastZeroKeepsAll) {
  TempDir dir;
  WriterOptions opts;
  opts.keep_last = 0;
  const std::vector<RefTensor> tensors = {testing::MakeTensor("w", DType::kFloat32, {4}, 1)};
  for (int64_t step = 1; step <= 5; ++step) {
    for (const absl::Status& s : SaveAllRanks(dir.path(), step, 1, tensors, opts)) ASSERT_TRUE(s.ok()) << s;
  }
  EXPECT_EQ(ListCommittedSteps(*Local(dir.path()))->size(), 5u);
}

TEST(CommitTest, MissingRankTimesOutAndCommitsNothing) {
  TempDir dir;
  WriterOptions opts;
  opts.commit_timeout = absl::Milliseconds(300);
  WriterOptions patient;
  patient.commit_timeout = absl::Minutes(5);
  const std::vector<RefTensor> tensors = DefaultTensors();
  absl::Status r0, r2;
  std::thread t0([&] { r0 = SaveAsRank(dir.path(), 9, 3, 0, tensors, opts); });
  r2 = SaveAsRank(dir.path(), 9, 3, 2, tensors, patient);
  t0.join();
  EXPECT_TRUE(absl::IsDeadlineExceeded(r0)) << r0;
  EXPECT_TRUE(Contains(std::string(r0.message()), "[1]")) << r0;
  EXPECT_TRUE(Contains(std::string(r0.message()), "step 9"));
  // Rank 2 does not wait out its own 5 minutes for a commit that cannot come: rank 0 reports its failure, with its
  // code ([Note: a relayed failure keeps its code]).
  EXPECT_TRUE(absl::IsDeadlineExceeded(r2)) << r2;
  EXPECT_TRUE(Contains(std::string(r2.message()), "rank 0 reported")) << r2;
  EXPECT_TRUE(Contains(std::string(r2.message()), "waiting for the index of rank(s) [1]")) << r2;
  EXPECT_FALSE(PathExists(dir / "step-0000000009"));
  EXPECT_FALSE(PathExists(dir / "latest"));
  EXPECT_TRUE(ListCommittedSteps(*Local(dir.path()))->empty());
  EXPECT_TRUE(PathExists(dir / ".tmp-step-0000000009"));

  // The writer stays usable, and CleanStale removes the leftovers.
  auto writer = CheckpointWriter::Create(Local(dir.path()), opts);
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE((*writer)->CleanStale().ok());
  EXPECT_FALSE(PathExists(dir / ".tmp-step-0000000009"));
  for (const absl::Status& s : SaveAllRanks(dir.path(), 10, 1, tensors, opts)) ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(*ListCommittedSteps(*Local(dir.path())), std::vector<int64_t>{10});
}

TEST(CommitTest, ARanksFailedPartEndsEveryRanksWaitAtOnce) {
  // Rank 1 cannot create its data file (a directory is in the way); ranks 0 and 2 would otherwise wait 5 minutes.
  TempDir dir;
  WriterOptions patient;
  patient.commit_timeout = absl::Minutes(5);
  const std::vector<RefTensor> tensors = DefaultTensors();
  ASSERT_TRUE(Local(dir.path())->MakeDirs(".tmp-step-0000000003/rank-00001.bin").ok());
  std::vector<absl::Status> r = SaveAllRanks(dir.path(), 3, 3, tensors, patient);
  EXPECT_FALSE(r[1].ok()) << r[1];
  // Every rank returns the failing rank's code, so the job's exit status is the root cause's whoever reports first.
  EXPECT_NE(r[1].code(), absl::StatusCode::kAborted) << r[1];
  EXPECT_EQ(r[0].code(), r[1].code()) << r[0];
  EXPECT_TRUE(Contains(std::string(r[0].message()), "rank 1 could not save its part")) << r[0];
  EXPECT_EQ(r[2].code(), r[1].code()) << r[2];
  EXPECT_TRUE(Contains(std::string(r[2].message()), "rank 0 reported: ")) << r[2];
  EXPECT_TRUE(Contains(std::string(r[2].message()), "rank 1 could not save its part")) << r[2];
  EXPECT_FALSE(PathExists(dir / "step-0000000003"));
}

TEST(CommitTest, AFailedAttemptsLeftoversAreNotTakenForALaterOne) {
  // [Note: save attempts] Attempt 0 at step 4: rank 0 never came, rank 1 timed out and left its index behind.
  TempDir dir;
  WriterOptions opts;
  opts.commit_timeout = absl::Milliseconds(300);
  const std::vector<RefTensor> first = DefaultTensors();
  std::vector<RefTensor> second = first;
  for (RefTensor& t : second) {
    for (uint8_t& b : t.bytes) b ^= 0x5A;  // the retry saves different values
  }
  EXPECT_TRUE(absl::IsDeadlineExceeded(SaveAsRank(dir.path(), 4, 2, 1, first, opts, /*attempt=*/0)));
  // Attempt 1, rank 0 alone: rank 1's index is the failed attempt's, so nothing may be committed with it.
  absl::Status r0 = SaveAsRank(dir.path(), 4, 2, 0, second, opts, /*attempt=*/1);
  EXPECT_TRUE(absl::IsDeadlineExceeded(r0)) << r0;
  EXPECT_TRUE(Contains(std::string(r0.message()), "left only an index of an earlier failed save")) << r0;
  EXPECT_FALSE(PathExists(dir / "step-0000000004"));
  EXPECT_TRUE(PathExists(dir / ".tmp-step-0000000004/commit-failed-1"));
  // Attempt 2, both ranks: commits the retry's values only, and no report of attempt 1 is taken as its own.
  for (const absl::Status& s : SaveAllRanks(dir.path(), 4, 2, second, opts, {}, /*attempt=*/2)) {
    ASSERT_TRUE(s.ok()) << s;
  }
  EXPECT_FALSE(PathExists(dir / "step-0000000004/commit-failed-1"));
  auto reader = CheckpointReader::Open(Local(dir.path()), 4);
  ASSERT_TRUE(reader.ok()) << reader.status();
  for (const RefTensor& t : second) EXPECT_TRUE(ReadsBack(**reader, t, 0, t.numel())) << t.name;
  // A rank ahead of rank 0 (saves out of step) is an error, not a wait.
  EXPECT_TRUE(absl::IsDeadlineExceeded(SaveAsRank(dir.path(), 5, 2, 1, first, opts, /*attempt=*/7)));
  r0 = SaveAsRank(dir.path(), 5, 2, 0, first, opts, /*attempt=*/6);
  EXPECT_TRUE(absl::IsFailedPrecondition(r0)) << r0;
  EXPECT_TRUE(Contains(std::string(r0.message()), "out of step")) << r0;
}

TEST(CommitTest, CleanStaleRemovesOnlyTmpDirectories) {
  TempDir dir;
  const std::vector<RefTensor> tensors = {testing::MakeTensor("w", DType::kFloat32, {4}, 1)};
  for (const absl::Status& s : SaveAllRanks(dir.path(), 1, 1, tensors)) ASSERT_TRUE(s.ok()) << s;
  auto storage = Local(dir.path());
  ASSERT_TRUE(storage->MakeDirs(".tmp-step-0000000002").ok());
  ASSERT_TRUE(storage->WriteAtomically(".tmp-step-0000000002/rank-00000.bin", "junk").ok());
  ASSERT_TRUE(storage->MakeDirs(".tmp-deleting-step-0000000000").ok());
  auto writer = CheckpointWriter::Create(storage, {});
  ASSERT_TRUE(writer.ok());
  ASSERT_TRUE((*writer)->CleanStale().ok());
  EXPECT_EQ(*storage->List(""), (std::vector<std::string>{"latest", "step-0000000001"}));
  // A root that does not exist yet has nothing stale.
  auto missing = CheckpointWriter::Create(Local(dir / "nope"), {});
  EXPECT_TRUE((*missing)->CleanStale().ok());
  EXPECT_TRUE(ListCommittedSteps(*Local(dir / "nope"))->empty());
  EXPECT_FALSE(ReadLatest(*Local(dir / "nope"))->has_value());
}

// Runs a save of `step` (world 1) in a child process that kills itself at `point`; returns after it died.
void SaveAndCrash(const std::string& root, int64_t step, const std::string& point) {
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    WriterOptions opts;
    opts.crash_point = point;
    SaveAllRanks(root, step, 1, DefaultTensors(), opts);
    ::_exit(0);  // not reached: the crash point must fire
  }
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(wstatus) && WTERMSIG(wstatus) == SIGKILL) << point << ": child exited normally";
}

TEST(CommitTest, KillAtEveryCrashPointLeavesThePreviousOrTheNewCheckpoint) {
  struct Expect {
    const char* point;
    bool index, manifest, committed;
  };
  const Expect cases[] = {{"after_data", false, false, false},
                          {"after_index", true, false, false},
                          {"before_manifest", true, false, false},
                          {"after_manifest", true, true, false},
                          {"after_rename", true, true, true}};
  const std::vector<RefTensor> tensors = DefaultTensors();
  for (const Expect& c : cases) {
    SCOPED_TRACE(c.point);
    TempDir dir;
    for (const absl::Status& s : SaveAllRanks(dir.path(), 1, 1, tensors)) ASSERT_TRUE(s.ok()) << s;
    SaveAndCrash(dir.path(), 2, c.point);
    const std::string tmp = dir / ".tmp-step-0000000002";
    EXPECT_EQ(PathExists(dir / "step-0000000002"), c.committed);
    if (!c.committed) {
      EXPECT_TRUE(PathExists(tmp + "/rank-00000.bin"));
      EXPECT_EQ(PathExists(tmp + "/rank-00000.json"), c.index);
      EXPECT_EQ(PathExists(tmp + "/manifest.json"), c.manifest);
    }
    EXPECT_EQ(testing::ReadFile(dir / "latest"), "1\n");  // `latest` is always updated last
    auto storage = Local(dir.path());
    const std::vector<int64_t> expect_steps = c.committed ? std::vector<int64_t>{2, 1} : std::vector<int64_t>{1};
    EXPECT_EQ(*ListCommittedSteps(*storage), expect_steps);
    for (int64_t step : expect_steps) {  // whatever is committed is complete
      auto reader = CheckpointReader::Open(storage, step);
      ASSERT_TRUE(reader.ok()) << reader.status();
      EXPECT_TRUE((*reader)->VerifyAll().ok());
    }
    // Recovery: clean up, save the same step again.
    auto writer = CheckpointWriter::Create(storage, {});
    ASSERT_TRUE((*writer)->CleanStale().ok());
    EXPECT_FALSE(PathExists(tmp));
    for (const absl::Status& s : SaveAllRanks(dir.path(), 2, 1, tensors)) ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(testing::ReadFile(dir / "latest"), "2\n");
    auto reader = CheckpointReader::Open(storage, 2);
    ASSERT_TRUE(reader.ok()) << reader.status();
    EXPECT_TRUE(ReadsBack(**reader, tensors[0], 0, tensors[0].numel()));
  }
}

}  // namespace
}  // namespace tessera::checkpoint
