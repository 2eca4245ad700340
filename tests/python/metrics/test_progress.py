"""Progress: plain lines when stderr is not a terminal (pytest's capture is not), a tqdm bar when it is."""

from __future__ import annotations

import io
import sys

from tessera.metrics import Progress


def _feed(progress: Progress, steps, mfu=0.412) -> None:
    for step in steps:
        progress.update(step, loss=2.5, lr=3e-4, tokens_per_s=12345.6, mfu=mfu, peak_mem_bytes=3 * 2**29)


def test_plain_lines_every_log_every_steps_and_at_the_end(capsys):
    p = Progress(12, log_every=5)
    _feed(p, range(1, 13))
    p.write("eval: loss 2.1")
    p.close()
    out = capsys.readouterr().out.splitlines()
    fields = "loss 2.5000 lr 3.00e-04 tok/s 12,346 MFU 41.2% mem 1.50 GiB"  # 3 * 2**29 bytes = 1.5 GiB
    assert out == [f"step 5/12 {fields}", f"step 10/12 {fields}", f"step 12/12 {fields}", "eval: loss 2.1"]


def test_mfu_and_memory_omitted_when_none(capsys):
    p = Progress(4, log_every=2, initial_step=2)
    p.update(4, loss=float("nan"), lr=1e-3, tokens_per_s=10.0, mfu=None, peak_mem_bytes=None)
    assert capsys.readouterr().out == "step 4/4 loss nan lr 1.00e-03 tok/s 10\n"


def test_disabled_prints_nothing(capsys):
    p = Progress(4, log_every=1, enabled=False)
    _feed(p, range(1, 5))
    p.write("hidden")
    assert capsys.readouterr() == ("", "")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_tty_gets_a_bar_with_the_fields(monkeypatch):
    err = _Tty()
    monkeypatch.setattr(sys, "stderr", err)
    p = Progress(20, initial_step=10, log_every=5)
    _feed(p, (11, 12), mfu=None)
    assert p._bar.n == 12  # resumed at 10, two steps done
    p.close()
    text = err.getvalue()
    assert "12/20" in text and "loss 2.5000 lr 3.00e-04 tok/s 12,346 mem 1.50 GiB" in text and "MFU" not in text
