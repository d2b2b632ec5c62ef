"""Multi-rank Python jobs (docs/multi-rank.md): 4 Python ranks under a small torchrun-like
launcher (``test-programs/python_rank_launcher.py``) run by the real ``ckpt run``, with random
SIGKILLs of one rank, of all ranks and of the launcher (seeds printed, ``CKPT_TEST_SEED`` to
replay); the resumed job must end with the digest of an uninterrupted run, no restore may see a
partial checkpoint, nothing survives. Rust and Python ranks share checkpoints (and rounds):
Rust-written checkpoints restore in Python ranks, Python-written ones in Rust ranks, a mixed
job publishes checkpoints that ``ckpt verify`` accepts. Plus: world-size refusal and
``CKPT_RESHARD``, a rank dying mid-save with nobody to end the others, rank discovery order."""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from conftest import (
    REPO, assert_no_survivors, ckpt_bin, clean_env, events, job_processes, run, rust_bin, wait_until,
)

from ckpt import CkptError, World, read_manifest, verify_path
from ckpt.multi_rank import epoch_from_env

PY = sys.executable
TRAINER = REPO / "test-programs" / "python_rank_trainer.py"
LAUNCHER = REPO / "test-programs" / "python_rank_launcher.py"


def trainer(steps: int, out: Path, save_ms: int = 40, fmt: str = "bin") -> List[str]:
    return [PY, str(TRAINER), "--steps", str(steps), "--step-ms", "3", "--save-ms", str(save_ms),
            "--pad-kib", "8", "--format", fmt, "--out", str(out)]


def reference(world: int, steps: int) -> str:
    r = run([PY, TRAINER, "--reference", "--world", world, "--steps", steps], 30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def combined(world: int, out: Path) -> str:
    ds = []
    for r in range(world):
        p = out / f"digest-{r}"
        assert p.exists(), f"rank {r} wrote no digest"
        ds.append(p.read_text())
    res = run([PY, TRAINER, "--combine", ",".join(ds)], 30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def checkpoints(d: Path) -> List[int]:
    try:
        return sorted(int(n[5:]) for n in os.listdir(d) if n.startswith("ckpt-") and n[5:].isdigit())
    except OSError:
        return []


def job_ranks(d: Path) -> List[Tuple[int, Optional[int]]]:
    """The job's processes: (pid, rank), rank ``None`` for the launcher."""
    out = []
    for pid in job_processes(d):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        rank = next((int(kv[5:]) for kv in env if kv.startswith(b"RANK=")), None)
        out.append((pid, rank))
    return out


def _ls(p: Path) -> List[str]:
    """The names in ``p``, or none: round and launch directories vanish while a test looks
    (pathlib's glob raises then)."""
    try:
        return os.listdir(p)
    except OSError:
        return []


def _rounds(d: Path) -> List[Path]:
    """Every round directory of every launch (``rounds/<epoch>/<k>``, ``<k>`` all digits)."""
    base = d / ".ckpt" / "rounds"
    return [base / e / k for e in _ls(base) for k in _ls(base / e) if k.isdigit()]


def stage_shards(d: Path) -> List[Path]:
    """Shard directories waiting in the stage of any save round."""
    return [r / "stage" / n for r in _rounds(d) for n in _ls(r / "stage") if n.startswith("rank-")]


def mid_save(d: Path) -> bool:
    """Some rank is writing its shard (live staging dir) or a shard waits in a round."""
    try:
        names = os.listdir(d / ".ckpt" / "staging")
    except OSError:
        names = []
    live = any(n.rsplit(".", 1)[-1].isdigit() and os.path.exists(f"/proc/{n.rsplit('.', 1)[-1]}") for n in names)
    return live or bool(stage_shards(d))


def mid_gather(d: Path) -> bool:
    """A round is gathering: some rank proposed, the coordinator has not written ``agreed`` yet
    (nor did the round end)."""
    for r in _rounds(d):
        names = _ls(r)
        if any(n.startswith("propose-") for n in names) and not {"agreed", "published", "aborted"} & set(names):
            return True
    return False


def assert_complete_checkpoints(d: Path, world: int) -> None:
    """Every published checkpoint verifies and holds exactly one shard per rank."""
    for seq in checkpoints(d):
        m = verify_path(d / f"ckpt-{seq:012d}", seq)
        assert m.world_size == world, f"checkpoint {seq}: world_size {m.world_size}"
        # Every client sums shards with CRC-32 (zlib in Python): C speed without extra packages.
        assert m.checksum == "crc32", f"checkpoint {seq}: checksum {m.checksum}"
        states = sorted(f.name for f in m.files if f.name.endswith("/state.bin") or f.name.endswith("/state.pickle"))
        assert [s.split("/")[0] for s in states] == [f"rank-{r:05d}" for r in range(world)], (seq, states)


def assert_restores_complete(out: Path, world: int) -> int:
    try:
        lines = (out / "restores.log").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        assert line.endswith(f"world {world} shards {world}"), f"a partial or foreign checkpoint was restored: {line}"
    return len(lines)


def ckpt_verify(d: Path) -> str:
    r = run([ckpt_bin(), "verify", "--dir", d], 60)
    assert r.returncode == 0, f"ckpt verify failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def launch_cmd(d: Path, n: int, prog: List[str], *opts: str) -> List[str]:
    return [str(ckpt_bin()), "run", "--quiet", "--backoff", "20ms..100ms", "--dir", str(d), *opts, "--",
            PY, str(LAUNCHER), "--n", str(n), "--", *prog]


def test_four_python_ranks_random_kills_resume_to_the_same_digest(tmp_path, bg, seed):
    random_kills(tmp_path, bg, seed, 4, 600, lambda out: trainer(600, out), 4)


README = REPO / "test-programs" / "python_readme_trainer.py"


@pytest.mark.parametrize("flag", [None, "--no-step", "--async"],
                         ids=["save-with-step", "save-without-step", "save-async"])
def test_readme_pattern_unchanged_under_a_launcher(tmp_path, bg, seed, flag):
    """The README's single-process loop (``if ck.should_checkpoint(): ck.save(state,
    step=step)``, ``ck.save(state)``, ``ck.save_async(state, step=step)``) run unchanged by 3
    ranks under the torchrun-like launcher with random kills: the ranks agree on the count of
    should_checkpoint() calls, carried across resumes by the checkpoint's step; the result is
    bit-identical."""

    def prog(out: Path) -> List[str]:
        return [PY, str(README), "--steps", "400", "--step-ms", "3", "--out", str(out)] + ([flag] if flag else [])

    d = random_kills(tmp_path, bg, seed, 3, 400, prog, 3)
    # The step recorded is the README's loop variable (save(step=step)) or the count.
    steps = [read_manifest(d / f"ckpt-{s:012d}").step for s in checkpoints(d)]
    assert steps and all(isinstance(x, int) and 0 <= x <= 400 for x in steps), steps
    assert steps == sorted(steps), f"the step went backwards across a resume: {steps}"


def random_kills(tmp_path: Path, bg, seed: int, world: int, steps: int, prog, rounds: int,
                 whats: Tuple[str, ...] = ("one rank", "all ranks", "the launcher")) -> Path:
    """Runs ``prog(out)`` as ``world`` ranks under ``ckpt run`` and the Python launcher with
    ``rounds`` random SIGKILLs (of one of ``whats``: one rank, all ranks, the launcher, or the
    coordinator (rank 0, also while the round gathers proposals); mid-save or between saves);
    checks the digest, the restores, every checkpoint, that nothing survives. Returns DIR."""
    rnd = random.Random(seed)
    d, out = tmp_path / "d", tmp_path / "out"
    out.mkdir()
    sup = bg(launch_cmd(d, world, prog(out), "--every", "150ms", "--max-failures", "30"), timeout=80)
    deadline = time.monotonic() + 70
    kills = 0
    at_first_kill: Optional[int] = None
    for i in range(rounds):
        what = rnd.choice(list(whats))
        mid = rnd.random() < 0.5
        # The coordinator is killed at each moment in turn: while the round gathers the
        # proposals (before ``agreed``), mid-save, between saves.
        gather = what == "the coordinator" and i % 3 == 0
        if what == "the coordinator":
            mid = i % 3 != 2
        # The newest checkpoint's number, not the count: retention keeps the count flat.
        base = (checkpoints(d) or [0])[-1]
        target: List[int] = []
        while sup.p.poll() is None:
            assert time.monotonic() < deadline, f"job did not finish in time\n{sup.stderr}"
            if gather:
                ready = mid_gather(d)
            else:
                ready = mid_save(d) if mid else ((checkpoints(d) or [0])[-1] > base and not mid_save(d))
            procs = job_ranks(d)
            ranks = [p for p, r in procs if r is not None]
            if ready and len(ranks) == world:
                if what == "one rank":
                    target = [rnd.choice(ranks)]
                elif what == "all ranks":
                    target = ranks
                elif what == "the coordinator":
                    target = [p for p, r in procs if r == 0]
                else:
                    target = [p for p, r in procs if r is None]
                break
            time.sleep(0.001)
        if not target:
            break
        launches = len([e for e in events(d) if e["event"] == "launch"])
        if at_first_kill is None:
            at_first_kill = max(checkpoints(d), default=0)
        for p in target:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        kills += 1
        moment = "mid-gather" if gather else "mid-save" if mid else "between saves"
        msg = f"kill {i}: SIGKILL {what} {target} {moment} (checkpoints {checkpoints(d)})"
        print(msg)
        sys.stderr.write(msg + "\n")
        # The next launch is up before the next kill.
        wait_until(lambda: sup.p.poll() is not None
                   or len([e for e in events(d) if e["event"] == "launch"]) > launches, 30, "a relaunch")
    code = sup.wait()
    assert code == 0, sup.stderr
    # Every planned kill found its moment (a test that quietly did fewer would prove less).
    assert kills == rounds, f"only {kills} of {rounds} kills happened"
    assert combined(world, out) == reference(world, steps), sup.stderr
    restores = assert_restores_complete(out, world)
    assert_complete_checkpoints(d, world)
    assert_no_survivors(d)
    assert not stage_shards(d)
    if whats == ("the coordinator",):
        # Later rounds published without the killed coordinator's process.
        assert max(checkpoints(d), default=0) > (at_first_kill or 0), "no checkpoint was published after the first kill"
    print(f"{kills} kills, {restores} shard restores, checkpoints {checkpoints(d)}")
    return d


def test_coordinator_killed_mid_round_resumes_to_the_same_digest(tmp_path, bg, seed):
    """The coordinator (rank 0: it alone gathers the proposals and done markers, writes
    ``agreed`` and publishes) SIGKILLed while a round gathers proposals, mid-save and between
    saves: nothing partial is visible, the next launch's rounds publish, bit-identical digest."""
    random_kills(tmp_path, bg, seed, 4, 900, lambda out: trainer(900, out), 4, whats=("the coordinator",))


@pytest.mark.parametrize("fmt", ["bin", "pickle"], ids=["saving", "save"])
def test_explicit_steps_apart_from_the_call_count_publish_and_resume(tmp_path, bg, fmt):
    """The twin of tests/multi_rank.rs explicit_steps_apart_from_the_call_count_publish_and_resume:
    2 Python ranks give ckpt 10 x their loop's step (``should_checkpoint(step=10 * i)``, the save
    with it), while a request's proposal is the position plus the lookahead (2). Every checkpoint
    records the explicit step (10 x the loop step in every shard); the job, all ranks SIGKILLed
    after a checkpoint, resumes from it and ends bit-identical. Before, the agreed step (a
    position + 2) was never reached: every round was abandoned, nothing was published."""
    world, steps, scale = 2, 400, 10
    d, out = tmp_path / "d", tmp_path / "out"
    out.mkdir()
    prog = trainer(steps, out, fmt=fmt) + ["--step-scale", str(scale)]
    sup = bg(launch_cmd(d, world, prog, "--every", "150ms"), timeout=60,
             env=clean_env(CKPT_ROUND_TIMEOUT="10"))

    def ready() -> List[int]:
        assert sup.p.poll() is None, f"the job ended before any checkpoint was published\n{sup.stderr}"
        ranks = [p for p, r in job_ranks(d) if r is not None]
        return ranks if checkpoints(d) and not mid_save(d) and len(ranks) == world else []

    ranks = wait_until(ready, 40, "a checkpoint, no save running, every rank up")
    for p in ranks:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:  # gone meanwhile (as in random_kills): the relaunch is checked
            pass
    print(f"SIGKILL all ranks {ranks} (checkpoints {checkpoints(d)})")
    assert sup.wait() == 0, sup.stderr
    assert "abandon" not in sup.stderr and "past its save point" not in sup.stderr, sup.stderr
    assert "Traceback" not in sup.stderr, sup.stderr
    # One launch, the kill, one relaunch: no other failure.
    assert len([e for e in events(d) if e["event"] == "launch"]) == 2, (events(d), sup.stderr)
    assert combined(world, out) == reference(world, steps), sup.stderr
    assert_complete_checkpoints(d, world)
    seqs = checkpoints(d)
    assert seqs
    for seq in seqs:
        c = d / f"ckpt-{seq:012d}"
        m = verify_path(c, seq)
        for r in range(world):
            if fmt == "bin":
                own = struct.unpack("<Q", (c / f"rank-{r:05d}" / "state.bin").read_bytes()[:8])[0]
            else:
                import pickle

                own = pickle.loads((c / f"rank-{r:05d}" / "state.pickle").read_bytes())["step"]
            assert m.step == own * scale, (seq, r, own, m.step)
    restores = assert_restores_complete(out, world)
    assert restores >= world, "no resume"
    for line in (out / "restores.log").read_text().splitlines():
        step = int(line.split()[5])
        assert step > 0 and step % scale == 0, line
    assert_no_survivors(d)
    print(f"{restores} shard restores, checkpoints {seqs}")


def _bench_scale():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "python" / "bench_scale.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_scale_recipes_run():
    """The two measurements of docs/multi-rank.md "Scale", as written there but small (2 ranks,
    2 rounds; the same client or build for "before" and "after"): each prints its table, and
    every row shows the coordinator naming each other rank's files once per round (2 in all)."""
    import shutil

    src = str(REPO / "python" / "src")
    r = run([PY, REPO / "python" / "bench_scale.py", "--worlds", "2", "--rounds", "2", "--repeat", "1",
             "--clients", f"{src},{src}"], 120, env=clean_env(PYTHONPATH=src))
    assert r.returncode == 0, r.stderr
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith(f"| {src} | 2 |")]
    assert len(rows) == 2 and all(x[9].strip() == "2" for x in rows), r.stdout
    if shutil.which("strace") is None:
        assert "CI" not in os.environ, "strace is needed: scripts/setup must install it (Debian package strace)"
        return
    bins = str(ckpt_bin().parent)
    r = run([PY, REPO / "python" / "bench_scale.py", "--worlds", "2", "--rounds", "2", "--rust", f"{bins},{bins}"],
            180, env=clean_env())
    assert r.returncode == 0, r.stderr
    rows = [line.split("|") for line in r.stdout.splitlines() if line.startswith(f"| {bins} | 2 |")]
    assert len(rows) == 2 and all(x[11].strip() == "2" for x in rows), r.stdout


def test_round_cost_per_rank_is_flat_in_the_number_of_ranks(monkeypatch):
    """The cost of a save round per rank is flat in the number of ranks (docs/multi-rank.md,
    "Scale"), counted by ``python/bench_scale.py`` (the client's file-system calls in each rank
    process): a rank other than the coordinator never names another rank's ``propose-*`` or
    ``done-*`` file (it reads the round's ``agreed``, ``published``, ``aborted``); the
    coordinator reads each once per round; so over all ranks at most 2 (N-1) such calls per
    round, under 2 per rank, with 2 ranks as with 16. Before the coordinator, every rank read
    every proposal at every look and looked for every done marker: 2 (N-1) or more per rank."""
    import ckpt

    bench = _bench_scale()
    # The ranks import the client this test imports.
    monkeypatch.setenv("PYTHONPATH", str(Path(ckpt.__file__).resolve().parent.parent))
    for world in (2, 16):
        outs = bench.run(world, 4, 3)
        for i in range(3):
            rs = [o[i] for o in outs]
            assert [r["published"] for r in rs] == [True] + [False] * (world - 1), (world, i, rs)
            for rank, r in enumerate(rs[1:], 1):
                assert r["others"] == 0, f"{world} ranks, round {i + 1}: rank {rank} named other ranks' files: {r}"
            assert rs[0]["others"] <= 2 * (world - 1), f"{world} ranks, round {i + 1}: the coordinator: {rs[0]}"
            per_rank = sum(r["others"] for r in rs) / world
            assert per_rank < 2, (world, i, per_rank)
            print(f"{world} ranks, round {i + 1}: other ranks' files named per rank {per_rank:.2f}; "
                  f"lookups + reads: coordinator {rs[0]['lookup'] + rs[0]['read']}, "
                  f"others max {max(r['lookup'] + r['read'] for r in rs[1:])}")


def test_rust_python_and_mixed_ranks_share_checkpoints(tmp_path):
    """Rust ranks save; Python ranks of the same world size resume from their shards; then a
    job with Rust ranks 0 and 2 and Python ranks 1 and 3 resumes from the Python checkpoint
    and saves in the same rounds. The digest equals an uninterrupted run; ckpt verify passes."""
    world = 4
    d, out = tmp_path / "d", tmp_path / "out"
    out.mkdir()
    rust = [str(rust_bin("rank_trainer")), "--step-ms", "3", "--pad-kib", "8", "--out", str(out)]
    py = trainer(0, out, save_ms=0)

    def job(steps: int, launcher: List[str], prog: List[str], again: bool) -> None:
        cmd = [str(ckpt_bin()), "run", "--quiet", "--every", "100ms", "--max-failures", "1", "--dir", str(d)]
        if again:
            cmd.append("--again")
        r = run(cmd + ["--"] + launcher + prog + ["--steps", str(steps)], 60)
        assert r.returncode == 0, r.stderr

    # 1. Rust ranks (Rust launcher).
    job(150, [str(rust_bin("rank_launcher")), "--n", str(world), "--"], rust, False)
    rust_seqs = checkpoints(d)
    assert rust_seqs, "the Rust ranks saved nothing"
    assert read_manifest(d / f"ckpt-{rust_seqs[-1]:012d}").writer.startswith("ckpt-rust/")
    # 2. Python ranks resume from the Rust checkpoint.
    job(300, [PY, str(LAUNCHER), "--n", str(world), "--"], py, True)
    log = (out / "restores.log").read_text().splitlines()
    assert len(log) == world and all(f"seq {rust_seqs[-1]} " in l for l in log), log
    py_seqs = [s for s in checkpoints(d) if s > rust_seqs[-1]]
    assert py_seqs, "the Python ranks saved nothing"
    assert read_manifest(d / f"ckpt-{py_seqs[-1]:012d}").writer.startswith("ckpt-python/")
    ckpt_verify(d)
    # 3. Mixed: even ranks Rust, odd ranks Python, resuming from the Python checkpoint.
    mixed = (
        f'if [ $((RANK % 2)) = 0 ]; then exec {" ".join(rust)} "$@"; else exec {" ".join(py)} "$@"; fi'
    )
    job(450, [PY, str(LAUNCHER), "--n", str(world), "--", "sh", "-c", mixed, "sh"], [], True)
    log = (out / "restores.log").read_text().splitlines()[world:]
    assert len(log) == world and all(f"seq {py_seqs[-1]} " in l for l in log), log
    mixed_seqs = [s for s in checkpoints(d) if s > py_seqs[-1]]
    assert mixed_seqs, "the mixed job saved nothing"
    assert combined(world, out) == reference(world, 450)
    assert_restores_complete(out, world)
    assert_complete_checkpoints(d, world)
    text = ckpt_verify(d)
    print(text)
    assert_no_survivors(d)


def standalone_env(d: Path, rank: int, size: int, **extra: str) -> dict:
    return clean_env(**{"CKPT_DIR": str(d), "CKPT_RANK": str(rank), "CKPT_WORLD_SIZE": str(size), "CKPT_RUN_ID": "t",
                        **extra})


def test_world_size_mismatch_refused_and_reshard_reads_every_shard(tmp_path):
    d, out = tmp_path / "d", tmp_path / "out"
    out.mkdir()
    r = run([ckpt_bin(), "run", "--quiet", "--every", "100ms", "--max-failures", "1", "--dir", d, "--",
             PY, LAUNCHER, "--n", "4", "--", *trainer(200, out, save_ms=0, fmt="pickle")], 60)
    assert r.returncode == 0, r.stderr
    assert checkpoints(d)
    assert_complete_checkpoints(d, 4)
    # A 2-rank Python job refuses the 4-rank checkpoint, naming both sizes.
    r = run([ckpt_bin(), "run", "--again", "--max-failures", "1", "--dir", d, "--",
             PY, LAUNCHER, "--n", "2", "--", *trainer(300, out)], 60)
    assert r.returncode != 0
    assert "saved by a job of 4 rank(s), this job runs with 2 rank(s)" in r.stderr, r.stderr
    assert_no_survivors(d)
    # With CKPT_RESHARD=1 a job of 2 gets the whole checkpoint and reads every shard.
    job = (
        "import ckpt, pickle\n"
        "ck = ckpt.Checkpointer()\n"
        "rp = ck.restore_point\n"
        "n = rp.manifest.world_size\n"
        "states = [pickle.loads(ck.read_shard_file(r, 'state.pickle')) for r in range(n)]\n"
        "assert [s['rank'] for s in states] == list(range(n)), states\n"
        "assert sorted(p.name for p in ck.restore_dir().iterdir() if p.is_dir()) == [f'rank-{r:05d}' for r in range(n)]\n"
        "print('resharded', n, ck.rank, ck.world_size, states[0]['step'])\n"
    )
    for rank in range(2):
        r = run([PY, "-c", job], 30, env=standalone_env(d, rank, 2, CKPT_RESHARD="1"))
        assert r.returncode == 0, r.stderr
        assert f"resharded 4 {rank} 2" in r.stdout
    # Without it, the same standalone job is refused too (at its first read of the checkpoint).
    r = run([PY, "-c", "import ckpt; ckpt.Checkpointer().restore()"], 30, env=standalone_env(d, 0, 2))
    assert r.returncode != 0 and "saved by a job of 4 rank(s), this job runs with 2 rank(s)" in r.stderr


def _catches_usr1(pid: int) -> bool:
    """Whether process `pid` has a SIGUSR1 handler installed (its client is ready)."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGUSR1 - 1)))
    except OSError:
        pass
    return False


@pytest.mark.parametrize("victim", [1, 0], ids=["rank-1", "coordinator"])
def test_rank_dying_mid_save_leaves_no_partial_checkpoint(tmp_path, bg, victim):
    """Ranks without a launcher: rank 1, or the coordinator (rank 0, which alone gathers and
    publishes), dies while writing its shard; the others abandon the round after
    CKPT_ROUND_TIMEOUT (they do not hang), nothing is published and their shards are removed.
    After the coordinator's death, a new launch on the same directory saves: its round
    publishes, with the digest of an uninterrupted run."""
    d, out = tmp_path / "d", tmp_path / "out"
    out.mkdir()
    world = 4
    kids = [bg(trainer(1200, out, save_ms=400), timeout=40,
               env=standalone_env(d, r, world, CKPT_ROUND_TIMEOUT="1")) for r in range(world)]

    wait_until(lambda: all(_catches_usr1(k.pid) for k in kids), 20, "every rank's handlers")
    for k in kids:
        os.kill(k.pid, signal.SIGUSR1)
    pid1 = kids[victim].pid
    wait_until(lambda: any(n.endswith(f".{pid1}") for n in os.listdir(d / ".ckpt" / "staging")), 20,
               f"rank {victim} writing its shard")
    os.kill(pid1, signal.SIGKILL)
    kids[victim].p.wait()
    for r, k in enumerate(kids):
        if r != victim:
            assert k.wait() == 0, f"rank {r}: {k.stderr}"
            assert "abandon" in k.stderr, k.stderr
    assert checkpoints(d) == [], f"a checkpoint was published without rank {victim}'s shard"
    assert not stage_shards(d), stage_shards(d)
    rounds = list((d / ".ckpt" / "rounds" / "t.0").iterdir())
    assert any((r / "aborted").exists() for r in rounds), rounds
    assert_no_survivors(d)
    if victim != 0:
        return
    # A later launch (a new run id) on the same directory: one request to one rank, its round
    # publishes, bit-identical result.
    out2 = tmp_path / "out2"
    out2.mkdir()
    steps = 300
    kids = [bg(trainer(steps, out2, save_ms=0), timeout=60,
               env=standalone_env(d, r, world, CKPT_ROUND_TIMEOUT="1", CKPT_RUN_ID="t2")) for r in range(world)]
    wait_until(lambda: all(_catches_usr1(k.pid) for k in kids), 20, "every rank's handlers")
    os.kill(kids[2].pid, signal.SIGUSR1)
    for r, k in enumerate(kids):
        assert k.wait() == 0, f"rank {r}: {k.stderr}"
    assert len(checkpoints(d)) == 1, checkpoints(d)
    assert_complete_checkpoints(d, world)
    assert combined(world, out2) == reference(world, steps)
    assert_no_survivors(d)


@pytest.mark.parametrize("lang", ["python", "rust"])
@pytest.mark.parametrize("when,victim", [("between", 3), ("mid-save", 0)], ids=["between-saves", "coordinator-mid-save"])
def test_stop_without_a_dead_rank_exits_143_naming_it(tmp_path, bg, lang, when, victim):
    """docs/multi-rank.md, "A stop that cannot complete": ranks started directly, one SIGKILLed
    (between saves; or the coordinator while writing its shard), the others asked to stop
    (SIGTERM, as srun -K and torchrun do) with CKPT_STOP_TIMEOUT=1s: they cannot complete a stop
    round without it, so each exits with status 143 within 5 s plus the stop timeout, one of
    them naming the rank that never joined; nothing is published, no shard is left. Before,
    they waited for it until CKPT_ROUND_TIMEOUT (300 s)."""
    d, out = tmp_path / "d", tmp_path / "out"
    out.mkdir()
    world, stop_s = 4, 1.0
    prog = trainer(100000, out, save_ms=400 if when == "mid-save" else 40)
    if lang == "rust":
        prog = [str(rust_bin("rank_trainer")), *prog[2:]]
        prog = [a for a in prog if a not in ("--format", "bin")]
    kids = [bg(prog, timeout=60, env=standalone_env(d, r, world, CKPT_STOP_TIMEOUT=f"{stop_s}s"))
            for r in range(world)]
    wait_until(lambda: all(_catches_usr1(k.pid) for k in kids), 20, "every rank's handlers")
    if when == "mid-save":
        for k in kids:
            os.kill(k.pid, signal.SIGUSR1)
        pid = kids[victim].pid
        wait_until(lambda: any(n.endswith(f".{pid}") for n in os.listdir(d / ".ckpt" / "staging")), 20,
                   f"rank {victim} writing its shard")
    os.kill(kids[victim].pid, signal.SIGKILL)
    kids[victim].p.wait()
    t = time.monotonic()
    for r, k in enumerate(kids):
        if r != victim:
            os.kill(k.pid, signal.SIGTERM)
    for r, k in enumerate(kids):
        if r != victim:
            assert k.wait() == 143, f"rank {r}: {k.stderr}"
    took = time.monotonic() - t
    print(f"{lang} {when}: the survivors of rank {victim} exited 143 after {took:.2f}s")
    # The mid-save bound adds the survivors' own save (400 ms here).
    assert took < 5 + stop_s + (0.4 if when == "mid-save" else 0), took
    errs = "".join(k.stderr for r, k in enumerate(kids) if r != victim)
    assert f"the stop checkpoint cannot complete: rank(s) {victim} never joined it" in errs, errs
    assert checkpoints(d) == [], checkpoints(d)
    assert not stage_shards(d), stage_shards(d)
    assert (d / ".ckpt" / "rounds" / "t.0" / "left").exists()
    assert_no_survivors(d)


def test_a_late_rank_follows_the_coordinators_horizon(tmp_path):
    """docs/multi-rank.md, "Late ranks": rank 0 proposes (position 10 + lookahead 2) and waits at
    its bound 12; rank 1 has not looked yet. After the longest pause (20 ms) rank 0 writes
    ``horizon`` 14 and runs on; rank 1, late, proposes 13 + 2 = 15; the agreed step is the
    highest of both proposals and the horizon, and both ranks are true there only."""
    from ckpt.multi_rank import MultiRank
    from ckpt.store import Store

    store = Store(tmp_path / "ckpt")
    store.create()
    r0 = MultiRank(store, World(0, 2), "h.0")
    r1 = MultiRank(store, World(1, 2), "h.0")
    r0.timeout = r1.timeout = 30.0
    assert r0.lookahead == 2
    rd = store.private / "rounds" / "h.0" / "00000001"
    assert not r0.poll(True, False, 10)
    assert not r0.poll(False, False, 11)
    t = time.monotonic()
    assert not r0.poll(False, False, 12), "rank 0 passed its bound without an agreement"
    assert time.monotonic() - t < 5, "rank 0 waited at its bound instead of moving the horizon on"
    assert (rd / "horizon").read_bytes() == b'{"step":14}'
    assert not (rd / "agreed").exists()
    assert not r0.poll(False, False, 13)
    # Rank 1 looks for the first time at its position 13: it joins and proposes 15.
    assert not r1.poll(False, False, 13)
    assert (rd / "propose-00001").read_bytes() == b'{"step":15,"stop":false}'
    assert not r0.poll(False, False, 14)  # at its bound: gathers both proposals
    assert (rd / "agreed").read_bytes() == b'{"step":15,"stop":false}'
    assert not r1.poll(False, False, 14)
    assert r0.poll(False, False, 15) and r1.poll(False, False, 15)



def test_the_coordinator_gathers_at_every_call_before_its_proposal(tmp_path):
    """docs/multi-rank.md, "Waiting" (the Python twin of the Rust test of the same name): the
    request reaches rank 1 one step before rank 0; rank 1 proposes 470 and blocks there, rank 0
    proposes 471 and, at 470, must gather at once (not "every 20 ms"): otherwise it would go
    on into the next collective and both would wait until the round timeout."""
    from ckpt.multi_rank import MultiRank
    from ckpt.store import Store

    store = Store(tmp_path / "ckpt")
    store.create()
    r0 = MultiRank(store, World(0, 2), "g.0")
    r1 = MultiRank(store, World(1, 2), "g.0")
    r0.timeout = r1.timeout = 30.0
    rd = store.private / "rounds" / "g.0" / "00000001"
    assert not r1.poll(True, False, 468)
    assert (rd / "propose-00001").read_bytes() == b'{"step":470,"stop":false}'
    assert not r0.poll(True, False, 469)
    assert (rd / "propose-00000").read_bytes() == b'{"step":471,"stop":false}'
    assert not r0.poll(False, False, 470)
    assert (rd / "agreed").exists(), "rank 0 did not gather one step before its proposal"
    assert (rd / "agreed").read_bytes() == b'{"step":471,"stop":false}'
    assert not r1.poll(False, False, 470)
    assert r0.poll(False, False, 471) and r1.poll(False, False, 471)

_GLOO_JOB = r"""
import os, struct, sys, time
import ckpt
ck = ckpt.Checkpointer()
import torch, torch.distributed as dist
dist.init_process_group("gloo", rank=ck.rank, world_size=ck.world_size)
x = torch.zeros(4)
step = 0
if ck.restore_point is not None:
    step = struct.unpack("<Q", ck.read_file("state.bin"))[0]
open(os.path.join(sys.argv[1], f"ready-{ck.rank}"), "w").close()
while step < int(sys.argv[2]):
    step += 1
    x += 1
    dist.all_reduce(x)          # every step: the collective DDP makes
    time.sleep(0.002)
    if ck.should_checkpoint(step=step):
        with ck.saving(step=step) as d:
            (d / "state.bin").write_bytes(struct.pack("<Q", step))
dist.destroy_process_group()
ck.close()
"""


@pytest.mark.parametrize("lookahead", ["2", "0"])
def test_late_ranks_in_a_gloo_all_reduce_converge_quickly(tmp_path, bg, lookahead):
    """docs/multi-rank.md, "Late ranks", with real collectives: 3 ranks of torch.distributed
    (gloo) all-reduce every step (a few ms), only rank 0 is signalled (the others as on another
    node). Every request must publish within 5 s (before: rank 0 blocked at its proposal, the
    others inside the next all-reduce, until the round timeout). Skipped without torch."""
    from test_training import torch_python

    py = torch_python()
    d, out = tmp_path / "d", tmp_path / "out"
    out.mkdir()
    world = 3
    prog = [py, "-c", _GLOO_JOB, str(out), "1000000"]
    kids = [bg(prog, timeout=180, env=standalone_env(
        d, r, world, CKPT_ROUND_TIMEOUT="120", CKPT_ROUND_LOOKAHEAD=lookahead, MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(20000 + os.getpid() % 20000 + int(lookahead)), PYTHONPATH=str(REPO / "python" / "src")))
        for r in range(world)]
    wait_until(lambda: all((out / f"ready-{r}").exists() for r in range(world)), 120, "every rank's all-reduce")
    took = []
    for i in range(3):
        before = len(checkpoints(d))
        t = time.monotonic()
        os.kill(kids[0].pid, signal.SIGUSR1)
        while len(checkpoints(d)) <= before:
            assert all(k.p.poll() is None for k in kids), [k.stderr for k in kids]
            assert time.monotonic() - t < 5, f"request {i} to rank 0 not published within 5 s"
            time.sleep(0.002)
        took.append(time.monotonic() - t)
    print(f"lookahead {lookahead}: requests published after {[f'{x:.3f}s' for x in took]}")
    for k in kids:
        k.kill()
    assert_complete_checkpoints(d, world)


def test_rank_discovery_order(monkeypatch):
    for k in ["CKPT_RANK", "CKPT_WORLD_SIZE", "RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS",
              "SLURM_NTASKS", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
              "CKPT_RUN_ID", "CKPT_SUPERVISOR_PID", "CKPT_RESTART_COUNT", "TORCHELASTIC_RUN_ID",
              "SLURM_JOB_ID", "SLURM_STEP_ID", "OMPI_MCA_ess_base_jobid", "PMIX_NAMESPACE"]:
        monkeypatch.delenv(k, raising=False)
    assert World.from_env() is None
    # A batch script has SLURM_PROCID and SLURM_NTASKS but is not a rank of a step.
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert World.from_env() is None
    steps = [
        ("PMI_RANK", "PMI_SIZE", 5, 6, "PMI"),
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", 4, 6, "mpirun"),
        ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", 3, 6, "srun"),
        ("RANK", "WORLD_SIZE", 2, 6, "torchrun"),
        ("CKPT_RANK", "CKPT_WORLD_SIZE", 1, 6, "CKPT_RANK"),
    ]
    for r, s, rank, size, source in steps:  # each higher-priority source wins over the previous
        monkeypatch.setenv(r, str(rank))
        monkeypatch.setenv(s, str(size))
        w = World.from_env()
        assert w is not None and (w.rank, w.size, w.source) == (rank, size, source)
    monkeypatch.setenv("CKPT_RANK", "6")
    with pytest.raises(CkptError, match="not below the world size"):
        World.from_env()
    # The launch id: CKPT_RUN_ID, else the supervisor's restart count and pid, else the launcher's.
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "3")
    assert epoch_from_env() == "77-3.0"
    monkeypatch.setenv("CKPT_SUPERVISOR_PID", "1234")
    monkeypatch.setenv("CKPT_RESTART_COUNT", "2")
    assert epoch_from_env() == "r2.1234"
    monkeypatch.setenv("CKPT_RUN_ID", "my run/1")
    assert epoch_from_env() == "my_run_1.0"


def test_launcher_without_a_handler_is_never_signalled(tmp_path):
    """The supervisor signals the ranks that announced themselves, never the launcher: a bash
    launcher script with no trap (SIGUSR1 would kill it) runs 2 ranks to the end under
    frequent requests, with no restart, and the ranks still checkpoint together."""
    d, out = tmp_path / "d", tmp_path / "out"
    out.mkdir()
    prog = " ".join(trainer(500, out, save_ms=5))
    script = tmp_path / "launch.sh"
    script.write_text(
        "#!/bin/bash\n"
        f"RANK=0 WORLD_SIZE=2 {prog} &\n"
        f"RANK=1 WORLD_SIZE=2 {prog} &\n"
        "wait -n && wait -n\n"
    )
    script.chmod(0o755)
    r = run([ckpt_bin(), "run", "--quiet", "--every", "100ms", "--max-failures", "1", "--dir", d, "--", script], 60)
    assert r.returncode == 0, r.stderr
    ev = events(d)
    assert len([e for e in ev if e["event"] == "launch"]) == 1, ev
    assert len([e for e in ev if e["event"] == "request"]) >= 3, ev
    assert not any(e["event"] == "exit" and e.get("signaled") for e in ev), ev
    assert checkpoints(d), "no checkpoint"
    assert_complete_checkpoints(d, 2)
    assert combined(2, out) == reference(2, 500)
    assert_no_survivors(d)


def test_ranks_that_left_are_never_waited_for(tmp_path):
    """The Python side of tests/multi_rank.rs ranks_that_left_are_never_waited_for: rank 2
    leaves, rank 1 takes part in a round and leaves while rank 0 still waits for the outcome;
    rank 0's later requests must not wait for the departed ranks (before the fix they waited
    until CKPT_ROUND_TIMEOUT), and an explicit save fails with a message naming the cause."""
    import threading

    from ckpt.multi_rank import MultiRank
    from ckpt.store import Stage, Store

    store = Store(tmp_path / "ckpt")
    store.create()

    def rank(r: int) -> MultiRank:
        m = MultiRank(store, World(r, 3), "leave-test.0")
        m.timeout = 30.0
        return m

    r0, r1, r2 = rank(0), rank(1), rank(2)
    r2.leave()
    results: List[Tuple[bool, float]] = []

    def rank0() -> None:
        for step in range(10, 20):
            t = time.monotonic()
            results.append((r0.poll(True, False, step), time.monotonic() - t))

    th = threading.Thread(target=rank0)
    th.start()
    # Rank 0 first proposes and waits (as before the fix), or is already done polling.
    proposed = store.private / "rounds" / "leave-test.0" / "00000001" / "propose-00000"
    deadline = time.monotonic() + 10
    while not proposed.exists() and th.is_alive():
        assert time.monotonic() < deadline, "rank 0 neither proposed nor finished"
        time.sleep(0.005)
    t = time.monotonic()
    assert not r1.poll(True, False, 10), "a save was agreed without rank 2"
    assert time.monotonic() - t < 5
    r1.leave()
    th.join(60)
    assert not th.is_alive()
    assert all(not v for v, _ in results), "rank 0 agreed to save after ranks 1 and 2 left"
    assert max(d for _, d in results) < 5, f"rank 0 waited for a rank that left: {results}"
    assert r0.rank_left
    with pytest.raises(CkptError, match="a rank left"):
        r0.commit_shard(Stage(store, "crc32"), 20, 20, False, "test")
    assert not [n for n in os.listdir(store.dir) if n.startswith("ckpt-")]


def _raw_checkpoint(d: Path, seq: int, json_line: str, files: List[str]) -> Path:
    """A checkpoint directory with the given manifest JSON (trailer added) and empty files."""
    import zlib

    p = d / f"ckpt-{seq:012d}"
    for name in files:
        (p / name).parent.mkdir(parents=True, exist_ok=True)
        (p / name).write_bytes(b"")
    p.mkdir(parents=True, exist_ok=True)
    body = json_line.encode()
    (p / "MANIFEST.ckpt").write_bytes(body + b"\ncrc32:%08x\n" % zlib.crc32(body))
    return p


def _manifest_json(seq: int, files: List[str], world: "Optional[int | str]", meta: str = "") -> str:
    """``world``: the ``world_size`` value (an int, or JSON text written as is); None: omitted."""
    fs = ",".join(f'{{"name":"{n}","size":0,"sum":0}}' for n in sorted(files))
    ws = f',"world_size":{world}' if world is not None else ""
    mt = f',"meta":{meta}' if meta else ""
    return (f'{{"format":"ckpt","version":1,"seq":{seq},"step":3,"created_ms":1,"writer":"t",'
            f'"checksum":"crc32","files":[{fs}]{ws}{mt}}}')


@pytest.mark.parametrize("case", [
    "world-0", "world--1", "world-2^32", "world-2.0", "world-string", "world-null", "world-true",
    "rank-above-world", "missing-shard", "file-outside-shards", "duplicate-meta-key",
    "nested-duplicate-meta-key", "nesting-128", "valid-2-ranks", "nesting-127",
])
def test_invalid_manifests_rejected_by_both_readers(tmp_path, case):
    """world_size 0 or not an unsigned 32-bit integer (-1, 2^32, 2.0, "2", null, true: both
    messages name `world_size`; null was read as "absent" by both readers, a single-process
    checkpoint of files named rank-NNNNN/...), a rank at or above world_size, a missing shard, a
    file outside the shards, a key twice inside meta, JSON nested deeper than 127 levels: `ckpt
    verify` (Rust) and the Python reader both reject them as bad manifests, and a restore skips
    them; valid ones (including 127 levels) pass both."""
    two = ["rank-00000/a", "rank-00001/a"]
    deep = lambda n: '{"a":' + "[" * (n - 2) + "]" * (n - 2) + "}"  # noqa: E731 (+1: top level)
    cases = {
        "world-0": (["rank-00000/a"], 0, ""),
        "world--1": (two, "-1", ""),
        "world-2^32": (two, "4294967296", ""),
        "world-2.0": (two, "2.0", ""),
        "world-string": (two, '"2"', ""),
        "world-null": (two, "null", ""),
        "world-true": (two, "true", ""),
        "rank-above-world": (["rank-00000/a", "rank-00002/a"], 2, ""),
        "missing-shard": (["rank-00000/a", "rank-00000/b"], 2, ""),
        "file-outside-shards": (["rank-00000/a", "rank-00001/a", "x"], 2, ""),
        "duplicate-meta-key": (two, 2, '{"k":1,"k":2}'),
        "nested-duplicate-meta-key": (two, 2, '{"a":[{"k":1,"k":1}]}'),
        "nesting-128": (two, 2, deep(128)),
        "valid-2-ranks": (two, 2, '{"a":{"b":[1,{"c":null}]}}'),
        "nesting-127": (two, 2, deep(127)),
    }
    files, world, meta = cases[case]
    d = tmp_path / "d"
    p = _raw_checkpoint(d, 1, _manifest_json(1, files, world, meta), files)
    r = run([ckpt_bin(), "verify", "--dir", d], 30)
    if case.startswith(("valid", "nesting-127")):
        assert r.returncode == 0, r.stdout + r.stderr
        assert verify_path(p, 1).world_size == 2
        return
    assert r.returncode == 65, r.stdout + r.stderr
    from ckpt import InvalidCheckpoint

    with pytest.raises(InvalidCheckpoint) as e:
        verify_path(p, 1)
    assert e.value.slug == "bad-manifest", str(e.value)
    if case.startswith("world-"):
        assert "world_size" in (r.stdout + r.stderr).strip().splitlines()[0], r.stdout + r.stderr
        assert "world_size" in str(e.value), str(e.value)
    print(case, "| rust:", (r.stdout + r.stderr).strip().splitlines()[-1], "| python:", e.value)
    # A restore never hands it to a job: standalone ranks find no checkpoint to resume from.
    res = run([PY, "-c", "import ckpt; ck = ckpt.Checkpointer(); print('restore', ck.restore_point)"], 30,
              env=standalone_env(d, 0, 2))
    assert res.returncode == 0 and "restore None" in res.stdout, res.stdout + res.stderr


def test_round_timeout_forms():
    """The same table as tests/multi_rank.rs round_timeout_forms: both clients accept seconds
    and `ms`/`s`/`m` suffixes."""
    from ckpt.multi_rank import parse_round_timeout

    for v, want in [("300", 300.0), ("2.5", 2.5), ("2s", 2.0), (" 2 s ", 2.0), ("500ms", 0.5), ("5m", 300.0),
                    (".5", 0.5)]:
        assert parse_round_timeout(v) == want, v
    for v in ["", "0", "0s", "-1", "1e3", "inf", "nan", "s", "ms", ".", "2h", "2 5", "1.2.3", "2sec"]:
        assert parse_round_timeout(v) is None, v


def test_save_async_blocks_only_for_the_copy_and_exit_waits(tmp_path):
    """Single-rank Python save_async: returns while the write is still in flight, the
    checkpoint holds the state as it was at the call (later changes do not reach it), wait()
    returns the outcome, a second save waits for the first, and a job that exits right after
    save_async still publishes it (the exit waits)."""
    d = tmp_path / "d"
    job = (
        "import ckpt, os, sys, time\n"
        "ck = ckpt.Checkpointer(sys.argv[1])\n"
        "state = {'blob': os.urandom(64 << 20), 'n': 1}\n"
        "t = time.monotonic(); ck.save_async(state, step=1); blocked = time.monotonic() - t\n"
        "pending = ck.save_pending()\n"
        "state['n'] = 2\n"
        "s = ck.wait()\n"
        "assert s is not None and s.seq == 1 and s.step == 1, s\n"
        "assert ck.wait() is None\n"
        "print('blocked_ms', round(blocked * 1000, 1), 'save_ms', round(s.duration * 1000, 1), 'pending', pending)\n"
        "ck.save_async(state, step=2)\n"
        "ck.save_async(state, step=3)   # waits for step 2 first\n"
        "state['n'] = 3\n"
        "# exits at once: the interpreter's exit waits for the save in flight\n"
    )
    r = run([PY, "-c", job, d], 60, env=clean_env())
    assert r.returncode == 0, r.stderr
    print(r.stdout.strip())
    assert "pending True" in r.stdout, "save_async returned only after the write"
    import pickle

    got = {}
    for seq in (1, 2, 3):
        m = verify_path(d / f"ckpt-{seq:012d}", seq)
        got[seq] = (m.step, pickle.loads((d / f"ckpt-{seq:012d}" / "state.pickle").read_bytes())["n"])
    assert got == {1: (1, 1), 2: (2, 2), 3: (3, 2)}, got


def test_multi_rank_save_async_blocks_only_for_the_copy(tmp_path, bg):
    """Multi-rank Python save_async (2 ranks started directly): rank 0, the coordinator and
    publisher, returns from save_async while rank 1 has not even started its save (rank 1
    waits for rank 0's go-file, written only after rank 0's call returned), so the round cannot
    have published: save_pending() is True and no checkpoint exists yet. A save_async that
    waited for the round would wait for rank 1, which waits for it: rank 1 fails on its
    deadline. Each rank mutates its state in place right after the call; the checkpoint (seq 1,
    step 5) holds every rank's state as it was at the call."""
    d, sync = tmp_path / "d", tmp_path / "sync"
    sync.mkdir()
    job = (
        "import ckpt, hashlib, os, sys, time\n"
        "rank, sync = int(os.environ['CKPT_RANK']), sys.argv[1]\n"
        "def wait_for(name):\n"
        "    deadline = time.monotonic() + 30\n"
        "    while not os.path.exists(os.path.join(sync, name)):\n"
        "        assert time.monotonic() < deadline, f'rank {rank}: no {name} within 30 s'\n"
        "        time.sleep(0.002)\n"
        "ck = ckpt.Checkpointer()\n"
        "blob = bytearray(os.urandom(16 << 20))\n"
        "state = {'blob': blob, 'n': 1, 'rank': rank}\n"
        "print('rank', rank, 'sha', hashlib.sha256(blob).hexdigest(), flush=True)\n"
        "if rank == 1:\n"
        "    wait_for('go')\n"
        "t = time.monotonic(); ck.save_async(state, step=5); blocked = time.monotonic() - t\n"
        "pending = ck.save_pending()\n"
        "published = os.path.exists(os.path.join(os.environ['CKPT_DIR'], 'ckpt-000000000001'))\n"
        "blob[:] = bytes(len(blob)); state['n'] = 2   # changed in place right after the call\n"
        "print('rank', rank, 'blocked_ms', round(blocked * 1000, 1), 'pending', pending, 'published', published,\n"
        "      flush=True)\n"
        "if rank == 0:\n"
        "    open(os.path.join(sync, 'go'), 'w').close()\n"
        "s = ck.wait()\n"
        "assert s is not None and s.seq == 1 and s.step == 5, s\n"
        "print('rank', rank, 'saved', s.seq, 'save_ms', round(s.duration * 1000, 1), flush=True)\n"
        "ck.close()\n"
    )
    ranks = [bg([PY, "-c", job, sync], timeout=60, env=standalone_env(d, r, 2)) for r in range(2)]
    codes = [p.wait() for p in ranks]
    for p in ranks:
        print(p.stdout.strip())
    assert codes == [0, 0], "\n".join(p.stderr for p in ranks)
    out0 = ranks[0].stdout
    assert "pending True published False" in out0, out0
    assert_complete_checkpoints(d, 2)
    assert checkpoints(d) == [1]
    assert verify_path(d / "ckpt-000000000001", 1).step == 5
    restore = (
        "import ckpt, hashlib\n"
        "ck = ckpt.Checkpointer()\n"
        "st = ck.restore()\n"
        "print('restored', st['rank'], st['n'], hashlib.sha256(bytes(st['blob'])).hexdigest())\n"
        "ck.close()\n"
    )
    for r in range(2):
        res = run([PY, "-c", restore], 30, env=standalone_env(d, r, 2, CKPT_RUN_ID="t2"))
        assert res.returncode == 0, res.stderr
        sha = next(line.split()[3] for line in ranks[r].stdout.splitlines() if " sha " in line)
        assert res.stdout.split() == ["restored", str(r), "1", sha], (res.stdout, sha)
    assert_no_survivors(d)


@pytest.mark.parametrize("flag", [None, "--async"], ids=["save", "save-async"])
def test_stop_saves_every_shard_before_any_rank_exits(tmp_path, bg, flag):
    """A stop (SIGTERM to ckpt run) of 3 README-pattern ranks: they agree on a stop round,
    every rank's shard of it is published (with save_async too: should_stop waits for it)
    before any rank exits, the job exits 0 (ckpt run 75: run again) and is not relaunched,
    nothing survives."""
    d, out = tmp_path / "d", tmp_path / "out"
    out.mkdir()
    prog = [PY, str(README), "--steps", "1000000", "--step-ms", "2", "--out", str(out)] + ([flag] if flag else [])
    sup = bg(launch_cmd(d, 3, prog, "--every", "300ms", "--max-failures", "1"), timeout=60)
    wait_until(lambda: len(checkpoints(d)) >= 2, 40, "two checkpoints")
    before = checkpoints(d)[-1]
    sup.p.send_signal(signal.SIGTERM)
    code = sup.wait()
    ev = events(d)
    print(f"ckpt run exited {code}; checkpoints {checkpoints(d)}; job exit {[e for e in ev if e['event'] == 'exit']}")
    assert code == 75, sup.stderr  # stopped after a checkpoint: run again to resume
    assert [e["exit"] for e in ev if e["event"] == "exit"] == [0], "a rank did not exit 0"
    assert checkpoints(d)[-1] > before, "no stop checkpoint was published"
    assert_complete_checkpoints(d, 3)
    assert len([e for e in events(d) if e["event"] == "launch"]) == 1
    assert_no_survivors(d)


RESHARD_JOB = r"""
import ckpt, pickle, sys
new_world, step = int(sys.argv[1]), int(sys.argv[2])
ck = ckpt.Checkpointer()
rank = ck.rank

def reshard(old):
    # Every old shard is readable (verified); this rank takes the pieces r with r % new == rank.
    assert (old.rank, old.new_world_size) == (rank, new_world), old
    pieces = {}
    for r in range(old.world_size):
        assert old.names(r) == ["state.pickle"], old.names(r)
        for k, v in old.load(r)["pieces"].items():
            pieces[k] = v
    return {"pieces": {k: v for k, v in pieces.items() if k % new_world == rank}}

if len(sys.argv) > 3 and sys.argv[3] == "no-hook":
    try:
        ck.restore()
    except ckpt.CkptError as e:
        print("refused:", e)
        sys.exit(0)
    sys.exit("a checkpoint of another world size was restored without a hook")
state = ck.restore(reshard=reshard) if ck.restore_point else None
if state is None:
    # The first job: piece k (64 KiB of bytes derived from k) starts at rank k % world.
    state = {"pieces": {k: bytes((k * 7 + i) % 251 for i in range(65536)) for k in range(12) if k % new_world == rank}}
print("rank", rank, "of", new_world, "holds", sorted(state["pieces"]))
ck.save(state, step=step)
"""


def test_reshard_hook_4_to_2_to_4_ranks(tmp_path):
    """restore(reshard=fn): a job of 4 Python ranks saves 12 pieces spread over its shards; a
    job of 2 ranks restores it through the hook (read access to all 4 old shards) and saves; a
    job of 4 ranks restores that 2-rank checkpoint the same way. Every piece ends on the rank
    that first held it, bit-identical. Without a hook the refusal names both sizes."""
    d = tmp_path / "d"

    def job(world: int, step: int, *extra: str) -> List[str]:
        procs = [subprocess.Popen([PY, "-c", RESHARD_JOB, str(world), str(step), *extra],
                                  env=dict(standalone_env(d, r, world), CKPT_RUN_ID=f"reshard-{step}-{len(extra)}"),
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for r in range(world)]
        outs = []
        deadline = time.monotonic() + 60
        try:
            for r, p in enumerate(procs):
                o, e = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
                assert p.returncode == 0, f"rank {r} of {world}: {e}"
                outs.append(o)
        finally:
            for q in procs:
                if q.poll() is None:
                    q.kill()
                    q.wait()
        return outs

    def pieces(seq: int) -> dict:
        import pickle

        m = verify_path(d / f"ckpt-{seq:012d}", seq)
        got = {}
        for r in range(m.world_size):
            for k, v in pickle.loads((d / f"ckpt-{seq:012d}" / f"rank-{r:05d}" / "state.pickle").read_bytes())["pieces"].items():
                got[k] = (r, v)
        return got

    job(4, 10)
    first = pieces(checkpoints(d)[-1])
    assert sorted(first) == list(range(12)) and all(r == k % 4 for k, (r, _) in first.items())
    refused = job(2, 20, "no-hook")
    assert all("saved by a job of 4 rank(s), this job runs with 2 rank(s)" in o for o in refused), refused
    print(job(2, 20))
    two = pieces(checkpoints(d)[-1])
    assert verify_path(d / f"ckpt-{checkpoints(d)[-1]:012d}").world_size == 2
    assert {k: (k % 2, v) for k, (_, v) in first.items()} == two
    refused = job(4, 30, "no-hook")
    assert all("saved by a job of 2 rank(s), this job runs with 4 rank(s)" in o for o in refused), refused
    print(job(4, 30))
    assert pieces(checkpoints(d)[-1]) == first, "4 -> 2 -> 4 did not give back every piece on its rank"
    assert_no_survivors(d)


def test_ranks_recording_different_steps_publish_nothing(tmp_path):
    """Two ranks at the same agreed position (should_checkpoint() without a step) that give
    save different steps: the publisher refuses the shard records, the round is abandoned on
    both ranks, nothing is published; the next round with equal steps publishes."""
    d = tmp_path / "d"
    job = (
        "import ckpt, sys\n"
        "ck = ckpt.Checkpointer()\n"
        "ck.request_checkpoint()\n"
        "outcomes = []\n"
        "for label in (10 + ck.rank, 20):\n"
        "    while not ck.should_checkpoint():\n"
        "        ck.request_checkpoint()\n"
        "    try:\n"
        "        outcomes.append(ck.save({'r': ck.rank}, step=label).step)\n"
        "    except ckpt.CkptError as e:\n"
        "        outcomes.append(str(e))\n"
        "    ck.request_checkpoint()\n"
        "print(outcomes)\n"
    )
    env = lambda r: dict(standalone_env(d, r, 2), CKPT_ROUND_TIMEOUT="20s")  # noqa: E731
    procs = [subprocess.Popen([PY, "-c", job], env=env(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=40)
            assert p.returncode == 0, e
            outs.append(o)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(outs)
    assert any("does not match the round" in o for o in outs), outs
    assert all("abandoned" in o or "does not match" in o for o in outs), outs
    assert all(o.strip().endswith("20]") for o in outs), outs
    assert [verify_path(d / f"ckpt-{s:012d}", s).step for s in checkpoints(d)] == [20]


def test_reshard_hook_from_a_single_process_checkpoint(tmp_path):
    """A single-process checkpoint is one old shard (rank 0, at the top level) for the hook."""
    d = tmp_path / "d"
    r = run([PY, "-c", "import ckpt, sys; ckpt.Checkpointer(sys.argv[1]).save({'pieces': {0: b'a', 1: b'b'}}, step=7)",
             d], 30, env=clean_env())
    assert r.returncode == 0, r.stderr
    job = (
        "import ckpt\n"
        "ck = ckpt.Checkpointer()\n"
        "def fn(old):\n"
        "    assert (old.world_size, old.step, old.names(0)) == (1, 7, ['state.pickle']), old\n"
        "    assert old.dir(0) == ck.restore_point.path\n"
        "    return {k: v for k, v in old.load(0)['pieces'].items() if k % old.new_world_size == old.rank}\n"
        "print('got', ck.restore(reshard=fn))\n"
    )
    procs = [subprocess.Popen([PY, "-c", job], env=standalone_env(d, rank, 2), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    outs = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=30)
            assert p.returncode == 0, e
            outs.append(o.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert outs == ["got {0: b'a'}", "got {1: b'b'}"], outs
