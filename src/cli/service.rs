//! `ckpt service`: a systemd unit that runs a job under `ckpt run`, so that a rebooted VM
//! (or a replacement that mounts the same checkpoint disk) resumes the job from its newest
//! checkpoint. The exit-code contract and each setting are explained in `docs/cloud.md`.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;

use super::{parse_duration, Cli, Cmd, DirArg};
use crate::exit::ErrKind;
use crate::supervisor::Fatal;

/// Print (or install) a systemd unit that runs CMD under `ckpt run`.
///
/// Usage: `ckpt service --name train --dir /mnt/ckpt [-- RUN-OPTIONS] -- CMD...`. Options of
/// `ckpt run` go before a second `--` (e.g. `-- --every 5m -- python train.py`); unless they
/// name `--preemption-notice`, the unit watches with `auto`. The unit restarts ckpt when it
/// exits 75 (stopped after a checkpoint) or fails, never after 0 (the job finished) or a
/// code a restart cannot fix.
#[derive(Debug, clap::Args)]
pub struct ServiceArgs {
    /// Unit name (`train` gives `train.service`).
    #[arg(long, value_name = "NAME")]
    pub name: String,
    #[command(flatten)]
    pub dir: DirArg,
    /// Run the job as this user (`User=`); default root.
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// The job's working directory (default: the current directory).
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// An environment variable for the job, VAR=VALUE (repeatable).
    #[arg(long = "env", value_name = "VAR=VALUE")]
    pub env: Vec<String>,
    /// How long systemd waits before starting ckpt again (`RestartSec=`).
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "DURATION")]
    pub restart_sec: Duration,
    /// Write the unit to --unit-dir (then `systemctl daemon-reload` and `enable` it when
    /// that is /etc/systemd/system and systemd runs) instead of printing it.
    #[arg(long)]
    pub install: bool,
    /// Where --install writes the unit.
    #[arg(long, default_value = "/etc/systemd/system", value_name = "DIR")]
    pub unit_dir: PathBuf,
    /// `[RUN-OPTIONS --] CMD...`
    #[arg(last = true, required = true, value_name = "CMD")]
    pub args: Vec<OsString>,
}

/// Quotes one word of an `ExecStart=` command line (systemd.service(5), "Command lines"):
/// `%` and `$` are doubled so neither specifiers nor variables are expanded.
pub fn quote_exec_word(w: &str) -> String {
    quote(&w.replace('$', "$$"))
}

/// Quotes a word for `Environment=` (specifiers are expanded there, variables are not).
fn quote(w: &str) -> String {
    let w = w.replace('%', "%%");
    let plain = !w.is_empty()
        && w.chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !"\"'\\;".contains(c));
    if plain {
        return w;
    }
    let mut out = String::from("\"");
    for c in w.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn text(s: &OsString) -> Result<String, Fatal> {
    s.to_str().map(str::to_string).ok_or_else(|| {
        Fatal::usage(format!(
            "{s:?} is not valid UTF-8, which a unit file cannot hold"
        ))
    })
}

fn absolute(p: &Path) -> Result<PathBuf, Fatal> {
    std::path::absolute(p)
        .map_err(|e| Fatal::usage(format!("cannot make {} absolute: {e}", p.display())))
}

/// The unit's text.
pub fn unit(a: &ServiceArgs) -> Result<String, Fatal> {
    if a.name.is_empty()
        || !a
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(Fatal::usage(format!(
            "--name {:?}: use letters, digits and - _ . @ only",
            a.name
        )));
    }
    let dir = absolute(&a.dir.dir)?;
    let workdir = match &a.workdir {
        Some(w) => absolute(w)?,
        None => std::env::current_dir()
            .map_err(|e| Fatal::usage(format!("cannot read the current directory: {e}")))?,
    };
    let ckpt = std::env::current_exe()
        .map_err(|e| Fatal::usage(format!("cannot find the ckpt binary: {e}")))?;
    let args: Vec<String> = a.args.iter().map(text).collect::<Result<_, _>>()?;
    let (run_opts, cmd) = match args.first() {
        Some(f) if f.starts_with('-') => match args.iter().position(|x| x == "--") {
            Some(i) => (args[..i].to_vec(), args[i + 1..].to_vec()),
            None => {
                return Err(Fatal::usage(
                    "ckpt run options need a `--` before the command: ckpt service --name N -- --every 5m -- CMD",
                ))
            }
        },
        _ => (Vec::new(), args.clone()),
    };
    if cmd.is_empty() {
        return Err(Fatal::usage("no command given after `--`"));
    }
    let mut argv = vec![
        ckpt.display().to_string(),
        "run".into(),
        "--dir".into(),
        dir.display().to_string(),
    ];
    if !run_opts
        .iter()
        .any(|o| o == "--preemption-notice" || o.starts_with("--preemption-notice="))
    {
        argv.extend(["--preemption-notice".into(), "auto".into()]);
    }
    argv.extend(run_opts);
    argv.push("--".into());
    argv.extend(cmd);
    // The same parser as `ckpt run`: a mistake shows now, not at boot.
    let parsed = Cli::try_parse_from(&argv).map_err(|e| {
        Fatal::usage(format!(
            "the generated `ckpt run` command is not valid: {e}"
        ))
    })?;
    let Cmd::Run(run) = parsed.command else {
        unreachable!("argv starts with `run`")
    };
    // With --remote, ckpt also waits for the stop's final upload before it exits.
    let upload = if run.remote.as_deref().is_some_and(|u| !u.is_empty()) {
        run.remote_stop_timeout
    } else {
        Duration::ZERO
    };
    let stop_timeout = run.grace + run.kill_after + upload + Duration::from_secs(10);
    let mut envs = String::new();
    for e in &a.env {
        if !e.contains('=') || e.starts_with('=') {
            return Err(Fatal::usage(format!("--env {e:?}: expected VAR=VALUE")));
        }
        envs.push_str(&format!("Environment={}\n", quote(e)));
    }
    let exec: Vec<String> = argv.iter().map(|w| quote_exec_word(w)).collect();
    if let Some(u) = &a.user {
        // Interpolated as is into `User=`: a newline would add directives to the unit.
        if u.is_empty()
            || u.len() > 256
            || !u
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.@$".contains(c))
        {
            return Err(Fatal::usage(format!(
                "--user {:?}: a user name or uid is letters, digits and - _ . @ $ only",
                u
            )));
        }
    }
    let user = a
        .user
        .as_ref()
        .map(|u| format!("User={u}\n"))
        .unwrap_or_default();
    let q = |p: &Path| quote_exec_word(&p.display().to_string());
    Ok(format!(
        "\
# Generated by `ckpt service` (ckpt {version}). How it resumes after a reboot, and why each
# setting: docs/cloud.md (\"Resume at boot\").
[Unit]
Description=ckpt: {name} (checkpointed job)
Wants=network-online.target
After=network-online.target remote-fs.target
RequiresMountsFor={dir}
# ckpt restarts a crashing job itself (backoff, crash-loop guard); systemd restarts ckpt.
# More than 5 starts in 10 minutes: give up (the unit stays failed until started by hand).
StartLimitIntervalSec=10min
StartLimitBurst=5

[Service]
Type=exec
{user}WorkingDirectory={workdir}
{envs}ExecStart={exec}
# Exit codes of `ckpt run`:
#   0   the job finished: done, no restart.
#   75  stopped after a checkpoint (preemption notice, SIGTERM): not a failure of the unit,
#       and started again (RestartForceExitStatus) unless systemd itself stopped it (shutdown,
#       systemctl stop); after a reboot the enabled unit starts and resumes.
#   64 65 73 126 127  usage, no checkpoint verifies, directory unusable, command not
#       executable / not found: a restart cannot help.
#   other: ckpt gave up on a crash loop (the job's code) or hit an I/O error: restart.
SuccessExitStatus=75
Restart=on-failure
RestartForceExitStatus=75
RestartPreventExitStatus=64 65 73 126 127
RestartSec={restart}
# SIGTERM goes to ckpt alone: it asks the job to checkpoint, stops it, and kills what is
# left; systemd's SIGKILL to everything comes only after TimeoutStopSec.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={stop}

[Install]
WantedBy=multi-user.target
",
        version = env!("CARGO_PKG_VERSION"),
        name = a.name,
        dir = q(&dir),
        workdir = q(&workdir),
        exec = exec.join(" "),
        restart = humantime::format_duration(a.restart_sec),
        stop = stop_timeout.as_secs().max(1),
    ))
}

pub fn run(a: ServiceArgs) -> Result<i32, Fatal> {
    let unit = unit(&a)?;
    if !a.install {
        print!("{unit}");
        return Ok(0);
    }
    let path = a.unit_dir.join(format!("{}.service", a.name));
    let fail = |what: &str, e: std::io::Error| {
        Fatal::new(
            ErrKind::CantCreate,
            format!(
                "cannot {what} {}: {e}{}",
                path.display(),
                if e.kind() == std::io::ErrorKind::PermissionDenied {
                    "; hint: run as root (sudo), or print the unit and place it yourself"
                } else {
                    ""
                }
            ),
        )
    };
    let tmp = a.unit_dir.join(format!(".{}.service.tmp", a.name));
    (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(unit.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&a.unit_dir)?.sync_all()
    })()
    .map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        fail("write", e)
    })?;
    eprintln!("ckpt: wrote {}", path.display());
    let systemd_runs = Path::new("/run/systemd/system").is_dir();
    if a.unit_dir == Path::new("/etc/systemd/system") && systemd_runs {
        for args in [
            vec!["daemon-reload"],
            vec!["enable", &format!("{}.service", a.name)],
        ] {
            let st = std::process::Command::new("systemctl").args(&args).status();
            match st {
                Ok(s) if s.success() => eprintln!("ckpt: systemctl {} done", args.join(" ")),
                Ok(s) => eprintln!("ckpt: warning: systemctl {} failed ({s})", args.join(" ")),
                Err(e) => eprintln!("ckpt: warning: cannot run systemctl: {e}"),
            }
        }
        eprintln!(
            "ckpt: start it now with: systemctl start {}.service",
            a.name
        );
    } else {
        eprintln!(
            "ckpt: then: systemctl daemon-reload && systemctl enable --now {}.service{}",
            a.name,
            if systemd_runs {
                ""
            } else {
                " (systemd is not running here)"
            }
        );
    }
    Ok(0)
}
