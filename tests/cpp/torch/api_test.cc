// The C++ trainer API (csrc/tessera/api): a libtorch model sharded with tessera::Shard / ShardRoot, trained with
// tessera::optim::AdamW and ClipGradNorm on 2 ranks (threads over the `local` communicator), must take the steps
// one process takes with libtorch's own torch::optim::AdamW and clip_grad_norm_ on the whole batch (float64).
#include <torch/torch.h>

#include "tessera/api/adamw.h"
#include "tessera/api/sharded.h"
#include "torch/torch_testing.h"

namespace tessera {
namespace {

constexpr int64_t kDim = 12;

struct BlockImpl : torch::nn::Module {
  BlockImpl() {
    fc = register_module("fc", torch::nn::Linear(kDim, kDim));
    gain = register_parameter("gain", torch::ones({kDim}, torch::kDouble));
  }
  at::Tensor forward(const at::Tensor& x) { return x + torch::tanh(fc(x)) * gain; }
  torch::nn::Linear fc{nullptr};
  at::Tensor gain;
};
TORCH_MODULE(Block);

struct NetImpl : torch::nn::Module {
  NetImpl() {
    embed = register_module("embed", torch::nn::Linear(4, kDim));
    auto list = register_module("blocks", torch::nn::ModuleList());
    for (int i = 0; i < 2; ++i) {
      blocks.push_back(Block());
      list->push_back(blocks.back());
    }
    head = register_module("head", torch::nn::Linear(kDim, 3));
    unused = register_parameter("unused", torch::zeros({5}, torch::kDouble));  // never gets a gradient
    run_block = [this](int i, const at::Tensor& x) { return blocks[i]->forward(x); };
  }
  at::Tensor forward(const at::Tensor& x) {
    at::Tensor h = embed(x);
    for (int i = 0; i < 2; ++i) h = run_block(i, h);
    return head(h);
  }
  torch::nn::Linear embed{nullptr}, head{nullptr};
  std::vector<Block> blocks;
  at::Tensor unused;
  std::function<at::Tensor(int, const at::Tensor&)> run_block;
};
TORCH_MODULE(Net);

Net MakeNet() {
  torch::manual_seed(7);
  Net net;
  net->to(torch::kDouble);
  return net;
}

at::Tensor Loss(const at::Tensor& out, const at::Tensor& y) { return torch::mse_loss(out, y); }

struct Case {
  ShardingStrategy strategy;
  double clip;  // 0: none
};

class ApiTest : public ::testing::TestWithParam<Case> {};

TEST_P(ApiTest, TwoRanksTakeTheStepsOfOneProcess) {
  const Case c = GetParam();
  constexpr int kWorld = 2, kSteps = 4, kBatch = 6;
  at::Generator gen = testing::MakeGenerator(3);
  std::vector<at::Tensor> xs, ys;
  for (int s = 0; s < kSteps; ++s) {
    xs.push_back(testing::Randn({kBatch * kWorld, 4}, gen));
    ys.push_back(testing::Randn({kBatch * kWorld, 3}, gen));
  }
  // The reference: one process, the whole batch, libtorch's AdamW.
  Net ref = MakeNet();
  torch::optim::AdamW ref_opt(ref->parameters(), torch::optim::AdamWOptions(0.05).weight_decay(0.1));
  std::vector<double> ref_losses;
  for (int s = 0; s < kSteps; ++s) {
    ref_opt.zero_grad();
    at::Tensor loss = Loss(ref->forward(xs[s]), ys[s]);
    loss.backward();
    if (c.clip > 0) torch::nn::utils::clip_grad_norm_(ref->parameters(), c.clip);
    ref_opt.step();
    ref_losses.push_back(loss.item<double>());
  }
  // Every rank's copy of the initial model is made here: MakeNet seeds torch's global generator, which rank threads
  // would race on (seen once in CI: different initial weights on the ranks).
  std::vector<Net> nets;
  for (int r = 0; r < kWorld; ++r) nets.push_back(MakeNet());
  std::vector<std::vector<double>> losses(kWorld);
  std::vector<std::vector<std::pair<std::string, at::Tensor>>> finals(kWorld);
  auto statuses = testing::OnRanks(kWorld, [&](int rank, std::shared_ptr<comm::Communicator> comm) -> absl::Status {
    Net net = nets[rank];
    ShardOptions so;
    so.strategy = c.strategy;
    so.collective_timeout = absl::Seconds(30);
    ShardedModel model(comm, so);
    std::vector<Sharded<Block>> blocks;
    for (int i = 0; i < 2; ++i) {
      auto b = Shard(model, net->blocks[i], "blocks." + std::to_string(i));
      if (!b.ok()) return b.status();
      blocks.push_back(*b);
    }
    net->run_block = [&blocks](int i, const at::Tensor& x) { return blocks[i](x); };
    auto root = ShardRoot(model, net);
    if (!root.ok()) return root.status();
    optim::AdamWOptions ao;
    ao.lr = 0.05;
    ao.weight_decay = 0.1;
    auto opt = optim::AdamW::Create(model, ao);
    if (!opt.ok()) return opt.status();
    for (int s = 0; s < kSteps; ++s) {
      (*opt)->ZeroGrad();
      at::Tensor x = xs[s].narrow(0, rank * kBatch, kBatch), y = ys[s].narrow(0, rank * kBatch, kBatch);
      at::Tensor loss = Loss((*root)(x), y);
      loss.backward();
      if (c.clip > 0) {
        auto norm = ClipGradNorm(model, c.clip);
        if (!norm.ok()) return norm.status();
      }
      if (absl::Status st = (*opt)->Step(); !st.ok()) return st;
      losses[rank].push_back(loss.item<double>());
    }
    const auto& root_names = model.param_names(root->unit_index());
    const int64_t unused = std::find(root_names.begin(), root_names.end(), "unused") - root_names.begin();
    if ((*opt)->step_count(root->unit_index(), unused) != 0) {
      return absl::InternalError("the parameter that never had a gradient took a step");
    }
    auto full = model.FullStateDict();
    if (!full.ok()) return full.status();
    finals[rank] = *full;
    return absl::OkStatus();
  });
  testing::ExpectAllOk(statuses);
  // Clipping computes the norm in float32, as the Python path does (clip.py); libtorch's clip_grad_norm_ keeps
  // float64 for float64 gradients, so clipped steps agree to float32 precision of the coefficient.
  const double tol = c.clip > 0 ? 1e-7 : 1e-12;
  for (int s = 0; s < kSteps; ++s) {
    // The mean loss over the whole batch is the mean of the ranks' means (equal halves).
    EXPECT_NEAR((losses[0][s] + losses[1][s]) / 2, ref_losses[s], tol) << "step " << s;
  }
  auto ref_params = ref->named_parameters();
  ASSERT_EQ(finals[0].size(), ref_params.size());
  for (const auto& [name, value] : finals[0]) {
    const at::Tensor* want = ref_params.find(name);
    ASSERT_NE(want, nullptr) << name;
    EXPECT_TRUE(at::allclose(value, *want, tol * 100, tol)) << name << " max diff "
                                                           << (value - *want).abs().max().item<double>();
  }
}

std::string CaseName(const ::testing::TestParamInfo<Case>& info) {
  static const char* const kNames[] = {"full_shard", "shard_grad_op", "no_shard"};
  return std::string(kNames[static_cast<int>(info.param.strategy)]) + (info.param.clip > 0 ? "_clip" : "");
}

INSTANTIATE_TEST_SUITE_P(Strategies, ApiTest,
                         ::testing::Values(Case{ShardingStrategy::kFullShard, 0}, Case{ShardingStrategy::kFullShard, 0.5},
                                           Case{ShardingStrategy::kShardGradOp, 0},
                                           Case{ShardingStrategy::kNoShard, 0.5}),
                         CaseName);

TEST(ApiErrors, ForwardBeforeShardRootAndShardAfterIt) {
  auto statuses = testing::OnRanks(1, [](int, std::shared_ptr<comm::Communicator> comm) -> absl::Status {
    Net net = MakeNet();
    ShardedModel model(comm);
    auto b = Shard(model, net->blocks[0], "blocks.0");
    if (!b.ok()) return b.status();
    try {
      (*b)(at::zeros({1, kDim}, at::kDouble));
      return absl::InternalError("a forward before ShardRoot ran");
    } catch (const StatusError& e) {
      if (e.status().code() != absl::StatusCode::kFailedPrecondition) return e.status();
    }
    if (!ShardRoot(model, net).ok()) return absl::InternalError("ShardRoot failed");
    auto late = Shard(model, net->blocks[1], "blocks.1");
    if (late.ok() || late.status().code() != absl::StatusCode::kFailedPrecondition) {
      return absl::InternalError("sharding a block after the root was accepted");
    }
    return absl::OkStatus();
  });
  testing::ExpectAllOk(statuses);
}

}  // namespace
}  // namespace tessera
