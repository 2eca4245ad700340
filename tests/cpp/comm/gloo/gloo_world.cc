#include "comm/gloo/gloo_world.h"

#include <atomic>
#include <string>
#include <thread>

#include "tessera/comm/gloo/gloo_communicator.h"

namespace tessera::testing {

absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreateGlooCommunicators(
    int size, std::shared_ptr<comm::KeyValueStore> store, absl::Duration timeout) {
  static std::atomic<int> worlds{0};
  const std::string prefix = "gloo_test/" + std::to_string(worlds++);
  std::vector<absl::StatusOr<std::unique_ptr<comm::GlooCommunicator>>> made(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) {
    threads.emplace_back(
        [&, r] { made[r] = comm::GlooCommunicator::Create(r, size, store, prefix, timeout, "127.0.0.1"); });
  }
  for (auto& t : threads) t.join();
  std::vector<std::unique_ptr<comm::Communicator>> comms;
  for (auto& m : made) {
    if (!m.ok()) return m.status();
    comms.push_back(std::move(*m));
  }
  return comms;
}

absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreateGlooCommunicators(int size,
                                                                                         absl::Duration timeout) {
  return CreateGlooCommunicators(size, std::make_shared<comm::InMemoryStore>(), timeout);
}

}  // namespace tessera::testing
