#!/usr/bin/env python3
"""A deterministic numpy trainer for ckpt's Python tests and README: a linear model fitted with
Adam on a synthetic data stream, with dropout driven by a numpy Generator. Resumed from any
checkpoint it ends bit-identical to an uninterrupted run, because the whole state is saved:
weights, both Adam moments, the RNG state (``Generator.bit_generator.state``), the data
position and the step.

    python3 test-programs/python_trainer.py --steps 300 [--format pickle|npz] [--step-ms 2]

Prints ``digest <sha256 of weights, moments and step> step <n>`` at the end.
"""

import argparse
import sys
import time

# First thing: announce to the supervisor and install the signal handlers, so that a slow
# import below (numpy here, torch in real life) cannot be killed by a checkpoint request.
import ckpt

ck = ckpt.Checkpointer()

if __name__ != "__main__":  # pragma: no cover
    raise ImportError("python_trainer.py is a program, not a module")

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=300)
p.add_argument("--dim", type=int, default=64)
p.add_argument("--seed", type=int, default=42)
p.add_argument("--step-ms", type=float, default=0.0)
p.add_argument("--format", choices=["pickle", "npz"], default="pickle")
p.add_argument("--import-delay", type=float, default=0.0, help="simulate a slow import (seconds)")
p.add_argument("--crash-at", type=int, default=None, help="abort at this step on the first launch")
p.add_argument("--digest-file", default=None)
p.add_argument("--state-out", default=None, help="pickle the final state (a dict) here")
p.add_argument("--forget", choices=["rng"], default=None, help="a resume bug, for ckpt check's tests")
args = p.parse_args()

if args.import_delay:
    time.sleep(args.import_delay)  # stands in for `import torch`

import hashlib  # noqa: E402

import numpy as np  # noqa: E402

BATCH = 8
LR, B1, B2, EPS = 0.01, 0.9, 0.999, 1e-8


def fresh(dim, seed):
    rng = np.random.Generator(np.random.PCG64(seed))
    return {
        "step": 0,
        "weights": rng.normal(0.0, 0.1, size=dim),
        "adam_m": np.zeros(dim),
        "adam_v": np.zeros(dim),
        "rng": rng.bit_generator.state,
        "data_pos": 0,
    }


def true_weights(dim):
    return (np.arange(dim) % 7 - 3.0) / 3.0


def train_step(s, rng):
    dim = s["weights"].shape[0]
    # The data stream: sample i depends only on its position, so it is resumable from data_pos.
    data = np.random.Generator(np.random.PCG64(s["data_pos"]))
    s["data_pos"] += BATCH
    x = data.uniform(-1.0, 1.0, size=(BATCH, dim))
    y = x @ true_weights(dim) + 0.01 * data.standard_normal(BATCH)
    err = x @ s["weights"] - y
    keep = rng.random((BATCH, dim)) >= 0.1  # dropout on the gradient, from the saved RNG
    grad = (2.0 * err[:, None] * x * keep).sum(axis=0) / BATCH
    s["step"] += 1
    t = s["step"]
    s["adam_m"] = B1 * s["adam_m"] + (1 - B1) * grad
    s["adam_v"] = B2 * s["adam_v"] + (1 - B2) * grad * grad
    mh = s["adam_m"] / (1 - B1**t)
    vh = s["adam_v"] / (1 - B2**t)
    s["weights"] = s["weights"] - LR * mh / (np.sqrt(vh) + EPS)
    return float((err * err).mean())


def digest(s):
    h = hashlib.sha256()
    for k in ("weights", "adam_m", "adam_v"):
        h.update(np.ascontiguousarray(s[k], dtype="<f8").tobytes())
    h.update(int(s["step"]).to_bytes(8, "little"))
    return h.hexdigest()


def save(s, rng):
    s["rng"] = rng.bit_generator.state
    if args.format == "pickle":
        ck.save(s, step=s["step"])
    else:
        # The PyTorch way: the job writes its own files into the staging directory.
        with ck.saving(step=s["step"]) as d:
            np.savez(d / "model.npz", weights=s["weights"], adam_m=s["adam_m"], adam_v=s["adam_v"])
            meta = {"step": s["step"], "data_pos": s["data_pos"], "rng": s["rng"]}
            (d / "meta.txt").write_text(repr(meta))


def load():
    if args.format == "pickle":
        return ck.restore()
    d = ck.restore_dir()
    if d is None:
        return None
    import ast

    meta = ast.literal_eval(ck.read_file("meta.txt").decode())
    with np.load(d / "model.npz") as z:
        return {**meta, "weights": z["weights"], "adam_m": z["adam_m"], "adam_v": z["adam_v"]}


def main():
    s = load()
    if s is None:
        s = fresh(args.dim, args.seed)
    else:
        print(f"trainer: resumed at step {s['step']} (checkpoint {ck.restore_point.seq})", file=sys.stderr)
    rng = np.random.Generator(np.random.PCG64())
    if args.forget == "rng" and s["step"] > 0:
        s["rng"] = fresh(args.dim, args.seed)["rng"]  # the bug: the dropout stream restarts
    rng.bit_generator.state = s["rng"]
    loss = float("nan")
    while s["step"] < args.steps:
        loss = train_step(s, rng)
        if args.crash_at == s["step"] and ck.restart_count == 0:
            print(f"trainer: crashing on purpose at step {s['step']}", file=sys.stderr)
            sys.stderr.flush()
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if args.step_ms:
            time.sleep(args.step_ms / 1000.0)
        if ck.should_checkpoint():
            save(s, rng)
        if ck.should_stop():
            print(f"trainer: stopping at step {s['step']} as asked", file=sys.stderr)
            return 0
    d = digest(s)
    print(f"digest {d} step {s['step']} loss {loss:.6f}", flush=True)
    if args.digest_file:
        with open(args.digest_file, "w") as f:
            f.write(d + "\n")
    if args.state_out:
        import pickle

        s["rng"] = rng.bit_generator.state
        with open(args.state_out, "wb") as f:
            pickle.dump(s, f)
    return 0


sys.exit(main())
