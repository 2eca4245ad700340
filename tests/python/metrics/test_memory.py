"""peak_memory_bytes on CPU against the kernel's own account of the peak (/proc/self/status VmHWM)."""

from __future__ import annotations

import sys

import pytest
import torch

from tessera.errors import NotSupportedError
from tessera.metrics import peak_memory_bytes

MIB = 2**20


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # "VmHWM:   123456 kB"
    raise AssertionError(f"{field} not in /proc/self/status")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_cpu_peak_grows_with_a_large_tensor_and_matches_vmhwm():
    before = peak_memory_bytes("cpu")
    assert abs(before - _proc_status_bytes("VmHWM")) < 16 * MIB
    # Enough to lift the resident set 256 MiB above the earlier peak, whatever the process holds now.
    extra = _proc_status_bytes("VmHWM") - _proc_status_bytes("VmRSS") + 256 * MIB
    t = torch.ones(extra // 4, dtype=torch.float32)  # ones: touched pages count as resident, unlike empty()
    after = peak_memory_bytes(torch.device("cpu"))
    hwm = _proc_status_bytes("VmHWM")
    del t
    assert after >= before + 200 * MIB
    assert abs(after - hwm) < 16 * MIB


def test_other_devices_are_refused():
    with pytest.raises(NotSupportedError, match="device meta is not supported"):
        peak_memory_bytes("meta")
