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
//
// [Note: tessera's own group, and a header before every collective]
// Two ways ranks fell out of step on a shared gloo group (issue 17, fault 8):
//  (a) a user's collective (dist.barrier, dist.all_reduce on the group given to tessera.shard) on one rank while
//      another runs a tessera collective: gloo pairs collectives of one group by issue order (its per-group tag),
//      so the two paired with each other: a hang, silently mixed data, or an abort;
//  (b) two ranks at different tessera collectives (an evaluation forward on one rank only): different sizes made
//      gloo's transport thread throw EnforceNotMet ("Received data size doesn't match expected size") and abort the
//      process with SIGABRT; the peer got a CommError.
// The fixes, one per cause:
//  - tessera's collectives run on a group of their own over the same ranks, made once per user group by
//    python/tessera/shard/comm.py (a ProcessGroupGloo over a PrefixStore of the default store, not registered with
//    torch.distributed, so user groups keep their names and only the group's own ranks take part, as HSDP needs).
//    User collectives then never pair with tessera's; the user's group is kept (weakly) for its c10d sequence
//    number, which tells when a peer is blocked in a collective of its own (see [Note: a peer blocked outside
//    tessera] in comm/desync.h).
//  - before each collective every rank all-gathers a fixed 16-byte header (sequence number and a hash of the
//    signature and tag; see [Note: a header before every gloo collective] in comm/desync.h), and only then issues
//    the collective. Mismatched collectives are never paired by gloo: every rank raises tessera.DesyncError.
// The header must complete before the collective is issued, and gloo pairs by issue order, so one issuer thread per
// communicator issues every group in order (header, wait, compare, then the collectives); Issue() only queues, so a
// prefetched all-gather still overlaps compute. Every rank issues its groups in program order, so every rank's issue
// order on the group is the same. Considered and not taken: checking positions through the store before each collective
// (the strict check: a few store round trips per collective, and TCPStore serves every rank from one process); waiting
// for the header in Issue() itself (simpler and measured about as costly, but Issue() then blocks until every peer
// issued the same collective, which callers that issue ahead do not expect); an all-reduce of the header (gloo's
// all-reduce of a few bytes took 1.2-1.7 ms on the dev VM, its all-gather 0.1-0.3 ms). Cost: one small all-gather round
// trip per collective, on the issuer thread, CPU gloo only (NCCL is untouched); benchmarks/desync_header.py measures it
// with and without headers in one run (benchmarks/results/desync_header_cpu2rank_devvm_202612.md).
// After a header mismatch, a header that never completed, or a desync, the communicator is broken for good: a
// collective may still be pending in gloo (c10d cannot cancel one), and pairing anything after it would be wrong.
// Such a group is kept alive until the process exits (never destroyed), since destroying it would wait for that
// collective up to its timeout.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "tessera/comm/communicator.h"
#include "tessera/comm/desync.h"
#include "tessera/comm/watchdog.h"

namespace tessera::comm {

// The thread that issues every group of one PgCommunicator, in order, each after its header exchange, and the
// communicator's lasting failure (see [Note: tessera's own group, and a header before every collective]). Shared
// with that thread and the works handed out, which may outlive the communicator.
struct PgIssuer {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::function<void()>> jobs;  // guarded by mu
  bool stop = false;                       // guarded by mu
  absl::Status broken;                     // guarded by mu

  // Records the communicator's failure (the first one wins) for every later call, and keeps `group` alive until
  // the process exits: ~ProcessGroupGloo would wait for a pending collective up to its timeout.
  void Break(const absl::Status& status, const c10::intrusive_ptr<c10d::ProcessGroup>& group);
  absl::Status Broken();
  void Run();  // the thread: runs jobs until stopped and drained
};

class PgCommunicator final : public Communicator {
 public:
  // Without desync diagnosis: waits are plain waits bounded by the collective timeout.
  explicit PgCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> group);
  ~PgCommunicator() override;
  // With desync diagnosis through `desync.store` (InvalidArgument for bad options; the store's error if it cannot
  // be reached).
  // `user_group` (optional): the group the user's own torch.distributed collectives run on, when `group` is
  // tessera's own group over the same ranks (see [Note: tessera's own group, and a header before every collective]).
  static absl::StatusOr<std::unique_ptr<PgCommunicator>> Create(
      c10::intrusive_ptr<c10d::ProcessGroup> group, DesyncOptions desync,
      c10::intrusive_ptr<c10d::ProcessGroup> user_group = c10::intrusive_ptr<c10d::ProcessGroup>());

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override;

  absl::StatusOr<std::unique_ptr<Work>> Issue(absl::Span<const Collective> ops,
                                              const CollectiveOptions& options) override;
  absl::Status Barrier(absl::Duration timeout) override;

  // Whether a header exchange precedes every collective (default true). false only to measure what it costs
  // (benchmarks/desync_header.py): ranks out of step can then have gloo pair mismatched collectives and abort.
  void set_exchange_headers(bool on) { exchange_headers_ = on; }

  // The group, or FailedPrecondition if torch.distributed has destroyed it.
  absl::StatusOr<c10::intrusive_ptr<c10d::ProcessGroup>> group() const;

 private:
  c10::weak_intrusive_ptr<c10d::ProcessGroup> group_;
  std::string name_;  // backend name, kept for messages after the group is gone
  int rank_;
  int size_;
  std::shared_ptr<DesyncMonitor> monitor_;  // never null; disabled without a store
  std::unique_ptr<Watchdog> watchdog_;       // every issued group's deadline (see [Note: the collective watchdog])
  bool exchange_headers_ = true;
  std::shared_ptr<PgIssuer> issuer_;  // never null; shared with its thread and the works
};

}  // namespace tessera::comm
