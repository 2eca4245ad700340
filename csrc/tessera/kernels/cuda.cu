// CUDA kernels behind kernels.h (see there for each contract). The dispatcher in kernels.cc has validated counts,
// dtypes and devices; these functions only choose a kernel, launch it on the caller's stream and report launch errors.
//
// [Note: bandwidth-bound kernels]
// Every kernel here moves each byte once, so speed is HBM bandwidth: 16-byte vector loads where the pointers allow
// (CopySeg/VecOk), grid-stride loops over a grid sized to fill the GPU, and ONE launch per CopyIn/CopyOut covering all
// parameters and all ranks. The parameter table travels inside the kernel argument (__grid_constant__, read from the
// constant bank with no copy), so there is no device table to allocate, fill and keep alive across the async launch;
// units with more than kMaxParamsPerLaunch parameters take several launches.
#include "tessera/kernels/cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "absl/strings/str_format.h"
#include "tessera/core/cuda_device_guard.h"

namespace tessera::kernels::cuda {
namespace {

using bf16 = __nv_bfloat16;
using half = __half;

constexpr int kThreads = 256;
constexpr int kMaxParamsPerLaunch = 64;  // keeps PackArgs under the classic 4 KiB kernel-argument limit
constexpr int64_t kTile = 16384;         // elements of one flat row a block handles per step of CopyIn/CopyOut
constexpr int kMaxNormBlocks = 1024;

// ---- element conversion: half/bf16 go through float, as torch converts them -------------------------------------
__device__ __forceinline__ float Widen(float x) { return x; }
__device__ __forceinline__ double Widen(double x) { return x; }
__device__ __forceinline__ float Widen(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float Widen(half x) { return __half2float(x); }

template <typename D> struct Narrow {
  template <typename C> __device__ __forceinline__ static D From(C x) { return static_cast<D>(x); }
};
template <> struct Narrow<bf16> {
  template <typename C> __device__ __forceinline__ static bf16 From(C x) { return __float2bfloat16_rn(static_cast<float>(x)); }
};
template <> struct Narrow<half> {
  template <typename C> __device__ __forceinline__ static half From(C x) { return __float2half_rn(static_cast<float>(x)); }
};

// Math precision of a copy: double if either side is double, else float.
template <typename S, typename D>
using CopyMath = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<D, double>, double, float>;

// std::min/max are host constexpr functions; device code would need --expt-relaxed-constexpr to call them.
__host__ __device__ __forceinline__ int64_t Min(int64_t a, int64_t b) { return a < b ? a : b; }
__host__ __device__ __forceinline__ int64_t Max(int64_t a, int64_t b) { return a > b ? a : b; }

template <typename T, int V> struct alignas(sizeof(T) * V) Vec { T v[V]; };

// Whether `p` sits at element offset `mis` modulo V (vector loops need all operands at the same offset).
template <int V, typename T> __device__ __forceinline__ int64_t Misalign(const T* p) {
  return static_cast<int64_t>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % V);
}

// dst[i] = cast(src[i] * scale) for i < n, by threads tid, tid+nth, ... Vectorised over the aligned middle when src
// and dst are equally misaligned; otherwise scalar with four loads in flight per thread.
template <typename S, typename D>
__device__ __forceinline__ void CopySeg(const S* __restrict__ src, D* __restrict__ dst, int64_t n,
                                        CopyMath<S, D> scale, int64_t tid, int64_t nth) {
  using C = CopyMath<S, D>;
  constexpr int V = 16 / (sizeof(S) > sizeof(D) ? sizeof(S) : sizeof(D));
  const int64_t mis = Misalign<V>(src);
  int64_t head = n;
  if (mis == Misalign<V>(dst)) head = Min(n, (V - mis) % V);
  const int64_t nvec = (n - head) / V;
  const auto* vs = reinterpret_cast<const Vec<S, V>*>(src + head);
  auto* vd = reinterpret_cast<Vec<D, V>*>(dst + head);
  for (int64_t k = tid; k < nvec; k += nth) {
    const Vec<S, V> a = vs[k];
    Vec<D, V> b;
#pragma unroll
    for (int e = 0; e < V; ++e) b.v[e] = Narrow<D>::From(static_cast<C>(Widen(a.v[e])) * scale);
    vd[k] = b;
  }
  // Scalar rest: the head [0, head) then the tail [tail0, n), numbered 0..nscalar-1.
  const int64_t tail0 = head + nvec * V;
  const int64_t nscalar = head + (n - tail0);
  for (int64_t k = tid; k < nscalar; k += 4 * nth) {
    C x[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t kk = k + u * nth, i = kk < head ? kk : tail0 + (kk - head);
      if (kk < nscalar) x[u] = static_cast<C>(Widen(src[i])) * scale;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t kk = k + u * nth, i = kk < head ? kk : tail0 + (kk - head);
      if (kk < nscalar) dst[i] = Narrow<D>::From(x[u]);
    }
  }
}

// Runs f(T{}) with T the C++ type of `dtype` (device side; the dtype is uniform across a block, so no divergence).
template <typename F> __device__ __forceinline__ void DispatchDevice(int dtype, F&& f) {
  switch (static_cast<DType>(dtype)) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kBFloat16: f(bf16{}); break;
    case DType::kFloat16: f(half{}); break;
  }
}

// ---- CopyIn / CopyOut --------------------------------------------------------------------------------------------
struct PackParam {
  void* ptr;
  int64_t numel, chunk, offset;  // the plan's ParamSlot
  int32_t dtype;
};

struct PackArgs {
  PackParam params[kMaxParamsPerLaunch];
  int32_t num_params, world;
  int64_t shard_numel;     // S, the row stride of the rank-major flat buffer
  int64_t q_begin, q_end;  // the part of every row this launch writes
  int64_t params_end;      // where the last parameter's chunk ends; CopyIn zeroes [params_end, q_end)
  int64_t tiles_per_row;
  void* flat;
  double scale;
};

// Blocks walk tiles of [q_begin, q_end) in every rank's row; a tile may span several parameters, so big and tiny
// parameters share the grid evenly. kIn: params -> flat (scaled; padding, and the rest of the row after the last
// parameter, zeroed as cpu.cc does); else flat -> params.
template <typename F, bool kIn>
__global__ void __launch_bounds__(kThreads) PackKernel(const __grid_constant__ PackArgs a) {
  const int64_t total_tiles = a.tiles_per_row * a.world;
  for (int64_t t = blockIdx.x; t < total_tiles; t += gridDim.x) {
    const int64_t r = t / a.tiles_per_row;
    const int64_t q0 = a.q_begin + (t % a.tiles_per_row) * kTile;
    const int64_t q1 = Min(q0 + kTile, a.q_end);
    int lo = 0, hi = a.num_params;  // first parameter whose chunk ends after q0
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (a.params[mid].offset + a.params[mid].chunk > q0) hi = mid; else lo = mid + 1;
    }
    F* row = static_cast<F*>(a.flat) + r * a.shard_numel;
    for (int i = lo; i < a.num_params && a.params[i].offset < q1; ++i) {
      const PackParam& p = a.params[i];
      const int64_t c0 = Max(q0, p.offset) - p.offset, c1 = Min(q1, p.offset + p.chunk) - p.offset;
      const int64_t start = Min(p.numel, r * p.chunk);                                  // LocalStart
      const int64_t owned = Min(Max(p.numel - r * p.chunk, 0), p.chunk);  // LocalNumel
      const int64_t d1 = Min(c1, owned);
      if (d1 > c0) {
        DispatchDevice(p.dtype, [&](auto tag) {
          using T = decltype(tag);
          if constexpr (kIn) {
            CopySeg<T, F>(static_cast<const T*>(p.ptr) + start + c0, row + p.offset + c0, d1 - c0,
                          static_cast<CopyMath<T, F>>(a.scale), threadIdx.x, blockDim.x);
          } else {
            CopySeg<F, T>(row + p.offset + c0, static_cast<T*>(p.ptr) + start + c0, d1 - c0, 1, threadIdx.x,
                          blockDim.x);
          }
        });
      }
      if constexpr (kIn) {
        for (int64_t k = Max(c0, owned) + threadIdx.x; k < c1; k += blockDim.x) {
          row[p.offset + k] = Narrow<F>::From(0.0f);
        }
      }
    }
    if constexpr (kIn) {
      for (int64_t k = Max(q0, a.params_end) + threadIdx.x; k < q1; k += blockDim.x) row[k] = Narrow<F>::From(0.0f);
    }
  }
}

// ---- Cast --------------------------------------------------------------------------------------------------------
template <typename S, typename D> __global__ void __launch_bounds__(kThreads) CastKernel(const S* src, D* dst, int64_t n) {
  CopySeg<S, D>(src, dst, n, 1, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                static_cast<int64_t>(gridDim.x) * blockDim.x);
}

// ---- AdamW -------------------------------------------------------------------------------------------------------
template <typename C> struct AdamWScalars {
  C lr_wd, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size, bc2_sqrt, eps;
};

// Same operation order as torch's fused AdamW (aten/src/ATen/native/cuda/fused_adam_utils.cuh).
template <typename C> __device__ __forceinline__ void AdamWElem(C& p, C g, C& m, C& v, const AdamWScalars<C>& s) {
  p -= s.lr_wd * p;
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
  const C denom = sqrt(v) / s.bc2_sqrt + s.eps;
  p -= s.step_size * m / denom;
}

// P is the parameter/state type (float or double; it is also the math type), G the gradient type.
template <typename P, typename G>
__global__ void __launch_bounds__(kThreads) AdamWKernel(P* __restrict__ p, const G* __restrict__ g,
                                                        P* __restrict__ m, P* __restrict__ v, int64_t n,
                                                        AdamWScalars<P> s) {
  constexpr int V = 16 / sizeof(P);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nth = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t mis = Misalign<V>(p);
  int64_t head = n;
  if (mis == Misalign<V>(g) && mis == Misalign<V>(m) && mis == Misalign<V>(v)) head = Min(n, (V - mis) % V);
  const int64_t nvec = (n - head) / V;
  for (int64_t k = tid; k < nvec; k += nth) {
    const int64_t i = head + k * V;
    auto pv = *reinterpret_cast<Vec<P, V>*>(p + i);
    auto mv = *reinterpret_cast<Vec<P, V>*>(m + i);
    auto vv = *reinterpret_cast<Vec<P, V>*>(v + i);
    const auto gv = *reinterpret_cast<const Vec<G, V>*>(g + i);
#pragma unroll
    for (int e = 0; e < V; ++e) AdamWElem<P>(pv.v[e], static_cast<P>(Widen(gv.v[e])), mv.v[e], vv.v[e], s);
    *reinterpret_cast<Vec<P, V>*>(p + i) = pv;
    *reinterpret_cast<Vec<P, V>*>(m + i) = mv;
    *reinterpret_cast<Vec<P, V>*>(v + i) = vv;
  }
  const int64_t tail0 = head + nvec * V, nscalar = head + (n - tail0);
  for (int64_t k = tid; k < nscalar; k += nth) {
    const int64_t i = k < head ? k : tail0 + (k - head);
    P pi = p[i], mi = m[i], vi = v[i];
    AdamWElem<P>(pi, static_cast<P>(Widen(g[i])), mi, vi, s);
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
  }
}

// ---- squared norm: two passes so the sum is the same on every run (atomics would make it order-dependent) -------
template <typename A> __device__ __forceinline__ A BlockSum(A x) {
  __shared__ A warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(0xffffffffu, x, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = x;
  __syncthreads();
  x = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : A(0);
  if (threadIdx.x < 32) {
    for (int o = 16; o > 0; o /= 2) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  return x;  // valid in thread 0
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) SquaredNormPartial(const T* __restrict__ x, int64_t n, A* partial) {
  constexpr int V = 16 / sizeof(T);
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nth = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t head = Min(n, (V - Misalign<V>(x)) % V);
  const int64_t nvec = (n - head) / V;
  A acc = 0;
  for (int64_t k = tid; k < nvec; k += nth) {
    const auto xv = *reinterpret_cast<const Vec<T, V>*>(x + head + k * V);
#pragma unroll
    for (int e = 0; e < V; ++e) {
      const A y = static_cast<A>(Widen(xv.v[e]));
      acc += y * y;
    }
  }
  const int64_t tail0 = head + nvec * V, nscalar = head + (n - tail0);
  for (int64_t k = tid; k < nscalar; k += nth) {
    const A y = static_cast<A>(Widen(x[k < head ? k : tail0 + (k - head)]));
    acc += y * y;
  }
  acc = BlockSum(acc);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

template <typename A, typename O>
__global__ void __launch_bounds__(kThreads) SquaredNormFinal(const A* partial, int num_partials, O* out) {
  A acc = 0;
  for (int i = threadIdx.x; i < num_partials; i += blockDim.x) acc += partial[i];
  acc = BlockSum(acc);
  using W = std::common_type_t<A, O>;
  if (threadIdx.x == 0) out[0] = static_cast<O>(static_cast<W>(out[0]) + static_cast<W>(acc));
}

// ---- host side ---------------------------------------------------------------------------------------------------
// Kernels launch on the buffers' device (CudaDeviceGuard), whatever device the calling thread had current.

absl::Status CudaError(const char* what, int device, cudaError_t err) {
  return absl::InternalError(absl::StrFormat("%s on cuda:%d: %s (%s)", what, device, cudaGetErrorString(err),
                                             cudaGetErrorName(err)));
}

absl::Status CheckLaunch(const char* kernel, int device) {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? absl::OkStatus() : CudaError(kernel, device, err);
}

// Enough blocks to fill every SM (kThreads x 8 = 2048 resident threads per SM on sm_80/sm_90), fewer for small work.
int GridFor(int64_t work_blocks, int device) {
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 132;
  return static_cast<int>(std::clamp<int64_t>(work_blocks, 1, int64_t{sms} * 8));
}

// Runs f(T{}) with T the C++ type of `dtype` (host side).
template <typename F> void DispatchHost(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
    case DType::kBFloat16: f(bf16{}); break;
    case DType::kFloat16: f(half{}); break;
  }
}

template <bool kIn>
absl::Status Pack(absl::Span<const BufferView> params, const shard::ShardPlan& plan, int64_t shard_numel, double scale,
                  BufferView flat, void* stream) {
  const int device = flat.device.index;
  CudaDeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return CudaError(kIn ? "CopyIn: cudaSetDevice" : "CopyOut: cudaSetDevice", device, guard.error());
  const int64_t n = static_cast<int64_t>(params.size());
  // CopyIn always writes the whole rows (even with no parameters: then it only zeroes); CopyOut only what it reads.
  const int64_t batches = std::max<int64_t>(kIn ? 1 : 0, (n + kMaxParamsPerLaunch - 1) / kMaxParamsPerLaunch);
  for (int64_t batch = 0; batch < batches; ++batch) {
    const int64_t b = batch * kMaxParamsPerLaunch;
    PackArgs a{};
    a.num_params = static_cast<int32_t>(std::min<int64_t>(kMaxParamsPerLaunch, n - b));
    for (int i = 0; i < a.num_params; ++i) {
      const shard::ParamSlot& slot = plan.slot(b + i);
      a.params[i] = {params[b + i].data, slot.numel, slot.chunk, slot.shard_offset,
                     static_cast<int32_t>(params[b + i].dtype)};
    }
    a.world = plan.world();
    a.shard_numel = shard_numel;
    const PackParam* last = a.num_params > 0 ? &a.params[a.num_params - 1] : nullptr;
    a.q_begin = a.num_params > 0 ? a.params[0].offset : 0;
    a.params_end = last ? last->offset + last->chunk : 0;
    a.q_end = kIn && batch == batches - 1 ? shard_numel : a.params_end;
    if (a.q_end <= a.q_begin) continue;  // nothing to write (empty parameters only)
    a.tiles_per_row = (a.q_end - a.q_begin + kTile - 1) / kTile;
    a.flat = flat.data;
    a.scale = scale;
    const int grid = GridFor(a.tiles_per_row * a.world, device);
    DispatchHost(flat.dtype, [&](auto tag) {
      PackKernel<decltype(tag), kIn><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
    });
    absl::Status s = CheckLaunch(kIn ? "CopyIn kernel (PackKernel<in>)" : "CopyOut kernel (PackKernel<out>)", device);
    if (!s.ok()) return s;
  }
  return absl::OkStatus();
}

template <typename C> AdamWScalars<C> MakeAdamWScalars(const AdamWConfig& c) {
  const double bc1 = 1.0 - std::pow(c.beta1, static_cast<double>(c.step));
  const double bc2 = 1.0 - std::pow(c.beta2, static_cast<double>(c.step));
  return {static_cast<C>(c.lr * c.weight_decay), static_cast<C>(c.beta1), static_cast<C>(1.0 - c.beta1),
          static_cast<C>(c.beta2), static_cast<C>(1.0 - c.beta2), static_cast<C>(c.lr / bc1),
          static_cast<C>(std::sqrt(bc2)), static_cast<C>(c.eps)};
}

}  // namespace

absl::Status CopyIn(absl::Span<const BufferView> params, const shard::ShardPlan& plan, int64_t shard_numel,
                    double scale, BufferView dst, void* stream) {
  return Pack<true>(params, plan, shard_numel, scale, dst, stream);
}

absl::Status CopyOut(BufferView src, const shard::ShardPlan& plan, int64_t shard_numel,
                     absl::Span<const BufferView> params, void* stream) {
  return Pack<false>(params, plan, shard_numel, 1.0, src, stream);
}

absl::Status Cast(BufferView src, BufferView dst, void* stream) {
  const int device = dst.device.index;
  if (src.count == 0 || (src.data == dst.data && src.dtype == dst.dtype)) return absl::OkStatus();
  CudaDeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return CudaError("Cast: cudaSetDevice", device, guard.error());
  auto s = static_cast<cudaStream_t>(stream);
  if (src.dtype == dst.dtype) {  // the driver's copy path is at least as fast as any kernel of ours
    const cudaError_t err = cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDeviceToDevice, s);
    return err == cudaSuccess ? absl::OkStatus() : CudaError("Cast: cudaMemcpyAsync", device, err);
  }
  const int grid = GridFor((src.count + kThreads * 8 - 1) / (kThreads * 8), device);
  DispatchHost(src.dtype, [&](auto stag) {
    DispatchHost(dst.dtype, [&](auto dtag) {
      using S = decltype(stag);
      using D = decltype(dtag);
      CastKernel<S, D><<<grid, kThreads, 0, s>>>(static_cast<const S*>(src.data), static_cast<D*>(dst.data), src.count);
    });
  });
  return CheckLaunch("Cast kernel", device);
}

absl::Status FusedAdamW(BufferView param, BufferView grad, BufferView exp_avg, BufferView exp_avg_sq,
                        const AdamWConfig& config, void* stream) {
  const int device = param.device.index;
  if (param.count == 0) return absl::OkStatus();
  if (param.dtype != DType::kFloat32 && param.dtype != DType::kFloat64) {
    return absl::InvalidArgumentError(absl::StrFormat("FusedAdamW: parameter dtype %s is not float32 or float64",
                                                      DTypeName(param.dtype)));
  }
  CudaDeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return CudaError("FusedAdamW: cudaSetDevice", device, guard.error());
  const int grid = GridFor((param.count + kThreads * 4 - 1) / (kThreads * 4), device);
  auto s = static_cast<cudaStream_t>(stream);
  auto launch = [&](auto ptag) {
    using P = decltype(ptag);
    DispatchHost(grad.dtype, [&](auto gtag) {
      using G = decltype(gtag);
      AdamWKernel<P, G><<<grid, kThreads, 0, s>>>(param.as<P>(), static_cast<const G*>(grad.data), exp_avg.as<P>(),
                                                  exp_avg_sq.as<P>(), param.count, MakeAdamWScalars<P>(config));
    });
  };
  if (param.dtype == DType::kFloat32) launch(float{}); else launch(double{});
  return CheckLaunch("FusedAdamW kernel", device);
}

absl::Status SquaredNormAccumulate(BufferView x, BufferView out, void* stream) {
  const int device = x.device.index;
  if (x.count == 0) return absl::OkStatus();
  if (out.dtype != DType::kFloat32 && out.dtype != DType::kFloat64) {
    return absl::InvalidArgumentError(absl::StrFormat("SquaredNormAccumulate: output dtype %s is not float32 or float64",
                                                      DTypeName(out.dtype)));
  }
  CudaDeviceGuard guard(device);
  if (guard.error() != cudaSuccess) return CudaError("SquaredNormAccumulate: cudaSetDevice", device, guard.error());
  auto s = static_cast<cudaStream_t>(stream);
  // The block count depends on n alone, never on the GPU, so the summation order (and the result) is reproducible.
  const int blocks = static_cast<int>(std::clamp<int64_t>((x.count + kThreads * 16 - 1) / (kThreads * 16), 1,
                                                          kMaxNormBlocks));
  const bool wide = x.dtype == DType::kFloat64;
  void* partial = nullptr;
  // Stream-ordered scratch: freed after the final kernel on the same stream, so no host sync and no shared buffer
  // that two streams could race on.
  cudaError_t err = cudaMallocAsync(&partial, blocks * (wide ? sizeof(double) : sizeof(float)), s);
  if (err != cudaSuccess) return CudaError("SquaredNormAccumulate: cudaMallocAsync", device, err);
  auto run = [&](auto atag) {
    using A = decltype(atag);
    DispatchHost(x.dtype, [&](auto xtag) {
      using T = decltype(xtag);
      SquaredNormPartial<T, A><<<blocks, kThreads, 0, s>>>(static_cast<const T*>(x.data), x.count,
                                                           static_cast<A*>(partial));
    });
    if (out.dtype == DType::kFloat32) {
      SquaredNormFinal<A, float><<<1, kThreads, 0, s>>>(static_cast<A*>(partial), blocks, out.as<float>());
    } else {
      SquaredNormFinal<A, double><<<1, kThreads, 0, s>>>(static_cast<A*>(partial), blocks, out.as<double>());
    }
  };
  if (wide) run(double{}); else run(float{});
  const cudaError_t launch_err = cudaGetLastError();
  err = cudaFreeAsync(partial, s);  // even after a failed launch, so the scratch never leaks
  if (launch_err != cudaSuccess) return CudaError("SquaredNormAccumulate kernels", device, launch_err);
  return err == cudaSuccess ? absl::OkStatus() : CudaError("SquaredNormAccumulate: cudaFreeAsync", device, err);
}

}  // namespace tessera::kernels::cuda
