"""MetricsWriter and Progress on several ranks: only rank 0 writes the file and prints, however many create them."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest

from conftest import run_ranks
from tessera.errors import NotSupportedError
from tessera.metrics import MetricsWriter, Progress, read_metrics


def _rank_fn(rank: int, world: int, out_dir: str) -> None:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), MetricsWriter(out_dir) as w:
        p = Progress(2, log_every=1)
        for step in (1, 2):
            w.log(step, {"loss": float(rank * 10 + step)})  # each rank's own values
            p.update(step, loss=1.0, lr=1e-3, tokens_per_s=5.0, mfu=None, peak_mem_bytes=None)
        p.close()
    with open(f"{out_dir}/printed.{rank}", "w") as f:
        f.write(printed.getvalue())


def test_only_rank0_writes_and_prints(tmp_path):
    run_ranks(2, _rank_fn, str(tmp_path))
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]  # rank 0's values
    assert (tmp_path / "printed.0").read_text().splitlines() == [
        "step 1/2 loss 1.0000 lr 1.00e-03 tok/s 5", "step 2/2 loss 1.0000 lr 1.00e-03 tok/s 5"]
    assert (tmp_path / "printed.1").read_text() == ""
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1  # one event file: rank 0's


def test_missing_tensorboard_is_a_clear_error_that_changes_nothing(tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(NotSupportedError, match="needs the tensorboard package.*tensorboard=False"):
        MetricsWriter(tmp_path, resume_step=1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'
