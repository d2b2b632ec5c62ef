//! Multi-rank jobs under real launchers (docs/multi-rank.md, "Quick start"): `mpirun` from
//! Open MPI with Rust ranks and with Python ranks (the latter on a simulated other node, where
//! only what the recipe's `-x` list forwards reaches the ranks), `srun -K -n 4` with Python
//! ranks on the local Slurm cluster, the torchrun-like Python launcher
//! (`test-programs/python_rank_launcher.py`) with Python ranks, and PyTorch's own `torchrun`
//! (the Quick start's recipe, `--max-restarts 0`, CPU) with Python ranks in a gloo process
//! group that run a collective every step (`test-programs/python_torch_rank_trainer.py`).
//!
//! For every launcher, one run of `ckpt run -- LAUNCHER ... rank trainer` takes one SIGKILL of
//! each kind, in a seeded order at seeded instants: one rank, all ranks and the launcher, each
//! mid-save (a rank is writing its shard or a round's stage holds shards) and between saves (a
//! new checkpoint exists and no save is running). The resumed job must end with the global
//! digest of an uninterrupted run (bit-identical per-rank digest chains), every restore must
//! have seen all shards, every published checkpoint must verify with one shard per rank, no
//! save round of a launch may be abandoned before a kill in it (every rank alive), and no
//! process of the job may survive (none with the job's `CKPT_DIR`, none naming the test's
//! directory: `pgrep -f`). Seeds are printed; replay with `CKPT_TEST_SEED`.
//!
//! The ranks use the single-process calls: Rust ranks run the README loop (`rank_trainer
//! --readme step`: `should_checkpoint()` without a step), Python ranks
//! `should_checkpoint(step=)` and `saving(step=)`; rank and world size come from the
//! launcher's variables (`OMPI_COMM_WORLD_RANK`/`_SIZE`, `SLURM_PROCID`/`SLURM_STEP_NUM_TASKS`,
//! `RANK`/`WORLD_SIZE`).
//!
//! Open MPI as root: `OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1` (the
//! environment form of `--allow-run-as-root`), and `OMPI_MCA_rmaps_base_oversubscribe=1`
//! (`--oversubscribe`: 4 ranks on 2 cores); nothing else is needed offline (the ranks do not
//! call MPI); the simulated other node's daemon connects back to mpirun on loopback
//! (`OMPI_MCA_oob_tcp_if_include=lo`). The mpirun tests are skipped without `mpirun`, unless
//! `CI` is set (then they fail): `scripts/setup` installs `openmpi-bin`. The srun test follows
//! tests/slurm.rs (skipped without a cluster unless `CI` is set). The torchrun test uses the
//! Python with torch as python/tests/test_training.py does (`$CKPT_TORCH_PYTHON`, else
//! `/opt/ckpt-torch`, which `scripts/setup` installs): skipped without it, unless `CI` is set
//! (then it fails). About 1-1.5 min in all on 2 cores without torchrun, most of it srun's
//! (30-90 s: a killed rank's survivors run until the stop timeout, 5 s); torchrun's test alone
//! takes 1-1.7 min (7 launches of 5 processes that import torch).

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::ranks::{assert_complete_checkpoints, assert_restores_complete, combined, reference};
use common::slurm::*;
use common::*;

const WORLD: u32 = 4;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Launcher {
    /// mpirun on this node; `other_node`: through a stand-in for ssh that starts Open MPI's
    /// daemon with an empty environment, as a login on another node would.
    Mpirun { other_node: bool },
    /// `test-programs/python_rank_launcher.py` (torchrun-like: RANK/WORLD_SIZE, kills the
    /// other ranks when one fails).
    TorchrunLike,
    /// PyTorch's torchrun (torch.distributed.elastic), the recipe of docs/multi-rank.md's
    /// Quick start, with `--max-restarts 0`.
    Torchrun,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Lang {
    Rust,
    Python,
    /// Python ranks of a PyTorch job (`test-programs/python_torch_rank_trainer.py`: the
    /// Python trainer in a gloo process group, a collective every step), run by the
    /// interpreter that has torch.
    Torch,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    OneRank,
    AllRanks,
    Launcher,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The script a Python rank runs (its interpreter's first argument that is not an option).
fn rank_script(lang: Lang) -> &'static str {
    match lang {
        Lang::Rust => "",
        Lang::Python => "python_rank_trainer.py",
        Lang::Torch => "python_torch_rank_trainer.py",
    }
}

/// The rank program's command line (the same arguments for every language: the Python
/// trainer has the Rust one's digest chain and shard format).
fn rank_program(lang: Lang, steps: u64, out: &Path) -> Vec<String> {
    let script = || {
        repo()
            .join("test-programs")
            .join(rank_script(lang))
            .display()
            .to_string()
    };
    let mut v = match lang {
        Lang::Rust => vec![test_bin("rank_trainer").display().to_string()],
        Lang::Python => vec!["python3".into(), script()],
        Lang::Torch => vec![
            torch_python().expect("torch").display().to_string(),
            script(),
        ],
    };
    v.extend(
        [
            "--steps",
            &steps.to_string(),
            "--step-ms",
            "3",
            "--save-ms",
            "40",
            "--pad-kib",
            "64",
            "--out",
            &out.display().to_string(),
        ]
        .map(String::from),
    );
    if lang == Lang::Rust {
        // The README's loop: should_checkpoint() without a step, save with the step.
        v.extend(["--readme".into(), "step".into()]);
    }
    v
}

// ---- the recipe in docs/multi-rank.md ----

/// The recipe of docs/multi-rank.md's Quick start for `launcher` (`mpirun`, `torchrun`) as
/// written: the words of the command after `ckpt run` (continuation lines joined).
fn doc_recipe(launcher: &str) -> Vec<String> {
    let doc = std::fs::read_to_string(repo().join("docs/multi-rank.md")).unwrap();
    let quick = doc
        .split("\n## Quick start\n")
        .nth(1)
        .expect("docs/multi-rank.md has a Quick start")
        .split("\n## ")
        .next()
        .unwrap();
    let joined = quick.replace("\\\n", " ");
    let line = joined
        .lines()
        .map(str::trim)
        .find(|l| {
            l.starts_with("ckpt run ")
                && l.split_whitespace()
                    .collect::<Vec<_>>()
                    .windows(2)
                    .any(|w| w == ["--", launcher])
        })
        .unwrap_or_else(|| {
            panic!("no `ckpt run ... -- {launcher}` line in the Quick start of docs/multi-rank.md")
        });
    line.split_whitespace().skip(2).map(String::from).collect()
}

/// The supervisor's options of a recipe (the words before `--`): the test's directory and
/// interval for its `--dir` and `--every`, and options to survive many kills added.
fn supervisor_args(recipe: &[String], dir: &Path) -> Vec<String> {
    let sep = recipe.iter().position(|w| w == "--").expect("-- in recipe");
    let mut v: Vec<String> = Vec::new();
    let mut it = recipe[..sep].iter();
    while let Some(w) = it.next() {
        match w.as_str() {
            "--dir" => {
                it.next();
                v.extend(["--dir".into(), dir.display().to_string()]);
            }
            "--every" => {
                it.next();
                v.extend(["--every".into(), "150ms".into()]);
            }
            _ => v.push(w.clone()),
        }
    }
    v.extend(
        [
            "--quiet",
            "--backoff",
            "20ms..100ms",
            "--max-failures",
            "30",
            "--",
        ]
        .map(String::from),
    );
    v
}

/// The supervisor's arguments after `ckpt run` for mpirun: the recipe's, with the test's
/// directory and interval for its `--dir` and `--every`, options to survive many kills added,
/// and the recipe's program (`./train`) replaced by `prog`.
fn mpirun_args(dir: &Path, prog: &[String]) -> Vec<String> {
    let recipe = doc_recipe("mpirun");
    let sep = recipe.iter().position(|w| w == "--").expect("-- in recipe");
    let mut v = supervisor_args(&recipe, dir);
    let launcher = &recipe[sep + 1..];
    assert_eq!(launcher[0], "mpirun", "{recipe:?}");
    assert_eq!(
        launcher.last().map(String::as_str),
        Some("./train"),
        "{recipe:?}"
    );
    // The recipe's world size is the test's.
    let n = launcher
        .iter()
        .position(|w| w == "-n")
        .expect("-n in the recipe");
    assert_eq!(launcher[n + 1], WORLD.to_string(), "{recipe:?}");
    // Every variable the supervisor sets is forwarded to ranks on other nodes.
    for k in ckpt::protocol::SUPERVISOR_ENV {
        assert!(
            launcher.windows(2).any(|w| w[0] == "-x" && w[1] == k),
            "the mpirun recipe in docs/multi-rank.md does not forward {k} (-x {k})"
        );
    }
    v.extend(launcher[..launcher.len() - 1].iter().cloned());
    v.extend(prog.iter().cloned());
    v
}

fn have_mpirun(test: &str) -> bool {
    let ok = Command::new("mpirun")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: CI is set but mpirun is missing (scripts/setup installs openmpi-bin)"
        );
        eprintln!("{test}: SKIPPED: no mpirun (install openmpi-bin, as scripts/setup does)");
    }
    ok
}

/// The interpreter that has torch, as python/tests/test_training.py finds it:
/// `$CKPT_TORCH_PYTHON`, else the virtual environment `scripts/setup` makes.
fn torch_python() -> Option<PathBuf> {
    std::env::var_os("CKPT_TORCH_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/opt/ckpt-torch/bin/python")])
        .find(|p| p.exists())
}

/// Whether there is a Python with torch (else the test is skipped with a message, or fails
/// under `CI`); one without a working `torchrun` next to it fails the test.
fn have_torchrun(test: &str) -> bool {
    let Some(py) = torch_python() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "{test}: CI is set but /opt/ckpt-torch is missing (scripts/setup installs PyTorch there)"
        );
        eprintln!(
            "{test}: SKIPPED: no Python with torch: set CKPT_TORCH_PYTHON or run scripts/setup (installs /opt/ckpt-torch)"
        );
        return false;
    };
    let bin = py.parent().unwrap().to_path_buf();
    let out = output_deadline(
        Command::new(bin.join("torchrun")).arg("--help"),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{test}: {} --help failed next to {}: {}",
        bin.join("torchrun").display(),
        py.display(),
        text(&out.stderr)
    );
    true
}

/// The supervisor's arguments after `ckpt run` for torchrun: the Quick start's recipe as
/// written (its `torchrun` found on `PATH`), `--max-restarts 0` (torchrun's default, made
/// explicit: ckpt restarts the job, not torchrun), the test's directory and interval, and the
/// recipe's program (`train.py`) replaced by `script` (torchrun runs it with its own Python).
fn torchrun_args(dir: &Path, script: &[String]) -> Vec<String> {
    let recipe = doc_recipe("torchrun");
    let sep = recipe.iter().position(|w| w == "--").expect("-- in recipe");
    let mut v = supervisor_args(&recipe, dir);
    let launcher = &recipe[sep + 1..];
    assert_eq!(
        launcher.last().map(String::as_str),
        Some("train.py"),
        "{recipe:?}"
    );
    let n = launcher
        .iter()
        .position(|w| w == "--nproc-per-node")
        .expect("--nproc-per-node in the recipe");
    assert_eq!(launcher[n + 1], WORLD.to_string(), "{recipe:?}");
    v.extend(launcher[..launcher.len() - 1].iter().cloned());
    v.extend(["--max-restarts".into(), "0".into()]);
    v.extend(script.iter().cloned());
    v
}

/// Open MPI's settings for this machine (see the module's comment); `other_node`: a hostfile
/// naming one other node of 4 slots and the stand-in for ssh (`fake-ssh` in `tmp`).
fn ompi_env(cmd: &mut Command, tmp: &Path, other_node: bool) {
    if unsafe { libc::geteuid() } == 0 {
        cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    cmd.env("OMPI_MCA_rmaps_base_oversubscribe", "1");
    if other_node {
        // The daemon (orted) on "nodeb" is started with an empty environment plus what a login
        // there would set (PATH, HOME, PYTHONPATH for the client): everything ckpt's ranks
        // need must come through the recipe's -x list. (It runs here, so its ranks are still
        // the supervisor's descendants and can announce themselves.)
        let ssh = tmp.join("fake-ssh");
        std::fs::write(
            &ssh,
            format!(
                "#!/bin/sh\n# ssh HOST COMMAND: the command 'on HOST' (here), in a login's environment\nshift\nexec env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root PYTHONPATH={} /bin/sh -c \"$*\"\n",
                repo().join("python/src").display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
        let hosts = tmp.join("hostfile");
        std::fs::write(&hosts, "nodeb slots=4\n").unwrap();
        // The daemon connects back to mpirun on loopback, whatever the machine's interfaces.
        cmd.env("OMPI_MCA_plm_rsh_agent", &ssh)
            .env("OMPI_MCA_orte_default_hostfile", &hosts)
            .env("OMPI_MCA_oob_tcp_if_include", "lo");
    }
}

// ---- the job's processes and its checkpoint directory ----

/// The job's processes on `dir`: the ranks (the trainer itself, not a wrapper) and the
/// launcher (the supervisor's child).
struct Procs {
    ranks: Vec<i32>,
    launcher: Vec<i32>,
}

fn procs(dir: &Path, lang: Lang) -> Procs {
    let mut p = Procs {
        ranks: vec![],
        launcher: vec![],
    };
    let ckpt_exe = ckpt_bin();
    for pid in job_processes(dir) {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        // The script is the interpreter's first argument that is not an option (torchrun runs
        // `python -u script ...`; a launcher's command line names the script later).
        let script = cmd
            .split(|&b| b == 0)
            .skip(1)
            .find(|a| !a.starts_with(b"-"))
            .unwrap_or_default();
        let rank = match lang {
            Lang::Rust => exe.ends_with("rank_trainer"),
            Lang::Python | Lang::Torch => {
                exe.to_string_lossy().contains("python")
                    && script.ends_with(format!("/{}", rank_script(lang)).as_bytes())
            }
        };
        if rank {
            p.ranks.push(pid);
            continue;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid: i32 = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if std::fs::read_link(format!("/proc/{ppid}/exe")).is_ok_and(|e| e == ckpt_exe) {
            p.launcher.push(pid);
        }
    }
    p
}

/// The round directory of the newest launch (`r<restart>.<pid>`, its restart count), once it
/// exists: the previous launch's rounds, which a kill may have left mid-save, do not count.
fn current_epoch(dir: &Path) -> Option<PathBuf> {
    let restart = events(dir, "launch").last()?["restart"].as_u64()?;
    std::fs::read_dir(dir.join(".ckpt/rounds"))
        .ok()?
        .flatten()
        .find(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix('r')?.split('.').next()?.parse::<u64>().ok())
                == Some(restart)
        })
        .map(|e| e.path())
}

/// A save is running: a live rank has a staging directory, or a round of the current launch
/// that has not concluded holds shards in its stage.
fn mid_save(dir: &Path) -> bool {
    let staging = std::fs::read_dir(dir.join(".ckpt/staging"))
        .map(|rd| {
            rd.flatten().any(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.rsplit('.').next())
                    .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists())
            })
        })
        .unwrap_or(false);
    if staging {
        return true;
    }
    let Some(epoch) = current_epoch(dir) else {
        return false;
    };
    std::fs::read_dir(epoch)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|r| !r.path().join("published").exists() && !r.path().join("aborted").exists())
        .any(|r| {
            std::fs::read_dir(r.path().join("stage"))
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("rank-"))
        })
}

/// The rounds of the current launch that every rank joined, proposing positions within the
/// job's `steps`, and that were nevertheless abandoned (`aborted`). With every rank alive (no
/// kill in the launch yet) none may be: each rank would save at the agreed position before
/// ending, so such a round was abandoned only because the ranks waited for each other until
/// `CKPT_ROUND_TIMEOUT` (a deadlock between the rounds and the ranks' own collectives). Rounds
/// that ranks leave at the end of the job (a position past `steps`, or not every rank in) are
/// abandoned by design.
fn abandoned_rounds(dir: &Path, world: u32, steps: u64) -> Vec<String> {
    let Some(epoch) = current_epoch(dir) else {
        return vec![];
    };
    let mut rounds: Vec<PathBuf> = std::fs::read_dir(epoch)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|r| r.join("aborted").exists())
        .collect();
    rounds.sort();
    rounds
        .into_iter()
        .filter(|r| {
            let proposals: Vec<u64> = (0..world)
                .filter_map(|k| {
                    let b = std::fs::read(r.join(format!("propose-{k:05}"))).ok()?;
                    serde_json::from_slice::<serde_json::Value>(&b).ok()?["step"].as_u64()
                })
                .collect();
            proposals.len() == world as usize && proposals.iter().all(|&p| p <= steps)
        })
        .map(|r| r.display().to_string())
        .collect()
}

/// Fails the test when a round of the current launch was abandoned with every rank alive.
fn assert_no_abandoned_round(case: &Case, when: &str, job: &mut dyn Job) {
    let (test, dir) = (case.test, case.dir);
    let abandoned = abandoned_rounds(dir, WORLD, case.steps);
    assert!(
        abandoned.is_empty(),
        "{test}: {when}: save rounds of the launch were abandoned although every rank was alive \
         (no kill in this launch yet): {abandoned:?}\n{}\n{}",
        job.log(),
        diagnose(dir)
    );
}

/// The event log and the round files of the job on `dir`, for a failure message.
fn diagnose(dir: &Path) -> String {
    let log = std::fs::read_to_string(dir.join(".ckpt/events.jsonl")).unwrap_or_default();
    let mut rounds = String::new();
    if let Some(e) = current_epoch(dir) {
        let mut rs: Vec<PathBuf> = std::fs::read_dir(&e)
            .into_iter()
            .flatten()
            .flatten()
            .map(|r| r.path())
            .collect();
        rs.sort();
        for r in rs {
            // The names, with the proposals' and the agreement's contents.
            let mut names: Vec<String> = std::fs::read_dir(&r)
                .into_iter()
                .flatten()
                .flatten()
                .map(|f| {
                    let n = f.file_name().to_string_lossy().into_owned();
                    if n.starts_with("propose-") || n == "agreed" {
                        let c = std::fs::read_to_string(f.path()).unwrap_or_default();
                        format!("{n}={}", c.trim())
                    } else {
                        n
                    }
                })
                .collect();
            names.sort();
            rounds.push_str(&format!("{}: {names:?}\n", r.display()));
        }
    }
    format!("--- events\n{log}\n--- rounds of the last launch\n{rounds}")
}

// ---- the kills ----

/// What the test watches: the supervisor (a child of the test, or a Slurm batch job).
trait Job {
    /// The supervisor has ended (`Some(success)`).
    fn ended(&mut self) -> Option<bool>;
    /// Its stderr so far (for failure messages) or in full once ended.
    fn log(&mut self) -> String;
}

struct Local {
    child: Running,
    err: Option<std::thread::JoinHandle<String>>,
    text: String,
}

impl Local {
    fn spawn(mut cmd: Command) -> Local {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn_guarded();
        let err = read_stderr(&mut child);
        Local {
            child,
            err: Some(err),
            text: String::new(),
        }
    }
}

impl Job for Local {
    fn ended(&mut self) -> Option<bool> {
        let st = self.child.try_wait().unwrap()?;
        if let Some(t) = self.err.take() {
            self.text = t.join().unwrap();
        }
        Some(st.success())
    }
    fn log(&mut self) -> String {
        if self.err.as_ref().is_some_and(|t| t.is_finished()) {
            self.text = self.err.take().unwrap().join().unwrap();
        }
        self.text.clone()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        }
    }
}

struct Batch {
    id: String,
    out: PathBuf,
    dir: PathBuf,
}

impl Job for Batch {
    fn ended(&mut self) -> Option<bool> {
        if self.dir.join(".ckpt/finished").exists() {
            return Some(true);
        }
        let q = slurm_cmd("squeue")
            .args(["-h", "-j", &self.id, "-o", "%T"])
            .output()
            .ok()?;
        let state = text(&q.stdout);
        // Gone from the queue (or completing) without the finished marker: it failed. The
        // marker is looked at again after squeue: ckpt may have written it and ended between
        // the first look and squeue (a job that finished, seen as failed in a CI run).
        let gone = q.status.success() && (state.trim().is_empty() || state.contains("COMPLETING"));
        gone.then(|| self.dir.join(".ckpt/finished").exists())
    }
    fn log(&mut self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let _ = slurm_cmd("scancel").arg(&self.id).output();
    }
}

/// The six kinds of kill (each target mid-save and between saves) in a seeded order.
fn kill_plan(rng: &mut fastrand::Rng) -> Vec<(Target, bool)> {
    let mut v: Vec<(Target, bool)> = [Target::OneRank, Target::AllRanks, Target::Launcher]
        .into_iter()
        .flat_map(|t| [(t, true), (t, false)])
        .collect();
    rng.shuffle(&mut v);
    v
}

/// One run: what [`kill_each_way`] needs to know about the job.
struct Case<'a> {
    test: &'a str,
    seed: u64,
    lang: Lang,
    /// The checkpoint directory and the ranks' output directory.
    dir: &'a Path,
    out: &'a Path,
    steps: u64,
    limit: Duration,
    /// The launcher ends the other ranks of a killed one with SIGTERM and a long grace (srun
    /// -K: KillWait, 30 s; torchrun: 30 s).
    sigterm_survivors: bool,
}

/// Runs `job` (already started on `case.dir`) through one kill of each kind, then checks the
/// result against an uninterrupted run of `case.steps`.
fn kill_each_way(case: &Case, job: &mut dyn Job) {
    let &Case {
        test,
        seed,
        lang,
        dir,
        out,
        steps,
        limit,
        sigterm_survivors,
    } = case;
    let mut rng = fastrand::Rng::with_seed(seed ^ 0x5eed);
    let deadline = Instant::now() + limit;
    let plan = kill_plan(&mut rng);
    let mut done = Vec::new();
    // The newest checkpoint (retention keeps three: their count stops growing).
    let newest = || checkpoints(dir).last().copied().unwrap_or(0);
    for (i, &(target, mid)) in plan.iter().enumerate() {
        let base = newest();
        // Between saves: a new checkpoint, then a seeded pause of up to 60 ms (no save may
        // have started). Mid-save: a save running, a seeded pause of up to 20 ms into it.
        let pause = Duration::from_millis(if mid { rng.u64(0..20) } else { rng.u64(0..60) });
        let mut seen: Option<Instant> = None;
        let mut looked = Instant::now();
        let (victims, ranks) = loop {
            if looked.elapsed() >= Duration::from_millis(50) {
                assert_no_abandoned_round(case, &format!("before kill {i}"), job);
                looked = Instant::now();
            }
            if job.ended().is_some() {
                let log = job.log();
                panic!("{test}: the job ended before kill {i} ({target:?}, mid-save {mid}): raise the steps\n{log}\n{}", diagnose(dir));
            }
            assert!(
                Instant::now() < deadline,
                "{test}: no moment for kill {i} ({target:?}, mid-save {mid}) came in time\n{}\n{}",
                job.log(),
                diagnose(dir)
            );
            let p = procs(dir, lang);
            let running = mid_save(dir);
            let ready = p.ranks.len() == WORLD as usize
                && !p.launcher.is_empty()
                && if mid {
                    running
                } else {
                    newest() > base && !running
                };
            if !ready {
                // Mid-save: the pause starts with the save; between: with the checkpoint.
                if mid || newest() <= base {
                    seen = None;
                }
            } else if seen.get_or_insert_with(Instant::now).elapsed() >= pause {
                let victims = match target {
                    Target::OneRank => vec![p.ranks[rng.usize(..p.ranks.len())]],
                    Target::AllRanks => p.ranks.clone(),
                    Target::Launcher => p.launcher,
                };
                break (victims, p.ranks);
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_no_abandoned_round(case, &format!("before kill {i}"), job);
        let launches = events(dir, "launch").len();
        for &v in &victims {
            unsafe { libc::kill(v, libc::SIGKILL) };
        }
        eprintln!(
            "{test}: kill {i}: SIGKILL {target:?} {victims:?} {} (checkpoints {:?})",
            if mid { "mid-save" } else { "between saves" },
            checkpoints(dir)
        );
        done.push((target, mid));
        // The launch's other ranks go with it, soon: the launcher ends them when a rank dies;
        // when the launcher itself died, ckpt ends its descendants (mpirun's and both
        // torchruns' ranks: torchrun's are in sessions of their own) and Slurm the step of a
        // dead srun. srun -K ends a step with a killed rank by SIGTERM and, KillWait later (30 s
        // here), SIGKILL, torchrun by SIGTERM and SIGKILL 30 s later: the survivors, asked to
        // stop, cannot complete a stop round without the dead rank and exit after the stop
        // timeout (5 s); torchrun's ranks often fail at once, out of a collective with the
        // dead rank.
        let t = Instant::now();
        let gone = Duration::from_secs(if sigterm_survivors && target == Target::OneRank {
            45
        } else {
            10
        });
        loop {
            let left: Vec<i32> = procs(dir, lang)
                .ranks
                .into_iter()
                .filter(|r| ranks.contains(r))
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                t.elapsed() < gone,
                "{test}: ranks {left:?} of the launch still run {gone:?} after kill {i} ({target:?})\n{}\n{}",
                job.log(),
                diagnose(dir)
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        eprintln!(
            "{test}: kill {i}: the launch's ranks were gone {:?} later",
            t.elapsed()
        );
        // The next launch is up before the next kill.
        while events(dir, "launch").len() <= launches {
            assert!(
                job.ended().is_none(),
                "{test}: the supervisor ended instead of relaunching after kill {i}\n{}\n{}",
                job.log(),
                diagnose(dir)
            );
            assert!(
                Instant::now() < deadline,
                "{test}: no relaunch after kill {i}\n{}\n{}",
                job.log(),
                diagnose(dir)
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let ok = loop {
        if let Some(ok) = job.ended() {
            break ok;
        }
        assert_no_abandoned_round(case, "the last launch", job);
        assert!(
            Instant::now() < deadline,
            "{test}: the job did not finish in time\n{}\n{}",
            job.log(),
            diagnose(dir)
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let log = job.log();
    assert!(ok, "{test}: ckpt run failed:\n{log}\n{}", diagnose(dir));
    assert_no_abandoned_round(case, "the last launch", job);
    // mpirun and the torchrun-like launcher SIGKILL the other ranks with a killed one: no live
    // rank ever waits for a dead one, so no round may time out. (Under srun and torchrun, the
    // survivors of a killed rank are sent SIGTERM, their rounds may time out: see above.)
    if !sigterm_survivors {
        assert!(
            !log.contains("abandoning the round"),
            "{test}: a save round timed out although every rank was alive:\n{log}"
        );
    }
    assert_eq!(
        combined(WORLD, out),
        reference(WORLD, steps),
        "{test}: the resumed job's global digest differs from an uninterrupted run\n{log}"
    );
    let restores = assert_restores_complete(out, WORLD);
    assert!(!checkpoints(dir).is_empty(), "no checkpoint was published");
    assert_complete_checkpoints(dir, WORLD);
    assert_no_survivors(dir);
    assert_nothing_names(test, out.parent().unwrap());
    let launches = events(dir, "launch");
    // Every rank of every launch handed a checkpoint restored its shard (the first launches
    // may have had none yet).
    let handed = launches
        .iter()
        .filter(|l| l["restore_seq"].as_u64().is_some())
        .count();
    assert!(handed > 0, "{test}: no launch resumed a checkpoint");
    assert_eq!(
        restores,
        WORLD as usize * handed,
        "{test}: shard restores in {} launches, {handed} with a checkpoint",
        launches.len()
    );
    let mut kinds = done.clone();
    kinds.sort_by_key(|k| format!("{k:?}"));
    kinds.dedup();
    assert_eq!(kinds.len(), 6, "{test}: kinds of kill done: {done:?}");
    eprintln!(
        "{test}: {} kills, {} launches, {restores} shard restores, checkpoints {:?}",
        done.len(),
        launches.len(),
        checkpoints(dir)
    );
}

/// No process names the test's directory `root` on its command line (`pgrep -f`: the
/// supervisor, the launcher, the ranks, wherever they were re-parented, even one that dropped
/// ckpt's variables from its environment), within 10 s.
fn assert_nothing_names(test: &str, root: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = output_deadline(
            Command::new("pgrep").arg("-a").arg("-f").arg(root),
            Duration::from_secs(10),
        );
        // 1: no process matched.
        match out.status.code() {
            Some(1) => return,
            Some(0) => {}
            _ => panic!("{test}: pgrep failed: {}", text(&out.stderr)),
        }
        assert!(
            Instant::now() < deadline,
            "{test}: processes naming {} survived the job:\n{}",
            root.display(),
            text(&out.stdout)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn prepare(world_readable: bool) -> (tempfile::TempDir, PathBuf, PathBuf) {
    let tmp = tempdir();
    if world_readable {
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let dir = tmp.path().join("ckpt");
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    (tmp, dir, out)
}

/// `ckpt run -- <launcher> <ranks>` on this machine (mpirun or the torchrun-like launcher;
/// srun: [`srun_python_ranks_killed_each_way_resume_bit_identical`]).
fn local_launcher(test: &str, launcher: Launcher, lang: Lang, steps: u64) {
    let seed = seed(test);
    let (tmp, dir, out) = prepare(false);
    let prog = rank_program(lang, steps, &out);
    let mut cmd = ckpt();
    match launcher {
        Launcher::Mpirun { other_node } => {
            cmd.arg("run").args(mpirun_args(&dir, &prog));
            ompi_env(&mut cmd, tmp.path(), other_node);
        }
        Launcher::TorchrunLike => {
            cmd.args([
                "run",
                "--quiet",
                "--every",
                "150ms",
                "--backoff",
                "20ms..100ms",
            ])
            .args(["--max-failures", "30", "--dir"])
            .arg(&dir)
            .arg("--")
            .arg("python3")
            .arg(repo().join("test-programs/python_rank_launcher.py"))
            .args(["--n", &WORLD.to_string(), "--"])
            .args(&prog);
        }
        Launcher::Torchrun => {
            // The recipe's `torchrun` from the environment that has torch (as an activated
            // virtual environment would put it on PATH); it runs the script with that Python.
            let bin = torch_python().unwrap().parent().unwrap().to_path_buf();
            let path = std::env::var_os("PATH").unwrap_or_default();
            let mut paths = vec![bin];
            paths.extend(std::env::split_paths(&path));
            cmd.arg("run")
                .args(torchrun_args(&dir, &prog[1..]))
                .env("PATH", std::env::join_paths(paths).unwrap());
        }
    }
    // The Python client from the checkout (ranks on this node inherit it; the other node's
    // login sets it). A stalled round of ranks on this node would be abandoned after 10 s,
    // within the deadline, and fail the test by its message (ranks on the other node keep the
    // default, 300 s: the deadline fails the test).
    cmd.env("PYTHONPATH", repo().join("python/src"))
        .env("CKPT_ROUND_TIMEOUT", "10");
    eprintln!("{test}: {:?}", cmd.get_args().collect::<Vec<_>>());
    let mut job = Local::spawn(cmd);
    let case = Case {
        test,
        seed,
        lang,
        dir: &dir,
        out: &out,
        steps,
        // torchrun: 7 launches of 5 processes that import torch, up to 10 s for a round
        // abandoned by the survivors of a killed rank (see kill_each_way).
        limit: Duration::from_secs(if launcher == Launcher::Torchrun {
            300
        } else {
            120
        }),
        sigterm_survivors: launcher == Launcher::Torchrun,
    };
    kill_each_way(&case, &mut job);
}

#[test]
fn mpirun_rust_ranks_killed_each_way_resume_bit_identical() {
    let test = "mpirun_rust";
    if have_mpirun(test) {
        local_launcher(
            test,
            Launcher::Mpirun { other_node: false },
            Lang::Rust,
            1000,
        );
    }
}

/// Python ranks under mpirun on a simulated other node: the recipe's `-x` list is all that
/// ckpt's ranks get from the supervisor's environment.
#[test]
fn mpirun_python_ranks_on_another_node_killed_each_way_resume_bit_identical() {
    let test = "mpirun_python";
    if have_mpirun(test) {
        local_launcher(
            test,
            Launcher::Mpirun { other_node: true },
            Lang::Python,
            1000,
        );
    }
}

#[test]
fn torchrun_like_python_ranks_killed_each_way_resume_bit_identical() {
    local_launcher(
        "torchrun_like_python",
        Launcher::TorchrunLike,
        Lang::Python,
        1000,
    );
}

/// The real torchrun (PyTorch's elastic launcher, CPU), the Quick start's recipe, with Python
/// ranks in a gloo process group that run a collective every step (as DDP's gradient
/// all-reduce): a rank whose peer died fails out of it. Skipped without a Python with torch
/// (`/opt/ckpt-torch`, or `CKPT_TORCH_PYTHON`), unless `CI` is set (then it fails).
#[test]
fn torchrun_python_ranks_killed_each_way_resume_bit_identical() {
    let test = "torchrun_python";
    if have_torchrun(test) {
        local_launcher(test, Launcher::Torchrun, Lang::Torch, 1000);
    }
}

/// `ckpt run -- srun -K -n 4 python3 python_rank_trainer.py` in a batch job of 4 tasks.
#[test]
fn srun_python_ranks_killed_each_way_resume_bit_identical() {
    let test = "srun_python";
    if !ensure_cluster(test) {
        return;
    }
    let seed = seed(test);
    let (tmp, dir, out) = prepare(true);
    let steps = 1000;
    let prog = rank_program(Lang::Python, steps, &out);
    let script = tmp.path().join("job.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/bash\nexport PYTHONPATH={} CKPT_ROUND_TIMEOUT=10\nexec {} run --every 150ms --backoff 20ms..100ms --max-failures 30 --dir {} -- srun -K -n {WORLD} {}\n",
            repo().join("python/src").display(),
            ckpt_bin().display(),
            dir.display(),
            prog.join(" ")
        ),
    )
    .unwrap();
    let job_out = tmp.path().join("job.out");
    let sb = output_deadline(
        slurm_cmd("sbatch")
            .arg("--parsable")
            .arg(format!("--job-name=ckpt-launchers-{}", std::process::id()))
            .arg(format!("-n{WORLD}"))
            .arg("--time=3")
            .arg(format!("--chdir={}", tmp.path().display()))
            .arg(format!("--output={}", job_out.display()))
            .arg(&script),
        Duration::from_secs(30),
    );
    assert!(sb.status.success(), "sbatch: {}", text(&sb.stderr));
    let id = text(&sb.stdout)
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let mut job = Batch {
        id,
        out: job_out,
        dir: dir.clone(),
    };
    let case = Case {
        test,
        seed,
        lang: Lang::Python,
        dir: &dir,
        out: &out,
        steps,
        limit: Duration::from_secs(240),
        sigterm_survivors: true,
    };
    kill_each_way(&case, &mut job);
}
