// The Communicator interface every backend implements (local threads, torch c10d ProcessGroup, NCCL).
//
// One virtual entry point, Issue(), takes a span of collectives and runs them as one fused group (NCCL:
// ncclGroupStart/End; c10d: issued back to back and awaited together), so callers add capability by adding a
// Collective field, not a second API. Every call returns a must-use Work handle; failures and timeouts come back as
// a Status from Issue() or Work::Wait(), never as a hang or an exception.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "tessera/core/buffer.h"

namespace tessera::comm {

enum class ReduceOp : int8_t { kSum = 0, kAvg = 1 };

enum class CollectiveKind : int8_t { kAllGather, kReduceScatter, kAllReduce, kBroadcast };

const char* CollectiveKindName(CollectiveKind kind);

// One collective. Shapes (n = input elements per rank, W = world size):
//   all-gather:      input n, output W*n, rank-major (rank r's input lands at [r*n, (r+1)*n)).
//   reduce-scatter:  input W*n (rank-major), output n = the reduction of every rank's r-th block.
//   all-reduce:      input n, output n (may alias input).
//   broadcast:       input == output, n elements; root's data ends up everywhere.
struct Collective {
  CollectiveKind kind = CollectiveKind::kAllReduce;
  BufferView input;
  BufferView output;
  ReduceOp op = ReduceOp::kSum;
  int root = 0;

  static Collective AllGather(BufferView in, BufferView out) { return {CollectiveKind::kAllGather, in, out}; }
  static Collective ReduceScatter(BufferView in, BufferView out, ReduceOp op) {
    return {CollectiveKind::kReduceScatter, in, out, op};
  }
  static Collective AllReduce(BufferView buf, ReduceOp op) { return {CollectiveKind::kAllReduce, buf, buf, op}; }
  static Collective Broadcast(BufferView buf, int root) {
    return {CollectiveKind::kBroadcast, buf, buf, ReduceOp::kSum, root};
  }
};

// The one default bound on a collective (Python: tessera.knobs.DEFAULT_COLLECTIVE_TIMEOUT_S, overridable with
// TESSERA_COLLECTIVE_TIMEOUT_S).
inline constexpr absl::Duration kDefaultCollectiveTimeout = absl::Minutes(10);

struct CollectiveOptions {
  // How long Wait() may block before it reports DeadlineExceeded.
  absl::Duration timeout = kDefaultCollectiveTimeout;
  // Where the caller is, for errors and desync reports: e.g. "forward all-gather of unit 'blocks.0'". Empty: the
  // collective's kind and size only.
  std::string tag;
  // CUDA backends only: the cudaStream_t whose queued work the collective must follow, and which Wait() orders
  // after the collective (the host does not block). nullptr means the legacy default stream.
  void* stream = nullptr;
};

class [[nodiscard]] Work {
 public:
  virtual ~Work() = default;
  // CPU backends: blocks until the collective finished. CUDA backends: makes `stream` wait for it.
  [[nodiscard]] virtual absl::Status Wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend_name() const = 0;

  // Issues `ops` as one group. Buffers must stay valid until the returned Work's Wait() returns.
  [[nodiscard]] virtual absl::StatusOr<std::unique_ptr<Work>> Issue(absl::Span<const Collective> ops,
                                                                    const CollectiveOptions& options) = 0;
  [[nodiscard]] virtual absl::Status Barrier(absl::Duration timeout) = 0;

  // The training step the caller is in (-1: none), named in timeout and error messages. Thread-safe.
  void set_step(int64_t step) { step_.store(step, std::memory_order_relaxed); }
  int64_t step() const { return step_.load(std::memory_order_relaxed); }
  // A bound on every collective from now on, on top of each call's own timeout (the smaller wins): the training
  // timeout, tightened after the first step while init and the first step ran under the longer defaults.
  // InfiniteDuration() (the default): no cap. Thread-safe.
  void set_timeout_cap(absl::Duration cap) { cap_ns_.store(absl::ToInt64Nanoseconds(cap), std::memory_order_relaxed); }
  absl::Duration timeout_cap() const { return absl::Nanoseconds(cap_ns_.load(std::memory_order_relaxed)); }
  // The deadline a collective issued with `requested` gets: min(requested, timeout_cap()).
  absl::Duration EffectiveTimeout(absl::Duration requested) const { return std::min(requested, timeout_cap()); }
  // "rank R of W, step S, TAG": where a collective was issued, for messages (the step and tag only when set).
  std::string Where(const CollectiveOptions& options) const;

  // Single-collective conveniences over Issue().
  [[nodiscard]] absl::StatusOr<std::unique_ptr<Work>> AllGather(BufferView in, BufferView out,
                                                                const CollectiveOptions& options = {});
  [[nodiscard]] absl::StatusOr<std::unique_ptr<Work>> ReduceScatter(BufferView in, BufferView out, ReduceOp op,
                                                                    const CollectiveOptions& options = {});
  [[nodiscard]] absl::StatusOr<std::unique_ptr<Work>> AllReduce(BufferView buf, ReduceOp op,
                                                                const CollectiveOptions& options = {});
  [[nodiscard]] absl::StatusOr<std::unique_ptr<Work>> Broadcast(BufferView buf, int root,
                                                                const CollectiveOptions& options = {});

 private:
  std::atomic<int64_t> step_{-1};
  // ToInt64Nanoseconds(InfiniteDuration()) saturates to int64 max (about 292 years): no cap in practice.
  std::atomic<int64_t> cap_ns_{absl::ToInt64Nanoseconds(absl::InfiniteDuration())};
};

// Checks one collective's shapes, dtypes and devices against a world of `world_size`; every backend calls it first
// so that bad input gets the same InvalidArgument message everywhere.
absl::Status ValidateCollective(const Collective& op, int world_size);

// A Work that is already complete (ops that finished synchronously, or an empty group).
class DoneWork final : public Work {
 public:
  explicit DoneWork(absl::Status status = absl::OkStatus()) : status_(std::move(status)) {}
  absl::Status Wait() override { return status_; }

 private:
  absl::Status status_;
};

// Waits on several Works; returns the first error.
class GroupWork final : public Work {
 public:
  explicit GroupWork(std::vector<std::unique_ptr<Work>> works) : works_(std::move(works)) {}
  absl::Status Wait() override;

 private:
  std::vector<std::unique_ptr<Work>> works_;
};

}  // namespace tessera::comm
