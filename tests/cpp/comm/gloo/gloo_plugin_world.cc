#include "comm/gloo/gloo_plugin_world.h"

#include <dlfcn.h>

#include <atomic>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "tessera/comm/desync.h"
#include "tessera/comm/gloo/gloo_plugin.h"
#include "testing/ranks_on_threads.h"

namespace tessera::testing {

std::string LoadTorchGlobally() {
#if defined(TESSERA_TEST_LIBTORCH_CPU_LINKED)
  // tests/cpp/torch: a DT_NEEDED of the executable, loaded before main().
  return dlopen("libtorch_cpu.so", RTLD_NOW | RTLD_NOLOAD) != nullptr ? "" : "libtorch_cpu.so is not loaded";
#elif defined(TESSERA_TEST_LIBTORCH_CPU)
  static const std::string error = [] {
    if (dlopen(TESSERA_TEST_LIBTORCH_CPU, RTLD_NOW | RTLD_GLOBAL) != nullptr) return std::string();
    return std::string("dlopen(" TESSERA_TEST_LIBTORCH_CPU ") failed: ") + dlerror();
  }();
  return error;
#else
  return "this build found no torch (TESSERA_TEST_LIBTORCH_CPU unset)";
#endif
}

absl::StatusOr<std::vector<std::unique_ptr<comm::Communicator>>> CreateGlooPluginCommunicators(int size) {
  if (const std::string why = LoadTorchGlobally(); !why.empty()) return absl::FailedPreconditionError(why);
  static std::atomic<int> worlds{0};
  const std::string prefix = "gloo_plugin_test/" + std::to_string(worlds++);
  auto store = std::make_shared<comm::InMemoryStore>();
  return CreateOnThreads<comm::Communicator>(size, [&](int r) {
    return comm::CreateGlooCommunicatorIsolated(TESSERA_TEST_GLOO_PLUGIN, r, size, store, prefix, absl::Seconds(30),
                                                "127.0.0.1");
  });
}

}  // namespace tessera::testing
