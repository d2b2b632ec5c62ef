//! Versions and experiments: `ckpt tag/untag/show/diff/export/import/rollback/gc`
//! (docs/versions.md). Every checkpoint argument goes through [`Store::resolve`]:
//! `ID | NAME | latest | latest~N`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use super::{parse_duration, DirArg};
use crate::exit::ErrKind;
use crate::store::manifest::Manifest;
use crate::store::scan::{read_manifest, verify_path};
use crate::store::tags::{check_tag_name, Resolved};
use crate::store::{
    display_path as dp, escape, escape_lines, Store, PRIVATE, QUARANTINE, ROLLED_BACK,
};
use crate::supervisor::branch::{ref_fatal, rollback as do_rollback};
use crate::supervisor::{fmt_bytes, Fatal};

/// The store of `--dir`, which must exist.
pub fn open(dir: &Path) -> Result<Store, Fatal> {
    let store = Store::new(dir);
    if !store.dir().is_dir() {
        return Err(Fatal::new(
            ErrKind::Usage,
            format!(
                "{} is not a directory; hint: give the checkpoint directory with --dir or CKPT_DIR",
                dp(store.dir())
            ),
        ));
    }
    Ok(store)
}

/// Resolves `r` in `store` with a clear error.
pub fn resolve(store: &Store, r: &str) -> Result<Resolved, Fatal> {
    store
        .resolve(r)
        .map_err(|e| ref_fatal("unknown checkpoint", e))
}

/// `REF` in `--dir`, or `DIR:REF` in another directory.
fn resolve_anywhere(default: &Path, arg: &str) -> Result<(Store, Resolved), Fatal> {
    let (dir, r) = match arg.rsplit_once(':') {
        Some((d, r)) if !d.is_empty() => {
            (PathBuf::from(d), if r.is_empty() { "latest" } else { r })
        }
        Some((_, r)) => (default.to_path_buf(), r),
        None => (default.to_path_buf(), arg),
    };
    let store = open(&dir)?;
    let res = resolve(&store, r)?;
    Ok((store, res))
}

fn manifest_of(res: &Resolved) -> Result<Manifest, Fatal> {
    read_manifest(&res.path).map_err(|e| {
        Fatal::new(
            ErrKind::Data,
            format!("checkpoint {} ({}): {e}", res.seq, dp(&res.path)),
        )
    })
}

/// `--remote URL` for the commands that create a checkpoint (`save`, `import`): after the
/// local commit, uploads checkpoint `seq` at `path` and waits for it. Returns the `remote`
/// object of `--json` and the exit code: 0, or 77 when the upload failed (the local
/// checkpoint stays).
pub(super) fn upload_after(
    r: &crate::remote::Remote,
    seq: u64,
    path: &Path,
    quiet: bool,
) -> (Value, i32) {
    let t = std::time::Instant::now();
    let res = r.upload_checked(seq, path);
    let ms = t.elapsed().as_millis() as u64;
    match res {
        Ok(crate::remote::Upload::Done(bytes)) => {
            let rate = (bytes as f64 / t.elapsed().as_secs_f64().max(1e-6)) as u64;
            if !quiet {
                eprintln!(
                    "ckpt: uploaded checkpoint {seq} to {} ({} in {:.2}s, {}/s)",
                    r.display,
                    fmt_bytes(bytes),
                    ms as f64 / 1000.0,
                    fmt_bytes(rate)
                );
            }
            (
                json!({ "url": r.display, "uploaded": true, "already": false, "bytes": bytes, "duration_ms": ms, "bytes_per_s": rate }),
                0,
            )
        }
        Ok(crate::remote::Upload::Present) => {
            if !quiet {
                eprintln!("ckpt: checkpoint {seq} is already on {}", r.display);
            }
            (
                json!({ "url": r.display, "uploaded": true, "already": true, "bytes": 0, "duration_ms": ms }),
                0,
            )
        }
        Err(e) => {
            let e = crate::remote::redact(&e);
            eprintln!(
                "ckpt: error: checkpoint {seq} is saved in {} but NOT uploaded to {}: {}; exit {}",
                dp(path),
                r.display,
                escape(&e),
                ErrKind::UploadFailed.code()
            );
            (
                json!({ "url": r.display, "uploaded": false, "error": e, "duration_ms": ms }),
                ErrKind::UploadFailed.code(),
            )
        }
    }
}

/// A remote checkpoint named by `r`, with what `latest` skipped on the way said on stderr.
fn resolve_remote(remote: &crate::remote::Remote, r: &str) -> Result<u64, Fatal> {
    let (seq, skipped) = remote
        .resolve(r)
        .map_err(|e| Fatal::new(ErrKind::Usage, e))?;
    for (s, e) in skipped {
        eprintln!(
            "ckpt: skipped remote checkpoint {s}: {} (NOT RESTORABLE)",
            escape(&e)
        );
    }
    Ok(seq)
}

/// Name a checkpoint; a named checkpoint is never removed by retention.
#[derive(Debug, clap::Args)]
pub struct TagArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// The checkpoint: ID, NAME, `latest` or `latest~N`.
    #[arg(value_name = "ID")]
    pub id: String,
    /// The new name (letters, digits, `.`, `_`, `+`, `-`; not all digits, not `latest`).
    #[arg(value_name = "NAME")]
    pub name: String,
    /// Move the name if it already names another checkpoint.
    #[arg(long, short = 'f')]
    pub force: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn tag(a: TagArgs) -> Result<i32, Fatal> {
    check_tag_name(&a.name).map_err(|m| Fatal::new(ErrKind::Usage, m))?;
    let store = open(&a.dir.dir)?;
    resolve(&store, &a.id)?;
    // Resolved (again) under the tag lock: retention cannot remove it between check and write.
    let res: Result<(u64, Option<u64>), Fatal> = store
        .update_tags(|tags| {
            let r = store
                .resolve(&a.id)
                .map_err(|e| crate::Error::Usage(format!("checkpoint vanished meanwhile (pruned?): {e}")))?;
            let old = tags.get(&a.name).copied();
            if let Some(old) = old.filter(|o| *o != r.seq && !a.force) {
                return Err(crate::Error::Usage(format!(
                    "tag {:?} already names checkpoint {old}; hint: pass --force to move it to {}, or choose another name",
                    a.name, r.seq
                )));
            }
            tags.insert(a.name.clone(), r.seq);
            Ok((r.seq, old))
        })
        .map_err(|e| Fatal::store("cannot tag", e));
    let (seq, old) = res?;
    // The remotes this directory is uploaded to record the tag too: their retention keeps
    // the checkpoint even on a new machine whose directory holds no tag.
    let remote = crate::remote::update_remembered_tags(&store, &mut |t| {
        t.insert(a.name.clone(), seq);
    });
    if a.json {
        println!(
            "{}",
            json!({ "tag": a.name, "seq": seq, "previous": old, "remote": remote_json(&remote) })
        );
    } else {
        match old {
            Some(o) if o != seq => println!("moved tag {} from checkpoint {o} to {seq}", a.name),
            _ => println!("tagged checkpoint {seq} as {}", a.name),
        }
    }
    Ok(remote_report(&remote, a.json, &format!("tag {}", a.name)))
}

fn remote_json(r: &[crate::remote::RemoteTagUpdate]) -> Value {
    r.iter()
        .map(|x| match &x.result {
            Ok(changed) => json!({ "url": x.remote, "recorded": true, "changed": changed }),
            Err(e) => json!({ "url": x.remote, "recorded": false, "error": e }),
        })
        .collect()
}

/// Says what a tag change did to each remote; a remote that could not be updated is an
/// error (exit 77: the change stands locally).
fn remote_report(r: &[crate::remote::RemoteTagUpdate], quiet: bool, what: &str) -> i32 {
    let mut code = 0;
    for x in r {
        match &x.result {
            Ok(true) if !quiet => println!("{what}: recorded on {}", x.remote),
            Ok(_) => {}
            Err(e) => {
                eprintln!(
                    "ckpt: error: {what} is NOT recorded on {}: {}; it stands locally (a running `ckpt run --remote` records it with its next upload); run the command again once the remote is reachable",
                    x.remote,
                    escape(e)
                );
                code = ErrKind::UploadFailed.code();
            }
        }
    }
    code
}

/// Remove a name (the checkpoint stays, and is again subject to retention).
#[derive(Debug, clap::Args)]
pub struct UntagArgs {
    #[command(flatten)]
    pub dir: DirArg,
    #[arg(value_name = "NAME")]
    pub name: String,
    #[arg(long)]
    pub json: bool,
}

pub fn untag(a: UntagArgs) -> Result<i32, Fatal> {
    let store = open(&a.dir.dir)?;
    let local = store
        .update_tags(|tags| Ok(tags.remove(&a.name)))
        .map_err(|e| Fatal::store("cannot untag", e))?;
    // Removed from the remotes' tag records too (also a name only they still hold: one made
    // on a machine since lost, or whose removal could not reach them then).
    let mut remote_seq = None;
    let remote = crate::remote::update_remembered_tags(&store, &mut |t| {
        if let Some(s) = t.remove(&a.name) {
            remote_seq = Some(s);
        }
    });
    let Some(seq) = local.or(remote_seq) else {
        let tags = store
            .tags()
            .map_err(|e| Fatal::store("cannot read tags", e))?;
        let errs: Vec<String> = remote
            .iter()
            .filter_map(|x| {
                x.result
                    .as_ref()
                    .err()
                    .map(|e| format!("{}: {e}", x.remote))
            })
            .collect();
        return Err(Fatal::new(
            if errs.is_empty() {
                ErrKind::Usage
            } else {
                ErrKind::UploadFailed
            },
            format!(
                "no tag {:?} in {}{}; tags: {}{}",
                a.name,
                store.dir().display(),
                if remote.is_empty() {
                    ""
                } else {
                    " nor on its remotes"
                },
                if tags.is_empty() {
                    "none".to_string()
                } else {
                    tags.iter()
                        .map(|(n, s)| format!("{n}={s}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                },
                if errs.is_empty() {
                    String::new()
                } else {
                    format!(" (not reachable: {})", escape(&errs.join("; ")))
                }
            ),
        ));
    };
    if a.json {
        println!(
            "{}",
            json!({ "tag": a.name, "seq": seq, "remote": remote_json(&remote) })
        );
    } else {
        println!("removed tag {} (checkpoint {seq} stays)", escape(&a.name));
    }
    Ok(remote_report(
        &remote,
        a.json,
        &format!("removing tag {}", escape(&a.name)),
    ))
}

/// Show one checkpoint: manifest, files, sizes, checksums, step, parent, metadata.
#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// ID, NAME, `latest` or `latest~N` (or DIR:REF).
    #[arg(value_name = "ID")]
    pub id: String,
    /// Also verify every file (reads all data).
    #[arg(long)]
    pub verify: bool,
    #[arg(long)]
    pub json: bool,
    /// Show a checkpoint of this remote instead (ID: a remote sequence number, a tag of the
    /// remote, `latest` or `latest~N`, counting only checkpoints that authenticate with our
    /// key). The manifest
    /// is shown only once its authentication record checks out (exit 65 otherwise);
    /// --verify downloads and checks every byte as a restore would.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    #[command(flatten)]
    pub remote_auth: super::RemoteAuth,
}

pub fn show(a: ShowArgs) -> Result<i32, Fatal> {
    let remote = a.remote_auth.open_opt(&a.remote)?;
    let (res, m, tags, verified) = match &remote {
        Some(r) => {
            let seq = resolve_remote(r, &a.id)?;
            let m = r.check(seq).map_err(|e| {
                Fatal::new(
                    ErrKind::Data,
                    format!(
                        "remote checkpoint {seq} on {} is NOT RESTORABLE: {}",
                        r.display,
                        crate::remote::redact(&e)
                    ),
                )
            })?;
            let verified = a.verify.then(|| {
                r.verify(seq)
                    .map(|_| ())
                    .map_err(|e| crate::remote::redact(&e))
            });
            let res = Resolved {
                seq,
                path: PathBuf::from(format!(
                    "{}/{}{seq:012}",
                    r.display.trim_end_matches('/'),
                    crate::store::PREFIX
                )),
            };
            // The remote's tag record (only an authentic one names anything).
            let tags = r
                .tags()
                .map(|t| t.valid())
                .unwrap_or_default()
                .into_iter()
                .filter(|(_, s)| *s == seq)
                .map(|(n, _)| n)
                .collect::<Vec<String>>();
            (res, m, tags, verified)
        }
        None => {
            let (store, res) = resolve_anywhere(&a.dir.dir, &a.id)?;
            let m = manifest_of(&res)?;
            let tags = store
                .tags_by_seq()
                .map_err(|e| Fatal::store("cannot read tags", e))?
                .remove(&res.seq)
                .unwrap_or_default();
            let verified = a.verify.then(|| {
                verify_path(&res.path, Some(res.seq))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            });
            (res, m, tags, verified)
        }
    };
    let files: Vec<Value> = m
        .files
        .iter()
        .map(|f| json!({ "name": f.name, "size": f.size, "sum": format!("{:08x}", f.sum) }))
        .collect();
    if a.json {
        let mut v = json!({
            "seq": res.seq, "path": dp(&res.path), "tags": tags, "step": m.step, "created_ms": m.created_ms,
            "writer": m.writer, "checksum": m.checksum.name(), "bytes": m.total_bytes(),
            "files": files, "meta": m.meta, "parent": m.meta.get("parent"),
        });
        if let Some(r) = &verified {
            v["verified"] = json!(r.is_ok());
            if let Err(e) = r {
                v["error"] = json!(e.to_string());
            }
        }
        if let Some(r) = &remote {
            v["remote"] = json!({ "url": r.display, "authenticated": true, "key_id": r.key_id() });
        }
        println!("{v}");
    } else {
        // Everything shown comes from the manifest (names, writer, metadata): escaped, so
        // that a hostile manifest cannot send terminal escape sequences.
        let mut out = String::new();
        macro_rules! println {
            ($($t:tt)*) => {{ out.push_str(&format!($($t)*)); out.push('\n'); }};
        }
        println!("checkpoint {} ({})", res.seq, dp(&res.path));
        if !tags.is_empty() {
            println!("  tags:     {}", tags.join(", "));
        }
        println!(
            "  step:     {}",
            m.step.map(|s| s.to_string()).unwrap_or_else(|| "-".into())
        );
        println!("  created:  {}", super::fmt_utc_ms(m.created_ms, true));
        println!("  writer:   {}", m.writer);
        if let Some(p) = m.meta.get("parent") {
            println!(
                "  parent:   checkpoint {} of {}{}",
                p["seq"],
                p["dir"].as_str().unwrap_or("?"),
                p["step"]
                    .as_u64()
                    .map(|s| format!(" (step {s})"))
                    .unwrap_or_default()
            );
        }
        if let Some(r) = &remote {
            println!(
                "  remote:   {}, authenticated (HMAC-SHA256 with one of our keys; signing key {})",
                r.display,
                r.key_id()
            );
        }
        if let Some(p) = m.meta.get("imported_from") {
            println!("  imported: from {}", p["path"].as_str().unwrap_or("?"));
        }
        let user: serde_json::Map<_, _> = m
            .meta
            .iter()
            .filter(|(k, _)| *k != "parent" && *k != "imported_from")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !user.is_empty() {
            println!("  meta:     {}", Value::Object(user));
        }
        println!(
            "  files:    {} ({}, {})",
            m.files.len(),
            fmt_bytes(m.total_bytes()),
            m.checksum.name()
        );
        for f in &m.files {
            println!("    {:>10}  {:08x}  {}", fmt_bytes(f.size), f.sum, f.name);
        }
        if let Some(r) = &verified {
            match r {
                Ok(_) => println!("  verified: ok"),
                Err(e) => println!("  verified: INVALID: {e}"),
            }
        }
        print!("{}", escape_lines(&out));
    }
    Ok(match verified {
        Some(Err(_)) => ErrKind::Data.code(),
        _ => 0,
    })
}

/// Which files differ between two checkpoints (added, removed, changed; sizes).
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// The first checkpoint: ID, NAME, `latest`, `latest~N`, or DIR:REF for another directory.
    #[arg(value_name = "A")]
    pub a: String,
    /// The second checkpoint, as A.
    #[arg(value_name = "B")]
    pub b: String,
    #[arg(long)]
    pub json: bool,
}

pub fn diff(a: DiffArgs) -> Result<i32, Fatal> {
    let (_, ra) = resolve_anywhere(&a.dir.dir, &a.a)?;
    let (_, rb) = resolve_anywhere(&a.dir.dir, &a.b)?;
    let (ma, mb) = (manifest_of(&ra)?, manifest_of(&rb)?);
    let mut rows = Vec::new();
    let (mut added, mut removed, mut changed, mut same) = (0, 0, 0, 0);
    for fa in &ma.files {
        match mb.files.iter().find(|f| f.name == fa.name) {
            None => {
                removed += 1;
                rows.push(json!({ "name": fa.name, "status": "removed", "size_a": fa.size }));
            }
            Some(fb) => {
                let equal = fa.size == fb.size
                    && if ma.checksum == mb.checksum {
                        fa.sum == fb.sum
                    } else {
                        // Different algorithms: checksum B's file the way A's was (only if
                        // no directory on its way is a planted symlink).
                        crate::store::scan::open_member(&rb.path, &fb.name).is_ok()
                            && crate::store::commit::checksum_file(
                                &rb.path.join(&fb.name),
                                ma.checksum,
                            )
                            .is_ok_and(|(_, s)| s == fa.sum)
                    };
                let status = if equal { "same" } else { "changed" };
                if equal {
                    same += 1;
                } else {
                    changed += 1;
                }
                rows.push(
                    json!({ "name": fa.name, "status": status, "size_a": fa.size, "size_b": fb.size }),
                );
            }
        }
    }
    for fb in &mb.files {
        if !ma.files.iter().any(|f| f.name == fb.name) {
            added += 1;
            rows.push(json!({ "name": fb.name, "status": "added", "size_b": fb.size }));
        }
    }
    if a.json {
        println!(
            "{}",
            json!({
                "a": { "seq": ra.seq, "path": dp(&ra.path), "step": ma.step },
                "b": { "seq": rb.seq, "path": dp(&rb.path), "step": mb.step },
                "files": rows, "added": added, "removed": removed, "changed": changed, "same": same,
            })
        );
        return Ok(0);
    }
    let sz = |v: &Value| v.as_u64().map(fmt_bytes).unwrap_or_else(|| "-".into());
    println!(
        "A: checkpoint {} (step {})  {}",
        ra.seq,
        ma.step.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
        dp(&ra.path)
    );
    println!(
        "B: checkpoint {} (step {})  {}",
        rb.seq,
        mb.step.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
        dp(&rb.path)
    );
    for r in &rows {
        if r["status"] == "same" {
            continue;
        }
        println!(
            "{:<8} {:>10} -> {:<10} {}",
            r["status"].as_str().unwrap_or(""),
            sz(&r["size_a"]),
            sz(&r["size_b"]),
            escape(r["name"].as_str().unwrap_or(""))
        );
    }
    println!("{changed} changed, {added} added, {removed} removed, {same} the same");
    Ok(0)
}

/// Copy a checkpoint out (verified, with its manifest) for deployment or archiving.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// ID, NAME, `latest` or `latest~N`.
    #[arg(value_name = "ID")]
    pub id: String,
    /// A new directory to create.
    #[arg(long, value_name = "PATH")]
    pub to: PathBuf,
    #[arg(long)]
    pub json: bool,
    /// Export a checkpoint of this remote instead (ID: a remote sequence number, a tag of the
    /// remote, `latest` or `latest~N`, counting only checkpoints that authenticate with our
    /// key): every byte
    /// is downloaded and checked as a restore would (exit 65 if it does not verify, and
    /// nothing is left at --to). `ckpt import` takes the result on any machine.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    #[command(flatten)]
    pub remote_auth: super::RemoteAuth,
}

/// `ckpt export --remote URL ID --to PATH`.
fn export_remote(a: &ExportArgs, r: &crate::remote::Remote) -> Result<i32, Fatal> {
    let seq = resolve_remote(r, &a.id)?;
    let t = std::time::Instant::now();
    let (m, bytes) = r.export(seq, &a.to).map_err(|e| {
        let e = crate::remote::redact(&e);
        let kind = if e.contains("already exists") {
            ErrKind::Usage
        } else if e.starts_with("cannot") || e.starts_with("write") || e.starts_with("fsync") {
            ErrKind::Io
        } else {
            ErrKind::Data
        };
        Fatal::new(
            kind,
            format!(
                "cannot export remote checkpoint {seq} from {}: {e}",
                r.display
            ),
        )
    })?;
    let to = std::path::absolute(&a.to).unwrap_or(a.to.clone());
    if a.json {
        println!(
            "{}",
            json!({ "seq": seq, "step": m.step, "to": dp(&to), "files": m.files.len(), "bytes": m.total_bytes(), "remote": r.display, "downloaded": bytes, "duration_ms": t.elapsed().as_millis() as u64 })
        );
    } else {
        println!(
            "exported remote checkpoint {seq} of {} ({} in {} files) to {}, authenticated and verified",
            r.display,
            fmt_bytes(m.total_bytes()),
            m.files.len(),
            dp(&to)
        );
    }
    Ok(0)
}

pub fn export(a: ExportArgs) -> Result<i32, Fatal> {
    if let Some(r) = a.remote_auth.open_opt(&a.remote)? {
        return export_remote(&a, &r);
    }
    let store = open(&a.dir.dir)?;
    let res = resolve(&store, &a.id)?;
    let m =
        crate::store::transfer::export_to(&res.path, Some(res.seq), &a.to, &crate::store::RealIo)
            .map_err(|e| Fatal::store(&format!("cannot export checkpoint {}", res.seq), e))?;
    let to = std::path::absolute(&a.to).unwrap_or(a.to.clone());
    if a.json {
        println!(
            "{}",
            json!({ "seq": res.seq, "step": m.step, "to": dp(&to), "files": m.files.len(), "bytes": m.total_bytes() })
        );
    } else {
        println!(
            "exported checkpoint {} ({} in {} files) to {}, verified",
            res.seq,
            fmt_bytes(m.total_bytes()),
            m.files.len(),
            dp(&to)
        );
    }
    Ok(0)
}

/// Bring an exported (or any) checkpoint directory back as a new checkpoint, verified.
#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// A checkpoint directory (with MANIFEST.ckpt), e.g. made by `ckpt export`.
    #[arg(value_name = "PATH")]
    pub path: PathBuf,
    /// Hard-link (or reflink) the files instead of copying them, where the file system allows.
    #[arg(long)]
    pub link: bool,
    #[arg(long)]
    pub json: bool,
    /// Also upload the imported checkpoint to this remote once it is committed locally
    /// (as `ckpt save --remote`): waits for the upload; if it fails the local checkpoint
    /// stays and ckpt exits 77. To bring a remote checkpoint here, `ckpt export --remote`
    /// it, then import the result.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    #[command(flatten)]
    pub remote_auth: super::RemoteAuth,
}

pub fn import(a: ImportArgs) -> Result<i32, Fatal> {
    let remote = a.remote_auth.open_opt(&a.remote)?;
    let store = Store::new(&a.dir.dir);
    let src = std::path::absolute(&a.path).unwrap_or(a.path.clone());
    let src_m = read_manifest(&src)
        .map_err(|e| Fatal::new(ErrKind::Data, format!("cannot import {}: {e}", dp(&src))))?;
    let mut extra = serde_json::Map::new();
    extra.insert(
        "imported_from".into(),
        json!({ "path": dp(&src), "seq": src_m.seq, "step": src_m.step, "created_ms": src_m.created_ms, "parent": src_m.meta.get("parent") }),
    );
    extra.insert("parent".into(), Value::Null);
    let imp = store
        .import_from(&src, None, extra, a.link)
        .map_err(|e| Fatal::store(&format!("cannot import {}", dp(&src)), e))?;
    if !a.json {
        println!(
            "imported {} as checkpoint {} ({} in {} files), verified",
            dp(&src),
            imp.manifest.seq,
            fmt_bytes(imp.manifest.total_bytes()),
            imp.manifest.files.len()
        );
    }
    let (up, code) = match &remote {
        Some(r) => {
            let (v, code) = upload_after(r, imp.manifest.seq, &imp.path, a.json);
            (Some(v), code)
        }
        None => (None, 0),
    };
    if a.json {
        let mut v = json!({ "seq": imp.manifest.seq, "step": imp.manifest.step, "path": dp(&imp.path), "linked": imp.linked, "reflinked": imp.reflinked, "copied": imp.copied });
        if let Some(up) = up {
            v["remote"] = up;
        }
        println!("{v}");
    }
    Ok(code)
}

/// Roll a directory back: checkpoints newer than ID go to rolled-back/ (never deleted), so
/// the next `ckpt run` resumes from ID. Refused while a supervisor runs on the directory.
/// The remotes DIR is uploaded to (`ckpt run --remote`, `ckpt upload`) are rolled back too:
/// their finished record and their checkpoints above ID are removed (exit 77 if a remote
/// cannot be).
#[derive(Debug, clap::Args)]
pub struct RollbackArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// ID, NAME, `latest~N`.
    #[arg(value_name = "ID")]
    pub id: String,
    #[arg(long)]
    pub json: bool,
}

pub fn rollback(a: RollbackArgs) -> Result<i32, Fatal> {
    let store = open(&a.dir.dir)?;
    store
        .create()
        .map_err(|e| Fatal::store("cannot prepare the directory", e))?;
    let _lock = crate::supervisor::lock::DirLock::acquire(&store, "ckpt rollback")
        .map_err(|e| Fatal::new(ErrKind::CantCreate, format!("cannot roll back: {e}")))?;
    let r = do_rollback(&store, &a.id)?;
    let moved: Vec<Value> = r
        .moved
        .iter()
        .map(|(s, p)| json!({ "seq": s, "to": dp(p) }))
        .collect();
    if a.json {
        println!(
            "{}",
            json!({ "seq": r.seq, "step": r.step, "moved": moved, "dangling_tags": r.dangling_tags,
                    "remote": r.remote.iter().map(|x| x.json()).collect::<Vec<_>>() })
        );
    } else {
        println!(
            "rolled back to checkpoint {}{}; {} newer checkpoint(s) set aside in {}",
            r.seq,
            r.step.map(|s| format!(" (step {s})")).unwrap_or_default(),
            r.moved.len(),
            dp(store.dir().join(ROLLED_BACK))
        );
        for t in &r.dangling_tags {
            eprintln!(
                "ckpt: warning: tag {} names a checkpoint now in rolled-back/; `ckpt import` it to use it again",
                escape(t)
            );
        }
        for x in &r.remote {
            if x.error.is_none() {
                println!("{}", x.human());
            }
        }
    }
    // A remote that could not be rolled back: said loudly, exit 77 (the local rollback stands).
    let mut code = 0;
    for x in r.remote.iter().filter(|x| x.error.is_some()) {
        eprintln!("ckpt: error: {}", escape(&x.human()));
        code = ErrKind::UploadFailed.code();
    }
    Ok(code)
}

/// What retention would remove, and leftovers (quarantine, staging, trash) older than an age.
#[derive(Debug, clap::Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Apply retention: keep the newest N checkpoints (tagged ones and the newest verified
    /// one are always kept).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..), value_name = "N")]
    pub keep: Option<u64>,
    /// With --keep, also keep the oldest checkpoint of each such period.
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub keep_every: Option<Duration>,
    /// Remove quarantined checkpoints, dead writers' staging and trash set aside longer ago
    /// than this.
    #[arg(long, default_value = "7d", value_parser = parse_duration, value_name = "DURATION")]
    pub older_than: Duration,
    /// Also remove rolled-back checkpoints older than --older-than.
    #[arg(long)]
    pub rolled_back: bool,
    /// Only show what would be removed.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
    /// Apply --keep to this remote instead (see `ckpt run --remote`): keeps the newest N
    /// checkpoints that authenticate with our key, and those tagged in --dir (if it exists)
    /// or in the remote's authenticated tag record; checkpoints that do not authenticate are
    /// listed, never removed.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    #[command(flatten)]
    pub remote_auth: super::RemoteAuth,
}

/// `ckpt gc --remote URL --keep N`.
fn gc_remote(a: &GcArgs, url: &str) -> Result<i32, Fatal> {
    let Some(keep) = a.keep else {
        return Err(Fatal::usage("ckpt gc --remote needs --keep N"));
    };
    let r = a.remote_auth.open(url)?;
    let store = Store::new(&a.dir.dir);
    let io_err = |e: String| Fatal::io(e);
    // Tagged here or in the remote's tag record: kept. A record that does not authenticate
    // protects nothing (else a planted one could keep anything forever).
    let mut tagged: std::collections::BTreeSet<u64> = if store.dir().is_dir() {
        store
            .tags()
            .map_err(|e| Fatal::store("cannot read the local tags", e))?
            .into_values()
            .collect()
    } else {
        Default::default()
    };
    let tags_invalid = match r.tags().map_err(io_err)? {
        crate::remote::RemoteTags::Invalid(why) => Some(why),
        t => {
            tagged.extend(t.valid().into_values());
            None
        }
    };
    let seqs = r.list().map_err(io_err)?;
    let listed = seqs.clone();
    let mut ours = Vec::new();
    let mut foreign = Vec::new();
    for s in seqs {
        match r.check(s) {
            Ok(_) => ours.push(s),
            Err(e) => foreign.push((s, e)),
        }
    }
    let cut = ours.len().saturating_sub(keep as usize);
    let doomed: Vec<u64> = ours[..cut]
        .iter()
        .copied()
        .filter(|s| !tagged.contains(s))
        .collect();
    // As `--remote-keep` does: objects of checkpoints that never got their manifest (an
    // upload cut short, a multi-rank checkpoint whose shards never all came), older than
    // every checkpoint kept, are invisible and never restorable: they go too.
    let oldest_kept = ours.get(cut).copied().unwrap_or(0);
    let leftovers: Vec<u64> = r
        .list_dirs()
        .map_err(io_err)?
        .into_iter()
        .filter(|s| *s < oldest_kept && !listed.contains(s) && !tagged.contains(s))
        .collect();
    let mut removed = Vec::new();
    let mut leftovers_removed = Vec::new();
    if !a.dry_run {
        for &s in &doomed {
            r.remove(s).map_err(io_err)?;
            removed.push(s);
        }
        for &s in &leftovers {
            r.remove(s).map_err(io_err)?;
            leftovers_removed.push(s);
        }
    }
    if a.json {
        println!(
            "{}",
            json!({ "remote": r.display, "tagged": tagged, "tags_invalid": tags_invalid, "removed": removed, "would_remove": if a.dry_run { doomed.clone() } else { vec![] }, "leftovers_removed": leftovers_removed, "would_remove_leftovers": if a.dry_run { leftovers.clone() } else { vec![] }, "kept": ours[cut..], "not_authentic": foreign.iter().map(|(s, e)| json!({ "seq": s, "reason": e })).collect::<Vec<_>>() })
        );
    } else {
        let verb = if a.dry_run { "would remove" } else { "removed" };
        let list = |v: &[u64]| {
            v.iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        if doomed.is_empty() && leftovers.is_empty() {
            eprintln!("nothing to remove on {}", r.display);
        }
        if !doomed.is_empty() {
            eprintln!(
                "{verb} remote checkpoint(s) {} from {}",
                list(&doomed),
                r.display
            );
        }
        if !leftovers.is_empty() {
            eprintln!(
                "{verb} manifest-less leftover(s) {} from {} (uploads cut short, older than every checkpoint kept)",
                list(&leftovers),
                r.display
            );
        }
        for (s, e) in &foreign {
            eprintln!(
                "left alone: remote checkpoint {s} does not authenticate with our key: {}",
                crate::store::escape(e)
            );
        }
        if let Some(why) = &tags_invalid {
            eprintln!(
                "ckpt: warning: the tag record on {} does not authenticate ({}); ignored: it protects nothing",
                r.display,
                crate::store::escape(why)
            );
        }
    }
    Ok(0)
}

pub fn gc(a: GcArgs) -> Result<i32, Fatal> {
    if let Some(url) = a.remote.clone().filter(|u| !u.is_empty()) {
        return gc_remote(&a, &url);
    }
    let store = open(&a.dir.dir)?;
    // Everything below lists and deletes under DIR/.ckpt: never through a planted symlink.
    store
        .check_private()
        .map_err(|e| Fatal::store("refusing to collect garbage", e))?;
    let mut retention: Vec<(u64, PathBuf)> = Vec::new();
    if let Some(keep) = a.keep {
        let newest = store
            .latest_verified(false, |_| {})
            .map_err(|e| Fatal::store("cannot scan checkpoints", e))?;
        let protect: Vec<u64> = newest.iter().map(|f| f.seq).collect();
        retention = store
            .prune_plan(keep as usize, a.keep_every, &protect)
            .map_err(|e| Fatal::store("cannot plan retention", e))?;
        if !a.dry_run {
            let gone = store
                .prune(keep as usize, a.keep_every, &protect)
                .map_err(|e| Fatal::store("retention failed", e))?;
            retention.retain(|(s, _)| gone.contains(s));
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let mut leftovers: Vec<(String, PathBuf, i64)> = Vec::new();
    let mut places = vec![
        ("quarantine", store.dir().join(QUARANTINE)),
        ("staging", store.dir().join(PRIVATE).join("staging")),
        ("trash", store.dir().join(PRIVATE).join("trash")),
    ];
    if a.rolled_back {
        places.push(("rolled-back", store.dir().join(ROLLED_BACK)));
    }
    for (kind, d) in places {
        if !std::fs::symlink_metadata(&d).is_ok_and(|m| m.is_dir()) {
            continue;
        }
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for ent in rd.flatten() {
            let Ok(md) = std::fs::symlink_metadata(ent.path()) else {
                continue;
            };
            // ctime: when it was moved here (a rename updates it), not when it was written.
            let age = now - md.ctime().max(md.mtime());
            if age < a.older_than.as_secs() as i64 {
                continue;
            }
            if kind == "staging" {
                let pid = ent
                    .file_name()
                    .to_str()
                    .and_then(|s| s.split('.').next_back())
                    .and_then(|p| p.parse::<i32>().ok());
                if pid.is_some_and(crate::store::pid_alive) {
                    continue;
                }
            }
            leftovers.push((kind.to_string(), ent.path(), age));
        }
    }
    leftovers.sort();
    let mut removed = 0;
    if !a.dry_run {
        for (_, p, _) in &leftovers {
            let r = if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()) {
                std::fs::remove_dir_all(p)
            } else {
                std::fs::remove_file(p)
            };
            match r {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(Fatal::new(
                        ErrKind::Io,
                        format!("cannot remove {}: {e}", p.display()),
                    ))
                }
            }
        }
    }
    if a.json {
        println!(
            "{}",
            json!({
                "dry_run": a.dry_run,
                "retention": retention.iter().map(|(s, p)| json!({ "seq": s, "path": dp(p) })).collect::<Vec<_>>(),
                "leftovers": leftovers.iter().map(|(k, p, age)| json!({ "kind": k, "path": dp(p), "age_s": age })).collect::<Vec<_>>(),
                "removed_leftovers": removed,
            })
        );
        return Ok(0);
    }
    let verb = if a.dry_run { "would remove" } else { "removed" };
    if a.keep.is_some() {
        let seqs: Vec<u64> = retention.iter().map(|(s, _)| *s).collect();
        println!("retention: {verb} checkpoint(s) {seqs:?}");
    }
    for (k, p, age) in &leftovers {
        println!(
            "{verb} {k} {} (set aside {} ago)",
            dp(p),
            humantime::format_duration(Duration::from_secs(*age as u64))
        );
    }
    if leftovers.is_empty() {
        println!(
            "no quarantine, staging or trash leftovers older than {}",
            humantime::format_duration(a.older_than)
        );
    }
    Ok(0)
}
