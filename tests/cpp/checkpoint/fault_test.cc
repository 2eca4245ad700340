// Real faults: bit flips and truncation of committed files (DataLoss naming file and tensor), a full disk via
// RLIMIT_FSIZE in a child process (ResourceExhausted), and a read-only root (PermissionDenied).
#include <fcntl.h>
#include <linux/fs.h>
#include <signal.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/wait.h>

#include "checkpoint/checkpoint_testing.h"
#include "tessera/checkpoint/format.h"

namespace tessera::checkpoint {
namespace {

using testing::Contains;
using testing::DefaultTensors;
using testing::Local;
using testing::PathExists;
using testing::ReadsBack;
using testing::RefTensor;
using testing::SaveAllRanks;
using testing::TempDir;

void FlipByte(const std::string& path, int64_t offset) {
  int fd = ::open(path.c_str(), O_RDWR);
  ASSERT_GE(fd, 0) << path;
  uint8_t b;
  ASSERT_EQ(::pread(fd, &b, 1, offset), 1);
  b ^= 0x10;
  ASSERT_EQ(::pwrite(fd, &b, 1, offset), 1);
  ::close(fd);
}

class FaultTest : public ::testing::Test {
 protected:
  void SetUp() override {
    for (const absl::Status& s : SaveAllRanks(dir_.path(), 3, 2, tensors_)) ASSERT_TRUE(s.ok()) << s;
    auto reader = CheckpointReader::Open(Local(dir_.path()), 3);
    ASSERT_TRUE(reader.ok());
    manifest_ = (*reader)->manifest();
  }
  // The first piece of `name` stored in rank-00001.bin.
  PieceEntry PieceInRank1(const std::string& name) {
    for (const TensorEntry& t : manifest_.tensors) {
      if (t.name != name) continue;
      for (const PieceEntry& p : t.pieces) {
        if (manifest_.files[p.file].rank == 1) return p;
      }
    }
    ADD_FAILURE() << "no piece of " << name << " in rank 1";
    return {};
  }

  TempDir dir_;
  const std::vector<RefTensor> tensors_ = DefaultTensors();
  Manifest manifest_;
};

TEST_F(FaultTest, FlippedDataByteIsDataLossNamingFileAndTensor) {
  const PieceEntry p = PieceInRank1("model/emb");
  FlipByte(dir_ / "step-0000000003/rank-00001.bin", p.offset + 3);
  auto reader = CheckpointReader::Open(Local(dir_.path()), 3);
  ASSERT_TRUE(reader.ok()) << reader.status();  // sizes and headers are intact
  const RefTensor& emb = tensors_[2];
  std::vector<uint8_t> out(static_cast<size_t>(emb.numel() * 2));
  absl::Status s = (*reader)->Read("model/emb", 0, BufferView{out.data(), DType::kBFloat16, emb.numel(), {}});
  ASSERT_TRUE(absl::IsDataLoss(s)) << s;
  const std::string msg(s.message());
  EXPECT_TRUE(Contains(msg, "checksum mismatch in " + (dir_ / "step-0000000003/rank-00001.bin")));
  EXPECT_TRUE(Contains(msg, "tensor 'model/emb'"));
  EXPECT_TRUE(Contains(msg, absl::StrFormat("elements [%d, %d)", p.start, p.start + p.count)));
  // Ranges that do not touch the damaged piece still read; a read of part of it fails too.
  EXPECT_TRUE(ReadsBack(**reader, emb, 0, p.start));
  EXPECT_FALSE((*reader)->Read("model/emb", p.start + 1, BufferView{out.data(), DType::kBFloat16, 1, {}}).ok());
  EXPECT_TRUE(absl::IsDataLoss((*reader)->VerifyAll()));
}

TEST_F(FaultTest, TruncatedFileIsDataLossAtOpenNamingFileAndTensor) {
  const std::string path = dir_ / "step-0000000003/rank-00000.bin";
  ASSERT_EQ(::truncate(path.c_str(), manifest_.files[0].bytes - 5), 0);
  auto reader = CheckpointReader::Open(Local(dir_.path()), 3);
  ASSERT_TRUE(absl::IsDataLoss(reader.status())) << reader.status();
  const std::string msg(reader.status().message());
  EXPECT_TRUE(Contains(msg, path));
  EXPECT_TRUE(Contains(msg, "truncated"));
  EXPECT_TRUE(Contains(msg, "tensor '"));
}

TEST_F(FaultTest, DamagedHeaderOrManifestIsDataLoss) {
  FlipByte(dir_ / "step-0000000003/rank-00001.bin", 30);  // inside the header (step field)
  auto reader = CheckpointReader::Open(Local(dir_.path()), 3);
  ASSERT_TRUE(absl::IsDataLoss(reader.status())) << reader.status();
  EXPECT_TRUE(Contains(std::string(reader.status().message()), "rank-00001.bin"));
  FlipByte(dir_ / "step-0000000003/rank-00001.bin", 30);  // undo
  ASSERT_TRUE(CheckpointReader::Open(Local(dir_.path()), 3).ok());
  const std::string manifest = dir_ / "step-0000000003/manifest.json";
  ASSERT_EQ(::truncate(manifest.c_str(), 100), 0);
  reader = CheckpointReader::Open(Local(dir_.path()), 3);
  ASSERT_TRUE(absl::IsDataLoss(reader.status())) << reader.status();
  EXPECT_TRUE(Contains(std::string(reader.status().message()), manifest));
}

TEST(DiskFullTest, FileSizeLimitIsResourceExhaustedAndCommitsNothing) {
  TempDir dir;
  const std::vector<RefTensor> tensors = {testing::MakeTensor("big", DType::kFloat32, {1 << 20}, 1)};  // 4 MiB
  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(fds[0]);
    struct rlimit lim = {1 << 20, 1 << 20};  // 1 MiB per file
    ::setrlimit(RLIMIT_FSIZE, &lim);
    ::signal(SIGXFSZ, SIG_IGN);  // writes past the limit then fail with EFBIG instead of killing us
    absl::Status s = SaveAllRanks(dir.path(), 1, 1, tensors)[0];
    const std::string msg(s.message());
    (void)!::write(fds[1], msg.data(), msg.size());
    ::_exit(static_cast<int>(s.code()));
  }
  ::close(fds[1]);
  std::string msg;
  char buf[512];
  for (ssize_t n; (n = ::read(fds[0], buf, sizeof(buf))) > 0;) msg.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int wstatus = 0;
  ASSERT_EQ(::waitpid(pid, &wstatus, 0), pid);
  ASSERT_TRUE(WIFEXITED(wstatus));
  EXPECT_EQ(WEXITSTATUS(wstatus), static_cast<int>(absl::StatusCode::kResourceExhausted)) << msg;
  EXPECT_TRUE(Contains(msg, "disk full or file size limit while writing " +
                                (dir / ".tmp-step-0000000001/rank-00000.bin")));
  EXPECT_FALSE(PathExists(dir / "step-0000000001"));
  EXPECT_FALSE(PathExists(dir / "latest"));
}

// Sets or clears the immutable inode flag (chattr +i): the one way to make a directory unwritable for root
// without mounting anything. False where the file system or the capabilities don't allow it.
bool SetImmutable(const std::string& dir, bool on) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd < 0) return false;
  int flags = 0;
  bool ok = ::ioctl(fd, FS_IOC_GETFLAGS, &flags) == 0;
  if (ok) {
    flags = on ? (flags | FS_IMMUTABLE_FL) : (flags & ~FS_IMMUTABLE_FL);
    ok = ::ioctl(fd, FS_IOC_SETFLAGS, &flags) == 0;
  }
  ::close(fd);
  return ok;
}

TEST(ReadOnlyTest, UnwritableRootIsPermissionDeniedNamingThePath) {
  TempDir dir;
  const std::string root = dir / "ckpt";
  ASSERT_EQ(::mkdir(root.c_str(), 0555), 0);
  bool immutable = false;
  if (::access(root.c_str(), W_OK) == 0) {  // root ignores permission bits
    immutable = SetImmutable(root, true);
    if (!immutable) {
      GTEST_SKIP() << "running as euid " << ::geteuid() << ": permission bits are not enforced and the immutable "
                   << "flag (chattr +i) is not available here, so an unwritable root cannot be simulated";
    }
  }
  const std::vector<RefTensor> tensors = {testing::MakeTensor("w", DType::kFloat32, {4}, 1)};
  absl::Status s = SaveAllRanks(root, 1, 1, tensors)[0];
  if (immutable) SetImmutable(root, false);
  EXPECT_TRUE(absl::IsPermissionDenied(s)) << s;
  EXPECT_TRUE(Contains(std::string(s.message()), root + "/.tmp-step-0000000001")) << s;
}

}  // namespace
}  // namespace tessera::checkpoint
