"""Cross-compatibility with the Rust side: checkpoints written by the Python client pass
`ckpt verify`; ones written by `ckpt save` and by the Rust client are readable from Python."""

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import ckpt
from ckpt import store as store_mod
from conftest import assert_no_survivors, ckpt_bin, clean_env, run, rust_bin


def verify_cli(d):
    r = run([ckpt_bin(), "verify", "--dir", d, "--json"], 30)
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("algo", ["crc32", "crc32c"])
def test_python_checkpoints_pass_ckpt_verify(tmp_path, algo):
    d = tmp_path / "d"
    ck = ckpt.Checkpointer(d, checksum=algo)
    try:
        ck.save({"w": list(range(1000)), "s": "é"}, step=1)
        with ck.saving(step=2, meta={"epoch": 3, "note": "ünï"}) as p:
            (p / "model.bin").write_bytes(os.urandom(300_000))
            (p / "sub" / "deeper").mkdir(parents=True)
            (p / "sub" / "deeper" / "x.txt").write_text("x")
            (p / "empty").write_bytes(b"")
        assert ck.last_saved.seq == 2 and ck.last_saved.step == 2 and ck.last_saved.bytes == 300_001
    finally:
        ck.close()
    verify_cli(d)
    r = run([ckpt_bin(), "list", "--dir", d, "--json"], 30)
    rows = json.loads(r.stdout)
    assert [(x["seq"], x["step"], x["writer"]) for x in rows] == [(1, 1, "ckpt-python/0.1.0"), (2, 2, "ckpt-python/0.1.0")]
    # And the Python reader reads it back.
    ck2 = ckpt.Checkpointer(d)
    assert ck2.restore_point.seq == 2 and ck2.restore_point.manifest.meta == {"epoch": 3, "note": "ünï"}
    assert ck2.read_file("sub/deeper/x.txt") == b"x"
    assert sorted(f.name for f in ck2.restore_point.manifest.files) == ["empty", "model.bin", "sub/deeper/x.txt"]
    ck2.close()


def test_reads_what_ckpt_save_wrote(tmp_path):
    d = tmp_path / "d"
    src = tmp_path / "src"
    (src / "tree").mkdir(parents=True)
    (src / "weights.bin").write_bytes(os.urandom(5000))
    (src / "tree" / "a.txt").write_text("hello")
    r = run([ckpt_bin(), "save", "--dir", d, "--step", "5", "--meta", "k=v", src / "weights.bin", src / "tree"], 30)
    assert r.returncode == 0, r.stderr
    ck = ckpt.Checkpointer(d)
    try:
        rp = ck.restore_point
        assert rp.seq == 1 and rp.step == 5 and rp.manifest.writer.startswith("ckpt-save/") and rp.manifest.meta == {"k": "v"}
        assert rp.manifest.checksum == "crc32c"
        assert ck.read_file("weights.bin") == (src / "weights.bin").read_bytes()
        assert (ck.restore_dir() / "tree" / "a.txt").read_text() == "hello"
        with pytest.raises(ckpt.CkptError, match="restore_dir"):
            ck.restore()
        # A save from Python continues the numbering.
        assert ck.save([1], step=6).seq == 2
    finally:
        ck.close()
    verify_cli(d)


def test_reads_what_the_rust_client_wrote(tmp_path):
    d = tmp_path / "d"
    r = run(
        [ckpt_bin(), "run", "-q", "--dir", d, "--every", "100ms", "--", rust_bin("trainer"), "--steps", "200", "--step-ms", "2"],
        60,
    )
    assert r.returncode == 0, r.stderr
    assert_no_survivors(d)
    ck = ckpt.Checkpointer(d)
    try:
        rp = ck.restore_point
        assert rp is not None and rp.manifest.writer.startswith("ckpt-rust/")
        data = ck.read_file("state.postcard")  # verified against size and crc32c
        assert len(data) == rp.manifest.file("state.postcard").size > 0
        # postcard: the first field is the step as a varint.
        step, shift, i = 0, 0, 0
        while True:
            b = data[i]
            step |= (b & 0x7F) << shift
            i += 1
            shift += 7
            if not b & 0x80:
                break
        assert step == rp.step
    finally:
        ck.close()


def test_corrupt_file_is_caught_by_read_file(tmp_path):
    d = tmp_path / "d"
    ck = ckpt.Checkpointer(d)
    s = ck.save({"x": 1}, step=1)
    ck.close()
    p = s.path / "state.pickle"
    b = bytearray(p.read_bytes())
    b[-2] ^= 0xFF
    p.write_bytes(bytes(b))
    # Standalone, the reader finds no checkpoint that verifies (and says so).
    ck2 = ckpt.Checkpointer(d)
    assert ck2.restore_point is None and ck2.restore() is None
    ck2.close()


def test_concurrent_writers_get_distinct_numbers(tmp_path):
    d = tmp_path / "d"
    ck = ckpt.Checkpointer(d)
    try:
        other = ckpt.Store(d)

        def one(i):
            st = ckpt.Stage(other, "crc32")
            st.write_file("i", str(i).encode())
            return st.commit(i, "test", None).seq

        with ThreadPoolExecutor(8) as ex:
            seqs = list(ex.map(one, range(24)))
        assert sorted(seqs) == list(range(1, 25))
    finally:
        ck.close()
    assert len(verify_cli(d)) == 24


def test_rename_fallback_never_replaces(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "MANIFEST.ckpt").write_text("x")
    with pytest.raises(FileExistsError):
        store_mod.rename_noreplace(a, b)
    monkeypatch.setattr(store_mod, "_renameat2", None)
    monkeypatch.setattr(store_mod, "_renameat2_loaded", True)
    with pytest.raises(FileExistsError):
        store_mod.rename_noreplace(a, b)
    store_mod.rename_noreplace(a, tmp_path / "c")
    assert (tmp_path / "c").is_dir() and not a.exists()


def test_failed_save_publishes_nothing(tmp_path):
    d = tmp_path / "d"
    ck = ckpt.Checkpointer(d)
    try:
        with pytest.raises(RuntimeError):
            with ck.saving(step=1) as p:
                (p / "half").write_bytes(b"x")
                raise RuntimeError("boom")
        with pytest.raises(ckpt.CkptError, match="not a regular file"):
            with ck.saving(step=1) as p:
                os.symlink("/etc/passwd", p / "link")
        with pytest.raises(ckpt.ManifestError, match="reserved"):
            with ck.saving(step=1) as p:
                (p / "MANIFEST.ckpt").write_text("forged")
        assert ckpt.Store(d).list() == []
        assert os.listdir(d / ".ckpt" / "staging") == []
    finally:
        ck.close()


def test_standalone_keep_and_every(tmp_path):
    d = tmp_path / "d"
    ck = ckpt.Checkpointer(d, keep=2, every=0.001)
    try:
        import time

        for step in range(5):
            time.sleep(0.002)
            assert ck.should_checkpoint()
            ck.save(step, step=step)
        assert [s for s, _ in ckpt.Store(d).list()] == [4, 5]
        assert ckpt.Checkpointer(d).restore() == 4
    finally:
        ck.close()


def test_import_is_light():
    """`import ckpt` must be quick so that it can come first; it imports no heavy module."""
    r = run([sys.executable, "-X", "importtime", "-c", "import ckpt"], 30)
    assert r.returncode == 0, r.stderr
    total_us = [int(l.split("|")[1]) for l in r.stderr.splitlines() if l.rstrip().endswith("| ckpt")][0]
    assert total_us < 400_000, f"import ckpt took {total_us} us"
    for heavy in ("numpy", "ctypes", "asyncio", "multiprocessing"):
        assert f" {heavy}\n" not in r.stderr + "\n", heavy
