// Helpers for checkpoint tests: a temporary root, reference tensors with known bytes, and a save driven by one
// thread per rank (each rank its own CheckpointWriter on the same root, as separate processes would be).
#pragma once

#include <sys/stat.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "gtest/gtest.h"
#include "tessera/checkpoint/reader.h"
#include "tessera/checkpoint/storage.h"
#include "tessera/checkpoint/writer.h"
#include "tessera/core/status.h"

namespace tessera::checkpoint::testing {

class TempDir {
 public:
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "tessera-ckpt-XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    TESSERA_CHECK(p != nullptr, "mkdtemp failed");
    path_ = p;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::permissions(path_, std::filesystem::perms::owner_all, std::filesystem::perm_options::add, ec);
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

// A logical tensor and its full contents (independent reference for every read).
struct RefTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  int64_t esize() const { return ElementSize(dtype); }
};

inline RefTensor MakeTensor(const std::string& name, DType dtype, std::vector<int64_t> shape, uint32_t seed) {
  RefTensor t{name, dtype, std::move(shape), {}};
  t.bytes.resize(static_cast<size_t>(t.numel() * t.esize()));
  uint32_t x = seed * 2654435761u + 12345u;
  for (uint8_t& b : t.bytes) {
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    b = static_cast<uint8_t>(x);
  }
  return t;
}

inline std::vector<RefTensor> DefaultTensors() {
  return {MakeTensor("model/w1", DType::kFloat32, {37, 19}, 1), MakeTensor("model/b1", DType::kFloat32, {19}, 2),
          MakeTensor("model/emb", DType::kBFloat16, {101, 8}, 3), MakeTensor("optim/step", DType::kFloat64, {}, 4),
          MakeTensor("optim/m", DType::kFloat16, {5, 7, 3}, 5), MakeTensor("empty", DType::kFloat32, {0, 4}, 6),
          MakeTensor("tiny", DType::kFloat64, {2}, 7)};
}

// Rank r of `world` holds elements [numel*r/world, numel*(r+1)/world) of every tensor, split into two pieces
// (listed second half first, to exercise ordering), so a tensor has up to 2 * world pieces.
inline std::vector<SavePiece> ShardPieces(const std::vector<RefTensor>& tensors, int rank, int world) {
  std::vector<SavePiece> out;
  for (const RefTensor& t : tensors) {
    const int64_t n = t.numel();
    const int64_t lo = n * rank / world, hi = n * (rank + 1) / world, mid = (lo + hi) / 2;
    auto piece = [&](int64_t a, int64_t b) {
      BufferView v{const_cast<uint8_t*>(t.bytes.data()) + a * t.esize(), t.dtype, b - a, Device::CPU()};
      out.push_back(SavePiece{t.name, t.shape, a, v});
    };
    piece(mid, hi);
    piece(lo, mid);
  }
  return out;
}

inline std::shared_ptr<Storage> Local(const std::string& root) {
  auto s = NewLocalStorage(root);
  TESSERA_CHECK(s.ok(), s.status().ToString());
  return *s;
}

// Saves `step` with `world` ranks on threads (ranks listed in `ranks`, default all); returns each rank's Wait().
// One rank's save of `tensors` (its share of them) with a writer of its own; returns what Wait() returned.
inline absl::Status SaveAsRank(const std::string& root, int64_t step, int world, int rank,
                               const std::vector<RefTensor>& tensors, WriterOptions options = {},
                               int64_t attempt = 0) {
  auto writer = CheckpointWriter::Create(Local(root), options);
  if (!writer.ok()) return writer.status();
  SaveRequest req;
  req.step = step;
  req.rank = rank;
  req.world_size = world;
  req.attempt = attempt;
  req.pieces = ShardPieces(tensors, rank, world);
  req.rank_json = "{\"rng\": " + std::to_string(100 + rank) + "}";
  req.global_json = "{\"epoch\": 3}";
  auto handle = (*writer)->Save(std::move(req));
  if (!handle.ok()) return handle.status();
  return (*handle)->Wait();
}

// SaveAsRank for each of `ranks` (default: all) at once, on threads.
inline std::vector<absl::Status> SaveAllRanks(const std::string& root, int64_t step, int world,
                                              const std::vector<RefTensor>& tensors, WriterOptions options = {},
                                              std::vector<int> ranks = {}, int64_t attempt = 0) {
  if (ranks.empty()) {
    for (int r = 0; r < world; ++r) ranks.push_back(r);
  }
  std::vector<absl::Status> result(ranks.size());
  std::vector<std::thread> threads;
  for (size_t i = 0; i < ranks.size(); ++i) {
    threads.emplace_back([&, i] { result[i] = SaveAsRank(root, step, world, ranks[i], tensors, options, attempt); });
  }
  for (auto& t : threads) t.join();
  return result;
}

inline ::testing::AssertionResult Contains(const std::string& s, const std::string& sub) {
  if (s.find(sub) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "'" << sub << "' not in: " << s;
}

// Element range [start, start + count) of `t` read through `reader`, compared bytewise with the reference.
inline ::testing::AssertionResult ReadsBack(CheckpointReader& reader, const RefTensor& t, int64_t start,
                                            int64_t count) {
  std::vector<uint8_t> out(static_cast<size_t>(count * t.esize()) + 1, 0xAB);
  absl::Status s = reader.Read(t.name, start, BufferView{out.data(), t.dtype, count, Device::CPU()});
  if (!s.ok()) return ::testing::AssertionFailure() << t.name << " [" << start << ", +" << count << "): " << s;
  if (count > 0 &&
      std::memcmp(out.data(), t.bytes.data() + start * t.esize(), static_cast<size_t>(count * t.esize())) != 0) {
    return ::testing::AssertionFailure() << t.name << " [" << start << ", +" << count << "): bytes differ";
  }
  if (out.back() != 0xAB) return ::testing::AssertionFailure() << t.name << ": wrote past the destination";
  return ::testing::AssertionSuccess();
}

inline bool PathExists(const std::string& p) { return std::filesystem::exists(p); }

inline std::string ReadFile(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

}  // namespace tessera::checkpoint::testing
