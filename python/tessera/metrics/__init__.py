"""Training metrics: MFU against known accelerator peaks."""

from tessera.metrics.peak import mfu, peak_flops

__all__ = ["mfu", "peak_flops"]
