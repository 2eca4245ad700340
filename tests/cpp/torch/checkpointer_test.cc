// tessera::checkpoint::Checkpointer (csrc/tessera/api/checkpointer.h) over hand-made CheckpointTensors: 2 ranks as
// threads agreeing through an InMemoryStore, round trips compared bit for bit against the saved values (also
// loaded on another number of ranks), fallback past a damaged checkpoint, mismatches, and the checkpoints the
// Python interop test (tests/python/checkpoint/test_cpp_checkpoint_format.py) exchanges with Python.
#include "tessera/api/checkpointer.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <fstream>
#include <thread>

#include <ATen/ATen.h>

#include <nlohmann/json.hpp>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tessera/checkpoint/storage.h"
#include "tessera/core/status.h"

namespace tessera::checkpoint {
namespace {

// A fresh directory, removed at the end. (Not std::filesystem: libtorch.so exports its own copy of
// std::filesystem::remove_all, which crashed here when the test bound to it.)
class TempRoot {
 public:
  explicit TempRoot(const std::string& name) {
    const char* tmp = std::getenv("TMPDIR");
    std::string tmpl = absl::StrCat(tmp != nullptr ? tmp : "/tmp", "/tessera_ckptr_", name, "_XXXXXX");
    TESSERA_CHECK(::mkdtemp(tmpl.data()) != nullptr, "mkdtemp failed");
    path_ = tmpl;
  }
  ~TempRoot() {
    auto storage = NewLocalStorage(path_);
    if (storage.ok()) (void)(*storage)->RemoveAll("");
  }
  std::string string() const { return path_; }
  std::string operator/(const std::string& rel) const { return path_ + "/" + rel; }

 private:
  std::string path_;
};

bool Exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

// Runs fn(rank) on one thread per rank; returns each rank's status.
std::vector<absl::Status> OnRanks(int world, const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> out(world);
  std::vector<std::thread> threads;
  for (int r = 0; r < world; ++r) threads.emplace_back([&, r] { out[r] = fn(r); });
  for (auto& t : threads) t.join();
  return out;
}

#define EXPECT_ALL_OK(statuses)                                                      \
  for (size_t _r = 0; _r < (statuses).size(); ++_r) EXPECT_TRUE((statuses)[_r].ok()) \
      << "rank " << _r << ": " << (statuses)[_r]

// The full tensors a "model" of three parameters holds (distinct, non-trivial bits in every element).
struct Full {
  at::Tensor w = at::arange(20, at::kFloat).mul(0.37).sin().reshape({4, 5});  // sharded 10 / 10
  at::Tensor b = at::arange(3, at::kDouble).mul(1.0 / 3);                      // sharded 2 / 1, float64
  at::Tensor h = at::arange(6, at::kFloat).to(at::kBFloat16).mul(0.1);          // sharded 3 / 3, bfloat16
  at::Tensor w_m = at::arange(20, at::kFloat).mul(-0.01);                       // exp_avg of w
  at::Tensor w_v = at::arange(20, at::kFloat).mul(0.001).square();              // exp_avg_sq of w
};

struct RankState {
  std::vector<CheckpointTensor> model, optim;
  std::map<std::string, int64_t> train;
  std::string optim_json;       // what optim_json() hands out / load_optim_json() received
  int optim_json_loads = 0;

  CheckpointContents Contents() {
    CheckpointContents c;
    c.model = model;
    c.optim = optim;
    c.optim_json = [this] { return optim_json; };
    c.load_optim_json = [this](const std::string& j) {
      optim_json = j;
      ++optim_json_loads;
      return absl::OkStatus();
    };
    c.train = &train;
    return c;
  }
};

// Rank `rank` of `world`'s part of `full` ([start, start + count) of the flattened tensor, equal split with the
// remainder on the last rank): a CheckpointTensor whose local holds that range (a copy, or zeros with `blank`).
CheckpointTensor Part(const std::string& name, const at::Tensor& full, int rank, int world, bool blank) {
  const int64_t n = full.numel();
  const int64_t per = (n + world - 1) / world;
  const int64_t start = std::min<int64_t>(n, per * rank);
  const int64_t count = std::min<int64_t>(n, start + per) - start;
  CheckpointTensor t;
  t.name = name;
  t.shape = full.sizes().vec();
  t.local = blank ? at::zeros({count}, full.options()) : full.reshape(-1).narrow(0, start, count).clone();
  t.save_offset = 0;
  t.save_start = start;
  t.save_count = count;
  t.load_start = start;
  return t;
}

RankState MakeRank(const Full& f, int rank, int world, bool blank) {
  RankState s;
  s.model = {Part("model/w", f.w, rank, world, blank), Part("model/b", f.b, rank, world, blank),
             Part("model/h", f.h, rank, world, blank)};
  s.optim = {Part("optim/w/exp_avg", f.w_m, rank, world, blank), Part("optim/w/exp_avg_sq", f.w_v, rank, world, blank)};
  s.optim[0].shape = s.optim[1].shape = {4, 5};
  if (!blank) {
    s.train = {{"step", 10}, {"tokens", 1234}};
    s.optim_json = R"({"groups":[{"hyper":{"lr":0.001,"betas":[0.9,0.999],"eps":1e-08,"weight_decay":0.01},)"
                   R"("params":["w","b","h"]}],"scalars":{"w":{"step":3}}})";
  }
  return s;
}

bool BitEqual(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.numel() == b.numel() &&
         std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(), a.nbytes()) == 0;
}

absl::Status CheckEqual(const RankState& got, const RankState& want) {
  for (size_t i = 0; i < want.model.size(); ++i) {
    if (!BitEqual(got.model[i].local, want.model[i].local)) return absl::InternalError(want.model[i].name + " differs");
  }
  for (size_t i = 0; i < want.optim.size(); ++i) {
    if (!BitEqual(got.optim[i].local, want.optim[i].local)) return absl::InternalError(want.optim[i].name + " differs");
  }
  if (got.train != want.train) return absl::InternalError("train differs");
  if (nlohmann::json::parse(got.optim_json) != nlohmann::json::parse(want.optim_json)) {
    return absl::InternalError("optim json differs: " + got.optim_json);
  }
  return absl::OkStatus();
}

// Saves steps 5 and 10 (step 5 with different train values) from 2 ranks.
void SaveTwoSteps(const TempRoot& root, std::shared_ptr<comm::KeyValueStore> store, const Full& f) {
  auto st = OnRanks(2, [&](int r) -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(root.string(), r, 2, store));
    RankState s = MakeRank(f, r, 2, false);
    s.train["step"] = 5;
    TESSERA_RETURN_IF_ERROR(ck->Save(5, s.Contents()));
    s.train["step"] = 10;
    TESSERA_RETURN_IF_ERROR(ck->Save(10, s.Contents()));
    return ck->Wait();
  });
  EXPECT_ALL_OK(st);
}

TEST(Checkpointer, RoundTripTwoRanksBitExact) {
  const TempRoot root("roundtrip");
  auto store = std::make_shared<comm::InMemoryStore>();
  Full f;
  SaveTwoSteps(root, store, f);
  EXPECT_TRUE(Exists(root / "step-0000000010/manifest.json"));
  auto st = OnRanks(2, [&](int r) -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(root.string(), r, 2, store));
    RankState got = MakeRank(f, r, 2, true);
    TESSERA_ASSIGN_OR_RETURN(std::optional<int64_t> step, ck->LoadLatest(got.Contents()));
    if (step != 10) return absl::InternalError("loaded step " + std::to_string(step.value_or(-1)));
    return CheckEqual(got, MakeRank(f, r, 2, false));
  });
  EXPECT_ALL_OK(st);

  // The same checkpoint on one rank (resharding): the full tensors.
  auto ck = Checkpointer::Create(root.string(), 0, 1, nullptr);
  ASSERT_TRUE(ck.ok()) << ck.status();
  RankState one = MakeRank(f, 0, 1, true);
  ASSERT_TRUE((*ck)->Load(5, one.Contents()).ok());
  EXPECT_TRUE(CheckEqual(one, [&] { RankState w = MakeRank(f, 0, 1, false); w.train["step"] = 5; return w; }()).ok());
}

TEST(Checkpointer, NoCheckpointIsNullopt) {
  const TempRoot root("empty");
  auto store = std::make_shared<comm::InMemoryStore>();
  Full f;
  auto st = OnRanks(2, [&](int r) -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(root.string(), r, 2, store));
    RankState s = MakeRank(f, r, 2, true);
    TESSERA_ASSIGN_OR_RETURN(std::optional<int64_t> step, ck->LoadLatest(s.Contents()));
    if (step.has_value()) return absl::InternalError("expected no checkpoint");
    return s.optim_json_loads == 0 ? absl::OkStatus() : absl::InternalError("optimizer JSON loaded");
  });
  EXPECT_ALL_OK(st);
}

TEST(Checkpointer, CorruptNewestFallsBackToOlder) {
  const TempRoot root("corrupt");
  auto store = std::make_shared<comm::InMemoryStore>();
  Full f;
  SaveTwoSteps(root, store, f);
  {  // one bit of rank 1's data in step 10 (past the 64-byte header): only rank 1 reads it
    std::fstream file(root / "step-0000000010/rank-00001.bin", std::ios::in | std::ios::out | std::ios::binary);
    file.seekg(64 + 8);
    char c = 0;
    file.read(&c, 1);
    c ^= 0x10;
    file.seekp(64 + 8);
    file.write(&c, 1);
  }
  auto st = OnRanks(2, [&](int r) -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(root.string(), r, 2, store));
    RankState got = MakeRank(f, r, 2, true);
    TESSERA_ASSIGN_OR_RETURN(std::optional<int64_t> step, ck->LoadLatest(got.Contents()));
    if (step != 5) return absl::InternalError("loaded step " + std::to_string(step.value_or(-1)));
    RankState want = MakeRank(f, r, 2, false);
    want.train["step"] = 5;
    return CheckEqual(got, want);
  });
  EXPECT_ALL_OK(st);

  // Load(10) fails on both ranks with rank 1's DataLoss naming the file.
  auto bad = OnRanks(2, [&](int r) -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(root.string(), r, 2, store));
    RankState got = MakeRank(f, r, 2, true);
    return ck->Load(10, got.Contents());
  });
  for (const absl::Status& s : bad) {
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_NE(s.message().find("rank 1:"), absl::string_view::npos) << s;
    EXPECT_NE(s.message().find("rank-00001.bin"), absl::string_view::npos) << s;
  }
}

TEST(Checkpointer, MismatchNamesTheTensorAndChangesNothing) {
  const TempRoot root("mismatch");
  Full f;
  auto ck = Checkpointer::Create(root.string(), 0, 1, nullptr);
  ASSERT_TRUE(ck.ok()) << ck.status();
  RankState s = MakeRank(f, 0, 1, false);
  ASSERT_TRUE((*ck)->Save(3, s.Contents()).ok());
  ASSERT_TRUE((*ck)->Wait().ok());

  RankState got = MakeRank(f, 0, 1, true);
  got.model[0].shape = {5, 4};
  got.model[1].local.fill_(7.0);
  got.train = {{"step", 99}};
  got.optim_json = R"({"mine":1})";
  absl::StatusOr<std::optional<int64_t>> r = (*ck)->LoadLatest(got.Contents());
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(r.status().message().find("model/w: checkpoint (4, 5) float32, model (5, 4) float32"),
            absl::string_view::npos) << r.status();
  EXPECT_NE(r.status().message().find("step 3"), absl::string_view::npos) << r.status();
  EXPECT_TRUE(at::equal(got.model[1].local, at::full({3}, 7.0, at::kDouble)));
  EXPECT_EQ(got.train, (std::map<std::string, int64_t>{{"step", 99}}));
  EXPECT_EQ(got.optim_json, R"({"mine":1})");

  // A model with a parameter the checkpoint lacks, and one without a parameter it has.
  RankState extra = MakeRank(f, 0, 1, true);
  extra.model.push_back(Part("model/new", at::ones({2}), 0, 1, true));
  extra.model.erase(extra.model.begin() + 1);  // model/b
  absl::Status e = (*ck)->Load(3, extra.Contents());
  EXPECT_NE(e.message().find("missing from checkpoint: ['model/new']"), absl::string_view::npos) << e;
  EXPECT_NE(e.message().find("not in the model: ['model/b']"), absl::string_view::npos) << e;
}

TEST(Checkpointer, OptimizerStateTheCheckpointLacksIsZeroed) {
  const TempRoot root("optzero");
  Full f;
  auto ck = Checkpointer::Create(root.string(), 0, 1, nullptr);
  ASSERT_TRUE(ck.ok()) << ck.status();
  RankState s = MakeRank(f, 0, 1, false);
  ASSERT_TRUE((*ck)->Save(1, s.Contents()).ok());
  ASSERT_TRUE((*ck)->Wait().ok());
  RankState got = MakeRank(f, 0, 1, true);
  got.optim.push_back(Part("optim/b/exp_avg", f.b, 0, 1, false));  // nonzero now; not in the checkpoint
  auto step = (*ck)->LoadLatest(got.Contents());
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_EQ(*step, 1);
  EXPECT_TRUE(at::equal(got.optim.back().local, at::zeros({3}, at::kDouble)));
  EXPECT_TRUE(BitEqual(got.optim[0].local, f.w_m.reshape(-1)));
}

// A save that fails in the background (rank 1 leaves part of a tensor unsaved: rank 0's commit rejects it) is
// returned by the next Save on every rank, which does not start; the save after that works.
TEST(Checkpointer, BackgroundFailureIsReturnedByTheNextSave) {
  const TempRoot root("failure");
  auto store = std::make_shared<comm::InMemoryStore>();
  Full f;
  CheckpointerOptions o;
  o.commit_timeout = absl::Seconds(30);
  auto st = OnRanks(2, [&](int r) -> absl::Status {
    TESSERA_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(root.string(), r, 2, store, o));
    RankState bad = MakeRank(f, r, 2, false);
    if (r == 1) bad.model[0].save_count = 4;  // of its 10 elements of model/w
    TESSERA_RETURN_IF_ERROR(ck->Save(1, bad.Contents()));  // staged: OK
    RankState good = MakeRank(f, r, 2, false);
    absl::Status s = ck->Save(2, good.Contents());
    if (s.ok() || s.message().find("checkpoint step 1") == absl::string_view::npos) {
      return absl::InternalError(absl::StrCat("Save(2) should return step 1's failure, got: ", s.ToString()));
    }
    TESSERA_RETURN_IF_ERROR(ck->Save(3, good.Contents()));
    TESSERA_RETURN_IF_ERROR(ck->Wait());
    TESSERA_ASSIGN_OR_RETURN(std::vector<int64_t> steps, ck->CommittedSteps());
    return steps == std::vector<int64_t>{3} ? absl::OkStatus() : absl::InternalError("committed steps differ");
  });
  EXPECT_ALL_OK(st);
}

TEST(Checkpointer, RetentionAndStaleTmpCleanup) {
  const TempRoot root("retention");
  ASSERT_EQ(::mkdir((root / ".tmp-step-0000000099").c_str(), 0755), 0);
  CheckpointerOptions o;
  o.keep_last = 2;
  auto ck = Checkpointer::Create(root.string(), 0, 1, nullptr, o);
  ASSERT_TRUE(ck.ok()) << ck.status();
  EXPECT_FALSE(Exists(root / ".tmp-step-0000000099"));
  Full f;
  RankState s = MakeRank(f, 0, 1, false);
  for (int64_t step : {1, 2, 3}) ASSERT_TRUE((*ck)->Save(step, s.Contents()).ok());
  ASSERT_TRUE((*ck)->Wait().ok());
  auto steps = (*ck)->CommittedSteps();
  ASSERT_TRUE(steps.ok());
  EXPECT_EQ(*steps, (std::vector<int64_t>{3, 2}));
}

// ---- Python interop (driven by tests/python/checkpoint/test_cpp_checkpoint_format.py) ------------------------

// Saves a known set as rank 0 of 1 into $TESSERA_CPP_SAVE_DIR: model/weight [3, 4] = arange(12) / 8 - 0.5,
// model/bias [3] = {-1, 0.5, 2} (float32), optim exp_avg / exp_avg_sq = weight / 10 and weight^2, train {"step": 3}.
TEST(CppFormat, SaveForPython) {
  const char* dir = std::getenv("TESSERA_CPP_SAVE_DIR");
  if (dir == nullptr) GTEST_SKIP() << "run by test_cpp_checkpoint_format.py";
  auto ck = Checkpointer::Create(dir, 0, 1, nullptr);
  ASSERT_TRUE(ck.ok()) << ck.status();
  at::Tensor w = at::arange(12, at::kFloat).div(8).sub(0.5);
  at::Tensor b = at::tensor({-1.0f, 0.5f, 2.0f});
  auto whole = [](const std::string& name, const at::Tensor& t, std::vector<int64_t> shape) {
    CheckpointTensor c;
    c.name = name;
    c.shape = std::move(shape);
    c.local = t.reshape(-1);
    c.save_count = t.numel();
    return c;
  };
  CheckpointContents c;
  c.model = {whole("model/weight", w, {3, 4}), whole("model/bias", b, {3})};
  c.optim = {whole("optim/weight/exp_avg", w.div(10), {3, 4}), whole("optim/weight/exp_avg_sq", w.square(), {3, 4}),
             whole("optim/bias/exp_avg", b.div(10), {3}), whole("optim/bias/exp_avg_sq", b.square(), {3})};
  c.optim_json = [] {
    return std::string(R"({"groups":[{"hyper":{"lr":0.001,"betas":[0.9,0.999],"eps":1e-08,"weight_decay":0.01},)"
                       R"("params":["weight","bias"]}],"scalars":{"weight":{"step":1},"bias":{"step":1}}})");
  };
  std::map<std::string, int64_t> train = {{"step", 3}};
  c.train = &train;
  ASSERT_TRUE((*ck)->Save(3, c).ok());
  ASSERT_TRUE((*ck)->Wait().ok());
}

// Loads $TESSERA_PY_LOAD_DIR (saved by Python: an nn.Linear(4, 3) "model", a tessera AdamW "optim", a "train"
// dict) and prints every value as hex floats, the train dict and the optimizer JSON for the Python side to compare.
TEST(CppFormat, LoadFromPython) {
  const char* dir = std::getenv("TESSERA_PY_LOAD_DIR");
  if (dir == nullptr) GTEST_SKIP() << "run by test_cpp_checkpoint_format.py";
  auto ck = Checkpointer::Create(dir, 0, 1, nullptr);
  ASSERT_TRUE(ck.ok()) << ck.status();
  auto blank = [](const std::string& name, std::vector<int64_t> shape) {
    CheckpointTensor c;
    c.name = name;
    c.shape = shape;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    c.local = at::full({n}, 42.0f);
    return c;
  };
  CheckpointContents c;
  c.model = {blank("model/weight", {3, 4}), blank("model/bias", {3})};
  c.optim = {blank("optim/weight/exp_avg", {3, 4}), blank("optim/weight/exp_avg_sq", {3, 4}),
             blank("optim/bias/exp_avg", {3}), blank("optim/bias/exp_avg_sq", {3})};
  std::string optim_json;
  c.optim_json = [] { return std::string("{}"); };
  c.load_optim_json = [&](const std::string& j) {
    optim_json = j;
    return absl::OkStatus();
  };
  std::map<std::string, int64_t> train;
  c.train = &train;
  auto step = (*ck)->LoadLatest(c);
  ASSERT_TRUE(step.ok()) << step.status();
  ASSERT_TRUE(step->has_value());
  std::printf("LOADED step %lld\n", static_cast<long long>(**step));
  for (const auto* list : {&c.model, &c.optim}) {
    for (const CheckpointTensor& t : *list) {
      std::printf("TENSOR %s", t.name.c_str());
      for (int64_t i = 0; i < t.local.numel(); ++i) std::printf(" %a", t.local.data_ptr<float>()[i]);
      std::printf("\n");
    }
  }
  for (const auto& [k, v] : train) std::printf("TRAIN %s %lld\n", k.c_str(), static_cast<long long>(v));
  std::printf("OPTIM %s\n", optim_json.c_str());
}

}  // namespace
}  // namespace tessera::checkpoint
