//! `ckpt check -- CMD...`: proves that a job resumes exactly. It runs the job twice
//! uninterrupted, then several times under `ckpt run` with interruptions at random instants
//! (SIGKILL mid-step, right after a checkpoint request, right after a commit, right after a
//! resume, and a stop through SIGTERM followed by a second `ckpt run`), and compares what
//! every run produced with the uninterrupted run. It drives the real `ckpt run` (this very
//! executable) as a child process and times its interruptions on the supervisor's event log.
//! With `--transparent`, every `ckpt run` checkpoints the job from outside with CRIU (a job
//! without a client), and only the job's `--output` files are compared.
//! Documented in docs/check.md.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::parse_duration;
use crate::exit::ErrKind;
use crate::supervisor::{exit_codes, fmt_dur, Fatal};

/// `ckpt check`'s own exit codes (documented in `--help` and docs/check.md).
pub mod codes {
    /// Every interrupted run ended exactly like the uninterrupted one.
    pub const MATCH: i32 = 0;
    /// An interrupted run ended differently (or did not finish).
    pub const DIFFERS: i32 = 1;
    /// The job is not deterministic even uninterrupted: two plain runs differ.
    pub const NONDETERMINISTIC: i32 = 2;
    /// Nothing to check: the job failed uninterrupted, left nothing to compare, or could
    /// not be interrupted (it never committed a checkpoint before finishing).
    pub const CANNOT_CHECK: i32 = 3;
}

const CHECK_HELP: &str = "\
HOW IT WORKS:
  1. Runs CMD twice under `ckpt run --every off`, uninterrupted, to learn what it produces
     and how long it takes (if the two runs differ, the job is not deterministic: exit 2).
  2. Runs it --kills more times under `ckpt run --every DUR`, each run in its own scratch
     working directory and checkpoint directory, interrupted once a first checkpoint
     exists, at a random instant. The kind cycles through: SIGKILL to the job's process
     group mid-step; at a random instant between a checkpoint request and its commit
     (while the job saves); right after a commit; right after a resume; a stop by
     SIGTERM to `ckpt run`, then `ckpt run` again on the same directory.
  3. Compares each run's --output files (else the members of the job's newest checkpoint)
     with the first uninterrupted run and names the first difference: the file and byte
     offset; for .npy/.npz the element index and both values; for JSON the key path; for
     pickles (and PyTorch .pt files when torch is importable) the key path and index, when
     python3 is installed; for text the line.
  It also reports what went wrong on the way, from each run's event log: checkpoint
  requests never answered, resumes that started over, restored steps going backwards.

  With --transparent (a job without a client, root): every `ckpt run` gets --transparent,
  each checkpoint is a CRIU dump, each restart a `criu restore` of the job's whole process
  tree; --output is required. Exit 3 when CRIU cannot checkpoint the job here.

  The job runs in a scratch directory (RUN/job/, its checkpoints in RUN/ckpt/). A relative
  program path (./train.sh) and arguments naming existing files (train.py, or the value
  of --config=conf.yaml) are made absolute; other relative paths are the job's own,
  inside the scratch directory. Runs are kept under --work, or in a temporary directory
  removed only when everything matches.

EXIT CODES (ckpt check):
  0    every interrupted run ended exactly like the uninterrupted run
  1    an interrupted run differs from the uninterrupted run, or did not finish (with
       --strict also: a problem was seen on the way)
  2    the job is not deterministic even uninterrupted (its two plain runs differ)
  3    nothing to check: the job failed uninterrupted, wrote no --output / checkpoint, or
       never committed a checkpoint before it finished (no run could be interrupted), or
       (--transparent) CRIU cannot checkpoint the job here
  64   usage error          70  internal error          74  I/O error

EXAMPLES:
  ckpt check --output digest -- ./target/release/trainer --steps 300 --digest-file digest
  ckpt check --output model.npz --kills 10 --every 2s -- python3 train.py --epochs 1
  ckpt check --seed 42 --run-opt=--signal=USR1 --output counter -- ./job.sh
  ckpt check --json -- python3 train.py > check.json
  sudo ckpt check --transparent --output result -- ./old_code input.nml

Documentation: docs/check.md";

/// Prove that a job resumes exactly: run it uninterrupted, then interrupted at random
/// instants under `ckpt run`, and compare what the runs produce.
///
/// Exit 0 only when every interrupted run ends bit-identical to the uninterrupted one;
/// 1 when one differs (the first difference is named precisely), 2 when the job is not
/// deterministic even uninterrupted, 3 when there is nothing to compare.
#[derive(Debug, clap::Args)]
#[command(after_long_help = CHECK_HELP)]
pub struct CheckArgs {
    /// Number of interrupted runs (each is interrupted once; the "after a resume" kind
    /// twice).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=1000), value_name = "N")]
    pub kills: u32,
    /// Seed of the random interruption instants (printed; pass it again to replay).
    #[arg(long, value_name = "S")]
    pub seed: Option<u64>,
    /// A file or directory the job writes, relative to its working directory, to compare
    /// (repeatable). Default: the member files of the job's newest checkpoint.
    #[arg(long, value_name = "PATH")]
    pub output: Vec<PathBuf>,
    /// Checkpoint interval of the interrupted runs (default: a sixth of an uninterrupted
    /// run, at least 50ms).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub every: Option<Duration>,
    /// Give up on one run (it fails, and ckpt check exits 1 or 3) after this long.
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Duration,
    /// Keep every run under this directory (created; must be empty). Default: a temporary
    /// directory, removed when everything matches.
    #[arg(long, value_name = "DIR")]
    pub work: Option<PathBuf>,
    /// Also count what went wrong on the way (unanswered requests, resumes that started
    /// over) as a failure (exit 1), even when the outputs match.
    #[arg(long)]
    pub strict: bool,
    /// Print the result as one JSON document on stdout (schema in docs/check.md).
    #[arg(long)]
    pub json: bool,
    /// Check a job that links no client, checkpointed from outside with CRIU: every `ckpt
    /// run` gets --transparent (root and a working CRIU needed; docs/transparent.md). Needs
    /// --output: CRIU images differ from run to run.
    #[arg(long)]
    pub transparent: bool,
    /// An extra option for every `ckpt run` (repeatable), e.g. --run-opt=--signal=USR1.
    #[arg(long = "run-opt", value_name = "ARG", allow_hyphen_values = true)]
    pub run_opt: Vec<OsString>,
    /// The job's command line.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

fn io_err(what: &str, p: &Path, e: std::io::Error) -> Fatal {
    Fatal::io(format!("cannot {what} {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------
// Interruption plans

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    MidStep,
    MidSave,
    AfterCommit,
    AfterResume,
    Stop,
}

impl Kind {
    const ALL: [Kind; 5] = [
        Kind::MidStep,
        Kind::MidSave,
        Kind::AfterCommit,
        Kind::AfterResume,
        Kind::Stop,
    ];
    fn name(self) -> &'static str {
        match self {
            Kind::MidStep => "mid-step",
            Kind::MidSave => "mid-save",
            Kind::AfterCommit => "after-commit",
            Kind::AfterResume => "after-resume",
            Kind::Stop => "stop",
        }
    }
}

/// The kinds of the interrupted runs: every kind once per cycle, in a seeded order.
fn plan(n: u32, rng: &mut fastrand::Rng) -> Vec<Kind> {
    let mut out = Vec::new();
    while out.len() < n as usize {
        let mut cycle = Kind::ALL.to_vec();
        rng.shuffle(&mut cycle);
        out.extend(cycle);
    }
    out.truncate(n as usize);
    out
}

// ---------------------------------------------------------------------------------------
// The supervisor's event log, read incrementally

struct Events {
    path: PathBuf,
    pos: u64,
    partial: String,
    all: Vec<Value>,
}

impl Events {
    fn new(ckpt_dir: &Path) -> Events {
        Events {
            path: ckpt_dir.join(".ckpt/events.jsonl"),
            pos: 0,
            partial: String::new(),
            all: Vec::new(),
        }
    }

    /// Reads the complete lines written since the last call.
    fn poll(&mut self) {
        let Ok(mut f) = File::open(&self.path) else {
            return;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.pos {
            // Rotated (events.jsonl.1): start over on the new file.
            self.pos = 0;
            self.partial.clear();
        }
        if len == self.pos || f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = String::new();
        if f.read_to_string(&mut buf).is_err() {
            return;
        }
        self.pos += buf.len() as u64;
        self.partial.push_str(&buf);
        while let Some(nl) = self.partial.find('\n') {
            let line: String = self.partial.drain(..=nl).collect();
            if let Ok(v) = serde_json::from_str::<Value>(line.trim()) {
                self.all.push(v);
            }
        }
    }

    fn last_launch(&self) -> Option<(usize, &Value)> {
        self.all
            .iter()
            .enumerate()
            .rev()
            .find(|(_, e)| e["event"] == "launch")
    }

    /// The pid of the job's current process group leader, if a job runs.
    fn running_job(&self) -> Option<u32> {
        let (i, l) = self.last_launch()?;
        let pid = l["pid"].as_u64()?;
        let ended = self.all[i..]
            .iter()
            .any(|e| e["event"] == "exit" && e["pid"].as_u64() == Some(pid));
        (!ended).then_some(pid as u32)
    }

    fn last_committed(&self) -> Option<(u64, u64)> {
        self.all
            .iter()
            .rev()
            .find(|e| e["event"] == "committed")
            .map(|e| {
                (
                    e["seq"].as_u64().unwrap_or(0),
                    e["step"].as_u64().unwrap_or(0),
                )
            })
    }
}

/// Every event of a checkpoint directory's log (rotated part first).
fn read_all_events(ckpt_dir: &Path) -> Vec<Value> {
    let mut out = Vec::new();
    for name in ["events.jsonl.1", "events.jsonl"] {
        if let Ok(t) = std::fs::read_to_string(ckpt_dir.join(".ckpt").join(name)) {
            out.extend(t.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// One `ckpt run` process

struct Sup {
    child: Child,
    events: Events,
    deadline: Instant,
}

enum Wait {
    /// The awaited event happened (its index in the log).
    Event(usize),
    /// `ckpt run` exited first.
    Exited(ExitStatus),
}

impl Sup {
    fn try_exit(&mut self) -> Result<Option<ExitStatus>, Fatal> {
        self.child
            .try_wait()
            .map_err(|e| Fatal::new(ErrKind::Internal, format!("waiting for ckpt run: {e}")))
    }

    fn timed_out(&self) -> bool {
        Instant::now() > self.deadline
    }

    /// Polls the log until an event from index `from` on satisfies `pred`, or `ckpt run`
    /// exits, or the deadline passes (`Ok(None)`).
    fn wait_event(
        &mut self,
        from: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Option<Wait>, Fatal> {
        loop {
            self.events.poll();
            if let Some(i) = (from..self.events.all.len()).find(|&i| pred(&self.events.all[i])) {
                return Ok(Some(Wait::Event(i)));
            }
            if let Some(st) = self.try_exit()? {
                self.events.poll();
                if let Some(i) = (from..self.events.all.len()).find(|&i| pred(&self.events.all[i]))
                {
                    return Ok(Some(Wait::Event(i)));
                }
                return Ok(Some(Wait::Exited(st)));
            }
            if self.timed_out() {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Waits until `until` (a random instant), or `ckpt run` exits first (`Some(status)`).
    fn wait_until(&mut self, until: Instant) -> Result<Option<ExitStatus>, Fatal> {
        while Instant::now() < until {
            if let Some(st) = self.try_exit()? {
                return Ok(Some(st));
            }
            if self.timed_out() {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2).min(until - Instant::now()));
        }
        Ok(None)
    }

    /// Waits for `ckpt run` to exit; `None` when the deadline passed (it is then killed,
    /// with its job).
    fn finish(&mut self) -> Result<Option<ExitStatus>, Fatal> {
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(st) = self.try_exit()? {
                self.events.poll();
                return Ok(Some(st));
            }
            if self.timed_out() {
                self.kill();
                return Ok(None);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Ends `ckpt run` and its job for good (timeout, or ckpt check itself failing).
    fn kill(&mut self) {
        self.events.poll();
        let job = self.events.running_job();
        signal(self.child.id(), libc::SIGTERM);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
        if let Some(pgid) = job {
            unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
        }
    }
}

impl Drop for Sup {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
    }
}

fn signal(pid: u32, sig: i32) {
    unsafe { libc::kill(pid as i32, sig) };
}

fn kill_group(pgid: u32) {
    unsafe { libc::kill(-(pgid as i32), libc::SIGKILL) };
}

fn status_code(st: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

// ---------------------------------------------------------------------------------------
// The check

struct Ctx {
    exe: PathBuf,
    command: Vec<OsString>,
    run_opts: Vec<OsString>,
    timeout: Duration,
}

/// One run: its directories and log.
struct RunDirs {
    root: PathBuf,
    job: PathBuf,
    ckpt: PathBuf,
    log: PathBuf,
}

impl RunDirs {
    fn create(root: PathBuf) -> Result<RunDirs, Fatal> {
        let job = root.join("job");
        std::fs::create_dir_all(&job).map_err(|e| io_err("create", &job, e))?;
        Ok(RunDirs {
            ckpt: root.join("ckpt"),
            log: root.join("ckpt-run.log"),
            job,
            root,
        })
    }
}

impl Ctx {
    fn progress(&self, msg: impl AsRef<str>) {
        eprintln!("ckpt check: {}", msg.as_ref());
    }

    fn spawn(&self, d: &RunDirs, every: Option<Duration>) -> Result<Sup, Fatal> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&d.log)
            .map_err(|e| io_err("create", &d.log, e))?;
        let log2 = log.try_clone().map_err(|e| io_err("open", &d.log, e))?;
        let mut c = Command::new(&self.exe);
        c.arg("run").arg("--dir").arg(&d.ckpt).arg("--every");
        match every {
            Some(e) => c.arg(format!("{}ms", e.as_millis().max(1))),
            None => c.arg("off"),
        };
        if !self
            .run_opts
            .iter()
            .any(|o| o.to_string_lossy().starts_with("--backoff"))
        {
            c.arg("--backoff").arg("10ms..500ms");
        }
        c.args(&self.run_opts).arg("--").args(&self.command);
        for k in crate::protocol::SUPERVISOR_ENV {
            c.env_remove(k);
        }
        // If ckpt check dies (Ctrl-C, a CI timeout, SIGKILL), `ckpt run` gets SIGTERM: it
        // stops its job the normal way, so that no run outlives the check.
        let parent = std::process::id() as i32;
        unsafe {
            use std::os::unix::process::CommandExt;
            c.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(143);
                }
                Ok(())
            });
        }
        c.current_dir(&d.job)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2));
        let child = c.spawn().map_err(|e| {
            Fatal::new(
                ErrKind::Internal,
                format!("cannot start {} run: {e}", self.exe.display()),
            )
        })?;
        Ok(Sup {
            child,
            events: Events::new(&d.ckpt),
            deadline: Instant::now() + self.timeout,
        })
    }
}

/// What happened to one run.
#[derive(Debug, Default)]
struct RunReport {
    name: String,
    kind: String,
    dir: PathBuf,
    exit: Option<i32>,
    duration: Duration,
    /// The job's run time as the supervisor measured it (first uninterrupted runs).
    job_ms: Option<u64>,
    interruptions: Vec<Value>,
    result: String,
    difference: Option<Difference>,
    findings: Vec<Finding>,
}

impl RunReport {
    fn to_json(&self) -> Value {
        json!({
            "name": self.name,
            "kind": self.kind,
            "dir": self.dir,
            "ckpt_run_exit": self.exit,
            "duration_ms": self.duration.as_millis() as u64,
            "interruptions": self.interruptions,
            "result": self.result,
            "difference": self.difference.as_ref().map(Difference::to_json),
            "findings": self.findings.iter().map(|f| json!({"kind": f.kind, "message": f.message})).collect::<Vec<_>>(),
        })
    }
}

/// Runs the job to the end, uninterrupted.
fn run_plain(ctx: &Ctx, d: &RunDirs, name: &str) -> Result<RunReport, Fatal> {
    let t0 = Instant::now();
    let mut sup = ctx.spawn(d, None)?;
    let st = sup.finish()?;
    let job_ms = sup
        .events
        .all
        .iter()
        .filter(|e| e["event"] == "exit")
        .filter_map(|e| e["ran_ms"].as_u64())
        .max();
    Ok(RunReport {
        name: name.into(),
        kind: "uninterrupted".into(),
        dir: d.root.clone(),
        exit: st.map(status_code),
        duration: t0.elapsed(),
        job_ms,
        ..Default::default()
    })
}

/// How long the newest answered request in `events` took to commit (ms; 0 if none).
fn request_to_commit_ms(events: &[Value]) -> u64 {
    let mut req: Option<u64> = None;
    let mut last = 0;
    for e in events {
        match e["event"].as_str() {
            Some("request") => req = e["t_ms"].as_u64(),
            Some("committed") => {
                if let (Some(r), Some(c)) = (req.take(), e["t_ms"].as_u64()) {
                    last = c.saturating_sub(r);
                }
            }
            Some("exit") => req = None,
            _ => {}
        }
    }
    last
}

/// A random instant between `lo` and `hi` (fractions of `t`) from now.
fn instant_in(rng: &mut fastrand::Rng, t: Duration, lo: f64, hi: f64) -> Instant {
    let f = lo + rng.f64() * (hi - lo);
    Instant::now() + t.mul_f64(f)
}

/// Runs the job under `ckpt run` with one interruption of kind `kind`.
fn run_interrupted(
    ctx: &Ctx,
    d: &RunDirs,
    name: &str,
    kind: Kind,
    every: Duration,
    t: Duration,
    rng: &mut fastrand::Rng,
) -> Result<RunReport, Fatal> {
    let t0 = Instant::now();
    let mut rep = RunReport {
        name: name.into(),
        kind: kind.name().into(),
        dir: d.root.clone(),
        ..Default::default()
    };
    let mut sup = ctx.spawn(d, Some(every))?;
    let mut killed: Vec<u32> = Vec::new();
    // Kills the running job's group; records what it was.
    let mut kill_now = |sup: &mut Sup, what: &str, rep: &mut RunReport| -> bool {
        sup.events.poll();
        let Some(pgid) = sup.events.running_job() else {
            return false;
        };
        kill_group(pgid);
        killed.push(pgid);
        let last = sup.events.last_committed();
        rep.interruptions.push(json!({
            "action": "sigkill",
            "when": what,
            "pid": pgid,
            "after_ms": t0.elapsed().as_millis() as u64,
            "newest_checkpoint": last.map(|(seq, step)| json!({"seq": seq, "step": step})),
        }));
        true
    };
    let mut exited: Option<ExitStatus> = None;
    // Every interruption comes once a first checkpoint exists (so that the job has
    // something to resume from), at a random instant of the rest of the run.
    let mut t = t;
    match sup.wait_event(0, |e| e["event"] == "committed")? {
        Some(Wait::Exited(st)) => exited = Some(st),
        Some(Wait::Event(_)) => {
            t = t
                .saturating_sub(t0.elapsed())
                .max(Duration::from_millis(20));
        }
        None => {}
    }
    match kind {
        _ if exited.is_some() => {}
        Kind::MidStep => {
            let at = instant_in(rng, t, 0.05, 0.8);
            exited = sup.wait_until(at)?;
            if exited.is_none() {
                kill_now(&mut sup, "mid-step, at a random instant", &mut rep);
            }
        }
        Kind::MidSave | Kind::AfterCommit => {
            let at = instant_in(rng, t, 0.0, 0.6);
            exited = sup.wait_until(at)?;
            if exited.is_none() {
                let from = sup.events.all.len();
                let ev = if kind == Kind::MidSave {
                    "request"
                } else {
                    "committed"
                };
                match sup.wait_event(from, |e| e["event"] == ev)? {
                    Some(Wait::Event(i)) => {
                        let what = if kind == Kind::MidSave {
                            // A random instant between the request and the commit it
                            // brings, as long as the previous request took to commit.
                            let lat = request_to_commit_ms(&sup.events.all[..i]);
                            let delay = Duration::from_millis((rng.f64() * lat as f64) as u64);
                            if !delay.is_zero() {
                                exited = sup.wait_until(Instant::now() + delay)?;
                            }
                            sup.events.poll();
                            let done = sup.events.all[i..]
                                .iter()
                                .any(|e| e["event"] == "committed");
                            format!(
                                "{}ms after a checkpoint request ({}; the previous one took {lat}ms to commit)",
                                delay.as_millis(),
                                if done { "its save had already committed" } else { "while the job saves" }
                            )
                        } else {
                            "right after a checkpoint was committed".to_string()
                        };
                        if exited.is_none() {
                            kill_now(&mut sup, &what, &mut rep);
                        }
                    }
                    Some(Wait::Exited(st)) => exited = Some(st),
                    None => {}
                }
            }
        }
        Kind::AfterResume => {
            // First a kill once a checkpoint exists, then one right after the relaunch.
            let at = instant_in(rng, t, 0.0, 0.5);
            exited = sup.wait_until(at)?;
            if exited.is_none() {
                match sup.wait_event(0, |e| e["event"] == "committed")? {
                    Some(Wait::Event(_)) => {
                        let from = sup.events.all.len();
                        if kill_now(&mut sup, "mid-step", &mut rep) {
                            // Right after the relaunch, or right after its hello (for a job with a
                            // client: a shell job never says hello).
                            let after_hello =
                                rng.bool() && sup.events.all.iter().any(|e| e["event"] == "hello");
                            match sup.wait_event(from, |e| {
                                e["event"] == "launch" && !e["restore_seq"].is_null()
                            })? {
                                Some(Wait::Event(i)) => {
                                    let pid = sup.events.all[i]["pid"].as_u64();
                                    let mut ok = true;
                                    if after_hello {
                                        match sup.wait_event(i, |e| {
                                            e["event"] == "hello" && e["pid"].as_u64() == pid
                                        })? {
                                            Some(Wait::Event(_)) => {}
                                            Some(Wait::Exited(st)) => {
                                                exited = Some(st);
                                                ok = false;
                                            }
                                            None => ok = false,
                                        }
                                    }
                                    if ok {
                                        kill_now(
                                            &mut sup,
                                            if after_hello {
                                                "right after the resumed job said hello"
                                            } else {
                                                "right after the job was relaunched to resume"
                                            },
                                            &mut rep,
                                        );
                                    }
                                }
                                Some(Wait::Exited(st)) => exited = Some(st),
                                None => {}
                            }
                        }
                    }
                    Some(Wait::Exited(st)) => exited = Some(st),
                    None => {}
                }
            }
        }
        Kind::Stop => {
            let at = instant_in(rng, t, 0.0, 0.7);
            exited = sup.wait_until(at)?;
            if exited.is_none() {
                signal(sup.child.id(), libc::SIGTERM);
                rep.interruptions.push(json!({
                    "action": "sigterm",
                    "when": "at a random instant (the stop path), then ckpt run again",
                    "pid": sup.child.id(),
                    "after_ms": t0.elapsed().as_millis() as u64,
                }));
                let first = sup.finish()?;
                let code = first.map(status_code);
                if let Some(v) = rep.interruptions.last_mut() {
                    v["ckpt_run_exit"] = json!(code);
                }
                match code {
                    Some(c) if c == exit_codes::TEMPFAIL || c == 0 => {
                        // Run again on the same directory (0: it had finished already,
                        // and the second run must say so).
                        let deadline = sup.deadline;
                        drop(sup);
                        sup = ctx.spawn(d, Some(every))?;
                        sup.deadline = deadline;
                    }
                    _ => exited = first,
                }
            }
        }
    }
    let st = match exited {
        Some(st) => Some(st),
        None => sup.finish()?,
    };
    rep.exit = st.map(status_code);
    rep.duration = t0.elapsed();
    drop(sup);
    rep.findings = analyse(&read_all_events(&d.ckpt), &killed);
    Ok(rep)
}

// ---------------------------------------------------------------------------------------
// What went wrong on the way, from the event log

#[derive(Debug, Clone)]
struct Finding {
    kind: &'static str,
    message: String,
}

fn describe_exit(e: &Value) -> String {
    let code = e["exit"].as_i64().unwrap_or(-1);
    if e["signaled"].as_bool() == Some(true) && code > 128 {
        let sig = (code - 128) as i32;
        let name = nix::sys::signal::Signal::try_from(sig)
            .map(|s| s.as_str())
            .unwrap_or("?");
        format!("died of signal {sig} ({name})")
    } else {
        format!("exited with code {code}")
    }
}

/// Findings from one run's event log; `killed` are the job pids ckpt check SIGKILLed.
fn analyse(events: &[Value], killed: &[u32]) -> Vec<Finding> {
    let killed: HashSet<u64> = killed.iter().map(|&p| p as u64).collect();
    let mut out = Vec::new();
    let mut steps: BTreeMap<u64, u64> = BTreeMap::new();
    let mut pending: Option<String> = None;
    // The current launch: (restored step, first commit seen).
    let mut launch: Option<(Option<u64>, bool)> = None;
    let mut last_restored: Option<(u64, u64)> = None;
    let mut quarantined = false;
    let mut hello = false;
    for e in events {
        match e["event"].as_str().unwrap_or("") {
            "start" => pending = None,
            "hello" => hello = true,
            "quarantined" => quarantined = true,
            "launch" => {
                pending = None;
                let restore = e["restore_seq"].as_u64();
                match restore {
                    None => {
                        if let Some((&seq, &step)) = steps.iter().next_back() {
                            if !quarantined {
                                out.push(Finding {
                                    kind: "fresh_start_with_checkpoint",
                                    message: format!("the job was relaunched from scratch although checkpoint {seq} (step {step}) existed"),
                                });
                            }
                        }
                        launch = Some((None, false));
                    }
                    Some(seq) => {
                        let step = steps.get(&seq).copied();
                        if let (Some((pseq, pstep)), Some(step)) = (last_restored, step) {
                            if step < pstep {
                                out.push(Finding {
                                    kind: "restored_step_backwards",
                                    message: format!("a resume restored checkpoint {seq} at step {step}, after an earlier resume from checkpoint {pseq} at step {pstep}"),
                                });
                            }
                        }
                        if let Some(step) = step {
                            last_restored = Some((seq, step));
                        }
                        launch = Some((step, false));
                    }
                }
            }
            "request" => {
                pending = Some(e["why"].as_str().unwrap_or("request").to_string());
            }
            "committed" => {
                pending = None;
                let (seq, step) = (
                    e["seq"].as_u64().unwrap_or(0),
                    e["step"].as_u64().unwrap_or(0),
                );
                if let Some((Some(restored), first_seen)) = launch.as_mut() {
                    if !*first_seen && step < *restored {
                        out.push(Finding {
                            kind: if step == 0 { "resume_from_step_0" } else { "resume_went_back" },
                            message: format!(
                                "after resuming from step {restored}, the job's first checkpoint is at step {step}: it started over{} or saved before its restore finished",
                                if step == 0 { " from step 0" } else { "" }
                            ),
                        });
                    }
                }
                if let Some(l) = launch.as_mut() {
                    l.1 = true;
                }
                steps.insert(seq, step);
            }
            "exit" => {
                let pid = e["pid"].as_u64().unwrap_or(0);
                if let Some(why) = pending.take() {
                    let clean =
                        e["exit"].as_i64() == Some(0) && !e["signaled"].as_bool().unwrap_or(false);
                    if !killed.contains(&pid) && (!clean || why == "stop") {
                        out.push(Finding {
                            kind: "request_unanswered",
                            message: format!(
                                "a checkpoint request ({why}) was never answered: the job (pid {pid}) {} before committing{}",
                                describe_exit(e),
                                if e["signaled"].as_bool() == Some(true) && e["exit"].as_i64().is_some_and(|c| c == 128 + libc::SIGUSR1 as i64 || c == 128 + libc::SIGUSR2 as i64) {
                                    " (a process of the job did not handle the request signal)"
                                } else {
                                    ""
                                }
                            ),
                        });
                    }
                }
                launch = None;
            }
            _ => {}
        }
    }
    for e in events {
        if e["event"] == "restore_failed" {
            out.push(Finding {
                kind: "restore_failed",
                message: format!(
                    "criu restore failed: {}",
                    e["cause"].as_str().unwrap_or("see the run's log")
                ),
            });
        }
    }
    if let Some(why) = transparent_unavailable(events) {
        out.push(Finding {
            kind: "transparent_unavailable",
            message: format!("--transparent: CRIU could not checkpoint the job ({why}): it ran with restarts only"),
        });
    } else if !hello && steps.is_empty() {
        out.push(Finding {
            kind: "no_checkpoint",
            message: "the job never announced a ckpt client and never committed a checkpoint: every restart started over (hint: use a client library, or --run-opt=--signal=USR1 for a job that traps the signal itself)".into(),
        });
    }
    out
}

/// The cause of a `transparent_unavailable` warning in a run's event log (CRIU cannot
/// checkpoint the job: up front or at its first dump).
fn transparent_unavailable(events: &[Value]) -> Option<String> {
    events
        .iter()
        .find(|e| e["event"] == "transparent_unavailable")
        .map(|e| e["cause"].as_str().unwrap_or("no cause given").to_string())
}

// ---------------------------------------------------------------------------------------
// Comparing what runs produced

/// The first difference between two runs.
#[derive(Debug, Clone, Default)]
pub struct Difference {
    pub file: String,
    pub format: &'static str,
    pub offset: Option<u64>,
    pub index: Option<Vec<u64>>,
    pub key: Option<String>,
    pub expected: Option<String>,
    pub actual: Option<String>,
    pub message: String,
}

impl Difference {
    fn to_json(&self) -> Value {
        json!({
            "file": self.file,
            "format": self.format,
            "offset": self.offset,
            "index": self.index,
            "key": self.key,
            "expected": self.expected,
            "actual": self.actual,
            "message": self.message,
        })
    }
}

/// What a run produced: relative name -> absolute path of each file.
type Files = BTreeMap<String, PathBuf>;

fn walk(root: &Path, rel: &Path, out: &mut Files) -> std::io::Result<()> {
    let p = root.join(rel);
    let md = std::fs::metadata(&p)?;
    if md.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(&p)?
            .filter_map(|e| e.ok().map(|e| e.file_name()))
            .collect();
        names.sort();
        for n in names {
            walk(root, &rel.join(n), out)?;
        }
    } else {
        out.insert(rel.display().to_string(), p);
    }
    Ok(())
}

/// The files to compare of a run: its `--output` paths, else its newest checkpoint's
/// members. `Err` explains why there is nothing.
fn collect(d: &RunDirs, outputs: &[PathBuf]) -> Result<Files, String> {
    let mut files = Files::new();
    if !outputs.is_empty() {
        for o in outputs {
            if !d.job.join(o).exists() {
                return Err(format!("the job did not write --output {}", o.display()));
            }
            walk(&d.job, o, &mut files)
                .map_err(|e| format!("cannot read --output {}: {e}", o.display()))?;
        }
        return Ok(files);
    }
    let newest = std::fs::read_dir(&d.ckpt)
        .map_err(|e| format!("cannot read {}: {e}", d.ckpt.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.strip_prefix("ckpt-")
                .and_then(|s| s.parse::<u64>().ok())
                .map(|seq| (seq, e.path()))
        })
        .max();
    let Some((_, dir)) = newest else {
        return Err(
            "the job left no checkpoint (pass --output PATH for the files it writes)".into(),
        );
    };
    let mut all = Files::new();
    walk(&dir, Path::new(""), &mut all)
        .map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    for (k, v) in all {
        if k != "MANIFEST.ckpt" {
            files.insert(format!("checkpoint:{k}"), v);
        }
    }
    Ok(files)
}

fn compare(reference: &Files, got: &Files) -> Result<Option<Difference>, Fatal> {
    let names: BTreeSet<&String> = reference.keys().chain(got.keys()).collect();
    for n in names {
        match (reference.get(n), got.get(n)) {
            (Some(_), None) => {
                return Ok(Some(Difference {
                    file: n.clone(),
                    format: "missing",
                    message: format!("{n}: missing (the uninterrupted run wrote it)"),
                    ..Default::default()
                }))
            }
            (None, Some(_)) => {
                return Ok(Some(Difference {
                    file: n.clone(),
                    format: "extra",
                    message: format!("{n}: extra file (the uninterrupted run did not write it)"),
                    ..Default::default()
                }))
            }
            (Some(a), Some(b)) => {
                let Some(off) = first_diff_files(a, b)? else {
                    continue;
                };
                let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
                if size(a).max(size(b)) > LOAD_LIMIT {
                    let mut d = diff_large(n, a, b, off)?;
                    d.file = n.clone();
                    return Ok(Some(d));
                }
                let ba = std::fs::read(a).map_err(|e| io_err("read", a, e))?;
                let bb = std::fs::read(b).map_err(|e| io_err("read", b, e))?;
                if ba != bb {
                    let mut note = String::new();
                    match python_diff(n, a, b) {
                        Some(Ok(None)) => continue, // equal values, different bytes
                        Some(Ok(Some(d))) => return Ok(Some(d)),
                        Some(Err(e)) => note = format!(" (python3 could not load it: {e})"),
                        None => {}
                    }
                    let mut d = diff_bytes(n, &ba, &bb);
                    d.file = n.clone();
                    d.message.push_str(&note);
                    return Ok(Some(d));
                }
            }
            (None, None) => {}
        }
    }
    Ok(None)
}

/// Files larger than this are compared by streaming, never loaded whole: the difference is
/// named by byte offset (and, for `.npy`, element index and values).
const LOAD_LIMIT: u64 = 256 << 20;

/// The first byte offset at which two files differ (a shorter file differs where it ends),
/// or `None` when they are equal; read in 1 MiB blocks.
fn first_diff_files(a: &Path, b: &Path) -> Result<Option<u64>, Fatal> {
    let open = |p: &Path| File::open(p).map_err(|e| io_err("open", p, e));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba).map_err(|e| io_err("read", a, e))?;
        let nb = read_full(&mut fb, &mut bb).map_err(|e| io_err("read", b, e))?;
        let n = na.min(nb);
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(pos + i as u64));
        }
        if na != nb {
            return Ok(Some(pos + n as u64));
        }
        if na == 0 {
            return Ok(None);
        }
        pos += n as u64;
    }
}

/// Reads until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// `len` bytes of a file at `off` (fewer at its end).
fn read_at(p: &Path, off: u64, len: usize) -> Result<Vec<u8>, Fatal> {
    use std::os::unix::fs::FileExt;
    let f = File::open(p).map_err(|e| io_err("open", p, e))?;
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < len {
        match f.read_at(&mut buf[n..], off + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => return Err(io_err("read", p, e)),
        }
    }
    buf.truncate(n);
    Ok(buf)
}

/// The first difference of two files too large to load, which differ first at `off`.
fn diff_large(name: &str, a: &Path, b: &Path, off: u64) -> Result<Difference, Fatal> {
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let note = format!(
        " (compared by streaming: {} and {} bytes)",
        size(a),
        size(b)
    );
    if name.to_ascii_lowercase().ends_with(".npy") {
        let (ha, hb) = (read_at(a, 0, 1 << 16)?, read_at(b, 0, 1 << 16)?);
        if let (Some(na), Some(nb)) = (parse_npy(&ha), parse_npy(&hb)) {
            if na == nb && off >= na.data as u64 {
                if let Some(size) = itemsize(&na.descr).filter(|&s| s > 0) {
                    let flat = (off - na.data as u64) / size as u64;
                    let at = na.data as u64 + flat * size as u64;
                    let (ea, eb) = (read_at(a, at, size)?, read_at(b, at, size)?);
                    if ea.len() == size && eb.len() == size {
                        let idx = unravel(flat, &na.shape, na.fortran);
                        let (va, vb) = (npy_value(&na.descr, &ea), npy_value(&na.descr, &eb));
                        return Ok(Difference {
                            file: name.into(),
                            format: "npy",
                            offset: Some(off),
                            message: format!(
                                "{name}: dtype {} shape {}: first differing element at index {} (flat {flat}, byte {off}): {va} (uninterrupted) vs {vb}{note}",
                                na.descr,
                                shape_str(&na.shape),
                                index_str(&idx)
                            ),
                            index: Some(idx),
                            expected: Some(va),
                            actual: Some(vb),
                            ..Default::default()
                        });
                    }
                }
            }
        }
    }
    let (ea, eb) = (
        hex_at(&read_at(a, off, 8)?, 0),
        hex_at(&read_at(b, off, 8)?, 0),
    );
    Ok(Difference {
        file: name.into(),
        format: "bytes",
        offset: Some(off),
        message: format!(
            "{name}: first difference at byte {off}: {ea:?} (uninterrupted) vs {eb:?}{note}"
        ),
        expected: Some(ea),
        actual: Some(eb),
        ..Default::default()
    })
}

/// The optional Python helper for pickles and PyTorch files (src/cli/check_pickle.py).
const PICKLE_HELPER: &str = include_str!("check_pickle.py");

/// Compares two pickles (`.pickle`, `.pkl`) or PyTorch files (`.pt`, `.pth`, with torch
/// importable) by value with `python3`, when it is there: `None` when not applicable,
/// `Some(Ok(None))` when the values are equal although the bytes differ.
fn python_diff(name: &str, a: &Path, b: &Path) -> Option<Result<Option<Difference>, String>> {
    let lower = name.to_ascii_lowercase();
    if ![".pickle", ".pkl", ".pt", ".pth"]
        .iter()
        .any(|e| lower.ends_with(e))
    {
        return None;
    }
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(PICKLE_HELPER)
        .arg(a)
        .arg(b)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut out = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Some(Err("python3 took longer than 120s".into()));
            }
        }
    }
    let v: Value = serde_json::from_str(reader.join().ok()?.trim()).ok()?;
    if let Some(e) = v["error"].as_str() {
        return Some(Err(e.to_string()));
    }
    let d = &v["difference"];
    if d.is_null() {
        return Some(Ok(None));
    }
    let s = |k: &str| d[k].as_str().map(str::to_string);
    let key = s("key").unwrap_or_else(|| "$".into());
    let index: Option<Vec<u64>> = d["index"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect());
    let (ea, eb) = (
        s("expected").unwrap_or_default(),
        s("actual").unwrap_or_default(),
    );
    let at = match &index {
        Some(i) if !i.is_empty() => format!(" at index {}", index_str(i)),
        _ => String::new(),
    };
    let detail = s("detail").map(|x| format!(" ({x})")).unwrap_or_default();
    let mut also_s = String::new();
    let also: Vec<&str> = d["also"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !also.is_empty() {
        also_s = format!("; also differ: {}", also.join(", "));
    }
    Some(Ok(Some(Difference {
        file: name.into(),
        format: if lower.ends_with(".pt") || lower.ends_with(".pth") {
            "torch"
        } else {
            "pickle"
        },
        message: format!(
            "{name}: first difference at key {key}{at}{detail}: {ea} (uninterrupted) vs {eb}{also_s}"
        ),
        key: Some(key),
        index,
        expected: Some(ea),
        actual: Some(eb),
        ..Default::default()
    })))
}

fn first_diff(a: &[u8], b: &[u8]) -> usize {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()))
}

fn hex_at(b: &[u8], off: usize) -> String {
    let end = (off + 8).min(b.len());
    if off >= b.len() {
        return "(end of file)".into();
    }
    b[off..end]
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Names the first difference of two files' bytes, in the file's format when known.
pub fn diff_bytes(name: &str, a: &[u8], b: &[u8]) -> Difference {
    let lower = name.to_ascii_lowercase();
    if lower.ends_with(".npy") {
        if let Some(d) = diff_npy(name, a, b) {
            return d;
        }
    } else if lower.ends_with(".npz") {
        if let Some(d) = diff_npz(name, a, b) {
            return d;
        }
    } else if lower.ends_with(".json") {
        if let (Ok(va), Ok(vb)) = (
            serde_json::from_slice::<Value>(a),
            serde_json::from_slice::<Value>(b),
        ) {
            if let Some((key, ea, eb)) = diff_json("$", &va, &vb) {
                let also = match (&va, &vb) {
                    (Value::Object(ma), Value::Object(mb)) => ma
                        .keys()
                        .chain(mb.keys())
                        .collect::<BTreeSet<_>>()
                        .into_iter()
                        .filter(|k| ma.get(*k) != mb.get(*k))
                        .map(|k| format!("$.{k}"))
                        .filter(|k| !key.starts_with(k.as_str()))
                        .collect::<Vec<_>>(),
                    _ => Vec::new(),
                };
                let also = if also.is_empty() {
                    String::new()
                } else {
                    format!("; also differ: {}", also.join(", "))
                };
                return Difference {
                    file: name.into(),
                    format: "json",
                    message: format!(
                        "{name}: first difference at key {key}: {ea} (uninterrupted) vs {eb}{also}"
                    ),
                    key: Some(key),
                    expected: Some(ea),
                    actual: Some(eb),
                    ..Default::default()
                };
            }
        }
    }
    let off = first_diff(a, b);
    let size = if a.len() != b.len() {
        format!(" (sizes {} vs {} bytes)", a.len(), b.len())
    } else {
        String::new()
    };
    let (format, place) = match (std::str::from_utf8(a), std::str::from_utf8(b)) {
        (Ok(_), Ok(_)) => {
            let line = a[..off].iter().filter(|&&c| c == b'\n').count() + 1;
            let line_of = |t: &[u8]| -> String {
                let start = t[..off.min(t.len())]
                    .iter()
                    .rposition(|&c| c == b'\n')
                    .map_or(0, |p| p + 1);
                let end = t[start..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(t.len(), |p| start + p);
                let s = String::from_utf8_lossy(&t[start..end]).into_owned();
                if s.chars().count() > 100 {
                    s.chars().take(100).collect::<String>() + "..."
                } else {
                    s
                }
            };
            ("text", (format!(" (line {line})"), line_of(a), line_of(b)))
        }
        _ => ("bytes", (String::new(), hex_at(a, off), hex_at(b, off))),
    };
    let (where_, ea, eb) = place;
    Difference {
        file: name.into(),
        format,
        offset: Some(off as u64),
        message: format!(
            "{name}: first difference at byte {off}{where_}{size}: {ea:?} (uninterrupted) vs {eb:?}"
        ),
        expected: Some(ea),
        actual: Some(eb),
        ..Default::default()
    }
}

fn short_json(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        s.chars().take(80).collect::<String>() + "..."
    } else {
        s
    }
}

/// The path of the first difference between two JSON values, and both values there.
fn diff_json(path: &str, a: &Value, b: &Value) -> Option<(String, String, String)> {
    match (a, b) {
        (Value::Object(ma), Value::Object(mb)) => {
            let keys: BTreeSet<&String> = ma.keys().chain(mb.keys()).collect();
            for k in keys {
                let p = format!("{path}.{k}");
                match (ma.get(k), mb.get(k)) {
                    (Some(x), Some(y)) => {
                        if let Some(d) = diff_json(&p, x, y) {
                            return Some(d);
                        }
                    }
                    (Some(x), None) => return Some((p, short_json(x), "(missing)".into())),
                    (None, Some(y)) => return Some((p, "(missing)".into(), short_json(y))),
                    (None, None) => {}
                }
            }
            None
        }
        (Value::Array(xa), Value::Array(xb)) => {
            for (i, (x, y)) in xa.iter().zip(xb).enumerate() {
                if let Some(d) = diff_json(&format!("{path}[{i}]"), x, y) {
                    return Some(d);
                }
            }
            (xa.len() != xb.len()).then(|| {
                (
                    format!("{path} (length)"),
                    xa.len().to_string(),
                    xb.len().to_string(),
                )
            })
        }
        _ => (a != b).then(|| (path.to_string(), short_json(a), short_json(b))),
    }
}

/// A parsed `.npy` header.
#[derive(Debug, PartialEq)]
struct Npy {
    descr: String,
    fortran: bool,
    shape: Vec<u64>,
    data: usize,
}

fn parse_npy(b: &[u8]) -> Option<Npy> {
    if b.len() < 10 || &b[..6] != b"\x93NUMPY" {
        return None;
    }
    let (hlen, start) = match b[6] {
        1 => (u16::from_le_bytes([b[8], b[9]]) as usize, 10),
        2 | 3 => {
            if b.len() < 12 {
                return None;
            }
            (u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize, 12)
        }
        _ => return None,
    };
    let header = std::str::from_utf8(b.get(start..start + hlen)?).ok()?;
    let after = |key: &str| -> Option<&str> {
        let i = header.find(key)?;
        Some(
            header[i + key.len()..]
                .trim_start()
                .strip_prefix(':')?
                .trim_start(),
        )
    };
    let d = after("'descr'")?;
    let q = d.chars().next()?;
    if q != '\'' && q != '"' {
        return None; // structured dtype: compared as bytes
    }
    let descr = d[1..].split(q).next()?.to_string();
    let fortran = after("'fortran_order'")?.starts_with("True");
    let s = after("'shape'")?.strip_prefix('(')?;
    let s = &s[..s.find(')')?];
    let shape = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| x.trim_end_matches('L').parse().ok())
        .collect::<Option<Vec<u64>>>()?;
    Some(Npy {
        descr,
        fortran,
        shape,
        data: start + hlen,
    })
}

fn itemsize(descr: &str) -> Option<usize> {
    let mut c = descr.chars();
    let first = c.next()?;
    let rest: String = if "<>|=".contains(first) {
        c.collect()
    } else {
        descr.into()
    };
    let kind = rest.chars().next()?;
    let n: usize = rest[1..].parse().ok()?;
    Some(if kind == 'U' { n * 4 } else { n })
}

fn npy_value(descr: &str, b: &[u8]) -> String {
    let big = descr.starts_with('>');
    let kind = descr.trim_start_matches(['<', '>', '|', '=']);
    macro_rules! num {
        ($t:ty, $n:expr) => {{
            let mut a = [0u8; $n];
            a.copy_from_slice(&b[..$n]);
            if big {
                <$t>::from_be_bytes(a).to_string()
            } else {
                <$t>::from_le_bytes(a).to_string()
            }
        }};
    }
    let float = |bits: u64, v: String| format!("{v} (bits {bits:#x})");
    match kind {
        "f8" => {
            let v = num!(f64, 8);
            let bits = u64::from_le_bytes(b[..8].try_into().unwrap());
            float(if big { bits.swap_bytes() } else { bits }, v)
        }
        "f4" => {
            let v = num!(f32, 4);
            let bits = u32::from_le_bytes(b[..4].try_into().unwrap()) as u64;
            float(
                if big {
                    (bits as u32).swap_bytes() as u64
                } else {
                    bits
                },
                v,
            )
        }
        "i1" => (b[0] as i8).to_string(),
        "u1" => b[0].to_string(),
        "b1" => (b[0] != 0).to_string(),
        "i2" => num!(i16, 2),
        "u2" => num!(u16, 2),
        "i4" => num!(i32, 4),
        "u4" => num!(u32, 4),
        "i8" => num!(i64, 8),
        "u8" => num!(u64, 8),
        _ => b.iter().map(|x| format!("{x:02x}")).collect(),
    }
}

fn unravel(mut flat: u64, shape: &[u64], fortran: bool) -> Vec<u64> {
    let mut idx = vec![0; shape.len()];
    let order: Vec<usize> = if fortran {
        (0..shape.len()).collect()
    } else {
        (0..shape.len()).rev().collect()
    };
    for i in order {
        let n = shape[i].max(1);
        idx[i] = flat % n;
        flat /= n;
    }
    idx
}

/// An element index as `[i, j]`.
fn index_str(i: &[u64]) -> String {
    format!(
        "[{}]",
        i.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
    )
}

fn shape_str(s: &[u64]) -> String {
    match s {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            s.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        ),
    }
}

fn diff_npy(name: &str, a: &[u8], b: &[u8]) -> Option<Difference> {
    let (ha, hb) = (parse_npy(a)?, parse_npy(b)?);
    let mut d = Difference {
        file: name.into(),
        format: "npy",
        ..Default::default()
    };
    if ha.descr != hb.descr || ha.shape != hb.shape || ha.fortran != hb.fortran {
        let (ea, eb) = (
            format!("dtype {} shape {}", ha.descr, shape_str(&ha.shape)),
            format!("dtype {} shape {}", hb.descr, shape_str(&hb.shape)),
        );
        d.message = format!("{name}: array header differs: {ea} (uninterrupted) vs {eb}");
        d.expected = Some(ea);
        d.actual = Some(eb);
        return Some(d);
    }
    let size = itemsize(&ha.descr).filter(|&s| s > 0)?;
    let (da, db) = (a.get(ha.data..)?, b.get(hb.data..)?);
    let off = first_diff(da, db);
    let flat = (off / size) as u64;
    let total = da.len().min(db.len()) / size;
    if (flat as usize) >= total {
        return None;
    }
    let differing = (0..total)
        .filter(|i| da[i * size..(i + 1) * size] != db[i * size..(i + 1) * size])
        .count();
    let idx = unravel(flat, &ha.shape, ha.fortran);
    let (ea, eb) = (
        npy_value(&ha.descr, &da[flat as usize * size..]),
        npy_value(&ha.descr, &db[flat as usize * size..]),
    );
    d.message = format!(
        "{name}: dtype {} shape {}: first differing element at index {} (flat {flat}, byte {}): {ea} (uninterrupted) vs {eb}; {differing} of {total} elements differ",
        ha.descr,
        shape_str(&ha.shape),
        index_str(&idx),
        ha.data + off
    );
    d.offset = Some((ha.data + off) as u64);
    d.index = Some(idx);
    d.expected = Some(ea);
    d.actual = Some(eb);
    Some(d)
}

/// A member of a zip archive (central directory entry).
struct ZipEntry {
    name: String,
    method: u16,
    crc: u32,
    csize: u64,
    data: usize,
}

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

/// The members of a zip archive (no zip64 beyond what numpy writes for small files).
fn parse_zip(b: &[u8]) -> Option<Vec<ZipEntry>> {
    let eocd = (0..b.len().saturating_sub(21))
        .rev()
        .take(65_557)
        .find(|&i| u32_at(b, i) == Some(0x0605_4b50))?;
    let count = u16_at(b, eocd + 10)? as usize;
    let mut p = u32_at(b, eocd + 16)? as usize;
    let mut out = Vec::new();
    for _ in 0..count {
        if u32_at(b, p)? != 0x0201_4b50 {
            return None;
        }
        let method = u16_at(b, p + 10)?;
        let crc = u32_at(b, p + 16)?;
        let csize = u32_at(b, p + 20)? as u64;
        let (nl, el, cl) = (
            u16_at(b, p + 28)? as usize,
            u16_at(b, p + 30)? as usize,
            u16_at(b, p + 32)? as usize,
        );
        let local = u32_at(b, p + 42)? as usize;
        let name = String::from_utf8_lossy(b.get(p + 46..p + 46 + nl)?).into_owned();
        if csize == 0xFFFF_FFFF || local == 0xFFFF_FFFF {
            return None;
        }
        let lnl = u16_at(b, local + 26)? as usize;
        let lel = u16_at(b, local + 28)? as usize;
        out.push(ZipEntry {
            name,
            method,
            crc,
            csize,
            data: local + 30 + lnl + lel,
        });
        p += 46 + nl + el + cl;
    }
    Some(out)
}

fn diff_npz(name: &str, a: &[u8], b: &[u8]) -> Option<Difference> {
    let (za, zb) = (parse_zip(a)?, parse_zip(b)?);
    let ma: BTreeMap<&str, &ZipEntry> = za.iter().map(|e| (e.name.as_str(), e)).collect();
    let mb: BTreeMap<&str, &ZipEntry> = zb.iter().map(|e| (e.name.as_str(), e)).collect();
    let keys: BTreeSet<&str> = ma.keys().chain(mb.keys()).copied().collect();
    for k in keys {
        let array = k.strip_suffix(".npy").unwrap_or(k);
        let member = format!("{name}[{array}]");
        match (ma.get(k), mb.get(k)) {
            (Some(x), Some(y)) => {
                if x.crc == y.crc && x.csize == y.csize {
                    continue;
                }
                if x.method == 0 && y.method == 0 {
                    let (da, db) = (
                        a.get(x.data..x.data + x.csize as usize)?,
                        b.get(y.data..y.data + y.csize as usize)?,
                    );
                    let mut d = diff_npy(&member, da, db)
                        .unwrap_or_else(|| diff_bytes(&format!("{member}.bin"), da, db));
                    if let Some(o) = d.offset {
                        // Offsets in the archive, not in the member.
                        let abs = o + x.data as u64;
                        d.message = d
                            .message
                            .replacen(
                                &format!("byte {o})"),
                                &format!("byte {abs} of the archive)"),
                                1,
                            )
                            .replacen(
                                &format!("byte {o} "),
                                &format!("byte {abs} of the archive "),
                                1,
                            );
                        d.offset = Some(abs);
                    }
                    d.file = name.into();
                    d.format = "npz";
                    d.key = Some(array.into());
                    return Some(d);
                }
                return Some(Difference {
                    file: name.into(),
                    format: "npz",
                    key: Some(array.into()),
                    message: format!("{member}: the array differs (compressed member: crc32 {:08x} (uninterrupted) vs {:08x}; np.savez instead of savez_compressed lets ckpt check name the element)", x.crc, y.crc),
                    ..Default::default()
                });
            }
            (x, _) => {
                return Some(Difference {
                    file: name.into(),
                    format: "npz",
                    key: Some(array.into()),
                    message: if x.is_some() {
                        format!("{member}: array missing (the uninterrupted run has it)")
                    } else {
                        format!("{member}: extra array (the uninterrupted run does not have it)")
                    },
                    ..Default::default()
                })
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------

fn make_root(work: &Option<PathBuf>) -> Result<(PathBuf, bool), Fatal> {
    match work {
        Some(w) => {
            if w.exists()
                && std::fs::read_dir(w)
                    .map_err(|e| io_err("read", w, e))?
                    .next()
                    .is_some()
            {
                return Err(Fatal::usage(format!(
                    "--work {}: the directory is not empty; give a new or empty one",
                    w.display()
                )));
            }
            std::fs::create_dir_all(w).map_err(|e| io_err("create", w, e))?;
            Ok((std::path::absolute(w).unwrap_or(w.clone()), false))
        }
        None => {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let p =
                std::env::temp_dir().join(format!("ckpt-check-{}-{nanos:08x}", std::process::id()));
            std::fs::create_dir_all(&p).map_err(|e| io_err("create", &p, e))?;
            Ok((p, true))
        }
    }
}

fn log_tail(p: &Path) -> String {
    let t = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

pub fn run(a: CheckArgs) -> Result<i32, Fatal> {
    for o in &a.run_opt {
        let s = o.to_string_lossy();
        for (flag, hint) in [
            ("--every", "use ckpt check --every"),
            ("--dir", "ckpt check gives every run its own directory"),
            ("-d", "ckpt check gives every run its own directory"),
        ] {
            if s == flag || s.starts_with(&format!("{flag}=")) {
                return Err(Fatal::usage(format!("--run-opt {s}: {hint}")));
            }
        }
    }
    // --transparent (or --run-opt=--transparent): CRIU images hold pids, addresses and
    // timestamps, so the job's own outputs are what can be compared.
    let transparent = a.transparent || a.run_opt.iter().any(|o| o == "--transparent");
    if transparent && a.output.is_empty() {
        return Err(Fatal::usage("--transparent: give --output PATH (the files the job writes): CRIU image sets differ from run to run and cannot be compared"));
    }
    let mut run_opts = a.run_opt.clone();
    if transparent && !run_opts.iter().any(|o| o == "--transparent") {
        run_opts.push("--transparent".into());
    }
    if a.output
        .iter()
        .any(|o| o.is_absolute() || o.components().any(|c| c == std::path::Component::ParentDir))
    {
        return Err(Fatal::usage("--output: give a path relative to the job's working directory (each run has its own), without .."));
    }
    let exe = std::env::current_exe().map_err(|e| {
        Fatal::new(
            ErrKind::Internal,
            format!("cannot find the ckpt executable: {e}"),
        )
    })?;
    let mut command = a.command.clone();
    let prog = PathBuf::from(&command[0]);
    if prog.components().count() > 1 && prog.is_relative() {
        command[0] = std::path::absolute(&prog)
            .map_err(|e| io_err("resolve", &prog, e))?
            .into_os_string();
    }
    // The job runs in a scratch directory: arguments naming the caller's files (a script,
    // a config) are made absolute, announced below.
    let mut resolved = Vec::new();
    let caller_file = |p: &Path| {
        p.is_relative()
            && !p.as_os_str().is_empty()
            && p.is_file()
            && !a.output.iter().any(|o| p.starts_with(o))
    };
    for arg in command.iter_mut().skip(1) {
        let s = arg.to_string_lossy().into_owned();
        // `train.py`, or the value of `--config=conf.yaml`.
        let (prefix, value) = match s.strip_prefix('-') {
            None => ("", s.as_str()),
            Some(_) => match s.split_once('=') {
                Some((flag, v)) if flag.starts_with("--") => (flag, v),
                _ => continue,
            },
        };
        let p = Path::new(value);
        if caller_file(p) {
            if let Ok(abs) = std::path::absolute(p) {
                resolved.push(value.to_string());
                *arg = if prefix.is_empty() {
                    abs.into_os_string()
                } else {
                    format!("{prefix}={}", abs.display()).into()
                };
            }
        }
    }
    let seed = a.seed.unwrap_or_else(|| fastrand::u64(..));
    let mut rng = fastrand::Rng::with_seed(seed);
    let (root, temporary) = make_root(&a.work)?;
    let ctx = Ctx {
        exe,
        command,
        run_opts,
        timeout: a.timeout,
    };
    ctx.progress(format!(
        "seed {seed} (replay with --seed {seed}); runs under {}",
        root.display()
    ));

    if !resolved.is_empty() {
        ctx.progress(format!(
            "the job runs in a scratch directory: made {} absolute",
            resolved.join(", ")
        ));
    }
    let mut runs: Vec<RunReport> = Vec::new();
    let outcome = check(&ctx, &a, &root, &mut rng, &mut runs);
    let (code, verdict, summary, first) = match outcome {
        Ok(v) => v,
        Err(e) => {
            eprintln!("ckpt check: runs kept under {}", root.display());
            return Err(e);
        }
    };
    let kept = !(temporary && code == codes::MATCH);
    if !kept {
        let _ = std::fs::remove_dir_all(&root);
    }
    if a.json {
        let doc = json!({
            "version": 1,
            "verdict": verdict,
            "exit_code": code,
            "summary": summary,
            "seed": seed,
            "command": a.command.iter().map(|c| c.to_string_lossy()).collect::<Vec<_>>(),
            "compared": if a.output.is_empty() { json!("final checkpoint") } else { json!(a.output) },
            "work_dir": root,
            "kept": kept,
            "first_difference": first.as_ref().map(Difference::to_json),
            "runs": runs.iter().map(RunReport::to_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else {
        println!("{}: {summary}", verdict.to_uppercase().replace('_', " "));
        if let Some(d) = &first {
            println!("  {}", d.message);
        }
        for r in &runs {
            for f in &r.findings {
                println!("  {} ({}): {}", r.name, r.kind, f.message);
            }
        }
        if kept {
            println!(
                "  runs kept under {} (each: job/, ckpt/, ckpt-run.log); replay with --seed {seed}",
                root.display()
            );
        }
    }
    Ok(code)
}

/// How a `ckpt run` ended: its exit code, or the timeout.
fn ended(code: Option<i32>, timeout: Duration) -> String {
    match code {
        Some(c) => format!("ckpt run exited with {c}"),
        None => format!("stopped after --timeout {}", fmt_dur(timeout)),
    }
}

type Outcome = (i32, &'static str, String, Option<Difference>);

fn check(
    ctx: &Ctx,
    a: &CheckArgs,
    root: &Path,
    rng: &mut fastrand::Rng,
    runs: &mut Vec<RunReport>,
) -> Result<Outcome, Fatal> {
    // 1. Two uninterrupted runs.
    let mut refs: Vec<(RunDirs, Files)> = Vec::new();
    for i in 1..=2 {
        let name = format!("uninterrupted-{i}");
        let d = RunDirs::create(root.join(&name))?;
        ctx.progress(format!("{name}: running the job uninterrupted"));
        let mut r = run_plain(ctx, &d, &name)?;
        let code = r.exit;
        ctx.progress(format!(
            "{name}: {} after {}",
            ended(code, a.timeout),
            fmt_dur(r.duration)
        ));
        if code != Some(0) {
            r.result = "failed".into();
            runs.push(r);
            let tail = log_tail(&d.log);
            return Ok((
                codes::CANNOT_CHECK,
                "cannot_check",
                format!(
                    "the job did not finish when run uninterrupted ({}); its log ({}) ends with:\n{tail}",
                    ended(code, a.timeout),
                    d.log.display()
                ),
                None,
            ));
        }
        if let Some(why) = transparent_unavailable(&read_all_events(&d.ckpt)) {
            r.result = "failed".into();
            runs.push(r);
            return Ok((
                codes::CANNOT_CHECK,
                "cannot_check",
                format!("--transparent: CRIU cannot checkpoint this job here ({why}): its interrupted runs would restart from scratch"),
                None,
            ));
        }
        match collect(&d, &a.output) {
            Ok(f) => refs.push((d, f)),
            Err(why) => {
                r.result = "failed".into();
                runs.push(r);
                return Ok((
                    codes::CANNOT_CHECK,
                    "cannot_check",
                    format!("nothing to compare: {why} when run uninterrupted"),
                    None,
                ));
            }
        }
        r.result = if i == 1 {
            "reference".into()
        } else {
            "match".into()
        };
        runs.push(r);
    }
    if let Some(d) = compare(&refs[0].1, &refs[1].1)? {
        if let Some(r) = runs.last_mut() {
            r.result = "differs".into();
            r.difference = Some(d.clone());
        }
        ctx.progress(format!("uninterrupted-2 differs: {}", d.message));
        return Ok((
            codes::NONDETERMINISTIC,
            "nondeterministic",
            "the job is not deterministic even uninterrupted: its two plain runs differ, so resumes cannot be checked bit for bit (fix the source of nondeterminism, or compare only deterministic --output files)".into(),
            Some(d),
        ));
    }
    let t = Duration::from_millis(
        runs.iter()
            .filter_map(|r| r.job_ms)
            .max()
            .unwrap_or(1000)
            .max(1),
    );
    let every = a
        .every
        .unwrap_or_else(|| (t / 6).max(Duration::from_millis(50)));
    ctx.progress(format!(
        "the job runs {} uninterrupted and is deterministic; now {} interrupted runs with --every {}",
        fmt_dur(t),
        a.kills,
        fmt_dur(every)
    ));
    if t < Duration::from_millis(200) {
        ctx.progress("warning: the job is very short; interruptions may miss it (give it more steps or slower steps)");
    }

    // 2. Interrupted runs.
    let kinds = plan(a.kills, rng);
    let reference = &refs[0].1;
    let mut first: Option<Difference> = None;
    let mut failed = 0;
    let mut missed = 0;
    let mut findings = 0;
    for (i, kind) in kinds.iter().enumerate() {
        let name = format!("run-{}-{}", i + 1, kind.name());
        let d = RunDirs::create(root.join(&name))?;
        let mut r = run_interrupted(ctx, &d, &name, *kind, every, t, rng)?;
        let what = if r.interruptions.is_empty() {
            missed += 1;
            "not interrupted: the job finished first (before its first checkpoint, or before the chosen instant)".to_string()
        } else {
            r.interruptions
                .iter()
                .map(|x| {
                    format!(
                        "{} {} at {}",
                        if x["action"] == "sigterm" {
                            "SIGTERM to ckpt run"
                        } else {
                            "SIGKILL to the job"
                        },
                        x["when"].as_str().unwrap_or(""),
                        fmt_dur(Duration::from_millis(x["after_ms"].as_u64().unwrap_or(0)))
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        if r.exit != Some(0) {
            r.result = "failed".into();
            failed += 1;
            let msg = format!(
                "{name}: the interrupted run did not finish: {} (log: {})",
                ended(r.exit, a.timeout),
                d.log.display()
            );
            ctx.progress(format!("{name}: {what}; FAILED: {msg}"));
            first.get_or_insert(Difference {
                file: String::new(),
                format: "run",
                message: msg,
                ..Default::default()
            });
        } else {
            match collect(&d, &a.output) {
                Err(why) => {
                    r.result = "differs".into();
                    failed += 1;
                    let diff = Difference {
                        format: "missing",
                        message: format!("{name}: {why}"),
                        ..Default::default()
                    };
                    ctx.progress(format!("{name}: {what}; DIFFERS: {why}"));
                    r.difference = Some(diff.clone());
                    first.get_or_insert(diff);
                }
                Ok(files) => match compare(reference, &files)? {
                    None => {
                        r.result = "match".into();
                        ctx.progress(format!(
                            "{name}: {what}; finished in {}: match",
                            fmt_dur(r.duration)
                        ));
                    }
                    Some(diff) => {
                        r.result = "differs".into();
                        failed += 1;
                        ctx.progress(format!("{name}: {what}; DIFFERS: {}", diff.message));
                        r.difference = Some(diff.clone());
                        first.get_or_insert(diff);
                    }
                },
            }
        }
        for f in &r.findings {
            ctx.progress(format!("{name}: {}: {}", f.kind, f.message));
        }
        findings += r.findings.len();
        runs.push(r);
    }
    let n = kinds.len();
    let interrupted = n - missed;
    if interrupted == 0 && failed == 0 {
        return Ok((
            codes::CANNOT_CHECK,
            "cannot_check",
            format!(
                "none of the {n} runs could be interrupted: the job never committed a checkpoint before it finished (is it using a ckpt client, or trapping --run-opt=--signal=...? is --every shorter than the job?)"
            ),
            None,
        ));
    }
    if failed > 0 {
        return Ok((
            codes::DIFFERS,
            "differs",
            format!("{failed} of {n} interrupted runs did not end like the uninterrupted run"),
            first,
        ));
    }
    if a.strict && findings > 0 {
        return Ok((
            codes::DIFFERS,
            "differs",
            format!("every interrupted run matched, but {findings} problem(s) were seen on the way (--strict)"),
            None,
        ));
    }
    Ok((
        codes::MATCH,
        "match",
        format!(
            "all {n} interrupted runs ended bit-identical to the uninterrupted run ({interrupted} interrupted as planned{}{})",
            if missed > 0 { format!(", {missed} finished before their interruption") } else { String::new() },
            if findings > 0 { format!("; {findings} problem(s) seen on the way, listed above") } else { String::new() }
        ),
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
        while (10 + h.len() + 1) % 64 != 0 {
            h.push(' ');
        }
        h.push('\n');
        let mut out = b"\x93NUMPY\x01\x00".to_vec();
        out.extend_from_slice(&(h.len() as u16).to_le_bytes());
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn npy_names_the_element() {
        let a: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.5, 6.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let d = diff_bytes(
            "w.npy",
            &npy("<f4", "(2, 3)", &a),
            &npy("<f4", "(2, 3)", &b),
        );
        assert_eq!(d.format, "npy");
        assert_eq!(d.index, Some(vec![1, 1]));
        assert!(d.expected.unwrap().starts_with("5 "), "{}", d.message);
        assert!(d.actual.unwrap().starts_with("5.5 "));
        let d = diff_bytes(
            "w.npy",
            &npy("<f4", "(2, 3)", &a),
            &npy("<f4", "(3, 2)", &a),
        );
        assert!(d.message.contains("shape (2, 3)"), "{}", d.message);
    }

    /// A stored (uncompressed) zip archive, as `np.savez` writes it.
    fn zip(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let (mut out, mut cd) = (Vec::new(), Vec::new());
        for (name, data) in members {
            let off = out.len() as u32;
            let crc = crc32fast::hash(data);
            let common = |v: &mut Vec<u8>| {
                v.extend_from_slice(&0u16.to_le_bytes()); // flags
                v.extend_from_slice(&0u16.to_le_bytes()); // method: stored
                v.extend_from_slice(&[0; 4]); // time, date
                v.extend_from_slice(&crc.to_le_bytes());
                v.extend_from_slice(&(data.len() as u32).to_le_bytes());
                v.extend_from_slice(&(data.len() as u32).to_le_bytes());
                v.extend_from_slice(&(name.len() as u16).to_le_bytes());
                v.extend_from_slice(&0u16.to_le_bytes()); // extra
            };
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes());
            common(&mut out);
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(data);
            cd.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            cd.extend_from_slice(&20u16.to_le_bytes());
            cd.extend_from_slice(&20u16.to_le_bytes());
            common(&mut cd);
            cd.extend_from_slice(&[0; 6]); // comment length, disk, internal attributes
            cd.extend_from_slice(&[0; 4]); // external attributes
            cd.extend_from_slice(&off.to_le_bytes());
            cd.extend_from_slice(name.as_bytes());
        }
        let cd_off = out.len() as u32;
        out.extend_from_slice(&cd);
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&(members.len() as u16).to_le_bytes());
        out.extend_from_slice(&(members.len() as u16).to_le_bytes());
        out.extend_from_slice(&(cd.len() as u32).to_le_bytes());
        out.extend_from_slice(&cd_off.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    #[test]
    fn npz_names_the_array_and_the_element() {
        let ints = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let a = zip(&[
            ("step.npy", npy("<i8", "()", &ints(&[7]))),
            ("w.npy", npy("<i8", "(4,)", &ints(&[1, 2, 3, 4]))),
        ]);
        let b = zip(&[
            ("step.npy", npy("<i8", "()", &ints(&[7]))),
            ("w.npy", npy("<i8", "(4,)", &ints(&[1, 2, 9, 4]))),
        ]);
        let d = diff_bytes("model.npz", &a, &b);
        assert_eq!(d.format, "npz", "{}", d.message);
        assert_eq!(d.key.as_deref(), Some("w"));
        assert_eq!(d.index, Some(vec![2]));
        assert_eq!(
            (d.expected.as_deref(), d.actual.as_deref()),
            (Some("3"), Some("9"))
        );
        assert!(
            d.message.starts_with("model.npz[w]: dtype <i8 shape (4,)"),
            "{}",
            d.message
        );
        let c = zip(&[("step.npy", npy("<i8", "()", &ints(&[7])))]);
        let d = diff_bytes("model.npz", &a, &c);
        assert!(
            d.message.contains("model.npz[w]: array missing"),
            "{}",
            d.message
        );
    }

    #[test]
    fn the_command_line_is_consistent() {
        <crate::cli::Cli as clap::CommandFactory>::command().debug_assert();
        let parse = |args: &[&str]| {
            <crate::cli::Cli as clap::Parser>::try_parse_from(["ckpt", "check"].iter().chain(args))
        };
        let cli = parse(&[
            "--run-opt",
            "--signal=USR1",
            "--output",
            "a",
            "--",
            "job",
            "--x",
        ])
        .unwrap();
        let crate::cli::Cmd::Check(a) = cli.command else {
            panic!("not check")
        };
        assert_eq!(a.run_opt, ["--signal=USR1"]);
        assert_eq!(a.command, ["job", "--x"]);
        assert_eq!(a.kills, 4);
        assert!(parse(&["--kills", "0", "--", "job"]).is_err());
        assert!(parse(&["--every", "soon", "--", "job"]).is_err());
    }

    #[test]
    fn large_files_are_streamed_and_still_name_the_element() {
        let dir = std::env::temp_dir().join(format!("ckpt-check-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let n = 3 * (1 << 20) / 8 + 5; // more than one read block
        let mut va: Vec<f64> = (0..n).map(|i| i as f64).collect();
        let write = |name: &str, v: &[f64]| {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let p = dir.join(name);
            std::fs::write(&p, npy("<f8", &format!("({n},)"), &bytes)).unwrap();
            p
        };
        let a = write("a.npy", &va);
        assert_eq!(first_diff_files(&a, &a).unwrap(), None);
        va[n - 2] = -1.0;
        let b = write("b.npy", &va);
        let off = first_diff_files(&a, &b).unwrap().unwrap();
        let d = diff_large("w.npy", &a, &b, off).unwrap();
        assert_eq!(d.index, Some(vec![n as u64 - 2]), "{}", d.message);
        assert!(d.actual.unwrap().starts_with("-1 "), "{}", d.message);
        // The streamed and the in-memory comparison agree.
        let m = diff_bytes(
            "w.npy",
            &std::fs::read(&a).unwrap(),
            &std::fs::read(&b).unwrap(),
        );
        assert_eq!((m.index, m.offset), (d.index, d.offset));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn json_names_the_key() {
        let d = diff_bytes(
            "s.json",
            br#"{"a": {"b": [1, 2, 3]}, "c": 1}"#,
            br#"{"a": {"b": [1, 5, 3]}, "c": 1}"#,
        );
        assert_eq!(d.key.as_deref(), Some("$.a.b[1]"));
        assert_eq!(d.expected.as_deref(), Some("2"));
    }

    #[test]
    fn text_and_bytes_name_the_offset() {
        let d = diff_bytes("d.txt", b"abc\ndef\n", b"abc\ndxf\n");
        assert_eq!(d.offset, Some(5));
        assert!(d.message.contains("line 2"), "{}", d.message);
        let d = diff_bytes("d.bin", &[0, 1, 2, 0xff], &[0, 1, 3, 0xff]);
        assert_eq!((d.offset, d.format), (Some(2), "bytes"));
    }

    #[test]
    fn analysis_flags_unanswered_requests_and_fresh_starts() {
        let ev = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let log = vec![
            ev(r#"{"event":"launch","pid":10,"restore_seq":null}"#),
            ev(r#"{"event":"request","why":"periodic"}"#),
            ev(r#"{"event":"committed","seq":1,"step":50}"#),
            ev(r#"{"event":"request","why":"periodic"}"#),
            ev(r#"{"event":"exit","pid":10,"exit":138,"signaled":true}"#),
            ev(r#"{"event":"launch","pid":11,"restore_seq":1}"#),
            ev(r#"{"event":"committed","seq":2,"step":0}"#),
            ev(r#"{"event":"exit","pid":11,"exit":137,"signaled":true}"#),
            ev(r#"{"event":"launch","pid":12,"restore_seq":null}"#),
        ];
        let f = analyse(&log, &[11]);
        let kinds: Vec<&str> = f.iter().map(|f| f.kind).collect();
        assert_eq!(
            kinds,
            [
                "request_unanswered",
                "resume_from_step_0",
                "fresh_start_with_checkpoint"
            ],
            "{f:?}"
        );
        assert!(f[0].message.contains("SIGUSR1"), "{}", f[0].message);
    }
}
