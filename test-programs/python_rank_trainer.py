#!/usr/bin/env python3
"""One rank of the deterministic multi-rank toy trainer, in Python: the same digest chain and
the same shard format (``state.bin`` = step, digest, rank as little-endian u64, plus
``--pad-kib`` of data) as ``rank_trainer`` (Rust), so that a checkpoint written by Rust ranks
restores in Python ranks and vice versa. Logs every restore (with the number of shards the
checkpoint holds) and every save under ``--out``; writes ``digest-<rank>`` at the end.

    python_rank_trainer.py --steps 400 --step-ms 2 --save-ms 20 --out DIR [--format bin|pickle]
    python_rank_trainer.py --reference --world 4 --steps 400   # the uninterrupted global digest
    python_rank_trainer.py --combine d0,d1,...                   # the global digest of per-rank ones

``--step-scale K``: the step given to ckpt (``should_checkpoint(step=)``, the save) is ``K``
times the loop's step, so it differs from the count of calls; ``state.bin`` keeps the loop's.
"""

import argparse
import os
import struct
import sys
import time

import ckpt  # before anything slow: installs the handlers, announces the rank

M = (1 << 64) - 1


def mix(x):
    x = (x + 0x9E3779B97F4A7C15) & M
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M
    return x ^ (x >> 31)


def start(rank):
    return mix(0xC0FFEE ^ ((rank << 32) & M))


def step_digest(d, rank, step):
    return mix(d ^ mix((step * 31 + rank) & M))


def global_digest(ds):
    g = 0x5EED
    for d in ds:
        g = mix(g ^ d)
    return g


def log(out, name, line):
    with open(os.path.join(out, name), "a") as f:
        f.write(line + "\n")


p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=400)
p.add_argument("--step-ms", type=float, default=2)
p.add_argument("--save-ms", type=float, default=0)
p.add_argument("--pad-kib", type=int, default=0)
p.add_argument("--format", choices=["bin", "pickle"], default="bin")
p.add_argument("--out")
p.add_argument("--reference", action="store_true")
p.add_argument("--world", type=int, default=4)
p.add_argument("--combine")
p.add_argument("--step-scale", type=int, default=1)
p.add_argument("--barrier", help="a collective every step through files in this directory (as rank_trainer's)")
args = p.parse_args()

if args.reference:
    ds = []
    for r in range(args.world):
        d = start(r)
        for s in range(1, args.steps + 1):
            d = step_digest(d, r, s)
        ds.append(d)
    print(f"{global_digest(ds):016x}")
    sys.exit(0)
if args.combine:
    print(f"{global_digest([int(h, 16) for h in args.combine.split(',')]):016x}")
    sys.exit(0)

try:
    ck = ckpt.Checkpointer()
except ckpt.CkptError as e:
    print(f"python_rank_trainer: {e}", file=sys.stderr)
    sys.exit(2)
assert ck.world is not None, "python_rank_trainer runs under a launcher"
rank = ck.rank
step, d = 0, start(rank)
rp = ck.restore_point
if rp is not None:
    shards = sum(1 for f in rp.manifest.files if f.name.endswith(("/state.bin", "/state.pickle")))
    log(args.out, "restores.log",
        f"rank {rank} seq {rp.seq} step {rp.step or 0} world {rp.manifest.world_size or 1} shards {shards}")
    if rp.manifest.file(f"rank-{rank:05d}/state.bin") is not None:
        b = ck.read_file("state.bin")
        # restore_dir() is this rank's own shard directory.
        assert (ck.restore_dir() / "state.bin").read_bytes() == b
        step, d, r = struct.unpack("<QQQ", b[:24])
    else:
        st = ck.restore()
        step, d, r = st["step"], st["digest"], st["rank"]
    assert r == rank, f"rank {rank} restored rank {r}'s shard"
    assert step * args.step_scale == rp.step, f"shard step {step} (x {args.step_scale}) != checkpoint step {rp.step}"

def barrier(dirname, step):
    """rank_trainer's --barrier: a collective every step, through files."""
    open(os.path.join(dirname, f"{step}.{rank}"), "wb").close()
    if step > 2:
        try:
            os.unlink(os.path.join(dirname, f"{step - 2}.{rank}"))
        except FileNotFoundError:
            pass
    t = time.monotonic()
    for r in range(ck.world.size):
        while not os.path.exists(os.path.join(dirname, f"{step}.{r}")):
            if time.monotonic() - t > 600:
                print(f"python_rank_trainer: rank {rank}: barrier {step} timed out", file=sys.stderr)
                sys.exit(3)
            time.sleep(0.0002)


while step < args.steps:
    step += 1
    d = step_digest(d, rank, step)
    time.sleep(args.step_ms / 1000)
    if args.barrier:
        barrier(args.barrier, step)
    if ck.should_checkpoint(step=step * args.step_scale):
        try:
            if args.format == "pickle":
                time.sleep(args.save_ms / 1000)
                s = ck.save({"step": step, "digest": d, "rank": rank}, step=step * args.step_scale)
            else:
                with ck.saving(step=step * args.step_scale) as dd:
                    (dd / "state.bin").write_bytes(struct.pack("<QQQ", step, d, rank))
                    if args.pad_kib:
                        n = args.pad_kib * 1024
                        (dd / "pad.bin").write_bytes(bytes((i ^ d) & 0xFF for i in range(n)))
                    time.sleep(args.save_ms / 1000)
                s = ck.last_saved
            log(args.out, "saves.log", f"rank {rank} step {step} seq {s.seq}")
        except ckpt.CkptError as e:
            print(f"python_rank_trainer: rank {rank}: save failed: {e}", file=sys.stderr)
    if ck.should_stop():
        ck.close()
        sys.exit(0)
ck.close()
tmp = os.path.join(args.out, f".digest-{rank}.tmp")
with open(tmp, "w") as f:
    f.write(f"{d:016x}")
os.rename(tmp, os.path.join(args.out, f"digest-{rank}"))
