// What the gloo backend adds to the conformance suite (comm_conformance_test.cc runs every collective over it):
// the deadline and the message when a peer never joins, a lost peer reported as such, large buffers, issue-order
// execution of groups issued before any wait, the watchdog failing a group nobody waits on, and a rendezvous that
// a rank never joins.
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "comm/gloo/gloo_world.h"
#include "gtest/gtest.h"
#include "tessera/comm/desync.h"
#include "tessera/comm/gloo/gloo_communicator.h"

namespace tessera::comm {
namespace {

BufferView View(std::vector<float>& v) {
  return BufferView{v.data(), DType::kFloat32, static_cast<int64_t>(v.size()), Device::CPU()};
}

std::vector<std::unique_ptr<Communicator>> World(int size) {
  auto comms = ::tessera::testing::CreateGlooCommunicators(size);
  EXPECT_TRUE(comms.ok()) << comms.status();
  return comms.ok() ? std::move(*comms) : std::vector<std::unique_ptr<Communicator>>{};
}

TEST(GlooCommunicator, PeerThatNeverJoinsGivesDeadlineExceededNamingRankStepAndTag) {
  const int W = 3, absent = 2;
  auto comms = World(W);
  ASSERT_EQ(comms.size(), 3u);
  const absl::Duration timeout = absl::Milliseconds(300);
  std::vector<std::vector<float>> bufs(W, std::vector<float>(16, 1.0f));
  std::vector<absl::Status> statuses(W);
  std::vector<absl::Duration> took(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    if (r == absent) continue;  // this rank never joins the collective (it stays alive: no connection breaks)
    threads.emplace_back([&, r] {
      comms[r]->set_step(7);
      CollectiveOptions options;
      options.timeout = timeout;
      options.tag = "backward reduce-scatter of unit 'blocks.3'";
      const absl::Time start = absl::Now();
      auto work = comms[r]->AllReduce(View(bufs[r]), ReduceOp::kSum, options);
      statuses[r] = work.ok() ? (*work)->Wait() : work.status();
      took[r] = absl::Now() - start;
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    if (r == absent) continue;
    const std::string msg(statuses[r].message());
    EXPECT_EQ(statuses[r].code(), absl::StatusCode::kDeadlineExceeded) << "rank " << r << ": " << statuses[r];
    EXPECT_TRUE(absl::StrContains(msg, "rank " + std::to_string(r) + " of 3")) << msg;
    EXPECT_TRUE(absl::StrContains(msg, "step 7")) << msg;
    EXPECT_TRUE(absl::StrContains(msg, "backward reduce-scatter of unit 'blocks.3'")) << msg;
    EXPECT_TRUE(absl::StrContains(msg, "all_reduce of 16 elements (float32)")) << msg;
    // Within the deadline (gloo's own timer plus scheduling), not the 30 s rendezvous timeout or a hang.
    EXPECT_GE(took[r], timeout - absl::Milliseconds(5)) << "rank " << r;
    EXPECT_LT(took[r], timeout + absl::Seconds(2)) << "rank " << r;
  }
  // The failure is for good: the next call on a failed rank fails at once, naming the first failure.
  const absl::Time again = absl::Now();
  auto work = comms[0]->AllReduce(View(bufs[0]), ReduceOp::kSum, {});
  const absl::Status next = work.ok() ? (*work)->Wait() : work.status();
  EXPECT_FALSE(next.ok());
  EXPECT_TRUE(absl::StrContains(next.message(), "blocks.3")) << next;
  EXPECT_LT(absl::Now() - again, absl::Seconds(1));
}

TEST(GlooCommunicator, LostPeerGivesUnavailableLongBeforeTheDeadline) {
  // Rank 1 goes away (its communicator is destroyed, closing its connections) while rank 0 waits in a collective
  // with a long deadline: rank 0 must learn of it from the broken connection, not from the timeout.
  auto comms = World(2);
  ASSERT_EQ(comms.size(), 2u);
  std::vector<float> buf(8, 1.0f);
  CollectiveOptions options;
  options.timeout = absl::Seconds(30);
  options.tag = "optimizer all-reduce";
  const absl::Time start = absl::Now();
  auto work = comms[0]->AllReduce(View(buf), ReduceOp::kSum, options);
  ASSERT_TRUE(work.ok()) << work.status();
  absl::SleepFor(absl::Milliseconds(100));
  comms[1].reset();
  const absl::Status s = (*work)->Wait();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_TRUE(absl::StrContains(s.message(), "rank 0 of 2, optimizer all-reduce")) << s;
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
}

TEST(GlooCommunicator, GroupsIssuedBeforeAnyWaitRunInIssueOrder) {
  // Each rank issues three all-reduces back to back and only then waits: the worker must run them in issue order
  // on every rank (a reordering would pair one rank's first buffer with another's second and mix the sums).
  const int W = 2;
  auto comms = World(W);
  ASSERT_EQ(comms.size(), 2u);
  std::vector<std::vector<std::vector<float>>> bufs(W);
  std::vector<absl::Status> statuses(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    for (int k = 0; k < 3; ++k) bufs[r].push_back(std::vector<float>(1000, float(100 * k + r + 1)));
    threads.emplace_back([&, r] {
      std::vector<std::unique_ptr<Work>> works;
      for (int k = 0; k < 3; ++k) {
        auto w = comms[r]->AllReduce(View(bufs[r][k]), ReduceOp::kSum, {});
        if (!w.ok()) {
          statuses[r] = w.status();
          return;
        }
        works.push_back(std::move(*w));
      }
      for (auto& w : works) {
        absl::Status s = w->Wait();
        if (!s.ok() && statuses[r].ok()) statuses[r] = s;
      }
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    ASSERT_TRUE(statuses[r].ok()) << statuses[r];
    for (int k = 0; k < 3; ++k) {
      const float expected = float(100 * k + 1) + float(100 * k + 2);
      for (float v : bufs[r][k]) ASSERT_EQ(v, expected) << "rank " << r << " group " << k;
    }
  }
}

TEST(GlooCommunicator, LargeBuffersSpanManyGlooSegments) {
  // The conformance suite uses a few elements; gloo splits messages into 1 MiB segments (kMaxSegmentSize), so
  // 3 ranks x 2.4 MB exercise its multi-segment ring paths. Small integers sum exactly in float32, so the result
  // is compared exactly with the sum computed here.
  const int W = 3;
  const int64_t n = 600'000;
  auto comms = World(W);
  ASSERT_EQ(comms.size(), 3u);
  auto value = [](int r, int64_t j) { return float((j * (r + 3)) % 1001); };
  std::vector<std::vector<float>> ar(W, std::vector<float>(n)), rs_in(W, std::vector<float>(n * W)),
      rs_out(W, std::vector<float>(n, -1.0f)), ag_out(W, std::vector<float>(n * W, -1.0f));
  for (int r = 0; r < W; ++r) {
    for (int64_t j = 0; j < n; ++j) ar[r][j] = value(r, j);
    for (int64_t j = 0; j < n * W; ++j) rs_in[r][j] = value(r, j);
  }
  std::vector<absl::Status> statuses(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      std::vector<Collective> ops = {Collective::AllReduce(View(ar[r]), ReduceOp::kSum),
                                     Collective::ReduceScatter(View(rs_in[r]), View(rs_out[r]), ReduceOp::kSum),
                                     Collective::AllGather(View(ar[r]), View(ag_out[r]))};
      auto work = comms[r]->Issue(ops, {});
      statuses[r] = work.ok() ? (*work)->Wait() : work.status();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    ASSERT_TRUE(statuses[r].ok()) << statuses[r];
    for (int64_t j = 0; j < n; ++j) {
      const float sum = value(0, j) + value(1, j) + value(2, j);
      ASSERT_EQ(ar[r][j], sum) << "all_reduce rank " << r << " element " << j;
      const int64_t g = r * n + j;  // reduce-scatter: rank r's block of the W*n input
      ASSERT_EQ(rs_out[r][j], value(0, g) + value(1, g) + value(2, g)) << "reduce_scatter rank " << r << " elem " << j;
      for (int q = 0; q < W; ++q) ASSERT_EQ(ag_out[r][q * n + j], sum) << "all_gather rank " << r << " block " << q;
    }
  }
}

TEST(GlooCommunicator, WatchdogFailsAGroupNobodyWaitsOn) {
  const int W = 2;
  auto comms = World(W);
  ASSERT_EQ(comms.size(), 2u);
  std::vector<float> buf(4, 1.0f);
  CollectiveOptions options;
  options.timeout = absl::Milliseconds(200);
  options.tag = "never waited";
  auto work = comms[0]->AllReduce(View(buf), ReduceOp::kSum, options);  // rank 1 never joins
  ASSERT_TRUE(work.ok()) << work.status();
  absl::SleepFor(absl::Milliseconds(600));  // past the deadline plus a few watchdog polls
  auto next = comms[0]->AllReduce(View(buf), ReduceOp::kSum, {});
  ASSERT_FALSE(next.ok()) << "a communicator whose group missed its deadline must refuse new work";
  EXPECT_TRUE(absl::StrContains(next.status().message(), "never waited")) << next.status();
  EXPECT_EQ((*work)->Wait().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST(GlooCommunicator, RendezvousWithoutTheOtherRanksTimesOut) {
  auto store = std::make_shared<InMemoryStore>();
  const absl::Time start = absl::Now();
  auto comm = GlooCommunicator::Create(0, 2, store, "lonely", absl::Milliseconds(300), "127.0.0.1");
  ASSERT_FALSE(comm.ok());
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kDeadlineExceeded) << comm.status();
  EXPECT_TRUE(absl::StrContains(comm.status().message(), "rank 0 of 2")) << comm.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

TEST(GlooCommunicator, RejectsBadArguments) {
  auto store = std::make_shared<InMemoryStore>();
  EXPECT_EQ(GlooCommunicator::Create(2, 2, store, "p", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GlooCommunicator::Create(0, 1, nullptr, "p", absl::Seconds(1)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(GlooCommunicator::Create(0, 1, store, "p", absl::ZeroDuration()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tessera::comm
