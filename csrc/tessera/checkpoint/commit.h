// The commit protocol (docs/checkpoint_format.md, "Commit protocol"), used by writer.cc. Not part of the public API.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/time/time.h"
#include "tessera/checkpoint/format.h"
#include "tessera/checkpoint/storage.h"

namespace tessera::checkpoint::internal {

// Kills the process with SIGKILL when `point` equals `configured` (WriterOptions::crash_point).
void MaybeCrash(const std::string& configured, const char* point);

// Rank 0: waits for every rank's index in the tmp directory, merges them into manifest.json, renames the tmp
// directory into place, updates `latest` and applies retention.
absl::Status CommitAsRankZero(Storage& storage, int64_t step, int32_t world_size, absl::Duration timeout,
                              int keep_last, const std::string& crash_point);

// Other ranks: waits until step `step` is committed with this rank's pieces (`mine`, the index it wrote) in it.
absl::Status WaitForCommit(Storage& storage, const RankIndex& mine, absl::Duration timeout);

// Committed checkpoints beyond the `keep_last` newest are retired (renamed to .tmp-deleting-*, so they are no longer
// committed); `keep_step` never is. keep_last 0 keeps all. RemoveRetired deletes retired directories' files.
absl::Status ApplyRetention(Storage& storage, int keep_last, int64_t keep_step);
absl::Status RemoveRetired(Storage& storage);

// Parses "step-0000000012" (any number of digits); -1 if `name` is not a step directory name.
int64_t ParseStepDirName(const std::string& name);

}  // namespace tessera::checkpoint::internal
