// Host staging arena and device->host copies. The CUDA part is deliberately small (it cannot run on the CPU-only
// development machines): a pinned arena, cudaMemcpyAsync on a per-device side stream, synchronize per chunk.
#include "tessera/checkpoint/staging.h"

#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tessera/core/status.h"

#ifdef TESSERA_WITH_CUDA
#include <cuda_runtime_api.h>
#define TESSERA_CUDA_RETURN(expr)                                                                         \
  do {                                                                                                    \
    cudaError_t _e = (expr);                                                                              \
    if (_e != cudaSuccess) return absl::InternalError(absl::StrCat(#expr, ": ", cudaGetErrorString(_e))); \
  } while (0)
#endif

namespace tessera::checkpoint::internal {
namespace {
constexpr int64_t kArenaGranule = int64_t{2} << 20;  // round capacity up to 2 MiB (huge-page friendly)
}

Stager::~Stager() {
  Free();
#ifdef TESSERA_WITH_CUDA
  for (auto& [device, stream] : streams_) {
    cudaSetDevice(device);
    cudaStreamDestroy(static_cast<cudaStream_t>(stream));
  }
#endif
}

void Stager::Free() {
  if (data_ == nullptr) return;
#ifdef TESSERA_WITH_CUDA
  if (pinned_) {
    cudaFreeHost(data_);
    data_ = nullptr;
  }
#endif
  std::free(data_);
  data_ = nullptr;
  capacity_ = 0;
}

absl::Status Stager::Reserve(int64_t data_bytes, bool pinned) {
  const int64_t bytes = kHeaderBytes + data_bytes + 4096;  // header, data, slack for the last direct write
  if (bytes <= capacity_ && (pinned_ || !pinned)) return absl::OkStatus();
  Free();
  const int64_t cap = (std::max<int64_t>(bytes, 1) + kArenaGranule - 1) / kArenaGranule * kArenaGranule;
  if (pinned) {
#ifdef TESSERA_WITH_CUDA
    void* p = nullptr;
    cudaError_t e = cudaHostAlloc(&p, static_cast<size_t>(cap), cudaHostAllocDefault);
    if (e != cudaSuccess) {
      return absl::ResourceExhaustedError(
          absl::StrFormat("could not allocate %d bytes of pinned staging memory: %s", cap, cudaGetErrorString(e)));
    }
    data_ = static_cast<char*>(p);
#else
    return absl::FailedPreconditionError("pinned staging memory requested, but tessera was built without CUDA");
#endif
  } else {
    data_ = static_cast<char*>(std::aligned_alloc(4096, static_cast<size_t>(cap)));
    if (data_ == nullptr) {
      return absl::ResourceExhaustedError(absl::StrFormat("could not allocate %d bytes of staging memory", cap));
    }
  }
  capacity_ = cap;
  pinned_ = pinned;
  return absl::OkStatus();
}

absl::Status Stager::Copy(char* dst, const BufferView& src, int64_t offset, int64_t bytes) {
  const char* from = static_cast<const char*>(src.data) + offset;
  if (!src.device.is_cuda()) {
    std::memcpy(dst, from, static_cast<size_t>(bytes));
    return absl::OkStatus();
  }
#ifdef TESSERA_WITH_CUDA
  const int device = src.device.index;
  TESSERA_CUDA_RETURN(cudaSetDevice(device));
  auto it = streams_.find(device);
  if (it == streams_.end()) {
    cudaStream_t s;
    TESSERA_CUDA_RETURN(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    it = streams_.emplace(device, static_cast<void*>(s)).first;
  }
  cudaStream_t stream = static_cast<cudaStream_t>(it->second);
  TESSERA_CUDA_RETURN(cudaMemcpyAsync(dst, from, static_cast<size_t>(bytes), cudaMemcpyDeviceToHost, stream));
  TESSERA_CUDA_RETURN(cudaStreamSynchronize(stream));
  return absl::OkStatus();
#else
  return absl::FailedPreconditionError(
      absl::StrCat("cannot stage from ", src.device.ToString(), ": tessera was built without CUDA"));
#endif
}

}  // namespace tessera::checkpoint::internal
