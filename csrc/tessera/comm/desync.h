// Desync diagnosis: ranks that fall out of step (one rank at a different collective than the others, e.g. a unit
// that runs on some ranks only) get an error naming every rank's position within seconds, instead of each waiting
// out the whole collective timeout and reporting a timeout that says nothing of the cause.
//
// [Note: comparing notes after the first deadline]
// Every collective issued on a communicator gets a sequence number (counted at issue, per communicator) and a
// Position: (seq, signature = kinds/counts/dtypes/ops, tag = where the caller is). A wait that finishes within the
// first deadline (a few seconds) costs nothing extra. A wait that passes it publishes a note "waiting at <position>"
// under <prefix>/note/<rank> in a key-value store every rank reaches (the c10d Store), then polls every rank's
// note every poll interval while it goes on waiting:
//   - every rank waiting, all at the same position: slow ranks, not a desync; keep waiting up to the timeout;
//   - some rank not waiting (computing, or slow to arrive): keep waiting;
//   - every rank waiting, not all at the same position, and the same notes (same versions) seen at two polls in a
//     row: a desync. The rank writes the verdict under <prefix>/verdict and returns Aborted naming every rank's
//     position; the others see the verdict (or reach the same one) at their next poll, so all ranks raise at once.
// A rank whose wait finishes after it published rewrites its note as "running". Notes carry a version, and the
// verdict needs two identical polls, so a note that is stale for the microseconds between a wait finishing and
// its note being rewritten is never taken for a desync. At the timeout the DeadlineExceeded message says where
// the other ranks were, which already tells a hang from a slow rank.
//
// On the pg backend two ranks at different tessera collectives are stopped before the collective by the header
// exchange (see [Note: a header before every gloo collective] below), so there the notes matter for waits on
// something else: a rank that never arrives (computing, hung, or blocked outside tessera: see [Note: a peer blocked
// outside tessera]).
//
// The strict check (opt-in, TESSERA_DESYNC_CHECK=1) catches a mismatch at the first diverging collective, before
// any data is exchanged: before each collective every rank writes its position under <prefix>/fp/<seq>/<rank>,
// waits for every rank's, and compares. It costs a few store round trips per collective, so it is for debugging.
//
// Polling reads every rank's note, so the cost after the first deadline grows with the world size (one check and
// one multi-get per poll per rank); it is paid only by waits that are already abnormally long.
//
// [Note: a peer blocked outside tessera]
// A rank that is in no tessera collective has no note to compare: it may be computing (slow, e.g. saving a file
// while the others already wait in the next all-gather: legitimate), or blocked in a collective of the user's own
// on the group tessera was given (e.g. dist.barrier() while the others run an evaluation forward: a deadlock that
// would otherwise last the whole collective timeout). Telling them apart needs positive evidence, from the peer:
//   - a waiting rank that passed the first deadline asks: it rewrites <prefix>/ask with a new token at every poll;
//   - every rank runs a responder thread that reads <prefix>/ask every answer_interval (one store read; torch's
//     NCCL heartbeat monitor polls its store the same way) and, when the token changed, writes <prefix>/state/<rank>:
//     an answer counter, how many tessera collectives it issued, and how many collectives it issued on the user's
//     group (c10d's sequence number for that group, DesyncOptions::foreign_seq);
//   - the waiting rank at tessera collective #s calls a peer stuck elsewhere when the peer has not issued #s and has
//     issued more collectives on the user's group than this rank: a collective this rank never issued, so it cannot
//     finish while this rank waits here. The same answer (nothing issued since) must come back twice more, at least
//     two answer intervals apart, so a peer that issued such a collective asynchronously and is on its way to #s is
//     not called stuck. Then every rank's position is reported as a desync: "rank 1 is not in a tessera collective:
//     ...". Without that evidence (a computing peer issues nothing on the user's group) the wait goes on, and the
//     timeout still says where every rank was.
// Idle cost: one store read (one or two round trips) per answer_interval (1 s) per communicator per rank; a write
// per answer only while some rank asks.
//
// [Note: a header before every gloo collective]
// Two ranks at different collectives of tessera's own group would have gloo pair them by issue order: different sizes
// make gloo's transport thread throw (gloo::EnforceNotMet "Received data size doesn't match expected size"), which
// aborts the process; equal sizes silently mix unrelated data. So the pg backend exchanges a fixed-size header before
// every collective (Header(): the sequence number and a hash of the signature and tag, 16 bytes per rank, all-gathered:
// gloo's all-gather of a few bytes took 0.1-0.3 ms on the dev VM where its all-reduce took 1.2-1.7 ms) and issues the
// collective only if every rank's header was the same. Every rank sees the same gathered headers, so a mismatch raises
// Aborted (tessera.DesyncError) on every rank at the same collective, naming every rank's position (exchanged through
// the store), and no data moves. The caller's wait on the collective covers its header too (deadline, notes, watchdog);
// the cost: see pg_communicator.h.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "tessera/comm/communicator.h"

namespace tessera::comm {

// The small key-value store the ranks compare notes through (production: the c10d Store, comm/pg/c10d_store.h;
// C++ tests: InMemoryStore). Implementations must be thread-safe.
class KeyValueStore {
 public:
  virtual ~KeyValueStore() = default;
  virtual absl::Status Set(const std::string& key, const std::string& value) = 0;
  // The values of `keys`, in order; nullopt for a key not set. Never waits for a key to appear.
  virtual absl::StatusOr<std::vector<std::optional<std::string>>> TryGet(absl::Span<const std::string> keys) = 0;
  // Blocks until every key exists; DeadlineExceeded after `timeout`.
  virtual absl::Status Wait(absl::Span<const std::string> keys, absl::Duration timeout) = 0;
  // Removes `key` (OK when absent). Best effort for callers: a store that cannot delete returns Unimplemented.
  virtual absl::Status Delete(const std::string& key) = 0;
};

// A KeyValueStore in this process's memory, shared by rank threads in C++ tests.
class InMemoryStore final : public KeyValueStore {
 public:
  absl::Status Set(const std::string& key, const std::string& value) override;
  absl::StatusOr<std::vector<std::optional<std::string>>> TryGet(absl::Span<const std::string> keys) override;
  absl::Status Wait(absl::Span<const std::string> keys, absl::Duration timeout) override;
  absl::Status Delete(const std::string& key) override;
  int64_t num_keys() const;

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> values_;
};

// Where a rank is: the seq-th collective (group) issued on its communicator.
struct Position {
  int64_t seq = -1;
  std::string signature;  // e.g. "all_gather of 4 elements (float32)"; several for a fused group
  std::string tag;        // CollectiveOptions::tag, e.g. "forward all-gather of unit 'blocks.0'"; may be empty

  // "#12 forward all-gather of unit 'blocks.0' (all_gather of 4 elements (float32))", or without a tag
  // "#12 all_gather of 4 elements (float32)".
  std::string Describe() const;
  bool SameAs(const Position& o) const { return seq == o.seq && signature == o.signature && tag == o.tag; }
};

// The signature of a group of collectives: kinds, element counts, dtypes, reduce ops and roots.
std::string SignatureOf(absl::Span<const Collective> ops);

// Every desync error (Aborted) contains this; Python maps such errors to tessera.DesyncError (errors.py), since
// other layers report Aborted too.
inline constexpr char kDesyncMarker[] = "collectives out of step";

inline constexpr absl::Duration kDefaultDesyncFirstDeadline = absl::Seconds(5);  // Python: knobs

struct DesyncOptions {
  // Null: no diagnosis; waits behave as plain waits bounded by the timeout.
  std::shared_ptr<KeyValueStore> store;
  // Unique per communicator and identical on every rank of it (several groups and communicators share a store).
  std::string key_prefix;
  absl::Duration first_deadline = kDefaultDesyncFirstDeadline;
  absl::Duration poll_interval = absl::Milliseconds(500);
  // Compare every collective's position across ranks before it runs (needs a store).
  bool strict = false;
  // How many collectives this rank issued on the group the user calls torch.distributed collectives on (the group
  // tessera.shard was given; c10d's sequence number), or -1 when unknown. Null: none; a peer blocked outside tessera
  // is then found at the timeout only (see [Note: a peer blocked outside tessera]).
  std::function<int64_t()> foreign_seq;
  std::string foreign_name = "the user's group";  // that group, in messages
  // How often the responder thread looks for a question from a waiting rank (with a store and foreign_seq only).
  absl::Duration answer_interval = absl::Seconds(1);
};

// Waits up to the given duration for an operation: true when it finished, false while it still runs, or the
// operation's own error.
using WaitSlice = std::function<absl::StatusOr<bool>(absl::Duration)>;

// The per-communicator side of the protocol in [Note: comparing notes after the first deadline]. Thread-safe.
class DesyncMonitor {
 public:
  // Validates `options` (a strict check needs a store; durations > 0). `owner` names the communicator in messages.
  static absl::StatusOr<std::unique_ptr<DesyncMonitor>> Create(int rank, int size, std::string owner,
                                                               DesyncOptions options);

  ~DesyncMonitor();

  // The position of the next collective group issued (takes its sequence number).
  Position Next(absl::Span<const Collective> ops, const std::string& tag);

  // The fixed-size header every rank all-gathers before the collective at `pos` (see [Note: a header before every
  // gloo collective]): {seq, hash of the signature and tag}.
  static std::array<int64_t, 2> Header(const Position& pos);
  // OK if `gathered` (every rank's Header(), rank-major) says every rank is at `pos`; otherwise Aborted on every
  // rank, naming every rank's position (read through the store within `timeout`, when there is one).
  absl::Status CompareHeaders(const Position& pos, absl::Span<const int64_t> gathered, absl::Duration timeout);

  // Strict mode: OK once every rank reached `pos` at the same seq; Aborted naming every rank's position if any
  // differs; DeadlineExceeded if some rank does not reach seq within `timeout`. OK at once when not strict.
  absl::Status CheckAgreement(const Position& pos, absl::Duration timeout);

  // Waits for the operation at `pos` through `wait` for up to `timeout`: OK when it finished, the operation's own
  // error, Aborted for a desync, DeadlineExceeded at the timeout. `what` names the operation in messages.
  absl::Status Await(const Position& pos, const std::string& what, absl::Duration timeout, const WaitSlice& wait);

  bool enabled() const { return options_.store != nullptr; }
  bool strict() const { return options_.strict; }
  const std::string& key_prefix() const { return options_.key_prefix; }

 private:
  struct Note {
    bool waiting = false;
    int64_t version = 0;
    Position pos;
  };

  DesyncMonitor(int rank, int size, std::string owner, DesyncOptions options);

  std::string NoteKey(int rank) const;
  std::string VerdictKey() const;
  absl::Status Publish(bool waiting, const Position& pos, int64_t* version_out);
  // Every rank's note (nullopt: none yet) and the verdict, or the store's error.
  // With `answers`, also every rank's answer (see [Note: a peer blocked outside tessera]).
  absl::Status ReadNotes(std::vector<std::optional<std::string>>* raw, std::string* verdict,
                         std::vector<std::optional<std::string>>* answers);
  std::string Positions(const std::vector<std::optional<Note>>& notes) const;
  absl::Status Desync(const std::string& positions, const std::string& found_by);
  std::string AskKey() const { return options_.key_prefix + "/ask"; }
  std::string StateKey(int rank) const;
  void Respond();  // the responder thread's loop

  // What a peer said about itself (see [Note: a peer blocked outside tessera]).
  struct Answer {
    int64_t number = 0;   // its answer counter
    int64_t issued = 0;   // tessera collectives it issued on this communicator
    int64_t foreign = -1;  // collectives it issued on the user's group
  };
  static std::optional<Answer> DecodeAnswer(const std::optional<std::string>& raw);

  const int rank_;
  const int size_;
  const std::string owner_;
  const DesyncOptions options_;
  std::atomic<int64_t> next_seq_{0};
  std::mutex mu_;            // orders note writes of concurrent waits
  int64_t note_version_ = 0;  // guarded by mu_; the version of this rank's latest note
  std::atomic<int64_t> asks_{0};  // questions this rank asked (a fresh token each)
  // The responder thread (with a store and foreign_seq): stopped and joined by the destructor.
  std::mutex responder_mu_;
  std::condition_variable responder_cv_;
  bool responder_stop_ = false;  // guarded by responder_mu_
  std::thread responder_;
};

}  // namespace tessera::comm
