// The end of one issued collective (group), set once by the thread that runs or waits for it and read by its Work's
// Wait() and by the watchdog's poll. Shared by the gloo and c10d backends (comm/gloo, comm/pg).
#pragma once

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tessera::comm {

class Completion {
 public:
  // Records the outcome and wakes every waiter. Only the first call counts.
  void Finish(absl::Status status) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (finished_) return;
      finished_ = true;
      status_ = std::move(status);
    }
    cv_.notify_all();
  }
  // true when finished OK, false while running, or the error (the watchdog's poll).
  absl::StatusOr<bool> Poll() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!finished_) return false;
    if (!status_.ok()) return status_;
    return true;
  }
  // Waits up to `timeout`: as Poll(), after the wait.
  absl::StatusOr<bool> WaitFor(absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return finished_; })) return false;
    if (!status_.ok()) return status_;
    return true;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool finished_ = false;  // guarded by mu_
  absl::Status status_;    // guarded by mu_
};

}  // namespace tessera::comm
