"""Energy a run used, from the hardware's own counters, and the CO2 it stands for.

Sources (each one a monotonic counter; the meter keeps the difference since `start()`, in joules):
- NVML: `nvmlDeviceGetTotalEnergyConsumption(handle)`, millijoules since the driver loaded, for this rank's GPU only
  (Volta and newer). Each rank counts its own GPU, so the ranks' sum is the job's GPU energy.
- RAPL through Linux powercap: `<root>/intel-rapl:N/energy_uj`, microjoules, one top-level zone per CPU package
  (the AMD driver exposes its packages under the same names). The counter wraps to 0 after `max_energy_range_uj`;
  a reading lower than the previous one is taken as one wrap: delta = now + max_energy_range_uj - previous. More
  than one wrap between two readings cannot be seen, so read at least once per wrap period (max_energy_range_uj / power:
  a 2^38 uJ range, common on Intel, is about 22 min at 200 W; the loop reads at every logged step).
  Sub-zones (`intel-rapl:N:M`: core, uncore, dram) are parts of a package and are not added again, and a top-level
  zone named `psys` (the whole platform, packages included) is skipped for the same reason.
  [Note: CPU packages are counted once per host] The packages are shared by every rank on the host, so only the
  first rank of each host (lowest global rank with that host name, `first_rank_on_host`) reads them; the others would
  count the same joules again.
- A source that cannot be read (no driver, no GPU, no powercap tree, or `energy_uj` readable by root only, as on
  kernels since 5.10 after CVE-2020-8694) is absent: said once in the log, never counted as zero.

CO2: grams = kWh x PUE x grid intensity (g/kWh), 1 kWh = 3.6e6 J (co2_grams). The job's energy is the sum of every
rank's counters, one all-reduce (job_joules); when no rank has any source, the energy is None (unmeasured), not 0.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("tessera.metrics.energy")

DEFAULT_POWERCAP_ROOT = "/sys/class/powercap"
JOULES_PER_KWH = 3.6e6
NOT_MEASURED = "energy: not measured (no NVML or readable RAPL counters)"
_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")


def co2_grams(joules: float, pue: float, g_per_kwh: float) -> float:
    """Grams of CO2 for `joules` of measured energy: joules / 3.6e6 J/kWh x pue (facility energy / IT energy,
    dimensionless, >= 1) x g_per_kwh (grid carbon intensity, g CO2 per kWh; the world average 475 from the IEA)."""
    return joules / JOULES_PER_KWH * pue * g_per_kwh


class _Rapl:
    """One powercap zone: energy_uj (microjoules) with its wraparound range max_energy_range_uj."""

    def __init__(self, zone: Path):
        self.name = f"rapl:{zone.name}"
        self.path = zone / "energy_uj"
        self.range_uj = int((zone / "max_energy_range_uj").read_text())
        self.last_uj = self._read()  # raises OSError / ValueError when unreadable
        self.total_uj = 0

    def _read(self) -> int:
        return int(self.path.read_text())

    def start(self) -> None:
        self.last_uj, self.total_uj = self._read(), 0

    def joules(self) -> float:
        now = self._read()
        delta = now - self.last_uj
        if delta < 0:  # wrapped once since the last reading
            delta += self.range_uj
        self.total_uj += delta
        self.last_uj = now
        return self.total_uj / 1e6


class _Nvml:
    """This rank's GPU: nvmlDeviceGetTotalEnergyConsumption, millijoules since the driver loaded."""

    def __init__(self, nvml, gpu: int | str):
        nvml.nvmlInit()
        handle = (nvml.nvmlDeviceGetHandleByUUID(gpu) if isinstance(gpu, str)
                  else nvml.nvmlDeviceGetHandleByIndex(gpu))
        self.name = f"nvml:{gpu}"
        self._read = lambda: int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        self.start_mj = self._read()  # raises NVMLError_NotSupported before Volta

    def start(self) -> None:
        self.start_mj = self._read()

    def joules(self) -> float:
        return (self._read() - self.start_mj) / 1e3


class EnergyMeter:
    """This rank's energy counters (see the module docstring). `start()` sets zero; `read()` -> {source: joules since
    start}; `local_joules()` -> their sum, or None when this rank has no readable source.

    gpu: this rank's GPU as an NVML index (int) or UUID ("GPU-..."), None for none. nvml: the pynvml module (or a
    stand-in); None imports pynvml (package nvidia-ml-py) when gpu is given. read_rapl: whether this rank reads the
    host's CPU packages (True on one rank per host only, see [Note: CPU packages are counted once per host]).
    powercap_root: where the powercap zones are (tests point it at a fake tree)."""

    def __init__(self, *, gpu: int | str | None = None, nvml=None, read_rapl: bool = True,
                 powercap_root: str | os.PathLike = DEFAULT_POWERCAP_ROOT):
        self.sources: list = []
        self.absent: list[str] = []  # why a source is not counted, one line each (logged once, here)
        if gpu is not None:
            self._add_nvml(nvml, gpu)
        if read_rapl:
            self._add_rapl(Path(powercap_root))
        for why in self.absent:
            log.warning("tessera energy: %s", why)

    def _add_nvml(self, nvml, gpu) -> None:
        try:
            if nvml is None:
                import pynvml as nvml
            self.sources.append(_Nvml(nvml, gpu))
        except Exception as e:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound/NotSupported/...: absent
            self.absent.append(f"NVML energy of GPU {gpu} not counted: {type(e).__name__}: {e}")

    def _add_rapl(self, root: Path) -> None:
        zones = sorted(z for z in root.glob("intel-rapl:*") if _PACKAGE_ZONE.match(z.name)) if root.is_dir() else []
        if not zones:
            self.absent.append(f"RAPL energy not counted: no {root}/intel-rapl:N zones")
        for zone in zones:
            try:
                if (zone / "name").is_file() and (zone / "name").read_text().strip() == "psys":
                    continue  # the platform zone includes the packages
                self.sources.append(_Rapl(zone))
            except (OSError, ValueError) as e:  # PermissionError: energy_uj is root-only on recent kernels
                self.absent.append(f"RAPL zone {zone} not counted: {type(e).__name__}: {e}")

    def start(self) -> None:
        for s in self.sources:
            s.start()

    def read(self) -> dict[str, float]:
        return {s.name: s.joules() for s in self.sources}

    def local_joules(self) -> float | None:
        return sum(self.read().values()) if self.sources else None


def first_rank_on_host(group=None) -> bool:
    """Whether this rank is the lowest global rank on its host (by host name): the one that reads the CPU packages.
    Collective (one all_gather_object of the host names)."""
    names: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(names, socket.gethostname(), group=group)
    return names.index(socket.gethostname()) == dist.get_rank(group)


def job_joules(meter: EnergyMeter, device: torch.device, group=None) -> float | None:
    """Joules since start summed over every rank of `group`, None when no rank has a readable source. Collective:
    one all-reduce of (this rank's joules, its number of sources) on `device` (gloo: cpu; NCCL: the rank's GPU)."""
    local = meter.local_joules()
    t = torch.tensor([local or 0.0, len(meter.sources)], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    joules, n_sources = t.tolist()
    return joules if n_sources > 0 else None


def rank_meter(device: torch.device, group=None) -> EnergyMeter:
    """This rank's meter, started: NVML for its GPU (by UUID, so CUDA_VISIBLE_DEVICES cannot mismatch the index) when
    `device` is CUDA; RAPL on the first rank of each host, from knobs' powercap_root. Collective (first_rank_on_host)."""
    from tessera import knobs

    gpu = None
    if device.type == "cuda":
        uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
        gpu = f"GPU-{uuid}" if uuid is not None else torch.cuda.current_device()
    meter = EnergyMeter(gpu=gpu, read_rapl=first_rank_on_host(group), powercap_root=knobs.load().powercap_root)
    meter.start()
    return meter
