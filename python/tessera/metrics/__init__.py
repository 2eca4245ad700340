"""Training metrics: MFU against known accelerator peaks, peak memory, the run's metrics.jsonl and TensorBoard
record (MetricsWriter), console progress (Progress), energy and CO2 (EnergyMeter, co2_grams), and PNG plots of a
run (plot_run, `tessera plot`).

matplotlib, tensorboard and tqdm are imported only by the functions that need them, so importing this package
costs nothing extra."""

from tessera.metrics.energy import EnergyMeter, co2_grams
from tessera.metrics.memory import peak_memory_bytes
from tessera.metrics.peak import mfu, peak_flops
from tessera.metrics.plot import plot_run
from tessera.metrics.progress import Progress
from tessera.metrics.writer import MetricsWriter, read_metrics

__all__ = ["EnergyMeter", "MetricsWriter", "Progress", "co2_grams", "mfu", "peak_flops", "peak_memory_bytes",
           "plot_run", "read_metrics"]
