// The binary parts of the format (data file header, names, checksums) and the validation shared by every path
// that produces a Manifest (parsing and merging). JSON encoding lives in format_json.cc.
#include "tessera/checkpoint/format.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <unordered_map>
#include <unordered_set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tessera/checkpoint/format_internal.h"
#include "tessera/core/status.h"

// Header-only xxHash: no link-time dependency for consumers of the installed static library.
#define XXH_INLINE_ALL
#include <xxhash.h>

namespace tessera::checkpoint {
namespace {

// Header layout (all little-endian); see docs/checkpoint_format.md.
constexpr int kOffMagic = 0;        // char[8]  "TSRCKPT1"
constexpr int kOffVersion = 8;      // u32
constexpr int kOffRank = 12;        // i32
constexpr int kOffWorldSize = 16;   // i32
constexpr int kOffReserved0 = 20;   // u32, zero
constexpr int kOffStep = 24;        // i64
constexpr int kOffDataBytes = 32;   // i64
constexpr int kOffReserved1 = 40;   // 16 bytes, zero
constexpr int kOffChecksum = 56;    // u64: XXH3-64 of bytes [0, 56)

void PutLE(uint8_t* p, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}
uint64_t GetLE(const uint8_t* p, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

absl::Status Corrupt(std::string_view what, const std::string& field, const std::string& msg) {
  return absl::DataLossError(absl::StrCat(std::string(what), ": ", field, ": ", msg));
}

}  // namespace

std::string EncodeFileHeader(const FileHeader& h) {
  uint8_t b[kFileHeaderBytes] = {};
  std::memcpy(b + kOffMagic, kFileMagic, sizeof(kFileMagic));
  PutLE(b + kOffVersion, h.version, 4);
  PutLE(b + kOffRank, static_cast<uint32_t>(h.rank), 4);
  PutLE(b + kOffWorldSize, static_cast<uint32_t>(h.world_size), 4);
  PutLE(b + kOffStep, static_cast<uint64_t>(h.step), 8);
  PutLE(b + kOffDataBytes, static_cast<uint64_t>(h.data_bytes), 8);
  PutLE(b + kOffChecksum, XXH3_64bits(b, kOffChecksum), 8);
  return std::string(reinterpret_cast<const char*>(b), kFileHeaderBytes);
}

absl::StatusOr<FileHeader> ParseFileHeader(absl::Span<const uint8_t> bytes) {
  if (static_cast<int64_t>(bytes.size()) < kFileHeaderBytes) {
    return absl::DataLossError(
        absl::StrFormat("file header is %d bytes, expected %d (truncated file)", bytes.size(), kFileHeaderBytes));
  }
  const uint8_t* b = bytes.data();
  if (std::memcmp(b + kOffMagic, kFileMagic, sizeof(kFileMagic)) != 0) {
    return absl::DataLossError("file header: bad magic, expected \"TSRCKPT1\" (not a tessera checkpoint data file)");
  }
  const uint64_t stored = GetLE(b + kOffChecksum, 8);
  const uint64_t actual = XXH3_64bits(b, kOffChecksum);
  if (stored != actual) {
    return absl::DataLossError(
        absl::StrFormat("file header: checksum mismatch (stored %016x, computed %016x): damaged header", stored, actual));
  }
  FileHeader h;
  h.version = static_cast<uint32_t>(GetLE(b + kOffVersion, 4));
  h.rank = static_cast<int32_t>(static_cast<uint32_t>(GetLE(b + kOffRank, 4)));
  h.world_size = static_cast<int32_t>(static_cast<uint32_t>(GetLE(b + kOffWorldSize, 4)));
  h.step = static_cast<int64_t>(GetLE(b + kOffStep, 8));
  h.data_bytes = static_cast<int64_t>(GetLE(b + kOffDataBytes, 8));
  if (h.version != static_cast<uint32_t>(kFormatVersion)) {
    return absl::DataLossError(absl::StrFormat("file header: version %u, this build reads version %d", h.version,
                                               kFormatVersion));
  }
  if (GetLE(b + kOffReserved0, 4) != 0 || GetLE(b + kOffReserved1, 8) != 0 || GetLE(b + kOffReserved1 + 8, 8) != 0) {
    return absl::DataLossError("file header: reserved bytes are not zero");
  }
  if (h.world_size < 1 || h.world_size > internal::kMaxWorldSize) {
    return absl::DataLossError(absl::StrFormat("file header: world_size %d out of range [1, %d]", h.world_size,
                                               internal::kMaxWorldSize));
  }
  if (h.rank < 0 || h.rank >= h.world_size) {
    return absl::DataLossError(
        absl::StrFormat("file header: rank %d out of range [0, %d)", h.rank, h.world_size));
  }
  if (h.step < 0) return absl::DataLossError(absl::StrFormat("file header: negative step %d", h.step));
  if (h.data_bytes < 0 || h.data_bytes > std::numeric_limits<int64_t>::max() - kFileHeaderBytes) {
    return absl::DataLossError(absl::StrFormat("file header: data_bytes %d out of range", h.data_bytes));
  }
  return h;
}

int64_t TensorEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, d, &n)) return -1;
  }
  return n;
}

std::string StepDirName(int64_t step) { return absl::StrFormat("step-%010d", step); }
std::string TmpStepDirName(int64_t step) { return absl::StrFormat(".tmp-step-%010d", step); }
std::string RankFileName(int32_t rank) { return absl::StrFormat("rank-%05d.bin", rank); }
std::string RankIndexName(int32_t rank) { return absl::StrFormat("rank-%05d.json", rank); }

uint64_t Checksum(const void* data, int64_t bytes) {
  return XXH3_64bits(data, static_cast<size_t>(bytes));
}

namespace internal {

bool IsSafeFileName(const std::string& name) {
  if (name.empty() || name.size() > 255 || name[0] == '.') return false;
  for (char c : name) {
    if (c == '/' || c == '\\' || c == '\0') return false;
  }
  return true;
}

std::optional<int64_t> TensorBytes(const TensorEntry& t) {
  const int64_t n = t.numel();
  int64_t bytes;
  if (n < 0 || __builtin_mul_overflow(n, ElementSize(t.dtype), &bytes)) return std::nullopt;
  return bytes;
}

absl::Status ValidateTensors(const std::vector<TensorEntry>& tensors, const std::vector<FileEntry>& files,
                             bool require_cover, std::string_view what) {
  std::unordered_set<std::string> names;
  names.reserve(tensors.size());
  for (size_t ti = 0; ti < tensors.size(); ++ti) {
    const TensorEntry& t = tensors[ti];
    const std::string field = absl::StrFormat("tensors[%d] ('%s')", ti, t.name);
    if (t.name.empty()) return Corrupt(what, field, "empty tensor name");
    if (!names.insert(t.name).second) return Corrupt(what, field, "duplicate tensor name");
    if (ElementSize(t.dtype) == 0) return Corrupt(what, field, "unknown dtype");
    if (t.shape.size() > kMaxRank) return Corrupt(what, field, absl::StrFormat("shape has %d dims", t.shape.size()));
    for (int64_t d : t.shape) {
      if (d < 0) return Corrupt(what, field + ".shape", absl::StrFormat("negative dimension %d", d));
    }
    if (!TensorBytes(t).has_value()) return Corrupt(what, field + ".shape", "element count overflows int64");
    const int64_t numel = t.numel();
    const int64_t esize = ElementSize(t.dtype);
    int64_t next = 0;  // the first element not yet covered
    for (size_t pi = 0; pi < t.pieces.size(); ++pi) {
      const PieceEntry& p = t.pieces[pi];
      const std::string pf = absl::StrFormat("%s.pieces[%d]", field, pi);
      if (p.file < 0 || static_cast<size_t>(p.file) >= files.size()) {
        return Corrupt(what, pf + ".file", absl::StrFormat("file index %d, there are %d files", p.file, files.size()));
      }
      if (p.count < 1) return Corrupt(what, pf + ".count", absl::StrFormat("count %d, expected >= 1", p.count));
      if (p.start < 0 || p.start > numel || p.count > numel - p.start) {
        return Corrupt(what, pf, absl::StrFormat("elements [%d, +%d) outside the tensor's %d elements", p.start,
                                                 p.count, numel));
      }
      if (p.start < next) {
        return Corrupt(what, pf + ".start",
                       absl::StrFormat("start %d overlaps the previous piece (ends at %d) or is unsorted", p.start, next));
      }
      if (require_cover && p.start > next) {
        return Corrupt(what, pf + ".start", absl::StrFormat("gap: elements [%d, %d) are in no piece", next, p.start));
      }
      const int64_t bytes = p.count * esize;  // cannot overflow: count <= numel and numel * esize fits
      const FileEntry& f = files[p.file];
      if (p.offset < kFileHeaderBytes || p.offset > f.bytes || bytes > f.bytes - p.offset) {
        return Corrupt(what, pf + ".offset",
                       absl::StrFormat("bytes [%d, +%d) outside file '%s' (%d bytes, data from %d)", p.offset, bytes,
                                       f.name, f.bytes, kFileHeaderBytes));
      }
      next = p.start + p.count;
    }
    if (require_cover && next != numel) {
      return Corrupt(what, field + ".pieces",
                     absl::StrFormat("pieces cover elements [0, %d) of %d", next, numel));
    }
  }
  return absl::OkStatus();
}

absl::Status ValidateFile(const FileEntry& f, int32_t world_size, std::string_view what, const std::string& field) {
  if (!IsSafeFileName(f.name)) {
    return Corrupt(what, field + ".name", absl::StrFormat("'%s' is not a plain file name", f.name));
  }
  if (f.rank < 0 || f.rank >= world_size) {
    return Corrupt(what, field + ".rank", absl::StrFormat("rank %d out of range [0, %d)", f.rank, world_size));
  }
  if (f.bytes < kFileHeaderBytes) {
    return Corrupt(what, field + ".bytes", absl::StrFormat("%d bytes, less than the %d-byte header", f.bytes,
                                                           kFileHeaderBytes));
  }
  return absl::OkStatus();
}

absl::Status ValidateManifest(const Manifest& m, std::string_view what) {
  if (m.version != kFormatVersion) {
    return Corrupt(what, "version", absl::StrFormat("%d, this build reads version %d", m.version, kFormatVersion));
  }
  if (m.step < 0) return Corrupt(what, "step", absl::StrFormat("negative step %d", m.step));
  if (m.world_size < 1 || m.world_size > kMaxWorldSize) {
    return Corrupt(what, "world_size", absl::StrFormat("%d out of range [1, %d]", m.world_size, kMaxWorldSize));
  }
  std::unordered_set<std::string> file_names;
  for (size_t i = 0; i < m.files.size(); ++i) {
    const std::string field = absl::StrFormat("files[%d]", i);
    TESSERA_RETURN_IF_ERROR(ValidateFile(m.files[i], m.world_size, what, field));
    if (!file_names.insert(m.files[i].name).second) return Corrupt(what, field + ".name", "duplicate file name");
  }
  if (m.rank_json.size() != static_cast<size_t>(m.world_size)) {
    return Corrupt(what, "ranks",
                   absl::StrFormat("%d entries, expected world_size = %d", m.rank_json.size(), m.world_size));
  }
  return ValidateTensors(m.tensors, m.files, /*require_cover=*/true, what);
}

absl::Status ValidateRankIndex(const RankIndex& r, std::string_view what) {
  if (r.world_size < 1 || r.world_size > kMaxWorldSize) {
    return Corrupt(what, "world_size", absl::StrFormat("%d out of range [1, %d]", r.world_size, kMaxWorldSize));
  }
  if (r.rank < 0 || r.rank >= r.world_size) {
    return Corrupt(what, "rank", absl::StrFormat("%d out of range [0, %d)", r.rank, r.world_size));
  }
  if (r.step < 0) return Corrupt(what, "step", absl::StrFormat("negative step %d", r.step));
  TESSERA_RETURN_IF_ERROR(ValidateFile(r.file, r.world_size, what, "file"));
  if (r.file.rank != r.rank) {
    return Corrupt(what, "file.rank", absl::StrFormat("%d, but the index is rank %d's", r.file.rank, r.rank));
  }
  return ValidateTensors(r.tensors, {r.file}, /*require_cover=*/false, what);
}

}  // namespace internal

absl::StatusOr<Manifest> MergeRankIndexes(const std::vector<RankIndex>& ranks) {
  const char* const what = "merging rank indexes";
  if (ranks.empty()) return absl::DataLossError("merging rank indexes: no ranks");
  Manifest m;
  m.world_size = ranks[0].world_size;
  m.step = ranks[0].step;
  if (static_cast<int64_t>(ranks.size()) != m.world_size) {
    return absl::DataLossError(absl::StrFormat("merging rank indexes: %d indexes for world_size %d", ranks.size(),
                                               m.world_size));
  }
  std::vector<const RankIndex*> by_rank(m.world_size, nullptr);
  for (const RankIndex& r : ranks) {
    const std::string w = absl::StrFormat("%s: rank %d", what, r.rank);
    TESSERA_RETURN_IF_ERROR(internal::ValidateRankIndex(r, w));
    if (r.world_size != m.world_size || r.step != m.step) {
      return absl::DataLossError(absl::StrFormat("%s: step %d world_size %d, but rank %d says step %d world_size %d",
                                                 w, r.step, r.world_size, ranks[0].rank, m.step, m.world_size));
    }
    if (by_rank[r.rank] != nullptr) return absl::DataLossError(absl::StrCat(w, ": two indexes for this rank"));
    by_rank[r.rank] = &r;
  }
  std::unordered_map<std::string, size_t> index_of;
  for (int32_t rank = 0; rank < m.world_size; ++rank) {
    const RankIndex& r = *by_rank[rank];
    m.files.push_back(r.file);
    m.rank_json.push_back(r.rank_json);
    for (const TensorEntry& t : r.tensors) {
      auto [it, inserted] = index_of.emplace(t.name, m.tensors.size());
      if (inserted) {
        m.tensors.push_back(TensorEntry{t.name, t.dtype, t.shape, {}});
      } else {
        const TensorEntry& first = m.tensors[it->second];
        if (first.dtype != t.dtype || first.shape != t.shape) {
          return absl::DataLossError(absl::StrFormat(
              "%s: tensor '%s' is %s with %d dims on rank %d but %s with %d dims on an earlier rank", what, t.name,
              DTypeName(t.dtype), t.shape.size(), rank, DTypeName(first.dtype), first.shape.size()));
        }
      }
      for (PieceEntry p : t.pieces) {
        p.file = rank;
        m.tensors[it->second].pieces.push_back(p);
      }
    }
  }
  m.global_json = by_rank[0]->global_json;
  for (TensorEntry& t : m.tensors) {
    std::sort(t.pieces.begin(), t.pieces.end(),
              [](const PieceEntry& a, const PieceEntry& b) { return a.start < b.start; });
  }
  TESSERA_RETURN_IF_ERROR(internal::ValidateManifest(m, what));
  return m;
}

}  // namespace tessera::checkpoint
