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
// The strict check (opt-in, TESSERA_DESYNC_CHECK=1) catches a mismatch at the first diverging collective, before
// any data is exchanged: before each collective every rank writes its position under <prefix>/fp/<seq>/<rank>,
// waits for every rank's, and compares. It costs a few store round trips per collective, so it is for debugging.
//
// Polling reads every rank's note, so the cost after the first deadline grows with the world size (one check and
// one multi-get per poll per rank); it is paid only by waits that are already abnormally long.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
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

  // The position of the next collective group issued (takes its sequence number).
  Position Next(absl::Span<const Collective> ops, const std::string& tag);

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
  absl::Status ReadNotes(std::vector<std::optional<std::string>>* raw, std::string* verdict);
  std::string Positions(const std::vector<std::optional<Note>>& notes) const;
  absl::Status Desync(const std::string& positions, const std::string& found_by);

  const int rank_;
  const int size_;
  const std::string owner_;
  const DesyncOptions options_;
  std::atomic<int64_t> next_seq_{0};
  std::mutex mu_;            // orders note writes of concurrent waits
  int64_t note_version_ = 0;  // guarded by mu_; the version of this rank's latest note
};

}  // namespace tessera::comm
