"""plot_run and `tessera plot`: PNGs from a synthetic metrics.jsonl, read back by matplotlib."""

from __future__ import annotations

import json

import pytest

from tessera.cli import main
from tessera.errors import InvalidArgumentError
from tessera.metrics import plot_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(run_dir, *, mfu=True) -> None:
    lines = []
    for step in range(1, 31):
        lines.append({"step": step, "loss": 4.0 / step ** 0.5, "lr": 3e-4 * min(1.0, step / 10),
                      "tokens": 2048 * step, "tokens_per_s": 50000.0 + 100 * (step % 3),
                      "mfu": 0.4 + 0.001 * step if mfu else None, "peak_mem_bytes": 2**33})
        if step % 10 == 0:
            lines.append({"step": step, "eval_loss": 4.2 / step ** 0.5, "eval_ppl": 2.7 ** (4.2 / step ** 0.5)})
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def _check_png(path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.shape[:2] == (450, 800)  # figsize 8 x 4.5 inches at 100 dpi
    assert image.std() > 0  # something was drawn on it


def test_plot_run_writes_the_three_pngs(tmp_path):
    _write_run(tmp_path / "run")
    paths = plot_run(tmp_path / "run")
    plots = tmp_path / "run" / "plots"
    assert paths == [plots / "loss.png", plots / "throughput.png", plots / "lr.png"]
    for path in paths:
        _check_png(path)


def test_without_mfu_and_with_out_dir(tmp_path):
    _write_run(tmp_path / "run", mfu=False)
    with_mfu = tmp_path / "with"
    _write_run(with_mfu)
    paths = plot_run(tmp_path / "run", out_dir=tmp_path / "elsewhere")
    assert [p.parent for p in paths] == [tmp_path / "elsewhere"] * 3
    (mfu_throughput,) = [p for p in plot_run(with_mfu) if p.name == "throughput.png"]
    # The MFU axis is drawn only where there is MFU.
    assert paths[1].read_bytes() != mfu_throughput.read_bytes()
    for path in paths:
        _check_png(path)


def test_missing_or_empty_metrics_are_errors(tmp_path):
    with pytest.raises(InvalidArgumentError, match=rf"{tmp_path / 'metrics.jsonl'}: no metrics file"):
        plot_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(InvalidArgumentError, match=rf"{tmp_path / 'metrics.jsonl'}: no steps to plot"):
        plot_run(tmp_path)
    assert not (tmp_path / "plots").exists()


def test_cli_plot(tmp_path, capsys):
    _write_run(tmp_path / "run")
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "png")]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(tmp_path / "png" / n) for n in ("loss.png", "throughput.png", "lr.png")]
    for line in printed:
        _check_png(tmp_path / "png" / line.rsplit("/", 1)[1])
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert f"{tmp_path / 'missing' / 'metrics.jsonl'}: no metrics file" in capsys.readouterr().err
