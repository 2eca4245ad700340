// The commit protocol. Every step is durable before the next one starts, so a crash at any point leaves either the
// previous committed state or the new one, never a half-visible checkpoint (see docs/checkpoint_format.md for what
// each crash point leaves behind).
#include "tessera/checkpoint/commit.h"

#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <optional>
#include <tuple>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/clock.h"
#include "tessera/core/status.h"

namespace tessera::checkpoint::internal {
namespace {

constexpr absl::Duration kPollInterval = absl::Milliseconds(10);
std::string Join(const std::string& dir, const std::string& name) { return absl::StrCat(dir, "/", name); }

// Failure reports in the step's tmp directory, holding the error: see [Note: commit failure report] in commit.h.
constexpr char kCommitReportPrefix[] = "commit-failed-";  // rank 0's: "commit-failed-<attempt>"
constexpr char kRankReportPrefix[] = "rank-failed-";      // another rank's: "rank-failed-<attempt>-<rank>"
std::string CommitReportName(int64_t attempt) { return absl::StrCat(kCommitReportPrefix, attempt); }
std::string RankReportName(int64_t attempt, int32_t rank) {
  return absl::StrCat(kRankReportPrefix, attempt, "-", rank);
}

// Writes `error` to report `name` in step's tmp directory. Best effort: a failure is logged.
void WriteReport(Storage& storage, int64_t step, const std::string& name, const absl::Status& error) {
  const std::string tmp = TmpStepDirName(step);
  absl::StatusOr<bool> there = storage.Exists(tmp);  // never re-create it: it may have been committed (renamed)
  absl::Status s = there.ok() ? absl::OkStatus() : there.status();
  if (s.ok() && *there) s = storage.WriteAtomically(Join(tmp, name), error.ToString());
  if (!s.ok() || !*there) {
    std::fprintf(stderr, "tessera checkpoint: could not report the failure of step %lld to the other ranks (%s); "
                 "they will wait for their commit timeout\n", static_cast<long long>(step),
                 s.ok() ? "its tmp directory is gone" : std::string(s.message()).c_str());
  }
}

// [Note: a relayed failure keeps its code] A rank that learns of another rank's failure from its report returns
// the failing rank's status code (the report is absl::Status::ToString(): "CODE_NAME: message"), so a full disk
// on rank 1 is ResourceExhausted on every rank and a lost peer Unavailable: what the job's exit status is decided
// from (python/tessera/exitcodes.py) is the root cause's kind whichever rank reports first. Aborted when the report
// names no code (it could not be read).
absl::StatusCode ReportedCode(const absl::StatusOr<std::string>& text) {
  if (!text.ok()) return absl::StatusCode::kAborted;
  for (int c = 1; c <= 16; ++c) {
    const auto code = static_cast<absl::StatusCode>(c);
    if (absl::StartsWith(*text, absl::StrCat(absl::StatusCodeToString(code), ":"))) return code;
  }
  return absl::StatusCode::kAborted;
}

// The (name, start, count, xxh3) of every piece a given file holds, sorted: what identifies one save's data.
using PieceKey = std::tuple<std::string, int64_t, int64_t, uint64_t>;
std::vector<PieceKey> PiecesOfFile(const std::vector<TensorEntry>& tensors, int32_t file) {
  std::vector<PieceKey> out;
  for (const TensorEntry& t : tensors) {
    for (const PieceEntry& p : t.pieces) {
      if (p.file == file) out.emplace_back(t.name, p.start, p.count, p.xxh3);
    }
  }
  std::sort(out.begin(), out.end());
  return out;
}

// Steps 1-3 of the commit: every index of this attempt, merged into the manifest, and the rename.
absl::Status MergeAndRename(Storage& storage, int64_t step, int32_t world_size, int64_t attempt,
                            absl::Duration timeout, const std::string& crash_point, std::string* replaced);

}  // namespace

void MaybeCrash(const std::string& configured, const char* point) {
  if (!configured.empty() && configured == point) ::raise(SIGKILL);
}

int64_t ParseStepDirName(const std::string& name) {
  constexpr std::string_view kPrefix = "step-";
  if (name.size() <= kPrefix.size() || name.size() > kPrefix.size() + 18 || name.compare(0, 5, kPrefix) != 0) {
    return -1;
  }
  int64_t step = 0;
  for (size_t i = kPrefix.size(); i < name.size(); ++i) {
    if (name[i] < '0' || name[i] > '9') return -1;
    step = step * 10 + (name[i] - '0');
  }
  return step;
}

absl::Status CommitAsRankZero(Storage& storage, int64_t step, int32_t world_size, int64_t attempt,
                              absl::Duration timeout, int keep_last, const std::string& crash_point) {
  const std::string final_dir = StepDirName(step);
  std::string replaced;
  absl::Status committed = MergeAndRename(storage, step, world_size, attempt, timeout, crash_point, &replaced);
  if (!committed.ok()) {
    ReportCommitFailure(storage, step, attempt, world_size, committed);
    return committed;
  }

  // 4. Housekeeping after the commit: its failures are reported, but the checkpoint is committed and loadable.
  absl::Status after = storage.WriteAtomically("latest", absl::StrCat(step, "\n"));
  if (after.ok() && !replaced.empty()) after = storage.RemoveAll(replaced);
  if (after.ok()) after = ApplyRetention(storage, keep_last, step);
  if (!after.ok()) {
    return WithContext(after, absl::StrFormat("step %d is committed in %s, but updating latest/retention failed", step,
                                              storage.Describe(final_dir)));
  }
  return absl::OkStatus();
}

namespace {

absl::Status MergeAndRename(Storage& storage, int64_t step, int32_t world_size, int64_t attempt,
                            absl::Duration timeout, const std::string& crash_point, std::string* replaced) {
  const std::string tmp = TmpStepDirName(step);
  const std::string final_dir = StepDirName(step);

  // 1. Every rank's index of this attempt (each is written atomically after its data file is durable). One of an
  //    earlier attempt at this step is a failed save's leftover: its rank removes it before writing its new data.
  std::vector<std::optional<RankIndex>> found(world_size);
  std::vector<int32_t> missing, stale;
  for (int32_t r = 0; r < world_size; ++r) missing.push_back(r);
  const absl::Time deadline = absl::Now() + timeout;
  for (;;) {
    std::vector<int32_t> still;
    stale.clear();
    for (int32_t r : missing) {
      const std::string report = Join(tmp, RankReportName(attempt, r));
      TESSERA_ASSIGN_OR_RETURN(bool failed, storage.Exists(report));
      if (failed) {
        absl::StatusOr<std::string> text = storage.ReadAll(report);
        return absl::Status(ReportedCode(text),  // see [Note: a relayed failure keeps its code]
                            absl::StrFormat("step %d: rank %d could not save its part: %s", step, r,
                                            text.ok() ? *text : "(its report could not be read)"));
      }
      const std::string path = Join(tmp, RankIndexName(r));
      TESSERA_ASSIGN_OR_RETURN(bool exists, storage.Exists(path));
      absl::StatusOr<std::string> text = exists ? storage.ReadAll(path) : absl::NotFoundError(path);
      if (absl::IsNotFound(text.status())) {  // also: removed between Exists and ReadAll
        still.push_back(r);
        continue;
      }
      TESSERA_RETURN_IF_ERROR(text.status());
      TESSERA_ASSIGN_OR_RETURN(RankIndex idx, ParseRankIndex(*text, storage.Describe(path)));
      if (idx.attempt < attempt) {
        stale.push_back(r);
        still.push_back(r);
      } else if (idx.attempt > attempt) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "step %d: rank %d's index in %s is from save attempt %d, rank 0 is at attempt %d: the ranks' saves are "
            "out of step (every rank must save every step, in the same order)",
            step, r, storage.Describe(tmp), idx.attempt, attempt));
      } else {
        found[r] = std::move(idx);
      }
    }
    missing.swap(still);
    if (missing.empty()) break;
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrFormat(
          "step %d: commit timed out after %s waiting for the index of rank(s) [%s] of %d in %s (did a rank fail or "
          "not call save?)%s",
          step, absl::FormatDuration(timeout), absl::StrJoin(missing, ", "), world_size, storage.Describe(tmp),
          stale.empty() ? "" : absl::StrFormat("; rank(s) [%s] left only an index of an earlier failed save",
                                               absl::StrJoin(stale, ", "))));
    }
    absl::SleepFor(kPollInterval);
  }

  // Every rank wrote this attempt's index, so none still waits on an earlier attempt: the reports of earlier failed
  // attempts can go (they must not be renamed into the committed directory).
  TESSERA_ASSIGN_OR_RETURN(std::vector<std::string> names, storage.List(tmp));
  for (const std::string& name : names) {
    if (name.rfind(kCommitReportPrefix, 0) == 0 || name.rfind(kRankReportPrefix, 0) == 0) {
      TESSERA_RETURN_IF_ERROR(storage.RemoveAll(Join(tmp, name)));
    }
  }

  // 2. Check every index against its data file, merge into the manifest.
  std::vector<RankIndex> indexes;
  for (int32_t r = 0; r < world_size; ++r) {
    const std::string path = Join(tmp, RankIndexName(r));
    RankIndex& idx = *found[r];
    if (idx.step != step || idx.world_size != world_size || idx.rank != r) {
      return absl::DataLossError(absl::StrFormat(
          "%s: index says step %d rank %d of %d, expected step %d rank %d of %d (leftover of another save?)",
          storage.Describe(path), idx.step, idx.rank, idx.world_size, step, r, world_size));
    }
    const std::string data = Join(tmp, idx.file.name);
    TESSERA_ASSIGN_OR_RETURN(int64_t size, storage.Size(data));
    if (size != idx.file.bytes) {
      return absl::DataLossError(absl::StrFormat("%s is %d bytes, rank %d's index says %d", storage.Describe(data),
                                                 size, r, idx.file.bytes));
    }
    indexes.push_back(std::move(idx));
  }
  TESSERA_ASSIGN_OR_RETURN(Manifest manifest, MergeRankIndexes(indexes));
  MaybeCrash(crash_point, "before_manifest");

  // 3. Manifest into the tmp directory, then the directory into place: the rename is the commit.
  TESSERA_RETURN_IF_ERROR(storage.WriteAtomically(Join(tmp, "manifest.json"), SerializeManifest(manifest)));
  TESSERA_RETURN_IF_ERROR(storage.SyncDir(tmp));
  MaybeCrash(crash_point, "after_manifest");
  TESSERA_ASSIGN_OR_RETURN(bool exists, storage.Exists(final_dir));
  if (exists) {
    // Re-saving a step that is already committed (training resumed from an older checkpoint): move the old one
    // aside (a .tmp- name, so CleanStale removes it if we crash) and replace it.
    *replaced = absl::StrFormat(".tmp-replaced-step-%010d", step);
    TESSERA_RETURN_IF_ERROR(storage.RemoveAll(*replaced));
    TESSERA_RETURN_IF_ERROR(storage.Rename(final_dir, *replaced));
  }
  TESSERA_RETURN_IF_ERROR(storage.Rename(tmp, final_dir));  // syncs the root directory
  MaybeCrash(crash_point, "after_rename");
  return absl::OkStatus();
}

}  // namespace

void ReportCommitFailure(Storage& storage, int64_t step, int64_t attempt, int32_t world_size,
                         const absl::Status& error) {
  if (world_size > 1) WriteReport(storage, step, CommitReportName(attempt), error);
}

void ReportRankFailure(Storage& storage, int64_t step, int64_t attempt, int32_t rank, const absl::Status& error) {
  WriteReport(storage, step, RankReportName(attempt, rank), error);
}

absl::Status WaitForCommit(Storage& storage, const RankIndex& mine, absl::Duration timeout) {
  const std::string manifest_path = Join(StepDirName(mine.step), "manifest.json");
  const std::string report_path = Join(TmpStepDirName(mine.step), CommitReportName(mine.attempt));
  const std::vector<PieceKey> my_pieces = PiecesOfFile(mine.tensors, 0);
  const absl::Time deadline = absl::Now() + timeout;
  std::string last_problem = "not there yet";
  for (;;) {
    TESSERA_ASSIGN_OR_RETURN(bool exists, storage.Exists(manifest_path));
    if (exists) {
      // The directory may be an older checkpoint of the same step that rank 0 is about to replace: only a manifest
      // holding exactly the pieces this rank wrote is this save's.
      absl::StatusOr<std::string> text = storage.ReadAll(manifest_path);
      absl::StatusOr<Manifest> m =
          text.ok() ? ParseManifest(*text, storage.Describe(manifest_path)) : absl::StatusOr<Manifest>(text.status());
      if (m.ok()) {
        for (size_t f = 0; f < m->files.size(); ++f) {
          if (m->files[f].rank != mine.rank || m->files[f].name != mine.file.name) continue;
          if (m->files[f].bytes == mine.file.bytes &&
              PiecesOfFile(m->tensors, static_cast<int32_t>(f)) == my_pieces) {
            return absl::OkStatus();
          }
        }
        last_problem = "it exists but does not hold this save's pieces (an older checkpoint of the same step)";
      } else if (!absl::IsNotFound(m.status())) {
        last_problem = std::string(m.status().message());
      }
    }
    TESSERA_ASSIGN_OR_RETURN(bool reported, storage.Exists(report_path));
    if (reported) {
      absl::StatusOr<std::string> text = storage.ReadAll(report_path);
      return absl::Status(ReportedCode(text),  // see [Note: a relayed failure keeps its code]
                          absl::StrFormat("rank %d: step %d was not committed; rank 0 reported: %s", mine.rank,
                                          mine.step, text.ok() ? *text : "(its report could not be read)"));
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrFormat(
          "rank %d: step %d was not committed within %s: %s: %s (did rank 0 fail?)", mine.rank, mine.step,
          absl::FormatDuration(timeout), storage.Describe(manifest_path), last_problem));
    }
    absl::SleepFor(kPollInterval);
  }
}

absl::Status ApplyRetention(Storage& storage, int keep_last, int64_t keep_step) {
  if (keep_last <= 0) return absl::OkStatus();
  TESSERA_ASSIGN_OR_RETURN(std::vector<std::string> names, storage.List(""));
  std::vector<std::pair<int64_t, std::string>> steps;
  for (const std::string& name : names) {
    const int64_t s = ParseStepDirName(name);
    if (s < 0) continue;
    TESSERA_ASSIGN_OR_RETURN(bool committed, storage.Exists(Join(name, "manifest.json")));
    if (committed) steps.emplace_back(s, name);
  }
  std::sort(steps.rbegin(), steps.rend());
  for (size_t i = static_cast<size_t>(keep_last); i < steps.size(); ++i) {
    if (steps[i].first == keep_step) continue;
    // Rename first so a crash mid-removal never leaves a step directory that looks committed but lacks files.
    const std::string doomed = absl::StrCat(".tmp-deleting-", steps[i].second);
    TESSERA_RETURN_IF_ERROR(storage.RemoveAll(doomed));
    TESSERA_RETURN_IF_ERROR(storage.Rename(steps[i].second, doomed));
    // Deleting the files (unlinks of GBs, slow on some file systems) waits for RemoveRetired, after the save is
    // reported done, so it delays neither the handle nor training.
  }
  return absl::OkStatus();
}

absl::Status RemoveRetired(Storage& storage) {
  TESSERA_ASSIGN_OR_RETURN(std::vector<std::string> names, storage.List(""));
  for (const std::string& name : names) {
    if (name.rfind(".tmp-deleting-", 0) == 0) TESSERA_RETURN_IF_ERROR(storage.RemoveAll(name));
  }
  return absl::OkStatus();
}

}  // namespace tessera::checkpoint::internal
