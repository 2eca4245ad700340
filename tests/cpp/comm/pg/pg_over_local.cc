// LocalThreadsBackend: an in-process stand-in for ProcessGroupGloo, so the conformance suite can drive
// comm::PgCommunicator through a real c10d::ProcessGroup (the dispatcher ops, options, Work objects) without gloo.
// See pg_over_local.h for what it does and does not test.
//
// It behaves like gloo where the adapter depends on it:
//  - collectives are asynchronous: each rank's backend has one worker thread that runs them in issue order (gloo
//    runs them on its worker threads); errors surface from Work::wait(), never from the issuing call;
//  - only ReduceOp::SUM is accepted (gloo has no AVG): the adapter must reduce with SUM and divide;
//  - a peer that does not arrive fails the collective after the option's timeout with a "Timed out waiting ..."
//    message, as gloo's transport does; a lost peer fails later collectives at once.
#include "comm/pg/pg_over_local.h"

#include <chrono>
#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>

#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "tessera/comm/local/local_communicator.h"
#include "tessera/comm/pg/pg_communicator.h"
#include "tessera/torch/tensor_view.h"

namespace tessera::testing {
namespace {

constexpr std::chrono::milliseconds kDefaultTimeout = std::chrono::minutes(10);

// c10d's own Work::wait(timeout), which gloo's collective works (ProcessGroupGloo::AsyncWork) use too: it throws
// "Operation timed out!" when the work is not done in time, without cancelling it, and rethrows its error otherwise.
class LocalWork final : public c10d::Work {
 public:
  explicit LocalWork(int rank) : c10d::Work(rank) {}
  void Finish(std::exception_ptr error) { finish(std::move(error)); }
};

class LocalThreadsBackend final : public c10d::Backend {
 public:
  LocalThreadsBackend(std::unique_ptr<comm::Communicator> local, int rank, int size)
      : c10d::Backend(rank, size), local_(std::move(local)), worker_([this] { Run(); }) {}

  ~LocalThreadsBackend() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    worker_.join();
  }

  const std::string getBackendName() const override { return "local_threads_gloo_standin"; }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override {
    return Enqueue("broadcast", {One(tensors, "broadcast")}, opts.timeout, [root = static_cast<int>(opts.rootRank)](
                                                                               const std::vector<BufferView>& v) {
      return comm::Collective::Broadcast(v[0], root);
    });
  }

  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override {
    CheckSum(opts.reduceOp, "allreduce");
    return Enqueue("allreduce", {One(tensors, "allreduce")}, opts.timeout, [](const std::vector<BufferView>& v) {
      return comm::Collective::AllReduce(v[0], comm::ReduceOp::kSum);
    });
  }

  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override {
    return Enqueue("_allgather_base", {input, output}, opts.timeout, [](const std::vector<BufferView>& v) {
      return comm::Collective::AllGather(v[0], v[1]);
    });
  }

  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                      const c10d::ReduceScatterOptions& opts) override {
    CheckSum(opts.reduceOp, "_reduce_scatter_base");
    return Enqueue("_reduce_scatter_base", {input, output}, opts.timeout, [](const std::vector<BufferView>& v) {
      return comm::Collective::ReduceScatter(v[0], v[1], comm::ReduceOp::kSum);
    });
  }

 private:
  using MakeOp = std::function<comm::Collective(const std::vector<BufferView>&)>;
  struct Job {
    std::string what;
    std::vector<at::Tensor> tensors;  // kept alive until the worker is done with them
    std::chrono::milliseconds timeout;
    MakeOp make;
    c10::intrusive_ptr<LocalWork> work;
  };

  static at::Tensor One(const std::vector<at::Tensor>& tensors, const char* what) {
    TORCH_CHECK(tensors.size() == 1, what, ": the local-threads backend takes one tensor, got ", tensors.size());
    return tensors[0];
  }
  static void CheckSum(const c10d::ReduceOp& op, const char* what) {
    // Gloo's own message for AVG is "Cannot use ReduceOp.AVG with Gloo"; any op but SUM is refused the same way.
    TORCH_CHECK(op == c10d::ReduceOp::SUM, what, ": the local-threads stand-in for gloo supports only SUM");
  }

  c10::intrusive_ptr<c10d::Work> Enqueue(std::string what, std::vector<at::Tensor> tensors,
                                         std::chrono::milliseconds timeout, MakeOp make) {
    auto work = c10::make_intrusive<LocalWork>(getRank());
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(Job{std::move(what), std::move(tensors), timeout.count() < 0 ? kDefaultTimeout : timeout,
                           std::move(make), work});
    }
    cv_.notify_all();
    return work;
  }

  void Run() {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      job.work->Finish(Execute(job));
    }
  }

  std::exception_ptr Execute(const Job& job) {
    std::vector<BufferView> views;
    for (const at::Tensor& t : job.tensors) {
      absl::StatusOr<BufferView> v = torch_rt::ViewOf(t, job.what);
      if (!v.ok()) return std::make_exception_ptr(std::runtime_error(v.status().ToString()));
      views.push_back(*v);
    }
    const comm::Collective op = job.make(views);
    comm::CollectiveOptions options;
    options.timeout = absl::FromChrono(job.timeout);
    absl::Status status = [&]() -> absl::Status {
      auto work = local_->Issue(absl::MakeConstSpan(&op, 1), options);
      if (!work.ok()) return work.status();
      return (*work)->Wait();
    }();
    if (status.ok()) return nullptr;
    std::string msg = status.code() == absl::StatusCode::kDeadlineExceeded
                          ? absl::StrFormat("Timed out waiting %dms for %s on rank %d: %s", job.timeout.count(),
                                            job.what, getRank(), status.ToString())
                          : absl::StrFormat("%s on rank %d failed: %s", job.what, getRank(), status.ToString());
    return std::make_exception_ptr(std::runtime_error(msg));
  }

  std::unique_ptr<comm::Communicator> local_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  bool stop_ = false;
  std::thread worker_;  // last: starts after the members it uses exist
};

// Plays torch.distributed's part: owns the group that PgCommunicator only references weakly.
class OwningPgCommunicator final : public comm::Communicator {
 public:
  explicit OwningPgCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> group)
      : group_(std::move(group)), pg_(group_) {}
  int rank() const override { return pg_.rank(); }
  int size() const override { return pg_.size(); }
  std::string backend_name() const override { return pg_.backend_name(); }
  absl::StatusOr<std::unique_ptr<comm::Work>> Issue(absl::Span<const comm::Collective> ops,
                                                    const comm::CollectiveOptions& options) override {
    return pg_.Issue(ops, options);
  }
  absl::Status Barrier(absl::Duration timeout) override { return pg_.Barrier(timeout); }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  comm::PgCommunicator pg_;
};

}  // namespace

absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreatePgOverLocalCommunicators(int world) {
  auto local = comm::LocalWorld::CreateCommunicators(world);
  if (!local.ok()) return local.status();
  std::vector<std::unique_ptr<comm::Communicator>> out;
  for (int r = 0; r < world; ++r) {
    auto group = c10::make_intrusive<c10d::ProcessGroup>(r, world);
    auto backend = c10::make_intrusive<LocalThreadsBackend>(std::move((*local)[r]), r, world);
    group->setBackend(c10::DeviceType::CPU, c10d::ProcessGroup::BackendType::CUSTOM, backend);
    group->setDefaultBackend(c10d::ProcessGroup::BackendType::CUSTOM);
    out.push_back(std::make_unique<OwningPgCommunicator>(std::move(group)));
  }
  return out;
}

}  // namespace tessera::testing
