// tessera::hf (csrc/tessera/api/hf_safetensors.h): safetensors files written byte by byte here (8-byte length, JSON
// header, data) are read back to the tensors they were written from; each malformed file gives its own error;
// config.json fields and the HF <-> tessera names follow python/tessera/models/llama/{args,state_dict_adapter}.py.
#include "tessera/api/hf_safetensors.h"

#include <ftw.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "gtest/gtest.h"

namespace tessera::hf {
namespace {

// POSIX rather than std::filesystem, whose symbols libtorch.so exports in a copy that crashes (see hf_safetensors.cc).
void RemoveAll(const std::string& path) {
  ::nftw(
      path.c_str(),
      [](const char* p, const struct stat*, int type, struct FTW*) {
        return (type == FTW_DP ? ::rmdir(p) : ::unlink(p)), 0;
      },
      16, FTW_DEPTH | FTW_PHYS);
}

// gmock's HasSubstr without gmock (the torch tests link gtest only).
::testing::AssertionResult Contains(const absl::Status& st, const std::string& piece) {
  if (std::string(st.message()).find(piece) != std::string::npos) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "message of " << st << "\n  lacks: " << piece;
}

class HfTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tessera_hf_test_XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { RemoveAll(dir_); }
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }
  // An empty subdirectory `name`, made afresh.
  void FreshDir(const std::string& name) {
    RemoveAll(Path(name));
    ASSERT_EQ(::mkdir(Path(name).c_str(), 0755), 0) << Path(name);
  }
  std::string dir_;
};

void WriteBytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// The 8-byte little-endian length, the header, the data: the file layout, written independently of the reader.
std::string Frame(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + data;
}

struct Spec {
  std::string name, dtype;  // safetensors dtype name
  at::Tensor value;
};

// A well-formed file holding `specs` in order, with a __metadata__ entry as transformers writes.
void WriteSafetensors(const std::string& path, const std::vector<Spec>& specs) {
  std::string header = "{\"__metadata__\":{\"format\":\"pt\"}", data;
  for (const Spec& s : specs) {
    at::Tensor t = s.value.contiguous();
    std::string shape;
    for (int64_t d : t.sizes()) shape += (shape.empty() ? "" : ",") + std::to_string(d);
    const size_t begin = data.size();
    data.append(static_cast<const char*>(t.data_ptr()), t.nbytes());
    header += ",\"" + s.name + "\":{\"dtype\":\"" + s.dtype + "\",\"shape\":[" + shape + "],\"data_offsets\":[" +
              std::to_string(begin) + "," + std::to_string(data.size()) + "]}";
  }
  header += "}";
  header.append((8 - header.size() % 8) % 8, ' ');
  WriteBytes(path, Frame(header, data));
}

TEST_F(HfTest, ReadsBackValuesDtypesAndShapes) {
  at::manual_seed(1);
  const std::vector<Spec> specs = {
      {"a.f32", "F32", at::randn({2, 3})},
      {"b.bf16", "BF16", at::randn({4}).to(at::kBFloat16)},
      {"c.f16", "F16", at::randn({3, 1, 2}).to(at::kHalf)},
      {"d.f64", "F64", at::randn({5}, at::kDouble)},
      {"e.i64", "I64", at::randint(-1000, 1000, {2, 2}, at::kLong)},
      {"f.empty", "F32", at::empty({0, 4})},
      {"g.scalar", "I32", at::full({}, 7, at::kInt)},
  };
  WriteSafetensors(Path("x.safetensors"), specs);
  auto read = ReadSafetensors(Path("x.safetensors"));
  ASSERT_TRUE(read.ok()) << read.status();
  ASSERT_EQ(read->size(), specs.size());
  for (size_t i = 0; i < specs.size(); ++i) {  // file order is the written order
    const auto& [name, t] = (*read)[i];
    EXPECT_EQ(name, specs[i].name);
    EXPECT_EQ(t.scalar_type(), specs[i].value.scalar_type()) << name;
    EXPECT_EQ(t.sizes(), specs[i].value.sizes()) << name;
    EXPECT_TRUE(at::equal(t, specs[i].value)) << name;
  }
}

// Each malformed file: (file bytes, a piece of the message that says what is wrong).
TEST_F(HfTest, MalformedFilesGiveTheirError) {
  const std::string good_entry = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  const std::string eight(8, '\1');
  std::string huge_len(8, '\0');
  huge_len[3] = 1;  // 2^24 bytes of header in a file of 20 bytes
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"abc", "truncated: 3 bytes"},
      {huge_len + "{}xxxxxxxxxx", "header length 16777216 does not fit"},
      {Frame("{\"w\": [1, 2", eight), "header is not a JSON object"},
      {Frame("[1, 2]", eight), "header is not a JSON object"},
      {Frame(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,16]}})", eight), "are outside the data (8 bytes"},
      {Frame(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", eight), "are outside the data"},
      {Frame(R"({"w":{"dtype":"Q4_K","shape":[2],"data_offsets":[0,8]}})", eight), "unknown dtype 'Q4_K'"},
      {Frame(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight),
       "hold 8 bytes, but F32 shape [3] needs 12"},
      {Frame(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight), "non-integer or negative"},
      {Frame(R"({"w":{"dtype":"F32","shape":[2]}})", eight), "no 'data_offsets'"},
      {Frame(
           R"({"v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
           eight),
       "'v' and 'w' overlap"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string path = Path("bad" + std::to_string(i) + ".safetensors");
    WriteBytes(path, cases[i].first);
    auto read = ReadSafetensors(path);
    ASSERT_FALSE(read.ok()) << "case " << i;
    EXPECT_EQ(read.status().code(), absl::StatusCode::kInvalidArgument) << read.status();
    EXPECT_TRUE(Contains(read.status(), path)) << "case " << i;
    EXPECT_TRUE(Contains(read.status(), cases[i].second)) << "case " << i;
  }
  WriteBytes(Path("ok.safetensors"), Frame(good_entry, eight));
  EXPECT_TRUE(ReadSafetensors(Path("ok.safetensors")).ok());  // the same framing is accepted when the entry is good
  EXPECT_EQ(ReadSafetensors(Path("missing.safetensors")).status().code(), absl::StatusCode::kNotFound);
  FreshDir("a_dir.safetensors");
  EXPECT_TRUE(Contains(ReadSafetensors(Path("a_dir.safetensors")).status(), "not a regular file"));
}

constexpr char kLlama31Config[] = R"({
  "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
  "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": false,
  "hidden_act": "silu", "attention_bias": false, "mlp_bias": false, "torch_dtype": "bfloat16",
  "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192, "rope_type": "llama3"}})";

TEST(HfConfig, ReadsLlama31) {  // Llama-3.1-8B's config.json (LLAMA_CONFIGS["llama3.1-8b"] in args.py)
  auto c = LlamaConfigFromJson(kLlama31Config, "config.json");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 128256);
  EXPECT_EQ(c->dim, 4096);
  EXPECT_EQ(c->n_layers, 32);
  EXPECT_EQ(c->n_heads, 32);
  EXPECT_EQ(c->n_kv_heads, 8);
  EXPECT_EQ(c->head_dim, 128);
  EXPECT_EQ(c->ffn_dim, 14336);
  EXPECT_EQ(c->max_seq_len, 131072);
  EXPECT_DOUBLE_EQ(c->norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c->rope_theta, 500000.0);
  EXPECT_FALSE(c->tie_embeddings);
  ASSERT_TRUE(c->rope_scaling.has_value());
  EXPECT_DOUBLE_EQ(c->rope_scaling->factor, 8.0);
  EXPECT_EQ(c->rope_scaling->original_max_seq_len, 8192);
}

TEST(HfConfig, DefaultsAndTransformers5RopeParameters) {
  auto c = LlamaConfigFromJson(R"({"model_type": "llama", "vocab_size": 10, "hidden_size": 48, "num_hidden_layers": 1,
      "num_attention_heads": 4, "intermediate_size": 8, "head_dim": 16, "tie_word_embeddings": true,
      "rope_parameters": {"rope_type": "default", "rope_theta": 12345.0}})",
                               "cfg");
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->n_kv_heads, 4);  // absent: multi-head attention
  EXPECT_EQ(c->head_dim, 16);   // given, not 48 / 4
  EXPECT_EQ(c->max_seq_len, 2048);
  EXPECT_DOUBLE_EQ(c->norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c->rope_theta, 12345.0);
  EXPECT_FALSE(c->rope_scaling.has_value());
  EXPECT_TRUE(c->tie_embeddings);
}

TEST(HfConfig, ErrorsNameTheFieldAndCode) {
  const std::string base = R"("vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
      "intermediate_size": 8)";
  const std::vector<std::tuple<std::string, absl::StatusCode, std::string>> cases = {
      {"{\"model_type\": \"gpt2\", " + base + "}", absl::StatusCode::kInvalidArgument, "model_type \"gpt2\""},
      {R"({"model_type": "llama", "hidden_size": 8})", absl::StatusCode::kInvalidArgument,
       "required field 'num_attention_heads' is missing"},
      {"{\"model_type\": \"llama\", \"attention_bias\": true, " + base + "}", absl::StatusCode::kUnimplemented,
       "attention_bias=true"},
      {"{\"model_type\": \"llama\", \"hidden_act\": \"gelu\", " + base + "}", absl::StatusCode::kUnimplemented,
       "hidden_act \"gelu\""},
      {"{\"model_type\": \"llama\", \"rope_scaling\": {\"rope_type\": \"yarn\", \"factor\": 2}, " + base + "}",
       absl::StatusCode::kUnimplemented, "rope scaling type 'yarn'"},
      {"{\"model_type\": \"llama\", \"num_key_value_heads\": 3, " + base + "}", absl::StatusCode::kInvalidArgument,
       "n_heads 2 must be divisible by n_kv_heads 3"},
      {"{\"model_type\": \"llama\", \"max_position_embeddings\": \"long\", " + base + "}",
       absl::StatusCode::kInvalidArgument, "'max_position_embeddings' must be an integer"},
      {"{\"model_type\": \"llama\", " + base, absl::StatusCode::kInvalidArgument, "not valid JSON"},
  };
  for (const auto& [text, code, msg] : cases) {
    auto c = LlamaConfigFromJson(text, "dir/config.json");
    ASSERT_FALSE(c.ok()) << text;
    EXPECT_EQ(c.status().code(), code) << c.status();
    EXPECT_TRUE(Contains(c.status(), "dir/config.json: ")) << c.status();
    EXPECT_TRUE(Contains(c.status(), msg)) << c.status();
  }
}

// One layer, grouped-query attention (2 heads, 1 KV head).
LlamaConfig TinyConfig() {
  LlamaConfig c;
  c.vocab_size = 10, c.dim = 8, c.n_layers = 1, c.n_heads = 2, c.n_kv_heads = 1, c.ffn_dim = 6, c.head_dim = 4;
  c.max_seq_len = 16;
  return c;
}

TEST(HfNames, MatchTheHfLayoutBothWays) {
  LlamaConfig c = TinyConfig();
  c.n_layers = 12;
  EXPECT_EQ(*ToHf("layers.11.attention.wk.weight"), "model.layers.11.self_attn.k_proj.weight");
  EXPECT_EQ(*ToHf("layers.0.feed_forward.w3.weight"), "model.layers.0.mlp.up_proj.weight");
  EXPECT_EQ(*ToHf("output.weight"), "lm_head.weight");
  EXPECT_EQ(ToHf("layers.0.attention.wk.bias").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FromHf("model.layers.3.post_attention_layernorm.weight"), "layers.3.ffn_norm.weight");
  EXPECT_EQ(FromHf("model.layers.x.mlp.up_proj.weight"), std::nullopt);
  EXPECT_EQ(FromHf("model.rotary_emb.inv_freq"), std::nullopt);
  for (const auto& [name, shape] : LlamaParamShapes(c)) EXPECT_EQ(FromHf(*ToHf(name)), name);
}

// A one-layer GQA model's weights as HF names, values from the seed (and the index of the tensor).
std::vector<Spec> HfWeights(const LlamaConfig& c, bool with_lm_head) {
  std::vector<Spec> out;
  int i = 0;
  for (const auto& [name, shape] : LlamaParamShapes(c)) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    out.push_back({*ToHf(name), "F32", (at::arange(n, at::kFloat) + 1000 * i++).reshape(shape)});
  }
  if (with_lm_head) out.push_back({"lm_head.weight", "F32", at::zeros({c.vocab_size, c.dim})});
  return out;
}

const LlamaConfig kTiny = TinyConfig();

TEST_F(HfTest, LoadsWeightsUnderTesseraNamesFromOneFileOrAnIndex) {
  for (bool tied : {false, true}) {
    LlamaConfig c = kTiny;
    c.tie_embeddings = tied;
    const auto specs = HfWeights(c, /*with_lm_head=*/tied);  // a tied model's files may carry lm_head anyway
    FreshDir("one");
    WriteSafetensors(Path("one/model.safetensors"), specs);
    // The same tensors split over two files with an index.
    FreshDir("two");
    std::vector<Spec> first(specs.begin(), specs.begin() + 4), second(specs.begin() + 4, specs.end());
    WriteSafetensors(Path("two/model-00001-of-00002.safetensors"), first);
    WriteSafetensors(Path("two/model-00002-of-00002.safetensors"), second);
    std::string map;
    for (size_t i = 0; i < specs.size(); ++i) {
      map +=
          (i ? "," : "") + ("\"" + specs[i].name + "\":\"model-0000" + (i < 4 ? "1" : "2") + "-of-00002.safetensors\"");
    }
    WriteBytes(Path("two/model.safetensors.index.json"), "{\"metadata\":{},\"weight_map\":{" + map + "}}");
    for (const char* sub : {"one", "two"}) {
      auto w = LoadLlamaWeights(Path(sub), c);
      ASSERT_TRUE(w.ok()) << w.status();
      const auto expected = LlamaParamShapes(c);
      ASSERT_EQ(w->size(), expected.size()) << sub;
      EXPECT_EQ(w->count("output.weight"), tied ? 0u : 1u);
      for (const Spec& s : specs) {
        std::string name = *FromHf(s.name);
        if (tied && name == "output.weight") continue;
        ASSERT_TRUE(w->count(name)) << name;
        EXPECT_TRUE(at::equal(w->at(name), s.value)) << sub << " " << name;
      }
    }
  }
}

TEST_F(HfTest, WeightErrorsNameTheKeys) {
  auto specs = HfWeights(kTiny, false);
  auto write_and_load = [&](const std::vector<Spec>& s) {
    WriteSafetensors(Path("model.safetensors"), s);
    return LoadLlamaWeights(dir_, kTiny).status();
  };
  auto missing = specs;
  missing.erase(missing.begin() + 2);  // layers.0.attention.wq.weight
  auto extra = specs;
  extra.push_back({"model.layers.0.self_attn.q_proj.bias", "F32", at::zeros({8})});
  auto misshaped = specs;
  misshaped[0].value = at::zeros({11, 8});
  const std::vector<std::pair<std::vector<Spec>, std::string>> cases = {
      {missing, "missing tensors 'model.layers.0.self_attn.q_proj.weight'"},
      {extra, "unexpected tensors 'model.layers.0.self_attn.q_proj.bias'"},
      {misshaped, "'model.embed_tokens.weight' (model.safetensors) has shape [11, 8], but config.json implies [10, 8]"},
  };
  for (const auto& [s, msg] : cases) {
    absl::Status st = write_and_load(s);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << st;
    EXPECT_TRUE(Contains(st, dir_ + ": the weights do not match config.json"));
    EXPECT_TRUE(Contains(st, msg)) << st;
  }
  ::unlink(Path("model.safetensors").c_str());
  WriteBytes(Path("pytorch_model.bin"), "");
  absl::Status st = LoadLlamaWeights(dir_, kTiny).status();
  EXPECT_TRUE(Contains(st, "no model.safetensors or model.safetensors.index.json")) << st;
  EXPECT_TRUE(Contains(st, "found: pytorch_model.bin")) << st;
  WriteBytes(Path("model.safetensors.index.json"), R"({"weight_map": {"a": "model-00009.safetensors"}})");
  st = LoadLlamaWeights(dir_, kTiny).status();
  EXPECT_TRUE(Contains(st, "names model-00009.safetensors, which is missing")) << st;
}

}  // namespace
}  // namespace tessera::hf
