// Makes a CUDA device current for a scope and restores the caller's device on exit: kernel launches and NCCL calls
// act on their buffers' or communicator's device, whatever device the calling thread had current. CUDA builds only.
#pragma once

#include <cuda_runtime.h>

namespace tessera {

class CudaDeviceGuard {
 public:
  explicit CudaDeviceGuard(int device) {
    if (cudaGetDevice(&previous_) == cudaSuccess && previous_ != device) {
      error_ = cudaSetDevice(device);
    } else {
      previous_ = -1;
    }
  }
  ~CudaDeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  CudaDeviceGuard(const CudaDeviceGuard&) = delete;
  CudaDeviceGuard& operator=(const CudaDeviceGuard&) = delete;

  // cudaSuccess, or why the device could not be made current.
  cudaError_t error() const { return error_; }

 private:
  int previous_ = -1;
  cudaError_t error_ = cudaSuccess;
};

}  // namespace tessera
