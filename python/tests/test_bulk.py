"""`Checkpointer.save` of numpy arrays as raw bytes (pickle protocol 5, out-of-band buffers in
`state.pickle.buffers`, page-aligned direct writes): exact round trips, the buffered fallback
(`CKPT_DIRECT_IO=0`), older checkpoints, corruption, and the Rust verifier agreeing. No timing
here (figures: `ckpt bench --path python`, docs/benchmarks.md)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
from pathlib import Path

import pytest

from conftest import REPO, assert_no_survivors, ckpt_bin, clean_env, run, wait_until

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



@pytest.mark.parametrize("direct", ["1", "0"])
def test_save_async_writes_the_raw_buffers_format_and_restores_bit_exact(tmp_path, monkeypatch, direct):
    """save_async writes what save writes (header + stream, the arrays raw at aligned offsets),
    byte for byte the same files for the same state; the checkpoint holds the state as it was
    at the call even though the job changes it at once; the snapshot block is reused by the next
    save_async (its stale padding zeroed)."""
    monkeypatch.setenv("CKPT_DIRECT_IO", direct)
    for k in ("CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE"):
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "ck"
    state = _state(13)
    want = pickle.loads(pickle.dumps(state, protocol=5))  # a deep copy
    with ckpt.Checkpointer(d, checksum="crc32") as ck:
        sync = ck.save(state, step=1)
        ck.save_async(state, step=2)
        # The job goes on changing its state while the save is written.
        state["big"] *= -1.0
        state["f64"][:] = 0.0
        a = ck.wait()
        assert a is not None and a.step == 2
        block = ck._snap_block
        assert block is not None
        # A smaller state next: the block is reused, the old bytes past each segment zeroed.
        small = {"w": np.full(70_001, 7, dtype=np.float32), "big": state["big"][:1000].copy()}
        ck.save_async(small, step=3)
        b = ck.wait()
        assert ck._snap_block is block or len(block) > 2 * (small["w"].nbytes + small["big"].nbytes)
    for name in ("state.pickle", "state.pickle.buffers"):
        assert (a.path / name).read_bytes() == (sync.path / name).read_bytes(), name
    assert sorted(p.name for p in a.path.iterdir()) == ["MANIFEST.ckpt", "state.pickle", "state.pickle.buffers"]
    _verify_with_rust(d)
    raw = (b.path / "state.pickle.buffers").read_bytes()
    assert raw[70_001 * 4 : -(-70_001 * 4 // 4096) * 4096] == bytes(-(70_001 * 4) % 4096)
    for path, expect in ((b.path, small), (a.path, want)):
        with ckpt.Checkpointer(d) as ck:
            assert ck.restore_point.path == path
            _same(expect, ck.restore())
        shutil.rmtree(path)  # the older one next


def test_save_async_of_a_state_without_large_buffers_is_one_plain_pickle(tmp_path, monkeypatch):
    for k in ("CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE"):
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "ck"
    state = {"small": np.arange(100), "blob": os.urandom(1 << 20), "n": 1}
    with ckpt.Checkpointer(d) as ck:
        ck.save_async(state, step=1)
        state["n"] = 2
        s = ck.wait()
    assert sorted(p.name for p in s.path.iterdir()) == ["MANIFEST.ckpt", "state.pickle"]
    got = pickle.loads((s.path / "state.pickle").read_bytes())
    assert got["n"] == 1 and got["blob"] == state["blob"] and got["small"].tolist() == list(range(100))


def test_stop_waits_for_save_async_of_arrays_under_ckpt_run(tmp_path, bg):
    """Under the real supervisor: the job starts a save_async of a 48 MiB numpy state, changes
    the arrays at once, and is stopped (SIGTERM to ckpt run) while that save may be in flight;
    should_stop() waits for it, the job exits 0, and the checkpoint it leaves restores bit-exact
    to the state at the call, in the raw-buffers format."""
    d = tmp_path / "ck"
    job = tmp_path / "job.py"
    out = tmp_path / "sum.txt"
    job.write_text(
        "import sys, time, numpy as np, ckpt\n"
        "ck = ckpt.Checkpointer()\n"
        "w = np.random.default_rng(int(sys.argv[1])).standard_normal(6_000_001)\n"
        "ck.save_async({'w': w, 'step': 1}, step=1)\n"
        "import hashlib\n"
        "open(sys.argv[2], 'w').write(hashlib.sha256(w.tobytes()).hexdigest())\n"
        "w[:] = 0.0\n"
        "print('STARTED', ck.save_pending(), flush=True)\n"
        "deadline = time.monotonic() + 60\n"
        "while not ck.should_stop():\n"
        "    assert time.monotonic() < deadline, 'no stop'\n"
        "    time.sleep(0.01)\n"
        "assert not ck.save_pending()\n"
        "print('STOPPED', flush=True)\n"
    )
    seed = int.from_bytes(os.urandom(2), "little")
    print("seed", seed)
    sup = bg([ckpt_bin(), "run", "--every", "off", "--dir", d, "--", os.sys.executable, job, seed, out], timeout=120)
    wait_until(lambda: "STARTED" in sup.stdout, 60, "the job to start its save_async")
    os.kill(sup.pid, signal.SIGTERM)
    assert sup.wait() in (0, 75), sup.stdout + sup.stderr
    assert "STOPPED" in sup.stdout, sup.stdout + sup.stderr
    assert_no_survivors(d)
    import hashlib

    with ckpt.Checkpointer(d) as ck:
        rp = ck.restore_point
        assert rp is not None and rp.manifest.file("state.pickle.buffers") is not None
        got = ck.restore()
    assert got["step"] == 1
    assert hashlib.sha256(got["w"].tobytes()).hexdigest() == out.read_text()


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


def _spy_crc32(monkeypatch, fail_at=None):
    """Replaces zlib.crc32 (what the "crc32" hasher calls) with a spy recording (thread name,
    bytes) per call; the call for ``fail_at`` bytes-checksummed-so-far raises."""
    import threading
    import zlib

    real = zlib.crc32
    calls = []

    def spy(data, crc=0):
        n = memoryview(data).nbytes
        calls.append((threading.current_thread().name, n))
        if fail_at is not None and len(calls) == fail_at:
            raise OSError("injected checksum failure")
        return real(data, crc)

    monkeypatch.setattr(zlib, "crc32", spy)
    return calls


@pytest.mark.parametrize("writer", ["write_segments", "direct_file"])
def test_bulk_write_checksum_failure_is_raised_not_hung(tmp_path, monkeypatch, writer):
    """A checksum that fails in the middle of a bulk save fails the save with that error (no
    deadlock waiting for a buffer, no result)."""
    import threading

    piece = _bulk.PIECE
    data = np.zeros(6 * piece, dtype=np.uint8)
    _spy_crc32(monkeypatch, fail_at=2)
    p = tmp_path / "f"
    out = {}

    def go():
        try:
            if writer == "write_segments":
                _bulk.write_segments(p, [memoryview(data)], "crc32")
            else:
                w = _bulk.DirectWriter(p, "crc32")
                try:
                    w.write(memoryview(data))
                    w.close()
                except BaseException:
                    w.abandon()
                    raise
            out["r"] = "returned"
        except OSError as e:
            out["r"] = str(e)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "the save hung after a checksum failure"
    assert out["r"] == "injected checksum failure", out


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


@pytest.mark.parametrize("path", ["python", "file", "torch", "saving"])
def test_ckpt_bench_measures_the_users_path(tmp_path, path):
    """`ckpt bench --path python|file|torch|saving` runs the real path (a python child saving a
    numpy array, a state dict through ckpt.torch, or its own np.save inside ck.saving(); the
    `ckpt save` command) next to dd and reports ratios (no figure is asserted)."""
    extra = ["--python", _torch_python()] if path == "torch" else []
    r = run([ckpt_bin(), "bench", "--dir", tmp_path, "--path", path, "--size", "2MiB", "--runs", "2", "--json", *extra], 240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["path"] == path and out["runs"] == 2
    assert len(out["write_ratio_to_dd_direct"]["per_round"]) == 2
    assert len(out["read_ratio_to_dd"]["per_round"]) == 2
    assert len(out["read_ratio_to_dd_direct"]["per_round"]) == 2
    assert out["recommended_every_s"] > 0
    # Every path reports the memory its save adds (for `ckpt save FILE`: that process's peak
    # RSS), and every path but `saving` (the job's own np.load) its restore's.
    assert 0 <= out["save_peak_extra_mib"] < 256, out["save_peak_extra_mib"]
    if path != "saving":
        assert out["restore_peak_extra_mib"] is not None
    if path != "file":
        assert len(out["write_ratio_to_own"]["per_round"]) == 2
    if path in ("python", "torch"):
        # The resume under the default full check (ckpt verify, then the restore) next to the
        # restore alone (the one-read resume of --restore-check client).
        full = out["resume_full_check"]
        assert len(full["read_ratio_to_dd"]["per_round"]) == 2 and len(full["read_gbps"]["per_round"]) == 2
    else:
        assert out.get("resume_full_check") is None
    if path == "torch":
        # Also the restore a training job does: into a model that has its tensor (run L).
        ex = out["restore_existing"]
        assert len(ex["read_ratio_to_dd_direct"]["per_round"]) == 2 and len(ex["read_ratio_to_dd"]["per_round"]) == 2
        assert len(ex["read_gbps"]["per_round"]) == 2 and ex["peak_extra_mib"] is not None
        # ... and under the default full check (run V).
        assert len(ex["resume_full_check"]["read_ratio_to_dd"]["per_round"]) == 2
    else:
        assert out.get("restore_existing") is None
    if path == "saving":
        # Also np.save into a plain file of the saving() directory, against dd and the job's own way.
        # ... and the resume through ck.load_array, alone and after ckpt verify (run W).
        la = out["load_array"]
        assert len(la["read_ratio_to_dd"]["per_round"]) == 2 and len(la["read_ratio_to_own"]["per_round"]) == 2
        assert len(la["resume_full_check"]["read_ratio_to_dd"]["per_round"]) == 2
        pl = out["saving_plain"]
        assert len(pl["write_ratio_to_dd_direct"]["per_round"]) == 2
        assert len(pl["write_ratio_to_own"]["per_round"]) == 2 and pl["peak_extra_mib"] is not None
        assert len(pl["read_ratio_to_own"]["per_round"]) == 2
    else:
        assert out.get("saving_plain") is None and out.get("load_array") is None
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


@pytest.mark.parametrize("direct", ["1", "0"])
def test_direct_file_in_saving_writes_a_librarys_stream_exactly(tmp_path, monkeypatch, direct):
    """`ck.direct_file(name)` inside `ck.saving()`: np.save's stream (several pieces plus a
    partial tail, odd size) lands byte for byte, with the size and checksum the commit records
    (the Rust verifier agrees), without the commit reading it back; outside a saving block it
    is refused; a failing serializer publishes nothing."""
    monkeypatch.setenv("CKPT_DIRECT_IO", direct)
    for k in ("CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE"):
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "ck"
    a = np.random.default_rng(17).standard_normal(_bulk.PIECE // 4 + 12_345)  # 2 pieces + a tail
    reads = []
    with ckpt.Checkpointer(d, checksum="crc32") as ck:
        with pytest.raises(ckpt.CkptError):
            ck.direct_file("x.npy")
        with ck.saving(step=4) as sd:
            with ck.direct_file("w.npy") as f:
                np.save(f, a)
                assert f.tell() > a.nbytes
            real_read = os.read
            monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))
        monkeypatch.setattr(os, "read", real_read)
        saved = ck.last_saved
        with pytest.raises(RuntimeError):
            with ck.saving(step=5):
                with ck.direct_file("w.npy") as f:
                    f.write(b"x" * 100)
                    raise RuntimeError("serializer failed")
    assert reads == [], "the commit read the file back"
    assert saved.step == 4 and not sd.exists()
    want = tmp_path / "want.npy"
    np.save(want, a)
    assert (saved.path / "w.npy").read_bytes() == want.read_bytes()
    m = ckpt.store.read_manifest(saved.path)
    assert m.file("w.npy").size == want.stat().st_size
    assert m.file("w.npy").sum == ckpt._crc.checksum("crc32", want.read_bytes())
    _verify_with_rust(d)
    assert [p.name for p in d.iterdir() if p.name.startswith("ckpt-")] == [saved.path.name]


def _torch_python() -> str:
    for p in (os.environ.get("CKPT_TORCH_PYTHON"), "/opt/ckpt-torch/bin/python"):
        if p and os.path.exists(p):
            r = run([p, "-c", "import torch, numpy"], 120)
            if r.returncode == 0:
                return p
    pytest.skip("no Python with torch: set CKPT_TORCH_PYTHON or run scripts/setup (installs /opt/ckpt-torch)")


def test_torch_train_state_save_goes_through_the_direct_writer(tmp_path):
    """`ckpt.torch.TrainState.save` writes `train_state.pt` with `ck.direct_file` (torch.save's
    stream past the page cache, torch's own zip CRC-32 pass off meanwhile and put back): it
    loads with the safe loader, bit-exact (float32, bfloat16,
    int64, a tied weight stays tied), the manifest's checksum is right (`ckpt verify`), and
    `TrainState.restore` brings it back."""
    py = _torch_python()
    d = tmp_path / "ck"
    job = (
        "import sys, os, torch, ckpt, ckpt.torch as ckt\n"
        "from ckpt import _bulk\n"
        "calls = []\n"
        "real = _bulk.open_direct\n"
        "_bulk.open_direct = lambda st, n: calls.append(n) or real(st, n)\n"
        "torch.manual_seed(int(sys.argv[2]))\n"
        "m = torch.nn.Sequential(torch.nn.Linear(1024, 2500), torch.nn.Linear(2500, 1024))\n"
        "m.register_buffer('bf', torch.randn(3001, 7).to(torch.bfloat16))\n"
        "m.register_buffer('idx', torch.arange(100_003))\n"
        "m.tied = m[0].weight\n"
        "opt = torch.optim.Adam(m.parameters())\n"
        "m(torch.randn(4, 1024)).sum().backward(); opt.step()\n"
        "ck = ckpt.Checkpointer(sys.argv[1], checksum='crc32')\n"
        "ts = ckt.TrainState(models={'m': m}, optimizers={'opt': opt})\n"
        "ts.step = 9\n"
        "s = ts.save(ck)\n"
        "assert calls == ['train_state.pt'], calls\n"
        "from torch.utils.serialization import config as tcfg\n"
        "assert tcfg.save.compute_crc32 is True, 'the zip CRC setting was not put back'\n"
        "st = torch.load(s.path / 'train_state.pt', weights_only=True)\n"
        "want = m.state_dict()\n"
        "got = st['objects']['model/m']\n"
        "assert got.keys() == want.keys()\n"
        "for k in want:\n"
        "    assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k\n"
        "assert got['tied'].data_ptr() == got['0.weight'].data_ptr()\n"
        "m2 = torch.nn.Sequential(torch.nn.Linear(1024, 2500), torch.nn.Linear(2500, 1024))\n"
        "m2.register_buffer('bf', torch.zeros(3001, 7, dtype=torch.bfloat16))\n"
        "m2.register_buffer('idx', torch.zeros(100_003, dtype=torch.int64))\n"
        "m2.tied = m2[0].weight\n"
        "opt2 = torch.optim.Adam(m2.parameters())\n"
        "ts2 = ckt.TrainState(models={'m': m2}, optimizers={'opt': opt2})\n"
        "assert ts2.restore(ckpt.Checkpointer(sys.argv[1])) and ts2.step == 9\n"
        "for k, v in m.state_dict().items():\n"
        "    assert torch.equal(v, m2.state_dict()[k]), k\n"
        "assert opt.state_dict()['state'][0]['exp_avg'].equal(opt2.state_dict()['state'][0]['exp_avg'])\n"
        "print('TORCH-OK', (s.path / 'train_state.pt').stat().st_size)\n"
    )
    seed = int.from_bytes(os.urandom(2), "little")
    print("seed", seed)
    r = run([py, "-c", job, d, seed], 180)
    assert r.returncode == 0 and "TORCH-OK" in r.stdout, r.stdout + r.stderr
    assert int(r.stdout.split()[-1]) > 2 * _bulk.PIECE  # several direct pieces and a tail
    _verify_with_rust(d)


def test_bench_npload_recipe_runs(tmp_path):
    """docs/benchmarks.md run R's recipe (`scripts/bench-npload`) as written, at 8 MiB and one
    round: it saves the .npy as a checkpoint, times the three variants and prints the medians
    (no figure asserted), and removes its directory."""
    d = tmp_path / "w"
    r = run(["bash", REPO / "scripts/bench-npload", "--mib", "8", "--rounds", "1", "--dir", d, "--python", sys.executable],
            240, env={**clean_env(), "CKPT_BIN": str(ckpt_bin())})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "round 1" in r.stdout and "own=" in r.stdout and "resume=" in r.stdout and "resume_4k=" in r.stdout
    assert "medians (s): own np.load" in r.stdout and "per-round own / variant" in r.stdout, r.stdout
    assert not d.exists()


@pytest.mark.parametrize("job", ["python", "torch"])
def test_bench_resume_recipe_runs(tmp_path, job):
    """docs/benchmarks.md run X's recipe (`scripts/bench-resume`) as written, at 8 MiB and one
    round, for a numpy job and a torch model: a whole `ckpt run` resume under the default
    (auto, after the job's client vouched: one read) and under `--restore-check full`, beside a
    cold dd; the script itself checks each launch's check (no figure asserted) and removes its
    directory."""
    d = tmp_path / "r"
    py = sys.executable if job == "python" else _torch_python()
    r = run(["bash", REPO / "scripts/bench-resume", "--job", job, "--mib", "8", "--rounds", "1", "--dir", d,
             "--python", py], 240, env={**clean_env(), "CKPT_BIN": str(ckpt_bin())})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "round 1" in r.stdout and "dd=" in r.stdout and "full=" in r.stdout and "auto=" in r.stdout, r.stdout
    assert "per-round dd / auto" in r.stdout and "launch checks: auto -> client, full -> full" in r.stdout, r.stdout
    assert not d.exists()
