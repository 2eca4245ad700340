// The step schedule against a recording fake unit: which unit unshards, prefetches, reduces and reshards at each
// event of a step, for the patterns the Python hooks and the C++ trainer API report.
#include "tessera/shard/schedule.h"

#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

namespace tessera::shard {
namespace {

// A unit that records what the schedule asked of it. "gathered" follows StartUnshard/WaitUnshard/Reshard.
class FakeUnit final : public UnitOps {
 public:
  FakeUnit(std::string name, std::vector<std::string>* log) : name_(std::move(name)), log_(log) {}
  const std::string& unit_name() const override { return name_; }
  bool IsSharded() const override { return state_ == 0; }
  absl::Status StartUnshard(uintptr_t) override {
    if (state_ == 0) {
      state_ = 1;
      Log("start_unshard");
    }
    return absl::OkStatus();
  }
  absl::Status WaitUnshard(uintptr_t) override {
    if (state_ == 0) {
      state_ = 1;
      Log("start_unshard");
    }
    state_ = 2;
    return absl::OkStatus();
  }
  absl::Status Reshard() override {
    if (state_ != 0) Log("reshard");
    state_ = 0;
    return absl::OkStatus();
  }
  absl::Status SyncRequiresGrad() override {
    ++syncs;
    return sync_status;
  }
  bool WantsReduce() const override { return wants_reduce; }
  absl::Status StartReduce(uintptr_t) override {
    if (reducing_) ++finished_reductions;
    reducing_ = true;
    ++reductions;
    Log("reduce");
    return absl::OkStatus();
  }
  bool Reducing() const override { return reducing_; }
  absl::Status FinishReduce(uintptr_t) override {
    if (reducing_) ++finished_reductions;
    reducing_ = false;
    return absl::OkStatus();
  }
  absl::Status DropBackward(uintptr_t) override {
    reducing_ = false;
    Log("drop");
    return absl::OkStatus();
  }
  bool gathered() const { return state_ == 2; }

  bool wants_reduce = true;
  absl::Status sync_status;
  int syncs = 0, reductions = 0, finished_reductions = 0;

 private:
  void Log(const std::string& what) { log_->push_back(name_ + ":" + what); }
  std::string name_;
  std::vector<std::string>* log_;
  int state_ = 0;  // 0 sharded, 1 unsharding, 2 unsharded
  bool reducing_ = false;
};

// A root and `n` blocks, FULL_SHARD defaults: what tessera.shard on each block and then the root builds.
struct Model {
  explicit Model(int n) {
    units.push_back(std::make_unique<FakeUnit>("root", &log));
    for (int i = 0; i < n; ++i) units.push_back(std::make_unique<FakeUnit>("b" + std::to_string(i), &log));
    std::vector<UnitOps*> ops;
    for (auto& u : units) ops.push_back(u.get());
    schedule = std::make_unique<StepSchedule>(ops, std::vector<UnitPolicy>(units.size()));
  }
  // root forward enclosing the blocks in order, with grad.
  void Forward(bool grad = true) {
    ASSERT_TRUE(schedule->PreForward(0, false, 0).ok());
    for (int u = 1; u < static_cast<int>(units.size()); ++u) {
      ASSERT_TRUE(schedule->PreForward(u, false, 0).ok());
      ASSERT_TRUE(schedule->PostForward(u, grad, false).ok());
    }
    ASSERT_TRUE(schedule->PostForward(0, grad, false).ok());
  }
  // Backward through the blocks in reverse and the root (which has no post-backward hook of its own).
  void Backward() {
    auto first = schedule->PreBackward(0, 0);
    ASSERT_TRUE(first.ok());
    for (int u = static_cast<int>(units.size()) - 1; u >= 1; --u) {
      ASSERT_TRUE(schedule->PreBackward(u, 0).ok());
      ASSERT_TRUE(schedule->PostBackward(u, 0).ok());
    }
    ASSERT_TRUE(schedule->EndOfBackward(0).ok());
  }
  std::vector<std::string> log;
  std::vector<std::unique_ptr<FakeUnit>> units;
  std::unique_ptr<StepSchedule> schedule;
};

TEST(StepScheduleTest, RecordsOrderThenPrefetchesNextUnitInForwardAndPreviousInBackward) {
  Model m(3);
  m.Forward();
  m.Backward();
  EXPECT_EQ(m.schedule->forward_order(), (std::vector<int>{0, 1, 2, 3}));
  m.log.clear();
  ASSERT_TRUE(m.schedule->PreForward(0, false, 0).ok());
  // The root gathers itself and prefetches the first block.
  EXPECT_EQ(m.log, (std::vector<std::string>{"root:start_unshard", "b0:start_unshard"}));
  m.log.clear();
  ASSERT_TRUE(m.schedule->PreForward(1, false, 0).ok());
  EXPECT_EQ(m.log, (std::vector<std::string>{"b1:start_unshard"}));
}

TEST(StepScheduleTest, RootAndLastUnitKeepParametersAfterForwardOthersReshard) {
  Model m(3);
  m.Forward();
  m.Backward();
  m.Forward();
  EXPECT_TRUE(m.units[0]->gathered());   // root: its backward starts right after its forward
  EXPECT_FALSE(m.units[1]->gathered());  // FULL_SHARD frees the middle blocks
  EXPECT_FALSE(m.units[2]->gathered());
  EXPECT_TRUE(m.units[3]->gathered());   // the last block runs backward first
  EXPECT_FALSE(m.schedule->reshard_after_forward(0));
  EXPECT_TRUE(m.schedule->reshard_after_forward(1));
}

TEST(StepScheduleTest, EveryBackwardPassReducesEveryUnitIncludingTheRoot) {
  // Two forwards, then loss1.backward(); loss2.backward(): the root (no post-backward hook) must reduce in both
  // passes. Before the fix it reduced in the first only and its second gradient leaked into the next step.
  Model m(2);
  m.Forward();
  m.Forward();
  m.Backward();
  EXPECT_EQ(m.units[0]->reductions, 1);
  m.Backward();
  for (auto& u : m.units) {
    EXPECT_EQ(u->reductions, 2) << u->unit_name();
    EXPECT_EQ(u->finished_reductions, 2) << u->unit_name();
    EXPECT_FALSE(u->Reducing()) << u->unit_name();
    EXPECT_FALSE(u->gathered()) << u->unit_name() << " left unsharded after the step";
  }
  for (int u = 0; u < 3; ++u) EXPECT_EQ(m.schedule->state(u), TrainingState::kIdle);
  EXPECT_FALSE(m.schedule->in_backward());
}

TEST(StepScheduleTest, UnitThatRanForwardButGotNoGradientStillReducesSoRanksIssueTheSameCollectives) {
  Model m(2);
  m.Forward();
  // The loss does not depend on block 1 on this rank: its pre/post-backward never run.
  ASSERT_TRUE(m.schedule->PreBackward(0, 0).ok());
  ASSERT_TRUE(m.schedule->PreBackward(1, 0).ok());
  ASSERT_TRUE(m.schedule->PostBackward(1, 0).ok());
  auto finished = m.schedule->EndOfBackward(0);
  ASSERT_TRUE(finished.ok());
  EXPECT_EQ(*finished, (std::vector<int>{0, 2}));
  EXPECT_EQ(m.units[2]->reductions, 1);
}

TEST(StepScheduleTest, ForwardWithoutGradReshardsAndReducesNothing) {
  Model m(2);
  m.Forward(/*grad=*/false);
  for (auto& u : m.units) EXPECT_FALSE(u->gathered()) << u->unit_name();
  ASSERT_TRUE(m.schedule->PreForward(0, false, 0).ok());  // no backward followed: nothing to abandon
  for (auto& u : m.units) EXPECT_EQ(u->reductions, 0);
}

TEST(StepScheduleTest, NoReductionWhenTheUnitDoesNotWantOne) {
  Model m(1);
  m.units[1]->wants_reduce = false;  // gradient sync off, or every parameter frozen
  m.Forward();
  m.Backward();
  EXPECT_EQ(m.units[1]->reductions, 0);
  EXPECT_EQ(m.units[0]->reductions, 1);
}

TEST(StepScheduleTest, ActivationCheckpointingRecomputationInsidePreBackward) {
  Model m(1);
  m.Forward();
  ASSERT_TRUE(m.schedule->PreBackward(0, 0).ok());
  ASSERT_TRUE(m.schedule->PreBackward(1, 0).ok());
  const int syncs = m.units[1]->syncs;
  auto r = m.schedule->PreForward(1, /*in_backward=*/true, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->recompute_in_backward);
  EXPECT_EQ(m.units[1]->syncs, syncs);  // requires_grad changes apply only outside backward
  auto swap = m.schedule->PostForward(1, true, true);
  ASSERT_TRUE(swap.ok());
  EXPECT_FALSE(*swap);  // the full parameters stay on the module until post-backward
  EXPECT_TRUE(m.units[1]->gathered());
  EXPECT_EQ(m.schedule->state(1), TrainingState::kPreBackward);
}

TEST(StepScheduleTest, ForwardAfterABackwardThatRaisedDropsWhatItLeft) {
  Model m(2);
  m.Forward();
  ASSERT_TRUE(m.schedule->PreBackward(0, 0).ok());
  ASSERT_TRUE(m.schedule->PreBackward(2, 0).ok());
  ASSERT_TRUE(m.schedule->PostBackward(2, 0).ok());  // a reduction in flight, then the backward raised
  EXPECT_TRUE(m.units[2]->Reducing());
  m.log.clear();
  auto r = m.schedule->PreForward(0, false, 0);
  ASSERT_TRUE(r.ok());
  EXPECT_TRUE(r->abandoned_backward);
  for (auto& u : m.units) EXPECT_FALSE(u->Reducing()) << u->unit_name();
  EXPECT_EQ(m.log[0], "root:drop");
  EXPECT_EQ(m.units[2]->finished_reductions, 0);  // dropped, never accumulated
  EXPECT_FALSE(m.schedule->in_backward());
}

TEST(StepScheduleTest, RequiresGradErrorsSurfaceAtPreForward) {
  Model m(1);
  m.units[1]->sync_status = absl::FailedPreconditionError("b0: parameter 'w' was frozen");
  ASSERT_TRUE(m.schedule->PreForward(0, false, 0).ok());
  auto r = m.schedule->PreForward(1, false, 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(r.status().message().find("parameter 'w'"), absl::string_view::npos);
}

TEST(StepScheduleTest, BadUnitIndexIsInvalidArgument) {
  Model m(1);
  EXPECT_EQ(m.schedule->PreForward(7, false, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(m.schedule->PostBackward(-1, 0).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tessera::shard
