//! Finding, ordering and verifying checkpoints; setting bad ones aside; retention.
//! Every reader goes through here.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::manifest::{limits, Manifest, MANIFEST_NAME};
use super::{token, Store, QUARANTINE};
use crate::error::{Error, Invalid, IoContext, Result};

/// A checkpoint that verified.
#[derive(Debug, Clone)]
pub struct Found {
    pub seq: u64,
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// A checkpoint that did not verify, and where it went.
#[derive(Debug, Clone)]
pub struct Bad {
    pub seq: u64,
    pub path: PathBuf,
    pub reason: Invalid,
    /// Where it was moved; `None` if it could not be moved (the reason is in `move_error`).
    pub moved_to: Option<PathBuf>,
    pub move_error: Option<String>,
}

impl std::fmt::Display for Bad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "checkpoint {} ({}) is invalid: {}",
            self.seq,
            self.path.display(),
            self.reason
        )?;
        match (&self.moved_to, &self.move_error) {
            (Some(to), _) => write!(f, "; moved aside to {}", to.display()),
            (None, Some(e)) => write!(f, "; could not move it aside: {e}"),
            (None, None) => write!(f, "; skipped"),
        }
    }
}

/// Reads and decodes a checkpoint's manifest without reading its files.
pub fn read_manifest(path: &Path) -> Result<Manifest, Invalid> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(Invalid::NotADirectory),
        Err(e) => return Err(Invalid::Unreadable(e.to_string())),
    }
    let mpath = path.join(MANIFEST_NAME);
    let f = match super::io::open_read(&mpath) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Invalid::NoManifest),
        Err(e) if super::io::is_not_regular(&e) => {
            return Err(Invalid::NotRegular(MANIFEST_NAME.into()))
        }
        Err(e) => return Err(Invalid::Unreadable(e.to_string())),
    };
    let mut bytes = Vec::new();
    f.take(limits::MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Invalid::Unreadable(e.to_string()))?;
    Manifest::decode(&bytes).map_err(Invalid::Manifest)
}

/// Opens a listed file of a checkpoint for reading, refusing symlinks at every level.
pub fn open_member(dir: &Path, name: &str) -> Result<fs::File, Invalid> {
    let mut cur = dir.to_path_buf();
    let comps: Vec<&str> = name.split('/').collect();
    for (i, comp) in comps.iter().enumerate() {
        cur.push(comp);
        let last = i + 1 == comps.len();
        match fs::symlink_metadata(&cur) {
            Ok(m) if last && m.is_file() => {}
            Ok(m) if !last && m.is_dir() => {}
            Ok(_) => return Err(Invalid::NotRegular(name.into())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Invalid::Missing(name.into()))
            }
            Err(e) => return Err(Invalid::Unreadable(e.to_string())),
        }
    }
    super::io::open_read(&cur).map_err(|e| {
        if super::io::is_not_regular(&e) {
            Invalid::NotRegular(name.into())
        } else {
            Invalid::Unreadable(format!("{name}: {e}"))
        }
    })
}

/// Fully verifies the checkpoint at `path`: manifest, and every file's size and checksum.
/// `seq` is the number its directory name carries.
pub fn verify_path(path: &Path, seq: Option<u64>) -> Result<Manifest, Invalid> {
    check_path(path, seq, Check::Full)
}

/// How much of a checkpoint a check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Everything: the manifest, and every member's size and checksum (every byte read).
    Full,
    /// The manifest (its trailer, format, `seq`), and every member present as a regular
    /// file of the listed size; the bytes are not read. For a launch whose client verifies
    /// every byte as it reads it (`ckpt run --restore-check client`, docs/protocol.md).
    Sizes,
}

/// [`verify_path`] with the depth of the check chosen.
pub fn check_path(path: &Path, seq: Option<u64>, check: Check) -> Result<Manifest, Invalid> {
    let m = read_manifest(path)?;
    if let Some(seq) = seq {
        if seq != m.seq {
            return Err(Invalid::SeqMismatch {
                dir: seq,
                manifest: m.seq,
            });
        }
    }
    check_members(path, &m, check, |_| true)?;
    Ok(m)
}

/// Checks the members of checkpoint `path` (manifest `m`) that `keep` selects, as deep as
/// `check` says: each present as a regular file of its size, and with [`Check::Full`] its
/// checksum (every byte read).
pub fn check_members(
    path: &Path,
    m: &Manifest,
    check: Check,
    keep: impl Fn(&super::FileEntry) -> bool,
) -> Result<(), Invalid> {
    for f in m.files.iter().filter(|f| keep(f)) {
        let file = open_member(path, &f.name)?;
        let len = file
            .metadata()
            .map_err(|e| Invalid::Unreadable(e.to_string()))?
            .len();
        if len != f.size {
            return Err(Invalid::Size {
                name: f.name.clone(),
                expected: f.size,
                actual: len,
            });
        }
        if check == Check::Sizes {
            continue;
        }
        let sum = checksum_member(&file, f.size, m.checksum).map_err(|e| match e {
            MemberRead::Short(actual) | MemberRead::Grew(actual) => Invalid::Size {
                name: f.name.clone(),
                expected: f.size,
                actual,
            },
            MemberRead::Io(e) => Invalid::Unreadable(format!("{}: {e}", f.name)),
        })?;
        if sum != f.sum {
            return Err(Invalid::Checksum {
                name: f.name.clone(),
                expected: f.sum,
                actual: sum,
            });
        }
    }
    Ok(())
}

/// Bytes per read of [`checksum_member`].
const VERIFY_READ: usize = 4 << 20;
/// A member at least this large is read by several threads (one contiguous part each).
const VERIFY_PART_MIN: u64 = 64 << 20;
/// At most this many threads read one member.
const VERIFY_THREADS: usize = 4;

/// How reading a member for its checksum went wrong.
pub(crate) enum MemberRead {
    /// It ended after this many bytes, before the size checked at its open.
    Short(u64),
    /// It holds more than the size checked at its open (this many bytes now).
    Grew(u64),
    Io(io::Error),
}

/// The checksum of the `size` bytes of `file`, and a check that it has no more. A large
/// member is read through the page cache by one thread per CPU (up to [`VERIFY_THREADS`]),
/// each over one contiguous part with a descriptor of its own (its own read-ahead), and the
/// parts' checksums combined in order ([`Hasher::combine`](super::manifest::Hasher::combine)).
/// On a cold cache the page allocations of a buffered read are what a read waits for on this
/// VM (CPU in the kernel, not the disk): two readers over halves read a cold 1 GiB file in
/// 0.67-0.83 s where one `dd bs=4M` took 1.15-1.24 s (docs/benchmarks.md run O). The pages
/// stay in the cache on purpose: the job reads the same files next (a resume), and finds them
/// there.
pub(crate) fn checksum_member(
    file: &fs::File,
    size: u64,
    algo: super::manifest::Algo,
) -> Result<u32, MemberRead> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let parts = (size / VERIFY_PART_MIN).clamp(1, cpus.min(VERIFY_THREADS) as u64) as usize;
    checksum_parts(file, size, algo, parts, VERIFY_READ)
}

/// [`checksum_member`] with `parts` readers (each part a multiple of `read` bytes, the last
/// one shorter or empty) and reads of `read` bytes.
fn checksum_parts(
    file: &fs::File,
    size: u64,
    algo: super::manifest::Algo,
    parts: usize,
    read: usize,
) -> Result<u32, MemberRead> {
    use std::os::unix::fs::FileExt;
    let part = size.div_ceil(parts as u64).next_multiple_of(read as u64);
    let one = |f: &fs::File, from: u64, to: u64| -> Result<super::manifest::Hasher, MemberRead> {
        {
            use std::os::unix::io::AsRawFd;
            // Twice the read-ahead for this part (run O: 0.66-0.70 s instead of 0.72-0.81 s
            // for two readers of a cold 1 GiB member). SAFETY: advice on an open descriptor.
            unsafe {
                libc::posix_fadvise(
                    f.as_raw_fd(),
                    from as libc::off_t,
                    (to - from) as libc::off_t,
                    libc::POSIX_FADV_SEQUENTIAL,
                )
            };
        }
        let mut h = algo.hasher();
        let mut buf = vec![0u8; read.min((to - from) as usize).max(1)];
        let mut off = from;
        while off < to {
            let want = buf.len().min((to - off) as usize);
            match f.read_at(&mut buf[..want], off) {
                Ok(0) => return Err(MemberRead::Short(off)),
                Ok(n) => {
                    h.update(&buf[..n]);
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(MemberRead::Io(e)),
            }
        }
        Ok(h)
    };
    let hashers: Vec<Result<super::manifest::Hasher, MemberRead>> = if parts == 1 {
        vec![one(file, 0, size)]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (1..parts)
                .map(|i| {
                    let (from, to) = (
                        (i as u64 * part).min(size),
                        ((i as u64 + 1) * part).min(size),
                    );
                    s.spawn(move || {
                        // A descriptor of its own, for read-ahead of its own (the same open
                        // file, reached through /proc: no path is looked up again).
                        let f = super::io::reopen_read(file).map_err(MemberRead::Io)?;
                        one(&f, from, to)
                    })
                })
                .collect();
            let mut all = vec![one(file, 0, part.min(size))];
            all.extend(
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a verify reader panicked")),
            );
            all
        })
    };
    let mut h = algo.hasher();
    for part in hashers {
        h.combine(&part?);
    }
    // Nothing past the end: a member that grew since its size was checked is not the one
    // the manifest describes.
    let mut probe = [0u8; 1];
    loop {
        match file.read_at(&mut probe, size) {
            Ok(0) => return Ok(h.finish()),
            Ok(_) => {
                let now = file.metadata().map_err(MemberRead::Io)?.len();
                return Err(MemberRead::Grew(now.max(size + 1)));
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(MemberRead::Io(e)),
        }
    }
}

impl Store {
    /// Fully verifies checkpoint `seq`.
    pub fn verify(&self, seq: u64) -> Result<Manifest, Invalid> {
        verify_path(&self.path_of(seq), Some(seq))
    }

    /// The newest checkpoint that verifies. Newer ones that do not verify are moved to
    /// `quarantine/` when `quarantine` is true (else only reported) and passed to `on_bad`.
    /// Only as many checkpoints are read as it takes to find a good one.
    pub fn latest_verified(
        &self,
        quarantine: bool,
        on_bad: impl FnMut(&Bad),
    ) -> Result<Option<Found>> {
        self.latest_checked(Check::Full, quarantine, on_bad)
    }

    /// [`Store::latest_verified`] with the depth of each check chosen ([`Check`]).
    pub fn latest_checked(
        &self,
        check: Check,
        quarantine: bool,
        mut on_bad: impl FnMut(&Bad),
    ) -> Result<Option<Found>> {
        for (seq, path) in self.list()?.into_iter().rev() {
            match check_path(&path, Some(seq), check) {
                Ok(manifest) => {
                    return Ok(Some(Found {
                        seq,
                        path,
                        manifest,
                    }))
                }
                Err(reason) => {
                    // Vanished under us (pruned or quarantined by someone else): not corrupt.
                    if fs::symlink_metadata(&path).is_err() {
                        continue;
                    }
                    let mut bad = Bad {
                        seq,
                        path: path.clone(),
                        reason,
                        moved_to: None,
                        move_error: None,
                    };
                    if quarantine {
                        match self.quarantine(seq, &bad.reason) {
                            Ok(to) => bad.moved_to = Some(to),
                            Err(e) => bad.move_error = Some(e.to_string()),
                        }
                    }
                    on_bad(&bad);
                }
            }
        }
        Ok(None)
    }

    /// Moves checkpoint `seq` to `quarantine/ckpt-<seq>.<reason>.<token>` and writes the reason
    /// next to it. Never deletes.
    pub fn quarantine(&self, seq: u64, reason: &Invalid) -> Result<PathBuf> {
        self.quarantine_as(seq, reason.slug(), &reason.to_string())
    }

    /// [`Store::quarantine`] for a reason that is not a failed verify (`slug`, `why`): the
    /// supervisor sets aside checkpoints derived from a damaged one (`derived-from-damaged`).
    pub fn quarantine_as(&self, seq: u64, slug: &str, why: &str) -> Result<PathBuf> {
        let qdir = self.dir().join(QUARANTINE);
        self.real_dir(&qdir)?;
        let from = self.path_of(seq);
        let to = qdir.join(format!("{}{seq:012}.{}.{}", super::PREFIX, slug, token()));
        self.io()
            .rename_noreplace(&from, &to)
            .ctx("move aside", &from)?;
        self.io().fsync_dir(&qdir).ctx("fsync", &qdir)?;
        self.io().fsync_dir(self.dir()).ctx("fsync", self.dir())?;
        let note = qdir.join(format!(
            "{}.reason.txt",
            to.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _ = self.io().write_new(&note, format!("{why}\n").as_bytes());
        Ok(to)
    }

    /// Retention. Removes published checkpoints beyond the newest `keep`, except:
    /// `protect` (the newest verified checkpoint) and anything newer than the newest of
    /// `protect`, tagged checkpoints (read here from `.ckpt/tags.json`, so every caller is
    /// covered), and with `keep_every` the oldest checkpoint of each such period of creation
    /// time. A checkpoint is first renamed into `.ckpt/trash` (one atomic step, made durable),
    /// then deleted. Returns removed sequences.
    pub fn prune(
        &self,
        keep: usize,
        keep_every: Option<Duration>,
        protect: &[u64],
    ) -> Result<Vec<u64>> {
        // Shared with other prunes, exclusive with `ckpt tag`: a tag either lands before the
        // plan reads the tags, or after the renames below (then `ckpt tag` sees it gone).
        let _tag_lock = self.tag_lock(false, false)?;
        let doomed = self.prune_plan(keep, keep_every, protect)?;
        if doomed.is_empty() {
            return Ok(Vec::new());
        }
        let trash = self.private().join("trash");
        self.real_dir(&trash)?;
        let mut moved = Vec::new();
        for (seq, path) in &doomed {
            let to = trash.join(format!("{}{seq:012}.{}", super::PREFIX, token()));
            match self.io().rename_noreplace(path, &to) {
                Ok(()) => moved.push((*seq, to)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("move to trash", path, e)),
            }
        }
        if !moved.is_empty() {
            // Both sides of the renames: once durable, a pruned checkpoint can never come
            // back (half deleted) after a crash during the deletion below.
            self.io().fsync_dir(self.dir()).ctx("fsync", self.dir())?;
            self.io().fsync_dir(&trash).ctx("fsync", &trash)?;
        }
        for (_, to) in &moved {
            self.io().remove_dir_all(to).ctx("remove", to)?;
        }
        Ok(moved.into_iter().map(|(s, _)| s).collect())
    }

    /// What [`Store::prune`] would remove now (`ckpt gc --dry-run`), ascending. Fails when the
    /// tag file cannot be read: a tagged checkpoint must never be removed by mistake.
    pub fn prune_plan(
        &self,
        keep: usize,
        keep_every: Option<Duration>,
        protect: &[u64],
    ) -> Result<Vec<(u64, PathBuf)>> {
        let all = self.list()?;
        if all.len() <= keep {
            return Ok(Vec::new());
        }
        let tagged: std::collections::HashSet<u64> = self.tags()?.into_values().collect();
        let (old, _newest) = all.split_at(all.len() - keep);
        // Nothing newer than the newest protected (verified) checkpoint goes: such a one is
        // either being verified or corrupt, and corrupt ones are moved aside, never deleted.
        let ceiling = protect.iter().max().copied().unwrap_or(u64::MAX);
        let mut buckets = std::collections::HashSet::new();
        let mut doomed = Vec::new();
        for (seq, path) in old {
            if protect.contains(seq) || *seq > ceiling || tagged.contains(seq) {
                continue;
            }
            if let Some(every) = keep_every {
                let period = every.as_millis().max(1) as u64;
                if let Ok(m) = read_manifest(path) {
                    if buckets.insert(m.created_ms / period) {
                        continue;
                    }
                }
            }
            doomed.push((*seq, path.clone()));
        }
        Ok(doomed)
    }
}

#[cfg(test)]
mod tests {
    use super::super::manifest::Algo;
    use super::*;
    use std::io::Write;

    fn file_of(data: &[u8]) -> (tempfile::TempDir, fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m");
        fs::write(&p, data).unwrap();
        let f = fs::File::open(&p).unwrap();
        (dir, f)
    }

    /// Every split into parts (empty last parts included) and read size gives the checksum of
    /// the whole, for both algorithms, and a changed byte in any part is seen.
    #[test]
    fn checksums_in_parts_equal_the_whole_and_see_every_part_change() {
        let mut rng = fastrand::Rng::with_seed(19);
        for size in [0usize, 1, 4095, 4096, 65_537, 300_001] {
            let data: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
            let (_d, f) = file_of(&data);
            for algo in [Algo::Crc32c, Algo::Crc32] {
                let whole = algo.checksum(&data);
                for parts in 1..=4 {
                    for read in [1usize, 4096, 65_536, 1 << 20] {
                        let got = checksum_parts(&f, size as u64, algo, parts, read)
                            .unwrap_or_else(|_| panic!("size {size} parts {parts} read {read}"));
                        assert_eq!(got, whole, "size {size} parts {parts} read {read} {algo:?}");
                    }
                }
            }
            if size < 2 {
                continue;
            }
            for at in [0, size / 3, size / 2, size - 1] {
                let mut bad = data.clone();
                bad[at] ^= 0x10;
                let (_d, f) = file_of(&bad);
                for parts in 1..=4 {
                    let got = checksum_parts(&f, size as u64, Algo::Crc32c, parts, 4096)
                        .unwrap_or_else(|_| panic!("size {size}"));
                    assert_ne!(got, Algo::Crc32c.checksum(&data), "byte {at} parts {parts}");
                }
            }
        }
    }

    /// A member shorter than its size says where it ended; one with more bytes says it grew.
    #[test]
    fn a_short_or_longer_member_is_named_as_such() {
        let data = vec![7u8; 100_000];
        let (_d, f) = file_of(&data);
        for parts in 1..=4 {
            match checksum_parts(&f, 150_000, Algo::Crc32c, parts, 4096) {
                Err(MemberRead::Short(at)) => assert_eq!(at, 100_000, "parts {parts}"),
                _ => panic!("a short member must be reported (parts {parts})"),
            }
            match checksum_parts(&f, 60_000, Algo::Crc32c, parts, 4096) {
                Err(MemberRead::Grew(now)) => assert_eq!(now, 100_000, "parts {parts}"),
                _ => panic!("a longer member must be reported (parts {parts})"),
            }
        }
    }

    /// `verify_path` reads a large member in parts, and still refuses a flipped byte in the
    /// second half and a member that grew after the manifest was written.
    #[test]
    fn verify_path_reads_a_large_member_in_parts_and_sees_damage() {
        let dir = tempfile::tempdir().unwrap();
        let size = (2 * VERIFY_PART_MIN + 12_345) as usize;
        let mut rng = fastrand::Rng::with_seed(20);
        let data: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
        let store = Store::new(dir.path());
        store.create().unwrap();
        let mut st = super::super::commit::Stage::new(&store, Algo::Crc32c).unwrap();
        st.write_file("big", &data).unwrap();
        let seq = st.commit(None, "test", Default::default()).unwrap().seq;
        let path = store.path_of(seq);
        assert!(verify_path(&path, Some(seq)).is_ok());
        let member = path.join("big");
        let mut bad = data.clone();
        bad[size - 5_000] ^= 1;
        fs::write(&member, &bad).unwrap();
        assert!(matches!(
            verify_path(&path, Some(seq)),
            Err(Invalid::Checksum { .. })
        ));
        fs::write(&member, &data).unwrap();
        fs::OpenOptions::new()
            .append(true)
            .open(&member)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        match verify_path(&path, Some(seq)) {
            Err(Invalid::Size { actual, .. }) => assert_eq!(actual, size as u64 + 1),
            other => panic!("a grown member must be refused: {other:?}"),
        }
    }
}
