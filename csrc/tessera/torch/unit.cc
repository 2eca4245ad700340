#include "tessera/torch/unit.h"

#include <c10/core/GradMode.h>

#include "absl/strings/str_format.h"
#include "tessera/core/status.h"
#include "tessera/kernels/kernels.h"
#include "tessera/torch/tensor_view.h"

namespace tessera::torch_rt {
namespace {

// [Note: freeing unsharded parameters] Autograd keeps references to the unsharded parameters it saved in forward.
// Rather than dropping the tensors, we free and re-allocate their *storage* in place: the saved references stay
// valid, see no memory while the unit is sharded, and see the re-gathered values before backward needs them.
void ResizeStorage(const at::Tensor& t, int64_t nbytes) {
  c10::StorageImpl* impl = t.storage().unsafeGetStorageImpl();
  if (static_cast<int64_t>(impl->nbytes()) == nbytes) return;
  if (nbytes == 0) {
    impl->set_data_ptr_noswap(at::DataPtr(nullptr, t.device()));
  } else {
    impl->set_data_ptr_noswap(impl->allocator()->allocate(nbytes));
  }
  impl->set_nbytes(nbytes);
}

absl::StatusOr<std::vector<BufferView>> Views(const std::vector<at::Tensor>& ts, const std::string& what) {
  std::vector<BufferView> out;
  out.reserve(ts.size());
  for (const auto& t : ts) {
    TESSERA_ASSIGN_OR_RETURN(BufferView v, ViewOf(t, what));
    out.push_back(v);
  }
  return out;
}

}  // namespace

absl::StatusOr<std::unique_ptr<Unit>> Unit::Create(std::shared_ptr<comm::Communicator> comm,
                                                   const std::vector<at::Tensor>& params,
                                                   const std::vector<std::string>& names, int64_t num_trainable,
                                                   UnitOptions options) {
  if (!comm) return absl::InvalidArgumentError(absl::StrFormat("%s: no communicator", options.name));
  if (params.empty()) return absl::InvalidArgumentError(absl::StrFormat("%s: no parameters to shard", options.name));
  if (names.size() != params.size() || num_trainable < 0 || num_trainable > static_cast<int64_t>(params.size())) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %d names and %d trainable for %d parameters",
                                                      options.name, names.size(), num_trainable, params.size()));
  }
  auto unit = std::unique_ptr<Unit>(new Unit());
  unit->comm_ = std::move(comm);
  unit->names_ = names;
  unit->num_trainable_ = num_trainable;
  unit->group_rank_ = unit->comm_->rank();
  unit->group_size_ = unit->comm_->size();
  const at::ScalarType dtype = params[0].scalar_type();
  const at::Device device = params[0].device();
  std::vector<int64_t> numels;
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    if (!ToDType(p.scalar_type()).ok()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: parameter '%s' has dtype %s; tessera shards floating parameters (float32, float64, bfloat16, "
          "float16)", options.name, names[i], c10::toString(p.scalar_type())));
    }
    if (p.scalar_type() != dtype) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: parameter '%s' has dtype %s but '%s' has %s; one unit needs one dtype", options.name, names[i],
          c10::toString(p.scalar_type()), names[0], c10::toString(dtype)));
    }
    if (p.device() != device) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: parameter '%s' is on %s but '%s' is on %s; one unit needs all its parameters on one device",
          options.name, names[i], p.device().str(), names[0], device.str()));
    }
    numels.push_back(p.numel());
    unit->shapes_.push_back(p.sizes().vec());
  }
  const int world = options.shard ? unit->group_size_ : 1;
  TESSERA_ASSIGN_OR_RETURN(unit->plan_, shard::ShardPlan::Create(numels, world));
  unit->param_dtype_ = options.param_dtype.value_or(dtype);
  unit->reduce_dtype_ = options.reduce_dtype.value_or(unit->param_dtype_);
  TESSERA_RETURN_IF_ERROR_CTX(ToDType(unit->param_dtype_).status(), options.name, ": param_dtype");
  TESSERA_RETURN_IF_ERROR_CTX(ToDType(unit->reduce_dtype_).status(), options.name, ": reduce_dtype");
  unit->options_ = std::move(options);

  const auto opts = at::TensorOptions().dtype(dtype).device(device);
  const auto& plan = unit->plan_;
  const int shard_rank = world == 1 ? 0 : unit->group_rank_;
  unit->flat_shard_ = at::zeros({plan.shard_numel()}, opts);
  unit->flat_grad_shard_ = at::zeros({unit->trainable_shard_numel()}, opts);
  c10::NoGradGuard no_grad;
  for (int64_t i = 0; i < plan.num_params(); ++i) {
    const int64_t n = plan.LocalNumel(i, shard_rank);
    const int64_t start = plan.LocalStart(i, shard_rank);
    at::Tensor local = unit->flat_shard_.narrow(0, plan.slot(i).shard_offset, n);
    local.copy_(params[i].detach().reshape({-1}).narrow(0, start, n));
    unit->sharded_params_.push_back(local);
    if (i < num_trainable) {
      unit->sharded_grads_.push_back(unit->flat_grad_shard_.narrow(0, plan.slot(i).shard_offset, n));
    }
  }

  // The unsharded parameters alias the shard when there is nothing to gather or cast: no copies at all.
  unit->full_aliases_shard_ = world == 1 && unit->param_dtype_ == dtype;
  if (unit->full_aliases_shard_) {
    unit->full_flat_ = unit->flat_shard_;
    for (int64_t i = 0; i < plan.num_params(); ++i) {
      unit->full_params_.push_back(
          unit->flat_shard_.narrow(0, plan.slot(i).shard_offset, numels[i]).view(unit->shapes_[i]));
    }
    unit->state_ = shard::UnitState::kUnsharded;
  } else {
    int64_t total = 0;
    for (int64_t n : numels) total += n;
    unit->full_flat_ = at::empty({total}, opts.dtype(unit->param_dtype_));
    unit->full_nbytes_ = total * static_cast<int64_t>(c10::elementSize(unit->param_dtype_));
    int64_t offset = 0;
    for (int64_t i = 0; i < plan.num_params(); ++i) {
      unit->full_params_.push_back(unit->full_flat_.narrow(0, offset, numels[i]).view(unit->shapes_[i]));
      offset += numels[i];
    }
    ResizeStorage(unit->full_flat_, 0);
    unit->state_ = shard::UnitState::kSharded;
  }
  return unit;
}

comm::CollectiveOptions Unit::CollOpts(uintptr_t stream) const {
  comm::CollectiveOptions o;
  o.timeout = options_.timeout;
  o.stream = reinterpret_cast<void*>(stream);
  return o;
}

absl::Status Unit::StartUnshard(uintptr_t stream) {
  if (state_ != shard::UnitState::kSharded) return absl::OkStatus();
  c10::NoGradGuard no_grad;
  // All-gather in param_dtype: the cast happens once on the shard, halving the bytes sent for bf16.
  gather_in_ = flat_shard_.scalar_type() == param_dtype_ ? flat_shard_ : flat_shard_.to(param_dtype_);
  gather_out_ = at::empty({plan_.shard_numel() * plan_.world()}, gather_in_.options());
  if (plan_.world() == 1) {
    gather_out_.copy_(gather_in_);
    gather_work_ = std::make_unique<comm::DoneWork>();
  } else {
    TESSERA_ASSIGN_OR_RETURN(BufferView in, ViewOf(gather_in_, options_.name + " all-gather input"));
    TESSERA_ASSIGN_OR_RETURN(BufferView out, ViewOf(gather_out_, options_.name + " all-gather output"));
    comm::CollectiveOptions copts = CollOpts(stream);
    copts.tag = absl::StrFormat("%s parameter all-gather of unit '%s'", backward_pass_ ? "backward" : "forward",
                                options_.name);
    auto work = comm_->AllGather(in, out, copts);
    TESSERA_RETURN_IF_ERROR_CTX(work.status(), options_.name, ": unshard");
    gather_work_ = std::move(work).value();
  }
  state_ = shard::UnitState::kUnsharding;
  ++gathers_started_;
  return absl::OkStatus();
}

absl::Status Unit::WaitUnshard(uintptr_t stream) {
  if (state_ == shard::UnitState::kUnsharded) return absl::OkStatus();
  if (state_ == shard::UnitState::kSharded) TESSERA_RETURN_IF_ERROR(StartUnshard(stream));
  absl::Status waited = gather_work_->Wait();
  gather_work_.reset();
  gather_in_ = at::Tensor();
  if (!waited.ok()) {
    gather_out_ = at::Tensor();
    state_ = shard::UnitState::kSharded;
    return WithContext(waited, options_.name + ": unshard");
  }
  ResizeStorage(full_flat_, full_nbytes_);
  TESSERA_ASSIGN_OR_RETURN(BufferView src, ViewOf(gather_out_, options_.name + " all-gather output"));
  TESSERA_ASSIGN_OR_RETURN(std::vector<BufferView> dst, Views(full_params_, options_.name + " unsharded parameter"));
  TESSERA_RETURN_IF_ERROR_CTX(
      kernels::CopyOut(src, plan_, plan_.shard_numel(), dst, reinterpret_cast<void*>(stream)),
      options_.name, ": copy-out");
  gather_out_ = at::Tensor();
  state_ = shard::UnitState::kUnsharded;
  return absl::OkStatus();
}

absl::Status Unit::Reshard() {
  if (full_aliases_shard_ || state_ == shard::UnitState::kSharded) return absl::OkStatus();
  if (state_ == shard::UnitState::kUnsharding) {
    // Never free under an in-flight all-gather: finish it first.
    absl::Status waited = gather_work_->Wait();
    gather_work_.reset();
    gather_in_ = gather_out_ = at::Tensor();
    state_ = shard::UnitState::kSharded;
    ++gathers_discarded_;
    return WithContext(waited, options_.name + ": reshard");
  }
  ResizeStorage(full_flat_, 0);
  state_ = shard::UnitState::kSharded;
  return absl::OkStatus();
}

absl::Status Unit::AdoptParams(const std::vector<at::Tensor>& sharded, const std::vector<at::Tensor>& full) {
  if (static_cast<int64_t>(sharded.size()) != num_params() || static_cast<int64_t>(full.size()) != num_params()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %d sharded and %d unsharded tensors for %d parameters",
                                                      options_.name, sharded.size(), full.size(), num_params()));
  }
  for (int64_t i = 0; i < num_params(); ++i) {
    const bool same = sharded[i].data_ptr() == sharded_params_[i].data_ptr() &&
                      sharded[i].numel() == sharded_params_[i].numel() &&
                      full[i].unsafeGetTensorImpl()->storage().is_alias_of(full_params_[i].storage()) &&
                      full[i].sizes() == full_params_[i].sizes();
    if (!same) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: the tensors given for '%s' do not alias the unit's own views", options_.name, names_[i]));
    }
  }
  sharded_params_ = sharded;
  full_params_ = full;
  return absl::OkStatus();
}

std::pair<int64_t, int64_t> Unit::OwnedRange(int64_t i) const {
  const int shard_rank = plan_.world() == 1 ? 0 : group_rank_;
  return {plan_.LocalStart(i, shard_rank), plan_.LocalNumel(i, shard_rank)};
}

std::pair<int64_t, int64_t> Unit::SaveRange(int64_t i) const {
  if (plan_.world() > 1 || group_size_ == 1) return OwnedRange(i);
  return shard::ShardPlan::Chunk(plan_.slot(i).numel, group_rank_, group_size_);
}

absl::Status Unit::SyncRequiresGrad() {
  for (int64_t i = 0; i < num_params(); ++i) {
    const bool want = sharded_params_[i].requires_grad();
    if (want == full_params_[i].requires_grad()) continue;
    if (want && i >= num_trainable_) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s: parameter '%s' was frozen (requires_grad=False) when tessera.shard was called, so it has no gradient "
          "buffer, and requires_grad_(True) after sharding cannot take effect; make it trainable before "
          "tessera.shard (freezing it afterwards with requires_grad_(False) works)", options_.name, names_[i]));
    }
    full_params_[i].set_requires_grad(want);
  }
  return absl::OkStatus();
}

bool Unit::WantsReduce() const {
  if (!requires_grad_sync_) return false;
  for (int64_t i = 0; i < num_trainable_; ++i) {
    if (full_params_[i].requires_grad()) return true;
  }
  return false;
}

absl::Status Unit::StartReduce(uintptr_t stream) {
  if (reduce_state_ == shard::ReduceState::kReducing) {
    TESSERA_RETURN_IF_ERROR(FinishReduce(stream));  // an earlier backward pass of this unit in the same step
  }
  c10::NoGradGuard no_grad;
  const int64_t k = num_trainable_;
  const auto opts = flat_shard_.options().dtype(reduce_dtype_);
  std::vector<at::Tensor> keep;  // zero stand-ins for missing gradients stay alive through the copy
  std::vector<BufferView> views;
  reduce_local_has_.assign(k, 0);
  reduce_requires_grad_.assign(k, 0);
  std::vector<float> flags(k, 0.0f);
  for (int64_t i = 0; i < k; ++i) {
    at::Tensor g = full_params_[i].grad();
    reduce_requires_grad_[i] = full_params_[i].requires_grad();
    if (!g.defined()) {
      g = at::zeros({plan_.slot(i).numel}, opts);
    } else if (g.numel() != plan_.slot(i).numel) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: gradient of '%s' has %d elements, expected %d",
                                                        options_.name, names_[i], g.numel(), plan_.slot(i).numel));
    } else {
      reduce_local_has_[i] = 1;
      flags[i] = 1.0f;
    }
    g = g.contiguous();
    keep.push_back(g);
    TESSERA_ASSIGN_OR_RETURN(BufferView v, ViewOf(g, options_.name + " gradient of '" + names_[i] + "'"));
    views.push_back(v);
  }
  const int64_t s = trainable_shard_numel();
  const int64_t stride = s + k;  // each rank's block: its gradient shard, then the flags
  const int w = plan_.world();
  reduce_in_ = at::empty({stride * w}, opts);
  TESSERA_ASSIGN_OR_RETURN(BufferView in, ViewOf(reduce_in_, options_.name + " reduce input"));
  // Pre-divide by the group size so the sum is the average (gloo has no AVG; keeps bf16 sums in range).
  TESSERA_RETURN_IF_ERROR_CTX(kernels::CopyIn(views, plan_, stride, 1.0 / group_size_, in,
                                              reinterpret_cast<void*>(stream)),
                              options_.name, ": copy-in");
  if (k > 0) {
    at::Tensor f = at::from_blob(flags.data(), {1, k}, at::kFloat).to(opts.device(flat_shard_.device()));
    reduce_in_.view({w, stride}).narrow(1, s, k).copy_(f.expand({w, k}));
  }
  for (int64_t i = 0; i < k; ++i) full_params_[i].mutable_grad().reset();
  kept_.assign(k, KeptGrad{});  // the kept local gradients are in this reduction now
  any_kept_ = false;
  comm::CollectiveOptions copts = CollOpts(stream);
  copts.tag = absl::StrFormat("backward gradient %s of unit '%s'", plan_.world() == 1 ? "all-reduce" : "reduce-scatter",
                              options_.name);
  if (group_size_ == 1) {
    reduce_out_ = reduce_in_;
    reduce_work_ = std::make_unique<comm::DoneWork>();
  } else if (w == 1) {  // NO_SHARD: every rank keeps the whole averaged gradient
    reduce_out_ = reduce_in_;
    auto work = comm_->AllReduce(in, comm::ReduceOp::kSum, copts);
    TESSERA_RETURN_IF_ERROR_CTX(work.status(), options_.name, ": gradient all-reduce");
    reduce_work_ = std::move(work).value();
  } else {
    reduce_out_ = at::empty({stride}, opts);
    TESSERA_ASSIGN_OR_RETURN(BufferView out, ViewOf(reduce_out_, options_.name + " reduce output"));
    auto work = comm_->ReduceScatter(in, out, comm::ReduceOp::kSum, copts);
    TESSERA_RETURN_IF_ERROR_CTX(work.status(), options_.name, ": gradient reduce-scatter");
    reduce_work_ = std::move(work).value();
  }
  reduce_state_ = shard::ReduceState::kReducing;
  return absl::OkStatus();
}

absl::Status Unit::FinishReduce(uintptr_t stream) {
  if (reduce_state_ != shard::ReduceState::kReducing) return absl::OkStatus();
  absl::Status waited = reduce_work_->Wait();
  reduce_work_.reset();
  reduce_state_ = shard::ReduceState::kIdle;
  at::Tensor out = std::move(reduce_out_);
  reduce_in_ = reduce_out_ = at::Tensor();
  TESSERA_RETURN_IF_ERROR_CTX(waited, options_.name, ": gradient reduction");
  c10::NoGradGuard no_grad;
  const int64_t k = num_trainable_;
  const int64_t s = trainable_shard_numel();
  at::Tensor reduced = out.narrow(0, 0, s);
  // Which parameters got a gradient on some rank: see [Note: gradients that no rank produced].
  std::vector<char> has(reduce_local_has_);
  bool need_flags = false;
  for (int64_t i = 0; i < k; ++i) need_flags |= reduce_requires_grad_[i] && !reduce_local_has_[i];
  if (need_flags && group_size_ > 1) {
    at::Tensor flags = out.narrow(0, s, k).to(at::kCPU, at::kFloat);
    const float* f = flags.data_ptr<float>();
    for (int64_t i = 0; i < k; ++i) has[i] = f[i] > 0.5f;
  }
  bool all_have = true, all_empty = true, all_views = true;
  for (int64_t i = 0; i < k; ++i) {
    const at::Tensor& g = sharded_params_[i].grad();
    all_have &= has[i] != 0;
    all_empty &= !g.defined();
    all_views &= g.defined() && g.is_same(sharded_grads_[i]);
  }
  if (all_have && all_empty) {  // the usual first reduction of a step: one copy, then point .grad at the views
    flat_grad_shard_.copy_(reduced);
    for (int64_t i = 0; i < k; ++i) sharded_params_[i].mutable_grad() = sharded_grads_[i];
  } else if (all_have && all_views) {  // a later reduction in the same step: one add
    flat_grad_shard_.add_(reduced.to(flat_grad_shard_.scalar_type()));
  } else {
    for (int64_t i = 0; i < k; ++i) {
      if (!has[i]) continue;
      const at::Tensor& view = sharded_grads_[i];
      at::Tensor part = reduced.narrow(0, plan_.slot(i).shard_offset, view.numel());
      at::Tensor& grad = sharded_params_[i].mutable_grad();
      if (!grad.defined()) {
        view.copy_(part);
        grad = view;
      } else {
        grad.add_(part.to(grad.scalar_type()).view(grad.sizes()));
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Unit::KeepLocalGrads() {
  c10::NoGradGuard no_grad;
  const int64_t k = num_trainable_;
  if (kept_.size() != static_cast<size_t>(k)) kept_.assign(k, KeptGrad{});
  for (int64_t i = 0; i < k; ++i) {
    if (!full_params_[i].grad().defined() || kept_[i].grad.defined()) continue;
    at::Tensor& grad = sharded_params_[i].mutable_grad();
    if (!grad.defined()) {
      sharded_grads_[i].zero_();  // zero + the reduction to come = what one process's .grad would hold
      grad = sharded_grads_[i];
    }
    kept_[i].grad = grad;
    any_kept_ = true;
  }
  // Our own zero_() above moved the shared version counter: record every kept gradient's version afresh.
  for (int64_t i = 0; i < k; ++i) {
    if (kept_[i].grad.defined()) kept_[i].version = kept_[i].grad._version();
  }
  return absl::OkStatus();
}

void Unit::DropClearedLocalGrads() {
  if (!any_kept_) return;
  any_kept_ = false;
  for (size_t i = 0; i < kept_.size(); ++i) {
    KeptGrad& kept = kept_[i];
    if (!kept.grad.defined()) continue;
    const at::Tensor& grad = sharded_params_[i].grad();
    if (grad.defined() && grad.is_same(kept.grad) && grad._version() == kept.version &&
        full_params_[i].grad().defined()) {
      any_kept_ = true;
      continue;
    }
    full_params_[i].mutable_grad().reset();  // the user cleared .grad: the kept window goes with it
    kept = KeptGrad{};
  }
}

std::vector<std::string> Unit::PendingLocalGrads() {
  DropClearedLocalGrads();
  std::vector<std::string> names;
  for (size_t i = 0; i < kept_.size(); ++i) {
    if (kept_[i].grad.defined()) names.push_back(names_[i]);
  }
  return names;
}

absl::Status Unit::DropBackward(uintptr_t stream) {
  absl::Status status;
  if (reduce_state_ == shard::ReduceState::kReducing) {
    status = reduce_work_->Wait();  // its result is dropped: the gradients are incomplete
    reduce_work_.reset();
    reduce_in_ = reduce_out_ = at::Tensor();
    reduce_state_ = shard::ReduceState::kIdle;
  }
  for (int64_t i = 0; i < num_trainable_; ++i) full_params_[i].mutable_grad().reset();
  kept_.assign(num_trainable_, KeptGrad{});
  any_kept_ = false;
  return WithContext(status, options_.name + ": dropping the reduction of a backward that raised");
}

absl::Status Unit::LoadFullParam(int64_t i, const at::Tensor& full) {
  if (i < 0 || i >= num_params()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: parameter index %d out of range", options_.name, i));
  }
  if (full.sizes().vec() != shapes_[i]) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: '%s' has shape %s in the state dict but %s in the model",
                                                      options_.name, names_[i], c10::str(full.sizes()),
                                                      c10::str(at::IntArrayRef(shapes_[i]))));
  }
  c10::NoGradGuard no_grad;
  const int shard_rank = plan_.world() == 1 ? 0 : group_rank_;
  const int64_t n = plan_.LocalNumel(i, shard_rank);
  sharded_params_[i].copy_(full.reshape({-1}).narrow(0, plan_.LocalStart(i, shard_rank), n));
  if (state_ == shard::UnitState::kUnsharded && !full_aliases_shard_) {
    full_params_[i].copy_(full);  // keep an unsharded copy consistent
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<at::Tensor>> Unit::GatherFull() {
  c10::NoGradGuard no_grad;
  std::vector<at::Tensor> full;
  for (int64_t i = 0; i < num_params(); ++i) full.push_back(at::empty(shapes_[i], flat_shard_.options()));
  at::Tensor out = at::empty({plan_.shard_numel() * plan_.world()}, flat_shard_.options());
  if (plan_.world() == 1) {
    out.copy_(flat_shard_);
  } else {
    TESSERA_ASSIGN_OR_RETURN(BufferView in, ViewOf(flat_shard_, "gather input"));
    TESSERA_ASSIGN_OR_RETURN(BufferView vout, ViewOf(out, "gather output"));
    TESSERA_ASSIGN_OR_RETURN(auto work, comm_->AllGather(in, vout, CollOpts(0)));
    TESSERA_RETURN_IF_ERROR_CTX(work->Wait(), options_.name, ": gathering the full parameters");
  }
  TESSERA_ASSIGN_OR_RETURN(BufferView src, ViewOf(out, "gather output"));
  TESSERA_ASSIGN_OR_RETURN(std::vector<BufferView> dst, Views(full, options_.name + " gathered parameter"));
  TESSERA_RETURN_IF_ERROR_CTX(kernels::CopyOut(src, plan_, plan_.shard_numel(), dst, nullptr), options_.name,
                              ": copy-out");
  return full;
}

}  // namespace tessera::torch_rt
