"""Mistral: the Llama decoder with sliding-window attention when MistralConfig.sliding_window is set (v0.1: 4096
tokens; v0.3: none). The layers are Llama's (tessera.models.llama.model), which honour the window."""

from __future__ import annotations

from tessera.models.llama.model import Llama
from tessera.models.mistral.args import MistralConfig


class Mistral(Llama):
    """forward(tokens int64 [batch, seq], cache=None) -> logits [batch, seq, vocab]; see Llama."""

    def __init__(self, cfg: MistralConfig):
        super().__init__(cfg)
