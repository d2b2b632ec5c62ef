//! ckpt's exit codes and the one place where an error becomes one.
//!
//! Everything that can fail in the binary returns a [`Fatal`]: a message and an [`ErrKind`]
//! saying *what kind* of failure it is. Only [`ErrKind::code`] turns a kind into a number, and
//! only the CLI's edge (`cli::main`) calls it: call sites never pick exit codes. Outcomes of a
//! run that are not errors (finished, stopped, requeued, given up on) are the constants in
//! [`codes`], returned as `Ok(code)`. [`codes::TABLE`] documents all of them (`--help`, the
//! README; a test checks both, and that every kind's code is in the table).

use crate::error::Error;

/// ckpt's exit codes: one table, documented in the README.
pub mod codes {
    /// The job finished (exit 0), now or in an earlier run.
    pub const FINISHED: i32 = 0;
    /// Bad command line.
    pub const USAGE: i32 = 64;
    /// Checkpoints exist but none verifies (restore refused), or `ckpt verify` found bad ones.
    pub const DATA: i32 = 65;
    /// Internal error (a bug: please report it).
    pub const SOFTWARE: i32 = 70;
    /// The checkpoint directory cannot be created, locked or written.
    pub const CANT_CREATE: i32 = 73;
    /// An I/O error while saving or reading.
    pub const IO: i32 = 74;
    /// Stopped (signal, preemption, time limit) after a checkpoint: run me again.
    pub const TEMPFAIL: i32 = 75;
    /// `ckpt status/checkpoint/stop`: no supervisor runs on that directory.
    pub const NOT_RUNNING: i32 = 69;
    /// Stopped, and the job made no progress since its launch in more than
    /// `--max-stops-without-progress` stops in a row: not requeued or run again (it would
    /// only loop).
    pub const NO_PROGRESS: i32 = 76;
    /// `ckpt checkpoint`: the job has not announced a client, so it cannot be asked.
    pub const NO_CLIENT: i32 = 78;
    /// Stopped after a checkpoint and requeued through Slurm (`scontrol requeue`): nothing
    /// left to do, Slurm runs the batch script again (docs/slurm.md).
    pub const REQUEUED: i32 = 79;
    /// Stopped after a checkpoint, but with `--remote-required` the stop's final checkpoint
    /// did not reach the remote before ckpt had to exit.
    pub const REMOTE_MISSING: i32 = 77;
    /// The command exists but cannot be executed.
    pub const CANNOT_EXECUTE: i32 = 126;
    /// The command was not found.
    pub const NOT_FOUND: i32 = 127;

    /// The one table of exit codes: `ckpt --help`, `ckpt run --help` and the README's table
    /// are all this (a test compares the README with it).
    pub const TABLE: &[(&str, &str)] = &[
        ("0", "the job finished (now, or in an earlier run on this directory)"),
        ("75", "stopped (signal, preemption, time limit) after asking for a checkpoint: **run again to resume**; `ckpt checkpoint/stop`: the supervisor could not do it now or in time (try again)"),
        ("76", "stopped, and the job made no progress since its launch in more than `--max-stops-without-progress` stops in a row: not run again or requeued (it would only loop)"),
        ("64", "usage error (bad flag or value)"),
        ("65", "checkpoints exist but none verifies (pass `--allow-fresh` to start over); `ckpt verify` found a bad one"),
        ("70", "internal error (please report it)"),
        ("73", "the checkpoint directory cannot be created, locked (another supervisor holds it) or written"),
        ("74", "I/O error"),
        ("79", "under Slurm: stopped after a checkpoint and requeued by ckpt (the batch script must not requeue again)"),
        ("77", "with `--remote-required`: stopped, but the stop's final checkpoint was not uploaded to `--remote` in time (it is still in the local directory); `ckpt save/import/upload --remote`: the checkpoint is saved locally but its upload failed"),
        ("69", "`ckpt status/checkpoint/stop`: no supervisor runs on that directory"),
        ("78", "`ckpt checkpoint`: the job has not announced a client, so it cannot be asked to checkpoint"),
        ("126 / 127", "the command cannot be executed / was not found"),
        ("other", "ckpt gave up restarting: the job's own exit code, or 128 + the signal that killed it"),
    ];

    /// The table as `--help` text.
    pub fn help() -> String {
        let mut s = String::from("EXIT CODES:\n");
        for (code, what) in TABLE {
            s.push_str(&format!(
                "  {code:<9} {}\n",
                what.replace("**", "").replace('`', "")
            ));
        }
        s.push_str("\nDocumentation: README.md, docs/design.md, docs/protocol.md");
        s
    }
}

/// What kind of failure ended the command: the one error-to-exit-code table is [`ErrKind::code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrKind {
    /// A bad flag, value, reference syntax or environment variable: the user's input.
    Usage,
    /// Checkpoints that do not verify, or a reference that names nothing in the directory.
    Data,
    /// `ckpt status/checkpoint/stop`: no supervisor runs on that directory.
    NotRunning,
    /// A bug in ckpt, or the machine refusing something ckpt needs (a thread, a clock).
    Internal,
    /// The checkpoint directory cannot be created, locked (another supervisor) or written.
    CantCreate,
    /// An I/O error while saving, reading, uploading or talking to a supervisor.
    Io,
    /// `ckpt checkpoint`: the job announced no client, so it cannot be asked.
    NoClient,
    /// The job's command exists but cannot be executed.
    CannotExecute,
    /// The job's command was not found.
    NotFound,
    /// `ckpt checkpoint/stop`: the supervisor could not do it now or in time (a save failed,
    /// a stop is under way, it is still running after `--timeout`): try again.
    TryAgain,
    /// `ckpt save/import/upload --remote`: saved locally, but the upload failed.
    UploadFailed,
}

impl ErrKind {
    /// Every kind, for the test that checks the table documents each one.
    pub const ALL: [ErrKind; 11] = [
        ErrKind::Usage,
        ErrKind::Data,
        ErrKind::NotRunning,
        ErrKind::Internal,
        ErrKind::CantCreate,
        ErrKind::Io,
        ErrKind::NoClient,
        ErrKind::CannotExecute,
        ErrKind::NotFound,
        ErrKind::TryAgain,
        ErrKind::UploadFailed,
    ];

    /// The exit code of a failure of this kind: the only place a kind becomes a number.
    pub const fn code(self) -> i32 {
        match self {
            ErrKind::Usage => codes::USAGE,
            ErrKind::Data => codes::DATA,
            ErrKind::NotRunning => codes::NOT_RUNNING,
            ErrKind::Internal => codes::SOFTWARE,
            ErrKind::CantCreate => codes::CANT_CREATE,
            ErrKind::Io => codes::IO,
            ErrKind::NoClient => codes::NO_CLIENT,
            ErrKind::CannotExecute => codes::CANNOT_EXECUTE,
            ErrKind::NotFound => codes::NOT_FOUND,
            ErrKind::TryAgain => codes::TEMPFAIL,
            ErrKind::UploadFailed => codes::REMOTE_MISSING,
        }
    }

    /// The kind of a library error: data that does not verify is `Data`, a directory held by
    /// another supervisor `CantCreate`, a bad name or value `Usage`, the rest `Io`.
    pub fn of(e: &Error) -> ErrKind {
        match e {
            Error::Invalid { .. } => ErrKind::Data,
            Error::Usage(_) | Error::Name(_) | Error::Env { .. } => ErrKind::Usage,
            Error::Locked { .. } => ErrKind::CantCreate,
            Error::Io { .. } | Error::Codec { .. } => ErrKind::Io,
        }
    }
}

/// A failure that ends the command: its kind (hence its exit code) and its message.
#[derive(Debug)]
pub struct Fatal {
    pub kind: ErrKind,
    pub msg: String,
}

impl Fatal {
    /// A failure of `kind` with `msg`.
    pub fn new(kind: ErrKind, msg: impl Into<String>) -> Fatal {
        Fatal {
            kind,
            msg: msg.into(),
        }
    }

    /// A bad flag or value.
    pub fn usage(msg: impl Into<String>) -> Fatal {
        Fatal::new(ErrKind::Usage, msg)
    }

    /// An I/O failure.
    pub fn io(msg: impl Into<String>) -> Fatal {
        Fatal::new(ErrKind::Io, msg)
    }

    /// A library error, prefixed with what ckpt was doing (`"cannot read DIR: ..."`).
    pub fn store(what: &str, e: Error) -> Fatal {
        Fatal::new(ErrKind::of(&e), format!("{what}: {e}"))
    }

    /// The same failure with more said after the message.
    pub fn with_hint(self, hint: &str) -> Fatal {
        Fatal {
            kind: self.kind,
            msg: self.msg + hint,
        }
    }

    /// The process exit code (the CLI's edge calls this, nothing else).
    pub fn code(&self) -> i32 {
        self.kind.code()
    }
}

impl From<Error> for Fatal {
    fn from(e: Error) -> Fatal {
        Fatal::new(ErrKind::of(&e), e.to_string())
    }
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_in_the_documented_table() {
        for k in ErrKind::ALL {
            let code = k.code().to_string();
            assert!(
                codes::TABLE
                    .iter()
                    .any(|(c, _)| c.split(" / ").any(|c| c == code)),
                "{k:?} exits {code}, which codes::TABLE does not document"
            );
        }
    }

    #[test]
    fn kinds_have_distinct_codes() {
        let mut seen = std::collections::HashSet::new();
        // TryAgain shares 75 with a stopped run on purpose: both mean "run it again".
        // UploadFailed shares 77 with a stop whose checkpoint did not get off the machine.
        let shared = [ErrKind::TryAgain, ErrKind::UploadFailed];
        for k in ErrKind::ALL.into_iter().filter(|k| !shared.contains(k)) {
            assert!(seen.insert(k.code()), "{k:?} shares its code");
        }
    }

    #[test]
    fn library_errors_map_by_what_went_wrong() {
        let locked = Error::Locked {
            dir: "d".into(),
            holder: "pid 1".into(),
        };
        assert_eq!(ErrKind::of(&locked), ErrKind::CantCreate);
        assert_eq!(ErrKind::of(&Error::Usage("x".into())), ErrKind::Usage);
        let io = Error::Io {
            action: "read",
            path: "p".into(),
            source: std::io::Error::other("boom"),
        };
        assert_eq!(Fatal::store("cannot list", io).code(), codes::IO);
    }
}
