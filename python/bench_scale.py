#!/usr/bin/env python3
"""The cost of one multi-rank save round against the number of ranks (docs/multi-rank.md,
"Scale"). For each world size, that many Python ranks (one process each, on this machine,
without a supervisor) save ``--rounds`` times a ``--kib`` KiB shard (``ck.save(blob,
step=i)``: every save is one round), with the file-system calls of the ckpt client counted in
each process (calls made through Python's ``os`` module, ``open`` and ``renameat2``):

* files and directories created (``O_CREAT`` opens, ``mkdir``);
* renames;
* fsyncs;
* lookups (``stat``/``lstat``, which ``os.path.lexists`` uses, ``listdir``/``scandir``) and
  reads of small files (``open()`` for reading): the polling of the round's files;
* of these, the calls that name another rank's ``propose-*`` or ``done-*`` file (``others``):
  the gather, which only the coordinator (rank 0) does, once per file and round;
* the pauses of waiting ranks (``time.sleep`` calls): a rank's lookups grow with the time it
  waits (one look per pause), not with the number of ranks;
* wall time of a round, from the first rank's call to the last rank's return (checkpoint
  published and known to every rank).

Prints one table row per world size (per round: totals over all ranks, and per rank)::

    PYTHONPATH=python/src python3 python/bench_scale.py --worlds 2,4,8,16,32,64 --rounds 5

``--clients A,B`` compares two client trees (directories holding the ``ckpt`` package, e.g. a
checkout of the previous protocol's ``python/src``): for each world size the runs alternate
``--repeat`` times between the clients (interleaved, ``sync`` and, as root, the page cache
dropped before each run), one row per client with the medians over all its rounds.

``--rust A,B`` measures Rust ranks instead: directories holding the ``ckpt``, ``rank_launcher``
and ``rank_trainer`` binaries of a build (``target/debug``). The job runs under ``ckpt run
--every 250ms`` (the supervisor signals every rank), each rank under ``strace -f -ttt``; the
calls of each rank that name the checkpoint directory (and its fsyncs and listings) are
counted from its first proposal on, divided by the rounds it took part in (so the between-round
polling, one ``stat`` per 100 ms, is included); wall time per round from the first proposal's
rename to the ``published`` rename, under ``strace`` (slower than without)::

    python3 python/bench_scale.py --worlds 2,4,8,16,32,64 --rust /path/to/old/target/debug,target/debug
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
import builtins, json, os, sys, time
counts = {"create": 0, "rename": 0, "fsync": 0, "lookup": 0, "read": 0, "others": 0, "sleeps": 0}
_own = "%05d" % int(os.environ["CKPT_RANK"])
def touch(path):
    # A call naming another rank's proposal or done marker.
    n = os.path.basename(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else ""
    for p in ("propose-", "done-"):
        if n.startswith(p) and len(n) == len(p) + 5 and n[len(p):].isdigit() and n[len(p):] != _own:
            counts["others"] += 1
_open, _mkdir, _rename, _fsync, _lstat, _stat, _bopen = os.open, os.mkdir, os.rename, os.fsync, os.lstat, os.stat, builtins.open
def o(path, flags, *a, **k):
    # Opens without O_CREAT are the fsyncs' own (counted as fsyncs).
    touch(path)
    if flags & os.O_CREAT:
        counts["create"] += 1
    return _open(path, flags, *a, **k)
def mk(*a, **k):
    counts["create"] += 1
    return _mkdir(*a, **k)
def rn(*a, **k):
    counts["rename"] += 1
    return _rename(*a, **k)
def fs(fd):
    counts["fsync"] += 1
    return _fsync(fd)
def ls(*a, **k):
    counts["lookup"] += 1
    touch(a[0])
    return _lstat(*a, **k)
def st(*a, **k):
    counts["lookup"] += 1
    touch(a[0])
    return _stat(*a, **k)
def bo(file, mode="r", *a, **k):
    if isinstance(file, (str, bytes, os.PathLike)) and "r" in mode and "+" not in mode:
        counts["read"] += 1
        touch(file)
    return _bopen(file, mode, *a, **k)
_listdir, _scandir = os.listdir, os.scandir
def ld(*a, **k):
    counts["lookup"] += 1
    return _listdir(*a, **k)
def sd(*a, **k):
    counts["lookup"] += 1
    return _scandir(*a, **k)
os.open, os.mkdir, os.rename, os.fsync, os.lstat, os.stat, builtins.open = o, mk, rn, fs, ls, st, bo
os.listdir, os.scandir = ld, sd
_sleep = time.sleep
def sl(t):
    # Each pause of a waiting rank: its looks at the round, less one per wait.
    counts["sleeps"] += 1
    return _sleep(t)
time.sleep = sl
import ckpt, ckpt.store, ckpt.multi_rank
_rnr = ckpt.store.rename_noreplace
def rnr(a, b):
    # renameat2 through ctypes does not go through os.rename.
    counts["rename"] += 1
    return _rnr(a, b)
ckpt.store.rename_noreplace = rnr
ckpt.multi_rank.rename_noreplace = rnr
kib, rounds, d = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
blob = os.urandom(kib << 10)
ck = ckpt.Checkpointer(d)
out = []
for i in range(1, rounds + 1):
    for k in counts:
        counts[k] = 0
    t0 = time.monotonic()
    ck.save(blob, step=i)
    out.append({"t0": t0, "t1": time.monotonic(), "published": ck._multi.published_last, **counts})
ck.close()
print(json.dumps(out))
"""


def run(world: int, kib: int, rounds: int, client: "str | None" = None) -> "list[list[dict]]":
    """Runs ``world`` ranks for ``rounds`` saves; per rank, per round: the counts, ``t0`` and
    ``t1`` (the save's call and return) and ``published`` (this rank published)."""
    with tempfile.TemporaryDirectory(prefix="ckpt-scale-") as d:
        env = dict(os.environ)
        for k in ("CKPT_SOCKET", "CKPT_DIR", "CKPT_RESTORE", "RANK", "WORLD_SIZE"):
            env.pop(k, None)
        env["CKPT_RUN_ID"] = f"scale-{world}-{time.monotonic_ns()}"
        env["CKPT_ROUND_TIMEOUT"] = "120"
        if client is not None:
            env["PYTHONPATH"] = client
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, str(kib), str(rounds), d],
                env=dict(env, CKPT_RANK=str(r), CKPT_WORLD_SIZE=str(world)),
                stdout=subprocess.PIPE,
                text=True,
            )
            for r in range(world)
        ]
        outs = []
        try:
            for p in procs:
                o, _ = p.communicate(timeout=900)
                if p.returncode != 0:
                    raise SystemExit(f"a rank failed ({p.returncode})")
                outs.append(json.loads(o))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return outs


def run_rust(world: int, bindir: str, rounds: int) -> dict:
    """``world`` Rust ranks under ``ckpt run`` and ``strace``; per round: totals over all ranks
    and rank 0's and the other ranks' lookups + reads (see ``--rust``)."""
    import re
    import shutil

    b = os.path.abspath(bindir)
    with tempfile.TemporaryDirectory(prefix="ckpt-scale-rs-") as t:
        d, out = os.path.join(t, "ckpt"), os.path.join(t, "out")
        os.mkdir(out)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CKPT_")}
        env["CKPT_ROUND_TIMEOUT"] = "120"
        steps = (rounds + 1) * 125
        cmd = [os.path.join(b, "ckpt"), "run", "--quiet", "--every", "250ms", "--dir", d, "--",
               os.path.join(b, "rank_launcher"), "--n", str(world), "--",
               "sh", "-c", 'exec strace -f -qq -ttt -e trace=%file,fsync,fdatasync,getdents64 -o "$0/strace-$RANK" "$@"',
               out, os.path.join(b, "rank_trainer"), "--steps", str(steps), "--step-ms", "2", "--out", out]
        r = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=900)
        if r.returncode != 0:
            raise SystemExit(f"the Rust job failed ({r.returncode}): {r.stderr[-2000:]}")
        create = re.compile(r"O_CREAT|mkdir")
        tot = {"create": 0, "rename": 0, "fsync": 0, "lookup": 0, "read": 0, "others": 0, "listing": 0}
        per_rank = []
        first: "dict[str, float]" = {}
        published: "dict[str, float]" = {}
        nrounds = 0
        for rank in range(world):
            own = f"{rank:05d}"
            c = {k: 0 for k in tot}
            started = False
            joined = 0
            with open(os.path.join(out, f"strace-{rank}")) as f:
                for line in f:
                    parts = line.split(None, 2)
                    if len(parts) < 3:
                        continue
                    ts, call = float(parts[1]), parts[2]
                    m = re.search(r'/rounds/[^/"]+/(\d{8})/\.?propose-' + own + r'[."]', call)
                    if m and call.startswith("rename"):
                        started = True
                        joined += 1
                        k = m.group(1)
                        first[k] = min(first.get(k, ts), ts)
                    if not started:
                        continue
                    name = call.split("(", 1)[0]
                    if name in ("fsync", "fdatasync"):
                        c["fsync"] += 1
                        continue
                    if name == "getdents64":
                        c["listing"] += 1
                        continue
                    if d not in call:
                        continue
                    for x in re.findall(r'/(?:propose|done)-(\d{5})"', call):
                        if x != own:
                            c["others"] += 1
                    if name.startswith("rename"):
                        c["rename"] += 1
                        pm = re.search(r'/rounds/[^/"]+/(\d{8})/published"', call)
                        if pm:
                            published[pm.group(1)] = ts
                    elif create.search(call):
                        c["create"] += 1
                    elif name in ("openat", "open"):
                        c["read"] += 1
                    else:
                        c["lookup"] += 1
            if rank == 0:
                nrounds = joined
            per_rank.append((c, max(joined, 1)))
        walls = sorted(published[k] - first[k] for k in published if k in first)
        res = {k: sum(c[k] / n for c, n in per_rank) for k in tot}
        res["coord"] = (per_rank[0][0]["lookup"] + per_rank[0][0]["read"]) / per_rank[0][1]
        res["rest"] = max(((c["lookup"] + c["read"]) / n for c, n in per_rank[1:]), default=0)
        res["wall"] = statistics.median(walls) if walls else float("nan")
        res["rounds"] = nrounds
        shutil.rmtree(out, ignore_errors=True)
        return res


def main_rust(a: argparse.Namespace) -> None:
    bins = a.rust.split(",")
    print(f"Rust ranks under ckpt run --every 250ms and strace, {os.cpu_count()} cpu(s); per round, per rank: calls "
          "naming the checkpoint directory from the rank's first proposal on, / rounds it took part in")
    print("| build | ranks | rounds | wall ms (strace) | created | renames | fsyncs | lookups | opens (reads) | listings | "
          "other ranks' files | per rank: created, renames, fsyncs, lookups + reads | rank 0: lookups + reads | "
          "other ranks: lookups + reads |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for w in [int(x) for x in a.worlds.split(",")]:
        for _ in range(a.repeat):
            for bdir in bins:
                settle()
                r = run_rust(w, bdir, a.rounds)
                print(
                    f"| {bdir} | {w} | {r['rounds']} | {r['wall'] * 1e3:.0f} | {r['create']:.0f} | {r['rename']:.0f} | "
                    f"{r['fsync']:.0f} | {r['lookup']:.0f} | {r['read']:.0f} | {r['listing']:.0f} | {r['others']:.0f} | "
                    f"{r['create'] / w:.1f}, {r['rename'] / w:.1f}, {r['fsync'] / w:.1f}, "
                    f"{(r['lookup'] + r['read']) / w:.0f} | {r['coord']:.0f} | {r['rest']:.0f} (max) |",
                    flush=True,
                )


def settle() -> None:
    os.sync()
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            pass
    time.sleep(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="2,4,8,16,32,64")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kib", type=int, default=4)
    p.add_argument("--clients", default=None, help="comma-separated client trees to compare (PYTHONPATH of the ranks)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--rust", default=None, help="comma-separated build directories: measure Rust ranks (see above)")
    a = p.parse_args()
    if a.rust:
        main_rust(a)
        return
    clients = a.clients.split(",") if a.clients else [None]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpu(s), {a.rounds} rounds x {a.repeat}, {a.kib} KiB shards; "
          "per round: median over rounds 2.. (round 1 includes start-up skew)")
    print(
        "| client | ranks | wall ms | created | renames | fsyncs | lookups | small reads | other ranks' files | pauses | "
        "per rank: created, renames, fsyncs, lookups + reads, pauses | rank 0: lookups + reads | other ranks: lookups + reads |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for w in [int(x) for x in a.worlds.split(",")]:
        rows: "dict[object, list]" = {c: [] for c in clients}
        for _ in range(a.repeat):
            for c in clients:
                settle()
                outs = run(w, a.kib, a.rounds, c)
                for i in range(1, a.rounds):  # skip round 1: the ranks start at different times
                    rs = [o[i] for o in outs]
                    wall = max(r["t1"] for r in rs) - min(r["t0"] for r in rs)
                    tot = {k: sum(r[k] for r in rs) for k in ("create", "rename", "fsync", "lookup", "read", "others", "sleeps")}
                    tot["coord"] = rs[0]["lookup"] + rs[0]["read"]
                    tot["rest"] = max(r["lookup"] + r["read"] for r in rs[1:]) if w > 1 else 0
                    rows[c].append((wall, tot))
        med = statistics.median
        for c in clients:
            rs2 = rows[c]
            wall = med(r[0] for r in rs2)
            tot = {k: med(r[1][k] for r in rs2) for k in rs2[0][1]}
            print(
                f"| {c or '-'} | {w} | {wall * 1e3:.0f} | {tot['create']:.0f} | {tot['rename']:.0f} | {tot['fsync']:.0f} | "
                f"{tot['lookup']:.0f} | {tot['read']:.0f} | {tot['others']:.0f} | {tot['sleeps']:.0f} | {tot['create'] / w:.1f}, "
                f"{tot['rename'] / w:.1f}, {tot['fsync'] / w:.1f}, {(tot['lookup'] + tot['read']) / w:.0f}, {tot['sleeps'] / w:.0f} | "
                f"{tot['coord']:.0f} | {tot['rest']:.0f} (max) |",
                flush=True,
            )


if __name__ == "__main__":
    main()
