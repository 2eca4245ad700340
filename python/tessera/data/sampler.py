"""DistributedSampler (which rows each rank trains on, deterministic and resumable) and split_heldout.

[Note: sampler determinism]
Epoch e's order is a permutation of range(num_samples) drawn from a torch.Generator seeded from (seed, e) alone, so
every rank computes the same permutation without communicating, a restarted job recomputes it exactly, and the
order does not depend on how many indices were drawn before. Rank r takes positions r, r + world, r + 2*world, ...
of it, num_samples // world_size in all: the tail is dropped so every rank runs the same number of steps (a rank
with one more batch would wait forever in the collectives of a step the others never take). The state is just
(epoch, position in this rank's share), so a checkpoint restores the stream exactly.
"""

from __future__ import annotations

import hashlib

import torch

from tessera.errors import InvalidArgumentError


def _generator(seed: int, epoch: int) -> torch.Generator:
    # A hash of both, not seed + epoch, so (seed 0, epoch 1) and (seed 1, epoch 0) differ.
    digest = hashlib.sha256(f"tessera.data:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class DistributedSampler:
    """This rank's share of the samples, epoch after epoch (see [Note: sampler determinism]).

    num_samples: rows to draw from; world_size, rank: this process's place; seed: the order's seed; shuffle=False
    keeps range order. Raises InvalidArgumentError when num_samples < world_size or rank not in [0, world_size)."""

    def __init__(self, num_samples: int, *, world_size: int, rank: int, seed: int, shuffle: bool = True) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise InvalidArgumentError(f"DistributedSampler: rank {rank} with world_size {world_size}; expected "
                                       "world_size >= 1 and 0 <= rank < world_size")
        if num_samples < world_size:
            raise InvalidArgumentError(f"DistributedSampler: {num_samples} samples for {world_size} ranks; every "
                                       "rank needs at least one (use more data or a shorter seq_len)")
        self.num_samples, self.world_size, self.rank = num_samples, world_size, rank
        self.seed, self.shuffle = seed, shuffle
        self.per_rank = num_samples // world_size
        self._epoch, self._position = 0, 0
        self._order: list[int] | None = None  # this rank's share of epoch self._epoch

    @property
    def epoch(self) -> int:
        """The epoch the next index comes from (0-based)."""
        return self._epoch

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's num_samples // world_size indices of `epoch`, in order."""
        if self.shuffle:
            perm = torch.randperm(self.num_samples, generator=_generator(self.seed, epoch)).tolist()
        else:
            perm = list(range(self.num_samples))
        return perm[self.rank:self.per_rank * self.world_size:self.world_size]

    def next_indices(self, n: int) -> list[int]:
        """This rank's next n sample indices, continuing into the next epoch(s) when this one runs out."""
        if n < 0:
            raise InvalidArgumentError(f"DistributedSampler.next_indices: n={n}, expected >= 0")
        out: list[int] = []
        while len(out) < n:
            if self._position == self.per_rank:
                self._epoch, self._position, self._order = self._epoch + 1, 0, None
            if self._order is None:
                self._order = self.epoch_indices(self._epoch)
            take = min(n - len(out), self.per_rank - self._position)
            out += self._order[self._position:self._position + take]
            self._position += take
        return out

    def state_dict(self) -> dict:
        """{"epoch": int, "position": int, "world_size": int}: where the next index comes from, in the share of a
        world of that many ranks."""
        return {"epoch": self._epoch, "position": self._position, "world_size": self.world_size}

    def load_state_dict(self, sd: dict) -> None:
        """Restores state_dict() output exactly. Raises InvalidArgumentError when keys are missing, the state was
        saved by a sampler of another world_size (its position counts rows of another share: resuming from it
        would repeat or skip rows), or the position is outside this rank's share [0, num_samples // world_size].
        A state without "world_size" (saved before it was recorded) is taken as this world size's."""
        try:
            epoch, position = int(sd["epoch"]), int(sd["position"])
            world = int(sd.get("world_size", self.world_size))
        except (AttributeError, KeyError, TypeError, ValueError):
            raise InvalidArgumentError(f"DistributedSampler.load_state_dict: expected {{'epoch': int, 'position': "
                                       f"int, 'world_size': int}}, got {sd!r:.200}") from None
        if world != self.world_size:
            raise InvalidArgumentError(f"DistributedSampler.load_state_dict: the state was saved in a world of "
                                       f"{world} ranks; this sampler (rank {self.rank}) is in a world of "
                                       f"{self.world_size}. A position counts rows of one rank's share, so it "
                                       f"would repeat or skip rows in another world: resume on {world} ranks, or "
                                       "start from a fresh sampler")
        if epoch < 0 or not 0 <= position <= self.per_rank:
            raise InvalidArgumentError(f"DistributedSampler.load_state_dict: epoch {epoch}, position {position}; "
                                       f"expected epoch >= 0 and 0 <= position <= {self.per_rank} (this rank's "
                                       f"share of {self.num_samples} samples over {self.world_size} ranks)")
        self._epoch, self._position, self._order = epoch, position, None


def split_heldout(n: int, fraction: float, *, seed: int) -> tuple[list[int], list[int]]:
    """Splits items 0..n-1 (conversations or documents: split before packing, so no item is in both) into
    (train_idx, eval_idx), each sorted. The eval side has round(n * fraction) items, at least 1 when fraction > 0
    and n >= 2, at most n - 1; fraction 0 gives no eval items. Deterministic in (n, fraction, seed).
    Raises InvalidArgumentError for n < 0 or fraction outside [0, 1)."""
    if n < 0:
        raise InvalidArgumentError(f"split_heldout: n={n}, expected >= 0")
    if not 0 <= fraction < 1:
        raise InvalidArgumentError(f"split_heldout: fraction={fraction}, expected 0 <= fraction < 1")
    n_eval = 0 if fraction == 0 or n < 2 else min(max(1, round(n * fraction)), n - 1)
    perm = torch.randperm(n, generator=_generator(seed, -1)).tolist()
    return sorted(perm[n_eval:]), sorted(perm[:n_eval])
