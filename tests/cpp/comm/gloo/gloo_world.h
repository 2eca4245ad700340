// Test helper: the gloo communicators of a whole world as threads of this process, meeting through one
// InMemoryStore (the gloo base_test pattern), listening on loopback.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tessera/comm/communicator.h"
#include "tessera/comm/desync.h"

namespace tessera::testing {

// Creates ranks 0..size-1 concurrently (connecting blocks until every rank joined) under a prefix unique within
// this process; the first error of any rank, if one fails. `timeout` bounds the rendezvous.
absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreateGlooCommunicators(
    int size, absl::Duration timeout = absl::Seconds(30));

// The same over a caller's store (to share it, or to inject store failures).
absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreateGlooCommunicators(
    int size, std::shared_ptr<comm::KeyValueStore> store, absl::Duration timeout);

}  // namespace tessera::testing
