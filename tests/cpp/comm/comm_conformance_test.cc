// One conformance suite for every Communicator backend, parameterized by backend and world size, one thread per
// rank (the gloo base_test pattern). Results are checked against a reference computed here in double from the
// values the ranks actually held; outputs are poisoned with NaN so an element a backend forgot to write fails.
//
// Backends come from factories in Backends(): `local`, and `gloo` when libgloo was found (tessera_gloo). The NCCL
// backend needs one GPU per rank and device buffers, so it is not built or run on CPU machines (backends that are
// not built are skipped, not faked); a GPU suite adds it with its own factory. Behaviour a backend cannot offer is
// a flag on its factory. The torch test binary (tests/cpp/torch) compiles this file again with the `pg` adapter
// added (tests/cpp/comm/pg); the gloo plugin tests compile it with `gloo_plugin` added (comm/gloo/gloo_plugin.h).
#include <atomic>
#include <chrono>
#include <cmath>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tessera/comm/communicator.h"
#include "tessera/comm/desync.h"
#include "tessera/comm/local/local_communicator.h"
#include "testing/test_buffer.h"
#ifdef TESSERA_CONFORMANCE_WITH_PG
#include "comm/pg/pg_over_local.h"  // the torch test binary also runs the suite over the pg adapter
#endif
#ifdef TESSERA_CONFORMANCE_WITH_GLOO_PLUGIN
#include "comm/gloo/gloo_plugin_world.h"  // the gloo plugin tests run the suite over the isolated plugin
#endif
#ifdef TESSERA_WITH_GLOO
#include "comm/gloo/gloo_world.h"  // built when libgloo was found (CMake: TESSERA_GLOO_ENABLED)
#endif

namespace tessera::comm {
namespace {

using ::tessera::testing::Epsilon;
using ::tessera::testing::kAllDTypes;
using ::tessera::testing::MinSubnormal;
using ::tessera::testing::TestBuffer;

struct Backend {
  std::string name;
  std::function<absl::StatusOr<std::vector<std::unique_ptr<Communicator>>>(int world)> create;
  // Whether groups that differ across ranks are rejected with InvalidArgument, the group still usable afterwards
  // (NCCL cannot: mismatched calls are undefined behaviour).
  bool detects_mismatched_groups = false;
  // Whether they are stopped by a header exchange before any data moves: Aborted (a desync) on every rank, naming
  // every rank's position, and the communicator refuses later collectives (see [Note: a header before every gloo
  // collective] in comm/desync.h).
  bool aborts_mismatched_groups = false;
};
void PrintTo(const Backend& b, std::ostream* os) { *os << b.name; }

std::vector<Backend> Backends() {
  std::vector<Backend> backends = {
      Backend{"local", &LocalWorld::CreateCommunicators, /*detects_mismatched_groups=*/true}};
#ifdef TESSERA_CONFORMANCE_WITH_PG
  // c10d issues a group's collectives one by one, so no rank can see another's whole group. The pg adapter's own
  // header exchange (pg_communicator.h) is tested over gloo from Python; aborts_mismatched_groups is not yet set
  // here because the case has not been run over pg_over_local.
  backends.push_back(Backend{"pg_over_local", &::tessera::testing::CreatePgOverLocalCommunicators,
                             /*detects_mismatched_groups=*/false});
#endif
#ifdef TESSERA_CONFORMANCE_WITH_GLOO_PLUGIN
  // The gloo communicator loaded through comm/gloo/gloo_plugin.h, with libtorch_cpu's gloo in the process.
  backends.push_back(Backend{"gloo_plugin", &::tessera::testing::CreateGlooPluginCommunicators,
                             /*detects_mismatched_groups=*/false, /*aborts_mismatched_groups=*/true});
#endif
#ifdef TESSERA_WITH_GLOO
  // gloo exchanges bytes without describing them: the communicator all-gathers a header before every group.
  backends.push_back(Backend{"gloo",
                             [](int world) { return ::tessera::testing::CreateGlooCommunicators(world); },
                             /*detects_mismatched_groups=*/false, /*aborts_mismatched_groups=*/true});
#endif
  return backends;
}

// Long enough never to fire on a loaded 2-core machine, short enough that a hang ends the test.
constexpr absl::Duration kNoTimeout = absl::Seconds(60);
constexpr absl::Duration kShortTimeout = absl::Milliseconds(200);
// "Did not hang": a failure must arrive long before ctest's own timeout.
constexpr auto kHangLimit = std::chrono::seconds(10);

class CommConformance : public ::testing::TestWithParam<std::tuple<Backend, int>> {
 protected:
  void SetUp() override {
    const uint64_t seed = tessera::testing::FreshSeed();
    rng_.seed(seed);
    trace_.emplace(__FILE__, __LINE__, ::testing::Message() << "seed " << seed);
    auto comms = backend().create(world());
    ASSERT_TRUE(comms.ok()) << comms.status();
    comms_ = std::move(*comms);
    ASSERT_EQ(static_cast<int>(comms_.size()), world());
    for (int r = 0; r < world(); ++r) ASSERT_EQ(comms_[r]->rank(), r);
  }

  const Backend& backend() const { return std::get<0>(GetParam()); }
  int world() const { return std::get<1>(GetParam()); }
  Communicator& comm(int r) { return *comms_[r]; }

  // Runs fn(rank) on one thread per rank; returns each rank's status. Assertions stay on the main thread.
  std::vector<absl::Status> OnAllRanks(const std::function<absl::Status(int)>& fn) {
    std::vector<absl::Status> statuses(world());
    std::vector<std::thread> threads;
    for (int r = 0; r < world(); ++r) threads.emplace_back([&, r] { statuses[r] = fn(r); });
    for (auto& t : threads) t.join();
    return statuses;
  }
  // Issue + Wait: a backend may report errors from either.
  static absl::Status Run(Communicator& c, absl::Span<const Collective> ops, absl::Duration timeout = kNoTimeout) {
    CollectiveOptions options;
    options.timeout = timeout;
    absl::StatusOr<std::unique_ptr<Work>> work = c.Issue(ops, options);
    if (!work.ok()) return work.status();
    return (*work)->Wait();
  }
  std::vector<absl::Status> RunOnAllRanks(const std::function<std::vector<Collective>(int)>& ops_of) {
    return OnAllRanks([&](int r) { return Run(comm(r), ops_of(r)); });
  }

  std::vector<TestBuffer> RandomPerRank(DType dtype, int64_t n) {
    std::vector<TestBuffer> bufs;
    for (int r = 0; r < world(); ++r) {
      bufs.emplace_back(dtype, n);
      bufs.back().FillRandom(rng_);
    }
    return bufs;
  }
  std::vector<TestBuffer> PoisonedPerRank(DType dtype, int64_t n) {
    std::vector<TestBuffer> bufs;
    for (int r = 0; r < world(); ++r) {
      bufs.emplace_back(dtype, n);
      bufs.back().Poison();
    }
    return bufs;
  }

  // out[j] must be the reduction over ranks q of inputs[q][offset + j] (values in double, taken before the call).
  void ExpectReduced(const TestBuffer& out, const std::vector<std::vector<double>>& inputs, int64_t offset, ReduceOp op,
                     const std::string& what) {
    int bad = 0;
    for (int64_t j = 0; j < out.count() && bad < 5; ++j) {
      double sum = 0, sum_abs = 0;
      for (const auto& in : inputs) {
        sum += in[offset + j];
        sum_abs += std::fabs(in[offset + j]);
      }
      if (op == ReduceOp::kAvg) {
        sum /= world();
        sum_abs /= world();
      }
      // Accumulation in the backend's compute type plus one rounding to the output dtype.
      const double tol = 4 * Epsilon(out.dtype()) * sum_abs + MinSubnormal(out.dtype());
      if (!(std::fabs(out.Get(j) - sum) <= tol)) {
        ++bad;
        ADD_FAILURE() << what << " " << DTypeName(out.dtype()) << " element " << j << ": got " << out.Get(j)
                      << ", expected " << sum << " +- " << tol;
      }
    }
  }
  void ExpectAll(const std::vector<absl::Status>& statuses, absl::StatusCode code, const std::string& what) {
    for (int r = 0; r < world(); ++r)
      EXPECT_EQ(statuses[r].code(), code) << what << ", rank " << r << ": " << statuses[r];
  }

  std::mt19937_64 rng_;
  std::optional<::testing::ScopedTrace> trace_;
  std::vector<std::unique_ptr<Communicator>> comms_;
};

TEST_P(CommConformance, AllGatherUnevenCounts) {
  for (DType dtype : kAllDTypes) {
    for (int64_t n : {7, 1, 0}) {
      auto in = RandomPerRank(dtype, n);
      auto out = PoisonedPerRank(dtype, n * world());
      ExpectAll(RunOnAllRanks([&](int r) { return std::vector{Collective::AllGather(in[r].view(), out[r].view())}; }),
                absl::StatusCode::kOk, "all_gather");
      for (int r = 0; r < world(); ++r) {
        for (int q = 0; q < world(); ++q) {
          for (int64_t j = 0; j < n; ++j) {
            ASSERT_EQ(out[r].Get(q * n + j), in[q].Get(j)) << DTypeName(dtype) << " rank " << r << " block " << q;
          }
        }
      }
    }
  }
}

TEST_P(CommConformance, InPlaceAllGatherAndReduceScatter) {
  // The input is this rank's block of the output (all-gather) or the output is this rank's block of the input
  // (reduce-scatter), as NCCL allows and FSDP uses to avoid a copy.
  const int64_t n = 7;
  auto out = PoisonedPerRank(DType::kFloat32, n * world());
  auto src = RandomPerRank(DType::kFloat32, n);
  for (int r = 0; r < world(); ++r) {
    for (int64_t j = 0; j < n; ++j) out[r].Set(r * n + j, src[r].Get(j));
  }
  ExpectAll(
      RunOnAllRanks([&](int r) { return std::vector{Collective::AllGather(out[r].slice(r * n, n), out[r].view())}; }),
      absl::StatusCode::kOk, "in-place all_gather");
  for (int r = 0; r < world(); ++r) {
    for (int64_t i = 0; i < n * world(); ++i) ASSERT_EQ(out[r].Get(i), src[i / n].Get(i % n)) << "rank " << r;
  }
  auto rs = RandomPerRank(DType::kFloat32, n * world());
  std::vector<std::vector<double>> ref;
  for (auto& b : rs) ref.push_back(b.ToDoubles());
  ExpectAll(RunOnAllRanks([&](int r) {
              return std::vector{Collective::ReduceScatter(rs[r].view(), rs[r].slice(r * n, n), ReduceOp::kSum)};
            }),
            absl::StatusCode::kOk, "in-place reduce_scatter");
  for (int r = 0; r < world(); ++r) {
    TestBuffer mine(DType::kFloat32, n);
    for (int64_t j = 0; j < n; ++j) mine.Set(j, rs[r].Get(r * n + j));
    ExpectReduced(mine, ref, r * n, ReduceOp::kSum, "in-place reduce_scatter rank " + std::to_string(r));
  }
}

TEST_P(CommConformance, ReduceScatterSumAndAvg) {
  for (DType dtype : kAllDTypes) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
      const int64_t n = 5;
      auto in = RandomPerRank(dtype, n * world());
      auto out = PoisonedPerRank(dtype, n);
      std::vector<std::vector<double>> ref;
      for (auto& b : in) ref.push_back(b.ToDoubles());
      ExpectAll(
          RunOnAllRanks([&](int r) { return std::vector{Collective::ReduceScatter(in[r].view(), out[r].view(), op)}; }),
          absl::StatusCode::kOk, "reduce_scatter");
      for (int r = 0; r < world(); ++r)
        ExpectReduced(out[r], ref, r * n, op, "reduce_scatter rank " + std::to_string(r));
    }
  }
}

TEST_P(CommConformance, AllReduceSumAndAvg) {
  for (DType dtype : kAllDTypes) {
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
      for (bool in_place : {true, false}) {
        const int64_t n = 13;
        auto in = RandomPerRank(dtype, n);
        auto out = PoisonedPerRank(dtype, n);
        std::vector<std::vector<double>> ref;
        for (auto& b : in) ref.push_back(b.ToDoubles());
        ExpectAll(RunOnAllRanks([&](int r) {
                    return std::vector{in_place
                                           ? Collective::AllReduce(in[r].view(), op)
                                           : Collective{CollectiveKind::kAllReduce, in[r].view(), out[r].view(), op}};
                  }),
                  absl::StatusCode::kOk, "all_reduce");
        std::vector<TestBuffer>& result = in_place ? in : out;
        for (int r = 0; r < world(); ++r) {
          ExpectReduced(result[r], ref, 0, op, "all_reduce rank " + std::to_string(r));
          // Ranks must agree bit for bit, or replicas drift apart over many steps.
          for (int64_t j = 0; j < n; ++j)
            ASSERT_EQ(result[r].Get(j), result[0].Get(j)) << "rank " << r << " elem " << j;
        }
      }
    }
  }
}

TEST_P(CommConformance, BroadcastFromEveryRoot) {
  for (DType dtype : kAllDTypes) {
    for (int root = 0; root < world(); ++root) {
      auto buf = RandomPerRank(dtype, 9);
      const std::vector<double> expected = buf[root].ToDoubles();
      ExpectAll(RunOnAllRanks([&](int r) { return std::vector{Collective::Broadcast(buf[r].view(), root)}; }),
                absl::StatusCode::kOk, "broadcast");
      for (int r = 0; r < world(); ++r)
        EXPECT_EQ(buf[r].ToDoubles(), expected) << DTypeName(dtype) << " root " << root << " rank " << r;
    }
  }
}

TEST_P(CommConformance, FusedGroupOfMixedCollectives) {
  const int W = world();
  auto ag_in = RandomPerRank(DType::kFloat32, 7);
  auto ag_out = PoisonedPerRank(DType::kFloat32, 7 * W);
  auto rs_in = RandomPerRank(DType::kBFloat16, 3 * W);
  auto rs_out = PoisonedPerRank(DType::kBFloat16, 3);
  auto ar = RandomPerRank(DType::kFloat64, 11);
  auto bc = RandomPerRank(DType::kFloat16, 4);
  auto empty_in = PoisonedPerRank(DType::kFloat64, 0);
  auto empty_out = PoisonedPerRank(DType::kFloat64, 0);
  std::vector<std::vector<double>> rs_ref, ar_ref;
  for (int r = 0; r < W; ++r) {
    rs_ref.push_back(rs_in[r].ToDoubles());
    ar_ref.push_back(ar[r].ToDoubles());
  }
  const std::vector<double> bc_ref = bc[W - 1].ToDoubles();
  ExpectAll(RunOnAllRanks([&](int r) {
              return std::vector{Collective::AllGather(ag_in[r].view(), ag_out[r].view()),
                                 Collective::ReduceScatter(rs_in[r].view(), rs_out[r].view(), ReduceOp::kAvg),
                                 Collective::AllReduce(ar[r].view(), ReduceOp::kSum),
                                 Collective::Broadcast(bc[r].view(), W - 1),
                                 Collective::AllGather(empty_in[r].view(), empty_out[r].view())};
            }),
            absl::StatusCode::kOk, "fused group");
  for (int r = 0; r < W; ++r) {
    for (int64_t i = 0; i < 7 * W; ++i) ASSERT_EQ(ag_out[r].Get(i), ag_in[i / 7].Get(i % 7)) << "rank " << r;
    ExpectReduced(rs_out[r], rs_ref, r * 3, ReduceOp::kAvg, "grouped reduce_scatter");
    ExpectReduced(ar[r], ar_ref, 0, ReduceOp::kSum, "grouped all_reduce");
    EXPECT_EQ(bc[r].ToDoubles(), bc_ref) << "grouped broadcast, rank " << r;
  }
}

TEST_P(CommConformance, RejectsInvalidCollectivesAndStaysUsable) {
  const int W = world();
  auto in = RandomPerRank(DType::kFloat32, 4 * W);
  auto out = PoisonedPerRank(DType::kFloat32, 4 * W + 1);
  auto bf = PoisonedPerRank(DType::kBFloat16, 4 * W);
  const std::vector<std::pair<std::string, std::function<std::vector<Collective>(int)>>> cases = {
      {"all_gather output one too long",
       [&](int r) { return std::vector{Collective::AllGather(in[r].slice(0, 4), out[r].view())}; }},
      {"reduce_scatter input one too long",
       [&](int r) { return std::vector{Collective::ReduceScatter(out[r].view(), in[r].slice(0, 4), ReduceOp::kSum)}; }},
      {"all_reduce counts differ",
       [&](int r) {
         return std::vector{Collective{CollectiveKind::kAllReduce, in[r].view(), out[r].view()}};
       }},
      {"dtype mismatch", [&](int r) { return std::vector{Collective::AllGather(in[r].slice(0, 4), bf[r].view())}; }},
      {"broadcast root outside the group", [&](int r) { return std::vector{Collective::Broadcast(in[r].view(), W)}; }},
      {"negative root", [&](int r) { return std::vector{Collective::Broadcast(in[r].view(), -1)}; }},
      // A bad op anywhere in a group fails the whole group before anything is written.
      {"valid op then invalid op",
       [&](int r) {
         return std::vector{Collective::AllGather(in[r].slice(0, 4), out[r].slice(0, 4 * W)),
                            Collective::AllGather(in[r].slice(0, 4), bf[r].view())};
       }},
  };
  for (const auto& [what, ops_of] : cases) ExpectAll(RunOnAllRanks(ops_of), absl::StatusCode::kInvalidArgument, what);
  for (int r = 0; r < W; ++r) {
    for (int64_t i = 0; i < out[r].count(); ++i)
      ASSERT_TRUE(std::isnan(out[r].Get(i))) << "rank " << r << " written at " << i;
  }
  // Validation failures are local and leave the group in step: a valid collective still works.
  ExpectAll(RunOnAllRanks(
                [&](int r) { return std::vector{Collective::AllGather(in[r].slice(0, 4), out[r].slice(0, 4 * W))}; }),
            absl::StatusCode::kOk, "all_gather after errors");
  for (int r = 0; r < W; ++r) ASSERT_EQ(out[r].Get(4 * (W - 1)), in[W - 1].Get(0));
}

TEST_P(CommConformance, MissingRankTimesOutInsteadOfHanging) {
  if (world() < 2) GTEST_SKIP() << "needs a peer that does not come";
  auto buf = RandomPerRank(DType::kFloat32, 8);
  const int absent = world() - 1;
  const auto start = std::chrono::steady_clock::now();
  std::vector<absl::Status> statuses = OnAllRanks([&](int r) {
    if (r == absent) return absl::OkStatus();
    Collective op = Collective::AllReduce(buf[r].view(), ReduceOp::kSum);
    return Run(comm(r), absl::MakeConstSpan(&op, 1), kShortTimeout);
  });
  EXPECT_LT(std::chrono::steady_clock::now() - start, kHangLimit);
  for (int r = 0; r < absent; ++r) EXPECT_EQ(statuses[r].code(), absl::StatusCode::kDeadlineExceeded) << statuses[r];
  // After a timeout the group is unusable (nobody knows what the peers completed); later calls fail, not hang.
  for (int r : {0, absent}) {
    Collective op = Collective::AllReduce(buf[r].view(), ReduceOp::kSum);
    const auto again = std::chrono::steady_clock::now();
    EXPECT_FALSE(Run(comm(r), absl::MakeConstSpan(&op, 1), kShortTimeout).ok()) << "rank " << r;
    EXPECT_LT(std::chrono::steady_clock::now() - again, kHangLimit);
  }
}

TEST_P(CommConformance, BarrierWaitsForEveryRank) {
  std::vector<std::atomic<bool>> arrived(world());
  ExpectAll(OnAllRanks([&](int r) {
              if (r == 0) std::this_thread::sleep_for(std::chrono::milliseconds(30));  // the late one must be awaited
              arrived[r] = true;
              absl::Status s = comm(r).Barrier(kNoTimeout);
              for (int q = 0; q < world() && s.ok(); ++q) {
                if (!arrived[q])
                  s = absl::InternalError("barrier returned before rank " + std::to_string(q) + " arrived");
              }
              return s;
            }),
            absl::StatusCode::kOk, "barrier");
  if (world() < 2) return;
  const int absent = world() - 1;
  std::vector<absl::Status> statuses =
      OnAllRanks([&](int r) { return r == absent ? absl::OkStatus() : comm(r).Barrier(kShortTimeout); });
  for (int r = 0; r < absent; ++r) EXPECT_EQ(statuses[r].code(), absl::StatusCode::kDeadlineExceeded) << statuses[r];
}

TEST_P(CommConformance, MismatchedGroupsFailOnEveryRankWithoutHanging) {
  if (!backend().detects_mismatched_groups) {
    GTEST_SKIP() << backend().name << " does not reject mismatched groups with InvalidArgument"
                 << (backend().aborts_mismatched_groups ? " (it aborts them: see the next test)" : "");
  }
  if (world() < 2) GTEST_SKIP() << "one rank cannot disagree with itself";
  const int W = world();
  auto a = RandomPerRank(DType::kFloat32, 6 * W);
  auto b = PoisonedPerRank(DType::kFloat32, 6 * W);
  auto d = RandomPerRank(DType::kFloat64, 6);
  // Rank 0 differs from the others in one respect per case.
  const std::vector<std::pair<std::string, std::function<std::vector<Collective>(int)>>> cases = {
      {"kind",
       [&](int r) {
         return std::vector{r == 0 ? Collective::AllGather(a[r].slice(0, 6), b[r].view())
                                   : Collective::AllReduce(a[r].slice(0, 6), ReduceOp::kSum)};
       }},
      {"count",
       [&](int r) { return std::vector{Collective::AllReduce(a[r].slice(0, r == 0 ? 5 : 6), ReduceOp::kSum)}; }},
      {"dtype",
       [&](int r) {
         return std::vector{Collective::AllReduce(r == 0 ? d[r].view() : a[r].slice(0, 6), ReduceOp::kSum)};
       }},
      {"reduce op",
       [&](int r) {
         return std::vector{Collective::AllReduce(a[r].slice(0, 6), r == 0 ? ReduceOp::kAvg : ReduceOp::kSum)};
       }},
      {"root", [&](int r) { return std::vector{Collective::Broadcast(a[r].slice(0, 6), r == 0 ? 1 : 0)}; }},
      {"group size",
       [&](int r) {
         std::vector ops{Collective::AllReduce(a[r].slice(0, 6), ReduceOp::kSum)};
         if (r == 0) ops.push_back(Collective::AllReduce(a[r].slice(6, 6), ReduceOp::kSum));
         return ops;
       }},
      // A rank whose own group is invalid still fails the others at once rather than leaving them to time out.
      {"one rank invalid",
       [&](int r) { return std::vector{Collective::AllGather(a[r].slice(0, 6), b[r].slice(0, r == 0 ? 1 : 6 * W))}; }},
  };
  for (const auto& [what, ops_of] : cases) {
    const auto start = std::chrono::steady_clock::now();
    ExpectAll(RunOnAllRanks(ops_of), absl::StatusCode::kInvalidArgument, "mismatched " + what);
    EXPECT_LT(std::chrono::steady_clock::now() - start, kHangLimit) << what;
  }
  ExpectAll(OnAllRanks([&](int r) {
              return r == 0 ? comm(r).Barrier(kNoTimeout)
                            : Run(comm(r), std::vector{Collective::AllReduce(a[r].slice(0, 6), ReduceOp::kSum)});
            }),
            absl::StatusCode::kInvalidArgument, "barrier vs all_reduce");
  // Every rank saw the same verdict, so the group is still in step.
  std::vector<std::vector<double>> ref;
  for (auto& buf : a) ref.push_back(buf.ToDoubles());
  ExpectAll(RunOnAllRanks([&](int r) { return std::vector{Collective::AllReduce(a[r].view(), ReduceOp::kSum)}; }),
            absl::StatusCode::kOk, "all_reduce after mismatches");
  for (int r = 0; r < W; ++r) ExpectReduced(a[r], ref, 0, ReduceOp::kSum, "all_reduce after mismatches");
}

// Backends that check a header before every group (gloo): ranks at different collectives get Aborted naming every
// rank's position, before any data moved (without the header, gloo paired them and its transport thread terminated
// the process: "enforce fail at gloo/transport/tcp/pair.cc: op.preamble.length <= op.nbytes. 12 vs 10" in the
// all_gather count case), and the communicator is unusable afterwards, so
// each case gets fresh communicators. A rank whose own group is invalid fails at Issue and sends no header, so its
// peers wait out their deadline: that case is MissingRankTimesOutInsteadOfHanging's.
TEST_P(CommConformance, MismatchedGroupsAbortEveryRankNamingPositions) {
  if (!backend().aborts_mismatched_groups) GTEST_SKIP() << backend().name << " has no header exchange";
  if (world() < 2) GTEST_SKIP() << "one rank cannot disagree with itself";
  const int W = world();
  auto a = RandomPerRank(DType::kFloat32, 6 * W);
  auto b = PoisonedPerRank(DType::kFloat32, 6 * W);
  auto c = RandomPerRank(DType::kFloat32, 6 * W);
  auto d = RandomPerRank(DType::kFloat64, 6);
  const std::vector<std::pair<std::string, std::function<std::vector<Collective>(int)>>> cases = {
      // Different sizes: what made gloo abort the process.
      {"all_gather count",
       [&](int r) {
         const int64_t n = r == 0 ? 6 : 5;
         return std::vector{Collective::AllGather(a[r].slice(0, n), b[r].slice(0, W * n))};
       }},
      {"kind",
       [&](int r) {
         return std::vector{r == 0 ? Collective::AllGather(a[r].slice(0, 6), b[r].view())
                                   : Collective::AllReduce(a[r].slice(0, 6), ReduceOp::kSum)};
       }},
      {"dtype",
       [&](int r) {
         return std::vector{Collective::AllReduce(r == 0 ? d[r].view() : a[r].slice(0, 6), ReduceOp::kSum)};
       }},
      // Same bytes on the wire: gloo would have mixed unrelated data silently.
      {"reduce op",
       [&](int r) {
         return std::vector{Collective::AllReduce(a[r].slice(0, 6), r == 0 ? ReduceOp::kAvg : ReduceOp::kSum)};
       }},
      {"root", [&](int r) { return std::vector{Collective::Broadcast(a[r].slice(0, 6), r == 0 ? 1 : 0)}; }},
      {"group size",
       [&](int r) {
         std::vector ops{Collective::AllReduce(a[r].slice(0, 6), ReduceOp::kSum)};
         if (r == 0) ops.push_back(Collective::AllReduce(a[r].slice(6, 6), ReduceOp::kSum));
         return ops;
       }},
  };
  for (const auto& [what, ops_of] : cases) {
    SCOPED_TRACE(what);
    comms_.clear();
    auto comms = backend().create(W);
    ASSERT_TRUE(comms.ok()) << comms.status();
    comms_ = std::move(*comms);
    // One matching group first: the mismatch is at #1 on every rank.
    for (auto& buf : c) {
      for (int64_t i = 0; i < buf.count(); ++i) buf.Set(i, 1.0);
    }
    ExpectAll(RunOnAllRanks([&](int r) { return std::vector{Collective::AllReduce(c[r].view(), ReduceOp::kSum)}; }),
              absl::StatusCode::kOk, "all_reduce before the mismatch");
    for (int r = 0; r < W; ++r) EXPECT_EQ(c[r].ToDoubles()[0], W) << "all_reduce before the mismatch, rank " << r;
    for (auto& buf : b) buf.Poison();
    std::vector<std::vector<double>> before;
    for (auto& buf : a) before.push_back(buf.ToDoubles());
    const auto start = std::chrono::steady_clock::now();
    std::vector<absl::Status> statuses = RunOnAllRanks(ops_of);
    EXPECT_LT(std::chrono::steady_clock::now() - start, kHangLimit);
    for (int r = 0; r < W; ++r) {
      EXPECT_EQ(statuses[r].code(), absl::StatusCode::kAborted) << "rank " << r << ": " << statuses[r];
      const std::string msg(statuses[r].message());
      EXPECT_NE(msg.find(kDesyncMarker), std::string::npos) << msg;
      for (int q = 0; q < W; ++q) {
        const std::string at =
            "rank " + std::to_string(q) + " is at " + Position{1, SignatureOf(ops_of(q)), ""}.Describe();
        EXPECT_NE(msg.find(at), std::string::npos) << "rank " << r << "'s error does not say '" << at << "': " << msg;
      }
    }
    // No data moved: every input (all-reduces run in place) and every output are as they were.
    for (int r = 0; r < W; ++r) {
      EXPECT_EQ(a[r].ToDoubles(), before[r]) << "rank " << r << "'s buffer was written";
      EXPECT_TRUE(std::isnan(b[r].ToDoubles()[0])) << "rank " << r << "'s output was written";
    }
    // The ranks cannot tell which of their later collectives would pair: the communicator refuses them.
    const auto refused_start = std::chrono::steady_clock::now();
    for (const absl::Status& s :
         RunOnAllRanks([&](int r) { return std::vector{Collective::AllReduce(c[r].view(), ReduceOp::kSum)}; })) {
      EXPECT_EQ(s.code(), absl::StatusCode::kAborted) << s;
    }
    EXPECT_LT(std::chrono::steady_clock::now() - refused_start, kHangLimit);
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, CommConformance,
                         ::testing::Combine(::testing::ValuesIn(Backends()), ::testing::Values(1, 2, 3, 4)),
                         [](const ::testing::TestParamInfo<CommConformance::ParamType>& info) {
                           return std::get<0>(info.param).name + "_world" + std::to_string(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace tessera::comm
