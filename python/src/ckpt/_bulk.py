"""Large buffers (numpy arrays, ``pickle.PickleBuffer``: whatever pickle protocol 5 hands out of
band) written to disk as raw bytes, past the page cache, and read back without a copy.

:meth:`Checkpointer.save` pickles the state with protocol 5 and a ``buffer_callback``: every
contiguous buffer of at least :data:`OOB_MIN` bytes stays out of the pickle stream and goes,
byte for byte, into one file, ``state.pickle.buffers``, each buffer at a :data:`ALIGN`-aligned offset
(zero padding between them and at the end). ``state.pickle`` then holds two pickles: a small
header (the offset and length of every segment) and the state's stream. Both are ordinary
checkpoint files (size and checksum in the manifest). A checkpoint with ``state.pickle``
alone (written by an older client, or of a state without large buffers) holds the state's
pickle only and restores as before.

:meth:`Checkpointer.save_async` writes the same files: it blocks the job while the stream is
pickled and the buffers are copied (:func:`snapshot`) into one page-aligned block laid out
exactly as ``state.pickle.buffers`` (kept for the next asynchronous save); a background thread
then writes that block with ``O_DIRECT`` straight from it (:func:`write_block`).

Writes: the buffers are copied, :data:`PIECE` bytes at a time, into page-aligned reused
``mmap`` buffers (:data:`BUFFERS` of them: the only extra memory a save needs besides the
small pickle stream), checksummed there, and written with ``O_DIRECT`` by a helper thread
while the next piece is copied and checksummed (``os.pwrite`` and ``zlib.crc32`` release the
GIL). A file system that refuses ``O_DIRECT``, or ``CKPT_DIRECT_IO=0``, gets the same
writes through the page cache; the commit fsyncs the file either way.

Reads: ``state.pickle.buffers`` is read (``O_DIRECT`` when it is large and not cached) into
one page-aligned anonymous ``mmap`` by :data:`READERS` helper threads (one piece each in
flight), a third faulting the fresh memory in ahead of them, while :data:`HASHERS` threads
checksum the pieces as they arrive (their sums combined in file order: ``_crc.combine``); size
and checksum are checked before anything is unpickled; the arrays are then views of that
memory (zero-copy, writable). :class:`VerifiedFile` gives a library's own loader
(``ckpt.torch``: ``torch.load``) the same reads into the memory it asks to fill, and checks the
whole file before the caller uses what was loaded.
"""

from __future__ import annotations

import errno
import io
import mmap
import os
import pickle
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._crc import Hasher, combine, releases_gil
from .errors import InvalidCheckpoint

#: Offsets of segments in ``state.pickle.buffers`` (and the unit of every direct write).
ALIGN = 4096
#: Bytes per write or read of the bulk paths.
PIECE = 8 << 20
#: Aligned buffers of a save (kept for the next save: fresh memory is faulted in again).
BUFFERS = 3
#: Reads of a restore in flight at once (one piece each; in an interleaved A/B of cold 1 GiB
#: restores, 4 rounds, median ratio to a cold `dd` read: 1 reader 1.06, 2 readers 1.57, 3 1.05).
READERS = 2
#: Threads checksumming the pieces of a restore (each piece on its own, the sums combined in
#: file order at the end: ``zlib.crc32``, at 1.5-1.9 s per GiB on this loaded VM, was the whole
#: cost of a restore on one thread; docs/benchmarks.md, run J).
HASHERS = 2
#: :class:`VerifiedFile`'s large reads: bytes per ``O_DIRECT`` read and reader threads (one
#: buffer each).
DIRECT_PIECE = 8 << 20
DIRECT_READERS = 2
#: Reader threads of :meth:`VerifiedFile.scatter_verified` (each reads, copies out and
#: checksums its own pieces, one in flight).
SCATTER_READERS = 3
#: Whether :func:`read_segments` asks for transparent huge pages (``MADV_HUGEPAGE``) for its
#: memory (``CKPT_HUGEPAGES=1``). Off by default: no gain measured (docs/benchmarks.md, run L),
#: and with THP ``defrag=madvise`` such faults may compact memory synchronously.
HUGEPAGES = os.environ.get("CKPT_HUGEPAGES", "0").strip() == "1"
#: Out-of-band buffers smaller than this stay inside the pickle stream.
OOB_MIN = 64 << 10
#: The file that holds the raw buffers.
BUFFERS_SUFFIX = ".buffers"
#: Environment variable: ``0`` makes bulk writes and reads go through the page cache.
ENV_DIRECT_IO = "CKPT_DIRECT_IO"

_pool: List[mmap.mmap] = []
_pool_lock = threading.Lock()


def direct_io() -> bool:
    """Whether bulk writes and reads may bypass the page cache (``CKPT_DIRECT_IO`` is not 0)."""
    return os.environ.get(ENV_DIRECT_IO, "1").strip() != "0"


def _set_direct(fd: int, on: bool) -> bool:
    """Sets or clears ``O_DIRECT`` on ``fd``; False where the file system refuses it."""
    odirect = getattr(os, "O_DIRECT", 0)
    if not odirect:
        return False
    import fcntl

    try:
        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, (fl | odirect) if on else (fl & ~odirect))
        return True
    except OSError:
        return False


class _Header:
    """The first pickle of ``state.pickle`` in the raw-buffers format: where each out-of-band
    buffer lies in ``state.pickle.buffers``. (An older client that meets it fails to unpickle it
    loudly instead of returning it as the state.)"""

    def __init__(self, version: int, segments: List[Tuple[int, int]]) -> None:
        self.version = version
        self.segments = segments

    def __reduce__(self) -> Any:
        return (_header, (self.version, self.segments))


def _header(version: int, segments: List[Tuple[int, int]]) -> _Header:
    return _Header(version, [tuple(s) for s in segments])  # type: ignore[misc]


def dumps(state: Any) -> Tuple[bytes, List[memoryview]]:
    """The protocol-5 pickle of ``state`` and its large out-of-band buffers (views of the
    state's own memory, not copies)."""
    bufs: List[memoryview] = []

    def cb(pb: pickle.PickleBuffer) -> bool:
        try:
            mv = pb.raw()
        except BufferError:  # not contiguous: in the stream
            return True
        if mv.nbytes < OOB_MIN:
            return True
        bufs.append(mv)
        return False

    stream = pickle.dumps(state, protocol=5, buffer_callback=cb)
    return stream, bufs


def _take_buffers() -> List[mmap.mmap]:
    with _pool_lock:
        got = _pool[:BUFFERS]
        del _pool[:BUFFERS]
    while len(got) < BUFFERS:
        got.append(mmap.mmap(-1, PIECE))
    return got


def _give_buffers(bufs: List[mmap.mmap]) -> None:
    with _pool_lock:
        if not _pool:
            _pool.extend(bufs)


def _pwrite_all(fd: int, view: memoryview, off: int) -> None:
    while view:
        n = os.pwrite(fd, view, off)
        if n <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        view = view[n:]
        off += n


class _Writer(threading.Thread):
    """Writes full pieces at their offsets; the first direct write refused with EINVAL
    (alignment the device does not accept) switches the descriptor to buffered writes."""

    def __init__(self, fd: int, direct: bool, free: "list", cond: threading.Condition) -> None:
        super().__init__(name="ckpt-write", daemon=True)
        self.fd = fd
        self.direct = direct
        self.ok_once = False
        self.jobs: List[Optional[Tuple[mmap.mmap, int, int]]] = []
        self.free = free
        self.cond = cond
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        while True:
            with self.cond:
                while not self.jobs:
                    self.cond.wait()
                job = self.jobs.pop(0)
            if job is None:
                return
            buf, n, off = job
            if self.error is None:
                try:
                    view = memoryview(buf)[:n]
                    try:
                        _pwrite_all(self.fd, view, off)
                    except OSError as e:
                        if not (self.direct and not self.ok_once and e.errno == errno.EINVAL):
                            raise
                        _set_direct(self.fd, False)
                        self.direct = False
                        _pwrite_all(self.fd, view, off)
                    self.ok_once = True
                    view.release()
                except BaseException as e:  # noqa: BLE001 - reported by write_segments
                    self.error = e
            with self.cond:
                self.free.append(buf)
                self.cond.notify_all()


def write_segments(path: "os.PathLike[str] | str", views: List[memoryview], algo: str) -> Tuple[int, int, List[Tuple[int, int]]]:
    """Writes every view at the next :data:`ALIGN`-aligned offset of the new file ``path``
    (zero padding between them and up to the end); returns (size, checksum, [(offset,
    length)])."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        direct = direct_io() and _set_direct(fd, True)
        bufs = _take_buffers()
        free = list(bufs)
        cond = threading.Condition()
        w = _Writer(fd, direct, free, cond)
        w.start()
        h = Hasher(algo)
        segs: List[Tuple[int, int]] = []
        pos = 0  # bytes of the file laid out so far
        file_off = 0  # where the current piece starts
        zeros = bytes(ALIGN)
        state = {"cur": None, "mv": None, "fill": 0}

        def take() -> None:
            with cond:
                while not free and w.error is None:
                    cond.wait()
                if w.error is not None:
                    raise w.error
                b = free.pop()
            state["cur"], state["mv"], state["fill"] = b, memoryview(b), 0

        def flush() -> None:
            nonlocal file_off
            n = state["fill"]
            mv = state["mv"]
            h.update(mv[:n])
            mv.release()
            with cond:
                w.jobs.append((state["cur"], n, file_off))
                cond.notify_all()
            file_off += n
            state["cur"] = None

        try:
            for v in views:
                v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
                segs.append((pos, v.nbytes))
                i, total = 0, v.nbytes
                while True:
                    if state["cur"] is None:
                        take()
                    fill = state["fill"]
                    take_n = min(PIECE - fill, total - i)
                    if take_n:
                        state["mv"][fill : fill + take_n] = v[i : i + take_n]
                    state["fill"] = fill + take_n
                    i += take_n
                    pos += take_n
                    if state["fill"] == PIECE:
                        flush()
                    if i >= total:
                        break
                pad = (-pos) % ALIGN
                if pad:
                    if state["cur"] is None:
                        take()
                    fill = state["fill"]
                    state["mv"][fill : fill + pad] = zeros[:pad]
                    state["fill"] = fill + pad
                    pos += pad
                    if state["fill"] == PIECE:
                        flush()
            if state["cur"] is not None and state["fill"]:
                flush()
            elif state["cur"] is not None:
                state["mv"].release()
                with cond:
                    free.append(state["cur"])
        finally:
            with cond:
                w.jobs.append(None)
                cond.notify_all()
            w.join()
            _give_buffers(bufs)
        if w.error is not None:
            raise w.error
        return pos, h.value, segs
    finally:
        os.close(fd)


class DirectWriter:
    """A binary file object for a library's own serializer (``torch.save(sd, f)``,
    ``np.save(f, a)``) that writes the stream past the page cache: the bytes are copied into
    the reused :data:`PIECE`-byte aligned buffers, checksummed there, and each full piece is
    written with ``O_DIRECT`` by a helper thread while the next one fills; the last partial
    piece goes through the page cache. Sequential writes only (no ``seek``). ``close()``
    returns (size, checksum); ``on_close`` gets them too (a stage records them, so the commit
    does not read the file back)."""

    def __init__(self, path: "os.PathLike[str] | str", algo: str,
                 on_close: Optional[Callable[[int, int], None]] = None) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        self._on_close = on_close
        self._h = Hasher(algo)
        self._bufs = _take_buffers()
        self._free = list(self._bufs)
        self._cond = threading.Condition()
        self._w = _Writer(self._fd, direct_io() and _set_direct(self._fd, True), self._free, self._cond)
        self._w.start()
        self._cur: Optional[mmap.mmap] = None
        self._mv: Optional[memoryview] = None
        self._fill = 0
        self._off = 0  # file offset of the current piece
        self.closed = False
        self.result: Optional[Tuple[int, int]] = None

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def tell(self) -> int:
        return self._off + self._fill

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        raise OSError(errno.EBADF, "a ckpt direct writer has no file descriptor to share")

    def _take(self) -> None:
        with self._cond:
            while not self._free and self._w.error is None:
                self._cond.wait()
            if self._w.error is not None:
                raise self._w.error
            self._cur = self._free.pop()
        self._mv = memoryview(self._cur)
        self._fill = 0

    def _flush_piece(self) -> None:
        assert self._mv is not None
        self._h.update(self._mv[: self._fill])
        self._mv.release()
        self._mv = None
        with self._cond:
            self._w.jobs.append((self._cur, self._fill, self._off))
            self._cond.notify_all()
        self._off += self._fill
        self._cur = None
        self._fill = 0

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed ckpt direct writer")
        v = memoryview(data)
        v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
        n, i = v.nbytes, 0
        while i < n:
            if self._cur is None:
                self._take()
            assert self._mv is not None
            k = min(PIECE - self._fill, n - i)
            self._mv[self._fill : self._fill + k] = v[i : i + k]
            self._fill += k
            i += k
            if self._fill == PIECE:
                self._flush_piece()
        return n

    def _stop_writer(self) -> None:
        with self._cond:
            self._w.jobs.append(None)
            self._cond.notify_all()
        self._w.join()

    def close(self) -> Tuple[int, int]:
        if self.closed:
            assert self.result is not None
            return self.result
        self.closed = True
        try:
            self._stop_writer()
            if self._w.error is not None:
                raise self._w.error
            if self._fill:
                # The tail (not a whole piece: its length need not be a page multiple) through
                # the page cache; the commit's fsync makes it durable.
                assert self._mv is not None
                tail = self._mv[: self._fill]
                self._h.update(tail)
                _set_direct(self._fd, False)
                _pwrite_all(self._fd, tail, self._off)
                tail.release()
                self._off += self._fill
            size = self._off
            self.result = (size, self._h.value)
        finally:
            if self._mv is not None:
                self._mv.release()
                self._mv = None
            _give_buffers(self._bufs)
            os.close(self._fd)
        if self._on_close is not None:
            self._on_close(*self.result)
        return self.result

    def abandon(self) -> None:
        """Stops without finishing the file (the stage is aborted)."""
        if not self.closed:
            self.closed = True
            self._stop_writer()
            if self._mv is not None:
                self._mv.release()
            _give_buffers(self._bufs)
            os.close(self._fd)

    def __enter__(self) -> "DirectWriter":
        return self

    def __exit__(self, et: object, *exc: object) -> None:
        if et is None:
            self.close()
        else:
            self.abandon()


def open_direct(stage: Any, name: str) -> DirectWriter:
    """A :class:`DirectWriter` for the new file ``name`` of ``stage``, whose size and checksum
    the stage records when it is closed."""

    def done(size: int, sm: int) -> None:
        stage._known[name] = (size, sm)

    return DirectWriter(stage._target(name), stage.algo, done)


def _cached(fd: int, size: int) -> bool:
    """Whether the start and the middle of the file are in the page cache."""
    flag = getattr(os, "RWF_NOWAIT", None)
    if flag is None:
        return True
    probe = bytearray(64 << 10)
    for off in (0, (size // 2) & ~(ALIGN - 1)):
        want = min(len(probe), size - off)
        try:
            if os.preadv(fd, [memoryview(probe)[:want]], off, flag) != want:
                return False
        except OSError:
            return False
    return True


_MADV_POPULATE_WRITE = 23  # Linux 5.14+


def _prefaulter(mm: mmap.mmap, size: int) -> Optional[Callable[[], None]]:
    """A function that faults the pages of ``mm`` in, :data:`PIECE` bytes per
    ``madvise(MADV_POPULATE_WRITE)`` call (through ctypes, which releases the GIL), for a
    helper thread running ahead of the reads: a fresh page costs a fault (on a VM, often a
    host fault too), and done by the reads themselves that cost is paid in series with them.
    ``None`` where it cannot be done (no ctypes or libc; the kernel answering EINVAL stops it)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        madvise.restype = ctypes.c_int
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    except Exception:
        return None

    def run() -> None:
        off = 0
        while off < size:
            n = min(PIECE, size - off)
            if madvise(base + off, -(-n // ALIGN) * ALIGN, _MADV_POPULATE_WRITE) != 0:
                return
            off += n

    return run


class _PieceSums:
    """Checksums of pieces of one file, computed on :data:`HASHERS` helper threads (in any
    order: ``zlib.crc32`` and the C CRC-32C modules release the GIL) and combined in file order
    by :meth:`value`. A piece's memory must stay unchanged until :meth:`value` returns."""

    def __init__(self, algo: str) -> None:
        import queue

        self.algo = algo
        self._fn = Hasher(algo)._fn
        self._q: "queue.SimpleQueue[Optional[Tuple[int, memoryview]]]" = queue.SimpleQueue()
        self._sums: Dict[int, Tuple[int, int]] = {}  # offset -> (length, crc)
        self._err: List[BaseException] = []
        n = HASHERS if releases_gil(algo) else 1
        self._threads = [threading.Thread(target=self._run, name="ckpt-sum", daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            off, view = job
            try:
                c = self._fn(view, 0) & 0xFFFFFFFF if len(view) else 0
                self._sums[off] = (len(view), c)  # one dict store: atomic under the GIL
            except BaseException as e:  # noqa: BLE001 - raised by value()
                self._err.append(e)

    def add(self, off: int, view: memoryview) -> None:
        """Checksums ``view``, the bytes of the file at ``off``."""
        if len(view):
            self._q.put((off, view))

    def stop(self) -> None:
        """Waits for the pieces given so far."""
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()
        self._threads = []
        if self._err:
            raise self._err[0]

    def ranges(self) -> List[Tuple[int, int, int]]:
        """(offset, length, crc) of every piece checksummed, by offset (after :meth:`stop`)."""
        return sorted((o, n, c) for o, (n, c) in self._sums.items())

    def value(self) -> int:
        """The checksum of the pieces, which must tile the file from offset 0."""
        self.stop()
        crc = at = 0
        for off, n, c in self.ranges():
            if off != at:
                raise AssertionError(f"checksummed pieces do not tile the file at {at} (next at {off})")
            crc = combine(self.algo, crc, c, n)
            at += n
        return crc


def read_segments(fd: int, name: str, size: int, expect_sum: int, algo: str,
                  info: Optional[Dict[str, Any]] = None) -> memoryview:
    """Reads the whole file ``fd`` (``size`` bytes per the manifest) into page-aligned memory
    and checks size and checksum; returns a writable view of exactly ``size`` bytes (of an
    anonymous ``mmap``, which lives as long as a view of it does). ``info["direct"]`` (when
    given) says whether the reads went past the page cache."""
    actual = os.fstat(fd).st_size
    if actual != size:
        raise InvalidCheckpoint("size-mismatch", f"file {name!r} is {actual} bytes, the manifest says {size}")
    cap = max(ALIGN, -(-size // ALIGN) * ALIGN)
    mm = mmap.mmap(-1, cap)
    if size >= PIECE and HUGEPAGES:
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)  # fewer faults for the prefaulter (THP "madvise" mode)
        except (AttributeError, OSError):
            pass
    whole = memoryview(mm)
    direct = direct_io() and size >= PIECE and not _cached(fd, size) and _set_direct(fd, True)
    sums = _PieceSums(algo)
    npieces = max(1, -(-size // PIECE))
    done: Dict[int, int] = {}  # piece index -> bytes read into it
    finished = [0]
    cond = threading.Condition()
    err: List[BaseException] = []
    mode = {"direct": direct}

    def reader(first: int) -> None:
        try:
            for k in range(first, npieces, READERS):
                off = k * PIECE
                want = min(PIECE, cap - off)
                got = 0
                while got < want:
                    try:
                        n = os.preadv(fd, [whole[off + got : off + want]], off + got)
                    except OSError as e:
                        if mode["direct"] and e.errno == errno.EINVAL:
                            # O_DIRECT accepted, then refused: through the page cache.
                            with cond:
                                if mode["direct"]:
                                    _set_direct(fd, False)
                                    mode["direct"] = False
                            continue
                        raise
                    if n == 0:
                        break
                    got += n
                with cond:
                    done[k] = min(got, max(0, size - off))
                    cond.notify_all()
                if got < want:
                    return
        except BaseException as e:  # noqa: BLE001 - raised below
            err.append(e)
        finally:
            with cond:
                finished[0] += 1
                cond.notify_all()

    fault = _prefaulter(mm, cap) if size >= PIECE else None
    if fault is not None:
        threading.Thread(target=fault, name="ckpt-prefault", daemon=True).start()
    readers = [threading.Thread(target=reader, args=(i,), name="ckpt-read", daemon=True) for i in range(READERS)]
    for t in readers:
        t.start()
    total = 0
    try:
        for k in range(npieces):
            with cond:
                while k not in done and finished[0] < READERS and not err:
                    cond.wait()
                n = done.pop(k, None)
            if n is None or err:
                break
            off = k * PIECE
            sums.add(off, whole[off : off + n])
            total += n
            if n < min(PIECE, size - off):
                break
    finally:
        for t in readers:
            t.join()
        if mode["direct"]:
            _set_direct(fd, False)
        sums.stop()
    if info is not None:
        info["direct"] = mode["direct"]
    if err:
        raise InvalidCheckpoint("unreadable", f"cannot read it: {name}: {err[0]}")
    if total != size or os.fstat(fd).st_size != size:
        raise InvalidCheckpoint("size-mismatch", f"file {name!r} is {total} bytes, the manifest says {size}")
    got_sum = sums.value()
    if got_sum != expect_sum:
        raise InvalidCheckpoint(
            "checksum-mismatch",
            f"file {name!r} has checksum {got_sum:08x}, the manifest says {expect_sum:08x} (the bytes changed)",
        )
    return whole[:size]


def _address(view: memoryview) -> Optional[int]:
    """The address of a writable buffer (for ``madvise``), ``None`` if ctypes cannot say."""
    try:
        import ctypes

        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except Exception:
        return None


_madvise: Any = None


def _prefault_range(addr: int, size: int) -> None:
    """Faults in the whole pages of ``size`` bytes at ``addr`` (``MADV_POPULATE_WRITE``,
    :data:`PIECE` bytes per call, the GIL released by ctypes); stops at the first refusal."""
    global _madvise
    if _madvise is None:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            f = libc.madvise
            f.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            f.restype = ctypes.c_int
            _madvise = f
        except Exception:
            _madvise = False
    if not _madvise:
        return
    at = -(-addr // ALIGN) * ALIGN
    end = (addr + size) // ALIGN * ALIGN
    while at < end:
        n = min(PIECE, end - at)
        if _madvise(at, n, _MADV_POPULATE_WRITE) != 0:
            return
        at += n


def _reports(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A :class:`VerifiedFile` method that hands a failed check (or a failed read) to the
    file's ``on_damage`` before raising it."""

    def wrapped(self: "VerifiedFile", *a: Any, **k: Any) -> Any:
        try:
            out = fn(self, *a, **k)
        except (InvalidCheckpoint, OSError) as e:
            if self.on_damage is not None:
                self.on_damage(e)
            raise
        if self.checked and self.on_verified is not None:
            tell, self.on_verified = self.on_verified, None
            tell()
        return out

    wrapped.__name__, wrapped.__qualname__, wrapped.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return wrapped


class VerifiedFile(io.RawIOBase):
    """A read-only, seekable file object over a checkpoint member, for a library's own loader
    (``ckpt.torch``: ``torch.load`` reads every tensor with one ``readinto`` into the tensor's
    memory). Reads of at least :data:`PIECE` bytes go past the page cache when the file is
    cold: :data:`READERS` threads read aligned :data:`PIECE`-byte pieces with ``O_DIRECT`` into
    reused page-aligned buffers (one read each in flight), this thread copies each into the
    caller's buffer, whose fresh pages a helper faults in ahead, and :data:`HASHERS` threads
    checksum the copies; smaller reads go through the cache. :meth:`verify` checks the size
    and the checksum of the whole file against the manifest (reading, through the cache, what
    the loader skipped), so a caller uses what it loaded only after it returns. Extra memory:
    ``2 * READERS`` buffers of :data:`PIECE` bytes while a large read runs.

    ``on_damage`` (set by the client under ``ckpt run --restore-check client``) is called with
    any :class:`InvalidCheckpoint` or ``OSError`` a read or a check raises, before it is
    raised; ``on_verified`` (set by a supervised client) once, when the whole file's size and
    checksum have been checked (``checked``)."""

    on_damage: Optional[Callable[[BaseException], None]] = None
    on_verified: Optional[Callable[[], None]] = None
    #: The whole file's size and checksum were checked against the manifest.
    checked = False

    def __init__(self, fd: int, name: str, size: int, expect_sum: int, algo: str) -> None:
        """Takes ``fd`` (the open member, e.g. from ``store.open_member``): closed by :meth:`close`."""
        super().__init__()
        self.name = name
        self._fd = fd
        self._size, self._expect, self._algo = size, expect_sum, algo
        self._pos = 0
        self._direct: Optional[bool] = None  # decided at the first large read
        self.direct_reads = 0
        self.mapped = False  # map_verified() verified it
        self.whole = False  # read_whole() read and verified it
        self.scattered = False  # scatter_verified() read and verified it
        try:
            actual = os.fstat(fd).st_size
        except OSError as e:
            actual = -1
            why = InvalidCheckpoint("unreadable", f"cannot read it: {name}: {e}")
        else:
            why = InvalidCheckpoint("size-mismatch", f"file {name!r} is {actual} bytes, the manifest says {size}")
        if actual != size:
            self._fd = -1
            os.close(fd)
            raise why
        self._sums = _PieceSums(algo)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        if base + pos < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = base + pos
        return self._pos

    def fileno(self) -> int:
        return self._fd

    @_reports
    def readinto(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        if n == 0:
            return 0
        off = self._pos
        if n >= PIECE:
            got = self._read_big(view[:n], off)
        else:
            # A small read (zip headers, the pickle): checksummed from a copy, as the loader
            # may reuse its buffer.
            got = self._pread(view[:n], off)
            if got:
                self._sums.add(off, memoryview(view[:got].tobytes()))
        self._pos += got
        return got

    def _pread(self, view: memoryview, off: int) -> int:
        got = 0
        try:
            while got < len(view):
                r = os.preadv(self._fd, [view[got:]], off + got)
                if r == 0:
                    break
                got += r
        except OSError as e:
            raise InvalidCheckpoint("unreadable", f"cannot read it: {self.name}: {e}") from None
        return got

    def _read_big(self, dest: memoryview, off: int) -> int:
        """``len(dest)`` bytes at ``off`` into ``dest``: past the page cache when it can."""
        if self._direct is None:
            self._direct = direct_io() and not _cached(self._fd, self._size)
        dfd = -1
        if self._direct:
            try:
                dfd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except (OSError, AttributeError):
                self._direct = False
        if dfd < 0:
            got = self._pread(dest, off)
            for p in range(0, got, PIECE):
                self._sums.add(off + p, dest[p : min(got, p + PIECE)])
            return got
        try:
            got = self._read_direct(dfd, dest, off)
        finally:
            os.close(dfd)
        if got < 0:  # refused: through the cache
            self._direct = False
            got = self._pread(dest, off)
            for p in range(0, got, PIECE):
                self._sums.add(off + p, dest[p : min(got, p + PIECE)])
        return got

    def _read_direct(self, dfd: int, dest: memoryview, off: int) -> int:
        """``dest`` filled from ``off`` by :data:`DIRECT_READERS` threads, each reading
        :data:`DIRECT_PIECE`-byte pieces (k, k + readers, ...) with ``O_DIRECT`` into its own
        page-aligned buffer and copying each into ``dest`` itself with ``ctypes.memmove`` (which
        runs without the GIL: the copies of the readers and the checksums of the hashers run at
        once; a copy by this thread, as a memoryview assignment, holds the GIL)."""
        import ctypes

        P = DIRECT_PIECE
        n = len(dest)
        start = off // ALIGN * ALIGN
        end = off + n
        npieces = -(-(end - start) // P)
        nread = min(DIRECT_READERS, npieces)
        dest_addr = _address(dest)
        if dest_addr is None:
            return -1
        results: Dict[int, Tuple[int, Optional[BaseException]]] = {}
        stop = [False]

        def reader(first: int) -> None:
            m = mmap.mmap(-1, P)
            cbuf = ctypes.c_char.from_buffer(m)
            try:
                buf_addr = ctypes.addressof(cbuf)
                with memoryview(m) as mv:
                    for k in range(first, npieces, nread):
                        if stop[0]:
                            return
                        at = start + k * P
                        want = -(-min(P, end - at) // ALIGN) * ALIGN  # whole blocks; EOF stops it
                        got, e = 0, None
                        try:
                            while got < want:
                                with mv[got:want] as part:
                                    r = os.preadv(dfd, [part], at + got)
                                if r == 0:
                                    break
                                got += r
                        except BaseException as x:  # noqa: BLE001 - handed to the caller
                            e = x
                        lo = off - at if k == 0 else 0  # the first piece starts at the aligned offset
                        take = max(0, min(got, end - at) - lo)
                        if take and e is None:
                            d0 = at + lo - off
                            ctypes.memmove(dest_addr + d0, buf_addr + lo, take)
                            self._sums.add(at + lo, dest[d0 : d0 + take])
                        results[k] = (got, e)
                        if e is not None or got < min(P, end - at):
                            stop[0] = True
                            return
            finally:
                del cbuf  # the buffer's export: the mmap closes only without it
                m.close()

        threads = [threading.Thread(target=reader, args=(i,), name="ckpt-read", daemon=True) for i in range(nread)]
        threads.append(threading.Thread(target=_prefault_range, args=(dest_addr, n), name="ckpt-prefault", daemon=True))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        filled = 0
        for k in range(npieces):
            if k not in results:
                break
            got, e = results[k]
            at = start + k * P
            if e is not None:
                if k == 0 and isinstance(e, OSError) and e.errno == errno.EINVAL:
                    return -1  # O_DIRECT accepted at open, refused on reading
                raise InvalidCheckpoint("unreadable", f"cannot read it: {self.name}: {e}")
            filled = max(0, at + min(got, end - at) - off)
            if got < min(P, end - at):
                break  # the file ended early: verify() reports the size
        self.direct_reads += 1
        return filled

    @_reports
    def verify(self) -> None:
        """Checks the whole file against the manifest (size and checksum): the bytes handed
        out, and those the loader skipped (read now); raises :class:`InvalidCheckpoint`."""
        self._sums.stop()
        parts = []
        at = 0
        for off, n, c in self._sums.ranges():
            if off < at:
                # Read twice (the first reading counts), or overlapping the previous piece:
                # the rest, if any, is read again below as a gap.
                continue
            if off > at:
                parts.extend(self._gap(at, off))
            parts.append((n, c))
            at = off + n
        if at < self._size:
            parts.extend(self._gap(at, self._size))
        self._check(parts)

    def _check(self, parts: List[Tuple[int, int]]) -> None:
        """Checks the file whose consecutive pieces from offset 0 have ``(length, checksum)``
        ``parts`` against the manifest: the pieces' total and the file's size now, then the
        combined checksum (:class:`InvalidCheckpoint` otherwise)."""
        crc = total = 0
        for n, c in parts:
            crc = combine(self._algo, crc, c, n)
            total += n
        try:
            now = os.fstat(self._fd).st_size
        except OSError:
            now = -1
        if total != self._size or now != self._size:
            have = now if now != self._size else total
            raise InvalidCheckpoint("size-mismatch", f"file {self.name!r} is {have} bytes, the manifest says {self._size}")
        if crc != self._expect:
            raise InvalidCheckpoint(
                "checksum-mismatch",
                f"file {self.name!r} has checksum {crc:08x}, the manifest says {self._expect:08x} (the bytes changed)",
            )
        self.checked = True

    @_reports
    def map_verified(self) -> Optional[mmap.mmap]:
        """The whole file mapped read-only, after its size and checksum were checked against
        the manifest (:class:`InvalidCheckpoint` otherwise): a helper asks the kernel to read
        it all into the page cache ahead (``POSIX_FADV_WILLNEED``: large reads, no copy, no
        fresh process memory) while :data:`HASHERS` threads checksum it from the mapping. For
        a loader that then copies the bytes into memory the process already has (a model's
        parameters, docs/benchmarks.md run K), once nothing can fail any more. ``None`` if
        this :class:`VerifiedFile` was already read from, or the file cannot be mapped."""
        if self._pos or self._sums._sums or self._size == 0:
            return None
        try:
            mm = mmap.mmap(self._fd, self._size, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError):
            return None
        try:
            mm.madvise(mmap.MADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass

        def ahead() -> None:
            try:
                at = 0
                while at < self._size:  # in pieces: the hashers start on the first at once
                    n = min(4 * PIECE, self._size - at)
                    os.posix_fadvise(self._fd, at, n, os.POSIX_FADV_WILLNEED)
                    at += n
            except (OSError, AttributeError):
                pass

        t = threading.Thread(target=ahead, name="ckpt-readahead", daemon=True)
        t.start()
        ok = False
        try:
            with memoryview(mm) as whole:
                for off in range(0, self._size, PIECE):
                    self._sums.add(off, whole[off : min(self._size, off + PIECE)])
                try:
                    self.verify()
                finally:
                    t.join()
            ok = self.mapped = True
            return mm
        finally:
            if not ok:
                mm.close()

    @_reports
    def scatter_verified(self, dests: List[Tuple[int, int, int]]) -> bool:
        """Reads the whole file once and copies the bytes at each ``(file offset, length,
        address)`` of ``dests`` to the memory at that address (a tensor's) as they arrive;
        then checks the size and the checksum of the whole file against the manifest
        (:class:`InvalidCheckpoint` otherwise). The copies are made before the checksum is
        known: the caller uses the destinations only after this returns, and after an error
        their contents are undefined (a part of a damaged file). Cold, :data:`SCATTER_READERS`
        threads read aligned :data:`DIRECT_PIECE`-byte pieces with ``O_DIRECT`` into reused
        page-aligned buffers, and each copies its piece's parts out (``ctypes.memmove``, which
        runs without the GIL) and checksums the piece; cached, the pieces are taken from a
        mapping of the file instead (no read copy). Extra memory: one :data:`DIRECT_PIECE`
        buffer per reader. False (nothing read or copied) if this file was already read from."""
        if self._pos or self._sums._sums:
            return False
        self._sums.stop()
        size = self._size
        P = DIRECT_PIECE
        npieces = max(1, -(-size // P))
        per: List[List[Tuple[int, int, int]]] = [[] for _ in range(npieces)]
        for off, n, addr in dests:
            if n <= 0:
                continue
            if off < 0 or off + n > size:
                raise InvalidCheckpoint("size-mismatch", f"file {self.name!r} has no bytes {off}..{off + n} (it is {size} bytes)")
            for k in range(off // P, (off + n - 1) // P + 1):
                per[k].append((off, n, addr))
        direct = direct_io() and size >= PIECE and not _cached(self._fd, size)
        got = self._scatter_pass(per, direct)
        if got is None:  # O_DIRECT accepted at open, refused on reading: through the cache
            got = self._scatter_pass(per, False)
        assert got is not None
        sums, direct = got
        parts = []
        total = 0
        for at in sorted(sums):
            if at != total:
                break  # a piece missing: the file ended early (the size check names it)
            parts.append(sums[at])
            total += sums[at][0]
        self._check(parts)
        self.direct_reads += 1 if direct else 0
        self.scattered = True
        return True

    def _scatter_pass(self, per: List[List[Tuple[int, int, int]]], direct: bool) -> Optional[Tuple[Dict[int, Tuple[int, int]], bool]]:
        """One pass of :meth:`scatter_verified` over the file: ({piece offset: (length, sum)},
        whether it read past the page cache). ``None`` when ``O_DIRECT`` was refused on the
        first read."""
        import ctypes

        size = self._size
        P = DIRECT_PIECE
        npieces = len(per)
        fn = Hasher(self._algo)._fn
        dfd = -1
        if direct:
            try:
                dfd = os.open(f"/proc/self/fd/{self._fd}", os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
            except (OSError, AttributeError):
                dfd = -1
        mapped: Optional[mmap.mmap] = None
        if dfd < 0 and size:
            try:
                # Private and writable only so that ctypes can take its address: never written.
                mapped = mmap.mmap(self._fd, size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError):
                mapped = None
            else:
                try:
                    mapped.madvise(mmap.MADV_SEQUENTIAL)
                except (AttributeError, OSError):
                    pass
        sums: Dict[int, Tuple[int, int]] = {}
        errs: List[BaseException] = []
        stop = [False]
        nread = max(1, min(SCATTER_READERS, npieces))

        def scatter(k: int, src: int, got: int) -> None:
            at = k * P
            for off, n, addr in per[k]:
                lo, hi = max(off, at), min(off + n, at + got)
                if hi > lo:
                    ctypes.memmove(addr + (lo - off), src + (lo - at), hi - lo)

        def reader(first: int) -> None:
            buf: Optional[mmap.mmap] = None
            cbuf: Any = None
            try:
                if mapped is not None:
                    cbuf = ctypes.c_char.from_buffer(mapped)
                    base = ctypes.addressof(cbuf)
                    with memoryview(mapped) as whole:
                        for k in range(first, npieces, nread):
                            if stop[0]:
                                return
                            at = k * P
                            got = min(P, size - at)
                            scatter(k, base + at, got)
                            sums[at] = (got, fn(whole[at : at + got], 0) & 0xFFFFFFFF)
                    return
                buf = mmap.mmap(-1, P)
                cbuf = ctypes.c_char.from_buffer(buf)
                addr = ctypes.addressof(cbuf)
                fd = dfd if dfd >= 0 else self._fd
                with memoryview(buf) as mv:
                    for k in range(first, npieces, nread):
                        if stop[0]:
                            return
                        at = k * P
                        want = min(P, size - at)
                        if fd == dfd:
                            want = -(-want // ALIGN) * ALIGN  # whole blocks; EOF stops it
                        got = 0
                        while got < want:
                            with mv[got:want] as part:
                                r = os.preadv(fd, [part], at + got)
                            if r == 0:
                                break
                            got += r
                        got = min(got, size - at)
                        scatter(k, addr, got)
                        with mv[:got] as piece:
                            sums[at] = (got, fn(piece, 0) & 0xFFFFFFFF if got else 0)
                        if got < min(P, size - at):
                            stop[0] = True  # shorter than the manifest says: the size check names it
                            return
            except BaseException as e:  # noqa: BLE001 - raised by the caller's thread
                errs.append(e)
                stop[0] = True
            finally:
                del cbuf  # the buffer's export: the mmap closes only without it
                if buf is not None:
                    buf.close()

        threads = [threading.Thread(target=reader, args=(i,), name="ckpt-read", daemon=True) for i in range(nread)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            if dfd >= 0:
                os.close(dfd)
            if mapped is not None:
                mapped.close()
        if errs:
            e = errs[0]
            if dfd >= 0 and isinstance(e, OSError) and e.errno == errno.EINVAL and 0 not in sums:
                return None
            if isinstance(e, InvalidCheckpoint):
                raise e
            raise InvalidCheckpoint("unreadable", f"cannot read it: {self.name}: {e}")
        return sums, dfd >= 0

    @_reports
    def read_whole(self) -> Optional[memoryview]:
        """The whole file read into fresh page-aligned memory of its own (:func:`read_segments`:
        ``O_DIRECT`` straight into it when the file is cold, no bounce buffer; every piece
        checksummed on the hasher threads from that memory) after its size and checksum were
        checked against the manifest (:class:`InvalidCheckpoint` otherwise). A loader then
        makes its tensors over this memory without a copy (``ckpt.torch``; docs/benchmarks.md,
        run L). ``None`` if this :class:`VerifiedFile` was already read from."""
        if self._pos or self._sums._sums or self._size == 0:
            return None
        self._sums.stop()
        info: Dict[str, Any] = {}
        view = read_segments(self._fd, self.name, self._size, self._expect, self._algo, info)
        self.whole = self.checked = True
        self.direct_reads += 1 if info.get("direct") else 0
        return view

    def _gap(self, lo: int, hi: int) -> List[Tuple[int, int]]:
        h = Hasher(self._algo)
        out = []
        at = lo
        while at < hi:
            b = os.pread(self._fd, min(PIECE, hi - at), at)
            if not b:
                break
            out.append((len(b), h._fn(b, 0) & 0xFFFFFFFF))
            at += len(b)
        return out

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                if self._sums._threads:
                    self._sums.stop()
            finally:
                os.close(fd)
        super().close()


def save_state(stage: Any, name: str, state: Any) -> None:
    """Writes ``state`` into ``stage`` as ``name`` (+ ``name.buffers`` when it has large
    buffers)."""
    stream, bufs = dumps(state)
    if not bufs:
        stage.write_file(name, stream)
        return
    bname = name + BUFFERS_SUFFIX
    path = stage._target(bname)
    size, sm, segs = write_segments(path, bufs, stage.algo)
    stage._known[bname] = (size, sm)
    with stage.open(name) as f:
        f.write(pickle.dumps(_Header(1, segs), protocol=5))
        f.write(stream)


def _layout(views: List[memoryview]) -> Tuple[int, List[Tuple[int, int]]]:
    """(file size, [(offset, length)]) of ``views`` laid out at :data:`ALIGN`-aligned offsets."""
    segs: List[Tuple[int, int]] = []
    pos = 0
    for v in views:
        segs.append((pos, v.nbytes))
        pos += -(-v.nbytes // ALIGN) * ALIGN
    return pos, segs


class Snapshot:
    """A state frozen for a background save: its pickle stream (with the header when it has
    large buffers) and a page-aligned anonymous ``mmap`` holding, at their final offsets, the
    exact bytes of ``state.pickle.buffers``. The job may change its state once this exists."""

    def __init__(self, head: bytes, stream: bytes, block: Optional[mmap.mmap], size: int) -> None:
        self.head = head
        self.stream = stream
        self.block = block
        self.size = size


def snapshot(state: Any, reuse: Optional[mmap.mmap] = None) -> Snapshot:
    """Pickles ``state`` (protocol 5) and copies its large out-of-band buffers into one
    page-aligned block laid out as ``state.pickle.buffers`` (``reuse``, the block of the previous
    snapshot, when it is big enough and not more than twice too big: its pages are already
    faulted in, so the copy is a plain ``memcpy``). This is all a background save blocks the
    job for: the stream and the copy."""
    stream, bufs = dumps(state)
    if not bufs:
        return Snapshot(b"", stream, None, 0)
    size, segs = _layout(bufs)
    if reuse is not None and size <= len(reuse) <= 2 * size:
        block = reuse
    else:
        block = mmap.mmap(-1, max(size, ALIGN))
    whole = memoryview(block)
    try:
        for v, (off, n) in zip(bufs, segs):
            v = v.cast("B") if v.format != "B" or v.ndim != 1 else v
            whole[off : off + n] = v
            pad = (-n) % ALIGN
            if pad and block is reuse:
                whole[off + n : off + n + pad] = bytes(pad)
            v.release()
    finally:
        whole.release()
        for v in bufs:
            v.release()
    return Snapshot(pickle.dumps(_Header(1, segs), protocol=5), stream, block, size)


def write_block(path: "os.PathLike[str] | str", block: mmap.mmap, size: int, algo: str) -> int:
    """Writes the first ``size`` bytes (a multiple of :data:`ALIGN`) of the page-aligned ``block``
    to the new file ``path``, :data:`PIECE` bytes per ``O_DIRECT`` write straight from the block (no
    copy), on a helper thread, while this thread checksums the same bytes; returns the checksum."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    whole = memoryview(block)
    try:
        direct = direct_io() and _set_direct(fd, True)
        err: List[BaseException] = []

        def write() -> None:
            nonlocal direct
            try:
                ok_once = False
                for off in range(0, size, PIECE):
                    view = whole[off : min(size, off + PIECE)]
                    try:
                        _pwrite_all(fd, view, off)
                    except OSError as e:
                        if not (direct and not ok_once and e.errno == errno.EINVAL):
                            raise
                        _set_direct(fd, False)
                        direct = False
                        _pwrite_all(fd, view, off)
                    finally:
                        view.release()
                    ok_once = True
            except BaseException as e:  # noqa: BLE001 - raised below
                err.append(e)

        w = threading.Thread(target=write, name="ckpt-write", daemon=True)
        w.start()
        h = Hasher(algo)
        try:
            for off in range(0, size, PIECE):
                if err:
                    break
                h.update(whole[off : min(size, off + PIECE)])
        finally:
            w.join()
        if err:
            raise err[0]
        return h.value
    finally:
        whole.release()
        os.close(fd)


def save_snapshot(stage: Any, name: str, snap: Snapshot) -> None:
    """Writes a :class:`Snapshot` into ``stage``: the same files as :func:`save_state`."""
    if snap.block is None:
        stage.write_file(name, snap.stream)
        return
    bname = name + BUFFERS_SUFFIX
    sm = write_block(stage._target(bname), snap.block, snap.size, stage.algo)
    stage._known[bname] = (snap.size, sm)
    with stage.open(name) as f:
        f.write(snap.head)
        f.write(snap.stream)


def load_state(data: bytes, name: str, read_big: Callable[[str], memoryview]) -> Any:
    """The state in ``data`` (the verified bytes of ``name``): the plain pickle of an older
    checkpoint, or a header + stream whose buffers ``read_big(name + ".buffers")`` returns."""
    import io

    f = io.BytesIO(data)
    first = pickle.Unpickler(f).load()
    if not isinstance(first, _Header):
        return first
    if first.version != 1:
        raise InvalidCheckpoint("unreadable", f"{name}: raw-buffers format version {first.version} is newer than this client")
    whole = read_big(name + BUFFERS_SUFFIX)
    views = [whole[o : o + n] for o, n in first.segments]
    return pickle.Unpickler(f, buffers=views).load()
