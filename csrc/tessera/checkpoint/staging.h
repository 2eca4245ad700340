// The writer's staging memory: one host arena reused across saves (see [Note: staging arena] in writer.cc), pinned
// when CUDA pieces are staged, plus the side streams device->host copies run on. Not part of the public API.
#pragma once

#include <cstdint>
#include <map>

#include "absl/status/status.h"
#include "tessera/core/buffer.h"

namespace tessera::checkpoint::internal {

class Stager {
 public:
  Stager() = default;
  Stager(const Stager&) = delete;
  Stager& operator=(const Stager&) = delete;
  ~Stager();

  // Ensures the arena holds `bytes` of piece data (pinned if `pinned`); keeps the current one when big enough.
  // The memory is the data file's image: the file header at image() (page-aligned), the arena at data() =
  // image() + kFileHeaderBytes, so file offset f lives at image() + f and aligned offsets are aligned addresses
  // (what direct writes need). At least kDirectIOAlign bytes of slack follow the data.
  absl::Status Reserve(int64_t bytes, bool pinned);
  char* image() const { return data_; }
  char* data() const { return data_ + kHeaderBytes; }
  static constexpr int64_t kHeaderBytes = 64;  // == kFileHeaderBytes (format.h)
  // Copies bytes [offset, offset + bytes) of `src` (CPU or CUDA) to `dst` in the arena; done on return.
  absl::Status Copy(char* dst, const BufferView& src, int64_t offset, int64_t bytes);

 private:
  void Free();

  char* data_ = nullptr;
  int64_t capacity_ = 0;
  bool pinned_ = false;
  // One non-blocking side stream per CUDA device: D2H copies then never queue behind the compute stream's kernels.
  // The caller makes the data ready (synchronizes its stream) before Save; see writer.h.
  std::map<int, void*> streams_;
};

}  // namespace tessera::checkpoint::internal
