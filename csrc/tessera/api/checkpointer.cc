// The C++ Checkpointer over the checkpoint engine. The mapping mirrors python/tessera/checkpoint/checkpointer.py
// (save(), _read_all(), _try_load()); keep the two in step: they write and read the same checkpoints.
#include "tessera/api/checkpointer.h"

#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <cstdio>
#include <mutex>
#include <set>
#include <tuple>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "tessera/checkpoint/reader.h"
#include "tessera/checkpoint/storage.h"
#include "tessera/checkpoint/writer.h"
#include "tessera/core/status.h"
#include "tessera/torch/tensor_view.h"

namespace tessera::checkpoint {

struct Checkpointer::Pending {
  int64_t step = 0;
  std::shared_ptr<SaveHandle> handle;
  std::vector<at::Tensor> sources;  // what the pieces view, until staging ended
  bool waited = false;              // its outcome was returned to the caller (Wait, or a failed Save)
};

namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

// The errors Python's checkpointer lists are cut at 20 entries (checkpointer.py, _read_all).
constexpr size_t kMaxListed = 20;

int64_t NumelOf(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// Python's repr of a shape tuple: (), (5,), (2, 3).
std::string ShapeRepr(const std::vector<int64_t>& shape) {
  if (shape.size() == 1) return absl::StrCat("(", shape[0], ",)");
  return absl::StrCat("(", absl::StrJoin(shape, ", "), ")");
}

std::string ListRepr(const std::vector<std::string>& items) {
  std::vector<std::string> shown;
  for (size_t i = 0; i < items.size() && i < kMaxListed; ++i) shown.push_back(absl::StrCat("'", items[i], "'"));
  std::string more = items.size() > kMaxListed ? absl::StrCat(", ... ", items.size() - kMaxListed, " more") : "";
  return absl::StrCat("[", absl::StrJoin(shown, ", "), more, "]");
}

std::string DTypeNameOf(at::ScalarType t) {
  absl::StatusOr<DType> d = torch_rt::ToDType(t);
  return d.ok() ? DTypeName(*d) : std::string(c10::toString(t));
}

// A status through the store: "<code>:<message>"; "" is OK.
std::string EncodeStatus(const absl::Status& s) {
  return s.ok() ? std::string() : absl::StrCat(static_cast<int>(s.code()), ":", s.message());
}

absl::Status DecodeStatus(const std::string& v) {
  if (v.empty()) return absl::OkStatus();
  const size_t colon = v.find(':');
  int code = static_cast<int>(absl::StatusCode::kUnknown);
  if (colon == std::string::npos || !absl::SimpleAtoi(v.substr(0, colon), &code) || code <= 0 || code > 16) {
    return absl::UnknownError(v);
  }
  return absl::Status(static_cast<absl::StatusCode>(code), v.substr(colon + 1));
}

// The n-th Checkpointer this rank makes over one store and root (see [Note: agreement through the store]).
int64_t NextInstance(const void* store, int rank, const std::string& root) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, std::string>, int64_t>* counts =
      new std::map<std::tuple<const void*, int, std::string>, int64_t>();
  std::lock_guard<std::mutex> lock(mu);
  return (*counts)[{store, rank, root}]++;
}

// The engine copies on side streams of its own: what is queued on the current streams (the last optimizer step)
// must be done first, as the Python path does with torch.cuda.current_stream().synchronize().
void SyncCurrentStreams(const std::vector<at::Tensor>& tensors) {
  std::set<c10::DeviceIndex> done;
  for (const at::Tensor& t : tensors) {
    if (!t.is_cuda() || !done.insert(t.device().index()).second) continue;
    c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
    impl.getStream(t.device()).synchronize();
  }
}

// A version-counter check per piece: a source written in place while it was copied fails the save naming it
// (see [Note: staged pieces must not change] in csrc/tessera/python/bind_checkpoint.cpp).
struct VersionCheck {
  std::string name;
  c10::VariableVersion counter;
  uint32_t at_save;
};

}  // namespace

Checkpointer::Checkpointer(std::string root, int rank, int world, std::shared_ptr<comm::KeyValueStore> store,
                           CheckpointerOptions options, std::string prefix)
    : root_(std::move(root)), rank_(rank), world_(world), store_(std::move(store)), options_(std::move(options)),
      prefix_(std::move(prefix)) {}

absl::StatusOr<std::unique_ptr<Checkpointer>> Checkpointer::Create(std::string root, int rank, int world,
                                                                   std::shared_ptr<comm::KeyValueStore> store,
                                                                   CheckpointerOptions options) {
  if (root.empty()) return absl::InvalidArgumentError("Checkpointer: root is empty");
  if (world < 1 || rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(absl::StrFormat("Checkpointer: rank %d of world %d is not valid", rank, world));
  }
  if (world > 1 && store == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Checkpointer: %d ranks need a KeyValueStore to agree through (World::store())", world));
  }
  if (options.keep_last < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Checkpointer: keep_last must be >= 0 (0 keeps all), got %d", options.keep_last));
  }
  if (options.threads < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("Checkpointer: threads must be >= 1, got %d", options.threads));
  }
  std::string prefix = options.store_prefix;
  if (prefix.empty()) {
    prefix = absl::StrCat("tessera/checkpointer/", root, "/", NextInstance(store.get(), rank, root));
  }
  std::unique_ptr<Checkpointer> c(
      new Checkpointer(std::move(root), rank, world, std::move(store), std::move(options), std::move(prefix)));
  TESSERA_RETURN_IF_ERROR(c->Init());
  return c;
}

absl::Status Checkpointer::Init() {
  TESSERA_ASSIGN_OR_RETURN(storage_, NewLocalStorage(root_));
  WriterOptions wo;
  wo.threads = options_.threads;
  wo.commit_timeout = options_.commit_timeout;
  wo.keep_last = options_.keep_last;
  const std::string key = NextOpKey() + "/ready";
  if (rank_ == 0) {
    // Leftovers of crashed saves go before the barrier: after it, another rank may already be writing into the
    // next step's tmp directory (as in the Python path).
    absl::Status s = [&]() -> absl::Status {
      TESSERA_RETURN_IF_ERROR_CTX(storage_->MakeDirs(""), "cannot create checkpoint directory ", root_);
      TESSERA_ASSIGN_OR_RETURN(writer_, CheckpointWriter::Create(storage_, wo));
      return writer_->CleanStale();
    }();
    if (world_ > 1) {
      TESSERA_RETURN_IF_ERROR_CTX(store_->Set(key, s.ok() ? "ok" : EncodeStatus(s)),
                                  "checkpoint start-up: cannot reach the store");
    }
    return s;
  }
  TESSERA_RETURN_IF_ERROR_CTX(store_->Wait({key}, options_.agree_timeout),
                              absl::StrFormat("checkpoint start-up: rank %d waited for rank 0 to prepare %s", rank_,
                                              root_));
  TESSERA_ASSIGN_OR_RETURN(auto got, store_->TryGet({key}));
  const std::string v = got[0].value_or("");
  if (v != "ok") {
    return WithContext(DecodeStatus(v), absl::StrCat("checkpoint start-up: rank 0 could not prepare ", root_));
  }
  TESSERA_ASSIGN_OR_RETURN(writer_, CheckpointWriter::Create(storage_, wo));
  return absl::OkStatus();
}

Checkpointer::~Checkpointer() {
  if (pending_ == nullptr) return;
  const bool report = !pending_->waited;
  absl::Status s = Wait();
  if (report && !s.ok()) std::fprintf(stderr, "tessera checkpoint: %s\n", std::string(s.message()).c_str());
}

std::string Checkpointer::NextOpKey() { return absl::StrCat(prefix_, "/", ops_++); }

// ---- saving ------------------------------------------------------------------------------------------------

absl::Status Checkpointer::Wait() {
  if (pending_ == nullptr) return absl::OkStatus();
  absl::Status s = pending_->handle->Wait();
  pending_->sources.clear();  // Wait() returns after staging ended too, successful or not
  pending_->waited = true;
  if (!s.ok()) {
    return WithContext(s, absl::StrFormat("checkpoint step %d in %s was not saved", pending_->step, root_));
  }
  return absl::OkStatus();
}

absl::Status Checkpointer::Save(int64_t step, const CheckpointContents& c) {
  if (step < 0) return absl::InvalidArgumentError(absl::StrFormat("Checkpointer::Save: step %d is negative", step));
  const int64_t attempt = saves_++;  // counted before anything can fail: the same on every rank
  if (pending_ != nullptr) {
    if (!pending_->waited) {
      // Also a finished one nobody waited for: its failure is returned here, not dropped unseen.
      absl::Status s = Wait();
      pending_.reset();
      TESSERA_RETURN_IF_ERROR(s);
    } else {
      (void)Wait();  // its outcome was already returned; only let it finish
      pending_.reset();
    }
  }

  SaveRequest req;
  req.step = step;
  req.rank = rank_;
  req.world_size = world_;
  req.attempt = attempt;
  auto pending = std::make_unique<Pending>();
  pending->step = step;
  std::vector<VersionCheck> versions;
  auto add = [&](const CheckpointTensor& t) -> absl::Status {
    const bool empty = NumelOf(t.shape) == 0;
    if (t.save_count == 0 && !empty) return absl::OkStatus();
    if (!t.local.defined()) {
      return absl::InvalidArgumentError(absl::StrCat("checkpoint tensor '", t.name, "' is undefined"));
    }
    at::Tensor flat = t.local.detach().reshape(-1);
    if (t.save_offset < 0 || t.save_count < 0 || t.save_offset + t.save_count > flat.numel()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "checkpoint tensor '%s': save range [%d, %d) is outside its %d local elements", t.name, t.save_offset,
          t.save_offset + t.save_count, flat.numel()));
    }
    at::Tensor piece = flat.narrow(0, t.save_offset, t.save_count).contiguous();
    SavePiece p;
    p.name = t.name;
    p.shape = t.shape;
    p.start = t.save_start;
    TESSERA_ASSIGN_OR_RETURN(p.data, torch_rt::ViewOf(piece, absl::StrCat("checkpoint tensor '", t.name, "'")));
    const c10::VariableVersion& counter = t.local.unsafeGetTensorImpl()->version_counter();
    versions.push_back({t.name, counter, counter.enabled() ? counter.current_version() : 0u});
    req.pieces.push_back(std::move(p));
    pending->sources.push_back(std::move(piece));
    return absl::OkStatus();
  };
  // Unit by unit as the tensors come (parameters, then the optimizer state), so the save stages in model order.
  for (const CheckpointTensor& t : c.model) TESSERA_RETURN_IF_ERROR(add(t));
  if (c.optim_json) {
    for (const CheckpointTensor& t : c.optim) TESSERA_RETURN_IF_ERROR(add(t));
  }

  // The global extras, as the Python path writes them (jsonio.dumps of {key: value}): {"optim": <AdamW state
  // object>, "train": {name: int}}. Rank JSON: "{}" (no per-rank state).
  ojson global = ojson::object();
  if (c.optim_json) {
    ojson o = ojson::parse(c.optim_json(), nullptr, /*allow_exceptions=*/false);
    if (o.is_discarded() || !o.is_object()) {
      return absl::InvalidArgumentError("Checkpointer::Save: the optimizer's state JSON is not a JSON object");
    }
    global["optim"] = std::move(o);
  }
  if (c.train != nullptr) {
    ojson train = ojson::object();
    for (const auto& [k, v] : *c.train) train[k] = v;
    global["train"] = std::move(train);
  }
  req.global_json = global.dump();
  req.rank_json = "{}";
  req.after_staged = [versions = std::move(versions)](int64_t i) -> absl::Status {
    const VersionCheck& v = versions[static_cast<size_t>(i)];
    if (!v.counter.enabled() || v.counter.current_version() == v.at_save) return absl::OkStatus();
    return absl::AbortedError(absl::StrFormat(
        "%s changed in place while it was being staged (version %d -> %d); the checkpoint would mix two moments",
        v.name, v.at_save, v.counter.current_version()));
  };

  SyncCurrentStreams(pending->sources);
  TESSERA_ASSIGN_OR_RETURN(pending->handle, writer_->Save(std::move(req)));
  pending_ = std::move(pending);
  absl::Status staged = pending_->handle->WaitAllStaged();
  if (!staged.ok()) {
    pending_->waited = true;  // reported here; the sources stay alive until the engine is done with them
    return WithContext(staged, absl::StrFormat("checkpoint step %d in %s was not saved", step, root_));
  }
  pending_->sources.clear();
  return absl::OkStatus();
}

// ---- agreement ---------------------------------------------------------------------------------------------

absl::StatusOr<std::vector<std::pair<int, absl::Status>>> Checkpointer::ShareErrors(const absl::Status& mine) {
  std::vector<std::pair<int, absl::Status>> failed;
  if (world_ == 1) {
    if (!mine.ok()) failed.emplace_back(0, mine);
    return failed;
  }
  const std::string base = NextOpKey() + "/error/";
  // The message is cut, as the Python path cuts what it all-gathers; mismatch lists are already capped.
  std::string value = EncodeStatus(mine);
  if (value.size() > 8192) value.resize(8192);
  TESSERA_RETURN_IF_ERROR_CTX(store_->Set(base + std::to_string(rank_), value),
                              "checkpoint: cannot reach the store to share a load's outcome");
  std::vector<std::string> keys;
  for (int r = 0; r < world_; ++r) keys.push_back(base + std::to_string(r));
  absl::Status waited = store_->Wait(keys, options_.agree_timeout);
  TESSERA_ASSIGN_OR_RETURN(auto got, store_->TryGet(keys));
  if (!waited.ok()) {
    std::vector<int> missing;
    for (int r = 0; r < world_; ++r) {
      if (!got[r].has_value()) missing.push_back(r);
    }
    return WithContext(waited, absl::StrFormat("checkpoint: rank %d waited %s for ranks [%s] to finish reading",
                                               rank_, absl::FormatDuration(options_.agree_timeout),
                                               absl::StrJoin(missing, ", ")));
  }
  for (int r = 0; r < world_; ++r) {
    absl::Status s = DecodeStatus(got[r].value_or(""));
    if (!s.ok()) failed.emplace_back(r, std::move(s));
  }
  return failed;
}

absl::StatusOr<std::vector<int64_t>> Checkpointer::AgreeSteps() {
  if (world_ == 1) return ListCommittedSteps(*storage_);
  const std::string key = NextOpKey() + "/steps";
  if (rank_ == 0) {
    absl::StatusOr<std::vector<int64_t>> steps = ListCommittedSteps(*storage_);
    TESSERA_RETURN_IF_ERROR(store_->Set(key, steps.ok() ? absl::StrCat("ok:", absl::StrJoin(*steps, ","))
                                                        : EncodeStatus(steps.status())));
    return steps;
  }
  TESSERA_RETURN_IF_ERROR_CTX(store_->Wait({key}, options_.agree_timeout),
                              absl::StrFormat("checkpoint: rank %d waited for rank 0's list of steps", rank_));
  TESSERA_ASSIGN_OR_RETURN(auto got, store_->TryGet({key}));
  const std::string v = got[0].value_or("");
  if (v.rfind("ok:", 0) != 0) return WithContext(DecodeStatus(v), "checkpoint: rank 0 could not list the steps");
  std::vector<int64_t> steps;
  for (absl::string_view part : absl::StrSplit(v.substr(3), ',', absl::SkipEmpty())) {
    int64_t s = 0;
    if (!absl::SimpleAtoi(part, &s)) return absl::InternalError(absl::StrCat("checkpoint: bad step list '", v, "'"));
    steps.push_back(s);
  }
  return steps;
}

// ---- loading -----------------------------------------------------------------------------------------------

namespace {

struct Staged {
  const CheckpointTensor* dst;
  at::Tensor values;  // CPU, dst->local.numel() elements; undefined: not in the checkpoint (zero it)
};

// [Note: jsonio tags] Python writes its extras through python/tessera/checkpoint/jsonio.py, which tags what JSON
// has no type for: tuples as {"__tuple__": [...]} (AdamW's betas), int dict keys as "__int__<n>". Python decodes
// them before restoring a state; so does this side, into plain arrays and keys, before the optimizer sees its
// JSON. (Tensor records, "__tensor__" / "__ndarray__", stay as they are: AdamW's state has none.)
json DecodeJsonioTags(const json& j) {
  if (j.is_array()) {
    json out = json::array();
    for (const json& v : j) out.push_back(DecodeJsonioTags(v));
    return out;
  }
  if (!j.is_object()) return j;
  if (j.size() == 1 && j.contains("__tuple__") && j["__tuple__"].is_array()) return DecodeJsonioTags(j["__tuple__"]);
  json out = json::object();
  for (const auto& [k, v] : j.items()) {
    out[k.rfind("__int__", 0) == 0 ? k.substr(7) : k] = DecodeJsonioTags(v);
  }
  return out;
}

// Reads everything this rank needs into fresh CPU tensors (python: _read_all); `state` is not modified, except
// the optimizer's JSON part, which `load_optim_json` applies here (the caller restores it on failure).
absl::Status ReadAll(CheckpointReader& reader, const CheckpointContents& c,
                     std::vector<Staged>* staged, std::map<std::string, int64_t>* train) {
  const Manifest& m = reader.manifest();
  json global = json::parse(m.global_json, nullptr, /*allow_exceptions=*/false);
  if (global.is_discarded() || !global.is_object()) {
    return absl::DataLossError("checkpoint global extras: not a JSON object");
  }
  std::vector<std::string> keys;
  for (const auto& [k, v] : global.items()) keys.push_back(k);
  auto no_entry = [&](const char* key) {
    return absl::InvalidArgumentError(
        absl::StrFormat("checkpoint has no entry '%s' (it has %s)", key, ListRepr(keys)));
  };
  const json* optim_json = nullptr;
  if (c.load_optim_json) {
    auto it = global.find("optim");
    if (it == global.end() || !it->is_object()) return no_entry("optim");
    optim_json = &*it;
  }
  if (c.train != nullptr) {
    auto it = global.find("train");
    if (it == global.end() || !it->is_object()) return no_entry("train");
    for (const auto& [k, v] : it->items()) {
      if (!v.is_number_integer()) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "checkpoint entry 'train': '%s' is %s, not an integer (the C++ trainer keeps integers only)", k,
            v.dump()));
      }
      (*train)[k] = v.is_number_unsigned() ? static_cast<int64_t>(v.get<uint64_t>()) : v.get<int64_t>();
    }
  }

  std::map<std::string, const TensorEntry*> saved;
  for (const TensorEntry& t : m.tensors) saved[t.name] = &t;
  std::vector<std::string> missing, mismatched, unexpected;
  std::set<std::string> expected_model;
  auto check = [&](const CheckpointTensor& t, bool optional) -> bool {
    auto it = saved.find(t.name);
    if (it == saved.end()) {
      if (!optional) missing.push_back(t.name);
      return false;
    }
    const std::string model_dtype = DTypeNameOf(t.local.scalar_type());
    if (it->second->shape != t.shape || DTypeName(it->second->dtype) != model_dtype) {
      mismatched.push_back(absl::StrFormat("%s: checkpoint %s %s, model %s %s", t.name,
                                           ShapeRepr(it->second->shape), DTypeName(it->second->dtype),
                                           ShapeRepr(t.shape), model_dtype));
    }
    return true;
  };
  for (const CheckpointTensor& t : c.model) {
    expected_model.insert(t.name);
    if (check(t, false)) staged->push_back({&t, at::Tensor()});
  }
  if (c.load_optim_json) {
    for (const CheckpointTensor& t : c.optim) {
      // Optimizer state the checkpoint lacks is fine (a parameter that never took a step): it is zeroed.
      check(t, true);
      staged->push_back({&t, at::Tensor()});
    }
  }
  for (const TensorEntry& t : m.tensors) {
    if (t.name.rfind("model/", 0) == 0 && !expected_model.count(t.name)) unexpected.push_back(t.name);
  }
  std::sort(missing.begin(), missing.end());
  std::sort(mismatched.begin(), mismatched.end());
  if (!missing.empty() || !mismatched.empty() || !unexpected.empty()) {
    std::vector<std::string> parts;
    if (!missing.empty()) parts.push_back("missing from checkpoint: " + ListRepr(missing));
    if (!mismatched.empty()) parts.push_back("different shape or dtype: " + ListRepr(mismatched));
    if (!unexpected.empty()) parts.push_back("not in the model: " + ListRepr(unexpected));
    return absl::InvalidArgumentError(
        absl::StrCat("checkpoint does not match the state being loaded: ", absl::StrJoin(parts, "; ")));
  }

  for (Staged& s : *staged) {
    const CheckpointTensor& t = *s.dst;
    auto it = saved.find(t.name);
    if (it == saved.end()) continue;  // optimizer state to zero
    const int64_t n = t.local.numel();
    if (t.load_start < 0 || t.load_start + n > NumelOf(t.shape)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "checkpoint tensor '%s': load range [%d, %d) is outside its %d elements", t.name, t.load_start,
          t.load_start + n, NumelOf(t.shape)));
    }
    s.values = at::empty({n}, t.local.options().device(at::kCPU));
    if (n == 0) continue;
    TESSERA_ASSIGN_OR_RETURN(BufferView v, torch_rt::ViewOf(s.values, "read buffer for '" + t.name + "'"));
    TESSERA_RETURN_IF_ERROR(reader.Read(t.name, t.load_start, v));
  }
  if (optim_json != nullptr) {
    TESSERA_RETURN_IF_ERROR_CTX(c.load_optim_json(DecodeJsonioTags(*optim_json).dump()), "checkpoint entry 'optim'");
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Checkpointer::TryLoad(int64_t step, const CheckpointContents& c, bool* agreement_failed) {
  *agreement_failed = false;
  std::vector<Staged> staged;
  std::map<std::string, int64_t> train;
  std::optional<std::string> old_optim;  // to undo the optimizer's JSON part if the load fails after all
  if (c.load_optim_json && c.optim_json) old_optim = c.optim_json();
  absl::Status mine = [&]() -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<CheckpointReader> reader, CheckpointReader::Open(storage_, step));
    return ReadAll(*reader, c, &staged, &train);
  }();
  // Every rank learns every rank's failure, so each returns an error naming the damaged file and tensor even
  // when its own reads succeeded.
  absl::StatusOr<std::vector<std::pair<int, absl::Status>>> failed = ShareErrors(mine);
  absl::Status outcome;
  if (!failed.ok()) {
    *agreement_failed = true;
    outcome = failed.status();
  } else if (!failed->empty()) {
    const absl::StatusCode code = failed->front().second.code();
    if (world_ == 1) {
      outcome = absl::Status(code, absl::StrFormat("checkpoint step %d in %s: %s", step, root_,
                                                   failed->front().second.message()));
    } else {
      std::vector<std::string> parts;
      for (const auto& [r, s] : *failed) parts.push_back(absl::StrFormat("rank %d: %s", r, s.message()));
      outcome = absl::Status(code, absl::StrFormat("checkpoint step %d in %s could not be loaded: %s", step, root_,
                                                   absl::StrJoin(parts, "; ")));
    }
  }
  if (!outcome.ok()) {
    if (old_optim.has_value()) {
      absl::Status undo = c.load_optim_json(*old_optim);
      TESSERA_CHECK(undo.ok(), "restoring the optimizer's own state JSON failed: ", undo.ToString());
    }
    return outcome;
  }
  at::NoGradGuard no_grad;
  for (const Staged& s : staged) {
    at::Tensor dst = s.dst->local;
    if (s.values.defined()) {
      dst.copy_(s.values.reshape(dst.sizes()));
    } else {
      dst.zero_();
    }
  }
  if (c.train != nullptr) *c.train = std::move(train);
  return absl::OkStatus();
}

absl::Status Checkpointer::Load(int64_t step, const CheckpointContents& c) {
  bool agreement_failed = false;
  return TryLoad(step, c, &agreement_failed);
}

absl::StatusOr<std::optional<int64_t>> Checkpointer::LoadLatest(const CheckpointContents& c) {
  TESSERA_ASSIGN_OR_RETURN(std::vector<int64_t> steps, AgreeSteps());
  if (rank_ == 0 && !steps.empty()) {
    absl::StatusOr<std::optional<int64_t>> latest = ReadLatest(*storage_);
    if (latest.ok() && latest->has_value() && **latest != steps[0]) {
      std::fprintf(stderr,
                   "tessera checkpoint: %s/latest names step %lld but the newest committed step is %lld; using the "
                   "committed steps\n",
                   root_.c_str(), static_cast<long long>(**latest), static_cast<long long>(steps[0]));
    }
  }
  std::vector<std::string> failures;
  absl::StatusCode code = absl::StatusCode::kOk;
  for (int64_t step : steps) {
    bool agreement_failed = false;
    absl::Status s = TryLoad(step, c, &agreement_failed);
    if (s.ok()) return std::optional<int64_t>(step);
    if (agreement_failed) return s;  // the ranks no longer know what the others did: stop here
    std::fprintf(stderr, "tessera checkpoint: skipping step %lld: %s\n", static_cast<long long>(step),
                 std::string(s.message()).c_str());
    if (code == absl::StatusCode::kOk) code = s.code();
    failures.push_back(absl::StrFormat("step %d: %s", step, s.message()));
  }
  if (failures.empty()) return std::optional<int64_t>();
  return absl::Status(code, absl::StrFormat("none of the %d committed checkpoints in %s could be loaded: %s",
                                            steps.size(), root_, absl::StrJoin(failures, " | ")));
}

absl::StatusOr<std::vector<int64_t>> Checkpointer::CommittedSteps() const { return ListCommittedSteps(*storage_); }

}  // namespace tessera::checkpoint
