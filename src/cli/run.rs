//! `ckpt run`.

use std::ffi::OsString;
use std::time::Duration;

use super::{parse_duration, DirArg};
use crate::protocol::parse_signal;
use crate::supervisor::policy::Policy;
use crate::supervisor::{exit_codes, Config, Fatal};

/// Supervise a job.
///
/// The job gets CKPT_DIR, CKPT_RESTORE (the checkpoint to resume from; empty on a fresh
/// start), CKPT_RESTART_COUNT and the protocol variables (docs/protocol.md). Jobs using a ckpt
/// client (Rust, Python, or `ckpt save` in a shell trap with --signal) are asked to checkpoint
/// every --every and before they are stopped. Any job is restarted after it fails.
#[derive(Debug, clap::Args)]
#[command(after_long_help = exit_codes::help())]
pub struct RunArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Request a checkpoint this often (e.g. 30s, 10m, 2h; `off` for never; `auto`: the
    /// Young/Daly interval sqrt(2 x C x MTBF) from each save's measured cost C, starting at
    /// 5m until the first save is measured, explained in the log; C of an asynchronous save
    /// is the time it blocked the job, and the interval stays at least twice the whole
    /// background save).
    #[arg(long, default_value = "10m", value_name = "DURATION")]
    pub every: String,
    /// Mean time between failures for `--every auto` (default: learned from the failures
    /// seen in this run, else 24h).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub mtbf: Option<Duration>,
    /// Signal that requests a checkpoint. Given explicitly, it is also sent to jobs that
    /// trap it themselves without announcing a client (shell traps).
    #[arg(long, value_name = "SIG")]
    pub signal: Option<String>,
    /// Where a --signal request goes when the job has not announced a client: `leader`, the
    /// command ckpt started (its background workers and helpers, which never asked for the
    /// signal, keep running: a shell trap is not interrupted by its own children dying), or
    /// `group`, its whole process group. Processes that announced a client always get the
    /// request themselves.
    #[arg(long, value_enum, default_value = "leader", value_name = "WHO")]
    pub signal_to: SignalToArg,
    /// Give up after the job was stopped (time limit, notice, signal) N times in a row
    /// without making progress since its launch: exit 76 instead of 75 or a Slurm requeue,
    /// which would only loop.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub max_stops_without_progress: u32,
    /// On stop, how long the job gets to commit a checkpoint and exit before SIGTERM.
    #[arg(long, default_value = "20s", value_parser = parse_duration, value_name = "DURATION")]
    pub grace: Duration,
    /// After SIGTERM, how long before SIGKILL.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub kill_after: Duration,
    /// Keep the newest N checkpoints (older ones are pruned once a newer one verified).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..), value_name = "N")]
    pub keep: u64,
    /// Also keep the oldest checkpoint of each such period as a milestone (e.g. 1h).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub keep_every: Option<Duration>,
    /// Restart backoff: first delay..largest delay, doubling per failure in a row, jittered.
    #[arg(long, default_value = "1s..5m", value_name = "MIN..MAX")]
    pub backoff: String,
    /// Give up after N failures in a row with no new checkpoint between them.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub max_failures: u32,
    /// Give up after N restarts in all, progress or not (default: no limit).
    #[arg(long, value_name = "N")]
    pub max_restarts: Option<u32>,
    /// Start from scratch when checkpoints exist but none verifies (they stay in quarantine/).
    #[arg(long)]
    pub allow_fresh: bool,
    /// How a checkpoint is checked before a launch restores it. `auto` (the default): in
    /// full (every byte read and checksummed, then the job reads it again) until the job's
    /// ckpt client (Rust or Python) has shown that it reads its whole restore through its
    /// verifying reads; then one read per resume for this command, as `client`, back to full
    /// as soon as a launch does not show it again. `full`: always in full. `client`: always
    /// one read: ckpt checks the manifest and the member sizes, and the client checksums
    /// every byte as it reads it; a client that finds damage tells ckpt, which verifies, sets
    /// the checkpoint aside and relaunches from the next one. `client` is only for jobs that
    /// read their checkpoint through a ckpt client, never `$CKPT_RESTORE` directly
    /// (docs/protocol.md, "One read per resume").
    #[arg(long, value_enum, default_value = "auto", value_name = "CHECK")]
    pub restore_check: crate::protocol::RestoreCheckMode,
    /// Run the job even though it already finished in this directory.
    #[arg(long)]
    pub again: bool,
    /// Only warnings and errors on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Log events as JSON lines on stderr instead of plain text.
    #[arg(long, value_enum, default_value = "text", value_name = "FORMAT")]
    pub log_format: LogFormat,
    /// Inside a Slurm job (SLURM_JOB_ID set): stop before the time limit, treat the warning
    /// signal as "stop now", requeue after a stop (docs/slurm.md). `off` ignores Slurm.
    #[arg(long, value_enum, default_value = "auto", value_name = "MODE")]
    pub slurm: SlurmMode,
    /// Under Slurm, requeue the job after a stop: `auto` when it is requeueable
    /// (`sbatch --requeue`), `always`, or `never` (then exit 75 for the batch script).
    #[arg(long, default_value = "auto", value_name = "WHEN")]
    pub requeue: crate::integrations::slurm::RequeuePolicy,
    /// Under Slurm, the warning signal (`#SBATCH --signal=B:USR1@120`): checkpoint, stop the
    /// job, requeue, exit. With USR1 (the default) SIGUSR1 to ckpt no longer means "checkpoint
    /// now" inside a Slurm job.
    #[arg(long, default_value = "USR1", value_name = "SIG")]
    pub slurm_signal: String,
    /// Under Slurm, stop at least this long before the job's end time (more if recent
    /// checkpoints were slow: 2 x the longest + 10s); `off` to not watch the end time.
    #[arg(long, default_value = "60s", value_name = "DURATION")]
    pub slurm_margin: String,
    /// Treat a job whose client reports no progress for this long as hung: kill it and
    /// restart it from the newest checkpoint (clients report at every should_checkpoint()
    /// call). Off by default; never applies to jobs without a client.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub hang_timeout: Option<Duration>,
    /// Signal a hung job gets 2s before SIGKILL, for a stack dump (e.g. QUIT for the JVM,
    /// USR2 with Python's faulthandler.register).
    #[arg(long, value_name = "SIG")]
    pub hang_signal: Option<String>,
    /// Treat a requested checkpoint that does not commit within this long as a hang.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub checkpoint_timeout: Option<Duration>,
    /// Watch the cloud's metadata service for a spot/preemption notice and, when one comes,
    /// checkpoint at once, stop the job and exit 75 (docs/cloud.md). `auto` detects the
    /// cloud from DMI data and does nothing off-cloud.
    #[arg(long, value_enum, value_name = "CLOUD")]
    pub preemption_notice: Option<crate::integrations::cloud::Choice>,
    /// How often to poll the metadata service (GCP long-polls: it answers at once anyway).
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    pub preemption_poll: Duration,
    /// The warning to plan for instead of the cloud's documented one (AWS 2m, GCP and Azure
    /// 30s); a notice's own deadline still counts.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub preemption_window: Option<Duration>,
    /// Base URL of the metadata service (plain http), e.g. for a proxy or a test server;
    /// default http://169.254.169.254 (AWS, Azure), http://metadata.google.internal (GCP).
    #[arg(long, env = "CKPT_METADATA_URL", value_name = "URL")]
    pub metadata_url: Option<String>,
    /// Timeout of one metadata request.
    #[arg(long, default_value = "2s", value_parser = parse_duration, value_name = "DURATION")]
    pub metadata_timeout: Duration,
    /// Start from this checkpoint: `SRC_DIR[:ID|NAME|latest~N]` branches a new run (its first
    /// launch restores a verified copy, hard-linked where possible, with CKPT_START=branch;
    /// the source is untouched); `:REF` or a bare `latest~N` rolls this directory back
    /// (newer checkpoints go to rolled-back/, never deleted). See docs/versions.md.
    #[arg(long, value_name = "SRC")]
    pub from: Option<String>,
    /// Checkpoint the job's whole process tree from outside with CRIU (for jobs that link no
    /// client): the job runs in its own PID namespace, each checkpoint is a `criu dump
    /// --leave-running` published like any other, and a restart restores the newest one.
    /// Needs root and CRIU 4.x (`$CKPT_CRIU`, /usr/local/lib/ckpt/criu-4.1.1/criu, or PATH;
    /// scripts/install-criu). Without them the job runs with restarts only, and the log says
    /// why. docs/transparent.md.
    #[arg(long)]
    pub transparent: bool,
    /// Also keep every committed checkpoint in object storage, uploaded in the background
    /// (manifest last), and resume from there when it holds a newer one than DIR (a new
    /// machine): s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or
    /// file:///shared/path. Credentials and endpoints come from each cloud's standard
    /// environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION,
    /// instance roles, ...). See docs/cloud.md.
    #[arg(long, env = "CKPT_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    /// Keep only the newest N remote checkpoints (those tagged here or in the remote's tag
    /// record are never pruned).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), value_name = "N")]
    pub remote_keep: Option<u64>,
    #[command(flatten)]
    pub remote_auth: super::RemoteAuth,
    /// After a stop, exit 77 (not 75) when the final checkpoint could not be uploaded within
    /// --remote-stop-timeout.
    #[arg(long)]
    pub remote_required: bool,
    /// How long ckpt waits for uploads before it exits.
    #[arg(long, default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub remote_stop_timeout: Duration,
    /// Of a multi-rank checkpoint, upload only these ranks' shards (e.g. `0-3`, this node's
    /// ranks); every other node runs `ckpt upload --follow --ranks ...` for its own. The
    /// remote manifest is written once every shard is up. Default: every shard that no
    /// other node's `ckpt upload` claimed.
    #[arg(long, value_parser = crate::remote::parse_rank_set, value_name = "RANKS")]
    pub remote_ranks: Option<crate::remote::Ranks>,
    /// The job's command line.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SignalToArg {
    Leader,
    Group,
}

/// Durations past this are refused: deadlines are computed on a monotonic clock, and a
/// hundred years is "never" for a job.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

fn bounded(flag: &str, d: Duration) -> Result<Duration, Fatal> {
    if d > MAX_DURATION {
        return Err(Fatal::usage(format!(
            "{flag} {}s is too long (at most 100 years); hint: use `off` where the flag takes it",
            d.as_secs()
        )));
    }
    Ok(d)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SlurmMode {
    Auto,
    Off,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses `MIN..MAX`.
pub fn parse_backoff(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = s
        .split_once("..")
        .ok_or_else(|| format!("--backoff {s:?}: expected MIN..MAX, e.g. 1s..5m"))?;
    let (a, b) = (
        parse_duration(a).map_err(|e| format!("--backoff {s:?}: {e}"))?,
        parse_duration(b).map_err(|e| format!("--backoff {s:?}: {e}"))?,
    );
    if a > b {
        return Err(format!("--backoff {s:?}: MIN is larger than MAX"));
    }
    Ok((a, b))
}

pub fn run(a: RunArgs) -> Result<i32, Fatal> {
    let auto_every = (a.every.trim() == "auto")
        .then_some(crate::supervisor::interval::AutoEvery { mtbf: a.mtbf });
    if a.mtbf.is_some() && auto_every.is_none() {
        return Err(Fatal::usage("--mtbf is only used with --every auto"));
    }
    let every = match a.every.trim() {
        "off" | "never" | "0" => None,
        "auto" => Some(crate::supervisor::interval::AUTO_INITIAL),
        s => Some(
            parse_duration(s)
                .map_err(|e| Fatal::usage(format!("--every {s:?}: {e}; or `off` or `auto`")))?,
        ),
    };
    let (signal, signal_explicit) = match &a.signal {
        Some(s) => (
            parse_signal(s).ok_or_else(|| {
                Fatal::usage(format!(
                    "--signal {s:?} is not a signal name or number (e.g. USR1, SIGUSR2, 12)"
                ))
            })?,
            true,
        ),
        None => (libc::SIGUSR1, false),
    };
    if let Some(why) = crate::protocol::request_signal_problem(signal) {
        return Err(Fatal::usage(format!(
            "--signal {}: this signal cannot serve as a checkpoint request: it {why}; hint: use USR1, USR2 or a real-time signal (docs/protocol.md)",
            a.signal.clone().unwrap_or_default()
        )));
    }
    if let Some(e) = every {
        bounded("--every", e)?;
    }
    let (backoff_min, backoff_max) = parse_backoff(&a.backoff).map_err(Fatal::usage)?;
    bounded("--backoff", backoff_max)?;
    bounded("--grace", a.grace)?;
    bounded("--kill-after", a.kill_after)?;
    for (flag, d) in [
        ("--hang-timeout", a.hang_timeout),
        ("--checkpoint-timeout", a.checkpoint_timeout),
        ("--keep-every", a.keep_every),
        ("--mtbf", a.mtbf),
    ] {
        if let Some(d) = d {
            bounded(flag, d)?;
        }
    }
    bounded("--preemption-poll", a.preemption_poll)?;
    bounded("--metadata-timeout", a.metadata_timeout)?;
    let slurm = match a.slurm {
        SlurmMode::Off => None,
        SlurmMode::Auto => {
            let warning_signal = parse_signal(&a.slurm_signal)
                .filter(|s| ![libc::SIGKILL, libc::SIGSTOP, libc::SIGCHLD].contains(s))
                .ok_or_else(|| {
                    Fatal::usage(format!(
                        "--slurm-signal {:?} is not a usable signal name or number (e.g. USR1, USR2, 10)",
                        a.slurm_signal
                    ))
                })?;
            let margin =
                match a.slurm_margin.trim() {
                    "off" | "never" => None,
                    s => Some(parse_duration(s).map_err(|e| {
                        Fatal::usage(format!("--slurm-margin {s:?}: {e}; or `off`"))
                    })?),
                };
            Some(crate::integrations::slurm::Settings {
                requeue: a.requeue,
                warning_signal,
                margin,
            })
        }
    };
    let hang_signal = match &a.hang_signal {
        Some(s) => Some(parse_signal(s).ok_or_else(|| {
            Fatal::usage(format!(
                "--hang-signal {s:?} is not a signal name or number (e.g. QUIT, USR2)"
            ))
        })?),
        None => None,
    };
    let preemption = match a.preemption_notice {
        None => None,
        Some(choice) => {
            if let Some(u) = &a.metadata_url {
                if !u.starts_with("http://") {
                    return Err(Fatal::usage(format!(
                        "--metadata-url {u:?}: only plain http:// URLs are supported (metadata services are not https)"
                    )));
                }
            }
            if a.preemption_poll.is_zero() || a.metadata_timeout.is_zero() {
                return Err(Fatal::usage(
                    "--preemption-poll and --metadata-timeout must be above zero",
                ));
            }
            let mut p = crate::integrations::cloud::Settings::new(choice);
            p.base_url = a.metadata_url.clone();
            p.poll = a.preemption_poll;
            p.timeout = a.metadata_timeout;
            p.window = a.preemption_window;
            Some(p)
        }
    };
    let remote = match a.remote.filter(|u| !u.is_empty()) {
        Some(url) => Some(crate::remote::Settings {
            url,
            allow_http: a.remote_auth.allow_http,
            keys: a.remote_auth.keys,
            keep: a.remote_keep.map(|n| n as usize),
            required: a.remote_required,
            stop_timeout: bounded("--remote-stop-timeout", a.remote_stop_timeout)?,
            ranks: a.remote_ranks.map(|r| r.0),
        }),
        None => {
            if a.remote_required
                || a.remote_keep.is_some()
                || !a.remote_auth.keys.is_empty()
                || a.remote_ranks.is_some()
            {
                return Err(Fatal::usage(
                    "--remote-required, --remote-keep, --remote-key and --remote-ranks need --remote URL",
                ));
            }
            None
        }
    };
    let cfg = Config {
        hang_timeout: a.hang_timeout,
        hang_signal,
        checkpoint_timeout: a.checkpoint_timeout,
        dir: a.dir.dir,
        command: a.command,
        every,
        auto_every,
        signal,
        signal_explicit,
        signal_to: match a.signal_to {
            SignalToArg::Leader => crate::supervisor::SignalTo::Leader,
            SignalToArg::Group => crate::supervisor::SignalTo::Group,
        },
        max_stops_without_progress: a.max_stops_without_progress,
        grace: a.grace,
        kill_after: a.kill_after,
        keep: a.keep as usize,
        keep_every: a.keep_every,
        policy: Policy {
            backoff_min,
            backoff_max,
            max_failures: a.max_failures,
            max_restarts: a.max_restarts,
        },
        allow_fresh: a.allow_fresh,
        restore_check: a.restore_check,
        again: a.again,
        quiet: a.quiet,
        log_json: matches!(a.log_format, LogFormat::Json),
        slurm,
        preemption,
        from: a.from,
        transparent: a.transparent,
        remote,
    };
    crate::supervisor::run(cfg)
}
