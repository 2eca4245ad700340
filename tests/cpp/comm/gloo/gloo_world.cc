#include "comm/gloo/gloo_world.h"

#include <atomic>
#include <string>

#include "tessera/comm/gloo/gloo_communicator.h"
#include "testing/ranks_on_threads.h"

namespace tessera::testing {

absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreateGlooCommunicators(
    int size, std::shared_ptr<comm::KeyValueStore> store, absl::Duration timeout) {
  static std::atomic<int> worlds{0};
  const std::string prefix = "gloo_test/" + std::to_string(worlds++);
  return CreateOnThreads<comm::GlooCommunicator>(size, [&](int r) {
    return comm::GlooCommunicator::Create(r, size, store, prefix, timeout, "127.0.0.1");
  });
}

absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreateGlooCommunicators(int size,
                                                                                         absl::Duration timeout) {
  return CreateGlooCommunicators(size, std::make_shared<comm::InMemoryStore>(), timeout);
}

}  // namespace tessera::testing
