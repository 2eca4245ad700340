// CUDA kernels (through the public kernels.h entry points, which dispatch CUDA buffers to cuda.cu) against the CPU
// implementation and float64 references, and NcclCommunicator at world size 1. Fresh random inputs each run (the
// seed is printed on failure), NaN-poisoned outputs, uneven sizes, misaligned pointers (so both the vectorised and
// the scalar paths run). Everything that needs a GPU is skipped where none is visible.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "tessera/comm/nccl/nccl_communicator.h"
#include "tessera/core/dtype.h"
#include "tessera/kernels/cpu.h"
#include "tessera/kernels/kernels.h"
#include "tessera/shard/plan.h"
#include "testing/kernel_test.h"
#include "testing/test_buffer.h"

namespace tessera::kernels {
namespace {

using ::tessera::testing::Epsilon;
using ::tessera::testing::kAllDTypes;
using ::tessera::testing::MinSubnormal;
using ::tessera::testing::Close;
using ::tessera::testing::TestBuffer;

bool HasCudaDevice() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

// A device copy of a TestBuffer, `misalign` elements past a 256-byte aligned allocation.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(const TestBuffer& host, int64_t misalign = 0) : dtype_(host.dtype()), count_(host.count()) {
    const int64_t es = ElementSize(dtype_);
    EXPECT_EQ(cudaMalloc(&base_, (count_ + misalign) * es + 16), cudaSuccess);
    data_ = static_cast<char*>(base_) + misalign * es;
    TestBuffer copy = host;
    EXPECT_EQ(cudaMemcpy(data_, copy.view().data, count_ * es, cudaMemcpyHostToDevice), cudaSuccess);
  }
  ~DeviceBuffer() { cudaFree(base_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  BufferView view() const { return {data_, dtype_, count_, Device::CUDA(0)}; }
  // Synchronous on the legacy default stream, so it follows every kernel queued there.
  TestBuffer ToHost() const {
    TestBuffer h(dtype_, count_);
    EXPECT_EQ(cudaMemcpy(h.view().data, data_, count_ * ElementSize(dtype_), cudaMemcpyDeviceToHost), cudaSuccess);
    return h;
  }

 private:
  DType dtype_;
  int64_t count_;
  void* base_ = nullptr;
  void* data_ = nullptr;
};

class CudaKernelsTest : public ::tessera::testing::SeededKernelTest {
 protected:
  void SetUp() override {
    if (!HasCudaDevice()) GTEST_SKIP() << "no CUDA device visible";
    SeededKernelTest::SetUp();
  }
};

// Uneven on purpose; the big ones span several kTile (16384) tiles and the vector paths.
const std::vector<std::vector<int64_t>> kLayouts = {
    {7, 1, 0, 13, 64, 3}, {1}, {0}, {5, 5, 5}, {1000, 17, 2}, {}, {70001, 3, 40000, 0, 5},
};

// CopyIn on the GPU, checked against cpu::CopyIn (which also zeroes the padding and the row tail) and against the
// contract computed here in float64.
void CheckCopyIn(std::vector<TestBuffer>& params, const shard::ShardPlan& plan, int64_t S, double scale, DType out_t,
                 int64_t misalign) {
  const int world = plan.world();
  std::vector<BufferView> host_views;
  std::vector<std::unique_ptr<DeviceBuffer>> dev;
  std::vector<BufferView> dev_views;
  for (size_t i = 0; i < params.size(); ++i) {
    host_views.push_back(params[i].view());
    dev.push_back(std::make_unique<DeviceBuffer>(params[i], (misalign + i) % 2));
    dev_views.push_back(dev.back()->view());
  }
  TestBuffer cpu_dst(out_t, world * S);
  cpu_dst.Poison();
  ASSERT_TRUE(cpu::CopyIn(host_views, plan, S, scale, cpu_dst.view(), nullptr).ok());
  DeviceBuffer dst(cpu_dst, misalign);  // poisoned too
  const absl::Status s = CopyIn(dev_views, plan, S, scale, dst.view());
  ASSERT_TRUE(s.ok()) << s;
  const TestBuffer got = dst.ToHost();
  std::vector<double> want(static_cast<size_t>(world * S), 0.0);
  for (size_t i = 0; i < params.size(); ++i) {
    for (int r = 0; r < world; ++r) {
      for (int64_t j = 0; j < plan.LocalNumel(i, r); ++j) {
        want[r * S + plan.slot(i).shard_offset + j] = params[i].Get(plan.LocalStart(i, r) + j) * scale;
      }
    }
  }
  for (int64_t e = 0; e < world * S; ++e) {
    ASSERT_TRUE(Close(got.Get(e), want[e], out_t)) << "vs float64, flat index " << e;
    ASSERT_TRUE(Close(got.Get(e), cpu_dst.Get(e), out_t)) << "vs cpu::CopyIn, flat index " << e;
  }
}

TEST_F(CudaKernelsTest, CopyInMatchesCpuAndReference) {
  SCOPED_TRACE(Seed());
  for (int world = 1; world <= 4; ++world) {
    for (const auto& numels : kLayouts) {
      auto plan = shard::ShardPlan::Create(numels, world);
      ASSERT_TRUE(plan.ok()) << plan.status();
      for (size_t k = 0; k <= numels.size(); ++k) {
        for (int64_t extra : {0, 5}) {
          for (DType out_t : kAllDTypes) {
            const int64_t S = plan->shard_numel() + extra;
            SCOPED_TRACE(::testing::Message() << "world " << world << " params " << k << "/" << numels.size()
                                            << " S " << S << " out " << DTypeName(out_t));
            std::vector<TestBuffer> params;
            for (size_t i = 0; i < k; ++i) params.push_back(Random(RandomDType(), numels[i], -4, 4));
            CheckCopyIn(params, *plan, S, (k + extra) % 2 ? 1.0 / world : 1.0, out_t, (k + world) % 2);
          }
        }
      }
    }
  }
}

void CheckCopyOut(const TestBuffer& src, const shard::ShardPlan& plan, int64_t S, std::vector<TestBuffer>& params,
                  int64_t misalign) {
  std::vector<BufferView> host_views, dev_views;
  std::vector<std::unique_ptr<DeviceBuffer>> dev;
  for (size_t i = 0; i < params.size(); ++i) {
    params[i].Poison();
    dev.push_back(std::make_unique<DeviceBuffer>(params[i], (misalign + i) % 2));
    dev_views.push_back(dev.back()->view());
    host_views.push_back(params[i].view());
  }
  TestBuffer src_copy = src;
  ASSERT_TRUE(cpu::CopyOut(src_copy.view(), plan, S, host_views, nullptr).ok());
  DeviceBuffer dsrc(src, misalign);
  const absl::Status s = CopyOut(dsrc.view(), plan, S, dev_views);
  ASSERT_TRUE(s.ok()) << s;
  for (size_t i = 0; i < params.size(); ++i) {
    const TestBuffer got = dev[i]->ToHost();
    const int64_t chunk = plan.slot(i).chunk;
    for (int64_t e = 0; e < got.count(); ++e) {
      const double want = src.Get((e / chunk) * S + plan.slot(i).shard_offset + e % chunk);
      ASSERT_TRUE(Close(got.Get(e), want, got.dtype())) << "vs float64, param " << i << " element " << e;
      ASSERT_TRUE(Close(got.Get(e), params[i].Get(e), got.dtype())) << "vs cpu::CopyOut, param " << i << " element " << e;
    }
  }
}

TEST_F(CudaKernelsTest, CopyOutMatchesCpuAndReference) {
  SCOPED_TRACE(Seed());
  for (int world = 1; world <= 4; ++world) {
    for (const auto& numels : kLayouts) {
      auto plan = shard::ShardPlan::Create(numels, world);
      ASSERT_TRUE(plan.ok());
      for (DType src_t : kAllDTypes) {
        for (int64_t extra : {0, 3}) {
          const int64_t S = plan->shard_numel() + extra;
          SCOPED_TRACE(::testing::Message() << "world " << world << " S " << S << " src " << DTypeName(src_t));
          const TestBuffer src = Random(src_t, world * S, -4, 4);  // padding holds garbage that must not leak
          std::vector<TestBuffer> params;
          for (int64_t n : numels) params.emplace_back(RandomDType(), n);
          CheckCopyOut(src, *plan, S, params, (world + extra) % 2);
        }
      }
    }
  }
}

// More parameters than one launch's table holds (cuda.cu: kMaxParamsPerLaunch = 64), so several launches share
// each row; all dtypes mixed.
TEST_F(CudaKernelsTest, ManyParametersTakeSeveralLaunches) {
  SCOPED_TRACE(Seed());
  std::vector<int64_t> numels;
  for (int i = 0; i < 150; ++i) numels.push_back(std::uniform_int_distribution<int64_t>(0, 300)(rng_));
  for (int world : {1, 3}) {
    auto plan = shard::ShardPlan::Create(numels, world);
    ASSERT_TRUE(plan.ok());
    for (size_t k : {size_t{64}, size_t{65}, size_t{150}}) {
      std::vector<TestBuffer> params;
      for (size_t i = 0; i < k; ++i) params.push_back(Random(RandomDType(), numels[i]));
      CheckCopyIn(params, *plan, plan->shard_numel() + 2, 0.5, DType::kFloat32, 0);
      CheckCopyOut(Random(DType::kBFloat16, world * plan->shard_numel()), *plan, plan->shard_numel(), params, 1);
    }
  }
}

TEST_F(CudaKernelsTest, CastEveryPairBitwiseLikeCpu) {
  SCOPED_TRACE(Seed());
  const double specials[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, 1e6, -7e4, 3e-8, 1.0 / 3};
  for (DType from : kAllDTypes) {
    for (DType to : kAllDTypes) {
      for (int64_t n : {0, 1, 7, 1001, 65536 + 5}) {
        for (int mis : {0, 1, 2, 3}) {  // src and dst misaligned alike (vector path) and differently (scalar)
          TestBuffer src = Random(from, n + 9, -1000, 1000);
          for (int i = 0; i < 9; ++i) src.Set(n + i, specials[i]);
          TestBuffer cpu_dst = Poisoned(to, n + 9);
          ASSERT_TRUE(cpu::Cast(src.view(), cpu_dst.view(), nullptr).ok());
          DeviceBuffer dsrc(src, mis & 1), ddst(Poisoned(to, n + 9), mis >> 1);
          ASSERT_TRUE(Cast(dsrc.view(), ddst.view()).ok());
          const TestBuffer got = ddst.ToHost();
          for (int64_t e = 0; e < n + 9; ++e) {
            const double g = got.Get(e), c = cpu_dst.Get(e);
            // Both round to nearest even through float: the results agree exactly (NaN payloads aside).
            ASSERT_TRUE((std::isnan(g) && std::isnan(c)) || g == c)
                << DTypeName(from) << " -> " << DTypeName(to) << " n " << n << " element " << e << ": " << g
                << " vs cpu " << c << " (input " << src.Get(e) << ")";
          }
        }
      }
    }
  }
}

// torch.optim.AdamW in float64 (the same reference cpu_kernels_test uses).
// m_abs is exp_avg's sum with every term made positive: the scale of float32's rounding error in exp_avg, which
// can cancel to far below its terms (4 gradients of mixed sign), where a tolerance relative to |m| alone is too tight
// (seen on an H200, whose FMA-contracted update differs from the float64 value by 9e-9 at m = 6e-4).
struct RefAdamW {
  std::vector<double> p, m, v, m_abs;
  void Step(const std::vector<double>& g, const AdamWConfig& c) {
    m_abs.resize(p.size(), 0.0);
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1 - c.lr * c.weight_decay;
      m[i] = c.beta1 * m[i] + (1 - c.beta1) * g[i];
      m_abs[i] = c.beta1 * m_abs[i] + (1 - c.beta1) * std::fabs(g[i]);
      v[i] = c.beta2 * v[i] + (1 - c.beta2) * g[i] * g[i];
      const double m_hat = m[i] / (1 - std::pow(c.beta1, c.step));
      const double v_hat = v[i] / (1 - std::pow(c.beta2, c.step));
      p[i] -= c.lr * m_hat / (std::sqrt(v_hat) + c.eps);
    }
  }
};

TEST_F(CudaKernelsTest, FusedAdamWMatchesReferenceAndCpu) {
  SCOPED_TRACE(Seed());
  for (DType p_t : {DType::kFloat32, DType::kFloat64}) {
    for (DType g_t : kAllDTypes) {
      for (int64_t n : {1, 5, 1037, 100003}) {
        for (int mis : {0, 1, 2}) {  // 2: the gradient misaligned against the rest (scalar path)
          SCOPED_TRACE(::testing::Message() << DTypeName(p_t) << " grad " << DTypeName(g_t) << " n " << n << " mis "
                                          << mis);
          TestBuffer p = Random(p_t, n, -2, 2), m(p_t, n), v(p_t, n);  // zero state, as torch starts
          TestBuffer cp = p, cm = m, cv = v;
          const int64_t pm = mis == 1 ? 1 : 0;
          DeviceBuffer dp(p, pm), dm(m, pm), dv(v, pm);
          RefAdamW ref{p.ToDoubles(), std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
          AdamWConfig c;
          c.lr = 1e-2;
          c.beta1 = 0.9;
          c.beta2 = 0.95;
          c.weight_decay = 0.1;
          for (int64_t step = 1; step <= 4; ++step) {
            c.step = step;
            TestBuffer g = Random(g_t, n, -1, 1);
            DeviceBuffer dg(g, mis >= 1 ? 1 : 0);
            ASSERT_TRUE(FusedAdamW(dp.view(), dg.view(), dm.view(), dv.view(), c).ok());
            ASSERT_TRUE(cpu::FusedAdamW(cp.view(), g.view(), cm.view(), cv.view(), c, nullptr).ok());
            ref.Step(g.ToDoubles(), c);
          }
          const TestBuffer gp = dp.ToHost(), gm = dm.ToHost(), gv = dv.ToHost();
          const double rtol = p_t == DType::kFloat32 ? 4e-6 : 1e-13;
          for (int64_t i = 0; i < n; ++i) {
            ASSERT_NEAR(gp.Get(i), ref.p[i], rtol * (std::fabs(ref.p[i]) + c.lr)) << "param " << i;
            ASSERT_NEAR(gm.Get(i), ref.m[i], rtol * (std::fabs(ref.m[i]) + ref.m_abs[i]) + 1e-12) << "exp_avg " << i;
            ASSERT_NEAR(gv.Get(i), ref.v[i], rtol * std::fabs(ref.v[i]) + 1e-12) << "exp_avg_sq " << i;
            ASSERT_NEAR(gp.Get(i), cp.Get(i), rtol * (std::fabs(cp.Get(i)) + c.lr)) << "param vs cpu " << i;
          }
        }
      }
    }
  }
}

TEST_F(CudaKernelsTest, SquaredNormAccumulatesDeterministically) {
  SCOPED_TRACE(Seed());
  for (DType x_t : kAllDTypes) {
    for (DType out_t : {DType::kFloat32, DType::kFloat64}) {
      for (int64_t n : {0, 1, 4095, 4096, 10001, (1 << 20) + 3}) {
        SCOPED_TRACE(::testing::Message() << DTypeName(x_t) << " -> " << DTypeName(out_t) << " n " << n);
        TestBuffer x = Random(x_t, n, -3, 3);
        TestBuffer out(out_t, 1);
        out.Set(0, 0.5);  // accumulates onto what is there
        TestBuffer cpu_out = out;
        ASSERT_TRUE(cpu::SquaredNormAccumulate(x.view(), cpu_out.view(), nullptr).ok());
        DeviceBuffer dx(x, n % 2), d1(out), d2(out);
        ASSERT_TRUE(SquaredNormAccumulate(dx.view(), d1.view()).ok());
        ASSERT_TRUE(SquaredNormAccumulate(dx.view(), d2.view()).ok());
        double want = 0.5;
        for (double e : x.ToDoubles()) want += e * e;
        const double got = d1.ToHost().Get(0);
        const double rtol = (x_t == DType::kFloat64 && out_t == DType::kFloat64) ? 1e-13 : 1e-5;
        EXPECT_NEAR(got, want, rtol * want);
        EXPECT_NEAR(got, cpu_out.Get(0), 2 * rtol * want);
        EXPECT_EQ(got, d2.ToHost().Get(0)) << "two runs on the same input must agree bitwise";
      }
    }
  }
}

// Work queued on a caller's (non-blocking) stream runs there, not on the default stream.
TEST_F(CudaKernelsTest, QueuesOnTheGivenStream) {
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const TestBuffer src = Random(DType::kFloat32, 1 << 20);
  DeviceBuffer dsrc(src), ddst(Poisoned(DType::kBFloat16, 1 << 20));
  ASSERT_TRUE(Cast(dsrc.view(), ddst.view(), stream).ok());
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  const TestBuffer got = ddst.ToHost();
  for (int64_t i = 0; i < got.count(); i += 4097) ASSERT_TRUE(Close(got.Get(i), src.Get(i), DType::kBFloat16)) << i;
  cudaStreamDestroy(stream);
}

}  // namespace
}  // namespace tessera::kernels

// ---- NcclCommunicator at world size 1 ----------------------------------------------------------------------------
namespace tessera::comm {
namespace {

using ::tessera::kernels::DeviceBuffer;
using ::tessera::testing::kAllDTypes;
using ::tessera::testing::TestBuffer;

TEST(NcclCommunicatorCreateTest, RejectsBadArgumentsBeforeTouchingTheGpu) {
  EXPECT_EQ(NcclCommunicator::Create(0, 1, "too short", 0).status().code(), absl::StatusCode::kInvalidArgument);
  const std::string id(128, '\0');
  EXPECT_EQ(NcclCommunicator::Create(1, 1, id, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(NcclCommunicator::Create(0, 0, id, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(NcclCommunicator::Create(0, 1, id, 1 << 20).status().code(), absl::StatusCode::kInvalidArgument);
}

class NcclCommunicatorTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!kernels::HasCudaDevice()) GTEST_SKIP() << "no CUDA device visible";
    rng_.seed(tessera::testing::FreshSeed());
    auto id = NcclCommunicator::NewUniqueId();
    ASSERT_TRUE(id.ok()) << id.status();
    auto comm = NcclCommunicator::Create(0, 1, *id, 0, absl::Seconds(60));
    ASSERT_TRUE(comm.ok()) << comm.status();
    comm_ = std::move(*comm);
  }
  TestBuffer Random(DType t, int64_t n) {
    TestBuffer b(t, n);
    b.FillRandom(rng_, -5, 5);
    return b;
  }
  static TestBuffer Poisoned(DType t, int64_t n) {
    TestBuffer b(t, n);
    b.Poison();
    return b;
  }
  // Issues, then Wait()s (orders the default stream after the group) and host-synchronises the default stream.
  absl::Status Run(std::vector<Collective> ops) {
    auto work = comm_->Issue(ops, {});
    if (!work.ok()) return work.status();
    absl::Status s = (*work)->Wait();
    if (s.ok() && cudaDeviceSynchronize() != cudaSuccess) s = absl::InternalError("cudaDeviceSynchronize");
    return s;
  }
  static void ExpectSame(const TestBuffer& got, const TestBuffer& want) {
    ASSERT_EQ(got.count(), want.count());
    for (int64_t i = 0; i < got.count(); ++i) ASSERT_EQ(got.Get(i), want.Get(i)) << "element " << i;
  }

  std::mt19937_64 rng_;
  std::unique_ptr<NcclCommunicator> comm_;
};

TEST_F(NcclCommunicatorTest, EveryCollectiveIsTheIdentityAtWorldOne) {
  EXPECT_EQ(comm_->size(), 1);
  EXPECT_EQ(comm_->backend_name(), "nccl");
  for (DType t : kAllDTypes) {
    SCOPED_TRACE(DTypeName(t));
    const TestBuffer in = Random(t, 1001);
    DeviceBuffer din(in), dout(Poisoned(t, 1001));
    ASSERT_TRUE(Run({Collective::AllGather(din.view(), dout.view())}).ok());
    ExpectSame(dout.ToHost(), in);
    for (ReduceOp op : {ReduceOp::kSum, ReduceOp::kAvg}) {
      DeviceBuffer rs_out(Poisoned(t, 1001));
      ASSERT_TRUE(Run({Collective::ReduceScatter(din.view(), rs_out.view(), op)}).ok());
      ExpectSame(rs_out.ToHost(), in);
      DeviceBuffer ar(in);
      ASSERT_TRUE(Run({Collective::AllReduce(ar.view(), op)}).ok());
      ExpectSame(ar.ToHost(), in);
    }
    DeviceBuffer bc(in);
    ASSERT_TRUE(Run({Collective::Broadcast(bc.view(), 0)}).ok());
    ExpectSame(bc.ToHost(), in);
  }
}

TEST_F(NcclCommunicatorTest, FusedGroupAndEmptyGroup) {
  const TestBuffer a = Random(DType::kBFloat16, 777), b = Random(DType::kFloat32, 333);
  DeviceBuffer da(a), dag(Poisoned(DType::kBFloat16, 777)), db(b);
  ASSERT_TRUE(Run({Collective::AllGather(da.view(), dag.view()), Collective::AllReduce(db.view(), ReduceOp::kSum)})
                  .ok());
  ExpectSame(dag.ToHost(), a);
  ExpectSame(db.ToHost(), b);
  EXPECT_TRUE(Run({}).ok());
}

TEST_F(NcclCommunicatorTest, WaitOrdersTheCallersStreamAndSynchronizeBlocks) {
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  const TestBuffer in = Random(DType::kFloat32, 1 << 20);
  DeviceBuffer din(in), dout(Poisoned(DType::kFloat32, 1 << 20)), dcopy(Poisoned(DType::kFloat64, 1 << 20));
  CollectiveOptions options;
  options.stream = stream;
  auto work = comm_->AllGather(din.view(), dout.view(), options);
  ASSERT_TRUE(work.ok()) << work.status();
  ASSERT_TRUE((*work)->Wait().ok());
  // Queued on `stream` after Wait(): must see the gathered data without any host synchronisation in between.
  ASSERT_TRUE(kernels::Cast(dout.view(), dcopy.view(), stream).ok());
  auto* nccl_work = dynamic_cast<NcclWork*>(work->get());
  ASSERT_NE(nccl_work, nullptr);
  EXPECT_TRUE(nccl_work->Synchronize().ok());
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  ExpectSame(dcopy.ToHost(), in);
  EXPECT_TRUE(comm_->Synchronize(absl::Seconds(30)).ok());
  EXPECT_TRUE(comm_->Barrier(absl::Seconds(30)).ok());
  EXPECT_FALSE(comm_->aborted());
  cudaStreamDestroy(stream);
}

TEST_F(NcclCommunicatorTest, RejectsBadCollectivesAndStaysUsable) {
  TestBuffer host = Random(DType::kFloat32, 8);
  DeviceBuffer d8(host), d7(Random(DType::kFloat32, 7)), dh(Random(DType::kFloat16, 8));
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  EXPECT_EQ(comm_->Issue({Collective::AllGather(d8.view(), d7.view())}, {}).status().code(), kInvalid);
  EXPECT_EQ(comm_->Issue({Collective::ReduceScatter(d8.view(), dh.view(), ReduceOp::kSum)}, {}).status().code(),
            kInvalid);  // dtypes differ
  EXPECT_EQ(comm_->Issue({Collective::Broadcast(d8.view(), 1)}, {}).status().code(), kInvalid);
  const absl::Status on_cpu = comm_->Issue({Collective::AllReduce(host.view(), ReduceOp::kSum)}, {}).status();
  EXPECT_EQ(on_cpu.code(), kInvalid);
  const std::string message(on_cpu.message());
  EXPECT_NE(message.find("cpu"), std::string::npos) << message;  // names where the buffer is and where it must be
  EXPECT_NE(message.find("cuda:0"), std::string::npos) << message;
  BufferView elsewhere = d8.view();
  elsewhere.device = Device::CUDA(1);
  EXPECT_EQ(comm_->Issue({Collective::AllReduce(elsewhere, ReduceOp::kSum)}, {}).status().code(), kInvalid);
  // A rejected op in a group rejects the whole group before anything is queued.
  EXPECT_EQ(comm_->Issue({Collective::AllReduce(d8.view(), ReduceOp::kSum), Collective::Broadcast(d8.view(), 3)}, {})
                .status()
                .code(),
            kInvalid);
  ASSERT_TRUE(Run({Collective::AllReduce(d8.view(), ReduceOp::kAvg)}).ok());
  ExpectSame(d8.ToHost(), host);
}

}  // namespace
}  // namespace tessera::comm
