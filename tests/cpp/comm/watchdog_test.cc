// The collective watchdog (comm/watchdog.h) with plain closures standing in for CUDA events and NCCL's
// asynchronous error: deadlines, errors, the one failure callback, and what later calls see.
#include "tessera/comm/watchdog.h"

#include <atomic>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"

namespace tessera::comm {
namespace {

struct Failures {
  std::atomic<int> calls{0};
  absl::Notification first;
  absl::Status status;  // written before `first` is notified
  Watchdog::OnFailure callback() {
    return [this](const absl::Status& s) {
      if (calls.fetch_add(1) == 0) {
        status = s;
        first.Notify();
      }
    };
  }
};

TEST(WatchdogTest, FinishedOperationsLeaveAndNothingFails) {
  Failures f;
  Watchdog dog("comm (rank 0 of 2)", nullptr, f.callback(), absl::Milliseconds(5));
  auto done = std::make_shared<std::atomic<bool>>(false);
  ASSERT_TRUE(dog.Watch("all_gather", absl::Seconds(5), [done]() -> absl::StatusOr<bool> { return done->load(); }).ok());
  EXPECT_EQ(dog.outstanding(), 1u);
  done->store(true);
  const absl::Time until = absl::Now() + absl::Seconds(2);
  while (dog.outstanding() != 0 && absl::Now() < until) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_EQ(dog.outstanding(), 0u);
  EXPECT_TRUE(dog.status().ok());
  EXPECT_EQ(f.calls.load(), 0);
}

TEST(WatchdogTest, MissedDeadlineFailsOnceWithWhereAndIsKept) {
  Failures f;
  Watchdog dog("NCCL communicator (rank 3 of 8, cuda:3)", nullptr, f.callback(), absl::Milliseconds(10));
  const absl::Time start = absl::Now();
  ASSERT_TRUE(dog.Watch("all_gather of 4096 elements (bfloat16) on rank 3 of 8, step 12, forward all-gather of "
                        "unit 'layers.0'",
                        absl::Milliseconds(200), []() -> absl::StatusOr<bool> { return false; })
                  .ok());
  ASSERT_TRUE(dog.Watch("a second one", absl::Seconds(100), []() -> absl::StatusOr<bool> { return false; }).ok());
  ASSERT_TRUE(f.first.WaitForNotificationWithTimeout(absl::Seconds(5)));
  const absl::Duration latency = absl::Now() - start;
  EXPECT_GE(latency, absl::Milliseconds(200));
  EXPECT_LT(latency, absl::Seconds(2));  // the deadline plus a poll interval, with room for a loaded machine
  EXPECT_EQ(f.status.code(), absl::StatusCode::kDeadlineExceeded);
  for (const char* part : {"NCCL communicator (rank 3 of 8, cuda:3)", "step 12", "forward all-gather of unit 'layers.0'",
                           "did not finish within 200ms"}) {
    EXPECT_TRUE(absl::StrContains(f.status.message(), part)) << part << " not in: " << f.status;
  }
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(f.calls.load(), 1);  // once, though a second operation was outstanding
  EXPECT_EQ(dog.outstanding(), 0u);
  EXPECT_EQ(dog.status(), f.status);
  absl::Status later = dog.Watch("after the failure", absl::Seconds(1), []() -> absl::StatusOr<bool> { return true; });
  EXPECT_EQ(later, f.status);
}

TEST(WatchdogTest, PollErrorIsTheFailure) {
  Failures f;
  Watchdog dog("comm", nullptr, f.callback(), absl::Milliseconds(5));
  ASSERT_TRUE(dog.Watch("reduce_scatter", absl::Seconds(100), []() -> absl::StatusOr<bool> {
                   return absl::UnavailableError("peer 2 closed the connection");
                 }).ok());
  ASSERT_TRUE(f.first.WaitForNotificationWithTimeout(absl::Seconds(5)));
  EXPECT_EQ(f.status.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(f.status.message(), "reduce_scatter failed: peer 2 closed the connection")) << f.status;
}

TEST(WatchdogTest, HealthErrorFailsEvenWithNothingWatched) {
  Failures f;
  std::atomic<bool> broken{false};
  Watchdog dog(
      "NCCL communicator (rank 0 of 2, cuda:0)",
      [&broken]() { return broken ? absl::UnavailableError("asynchronous NCCL error: remote process exited") : absl::OkStatus(); },
      f.callback(), absl::Milliseconds(5));
  absl::SleepFor(absl::Milliseconds(30));
  EXPECT_EQ(f.calls.load(), 0);
  broken = true;
  ASSERT_TRUE(f.first.WaitForNotificationWithTimeout(absl::Seconds(5)));
  EXPECT_EQ(f.status.code(), absl::StatusCode::kUnavailable);
  EXPECT_TRUE(absl::StrContains(f.status.message(), "NCCL communicator (rank 0 of 2, cuda:0): asynchronous NCCL error"))
      << f.status;
}

TEST(WatchdogTest, StopsPromptlyWithOperationsOutstanding) {
  const absl::Time start = absl::Now();
  {
    Watchdog dog("comm", nullptr, nullptr, absl::Seconds(30));  // a long interval: the destructor must wake it
    ASSERT_TRUE(dog.Watch("x", absl::Hours(1), []() -> absl::StatusOr<bool> { return false; }).ok());
  }
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
}

}  // namespace
}  // namespace tessera::comm
