#include "tessera/comm/pg/pg_communicator.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <exception>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
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

// One issued group: the c10d works of its collectives, awaited together through the desync monitor.
class PgWork final : public Work {
 public:
  PgWork(std::shared_ptr<DesyncMonitor> monitor, Position pos, std::string what, absl::Duration timeout)
      : monitor_(std::move(monitor)), pos_(std::move(pos)), what_(std::move(what)), timeout_(timeout) {}

  // `divide_out` (if defined) is divided by `divisor` once the work finished: c10d gloo has no AVG.
  void Add(c10::intrusive_ptr<c10d::Work> work, at::Tensor divide_out, int64_t divisor) {
    works_.push_back(std::move(work));
    divides_.emplace_back(std::move(divide_out), divisor);
  }

  absl::Status Wait() override {
    if (waited_) return absl::FailedPreconditionError(absl::StrFormat("%s: Wait() called twice", what_));
    waited_ = true;
    absl::Status status = monitor_->Await(pos_, what_, timeout_, [this](absl::Duration d) { return WaitSlice(d); });
    // On success every work is done; on a timeout or desync the collective stays in c10d's hands (it cannot be
    // cancelled) and the group is unusable, as after any collective timeout.
    works_.clear();
    done_.reset();
    if (!status.ok()) return status;
    for (auto& [out, divisor] : divides_) {
      if (out.defined()) out.div_(divisor);
    }
    divides_.clear();
    return absl::OkStatus();
  }

  // Waits on the c10d works themselves, in this thread, for up to `d`: true if all finished without error (the work
  // is then done, and no waiter thread was started). false: not yet, or an error; Wait() then takes over. For the
  // header (see ExchangeHeader), which usually finishes at once: a waiter thread costs more than the header itself.
  bool FinishedWithin(absl::Duration d) {
    if (done_ || waited_) return false;
    const auto ms = std::chrono::milliseconds(std::max<int64_t>(1, absl::ToInt64Milliseconds(d)));
    try {
      for (const auto& work : works_) {
        if (!work->wait(ms)) return false;
      }
    } catch (const std::exception&) {
      return false;  // timed out (c10d throws; the work goes on), or failed: Wait() reports it
    }
    waited_ = true;
    works_.clear();
    return true;
  }

 private:
  // Waits up to `d` for every work: true when all finished, false while one still runs, or its error.
  // [Note: waiting on c10d works in slices] Neither Work::wait(timeout) nor the work's future bounds every c10d
  // work: gloo's reduce-scatter blocked for its whole collective timeout under wait(2 s), and its future did not
  // complete before wait() was called. So one waiter thread per group calls the plain wait() (bounded by the
  // collective timeout c10d enforces itself) and the slices wait on its flag. The thread owns what it touches,
  // so it may outlive this work (after a desync or a timeout the collective cannot be cancelled).
  // Works on CUDA tensors would synchronize the waiter's stream, not the caller's: the adapter is for CPU groups
  // (CUDA parameters use tessera's NCCL communicator).
  absl::StatusOr<bool> WaitSlice(absl::Duration d) {
    if (!done_) (void)Start();
    std::unique_lock<std::mutex> lock(done_->mu);
    if (!done_->cv.wait_for(lock, absl::ToChronoNanoseconds(d), [&] { return done_->finished; })) return false;
    return Outcome(*done_, what_);
  }

 public:
  // Starts the waiter thread (see [Note: waiting on c10d works in slices]) once every work was added; returns the
  // watchdog's poll of its completion.
  Watchdog::Poll Start() {
    if (!done_) {
      done_ = std::make_shared<Completion>();
      std::thread([done = done_, works = works_] {
        std::exception_ptr error;
        for (const auto& work : works) {
          try {
            work->wait();
          } catch (...) {
            if (!error) error = std::current_exception();
          }
        }
        {
          std::lock_guard<std::mutex> lock(done->mu);
          done->finished = true;
          done->error = error;
        }
        done->cv.notify_all();
      }).detach();
    }
    return [done = done_, what = what_]() -> absl::StatusOr<bool> {
      std::lock_guard<std::mutex> lock(done->mu);
      if (!done->finished) return false;
      return Outcome(*done, what);
    };
  }

 private:
  struct Completion;
  // A finished completion: true, or its error as a Status. Requires done.mu (or a finished, unshared completion).
  static absl::StatusOr<bool> Outcome(const Completion& done, const std::string& what) {
    if (done.error) {
      try {
        std::rethrow_exception(done.error);
      } catch (const std::exception& e) {
        return FromException(e, what);
      } catch (...) {
        return absl::UnknownError(absl::StrFormat("%s failed with a non-standard exception", what));
      }
    }
    return true;
  }

  struct Completion {
    std::mutex mu;
    std::condition_variable cv;
    bool finished = false;  // guarded by mu
    std::exception_ptr error;
  };

  std::shared_ptr<DesyncMonitor> monitor_;
  Position pos_;
  std::string what_;
  absl::Duration timeout_;
  std::vector<c10::intrusive_ptr<c10d::Work>> works_;
  std::vector<std::pair<at::Tensor, int64_t>> divides_;
  bool waited_ = false;
  std::shared_ptr<Completion> done_;  // shared with the future callbacks, which may outlive this work
};

// How long a header is waited for in the calling thread before the ordinary wait takes over (see ExchangeHeader).
constexpr absl::Duration kHeaderFastWait = absl::Milliseconds(100);

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
                                           nullptr, nullptr)) {}

PgCommunicator::~PgCommunicator() = default;

absl::StatusOr<std::unique_ptr<PgCommunicator>> PgCommunicator::Create(c10::intrusive_ptr<c10d::ProcessGroup> group,
                                                                      DesyncOptions desync,
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
  {
    std::lock_guard<std::mutex> lock(broken_mu_);
    if (!broken_.ok()) return broken_;
  }
  if (ops.empty()) return std::unique_ptr<Work>(std::make_unique<DoneWork>());
  const absl::Duration deadline = EffectiveTimeout(options.timeout);
  const auto timeout = std::chrono::milliseconds(absl::ToInt64Milliseconds(deadline));
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
  if (size_ > 1 && exchange_headers_) TESSERA_RETURN_IF_ERROR(ExchangeHeader(group, pos, what, deadline));
  auto group_work = std::make_unique<PgWork>(monitor_, pos, what, deadline);
  for (const Collective& op : ops) {
    const std::string op_what = describe(op);
    at::Tensor in = torch_rt::TensorFromView(op.input);
    at::Tensor out = torch_rt::TensorFromView(op.output);
    at::Tensor divide_out;
    try {
      c10::intrusive_ptr<c10d::Work> work;
      switch (op.kind) {
        case CollectiveKind::kAllGather: {
          c10d::AllgatherOptions o;
          o.timeout = timeout;
          work = group->_allgather_base(out, in, o);
          break;
        }
        case CollectiveKind::kReduceScatter: {
          c10d::ReduceScatterOptions o;
          o.reduceOp = c10d::ReduceOp::SUM;
          o.timeout = timeout;
          work = group->_reduce_scatter_base(out, in, o);
          if (op.op == ReduceOp::kAvg) divide_out = out;
          break;
        }
        case CollectiveKind::kAllReduce: {
          if (op.output.data != op.input.data) out.copy_(in);
          std::vector<at::Tensor> t{out};
          c10d::AllreduceOptions o;
          o.reduceOp = c10d::ReduceOp::SUM;
          o.timeout = timeout;
          work = group->allreduce(t, o);
          if (op.op == ReduceOp::kAvg) divide_out = out;
          break;
        }
        case CollectiveKind::kBroadcast: {
          if (op.output.data != op.input.data) out.copy_(in);
          std::vector<at::Tensor> t{out};
          c10d::BroadcastOptions o;
          o.rootRank = op.root;
          o.timeout = timeout;
          work = group->broadcast(t, o);
          break;
        }
      }
      group_work->Add(std::move(work), divide_out, size_);
    } catch (const std::exception& e) {
      // Drain what was issued so no buffer is still in use when we return.
      (void)group_work->Wait();
      return FromException(e, op_what);
    }
  }
  // The same deadline the NCCL backend's watchdog enforces (see [Note: the collective watchdog]): a group whose
  // Wait() comes late, or never, still fails the communicator at its deadline, and later calls fail fast with it.
  TESSERA_RETURN_IF_ERROR(watchdog_->Watch(what, deadline, group_work->Start()));
  return std::unique_ptr<Work>(std::move(group_work));
}

absl::Status PgCommunicator::ExchangeHeader(const c10::intrusive_ptr<c10d::ProcessGroup>& group, const Position& pos, const std::string& what,
                                            absl::Duration deadline) {
  // See [Note: a header before every gloo collective] in comm/desync.h.
  const std::array<int64_t, 2> mine = DesyncMonitor::Header(pos);
  at::Tensor header = at::empty({2}, at::kLong);
  std::memcpy(header.data_ptr<int64_t>(), mine.data(), sizeof(mine));
  at::Tensor gathered = at::empty({2 * size_}, at::kLong);
  const std::string header_what = "header exchange before " + what;
  PgWork work(monitor_, pos, header_what, deadline);
  try {
    c10d::AllgatherOptions o;
    // gloo's own bound a little past ours (the fast wait comes first): our deadline reports, naming positions.
    o.timeout = std::chrono::milliseconds(absl::ToInt64Milliseconds(deadline + kHeaderFastWait + absl::Seconds(1)));
    work.Add(group->_allgather_base(gathered, header, o), at::Tensor(), 1);
  } catch (const std::exception& e) {
    return Break(FromException(e, header_what), group);
  }
  // Ranks in step meet within a round trip; only a late peer needs the waiter thread, the watchdog and the notes.
  if (!work.FinishedWithin(std::min(kHeaderFastWait, deadline))) {
    absl::Status watched = watchdog_->Watch(header_what, deadline, work.Start());
    if (!watched.ok()) return Break(watched, group);
    absl::Status waited = work.Wait();
    if (!waited.ok()) return Break(waited, group);
  }
  absl::Status same = monitor_->CompareHeaders(
      pos, absl::MakeConstSpan(gathered.data_ptr<int64_t>(), static_cast<size_t>(2 * size_)), deadline);
  if (!same.ok()) return Break(same, group);
  return absl::OkStatus();
}

absl::Status PgCommunicator::Break(absl::Status status, const c10::intrusive_ptr<c10d::ProcessGroup>& group) {
  {
    std::lock_guard<std::mutex> lock(broken_mu_);
    if (broken_.ok()) {
      broken_ = absl::Status(status.code(), absl::StrCat(status.message(), " [this communicator is unusable from "
                                                         "now on: create the sharding again in a new job attempt]"));
    }
  }
  // Never destroyed: ~ProcessGroupGloo would wait for a pending collective up to its timeout.
  static std::mutex* leaked_mu = new std::mutex;
  static auto* leaked = new std::vector<c10::intrusive_ptr<c10d::ProcessGroup>>;
  std::lock_guard<std::mutex> lock(*leaked_mu);
  if (std::find(leaked->begin(), leaked->end(), group) == leaked->end()) leaked->push_back(group);
  return status;
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
