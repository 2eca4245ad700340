#include "tessera/comm/communicator.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tessera::comm {

const char* CollectiveKindName(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::kAllGather: return "all_gather";
    case CollectiveKind::kReduceScatter: return "reduce_scatter";
    case CollectiveKind::kAllReduce: return "all_reduce";
    case CollectiveKind::kBroadcast: return "broadcast";
  }
  return "unknown";
}

absl::StatusOr<std::unique_ptr<Work>> Communicator::AllGather(BufferView in, BufferView out,
                                                              const CollectiveOptions& options) {
  Collective op = Collective::AllGather(in, out);
  return Issue(absl::MakeConstSpan(&op, 1), options);
}

absl::StatusOr<std::unique_ptr<Work>> Communicator::ReduceScatter(BufferView in, BufferView out, ReduceOp rop,
                                                                  const CollectiveOptions& options) {
  Collective op = Collective::ReduceScatter(in, out, rop);
  return Issue(absl::MakeConstSpan(&op, 1), options);
}

absl::StatusOr<std::unique_ptr<Work>> Communicator::AllReduce(BufferView buf, ReduceOp rop,
                                                              const CollectiveOptions& options) {
  Collective op = Collective::AllReduce(buf, rop);
  return Issue(absl::MakeConstSpan(&op, 1), options);
}

absl::StatusOr<std::unique_ptr<Work>> Communicator::Broadcast(BufferView buf, int root,
                                                              const CollectiveOptions& options) {
  Collective op = Collective::Broadcast(buf, root);
  return Issue(absl::MakeConstSpan(&op, 1), options);
}

std::string Communicator::Where(const CollectiveOptions& options) const {
  std::string where = absl::StrFormat("rank %d of %d", rank(), size());
  if (step() >= 0) absl::StrAppendFormat(&where, ", step %d", step());
  if (!options.tag.empty()) absl::StrAppend(&where, ", ", options.tag);
  return where;
}

absl::Status ValidateCollective(const Collective& op, int world_size) {
  const char* name = CollectiveKindName(op.kind);
  if (op.input.dtype != op.output.dtype) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: input dtype %s differs from output dtype %s", name,
                                                      DTypeName(op.input.dtype), DTypeName(op.output.dtype)));
  }
  if (op.input.device != op.output.device) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: input on %s but output on %s", name,
                                                      op.input.device.ToString(), op.output.device.ToString()));
  }
  if ((op.input.count > 0 && op.input.data == nullptr) || (op.output.count > 0 && op.output.data == nullptr)) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: null buffer with a non-zero count", name));
  }
  const int64_t w = world_size;
  switch (op.kind) {
    case CollectiveKind::kAllGather:
      if (op.output.count != op.input.count * w) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "all_gather: output has %d elements, expected world_size (%d) x input (%d) = %d", op.output.count, w,
            op.input.count, op.input.count * w));
      }
      break;
    case CollectiveKind::kReduceScatter:
      if (op.input.count != op.output.count * w) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "reduce_scatter: input has %d elements, expected world_size (%d) x output (%d) = %d", op.input.count, w,
            op.output.count, op.output.count * w));
      }
      break;
    case CollectiveKind::kAllReduce:
    case CollectiveKind::kBroadcast:
      if (op.input.count != op.output.count) {
        return absl::InvalidArgumentError(absl::StrFormat("%s: input has %d elements but output has %d", name,
                                                          op.input.count, op.output.count));
      }
      if (op.kind == CollectiveKind::kBroadcast && (op.root < 0 || op.root >= world_size)) {
        return absl::InvalidArgumentError(
            absl::StrFormat("broadcast: root %d is outside the group of %d ranks", op.root, world_size));
      }
      break;
  }
  return absl::OkStatus();
}

absl::Status GroupWork::Wait() {
  absl::Status first;
  for (auto& w : works_) {
    absl::Status s = w->Wait();
    if (first.ok() && !s.ok()) first = s;
  }
  works_.clear();
  return first;
}

}  // namespace tessera::comm
