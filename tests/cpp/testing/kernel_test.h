// What the CPU and CUDA kernel suites share: a fixture with a fresh, printed random seed and buffer factories, and
// the dtype-aware closeness check against a float64 reference.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <string>

#include "gtest/gtest.h"
#include "tessera/core/dtype.h"
#include "testing/test_buffer.h"

namespace tessera::testing {

class SeededKernelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    seed_ = FreshSeed();
    rng_.seed(seed_);
  }
  DType RandomDType() { return kAllDTypes[std::uniform_int_distribution<int>(0, 3)(rng_)]; }
  TestBuffer Random(DType t, int64_t n, double lo = -1, double hi = 1) {
    TestBuffer b(t, n);
    b.FillRandom(rng_, lo, hi);
    return b;
  }
  static TestBuffer Poisoned(DType t, int64_t n) {
    TestBuffer b(t, n);
    b.Poison();
    return b;
  }
  std::string Seed() const { return "seed " + std::to_string(seed_); }

  uint64_t seed_ = 0;
  std::mt19937_64 rng_;
};

// A value of dtype t (rounded once, to nearest) may differ from the exact value by `ulps` ulps of t: the kernels may
// round twice (to float, then to t), as torch does for double -> half.
inline ::testing::AssertionResult Close(double got, double want, DType t, double ulps = 1) {
  const double tol = ulps * (Epsilon(t) * std::fabs(want) + MinSubnormal(t));
  if (std::fabs(got - want) <= tol) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "got " << got << ", want " << want << " +- " << tol << " ("
                                       << DTypeName(t) << ")";
}

}  // namespace tessera::testing
