"""``python -m ckpt verify [PATH ...]``: verify checkpoints with the Python reader (a checkpoint
directory, or a checkpoint store whose ``ckpt-*`` entries are all verified). Exit 0 when all
verify, 65 otherwise."""

from __future__ import annotations

import json
import os
import sys
from typing import List

from .errors import InvalidCheckpoint
from .store import Store, parse_seq, verify_path


def main(argv: List[str]) -> int:
    if len(argv) < 2 or argv[0] != "verify":
        print("usage: python -m ckpt verify PATH [PATH ...]", file=sys.stderr)
        return 64
    bad = 0
    for p in argv[1:]:
        listed = [] if parse_seq(os.path.basename(p.rstrip("/"))) is not None else Store(p).list()
        targets = [(s, str(q)) for s, q in listed] or [(None, p)]
        for seq, t in targets:
            try:
                m = verify_path(t, seq)
                print(json.dumps({"path": t, "ok": True, "seq": m.seq, "step": m.step, "files": len(m.files)}))
            except InvalidCheckpoint as e:
                bad += 1
                print(json.dumps({"path": t, "ok": False, "error": e.slug, "reason": e.reason}))
    return 65 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
