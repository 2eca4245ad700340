"""tessera.data: the data side of fine-tuning recipes — chat templates, packing, token files, a resumable sampler.

Supervised fine-tuning on conversations::

    from transformers import AutoTokenizer
    from tessera.data import load_conversations, build_sft, DistributedSampler

    tok = AutoTokenizer.from_pretrained(model_dir)                   # a fast tokenizer with a chat template
    convs = load_conversations("chatterbot-corpus")                  # or "chitchat-dataset", or "my.jsonl"
    train, heldout, stats = build_sft(convs, tok, seq_len=512)       # PackedRows, PackedRows | None, dict
    sampler = DistributedSampler(len(train), world_size=world, rank=rank, seed=0)
    batch = train.batch(sampler.next_indices(batch_size))            # Batch of int64 [B, T] tensors
    logits = model(batch.input_ids, doc_ids=batch.doc_ids)           # documents isolated within packed rows
    loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)  # labels pre-shifted
    checkpoint_state["sampler"] = sampler.state_dict()  # {"epoch", "position", "world_size"}: resumes exactly

Continued pretraining on plain text: ``build_text(paths, tok, seq_len=1024, cache_path=".../corpus.tok")`` tokenizes
the files once into a memory-mapped TokenFile and returns TokenFileRows with the same .batch() API.

Modules: example (Example), chat (render_chat), corpora (load_conversations), token_file (TokenFile), batch
(Batch), packing (pack, PackedRows), token_rows (TokenFileRows), sampler (DistributedSampler, split_heldout), build
(build_sft, build_text).
"""

from tessera.data.batch import Batch
from tessera.data.build import build_sft, build_text, split_documents
from tessera.data.chat import render_chat
from tessera.data.corpora import load_conversations
from tessera.data.example import IGNORE_INDEX, Example
from tessera.data.packing import PackedRows, pack
from tessera.data.sampler import DistributedSampler, split_heldout
from tessera.data.token_file import TokenFile, TokenFileError
from tessera.data.token_rows import TokenFileRows

__all__ = ["Batch", "DistributedSampler", "Example", "IGNORE_INDEX", "PackedRows", "TokenFile", "TokenFileError",
           "TokenFileRows", "build_sft", "build_text", "load_conversations", "pack", "render_chat",
           "split_documents", "split_heldout"]
