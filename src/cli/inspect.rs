//! `ckpt list` and `ckpt verify`: read-only views of a directory.

use serde_json::json;

use super::DirArg;
use crate::exit::ErrKind;
use crate::store::scan::{read_manifest, verify_path};
use crate::store::{display_path, escape, Store};
use crate::supervisor::{fmt_bytes, Fatal};

/// List checkpoints, newest last.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// One JSON object per checkpoint, as a JSON array on stdout.
    #[arg(long)]
    pub json: bool,
    /// List the checkpoints of this remote instead (s3://, gs://, az://, file://; see
    /// `ckpt run --remote`), each with whether its authentication record checks out with
    /// our key (files are not downloaded).
    #[arg(long, env = "CKPT_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    #[command(flatten)]
    pub remote_auth: super::RemoteAuth,
}

/// Verify checkpoints fully.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// Print a JSON array of results on stdout.
    #[arg(long)]
    pub json: bool,
    /// Checkpoints (default: all): IDs, names (tags), `latest` or `latest~N`. With
    /// --remote: remote sequence numbers.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Verify the checkpoints of this remote instead, as a restore would (every byte is
    /// downloaded and checked against the authenticated record; nothing is written).
    #[arg(long, env = "CKPT_REMOTE", value_name = "URL")]
    pub remote: Option<String>,
    #[command(flatten)]
    pub remote_auth: super::RemoteAuth,
}

/// `ckpt verify --remote URL [SEQ...]`.
fn verify_remote(a: &VerifyArgs, url: &str) -> Result<i32, Fatal> {
    let r = a.remote_auth.open(url)?;
    let seqs: Vec<u64> = if a.ids.is_empty() {
        r.list().map_err(Fatal::io)?
    } else {
        a.ids
            .iter()
            .map(|i| {
                i.parse().map_err(|_| {
                    Fatal::usage(format!(
                        "{i:?}: with --remote, give remote sequence numbers"
                    ))
                })
            })
            .collect::<Result<_, _>>()?
    };
    let mut bad = 0;
    let mut rows = Vec::new();
    for seq in &seqs {
        match r.verify(*seq) {
            Ok((m, bytes)) => {
                if !a.json {
                    println!(
                        "ok       {seq:>8}  {} in {} files",
                        fmt_bytes(bytes),
                        m.files.len()
                    );
                }
                rows.push(
                    json!({ "seq": seq, "ok": true, "bytes": bytes, "files": m.files.len() }),
                );
            }
            Err(e) => {
                bad += 1;
                if !a.json {
                    println!("INVALID  {seq:>8}  {}", escape(&e));
                }
                rows.push(json!({ "seq": seq, "ok": false, "error": e }));
            }
        }
    }
    if a.json {
        println!("{}", serde_json::Value::Array(rows));
    } else if seqs.is_empty() {
        eprintln!("no checkpoints on {}", r.display);
    } else {
        eprintln!(
            "{} remote checkpoint(s) verified, {} invalid",
            seqs.len() - bad,
            bad
        );
    }
    Ok(if bad > 0 { ErrKind::Data.code() } else { 0 })
}

fn open(dir: &DirArg) -> Result<Store, Fatal> {
    let store = Store::new(&dir.dir);
    if !store.dir().is_dir() {
        return Err(Fatal::usage(format!(
            "{} is not a directory; hint: give the checkpoint directory with --dir or CKPT_DIR",
            display_path(store.dir())
        )));
    }
    Ok(store)
}

fn when(ms: u64) -> String {
    super::fmt_utc_ms(ms, false)
}

fn tag_text(v: &serde_json::Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

/// `ckpt list --remote URL`.
fn list_remote(a: &ListArgs, url: &str) -> Result<i32, Fatal> {
    let r = a.remote_auth.open(url)?;
    let seqs = r.list().map_err(Fatal::io)?;
    // The remote's tag record (only an authentic one names anything).
    let mut tags: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
    match r.tags() {
        Ok(crate::remote::RemoteTags::Invalid(why)) => eprintln!(
            "ckpt: warning: the tag record on {} does not authenticate ({}); ignored",
            r.display,
            escape(&why)
        ),
        Ok(t) => {
            for (n, s) in t.valid() {
                tags.entry(s).or_default().push(n);
            }
        }
        Err(e) => eprintln!(
            "ckpt: warning: cannot read the tag record on {}: {}",
            r.display,
            escape(&e)
        ),
    }
    let rows: Vec<serde_json::Value> = seqs
        .iter()
        .map(|&seq| {
            let t = tags.remove(&seq).unwrap_or_default();
            match r.check(seq) {
                Ok(m) => json!({ "seq": seq, "step": m.step, "created_ms": m.created_ms, "bytes": m.total_bytes(), "files": m.files.len(), "writer": m.writer, "authentic": true, "tags": t }),
                Err(e) => json!({ "seq": seq, "authentic": false, "error": e, "tags": t }),
            }
        })
        .collect();
    if a.json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(0);
    }
    if rows.is_empty() {
        eprintln!("no checkpoints on {}", r.display);
        return Ok(0);
    }
    println!("{}  TAGS", header_columns());
    for row in rows {
        if row["authentic"] == json!(true) {
            println!(
                "{}  {}",
                manifest_columns(&row),
                escape(&tag_text(&row["tags"]))
            );
        } else {
            println!(
                "{:>8}  NOT RESTORABLE: {}  {}",
                row["seq"].to_string(),
                escape(row["error"].as_str().unwrap_or("")),
                escape(&tag_text(&row["tags"]))
            );
        }
    }
    Ok(0)
}

/// The header of the columns every listing shares.
fn header_columns() -> String {
    format!(
        "{:>8}  {:>10}  {:<20}  {:>10}  {:>5}  {:<16}",
        "SEQ", "STEP", "CREATED (UTC)", "SIZE", "FILES", "WRITER"
    )
}

/// One checkpoint's shared columns (`seq`, `step`, `created_ms`, `bytes`, `files`, `writer`).
fn manifest_columns(r: &serde_json::Value) -> String {
    format!(
        "{:>8}  {:>10}  {:<20}  {:>10}  {:>5}  {:<16}",
        r["seq"].to_string(),
        r["step"]
            .as_u64()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "-".into()),
        when(r["created_ms"].as_u64().unwrap_or(0)),
        fmt_bytes(r["bytes"].as_u64().unwrap_or(0)),
        r["files"].to_string(),
        escape(r["writer"].as_str().unwrap_or(""))
    )
}

pub fn list(a: ListArgs) -> Result<i32, Fatal> {
    if let Some(url) = a.remote.clone().filter(|u| !u.is_empty()) {
        return list_remote(&a, &url);
    }
    let store = open(&a.dir)?;
    let list = store.list().map_err(|e| Fatal::io(e.to_string()))?;
    let mut tags = store.tags_by_seq().map_err(|e| Fatal::io(e.to_string()))?;
    let mut rows = Vec::new();
    for (seq, path) in &list {
        let t = tags.remove(seq).unwrap_or_default();
        rows.push(match read_manifest(path) {
            Ok(m) => json!({ "seq": seq, "step": m.step, "created_ms": m.created_ms, "bytes": m.total_bytes(), "files": m.files.len(), "writer": m.writer, "path": display_path(path), "manifest_ok": true, "tags": t, "parent": m.meta.get("parent") }),
            Err(e) => json!({ "seq": seq, "path": display_path(path), "manifest_ok": false, "error": e.to_string(), "tags": t }),
        });
    }
    if a.json {
        println!("{}", serde_json::Value::Array(rows));
        return Ok(0);
    }
    if rows.is_empty() {
        eprintln!("no checkpoints in {}", display_path(store.dir()));
        return Ok(0);
    }
    println!("{}  TAGS", header_columns());
    for r in rows {
        if r["manifest_ok"] == json!(true) {
            println!(
                "{}  {}",
                manifest_columns(&r),
                escape(&tag_text(&r["tags"]))
            );
        } else {
            println!(
                "{:>8}  INVALID: {}  {}",
                r["seq"].to_string(),
                escape(r["error"].as_str().unwrap_or("")),
                escape(&tag_text(&r["tags"]))
            );
        }
    }
    Ok(0)
}

pub fn verify(a: VerifyArgs) -> Result<i32, Fatal> {
    if let Some(url) = a.remote.clone().filter(|u| !u.is_empty()) {
        return verify_remote(&a, &url);
    }
    let store = open(&a.dir)?;
    let list = store.list().map_err(|e| Fatal::io(e.to_string()))?;
    let mut targets = Vec::new();
    if a.ids.is_empty() {
        targets = list.clone();
    } else {
        for id in &a.ids {
            let r = super::versions::resolve(&store, id)?;
            targets.push((r.seq, r.path));
        }
    }
    let mut bad = 0;
    let mut rows = Vec::new();
    for (seq, path) in &targets {
        match verify_path(path, Some(*seq)) {
            Ok(m) => {
                if !a.json {
                    println!(
                        "ok       {seq:>8}  {} in {} files",
                        fmt_bytes(m.total_bytes()),
                        m.files.len()
                    );
                }
                rows.push(json!({ "seq": seq, "ok": true, "bytes": m.total_bytes(), "files": m.files.len() }));
            }
            Err(e) => {
                bad += 1;
                if !a.json {
                    println!(
                        "INVALID  {seq:>8}  {}: {}",
                        display_path(path),
                        escape(&e.to_string())
                    );
                }
                rows.push(json!({ "seq": seq, "ok": false, "error": e.to_string(), "reason": e.slug(), "path": display_path(path) }));
            }
        }
    }
    if a.json {
        println!("{}", serde_json::Value::Array(rows));
    } else if targets.is_empty() {
        eprintln!("no checkpoints in {}", display_path(store.dir()));
    } else {
        eprintln!(
            "{} checkpoint(s) verified, {} invalid",
            targets.len() - bad,
            bad
        );
    }
    Ok(if bad > 0 { ErrKind::Data.code() } else { 0 })
}
