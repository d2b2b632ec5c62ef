//! The on-disk format, shared by every writer and reader. Specified in `docs/protocol.md`;
//! the crash analysis of each step is in `docs/design.md`.
//!
//! ```text
//! DIR/                         created 0700
//!   ckpt-000000000042/         a published checkpoint: the job's files + MANIFEST.ckpt
//!   quarantine/                checkpoints that failed verification, moved aside, never deleted
//!   rolled-back/               checkpoints newer than a rollback target, set aside, never deleted
//!   .ckpt/tags.json            checkpoint names (tags); tagged checkpoints are never pruned
//!   .ckpt/lock                 flock held by the supervisor; its text names the holder
//!   .ckpt/staging/<pid>.<n>/   a save in progress (invisible; cleaned when its writer is dead)
//!   .ckpt/trash/               checkpoints being pruned (invisible; cleaned on next start)
//!   .ckpt/events.jsonl         the supervisor's event log
//!   .ckpt/finished             present once the job has exited 0
//! ```

pub mod commit;
pub mod io;
pub mod manifest;
pub mod scan;
pub mod tags;
pub mod transfer;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, IoContext, Result};
pub use commit::{Stage, StageWriter};
pub use io::{Io, RealIo};
pub use manifest::{Algo, FileEntry, Manifest, MANIFEST_NAME};
pub use scan::{check_path, Bad, Check, Found};

/// Prefix of published checkpoint directories.
pub const PREFIX: &str = "ckpt-";
/// ckpt's private sub-directory.
pub const PRIVATE: &str = ".ckpt";
/// Where corrupt checkpoints are moved.
pub const QUARANTINE: &str = "quarantine";
/// Where `ckpt rollback` sets newer checkpoints aside (never deleted).
pub const ROLLED_BACK: &str = "rolled-back";

/// A checkpoint directory.
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    io: Arc<dyn Io>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

/// Parses `ckpt-<digits>` (and `ckpt-<digits>.<anything>` when `suffix_ok`).
pub fn parse_seq(name: &str, suffix_ok: bool) -> Option<u64> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits = if suffix_ok {
        rest.split('.').next()?
    } else {
        rest
    };
    if digits.is_empty() || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

impl Store {
    /// A store on the real file system. The directory is made absolute but not created.
    pub fn new(dir: impl AsRef<Path>) -> Store {
        Store::with_io(dir, Arc::new(RealIo))
    }

    /// A store whose writes go through `io` (the crash test's recorder).
    pub fn with_io(dir: impl AsRef<Path>, io: Arc<dyn Io>) -> Store {
        let dir = dir.as_ref();
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        Store { dir, io }
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn io(&self) -> &dyn Io {
        &*self.io
    }

    /// Creates the directory (0700) and ckpt's private sub-directories, and makes their
    /// names durable (each new directory's parent is fsynced: without that, a power loss could
    /// take a freshly created directory away together with the checkpoints committed in it).
    /// Refuses a symlink or a non-directory planted where ckpt's own directories belong.
    pub fn create(&self) -> Result<()> {
        // The directories about to be created, and the first existing ancestor.
        let mut missing = Vec::new();
        let mut p = self.dir.as_path();
        loop {
            match fs::symlink_metadata(p) {
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    missing.push(p.to_path_buf());
                    match p.parent() {
                        Some(q) if !q.as_os_str().is_empty() => p = q,
                        _ => break,
                    }
                }
                Err(e) => return Err(Error::io("inspect", p, e)),
            }
        }
        self.io
            .create_dir_all(&self.dir)
            .ctx("create directory", &self.dir)?;
        // DIR itself may be a symlink the user chose; everything inside must be real.
        let meta = fs::metadata(&self.dir).ctx("inspect", &self.dir)?;
        if !meta.is_dir() {
            return Err(Error::Usage(format!(
                "{} is not a directory; hint: --dir must name a directory",
                self.dir.display()
            )));
        }
        let mut to_sync: Vec<PathBuf> = Vec::new();
        if let Some(top) = missing.last() {
            if let Some(parent) = top.parent().filter(|q| !q.as_os_str().is_empty()) {
                // Not ours: a file system that cannot fsync it is no reason to fail.
                let _ = self.io.fsync_dir(parent);
            }
            // Innermost last: each parent of a new directory.
            to_sync.extend(missing.iter().rev().skip(1).cloned());
            to_sync.push(self.dir.clone());
        }
        for d in [
            self.private(),
            self.private().join("staging"),
            self.private().join("trash"),
        ] {
            if self.real_dir(&d)? {
                let parent = d.parent().map(Path::to_path_buf).unwrap_or_default();
                if !to_sync.contains(&parent) {
                    to_sync.push(parent);
                }
            }
        }
        if fs::symlink_metadata(self.dir.join(QUARANTINE)).is_ok() {
            self.real_dir(&self.dir.join(QUARANTINE))?;
        }
        for d in &to_sync {
            self.io.fsync_dir(d).ctx("fsync", d)?;
        }
        Ok(())
    }

    /// Makes sure `path` is a real directory (not a symlink), creating it (0700) if missing.
    /// Returns whether it was created (its parent then needs an fsync).
    pub(crate) fn real_dir(&self, path: &Path) -> Result<bool> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => Ok(false),
            Ok(_) => Err(Error::Usage(format!(
                "{} is a symlink or not a directory; ckpt never follows links planted in the checkpoint directory; hint: remove it",
                path.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                match self.io.create_dir(path) {
                    Ok(()) => Ok(true),
                    // Created concurrently by another writer.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        self.real_dir(path).map(|_| false)
                    }
                    Err(e) => Err(Error::io("create directory", path, e)),
                }
            }
            Err(e) => Err(Error::io("inspect", path, e)),
        }
    }

    /// `DIR/.ckpt`.
    pub fn private(&self) -> PathBuf {
        self.dir.join(PRIVATE)
    }

    /// Refuses a `DIR/.ckpt` that is a symlink or not a directory (a missing one is fine):
    /// every path ckpt reads, writes or deletes under it would otherwise lead elsewhere.
    pub fn check_private(&self) -> Result<()> {
        let p = self.private();
        match fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(Error::Usage(format!(
                "{} is a symlink or not a directory; ckpt never follows links planted in the checkpoint directory; hint: remove it",
                p.display()
            ))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("inspect", p, e)),
        }
    }

    /// The path of checkpoint `seq`.
    pub fn path_of(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{PREFIX}{seq:012}"))
    }

    /// Published checkpoints (by name only, not verified), ascending by sequence number.
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io("list", &self.dir, e)),
        };
        for ent in rd {
            let ent = ent.ctx("list", &self.dir)?;
            if let Some(seq) = ent.file_name().to_str().and_then(|n| parse_seq(n, false)) {
                out.push((seq, ent.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The sequence number a new checkpoint should take: above every published, quarantined
    /// and rolled-back one, so numbers are never reused. A published checkpoint numbered
    /// `u64::MAX` cannot be followed: refused with an error naming it (never wrapped to 0,
    /// which would never be restored). A set-aside one numbered `u64::MAX` is skipped (no
    /// checkpoint can take its number again anyway), so it cannot block saves.
    pub fn next_seq(&self) -> Result<u64> {
        let newest = self.list()?.last().cloned();
        let mut max = newest.as_ref().map(|(s, _)| *s).unwrap_or(0);
        if let Some((u64::MAX, path)) = &newest {
            return Err(Error::Usage(format!(
                "cannot number a new checkpoint: {} already carries the largest possible number ({}); hint: `ckpt export` it and `ckpt import` it into a fresh directory, or move it out of {}",
                path.display(),
                u64::MAX,
                self.dir.display()
            )));
        }
        for aside in [QUARANTINE, ROLLED_BACK] {
            if let Ok(rd) = fs::read_dir(self.dir.join(aside)) {
                for ent in rd.flatten() {
                    if let Some(s) = ent.file_name().to_str().and_then(|n| parse_seq(n, true)) {
                        if s < u64::MAX {
                            max = max.max(s);
                        }
                    }
                }
            }
        }
        Ok(max + 1)
    }

    /// Removes staging directories of dead writers and pending trash. Returns how many
    /// entries went. Safe while other writers are saving: a live writer's staging stays.
    pub fn clean_leftovers(&self) -> Result<usize> {
        self.check_private()?;
        let mut n = 0;
        // A multi-rank launch's rounds are in `<epoch>`, whose text after the last dot is the
        // supervisor's pid, or 0 without one (docs/multi-rank.md, "Files of a launch").
        for sub in ["staging", "trash", "rounds"] {
            let d = self.private().join(sub);
            // Never list (and delete in) a symlink planted in place of our own directory.
            if !fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir()) {
                continue;
            }
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for ent in rd.flatten() {
                let name = ent.file_name();
                let pid = name
                    .to_str()
                    .and_then(|s| s.split('.').next_back())
                    .and_then(|p| p.parse::<i32>().ok());
                let alive = pid.is_some_and(pid_alive);
                if !alive {
                    self.io
                        .remove_dir_all(&ent.path())
                        .ctx("remove leftover", &ent.path())?;
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// `s` safe to print on a terminal: control characters (ESC, CR, BEL, newlines...) shown as
/// `\x1b`-style escapes. For names, messages and metadata from checkpoint directories, event
/// logs and jobs, which may hold terminal escape sequences.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        push_escaped(&mut out, c);
    }
    out
}

/// [`escape`] for text of several lines: each line escaped, the newlines kept.
pub fn escape_lines(s: &str) -> String {
    s.split('\n').map(escape).collect::<Vec<_>>().join("\n")
}

fn push_escaped(out: &mut String, c: char) {
    use std::fmt::Write;
    if c.is_control() {
        let n = c as u32;
        if n <= 0xff {
            let _ = write!(out, "\\x{n:02x}");
        } else {
            let _ = write!(out, "\\u{{{n:x}}}");
        }
    } else {
        out.push(c);
    }
}

/// A path (or any OS string) for people and for JSON: bytes that are not UTF-8 shown as
/// `\xNN`, control characters escaped as in [`escape`]. Never panics, never loses the
/// information that a byte was not UTF-8 (unlike U+FFFD).
pub fn display_path(p: impl AsRef<std::ffi::OsStr>) -> String {
    use std::fmt::Write;
    use std::os::unix::ffi::OsStrExt;
    let bytes = p.as_ref().as_bytes();
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            push_escaped(&mut out, c);
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// Whether a process with this pid exists (EPERM counts as alive).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// A small unique token for temporary names.
pub(crate) fn token() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}.{}", t, n, std::process::id())
}
