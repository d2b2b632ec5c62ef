//! The one durable publish path. Steps (crash analysis of each in `docs/commit-protocol.md`):
//!
//! 1. `mkdir DIR/.ckpt/staging/<token>.<pid>` (invisible to readers).
//! 2. The writer puts its files there; sums are computed inline or by reading back.
//! 3. `fsync` every file; write `MANIFEST.ckpt` (its own checksum in the trailer), `fsync` it;
//!    `fsync` every sub-directory and the staging directory.
//! 4. `rename(staging, DIR/ckpt-<seq>)` with RENAME_NOREPLACE: the commit point. A concurrent
//!    writer that took `seq` first makes this fail; the manifest is rewritten with the next
//!    number and the rename retried.
//! 5. `fsync(DIR)` and `fsync(DIR/.ckpt/staging)`: the new name is durable. Only now does
//!    `commit` return, and only now may anyone be told.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::manifest::{check_name, Algo, FileEntry, Manifest, MANIFEST_NAME};
use super::{token, Store};
use crate::error::{Error, IoContext, Result};

/// A checkpoint being written. Dropped without [`Stage::commit`], it removes itself.
pub struct Stage {
    store: Store,
    path: PathBuf,
    algo: Algo,
    known: Vec<FileEntry>,
    done: bool,
    /// The manifest's `world_size` (a multi-rank checkpoint brought back whole, e.g. from a
    /// remote): [`Stage::set_world_size`].
    world_size: Option<u32>,
}

impl Stage {
    /// Records the checkpoint as one of a multi-rank job of `n` ranks (its files are the
    /// `rank-NNNNN/` shards); checked when the manifest is published.
    pub fn set_world_size(&mut self, n: Option<u32>) {
        self.world_size = n;
    }

    /// Starts a new staging directory in `store`.
    pub fn new(store: &Store, algo: Algo) -> Result<Stage> {
        let staging = store.private().join("staging");
        let path = staging.join(token());
        // Not recursive: a checkpoint directory that vanished (or was replaced by a symlink)
        // under a running job must make the save fail, not be silently re-created.
        match fs::symlink_metadata(&staging) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::Usage(format!(
                    "{} is not a directory (a symlink?); ckpt never follows links planted in the checkpoint directory; hint: remove it",
                    staging.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::Usage(format!(
                    "cannot save: the checkpoint directory {} vanished ({} is missing); hint: do not remove it while a job runs",
                    store.dir().display(),
                    staging.display()
                )))
            }
            Err(e) => return Err(Error::io("inspect", staging, e)),
        }
        store
            .io()
            .create_dir(&path)
            .ctx("create staging directory", &path)?;
        Ok(Stage {
            store: store.clone(),
            path,
            algo,
            known: Vec::new(),
            world_size: None,
            done: false,
        })
    }

    /// The staging directory: a job may write its files here directly.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn target(&self, name: &str) -> Result<PathBuf> {
        check_name(name).map_err(Error::Name)?;
        let p = self.path.join(name);
        if let Some(parent) = p.parent() {
            if parent != self.path {
                self.store
                    .io()
                    .create_dir_all(parent)
                    .ctx("create directory", parent)?;
            }
        }
        Ok(p)
    }

    /// Writes a whole file, computing its checksum inline.
    pub fn write_file(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let p = self.target(name)?;
        self.store.io().write_new(&p, data).ctx("write", &p)?;
        self.known.push(FileEntry {
            name: name.to_string(),
            size: data.len() as u64,
            sum: self.algo.checksum(data),
        });
        Ok(())
    }

    /// Opens a new file for streaming writes with the checksum computed inline. Call
    /// [`StageWriter::finish`] when done.
    pub fn create(&mut self, name: &str) -> Result<StageWriter<'_>> {
        let p = self.target(name)?;
        let file = self.store.io().create_file(&p).ctx("create", &p)?;
        Ok(StageWriter {
            hasher: self.algo.hasher(),
            size: 0,
            behind: 0,
            direct: Direct::Untried,
            direct_ok: false,
            file,
            path: p,
            name: name.to_string(),
            stage: self,
        })
    }

    /// Copies an existing file into the checkpoint under `name`: a reflink (`FICLONE`: no
    /// data copied; checkpoints are immutable) where the file system allows it, its checksum
    /// then computed by reading the clone; else a copy through the bulk path
    /// ([`Stage::copy_bytes`]). Returns the size.
    pub fn copy_from(&mut self, name: &str, src: &Path) -> Result<u64> {
        let p = self.target(name)?;
        if self.store.io().reflink(src, &p).is_ok() {
            let (size, sum) = checksum_file(&p, self.algo)?;
            self.known.push(FileEntry {
                name: name.to_string(),
                size,
                sum,
            });
            return Ok(size);
        }
        self.copy_bytes(name, src)
    }

    /// Copies the bytes of `src` into the new file `name` (never a reflink): the source is
    /// read in page-aligned pieces on a helper thread (past the page cache when it is not
    /// cached), each piece written by [`StageWriter::write_bulk`] (`O_DIRECT`, checksum
    /// overlapped) while the next is read (`crate::pod::copy_into`). Returns the size.
    pub fn copy_bytes(&mut self, name: &str, src: &Path) -> Result<u64> {
        let input = super::io::open_read(src).ctx("open", src)?;
        let mut w = self.create(name)?;
        match crate::pod::copy_into(&input, &mut w) {
            Ok(_) => w.finish(),
            Err(crate::pod::CopyError::Read(e)) => Err(Error::io("read", src, e)),
            Err(crate::pod::CopyError::Write(e)) => Err(Error::io("write", w.path.clone(), e)),
        }
    }

    /// Adds the file `src`, known to hold `expected` (it was just verified), under `name`:
    /// with `share`, as a hard link or else a reflink (no data copied; checkpoints are
    /// immutable, so sharing is safe), else (or when the file system cannot) as a copy whose
    /// size and checksum are compared with `expected` while it is written. A hard link is
    /// made only to a file this process's user owns and nobody else may write: a link to
    /// another user's file would let that user rewrite the new checkpoint (a reflink is a
    /// file of our own, so it stays allowed).
    pub fn add_verified(
        &mut self,
        name: &str,
        src: &Path,
        expected: &FileEntry,
        share: bool,
    ) -> Result<Shared> {
        if share {
            let p = self.target(name)?;
            let mut how = None;
            if ours_alone(src) && self.store.io().hard_link(src, &p).is_ok() {
                how = Some(Shared::Linked);
            } else if self.store.io().reflink(src, &p).is_ok() {
                how = Some(Shared::Reflinked);
            }
            if let Some(how) = how {
                self.known.push(FileEntry {
                    name: name.to_string(),
                    ..expected.clone()
                });
                return Ok(how);
            }
        }
        let size = self.copy_bytes(name, src)?;
        let sum = self.known.last().map(|e| e.sum).unwrap_or_default();
        let reason = if size != expected.size {
            Some(crate::error::Invalid::Size {
                name: expected.name.clone(),
                expected: expected.size,
                actual: size,
            })
        } else if sum != expected.sum {
            Some(crate::error::Invalid::Checksum {
                name: expected.name.clone(),
                expected: expected.sum,
                actual: sum,
            })
        } else {
            None
        };
        match reason {
            Some(reason) => Err(Error::Invalid {
                path: src.to_path_buf(),
                reason,
            }),
            None => Ok(Shared::Copied),
        }
    }

    /// Makes the checkpoint durable and visible. Returns its manifest.
    pub fn commit(
        self,
        step: Option<u64>,
        writer: &str,
        meta: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Manifest> {
        self.commit_at_least(0, step, writer, meta)
    }

    /// [`Stage::commit`], numbered at least `min_seq` (a remote restore keeps the remote
    /// checkpoint's number, so local and remote numbers stay one sequence).
    pub fn commit_at_least(
        mut self,
        min_seq: u64,
        step: Option<u64>,
        writer: &str,
        meta: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Manifest> {
        let io = self.store.io();
        // Every regular file under the stage, with its sum (known or read back).
        let mut files = Vec::new();
        let mut dirs = Vec::new();
        walk(&self.path, &self.path, &mut files, &mut dirs)?;
        let mut entries = Vec::with_capacity(files.len());
        for (name, path) in files {
            check_name(&name).map_err(Error::Name)?;
            let entry = match self.known.iter().find(|e| e.name == name) {
                Some(e) => {
                    io.fsync_file(&path).ctx("fsync", &path)?;
                    e.clone()
                }
                None => {
                    // The file's own data goes to disk while it is read back for its sum
                    // (from the page cache, where the job just wrote it): the fsync and the
                    // checksum overlap instead of adding up.
                    let (sum, synced) = std::thread::scope(|s| {
                        let sync = s.spawn(|| io.fsync_file(&path));
                        let sum = checksum_file(&path, self.algo);
                        (sum, sync.join().expect("an fsync thread panicked"))
                    });
                    let (size, sum) = sum?;
                    synced.ctx("fsync", &path)?;
                    FileEntry { name, size, sum }
                }
            };
            entries.push(entry);
        }
        let mut manifest = Manifest::new(0, step, writer, self.algo, entries);
        manifest.meta = meta;
        manifest.world_size = self.world_size;
        let res = publish_at_least(&self.store, &self.path, &mut manifest, &dirs, min_seq);
        // Published (renamed away) even if a later fsync failed: nothing left to remove.
        self.done = res.is_ok() || fs::symlink_metadata(&self.path).is_err();
        res.map(|()| manifest)
    }

    /// Hands the staged directory and the sums computed while writing to a multi-rank save
    /// (`crate::multi_rank`), which seals and moves it; the stage no longer removes itself.
    pub(crate) fn into_parts(mut self) -> (PathBuf, Vec<FileEntry>) {
        self.done = true;
        (self.path.clone(), std::mem::take(&mut self.known))
    }

    /// Discards the staged files.
    pub fn abort(mut self) {
        self.cleanup();
    }

    fn cleanup(&mut self) {
        if !self.done {
            self.done = true;
            let _ = self.store.io().remove_dir_all(&self.path);
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Whether the file `src` (not followed) belongs to the effective user and has no group or
/// other write permission: only then may a new checkpoint share its inode.
fn ours_alone(src: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    fs::symlink_metadata(src).is_ok_and(|m| m.uid() == me && m.mode() & 0o022 == 0)
}

/// The commit point of every publish (a [`Stage`], a multi-rank round's stage): claims the
/// next sequence number, writes and fsyncs `staged/MANIFEST.ckpt` with it, fsyncs `dirs`
/// (deepest last in the list, synced first) and `staged`, and renames `staged` to
/// `DIR/ckpt-<seq>` without replacing anything; if another writer took the number, the
/// manifest is rewritten with the next one and the rename retried. Then fsyncs both parents
/// of the rename. Every step goes through [`Store::io`](super::Io).
pub(crate) fn publish(
    store: &Store,
    staged: &Path,
    manifest: &mut Manifest,
    dirs: &[PathBuf],
) -> Result<()> {
    publish_at_least(store, staged, manifest, dirs, 0)
}

/// [`publish`], claiming a number no lower than `min_seq`.
pub(crate) fn publish_at_least(
    store: &Store,
    staged: &Path,
    manifest: &mut Manifest,
    dirs: &[PathBuf],
    min_seq: u64,
) -> Result<()> {
    let io = store.io();
    let mpath = staged.join(MANIFEST_NAME);
    for attempt in 0..1000 {
        manifest.seq = store.next_seq()?.max(min_seq);
        manifest.created_ms = super::manifest::now_ms();
        if attempt > 0 {
            io.remove_file(&mpath).ctx("remove", &mpath)?;
        }
        io.write_new(&mpath, &manifest.encode())
            .ctx("write manifest", &mpath)?;
        io.fsync_file(&mpath).ctx("fsync", &mpath)?;
        for d in dirs.iter().rev() {
            io.fsync_dir(d).ctx("fsync", d)?;
        }
        io.fsync_dir(staged).ctx("fsync", staged)?;
        let dest = store.path_of(manifest.seq);
        match io.rename_noreplace(staged, &dest) {
            Ok(()) => {
                io.fsync_dir(store.dir()).ctx("fsync", store.dir())?;
                if let Some(parent) = staged.parent() {
                    io.fsync_dir(parent).ctx("fsync", parent)?;
                }
                return Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(Error::io("publish (rename) staging directory", staged, e)),
        }
    }
    Err(Error::Usage(format!(
        "could not claim a sequence number in {} after 1000 tries",
        store.dir().display()
    )))
}

/// How [`Stage::add_verified`] brought a file in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shared {
    /// A hard link to the source file.
    Linked,
    /// A reflink (copy-on-write clone) of the source file.
    Reflinked,
    /// A full copy, checked against the source's size and checksum.
    Copied,
}

/// Streaming writer into a staged file; computes the checksum inline.
pub struct StageWriter<'a> {
    stage: &'a mut Stage,
    file: File,
    path: PathBuf,
    name: String,
    hasher: super::manifest::Hasher,
    size: u64,
    /// Bytes handed to write-behind so far (see [`WRITE_BEHIND`]).
    behind: u64,
    /// The `O_DIRECT` descriptor of [`StageWriter::write_bulk`]: not tried yet, open, or
    /// refused by the file system (then every write is buffered).
    direct: Direct,
    /// A direct write of this file succeeded (the alignment is accepted).
    direct_ok: bool,
}

enum Direct {
    Untried,
    Open(File),
    Refused,
}

use crate::pod::DIRECT_ALIGN;

thread_local! {
    /// Page-aligned [`crate::pod::CHUNK`] buffers for `O_DIRECT` writes from unaligned
    /// memory, kept per thread (fresh ones would be faulted in at every save).
    static DIRECT_BOUNCE: std::cell::RefCell<Vec<crate::pod::Bounce>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Writes `data` (whole pages) at `off` on the `O_DIRECT` descriptor `fd` in
/// [`crate::pod::CHUNK`] pieces, adding them to `hasher`. A helper thread writes piece i
/// while this thread checksums piece i+1 and, when `data` is not page-aligned, copies it
/// into the second of two aligned buffers: the copy and the checksum overlap the disk.
fn direct_pipeline(
    fd: &File,
    data: &[u8],
    off: u64,
    hasher: &mut super::manifest::Hasher,
) -> io::Result<()> {
    use crate::pod::{Bounce, CHUNK};
    enum Piece<'a> {
        Borrowed(&'a [u8]),
        Bounced(Bounce, usize),
    }
    let aligned = data.as_ptr() as usize % DIRECT_ALIGN == 0;
    let mut pool = Vec::new();
    if !aligned {
        pool = DIRECT_BOUNCE.with(|c| std::mem::take(&mut *c.borrow_mut()));
        let want = data.len().div_ceil(CHUNK).min(2);
        while pool.len() < want {
            pool.push(Bounce::new(CHUNK));
        }
    }
    std::thread::scope(|s| {
        let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<(Piece, u64)>(1);
        let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Bounce>(2);
        for b in pool {
            let _ = free_tx.send(b);
        }
        let writer = s.spawn(move || -> io::Result<()> {
            for (piece, at) in job_rx {
                match piece {
                    Piece::Borrowed(b) => direct_write(fd, b, at)?,
                    Piece::Bounced(mut b, n) => {
                        let r = direct_write(fd, &b.get()[..n], at);
                        // Back to the pool even on an error (then the reader stops).
                        let _ = free_tx.send(b);
                        r?
                    }
                }
            }
            Ok(())
        });
        let mut at = off;
        for piece in data.chunks(CHUNK) {
            hasher.update(piece);
            let job = if aligned {
                Piece::Borrowed(piece)
            } else {
                let Ok(mut b) = free_rx.recv() else { break };
                b.get()[..piece.len()].copy_from_slice(piece);
                Piece::Bounced(b, piece.len())
            };
            if job_tx.send((job, at)).is_err() {
                break;
            }
            at += piece.len() as u64;
        }
        drop(job_tx);
        let r = writer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the O_DIRECT writer thread panicked")));
        // Keep the buffers for the next save on this thread.
        let kept: Vec<Bounce> = free_rx.try_iter().collect();
        DIRECT_BOUNCE.with(|c| *c.borrow_mut() = kept);
        r
    })
}

/// Once this many bytes are written but not yet handed to writeback, `StageWriter` starts
/// their writeback (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, no waiting) so the disk works
/// while the job is still writing: the final fsync then has little left to do. Measured in
/// `docs/benchmarks.md`; it is a hint, durability still comes from the fsync in `commit`.
pub const WRITE_BEHIND: u64 = 8 << 20;

impl StageWriter<'_> {
    /// Appends `data` like [`Write::write_all`], but for large data bypasses the page cache:
    /// whole pages go out through a second descriptor opened with `O_DIRECT` (from `data`
    /// itself when it is page-aligned, else through a page-aligned [`crate::pod::CHUNK`]
    /// buffer), and only the last partial page is written through the cache. On this VM
    /// a buffered 1 GiB write costs 1.6-4.4 s of kernel CPU (page-cache pages are new guest
    /// memory), an `O_DIRECT` one 0.2 s and half the wall time (`docs/benchmarks.md`), which
    /// is what a background save takes from the job. Durability is unchanged: `commit`
    /// fsyncs the file as always. A file system without `O_DIRECT` (tmpfs before Linux 6.6,
    /// some FUSE file systems), a device that needs larger alignment, or `CKPT_DIRECT_IO=0`
    /// gets buffered writes, as before.
    pub fn write_bulk(&mut self, data: &[u8]) -> io::Result<()> {
        let mut data = data;
        let start = self.size;
        while data.len() >= DIRECT_ALIGN && self.size % DIRECT_ALIGN as u64 == 0 {
            self.open_direct();
            let Direct::Open(fd) = &self.direct else {
                break;
            };
            let mut n = data.len() & !(DIRECT_ALIGN - 1);
            if !self.direct_ok {
                // The first direct write of this file, alone: EINVAL here means alignment the
                // device does not accept (then buffered from here on), not a failed save.
                n = n.min(crate::pod::CHUNK);
            }
            match direct_pipeline(fd, &data[..n], self.size, &mut self.hasher) {
                Ok(()) => self.direct_ok = true,
                Err(e) if !self.direct_ok && e.raw_os_error() == Some(libc::EINVAL) => {
                    self.direct = Direct::Refused;
                    break;
                }
                Err(e) => return Err(e),
            }
            self.size += n as u64;
            self.behind = self.size;
            data = &data[n..];
        }
        if self.size != start {
            // The buffered descriptor's offset did not move with the direct writes; every
            // later write through it (the tail here, or the caller's) continues at the end.
            io::Seek::seek(&mut self.file, io::SeekFrom::Start(self.size))?;
        }
        self.write_all(data)
    }

    /// Opens the `O_DIRECT` descriptor on first use (or records that it is refused).
    fn open_direct(&mut self) {
        if let Direct::Untried = self.direct {
            if !crate::pod::direct_io() {
                self.direct = Direct::Refused;
                return;
            }
            self.direct = match OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT | libc::O_NOFOLLOW)
                .open(&self.path)
            {
                Ok(f) => Direct::Open(f),
                Err(_) => Direct::Refused,
            };
        }
    }

    /// The path of the file being written.
    pub fn file_path(&self) -> &Path {
        &self.path
    }

    /// Closes the file and records its size and sum. Returns the size.
    pub fn finish(self) -> Result<u64> {
        let StageWriter {
            stage,
            file,
            name,
            hasher,
            size,
            ..
        } = self;
        drop(file);
        stage.known.push(FileEntry {
            name,
            size,
            sum: hasher.finish(),
        });
        Ok(size)
    }
}

impl Write for StageWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        if self.size - self.behind >= WRITE_BEHIND {
            #[cfg(target_os = "linux")]
            {
                use std::os::unix::io::AsRawFd;
                // SAFETY: a hint on an open descriptor; errors are irrelevant (fsync follows).
                unsafe {
                    libc::sync_file_range(
                        self.file.as_raw_fd(),
                        self.behind as libc::off64_t,
                        (self.size - self.behind) as libc::off64_t,
                        libc::SYNC_FILE_RANGE_WRITE,
                    );
                }
            }
            self.behind = self.size;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Writes all of `buf` at `off` on an `O_DIRECT` descriptor (`buf`, `off` and the length
/// page-aligned; a short write of whole pages continues where it stopped).
fn direct_write(fd: &File, buf: &[u8], off: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0usize;
    while done < buf.len() {
        let n = match fd.write_at(&buf[done..], off + done as u64) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 || n % DIRECT_ALIGN != 0 {
            // A write that stops inside a page: the file system ran out of space (the
            // remainder, no longer page-aligned, would only fail with EINVAL).
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        done += n;
    }
    Ok(())
}

/// Size and checksum of a file, without following a symlink: a large file read by several
/// threads ([`super::scan::checksum_member`]); one that changes size while it is read, again
/// from the start in 1 MiB blocks up to its end.
pub fn checksum_file(path: &Path, algo: Algo) -> Result<(u64, u32)> {
    let f = super::io::open_read(path).ctx("open", path)?;
    let size = f.metadata().ctx("inspect", path)?.len();
    match super::scan::checksum_member(&f, size, algo) {
        Ok(sum) => return Ok((size, sum)),
        Err(super::scan::MemberRead::Io(e)) => return Err(Error::io("read", path, e)),
        Err(_) => {}
    }
    let mut h = algo.hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        match std::os::unix::fs::FileExt::read_at(&f, &mut buf, size) {
            Ok(0) => break,
            Ok(n) => {
                h.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path, e)),
        }
    }
    Ok((size, h.finish()))
}

/// Every regular file under `dir` (relative name, path) and every sub-directory; refuses
/// symlinks, sockets and devices, and a file named like the manifest at the top.
pub(crate) fn walk(
    root: &Path,
    dir: &Path,
    files: &mut Vec<(String, PathBuf)>,
    dirs: &mut Vec<PathBuf>,
) -> Result<()> {
    for ent in fs::read_dir(dir).ctx("list", dir)? {
        let ent = ent.ctx("list", dir)?;
        let path = ent.path();
        let ft = ent.file_type().ctx("inspect", &path)?;
        let Some(rel) = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_str()
            .map(str::to_string)
        else {
            return Err(Error::Usage(format!(
                "{} has a file name that is not valid UTF-8; checkpoint file names are UTF-8 text; hint: rename it",
                crate::store::display_path(&path)
            )));
        };
        if ft.is_dir() {
            dirs.push(path.clone());
            walk(root, &path, files, dirs)?;
        } else if ft.is_file() {
            if rel == MANIFEST_NAME {
                return Err(Error::Name(super::manifest::ManifestError::BadName {
                    name: rel,
                    why: "reserved for ckpt's manifest; hint: name the file differently",
                }));
            }
            files.push((rel, path));
        } else {
            return Err(Error::Usage(format!(
                "{} is not a regular file (a symlink, socket or device); hint: copy the file into the checkpoint instead, ckpt never follows links",
                path.display()
            )));
        }
    }
    Ok(())
}
