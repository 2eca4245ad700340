// CPU reference implementations of kernels.h. Straightforward loops the compiler vectorises; the same-dtype,
// scale-1 paths use memcpy since they are pure data movement.
#include "tessera/kernels/cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "absl/strings/str_format.h"

namespace tessera::kernels::cpu {
namespace {

struct BF16 { uint16_t bits; };
struct F16 { uint16_t bits; };

// Compute type: double for float64 data, float otherwise.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename T> inline float LoadF(const T* p, int64_t i) { return static_cast<float>(p[i]); }
template <> inline float LoadF<BF16>(const BF16* p, int64_t i) { return BF16ToFloat(p[i].bits); }
template <> inline float LoadF<F16>(const F16* p, int64_t i) { return HalfToFloat(p[i].bits); }

template <typename T, typename V> inline void Store(T* p, int64_t i, V v) { p[i] = static_cast<T>(v); }
template <> inline void Store<BF16, float>(BF16* p, int64_t i, float v) { p[i].bits = FloatToBF16(v); }
template <> inline void Store<BF16, double>(BF16* p, int64_t i, double v) {
  p[i].bits = FloatToBF16(static_cast<float>(v));
}
template <> inline void Store<F16, float>(F16* p, int64_t i, float v) { p[i].bits = FloatToHalf(v); }
template <> inline void Store<F16, double>(F16* p, int64_t i, double v) {
  p[i].bits = FloatToHalf(static_cast<float>(v));
}

template <typename T> inline double LoadD(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, double>) return p[i];
  else return static_cast<double>(LoadF<T>(p, i));
}

// Calls fn(T{}) with T the C++ type of `dtype`.
template <typename Fn>
auto VisitDType(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: return fn(float{});
    case DType::kFloat64: return fn(double{});
    case DType::kBFloat16: return fn(BF16{});
    case DType::kFloat16: return fn(F16{});
  }
  return fn(float{});
}

// dst[0..n) = cast(src[0..n) * scale); the compute type follows the wider of the two.
template <typename S, typename D>
void ConvertRange(const S* src, D* dst, int64_t n, double scale) {
  if constexpr (std::is_same_v<S, D>) {
    if (scale == 1.0) {
      std::memcpy(dst, src, n * sizeof(S));
      return;
    }
  }
  if constexpr (std::is_same_v<S, double> || std::is_same_v<D, double>) {
    for (int64_t j = 0; j < n; ++j) Store<D, double>(dst, j, LoadD(src, j) * scale);
  } else {
    const float s = static_cast<float>(scale);
    if (scale == 1.0) {
      for (int64_t j = 0; j < n; ++j) Store<D, float>(dst, j, LoadF(src, j));
    } else {
      for (int64_t j = 0; j < n; ++j) Store<D, float>(dst, j, LoadF(src, j) * s);
    }
  }
}

void ConvertAny(const BufferView& src, int64_t src_off, const BufferView& dst, int64_t dst_off, int64_t n,
                double scale) {
  if (n <= 0) return;
  VisitDType(src.dtype, [&](auto s) {
    using S = decltype(s);
    VisitDType(dst.dtype, [&](auto d) {
      using D = decltype(d);
      ConvertRange(src.as<const S>() + src_off, dst.as<D>() + dst_off, n, scale);
    });
  });
}

void ZeroRange(const BufferView& b, int64_t off, int64_t n) {
  if (n > 0) std::memset(static_cast<char*>(b.data) + off * ElementSize(b.dtype), 0, n * ElementSize(b.dtype));
}

template <typename P, typename G>
void AdamWLoop(P* p, const G* g, P* m, P* v, int64_t n, const AdamWConfig& c) {
  using A = typename Acc<P>::type;
  const A b1 = static_cast<A>(c.beta1), b2 = static_cast<A>(c.beta2);
  const A eps = static_cast<A>(c.eps);
  const A decay = static_cast<A>(1.0 - c.lr * c.weight_decay);
  const double bc1 = 1.0 - std::pow(c.beta1, static_cast<double>(c.step));
  const double bc2 = 1.0 - std::pow(c.beta2, static_cast<double>(c.step));
  const A step_size = static_cast<A>(c.lr / bc1);
  const A bc2_sqrt = static_cast<A>(std::sqrt(bc2));
  for (int64_t i = 0; i < n; ++i) {
    const A grad = static_cast<A>(LoadD(g, i));
    A param = p[i] * decay;
    A mi = m[i] + (grad - m[i]) * (A(1) - b1);  // lerp, as torch does
    A vi = v[i] * b2 + (A(1) - b2) * grad * grad;
    A denom = std::sqrt(vi) / bc2_sqrt + eps;
    p[i] = param - step_size * mi / denom;
    m[i] = mi;
    v[i] = vi;
  }
}

}  // namespace

absl::Status CopyIn(absl::Span<const BufferView> params, const shard::ShardPlan& plan, int64_t shard_numel,
                    double scale, BufferView dst, void* /*stream*/) {
  const int world = plan.world();
  for (int r = 0; r < world; ++r) {
    for (size_t i = 0; i < params.size(); ++i) {
      const auto& slot = plan.slot(static_cast<int64_t>(i));
      const int64_t n = plan.LocalNumel(static_cast<int64_t>(i), r);
      const int64_t start = plan.LocalStart(static_cast<int64_t>(i), r);
      const int64_t out = r * shard_numel + slot.shard_offset;
      ConvertAny(params[i], start, dst, out, n, scale);
      ZeroRange(dst, out + n, slot.chunk - n);
    }
    // Padding after the last given parameter up to shard_numel (e.g. frozen parameters' region) is zeroed too.
    const int64_t used = plan.prefix_shard_numel(static_cast<int64_t>(params.size()));
    ZeroRange(dst, r * shard_numel + used, shard_numel - used);
  }
  return absl::OkStatus();
}

absl::Status CopyOut(BufferView src, const shard::ShardPlan& plan, int64_t shard_numel,
                     absl::Span<const BufferView> params, void* /*stream*/) {
  const int world = plan.world();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& slot = plan.slot(static_cast<int64_t>(i));
    for (int r = 0; r < world; ++r) {
      const int64_t n = plan.LocalNumel(static_cast<int64_t>(i), r);
      const int64_t start = plan.LocalStart(static_cast<int64_t>(i), r);
      ConvertAny(src, r * shard_numel + slot.shard_offset, params[i], start, n, 1.0);
    }
  }
  return absl::OkStatus();
}

absl::Status Cast(BufferView src, BufferView dst, void* /*stream*/) {
  ConvertAny(src, 0, dst, 0, src.count, 1.0);
  return absl::OkStatus();
}

absl::Status FusedAdamW(BufferView param, BufferView grad, BufferView exp_avg, BufferView exp_avg_sq,
                        const AdamWConfig& config, void* /*stream*/) {
  VisitDType(grad.dtype, [&](auto gt) {
    using G = decltype(gt);
    if (param.dtype == DType::kFloat64) {
      AdamWLoop(param.as<double>(), grad.as<const G>(), exp_avg.as<double>(), exp_avg_sq.as<double>(), param.count,
                config);
    } else {
      AdamWLoop(param.as<float>(), grad.as<const G>(), exp_avg.as<float>(), exp_avg_sq.as<float>(), param.count,
                config);
    }
  });
  return absl::OkStatus();
}

absl::Status SquaredNormAccumulate(BufferView x, BufferView out, void* /*stream*/) {
  double total = VisitDType(x.dtype, [&](auto t) {
    using T = decltype(t);
    const T* p = x.as<const T>();
    if constexpr (std::is_same_v<T, double>) {
      double s = 0;
      for (int64_t i = 0; i < x.count; ++i) s += p[i] * p[i];
      return s;
    } else {
      // Blocked float accumulation keeps the error small without paying for double on every element.
      double s = 0;
      constexpr int64_t kBlock = 4096;
      for (int64_t b = 0; b < x.count; b += kBlock) {
        float part = 0;
        const int64_t e = std::min(x.count, b + kBlock);
        for (int64_t i = b; i < e; ++i) {
          const float v = LoadF(p, i);
          part += v * v;
        }
        s += part;
      }
      return s;
    }
  });
  if (out.dtype == DType::kFloat64) {
    out.as<double>()[0] += total;
  } else {
    out.as<float>()[0] += static_cast<float>(total);
  }
  return absl::OkStatus();
}

}  // namespace tessera::kernels::cpu
