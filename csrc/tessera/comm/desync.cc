#include "tessera/comm/desync.h"

#include <algorithm>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "tessera/core/status.h"

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace tessera::comm {
namespace {

// Note and fingerprint values: "<W|R>\n<version>\n<seq>\n<signature>\n<tag>" (the tag last: it may hold anything).
std::string Encode(bool waiting, int64_t version, const Position& pos) {
  return absl::StrFormat("%s\n%d\n%d\n%s\n%s", waiting ? "W" : "R", version, pos.seq, pos.signature, pos.tag);
}

struct Decoded {
  bool waiting = false;
  int64_t version = 0;
  Position pos;
};

std::optional<Decoded> Decode(const std::string& raw) {
  std::vector<std::string> parts = absl::StrSplit(raw, absl::MaxSplits('\n', 4));
  Decoded d;
  if (parts.size() != 5 || (parts[0] != "W" && parts[0] != "R") || !absl::SimpleAtoi(parts[1], &d.version) ||
      !absl::SimpleAtoi(parts[2], &d.pos.seq)) {
    return std::nullopt;
  }
  d.waiting = parts[0] == "W";
  d.pos.signature = parts[3];
  d.pos.tag = parts[4];
  return d;
}

std::string OneSignature(const Collective& op) {
  std::string s = absl::StrFormat("%s of %d elements (%s)", CollectiveKindName(op.kind), op.input.count,
                                  DTypeName(op.input.dtype));
  if (op.kind == CollectiveKind::kAllReduce || op.kind == CollectiveKind::kReduceScatter) {
    s += op.op == ReduceOp::kAvg ? " avg" : " sum";
  }
  if (op.kind == CollectiveKind::kBroadcast) absl::StrAppendFormat(&s, " from root %d", op.root);
  return s;
}

}  // namespace

// ---- InMemoryStore ----------------------------------------------------------------------------------------------

absl::Status InMemoryStore::Set(const std::string& key, const std::string& value) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    values_[key] = value;
  }
  cv_.notify_all();
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::optional<std::string>>> InMemoryStore::TryGet(absl::Span<const std::string> keys) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::optional<std::string>> out;
  for (const std::string& k : keys) {
    auto it = values_.find(k);
    out.push_back(it == values_.end() ? std::nullopt : std::optional<std::string>(it->second));
  }
  return out;
}

absl::Status InMemoryStore::Wait(absl::Span<const std::string> keys, absl::Duration timeout) {
  std::unique_lock<std::mutex> lock(mu_);
  auto all = [&] {
    return std::all_of(keys.begin(), keys.end(), [&](const std::string& k) { return values_.count(k) > 0; });
  };
  if (!cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), all)) {
    return absl::DeadlineExceededError(
        absl::StrFormat("in-memory store: keys %s not all set within %s", absl::StrJoin(keys, ", "),
                        absl::FormatDuration(timeout)));
  }
  return absl::OkStatus();
}

absl::Status InMemoryStore::Delete(const std::string& key) {
  std::lock_guard<std::mutex> lock(mu_);
  values_.erase(key);
  return absl::OkStatus();
}

int64_t InMemoryStore::num_keys() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(values_.size());
}

// ---- Position ---------------------------------------------------------------------------------------------------

std::string Position::Describe() const {
  if (tag.empty()) return absl::StrFormat("#%d %s", seq, signature);
  return absl::StrFormat("#%d %s (%s)", seq, tag, signature);
}

std::string SignatureOf(absl::Span<const Collective> ops) {
  if (ops.size() == 1) return OneSignature(ops[0]);
  return absl::StrFormat("group of %d: %s", ops.size(), absl::StrJoin(ops, " + ", [](std::string* out, const Collective& op) {
                           out->append(OneSignature(op));
                         }));
}

// ---- DesyncMonitor ----------------------------------------------------------------------------------------------

DesyncMonitor::DesyncMonitor(int rank, int size, std::string owner, DesyncOptions options)
    : rank_(rank), size_(size), owner_(std::move(owner)), options_(std::move(options)) {}

absl::StatusOr<std::unique_ptr<DesyncMonitor>> DesyncMonitor::Create(int rank, int size, std::string owner,
                                                                     DesyncOptions options) {
  if (options.strict && options.store == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: the strict desync check needs a store to compare positions through; pass one", owner));
  }
  if (options.first_deadline <= absl::ZeroDuration() || options.poll_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: desync first deadline (%s) and poll interval (%s) must be > 0", owner,
        absl::FormatDuration(options.first_deadline), absl::FormatDuration(options.poll_interval)));
  }
  if (options.store != nullptr && options.key_prefix.empty()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: desync diagnosis needs a key prefix unique to this communicator (several share one store)", owner));
  }
  std::unique_ptr<DesyncMonitor> m(new DesyncMonitor(rank, size, std::move(owner), std::move(options)));
  if (m->enabled()) {
    // A note left under this prefix by an earlier job on a long-lived store must not pass for this rank's.
    int64_t ignored;
    TESSERA_RETURN_IF_ERROR_CTX(m->Publish(false, Position{}, &ignored), m->owner_, ": resetting the desync note");
    if (m->options_.foreign_seq) {
      if (m->options_.answer_interval <= absl::ZeroDuration()) {
        return absl::InvalidArgumentError(absl::StrFormat("%s: answer interval (%s) must be > 0", m->owner_,
                                                          absl::FormatDuration(m->options_.answer_interval)));
      }
      m->responder_ = std::thread([raw = m.get()] { raw->Respond(); });
    }
  }
  return m;
}

DesyncMonitor::~DesyncMonitor() {
  {
    std::lock_guard<std::mutex> lock(responder_mu_);
    responder_stop_ = true;
  }
  responder_cv_.notify_all();
  if (responder_.joinable()) responder_.join();
}

std::string DesyncMonitor::StateKey(int rank) const {
  return absl::StrFormat("%s/state/%d", options_.key_prefix, rank);
}

void DesyncMonitor::Respond() {
  // See [Note: a peer blocked outside tessera]. Store errors are ignored: the asking rank then finds nothing and
  // falls back to its timeout.
  std::string last_token;
  int64_t answers = 0;
  const std::vector<std::string> ask{AskKey()};
  std::unique_lock<std::mutex> lock(responder_mu_);
  while (!responder_cv_.wait_for(lock, absl::ToChronoNanoseconds(options_.answer_interval),
                                 [&] { return responder_stop_; })) {
    lock.unlock();
    absl::StatusOr<std::vector<std::optional<std::string>>> got = options_.store->TryGet(ask);
    if (got.ok() && (*got)[0].has_value() && *(*got)[0] != last_token) {
      last_token = *(*got)[0];
      (void)options_.store->Set(StateKey(rank_), absl::StrFormat("%d\n%d\n%d", ++answers, next_seq_.load(),
                                                                 options_.foreign_seq()));
    }
    lock.lock();
  }
}

std::optional<DesyncMonitor::Answer> DesyncMonitor::DecodeAnswer(const std::optional<std::string>& raw) {
  if (!raw.has_value()) return std::nullopt;
  std::vector<std::string> parts = absl::StrSplit(*raw, '\n');
  Answer a;
  if (parts.size() != 3 || !absl::SimpleAtoi(parts[0], &a.number) || !absl::SimpleAtoi(parts[1], &a.issued) ||
      !absl::SimpleAtoi(parts[2], &a.foreign)) {
    return std::nullopt;
  }
  return a;
}

std::array<int64_t, 2> DesyncMonitor::Header(const Position& pos) {
  const std::string text = absl::StrCat(pos.signature, "\n", pos.tag);
  return {pos.seq, static_cast<int64_t>(XXH3_64bits(text.data(), text.size()))};
}

absl::Status DesyncMonitor::CompareHeaders(const Position& pos, absl::Span<const int64_t> gathered,
                                           absl::Duration timeout) {
  const std::array<int64_t, 2> mine = Header(pos);
  std::vector<int> differ;
  for (int r = 0; r < size_; ++r) {
    if (2 * r + 1 >= static_cast<int>(gathered.size()) || gathered[2 * r] != mine[0] ||
        gathered[2 * r + 1] != mine[1]) {
      differ.push_back(r);
    }
  }
  if (differ.empty()) return absl::OkStatus();
  const std::string found_by = absl::StrFormat(
      "found by the header exchange before collective #%d, before any of its data moved", pos.seq);
  if (!enabled()) {
    return Desync(absl::StrFormat("rank %d is at %s; rank(s) %s at a different collective (pass a store to name "
                                  "every rank's position)", rank_, pos.Describe(), absl::StrJoin(differ, ", ")),
                  found_by);
  }
  // Every rank saw the same gathered headers, so every rank is here too: exchange positions through the store.
  auto key = [&](int r) { return absl::StrFormat("%s/at/%d/%d", options_.key_prefix, pos.seq, r); };
  TESSERA_RETURN_IF_ERROR_CTX(options_.store->Set(key(rank_), Encode(true, 0, pos)), owner_,
                              ": publishing this rank's position after a header mismatch");
  std::vector<std::string> keys;
  for (int r = 0; r < size_; ++r) keys.push_back(key(r));
  (void)options_.store->Wait(keys, std::min(timeout, absl::Seconds(30)));
  TESSERA_ASSIGN_OR_RETURN(std::vector<std::optional<std::string>> got, options_.store->TryGet(keys));
  std::vector<std::optional<Note>> notes(size_);
  for (int r = 0; r < size_; ++r) {
    std::optional<Decoded> d = got[r].has_value() ? Decode(*got[r]) : std::nullopt;
    if (d.has_value()) notes[r] = Note{true, d->version, d->pos};
  }
  return Desync(Positions(notes), found_by);
}

std::string DesyncMonitor::NoteKey(int rank) const { return absl::StrFormat("%s/note/%d", options_.key_prefix, rank); }
std::string DesyncMonitor::VerdictKey() const { return options_.key_prefix + "/verdict"; }

Position DesyncMonitor::Next(absl::Span<const Collective> ops, const std::string& tag) {
  return Position{next_seq_.fetch_add(1), SignatureOf(ops), tag};
}

absl::Status DesyncMonitor::Publish(bool waiting, const Position& pos, int64_t* version_out) {
  std::lock_guard<std::mutex> lock(mu_);
  *version_out = ++note_version_;
  return options_.store->Set(NoteKey(rank_), Encode(waiting, *version_out, pos));
}

absl::Status DesyncMonitor::ReadNotes(std::vector<std::optional<std::string>>* raw, std::string* verdict,
                                      std::vector<std::optional<std::string>>* answers) {
  std::vector<std::string> keys;
  for (int r = 0; r < size_; ++r) keys.push_back(NoteKey(r));
  keys.push_back(VerdictKey());
  if (answers != nullptr) {
    for (int r = 0; r < size_; ++r) keys.push_back(StateKey(r));
  }
  TESSERA_ASSIGN_OR_RETURN(std::vector<std::optional<std::string>> got, options_.store->TryGet(keys));
  if (answers != nullptr) {
    answers->assign(got.begin() + size_ + 1, got.end());
    got.resize(size_ + 1);
  }
  *verdict = got.back().value_or("");
  got.pop_back();
  *raw = std::move(got);
  return absl::OkStatus();
}

std::string DesyncMonitor::Positions(const std::vector<std::optional<Note>>& notes) const {
  std::vector<std::string> parts;
  for (int r = 0; r < size_; ++r) {
    const std::optional<Note>& n = notes[r];
    if (!n.has_value()) {
      parts.push_back(absl::StrFormat("rank %d has not reached this communicator", r));
    } else if (!n->waiting) {
      parts.push_back(
          absl::StrFormat("rank %d is not in a tessera collective of it (computing, or blocked elsewhere)", r));
    } else {
      parts.push_back(absl::StrFormat("rank %d is at %s", r, n->pos.Describe()));
    }
  }
  return absl::StrJoin(parts, ", ");
}

absl::Status DesyncMonitor::Desync(const std::string& positions, const std::string& found_by) {
  std::string msg = absl::StrFormat(
      "%s on %s (%d ranks), %s: %s; every rank must issue the same collectives in the same "
      "order (a unit that runs on some ranks only, or data-dependent routing?)",
      kDesyncMarker, owner_, size_, found_by, positions);
  // Best effort: the peers reach the same verdict from the same notes anyway.
  if (enabled()) (void)options_.store->Set(VerdictKey(), msg);
  return absl::AbortedError(absl::StrFormat("rank %d: %s", rank_, msg));
}

absl::Status DesyncMonitor::CheckAgreement(const Position& pos, absl::Duration timeout) {
  if (!options_.strict) return absl::OkStatus();
  KeyValueStore& store = *options_.store;
  auto key = [&](int64_t seq, int r) { return absl::StrFormat("%s/fp/%d/%d", options_.key_prefix, seq, r); };
  TESSERA_RETURN_IF_ERROR_CTX(store.Set(key(pos.seq, rank_), Encode(true, 0, pos)), owner_,
                              ": strict desync check of ", pos.Describe());
  // Every peer that wrote seq-1's fingerprint has read ours for seq-2 (it passed seq-1's check, which needed ours
  // for seq-1, written after we passed seq-2's), so that key can go: the store stays bounded.
  if (pos.seq >= 2) (void)store.Delete(key(pos.seq - 2, rank_));
  std::vector<std::string> keys;
  for (int r = 0; r < size_; ++r) keys.push_back(key(pos.seq, r));
  absl::Status waited = store.Wait(keys, timeout);
  TESSERA_ASSIGN_OR_RETURN(std::vector<std::optional<std::string>> got, store.TryGet(keys));
  std::vector<std::optional<Note>> notes(size_);
  std::vector<int> missing;
  bool differ = false;
  for (int r = 0; r < size_; ++r) {
    std::optional<Decoded> d = got[r].has_value() ? Decode(*got[r]) : std::nullopt;
    if (!d.has_value()) {
      missing.push_back(r);
      continue;
    }
    notes[r] = Note{true, d->version, d->pos};
    differ = differ || !d->pos.SameAs(pos);
  }
  if (differ) {
    return Desync(Positions(notes),
                  absl::StrFormat("found by the strict check (TESSERA_DESYNC_CHECK) before collective #%d", pos.seq));
  }
  if (!missing.empty()) {
    return absl::DeadlineExceededError(absl::StrFormat(
        "rank %d: strict desync check on %s: rank(s) %s did not reach collective #%d within %s (this rank is at %s)%s",
        rank_, owner_, absl::StrJoin(missing, ", "), pos.seq, absl::FormatDuration(timeout), pos.Describe(),
        waited.ok() ? "" : absl::StrCat(" [", waited.message(), "]")));
  }
  return absl::OkStatus();
}

absl::Status DesyncMonitor::Await(const Position& pos, const std::string& what, absl::Duration timeout,
                                  const WaitSlice& wait) {
  const absl::Time start = absl::Now();
  const absl::Time deadline = start + timeout;
  auto timed_out = [&](const std::string& others) {
    return absl::DeadlineExceededError(absl::StrFormat("%s did not finish within %s%s", what,
                                                       absl::FormatDuration(timeout), others));
  };
  const absl::Duration first = enabled() ? std::min(options_.first_deadline, timeout) : timeout;
  TESSERA_ASSIGN_OR_RETURN(bool done, wait(first));
  if (done) return absl::OkStatus();
  if (!enabled()) return timed_out("");

  int64_t my_version = 0;
  TESSERA_RETURN_IF_ERROR_CTX(Publish(true, pos, &my_version), owner_, ": publishing the desync note of ",
                              pos.Describe());
  // Leaves a "running" note if this wait's note is still the latest (a concurrent wait may have published since).
  auto finish = [&](absl::Status s) {
    std::lock_guard<std::mutex> lock(mu_);
    if (note_version_ == my_version) {
      (void)options_.store->Set(NoteKey(rank_), Encode(false, ++note_version_, pos));
    }
    return s;
  };
  // See [Note: a peer blocked outside tessera]: ask every poll, and keep per peer the first answer that showed it
  // blocked outside tessera (reset when a later answer differs).
  const bool ask = static_cast<bool>(options_.foreign_seq);
  std::vector<std::optional<Answer>> first_stuck(size_);
  std::vector<std::optional<std::string>> previous;
  std::string last_seen;
  while (true) {
    if (ask) (void)options_.store->Set(AskKey(), absl::StrFormat("%d:%d", rank_, asks_.fetch_add(1)));
    const absl::Duration left = deadline - absl::Now();
    if (left <= absl::ZeroDuration()) {
      return finish(timed_out(last_seen.empty() ? "" : absl::StrCat("; at the last look ", last_seen)));
    }
    absl::StatusOr<bool> slice = wait(std::min(options_.poll_interval, left));
    if (!slice.ok()) {
      // A peer that found the desync first may have exited, failing this collective: its verdict says why.
      std::vector<std::optional<std::string>> raw;
      std::string verdict;
      if (ReadNotes(&raw, &verdict, nullptr).ok() && !verdict.empty()) {
        return absl::AbortedError(absl::StrFormat("rank %d: %s", rank_, verdict));
      }
      return finish(slice.status());
    }
    if (*slice) return finish(absl::OkStatus());

    std::vector<std::optional<std::string>> raw, answers;
    std::string verdict;
    absl::Status read = ReadNotes(&raw, &verdict, ask ? &answers : nullptr);
    if (!read.ok()) {
      // The store lives in one rank's process (TCPStore): losing it usually means that rank is gone.
      return finish(absl::UnavailableError(absl::StrFormat(
          "%s: lost the store while comparing positions with the other ranks after %s (%s)%s", what,
          absl::FormatDuration(absl::Now() - start), read.message(),
          last_seen.empty() ? "" : absl::StrCat("; at the last look ", last_seen))));
    }
    if (!verdict.empty()) return absl::AbortedError(absl::StrFormat("rank %d: %s", rank_, verdict));
    std::vector<std::optional<Note>> notes(size_);
    bool all_waiting = true;
    bool all_same = true;
    for (int r = 0; r < size_; ++r) {
      std::optional<Decoded> d = raw[r].has_value() ? Decode(*raw[r]) : std::nullopt;
      if (d.has_value()) notes[r] = Note{d->waiting, d->version, d->pos};
      if (!d.has_value() || !d->waiting) {
        all_waiting = false;
        continue;
      }
      all_same = all_same && d->pos.SameAs(pos);
    }
    last_seen = Positions(notes);
    // Two identical reads in a row: no note is in its brief stale window between a wait finishing and its rewrite.
    const std::string waited_for = absl::StrFormat(
        "found after %s of waiting", absl::FormatDuration(absl::Trunc(absl::Now() - start, absl::Milliseconds(100))));
    if (all_waiting && !all_same && raw == previous) return Desync(last_seen, waited_for);
    previous = std::move(raw);
    if (!ask) continue;

    // A peer stuck outside tessera: not waiting in one of this communicator's collectives, #seq not issued, and
    // more collectives issued on the user's group than this rank (one this rank never issued).
    const int64_t my_foreign = options_.foreign_seq();
    std::vector<std::string> stuck;
    for (int r = 0; r < size_; ++r) {
      std::optional<Answer> a = DecodeAnswer(answers[r]);
      const bool blocked = r != rank_ && a.has_value() && !(notes[r].has_value() && notes[r]->waiting) &&
                           a->issued <= pos.seq && my_foreign >= 0 && a->foreign > my_foreign;
      if (!blocked) {
        first_stuck[r].reset();
        continue;
      }
      if (!first_stuck[r].has_value() || first_stuck[r]->issued != a->issued ||
          first_stuck[r]->foreign != a->foreign) {
        first_stuck[r] = a;
        continue;
      }
      if (a->number - first_stuck[r]->number < 2) continue;  // not yet seen unchanged long enough
      stuck.push_back(absl::StrFormat(
          "rank %d is not in a tessera collective: it issued %d collectives of its own (e.g. dist.barrier) on %s "
          "where this rank issued %d, so it is blocked in one this rank never issued, and it has not issued tessera "
          "collective #%d (%s)",
          r, a->foreign, options_.foreign_name, my_foreign, pos.seq,
          a->issued == 0 ? "none issued yet" : absl::StrFormat("its last was #%d", a->issued - 1)));
    }
    if (stuck.empty()) continue;
    std::vector<std::string> parts;
    for (int r = 0; r < size_; ++r) {
      bool named = false;
      for (const std::string& s : stuck) {
        if (absl::StartsWith(s, absl::StrFormat("rank %d ", r))) {
          parts.push_back(s);
          named = true;
        }
      }
      if (named) continue;
      if (r == rank_) {
        parts.push_back(absl::StrFormat("rank %d is at %s", r, pos.Describe()));
      } else if (notes[r].has_value() && notes[r]->waiting) {
        parts.push_back(absl::StrFormat("rank %d is at %s", r, notes[r]->pos.Describe()));
      } else {
        parts.push_back(absl::StrFormat("rank %d is not in a tessera collective of it (computing, or blocked "
                                        "elsewhere)", r));
      }
    }
    return Desync(absl::StrJoin(parts, ", "), waited_for);
  }
}

}  // namespace tessera::comm
