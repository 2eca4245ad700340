"""Tiny random Hugging Face models (transformers' own classes) written to a directory, for parity tests."""

from __future__ import annotations

import torch

VOCAB = 96

# name -> (transformers config class name, config kwargs). Between them: GQA and plain multi-head, tied and untied
# head, Llama 3.1 rope scaling, an explicit head_dim, and a Mistral sliding window shorter than the test sequence.
CONFIGS = {
    "llama_gqa_untied_rope_scaling": ("LlamaConfig", dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        rope_theta=50000.0, tie_word_embeddings=False, max_position_embeddings=256,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16})),
    "llama_mha_tied_head_dim": ("LlamaConfig", dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        head_dim=16, rope_theta=10000.0, tie_word_embeddings=True, max_position_embeddings=128)),
    "mistral_sliding_window": ("MistralConfig", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_theta=10000.0, sliding_window=5, tie_word_embeddings=False, max_position_embeddings=128)),
}


def make(name: str, out_dir, seed: int = 0):
    """Writes a randomly initialised transformers model `name` (see CONFIGS) to out_dir in fp32; returns it.
    Norm weights are randomised too, so a swapped or missing norm shows."""
    import transformers

    cls_name, kwargs = CONFIGS[name]
    cfg = getattr(transformers, cls_name)(vocab_size=VOCAB, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                                          **kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.eval()
    model.save_pretrained(out_dir)
    return model
