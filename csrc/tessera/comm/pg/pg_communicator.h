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
#pragma once

#include <memory>
#include <string>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "tessera/comm/communicator.h"

namespace tessera::comm {

class PgCommunicator final : public Communicator {
 public:
  explicit PgCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> group);

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
};

}  // namespace tessera::comm
