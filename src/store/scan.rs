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
    let m = read_manifest(path)?;
    if let Some(seq) = seq {
        if seq != m.seq {
            return Err(Invalid::SeqMismatch {
                dir: seq,
                manifest: m.seq,
            });
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    for f in &m.files {
        let mut file = open_member(path, &f.name)?;
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
        let mut h = m.checksum.hasher();
        let mut n_total = 0u64;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                    n_total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Invalid::Unreadable(format!("{}: {e}", f.name))),
            }
        }
        if n_total != f.size {
            return Err(Invalid::Size {
                name: f.name.clone(),
                expected: f.size,
                actual: n_total,
            });
        }
        if h.finish() != f.sum {
            return Err(Invalid::Checksum {
                name: f.name.clone(),
                expected: f.sum,
                actual: h.finish(),
            });
        }
    }
    Ok(m)
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
        mut on_bad: impl FnMut(&Bad),
    ) -> Result<Option<Found>> {
        for (seq, path) in self.list()?.into_iter().rev() {
            match verify_path(&path, Some(seq)) {
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
        let qdir = self.dir().join(QUARANTINE);
        self.real_dir(&qdir)?;
        let from = self.path_of(seq);
        let to = qdir.join(format!(
            "{}{seq:012}.{}.{}",
            super::PREFIX,
            reason.slug(),
            token()
        ));
        self.io()
            .rename_noreplace(&from, &to)
            .ctx("move aside", &from)?;
        self.io().fsync_dir(&qdir).ctx("fsync", &qdir)?;
        self.io().fsync_dir(self.dir()).ctx("fsync", self.dir())?;
        let note = qdir.join(format!(
            "{}.reason.txt",
            to.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _ = self.io().write_new(&note, format!("{reason}\n").as_bytes());
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
