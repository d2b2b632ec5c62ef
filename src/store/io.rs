//! The file-system operations of the commit path, behind a trait so that the crash-consistency
//! test can record them and rebuild every state a crash could leave (`tests/crash_states.rs`).
//! Production code uses [`RealIo`]; nothing in the store writes to disk any other way.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;

/// The operations a commit, a prune or a quarantine performs.
pub trait Io: Send + Sync {
    /// Creates a directory (owner-only), parents included.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Creates one directory (owner-only); its parent must exist. Fails if it exists.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Creates a new file (owner-only; fails if it exists) holding `data`. Not synced.
    fn write_new(&self, path: &Path, data: &[u8]) -> io::Result<()>;
    /// Creates a new, empty file (owner-only; fails if it exists, never through a symlink)
    /// and returns it for streaming writes (`Stage::create`, export). What is written through
    /// it is made durable by [`Io::fsync_file`] before any commit point. Not synced.
    fn create_file(&self, path: &Path) -> io::Result<fs::File> {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
    }
    /// Flushes a file's data and size to stable storage.
    fn fsync_file(&self, path: &Path) -> io::Result<()>;
    /// Flushes a directory's entries to stable storage.
    fn fsync_dir(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` to `to`, failing with `AlreadyExists` if `to` exists.
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a directory tree (no symlink is followed).
    fn remove_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Removes one file (a symlink itself, never its target).
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Renames `from` to `to`, atomically replacing a file at `to` (ckpt's own small files,
    /// e.g. the tag file).
    fn rename_replace(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    /// Makes `to` a new hard link to the file `from` (branching: checkpoints are immutable,
    /// so two runs can share a file's data). Fails with `CrossesDevices` across file systems.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::hard_link(from, to)
    }
    /// Creates the new file `to` sharing `from`'s data blocks (`FICLONE`: Btrfs, XFS,
    /// bcachefs...). Fails (and leaves nothing behind) where the file system cannot.
    fn reflink(&self, from: &Path, to: &Path) -> io::Result<()> {
        reflink(from, to)
    }
}

/// `ioctl(FICLONE)` into a new owner-only file; the new file is removed again on failure.
pub fn reflink(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    const FICLONE: libc::c_ulong = 0x4004_9409;
    let src = open_read(from)?;
    let dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)?;
    // SAFETY: both descriptors are open for the duration of the call.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if r != 0 {
        let e = io::Error::last_os_error();
        drop(dst);
        let _ = fs::remove_file(to);
        return Err(e);
    }
    Ok(())
}

/// Replaces `path` with a new owner-only (0600) file holding `data`, never writing through
/// a symlink planted there: an existing entry is removed first and the file is created
/// exclusively with `O_NOFOLLOW`. For ckpt's own small files (status, markers). Not synced.
pub fn write_owner_only(path: &Path, data: &[u8]) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    RealIo.write_new(path, data)
}

/// Why [`open_checked`] refused a path: it is not a regular file. Carried inside the
/// `io::Error` (kind `InvalidInput`) so that callers can tell it from other failures
/// ([`is_not_regular`]); the caller names the path.
#[derive(Debug)]
pub struct NotRegular {
    /// "a symlink", "a FIFO", "a directory", "a socket", "a device".
    pub kind: &'static str,
}

impl std::fmt::Display for NotRegular {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "it is {}, not a regular file; ckpt never follows links nor opens FIFOs, devices or sockets in a checkpoint directory (hint: remove it or replace it by a regular file)",
            self.kind
        )
    }
}

impl std::error::Error for NotRegular {}

fn not_regular(kind: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, NotRegular { kind })
}

/// Whether `e` is [`open_checked`]'s refusal of something that is not a regular file.
pub fn is_not_regular(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<NotRegular>())
}

fn kind_of(ft: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_symlink() {
        "a symlink"
    } else {
        "a device"
    }
}

/// The one safe open of every file ckpt reads or writes in a checkpoint directory: adds
/// `O_NONBLOCK|O_NOFOLLOW|O_CLOEXEC` to `opts` (so neither a FIFO nor a symlink planted in
/// its place can block or redirect the open), checks with `fstat` that it is a regular file,
/// then clears `O_NONBLOCK`. A symlink, FIFO, socket, device or directory is refused with
/// [`NotRegular`] (see [`is_not_regular`]).
pub fn open_checked(path: &Path, opts: &mut OpenOptions) -> io::Result<fs::File> {
    use std::os::unix::io::AsRawFd;
    let f = match opts
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(not_regular("a symlink")),
        // O_WRONLY|O_NONBLOCK on a FIFO without a reader.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Err(not_regular("a FIFO")),
        Err(e) if e.raw_os_error() == Some(libc::EISDIR) => return Err(not_regular("a directory")),
        Err(e) => return Err(e),
    };
    let ft = f.metadata()?.file_type();
    if !ft.is_file() {
        return Err(not_regular(kind_of(ft)));
    }
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// [`open_checked`] for reading.
pub fn open_read(path: &Path) -> io::Result<fs::File> {
    open_checked(path, OpenOptions::new().read(true))
}

/// A second descriptor for reading an open file (a new open file description: its own
/// offset and read-ahead), through `/proc/self/fd` so that no path is looked up again (a
/// file renamed or replaced since the first open is still the same file); a duplicate of the
/// descriptor where /proc is not mounted.
pub fn reopen_read(f: &fs::File) -> io::Result<fs::File> {
    use std::os::unix::io::AsRawFd;
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", f.as_raw_fd()))
    {
        Ok(g) => Ok(g),
        Err(e) if e.kind() == io::ErrorKind::NotFound => f.try_clone(),
        Err(e) => Err(e),
    }
}

/// Reads a whole small file through [`open_read`]; more than `limit` bytes is an error
/// (`InvalidData`), never a huge allocation.
pub fn read_small(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let f = open_read(path)?;
    let mut out = Vec::new();
    f.take(limit + 1).read_to_end(&mut out)?;
    if out.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("it is larger than {limit} bytes (not a file ckpt wrote)"),
        ));
    }
    Ok(out)
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealIo;

impl Io for RealIo {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::DirBuilder::new().mode(0o700).create(path)
    }
    fn write_new(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
        f.write_all(data)
    }
    fn fsync_file(&self, path: &Path) -> io::Result<()> {
        open_read(path)?.sync_all()
    }
    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(path)?
            .sync_all()
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Ok(()),
            // File systems without RENAME_NOREPLACE (NFS, some FUSE): a plain rename of a
            // directory still refuses to replace a non-empty directory, and every published
            // checkpoint holds at least its manifest.
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOSYS) => {
                if fs::symlink_metadata(to).is_ok() {
                    return Err(io::Error::from(io::ErrorKind::AlreadyExists));
                }
                fs::rename(from, to)
            }
            Err(nix::errno::Errno::ENOTEMPTY) | Err(nix::errno::Errno::EEXIST) => {
                Err(io::Error::from(io::ErrorKind::AlreadyExists))
            }
            Err(e) => Err(io::Error::from(e)),
        }
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        match fs::remove_dir_all(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        }
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_checked_refuses_all_but_regular_files_without_blocking() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::write(d.join("file"), "x").unwrap();
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink(d.join("file"), d.join("link")).unwrap();
        fs::create_dir(d.join("dir")).unwrap();
        assert_eq!(read_small(&d.join("file"), 10).unwrap(), b"x");
        for (name, kind) in [
            ("fifo", "a FIFO"),
            ("link", "a symlink"),
            ("dir", "a directory"),
        ] {
            let e = open_read(&d.join(name)).unwrap_err();
            assert!(is_not_regular(&e), "{name}: {e}");
            assert!(e.to_string().contains(kind), "{name}: {e}");
            assert!(e.to_string().contains("hint"), "{name}: {e}");
        }
        // Opening a FIFO for writing (no reader) neither blocks.
        let e = open_checked(&fifo, OpenOptions::new().append(true)).unwrap_err();
        assert!(is_not_regular(&e), "{e}");
        // The descriptor of a regular file is blocking again.
        use std::os::unix::io::AsRawFd;
        let f = open_read(&d.join("file")).unwrap();
        let fl = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(fl & libc::O_NONBLOCK, 0);
        assert!(read_small(&d.join("file"), 0).is_err(), "limit");
    }

    #[test]
    fn names_are_escaped_for_terminals_and_json() {
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(super::super::escape("a\u{1b}[2Jb\n"), "a\\x1b[2Jb\\x0a");
        assert_eq!(super::super::escape("caf\u{e9} \u{9b}"), "caf\u{e9} \\x9b");
        assert_eq!(
            super::super::display_path(std::ffi::OsStr::from_bytes(b"d-\xff/\x07")),
            "d-\\xff/\\x07"
        );
        assert_eq!(super::super::escape_lines("a\u{7}\nb"), "a\\x07\nb");
    }
}
