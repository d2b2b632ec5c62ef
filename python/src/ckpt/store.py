"""The on-disk format: finding, verifying and durably publishing checkpoints. Mirrors
``src/store/`` (``commit.rs``, ``scan.rs``); the steps are specified in ``docs/protocol.md``.

::

    DIR/                         created 0700
      ckpt-000000000042/         a published checkpoint: the job's files + MANIFEST.ckpt
      quarantine/                checkpoints that failed verification (moved by the supervisor)
      .ckpt/staging/<token>.<pid>/   a save in progress (invisible to readers)
      .ckpt/trash/               checkpoints being pruned
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

from ._crc import Hasher, releases_gil
from .errors import CkptError, InvalidCheckpoint, ManifestError
from .manifest import MANIFEST_BYTES, MANIFEST_NAME, FileEntry, Manifest, check_name, now_ms

__all__ = [
    "PREFIX",
    "Store",
    "Stage",
    "Found",
    "parse_seq",
    "read_manifest",
    "verify_path",
    "verify_files",
    "open_member",
    "rename_noreplace",
]

PathLike = Union[str, "os.PathLike[str]"]

#: Prefix of published checkpoint directories.
PREFIX = "ckpt-"
#: ckpt's private sub-directory.
PRIVATE = ".ckpt"
#: Where checkpoints that failed verification are moved (by the supervisor).
QUARANTINE = "quarantine"
#: Where ``ckpt rollback`` sets newer checkpoints aside (never deleted).
ROLLED_BACK = "rolled-back"
#: Checkpoint names (tags) in ``DIR/.ckpt``; tagged checkpoints are never pruned.
TAGS_FILE = "tags.json"

_SEQ = re.compile(r"ckpt-([0-9]{1,20})")
_SEQ_SUFFIX = re.compile(r"ckpt-([0-9]{1,20})(?:\..*)?", re.S)
_U64 = (1 << 64) - 1
_BLOCK = 1 << 20
_counter = itertools.count()


def parse_seq(name: str, suffix_ok: bool = False) -> Optional[int]:
    """The sequence number of ``ckpt-<digits>`` (and of ``ckpt-<digits>.<anything>`` when
    ``suffix_ok``, as in ``quarantine/``); ``None`` for any other name."""
    m = (_SEQ_SUFFIX if suffix_ok else _SEQ).fullmatch(name)
    if not m:
        return None
    v = int(m.group(1))
    return v if v <= _U64 else None


def token() -> str:
    """A unique name for temporary entries; the part after the last dot is our pid, which is
    what the supervisor's cleaner checks for liveness."""
    return f"{time.time_ns() % 1_000_000_000:x}{next(_counter):x}.{os.getpid()}"


class NotRegularFile(OSError):
    """Raised by :func:`open_regular` for a symlink, FIFO, socket, device or directory."""


def open_regular(path: PathLike) -> int:
    """The one safe open of a file in a checkpoint directory (as Rust's
    ``store::io::open_checked``): ``O_NONBLOCK|O_NOFOLLOW|O_CLOEXEC``, ``fstat``, anything but a regular file refused
    (:class:`NotRegularFile`) without blocking (a FIFO planted there), then blocking again.
    Returns a read-only file descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFile(
                errno.ELOOP,
                "it is a symlink, not a regular file; ckpt never follows links (hint: remove it)",
                os.fspath(path),
            ) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            if stat.S_ISFIFO(mode):
                kind = "a FIFO"
            elif stat.S_ISDIR(mode):
                kind = "a directory"
            else:
                kind = "a socket or device"
            raise NotRegularFile(
                errno.EINVAL, f"it is {kind}, not a regular file (hint: remove it)", os.fspath(path)
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_path(path: PathLike, directory: bool = False) -> None:
    flags = os.O_RDONLY | os.O_NOFOLLOW
    if directory:
        flags |= os.O_DIRECTORY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- rename without replacing -------------------------------------------------------------

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_renameat2: Optional[Callable[..., int]] = None
_renameat2_loaded = False
_renameat2_lock = threading.Lock()


def _load_renameat2() -> Optional[Callable[..., int]]:
    global _renameat2, _renameat2_loaded
    with _renameat2_lock:
        if not _renameat2_loaded:
            _renameat2_loaded = True
            try:
                import ctypes
                import ctypes.util

                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                fn = libc.renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int

                def call(src: bytes, dst: bytes) -> int:
                    if fn(_AT_FDCWD, src, _AT_FDCWD, dst, _RENAME_NOREPLACE) == 0:
                        return 0
                    return ctypes.get_errno()

                _renameat2 = call
            except (OSError, AttributeError):  # no libc / glibc < 2.28 / not Linux
                _renameat2 = None
    return _renameat2


def rename_noreplace(src: PathLike, dst: PathLike) -> None:
    """Renames ``src`` to ``dst``, raising :class:`FileExistsError` if ``dst`` exists.

    Uses ``renameat2(RENAME_NOREPLACE)`` through ctypes. Where that is unavailable (no
    glibc 2.28, or a file system answering EINVAL/ENOSYS such as NFS or some FUSE), it checks
    that ``dst`` does not exist and then uses ``os.rename``: a directory rename never replaces a
    non-empty directory, and every published checkpoint holds at least its manifest, so the only
    thing the window between the check and the rename could replace is an empty directory, which
    is not a checkpoint.
    """
    s, d = os.fsencode(src), os.fsencode(dst)
    fn = _load_renameat2()
    if fn is not None:
        err = fn(s, d)
        if err == 0:
            return
        if err in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(err, os.strerror(err), os.fsdecode(d))
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), os.fsdecode(s))
    if os.path.lexists(d):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fsdecode(d))
    try:
        os.rename(s, d)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(e.errno, os.strerror(e.errno), os.fsdecode(d)) from None
        raise


# --- reading and verifying ----------------------------------------------------------------


def read_manifest(path: PathLike) -> Manifest:
    """Reads and decodes a checkpoint's manifest without reading its files. Raises
    :class:`InvalidCheckpoint`."""
    try:
        st = os.lstat(path)
    except OSError as e:
        raise InvalidCheckpoint("unreadable", f"cannot read it: {e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise InvalidCheckpoint("not-a-directory", "it is not a directory (a symlink or a file)")
    mpath = os.path.join(os.fspath(path), MANIFEST_NAME)
    try:
        fd = open_regular(mpath)
    except FileNotFoundError:
        raise InvalidCheckpoint(
            "no-manifest", "MANIFEST.ckpt is missing (an incomplete or foreign directory)"
        ) from None
    except OSError as e:
        if isinstance(e, NotRegularFile):
            raise InvalidCheckpoint(
                "not-regular", f"file {MANIFEST_NAME!r} is a symlink or not a regular file; ckpt never follows links"
            ) from None
        raise InvalidCheckpoint("unreadable", f"cannot read it: {e}") from None
    try:
        chunks = []
        left = MANIFEST_BYTES + 1
        while left > 0:
            b = os.read(fd, min(left, _BLOCK))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    except OSError as e:
        raise InvalidCheckpoint("unreadable", f"cannot read it: {e}") from None
    finally:
        os.close(fd)
    try:
        return Manifest.decode(b"".join(chunks))
    except ManifestError as e:
        raise InvalidCheckpoint("bad-manifest", str(e)) from None


def open_member(directory: PathLike, name: str) -> int:
    """Opens listed file ``name`` of a checkpoint for reading, refusing symlinks at every level.
    Returns a file descriptor. Raises :class:`InvalidCheckpoint`."""
    cur = os.fspath(directory)
    comps = name.split("/")
    for i, comp in enumerate(comps):
        cur = os.path.join(cur, comp)
        last = i + 1 == len(comps)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            raise InvalidCheckpoint("missing-file", f"file {name!r} is missing") from None
        except OSError as e:
            raise InvalidCheckpoint("unreadable", f"cannot read it: {e}") from None
        if (last and stat.S_ISREG(st.st_mode)) or (not last and stat.S_ISDIR(st.st_mode)):
            continue
        raise InvalidCheckpoint(
            "not-regular", f"file {name!r} is a symlink or not a regular file; ckpt never follows links"
        )
    try:
        return open_regular(cur)
    except NotRegularFile:
        raise InvalidCheckpoint(
            "not-regular", f"file {name!r} is a symlink or not a regular file; ckpt never follows links"
        ) from None
    except OSError as e:
        raise InvalidCheckpoint("unreadable", f"cannot read it: {name}: {e}") from None


def read_member(directory: PathLike, entry: FileEntry, algo: str) -> bytes:
    """Reads listed file ``entry`` whole, checked against its size and checksum."""
    fd = open_member(directory, entry.name)
    try:
        chunks = []
        left = entry.size + 1
        while left > 0:
            b = os.read(fd, min(left, _BLOCK))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
    except OSError as e:
        raise InvalidCheckpoint("unreadable", f"cannot read it: {entry.name}: {e}") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    _check(entry, algo, len(data), data)
    return data


def _check(entry: FileEntry, algo: str, size: int, data: Optional[bytes], h: Optional[Hasher] = None) -> None:
    if size != entry.size:
        raise InvalidCheckpoint(
            "size-mismatch", f"file {entry.name!r} is {size} bytes, the manifest says {entry.size}"
        )
    if h is None:
        h = Hasher(algo)
        h.update(data or b"")
    if h.value != entry.sum:
        raise InvalidCheckpoint(
            "checksum-mismatch",
            f"file {entry.name!r} has checksum {h.value:08x}, the manifest says {entry.sum:08x} (the bytes changed)",
        )


# A member at least this large is read by several threads, one contiguous part each (as the
# Rust verifier does: on a cold cache the page allocations of a buffered read cost CPU in the
# kernel, which two readers share out; docs/benchmarks.md run O).
_VERIFY_PART_MIN = 64 << 20
_VERIFY_READ = 4 << 20
_VERIFY_THREADS = 4


def _checksum_member(fd: int, size: int, algo: str) -> Tuple[int, Hasher]:
    """Reads the ``size`` bytes the manifest lists for an open member: how many bytes it holds
    (``size`` if all is well; fewer if it ends early, more if it grew) and their checksum.
    Large members are read by up to one thread per CPU when the checksum runs outside the GIL."""
    parts = 1
    if releases_gil(algo):
        parts = max(1, min(size // _VERIFY_PART_MIN, os.cpu_count() or 1, _VERIFY_THREADS))
    return _checksum_parts(fd, size, algo, parts, _VERIFY_READ)


def _checksum_parts(fd: int, size: int, algo: str, parts: int, read: int) -> Tuple[int, Hasher]:
    part = -(-size // parts) if size else 0
    part = -(-part // read) * read
    bounds = [(min(i * part, size), min((i + 1) * part, size)) for i in range(parts)]
    results: "List[Optional[Tuple[int, int, Optional[BaseException]]]]" = [None] * parts

    def one(i: int) -> None:
        lo, hi = bounds[i]
        h, off = Hasher(algo), lo
        try:
            if hasattr(os, "posix_fadvise") and hi > lo:
                os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_SEQUENTIAL)
            while off < hi:
                b = os.pread(fd, min(read, hi - off), off)
                if not b:
                    break
                h.update(b)
                off += len(b)
            results[i] = (h.value, off, None)
        except BaseException as e:  # re-raised by the caller's thread
            results[i] = (h.value, off, e)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(1, parts)]
    for t in threads:
        t.start()
    one(0)
    for t in threads:
        t.join()
    total, n = Hasher(algo), 0
    for (lo, hi), r in zip(bounds, results):
        assert r is not None
        crc, end, err = r
        if err is not None:
            raise err
        total.append(crc, end - lo)
        n = end
        if end < hi:  # it ended early: the bytes read so far
            return n, total
    # Nothing past the end: a member that grew is not the one the manifest describes.
    if os.pread(fd, 1, size):
        n = max(os.fstat(fd).st_size, size + 1)
    return n, total


def _sum_while_syncing(fd: int, algo: str) -> Tuple[int, int]:
    """Size and checksum of a file the job wrote itself (``saving()``), read back (usually from
    the page cache) while another thread fsyncs it: the two overlap instead of adding up. A
    file that changes size meanwhile is read again from the start, to its end."""
    err: List[OSError] = []

    def sync() -> None:
        try:
            os.fsync(fd)
        except OSError as e:
            err.append(e)

    t = threading.Thread(target=sync, daemon=True)
    t.start()
    try:
        size = os.fstat(fd).st_size
        n, h = _checksum_member(fd, size, algo)
        if n != size:
            h, n = Hasher(algo), 0
            while True:
                b = os.pread(fd, _BLOCK, n)
                if not b:
                    break
                h.update(b)
                n += len(b)
    finally:
        t.join()
    if err:
        raise err[0]
    return n, h.value


def verify_path(path: PathLike, seq: Optional[int] = None) -> Manifest:
    """Fully verifies the checkpoint at ``path``: its manifest, then every listed file's size
    and checksum. ``seq`` is the number its directory name carries (checked against the
    manifest). Returns the manifest; raises :class:`InvalidCheckpoint` (with ``.slug``)."""
    try:
        m = read_manifest(path)
        if seq is not None and seq != m.seq:
            raise InvalidCheckpoint(
                "seq-mismatch", f"directory name says sequence {seq} but the manifest says {m.seq}"
            )
        verify_files(path, m)
        return m
    except InvalidCheckpoint as e:
        raise e.at(os.fspath(path)) from None


def verify_files(path: PathLike, m: Manifest, prefix: str = "") -> None:
    """Checks the size and checksum of every file ``m`` lists whose name starts with
    ``prefix`` (all of them by default; ``rank-00003/`` for one shard) against the manifest,
    with the fast reader of :func:`verify_path`. Raises :class:`InvalidCheckpoint` (without
    the path: the caller adds it with ``at``)."""
    for f in m.files:
        if not f.name.startswith(prefix):
            continue
        fd = open_member(path, f.name)
        try:
            size = os.fstat(fd).st_size
            if size != f.size:
                _check(f, m.checksum, size, b"")
            n, h = _checksum_member(fd, f.size, m.checksum)
        except OSError as e:
            raise InvalidCheckpoint("unreadable", f"cannot read it: {f.name}: {e}") from None
        finally:
            os.close(fd)
        _check(f, m.checksum, n, None, h)


@dataclass
class Found:
    """A checkpoint that verified."""

    seq: int
    path: Path
    manifest: Manifest


# --- the store ----------------------------------------------------------------------------


class Store:
    """A checkpoint directory."""

    def __init__(self, directory: PathLike) -> None:
        self.dir = Path(os.path.abspath(os.fspath(directory)))

    def __repr__(self) -> str:
        return f"Store({str(self.dir)!r})"

    @property
    def private(self) -> Path:
        """``DIR/.ckpt``."""
        return self.dir / PRIVATE

    def create(self) -> None:
        """Creates the directory (0700) and ckpt's private sub-directories."""
        for d in (self.dir, self.private, self.private / "staging", self.private / "trash"):
            os.makedirs(d, mode=0o700, exist_ok=True)
        if not self.dir.is_dir():
            raise CkptError(f"{self.dir} is not a directory; hint: CKPT_DIR must name a directory")

    def path_of(self, seq: int) -> Path:
        """The path of checkpoint ``seq``."""
        return self.dir / f"{PREFIX}{seq:012d}"

    def list(self) -> List[Tuple[int, Path]]:
        """Published checkpoints by name (not verified), ascending by sequence number."""
        out = []
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        for n in names:
            s = parse_seq(n)
            if s is not None:
                out.append((s, self.dir / n))
        out.sort()
        return out

    def next_seq(self) -> int:
        """The number a new checkpoint should take: above every published, quarantined and
        rolled-back one. A published checkpoint numbered 2**64-1 cannot be followed (refused,
        as by the Rust store); a set-aside one with that number is skipped."""
        top = max((s for s, _ in self.list()), default=0)
        if top >= _U64:
            raise CkptError(
                f"cannot number a new checkpoint: {self.path_of(top)} already carries the largest "
                f"possible number ({_U64}); hint: `ckpt export` it and `ckpt import` it into a "
                f"fresh directory, or move it out of {self.dir}"
            )
        for aside in (QUARANTINE, ROLLED_BACK):
            try:
                for n in os.listdir(self.dir / aside):
                    s = parse_seq(n, suffix_ok=True)
                    if s is not None and s < _U64:
                        top = max(top, s)
            except OSError:
                pass
        return top + 1

    def tagged(self) -> set:
        """Sequence numbers named by a tag (``.ckpt/tags.json``); retention never removes
        them. Raises if the tag file exists but cannot be read (never prune blindly)."""
        try:
            fd = open_regular(self.private / TAGS_FILE)
        except FileNotFoundError:
            return set()
        with os.fdopen(fd, "rb") as f:
            doc = json.loads(f.read(16 << 20))
        return {int(v) for v in doc["tags"].values()}

    def verify(self, seq: int) -> Manifest:
        """Fully verifies checkpoint ``seq``."""
        return verify_path(self.path_of(seq), seq)

    def latest_verified(self, on_bad: Optional[Callable[[int, InvalidCheckpoint], None]] = None) -> Optional[Found]:
        """The newest checkpoint that verifies (newer ones that do not are passed to ``on_bad``
        and skipped; this client never moves them: that is the supervisor's job)."""
        for seq, path in reversed(self.list()):
            try:
                return Found(seq, path, verify_path(path, seq))
            except InvalidCheckpoint as e:
                if not os.path.lexists(path):  # pruned under us: not corrupt
                    continue
                if on_bad is not None:
                    on_bad(seq, e)
        return None

    def clean_leftovers(self) -> int:
        """Removes staging/trash entries whose writer (the pid after the last dot) is dead."""
        n = 0
        for sub in ("staging", "trash"):
            d = self.private / sub
            try:
                names = os.listdir(d)
            except OSError:
                continue
            for name in names:
                pid_s = name.rsplit(".", 1)[-1]
                if pid_s.isascii() and pid_s.isdigit() and _pid_alive(int(pid_s)):
                    continue
                _rmtree(d / name)
                n += 1
        return n

    def prune(self, keep: int, protect: Tuple[int, ...] = ()) -> List[int]:
        """Removes published checkpoints beyond the newest ``keep`` (except ``protect``): each
        is renamed into ``.ckpt/trash`` (atomic, made durable) and then deleted."""
        all_ = self.list()
        if len(all_) <= keep:
            return []
        trash = self.private / "trash"
        try:
            # Not recursive: a checkpoint directory that vanished is never re-created here.
            os.mkdir(trash, 0o700)
        except FileExistsError:
            pass
        if not stat.S_ISDIR(os.lstat(trash).st_mode):
            raise CkptError(
                f"{trash} is a symlink or not a directory; ckpt never follows links planted in the "
                "checkpoint directory; hint: remove it"
            )
        moved = []
        tagged = self.tagged()
        for seq, path in all_[: len(all_) - keep]:
            if seq in protect or seq in tagged:
                continue
            to = trash / f"{PREFIX}{seq:012d}.{token()}"
            try:
                rename_noreplace(path, to)
            except FileNotFoundError:
                continue
            moved.append((seq, to))
        if moved:
            # Both sides of the renames (docs/commit-protocol.md, "Retention"): once durable, a
            # pruned checkpoint can never come back half deleted after a crash below.
            _fsync_path(self.dir, directory=True)
            _fsync_path(trash, directory=True)
        for _, to in moved:
            _rmtree(to)
        return [s for s, _ in moved]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _rmtree(p: PathLike) -> None:
    try:
        shutil.rmtree(p)
    except FileNotFoundError:
        pass


# --- writing ------------------------------------------------------------------------------


class Stage:
    """A checkpoint being written, in ``DIR/.ckpt/staging/<token>.<pid>`` (invisible to readers).

    Put files into :attr:`path` (directly, or with :meth:`write_file`/:meth:`open`), then
    :meth:`commit`. Without a commit, :meth:`abort` removes it.
    """

    def __init__(self, store: Store, algo: str) -> None:
        Hasher(algo)  # validates the name
        self.store = store
        self.algo = algo
        staging = store.private / "staging"
        # Not recreated: a checkpoint directory that vanished (or became a symlink) under a
        # running job must make the save fail, as in the Rust store.
        try:
            st = os.lstat(staging)
        except FileNotFoundError:
            raise CkptError(
                f"cannot save: the checkpoint directory {store.dir} vanished ({staging} is missing); "
                "hint: do not remove it while a job runs"
            ) from None
        if not stat.S_ISDIR(st.st_mode):
            raise CkptError(f"{staging} is not a directory (a symlink?); ckpt never follows links; hint: remove it")
        self.path = staging / token()
        os.mkdir(self.path, 0o700)
        self._known: Dict[str, Tuple[int, int]] = {}
        self.done = False

    def _target(self, name: str) -> Path:
        check_name(name)
        p = self.path / name
        if "/" in name:
            os.makedirs(p.parent, mode=0o700, exist_ok=True)
        return p

    def write_file(self, name: str, data: bytes) -> None:
        """Writes a whole new file ``name``, computing its checksum inline."""
        with self.open(name) as f:
            f.write(data)

    def open(self, name: str) -> "_StageWriter":
        """Opens new file ``name`` for writing (binary); size and checksum are computed as it is
        written. Use as a context manager or call ``close()``."""
        p = self._target(name)
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        return _StageWriter(self, name, os.fdopen(fd, "wb", buffering=_BLOCK))

    def _walk(self) -> Tuple[List[Tuple[str, Path]], List[Path]]:
        files: List[Tuple[str, Path]] = []
        dirs: List[Path] = []

        def walk(d: Path, rel: str) -> None:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
            for e in entries:
                r = f"{rel}{e.name}"
                p = Path(e.path)
                if e.is_dir(follow_symlinks=False):
                    dirs.append(p)
                    walk(p, r + "/")
                elif e.is_file(follow_symlinks=False):
                    if r == MANIFEST_NAME:
                        raise ManifestError(
                            f"bad file name {r!r}: reserved for ckpt's manifest; hint: name the file differently"
                        )
                    files.append((r, p))
                else:
                    raise CkptError(
                        f"{p} is not a regular file (a symlink, socket or device); hint: copy the "
                        "file into the checkpoint instead, ckpt never follows links"
                    )

        walk(self.path, "")
        return files, dirs

    def _seal_files(self) -> Tuple[List[FileEntry], List[Path]]:
        """Checks every file's name, sums the files not written through :meth:`open` (or
        changed since), and fsyncs every file. Returns the manifest entries and the
        sub-directories in walk order (fsync them reversed, deepest first), for :meth:`commit`
        and a multi-rank shard."""
        files, dirs = self._walk()
        entries = []
        for name, p in files:
            check_name(name)
            known = self._known.get(name)
            fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                if known is None or os.fstat(fd).st_size != known[0]:
                    known = _sum_while_syncing(fd, self.algo)
                else:
                    os.fsync(fd)
            finally:
                os.close(fd)
            entries.append(FileEntry(name, known[0], known[1]))
        return entries, dirs

    def commit(self, step: Optional[int], writer: str, meta: Optional[dict] = None) -> Manifest:
        """Makes the checkpoint durable and visible; returns its manifest. The steps, each
        needed for crash safety (``docs/protocol.md``, "Publishing a checkpoint"):

        1. fsync every file; 2. write ``MANIFEST.ckpt`` (O_EXCL) and fsync it; 3. fsync every
        sub-directory (deepest first) and the staging directory; 4. rename it to
        ``DIR/ckpt-<seq>`` without replacing (on EEXIST/ENOTEMPTY: next seq, rewrite the
        manifest, retry); 5. fsync ``DIR`` and ``DIR/.ckpt/staging``.
        """
        if self.done:
            raise CkptError("this stage was already committed or aborted")
        if step is not None and not (isinstance(step, int) and 0 <= step < 1 << 64):
            raise CkptError(f"step must be a non-negative integer below 2**64, not {step!r}")
        entries, dirs = self._seal_files()
        manifest = Manifest(
            seq=0, created_ms=0, writer=writer, checksum=self.algo, files=entries, step=step, meta=dict(meta or {})
        )
        mpath = self.path / MANIFEST_NAME
        for attempt in range(1000):
            manifest.seq = self.store.next_seq()
            manifest.created_ms = now_ms()
            if attempt > 0:
                os.unlink(mpath)
            fd = os.open(mpath, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                data = manifest.encode()
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            for d in reversed(dirs):
                _fsync_path(d, directory=True)
            _fsync_path(self.path, directory=True)
            try:
                rename_noreplace(self.path, self.store.path_of(manifest.seq))
            except FileExistsError:
                continue
            self.done = True
            _fsync_path(self.store.dir, directory=True)
            _fsync_path(self.store.private / "staging", directory=True)
            return manifest
        raise CkptError(f"could not claim a sequence number in {self.store.dir} after 1000 tries")

    def abort(self) -> None:
        """Discards the staged files."""
        if not self.done:
            self.done = True
            _rmtree(self.path)


class _StageWriter:
    """A new file in a stage; computes size and checksum as it is written."""

    def __init__(self, stage: Stage, name: str, f) -> None:  # type: ignore[no-untyped-def]
        self._stage = stage
        self._name = name
        self._f = f
        self._h = Hasher(stage.algo)
        self._size = 0

    def write(self, data: bytes) -> int:
        n = self._f.write(data)
        mv = memoryview(data).cast("B")
        self._h.update(mv[:n] if n is not None else mv)
        self._size += n if n is not None else len(mv)
        return n

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
            self._stage._known[self._name] = (self._size, self._h.value)

    def __enter__(self) -> "_StageWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
