// Hugging Face model directories for C++ trainers: config.json -> LlamaConfig, safetensors files -> at::Tensor,
// and the Llama weights under tessera's (torchtitan) names. The C++ twin of python/tessera/models/hf/load.py,
// safetensors_files.py and models/llama/{args,state_dict_adapter}.py; keep the two in step (names, config fields,
// what is NotSupported).
//
// Errors: NotFound (no such directory or file), InvalidArgument (malformed config.json or safetensors file, weights
// that do not match the config), Unimplemented (a config feature tessera's Llama lacks; Python's NotSupportedError).
// Every message names the file and, where there is one, the key.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <ATen/Tensor.h>

#include "absl/status/statusor.h"

namespace tessera::hf {

// Llama 3.1's RoPE frequency scaling ("rope_type": "llama3"); see RopeScaling in python/tessera/models/llama/args.py.
struct RopeScaling {
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_seq_len = 8192;  // HF: original_max_position_embeddings
};

// A Llama-architecture decoder (HF model_type "llama"); field names follow python/tessera/models/llama/args.py.
// head_dim is always resolved (HF's head_dim, or dim / n_heads).
struct LlamaConfig {
  int64_t vocab_size = 0, dim = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, ffn_dim = 0, head_dim = 0,
          max_seq_len = 0;
  double norm_eps = 1e-6, rope_theta = 10000.0;
  bool tie_embeddings = false;
  std::optional<RopeScaling> rope_scaling;  // none: plain RoPE
};

// The LlamaConfig of an HF config.json's text; `where` names its source in errors. InvalidArgument for invalid JSON,
// a model_type other than "llama", missing or mistyped fields and inconsistent sizes; Unimplemented for biases, an
// activation other than silu, or RoPE scaling other than "llama3".
absl::StatusOr<LlamaConfig> LlamaConfigFromJson(const std::string& text, const std::string& where);
// The same, read from hf_dir/config.json (NotFound when the directory or the file is missing).
absl::StatusOr<LlamaConfig> ReadLlamaConfig(const std::string& hf_dir);

// Every tensor of one .safetensors file, in file order: HF names, the stored dtype (F64/F32/F16/BF16, F8_E4M3,
// F8_E5M2, I64/I32/I16/I8, U8, BOOL), CPU, owning memory. The file is checked as a whole before anything is read:
// InvalidArgument for a truncated file, a header length beyond the file, a header that is not a JSON object, an
// unknown dtype, a shape that does not match its byte range, or data_offsets outside the data or overlapping.
absl::StatusOr<std::vector<std::pair<std::string, at::Tensor>>> ReadSafetensors(const std::string& path);

// tessera parameter name <-> HF name (state_dict_adapter.py). ToHf: InvalidArgument for a name outside the Llama
// layout; FromHf: nullopt for an HF name tessera's Llama does not have.
absl::StatusOr<std::string> ToHf(const std::string& name);
std::optional<std::string> FromHf(const std::string& hf_name);

// Every parameter of the model under tessera's names, in the Python model's named_parameters() order, with its
// shape. Tied models have no "output.weight" (the head uses tok_embeddings.weight).
std::vector<std::pair<std::string, std::vector<int64_t>>> LlamaParamShapes(const LlamaConfig& cfg);

// The model's weights under tessera's names (stored dtype, CPU), from hf_dir/model.safetensors or the files listed
// in hf_dir/model.safetensors.index.json. Checks that exactly LlamaParamShapes(cfg) is there: InvalidArgument
// naming the missing, unexpected or mis-shaped keys and the directory. A tied model's files may hold
// lm_head.weight (a copy of the embedding); it is ignored.
absl::StatusOr<std::map<std::string, at::Tensor>> LoadLlamaWeights(const std::string& hf_dir, const LlamaConfig& cfg);

}  // namespace tessera::hf
