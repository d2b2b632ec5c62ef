"""Training state that resumes exactly, for jobs without PyTorch (numpy and the standard
library): arrays, every random generator (Python's ``random``, numpy's global state and any
``numpy.random.Generator``), the position (epoch, batch inside the epoch, global step) and a
user dict, saved as one checkpoint and restored in one call. ``ckpt.torch`` builds on it.

A resumed run ends exactly where an uninterrupted one does only if *everything* that changes
while the job runs is saved: forgetting one generator or the position inside an epoch makes a
resumed run silently different (``ckpt check`` finds such bugs: docs/check.md).

Files of a checkpoint: ``arrays.npz`` (written with ``allow_pickle=False`` and read the same
way: no code runs on load) and ``train_state.json`` (generators, position, user dict). ::

    import ckpt, ckpt.training as tr
    ck = ckpt.Checkpointer()
    rng = np.random.default_rng(0)
    st = tr.TrainState(arrays={"w": w, "m": m}, generators={"data": rng})
    st.restore(ck)                       # no-op on a fresh start; arrays are filled in place
    for epoch in st.epochs(10):
        for batch in st.batches(n_batches):
            ...                          # one step of work on batch number `batch`
            if ck.should_checkpoint(st.step):
                st.save(ck)
            if ck.should_stop():
                raise SystemExit(0)
"""

from __future__ import annotations

import json
import random
from typing import Any, Dict, Iterator, List, Mapping, Optional

from .errors import CkptError, InvalidCheckpoint

STATE_JSON = "train_state.json"
ARRAYS_NPZ = "arrays.npz"
FORMAT = 1


def _np():  # numpy is optional for the package, required here
    try:
        import numpy as np
    except ImportError as e:  # pragma: no cover - numpy is installed where this is used
        raise CkptError("ckpt.training needs numpy; hint: pip install numpy") from e
    return np


def python_random_state() -> List[Any]:
    """``random.getstate()`` as JSON-able lists."""
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_python_random_state(s: List[Any]) -> None:
    random.setstate((s[0], tuple(s[1]), s[2]))


def numpy_global_state() -> Dict[str, Any]:
    """``numpy.random.get_state()`` (the legacy global generator) as JSON-able values."""
    name, keys, pos, has_gauss, cached = _np().random.get_state()
    return {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)}


def set_numpy_global_state(s: Mapping[str, Any]) -> None:
    np = _np()
    np.random.set_state((s["name"], np.asarray(s["keys"], dtype=np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def generator_state(g: Any) -> Dict[str, Any]:
    """A ``numpy.random.Generator``'s bit generator state (JSON-able: plain ints and dicts)."""
    return _jsonable(g.bit_generator.state)


def set_generator_state(g: Any, s: Mapping[str, Any]) -> None:
    g.bit_generator.state = s


def _jsonable(v: Any) -> Any:
    np = _np()
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


class TrainState:
    """Everything a training loop changes, saved and restored together.

    ``arrays``: named numpy arrays, restored *in place* (same shape and dtype required, so
    references held elsewhere stay valid). ``generators``: named ``numpy.random.Generator``s.
    Python's ``random`` and numpy's global generator are always included. ``extra``: a
    JSON-able dict of the job's own (hyperparameters, counters, a loss history).

    The position: :attr:`epoch`, :attr:`batch` (batches completed in this epoch) and
    :attr:`step` (batches completed in all), advanced by :meth:`epochs` and :meth:`batches`.
    """

    def __init__(
        self,
        arrays: Optional[Mapping[str, Any]] = None,
        generators: Optional[Mapping[str, Any]] = None,
        extra: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.arrays = dict(arrays or {})
        self.generators = dict(generators or {})
        self.extra: Dict[str, Any] = dict(extra or {})
        self.epoch = 0
        self.batch = 0
        self.step = 0
        self.restored_step: Optional[int] = None

    # --- the loop ---------------------------------------------------------------------------

    def epochs(self, n: int) -> Iterator[int]:
        """Epochs from the restored one to ``n - 1``."""
        while self.epoch < n:
            yield self.epoch
            self.epoch += 1
            self.batch = 0

    def batches(self, n: int) -> Iterator[int]:
        """Batch numbers of the current epoch from the restored position to ``n - 1``; a batch
        counts as done (in :attr:`batch` and :attr:`step`) once the loop body got it, so a save
        in the body records it."""
        while self.batch < n:
            b = self.batch
            self.batch += 1
            self.step += 1
            yield b

    # --- saving -----------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """The JSON part: format, position, generators and the user dict."""
        return {
            "format": FORMAT,
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "python_random": python_random_state(),
            "numpy_global": numpy_global_state(),
            "generators": {k: generator_state(g) for k, g in self.generators.items()},
            "extra": self.extra,
        }

    def save(self, ck: Any, *, meta: Optional[Dict[str, Any]] = None) -> Any:
        """Saves everything as one checkpoint at :attr:`step` (durable on return)."""
        np = _np()
        st = self.state_dict()
        with ck.saving(step=self.step, meta=meta) as d:
            (d / STATE_JSON).write_text(json.dumps(st, sort_keys=True))
            if self.arrays:
                with open(d / ARRAYS_NPZ, "wb") as f:
                    np.savez(f, **{k: np.asarray(v) for k, v in self.arrays.items()})
        return ck.last_saved

    # --- restoring --------------------------------------------------------------------------

    def load_state_dict(self, st: Mapping[str, Any]) -> None:
        if st.get("format") != FORMAT:
            raise CkptError(f"{STATE_JSON}: format {st.get('format')!r} is not {FORMAT}")
        missing = set(self.generators) - set(st.get("generators", {}))
        if missing:
            raise CkptError(f"{STATE_JSON}: no state for generator(s) {sorted(missing)}; hint: the checkpoint was saved without them")
        self.epoch, self.batch, self.step = int(st["epoch"]), int(st["batch"]), int(st["step"])
        set_python_random_state(st["python_random"])
        set_numpy_global_state(st["numpy_global"])
        for k, g in self.generators.items():
            set_generator_state(g, st["generators"][k])
        self.extra.clear()
        self.extra.update(st.get("extra", {}))
        self.restored_step = self.step

    def restore(self, ck: Any) -> bool:
        """Restores from the checkpoint the job was started with; False on a fresh start. Both
        files are read through the client's verifying reads (every byte checksummed before
        anything is applied), so a supervised job shows ckpt that it reads its whole restore
        through the client: under ``ckpt run --restore-check auto`` its later resumes read the
        checkpoint once (docs/protocol.md, "One read per resume")."""
        if ck.restore_point is None:
            return False
        np = _np()
        st = json.loads(ck.read_file(STATE_JSON))
        got: Dict[str, Any] = {}
        if self.arrays:
            f = ck._open_verified(ARRAYS_NPZ)
            if f is None:
                raise CkptError(f"checkpoint {ck.restore_point.path} has no {ARRAYS_NPZ}; hint: it was saved without arrays")
            with f:
                try:
                    with np.load(f, allow_pickle=False) as z:
                        got = {k: z[k] for k in self.arrays if k in z.files}
                        have = sorted(z.files)
                except InvalidCheckpoint:
                    raise
                except Exception:
                    # numpy or zipfile refused the bytes (a bad CRC, a header): if the file
                    # is damaged, say that (and report it) rather than numpy's error.
                    f.verify()
                    raise
                f.verify()  # every byte, also those np.load skipped, before anything is applied
            for k, a in self.arrays.items():
                if k not in got:
                    raise CkptError(f"{ARRAYS_NPZ} has no array {k!r} (it has {have})")
                src = got[k]
                if src.shape != np.shape(a) or src.dtype != np.asarray(a).dtype:
                    raise CkptError(f"array {k!r}: checkpoint has {src.dtype}{list(src.shape)}, the job {np.asarray(a).dtype}{list(np.shape(a))}")
        self.load_state_dict(st)
        for k, a in self.arrays.items():
            np.copyto(a, got[k])
        return True
