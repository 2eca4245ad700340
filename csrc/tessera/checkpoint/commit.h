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

// Rank 0: waits for every rank's index of this `attempt` in the tmp directory (an index of an earlier attempt is
// not there yet; one of a later attempt is an error), merges them into manifest.json, renames the tmp directory into
// place, updates `latest` and applies retention. A failure before the rename is reported to the other ranks.
absl::Status CommitAsRankZero(Storage& storage, int64_t step, int32_t world_size, int64_t attempt,
                              absl::Duration timeout, int keep_last, const std::string& crash_point);

// [Note: commit failure report] A failed save must not leave the other ranks polling until their commit timeout
// (10 minutes by default). A rank other than 0 whose part fails writes its error to `rank-failed-<attempt>-<rank>`
// in the step's tmp directory; rank 0, waiting for that rank's index, finds it and fails. When rank 0 cannot commit
// (its own part failed, a rank failed or never came, a check or write failed) it writes its error to
// `commit-failed-<attempt>`; a waiting rank that finds the one of its own attempt fails at once with it. Reports of
// an earlier attempt are not about this one; rank 0 removes them once every rank's index of a later attempt is there
// (no rank still waits on them). Best effort: if even the report cannot be written (a full disk), the others time
// out as before.
void ReportCommitFailure(Storage& storage, int64_t step, int64_t attempt, int32_t world_size,
                         const absl::Status& error);  // rank 0; no-op on one rank
void ReportRankFailure(Storage& storage, int64_t step, int64_t attempt, int32_t rank, const absl::Status& error);

// Other ranks: waits until step `step` is committed with this rank's pieces (`mine`, the index it wrote) in it, or
// rank 0 reports that this attempt failed (rank 0's error, with its status code: see [Note: a relayed failure keeps
// its code] in commit.cc).
absl::Status WaitForCommit(Storage& storage, const RankIndex& mine, absl::Duration timeout);

// Committed checkpoints beyond the `keep_last` newest are retired (renamed to .tmp-deleting-*, so they are no longer
// committed); `keep_step` never is. keep_last 0 keeps all. RemoveRetired deletes retired directories' files.
absl::Status ApplyRetention(Storage& storage, int keep_last, int64_t keep_step);
absl::Status RemoveRetired(Storage& storage);

// Parses "step-0000000012" (any number of digits); -1 if `name` is not a step directory name.
int64_t ParseStepDirName(const std::string& name);

}  // namespace tessera::checkpoint::internal
