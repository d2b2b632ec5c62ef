//! One supervisor per directory: an exclusive `flock` on the directory `DIR/.ckpt` itself and
//! on `DIR/.ckpt/lock`, released by the kernel when the holder dies, so there is never a
//! stale lock to clean up. The lock on the directory is the one that cannot be lost: removing
//! or replacing the file `lock` while a supervisor runs would let a second one lock a new file
//! of that name, but not the directory. The file's lock keeps older ckpt versions out, and its
//! text names the holder for the refusal message of a second supervisor.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;

use nix::fcntl::{Flock, FlockArg};

use crate::error::{Error, IoContext, Result};
use crate::store::Store;

/// Held for the supervisor's lifetime.
pub struct DirLock {
    /// `None` on file systems that cannot `flock` a directory (then the file alone).
    _dir: Option<Flock<File>>,
    _lock: Flock<File>,
}

/// The refusal naming the holder (from the lock file's text, if it can be read).
fn locked(store: &Store) -> Error {
    let path = store.private().join("lock");
    let holder = crate::store::io::read_small(&path, 4096)
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    Error::Locked {
        dir: store.dir().to_path_buf(),
        holder: if holder.is_empty() {
            "holder unknown".into()
        } else {
            crate::store::escape(&holder)
        },
    }
}

impl DirLock {
    /// The locks' file descriptors: the job's child closes them first thing after the fork,
    /// so that a child dying with its supervisor never holds the lock for a moment longer.
    pub fn raw_fds(&self) -> [Option<std::os::fd::RawFd>; 2] {
        use std::os::fd::AsRawFd;
        [
            Some(self._lock.as_raw_fd()),
            self._dir.as_ref().map(|d| d.as_raw_fd()),
        ]
    }

    /// Takes the lock or fails at once naming the holder.
    pub fn acquire(store: &Store, command: &str) -> Result<DirLock> {
        store.check_private()?;
        let private = store.private();
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&private)
            .ctx("open", &private)?;
        let dir = match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(l) => Some(l),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => return Err(locked(store)),
            // NFS and some FUSE file systems: no flock on a directory.
            Err(_) => None,
        };
        let path = private.join("lock");
        let file = crate::store::io::open_checked(
            &path,
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600),
        )
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
                Ok(DirLock {
                    _dir: dir,
                    _lock: lock,
                })
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
                        crate::store::escape(holder)
                    },
                })
            }
            Err((_, e)) => Err(Error::io("lock", &path, e.into())),
        }
    }
}
