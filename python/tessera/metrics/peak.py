"""Peak dense matrix throughput of known accelerators, the denominator of MFU (model FLOPs utilisation).

MFU = (model FLOPs per token x tokens/s) / peak FLOP/s, with model FLOPs from `LlamaConfig.flops_per_token`
(the PaLM formula, appendix B of Chowdhery et al. 2022). Figures are the vendors' datasheet numbers for dense
(not 2:4 sparse) bf16 tensor-core math, in FLOP/s:
  - H100 SXM5 / H200: 989.4e12 (NVIDIA H100 and H200 datasheets; the H200 has the H100 SXM's compute)
  - H100 PCIe: 756.5e12, H100 NVL: 835.5e12 (NVIDIA H100 datasheet)
  - A100 (SXM and PCIe): 312e12 (NVIDIA A100 datasheet)
A device that is not listed (every CPU included) has no known peak: MFU is then reported as None, not guessed.
"""

from __future__ import annotations

# Matched against torch.cuda.get_device_name() by substring, the most specific names first.
_BF16_DENSE_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.5e12),
    ("H100 NVL", 835.5e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("A100", 312e12),
)


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of the accelerator named `device_name` (as `torch.cuda.get_device_name()` spells
    it, e.g. "NVIDIA H200"), or None when it is not in the table (CPUs, unknown cards)."""
    for key, flops in _BF16_DENSE_FLOPS:
        if key.lower() in device_name.lower():
            return flops
    return None


def mfu(flops_per_token: float, tokens_per_s: float, device_name: str) -> float | None:
    """Model FLOPs utilisation in [0, 1]: flops_per_token (FLOPs, forward + backward) x tokens_per_s over the
    device's peak; None where the peak is unknown."""
    peak = peak_flops(device_name)
    return None if peak is None else flops_per_token * tokens_per_s / peak
