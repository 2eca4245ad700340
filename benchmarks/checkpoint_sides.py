"""The two frameworks benchmarks/checkpoint_cpu.py compares, behind one small interface (Side): tessera
(parallelize + tessera.optim.AdamW + Checkpointer) and torch FSDP2 + AdamW + torch.distributed.checkpoint."""

from __future__ import annotations

import os
import resource
import shutil

import torch
import torch.distributed as dist

CHECK_PARAMS = ("tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.feed_forward.w2.weight",
                "norm.weight", "output.weight")


def cpu() -> float:
    """CPU seconds (user + system) used so far by this process, all its threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Side:
    """One framework: model, optimizer, and its checkpoint calls."""

    name: str

    def train_step(self, tok) -> float:
        from tessera.models.llama.model import cross_entropy

        loss = cross_entropy(self.model(tok[:, :-1]), tok[:, 1:])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1
        return loss.item()

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's shards of every parameter and every optimizer state tensor (views, not copies)."""
        out = {}
        for n, p in self.model.named_parameters():
            out[f"param/{n}"] = self._local(p)
            for k, v in self.opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"optim/{n}/{k}"] = self._local(v)
        return out

    @staticmethod
    def _local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    def zero_state(self) -> None:
        with torch.no_grad():
            for t in self.local_tensors().values():
                t.zero_()

    def fingerprint(self) -> dict:
        """World-size independent: a few full parameters and global sums of squares of the AdamW moments."""
        fp = {"full": self.full_params()}
        for k in ("exp_avg", "exp_avg_sq"):
            s = torch.zeros(1, dtype=torch.float64)
            for n, t in self.local_tensors().items():
                if n.endswith("/" + k):
                    s += t.double().pow(2).sum()
            dist.all_reduce(s)
            fp[k] = s.item()
        steps = [t for n, t in self.local_tensors().items() if n.endswith("/step")]
        fp["step"] = float(steps[0]) if steps else -1.0
        return fp


class TesseraSide(Side):
    name = "tessera"

    def __init__(self, cfg, root, seed, keep_last=2):
        import tessera
        from tessera.models.llama import Llama, parallelize

        torch.manual_seed(seed)
        self.model = parallelize(Llama(cfg))
        self.opt = tessera.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.1)
        self.root = os.path.join(root, "tessera")
        self.ckpt = tessera.checkpoint.Checkpointer(self.root, keep_last=keep_last)
        self.steps = 0
        self.last_saved = None

    def state(self):
        return {"model": self.model, "optim": self.opt}

    def save_async(self, step):
        self.last_saved = step
        return self.ckpt.save(step, self.state())

    def wait(self, handle):
        handle.wait()

    def save_sync(self, step):
        self.save_async(step).wait()

    def load(self, step):
        self.ckpt.load(step, self.state())

    def ckpt_dir(self, step):
        return os.path.join(self.root, f"step-{step:010d}")

    def cleanup(self):
        pass  # keep_last does it

    def full_params(self):
        import tessera

        sd = tessera.full_state_dict(self.model)
        return {k: sd[k].clone() for k in CHECK_PARAMS}


class DcpSide(Side):
    name = "dcp"

    def __init__(self, cfg, root, seed, keep_last=2):
        from tessera.models.llama import Llama
        from torch.distributed.fsdp import fully_shard

        torch.manual_seed(seed)
        model = Llama(cfg)
        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        self.model = model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
        self.root = os.path.join(root, "dcp")
        # A gloo group of its own: async_save runs collectives from a background thread, which must not
        # interleave with FSDP2's collectives on the default group.
        self.pg = dist.new_group(backend="gloo")
        self.keep_last = keep_last
        self.saved: list[int] = []
        self.steps = 0
        self.last_saved = None

    def state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.opt)
        return {"model": msd, "optim": osd}

    def save_async(self, step):
        import torch.distributed.checkpoint as dcp

        self.saved.append(step)
        self.last_saved = step
        return dcp.async_save(self.state(), checkpoint_id=self.ckpt_dir(step), process_group=self.pg)

    def wait(self, fut):
        fut = getattr(fut, "upload_completion", fut)  # AsyncSaveResponse (async staging) or a plain Future
        fut.result()

    def save_sync(self, step):
        import torch.distributed.checkpoint as dcp

        self.saved.append(step)
        self.last_saved = step
        dcp.save(self.state(), checkpoint_id=self.ckpt_dir(step), process_group=self.pg)

    def load(self, step):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sd = self.state()
        dcp.load(sd, checkpoint_id=self.ckpt_dir(step), process_group=self.pg)
        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])

    def ckpt_dir(self, step):
        return os.path.join(self.root, f"step-{step:010d}")

    def cleanup(self):
        """Keeps the newest keep_last checkpoints, as tessera's keep_last does (untimed, after a loop)."""
        dist.barrier()
        if dist.get_rank() == 0:
            for step in self.saved[:-self.keep_last]:
                shutil.rmtree(self.ckpt_dir(step), ignore_errors=True)
        self.saved = self.saved[-self.keep_last:]
        dist.barrier()

    def full_params(self):
        params = dict(self.model.named_parameters())
        return {k: params[k].full_tensor().detach().cpu().clone() for k in CHECK_PARAMS}
