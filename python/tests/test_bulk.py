"""`Checkpointer.save` of numpy arrays as raw bytes (pickle protocol 5, out-of-band buffers in
`state.pickle.buffers`, page-aligned direct writes): exact round trips, the buffered fallback
(`CKPT_DIRECT_IO=0`), older checkpoints, corruption, and the Rust verifier agreeing. No timing
here (figures: `ckpt bench --path python`, docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import pytest

from conftest import ckpt_bin, clean_env, run

np = pytest.importorskip("numpy")

import ckpt  # noqa: E402
from ckpt import _bulk  # noqa: E402
from ckpt.errors import InvalidCheckpoint  # noqa: E402
from ckpt.store import Stage, Store  # noqa: E402


def _state(seed: int):
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((1500, 2999)).astype(np.float32)  # 17.99 MB: > 2 pieces, odd size
    return {
        "big": big,
        "f64": rng.standard_normal(12_345),  # 98,760 bytes: out of band, not a page multiple
        "fortran": np.asfortranarray(rng.integers(0, 1 << 60, (301, 257), dtype=np.int64)),
        "strided": big[::3, 1::2],  # not contiguous: in the stream
        "bool": rng.random((70_001,)) > 0.5,
        "i16be": rng.integers(-30_000, 30_000, 50_003).astype(">i2"),
        "c64": (rng.standard_normal(9_000) + 1j).astype(np.complex64),
        "empty": np.zeros((0, 5), dtype=np.float16),
        "small": np.arange(7, dtype=np.uint8),
        "objects": np.array([1, "two", None, {"k": [3]}], dtype=object),
        "scalar": np.float64(2.5),
        "nested": [{"w": rng.standard_normal((256, 256)).astype(np.float32)}, ("x", 3)],
        "step": 41,
    }


def _same(a, b, where="state"):
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray), where
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype, a.shape, b.shape)
        if a.dtype == object:
            assert a.tolist() == b.tolist(), where
        else:
            assert a.tobytes() == b.tobytes(), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b and type(a) is type(b), where


def _verify_with_rust(d: Path) -> None:
    r = run([ckpt_bin(), "verify", "--dir", d], 60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("direct", ["1", "0"])
def test_numpy_state_round_trips_bit_exact(tmp_path, monkeypatch, direct):
    monkeypatch.setenv("CKPT_DIRECT_IO", direct)
    for k in ("CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE"):
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "ck"
    state = _state(7)
    with ckpt.Checkpointer(d, checksum="crc32") as ck:
        saved = ck.save(state, step=3)
    names = sorted(p.name for p in saved.path.iterdir())
    assert names == ["MANIFEST.ckpt", "state.pickle", "state.pickle.buffers"]
    # The arrays are raw bytes, not in the pickle stream.
    assert (saved.path / "state.pickle").stat().st_size < 5_000_000
    assert (saved.path / "state.pickle.buffers").stat().st_size % 4096 == 0
    _verify_with_rust(d)
    with ckpt.Checkpointer(d) as ck:
        got = ck.restore()
    _same(state, got)
    # Zero-copy views of page-aligned memory, writable like the originals.
    assert got["big"].flags.writeable and got["big"].ctypes.data % 4096 == 0
    got["big"][0, 0] = 1.0
    assert got["fortran"].flags.f_contiguous


def test_state_without_large_buffers_is_one_plain_pickle(tmp_path, monkeypatch):
    """Object arrays and small arrays go through plain pickle: one file, as before."""
    for k in ("CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE"):
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "ck"
    state = {"objects": np.array([object(), 1] * 40_000, dtype=object)[1::2], "small": np.arange(100)}
    with ckpt.Checkpointer(d) as ck:
        saved = ck.save(state)
    assert sorted(p.name for p in saved.path.iterdir()) == ["MANIFEST.ckpt", "state.pickle"]
    assert pickle.loads((saved.path / "state.pickle").read_bytes())["small"].tolist() == list(range(100))
    with ckpt.Checkpointer(d) as ck:
        got = ck.restore()
    assert got["objects"].tolist() == [1] * 40_000 and got["small"].tolist() == list(range(100))


def test_an_old_single_pickle_checkpoint_still_restores(tmp_path, monkeypatch):
    for k in ("CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE"):
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "ck"
    store = Store(d)
    store.create()
    state = _state(3)
    st = Stage(store, "crc32")
    # Exactly what save() wrote before the raw-buffers format.
    with st.open(ckpt.STATE_FILE) as f:
        pickle.dump(state, f, protocol=pickle.HIGHEST_PROTOCOL)
    st.commit(9, "ckpt-python/0.1.0")
    with ckpt.Checkpointer(d) as ck:
        _same(state, ck.restore())
        # ...and save_async still writes that format, which restores the same way.
        ck.save_async(state, step=10)
        ck.wait()
    with ckpt.Checkpointer(d) as ck:
        assert ck.restore_point.step == 10
        assert ck.restore_point.manifest.file("state.pickle.buffers") is None
        _same(state, ck.restore())


def test_corrupt_or_truncated_buffers_are_refused(tmp_path, monkeypatch):
    for k in ("CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE"):
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "ck"
    with ckpt.Checkpointer(d) as ck:
        saved = ck.save({"w": np.arange(3_000_000, dtype=np.float32)})
    p = saved.path / "state.pickle.buffers"
    data = bytearray(p.read_bytes())
    m = ckpt.store.read_manifest(saved.path)
    entry = m.file("state.pickle.buffers")
    for bad in (bytes(data[:-4096]), bytes(data[:100]) + bytes([data[100] ^ 1]) + bytes(data[101:])):
        os.chmod(p, 0o600)
        p.write_bytes(bad)
        fd = os.open(p, os.O_RDONLY)
        try:
            with pytest.raises(InvalidCheckpoint) as e:
                _bulk.read_segments(fd, entry.name, entry.size, entry.sum, m.checksum)
            assert e.value.slug in ("size-mismatch", "checksum-mismatch")
        finally:
            os.close(fd)
    # A standalone client skips the bad checkpoint (nothing older: a fresh start).
    with ckpt.Checkpointer(d) as ck:
        assert ck.restore() is None


def test_write_segments_layout_at_odd_sizes(tmp_path, monkeypatch):
    """Every segment at a 4096-aligned offset, zero padding between, at sizes around pages and
    pieces; the checksum covers exactly the file's bytes."""
    monkeypatch.setenv("CKPT_DIRECT_IO", "1")
    piece = _bulk.PIECE
    sizes = [1, 4095, 4096, 4097, piece - 1, piece, piece + 4096 + 3, 0, 70_000]
    rng = np.random.default_rng(5)
    views = [memoryview(rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for n in sizes]
    p = tmp_path / "f"
    size, sm, segs = _bulk.write_segments(p, views, "crc32")
    raw = p.read_bytes()
    assert len(raw) == size and size % 4096 == 0
    assert sm == ckpt._crc.checksum("crc32", raw)
    pos = 0
    for (off, n), v in zip(segs, views):
        assert off == pos and off % 4096 == 0 and n == len(v)
        assert raw[off : off + n] == v.tobytes()
        assert raw[off + n : -(-(off + n) // 4096) * 4096] == bytes(-(off + n) % 4096)
        pos = -(-(off + n) // 4096) * 4096


def test_saved_in_a_job_under_ckpt_run_and_resumed(tmp_path):
    """Under the real supervisor: a job saves a numpy state, is killed, and the relaunched job
    gets it back bit-exact (the supervisor verified the raw-buffers checkpoint)."""
    d = tmp_path / "ck"
    job = tmp_path / "job.py"
    job.write_text(
        "import os, sys, numpy as np, ckpt\n"
        "ck = ckpt.Checkpointer()\n"
        "w = np.random.default_rng(11).standard_normal(3_000_001)\n"
        "s = ck.restore()\n"
        "if s is None:\n"
        "    ck.save({'w': w, 'step': 1}, step=1)\n"
        "    os._exit(3)\n"
        "assert s['step'] == 1 and s['w'].tobytes() == w.tobytes(), 'restored state differs'\n"
        "print('RESUMED-OK')\n"
    )
    r = run([ckpt_bin(), "run", "-q", "--every", "off", "--backoff", "0s..0s", "--dir", d, "--",
             os.sys.executable, job], 120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RESUMED-OK" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("path", ["python", "file"])
def test_ckpt_bench_measures_the_users_path(tmp_path, path):
    """`ckpt bench --path python|file` runs the real path (a python3 child saving a numpy
    array; the `ckpt save` command) next to dd and reports ratios (no figure is asserted)."""
    r = run([ckpt_bin(), "bench", "--dir", tmp_path, "--path", path, "--size", "2MiB", "--runs", "2", "--json"], 240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["path"] == path and out["runs"] == 2
    assert len(out["write_ratio_to_dd_direct"]["per_round"]) == 2
    assert len(out["read_ratio_to_dd"]["per_round"]) == 2
    assert out["recommended_every_s"] > 0
    if path == "python":
        assert len(out["write_ratio_to_own"]["per_round"]) == 2
        assert out["save_peak_extra_mib"] is not None
    assert list(tmp_path.iterdir()) == []  # its work directory is removed


@pytest.mark.parametrize("direct", ["1", "0"])
def test_ckpt_direct_io_0_keeps_every_bulk_write_and_read_in_the_page_cache(tmp_path, monkeypatch, direct):
    monkeypatch.setenv("CKPT_DIRECT_IO", direct)
    calls = []
    real = _bulk._set_direct

    def spy(fd, on):
        calls.append(on)
        return real(fd, on)

    monkeypatch.setattr(_bulk, "_set_direct", spy)
    data = np.random.default_rng(2).integers(0, 255, _bulk.PIECE * 2 + 5, dtype=np.uint8)
    p = tmp_path / "f"
    size, sm, segs = _bulk.write_segments(p, [memoryview(data)], "crc32")
    fd = os.open(p, os.O_RDONLY)
    try:
        got = _bulk.read_segments(fd, "f", size, sm, "crc32")
    finally:
        os.close(fd)
    assert got[: data.nbytes].tobytes() == data.tobytes()
    if direct == "0":
        assert True not in calls
    else:
        # Both the write and the (cold: written past the cache) read asked for O_DIRECT.
        assert calls.count(True) == 2, calls
