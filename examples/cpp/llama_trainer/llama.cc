// See llama.h. Each computation follows python/tessera/models/llama/model.py (and rope_inv_freq in args.py) op by op,
// in the same order and dtypes, so the C++ and Python logits agree to float32 rounding; where C++ operator syntax
// would pick a different kernel than Python's (scalar / tensor), the Python one is spelled out.
#include "llama.h"

#include <cmath>

#include "absl/strings/str_cat.h"

using tessera::hf::LlamaConfig;

namespace {
torch::nn::Linear NoBias(int64_t in, int64_t out) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false));
}

// Python's `scalar / tensor` is tensor.reciprocal() * scalar (torch/_tensor.py __rdiv__); C++'s operator/ fills and
// divides instead, which can differ in the last bit.
at::Tensor RDiv(double scalar, const at::Tensor& t) { return t.reciprocal() * scalar; }

// x * cos + rotate_half(x) * sin for x [batch, heads, seq, head_dim] and cos/sin [seq, head_dim].
at::Tensor ApplyRope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  at::Tensor rotated = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return x * cos.to(x.scalar_type()) + rotated * sin.to(x.scalar_type());
}
}  // namespace

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps(eps) {
  weight = register_parameter("weight", torch::ones({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  at::Tensor x32 = x.to(at::kFloat);
  return weight * (x32 * at::rsqrt(x32.pow(2).mean(-1, /*keepdim=*/true) + eps)).to(x.scalar_type());
}

at::Tensor RopeInvFreq(const LlamaConfig& cfg, const at::Device& device) {
  const int64_t hd = cfg.head_dim;
  at::Tensor exponent = at::arange(0, hd, 2, at::TensorOptions().dtype(at::kLong).device(device)).to(at::kFloat) / hd;
  at::Tensor inv = at::pow(cfg.rope_theta, exponent).reciprocal();  // 1.0 / theta ** e (times 1.0, exact)
  if (!cfg.rope_scaling) return inv;
  const tessera::hf::RopeScaling& s = *cfg.rope_scaling;
  const double orig = static_cast<double>(s.original_max_seq_len);
  const double low_wavelen = orig / s.low_freq_factor, high_wavelen = orig / s.high_freq_factor;
  at::Tensor wavelen = RDiv(2 * M_PI, inv);
  at::Tensor scaled = at::where(wavelen > low_wavelen, inv / s.factor, inv);
  at::Tensor smooth = (RDiv(orig, wavelen) - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
  at::Tensor smoothed = at::rsub(smooth, 1) * scaled / s.factor + smooth * scaled;
  at::Tensor medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen);
  return at::where(medium, smoothed, scaled);
}

std::pair<at::Tensor, at::Tensor> RopeCosSin(const LlamaConfig& cfg, int64_t seq, const at::Device& device) {
  at::Tensor positions = at::arange(seq, at::TensorOptions().dtype(at::kLong).device(device));
  at::Tensor freqs = positions.unsqueeze(-1).to(at::kFloat) * RopeInvFreq(cfg, device);
  at::Tensor emb = at::cat({freqs, freqs}, -1);
  return {emb.cos(), emb.sin()};
}

AttentionImpl::AttentionImpl(const LlamaConfig& cfg)
    : n_heads(cfg.n_heads), n_kv_heads(cfg.n_kv_heads), head_dim(cfg.head_dim) {
  wq = register_module("wq", NoBias(cfg.dim, cfg.n_heads * head_dim));
  wk = register_module("wk", NoBias(cfg.dim, cfg.n_kv_heads * head_dim));
  wv = register_module("wv", NoBias(cfg.dim, cfg.n_kv_heads * head_dim));
  wo = register_module("wo", NoBias(cfg.n_heads * head_dim, cfg.dim));
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t b = x.size(0), s = x.size(1);
  at::Tensor q = wq->forward(x).view({b, s, n_heads, head_dim}).transpose(1, 2);
  at::Tensor k = wk->forward(x).view({b, s, n_kv_heads, head_dim}).transpose(1, 2);
  at::Tensor v = wv->forward(x).view({b, s, n_kv_heads, head_dim}).transpose(1, 2);
  q = ApplyRope(q, cos, sin);
  k = ApplyRope(k, cos, sin);
  at::Tensor out = at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/{}, /*dropout_p=*/0.0,
                                                    /*is_causal=*/s > 1, /*scale=*/std::nullopt,
                                                    /*enable_gqa=*/n_kv_heads != n_heads);
  return wo->forward(out.transpose(1, 2).reshape({b, s, -1}));
}

FeedForwardImpl::FeedForwardImpl(const LlamaConfig& cfg) {
  w1 = register_module("w1", NoBias(cfg.dim, cfg.ffn_dim));
  w3 = register_module("w3", NoBias(cfg.dim, cfg.ffn_dim));
  w2 = register_module("w2", NoBias(cfg.ffn_dim, cfg.dim));
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) {
  return w2->forward(at::silu(w1->forward(x)) * w3->forward(x));
}

TransformerBlockImpl::TransformerBlockImpl(const LlamaConfig& cfg) {
  attention_norm = register_module("attention_norm", RMSNorm(cfg.dim, cfg.norm_eps));
  attention = register_module("attention", Attention(cfg));
  ffn_norm = register_module("ffn_norm", RMSNorm(cfg.dim, cfg.norm_eps));
  feed_forward = register_module("feed_forward", FeedForward(cfg));
}

at::Tensor TransformerBlockImpl::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  at::Tensor h = x + attention->forward(attention_norm->forward(x), cos, sin);
  return h + feed_forward->forward(ffn_norm->forward(h));
}

LlamaImpl::LlamaImpl(const LlamaConfig& config) : cfg(config) {
  // Registration order = the Python model's: tok_embeddings, layers, norm, output.
  tok_embeddings = register_module("tok_embeddings", torch::nn::Embedding(cfg.vocab_size, cfg.dim));
  torch::nn::ModuleList list;
  for (int64_t i = 0; i < cfg.n_layers; ++i) {
    layers.push_back(TransformerBlock(cfg));
    list->push_back(layers.back());
  }
  register_module("layers", list);
  norm = register_module("norm", RMSNorm(cfg.dim, cfg.norm_eps));
  // Tied: no output module at all, so the shared weight is listed once (Python's named_parameters() dedups it).
  if (!cfg.tie_embeddings) output = register_module("output", NoBias(cfg.dim, cfg.vocab_size));
  // `this` outlives the function: modules live behind the shared_ptr of their holder (Llama).
  run_layer = [this](int64_t i, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    return layers[i]->forward(x, cos, sin);
  };
}

at::Tensor LlamaImpl::forward(const at::Tensor& tokens) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.scalar_type() == at::kLong, "Llama: tokens must be int64 [batch, seq]; got ",
              tokens.scalar_type(), " ", tokens.sizes());
  const int64_t s = tokens.size(1);
  TORCH_CHECK(s <= cfg.max_seq_len, "Llama: positions 0..", s - 1, " exceed max_seq_len ", cfg.max_seq_len);
  auto [cos, sin] = RopeCosSin(cfg, s, tokens.device());
  at::Tensor h = tok_embeddings->forward(tokens);
  for (int64_t i = 0; i < cfg.n_layers; ++i) h = run_layer(i, h, cos, sin);
  h = norm->forward(h);
  return cfg.tie_embeddings ? at::linear(h, tok_embeddings->weight) : output->forward(h);
}

absl::StatusOr<Llama> LoadLlama(const std::string& hf_dir) {
  absl::StatusOr<LlamaConfig> cfg = tessera::hf::ReadLlamaConfig(hf_dir);
  if (!cfg.ok()) return cfg.status();
  auto weights = tessera::hf::LoadLlamaWeights(hf_dir, *cfg);
  if (!weights.ok()) return weights.status();
  Llama model(*cfg);
  torch::NoGradGuard no_grad;
  auto params = model->named_parameters();
  // LoadLlamaWeights checked the files against LlamaParamShapes(cfg); a difference from the modules here is a bug in
  // one of the two, not bad input.
  if (params.size() != weights->size()) {
    return absl::InternalError(absl::StrCat("LoadLlama: the model has ", params.size(), " parameters but ", hf_dir,
                                            " gave ", weights->size(), " (LlamaParamShapes and LlamaImpl disagree)"));
  }
  for (auto& p : params) {
    auto it = weights->find(p.key());
    if (it == weights->end() || !it->second.sizes().equals(p.value().sizes())) {
      return absl::InternalError(absl::StrCat("LoadLlama: parameter '", p.key(), "' has no weight of its shape in ",
                                              hf_dir, " (LlamaParamShapes and LlamaImpl disagree)"));
    }
    p.value().copy_(it->second);
  }
  return model;
}
