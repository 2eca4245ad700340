// The `pg` backend under test without gloo: comm::PgCommunicator over a c10d::ProcessGroup whose only backend is
// LocalThreadsBackend (pg_over_local.cc), an in-process stand-in for ProcessGroupGloo that runs each collective on
// a comm::LocalWorld (one thread per rank). The torch wheel ships no gloo headers, so gloo itself cannot be linked
// into a C++ test; what this checks is tessera's adapter (tensor views, option mapping, AVG by division, Wait,
// timeouts, error mapping), not gloo.
//
// Torch-free on purpose: the conformance suite includes it without paying for torch headers.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "tessera/comm/communicator.h"

namespace tessera::testing {

// The communicators of `world` ranks, index = rank. Each owns its ProcessGroup (PgCommunicator holds it weakly,
// as torch.distributed owns the groups in a real job; here the test plays torch.distributed).
absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreatePgOverLocalCommunicators(int world);

}  // namespace tessera::testing
