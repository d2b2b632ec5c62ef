"""Page-cache helpers shared by the tests and the job scripts they run (importable without
pytest: the torch jobs run in another interpreter with this directory on PYTHONPATH)."""

import os

from ckpt import _bulk


def uncache(p: "os.PathLike[str] | str") -> None:
    """Writes `p` back and drops it from the page cache (retried while read-ahead holds it)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(3000):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not _bulk._cached(fd, os.fstat(fd).st_size):
                return
        raise AssertionError(f"{p} stays in the page cache")
    finally:
        os.close(fd)
