// The `gloo` backend: CPU ranks in separate processes (or threads) over the gloo library's TCP transport, so C++
// trainers get a CPU communicator without Python or torch. The ranks meet through tessera's KeyValueStore (the c10d
// TCPStore adapter in a job, an InMemoryStore in tests), under a prefix unique to the communicator.
//
// [Note: the gloo worker]
// gloo calls block the calling thread until the collective finished or its timeout passed. Issue() must not block,
// so each communicator owns one worker thread and a FIFO of issued groups: groups run in issue order, which is the
// order every rank must agree on. The returned Work waits for its group up to the group's deadline (counted from
// Issue); the worker gives each gloo call only what is left of that deadline, so it ends (by gloo's own timeout)
// about when the Work gives up, and the caller's buffers are never touched after Wait() returned. Every group is
// also watched by a Watchdog (see [Note: the collective watchdog]), so a Work that is never waited on still fails
// the communicator at its deadline.
//
// Failures: a gloo error (peer lost: Unavailable; gloo's timeout: DeadlineExceeded) fails the communicator for good,
// as in every backend: after a timeout the ranks cannot tell which collectives the others completed, and gloo may
// still hold a half-finished exchange. Later calls fail fast with the first failure.
//
// Costs (correct first, then fast):
//   - all-reduce and reduce-scatter run gloo::allreduce (ring) on a scratch buffer in the accumulation type (float32
//     for float32, bfloat16 and float16, float64 for float64): 16-bit values are summed in float32 and rounded once,
//     as NCCL does, at the price of a copy in and out and twice the bytes on the wire for 16-bit types.
//   - reduce-scatter: this gloo version has no generic reduce-scatter (only ReduceScatterHalvingDoubling<T> of the
//     old algorithm API), so it all-reduces the whole W*n input and keeps this rank's block: about twice the bytes
//     on the wire of a ring reduce-scatter (2(W-1)/W * W*n instead of (W-1)/W * W*n) and W*n scratch.
//   - kAvg is a sum followed by a division by the world size (before the rounding to 16 bits).
//   - groups are not fused: their collectives run one after another on the worker.
//   - a header before every group (see below): one more gloo all-gather, of 16 bytes per rank, per group. Measured
//     (2 ranks on threads over loopback, dev VM with 2 loaded cores, best batch of 50 of 40): a 1-element all-reduce
//     took 30-43 us without the header and 68-76 us with it, so about 40 us per group; a 64K-element all-reduce
//     took 190-230 us without it (the header's share shrinks as groups grow).
//
// [Note: a header before every group on the gloo backend]
// gloo itself does not check that ranks issue matching collectives: it pairs them by issue order, and when two ranks
// are at collectives of different sizes its transport thread throws gloo::EnforceNotMet ("op.preamble.length <=
// op.nbytes"), which terminates the process; equal sizes silently mix unrelated data. So the worker all-gathers each
// group's header first (DesyncMonitor::Header: sequence number + hash of the signature and tag), as the pg backend
// does (see [Note: a header before every gloo collective] in comm/desync.h), and runs the group only if every rank's
// header is the same. Otherwise every rank fails the group with Aborted ("collectives out of step", naming every
// rank's position, exchanged through the rendezvous store under <prefix>/desync), no data moves, and the
// communicator is failed for good like after any gloo error: later calls fail fast with that status. The header
// runs inside the group's deadline and watchdog. Not covered: a rank that never issues the group (its peers wait out
// the deadline: DeadlineExceeded, as before). The conformance suite checks this (aborts_mismatched_groups).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "tessera/comm/communicator.h"
#include "tessera/comm/desync.h"

namespace tessera::comm {

class GlooCommunicator final : public Communicator {
 public:
  // Connects rank `rank` of `size` to every other rank (a full mesh of TCP pairs), meeting through `store` under
  // `prefix` (unique per communicator and identical on every rank). `timeout` bounds the whole rendezvous.
  // `hostname` is the address this rank listens on, as peers reach it: empty means this host's name
  // (gethostname(), resolved), which ranks on other hosts can reach; tests on one host pass "127.0.0.1".
  // Errors: InvalidArgument (rank/size/store), DeadlineExceeded (a rank did not join within `timeout`),
  // Unavailable (the store or a connection failed). Blocks until every rank joined.
  static absl::StatusOr<std::unique_ptr<GlooCommunicator>> Create(int rank, int size,
                                                                  std::shared_ptr<KeyValueStore> store,
                                                                  std::string prefix, absl::Duration timeout,
                                                                  std::string hostname = "");
  ~GlooCommunicator() override;
  GlooCommunicator(const GlooCommunicator&) = delete;
  GlooCommunicator& operator=(const GlooCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "gloo"; }

  // Validates `ops` (InvalidArgument, nothing sent), then queues the group on the worker and returns at once.
  // CPU buffers only. The deadline is EffectiveTimeout(options.timeout), counted from this call.
  absl::StatusOr<std::unique_ptr<Work>> Issue(absl::Span<const Collective> ops,
                                              const CollectiveOptions& options) override;
  // A one-element all-reduce tagged "barrier", under `timeout` (capped like any collective).
  absl::Status Barrier(absl::Duration timeout) override;

 private:
  struct State;  // gloo's context, the worker and its queue, the watchdog (keeps gloo headers out of this one)
  GlooCommunicator(int rank, int size, std::unique_ptr<State> state);

  const int rank_;
  const int size_;
  std::unique_ptr<State> state_;
};

}  // namespace tessera::comm
