"""Run by test_full_disk_fails_cleanly_and_training_goes_on: a one-rank job whose checkpoint hits RLIMIT_FSIZE."""

import os
import resource
import signal
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tessera  # noqa: E402
from models import make_model  # noqa: E402
from shard.parity import shard_model  # noqa: E402

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
d = tempfile.mkdtemp()
dist.init_process_group("gloo", init_method=f"file://{d}/init", rank=0, world_size=1)
root = sys.argv[1]
model = shard_model(make_model(), tessera.ShardingStrategy.FULL_SHARD)
opt = tessera.optim.AdamW(model.parameters(), lr=1e-2)
state = {"model": model, "optim": opt, "train": {"step": 0}}
x = torch.randint(0, 37, (2, 8))


def train():
    model(x).sum().backward()
    opt.step()
    opt.zero_grad()


train()
ckpt = tessera.checkpoint.Checkpointer(root)
ckpt.save(1, state).wait()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))  # the data file is ~100 KB
train()
try:
    ckpt.save(2, state).wait()
    print("save unexpectedly succeeded")
except tessera.CheckpointError as e:
    print(f"save failed: {e}")
print("committed after failure:", ckpt.committed_steps())
train()
print("trained on after failure")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
ckpt.save(3, state).wait()
print("saved again once space returned:", ckpt.committed_steps())
probe = {"model": shard_model(make_model(3), tessera.ShardingStrategy.FULL_SHARD), "train": {}}
tessera.checkpoint.Checkpointer(root).load(1, probe)
print("loaded step", 1 if probe["train"] == {"step": 0} else probe["train"])
dist.destroy_process_group()
