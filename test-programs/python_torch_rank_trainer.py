#!/usr/bin/env python3
"""``python_rank_trainer.py`` as a rank of a PyTorch job under torchrun (tests/launchers.rs):
the same digest chain, shard format, logs and arguments, run with the interpreter that has
torch, plus what a DDP job does between its safe points: right after the client is created
(the first thing, as in docs/training.md's torchrun recipe), ``dist.init_process_group("gloo")``
with the rank and world size torchrun sets, and before every ``should_checkpoint`` a collective
(an ``all_reduce`` of the step, checked: every rank must be at the same step). So a rank whose
peer died blocks in, or fails out of, a collective, as a DDP rank in its gradient all-reduce
does. The trainer itself is run unchanged (``runpy``).

    torchrun --nproc-per-node 4 python_torch_rank_trainer.py --steps 1000 --out DIR ...
"""

import atexit
import os
import runpy
import sys

import ckpt  # the client's module only: the trainer creates the client first thing

TRAINER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "python_rank_trainer.py")

_init = ckpt.Checkpointer.__init__
_should_checkpoint = ckpt.Checkpointer.should_checkpoint
dist = None
torch = None


def __init__(self, *args, **kwargs):
    global dist, torch
    _init(self, *args, **kwargs)
    import torch as t
    import torch.distributed as d

    torch, dist = t, d
    dist.init_process_group("gloo")  # CPU; MASTER_ADDR/PORT, RANK, WORLD_SIZE from torchrun
    # As the recipe's last line: without it, gloo's threads abort the interpreter's exit
    # ("terminate called without an active exception", status -6) now and then.
    atexit.register(dist.destroy_process_group)
    assert (dist.get_rank(), dist.get_world_size()) == (self.rank, self.world.size), (
        f"torch's rank/world {dist.get_rank()}/{dist.get_world_size()} != ckpt's {self.rank}/{self.world}"
    )


def should_checkpoint(self, step=None):
    t = torch.tensor([step], dtype=torch.int64)
    dist.all_reduce(t)  # every rank, every step (a dead peer: this raises or blocks)
    n = dist.get_world_size()
    assert t.item() == step * n, f"rank {self.rank} at step {step}, the ranks' sum {t.item()} (world {n})"
    return _should_checkpoint(self, step=step)


ckpt.Checkpointer.__init__ = __init__
ckpt.Checkpointer.should_checkpoint = should_checkpoint
sys.argv = [TRAINER, *sys.argv[1:]]
runpy.run_path(TRAINER, run_name="__main__")
