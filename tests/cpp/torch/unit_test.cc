// torch_rt::Unit over the `local` communicator (ranks as threads), world 2 and 3: sharding and gathering
// parameters, reducing gradients, requires_grad changes. References are computed on the main thread with plain
// libtorch from the values every rank started with (float64, so the only error is the pre-division's rounding).
#include <memory>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include "gtest/gtest.h"
#include "tessera/core/status.h"
#include "torch/torch_testing.h"

namespace tessera::torch_rt {
namespace {

using ::tessera::testing::ExpectAllOk;
using ::tessera::testing::MakeAdoptedUnit;
using ::tessera::testing::MakeGenerator;
using ::tessera::testing::Near;
using ::tessera::testing::OnRanks;
using ::tessera::testing::OwnedSlice;
using ::tessera::testing::Randn;
using ::tessera::testing::TestOptions;

class UnitTest : public ::testing::TestWithParam<int> {
 protected:
  void SetUp() override { at::set_num_threads(1); }  // the ranks are the parallelism; 2 cores
  int world() const { return GetParam(); }
};

// Sizes chosen against the world sizes 2 and 3: 15 and 7 divide by neither or one, 1 is smaller than the world.
const std::vector<std::vector<int64_t>> kShapes = {{5, 3}, {7}, {1}, {2, 2}};
const std::vector<std::string> kNames = {"w53", "v7", "s1", "m22"};

std::vector<at::Tensor> RandomParams(uint64_t seed, at::ScalarType dtype = at::kDouble) {
  at::Generator gen = MakeGenerator(seed);
  std::vector<at::Tensor> out;
  for (const auto& s : kShapes) out.push_back(Randn(s, gen, dtype));
  return out;
}

TEST_P(UnitTest, ShardsGathersExactlyAndReshardFreesStorage) {
  const std::vector<at::Tensor> params = RandomParams(1, at::kFloat);
  ExpectAllOk(OnRanks(world(), [&](int rank, std::shared_ptr<comm::Communicator> c) -> absl::Status {
    std::vector<at::Tensor> mine;  // every rank starts from the same values, as ranks seeded alike do
    for (const auto& p : params) mine.push_back(p.clone());
    TESSERA_ASSIGN_OR_RETURN(auto unit, MakeAdoptedUnit(c, mine, kNames, 3, TestOptions("unit")));
    if (unit->state() != shard::UnitState::kSharded) return absl::InternalError("not sharded after Create");
    for (int64_t i = 0; i < unit->num_params(); ++i) {
      const at::Tensor expected = OwnedSlice(*unit, params[i]);  // possibly empty: s1 on ranks > 0
      TESSERA_RETURN_IF_ERROR(Near(unit->sharded_params()[i], expected,
                                   absl::StrFormat("rank %d shard of %s", rank, kNames[i]), 0));
      if (unit->OwnedRange(i).second != expected.numel()) return absl::InternalError("OwnedRange disagrees");
      if (unit->full_params()[i].storage().nbytes() != 0) return absl::InternalError("unsharded storage allocated");
    }

    TESSERA_RETURN_IF_ERROR(unit->StartUnshard(0));
    TESSERA_RETURN_IF_ERROR(unit->WaitUnshard(0));
    for (int64_t i = 0; i < unit->num_params(); ++i) {
      if (!at::equal(unit->full_params()[i], params[i])) {
        return absl::InternalError(absl::StrFormat("rank %d: gathered %s differs from the original", rank, kNames[i]));
      }
    }
    TESSERA_RETURN_IF_ERROR(unit->Reshard());
    for (int64_t i = 0; i < unit->num_params(); ++i) {
      if (unit->full_params()[i].storage().nbytes() != 0) {
        return absl::InternalError(absl::StrFormat("rank %d: %s still holds storage after Reshard", rank, kNames[i]));
      }
    }
    // An update of the shards (what an optimizer step does) shows in the next gather, through the same tensors
    // autograd saved: WaitUnshard without StartUnshard issues the gather itself.
    {
      c10::NoGradGuard no_grad;
      for (const auto& s : unit->sharded_params()) s.mul_(2);
    }
    TESSERA_RETURN_IF_ERROR(unit->WaitUnshard(0));
    for (int64_t i = 0; i < unit->num_params(); ++i) {
      if (!at::equal(unit->full_params()[i], params[i] * 2)) {
        return absl::InternalError(
            absl::StrFormat("rank %d: re-gathered %s is not the updated shard", rank, kNames[i]));
      }
    }
    TESSERA_ASSIGN_OR_RETURN(std::vector<at::Tensor> gathered, unit->GatherFull());
    for (int64_t i = 0; i < unit->num_params(); ++i) {
      if (!at::equal(gathered[i], params[i] * 2)) return absl::InternalError("GatherFull differs");
    }
    if (unit->gathers_started() != 2 || unit->gathers_discarded() != 0) {
      return absl::InternalError(absl::StrFormat("gathers started %d discarded %d, expected 2 and 0",
                                                 unit->gathers_started(), unit->gathers_discarded()));
    }
    return absl::OkStatus();
  }));
}

// Gradients per rank: grads[r][i] is rank r's gradient of parameter i (undefined = none).
using RankGrads = std::vector<std::vector<at::Tensor>>;

// Gives each rank its unsharded gradients, reduces, and returns nothing; the caller checks.
absl::Status Reduce(Unit& unit, const std::vector<at::Tensor>& grads) {
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].defined()) unit.full_params()[i].mutable_grad() = grads[i].clone();
  }
  TESSERA_RETURN_IF_ERROR(unit.StartReduce(0));
  for (int64_t i = 0; i < unit.num_params(); ++i) {
    if (unit.full_params()[i].grad().defined()) return absl::InternalError("unsharded gradient kept after StartReduce");
  }
  return unit.FinishReduce(0);
}

// The mean over ranks of grads[r][i]; undefined if no rank has one (missing = zero otherwise).
at::Tensor MeanOverRanks(const RankGrads& grads, size_t i, int world) {
  at::Tensor sum;
  for (const auto& g : grads) {
    if (!g[i].defined()) continue;
    sum = sum.defined() ? sum + g[i] : g[i].clone();
  }
  return sum.defined() ? sum / world : sum;
}

// Checks each rank's sharded .grad against its owned slice of `expected[i]` (undefined: .grad must be undefined).
absl::Status ExpectShardedGrads(const Unit& unit, const std::vector<at::Tensor>& expected, const std::string& when) {
  for (size_t i = 0; i < expected.size(); ++i) {
    const at::Tensor& g = unit.sharded_params()[i].grad();
    const std::string what = absl::StrFormat("%s: rank %d grad of %s", when, unit.group_rank(), kNames[i]);
    if (!expected[i].defined()) {
      if (g.defined()) return absl::InternalError(what + " is defined, expected none (no rank produced one)");
      continue;
    }
    TESSERA_RETURN_IF_ERROR(Near(g, OwnedSlice(unit, expected[i]), what));
  }
  return absl::OkStatus();
}

TEST_P(UnitTest, GradientIsTheMeanOverRanksAndReductionsAddUp) {
  const std::vector<at::Tensor> params = RandomParams(2);
  at::Generator gen = MakeGenerator(3);
  RankGrads first(world()), second(world());
  for (int r = 0; r < world(); ++r) {
    for (const auto& s : kShapes) first[r].push_back(Randn(s, gen));
    for (const auto& s : kShapes) second[r].push_back(Randn(s, gen));
  }
  std::vector<at::Tensor> after_one, after_two;
  for (size_t i = 0; i < kShapes.size(); ++i) {
    after_one.push_back(MeanOverRanks(first, i, world()));
    after_two.push_back(after_one[i] + MeanOverRanks(second, i, world()));
  }
  ExpectAllOk(OnRanks(world(), [&](int rank, std::shared_ptr<comm::Communicator> c) -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(auto unit, MakeAdoptedUnit(c, params, kNames, 4, TestOptions("unit")));
    TESSERA_RETURN_IF_ERROR(Reduce(*unit, first[rank]));
    TESSERA_RETURN_IF_ERROR(ExpectShardedGrads(*unit, after_one, "one reduction"));
    // Two backward passes in one step (two losses): the second reduction adds into the sharded gradients.
    TESSERA_RETURN_IF_ERROR(Reduce(*unit, second[rank]));
    return ExpectShardedGrads(*unit, after_two, "two reductions");
  }));
}

TEST_P(UnitTest, GradientsNoRankOrOneRankProduced) {
  // w53: every rank; v7: none (it must keep .grad undefined); s1: the last rank only (each rank gets its
  // gradient / world); m22: frozen at creation, so it takes no part.
  const std::vector<at::Tensor> params = RandomParams(4);
  const int last = world() - 1;
  at::Generator gen = MakeGenerator(5);
  RankGrads first(world()), second(world());
  for (int r = 0; r < world(); ++r) {
    first[r] = {Randn(kShapes[0], gen), at::Tensor(), r == last ? Randn(kShapes[2], gen) : at::Tensor()};
    // The second pass: v7 gets one on rank 0 only, s1 on every rank.
    second[r] = {Randn(kShapes[0], gen), r == 0 ? Randn(kShapes[1], gen) : at::Tensor(), Randn(kShapes[2], gen)};
  }
  std::vector<at::Tensor> after_one, after_two;
  for (size_t i = 0; i < 3; ++i) {
    after_one.push_back(MeanOverRanks(first, i, world()));
    const at::Tensor more = MeanOverRanks(second, i, world());
    after_two.push_back(after_one[i].defined() ? after_one[i] + more : more);
  }
  ASSERT_FALSE(after_one[1].defined());
  ExpectAllOk(OnRanks(world(), [&](int rank, std::shared_ptr<comm::Communicator> c) -> absl::Status {
    // Sharded (reduce-scatter) and NO_SHARD (all-reduce, every rank keeps the whole averaged gradient).
    for (bool shard : {true, false}) {
      torch_rt::UnitOptions options = TestOptions(shard ? "sharded" : "replicated");
      options.shard = shard;
      TESSERA_ASSIGN_OR_RETURN(auto unit, MakeAdoptedUnit(c, params, kNames, 3, options));
      if (unit->sharded_grads().size() != 3) return absl::InternalError("a frozen parameter got a gradient view");
      TESSERA_RETURN_IF_ERROR(Reduce(*unit, first[rank]));
      TESSERA_RETURN_IF_ERROR(ExpectShardedGrads(*unit, after_one, options.name + ", first pass"));
      TESSERA_RETURN_IF_ERROR(Reduce(*unit, second[rank]));
      TESSERA_RETURN_IF_ERROR(ExpectShardedGrads(*unit, after_two, options.name + ", second pass"));
      if (unit->sharded_params()[3].grad().defined()) return absl::InternalError("frozen m22 got a gradient");
    }
    return absl::OkStatus();
  }));
}

TEST_P(UnitTest, MixedPrecisionGathersInParamDtypeAndReducesInReduceDtype) {
  // float32 storage, bfloat16 compute, float32 reduction: the gather casts once, gradients come back in float32.
  const std::vector<at::Tensor> params = RandomParams(7, at::kFloat);
  at::Generator gen = MakeGenerator(8);
  RankGrads grads(world());
  for (int r = 0; r < world(); ++r) {
    for (const auto& s : kShapes) grads[r].push_back(Randn(s, gen, at::kBFloat16));
  }
  std::vector<at::Tensor> expected;
  RankGrads as_double(world());
  for (int r = 0; r < world(); ++r) {
    for (const auto& g : grads[r]) as_double[r].push_back(g.to(at::kDouble));
  }
  for (size_t i = 0; i < kShapes.size(); ++i) expected.push_back(MeanOverRanks(as_double, i, world()));
  ExpectAllOk(OnRanks(world(), [&](int rank, std::shared_ptr<comm::Communicator> c) -> absl::Status {
    torch_rt::UnitOptions options = TestOptions("mixed");
    options.param_dtype = at::kBFloat16;
    options.reduce_dtype = at::kFloat;
    TESSERA_ASSIGN_OR_RETURN(auto unit, MakeAdoptedUnit(c, params, kNames, 4, options));
    TESSERA_RETURN_IF_ERROR(unit->WaitUnshard(0));
    for (int64_t i = 0; i < unit->num_params(); ++i) {
      const at::Tensor& full = unit->full_params()[i];
      if (full.scalar_type() != at::kBFloat16 || !at::equal(full, params[i].to(at::kBFloat16))) {
        return absl::InternalError(absl::StrFormat("rank %d: %s gathered as %s, not the bfloat16 cast of the original",
                                                   rank, kNames[i], c10::toString(full.scalar_type())));
      }
    }
    TESSERA_RETURN_IF_ERROR(Reduce(*unit, grads[rank]));
    for (int64_t i = 0; i < unit->num_params(); ++i) {
      const at::Tensor& g = unit->sharded_params()[i].grad();
      if (!g.defined() || g.scalar_type() != at::kFloat) return absl::InternalError("gradient not float32");
      // bfloat16 inputs are exact in float32; the pre-division by the world and the sum round in float32.
      TESSERA_RETURN_IF_ERROR(Near(g, OwnedSlice(*unit, expected[i]), "mixed-precision grad of " + kNames[i], 1e-6));
    }
    return absl::OkStatus();
  }));
}

TEST_P(UnitTest, SyncRequiresGradFreezesAndRefusesUnfreezingAFrozenParameter) {
  const std::vector<at::Tensor> params = RandomParams(6);
  ExpectAllOk(OnRanks(world(), [&](int rank, std::shared_ptr<comm::Communicator> c) -> absl::Status {
    // s1 and m22 are frozen at creation.
    TESSERA_ASSIGN_OR_RETURN(auto unit, MakeAdoptedUnit(c, params, kNames, 2, TestOptions("unit")));
    const auto& sharded = unit->sharded_params();
    const auto& full = unit->full_params();
    sharded[1].set_requires_grad(false);  // the user freezes v7 between steps
    TESSERA_RETURN_IF_ERROR(unit->SyncRequiresGrad());
    if (full[1].requires_grad() || !full[0].requires_grad()) return absl::InternalError("freezing v7 did not apply");
    if (!unit->WantsReduce()) return absl::InternalError("w53 is still trainable, yet no reduction wanted");
    sharded[0].set_requires_grad(false);
    TESSERA_RETURN_IF_ERROR(unit->SyncRequiresGrad());
    if (unit->WantsReduce()) return absl::InternalError("nothing trainable, yet a reduction wanted");
    sharded[1].set_requires_grad(true);  // unfreezing a parameter trainable at creation works
    TESSERA_RETURN_IF_ERROR(unit->SyncRequiresGrad());
    if (!full[1].requires_grad()) return absl::InternalError("unfreezing v7 did not apply");
    sharded[3].set_requires_grad(true);  // m22 was frozen at creation: it has no gradient buffer
    absl::Status s = unit->SyncRequiresGrad();
    if (s.code() != absl::StatusCode::kFailedPrecondition || s.message().find("'m22'") == std::string::npos) {
      return absl::InternalError(absl::StrFormat("unfreezing m22: expected FailedPrecondition naming it, got %s",
                                                 s.ToString()));
    }
    return absl::OkStatus();
  }));
}

INSTANTIATE_TEST_SUITE_P(World, UnitTest, ::testing::Values(2, 3),
                         [](const ::testing::TestParamInfo<int>& info) {
                           return "world" + std::to_string(info.param);
                         });

}  // namespace
}  // namespace tessera::torch_rt
