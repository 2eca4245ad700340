"""One tokenized document (Example) and the label value that means "not trained"."""

from __future__ import annotations

from dataclasses import dataclass

from tessera.errors import InvalidArgumentError

# The ignore_index of torch.nn.functional.cross_entropy: positions with this label add nothing to the loss.
IGNORE_INDEX = -100


@dataclass
class Example:
    """One tokenized document, NOT shifted: input_ids and labels are lists of ints of the same length n, and
    labels[i] == input_ids[i] where token i is trained on (as a target), IGNORE_INDEX (-100) elsewhere.

    Raises InvalidArgumentError when the lengths differ or a label is neither its token nor -100."""

    input_ids: list[int]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise InvalidArgumentError(f"Example: input_ids has {len(self.input_ids)} tokens but labels has "
                                       f"{len(self.labels)}; expected the same length")
        for i, (tok, lab) in enumerate(zip(self.input_ids, self.labels)):
            if lab != IGNORE_INDEX and lab != tok:
                raise InvalidArgumentError(f"Example: labels[{i}] is {lab}; expected input_ids[{i}] ({tok}) or "
                                           f"{IGNORE_INDEX}")

    @property
    def num_label_tokens(self) -> int:
        """How many tokens are trained on (labels != -100), before shifting."""
        return sum(1 for lab in self.labels if lab != IGNORE_INDEX)
