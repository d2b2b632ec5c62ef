//! Slurm: detection from the environment, the job's end time, requeueing, and the messages
//! for when that is impossible. What the supervisor does with them, and why: `docs/slurm.md`.
//!
//! Everything that parses is a pure function over strings (unit-tested below); the few
//! functions that run `squeue`/`scontrol` do so with a hard timeout.

use std::collections::{BTreeMap, VecDeque};
use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// When to requeue the job after a stop (`ckpt run --requeue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequeuePolicy {
    /// Requeue when `scontrol show job` says the job is requeueable (`Requeue=1`).
    Auto,
    /// Try `scontrol requeue` even when the job does not look requeueable.
    Always,
    /// Never requeue: exit 75 and let the batch script decide.
    Never,
}

impl std::str::FromStr for RequeuePolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(RequeuePolicy::Auto),
            "always" => Ok(RequeuePolicy::Always),
            "never" | "off" => Ok(RequeuePolicy::Never),
            _ => Err(format!("{s:?}: expected auto, always or never")),
        }
    }
}

/// What `ckpt run` was told about Slurm.
#[derive(Debug, Clone)]
pub struct Settings {
    pub requeue: RequeuePolicy,
    /// The signal that means "your time is nearly up" (`#SBATCH --signal=B:USR1@120`).
    pub warning_signal: i32,
    /// Stop at least this long before the job's end time; `None`: do not watch the end time.
    pub margin: Option<Duration>,
}

/// The job as the environment describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEnv {
    pub job_id: String,
    pub array_job_id: Option<String>,
    pub array_task_id: Option<String>,
    /// `SLURM_RESTART_COUNT`: how often the job was requeued (0 on the first run).
    pub restart_count: u32,
    /// `SLURM_JOB_END_TIME` (Slurm 23.02 and later), seconds since the epoch.
    pub end_time: Option<u64>,
}

impl JobEnv {
    /// Detects a Slurm job from variables (`get` is `std::env::var` in real use).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Option<JobEnv> {
        let val = |k: &str| {
            get(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let job_id = val("SLURM_JOB_ID").or_else(|| val("SLURM_JOBID"))?;
        Some(JobEnv {
            job_id,
            array_job_id: val("SLURM_ARRAY_JOB_ID"),
            array_task_id: val("SLURM_ARRAY_TASK_ID"),
            restart_count: val("SLURM_RESTART_COUNT")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            end_time: val("SLURM_JOB_END_TIME")
                .and_then(|v| v.parse().ok())
                .filter(|&t| t > 0),
        })
    }

    pub fn from_process_env() -> Option<JobEnv> {
        JobEnv::from_vars(|k| std::env::var(k).ok())
    }

    /// The id `scontrol requeue` needs: an array task requeues only itself.
    pub fn requeue_target(&self) -> String {
        match (&self.array_job_id, &self.array_task_id) {
            (Some(a), Some(t)) => format!("{a}_{t}"),
            _ => self.job_id.clone(),
        }
    }

    /// `job 12` or `job 12 (array task 10_2)`.
    pub fn describe(&self) -> String {
        let target = self.requeue_target();
        if target == self.job_id {
            format!("job {}", self.job_id)
        } else {
            format!("job {} (array task {target})", self.job_id)
        }
    }
}

/// Parses `squeue -o %e` (`2024-05-01T12:34:56`, local time) into seconds since the epoch.
/// `None` for `NONE`, `N/A`, `Unknown` and anything else that is not a date.
pub fn parse_end_time(s: &str) -> Option<u64> {
    let s = s.trim();
    let (date, time) = s.split_once('T')?;
    let d: Vec<i32> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let t: Vec<i32> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if d.len() != 3 || t.len() != 3 || d[0] < 1970 {
        return None;
    }
    // SAFETY: tm is plain data; mktime only reads/normalises it and reads the time zone.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = d[0] - 1900;
    tm.tm_mon = d[1] - 1;
    tm.tm_mday = d[2];
    tm.tm_hour = t[0];
    tm.tm_min = t[1];
    tm.tm_sec = t[2];
    tm.tm_isdst = -1;
    let secs = unsafe { libc::mktime(&mut tm) };
    (secs > 0).then_some(secs as u64)
}

/// Parses Slurm's time-left format (`squeue -o %L`): `SS`, `MM:SS`, `HH:MM:SS`,
/// `D-HH:MM:SS`, `D-HH`, `D-HH:MM`. `None` for `UNLIMITED`, `NOT_SET`, `INVALID`.
pub fn parse_time_left(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let secs = match (s.contains('-'), parts.as_slice()) {
        (true, [h]) => h * 3600,
        (true, [h, m]) => h * 3600 + m * 60,
        (_, [h, m, sec]) => h * 3600 + m * 60 + sec,
        (false, [m, sec]) => m * 60 + sec,
        (false, [sec]) => *sec,
        _ => return None,
    };
    Some(Duration::from_secs(days * 86400 + secs))
}

/// Parses `scontrol show job -o` (`Key=Value` words) into a map.
pub fn parse_show_job(s: &str) -> BTreeMap<String, String> {
    s.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// True if a process environment (`/proc/PID/environ`, NUL-separated) belongs to this ckpt's
/// job in the same Slurm job: a job process started through `srun`, which is a child of
/// slurmstepd and not of ckpt.
pub fn environ_is_peer(environ: &[u8], job_id: &str, supervisor_pid: u32) -> bool {
    let want_job = format!("SLURM_JOB_ID={job_id}");
    let want_sup = format!("{}={supervisor_pid}", crate::protocol::ENV_SUPERVISOR_PID);
    let mut job = false;
    let mut sup = false;
    for kv in environ.split(|&b| b == 0) {
        job |= kv == want_job.as_bytes();
        sup |= kv == want_sup.as_bytes();
    }
    job && sup
}

/// True if `pid` is a live process of this ckpt's job that runs under `srun` in the same
/// Slurm job (see [`environ_is_peer`]). False outside Slurm.
pub fn is_job_peer(pid: u32) -> bool {
    let Some(job_id) = std::env::var("SLURM_JOB_ID").ok().filter(|s| !s.is_empty()) else {
        return false;
    };
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => environ_is_peer(&env, &job_id, std::process::id()),
        Err(_) => false,
    }
}

/// Runs a Slurm command with a hard timeout. `Err` holds a message for people.
pub fn run_tool(prog: &str, args: &[&str], timeout: Duration) -> Result<(bool, String), String> {
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!("`{prog}` not found in PATH"),
            _ => format!("cannot run `{prog}`: {e}"),
        })?;
    let mut out_pipe = child.stdout.take().expect("piped");
    let mut err_pipe = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out_pipe.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err_pipe.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{prog} {}` did not answer within {}s",
                    args.join(" "),
                    timeout.as_secs()
                ));
            }
        }
    };
    let out = out_t.join().unwrap_or_default();
    let err = err_t.join().unwrap_or_default();
    if status.success() {
        Ok((true, out))
    } else {
        Ok((false, format!("{}{}", err.trim(), out.trim())))
    }
}

const TOOL_TIMEOUT: Duration = Duration::from_secs(20);

/// The outcome of the requeue step after a stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    /// ckpt requeued the job (or Slurm was already requeueing it): the batch script should
    /// just exit.
    Done(String),
    /// Not requeued: why, with a hint. The batch script should requeue itself.
    NotDone(String),
}

/// Decides from `scontrol show job` whether to requeue. `None`: go ahead.
pub fn requeue_decision(policy: RequeuePolicy, job: &BTreeMap<String, String>) -> Option<Requeue> {
    let state = job.get("JobState").map(String::as_str).unwrap_or("");
    if state.starts_with("CANCELLED") {
        return Some(Requeue::NotDone(
            "the job was cancelled (scancel): not requeueing it".into(),
        ));
    }
    if state.starts_with("REQUEUE") || state == "PENDING" {
        return Some(Requeue::Done(format!(
            "Slurm is already requeueing the job (JobState={state})"
        )));
    }
    if policy == RequeuePolicy::Auto && job.get("Requeue").map(String::as_str) == Some("0") {
        return Some(Requeue::NotDone(
            "the job is not requeueable (Requeue=0); hint: submit it with `sbatch --requeue`, or pass --requeue always".into(),
        ));
    }
    None
}

/// Requeue step of a Slurm session.
pub fn requeue(env: &JobEnv, policy: RequeuePolicy) -> Requeue {
    if policy == RequeuePolicy::Never {
        return Requeue::NotDone("not requeueing (--requeue never)".into());
    }
    let target = env.requeue_target();
    match run_tool("scontrol", &["show", "job", "-o", &env.job_id], TOOL_TIMEOUT) {
        Err(e) => {
            return Requeue::NotDone(format!(
                "cannot requeue {}: {e} (inside a container Slurm's tools are often missing); the batch script must requeue itself",
                env.describe()
            ))
        }
        Ok((true, out)) => {
            if let Some(r) = requeue_decision(policy, &parse_show_job(&out)) {
                return r;
            }
        }
        Ok((false, err)) if policy == RequeuePolicy::Auto => {
            return Requeue::NotDone(format!(
                "cannot tell whether {} is requeueable: `scontrol show job` failed: {err}",
                env.describe()
            ))
        }
        Ok((false, _)) => {}
    }
    match run_tool("scontrol", &["requeue", &target], TOOL_TIMEOUT) {
        Ok((true, _)) => Requeue::Done(format!(
            "requeued {} with `scontrol requeue {target}`",
            env.describe()
        )),
        Ok((false, err)) => Requeue::NotDone(format!("`scontrol requeue {target}` failed: {err}")),
        Err(e) => Requeue::NotDone(format!("cannot requeue {}: {e}", env.describe())),
    }
}

/// The job's end time: `SLURM_JOB_END_TIME`, else `squeue -h -j ID -o %e`.
/// Returns the time and where it came from, or why it is unknown.
pub fn lookup_end_time(env: &JobEnv) -> Result<Option<(SystemTime, &'static str)>, String> {
    if let Some(t) = env.end_time {
        return Ok(Some((
            UNIX_EPOCH + Duration::from_secs(t),
            "SLURM_JOB_END_TIME",
        )));
    }
    match run_tool(
        "squeue",
        &["-h", "-j", &env.job_id, "-o", "%e|%L"],
        TOOL_TIMEOUT,
    )? {
        (true, out) => {
            let line = out.lines().next().unwrap_or("").trim();
            let (e, l) = line.split_once('|').unwrap_or((line, ""));
            if let Some(t) = parse_end_time(e) {
                return Ok(Some((UNIX_EPOCH + Duration::from_secs(t), "squeue %e")));
            }
            if let Some(left) = parse_time_left(l) {
                return Ok(Some((SystemTime::now() + left, "squeue %L")));
            }
            Ok(None)
        }
        (false, err) => Err(format!("`squeue -j {}` failed: {err}", env.job_id)),
    }
}

/// The job always runs for at least this fraction of the time left when ckpt started
/// (1/4), and at least [`FAIR_SHARE_MIN`] when there is that much: a stop margin longer than
/// the rest is cut down, so a job whose margin exceeds its whole time limit is not stopped at
/// once, requeued and stopped again forever.
pub const FAIR_SHARE_DIVISOR: u32 = 4;
/// See [`FAIR_SHARE_DIVISOR`].
pub const FAIR_SHARE_MIN: Duration = Duration::from_secs(10);

/// The largest stop margin that leaves a job started with `left` to go its fair share.
pub fn margin_cap(left: Duration) -> Duration {
    let share = (left / FAIR_SHARE_DIVISOR).max(FAIR_SHARE_MIN.min(left));
    left.saturating_sub(share)
}

/// One `ckpt run` under Slurm.
#[derive(Debug)]
pub struct Session {
    pub env: JobEnv,
    pub settings: Settings,
    /// When the job's time is up, if known and watched.
    pub end: Option<SystemTime>,
    /// Durations of the most recent checkpoints (ms), newest last.
    saves_ms: VecDeque<u64>,
    /// Slurm sent SIGTERM to every process of the job (time limit, scancel, requeue,
    /// preemption): the job's own processes have it already.
    pub job_got_sigterm: bool,
    /// The time left when this supervisor started: the stop margin never takes more than
    /// [`margin_cap`] of it, so that every launch gets a fair chance to make progress (a
    /// margin longer than the whole job would stop it at once, requeue, and loop).
    pub left_at_start: Option<Duration>,
}

/// Extra time on top of twice the longest recent checkpoint.
pub const MARGIN_SLACK: Duration = Duration::from_secs(10);

impl Session {
    pub fn new(env: JobEnv, settings: Settings) -> Session {
        Session {
            env,
            settings,
            end: None,
            saves_ms: VecDeque::new(),
            job_got_sigterm: false,
            left_at_start: None,
        }
    }

    pub fn note_save(&mut self, ms: u64) {
        if self.saves_ms.len() == 5 {
            self.saves_ms.pop_front();
        }
        self.saves_ms.push_back(ms);
    }

    /// How long before the end to stop: the configured margin, or more if recent
    /// checkpoints were slow (twice the longest of the last five, plus 10 s).
    pub fn margin(&self) -> Duration {
        let measured = self
            .saves_ms
            .iter()
            .max()
            .map(|&ms| Duration::from_millis(ms * 2) + MARGIN_SLACK)
            .unwrap_or_default();
        let wanted = self.settings.margin.unwrap_or_default().max(measured);
        match self.left_at_start {
            Some(left) => wanted.min(margin_cap(left)),
            None => wanted,
        }
    }

    /// Whether the configured margin was cut down to leave the job its fair share.
    pub fn margin_adapted(&self) -> bool {
        self.left_at_start
            .is_some_and(|left| self.settings.margin.unwrap_or_default() > margin_cap(left))
    }

    /// When to stop, as an `Instant` (None when the end time is unknown or not watched).
    pub fn stop_at(&self) -> Option<Instant> {
        let end = self.end?;
        self.settings.margin?;
        let now_sys = SystemTime::now();
        let now = Instant::now();
        let left = end.duration_since(now_sys).unwrap_or_default();
        Some(now + left.saturating_sub(self.margin()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_margin_leaves_the_job_a_fair_share() {
        let s = |m: u64| Duration::from_secs(m);
        // --time=1 with the default 60 s margin: the job gets 15 s, not 0.3 s.
        assert_eq!(
            margin_cap(Duration::from_millis(59_700)),
            Duration::from_millis(44_775)
        );
        assert_eq!(margin_cap(s(3600)), s(2700));
        // Short limits: at least 10 s of work when there is that much.
        assert_eq!(margin_cap(s(30)), s(20));
        assert_eq!(margin_cap(s(8)), s(0));
        let mut sess = Session::new(
            JobEnv::from_vars(|k| (k == "SLURM_JOB_ID").then(|| "7".to_string())).unwrap(),
            Settings {
                requeue: RequeuePolicy::Auto,
                warning_signal: libc::SIGUSR1,
                margin: Some(s(60)),
            },
        );
        assert_eq!(sess.margin(), s(60));
        sess.left_at_start = Some(s(60));
        assert_eq!(sess.margin(), s(45));
        assert!(sess.margin_adapted());
        // Slow saves raise the margin, still within the cap.
        sess.note_save(100_000);
        assert_eq!(sess.margin(), s(45));
        sess.left_at_start = Some(s(3600));
        assert!(!sess.margin_adapted());
        assert_eq!(sess.margin(), s(210));
    }

    fn vars(kv: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = kv
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn detects_jobs_and_array_tasks() {
        assert_eq!(JobEnv::from_vars(vars(&[("HOME", "/")])), None);
        let j = JobEnv::from_vars(vars(&[
            ("SLURM_JOB_ID", "12"),
            ("SLURM_RESTART_COUNT", "2"),
        ]))
        .unwrap();
        assert_eq!(j.requeue_target(), "12");
        assert_eq!(j.restart_count, 2);
        assert_eq!(j.describe(), "job 12");
        let a = JobEnv::from_vars(vars(&[
            ("SLURM_JOB_ID", "13"),
            ("SLURM_ARRAY_JOB_ID", "10"),
            ("SLURM_ARRAY_TASK_ID", "3"),
            ("SLURM_JOB_END_TIME", "1700000000"),
        ]))
        .unwrap();
        assert_eq!(a.requeue_target(), "10_3");
        assert_eq!(a.end_time, Some(1_700_000_000));
        assert_eq!(a.describe(), "job 13 (array task 10_3)");
    }

    #[test]
    fn parses_squeue_times() {
        assert_eq!(parse_end_time("NONE"), None);
        assert_eq!(parse_end_time("N/A"), None);
        assert_eq!(parse_end_time("Unknown"), None);
        let a = parse_end_time("2024-05-01T12:34:56").unwrap();
        let b = parse_end_time("2024-05-01T12:35:56").unwrap();
        assert_eq!(b - a, 60);
        assert_eq!(parse_time_left("UNLIMITED"), None);
        assert_eq!(parse_time_left("NOT_SET"), None);
        assert_eq!(parse_time_left("45"), Some(Duration::from_secs(45)));
        assert_eq!(parse_time_left("1:05"), Some(Duration::from_secs(65)));
        assert_eq!(parse_time_left("2:00:01"), Some(Duration::from_secs(7201)));
        assert_eq!(
            parse_time_left("1-00:00:10"),
            Some(Duration::from_secs(86410))
        );
        assert_eq!(parse_time_left("1-02"), Some(Duration::from_secs(93600)));
    }

    #[test]
    fn requeue_decisions() {
        let job = |s: &str| parse_show_job(s);
        let d = |p, s: &str| requeue_decision(p, &job(s));
        assert_eq!(
            d(
                RequeuePolicy::Auto,
                "JobId=5 JobState=RUNNING Requeue=1 Restarts=0"
            ),
            None
        );
        assert!(
            matches!(d(RequeuePolicy::Auto, "JobState=RUNNING Requeue=0"), Some(Requeue::NotDone(m)) if m.contains("--requeue"))
        );
        assert_eq!(d(RequeuePolicy::Always, "JobState=RUNNING Requeue=0"), None);
        assert!(matches!(
            d(RequeuePolicy::Auto, "JobState=CANCELLED Requeue=1"),
            Some(Requeue::NotDone(_))
        ));
        assert!(matches!(
            d(RequeuePolicy::Auto, "JobState=REQUEUED Requeue=1"),
            Some(Requeue::Done(_))
        ));
    }

    #[test]
    fn peers_need_the_same_job_and_supervisor() {
        let env = b"A=1\0SLURM_JOB_ID=7\0CKPT_SUPERVISOR_PID=99\0";
        assert!(environ_is_peer(env, "7", 99));
        assert!(!environ_is_peer(env, "8", 99));
        assert!(!environ_is_peer(env, "7", 98));
        assert!(!environ_is_peer(
            b"SLURM_JOB_ID=77\0CKPT_SUPERVISOR_PID=99",
            "7",
            99
        ));
    }

    #[test]
    fn margin_covers_slow_checkpoints() {
        let env = JobEnv::from_vars(vars(&[("SLURM_JOB_ID", "1")])).unwrap();
        let mut s = Session::new(
            env,
            Settings {
                requeue: RequeuePolicy::Auto,
                warning_signal: libc::SIGUSR1,
                margin: Some(Duration::from_secs(30)),
            },
        );
        assert_eq!(s.margin(), Duration::from_secs(30));
        s.note_save(15_000);
        assert_eq!(s.margin(), Duration::from_secs(40));
        for _ in 0..5 {
            s.note_save(100);
        }
        assert_eq!(s.margin(), Duration::from_secs(30));
        assert_eq!(s.stop_at(), None);
        s.end = Some(SystemTime::now() + Duration::from_secs(100));
        let at = s.stop_at().unwrap();
        let d = at.saturating_duration_since(Instant::now());
        assert!(
            d <= Duration::from_secs(70) && d > Duration::from_secs(68),
            "{d:?}"
        );
    }
}
