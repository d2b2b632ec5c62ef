"""ckpt: the Python client of the ckpt checkpoint/restore supervisor (standard library only).

::

    import ckpt
    ck = ckpt.Checkpointer()          # first thing: installs handlers, announces itself
    import torch                      # slow imports after it are safe

    state = ck.restore()              # None on a fresh start, else the object last saved
    for step in range(start, steps):
        ...
        if ck.should_checkpoint():
            ck.save(state, step=step) # pickle; or: with ck.saving(step=step) as d: ...
        if ck.should_stop():
            sys.exit(0)

In a multi-process job (torchrun, srun, mpirun: ``docs/multi-rank.md``) the same code runs
unchanged on every rank: the ranks agree on one point of the loop (the count of
``should_checkpoint()`` calls, or the step when one is given), each saves its shard, the
checkpoint is published once all shards are durable, and ``restore()`` / ``restore_dir()`` give
each rank its own shard (``restore(reshard=fn)`` for a checkpoint of another world size).

The protocol and the on-disk format are specified in ``docs/protocol.md``.
"""

from ._crc import crc32c_accelerated
from .client import DEFAULT_DIR, STATE_FILE, Checkpointer, OldShards, RestorePoint, Saved, __version__
from .errors import CkptError, EnvError, InvalidCheckpoint, ManifestError
from .manifest import MANIFEST_NAME, FileEntry, Manifest, check_name
from .multi_rank import World, shard_name
from .store import Stage, Store, parse_seq, read_manifest, verify_path

__all__ = [
    "Checkpointer",
    "OldShards",
    "RestorePoint",
    "Saved",
    "World",
    "shard_name",
    "STATE_FILE",
    "DEFAULT_DIR",
    "CkptError",
    "EnvError",
    "InvalidCheckpoint",
    "ManifestError",
    "MANIFEST_NAME",
    "FileEntry",
    "Manifest",
    "check_name",
    "Stage",
    "Store",
    "parse_seq",
    "read_manifest",
    "verify_path",
    "crc32c_accelerated",
    "__version__",
]
