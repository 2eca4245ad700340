// The NCCL backend of Communicator: one ncclComm_t per process and device, bootstrapped from a unique id that the
// torch layer broadcasts over a c10d Store. Torch-free; CUDA and NCCL types stay out of this header (void* handles,
// as in CollectiveOptions::stream) so that code including it needs neither include path.
//
// [Note: NCCL timeouts]
// The communicator is created non-blocking (ncclConfig_t::blocking = 0), so neither init nor a collective can trap
// the host inside NCCL: every host-side wait here is a poll of cudaEventQuery / ncclCommGetAsyncError with a
// deadline. A timeout or an asynchronous NCCL error aborts the communicator (ncclCommAbort also kills its kernels, so
// the GPU does not hang on a dead peer) and every later call reports it; recovery means building a new communicator.
// Work::Wait() does not block the host, so host waits alone would never see a collective stuck on the GPU: every
// issued group is also watched by a Watchdog thread against its deadline, and the same thread polls
// ncclCommGetAsyncError (see [Note: the collective watchdog] in comm/watchdog.h).
#pragma once

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "tessera/comm/communicator.h"

namespace tessera::comm {

// The NCCL handle, the communication stream and scratch memory, shared by the communicator and its outstanding
// Work so that a Work never outlives what it polls. Defined in nccl_communicator.cc.
struct NcclState;

class NcclCommunicator final : public Communicator {
 public:
  // ncclGetUniqueId on rank 0, serialised (NCCL_UNIQUE_ID_BYTES = 128 bytes) for the store broadcast.
  static absl::StatusOr<std::string> NewUniqueId();

  // Joins the group `unique_id_bytes` names as `rank` of `size`, on CUDA device `device_index`. Blocks until every
  // rank joined or `init_timeout` passed (DeadlineExceeded; the half-built communicator is aborted).
  static absl::StatusOr<std::unique_ptr<NcclCommunicator>> Create(int rank, int size,
                                                                  const std::string& unique_id_bytes,
                                                                  int device_index,
                                                                  absl::Duration init_timeout = absl::Minutes(10));

  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override;
  int size() const override;
  std::string backend_name() const override { return "nccl"; }
  int device_index() const;
  // The communication stream (a cudaStream_t) the collectives run on.
  void* comm_stream() const;

  // Queues `ops` as one ncclGroupStart/End group on the communication stream, after the work queued so far on
  // options.stream. All buffers must be CUDA buffers on this communicator's device. The returned Work is an
  // NcclWork: Wait() orders options.stream after the group without blocking the host.
  absl::StatusOr<std::unique_ptr<Work>> Issue(absl::Span<const Collective> ops,
                                              const CollectiveOptions& options) override;

  // A one-element all-reduce that the host waits for, up to `timeout`.
  absl::Status Barrier(absl::Duration timeout) override;

  // Host-waits until every collective issued so far finished. DeadlineExceeded after `timeout`, Unavailable on an
  // asynchronous NCCL error (a peer lost); both abort the communicator (see [Note: NCCL timeouts]).
  absl::Status Synchronize(absl::Duration timeout);

  // Whether the communicator was aborted (after which every call fails with FailedPrecondition).
  bool aborted() const;

 private:
  explicit NcclCommunicator(std::shared_ptr<NcclState> state);
  std::shared_ptr<NcclState> state_;
};

// What NcclCommunicator::Issue returns. Owns the event recorded after the group on the communication stream.
class NcclWork final : public Work {
 public:
  NcclWork(std::shared_ptr<NcclState> state, void* done_event, void* stream, absl::Duration timeout);
  ~NcclWork() override;
  NcclWork(const NcclWork&) = delete;
  NcclWork& operator=(const NcclWork&) = delete;

  // Makes the Issue()'s options.stream wait for the group (cudaStreamWaitEvent); the host does not block. Reports
  // an NCCL error already known, but cannot see one that happens later: use Synchronize() for that.
  absl::Status Wait() override;
  // Host-waits for the group, up to the Issue()'s options.timeout; errors as NcclCommunicator::Synchronize.
  absl::Status Synchronize();

 private:
  std::shared_ptr<NcclState> state_;
  void* done_event_;  // cudaEvent_t
  void* stream_;      // cudaStream_t of the caller
  absl::Duration timeout_;
};

}  // namespace tessera::comm
