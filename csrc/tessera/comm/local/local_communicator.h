// The `local` backend: N ranks as threads of one process, so C++ tests can exercise every collective without a
// launcher, a network or a GPU. A LocalWorld is the state the ranks share; each rank's thread takes its own
// LocalCommunicator from it. Collectives run synchronously inside Issue() (the returned Work is already complete).
//
// Like every backend, all ranks must issue the same groups in the same order. Unlike NCCL, the local backend
// checks this: a group that differs across ranks (kinds, counts, dtypes, reduce ops, roots) fails with
// InvalidArgument on every rank, and a rank that does not arrive within the timeout makes the others fail with
// DeadlineExceeded. A timeout breaks the world for good (later calls fail fast with Unavailable), as a lost peer
// does in a real job: the ranks can no longer tell which collectives the others completed.
#pragma once

#include <condition_variable>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "tessera/comm/communicator.h"

namespace tessera::comm {

class LocalCommunicator;

class LocalWorld : public std::enable_shared_from_this<LocalWorld> {
 public:
  // A world of `size` >= 1 ranks.
  static absl::StatusOr<std::shared_ptr<LocalWorld>> Create(int size);

  // Rank `rank`'s communicator; each rank can be taken once (two threads posting as one rank would corrupt the
  // rendezvous). The communicator keeps the world alive.
  absl::StatusOr<std::unique_ptr<LocalCommunicator>> Join(int rank);

  // Convenience for tests: the communicators of all ranks of a fresh world, index = rank.
  static absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> CreateCommunicators(int size);

  int size() const { return size_; }
  // Whether a timeout has broken the world (every later call fails with Unavailable).
  bool broken() const;

 private:
  friend class LocalCommunicator;

  // What one rank posts for a rendezvous; the pointers stay valid until the rendezvous' second meeting.
  struct Post {
    bool is_barrier = false;
    absl::Span<const Collective> ops;
    absl::Status local_status;  // this rank's own validation result; peers' data is not read unless all are OK
  };

  explicit LocalWorld(int size);

  // Runs one rendezvous for `rank` (see [Note: local rendezvous] in local_communicator.cc) and, when every rank
  // agrees, fills `staging` (if not null) with this rank's outputs. `what` names the call in error messages.
  absl::Status Rendezvous(int rank, const Post& post, absl::Duration timeout, const std::string& what,
                          std::vector<std::vector<char>>* staging);
  // The first mismatch between `posts_[0]` and any other rank's post, as InvalidArgument (OK if they agree).
  absl::Status CheckGroupsMatch() const;
  // Computes `rank`'s outputs of the agreed group into `staging` (one byte vector per op).
  void ComputeOutputs(int rank, std::vector<std::vector<char>>& staging) const;

  const int size_;
  // std::mutex rather than absl::Mutex: ThreadSanitizer understands it, while Debian's Abseil is not built
  // with TSAN and its Mutex looks like no synchronization at all. Everything up to posts_ is guarded by mu_.
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<bool> joined_;
  std::string broken_reason_;  // non-empty once broken
  // First meeting (all posted): arrivals of the current round, and a counter bumped when a round completes.
  std::vector<bool> arrived_;
  int num_arrived_ = 0;
  int64_t posted_rounds_ = 0;
  // Second meeting (all done reading peers' inputs).
  int num_done_ = 0;
  int64_t finished_rounds_ = 0;
  // Written by each rank under mu_ before the first meeting; read without the lock between the two meetings,
  // when no rank can write it.
  std::vector<Post> posts_;
};

class LocalCommunicator final : public Communicator {
 public:
  int rank() const override { return rank_; }
  int size() const override { return world_->size(); }
  std::string backend_name() const override { return "local"; }

  // Runs the group synchronously; one thread per rank at a time. Buffers must be on the CPU.
  absl::StatusOr<std::unique_ptr<Work>> Issue(absl::Span<const Collective> ops,
                                              const CollectiveOptions& options) override;
  absl::Status Barrier(absl::Duration timeout) override;

 private:
  friend class LocalWorld;
  LocalCommunicator(std::shared_ptr<LocalWorld> world, int rank) : world_(std::move(world)), rank_(rank) {}

  std::shared_ptr<LocalWorld> world_;
  const int rank_;
};

}  // namespace tessera::comm
