"""The shared test vectors (tests/vectors/README.md): the Python reader must reach exactly the
outcomes of tests/vectors/expected.json, as the Rust reader does (tests/vectors.rs)."""

import filecmp
import json
import os
import subprocess
import sys

import pytest

import ckpt
from ckpt._crc import _crc32c_py, checksum
from conftest import VECTORS, ckpt_bin, clean_env, copy_vector, run

EXPECTED = json.loads((VECTORS / "expected.json").read_text())


def test_checksum_check_values():
    want = EXPECTED["checksums"]["123456789"]
    assert f"{checksum('crc32c', b'123456789'):08x}" == want["crc32c"]
    assert f"{_crc32c_py(b'123456789'):08x}" == want["crc32c"]
    assert f"{checksum('crc32', b'123456789'):08x}" == want["crc32"]
    # Streaming equals one-shot.
    h = ckpt._crc.Hasher("crc32c")
    for part in (b"1234", b"", b"56789"):
        h.update(part)
    assert h.value == int(want["crc32c"], 16)


@pytest.mark.parametrize("name", sorted(EXPECTED["checkpoints"]))
def test_checkpoint_vector(name):
    want = EXPECTED["checkpoints"][name]
    path = VECTORS / name
    if want["ok"]:
        m = ckpt.verify_path(path)
        assert (m.seq, m.step, m.checksum) == (want["seq"], want["step"], want["checksum"])
        assert m.world_size == want.get("world_size"), m.world_size  # absent: single process
        assert {f.name: {"size": f.size, "sum": f.sum} for f in m.files} == want["files"]
    else:
        with pytest.raises(ckpt.InvalidCheckpoint) as e:
            ckpt.verify_path(path)
        assert e.value.slug == want["error"], str(e.value)
        assert want.get("mentions", "") in str(e.value), str(e.value)


@pytest.mark.parametrize("name", sorted(EXPECTED["stores"]))
def test_store_vector(name, tmp_path, capfd):
    want = EXPECTED["stores"][name]
    store = ckpt.Store(VECTORS / name)
    for seq, outcome in want["each"].items():
        if outcome == "ok":
            store.verify(int(seq))
        else:
            with pytest.raises(ckpt.InvalidCheckpoint) as e:
                store.verify(int(seq))
            assert e.value.slug == outcome
    bad = []
    found = store.latest_verified(lambda seq, e: bad.append([seq, e.slug]))
    assert found.seq == want["latest"] and found.manifest.step == want["latest_step"]
    assert bad == want["bad"]

    # A standalone client on (a copy of) this directory resumes from the same checkpoint and
    # warns about the newer bad ones.
    d = copy_vector(name, tmp_path / "store")
    ck = ckpt.Checkpointer(d)
    try:
        assert ck.restore_point.seq == want["latest"]
        assert ck.read_file("state.bin") == bytes(range(256))
        assert ck.restore_dir() == d / f"ckpt-{want['latest']:012d}"
        with pytest.raises(ckpt.CkptError, match="has no state.pickle"):
            ck.restore()
    finally:
        ck.close()
    err = capfd.readouterr().err
    for seq, slug in want["bad"]:
        assert f"checkpoint {seq} " in err and "skipped" in err, err


@pytest.mark.parametrize("name", sorted(EXPECTED["checkpoints"]))
def test_ckpt_verify_agrees(name, tmp_path):
    """`ckpt verify` on a directory holding the vector as checkpoint 1: exit 0 or 65."""
    d = tmp_path / "d"
    copy_vector(name, d / "ckpt-000000000001")
    r = run([ckpt_bin(), "verify", "--dir", d, "--json"], 30)
    want = EXPECTED["checkpoints"][name]
    assert r.returncode == (0 if want["ok"] else 65), r.stdout + r.stderr
    assert want.get("mentions", "") in r.stdout + r.stderr, r.stdout + r.stderr


def test_generator_reproduces_the_vectors_byte_for_byte(tmp_path):
    out = tmp_path / "v"
    out.mkdir()
    r = run([sys.executable, VECTORS / "make_vectors.py", out], 60)
    assert r.returncode == 0, r.stderr
    for name in list(EXPECTED["checkpoints"]) + list(EXPECTED["stores"]):
        for root, _dirs, files in os.walk(VECTORS / name):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), VECTORS)
                assert filecmp.cmp(VECTORS / rel, out / rel, shallow=False), rel
