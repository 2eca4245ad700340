// A deadline for every outstanding collective, checked by one thread per communicator.
//
// [Note: the collective watchdog]
// A CUDA backend's Work::Wait() only orders streams: the host returns at once, so a collective whose peer stopped
// would block the GPU (and then the next host sync) with nothing to notice it. The watchdog is what notices. Each
// issued group is watched with a deadline and a poll ("finished yet?": a CUDA event query, a c10d completion flag);
// a thread polls every entry every `interval` and also asks the backend for asynchronous errors (NCCL:
// ncclCommGetAsyncError). The first deadline missed or error seen is the communicator's failure: the watchdog calls
// `on_failure` once (NCCL: ncclCommAbort, which also kills the stuck kernels so the GPU is freed), forgets every
// entry, and keeps the status so every later call fails with it. Recovery means a new communicator (a new job
// attempt: exit status 75, see python/tessera/exitcodes.py).
// The message names the rank, the collective and its tag (unit), and the training step (Communicator::step()).
// Torch-free and CUDA-free: the backends pass closures; the watchdog itself is tested with plain closures.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace tessera::comm {

class Watchdog {
 public:
  // true: the watched operation finished; an error: it failed (that error is the failure).
  using Poll = std::function<absl::StatusOr<bool>()>;
  // OK while healthy; an error is the failure (NCCL: an asynchronous error of the communicator).
  using Health = std::function<absl::Status()>;
  using OnFailure = std::function<void(const absl::Status&)>;

  // `name` prefixes messages (e.g. "NCCL communicator (rank 1 of 8, cuda:1)"). `health` may be null. The thread
  // starts here and stops in the destructor; `on_failure` runs on it, outside the watchdog's lock.
  Watchdog(std::string name, Health health, OnFailure on_failure, absl::Duration interval = absl::Milliseconds(50));
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  // Watches `what` (e.g. "all_gather of 4096 elements, forward all-gather of unit 'layers.0', step 12") until
  // `done` says it finished, or fails the communicator at now + `timeout`. Returns the failure at once (and
  // watches nothing) if the communicator already failed.
  absl::Status Watch(std::string what, absl::Duration timeout, Poll done);

  // OK, or the first failure (DeadlineExceeded for a missed deadline; the poll's or health check's error).
  absl::Status status() const;
  // Entries still watched (finished ones leave on the next poll).
  size_t outstanding() const;

 private:
  struct Entry {
    std::string what;
    absl::Time deadline;
    absl::Duration timeout;
    Poll done;
  };
  void Run();
  absl::Status Check(absl::Time now);  // one pass over the entries; the failure, if any

  const std::string name_;
  const Health health_;
  const OnFailure on_failure_;
  const absl::Duration interval_;
  mutable absl::Mutex mu_;
  std::vector<Entry> entries_ ABSL_GUARDED_BY(mu_);
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;
};

}  // namespace tessera::comm
