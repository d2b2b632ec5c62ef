"""Multi-process (multi-rank) jobs: every rank saves its shard of the same checkpoint, at one
agreed step, and the checkpoint is published only when every shard is durable. The protocol
lives entirely in files of the shared checkpoint directory (no network, no coordinator), and
is byte-compatible with the Rust client (``src/multi_rank.rs``): Rust and Python ranks may
take part in the same rounds. Specified in ``docs/multi-rank.md``.

Rank 0 is each round's **coordinator**: it alone gathers the other ranks' files (one
``listdir`` of the round per look, then one read of each file), writes the round's ``agreed``
step and publishes; every other rank only ever reads the round's few shared files (``agreed``,
``published``, ``aborted``), so a rank's cost per round does not grow with the number of ranks
(docs/multi-rank.md, "Scale").

::

    DIR/.ckpt/rounds/<epoch>/               one launch of the job (all its ranks agree on it)
      00000003/                             save round 3 of that launch
        propose-00002                       rank 2's proposal {"step":S,"stop":B}
        horizon                             rank 0 moved the round's bound on {"step":H} (late ranks)
        agreed                              rank 0's verdict from all proposals {"step":T,"stop":B}
        stage/                              becomes DIR/ckpt-<seq> (the single atomic rename)
          rank-00002/<files>                rank 2's shard, fsynced
          MANIFEST.ckpt                     written by rank 0 (the publisher) only
        done-00002                          rank 2's shard is durable: its file list and sums
        published                           {"seq":N}: the round's outcome
        aborted                             the other outcome (the stage was removed)
      left                                  some rank left the launch (closed its client)
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from . import protocol as P
from .errors import CkptError, EnvError
from .manifest import MANIFEST_NAME, FileEntry, Manifest, now_ms
from .store import Stage, Store, _fsync_path, _rmtree, rename_noreplace, token

__all__ = [
    "ENV_RANK",
    "ENV_WORLD_SIZE",
    "ENV_LOCAL_RANK",
    "ENV_RUN_ID",
    "ENV_RESHARD",
    "ENV_ROUND_TIMEOUT",
    "ENV_ROUND_LOOKAHEAD",
    "World",
    "shard_name",
    "check_world",
    "epoch_from_env",
    "MultiRank",
    "SHARD_ALGO",
]

#: Explicit rank (wins over every launcher's variables).
ENV_RANK = "CKPT_RANK"
#: Explicit world size (number of ranks), with ``CKPT_RANK``.
ENV_WORLD_SIZE = "CKPT_WORLD_SIZE"
#: Explicit local rank (rank on this node); informational.
ENV_LOCAL_RANK = "CKPT_LOCAL_RANK"
#: Identifier of this launch, the same on every rank.
ENV_RUN_ID = "CKPT_RUN_ID"
#: ``1``: restoring a checkpoint saved with another world size is allowed; the job reads the
#: whole checkpoint itself (:meth:`Checkpointer.read_shard_file`) and reshards.
ENV_RESHARD = "CKPT_RESHARD"
#: How long a rank waits for the other ranks in a save round before abandoning it: seconds, or a
#: number with ``ms``, ``s`` or ``m`` (:func:`parse_round_timeout`); default 300 s.
ENV_ROUND_TIMEOUT = "CKPT_ROUND_TIMEOUT"
#: Steps a rank may still run after proposing before it must know the agreed step (0).
ENV_ROUND_LOOKAHEAD = "CKPT_ROUND_LOOKAHEAD"

#: The checksum of every shard of a multi-rank checkpoint, whichever client writes it (as the
#: Rust client's ``SHARD_ALGO``): CRC-32 via ``zlib``, at C speed with the standard library alone.
SHARD_ALGO = "crc32"

#: How often a rank without a request of its own looks for a round started by another rank:
#: every 100 ms, or every 0.25 ms per rank from 400 ranks on (:func:`idle_poll`).
POLL_S = 0.1
#: The rank that coordinates every round: gathers the proposals into ``agreed``, the done
#: markers into the manifest, and publishes (as the Rust client's ``COORDINATOR``).
COORDINATOR = 0
_U64 = (1 << 64) - 1

#: The launcher variables, in order of preference: explicit, torchrun, srun, Open MPI, PMI.
#: SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a batch script also has SLURM_PROCID=0 and
#: SLURM_NTASKS, but it is not a rank of an srun step.
SOURCES: Tuple[Tuple[str, str, str, str], ...] = (
    (ENV_RANK, ENV_WORLD_SIZE, ENV_LOCAL_RANK, "CKPT_RANK"),
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "torchrun"),
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "srun"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "mpirun"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMI"),
)


def _whole(name: str, v: str) -> int:
    t = v.strip()
    if not (t.isascii() and t.isdigit()) or int(t) > 0xFFFFFFFF:
        raise EnvError(f"environment variable {name}={v!r} is invalid: not a whole number")
    return int(t)


@dataclass(frozen=True)
class World:
    """This process's place in a multi-process job."""

    #: 0-based rank.
    rank: int
    #: Number of ranks.
    size: int
    #: Rank on this node, when the launcher says.
    local_rank: Optional[int] = None
    #: Where it came from (``"torchrun"``, ``"srun"``, ``"mpirun"``, ``"PMI"``, ``"CKPT_RANK"``,
    #: ``"api"``).
    source: str = "api"

    def __post_init__(self) -> None:
        if not (isinstance(self.rank, int) and isinstance(self.size, int)) or self.size <= 0 or not 0 <= self.rank < self.size:
            raise CkptError(f"rank {self.rank} of a world of {self.size}: the rank must be below the world size")

    @staticmethod
    def from_env() -> Optional["World"]:
        """The rank and world size from the launcher's environment (same order as the Rust
        client); ``None`` when no launcher set them."""
        for r, s, l, source in SOURCES:
            rv, sv = P.env(r), P.env(s)
            if rv is None or sv is None:
                continue
            rank = _whole(r, rv)
            size = _whole(s, sv)
            if size == 0 or rank >= size:
                raise EnvError(
                    f"environment variable {r}={rv!r} is invalid: rank {rank} is not below the world size {s}={size}"
                )
            lv = P.env(l)
            local = int(lv.strip()) if lv is not None and lv.strip().isascii() and lv.strip().isdigit() else None
            return World(rank, size, local, source)
        return None

    @property
    def shard_dir(self) -> str:
        """The directory of this rank's shard inside a checkpoint: ``rank-00003``."""
        return shard_name(self.rank)


def shard_name(rank: int) -> str:
    """``rank-NNNNN``: the directory of rank ``rank``'s shard inside a checkpoint."""
    return f"rank-{rank:05d}"


def world_refusal(manifest: Manifest, path: "os.PathLike[str] | str", size: int) -> Optional[CkptError]:
    """The refusal of a restore checkpoint saved with another world size (naming both), or
    ``None`` when the sizes agree."""
    saved = manifest.world_size if manifest.world_size is not None else 1
    if saved == size:
        return None
    return CkptError(
        f"cannot restore {os.fspath(path)}: it was saved by a job of {saved} rank(s), this job runs with "
        f"{size} rank(s); ckpt restores a checkpoint only with the world size that saved it; hint: run "
        f"with {saved} rank(s), or reshard it: restore(reshard=fn) calls fn with read access to every "
        f"shard (or set {ENV_RESHARD}=1 and read them with read_shard_file)"
    )


def check_world(manifest: Manifest, path: "os.PathLike[str] | str", size: int, reshard: bool) -> None:
    """Refuses a restore checkpoint saved with another world size (unless resharding)."""
    e = world_refusal(manifest, path, size)
    if e is not None and not reshard:
        raise e


_CLEAN = re.compile(r"[^A-Za-z0-9_-]")


def _clean(s: str) -> str:
    return _CLEAN.sub("_", s)[:96]


def epoch_from_env() -> str:
    """The identifier of this launch, shared by all its ranks (as in the Rust client):
    ``CKPT_RUN_ID``, else the supervisor's restart count and pid, else the launcher's job id."""
    rid = P.env(ENV_RUN_ID)
    if rid is not None:
        return f"{_clean(rid)}.0"
    pid = P.env(P.ENV_SUPERVISOR_PID)
    if pid is not None:
        return f"r{_clean(P.env(P.ENV_RESTART_COUNT) or '0')}.{_clean(pid)}"
    for a, b in (
        ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"),
        ("SLURM_JOB_ID", "SLURM_STEP_ID"),
        ("OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_ess_jobid"),
        ("PMIX_NAMESPACE", "PMIX_NAMESPACE"),
    ):
        x = P.env(a)
        if x is not None:
            return f"{_clean(x)}-{_clean(P.env(b) or '')}.0"
    raise CkptError(
        "a multi-rank job needs an identifier shared by all its ranks; hint: run it under `ckpt run`, "
        f"or set {ENV_RUN_ID} to the same value on every rank (a new value for each launch)"
    )


def _dumps(obj: object) -> bytes:
    """Compact JSON, as serde_json writes it (the Rust ranks read these files)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _write_new(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _real_dir(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        try:
            os.mkdir(path, 0o700)
            return
        except FileExistsError:
            st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise CkptError(
            f"{path} is a symlink or not a directory; ckpt never follows links planted in the "
            "checkpoint directory; hint: remove it"
        )


_TIMEOUT = re.compile(r"\s*([0-9]*\.?[0-9]*)\s*(ms|s|m)?\s*")


def parse_round_timeout(v: str) -> Optional[float]:
    """``CKPT_ROUND_TIMEOUT`` in seconds: a positive number of seconds (``300``, ``2.5``), or a
    number followed by ``ms``, ``s`` or ``m`` (``500ms``, ``2s``, ``5m``), as in the Rust client;
    ``None`` when invalid."""
    m = _TIMEOUT.fullmatch(v)
    if m is None or not any(c.isdigit() for c in m.group(1)):
        return None
    try:
        t = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[m.group(2)]
    except ValueError:
        return None
    return t if 0 < t < 1e9 else None


def _env_timeout() -> float:
    v = P.env(ENV_ROUND_TIMEOUT)
    if v is None:
        return 300.0
    t = parse_round_timeout(v)
    if t is None:
        raise EnvError(
            f"environment variable {ENV_ROUND_TIMEOUT}={v!r} is invalid: not a positive duration: seconds "
            "(`300`, `2.5`) or a number with `ms`, `s` or `m` (`500ms`, `2s`, `5m`)"
        )
    return t


#: The lookahead without ``CKPT_ROUND_LOOKAHEAD``: a rank proposes its position plus 2, so that
#: ranks that synchronise every step (collectives, DDP) all see the request before any of them
#: blocks at its proposal (docs/multi-rank.md, "Waiting"; as the Rust client).
DEFAULT_LOOKAHEAD = 2


def _env_lookahead() -> int:
    v = P.env(ENV_ROUND_LOOKAHEAD)
    if v is None:
        return DEFAULT_LOOKAHEAD
    if not (v.isascii() and v.isdigit()):
        raise EnvError(f"environment variable {ENV_ROUND_LOOKAHEAD}={v!r} is invalid: not a whole number of steps")
    return int(v)


def max_pause(world_size: int) -> float:
    """The longest pause between two looks of a waiting rank: 20 ms, or 0.25 ms per rank from
    80 ranks on, so that all ranks waiting together look at most about 4 000 times a second in
    all, whatever their number (as the Rust client; docs/multi-rank.md, "Waiting")."""
    return max(0.02, 0.00025 * world_size)


def idle_poll(world_size: int) -> float:
    """How often a rank without a request looks for a new round: 100 ms, or 0.25 ms per rank
    from 400 ranks on, so that the ranks of a job make at most about 4 000 such lookups a second
    in all between rounds (as the Rust client; docs/multi-rank.md, "Scale")."""
    return max(POLL_S, 0.00025 * world_size)


def _pause(waited: float, cap: float = 0.02) -> float:
    """How long a rank sleeps between two looks at the round while it waits for the other
    ranks: a tenth of the time it has waited so far, between 0.5 ms and ``cap``
    (:func:`max_pause`). A wait thus overshoots by at most about 10 % (plus 0.5 ms), and a long
    wait costs one look every ``cap`` (a few ``stat`` calls, or the coordinator's one listing;
    docs/multi-rank.md, "Waiting")."""
    return min(max(waited / 10, 0.0005), cap)


@dataclass
class Target:
    """What the ranks agreed on in a round."""

    #: The step at which every rank saves: the highest proposal.
    step: int
    #: Some rank was asked to stop: every rank stops after the round publishes.
    stop: bool


_OPEN = "open"
_ABORTED = "aborted"


@dataclass
class _Horizon:
    """No agreement yet, but the coordinator moved the round's horizon to ``step``: a rank
    waiting at its bound may run on to it (docs/multi-rank.md, "Late ranks")."""

    step: int


@dataclass
class _Joined:
    #: The step this rank may reach before it knows the agreed one: its proposal, raised by
    #: the coordinator's horizon.
    bound: int
    #: When this rank proposed: the round timeout and the stop bound count from it.
    since: float
    #: The coordinator: the next extension of the horizon, and the horizon it wrote last (the
    #: agreed step is at least that).
    ext: int = 1
    horizon: Optional[int] = None
    #: Since when this rank has waited at its bound (the coordinator extends after a while).
    at_bound: Optional[float] = None
    #: When this rank learned the agreed step (its own save's time counts from it).
    agreed_at: Optional[float] = None
    target: Optional[Target] = None


class MultiRank:
    """One rank's side of the save rounds (held by :class:`ckpt.Checkpointer`)."""

    def __init__(self, store: Store, world: World, epoch: str) -> None:
        rounds = store.private / "rounds"
        _real_dir(rounds)
        self.dir = rounds / epoch
        _real_dir(self.dir)
        if world.rank == 0:
            # Rounds of earlier launches: their processes are gone (a launch ends with all its
            # ranks).
            try:
                for name in os.listdir(rounds):
                    if name != epoch:
                        _rmtree(rounds / name)
            except OSError:
                pass
        self.world = world
        self.store = store
        self.k = 1
        self.joined: Optional[_Joined] = None
        self.last_poll: Optional[float] = None
        self.timeout = _env_timeout()
        self._max_pause = max_pause(world.size)
        self._idle_poll = idle_poll(world.size)
        self.lookahead = _env_lookahead()
        #: The last round this rank took part in published with ``stop``.
        self.stop_agreed = False
        #: This rank published the last round (it alone tells the supervisor).
        self.published_last = False
        #: Some rank of this launch left (``<epoch>/left`` exists): no round can complete.
        self.rank_left = False
        #: The position at which :meth:`poll` returned true in the current round: this rank's save
        #: point, its first position at or past the agreed step.
        self.at_target: Optional[int] = None
        #: Whether the job was asked to stop, and its stop timeout in seconds (None: not asked);
        #: set by the client (docs/multi-rank.md, "A stop that cannot complete").
        self.stop_probe: Optional[Callable[[], Optional[float]]] = None
        #: When this rank first saw the stop request in a round.
        self._stop_seen: Optional[float] = None

    def __repr__(self) -> str:
        return f"MultiRank(world={self.world}, dir={str(self.dir)!r}, round={self.k})"

    def round(self, k: int) -> Path:
        return self.dir / f"{k:08d}"

    def _left_marker(self) -> Path:
        return self.dir / "left"

    def _someone_left(self) -> bool:
        """Whether some rank left the launch; sticky once seen."""
        if not self.rank_left and os.path.lexists(self._left_marker()):
            self.rank_left = True
        return self.rank_left

    # --- agreeing on a step ----------------------------------------------------------------

    def poll(self, want: bool, stop: bool, step: int) -> bool:
        """The safe-point decision. ``want``: this rank has a request of its own; ``stop``: it
        was asked to stop; ``step``: this rank's position, the step just completed (the explicit
        step, or the count of ``should_checkpoint`` calls: docs/multi-rank.md, "Which step").
        True at the save point of the round this rank is in: its first position at or past the
        agreed step ``T`` (``T`` itself when positions count calls; an explicit step may skip it,
        ``10 * iteration`` say). Every rank makes the same calls with the same positions, and none
        passes its bound (at most ``T``) before it knows ``T``, so this is the same call on every
        rank."""
        if self.joined is None:
            now = time.monotonic()
            if not want and self.last_poll is not None and now - self.last_poll < self._idle_poll:
                return False
            self.last_poll = now
            if not want and not os.path.lexists(self.round(self.k)):
                return False
            if not self._join(min(step + self.lookahead, _U64), stop, want):
                return False
        j = self.joined
        if j is None:
            return False
        if j.target is None:
            if step >= j.bound:
                # This rank may not pass its bound before it knows the agreed step.
                state = self._wait_target(step, True)
            elif self.last_poll is None or time.monotonic() - self.last_poll >= self._look_every():
                self.last_poll = time.monotonic()
                state = self._look(step, True)
            else:
                state = _OPEN
            if state == _OPEN:
                return False
            if state == _ABORTED:
                self._conclude()
                return False
            assert isinstance(state, Target)
            j.target = state
            j.agreed_at = time.monotonic()
        t = j.target
        if self.at_target is None:
            if step >= t.step:
                self.at_target = step
            return self.at_target is not None
        if self.at_target == step:
            return True
        # The job went on past its save point without saving; never save elsewhere.
        p = self.at_target
        self._abort(self.k)
        self._conclude()
        raise CkptError(
            f"rank {self.world.rank} is at step {step}, past its save point {p} (the agreed step {t.step}) "
            "without saving; the save round was abandoned (hint: save when should_checkpoint() says so)"
        )

    def _join(self, proposal: int, stop: bool, want: bool) -> bool:
        """Proposes in the current round (creating it if needed); skips rounds that concluded.
        False when the round is already concluded and this rank has no request, or when some
        rank left the launch (it never writes a shard again: nothing can be published)."""
        if self._someone_left():
            return False
        while True:
            r = self.round(self.k)
            self._ensure_round(r)
            if os.path.lexists(r / "aborted") or os.path.lexists(r / "published"):
                # Concluded without this rank (its shard is missing): skip it.
                self.k += 1
                if not want:
                    return False
                continue
            name = f"propose-{self.world.rank:05d}"
            tmp = r / f".{name}.{token()}"
            _write_new(tmp, _dumps({"step": proposal, "stop": bool(stop)}))
            os.rename(tmp, r / name)
            self.joined = _Joined(bound=proposal, since=time.monotonic(), ext=max(self.lookahead, 1))
            return True

    def _ensure_round(self, r: Path) -> None:
        """Creates round directory ``r`` with its ``stage/`` in one rename (so that a stage
        removed by an abort is never re-created)."""
        if os.path.lexists(r):
            return
        tmp = self.dir / f".new-{token()}"
        os.mkdir(tmp, 0o700)
        try:
            os.mkdir(tmp / "stage", 0o700)
            rename_noreplace(tmp, r)
        except FileExistsError:
            _rmtree(tmp)
        except BaseException:
            _rmtree(tmp)
            raise

    def _coordinator(self) -> bool:
        return self.world.rank == COORDINATOR

    def _look_every(self) -> float:
        """How often a rank that has proposed but is not yet at its proposal looks at the
        round: the coordinator at every call, since the other ranks may already wait for its
        ``agreed`` (a rank that proposed a step earlier blocks at its proposal; had the
        coordinator gone on into a collective without gathering, neither would move until the
        round timeout; as the Rust client, docs/multi-rank.md "Waiting")."""
        return 0.0 if self._coordinator() else self._idle_poll

    def _count_ranks(self, names: List[str], prefix: str) -> int:
        """How many of ``names`` are ``<prefix><rank>`` for distinct ranks of this world."""
        n = 0
        for name in names:
            if name.startswith(prefix):
                d = name[len(prefix) :]
                if d.isascii() and d.isdigit() and int(d) < self.world.size and d == f"{int(d):05d}":
                    n += 1
        return n

    def _state(self, k: int) -> object:
        """One look at round ``k``'s agreement. Every rank but the coordinator reads the one file
        ``agreed`` (and ``aborted``, ``left``); the coordinator lists the round and, once every
        rank's proposal is there, reads them (once) and writes ``agreed``."""
        r = self.round(k)
        if self._coordinator():
            return self._gather_proposals(k)
        if os.path.lexists(r / "aborted"):
            return _ABORTED
        if self._someone_left():
            # The rank that left will never propose: abandon rather than wait for it.
            self._abort(k)
            return _ABORTED
        p = r / "agreed"
        try:
            with open(p, "rb") as f:
                return self._parse_target(p, f.read(), "agreement")
        except FileNotFoundError:
            pass
        # Not agreed yet: has the coordinator moved the horizon on ("Late ranks")?
        p = r / "horizon"
        try:
            with open(p, "rb") as f:
                b = f.read()
        except FileNotFoundError:
            return _OPEN
        try:
            h = json.loads(b)["step"]
            if not isinstance(h, int) or isinstance(h, bool) or h < 0:
                raise ValueError("step must be a whole number")
        except (ValueError, KeyError, TypeError) as e:
            raise CkptError(f"bad horizon {p}: {e}") from None
        return _Horizon(h)

    @staticmethod
    def _parse_target(p: Path, b: bytes, what: str) -> Target:
        try:
            x = json.loads(b)
            step, stop = x["step"], x["stop"]
            if not isinstance(step, int) or isinstance(step, bool) or not isinstance(stop, bool):
                raise ValueError("step must be an integer and stop a boolean")
        except (ValueError, KeyError, TypeError) as e:
            raise CkptError(f"bad {what} {p}: {e}") from None
        return Target(step, stop)

    def _gather_proposals(self, k: int) -> object:
        """The coordinator's look at round ``k``: one ``listdir``; once all ``world_size``
        proposals are there, it reads each once and writes the agreed position ``agreed``
        (temporary name, then rename) for every other rank to read."""
        r = self.round(k)
        names = os.listdir(r)
        if "aborted" in names:
            return _ABORTED
        if self._someone_left():
            self._abort(k)
            return _ABORTED
        if self._count_ranks(names, "propose-") < self.world.size:
            return _OPEN
        # At least the horizon the coordinator gave: ranks may already be there.
        t = Target((self.joined.horizon if self.joined is not None else None) or 0, False)
        for rank in range(self.world.size):
            p = r / f"propose-{rank:05d}"
            with open(p, "rb") as f:
                x = self._parse_target(p, f.read(), "proposal")
            t.step = max(t.step, x.step)
            t.stop = t.stop or x.stop
        tmp = r / f".agreed.{token()}"
        _write_new(tmp, _dumps({"step": t.step, "stop": t.stop}))
        os.rename(tmp, r / "agreed")
        return t

    def _wait_target(self, step: int, movable: bool) -> object:
        """Waits at ``step``, this rank's bound, for the agreed step. Returns ``_OPEN`` when the
        bound moved past ``step`` (``movable``: the coordinator's horizon, or the coordinator
        extending it; a save without a request cannot move), ``_ABORTED`` after the round
        timeout."""
        start = time.monotonic()
        while True:
            s = self._look(step, movable)
            if s != _OPEN:
                return s
            if movable and self.joined is not None and self.joined.bound > step:
                return _OPEN
            time.sleep(_pause(time.monotonic() - start, self._max_pause))

    def _stop_bound(self) -> Optional[Tuple[float, float]]:
        """The stop timeout when the job was asked to stop, and when this rank first saw it."""
        if self.stop_probe is None:
            return None
        b = self.stop_probe()
        if b is None:
            return None
        if self._stop_seen is None:
            self._stop_seen = time.monotonic()
        return b, self._stop_seen

    def _look(self, step: int, movable: bool) -> object:
        """One look at the current round's agreement from a rank at ``step``, with the rules of
        an open round: a horizon raises this rank's bound (``movable``); a rank asked to stop
        gives up after its stop timeout (:meth:`_stop_expired`); the round is abandoned
        ``CKPT_ROUND_TIMEOUT`` after this rank proposed; the coordinator, waiting at its bound
        for a while with proposals missing, moves the horizon on (docs/multi-rank.md, "Late
        ranks")."""
        k = self.k
        s = self._state(k)
        j = self.joined
        if isinstance(s, _Horizon):
            if movable and j is not None and s.step > j.bound:
                j.bound = s.step
                j.at_bound = None
        elif s == _ABORTED:
            self._stop_abandoned(k)
            return s
        elif s != _OPEN:
            return s
        if j is None:
            return _OPEN
        sb = self._stop_bound()
        if sb is not None and time.monotonic() - max(sb[1], j.since) >= sb[0]:
            self._stop_expired(k, "propose-", sb[0])
        if time.monotonic() - j.since >= self.timeout:
            print(
                f"ckpt: warning: rank {self.world.rank}: not every rank proposed a step in save round "
                f"{k} within {self.timeout}s; abandoning the round",
                file=sys.stderr,
            )
            self._abort(k)
            return _ABORTED
        if self._coordinator() and movable and step >= j.bound:
            now = time.monotonic()
            if j.at_bound is None:
                j.at_bound = now
            if now - j.at_bound >= self._max_pause:
                h = min(j.bound + j.ext, _U64)
                j.ext = min(j.ext * 2, _U64)
                j.bound = h
                j.horizon = h
                j.at_bound = None
                r = self.round(k)
                tmp = r / f".horizon.{token()}"
                _write_new(tmp, _dumps({"step": h}))
                os.rename(tmp, r / "horizon")
        return _OPEN

    def _stop_expired(self, k: int, prefix: str, bound: float) -> None:
        """A rank asked to stop whose round did not complete within its stop timeout (``bound``):
        some rank never joined (``prefix``: no ``propose-`` or no ``done-`` marker: it is gone or
        blocked), so the stop checkpoint can never be published. It abandons the round, leaves
        the launch, names the missing ranks and exits with status 143, as a single process that
        reached no safe point within the stop timeout (docs/multi-rank.md, "A stop that cannot
        complete"). Returns only if the round was published meanwhile."""
        r = self.round(k)
        try:
            names = set(os.listdir(r))
        except OSError:
            names = set()
        missing = [str(rank) for rank in range(self.world.size) if f"{prefix}{rank:05d}" not in names]
        won = self._abort(k)
        if not won and os.path.lexists(r / "published"):
            return
        n = len(missing)
        missing = missing[:16]
        what = "saved their shard" if prefix == "done-" else "proposed"
        within = f"in save round {k} of {self.dir} within the stop timeout of {bound:.1f}s"
        if n == 0:
            self._exit_stop(
                f"rank {COORDINATOR} (the coordinator) never concluded the round (every rank {what} {within}: "
                "it is gone or blocked)"
            )
        more = f" and {n - len(missing)} more" if n > len(missing) else ""
        self._exit_stop(f"rank(s) {', '.join(missing)}{more} never joined it (not {what} {within}: gone or blocked)")

    def _stop_abandoned(self, k: int) -> None:
        """A rank asked to stop whose round was abandoned by another rank (which gave up on a
        missing rank, or left): the stop checkpoint cannot complete either; it exits as in
        :meth:`_stop_expired`. Returns when the job was not asked to stop."""
        if self._stop_bound() is not None:
            self._exit_stop(
                f"save round {k} of {self.dir} was abandoned by another rank (a rank is gone or left: see its message)"
            )

    def _exit_stop(self, why: str) -> None:
        """Leaves the launch, says why on stderr and exits with status 143 (a stop without a
        checkpoint)."""
        self.leave()
        sys.stderr.write(
            f"ckpt: SIGTERM: rank {self.world.rank}: the stop checkpoint cannot complete: {why}; exiting now "
            "with status 143 without a checkpoint (hint: set CKPT_STOP_TIMEOUT to wait longer)\n"
        )
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except (OSError, ValueError):
                pass
        os._exit(128 + signal.SIGTERM)

    def _abort(self, k: int) -> bool:
        """Abandons round ``k``: the stage (and every shard in it) goes, ``aborted`` records it.
        The rename of the stage is the arbiter against a concurrent publish. Returns whether
        this rank's rename won (False: the round had already concluded)."""
        r = self.round(k)
        trash = r / f"trash-{token()}"
        try:
            rename_noreplace(r / "stage", trash)
        except OSError:
            return False
        try:
            _write_new(r / "aborted", b"")
        except OSError:
            pass
        _rmtree(trash)
        return True

    def leave(self) -> None:
        """This rank leaves the launch: a round it is in is abandoned (it will never write its
        shard), and it creates ``<epoch>/left``: every other rank then abandons the round it
        waits in and joins no further round (docs/multi-rank.md, "Ending")."""
        try:
            if self.joined is not None:
                self._abort(self.k)
                self._conclude()
        except OSError:
            pass
        try:
            _write_new(self._left_marker(), f"{self.world.rank}\n".encode())
        except FileExistsError:
            pass
        except OSError as e:
            print(
                f"ckpt: warning: rank {self.world.rank}: cannot mark that it left ({self._left_marker()}: {e}); "
                "the other ranks' next save round will time out",
                file=sys.stderr,
            )
        self.rank_left = True

    def _conclude(self) -> None:
        self.joined = None
        self.at_target = None
        self.k += 1
        self.last_poll = None

    # --- the shard commit ------------------------------------------------------------------

    def _abandoned(self, k: int, why: str) -> CkptError:
        return CkptError(
            f"save round {k} of {self.dir} was abandoned ({why}): no checkpoint was published, the shards were removed"
        )

    def commit_shard(self, stage: Stage, step: Optional[int], pos: int, stop: bool, writer: str) -> Manifest:
        """Saves this rank's shard: ``stage`` (filled by the job) becomes ``rank-NNNNN/`` of the
        round's checkpoint. ``step``: the step the job gave to the save (recorded in the
        manifest; ``None``: the agreed position); ``pos``: this rank's position (the last one
        given to :meth:`poll`). Returns once every shard is durable and the checkpoint is
        visible; raises when the round was abandoned. Returns, on the coordinator (rank 0, which
        publishes), the checkpoint's manifest; on every other rank the checkpoint's ``seq``,
        ``step``, ``world_size`` and checksum with only this rank's files (without reading the
        whole manifest, whose size grows with the number of ranks)."""
        self.published_last = False
        # Where this save is, when it is not the save should_checkpoint() asked for: the
        # explicit step wins, else the position.
        here = step if step is not None else pos
        if self.joined is None:
            # A save without a request: every rank must make it at the same position.
            if not self._join(here, stop, True):
                stage.abort()
                raise CkptError(
                    "no multi-rank checkpoint can be saved any more in this launch: a rank left it (its "
                    f"client was closed; see {self._left_marker()}); hint: keep every rank's client open "
                    "until the job's last save"
                )
        k = self.k
        assert self.joined is not None
        t = self.joined.target
        if t is None:
            s = self._wait_target(here, False)
            if not isinstance(s, Target):
                stage.abort()
                self._conclude()
                raise self._abandoned(k, "not every rank proposed a step")
            t = s
            self.joined.agreed_at = time.monotonic()
        if self.at_target is None and t.step != here:
            stage.abort()
            self._abort(k)
            self._conclude()
            raise CkptError(
                f"rank {self.world.rank} saved at step {here} but the ranks agreed on step {t.step} in save "
                f"round {k}; the round was abandoned, nothing was published (hint: call save only when "
                "should_checkpoint() says so, or at the same step on every rank)"
            )
        # The manifest records the step the job gave (the publisher checks that every rank
        # gave the same one), else the save point's position (the agreed one, or the first
        # explicit step past it).
        rec = Target(step if step is not None else (self.at_target if self.at_target is not None else t.step), t.stop)
        try:
            m = self._write_shard(k, stage, rec, writer)
        finally:
            self._conclude()
        if t.stop:
            self.stop_agreed = True
        return m

    def _seal(self, stage: Stage) -> List[FileEntry]:
        """A shard is sealed like a single-process stage: sums and fsyncs of every file, then
        of every directory."""
        entries, dirs = stage._seal_files()
        for d in reversed(dirs):
            _fsync_path(d, directory=True)
        _fsync_path(stage.path, directory=True)
        return entries

    def _write_shard(self, k: int, stage: Stage, t: Target, writer: str) -> Manifest:
        r = self.round(k)
        try:
            entries = self._seal(stage)
            if not entries:
                raise CkptError(
                    f"rank {self.world.rank} saved an empty shard: every rank's shard must hold at least one "
                    "file (a checkpoint without it would not verify); the save round was abandoned"
                )
        except BaseException:
            stage.abort()
            self._abort(k)
            raise
        dest = r / "stage" / self.world.shard_dir
        try:
            rename_noreplace(stage.path, dest)
        except OSError as e:
            stage.abort()
            if not os.path.lexists(r / "stage"):
                raise self._abandoned(k, "another rank gave up waiting") from None
            self._abort(k)
            raise CkptError(f"cannot move the shard into {dest}: {e}") from None
        stage.done = True
        body = _dumps(
            {
                "rank": self.world.rank,
                "step": t.step,
                "checksum": stage.algo,
                "files": [{"name": f.name, "size": f.size, "sum": f.sum} for f in entries],
            }
        )
        try:
            # The shard's directory entry in the stage must be durable before it counts: both
            # parents of its rename (the Rust crash-state test found a lost shard without the
            # staging directory's fsync).
            _fsync_path(dest, directory=True)
            _fsync_path(r / "stage", directory=True)
            _fsync_path(stage.path.parent, directory=True)
            tmp = r / f".done.{token()}"
            _write_new(tmp, body)
            os.rename(tmp, r / f"done-{self.world.rank:05d}")
        except BaseException:
            self._abort(k)
            raise
        if self._coordinator():
            return self._gather_done(k, t, writer)
        # Wait for the outcome: two files, whatever the number of ranks.
        start = time.monotonic()
        own = self._own_save_time()
        gave_up = False
        while True:
            try:
                with open(r / "published", "rb") as f:
                    b = f.read()
            except FileNotFoundError:
                b = None
            if b is not None:
                try:
                    seq = json.loads(b)["seq"]
                except (ValueError, KeyError, TypeError) as e:
                    raise CkptError(f"bad round outcome: {e}") from None
                if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                    raise CkptError(f"bad round outcome: seq {seq!r}")
                # Not the whole manifest, which lists every rank's files (its size grows with
                # the number of ranks): the checkpoint's number, step and world size, and this
                # rank's own files (docs/multi-rank.md, step 7 of the commit).
                prefix = self.world.shard_dir
                return Manifest(
                    seq=seq,
                    created_ms=now_ms(),
                    writer=writer,
                    checksum=stage.algo,
                    files=[FileEntry(f"{prefix}/{f.name}", f.size, f.sum) for f in entries],
                    step=t.step,
                    world_size=self.world.size,
                )
            if os.path.lexists(r / "aborted"):
                self._someone_left()
                self._stop_abandoned(k)
                raise self._abandoned(k, "another rank abandoned it: a shard was late, failed or was refused")
            self._outcome_stop_check(k, start, own)
            if time.monotonic() - start >= self.timeout:
                if gave_up:
                    raise self._abandoned(k, "its outcome is unknown: the publishing rank vanished")
                print(
                    f"ckpt: warning: rank {self.world.rank}: not every shard of save round {k} was durable "
                    f"within {self.timeout}s; abandoning the round",
                    file=sys.stderr,
                )
                self._abort(k)
                gave_up = True
                continue
            time.sleep(_pause(time.monotonic() - start, self._max_pause))

    def _own_save_time(self) -> float:
        """How long this rank's own save took, from learning the agreed step to its done
        marker: the other ranks' shards, as large in an SPMD job, take about as long."""
        j = self.joined
        if j is None or j.agreed_at is None:
            return 0.0
        return time.monotonic() - j.agreed_at

    def _outcome_stop_check(self, k: int, start: float, own: float) -> None:
        """A rank asked to stop that waits for the round's outcome gives up after its stop
        timeout plus its own save's time (``own``), counted from its done marker (``start``) or
        the stop request, whichever came later (:meth:`_stop_expired`)."""
        sb = self._stop_bound()
        if sb is not None and time.monotonic() - max(sb[1], start) >= sb[0] + own:
            self._stop_expired(k, "done-", sb[0] + own)

    def _gather_done(self, k: int, t: Target, writer: str) -> Manifest:
        """The coordinator, its own shard durable, waits for every rank's done marker (one
        ``listdir`` of the round per look), then publishes; abandons the round after the
        timeout."""
        r = self.round(k)
        start = time.monotonic()
        own = self._own_save_time()
        while True:
            names = os.listdir(r)
            if "aborted" in names:
                self._someone_left()
                self._stop_abandoned(k)
                raise self._abandoned(k, "another rank abandoned it: a shard was late, failed or was refused")
            if self._count_ranks(names, "done-") == self.world.size:
                try:
                    m = self._publish(k, t, writer)
                except BaseException:
                    self._abort(k)
                    raise
                self.published_last = True
                if k > 1:
                    # Every rank has finished with the previous round (it joined this one).
                    _rmtree(self.round(k - 1))
                return m
            self._outcome_stop_check(k, start, own)
            if time.monotonic() - start >= self.timeout:
                print(
                    f"ckpt: warning: rank {self.world.rank}: not every shard of save round {k} was durable "
                    f"within {self.timeout}s; abandoning the round",
                    file=sys.stderr,
                )
                self._abort(k)
                raise self._abandoned(k, "a rank did not finish its shard in time")
            time.sleep(_pause(time.monotonic() - start, self._max_pause))

    def _publish(self, k: int, t: Target, writer: str) -> Manifest:
        """Writes the top-level manifest listing every shard's files and publishes the stage
        with the single atomic rename."""
        r = self.round(k)
        stage = r / "stage"
        entries: List[FileEntry] = []
        algo: Optional[str] = None
        for rank in range(self.world.size):
            p = r / f"done-{rank:05d}"
            with open(p, "rb") as f:
                b = f.read()
            try:
                d = json.loads(b)
                d_rank, d_step, d_algo, d_files = d["rank"], d["step"], d["checksum"], d["files"]
                files = [FileEntry(x["name"], x["size"], x["sum"]) for x in d_files]
            except (ValueError, KeyError, TypeError) as e:
                raise CkptError(f"bad shard record {p}: {e}") from None
            if d_rank != rank or d_step != t.step or (algo is not None and algo != d_algo):
                raise CkptError(
                    f"shard record {p} does not match the round (rank {d_rank}, step {d_step}, checksum {d_algo}); "
                    f"hint: every rank must save with the same step and checksum algorithm ({SHARD_ALGO} by default)"
                )
            algo = d_algo
            prefix = shard_name(rank)
            entries.extend(FileEntry(f"{prefix}/{f.name}", f.size, f.sum) for f in files)
        manifest = Manifest(
            seq=0,
            created_ms=0,
            writer=writer,
            checksum=algo or SHARD_ALGO,
            files=entries,
            step=t.step,
            world_size=self.world.size,
        )
        mpath = stage / MANIFEST_NAME
        for attempt in range(1000):
            manifest.seq = self.store.next_seq()
            manifest.created_ms = now_ms()
            if attempt > 0:
                os.unlink(mpath)
            _write_new(mpath, manifest.encode())
            _fsync_path(mpath)
            _fsync_path(stage, directory=True)
            try:
                rename_noreplace(stage, self.store.path_of(manifest.seq))
            except FileExistsError:
                continue
            _fsync_path(self.store.dir, directory=True)
            tmp = r / f".published.{token()}"
            _write_new(tmp, _dumps({"seq": manifest.seq}))
            os.rename(tmp, r / "published")
            return manifest
        raise CkptError(f"could not claim a sequence number in {self.store.dir} after 1000 tries")
