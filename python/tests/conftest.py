"""Helpers for the Python client's tests: the real ``ckpt`` binary (``target/debug/ckpt`` or
``$CKPT_BIN``), hard timeouts on every subprocess, polling instead of fixed sleeps, printed and
replayable random seeds (``CKPT_TEST_SEED``), and a check that no process of a job survives."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
PY_SRC = REPO / "python" / "src"
TRAINER = REPO / "test-programs" / "python_trainer.py"
VECTORS = REPO / "tests" / "vectors"

sys.path.insert(0, str(PY_SRC))

PROTOCOL_VARS = [
    "CKPT_DIR", "CKPT_RESTORE", "CKPT_RESTORE_SEQ", "CKPT_RESTORE_STEP", "CKPT_SOCKET",
    "CKPT_SIGNAL", "CKPT_RESTART_COUNT", "CKPT_PROTOCOL", "CKPT_SUPERVISOR_PID", "CKPT_RESTORE_CHECK",
    "CKPT_START",
]


def ckpt_bin() -> Path:
    p = Path(os.environ.get("CKPT_BIN") or REPO / "target" / "debug" / "ckpt")
    if not p.exists():
        pytest.fail(f"{p} is missing; hint: run `cargo build --workspace --bins` first (scripts/test does)")
    return p


def rust_bin(name: str) -> Path:
    p = ckpt_bin().parent / name
    if not p.exists():
        pytest.fail(f"{p} is missing; hint: run `cargo build --workspace --bins` first")
    return p


def clean_env(**extra: str) -> Dict[str, str]:
    """The test's environment without protocol variables, with the client importable."""
    env = {k: v for k, v in os.environ.items() if k not in PROTOCOL_VARS}
    env["PYTHONPATH"] = str(PY_SRC) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(cmd: List[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Runs to completion with a hard deadline (the process group is killed on timeout)."""
    kw.setdefault("env", clean_env())
    p = subprocess.Popen(
        [str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True, **kw,
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _killpg(p.pid)
        out, err = p.communicate()
        pytest.fail(f"{cmd} did not finish within {timeout}s\nstdout:\n{out}\nstderr:\n{err}")
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


class Bg:
    """A background process with a hard deadline; output goes to files."""

    def __init__(self, cmd: List[str], tmp: Path, timeout: float, env: Optional[Dict[str, str]] = None) -> None:
        self.out_path = tmp / f"out.{time.monotonic_ns()}"
        self.err_path = tmp / f"err.{time.monotonic_ns()}"
        self._out = open(self.out_path, "w")
        self._err = open(self.err_path, "w")
        self.deadline = time.monotonic() + timeout
        self.timeout = timeout
        self.p = subprocess.Popen(
            [str(c) for c in cmd], stdout=self._out, stderr=self._err, env=env or clean_env(),
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def wait(self) -> int:
        left = max(0.1, self.deadline - time.monotonic())
        try:
            return self.p.wait(timeout=left)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"process did not exit within {self.timeout}s\nstderr:\n{self.stderr}")

    def kill(self) -> None:
        _killpg(self.p.pid)
        self.p.wait()

    @property
    def stdout(self) -> str:
        self._out.flush()
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        self._err.flush()
        return self.err_path.read_text()


@pytest.fixture
def bg(tmp_path):
    """Starts background processes; any still running at the end of the test is killed."""
    started: List[Bg] = []

    def start(cmd: List[str], timeout: float = 60, env: Optional[Dict[str, str]] = None) -> Bg:
        b = Bg(cmd, tmp_path, timeout, env)
        started.append(b)
        return b

    yield start
    for b in started:
        if b.p.poll() is None:
            b.kill()


def wait_until(cond: Callable[[], object], timeout: float, what: str) -> object:
    """Polls ``cond`` until it returns something truthy (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


@pytest.fixture
def seed(request) -> int:
    """A random seed, printed; replay a failure with CKPT_TEST_SEED."""
    s = int(os.environ.get("CKPT_TEST_SEED") or random.randrange(1 << 32))
    print(f"{request.node.name}: seed {s} (replay with CKPT_TEST_SEED={s})")
    sys.stderr.write(f"{request.node.name}: seed {s} (replay with CKPT_TEST_SEED={s})\n")
    return s


def status(d: Path) -> dict:
    try:
        return json.loads((d / ".ckpt" / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def events(d: Path) -> List[dict]:
    out = []
    try:
        text = (d / ".ckpt" / "events.jsonl").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return out


def job_processes(d: Path) -> List[int]:
    """Live (non-zombie) processes whose environment holds ``CKPT_DIR=<d>``."""
    needle = f"CKPT_DIR={d}".encode()
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            st = open(f"/proc/{name}/stat").read()
            if st.rsplit(")", 1)[1].split()[0] == "Z":
                continue
            env = open(f"/proc/{name}/environ", "rb").read()
        except (OSError, IndexError):
            continue
        if needle in env.split(b"\0"):
            out.append(int(name))
    return out


def assert_no_survivors(d: Path) -> None:
    deadline = time.monotonic() + 5
    while True:
        left = job_processes(d)
        if not left:
            return
        if time.monotonic() > deadline:
            for p in left:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
            pytest.fail(f"processes of the job survived ckpt: {left}")
        time.sleep(0.02)


def digest_of(stdout: str) -> str:
    lines = [l for l in stdout.splitlines() if l.startswith("digest ")]
    assert lines, f"no digest line in output:\n{stdout}"
    return lines[-1].split()[1]


_REFERENCE: Dict[tuple, str] = {}


def reference_digest(tmp: Path, steps: int, fmt: str = "pickle") -> str:
    """The digest of an uninterrupted, unsupervised run (cached per process)."""
    key = (steps,)
    if key not in _REFERENCE:
        d = tmp / f"reference-{steps}"
        r = run([sys.executable, TRAINER, "--steps", str(steps), "--format", fmt], 60, env=clean_env(CKPT_DIR=str(d)))
        assert r.returncode == 0, r.stderr
        _REFERENCE[key] = digest_of(r.stdout)
        shutil.rmtree(d, ignore_errors=True)
    return _REFERENCE[key]


def copy_vector(name: str, dst: Path) -> Path:
    shutil.copytree(VECTORS / name, dst)
    return dst
