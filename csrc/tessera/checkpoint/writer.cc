// CheckpointWriter: validates a save request and plans the data file (Save, synchronous), then on a background
// thread stages pieces into a reused host arena while a pool of workers writes staged chunks to their precomputed
// offsets, fsyncs, writes the rank index and runs the commit protocol (commit.cc).
//
// [Note: staging arena] The staging memory is the data file's image: header, then piece i at the same offset as
// in the file, pieces aligned to 64 bytes, gaps zeroed. Staging fills it strictly in order and publishes how many
// bytes are ready, so workers write 16 MiB chunks of the image as soon as they are staged (a single large flat
// shard still overlaps copy and write) and WaitStaged(i) needs only a counter. Chunks are page-aligned in memory
// and in the file, so they go out with O_DIRECT where the file system allows ([Note: direct checkpoint writes] in
// storage.cc). The arena is kept across saves (pinned when CUDA pieces are staged): a steady-state save allocates
// nothing.
#include "tessera/checkpoint/writer.h"

#include <cstdio>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "tessera/checkpoint/commit.h"
#include "tessera/checkpoint/format_internal.h"
#include "tessera/checkpoint/staging.h"
#include "tessera/core/status.h"

namespace tessera::checkpoint {
namespace {

constexpr int64_t kPieceAlign = 64;
constexpr int64_t kChunkBytes = int64_t{16} << 20;

int64_t AlignUp(int64_t x, int64_t a) { return (x + a - 1) / a * a; }

// What Save() works out before returning: the rank index (checksums filled in later) and where each piece goes.
struct Plan {
  RankIndex index;
  std::vector<std::pair<int, int>> slot;  // request piece -> (tensor, piece) in index.tensors; {-1, -1} if empty
  std::vector<int64_t> arena_offset;      // request piece -> offset in the arena; -1 if empty
  int64_t data_bytes = 0;
  bool any_cuda = false;
};

absl::StatusOr<Plan> MakePlan(const SaveRequest& req) {
  auto bad = [&](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrFormat("save of step %d on rank %d: %s", req.step, req.rank, msg));
  };
  if (req.world_size < 1 || req.world_size > internal::kMaxWorldSize) {
    return bad(absl::StrFormat("world_size %d out of range", req.world_size));
  }
  if (req.rank < 0 || req.rank >= req.world_size) {
    return bad(absl::StrFormat("rank %d out of range [0, %d)", req.rank, req.world_size));
  }
  if (req.step < 0) return bad("negative step");
  if (req.attempt < 0) return bad("negative attempt");
  if (!internal::IsJsonObject(req.rank_json)) return bad("rank_json is not a JSON object");
  if (!internal::IsJsonObject(req.global_json)) return bad("global_json is not a JSON object");

  Plan plan;
  RankIndex& idx = plan.index;
  idx.rank = req.rank;
  idx.world_size = req.world_size;
  idx.step = req.step;
  idx.attempt = req.attempt;
  idx.rank_json = req.rank_json;
  idx.global_json = req.global_json;
  std::unordered_map<std::string, int> tensor_of;
  int64_t cursor = 0;
  for (size_t i = 0; i < req.pieces.size(); ++i) {
    const SavePiece& p = req.pieces[i];
    const std::string what = absl::StrFormat("piece %d (tensor '%s')", i, p.name);
    if (p.name.empty()) return bad(absl::StrFormat("piece %d has an empty name", i));
    if (!internal::IsValidUtf8(p.name)) return bad(absl::StrCat(what, ": name is not valid UTF-8"));
    if (ElementSize(p.data.dtype) == 0) return bad(absl::StrCat(what, ": unknown dtype"));
    TensorEntry probe{p.name, p.data.dtype, p.shape, {}};
    if (p.shape.size() > internal::kMaxRank || !internal::TensorBytes(probe).has_value()) {
      return bad(absl::StrCat(what, ": bad shape (negative dimension or too many elements)"));
    }
    const int64_t numel = probe.numel(), count = p.data.count;
    if (p.start < 0 || count < 0 || p.start > numel || count > numel - p.start) {
      return bad(absl::StrFormat("%s: elements [%d, +%d) outside its %d elements", what, p.start, count, numel));
    }
    if (count > 0 && p.data.data == nullptr) return bad(absl::StrCat(what, ": null data"));
    if (p.data.device.is_cuda()) {
#ifdef TESSERA_WITH_CUDA
      plan.any_cuda = true;
#else
      return absl::FailedPreconditionError(absl::StrFormat(
          "save of step %d: %s is on %s, but tessera was built without CUDA", req.step, what,
          p.data.device.ToString()));
#endif
    }
    auto [it, inserted] = tensor_of.emplace(p.name, static_cast<int>(idx.tensors.size()));
    if (inserted) {
      idx.tensors.push_back(probe);
    } else {
      const TensorEntry& t = idx.tensors[it->second];
      if (t.dtype != p.data.dtype || t.shape != p.shape) {
        return bad(absl::StrFormat("%s: dtype %s / %d dims differ from an earlier piece's %s / %d dims", what,
                                   DTypeName(p.data.dtype), p.shape.size(), DTypeName(t.dtype), t.shape.size()));
      }
    }
    if (count == 0) {
      plan.arena_offset.push_back(-1);
      continue;
    }
    cursor = AlignUp(cursor, kPieceAlign);
    plan.arena_offset.push_back(cursor);
    const int64_t bytes = p.data.bytes();
    if (__builtin_add_overflow(cursor, bytes, &cursor) || cursor > (int64_t{1} << 56)) {
      return bad("pieces add up to more bytes than a file can hold");
    }
    // xxh3 temporarily holds the request index, to map pieces back after sorting.
    idx.tensors[it->second].pieces.push_back(
        PieceEntry{0, kFileHeaderBytes + plan.arena_offset.back(), p.start, count, static_cast<uint64_t>(i)});
  }
  plan.data_bytes = cursor;
  idx.file = FileEntry{RankFileName(req.rank), req.rank, kFileHeaderBytes + cursor};
  plan.slot.assign(req.pieces.size(), {-1, -1});
  for (size_t t = 0; t < idx.tensors.size(); ++t) {
    auto& pieces = idx.tensors[t].pieces;
    std::sort(pieces.begin(), pieces.end(), [](const PieceEntry& a, const PieceEntry& b) { return a.start < b.start; });
    for (size_t j = 0; j < pieces.size(); ++j) {
      plan.slot[pieces[j].xxh3] = {static_cast<int>(t), static_cast<int>(j)};
      pieces[j].xxh3 = 0;
    }
  }
  absl::Status valid = internal::ValidateRankIndex(idx, "request");
  if (!valid.ok()) return bad(std::string(valid.message()));  // e.g. two pieces of one tensor overlap
  return plan;
}

class SaveState final : public SaveHandle {
 public:
  explicit SaveState(int64_t num_pieces) : num_pieces_(num_pieces) {}

  absl::Status WaitStaged(int64_t i) override {
    if (i < 0 || i >= num_pieces_) {
      return absl::InvalidArgumentError(absl::StrFormat("WaitStaged(%d): the save has %d pieces", i, num_pieces_));
    }
    absl::MutexLock lock(&mu_);
    auto ready = [this, i] { return pieces_staged_ > i || staging_over_; };
    mu_.Await(absl::Condition(&ready));
    return pieces_staged_ > i ? absl::OkStatus() : staging_status_;
  }
  absl::Status WaitAllStaged() override {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&staging_over_));
    return staging_status_;
  }
  absl::Status Wait() override {
    absl::MutexLock lock(&mu_);
    mu_.Await(absl::Condition(&finished_));
    return final_status_;
  }
  bool done() const override {
    absl::MutexLock lock(&mu_);
    return finished_;
  }
  SaveStats stats() const override {
    absl::MutexLock lock(&mu_);
    return stats_;
  }
  void SetBytes(int64_t bytes) {
    absl::MutexLock lock(&mu_);
    stats_.bytes = bytes;
  }

  // Staging thread: pieces [0, n) and arena bytes [0, bytes) are staged.
  void Publish(int64_t pieces, int64_t bytes) {
    absl::MutexLock lock(&mu_);
    pieces_staged_ = pieces;
    bytes_staged_ = bytes;
  }
  void FinishStaging(absl::Status status) {
    absl::MutexLock lock(&mu_);
    if (staging_over_) return;
    staging_over_ = true;
    stats_.stage_seconds = absl::ToDoubleSeconds(absl::Now() - started_);
    staging_status_ = std::move(status);
    if (staging_status_.ok()) pieces_staged_ = num_pieces_;
  }
  // Persist workers: waits until arena bytes [0, end) are staged; false if staging stopped first.
  bool WaitBytes(int64_t end) {
    absl::MutexLock lock(&mu_);
    auto ready = [this, end] { return bytes_staged_ >= end || staging_over_; };
    mu_.Await(absl::Condition(&ready));
    return bytes_staged_ >= end;
  }
  void Finish(absl::Status status) {
    absl::MutexLock lock(&mu_);
    final_status_ = std::move(status);
    stats_.durable_seconds = absl::ToDoubleSeconds(absl::Now() - started_);
    finished_ = true;
  }

 private:
  const int64_t num_pieces_;
  mutable absl::Mutex mu_;
  int64_t pieces_staged_ = 0;
  int64_t bytes_staged_ = 0;
  bool staging_over_ = false;
  absl::Status staging_status_;
  bool finished_ = false;
  absl::Status final_status_;
  const absl::Time started_ = absl::Now();
  SaveStats stats_;
};

class Writer final : public CheckpointWriter {
 public:
  Writer(std::shared_ptr<Storage> storage, WriterOptions options)
      : storage_(std::move(storage)), options_(std::move(options)) {}
  ~Writer() override {
    absl::MutexLock lock(&save_mu_);
    if (thread_.joinable()) thread_.join();
  }

  absl::StatusOr<std::shared_ptr<SaveHandle>> Save(SaveRequest request) override {
    TESSERA_ASSIGN_OR_RETURN(Plan plan, MakePlan(request));
    absl::MutexLock lock(&save_mu_);
    if (thread_.joinable()) thread_.join();  // one save at a time
    auto state = std::make_shared<SaveState>(static_cast<int64_t>(request.pieces.size()));
    int64_t bytes = 0;
    for (const SavePiece& piece : request.pieces) bytes += piece.data.bytes();
    state->SetBytes(bytes);
    {
      absl::MutexLock l(&active_mu_);
      active_step_ = request.step;
    }
    thread_ = std::thread([this, state, req = std::move(request), plan = std::move(plan)]() mutable {
      absl::Status s = Run(req, plan, *state);
      state->FinishStaging(s.ok() ? absl::OkStatus() : s);  // no-op unless Run failed before staging ended
      {
        absl::MutexLock l(&active_mu_);
        active_step_ = -1;
      }
      state->Finish(WithContext(s, absl::StrFormat("checkpoint step %d, rank %d", req.step, req.rank)));
      if (req.rank == 0) {  // after Finish: deleting old checkpoints' files must not delay the handle
        absl::Status removed = internal::RemoveRetired(*storage_);
        if (!removed.ok()) {
          std::fprintf(stderr, "tessera checkpoint: removing retired checkpoints failed: %s\n",
                       std::string(removed.message()).c_str());
        }
      }
    });
    return std::shared_ptr<SaveHandle>(state);
  }

  absl::Status CleanStale() override {
    int64_t active;
    {
      absl::MutexLock l(&active_mu_);
      active = active_step_;
    }
    absl::StatusOr<std::vector<std::string>> names = storage_->List("");
    if (absl::IsNotFound(names.status())) return absl::OkStatus();
    TESSERA_RETURN_IF_ERROR(names.status());
    for (const std::string& name : *names) {
      if (name.rfind(".tmp-", 0) != 0) continue;
      if (active >= 0 && name == TmpStepDirName(active)) continue;
      TESSERA_RETURN_IF_ERROR(storage_->RemoveAll(name));
    }
    return absl::OkStatus();
  }

 private:
  absl::Status Run(const SaveRequest& req, Plan& plan, SaveState& state);
  absl::Status WritePart(const SaveRequest& req, Plan& plan, SaveState& state);
  absl::Status StageAndPersist(const SaveRequest& req, Plan& plan, SaveState& state, WritableFile& file);

  std::shared_ptr<Storage> storage_;
  const WriterOptions options_;
  internal::Stager stager_;  // the reused arena (+ CUDA streams); touched only by the save thread
  absl::Mutex save_mu_;      // serializes Save() callers and guards thread_
  std::thread thread_;
  absl::Mutex active_mu_;
  int64_t active_step_ = -1;  // the step being saved, which CleanStale must not touch
};

absl::Status Writer::Run(const SaveRequest& req, Plan& plan, SaveState& state) {
  absl::Status written = WritePart(req, plan, state);
  // A failed part is reported so that no rank waits for a commit that cannot come ([Note: commit failure report]).
  if (req.rank != 0) {
    if (!written.ok()) {
      internal::ReportRankFailure(*storage_, req.step, req.attempt, req.rank, written);
      return written;
    }
    return internal::WaitForCommit(*storage_, plan.index, options_.commit_timeout);
  }
  if (!written.ok()) {
    internal::ReportCommitFailure(*storage_, req.step, req.attempt, req.world_size, written);
    return written;
  }
  return internal::CommitAsRankZero(*storage_, req.step, req.world_size, req.attempt, options_.commit_timeout,
                                    options_.keep_last, options_.crash_point);
}

// This rank's data file and then its index (its "done" marker) in the step's tmp directory.
absl::Status Writer::WritePart(const SaveRequest& req, Plan& plan, SaveState& state) {
  const std::string tmp = TmpStepDirName(req.step);
  TESSERA_RETURN_IF_ERROR(stager_.Reserve(plan.data_bytes, plan.any_cuda));
  TESSERA_RETURN_IF_ERROR(storage_->MakeDirs(tmp));
  // An index left by a crashed attempt at this step must not be taken as this save's "done" marker.
  TESSERA_RETURN_IF_ERROR(storage_->RemoveAll(tmp + "/" + RankIndexName(req.rank)));
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<WritableFile> file,
                           storage_->CreateForDirectIO(tmp + "/" + RankFileName(req.rank)));
  FileHeader header{static_cast<uint32_t>(kFormatVersion), req.rank, req.world_size, req.step, plan.data_bytes};
  const std::string encoded = EncodeFileHeader(header);
  std::memcpy(stager_.image(), encoded.data(), kFileHeaderBytes);  // written with the first chunk
  TESSERA_RETURN_IF_ERROR(StageAndPersist(req, plan, state, *file));
  if (file->direct()) TESSERA_RETURN_IF_ERROR(file->Truncate(kFileHeaderBytes + plan.data_bytes));
  TESSERA_RETURN_IF_ERROR(file->Sync());
  TESSERA_RETURN_IF_ERROR(file->Close());
  internal::MaybeCrash(options_.crash_point, "after_data");
  TESSERA_RETURN_IF_ERROR(
      storage_->WriteAtomically(tmp + "/" + RankIndexName(req.rank), SerializeRankIndex(plan.index)));
  internal::MaybeCrash(options_.crash_point, "after_index");
  return absl::OkStatus();
}

absl::Status Writer::StageAndPersist(const SaveRequest& req, Plan& plan, SaveState& state, WritableFile& file) {
  static_assert(internal::Stager::kHeaderBytes == kFileHeaderBytes, "the staging image starts with the header");
  static_assert(kChunkBytes % kDirectIOAlign == 0, "chunks must keep direct writes aligned");
  const int64_t n = static_cast<int64_t>(req.pieces.size());
  char* image = stager_.image();  // file offset f is at image + f
  char* arena = stager_.data();   // == image + kFileHeaderBytes
  const int64_t total = kFileHeaderBytes + plan.data_bytes;
  // Direct writes cover whole blocks: the last one is padded with zeros and the file truncated afterwards.
  const int64_t padded = file.direct() ? (total + kDirectIOAlign - 1) / kDirectIOAlign * kDirectIOAlign : total;
  std::memset(image + total, 0, static_cast<size_t>(padded - total));
  std::vector<std::pair<int64_t, int64_t>> chunks;  // [begin, end) file offsets, written in this order
  for (int64_t b = 0; b < padded; b += kChunkBytes) chunks.emplace_back(b, std::min(padded, b + kChunkBytes));
  std::vector<uint64_t> checksums(n, 0);
  std::atomic<size_t> next{0};
  std::atomic<bool> abort{false};
  absl::Mutex err_mu;
  absl::Status err;
  auto fail = [&](absl::Status s) {
    absl::MutexLock lock(&err_mu);
    if (err.ok()) err = std::move(s);
    abort.store(true);
  };

  // Persist workers: chunks of the file image in order, each written as soon as staging has passed its end.
  std::vector<std::thread> workers;
  const int num_workers = std::max(1, std::min<int>(options_.threads, static_cast<int>(chunks.size())));
  for (int w = 0; w < num_workers && !chunks.empty(); ++w) {
    workers.emplace_back([&] {
      for (;;) {
        const size_t c = next.fetch_add(1);
        if (c >= chunks.size() || abort.load()) return;
        const auto [begin, end] = chunks[c];
        const int64_t need = std::max<int64_t>(0, std::min(end, total) - kFileHeaderBytes);  // arena bytes
        if (!state.WaitBytes(need)) return;  // staging stopped
        absl::Status s = file.WriteAt(begin, image + begin, end - begin);
        if (!s.ok()) return fail(std::move(s));
      }
    });
  }

  // Staging, on this thread, in request order (WaitStaged(i) is a prefix guarantee). Gaps between pieces are
  // zeroed (the format says so, and the whole image is written). Each piece is hashed from the arena right after
  // it is published: the data is still in cache, and the source may already change.
  absl::Status staging;
  int64_t staged_bytes = 0;
  for (int64_t i = 0; i < n && staging.ok(); ++i) {
    const SavePiece& p = req.pieces[i];
    const int64_t bytes = p.data.bytes();
    if (bytes > 0) {
      std::memset(arena + staged_bytes, 0, static_cast<size_t>(plan.arena_offset[i] - staged_bytes));
    }
    for (int64_t off = 0; off < bytes; off += kChunkBytes) {
      if (abort.load()) break;
      const int64_t len = std::min(kChunkBytes, bytes - off);
      staging = stager_.Copy(arena + plan.arena_offset[i] + off, p.data, off, len);
      if (!staging.ok()) {
        staging = WithContext(staging, absl::StrFormat("staging tensor '%s'", p.name));
        fail(staging);
        break;
      }
      staged_bytes = plan.arena_offset[i] + off + len;
      if (off + len < bytes) state.Publish(i, staged_bytes);
    }
    if (abort.load()) break;
    if (req.after_staged) {  // before Publish: see SaveRequest::after_staged
      staging = req.after_staged(i);
      if (!staging.ok()) {
        fail(staging);
        break;
      }
    }
    state.Publish(i + 1, staged_bytes);
    if (bytes > 0) checksums[i] = Checksum(arena + plan.arena_offset[i], bytes);
  }
  if (abort.load()) {
    absl::MutexLock lock(&err_mu);
    state.FinishStaging(err);
  } else {
    state.FinishStaging(absl::OkStatus());
  }
  for (std::thread& t : workers) t.join();
  TESSERA_RETURN_IF_ERROR(err);
  for (int64_t i = 0; i < n; ++i) {
    auto [t, j] = plan.slot[i];
    if (t >= 0) plan.index.tensors[t].pieces[j].xxh3 = checksums[i];
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<CheckpointWriter>> CheckpointWriter::Create(std::shared_ptr<Storage> storage,
                                                                           WriterOptions options) {
  if (storage == nullptr) return absl::InvalidArgumentError("CheckpointWriter: storage is null");
  if (options.threads < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("CheckpointWriter: threads = %d, expected >= 1", options.threads));
  }
  if (options.keep_last < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("CheckpointWriter: keep_last = %d, expected >= 0 (0 keeps all)", options.keep_last));
  }
  if (options.commit_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("CheckpointWriter: commit_timeout must be positive");
  }
  static const char* const kCrashPoints[] = {"", "after_data", "after_index", "before_manifest", "after_manifest",
                                             "after_rename"};
  if (std::find(std::begin(kCrashPoints), std::end(kCrashPoints), options.crash_point) == std::end(kCrashPoints)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "CheckpointWriter: unknown crash_point '%s' (allowed: after_data, after_index, before_manifest, "
        "after_manifest, after_rename)",
        options.crash_point));
  }
  return std::unique_ptr<CheckpointWriter>(new Writer(std::move(storage), std::move(options)));
}

}  // namespace tessera::checkpoint
