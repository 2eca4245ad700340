// The NCCL backend's watchdog on a real GPU (world size 1): a collective queued behind work that holds the stream
// past the collective's deadline is reported and the communicator aborted, while the host never waited for it
// (Work::Wait() only orders streams). Needs a GPU; built whenever CUDA and NCCL are.
#include <cuda_runtime.h>

#include <gtest/gtest.h>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "tessera/comm/nccl/nccl_communicator.h"

namespace tessera::comm {
namespace {

void CUDART_CB SleepOnStream(void* seconds) { absl::SleepFor(absl::Seconds(*static_cast<double*>(seconds))); }

class NcclWatchdogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) GTEST_SKIP() << "no CUDA device";
    ASSERT_EQ(cudaSetDevice(0), cudaSuccess);
    auto id = NcclCommunicator::NewUniqueId();
    ASSERT_TRUE(id.ok()) << id.status();
    auto comm = NcclCommunicator::Create(0, 1, *id, 0, absl::Seconds(60));
    ASSERT_TRUE(comm.ok()) << comm.status();
    comm_ = std::move(comm).value();
    ASSERT_EQ(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), cudaSuccess);
    ASSERT_EQ(cudaMalloc(&buf_, 1024 * sizeof(float)), cudaSuccess);
  }
  void TearDown() override {
    if (stream_ != nullptr) {
      cudaStreamSynchronize(stream_);
      cudaStreamDestroy(stream_);
    }
    comm_.reset();
    if (buf_ != nullptr) cudaFree(buf_);
  }
  BufferView View() const { return BufferView{buf_, DType::kFloat32, 1024, Device::CUDA(0)}; }

  std::unique_ptr<NcclCommunicator> comm_;
  cudaStream_t stream_ = nullptr;
  float* buf_ = nullptr;
};

TEST_F(NcclWatchdogTest, HealthyCollectiveIsNotReported) {
  CollectiveOptions o;
  o.stream = stream_;
  o.timeout = absl::Seconds(5);
  auto work = comm_->AllReduce(View(), ReduceOp::kSum, o);
  ASSERT_TRUE(work.ok()) << work.status();
  ASSERT_TRUE((*work)->Wait().ok());
  ASSERT_EQ(cudaStreamSynchronize(stream_), cudaSuccess);
  absl::SleepFor(absl::Milliseconds(300));
  EXPECT_FALSE(comm_->aborted());
}

TEST_F(NcclWatchdogTest, CollectivePastItsDeadlineIsAbortedWithoutAHostWait) {
  static double hold_s = 4.0;  // the stream is held this long; the collective's deadline is 1 s
  ASSERT_EQ(cudaLaunchHostFunc(stream_, SleepOnStream, &hold_s), cudaSuccess);
  comm_->set_step(7);
  CollectiveOptions o;
  o.stream = stream_;
  o.timeout = absl::Seconds(1);
  o.tag = "forward all-gather of unit 'layers.3'";
  const absl::Time start = absl::Now();
  auto work = comm_->AllReduce(View(), ReduceOp::kSum, o);
  ASSERT_TRUE(work.ok()) << work.status();
  ASSERT_TRUE((*work)->Wait().ok());  // orders the stream; the host goes on
  while (!comm_->aborted() && absl::Now() - start < absl::Seconds(3)) absl::SleepFor(absl::Milliseconds(10));
  const absl::Duration latency = absl::Now() - start;
  ASSERT_TRUE(comm_->aborted()) << "no abort " << absl::FormatDuration(latency) << " after a 1 s deadline";
  EXPECT_GE(latency, absl::Seconds(1));
  auto later = comm_->AllReduce(View(), ReduceOp::kSum, o);
  ASSERT_FALSE(later.ok());
  const std::string msg(later.status().message());
  for (const char* part : {"rank 0 of 1", "step 7", "forward all-gather of unit 'layers.3'", "all_reduce",
                           "did not finish within 1s", "aborted"}) {
    EXPECT_TRUE(absl::StrContains(msg, part)) << part << " not in: " << msg;
  }
  std::printf("watchdog: deadline 1 s, aborted after %s: %s\n", absl::FormatDuration(latency).c_str(), msg.c_str());
}

TEST_F(NcclWatchdogTest, TimeoutCapTightensEveryLaterCollective) {
  static double hold_s = 3.0;
  comm_->set_timeout_cap(absl::Milliseconds(500));  // the training timeout, set after the first step
  ASSERT_EQ(cudaLaunchHostFunc(stream_, SleepOnStream, &hold_s), cudaSuccess);
  CollectiveOptions o;
  o.stream = stream_;
  o.timeout = absl::Minutes(10);  // the call's own (init-time) bound
  auto work = comm_->AllReduce(View(), ReduceOp::kSum, o);
  ASSERT_TRUE(work.ok()) << work.status();
  ASSERT_TRUE((*work)->Wait().ok());
  const absl::Time start = absl::Now();
  while (!comm_->aborted() && absl::Now() - start < absl::Seconds(2.5)) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_TRUE(comm_->aborted());
}

}  // namespace
}  // namespace tessera::comm
