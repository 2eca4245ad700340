#include "tessera/api/world.h"

#include <chrono>
#include <cstdlib>
#include <exception>

#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "tessera/comm/gloo/gloo_plugin.h"
#include "tessera/comm/pg/c10d_store.h"
#include "tessera/core/status.h"

#if defined(TESSERA_WITH_CUDA)
#include <cuda_runtime_api.h>

#include "tessera/comm/nccl/nccl_communicator.h"
#endif

namespace tessera {
namespace {

absl::StatusOr<int> IntVar(const char* name, int fallback, int min) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  int out = 0;
  if (!absl::SimpleAtoi(v, &out) || out < min) {
    return absl::InvalidArgumentError(
        absl::StrFormat("environment variable %s='%s' is not an integer >= %d", name, v, min));
  }
  return out;
}

bool IsLoopback(const std::string& addr) {
  return addr == "localhost" || addr == "::1" || addr.rfind("127.", 0) == 0;
}

bool CudaAvailable() {
#if defined(TESSERA_WITH_CUDA)
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
  return false;
#endif
}

// Every key under a prefix, so that the keys of one attempt of a job never meet those of an earlier one.
class PrefixedStore final : public comm::KeyValueStore {
 public:
  PrefixedStore(std::shared_ptr<comm::KeyValueStore> inner, std::string prefix)
      : inner_(std::move(inner)), prefix_(std::move(prefix)) {}
  absl::Status Set(const std::string& key, const std::string& value) override { return inner_->Set(prefix_ + key, value); }
  absl::StatusOr<std::vector<std::optional<std::string>>> TryGet(absl::Span<const std::string> keys) override {
    return inner_->TryGet(Prefixed(keys));
  }
  absl::Status Wait(absl::Span<const std::string> keys, absl::Duration timeout) override {
    return inner_->Wait(Prefixed(keys), timeout);
  }
  absl::Status Delete(const std::string& key) override { return inner_->Delete(prefix_ + key); }

 private:
  std::vector<std::string> Prefixed(absl::Span<const std::string> keys) const {
    std::vector<std::string> out;
    for (const auto& k : keys) out.push_back(prefix_ + k);
    return out;
  }
  std::shared_ptr<comm::KeyValueStore> inner_;
  std::string prefix_;
};

}  // namespace

absl::StatusOr<WorldOptions> WorldOptions::FromEnv() {
  WorldOptions o;
  TESSERA_ASSIGN_OR_RETURN(o.world_size, IntVar("WORLD_SIZE", 1, 1));
  TESSERA_ASSIGN_OR_RETURN(o.rank, IntVar("RANK", 0, 0));
  TESSERA_ASSIGN_OR_RETURN(o.local_rank, IntVar("LOCAL_RANK", 0, 0));
  TESSERA_ASSIGN_OR_RETURN(o.master_port, IntVar("MASTER_PORT", 29500, 1));
  TESSERA_ASSIGN_OR_RETURN(o.restart_count, IntVar("TORCHELASTIC_RESTART_COUNT", 0, 0));
  if (o.rank >= o.world_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("environment: RANK=%d is not below WORLD_SIZE=%d", o.rank, o.world_size));
  }
  if (o.master_port > 65535) {
    return absl::InvalidArgumentError(absl::StrFormat("environment: MASTER_PORT=%d is not a port", o.master_port));
  }
  if (const char* addr = std::getenv("MASTER_ADDR"); addr != nullptr && *addr != '\0') o.master_addr = addr;
  if (const char* agent = std::getenv("TORCHELASTIC_USE_AGENT_STORE"); agent != nullptr) {
    o.store_is_external = std::string(agent) == "True" || std::string(agent) == "1";
  }
  return o;
}

absl::StatusOr<std::unique_ptr<World>> World::Init(const WorldOptions& options) {
  if (options.world_size < 1 || options.rank < 0 || options.rank >= options.world_size) {
    return absl::InvalidArgumentError(
        absl::StrFormat("World: rank %d of world size %d", options.rank, options.world_size));
  }
  auto world = std::unique_ptr<World>(new World());
  world->options_ = options;
  Backend backend = options.backend;
  if (backend == Backend::kAuto) backend = CudaAvailable() ? Backend::kNccl : Backend::kGloo;

  c10d::TCPStoreOptions so;
  so.port = static_cast<uint16_t>(options.master_port);
  so.isServer = options.rank == 0 && !options.store_is_external;
  so.numWorkers = options.world_size;
  so.waitWorkers = false;
  so.timeout = std::chrono::milliseconds(absl::ToInt64Milliseconds(options.init_timeout));
  c10::intrusive_ptr<c10d::Store> tcp;
  try {
    tcp = c10::make_intrusive<c10d::TCPStore>(options.master_addr, so);
  } catch (const std::exception& e) {
    return absl::UnavailableError(absl::StrFormat("World: rank %d could not reach the store at %s:%d: %s",
                                                  options.rank, options.master_addr, options.master_port, e.what()));
  }
  world->store_ = std::make_shared<PrefixedStore>(std::make_shared<comm::C10dStore>(tcp),
                                                 absl::StrFormat("tessera/%d/", options.restart_count));

  std::shared_ptr<comm::Communicator> communicator;
  if (backend == Backend::kGloo) {
    TESSERA_ASSIGN_OR_RETURN(
        communicator,
        comm::CreateGlooCommunicatorIsolated(options.gloo_plugin, options.rank, options.world_size, world->store_,
                                             "world/gloo", options.init_timeout,
                                             // one host: the loopback address (the machine's name may not resolve)
                                             IsLoopback(options.master_addr) ? "127.0.0.1" : ""));
  } else {
#if defined(TESSERA_WITH_CUDA)
    // Rank 0 makes the NCCL id; every rank reads it from the store.
    const std::string key = "world/nccl_id";
    if (options.rank == 0) {
      TESSERA_ASSIGN_OR_RETURN(std::string id, comm::NcclCommunicator::NewUniqueId());
      TESSERA_RETURN_IF_ERROR(world->store_->Set(key, id));
    }
    TESSERA_RETURN_IF_ERROR(world->store_->Wait({key}, options.init_timeout));
    TESSERA_ASSIGN_OR_RETURN(auto got, world->store_->TryGet({key}));
    TESSERA_ASSIGN_OR_RETURN(communicator,
                             comm::NcclCommunicator::Create(options.rank, options.world_size, *got[0],
                                                            options.local_rank, options.init_timeout));
    world->device_ = at::Device(at::kCUDA, options.local_rank);
#else
    return absl::FailedPreconditionError("World: the NCCL backend was asked for, but tessera was built without CUDA");
#endif
  }
  communicator->set_timeout_cap(options.collective_timeout);
  world->comm_ = std::move(communicator);
  return world;
}

World::~World() = default;

absl::Status World::Barrier() { return comm_->Barrier(options_.init_timeout); }

}  // namespace tessera
