//! One supervisor per directory: an exclusive `flock` on `DIR/.ckpt/lock`, released by the
//! kernel when the holder dies, so there is never a stale lock to clean up. The file's text
//! names the holder for the refusal message of a second supervisor.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, IoContext, Result};
use crate::store::Store;

/// Held for the supervisor's lifetime.
pub struct DirLock {
    _lock: Flock<File>,
}

impl DirLock {
    /// The lock's file descriptor: the job's child closes it first thing after the fork, so
    /// that a child dying with its supervisor never holds the lock for a moment longer.
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self._lock.as_raw_fd()
    }

    /// Takes the lock or fails at once naming the holder.
    pub fn acquire(store: &Store, command: &str) -> Result<DirLock> {
        let path = store.private().join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .ctx("open lock file", &path)?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(mut lock) => {
                let host = nix::unistd::gethostname()
                    .map(|h| h.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let text = format!(
                    "pid {} on {} since {} running {}\n",
                    std::process::id(),
                    host,
                    humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
                    command
                );
                let _ = lock.set_len(0);
                let _ = lock.rewind();
                let _ = lock.write_all(text.as_bytes());
                Ok(DirLock { _lock: lock })
            }
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut holder = String::new();
                let _ = (&mut file).take(4096).read_to_string(&mut holder);
                let holder = holder.trim();
                Err(Error::Locked {
                    dir: store.dir().to_path_buf(),
                    holder: if holder.is_empty() {
                        "holder unknown".into()
                    } else {
                        holder.to_string()
                    },
                })
            }
            Err((_, e)) => Err(Error::io("lock", &path, e.into())),
        }
    }
}
