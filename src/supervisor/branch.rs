//! `ckpt run --from` and `ckpt rollback`: starting a run from a chosen checkpoint.
//!
//! - From another directory (`--from SRC[:REF]`, a **branch**): on the first launch only (the
//!   new directory has no checkpoint yet) the source checkpoint is verified and published
//!   into the new directory through a `Stage` (hard links or reflinks where the file system
//!   allows, verified copies otherwise), its manifest's `meta.parent` naming the source. The
//!   source is not touched. The launch restoring it gets `CKPT_START=branch`.
//! - From the same directory (`--from :REF`, `--from latest~2`, `ckpt rollback REF`, a
//!   **rollback**): every checkpoint newer than REF is moved to `DIR/rolled-back/`, never
//!   deleted, so the next launch resumes from REF.
//!
//! Both run under the directory lock (the supervisor's, or `ckpt rollback`'s own).

use std::path::{Path, PathBuf};

use serde_json::json;

use super::report::Reporter;
use super::Fatal;
use crate::error::Error;
use crate::exit::ErrKind;
use crate::store::tags::RefError;
use crate::store::Store;

/// Where `--from` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromSpec {
    /// A checkpoint of another directory.
    Other { dir: PathBuf, reference: String },
    /// A checkpoint of the run's own directory (a rollback).
    Same { reference: String },
}

/// Parses `--from`: `DIR:REF`, `:REF` (own directory), `DIR` (its `latest`), or a bare `REF`
/// of the own directory when no directory of that name exists. A `DIR` that is the run's own
/// directory means a rollback.
pub fn parse_from(spec: &str, own: &Path) -> FromSpec {
    let (dir, reference) = match spec.rsplit_once(':') {
        Some((d, r)) => (
            d.to_string(),
            if r.is_empty() { "latest" } else { r }.to_string(),
        ),
        None if Path::new(spec).is_dir() => (spec.to_string(), "latest".to_string()),
        None => (String::new(), spec.to_string()),
    };
    if dir.is_empty() || same_dir(Path::new(&dir), own) {
        return FromSpec::Same { reference };
    }
    FromSpec::Other {
        dir: PathBuf::from(dir),
        reference,
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => std::path::absolute(a).ok() == std::path::absolute(b).ok(),
    }
}

/// A reference error as a fatal error: malformed references are usage errors (64), ones
/// that name nothing in the directory are data errors (65, as `ckpt verify 99`).
pub fn ref_fatal(what: &str, e: RefError) -> Fatal {
    match e {
        RefError::Syntax(m) => Fatal::new(ErrKind::Usage, format!("{what}: {m}")),
        RefError::Unknown(m) => Fatal::new(ErrKind::Data, format!("{what}: {m}")),
        RefError::Io(m) => Fatal::new(ErrKind::Io, format!("{what}: {m}")),
    }
}

/// What a rollback did.
#[derive(Debug, Clone)]
pub struct RolledBack {
    pub seq: u64,
    pub step: Option<u64>,
    pub moved: Vec<(u64, PathBuf)>,
    /// Tags that now name a checkpoint in `rolled-back/`.
    pub dangling_tags: Vec<String>,
    /// The remotes the directory is uploaded to, rolled back too (docs/cloud.md).
    pub remote: Vec<crate::remote::RemoteRollback>,
}

/// Rolls `store` back to `reference` (the caller holds the directory lock): verifies it,
/// moves every newer checkpoint to `rolled-back/` and forgets that the job finished.
pub fn rollback(store: &Store, reference: &str) -> Result<RolledBack, Fatal> {
    let target = store
        .resolve(reference)
        .map_err(|e| ref_fatal("cannot roll back", e))?;
    let m = store.verify(target.seq).map_err(|reason| {
        Fatal::new(ErrKind::Data, format!(
                "cannot roll back to checkpoint {} ({reference}): it does not verify: {reason}; hint: `ckpt verify --dir {}` shows which ones do",
                target.seq,
                store.dir().display()
            ),
        )
    })?;
    let newer: Vec<u64> = store
        .list()
        .map_err(|e| Fatal::store("cannot list checkpoints", e))?
        .into_iter()
        .map(|(s, _)| s)
        .filter(|s| *s > target.seq)
        .collect();
    let tags = store
        .tags()
        .map_err(|e| Fatal::store("cannot read tags", e))?;
    let dangling_tags = tags
        .iter()
        .filter(|(_, s)| newer.contains(s))
        .map(|(n, _)| n.clone())
        .collect();
    let moved = store
        .set_aside(&newer)
        .map_err(|e| Fatal::store("cannot set checkpoints aside", e))?;
    let finished = store.private().join("finished");
    if finished.exists() {
        std::fs::remove_file(&finished).map_err(|e| {
            Fatal::new(
                ErrKind::CantCreate,
                format!("cannot remove {}: {e}", finished.display()),
            )
        })?;
    }
    let remote = crate::remote::after_rollback(store, target.seq);
    Ok(RolledBack {
        seq: target.seq,
        step: m.step,
        moved,
        dangling_tags,
        remote,
    })
}

/// Applies `ckpt run --from SPEC` before the first launch (the caller holds the lock).
pub fn apply(store: &Store, spec: &str, rep: &mut Reporter) -> Result<(), Fatal> {
    match parse_from(spec, store.dir()) {
        FromSpec::Same { reference } => {
            // Once per directory and spec: a requeued or re-run `ckpt run --from latest~2`
            // must not roll back again.
            let marker = store.private().join("from-applied");
            // Read as a regular file only: a FIFO planted there must not hang `ckpt run`.
            if crate::store::io::read_small(&marker, 64 << 10)
                .is_ok_and(|b| String::from_utf8_lossy(&b).trim_end() == spec)
            {
                rep.event(
                    "from_done",
                    Some(format!("--from {spec} was applied by an earlier run; resuming (hint: `ckpt rollback` rolls back again)")),
                    json!({ "from": spec }),
                );
                return Ok(());
            }
            let r = rollback(store, &reference)?;
            let moved: Vec<u64> = r.moved.iter().map(|(s, _)| *s).collect();
            crate::store::io::write_owner_only(&marker, format!("{spec}\n").as_bytes()).map_err(
                |e| {
                    Fatal::new(
                        ErrKind::CantCreate,
                        format!("cannot write {}: {e}", marker.display()),
                    )
                },
            )?;
            rep.event(
                "rolled_back",
                Some(format!(
                    "rolled back to checkpoint {}{}; set aside {moved:?} in {}",
                    r.seq,
                    r.step.map(|s| format!(" (step {s})")).unwrap_or_default(),
                    store.dir().join(crate::store::ROLLED_BACK).display()
                )),
                json!({ "seq": r.seq, "step": r.step, "moved": moved, "dangling_tags": r.dangling_tags }),
            );
            for rr in r.remote.iter().map(|rr| rr.report()) {
                if rr.warn {
                    rep.warn(rr.event, rr.human, rr.data);
                } else {
                    rep.event(rr.event, Some(rr.human), rr.data);
                }
            }
            Ok(())
        }
        FromSpec::Other { dir, reference } => {
            let existing = store
                .list()
                .map_err(|e| Fatal::store("cannot list checkpoints", e))?;
            if let Some((seq, _)) = existing.last() {
                rep.event(
                    "from_ignored",
                    Some(format!(
                        "{} already has checkpoints (newest {seq}): resuming them; --from {spec} only seeds a directory's first launch",
                        store.dir().display()
                    )),
                    json!({ "from": spec, "seq": seq }),
                );
                return Ok(());
            }
            let src = Store::new(&dir);
            if !src.dir().is_dir() {
                return Err(Fatal::new(ErrKind::Usage, format!(
                        "--from {spec}: {} is not a directory; hint: --from SRC_DIR[:ID|NAME|latest~N]",
                        src.dir().display()
                    ),
                ));
            }
            let what = format!("--from {spec}");
            let r = src.resolve(&reference).map_err(|e| ref_fatal(&what, e))?;
            let tags: Vec<String> = src
                .tags_by_seq()
                .ok()
                .and_then(|mut t| t.remove(&r.seq))
                .unwrap_or_default();
            let mut meta = serde_json::Map::new();
            let step = crate::store::scan::read_manifest(&r.path)
                .ok()
                .and_then(|m| m.step);
            meta.insert(
                "parent".into(),
                json!({ "dir": crate::store::display_path(src.dir()), "seq": r.seq, "step": step, "ref": reference, "tags": tags }),
            );
            let imp = store.import_from(&r.path, Some(r.seq), meta, true).map_err(|e| {
                let hint = if matches!(e, Error::Invalid { .. }) {
                    format!(
                        "; refusing to branch from it (the source is left as it is); hint: `ckpt verify --dir {}` shows which checkpoints verify",
                        src.dir().display()
                    )
                } else {
                    String::new()
                };
                let f = Fatal::store(&format!("{what}: cannot branch from checkpoint {} of {}", r.seq, src.dir().display()), e);
                f.with_hint(&hint)
            })?;
            rep.event(
                "branched",
                Some(format!(
                    "branched from checkpoint {} of {}{}: new checkpoint {} ({} file(s) hard-linked, {} reflinked, {} copied)",
                    r.seq,
                    src.dir().display(),
                    step.map(|s| format!(" (step {s})")).unwrap_or_default(),
                    imp.manifest.seq,
                    imp.linked,
                    imp.reflinked,
                    imp.copied
                )),
                json!({ "from_dir": crate::store::display_path(src.dir()), "from_seq": r.seq, "step": step, "seq": imp.manifest.seq, "linked": imp.linked, "reflinked": imp.reflinked, "copied": imp.copied }),
            );
            Ok(())
        }
    }
}
