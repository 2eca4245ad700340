"""MetricsWriter and read_metrics: metrics.jsonl round trips, resume truncation, and the TensorBoard events read
back with tensorboard's own reader."""

from __future__ import annotations

import json

import pytest
import torch

from tessera.errors import InvalidArgumentError
from tessera.metrics import MetricsWriter, read_metrics


def _logged(step: int) -> dict:
    # Distinct values per step, every kind the loop logs: floats, ints, None (no MFU on CPU), a 0-d tensor.
    return {"loss": 3.0 - 0.1 * step, "lr": 1e-4 * step, "tokens": 512 * step, "tokens_per_s": 1000.0 + step,
            "mfu": None, "grad_norm": torch.tensor(0.5 * step, dtype=torch.float64), "peak_mem_bytes": 2**30 + step}


def _expected(step: int, **changes) -> dict:
    record = {"step": step, **_logged(step), **changes}
    record["grad_norm"] = 0.5 * step
    return record


def _tb_scalars(output_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(output_dir / "tensorboard"))  # reads every event file of the directory in order
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_lines_round_trip(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in (1, 2, 3):
            w.log(step, _logged(step))
        w.log(3, {"eval_loss": 2.5, "eval_ppl": 12.18})  # eval metrics of the same step: a second line
    assert read_metrics(tmp_path) == [_expected(1), _expected(2), _expected(3),
                                      {"step": 3, "eval_loss": 2.5, "eval_ppl": 12.18}]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["mfu"] is None  # null on disk, one object per line


def test_each_line_is_flushed_before_close(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.log(1, {"loss": 2.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]  # a crash now would keep step 1
    w.close()


def test_resume_keeps_steps_up_to_the_checkpoint_once(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        for step in range(1, 11):
            w.log(step, _logged(step))
    # The crashed run logged 1..10; its last checkpoint is step 6; the resumed run re-does 7.. with new values.
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=6) as w:
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
        for step in (7, 8):
            w.log(step, {**_logged(step), "loss": 100.0 + step})
    assert read_metrics(tmp_path) == [_expected(s) for s in range(1, 7)] + [
        _expected(7, loss=107.0), _expected(8, loss=108.0)]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # the rewrite's temp file was renamed


def test_fresh_run_replaces_old_file(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(5, {"loss": 1.0})
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(1, {"loss": 9.0})
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 9.0}]


def test_torn_last_line_is_skipped_and_dropped_on_resume(tmp_path):
    good = [json.dumps({"step": s, "loss": float(s)}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(good) + '\n{"step": 4, "lo')  # killed mid-write
    assert read_metrics(tmp_path) == [{"step": s, "loss": float(s)} for s in (1, 2, 3)]
    with MetricsWriter(tmp_path, tensorboard=False, resume_step=3) as w:
        w.log(4, {"loss": 4.0})
    assert read_metrics(tmp_path) == [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]


def test_corrupt_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, loss: 1}\n{"step": 3}\n')
    with pytest.raises(InvalidArgumentError, match=rf"{path}:2: not valid JSON"):
        read_metrics(tmp_path)
    with pytest.raises(InvalidArgumentError, match=rf"{path}:2: not valid JSON"):
        MetricsWriter(tmp_path, tensorboard=False, resume_step=1)  # never silently drops a corrupt line
    path.write_text('{"step": 1}\n{"loss": 2.0}\n')
    with pytest.raises(InvalidArgumentError, match=rf"{path}:2: expected an integer \"step\", found None"):
        read_metrics(tmp_path)
    with pytest.raises(InvalidArgumentError, match=rf"{tmp_path / 'nope' / 'metrics.jsonl'}: no metrics file"):
        read_metrics(tmp_path / "nope")


def test_bad_logs_are_refused(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as w:
        w.log(5, {"loss": 1.0})
        with pytest.raises(InvalidArgumentError, match="step 4 logged after step 5"):
            w.log(4, {"loss": 1.0})
        with pytest.raises(InvalidArgumentError, match="metric 'loss': expected a number"):
            w.log(6, {"loss": torch.ones(3)})
        with pytest.raises(InvalidArgumentError, match="'step' is not a metric name"):
            w.log(6, {"step": 6})
    assert read_metrics(tmp_path) == [{"step": 5, "loss": 1.0}]  # refused logs wrote nothing


def test_tensorboard_scalars_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 11):
            w.log(step, _logged(step))
        w.log(10, {"eval_loss": 2.25, "eval_ppl": 9.4877})
    want = [(s, pytest.approx(3.0 - 0.1 * s, rel=1e-6)) for s in range(1, 11)]  # TensorBoard stores float32
    assert _tb_scalars(tmp_path, "train/loss") == want
    assert _tb_scalars(tmp_path, "train/grad_norm") == [(s, 0.5 * s) for s in range(1, 11)]
    assert _tb_scalars(tmp_path, "eval/loss") == [(10, 2.25)]
    assert _tb_scalars(tmp_path, "eval/ppl") == [(10, pytest.approx(9.4877, rel=1e-6))]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert "train/mfu" not in acc.Tags()["scalars"]  # None is not a point


def test_tensorboard_resume_purges_the_redone_steps(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsWriter(tmp_path) as w:
        for step in range(1, 11):
            w.log(step, {"loss": float(step)})
    with MetricsWriter(tmp_path, resume_step=6) as w:
        for step in (7, 8):
            w.log(step, {"loss": 100.0 + step})
    assert _tb_scalars(tmp_path, "train/loss") == [(s, float(s)) for s in range(1, 7)] + [(7, 107.0), (8, 108.0)]


def test_log_after_close_is_a_state_error(tmp_path):
    from tessera.errors import StateError

    w = MetricsWriter(tmp_path, tensorboard=False)
    w.close()
    with pytest.raises(StateError, match=r"log\(step=1\) after close\(\)"):
        w.log(1, {"loss": 1.0})
