// The on-disk format of a tessera checkpoint (spec: docs/checkpoint_format.md). Torch-free.
//
//   ROOT/latest                       text: the newest committed step ("12\n"), replaced atomically
//   ROOT/step-0000000012/             one committed checkpoint; exists only once complete (atomic rename)
//        manifest.json                every tensor, its pieces (file, offset, element range, XXH3), extras
//        rank-00000.bin ...           one data file per saving rank: FileHeader, then the pieces' raw bytes
//   ROOT/.tmp-step-0000000012/        a save in progress (or one that crashed): never loaded, removed later
//        rank-00000.bin, rank-00000.json   a rank's data and, once durable, its index (the rank's "done" marker)
//
// A logical tensor (e.g. "model/blocks.0.fc1.weight") is stored as pieces, each a contiguous range of its
// flattened elements saved by one rank; loading on any number of ranks reads the ranges it needs (resharding).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tessera/core/dtype.h"

namespace tessera::checkpoint {

inline constexpr int kFormatVersion = 1;
inline constexpr char kFileMagic[8] = {'T', 'S', 'R', 'C', 'K', 'P', 'T', '1'};
inline constexpr int64_t kFileHeaderBytes = 64;

// Fixed 64-byte little-endian header at the start of every data file. The encoding also holds the magic, zeroed
// reserved bytes and an XXH3 of the header's first 56 bytes (layout table in docs/checkpoint_format.md), so a
// damaged header is detected; they are not fields here because they are derived.
struct FileHeader {
  uint32_t version = kFormatVersion;
  int32_t rank = 0;
  int32_t world_size = 1;
  int64_t step = 0;
  int64_t data_bytes = 0;  // bytes after the header
};
std::string EncodeFileHeader(const FileHeader& h);  // exactly kFileHeaderBytes bytes
// Validates magic, version, ranges; never reads past `bytes`.
absl::StatusOr<FileHeader> ParseFileHeader(absl::Span<const uint8_t> bytes);

struct PieceEntry {
  int32_t file = 0;     // index into Manifest::files
  int64_t offset = 0;   // byte offset in that file (>= kFileHeaderBytes)
  int64_t start = 0;    // first flattened element of the tensor this piece holds
  int64_t count = 0;    // elements
  uint64_t xxh3 = 0;    // XXH3-64 of the piece's bytes
};

struct TensorEntry {
  std::string name;
  DType dtype = DType::kFloat32;
  std::vector<int64_t> shape;
  std::vector<PieceEntry> pieces;  // sorted by start; together they cover [0, numel) exactly once
  int64_t numel() const;
};

struct FileEntry {
  std::string name;   // e.g. "rank-00000.bin", relative to the step directory
  int32_t rank = 0;
  int64_t bytes = 0;  // total file size including the header
};

struct Manifest {
  int32_t version = kFormatVersion;
  int64_t step = 0;
  int32_t world_size = 1;
  std::vector<FileEntry> files;
  std::vector<TensorEntry> tensors;
  std::string global_json = "{}";        // opaque JSON object from rank 0 (user extras)
  std::vector<std::string> rank_json;    // opaque JSON object per saving rank (e.g. RNG states), world_size long
};

std::string SerializeManifest(const Manifest& m);
// Parses and validates everything before anything is read: version, names unique, dtypes known, shapes
// non-negative and numel without overflow, pieces in bounds of their tensor and of their file, covering each
// tensor exactly once, file indices valid. Errors are DataLoss naming the field (and `what`, e.g. the path).
absl::StatusOr<Manifest> ParseManifest(std::string_view json, std::string_view what = "manifest.json");

// A rank's index written next to its data file while saving: the pieces it wrote (file index 0 = its own file).
struct RankIndex {
  int32_t rank = 0;
  int32_t world_size = 1;
  int64_t step = 0;
  int64_t attempt = 0;  // SaveRequest::attempt: tells this save's index from one an earlier try at the step left
  FileEntry file;
  std::vector<TensorEntry> tensors;  // each with this rank's pieces only
  std::string rank_json = "{}";
  std::string global_json = "{}";    // meaningful from rank 0 only
};
std::string SerializeRankIndex(const RankIndex& r);
absl::StatusOr<RankIndex> ParseRankIndex(std::string_view json, std::string_view what);
// Merges every rank's index into one manifest (validated as ParseManifest does).
absl::StatusOr<Manifest> MergeRankIndexes(const std::vector<RankIndex>& ranks);

std::string StepDirName(int64_t step);     // "step-0000000012"
std::string TmpStepDirName(int64_t step);  // ".tmp-step-0000000012"
std::string RankFileName(int32_t rank);    // "rank-00003.bin"
std::string RankIndexName(int32_t rank);   // "rank-00003.json"

uint64_t Checksum(const void* data, int64_t bytes);  // XXH3-64

}  // namespace tessera::checkpoint
