// A small storage interface the checkpoint engine writes and reads through, so local disks, shared file systems
// and (later) object stores plug in without touching the engine. Paths are relative to the storage root, '/'
// separated. Errors: NotFound, PermissionDenied, ResourceExhausted (disk full / file size limit), Internal.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tessera::checkpoint {

// Alignment of offsets, sizes and buffers for direct (O_DIRECT) writes.
inline constexpr int64_t kDirectIOAlign = 4096;

class WritableFile {
 public:
  virtual ~WritableFile() = default;
  virtual absl::Status Append(const void* data, int64_t bytes) = 0;
  // Writes at an absolute offset (pwrite), so the writer pool can fill precomputed piece offsets concurrently.
  // Storages that cannot (object stores) keep the default, which returns Unimplemented. Independent of Append's
  // position; don't mix the two on one file.
  virtual absl::Status WriteAt(int64_t offset, const void* data, int64_t bytes);
  // Sets the file's size (used after direct writes, which must cover whole blocks).
  virtual absl::Status Truncate(int64_t bytes);
  // Whether writes bypass the page cache (O_DIRECT): offsets, sizes and buffers must then be kDirectIOAlign-aligned.
  virtual bool direct() const { return false; }
  virtual absl::Status Sync() = 0;   // durable on return (fdatasync)
  virtual absl::Status Close() = 0;  // idempotent
};

class Storage {
 public:
  virtual ~Storage() = default;
  virtual std::string Describe(const std::string& path) const = 0;  // full path for messages
  virtual absl::StatusOr<std::unique_ptr<WritableFile>> Create(const std::string& path) = 0;  // truncates
  // Like Create, but asks for writes that bypass the page cache where the file system supports it (see direct()).
  virtual absl::StatusOr<std::unique_ptr<WritableFile>> CreateForDirectIO(const std::string& path) {
    return Create(path);
  }
  virtual absl::StatusOr<std::string> ReadAll(const std::string& path) = 0;
  // Reads exactly `bytes` at `offset` into dst; DataLoss naming the file if it is shorter.
  virtual absl::Status ReadAt(const std::string& path, int64_t offset, int64_t bytes, void* dst) = 0;
  virtual absl::StatusOr<int64_t> Size(const std::string& path) = 0;
  virtual absl::StatusOr<bool> Exists(const std::string& path) = 0;
  virtual absl::StatusOr<std::vector<std::string>> List(const std::string& dir) = 0;  // names, not paths
  virtual absl::Status MakeDirs(const std::string& dir) = 0;
  // Atomic replace of `to` by `from` (files or directories), then the parent directory is synced.
  virtual absl::Status Rename(const std::string& from, const std::string& to) = 0;
  virtual absl::Status RemoveAll(const std::string& path) = 0;
  virtual absl::Status SyncDir(const std::string& dir) = 0;
  // Writes `data` to `path` durably and atomically (temporary file, fsync, rename, directory sync).
  absl::Status WriteAtomically(const std::string& path, const std::string& data);
};

// POSIX files under `root` (local disks and shared file systems such as NFS/Lustre).
absl::StatusOr<std::shared_ptr<Storage>> NewLocalStorage(const std::string& root);

}  // namespace tessera::checkpoint
