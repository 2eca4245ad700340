#include "tessera/comm/pg/pg_communicator.h"

#include <chrono>
#include <exception>
#include <vector>

#include "absl/strings/str_format.h"
#include "tessera/core/status.h"
#include "tessera/torch/tensor_view.h"

namespace tessera::comm {
namespace {

// Turns an exception from c10d (timeouts, lost peers) into a Status naming the collective.
absl::Status FromException(const std::exception& e, const std::string& what) {
  std::string msg = e.what();
  const bool timeout = msg.find("imed out") != std::string::npos || msg.find("imeout") != std::string::npos;
  std::string text = absl::StrFormat("%s failed: %s", what, msg.substr(0, 2000));
  return timeout ? absl::DeadlineExceededError(text) : absl::UnavailableError(text);
}

class PgWork final : public Work {
 public:
  PgWork(c10::intrusive_ptr<c10d::Work> work, std::string what, absl::Duration timeout, at::Tensor divide_out,
         int64_t divisor)
      : work_(std::move(work)), what_(std::move(what)), timeout_(timeout), divide_out_(std::move(divide_out)),
        divisor_(divisor) {}

  absl::Status Wait() override {
    if (!work_) return absl::FailedPreconditionError(absl::StrFormat("%s: Wait() called twice", what_));
    try {
      auto ms = std::chrono::milliseconds(absl::ToInt64Milliseconds(timeout_));
      bool done = work_->wait(ms);
      work_.reset();
      if (!done) return absl::DeadlineExceededError(absl::StrFormat("%s did not finish within %s", what_,
                                                                    absl::FormatDuration(timeout_)));
    } catch (const std::exception& e) {
      work_.reset();
      return FromException(e, what_);
    }
    // c10d gloo has no AVG: we reduced with SUM and divide here.
    if (divide_out_.defined()) divide_out_.div_(divisor_);
    return absl::OkStatus();
  }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  std::string what_;
  absl::Duration timeout_;
  at::Tensor divide_out_;
  int64_t divisor_;
};

}  // namespace

PgCommunicator::PgCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> group)
    : group_(group), name_("pg:" + group->getBackendName()), rank_(group->getRank()), size_(group->getSize()) {}

std::string PgCommunicator::backend_name() const { return name_; }

absl::StatusOr<c10::intrusive_ptr<c10d::ProcessGroup>> PgCommunicator::group() const {
  c10::intrusive_ptr<c10d::ProcessGroup> group = group_.lock();
  if (!group) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "the process group of this communicator (rank %d of %d, %s) was destroyed "
        "(torch.distributed.destroy_process_group); create the model's sharding again with a live group",
        rank_, size_, name_));
  }
  return group;
}

absl::StatusOr<std::unique_ptr<Work>> PgCommunicator::Issue(absl::Span<const Collective> ops,
                                                            const CollectiveOptions& options) {
  for (const Collective& op : ops) TESSERA_RETURN_IF_ERROR(ValidateCollective(op, size_));
  TESSERA_ASSIGN_OR_RETURN(c10::intrusive_ptr<c10d::ProcessGroup> group, group());
  const auto timeout = std::chrono::milliseconds(absl::ToInt64Milliseconds(options.timeout));
  std::vector<std::unique_ptr<Work>> works;
  works.reserve(ops.size());
  for (const Collective& op : ops) {
    const std::string what =
        absl::StrFormat("%s of %d elements (%s) on rank %d of %d [%s]", CollectiveKindName(op.kind), op.input.count,
                        DTypeName(op.input.dtype), rank_, size_, backend_name());
    at::Tensor in = torch_rt::TensorFromView(op.input);
    at::Tensor out = torch_rt::TensorFromView(op.output);
    at::Tensor divide_out;
    try {
      c10::intrusive_ptr<c10d::Work> work;
      switch (op.kind) {
        case CollectiveKind::kAllGather: {
          c10d::AllgatherOptions o;
          o.timeout = timeout;
          work = group->_allgather_base(out, in, o);
          break;
        }
        case CollectiveKind::kReduceScatter: {
          c10d::ReduceScatterOptions o;
          o.reduceOp = c10d::ReduceOp::SUM;
          o.timeout = timeout;
          work = group->_reduce_scatter_base(out, in, o);
          if (op.op == ReduceOp::kAvg) divide_out = out;
          break;
        }
        case CollectiveKind::kAllReduce: {
          if (op.output.data != op.input.data) out.copy_(in);
          std::vector<at::Tensor> t{out};
          c10d::AllreduceOptions o;
          o.reduceOp = c10d::ReduceOp::SUM;
          o.timeout = timeout;
          work = group->allreduce(t, o);
          if (op.op == ReduceOp::kAvg) divide_out = out;
          break;
        }
        case CollectiveKind::kBroadcast: {
          if (op.output.data != op.input.data) out.copy_(in);
          std::vector<at::Tensor> t{out};
          c10d::BroadcastOptions o;
          o.rootRank = op.root;
          o.timeout = timeout;
          work = group->broadcast(t, o);
          break;
        }
      }
      works.push_back(std::make_unique<PgWork>(std::move(work), what, options.timeout, divide_out, size_));
    } catch (const std::exception& e) {
      // Drain what was issued so no buffer is still in use when we return.
      (void)GroupWork(std::move(works)).Wait();
      return FromException(e, what);
    }
  }
  if (works.size() == 1) return std::move(works[0]);
  return std::unique_ptr<Work>(std::make_unique<GroupWork>(std::move(works)));
}

absl::Status PgCommunicator::Barrier(absl::Duration timeout) {
  // An all-reduce of one element rather than c10d's barrier(): it honours our timeout on every backend.
  at::Tensor one = at::zeros({1}, at::kFloat);
  TESSERA_ASSIGN_OR_RETURN(BufferView view, torch_rt::ViewOf(one, "barrier"));
  CollectiveOptions options;
  options.timeout = timeout;
  TESSERA_ASSIGN_OR_RETURN(auto work, AllReduce(view, ReduceOp::kSum, options));
  return work->Wait();
}

}  // namespace tessera::comm
