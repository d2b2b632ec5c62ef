#!/usr/bin/env python3
"""The README's single-process Python pattern, unchanged, as one rank of a multi-rank job
(docs/multi-rank.md, "Which step"): ``should_checkpoint()`` without a step, then
``save(state, step=step)`` (or, with ``--no-step``, ``save(state)``; with ``--async``,
``save_async(state, step=step)``). Each rank runs
``python_rank_trainer``'s digest chain, so ``python_rank_trainer.py --reference`` gives the
uninterrupted global digest; writes ``digest-<rank>`` under ``--out`` at the end and logs every
restore (with the number of shards) to ``restores.log``.

    python_readme_trainer.py --steps 400 --step-ms 2 --out DIR [--no-step | --async]
"""

import argparse
import os
import sys
import time

import ckpt  # import it first: it installs the signal handlers early

M = (1 << 64) - 1


def mix(x):
    x = (x + 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=400)
p.add_argument("--step-ms", type=float, default=2)
p.add_argument("--out", required=True)
p.add_argument("--no-step", action="store_true")
p.add_argument("--async", dest="use_async", action="store_true", help="ck.save_async(state, step=step)")
args = p.parse_args()
total = args.steps

ck = ckpt.Checkpointer()
rank = ck.rank


def init_state():
    return {"step": 0, "digest": mix(0xC0FFEE ^ ((rank << 32) & M)), "rank": rank}


def train_one_step(state):
    state["step"] += 1
    state["digest"] = mix(state["digest"] ^ mix((state["step"] * 31 + rank) & M))
    time.sleep(args.step_ms / 1000)


if ck.restore_point is not None:
    rp = ck.restore_point
    shards = sum(1 for f in rp.manifest.files if f.name.endswith("/state.pickle"))
    with open(os.path.join(args.out, "restores.log"), "a") as f:
        f.write(f"rank {rank} seq {rp.seq} step {rp.step} world {rp.manifest.world_size or 1} shards {shards}\n")

# --- the README's pattern, unchanged -------------------------------------------------------
state = ck.restore() or init_state()
assert state["rank"] == rank, f"rank {rank} restored rank {state['rank']}'s shard"
for step in range(state["step"], total):
    train_one_step(state)
    if ck.should_checkpoint():
        if args.use_async:
            ck.save_async(state, step=step)    # blocked only while state is pickled
        elif args.no_step:
            ck.save(state)
        else:
            ck.save(state, step=step)          # pickle by default
    if ck.should_stop():
        raise SystemExit(0)
# --------------------------------------------------------------------------------------------

tmp = os.path.join(args.out, f".digest-{rank}.tmp")
with open(tmp, "w") as f:
    f.write(f"{state['digest']:016x}")
os.rename(tmp, os.path.join(args.out, f"digest-{rank}"))
