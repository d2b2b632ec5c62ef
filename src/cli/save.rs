//! `ckpt save`: the shell client.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::DirArg;
use crate::exit::ErrKind;
use crate::protocol::{self, Message, PROTOCOL_VERSION};
use crate::store::{display_path, Algo, Stage, Store};
use crate::supervisor::{fmt_bytes, Fatal};

/// Publish files as a new checkpoint.
///
/// Each FILE is stored under its base name (a directory with its tree), and the command
/// returns only once the checkpoint is durable. Under `ckpt run` (CKPT_DIR and CKPT_SOCKET
/// set) the supervisor is told; a job resumes with `cp "$CKPT_RESTORE/FILE" .`.
#[derive(Debug, clap::Args)]
pub struct SaveArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// The job's step counter, recorded in the manifest.
    #[arg(long, value_name = "N")]
    pub step: Option<u64>,
    /// User metadata KEY=VALUE (repeatable), stored in the manifest's `meta`.
    #[arg(long, value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Print the result as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// Also upload the checkpoint to this remote (s3://, gs://, az://, file://; see `ckpt run
    /// --remote`) once it is durable locally, and wait for the upload. If the upload fails
    /// the local checkpoint stays and ckpt exits 77. Not taken from CKPT_REMOTE: under `ckpt
    /// run --remote` the supervisor already uploads every commit in the background.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    #[command(flatten)]
    pub remote_auth: super::RemoteAuth,
    /// Files or directories to save.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

/// Adds `src` under `name`: a regular file, or a directory with its tree. `top` is a path
/// the user named (a symlink there is followed: the user chose it); inside a saved
/// directory nothing is followed: a symlink is refused naming it (it could lead anywhere,
/// e.g. to /etc/shadow), and so is a FIFO, socket or device, and a name that is not UTF-8.
fn add(stage: &mut Stage, name: &str, src: &Path, top: bool) -> Result<u64, Fatal> {
    let shown = display_path(src);
    let meta = if top {
        std::fs::metadata(src)
    } else {
        std::fs::symlink_metadata(src)
    }
    .map_err(|e| Fatal::new(ErrKind::Usage, format!("cannot read {shown}: {e}")))?;
    if meta.is_symlink() {
        return Err(Fatal::new(ErrKind::Usage, format!("{shown} is a symlink; ckpt save does not follow links inside a saved directory; hint: replace it by the file itself, or save its target separately"),
        ));
    }
    if meta.is_dir() {
        let mut total = 0;
        let rd = std::fs::read_dir(src)
            .map_err(|e| Fatal::new(ErrKind::Io, format!("cannot list {shown}: {e}")))?;
        for ent in rd {
            let ent =
                ent.map_err(|e| Fatal::new(ErrKind::Io, format!("cannot list {shown}: {e}")))?;
            let fname = ent.file_name();
            let Some(fname) = fname.to_str() else {
                return Err(Fatal::new(ErrKind::Usage, format!(
                        "{} has a file name that is not valid UTF-8; checkpoint file names are UTF-8 text; hint: rename it",
                        display_path(ent.path())
                    ),
                ));
            };
            let child = format!("{name}/{fname}");
            total += add(stage, &child, &ent.path(), false)?;
        }
        Ok(total)
    } else if meta.is_file() {
        // A symlink the user named on the command line: copy what it points to.
        let real = if top {
            src.canonicalize()
                .map_err(|e| Fatal::new(ErrKind::Usage, format!("cannot read {shown}: {e}")))?
        } else {
            src.to_path_buf()
        };
        stage
            .copy_from(name, &real)
            .map_err(|e| Fatal::new(ErrKind::Io, e.to_string()))
    } else {
        Err(Fatal::new(
            ErrKind::Usage,
            format!("{shown} is not a regular file or directory (a FIFO, socket or device)"),
        ))
    }
}

pub fn run(a: SaveArgs) -> Result<i32, Fatal> {
    let started = std::time::Instant::now();
    let mut meta = serde_json::Map::new();
    for kv in &a.meta {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            Fatal::new(ErrKind::Usage, format!("--meta {kv:?}: expected KEY=VALUE"))
        })?;
        meta.insert(k.to_string(), json!(v));
    }
    // Opened before anything is written: a bad URL or key fails without a checkpoint.
    let remote = a.remote_auth.open_opt(&a.remote)?;
    let store = Store::new(&a.dir.dir);
    store
        .create()
        .map_err(|e| Fatal::new(ErrKind::CantCreate, e.to_string()))?;
    let mut stage = Stage::new(&store, Algo::Crc32c)
        .map_err(|e| Fatal::new(ErrKind::CantCreate, e.to_string()))?;
    let mut names = std::collections::HashSet::new();
    for f in &a.files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| *n != "." && *n != "..")
            .ok_or_else(|| Fatal::new(ErrKind::Usage, format!("{}: cannot tell the file's name, or it is not valid UTF-8; hint: give a path that ends in a UTF-8 file name", display_path(f))))?
            .to_string();
        if !names.insert(name.clone()) {
            return Err(Fatal::new(ErrKind::Usage, format!("two files are both named {name:?}; checkpoint files are stored under their base names")));
        }
        add(&mut stage, &name, f, true)?;
    }
    let m = stage
        .commit(
            a.step,
            concat!("ckpt-save/", env!("CARGO_PKG_VERSION")),
            meta,
        )
        .map_err(|e| Fatal::new(ErrKind::Io, format!("save failed: {e}")))?;
    let dur = started.elapsed();
    if let Some(sock) = std::env::var_os(protocol::ENV_SOCKET).filter(|s| !s.is_empty()) {
        if let Ok(s) = std::os::unix::net::UnixDatagram::unbound() {
            let msg = Message::Committed {
                v: PROTOCOL_VERSION,
                pid: std::os::unix::process::parent_id(),
                seq: m.seq,
                step: m.step,
                bytes: m.total_bytes(),
                duration_ms: dur.as_millis() as u64,
                blocked_ms: None,
            };
            let _ = s.send_to(&msg.encode(), PathBuf::from(sock));
        }
    }
    let path = store.path_of(m.seq);
    if !a.json {
        eprintln!(
            "ckpt: saved checkpoint {} ({}, {} files) to {}",
            m.seq,
            fmt_bytes(m.total_bytes()),
            m.files.len(),
            display_path(&path)
        );
    }
    let (up, code) = match &remote {
        Some(r) => {
            let (v, code) = super::versions::upload_after(r, m.seq, &path, a.json);
            (Some(v), code)
        }
        None => (None, 0),
    };
    if a.json {
        let mut v = json!({ "seq": m.seq, "step": m.step, "path": display_path(&path), "bytes": m.total_bytes(), "files": m.files.len(), "duration_ms": dur.as_millis() as u64 });
        if let Some(up) = up {
            v["remote"] = up;
        }
        println!("{v}");
    }
    Ok(code)
}
