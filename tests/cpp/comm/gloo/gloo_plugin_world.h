// Test helpers for the isolated gloo plugin (comm/gloo/gloo_plugin.h): libtorch_cpu's gloo in the global scope, and
// a world of plugin communicators as threads of this process. The including target defines
// TESSERA_TEST_GLOO_PLUGIN (the plugin's path) and either TESSERA_TEST_LIBTORCH_CPU (a libtorch_cpu.so to dlopen
// RTLD_GLOBAL) or TESSERA_TEST_LIBTORCH_CPU_LINKED (the executable links libtorch_cpu).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tessera/comm/communicator.h"

namespace tessera::testing {

// Puts libtorch_cpu.so into the global scope once (or checks that the executable linked it); "" when it is there,
// otherwise why not (this build found no torch).
std::string LoadTorchGlobally();

// Ranks 0..size-1 through CreateGlooCommunicatorIsolated(TESSERA_TEST_GLOO_PLUGIN, ...) over one InMemoryStore on
// loopback, after LoadTorchGlobally() (its failure is an error: a torch-free process would prove nothing).
absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreateGlooPluginCommunicators(int size);

}  // namespace tessera::testing
