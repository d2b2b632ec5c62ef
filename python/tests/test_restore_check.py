"""`ckpt run --restore-check client`: the supervisor checks only the restore checkpoint's
manifest and member sizes (`CKPT_RESTORE_CHECK=client`), so the job's client is the only reader
that checksums the bytes. A client that finds damage in any restore path sends one
`restore_failed` datagram before raising; `restore_dir()` checksums every file it exposes first.
The supervisor then verifies the checkpoint itself, sets it aside and relaunches the job from the
next one. Under the default (`full`) nothing changes: nothing is sent, `restore_dir()` reads
nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import List

import pytest

from conftest import PROTOCOL_VARS, assert_no_survivors, ckpt_bin, clean_env, events, run, wait_until

import ckpt  # noqa: E402
import ckpt.client  # noqa: E402
from ckpt import protocol as P  # noqa: E402
from ckpt.errors import InvalidCheckpoint  # noqa: E402
from ckpt.store import Store  # noqa: E402

PY = sys.executable

# A job: restores its state (with restore() or, in mode "dir", from files it wrote with
# saving() read through restore_dir()), then saves at every step and writes its result. With
# PLANT=n it stops after saving step n (to plant checkpoints). Mode "false-alarm" first tells the
# supervisor, by hand, that an intact restore checkpoint is damaged. Every launch appends what
# it saw to OUT.seen.
JOB = textwrap.dedent(r"""
    import json, os, socket, sys, time
    import ckpt
    mode, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    plant = int(os.environ.get("PLANT") or 0)
    ck = ckpt.Checkpointer()
    with open(out + ".seen", "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "seq": os.environ.get("CKPT_RESTORE_SEQ", ""),
                            "check": os.environ.get("CKPT_RESTORE_CHECK")}) + "\n")
    if mode == "false-alarm" and ck.restore_point is not None:
        msg = {"type": "restore_failed", "v": 1, "pid": os.getpid(), "seq": ck.restore_point.seq,
               "error": "a false alarm"}
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.sendto(json.dumps(msg).encode(), os.environ["CKPT_SOCKET"])
        log = os.path.join(os.environ["CKPT_DIR"], ".ckpt", "events.jsonl")
        deadline = time.monotonic() + 30
        while "restore_failed_but_verifies" not in open(log).read():
            if time.monotonic() > deadline:
                sys.exit("the supervisor did not answer the false alarm")
            time.sleep(0.02)
    if mode == "dir":
        d = ck.restore_dir()
        state = json.loads((d / "state.json").read_text()) if d is not None else None
    else:
        state = ck.restore()
    if state is None:
        state = {"step": 0, "acc": 1}
    while state["step"] < steps:
        state["step"] += 1
        state["acc"] = (state["acc"] * 1000003 + state["step"]) % (1 << 61)
        if mode == "dir":
            with ck.saving(step=state["step"]) as d:
                (d / "state.json").write_text(json.dumps(state))
                (d / "pad.bin").write_bytes(bytes(range(256)) * 64)
        else:
            ck.save(state, step=state["step"])
        if state["step"] == plant:
            sys.exit(0)
    with open(out, "w") as f:
        f.write(json.dumps(state))
""")


def _job(tmp: Path) -> Path:
    p = tmp / "job.py"
    if not p.exists():
        p.write_text(JOB)
    return p


def _plant(tmp: Path, d: Path, mode: str, n: int) -> None:
    """Checkpoints 1..n, saved by the job without a supervisor."""
    r = run([PY, _job(tmp), mode, 100, tmp / "plant.out"], 60, env=clean_env(CKPT_DIR=str(d), PLANT=str(n)))
    assert r.returncode == 0, r.stderr
    assert [s for s, _ in Store(d).list()] == list(range(1, n + 1))


def _reference(tmp: Path, mode: str, steps: int) -> dict:
    """The result of an uninterrupted run."""
    d, out = tmp / f"reference-{mode}", tmp / f"reference-{mode}.out"
    r = run([PY, _job(tmp), mode, steps, out], 60, env=clean_env(CKPT_DIR=str(d)))
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())


def _flip(path: Path, at: int) -> None:
    """Flips the lowest bit of byte ``at`` (the size stays)."""
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    os.chmod(path, 0o600)
    path.write_bytes(bytes(data))


def _ckpt_run(d: Path, *opts: str, cmd: list) -> list:
    return [ckpt_bin(), "run", "--dir", d, "--backoff", "10ms..50ms", "--every", "off", *opts, "--", *cmd]


def _quarantined(d: Path) -> List[str]:
    """The checkpoints in quarantine/ (without their `.reason.txt` notes)."""
    try:
        return sorted(n for n in os.listdir(d / "quarantine") if not n.endswith(".reason.txt"))
    except FileNotFoundError:
        return []


def _of(d: Path, name: str) -> List[dict]:
    return [e for e in events(d) if e["event"] == name]


def _seen(out: Path) -> List[dict]:
    return [json.loads(line) for line in Path(str(out) + ".seen").read_text().splitlines()]


# --- under a real supervisor --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["restore", "dir"])
def test_damage_found_by_the_client_is_set_aside_and_the_job_resumes_from_the_previous(tmp_path, mode):
    """A flipped byte (same size) in the newest of 3 checkpoints passes the supervisor's size
    check under `--restore-check client`; the job's client finds it (`restore()`'s checksum;
    in mode "dir", `restore_dir()`'s verify of every file before it hands out the path, here
    of a digit of the state the job would otherwise read as another number), reports it and
    raises; the supervisor verifies, quarantines it, relaunches from checkpoint 2 (not a
    failure), and the job ends with the uninterrupted result."""
    steps = 6
    want = _reference(tmp_path, mode, steps)
    d, out = tmp_path / "d", tmp_path / "job.out"
    _plant(tmp_path, d, mode, 3)
    newest = Store(d).path_of(3)
    if mode == "dir":
        f = newest / "state.json"
        text = f.read_text()
        at = text.index('"acc": ') + len('"acc": ') + 2  # a digit of the value
        assert text[at].isdigit()
    else:
        f = newest / "state.pickle"
        at = f.stat().st_size // 2
    _flip(f, at)
    r = run(_ckpt_run(d, "--restore-check", "client", cmd=[PY, _job(tmp_path), mode, steps, out]), 90)
    assert r.returncode == 0, r.stderr
    q = _quarantined(d)
    assert len(q) == 1 and q[0].startswith("ckpt-000000000003."), (q, r.stderr)
    rejected = _of(d, "restore_rejected")
    assert [e["seq"] for e in rejected] == [3], r.stderr
    launches = _of(d, "launch")
    assert [e["restore_seq"] for e in launches] == [3, 2], r.stderr
    assert all(e["restore_check"] == "client" for e in launches), launches
    restarts = _of(d, "restart")
    assert len(restarts) == 1 and restarts[0].get("restore_rejected") is True, restarts
    assert not _of(d, "restore_failed_ignored") and not _of(d, "restore_failed_but_verifies"), r.stderr
    seen = _seen(out)
    assert [(s["seq"], s["check"]) for s in seen] == [("3", "client"), ("2", "client")], seen
    if mode == "dir":
        assert f"ckpt: error: the checkpoint to restore, {newest}, is damaged: " in r.stderr, r.stderr
        assert "the supervisor sets it aside and relaunches from the next one" in r.stderr
    assert json.loads(out.read_text()) == want
    assert_no_survivors(d)


def test_a_false_report_of_an_intact_checkpoint_is_logged_and_changes_nothing(tmp_path):
    """A job that reports an intact restore checkpoint damaged (a `restore_failed` datagram
    sent by hand over CKPT_SOCKET): the supervisor verifies it, logs
    `restore_failed_but_verifies`, keeps it and the job; the run ends normally."""
    steps = 2
    want = _reference(tmp_path, "false-alarm", steps)
    d, out = tmp_path / "d", tmp_path / "job.out"
    _plant(tmp_path, d, "restore", 2)
    r = run(_ckpt_run(d, "--restore-check", "client", cmd=[PY, _job(tmp_path), "false-alarm", steps, out]), 90)
    assert r.returncode == 0, r.stderr
    kept = _of(d, "restore_failed_but_verifies")
    assert [e["seq"] for e in kept] == [2] and kept[0]["error"] == "a false alarm", r.stderr
    assert not _of(d, "restore_rejected") and not _of(d, "restart"), r.stderr
    assert [e["restore_seq"] for e in _of(d, "launch")] == [2], r.stderr
    assert _quarantined(d) == []
    assert [s for s, _ in Store(d).list()] == [1, 2]
    ckpt.verify_path(Store(d).path_of(2), 2)
    assert json.loads(out.read_text()) == want
    assert_no_survivors(d)


def test_the_default_check_is_full_and_sets_damage_aside_before_the_launch(tmp_path):
    """Without the flag the job is told `CKPT_RESTORE_CHECK=full` and a damaged newest
    checkpoint never reaches it: quarantined before the first (and only) launch, which
    restores checkpoint 2."""
    steps = 6
    want = _reference(tmp_path, "restore", steps)
    d, out = tmp_path / "d", tmp_path / "job.out"
    _plant(tmp_path, d, "restore", 3)
    f = Store(d).path_of(3) / "state.pickle"
    _flip(f, f.stat().st_size // 2)
    r = run(_ckpt_run(d, cmd=[PY, _job(tmp_path), "restore", steps, out]), 90)
    assert r.returncode == 0, r.stderr
    q = _quarantined(d)
    assert len(q) == 1 and q[0].startswith("ckpt-000000000003."), (q, r.stderr)
    launches = _of(d, "launch")
    assert [(e["restore_seq"], e["restore_check"]) for e in launches] == [(2, "full")], r.stderr
    assert not _of(d, "restore_rejected") and not _of(d, "restart"), r.stderr
    assert [(s["seq"], s["check"]) for s in _seen(out)] == [("2", "full")]
    assert json.loads(out.read_text()) == want
    assert_no_survivors(d)


# --- the client alone (a socket of the test's own stands in for the supervisor) ------------


@pytest.fixture
def listener():
    """A bound datagram socket (in a short directory: a socket path has at most 107 bytes)."""
    where = tempfile.mkdtemp(prefix="ckrc", dir="/tmp")
    path = os.path.join(where, "sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.setblocking(False)
    try:
        yield s, path
    finally:
        s.close()
        shutil.rmtree(where, ignore_errors=True)


def _messages(s: socket.socket) -> List[dict]:
    out = []
    while True:
        try:
            out.append(json.loads(s.recv(P.MAX_MESSAGE_BYTES)))
        except BlockingIOError:
            return out


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """Checkpoint 1 (a state with a large array: state.pickle + state.pickle.buffers) and
    checkpoint 2 (files written with saving()), saved without a supervisor."""
    np = pytest.importorskip("numpy")
    for k in PROTOCOL_VARS + [P.ENV_RESTORE_CHECK, P.ENV_START]:
        monkeypatch.delenv(k, raising=False)
    d = tmp_path / "d"
    ck = ckpt.Checkpointer(d)
    try:
        ck.save({"n": 7, "a": np.arange(50_000, dtype=np.int64)}, step=1)
        with ck.saving(step=2) as s:
            (s / "model.bin").write_bytes(bytes(range(256)) * 400)
            (s / "sub").mkdir()
            (s / "sub" / "extra.bin").write_bytes(b"x" * 5000)
            np.save(s / "w.npy", np.arange(3_000_000, dtype=np.float32).reshape(1000, 3000))  # 12 MB: two pieces
    finally:
        ck.close()
    return d


def _as_supervised(monkeypatch, d: Path, seq: int, sock: str, check) -> ckpt.Checkpointer:
    monkeypatch.setenv(P.ENV_DIR, str(d))
    monkeypatch.setenv(P.ENV_SOCKET, sock)
    monkeypatch.setenv(P.ENV_RESTORE, str(Store(d).path_of(seq)))
    monkeypatch.setenv(P.ENV_RESTORE_SEQ, str(seq))
    if check is None:
        monkeypatch.delenv(P.ENV_RESTORE_CHECK, raising=False)
    else:
        monkeypatch.setenv(P.ENV_RESTORE_CHECK, check)
    return ckpt.Checkpointer()


def _read_verified(ck: ckpt.Checkpointer, name: str) -> None:
    """As ckpt.torch reads: through a VerifiedFile, checked whole by verify()."""
    try:
        f = ck._open_verified(name)
        assert f is not None
        with f:
            f.read()
            f.verify()
    except InvalidCheckpoint as e:
        raise e.at(str(ck.restore_point.path)) from None


def _old(ck: ckpt.Checkpointer) -> "ckpt.client.OldShards":
    """What a reshard hook is given (a single-process checkpoint is one shard, rank 0)."""
    return ckpt.client.OldShards(ck, ck.restore_point)


# Each restore path, the checkpoint it reads, the member damaged there, and the read.
PATHS = {
    "restore": (1, "state.pickle", lambda ck: ck.restore()),
    "restore-buffers": (1, "state.pickle.buffers", lambda ck: ck.restore()),
    "read_file": (2, "model.bin", lambda ck: ck.read_file("model.bin")),
    "OldShards.load": (1, "state.pickle.buffers", lambda ck: _old(ck).load(0)),
    "OldShards.read": (2, "sub/extra.bin", lambda ck: _old(ck).read(0, "sub/extra.bin")),
    "verified-file": (1, "state.pickle.buffers", lambda ck: _read_verified(ck, "state.pickle.buffers")),
    "load_array": (2, "w.npy", lambda ck: ck.load_array("w.npy")),
    "restore_dir": (2, "sub/extra.bin", lambda ck: ck.restore_dir()),
    "OldShards.dir": (1, "state.pickle", lambda ck: _old(ck).dir(0)),
}
EXPOSES_PATHS = ("restore_dir", "OldShards.dir")


@pytest.mark.parametrize("how", ["flip", "cut", "missing", "symlink"])
@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("check", ["client", "full", None, "Client"])
def test_every_restore_path_reports_damage_once_in_client_mode_only(planted, listener, monkeypatch, capsys, check, path, how):
    """Under `CKPT_RESTORE_CHECK=client`, a damaged member (a flipped byte, a cut file, a
    missing one, a symlink in its place) makes every restore path send one `restore_failed`
    (this pid, the checkpoint's seq, the error) before raising InvalidCheckpoint; a second
    failure in the same process sends nothing more. Under `full`, without the variable or with
    any other value, the same read raises the same way and nothing is sent (and restore_dir()
    reads nothing)."""
    seq, member, read = PATHS[path]
    sock, sock_path = listener
    ck = _as_supervised(monkeypatch, planted, seq, sock_path, check)
    try:
        assert [m["type"] for m in _messages(sock)] == ["hello"]
        f = Store(planted).path_of(seq) / member
        if how == "flip":
            _flip(f, f.stat().st_size // 3)
        elif how == "cut":
            os.chmod(f, 0o600)
            os.truncate(f, f.stat().st_size - 1)
        elif how == "missing":
            os.unlink(f)
        else:
            os.unlink(f)
            os.symlink(planted / "elsewhere", f)
        if path in EXPOSES_PATHS and check != "client":
            assert read(ck) == Store(planted).path_of(seq)  # not read: the supervisor did
            assert _messages(sock) == []
            return
        with pytest.raises(InvalidCheckpoint) as e:
            read(ck)
        assert e.value.path == str(Store(planted).path_of(seq))
        assert member in str(e.value)
        sent = _messages(sock)
        if check != "client":
            assert sent == []
            return
        assert sent == [{"type": "restore_failed", "v": P.PROTOCOL_VERSION, "pid": os.getpid(), "seq": seq,
                         "error": str(e.value)}]
        with pytest.raises(InvalidCheckpoint):
            read(ck)
        assert _messages(sock) == []  # once per process
        if path in EXPOSES_PATHS:
            err = capsys.readouterr().err
            assert err.count(f"ckpt: error: the checkpoint to restore, {Store(planted).path_of(seq)}, is damaged: ") == 1
            assert "the supervisor sets it aside and relaunches from the next one" in err
    finally:
        ck.close()


def test_load_array_reads_what_np_save_wrote_verified_writable_and_names_what_it_refuses(tmp_path, monkeypatch):
    """`ck.load_array(name)`: every array `np.save` wrote in `saving()` comes back equal (dtype,
    shape, C or Fortran order, 0-d, empty, structured, several pieces large), writable without
    changing the checkpoint; an array of Python objects, a file that is not `.npy`, a name
    the checkpoint does not list and a run without a checkpoint are refused, naming the file
    and the way to load it."""
    np = pytest.importorskip("numpy")
    for k in PROTOCOL_VARS + [P.ENV_RESTORE_CHECK, P.ENV_START]:
        monkeypatch.delenv(k, raising=False)
    rng = np.random.default_rng(7)
    arrays = {
        "big.npy": rng.standard_normal((3, 3_000_001), dtype=np.float32),
        "fortran.npy": np.asfortranarray(np.arange(35, dtype=np.int16).reshape(5, 7)),
        "scalar.npy": np.array(3.5),
        "record.npy": np.array([(1, (2.0, 3.0)), (4, (5.0, 6.0))], dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
        "empty.npy": np.zeros((0, 3)),
        "big-endian.npy": np.arange(10, dtype=">u4"),
    }
    d = tmp_path / "d"
    ck = ckpt.Checkpointer(d)
    try:
        with ck.saving(step=1) as s:
            for n, a in arrays.items():
                np.save(s / n, a)
            np.save(s / "objects.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
            (s / "raw.bin").write_bytes(b"not numpy " * 10)
    finally:
        ck.close()
    ck = ckpt.Checkpointer(d)
    try:
        for n, a in arrays.items():
            got = ck.load_array(n)
            assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a), n
            assert got.flags.f_contiguous == a.flags.f_contiguous and got.flags.c_contiguous == a.flags.c_contiguous, n
            assert got.flags.writeable, n
        got = ck.load_array("big.npy")
        got[0, :5] = 0
        assert np.array_equal(ck.load_array("big.npy"), arrays["big.npy"])  # its own memory
        with pytest.raises(ckpt.CkptError, match=r"'objects.npy' .* holds Python objects .*allow_pickle=True"):
            ck.load_array("objects.npy")
        with pytest.raises(ckpt.CkptError, match=r"'raw.bin' .* is not a .npy file"):
            ck.load_array("raw.bin")
        with pytest.raises(ckpt.CkptError, match=r"has no file 'nope.npy' \(it has: .*big.npy"):
            ck.load_array("nope.npy")
    finally:
        ck.close()
    empty = ckpt.Checkpointer(tmp_path / "fresh")
    try:
        with pytest.raises(ckpt.CkptError, match="no checkpoint to restore"):
            empty.load_array("big.npy")
    finally:
        empty.close()


def test_restore_dir_checks_every_file_once_in_client_mode_and_never_in_full(planted, listener, monkeypatch):
    """An intact checkpoint: restore_dir() checksums every listed file once per process in
    client mode (later calls, and OldShards.dir(), read nothing), and never in full mode."""
    sock, sock_path = listener
    calls = []
    real = ckpt.client.verify_files

    def counting(path, m, prefix=""):
        calls.append((str(path), prefix))
        return real(path, m, prefix)

    monkeypatch.setattr(ckpt.client, "verify_files", counting)
    for check, want in (("client", [(str(Store(planted).path_of(2)), "")]), ("full", [])):
        calls.clear()
        ck = _as_supervised(monkeypatch, planted, 2, sock_path, check)
        try:
            for _ in range(3):
                assert ck.restore_dir() == Store(planted).path_of(2)
            assert ckpt.client.OldShards(ck, ck.restore_point).dir(0) == Store(planted).path_of(2)
            assert ck.read_file("model.bin") == bytes(range(256)) * 400
        finally:
            ck.close()
        assert calls == want, check
        # In client mode restore_dir()'s check covers every file: the client vouches.
        assert [m["type"] for m in _messages(sock)] == ["hello"] + (["restore_verified"] if check == "client" else [])


def test_the_check_mode_is_read_only_when_supervised_with_a_checkpoint_to_restore(planted, listener, monkeypatch):
    """`CKPT_RESTORE_CHECK=client` alone means nothing without a supervisor (the client
    verified the checkpoint itself) or on a fresh start (nothing to restore)."""
    sock, sock_path = listener
    monkeypatch.setenv(P.ENV_RESTORE_CHECK, "client")
    ck = ckpt.Checkpointer(planted)  # standalone: verifies what it restores
    try:
        assert ck._restore_check == P.RESTORE_CHECK_FULL and ck.restore_point.seq == 2
    finally:
        ck.close()
    ck = _as_supervised(monkeypatch, planted, 2, sock_path, "client")
    try:
        assert ck._restore_check == P.RESTORE_CHECK_CLIENT
    finally:
        ck.close()
    monkeypatch.setenv(P.ENV_RESTORE, "")
    monkeypatch.setenv(P.ENV_RESTORE_SEQ, "")
    ck = ckpt.Checkpointer()
    try:
        assert ck.restore_point is None and ck._restore_check == P.RESTORE_CHECK_FULL
        assert ck.restore_dir() is None
    finally:
        ck.close()


def test_the_supervisor_variables_match_the_rust_list():
    """`protocol.SUPERVISOR_ENV` names what `src/protocol.rs` does (CKPT_RESTORE_CHECK among
    them)."""
    rs = (Path(__file__).resolve().parents[2] / "src" / "protocol.rs").read_text()
    body = rs.split("pub const SUPERVISOR_ENV", 1)[1].split("];", 1)[0].split("= [", 1)[1]
    consts = [c.strip() for c in body.split(",") if c.strip()]
    by_name = {k: v for k, v in vars(P).items() if k.startswith("ENV_")}
    assert [by_name[c] for c in consts] == list(P.SUPERVISOR_ENV)
    assert P.ENV_RESTORE_CHECK in P.SUPERVISOR_ENV


def _torch_python() -> str:
    for p in (os.environ.get("CKPT_TORCH_PYTHON"), "/opt/ckpt-torch/bin/python"):
        if p and os.path.exists(p):
            r = run([p, "-c", "import torch"], 120)
            if r.returncode == 0:
                return p
    pytest.skip("no Python with torch: set CKPT_TORCH_PYTHON or run scripts/setup (installs /opt/ckpt-torch)")


# A torch job: `save` writes a TrainState without a supervisor; otherwise (under the
# supervisor's variables the test sets) it restores it three times, each with a new
# Checkpointer: intact, with a byte of the tensor data flipped, with a byte of the zip's own
# structure flipped. restore_dir()'s whole check is made to fail: ckpt.torch checks every byte
# as it reads it, and must not read the file twice.
TORCH_JOB = textwrap.dedent(r"""
    import os, sys, torch, ckpt, ckpt.client, ckpt.torch as ckt
    d, way = sys.argv[1], sys.argv[2]
    def model():
        torch.manual_seed(0)
        return torch.nn.Linear(300, 301)
    if way == "save":
        ts = ckt.TrainState(models={"m": model()})
        ts.step = 5
        print(ts.save(ckpt.Checkpointer(d)).path)
        sys.exit(0)
    def twice(*a, **k):
        raise AssertionError("restore_dir()'s whole check: the file would be read twice")
    ckpt.client.verify_files = twice
    ckt._WAY = way if way != "auto" else None
    path = os.path.join(os.environ["CKPT_RESTORE"], "train_state.pt")
    data = open(path, "rb").read()
    os.chmod(path, 0o600)
    for at in (None, len(data) // 2, 40):
        bad = bytearray(data)
        if at is not None:
            bad[at] ^= 0x01
        open(path, "wb").write(bytes(bad))
        m = torch.nn.Linear(300, 301)
        ts = ckt.TrainState(models={"m": m})
        ck = ckpt.Checkpointer()
        try:
            ts.restore(ck)
        except Exception as e:
            print("REFUSED", type(e).__name__, getattr(e, "slug", "-"), ts.step, flush=True)
        else:
            print("RESTORED", ts.step, torch.equal(m.weight, model().weight), flush=True)
        ck.close()
""")


@pytest.mark.parametrize("way", ["auto", "whole", "scatter", "inplace", "reader"])
def test_ckpt_torch_reads_once_and_reports_damage_in_client_mode(tmp_path, listener, way):
    """ckpt.torch under `CKPT_RESTORE_CHECK=client`: every way of loading (read whole, copied
    into the model as read (run V, the default for a model), mapped and copied in place, read
    tensor by tensor) checks the bytes it reads and never calls restore_dir()'s whole check
    (one read); a flipped byte in the tensor data or in the zip's structure (which can break
    torch's reader before the whole file is checked) is refused as a checksum mismatch, and
    reported with one `restore_failed` each."""
    py = _torch_python()
    d = tmp_path / "d"
    r = run([py, "-c", TORCH_JOB, d, "save"], 120, env=clean_env())
    assert r.returncode == 0, r.stderr
    sock, sock_path = listener
    env = clean_env(CKPT_DIR=str(d), CKPT_SOCKET=sock_path, CKPT_RESTORE=str(Store(d).path_of(1)),
                    CKPT_RESTORE_SEQ="1", CKPT_RESTORE_CHECK="client")
    r = run([py, "-c", TORCH_JOB, d, way], 120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.splitlines() == [
        "RESTORED 5 True",
        "REFUSED InvalidCheckpoint checksum-mismatch 0",
        "REFUSED InvalidCheckpoint checksum-mismatch 0",
    ], r.stdout + r.stderr
    sent = [m for m in _messages(sock) if m["type"] != "hello"]
    assert [(m["type"], m["seq"]) for m in sent] == [("restore_verified", 1)] + [("restore_failed", 1)] * 2, sent
    sent = sent[1:]
    assert all("train_state.pt" in m["error"] and "checksum" in m["error"] for m in sent), sent


# --- `--restore-check auto` (the default): one read once the client has vouched ----------


def test_restore_verified_is_sent_once_when_the_verifying_reads_cover_every_file(planted, listener, monkeypatch):
    """A supervised client sends one `restore_verified` (its pid, the checkpoint's seq) as soon
    as its verifying reads have covered every file of the restore checkpoint, in either check
    mode, and never for a checkpoint it did not read whole through them: restore_dir() vouches
    only where it checks (client mode), and files the job reads by path count for nothing."""
    sock, sock_path = listener
    me = {"type": "restore_verified", "v": P.PROTOCOL_VERSION, "pid": os.getpid()}

    def sent() -> list:
        return [m for m in _messages(sock) if m["type"] != "hello"]

    for check in ("client", "full", None):
        # Checkpoint 1 (ck.save: a pickle and its buffers): restore() reads both.
        ck = _as_supervised(monkeypatch, planted, 1, sock_path, check)
        try:
            ck.restore()
            assert sent() == [dict(me, seq=1)], check
            ck.restore()
            ck.read_file("state.pickle")
            assert sent() == [], "once per process"
        finally:
            ck.close()
        # Checkpoint 2 (saving(): three files): one by one, the last one completes it.
        ck = _as_supervised(monkeypatch, planted, 2, sock_path, check)
        try:
            ck.read_file("model.bin")
            ck.load_array("w.npy")
            (ck.restore_point.path / "sub" / "extra.bin").read_bytes()  # by path: not counted
            assert sent() == []
            _read_verified(ck, "sub/extra.bin")  # as ckpt.torch reads
            assert sent() == [dict(me, seq=2)], check
        finally:
            ck.close()
        # restore_dir(): vouches only where it checksums every file (client mode).
        ck = _as_supervised(monkeypatch, planted, 2, sock_path, check)
        try:
            ck.restore_dir()
            assert sent() == ([dict(me, seq=2)] if check == "client" else []), check
        finally:
            ck.close()
    # Standalone (no supervisor): nothing to tell.
    monkeypatch.delenv(P.ENV_SOCKET)
    ck = ckpt.Checkpointer(planted)
    try:
        ck.restore_dir()
        ck.read_file("model.bin")
    finally:
        ck.close()
    assert _messages(sock) == []


# A job for `ckpt run` (to STEPS) whose way of restoring is MODE: through the client (`restore`: ck.save /
# ck.restore; `read_file`, `load_array`: saving() files read back one by one; `training`:
# ckpt.training.TrainState), or not wholly
# (`dir`: restore_dir() and its own reads; `direct`: $CKPT_RESTORE by its own code; `partial`:
# one of its two files through the client, the other by path). It exits 1 at step CRASH of
# its first launch, and after each CRASH2 step of its second.
AUTO_JOB = textwrap.dedent(r"""
    import json, os, sys, time
    import numpy as np
    import ckpt
    mode, steps, out = os.environ["MODE"], int(os.environ["STEPS"]), sys.argv[1]
    ck = ckpt.Checkpointer()
    rc = int(os.environ.get("CKPT_RESTART_COUNT") or 0)
    r = ck.restore_point
    if mode == "training":
        import ckpt.training as tr
        w = np.zeros(2, dtype=np.int64)
        ts = tr.TrainState(arrays={"w": w})
    if r is None:
        state = {"step": 0, "acc": 1}
    elif mode == "training":
        ts.restore(ck)
        state = {"step": int(w[0]), "acc": int(w[1])}
    elif mode == "restore":
        state = ck.restore()
    elif mode == "read_file":
        state = json.loads(ck.read_file("state.json"))
        ck.read_file("pad.bin")
    elif mode == "load_array":
        a = ck.load_array("state.npy")
        state = {"step": int(a[0]), "acc": int(a[1])}
        ck.load_array("pad.npy")
    elif mode == "dir":
        state = json.loads((ck.restore_dir() / "state.json").read_text())
    elif mode == "direct":
        state = json.loads(open(os.path.join(os.environ["CKPT_RESTORE"], "state.json")).read())
    else:
        state = json.loads(ck.read_file("state.json"))
    while state["step"] < steps:
        state["step"] += 1
        state["acc"] = (state["acc"] * 1000003 + state["step"]) % (1 << 61)
        if mode == "restore":
            ck.save(state, step=state["step"])
        elif mode == "training":
            w[:] = [state["step"], state["acc"]]
            ts.step = state["step"]
            ts.save(ck)
        elif mode == "load_array":
            with ck.saving(step=state["step"]) as d:
                np.save(d / "state.npy", np.array([state["step"], state["acc"]], dtype=np.int64))
                np.save(d / "pad.npy", np.arange(1000, dtype=np.float32))
        else:
            with ck.saving(step=state["step"]) as d:
                (d / "state.json").write_text(json.dumps(state))
                (d / "pad.bin").write_bytes(bytes(range(256)) * 64)
        time.sleep(float(os.environ.get("STEP_SLEEP") or 0))
        crash = {0: int(os.environ.get("CRASH") or 0), 1: int(os.environ.get("CRASH2") or 0)}.get(rc, 0)
        if state["step"] == crash:
            sys.exit(1)
    with open(out, "w") as f:
        f.write(json.dumps(state))
""")

VOUCHING = ("restore", "read_file", "load_array", "training")


def _auto_run(tmp: Path, d: Path, mode: str, steps: int, out: Path, *opts: str, **env) -> "subprocess.CompletedProcess":
    job = tmp / "auto_job.py"
    if not job.exists():
        job.write_text(AUTO_JOB)
    return run(_ckpt_run(d, "--max-failures", "3", *opts, cmd=[PY, job, out]), 120,
               env=clean_env(MODE=mode, STEPS=str(steps), **env))


@pytest.mark.parametrize("mode", ["restore", "read_file", "load_array", "training", "dir", "direct", "partial"])
def test_auto_reads_once_after_the_client_vouched_and_never_for_a_job_that_reads_by_itself(tmp_path, mode):
    """Under the default `--restore-check auto`: the first resume is verified in full; a job
    whose client read every file of it (restore, read_file, load_array) vouches for it and
    every later resume of that command, in the same `ckpt run` or the next, is read once
    (`restore_check` `client`), ckpt.training's TrainState too; a job that reads files by path (restore_dir() in full mode,
    $CKPT_RESTORE, one file of two) never is. Every run ends with the uninterrupted result."""
    np = pytest.importorskip("numpy")  # noqa: F841
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _auto_run(tmp_path, tmp_path / "ref-d", mode, 12, ref).returncode == 0
    d = tmp_path / "d"
    # One ckpt run, three launches: fresh, resume (full), resume.
    r = _auto_run(tmp_path, d, mode, 8, out, CRASH="3", CRASH2="5")
    assert r.returncode == 0, r.stderr
    assert ("from now on a resume of this command reads its checkpoint once" in r.stderr) == (mode in VOUCHING), r.stderr
    checks = [e["restore_check"] for e in _of(d, "launch")]
    light = "client" if mode in VOUCHING else "full"
    assert checks == [None, "full", light], (checks, r.stderr)
    assert all(e["restore_check_mode"] == "auto" for e in _of(d, "launch"))
    record = d / ".ckpt" / "restore-check.json"
    assert record.exists() == (mode in VOUCHING), r.stderr
    # The next ckpt run of the same command.
    r = _auto_run(tmp_path, d, mode, 12, out, "--again")
    assert r.returncode == 0, r.stderr
    assert _of(d, "launch")[-1]["restore_check"] == light, r.stderr
    assert json.loads(out.read_text()) == json.loads(ref.read_text())
    if mode in VOUCHING:
        rec = json.loads(record.read_text())
        assert rec["v"] == 1 and rec["ranks"] == 1 and rec["command"] == [PY, str(tmp_path / "auto_job.py"), str(out)], rec
        assert [e["seq"] for e in _of(d, "restore_verified")] == [3, 5, 8], r.stderr
    else:
        assert not _of(d, "restore_verified"), r.stderr
    assert_no_survivors(d)


@pytest.mark.parametrize("more", [1, 6])
def test_auto_a_job_that_stops_vouching_gets_its_restore_verified_before_its_new_checkpoints_count(tmp_path, more):
    """The safety net of auto: a job that vouched (read_file) and then, with the same command,
    reads $CKPT_RESTORE by its own code is launched after the light check; its restore
    checkpoint, damaged (a digit of its state flipped, every size intact), is read unverified
    and the job saves what it computed. At that first new checkpoint (more=6: the job goes on;
    more=1: it is the job's last save before it exits, taken in at its exit) the supervisor
    verifies the restore in full, sets it aside and every checkpoint the launch wrote (slug
    `derived-from-damaged`), stops the job, drops the record and relaunches it from the
    checkpoint before, verified in full: the job ends with the uninterrupted result."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _auto_run(tmp_path, tmp_path / "ref-d", "direct", 8 + more, ref).returncode == 0
    d = tmp_path / "d"
    r = _auto_run(tmp_path, d, "read_file", 8, out, CRASH="3")
    assert r.returncode == 0, r.stderr
    assert (d / ".ckpt" / "restore-check.json").exists(), r.stderr
    newest = Store(d).list()[-1][0]
    f = Store(d).path_of(newest) / "state.json"
    text = f.read_text()
    at = text.index('"acc": ') + len('"acc": ') + 2
    _flip(f, at)
    # The job now reads by itself (MODE is not part of the command: the record still applies).
    r = _auto_run(tmp_path, d, "direct", 8 + more, out, "--again")
    assert r.returncode == 0, r.stderr
    launches = _of(d, "launch")
    assert [(e["restore_seq"], e["restore_check"]) for e in launches[-2:]] == [(newest, "client"), (newest - 1, "full")], r.stderr
    q = _quarantined(d)
    assert q[0].startswith(f"ckpt-{newest:012d}.checksum-mismatch."), q
    assert q[1:] and all(".derived-from-damaged." in n for n in q[1:]), q
    assert [e["seq"] for e in _of(d, "restore_rejected")] == [newest], r.stderr
    assert _of(d, "restore_check_full"), r.stderr
    assert not (d / ".ckpt" / "restore-check.json").exists()
    assert not (d / ".ckpt" / "light-launch.json").exists()
    assert json.loads(out.read_text()) == json.loads(ref.read_text())
    assert_no_survivors(d)


def test_auto_an_intact_netted_restore_leaves_no_marker_behind_a_killed_supervisor(tmp_path):
    """The net finds the restore checkpoint of an unvouched light launch intact: the marker
    goes at once (retention may then remove that checkpoint as the job saves on). A supervisor
    SIGKILLed later leaves nothing that makes the next `ckpt run` set the job's newer, intact
    checkpoints aside: it kills the leftover job, resumes from the newest, and the result is
    the uninterrupted one."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _auto_run(tmp_path, tmp_path / "ref-d", "read_file", 40, ref).returncode == 0
    d = tmp_path / "d"
    r = _auto_run(tmp_path, d, "read_file", 8, out, CRASH="3")
    assert r.returncode == 0 and (d / ".ckpt" / "restore-check.json").exists(), r.stderr
    job = tmp_path / "auto_job.py"
    # The same command now reads $CKPT_RESTORE itself (intact), slowly.
    p = subprocess.Popen([str(c) for c in _ckpt_run(d, "--again", cmd=[PY, job, out])], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env=clean_env(MODE="direct", STEPS="40", STEP_SLEEP="0.05"))
    try:
        wait_until(lambda: Store(d).list() and Store(d).list()[-1][0] >= 14, 60, "six new checkpoints")
        assert 8 not in [s for s, _ in Store(d).list()], "retention removed the netted restore"
        assert not (d / ".ckpt" / "light-launch.json").exists()
    finally:
        os.kill(p.pid, signal.SIGKILL)  # the supervisor only: its job is left running
        p.wait(30)
    r = _auto_run(tmp_path, d, "read_file", 40, out, "--again")
    assert r.returncode == 0, r.stderr
    assert _quarantined(d) == [], r.stderr
    assert json.loads(out.read_text()) == json.loads(ref.read_text())
    assert_no_survivors(d)


@pytest.mark.parametrize("marked", ["damaged", "intact", "fifo"])
def test_auto_a_supervisor_that_died_during_a_light_launch_is_followed_by_a_full_check(tmp_path, marked):
    """A light-checked launch is marked in `.ckpt/light-launch.json` until its client vouched;
    a supervisor killed meanwhile leaves the marker. The next `ckpt run` drops the record,
    verifies the checkpoint that launch restored: damaged, it and every newer checkpoint (which
    the dead launch may have computed from damaged bytes) are set aside and the job resumes
    from the one before; intact, nothing is set aside. Either way this start checks in full and
    the job ends with the uninterrupted result. A marker that is not a file ckpt wrote (a FIFO)
    is removed with a warning, without a hang."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _auto_run(tmp_path, tmp_path / "ref-d", "read_file", 12, ref).returncode == 0
    d = tmp_path / "d"
    r = _auto_run(tmp_path, d, "read_file", 8, out, CRASH="3")
    assert r.returncode == 0 and (d / ".ckpt" / "restore-check.json").exists(), r.stderr
    assert [s for s, _ in Store(d).list()] == [6, 7, 8]
    if marked == "damaged":
        f = Store(d).path_of(8) / "state.json"
        text = f.read_text()
        _flip(f, text.index('"acc": ') + len('"acc": ') + 2)
    # What the dead launch (restoring 8) published: checkpoint 9.
    ck = ckpt.Checkpointer(d)
    try:
        with ck.saving(step=9) as p:
            (p / "state.json").write_text(json.dumps({"step": 9, "acc": 0}))
            (p / "pad.bin").write_bytes(b"")
    finally:
        ck.close()
    marker = d / ".ckpt" / "light-launch.json"
    if marked == "fifo":
        os.mkfifo(marker)
    else:
        command = json.loads((d / ".ckpt" / "restore-check.json").read_text())["command"]
        marker.write_text(json.dumps({"v": 1, "seq": 8, "t_ms": 1, "command": command}))
    r = _auto_run(tmp_path, d, "read_file", 12, out, "--again")
    assert r.returncode == 0, r.stderr
    assert not marker.exists()
    assert _of(d, "launch")[-1]["restore_check"] == "full", "the record went with the marker"
    q = _quarantined(d)
    launch = _of(d, "launch")[-1]
    if marked == "damaged":
        assert q[0].startswith("ckpt-000000000008.checksum-mismatch.") and ".derived-from-damaged." in q[1], q
        assert len(q) == 2, q
        assert (launch["restore_seq"], launch["restore_check"]) == (7, "full"), r.stderr
        assert "is damaged" in r.stderr and "set aside" in r.stderr, r.stderr
    else:
        assert q == [], q
    if marked == "intact":
        # Checkpoint 9 is this test's own (step 9, acc 0): resumed from, verified in full.
        assert (launch["restore_seq"], launch["restore_check"]) == (9, "full"), r.stderr
        assert "verified in full now: intact" in r.stderr, r.stderr
    elif marked == "fifo":
        assert "light-launch.json" in r.stderr, r.stderr
        assert launch["restore_check"] == "full", r.stderr
    if marked == "damaged":
        assert json.loads(out.read_text()) == json.loads(ref.read_text())
    assert_no_survivors(d)


def test_training_state_damage_is_reported_not_numpys_error(planted, listener, monkeypatch, tmp_path):
    """ckpt.training.TrainState reads arrays.npz through the client: a flipped byte in it
    (which zipfile's own CRC check would meet first) is raised as InvalidCheckpoint naming the
    file, and under `CKPT_RESTORE_CHECK=client` reported once (`restore_failed`); an intact one
    restores and vouches (`restore_verified`)."""
    np = pytest.importorskip("numpy")
    import ckpt.training as tr
    d = tmp_path / "t"
    ck = ckpt.Checkpointer(d)
    try:
        ts = tr.TrainState(arrays={"w": np.arange(100_000, dtype=np.float64)})
        ts.step = 4
        ts.save(ck)
    finally:
        ck.close()
    sock, sock_path = listener
    for check in ("client", "full"):
        ck = _as_supervised(monkeypatch, d, 1, sock_path, check)
        try:
            w = np.zeros(100_000)
            assert tr.TrainState(arrays={"w": w}).restore(ck) and w[77] == 77.0
        finally:
            ck.close()
        assert [m["type"] for m in _messages(sock)] == ["hello", "restore_verified"], check
    f = Store(d).path_of(1) / "arrays.npz"
    _flip(f, f.stat().st_size // 2)
    for check in ("client", "full"):
        ck = _as_supervised(monkeypatch, d, 1, sock_path, check)
        try:
            w = np.zeros(100_000)
            with pytest.raises(InvalidCheckpoint) as e:
                tr.TrainState(arrays={"w": w}).restore(ck)
            assert "arrays.npz" in str(e.value) and e.value.slug == "checksum-mismatch"
            assert not w.any(), "nothing applied"
        finally:
            ck.close()
        sent = [m["type"] for m in _messages(sock)]
        assert sent == ["hello"] + (["restore_failed"] if check == "client" else []), (check, sent)


@pytest.mark.parametrize("planted_as", ["fifo", "symlink", "garbage", "other-command"])
def test_auto_a_hostile_or_foreign_record_means_a_full_check(tmp_path, planted_as):
    """What is at `.ckpt/restore-check.json` is read only as a regular file ckpt wrote, for this
    command: a FIFO (no hang), a symlink (not followed), garbage (a warning naming it) or
    another command's record leave the resume verified in full; the job's own vouch then
    replaces it with a record."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert _auto_run(tmp_path, tmp_path / "ref-d", "restore", 6, ref).returncode == 0
    d = tmp_path / "d"
    r = _auto_run(tmp_path, d, "restore", 3, out)
    assert r.returncode == 0, r.stderr
    rec = d / ".ckpt" / "restore-check.json"
    victim = tmp_path / "victim.json"
    good = {"v": 1, "command": [PY, "other.py"], "seq": 1, "ranks": 1, "t_ms": 1}
    victim.write_text(json.dumps(good))
    if planted_as == "fifo":
        os.mkfifo(rec)
    elif planted_as == "symlink":
        good["command"] = [PY, str(tmp_path / "auto_job.py"), str(out)]
        victim.write_text(json.dumps(good))  # would vouch, if followed
        os.symlink(victim, rec)
    elif planted_as == "garbage":
        rec.write_bytes(b"\x00not json")
    else:
        rec.write_text(json.dumps(good))
    before = victim.read_text()
    r = _auto_run(tmp_path, d, "restore", 6, out, "--again")
    assert r.returncode == 0, r.stderr
    assert _of(d, "launch")[-1]["restore_check"] == "full", r.stderr
    if planted_as != "other-command":
        assert "restore-check.json" in r.stderr, r.stderr
    assert victim.read_text() == before
    assert json.loads(rec.read_text())["command"] == [PY, str(tmp_path / "auto_job.py"), str(out)], "replaced by the job's own vouch"
    assert json.loads(out.read_text()) == json.loads(ref.read_text())
    assert_no_survivors(d)
