// Checkpoints of a C++ trainer (DESIGN.md section 4): the same files, state keys and JSON as the Python path's
// tessera.checkpoint.Checkpointer (python/tessera/checkpoint/checkpointer.py), so a checkpoint saved by a C++
// trainer resumes a Python one and the other way round. The engine underneath is the same
// (csrc/tessera/checkpoint: staging, writer pool, XXH3, commit protocol; docs/checkpoint_format.md); this file maps
// a ShardedModel, its AdamW and the trainer's counters to it.
//
//   auto ckpt = tessera::ValueOrThrow(tessera::checkpoint::Checkpointer::Create(
//       "/ckpt", world->rank(), world->size(), world->store()));
//   std::map<std::string, int64_t> train = {{"step", 0}, {"tokens", 0}};
//   tessera::checkpoint::TrainingState state{&fsdp, optimizer.get(), &train};
//   std::optional<int64_t> resumed = tessera::ValueOrThrow(ckpt->LoadLatest(state));  // nullopt: fresh start
//   ... each N steps: tessera::ThrowIfError(ckpt->Save(step, state));  // returns once staged
//   tessera::ThrowIfError(ckpt->Wait());                                 // before exiting
//
// [Note: agreement through the store] Every decision the ranks must share (rank 0 has removed stale tmp
// directories; which steps exist; which ranks failed to load a step) goes through the World's KeyValueStore, under
// keys "<prefix>/<op>/..." where <op> counts the agreements this Checkpointer made (the same sequence on every
// rank, since every rank calls Create / Load / LoadLatest in the same order). No collective is used, so it behaves
// the same over gloo and NCCL and never interleaves with the training's collectives. The store must be one per job
// attempt (World's is; torchrun's agent store is prefixed per restart as python/tessera/recipes/launch.py does),
// or CheckpointerOptions::store_prefix must tell attempts apart: keys left by an earlier attempt would be taken
// as this one's.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tessera/api/adamw.h"
#include "tessera/api/checkpoint_tensor.h"
#include "tessera/api/sharded.h"
#include "tessera/comm/desync.h"

namespace tessera::checkpoint {

class CheckpointWriter;
class SaveHandle;
class Storage;

struct CheckpointerOptions {
  int keep_last = 3;                                   // committed checkpoints kept (0 = keep all)
  int threads = 4;                                     // writer pool
  absl::Duration commit_timeout = absl::Minutes(10);   // how long a save's commit waits for every rank
  // How long a rank waits for the others at an agreement (start-up, the step list, a load's outcome); a load's
  // outcome is shared once every rank has read its part, so this bounds the slowest rank's read.
  absl::Duration agree_timeout = absl::Minutes(30);
  // Store keys of this Checkpointer start with this; empty: "tessera/checkpointer/<root>/<n>", n counting the
  // Checkpointers this rank made over this store and root (see [Note: agreement through the store]).
  std::string store_prefix;
};

// What one checkpoint holds, under the Python path's state keys: "model" (every parameter, model/<name>), "optim"
// (optim/<name>/exp_avg, .../exp_avg_sq, and AdamW::StateJson() in the JSON), "train" (a JSON object of integers,
// e.g. {"step": 10, "tokens": 1234}). `optimizer` and `train` may be null (then no "optim" / "train").
struct TrainingState {
  ShardedModel* model = nullptr;
  optim::AdamW* optimizer = nullptr;
  std::map<std::string, int64_t>* train = nullptr;
};

// The same contents as plain tensors and callbacks: what TrainingState is turned into, and the way to checkpoint
// tensors that are not a ShardedModel's (tests, custom trainers). Names must start with "model/" / "optim/".
struct CheckpointContents {
  std::vector<CheckpointTensor> model;
  // Optimizer: present when `optim_json` is set. Loading: tensors the checkpoint lacks are zeroed (a parameter
  // that never took a step has no state), the others must match in shape and dtype.
  std::vector<CheckpointTensor> optim;
  std::function<std::string()> optim_json;                             // the "optim" JSON object, when saving
  std::function<absl::Status(const std::string&)> load_optim_json;    // restores it, when loading
  std::map<std::string, int64_t>* train = nullptr;
};
// model->CheckpointTensors("model"), optimizer->CheckpointTensors("optim", for_load) and its JSON, train.
// InvalidArgument if state.model is null.
absl::StatusOr<CheckpointContents> ContentsOf(const TrainingState& state, bool for_load);

class Checkpointer {
 public:
  // rank/world/store: the World's (world.rank(), world.size(), world.store()). Rank 0 creates `root` and removes
  // the tmp directories of saves that never committed, then every rank passes a start-up barrier.
  static absl::StatusOr<std::unique_ptr<Checkpointer>> Create(std::string root, int rank, int world,
                                                              std::shared_ptr<comm::KeyValueStore> store,
                                                              CheckpointerOptions options = {});
  // Finishes a save in flight (its failure is printed on stderr if nobody waited for it).
  ~Checkpointer();
  Checkpointer(const Checkpointer&) = delete;
  Checkpointer& operator=(const Checkpointer&) = delete;

  // Starts saving checkpoint `step` (every rank calls it, same steps in the same order) and returns once every
  // tensor is staged in host memory (the optimizer may then change the shards); writing and the commit finish in
  // the background. One save at a time: a save still in flight is waited for first, and its failure (or that of
  // a finished save nobody waited for) is returned here instead of starting this one.
  absl::Status Save(int64_t step, const TrainingState& state);
  absl::Status Save(int64_t step, const CheckpointContents& contents);
  // Until the save in flight is committed, or why not (OK when there is none).
  absl::Status Wait();

  // Loads the newest committed checkpoint every rank can read completely and returns its step; nullopt if there
  // is none. Damaged or mismatching ones are skipped (with a message on stderr) when an older one loads; if none
  // loads, an error naming each step and why. Nothing in `state` changes unless it all loads.
  absl::StatusOr<std::optional<int64_t>> LoadLatest(const TrainingState& state);
  absl::StatusOr<std::optional<int64_t>> LoadLatest(const CheckpointContents& contents);
  // Loads checkpoint `step`. An error on any rank fails it on every rank, with each failing rank's message
  // ("rank R: ..."); DataLoss for damage, InvalidArgument for a checkpoint that does not match the state.
  absl::Status Load(int64_t step, const TrainingState& state);
  absl::Status Load(int64_t step, const CheckpointContents& contents);

  // Committed steps, newest first (this rank's view of the file system).
  absl::StatusOr<std::vector<int64_t>> CommittedSteps() const;
  const std::string& root() const { return root_; }
  int rank() const { return rank_; }
  int world() const { return world_; }

 private:
  Checkpointer(std::string root, int rank, int world, std::shared_ptr<comm::KeyValueStore> store,
               CheckpointerOptions options, std::string prefix);
  absl::Status Init();
  std::string NextOpKey();
  // Every rank's outcome of one step of agreement: (rank, status) for each rank that failed, lowest rank first.
  absl::StatusOr<std::vector<std::pair<int, absl::Status>>> ShareErrors(const absl::Status& mine);
  absl::StatusOr<std::vector<int64_t>> AgreeSteps();
  // Reads and checks everything, shares the outcome, and applies it only if every rank succeeded.
  // `agreement_failed`: the outcome could not be shared (the store), so the ranks may disagree.
  absl::Status TryLoad(int64_t step, const CheckpointContents& contents, bool* agreement_failed);

  std::string root_;
  int rank_, world_;
  std::shared_ptr<comm::KeyValueStore> store_;
  CheckpointerOptions options_;
  std::string prefix_;
  int64_t ops_ = 0;    // agreements so far (store key component)
  int64_t saves_ = 0;  // Save() calls so far: the attempt number ([Note: save attempts] in checkpoint/writer.h)
  std::shared_ptr<Storage> storage_;
  std::unique_ptr<CheckpointWriter> writer_;
  struct Pending;
  std::unique_ptr<Pending> pending_;
};

}  // namespace tessera::checkpoint
