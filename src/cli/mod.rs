//! Command-line interface: clap definitions and one file per subcommand.

mod bench;
mod check;
mod control;
mod demo;
mod history;
mod inspect;
mod run;
mod save;
mod service;
mod upload;
mod versions;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::exit::ErrKind;
use crate::supervisor::{exit_codes, Fatal};

/// Process-level checkpoint/restore supervisor for long-running jobs.
///
/// ckpt launches a job, asks it to checkpoint at safe points (periodically, and when it has
/// to stop), publishes each checkpoint atomically and verified, and relaunches the job from
/// the newest checkpoint that verifies after a crash, a kill or a reboot.
#[derive(Debug, Parser)]
#[command(name = "ckpt", version, about, long_about, after_long_help = exit_codes::help(), propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Supervise a job: checkpoint it on schedule and on stop, restart it after failures.
    Run(Box<run::RunArgs>),
    /// Publish files as a new checkpoint (for shell jobs); returns once it is durable.
    Save(save::SaveArgs),
    /// Upload a checkpoint to a remote; of a multi-rank job, this node's shards (--follow).
    Upload(upload::UploadArgs),
    /// List the checkpoints of a directory (manifests only; `verify` reads everything).
    List(inspect::ListArgs),
    /// Fully verify checkpoints (sizes and checksums); non-zero exit if any is bad.
    Verify(inspect::VerifyArgs),
    /// Name a checkpoint (a version); named checkpoints are never pruned (docs/versions.md).
    Tag(versions::TagArgs),
    /// Remove a checkpoint's name.
    Untag(versions::UntagArgs),
    /// Show a checkpoint: files, sizes, checksums, step, parent, metadata.
    Show(versions::ShowArgs),
    /// Which files differ between two checkpoints (also across directories: DIR:REF).
    Diff(versions::DiffArgs),
    /// Copy a checkpoint out, verified, with its manifest (deployment, archiving).
    Export(versions::ExportArgs),
    /// Bring a checkpoint directory in as a new checkpoint, verified.
    Import(versions::ImportArgs),
    /// Set checkpoints newer than ID aside (rolled-back/) so the next run resumes from ID.
    Rollback(versions::RollbackArgs),
    /// Show or apply retention, and remove old quarantine/staging/trash leftovers.
    Gc(versions::GcArgs),
    /// Show what a running supervisor and its job are doing.
    Status(control::StatusArgs),
    /// Ask the running job for a checkpoint now (`--wait`: until it is durable).
    Checkpoint(control::CheckpointArgs),
    /// Checkpoint and stop a running supervisor (it exits 75: run me again).
    Stop(control::StopArgs),
    /// Measure checkpoint costs on this storage (vs dd) and recommend an interval.
    Bench(bench::BenchArgs),
    /// Show the supervisor's event log.
    Log(history::LogArgs),
    /// Overhead, lost work, restarts and goodput of the runs on a directory.
    Stats(history::StatsArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) on stdout: `ckpt man | man -l -`.
    Man,
    /// Print (or --install) a systemd unit that runs a job under `ckpt run` and resumes it
    /// after a reboot (docs/cloud.md).
    Service(service::ServiceArgs),
    /// Prove that a job resumes exactly: run it uninterrupted, then killed at random instants
    /// under `ckpt run`, and compare the results (docs/check.md).
    Check(Box<check::CheckArgs>),
    /// Run the built-in demo: a toy training job, crashed twice on purpose, resumed, and
    /// its final digest compared with an uninterrupted run.
    Demo(demo::DemoArgs),
    /// The demo's training job (used by `ckpt demo`).
    #[command(hide = true, name = "__trainer")]
    Trainer(demo::TrainerCli),
    /// What `criu restore --exec-cmd` becomes under `ckpt run --transparent`: waits for the
    /// restored job and exits with its status.
    #[command(hide = true, name = "__criu-waiter")]
    CriuWaiter {
        #[arg(last = true)]
        command: Vec<std::ffi::OsString>,
    },
}

/// `--dir`, shared by every subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct DirArg {
    /// Checkpoint directory.
    #[arg(
        long,
        short = 'd',
        env = "CKPT_DIR",
        default_value = "checkpoints",
        value_name = "DIR"
    )]
    pub dir: PathBuf,
}

/// `--remote-key` and `--remote-allow-http`, shared by every subcommand that takes
/// `--remote`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RemoteAuth {
    /// The key that authenticates remote checkpoints (HMAC-SHA256; 32 random bytes as hex).
    /// Repeat it to rotate keys: the first one signs uploads, every one is accepted when
    /// checking. Default: $XDG_CONFIG_HOME/ckpt/remote.key (else ~/.config/ckpt/remote.key),
    /// created owner-only the first time ckpt signs. Every machine that uploads or restores a
    /// job's checkpoints needs the same key (docs/cloud.md, "The key").
    #[arg(long = "remote-key", value_name = "FILE")]
    pub keys: Vec<PathBuf>,
    /// Allow a plain-http endpoint that is not on this machine (loopback endpoints always
    /// are allowed).
    #[arg(long = "remote-allow-http")]
    pub allow_http: bool,
}

impl RemoteAuth {
    /// The settings of a remote used by one command (no retention, no stop wait, every rank).
    pub fn settings(&self, url: &str) -> crate::remote::Settings {
        crate::remote::Settings {
            url: url.to_string(),
            allow_http: self.allow_http,
            keys: self.keys.clone(),
            keep: None,
            required: false,
            stop_timeout: Duration::ZERO,
            ranks: None,
        }
    }

    /// Opens the remote at `url` (a bad URL or key is a usage error naming `--remote`).
    pub fn open(&self, url: &str) -> Result<crate::remote::Remote, Fatal> {
        crate::remote::Remote::open(&self.settings(url))
            .map_err(|e| Fatal::usage(format!("--remote: {e}")))
    }

    /// [`RemoteAuth::open`] when `url` is given and not empty.
    pub fn open_opt(&self, url: &Option<String>) -> Result<Option<crate::remote::Remote>, Fatal> {
        match url.as_deref().filter(|u| !u.is_empty()) {
            Some(u) => self.open(u).map(Some),
            None => Ok(None),
        }
    }
}

/// A time stamp in milliseconds since the epoch as RFC 3339 UTC (with milliseconds when
/// `millis`); one beyond year 9999 (or otherwise unrepresentable), as found in a hostile
/// manifest or event log, is shown raw instead of panicking.
pub fn fmt_utc_ms(ms: u64, millis: bool) -> String {
    // 10000-01-01T00:00:00Z
    const LIMIT_MS: u64 = 253_402_300_800_000;
    if ms >= LIMIT_MS {
        return format!("{ms} ms after the epoch (beyond year 9999)");
    }
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    if millis {
        humantime::format_rfc3339_millis(t).to_string()
    } else {
        humantime::format_rfc3339_seconds(t).to_string()
    }
}

/// Parses `30s`, `10m`, `2h`, `1h30m`, `500ms`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("{e}; expected a duration such as 30s, 10m, 2h or 1h30m"))
}

/// Entry point of the binary: parses, runs, and returns the process exit code.
/// `ckpt run python train.py` (or `ckpt check ...`): the job's command must follow `--`.
fn missing_dashes_hint(e: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sub = args.first()?;
    if !["run", "check"].contains(&sub.as_str()) || args.iter().any(|a| a == "--") {
        return None;
    }
    let Some(ContextValue::String(bad)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    if bad.starts_with('-') {
        return None;
    }
    let pos = args.iter().position(|a| a == bad)?;
    let mut fixed = args.clone();
    fixed.insert(pos, "--".into());
    Some(format!(
        "hint: the job's command goes after `--`: ckpt {}",
        fixed.join(" ")
    ))
}

pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                ErrKind::Usage.code()
            } else {
                0
            };
            let _ = e.print();
            if let Some(hint) = missing_dashes_hint(&e) {
                eprintln!("{hint}");
            }
            return code;
        }
    };
    let result = match cli.command {
        Cmd::Run(a) => run::run(*a),
        Cmd::Save(a) => save::run(a),
        Cmd::Upload(a) => upload::run(a),
        Cmd::List(a) => inspect::list(a),
        Cmd::Verify(a) => inspect::verify(a),
        Cmd::Tag(a) => versions::tag(a),
        Cmd::Untag(a) => versions::untag(a),
        Cmd::Show(a) => versions::show(a),
        Cmd::Diff(a) => versions::diff(a),
        Cmd::Export(a) => versions::export(a),
        Cmd::Import(a) => versions::import(a),
        Cmd::Rollback(a) => versions::rollback(a),
        Cmd::Gc(a) => versions::gc(a),
        Cmd::Demo(a) => demo::run(a),
        Cmd::Check(a) => check::run(*a),
        Cmd::Status(a) => control::status(a),
        Cmd::Checkpoint(a) => control::checkpoint(a),
        Cmd::Stop(a) => control::stop(a),
        Cmd::Log(a) => history::log(a),
        Cmd::Stats(a) => history::stats(a),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "ckpt",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
        Cmd::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            page.render(&mut std::io::stdout())
                .map(|_| 0)
                .map_err(|e| Fatal::io(e.to_string()))
        }
        Cmd::Service(a) => service::run(a),
        Cmd::Trainer(a) => demo::trainer(a),
        Cmd::CriuWaiter { command } => Ok(crate::supervisor::criu::waiter(&command)),
    };
    match result {
        Ok(code) => code,
        // The CLI's edge: the only place an error becomes an exit code (`ErrKind::code`).
        Err(f) => {
            // Messages quote names and words from directories, logs and jobs: escaped.
            eprintln!("ckpt: error: {}", crate::store::escape_lines(&f.msg));
            f.code()
        }
    }
}
