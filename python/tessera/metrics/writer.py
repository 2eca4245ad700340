"""A run's metrics on disk: <output_dir>/metrics.jsonl (the record tools read) and a TensorBoard event file.

metrics.jsonl holds one JSON object per line, `{"step": int, ...metrics}`, written and flushed line by line so a
crashed run keeps every step it logged. Several lines may share a step (the loop logs training metrics, then
evaluation metrics, at the same step); steps never go backwards within one file. Non-finite floats are written as
Python's json module writes them (NaN, Infinity), which read_metrics and Python's json read back.

[Note: metrics.jsonl on resume]
A run resumed from the checkpoint of step S re-runs steps S+1, S+2, ... that a crashed run may already have logged.
MetricsWriter(resume_step=S) therefore first rewrites the file keeping only the lines with step <= S (a temp file
renamed over the old one, so a crash during the rewrite leaves either file whole), and opens TensorBoard with
purge_step=S+1, which makes TensorBoard drop the old event files' points at steps > S. Each step then appears once.
A fresh run (resume_step=None) starts both afresh: the old metrics.jsonl is replaced, not appended to.
A last line without its newline is a write torn by a crash, not corruption: readers skip it and resume drops it.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path
from typing import Any

from tessera.errors import InvalidArgumentError, NotSupportedError, StateError
from tessera.metrics.rank import is_rank0

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The records of <output_dir>/metrics.jsonl in file order, each a dict with an int "step" and the logged
    metrics (None for null). A torn last line (no trailing newline, not valid JSON: a crash mid-write, or a live
    run's line being written) is skipped. Raises InvalidArgumentError naming the file (and line number) when the file
    is missing or a line is not a JSON object with an integer "step"."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        raise InvalidArgumentError(f"{path}: no metrics file (expected a run's output directory, which has "
                                   f"{METRICS_FILE} once the run logged its first step)")
    return _parse(path)[0]


def _parse(path: Path) -> tuple[list[dict], list[str]]:
    """(records, their lines without newline) of a metrics file; see read_metrics."""
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = lines[-1] if lines[-1] else None  # text after the last newline
    lines = lines[:-1]
    records, kept = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        records.append(_parse_line(path, number, line))
        kept.append(line)
    if torn is not None:
        try:
            records.append(_parse_line(path, len(lines) + 1, torn))
            kept.append(torn)
        except InvalidArgumentError:
            pass  # a torn write: see [Note: metrics.jsonl on resume]
    return records, kept


def _parse_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}): "
                                   f"{line[:120]!r}") from None
    if not isinstance(record, dict):
        raise InvalidArgumentError(f"{path}:{number}: expected a JSON object, found {type(record).__name__}")
    step = record.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise InvalidArgumentError(f"{path}:{number}: expected an integer \"step\", found {step!r}")
    return record


def _plain(key: str, value: Any) -> Any:
    """`value` as a JSON-serialisable Python value: 1-element tensors and numpy scalars become numbers."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):  # structured records (e.g. "stragglers"): metrics.jsonl only, not TensorBoard
        return [_plain(key, v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(f"{key}.{k}", v) for k, v in value.items()}
    if hasattr(value, "item"):
        try:
            return _plain(key, value.item())  # a one-element torch tensor or numpy array/scalar
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, numbers.Real):
        return float(value)
    raise InvalidArgumentError(f"metric {key!r}: expected a number, string or None, found {type(value).__name__} "
                               f"{value!r:.80}")


class MetricsWriter:
    """Rank 0's record of a run: <output_dir>/metrics.jsonl (one JSON object per line, flushed after each line)
    and a TensorBoard event file under <output_dir>/tensorboard/ (torch.utils.tensorboard.SummaryWriter).

    On a rank other than 0 of an initialised torch.distributed group it does nothing (`enabled` is False), so the
    loop may create it on every rank without the ranks writing one file at once. `resume_step`: the step of the
    checkpoint a resumed run starts from (None: a fresh run, which replaces an old metrics.jsonl); see
    [Note: metrics.jsonl on resume]. `tensorboard=False` writes metrics.jsonl only (and needs no tensorboard
    package; with tensorboard=True and no package, NotSupportedError says so). Use as a context manager or call
    close().
    """

    def __init__(self, output_dir: str | os.PathLike, *, tensorboard: bool = True,
                 resume_step: int | None = None) -> None:
        if resume_step is not None and (isinstance(resume_step, bool) or not isinstance(resume_step, int)
                                        or resume_step < 0):
            raise InvalidArgumentError(f"MetricsWriter: resume_step must be a step >= 0 or None, "
                                       f"found {resume_step!r}")
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / METRICS_FILE
        self.enabled = is_rank0()
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        if tensorboard:  # checked first: a missing package must not leave metrics.jsonl already truncated
            try:
                from torch.utils.tensorboard import SummaryWriter  # lazily: tensorboard is needed only here
            except ImportError as e:
                raise NotSupportedError(f"MetricsWriter({self.output_dir}): TensorBoard logging needs the "
                                        f"tensorboard package ({e}); pip install 'tensorboard>=2.15', or pass "
                                        f"tensorboard=False") from None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        kept = self._truncate(resume_step)
        self._last_step = kept[-1]["step"] if kept else None
        if tensorboard:
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.output_dir / TENSORBOARD_DIR), purge_step=purge,
                                     flush_secs=30)
        self._file = open(self.path, "a", encoding="utf-8")

    def _truncate(self, resume_step: int | None) -> list[dict]:
        """Rewrites metrics.jsonl to the lines with step <= resume_step (none for a fresh run), atomically."""
        records, lines = _parse(self.path) if self.path.is_file() else ([], [])
        if resume_step is None:
            records, lines = [], []
        else:
            keep = [i for i, r in enumerate(records) if r["step"] <= resume_step]
            records, lines = [records[i] for i in keep], [lines[i] for i in keep]
        tmp = self.path.with_name(f".{METRICS_FILE}.tmp.{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        return records

    def log(self, step: int, metrics: dict) -> None:
        """Appends {"step": step, **metrics} to metrics.jsonl (None kept as null) and, for each numeric value, a
        TensorBoard scalar "train/<key>", or "eval/<key without the eval_ prefix>" for keys starting with "eval_"
        (eval_loss -> eval/loss). Units are the caller's (the loop logs loss in nats/token, lr, tokens (count),
        tokens_per_s, mfu (fraction in [0, 1]), grad_norm, peak_mem_bytes (bytes), eval_loss, eval_ppl).
        Raises InvalidArgumentError for a step below the last one logged, a "step" key in metrics, or a value
        that is not a number, string, one-element tensor, None, or a list or dict of those (written to metrics.jsonl
        only). Does nothing on ranks other than 0."""
        if not self.enabled:
            return
        if self._file is None:
            raise StateError(f"MetricsWriter({self.output_dir}): log(step={step}) after close()")
        if isinstance(step, bool) or not isinstance(step, int):
            raise InvalidArgumentError(f"MetricsWriter.log: step must be an int, found {step!r}")
        if self._last_step is not None and step < self._last_step:
            raise InvalidArgumentError(f"{self.path}: step {step} logged after step {self._last_step}; steps must "
                                       f"not go backwards (a resumed run passes resume_step=its checkpoint's step)")
        if "step" in metrics:
            raise InvalidArgumentError(f"MetricsWriter.log(step={step}): 'step' is not a metric name")
        record = {"step": step}
        record.update({str(k): _plain(str(k), v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self._last_step = step
        if self._tb is not None:
            for key, value in record.items():
                if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
                    continue
                tag = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"
                self._tb.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        """Flushes and closes both files; idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
