//! Remote checkpoints: a copy of every committed checkpoint in object storage
//! (`s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`, `file:///path`), so a
//! job outlives its machine (docs/cloud.md, "Checkpoints that outlive the machine").
//!
//! Built on Apache Arrow's `object_store` crate: S3, GCS, Azure and local file systems behind
//! one trait, with each cloud's standard credential chain (environment, instance roles, web
//! identity), request retries and multipart uploads. It is driven by a private tokio runtime,
//! so only the supervisor links tokio; jobs linking the client library never do.
//!
//! Remote layout under the prefix, one directory per checkpoint with the local sequence number:
//!
//! ```text
//! PREFIX/ckpt-000000000042/<files of the checkpoint>
//! PREFIX/ckpt-000000000042/MANIFEST.ckpt.sig   the authentication record (below), written second to last
//! PREFIX/ckpt-000000000042/MANIFEST.ckpt       the manifest, byte for byte, written LAST: the commit record
//! ```
//!
//! A remote checkpoint without its manifest is invisible. A restore trusts nothing it reads:
//! the record's HMAC-SHA256 tag (a key only the owner holds), the SHA-256 of the manifest and
//! of every file it names, and the manifest's own sizes and CRCs are all checked before the
//! checkpoint is published locally through the normal commit path ([`Stage`]).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use object_store::path::Path as OPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::store::io::Io as _;
use crate::store::manifest::{limits, Manifest, MANIFEST_NAME};
use crate::store::{parse_seq, Stage, Store, PREFIX};

/// The authentication record next to each remote manifest.
pub const SIG_NAME: &str = "MANIFEST.ckpt.sig";
/// Files above this size are uploaded in parts of this size, several at a time.
const PART: usize = 8 << 20;
/// Parts in flight per file.
const PARTS_IN_FLIGHT: usize = 4;
/// Largest authentication record read back.
const SIG_BYTES: u64 = 16 << 20;
/// The `writer` of checkpoints published by a remote restore.
pub const RESTORE_WRITER: &str = concat!("ckpt-remote/", env!("CARGO_PKG_VERSION"));

/// What `--remote*` asked for.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    /// `--remote-allow-http`: plain http to a non-loopback endpoint.
    pub allow_http: bool,
    /// `--remote-key FILE` (repeatable): the first signs, all verify. Empty: the default key.
    pub keys: Vec<PathBuf>,
    /// `--remote-keep N`: remote retention.
    pub keep: Option<usize>,
    /// `--remote-required`: a stop whose final checkpoint was not uploaded fails (exit 77).
    pub required: bool,
    /// How long a stop waits for uploads before ckpt exits.
    pub stop_timeout: Duration,
    /// `--remote-ranks`: of a multi-rank checkpoint, upload only these ranks' shards (the
    /// other nodes upload theirs with `ckpt upload`); None: every shard no one else claimed.
    pub ranks: Option<Vec<u32>>,
}

/// A log line for the supervisor's reporter.
#[derive(Debug, Clone)]
pub struct Report {
    pub event: &'static str,
    pub warn: bool,
    /// Empty: an event only, no log line.
    pub human: String,
    pub data: Value,
}

fn report(event: &'static str, warn: bool, human: String, data: Value) -> Report {
    Report {
        event,
        warn,
        human: redact(&human),
        data,
    }
}

/// Replaces the value of every credential variable of the environment found in `s` (belt
/// and braces: no error message of the client should carry one, and none may reach a log).
pub fn redact(s: &str) -> String {
    let mut out = s.to_string();
    for (k, v) in std::env::vars() {
        let secret = [
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_ACCESS_KEY_ID",
            "AZURE_STORAGE_ACCOUNT_KEY",
            "AZURE_STORAGE_ACCESS_KEY",
            "AZURE_STORAGE_SAS_KEY",
            "AZURE_CLIENT_SECRET",
            "GOOGLE_SERVICE_ACCOUNT_KEY",
        ]
        .contains(&k.as_str());
        if secret && v.len() >= 4 {
            out = out.replace(&v, "***");
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Keys

/// The HMAC keys: the first signs, every one verifies (rotation, docs/cloud.md).
#[derive(Clone)]
pub struct Keys {
    keys: Vec<(String, Vec<u8>)>,
    /// Where the signing key was read from (for the hint when a record is another key's).
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Keys").field("ids", &ids).finish()
    }
}

/// `$XDG_CONFIG_HOME/ckpt/remote.key`, else `~/.config/ckpt/remote.key`.
pub fn default_key_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ckpt").join("remote.key"))
}

fn key_id(key: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"ckpt remote key id\0");
    h.update(key);
    hex(&h.finalize()[..8])
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn random_key() -> std::io::Result<[u8; 32]> {
    let mut k = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut k)?;
    Ok(k)
}

impl Keys {
    /// Loads `paths` (the first is created owner-only when missing, 32 random bytes as hex);
    /// with none, the default key, created on first use.
    pub fn load(paths: &[PathBuf]) -> Result<Keys, String> {
        let paths: Vec<PathBuf> = if paths.is_empty() {
            vec![default_key_path().ok_or(
                "no HOME or XDG_CONFIG_HOME for the default remote key; hint: pass --remote-key FILE",
            )?]
        } else {
            paths.to_vec()
        };
        let mut keys = Vec::new();
        for (i, p) in paths.iter().enumerate() {
            if i == 0 && std::fs::symlink_metadata(p).is_err() {
                create_key(p)?;
            }
            let k = read_key(p)?;
            keys.push((key_id(&k), k));
        }
        Ok(Keys {
            keys,
            path: paths.first().cloned(),
        })
    }

    /// A key given directly (tests).
    pub fn from_bytes(key: &[u8]) -> Keys {
        Keys {
            keys: vec![(key_id(key), key.to_vec())],
            path: None,
        }
    }

    /// The id of the signing key (never the key).
    pub fn signing_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Whether `id` is one of ours.
    fn has(&self, id: &str) -> bool {
        self.keys.iter().any(|(i, _)| i == id)
    }

    fn mac(key: &[u8]) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length")
    }

    fn sign(&self, body: &[u8]) -> (String, String) {
        let (id, key) = &self.keys[0];
        let mut m = Self::mac(key);
        m.update(body);
        (id.clone(), hex(&m.finalize().into_bytes()))
    }

    fn verify(&self, id: &str, body: &[u8], tag: &str) -> Result<(), String> {
        let Some((_, key)) = self.keys.iter().find(|(i, _)| i == id) else {
            return Err(format!(
                "signed with key {:?}, which is not one of ours ({}); hint: every machine of a job needs the same key: copy the key file of the machine that signed it to {} (mode 0600), or name it with --remote-key FILE (docs/cloud.md, \"The key\")",
                crate::store::escape(id),
                self.keys
                    .iter()
                    .map(|(i, _)| i.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                self.path
                    .as_ref()
                    .map_or("the key path".to_string(), |p| p.display().to_string())
            ));
        };
        let tag = unhex(tag).ok_or("the tag is not hex")?;
        let mut m = Self::mac(key);
        m.update(body);
        m.verify_slice(&tag)
            .map_err(|_| "the authentication tag does not match (planted or altered)".to_string())
    }
}

fn create_key(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let d = p
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
        .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    let key = random_key().map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    // Written whole under a temporary name, then linked into place without replacing
    // anything: two supervisors starting at once never read a half-written key, and the
    // loser of the race uses the winner's key.
    let tmp = d.join(format!(
        ".{}.{}.tmp",
        p.file_name().and_then(|n| n.to_str()).unwrap_or("key"),
        crate::store::token()
    ));
    let _ = std::fs::remove_file(&tmp);
    let res = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(format!("{}\n", hex(&key)).as_bytes())?;
        f.sync_all()?;
        match std::fs::hard_link(&tmp, p) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    })();
    let _ = std::fs::remove_file(&tmp);
    res.map_err(|e| format!("cannot create the remote key {}: {e}", p.display()))
}

fn read_key(p: &Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::MetadataExt;
    let f = crate::store::io::open_read(p)
        .map_err(|e| format!("cannot read the remote key {}: {e}", p.display()))?;
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot inspect the remote key {}: {e}", p.display()))?;
    // SAFETY: geteuid cannot fail.
    if meta.uid() != unsafe { libc::geteuid() } || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "the remote key {} must belong to you and be readable by you alone; hint: chmod 600 it",
            p.display()
        ));
    }
    let mut s = String::new();
    f.take(4096)
        .read_to_string(&mut s)
        .map_err(|e| format!("cannot read the remote key {}: {e}", p.display()))?;
    match unhex(s.trim()) {
        Some(k) if k.len() >= 16 => Ok(k),
        _ => Err(format!(
            "the remote key {} is not at least 16 bytes as hex",
            p.display()
        )),
    }
}

// ---------------------------------------------------------------------------------------
// The authentication record

#[derive(Debug, Serialize, Deserialize)]
struct Body {
    v: u32,
    seq: u64,
    manifest_sha256: String,
    files: Vec<SignedFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct SignedFile {
    name: String,
    size: u64,
    sha256: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct SigDoc {
    alg: String,
    key: String,
    /// The signed bytes: [`Body`] as JSON.
    body: String,
    tag: String,
}

// ---------------------------------------------------------------------------------------
// The store

/// The remote record that the job finished: `PREFIX/FINISHED.ckpt.sig`, beside the
/// checkpoint directories (never listed as one).
pub const FINISHED_NAME: &str = "FINISHED.ckpt.sig";

#[derive(Debug, Serialize, Deserialize)]
struct FinishedBody {
    v: u32,
    kind: String,
    /// The newest checkpoint when the job finished.
    seq: u64,
    t_ms: u64,
}

/// What [`Remote::finished`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finished {
    No,
    Yes {
        seq: u64,
        t_ms: u64,
    },
    /// A record is there but does not authenticate (planted, or another key's).
    Invalid(String),
}

/// The remote record of the job's tags (`ckpt tag`): `PREFIX/TAGS.ckpt.sig`, beside the
/// checkpoint directories, signed like a checkpoint's record. Remote retention keeps every
/// checkpoint it names, so tags outlive the machine that made them.
pub const TAGS_NAME: &str = "TAGS.ckpt.sig";

#[derive(Debug, Serialize, Deserialize)]
struct TagsBody {
    v: u32,
    kind: String,
    /// Tag name to checkpoint number.
    tags: BTreeMap<String, u64>,
    t_ms: u64,
}

/// What [`Remote::tags`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoteTags {
    No,
    Yes {
        tags: BTreeMap<String, u64>,
        /// Signed with one of our keys other than the signing one.
        resign: bool,
    },
    /// A record is there but does not authenticate (planted, or another key's): it
    /// protects nothing.
    Invalid(String),
}

impl RemoteTags {
    /// The tags of an authentic record; none otherwise.
    pub fn valid(&self) -> BTreeMap<String, u64> {
        match self {
            RemoteTags::Yes { tags, .. } => tags.clone(),
            _ => BTreeMap::new(),
        }
    }
}

/// The record of one shard of a multi-rank checkpoint, beside its manifest.
pub fn shard_record_name(rank: u32) -> String {
    format!(
        "{MANIFEST_NAME}.{}.sig",
        crate::multi_rank::shard_name(rank)
    )
}

#[derive(Debug, Serialize, Deserialize)]
struct ShardBody {
    v: u32,
    kind: String,
    seq: u64,
    manifest_sha256: String,
    shard: String,
    files: Vec<SignedFile>,
}

/// What [`Remote::publish_shards`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    /// The manifest is up (now, with the bytes written, or already).
    Done(u64),
    /// These ranks' shards are not up yet: nothing was written.
    Missing(Vec<u32>),
}

/// The files of rank `rank`'s shard in a multi-rank manifest.
fn shard_files(m: &Manifest, rank: u32) -> impl Iterator<Item = &crate::store::FileEntry> {
    let prefix = format!("{}/", crate::multi_rank::shard_name(rank));
    m.files.iter().filter(move |f| f.name.starts_with(&prefix))
}

/// The manifest of local checkpoint `seq` at `dir`: its bytes and decoded.
fn read_local_manifest(seq: u64, dir: &Path) -> Result<(Vec<u8>, Manifest), String> {
    let mpath = dir.join(MANIFEST_NAME);
    let mbytes = crate::store::io::read_small(&mpath, limits::MANIFEST_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", mpath.display()))?;
    let m = Manifest::decode(&mbytes).map_err(|e| format!("{}: {e}", mpath.display()))?;
    if m.seq != seq {
        return Err(format!(
            "{} names checkpoint {}, not {seq}",
            mpath.display(),
            m.seq
        ));
    }
    Ok((mbytes, m))
}

/// What [`Remote::upload_checked`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upload {
    /// Uploaded now: the bytes sent.
    Done(u64),
    /// The remote already held this very checkpoint.
    Present,
}

/// What the remote holds under a local checkpoint's number ([`Remote::presence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Presence {
    /// Nothing (no manifest).
    Absent,
    /// This very checkpoint, authenticated with our keys.
    Same,
    /// Another checkpoint, or one that does not authenticate with our keys.
    Conflict(Conflict),
}

/// A remote checkpoint under a local one's number that is not that checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub seq: u64,
    /// The key id its record names, when that is not one of ours.
    pub foreign_key: Option<String>,
    /// It authenticates with our keys but is another checkpoint (a second writer).
    pub authentic: bool,
    /// Why it is not ours (no hint).
    pub why: String,
}

/// An opened remote.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    rt: tokio::runtime::Runtime,
    keys: Keys,
    /// The URL as shown in logs: no user info, no query.
    pub display: String,
    /// For `file://`: the root, whose emptied checkpoint directories retention removes.
    local_root: Option<PathBuf>,
}

fn is_loopback_url(u: &str) -> bool {
    let Ok(u) = url::Url::parse(u) else {
        return false;
    };
    match u.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    }
}

fn display_url(u: &url::Url) -> String {
    let mut d = u.clone();
    let _ = d.set_username("");
    let _ = d.set_password(None);
    d.set_query(None);
    d.set_fragment(None);
    d.to_string()
}

impl Remote {
    /// Opens `s.url` with credentials and endpoints from the environment.
    pub fn open(s: &Settings) -> Result<Remote, String> {
        let keys = Keys::load(&s.keys)?;
        Remote::open_with_keys(&s.url, s.allow_http, keys)
    }

    pub fn open_with_keys(url_s: &str, allow_http: bool, keys: Keys) -> Result<Remote, String> {
        use object_store::{ClientOptions, RetryConfig};
        let u = url::Url::parse(url_s).map_err(|e| {
            format!(
                "--remote {url_s:?}: not a URL ({e}); e.g. s3://bucket/prefix, file:///shared/ckpt"
            )
        })?;
        let display = display_url(&u);
        let prefix = u.path().trim_matches('/').to_string();
        let retry = RetryConfig {
            max_retries: 6,
            retry_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let opts = |http: bool| {
            ClientOptions::new()
                .with_allow_http(http)
                .with_timeout(Duration::from_secs(120))
                .with_connect_timeout(Duration::from_secs(5))
        };
        let http_ok = |endpoint: Option<String>| -> Result<bool, String> {
            match endpoint {
                Some(e) if e.starts_with("http://") => {
                    if is_loopback_url(&e) || allow_http {
                        Ok(true)
                    } else {
                        Err(format!("the endpoint {e} is plain http and not on this machine: credentials and checkpoints would cross the network in the clear; hint: use https, or pass --remote-allow-http if the network is trusted"))
                    }
                }
                _ => Ok(false),
            }
        };
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let mut local_root = None;
        let (store, prefix): (Arc<dyn ObjectStore>, String) = match u.scheme() {
            "s3" | "s3a" => {
                let endpoint = env("AWS_ENDPOINT_URL_S3")
                    .or_else(|| env("AWS_ENDPOINT_URL"))
                    .or_else(|| env("AWS_ENDPOINT"));
                let http = http_ok(endpoint)?;
                // Every request and part carries its SHA-256 (x-amz-checksum-sha256), which
                // S3 checks before it accepts the bytes.
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url_s)
                    .with_checksum_algorithm(object_store::aws::Checksum::SHA256)
                    .with_retry(retry)
                    .with_client_options(opts(http));
                if env("AWS_REGION").is_none() && env("AWS_DEFAULT_REGION").is_none() {
                    b = b.with_region("us-east-1");
                } else if let Some(r) = env("AWS_REGION") {
                    b = b.with_region(r);
                }
                (Arc::new(b.build().map_err(|e| redact(&e.to_string()))?), prefix)
            }
            "gs" => {
                // GOOGLE_BASE_URL points object_store at another endpoint (an emulator).
                let http = http_ok(env("GOOGLE_BASE_URL"))?;
                let b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(url_s)
                    .with_retry(retry)
                    .with_client_options(opts(http));
                (Arc::new(b.build().map_err(|e| redact(&e.to_string()))?), prefix)
            }
            "az" | "azure" | "abfs" | "abfss" => {
                // Azurite (AZURE_STORAGE_USE_EMULATOR=true): object_store talks plain http to
                // AZURITE_BLOB_STORAGE_URL (default http://127.0.0.1:10000), held to the same
                // rule as any other endpoint.
                let emulator = env("AZURE_STORAGE_USE_EMULATOR")
                    .is_some_and(|v| v.eq_ignore_ascii_case("true") || v == "1");
                let endpoint = if emulator {
                    Some(
                        env("AZURITE_BLOB_STORAGE_URL")
                            .unwrap_or_else(|| "http://127.0.0.1:10000".into()),
                    )
                } else {
                    env("AZURE_STORAGE_ENDPOINT")
                };
                let http = http_ok(endpoint)?;
                let b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(url_s)
                    .with_retry(retry)
                    .with_client_options(opts(http));
                (Arc::new(b.build().map_err(|e| redact(&e.to_string()))?), prefix)
            }
            "file" => {
                use std::os::unix::fs::DirBuilderExt;
                let path = u
                    .to_file_path()
                    .map_err(|()| format!("--remote {url_s:?}: not a local path"))?;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&path)
                    .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
                let fs = object_store::local::LocalFileSystem::new_with_prefix(&path)
                    .map_err(|e| e.to_string())?;
                local_root = Some(path);
                (Arc::new(fs), String::new())
            }
            other => {
                return Err(format!(
                    "--remote {url_s:?}: unsupported scheme {other:?}; use s3://, gs://, az:// or file://"
                ))
            }
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ckpt-remote")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the remote's runtime: {e}"))?;
        Ok(Remote {
            store,
            prefix,
            rt,
            keys,
            display,
            local_root,
        })
    }

    /// Names this remote in upload claims (claims are per remote: a second remote of the
    /// same directory is uploaded independently).
    pub fn claim_tag(&self) -> String {
        hex(&Sha256::digest(self.display.as_bytes())[..6])
    }

    /// The id of the signing key (a hash; never the key).
    pub fn key_id(&self) -> &str {
        self.keys.signing_id()
    }

    fn key(&self, rel: &str) -> Result<OPath, String> {
        let full = if self.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{rel}", self.prefix)
        };
        OPath::parse(&full).map_err(|e| format!("cannot name {full:?} remotely: {e}"))
    }

    fn ckpt_key(&self, seq: u64, name: &str) -> Result<OPath, String> {
        self.key(&format!("{PREFIX}{seq:012}/{name}"))
    }

    fn err(&self, what: &str, e: object_store::Error) -> String {
        redact(&format!("{what} on {}: {e}", self.display))
    }

    /// Sequence numbers of remote checkpoints whose manifest is present, ascending.
    pub fn list(&self) -> Result<Vec<u64>, String> {
        self.rt.block_on(self.list_async())
    }

    async fn list_async(&self) -> Result<Vec<u64>, String> {
        let seqs = self.dirs_async().await?;
        let mut out = Vec::new();
        for s in seqs {
            match self.store.head(&self.ckpt_key(s, MANIFEST_NAME)?).await {
                Ok(_) => out.push(s),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err("inspect", e)),
            }
        }
        Ok(out)
    }

    /// Sequence numbers of every remote checkpoint directory, with or without a manifest.
    pub fn list_dirs(&self) -> Result<Vec<u64>, String> {
        self.rt.block_on(self.dirs_async())
    }

    async fn dirs_async(&self) -> Result<Vec<u64>, String> {
        let prefix = if self.prefix.is_empty() {
            None
        } else {
            Some(OPath::parse(&self.prefix).map_err(|e| e.to_string())?)
        };
        let listed = self
            .store
            .list_with_delimiter(prefix.as_ref())
            .await
            .map_err(|e| self.err("list", e))?;
        let mut seqs: Vec<u64> = listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().and_then(|n| parse_seq(n, false)))
            .collect();
        seqs.sort_unstable();
        Ok(seqs)
    }

    /// Whether checkpoint `seq` has its commit record remotely.
    pub fn has(&self, seq: u64) -> Result<bool, String> {
        self.rt.block_on(async {
            match self.store.head(&self.ckpt_key(seq, MANIFEST_NAME)?).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(self.err("inspect", e)),
            }
        })
    }

    /// Uploads the local checkpoint `seq` at `dir`: every file (checked against the manifest
    /// while read), the authentication record, then the manifest last.
    pub fn upload(&self, seq: u64, dir: &Path) -> Result<u64, String> {
        self.rt.block_on(self.upload_async(seq, dir))
    }

    async fn upload_async(&self, seq: u64, dir: &Path) -> Result<u64, String> {
        let mpath = dir.join(MANIFEST_NAME);
        let mbytes = crate::store::io::read_small(&mpath, limits::MANIFEST_BYTES)
            .map_err(|e| format!("cannot read {}: {e}", mpath.display()))?;
        let m = Manifest::decode(&mbytes).map_err(|e| format!("{}: {e}", mpath.display()))?;
        if m.seq != seq {
            return Err(format!(
                "{} names checkpoint {}, not {seq}",
                mpath.display(),
                m.seq
            ));
        }
        let mut signed = Vec::with_capacity(m.files.len());
        let mut total = 0u64;
        for f in &m.files {
            let sf = self.put_file(seq, dir, &m, f).await?;
            total += sf.size;
            signed.push(sf);
        }
        let body = serde_json::to_string(&Body {
            v: 1,
            seq,
            manifest_sha256: hex(&Sha256::digest(&mbytes)),
            files: signed,
        })
        .map_err(|e| e.to_string())?;
        let (key, tag) = self.keys.sign(body.as_bytes());
        let doc = serde_json::to_vec(&SigDoc {
            alg: "hmac-sha256".into(),
            key,
            body,
            tag,
        })
        .map_err(|e| e.to_string())?;
        total += (doc.len() + mbytes.len()) as u64;
        self.store
            .put(&self.ckpt_key(seq, SIG_NAME)?, PutPayload::from(doc))
            .await
            .map_err(|e| self.err("upload", e))?;
        self.store
            .put(
                &self.ckpt_key(seq, MANIFEST_NAME)?,
                PutPayload::from(mbytes),
            )
            .await
            .map_err(|e| self.err("upload manifest", e))?;
        Ok(total)
    }

    /// Uploads file `f` of local checkpoint `seq` at `dir` (a multipart upload above
    /// [`PART`]), checking it against the manifest while read; returns its signed entry.
    async fn put_file(
        &self,
        seq: u64,
        dir: &Path,
        m: &Manifest,
        f: &crate::store::FileEntry,
    ) -> Result<SignedFile, String> {
        let mut file = crate::store::scan::open_member(dir, &f.name)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let key = self.ckpt_key(seq, &f.name)?;
        let mut crc = m.checksum.hasher();
        let mut sha = Sha256::new();
        let mut size = 0u64;
        let mut read_chunk = |buf: &mut Vec<u8>| -> Result<usize, String> {
            buf.resize(PART, 0);
            let mut n = 0;
            while n < PART {
                match file.read(&mut buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("read {}: {e}", f.name)),
                }
            }
            buf.truncate(n);
            crc.update(buf);
            sha.update(&buf[..]);
            size += n as u64;
            Ok(n)
        };
        let mut buf = Vec::new();
        read_chunk(&mut buf)?;
        if buf.len() < PART {
            self.store
                .put(&key, PutPayload::from(std::mem::take(&mut buf)))
                .await
                .map_err(|e| self.err("upload", e))?;
        } else {
            let up = self
                .store
                .put_multipart(&key)
                .await
                .map_err(|e| self.err("start multipart upload", e))?;
            let mut w = WriteMultipart::new_with_chunk_size(up, PART);
            loop {
                w.wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| self.err("upload part", e))?;
                w.put(bytes::Bytes::from(std::mem::take(&mut buf)));
                if read_chunk(&mut buf)? == 0 {
                    break;
                }
            }
            w.finish()
                .await
                .map_err(|e| self.err("finish multipart upload", e))?;
        }
        if size != f.size || crc.finish() != f.sum {
            return Err(format!(
                "{} changed while uploaded (size {size}, expected {})",
                f.name, f.size
            ));
        }
        Ok(SignedFile {
            name: f.name.clone(),
            size,
            sha256: hex(&sha.finalize()),
        })
    }

    async fn get_small(&self, key: &OPath, limit: u64) -> Result<Vec<u8>, String> {
        let meta = self
            .store
            .head(key)
            .await
            .map_err(|e| self.err("inspect", e))?;
        if meta.size > limit {
            return Err(format!("{key} is {} bytes, above {limit}", meta.size));
        }
        let b = self
            .store
            .get(key)
            .await
            .map_err(|e| self.err("download", e))?
            .bytes()
            .await
            .map_err(|e| self.err("download", e))?;
        if b.len() as u64 > limit {
            return Err(format!("{key} is above {limit} bytes"));
        }
        Ok(b.to_vec())
    }

    /// Reads and authenticates remote checkpoint `seq`'s manifest.
    async fn authenticated(&self, seq: u64) -> Result<(Manifest, Vec<SignedFile>), String> {
        let mbytes = self
            .get_small(&self.ckpt_key(seq, MANIFEST_NAME)?, limits::MANIFEST_BYTES)
            .await?;
        let sig = match self
            .get_small(&self.ckpt_key(seq, SIG_NAME)?, SIG_BYTES)
            .await
        {
            Ok(s) => s,
            Err(e) => return Err(format!("no readable authentication record ({e})")),
        };
        let doc: SigDoc = serde_json::from_slice(&sig)
            .map_err(|e| format!("the authentication record is malformed: {e}"))?;
        if doc.alg != "hmac-sha256" {
            return Err(format!(
                "unknown authentication algorithm {:?}",
                crate::store::escape(&doc.alg)
            ));
        }
        self.keys.verify(&doc.key, doc.body.as_bytes(), &doc.tag)?;
        let body: Body = serde_json::from_str(&doc.body)
            .map_err(|e| format!("the signed record is malformed: {e}"))?;
        if body.v != 1 || body.seq != seq {
            return Err(format!(
                "the signed record names checkpoint {}, not {seq}",
                body.seq
            ));
        }
        if body.manifest_sha256 != hex(&Sha256::digest(&mbytes)) {
            return Err("the manifest is not the one that was signed".into());
        }
        let m = Manifest::decode(&mbytes).map_err(|e| format!("manifest: {e}"))?;
        if m.seq != seq {
            return Err(format!("the manifest names checkpoint {}", m.seq));
        }
        let listed: Vec<(&str, u64)> = m.files.iter().map(|f| (f.name.as_str(), f.size)).collect();
        let signed: Vec<(&str, u64)> = body
            .files
            .iter()
            .map(|f| (f.name.as_str(), f.size))
            .collect();
        if listed != signed {
            return Err("the signed file list differs from the manifest's".into());
        }
        Ok((m, body.files))
    }

    /// What the remote holds under the number of local checkpoint `seq` at `dir`: nothing,
    /// this very checkpoint (its manifest, byte for byte, under a record that authenticates
    /// with our keys), or something else: a conflict, never to be overwritten (it may be the
    /// job's own checkpoint, read with the wrong key) nor counted as uploaded.
    pub fn presence(&self, seq: u64, dir: &Path) -> Result<Presence, String> {
        if !self.has(seq)? {
            return Ok(Presence::Absent);
        }
        let ours =
            crate::store::io::read_small(&dir.join(MANIFEST_NAME), limits::MANIFEST_BYTES)
                .map_err(|e| format!("cannot read {}: {e}", dir.join(MANIFEST_NAME).display()))?;
        self.rt.block_on(self.presence_of(seq, &ours))
    }

    async fn presence_of(&self, seq: u64, ours: &[u8]) -> Result<Presence, String> {
        let key = self.ckpt_key(seq, MANIFEST_NAME)?;
        if let Err(e) = self.authenticated(seq).await {
            // Gone meanwhile (removed by its owner's retention): nothing there.
            if matches!(
                self.store.head(&key).await,
                Err(object_store::Error::NotFound { .. })
            ) {
                return Ok(Presence::Absent);
            }
            return Ok(Presence::Conflict(Conflict {
                seq,
                foreign_key: self
                    .record_key_async(seq)
                    .await
                    .filter(|k| !self.keys.has(k)),
                authentic: false,
                why: e.split("; hint:").next().unwrap_or(&e).to_string(),
            }));
        }
        let theirs = self.get_small(&key, limits::MANIFEST_BYTES).await?;
        if theirs == ours {
            Ok(Presence::Same)
        } else {
            Ok(Presence::Conflict(Conflict {
                seq,
                foreign_key: None,
                authentic: true,
                why: "it authenticates but is another checkpoint (its manifest differs from this one's)".into(),
            }))
        }
    }

    /// The key id that remote checkpoint `seq`'s authentication record names, if it has a
    /// readable one (not checked: for messages only).
    pub fn record_key(&self, seq: u64) -> Option<String> {
        self.rt.block_on(self.record_key_async(seq))
    }

    async fn record_key_async(&self, seq: u64) -> Option<String> {
        let raw = self
            .get_small(&self.ckpt_key(seq, SIG_NAME).ok()?, SIG_BYTES)
            .await
            .ok()?;
        let doc: SigDoc = serde_json::from_slice(&raw).ok()?;
        Some(crate::store::escape(&doc.key).chars().take(64).collect())
    }

    /// Where the signing key was read from (the default key path, or the first
    /// `--remote-key`).
    pub fn key_path(&self) -> Option<&Path> {
        self.keys.path.as_deref()
    }

    /// Whether `id` is the id of one of our keys.
    pub fn has_key(&self, id: &str) -> bool {
        self.keys.has(id)
    }

    /// Uploads local checkpoint `seq` at `dir` unless the remote already holds it. A remote
    /// checkpoint of that number with another manifest (or one that does not authenticate) is
    /// never overwritten: remote numbers are local ones, one writer per prefix.
    pub fn upload_checked(&self, seq: u64, dir: &Path) -> Result<Upload, String> {
        match self.presence(seq, dir)? {
            Presence::Same => Ok(Upload::Present),
            Presence::Absent => self.upload(seq, dir).map(Upload::Done),
            Presence::Conflict(c) if c.authentic => Err(format!(
                "{} already holds another checkpoint {seq} (a second writer on this prefix?); not overwritten; hint: give each job its own prefix",
                self.display
            )),
            Presence::Conflict(c) => Err(format!(
                "{} already holds a checkpoint {seq} that does not authenticate ({}); not overwritten; {}",
                self.display,
                c.why,
                if c.foreign_key.is_some() {
                    self.key_hint()
                } else {
                    "hint: `ckpt gc --remote` lists it, remove it by hand if it is not yours".into()
                }
            )),
        }
    }

    /// The fix when the remote's records are signed with a key that is not ours.
    pub fn key_hint(&self) -> String {
        format!(
            "hint: if they are this job's, copy the key file of the machine that signed them to {} (mode 0600), or name it with --remote-key FILE (docs/cloud.md, \"The key\"); if they are not, give this job its own prefix",
            self.key_path()
                .map_or("the key path".to_string(), |p| p.display().to_string())
        )
    }

    /// Resolves `r` (a remote sequence number, `latest` or `latest~N`) to a remote checkpoint.
    /// `latest` counts only checkpoints that authenticate with our keys (as a restore would);
    /// the ones skipped on the way are returned with the reason.
    pub fn resolve(&self, r: &str) -> Result<(u64, Vec<(u64, String)>), String> {
        if let Ok(seq) = r.parse::<u64>() {
            return if self.has(seq)? {
                Ok((seq, Vec::new()))
            } else {
                Err(format!("no checkpoint {seq} on {}", self.display))
            };
        }
        let back: usize = match r.strip_prefix("latest") {
            Some("") => 0,
            Some(n) => n
                .strip_prefix('~')
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| {
                    format!("{r:?}: give a remote sequence number, `latest` or `latest~N`")
                })?,
            None => {
                // A name of the remote's tag record (only an authentic one names anything).
                let tags = self.tags()?.valid();
                return match tags.get(r) {
                    Some(&seq) if self.has(seq)? => Ok((seq, Vec::new())),
                    Some(&seq) => Err(format!(
                        "tag {r:?} names checkpoint {seq}, which is not on {}",
                        self.display
                    )),
                    None => Err(format!(
                        "{r:?}: give a remote sequence number, `latest`, `latest~N` or a tag of the remote ({})",
                        if tags.is_empty() {
                            "it has none".to_string()
                        } else {
                            tags.iter()
                                .map(|(n, s)| format!("{n}={s}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    )),
                };
            }
        };
        let mut skipped = Vec::new();
        let mut seen = 0;
        for seq in self.list()?.into_iter().rev() {
            match self.check(seq) {
                Ok(_) if seen == back => return Ok((seq, skipped)),
                Ok(_) => seen += 1,
                Err(e) => skipped.push((seq, e)),
            }
        }
        Err(format!(
            "{} holds no checkpoint {r} that authenticates with our key{}",
            self.display,
            if skipped.is_empty() {
                String::new()
            } else {
                format!(
                    " ({} skipped: {})",
                    skipped.len(),
                    skipped
                        .iter()
                        .map(|(s, e)| format!("{s}: {e}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
        ))
    }

    /// Downloads remote checkpoint `seq` into the new directory `to` (its files and its
    /// manifest, as `ckpt export` writes them), checking every byte as a restore does. The
    /// directory appears whole (written under a temporary name, fsynced, renamed) or not at
    /// all. Returns the manifest and the bytes downloaded.
    pub fn export(&self, seq: u64, to: &Path) -> Result<(Manifest, u64), String> {
        use std::os::unix::fs::OpenOptionsExt;
        if std::fs::symlink_metadata(to).is_ok() {
            return Err(format!(
                "{} already exists; hint: --to must name a new directory",
                to.display()
            ));
        }
        let to = std::path::absolute(to).unwrap_or_else(|_| to.to_path_buf());
        let parent = to
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| "/".into());
        let name = to
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "export".into());
        std::fs::create_dir_all(&parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        let tmp = parent.join(format!(".{name}.export.{}", crate::store::token()));
        std::fs::create_dir(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let res = self.rt.block_on(async {
            let (m, signed) = self.authenticated(seq).await?;
            let mbytes = self
                .get_small(&self.ckpt_key(seq, MANIFEST_NAME)?, limits::MANIFEST_BYTES)
                .await?;
            let mut dirs = BTreeSet::new();
            let mut total = 0u64;
            for (f, s) in m.files.iter().zip(&signed) {
                crate::store::manifest::check_name(&f.name).map_err(|e| e.to_string())?;
                let dst = tmp.join(&f.name);
                let mut d = dst.parent().map(Path::to_path_buf);
                while let Some(p) = d.filter(|p| *p != tmp) {
                    dirs.insert(p.clone());
                    d = p.parent().map(Path::to_path_buf);
                }
                if let Some(d) = dst.parent() {
                    std::fs::create_dir_all(d)
                        .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
                }
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dst)
                    .map_err(|e| format!("cannot create {}: {e}", dst.display()))?;
                total += self
                    .fetch(seq, &m, f, s, &mut |chunk| {
                        out.write_all(chunk)
                            .map_err(|e| format!("write {}: {e}", dst.display()))
                    })
                    .await?;
                out.sync_all()
                    .map_err(|e| format!("fsync {}: {e}", dst.display()))?;
            }
            let mp = tmp.join(MANIFEST_NAME);
            let mut mf = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&mp)
                .map_err(|e| format!("cannot create {}: {e}", mp.display()))?;
            mf.write_all(&mbytes)
                .and_then(|()| mf.sync_all())
                .map_err(|e| format!("write {}: {e}", mp.display()))?;
            for d in dirs.iter().rev().chain(std::iter::once(&tmp)) {
                crate::store::io::RealIo
                    .fsync_dir(d)
                    .map_err(|e| format!("fsync {}: {e}", d.display()))?;
            }
            Ok::<_, String>((m, total))
        });
        let res = res.and_then(|r| {
            std::fs::rename(&tmp, &to)
                .map_err(|e| format!("cannot rename {} to {}: {e}", tmp.display(), to.display()))?;
            crate::store::io::RealIo
                .fsync_dir(&parent)
                .map_err(|e| format!("fsync {}: {e}", parent.display()))?;
            Ok(r)
        });
        if res.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        res
    }

    /// Records remotely that the job finished after checkpoint `seq` ([`FINISHED_NAME`], a
    /// record signed like a checkpoint's): a new machine with the same `--remote` then
    /// finishes at once instead of running the job again.
    pub fn mark_finished(&self, seq: u64) -> Result<(), String> {
        let body = serde_json::to_string(&FinishedBody {
            v: 1,
            kind: "finished".into(),
            seq,
            t_ms: crate::store::manifest::now_ms(),
        })
        .map_err(|e| e.to_string())?;
        let (key, tag) = self.keys.sign(body.as_bytes());
        let doc = serde_json::to_vec(&SigDoc {
            alg: "hmac-sha256".into(),
            key,
            body,
            tag,
        })
        .map_err(|e| e.to_string())?;
        self.rt.block_on(async {
            self.store
                .put(&self.key(FINISHED_NAME)?, PutPayload::from(doc))
                .await
                .map_err(|e| self.err("upload the finished record", e))?;
            Ok(())
        })
    }

    /// Whether the remote records that the job finished. A record that does not
    /// authenticate with our keys counts for nothing ([`Finished::Invalid`]).
    pub fn finished(&self) -> Result<Finished, String> {
        self.rt.block_on(async {
            let key = self.key(FINISHED_NAME)?;
            let raw = match self.store.head(&key).await {
                Ok(_) => self.get_small(&key, SIG_BYTES).await?,
                Err(object_store::Error::NotFound { .. }) => return Ok(Finished::No),
                Err(e) => return Err(self.err("inspect", e)),
            };
            let check = || -> Result<FinishedBody, String> {
                let doc: SigDoc = serde_json::from_slice(&raw)
                    .map_err(|e| format!("the finished record is malformed: {e}"))?;
                if doc.alg != "hmac-sha256" {
                    return Err("unknown authentication algorithm".into());
                }
                self.keys.verify(&doc.key, doc.body.as_bytes(), &doc.tag)?;
                let b: FinishedBody = serde_json::from_str(&doc.body)
                    .map_err(|e| format!("the signed finished record is malformed: {e}"))?;
                if b.v != 1 || b.kind != "finished" {
                    return Err("the signed record is not a finished record".into());
                }
                Ok(b)
            };
            Ok(match check() {
                Ok(b) => Finished::Yes {
                    seq: b.seq,
                    t_ms: b.t_ms,
                },
                Err(e) => Finished::Invalid(e),
            })
        })
    }

    /// Removes the finished record (`ckpt run --again`).
    pub fn clear_finished(&self) -> Result<(), String> {
        self.rt.block_on(async {
            match self.store.delete(&self.key(FINISHED_NAME)?).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(self.err("delete the finished record", e)),
            }
        })
    }

    /// The job's tags as the remote records them ([`TAGS_NAME`]). A record that does not
    /// authenticate with our keys counts for nothing ([`RemoteTags::Invalid`]); a remote that
    /// cannot be read is an error (retention must then remove nothing).
    pub fn tags(&self) -> Result<RemoteTags, String> {
        self.rt.block_on(async {
            let key = self.key(TAGS_NAME)?;
            let raw = match self.store.head(&key).await {
                Ok(_) => self.get_small(&key, SIG_BYTES).await?,
                Err(object_store::Error::NotFound { .. }) => return Ok(RemoteTags::No),
                Err(e) => return Err(self.err("inspect", e)),
            };
            let check = || -> Result<(BTreeMap<String, u64>, bool), String> {
                let body = self.open_doc(&raw)?;
                let doc: SigDoc = serde_json::from_slice(&raw).map_err(|e| e.to_string())?;
                let b: TagsBody = serde_json::from_str(&body)
                    .map_err(|e| format!("the signed tag record is malformed: {e}"))?;
                if b.v != 1 || b.kind != "tags" {
                    return Err("the signed record is not a tag record".into());
                }
                Ok((b.tags, doc.key != self.keys.signing_id()))
            };
            Ok(match check() {
                Ok((tags, resign)) => RemoteTags::Yes { tags, resign },
                Err(e) => RemoteTags::Invalid(e),
            })
        })
    }

    /// Applies `f` to the remote tag record and writes it back (signed with our signing key)
    /// when that changed it, or when it was signed with another of our keys (rotation: the
    /// old key may be dropped later). A record that does not authenticate is never
    /// overwritten (an error): it may be the real owner's, read with the wrong key. Returns
    /// whether the tags changed.
    pub fn update_tags(&self, f: impl FnOnce(&mut BTreeMap<String, u64>)) -> Result<bool, String> {
        let (mut tags, resign) = match self.tags()? {
            RemoteTags::No => (BTreeMap::new(), false),
            RemoteTags::Yes { tags, resign } => (tags, resign),
            RemoteTags::Invalid(why) => {
                return Err(format!(
                    "{} holds a tag record ({TAGS_NAME}) that does not authenticate ({why}); not overwritten; hint: if it is not yours, remove it by hand",
                    self.display
                ))
            }
        };
        let before = tags.clone();
        f(&mut tags);
        let changed = tags != before;
        if changed || resign {
            let body = serde_json::to_string(&TagsBody {
                v: 1,
                kind: "tags".into(),
                tags,
                t_ms: crate::store::manifest::now_ms(),
            })
            .map_err(|e| e.to_string())?;
            let doc = self.sign_doc(body)?;
            self.rt.block_on(async {
                self.store
                    .put(&self.key(TAGS_NAME)?, PutPayload::from(doc))
                    .await
                    .map_err(|e| self.err("upload the tag record", e))
            })?;
        }
        Ok(changed)
    }

    fn sign_doc(&self, body: String) -> Result<Vec<u8>, String> {
        let (key, tag) = self.keys.sign(body.as_bytes());
        serde_json::to_vec(&SigDoc {
            alg: "hmac-sha256".into(),
            key,
            body,
            tag,
        })
        .map_err(|e| e.to_string())
    }

    /// The signed body of a record, once its tag checks out with one of our keys.
    fn open_doc(&self, raw: &[u8]) -> Result<String, String> {
        let doc: SigDoc =
            serde_json::from_slice(raw).map_err(|e| format!("the record is malformed: {e}"))?;
        if doc.alg != "hmac-sha256" {
            return Err(format!(
                "unknown authentication algorithm {:?}",
                crate::store::escape(&doc.alg)
            ));
        }
        self.keys.verify(&doc.key, doc.body.as_bytes(), &doc.tag)?;
        Ok(doc.body)
    }

    /// Uploads the shard of rank `rank` of the multi-rank local checkpoint `seq` at `dir`
    /// (the files under `rank-NNNNN/`), then its signed shard record
    /// (`MANIFEST.ckpt.rank-NNNNN.sig`). Nothing is uploaded when that record is already
    /// up for this very manifest. Returns the bytes sent.
    pub fn upload_shard(&self, seq: u64, dir: &Path, rank: u32) -> Result<u64, String> {
        let (mbytes, m) = read_local_manifest(seq, dir)?;
        let msha = hex(&Sha256::digest(&mbytes));
        let shard = crate::multi_rank::shard_name(rank);
        self.rt.block_on(async {
            if self.shard_record(seq, &m, &msha, rank).await?.is_some() {
                return Ok(0);
            }
            let mut files = Vec::new();
            let mut total = 0u64;
            for f in shard_files(&m, rank) {
                let sf = self.put_file(seq, dir, &m, f).await?;
                total += sf.size;
                files.push(sf);
            }
            if files.is_empty() {
                return Err(format!("checkpoint {seq} has no shard {shard}"));
            }
            let body = serde_json::to_string(&ShardBody {
                v: 1,
                kind: "shard".into(),
                seq,
                manifest_sha256: msha.clone(),
                shard: shard.clone(),
                files,
            })
            .map_err(|e| e.to_string())?;
            let doc = self.sign_doc(body)?;
            total += doc.len() as u64;
            self.store
                .put(
                    &self.ckpt_key(seq, &shard_record_name(rank))?,
                    PutPayload::from(doc),
                )
                .await
                .map_err(|e| self.err("upload", e))?;
            Ok(total)
        })
    }

    /// Shard `rank`'s record of checkpoint `seq`, if it is up, authentic and made for the
    /// manifest whose SHA-256 is `msha`, with that shard's files of `m`.
    async fn shard_record(
        &self,
        seq: u64,
        m: &Manifest,
        msha: &str,
        rank: u32,
    ) -> Result<Option<Vec<SignedFile>>, String> {
        let key = self.ckpt_key(seq, &shard_record_name(rank))?;
        let raw = match self.store.head(&key).await {
            Ok(_) => self.get_small(&key, SIG_BYTES).await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("inspect", e)),
        };
        // A record that is not ours, or of another manifest (an older job on this prefix),
        // counts as missing: the shard's owner uploads it again.
        let Ok(body) = self.open_doc(&raw) else {
            return Ok(None);
        };
        let Ok(b) = serde_json::from_str::<ShardBody>(&body) else {
            return Ok(None);
        };
        let want: Vec<(&str, u64)> = shard_files(m, rank)
            .map(|f| (f.name.as_str(), f.size))
            .collect();
        let got: Vec<(&str, u64)> = b.files.iter().map(|f| (f.name.as_str(), f.size)).collect();
        let ok = b.v == 1
            && b.kind == "shard"
            && b.seq == seq
            && b.manifest_sha256 == msha
            && b.shard == crate::multi_rank::shard_name(rank)
            && want == got;
        Ok(ok.then_some(b.files))
    }

    /// The remote commit of a multi-rank checkpoint: once every shard's record is up (each
    /// uploaded by its rank's node), writes the checkpoint's authentication record (its
    /// file list assembled from the shard records) and then the manifest, last. With a
    /// shard missing, writes nothing and names the missing ranks.
    pub fn publish_shards(&self, seq: u64, dir: &Path) -> Result<Publish, String> {
        let (mbytes, m) = read_local_manifest(seq, dir)?;
        let msha = hex(&Sha256::digest(&mbytes));
        let world = m.world_size.unwrap_or(1);
        self.rt.block_on(async {
            match self.store.head(&self.ckpt_key(seq, MANIFEST_NAME)?).await {
                // Published by another node, unless it is not this checkpoint (never
                // overwritten, nor taken as done).
                Ok(_) => {
                    return match self.presence_of(seq, &mbytes).await? {
                        Presence::Same => Ok(Publish::Done(0)),
                        Presence::Absent => Err(format!(
                            "remote checkpoint {seq} vanished while inspected; trying again"
                        )),
                        Presence::Conflict(c) => Err(format!(
                            "{} already holds a different checkpoint {seq} ({}); not overwritten",
                            self.display, c.why
                        )),
                    }
                }
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err("inspect", e)),
            }
            let mut by_name = std::collections::HashMap::new();
            let mut missing = Vec::new();
            for r in 0..world {
                match self.shard_record(seq, &m, &msha, r).await? {
                    Some(files) => by_name.extend(files.into_iter().map(|f| (f.name.clone(), f))),
                    None => missing.push(r),
                }
            }
            if !missing.is_empty() {
                return Ok(Publish::Missing(missing));
            }
            let files = m
                .files
                .iter()
                .map(|f| {
                    by_name
                        .remove(&f.name)
                        .ok_or_else(|| format!("{} is in no shard record", f.name))
                })
                .collect::<Result<Vec<_>, String>>()?;
            let body = serde_json::to_string(&Body {
                v: 1,
                seq,
                manifest_sha256: msha,
                files,
            })
            .map_err(|e| e.to_string())?;
            let doc = self.sign_doc(body)?;
            let total = (doc.len() + mbytes.len()) as u64;
            self.store
                .put(&self.ckpt_key(seq, SIG_NAME)?, PutPayload::from(doc))
                .await
                .map_err(|e| self.err("upload", e))?;
            self.store
                .put(
                    &self.ckpt_key(seq, MANIFEST_NAME)?,
                    PutPayload::from(mbytes),
                )
                .await
                .map_err(|e| self.err("upload manifest", e))?;
            Ok(Publish::Done(total))
        })
    }

    /// Checks remote checkpoint `seq` without downloading its files (tag, manifest).
    pub fn check(&self, seq: u64) -> Result<Manifest, String> {
        self.rt.block_on(self.authenticated(seq)).map(|(m, _)| m)
    }

    /// Downloads remote checkpoint `seq`, checks every byte (SHA-256 of the signed record,
    /// the manifest's sizes and CRCs) and publishes it in `store` through the commit path,
    /// numbered at least `min_seq`. Returns the local manifest and the bytes downloaded.
    pub fn restore(
        &self,
        seq: u64,
        min_seq: u64,
        store: &Store,
    ) -> Result<(Manifest, u64), String> {
        self.rt.block_on(async {
            let (m, signed) = self.authenticated(seq).await?;
            store.create().map_err(|e| e.to_string())?;
            let mut stage = Stage::new(store, m.checksum).map_err(|e| e.to_string())?;
            stage.set_world_size(m.world_size);
            let mut total = 0u64;
            for (f, s) in m.files.iter().zip(&signed) {
                let mut w = stage.create(&f.name).map_err(|e| e.to_string())?;
                total += self
                    .fetch(seq, &m, f, s, &mut |chunk| {
                        w.write_all(chunk)
                            .map_err(|e| format!("write {}: {e}", f.name))
                    })
                    .await?;
                w.finish().map_err(|e| e.to_string())?;
            }
            let mut meta = m.meta.clone();
            meta.insert("remote".into(), json!({ "url": self.display, "seq": seq }));
            let local = stage
                .commit_at_least(min_seq, m.step, RESTORE_WRITER, meta)
                .map_err(|e| e.to_string())?;
            Ok((local, total))
        })
    }

    /// Fully checks remote checkpoint `seq` as a restore would (every byte downloaded and
    /// checked), writing nothing. Returns its manifest and the bytes read.
    pub fn verify(&self, seq: u64) -> Result<(Manifest, u64), String> {
        self.rt.block_on(async {
            let (m, signed) = self.authenticated(seq).await?;
            let mut total = 0u64;
            for (f, s) in m.files.iter().zip(&signed) {
                total += self.fetch(seq, &m, f, s, &mut |_| Ok(())).await?;
            }
            Ok((m, total))
        })
    }

    /// Downloads file `f` of remote checkpoint `seq` into `sink`, checking its size, the
    /// manifest's CRC and the signed SHA-256 `s`. Files above [`PART`] come as ranged reads,
    /// several in flight, handed to `sink` in order.
    async fn fetch(
        &self,
        seq: u64,
        m: &Manifest,
        f: &crate::store::FileEntry,
        s: &SignedFile,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), String>,
    ) -> Result<u64, String> {
        let key = self.ckpt_key(seq, &f.name)?;
        let mut crc = m.checksum.hasher();
        let mut sha = Sha256::new();
        let mut size = 0u64;
        let found = self
            .store
            .head(&key)
            .await
            .map_err(|e| self.err("download", e))?
            .size;
        if found != f.size {
            return Err(format!(
                "{}: {found} bytes remotely, the manifest says {}",
                f.name, f.size
            ));
        }
        let mut stream = if f.size > PART as u64 {
            let ranges: Vec<std::ops::Range<u64>> = (0..f.size)
                .step_by(PART)
                .map(|s| s..(s + PART as u64).min(f.size))
                .collect();
            let (store, k) = (self.store.clone(), key.clone());
            futures_util::stream::iter(ranges)
                .map(move |r| {
                    let (store, k) = (store.clone(), k.clone());
                    async move { store.get_range(&k, r).await }
                })
                .buffered(PARTS_IN_FLIGHT)
                .boxed()
        } else {
            self.store
                .get(&key)
                .await
                .map_err(|e| self.err("download", e))?
                .into_stream()
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.err("download", e))?;
            size += chunk.len() as u64;
            if size > f.size {
                return Err(format!("{} is larger than its manifest says", f.name));
            }
            crc.update(&chunk);
            sha.update(&chunk);
            sink(&chunk)?;
        }
        if size != f.size {
            return Err(format!(
                "{}: {size} bytes, the manifest says {}",
                f.name, f.size
            ));
        }
        if crc.finish() != f.sum || hex(&sha.finalize()) != s.sha256 {
            return Err(format!("{}: checksum mismatch", f.name));
        }
        Ok(size)
    }

    /// Removes remote checkpoint `seq`: the manifest first (it becomes invisible), then the
    /// rest.
    pub fn remove(&self, seq: u64) -> Result<(), String> {
        self.rt.block_on(async {
            let mk = self.ckpt_key(seq, MANIFEST_NAME)?;
            match self.store.delete(&mk).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.err("delete", e)),
            }
            let dir = self.key(&format!("{PREFIX}{seq:012}"))?;
            let mut objs = self.store.list(Some(&dir));
            let mut keys = Vec::new();
            while let Some(o) = objs.next().await {
                keys.push(o.map_err(|e| self.err("list", e))?.location);
            }
            for k in keys {
                match self.store.delete(&k).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(self.err("delete", e)),
                }
            }
            if let Some(root) = &self.local_root {
                // Emptied sub-directories, deepest first (never anything with files left).
                let top = root.join(format!("{PREFIX}{seq:012}"));
                let mut dirs = vec![top.clone()];
                let mut i = 0;
                while i < dirs.len() {
                    if let Ok(rd) = std::fs::read_dir(&dirs[i]) {
                        for e in rd.flatten() {
                            if e.file_type().is_ok_and(|t| t.is_dir()) {
                                dirs.push(e.path());
                            }
                        }
                    }
                    i += 1;
                }
                for d in dirs.iter().rev() {
                    let _ = std::fs::remove_dir(d);
                }
            }
            Ok(())
        })
    }
}

// ---------------------------------------------------------------------------------------
// Multi-rank checkpoints: each shard uploaded by its rank's node

/// This node's name in upload claims: `CKPT_NODE`, else the host name.
pub fn node_name() -> String {
    std::env::var("CKPT_NODE")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
        })
        .unwrap_or_else(|| "localhost".into())
}

#[derive(Debug, Serialize, Deserialize)]
struct Claim {
    node: String,
    pid: u32,
    /// When it was claimed (ms since the epoch; shown, not used: the lease runs from the
    /// claim file's modification time, which its holder renews).
    #[serde(default)]
    at_ms: u64,
}

/// How long a shard claim holds without being renewed: its holder renews it (the claim
/// file's modification time) every quarter of it while it uploads; once a claim is older
/// than this, any uploader that holds the shard intact takes it over (docs/cloud.md).
/// `CKPT_UPLOAD_LEASE` (a duration such as `2m`), default 2 minutes.
pub fn claim_lease() -> Duration {
    std::env::var("CKPT_UPLOAD_LEASE")
        .ok()
        .and_then(|v| crate::cli::parse_duration(&v).ok())
        .filter(|d| !d.is_zero())
        .unwrap_or(Duration::from_secs(120))
}

/// The claims of shard uploads, in the (shared) checkpoint directory.
pub fn claims_dir(store: &Store) -> PathBuf {
    store.private().join("uploads")
}

fn claim_path(claims: &Path, remote_tag: &str, seq: u64, rank: u32) -> PathBuf {
    claims.join(format!(
        "{PREFIX}{seq:012}.{}.{}",
        crate::multi_rank::shard_name(rank),
        remote_tag
    ))
}

/// How long ago a claim was made or last renewed (0 for a time in the future).
fn claim_age(path: &Path) -> Option<Duration> {
    let m = std::fs::symlink_metadata(path).ok()?.modified().ok()?;
    Some(
        std::time::SystemTime::now()
            .duration_since(m)
            .unwrap_or_default(),
    )
}

/// What [`claim_shard`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claimed {
    /// Ours now (or already). `took_over`: whose claim it was, and why it was taken over.
    Mine { took_over: Option<String> },
    /// Another live uploader holds it (its name).
    Held(String),
    /// Nobody claimed it, and we were asked only to take over abandoned claims.
    Unclaimed,
}

/// Claims the upload of rank `rank`'s shard of checkpoint `seq` to the remote `remote_tag`
/// ([`Remote::claim_tag`]) for this process on this node: a file created exclusively in
/// `claims` (shared by every node, like the checkpoint directory), so that each shard is
/// uploaded by one node. A claim is taken over when its holder is gone: a process of this
/// node that no longer exists, or any claim whose lease (`lease`, see [`claim_lease`])
/// ran out without being renewed (a node that died). With `takeover_only`, a shard nobody
/// claimed is left alone ([`Claimed::Unclaimed`]: its own node's uploader will come).
pub fn claim_shard(
    claims: &Path,
    remote_tag: &str,
    seq: u64,
    rank: u32,
    lease: Duration,
    takeover_only: bool,
) -> Result<Claimed, String> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(claims)
        .map_err(|e| format!("cannot create {}: {e}", claims.display()))?;
    // Never claim through a symlink planted in place of our own directory.
    if !std::fs::symlink_metadata(claims).is_ok_and(|m| m.is_dir()) {
        return Err(format!(
            "{} is not a directory (a symlink?); ckpt never follows links planted in the checkpoint directory",
            claims.display()
        ));
    }
    let me = Claim {
        node: node_name(),
        pid: std::process::id(),
        at_ms: crate::store::manifest::now_ms(),
    };
    let path = claim_path(claims, remote_tag, seq, rank);
    let link_ours = || -> std::io::Result<()> {
        let tmp = claims.join(format!(".claim.{}.tmp", crate::store::token()));
        let res = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&serde_json::to_vec(&me).unwrap_or_default())?;
            f.sync_all()?;
            std::fs::hard_link(&tmp, &path)
        })();
        let _ = std::fs::remove_file(&tmp);
        res
    };
    let mut took_over = None;
    for _ in 0..4 {
        if !takeover_only || took_over.is_some() {
            match link_ours() {
                Ok(()) => return Ok(Claimed::Mine { took_over }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot claim {}: {e}", path.display())),
            }
        }
        let raw = match crate::store::io::read_small(&path, 4096) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if takeover_only && took_over.is_none() {
                    return Ok(Claimed::Unclaimed);
                }
                continue;
            }
            Err(_) => Vec::new(),
        };
        let age = claim_age(&path).unwrap_or_default();
        let held: Option<Claim> = serde_json::from_slice(&raw).ok();
        let why = match &held {
            Some(c) if c.node == me.node && c.pid == me.pid => {
                return Ok(Claimed::Mine { took_over })
            }
            Some(c) if c.node == me.node && !pid_alive(c.pid) => format!(
                "{} (pid {}): that uploader is gone",
                crate::store::escape(&c.node),
                c.pid
            ),
            Some(c) if age > lease => format!(
                "{} (pid {}): its lease of {:.0?} ran out {:.1}s ago",
                crate::store::escape(&c.node),
                c.pid,
                lease,
                (age - lease).as_secs_f64()
            ),
            Some(c) => {
                return Ok(Claimed::Held(format!(
                    "{} (pid {})",
                    crate::store::escape(&c.node),
                    c.pid
                )))
            }
            // Unreadable (the content is complete before the link, so this is damage).
            None => "an unreadable claim".to_string(),
        };
        // Take it over: move the stale claim aside, then claim. Whoever moved something
        // else aside (a taker faster than us already claimed) puts it back.
        let tomb = claims.join(format!(".stale.{}", crate::store::token()));
        if std::fs::rename(&path, &tomb).is_err() {
            continue;
        }
        let moved = crate::store::io::read_small(&tomb, 4096).unwrap_or_default();
        if moved != raw {
            let _ = std::fs::hard_link(&tomb, &path);
            let _ = std::fs::remove_file(&tomb);
            continue;
        }
        let _ = std::fs::remove_file(&tomb);
        took_over = Some(why);
        match link_ours() {
            Ok(()) => return Ok(Claimed::Mine { took_over }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot claim {}: {e}", path.display())),
        }
    }
    Err(format!("cannot claim {}: contended", path.display()))
}

/// Renews our claim (its modification time) while it is still ours.
fn renew_claim(path: &Path) -> bool {
    let ours = crate::store::io::read_small(path, 4096)
        .ok()
        .and_then(|b| serde_json::from_slice::<Claim>(&b).ok())
        .is_some_and(|c| c.node == node_name() && c.pid == std::process::id());
    ours && std::fs::OpenOptions::new()
        .write(true)
        .custom_flags_nofollow()
        .open(path)
        .and_then(|f| f.set_modified(std::time::SystemTime::now()))
        .is_ok()
}

trait NoFollow {
    fn custom_flags_nofollow(&mut self) -> &mut Self;
}

impl NoFollow for std::fs::OpenOptions {
    fn custom_flags_nofollow(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NOFOLLOW)
    }
}

/// Runs `f` while renewing the claim at `path` every quarter of `lease`.
fn with_renewed_claim<T>(path: &Path, lease: Duration, f: impl FnOnce() -> T) -> T {
    let (tx, rx) = mpsc::channel::<()>();
    let every = (lease / 4).max(Duration::from_millis(50));
    std::thread::scope(|s| {
        s.spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(every) {
                if !renew_claim(path) {
                    return;
                }
            }
        });
        let out = f();
        drop(tx);
        out
    })
}

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid as i32, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

/// Removes the claims of checkpoints numbered below `oldest` (long handled).
pub fn prune_claims(claims: &Path, oldest: u64) {
    if !std::fs::symlink_metadata(claims).is_ok_and(|m| m.is_dir()) {
        return;
    }
    let Ok(rd) = std::fs::read_dir(claims) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(n) = name.to_str() else { continue };
        let seq = n.split('.').next().and_then(|s| parse_seq(s, false));
        if seq.is_some_and(|s| s < oldest) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// What [`upload_node_shards`] did.
#[derive(Debug, Default)]
pub struct ShardUpload {
    /// Ranks whose shard this call uploaded (or found up).
    pub uploaded: Vec<u32>,
    /// Ranks left to another uploader, with its name.
    pub others: Vec<(u32, String)>,
    /// Ranks whose abandoned claim this call took over: whose it was, and why.
    pub taken_over: Vec<(u32, String)>,
    /// Ranks whose shard is not in this directory (another node's disk).
    pub absent: Vec<u32>,
    pub bytes: u64,
    pub world: u32,
}

/// Whether every file of rank `rank`'s shard is in `dir` with its manifest size.
fn shard_present(dir: &Path, m: &Manifest, rank: u32) -> bool {
    let mut any = false;
    let all = shard_files(m, rank).all(|f| {
        any = true;
        std::fs::symlink_metadata(dir.join(&f.name))
            .is_ok_and(|md| md.is_file() && md.len() == f.size)
    });
    any && all
}

/// Reads rank `rank`'s shard in `dir` and checks every file against the manifest (size and
/// CRC), as a takeover must before it uploads another node's shard.
fn verify_local_shard(dir: &Path, m: &Manifest, rank: u32) -> Result<(), String> {
    for f in shard_files(m, rank) {
        let mut file = crate::store::scan::open_member(dir, &f.name)
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut crc = m.checksum.hasher();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            match file.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => {
                    crc.update(&buf[..k]);
                    size += k as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("read {}: {e}", f.name)),
            }
        }
        if size != f.size || crc.finish() != f.sum {
            return Err(format!(
                "{} in {} does not match the manifest",
                f.name,
                dir.display()
            ));
        }
    }
    Ok(())
}

/// This node's part of the upload of multi-rank checkpoint `seq` at `dir`: the shards of
/// `ranks` (None: every shard in `dir` that no other uploader claimed), each claimed first in
/// `claims`, plus any shard in `dir` whose claim was abandoned (its holder gone, or its lease
/// run out: a node that died mid-upload) once the local copy is checked against the manifest.
/// Each claim is renewed while its shard uploads.
pub fn upload_node_shards(
    remote: &Remote,
    seq: u64,
    dir: &Path,
    claims: &Path,
    ranks: Option<&[u32]>,
) -> Result<ShardUpload, String> {
    let (_, m) = read_local_manifest(seq, dir)?;
    let world = m.world_size.unwrap_or(1);
    let lease = claim_lease();
    let tag = remote.claim_tag();
    let mut out = ShardUpload {
        world,
        ..Default::default()
    };
    for r in 0..world {
        let asked = ranks.is_none_or(|rs| rs.contains(&r));
        if !shard_present(dir, &m, r) {
            if ranks.is_some() && asked {
                return Err(format!(
                    "the shard {} of checkpoint {seq} is not in {}",
                    crate::multi_rank::shard_name(r),
                    dir.display()
                ));
            }
            out.absent.push(r);
            continue;
        }
        match claim_shard(claims, &tag, seq, r, lease, !asked)? {
            Claimed::Held(holder) => out.others.push((r, holder)),
            Claimed::Unclaimed => {}
            Claimed::Mine { took_over } => {
                let path = claim_path(claims, &tag, seq, r);
                if let Some(why) = took_over {
                    if let Err(e) = verify_local_shard(dir, &m, r) {
                        let _ = std::fs::remove_file(&path);
                        return Err(format!(
                            "cannot take over the upload of shard {} of checkpoint {seq} from {why}: {e}",
                            crate::multi_rank::shard_name(r)
                        ));
                    }
                    out.taken_over.push((r, why));
                }
                out.bytes += with_renewed_claim(&path, lease, || remote.upload_shard(seq, dir, r))?;
                out.uploaded.push(r);
            }
        }
    }
    Ok(out)
}

/// Whether local checkpoint `dir` is a multi-rank one (its manifest's `world_size` > 1).
pub fn is_multi_rank(dir: &Path) -> bool {
    crate::store::io::read_small(&dir.join(MANIFEST_NAME), limits::MANIFEST_BYTES)
        .ok()
        .and_then(|b| Manifest::decode(&b).ok())
        .and_then(|m| m.world_size)
        .is_some_and(|n| n > 1)
}

/// The uploader's upload of a multi-rank checkpoint: this node's shards, then, polling
/// until every other shard is up (or `give_up` says so), the remote commit. While it waits
/// it looks again at the claims now and then: a shard whose uploader died is taken over once
/// its lease runs out.
fn upload_multi_rank(
    remote: &Remote,
    seq: u64,
    dir: &Path,
    shards: &ShardCfg,
    give_up: &dyn Fn() -> bool,
    log: &dyn Fn(Report),
) -> Result<u64, String> {
    let claims = &shards.claims;
    let node = |remote: &Remote| -> Result<ShardUpload, String> {
        let up = upload_node_shards(remote, seq, dir, claims, shards.ranks.as_deref())?;
        for (r, why) in &up.taken_over {
            log(report(
                "upload_taken_over",
                true,
                format!(
                    "checkpoint {seq}: took over the upload of shard {} from {why}",
                    crate::multi_rank::shard_name(*r)
                ),
                json!({ "seq": seq, "rank": r, "from": why }),
            ));
        }
        Ok(up)
    };
    let mut mine = node(remote)?;
    let mut bytes = mine.bytes;
    let t = Instant::now();
    let relook = (claim_lease() / 2).min(Duration::from_secs(5));
    let mut looked = Instant::now();
    loop {
        match remote.publish_shards(seq, dir)? {
            Publish::Done(b) => return Ok(bytes + b),
            Publish::Missing(missing) => {
                if give_up() || t.elapsed() >= shards.wait {
                    let by: Vec<String> = missing
                        .iter()
                        .map(|r| match mine.others.iter().find(|(o, _)| o == r) {
                            Some((_, h)) => format!("rank {r} (claimed by {h})"),
                            None if mine.absent.contains(r) => {
                                format!("rank {r} (not in this directory: its node uploads it)")
                            }
                            None => format!("rank {r} (not claimed: no uploader of its node)"),
                        })
                        .collect();
                    return Err(format!(
                        "shard(s) of {} are not up after {:.1}s: the remote manifest is not written",
                        by.join(", "),
                        t.elapsed().as_secs_f64()
                    ));
                }
                if looked.elapsed() >= relook {
                    looked = Instant::now();
                    mine = node(remote)?;
                    bytes += mine.bytes;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    }
}

/// How the uploader handles multi-rank checkpoints.
#[derive(Debug, Clone)]
pub struct ShardCfg {
    /// Where the shard upload claims live (`DIR/.ckpt/uploads`).
    pub claims: PathBuf,
    /// `--remote-ranks`: the shards this node uploads (None: every unclaimed one).
    pub ranks: Option<Vec<u32>>,
    /// How long one attempt waits for the other nodes' shards.
    pub wait: Duration,
}

/// A set of ranks on the command line (`0,2,4-7`), for clap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ranks(pub Vec<u32>);

/// [`parse_ranks`] for clap.
pub fn parse_rank_set(s: &str) -> Result<Ranks, String> {
    parse_ranks(s).map(Ranks)
}

/// Parses `--ranks`/`--remote-ranks`: `0,2,4-7`.
pub fn parse_ranks(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("{part:?}: give ranks as N, N-M, or a comma-separated list of them");
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) =
                    (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b - a > 1 << 20 {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().map_err(|_| bad())?),
        }
    }
    if out.is_empty() {
        return Err("no ranks given".into());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// The remotes a directory was uploaded to, and rollbacks

/// Where a directory remembers the remotes it was uploaded to (for `ckpt rollback`).
const REMEMBERED: &str = "remotes.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct RememberedRemote {
    url: String,
    allow_http: bool,
    /// Absolute key paths (empty: the default key).
    keys: Vec<PathBuf>,
}

fn remembered(store: &Store) -> Vec<RememberedRemote> {
    crate::store::io::read_small(&store.private().join(REMEMBERED), 1 << 20)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Records in `DIR/.ckpt/remotes.json` that `store` is uploaded to the remote of `s` (its
/// URL, `--remote-allow-http` and key paths; never a credential), so that `ckpt rollback`
/// can roll the remote back too. At most 8 remotes, the most recent last. Best effort.
pub fn remember(s: &Settings, store: &Store) {
    let me = RememberedRemote {
        url: s.url.clone(),
        allow_http: s.allow_http,
        keys: s
            .keys
            .iter()
            .map(|k| std::path::absolute(k).unwrap_or_else(|_| k.clone()))
            .collect(),
    };
    let mut all = remembered(store);
    if all.last() == Some(&me) {
        return;
    }
    all.retain(|r| r.url != me.url);
    all.push(me);
    let drop = all.len().saturating_sub(8);
    all.drain(..drop);
    if let Ok(b) = serde_json::to_vec_pretty(&all) {
        let path = store.private().join(REMEMBERED);
        let tmp = store
            .private()
            .join(format!(".{REMEMBERED}.{}.tmp", crate::store::token()));
        if crate::store::io::write_owner_only(&tmp, &b).is_ok()
            && std::fs::rename(&tmp, &path).is_err()
        {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Opens a remote [`remember`]ed by a directory, with the credentials of this environment.
fn open_remembered(rr: &RememberedRemote) -> Result<Remote, String> {
    Remote::open(&Settings {
        url: rr.url.clone(),
        allow_http: rr.allow_http,
        keys: rr.keys.clone(),
        keep: None,
        required: false,
        stop_timeout: Duration::ZERO,
        ranks: None,
    })
}

/// What `ckpt tag`/`untag` did to one remote the directory is uploaded to.
#[derive(Debug, Clone)]
pub struct RemoteTagUpdate {
    /// The remote, as shown (no credentials).
    pub remote: String,
    /// Whether its tag record changed; or what went wrong.
    pub result: Result<bool, String>,
}

/// After `ckpt tag`/`untag`: applies `f` to the tag record ([`TAGS_NAME`]) of every remote
/// the directory is uploaded to ([`remember`]).
pub fn update_remembered_tags(
    store: &Store,
    f: &mut dyn FnMut(&mut BTreeMap<String, u64>),
) -> Vec<RemoteTagUpdate> {
    remembered(store)
        .into_iter()
        .map(|rr| match open_remembered(&rr) {
            Ok(r) => RemoteTagUpdate {
                remote: r.display.clone(),
                result: r.update_tags(&mut *f).map_err(|e| redact(&e)),
            },
            Err(e) => RemoteTagUpdate {
                remote: url::Url::parse(&rr.url)
                    .map(|u| display_url(&u))
                    .unwrap_or_else(|_| rr.url.clone()),
                result: Err(redact(&e)),
            },
        })
        .collect()
}

/// What a rollback did to one remote.
#[derive(Debug, Clone)]
pub struct RemoteRollback {
    /// The checkpoint rolled back to.
    pub seq: u64,
    /// The remote, as shown (no credentials).
    pub remote: String,
    /// Remote checkpoints above the rollback target, removed.
    pub removed: Vec<u64>,
    /// Whether a finished record was there (removed).
    pub was_finished: bool,
    /// What went wrong, if anything (the rest was still tried).
    pub error: Option<String>,
}

/// After a local rollback to checkpoint `seq`: on every remote the directory was uploaded to
/// ([`remember`]), removes the finished record (the job is not finished any more) and every
/// remote checkpoint numbered above `seq` (the rolled-back ones: a new machine resumes from
/// `seq`, as this one does; the local copies stay in `rolled-back/`).
pub fn after_rollback(store: &Store, seq: u64) -> Vec<RemoteRollback> {
    remembered(store)
        .into_iter()
        .map(|rr| {
            let mut out = RemoteRollback {
                seq,
                remote: rr.url.clone(),
                removed: Vec::new(),
                was_finished: false,
                error: None,
            };
            let remote = match open_remembered(&rr) {
                Ok(r) => r,
                Err(e) => {
                    out.error = Some(redact(&e));
                    return out;
                }
            };
            out.remote = remote.display.clone();
            let mut errs = Vec::new();
            match remote.finished() {
                // A record that does not authenticate counts for nothing: left alone.
                Ok(Finished::No | Finished::Invalid(_)) => {}
                Ok(Finished::Yes { .. }) => {
                    out.was_finished = true;
                    if let Err(e) = remote.clear_finished() {
                        errs.push(e);
                    }
                }
                Err(e) => errs.push(e),
            }
            let visible = remote.list();
            match (remote.list_dirs(), visible) {
                (Ok(seqs), Ok(visible)) => {
                    for s in seqs.into_iter().filter(|s| *s > seq) {
                        // Checkpoints that do not authenticate are someone else's (never
                        // restored anyway): left alone, as by `ckpt gc --remote`.
                        if visible.contains(&s) && remote.check(s).is_err() {
                            continue;
                        }
                        match remote.remove(s) {
                            Ok(()) => out.removed.push(s),
                            Err(e) => errs.push(e),
                        }
                    }
                }
                (Err(e), _) | (_, Err(e)) => errs.push(e),
            }
            if !errs.is_empty() {
                out.error = Some(redact(&errs.join("; ")));
            }
            out
        })
        .collect()
}

impl RemoteRollback {
    /// One line for a person (what was done, or what failed).
    pub fn human(&self) -> String {
        let removed = if self.removed.is_empty() {
            "no newer checkpoint there".to_string()
        } else {
            format!(
                "removed checkpoint{} {} there",
                if self.removed.len() == 1 { "" } else { "s" },
                self.removed
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let finished = if self.was_finished {
            "; removed its finished record (a new machine resumes the job)"
        } else {
            ""
        };
        match &self.error {
            None => format!("remote {}: {removed}{finished}", self.remote),
            Some(e) => format!(
                "remote {} NOT fully rolled back: {e} ({removed}{finished}); a new machine may still restore a rolled-back checkpoint or take the job as finished (hint: run `ckpt rollback {}` again once the remote is reachable)",
                self.remote, self.seq
            ),
        }
    }

    /// The same as an event for the supervisor's log.
    pub fn report(&self) -> Report {
        report(
            if self.error.is_some() {
                "remote_rollback_failed"
            } else {
                "remote_rolled_back"
            },
            self.error.is_some(),
            self.human(),
            self.json(),
        )
    }

    pub fn json(&self) -> Value {
        json!({ "remote": self.remote, "removed": self.removed, "finished_cleared": self.was_finished, "error": self.error })
    }
}

// ---------------------------------------------------------------------------------------
// Restore before a launch

/// Restores the newest remote checkpoint newer than `local_newest` that authenticates and
/// verifies (trying older ones down to `local_newest`), publishing it in `store`. Returns
/// the local sequence number, if one was restored.
pub fn restore_newer(
    remote: &Remote,
    store: &Store,
    local_newest: u64,
    log: &mut dyn FnMut(Report),
) -> Option<u64> {
    let seqs = match remote.list() {
        Ok(s) => s,
        Err(e) => {
            log(report(
                "remote_list_failed",
                true,
                format!("cannot list remote checkpoints: {e}; resuming from the local directory"),
                json!({ "remote": remote.display, "error": redact(&e) }),
            ));
            return None;
        }
    };
    let highest = seqs.last().copied().unwrap_or(0);
    let (mut failed, mut invalid) = (Vec::new(), Vec::new());
    for seq in seqs.into_iter().rev().filter(|s| *s > local_newest) {
        let t = Instant::now();
        // The newest keeps its number (it is already remote). An older one, restored because
        // newer ones failed, is numbered above them all: the job's next checkpoints never
        // take the number of a broken remote one, and this one is uploaded again as sound.
        let min_seq = if seq == highest { seq } else { highest + 1 };
        match remote.restore(seq, min_seq, store) {
            Ok((m, bytes)) => {
                let secs = t.elapsed().as_secs_f64();
                for r in invalid.drain(..) {
                    log(r);
                }
                log(report(
                    "remote_restored",
                    false,
                    format!(
                        "restored remote checkpoint {seq}{} from {} as local checkpoint {} ({} in {secs:.2}s, {}/s)",
                        m.step.map(|s| format!(" (step {s})")).unwrap_or_default(),
                        remote.display,
                        m.seq,
                        crate::fmt::fmt_bytes(bytes),
                        crate::fmt::fmt_bytes((bytes as f64 / secs.max(1e-6)) as u64),
                    ),
                    json!({ "remote": remote.display, "remote_seq": seq, "seq": m.seq, "step": m.step, "bytes": bytes, "duration_ms": t.elapsed().as_millis() as u64 }),
                ));
                return Some(m.seq);
            }
            Err(e) => {
                failed.push(seq);
                invalid.push(report(
                    "remote_invalid",
                    true,
                    format!(
                        "remote checkpoint {seq} on {} is not restored: {e}; trying an older one",
                        remote.display
                    ),
                    json!({ "remote": remote.display, "remote_seq": seq, "reason": redact(&e) }),
                ));
            }
        }
    }
    // When none of them is ours, one warning says so (each stays in the events).
    let none_ours = warn_none_ours(remote, &failed);
    for mut r in invalid {
        if none_ours.is_some() {
            r.human.clear();
        }
        log(r);
    }
    if let Some(r) = none_ours {
        log(r);
    }
    None
}

/// After a restore found nothing: when none of the remote checkpoints it tried authenticates
/// with our keys (a machine without the job's key file, or a prefix that is someone else's),
/// one warning naming how many, the key ids their records name, our key's path and the fix
/// (then the caller logs each one's `remote_invalid` as an event only).
/// The job starts from its beginning all the same (a planted record must not stop a job);
/// its uploader never takes those checkpoints for its own (`remote_conflict`).
fn warn_none_ours(remote: &Remote, failed: &[u64]) -> Option<Report> {
    if failed.is_empty() || failed.iter().any(|s| remote.check(*s).is_ok()) {
        return None;
    }
    let mut keys: Vec<String> = failed
        .iter()
        .filter_map(|s| remote.record_key(*s))
        .filter(|k| !remote.has_key(k))
        .collect();
    keys.sort();
    keys.dedup();
    let (lo, hi) = (
        failed.iter().min().unwrap_or(&0),
        failed.iter().max().unwrap_or(&0),
    );
    let n = failed.len();
    Some(report(
        "remote_not_ours",
        true,
        format!(
            "{} holds {n} checkpoint{} ({}) but none authenticates with this machine's key {}{}{}: nothing restored, the job starts from its beginning; its checkpoints numbered like those are not uploaded and do not count as off the machine (remote_conflict), and those are never overwritten; {}",
            remote.display,
            if n == 1 { "" } else { "s" },
            if lo == hi { format!("number {lo}") } else { format!("numbers {lo} to {hi}") },
            remote.key_id(),
            remote
                .key_path()
                .map(|p| format!(" ({})", p.display()))
                .unwrap_or_default(),
            if keys.is_empty() {
                String::new()
            } else {
                format!("; they are signed with key {}", keys.join(", "))
            },
            remote.key_hint()
        ),
        json!({ "remote": remote.display, "count": n, "seqs": failed, "keys": keys, "our_key": remote.key_id(), "key_path": remote.key_path() }),
    ))
}

// ---------------------------------------------------------------------------------------
// The uploader thread

#[derive(Default)]
struct UpState {
    /// Submitted, not yet handled: seq → (path, committed at).
    pending: std::collections::BTreeMap<u64, (PathBuf, Instant)>,
    /// Being uploaded now, and when it committed.
    current: Option<u64>,
    current_since: Option<Instant>,
    /// Uploaded (or found already uploaded).
    done: BTreeSet<u64>,
    /// Newest seq whose upload failed for good.
    failed: Option<u64>,
    /// Local checkpoints not uploaded because the remote holds another checkpoint (or one
    /// that does not authenticate) under their number: seq → why (for the stop's message).
    conflicts: BTreeMap<u64, String>,
    /// The last successful upload: seq, bytes, duration, lag (ms), when (ms since epoch).
    last: Option<(u64, u64, u64, u64, u64)>,
}

/// Uploads committed checkpoints on its own thread; never blocks the caller.
pub struct Uploader {
    remote: Arc<Remote>,
    state: Arc<(Mutex<UpState>, Condvar)>,
    tx: mpsc::Sender<()>,
}

impl Uploader {
    /// Starts the thread. `log` receives its reports; `local_tags` is asked for the local
    /// directory's tags (recorded on the remote, and kept by retention with the remote's).
    pub fn start(
        remote: Arc<Remote>,
        keep: Option<usize>,
        shards: ShardCfg,
        local_tags: LocalTags,
        log: Box<dyn Fn(Report) + Send>,
    ) -> std::io::Result<Uploader> {
        let state: Arc<(Mutex<UpState>, Condvar)> = Arc::default();
        let (tx, rx) = mpsc::channel::<()>();
        let (r, st) = (remote.clone(), state.clone());
        std::thread::Builder::new()
            .name("ckpt-upload".into())
            .spawn(move || upload_loop(r, st, rx, keep, shards, local_tags, log))?;
        Ok(Uploader { remote, state, tx })
    }

    pub fn remote(&self) -> &Remote {
        &self.remote
    }

    /// Queues local checkpoint `seq` (at `path`); older queued ones are superseded.
    pub fn submit(&self, seq: u64, path: PathBuf) {
        let (m, cv) = &*self.state;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        if g.done.contains(&seq) || g.current == Some(seq) {
            return;
        }
        g.pending.insert(seq, (path, Instant::now()));
        cv.notify_all();
        drop(g);
        let _ = self.tx.send(());
    }

    /// The checkpoints the uploader is reading or about to (local retention keeps them).
    pub fn busy(&self) -> Vec<u64> {
        let g = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        g.current
            .into_iter()
            .chain(g.pending.keys().copied())
            .collect()
    }

    /// For `ckpt status`: the remote, the newest checkpoint on it, the last upload's
    /// figures, what is queued. No credentials.
    pub fn summary(&self) -> Value {
        let g = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        // How long the oldest checkpoint not yet off the machine has been waiting.
        let behind = g
            .current_since
            .into_iter()
            .chain(g.pending.values().map(|(_, at)| *at))
            .min()
            .map(|at| at.elapsed().as_millis() as u64);
        json!({
            "url": self.remote.display,
            "behind_ms": behind,
            "newest_uploaded": g.done.iter().next_back(),
            "uploading": g.current,
            "queued": g.pending.keys().collect::<Vec<_>>(),
            "failed": g.failed,
            "conflicts": g.conflicts.keys().collect::<Vec<_>>(),
            "last_upload": g.last.map(|(seq, bytes, ms, lag, at)| json!({
                "seq": seq, "bytes": bytes, "duration_ms": ms, "lag_ms": lag, "at_ms": at,
                "bytes_per_s": (bytes * 1000).checked_div(ms).unwrap_or(0),
            })),
        })
    }

    pub fn uploaded(&self, seq: u64) -> bool {
        let g = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        g.done.iter().any(|s| *s >= seq)
    }

    /// Why local checkpoint `seq` was not uploaded, when the remote holds a different
    /// checkpoint under its number (a conflict).
    pub fn conflict(&self, seq: u64) -> Option<String> {
        let g = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
        g.conflicts.get(&seq).cloned()
    }

    /// Waits until nothing is queued or uploading, or `until`. True when idle.
    pub fn wait_idle(&self, until: Instant) -> bool {
        let (m, cv) = &*self.state;
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if g.pending.is_empty() && g.current.is_none() {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            g = cv
                .wait_timeout(g, (until - now).min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The local directory's tags, name to checkpoint (the uploader asks after each upload).
pub type LocalTags = Box<dyn Fn() -> Result<BTreeMap<String, u64>, String> + Send>;

/// What the uploader knows of the remote tag record.
#[derive(Default)]
struct TagSync {
    /// The local tags last merged into the remote record.
    synced: Option<BTreeMap<String, u64>>,
    /// The last problem reported (said once, not after every upload).
    said: Option<String>,
}

impl TagSync {
    fn warn_once(&mut self, log: &dyn Fn(Report), event: &'static str, human: String) {
        if self.said.as_deref() != Some(human.as_str()) {
            self.said = Some(human.clone());
            log(report(
                event,
                true,
                human.clone(),
                json!({ "error": redact(&human) }),
            ));
        }
    }
}

fn upload_loop(
    remote: Arc<Remote>,
    state: Arc<(Mutex<UpState>, Condvar)>,
    rx: mpsc::Receiver<()>,
    keep: Option<usize>,
    shards: ShardCfg,
    local_tags: LocalTags,
    log: Box<dyn Fn(Report) + Send>,
) {
    let mut tag_sync = TagSync::default();
    let (m, cv) = &*state;
    loop {
        // The newest pending checkpoint; older ones are superseded by it.
        let next = {
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            let newest = g.pending.keys().next_back().copied();
            match newest {
                None => None,
                Some(seq) => {
                    let (path, at) = g.pending.remove(&seq).expect("present");
                    let skipped: Vec<u64> = g.pending.keys().copied().collect();
                    g.pending.clear();
                    g.current = Some(seq);
                    g.current_since = Some(at);
                    Some((seq, path, at, skipped))
                }
            }
        };
        let Some((seq, path, committed_at, skipped)) = next else {
            if rx.recv().is_err() {
                return;
            }
            continue;
        };
        if !skipped.is_empty() {
            log(report(
                "upload_skipped",
                false,
                format!(
                    "not uploading checkpoint{} {}: checkpoint {seq} is newer",
                    if skipped.len() == 1 { "" } else { "s" },
                    skipped
                        .iter()
                        .map(|s| s.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                json!({ "seqs": skipped, "newer": seq }),
            ));
        }
        let res = upload_one(&remote, seq, &path, committed_at, &state, &shards, &*log);
        let ok = res == Up::Done;
        prune_claims(&shards.claims, seq.saturating_sub(64));
        // Before the upload counts as done: a stop waiting for the uploads also waits for
        // the retention that follows them.
        if ok {
            let local = local_tags();
            sync_tags(&remote, &local, &mut tag_sync, &*log);
            if let Some(keep) = keep {
                prune(&remote, keep, &local, &mut tag_sync, &*log);
            }
        }
        {
            let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
            g.current = None;
            g.current_since = None;
            match res {
                Up::Done => {
                    g.done.insert(seq);
                }
                Up::Failed => g.failed = Some(seq),
                Up::Conflict(why) => {
                    g.failed = Some(seq);
                    g.conflicts.insert(seq, why);
                }
            }
            cv.notify_all();
        }
    }
}

/// How [`upload_one`] ended.
#[derive(Debug, PartialEq, Eq)]
enum Up {
    /// Uploaded, or the remote already held this very checkpoint.
    Done,
    Failed,
    /// The remote holds another checkpoint under its number: not overwritten, not up.
    Conflict(String),
}

/// One checkpoint, retried with backoff until it is up, a newer one is queued, or 8 tries.
/// Before each try it looks at what the remote holds under the number: this very checkpoint
/// counts as up; anything else (another writer's, or one that does not authenticate with our
/// keys: it may be the job's own, signed with a key not given here) is a conflict.
fn upload_one(
    remote: &Remote,
    seq: u64,
    path: &Path,
    committed_at: Instant,
    state: &Arc<(Mutex<UpState>, Condvar)>,
    shards: &ShardCfg,
    log: &dyn Fn(Report),
) -> Up {
    let newer = || {
        state
            .0
            .lock()
            .map(|g| g.pending.keys().any(|s| *s > seq))
            .unwrap_or(false)
    };
    let multi = is_multi_rank(path);
    let rec = |bytes: u64, ms: u64, lag: u64| {
        let mut g = state.0.lock().unwrap_or_else(|e| e.into_inner());
        g.last = Some((seq, bytes, ms, lag, crate::store::manifest::now_ms()));
    };
    let mut pause = Duration::from_millis(500);
    for attempt in 1..=8u32 {
        let t = Instant::now();
        let res = match remote.presence(seq, path) {
            Ok(Presence::Same) => {
                log(report(
                    "upload_present",
                    false,
                    format!("checkpoint {seq} is already on {}", remote.display),
                    json!({ "seq": seq, "remote": remote.display }),
                ));
                return Up::Done;
            }
            Ok(Presence::Conflict(c)) => {
                let why = format!(
                    "{} already holds a different checkpoint {seq}: {}",
                    remote.display, c.why
                );
                log(report(
                    "remote_conflict",
                    true,
                    format!(
                        "checkpoint {seq} is NOT uploaded: {why}; not overwritten (it may be this job's, read with the wrong key), and checkpoint {seq} stays only on this machine; {}",
                        remote.key_hint()
                    ),
                    json!({ "seq": seq, "remote": remote.display, "reason": redact(&c.why), "key": c.foreign_key, "our_key": remote.key_id(), "key_path": remote.key_path() }),
                ));
                return Up::Conflict(why);
            }
            Ok(Presence::Absent) if multi => {
                upload_multi_rank(remote, seq, path, shards, &newer, log)
            }
            Ok(Presence::Absent) => remote.upload(seq, path),
            Err(e) => Err(e),
        };
        match res {
            Ok(bytes) => {
                let secs = t.elapsed().as_secs_f64();
                let lag = committed_at.elapsed();
                rec(
                    bytes,
                    t.elapsed().as_millis() as u64,
                    lag.as_millis() as u64,
                );
                log(report(
                    "uploaded",
                    false,
                    format!(
                        "checkpoint {seq} uploaded to {} ({} in {secs:.2}s, {}/s; off the machine {:.2}s after it committed{})",
                        remote.display,
                        crate::fmt::fmt_bytes(bytes),
                        crate::fmt::fmt_bytes((bytes as f64 / secs.max(1e-6)) as u64),
                        lag.as_secs_f64(),
                        if attempt > 1 { format!(", attempt {attempt}") } else { String::new() }
                    ),
                    json!({ "seq": seq, "remote": remote.display, "bytes": bytes, "duration_ms": t.elapsed().as_millis() as u64, "lag_ms": lag.as_millis() as u64, "attempt": attempt, "bytes_per_s": (bytes as f64 / secs.max(1e-6)) as u64 }),
                ));
                return Up::Done;
            }
            Err(e) => {
                let vanished = std::fs::symlink_metadata(path).is_err();
                let newer = newer();
                let give_up = vanished || newer || attempt == 8;
                log(report(
                    "upload_failed",
                    true,
                    format!(
                        "upload of checkpoint {seq} to {} failed (attempt {attempt}): {e}; {}",
                        remote.display,
                        if vanished {
                            "it was removed locally: giving up on it".to_string()
                        } else if newer {
                            "a newer checkpoint is queued: giving up on this one".to_string()
                        } else if give_up {
                            "giving up on it".to_string()
                        } else {
                            format!("retrying in {:.1}s", pause.as_secs_f64())
                        }
                    ),
                    json!({ "seq": seq, "remote": remote.display, "attempt": attempt, "error": redact(&e) }),
                ));
                if give_up {
                    return Up::Failed;
                }
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(15));
            }
        }
    }
    Up::Failed
}

/// Merges the local tags into the remote tag record when they changed since the last time
/// (a tag made here reaches the remote with the next upload, whether or not `ckpt tag` could
/// reach it). Only adds or moves names: a name removed here is removed there by `ckpt untag`.
fn sync_tags(
    remote: &Remote,
    local: &Result<BTreeMap<String, u64>, String>,
    st: &mut TagSync,
    log: &dyn Fn(Report),
) {
    let Ok(local) = local else {
        return; // retention reports it
    };
    if st.synced.as_ref() == Some(local) {
        return;
    }
    match remote.update_tags(|t| t.extend(local.iter().map(|(n, s)| (n.clone(), *s)))) {
        Ok(changed) => {
            if changed {
                log(report(
                    "remote_tags",
                    false,
                    format!(
                        "tags recorded on {}: {}",
                        remote.display,
                        local
                            .iter()
                            .map(|(n, s)| format!("{n}={s}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    json!({ "remote": remote.display, "tags": local }),
                ));
            }
            st.synced = Some(local.clone());
        }
        Err(e) => st.warn_once(
            log,
            "remote_tags_failed",
            format!(
                "cannot record the tags on {}: {e}; remote retention here still keeps the checkpoints tagged in the local directory",
                remote.display
            ),
        ),
    }
}

/// Remote retention: keeps the newest `keep` remote checkpoints that authenticate with our
/// keys (the others are left alone) and every one tagged in the local directory (`local`) or
/// in the remote tag record ([`TAGS_NAME`]; one that does not authenticate protects
/// nothing). Removes nothing when either cannot be read.
fn prune(
    remote: &Remote,
    keep: usize,
    local: &Result<BTreeMap<String, u64>, String>,
    st: &mut TagSync,
    log: &dyn Fn(Report),
) {
    let local = match local {
        Ok(l) => l,
        Err(e) => {
            st.warn_once(
                log,
                "remote_prune_failed",
                format!("remote retention: cannot read the local tags ({e}); nothing removed"),
            );
            return;
        }
    };
    let remote_tags = match remote.tags() {
        Ok(RemoteTags::Invalid(why)) => {
            st.warn_once(
                log,
                "remote_tags_invalid",
                format!(
                    "{} holds a tag record ({TAGS_NAME}) that does not authenticate ({why}); ignored: it protects nothing",
                    remote.display
                ),
            );
            BTreeMap::new()
        }
        Ok(t) => t.valid(),
        Err(e) => {
            log(report(
                "remote_prune_failed",
                true,
                format!("remote retention: cannot read the remote tags ({e}); nothing removed"),
                json!({ "error": redact(&e) }),
            ));
            return;
        }
    };
    let protected: BTreeSet<u64> = local
        .values()
        .chain(remote_tags.values())
        .copied()
        .collect();
    let listed = match remote.list() {
        Ok(s) => s,
        Err(e) => {
            log(report(
                "remote_prune_failed",
                true,
                format!("remote retention: {e}"),
                json!({ "error": redact(&e) }),
            ));
            return;
        }
    };
    // Only checkpoints that authenticate with our keys count and go, as with `ckpt gc
    // --remote`: the others are someone else's (or this job's, signed with a key not given
    // here: a machine without the job's key file must not prune its owner's checkpoints).
    let seqs: Vec<u64> = listed
        .iter()
        .copied()
        .filter(|s| remote.check(*s).is_ok())
        .collect();
    let cut = seqs.len().saturating_sub(keep);
    // Also the leftovers older than every checkpoint kept: objects of checkpoints that never
    // got their manifest (an upload cut short, a multi-rank checkpoint whose shards did not
    // all come), invisible and never restorable.
    let oldest_kept = seqs.get(cut).copied().unwrap_or(0);
    let leftovers: Vec<u64> = remote
        .list_dirs()
        .unwrap_or_default()
        .into_iter()
        .filter(|s| *s < oldest_kept && !listed.contains(s))
        .collect();
    let mut gone = Vec::new();
    for &s in seqs[..cut].iter().chain(&leftovers) {
        if protected.contains(&s) {
            continue;
        }
        match remote.remove(s) {
            Ok(()) => gone.push(s),
            Err(e) => log(report(
                "remote_prune_failed",
                true,
                format!("remote retention could not remove checkpoint {s}: {e}"),
                json!({ "seq": s, "error": redact(&e) }),
            )),
        }
    }
    if !gone.is_empty() {
        log(report(
            "remote_pruned",
            false,
            format!(
                "remote retention removed checkpoint{} {} from {}",
                if gone.len() == 1 { "" } else { "s" },
                gone.iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                remote.display
            ),
            json!({ "seqs": gone, "remote": remote.display }),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        assert_eq!(
            unhex(&hex(&[0, 1, 0xab, 0xff])).unwrap(),
            vec![0, 1, 0xab, 0xff]
        );
        assert!(unhex("abc").is_none());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn tags_check() {
        let k = Keys::from_bytes(b"0123456789abcdef0123456789abcdef");
        let (id, tag) = k.sign(b"body");
        assert!(k.verify(&id, b"body", &tag).is_ok());
        assert!(k.verify(&id, b"bodx", &tag).is_err());
        assert!(k.verify("other", b"body", &tag).is_err());
        let k2 = Keys::from_bytes(b"another key, 32 bytes long......");
        assert!(k2.verify(&id, b"body", &tag).is_err());
    }

    #[test]
    fn key_created_once_owner_only_even_when_raced() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("ckpt-key-test-{}", std::process::id()));
        let p = d.join("sub").join("remote.key");
        let ids: Vec<String> = (0..4)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || Keys::load(&[p]).unwrap().signing_id().to_string())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        assert!(ids.iter().all(|i| *i == ids[0]), "{ids:?}");
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Keys::load(std::slice::from_ref(&p))
            .unwrap_err()
            .contains("chmod 600"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn shard_claims_are_exclusive_and_abandoned_ones_are_taken_over() {
        let d = std::env::temp_dir().join(format!("ckpt-claim-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let lease = Duration::from_secs(60);
        let mine = Claimed::Mine { took_over: None };
        // Ours: claimed, and claiming again is a no-op.
        assert_eq!(claim_shard(&d, "r1", 5, 0, lease, false).unwrap(), mine);
        assert_eq!(claim_shard(&d, "r1", 5, 0, lease, false).unwrap(), mine);
        let path = d.join("ckpt-000000000005.rank-00001.r1");
        // Nobody's claim: left alone when only abandoned ones are to be taken over.
        assert_eq!(
            claim_shard(&d, "r1", 5, 1, lease, true).unwrap(),
            Claimed::Unclaimed
        );
        // Another node's claim is respected while its lease runs.
        std::fs::write(&path, br#"{"node":"elsewhere","pid":1}"#).unwrap();
        for only in [false, true] {
            assert_eq!(
                claim_shard(&d, "r1", 5, 1, lease, only).unwrap(),
                Claimed::Held("elsewhere (pid 1)".into())
            );
        }
        // ... and taken over once it ran out without being renewed (a node that died).
        let old = std::time::SystemTime::now() - Duration::from_secs(61);
        let age = || {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(old)
                .unwrap()
        };
        age();
        match claim_shard(&d, "r1", 5, 1, lease, true).unwrap() {
            Claimed::Mine { took_over: Some(w) } => {
                assert!(w.starts_with("elsewhere (pid 1): its lease"), "{w}")
            }
            other => panic!("{other:?}"),
        }
        let now: Claim = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
        // Renewed while ours: its age starts again.
        age();
        assert!(renew_claim(&path));
        assert!(claim_age(&path).unwrap() < Duration::from_secs(5));
        // Another remote is another claim.
        assert_eq!(claim_shard(&d, "r2", 5, 1, lease, false).unwrap(), mine);
        // A claim of a process of this node that is gone is taken over at once.
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let dead = c.id();
        c.wait().unwrap();
        let body = serde_json::to_vec(&Claim {
            node: node_name(),
            pid: dead,
            at_ms: 0,
        })
        .unwrap();
        std::fs::write(&path, body).unwrap();
        assert!(matches!(
            claim_shard(&d, "r1", 5, 1, lease, false).unwrap(),
            Claimed::Mine { took_over: Some(_) }
        ));
        let now: Claim = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(now.pid, std::process::id());
        // A live process of this node keeps its claim, and ours is not renewed any more.
        let body = serde_json::to_vec(&Claim {
            node: node_name(),
            pid: 1,
            at_ms: 0,
        })
        .unwrap();
        std::fs::write(&path, body).unwrap();
        assert!(matches!(
            claim_shard(&d, "r1", 5, 1, lease, false).unwrap(),
            Claimed::Held(_)
        ));
        assert!(!renew_claim(&path));
        prune_claims(&d, 6);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn ranks_parse() {
        assert_eq!(parse_ranks("0").unwrap(), vec![0]);
        assert_eq!(parse_ranks("4-7,1,5").unwrap(), vec![1, 4, 5, 6, 7]);
        assert!(parse_ranks("").is_err());
        assert!(parse_ranks("3-1").is_err());
        assert!(parse_ranks("a").is_err());
        assert!(parse_ranks("0-99999999").is_err());
    }

    #[test]
    fn loopback() {
        assert!(is_loopback_url("http://127.0.0.1:9000"));
        assert!(is_loopback_url("http://localhost:9000/"));
        assert!(is_loopback_url("http://[::1]:9000"));
        assert!(!is_loopback_url("http://10.0.0.1:9000"));
        assert!(!is_loopback_url("http://s3.example.com"));
    }

    #[test]
    fn display_hides_credentials() {
        let u = url::Url::parse("s3://user:secret@bucket/prefix?token=abc").unwrap();
        let d = display_url(&u);
        assert!(!d.contains("secret") && !d.contains("abc"), "{d}");
    }
}
