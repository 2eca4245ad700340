// CPU kernels against float64 references written here from the contracts in kernels.h (not from cpu.cc), on fresh
// random inputs each run (the seed is printed on failure) and NaN-poisoned outputs.
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "tessera/core/dtype.h"
#include "tessera/kernels/kernels.h"
#include "tessera/shard/plan.h"
#include "testing/kernel_test.h"
#include "testing/test_buffer.h"

namespace tessera::kernels {
namespace {

using ::tessera::testing::Epsilon;
using ::tessera::testing::kAllDTypes;
using ::tessera::testing::MinSubnormal;
using ::tessera::testing::TestBuffer;

using CpuKernelsTest = ::tessera::testing::SeededKernelTest;
using ::tessera::testing::Close;

const std::vector<std::vector<int64_t>> kLayouts = {
    {7, 1, 0, 13, 64, 3}, {1}, {0}, {5, 5, 5}, {1000, 17, 2}, {},
};

TEST_F(CpuKernelsTest, CopyInMatchesReference) {
  SCOPED_TRACE(Seed());
  for (int world = 1; world <= 4; ++world) {
    for (const auto& numels : kLayouts) {
      auto plan = shard::ShardPlan::Create(numels, world);
      ASSERT_TRUE(plan.ok()) << plan.status();
      // Every prefix of the plan, an exact and a padded shard size, every output dtype, mixed parameter dtypes.
      for (size_t k = 0; k <= numels.size(); ++k) {
        for (int64_t extra : {0, 5}) {
          for (DType out_t : kAllDTypes) {
            const double scale = (k + extra) % 2 ? 1.0 / world : 1.0;
            const int64_t S = plan->shard_numel() + extra;
            std::vector<TestBuffer> params;
            std::vector<BufferView> views;
            for (size_t i = 0; i < k; ++i) params.push_back(Random(RandomDType(), numels[i]));
            for (auto& p : params) views.push_back(p.view());
            TestBuffer dst = Poisoned(out_t, world * S);
            ASSERT_TRUE(CopyIn(views, *plan, S, scale, dst.view()).ok());
            std::vector<double> want(static_cast<size_t>(world * S), 0.0);  // padding reads as zero
            int64_t off = 0;
            for (size_t i = 0; i < k; ++i) {
              const int64_t chunk = (numels[i] + world - 1) / world;
              for (int r = 0; r < world; ++r) {
                for (int64_t j = 0; j < chunk && r * chunk + j < numels[i]; ++j) {
                  want[r * S + off + j] = params[i].Get(r * chunk + j) * scale;
                }
              }
              off += chunk;
            }
            for (int64_t e = 0; e < world * S; ++e) {
              ASSERT_TRUE(Close(dst.Get(e), want[e], out_t))
                  << "world " << world << " params " << k << " S " << S << " flat index " << e;
            }
          }
        }
      }
    }
  }
}

TEST_F(CpuKernelsTest, CopyOutMatchesReference) {
  SCOPED_TRACE(Seed());
  for (int world = 1; world <= 4; ++world) {
    for (const auto& numels : kLayouts) {
      auto plan = shard::ShardPlan::Create(numels, world);
      ASSERT_TRUE(plan.ok());
      for (DType src_t : kAllDTypes) {
        const int64_t S = plan->shard_numel() + 3;
        TestBuffer src = Random(src_t, world * S);
        std::vector<TestBuffer> params;
        std::vector<BufferView> views;
        for (int64_t n : numels) params.push_back(Poisoned(RandomDType(), n));
        for (auto& p : params) views.push_back(p.view());
        ASSERT_TRUE(CopyOut(src.view(), *plan, S, views).ok());
        int64_t off = 0;
        for (size_t i = 0; i < numels.size(); ++i) {
          const int64_t chunk = (numels[i] + world - 1) / world;
          for (int64_t e = 0; e < numels[i]; ++e) {
            const int64_t r = e / chunk;
            ASSERT_TRUE(Close(params[i].Get(e), src.Get(r * S + off + e % chunk), params[i].dtype()))
                << "world " << world << " param " << i << " element " << e;
          }
          off += chunk;
        }
      }
    }
  }
}

TEST_F(CpuKernelsTest, CopyInThenCopyOutRoundTrips) {
  SCOPED_TRACE(Seed());
  // Exact whenever the flat dtype holds every value of the parameter dtype.
  auto holds = [](DType flat, DType p) {
    return flat == p || flat == DType::kFloat64 || (flat == DType::kFloat32 && p != DType::kFloat64);
  };
  for (int world = 1; world <= 4; ++world) {
    for (const auto& numels : kLayouts) {
      auto plan = shard::ShardPlan::Create(numels, world);
      ASSERT_TRUE(plan.ok());
      for (DType flat_t : kAllDTypes) {
        for (DType p_t : kAllDTypes) {
          if (!holds(flat_t, p_t)) continue;
          std::vector<TestBuffer> in, out;
          std::vector<BufferView> in_views, out_views;
          for (int64_t n : numels) {
            in.push_back(Random(p_t, n, -100, 100));
            out.push_back(Poisoned(p_t, n));
          }
          for (size_t i = 0; i < numels.size(); ++i) {
            in_views.push_back(in[i].view());
            out_views.push_back(out[i].view());
          }
          TestBuffer flat = Poisoned(flat_t, world * plan->shard_numel());
          ASSERT_TRUE(CopyIn(in_views, *plan, plan->shard_numel(), 1.0, flat.view()).ok());
          ASSERT_TRUE(CopyOut(flat.view(), *plan, plan->shard_numel(), out_views).ok());
          for (size_t i = 0; i < numels.size(); ++i) {
            ASSERT_EQ(out[i].ToDoubles(), in[i].ToDoubles())
                << "world " << world << " param " << i << " " << DTypeName(p_t) << " via " << DTypeName(flat_t);
          }
        }
      }
    }
  }
}

TEST_F(CpuKernelsTest, CastEveryPairWithSpecialValues) {
  SCOPED_TRACE(Seed());
  const double specials[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, 1e6, -7e4, 3e-8, 1.0 / 3};
  for (DType from : kAllDTypes) {
    for (DType to : kAllDTypes) {
      for (int64_t n : {0, 1, 1001}) {
        TestBuffer src = Random(from, n + 9, -1000, 1000);
        for (int i = 0; i < 9; ++i) src.Set(n + i, specials[i]);
        TestBuffer dst = Poisoned(to, n + 9);
        ASSERT_TRUE(Cast(src.view(), dst.view()).ok());
        for (int64_t e = 0; e < n + 9; ++e) {
          const double v = src.Get(e), got = dst.Get(e);
          if (std::isnan(v)) {
            EXPECT_TRUE(std::isnan(got));
          } else if (to == DType::kFloat16 && std::fabs(v) >= 65520) {
            EXPECT_EQ(got, std::copysign(INFINITY, v)) << v;  // past half's range
          } else if (std::isinf(v)) {
            EXPECT_EQ(got, v);
          } else {
            ASSERT_TRUE(Close(got, v, to)) << DTypeName(from) << " -> " << DTypeName(to) << " element " << e;
            if (to == from || to == DType::kFloat64) {
              ASSERT_EQ(got, v) << "widening casts are exact";
            }
          }
        }
      }
    }
  }
}

// torch.optim.AdamW (amsgrad=False, maximize=False) in float64, written from the formula in torch's docs.
struct RefAdamW {
  std::vector<double> p, m, v;
  // m with |g|: the size of the terms whose cancellation m's rounding error is relative to.
  std::vector<double> m_scale = std::vector<double>(p.size(), 0.0);
  void Step(const std::vector<double>& g, const AdamWConfig& c) {
    for (size_t i = 0; i < p.size(); ++i) {
      p[i] *= 1 - c.lr * c.weight_decay;
      m[i] = c.beta1 * m[i] + (1 - c.beta1) * g[i];
      m_scale[i] = c.beta1 * m_scale[i] + (1 - c.beta1) * std::fabs(g[i]);
      v[i] = c.beta2 * v[i] + (1 - c.beta2) * g[i] * g[i];
      const double m_hat = m[i] / (1 - std::pow(c.beta1, c.step));
      const double v_hat = v[i] / (1 - std::pow(c.beta2, c.step));
      p[i] -= c.lr * m_hat / (std::sqrt(v_hat) + c.eps);
    }
  }
};

TEST_F(CpuKernelsTest, FusedAdamWMatchesTorchMathOverSeveralSteps) {
  SCOPED_TRACE(Seed());
  for (DType p_t : {DType::kFloat32, DType::kFloat64}) {
    for (DType g_t : kAllDTypes) {
      for (double wd : {0.0, 0.01, 0.1}) {
        const int64_t n = 1037;
        TestBuffer p = Random(p_t, n, -2, 2);
        TestBuffer m(p_t, n), v(p_t, n);  // zero-initialised, as torch's state
        RefAdamW ref{p.ToDoubles(), std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
        AdamWConfig c;
        c.lr = 1e-2;
        c.beta1 = 0.9;
        c.beta2 = 0.95;
        c.eps = 1e-8;
        c.weight_decay = wd;
        for (int64_t step = 1; step <= 6; ++step) {
          c.step = step;
          TestBuffer g = Random(g_t, n, -1, 1);
          ASSERT_TRUE(FusedAdamW(p.view(), g.view(), m.view(), v.view(), c).ok());
          ref.Step(g.ToDoubles(), c);
          // fp32: a few roundings per op, no error growth over a handful of steps; fp64 ~1e9 times tighter.
          const double rtol = p_t == DType::kFloat32 ? 4e-6 : 1e-13;
          for (int64_t i = 0; i < n; ++i) {
            ASSERT_NEAR(p.Get(i), ref.p[i], rtol * (std::fabs(ref.p[i]) + c.lr))
                << DTypeName(p_t) << " grad " << DTypeName(g_t) << " wd " << wd << " step " << step << " i " << i;
            ASSERT_NEAR(m.Get(i), ref.m[i], rtol * ref.m_scale[i]) << "exp_avg step " << step;
            ASSERT_NEAR(v.Get(i), ref.v[i], rtol * std::fabs(ref.v[i]) + 1e-12) << "exp_avg_sq step " << step;
          }
        }
      }
    }
  }
}

TEST_F(CpuKernelsTest, SquaredNormAccumulates) {
  SCOPED_TRACE(Seed());
  for (DType x_t : kAllDTypes) {
    for (DType out_t : {DType::kFloat32, DType::kFloat64}) {
      for (int64_t n : {0, 1, 4095, 4096, 10001}) {
        TestBuffer x = Random(x_t, n, -3, 3);
        TestBuffer out(out_t, 1);
        out.Set(0, 0.5);  // accumulates onto what is there (one call per unit, summed across units)
        ASSERT_TRUE(SquaredNormAccumulate(x.view(), out.view()).ok());
        double want = 0.5;
        for (double e : x.ToDoubles()) want += e * e;
        const double rtol = (x_t == DType::kFloat64 && out_t == DType::kFloat64) ? 1e-13 : 1e-5;
        EXPECT_NEAR(out.Get(0), want, rtol * want) << DTypeName(x_t) << " -> " << DTypeName(out_t) << " n " << n;
      }
    }
  }
}

TEST_F(CpuKernelsTest, RejectsBadInput) {
  auto plan = shard::ShardPlan::Create({10, 3}, 2);  // chunks 5 and 2, S = 7
  ASSERT_TRUE(plan.ok());
  TestBuffer a(DType::kFloat32, 10), b(DType::kBFloat16, 3), flat(DType::kFloat32, 14), small(DType::kFloat32, 13);
  const BufferView good[] = {a.view(), b.view()};
  const BufferView wrong_count[] = {a.view(), a.slice(0, 4)};
  const BufferView three[] = {a.view(), b.view(), b.view()};
  BufferView on_gpu = b.view();
  on_gpu.device = Device::CUDA(0);  // never dereferenced: validation must reject it first
  const BufferView mixed[] = {a.view(), on_gpu};
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  ASSERT_TRUE(CopyIn(good, *plan, 7, 1.0, flat.view()).ok());
  EXPECT_EQ(CopyIn(wrong_count, *plan, 7, 1.0, flat.view()).code(), kInvalid);
  EXPECT_EQ(CopyIn(three, *plan, 7, 1.0, flat.view()).code(), kInvalid);        // more params than the plan
  EXPECT_EQ(CopyIn(good, *plan, 7, 1.0, small.view()).code(), kInvalid);        // flat buffer not world * S
  EXPECT_EQ(CopyIn(good, *plan, 6, 1.0, small.slice(0, 12)).code(), kInvalid);  // S below the plan's
  EXPECT_EQ(CopyIn(mixed, *plan, 7, 1.0, flat.view()).code(), kInvalid);
  EXPECT_EQ(CopyOut(small.view(), *plan, 7, good).code(), kInvalid);
  EXPECT_EQ(CopyOut(flat.view(), *plan, 7, wrong_count).code(), kInvalid);
  EXPECT_EQ(CopyOut(flat.view(), *plan, 7, mixed).code(), kInvalid);
  EXPECT_EQ(Cast(a.view(), a.slice(0, 9)).code(), kInvalid);
  EXPECT_EQ(Cast(b.view(), on_gpu).code(), kInvalid);

  TestBuffer p(DType::kFloat32, 3), m(DType::kFloat32, 3), v(DType::kFloat32, 3), g(DType::kFloat32, 3);
  TestBuffer p16(DType::kBFloat16, 3), m64(DType::kFloat64, 3);
  AdamWConfig c;
  ASSERT_TRUE(FusedAdamW(p.view(), g.view(), m.view(), v.view(), c).ok());
  EXPECT_EQ(FusedAdamW(p16.view(), g.view(), p16.view(), p16.view(), c).code(), kInvalid);  // bf16 master weights
  EXPECT_EQ(FusedAdamW(p.view(), g.view(), m64.view(), v.view(), c).code(), kInvalid);      // state dtype differs
  EXPECT_EQ(FusedAdamW(p.view(), g.slice(0, 2), m.view(), v.view(), c).code(), kInvalid);
  EXPECT_EQ(FusedAdamW(p.view(), on_gpu, m.view(), v.view(), c).code(), kInvalid);
  using Spoil = void (*)(AdamWConfig&);
  for (Spoil bad : {Spoil{[](AdamWConfig& x) { x.step = 0; }}, Spoil{[](AdamWConfig& x) { x.lr = -1; }},
                    Spoil{[](AdamWConfig& x) { x.beta1 = 1; }}, Spoil{[](AdamWConfig& x) { x.eps = NAN; }}}) {
    AdamWConfig bc;
    bad(bc);
    EXPECT_EQ(FusedAdamW(p.view(), g.view(), m.view(), v.view(), bc).code(), kInvalid);
  }
  TestBuffer two(DType::kFloat32, 2);
  EXPECT_EQ(SquaredNormAccumulate(a.view(), two.view()).code(), kInvalid);
  EXPECT_EQ(SquaredNormAccumulate(a.view(), b.slice(0, 1)).code(), kInvalid);  // bf16 accumulator
  // Rejected calls leave their outputs alone.
  TestBuffer untouched = Poisoned(DType::kFloat32, 14);
  EXPECT_EQ(CopyIn(mixed, *plan, 7, 1.0, untouched.view()).code(), kInvalid);
  for (int64_t i = 0; i < untouched.count(); ++i) EXPECT_TRUE(std::isnan(untouched.Get(i))) << i;
}

TEST_F(CpuKernelsTest, CudaBuffersWithoutCudaKernelsFailCleanly) {
  if (CudaKernelsBuilt()) GTEST_SKIP() << "this build has CUDA kernels; see cuda_kernels_test";
  TestBuffer a(DType::kFloat32, 4), b(DType::kFloat32, 4);
  BufferView ga = a.view(), gb = b.view();
  ga.device = gb.device = Device::CUDA(0);
  EXPECT_EQ(Cast(ga, gb).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace tessera::kernels
