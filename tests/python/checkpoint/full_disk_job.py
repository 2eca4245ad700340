"""Run by test_full_disk_*: a job whose checkpoint hits RLIMIT_FSIZE on one rank (a real "disk full" for it).

Usage: full_disk_job.py ROOT RANK WORLD INIT_FILE FULL_RANK. Prints what happened, one line per event, for the test.
"""

import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tessera  # noqa: E402
import tessera.exitcodes  # noqa: E402
from models import make_model  # noqa: E402
from shard.parity import shard_model  # noqa: E402

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
root, rank, world, init, full_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
model = shard_model(make_model(), tessera.ShardingStrategy.FULL_SHARD)
opt = tessera.optim.AdamW(model.parameters(), lr=1e-2)
state = {"model": model, "optim": opt, "train": {"step": 0}}
x = torch.randint(0, 37, (2, 8))


def train():
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()


train()
ckpt = tessera.checkpoint.Checkpointer(root)  # the default commit timeout (600 s): a wait for it would show
ckpt.save(1, state).wait()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
if rank == full_rank:
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # the data file is ~100 KB / world
train()
try:
    ckpt.save(2, state).wait()
    print("save unexpectedly succeeded", flush=True)
except tessera.CheckpointError as e:
    print(f"save failed: {e}", flush=True)
    # A full disk is restartable on every rank, also where it arrived as another rank's report: the job's exit
    # status must not depend on which rank reports first ([Note: a relayed failure keeps its code], commit.cc).
    print(f"exit status of the failure: {tessera.exitcodes.for_exception(e)}", flush=True)
print("committed after failure:", ckpt.committed_steps(), flush=True)
train()
print("trained on after failure", flush=True)
unwatched = ckpt.save(3, state)  # fails too, and nobody waits for it ...
while not unwatched.done:
    time.sleep(0.01)
try:
    ckpt.save(4, state)  # ... so the next save must say so instead of dropping the failure
    print("unwatched failure dropped", flush=True)
except tessera.CheckpointError as e:
    print(f"next save raised: {e}", flush=True)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
ckpt.save(2, state).wait()  # the same step again: the failed attempt's leftovers must not be taken for this one
print("saved again once space returned:", ckpt.committed_steps(), flush=True)
want = tessera.full_state_dict(model)
probe = {"model": shard_model(make_model(3), tessera.ShardingStrategy.FULL_SHARD), "train": {}}
tessera.checkpoint.Checkpointer(root).load(2, probe)
got = tessera.full_state_dict(probe["model"])
print("loaded step 2 equal:", all(torch.equal(got[k], want[k]) for k in want), flush=True)
dist.destroy_process_group()
