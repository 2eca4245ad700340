// The C++ Checkpointer with the real C++ trainer API: a small torch::nn model sharded by ShardedModel over 2 ranks
// (threads over comm::LocalCommunicator, agreement through an InMemoryStore), a few AdamW steps, Save; then a
// fresh model and optimizer LoadLatest and every shard, moment and step count is compared bit for bit, and one
// more step on both gives the same parameters.
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <cstring>
#include <functional>
#include <thread>

#include <torch/torch.h>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tessera/api/adamw.h"
#include "tessera/api/checkpointer.h"
#include "tessera/api/sharded.h"
#include "tessera/checkpoint/storage.h"
#include "tessera/comm/local/local_communicator.h"
#include "tessera/core/status.h"

namespace tessera::checkpoint {
namespace {

struct BlockImpl : torch::nn::Module {
  BlockImpl() { fc = register_module("fc", torch::nn::Linear(8, 8)); }
  at::Tensor forward(const at::Tensor& x) { return torch::tanh(fc(x)) + x; }
  torch::nn::Linear fc{nullptr};
};
TORCH_MODULE(Block);

struct NetImpl : torch::nn::Module {
  NetImpl() {
    b0 = register_module("b0", Block());
    b1 = register_module("b1", Block());
    head = register_module("head", torch::nn::Linear(8, 3));
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor h = x;
    for (auto& run : blocks) h = run(h);
    return head(h);
  }
  Block b0{nullptr}, b1{nullptr};
  torch::nn::Linear head{nullptr};
  std::vector<std::function<at::Tensor(const at::Tensor&)>> blocks;  // the sharded blocks
};
TORCH_MODULE(Net);

// One rank's model, sharded, and its optimizer.
struct Trainer {
  Net net;
  std::unique_ptr<ShardedModel> fsdp;
  std::vector<Sharded<Block>> blocks;
  Sharded<Net> root;
  std::unique_ptr<optim::AdamW> opt;
  std::map<std::string, int64_t> train;

  static absl::StatusOr<std::unique_ptr<Trainer>> Make(std::shared_ptr<comm::Communicator> comm, double scale) {
    auto t = std::make_unique<Trainer>();
    {  // deterministic values (threads share torch's generator)
      at::NoGradGuard no_grad;
      int i = 0;
      for (auto& p : t->net->parameters()) {
        p.copy_(at::arange(p.numel(), at::kFloat).mul(0.07 * ++i).sin().mul(scale).reshape(p.sizes()));
      }
    }
    t->fsdp = std::make_unique<ShardedModel>(std::move(comm));
    for (auto [name, block] : {std::pair<const char*, Block>{"b0", t->net->b0}, {"b1", t->net->b1}}) {
      TESSERA_ASSIGN_OR_RETURN(Sharded<Block> s, Shard(*t->fsdp, block, name));
      t->blocks.push_back(s);
    }
    for (size_t i = 0; i < t->blocks.size(); ++i) {
      t->net->blocks.push_back([t = t.get(), i](const at::Tensor& x) { return t->blocks[i](x); });
    }
    TESSERA_ASSIGN_OR_RETURN(t->root, ShardRoot(*t->fsdp, t->net));
    optim::AdamWOptions o;
    o.lr = 0.01;
    TESSERA_ASSIGN_OR_RETURN(t->opt, optim::AdamW::Create(*t->fsdp, o));
    return t;
  }

  absl::Status Step(int rank, int i) {
    at::Tensor x = at::arange(32, at::kFloat).reshape({4, 8}).mul(0.01 * (rank + 1) * (i + 1)).cos();
    try {
      root(x).square().mean().backward();
    } catch (const StatusError& e) {
      return e.status();
    }
    TESSERA_RETURN_IF_ERROR(opt->Step());
    opt->ZeroGrad();
    return absl::OkStatus();
  }

  TrainingState State() { return {fsdp.get(), opt.get(), &train}; }
};

bool BitEqual(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == b.scalar_type() && a.numel() == b.numel() &&
         std::memcmp(a.contiguous().data_ptr(), b.contiguous().data_ptr(), a.nbytes()) == 0;
}

absl::Status Compare(Trainer& got, Trainer& want) {
  auto cmp = [](const std::vector<CheckpointTensor>& g, const std::vector<CheckpointTensor>& w) -> absl::Status {
    if (g.size() != w.size()) return absl::InternalError("different numbers of checkpoint tensors");
    for (size_t i = 0; i < g.size(); ++i) {
      if (g[i].name != w[i].name || !BitEqual(g[i].local, w[i].local)) {
        return absl::InternalError(absl::StrCat(w[i].name, " differs"));
      }
    }
    return absl::OkStatus();
  };
  TESSERA_RETURN_IF_ERROR(cmp(got.fsdp->CheckpointTensors("model"), want.fsdp->CheckpointTensors("model")));
  TESSERA_RETURN_IF_ERROR(cmp(got.opt->CheckpointTensors("optim", true), want.opt->CheckpointTensors("optim", true)));
  for (int u = 0; u < want.fsdp->num_units(); ++u) {
    for (size_t i = 0; i < want.fsdp->param_names(u).size(); ++i) {
      if (got.opt->step_count(u, i) != want.opt->step_count(u, i)) return absl::InternalError("step counts differ");
    }
  }
  if (got.train != want.train) return absl::InternalError("train differs");
  return absl::OkStatus();
}

TEST(CheckpointerModel, SaveAndLoadLatestBitExactOverTwoRanks) {
  // TESSERA_CPP_SAVE_DIR: save there and keep it (tests/python/checkpoint/test_cpp_checkpoint_format.py loads it).
  const char* keep = std::getenv("TESSERA_CPP_SAVE_DIR");
  std::string root = keep != nullptr ? std::string(keep)
                                     : absl::StrCat(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp",
                                                    "/tessera_ckmodel_XXXXXX");
  if (keep == nullptr) {
    ASSERT_NE(::mkdtemp(root.data()), nullptr);
  }
  auto comms = comm::LocalWorld::CreateCommunicators(2);
  ASSERT_TRUE(comms.ok()) << comms.status();
  auto comms2 = comm::LocalWorld::CreateCommunicators(2);
  ASSERT_TRUE(comms2.ok()) << comms2.status();
  auto store = std::make_shared<comm::InMemoryStore>();
  std::vector<absl::Status> st(2);
  std::vector<std::thread> threads;
  for (int r = 0; r < 2; ++r) {
    std::shared_ptr<comm::Communicator> c1 = std::move((*comms)[r]), c2 = std::move((*comms2)[r]);
    threads.emplace_back([&, r, c1, c2] {
      st[r] = [&]() -> absl::Status {
        TESSERA_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(root, r, 2, store));
        TESSERA_ASSIGN_OR_RETURN(auto a, Trainer::Make(c1, 1.0));
        for (int i = 0; i < 3; ++i) TESSERA_RETURN_IF_ERROR(a->Step(r, i));
        a->train = {{"step", 3}, {"tokens", 96}};
        TESSERA_RETURN_IF_ERROR(ck->Save(3, a->State()));
        TESSERA_RETURN_IF_ERROR(ck->Wait());

        TESSERA_ASSIGN_OR_RETURN(auto b, Trainer::Make(c2, 0.5));  // other values, no optimizer state
        if (Compare(*b, *a).ok()) return absl::InternalError("the fresh model already equals the trained one");
        TESSERA_ASSIGN_OR_RETURN(std::optional<int64_t> step, ck->LoadLatest(b->State()));
        if (step != 3) return absl::InternalError("LoadLatest did not load step 3");
        TESSERA_RETURN_IF_ERROR(Compare(*b, *a));
        TESSERA_RETURN_IF_ERROR(a->Step(r, 3));  // one more step on both: the same values
        TESSERA_RETURN_IF_ERROR(b->Step(r, 3));
        return Compare(*b, *a);
      }();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(st[r].ok()) << "rank " << r << ": " << st[r];
  auto storage = NewLocalStorage(root);
  if (storage.ok() && keep == nullptr) (void)(*storage)->RemoveAll("");
}

// Copies of a trainer's checkpoint tensors, to compare against later.
std::vector<at::Tensor> Snapshot(Trainer& t) {
  std::vector<at::Tensor> out;
  for (const auto& c : t.fsdp->CheckpointTensors("model")) out.push_back(c.local.clone());
  for (const auto& c : t.opt->CheckpointTensors("optim", true)) out.push_back(c.local.clone());
  return out;
}

// No checkpoint: nullopt and the model untouched. Then steps 2 and 3 are saved and a bit of rank 0's data file
// of step 3 is flipped: every rank skips step 3 and loads step 2 (compared with a copy taken at step 2).
TEST(CheckpointerModel, DamagedNewestFallsBackToOlderAndEmptyIsNullopt) {
  std::string root = absl::StrCat(std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp", "/tessera_ckmodel_XXXXXX");
  ASSERT_NE(::mkdtemp(root.data()), nullptr);
  auto comms = comm::LocalWorld::CreateCommunicators(2);
  ASSERT_TRUE(comms.ok()) << comms.status();
  auto comms2 = comm::LocalWorld::CreateCommunicators(2);
  ASSERT_TRUE(comms2.ok()) << comms2.status();
  auto store = std::make_shared<comm::InMemoryStore>();
  std::vector<absl::Status> st(2);
  std::vector<std::thread> threads;
  std::atomic<int> saved{0};
  for (int r = 0; r < 2; ++r) {
    std::shared_ptr<comm::Communicator> c1 = std::move((*comms)[r]), c2 = std::move((*comms2)[r]);
    threads.emplace_back([&, r, c1, c2] {
      st[r] = [&]() -> absl::Status {
        TESSERA_ASSIGN_OR_RETURN(auto ck, Checkpointer::Create(root, r, 2, store));
        TESSERA_ASSIGN_OR_RETURN(auto a, Trainer::Make(c1, 1.0));
        std::vector<at::Tensor> before = Snapshot(*a);
        TESSERA_ASSIGN_OR_RETURN(std::optional<int64_t> none, ck->LoadLatest(a->State()));
        if (none.has_value()) return absl::InternalError("LoadLatest found a checkpoint in an empty directory");
        std::vector<at::Tensor> after = Snapshot(*a);
        for (size_t i = 0; i < before.size(); ++i) {
          if (!BitEqual(before[i], after[i])) return absl::InternalError("an empty LoadLatest changed the model");
        }
        for (int i = 0; i < 2; ++i) TESSERA_RETURN_IF_ERROR(a->Step(r, i));
        a->train = {{"step", 2}};
        TESSERA_RETURN_IF_ERROR(ck->Save(2, a->State()));
        std::vector<at::Tensor> at2 = Snapshot(*a);
        TESSERA_RETURN_IF_ERROR(a->Step(r, 2));
        a->train = {{"step", 3}};
        TESSERA_RETURN_IF_ERROR(ck->Save(3, a->State()));
        TESSERA_RETURN_IF_ERROR(ck->Wait());
        if (r == 0) {  // flip a bit of rank 0's first piece of step 3 (after the 64-byte header)
          std::fstream f(root + "/step-0000000003/rank-00000.bin", std::ios::in | std::ios::out | std::ios::binary);
          char c = 0;
          f.seekg(64 + 4);
          f.read(&c, 1);
          c ^= 0x01;
          f.seekp(64 + 4);
          f.write(&c, 1);
        }
        saved.fetch_add(1);
        while (saved.load() < 2) std::this_thread::yield();  // both saved, the file damaged

        TESSERA_ASSIGN_OR_RETURN(auto b, Trainer::Make(c2, 0.5));
        TESSERA_ASSIGN_OR_RETURN(std::optional<int64_t> step, ck->LoadLatest(b->State()));
        if (step != 2) return absl::InternalError(absl::StrCat("loaded step ", step.value_or(-1), ", expected 2"));
        std::vector<at::Tensor> got = Snapshot(*b);
        for (size_t i = 0; i < at2.size(); ++i) {
          if (!BitEqual(got[i], at2[i])) return absl::InternalError("step 2 loaded other values");
        }
        return b->train == std::map<std::string, int64_t>{{"step", 2}} ? absl::OkStatus()
                                                                       : absl::InternalError("train differs");
      }();
    });
  }
  for (auto& t : threads) t.join();
  for (int r = 0; r < 2; ++r) EXPECT_TRUE(st[r].ok()) << "rank " << r << ": " << st[r];
  auto storage = NewLocalStorage(root);
  if (storage.ok()) (void)(*storage)->RemoveAll("");
}

// Loads $TESSERA_PY_LOAD_DIR (Python: the same parameter names, a tessera AdamW, a "train" dict) into a 1-rank
// ShardedModel + AdamW and prints what it got, for tests/python/checkpoint/test_cpp_checkpoint_format.py.
TEST(CppFormat, LoadModelFromPython) {
  const char* dir = std::getenv("TESSERA_PY_LOAD_DIR");
  if (dir == nullptr) GTEST_SKIP() << "run by test_cpp_checkpoint_format.py";
  auto comms = comm::LocalWorld::CreateCommunicators(1);
  ASSERT_TRUE(comms.ok()) << comms.status();
  auto t = Trainer::Make(std::move((*comms)[0]), 0.5);
  ASSERT_TRUE(t.ok()) << t.status();
  auto ck = Checkpointer::Create(dir, 0, 1, nullptr);
  ASSERT_TRUE(ck.ok()) << ck.status();
  auto step = (*ck)->LoadLatest((*t)->State());
  ASSERT_TRUE(step.ok()) << step.status();
  ASSERT_TRUE(step->has_value());
  std::printf("LOADED step %lld\n", static_cast<long long>(**step));
  const optim::AdamWOptions& o = (*t)->opt->options();
  std::printf("OPTIONS lr %.17g betas %.17g %.17g eps %.17g weight_decay %.17g\n", o.lr, o.beta1, o.beta2, o.eps,
              o.weight_decay);
  for (const auto& list : {(*t)->fsdp->CheckpointTensors("model"), (*t)->opt->CheckpointTensors("optim", true)}) {
    for (const CheckpointTensor& c : list) {
      std::printf("TENSOR %s", c.name.c_str());
      for (int64_t i = 0; i < c.local.numel(); ++i) std::printf(" %a", c.local.data_ptr<float>()[i]);
      std::printf("\n");
    }
  }
  for (int u = 0; u < (*t)->fsdp->num_units(); ++u) {
    for (size_t i = 0; i < (*t)->fsdp->param_names(u).size(); ++i) {
      std::printf("STEPS %s %lld\n", (*t)->fsdp->param_names(u)[i].c_str(),
                  static_cast<long long>((*t)->opt->step_count(u, static_cast<int64_t>(i))));
    }
  }
  for (const auto& [k, v] : (*t)->train) std::printf("TRAIN %s %lld\n", k.c_str(), static_cast<long long>(v));
}

}  // namespace
}  // namespace tessera::checkpoint
