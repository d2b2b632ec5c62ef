"""The client API: what runs inside a job. Same semantics as the Rust client
(``src/client.rs``); the protocol it speaks is ``docs/protocol.md``.

Create the :class:`Checkpointer` first thing in the program, before slow imports such as
``torch``: from that moment on a checkpoint request only sets a flag, and the supervisor
does not send requests before the client announced itself.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import mmap
import signal
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Union

from . import _bulk
from . import protocol as P
from ._crc import ALGOS, default_algo
from ._stopwatch import StopWatch
from .errors import CkptError, EnvError, InvalidCheckpoint
from .manifest import Manifest
from .multi_rank import ENV_RESHARD, SHARD_ALGO, MultiRank, World, epoch_from_env, shard_name, world_refusal
from .store import PathLike, Stage, Store, open_member, read_manifest, read_member, verify_files

__all__ = ["Checkpointer", "OldShards", "RestorePoint", "Saved", "World", "STATE_FILE", "DEFAULT_DIR", "__version__"]

__version__ = "0.1.0"

#: The file :meth:`Checkpointer.save` and :meth:`Checkpointer.restore` use (a pickle).
STATE_FILE = "state.pickle"
#: The checkpoint directory when neither ``CKPT_DIR`` nor a path is given.
DEFAULT_DIR = "checkpoints"
#: ``writer`` recorded in manifests written by this client.
WRITER = f"ckpt-python/{__version__}"
#: ``client`` announced in the hello message.
CLIENT = f"python/{__version__}"

_HEARTBEAT_S = 1.0


@dataclass(frozen=True)
class RestorePoint:
    """The checkpoint a run resumes from."""

    seq: int
    path: Path
    manifest: Manifest

    @property
    def step(self) -> Optional[int]:
        """The step recorded in its manifest, if any."""
        return self.manifest.step


class OldShards:
    """Read access to every shard of a checkpoint saved with another world size, handed to the
    reshard hook of :meth:`Checkpointer.restore`. Every read is verified against the manifest
    (size and checksum). A single-process checkpoint is one shard, rank 0, at its top level."""

    def __init__(self, ck: "Checkpointer", rp: "RestorePoint") -> None:
        self._ck = ck
        #: The checkpoint being resharded.
        self.restore_point = rp
        #: The number of ranks that saved it.
        self.world_size: int = rp.manifest.world_size or 1
        #: This job's rank and number of ranks.
        self.rank = ck.rank
        self.new_world_size = ck.world_size
        #: The step recorded in the checkpoint.
        self.step = rp.step

    def _prefix(self, rank: int) -> str:
        if not 0 <= rank < self.world_size:
            raise CkptError(f"rank {rank} is not a shard of {self.restore_point.path} (world size {self.world_size})")
        return f"{shard_name(rank)}/" if self.restore_point.manifest.world_size is not None else ""

    def names(self, rank: int) -> List[str]:
        """The files of old rank ``rank``'s shard (names inside the shard)."""
        pre = self._prefix(rank)
        return [f.name[len(pre):] for f in self.restore_point.manifest.files if f.name.startswith(pre)]

    def dir(self, rank: int) -> Path:
        """The directory of old rank ``rank``'s shard (verified when the checkpoint was chosen;
        under ``ckpt run --restore-check client``, checksummed here first, once, as by
        :meth:`Checkpointer.restore_dir`; prefer :meth:`read`, which checks what it reads)."""
        pre = self._prefix(rank)
        self._ck._check_exposed(pre)
        return self.restore_point.path / pre.rstrip("/") if pre else self.restore_point.path

    def read(self, rank: int, name: str) -> bytes:
        """File ``name`` of old rank ``rank``'s shard, verified."""
        return self._ck._read_listed(self._prefix(rank) + name)

    def load(self, rank: int) -> Any:
        """The object old rank ``rank`` saved with :meth:`Checkpointer.save` (unpickled)."""
        pre = self._prefix(rank)
        return _bulk.load_state(self.read(rank, STATE_FILE), STATE_FILE,
                                lambda n: self._ck._read_listed_big(pre + n))

    def __repr__(self) -> str:
        return (f"OldShards({self.restore_point.path}, world_size={self.world_size} -> "
                f"{self.new_world_size}, rank={self.rank})")


@dataclass(frozen=True)
class Saved:
    """What a successful save produced."""

    seq: int
    path: Path
    step: Optional[int]
    #: Bytes of the checkpoint's files; in a multi-rank job, on every rank but rank 0 (which
    #: publishes), of this rank's shard only (docs/multi-rank.md, step 7 of the commit).
    bytes: int
    #: Seconds the save took.
    duration: float


def _in_spawned_worker() -> bool:
    """True inside a child started by ``multiprocessing`` with the spawn/forkserver methods
    (it re-imports the main module, so an unguarded ``Checkpointer()`` runs there too)."""
    mp = sys.modules.get("multiprocessing.process")
    try:
        if mp is None:
            return False
        # While the child re-imports the main module, multiprocessing marks it "inheriting";
        # afterwards it knows its parent process.
        cur = mp.current_process()  # type: ignore[attr-defined]
        return bool(getattr(cur, "_inheriting", False)) or mp.parent_process() is not None  # type: ignore[attr-defined]
    except Exception:
        return False


class Checkpointer:
    """A job's handle on checkpointing.

    Reads the environment set by ``ckpt run`` (``CKPT_DIR``, ``CKPT_RESTORE``, ``CKPT_SOCKET``,
    ``CKPT_SIGNAL``, ...). Without a supervisor it uses ``dir`` (or ``CKPT_DIR``, or
    ``./checkpoints``), finds the newest checkpoint that verifies itself and warns about bad ones
    on stderr. Installs handlers for the request signal and SIGTERM (they only set flags), then
    announces itself to the supervisor.

    Args:
        dir: checkpoint directory when there is no supervisor (a supervisor's ``CKPT_DIR`` wins).
        every: standalone only: also request a checkpoint this often (seconds or timedelta).
        keep: standalone only: keep the newest ``keep`` checkpoints (``ckpt run --keep`` owns
            retention under a supervisor).
        checksum: ``"crc32"`` or ``"crc32c"``; default ``crc32c`` when a C implementation
            (``google_crc32c`` or ``crc32c``) is importable, else ``crc32`` (``zlib``). In a
            multi-rank job the default is always ``crc32`` (``zlib``, C speed with the standard
            library alone), as in the Rust client: every rank of a job (Python or Rust) must
            write the same algorithm, whatever is installed on its node.
        world: the rank and world size of a multi-process job; default from the launcher's
            environment (``CKPT_RANK``/``CKPT_WORLD_SIZE``, torchrun's ``RANK``/``WORLD_SIZE``,
            srun's ``SLURM_PROCID``/``SLURM_STEP_NUM_TASKS``, Open MPI, PMI). With more than one
            rank, every rank saves its shard of one checkpoint at an agreed step and restores
            its own shard (``docs/multi-rank.md``).

    Must be created in the main thread (Python runs signal handlers there). In a process forked
    from the job (a ``DataLoader`` worker) :meth:`should_checkpoint` is always false, the request
    signal is ignored and SIGTERM gets its previous disposition back; in a ``multiprocessing``
    child started by spawn/forkserver a new ``Checkpointer`` is passive (no handlers, no hello).
    """

    def __init__(
        self,
        dir: Optional[PathLike] = None,
        *,
        every: Union[float, timedelta, None] = None,
        keep: Optional[int] = None,
        checksum: Optional[str] = None,
        world: Optional[World] = None,
    ) -> None:
        self._pid = os.getpid()
        self._lock = threading.RLock()
        # Guards the checks of --restore-check client (`_check_exposed`, `_damaged`).
        self._check_lock = threading.RLock()
        self._exposed: Dict[str, Optional[InvalidCheckpoint]] = {}
        #: Members of the restore checkpoint whose size and checksum this process checked.
        self._verified: "set[str]" = set()
        #: The pid that sent ``restore_verified`` (at most one per process).
        self._vouched_pid: Optional[int] = None
        self._request = False
        self._stop = False
        self._stop_saved = False
        self._handlers_installed = False
        self._old: Dict[int, Any] = {}
        self._step: Optional[int] = None
        # Multi-rank position (docs/multi-rank.md, "Which step"): should_checkpoint() calls
        # since the restore, counted from the restored checkpoint's step; a step given
        # explicitly (to should_checkpoint or progress) wins.
        self._calls = 0
        self._base = 0
        self._explicit: Optional[int] = None
        self._pos: Optional[int] = None
        self._last_beat: Optional[float] = None
        self._last_save = time.monotonic()
        self.last_saved: Optional[Saved] = None
        """The result of the most recent successful save of this process."""

        socket_path = P.env(P.ENV_SOCKET)
        self._supervised = socket_path is not None
        env_dir = P.env(P.ENV_DIR)
        if self._supervised and env_dir:
            d: PathLike = env_dir
        elif dir is not None:
            d = dir
        else:
            d = env_dir or DEFAULT_DIR
        self._store = Store(d)
        if world is None:
            world = World.from_env()
        multi = world is not None and world.size > 1
        if checksum is None:
            checksum = SHARD_ALGO if multi else default_algo()
        if checksum not in ALGOS:
            raise CkptError(f"checksum {checksum!r} is not one of {ALGOS}")
        self._algo = checksum
        if isinstance(every, timedelta):
            every = every.total_seconds()
        if every is not None and every <= 0:
            raise CkptError("every must be positive")
        self._every = every
        self._keep = max(1, int(keep)) if keep is not None else None

        sig_s = P.env(P.ENV_SIGNAL)
        if sig_s is None:
            self._signal = int(signal.SIGUSR1)
        else:
            sig = P.parse_signal(sig_s)
            why = "is not a signal number or name" if sig is None else P.request_signal_problem(sig)
            if why is not None:
                raise EnvError(
                    f"environment variable {P.ENV_SIGNAL}={sig_s!r} is invalid: it {why}, so it cannot "
                    "request checkpoints; hint: it is set by `ckpt run --signal` (USR1, USR2 or a "
                    "real-time signal; docs/protocol.md)"
                )
            self._signal = sig
        rc = P.env(P.ENV_RESTART_COUNT) or "0"
        if not (rc.isascii() and rc.isdigit()):
            raise EnvError(f"environment variable {P.ENV_RESTART_COUNT}={rc!r} is invalid: not a whole number")
        self._restart_count = int(rc)
        self._watch = StopWatch(self._pid)

        self._world = world
        self._multi: Optional[MultiRank] = None
        self._reshard = (P.env(ENV_RESHARD) or "0") != "0"
        self._passive = _in_spawned_worker()
        self._channel = P.Channel(None if self._passive else socket_path)
        self._store.create()
        if not self._passive:
            self._install_handlers()
            hello: Dict[str, Any] = {
                "type": "hello", "v": P.PROTOCOL_VERSION, "pid": self._pid, "signal": self._signal, "client": CLIENT
            }
            if world is not None:
                hello["rank"] = world.rank
            self._channel.send(hello)
        try:
            self._restore = self._find_restore()
            if self._restore is not None:
                self._base = self._restore.manifest.step or 0
                # `ckpt run --restore-check client`: the supervisor checked the manifest and
                # the sizes only; every byte read here is this client's to check (and report).
                if self._supervised and P.env(P.ENV_RESTORE_CHECK) == P.RESTORE_CHECK_CLIENT:
                    self._restore_check = P.RESTORE_CHECK_CLIENT
                if not self._reshard:
                    # Another world size: refused at the first read, unless restore() is given
                    # a reshard hook (docs/multi-rank.md, "Restore with another world size").
                    self._refusal = world_refusal(
                        self._restore.manifest, self._restore.path, world.size if world else 1
                    )
            if multi and not self._passive:
                assert world is not None
                self._multi = MultiRank(self._store, world, epoch_from_env())
                self._multi.stop_probe = self._stop_probe
                atexit.register(_leave_at_exit, weakref.ref(self), self._pid)
        except BaseException:
            self.close()
            raise

    # --- set-up ---------------------------------------------------------------------------

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise CkptError(
                "ckpt.Checkpointer() must be created in the main thread (Python runs signal "
                "handlers only there); hint: create it at the top of the program"
            )
        me = weakref.ref(self)
        pid = self._pid

        def on_request(signum: int, frame: Any) -> None:
            ck = me()
            if ck is not None and os.getpid() == pid:
                ck._request = True

        def on_term(signum: int, frame: Any) -> None:
            ck = me()
            if os.getpid() != pid or ck is None:
                # Not the job's process (or the client is gone): behave as if never installed.
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            if ck._stop:
                os._exit(128 + signal.SIGTERM)
            ck._stop = True
            # A second SIGTERM while this one is pending terminates at once (status 143), even
            # while the main thread is stuck in C code where Python handlers cannot run.
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

        self._old[self._signal] = signal.signal(self._signal, on_request)
        self._old[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)
        self._handlers_installed = True
        if self._watch.start():
            self._watch_started = True
        # Python resets its handlers to SIG_DFL while the interpreter shuts down, so a request
        # arriving after the job's last line would kill a job that finished (and the supervisor
        # would restart it). From the moment the job is exiting, requests are ignored.
        atexit.register(_ignore_at_exit, me, self._signal, pid)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=lambda: _after_fork(me))

    def _find_restore(self) -> Optional[RestorePoint]:
        if self._supervised:
            p = P.env(P.ENV_RESTORE)
            if p is None:
                return None
            try:
                m = read_manifest(p)
            except InvalidCheckpoint as e:
                raise e.at(p) from None
            return RestorePoint(m.seq, Path(p), m)

        def warn(seq: int, e: InvalidCheckpoint) -> None:
            print(f"ckpt: warning: checkpoint {seq} ({e.path}) is invalid: {e.reason}; skipped", file=sys.stderr)

        # Ranks on other nodes have pids this node cannot check: leftovers of a multi-rank job
        # are the supervisor's to clean.
        if not self._passive and (self._world is None or self._world.size <= 1):
            try:
                self._store.clean_leftovers()
            except OSError:
                pass
        f = self._store.latest_verified(warn)
        return RestorePoint(f.seq, f.path, f.manifest) if f else None

    def close(self) -> None:
        """Restores the previous signal handlers and closes the socket. Optional: a job that
        simply exits needs no clean-up. A rank of a multi-rank job leaves the save rounds (it
        also does so at exit), so that the other ranks never wait for it."""
        self._leave()
        if self._handlers_installed and os.getpid() == self._pid:
            if threading.current_thread() is threading.main_thread():
                if self._watch_started:
                    self._watch.stop()
                    self._watch_started = False
                for sig, old in self._old.items():
                    if sig == self._signal and old in (signal.SIG_DFL, None):
                        # This pid said hello: the supervisor may still send requests until it
                        # exits, and the default action of the request signal would kill it.
                        signal.signal(sig, signal.SIG_IGN)
                    elif old is not None:
                        signal.signal(sig, old)
                self._handlers_installed = False
        self._channel.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _leave(self) -> None:
        if os.getpid() == self._pid:
            # A save in flight completes before the rank leaves (or the process exits).
            self.wait_pending()
        m = self._multi
        if m is not None and os.getpid() == self._pid:
            self._multi = None
            self._left = m
            m.leave()

    _left: Optional[MultiRank] = None

    # --- facts ----------------------------------------------------------------------------

    @property
    def world(self) -> Optional[World]:
        """This rank's place in a multi-process job (``None`` for a single process)."""
        return self._world

    @property
    def rank(self) -> int:
        """This process's rank (0 for a single process)."""
        return self._world.rank if self._world else 0

    @property
    def world_size(self) -> int:
        """The number of ranks (1 for a single process)."""
        return self._world.size if self._world else 1

    @property
    def supervised(self) -> bool:
        """Whether a supervisor (``ckpt run``) runs this job."""
        return self._supervised

    @property
    def dir(self) -> Path:
        """The checkpoint directory."""
        return self._store.dir

    @property
    def start(self) -> str:
        """How this launch starts: ``"fresh"``, ``"resume"``, or ``"branch"`` when it restores a
        checkpoint copied from another run (``ckpt run --from``): the job may then apply new
        settings (hyperparameters). From ``CKPT_START`` under a supervisor; standalone, from
        the restore checkpoint's ``meta.parent``."""
        v = P.env(P.ENV_START) if self._supervised else None
        if v in (P.START_FRESH, P.START_RESUME, P.START_BRANCH):
            return v
        if self._restore is None:
            return P.START_FRESH
        parent = (self._restore.manifest.meta or {}).get("parent")
        return P.START_BRANCH if isinstance(parent, dict) else P.START_RESUME

    @property
    def restart_count(self) -> int:
        """How many times the supervisor relaunched the job (0 on the first launch)."""
        return self._restart_count

    @property
    def signal(self) -> int:
        """The checkpoint-request signal number."""
        return self._signal

    @property
    def checksum(self) -> str:
        """The checksum algorithm this client writes."""
        return self._algo

    @property
    def restore_point(self) -> Optional[RestorePoint]:
        """The checkpoint this run resumes from, or ``None`` on a fresh start."""
        return self._restore

    @property
    def step(self) -> Optional[int]:
        """The step last given to :meth:`save`, :meth:`saving` or :meth:`progress`."""
        return self._step

    # --- restoring ------------------------------------------------------------------------

    def _sharded(self) -> bool:
        """Names map to this rank's shard (``rank-NNNNN/<name>``)."""
        return self._world is not None and self._world.size > 1 and not self._reshard

    _refusal: Optional[CkptError] = None

    def _refuse_other_world(self) -> None:
        if self._refusal is not None:
            raise self._refusal

    def restore_dir(self) -> Optional[Path]:
        """The directory of the checkpoint to resume from (``None`` on a fresh start), for files
        the job wrote itself: ``torch.load(ck.restore_dir() / "model.pt")``. Verified when it
        was chosen; :meth:`read_file` re-checks one file as it reads it. In a multi-rank job it
        is this rank's own shard, ``<checkpoint>/rank-NNNNN`` (with ``CKPT_RESHARD=1``: the
        whole checkpoint, one ``rank-NNNNN`` directory per saving rank).

        Under ``ckpt run --restore-check client`` the supervisor checked only the manifest and
        the file sizes, so the first call checksums every file it exposes (the checkpoint; in
        a multi-rank job this rank's shard) before it returns the path, once per process. A
        damaged checkpoint is reported to the supervisor, which sets it aside and relaunches
        the job from the next one that verifies, and raises :class:`InvalidCheckpoint` (the
        same on every later call)."""
        d = self._restore_path()
        if d is not None:
            self._check_exposed(f"{self._world.shard_dir}/" if self._sharded() and self._world else "")
        return d

    def _restore_path(self) -> Optional[Path]:
        """What :meth:`restore_dir` returns, without its check under ``--restore-check client``:
        for a reader that checks every byte itself (``ckpt.torch``, through
        :meth:`_open_verified`)."""
        if self._restore is None:
            return None
        self._refuse_other_world()
        if self._sharded():
            assert self._world is not None
            return self._restore.path / self._world.shard_dir
        return self._restore.path

    #: ``CKPT_RESTORE_CHECK``: ``client`` when the supervisor checked only the restore
    #: checkpoint's manifest and sizes (supervised, with a checkpoint to restore).
    _restore_check = P.RESTORE_CHECK_FULL
    #: The pid that sent a ``restore_failed`` (at most one per process).
    _reported_pid: Optional[int] = None

    def _check_exposed(self, prefix: str) -> None:
        """Under ``--restore-check client``: checksums every file of the restore checkpoint
        whose name starts with ``prefix`` (``""``: all of them) before a path into it is handed
        out, once per process (the outcome is kept); damage is reported to the supervisor, then
        raised. Nothing to do otherwise: the supervisor verified every byte."""
        r = self._restore
        if r is None or self._restore_check != P.RESTORE_CHECK_CLIENT:
            return
        with self._check_lock:
            if self._exposed.get("", False) is None:
                return  # the whole checkpoint verified
            if prefix in self._exposed:
                err = self._exposed[prefix]
            else:
                err = None
                try:
                    verify_files(r.path, r.manifest, prefix)
                    self._note_verified(f.name for f in r.manifest.files if f.name.startswith(prefix))
                except InvalidCheckpoint as e:
                    err = self._damaged(e.at(str(r.path)))
                    print(
                        f"ckpt: error: the checkpoint to restore, {r.path}, is damaged: {err.reason}; "
                        "the supervisor sets it aside and relaunches from the next one",
                        file=sys.stderr,
                    )
                self._exposed[prefix] = err
        if err is not None:
            raise err.at(str(r.path))

    def _damaged(self, e: Any) -> Any:
        """Returns ``e``, a failed check (or a failed read) of a file of the restore
        checkpoint, after telling the supervisor under ``--restore-check client``: with
        ``restore_failed`` (once per process), so that it verifies the checkpoint itself and,
        if it agrees, sets it aside and relaunches the job from the next one. Its pid is this
        process's (the supervisor checks it against the sender's)."""
        r = self._restore
        if (
            r is None
            or self._restore_check != P.RESTORE_CHECK_CLIENT
            or not isinstance(e, (InvalidCheckpoint, OSError))
        ):
            return e
        pid = os.getpid()
        with self._check_lock:
            if self._reported_pid == pid:
                return e
            self._reported_pid = pid
        self._channel.send(
            {"type": "restore_failed", "v": P.PROTOCOL_VERSION, "pid": pid, "seq": r.seq, "error": str(e)[:4096]}
        )
        return e

    def _note_verified(self, names: Iterable[str]) -> None:
        """Records that members ``names`` of the restore checkpoint passed their size and
        checksum check in this process; once every member this process restores has (a rank:
        its own shard), tells the supervisor with ``restore_verified`` (once per process), so
        that under ``ckpt run --restore-check auto`` its next resumes read the checkpoint once
        (docs/protocol.md, "One read per resume"). Not when resharding: the ranks' shards are
        then read across ranks."""
        r = self._restore
        # Resharding (CKPT_RESHARD=1, or a checkpoint of another world size, read through a
        # reshard hook): shards are read across ranks, no rank restores "its" files.
        if r is None or not self._supervised or self._reshard or self._refusal is not None:
            return
        pid = os.getpid()
        with self._check_lock:
            if self._vouched_pid == pid:
                return
            self._verified.update(names)
            pre = f"{self._world.shard_dir}/" if self._sharded() and self._world else ""
            mine = [f.name for f in r.manifest.files if f.name.startswith(pre)]
            if not mine or any(n not in self._verified for n in mine):
                return
            self._vouched_pid = pid
        msg: Dict[str, Any] = {"type": "restore_verified", "v": P.PROTOCOL_VERSION, "pid": pid, "seq": r.seq}
        if self._sharded() and self._world is not None:
            msg["rank"] = self._world.rank
        self._channel.send(msg)

    def read_file(self, name: str) -> bytes:
        """Reads file ``name`` of the restore checkpoint whole, checked against the manifest's
        size and checksum (in a multi-rank job: of this rank's own shard)."""
        self._refuse_other_world()
        if self._sharded():
            assert self._world is not None
            name = f"{self._world.shard_dir}/{name}"
        return self._read_listed(name)

    def load_array(self, name: str) -> Any:
        """The numpy array that ``np.save`` wrote as file ``name`` in :meth:`saving` (in a
        multi-rank job: in this rank's shard), read from the restore checkpoint once, at the
        disk's speed (``O_DIRECT`` into page-aligned memory when cold, checksummed as it
        arrives), checked against the manifest (size and checksum) before it is returned, as a
        writable array over that memory (no copy). ``np.load(ck.restore_dir() / name)`` reads
        the file into fresh memory through the page cache, after restore_dir()'s own check under
        ``ckpt run --restore-check client`` (docs/benchmarks.md, run W). Arrays of Python objects
        (pickled) are refused: load those with ``np.load(..., allow_pickle=True)``."""
        import io

        import numpy as np
        from numpy.lib import format as npf

        r = self._restore
        if r is None:
            raise CkptError(
                "load_array: this run has no checkpoint to restore (a fresh start); "
                "hint: check ck.restore_point (None on a fresh start) before loading"
            )
        self._refuse_other_world()
        if self._sharded():
            assert self._world is not None
            name = f"{self._world.shard_dir}/{name}"
        if r.manifest.file(name) is None:
            have = ", ".join(f.name for f in r.manifest.files)
            raise CkptError(f"checkpoint {r.path} has no file {name!r} (it has: {have})")
        view = self._read_listed_big(name)
        where = f"file {name!r} of checkpoint {r.path}"
        try:
            head = io.BytesIO(view[: min(len(view), 1 << 20)])
            version = npf.read_magic(head)
            if version == (1, 0):
                shape, fortran, dtype = npf.read_array_header_1_0(head)
            elif version == (2, 0):
                shape, fortran, dtype = npf.read_array_header_2_0(head)
            else:
                shape, fortran, dtype = npf._read_array_header(head, version)  # (3, 0)
            at = head.tell()
        except (ValueError, AttributeError, EOFError) as e:
            raise CkptError(f"{where} is not a .npy file ({e}); load it with your own loader from ck.restore_dir()") from None
        if dtype.hasobject:
            raise CkptError(
                f"{where} holds Python objects (a pickle): load it with np.load(ck.restore_dir() / {name!r}, allow_pickle=True)"
            )
        count = 1
        for n in shape:
            count *= int(n)
        if at + count * dtype.itemsize != len(view):
            raise CkptError(
                f"{where} has {len(view) - at} bytes of data, its .npy header says {count * dtype.itemsize} "
                f"({shape} {dtype}); load it with your own loader from ck.restore_dir()"
            )
        arr = np.frombuffer(view, dtype=dtype, count=count, offset=at)
        return arr.reshape(shape, order="F" if fortran else "C")

    def read_shard_file(self, rank: int, name: str) -> bytes:
        """Reads file ``name`` of rank ``rank``'s shard of the restore checkpoint (verified): for
        a job that reshards a checkpoint saved with another world size (``CKPT_RESHARD=1``;
        ``restore_point.manifest.world_size`` says how many shards there are)."""
        return self._read_listed(f"{shard_name(rank)}/{name}")

    def _read_listed(self, name: str) -> bytes:
        r = self._restore
        if r is None:
            raise CkptError("read_file: this run has no checkpoint to restore")
        entry = r.manifest.file(name)
        if entry is None:
            have = ", ".join(f.name for f in r.manifest.files)
            raise CkptError(f"checkpoint {r.path} has no file {name!r} (it has: {have})")
        try:
            data = read_member(r.path, entry, r.manifest.checksum)
        except InvalidCheckpoint as e:
            raise self._damaged(e.at(str(r.path))) from None
        except OSError as e:
            raise self._damaged(e)
        self._note_verified((name,))
        return data

    def _read_listed_big(self, name: str) -> memoryview:
        """Listed file ``name`` of the restore checkpoint, verified, read into page-aligned
        memory (past the page cache when large and cold): a writable view of its bytes."""
        r = self._restore
        assert r is not None
        entry = r.manifest.file(name)
        if entry is None:
            raise InvalidCheckpoint("missing-file", f"file {name!r} is not listed in the manifest").at(str(r.path))
        try:
            fd = open_member(r.path, entry.name)
            try:
                view = _bulk.read_segments(fd, entry.name, entry.size, entry.sum, r.manifest.checksum)
            finally:
                os.close(fd)
        except InvalidCheckpoint as e:
            raise self._damaged(e.at(str(r.path))) from None
        except OSError as e:
            raise self._damaged(e)
        self._note_verified((name,))
        return view

    def _open_verified(self, name: str) -> "Optional[_bulk.VerifiedFile]":
        """Listed file ``name`` of the restore checkpoint (this rank's shard in a multi-rank
        job) as a file object for a library's loader (``ckpt.torch``): large reads past the
        page cache, every byte checked against the manifest by its ``verify()``. ``None``
        when there is no restore checkpoint or it does not list the file."""
        r = self._restore
        if r is None:
            return None
        self._refuse_other_world()
        if self._sharded():
            assert self._world is not None
            name = f"{self._world.shard_dir}/{name}"
        entry = r.manifest.file(name)
        if entry is None:
            return None
        try:
            f = _bulk.VerifiedFile(open_member(r.path, entry.name), entry.name, entry.size, entry.sum,
                                   r.manifest.checksum)
        except InvalidCheckpoint as e:
            raise self._damaged(e.at(str(r.path))) from None
        except OSError as e:
            raise self._damaged(e)
        if self._restore_check == P.RESTORE_CHECK_CLIENT:
            path = str(r.path)
            f.on_damage = lambda e: self._damaged(e.at(path) if isinstance(e, InvalidCheckpoint) else e)
        member = entry.name
        f.on_verified = lambda: self._note_verified((member,))
        return f

    def restore(self, default: Any = None, *, reshard: "Optional[Callable[[OldShards], Any]]" = None) -> Any:
        """The object last saved with :meth:`save` (unpickled), or ``default`` (``None``) on a
        fresh start. The bytes are verified before they are unpickled. Like any pickle, only load
        checkpoints you (or your job) wrote. Under ``ckpt run --restore-check client`` these
        checks are the only read of the checkpoint (the supervisor checked the manifest and
        the sizes); a file that fails them is reported to the supervisor, which sets the
        checkpoint aside and relaunches the job from the next one, and the error is raised.

        ``reshard``: called when the checkpoint was saved by a job of another world size, with
        an :class:`OldShards` (read access to every old shard: ``load(rank)``, ``read(rank,
        name)``, ``names(rank)``, ``world_size``); what it returns is this rank's state. Without
        it such a checkpoint is refused, naming both sizes (docs/multi-rank.md, "Restore with
        another world size")."""
        r = self._restore
        if r is None:
            return default
        if self._refusal is not None:
            if reshard is None:
                raise self._refusal
            return reshard(OldShards(self, r))
        own = f"{self._world.shard_dir}/{STATE_FILE}" if self._sharded() and self._world else STATE_FILE
        if r.manifest.file(own) is None:
            have = ", ".join(f.name for f in r.manifest.files) or "no files"
            raise CkptError(
                f"checkpoint {r.path} (written by {r.manifest.writer}) has no {STATE_FILE} (it has: "
                f"{have}); hint: it was not written by Checkpointer.save: use restore_dir() or read_file()"
            )
        pre = f"{self._world.shard_dir}/" if self._sharded() and self._world else ""
        return _bulk.load_state(self.read_file(STATE_FILE), STATE_FILE, lambda n: self._read_listed_big(pre + n))

    # --- the loop -------------------------------------------------------------------------

    def _original(self) -> bool:
        return os.getpid() == self._pid and not self._passive

    def _progress_msg(self) -> None:
        self._channel.send({"type": "progress", "v": P.PROTOCOL_VERSION, "pid": self._pid, "step": self._step})

    def progress(self, step: int) -> None:
        """Tells the supervisor the job is at ``step`` (also a heartbeat). In a multi-rank job
        the next :meth:`should_checkpoint` uses it as this rank's position."""
        self._step = step
        self._explicit = step
        if self._original():
            self._last_beat = time.monotonic()
            self._progress_msg()

    def should_checkpoint(self, step: Optional[int] = None) -> bool:
        """True when a checkpoint has been requested (request signal, stop request, or the
        standalone ``every``). Cheap: call it at every safe point. Also a heartbeat (a progress
        message at most once a second). Always false in a forked child.

        ``step``: the step just completed (recorded as by :meth:`progress`). In a multi-rank
        job the ranks turn a request into one agreed position, and this is true on every rank
        there only: the position is ``step`` when given (here or by :meth:`progress` since the
        previous call), else the number of calls since the restore, counted from the restored
        checkpoint's step (docs/multi-rank.md, "Which step"): the same on every rank of an SPMD
        loop, so the single-process pattern works unchanged."""
        if step is not None:
            self._step = step
        if not self._original():
            return False
        self._watch.touch()
        self._calls += 1
        explicit = step if step is not None else self._explicit
        self._explicit = None
        self._pos = explicit if explicit is not None else self._base + self._calls
        now = time.monotonic()
        if self._last_beat is None or now - self._last_beat >= _HEARTBEAT_S:
            self._last_beat = now
            self._progress_msg()
        stop = self._stop and not self._stop_saved
        want = (
            self._request
            or stop
            or (self._every is not None and now - self._last_save >= self._every)
        )
        m = self._multi
        if m is None:
            return want
        if self.save_pending():
            # The background save owns the rounds until it returns (docs/multi-rank.md,
            # "Asynchronous saves"); the position still counted this call.
            return False
        try:
            return m.poll(want, stop, self._pos)
        except (CkptError, OSError) as e:
            print(f"ckpt: warning: {e}", file=sys.stderr)
            return False

    def should_stop(self) -> bool:
        """True once the supervisor (or anyone, with SIGTERM) asked the job to stop. Save first if
        :meth:`should_checkpoint` says so, then exit with status 0. In a multi-rank job all
        ranks stop together: after the save round that agreed to stop has published, so a rank
        never exits before the stop checkpoint holds every shard. When it returns true, an
        asynchronous save in flight has finished (it waits for it)."""
        if not self._original():
            return False
        self._watch.touch()
        if self.save_pending() and (self._stop or self._bg_stop):
            # The save in flight may carry the stop: know its outcome first.
            self.wait_pending()
        if self._world is not None and self._world.size > 1:
            m = self._multi or self._left
            # Once a rank left the launch no round can publish: a rank asked to stop just stops.
            stop = m is not None and (m.stop_agreed or (m.rank_left and self._stop))
        else:
            stop = self._stop
        if stop:
            # A job exits when this is true: never with a save in flight.
            self.wait_pending()
        return stop

    def _stop_probe(self) -> Optional[float]:
        """For the save rounds: the stop timeout once the job was asked to stop."""
        return self._watch.handled() if self._stop else None

    def request_checkpoint(self) -> None:
        """Makes the next :meth:`should_checkpoint` true, as the request signal does."""
        self._request = True

    # --- saving ---------------------------------------------------------------------------

    def save(self, state: Any, step: Optional[int] = None, *, meta: Optional[Dict[str, Any]] = None) -> Saved:
        """Pickles ``state`` into ``state.pickle`` as a new checkpoint; returns once it is
        durable (and the supervisor was told).

        Large buffers (numpy arrays of at least 64 KiB, C- or Fortran-contiguous; anything
        pickle protocol 5 hands out of band) are not copied into the pickle: they go to disk
        as raw bytes in ``state.pickle.buffers`` (page-aligned ``O_DIRECT`` writes from reused
        aligned buffers, at most 24 MiB of extra memory; ``CKPT_DIRECT_IO=0`` writes through
        the page cache), and :meth:`restore` makes the arrays views of one page-aligned block
        read back without a copy. Non-contiguous arrays and object arrays are pickled in
        the stream as before (numpy copies them)."""
        with self._saving(step, meta, self._begin()) as stage:
            _bulk.save_state(stage, STATE_FILE, state)
        assert self.last_saved is not None
        return self.last_saved

    @contextlib.contextmanager
    def saving(self, step: Optional[int] = None, *, meta: Optional[Dict[str, Any]] = None) -> Iterator[Path]:
        """Saves files the job writes itself::

            with ck.saving(step=step) as d:
                torch.save(model.state_dict(), d / "model.pt")

        ``d`` is an empty private directory; when the block ends, every file in it (and in its
        sub-directories) is checksummed, made durable and published as one checkpoint. If the
        block raises, nothing is published. The result is in :attr:`last_saved`.

        The files' write speed is the writing library's (``torch.save``, ``np.save`` write
        through the page cache); ckpt adds one checksum read of each file (usually from the
        page cache, overlapped with the file's fsync on another thread) and the fsyncs. :meth:`direct_file` gives the library a file object that
        writes past the page cache instead (what ``ckpt.torch`` uses); for numpy arrays
        :meth:`save` writes them as raw bytes that way (``docs/benchmarks.md``)."""
        with self._saving(step, meta, self._begin()) as stage:
            self._stage = stage
            try:
                yield stage.path
            finally:
                self._stage = None

    def direct_file(self, name: str) -> "_bulk.DirectWriter":
        """Inside a :meth:`saving` block: a new binary file ``name`` of the checkpoint, for a
        library's own serializer, written past the page cache (``O_DIRECT`` from reused aligned
        buffers, at most 24 MiB of extra memory; the checksum computed as it is written, so
        the commit does not read it back)::

            with ck.saving(step=step):
                with ck.direct_file("model.pt") as f:
                    torch.save(model.state_dict(), f)

        Sequential writes only (``torch.save``, ``np.save``, ``pickle.dump`` write that way);
        ``CKPT_DIRECT_IO=0`` writes through the page cache."""
        stage = self._stage
        if stage is None:
            raise CkptError("direct_file() is only valid inside a `with ck.saving():` block")
        return _bulk.open_direct(stage, name)

    def save_async(self, state: Any, step: Optional[int] = None, *, meta: Optional[Dict[str, Any]] = None) -> None:
        """:meth:`save` in the background: blocks only while ``state`` is pickled and its large
        buffers (numpy arrays) are copied into one page-aligned block kept for the next
        asynchronous save (a copy: the job may change ``state`` as soon as this returns; the
        memory of one copy of the arrays stays allocated between saves); writes the same files
        as :meth:`save` (the arrays as raw bytes with ``O_DIRECT``, straight from that block);
        writing, fsync and
        publishing (in a multi-rank job: the whole shard commit, waiting for the other ranks)
        run on a background thread. A save still in flight is waited for first; so are
        :meth:`save`, :meth:`should_stop` when it is about to return true, :meth:`close` and
        the interpreter's exit: a job that exits when told to never loses a save in flight.
        :meth:`wait` returns the outcome. While it runs, :meth:`should_checkpoint` is false
        (the calls still count for the position)."""
        self.wait_pending()
        begin = self._begin()
        snap = _bulk.snapshot(state, self._snap_block)
        if snap.block is not None:
            self._snap_block = snap.block
        blocked = time.monotonic() - begin.started
        m = self._multi
        # The round of this save agreed to stop: should_stop() waits for it.
        self._bg_stop = bool(m is not None and m.joined is not None and m.joined.target is not None
                             and m.joined.target.stop)

        def run() -> None:
            try:
                with self._saving(step, meta, begin, blocked) as stage:
                    _bulk.save_snapshot(stage, STATE_FILE, snap)
                self._bg_outcome = self.last_saved
            except BaseException as e:  # noqa: BLE001 - handed to wait()
                self._bg_outcome = e

        self._bg_outcome = None
        t = threading.Thread(target=run, name="ckpt-save")
        self._bg = t
        t.start()

    def save_pending(self) -> bool:
        """Whether an asynchronous save is still being written."""
        t = self._bg
        return t is not None and t.is_alive()

    def wait_pending(self) -> None:
        """Waits for the asynchronous save in flight, if any (its outcome stays for :meth:`wait`)."""
        t = self._bg
        if t is not None and t is not threading.current_thread():
            t.join()

    def wait(self) -> Optional[Saved]:
        """Waits for the asynchronous save in flight (if any) and returns its outcome: the
        :class:`Saved`, or raises its error; ``None`` if no asynchronous save was made since
        the last ``wait``."""
        self.wait_pending()
        out, self._bg_outcome, self._bg = self._bg_outcome, None, None
        if isinstance(out, BaseException):
            raise out
        return out

    @dataclass
    class _Begin:
        started: float
        stopping: bool
        pos: int

    def _begin(self) -> "Checkpointer._Begin":
        """The state a save starts from, taken by the job's thread when it asks for the save:
        the time, whether a stop was asked, this rank's position; the request is consumed."""
        if not self._original():
            raise CkptError(
                "save called in a forked child process or multiprocessing worker; only the "
                "process that created the Checkpointer saves"
            )
        # Saves publish in order: one in flight finishes first.
        self.wait_pending()
        pos = self._explicit if self._explicit is not None else self._pos
        if pos is None:
            pos = self._base + self._calls
        b = Checkpointer._Begin(time.monotonic(), self._stop, pos)
        self._request = False
        return b

    @contextlib.contextmanager
    def _saving(
        self, step: Optional[int], meta: Optional[Dict[str, Any]], begin: "Checkpointer._Begin",
        blocked: Optional[float] = None,
    ) -> Iterator[Stage]:
        if meta is not None and not isinstance(meta, dict):
            raise CkptError("meta must be a dict of JSON values")
        with self._lock, self._busy():
            if step is not None:
                self._step = step
            stopping = begin.stopping
            stage: Optional[Stage] = None
            multi = self._multi
            if multi is None and self._world is not None and self._world.size > 1:
                raise CkptError("save called after close(): this rank has left the job's save rounds")
            if multi is not None and meta:
                raise CkptError("meta is not supported in a multi-rank save (the ranks write one manifest)")
            try:
                stage = Stage(self._store, self._algo)
                yield stage
                if multi is not None:
                    # This rank's shard; published once every rank's shard is durable.
                    m = multi.commit_shard(stage, step, begin.pos, stopping and not self._stop_saved, WRITER)
                else:
                    m = stage.commit(self._step if step is None else step, WRITER, meta)
            except BaseException as e:
                if stage is not None:
                    stage.abort()
                self._channel.send(
                    {"type": "save_failed", "v": P.PROTOCOL_VERSION, "pid": self._pid, "error": str(e)[:4096]}
                )
                raise
            now = time.monotonic()
            self._last_save = now
            if multi is not None:
                stopping = multi.stop_agreed
            if stopping:
                self._stop_saved = True
            saved = Saved(m.seq, self._store.path_of(m.seq), m.step, m.total_bytes, now - begin.started)
            self.last_saved = saved
            if multi is not None and not multi.published_last:
                # In a multi-rank job only the rank that published reports and prunes.
                return
            msg: Dict[str, Any] = {
                "type": "committed",
                "v": P.PROTOCOL_VERSION,
                "pid": self._pid,
                "seq": m.seq,
                "step": m.step,
                "bytes": m.total_bytes,
                "duration_ms": int(saved.duration * 1000),
            }
            if blocked is not None:
                msg["blocked_ms"] = int(blocked * 1000)
            self._channel.send(msg)
            if self._keep is not None and not self._supervised:
                try:
                    self._store.prune(self._keep, protect=(m.seq,))
                except OSError as e:
                    print(f"ckpt: warning: retention failed: {e}", file=sys.stderr)

    _stage: Optional[Stage] = None
    _watch_started = False

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """A save is running: the SIGTERM watchdog waits for it."""
        self._watch.busy += 1
        try:
            yield
        finally:
            self._watch.busy -= 1
            self._watch.touch()

    _bg: Optional[threading.Thread] = None
    _bg_outcome: "Optional[Union[Saved, BaseException]]" = None
    _bg_stop = False
    _snap_block: "Optional[mmap.mmap]" = None


def _ignore_at_exit(ref: "weakref.ref[Checkpointer]", signum: int, pid: int) -> None:
    ck = ref()
    if os.getpid() != pid or (ck is not None and not ck._handlers_installed):
        return
    try:
        signal.signal(signum, signal.SIG_IGN)
    except (ValueError, OSError):
        pass


def _leave_at_exit(ref: "weakref.ref[Checkpointer]", pid: int) -> None:
    """A rank that exits leaves the save rounds (as dropping the Rust client does)."""
    ck = ref()
    if ck is not None and os.getpid() == pid:
        try:
            ck._leave()
        except Exception:
            pass


def _after_fork(ref: "weakref.ref[Checkpointer]") -> None:
    """In a forked child: the request signal is ignored and SIGTERM gets back the disposition it
    had before the client, so a data-loader worker never acts on a request and still dies when
    its process group is terminated."""
    ck = ref()
    if ck is None or not ck._handlers_installed:
        return
    try:
        signal.signal(ck._signal, signal.SIG_IGN)
        old = ck._old.get(signal.SIGTERM)
        signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
    except (ValueError, OSError):
        pass
