// Forward parity check against the Python model (tests/python/cpp/test_llama_forward.py):
//   llama_forward_check HF_DIR TOKENS BATCH SEQ LOGITS_OUT [NAMES_OUT]
// loads HF_DIR with LoadLlama, reads BATCH*SEQ int64 tokens (raw, native endianness) from TOKENS, runs forward and
// writes the logits as raw float32 [BATCH, SEQ, vocab] to LOGITS_OUT; NAMES_OUT gets named_parameters()' names, one a
// line, in order. Blocks run through a replaced run_layer (as under a trainer), which must see each layer once.
// Exit status 1 with the reason on stderr for any failure.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

#include "llama.h"

int main(int argc, char** argv) {
  if (argc != 6 && argc != 7) {
    std::cerr << "usage: " << argv[0] << " HF_DIR TOKENS BATCH SEQ LOGITS_OUT [NAMES_OUT]\n";
    return 1;
  }
  const int64_t batch = std::stoll(argv[3]), seq = std::stoll(argv[4]);
  std::ifstream in(argv[2], std::ios::binary);
  at::Tensor tokens = at::empty({batch, seq}, at::kLong);
  in.read(static_cast<char*>(tokens.data_ptr()), static_cast<std::streamsize>(tokens.nbytes()));
  if (!in || in.peek() != std::char_traits<char>::eof()) {
    std::cerr << argv[2] << ": expected exactly " << tokens.nbytes() << " bytes (" << batch << "x" << seq
              << " int64 tokens)\n";
    return 1;
  }
  absl::StatusOr<Llama> model = LoadLlama(argv[1]);
  if (!model.ok()) {
    std::cerr << "LoadLlama: " << model.status() << "\n";
    return 1;
  }
  torch::NoGradGuard no_grad;
  // Routed through a replaced run_layer, as a trainer's sharding wrappers will be: forward must reach every block
  // through it, once.
  int64_t calls = 0;
  auto plain = (*model)->run_layer;
  (*model)->run_layer = [&](int64_t i, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    ++calls;
    return plain(i, x, cos, sin);
  };
  at::Tensor logits = (*model)->forward(tokens).to(at::kFloat).contiguous();
  if (calls != (*model)->cfg.n_layers) {
    std::cerr << "forward called run_layer " << calls << " times for " << (*model)->cfg.n_layers << " layers\n";
    return 1;
  }
  std::ofstream out(argv[5], std::ios::binary);
  out.write(static_cast<const char*>(logits.data_ptr()), static_cast<std::streamsize>(logits.nbytes()));
  if (!out.flush()) {
    std::cerr << argv[5] << ": could not write the logits\n";
    return 1;
  }
  if (argc == 7) {
    std::ofstream names(argv[6]);
    for (const auto& p : (*model)->named_parameters()) names << p.key() << "\n";
  }
  std::printf("logits %lld x %lld x %lld written to %s\n", static_cast<long long>(logits.size(0)),
              static_cast<long long>(logits.size(1)), static_cast<long long>(logits.size(2)), argv[5]);
  return 0;
}
