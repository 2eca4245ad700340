#include "tessera/comm/pg/c10d_store.h"

#include <chrono>
#include <exception>

#include "absl/strings/str_format.h"

namespace tessera::comm {
namespace {

absl::Status StoreError(const std::exception& e, const std::string& what) {
  return absl::UnavailableError(absl::StrFormat("c10d store: %s failed: %s", what, std::string(e.what()).substr(0, 500)));
}

std::string ToString(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }

}  // namespace

absl::Status C10dStore::Set(const std::string& key, const std::string& value) {
  try {
    store_->set(key, std::vector<uint8_t>(value.begin(), value.end()));
  } catch (const std::exception& e) {
    return StoreError(e, "set '" + key + "'");
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::optional<std::string>>> C10dStore::TryGet(absl::Span<const std::string> keys) {
  std::vector<std::optional<std::string>> out(keys.size());
  try {
    std::vector<std::string> all(keys.begin(), keys.end());
    // c10d's get() waits for an absent key, so check first: one round trip when every key exists.
    if (store_->check(all)) {
      std::vector<std::vector<uint8_t>> values = store_->multiGet(all);
      for (size_t i = 0; i < values.size(); ++i) out[i] = ToString(values[i]);
      return out;
    }
    if (keys.size() == 1) return out;  // absent: one round trip (the responder thread's idle poll)
    for (size_t i = 0; i < keys.size(); ++i) {
      if (store_->check({keys[i]})) out[i] = ToString(store_->get(keys[i]));
    }
  } catch (const std::exception& e) {
    return StoreError(e, absl::StrFormat("reading %d keys", keys.size()));
  }
  return out;
}

absl::Status C10dStore::Wait(absl::Span<const std::string> keys, absl::Duration timeout) {
  // c10d treats a zero timeout as "no timeout".
  const auto ms = std::chrono::milliseconds(std::max<int64_t>(1, absl::ToInt64Milliseconds(timeout)));
  try {
    store_->wait(std::vector<std::string>(keys.begin(), keys.end()), ms);
  } catch (const std::exception& e) {
    std::string msg = e.what();
    if (msg.find("imeout") != std::string::npos || msg.find("imed out") != std::string::npos) {
      return absl::DeadlineExceededError(absl::StrFormat("c10d store: keys not set within %s",
                                                         absl::FormatDuration(timeout)));
    }
    return StoreError(e, "wait");
  }
  return absl::OkStatus();
}

absl::Status C10dStore::Delete(const std::string& key) {
  try {
    store_->deleteKey(key);
  } catch (const std::exception& e) {
    return absl::UnimplementedError(absl::StrFormat("c10d store: cannot delete '%s': %s", key, e.what()));
  }
  return absl::OkStatus();
}

}  // namespace tessera::comm
