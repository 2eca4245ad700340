// The `pg` backend: tessera's Communicator over any torch c10d ProcessGroup (gloo gives CPU ranks; users can
// reuse the groups they already have). It is the one comm backend that includes torch headers, so it is compiled
// into tessera_torch, not tessera_core.
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

  const c10::intrusive_ptr<c10d::ProcessGroup>& group() const { return group_; }

 private:
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  int rank_;
  int size_;
};

}  // namespace tessera::comm
