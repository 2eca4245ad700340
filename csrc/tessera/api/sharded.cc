#include "tessera/api/sharded.h"

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/graph_task.h>

#include "absl/strings/str_format.h"
#include "tessera/core/status.h"

#if defined(TESSERA_WITH_CUDA)
#include <c10/cuda/CUDAStream.h>
#endif

namespace tessera {
namespace {

bool InBackward() { return torch::autograd::get_current_graph_task_id() != -1; }

}  // namespace

ShardedModel::ShardedModel(std::shared_ptr<comm::Communicator> comm, ShardOptions options)
    : comm_(std::move(comm)), options_(std::move(options)) {}

ShardedModel::~ShardedModel() = default;

uintptr_t ShardedModel::stream() const {
#if defined(TESSERA_WITH_CUDA)
  if (device_.has_value() && device_->is_cuda()) {
    return reinterpret_cast<uintptr_t>(c10::cuda::getCurrentCUDAStream(device_->index()).stream());
  }
#endif
  return 0;
}

absl::StatusOr<int> ShardedModel::AddUnit(torch::nn::Module& module, const std::string& prefix) {
  if (schedule_) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "ShardedModel: cannot shard '%s' after ShardRoot; shard every block first, then the root",
        prefix.empty() ? module.name() : prefix));
  }
  if (!comm_) return absl::InvalidArgumentError("ShardedModel: no communicator");
  // The module's parameters no unit holds yet, each once (a tied parameter under its first name), trainable first,
  // then frozen, each group in registration order: the Python path's _collect_params.
  std::vector<at::Tensor> trainable, frozen;
  std::vector<std::string> trainable_names, frozen_names;
  std::unordered_set<const c10::TensorImpl*> seen;
  for (const auto& item : module.named_parameters(/*recurse=*/true)) {
    const at::Tensor& p = item.value();
    const c10::TensorImpl* impl = p.unsafeGetTensorImpl();
    if (managed_.count(impl) || !seen.insert(impl).second) continue;
    const std::string name = prefix.empty() ? item.key() : prefix + "." + item.key();
    if (!p.is_floating_point()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "parameter '%s' has dtype %s; tessera shards floating-point parameters only", name,
          c10::toString(p.scalar_type())));
    }
    (p.requires_grad() ? trainable : frozen).push_back(p);
    (p.requires_grad() ? trainable_names : frozen_names).push_back(name);
  }
  if (trainable.empty() && frozen.empty()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "ShardedModel: '%s' has no parameters left to shard (all are held by sharded blocks, or it has none)",
        prefix.empty() ? module.name() : prefix));
  }
  std::vector<at::Tensor> params = trainable;
  params.insert(params.end(), frozen.begin(), frozen.end());
  std::vector<std::string> names = trainable_names;
  names.insert(names.end(), frozen_names.begin(), frozen_names.end());
  if (device_.has_value() && params[0].device() != *device_) {
    return absl::InvalidArgumentError(absl::StrFormat("parameter '%s' is on %s but earlier units are on %s; move "
                                                      "the model to one device before sharding",
                                                      names[0], params[0].device().str(), device_->str()));
  }
  torch_rt::UnitOptions uo;
  uo.name = prefix.empty() ? "root" : prefix;
  uo.shard = sharded();
  uo.param_dtype = options_.param_dtype;
  uo.reduce_dtype = options_.reduce_dtype;
  uo.timeout = options_.collective_timeout;
  std::vector<at::Tensor> detached;
  for (const auto& p : params) detached.push_back(p.detach());
  TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<torch_rt::Unit> unit,
                           torch_rt::Unit::Create(comm_, detached, names, static_cast<int64_t>(trainable.size()), uo));
  // The module keeps its parameter tensors (its submodules hold them by value), now pointing at the unit's
  // unsharded buffer, whose storage is freed while the unit is sharded; the optimizer sees new leaf tensors over
  // the flat shard.
  std::vector<at::Tensor> sharded_leaves, full;
  {
    at::NoGradGuard no_grad;
    for (size_t i = 0; i < params.size(); ++i) {
      at::Tensor p = params[i];
      p.set_data(unit->full_params()[i]);
      full.push_back(p);
      sharded_leaves.push_back(unit->sharded_params()[i].detach().requires_grad_(p.requires_grad()));
      managed_.insert(p.unsafeGetTensorImpl());
    }
  }
  TESSERA_RETURN_IF_ERROR(unit->AdoptParams(sharded_leaves, full));
  device_ = params[0].device();
  units_.push_back(std::move(unit));
  names_.push_back(std::move(names));
  return static_cast<int>(units_.size()) - 1;
}

absl::StatusOr<int> ShardedModel::ShardBlock(torch::nn::Module& module, const std::string& name) {
  if (name.empty()) return absl::InvalidArgumentError("ShardedModel::ShardBlock: a block needs a name");
  return AddUnit(module, name);
}

absl::StatusOr<int> ShardedModel::ShardRoot(torch::nn::Module& root) {
  TESSERA_ASSIGN_OR_RETURN(int r, AddUnit(root, ""));
  // The schedule's unit 0 is the root; the blocks follow in the order they were sharded.
  std::vector<shard::UnitOps*> ops = {units_[r].get()};
  std::vector<shard::UnitPolicy> policies(units_.size());
  for (int u = 0; u < r; ++u) ops.push_back(units_[u].get());
  for (auto& p : policies) {
    p.default_reshard_after_forward = options_.strategy == ShardingStrategy::kFullShard;
  }
  root_ = r;
  schedule_ = std::make_unique<shard::StepSchedule>(std::move(ops), std::move(policies));
  return r;
}

at::Tensor ShardedModel::RunUnit(int u, std::vector<at::Tensor> inputs,
                                 const std::function<at::Tensor(const std::vector<at::Tensor>&)>& fn) {
  if (!schedule_) {
    throw StatusError(absl::FailedPreconditionError(
        "ShardedModel: forward before ShardRoot; shard every block, then the root, before the first forward"));
  }
  const int s = ScheduleIndex(u);
  const bool in_backward = InBackward();
  ThrowIfError(schedule_->PreForward(s, in_backward, stream()).status());
  const bool grad = at::GradMode::is_enabled();
  if (grad && !in_backward) {
    // The post-backward: the gradient of an input is complete once it flowed through the whole unit. Each input
    // that requires grad is replaced by an alias whose gradient hook runs it (the alias keeps uses of the same
    // tensor outside the unit from delaying it); with several, the first hook does it (PostBackward is
    // idempotent within one backward).
    for (at::Tensor& in : inputs) {
      if (!in.defined() || !in.requires_grad()) continue;
      in = in.view_as(in);
      in.register_hook([this, u](const at::Tensor&) { PostBackward(u); });
    }
  }
  at::Tensor out = fn(inputs);
  ThrowIfError(schedule_->PostForward(s, grad, in_backward).status());
  if (grad && out.defined() && out.requires_grad()) {
    out.register_hook([this, u](const at::Tensor&) { PreBackward(u); });
  }
  return out;
}

void ShardedModel::PreBackward(int u) {
  absl::StatusOr<bool> first = schedule_->PreBackward(ScheduleIndex(u), stream());
  ThrowIfError(first.status());
  if (*first) torch::autograd::Engine::get_default_engine().queue_callback([this] { EndOfBackward(); });
}

void ShardedModel::PostBackward(int u) { ThrowIfError(schedule_->PostBackward(ScheduleIndex(u), stream())); }

void ShardedModel::EndOfBackward() { ThrowIfError(schedule_->EndOfBackward(stream()).status()); }

std::vector<CheckpointTensor> ShardedModel::CheckpointTensors(const std::string& prefix) const {
  std::vector<CheckpointTensor> out;
  for (size_t u = 0; u < units_.size(); ++u) {
    const torch_rt::Unit& unit = *units_[u];
    for (int64_t i = 0; i < unit.num_params(); ++i) {
      CheckpointTensor t;
      t.name = prefix + "/" + names_[u][i];
      t.shape = unit.param_shape(i);
      t.local = unit.sharded_params()[i].detach();
      auto [start, count] = unit.SaveRange(i);
      t.save_start = start;
      t.save_count = count;
      if (sharded()) {  // this rank owns [start, start + count): saves and loads it
        t.save_offset = 0;
        t.load_start = start;
      } else {  // replicated: every rank loads all of it; the ranks split the writing
        t.save_offset = start;
        t.load_start = 0;
      }
      out.push_back(std::move(t));
    }
  }
  return out;
}

absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ShardedModel::FullStateDict() {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (size_t u = 0; u < units_.size(); ++u) {
    TESSERA_ASSIGN_OR_RETURN(std::vector<at::Tensor> full, units_[u]->GatherFull());
    for (size_t i = 0; i < full.size(); ++i) out.emplace_back(names_[u][i], std::move(full[i]));
  }
  return out;
}

}  // namespace tessera
