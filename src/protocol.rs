//! The contract between the supervisor and a job, in any language. Specified in
//! `docs/protocol.md`; this module is its single source of names in Rust.

use serde::{Deserialize, Serialize};

/// Protocol version carried in `CKPT_PROTOCOL` and in every message's `v`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Absolute path of the checkpoint directory.
pub const ENV_DIR: &str = "CKPT_DIR";
/// Absolute path of the verified checkpoint to resume from; unset on a fresh start.
pub const ENV_RESTORE: &str = "CKPT_RESTORE";
/// Sequence number of `CKPT_RESTORE`.
pub const ENV_RESTORE_SEQ: &str = "CKPT_RESTORE_SEQ";
/// Step recorded in `CKPT_RESTORE`'s manifest, when it has one.
pub const ENV_RESTORE_STEP: &str = "CKPT_RESTORE_STEP";
/// How many times the supervisor has relaunched the job (0 on the first launch).
pub const ENV_RESTART_COUNT: &str = "CKPT_RESTART_COUNT";
/// Path of the supervisor's Unix datagram socket for job messages.
pub const ENV_SOCKET: &str = "CKPT_SOCKET";
/// Number of the checkpoint-request signal (10 = SIGUSR1 on Linux x86/ARM).
pub const ENV_SIGNAL: &str = "CKPT_SIGNAL";
/// Protocol version spoken by the supervisor.
pub const ENV_PROTOCOL: &str = "CKPT_PROTOCOL";
/// Pid of the supervisor.
pub const ENV_SUPERVISOR_PID: &str = "CKPT_SUPERVISOR_PID";

/// How this launch starts: [`START_FRESH`], [`START_RESUME`] or [`START_BRANCH`].
pub const ENV_START: &str = "CKPT_START";
/// How the supervisor checked the restore checkpoint ([`RestoreCheck`]): `full` or
/// `client`; set with `CKPT_RESTORE`, empty on a fresh start. Absent means `full`.
pub const ENV_RESTORE_CHECK: &str = "CKPT_RESTORE_CHECK";

/// How the supervisor checks a checkpoint before a launch restores it (`ckpt run
/// --restore-check`); each launch then uses one [`RestoreCheck`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RestoreCheckMode {
    /// `full` until the job's client has shown, by a `restore_verified` message, that it read
    /// a whole restore checkpoint through its verifying reads; `client` for this command's
    /// launches from then on, back to `full` as soon as one does not show it again.
    #[default]
    Auto,
    /// Always [`RestoreCheck::Full`].
    Full,
    /// Always [`RestoreCheck::Client`] (a CRIU image excepted).
    Client,
}

impl RestoreCheckMode {
    /// The `--restore-check` value.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreCheckMode::Auto => "auto",
            RestoreCheckMode::Full => "full",
            RestoreCheckMode::Client => "client",
        }
    }
}

/// How the supervisor checked the checkpoint a launch restores (`CKPT_RESTORE_CHECK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RestoreCheck {
    /// The supervisor read and checksummed every byte before the launch.
    #[default]
    Full,
    /// The supervisor checked the manifest and the member sizes; the client checksums every
    /// byte as it reads it, verifies the whole checkpoint before it hands the job a path
    /// into it, and reports damage with a `restore_failed` message.
    Client,
}

impl RestoreCheck {
    /// The `CKPT_RESTORE_CHECK` value.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreCheck::Full => "full",
            RestoreCheck::Client => "client",
        }
    }

    /// From the environment (`CKPT_RESTORE_CHECK`): `client` only when it says so exactly;
    /// anything else is the safe reading, `full`.
    pub fn from_env() -> RestoreCheck {
        match std::env::var(ENV_RESTORE_CHECK).as_deref() {
            Ok("client") => RestoreCheck::Client,
            _ => RestoreCheck::Full,
        }
    }
}

/// Every variable a supervisor sets for its job: a tool that starts `ckpt run` (or a test)
/// from inside a supervised job removes them first, so the inner run is not taken for a job.
pub const SUPERVISOR_ENV: [&str; 11] = [
    ENV_DIR,
    ENV_RESTORE,
    ENV_RESTORE_CHECK,
    ENV_RESTORE_SEQ,
    ENV_RESTORE_STEP,
    ENV_RESTART_COUNT,
    ENV_SOCKET,
    ENV_SIGNAL,
    ENV_PROTOCOL,
    ENV_SUPERVISOR_PID,
    ENV_START,
];
/// Nothing to restore.
pub const START_FRESH: &str = "fresh";
/// Restoring a checkpoint of this run (after a stop, crash or rollback).
pub const START_RESUME: &str = "resume";
/// Restoring a checkpoint copied from another run by `ckpt run --from` (its manifest's
/// `meta.parent` names the source): the job may apply new settings (hyperparameters).
pub const START_BRANCH: &str = "branch";

/// The `CKPT_START` value for a launch restoring `restore` (by its manifest): `branch` when
/// it carries `meta.parent`, `resume` otherwise, `fresh` without one.
pub fn start_kind(restore: Option<&crate::store::Manifest>) -> &'static str {
    match restore {
        None => START_FRESH,
        Some(m) if m.meta.get("parent").is_some_and(|p| p.is_object()) => START_BRANCH,
        Some(_) => START_RESUME,
    }
}

/// Largest datagram the supervisor reads; longer ones are refused.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// A message from a job (client) to the supervisor: one JSON object per datagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Message {
    /// Sent once at start-up, after the client installed its signal handlers: from now on,
    /// `signal` may be sent to `pid` to request a checkpoint, and SIGTERM to ask for a
    /// checkpoint followed by a clean exit.
    Hello {
        v: u32,
        pid: u32,
        signal: i32,
        client: String,
        #[serde(default)]
        rank: Option<u32>,
    },
    /// The job is alive and at this step (a heartbeat).
    Progress { v: u32, pid: u32, step: Option<u64> },
    /// A checkpoint is durable (the supervisor re-reads the directory; this is a wake-up).
    Committed {
        v: u32,
        pid: u32,
        seq: u64,
        step: Option<u64>,
        bytes: u64,
        duration_ms: u64,
        /// For an asynchronous save: how long the job was blocked (copying its state into
        /// the snapshot); `duration_ms` then also counts the background write. Absent for a
        /// save that blocked the job throughout.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        blocked_ms: Option<u64>,
    },
    /// A save failed; the job keeps running.
    SaveFailed { v: u32, pid: u32, error: String },
    /// Under `CKPT_RESTORE_CHECK=client`: the restore checkpoint `seq` failed the client's
    /// check as it was read (`error` says which member and how). The supervisor verifies it
    /// itself; if it is damaged it is set aside, the job stopped and relaunched from the
    /// next checkpoint that verifies, and the relaunch is not counted as a failure.
    RestoreFailed {
        v: u32,
        pid: u32,
        seq: u64,
        error: String,
    },
    /// The client's verifying reads (size and checksum of every byte) have covered every
    /// member of the restore checkpoint `seq` that this process restores (a rank: its own
    /// shard), so the job read it through the client only. Sent once per process, in either
    /// check mode; under `ckpt run --restore-check auto` it lets the next launches of the
    /// same command skip the supervisor's full verify.
    RestoreVerified {
        v: u32,
        pid: u32,
        seq: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rank: Option<u32>,
    },
}

impl Message {
    /// Parses a datagram, with a size limit and a clear error.
    pub fn parse(bytes: &[u8]) -> Result<Message, String> {
        if bytes.len() > MAX_MESSAGE_BYTES {
            return Err(format!(
                "message of {} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit",
                bytes.len()
            ));
        }
        let m: Message = serde_json::from_slice(bytes)
            .map_err(|e| format!("not a valid protocol message: {e}"))?;
        let v = match &m {
            Message::Hello { v, .. }
            | Message::Progress { v, .. }
            | Message::Committed { v, .. }
            | Message::SaveFailed { v, .. }
            | Message::RestoreFailed { v, .. }
            | Message::RestoreVerified { v, .. } => *v,
        };
        if v == 0 || v > PROTOCOL_VERSION {
            return Err(format!(
                "protocol version {v} is not supported (this ckpt speaks {PROTOCOL_VERSION})"
            ));
        }
        Ok(m)
    }

    /// The sender's pid as it claims it.
    pub fn pid(&self) -> u32 {
        match self {
            Message::Hello { pid, .. }
            | Message::Progress { pid, .. }
            | Message::Committed { pid, .. }
            | Message::SaveFailed { pid, .. }
            | Message::RestoreFailed { pid, .. }
            | Message::RestoreVerified { pid, .. } => *pid,
        }
    }

    /// The datagram bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("messages always serialise")
    }
}

/// Parses a signal given as a number (`10`) or a name (`USR1`, `SIGUSR1`, case-insensitive).
pub fn parse_signal(s: &str) -> Option<i32> {
    let s = s.trim();
    if let Ok(n) = s.parse::<i32>() {
        return (1..=64).contains(&n).then_some(n);
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    let full = format!("SIG{name}");
    full.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

/// A duration given in the environment: plain seconds (`7`, `2.5`) or with a unit (`500ms`,
/// `10s`, `2m`, `1h`). Negative, not finite, or past a year: `None`.
pub fn parse_duration_env(s: &str) -> Option<std::time::Duration> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    let secs = num.trim().parse::<f64>().ok()? * scale;
    (secs.is_finite() && (0.0..=366.0 * 86400.0).contains(&secs))
        .then(|| std::time::Duration::from_secs_f64(secs))
}

/// Why `sig` cannot be a checkpoint-request signal, or `None` when it can. A request signal
/// must be catchable and mean nothing else to the process: SIGUSR1, SIGUSR2, SIGHUP, SIGALRM,
/// SIGURG, SIGWINCH, SIGIO, SIGPWR, SIGVTALRM, SIGPROF, or a real-time signal
/// (SIGRTMIN..SIGRTMAX, 34..64 on Linux; 32 and 33 belong to the C library's threads).
/// Everything else (KILL and STOP cannot be caught; TERM and INT mean "stop"; CHLD, CONT and
/// the terminal stops are job control; SEGV, BUS, FPE, ILL, TRAP, SYS, ABRT, QUIT and PIPE
/// report faults) is refused, by the supervisor (`--signal`, a client's hello) and by every
/// client (`CKPT_SIGNAL`). Specified in `docs/protocol.md`.
pub fn request_signal_problem(sig: i32) -> Option<&'static str> {
    use libc::*;
    const OK: [i32; 10] = [
        SIGUSR1, SIGUSR2, SIGHUP, SIGALRM, SIGURG, SIGWINCH, SIGIO, SIGPWR, SIGVTALRM, SIGPROF,
    ];
    match sig {
        s if OK.contains(&s) || (34..=64).contains(&s) => None,
        SIGKILL | SIGSTOP => Some("cannot be caught"),
        SIGTERM | SIGINT => Some("means \"stop\" to every client"),
        SIGCHLD | SIGCONT | SIGTSTP | SIGTTIN | SIGTTOU => Some("is a job-control signal"),
        SIGSEGV | SIGBUS | SIGFPE | SIGILL | SIGTRAP | SIGSYS | SIGABRT | SIGQUIT | SIGPIPE => {
            Some("reports a fault or asks for a core dump")
        }
        32 | 33 => Some("is reserved by the C library's threads"),
        _ => Some("is not a signal"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_reject_garbage() {
        let m = Message::Committed {
            v: 1,
            pid: 5,
            seq: 3,
            step: Some(9),
            bytes: 10,
            duration_ms: 2,
            blocked_ms: None,
        };
        assert_eq!(Message::parse(&m.encode()).unwrap(), m);
        assert!(!String::from_utf8(m.encode())
            .unwrap()
            .contains("blocked_ms"));
        let a = Message::Committed {
            v: 1,
            pid: 5,
            seq: 3,
            step: None,
            bytes: 10,
            duration_ms: 2000,
            blocked_ms: Some(40),
        };
        assert_eq!(Message::parse(&a.encode()).unwrap(), a);
        let r = Message::RestoreFailed {
            v: 1,
            pid: 5,
            seq: 7,
            error: "checksum".into(),
        };
        assert_eq!(Message::parse(&r.encode()).unwrap(), r);
        assert_eq!(
            Message::parse(
                br#"{"type":"restore_failed","v":1,"pid":4242,"seq":7,"error":"checksum mismatch in \"state\""}"#
            )
            .unwrap()
            .pid(),
            4242
        );
        assert!(Message::parse(br#"{"type":"restore_failed","v":1,"pid":1,"error":"x"}"#).is_err());
        for rank in [None, Some(3)] {
            let m = Message::RestoreVerified {
                v: 1,
                pid: 9,
                seq: 4,
                rank,
            };
            assert_eq!(Message::parse(&m.encode()).unwrap(), m);
        }
        assert_eq!(
            Message::parse(br#"{"type":"restore_verified","v":1,"pid":12,"seq":3}"#).unwrap(),
            Message::RestoreVerified {
                v: 1,
                pid: 12,
                seq: 3,
                rank: None
            }
        );
        assert!(Message::parse(br#"{"type":"restore_verified","v":1,"pid":12}"#).is_err());
        // Every example message in docs/protocol.md parses, and every type has one.
        let doc = include_str!("../docs/protocol.md");
        let examples: Vec<Message> = doc
            .lines()
            .filter(|l| l.starts_with("    {\"type\":"))
            .map(|l| Message::parse(l.trim().as_bytes()).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        for t in [
            "hello",
            "progress",
            "committed",
            "save_failed",
            "restore_failed",
            "restore_verified",
        ] {
            assert!(
                examples
                    .iter()
                    .any(|m| serde_json::to_value(m).unwrap()["type"] == t),
                "docs/protocol.md has no example of {t}"
            );
        }
        assert!(Message::parse(br#"{"type":"restore_verified","v":1,"pid":12,"seq":-1}"#).is_err());
        assert!(Message::parse(b"{").is_err());
        assert!(
            Message::parse(br#"{"type":"hello","v":2,"pid":1,"signal":10,"client":"x"}"#).is_err()
        );
        assert!(Message::parse(br#"{"type":"nope","v":1}"#).is_err());
        assert!(Message::parse(&vec![b' '; MAX_MESSAGE_BYTES + 1]).is_err());
    }

    #[test]
    fn signals_by_name_and_number() {
        assert_eq!(parse_signal("USR1"), Some(libc::SIGUSR1));
        assert_eq!(parse_signal("sigusr2"), Some(libc::SIGUSR2));
        assert_eq!(parse_signal("15"), Some(15));
        assert_eq!(parse_signal("BOGUS"), None);
        assert_eq!(parse_signal("0"), None);
    }

    #[test]
    fn env_durations() {
        use std::time::Duration;
        assert_eq!(parse_duration_env("7"), Some(Duration::from_secs(7)));
        assert_eq!(parse_duration_env("2.5"), Some(Duration::from_millis(2500)));
        assert_eq!(
            parse_duration_env("500ms"),
            Some(Duration::from_millis(500))
        );
        assert_eq!(parse_duration_env("2m"), Some(Duration::from_secs(120)));
        for bad in ["", "x", "-1", "1e400", "5 parsecs", "NaN"] {
            assert_eq!(parse_duration_env(bad), None, "{bad}");
        }
    }

    #[test]
    fn request_signals() {
        for ok in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGHUP, 34, 40, 64] {
            assert_eq!(request_signal_problem(ok), None, "{ok}");
        }
        for bad in [0, -1, 9, 19, 15, 2, 17, 11, 6, 32, 33, 65, 999] {
            assert!(request_signal_problem(bad).is_some(), "{bad}");
        }
    }
}
