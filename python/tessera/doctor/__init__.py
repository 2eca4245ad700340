"""`tessera doctor`: health checks of a machine's ranks before a long run.

    tessera doctor                                  # 2 CPU ranks over gloo (CUDA: add --device cuda, one rank per GPU)
    tessera doctor --device cuda --json doctor.json --checkpoint-dir /ckpt
    tessera doctor --quick --nproc 3                # small buffers: seconds on a laptop
    torchrun --nnodes 4 --nproc-per-node 8 -m tessera doctor --device cuda --checkpoint-dir /ckpt   # one rank each

Options: --device cpu|cuda (default cpu), --nproc N (default 2 on CPU, every visible GPU on CUDA; ignored under
torchrun), --checkpoint-dir DIR (default: a temporary directory), --json PATH (the report), --margin F (default 0.25),
--quick (smaller buffers and sizes).

Each rank runs (checks.py, nvml.py):
  gemm               TFLOP/s of a square matmul, 2 n^3 FLOPs per product (fp32 on CPU, bf16 on GPU), after warm-up
  memory             pattern test (memtest.py): all ones, 0x55.., 0xAA.., address and its complement, read back;
                     any mismatching 64-bit word fails the rank
  h2d, d2h           pinned host <-> device copy GB/s (GPU only; "n/a" on CPU)
  all_gather, reduce_scatter, all_reduce at 1, 8, 64 MiB (--quick: 256 KiB, 1 MiB)
                     bus bandwidth in GB/s with nccl-tests' formulas (bandwidth.py)
  checkpoint_write   write + fsync GB/s of a 64 MiB file (--quick: 8 MiB) in the checkpoint directory (best of 3); fails
                     naming the directory if it cannot be written
  nvml               ECC errors, throttle reasons, temperature via pynvml (GPU only; "not available" without it)

A rank whose figure is more than --margin below the median of the ranks is flagged (SLOW); this applies to the rank's
own figures (gemm, h2d, d2h, checkpoint_write), not to the collectives' (every rank waits for the slowest, so their
speed is the group's) or memory's (a correctness check); those show their median only. The table on
stdout has one row per rank x check (figure, unit, median, result); --json writes every figure with its unit, the
flags, the problems and the host and device names. Exit status: 0 all passed, 1 a check failed or a rank is flagged,
2 bad arguments.
"""

from tessera.doctor.bandwidth import algbw_gbps, busbw_gbps, stragglers
from tessera.doctor.memtest import PATTERNS, PatternCheck, check_pattern, fill_pattern
from tessera.doctor.run import DoctorOptions, run_doctor

__all__ = ["DoctorOptions", "PATTERNS", "PatternCheck", "algbw_gbps", "busbw_gbps", "check_pattern", "fill_pattern",
           "run_doctor", "stragglers"]
