#include "tessera/api/adamw.h"

#include <cmath>

#include <nlohmann/json.hpp>

#include "absl/strings/str_format.h"
#include "tessera/core/status.h"
#include "tessera/torch/optim.h"
#include "tessera/torch/tensor_view.h"

namespace tessera {
namespace optim {

absl::StatusOr<std::unique_ptr<AdamW>> AdamW::Create(ShardedModel& model, AdamWOptions options) {
  if (!(options.lr >= 0)) return absl::InvalidArgumentError(absl::StrFormat("AdamW: lr must be >= 0, got %g", options.lr));
  if (!(options.eps >= 0)) {
    return absl::InvalidArgumentError(absl::StrFormat("AdamW: eps must be >= 0, got %g", options.eps));
  }
  if (!(options.beta1 >= 0 && options.beta1 < 1 && options.beta2 >= 0 && options.beta2 < 1)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("AdamW: betas must be in [0, 1), got (%g, %g)", options.beta1, options.beta2));
  }
  if (!(options.weight_decay >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("AdamW: weight_decay must be >= 0, got %g", options.weight_decay));
  }
  if (model.schedule() == nullptr) {
    return absl::FailedPreconditionError("AdamW: the model is not completely sharded yet (call ShardRoot first)");
  }
  auto opt = std::unique_ptr<AdamW>(new AdamW(model, options));
  opt->InitState();
  return opt;
}

AdamW::AdamW(ShardedModel& model, AdamWOptions options) : model_(model), options_(options) {}

void AdamW::InitState() {
  for (int u = 0; u < model_.num_units(); ++u) {
    const torch_rt::Unit& unit = model_.unit(u);
    const at::Tensor& like = unit.flat_shard();
    exp_avg_.push_back(at::zeros({unit.trainable_shard_numel()}, like.options()));
    exp_avg_sq_.push_back(at::zeros({unit.trainable_shard_numel()}, like.options()));
    steps_.emplace_back(unit.num_trainable(), 0);
  }
}

absl::Status AdamW::Step() {
  at::NoGradGuard no_grad;
  kernels::AdamWConfig config;
  config.lr = options_.lr;
  config.beta1 = options_.beta1;
  config.beta2 = options_.beta2;
  config.eps = options_.eps;
  config.weight_decay = options_.weight_decay;
  const uintptr_t stream = model_.stream();
  for (int u = 0; u < model_.num_units(); ++u) {
    torch_rt::Unit& unit = model_.unit(u);
    const int64_t k = unit.num_trainable();
    const auto& params = unit.sharded_params();
    const auto& views = unit.sharded_grads();
    auto offset = [&](int64_t i) { return i < k ? unit.plan().slot(i).shard_offset : unit.trainable_shard_numel(); };
    // Runs of consecutive parameters whose gradients are the unit's gradient views and whose step counts agree
    // are one kernel call over their span (the padding between them is zero and stays zero).
    int64_t first = -1;
    auto flush = [&](int64_t last) -> absl::Status {
      if (first < 0) return absl::OkStatus();
      const int64_t start = offset(first), end = offset(last + 1);
      config.step = steps_[u][first];
      absl::Status st = torch_rt::AdamWStep(unit.flat_shard().narrow(0, start, end - start),
                                            unit.flat_grad_shard().narrow(0, start, end - start),
                                            exp_avg_[u].narrow(0, start, end - start),
                                            exp_avg_sq_[u].narrow(0, start, end - start), config, stream);
      first = -1;
      return st;
    };
    for (int64_t i = 0; i < k; ++i) {
      const at::Tensor& g = params[i].grad();
      if (!g.defined()) {
        TESSERA_RETURN_IF_ERROR(flush(i - 1));
        continue;
      }
      const int64_t step = ++steps_[u][i];
      const bool fusable = g.is_same(views[i]);
      if (first >= 0 && (!fusable || steps_[u][first] != step)) TESSERA_RETURN_IF_ERROR(flush(i - 1));
      if (fusable) {
        if (first < 0) first = i;
        continue;
      }
      // A gradient that is not the unit's view (never the case for gradients tessera reduced): a call of its own.
      const int64_t off = offset(i), n = params[i].numel();
      config.step = step;
      TESSERA_RETURN_IF_ERROR(torch_rt::AdamWStep(params[i], g, exp_avg_[u].narrow(0, off, n),
                                                  exp_avg_sq_[u].narrow(0, off, n), config, stream));
    }
    TESSERA_RETURN_IF_ERROR(flush(k - 1));
  }
  return absl::OkStatus();
}

void AdamW::ZeroGrad() {
  for (int u = 0; u < model_.num_units(); ++u) {
    for (const at::Tensor& p : model_.unit(u).sharded_params()) {
      if (p.grad().defined()) p.mutable_grad() = at::Tensor();
    }
  }
}

std::vector<CheckpointTensor> AdamW::CheckpointTensors(const std::string& prefix, bool for_load) {
  std::vector<CheckpointTensor> params = model_.CheckpointTensors("");
  std::vector<CheckpointTensor> out;
  size_t p = 0;  // model_.CheckpointTensors lists units in order, each unit's parameters in layout order
  for (int u = 0; u < model_.num_units(); ++u) {
    const torch_rt::Unit& unit = model_.unit(u);
    for (int64_t i = 0; i < unit.num_params(); ++i, ++p) {
      if (i >= unit.num_trainable() || (!for_load && steps_[u][i] == 0)) continue;
      const int64_t off = unit.plan().slot(i).shard_offset;
      const int64_t n = unit.sharded_params()[i].numel();
      for (const char* moment : {"exp_avg", "exp_avg_sq"}) {
        CheckpointTensor t = params[p];
        t.name = prefix + "/" + model_.param_names(u)[i] + "/" + moment;
        const at::Tensor& flat = std::string(moment) == "exp_avg" ? exp_avg_[u] : exp_avg_sq_[u];
        t.local = flat.narrow(0, off, n);
        out.push_back(std::move(t));
      }
    }
  }
  return out;
}

std::string AdamW::StateJson() const {
  nlohmann::json names = nlohmann::json::array();
  nlohmann::json scalars = nlohmann::json::object();
  for (int u = 0; u < model_.num_units(); ++u) {
    const torch_rt::Unit& unit = model_.unit(u);
    for (int64_t i = 0; i < unit.num_trainable(); ++i) {
      const std::string& name = model_.param_names(u)[i];
      names.push_back(name);
      if (steps_[u][i] > 0) scalars[name] = {{"step", static_cast<double>(steps_[u][i])}};
    }
  }
  nlohmann::json hyper = {{"lr", options_.lr},
                          {"betas", {options_.beta1, options_.beta2}},
                          {"eps", options_.eps},
                          {"weight_decay", options_.weight_decay}};
  nlohmann::json state = {{"groups", nlohmann::json::array({{{"hyper", hyper}, {"params", names}}})},
                          {"scalars", scalars}};
  return state.dump();
}

absl::Status AdamW::LoadStateJson(const std::string& text) {
  nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object() || !j.contains("groups") || !j["groups"].is_array() || j["groups"].size() != 1 ||
      !j.contains("scalars") || !j["scalars"].is_object()) {
    return absl::InvalidArgumentError(
        "AdamW: optimizer state is not {\"groups\": [one group], \"scalars\": {...}} (a tessera.optim.AdamW over "
        "one parameter group saves that)");
  }
  // Everything is read and checked before anything changes. Step counts may be floats (the Python path saves
  // them so); jsonio's tags ({"__tuple__": ...}) are decoded by the checkpointer before this sees the object.
  AdamWOptions next;
  std::vector<std::vector<int64_t>> steps = steps_;
  try {
    const nlohmann::json& hyper = j["groups"][0].at("hyper");
    const nlohmann::json& betas = hyper.at("betas");
    next.lr = hyper.at("lr").get<double>();
    next.beta1 = betas.at(0).get<double>();
    next.beta2 = betas.at(1).get<double>();
    next.eps = hyper.at("eps").get<double>();
    next.weight_decay = hyper.at("weight_decay").get<double>();
    const nlohmann::json& scalars = j["scalars"];
    for (int u = 0; u < model_.num_units(); ++u) {
      for (int64_t i = 0; i < model_.unit(u).num_trainable(); ++i) {
        auto it = scalars.find(model_.param_names(u)[i]);
        steps[u][i] = it == scalars.end() ? 0 : static_cast<int64_t>(std::llround(it->at("step").get<double>()));
      }
    }
  } catch (const nlohmann::json::exception& e) {
    return absl::InvalidArgumentError(absl::StrFormat("AdamW: malformed optimizer state: %s", e.what()));
  }
  options_ = next;
  steps_ = std::move(steps);
  return absl::OkStatus();
}

}  // namespace optim

absl::StatusOr<double> ClipGradNorm(ShardedModel& model, double max_norm) {
  if (!(max_norm > 0)) {
    return absl::InvalidArgumentError(absl::StrFormat("ClipGradNorm: max_norm must be > 0, got %g", max_norm));
  }
  at::NoGradGuard no_grad;
  // The Python path's order (root first, then the blocks): float32 sums depend on it.
  std::vector<int> order = {model.num_units() - 1};
  for (int u = 0; u + 1 < model.num_units(); ++u) order.push_back(u);
  std::vector<at::Tensor> grads;
  for (int u : order) {
    const torch_rt::Unit& unit = model.unit(u);
    for (int64_t i = 0; i < unit.num_trainable(); ++i) {
      const at::Tensor& g = unit.sharded_params()[i].grad();
      if (g.defined()) grads.push_back(g);
    }
  }
  const at::Tensor& like = model.unit(order[0]).flat_shard();
  const uintptr_t stream = model.stream();
  at::Tensor sq;
  if (grads.empty()) {
    sq = at::zeros({1}, like.options().dtype(at::kFloat));
  } else {
    TESSERA_ASSIGN_OR_RETURN(sq, torch_rt::SquaredNorm(grads, stream));
  }
  sq = sq.to(at::kDouble);
  if (model.sharded() && !grads.empty() && model.comm().size() > 1) {
    TESSERA_ASSIGN_OR_RETURN(BufferView view, torch_rt::ViewOf(sq, "ClipGradNorm squared norm"));
    comm::CollectiveOptions co;
    co.timeout = model.options().collective_timeout;
    co.tag = "gradient norm all-reduce";
    co.stream = reinterpret_cast<void*>(stream);
    TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<comm::Work> work, model.comm().AllReduce(view, comm::ReduceOp::kSum, co));
    TESSERA_RETURN_IF_ERROR(work->Wait());
  }  // NO_SHARD: every rank holds the whole (all-reduced) gradient; nothing to add across ranks
  at::Tensor total = sq.sqrt().to(at::kFloat).reshape({});
  // Python's `max_norm / t` is t.reciprocal() * max_norm; the same ops give the same bits.
  at::Tensor coef = at::clamp_max((total + 1e-6).reciprocal() * max_norm, 1.0);
  if (!grads.empty()) at::_foreach_mul_(grads, coef.to(grads[0].device()));
  return total.item<double>();
}

}  // namespace tessera
