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
flight), a third faulting the fresh memory in ahead of them, while this thread checksums the
pieces in order; size and checksum are checked before anything is unpickled; the arrays are
then views of that memory (zero-copy, writable).
"""

from __future__ import annotations

import errno
import mmap
import os
import pickle
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple

from ._crc import Hasher
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


def read_segments(fd: int, name: str, size: int, expect_sum: int, algo: str) -> memoryview:
    """Reads the whole file ``fd`` (``size`` bytes per the manifest) into page-aligned memory
    and checks size and checksum; returns a writable view of exactly ``size`` bytes."""
    actual = os.fstat(fd).st_size
    if actual != size:
        raise InvalidCheckpoint("size-mismatch", f"file {name!r} is {actual} bytes, the manifest says {size}")
    cap = max(ALIGN, -(-size // ALIGN) * ALIGN)
    mm = mmap.mmap(-1, cap)
    whole = memoryview(mm)
    direct = direct_io() and size >= PIECE and not _cached(fd, size) and _set_direct(fd, True)
    h = Hasher(algo)
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
            h.update(whole[off : off + n])
            total += n
            if n < min(PIECE, size - off):
                break
    finally:
        for t in readers:
            t.join()
        if mode["direct"]:
            _set_direct(fd, False)
    if err:
        raise InvalidCheckpoint("unreadable", f"cannot read it: {name}: {err[0]}")
    if total != size or os.fstat(fd).st_size != size:
        raise InvalidCheckpoint("size-mismatch", f"file {name!r} is {total} bytes, the manifest says {size}")
    if h.value != expect_sum:
        raise InvalidCheckpoint(
            "checksum-mismatch",
            f"file {name!r} has checksum {h.value:08x}, the manifest says {expect_sum:08x} (the bytes changed)",
        )
    return whole[:size]


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
