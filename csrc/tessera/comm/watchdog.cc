#include "tessera/comm/watchdog.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace tessera::comm {

Watchdog::Watchdog(std::string name, Health health, OnFailure on_failure, absl::Duration interval)
    : name_(std::move(name)), health_(std::move(health)), on_failure_(std::move(on_failure)), interval_(interval) {
  thread_ = std::thread([this] { Run(); });
}

Watchdog::~Watchdog() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

absl::Status Watchdog::Watch(std::string what, absl::Duration timeout, Poll done) {
  absl::MutexLock lock(&mu_);
  if (!failure_.ok()) return failure_;
  entries_.push_back(Entry{std::move(what), absl::Now() + timeout, timeout, std::move(done)});
  return absl::OkStatus();
}

absl::Status Watchdog::status() const {
  absl::MutexLock lock(&mu_);
  return failure_;
}

size_t Watchdog::outstanding() const {
  absl::MutexLock lock(&mu_);
  return entries_.size();
}

absl::Status Watchdog::Check(absl::Time now) {
  // Polls run without the lock (a CUDA query may take a while); entries added meanwhile wait for the next pass.
  std::vector<Entry> entries;
  {
    absl::MutexLock lock(&mu_);
    entries.swap(entries_);
  }
  absl::Status failure;
  std::vector<Entry> keep;
  for (Entry& e : entries) {
    if (!failure.ok()) break;
    absl::StatusOr<bool> finished = e.done();
    if (!finished.ok()) {
      failure = absl::Status(finished.status().code(),
                             absl::StrFormat("%s: %s failed: %s", name_, e.what, finished.status().message()));
    } else if (!*finished) {
      if (now > e.deadline) {
        failure = absl::DeadlineExceededError(absl::StrFormat(
            "%s: %s did not finish within %s (a peer may be stopped, hung or gone)", name_, e.what,
            absl::FormatDuration(e.timeout)));
      } else {
        keep.push_back(std::move(e));
      }
    }
  }
  if (failure.ok() && health_) {
    absl::Status h = health_();
    if (!h.ok()) failure = absl::Status(h.code(), absl::StrCat(name_, ": ", h.message()));
  }
  absl::MutexLock lock(&mu_);
  if (!failure.ok()) {
    entries_.clear();
    return failure;
  }
  for (Entry& e : entries_) keep.push_back(std::move(e));  // watched while we polled
  entries_.swap(keep);
  return absl::OkStatus();
}

void Watchdog::Run() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      mu_.AwaitWithTimeout(absl::Condition(&stop_), interval_);
      if (stop_) return;
      if (!failure_.ok()) continue;  // failed: nothing more to watch; wait for the destructor
    }
    absl::Status failure = Check(absl::Now());
    if (failure.ok()) continue;
    {
      absl::MutexLock lock(&mu_);
      failure_ = failure;
    }
    if (on_failure_) on_failure_(failure);
  }
}

}  // namespace tessera::comm
