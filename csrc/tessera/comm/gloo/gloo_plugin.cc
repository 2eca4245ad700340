// The host side of the gloo plugin: loads libtessera_gloo_plugin.so isolated and calls its entry.
// See [Note: two gloos in one process] in gloo_plugin.h. Torch-free and gloo-free: only dlopen.
#include "tessera/comm/gloo/gloo_plugin.h"

#include <dlfcn.h>
#include <sys/stat.h>

#include <map>
#include <mutex>
#include <utility>

#include "absl/base/config.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

#ifndef TESSERA_GLOO_PLUGIN_DEFAULT_PATH
#define TESSERA_GLOO_PLUGIN_DEFAULT_PATH "libtessera_gloo_plugin.so"
#endif

namespace tessera::comm {
namespace {

std::string DlError() {
  const char* e = dlerror();
  return e != nullptr ? e : "(no dlerror)";
}

// One handle per path for the life of the process: never dlclose'd (communicators' worker threads and gloo's
// static state live in the library).
absl::StatusOr<void*> LoadPlugin(const std::string& path) {
  static std::mutex mu;
  static auto* loaded = new std::map<std::string, void*>();  // leaked on purpose: no destruction-order hazards
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = loaded->find(path); it != loaded->end()) return it->second;
  struct stat st;
  if (stat(path.c_str(), &st) != 0) {
    return absl::NotFoundError(absl::StrCat("gloo plugin: no file at '", path,
                                            "' (built with TESSERA_WITH_GLOO and installed? pass the path of "
                                            "libtessera_gloo_plugin.so)"));
  }
  dlerror();
  // See [Note: two gloos in one process]: DEEPBIND so the plugin's gloo references bind to its libgloo first,
  // LOCAL so nothing of it (libgloo included) enters the global scope where torch's references would find it.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
  if (handle == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("gloo plugin: dlopen('", path, "', RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND) failed: ", DlError()));
  }
  loaded->emplace(path, handle);
  return handle;
}

absl::StatusOr<void*> Entry(const std::string& path, const char* name) {
  auto handle = LoadPlugin(path);
  if (!handle.ok()) return handle.status();
  dlerror();
  void* sym = dlsym(*handle, name);
  if (sym == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("gloo plugin '", path, "' has no entry '", name,
                                                      "' (built from another tessera version?): ", DlError()));
  }
  return sym;
}

}  // namespace

std::string DefaultGlooPluginPath() { return TESSERA_GLOO_PLUGIN_DEFAULT_PATH; }

absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicatorIsolated(
    const std::string& plugin_path, int rank, int size, std::shared_ptr<KeyValueStore> store,
    const std::string& prefix, absl::Duration timeout, const std::string& hostname) {
  const std::string path = plugin_path.empty() ? DefaultGlooPluginPath() : plugin_path;
  auto entry = Entry(path, gloo_plugin_abi::kCreateEntry);
  if (!entry.ok()) return entry.status();
  gloo_plugin_abi::CreateArgs args;
  args.absl_lts_version = ABSL_LTS_RELEASE_VERSION;
  args.rank = rank;
  args.size = size;
  args.store = std::move(store);
  args.prefix = prefix;
  args.timeout = timeout;
  args.hostname = hostname;
  absl::StatusOr<std::unique_ptr<Communicator>> out =
      absl::InternalError(absl::StrCat("gloo plugin '", path, "': the entry returned nothing"));
  const int rc = reinterpret_cast<gloo_plugin_abi::CreateFn>(*entry)(&args, &out);
  if (rc != 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "gloo plugin '", path, "' was built against another ABI (plugin ABI version ", rc, "; this side: version ",
        gloo_plugin_abi::kVersion, ", Abseil LTS ", ABSL_LTS_RELEASE_VERSION, ", args ", sizeof(args),
        " bytes): rebuild it with this tessera"));
  }
  return out;
}

}  // namespace tessera::comm
