"""`ckpt.torch.TrainState.restore` without a copy (issue 19, docs/benchmarks.md run L): the
whole `train_state.pt` read into memory of its own (`VerifiedFile.read_whole`: `O_DIRECT`
straight into it when cold) and verified before anything is applied; torch's tensors are
views of that memory, a model's parameters and buffers take it (`p.data = t`: the Parameter
objects stay, the optimizer keeps working), the optimizer's state is that memory too.

Checked here, in a child with torch (`/opt/ckpt-torch` or `$CKPT_TORCH_PYTHON`): into fresh
objects and into a model and optimizer that have their tensors, bit-identical, every tensor
inside the verified memory, the Parameter objects kept, odd sizes and offsets (a buffer over
two pieces and 4004 bytes, int8 of 777 bytes, bfloat16), two buffers viewing one storage and
a tied weight (still sharing after the restore), non-contiguous views (strides kept), and the
next optimizer step equal bit for bit to the step of the job that saved; cold (`O_DIRECT`),
cached, `CKPT_DIRECT_IO=0` and on ramfs (refuses `O_DIRECT`); a flipped bit in the zip
header, in tensor data or in the last byte, and a cut file, refused with `InvalidCheckpoint`
and the model and optimizer untouched. No timing here."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

import ckpt

from test_restore_paths import _job_env, _ramfs, _torch_python

SEED = int(os.environ.get("CKPT_TEST_SEED", random.randrange(1 << 30)))
print(f"seed {SEED} (CKPT_TEST_SEED)")

JOB = r"""
import os, sys, torch, ckpt, ckpt.torch as ckt
from ckpt import _bulk
d, mode, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
P = _bulk.PIECE

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(1023, 4099)                   # 16.8 MB: three pieces, odd
        self.b = torch.nn.Linear(4099, 5)
        self.tied = self.a.weight                              # one Parameter under two keys
        self.register_buffer("big", torch.zeros(P // 4 * 2 + 1001))   # two pieces + 4004 bytes
        self.register_buffer("i8", torch.zeros(777, dtype=torch.int8))
        self.register_buffer("bf", torch.zeros(3001, 7, dtype=torch.bfloat16))
        base = torch.zeros(3 * 1001 + 5)
        self.register_buffer("v1", base[5:1006])               # two views of one storage
        self.register_buffer("v2", base[1006:].view(2, 1001))
        self.register_buffer("nc", torch.zeros(771, 513).t())  # non-contiguous
        self.register_buffer("st", torch.zeros(4000)[1::3])    # strided, offset 1
    def forward(self, x):
        return self.b(torch.relu(self.a(x))).sum() + self.big[:5].sum() + self.nc[0, :5].sum()

def fill(m):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(m.parameters()) + [m.big, m.nc, m.st, m.v1, m.v2]:
            t.copy_(torch.randn(t.shape, generator=g))
        m.bf.copy_(torch.randn(3001, 7, generator=g))
        m.i8.copy_(torch.randint(-128, 127, (777,), generator=g, dtype=torch.int8))

def step(m, opt):
    x = torch.randn(4, 1023, generator=torch.Generator().manual_seed(seed + 1))
    opt.zero_grad()
    m(x).backward()
    opt.step()

def flat(m, opt):
    out = {("m", k): v.detach().clone() for k, v in m.state_dict().items()}
    for i, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            out[("opt", i, k)] = v.clone()
    return out

def same(a, b):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k

if mode == "save":
    m = Net(); fill(m)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    step(m, opt)
    ts = ckt.TrainState(models={"m": m}, optimizers={"opt": opt})
    ts.step = 7
    s = ts.save(ckpt.Checkpointer(d, checksum=os.environ.get("ALGO", "crc32")))
    torch.save(flat(m, opt), d + ".want")
    step(m, opt)                                               # the job's next step
    torch.save(flat(m, opt), d + ".next")
    print(s.path)
    sys.exit(0)

want = torch.load(d + ".want", weights_only=True)
nxt = torch.load(d + ".next", weights_only=True)
path = [os.path.join(d, p, "train_state.pt") for p in sorted(os.listdir(d)) if p.startswith("ckpt-")][-1]
wholes = []
real_whole = _bulk.VerifiedFile.read_whole
def spy(self):
    v = real_whole(self)
    if v is not None:
        wholes.append((_bulk._address(v), len(v), self))
    return v
_bulk.VerifiedFile.read_whole = spy

def uncache():
    from _pagecache import uncache as drop
    drop(path)

def objects(warm):
    m = Net()
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    if warm:                                                   # tensors of its own already
        fill(m); step(m, opt)
    return m, opt

def restore(warm, cold, damage=None):
    # Objects that hold their tensors get run K's copy by default since run P; this file tests
    # the zero-copy way, which they get when asked for (fresh objects get it by default).
    ckt._WAY = "whole" if warm else None
    m, opt = objects(warm)
    ids = [id(p) for p in m.parameters()]
    before = flat(m, opt)
    ts = ckt.TrainState(models={"m": m}, optimizers={"opt": opt})
    ck = ckpt.Checkpointer(d)                                  # verifies at open: damage after
    if damage is not None:
        damage()
    if cold:
        uncache()
    wholes.clear()
    try:
        ts.restore(ck)
    except Exception as e:
        # Nothing applied: the model, the optimizer and the step as they were.
        assert ts.step == 0
        same(flat(m, opt), before)
        assert [id(p) for p in m.parameters()] == ids
        return f"REFUSED {getattr(e, 'slug', type(e).__name__)}"
    assert ts.step == 7
    same(flat(m, opt), want)
    # The Parameter objects kept, and the optimizer's are the model's.
    assert [id(p) for p in m.parameters()] == ids
    assert [id(p) for p in opt.param_groups[0]["params"]] == ids
    assert m.tied is m.a.weight
    # Zero-copy: every tensor of the model and of the optimizer's state is in the memory
    # read_whole filled and verified.
    assert len(wholes) == 1, wholes
    lo, n, f = wholes[0]
    ts_all = list(m.state_dict().values()) + [v for s in opt.state.values() for v in s.values()]
    for t in ts_all:
        a = t.untyped_storage().data_ptr()
        assert lo <= a and a + t.untyped_storage().nbytes() <= lo + n, (a, lo, n)
    # Shared storages stay shared, views keep their offsets and strides.
    assert m.v1.untyped_storage().data_ptr() == m.v2.untyped_storage().data_ptr()
    assert (m.v1.storage_offset(), m.v2.storage_offset()) == (5, 1006)
    assert m.nc.stride() == (1, 513) and not m.nc.is_contiguous()
    assert m.st.stride() == (3,) and m.st.storage_offset() == 1
    # The next step is the saving job's next step, bit for bit.
    step(m, opt)
    same(flat(m, opt), nxt)
    return f"OK DIRECT {f.direct_reads} WHOLE {int(f.whole)}"

if mode == "damage":
    data = open(path, "rb").read()
    os.chmod(path, 0o600)
    for at in [int(x) for x in sys.argv[4].split(",")] + [-1]:
        def damage():
            bad = bytearray(data)
            if at >= 0:
                bad[at] ^= 0x01
            else:
                bad = bad[:-4096]
            open(path, "wb").write(bytes(bad))
        for warm in (False, True):
            print("AT", at, int(warm), restore(warm, True, damage), flush=True)
            open(path, "wb").write(data)
    print("AFTER", restore(True, True))
else:
    cold = mode == "cold"
    print("FRESH", restore(False, cold))
    print("WARM", restore(True, cold))
"""


def _job(py: str, d: Path, mode: str, env=None, extra=()):
    e = _job_env(env)
    return subprocess.run([py, "-c", JOB, str(d), mode, str(SEED), *extra], capture_output=True, text=True,
                          timeout=300, env=e)


def _results(out: str) -> dict:
    return {w[0]: w[1:] for w in (line.split() for line in out.splitlines()) if w and w[0] in ("FRESH", "WARM")}


@pytest.mark.parametrize("fs", ["disk", "ramfs"])
def test_torch_restore_is_zero_copy_bit_identical_into_fresh_and_existing_objects(tmp_path, fs):
    py = _torch_python()
    base = _ramfs(tmp_path) if fs == "ramfs" else tmp_path
    try:
        d = base / "ck"
        r = _job(py, d, "save")
        assert r.returncode == 0, r.stdout + r.stderr
        # Cold on a disk: past the page cache (one read_whole with O_DIRECT); cached, with
        # CKPT_DIRECT_IO=0 and on ramfs (no O_DIRECT): through the cache, still zero-copy after.
        for mode, env, direct in (("cold", {}, fs == "disk"), ("cached", {}, False),
                                  ("cold", {"CKPT_DIRECT_IO": "0"}, False)):
            r = _job(py, d, mode, env)
            assert r.returncode == 0, (mode, env, r.stdout + r.stderr)
            got = _results(r.stdout)
            want = ["OK", "DIRECT", "1" if direct else "0", "WHOLE", "1"]
            assert got == {"FRESH": want, "WARM": want}, (mode, env, fs, r.stdout)
    finally:
        if fs == "ramfs":
            subprocess.run(["umount", "-l", str(base)])


def test_torch_zero_copy_restore_refuses_damage_anywhere_with_the_objects_untouched(tmp_path):
    py = _torch_python()
    d = tmp_path / "ck"
    r = _job(py, d, "save")
    assert r.returncode == 0, r.stdout + r.stderr
    f = Path(r.stdout.split()[-1]) / "train_state.pt"
    size = f.stat().st_size
    rng = random.Random(SEED)
    # The zip's first local header, tensor data (one spot per piece), the last byte.
    spots = [rng.randrange(0, 30)] + [rng.randrange(k << 23, min(size - 1, (k + 1) << 23)) for k in range(size >> 23)] + [size - 1]
    r = _job(py, d, "damage", extra=[",".join(map(str, spots))])
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    got = {(int(w[1]), int(w[2])): w[3:] for w in lines if w[0] == "AT"}
    assert sorted(got) == sorted((at, warm) for at in spots + [-1] for warm in (0, 1)), r.stdout
    for (at, warm), res in got.items():
        # Verified whole before torch reads a byte: the checksum (or the size) refuses it.
        want = ["REFUSED", "size-mismatch"] if at == -1 else ["REFUSED", "checksum-mismatch"]
        assert res == want, (at, warm, r.stdout)
    assert lines[-1] == ["AFTER", "OK", "DIRECT", "1", "WHOLE", "1"], r.stdout
