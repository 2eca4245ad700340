// Saving: stage (copy each piece into host buffers reused across saves) then persist (a writer pool writes the
// data file, XXH3 per piece, fsync) and commit (rank 0 merges every rank's index into the manifest once all are
// durable, renames the step directory into place, updates `latest`, applies retention). Torch-free: the torch
// layer hands it BufferViews. See [Note: checkpoint consistency] in python/tessera/shard/fences.py for
// the rule the optimizer follows while a stage is in flight.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tessera/checkpoint/format.h"
#include "tessera/checkpoint/storage.h"
#include "tessera/core/buffer.h"

namespace tessera::checkpoint {

struct SavePiece {
  std::string name;            // logical tensor name
  std::vector<int64_t> shape;  // full logical shape
  int64_t start = 0;           // first flattened element this piece holds
  BufferView data;             // `count` elements on CPU or CUDA; dtype is the tensor's dtype
  // CUDA data must be ready when Save is called (the caller synchronizes its compute stream): staging copies on a
  // side stream of its own. Pieces of one tensor on one rank must not overlap; across ranks they must cover the
  // tensor exactly once (checked at commit). count == 0 pieces just declare the tensor.
};

struct SaveRequest {
  int64_t step = 0;
  int32_t rank = 0;
  int32_t world_size = 1;
  // [Note: save attempts] Which save this is, the same number on every rank (count the save calls: every rank
  // saves every step, in the same order). A failed save leaves its files in the step's tmp directory; the attempt
  // number keeps a later save of the same step from taking them, or rank 0's report of that failure, as its own.
  int64_t attempt = 0;
  std::vector<SavePiece> pieces;  // staged in this order
  std::string rank_json = "{}";
  std::string global_json = "{}";  // used from rank 0
  // Optional: called on the staging thread with piece i's index right after its bytes are in host memory and
  // before it is published as staged (so no WaitStaged caller, e.g. an optimizer waiting to update that piece's
  // source, has been released yet). A non-OK status fails the save like a staging error: the caller checks there
  // that the source was not modified while it was copied (the torch layer compares tensor version counters).
  std::function<absl::Status(int64_t)> after_staged;
};

struct WriterOptions {
  int threads = 4;                                   // persist pool (file writes, checksums)
  absl::Duration commit_timeout = absl::Minutes(10);  // how long commit waits for every rank's index
  int keep_last = 3;                                 // committed checkpoints kept (0 = keep all)
  // Fault injection for tests (named points where the process kills itself with SIGKILL); empty = off.
  // Create() rejects unknown names. In the order a save passes them (docs/checkpoint_format.md has what each
  // leaves on disk):
  //   "after_data"       this rank's data file is written and fdatasync'd; its index is not written
  //   "after_index"      this rank's index (its "done" marker) is durable
  //   "before_manifest"  rank 0 only: every rank's index was seen and merged; no manifest yet
  //   "after_manifest"   rank 0 only: manifest.json is durable in the tmp directory; not renamed
  //   "after_rename"     rank 0 only: step directory committed; `latest` not updated, retention not applied
  std::string crash_point;
};

// What one save cost, for progress logs and metrics (filled in as the save proceeds).
struct SaveStats {
  int64_t bytes = 0;              // bytes of this rank's pieces
  double stage_seconds = -1;      // from Save() until every piece was staged (-1: not yet)
  double durable_seconds = -1;    // from Save() until committed (or failed) (-1: not yet)
};

class SaveHandle {
 public:
  virtual ~SaveHandle() = default;
  virtual SaveStats stats() const = 0;
  // Blocks until pieces [0, i] are copied to host memory (their sources may then be modified).
  virtual absl::Status WaitStaged(int64_t i) = 0;
  virtual absl::Status WaitAllStaged() = 0;
  // Blocks until the checkpoint is committed (rank 0 committed it; other ranks see the committed directory),
  // or reports why it failed. Idempotent.
  virtual absl::Status Wait() = 0;
  virtual bool done() const = 0;
};

class CheckpointWriter {
 public:
  static absl::StatusOr<std::unique_ptr<CheckpointWriter>> Create(std::shared_ptr<Storage> storage,
                                                                  WriterOptions options);
  virtual ~CheckpointWriter() = default;
  // Starts a save and returns at once; one save at a time (a second Save first waits for the previous one).
  // A malformed request (bad rank/shape/range, overlapping pieces, extras that are not JSON objects) is rejected
  // here with InvalidArgument; a CUDA piece in a build without CUDA with FailedPrecondition. Re-saving a step that
  // is already committed replaces it.
  virtual absl::StatusOr<std::shared_ptr<SaveHandle>> Save(SaveRequest request) = 0;
  // Removes leftovers of saves that never committed (every ".tmp-*" entry of the root: .tmp-step-*, and the
  // transient .tmp-replaced-step-* / .tmp-deleting-step-*), except the tmp directory of this writer's save in flight.
  // Rank 0 calls it while no other rank can be saving (at start-up): another rank may already be writing into the
  // next step's tmp directory.
  virtual absl::Status CleanStale() = 0;
};

}  // namespace tessera::checkpoint
