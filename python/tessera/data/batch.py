"""Batch: the tensors the training loop feeds the model for one step (or one micro-batch).

[Note: batches are read-only]
Nothing in tessera writes into a batch's tensors in place. They may share storage with each other (a producer
that slices input_ids and labels out of one [B, T + 1] tensor gives views of one storage: a 1-row slice even counts
as contiguous, so .contiguous() does not copy it) or with data the user owns (their own rows object). A consumer
that needs other values (the evaluation's fully masked batch on a rank with no held-out rows left) makes new
tensors: Batch(input_ids, torch.full_like(labels, IGNORE_INDEX), doc_ids), never labels.fill_(). Writing -100 into
labels that were a view of the inputs once put -100 into input_ids (an IndexError in the embedding on one rank,
failed collectives on the others). tessera's own producers (PackedRows, TokenFileRows, the recipes' synthetic rows)
return three tensors that share storage with nothing, so a user may change the batches they get
(tests/python/data/test_batch.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessera.data.example import IGNORE_INDEX


@dataclass
class Batch:
    """input_ids, labels and doc_ids, each int64 [B, T].

    labels are ALREADY SHIFTED: labels[b, t] is the target for position t (the token that follows input_ids[b, t]
    in its document), IGNORE_INDEX (-100) where nothing is trained: prompt tokens, padding, and the position whose
    next token belongs to another document. doc_ids[b, t] is the document of position t within its row (padding has
    an id of its own), for model.forward(input_ids, doc_ids=doc_ids), which restarts positions at each document and
    keeps attention inside it. Loss: cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100).
    Consumers never write into these tensors (see [Note: batches are read-only])."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    doc_ids: torch.Tensor

    @property
    def num_label_tokens(self) -> int:
        """Number of positions that are trained on (labels != -100): the token count a loss is averaged over."""
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The same batch on `device`."""
        return Batch(self.input_ids.to(device, non_blocking=non_blocking),
                     self.labels.to(device, non_blocking=non_blocking),
                     self.doc_ids.to(device, non_blocking=non_blocking))
