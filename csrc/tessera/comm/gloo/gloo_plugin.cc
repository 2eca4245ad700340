// The host side of the gloo plugin: loads libtessera_gloo_plugin.so isolated and calls its entry.
// See [Note: two gloos in one process] in gloo_plugin.h. Torch-free and gloo-free: only dlopen.
#include "tessera/comm/gloo/gloo_plugin.h"

#include <dlfcn.h>
#include <limits.h>
#include <link.h>
#include <stdlib.h>
#include <sys/stat.h>

#include <cstddef>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/base/config.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

// The plugin's file name and the install's library directory relative to its prefix (csrc/CMakeLists.txt); no
// absolute path: see [Note: finding the gloo plugin] in gloo_plugin.h.
#ifndef TESSERA_GLOO_PLUGIN_FILE
#define TESSERA_GLOO_PLUGIN_FILE "libtessera_gloo_plugin.so"
#endif
#ifndef TESSERA_INSTALL_LIBDIR
#define TESSERA_INSTALL_LIBDIR "lib"
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
                                            TESSERA_GLOO_PLUGIN_FILE ")"));
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

std::string RealPath(const std::string& path) {
  char buf[PATH_MAX];
  return realpath(path.c_str(), buf) != nullptr ? std::string(buf) : std::string();
}

bool IsFile(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string Dirname(const std::string& path) {
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
}

std::string Join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}

// The binary this code was linked into (tessera_core is static: the trainer's executable, or a shared library that
// links tessera_core): its canonical path and a dlopen handle of it, which the caller dlcloses ({"", nullptr} if
// it cannot be told).
std::pair<std::string, void*> ThisBinary() {
  Dl_info info;
  struct link_map* map = nullptr;
  const int found =
      dladdr1(reinterpret_cast<void*>(&FindGlooPlugin), &info, reinterpret_cast<void**>(&map), RTLD_DL_LINKMAP);
  if (found == 0 || map == nullptr) return {"", nullptr};
  // The main program's link map has no name (dladdr would report argv[0], maybe relative or found on PATH).
  if (map->l_name == nullptr || map->l_name[0] == '\0') return {RealPath("/proc/self/exe"), dlopen(nullptr, RTLD_LAZY)};
  // Loaded already (this code runs from it): RTLD_NOLOAD only takes a reference to it.
  return {RealPath(map->l_name), dlopen(map->l_name, RTLD_LAZY | RTLD_NOLOAD)};
}

// The directories the dynamic loader searches for a library that `handle`'s object loads: LD_LIBRARY_PATH, its
// RUNPATH (or RPATH), the system directories; not /etc/ld.so.cache.
std::vector<std::string> LoaderSearchDirs(void* handle) {
  std::vector<std::string> dirs;
  Dl_serinfo size;
  if (handle == nullptr || dlinfo(handle, RTLD_DI_SERINFOSIZE, &size) != 0) return dirs;
  std::vector<std::max_align_t> storage(size.dls_size / sizeof(std::max_align_t) + 1);
  auto* info = reinterpret_cast<Dl_serinfo*>(storage.data());
  info->dls_size = size.dls_size;
  info->dls_cnt = size.dls_cnt;
  if (dlinfo(handle, RTLD_DI_SERINFO, info) != 0) return dirs;
  for (unsigned i = 0; i < info->dls_cnt; ++i) dirs.emplace_back(info->dls_serpath[i].dls_name);
  return dirs;
}

}  // namespace

absl::StatusOr<std::string> FindGlooPlugin() {
  // See [Note: finding the gloo plugin] in gloo_plugin.h.
  const auto [binary, handle] = ThisBinary();
  std::vector<std::string> beside;
  if (!binary.empty()) {
    const std::string dir = Dirname(binary);
    beside.push_back(Join(dir, TESSERA_GLOO_PLUGIN_FILE));
    beside.push_back(Join(Join(Join(dir, ".."), TESSERA_INSTALL_LIBDIR), TESSERA_GLOO_PLUGIN_FILE));
  }
  const std::vector<std::string> dirs = LoaderSearchDirs(handle);
  if (handle != nullptr) dlclose(handle);
  std::vector<std::string> candidates = beside;
  for (const std::string& dir : dirs) candidates.push_back(Join(dir, TESSERA_GLOO_PLUGIN_FILE));
  for (const std::string& candidate : candidates) {
    if (IsFile(candidate)) return RealPath(candidate);
  }
  return absl::NotFoundError(absl::StrCat(
      "gloo plugin: no " TESSERA_GLOO_PLUGIN_FILE " next to ", binary.empty() ? "this binary (unknown)" : binary,
      " (looked for ", absl::StrJoin(beside, ", "),
      ") nor in the loader's search path of it (LD_LIBRARY_PATH, its RUNPATH, the system directories: ",
      dirs.empty() ? "none known" : absl::StrJoin(dirs, ", "),
      "). Build tessera with gloo and install it; a trainer linked against the package that find_package(Tessera) "
      "finds has the plugin's directory in its RUNPATH. Otherwise pass the plugin's path (WorldOptions::gloo_plugin, "
      "or CreateGlooCommunicatorIsolated's plugin_path)"));
}

absl::StatusOr<std::unique_ptr<Communicator>> CreateGlooCommunicatorIsolated(
    const std::string& plugin_path, int rank, int size, std::shared_ptr<KeyValueStore> store,
    const std::string& prefix, absl::Duration timeout, const std::string& hostname) {
  std::string path = plugin_path;
  if (path.empty()) {
    auto found = FindGlooPlugin();
    if (!found.ok()) return found.status();
    path = *std::move(found);
  }
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
