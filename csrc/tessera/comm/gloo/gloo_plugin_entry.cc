// The entry points of libtessera_gloo_plugin.so, the gloo communicator as an isolated module. Only the functions
// below are exported (gloo_plugin.map); see [Note: two gloos in one process] in gloo_plugin.h.
#include <dlfcn.h>

#include <memory>
#include <utility>

#include "absl/base/config.h"
#include "gloo/transport/tcp/device.h"
#include "tessera/comm/gloo/gloo_communicator.h"
#include "tessera/comm/gloo/gloo_plugin.h"

namespace plugin_abi = ::tessera::comm::gloo_plugin_abi;

extern "C" __attribute__((visibility("default"))) int tessera_gloo_plugin_create_v1(
    const plugin_abi::CreateArgs* args, absl::StatusOr<std::unique_ptr<tessera::comm::Communicator>>* out) {
  // The first three fields are read before anything else: they say whether the rest may be read at all.
  if (args->abi_version != plugin_abi::kVersion || args->absl_lts_version != ABSL_LTS_RELEASE_VERSION ||
      args->args_size != sizeof(plugin_abi::CreateArgs) ||
      args->result_size != sizeof(absl::StatusOr<std::unique_ptr<tessera::comm::Communicator>>)) {
    return plugin_abi::kVersion;
  }
  auto comm = tessera::comm::GlooCommunicator::Create(args->rank, args->size, args->store, args->prefix,
                                                      args->timeout, args->hostname);
  if (comm.ok()) {
    *out = std::unique_ptr<tessera::comm::Communicator>(std::move(*comm));
  } else {
    *out = comm.status();
  }
  return 0;
}

extern "C" __attribute__((visibility("default"))) const char* tessera_gloo_plugin_gloo_origin_v1() {
  // Taking the address goes through this module's GOT, so it is what the dynamic linker bound this module's
  // reference to: libgloo under RTLD_DEEPBIND, the first global definition (libtorch_cpu's, say) without it.
  Dl_info info;
  if (dladdr(reinterpret_cast<void*>(&::gloo::transport::tcp::CreateDevice), &info) == 0) return nullptr;
  return info.dli_fname;
}
