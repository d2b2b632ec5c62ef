"""The Python restore paths of issue 19: the checksum of a restore computed piece by piece on
helper threads and combined (`_crc.combine`, `_bulk._PieceSums`), and `ckpt.torch`'s
`TrainState.restore` reading `train_state.pt` through `_bulk.VerifiedFile` (past the page
cache when cold: read whole into memory of its own, or into the objects' own tensors as it is
read, run V; the whole file checked before the state is used, and a state that took damaged
bytes refusing to be saved).
Bit-exact at odd sizes, damage in every piece refused, the cache path (`CKPT_DIRECT_IO=0`)
and a file system that refuses `O_DIRECT` (ramfs, as root) falling back. No timing here
(docs/benchmarks.md, run J)."""

from __future__ import annotations

import errno
import os
import random
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from conftest import run

import ckpt  # noqa: E402
from ckpt import _bulk, _crc  # noqa: E402
from _pagecache import uncache  # noqa: E402
from ckpt.errors import InvalidCheckpoint  # noqa: E402

SEED = int(os.environ.get("CKPT_TEST_SEED", random.randrange(1 << 30)))
print(f"seed {SEED} (CKPT_TEST_SEED)")


@pytest.mark.parametrize("algo", ["crc32", "crc32c"])
def test_combined_piece_checksums_equal_the_whole_files(algo):
    rng = random.Random(SEED)
    for _ in range(200):
        a = rng.randbytes(rng.randrange(0, 5000))
        b = rng.randbytes(rng.randrange(0, 5000))
        assert _crc.combine(algo, _crc.checksum(algo, a), _crc.checksum(algo, b), len(b)) == _crc.checksum(algo, a + b)
    # Known values: zlib's crc32 of "123456789" is cbf43926, CRC-32C's e3069283.
    want = {"crc32": 0xCBF43926, "crc32c": 0xE3069283}[algo]
    assert _crc.combine(algo, _crc.checksum(algo, b"1234"), _crc.checksum(algo, b"56789"), 5) == want


def _write(p: Path, data: bytes) -> None:
    if p.exists():
        os.chmod(p, 0o600)
    p.write_bytes(data)
    uncache(p)


def _algos():
    return ["crc32"] + (["crc32c"] if _crc.crc32c_accelerated() else [])


@pytest.mark.parametrize("algo", ["crc32", "crc32c"])
def test_combine_is_exact_for_pieces_of_512_mib_and_more(algo):
    """The combining power table grows with the length: CRC-32C's squares of x repeat every 31
    (not 32, as zlib's table assumes for CRC-32), so a 512 MiB piece got a wrong sum (found by
    `scripts/bench`: a 1 GiB member checked in two parts did not verify)."""
    import mmap

    if algo == "crc32c" and not _crc.crc32c_accelerated():
        pytest.skip("CRC-32C of 512 MiB in pure Python is too slow for a test")
    head = random.Random(SEED).randbytes(1000)
    for n in [(1 << 29) + 4097, (1 << 30) + 3]:
        zeros = mmap.mmap(-1, n)  # the zero page: no memory used
        try:
            whole = _crc.Hasher(algo)
            whole.update(head)
            whole.update(zeros)
            got = _crc.combine(algo, _crc.checksum(algo, head), _crc.checksum(algo, zeros), n)
            assert got == whole.value, (algo, n)
        finally:
            zeros.close()


@pytest.mark.parametrize("algo", ["crc32", "crc32c"])
def test_verify_checksums_a_member_in_parts_exactly_and_sees_every_change(tmp_path, algo):
    """`verify_path`'s reader (one contiguous part per thread, sums combined): every split and
    read size gives the whole file's checksum; a changed byte in any part, a member that ends
    early and one that grew are all seen."""
    from ckpt.store import _checksum_parts

    rng = random.Random(SEED)
    for size in [0, 1, 4095, 4096, 65_537, 300_001]:
        data = rng.randbytes(size)
        p = tmp_path / f"m{size}"
        p.write_bytes(data)
        fd = os.open(p, os.O_RDONLY)
        try:
            for parts in range(1, 5):
                for read in [1, 4096, 65_536]:
                    if read == 1 and size > 5000:
                        continue
                    n, h = _checksum_parts(fd, size, algo, parts, read)
                    assert (n, h.value) == (size, _crc.checksum(algo, data)), (size, parts, read)
        finally:
            os.close(fd)
        for at in ([0, size // 3, size // 2, size - 1] if size > 1 else []):
            bad = bytearray(data)
            bad[at] ^= 0x10
            p.write_bytes(bad)
            fd = os.open(p, os.O_RDONLY)
            try:
                for parts in range(1, 5):
                    assert _checksum_parts(fd, size, algo, parts, 4096)[1].value != _crc.checksum(algo, data), (at, parts)
            finally:
                os.close(fd)
    p = tmp_path / "short"
    p.write_bytes(b"x" * 100_000)
    fd = os.open(p, os.O_RDONLY)
    try:
        for parts in range(1, 5):
            assert _checksum_parts(fd, 150_000, algo, parts, 4096)[0] == 100_000  # ended early
            assert _checksum_parts(fd, 60_000, algo, parts, 4096)[0] == 100_000  # grew
    finally:
        os.close(fd)


def test_verify_path_reads_a_large_member_in_parts_and_refuses_damage(tmp_path, monkeypatch):
    """A member of twice the part minimum is read in parts (on a machine with two CPUs or more and
    a checksum outside the GIL), and `verify_path` still refuses a flipped byte in its second half
    and a byte appended."""
    from ckpt import store as st

    rng = random.Random(SEED)
    data = rng.randbytes(2 * st._VERIFY_PART_MIN + 12_345)
    ck = ckpt.Checkpointer(tmp_path / "d", checksum="crc32")
    with ck.saving() as d:
        (d / "big").write_bytes(data)
    path = ck.last_saved.path
    seen = []
    real = st._checksum_parts
    monkeypatch.setattr(st, "_checksum_parts", lambda fd, size, algo, parts, read: seen.append(parts) or real(fd, size, algo, parts, read))
    assert ckpt.verify_path(path).seq == ck.last_saved.seq
    if (os.cpu_count() or 1) > 1:
        assert seen == [2], seen
    bad = bytearray(data)
    bad[-5000] ^= 1
    (path / "big").write_bytes(bad)
    with pytest.raises(InvalidCheckpoint) as e:
        ckpt.verify_path(path)
    assert e.value.slug == "checksum-mismatch"
    (path / "big").write_bytes(data + b"x")
    with pytest.raises(InvalidCheckpoint) as e:
        ckpt.verify_path(path)
    assert e.value.slug == "size-mismatch"


@pytest.mark.parametrize("direct", ["1", "0"])
def test_read_segments_hashes_pieces_in_parallel_exactly_and_refuses_damage_in_any(tmp_path, monkeypatch, direct):
    """`read_segments` (the Python restore of numpy arrays) at sizes around the piece size:
    bit-exact, and a flipped bit in any piece, a cut or a grown file refused."""
    monkeypatch.setenv("CKPT_DIRECT_IO", direct)
    rng = random.Random(SEED + 1)
    P = _bulk.PIECE
    p = tmp_path / "f"
    for algo in _algos():
        for size in (P, 2 * P - 1, 3 * P + 4096 + 5, 4 * P + 1):
            data = rng.randbytes(size)
            want = _crc.checksum(algo, data)
            _write(p, data)
            fd = os.open(p, os.O_RDONLY)
            try:
                assert _bulk.read_segments(fd, "f", size, want, algo).tobytes() == data, (algo, size)
                for k in range(-(-size // P)):
                    at = min(size - 1, k * P + rng.randrange(P))
                    bad = bytearray(data)
                    bad[at] ^= 0x04
                    _write(p, bytes(bad))
                    with pytest.raises(InvalidCheckpoint) as e:
                        _bulk.read_segments(fd, "f", size, want, algo)
                    assert e.value.slug == "checksum-mismatch", (algo, size, at)
                for cut in sorted({min(P, size - 1), size - 1, size + 1}):
                    _write(p, (data + b"\0")[:cut])
                    with pytest.raises(InvalidCheckpoint) as e:
                        _bulk.read_segments(fd, "f", size, want, algo)
                    assert e.value.slug == "size-mismatch", (algo, size, cut)
            finally:
                os.close(fd)


def _verified(p: Path, size: int, sm: int, algo: str) -> "_bulk.VerifiedFile":
    return _bulk.VerifiedFile(os.open(p, os.O_RDONLY), p.name, size, sm, algo)


@pytest.mark.parametrize("direct", ["1", "0"])
def test_verified_file_reads_exactly_and_verify_refuses_damage_anywhere(tmp_path, monkeypatch, direct):
    """`VerifiedFile` as a loader uses it: small reads anywhere (also overlapping, as a zip
    reader's), large reads at unaligned offsets into unaligned memory, bytes never read;
    `verify()` passes on the exact file and refuses a flipped bit in any piece, in a small read,
    in bytes the loader skipped, and a file of another size."""
    monkeypatch.setenv("CKPT_DIRECT_IO", direct)
    rng = random.Random(SEED + 2)
    P = _bulk.PIECE
    p = tmp_path / "f"
    for size in (2 * P + 3 * 4096 + 5, 3 * P + 1, P + 100):
        algo = rng.choice(_algos())
        data = rng.randbytes(size)
        sm = _crc.checksum(algo, data)
        # (offset, length): a big read at an odd offset, small reads, an overlap, a gap at the end.
        big_at = 4096 * 3 + 37
        big_n = size - big_at - 1000
        reads = [(0, 4), (size - 22, 22), (size - 3000, 2500), (100, 30), (90, 64), (big_at, big_n)]

        def load(f):
            out = {}
            for off, n in reads:
                f.seek(off)
                buf = bytearray(n + 1)[1:] if n >= P else bytearray(n)  # a big one at +1 (memoryview of a bytearray)
                view = memoryview(buf)
                got = f.readinto(view)
                assert got == n
                out[off] = bytes(view)
            return out

        _write(p, data)
        before = 0
        with _verified(p, size, sm, algo) as f:
            got = load(f)
            f.verify()
            before = f.direct_reads
        for off, n in reads:
            assert got[off] == data[off : off + n], (size, off, n)
        assert before == (1 if direct == "1" and big_n >= P else 0), (size, before)
        # Damage: in every piece of the big read, in a small read, in never-read bytes (the last 1000 but 22).
        spots = [big_at + k * P + rng.randrange(min(P, big_n - k * P)) for k in range(-(-big_n // P))]
        spots += [101, size - 500, big_at + big_n + 10]
        for at in spots:
            bad = bytearray(data)
            bad[at] ^= 0x40
            _write(p, bytes(bad))
            with _verified(p, size, sm, algo) as f:
                load(f)
                with pytest.raises(InvalidCheckpoint) as e:
                    f.verify()
                assert e.value.slug == "checksum-mismatch", (size, at)
        _write(p, data + b"x")
        with pytest.raises(InvalidCheckpoint) as e:
            _verified(p, size, sm, algo)
        assert e.value.slug == "size-mismatch"


@pytest.mark.parametrize("how", ["cold", "cached", "no-direct", "direct-refused"])
def test_scatter_verified_copies_every_span_exactly_once_read_and_refuses_damage_anywhere(tmp_path, monkeypatch, how):
    """`VerifiedFile.scatter_verified` (run V: the file read once, each span copied to its
    destination as it arrives): spans at odd offsets crossing pieces, one span to two
    destinations (a tied weight), bytes nobody takes (zip headers); exact on the intact file,
    past the page cache when cold, from the cache when cached, with `CKPT_DIRECT_IO=0`, and
    when `O_DIRECT` is refused on the first read; a flipped bit in any piece (taken or not) or
    a file of another length is refused (the destinations are then undefined)."""
    import ctypes

    monkeypatch.setenv("CKPT_DIRECT_IO", "0" if how == "no-direct" else "1")
    rng = random.Random(SEED + 5)
    P = _bulk.DIRECT_PIECE
    p = tmp_path / "f"
    size = 3 * P + 4096 * 5 + 13
    algo = rng.choice(_algos())
    data = rng.randbytes(size)
    sm = _crc.checksum(algo, data)
    spans = [(64, P + 3), (P + 3 + 64, 1000), (2 * P - 5, P + 9), (3 * P + 100, 4096 * 4), (64, P + 3), (size - 7, 7)]
    bufs = [ctypes.create_string_buffer(n) for _, n in spans]
    dests = [(off, n, ctypes.addressof(b)) for (off, n), b in zip(spans, bufs)]
    refused = []
    if how == "direct-refused":
        real = os.preadv

        def preadv(fd, bs, off, *flags):
            if _is_direct(fd):
                refused.append(off)
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, bs, off, *flags)

        monkeypatch.setattr(os, "preadv", preadv)
    _write(p, data)
    if how != "cached":
        uncache(p)
    else:
        p.read_bytes()
    with _verified(p, size, sm, algo) as f:
        assert f.scatter_verified(dests) is True
        assert f.scattered and f.direct_reads == (1 if how == "cold" else 0), (how, f.direct_reads)
    for (off, n), b in zip(spans, bufs):
        assert b.raw == data[off : off + n], (how, off, n)
    assert bool(refused) == (how == "direct-refused")
    spots = [k * P + rng.randrange(min(P, size - k * P)) for k in range(-(-size // P))] + [10, size - 1]
    for at in spots:
        bad = bytearray(data)
        bad[at] ^= 0x02
        _write(p, bytes(bad))
        if how != "cached":
            uncache(p)
        with _verified(p, size, sm, algo) as f:
            with pytest.raises(InvalidCheckpoint) as e:
                f.scatter_verified(dests)
            assert e.value.slug == "checksum-mismatch", (how, at)
    # Shorter than the manifest says once opened (cut while read): the size check names it.
    _write(p, data)
    with _verified(p, size, sm, algo) as f:
        os.truncate(p, size - 5000)
        with pytest.raises(InvalidCheckpoint) as e:
            f.scatter_verified(dests[:2])
        assert e.value.slug == "size-mismatch", e.value
    with _verified(p, size - 5000, sm, algo) as f:
        with pytest.raises(InvalidCheckpoint) as e:
            f.scatter_verified([(size - 100, 10, ctypes.addressof(bufs[0]))])
        assert "has no bytes" in str(e.value)


def test_verified_file_falls_back_when_a_read_refuses_o_direct(tmp_path, monkeypatch):
    """`O_DIRECT` accepted at open but its first read refused with EINVAL (some FUSE and
    network file systems): the large read goes through the cache, exact and verified."""
    P = _bulk.PIECE
    data = random.Random(SEED + 3).randbytes(2 * P + 777)
    p = tmp_path / "f"
    _write(p, data)
    real = os.preadv
    refused = []

    def preadv(fd, bufs, off, *flags):
        if _is_direct(fd):
            refused.append(off)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, off, *flags)

    monkeypatch.setattr(os, "preadv", preadv)
    with _verified(p, len(data), zlib.crc32(data), "crc32") as f:
        buf = bytearray(len(data))
        assert f.readinto(buf) == len(data)
        f.verify()
        assert f.direct_reads == 0
    assert bytes(buf) == data and refused, refused


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _ramfs(tmp_path: Path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("mounting ramfs needs root")
    m = tmp_path / "ramfs"
    m.mkdir()
    r = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(m)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount ramfs: {r.stderr.strip()}")
    return m


def _torch_python() -> str:
    for p in (os.environ.get("CKPT_TORCH_PYTHON"), "/opt/ckpt-torch/bin/python"):
        if p and os.path.exists(p):
            r = run([p, "-c", "import torch, numpy"], 120)
            if r.returncode == 0:
                return p
    pytest.skip("no Python with torch: set CKPT_TORCH_PYTHON or run scripts/setup (installs /opt/ckpt-torch)")


# The torch job: saves a TrainState (tensors of several pieces at odd sizes, bfloat16, int64,
# a tied weight, optimizer state), then restores it into a fresh model in three ways.
TORCH_JOB = r"""
import os, sys, torch, ckpt, ckpt.torch as ckt
from ckpt import _bulk
from ckpt.errors import InvalidCheckpoint
d, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
P = _bulk.PIECE
def model():
    m = torch.nn.Sequential(torch.nn.Linear(1023, 4099), torch.nn.Linear(4099, 1021))  # 16.8 MB: 3 pieces, odd
    m.register_buffer("bf", torch.zeros(3001, 7, dtype=torch.bfloat16))
    m.register_buffer("big", torch.zeros(P // 4 * 2 + 1001))  # 2 pieces + 4004 bytes
    m.register_buffer("idx", torch.zeros(100_003, dtype=torch.int64))
    m.tied = m[0].weight
    return m
from _pagecache import uncache
opened = []
real = _bulk.VerifiedFile
class Spy(real):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        opened.append(self)
_bulk.VerifiedFile = Spy
if mode == "save":
    torch.manual_seed(seed)
    m = model()
    with torch.no_grad():
        m.bf.copy_(torch.randn(3001, 7)); m.big.copy_(torch.randn(m.big.numel())); m.idx.copy_(torch.arange(100_003) * 7)
    opt = torch.optim.Adam(m.parameters())
    m(torch.randn(4, 1023)).sum().backward(); opt.step()
    ts = ckt.TrainState(models={"m": m}, optimizers={"opt": opt})
    ts.step = 9
    s = ts.save(ckpt.Checkpointer(d, checksum=os.environ.get("ALGO", "crc32")))
    torch.save({"m": m.state_dict(), "opt": opt.state_dict()}, d + ".want")
    print(s.path)
    sys.exit(0)
want = torch.load(d + ".want", weights_only=True)
path = os.path.join(d, [p for p in sorted(os.listdir(d)) if p.startswith("ckpt-")][-1], "train_state.pt")
def restore_once(cold):
    opened.clear()
    m2 = model()
    opt2 = torch.optim.Adam(m2.parameters())
    if os.environ.get("TEST_WARM"):
        # The optimizer has its state already: the restore copies into it (run K).
        m2(torch.randn(4, 1023)).sum().backward(); opt2.step()
    before = {k: v.clone() for k, v in m2.state_dict().items()}
    before_opt = {(i, k): v.clone() for i, s in opt2.state_dict()["state"].items() for k, v in s.items()}
    ts2 = ckt.TrainState(models={"m": m2}, optimizers={"opt": opt2})
    ck = ckpt.Checkpointer(d)  # verifies the checkpoint, through the page cache
    if cold:
        uncache(path)
    try:
        ok = ts2.restore(ck)
    except Exception as e:
        assert ts2.step == 0
        if ts2._broken is None:
            # Nothing applied: the model is as it was, the optimizer too.
            for k, v in m2.state_dict().items():
                assert torch.equal(v, before[k]), k
            now_opt = {(i, k): v for i, s in opt2.state_dict()["state"].items() for k, v in s.items()}
            assert now_opt.keys() == before_opt.keys() and all(torch.equal(v, before_opt[k]) for k, v in now_opt.items())
        else:
            # Run V copied part of the damaged file into the objects: the state refuses to be
            # saved, naming why.
            assert isinstance(e, InvalidCheckpoint), e
            try:
                ts2.save(ck)
                raise SystemExit("a TrainState whose restore failed half-way was saved")
            except ckpt.CkptError as s:
                assert "refusing to save this TrainState" in str(s) and "exit" in str(s), s
        return f"REFUSED {getattr(e, 'slug', type(e).__name__)} {'BROKEN' if ts2._broken else 'UNTOUCHED'}"
    assert ok and ts2.step == 9
    for k, v in want["m"].items():
        got = m2.state_dict()[k]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    assert m2.tied.data_ptr() == m2[0].weight.data_ptr()
    sw, sg = want["opt"]["state"], opt2.state_dict()["state"]
    for i in sw:
        for k in sw[i]:
            assert torch.equal(sw[i][k], sg[i][k]), (i, k)
    assert len(opened) == 1, opened
    return f"DIRECT {opened[0].direct_reads} MAPPED {int(opened[0].mapped)} WHOLE {int(opened[0].whole)} SCATTERED {int(opened[0].scattered)}"
ckt._WAY = os.environ.get("TEST_WAY") or None
if mode == "inplace":
    # Into a model and an optimizer that already have their tensors: the restore copies into
    # them (same memory afterwards); a state tensor of another shape or dtype is replaced.
    m2 = model()
    opt2 = torch.optim.Adam(m2.parameters())
    m2(torch.randn(4, 1023)).sum().backward(); opt2.step()
    ps = list(m2.parameters())
    opt2.state[ps[1]]["exp_avg"] = torch.zeros(3)
    opt2.state[ps[2]]["exp_avg_sq"] = torch.zeros(ps[2].shape, dtype=torch.float64)
    # A model of another shape first: refused by torch, the optimizer's state untouched.
    bad = torch.nn.Sequential(torch.nn.Linear(1023, 4099), torch.nn.Linear(4099, 1020))
    ts_bad = ckt.TrainState(models={"m": bad}, optimizers={"opt": opt2})
    keep = {(i, k): v.clone() for i, s in opt2.state_dict()["state"].items() for k, v in s.items()}
    try:
        ts_bad.restore(ckpt.Checkpointer(d))
        raise SystemExit("a model of another shape was not refused")
    except RuntimeError as e:
        assert "size mismatch" in str(e), e
    assert opened[-1].mapped or opened[-1].whole  # verified first, then refused by the model's load_state_dict
    assert all(torch.equal(v, keep[(i, k)]) for i, s in opt2.state_dict()["state"].items() for k, v in s.items())
    opened.clear()
    ptrs = {k: v.data_ptr() for k, v in m2.state_dict().items()}
    ids = [id(p) for p in m2.parameters()]
    optp = {(i, k): v.data_ptr() for i, s in opt2.state_dict()["state"].items() for k, v in s.items()}
    ts2 = ckt.TrainState(models={"m": m2}, optimizers={"opt": opt2})
    ck = ckpt.Checkpointer(d)
    uncache(path)
    assert ts2.restore(ck) and ts2.step == 9
    for k, v in want["m"].items():
        got = m2.state_dict()[k]
        # Run K copies into the memory the model has; run L's zero-copy restore gives each
        # Parameter the verified memory (the objects stay: the optimizer holds them).
        assert got.dtype == v.dtype and torch.equal(got, v), k
        assert (got.data_ptr() == ptrs[k]) == (opened[0].mapped or opened[0].scattered), k
    assert [id(p) for p in m2.parameters()] == ids
    assert [id(p) for p in opt2.param_groups[0]["params"]] == ids
    sw, sg = want["opt"]["state"], opt2.state_dict()["state"]
    moved = []
    for i in sw:
        for k in sw[i]:
            assert sg[i][k].dtype == sw[i][k].dtype and torch.equal(sw[i][k], sg[i][k]), (i, k)
            if sg[i][k].data_ptr() != optp[(i, k)]:
                moved.append(f"{i}/{k}")
    assert opened[0].mapped + opened[0].whole + opened[0].scattered == 1
    assert opened[0].direct_reads == int(not opened[0].mapped)
    print("MOVED", ",".join(sorted(moved)), "WAY", "mapped" if opened[0].mapped else "whole" if opened[0].whole else "scattered")
    sys.exit(0)
if mode == "damage":
    # A flipped bit at each offset given (then a cut file), then the file as it was; only the
    # first restore's checkpoint is written (Checkpointer(d) skips a bad one: a fresh start).
    data = open(path, "rb").read()
    os.chmod(path, 0o600)
    for at in [int(x) for x in sys.argv[4].split(",")] + [-1]:
        # Checkpointer(d) verifies at open and would skip the bad checkpoint: damage after it.
        real_ck = ckpt.Checkpointer
        def opened_then_damaged(*a, **k):
            c = real_ck(*a, **k)
            bad = bytearray(data)
            if at >= 0:
                bad[at] ^= 0x01
            else:
                bad = bad[:-4096]
            open(path, "wb").write(bytes(bad))
            return c
        ckpt.Checkpointer = opened_then_damaged
        print("AT", at, restore_once(True), flush=True)
        ckpt.Checkpointer = real_ck
        open(path, "wb").write(data)
    print("AFTER", restore_once(True))
else:
    print(restore_once(mode != "cached"))
"""


def _job_env(env=None) -> dict:
    """The environment of a torch job script: this ckpt package and the tests' helpers
    (`_pagecache`) importable, no supervisor variables, then `env`."""
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(Path(ckpt.__file__).parent.parent), str(Path(__file__).parent), e.get("PYTHONPATH", "")])
    for k in ("CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE"):
        e.pop(k, None)
    e.update(env or {})
    return e


def _torch(py: str, d: Path, mode: str, env=None, extra=()):
    e = _job_env(env)
    return subprocess.run([py, "-c", TORCH_JOB, str(d), mode, str(SEED), *extra], capture_output=True, text=True, timeout=300, env=e)


@pytest.mark.parametrize("fs", ["disk", "ramfs"])
def test_torch_restore_reads_past_the_cache_bit_exact_and_refuses_damage(tmp_path, fs):
    """`TrainState.restore` loads through `VerifiedFile`: bit-exact (float32 tensors of
    several pieces at odd sizes, bfloat16, int64, optimizer state, a tied weight), its large
    tensors read past the page cache when cold (through it when cached, with
    `CKPT_DIRECT_IO=0`, and on ramfs, which refuses `O_DIRECT`); into an optimizer that has its
    state already, each tensor's bytes are copied into the tensor it has as the file is read
    (run V: past the cache when cold), or (asked for) the file is verified from the page cache
    first and copied in place (run K). A flipped bit in any piece of `train_state.pt` or a cut
    file is refused: before anything is applied (run J, K, L), or (run V) with the state
    refusing to be saved afterwards."""
    py = _torch_python()
    base = _ramfs(tmp_path) if fs == "ramfs" else tmp_path
    try:
        d = base / "ck"
        r = _torch(py, d, "save")
        assert r.returncode == 0, r.stdout + r.stderr
        f = Path(r.stdout.split()[-1]) / "train_state.pt"
        # Objects that hold most of the file's tensors (a model and an optimizer that has
        # stepped: TEST_WARM) get the file's bytes copied into their tensors as it is read
        # (run V: one scatter_verified, past the page cache when cold on a disk); objects that
        # do not (a fresh optimizer) are read whole into memory of its own and verified first
        # (one read_whole, run L); either way when asked for, and run K's mapped copy and run
        # J's reader only then (ckpt.torch._WAY, TEST_WAY here).
        warm = {"TEST_WARM": "1"}
        cases = [("cold", warm, fs == "disk", "scattered"), ("cached", warm, False, "scattered"),
                 ("cold", {**warm, "CKPT_DIRECT_IO": "0"}, False, "scattered"),
                 ("cold", {}, fs == "disk", "whole"), ("cached", {}, False, "whole"),
                 ("cold", {"CKPT_DIRECT_IO": "0"}, False, "whole"),
                 ("cold", {**warm, "TEST_WAY": "whole"}, fs == "disk", "whole"),
                 ("cold", {"TEST_WAY": "scatter"}, fs == "disk", "scattered"),
                 ("cold", {**warm, "TEST_WAY": "inplace"}, False, "mapped"), ("cold", {"TEST_WAY": "reader"}, fs == "disk", "reader")]
        for mode, env, direct, way in cases:
            r = _torch(py, d, mode, env)
            assert r.returncode == 0 and "DIRECT " in r.stdout, (mode, env, r.stdout + r.stderr)
            w = r.stdout.split("DIRECT ")[1].split()
            n = int(w[0])
            got_way = "mapped" if w[2] == "1" else "whole" if w[4] == "1" else "scattered" if w[6] == "1" else "reader"
            # Run J's reader: 7 tensors of at least a piece (two weights, the 2-piece buffer,
            # Adam's 4 moments); run L: one whole read.
            want_n = (7 if way == "reader" else 1) if direct else 0
            assert (n, got_way) == (want_n, way), (mode, env, fs, n, got_way)
        if fs == "ramfs":
            return
        size = f.stat().st_size
        rng = random.Random(SEED + 4)
        P = _bulk.PIECE
        spots = [rng.randrange(k * P, min(size, (k + 1) * P)) for k in range(-(-size // P))] + [size - 30]
        done = ["MAPPED", "0", "WHOLE", "0", "SCATTERED", "0"]
        for env, after in (({}, ["AFTER", "DIRECT", "1", "MAPPED", "0", "WHOLE", "1", "SCATTERED", "0"]),
                           (warm, ["AFTER", "DIRECT", "1", *done[:5], "1"]),
                           ({**warm, "TEST_WAY": "inplace"}, ["AFTER", "DIRECT", "0", "MAPPED", "1", *done[2:]]),
                           ({"TEST_WAY": "reader"}, ["AFTER", "DIRECT", "7", *done])):
            r = _torch(py, d, "damage", env, extra=[",".join(map(str, spots))])
            assert r.returncode == 0, r.stdout + r.stderr
            out = [line.split() for line in r.stdout.splitlines()]
            got = {int(w[1]): w[2:] for w in out if w[0] == "AT"}
            assert sorted(got) == sorted(spots + [-1]), r.stdout
            for at, res in got.items():
                # A flipped bit in the zip's own structure may make torch refuse it first (any
                # error: nothing applied); in the data, the checksum refuses it.
                assert res[0] == "REFUSED", (at, r.stdout)
                # Only run V copies before the checksum is known, and then the state says so.
                assert res[2] == "UNTOUCHED" or env == warm, (at, r.stdout)
            # Read whole, mapped or scattered, the checksum covers every byte before anything
            # is used: it refuses them all.
            least = len(spots) - 1 if env.get("TEST_WAY") == "reader" else len(spots) + 1
            assert sum(res[:2] in (["REFUSED", "checksum-mismatch"], ["REFUSED", "size-mismatch"])
                       for res in got.values()) >= least, r.stdout
            if env == warm:
                # The data's damage was found after copying it into the model: every one of
                # those restores left the state unsaveable.
                assert sum(res[2] == "BROKEN" for res in got.values()) >= len(spots) - 1, r.stdout
            assert out[-1] == after, r.stdout
    finally:
        if fs == "ramfs":
            subprocess.run(["umount", "-l", str(base)])


@pytest.mark.parametrize("way", ["default", "whole", "inplace", "scatter"])
def test_torch_restore_into_the_objects_the_model_and_optimizer_already_have(tmp_path, way):
    """Into a model and an optimizer that already have their tensors: bit-exact, the Parameter
    objects kept (the optimizer's are the model's); run K's mapped copy (the default for such
    objects since run V, `ckpt.torch._WAY = "scatter"`) and run K's mapped copy (`"inplace"`)
    copy into the memory they were in,
    run L's zero-copy restore (`_WAY = "whole"`) gives them the verified memory; an optimizer state tensor of another shape or dtype than the
    checkpoint's is replaced by one holding the checkpoint's values; a model of another shape
    is refused by torch with the optimizer's state untouched."""
    py = _torch_python()
    d = tmp_path / "ck"
    r = _torch(py, d, "save")
    assert r.returncode == 0, r.stdout + r.stderr
    env = {"TEST_WAY": way if way != "default" else ""}
    r = _torch(py, d, "inplace", env)
    assert r.returncode == 0, r.stdout + r.stderr
    moved = r.stdout.split("MOVED ")[1].split()[0].split(",")
    assert r.stdout.split("WAY ")[1].split()[0] == {"default": "scattered", "scatter": "scattered"}.get(way, "mapped" if way == "inplace" else way), r.stdout
    if way != "whole":  # run V's or run K's copy, asked for or the default
        assert moved == ["1/exp_avg", "2/exp_avg_sq"], r.stdout
    else:
        assert len(moved) == 12 and "1/exp_avg" in moved, r.stdout  # every state tensor: zero-copy


