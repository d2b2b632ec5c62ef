//! The library's error type. Every message names what failed, on which path, and a hint
//! where there is one.

use std::io;
use std::path::PathBuf;

use crate::store::manifest::ManifestError;

/// Result alias of the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the store and the client can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation failed.
    #[error("cannot {action} {path}: {source}{hint}", hint = io_hint(source))]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A checkpoint did not verify.
    #[error("checkpoint {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: Invalid },
    /// State could not be encoded or decoded.
    #[error("cannot {action} state in {path}: {detail}")]
    Codec {
        action: &'static str,
        path: PathBuf,
        detail: String,
    },
    /// A file name given by the job is not allowed.
    #[error("{0}")]
    Name(ManifestError),
    /// Another process holds the directory.
    #[error("{dir} is in use by another ckpt supervisor ({holder}); hint: stop it with `ckpt stop --dir {dir}` (or wait for it), or choose another --dir", dir = dir.display())]
    Locked { dir: PathBuf, holder: String },
    /// A value from the environment is malformed.
    #[error("environment variable {name}={value:?} is invalid: {why}")]
    Env {
        name: &'static str,
        value: String,
        why: String,
    },
    /// The job asked for something impossible.
    #[error("{0}")]
    Usage(String),
}

/// Why a checkpoint failed verification.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("it is not a directory (a symlink or a file)")]
    NotADirectory,
    #[error("MANIFEST.ckpt is missing (an incomplete or foreign directory)")]
    NoManifest,
    #[error("{0}")]
    Manifest(ManifestError),
    #[error("directory name says sequence {dir} but the manifest says {manifest}")]
    SeqMismatch { dir: u64, manifest: u64 },
    #[error("file {0:?} is missing")]
    Missing(String),
    #[error("file {0:?} is a symlink or not a regular file; ckpt never follows links")]
    NotRegular(String),
    #[error("file {name:?} is {actual} bytes, the manifest says {expected}")]
    Size {
        name: String,
        expected: u64,
        actual: u64,
    },
    #[error("file {name:?} has checksum {actual:08x}, the manifest says {expected:08x} (the bytes changed)")]
    Checksum {
        name: String,
        expected: u32,
        actual: u32,
    },
    #[error("cannot read it: {0}")]
    Unreadable(String),
}

impl Invalid {
    /// A short slug for file names (quarantine) and JSON.
    pub fn slug(&self) -> &'static str {
        match self {
            Invalid::NotADirectory => "not-a-directory",
            Invalid::NoManifest => "no-manifest",
            Invalid::Manifest(_) => "bad-manifest",
            Invalid::SeqMismatch { .. } => "seq-mismatch",
            Invalid::Missing(_) => "missing-file",
            Invalid::NotRegular(_) => "not-regular",
            Invalid::Size { .. } => "size-mismatch",
            Invalid::Checksum { .. } => "checksum-mismatch",
            Invalid::Unreadable(_) => "unreadable",
        }
    }
}

fn io_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => " (the file system is full; hint: free space there or point --dir/CKPT_DIR at a larger one)",
        Some(libc::EDQUOT) => " (disk quota exceeded; hint: free space or raise the quota)",
        Some(libc::EROFS) => " (the file system is read-only; hint: point --dir/CKPT_DIR at a writable directory)",
        Some(libc::EACCES) | Some(libc::EPERM) => " (permission denied; hint: check the owner and mode of the directory)",
        _ => "",
    }
}

impl Error {
    /// Wraps an I/O error with the action and the path.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Error {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Adds `.ctx(action, path)` to I/O results.
pub(crate) trait IoContext<T> {
    fn ctx(self, action: &'static str, path: &std::path::Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, action: &'static str, path: &std::path::Path) -> Result<T> {
        self.map_err(|e| Error::io(action, path, e))
    }
}
