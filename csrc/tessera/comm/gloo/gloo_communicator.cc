#include "tessera/comm/gloo/gloo_communicator.h"

#include <gloo/allgather.h>
#include <gloo/allreduce.h>
#include <gloo/broadcast.h>
#include <gloo/math.h>
#include <gloo/rendezvous/context.h>
#include <gloo/rendezvous/prefix_store.h>
#include <gloo/rendezvous/store.h>
#include <gloo/transport/tcp/device.h>

#include <signal.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <exception>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "tessera/comm/completion.h"
#include "tessera/comm/watchdog.h"
#include "tessera/core/dtype.h"
#include "tessera/core/dtype_access.h"
#include "tessera/core/status.h"

namespace tessera::comm {
namespace {

// How long past its deadline a Work still waits for the worker to hand its group back: gloo ends the call by then
// (it got only what was left of the deadline), so this covers gloo's timer and a loaded machine, and Wait() never
// returns while gloo may still write the caller's buffers, short of a gloo call that ignores its timeout.
constexpr absl::Duration kWorkerGrace = absl::Seconds(5);
// gloo waits with wait_for(now + timeout): an "infinite" timeout must not overflow the steady clock.
constexpr absl::Duration kLongestGlooTimeout = absl::Hours(24 * 365);

std::chrono::milliseconds GlooTimeout(absl::Duration d) {
  d = std::clamp(d, absl::Milliseconds(1), kLongestGlooTimeout);
  return std::chrono::milliseconds(absl::ToInt64Milliseconds(absl::Ceil(d, absl::Milliseconds(1))));
}

// A store failure inside gloo's rendezvous: gloo only knows exceptions, this one carries the Status through it.
struct StoreError : std::runtime_error {
  explicit StoreError(absl::Status s) : std::runtime_error(std::string(s.message())), status(std::move(s)) {}
  absl::Status status;
};

// gloo's rendezvous Store over tessera's KeyValueStore (the c10d TCPStore adapter, or an InMemoryStore in tests).
class StoreAdapter final : public gloo::rendezvous::Store {
 public:
  StoreAdapter(std::shared_ptr<KeyValueStore> store, absl::Duration timeout)
      : store_(std::move(store)), timeout_(timeout) {}

  void set(const std::string& key, const std::vector<char>& data) override {
    Check(store_->Set(key, std::string(data.begin(), data.end())), "set", key);
  }
  std::vector<char> get(const std::string& key) override {
    const std::vector<std::string> keys{key};
    Check(store_->Wait(keys, timeout_), "wait for", key);
    absl::StatusOr<std::vector<std::optional<std::string>>> values = store_->TryGet(keys);
    Check(values.status(), "get", key);
    if (!(*values)[0].has_value()) Check(absl::NotFoundError("the key vanished after it was set"), "get", key);
    return std::vector<char>((*values)[0]->begin(), (*values)[0]->end());
  }
  void wait(const std::vector<std::string>& keys) override { Check(store_->Wait(keys, timeout_), "wait for", keys); }
  void wait(const std::vector<std::string>& keys, const std::chrono::milliseconds& timeout) override {
    Check(store_->Wait(keys, std::min(timeout_, absl::FromChrono(timeout))), "wait for", keys);
  }

 private:
  static void Check(const absl::Status& s, const char* what, const std::vector<std::string>& keys) {
    Check(s, what, absl::StrJoin(keys, ", "));
  }
  static void Check(const absl::Status& s, const char* what, const std::string& key) {
    if (!s.ok()) throw StoreError(WithContext(s, absl::StrFormat("store %s '%s'", what, key)));
  }
  std::shared_ptr<KeyValueStore> store_;
  absl::Duration timeout_;
};

using elements::BF16;  // element access per dtype (tessera/core/dtype_access.h)
using elements::F16;
using elements::F32;
using elements::F64;

// All-reduce (offset 0, output n = input n) or reduce-scatter (offset rank*n of a W*n input): an all-reduce of
// the whole input in Acc on scratch, then this rank's range is written out, divided for kAvg, rounded once. The
// scratch also makes in-place calls safe (the output may alias any part of the input).
template <typename D>
void ReduceViaAllreduce(const std::shared_ptr<gloo::Context>& ctx, const Collective& op, int64_t offset,
                        std::chrono::milliseconds timeout) {
  using S = typename D::Storage;
  using A = typename D::Acc;
  std::vector<A> scratch(static_cast<size_t>(op.input.count));
  const S* in = op.input.as<const S>();
  for (size_t j = 0; j < scratch.size(); ++j) scratch[j] = D::Load(in[j]);
  if (ctx->size > 1 && !scratch.empty()) {
    gloo::AllreduceOptions o(ctx);
    o.setOutput<A>(scratch.data(), scratch.size());  // no input set: gloo reduces the output in place
    o.setReduceFunction([](void* c, const void* a, const void* b, size_t n) { gloo::sum<A>(c, a, b, n); });
    o.setTimeout(timeout);
    gloo::allreduce(o);
  }
  S* out = op.output.as<S>();
  const A world = static_cast<A>(ctx->size);
  for (int64_t j = 0; j < op.output.count; ++j) {
    const A acc = scratch[offset + j];
    out[j] = D::Store(op.op == ReduceOp::kAvg ? acc / world : acc);
  }
}

void Reduce(const std::shared_ptr<gloo::Context>& ctx, const Collective& op, int64_t offset,
            std::chrono::milliseconds timeout) {
  switch (op.input.dtype) {
    case DType::kFloat32: return ReduceViaAllreduce<F32>(ctx, op, offset, timeout);
    case DType::kFloat64: return ReduceViaAllreduce<F64>(ctx, op, offset, timeout);
    case DType::kBFloat16: return ReduceViaAllreduce<BF16>(ctx, op, offset, timeout);
    case DType::kFloat16: return ReduceViaAllreduce<F16>(ctx, op, offset, timeout);
  }
  TESSERA_CHECK(false, "unknown dtype ", static_cast<int>(op.input.dtype));
}

// Runs one validated collective; gloo reports failures by throwing.
void RunOne(const std::shared_ptr<gloo::Context>& ctx, const Collective& op, std::chrono::milliseconds timeout) {
  const int rank = ctx->rank;
  const int size = ctx->size;
  switch (op.kind) {
    case CollectiveKind::kAllGather: {
      const size_t block = static_cast<size_t>(op.input.bytes());
      if (block == 0) return;
      auto* out = static_cast<uint8_t*>(op.output.data);
      uint8_t* mine = out + rank * block;
      // In place when the input already is this rank's block; memmove as it may overlap otherwise.
      if (op.input.data != mine) std::memmove(mine, op.input.data, block);
      if (size == 1) return;  // gloo wants a pair to each neighbour, and a world of one has none
      gloo::AllgatherOptions o(ctx);
      o.setOutput<uint8_t>(out, block * size);  // no input set: gloo sends this rank's block of the output
      o.setTimeout(timeout);
      gloo::allgather(o);
      return;
    }
    case CollectiveKind::kBroadcast: {
      const size_t bytes = static_cast<size_t>(op.output.bytes());
      if (bytes == 0) return;
      if (rank == op.root && op.input.data != op.output.data) std::memmove(op.output.data, op.input.data, bytes);
      if (size == 1) return;
      gloo::BroadcastOptions o(ctx);
      o.setOutput<uint8_t>(static_cast<uint8_t*>(op.output.data), bytes);
      o.setRoot(op.root);
      o.setTimeout(timeout);
      gloo::broadcast(o);
      return;
    }
    case CollectiveKind::kAllReduce: return Reduce(ctx, op, 0, timeout);
    case CollectiveKind::kReduceScatter: return Reduce(ctx, op, rank * op.output.count, timeout);
  }
}

// "all_reduce of 8 elements (float32)".
std::string Describe(const Collective& op) {
  std::string s = absl::StrFormat("%s of %d elements (%s)", CollectiveKindName(op.kind), op.input.count,
                                  DTypeName(op.input.dtype));
  if (op.kind == CollectiveKind::kBroadcast) absl::StrAppendFormat(&s, " from root %d", op.root);
  return s;
}

// One issued group, shared by the queue, its Work and the watchdog's poll.
struct Task {
  std::vector<Collective> ops;
  Position pos;      // its sequence number, signature and tag: what its header says
  std::string what;  // e.g. "all_reduce of 8 elements (float32) on rank 0 of 2, step 3, fwd [gloo, #5]"
  absl::Time deadline;
  absl::Duration timeout;
  Completion done;
};

// A gloo exception as a Status: gloo's timeouts say "Timed out"; anything else is a lost peer or a broken
// connection (gloo's IoException), or an internal check of gloo (EnforceNotMet) that we cannot recover from either.
absl::Status FromGlooError(const std::exception& e, const Task& task) {
  const std::string msg = std::string(e.what()).substr(0, 2000);
  if (absl::StrContains(msg, "Timed out") || absl::StrContains(msg, "timed out")) {
    return absl::DeadlineExceededError(absl::StrFormat(
        "%s timed out after %s: a peer did not take part in time (gloo: %s)", task.what,
        absl::FormatDuration(task.timeout), msg));
  }
  return absl::UnavailableError(
      absl::StrFormat("%s failed: a peer was lost or a connection broke (gloo: %s)", task.what, msg));
}

// The header exchange before a group (see [Note: a header before every gloo collective] in comm/desync.h): every
// rank's DesyncMonitor::Header() all-gathered (16 bytes per rank: the same size on every rank, whatever the groups,
// so gloo always pairs it), then compared. Mismatch: Aborted naming every rank's position, on every rank.
absl::Status ExchangeHeader(const std::shared_ptr<gloo::Context>& ctx, DesyncMonitor& monitor, const Task& task) {
  const absl::Duration left = task.deadline - absl::Now();
  if (left <= absl::ZeroDuration()) {
    return absl::DeadlineExceededError(absl::StrFormat(
        "%s timed out after %s before gloo started it (earlier collectives of this communicator took the time)",
        task.what, absl::FormatDuration(task.timeout)));
  }
  const std::array<int64_t, 2> mine = DesyncMonitor::Header(task.pos);
  std::vector<int64_t> gathered(2 * static_cast<size_t>(ctx->size));
  std::copy(mine.begin(), mine.end(), gathered.begin() + 2 * ctx->rank);
  try {
    gloo::AllgatherOptions o(ctx);
    o.setOutput<int64_t>(gathered.data(), gathered.size());  // no input set: gloo sends this rank's block
    o.setTimeout(GlooTimeout(left));
    gloo::allgather(o);
  } catch (const std::exception& e) {
    return WithContext(FromGlooError(e, task), "header exchange");
  }
  return monitor.CompareHeaders(task.pos, gathered, std::max(task.deadline - absl::Now(), absl::Seconds(1)));
}

// The Work of one group: waits for the worker to finish it (see [Note: the gloo worker]).
class GlooWork final : public Work {
 public:
  explicit GlooWork(std::shared_ptr<Task> task) : task_(std::move(task)) {}
  absl::Status Wait() override {
    if (waited_) return absl::FailedPreconditionError(absl::StrFormat("%s: Wait() called twice", task_->what));
    waited_ = true;
    const absl::Duration left = std::max(task_->deadline - absl::Now(), absl::ZeroDuration()) + kWorkerGrace;
    absl::StatusOr<bool> finished = task_->done.WaitFor(std::min(left, kLongestGlooTimeout));
    if (!finished.ok()) return finished.status();
    if (*finished) return absl::OkStatus();
    // The watchdog has failed the communicator by now (the deadline passed), so later calls fail fast.
    return absl::DeadlineExceededError(absl::StrFormat(
        "%s timed out after %s, and gloo had not returned %s later (its buffers may still be in use)", task_->what,
        absl::FormatDuration(task_->timeout), absl::FormatDuration(kWorkerGrace)));
  }

 private:
  std::shared_ptr<Task> task_;
  bool waited_ = false;
};

}  // namespace

struct GlooCommunicator::State {
  std::shared_ptr<gloo::transport::Device> device;
  std::shared_ptr<gloo::rendezvous::Context> context;
  std::unique_ptr<Watchdog> watchdog;
  // Numbers the groups and compares their headers; with the rendezvous store, so a mismatch names every rank's
  // position. No first deadline or notes: the worker, not DesyncMonitor::Await, waits on gloo.
  std::unique_ptr<DesyncMonitor> monitor;

  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::shared_ptr<Task>> queue;  // guarded by mu
  bool stop = false;                        // guarded by mu
  absl::Status failure;                     // guarded by mu; the first failure, for good
  std::thread worker;

  void Fail(const absl::Status& s) {
    std::lock_guard<std::mutex> lock(mu);
    if (failure.ok()) failure = s;
  }
  absl::Status Failure() {
    std::lock_guard<std::mutex> lock(mu);
    return failure;
  }

  // The worker: runs the queued groups in issue order, each op under what is left of its group's deadline.
  void Run() {
    for (;;) {
      std::shared_ptr<Task> task;
      {
        std::unique_lock<std::mutex> lock(mu);
        cv.wait(lock, [&] { return stop || !queue.empty(); });
        if (stop) return;  // the destructor fails what is still queued
        task = std::move(queue.front());
        queue.pop_front();
      }
      absl::Status status = Failure();
      if (!status.ok()) {
        status = absl::UnavailableError(
            absl::StrFormat("%s refused: the communicator failed earlier: %s", task->what, status.message()));
      }
      if (status.ok() && context->size > 1) status = ExchangeHeader(context, *monitor, *task);
      for (size_t k = 0; k < task->ops.size() && status.ok(); ++k) {
        const absl::Duration left = task->deadline - absl::Now();
        if (left <= absl::ZeroDuration()) {
          status = absl::DeadlineExceededError(absl::StrFormat(
              "%s timed out after %s before gloo started it (earlier collectives of this communicator took the time)",
              task->what, absl::FormatDuration(task->timeout)));
          break;
        }
        try {
          RunOne(context, task->ops[k], GlooTimeout(left));
        } catch (const std::exception& e) {
          status = FromGlooError(e, *task);
        }
      }
      if (!status.ok()) Fail(status);
      task->done.Finish(status);
    }
  }
};

GlooCommunicator::GlooCommunicator(int rank, int size, std::unique_ptr<State> state)
    : rank_(rank), size_(size), state_(std::move(state)) {}

GlooCommunicator::~GlooCommunicator() {
  std::deque<std::shared_ptr<Task>> left;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->stop = true;
    left.swap(state_->queue);
  }
  state_->cv.notify_all();
  for (auto& task : left) task->done.Finish(absl::CancelledError(task->what + ": the communicator was destroyed"));
  // A group already inside gloo ends by its deadline.
  if (state_->worker.joinable()) state_->worker.join();
}

namespace {

// gloo's tcp transport writes to sockets without MSG_NOSIGNAL: a write to a peer that died raises SIGPIPE, whose
// default action ends the process at once (exit 141) instead of letting the collective fail with Unavailable
// naming the peer. Python ignores SIGPIPE at start-up, so the Python path never saw it; a C++ trainer does not.
// Only the default action is replaced: a handler the program installed itself is left alone.
void IgnoreSigpipe() {
  struct sigaction current {};
  if (sigaction(SIGPIPE, nullptr, &current) == 0 && current.sa_handler == SIG_DFL) {
    struct sigaction ignore {};
    ignore.sa_handler = SIG_IGN;
    sigemptyset(&ignore.sa_mask);
    sigaction(SIGPIPE, &ignore, nullptr);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<GlooCommunicator>> GlooCommunicator::Create(int rank, int size,
                                                                          std::shared_ptr<KeyValueStore> store,
                                                                          std::string prefix, absl::Duration timeout,
                                                                          std::string hostname) {
  if (size < 1 || rank < 0 || rank >= size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("gloo communicator '%s': rank %d is outside a world of %d ranks", prefix, rank, size));
  }
  IgnoreSigpipe();
  if (store == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat("gloo communicator '%s': no store to meet through", prefix));
  }
  if (timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrFormat("gloo communicator '%s': the timeout must be > 0, got %s",
                                                      prefix, absl::FormatDuration(timeout)));
  }
  const std::string who = absl::StrFormat("gloo communicator '%s' (rank %d of %d)", prefix, rank, size);
  auto state = std::make_unique<State>();
  DesyncOptions desync;
  desync.store = store;
  desync.key_prefix = prefix + "/desync";  // beside gloo's rendezvous keys (<prefix>/<rank>), never one of them
  TESSERA_ASSIGN_OR_RETURN(
      state->monitor,
      DesyncMonitor::Create(rank, size, absl::StrFormat("gloo communicator '%s'", prefix), std::move(desync)));
  try {
    gloo::transport::tcp::attr attr;
    attr.hostname = hostname;
    state->device = gloo::transport::tcp::CreateDevice(attr);
    auto context = std::make_shared<gloo::rendezvous::Context>(rank, size);
    context->setTimeout(GlooTimeout(timeout));
    StoreAdapter adapter(std::move(store), timeout);
    gloo::rendezvous::PrefixStore prefixed(prefix, adapter);
    context->connectFullMesh(prefixed, state->device);
    state->context = std::move(context);
  } catch (const StoreError& e) {
    return WithContext(e.status, who + ": rendezvous through the store failed");
  } catch (const std::exception& e) {
    const std::string msg = e.what();
    const std::string text = absl::StrFormat("%s: connecting to the other ranks (listening on '%s') failed: %s", who,
                                             hostname.empty() ? "this host's name" : hostname, msg.substr(0, 2000));
    return absl::StrContains(msg, "imed out") ? absl::DeadlineExceededError(text) : absl::UnavailableError(text);
  }
  // No on_failure: a gloo call cannot be aborted; the communicator is failed for good and its calls fail fast.
  state->watchdog = std::make_unique<Watchdog>(who, nullptr, nullptr);
  State* s = state.get();
  state->worker = std::thread([s] { s->Run(); });
  return std::unique_ptr<GlooCommunicator>(new GlooCommunicator(rank, size, std::move(state)));
}

absl::StatusOr<std::unique_ptr<Work>> GlooCommunicator::Issue(absl::Span<const Collective> ops,
                                                              const CollectiveOptions& options) {
  for (size_t k = 0; k < ops.size(); ++k) {
    const Collective& op = ops[k];
    absl::Status s = ValidateCollective(op, size_);
    if (s.ok() && (op.input.device.is_cuda() || op.output.device.is_cuda())) {
      s = absl::InvalidArgumentError(
          absl::StrFormat("%s: the gloo backend needs CPU buffers, got input on %s and output on %s",
                          CollectiveKindName(op.kind), op.input.device.ToString(), op.output.device.ToString()));
    }
    if (!s.ok()) return ops.size() > 1 ? WithContext(s, absl::StrFormat("op %d of a group of %d", k, ops.size())) : s;
  }
  TESSERA_RETURN_IF_ERROR(state_->Failure());
  TESSERA_RETURN_IF_ERROR(state_->watchdog->status());  // a group missed its deadline, possibly never waited on
  if (ops.empty()) return std::unique_ptr<Work>(std::make_unique<DoneWork>());

  auto task = std::make_shared<Task>();
  task->ops.assign(ops.begin(), ops.end());
  task->timeout = EffectiveTimeout(options.timeout);
  task->deadline = absl::Now() + task->timeout;
  // Counted at issue: every rank numbers its groups the same way as long as they stay in step.
  task->pos = state_->monitor->Next(ops, options.tag);
  const int64_t seq = task->pos.seq;
  const std::string group =
      ops.size() == 1 ? Describe(ops[0])
                      : absl::StrFormat("group of %d collectives (%s)", ops.size(),
                                        absl::StrJoin(ops, ", ", [](std::string* out, const Collective& op) {
                                          out->append(Describe(op));
                                        }));
  task->what = absl::StrFormat("%s on %s [gloo, #%d]", group, Where(options), seq);
  TESSERA_RETURN_IF_ERROR(
      state_->watchdog->Watch(task->what, task->timeout, [task] { return task->done.Poll(); }));
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    state_->queue.push_back(task);
  }
  state_->cv.notify_all();
  return std::unique_ptr<Work>(std::make_unique<GlooWork>(std::move(task)));
}

absl::Status GlooCommunicator::Barrier(absl::Duration timeout) {
  float one = 1.0f;
  CollectiveOptions options;
  options.timeout = timeout;
  options.tag = "barrier";
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Work> work,
                           AllReduce(BufferView{&one, DType::kFloat32, 1, Device::CPU()}, ReduceOp::kSum, options));
  return work->Wait();
}

}  // namespace tessera::comm
