//! Names for checkpoints (tags) and the one resolver of checkpoint references.
//!
//! Tags live in `DIR/.ckpt/tags.json`: `{"version":1,"tags":{"NAME":SEQ,...}}`, replaced as a
//! whole (write a new file, fsync, rename over, fsync the directory), read-modify-write under
//! an `flock` on `DIR/.ckpt/tags.lock`. Retention ([`Store::prune`]) never removes a tagged
//! checkpoint: it reads this file itself, so every caller (supervisor, standalone client,
//! `ckpt gc`) is covered.
//!
//! A reference (`REF`) names a checkpoint of one directory: a sequence number (`42`), a tag
//! (`base`), `latest` (the newest published one) or `latest~N` (the N-th before it).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use super::{token, Store};
use crate::error::{Error, IoContext, Result};

/// The tag file, inside `DIR/.ckpt`.
pub const TAGS_FILE: &str = "tags.json";

/// Checks a tag name: 1..=100 bytes of `[A-Za-z0-9._+-]`, not starting with `.` or `-`, not
/// all digits (that is an id), not `latest` or `latest~N`.
pub fn check_tag_name(name: &str) -> std::result::Result<(), String> {
    let bad = |why: &str| Err(format!("{name:?} cannot be a tag name: {why}"));
    if name.is_empty() || name.len() > 100 {
        return bad("it must be 1 to 100 characters long");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
    {
        return bad("only letters, digits, `.`, `_`, `+` and `-` are allowed (no `/`, `:` or `~`)");
    }
    if name.starts_with('.') || name.starts_with('-') {
        return bad("it may not start with `.` or `-`");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return bad("all digits would read as a checkpoint id");
    }
    if name == "latest" {
        return bad("`latest` always means the newest checkpoint");
    }
    Ok(())
}

/// A reference resolved to a published checkpoint.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub seq: u64,
    pub path: PathBuf,
}

/// Why a reference names no checkpoint.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RefError {
    /// Not a reference at all (syntax): a usage error.
    #[error("{0}")]
    Syntax(String),
    /// A well-formed reference that names nothing in this directory.
    #[error("{0}")]
    Unknown(String),
    /// The store could not be read.
    #[error("{0}")]
    Io(String),
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TagFile {
    version: u32,
    tags: BTreeMap<String, u64>,
}

impl Store {
    fn tags_path(&self) -> PathBuf {
        self.private().join(TAGS_FILE)
    }

    /// The tags: name to sequence number. Empty when there is no tag file.
    pub fn tags(&self) -> Result<BTreeMap<String, u64>> {
        let p = self.tags_path();
        self.check_private()?;
        let bytes = match super::io::read_small(&p, 16 << 20) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(Error::io("read tags", p, e)),
        };
        let t: TagFile = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Usage(format!(
                "{} is not a valid tag file ({e}); hint: fix or remove it (checkpoints stay)",
                p.display()
            ))
        })?;
        Ok(t.tags)
    }

    /// Tags by sequence number (a checkpoint may carry several).
    pub fn tags_by_seq(&self) -> Result<BTreeMap<u64, Vec<String>>> {
        let mut out: BTreeMap<u64, Vec<String>> = BTreeMap::new();
        for (n, s) in self.tags()? {
            out.entry(s).or_default().push(n);
        }
        Ok(out)
    }

    /// Runs `f` on the tags under the tag lock and durably replaces the file with the result.
    pub fn update_tags<T>(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, u64>) -> Result<T>,
    ) -> Result<T> {
        self.create()?;
        let _lock = self.tag_lock(true, true)?;
        let mut tags = self.tags()?;
        let out = f(&mut tags)?;
        let body = serde_json::to_vec(&TagFile { version: 1, tags }).expect("tags serialise");
        let tmp = self.private().join(format!("{TAGS_FILE}.{}", token()));
        let io = self.io();
        let res = (|| {
            io.write_new(&tmp, &body).ctx("write", &tmp)?;
            io.fsync_file(&tmp).ctx("fsync", &tmp)?;
            io.rename_replace(&tmp, &self.tags_path())
                .ctx("replace", &self.tags_path())?;
            io.fsync_dir(&self.private()).ctx("fsync", &self.private())
        })();
        if res.is_err() {
            let _ = io.remove_file(&tmp);
        }
        res.map(|_| out)
    }

    /// `flock` on `DIR/.ckpt/tags.lock`: exclusive for tag updates, shared for retention.
    /// Without `create`, a missing lock file (no tag was ever set) means no lock is needed.
    pub(crate) fn tag_lock(
        &self,
        exclusive: bool,
        create: bool,
    ) -> Result<Option<nix::fcntl::Flock<File>>> {
        self.check_private()?;
        let lock_path = self.private().join("tags.lock");
        let file: File = match super::io::open_checked(
            &lock_path,
            OpenOptions::new()
                .read(true)
                .write(create)
                .create(create)
                .truncate(false)
                .mode(0o600),
        ) {
            Ok(f) => f,
            Err(e) if !create && e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open tag lock", lock_path, e)),
        };
        let arg = if exclusive {
            nix::fcntl::FlockArg::LockExclusive
        } else {
            nix::fcntl::FlockArg::LockShared
        };
        nix::fcntl::Flock::lock(file, arg)
            .map(Some)
            .map_err(|(_, e)| Error::io("lock", &lock_path, e.into()))
    }

    /// Resolves `r` (`ID`, tag, `latest`, `latest~N`) to a published checkpoint.
    pub fn resolve(&self, r: &str) -> std::result::Result<Resolved, RefError> {
        let list = self.list().map_err(|e| RefError::Io(e.to_string()))?;
        let tags = self.tags().map_err(|e| RefError::Io(e.to_string()))?;
        let found = |seq: u64| {
            list.iter().find(|(s, _)| *s == seq).map(|(s, p)| Resolved {
                seq: *s,
                path: p.clone(),
            })
        };
        let unknown =
            |what: String| RefError::Unknown(format!("{what}; {}", self.inventory(&list, &tags)));
        if r == "latest" || r.starts_with("latest~") {
            let back: usize = match r.strip_prefix("latest~") {
                None => 0,
                Some(n) => n.parse().map_err(|_| {
                    RefError::Syntax(format!(
                        "{r:?} is not a checkpoint reference: `latest~N` wants a whole number N"
                    ))
                })?,
            };
            if list.len() <= back {
                return Err(unknown(format!(
                    "{r:?} names no checkpoint: {} has {} checkpoint(s)",
                    self.dir().display(),
                    list.len()
                )));
            }
            let (seq, path) = &list[list.len() - 1 - back];
            return Ok(Resolved {
                seq: *seq,
                path: path.clone(),
            });
        }
        if !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()) {
            let seq: u64 = r.parse().map_err(|_| {
                RefError::Syntax(format!("{r:?} is not a checkpoint id (too large)"))
            })?;
            return found(seq).ok_or_else(|| {
                unknown(format!("no checkpoint {seq} in {}", self.dir().display()))
            });
        }
        if let Some(&seq) = tags.get(r) {
            return found(seq).ok_or_else(|| {
                unknown(format!(
                    "tag {r:?} names checkpoint {seq}, which is no longer in {} (rolled back or removed by hand)",
                    self.dir().display()
                ))
            });
        }
        if let Err(why) = check_tag_name(r) {
            return Err(RefError::Syntax(format!(
                "{r:?} is not a checkpoint reference (an id, a tag, `latest` or `latest~N`): {why}"
            )));
        }
        Err(unknown(format!(
            "no checkpoint or tag {r:?} in {}",
            self.dir().display()
        )))
    }

    /// "it has ids 3, 4, 5; tags base=3" for error messages.
    fn inventory(&self, list: &[(u64, PathBuf)], tags: &BTreeMap<String, u64>) -> String {
        if list.is_empty() {
            return format!("{} holds no checkpoint", self.dir().display());
        }
        let ids: Vec<String> = list.iter().map(|(s, _)| s.to_string()).collect();
        let ids = if ids.len() > 12 {
            format!(
                "{} .. {}",
                ids[..5].join(", "),
                ids[ids.len() - 5..].join(", ")
            )
        } else {
            ids.join(", ")
        };
        let tags: Vec<String> = tags.iter().map(|(n, s)| format!("{n}={s}")).collect();
        format!(
            "it has checkpoint(s) {ids}{}; hint: `ckpt list --dir {}`",
            if tags.is_empty() {
                String::new()
            } else {
                format!(" and tag(s) {}", tags.join(", "))
            },
            self.dir().display()
        )
    }
}
