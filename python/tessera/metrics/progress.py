"""Training progress on the console: a tqdm bar on a terminal, plain lines in logs.

A bar redraws itself with carriage returns, which in a CI log or a file of a Slurm job becomes one unreadable line
per refresh; so when stderr is not a terminal, Progress prints a plain line every `log_every` steps instead.
"""

from __future__ import annotations

import math
import sys

from tessera.metrics.rank import is_rank0

_GIB = 1024 ** 3


def format_fields(loss: float, lr: float, tokens_per_s: float, mfu: float | None,
                  peak_mem_bytes: int | None) -> str:
    """"loss 2.3456 lr 3.00e-04 tok/s 12,345 MFU 41.2% mem 1.25 GiB": MFU (a fraction, shown in %) and memory
    (bytes, shown in GiB) are left out when None."""
    parts = [f"loss {_num(loss, '.4f')}", f"lr {_num(lr, '.2e')}", f"tok/s {_num(tokens_per_s, ',.0f')}"]
    if mfu is not None:
        parts.append(f"MFU {_num(100 * mfu, '.1f')}%")
    if peak_mem_bytes is not None:
        parts.append(f"mem {peak_mem_bytes / _GIB:.2f} GiB")
    return " ".join(parts)


def _num(x: float, spec: str) -> str:
    return format(x, spec) if math.isfinite(x) else str(x)  # nan/inf as such, not a crash of the format spec


class Progress:
    """A tqdm bar over training steps on rank 0 (nothing on other ranks, or when enabled=False). When stderr is not
    a TTY (CI, log files) it prints a plain line to stdout every `log_every` steps and at the last step instead:
    "step 10/100 loss 2.3456 lr 3.00e-04 tok/s 12,345 MFU 41.2% mem 1.25 GiB".

    total_steps: the run's last step; initial_step: the step a resumed run starts after (0 for a fresh run).
    """

    def __init__(self, total_steps: int, *, initial_step: int = 0, enabled: bool = True,
                 log_every: int = 10) -> None:
        if log_every < 1:
            raise ValueError(f"Progress: log_every must be >= 1, found {log_every}")
        self.total_steps = total_steps
        self.log_every = log_every
        self.enabled = enabled and is_rank0()
        self._bar = None
        if self.enabled and getattr(sys.stderr, "isatty", lambda: False)():
            from tqdm import tqdm  # lazily: only a terminal needs it

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr)

    def update(self, step: int, *, loss: float, lr: float, tokens_per_s: float, mfu: float | None,
               peak_mem_bytes: int | None) -> None:
        """Moves the bar to `step` (1-based: the step just finished) and shows loss, learning rate, tokens/s, MFU
        in % (omitted when None) and peak memory in GiB (omitted when None)."""
        if not self.enabled:
            return
        fields = format_fields(loss, lr, tokens_per_s, mfu, peak_mem_bytes)
        if self._bar is not None:
            self._bar.set_postfix_str(fields, refresh=False)
            self._bar.update(step - self._bar.n)
        elif step % self.log_every == 0 or step == self.total_steps:
            print(f"step {step}/{self.total_steps} {fields}", flush=True)

    def write(self, message: str) -> None:
        """Prints `message` on its own line (above the bar on a terminal); nothing when disabled."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, flush=True)

    def close(self) -> None:
        """Closes the bar (leaving its last state on screen); later calls print plain lines. Idempotent."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
