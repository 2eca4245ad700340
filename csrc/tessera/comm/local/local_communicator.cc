#include "tessera/comm/local/local_communicator.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "tessera/core/dtype.h"
#include "tessera/core/dtype_access.h"
#include "tessera/core/status.h"

namespace tessera::comm {
namespace {

using elements::BF16;  // element access per dtype (tessera/core/dtype_access.h)
using elements::F16;
using elements::F32;
using elements::F64;

// dst[j] = reduce over ranks q (in rank order, so every rank computes bit-identical results) of srcs[q][j].
template <typename D>
void ReduceTyped(const std::vector<const void*>& srcs, int64_t n, ReduceOp op, void* dst) {
  using S = typename D::Storage;
  using A = typename D::Acc;
  S* out = static_cast<S*>(dst);
  const A world = static_cast<A>(srcs.size());
  for (int64_t j = 0; j < n; ++j) {
    A acc = 0;
    for (const void* src : srcs) acc += D::Load(static_cast<const S*>(src)[j]);
    out[j] = D::Store(op == ReduceOp::kAvg ? acc / world : acc);
  }
}

void Reduce(DType dtype, const std::vector<const void*>& srcs, int64_t n, ReduceOp op, void* dst) {
  switch (dtype) {
    case DType::kFloat32: return ReduceTyped<F32>(srcs, n, op, dst);
    case DType::kFloat64: return ReduceTyped<F64>(srcs, n, op, dst);
    case DType::kBFloat16: return ReduceTyped<BF16>(srcs, n, op, dst);
    case DType::kFloat16: return ReduceTyped<F16>(srcs, n, op, dst);
  }
  TESSERA_CHECK(false, "unknown dtype ", static_cast<int>(dtype));
}

// cv.wait_for(lock, timeout, pred) for an absl::Duration, where InfiniteDuration (or anything too long to add to
// the steady clock without overflow) means no deadline. Returns pred().
template <typename Pred>
bool WaitFor(std::unique_lock<std::mutex>& lock, std::condition_variable& cv, absl::Duration timeout, Pred pred) {
  if (timeout >= absl::Hours(24 * 365 * 100)) {
    cv.wait(lock, pred);
    return true;
  }
  return cv.wait_for(lock, absl::ToChronoNanoseconds(std::max(timeout, absl::ZeroDuration())), pred);
}

bool IsReduction(CollectiveKind kind) {
  return kind == CollectiveKind::kAllReduce || kind == CollectiveKind::kReduceScatter;
}

std::string DescribeOp(const Collective& op) {
  std::string s = absl::StrFormat("%s of %d -> %d %s", CollectiveKindName(op.kind), op.input.count, op.output.count,
                                  DTypeName(op.input.dtype));
  if (IsReduction(op.kind)) absl::StrAppend(&s, op.op == ReduceOp::kAvg ? " (avg)" : " (sum)");
  if (op.kind == CollectiveKind::kBroadcast) absl::StrAppendFormat(&s, " (root %d)", op.root);
  return s;
}

std::string DescribeGroup(absl::Span<const Collective> ops) {
  if (ops.size() == 1) return CollectiveKindName(ops[0].kind);
  return absl::StrFormat("group of %d collectives (%s)", ops.size(),
                         absl::StrJoin(ops, ", ", [](std::string* out, const Collective& op) {
                           out->append(CollectiveKindName(op.kind));
                         }));
}

}  // namespace

// ---- LocalWorld -------------------------------------------------------------------------------------------------

LocalWorld::LocalWorld(int size) : size_(size), joined_(size), arrived_(size), posts_(size) {}

absl::StatusOr<std::shared_ptr<LocalWorld>> LocalWorld::Create(int size) {
  if (size < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("LocalWorld: size must be >= 1, got %d", size));
  }
  return std::shared_ptr<LocalWorld>(new LocalWorld(size));
}

absl::StatusOr<std::unique_ptr<LocalCommunicator>> LocalWorld::Join(int rank) {
  if (rank < 0 || rank >= size_) {
    return absl::InvalidArgumentError(
        absl::StrFormat("LocalWorld: rank %d is outside the world of %d ranks", rank, size_));
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (joined_[rank]) {
    return absl::FailedPreconditionError(
        absl::StrFormat("LocalWorld: rank %d already has a communicator; each rank joins once", rank));
  }
  joined_[rank] = true;
  return std::unique_ptr<LocalCommunicator>(new LocalCommunicator(shared_from_this(), rank));
}

absl::StatusOr<std::vector<std::unique_ptr<Communicator>>> LocalWorld::CreateCommunicators(int size) {
  TESSERA_ASSIGN_OR_RETURN(std::shared_ptr<LocalWorld> world, Create(size));
  std::vector<std::unique_ptr<Communicator>> comms;
  for (int r = 0; r < size; ++r) {
    TESSERA_ASSIGN_OR_RETURN(std::unique_ptr<LocalCommunicator> comm, world->Join(r));
    comms.push_back(std::move(comm));
  }
  return comms;
}

bool LocalWorld::broken() const {
  std::lock_guard<std::mutex> lock(mu_);
  return !broken_reason_.empty();
}

absl::Status LocalWorld::CheckGroupsMatch() const {
  const Post& first = posts_[0];
  for (int r = 1; r < size_; ++r) {
    const Post& other = posts_[r];
    if (first.is_barrier != other.is_barrier || first.ops.size() != other.ops.size()) {
      auto describe = [](const Post& p) {
        return p.is_barrier ? std::string("a barrier") : absl::StrFormat("a group of %d collectives", p.ops.size());
      };
      return absl::InvalidArgumentError(
          absl::StrFormat("local: rank 0 issued %s but rank %d issued %s; every rank "
                          "must issue the same groups in the same order",
                          describe(first), r, describe(other)));
    }
    for (size_t k = 0; k < first.ops.size(); ++k) {
      const Collective& a = first.ops[k];
      const Collective& b = other.ops[k];
      const bool same = a.kind == b.kind && a.input.dtype == b.input.dtype && a.input.count == b.input.count &&
                        a.output.count == b.output.count && (!IsReduction(a.kind) || a.op == b.op) &&
                        (a.kind != CollectiveKind::kBroadcast || a.root == b.root);
      if (!same) {
        return absl::InvalidArgumentError(
            absl::StrFormat("local: collectives differ across ranks at op %d of the group: rank 0 issued %s but "
                            "rank %d issued %s",
                            k, DescribeOp(a), r, DescribeOp(b)));
      }
    }
  }
  return absl::OkStatus();
}

void LocalWorld::ComputeOutputs(int rank, std::vector<std::vector<char>>& staging) const {
  const auto& mine = posts_[rank].ops;
  staging.resize(mine.size());
  std::vector<const void*> srcs(size_);
  for (size_t k = 0; k < mine.size(); ++k) {
    const Collective& op = mine[k];
    std::vector<char>& out = staging[k];
    out.resize(static_cast<size_t>(op.output.bytes()));
    if (out.empty()) continue;
    const int64_t es = ElementSize(op.input.dtype);
    switch (op.kind) {
      case CollectiveKind::kAllGather: {
        const int64_t block = op.input.count * es;
        for (int q = 0; q < size_; ++q) std::memcpy(out.data() + q * block, posts_[q].ops[k].input.data, block);
        break;
      }
      case CollectiveKind::kBroadcast: std::memcpy(out.data(), posts_[op.root].ops[k].input.data, out.size()); break;
      case CollectiveKind::kAllReduce:
        for (int q = 0; q < size_; ++q) srcs[q] = posts_[q].ops[k].input.data;
        Reduce(op.input.dtype, srcs, op.output.count, op.op, out.data());
        break;
      case CollectiveKind::kReduceScatter:
        for (int q = 0; q < size_; ++q) {
          srcs[q] = static_cast<const char*>(posts_[q].ops[k].input.data) + rank * op.output.count * es;
        }
        Reduce(op.input.dtype, srcs, op.output.count, op.op, out.data());
        break;
    }
  }
}

// [Note: local rendezvous] Each call is one round with two meetings, both under mu_/cv_:
//   1. Every rank posts pointers to its ops (and its own validation result) and waits until all ranks posted.
//      The last to arrive bumps posted_rounds_ and wakes the others. This wait is bounded by the caller's timeout:
//      a rank that never comes is the failure the timeout exists for. On timeout the world is marked broken, so
//      the ranks still waiting in this round fail too and every later call fails fast.
//   2. Between the meetings each rank, without the lock, checks that all groups agree (every rank runs the same
//      check on the same posts, so all reach the same verdict) and computes its outputs into private staging by
//      reading the peers' inputs. Then it meets the others again; the last bumps finished_rounds_. Only after that
//      may a rank return (its caller may free or overwrite the inputs peers were reading) or post again
//      (overwriting posts_). Staging, copied to the outputs after the second meeting, keeps in-place
//      all-reduce/broadcast correct: a rank never writes a buffer a peer may still read.
// The second meeting has no timeout: every rank is past the first one, inside this function, doing bounded work;
// leaving early on a timer would let a caller free memory a peer is reading.
absl::Status LocalWorld::Rendezvous(int rank, const Post& post, absl::Duration timeout, const std::string& what,
                                    std::vector<std::vector<char>>* staging) {
  {
    std::unique_lock<std::mutex> lock(mu_);
    if (!broken_reason_.empty()) {
      return absl::UnavailableError(
          absl::StrFormat("local: %s on rank %d refused: the world is broken (%s)", what, rank, broken_reason_));
    }
    if (arrived_[rank]) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "local: rank %d issued %s while its previous call is still in progress; use one thread per rank", rank,
          what));
    }
    posts_[rank] = post;
    arrived_[rank] = true;
    const int64_t round = posted_rounds_;
    if (++num_arrived_ == size_) {
      num_arrived_ = 0;
      arrived_.assign(size_, false);
      ++posted_rounds_;
      cv_.notify_all();
    } else {
      const bool met = WaitFor(lock, cv_, timeout, [&] { return posted_rounds_ != round || !broken_reason_.empty(); });
      if (!met || posted_rounds_ == round) {
        std::vector<int> missing;
        for (int r = 0; r < size_; ++r) {
          if (!arrived_[r]) missing.push_back(r);
        }
        const std::string msg =
            absl::StrFormat("local: %s timed out on rank %d after %s: rank(s) %s of %d never arrived", what, rank,
                            absl::FormatDuration(timeout), absl::StrJoin(missing, ", "), size_);
        if (broken_reason_.empty()) {
          broken_reason_ = msg;
          cv_.notify_all();
        }
        return absl::DeadlineExceededError(msg);
      }
    }
  }

  absl::Status status;
  for (int r = 0; r < size_ && status.ok(); ++r) {
    const absl::Status& s = posts_[r].local_status;
    if (s.ok()) continue;
    status = r == rank
                 ? s
                 : absl::Status(s.code(), absl::StrFormat("local: %s failed on rank %d: %s", what, r, s.message()));
  }
  if (status.ok()) status = CheckGroupsMatch();
  if (status.ok() && staging != nullptr) ComputeOutputs(rank, *staging);

  std::unique_lock<std::mutex> lock(mu_);
  const int64_t round = finished_rounds_;
  if (++num_done_ == size_) {
    num_done_ = 0;
    ++finished_rounds_;
    cv_.notify_all();
  } else {
    cv_.wait(lock, [&] { return finished_rounds_ != round; });
  }
  return status;
}

// ---- LocalCommunicator ------------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<Work>> LocalCommunicator::Issue(absl::Span<const Collective> ops,
                                                               const CollectiveOptions& options) {
  // An empty group is a no-op without a rendezvous, as in NCCL (ncclGroupStart/End around nothing).
  if (ops.empty()) {
    if (world_->broken()) return absl::UnavailableError("local: empty group on a broken world");
    return std::unique_ptr<Work>(new DoneWork());
  }
  absl::Status local;
  for (size_t k = 0; k < ops.size() && local.ok(); ++k) {
    const Collective& op = ops[k];
    local = ValidateCollective(op, size());
    if (local.ok() && (op.input.device.is_cuda() || op.output.device.is_cuda())) {
      local = absl::InvalidArgumentError(
          absl::StrFormat("%s: the local backend needs CPU buffers, got input on %s and output on %s",
                          CollectiveKindName(op.kind), op.input.device.ToString(), op.output.device.ToString()));
    }
    if (!local.ok() && ops.size() > 1) {
      local = WithContext(local, absl::StrFormat("op %d of a group of %d", k, ops.size()));
    }
  }
  std::vector<std::vector<char>> staging;
  LocalWorld::Post post{false, ops, local};
  TESSERA_RETURN_IF_ERROR(world_->Rendezvous(rank_, post, options.timeout, DescribeGroup(ops), &staging));
  for (size_t k = 0; k < ops.size(); ++k) {
    if (!staging[k].empty()) std::memcpy(ops[k].output.data, staging[k].data(), staging[k].size());
  }
  return std::unique_ptr<Work>(new DoneWork());
}

absl::Status LocalCommunicator::Barrier(absl::Duration timeout) {
  LocalWorld::Post post{true, {}, absl::OkStatus()};
  return world_->Rendezvous(rank_, post, timeout, "barrier", nullptr);
}

}  // namespace tessera::comm
