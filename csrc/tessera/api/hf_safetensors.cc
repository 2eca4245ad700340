// See hf_safetensors.h. Safetensors format: 8-byte little-endian header length N, N bytes of JSON header
// ({name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}), then the data; offsets are relative to
// the data's start (github.com/huggingface/safetensors, "Format"). Read with plain POSIX IO, no Python, and no
// std::filesystem: libtorch.so exports its own copy of those symbols, and a binary linking both can bind to it and
// crash (see RemoveAll in checkpoint/storage.cc).
#include "tessera/api/hf_safetensors.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "tessera/core/status.h"

namespace tessera::hf {
namespace {

using json = nlohmann::json;

constexpr char kSingle[] = "model.safetensors";
constexpr char kIndex[] = "model.safetensors.index.json";
// The reference implementation's limit (safetensors' MAX_HEADER_SIZE): a larger length is a corrupt file, and
// refusing it early avoids allocating gigabytes for a header.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

bool IsDir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool IsFile(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
std::string Join(const std::string& dir, const std::string& name) {
  return !dir.empty() && dir.back() == '/' ? dir + name : dir + "/" + name;
}
// The names in `dir`, sorted (for an error message).
std::vector<std::string> ListDir(const std::string& dir) {
  std::vector<std::string> out;
  if (DIR* d = ::opendir(dir.c_str())) {
    while (const dirent* e = ::readdir(d)) {
      if (std::strcmp(e->d_name, ".") != 0 && std::strcmp(e->d_name, "..") != 0) out.emplace_back(e->d_name);
    }
    ::closedir(d);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// ---- config.json -------------------------------------------------------------------------------------------------

absl::Status Invalid(const std::string& where, const std::string& msg) {
  return absl::InvalidArgumentError(absl::StrCat(where, ": ", msg));
}

// Python's truthiness of a JSON value (hf.get(key) in an `if`): null, false, 0, "" and empty containers are false.
bool Truthy(const json& v) {
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number()) return v.get<double>() != 0.0;
  if (v.is_string() || v.is_array() || v.is_object()) return !v.empty();
  return true;
}

// obj[key] as an integer (an integral float is accepted, as Python's int() of an HF value would be).
absl::StatusOr<int64_t> Int(const json& obj, const char* key, const std::string& where) {
  const json& v = obj.at(key);
  if (v.is_number_integer()) return v.get<int64_t>();
  if (v.is_number_float() && v.get<double>() == static_cast<double>(static_cast<int64_t>(v.get<double>()))) {
    return static_cast<int64_t>(v.get<double>());
  }
  return Invalid(where, absl::StrCat("field '", key, "' must be an integer, found ", v.dump()));
}

absl::StatusOr<double> Num(const json& obj, const char* key, const std::string& where) {
  const json& v = obj.at(key);
  if (v.is_number()) return v.get<double>();
  return Invalid(where, absl::StrCat("field '", key, "' must be a number, found ", v.dump()));
}

absl::StatusOr<int64_t> NeedInt(const json& hf, const char* key, const std::string& where) {
  if (!hf.contains(key)) return Invalid(where, absl::StrCat("required field '", key, "' is missing"));
  return Int(hf, key, where);
}

// rope_theta and the scaling from transformers 4's (rope_theta, rope_scaling) or 5's rope_parameters, as
// _rope_fields in state_dict_adapter.py.
absl::Status ReadRope(const json& hf, const std::string& where, LlamaConfig& cfg) {
  static const json kEmpty = json::object();
  const json& params = hf.contains("rope_parameters") && Truthy(hf["rope_parameters"]) ? hf["rope_parameters"] : kEmpty;
  const json& scaling = hf.contains("rope_scaling") && Truthy(hf["rope_scaling"]) ? hf["rope_scaling"] : params;
  if (!params.is_object() || !scaling.is_object()) {
    return Invalid(where, "rope_scaling / rope_parameters must be objects");
  }
  const json& theta_src = hf.contains("rope_theta") ? hf : params;
  cfg.rope_theta = 10000.0;  // transformers' default when config.json names none
  if (theta_src.contains("rope_theta") && !theta_src["rope_theta"].is_null()) {
    TESSERA_ASSIGN_OR_RETURN(cfg.rope_theta, Num(theta_src, "rope_theta", where));
  }
  std::string kind = "default";
  for (const char* key : {"rope_type", "type"}) {
    if (scaling.contains(key)) {
      if (!scaling[key].is_string()) return Invalid(where, absl::StrCat("rope scaling '", key, "' must be a string"));
      kind = scaling[key].get<std::string>();
      break;
    }
  }
  if (kind == "default") return absl::OkStatus();
  if (kind != "llama3") {
    return absl::UnimplementedError(
        absl::StrCat(where, ": rope scaling type '", kind, "' is not supported (tessera has 'llama3' and none)"));
  }
  RopeScaling s;
  if (!scaling.contains("factor")) return Invalid(where, "llama3 rope scaling has no 'factor'");
  TESSERA_ASSIGN_OR_RETURN(s.factor, Num(scaling, "factor", where));
  if (scaling.contains("low_freq_factor")) {
    TESSERA_ASSIGN_OR_RETURN(s.low_freq_factor, Num(scaling, "low_freq_factor", where));
  }
  if (scaling.contains("high_freq_factor")) {
    TESSERA_ASSIGN_OR_RETURN(s.high_freq_factor, Num(scaling, "high_freq_factor", where));
  }
  if (scaling.contains("original_max_position_embeddings")) {
    TESSERA_ASSIGN_OR_RETURN(s.original_max_seq_len, Int(scaling, "original_max_position_embeddings", where));
  }
  if (s.factor <= 0 || s.high_freq_factor <= s.low_freq_factor || s.original_max_seq_len <= 0) {
    return Invalid(where, absl::StrFormat("llama3 rope scaling needs factor > 0, high_freq_factor > low_freq_factor "
                                          "and original_max_position_embeddings > 0; found %g, %g, %g, %d",
                                          s.factor, s.high_freq_factor, s.low_freq_factor, s.original_max_seq_len));
  }
  cfg.rope_scaling = s;
  return absl::OkStatus();
}

// LlamaConfig.__post_init__'s checks.
absl::Status Validate(const LlamaConfig& c, bool head_dim_given, const std::string& where) {
  const std::pair<const char*, int64_t> sizes[] = {
      {"vocab_size", c.vocab_size}, {"dim", c.dim},         {"n_layers", c.n_layers},      {"n_heads", c.n_heads},
      {"n_kv_heads", c.n_kv_heads}, {"ffn_dim", c.ffn_dim}, {"max_seq_len", c.max_seq_len}};
  for (const auto& [name, v] : sizes) {
    if (v <= 0) return Invalid(where, absl::StrCat(name, " must be > 0, got ", v));
  }
  if (!head_dim_given && c.dim % c.n_heads) {
    return Invalid(where,
                   absl::StrCat("dim ", c.dim, " must be divisible by n_heads ", c.n_heads, " (or give head_dim)"));
  }
  if (c.n_heads % c.n_kv_heads) {
    return Invalid(where, absl::StrCat("n_heads ", c.n_heads, " must be divisible by n_kv_heads ", c.n_kv_heads,
                                       " (grouped-query attention)"));
  }
  if (c.head_dim <= 0 || c.head_dim % 2) {
    return Invalid(where, absl::StrCat("head_dim ", c.head_dim, " must be even and > 0 (rotary embeddings)"));
  }
  return absl::OkStatus();
}

// ---- safetensors ---------------------------------------------------------------------------------------------------

// Closes the descriptor on every path out.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

absl::Status ReadAt(int fd, void* dst, uint64_t n, uint64_t offset, const std::string& path) {
  char* p = static_cast<char*>(dst);
  while (n > 0) {
    ssize_t got = ::pread(fd, p, std::min<uint64_t>(n, 1 << 30), static_cast<off_t>(offset));
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) return absl::InternalError(absl::StrCat(path, ": read failed: ", std::strerror(errno)));
    if (got == 0) return Invalid(path, absl::StrCat("file ended at byte ", offset, " while reading"));
    p += got;
    n -= got;
    offset += got;
  }
  return absl::OkStatus();
}

struct DTypeInfo {
  const char* name;
  at::ScalarType type;
};
constexpr DTypeInfo kDTypes[] = {
    {"F64", at::kDouble},
    {"F32", at::kFloat},
    {"F16", at::kHalf},
    {"BF16", at::kBFloat16},
    {"F8_E4M3", at::kFloat8_e4m3fn},
    {"F8_E5M2", at::kFloat8_e5m2},
    {"I64", at::kLong},
    {"I32", at::kInt},
    {"I16", at::kShort},
    {"I8", at::kChar},
    {"U8", at::kByte},
    {"BOOL", at::kBool},
};

struct Entry {
  std::string name;
  at::ScalarType type;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;
};

// One header entry, checked against the data size.
absl::StatusOr<Entry> ParseEntry(const std::string& name, const json& v, uint64_t data_bytes, const std::string& path) {
  const std::string where = absl::StrCat(path, ": tensor '", name, "'");
  if (!v.is_object()) return Invalid(where, absl::StrCat("header entry must be an object, found ", v.dump()));
  Entry e{name, at::kFloat, {}, 0, 0};
  auto dt = v.find("dtype");
  if (dt == v.end() || !dt->is_string()) return Invalid(where, "no 'dtype' string");
  const std::string dname = dt->get<std::string>();
  auto known =
      std::find_if(std::begin(kDTypes), std::end(kDTypes), [&](const DTypeInfo& d) { return dname == d.name; });
  if (known == std::end(kDTypes)) {
    std::vector<std::string> names;
    for (const auto& d : kDTypes) names.push_back(d.name);
    return Invalid(where,
                   absl::StrCat("unknown dtype '", dname, "' (expected one of ", absl::StrJoin(names, ", "), ")"));
  }
  e.type = known->type;
  auto shape = v.find("shape");
  if (shape == v.end() || !shape->is_array()) return Invalid(where, "no 'shape' array");
  uint64_t numel = 1;
  for (const json& d : *shape) {
    if (!d.is_number_unsigned())
      return Invalid(where, absl::StrCat("shape ", shape->dump(), " has a non-integer or negative size"));
    uint64_t n = d.get<uint64_t>();
    if (n != 0 && numel > std::numeric_limits<uint64_t>::max() / 16 / n)
      return Invalid(where, absl::StrCat("shape ", shape->dump(), " is too large"));
    numel *= n;
    e.shape.push_back(static_cast<int64_t>(n));
  }
  auto off = v.find("data_offsets");
  if (off == v.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned()) {
    return Invalid(where, "no 'data_offsets' [begin, end] of non-negative integers");
  }
  e.begin = (*off)[0].get<uint64_t>();
  e.end = (*off)[1].get<uint64_t>();
  if (e.begin > e.end || e.end > data_bytes) {
    return Invalid(where, absl::StrCat("data_offsets [", e.begin, ", ", e.end, "] are outside the data (", data_bytes,
                                       " bytes after the header)"));
  }
  const uint64_t want = numel * at::elementSize(e.type);
  if (e.end - e.begin != want) {
    return Invalid(where, absl::StrCat("data_offsets [", e.begin, ", ", e.end, "] hold ", e.end - e.begin,
                                       " bytes, but ", dname, " shape ", shape->dump(), " needs ", want));
  }
  return e;
}

std::string ShapeStr(const std::vector<int64_t>& s) { return absl::StrCat("[", absl::StrJoin(s, ", "), "]"); }

std::string Few(const std::vector<std::string>& keys) {
  std::vector<std::string> quoted;
  for (size_t i = 0; i < keys.size() && i < 5; ++i) quoted.push_back(absl::StrCat("'", keys[i], "'"));
  std::string out = absl::StrJoin(quoted, ", ");
  if (keys.size() > 5) absl::StrAppend(&out, " and ", keys.size() - 5, " more");
  return out;
}

absl::StatusOr<json> ParseJsonFile(const std::string& path) {
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(f.fd, &st) != 0 || !S_ISREG(st.st_mode)) return absl::NotFoundError(absl::StrCat(path, ": not a file"));
  std::string text(static_cast<size_t>(st.st_size), '\0');
  TESSERA_RETURN_IF_ERROR(ReadAt(f.fd, text.data(), text.size(), 0, path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) return Invalid(path, "not valid JSON (expected an object)");
  return j;
}

}  // namespace

// ---- public
// ----------------------------------------------------------------------------------------------------------

namespace {
// config_kwargs_from_hf in state_dict_adapter.py, for model_type "llama" only (Mistral's sliding window is not here).
absl::StatusOr<LlamaConfig> ConfigFromHf(const json& hf, const std::string& where) {
  const std::string model_type = hf.contains("model_type") ? hf["model_type"].dump() : "none";
  if (model_type != "\"llama\"") {
    return Invalid(where, absl::StrCat("model_type ", model_type,
                                       " is not supported by the C++ loader; expected "
                                       "\"llama\""));
  }
  if (hf.contains("hidden_act") && hf["hidden_act"] != "silu") {
    return absl::UnimplementedError(
        absl::StrCat(where, ": hidden_act ", hf["hidden_act"].dump(), " is not supported (expected 'silu')"));
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    if (hf.contains(key) && Truthy(hf[key])) {
      return absl::UnimplementedError(
          absl::StrCat(where, ": ", key, "=true is not supported (tessera's decoder has no biases)"));
    }
  }
  LlamaConfig c;
  TESSERA_RETURN_IF_ERROR(ReadRope(hf, where, c));
  TESSERA_ASSIGN_OR_RETURN(c.n_heads, NeedInt(hf, "num_attention_heads", where));
  TESSERA_ASSIGN_OR_RETURN(c.vocab_size, NeedInt(hf, "vocab_size", where));
  TESSERA_ASSIGN_OR_RETURN(c.dim, NeedInt(hf, "hidden_size", where));
  TESSERA_ASSIGN_OR_RETURN(c.n_layers, NeedInt(hf, "num_hidden_layers", where));
  TESSERA_ASSIGN_OR_RETURN(c.ffn_dim, NeedInt(hf, "intermediate_size", where));
  c.n_kv_heads = c.n_heads;
  if (hf.contains("num_key_value_heads") && Truthy(hf["num_key_value_heads"])) {
    TESSERA_ASSIGN_OR_RETURN(c.n_kv_heads, Int(hf, "num_key_value_heads", where));
  }
  const bool head_dim_given = hf.contains("head_dim") && Truthy(hf["head_dim"]);
  if (head_dim_given) {
    TESSERA_ASSIGN_OR_RETURN(c.head_dim, Int(hf, "head_dim", where));
  } else if (c.n_heads > 0) {
    c.head_dim = c.dim / c.n_heads;
  }
  if (hf.contains("rms_norm_eps")) {
    TESSERA_ASSIGN_OR_RETURN(c.norm_eps, Num(hf, "rms_norm_eps", where));
  }
  c.max_seq_len = 2048;
  if (hf.contains("max_position_embeddings")) {
    TESSERA_ASSIGN_OR_RETURN(c.max_seq_len, Int(hf, "max_position_embeddings", where));
  }
  c.tie_embeddings = hf.contains("tie_word_embeddings") && Truthy(hf["tie_word_embeddings"]);
  TESSERA_RETURN_IF_ERROR(Validate(c, head_dim_given, where));
  return c;
}
}  // namespace

absl::StatusOr<LlamaConfig> LlamaConfigFromJson(const std::string& text, const std::string& where) {
  json hf = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (hf.is_discarded() || !hf.is_object()) return Invalid(where, "not valid JSON (expected an object)");
  return ConfigFromHf(hf, where);
}

absl::StatusOr<LlamaConfig> ReadLlamaConfig(const std::string& hf_dir) {
  if (!IsDir(hf_dir)) {
    return absl::NotFoundError(absl::StrCat(hf_dir,
                                            ": not a directory (expected a Hugging Face model directory "
                                            "with config.json and safetensors weights)"));
  }
  const std::string path = Join(hf_dir, "config.json");
  if (!IsFile(path)) {
    return absl::NotFoundError(absl::StrCat(hf_dir, ": no config.json (expected a Hugging Face model directory)"));
  }
  TESSERA_ASSIGN_OR_RETURN(json hf, ParseJsonFile(path));
  return ConfigFromHf(hf, path);
}

absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ReadSafetensors(const std::string& path) {
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
  if (f.fd < 0) return absl::NotFoundError(absl::StrCat(path, ": cannot open: ", std::strerror(errno)));
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) return absl::InternalError(absl::StrCat(path, ": fstat failed: ", std::strerror(errno)));
  if (!S_ISREG(st.st_mode)) return Invalid(path, "not a regular file (expected a .safetensors file)");
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    return Invalid(path, absl::StrCat("truncated: ", size,
                                      " bytes, but a safetensors file starts with an 8-byte "
                                      "header length"));
  }
  unsigned char len_bytes[8];
  TESSERA_RETURN_IF_ERROR(ReadAt(f.fd, len_bytes, 8, 0, path));
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | len_bytes[i];  // little-endian on any host
  if (header_len > kMaxHeaderBytes || header_len > size - 8) {
    return Invalid(path, absl::StrCat("header length ", header_len, " does not fit: the file has ", size - 8,
                                      " bytes after the length (and headers are at most ", kMaxHeaderBytes, ")"));
  }
  std::string text(header_len, '\0');
  TESSERA_RETURN_IF_ERROR(ReadAt(f.fd, text.data(), header_len, 8, path));
  json header = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) {
    return Invalid(path, absl::StrCat("the ", header_len, "-byte header is not a JSON object"));
  }
  const uint64_t data_start = 8 + header_len, data_bytes = size - data_start;
  std::vector<Entry> entries;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    TESSERA_ASSIGN_OR_RETURN(Entry e, ParseEntry(it.key(), it.value(), data_bytes, path));
    entries.push_back(std::move(e));
  }
  // File order; two tensors sharing bytes would make one silently alias the other's values.
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < entries.size(); ++i) {
    if (entries[i].begin < entries[i - 1].end) {
      return Invalid(path, absl::StrCat("tensors '", entries[i - 1].name, "' and '", entries[i].name,
                                        "' overlap in the data (data_offsets)"));
    }
  }
  std::vector<std::pair<std::string, at::Tensor>> out;
  out.reserve(entries.size());
  for (const Entry& e : entries) {
    at::Tensor t = at::empty(e.shape, at::TensorOptions().dtype(e.type));
    TESSERA_RETURN_IF_ERROR_CTX(ReadAt(f.fd, t.data_ptr(), e.end - e.begin, data_start + e.begin, path), "tensor '",
                                e.name, "'");
    out.emplace_back(e.name, std::move(t));
  }
  return out;
}

namespace {
// tessera name suffix -> HF name suffix, per layer; and the global names (state_dict_adapter.py).
const std::pair<const char*, const char*> kLayerNames[] = {
    {"attention.wq.weight", "self_attn.q_proj.weight"},    {"attention.wk.weight", "self_attn.k_proj.weight"},
    {"attention.wv.weight", "self_attn.v_proj.weight"},    {"attention.wo.weight", "self_attn.o_proj.weight"},
    {"feed_forward.w1.weight", "mlp.gate_proj.weight"},    {"feed_forward.w3.weight", "mlp.up_proj.weight"},
    {"feed_forward.w2.weight", "mlp.down_proj.weight"},    {"attention_norm.weight", "input_layernorm.weight"},
    {"ffn_norm.weight", "post_attention_layernorm.weight"}};
const std::pair<const char*, const char*> kGlobalNames[] = {{"tok_embeddings.weight", "model.embed_tokens.weight"},
                                                            {"norm.weight", "model.norm.weight"},
                                                            {"output.weight", "lm_head.weight"}};

// "<prefix><digits>.<rest>" -> (digits, rest); nullopt otherwise.
std::optional<std::pair<std::string, std::string>> SplitLayer(const std::string& name, const std::string& prefix) {
  if (name.compare(0, prefix.size(), prefix) != 0) return std::nullopt;
  size_t i = prefix.size(), j = i;
  while (j < name.size() && name[j] >= '0' && name[j] <= '9') ++j;
  if (j == i || j >= name.size() || name[j] != '.') return std::nullopt;
  return std::make_pair(name.substr(i, j - i), name.substr(j + 1));
}
}  // namespace

absl::StatusOr<std::string> ToHf(const std::string& name) {
  for (const auto& [ours, theirs] : kGlobalNames) {
    if (name == ours) return std::string(theirs);
  }
  if (auto parts = SplitLayer(name, "layers.")) {
    for (const auto& [ours, theirs] : kLayerNames) {
      if (parts->second == ours) return absl::StrCat("model.layers.", parts->first, ".", theirs);
    }
  }
  return absl::InvalidArgumentError(absl::StrCat("parameter '", name, "' is not part of tessera's Llama layout"));
}

std::optional<std::string> FromHf(const std::string& hf_name) {
  for (const auto& [ours, theirs] : kGlobalNames) {
    if (hf_name == theirs) return std::string(ours);
  }
  if (auto parts = SplitLayer(hf_name, "model.layers.")) {
    for (const auto& [ours, theirs] : kLayerNames) {
      if (parts->second == theirs) return absl::StrCat("layers.", parts->first, ".", ours);
    }
  }
  return std::nullopt;
}

std::vector<std::pair<std::string, std::vector<int64_t>>> LlamaParamShapes(const LlamaConfig& c) {
  const int64_t q = c.n_heads * c.head_dim, kv = c.n_kv_heads * c.head_dim;
  std::vector<std::pair<std::string, std::vector<int64_t>>> out = {{"tok_embeddings.weight", {c.vocab_size, c.dim}}};
  for (int64_t i = 0; i < c.n_layers; ++i) {
    const std::string p = absl::StrCat("layers.", i, ".");
    out.push_back({p + "attention_norm.weight", {c.dim}});
    out.push_back({p + "attention.wq.weight", {q, c.dim}});
    out.push_back({p + "attention.wk.weight", {kv, c.dim}});
    out.push_back({p + "attention.wv.weight", {kv, c.dim}});
    out.push_back({p + "attention.wo.weight", {c.dim, q}});
    out.push_back({p + "ffn_norm.weight", {c.dim}});
    out.push_back({p + "feed_forward.w1.weight", {c.ffn_dim, c.dim}});
    out.push_back({p + "feed_forward.w3.weight", {c.ffn_dim, c.dim}});
    out.push_back({p + "feed_forward.w2.weight", {c.dim, c.ffn_dim}});
  }
  out.push_back({"norm.weight", {c.dim}});
  if (!c.tie_embeddings) out.push_back({"output.weight", {c.vocab_size, c.dim}});
  return out;
}

absl::StatusOr<std::map<std::string, at::Tensor>> LoadLlamaWeights(const std::string& hf_dir, const LlamaConfig& cfg) {
  if (!IsDir(hf_dir)) return absl::NotFoundError(absl::StrCat(hf_dir, ": not a directory"));
  std::vector<std::string> files;
  if (IsFile(Join(hf_dir, kIndex))) {
    const std::string index = Join(hf_dir, kIndex);
    TESSERA_ASSIGN_OR_RETURN(json j, ParseJsonFile(index));
    auto map = j.find("weight_map");
    if (map == j.end() || !map->is_object()) return Invalid(index, "not a safetensors index (no 'weight_map' object)");
    std::set<std::string> names;
    for (const auto& [key, file] : map->items()) {
      if (!file.is_string()) return Invalid(index, absl::StrCat("weight_map['", key, "'] is not a file name"));
      names.insert(file.get<std::string>());
    }
    for (const std::string& n : names) {
      if (!IsFile(Join(hf_dir, n))) return Invalid(index, absl::StrCat("names ", n, ", which is missing"));
    }
    files.assign(names.begin(), names.end());
  } else if (IsFile(Join(hf_dir, kSingle))) {
    files = {kSingle};
  } else {
    const std::vector<std::string> present = ListDir(hf_dir);
    return Invalid(hf_dir, absl::StrCat("no ", kSingle, " or ", kIndex, " (tessera reads safetensors weights; found: ",
                                        absl::StrJoin(present, ", "), ")"));
  }

  std::map<std::string, std::pair<at::Tensor, std::string>> by_hf;  // HF key -> (tensor, its file)
  for (const std::string& name : files) {
    TESSERA_ASSIGN_OR_RETURN(auto tensors, ReadSafetensors(Join(hf_dir, name)));
    for (auto& [key, t] : tensors) {
      auto [it, fresh] = by_hf.emplace(key, std::make_pair(std::move(t), name));
      if (!fresh)
        return Invalid(hf_dir, absl::StrCat("tensor '", key, "' is in both ", it->second.second, " and ", name));
    }
  }

  const auto expected = LlamaParamShapes(cfg);
  std::map<std::string, std::vector<int64_t>> shape_of(expected.begin(), expected.end());
  std::map<std::string, at::Tensor> out;
  std::vector<std::string> unexpected, missing, problems;
  for (auto& [key, entry] : by_hf) {
    std::optional<std::string> name = FromHf(key);
    if (name && *name == "output.weight" && cfg.tie_embeddings) continue;  // a copy of the tied embedding
    if (!name || !shape_of.count(*name)) {
      unexpected.push_back(key);
      continue;
    }
    const std::vector<int64_t> want = shape_of[*name];
    if (entry.first.sizes().vec() != want) {
      problems.push_back(absl::StrCat("'", key, "' (", entry.second, ") has shape ",
                                      ShapeStr(entry.first.sizes().vec()), ", but config.json implies ",
                                      ShapeStr(want)));
    }
    out.emplace(*name, entry.first);
  }
  for (const auto& [name, shape] : expected) {
    if (!out.count(name)) missing.push_back(*ToHf(name));
  }
  if (!unexpected.empty()) problems.insert(problems.begin(), absl::StrCat("unexpected tensors ", Few(unexpected)));
  if (!missing.empty()) problems.insert(problems.begin(), absl::StrCat("missing tensors ", Few(missing)));
  if (!problems.empty()) {
    problems.resize(std::min<size_t>(problems.size(), 6));
    return Invalid(hf_dir,
                   absl::StrCat("the weights do not match config.json (llama): ", absl::StrJoin(problems, "; ")));
  }
  return out;
}

}  // namespace tessera::hf
