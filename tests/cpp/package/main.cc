// A C++ trainer's view of tessera: find_package(Tessera), link Tessera::core, use the plan and a communicator.
#include <limits.h>
#include <stdlib.h>

#include <cstdio>
#include <thread>
#include <vector>

#include "tessera/comm/local/local_communicator.h"
#include "tessera/shard/plan.h"
#ifdef TESSERA_WITH_GLOO
#include "tessera/comm/desync.h"
#include "tessera/comm/gloo/gloo_communicator.h"
#include "tessera/comm/gloo/gloo_plugin.h"

// Two gloo ranks on threads over loopback: an all-reduce of {1, 2} and {10, 20} must give {11, 22} on both.
// `plugin`: through the isolated plugin at that path (comm/gloo/gloo_plugin.h) instead of Tessera::gloo directly.
static bool GlooWorks(const char* plugin = nullptr) {
  auto store = std::make_shared<tessera::comm::InMemoryStore>();
  std::vector<std::vector<float>> bufs = {{1, 2}, {10, 20}};
  std::vector<bool> ok(2, false);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    threads.emplace_back([&, r] {
      absl::StatusOr<std::unique_ptr<tessera::comm::Communicator>> comm;
      if (plugin == nullptr) {
        comm = tessera::comm::GlooCommunicator::Create(r, 2, store, "package", absl::Seconds(30), "127.0.0.1");
      } else {
        comm = tessera::comm::CreateGlooCommunicatorIsolated(plugin, r, 2, store, "package_plugin",
                                                             absl::Seconds(30), "127.0.0.1");
      }
      if (!comm.ok()) {
        std::fprintf(stderr, "rank %d: %s\n", r, comm.status().ToString().c_str());
        return;
      }
      tessera::BufferView view{bufs[r].data(), tessera::DType::kFloat32, 2, tessera::Device::CPU()};
      auto work = (*comm)->AllReduce(view, tessera::comm::ReduceOp::kSum);
      ok[r] = work.ok() && (*work)->Wait().ok() && bufs[r][0] == 11 && bufs[r][1] == 22;
    });
  }
  for (auto& t : threads) t.join();
  return ok[0] && ok[1];
}
#endif

int main(int argc, char** argv) {
  auto plan = tessera::shard::ShardPlan::Create({10, 3}, 4);
  if (!plan.ok() || plan->shard_numel() != 4) return 1;  // ceil(10/4) + ceil(3/4) = 3 + 1
#ifdef TESSERA_WITH_GLOO
  if (!GlooWorks()) return 2;
  std::printf("tessera package: gloo all-reduce OK\n");
#endif
#ifdef TESSERA_PACKAGE_GLOO_PLUGIN
  // Given no path, the library finds the plugin of the package this was built against, wherever that package was
  // installed or moved to: the package's TESSERA_GLOO_PLUGIN, or argv[1] where scripts/check_cmake_package.sh
  // moved the tree since (see [Note: finding the gloo plugin]).
  char expected[PATH_MAX];
  if (realpath(argc > 1 ? argv[1] : TESSERA_PACKAGE_GLOO_PLUGIN, expected) == nullptr) return 3;
  auto found = tessera::comm::FindGlooPlugin();
  if (!found.ok() || *found != expected) {
    std::fprintf(stderr, "FindGlooPlugin() gave %s, expected the package's %s\n",
                 found.ok() ? found->c_str() : found.status().ToString().c_str(), expected);
    return 3;
  }
  if (!GlooWorks("")) return 4;  // "": the plugin FindGlooPlugin() finds
  std::printf("tessera package: gloo all-reduce through the plugin %s OK\n", expected);
#endif
  std::printf("tessera package OK: shard_numel=%lld\n", static_cast<long long>(plan->shard_numel()));
  return 0;
}
