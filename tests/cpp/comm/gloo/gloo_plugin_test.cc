// The gloo communicator loaded as an isolated plugin (comm/gloo/gloo_plugin.h) in a process where libtorch_cpu's
// gloo is in the global scope, as in a C++ trainer that links libtorch. Built twice: in build/cpp (gloo_plugin_test)
// libtorch_cpu.so is dlopen'ed RTLD_GLOBAL before any plugin is loaded (TESSERA_TEST_LIBTORCH_CPU, found from the
// build's Python at configure time), which puts its 340 gloo symbols ahead of anything loaded later; in the torch
// build (tests/cpp/torch, gloo_plugin_torch_test) the executable links libtorch_cpu (DT_NEEDED) as a trainer does.
// Both binaries also run the comm conformance suite over the plugin (backend `gloo_plugin`).
// See [Note: two gloos in one process].
#include <dlfcn.h>
#include <limits.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"
#include "comm/gloo/gloo_plugin_world.h"
#include "tessera/comm/desync.h"
#include "tessera/comm/gloo/gloo_plugin.h"

namespace tessera::comm {
namespace {

constexpr char kCreateDevice[] = "_ZN4gloo9transport3tcp12CreateDeviceERKNS1_4attrE";

using ::tessera::testing::LoadTorchGlobally;

// The file that defines `symbol`, or "" if it cannot be told.
std::string FileOf(void* address) {
  Dl_info info;
  if (address == nullptr || dladdr(address, &info) == 0 || info.dli_fname == nullptr) return "";
  return info.dli_fname;
}

BufferView View(std::vector<float>& v) {
  return BufferView{v.data(), DType::kFloat32, static_cast<int64_t>(v.size()), Device::CPU()};
}

TEST(GlooPlugin, TorchGlooIsGlobalSoTheOtherTestsMeanSomething) {
  const std::string why = LoadTorchGlobally();
  if (!why.empty()) GTEST_SKIP() << why;
  // The precondition of the isolation test: a plain (global-scope) lookup finds torch's gloo.
  EXPECT_TRUE(absl::StrContains(FileOf(dlsym(RTLD_DEFAULT, kCreateDevice)), "libtorch_cpu"))
      << FileOf(dlsym(RTLD_DEFAULT, kCreateDevice));
}

TEST(GlooPlugin, GlooInsideThePluginResolvesToLibglooNotTorch) {
  const std::string why = LoadTorchGlobally();
  if (!why.empty()) GTEST_SKIP() << why;
  // Loads the plugin (through the same dlopen as CreateGlooCommunicatorIsolated: a failed create still loads it).
  auto none = CreateGlooCommunicatorIsolated(TESSERA_TEST_GLOO_PLUGIN, 0, 1, nullptr, "x", absl::Seconds(1));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kInvalidArgument) << none.status();
  // RTLD_NOLOAD: the handle of the already-loaded plugin; no second load with other flags.
  void* handle = dlopen(TESSERA_TEST_GLOO_PLUGIN, RTLD_NOW | RTLD_NOLOAD);
  ASSERT_NE(handle, nullptr) << dlerror();
  auto origin = reinterpret_cast<gloo_plugin_abi::GlooOriginFn>(dlsym(handle, gloo_plugin_abi::kGlooOriginEntry));
  ASSERT_NE(origin, nullptr) << dlerror();
  const char* file = origin();
  ASSERT_NE(file, nullptr);
  EXPECT_TRUE(absl::StrContains(file, "libgloo.so")) << "the plugin's gloo::transport::tcp::CreateDevice is " << file;
  EXPECT_FALSE(absl::StrContains(file, "libtorch")) << file;
  // And the plugin put nothing into the global scope: a global lookup still finds torch's gloo.
  EXPECT_TRUE(absl::StrContains(FileOf(dlsym(RTLD_DEFAULT, kCreateDevice)), "libtorch_cpu"));
  // Only the entries are exported: no tessera or gloo symbol of the plugin is visible through its handle.
  // (tessera::comm::ValidateCollective(const Collective&, int) is linked into the plugin, hidden.)
  EXPECT_EQ(dlsym(handle, "_ZN7tessera4comm18ValidateCollectiveERKNS0_10CollectiveEi"), nullptr);
  dlclose(handle);  // drops the NOLOAD reference only; the loader's own reference keeps it loaded
}

TEST(GlooPlugin, TwoRanksAllReduceAndAllGatherThroughThePluginWithTorchLoaded) {
  const std::string why = LoadTorchGlobally();
  if (!why.empty()) GTEST_SKIP() << why;
  constexpr int W = 2;
  auto store = std::make_shared<InMemoryStore>();
  std::vector<std::vector<float>> reduced = {{1, 2, 3}, {10, 20, 30}};
  std::vector<std::vector<float>> in = {{1, 2}, {3, 4}};
  std::vector<std::vector<float>> gathered(W, std::vector<float>(4, -1));
  std::vector<absl::Status> status(W);
  std::vector<std::string> backend(W);
  std::vector<std::thread> threads;
  for (int r = 0; r < W; ++r) {
    threads.emplace_back([&, r] {
      auto comm = CreateGlooCommunicatorIsolated(TESSERA_TEST_GLOO_PLUGIN, r, W, store, "plugin_test",
                                                 absl::Seconds(30), "127.0.0.1");
      if (!comm.ok()) {
        status[r] = comm.status();
        return;
      }
      backend[r] = (*comm)->backend_name();
      (*comm)->set_step(3);  // host code on the plugin's object: the Communicator base is shared by layout
      auto sum = (*comm)->AllReduce(View(reduced[r]), ReduceOp::kSum);
      status[r] = sum.ok() ? (*sum)->Wait() : sum.status();
      if (!status[r].ok()) return;
      auto gather = (*comm)->AllGather(View(in[r]), View(gathered[r]));
      status[r] = gather.ok() ? (*gather)->Wait() : gather.status();
      if (status[r].ok()) status[r] = (*comm)->Barrier(absl::Seconds(30));
      // The communicator (the plugin's object, worker thread and gloo context) is destroyed here, virtually.
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < W; ++r) {
    ASSERT_TRUE(status[r].ok()) << "rank " << r << ": " << status[r];
    EXPECT_EQ(backend[r], "gloo");
    EXPECT_EQ(reduced[r], (std::vector<float>{11, 22, 33})) << "rank " << r;
    EXPECT_EQ(gathered[r], (std::vector<float>{1, 2, 3, 4})) << "rank " << r;
  }
}

TEST(GlooPlugin, MissingPluginIsNotFoundNamingThePath) {
  auto comm = CreateGlooCommunicatorIsolated("/nonexistent/libtessera_gloo_plugin.so", 0, 1,
                                             std::make_shared<InMemoryStore>(), "p", absl::Seconds(1));
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kNotFound) << comm.status();
  EXPECT_TRUE(absl::StrContains(comm.status().message(), "/nonexistent/libtessera_gloo_plugin.so")) << comm.status();
}

TEST(GlooPlugin, FileThatIsNoLibraryIsFailedPreconditionWithDlerror) {
  const std::string path = ::testing::TempDir() + "/not_a_plugin_" + std::to_string(getpid()) + ".so";
  std::ofstream(path) << std::string(256, 'x');  // longer than an ELF header, so dlopen reads and rejects it
  auto comm = CreateGlooCommunicatorIsolated(path, 0, 1, std::make_shared<InMemoryStore>(), "p", absl::Seconds(1));
  EXPECT_EQ(comm.status().code(), absl::StatusCode::kFailedPrecondition) << comm.status();
  EXPECT_TRUE(absl::StrContains(comm.status().message(), path)) << comm.status();
  EXPECT_TRUE(absl::StrContains(comm.status().message(), "invalid ELF header")) << comm.status();  // dlerror()
  std::remove(path.c_str());
}

// Installed packages are checked by scripts/check_cmake_package.sh (any prefix, moved trees). In the build tree
// the test binary has no plugin next to it nor in its RUNPATH: the error says where it looked and what to do.
TEST(GlooPlugin, NotFoundNamesWhereItLookedAndTheOverride) {
  char self[PATH_MAX];
  ASSERT_NE(realpath("/proc/self/exe", self), nullptr);
  const std::string dir = std::string(self).substr(0, std::string(self).rfind('/'));
  auto found = FindGlooPlugin();
  if (found.ok()) GTEST_SKIP() << "a plugin is installed where this binary looks: " << *found;
  EXPECT_EQ(found.status().code(), absl::StatusCode::kNotFound) << found.status();
  EXPECT_TRUE(absl::StrContains(found.status().message(), dir + "/libtessera_gloo_plugin.so")) << found.status();
  EXPECT_TRUE(absl::StrContains(found.status().message(), "RUNPATH")) << found.status();
  EXPECT_TRUE(absl::StrContains(found.status().message(), "WorldOptions::gloo_plugin")) << found.status();
  // The same error from the communicator given no path.
  auto comm = CreateGlooCommunicatorIsolated("", 0, 1, std::make_shared<InMemoryStore>(), "p", absl::Seconds(1));
  EXPECT_EQ(comm.status(), found.status());
}

}  // namespace
}  // namespace tessera::comm
