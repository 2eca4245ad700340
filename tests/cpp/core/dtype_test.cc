// bfloat16 / float16 conversions against hand-checked bit patterns and an independent reference that rounds in
// double arithmetic (exact for these sizes) with the default round-to-nearest-even mode.
#include "tessera/core/dtype.h"

#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>

#include "gtest/gtest.h"

namespace tessera {
namespace {

float FromBits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
uint32_t Bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// Reference encoder for a binary format with `mant` stored mantissa bits and exponent bias `bias`: rounds |x| to a
// multiple of the spacing of its binade with std::nearbyint (ties to even), overflowing to infinity like IEEE.
uint16_t RefEncode(float f, int mant, int bias, int exp_bits) {
  const uint16_t sign = std::signbit(f) ? static_cast<uint16_t>(1u << (mant + exp_bits)) : 0;
  const uint16_t inf = static_cast<uint16_t>(((1u << exp_bits) - 1) << mant);
  const double x = std::fabs(static_cast<double>(f));
  if (std::isinf(x)) return sign | inf;
  const int min_exp = 1 - bias;  // exponent of the smallest normal
  int e;
  std::frexp(x, &e);
  e -= 1;  // x in [2^e, 2^(e+1))
  if (x == 0 || e < min_exp) {
    const double q = std::nearbyint(std::ldexp(x, -(min_exp - mant)));  // units of the smallest subnormal
    return sign | static_cast<uint16_t>(q);  // q == 2^mant lands exactly on the smallest normal's encoding
  }
  double q = std::nearbyint(std::ldexp(x, mant - e));  // in [2^mant, 2^(mant+1)]
  if (q == std::ldexp(1.0, mant + 1)) {
    q /= 2;
    ++e;
  }
  if (e + bias >= (1 << exp_bits) - 1) return sign | inf;
  return sign | static_cast<uint16_t>(((e + bias) << mant) | (static_cast<uint32_t>(q) - (1u << mant)));
}
uint16_t RefBF16(float f) { return RefEncode(f, 7, 127, 8); }
uint16_t RefHalf(float f) { return RefEncode(f, 10, 15, 5); }

// Reference decoders from the format's definition.
double RefDecode(uint16_t h, int mant, int bias, int exp_bits) {
  const int e = (h >> mant) & ((1 << exp_bits) - 1);
  const int m = h & ((1 << mant) - 1);
  const double sign = (h >> (mant + exp_bits)) ? -1.0 : 1.0;
  if (e == (1 << exp_bits) - 1) return m ? std::numeric_limits<double>::quiet_NaN() : sign * INFINITY;
  if (e == 0) return sign * std::ldexp(m, 1 - bias - mant);
  return sign * std::ldexp(1.0 + std::ldexp(m, -mant), e - bias);
}

TEST(BFloat16Test, KnownBitPatterns) {
  ASSERT_EQ(std::fegetround(), FE_TONEAREST);
  EXPECT_EQ(FloatToBF16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBF16(-2.0f), 0xc000);
  EXPECT_EQ(FloatToBF16(0.0f), 0x0000);
  EXPECT_EQ(FloatToBF16(-0.0f), 0x8000);
  EXPECT_EQ(BF16ToFloat(0x4049), 3.140625f);
  // Round to nearest, ties to even: 0x3f80|8000 is halfway and 0x3f80 is even; 0x3f81|8000 rounds up to 0x3f82.
  EXPECT_EQ(FloatToBF16(FromBits(0x3f808000u)), 0x3f80);
  EXPECT_EQ(FloatToBF16(FromBits(0x3f818000u)), 0x3f82);
  EXPECT_EQ(FloatToBF16(FromBits(0x3f808001u)), 0x3f81);
  EXPECT_EQ(FloatToBF16(FromBits(0x3f807fffu)), 0x3f80);
  EXPECT_EQ(FloatToBF16(FromBits(0xbf818000u)), 0xbf82);
  // Infinities, and FLT_MAX which is past bf16's largest finite value plus half an ulp.
  EXPECT_EQ(FloatToBF16(INFINITY), 0x7f80);
  EXPECT_EQ(FloatToBF16(-INFINITY), 0xff80);
  EXPECT_EQ(FloatToBF16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(FloatToBF16(FromBits(0x7f7f7fffu)), 0x7f7f);
  // Float subnormals map onto bf16 subnormals (same exponent range).
  EXPECT_EQ(FloatToBF16(FromBits(0x00010000u)), 0x0001);
  EXPECT_EQ(FloatToBF16(FromBits(0x00008000u)), 0x0000);  // halfway to 0x0001, ties to even 0
  EXPECT_EQ(FloatToBF16(FromBits(0x00018000u)), 0x0002);
  // NaNs stay NaN, including a signalling NaN whose payload sits only in the bits that are dropped.
  EXPECT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(FromBits(0x7f800001u)))));
  EXPECT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(FromBits(0xff800001u)))));
  EXPECT_TRUE(std::isinf(BF16ToFloat(0x7f80)));
}

TEST(BFloat16Test, EveryPatternDecodesAndRoundTrips) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const auto b = static_cast<uint16_t>(h);
    const double ref = RefDecode(b, 7, 127, 8);
    const float f = BF16ToFloat(b);
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      EXPECT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(f)))) << std::hex << h;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), ref) << std::hex << h;
    ASSERT_EQ(FloatToBF16(f), b) << std::hex << h;
  }
}

TEST(Float16Test, KnownBitPatterns) {
  EXPECT_EQ(FloatToHalf(1.0f), 0x3c00);
  EXPECT_EQ(FloatToHalf(-2.0f), 0xc000);
  EXPECT_EQ(FloatToHalf(0.0f), 0x0000);
  EXPECT_EQ(FloatToHalf(-0.0f), 0x8000);
  EXPECT_EQ(FloatToHalf(65504.0f), 0x7bff);  // largest finite
  EXPECT_EQ(FloatToHalf(65519.99f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // halfway to 2^16 rounds to even, i.e. overflows to inf
  EXPECT_EQ(FloatToHalf(1e10f), 0x7c00);
  EXPECT_EQ(FloatToHalf(-INFINITY), 0xfc00);
  // Ties to even among normals: 1 + 2^-11 is halfway between 0x3c00 and 0x3c01.
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);
  EXPECT_EQ(FloatToHalf(std::nextafter(1.0f + std::ldexp(1.0f, -11), 2.0f)), 0x3c01);
  // Subnormals: 2^-24 is the smallest; 2^-25 is halfway to zero (ties to even: 0); 3 * 2^-25 rounds to 2.
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);
  EXPECT_EQ(FloatToHalf(std::nextafter(std::ldexp(1.0f, -25), 1.0f)), 0x0001);
  EXPECT_EQ(FloatToHalf(3 * std::ldexp(1.0f, -25)), 0x0002);
  EXPECT_EQ(FloatToHalf(-std::ldexp(1.0f, -24)), 0x8001);
  EXPECT_EQ(FloatToHalf(1023 * std::ldexp(1.0f, -24)), 0x03ff);  // largest subnormal
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -14)), 0x0400);         // smallest normal
  EXPECT_EQ(FloatToHalf(std::ldexp(2047.0f, -25)), 0x0400);      // largest subnormal + half ulp rounds up to it
  EXPECT_EQ(HalfToFloat(0x0001), std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(0x83ff), -1023 * std::ldexp(1.0f, -24));
  EXPECT_EQ(HalfToFloat(0x3555), 0.333251953125f);
  EXPECT_TRUE(std::isinf(HalfToFloat(0x7c00)));
  EXPECT_TRUE(std::isnan(HalfToFloat(0x7c01)));  // signalling NaN
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(FromBits(0x7f800001u)))));
}

TEST(Float16Test, EveryPatternDecodesAndRoundTrips) {
  for (uint32_t h = 0; h <= 0xffff; ++h) {
    const auto b = static_cast<uint16_t>(h);
    const double ref = RefDecode(b, 10, 15, 5);
    const float f = HalfToFloat(b);
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(f)) << std::hex << h;
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << std::hex << h;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), ref) << std::hex << h;
    ASSERT_EQ(FloatToHalf(f), b) << std::hex << h;
  }
}

// Sweeps float bit patterns (a stride coprime to 2^32 walks every binade, subnormals included) plus the float
// neighbours of every tie point, comparing both encoders with the reference.
TEST(ConversionTest, MatchesReferenceRounding) {
  auto check = [](float f) {
    if (std::isnan(f)) return;
    ASSERT_EQ(FloatToBF16(f), RefBF16(f)) << std::hexfloat << f << " bits " << std::hex << Bits(f);
    ASSERT_EQ(FloatToHalf(f), RefHalf(f)) << std::hexfloat << f << " bits " << std::hex << Bits(f);
  };
  for (uint64_t b = 0; b <= 0xffffffffu; b += 1021) check(FromBits(static_cast<uint32_t>(b)));
  for (uint32_t h = 0; h < 0x7c00; ++h) {  // every finite half and the midpoint above it, both signs
    const double lo = RefDecode(static_cast<uint16_t>(h), 10, 15, 5);
    const double hi = RefDecode(static_cast<uint16_t>(h + 1), 10, 15, 5);
    const float mid = static_cast<float>((lo + (std::isinf(hi) ? 65536.0 : hi)) / 2);  // exact in float
    for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, INFINITY)}) {
      check(f);
      check(-f);
    }
  }
  for (uint32_t h = 0; h < 0x7f80; ++h) {  // bf16 midpoints are float bit patterns ending in 0x8000
    const uint32_t mid = (h << 16) | 0x8000u;
    for (uint32_t b : {mid, mid - 1, mid + 1}) {
      check(FromBits(b));
      check(FromBits(b | 0x80000000u));
    }
  }
}

#ifdef __FLT16_MAX__
// The compiler's own float -> _Float16 conversion (libgcc / F16C) as a second, unrelated reference.
TEST(Float16Test, MatchesCompilerFloat16) {
  std::mt19937 rng(12345);
  for (int i = 0; i < 2000000; ++i) {
    const float f = FromBits(static_cast<uint32_t>(rng()));
    if (std::isnan(f)) continue;
    const _Float16 h = static_cast<_Float16>(f);
    uint16_t bits;
    std::memcpy(&bits, &h, 2);
    ASSERT_EQ(FloatToHalf(f), bits) << std::hexfloat << f;
  }
}
#endif

TEST(DTypeTest, SizesAndNames) {
  EXPECT_EQ(ElementSize(DType::kFloat32), 4);
  EXPECT_EQ(ElementSize(DType::kFloat64), 8);
  EXPECT_EQ(ElementSize(DType::kBFloat16), 2);
  EXPECT_EQ(ElementSize(DType::kFloat16), 2);
  EXPECT_STREQ(DTypeName(DType::kBFloat16), "bfloat16");
  EXPECT_STREQ(DTypeName(DType::kFloat16), "float16");
}

}  // namespace
}  // namespace tessera
