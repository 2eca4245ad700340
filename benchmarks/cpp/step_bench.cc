// The C++ side of one training step on CPU, without communication: what the step schedule costs per event (the
// part of the hook overhead that moved from Python into C++), and the gradient copy-in and fused AdamW kernels on a
// unit-sized flat shard (GB/s counts the bytes each kernel reads and writes).
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "tessera/kernels/kernels.h"
#include "tessera/shard/plan.h"
#include "tessera/shard/schedule.h"

namespace tessera {
namespace {

// A unit whose operations cost nothing: isolates the schedule's own bookkeeping.
class NoopUnit final : public shard::UnitOps {
 public:
  const std::string& unit_name() const override { return name_; }
  bool IsSharded() const override { return !gathered_; }
  absl::Status StartUnshard(uintptr_t) override { return absl::OkStatus(); }
  absl::Status WaitUnshard(uintptr_t) override {
    gathered_ = true;
    return absl::OkStatus();
  }
  absl::Status Reshard() override {
    gathered_ = false;
    return absl::OkStatus();
  }
  absl::Status SyncRequiresGrad() override { return absl::OkStatus(); }
  bool WantsReduce() const override { return true; }
  absl::Status StartReduce(uintptr_t) override { return absl::OkStatus(); }
  bool Reducing() const override { return false; }
  absl::Status FinishReduce(uintptr_t) override { return absl::OkStatus(); }
  absl::Status DropBackward(uintptr_t) override { return absl::OkStatus(); }

 private:
  std::string name_ = "unit";
  bool gathered_ = false;
};

// One step of a root + N blocks: every event the Python hooks report. Items = units, so time/item is per unit.
void BM_ScheduleStep(benchmark::State& state) {
  const int blocks = static_cast<int>(state.range(0));
  std::vector<std::unique_ptr<NoopUnit>> units;
  std::vector<shard::UnitOps*> ops;
  for (int i = 0; i <= blocks; ++i) {
    units.push_back(std::make_unique<NoopUnit>());
    ops.push_back(units.back().get());
  }
  shard::StepSchedule s(ops, std::vector<shard::UnitPolicy>(ops.size()));
  for (auto _ : state) {
    (void)s.PreForward(0, false, 0);
    for (int u = 1; u <= blocks; ++u) {
      (void)s.PreForward(u, false, 0);
      (void)s.PostForward(u, true, false);
    }
    (void)s.PostForward(0, true, false);
    (void)s.PreBackward(0, 0);
    for (int u = blocks; u >= 1; --u) {
      (void)s.PreBackward(u, 0);
      (void)s.PostBackward(u, 0);
    }
    benchmark::DoNotOptimize(s.EndOfBackward(0));
  }
  state.SetItemsProcessed(state.iterations() * (blocks + 1));
}
BENCHMARK(BM_ScheduleStep)->Arg(4)->Arg(32);

// Gradient copy-in of a Llama-block-sized unit (7 matrices, 1M elements in all) for a 2-rank reduce-scatter.
void BM_CopyIn(benchmark::State& state) {
  const std::vector<int64_t> numels = {65536, 16384, 16384, 65536, 262144, 262144, 262144};
  auto plan = shard::ShardPlan::Create(numels, 2).value();
  std::vector<std::vector<float>> grads;
  std::vector<BufferView> views;
  int64_t total = 0;
  for (int64_t n : numels) {
    grads.emplace_back(n, 1.0f);
    views.push_back({grads.back().data(), DType::kFloat32, n, Device{}});
    total += n;
  }
  std::vector<float> out(plan.shard_numel() * 2);
  BufferView dst{out.data(), DType::kFloat32, static_cast<int64_t>(out.size()), Device{}};
  for (auto _ : state) {
    benchmark::DoNotOptimize(kernels::CopyIn(views, plan, plan.shard_numel(), 0.5, dst));
  }
  state.SetBytesProcessed(state.iterations() * total * 8);  // read + write, fp32
}
BENCHMARK(BM_CopyIn);

// Fused AdamW over a 1M-element fp32 shard: reads p, g, m, v and writes p, m, v (28 bytes per element).
void BM_FusedAdamW(benchmark::State& state) {
  const int64_t n = 1 << 20;
  std::vector<float> p(n, 0.5f), g(n, 0.01f), m(n, 0.0f), v(n, 0.0f);
  auto view = [&](std::vector<float>& x) { return BufferView{x.data(), DType::kFloat32, n, Device{}}; };
  kernels::AdamWConfig config;
  for (auto _ : state) {
    benchmark::DoNotOptimize(kernels::FusedAdamW(view(p), view(g), view(m), view(v), config));
    ++config.step;
  }
  state.SetBytesProcessed(state.iterations() * n * 28);
}
BENCHMARK(BM_FusedAdamW);

}  // namespace
}  // namespace tessera
