// A Llama-architecture decoder in libtorch C++ modules: the C++ twin of python/tessera/models/llama/model.py, with the
// same numerics (RMSNorm in float32, rotate-half RoPE with Llama 3.1 scaling, grouped-query attention through SDPA,
// SwiGLU) and the same parameter names in the same order, so named_parameters() of both models line up one to one
// (a tied head is listed once, as tok_embeddings.weight). Only the plain training forward: no KV cache, no packed
// sequence masks. Sharding is applied from outside through run_layer, as torchtitan keeps it out of model code.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "absl/status/statusor.h"
#include "tessera/api/hf_safetensors.h"

// In the global namespace, as the trainer in this folder declares them.

// y = weight * (x / sqrt(mean(x^2) + eps)), the normalisation computed in float32 and cast back (HF's LlamaRMSNorm).
struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, double eps);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

// Rotary inverse frequencies, float32 [head_dim / 2], with Llama 3.1's scaling when configured (rope_inv_freq in
// args.py).
at::Tensor RopeInvFreq(const tessera::hf::LlamaConfig& cfg, const at::Device& device);
// cos and sin, float32 [seq, head_dim], for positions 0..seq-1 (rotate-half layout: each frequency twice).
std::pair<at::Tensor, at::Tensor> RopeCosSin(const tessera::hf::LlamaConfig& cfg, int64_t seq,
                                             const at::Device& device);

struct AttentionImpl : torch::nn::Module {
  explicit AttentionImpl(const tessera::hf::LlamaConfig& cfg);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
  torch::nn::Linear wq{nullptr}, wk{nullptr}, wv{nullptr}, wo{nullptr};
  int64_t n_heads, n_kv_heads, head_dim;
};
TORCH_MODULE(Attention);

// SwiGLU: w2(silu(w1 x) * w3 x).
struct FeedForwardImpl : torch::nn::Module {
  explicit FeedForwardImpl(const tessera::hf::LlamaConfig& cfg);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Linear w1{nullptr}, w3{nullptr}, w2{nullptr};
};
TORCH_MODULE(FeedForward);

struct TransformerBlockImpl : torch::nn::Module {
  explicit TransformerBlockImpl(const tessera::hf::LlamaConfig& cfg);
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
  RMSNorm attention_norm{nullptr};
  Attention attention{nullptr};
  RMSNorm ffn_norm{nullptr};
  FeedForward feed_forward{nullptr};
};
TORCH_MODULE(TransformerBlock);

struct LlamaImpl : torch::nn::Module {
  explicit LlamaImpl(const tessera::hf::LlamaConfig& cfg);
  at::Tensor forward(const at::Tensor& tokens);  // int64 [batch, seq] -> logits [batch, seq, vocab]
  // How forward calls block i; by default layers[i]->forward(x, cos, sin). A trainer replaces it to run the blocks
  // through tessera's sharding wrappers, so forward calls blocks only through this.
  std::function<at::Tensor(int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&)> run_layer;
  std::vector<TransformerBlock> layers;  // also registered (a ModuleList "layers"), so names are layers.N....
  tessera::hf::LlamaConfig cfg;
  torch::nn::Embedding tok_embeddings{nullptr};
  RMSNorm norm{nullptr};
  torch::nn::Linear output{nullptr};  // null when cfg.tie_embeddings: the head is tok_embeddings->weight
};
TORCH_MODULE(Llama);

// Builds the model from an HF directory (ReadLlamaConfig + LoadLlamaWeights, copied into the parameters, which are
// float32 whatever the stored dtype). The errors of those two, with the directory named.
absl::StatusOr<Llama> LoadLlama(const std::string& hf_dir);
