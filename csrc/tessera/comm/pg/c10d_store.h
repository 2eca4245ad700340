// The desync protocol's KeyValueStore (comm/desync.h) over a torch c10d Store (TCPStore, FileStore, PrefixStore:
// the store the ranks already rendezvoused through). Store errors (exceptions) come back as Status.
// Only C++ stores: a Store subclassed in Python would need the GIL, which waits release.
#pragma once

#include <torch/csrc/distributed/c10d/Store.hpp>

#include "tessera/comm/desync.h"

namespace tessera::comm {

class C10dStore final : public KeyValueStore {
 public:
  explicit C10dStore(c10::intrusive_ptr<c10d::Store> store) : store_(std::move(store)) {}

  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::vector<std::optional<std::string>>> TryGet(absl::Span<const std::string> keys) override;
  absl::Status Wait(absl::Span<const std::string> keys, absl::Duration timeout) override;
  absl::Status Delete(const std::string& key) override;

 private:
  c10::intrusive_ptr<c10d::Store> store_;
};

}  // namespace tessera::comm
