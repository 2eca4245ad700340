// The desync protocol (comm/desync.h) on rank threads sharing an in-memory store, with collectives simulated by a
// rendezvous per sequence number: ranks at different collectives fail fast with every rank's position, slow ranks
// at the same collective do not, a missing rank still times out (saying where the others were), and the strict
// check stops a mismatch before the collective runs.
#include "tessera/comm/desync.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"

namespace tessera::comm {
namespace {

// A collective every rank must join: a rank's wait finishes once `size` ranks arrived at the same seq. Ranks at
// different seqs never meet, as with a real backend.
class FakeCollectives {
 public:
  explicit FakeCollectives(int size) : size_(size) {}
  WaitSlice Arrive(int64_t seq) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++arrived_[seq];
    }
    cv_.notify_all();
    return [this, seq](absl::Duration d) -> absl::StatusOr<bool> {
      std::unique_lock<std::mutex> lock(mu_);
      return cv_.wait_for(lock, absl::ToChronoNanoseconds(d), [&] { return arrived_[seq] == size_; });
    };
  }

 private:
  const int size_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<int64_t, int> arrived_;
};

WaitSlice NeverDone() {
  return [](absl::Duration d) -> absl::StatusOr<bool> {
    std::this_thread::sleep_for(absl::ToChronoNanoseconds(d));
    return false;
  };
}

Collective Op(CollectiveKind kind, int64_t n) {
  static float data[64];
  BufferView in{data, DType::kFloat32, n, Device::CPU()};
  BufferView out{data, DType::kFloat32, kind == CollectiveKind::kAllGather ? 2 * n : n, Device::CPU()};
  if (kind == CollectiveKind::kReduceScatter) in.count = 2 * n;
  return Collective{kind, in, out};
}

// `foreign` (optional): per rank, how many collectives it issued on the user's group (see [Note: a peer blocked
// outside tessera]).
std::vector<std::unique_ptr<DesyncMonitor>> Monitors(int size, std::shared_ptr<KeyValueStore> store,
                                                     bool strict = false,
                                                     std::vector<std::atomic<int64_t>>* foreign = nullptr) {
  std::vector<std::unique_ptr<DesyncMonitor>> out;
  for (int r = 0; r < size; ++r) {
    DesyncOptions o;
    o.store = store;
    o.key_prefix = "test/comm0";
    o.first_deadline = absl::Milliseconds(200);
    o.poll_interval = absl::Milliseconds(50);
    o.strict = strict;
    if (foreign != nullptr) {
      o.foreign_seq = [foreign, r] { return (*foreign)[r].load(); };
      o.foreign_name = "group 'user'";
      o.answer_interval = absl::Milliseconds(50);
    }
    auto m = DesyncMonitor::Create(r, size, "communicator 'test/comm0' (fake)", o);
    EXPECT_TRUE(m.ok()) << m.status();
    out.push_back(std::move(m).value());
  }
  return out;
}

std::vector<absl::Status> OnRanks(int size, const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> statuses(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) threads.emplace_back([&, r] { statuses[r] = fn(r); });
  for (auto& t : threads) t.join();
  return statuses;
}

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

TEST(DesyncTest, RanksAtDifferentCollectivesFailFastNamingEveryPosition) {
  auto store = std::make_shared<InMemoryStore>();
  auto monitors = Monitors(2, store);
  FakeCollectives fake(2);
  const Collective gather = Op(CollectiveKind::kAllGather, 4);
  const Collective reduce = Op(CollectiveKind::kReduceScatter, 8);
  const auto t0 = std::chrono::steady_clock::now();
  auto statuses = OnRanks(2, [&](int r) -> absl::Status {
    // In step for three collectives, then rank 1 skips unit 'blocks.1'.
    for (int i = 0; i < 3; ++i) {
      Position p = monitors[r]->Next({&gather, 1}, "forward all-gather of unit 'blocks.0'");
      absl::Status s = monitors[r]->Await(p, "op", absl::Minutes(10), fake.Arrive(p.seq));
      if (!s.ok()) return s;
    }
    Position p = r == 0 ? monitors[r]->Next({&gather, 1}, "forward all-gather of unit 'blocks.1'")
                        : monitors[r]->Next({&reduce, 1}, "backward reduce-scatter of unit 'blocks.0'");
    return monitors[r]->Await(p, "op", absl::Minutes(10), NeverDone());
  });
  EXPECT_LT(SecondsSince(t0), 10.0);  // not the 10-minute timeout
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE(r);
    EXPECT_EQ(statuses[r].code(), absl::StatusCode::kAborted) << statuses[r];
    const std::string msg(statuses[r].message());
    EXPECT_TRUE(absl::StrContains(msg, "rank 0 is at #3 forward all-gather of unit 'blocks.1' (all_gather of 4 "
                                       "elements (float32))")) << msg;
    EXPECT_TRUE(absl::StrContains(msg, "rank 1 is at #3 backward reduce-scatter of unit 'blocks.0' "
                                       "(reduce_scatter of 16 elements (float32) sum)")) << msg;
    EXPECT_TRUE(absl::StrContains(msg, "communicator 'test/comm0' (fake) (2 ranks)")) << msg;
  }
}

TEST(DesyncTest, DifferentSeqsAlsoCountAsOutOfStep) {
  // Rank 1 finished #0 alone (a one-sided mismatch can complete on one rank) and is stuck at #1.
  auto store = std::make_shared<InMemoryStore>();
  auto monitors = Monitors(2, store);
  const Collective gather = Op(CollectiveKind::kAllGather, 4);
  auto statuses = OnRanks(2, [&](int r) -> absl::Status {
    Position p = monitors[r]->Next({&gather, 1}, "");
    if (r == 1) p = monitors[r]->Next({&gather, 1}, "");
    return monitors[r]->Await(p, "op", absl::Minutes(10), NeverDone());
  });
  for (const absl::Status& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "rank 0 is at #0 all_gather")) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "rank 1 is at #1 all_gather")) << s;
  }
}

TEST(DesyncTest, SlowRanksAtTheSameCollectivesAreNotADesync) {
  // Random arrival delays up to 4x the first deadline, so notes are published, read while stale, and rewritten.
  auto store = std::make_shared<InMemoryStore>();
  auto monitors = Monitors(3, store);
  FakeCollectives fake(3);
  const Collective gather = Op(CollectiveKind::kAllGather, 4);
  auto statuses = OnRanks(3, [&](int r) -> absl::Status {
    std::mt19937 rng(r);
    for (int i = 0; i < 12; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 800));
      Position p = monitors[r]->Next({&gather, 1}, "tag");
      absl::Status s = monitors[r]->Await(p, "op", absl::Minutes(10), fake.Arrive(p.seq));
      if (!s.ok()) return s;
    }
    return absl::OkStatus();
  });
  for (const absl::Status& s : statuses) EXPECT_TRUE(s.ok()) << s;
}

TEST(DesyncTest, AMissingRankStillTimesOutAndTheMessageSaysWhereTheOthersWere) {
  auto store = std::make_shared<InMemoryStore>();
  auto monitors = Monitors(2, store);
  const Collective gather = Op(CollectiveKind::kAllGather, 4);
  Position p = monitors[0]->Next({&gather, 1}, "forward all-gather of unit 'blocks.0'");
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status s = monitors[0]->Await(p, "all_gather on rank 0", absl::Seconds(1), NeverDone());
  EXPECT_GE(SecondsSince(t0), 0.95);
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "all_gather on rank 0 did not finish within 1s")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 0 is at #0 forward all-gather")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 1 is not in a tessera collective of it")) << s;
}

TEST(DesyncTest, APeerBlockedInACollectiveOfItsOwnIsNamedSoonAfterTheFirstDeadline) {
  // Rank 1 is in a dist.barrier() (one more collective on the user's group than rank 0) and never reaches #0.
  auto store = std::make_shared<InMemoryStore>();
  std::vector<std::atomic<int64_t>> foreign(2);
  foreign[0] = 4;
  foreign[1] = 5;
  auto monitors = Monitors(2, store, false, &foreign);
  const Collective gather = Op(CollectiveKind::kAllGather, 4);
  Position p = monitors[0]->Next({&gather, 1}, "forward all-gather of unit 'blocks.0'");
  const auto t0 = std::chrono::steady_clock::now();
  absl::Status s = monitors[0]->Await(p, "op", absl::Minutes(10), NeverDone());
  EXPECT_LT(SecondsSince(t0), 5.0);
  EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 0 is at #0 forward all-gather of unit 'blocks.0'")) << s;
  EXPECT_TRUE(absl::StrContains(s.message(),
                                "rank 1 is not in a tessera collective: it issued 5 collectives of its own (e.g. "
                                "dist.barrier) on group 'user' where this rank issued 4, so it is blocked in one this "
                                "rank never issued, and it has not issued tessera collective #0 (none issued yet)"))
      << s;
}

TEST(DesyncTest, APeerThatIsOnlyComputingIsNotCalledStuck) {
  // Rank 1 issued nothing rank 0 did not (e.g. rank 0 waits while rank 1 saves a file): only the timeout ends it,
  // and it says where rank 1 was. Then rank 1 issued a collective of its own but also reached tessera's #0 (it
  // issued it): not stuck either.
  for (int64_t issued_by_1 : {0, 1}) {
    SCOPED_TRACE(issued_by_1);
    auto store = std::make_shared<InMemoryStore>();
    std::vector<std::atomic<int64_t>> foreign(2);
    foreign[0] = 4;
    foreign[1] = 4 + issued_by_1;
    auto monitors = Monitors(2, store, false, &foreign);
    const Collective gather = Op(CollectiveKind::kAllGather, 4);
    if (issued_by_1) (void)monitors[1]->Next({&gather, 1}, "forward all-gather of unit 'blocks.0'");
    Position p = monitors[0]->Next({&gather, 1}, "forward all-gather of unit 'blocks.0'");
    absl::Status s = monitors[0]->Await(p, "op", absl::Milliseconds(1500), NeverDone());
    EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "rank 1 is not in a tessera collective of it (computing")) << s;
  }
}

TEST(DesyncTest, HeadersOfDifferentCollectivesAbortEveryRankNamingEveryPosition) {
  auto store = std::make_shared<InMemoryStore>();
  auto monitors = Monitors(2, store);
  const Collective gather = Op(CollectiveKind::kAllGather, 4);
  std::vector<Position> pos = {monitors[0]->Next({&gather, 1}, "forward all-gather of unit 'layers.0'"),
                               monitors[1]->Next({&gather, 1}, "backward all-gather of unit 'layers.0'")};
  // Same signature, different tag: still out of step. The all-gather of the two headers:
  std::vector<int64_t> gathered;
  for (const Position& p : pos) {
    const std::array<int64_t, 2> h = DesyncMonitor::Header(p);
    gathered.insert(gathered.end(), h.begin(), h.end());
  }
  auto statuses = OnRanks(2, [&](int r) { return monitors[r]->CompareHeaders(pos[r], gathered, absl::Seconds(10)); });
  for (int r = 0; r < 2; ++r) {
    SCOPED_TRACE(r);
    EXPECT_EQ(statuses[r].code(), absl::StatusCode::kAborted) << statuses[r];
    const std::string msg(statuses[r].message());
    EXPECT_TRUE(absl::StrContains(msg, absl::StrCat("rank ", r, ": collectives out of step"))) << msg;
    EXPECT_TRUE(absl::StrContains(msg, "found by the header exchange before collective #0, before any of its data "
                                       "moved")) << msg;
    EXPECT_TRUE(absl::StrContains(msg, "rank 0 is at #0 forward all-gather of unit 'layers.0'")) << msg;
    EXPECT_TRUE(absl::StrContains(msg, "rank 1 is at #0 backward all-gather of unit 'layers.0'")) << msg;
  }
  // Equal headers pass; so do headers of equal positions on every rank.
  const Position next = monitors[0]->Next({&gather, 1}, "t");
  const std::array<int64_t, 2> h = DesyncMonitor::Header(next);
  const std::vector<int64_t> same = {h[0], h[1], h[0], h[1]};
  EXPECT_EQ(monitors[0]->CompareHeaders(next, same, absl::Seconds(1)), absl::OkStatus());
  EXPECT_NE(DesyncMonitor::Header(next), DesyncMonitor::Header(Position{next.seq + 1, next.signature, next.tag}));
}

TEST(DesyncTest, WithoutAStoreAWaitIsAPlainTimeout) {
  auto m = DesyncMonitor::Create(0, 2, "c", DesyncOptions{});
  ASSERT_TRUE(m.ok());
  const Collective gather = Op(CollectiveKind::kAllGather, 4);
  Position p = (*m)->Next({&gather, 1}, "");
  absl::Status s = (*m)->Await(p, "op", absl::Milliseconds(300), NeverDone());
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_EQ((*m)->CheckAgreement(p, absl::Seconds(1)), absl::OkStatus());  // not strict
}

TEST(DesyncTest, TheWaitsOwnErrorPassesThroughAndTheNoteIsRewritten) {
  auto store = std::make_shared<InMemoryStore>();
  auto monitors = Monitors(2, store);
  const Collective gather = Op(CollectiveKind::kAllGather, 4);
  Position p = monitors[0]->Next({&gather, 1}, "");
  int calls = 0;
  absl::Status s = monitors[0]->Await(p, "op", absl::Minutes(1), [&](absl::Duration d) -> absl::StatusOr<bool> {
    if (++calls < 3) return false;  // past the first deadline: the note is published
    return absl::UnavailableError("peer lost");
  });
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  auto note = store->TryGet({std::string("test/comm0/note/0")});
  ASSERT_TRUE(note.ok() && (*note)[0].has_value());
  EXPECT_EQ((*note)[0]->substr(0, 1), "R") << *(*note)[0];
}

TEST(DesyncTest, StrictCheckStopsTheFirstDivergingCollective) {
  auto store = std::make_shared<InMemoryStore>();
  auto monitors = Monitors(2, store, /*strict=*/true);
  const Collective gather = Op(CollectiveKind::kAllGather, 4);
  const Collective reduce = Op(CollectiveKind::kAllReduce, 4);
  std::vector<int> passed(2, 0);
  auto statuses = OnRanks(2, [&](int r) -> absl::Status {
    for (int i = 0; i < 20; ++i) {
      const Collective& op = (i == 17 && r == 1) ? reduce : gather;
      Position p = monitors[r]->Next({&op, 1}, i == 17 ? "clip" : "step");
      absl::Status s = monitors[r]->CheckAgreement(p, absl::Minutes(1));
      if (!s.ok()) return s;
      ++passed[r];
    }
    return absl::OkStatus();
  });
  EXPECT_EQ(passed, (std::vector<int>{17, 17}));
  for (const absl::Status& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "before collective #17")) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "rank 0 is at #17 clip (all_gather of 4 elements (float32))")) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "rank 1 is at #17 clip (all_reduce of 4 elements (float32) sum)"))
        << s;
  }
  // Fingerprints of finished collectives are deleted: 2 notes + a verdict + at most 3 seqs x 2 ranks.
  EXPECT_LE(store->num_keys(), 9);
}

TEST(DesyncTest, StrictCheckNamesARankThatNeverArrives) {
  auto store = std::make_shared<InMemoryStore>();
  auto monitors = Monitors(2, store, /*strict=*/true);
  const Collective gather = Op(CollectiveKind::kAllGather, 4);
  Position p = monitors[0]->Next({&gather, 1}, "");
  absl::Status s = monitors[0]->CheckAgreement(p, absl::Milliseconds(300));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank(s) 1 did not reach collective #0")) << s;
}

TEST(DesyncTest, CreateRejectsUnusableOptions) {
  DesyncOptions strict_without_store;
  strict_without_store.strict = true;
  EXPECT_EQ(DesyncMonitor::Create(0, 2, "c", strict_without_store).status().code(),
            absl::StatusCode::kInvalidArgument);
  DesyncOptions no_prefix;
  no_prefix.store = std::make_shared<InMemoryStore>();
  EXPECT_EQ(DesyncMonitor::Create(0, 2, "c", no_prefix).status().code(), absl::StatusCode::kInvalidArgument);
  DesyncOptions zero_deadline;
  zero_deadline.first_deadline = absl::ZeroDuration();
  EXPECT_EQ(DesyncMonitor::Create(0, 2, "c", zero_deadline).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tessera::comm
