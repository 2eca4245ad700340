// llama_trainer: trains a Llama (llama.h, libtorch modules) from a Hugging Face directory on a token file, sharded
// across the ranks of a torchrun-style job with tessera's C++ API (no Python).
//
//   torchrun --nproc-per-node 2 --no-python ./llama_trainer --hf-dir DIR --tokens FILE --steps 20 --batch 2
//       --seq 64 --lr 1e-4 [--weight-decay 0.0] [--max-grad-norm 1.0] [--checkpoint-dir D] [--save-every N]
//       [--dump-params DIR]
//
// Data: FILE holds raw little-endian uint32 tokens. Window w is tokens [w * (seq + 1), (w + 1) * (seq + 1)): the
// first seq are the input, the last seq the targets. At step s (from 0) rank r takes windows
// [(s * world + r) * batch, ... + batch). The loss is the mean cross-entropy over the rank's tokens; gradients are
// averaged over ranks, so the step is that of the mean loss over all ranks' tokens. One line per step on rank 0:
// "step N loss X" (N counts from 1; X is the mean of the ranks' losses), and at the end
// "mean step time S s (steps 2..N)" (the first step, which records the forward order, left out).
//
// With --checkpoint-dir the run resumes from the newest checkpoint there and saves every --save-every steps
// (default 10) and at the end, in the format the Python Checkpointer reads ({"model", "optim", "train"}).
// --dump-params DIR writes every parameter at the end as DIR/<name>.bin (raw, the parameters' dtype) plus
// DIR/index.txt ("name dtype d0,d1,..." per line), for tests.
#include <sys/stat.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "llama.h"
#include "tessera/tessera.h"

namespace {

struct Args {
  std::string hf_dir, tokens, checkpoint_dir, dump_params;
  int64_t steps = 0, batch = 0, seq = 0, save_every = 10;
  double lr = 0, weight_decay = 0, max_grad_norm = 0;
};

[[noreturn]] void Usage(const std::string& why) {
  std::cerr << "llama_trainer: " << why << "\n"
            << "usage: llama_trainer --hf-dir DIR --tokens FILE --steps N --batch B --seq T --lr LR "
               "[--weight-decay W] [--max-grad-norm C] [--checkpoint-dir D] [--save-every N] [--dump-params DIR]\n";
  std::exit(2);
}

Args Parse(int argc, char** argv) {
  Args a;
  std::map<std::string, std::string> kv;
  for (int i = 1; i < argc; ++i) {
    std::string k = argv[i];
    if (k.rfind("--", 0) != 0 || i + 1 >= argc) Usage("expected --flag VALUE pairs, got '" + k + "'");
    kv[k.substr(2)] = argv[++i];
  }
  auto num = [&](const char* name, auto& out, bool required) {
    auto it = kv.find(name);
    if (it == kv.end()) {
      if (required) Usage(std::string("--") + name + " is required");
      return;
    }
    try {
      size_t used = 0;
      if constexpr (std::is_same_v<std::decay_t<decltype(out)>, double>) {
        out = std::stod(it->second, &used);
      } else {
        out = std::stoll(it->second, &used);
      }
      if (used != it->second.size()) throw std::invalid_argument("trailing characters");
    } catch (const std::exception&) {
      Usage(std::string("--") + name + " '" + it->second + "' is not a number");
    }
    kv.erase(it);
  };
  auto str = [&](const char* name, std::string& out, bool required) {
    auto it = kv.find(name);
    if (it == kv.end()) {
      if (required) Usage(std::string("--") + name + " is required");
      return;
    }
    out = it->second;
    kv.erase(it);
  };
  str("hf-dir", a.hf_dir, true);
  str("tokens", a.tokens, true);
  str("checkpoint-dir", a.checkpoint_dir, false);
  str("dump-params", a.dump_params, false);
  num("steps", a.steps, true);
  num("batch", a.batch, true);
  num("seq", a.seq, true);
  num("lr", a.lr, true);
  num("weight-decay", a.weight_decay, false);
  num("max-grad-norm", a.max_grad_norm, false);
  num("save-every", a.save_every, false);
  if (!kv.empty()) Usage("unknown flag --" + kv.begin()->first);
  if (a.steps < 1 || a.batch < 1 || a.seq < 1 || a.save_every < 1) {
    Usage("--steps, --batch, --seq and --save-every must be >= 1");
  }
  return a;
}

// The token file as int64 [windows, seq + 1] (whole windows only).
at::Tensor ReadWindows(const std::string& path, int64_t seq) {
  std::ifstream f(path, std::ios::binary | std::ios::ate);
  if (!f) throw std::runtime_error("cannot open token file " + path);
  const int64_t bytes = f.tellg();
  if (bytes % 4 != 0) {
    throw std::runtime_error(path + ": " + std::to_string(bytes) + " bytes is not a whole number of uint32 tokens");
  }
  std::vector<uint32_t> raw(bytes / 4);
  f.seekg(0);
  f.read(reinterpret_cast<char*>(raw.data()), bytes);
  const int64_t windows = static_cast<int64_t>(raw.size()) / (seq + 1);
  at::Tensor t = torch::from_blob(raw.data(), {static_cast<int64_t>(raw.size())}, torch::kInt32).to(torch::kInt64);
  // uint32 -> int64 without sign trouble: tokens are below 2^31 for any real vocabulary; checked below.
  if (t.numel() && t.min().item<int64_t>() < 0) throw std::runtime_error(path + ": token ids >= 2^31");
  return t.narrow(0, 0, windows * (seq + 1)).view({windows, seq + 1});
}

void DumpParams(tessera::ShardedModel& model, const std::string& dir, bool write) {
  auto full = tessera::ValueOrThrow(model.FullStateDict());  // collective: every rank
  if (!write) return;
  ::mkdir(dir.c_str(), 0755);
  std::ofstream index(dir + "/index.txt");
  for (auto& [name, t] : full) {
    at::Tensor c = t.to(at::kCPU).contiguous();
    std::ofstream(dir + "/" + name + ".bin", std::ios::binary)
        .write(static_cast<const char*>(c.data_ptr()), c.nbytes());
    index << name << " " << c10::toString(c.scalar_type());
    for (size_t d = 0; d < c.sizes().size(); ++d) index << (d ? "," : " ") << c.size(d);
    index << "\n";
  }
}

int Main(int argc, char** argv) {
  const Args args = Parse(argc, argv);
  auto world = tessera::ValueOrThrow(tessera::World::Init(tessera::ValueOrThrow(tessera::WorldOptions::FromEnv())));
  const int rank = world->rank(), size = world->size();

  Llama model = tessera::ValueOrThrow(LoadLlama(args.hf_dir));
  model->to(world->device());
  tessera::ShardedModel fsdp(world->comm());
  std::vector<tessera::Sharded<TransformerBlock>> blocks;
  for (size_t i = 0; i < model->layers.size(); ++i) {
    blocks.push_back(tessera::ValueOrThrow(tessera::Shard(fsdp, model->layers[i], "layers." + std::to_string(i))));
  }
  model->run_layer = [&blocks](int64_t i, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    return blocks[i](x, cos, sin);
  };
  auto root = tessera::ValueOrThrow(tessera::ShardRoot(fsdp, model));
  tessera::optim::AdamWOptions ao;
  ao.lr = args.lr;
  ao.weight_decay = args.weight_decay;  // betas (0.9, 0.999), eps 1e-8: the defaults
  auto opt = tessera::ValueOrThrow(tessera::optim::AdamW::Create(fsdp, ao));

  const at::Tensor windows = ReadWindows(args.tokens, args.seq);
  const int64_t needed = args.steps * size * args.batch;
  if (windows.size(0) < needed) {
    throw std::runtime_error(args.tokens + " has " + std::to_string(windows.size(0)) + " windows of " +
                             std::to_string(args.seq + 1) + " tokens; " + std::to_string(args.steps) +
                             " steps on " + std::to_string(size) + " ranks with batch " +
                             std::to_string(args.batch) + " need " + std::to_string(needed));
  }

  std::unique_ptr<tessera::checkpoint::Checkpointer> ckpt;
  std::map<std::string, int64_t> train = {{"step", 0}};
  tessera::checkpoint::TrainingState state{&fsdp, opt.get(), &train};
  int64_t start = 0;
  if (!args.checkpoint_dir.empty()) {
    ckpt = tessera::ValueOrThrow(
        tessera::checkpoint::Checkpointer::Create(args.checkpoint_dir, rank, size, world->store()));
    std::optional<int64_t> loaded = tessera::ValueOrThrow(ckpt->LoadLatest(state));
    if (loaded.has_value()) {
      start = train["step"];
      if (rank == 0) std::printf("resumed from checkpoint step %lld\n", static_cast<long long>(*loaded));
    }
  }

  std::vector<double> times;
  at::Tensor loss_sum = torch::zeros({1}, torch::TensorOptions().dtype(torch::kFloat64).device(world->device()));
  for (int64_t s = start; s < args.steps; ++s) {
    const auto t0 = std::chrono::steady_clock::now();
    world->comm()->set_step(s);
    opt->ZeroGrad();
    at::Tensor batch = windows.narrow(0, (s * size + rank) * args.batch, args.batch).to(world->device());
    at::Tensor input = batch.narrow(1, 0, args.seq), target = batch.narrow(1, 1, args.seq);
    at::Tensor logits = root(input);
    at::Tensor loss = torch::nn::functional::cross_entropy(logits.reshape({-1, logits.size(-1)}),
                                                           target.reshape({-1}));
    loss.backward();
    if (args.max_grad_norm > 0) tessera::ValueOrThrow(tessera::ClipGradNorm(fsdp, args.max_grad_norm));
    tessera::ThrowIfError(opt->Step());
    // The mean over ranks of the ranks' losses (equal token counts: the mean loss over all tokens).
    loss_sum.fill_(loss.item<double>());
    if (size > 1) {
      auto view = tessera::ValueOrThrow(tessera::torch_rt::ViewOf(loss_sum, "loss"));
      auto work = tessera::ValueOrThrow(world->comm()->AllReduce(view, tessera::comm::ReduceOp::kSum));
      tessera::ThrowIfError(work->Wait());
    }
    times.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    if (rank == 0) {
      std::printf("step %lld loss %.9f\n", static_cast<long long>(s + 1), loss_sum.item<double>() / size);
      std::fflush(stdout);
    }
    train["step"] = s + 1;
    if (ckpt && ((s + 1) % args.save_every == 0 || s + 1 == args.steps)) {
      tessera::ThrowIfError(ckpt->Save(s + 1, state));
    }
  }
  if (ckpt) tessera::ThrowIfError(ckpt->Wait());
  if (rank == 0 && times.size() > 1) {
    double sum = 0;
    for (size_t i = 1; i < times.size(); ++i) sum += times[i];
    std::printf("mean step time %.6f s (steps 2..%zu)\n", sum / (times.size() - 1), times.size());
  }
  if (!args.dump_params.empty()) DumpParams(fsdp, args.dump_params, rank == 0);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return Main(argc, argv);
  } catch (const std::exception& e) {
    std::cerr << "llama_trainer: error: " << e.what() << "\n";
    return 1;
  }
}
