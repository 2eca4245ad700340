"""GPU health from NVML (pynvml, if importable; never a hard dependency): uncorrected/corrected ECC error counts,
clock throttle reasons and temperature of this rank's GPU. "not available" without pynvml or on CPU.

The check fails on volatile uncorrected ECC errors (memory that returned wrong data since the driver loaded) and on
throttle reasons that mean the hardware is slowing itself (hardware slowdown, thermal slowdown, power brake); the
software power cap and idle clocks are normal and only reported."""

from __future__ import annotations

import torch

from tessera.doctor.checks import Result

# Bits of nvmlClocksEventReasons (nvml.h); the ones marked bad fail the check.
_REASONS = {
    0x1: ("gpu_idle", False),
    0x2: ("applications_clocks_setting", False),
    0x4: ("sw_power_cap", False),
    0x8: ("hw_slowdown", True),
    0x10: ("sync_boost", False),
    0x20: ("sw_thermal_slowdown", True),
    0x40: ("hw_thermal_slowdown", True),
    0x80: ("hw_power_brake_slowdown", True),
    0x100: ("display_clock_setting", False),
}


def nvml_health(device: torch.device) -> Result:
    if device.type != "cuda":
        return Result("nvml", "n/a", details={"why": "not available on CPU"})
    try:
        import pynvml
    except ImportError:
        return Result("nvml", "n/a", details={"why": "not available: pynvml is not installed"})
    pynvml.nvmlInit()
    try:
        props = torch.cuda.get_device_properties(device)
        bus_id = getattr(props, "pci_bus_id", None)
        if bus_id is not None:  # the same GPU whatever CUDA_VISIBLE_DEVICES maps
            pci = f"{getattr(props, 'pci_domain_id', 0):08x}:{bus_id:02x}:{getattr(props, 'pci_device_id', 0):02x}.0"
            handle = pynvml.nvmlDeviceGetHandleByPciBusId(pci)
        else:
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        details: dict = {"temperature_c": pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)}
        problems = []
        try:
            for kind, name in ((pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, "uncorrected"),
                               (pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, "corrected")):
                count = pynvml.nvmlDeviceGetTotalEccErrors(handle, kind, pynvml.NVML_VOLATILE_ECC)
                details[f"ecc_{name}_volatile"] = count
            if details["ecc_uncorrected_volatile"]:
                problems.append(f"{details['ecc_uncorrected_volatile']} uncorrected ECC errors since driver load")
        except pynvml.NVMLError as e:  # ECC off or not supported on this GPU
            details["ecc"] = f"not available: {e}"
        get_reasons = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        mask = get_reasons(handle)
        active = [name for bit, (name, _) in _REASONS.items() if mask & bit]
        details["throttle_reasons"] = active
        bad = [name for bit, (name, is_bad) in _REASONS.items() if is_bad and mask & bit]
        if bad:
            problems.append(f"clocks throttled by {', '.join(bad)}")
    finally:
        pynvml.nvmlShutdown()
    if problems:
        return Result("nvml", "fail", error=f"GPU {device}: " + "; ".join(problems), details=details)
    return Result("nvml", "pass", details["temperature_c"], "C", details=details)
