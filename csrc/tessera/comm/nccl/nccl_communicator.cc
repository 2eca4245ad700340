#include "tessera/comm/nccl/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>
#include <functional>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "tessera/comm/watchdog.h"
#include "tessera/core/cuda_device_guard.h"
#include "tessera/core/status.h"

namespace tessera::comm {
namespace {

absl::Status CudaStatus(cudaError_t err, const char* expr, const char* file, int line) {
  return absl::InternalError(
      absl::StrFormat("%s:%d: %s failed: %s (%s)", file, line, expr, cudaGetErrorString(err), cudaGetErrorName(err)));
}

// NCCL codes to the codes the callers act on: a remote or system error means a peer (or the network) is gone.
absl::Status NcclStatus(ncclResult_t r, ncclComm_t comm, const std::string& what) {
  const char* last = ncclGetLastError(comm);
  const std::string msg = absl::StrFormat("%s: %s%s%s", what, ncclGetErrorString(r), last && *last ? ": " : "",
                                          last ? last : "");
  switch (r) {
    case ncclInvalidArgument:
    case ncclInvalidUsage: return absl::InvalidArgumentError(msg);
    case ncclRemoteError:
    case ncclSystemError: return absl::UnavailableError(msg);
    default: return absl::InternalError(msg);
  }
}

}  // namespace
}  // namespace tessera::comm

// The CUDACHECK / NCCLCHECK of this file: a failing return code becomes a Status naming the call and file:line.
// ncclInProgress is not a failure: a non-blocking communicator returns it for work it finishes in the background.
#define TESSERA_CUDA_RETURN_IF_ERROR(expr)                                                 \
  do {                                                                                     \
    const cudaError_t _tessera_err = (expr);                                               \
    if (_tessera_err != cudaSuccess) return CudaStatus(_tessera_err, #expr, __FILE__, __LINE__); \
  } while (0)

#define TESSERA_NCCL_RETURN_IF_ERROR(comm, expr)                                                      \
  do {                                                                                                \
    const ncclResult_t _tessera_res = (expr);                                                         \
    if (_tessera_res != ncclSuccess && _tessera_res != ncclInProgress)                                \
      return NcclStatus(_tessera_res, (comm), absl::StrFormat("%s:%d: %s", __FILE__, __LINE__, #expr)); \
  } while (0)

namespace tessera::comm {

struct NcclState {
  int rank = 0, size = 1, device = 0;
  // Non-blocking (no implicit sync with the legacy default stream) so that collectives overlap the compute queued
  // on other streams; ordering with the caller's stream is explicit, through events (Issue / NcclWork::Wait).
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr;  // recorded on the caller's stream; the comm stream waits for it
  float* scratch = nullptr;     // Barrier's one element

  // One thread at a time inside NCCL for this communicator (NCCL requires it); also guards comm / abort state.
  absl::Mutex mu;
  ncclComm_t comm = nullptr;  // null once aborted
  std::string abort_reason;
  // Deadlines of the issued groups and the asynchronous-error poll (see [Note: the collective watchdog]); started
  // once init finished, stopped first in the destructor (its callbacks use this state).
  std::unique_ptr<Watchdog> watchdog;

  std::string Name() const { return absl::StrFormat("NCCL communicator (rank %d of %d, cuda:%d)", rank, size, device); }

  absl::Status AbortedError() const {
    return absl::FailedPreconditionError(absl::StrFormat("%s was aborted earlier: %s", Name(), abort_reason));
  }

  // See [Note: NCCL timeouts]. Requires mu.
  void AbortLocked(const absl::Status& why) {
    if (comm == nullptr) return;
    ncclCommAbort(comm);
    comm = nullptr;
    abort_reason = std::string(why.message());
  }

  ~NcclState() {
    watchdog.reset();
    int previous = -1;
    cudaGetDevice(&previous);
    cudaSetDevice(device);
    if (comm != nullptr) {
      // Finalize flushes outstanding collectives, which needs the peers; bounded so a dead peer cannot hang the
      // destructor (then abort instead).
      const absl::Time deadline = absl::Now() + absl::Seconds(60);
      ncclResult_t state = ncclCommFinalize(comm);
      while (state == ncclInProgress && absl::Now() < deadline) {
        absl::SleepFor(absl::Microseconds(200));
        if (ncclCommGetAsyncError(comm, &state) != ncclSuccess) break;
      }
      if (state == ncclSuccess) ncclCommDestroy(comm); else ncclCommAbort(comm);
    }
    if (scratch != nullptr) cudaFree(scratch);
    if (ready != nullptr) cudaEventDestroy(ready);
    if (stream != nullptr) cudaStreamDestroy(stream);
    if (previous >= 0) cudaSetDevice(previous);
  }
};

namespace {


// Polls `done` until it returns true or `timeout` passes, checking the communicator for asynchronous errors in
// between. Failures abort the communicator. `mu_held`: whether the caller already holds st.mu.
absl::Status PollUntil(NcclState& st, absl::Duration timeout, const std::string& what, bool mu_held,
                       const std::function<absl::StatusOr<bool>()>& done) {
  const absl::Time deadline = absl::Now() + timeout;
  absl::Duration nap = absl::Microseconds(10);
  while (true) {
    TESSERA_ASSIGN_OR_RETURN(const bool finished, done());
    {
      absl::MutexLockMaybe lock(mu_held ? nullptr : &st.mu);
      // An abort kills the kernels, so their events complete too: "finished" then means nothing.
      if (st.comm == nullptr) return st.AbortedError();
      if (finished) return absl::OkStatus();
      ncclResult_t async = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(st.comm, &async);
      if (r != ncclSuccess) async = r;
      if (async != ncclSuccess && async != ncclInProgress) {
        const absl::Status s = absl::UnavailableError(absl::StrCat(
            NcclStatus(async, st.comm, absl::StrFormat("%s: %s failed", st.Name(), what)).message(),
            "; the communicator was aborted"));
        st.AbortLocked(s);
        return s;
      }
      if (absl::Now() > deadline) {
        const absl::Status s = absl::DeadlineExceededError(absl::StrFormat(
            "%s: %s did not finish within %s (a peer may be stuck or gone); the communicator was aborted",
            st.Name(), what, absl::FormatDuration(timeout)));
        st.AbortLocked(s);
        return s;
      }
    }  // never sleep holding mu unless the caller does
    absl::SleepFor(nap);
    nap = std::min(nap * 2, absl::Milliseconds(1));
  }
}

// Waits for the communicator's own background work (init, group enqueue) to leave the ncclInProgress state.
absl::Status WaitForCommReady(NcclState& st, absl::Duration timeout, const std::string& what, bool mu_held) {
  return PollUntil(st, timeout, what, mu_held, [&]() -> absl::StatusOr<bool> {
    ncclResult_t async = ncclInProgress;
    if (st.comm != nullptr && ncclCommGetAsyncError(st.comm, &async) != ncclSuccess) return false;
    return async == ncclSuccess;  // errors (and a vanished comm) are reported by PollUntil's own check
  });
}

absl::Status WaitForEvent(NcclState& st, cudaEvent_t event, absl::Duration timeout, const std::string& what) {
  return PollUntil(st, timeout, what, /*mu_held=*/false, [&]() -> absl::StatusOr<bool> {
    const cudaError_t q = cudaEventQuery(event);
    if (q == cudaSuccess) return true;
    if (q == cudaErrorNotReady) return false;
    return CudaStatus(q, "cudaEventQuery", __FILE__, __LINE__);
  });
}

absl::StatusOr<ncclDataType_t> NcclType(DType t) {
  switch (t) {
    case DType::kFloat32: return ncclFloat32;
    case DType::kFloat64: return ncclFloat64;
    case DType::kBFloat16: return ncclBfloat16;
    case DType::kFloat16: return ncclFloat16;
  }
  return absl::InvalidArgumentError(absl::StrFormat("NCCL: unsupported dtype %d", static_cast<int>(t)));
}

ncclRedOp_t NcclOp(ReduceOp op) { return op == ReduceOp::kAvg ? ncclAvg : ncclSum; }

// One collective into the open group. Caller holds st.mu.
absl::Status Enqueue(NcclState& st, const Collective& op) {
  TESSERA_ASSIGN_OR_RETURN(const ncclDataType_t type, NcclType(op.input.dtype));
  const auto in = op.input.data;
  const auto out = op.output.data;
  switch (op.kind) {
    case CollectiveKind::kAllGather:
      TESSERA_NCCL_RETURN_IF_ERROR(st.comm, ncclAllGather(in, out, op.input.count, type, st.comm, st.stream));
      break;
    case CollectiveKind::kReduceScatter:
      TESSERA_NCCL_RETURN_IF_ERROR(
          st.comm, ncclReduceScatter(in, out, op.output.count, type, NcclOp(op.op), st.comm, st.stream));
      break;
    case CollectiveKind::kAllReduce:
      TESSERA_NCCL_RETURN_IF_ERROR(st.comm,
                                   ncclAllReduce(in, out, op.input.count, type, NcclOp(op.op), st.comm, st.stream));
      break;
    case CollectiveKind::kBroadcast:
      TESSERA_NCCL_RETURN_IF_ERROR(st.comm, ncclBroadcast(in, out, op.input.count, type, op.root, st.comm, st.stream));
      break;
  }
  return absl::OkStatus();
}

}  // namespace

// ---- NcclCommunicator -------------------------------------------------------------------------------------------

absl::StatusOr<std::string> NcclCommunicator::NewUniqueId() {
  ncclUniqueId id;
  TESSERA_NCCL_RETURN_IF_ERROR(nullptr, ncclGetUniqueId(&id));
  return std::string(id.internal, sizeof(id.internal));
}

absl::StatusOr<std::unique_ptr<NcclCommunicator>> NcclCommunicator::Create(int rank, int size,
                                                                           const std::string& unique_id_bytes,
                                                                           int device_index,
                                                                           absl::Duration init_timeout) {
  if (size < 1 || rank < 0 || rank >= size) {
    return absl::InvalidArgumentError(absl::StrFormat("NcclCommunicator: rank %d is outside a group of %d", rank, size));
  }
  ncclUniqueId id;
  if (unique_id_bytes.size() != sizeof(id.internal)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "NcclCommunicator: the unique id has %d bytes, expected %d (from NcclCommunicator::NewUniqueId)",
        unique_id_bytes.size(), sizeof(id.internal)));
  }
  std::memcpy(id.internal, unique_id_bytes.data(), sizeof(id.internal));
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
  if (device_index < 0 || device_index >= devices) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "NcclCommunicator (rank %d of %d): CUDA device %d does not exist (%d visible)", rank, size, device_index,
        devices));
  }
  CudaDeviceGuard guard(device_index);
  TESSERA_CUDA_RETURN_IF_ERROR(guard.error());

  auto st = std::make_shared<NcclState>();
  st->rank = rank;
  st->size = size;
  st->device = device_index;
  TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking));
  TESSERA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&st->ready, cudaEventDisableTiming));
  TESSERA_CUDA_RETURN_IF_ERROR(cudaMalloc(&st->scratch, sizeof(float)));
  TESSERA_CUDA_RETURN_IF_ERROR(cudaMemset(st->scratch, 0, sizeof(float)));

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // see [Note: NCCL timeouts]
  absl::MutexLock lock(&st->mu);
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, size, id, rank, &config);
  st->comm = comm;
  if (r != ncclSuccess && r != ncclInProgress) {
    absl::Status s = NcclStatus(r, comm, absl::StrFormat("%s: ncclCommInitRankConfig", st->Name()));
    st->AbortLocked(s);
    return s;
  }
  TESSERA_RETURN_IF_ERROR(WaitForCommReady(*st, init_timeout, "init (waiting for every rank to join)", true));
  NcclState* raw = st.get();  // the watchdog is stopped before the state goes (~NcclState)
  st->watchdog = std::make_unique<Watchdog>(
      st->Name(),
      [raw]() -> absl::Status {
        absl::MutexLock lock(&raw->mu);
        if (raw->comm == nullptr) return absl::OkStatus();  // aborted by a host wait, which reported why
        ncclResult_t async = ncclSuccess;
        const ncclResult_t r = ncclCommGetAsyncError(raw->comm, &async);
        if (r != ncclSuccess) async = r;
        if (async == ncclSuccess || async == ncclInProgress) return absl::OkStatus();
        return absl::UnavailableError(NcclStatus(async, raw->comm, "asynchronous NCCL error").message());
      },
      [raw](const absl::Status& why) {
        absl::MutexLock lock(&raw->mu);
        raw->AbortLocked(absl::Status(why.code(), absl::StrCat(why.message(), "; the communicator was aborted")));
      });
  return std::unique_ptr<NcclCommunicator>(new NcclCommunicator(std::move(st)));
}

NcclCommunicator::NcclCommunicator(std::shared_ptr<NcclState> state) : state_(std::move(state)) {}
NcclCommunicator::~NcclCommunicator() = default;

int NcclCommunicator::rank() const { return state_->rank; }
int NcclCommunicator::size() const { return state_->size; }
int NcclCommunicator::device_index() const { return state_->device; }
void* NcclCommunicator::comm_stream() const { return state_->stream; }

bool NcclCommunicator::aborted() const {
  absl::MutexLock lock(&state_->mu);
  return state_->comm == nullptr;
}

absl::StatusOr<std::unique_ptr<Work>> NcclCommunicator::Issue(absl::Span<const Collective> ops,
                                                              const CollectiveOptions& options) {
  NcclState& st = *state_;
  const Device device = Device::CUDA(st.device);
  for (size_t i = 0; i < ops.size(); ++i) {
    TESSERA_RETURN_IF_ERROR_CTX(ValidateCollective(ops[i], st.size), st.Name(), ", op ", i, " of ", ops.size());
    if (ops[i].input.device != device) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s, op %d of %d: %s buffers are on %s, expected %s", st.Name(), i, ops.size(),
          CollectiveKindName(ops[i].kind), ops[i].input.device.ToString(), device.ToString()));
    }
  }
  if (ops.empty()) return std::unique_ptr<Work>(new DoneWork());

  const absl::Duration timeout = EffectiveTimeout(options.timeout);
  std::string what = ops.size() == 1 ? absl::StrFormat("%s of %d elements (%s)", CollectiveKindName(ops[0].kind),
                                                       ops[0].input.count, DTypeName(ops[0].input.dtype))
                                     : absl::StrFormat("a group of %d collectives", ops.size());
  absl::StrAppend(&what, " on ", Where(options));
  absl::MutexLock lock(&st.mu);
  if (st.comm == nullptr) return st.AbortedError();
  CudaDeviceGuard guard(st.device);
  TESSERA_CUDA_RETURN_IF_ERROR(guard.error());
  auto user_stream = static_cast<cudaStream_t>(options.stream);
  TESSERA_CUDA_RETURN_IF_ERROR(cudaEventRecord(st.ready, user_stream));
  TESSERA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(st.stream, st.ready, 0));

  TESSERA_NCCL_RETURN_IF_ERROR(st.comm, ncclGroupStart());
  for (const Collective& op : ops) {
    absl::Status s = Enqueue(st, op);
    if (!s.ok()) {
      ncclGroupEnd();  // close the group so the communicator stays usable after a rejected op
      return WithContext(s, st.Name());
    }
  }
  const ncclResult_t end = ncclGroupEnd();
  if (end != ncclSuccess && end != ncclInProgress) {
    return NcclStatus(end, st.comm, absl::StrFormat("%s: ncclGroupEnd", st.Name()));
  }
  // Non-blocking: the group's kernels may not be on the stream yet; an event recorded now would complete early.
  if (end == ncclInProgress) {
    TESSERA_RETURN_IF_ERROR(WaitForCommReady(st, timeout, "enqueueing " + what, true));
  }
  cudaEvent_t done = nullptr;
  TESSERA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
  auto work = std::make_unique<NcclWork>(state_, done, options.stream, timeout);
  TESSERA_CUDA_RETURN_IF_ERROR(cudaEventRecord(done, st.stream));
  // The watchdog's own event (the Work's may be destroyed before the group finishes), released by its poll's owner.
  cudaEvent_t watched = nullptr;
  TESSERA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&watched, cudaEventDisableTiming));
  std::shared_ptr<void> event(watched, [](void* e) { cudaEventDestroy(static_cast<cudaEvent_t>(e)); });
  TESSERA_CUDA_RETURN_IF_ERROR(cudaEventRecord(watched, st.stream));
  TESSERA_RETURN_IF_ERROR(st.watchdog->Watch(std::move(what), timeout, [event]() -> absl::StatusOr<bool> {
    const cudaError_t q = cudaEventQuery(static_cast<cudaEvent_t>(event.get()));
    if (q == cudaSuccess) return true;
    if (q == cudaErrorNotReady) return false;
    return CudaStatus(q, "cudaEventQuery", __FILE__, __LINE__);
  }));
  return std::unique_ptr<Work>(std::move(work));
}

absl::Status NcclCommunicator::Barrier(absl::Duration timeout) {
  CollectiveOptions options;
  options.timeout = timeout;
  options.stream = state_->stream;  // nothing of the caller's to wait for
  const BufferView one{state_->scratch, DType::kFloat32, 1, Device::CUDA(state_->device)};
  const Collective op = Collective::AllReduce(one, ReduceOp::kSum);
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<Work> work, Issue(absl::MakeConstSpan(&op, 1), options));
  TESSERA_RETURN_IF_ERROR_CTX(static_cast<NcclWork*>(work.get())->Synchronize(), "barrier");
  return absl::OkStatus();
}

absl::Status NcclCommunicator::Synchronize(absl::Duration timeout) {
  NcclState& st = *state_;
  cudaEvent_t event = nullptr;
  {
    absl::MutexLock lock(&st.mu);
    if (st.comm == nullptr) return st.AbortedError();
    CudaDeviceGuard guard(st.device);
    TESSERA_CUDA_RETURN_IF_ERROR(guard.error());
    TESSERA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    const cudaError_t err = cudaEventRecord(event, st.stream);
    if (err != cudaSuccess) {
      cudaEventDestroy(event);
      return CudaStatus(err, "cudaEventRecord", __FILE__, __LINE__);
    }
  }
  absl::Status s = WaitForEvent(st, event, timeout, "synchronize (the collectives issued so far)");
  cudaEventDestroy(event);
  return s;
}

// ---- NcclWork ---------------------------------------------------------------------------------------------------

NcclWork::NcclWork(std::shared_ptr<NcclState> state, void* done_event, void* stream, absl::Duration timeout)
    : state_(std::move(state)), done_event_(done_event), stream_(stream), timeout_(timeout) {}

NcclWork::~NcclWork() {
  // Safe while the event is still pending: CUDA releases it once it completes.
  if (done_event_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(done_event_));
}

absl::Status NcclWork::Wait() {
  NcclState& st = *state_;
  {
    absl::MutexLock lock(&st.mu);
    if (st.comm == nullptr) return st.AbortedError();
    ncclResult_t async = ncclSuccess;
    if (ncclCommGetAsyncError(st.comm, &async) == ncclSuccess && async != ncclSuccess && async != ncclInProgress) {
      absl::Status s = absl::UnavailableError(absl::StrCat(
          NcclStatus(async, st.comm, absl::StrFormat("%s: collective failed", st.Name())).message(),
          "; the communicator was aborted"));
      st.AbortLocked(s);
      return s;
    }
  }
  TESSERA_CUDA_RETURN_IF_ERROR(
      cudaStreamWaitEvent(static_cast<cudaStream_t>(stream_), static_cast<cudaEvent_t>(done_event_), 0));
  return absl::OkStatus();
}

absl::Status NcclWork::Synchronize() {
  return WaitForEvent(*state_, static_cast<cudaEvent_t>(done_event_), timeout_, "a collective group");
}

}  // namespace tessera::comm
