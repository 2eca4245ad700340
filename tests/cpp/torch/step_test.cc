// Whole training steps driven by shard::StepSchedule events, as python/tessera/shard/runtime.py drives them, with
// a real libtorch forward and backward: a 2-layer MLP split into two units (l1, l2) and the root (a head bias),
// trained by hand-written SGD on the sharded gradients, against the same MLP trained in one process on the
// concatenation of every rank's batch (float64). The ranks talk through `local` directly or through the pg adapter.
//
// The events come from where the Python hooks put them: pre-forward / post-forward around each unit's compute;
// pre-backward from a gradient hook on each unit's output; post-backward of l2 from a hook on the alias of its
// input (Python's RegisterPostBackward); the root's and l1's post-backward from the end of backward (their
// inputs need no gradient), which Python queues on the autograd engine and this test calls after backward returns.
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/GradMode.h>

#include "absl/strings/str_join.h"
#include "gtest/gtest.h"
#include "tessera/core/status.h"
#include "tessera/shard/schedule.h"
#include "comm/pg/pg_over_local.h"
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

constexpr int kSteps = 2;
constexpr int64_t kBatch = 4;  // rows per rank
constexpr double kLr = 0.1;

// Parameters in unit order: root {hb}, l1 {w1, b1}, l2 {w2, b2}.
struct Mlp {
  std::vector<at::Tensor> p;  // hb [3], w1 [6, 4], b1 [6], w2 [3, 6], b2 [3]
};
const std::vector<std::vector<std::string>> kUnitNames = {{"hb"}, {"w1", "b1"}, {"w2", "b2"}};
const std::vector<std::vector<int>> kUnitParams = {{0}, {1, 2}, {3, 4}};

at::Tensor Loss(const at::Tensor& y, const at::Tensor& target) { return (y - target).pow(2).mean(); }

struct Reference {
  std::vector<std::vector<at::Tensor>> grads;  // [step][param]
  std::vector<double> loss;                    // [step]
  std::vector<at::Tensor> final_params;
};

// One process, the whole batch: what the sharded ranks must reproduce.
Reference TrainInOneProcess(const Mlp& init, const at::Tensor& x, const at::Tensor& target) {
  Reference ref;
  std::vector<at::Tensor> p;
  for (const auto& t : init.p) p.push_back(t.clone().set_requires_grad(true));
  for (int step = 0; step < kSteps; ++step) {
    at::Tensor h = at::tanh(at::linear(x, p[1], p[2]));
    at::Tensor loss = Loss(at::linear(h, p[3], p[4]) + p[0], target);
    loss.backward();
    ref.loss.push_back(loss.item<double>());
    ref.grads.emplace_back();
    c10::NoGradGuard no_grad;
    for (auto& t : p) {
      ref.grads.back().push_back(t.grad().clone());
      t.sub_(kLr * t.grad());
      t.mutable_grad().reset();
    }
  }
  for (const auto& t : p) ref.final_params.push_back(t.detach().clone());
  return ref;
}

// The ranks talk through `local` directly, or through comm::PgCommunicator over a c10d ProcessGroup (the path
// the Python package takes with gloo; see comm/pg/pg_over_local.h).
class StepTest : public ::testing::TestWithParam<std::tuple<std::string, int>> {
 protected:
  void SetUp() override { at::set_num_threads(1); }
  int world() const { return std::get<1>(GetParam()); }
  ::tessera::testing::CommFactory factory() const {
    if (std::get<0>(GetParam()) == "pg") return &::tessera::testing::CreatePgOverLocalCommunicators;
    return &comm::LocalWorld::CreateCommunicators;
  }
};

TEST_P(StepTest, ShardedStepsMatchOneProcess) {
  const int W = world();
  at::Generator gen = MakeGenerator(11);
  Mlp init;
  for (const std::vector<int64_t>& s : std::vector<std::vector<int64_t>>{{3}, {6, 4}, {6}, {3, 6}, {3}}) {
    init.p.push_back(Randn(s, gen));
  }
  const at::Tensor x = Randn({kBatch * W, 4}, gen);
  const at::Tensor target = Randn({kBatch * W, 3}, gen);
  const Reference ref = TrainInOneProcess(init, x, target);
  std::vector<std::vector<double>> losses(W, std::vector<double>(kSteps));

  ExpectAllOk(OnRanks(W, [&](int rank, std::shared_ptr<comm::Communicator> c) -> absl::Status {
    std::vector<std::unique_ptr<Unit>> units;
    for (size_t u = 0; u < kUnitParams.size(); ++u) {
      std::vector<at::Tensor> params;
      for (int i : kUnitParams[u]) params.push_back(init.p[i].clone());
      TESSERA_ASSIGN_OR_RETURN(auto unit, MakeAdoptedUnit(c, params, kUnitNames[u], params.size(),
                                                          TestOptions(u == 0 ? "root" : "l" + std::to_string(u))));
      units.push_back(std::move(unit));
    }
    shard::StepSchedule schedule({units[0].get(), units[1].get(), units[2].get()}, std::vector<shard::UnitPolicy>(3));
    auto full = [&](int u, int i) { return units[u]->full_params()[i]; };
    const at::Tensor xr = x.narrow(0, rank * kBatch, kBatch);
    const at::Tensor tr = target.narrow(0, rank * kBatch, kBatch);

    for (int step = 0; step < kSteps; ++step) {
      absl::Status hook_status;  // the first error a hook met (a hook cannot return one to autograd)
      std::vector<int> first_pre_backward;
      auto pre_backward = [&](int u) {
        return [&, u](const at::Tensor&) {
          absl::StatusOr<bool> first = schedule.PreBackward(u, 0);
          if (!first.ok()) {
            if (hook_status.ok()) hook_status = first.status();
          } else if (*first) {
            first_pre_backward.push_back(u);
          }
        };
      };
      TESSERA_RETURN_IF_ERROR(schedule.PreForward(0, false, 0).status());
      TESSERA_RETURN_IF_ERROR(schedule.PreForward(1, false, 0).status());
      at::Tensor h = at::tanh(at::linear(xr, full(1, 0), full(1, 1)));
      TESSERA_RETURN_IF_ERROR(schedule.PostForward(1, true, false).status());
      h.register_hook(pre_backward(1));
      TESSERA_RETURN_IF_ERROR(schedule.PreForward(2, false, 0).status());
      at::Tensor h_in = h.view_as(h);  // l2's input, aliased so its gradient hook runs after l2's backward
      h_in.register_hook([&](const at::Tensor&) {
        absl::Status s = schedule.PostBackward(2, 0);
        if (hook_status.ok()) hook_status = s;
      });
      at::Tensor o = at::linear(h_in, full(2, 0), full(2, 1));
      TESSERA_RETURN_IF_ERROR(schedule.PostForward(2, true, false).status());
      o.register_hook(pre_backward(2));
      at::Tensor y = o + full(0, 0);
      TESSERA_RETURN_IF_ERROR(schedule.PostForward(0, true, false).status());
      y.register_hook(pre_backward(0));
      // ZeRO-3: l1 and l2 freed their unsharded parameters after forward (autograd holds them, storage empty),
      // except the last unit in forward order once the order is known (step 2).
      for (int u : {1, 2}) {
        const bool kept = step > 0 && u == 2;
        if (units[u]->IsSharded() == kept) {
          return absl::InternalError(absl::StrFormat("step %d: unit %d %s after forward", step, u,
                                                     kept ? "was freed" : "kept its parameters"));
        }
      }
      at::Tensor loss = Loss(y, tr);
      losses[rank][step] = loss.item<double>();
      loss.backward();
      TESSERA_RETURN_IF_ERROR(hook_status);
      TESSERA_ASSIGN_OR_RETURN(std::vector<int> ended, schedule.EndOfBackward(0));
      if (first_pre_backward != std::vector<int>{0} || ended != std::vector<int>{0, 1}) {
        return absl::InternalError(absl::StrFormat(
            "step %d: first pre-backward %s, end of backward post-backwarded %s; expected the root, and {0, 1}",
            step, absl::StrJoin(first_pre_backward, ","), absl::StrJoin(ended, ",")));
      }
      for (size_t u = 0; u < units.size(); ++u) {
        if (!units[u]->IsSharded()) return absl::InternalError(absl::StrFormat("unit %d unsharded after step", u));
        for (size_t j = 0; j < kUnitParams[u].size(); ++j) {
          const int i = kUnitParams[u][j];
          const at::Tensor want = OwnedSlice(*units[u], ref.grads[step][i]);
          TESSERA_RETURN_IF_ERROR(Near(units[u]->sharded_params()[j].grad(), want,
                                       absl::StrFormat("step %d rank %d grad of %s", step, rank, kUnitNames[u][j])));
          if (units[u]->full_params()[j].grad().defined()) return absl::InternalError("unsharded gradient left over");
        }
      }
      c10::NoGradGuard no_grad;  // SGD on the shards, then zero_grad(set_to_none=True)
      for (auto& unit : units) {
        for (const at::Tensor& p : unit->sharded_params()) {
          p.sub_(kLr * p.grad());
          p.mutable_grad().reset();
        }
      }
    }
    for (size_t u = 0; u < units.size(); ++u) {
      TESSERA_ASSIGN_OR_RETURN(std::vector<at::Tensor> gathered, units[u]->GatherFull());
      for (size_t j = 0; j < gathered.size(); ++j) {
        TESSERA_RETURN_IF_ERROR(Near(gathered[j], ref.final_params[kUnitParams[u][j]],
                                     absl::StrFormat("rank %d %s after %d steps", rank, kUnitNames[u][j], kSteps)));
      }
      // The schedule prefetched only what was used.
      if (units[u]->gathers_discarded() != 0) return absl::InternalError("a prefetched all-gather went unused");
    }
    return absl::OkStatus();
  }, factory()));
  for (int step = 0; step < kSteps; ++step) {
    double mean = 0;
    for (int r = 0; r < W; ++r) mean += losses[r][step] / W;
    EXPECT_NEAR(mean, ref.loss[step], 1e-12 * (1 + ref.loss[step])) << "loss at step " << step;
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, StepTest,
                         ::testing::Combine(::testing::Values("local", "pg"), ::testing::Values(2, 3)),
                         [](const ::testing::TestParamInfo<StepTest::ParamType>& info) {
                           return std::get<0>(info.param) + "_world" + std::to_string(std::get<1>(info.param));
                         });

}  // namespace
}  // namespace tessera::torch_rt
