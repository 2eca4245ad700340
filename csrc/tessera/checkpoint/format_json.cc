// JSON encoding of the manifest and of the per-rank index (schema: docs/checkpoint_format.md).
// Parsing is fuzzed (tests/cpp/fuzz/checkpoint_parse_fuzz.cc): every value is type- and range-checked before use,
// nesting depth is bounded before nlohmann sees the text, and no exception escapes.
#include <cinttypes>
#include <limits>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tessera/checkpoint/format.h"
#include "tessera/checkpoint/format_internal.h"
#include "tessera/core/status.h"

namespace tessera::checkpoint {
namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;  // serialization: keys in schema order, for people reading the files
constexpr char kManifestFormat[] = "tessera-checkpoint";
constexpr char kRankIndexFormat[] = "tessera-rank-index";

absl::Status Bad(std::string_view what, const std::string& field, const std::string& msg) {
  return absl::DataLossError(absl::StrCat(std::string(what), ": ", field, ": ", msg));
}

// Rejects nesting deeper than kMaxJsonDepth without recursion, so neither the parser nor dump() can exhaust the stack.
absl::Status CheckDepth(std::string_view text, std::string_view what) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > internal::kMaxJsonDepth) {
        return Bad(what, "json", absl::StrFormat("nested deeper than %d levels", internal::kMaxJsonDepth));
      }
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<json> ParseObject(std::string_view text, std::string_view what) {
  TESSERA_RETURN_IF_ERROR(CheckDepth(text, what));
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad(what, "json", "not valid JSON (syntax error or truncated)");
  if (!j.is_object()) return Bad(what, "json", "top level is not an object");
  return j;
}

absl::StatusOr<const json*> Member(const json& obj, const char* key, std::string_view what, const std::string& field) {
  auto it = obj.find(key);
  if (it == obj.end()) return Bad(what, field, "missing");
  return &*it;
}

absl::StatusOr<int64_t> GetInt(const json& obj, const char* key, int64_t lo, int64_t hi, std::string_view what,
                               const std::string& field) {
  TESSERA_ASSIGN_OR_RETURN(const json* v, Member(obj, key, what, field));
  int64_t x;
  if (v->is_number_unsigned()) {
    const uint64_t u = v->get<uint64_t>();
    if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) return Bad(what, field, "integer too large");
    x = static_cast<int64_t>(u);
  } else if (v->is_number_integer()) {
    x = v->get<int64_t>();
  } else {
    return Bad(what, field, absl::StrCat("expected an integer, found ", v->type_name()));
  }
  if (x < lo || x > hi) return Bad(what, field, absl::StrFormat("%d out of range [%d, %d]", x, lo, hi));
  return x;
}

absl::StatusOr<std::string> GetString(const json& obj, const char* key, std::string_view what,
                                      const std::string& field) {
  TESSERA_ASSIGN_OR_RETURN(const json* v, Member(obj, key, what, field));
  if (!v->is_string()) return Bad(what, field, absl::StrCat("expected a string, found ", v->type_name()));
  return v->get<std::string>();
}

absl::StatusOr<const json*> GetTyped(const json& obj, const char* key, json::value_t type, std::string_view what,
                                     const std::string& field) {
  TESSERA_ASSIGN_OR_RETURN(const json* v, Member(obj, key, what, field));
  if (v->type() != type) {
    return Bad(what, field, absl::StrCat("expected ", json(type).type_name(), ", found ", v->type_name()));
  }
  return v;
}

absl::Status CheckFormat(const json& j, const char* expected, std::string_view what) {
  TESSERA_ASSIGN_OR_RETURN(std::string format, GetString(j, "format", what, "format"));
  if (format != expected) {
    return Bad(what, "format", absl::StrFormat("'%s', expected '%s'", format, expected));
  }
  TESSERA_ASSIGN_OR_RETURN(int64_t version, GetInt(j, "version", 0, std::numeric_limits<int32_t>::max(), what,
                                                   "version"));
  if (version != kFormatVersion) {
    return Bad(what, "version", absl::StrFormat("%d, this build reads version %d", version, kFormatVersion));
  }
  return absl::OkStatus();
}

std::optional<DType> DTypeFromName(const std::string& s) {
  for (DType t : {DType::kFloat32, DType::kFloat64, DType::kBFloat16, DType::kFloat16}) {
    if (s == DTypeName(t)) return t;
  }
  return std::nullopt;
}

std::optional<uint64_t> ParseHex64(const std::string& s) {
  if (s.size() != 16) return std::nullopt;
  uint64_t v = 0;
  for (char c : s) {
    int d;
    if (c >= '0' && c <= '9') d = c - '0';
    else if (c >= 'a' && c <= 'f') d = c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') d = c - 'A' + 10;
    else return std::nullopt;
    v = (v << 4) | static_cast<uint64_t>(d);
  }
  return v;
}

constexpr int64_t kI64Max = std::numeric_limits<int64_t>::max();
constexpr int64_t kI32Max = std::numeric_limits<int32_t>::max();

absl::StatusOr<FileEntry> ParseFile(const json& j, std::string_view what, const std::string& field) {
  if (!j.is_object()) return Bad(what, field, "expected an object");
  FileEntry f;
  TESSERA_ASSIGN_OR_RETURN(f.name, GetString(j, "name", what, field + ".name"));
  TESSERA_ASSIGN_OR_RETURN(f.rank, GetInt(j, "rank", 0, kI32Max, what, field + ".rank"));
  TESSERA_ASSIGN_OR_RETURN(f.bytes, GetInt(j, "bytes", 0, kI64Max, what, field + ".bytes"));
  return f;
}

absl::StatusOr<std::vector<TensorEntry>> ParseTensors(const json& root, std::string_view what) {
  TESSERA_ASSIGN_OR_RETURN(const json* arr, GetTyped(root, "tensors", json::value_t::array, what, "tensors"));
  std::vector<TensorEntry> out;
  out.reserve(arr->size());
  for (size_t ti = 0; ti < arr->size(); ++ti) {
    const json& jt = (*arr)[ti];
    std::string field = absl::StrFormat("tensors[%d]", ti);
    if (!jt.is_object()) return Bad(what, field, "expected an object");
    TensorEntry t;
    TESSERA_ASSIGN_OR_RETURN(t.name, GetString(jt, "name", what, field + ".name"));
    field = absl::StrFormat("tensors[%d] ('%s')", ti, t.name);
    TESSERA_ASSIGN_OR_RETURN(std::string dtype, GetString(jt, "dtype", what, field + ".dtype"));
    std::optional<DType> dt = DTypeFromName(dtype);
    if (!dt) return Bad(what, field + ".dtype", absl::StrFormat("unknown dtype '%s'", dtype));
    t.dtype = *dt;
    TESSERA_ASSIGN_OR_RETURN(const json* shape, GetTyped(jt, "shape", json::value_t::array, what, field + ".shape"));
    if (shape->size() > internal::kMaxRank) {
      return Bad(what, field + ".shape", absl::StrFormat("%d dims", shape->size()));
    }
    for (size_t d = 0; d < shape->size(); ++d) {
      const json& v = (*shape)[d];
      const std::string df = absl::StrFormat("%s.shape[%d]", field, d);
      if (v.is_number_unsigned()) {
        if (v.get<uint64_t>() > static_cast<uint64_t>(kI64Max)) return Bad(what, df, "integer too large");
        t.shape.push_back(static_cast<int64_t>(v.get<uint64_t>()));
      } else if (v.is_number_integer()) {
        t.shape.push_back(v.get<int64_t>());
      } else {
        return Bad(what, df, absl::StrCat("expected an integer, found ", v.type_name()));
      }
    }
    TESSERA_ASSIGN_OR_RETURN(const json* pieces,
                             GetTyped(jt, "pieces", json::value_t::array, what, field + ".pieces"));
    t.pieces.reserve(pieces->size());
    for (size_t pi = 0; pi < pieces->size(); ++pi) {
      const json& jp = (*pieces)[pi];
      const std::string pf = absl::StrFormat("%s.pieces[%d]", field, pi);
      if (!jp.is_object()) return Bad(what, pf, "expected an object");
      PieceEntry p;
      TESSERA_ASSIGN_OR_RETURN(p.file, GetInt(jp, "file", 0, kI32Max, what, pf + ".file"));
      TESSERA_ASSIGN_OR_RETURN(p.offset, GetInt(jp, "offset", 0, kI64Max, what, pf + ".offset"));
      TESSERA_ASSIGN_OR_RETURN(p.start, GetInt(jp, "start", 0, kI64Max, what, pf + ".start"));
      TESSERA_ASSIGN_OR_RETURN(p.count, GetInt(jp, "count", 0, kI64Max, what, pf + ".count"));
      TESSERA_ASSIGN_OR_RETURN(std::string hex, GetString(jp, "xxh3", what, pf + ".xxh3"));
      std::optional<uint64_t> h = ParseHex64(hex);
      if (!h) return Bad(what, pf + ".xxh3", absl::StrFormat("'%s' is not 16 hex digits", hex));
      p.xxh3 = *h;
      t.pieces.push_back(p);
    }
    out.push_back(std::move(t));
  }
  return out;
}

ojson TensorsToJson(const std::vector<TensorEntry>& tensors) {
  ojson arr = ojson::array();
  for (const TensorEntry& t : tensors) {
    ojson pieces = ojson::array();
    for (const PieceEntry& p : t.pieces) {
      pieces.push_back({{"file", p.file},
                        {"offset", p.offset},
                        {"start", p.start},
                        {"count", p.count},
                        {"xxh3", absl::StrFormat("%016x", p.xxh3)}});
    }
    arr.push_back({{"name", t.name}, {"dtype", DTypeName(t.dtype)}, {"shape", t.shape}, {"pieces", std::move(pieces)}});
  }
  return arr;
}

ojson FileToJson(const FileEntry& f) { return {{"name", f.name}, {"rank", f.rank}, {"bytes", f.bytes}}; }

// User extras are opaque JSON objects; the writer checks them (IsJsonObject) before they get here.
ojson ExtraToJson(const std::string& text, const char* field) {
  ojson j = ojson::parse(text, nullptr, /*allow_exceptions=*/false);
  TESSERA_CHECK(j.is_object(), field, " must be a JSON object (validate it before serializing): ", text.substr(0, 80));
  return j;
}

std::string Dump(const ojson& j) {
  // `replace` keeps a tensor name with invalid UTF-8 from throwing; the writer rejects such names up front.
  return j.dump(1, ' ', /*ensure_ascii=*/false, ojson::error_handler_t::replace) + "\n";
}

absl::StatusOr<Manifest> ParseManifestImpl(std::string_view text, std::string_view what) {
  TESSERA_ASSIGN_OR_RETURN(json j, ParseObject(text, what));
  TESSERA_RETURN_IF_ERROR(CheckFormat(j, kManifestFormat, what));
  Manifest m;
  TESSERA_ASSIGN_OR_RETURN(m.step, GetInt(j, "step", 0, kI64Max, what, "step"));
  TESSERA_ASSIGN_OR_RETURN(m.world_size, GetInt(j, "world_size", 1, internal::kMaxWorldSize, what, "world_size"));
  TESSERA_ASSIGN_OR_RETURN(const json* files, GetTyped(j, "files", json::value_t::array, what, "files"));
  for (size_t i = 0; i < files->size(); ++i) {
    TESSERA_ASSIGN_OR_RETURN(FileEntry f, ParseFile((*files)[i], what, absl::StrFormat("files[%d]", i)));
    m.files.push_back(std::move(f));
  }
  TESSERA_ASSIGN_OR_RETURN(m.tensors, ParseTensors(j, what));
  TESSERA_ASSIGN_OR_RETURN(const json* global, GetTyped(j, "global", json::value_t::object, what, "global"));
  m.global_json = global->dump();
  TESSERA_ASSIGN_OR_RETURN(const json* ranks, GetTyped(j, "ranks", json::value_t::array, what, "ranks"));
  for (size_t i = 0; i < ranks->size(); ++i) {
    if (!(*ranks)[i].is_object()) return Bad(what, absl::StrFormat("ranks[%d]", i), "expected an object");
    m.rank_json.push_back((*ranks)[i].dump());
  }
  TESSERA_RETURN_IF_ERROR(internal::ValidateManifest(m, what));
  return m;
}

absl::StatusOr<RankIndex> ParseRankIndexImpl(std::string_view text, std::string_view what) {
  TESSERA_ASSIGN_OR_RETURN(json j, ParseObject(text, what));
  TESSERA_RETURN_IF_ERROR(CheckFormat(j, kRankIndexFormat, what));
  RankIndex r;
  TESSERA_ASSIGN_OR_RETURN(r.rank, GetInt(j, "rank", 0, kI32Max, what, "rank"));
  TESSERA_ASSIGN_OR_RETURN(r.world_size, GetInt(j, "world_size", 1, internal::kMaxWorldSize, what, "world_size"));
  TESSERA_ASSIGN_OR_RETURN(r.step, GetInt(j, "step", 0, kI64Max, what, "step"));
  TESSERA_ASSIGN_OR_RETURN(r.attempt, GetInt(j, "attempt", 0, kI64Max, what, "attempt"));
  TESSERA_ASSIGN_OR_RETURN(const json* file, Member(j, "file", what, "file"));
  TESSERA_ASSIGN_OR_RETURN(r.file, ParseFile(*file, what, "file"));
  TESSERA_ASSIGN_OR_RETURN(r.tensors, ParseTensors(j, what));
  TESSERA_ASSIGN_OR_RETURN(const json* rank_extra,
                           GetTyped(j, "rank_extra", json::value_t::object, what, "rank_extra"));
  r.rank_json = rank_extra->dump();
  TESSERA_ASSIGN_OR_RETURN(const json* global, GetTyped(j, "global", json::value_t::object, what, "global"));
  r.global_json = global->dump();
  TESSERA_RETURN_IF_ERROR(internal::ValidateRankIndex(r, what));
  return r;
}

}  // namespace

std::string SerializeManifest(const Manifest& m) {
  ojson files = ojson::array();
  for (const FileEntry& f : m.files) files.push_back(FileToJson(f));
  ojson ranks = ojson::array();
  for (const std::string& r : m.rank_json) ranks.push_back(ExtraToJson(r, "rank_json"));
  ojson j = {{"format", kManifestFormat},
            {"version", m.version},
            {"step", m.step},
            {"world_size", m.world_size},
            {"files", std::move(files)},
            {"tensors", TensorsToJson(m.tensors)},
            {"global", ExtraToJson(m.global_json, "global_json")},
            {"ranks", std::move(ranks)}};
  return Dump(j);
}

std::string SerializeRankIndex(const RankIndex& r) {
  ojson j = {{"format", kRankIndexFormat},
            {"version", kFormatVersion},
            {"rank", r.rank},
            {"world_size", r.world_size},
            {"step", r.step},
            {"attempt", r.attempt},
            {"file", FileToJson(r.file)},
            {"tensors", TensorsToJson(r.tensors)},
            {"rank_extra", ExtraToJson(r.rank_json, "rank_json")},
            {"global", ExtraToJson(r.global_json, "global_json")}};
  return Dump(j);
}

// nlohmann only throws here on our own bugs (every access is type-checked first); the catch keeps a fuzzed input
// from ever terminating the process anyway.
absl::StatusOr<Manifest> ParseManifest(std::string_view json_text, std::string_view what) {
  try {
    return ParseManifestImpl(json_text, what);
  } catch (const std::exception& e) {
    return Bad(what, "json", e.what());
  }
}

absl::StatusOr<RankIndex> ParseRankIndex(std::string_view json_text, std::string_view what) {
  try {
    return ParseRankIndexImpl(json_text, what);
  } catch (const std::exception& e) {
    return Bad(what, "json", e.what());
  }
}

namespace internal {
bool IsJsonObject(std::string_view text) {
  if (!CheckDepth(text, "extra").ok()) return false;
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  return j.is_object();
}
bool IsValidUtf8(const std::string& s) {
  try {
    (void)json(s).dump();
    return true;
  } catch (const json::exception&) {
    return false;
  }
}
}  // namespace internal

}  // namespace tessera::checkpoint
