// The gloo communicator loaded as an isolated plugin, for processes that also hold libtorch (and its gloo).
//
// [Note: two gloos in one process]
// The problem: libtorch_cpu.so exports its own, newer build of gloo; Debian's libgloo.so (which tessera_gloo is
// built against) exports the same mangled names (214 of them are defined by both), with different struct layouts.
// In one process the dynamic linker binds every reference to the first definition in the global scope, so in a C++
// trainer that links libtorch and Tessera::gloo either tessera's gloo calls run torch's gloo code, or torch's run
// Debian's: silent corruption or crashes, depending on load order.
//
// The fix: tessera_gloo (with the tessera_core it needs) and a link to libgloo are put in a module of their own,
// libtessera_gloo_plugin.so, which exports one versioned extern "C" entry (a version script hides every other
// symbol, so none of its gloo or tessera code can interpose on anyone). The process loads it with
// dlopen(RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND): DEEPBIND puts the plugin's own lookup scope (the plugin, libgloo
// and their dependencies) ahead of the global scope, so the plugin's and libgloo's gloo references bind to libgloo
// even when libtorch_cpu's gloo is already global; RTLD_LOCAL keeps libgloo out of the global scope, so torch's
// references keep binding to torch's gloo. The communicator crosses the boundary only as a Communicator (the
// interface in communicator.h): its vtable, methods and destructor are the plugin's code, called virtually.
// tests/cpp/comm/gloo/gloo_plugin_test.cc checks this with libtorch_cpu loaded first. Without DEEPBIND (LD_DEBUG=
// bindings, 2026-11): 7 of the plugin's 10 gloo references and 166 of libgloo's 348 own ones bound to libtorch_cpu,
// and the 2-rank test crashed (SIGSEGV); with it, all of them bound to libgloo, and none of torch's to libgloo.
//
// What crosses, and why that is sound: the plugin and the host must be built from the same tessera headers by the
// same compiler, against the same libstdc++ (std::string, std::shared_ptr, std::unique_ptr are shared by layout and
// freed through the one libstdc++/libc allocator) and the same Abseil. On Debian Abseil is linked shared
// (libabsl_*.so.20220623), so absl::Status and absl::Duration come from one copy in the process; the entry's
// argument block carries the ABI version, the Abseil LTS version and its own size, and a mismatch fails the load
// cleanly (FailedPrecondition) instead of misreading memory.
//
// Limits:
//   - The plugin holds its own copy of tessera_core (statically linked, hidden): process-wide state in tessera_core
//     (none that the communicator shares today) would exist twice. Only interface calls should cross.
//   - RTLD_DEEPBIND defeats symbol interposition for the plugin: it binds malloc/operator new to libc/libstdc++
//     even when the host replaces them (tcmalloc/jemalloc linked in or LD_PRELOADed), so memory allocated on one
//     side and freed on the other would pair two allocators. AddressSanitizer refuses RTLD_DEEPBIND outright. Such
//     hosts should use the torch-free Tessera::gloo, or load no torch.
//   - dynamic_cast / typeid of the returned object to GlooCommunicator from the host is not supported (the plugin's
//     type info is hidden); use the Communicator interface.
//   - The library is never unloaded (a communicator's worker thread and gloo's static state live in it).
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tessera/comm/communicator.h"
#include "tessera/comm/desync.h"

namespace tessera::comm {

// Creates GlooCommunicator::Create(rank, size, store, prefix, timeout, hostname) inside the plugin library at
// `plugin_path` (empty: the one FindGlooPlugin() finds), loaded with dlopen(RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND)
// so that the plugin and its libgloo bind to each other and never to gloo symbols already in the process, and
// nothing of them enters the global scope (see [Note: two gloos in one process]). The library stays loaded for the
// life of the process (loaded once per path). `hostname` as in GlooCommunicator::Create ("" = this host's name;
// one-host tests pass "127.0.0.1").
// Errors: NotFound (no file at the path, or no plugin found), FailedPrecondition (it cannot be loaded, lacks the
// entry, or was built against another tessera/Abseil ABI), each naming the path and dlerror(); otherwise
// GlooCommunicator::Create's.
absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicatorIsolated(
    const std::string& plugin_path, int rank, int size, std::shared_ptr<KeyValueStore> store,
    const std::string& prefix, absl::Duration timeout, const std::string& hostname = "");

// The plugin that CreateGlooCommunicatorIsolated loads when it is given no path: the absolute path of the first
// libtessera_gloo_plugin.so found (see [Note: finding the gloo plugin]). NotFound naming every place it looked.
absl::StatusOr<std::string> FindGlooPlugin();

// [Note: finding the gloo plugin]
// No install path is compiled in: a package installed with `cmake --install --prefix DIR`, or moved or copied
// after that, must still find its own plugin (issue 17). tessera_core, which holds this loader, is a static
// library, so "the library's own location" at run time is the binary it was linked into (the trainer, or a
// shared library of the user's). FindGlooPlugin looks, in this order:
//   1. next to that binary (dladdr): <dir>/libtessera_gloo_plugin.so and <dir>/../<libdir>/..., so a trainer
//      installed into the tessera tree's bin/ or lib/ uses that tree's plugin, also after the tree is moved;
//   2. in the dynamic loader's search path of that binary (dlinfo RTLD_DI_SERINFO): LD_LIBRARY_PATH, its
//      RUNPATH, the system directories. find_package(Tessera) adds the plugin's directory, computed from where
//      the package is found (cmake/TesseraConfig.cmake.in), to the RUNPATH of everything that links Tessera::core,
//      so a trainer built against a package at any prefix finds that package's plugin.
// An explicit path (WorldOptions::gloo_plugin, or `plugin_path` above) overrides the search.

namespace gloo_plugin_abi {
// The contract between CreateGlooCommunicatorIsolated and the plugin's entry. Bump kVersion (and the entry's name)
// whenever CreateArgs, Communicator or anything the communicator hands out (Work, BufferView, ...) changes.
inline constexpr int kVersion = 1;
inline constexpr char kCreateEntry[] = "tessera_gloo_plugin_create_v1";
// Test hook: the file (dladdr) that gloo::transport::tcp::CreateDevice resolves to as seen from inside the plugin.
inline constexpr char kGlooOriginEntry[] = "tessera_gloo_plugin_gloo_origin_v1";

struct CreateArgs {
  int abi_version = kVersion;
  long absl_lts_version = 0;  // ABSL_LTS_RELEASE_VERSION of the side that filled it in
  size_t args_size = sizeof(CreateArgs);
  size_t result_size = sizeof(absl::StatusOr<std::unique_ptr<Communicator>>);
  int rank = 0;
  int size = 0;
  std::shared_ptr<KeyValueStore> store;
  std::string prefix;
  absl::Duration timeout;
  std::string hostname;
};
// int tessera_gloo_plugin_create_v1(const CreateArgs* args, absl::StatusOr<std::unique_ptr<Communicator>>* out):
// 0 when it filled in *out; otherwise the plugin's kVersion, *out untouched (the ABI check failed: the first three
// fields of CreateArgs, read before anything else, disagree with the plugin's).
using CreateFn = int (*)(const CreateArgs*, absl::StatusOr<std::unique_ptr<Communicator>>*);
// const char* tessera_gloo_plugin_gloo_origin_v1(void);  (static storage; nullptr if dladdr failed)
using GlooOriginFn = const char* (*)();
}  // namespace gloo_plugin_abi

}  // namespace tessera::comm
