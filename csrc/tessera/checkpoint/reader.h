// Loading: list committed steps, open one (manifest parsed and validated, every data file's header and size
// checked before any tensor is read), and read any element range of any tensor: pieces from whatever ranks saved
// them, each piece's XXH3 verified on its first read. Errors name the file and the tensor (DataLoss for damage).
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tessera/checkpoint/format.h"
#include "tessera/checkpoint/storage.h"
#include "tessera/core/buffer.h"

namespace tessera::checkpoint {

// Committed steps (directories step-* holding a manifest.json), newest first.
absl::StatusOr<std::vector<int64_t>> ListCommittedSteps(Storage& storage);
// The step named by ROOT/latest, if the file exists and parses.
absl::StatusOr<std::optional<int64_t>> ReadLatest(Storage& storage);

class CheckpointReader {
 public:
  static absl::StatusOr<std::unique_ptr<CheckpointReader>> Open(std::shared_ptr<Storage> storage, int64_t step);
  virtual ~CheckpointReader() = default;
  virtual const Manifest& manifest() const = 0;
  // Fills dst (CPU, dst.count elements, the tensor's dtype) with elements [start, start + dst.count) of `name`.
  virtual absl::Status Read(const std::string& name, int64_t start, BufferView dst) = 0;
  // Reads every piece once and checks its checksum (a full verification pass).
  virtual absl::Status VerifyAll() = 0;
};

}  // namespace tessera::checkpoint
