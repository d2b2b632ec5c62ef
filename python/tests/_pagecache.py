"""Page-cache helpers shared by the tests and the job scripts they run (importable without
pytest: the torch jobs run in another interpreter with this directory on PYTHONPATH)."""

import os

from ckpt import _bulk


def _any_cached(fd: int, size: int) -> bool:
    """Whether a page at any of the places the client's probe looks (the start, the middle)
    is in the page cache. (`_bulk._cached` asks the opposite, whether both are: a file
    with only its middle left in the cache passed it, and the loader's first small read
    then made the whole file look cached.)"""
    probe = bytearray(4096)
    for off in (0, (size // 2) & ~(_bulk.ALIGN - 1)):
        if off >= size:
            continue
        try:
            if os.preadv(fd, [probe], off, os.RWF_NOWAIT) > 0:
                return True
        except BlockingIOError:
            pass
        except OSError:
            return False  # no RWF_NOWAIT here (ramfs): the client's probe cannot tell either
    return False


def uncache(p: "os.PathLike[str] | str") -> None:
    """Writes `p` back and drops it from the page cache (retried while read-ahead holds it)."""
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
        for _ in range(3000):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if not _any_cached(fd, os.fstat(fd).st_size):
                return
        raise AssertionError(f"{p} stays in the page cache")
    finally:
        os.close(fd)
