// The `pg` backend: tessera's Communicator over any torch c10d ProcessGroup (gloo gives CPU ranks; users can
// reuse the groups they already have). It is the one comm backend that includes torch headers, so it is compiled
// into tessera_torch, not tessera_core.
//
// [Note: the adapter does not own the group]
// It holds the ProcessGroup weakly. torch.distributed owns its groups: destroy_process_group() drops the last
// strong reference, and ProcessGroupGloo's destructor then joins its worker threads while Python is still alive.
// When the adapter held a strong reference, a group outlived destroy_process_group() inside a model's units (kept
// by reference cycles until interpreter shutdown); a gloo worker still releasing a Python-owned tensor after
// Py_FinalizeEx began then needed the GIL, was force-unwound by the interpreter and aborted the process
// ("terminate called without an active exception", seen in 3-rank tests on 2 cores about one run in four).
// Using the adapter after its group is destroyed is a FailedPrecondition naming the group.
//
// Every issued group is also watched by a Watchdog with the same deadline, so a group that is never waited for
// still fails the communicator at its deadline (see [Note: the collective watchdog] in comm/watchdog.h).
// Waits past a short first deadline compare positions with the other ranks through a store, so ranks out of step
// fail at once with every rank's position (see [Note: comparing notes after the first deadline] in comm/desync.h).
// c10d's Work::wait(timeout) throws on timeout without cancelling the collective, so waits run in slices.
#pragma once

#include <memory>
#include <string>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "tessera/comm/communicator.h"
#include "tessera/comm/desync.h"
#include "tessera/comm/watchdog.h"

namespace tessera::comm {

class PgCommunicator final : public Communicator {
 public:
  // Without desync diagnosis: waits are plain waits bounded by the collective timeout.
  explicit PgCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> group);
  ~PgCommunicator() override;
  // With desync diagnosis through `desync.store` (InvalidArgument for bad options; the store's error if it cannot
  // be reached).
  static absl::StatusOr<std::unique_ptr<PgCommunicator>> Create(c10::intrusive_ptr<c10d::ProcessGroup> group,
                                                                DesyncOptions desync);

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override;

  absl::StatusOr<std::unique_ptr<Work>> Issue(absl::Span<const Collective> ops,
                                              const CollectiveOptions& options) override;
  absl::Status Barrier(absl::Duration timeout) override;

  // The group, or FailedPrecondition if torch.distributed has destroyed it.
  absl::StatusOr<c10::intrusive_ptr<c10d::ProcessGroup>> group() const;

 private:
  c10::weak_intrusive_ptr<c10d::ProcessGroup> group_;
  std::string name_;  // backend name, kept for messages after the group is gone
  int rank_;
  int size_;
  std::shared_ptr<DesyncMonitor> monitor_;  // never null; disabled without a store
  std::unique_ptr<Watchdog> watchdog_;       // every issued group's deadline (see [Note: the collective watchdog])
};

}  // namespace tessera::comm
