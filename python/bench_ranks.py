#!/usr/bin/env python3
"""Python save latency, multi-rank against single-rank (docs/multi-rank.md, "Checksums").

Runs, without a supervisor, in a fresh temporary directory each:

* ``--world`` Python ranks (``CKPT_RANK``/``CKPT_WORLD_SIZE``, one ``CKPT_RUN_ID``), each saving
  ``--mib`` MiB of random bytes (``ck.save(blob, step=i)``) ``--rounds`` times;
* one single-rank process saving the same ``--mib`` MiB per save (the same bytes per process);
* one single-rank process saving ``--world`` x ``--mib`` MiB per save (the same bytes in total).

Prints the median wall time of one ``save`` call (from the call to its return: the checkpoint
is durable and published) for each, and the ratio multi-rank / single-rank::

    PYTHONPATH=python/src python3 python/bench_ranks.py --world 2 --mib 2 --rounds 15 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, os, sys, time
import ckpt
mib, rounds = int(sys.argv[1]), int(sys.argv[2])
blob = os.urandom(mib << 20)
ck = ckpt.Checkpointer(sys.argv[3], checksum=sys.argv[4] or None)
times = []
for i in range(1, rounds + 1):
    t = time.perf_counter()
    ck.save(blob, step=i)
    times.append(time.perf_counter() - t)
ck.close()
print(json.dumps({"checksum": ck.checksum, "times": times}))
"""


def run(world: int, mib: int, rounds: int, checksum: str = "") -> "tuple[list[float], str]":
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-") as d:
        env = dict(os.environ)
        for k in ("CKPT_SOCKET", "CKPT_DIR", "CKPT_RESTORE", "RANK", "WORLD_SIZE"):
            env.pop(k, None)
        env["CKPT_RUN_ID"] = f"bench-{os.getpid()}-{time.monotonic_ns()}"
        procs = []
        for r in range(world):
            e = dict(env)
            if world > 1:
                e.update(CKPT_RANK=str(r), CKPT_WORLD_SIZE=str(world))
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, str(mib), str(rounds), d, checksum], env=e, stdout=subprocess.PIPE, text=True
                )
            )
        outs = []
        for p in procs:
            out, _ = p.communicate(timeout=600)
            if p.returncode != 0:
                raise SystemExit(f"a benchmark process failed ({p.returncode})")
            outs.append(json.loads(out))
        # Per round, the slowest rank: the checkpoint exists only when every rank returned.
        per_round = [max(o["times"][i] for o in outs) for i in range(rounds)]
        return per_round, outs[0]["checksum"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--mib", type=int, default=2)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeat", type=int, default=3, help="runs of each configuration, interleaved")
    p.add_argument("--checksum", default="", help="force an algorithm in the multi-rank runs (crc32c: before)")
    a = p.parse_args()
    multi: "list[float]" = []
    single: "list[float]" = []
    total: "list[float]" = []
    for _ in range(a.repeat):
        # Interleaved, so that load from elsewhere on the machine hits every configuration.
        m, algo_m = run(a.world, a.mib, a.rounds, a.checksum)
        s1, algo_s = run(1, a.mib, a.rounds)
        t, _ = run(1, a.mib * a.world, a.rounds)
        multi += m
        single += s1
        total += t
    med = statistics.median
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpu(s), {a.repeat} x {a.rounds} saves each (median ms per save)")
    print(f"multi-rank:  {a.world} ranks x {a.mib} MiB ({algo_m}): {med(multi) * 1e3:.1f} ms")
    print(f"single-rank: 1 x {a.mib} MiB ({algo_s}): {med(single) * 1e3:.1f} ms  ratio {med(multi) / med(single):.2f}")
    print(f"single-rank: 1 x {a.mib * a.world} MiB ({algo_s}): {med(total) * 1e3:.1f} ms  ratio {med(multi) / med(total):.2f}")


if __name__ == "__main__":
    main()
