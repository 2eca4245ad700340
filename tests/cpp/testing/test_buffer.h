// Host buffers of any tessera dtype for tests: typed element access through double, NaN poisoning (so an output the
// code under test forgot to write fails the comparison), random fills, and tolerances per dtype.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "tessera/core/buffer.h"
#include "tessera/core/dtype.h"

namespace tessera::testing {

inline constexpr DType kAllDTypes[] = {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16};

// Unit roundoff-ish spacing of the dtype (2^-mantissa_bits) and its smallest positive subnormal: tolerances are
// built from these so a looser dtype never hides a bug in a tighter one.
inline double Epsilon(DType t) {
  switch (t) {
    case DType::kFloat32: return std::ldexp(1.0, -23);
    case DType::kFloat64: return std::ldexp(1.0, -52);
    case DType::kBFloat16: return std::ldexp(1.0, -7);
    case DType::kFloat16: return std::ldexp(1.0, -10);
  }
  return 0;
}
inline double MinSubnormal(DType t) {
  switch (t) {
    case DType::kFloat32: return std::ldexp(1.0, -149);
    case DType::kFloat64: return std::ldexp(1.0, -1074);
    case DType::kBFloat16: return std::ldexp(1.0, -133);
    case DType::kFloat16: return std::ldexp(1.0, -24);
  }
  return 0;
}

class TestBuffer {
 public:
  TestBuffer() = default;
  TestBuffer(DType dtype, int64_t count)
      : dtype_(dtype), count_(count), bytes_(static_cast<size_t>(count * ElementSize(dtype)) + 1) {}

  DType dtype() const { return dtype_; }
  int64_t count() const { return count_; }
  BufferView view() { return {bytes_.data(), dtype_, count_, Device::CPU()}; }
  BufferView slice(int64_t offset, int64_t n) { return view().Slice(offset, n); }

  // Stores v rounded to the dtype (round-to-nearest-even).
  void Set(int64_t i, double v) {
    switch (dtype_) {
      case DType::kFloat32: return Put<float>(i, static_cast<float>(v));
      case DType::kFloat64: return Put<double>(i, v);
      case DType::kBFloat16: return Put<uint16_t>(i, FloatToBF16(static_cast<float>(v)));
      case DType::kFloat16: return Put<uint16_t>(i, FloatToHalf(static_cast<float>(v)));
    }
  }
  double Get(int64_t i) const {
    switch (dtype_) {
      case DType::kFloat32: return Take<float>(i);
      case DType::kFloat64: return Take<double>(i);
      case DType::kBFloat16: return BF16ToFloat(Take<uint16_t>(i));
      case DType::kFloat16: return HalfToFloat(Take<uint16_t>(i));
    }
    return std::nan("");
  }
  std::vector<double> ToDoubles() const {
    std::vector<double> out(static_cast<size_t>(count_));
    for (int64_t i = 0; i < count_; ++i) out[i] = Get(i);
    return out;
  }

  void Poison() {
    for (int64_t i = 0; i < count_; ++i) Set(i, std::nan(""));
  }
  // Uniform in [lo, hi), rounded to the dtype; Get() then returns exactly what the code under test reads.
  void FillRandom(std::mt19937_64& rng, double lo = -1.0, double hi = 1.0) {
    std::uniform_real_distribution<double> dist(lo, hi);
    for (int64_t i = 0; i < count_; ++i) Set(i, dist(rng));
  }

 private:
  template <typename T>
  void Put(int64_t i, T x) {
    std::memcpy(bytes_.data() + i * sizeof(T), &x, sizeof(T));
  }
  template <typename T>
  T Take(int64_t i) const {
    T x;
    std::memcpy(&x, bytes_.data() + i * sizeof(T), sizeof(T));
    return x;
  }

  DType dtype_ = DType::kFloat32;
  int64_t count_ = 0;
  std::vector<unsigned char> bytes_;  // one spare byte so data() is non-null even for count 0
};

// A seed that differs per run, printed by the caller on failure (SCOPED_TRACE) so a failure can be replayed.
inline uint64_t FreshSeed() {
  std::random_device rd;
  return (static_cast<uint64_t>(rd()) << 32) ^ rd();
}

}  // namespace tessera::testing
