#!/usr/bin/env python3
"""A small multi-process launcher, like torchrun on one node: starts ``--n`` copies of the
command with RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE set (in its own process group),
forwards SIGUSR1, SIGUSR2, SIGTERM, SIGINT and SIGHUP to every rank, and when a rank fails
kills the others (SIGKILL) and exits 1. Exits 0 once every rank exited 0. It is not a ckpt
client: it never announces itself.

    python_rank_launcher.py --n 4 -- prog args...
"""

import os
import signal
import subprocess
import sys
import time

FORWARD = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main():
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") + 1 >= len(argv):
        print("usage: python_rank_launcher.py --n N -- command [args...]", file=sys.stderr)
        return 64
    i = argv.index("--")
    opts, cmd = argv[:i], argv[i + 1:]
    n = int(opts[opts.index("--n") + 1]) if "--n" in opts else 4
    pending = []
    for s in FORWARD:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    kids = []
    for r in range(n):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n))
        kids.append(subprocess.Popen(cmd, env=env))
    live = list(kids)
    while True:
        while pending:
            s = pending.pop(0)
            for k in live:
                try:
                    os.kill(k.pid, s)
                except ProcessLookupError:
                    pass
        for r, k in enumerate(kids):
            if k in live and k.poll() is not None:
                live.remove(k)
                if k.returncode != 0:
                    print(f"python_rank_launcher: rank {r} failed ({k.returncode}); stopping the others", file=sys.stderr)
                    for o in live:
                        o.kill()
                    for o in live:
                        o.wait()
                    return 1
        if not live:
            return 0
        time.sleep(0.005)


sys.exit(main())
