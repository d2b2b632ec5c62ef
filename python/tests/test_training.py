"""The training-state helpers (``ckpt.training``, ``ckpt.torch``): the recipes of
docs/training.md, extracted from the page as written, run under ``ckpt run`` with SIGKILLs at
random instants, end bit-identical to an uninterrupted run.

The PyTorch tests run with the interpreter that has torch: ``$CKPT_TORCH_PYTHON``, else the
virtual environment ``scripts/setup`` makes (``/opt/ckpt-torch/bin/python``); without one they
are skipped with a message (CI always has it)."""

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_no_survivors, ckpt_bin, events, run, wait_until

DOC = REPO / "docs" / "training.md"


def recipe(heading: str) -> str:
    section = DOC.read_text().split(f"\n## {heading}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def torch_python() -> str:
    for p in (os.environ.get("CKPT_TORCH_PYTHON"), "/opt/ckpt-torch/bin/python"):
        if p and Path(p).exists():
            r = subprocess.run([p, "-c", "import torch, numpy"], capture_output=True, timeout=120)
            if r.returncode == 0:
                return p
    pytest.skip("no Python with torch: set CKPT_TORCH_PYTHON or run scripts/setup (installs /opt/ckpt-torch)")


def final(out: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith("final ")]
    assert lines, out
    return lines[-1]


def count(d: Path, name: str) -> int:
    return len([e for e in events(d) if e["event"] == name])


def resumed_bit_identical(
    tmp_path, bg, seed, py: str, script: str, kills: int, timeout: float, launcher=(), victims=("leader",)
) -> None:
    """Runs ``script`` uninterrupted, then under ``ckpt run`` with ``kills`` SIGKILLs, each at a
    random instant after a checkpoint, of the launch's leader or of one rank (``victims``
    cycles through "leader" and "rank"); the final lines must match."""
    rnd = random.Random(seed)
    job = tmp_path / "train.py"
    job.write_text(script)
    cmd = [*launcher, job] if launcher else [py, job]
    plain = run(cmd, timeout=timeout)
    assert plain.returncode == 0, plain.stderr
    want = final(plain.stdout)

    d = tmp_path / "ck"
    sup = bg(
        [ckpt_bin(), "run", "--dir", d, "--every", "300ms", "--backoff", "10ms..50ms", "--", *cmd],
        timeout=timeout * (kills + 2),
    )
    for k in range(kills):
        # A kill after a checkpoint of this launch committed, at a random instant after it.
        before = count(d, "committed")
        wait_until(lambda: count(d, "committed") > before or sup.p.poll() is not None, timeout, "a checkpoint")
        if sup.p.poll() is not None:
            break
        launches = [e for e in events(d) if e["event"] == "launch"]
        time.sleep(rnd.uniform(0.0, 0.4))  # the random instant itself: nothing to poll for
        victim = victims[k % len(victims)]
        if victim == "rank":
            hellos = [e for e in events(d) if e["event"] == "hello" and e["t_ms"] >= launches[-1]["t_ms"]]
            pid = rnd.choice(hellos)["pid"]
        else:
            pid = launches[-1]["pid"]
        print(f"seed {seed}: kill {k}: SIGKILL to the {victim} {pid}", file=sys.stderr)
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
        wait_until(lambda: count(d, "launch") > len(launches) or sup.p.poll() is not None, timeout, "the relaunch")
    assert sup.wait() == 0, sup.stderr
    resumed = [e for e in events(d) if e["event"] == "launch" and e.get("restore_step")]
    assert resumed, f"seed {seed}: no launch resumed from a checkpoint:\n{sup.stderr}"
    assert final(sup.stdout) == want, f"seed {seed}: the resumed run differs\n{sup.stderr}"
    assert_no_survivors(d)


def test_numpy_recipe_resumes_bit_identical(tmp_path, bg, seed):
    script = recipe("numpy only: `ckpt.training.TrainState`")
    resumed_bit_identical(tmp_path, bg, seed, sys.executable, script, 2, 60)


def test_torch_recipe_resumes_bit_identical(tmp_path, bg, seed):
    py = torch_python()
    resumed_bit_identical(tmp_path, bg, seed, py, recipe("PyTorch: `ckpt.torch.TrainState`"), 2, 120)


def test_torchrun_recipe_resumes_bit_identical(tmp_path, bg, seed):
    # One rank killed, then the launcher: torchrun ends the surviving rank (its SIGTERM
    # finds no safe point while the rank waits in a collective: CKPT_STOP_TIMEOUT ends it),
    # ckpt relaunches torchrun, every rank restores its shard of the newest checkpoint.
    py = torch_python()
    torchrun = str(Path(py).parent / "torchrun")
    section = DOC.read_text().split("\n## PyTorch under torchrun\n", 1)[1]
    script = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    run_line = re.search(r"torchrun (.*?) train_ddp.py", script).group(1).split()
    resumed_bit_identical(
        tmp_path, bg, seed, py, script, 2, 180, launcher=[torchrun, *run_line], victims=("rank", "leader")
    )


STATEFUL = '''
import ckpt
ck = ckpt.Checkpointer()
import ckpt.torch as ckt
import hashlib, torch
from torch.utils.data import TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader
torch.manual_seed(0)
data = TensorDataset(torch.randn(256, 4), torch.randn(256, 1))
loader = StatefulDataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3))
model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
ts = ckt.TrainState(models={"m": model}, optimizers={"o": opt}, loader=loader)
ts.restore(ck)
for epoch in ts.epochs(12):
    for x, y in ts.batches():
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        if ck.should_checkpoint(ts.step):
            ts.save(ck)
        if ck.should_stop():
            raise SystemExit(0)
print("final", hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest())
'''


def test_torchdata_stateful_loader_resumes_bit_identical(tmp_path, bg, seed):
    py = torch_python()
    if subprocess.run([py, "-c", "import torchdata.stateful_dataloader"], capture_output=True).returncode:
        pytest.skip("torchdata is not installed next to torch (scripts/setup installs it)")
    resumed_bit_identical(tmp_path, bg, seed, py, STATEFUL, 2, 120)


def test_torch_state_loads_with_the_safe_loader_and_a_loader_needs_its_own_generator(tmp_path):
    py = torch_python()
    script = tmp_path / "t.py"
    script.write_text(
        """
import sys, torch, numpy as np
from torch.utils.data import DataLoader, TensorDataset
import ckpt, ckpt.torch as ckt
from ckpt.errors import CkptError
data = TensorDataset(torch.arange(10.0))
try:
    ckt.TrainState(loader=DataLoader(data, batch_size=2, shuffle=True))
    print("accepted a loader without a generator"); sys.exit(1)
except CkptError as e:
    assert "generator=" in str(e), e
ck = ckpt.Checkpointer(sys.argv[1])
m = torch.nn.Linear(2, 2)
g = np.random.default_rng(5)
ts = ckt.TrainState(models={"m": m}, generators={"g": g, "t": torch.Generator().manual_seed(3)}, extra={"lr": 0.1})
ts.step = 7
saved = ts.save(ck)
st = torch.load(saved.path / "train_state.pt", weights_only=True)   # the safe loader
assert st["step"] == 7 and st["extra"] == {"lr": 0.1}
print("ok")
"""
    )
    r = run([py, script, tmp_path / "ck"], timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_numpy_state_round_trips_in_place(tmp_path):
    import numpy as np

    import ckpt
    import ckpt.training as tr

    ck = ckpt.Checkpointer(tmp_path / "ck")
    w = np.arange(6.0).reshape(2, 3)
    g = np.random.default_rng(9)
    st = tr.TrainState(arrays={"w": w}, generators={"g": g}, extra={"k": [1, 2]})
    for _ in st.epochs(1):
        for _ in st.batches(3):
            pass
    g.normal(size=4)
    st.save(ck)
    want_next = g.normal(size=3)
    ck.close()

    ck2 = ckpt.Checkpointer(tmp_path / "ck")
    w2 = np.zeros((2, 3))
    g2 = np.random.default_rng(0)
    st2 = tr.TrainState(arrays={"w": w2}, generators={"g": g2})
    assert st2.restore(ck2)
    assert (w2 == w).all() and st2.step == 3 and st2.extra == {"k": [1, 2]}
    assert (g2.normal(size=3) == want_next).all()
    with pytest.raises(ckpt.CkptError, match="checkpoint has float64"):
        tr.TrainState(arrays={"w": np.zeros(3)}).restore(ck2)
    ck2.close()


def test_readme_python_recipe_resumes_bit_identical(tmp_path, bg, seed):
    readme = (REPO / "README.md").read_text().split("\n### Python\n", 1)[1]
    script = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    resumed_bit_identical(tmp_path, bg, seed, sys.executable, script, 2, 60)


def test_ckpt_check_names_the_tensor_when_the_scheduler_is_forgotten(tmp_path):
    # The classic bug: the LR scheduler left out of the checkpoint, so every resume restarts
    # the warm-up. `ckpt check` runs the job interrupted and names the first differing tensor.
    py = torch_python()
    script = recipe("PyTorch: `ckpt.torch.TrainState`").replace('schedulers={"sched": sched}, ', "")
    script = script.replace("ts.epochs(6)", "ts.epochs(24)")  # long enough to interrupt training
    assert "schedulers=" not in script and "ts.epochs(24)" in script
    script += '\ntorch.save(model.state_dict(), "model.pt")\n'
    (tmp_path / "train.py").write_text(script)
    env = dict(os.environ, PATH=f"{Path(py).parent}{os.pathsep}{os.environ['PATH']}")
    env["PYTHONPATH"] = str(REPO / "python" / "src")
    r = run(
        [ckpt_bin(), "check", "--kills", "3", "--seed", "7", "--json", "--output", "model.pt",
         "--work", tmp_path / "w", "--", py, tmp_path / "train.py"],
        timeout=600, env=env,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    import json
    doc = json.loads(r.stdout)
    assert doc["verdict"] == "differs", doc
    assert "model.pt" in json.dumps(doc["first_difference"]), doc
    assert "$['" in json.dumps(doc["first_difference"]), doc
