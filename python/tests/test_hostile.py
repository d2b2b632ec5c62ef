"""Hostile checkpoint directories (issue 16), as tests/hostile.rs for the Rust store: a FIFO
or symlink planted where the client reads never hangs it, and sequence number 2**64-1 never
wraps."""

import os

import pytest

from ckpt import CkptError, InvalidCheckpoint
from ckpt.store import NotRegularFile, Stage, Store, read_manifest


def saved(tmp_path, n=2):
    st = Store(tmp_path / "d")
    st.create()
    for i in range(n):
        s = Stage(st, "crc32c")
        s.write_file("a", b"x%d" % i)
        s.commit(i, "test")
    return st


def test_fifos_are_refused_without_blocking(tmp_path):
    st = saved(tmp_path)
    m = st.path_of(2) / "MANIFEST.ckpt"
    os.remove(m)
    os.mkfifo(m)
    with pytest.raises(InvalidCheckpoint) as e:
        read_manifest(st.path_of(2))
    assert e.value.slug == "not-regular"
    a = st.path_of(1) / "a"
    os.remove(a)
    os.mkfifo(a)
    with pytest.raises(InvalidCheckpoint) as e:
        st.verify(1)
    assert e.value.slug == "not-regular"
    os.mkfifo(st.private / "tags.json")
    with pytest.raises(NotRegularFile):
        st.tagged()


def test_sequence_number_max_never_wraps(tmp_path):
    st = saved(tmp_path, 1)
    top = (1 << 64) - 1
    os.makedirs(st.dir / "quarantine" / f"ckpt-{top}.bad.tok")
    assert st.next_seq() == 2
    os.makedirs(st.dir / f"ckpt-{top}")
    with pytest.raises(CkptError, match="largest possible number"):
        st.next_seq()
