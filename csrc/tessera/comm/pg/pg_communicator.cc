#include "tessera/comm/pg/pg_communicator.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <exception>
#include <vector>

#include <ATen/ThreadLocalState.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tessera/comm/completion.h"
#include "tessera/core/status.h"
#include "tessera/torch/tensor_view.h"

namespace tessera::comm {
namespace {

// Turns an exception from c10d (timeouts, lost peers) into a Status naming the collective.
absl::Status FromException(const std::exception& e, const std::string& what) {
  std::string msg = e.what();
  const bool timeout = msg.find("imed out") != std::string::npos || msg.find("imeout") != std::string::npos;
  std::string text = absl::StrFormat("%s failed: %s", what, msg.substr(0, 2000));
  return timeout ? absl::DeadlineExceededError(text) : absl::UnavailableError(text);
}

// Waits for every work of a group on a thread of its own, then finishes `done` (see [Note: waiting on c10d works
// in slices]). The thread owns what it touches, so it may outlive the group's Work.
void StartWaiter(std::vector<c10::intrusive_ptr<c10d::Work>> works, std::shared_ptr<Completion> done,
                 std::string what) {
  std::thread([works = std::move(works), done = std::move(done), what = std::move(what)] {
    absl::Status status;
    for (const auto& work : works) {
      try {
        work->wait();
      } catch (const std::exception& e) {
        if (status.ok()) status = FromException(e, what);
      } catch (...) {
        if (status.ok()) status = absl::UnknownError(absl::StrFormat("%s failed with a non-standard exception", what));
      }
    }
    done->Finish(status);
  }).detach();
}

// One issued group, awaited through the desync monitor.
// [Note: waiting on c10d works in slices] Neither Work::wait(timeout) nor the work's future bounds every c10d
// work: gloo's reduce-scatter blocked for its whole collective timeout under wait(2 s), and its future did not
// complete before wait() was called. So one waiter thread per group calls the plain wait() (bounded by the
// collective timeout c10d enforces itself) and the slices wait on its flag.
// Works on CUDA tensors would synchronize the waiter's stream, not the caller's: the adapter is for CPU groups
// (CUDA parameters use tessera's NCCL communicator).
class PgWork final : public Work {
 public:
  PgWork(std::shared_ptr<DesyncMonitor> monitor, Position pos, std::string what, absl::Duration timeout,
         std::shared_ptr<Completion> done, std::function<void(const absl::Status&)> on_failure)
      : monitor_(std::move(monitor)), pos_(std::move(pos)), what_(std::move(what)), timeout_(timeout),
        done_(std::move(done)), on_failure_(std::move(on_failure)) {}

  // `out` is divided by `divisor` once the work finished: c10d gloo has no AVG.
  void DivideAfter(at::Tensor out, int64_t divisor) { divides_.emplace_back(std::move(out), divisor); }

  absl::Status Wait() override {
    if (waited_) return absl::FailedPreconditionError(absl::StrFormat("%s: Wait() called twice", what_));
    waited_ = true;
    absl::Status status =
        monitor_->Await(pos_, what_, timeout_, [this](absl::Duration d) { return done_->WaitFor(d); });
    if (!status.ok()) {
      // The collective may stay in c10d's hands (it cannot be cancelled): nothing may be paired after it.
      on_failure_(status);
      return status;
    }
    for (auto& [out, divisor] : divides_) out.div_(divisor);
    divides_.clear();
    return absl::OkStatus();
  }

 private:
  std::shared_ptr<DesyncMonitor> monitor_;
  Position pos_;
  std::string what_;
  absl::Duration timeout_;
  std::shared_ptr<Completion> done_;
  std::function<void(const absl::Status&)> on_failure_;
  std::vector<std::pair<at::Tensor, int64_t>> divides_;
  bool waited_ = false;
};

// One collective of a group, as the issuer thread issues it.
struct PendingOp {
  CollectiveKind kind;
  at::Tensor in, out;
  int root = 0;
  std::string what;
};

// gloo's own bound on a header: a little past ours, so that our deadline reports first, naming positions.
constexpr absl::Duration kHeaderMargin = absl::Seconds(1);

}  // namespace

void PgIssuer::Break(const absl::Status& status, const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  {
    std::lock_guard<std::mutex> lock(mu);
    if (broken.ok()) {
      broken = absl::Status(status.code(), absl::StrCat(status.message(), " [this communicator is unusable from now "
                                                        "on: create the sharding again in a new job attempt]"));
    }
  }
  // Never destroyed: ~ProcessGroupGloo would wait for a pending collective up to its timeout.
  static std::mutex* leaked_mu = new std::mutex;
  static auto* leaked = new std::vector<c10::intrusive_ptr<c10d::ProcessGroup>>;
  std::lock_guard<std::mutex> lock(*leaked_mu);
  if (std::find(leaked->begin(), leaked->end(), group) == leaked->end()) leaked->push_back(group);
}

absl::Status PgIssuer::Broken() {
  std::lock_guard<std::mutex> lock(mu);
  return broken;
}

void PgIssuer::Run() {
  while (true) {
    std::function<void()> job;
    {
      std::unique_lock<std::mutex> lock(mu);
      cv.wait(lock, [&] { return stop || !jobs.empty(); });
      if (jobs.empty()) return;  // stopped and drained
      job = std::move(jobs.front());
      jobs.pop_front();
    }
    job();
  }
}

namespace {

// The issuer thread's part of one group: the header exchange, then the collectives (see [Note: tessera's own
// group, and a header before every collective]). Ends `done` on any failure, or hands it to a waiter thread.
void RunGroup(PgIssuer& issuer, const c10::intrusive_ptr<c10d::ProcessGroup>& group, DesyncMonitor& monitor,
              const Position& pos, const std::string& what, const std::vector<PendingOp>& ops,
              const std::shared_ptr<Completion>& done, absl::Duration deadline, bool headers, int size) {
  auto fail = [&](const absl::Status& s) {
    issuer.Break(s, group);
    done->Finish(s);
  };
  if (absl::Status broken = issuer.Broken(); !broken.ok()) return done->Finish(broken);
  if (headers) {
    // See [Note: a header before every gloo collective] in comm/desync.h.
    const std::string header_what = "header exchange before " + what;
    const std::array<int64_t, 2> mine = DesyncMonitor::Header(pos);
    // The int64 bits travel in a float64 tensor (an all-gather copies bytes): every CPU backend takes float64.
    at::Tensor header = at::empty({2}, at::kDouble);
    std::memcpy(header.data_ptr<double>(), mine.data(), sizeof(mine));
    at::Tensor gathered = at::empty({2 * size}, at::kDouble);
    try {
      c10d::AllgatherOptions o;
      o.timeout = std::chrono::milliseconds(absl::ToInt64Milliseconds(deadline + kHeaderMargin));
      group->_allgather_base(gathered, header, o)->wait();
    } catch (const std::exception& e) {
      return fail(FromException(e, header_what));
    }
    std::vector<int64_t> all(2 * size);
    std::memcpy(all.data(), gathered.data_ptr<double>(), all.size() * sizeof(int64_t));
    absl::Status same = monitor.CompareHeaders(pos, all, deadline);
    if (!same.ok()) return fail(same);
    // The caller may have given up meanwhile (its deadline, or a desync found while this header waited): then its
    // collectives must not be issued, or a late peer's would pair with them.
    if (absl::Status broken = issuer.Broken(); !broken.ok()) return done->Finish(broken);
  }
  const auto timeout = std::chrono::milliseconds(absl::ToInt64Milliseconds(deadline));
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (const PendingOp& op : ops) {
    try {
      at::Tensor in = op.in, out = op.out;
      switch (op.kind) {
        case CollectiveKind::kAllGather: {
          c10d::AllgatherOptions o;
          o.timeout = timeout;
          works.push_back(group->_allgather_base(out, in, o));
          break;
        }
        case CollectiveKind::kReduceScatter: {
          c10d::ReduceScatterOptions o;
          o.reduceOp = c10d::ReduceOp::SUM;
          o.timeout = timeout;
          works.push_back(group->_reduce_scatter_base(out, in, o));
          break;
        }
        case CollectiveKind::kAllReduce: {
          std::vector<at::Tensor> t{out};
          c10d::AllreduceOptions o;
          o.reduceOp = c10d::ReduceOp::SUM;
          o.timeout = timeout;
          works.push_back(group->allreduce(t, o));
          break;
        }
        case CollectiveKind::kBroadcast: {
          std::vector<at::Tensor> t{out};
          c10d::BroadcastOptions o;
          o.rootRank = op.root;
          o.timeout = timeout;
          works.push_back(group->broadcast(t, o));
          break;
        }
      }
    } catch (const std::exception& e) {
      // Drain what was issued so no buffer is still in use when the caller's Wait() returns.
      for (const auto& w : works) {
        try {
          w->wait();
        } catch (...) {
        }
      }
      return fail(FromException(e, op.what));
    }
  }
  StartWaiter(std::move(works), done, what);
}

std::unique_ptr<DesyncMonitor> DisabledMonitor(int rank, int size) {
  auto m = DesyncMonitor::Create(rank, size, "pg", DesyncOptions{});
  TESSERA_CHECK(m.ok(), "default desync options rejected: ", m.status().ToString());
  return std::move(m).value();
}

}  // namespace

PgCommunicator::PgCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> group)
    : group_(group), name_("pg:" + group->getBackendName()), rank_(group->getRank()), size_(group->getSize()),
      monitor_(DisabledMonitor(rank_, size_)),
      // No abort on failure: a c10d gloo collective cannot be cancelled; the communicator is failed for good.
      watchdog_(std::make_unique<Watchdog>(absl::StrFormat("communicator %s (rank %d of %d)", name_, rank_, size_),
                                           nullptr, nullptr)),
      issuer_(std::make_shared<PgIssuer>()) {
  // Detached: it drains the queue after the communicator is gone (a header may wait for a peer up to its timeout).
  std::thread([issuer = issuer_] { issuer->Run(); }).detach();
}

PgCommunicator::~PgCommunicator() {
  {
    std::lock_guard<std::mutex> lock(issuer_->mu);
    issuer_->stop = true;
  }
  issuer_->cv.notify_all();
}

absl::StatusOr<std::unique_ptr<PgCommunicator>> PgCommunicator::Create(
    c10::intrusive_ptr<c10d::ProcessGroup> group, DesyncOptions desync,
    c10::intrusive_ptr<c10d::ProcessGroup> user_group) {
  std::unique_ptr<PgCommunicator> c(new PgCommunicator(std::move(group)));
  if (user_group && desync.store != nullptr) {
    // Weak: the user's group belongs to torch.distributed (see [Note: the adapter does not own the group]).
    desync.foreign_name = absl::StrFormat("group '%s' (the group given to tessera.shard)", user_group->getGroupName());
    desync.foreign_seq = [weak = c10::weak_intrusive_ptr<c10d::ProcessGroup>(user_group)]() -> int64_t {
      c10::intrusive_ptr<c10d::ProcessGroup> g = weak.lock();
      if (!g) return -1;
      try {
        return static_cast<int64_t>(g->getBackend(c10::DeviceType::CPU)->getSequenceNumberForGroup());
      } catch (const std::exception&) {
        return -1;  // no CPU backend, or one without sequence numbers
      }
    };
  }
  std::string owner = absl::StrFormat("communicator '%s' (%s)", desync.key_prefix, c->name_);
  TESSERA_ASSIGN_OR_RETURN(c->monitor_, DesyncMonitor::Create(c->rank_, c->size_, owner, std::move(desync)));
  return c;
}

std::string PgCommunicator::backend_name() const { return name_; }

absl::StatusOr<c10::intrusive_ptr<c10d::ProcessGroup>> PgCommunicator::group() const {
  c10::intrusive_ptr<c10d::ProcessGroup> group = group_.lock();
  if (!group) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the process group of this communicator (rank %d of %d, %s) was destroyed "
        "(torch.distributed.destroy_process_group); create the model's sharding again with a live group",
        rank_, size_, name_));
  }
  return group;
}

absl::StatusOr<std::unique_ptr<Work>> PgCommunicator::Issue(absl::Span<const Collective> ops,
                                                            const CollectiveOptions& options) {
  for (const Collective& op : ops) TESSERA_RETURN_IF_ERROR(ValidateCollective(op, size_));
  TESSERA_ASSIGN_OR_RETURN(c10::intrusive_ptr<c10d::ProcessGroup> group, group());
  TESSERA_RETURN_IF_ERROR(watchdog_->status());  // a collective of this communicator missed its deadline earlier
  TESSERA_RETURN_IF_ERROR(issuer_->Broken());     // a desync or a failed header earlier
  if (ops.empty()) return std::unique_ptr<Work>(std::make_unique<DoneWork>());
  const absl::Duration deadline = EffectiveTimeout(options.timeout);
  // Counted at issue: every rank numbers its groups the same way as long as they stay in step.
  const Position pos = monitor_->Next(ops, options.tag);
  const std::string where = Where(options);  // rank, step, tag
  auto describe = [&](const Collective& op) {
    return absl::StrFormat("%s of %d elements (%s) on %s [%s, #%d]", CollectiveKindName(op.kind), op.input.count,
                           DTypeName(op.input.dtype), where, backend_name(), pos.seq);
  };
  TESSERA_RETURN_IF_ERROR(monitor_->CheckAgreement(pos, deadline));
  const std::string what =
      ops.size() == 1 ? describe(ops[0])
                      : absl::StrFormat("%s on %s [%s, #%d]", pos.signature, where, backend_name(), pos.seq);
  auto done = std::make_shared<Completion>();
  auto work = std::make_unique<PgWork>(
      monitor_, pos, what, deadline, done,
      [issuer = issuer_, group](const absl::Status& s) { issuer->Break(s, group); });
  std::vector<PendingOp> pending;
  for (const Collective& op : ops) {
    PendingOp p{op.kind, torch_rt::TensorFromView(op.input), torch_rt::TensorFromView(op.output), op.root,
                describe(op)};
    if ((op.kind == CollectiveKind::kAllReduce || op.kind == CollectiveKind::kBroadcast) &&
        op.output.data != op.input.data) {
      p.out.copy_(p.in);  // in place from here on
    }
    if ((op.kind == CollectiveKind::kAllReduce || op.kind == CollectiveKind::kReduceScatter) &&
        op.op == ReduceOp::kAvg) {
      work->DivideAfter(p.out, size_);
    }
    pending.push_back(std::move(p));
  }
  // See [Note: tessera's own group, and a header before every collective]: the issuer thread issues every group
  // of this communicator, in order, each after its header exchange.
  {
    std::lock_guard<std::mutex> lock(issuer_->mu);
    // The caller's thread-local torch state (inference mode, grad mode) goes with the job, as autograd's engine
    // carries it to its threads: c10d writes into tensors made under the caller's modes (e.g. inference tensors of
    // generation, which may be written only in inference mode).
    issuer_->jobs.push_back([issuer = issuer_, group, monitor = monitor_, pos, what, pending = std::move(pending),
                             done, deadline, headers = size_ > 1 && exchange_headers_, size = size_,
                             tls = at::ThreadLocalState()] {
      at::ThreadLocalStateGuard guard(tls);
      RunGroup(*issuer, group, *monitor, pos, what, pending, done, deadline, headers, size);
    });
  }
  issuer_->cv.notify_one();
  // The same deadline the NCCL backend's watchdog enforces (see [Note: the collective watchdog]): a group whose
  // Wait() comes late, or never, still fails the communicator at its deadline, and later calls fail fast with it.
  TESSERA_RETURN_IF_ERROR(watchdog_->Watch(what, deadline, [done] { return done->Poll(); }));
  return std::unique_ptr<Work>(std::move(work));
}

absl::Status PgCommunicator::Barrier(absl::Duration timeout) {
  // An all-reduce of one element rather than c10d's barrier(): it honours our timeout on every backend.
  at::Tensor one = at::zeros({1}, at::kFloat);
  TESSERA_ASSIGN_OR_RETURN(BufferView view, torch_rt::ViewOf(one, "barrier"));
  CollectiveOptions options;
  options.timeout = timeout;
  options.tag = "barrier";
  TESSERA_ASSIGN_OR_RETURN(auto work, AllReduce(view, ReduceOp::kSum, options));
  return work->Wait();
}

}  // namespace tessera::comm
