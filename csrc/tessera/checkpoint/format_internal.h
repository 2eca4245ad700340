// Validation shared by format.cc (merge) and format_json.cc (parse). Not part of the public API.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "tessera/checkpoint/format.h"

namespace tessera::checkpoint::internal {

inline constexpr int32_t kMaxWorldSize = 1 << 20;
inline constexpr size_t kMaxRank = 64;       // dimensions of a tensor
inline constexpr int kMaxJsonDepth = 64;     // nesting accepted in manifest / rank index JSON (user extras included)

// A plain name inside the step directory: no separators, not hidden, not "." or "..".
bool IsSafeFileName(const std::string& name);
// numel * element size, or nullopt on a negative dim or int64 overflow.
std::optional<int64_t> TensorBytes(const TensorEntry& t);

// Names unique, dtypes known, shapes sane, pieces sorted, non-overlapping, inside their tensor and file, and (with
// require_cover) covering every element exactly once. DataLoss "<what>: <field>: <problem>".
absl::Status ValidateTensors(const std::vector<TensorEntry>& tensors, const std::vector<FileEntry>& files,
                             bool require_cover, std::string_view what);
absl::Status ValidateFile(const FileEntry& f, int32_t world_size, std::string_view what, const std::string& field);
absl::Status ValidateManifest(const Manifest& m, std::string_view what);
absl::Status ValidateRankIndex(const RankIndex& r, std::string_view what);

// Whether `json` parses as a JSON object (used to check user extras before they are embedded).
bool IsJsonObject(std::string_view json);
// Whether `s` is valid UTF-8 (names go into JSON verbatim).
bool IsValidUtf8(const std::string& s);

}  // namespace tessera::checkpoint::internal
