// CheckpointReader: opens a committed step (manifest + every data file's size and header checked up front) and
// reads any element range of any tensor from whichever pieces hold it (the resharding read rule in
// docs/checkpoint_format.md). A piece's XXH3 is verified the first time any part of it is read; after that, reads of
// that piece fetch only the bytes they need.
#include "tessera/checkpoint/reader.h"

#include <algorithm>
#include <cstring>
#include <unordered_map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "tessera/checkpoint/commit.h"
#include "tessera/core/status.h"

namespace tessera::checkpoint {
namespace {

class Reader final : public CheckpointReader {
 public:
  Reader(std::shared_ptr<Storage> storage, Manifest manifest)
      : storage_(std::move(storage)), manifest_(std::move(manifest)), dir_(StepDirName(manifest_.step)) {
    verified_.resize(manifest_.tensors.size());
    for (size_t t = 0; t < manifest_.tensors.size(); ++t) {
      index_.emplace(manifest_.tensors[t].name, t);
      verified_[t].assign(manifest_.tensors[t].pieces.size(), false);
    }
  }

  const Manifest& manifest() const override { return manifest_; }

  absl::Status CheckFiles() {
    for (size_t f = 0; f < manifest_.files.size(); ++f) {
      const FileEntry& file = manifest_.files[f];
      const std::string path = FilePath(f);
      const std::string full = storage_->Describe(path);
      TESSERA_ASSIGN_OR_RETURN(int64_t size, storage_->Size(path));
      if (size != file.bytes) {
        return absl::DataLossError(absl::StrFormat("%s is %d bytes, the manifest says %d (%s)%s", full, size,
                                                   file.bytes, size < file.bytes ? "truncated" : "extended",
                                                   FirstDamagedTensor(f, size)));
      }
      uint8_t raw[kFileHeaderBytes];
      TESSERA_RETURN_IF_ERROR(storage_->ReadAt(path, 0, kFileHeaderBytes, raw));
      absl::StatusOr<FileHeader> h = ParseFileHeader(absl::MakeConstSpan(raw, kFileHeaderBytes));
      if (!h.ok()) return WithContext(h.status(), full);
      if (h->step != manifest_.step || h->rank != file.rank || h->world_size != manifest_.world_size ||
          h->data_bytes != file.bytes - kFileHeaderBytes) {
        return absl::DataLossError(absl::StrFormat(
            "%s: header says step %d rank %d of %d with %d data bytes, the manifest expects step %d rank %d of %d "
            "with %d (file from another checkpoint?)",
            full, h->step, h->rank, h->world_size, h->data_bytes, manifest_.step, file.rank, manifest_.world_size,
            file.bytes - kFileHeaderBytes));
      }
    }
    return absl::OkStatus();
  }

  absl::Status Read(const std::string& name, int64_t start, BufferView dst) override {
    auto it = index_.find(name);
    if (it == index_.end()) {
      return absl::NotFoundError(absl::StrFormat("checkpoint step %d has no tensor '%s'", manifest_.step, name));
    }
    const size_t ti = it->second;
    const TensorEntry& t = manifest_.tensors[ti];
    if (dst.dtype != t.dtype) {
      return absl::InvalidArgumentError(absl::StrFormat("tensor '%s' is %s in checkpoint step %d, destination is %s",
                                                        name, DTypeName(t.dtype), manifest_.step, DTypeName(dst.dtype)));
    }
    if (dst.device.is_cuda()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("reading tensor '%s': destination is on %s, expected CPU", name, dst.device.ToString()));
    }
    const int64_t numel = t.numel();
    if (start < 0 || dst.count < 0 || start > numel || dst.count > numel - start) {
      return absl::InvalidArgumentError(absl::StrFormat("reading tensor '%s': elements [%d, %d) outside its %d",
                                                        name, start, start + dst.count, numel));
    }
    if (dst.count > 0 && dst.data == nullptr) {
      return absl::InvalidArgumentError(absl::StrFormat("reading tensor '%s': null destination", name));
    }
    const int64_t end = start + dst.count;
    const int64_t esize = ElementSize(t.dtype);
    // First piece that ends after `start`: pieces are sorted and contiguous (validated by ParseManifest).
    auto first = std::upper_bound(t.pieces.begin(), t.pieces.end(), start,
                                  [](int64_t s, const PieceEntry& p) { return s < p.start + p.count; });
    std::vector<char> scratch;
    for (auto p = first; p != t.pieces.end() && p->start < end; ++p) {
      const size_t pi = static_cast<size_t>(p - t.pieces.begin());
      const int64_t lo = std::max(start, p->start), hi = std::min(end, p->start + p->count);
      char* out = static_cast<char*>(dst.data) + (lo - start) * esize;
      if (IsVerified(ti, pi)) {
        TESSERA_RETURN_IF_ERROR(storage_->ReadAt(FilePath(p->file), p->offset + (lo - p->start) * esize,
                                                 (hi - lo) * esize, out));
        continue;
      }
      const int64_t bytes = p->count * esize;
      const bool whole = lo == p->start && hi == p->start + p->count;
      char* buf = out;  // a piece the destination covers whole is read and verified in place
      if (!whole) {
        scratch.resize(static_cast<size_t>(bytes));
        buf = scratch.data();
      }
      TESSERA_RETURN_IF_ERROR(ReadAndVerify(ti, pi, buf));
      if (!whole) std::memcpy(out, buf + (lo - p->start) * esize, static_cast<size_t>((hi - lo) * esize));
    }
    return absl::OkStatus();
  }

  absl::Status VerifyAll() override {
    std::vector<char> buf;
    for (size_t ti = 0; ti < manifest_.tensors.size(); ++ti) {
      const TensorEntry& t = manifest_.tensors[ti];
      for (size_t pi = 0; pi < t.pieces.size(); ++pi) {
        if (IsVerified(ti, pi)) continue;
        buf.resize(static_cast<size_t>(t.pieces[pi].count * ElementSize(t.dtype)));
        TESSERA_RETURN_IF_ERROR(ReadAndVerify(ti, pi, buf.data()));
      }
    }
    return absl::OkStatus();
  }

 private:
  std::string FilePath(size_t file) const { return absl::StrCat(dir_, "/", manifest_.files[file].name); }

  bool IsVerified(size_t t, size_t p) {
    absl::MutexLock lock(&mu_);
    return verified_[t][p];
  }

  // Reads piece `pi` of tensor `ti` whole into `buf` and checks its XXH3.
  absl::Status ReadAndVerify(size_t ti, size_t pi, char* buf) {
    const TensorEntry& t = manifest_.tensors[ti];
    const PieceEntry& p = t.pieces[pi];
    const int64_t bytes = p.count * ElementSize(t.dtype);
    const std::string path = FilePath(p.file);
    TESSERA_RETURN_IF_ERROR(storage_->ReadAt(path, p.offset, bytes, buf));
    const uint64_t actual = Checksum(buf, bytes);
    if (actual != p.xxh3) {
      return absl::DataLossError(absl::StrFormat(
          "checksum mismatch in %s for tensor '%s' elements [%d, %d) (bytes [%d, %d) of the file): stored %016x, "
          "computed %016x",
          storage_->Describe(path), t.name, p.start, p.start + p.count, p.offset, p.offset + bytes, p.xxh3, actual));
    }
    absl::MutexLock lock(&mu_);
    verified_[ti][pi] = true;
    return absl::OkStatus();
  }

  // For a size mismatch: names the first tensor whose bytes lie past the actual end of file `f`.
  std::string FirstDamagedTensor(size_t f, int64_t size) const {
    for (const TensorEntry& t : manifest_.tensors) {
      for (const PieceEntry& p : t.pieces) {
        if (p.file == static_cast<int32_t>(f) && p.offset + p.count * ElementSize(t.dtype) > size) {
          return absl::StrFormat("; first damaged: tensor '%s' elements [%d, %d)", t.name, p.start, p.start + p.count);
        }
      }
    }
    return "";
  }

  std::shared_ptr<Storage> storage_;
  const Manifest manifest_;
  const std::string dir_;
  std::unordered_map<std::string, size_t> index_;
  absl::Mutex mu_;
  std::vector<std::vector<bool>> verified_;  // per tensor, per piece: checksum already checked
};

}  // namespace

absl::StatusOr<std::vector<int64_t>> ListCommittedSteps(Storage& storage) {
  absl::StatusOr<std::vector<std::string>> names = storage.List("");
  if (absl::IsNotFound(names.status())) return std::vector<int64_t>{};
  TESSERA_RETURN_IF_ERROR(names.status());
  std::vector<int64_t> steps;
  for (const std::string& name : *names) {
    const int64_t step = internal::ParseStepDirName(name);
    if (step < 0 || name != StepDirName(step)) continue;
    TESSERA_ASSIGN_OR_RETURN(bool committed, storage.Exists(name + "/manifest.json"));
    if (committed) steps.push_back(step);
  }
  std::sort(steps.rbegin(), steps.rend());
  return steps;
}

absl::StatusOr<std::optional<int64_t>> ReadLatest(Storage& storage) {
  absl::StatusOr<std::string> text = storage.ReadAll("latest");
  if (absl::IsNotFound(text.status())) return std::optional<int64_t>();
  TESSERA_RETURN_IF_ERROR(text.status());
  std::string s = *text;
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  if (s.empty() || s.size() > 18) return std::optional<int64_t>();
  int64_t step = 0;
  for (char c : s) {
    if (c < '0' || c > '9') return std::optional<int64_t>();
    step = step * 10 + (c - '0');
  }
  return std::optional<int64_t>(step);
}

absl::StatusOr<std::unique_ptr<CheckpointReader>> CheckpointReader::Open(std::shared_ptr<Storage> storage,
                                                                         int64_t step) {
  if (storage == nullptr) return absl::InvalidArgumentError("CheckpointReader: storage is null");
  const std::string path = StepDirName(step) + "/manifest.json";
  absl::StatusOr<std::string> text = storage->ReadAll(path);
  if (absl::IsNotFound(text.status())) {
    return absl::NotFoundError(absl::StrFormat("checkpoint step %d is not committed: %s", step,
                                               text.status().message()));
  }
  TESSERA_RETURN_IF_ERROR(text.status());
  TESSERA_ASSIGN_OR_RETURN(Manifest manifest, ParseManifest(*text, storage->Describe(path)));
  if (manifest.step != step) {
    return absl::DataLossError(absl::StrFormat("%s: says step %d, expected %d", storage->Describe(path),
                                               manifest.step, step));
  }
  auto reader = std::make_unique<Reader>(std::move(storage), std::move(manifest));
  TESSERA_RETURN_IF_ERROR(reader->CheckFiles());
  return std::unique_ptr<CheckpointReader>(std::move(reader));
}

}  // namespace tessera::checkpoint
