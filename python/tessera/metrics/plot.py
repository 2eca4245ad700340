"""PNG plots of a run's metrics.jsonl (`tessera plot OUTPUT_DIR`).

Figures are drawn with matplotlib's object API (Figure + Agg canvas), never pyplot: pyplot would pick a GUI backend
where a display exists and keeps global state, while a plotting library called from a training script or a
headless node needs neither.
"""

from __future__ import annotations

import os
from pathlib import Path

from tessera.errors import InvalidArgumentError
from tessera.metrics.writer import METRICS_FILE, read_metrics

PLOTS_DIR = "plots"


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have a numeric `key` (None/null and strings skipped)."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def _figure(title: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def plot_run(output_dir: str | os.PathLike, *, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Reads <output_dir>/metrics.jsonl and writes PNG figures into `out_dir` (default <output_dir>/plots/):
    - loss.png: training loss per step (line) and eval_loss (points), in nats/token;
    - throughput.png: tokens/s, with MFU (%) on a second y axis when any step has one;
    - lr.png: the learning rate per step.
    A figure whose metrics appear at no step is not written. Returns the paths written, in that order.
    Raises InvalidArgumentError naming the file when metrics.jsonl is missing, corrupt, has no steps, or has none
    of loss, eval_loss, tokens_per_s and lr.
    """
    records = read_metrics(output_dir)
    path = Path(output_dir) / METRICS_FILE
    if not records:
        raise InvalidArgumentError(f"{path}: no steps to plot (the file is empty)")
    out = Path(out_dir) if out_dir is not None else Path(output_dir) / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = []

    loss, eval_loss = _series(records, "loss"), _series(records, "eval_loss")
    if loss[0] or eval_loss[0]:
        fig, ax = _figure("loss")
        if loss[0]:
            ax.plot(*loss, label="train loss", linewidth=1.2)
        if eval_loss[0]:
            ax.plot(*eval_loss, "o", label="eval loss", color="tab:red", markersize=5)
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        written.append(_save(fig, out / "loss.png"))

    tps, mfu = _series(records, "tokens_per_s"), _series(records, "mfu")
    if tps[0]:
        fig, ax = _figure("throughput")
        ax.plot(*tps, color="tab:blue", linewidth=1.2, label="tokens/s")
        ax.set_ylabel("tokens/s", color="tab:blue")
        if mfu[0]:
            ax2 = ax.twinx()
            ax2.plot(mfu[0], [100 * v for v in mfu[1]], color="tab:orange", linewidth=1.2, label="MFU")
            ax2.set_ylabel("MFU (%)", color="tab:orange")
        written.append(_save(fig, out / "throughput.png"))

    lr = _series(records, "lr")
    if lr[0]:
        fig, ax = _figure("learning rate")
        ax.plot(*lr, color="tab:green", linewidth=1.2)
        ax.set_ylabel("learning rate")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        written.append(_save(fig, out / "lr.png"))

    if not written:
        raise InvalidArgumentError(f"{path}: {len(records)} lines but none has loss, eval_loss, tokens_per_s or lr "
                                   f"to plot")
    return written
