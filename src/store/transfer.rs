//! Moving checkpoints between directories and out of a run: import (and branching, an import
//! that records its parent), export, and setting newer checkpoints aside for a rollback.
//! Imports publish through [`Stage`], the one publish path; nothing here deletes a checkpoint.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::commit::Shared;
use super::manifest::{Manifest, MANIFEST_NAME};
use super::scan::{open_member, verify_path};
use super::{token, Io, Stage, Store, PREFIX, ROLLED_BACK};
use crate::error::{Error, IoContext, Result};

/// The `writer` of checkpoints published by an import or a branch.
pub const IMPORT_WRITER: &str = concat!("ckpt-import/", env!("CARGO_PKG_VERSION"));

/// What an import produced.
#[derive(Debug, Clone)]
pub struct Imported {
    pub manifest: Manifest,
    pub path: PathBuf,
    /// Files brought in as hard links, reflinks and copies.
    pub linked: usize,
    pub reflinked: usize,
    pub copied: usize,
}

impl Store {
    /// Verifies the checkpoint at `src` (whose directory name carries `src_seq`, if any) and
    /// publishes it here as a new checkpoint (new sequence number, same step and files), its
    /// `meta` being the source's with `meta_extra` merged in (a `null` value removes that
    /// key); then verifies the result. With
    /// `share`, files are hard-linked (or reflinked) where the file system allows.
    pub fn import_from(
        &self,
        src: &Path,
        src_seq: Option<u64>,
        meta_extra: Map<String, Value>,
        share: bool,
    ) -> Result<Imported> {
        let m = verify_path(src, src_seq).map_err(|reason| Error::Invalid {
            path: src.to_path_buf(),
            reason,
        })?;
        self.create()?;
        let mut stage = Stage::new(self, m.checksum)?;
        let (mut linked, mut reflinked, mut copied) = (0, 0, 0);
        for f in &m.files {
            match stage.add_verified(&f.name, &src.join(&f.name), f, share)? {
                Shared::Linked => linked += 1,
                Shared::Reflinked => reflinked += 1,
                Shared::Copied => copied += 1,
            }
        }
        let mut meta = m.meta.clone();
        for (k, v) in meta_extra {
            // `null` removes a key (an import drops the source's `parent`).
            if v.is_null() {
                meta.remove(&k);
            } else {
                meta.insert(k, v);
            }
        }
        let manifest = stage.commit(m.step, IMPORT_WRITER, meta)?;
        let path = self.path_of(manifest.seq);
        verify_path(&path, Some(manifest.seq)).map_err(|reason| Error::Invalid {
            path: path.clone(),
            reason,
        })?;
        Ok(Imported {
            manifest,
            path,
            linked,
            reflinked,
            copied,
        })
    }

    /// Moves checkpoints `seqs` into `DIR/rolled-back/ckpt-<seq>.<token>`, newest first (a
    /// crash part-way leaves a shorter, still consistent history), and makes it durable.
    /// Never deletes. Returns where each went.
    pub fn set_aside(&self, seqs: &[u64]) -> Result<Vec<(u64, PathBuf)>> {
        let aside = self.dir().join(ROLLED_BACK);
        let created = self.real_dir(&aside)?;
        if created {
            self.io().fsync_dir(self.dir()).ctx("fsync", self.dir())?;
        }
        let mut seqs = seqs.to_vec();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        let mut out = Vec::new();
        for seq in seqs {
            let from = self.path_of(seq);
            let to = aside.join(format!("{PREFIX}{seq:012}.{}", token()));
            self.io()
                .rename_noreplace(&from, &to)
                .ctx("set aside", &from)?;
            self.io().fsync_dir(&aside).ctx("fsync", &aside)?;
            self.io().fsync_dir(self.dir()).ctx("fsync", self.dir())?;
            out.push((seq, to));
        }
        Ok(out)
    }
}

/// Copies the checkpoint at `src` (verified first, `src_seq` as in
/// [`verify_path`]) to the new directory `to`: every file (checked against the manifest while
/// copied) and `MANIFEST.ckpt` byte for byte, built under a temporary name next to `to`,
/// fsynced, renamed into place without replacing anything, then verified again.
pub fn export_to(src: &Path, src_seq: Option<u64>, to: &Path, io: &dyn Io) -> Result<Manifest> {
    let m = verify_path(src, src_seq).map_err(|reason| Error::Invalid {
        path: src.to_path_buf(),
        reason,
    })?;
    if fs::symlink_metadata(to).is_ok() {
        return Err(Error::Usage(format!(
            "{} already exists; hint: --to must name a new directory",
            to.display()
        )));
    }
    let to = std::path::absolute(to).unwrap_or_else(|_| to.to_path_buf());
    let parent = to
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/"));
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "export".into());
    io.create_dir_all(&parent)
        .ctx("create directory", &parent)?;
    let tmp = parent.join(format!(".{name}.export.{}", token()));
    io.create_dir(&tmp).ctx("create directory", &tmp)?;
    let res = (|| -> Result<()> {
        let mut dirs = Vec::new();
        for f in &m.files {
            let dst = tmp.join(&f.name);
            if let Some(d) = dst.parent().filter(|d| *d != tmp) {
                if !d.exists() {
                    io.create_dir_all(d).ctx("create directory", d)?;
                    let mut q = d.to_path_buf();
                    while q != tmp {
                        if !dirs.contains(&q) {
                            dirs.push(q.clone());
                        }
                        q = q.parent().unwrap_or(&tmp).to_path_buf();
                    }
                }
            }
            let mut input = open_member(src, &f.name).map_err(|reason| Error::Invalid {
                path: src.to_path_buf(),
                reason,
            })?;
            let mut out = io.create_file(&dst).ctx("create", &dst)?;
            let mut h = m.checksum.hasher();
            let mut size = 0u64;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::io("read", src.join(&f.name), e)),
                };
                h.update(&buf[..n]);
                size += n as u64;
                out.write_all(&buf[..n]).ctx("write", &dst)?;
            }
            if size != f.size || h.finish() != f.sum {
                return Err(Error::Invalid {
                    path: src.to_path_buf(),
                    reason: crate::error::Invalid::Checksum {
                        name: f.name.clone(),
                        expected: f.sum,
                        actual: h.finish(),
                    },
                });
            }
            drop(out);
            io.fsync_file(&dst).ctx("fsync", &dst)?;
        }
        let msrc = src.join(MANIFEST_NAME);
        let bytes = super::io::read_small(&msrc, super::manifest::limits::MANIFEST_BYTES)
            .ctx("read", &msrc)?;
        let mdst = tmp.join(MANIFEST_NAME);
        io.write_new(&mdst, &bytes).ctx("write", &mdst)?;
        io.fsync_file(&mdst).ctx("fsync", &mdst)?;
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for d in &dirs {
            io.fsync_dir(d).ctx("fsync", d)?;
        }
        io.fsync_dir(&tmp).ctx("fsync", &tmp)?;
        io.rename_noreplace(&tmp, &to).ctx("publish export", &to)?;
        io.fsync_dir(&parent).ctx("fsync", &parent)?;
        Ok(())
    })();
    if let Err(e) = res {
        let _ = io.remove_dir_all(&tmp);
        return Err(e);
    }
    let again = verify_path(&to, None).map_err(|reason| Error::Invalid {
        path: to.clone(),
        reason,
    })?;
    if again != m {
        return Err(Error::Usage(format!(
            "the exported manifest in {} differs from the source's",
            to.display()
        )));
    }
    Ok(m)
}
