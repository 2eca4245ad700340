// Makes one communicator per rank of a world, each on its own thread (a backend's Create blocks until every rank
// has joined, so the ranks must be created concurrently).
#pragma once

#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "tessera/comm/communicator.h"

namespace tessera::testing {

// create(rank) runs on a thread per rank; the first rank's error, if any, is returned.
template <class C>
absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreateOnThreads(
    int size, const std::function<absl::StatusOr<std::unique_ptr<C>>(int rank)>& create) {
  std::vector<absl::StatusOr<std::unique_ptr<C>>> made(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r) threads.emplace_back([&, r] { made[r] = create(r); });
  for (auto& t : threads) t.join();
  std::vector<std::unique_ptr<comm::Communicator>> comms;
  for (auto& m : made) {
    if (!m.ok()) return m.status();
    comms.push_back(std::move(*m));
  }
  return comms;
}

}  // namespace tessera::testing
