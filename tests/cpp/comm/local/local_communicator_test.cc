// What the local backend promises beyond the conformance suite: construction errors, CPU-only buffers, error
// messages that name the collective and the ranks, a broken world failing fast, one thread per rank, and sums of
// 16-bit types accumulated in float.
#include "tessera/comm/local/local_communicator.h"

#include <chrono>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "testing/test_buffer.h"

namespace tessera::comm {
namespace {

using ::tessera::testing::TestBuffer;

std::vector<std::unique_ptr<Communicator>> MakeWorld(int size) {
  auto comms = LocalWorld::CreateCommunicators(size);
  EXPECT_TRUE(comms.ok()) << comms.status();
  return comms.ok() ? std::move(*comms) : std::vector<std::unique_ptr<Communicator>>{};
}

absl::Status RunGroup(Communicator& c, std::vector<Collective> ops, absl::Duration timeout) {
  CollectiveOptions options;
  options.timeout = timeout;
  auto work = c.Issue(ops, options);
  return work.ok() ? (*work)->Wait() : work.status();
}

// Runs fn(rank) for the given ranks on their own threads.
std::vector<absl::Status> OnRanks(const std::vector<int>& ranks, int size, const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> statuses(size);
  std::vector<std::thread> threads;
  for (int r : ranks) threads.emplace_back([&, r] { statuses[r] = fn(r); });
  for (auto& t : threads) t.join();
  return statuses;
}

TEST(LocalWorldTest, RejectsBadSizesAndRanks) {
  EXPECT_EQ(LocalWorld::Create(0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(LocalWorld::Create(-3).status().code(), absl::StatusCode::kInvalidArgument);
  auto world = LocalWorld::Create(2);
  ASSERT_TRUE(world.ok());
  EXPECT_EQ((*world)->Join(2).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ((*world)->Join(-1).status().code(), absl::StatusCode::kInvalidArgument);
  auto rank1 = (*world)->Join(1);
  ASSERT_TRUE(rank1.ok());
  EXPECT_EQ((*rank1)->rank(), 1);
  EXPECT_EQ((*rank1)->size(), 2);
  EXPECT_EQ((*rank1)->backend_name(), "local");
  EXPECT_EQ((*world)->Join(1).status().code(), absl::StatusCode::kFailedPrecondition);  // each rank joins once
}

TEST(LocalCommunicatorTest, RejectsCudaBuffersOnEveryRank) {
  auto comms = MakeWorld(2);
  TestBuffer buf(DType::kFloat32, 4);
  auto statuses = OnRanks({0, 1}, 2, [&](int r) {
    BufferView v = buf.view();  // never dereferenced: rejected before the rendezvous reads anything
    v.device = Device::CUDA(r);
    return RunGroup(*comms[r], {Collective::AllReduce(v, ReduceOp::kSum)}, absl::Seconds(30));
  });
  for (const auto& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "CPU")) << s;
  }
}

TEST(LocalCommunicatorTest, TimeoutNamesCollectiveWaitingRankAndMissingRanks) {
  auto comms = MakeWorld(4);
  std::vector<TestBuffer> ag_in, ag_out;
  for (int r = 0; r < 4; ++r) {
    ag_in.emplace_back(DType::kFloat32, 2);
    ag_out.emplace_back(DType::kFloat32, 8);
  }
  // Ranks 2 and 3 never come.
  auto statuses = OnRanks({0, 1}, 4, [&](int r) {
    return RunGroup(
        *comms[r],
        {Collective::AllGather(ag_in[r].view(), ag_out[r].view()), Collective::Broadcast(ag_in[r].view(), 0)},
        absl::Milliseconds(500));  // long enough that both waiters have surely arrived
  });
  for (int r : {0, 1}) {
    const absl::Status& s = statuses[r];
    EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "group of 2 collectives (all_gather, broadcast)")) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "rank " + std::to_string(r))) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "rank(s) 2, 3 of 4")) << s;
  }
  // Broken for good, for the stragglers too, and fast: no one waits out another timeout.
  const auto start = std::chrono::steady_clock::now();
  for (int r : {3, 0}) {
    absl::Status s = RunGroup(*comms[r], {Collective::AllReduce(ag_in[r].view(), ReduceOp::kSum)}, absl::Seconds(30));
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "never arrived")) << "carries the original failure: " << s;
    EXPECT_EQ(comms[r]->Barrier(absl::Seconds(30)).code(), absl::StatusCode::kUnavailable);
    EXPECT_EQ(RunGroup(*comms[r], {}, absl::Seconds(30)).code(), absl::StatusCode::kUnavailable);
  }
  EXPECT_LT(std::chrono::steady_clock::now() - start, std::chrono::seconds(5));
}

TEST(LocalCommunicatorTest, MismatchMessageNamesBothSides) {
  auto comms = MakeWorld(2);
  TestBuffer a(DType::kFloat32, 6), b(DType::kFloat32, 12);
  auto statuses = OnRanks({0, 1}, 2, [&](int r) {
    return RunGroup(
        *comms[r],
        {Collective::AllReduce(a.slice(0, 1), ReduceOp::kSum),
         r == 0 ? Collective::AllGather(a.view(), b.view()) : Collective::AllReduce(a.view(), ReduceOp::kAvg)},
        absl::Seconds(30));
  });
  for (const auto& s : statuses) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "op 1")) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "all_gather of 6 -> 12 float32")) << s;
    EXPECT_TRUE(absl::StrContains(s.message(), "all_reduce of 6 -> 6 float32 (avg)")) << s;
  }
}

TEST(LocalCommunicatorTest, EmptyGroupIsANoOpWithoutRendezvous) {
  auto comms = MakeWorld(3);
  EXPECT_TRUE(RunGroup(*comms[1], {}, absl::Milliseconds(1)).ok());  // no peer needed
}

TEST(LocalCommunicatorTest, OneCallPerRankAtATime) {
  auto comms = MakeWorld(2);
  TestBuffer a(DType::kFloat32, 3), b(DType::kFloat32, 3), c(DType::kFloat32, 3);
  absl::Status first, second, peer;
  std::thread t1(
      [&] { first = RunGroup(*comms[0], {Collective::AllReduce(a.view(), ReduceOp::kSum)}, absl::Seconds(30)); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  // A second thread posting as rank 0 while the first call waits would corrupt the rendezvous; it is refused.
  second = RunGroup(*comms[0], {Collective::AllReduce(b.view(), ReduceOp::kSum)}, absl::Seconds(30));
  std::thread t2(
      [&] { peer = RunGroup(*comms[1], {Collective::AllReduce(c.view(), ReduceOp::kSum)}, absl::Seconds(30)); });
  t1.join();
  t2.join();
  EXPECT_TRUE(peer.ok()) << peer;
  // Normally the second caller is the one refused; on a badly stalled machine the roles may swap.
  EXPECT_NE(first.ok(), second.ok()) << first << " / " << second;
  EXPECT_EQ((first.ok() ? second : first).code(), absl::StatusCode::kFailedPrecondition);
}

TEST(LocalCommunicatorTest, SixteenBitSumsAccumulateInFloat) {
  // 256 + 1 + 1 + 1 = 259 in float rounds to 260 in bf16 (ties to even). Accumulating in bf16 would give 256
  // (256 + 1 rounds back to 256 each time); both are within a generic tolerance, so this test pins the local one.
  auto comms = MakeWorld(4);
  std::vector<TestBuffer> bufs;
  for (int r = 0; r < 4; ++r) {
    bufs.emplace_back(DType::kBFloat16, 1);
    bufs.back().Set(0, r == 0 ? 256.0 : 1.0);
  }
  auto statuses = OnRanks({0, 1, 2, 3}, 4, [&](int r) {
    return RunGroup(*comms[r], {Collective::AllReduce(bufs[r].view(), ReduceOp::kSum)}, absl::Seconds(30));
  });
  for (int r = 0; r < 4; ++r) {
    ASSERT_TRUE(statuses[r].ok()) << statuses[r];
    EXPECT_EQ(bufs[r].Get(0), 260.0) << "rank " << r;
  }
}

}  // namespace
}  // namespace tessera::comm
