// ShardPlan arithmetic against an element-by-element reference: element e of a parameter with chunk c belongs to
// rank e / c at position e % c of that rank's chunk.
#include "tessera/shard/plan.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"

namespace tessera::shard {
namespace {

void ExpectPlanInvariants(const std::vector<int64_t>& numels, int world) {
  SCOPED_TRACE(::testing::Message() << "world " << world << ", " << numels.size() << " params");
  absl::StatusOr<ShardPlan> plan_or = ShardPlan::Create(numels, world);
  ASSERT_TRUE(plan_or.ok()) << plan_or.status();
  const ShardPlan& plan = *plan_or;
  ASSERT_EQ(plan.world(), world);
  ASSERT_EQ(plan.num_params(), static_cast<int64_t>(numels.size()));

  int64_t expected_offset = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    SCOPED_TRACE(::testing::Message() << "param " << i << " numel " << numels[i]);
    const ParamSlot& s = plan.slot(static_cast<int64_t>(i));
    const int64_t chunk = (numels[i] + world - 1) / world;
    EXPECT_EQ(s.numel, numels[i]);
    EXPECT_EQ(s.chunk, chunk);
    EXPECT_GE(s.chunk * world, s.numel);          // chunks cover the parameter ...
    EXPECT_LT(s.chunk * world - s.numel, world);  // ... with less than one element of padding per rank
    EXPECT_EQ(s.shard_offset, expected_offset);   // parameters are packed back to back in layout order
    EXPECT_EQ(plan.prefix_shard_numel(static_cast<int64_t>(i)), expected_offset);
    expected_offset += chunk;

    // Coverage: every element exactly once, in rank order, with the ranks' ranges contiguous.
    int64_t next = 0;
    int64_t total = 0;
    for (int r = 0; r < world; ++r) {
      const int64_t start = plan.LocalStart(static_cast<int64_t>(i), r);
      const int64_t n = plan.LocalNumel(static_cast<int64_t>(i), r);
      EXPECT_GE(n, 0);
      EXPECT_LE(n, chunk);
      EXPECT_EQ(start, next) << "rank " << r;
      next = start + n;
      total += n;
    }
    EXPECT_EQ(next, numels[i]);
    EXPECT_EQ(total, numels[i]);

    // Ownership per element (small parameters only; large ones are covered by the range checks above).
    if (numels[i] <= 4096) {
      std::vector<int> owners(static_cast<size_t>(numels[i]), 0);
      for (int r = 0; r < world; ++r) {
        const int64_t start = plan.LocalStart(static_cast<int64_t>(i), r);
        for (int64_t j = 0; j < plan.LocalNumel(static_cast<int64_t>(i), r); ++j) {
          const int64_t e = start + j;
          ASSERT_LT(e, numels[i]);
          ++owners[e];
          EXPECT_EQ(e / chunk, r);
          EXPECT_EQ(e % chunk, j);
        }
      }
      for (int64_t e = 0; e < numels[i]; ++e) EXPECT_EQ(owners[e], 1) << "element " << e;
    }
  }
  EXPECT_EQ(plan.shard_numel(), expected_offset);
  EXPECT_EQ(plan.prefix_shard_numel(plan.num_params()), plan.shard_numel());
  EXPECT_EQ(plan.prefix_shard_numel(plan.num_params() + 5), plan.shard_numel());
  EXPECT_EQ(plan.prefix_shard_numel(0), 0);
  EXPECT_EQ(plan.prefix_shard_numel(-1), 0);
}

TEST(ShardPlanTest, HandPickedLayouts) {
  // numel 10 over 4 ranks: chunk 3, ranks own 3, 3, 3, 1.
  absl::StatusOr<ShardPlan> plan = ShardPlan::Create({10, 2, 0, 8}, 4);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->slot(0).chunk, 3);
  EXPECT_EQ(plan->LocalNumel(0, 3), 1);
  EXPECT_EQ(plan->LocalStart(0, 3), 9);
  // numel 2 < world 4: ranks 0 and 1 own one element, ranks 2 and 3 own nothing but still pad one slot.
  EXPECT_EQ(plan->slot(1).chunk, 1);
  EXPECT_EQ(plan->slot(1).shard_offset, 3);
  EXPECT_EQ(plan->LocalNumel(1, 1), 1);
  EXPECT_EQ(plan->LocalNumel(1, 2), 0);
  EXPECT_EQ(plan->LocalStart(1, 3), 2);
  // numel 0 takes no room in the shard.
  EXPECT_EQ(plan->slot(2).chunk, 0);
  EXPECT_EQ(plan->slot(2).shard_offset, 4);
  EXPECT_EQ(plan->slot(3).shard_offset, 4);
  EXPECT_EQ(plan->shard_numel(), 6);
}

TEST(ShardPlanTest, EdgeCasesForEveryWorldSize) {
  const std::vector<std::vector<int64_t>> cases = {
      {},         // a unit without parameters
      {0},        // one empty parameter
      {0, 0, 0},  //
      {1},        // fewer elements than ranks
      {1, 2, 3, 4, 5, 6, 7, 8, 9},
      {7, 13, 1, 0, 64, 65, 63},  // uneven, divisible and zero mixed
      {4096, 4095, 4097},
      {1000003},                                   // a prime, never divisible
      {int64_t{1} << 33, (int64_t{1} << 40) + 1},  // past 32 bits: no int overflow in the offsets
  };
  for (int world = 1; world <= 9; ++world) {
    for (const auto& numels : cases) ExpectPlanInvariants(numels, world);
  }
  for (int world : {16, 64, 1000, 4096}) {
    for (const auto& numels : cases) ExpectPlanInvariants(numels, world);
  }
}

TEST(ShardPlanTest, RandomLayouts) {
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(::testing::Message() << "seed " << seed);
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> world_dist(1, 32);
  std::uniform_int_distribution<int> count_dist(0, 12);
  std::uniform_int_distribution<int64_t> numel_dist(0, 3000);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<int64_t> numels(static_cast<size_t>(count_dist(rng)));
    for (auto& n : numels) n = numel_dist(rng);
    ExpectPlanInvariants(numels, world_dist(rng));
  }
}

TEST(ShardPlanTest, ShardIsRankMajorConcatenationOfChunks) {
  // Rebuild the all-gather output from the plan and check it is the padded concatenation the header promises:
  // rank r's shard holds param i's chunk r at [shard_offset_i, shard_offset_i + chunk_i).
  const std::vector<int64_t> numels = {5, 3, 11};
  for (int world = 1; world <= 4; ++world) {
    absl::StatusOr<ShardPlan> plan = ShardPlan::Create(numels, world);
    ASSERT_TRUE(plan.ok());
    const int64_t S = plan->shard_numel();
    std::vector<int64_t> gathered(static_cast<size_t>(S * world), -1);
    int64_t base = 0;  // element ids unique across params
    for (int64_t i = 0; i < plan->num_params(); ++i) {
      for (int r = 0; r < world; ++r) {
        for (int64_t j = 0; j < plan->LocalNumel(i, r); ++j) {
          gathered[r * S + plan->slot(i).shard_offset + j] = base + plan->LocalStart(i, r) + j;
        }
      }
      base += numels[i];
    }
    std::vector<int64_t> seen;
    for (int64_t v : gathered) {
      if (v >= 0) seen.push_back(v);
    }
    std::vector<int64_t> expected(static_cast<size_t>(base));
    std::iota(expected.begin(), expected.end(), 0);
    std::sort(seen.begin(), seen.end());
    EXPECT_EQ(seen, expected) << "world " << world;
  }
}

TEST(ShardPlanTest, RejectsBadInput) {
  for (int world : {0, -1, -100}) {
    absl::StatusOr<ShardPlan> plan = ShardPlan::Create({4}, world);
    EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument) << world;
    EXPECT_NE(plan.status().message().find("world"), absl::string_view::npos) << plan.status();
  }
  absl::StatusOr<ShardPlan> plan = ShardPlan::Create({4, -3, 2}, 2);
  EXPECT_EQ(plan.status().code(), absl::StatusCode::kInvalidArgument);
  // The message names the offending parameter and its count.
  EXPECT_NE(plan.status().message().find("parameter 1"), absl::string_view::npos) << plan.status();
  EXPECT_NE(plan.status().message().find("-3"), absl::string_view::npos) << plan.status();
}

}  // namespace
}  // namespace tessera::shard
