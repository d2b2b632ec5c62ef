"""The whole PyTorch training state in one call, resuming exactly (imported only on demand:
``import ckpt.torch``; the rest of the package never imports torch).

What a bit-identical resume needs, and what :class:`TrainState` saves and restores: the
model(s), optimizer(s), LR scheduler(s) (forgetting one restarts the warm-up), the grad scaler,
every random generator (Python's ``random``, numpy's global one and any numpy or torch
``Generator`` you pass, torch's CPU generator and, when present, every CUDA device's), the
DataLoader's own generator as it was at the start of the epoch (so the iterator created on a
resume draws the same seeds), the position (epoch, batch inside the epoch, global step) and a
user dict. ::

    import ckpt                          # first: it installs the signal handlers early
    import ckpt.torch as ckt
    ck = ckpt.Checkpointer()
    loader = DataLoader(data, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))   # its own generator
    ts = ckt.TrainState(models={"model": model}, optimizers={"opt": opt},
                        schedulers={"sched": sched}, loader=loader)
    ts.restore(ck)                       # no-op on a fresh start
    for epoch in ts.epochs(10):
        for x, y in ts.batches():        # the loader's batches, from the restored position
            ...                          # one training step
            if ck.should_checkpoint(ts.step):
                ts.save(ck)
            if ck.should_stop():
                raise SystemExit(0)

Saved as ``train_state.pt`` with only tensors and plain containers (RNG states included), so
it loads with ``torch.load(..., weights_only=True)``: nothing in a checkpoint is unpickled as
code, and torch >= 2.6's safe default needs no allow-listing.

A resume inside an epoch skips the batches already done: with :class:`ResumableSampler` as the
loader's sampler it skips their indices (nothing is loaded); with any other sampler it draws
the same order (the loader's generator is restored to its state at the epoch's start) and
fetches and drops the batches already done. With ``num_workers > 0``, randomness inside the
workers (augmentation) is seeded per worker, and a worker sees other batches after a resume:
seed such randomness from the sample index for an exact resume.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch

from . import training as tr
from .errors import CkptError, InvalidCheckpoint

STATE_FILE = "train_state.pt"
FORMAT = 1
# A restore copies the file's bytes into the tensors the objects already have as it reads them
# (docs/benchmarks.md, run V) when they hold at least this share of the file's bytes; else the
# file is read whole into memory of its own and torch's tensors are views of it (run L), which
# was faster when most tensors have to be made anyway (a fresh optimizer).
IN_PLACE_SHARE = 0.75


def _size(f: Any) -> int:
    try:
        return int(f.seek(0, 2))
    finally:
        f.seek(0)


class ResumableSampler(torch.utils.data.Sampler):
    """A sampler whose order depends only on ``(seed, epoch)`` and that can start inside an
    epoch: ``shuffle=True`` gives a new permutation each epoch, ``False`` the dataset's order.
    :class:`TrainState` sets the epoch and the start; its state is in the checkpoint."""

    def __init__(self, data_source: Any, *, shuffle: bool = True, seed: int = 0) -> None:
        self.n = len(data_source)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[int]:
        order = self.order()[self.start:]
        self.start = 0
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.n - self.start


def _gen_state(g: Any) -> Any:
    if isinstance(g, torch.Generator):
        return {"kind": "torch", "state": g.get_state()}
    return {"kind": "numpy", "state": _big_ints_to_str(tr.generator_state(g))}


def _set_gen_state(g: Any, s: Mapping[str, Any]) -> None:
    if isinstance(g, torch.Generator):
        g.set_state(s["state"])
    else:
        tr.set_generator_state(g, _str_to_big_ints(s["state"]))


# numpy's PCG64 state holds 128-bit integers: kept as strings, so the safe loader reads them.
def _big_ints_to_str(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _big_ints_to_str(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_big_ints_to_str(x) for x in v]
    if isinstance(v, int) and not isinstance(v, bool) and not -(2**63) <= v < 2**63:
        return {"__int__": str(v)}
    return v


def _str_to_big_ints(v: Any) -> Any:
    if isinstance(v, dict):
        if set(v) == {"__int__"}:
            return int(v["__int__"])
        return {k: _str_to_big_ints(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_str_to_big_ints(x) for x in v]
    return v


@contextlib.contextmanager
def _without_zip_crc32() -> Iterator[None]:
    """Turns off the CRC-32 torch >= 2.6 computes of every record of its zip file while
    ``torch.save`` runs (one slow pass over the state, 1.3-3.7 s per GiB measured here; the
    checkpoint's own checksum, computed while the file is written and verified before a
    resume, already covers every byte). The setting is put back afterwards."""
    try:
        from torch.utils.serialization import config as tcfg

        save_cfg = tcfg.save
        old = save_cfg.compute_crc32
    except Exception:  # an older torch: nothing to turn off
        yield
        return
    save_cfg.compute_crc32 = False
    try:
        yield
    finally:
        save_cfg.compute_crc32 = old


class TrainState:
    """Models, optimizers, schedulers, scaler, generators, loader position and a user dict.

    Every mapping is name -> object with ``state_dict()``/``load_state_dict()`` (models,
    optimizers, schedulers, ``torch.amp.GradScaler``); ``generators`` are extra
    ``torch.Generator``s or ``numpy.random.Generator``s; ``loader`` a DataLoader that has its
    own ``generator=`` (without one, creating its iterator draws from torch's global generator,
    and a resume inside an epoch would shift every random number after it: refused). A
    torchdata ``StatefulDataLoader`` works the same way (given its own ``generator=``): the
    position is restored here, its ``state_dict()`` is not needed.
    """

    def __init__(
        self,
        models: Optional[Mapping[str, Any]] = None,
        optimizers: Optional[Mapping[str, Any]] = None,
        schedulers: Optional[Mapping[str, Any]] = None,
        scaler: Any = None,
        loader: Any = None,
        generators: Optional[Mapping[str, Any]] = None,
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        if loader is not None and getattr(loader, "generator", None) is None:
            raise CkptError(
                "the DataLoader has no generator of its own: creating its iterator draws from "
                "torch's global generator, so a resume inside an epoch would shift every random "
                "number after it; hint: DataLoader(..., generator=torch.Generator().manual_seed(SEED))"
            )
        self.stateful: Dict[str, Any] = {}
        for kind, objs in (("model", models), ("optimizer", optimizers), ("scheduler", schedulers)):
            for name, o in (objs or {}).items():
                self.stateful[f"{kind}/{name}"] = o
        if scaler is not None:
            self.stateful["scaler"] = scaler
        self.loader = loader
        self.generators = dict(generators or {})
        self.extra: Dict[str, Any] = dict(extra or {})
        self.epoch = 0
        self.batch = 0
        self.step = 0
        self.restored_step: Optional[int] = None
        self._loader_gen_at_epoch: Optional[torch.Tensor] = None
        self._pending: Dict[str, List[Any]] = {}  # copies restore() leaves to load_state_dict()
        # Why this state must not be saved: a restore failed after copying part of a damaged
        # checkpoint into the objects' tensors (restore(), run V).
        self._broken: Optional[str] = None
        # restore() loaded tensors no one else holds, in memory of their own: a model may take
        # them as they are (_swap_into) instead of copying them (run L).
        self._swap = False

    # --- the loop ---------------------------------------------------------------------------

    def epochs(self, n: int) -> Iterator[int]:
        """Epochs from the restored one to ``n - 1``."""
        while self.epoch < n:
            yield self.epoch
            self.epoch += 1
            self.batch = 0
            self._loader_gen_at_epoch = None

    def batches(self) -> Iterator[Any]:
        """The loader's batches of the current epoch, from the restored position. A batch
        counts as done (:attr:`batch`, :attr:`step`) once the loop body got it."""
        loader = self.loader
        if loader is None:
            raise CkptError("batches() needs TrainState(loader=...)")
        gen = loader.generator
        if self._loader_gen_at_epoch is None:
            self._loader_gen_at_epoch = gen.get_state()
        else:
            # A resume inside the epoch: the iterator draws what it drew at the epoch's start.
            gen.set_state(self._loader_gen_at_epoch)
        skip = self.batch
        sampler = getattr(loader, "sampler", None)
        if isinstance(sampler, ResumableSampler):
            sampler.set_epoch(self.epoch, skip * (loader.batch_size or 1))
            it: Iterator[Any] = iter(loader)
        else:
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(self.epoch)
            it = itertools.islice(iter(loader), skip, None)
        for b in it:
            self.batch += 1
            self.step += 1
            yield b

    # --- saving -----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        st: Dict[str, Any] = {
            "format": FORMAT,
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "objects": {k: o.state_dict() for k, o in self.stateful.items()},
            "rng": {
                "python": tr.python_random_state(),
                "numpy_global": tr.numpy_global_state(),
                "torch_cpu": torch.get_rng_state(),
                "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "generators": {k: _gen_state(g) for k, g in self.generators.items()},
            },
            "extra": self.extra,
        }
        gen = getattr(self.loader, "generator", None)
        if gen is not None:
            st["loader_generator_at_epoch"] = (
                self._loader_gen_at_epoch if self._loader_gen_at_epoch is not None else gen.get_state()
            )
        return st

    def save(self, ck: Any, *, meta: Optional[Dict[str, Any]] = None) -> Any:
        """Saves everything as one checkpoint at :attr:`step` (durable on return)."""
        if self._broken is not None:
            raise CkptError(
                f"refusing to save this TrainState: {self._broken}, so they hold neither the "
                "checkpoint nor their state before it; exit (ckpt run relaunches the job from the "
                "newest checkpoint that verifies)"
            )
        st = self.state_dict()
        with ck.saving(step=self.step, meta=meta) as d:
            if hasattr(ck, "direct_file"):
                # Past the page cache, checksummed as written (docs/benchmarks.md, run I).
                with ck.direct_file(STATE_FILE) as f, _without_zip_crc32():
                    torch.save(st, f)
            else:
                torch.save(st, d / STATE_FILE)
        return ck.last_saved

    # --- restoring --------------------------------------------------------------------------

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        if st.get("format") != FORMAT:
            raise CkptError(f"{STATE_FILE}: format {st.get('format')!r} is not {FORMAT}")
        missing = set(self.stateful) - set(st["objects"])
        if missing:
            raise CkptError(f"{STATE_FILE} has no state for {sorted(missing)} (it has {sorted(st['objects'])})")
        pending, self._pending = self._pending, {}
        swap, self._swap = self._swap, False
        for k, o in self.stateful.items():
            for mine, loaded in pending.get(k, ()):
                mine.copy_(loaded)  # into the tensor it already has (run K)
            if not (swap and _swap_into(o, st["objects"][k])):
                o.load_state_dict(st["objects"][k])
        rng = st["rng"]
        tr.set_python_random_state(rng["python"])
        tr.set_numpy_global_state(rng["numpy_global"])
        torch.set_rng_state(rng["torch_cpu"])
        if rng["torch_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["torch_cuda"])
        gmissing = set(self.generators) - set(rng["generators"])
        if gmissing:
            raise CkptError(f"{STATE_FILE} has no state for generator(s) {sorted(gmissing)}")
        for k, g in self.generators.items():
            _set_gen_state(g, rng["generators"][k])
        self.epoch, self.batch, self.step = int(st["epoch"]), int(st["batch"]), int(st["step"])
        self.extra.clear()
        self.extra.update(st.get("extra", {}))
        if getattr(self.loader, "generator", None) is not None and "loader_generator_at_epoch" in st:
            self._loader_gen_at_epoch = st["loader_generator_at_epoch"]
        self.restored_step = self.step

    def restore(self, ck: Any) -> bool:
        """Restores from the checkpoint the job was started with (safe loader:
        ``weights_only=True``); False on a fresh start. A damaged checkpoint raises
        :class:`~ckpt.errors.InvalidCheckpoint`. Into objects that already hold most of the
        file's tensors, the bytes are copied into their tensors as the file is read, before
        its checksum is known: after such an error those objects hold part of the file, and
        this ``TrainState`` refuses to :meth:`save` (exit; ``ckpt run`` relaunches the job
        from the newest checkpoint that verifies). Otherwise nothing is applied before the
        whole file verifies (docs/training.md)."""
        opener = getattr(ck, "_open_verified", None)
        f = opener(STATE_FILE) if opener is not None else None
        if f is None:
            # Loaded by path: restore_dir() checksums the files first when the supervisor did
            # not (`ckpt run --restore-check client`).
            d = ck.restore_dir()
            if d is None:
                return False
        else:
            # Every byte is checked as it is read (a path for messages only): not restore_dir(),
            # whose check under --restore-check client would read the file twice.
            d = getattr(ck, "_restore_path", ck.restore_dir)()
        swap = False
        if f is None:
            st = torch.load(d / STATE_FILE, map_location="cpu", weights_only=True)
        else:
            with f:
                st = None
                way = _WAY
                if way is None:
                    # Objects that hold most of the file's tensors already get the file's
                    # bytes copied into those tensors as it is read, once (run V: past the
                    # page cache when cold, from the cache when the supervisor's verify left
                    # it there); copying beats reading into fresh memory and swapping
                    # (0.33-0.51 s against 0.84-1.83 s per GiB), with 16-32 MiB of extra
                    # memory instead of the state's size (docs/benchmarks.md, runs P and V).
                    way = "scatter" if self._existing_bytes() >= IN_PLACE_SHARE * _size(f) else "whole"
                if way == "whole" and hasattr(f, "read_whole"):
                    # Zero-copy (docs/benchmarks.md, run L): the whole file read into memory
                    # of our own (O_DIRECT straight into it when cold) and verified; torch's
                    # tensors are then views of that memory, handed to the objects as they
                    # are (a model's parameters swapped, not copied: _swap_into).
                    try:
                        mem = f.read_whole()
                    except InvalidCheckpoint as e:
                        raise e.at(str(d)) from None
                    if mem is not None:
                        st = _load_over(f"/proc/self/fd/{f.fileno()}", mem)
                if st is None and way == "scatter" and hasattr(f, "scatter_verified"):
                    try:
                        st = self._restore_scattered(f, d)
                    except InvalidCheckpoint as e:
                        raise e.at(str(d)) from None
                mm = None
                if st is None and way != "reader" and hasattr(f, "map_verified") and (
                    way == "inplace" or self._existing_bytes() >= IN_PLACE_SHARE * _size(f)
                ):
                    try:
                        mm = f.map_verified()
                    except InvalidCheckpoint as e:
                        raise e.at(str(d)) from None
                # Not run K's tensors (they map the file), nor run V's (the objects' own).
                swap = mm is None and not getattr(f, "scattered", False)
                if mm is not None:
                    # In place (docs/benchmarks.md, run K): the whole file read into the page
                    # cache and verified first; then mapped by torch, and every tensor copied
                    # into the memory the model (and the optimizer) already has.
                    mm.close()
                    st = torch.load(f"/proc/self/fd/{f.fileno()}", map_location="cpu", weights_only=True, mmap=True)
                    self._own_tensors(st)
                elif st is None:
                    # Every tensor read with one readinto into its own memory, past the page
                    # cache (run J); nothing is applied before the whole file verifies.
                    try:
                        st = torch.load(f, map_location="cpu", weights_only=True)
                    except Exception as load_error:
                        if isinstance(load_error, InvalidCheckpoint):
                            raise load_error.at(str(d)) from None
                        # Damaged bytes can break the loader before the whole file is
                        # checked: name the damage, if that is what it is.
                        try:
                            f.verify()
                        except InvalidCheckpoint as e:
                            raise e.at(str(d)) from load_error
                        raise
                    try:
                        f.verify()
                    except InvalidCheckpoint as e:
                        raise e.at(str(d)) from None
        self._swap = swap
        try:
            self.load_state_dict(st)
        except BaseException as e:
            if f is not None and getattr(f, "scattered", False):
                self._broken = f"its restore from {d} failed ({e}) after the checkpoint's bytes were copied into the objects' tensors"
            raise
        return True

    def _restore_scattered(self, f: Any, d: Any) -> Optional[Dict[str, Any]]:
        """The state of ``train_state.pt`` (``f``, a ``VerifiedFile``) read once, each tensor's
        bytes copied as the file is read (``f.scatter_verified``) into the tensor the object's
        ``state_dict()`` already has at the same place (dict keys, list positions; a CPU
        tensor of one dtype and shape, contiguous, needing no grad), every other tensor into
        fresh memory of its own; the objects' ``load_state_dict`` then finds their own memory
        (a copy onto itself, which torch skips). The file's layout comes from
        ``torch.load(mmap=True)``: each storage is a slice of one storage over the whole file,
        at the offset of its record. ``None`` (nothing read) where this torch loads otherwise,
        or where two tensors would take one memory from different bytes. After an error in
        the read the objects' tensors hold part of the file: the state is marked unsaveable
        (:attr:`_broken`)."""
        size = _size(f)
        path = f"/proc/self/fd/{f.fileno()}"
        try:
            st, whole = _load_mapped(path, size)
        except Exception as load_error:
            # Damaged bytes can break torch's reading of the zip before anything is copied:
            # name the damage, if that is what it is.
            try:
                f.verify()
            except InvalidCheckpoint as e:
                raise e from load_error
            raise
        if whole is None:
            return None
        objs = st.get("objects", {})
        for k, o in self.stateful.items():
            # A model whose state dict does not match the file's key for key, shape for shape,
            # gets the copy after the verify (run K), so that torch refuses it with nothing
            # copied into any object.
            if isinstance(o, torch.nn.Module) and not _same_layout(o.state_dict(), objs.get(k)):
                return None
        base = whole.data_ptr()
        dests: List[Any] = []
        mine: set = set()
        for k, o in self.stateful.items():
            if k not in objs:
                continue
            try:
                have = o.state_dict()
            except Exception:
                continue
            objs[k] = _scatter_into(have, objs[k], base, size, dests, mine)

        def filled_from_the_file(src: Any) -> Any:
            # Fresh memory for a storage over the mapped file, filled as the file is read.
            off, n = src.data_ptr() - base, src.nbytes()
            if not 0 <= off <= size - n:
                return None
            own = torch.UntypedStorage(n)
            if n:
                dests.append((off, n, own.data_ptr()))
            return own

        memo: Dict[int, Any] = {}
        for k in list(st):
            st[k] = _owned(st[k], memo, mine, filled_from_the_file)
        # Two destinations that overlap must take the same bytes (tied weights do).
        spans = sorted((addr, n, addr - off) for off, n, addr in dests)
        for (a0, n0, d0), (a1, _n1, d1) in zip(spans, spans[1:]):
            if a1 < a0 + n0 and d1 != d0:
                return None
        del whole
        try:
            if not f.scatter_verified(dests):
                return None
        except BaseException as e:
            self._broken = f"its restore from {d} failed ({getattr(e, 'reason', e)}) after some of the checkpoint's bytes were copied into the objects' tensors"
            raise
        return st

    def _existing_bytes(self) -> int:
        """Bytes of the CPU tensors the objects' ``state_dict()`` hold now (each storage once):
        what a restore could copy into memory the process already has."""
        seen: Dict[int, int] = {}

        def walk(v: Any) -> None:
            if isinstance(v, torch.Tensor):
                if v.device.type == "cpu" and v.layout == torch.strided:
                    s = v.untyped_storage()
                    seen[s.data_ptr()] = s.nbytes()
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x)

        for o in self.stateful.values():
            try:
                walk(o.state_dict())
            except Exception:
                pass
        seen.pop(0, None)
        return sum(seen.values())

    def _own_tensors(self, st: Dict[str, Any]) -> None:
        """Makes the tensors of ``st`` (loaded with ``mmap=True``: backed by the file) safe to
        keep: a model's are left as they are (its ``load_state_dict`` copies each into its
        own parameters and buffers); for any other object (an optimizer, a scheduler), each
        tensor is replaced by the one its ``state_dict()`` already has at the same place when
        both are CPU tensors of one dtype and shape, the copy into it left to
        :meth:`load_state_dict` (just before the object's own); every
        other tensor is copied into fresh memory (storages shared between tensors stay
        shared)."""
        memo: Dict[int, Any] = {}
        mine: set = set()
        objs = st.get("objects", {})
        for k, o in self.stateful.items():
            if k not in objs or isinstance(o, torch.nn.Module):
                continue
            try:
                have = o.state_dict()
            except Exception:
                have = None
            pending: List[Any] = []
            objs[k] = _owned(_into_existing(have, objs[k], mine, pending), memo, mine)
            self._pending[k] = pending
        for k in list(st):
            if k != "objects":
                st[k] = _owned(st[k], memo, mine)


# Which way restore() reads (for A/B measurements and tests): None (run V's copy into objects
# that hold at least IN_PLACE_SHARE of the file's bytes as the file is read, else zero-copy),
# "scatter" (run V's, whatever the share), "whole" (zero-copy, run L), "inplace" (run K's
# mapped copy after the verify), "reader" (run J's reader).
_WAY: Optional[str] = None

_from_file_lock = threading.Lock()


def _load_over(path: str, mem: memoryview) -> Any:
    """``torch.load(path, weights_only=True)`` whose tensors are views of ``mem`` (the file's
    bytes, already verified) instead of copies: torch's own ``mmap=True`` load takes every
    storage as a slice of one storage over the whole file (``UntypedStorage.from_file``); for
    this call that storage is one over ``mem`` (``torch.frombuffer``: it keeps ``mem``, and so
    the memory, alive as long as a tensor uses it). Where this torch does not go through
    ``from_file``, the tensors are copied out of ``mem`` (``torch.load`` of a ``BytesIO``)."""
    whole = torch.frombuffer(mem, dtype=torch.uint8).untyped_storage()
    st, used = _load_mapped(path, len(mem), over=whole)
    if used is None:
        import io

        st = torch.load(io.BytesIO(mem), map_location="cpu", weights_only=True)
    return st


def _load_mapped(path: str, size: int, over: Any = None) -> Tuple[Any, Any]:
    """``torch.load(path, weights_only=True, mmap=True)`` and the storage over the whole file
    (``size`` bytes) that its storages are slices of: torch's mapping of the file, or ``over``
    in its place; ``None`` where this torch does not map the file whole."""
    seen: List[Any] = []
    real = torch.UntypedStorage.from_file

    def from_file(filename: Any, shared: Any = False, nbytes: int = 0) -> Any:
        if str(filename) != path or int(nbytes) != size:
            return real(filename, shared, nbytes)
        s = over if over is not None else real(filename, shared, nbytes)
        seen.append(s)
        return s

    with _from_file_lock:
        torch.UntypedStorage.from_file = staticmethod(from_file)  # type: ignore[method-assign]
        try:
            st = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        finally:
            del torch.UntypedStorage.from_file  # the inherited classmethod again
    return st, (seen[0] if len(seen) == 1 else None)


def _same_layout(have: Any, loaded: Any) -> bool:
    """Whether the state dicts ``have`` and ``loaded`` have the same keys and, key for key,
    tensors of one shape (what a strict ``load_state_dict`` checks)."""
    if not isinstance(have, Mapping) or not isinstance(loaded, Mapping) or set(have) != set(loaded):
        return False
    for k, v in have.items():
        w = loaded[k]
        if isinstance(v, torch.Tensor) != isinstance(w, torch.Tensor):
            return False
        if isinstance(v, torch.Tensor) and v.shape != w.shape:
            return False
    return True


def _file_span(t: Any, base: int, size: int) -> Optional[Tuple[int, int]]:
    """(offset in the file, bytes) of the contiguous CPU tensor ``t`` loaded over the file
    mapped at ``base`` (``size`` bytes); ``None`` if it is not such a tensor."""
    if t.device.type != "cpu" or t.layout != torch.strided or not t.is_contiguous():
        return None
    n = t.numel() * t.element_size()
    ptr = t.untyped_storage().data_ptr()
    if n == 0 or ptr == 0:
        return None
    off = ptr - base + t.storage_offset() * t.element_size()
    if off < 0 or off + n > size:
        return None
    return off, n


def _scatter_into(have: Any, loaded: Any, base: int, size: int, dests: List[Any], mine: set) -> Any:
    """``loaded`` (tensors over the mapped file) with each tensor replaced by the tensor at
    the same place of ``have`` that can take its bytes directly (a contiguous CPU tensor of
    one dtype and shape that needs no grad); ``(file offset, bytes, address)`` of each into
    ``dests``, its ``id`` into ``mine``."""

    def take(mine_t: Any, t: Any) -> bool:
        if not (_fits(mine_t, t) and mine_t.is_contiguous() and type(mine_t) in (torch.Tensor, torch.nn.Parameter)):
            return False
        span = _file_span(t, base, size)
        if span is None or mine_t.data_ptr() == 0:
            return False
        dests.append((span[0], span[1], mine_t.data_ptr()))
        mine.add(id(mine_t))
        return True

    return _paired(have, loaded, take)


def _fits(mine_t: Any, t: Any) -> bool:
    """Whether the object's tensor ``mine_t`` can take the loaded tensor ``t``'s values in
    place: a CPU strided tensor of one dtype and shape that needs no grad."""
    return (
        isinstance(mine_t, torch.Tensor) and mine_t is not t and not mine_t.requires_grad
        and mine_t.device.type == "cpu" and t.device.type == "cpu"
        and mine_t.layout == torch.strided and t.layout == torch.strided
        and mine_t.dtype == t.dtype and mine_t.shape == t.shape
    )


def _paired(have: Any, loaded: Any, take: Any) -> Any:
    """``loaded`` with each tensor replaced by the tensor at the same place (dict keys, list
    positions) of ``have`` where ``take(have's, loaded's)`` says so."""
    if isinstance(loaded, torch.Tensor):
        return have if isinstance(have, torch.Tensor) and take(have, loaded) else loaded
    if isinstance(loaded, dict) and isinstance(have, dict):
        for k in list(loaded):
            if k in have:
                loaded[k] = _paired(have[k], loaded[k], take)
        return loaded
    if isinstance(loaded, list) and isinstance(have, (list, tuple)) and len(have) == len(loaded):
        return [_paired(h, v, take) for h, v in zip(have, loaded)]
    return loaded


def _swap_into(o: Any, sd: Any) -> bool:
    """Puts the tensors of ``sd`` (a model's loaded state dict) into the module ``o`` without
    copying them: each parameter and buffer keeps its object (the optimizer holds the
    parameters) and takes the loaded tensor's memory (``p.data = t``). Only for a plain
    ``nn.Module`` load (no ``load_state_dict`` or ``_load_from_state_dict`` of its own, no
    load hooks) whose state dict has exactly ``sd``'s keys, every pair a CPU strided tensor
    of one dtype and shape; False (nothing done) otherwise: the caller's
    ``load_state_dict`` copies (and refuses what does not fit)."""
    nn = torch.nn
    if not isinstance(o, nn.Module) or not isinstance(sd, Mapping) or type(o).load_state_dict is not nn.Module.load_state_dict:
        return False
    for m in o.modules():
        if type(m)._load_from_state_dict is not nn.Module._load_from_state_dict:
            return False
        if getattr(m, "_load_state_dict_pre_hooks", None) or getattr(m, "_load_state_dict_post_hooks", None):
            return False
    try:
        have = o.state_dict(keep_vars=True)
    except Exception:
        return False
    if set(have) != set(sd):
        return False
    pairs = []
    for k, mine in have.items():
        t = sd[k]
        if not (
            isinstance(mine, torch.Tensor) and isinstance(t, torch.Tensor)
            and mine.device.type == "cpu" and t.device.type == "cpu"
            and mine.layout == torch.strided and t.layout == torch.strided
            and mine.dtype == t.dtype and mine.shape == t.shape
            and type(t) in (torch.Tensor, nn.Parameter)
        ):
            return False
        pairs.append((mine, t))
    with torch.no_grad():
        for mine, t in pairs:
            mine.data = t.detach()
    return True


def _into_existing(have: Any, loaded: Any, mine: set, pending: List[Any]) -> Any:
    """``loaded`` with each tensor replaced by the tensor at the same place (dict keys, list
    positions) of ``have`` when both are CPU strided tensors of one dtype and shape (and the
    existing one needs no grad); its ``id`` goes into ``mine`` and ``(existing, loaded)`` into
    ``pending``: the copy to make just before the object's ``load_state_dict``."""

    def take(mine_t: Any, t: Any) -> bool:
        if not _fits(mine_t, t):
            return False
        pending.append((mine_t, t))
        mine.add(id(mine_t))
        return True

    return _paired(have, loaded, take)


def _owned(v: Any, memo: Dict[int, Any], mine: set, storage: Optional[Callable[[Any], Any]] = None) -> Any:
    """``v`` with every tensor not in ``mine`` (ids) moved to memory of its own: one new
    storage per storage (storages shared between tensors stay shared), ``storage(src)``
    (default: a copy of ``src``; ``None`` from it: that tensor is cloned instead)."""
    if isinstance(v, torch.Tensor):
        if id(v) in mine:
            return v
        if isinstance(v, torch.nn.Parameter) or v.device.type != "cpu" or v.layout != torch.strided:
            return v.clone()
        src = v.untyped_storage()
        key = src.data_ptr()
        if key == 0:
            return v.clone()
        own = memo.get(key)
        if own is None:
            own = src.clone() if storage is None else storage(src)
            if own is None:
                return v.clone()
            memo[key] = own
        return torch.empty(0, dtype=v.dtype).set_(own, v.storage_offset(), v.size(), v.stride())
    if isinstance(v, dict):
        for k in list(v):
            v[k] = _owned(v[k], memo, mine, storage)
        return v
    if isinstance(v, list):
        return [_owned(x, memo, mine, storage) for x in v]
    if isinstance(v, tuple):
        items = [_owned(x, memo, mine, storage) for x in v]
        return type(v)(*items) if hasattr(v, "_fields") else tuple(items)
    return v
