//! `ckpt upload`: copy local checkpoints to a remote by hand, and the per-node uploader of a
//! multi-rank job (docs/cloud.md, "Multi-rank jobs").

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{parse_duration, DirArg};
use crate::exit::ErrKind;
use crate::remote::{Publish, Remote};
use crate::store::{display_path as dp, escape, Store};
use crate::supervisor::{fmt_bytes, Fatal};

/// Upload a checkpoint of DIR to a remote; for a multi-rank job, this node's shards.
///
/// A single-process checkpoint is uploaded whole (as `ckpt run --remote` does after each
/// commit). Of a multi-rank checkpoint, only the shards of --ranks (this node's ranks) are
/// uploaded, each claimed first in DIR so that no two nodes upload the same shard; the
/// remote manifest, the remote commit record, is written by whichever node finds every
/// shard up. Run `ckpt upload --follow --ranks R` on every node of the job (R: its ranks)
/// next to `ckpt run --remote URL --remote-ranks R0` on the supervisor's node.
#[derive(Debug, clap::Args)]
pub struct UploadArgs {
    #[command(flatten)]
    pub dir: DirArg,
    /// The checkpoint: ID, NAME, `latest` or `latest~N` (ignored with --follow).
    #[arg(value_name = "ID", default_value = "latest")]
    pub id: String,
    /// The remote: s3://bucket/prefix, gs://..., az://container/prefix, file:///path.
    #[arg(long, env = "CKPT_REMOTE", value_name = "URL")]
    pub remote: String,
    #[command(flatten)]
    pub remote_auth: super::RemoteAuth,
    /// Of a multi-rank checkpoint, upload only these ranks' shards (e.g. `4-7`, this
    /// node's ranks). Default: every shard no other node claimed.
    #[arg(long, value_parser = crate::remote::parse_rank_set, value_name = "RANKS")]
    pub ranks: Option<crate::remote::Ranks>,
    /// Keep watching DIR and upload each new checkpoint (this node's part of it) until the
    /// job finished (DIR/.ckpt/finished) or SIGTERM/SIGINT.
    #[arg(long)]
    pub follow: bool,
    /// With --follow: how often DIR is looked at.
    #[arg(long, default_value = "500ms", value_parser = parse_duration, value_name = "DURATION")]
    pub poll: Duration,
    /// One JSON object per checkpoint handled, on stdout.
    #[arg(long)]
    pub json: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// One checkpoint: what was uploaded, and whether the remote manifest is written. The exit
/// code is 77 when the upload failed.
fn upload_one(
    a: &UploadArgs,
    r: &Remote,
    store: &Store,
    seq: u64,
    path: &std::path::Path,
) -> (Value, i32, bool) {
    let t = Instant::now();
    if !crate::remote::is_multi_rank(path) {
        let (v, code) = super::versions::upload_after(r, seq, path, a.json);
        let done = code == 0;
        return (
            json!({ "seq": seq, "remote": v, "published": done }),
            code,
            done,
        );
    }
    let ranks = a.ranks.as_ref().map(|r| r.0.as_slice());
    let claims = crate::remote::claims_dir(store);
    let res = crate::remote::upload_node_shards(r, seq, path, &claims, ranks)
        .and_then(|up| r.publish_shards(seq, path).map(|p| (up, p)));
    match res {
        Ok((up, publish)) => {
            let ms = t.elapsed().as_millis() as u64;
            let (published, missing) = match &publish {
                Publish::Done(_) => (true, Vec::new()),
                Publish::Missing(m) => (false, m.clone()),
            };
            if !a.json {
                eprintln!(
                    "ckpt: checkpoint {seq} (world size {}): uploaded the shard(s) of rank(s) {:?} to {} ({} in {:.2}s){}; {}",
                    up.world,
                    up.uploaded,
                    r.display,
                    fmt_bytes(up.bytes),
                    ms as f64 / 1000.0,
                    if up.others.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; left to other uploaders: {}",
                            up.others
                                .iter()
                                .map(|(k, h)| format!("rank {k} ({})", escape(h)))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
                    if published {
                        "every shard is up: the remote manifest is written".to_string()
                    } else {
                        format!(
                            "the remote manifest waits for the shard(s) of rank(s) {missing:?}"
                        )
                    }
                );
            }
            (
                json!({ "seq": seq, "world": up.world, "uploaded": up.uploaded, "bytes": up.bytes, "duration_ms": ms,
                        "others": up.others.iter().map(|(k, h)| json!({ "rank": k, "holder": h })).collect::<Vec<_>>(),
                        "published": published, "missing": missing, "remote": r.display }),
                0,
                published,
            )
        }
        Err(e) => {
            let e = crate::remote::redact(&e);
            eprintln!(
                "ckpt: error: the upload of checkpoint {seq} ({}) to {} failed: {}",
                dp(path),
                r.display,
                escape(&e)
            );
            (
                json!({ "seq": seq, "error": e, "published": false, "remote": r.display }),
                ErrKind::UploadFailed.code(),
                false,
            )
        }
    }
}

pub fn run(a: UploadArgs) -> Result<i32, Fatal> {
    let r = super::inspect::open_remote(&a.remote, &a.remote_auth.keys, a.remote_auth.allow_http)?;
    let store = super::versions::open(&a.dir.dir)?;
    if !a.follow {
        let res = super::versions::resolve(&store, &a.id)?;
        let (v, code, _) = upload_one(&a, &r, &store, res.seq, &res.path);
        if a.json {
            println!("{v}");
        }
        return Ok(code);
    }
    for s in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(s, on_stop as *const () as libc::sighandler_t) };
    }
    // The newest checkpoint handled, and whether its remote manifest is written (else this
    // node looks again: the last shard's node may be this one's).
    let mut handled: Option<(u64, bool)> = None;
    let finished = store.private().join("finished");
    loop {
        let done = std::fs::symlink_metadata(&finished).is_ok();
        let newest = store
            .list()
            .map_err(|e| Fatal::io(format!("cannot list {}: {e}", dp(store.dir()))))?
            .last()
            .map(|(s, p)| (*s, p.clone()));
        if let Some((seq, path)) = newest {
            let again = match handled {
                Some((h, published)) => h < seq || (h == seq && !published),
                None => true,
            };
            if again {
                let first = handled.is_none_or(|(h, _)| h < seq);
                let (v, _, published) = upload_one(&a, &r, &store, seq, &path);
                if a.json && (first || published) {
                    println!("{v}");
                }
                handled = Some((seq, published));
            }
        }
        if STOP.load(Ordering::SeqCst) || (done && handled.is_none_or(|(_, p)| p)) {
            return Ok(0);
        }
        if done {
            // The job finished: this node's part of the last checkpoint is up; the other
            // nodes may still be uploading theirs. One more look, then exit.
            std::thread::sleep(a.poll);
            if let Some((seq, false)) = handled {
                if let Ok(res) = store.resolve(&seq.to_string()) {
                    let (v, _, _) = upload_one(&a, &r, &store, seq, &res.path);
                    if a.json {
                        println!("{v}");
                    }
                }
            }
            return Ok(0);
        }
        std::thread::sleep(a.poll);
    }
}
