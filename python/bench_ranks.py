#!/usr/bin/env python3
"""Python save latency, multi-rank against single-rank (docs/multi-rank.md, "Checksums").

Starts, without a supervisor, each in its own temporary directory and kept running:

* ``--world`` Python ranks (``CKPT_RANK``/``CKPT_WORLD_SIZE``, one ``CKPT_RUN_ID``), each with
  a shard of ``--mib`` MiB of random bytes;
* one single-rank process with the same ``--mib`` MiB (the same bytes per process);
* one single-rank process with ``--world`` x ``--mib`` MiB (the same bytes in total).

Then ``--rounds`` times, one after the other: a multi-rank save (every rank's
``ck.save(blob, step=i)`` at once; its time is the slowest rank's, from the call to the return,
when the checkpoint is published), a single-rank save of the same total, a single-rank save of
the same bytes per process. Interleaving them save by save exposes all three to the same load
from elsewhere on the machine; the ratios are taken per round, and their median printed (with
the median times)::

    PYTHONPATH=python/src python3 python/bench_ranks.py --world 2 --mib 2 --rounds 60
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import List

CHILD = r"""
import os, sys, time
import ckpt
mib = int(sys.argv[1])
blob = os.urandom(mib << 20)
ck = ckpt.Checkpointer(sys.argv[2], checksum=sys.argv[3] or None)
print(ck.checksum, flush=True)
for line in sys.stdin:
    i = int(line)
    t = time.perf_counter()
    ck.save(blob, step=i)
    print(time.perf_counter() - t, flush=True)
ck.close()
"""


class Group:
    """Processes that save together when told (one multi-rank job, or one process)."""

    def __init__(self, world: int, mib: int, checksum: str, keep: List[tempfile.TemporaryDirectory]) -> None:
        d = tempfile.TemporaryDirectory(prefix="ckpt-bench-")
        keep.append(d)
        env = dict(os.environ)
        for k in ("CKPT_SOCKET", "CKPT_DIR", "CKPT_RESTORE", "RANK", "WORLD_SIZE"):
            env.pop(k, None)
        env["CKPT_RUN_ID"] = f"bench-{os.getpid()}-{time.monotonic_ns()}"
        self.procs = []
        for r in range(world):
            e = dict(env)
            if world > 1:
                e.update(CKPT_RANK=str(r), CKPT_WORLD_SIZE=str(world))
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, str(mib), d.name, checksum],
                    env=e,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        self.algo = [p.stdout.readline().strip() for p in self.procs][0]  # type: ignore[union-attr]

    def save(self, i: int) -> float:
        for p in self.procs:
            p.stdin.write(f"{i}\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        times = []
        for p in self.procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if not line:
                raise SystemExit("a benchmark process failed")
            times.append(float(line))
        # The checkpoint exists for the job only when every rank returned.
        return max(times)

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()  # type: ignore[union-attr]
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--mib", type=int, default=2)
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--checksum", default="", help="force an algorithm in the multi-rank job (crc32c: as before)")
    a = p.parse_args()
    keep: List[tempfile.TemporaryDirectory] = []
    groups = [
        Group(a.world, a.mib, a.checksum, keep),
        Group(1, a.mib * a.world, "", keep),
        Group(1, a.mib, "", keep),
    ]
    try:
        times: List[List[float]] = [[], [], []]
        for i in range(1, a.rounds + 1):
            for g, t in zip(groups, times):
                t.append(g.save(i))
    finally:
        for g in groups:
            g.close()
        for d in keep:
            d.cleanup()
    med = statistics.median
    multi, total, single = times
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpu(s), {a.rounds} rounds "
          "(median ms per save; ratio: median of the per-round ratios)")
    print(f"multi-rank:  {a.world} ranks x {a.mib} MiB ({groups[0].algo}): {med(multi) * 1e3:.1f} ms")
    print(f"single-rank: 1 x {a.mib * a.world} MiB ({groups[1].algo}), the same bytes: {med(total) * 1e3:.1f} ms"
          f"  ratio {med(m / t for m, t in zip(multi, total)):.2f}")
    print(f"single-rank: 1 x {a.mib} MiB ({groups[2].algo}), the same bytes per process: {med(single) * 1e3:.1f} ms"
          f"  ratio {med(m / s for m, s in zip(multi, single)):.2f}")


if __name__ == "__main__":
    main()
