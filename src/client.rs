//! The client API: what runs inside a job. Works under `ckpt run` (it then speaks the
//! protocol of `docs/protocol.md`) and standalone (it then finds its own restore point).
//!
//! ```no_run
//! use ckpt::Checkpointer;
//! #[derive(serde::Serialize, serde::Deserialize, Default)]
//! struct State { step: u64, weights: Vec<f32> }
//!
//! let mut ck = Checkpointer::from_env()?;
//! let mut state: State = ck.restore()?.unwrap_or_default();
//! while state.step < 1000 {
//!     state.step += 1; // ... one unit of work ...
//!     if ck.should_checkpoint() {
//!         ck.save_at(state.step, &state)?;
//!     }
//!     if ck.should_stop() {
//!         return Ok(()); // exit 0: the supervisor knows it was asked to stop
//!     }
//! }
//! # Ok::<(), ckpt::Error>(())
//! ```

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::pod::{self, Pod};
use crate::protocol::{self, Message, PROTOCOL_VERSION};
use crate::snapshot::Snapshot;
use crate::store::scan::{open_member, read_manifest};
use crate::store::{Algo, Manifest, Stage, Store};

/// The file `save`/`restore` use for serde state (postcard encoding).
pub const STATE_FILE: &str = "state.postcard";
/// The default checkpoint directory when neither `CKPT_DIR` nor a path is given.
pub const DEFAULT_DIR: &str = "checkpoints";

/// Where a job restores from.
#[derive(Debug, Clone)]
pub struct RestorePoint {
    pub seq: u64,
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// How a launch starts (`CKPT_START`, see [`Checkpointer::start`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Nothing to restore.
    Fresh,
    /// Restoring this run's own checkpoint.
    Resume,
    /// Restoring a checkpoint copied from another run (`ckpt run --from`): apply new settings.
    Branch,
}

/// What a successful save produced.
#[derive(Debug, Clone)]
pub struct Saved {
    pub seq: u64,
    pub path: PathBuf,
    pub step: Option<u64>,
    /// Bytes of the checkpoint's files; in a multi-rank job, on every rank but rank 0 (which
    /// publishes), of this rank's shard only (`docs/multi-rank.md`, step 7 of the commit).
    pub bytes: u64,
    pub duration: Duration,
}

/// A job's handle on checkpointing. See the module documentation.
pub struct Checkpointer {
    store: Store,
    restore: Option<RestorePoint>,
    restart_count: u32,
    socket: Option<(UnixDatagram, PathBuf)>,
    request: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    stop_saved: bool,
    pid: u32,
    step: Option<u64>,
    interval: Option<Duration>,
    last_save: Instant,
    last_beat: Option<Instant>,
    keep: Option<usize>,
    sig_ids: Vec<signal_hook::SigId>,
    /// Multi-rank jobs: this rank's side of the save rounds (`docs/multi-rank.md`).
    multi: Option<crate::multi_rank::MultiRank>,
    /// Restore of another world size allowed (`CKPT_RESHARD=1`): shards are read by rank.
    reshard: bool,
    /// The asynchronous save in flight, if any, and the snapshot buffers kept for reuse.
    bg: Mutex<Background>,
    /// Bounds how long a SIGTERM waits for the job to reach a safe point.
    watch: Arc<StopWatch>,
    /// How the supervisor checked the restore checkpoint (`CKPT_RESTORE_CHECK`): with
    /// `Client` only the manifest and sizes were, and this client's checks are the only ones.
    restore_check: protocol::RestoreCheck,
    /// Under `Client`: the outcome of verifying every file [`Checkpointer::restore_dir`]
    /// exposes, done once before the first path is handed out.
    dir_checked: std::sync::OnceLock<std::result::Result<(), String>>,
    /// The members of the restore checkpoint whose size and checksum this process checked,
    /// and the pid that sent `restore_verified` (0: none yet).
    verified: Mutex<(std::collections::BTreeSet<String>, u32)>,
}

/// The environment variable that sets how long a SIGTERM may wait for the job to reach its
/// next safe point (a client call) before the client exits at once: seconds (`7`, `2.5`) or
/// with a unit (`500ms`, `10s`, `2m`). Default: the longer of 5 s and twice the longest gap
/// seen between two safe points.
pub const ENV_STOP_TIMEOUT: &str = "CKPT_STOP_TIMEOUT";
/// The least time a SIGTERM waits for a safe point (unless `CKPT_STOP_TIMEOUT` says less).
pub const STOP_TIMEOUT_MIN: Duration = Duration::from_secs(5);

/// The SIGTERM watchdog's shared state. A flag-only SIGTERM handler keeps a job that is
/// blocked (in a collective whose peer died, in C code, in a sleep) alive until its killer
/// loses patience: torchrun SIGKILLs 30 s after SIGTERM. The watchdog thread ends the
/// process with status 143 when no client call came within the bound after a SIGTERM and
/// no save is running; any client call after the SIGTERM disarms it (the job reached a
/// safe point and will save and exit). A second SIGTERM exits at once.
struct StopWatch {
    stop: Arc<AtomicBool>,
    t0: Instant,
    /// Milliseconds since `t0` of the last client call (+1, so 0 means none).
    last_call: std::sync::atomic::AtomicU64,
    max_gap: std::sync::atomic::AtomicU64,
    /// Saves running (foreground or background).
    busy: std::sync::atomic::AtomicU32,
    done: AtomicBool,
    fixed: Option<Duration>,
}

impl StopWatch {
    fn new(stop: Arc<AtomicBool>) -> Result<Arc<StopWatch>> {
        let fixed = match env_opt(ENV_STOP_TIMEOUT) {
            Some(v) => Some(protocol::parse_duration_env(&v).ok_or_else(|| Error::Env {
                name: ENV_STOP_TIMEOUT,
                value: v.clone(),
                why: "not a duration (e.g. 10, 2.5, 500ms, 30s, 2m)".into(),
            })?),
            None => None,
        };
        let w = Arc::new(StopWatch {
            stop,
            t0: Instant::now(),
            last_call: 0.into(),
            max_gap: 0.into(),
            busy: 0.into(),
            done: AtomicBool::new(false),
            fixed,
        });
        let weak = Arc::downgrade(&w);
        // Without the thread the job only loses the bound, so a failure to start it is
        // not fatal.
        let _ = std::thread::Builder::new()
            .name("ckpt-stopwatch".into())
            .spawn(move || StopWatch::watch(weak));
        Ok(w)
    }

    fn now_ms(&self) -> u64 {
        self.t0.elapsed().as_millis() as u64 + 1
    }

    /// A client call: the job is at a safe point (or in ckpt's code).
    fn touch(&self) {
        let now = self.now_ms();
        let last = self.last_call.swap(now, Ordering::Relaxed);
        if last > 0 && self.busy.load(Ordering::Relaxed) == 0 {
            self.max_gap.fetch_max(now - last, Ordering::Relaxed);
        }
    }

    /// For the save rounds of a multi-rank job: the stop timeout once a SIGTERM came. A rank
    /// waiting in a round is in the client, which then bounds its wait by it (docs/multi-rank.md,
    /// "A stop that cannot complete"), so the watchdog stands down.
    fn probe(self: &Arc<Self>) -> crate::multi_rank::StopProbe {
        let w = Arc::downgrade(self);
        Box::new(move || {
            let w = w.upgrade()?;
            if !w.stop.load(Ordering::Relaxed) {
                return None;
            }
            let bound = w.bound();
            w.last_call.store(w.now_ms(), Ordering::Relaxed);
            Some(bound)
        })
    }

    fn bound(&self) -> Duration {
        self.fixed.unwrap_or_else(|| {
            STOP_TIMEOUT_MIN.max(Duration::from_millis(
                self.max_gap.load(Ordering::Relaxed).saturating_mul(2),
            ))
        })
    }

    fn watch(weak: std::sync::Weak<StopWatch>) {
        let mut seen: Option<u64> = None;
        loop {
            std::thread::sleep(Duration::from_millis(50));
            let Some(w) = weak.upgrade() else { return };
            if w.done.load(Ordering::Relaxed) {
                return;
            }
            if !w.stop.load(Ordering::Relaxed) {
                continue;
            }
            let now = w.now_ms();
            let since = *seen.get_or_insert(now);
            if w.last_call.load(Ordering::Relaxed) > since {
                return; // a safe point came after the SIGTERM: the job handles the stop
            }
            if w.busy.load(Ordering::Relaxed) > 0 {
                seen = Some(now);
                continue;
            }
            let bound = w.bound();
            if now - since >= bound.as_millis() as u64 {
                let msg = format!(
                    "ckpt: SIGTERM: the job reached no safe point (no call of the ckpt client) within {:.1}s; exiting now with status 143 (hint: set {ENV_STOP_TIMEOUT} to wait longer)\n",
                    bound.as_secs_f64()
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), msg.as_bytes());
                unsafe { libc::_exit(128 + libc::SIGTERM) };
            }
        }
    }
}

/// Marks a save as running for the SIGTERM watchdog while alive.
struct Busy(Arc<StopWatch>);

impl Busy {
    fn new(w: &Arc<StopWatch>) -> Busy {
        w.busy.fetch_add(1, Ordering::Relaxed);
        Busy(w.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// What a background save thread returns: its snapshot (for reuse) and the outcome.
type BgResult = (Snapshot, Result<Saved>);

#[derive(Default)]
struct Background {
    pending: Option<JoinHandle<BgResult>>,
    spare: Option<Snapshot>,
    /// The outcome of a background save finished by `should_stop`/`save`, not yet returned
    /// by [`Checkpointer::wait`].
    outcome: Option<Result<Saved>>,
}

impl Background {
    /// Joins the save in flight (if any); keeps its snapshot and outcome.
    fn finish(&mut self) {
        if let Some(h) = self.pending.take() {
            match h.join() {
                Ok((snap, res)) => {
                    self.spare = Some(snap);
                    self.outcome = Some(res);
                }
                Err(_) => {
                    self.outcome = Some(Err(Error::Usage(
                        "the background save thread panicked (a bug: please report it)".into(),
                    )))
                }
            }
        }
    }
}

fn env_opt(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Checkpointer {
    /// Reads the environment set by `ckpt run` (`CKPT_DIR`, `CKPT_RESTORE`, `CKPT_SOCKET`,
    /// `CKPT_SIGNAL`, ...). Without a supervisor, uses `CKPT_DIR` or `./checkpoints` and picks
    /// the newest checkpoint that verifies itself. Installs the request-signal and SIGTERM
    /// handlers (they only set flags), then announces itself to the supervisor.
    pub fn from_env() -> Result<Checkpointer> {
        let dir = env_opt(protocol::ENV_DIR)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        Self::open(dir)
    }

    /// Like [`Checkpointer::from_env`] but with an explicit directory (the environment's
    /// `CKPT_DIR` still wins under a supervisor, which owns the directory).
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpointer> {
        Self::open_with_world(dir, crate::multi_rank::World::from_env()?)
    }

    /// Like [`Checkpointer::open`] for one rank of a multi-process job with an explicit rank
    /// and world size (instead of the launcher's environment): every rank saves its shard of
    /// the same checkpoint at one agreed step, and restores its own shard
    /// (`docs/multi-rank.md`). `None` or a world of 1 is an ordinary single-process job.
    pub fn open_with_world(
        dir: impl AsRef<Path>,
        world: Option<crate::multi_rank::World>,
    ) -> Result<Checkpointer> {
        let socket_path = env_opt(protocol::ENV_SOCKET).map(PathBuf::from);
        let supervised = socket_path.is_some();
        let dir = match (supervised, env_opt(protocol::ENV_DIR)) {
            (true, Some(d)) => PathBuf::from(d),
            _ => dir.as_ref().to_path_buf(),
        };
        let store = Store::new(&dir);
        store.create()?;
        let signal = match env_opt(protocol::ENV_SIGNAL) {
            Some(s) => {
                let sig = protocol::parse_signal(&s).ok_or_else(|| Error::Env {
                    name: protocol::ENV_SIGNAL,
                    value: s.clone(),
                    why: "not a signal number or name; hint: it is set by `ckpt run --signal`"
                        .into(),
                })?;
                if let Some(why) = protocol::request_signal_problem(sig) {
                    return Err(Error::Env {
                        name: protocol::ENV_SIGNAL,
                        value: s.clone(),
                        why: format!("this signal {why}, so it cannot request checkpoints; hint: use USR1, USR2 or a real-time signal (docs/protocol.md)"),
                    });
                }
                sig
            }
            None => libc::SIGUSR1,
        };
        let restart_count = match env_opt(protocol::ENV_RESTART_COUNT) {
            Some(s) => s.parse().map_err(|_| Error::Env {
                name: protocol::ENV_RESTART_COUNT,
                value: s.clone(),
                why: "not a whole number".into(),
            })?,
            None => 0,
        };
        let restore = if supervised {
            match env_opt(protocol::ENV_RESTORE) {
                Some(p) => {
                    let path = PathBuf::from(&p);
                    let manifest = read_manifest(&path).map_err(|reason| Error::Invalid {
                        path: path.clone(),
                        reason,
                    })?;
                    Some(RestorePoint {
                        seq: manifest.seq,
                        path,
                        manifest,
                    })
                }
                None => None,
            }
        } else {
            store
                .latest_verified(false, |bad| eprintln!("ckpt: warning: {bad}"))?
                .map(|f| RestorePoint {
                    seq: f.seq,
                    path: f.path,
                    manifest: f.manifest,
                })
        };

        let reshard = env_opt(crate::multi_rank::ENV_RESHARD).is_some_and(|v| v != "0");
        if let Some(r) = &restore {
            let size = world.map_or(1, |w| w.size);
            crate::multi_rank::check_world(&r.manifest, &r.path, size, reshard)?;
        }
        let multi = match world {
            Some(w) if w.size > 1 => {
                let mut m = crate::multi_rank::MultiRank::new(
                    &store,
                    w,
                    &crate::multi_rank::epoch_from_env()?,
                )?;
                m.set_base(restore.as_ref().and_then(|r| r.manifest.step).unwrap_or(0));
                Some(m)
            }
            _ => None,
        };
        let request = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let watch = StopWatch::new(stop.clone())?;
        let mut multi = multi;
        if let Some(m) = multi.as_mut() {
            m.set_stop_probe(watch.probe());
        }
        let mut sig_ids = Vec::new();
        let reg = |r: std::io::Result<signal_hook::SigId>| {
            r.map_err(|e| Error::io("install a signal handler", "(process)", e))
        };
        sig_ids.push(reg(signal_hook::flag::register(signal, request.clone()))?);
        // A second SIGTERM while the first is still pending terminates at once.
        sig_ids.push(reg(signal_hook::flag::register_conditional_shutdown(
            libc::SIGTERM,
            128 + libc::SIGTERM,
            stop.clone(),
        ))?);
        sig_ids.push(reg(signal_hook::flag::register(
            libc::SIGTERM,
            stop.clone(),
        ))?);

        let socket = match socket_path {
            Some(p) => {
                let s =
                    UnixDatagram::unbound().map_err(|e| Error::io("create a socket for", &p, e))?;
                let _ = s.set_nonblocking(true);
                Some((s, p))
            }
            None => None,
        };
        let restore_check = if supervised && restore.is_some() {
            protocol::RestoreCheck::from_env()
        } else {
            protocol::RestoreCheck::Full
        };
        let ck = Checkpointer {
            restore_check,
            dir_checked: std::sync::OnceLock::new(),
            verified: Mutex::new(Default::default()),
            store,
            restore,
            restart_count,
            socket,
            request,
            stop,
            stop_saved: false,
            watch,
            pid: std::process::id(),
            step: None,
            interval: None,
            last_save: Instant::now(),
            last_beat: None,
            keep: None,
            sig_ids,
            bg: Mutex::new(Background::default()),
            multi,
            reshard,
        };
        ck.send(&Message::Hello {
            v: PROTOCOL_VERSION,
            pid: ck.pid,
            signal,
            client: concat!("rust/", env!("CARGO_PKG_VERSION")).into(),
            rank: world.map(|w| w.rank),
        });
        Ok(ck)
    }

    /// Also request a checkpoint every `interval` (useful standalone; under a supervisor
    /// `ckpt run --every` does this).
    pub fn with_interval(mut self, interval: Duration) -> Self {
        self.interval = Some(interval);
        self
    }

    /// Standalone retention: keep only the newest `n` checkpoints after each save. Under a
    /// supervisor this is ignored (`ckpt run --keep` owns retention).
    pub fn with_keep(mut self, n: usize) -> Self {
        self.keep = Some(n.max(1));
        self
    }

    /// Whether a supervisor runs this job.
    pub fn supervised(&self) -> bool {
        self.socket.is_some()
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        self.store.dir()
    }

    /// How many times the supervisor relaunched the job.
    pub fn restart_count(&self) -> u32 {
        self.restart_count
    }

    /// How this launch starts: fresh, resuming its own run, or a branch from another run's
    /// checkpoint (`ckpt run --from`), when the job may apply new settings. From `CKPT_START`
    /// under a supervisor; standalone, from the restore checkpoint's manifest (`meta.parent`).
    pub fn start(&self) -> Start {
        let kind = match env_opt(protocol::ENV_START) {
            Some(s) if self.supervised() => s,
            _ => protocol::start_kind(self.restore.as_ref().map(|r| &r.manifest)).to_string(),
        };
        match kind.as_str() {
            protocol::START_BRANCH => Start::Branch,
            protocol::START_RESUME => Start::Resume,
            _ if self.restore.is_some() => Start::Resume,
            _ => Start::Fresh,
        }
    }

    /// The checkpoint this run resumes from, if any.
    pub fn restore_point(&self) -> Option<&RestorePoint> {
        self.restore.as_ref()
    }

    /// The directory of the checkpoint to resume from (`None` on a fresh start), for files
    /// the job reads with its own code. Under `ckpt run --restore-check client` the
    /// supervisor checked only the manifest and sizes, so the first call checksums every
    /// file of the checkpoint (in a multi-rank job: this rank's shard) before the path is
    /// handed out; a damaged checkpoint is reported to the supervisor and the process exits
    /// with status 1 (the supervisor sets the checkpoint aside and relaunches the job from
    /// the next one that verifies).
    pub fn restore_dir(&self) -> Option<&Path> {
        let r = self.restore.as_ref()?;
        if self.restore_check == protocol::RestoreCheck::Client {
            let checked = self.dir_checked.get_or_init(|| self.verify_exposed(r));
            if let Err(why) = checked {
                eprintln!(
                    "ckpt: error: the checkpoint to restore, {}, is damaged: {why}; the supervisor sets it aside and relaunches from the next one",
                    r.path.display()
                );
                std::process::exit(1);
            }
        }
        Some(r.path.as_path())
    }

    /// Checksums every file of the restore checkpoint the job may read by path (this rank's
    /// shard in a multi-rank job), reporting damage to the supervisor.
    fn verify_exposed(&self, r: &RestorePoint) -> std::result::Result<(), String> {
        let shard = match (&self.multi, self.reshard) {
            (Some(m), false) => Some(format!("{}/", m.world().shard_dir())),
            _ => None,
        };
        let keep = |e: &crate::store::FileEntry| {
            shard
                .as_ref()
                .is_none_or(|p| e.name.starts_with(p.as_str()))
        };
        crate::store::scan::check_members(&r.path, &r.manifest, crate::store::Check::Full, keep)
            .inspect(|_| {
                self.note_verified(
                    r.manifest
                        .files
                        .iter()
                        .filter(|e| keep(e))
                        .map(|e| e.name.as_str()),
                )
            })
            .map_err(|reason| {
                let e = Error::Invalid {
                    path: r.path.clone(),
                    reason,
                };
                self.report_restore(&e);
                e.to_string()
            })
    }

    /// Records that members `names` of the restore checkpoint passed their size and checksum
    /// check in this process; once every member this process restores has (a rank: its own
    /// shard), tells the supervisor with `restore_verified` (once per process), so that under
    /// `ckpt run --restore-check auto` the next resumes read the checkpoint once
    /// (docs/protocol.md, "One read per resume"). Not when resharding (shards are then read
    /// across ranks).
    fn note_verified<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        let Some(r) = self.restore.as_ref() else {
            return;
        };
        if !self.supervised() || self.reshard {
            return;
        }
        let pid = std::process::id();
        let shard = self
            .multi
            .as_ref()
            .map(|m| format!("{}/", m.world().shard_dir()));
        {
            let mut v = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if v.1 == pid {
                return;
            }
            v.0.extend(names.into_iter().map(str::to_owned));
            let mut mine = r
                .manifest
                .files
                .iter()
                .filter(|f| {
                    shard
                        .as_ref()
                        .is_none_or(|p| f.name.starts_with(p.as_str()))
                })
                .peekable();
            if mine.peek().is_none() || !mine.all(|f| v.0.contains(&f.name)) {
                return;
            }
            v.1 = pid;
        }
        self.send(&Message::RestoreVerified {
            v: PROTOCOL_VERSION,
            pid,
            seq: r.seq,
            rank: self.multi.as_ref().map(|m| m.world().rank),
        });
    }

    /// Under `--restore-check client`: tells the supervisor that reading the restore
    /// checkpoint found damage (or could not read it), so that it verifies the checkpoint
    /// itself and, if it agrees, sets it aside and relaunches the job from the next one.
    fn report_restore(&self, e: &Error) {
        if self.restore_check != protocol::RestoreCheck::Client
            || !matches!(e, Error::Invalid { .. } | Error::Io { .. })
        {
            return;
        }
        if let Some(r) = &self.restore {
            self.send(&Message::RestoreFailed {
                v: PROTOCOL_VERSION,
                pid: self.pid,
                seq: r.seq,
                error: e.to_string(),
            });
        }
    }

    /// The state last saved with [`Checkpointer::save`], or `None` on a fresh start. The bytes
    /// are checked against the manifest's size and checksum while they are read.
    pub fn restore<T: DeserializeOwned>(&self) -> Result<Option<T>> {
        let Some(r) = &self.restore else {
            return Ok(None);
        };
        let bytes = self.read_file(STATE_FILE)?;
        postcard::from_bytes(&bytes)
            .map(Some)
            .map_err(|e| Error::Codec {
                action: "decode",
                path: r.path.join(STATE_FILE),
                detail: e.to_string(),
            })
    }

    /// Reads one file of the restore checkpoint, verified against the manifest (size and
    /// checksum, computed while reading).
    pub fn read_file(&self, name: &str) -> Result<Vec<u8>> {
        let size = self.entry(name)?.size;
        let mut bytes = vec![0u8; size as usize];
        self.read_into_opt(name, &mut bytes, true)?;
        Ok(bytes)
    }

    /// Reads one file of the restore checkpoint into `dest`, which must have exactly the
    /// file's size ([`Checkpointer::file_size`]): the fastest restore, straight into memory
    /// the job already owns, in large reads with the checksum verified inline.
    pub fn read_into(&self, name: &str, dest: &mut [u8]) -> Result<()> {
        self.read_into_opt(name, dest, false)
    }

    /// [`Checkpointer::read_into`]; `fresh`: `dest` was just allocated and never touched.
    fn read_into_opt(&self, name: &str, dest: &mut [u8], fresh: bool) -> Result<()> {
        let entry = self.entry(name)?;
        let r = self.restore.as_ref().expect("entry() checked");
        if dest.len() as u64 != entry.size {
            return Err(Error::Usage(format!(
                "read_into {name:?}: the buffer holds {} bytes, the file {} bytes",
                dest.len(),
                entry.size
            )));
        }
        let got = open_member(&r.path, &entry.name)
            .map_err(|reason| Error::Invalid {
                path: r.path.clone(),
                reason,
            })
            .and_then(|mut f| {
                if fresh {
                    pod::read_verified_fresh(&mut f, &r.path, entry, r.manifest.checksum, dest)
                } else {
                    pod::read_verified(&mut f, &r.path, entry, r.manifest.checksum, dest)
                }
            });
        got.inspect(|_| self.note_verified([entry.name.as_str()]))
            .inspect_err(|e| self.report_restore(e))
    }

    /// The size in bytes of one file of the restore checkpoint.
    pub fn file_size(&self, name: &str) -> Result<u64> {
        Ok(self.entry(name)?.size)
    }

    /// Reads a numeric array saved with [`Stage::write_pod`] (or [`Snapshot::put_pod`]) into
    /// `dest`, which must have exactly the saved number of elements. Verified inline.
    pub fn read_pod_into<T: Pod>(&self, name: &str, dest: &mut [T]) -> Result<()> {
        self.read_into(name, pod::as_bytes_mut(dest))?;
        pod::fix_endian(dest);
        Ok(())
    }

    /// Reads a numeric array saved with [`Stage::write_pod`] (or [`Snapshot::put_pod`]).
    pub fn read_pod<T: Pod + Default>(&self, name: &str) -> Result<Vec<T>> {
        let size = self.entry(name)?.size;
        let each = std::mem::size_of::<T>() as u64;
        if size % each != 0 {
            return Err(Error::Usage(format!(
                "file {name:?} has {size} bytes, not a whole number of {each}-byte elements"
            )));
        }
        let mut v = vec![T::default(); (size / each) as usize];
        self.read_into_opt(name, pod::as_bytes_mut(&mut v), true)?;
        pod::fix_endian(&mut v);
        Ok(v)
    }

    /// [`Checkpointer::read_pod`] for `f32` arrays.
    pub fn read_f32s(&self, name: &str) -> Result<Vec<f32>> {
        self.read_pod(name)
    }

    /// [`Checkpointer::read_pod`] for `f64` arrays.
    pub fn read_f64s(&self, name: &str) -> Result<Vec<f64>> {
        self.read_pod(name)
    }

    /// This rank's world (`None` for a single-process job).
    pub fn world(&self) -> Option<crate::multi_rank::World> {
        self.multi.as_ref().map(|m| m.world())
    }

    /// Reads file `name` of rank `rank`'s shard of the restore checkpoint (verified inline):
    /// for a job that reshards a checkpoint saved with another world size (`CKPT_RESHARD=1`).
    pub fn read_shard_file(&self, rank: u32, name: &str) -> Result<Vec<u8>> {
        let full = format!("{}/{name}", crate::multi_rank::shard_name(rank));
        let r = self.restore.as_ref().ok_or_else(|| {
            Error::Usage("read_shard_file: this run has no checkpoint to restore".into())
        })?;
        let entry = r
            .manifest
            .files
            .iter()
            .find(|f| f.name == full)
            .ok_or_else(|| {
                Error::Usage(format!(
                    "checkpoint {} has no file {full:?}",
                    r.path.display()
                ))
            })?;
        let mut bytes = vec![0u8; entry.size as usize];
        open_member(&r.path, &full)
            .map_err(|reason| Error::Invalid {
                path: r.path.clone(),
                reason,
            })
            .and_then(|mut f| {
                pod::read_verified_fresh(&mut f, &r.path, entry, r.manifest.checksum, &mut bytes)
            })
            .inspect_err(|e| self.report_restore(e))?;
        Ok(bytes)
    }

    fn entry(&self, name: &str) -> Result<&crate::store::FileEntry> {
        // A rank reads its own shard, `rank-NNNNN/<name>`.
        let name = match (&self.multi, self.reshard) {
            (Some(m), false) => format!("{}/{name}", m.world().shard_dir()),
            _ => name.to_string(),
        };
        let name = name.as_str();
        let r = self.restore.as_ref().ok_or_else(|| {
            Error::Usage("read_file: this run has no checkpoint to restore".into())
        })?;
        r.manifest.files.iter().find(|f| f.name == name).ok_or_else(|| {
            Error::Usage(format!(
                "checkpoint {} has no file {name:?} (it has: {}); hint: was it saved with save_files?",
                r.path.display(),
                r.manifest.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        })
    }

    fn send(&self, m: &Message) {
        if let Some((s, p)) = &self.socket {
            // Fire and forget: the supervisor re-reads the directory anyway.
            let _ = s.send_to(&m.encode(), p);
        }
    }

    fn is_original_process(&self) -> bool {
        std::process::id() == self.pid
    }

    /// Tells the supervisor the job is alive at `step` (also counts as a heartbeat).
    pub fn progress(&mut self, step: u64) {
        self.step = Some(step);
        if let Some(m) = self.multi.as_mut() {
            m.set_explicit(step);
        }
        self.last_beat = Some(Instant::now());
        self.send(&Message::Progress {
            v: PROTOCOL_VERSION,
            pid: self.pid,
            step: Some(step),
        });
    }

    /// True when a checkpoint has been requested (request signal, stop request, or the
    /// standalone interval). Cheap: call it at every safe point. Also a heartbeat. Always
    /// false in a forked child (a data-loader worker), which must never save.
    pub fn should_checkpoint(&mut self) -> bool {
        if !self.is_original_process() {
            return false;
        }
        self.watch.touch();
        let now = Instant::now();
        if self
            .last_beat
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_beat = Some(now);
            self.send(&Message::Progress {
                v: PROTOCOL_VERSION,
                pid: self.pid,
                step: self.step,
            });
        }
        let stop = self.stop.load(Ordering::Relaxed) && !self.stop_saved;
        let want = self.request.load(Ordering::Relaxed)
            || stop
            || self.interval.is_some_and(|i| self.last_save.elapsed() >= i);
        match self.multi.as_mut() {
            // The ranks turn the request into one agreed position (the explicit step, else the
            // count of calls: docs/multi-rank.md, "Which step"): true only there.
            Some(m) => {
                let pos = m.next_position();
                m.poll(want, stop, pos).unwrap_or_else(|e| {
                    eprintln!("ckpt: warning: {e}");
                    false
                })
            }
            None => want,
        }
    }

    /// [`Checkpointer::should_checkpoint`] after completing `step` (records it first). In a
    /// multi-rank job the ranks agree on this step; without it, on the count of
    /// `should_checkpoint` calls (`docs/multi-rank.md`, "Which step").
    pub fn should_checkpoint_at(&mut self, step: u64) -> bool {
        self.step = Some(step);
        if let Some(m) = self.multi.as_mut() {
            m.set_explicit(step);
        }
        self.should_checkpoint()
    }

    /// True once the supervisor (or anyone, with SIGTERM) asked the job to stop. Save first
    /// if [`Checkpointer::should_checkpoint`] says so, then exit with status 0.
    /// When it returns true, a pending background save ([`Checkpointer::save_async`]) has
    /// finished (it waits for it), so the job may exit at once.
    pub fn should_stop(&self) -> bool {
        // Ranks stop together, after a round that agreed to stop has published; once a rank
        // has left the launch no round can publish, and a rank asked to stop just stops.
        let asked = match &self.multi {
            Some(m) => m.stop_agreed() || (m.rank_left() && self.stop.load(Ordering::Relaxed)),
            None => self.stop.load(Ordering::Relaxed),
        };
        let stop = self.is_original_process() && asked;
        if self.is_original_process() {
            self.watch.touch();
        }
        if stop {
            self.bg.lock().unwrap_or_else(|e| e.into_inner()).finish();
        }
        stop
    }

    /// Sets the step recorded by [`Checkpointer::save`].
    pub fn set_step(&mut self, step: u64) {
        self.step = Some(step);
        if let Some(m) = self.multi.as_mut() {
            m.set_explicit(step);
        }
    }

    /// Saves `state` (postcard-encoded into `state.postcard`) as a new checkpoint and returns
    /// once it is durable.
    pub fn save<T: Serialize>(&mut self, state: &T) -> Result<Saved> {
        let step = self.step;
        self.save_inner(step, |stage| {
            let bytes = postcard::to_stdvec(state).map_err(|e| Error::Codec {
                action: "encode",
                path: stage.path().join(STATE_FILE),
                detail: e.to_string(),
            })?;
            stage.write_large(STATE_FILE, &bytes).map(drop)
        })
    }

    /// [`Checkpointer::save`] recording `step`.
    pub fn save_at<T: Serialize>(&mut self, step: u64, state: &T) -> Result<Saved> {
        self.step = Some(step);
        self.save(state)
    }

    /// Saves files the job writes itself: `write` gets an empty directory to fill; once it
    /// returns, every file in it is checksummed, made durable and published.
    pub fn save_files<F>(&mut self, step: u64, write: F) -> Result<Saved>
    where
        F: FnOnce(&Path) -> std::io::Result<()>,
    {
        self.step = Some(step);
        self.save_inner(Some(step), |stage| {
            let p = stage.path().to_path_buf();
            write(&p).map_err(|e| Error::io("write checkpoint files into", &p, e))
        })
    }

    /// Saves through a [`Stage`] (for streaming writers: [`Stage::create`]).
    pub fn save_with<F>(&mut self, step: Option<u64>, fill: F) -> Result<Saved>
    where
        F: FnOnce(&mut Stage) -> Result<()>,
    {
        if step.is_some() {
            self.step = step;
        }
        self.save_inner(step, fill)
    }

    /// Asynchronous [`Checkpointer::save`]: blocks only while `state` is encoded into a
    /// reusable in-memory snapshot; writing, fsync and publishing run on a background thread.
    /// A save still in flight is waited for first. See [`Checkpointer::save_async_with`].
    pub fn save_async<T: Serialize>(&mut self, state: &T) -> Result<()> {
        let step = self.step;
        self.save_async_with(step, |snap| snap.put_serde(STATE_FILE, state))
    }

    /// Asynchronous save of files copied into a [`Snapshot`] by `fill` (e.g.
    /// [`Snapshot::put_pod`] for weights): the job is blocked only while `fill` copies its
    /// state into buffers kept from the previous save (memcpy speed once they exist). The
    /// background thread then writes, fsyncs and publishes exactly like
    /// [`Checkpointer::save_with`] and tells the supervisor. A second save (async or not)
    /// waits for the first; [`Checkpointer::should_stop`] and dropping the `Checkpointer`
    /// wait too, so a job that exits when told to never loses a save in flight.
    /// [`Checkpointer::wait`] returns the outcome.
    pub fn save_async_with<F>(&mut self, step: Option<u64>, fill: F) -> Result<()>
    where
        F: FnOnce(&mut Snapshot) -> Result<()>,
    {
        if !self.is_original_process() {
            return Err(Error::Usage("save called in a forked child process; only the process that created the Checkpointer saves".into()));
        }
        if step.is_some() {
            self.step = step;
        }
        if self.multi.is_some() {
            // A multi-rank save waits for the other ranks anyway: it runs in the foreground.
            let mut snap = Snapshot::default();
            fill(&mut snap)?;
            let out = self.save_inner(step, |stage| snap.write_to(stage));
            let failed = out.as_ref().err().map(|e| Error::Usage(e.to_string()));
            self.bg.get_mut().unwrap_or_else(|e| e.into_inner()).outcome = Some(out);
            return failed.map_or(Ok(()), Err);
        }
        let busy = Busy::new(&self.watch);
        let bg = self.bg.get_mut().unwrap_or_else(|e| e.into_inner());
        bg.finish();
        let started = Instant::now();
        let stopping = self.stop.load(Ordering::Relaxed);
        self.request.store(false, Ordering::Relaxed);
        let mut snap = bg.spare.take().unwrap_or_default();
        snap.clear();
        if let Err(e) = fill(&mut snap) {
            bg.spare = Some(snap);
            return Err(e);
        }
        self.last_save = Instant::now();
        let blocked = started.elapsed();
        if stopping {
            self.stop_saved = true;
        }
        let store = self.store.clone();
        let socket = match &self.socket {
            Some((s, p)) => Some((
                s.try_clone()
                    .map_err(|e| Error::io("clone the socket", p, e))?,
                p.clone(),
            )),
            None => None,
        };
        let pid = self.pid;
        let keep = self.keep.filter(|_| socket.is_none());
        let handle = std::thread::Builder::new()
            .name("ckpt-save".into())
            .spawn(move || {
                let _busy = busy;
                let send = |m: &Message| {
                    if let Some((s, p)) = &socket {
                        let _ = s.send_to(&m.encode(), p);
                    }
                };
                let result = (|| {
                    let mut stage = Stage::new(&store, Algo::Crc32c)?;
                    snap.write_to(&mut stage)?;
                    stage.commit(
                        step,
                        concat!("ckpt-rust/", env!("CARGO_PKG_VERSION")),
                        Default::default(),
                    )
                })();
                let out = match result {
                    Ok(m) => {
                        let saved = Saved {
                            seq: m.seq,
                            path: store.path_of(m.seq),
                            step,
                            bytes: m.total_bytes(),
                            duration: started.elapsed(),
                        };
                        send(&Message::Committed {
                            v: PROTOCOL_VERSION,
                            pid,
                            seq: m.seq,
                            step,
                            bytes: saved.bytes,
                            duration_ms: saved.duration.as_millis() as u64,
                            blocked_ms: Some(blocked.as_millis() as u64),
                        });
                        if let Some(keep) = keep {
                            let _ = store.prune(keep, None, &[m.seq]);
                        }
                        Ok(saved)
                    }
                    Err(e) => {
                        send(&Message::SaveFailed {
                            v: PROTOCOL_VERSION,
                            pid,
                            error: e.to_string(),
                        });
                        Err(e)
                    }
                };
                (snap, out)
            })
            .map_err(|e| Error::io("start the background save thread", self.store.dir(), e))?;
        bg.pending = Some(handle);
        bg.outcome = None;
        Ok(())
    }

    /// Waits for the background save in flight (if any) and returns its outcome: `None` if
    /// no asynchronous save was made since the last `wait`.
    pub fn wait(&mut self) -> Result<Option<Saved>> {
        let bg = self.bg.get_mut().unwrap_or_else(|e| e.into_inner());
        bg.finish();
        bg.outcome.take().transpose()
    }

    /// Whether an asynchronous save is still being written.
    pub fn save_pending(&self) -> bool {
        self.bg
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pending
            .as_ref()
            .is_some_and(|h| !h.is_finished())
    }

    fn save_inner<F>(&mut self, step: Option<u64>, fill: F) -> Result<Saved>
    where
        F: FnOnce(&mut Stage) -> Result<()>,
    {
        if !self.is_original_process() {
            return Err(Error::Usage("save called in a forked child process; only the process that created the Checkpointer saves".into()));
        }
        let _busy = Busy::new(&self.watch);
        // Saves publish in order: a background save in flight finishes first.
        self.bg
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .finish();
        let started = Instant::now();
        let stopping = self.stop.load(Ordering::Relaxed);
        self.request.store(false, Ordering::Relaxed);
        let stop_wanted = stopping && !self.stop_saved;
        let result = (|| {
            // Every shard of a multi-rank checkpoint is summed with the one algorithm every
            // client computes at C speed (docs/multi-rank.md, "Checksums").
            let algo = match self.multi {
                Some(_) => crate::multi_rank::SHARD_ALGO,
                None => Algo::Crc32c,
            };
            let mut stage = Stage::new(&self.store, algo)?;
            fill(&mut stage)?;
            let writer = concat!("ckpt-rust/", env!("CARGO_PKG_VERSION"));
            match self.multi.as_mut() {
                // This rank's shard; published once every rank's shard is durable.
                Some(mr) => mr.commit_shard(stage, algo, step, stop_wanted, writer),
                None => stage.commit(step, writer, Default::default()),
            }
        })();
        // In a multi-rank job only the rank that published reports and prunes.
        let reporter = self.multi.as_ref().is_none_or(|mr| mr.published_last());
        match result {
            Ok(m) => {
                self.last_save = Instant::now();
                let stopping = match &self.multi {
                    Some(mr) => mr.stop_agreed(),
                    None => stopping,
                };
                if stopping {
                    self.stop_saved = true;
                }
                // The step the checkpoint records (a multi-rank save without one records the
                // agreed position).
                let saved = Saved {
                    seq: m.seq,
                    path: self.store.path_of(m.seq),
                    step: m.step,
                    bytes: m.total_bytes(),
                    duration: started.elapsed(),
                };
                if reporter {
                    self.send(&Message::Committed {
                        v: PROTOCOL_VERSION,
                        pid: self.pid,
                        seq: m.seq,
                        step: m.step,
                        bytes: saved.bytes,
                        duration_ms: saved.duration.as_millis() as u64,
                        blocked_ms: None,
                    });
                    if let (Some(keep), false) = (self.keep, self.supervised()) {
                        let _ = self.store.prune(keep, None, &[m.seq]);
                    }
                }
                Ok(saved)
            }
            Err(e) => {
                self.send(&Message::SaveFailed {
                    v: PROTOCOL_VERSION,
                    pid: self.pid,
                    error: e.to_string(),
                });
                Err(e)
            }
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.watch.done.store(true, Ordering::Relaxed);
        // A save in flight completes before the job goes (never in a forked child, which
        // does not have the thread).
        if self.is_original_process() {
            self.bg
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .finish();
        }
        let original = self.is_original_process();
        if let (Some(m), true) = (self.multi.as_mut(), original) {
            m.leave();
        }
        for id in self.sig_ids.drain(..) {
            signal_hook::low_level::unregister(id);
        }
    }
}
