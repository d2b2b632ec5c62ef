"""The real `ckpt` binary supervising Python jobs."""

import os
import random
import signal
import sys
import textwrap
import time

import pytest

from conftest import (
    TRAINER, assert_no_survivors, ckpt_bin, clean_env, digest_of, events, reference_digest,
    status, wait_until,
)

PY = sys.executable


def ckpt_run(d, *opts, cmd):
    return [ckpt_bin(), "run", "--dir", d, "--backoff", "10ms..50ms", *opts, "--", *map(str, cmd)]


def committed_seq(d):
    return status(d).get("last_seq") or 0


def test_random_sigkills_give_a_bit_identical_result(tmp_path, bg, seed):
    rnd = random.Random(seed)
    steps = 1500
    want = reference_digest(tmp_path, steps)
    d = tmp_path / "d"
    sup = bg(ckpt_run(d, "--every", "100ms", "--max-failures", "20", cmd=[PY, TRAINER, "--steps", steps, "--step-ms", "1"]), timeout=90)
    kills = 0
    last_pid = None
    for _ in range(3):
        # Wait for a fresh launch of the job that has committed something new, then kill it.
        base = committed_seq(d)
        if not wait_until(lambda: sup.p.poll() is not None or (status(d).get("job_pid") not in (None, last_pid) and committed_seq(d) > base), 30, "a new checkpoint from a new job"):
            break
        if sup.p.poll() is not None:
            break
        pid = status(d)["job_pid"]
        time.sleep(rnd.uniform(0, 0.3))  # a random moment in the job's life
        try:
            os.kill(pid, signal.SIGKILL)
            kills += 1
            last_pid = pid
        except ProcessLookupError:
            break
    code = sup.wait()
    assert code == 0, sup.stderr
    assert kills >= 2, f"only {kills} kills landed; the job ran too fast\n{sup.stderr}"
    assert digest_of(sup.stdout) == want, sup.stderr
    assert status(d)["restarts"] >= kills
    assert_no_survivors(d)


@pytest.mark.parametrize("fmt", ["npz", "pickle"])
def test_stop_and_resume(tmp_path, bg, fmt):
    steps = 3000
    want = reference_digest(tmp_path, steps)
    d = tmp_path / "d"
    cmd = ckpt_run(d, "--every", "off", cmd=[PY, TRAINER, "--steps", steps, "--step-ms", "1", "--format", fmt])
    sup = bg(cmd, timeout=60)
    wait_until(lambda: any(e["event"] == "hello" for e in events(d)), 30, "the client's hello")
    time.sleep(0.3)  # let it train a while: the stop must come mid-run, not at the start
    os.kill(sup.pid, signal.SIGTERM)
    assert sup.wait() == 75, sup.stderr
    assert "digest" not in sup.stdout
    assert committed_seq(d) >= 1
    assert_no_survivors(d)
    sup2 = bg(cmd, timeout=60)
    assert sup2.wait() == 0, sup2.stderr
    assert "resumed at step" in sup2.stderr
    assert digest_of(sup2.stdout) == want
    assert_no_survivors(d)


def test_slow_import_after_announcing_is_not_killed_by_requests(tmp_path, bg):
    d = tmp_path / "d"
    sup = bg(ckpt_run(d, "--every", "100ms", cmd=[PY, TRAINER, "--steps", 50, "--step-ms", "1", "--import-delay", "2"]), timeout=60)
    assert sup.wait() == 0, sup.stderr
    ev = events(d)
    hello = next(i for i, e in enumerate(ev) if e["event"] == "hello")
    first_commit = next(i for i, e in enumerate(ev) if e["event"] == "committed")
    requests_during_import = [e for e in ev[hello:first_commit] if e["event"] == "request"]
    # One request at a time: an unanswered one is repeated once per answer timeout (2 s here),
    # so the 2 s import sees at least one; none of them killed the job.
    assert len(requests_during_import) >= 1, ev
    assert status(d)["restarts"] == 0
    assert not any(e["event"] == "exit" and e.get("signaled") for e in ev), ev
    assert_no_survivors(d)


def test_no_request_before_the_client_announces(tmp_path, bg):
    """A plain Python job (no client) would die of SIGUSR1: the supervisor never sends it."""
    d = tmp_path / "d"
    job = "import time; time.sleep(1.5); print('done')"
    sup = bg(ckpt_run(d, "--every", "100ms", cmd=[PY, "-c", job]), timeout=30)
    assert sup.wait() == 0, sup.stderr
    assert "done" in sup.stdout
    ev = events(d)
    assert not any(e["event"] in ("request", "hello") for e in ev), ev
    assert status(d)["restarts"] == 0


WORKERS_JOB = textwrap.dedent(
    """
    import ckpt, multiprocessing as mp, os, sys, time
    ck = ckpt.Checkpointer()
    out = sys.argv[1]
    duration = float(sys.argv[2])

    def worker(i):
        # A data-loader worker: it sees the client it inherited, and must never act.
        seen = False
        save_error = ""
        end = time.monotonic() + duration
        while time.monotonic() < end:
            seen |= ck.should_checkpoint() or ck.should_stop()
            time.sleep(0.005)
        try:
            ck.save({"from": "worker"})
        except ckpt.CkptError as e:
            save_error = str(e)
        with open(f"{out}.{i}", "w") as f:
            f.write(f"{int(seen)} {os.getpid()} {save_error}")

    def spawned(q):
        # A spawn-context worker re-imports things: its own Checkpointer stays passive.
        c = ckpt.Checkpointer()
        q.put((c.should_checkpoint(), c.restore_point is not None or c.restore_point is None))

    if __name__ == "__main__":
        ws = [mp.get_context("fork").Process(target=worker, args=(i,), daemon=True) for i in range(2)]
        for w in ws:
            w.start()
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=spawned, args=(q,))
        p.start()
        print("spawned", q.get(timeout=30))
        p.join(30)
        saves = 0
        step = 0
        end = time.monotonic() + duration
        while time.monotonic() < end or (saves == 0 and time.monotonic() < end + 10):
            step += 1
            time.sleep(0.005)
            if ck.should_checkpoint():
                ck.save({"step": step}, step=step)
                saves += 1
            if ck.should_stop():
                print("stopping", saves, flush=True)
                sys.exit(0)
        for w in ws:
            w.join(30)
        print("saves", saves, flush=True)
    """
)


def test_forked_workers_never_act_on_requests(tmp_path, bg):
    d = tmp_path / "d"
    job = tmp_path / "job.py"
    job.write_text(WORKERS_JOB)
    out = tmp_path / "worker"
    sup = bg(ckpt_run(d, "--every", "100ms", cmd=[PY, job, out, "1.5"]), timeout=60)
    assert sup.wait() == 0, sup.stderr
    assert "spawned (False, True)" in sup.stdout, sup.stdout + sup.stderr
    saves = int(sup.stdout.split("saves")[1].split()[0])
    assert saves >= 3, sup.stdout
    for i in range(2):
        seen, _pid, err = (out.parent / f"worker.{i}").read_text().split(" ", 2)
        assert seen == "0", "a worker saw a checkpoint request"
        assert "forked child" in err
    hellos = [e for e in events(d) if e["event"] == "hello"]
    assert len(hellos) == 1, hellos
    assert_no_survivors(d)


def test_stop_with_forked_workers_is_clean(tmp_path, bg):
    """On stop only the announced process gets SIGTERM; it saves and exits 0, and its daemonic
    workers (SIGTERM back to default after the fork) die with it."""
    d = tmp_path / "d"
    job = tmp_path / "job.py"
    job.write_text(WORKERS_JOB)
    sup = bg(ckpt_run(d, "--every", "off", cmd=[PY, job, tmp_path / "w", "30"]), timeout=60)
    wait_until(lambda: any(e["event"] == "hello" for e in events(d)), 30, "hello")
    wait_until(lambda: "spawned" in sup.stdout, 30, "the spawned worker's answer")
    os.kill(sup.pid, signal.SIGTERM)
    assert sup.wait() == 75, sup.stderr
    assert "stopping 1" in sup.stdout, sup.stdout + sup.stderr
    assert committed_seq(d) == 1
    assert_no_survivors(d)


def test_second_sigterm_terminates_at_once(tmp_path, bg):
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(
        """
        import ckpt, time
        ck = ckpt.Checkpointer()
        print("ready", flush=True)
        while not ck.should_stop():
            time.sleep(0.005)
        print("stop seen", flush=True)
        while True:  # never reaches a safe point again
            time.sleep(0.005)
        """
    ))
    p = bg([PY, job], timeout=30, env=clean_env(CKPT_DIR=str(tmp_path / "d")))
    wait_until(lambda: "ready" in p.stdout, 20, "ready")
    os.kill(p.pid, signal.SIGTERM)
    wait_until(lambda: "stop seen" in p.stdout, 20, "the first SIGTERM to be seen")
    assert p.p.poll() is None
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait() == -signal.SIGTERM


def test_a_sigterm_does_not_wait_long_for_a_job_blocked_in_c(tmp_path, bg):
    # torchrun SIGTERMs the surviving ranks when one dies, and SIGKILLs them 30 s later; a
    # flag-only handler kept a rank blocked outside the client (here: a read that never
    # returns) alive all that time. The watchdog ends it after CKPT_STOP_TIMEOUT.
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(
        """
        import ckpt, os
        ck = ckpt.Checkpointer()
        for step in range(3):
            ck.should_checkpoint(step)
        print("blocking", flush=True)
        r, w = os.pipe()
        os.read(r, 1)   # blocks for good, like a collective whose peer died
        """
    ))
    p = bg([PY, job], timeout=30, env=clean_env(CKPT_DIR=str(tmp_path / "d"), CKPT_STOP_TIMEOUT="1s"))
    wait_until(lambda: "blocking" in p.stdout, 20, "the job to block")
    time.sleep(0.2)  # let it enter the C call (nothing to poll for inside it)
    t0 = time.monotonic()
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait() == 143, p.stderr
    assert time.monotonic() - t0 < 10
    assert "reached no safe point" in p.stderr


def test_a_sigterm_waits_for_the_next_safe_point_and_the_save(tmp_path, bg):
    # The bound never cuts a job that reaches its safe point (its save may then take long).
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(
        """
        import ckpt, time
        ck = ckpt.Checkpointer()
        step = 0
        print("ready", flush=True)
        while True:
            step += 1
            time.sleep(0.3)          # a step longer than the 0.2 s bound below... once seen
            if ck.should_checkpoint(step):
                with ck.saving(step) as d:
                    (d / "x").write_text(str(step))
                    time.sleep(1.0)  # a slow save
            if ck.should_stop():
                print("saved and stopping", flush=True)
                raise SystemExit(0)
        """
    ))
    p = bg([PY, job], timeout=30, env=clean_env(CKPT_DIR=str(tmp_path / "d"), CKPT_STOP_TIMEOUT="0.5"))
    wait_until(lambda: "ready" in p.stdout, 20, "ready")
    time.sleep(0.1)
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait() == 0, p.stderr
    assert "saved and stopping" in p.stdout
