"""One rank of the heartbeat tests (run as a script: python hb_rank.py RANK WORLD STORE_FILE SCENARIO).

Joins a gloo group over a FileStore with a 300 s collective timeout, starts tessera's heartbeat on that store
(interval 0.5 s, timeout 4 s), then:
  stop    all-reduces every 50 ms; rank 1 SIGSTOPs itself at iteration 10 (the others then block in the next
          all-reduce, as a real job would, until the heartbeat ends them with status 75).
  finish  rank 0 stops its heartbeat as finished right away and leaves (status 0); the others keep running without
          it for 3 x the heartbeat timeout, then finish (status 0). Nobody may be reported.
  fail    rank 0 stops its heartbeat as failed and exits 3; rank 1 waits (as on a peer that never answers) and
          must end with 75 after the heartbeat timeout, naming rank 0.
Prints "ready" once the heartbeat runs."""

import os
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from tessera.resilience.heartbeat import Heartbeat

TIMEOUT_S = 4.0


def main(rank: int, world: int, path: str, scenario: str) -> None:
    store = dist.FileStore(path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=300))
    beat = Heartbeat(store, rank, world, interval_s=0.5, timeout_s=TIMEOUT_S).start()
    print("ready", flush=True)
    if scenario == "stop":
        t = torch.ones(4)
        for i in range(10_000):
            if rank == 1 and i == 10:
                os.kill(os.getpid(), signal.SIGSTOP)
            dist.all_reduce(t)
            time.sleep(0.05)
        print("not ended by the heartbeat", flush=True)
        sys.exit(1)
    if scenario == "finish":
        dist.barrier()
        if rank != 0:
            time.sleep(3 * TIMEOUT_S)
        beat.stop(finished=True)
        print("finished", flush=True)
        os._exit(0)  # without destroy_process_group: the peers' teardown is not what this test is about
    if scenario == "fail":
        dist.barrier()
        if rank == 0:
            beat.stop(finished=False)
            os._exit(3)  # an error of its own (say no loadable checkpoint)
        time.sleep(3 * TIMEOUT_S)  # stands for a collective that waits on rank 0 forever (NCCL)
        print("not ended by the heartbeat", flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
