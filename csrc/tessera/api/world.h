// The ranks of a C++ training job: who this process is (torchrun's environment), the store the ranks meet
// through (c10d's TCPStore), and the communicator its collectives run on: NCCL on GPU, tessera's gloo backend on
// CPU (comm/gloo, loaded as an isolated plugin: see [Note: two gloos in one process] in comm/gloo/gloo_plugin.h).
#pragma once

#include <memory>
#include <string>

#include <ATen/ATen.h>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tessera/comm/communicator.h"
#include "tessera/comm/desync.h"

namespace tessera {

enum class Backend { kAuto, kGloo, kNccl };  // kAuto: NCCL when CUDA is available, else gloo

struct WorldOptions {
  int rank = 0;
  int world_size = 1;
  int local_rank = 0;                  // selects the GPU (cuda:local_rank) under NCCL
  std::string master_addr = "127.0.0.1";
  int master_port = 29500;
  // torchrun hosts the store itself (TORCHELASTIC_USE_AGENT_STORE=True): every rank is then a client.
  bool store_is_external = false;
  // Which attempt of the job this is (torchrun's TORCHELASTIC_RESTART_COUNT): the store outlives restarts under
  // torchrun, so every key this World (and the checkpointer, through store()) sets is under "tessera/<attempt>/".
  int restart_count = 0;
  Backend backend = Backend::kAuto;
  absl::Duration init_timeout = absl::Minutes(10);       // store connection and communicator set-up
  absl::Duration collective_timeout = absl::Minutes(5);  // the cap on every collective (Communicator::set_timeout_cap)
  // Path of the gloo plugin library; empty: comm::FindGlooPlugin()'s, the plugin of the installed package the trainer
  // was built against (see [Note: finding the gloo plugin] in comm/gloo/gloo_plugin.h).
  std::string gloo_plugin;

  // From torchrun's variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT and
  // TORCHELASTIC_USE_AGENT_STORE (the C++ API's only environment reads); a missing RANK / WORLD_SIZE means a
  // single process. InvalidArgument naming a malformed variable.
  static absl::StatusOr<WorldOptions> FromEnv();
};

class World {
 public:
  // Connects to the store (rank 0 hosts it unless store_is_external) and builds the communicator. Blocks until
  // every rank arrived or init_timeout passed (DeadlineExceeded).
  static absl::StatusOr<std::unique_ptr<World>> Init(const WorldOptions& options);
  ~World();

  int rank() const { return options_.rank; }
  int size() const { return options_.world_size; }
  int local_rank() const { return options_.local_rank; }
  const WorldOptions& options() const { return options_; }
  // Where this rank's model and data live: cpu, or cuda:local_rank under NCCL.
  at::Device device() const { return device_; }
  const std::shared_ptr<comm::Communicator>& comm() const { return comm_; }
  // The key-value store every rank reaches (c10d's TCPStore, keys under "tessera/<attempt>/"), for agreement
  // outside the collectives (the checkpointer's).
  const std::shared_ptr<comm::KeyValueStore>& store() const { return store_; }
  absl::Status Barrier();

 private:
  World() = default;
  WorldOptions options_;
  at::Device device_ = at::kCPU;
  std::shared_ptr<comm::KeyValueStore> store_;
  std::shared_ptr<comm::Communicator> comm_;
};

}  // namespace tessera
