// A typed, non-owning view of device or host memory: what comm, kernels and checkpoint IO operate on.
#pragma once

#include <cstdint>
#include <string>

#include "absl/strings/str_format.h"
#include "tessera/core/dtype.h"

namespace tessera {

enum class DeviceType : int8_t { kCPU = 0, kCUDA = 1 };

struct Device {
  DeviceType type = DeviceType::kCPU;
  int index = -1;  // CUDA ordinal; -1 for CPU

  static Device CPU() { return {}; }
  static Device CUDA(int index) { return {DeviceType::kCUDA, index}; }
  bool is_cuda() const { return type == DeviceType::kCUDA; }
  bool operator==(const Device& o) const { return type == o.type && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
  std::string ToString() const {
    return is_cuda() ? absl::StrFormat("cuda:%d", index) : std::string("cpu");
  }
};

struct BufferView {
  void* data = nullptr;
  DType dtype = DType::kFloat32;
  int64_t count = 0;  // elements, not bytes
  Device device;

  int64_t bytes() const { return count * ElementSize(dtype); }
  // The sub-range [offset, offset + n) in elements.
  BufferView Slice(int64_t offset, int64_t n) const {
    return {static_cast<char*>(data) + offset * ElementSize(dtype), dtype, n, device};
  }
  template <typename T>
  T* as() const { return static_cast<T*>(data); }
};

}  // namespace tessera
