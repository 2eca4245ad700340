"""Energy and CO2 (tessera.metrics.energy), against hand arithmetic. This machine has no GPU and no powercap tree, so
the counters are fakes, named as such: a fake powercap tree of files (the real layout: intel-rapl:N zones with
energy_uj and max_energy_range_uj, a sub-zone and a psys zone that must not be added) and a fake NVML module.
- the RAPL deltas, one of them across a wraparound; sub-zones and psys not counted; an unreadable zone is absent;
- NVML millijoules -> joules; an NVML without a driver (fake, and the real pynvml here) is absent, not zero;
- CO2 = J / 3.6e6 x PUE x g/kWh;
- 2 gloo ranks train the demo recipe on one host with the fake tree: metrics.jsonl's energy_j is what the counter
  advanced by (counted by one rank only: two would double it), co2_g follows, a resumed run adds the checkpoint's
  energy; with no readable counter the fields are absent and the summary says it was not measured."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import run_ranks
from tessera.metrics import energy
from tessera.metrics.energy import EnergyMeter, co2_grams

REPO = Path(__file__).resolve().parents[3]
RANGE_UJ = 10_000_000  # the fake zones' max_energy_range_uj (10 J), small so a few steps wrap it


def _zone(root: Path, name: str, kind: str, value_uj: int) -> Path:
    z = root / name
    z.mkdir(parents=True)
    (z / "name").write_text(kind + "\n")
    (z / "max_energy_range_uj").write_text(f"{RANGE_UJ}\n")
    (z / "energy_uj").write_text(f"{value_uj}\n")
    return z


def _set(zone: Path, value_uj: int) -> None:
    tmp = zone / "energy_uj.tmp"
    tmp.write_text(f"{value_uj}\n")
    os.replace(tmp, zone / "energy_uj")  # whole, so a reader on another rank never sees half a number


def _fake_powercap(root: Path) -> dict[str, Path]:
    return {"pkg0": _zone(root, "intel-rapl:0", "package-0", 1_000_000),
            "pkg1": _zone(root, "intel-rapl:1", "package-1", 9_500_000),
            "core": _zone(root, "intel-rapl:0:0", "core", 0),  # a part of package 0 (sysfs links it at the top)
            "psys": _zone(root, "intel-rapl:2", "psys", 0)}  # the whole platform, packages included


def test_fake_rapl_deltas_with_a_wraparound(tmp_path):
    z = _fake_powercap(tmp_path)
    meter = EnergyMeter(powercap_root=tmp_path)
    meter.start()
    assert sorted(s.name for s in meter.sources) == ["rapl:intel-rapl:0", "rapl:intel-rapl:1"]
    _set(z["pkg0"], 3_500_000)  # +2.5 J
    _set(z["pkg1"], 500_000)  # wrapped: 500,000 + 10,000,000 - 9,500,000 uJ = +1.0 J
    _set(z["core"], 7_000_000)
    _set(z["psys"], 9_000_000)
    assert meter.read() == {"rapl:intel-rapl:0": 2.5, "rapl:intel-rapl:1": 1.0}
    _set(z["pkg0"], 4_000_000)  # +0.5 J more
    assert meter.local_joules() == 3.0 + 1.0
    meter.start()  # zero again from here
    _set(z["pkg1"], 2_500_000)
    assert meter.read() == {"rapl:intel-rapl:0": 0.0, "rapl:intel-rapl:1": 2.0}


def test_unreadable_rapl_zone_is_absent_and_said(tmp_path, monkeypatch, caplog):
    z = _fake_powercap(tmp_path)
    real_read = Path.read_text

    def root_only(self, *a, **kw):  # as kernels >= 5.10 make energy_uj (tests run as root: chmod cannot do it)
        if self == z["pkg1"] / "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", root_only)
    meter = EnergyMeter(powercap_root=tmp_path)
    meter.start()
    _set(z["pkg0"], 2_000_000)
    assert meter.read() == {"rapl:intel-rapl:0": 1.0}
    assert len(meter.absent) == 1 and "intel-rapl:1" in meter.absent[0] and "PermissionError" in meter.absent[0]
    assert "intel-rapl:1" in caplog.text


def test_no_source_is_none_not_zero(tmp_path):
    meter = EnergyMeter(powercap_root=tmp_path / "absent")
    meter.start()
    assert meter.sources == [] and meter.local_joules() is None
    assert "no " in meter.absent[0] and "intel-rapl" in meter.absent[0]
    assert EnergyMeter(read_rapl=False, powercap_root=tmp_path).absent == []  # not asked: nothing to say


class FakeNvml:
    """Stands in for pynvml: one GPU whose total-energy counter (millijoules since driver load) the test sets."""

    class NVMLError(Exception):
        pass

    def __init__(self, mj: int, fail_init: bool = False):
        self.mj, self.fail_init, self.handles = mj, fail_init, []

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, i):
        self.handles.append(("index", i))
        return ("handle", i)

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.handles.append(("uuid", uuid))
        return ("handle", uuid)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        assert handle == ("handle", self.handles[-1][1])
        return self.mj


def test_fake_nvml_millijoules_to_joules(tmp_path):
    nvml = FakeNvml(5_000_000)
    meter = EnergyMeter(gpu="GPU-1234", nvml=nvml, read_rapl=False)
    meter.start()
    assert nvml.handles == [("uuid", "GPU-1234")]
    nvml.mj = 5_012_345  # +12,345 mJ
    assert meter.read() == {"nvml:GPU-1234": 12.345}
    by_index = EnergyMeter(gpu=3, nvml=FakeNvml(7), read_rapl=False)
    assert [s.name for s in by_index.sources] == ["nvml:3"]


def test_nvml_without_a_driver_is_absent(tmp_path, monkeypatch):
    meter = EnergyMeter(gpu=0, nvml=FakeNvml(0, fail_init=True), read_rapl=False)
    assert meter.local_joules() is None and "NVMLError" in meter.absent[0] and "GPU 0" in meter.absent[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: NVML would count it")
def test_real_pynvml_degrades_without_a_driver():
    """The real module (nvidia-ml-py, from scripts/setup.sh) on this GPU-less machine: NVMLError_LibraryNotFound
    (or ImportError where it is not installed), and the GPU source is absent."""
    meter = EnergyMeter(gpu=0, read_rapl=False)
    assert meter.sources == [] and meter.local_joules() is None
    assert "NVMLError" in meter.absent[0] or "ModuleNotFoundError" in meter.absent[0], meter.absent


def test_co2_by_hand():
    # 7.2e6 J = 2 kWh; x PUE 1.5 = 3 kWh at the wall; x 475 g/kWh = 1425 g
    assert co2_grams(7.2e6, 1.5, 475.0) == pytest.approx(1425.0, rel=1e-12)
    assert co2_grams(3.6e6, 1.0, 0.0) == 0.0


# ---- 2 gloo ranks, the demo recipe -----------------------------------------------------------------------------

STEP_UJ = 1_500_000  # what the fake package counter advances per step (1.5 J)


def _demo_cfg(out: Path, steps: int, *extra: str):
    from tessera.recipes.config import load_config

    return load_config(str(REPO / "recipes" / "tiny_llama_demo.yaml"),
                       ["data.seq_len=32", "training.batch_size=2", "training.eval_every=0", "training.eval_batches=1",
                        "metrics.progress=false",
                        "metrics.tensorboard=false", f"training.steps={steps}", f"output_dir={out}",
                        "metrics.pue=1.2", "metrics.grid_gco2_per_kwh=400", *extra])


def _train(rank, world, cfgs, zone, summary_file):
    """Trains each config in turn (a second one with the same output_dir resumes the first one's checkpoint: both in
    the same processes, which saves the ranks' imports of torch._dynamo and matplotlib, seconds each on 2 cores).
    Each step, with both ranks stopped at barriers, rank 1 (which must not read the host's packages) advances the
    fake package counter by STEP_UJ: at the step's energy reading it has advanced exactly once per step so far."""
    import torch.distributed as dist

    from tessera.recipes import loop

    real_step = loop.Job.train_step

    def step_with_fake_energy(self, step):
        dist.barrier()  # rank 0's meter has started (step 1) or read (later steps)
        if rank == 1 and zone is not None:
            _set(Path(zone), (int((Path(zone) / "energy_uj").read_text()) + STEP_UJ) % RANGE_UJ)
        dist.barrier()
        return real_step(self, step)

    loop.Job.train_step = step_with_fake_energy
    summaries = []
    for cfg in cfgs:
        summary = loop.train(cfg, device=torch.device("cpu"), mixed_precision=None)
        lines = []
        loop._print_summary(lines.append, summary)
        summaries.append({**summary, "lines": lines, "metrics": _steps(Path(cfg.output_dir))})
    if rank == 0:
        Path(summary_file).write_text(json.dumps(summaries, default=str))


def _steps(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_two_ranks_count_the_host_once_and_resume_adds_the_checkpoint(tmp_path, monkeypatch):
    zones = _fake_powercap(tmp_path / "fake_powercap")
    _set(zones["pkg0"], 6_000_000)  # 6.0, 7.5, 9.0, then 0.5 (wrapped), 2.0 J on the counter
    monkeypatch.setenv("TESSERA_POWERCAP_ROOT", str(tmp_path / "fake_powercap"))
    out, summary_file = tmp_path / "run", tmp_path / "summary.json"
    cfgs = [_demo_cfg(out, 2, "checkpoint.every=2"), _demo_cfg(out, 4, "checkpoint.every=2")]
    run_ranks(2, _train, cfgs, str(zones["pkg0"]), str(summary_file))
    first, s = json.loads(summary_file.read_text())
    # per step 1.5 J from package 0 alone (package 1 did not move; rank 1 counting the host too would double it)
    assert [(r["step"], r["energy_j"]) for r in first["metrics"]] == [(1, 1.5), (2, 3.0)]
    assert first["metrics"][1]["co2_g"] == pytest.approx(3.0 / 3.6e6 * 1.2 * 400, rel=1e-12)
    # resumed from step 2: 3.0 J from the checkpoint, + 1.5 J per step of this attempt (one across the wrap)
    assert [(r["step"], r["energy_j"]) for r in _steps(out)] == [(1, 1.5), (2, 3.0), (3, 4.5), (4, 6.0)]
    assert s["resumed_from"] == 2
    assert s["energy_kwh"] == pytest.approx(6.0 / 3.6e6, rel=1e-12)
    assert s["co2_g"] == pytest.approx(6.0 / 3.6e6 * 1.2 * 400, rel=1e-12)
    assert any(line.startswith("  energy: ") and "kWh" in line for line in s["lines"]), s["lines"]


def test_two_ranks_without_counters_leave_energy_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_POWERCAP_ROOT", str(tmp_path / "no_powercap"))
    out, summary_file = tmp_path / "run", tmp_path / "summary.json"
    run_ranks(2, _train, [_demo_cfg(out, 2)], None, str(summary_file))
    steps = _steps(out)
    assert len(steps) == 2 and not any("energy_j" in r or "co2_g" in r for r in steps)
    (s,) = json.loads(summary_file.read_text())
    assert "energy_kwh" not in s and "co2_g" not in s
    assert f"  {energy.NOT_MEASURED}" in s["lines"]
