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
/// uploaded, each claimed first in DIR so that no two nodes upload the same shard (a claim
/// whose uploader died is taken over once its lease, CKPT_UPLOAD_LEASE, default 2m, ran
/// out); the remote manifest, the remote commit record, is written by whichever node finds
/// every shard up. Run `ckpt upload --follow --ranks R` on every node of the job (R: its ranks)
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
    /// Keep watching DIR and upload each new checkpoint (this node's part of it), and
    /// finish older ones whose remote manifest is not written yet, until the job finished
    /// (DIR/.ckpt/finished) or SIGTERM/SIGINT.
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
                    "ckpt: checkpoint {seq} (world size {}): uploaded the shard(s) of rank(s) {:?} to {} ({} in {:.2}s){}{}; {}",
                    up.world,
                    up.uploaded,
                    r.display,
                    fmt_bytes(up.bytes),
                    ms as f64 / 1000.0,
                    if up.taken_over.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; took over: {}",
                            up.taken_over
                                .iter()
                                .map(|(k, w)| format!("rank {k} from {w}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    },
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
                        "taken_over": up.taken_over.iter().map(|(k, w)| json!({ "rank": k, "from": w })).collect::<Vec<_>>(),
                        "absent": up.absent,
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
    let r = a.remote_auth.open(&a.remote)?;
    let store = super::versions::open(&a.dir.dir)?;
    // So that `ckpt rollback` on DIR rolls this remote back too.
    crate::remote::remember(&a.remote_auth.settings(&a.remote), &store);
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
    // The checkpoints handled whose remote manifest is not written yet (the other nodes'
    // shards are not all up, or a shard's uploader died: its claim is taken over once its
    // lease runs out), with when each was last looked at: the newest at every poll, older
    // ones now and then, while they are still in DIR. At start, every local multi-rank
    // checkpoint above the newest remote one, and those an uploader of DIR claimed a shard of (an
    // uploader killed mid-upload is finished by the next one).
    let mut open: std::collections::BTreeMap<u64, Option<Instant>> = Default::default();
    let mut newest_handled: Option<u64> = None;
    let relook = (crate::remote::claim_lease() / 2).min(Duration::from_secs(5));
    let finished = store.private().join("finished");
    let list = |store: &Store| {
        store
            .list()
            .map_err(|e| Fatal::io(format!("cannot list {}: {e}", dp(store.dir()))))
    };
    {
        let claims = crate::remote::claims_dir(&store);
        let tag = r.claim_tag();
        let claimed: std::collections::BTreeSet<u64> = std::fs::read_dir(&claims)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_str()?.to_string();
                        n.ends_with(&format!(".{tag}"))
                            .then(|| crate::store::parse_seq(n.split('.').next()?, false))?
                    })
                    .collect()
            })
            .unwrap_or_default();
        let local = list(&store)?;
        let remote_newest = r.list().ok().and_then(|l| l.last().copied());
        for (seq, path) in &local {
            let behind = claimed.contains(seq) || remote_newest.is_none_or(|n| *seq > n);
            if behind && crate::remote::is_multi_rank(path) {
                open.insert(*seq, None);
            }
        }
    }
    loop {
        let done = std::fs::symlink_metadata(&finished).is_ok();
        let local = list(&store)?;
        if let Some((seq, _)) = local.last() {
            if newest_handled.is_none_or(|h| h < *seq) {
                newest_handled = Some(*seq);
                open.insert(*seq, None);
            }
        }
        let newest = newest_handled;
        let seqs: Vec<u64> = open.keys().rev().copied().collect();
        for seq in seqs {
            let Some(path) = local
                .iter()
                .find(|(s, _)| *s == seq)
                .map(|(_, p)| p.clone())
            else {
                open.remove(&seq);
                continue;
            };
            let last = open[&seq];
            let due = Some(seq) == newest || last.is_none_or(|t| t.elapsed() >= relook);
            if !due {
                continue;
            }
            let (v, _, published) = upload_one(&a, &r, &store, seq, &path);
            if a.json && (last.is_none() || published) {
                println!("{v}");
            }
            if published {
                open.remove(&seq);
            } else {
                open.insert(seq, Some(Instant::now()));
            }
        }
        let newest_open = newest.is_some_and(|n| open.contains_key(&n));
        if STOP.load(Ordering::SeqCst) || (done && !newest_open) {
            return Ok(0);
        }
        if done {
            // The job finished: this node's part of the last checkpoint is up; the other
            // nodes may still be uploading theirs. One more look, then exit.
            std::thread::sleep(a.poll);
            if let Some(seq) = newest {
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
