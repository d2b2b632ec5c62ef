//! Multi-process (multi-rank) jobs: every rank saves its shard of the same checkpoint, at one
//! agreed step, and the checkpoint is published only when every shard is durable. The
//! protocol lives entirely in files of the shared checkpoint directory (no network, no
//! coordinator process), so it works across nodes on a shared file system. Specified, with
//! its crash analysis and the file-system requirements, in `docs/multi-rank.md`.
//!
//! Rank 0 is each round's **coordinator**: it alone gathers the other ranks' files (one
//! `readdir` of the round per look, then one read of each file), writes the round's `agreed`
//! step and publishes; every other rank only ever reads the round's few shared files
//! (`agreed`, `published`, `aborted`), so a rank's cost per round does not grow with the
//! number of ranks (`docs/multi-rank.md`, "Scale").
//!
//! ```text
//! DIR/.ckpt/rounds/<epoch>/               one launch of the job (all its ranks agree on it)
//!   00000003/                             save round 3 of that launch
//!     propose-00002                       rank 2's proposal {"step":S,"stop":B}
//!     horizon                             rank 0 moved the round's bound on {"step":H} (late ranks)
//!     agreed                              rank 0's verdict from all proposals {"step":T,"stop":B}
//!     stage/                              becomes DIR/ckpt-<seq> (the single atomic rename)
//!       rank-00002/<files>                rank 2's shard, fsynced
//!       MANIFEST.ckpt                     written by rank 0 (the publisher) only
//!     done-00002                          rank 2's shard is durable: its file list and sums
//!     published                           {"seq":N}: the round's outcome
//!     aborted                             the other outcome (the stage was removed)
//!   left                                  some rank left the launch (dropped its client):
//!                                         no round of this launch can complete any more
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::store::{Algo, FileEntry, Manifest, Stage, Store};

/// Explicit rank (wins over every launcher's variables).
pub const ENV_RANK: &str = "CKPT_RANK";
/// Explicit world size (number of ranks), with [`ENV_RANK`].
pub const ENV_WORLD_SIZE: &str = "CKPT_WORLD_SIZE";
/// Explicit local rank (rank on this node); informational.
pub const ENV_LOCAL_RANK: &str = "CKPT_LOCAL_RANK";
/// Identifier of this launch, the same on every rank (defaults to the supervisor's pid and
/// restart count, else the launcher's job id).
pub const ENV_RUN_ID: &str = "CKPT_RUN_ID";
/// `1`: restoring a checkpoint saved with another world size is allowed; the job reads the
/// whole checkpoint itself ([`crate::Checkpointer::read_shard_file`]) and reshards.
pub const ENV_RESHARD: &str = "CKPT_RESHARD";
/// How long a rank waits for the other ranks in a save round before abandoning it: seconds,
/// or a number with `ms`, `s` or `m` ([`parse_round_timeout`]); default 300 s.
pub const ENV_ROUND_TIMEOUT: &str = "CKPT_ROUND_TIMEOUT";
/// Steps a rank may still run after proposing before it must know the agreed step (0).
/// Jobs whose ranks synchronise every step (collectives) should set 2 or more.
pub const ENV_ROUND_LOOKAHEAD: &str = "CKPT_ROUND_LOOKAHEAD";

/// The lookahead without `CKPT_ROUND_LOOKAHEAD`: a rank proposes its position plus 2, so that
/// ranks that synchronise every step (collectives, DDP) all see the request before any of
/// them blocks at its proposal (docs/multi-rank.md, "Waiting"; with 0, a rank blocked at its
/// proposal and another waiting for it inside a collective deadlocked until the round timed
/// out: seen with the torchrun recipe in CI).
pub const DEFAULT_LOOKAHEAD: u64 = 2;

/// The checksum of every shard of a multi-rank checkpoint, whichever client writes it: CRC-32
/// (IEEE), which the Python client computes with `zlib` at C speed from the standard library
/// alone, so that Rust and Python ranks of one job agree without negotiating
/// (`docs/multi-rank.md`, "Checksums").
pub const SHARD_ALGO: Algo = Algo::Crc32;

/// How often a rank without a request of its own looks for a round started by another rank:
/// every 100 ms, or every 0.25 ms per rank from 400 ranks on ([`MultiRank::idle_poll`]).
const POLL: Duration = Duration::from_millis(100);

/// The rank that coordinates every round: gathers the proposals into `agreed`, the done
/// markers into the manifest, and publishes (`docs/multi-rank.md`, "Save rounds").
pub const COORDINATOR: u32 = 0;

/// The launcher variables, in order of preference: explicit, torchrun, srun, Open MPI, PMI.
const SOURCES: &[(&str, &str, &str, &str)] = &[
    (ENV_RANK, ENV_WORLD_SIZE, ENV_LOCAL_RANK, "CKPT_RANK"),
    ("RANK", "WORLD_SIZE", "LOCAL_RANK", "torchrun"),
    // SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: a batch script also has SLURM_PROCID=0 and
    // SLURM_NTASKS, but it is not a rank of an srun step.
    (
        "SLURM_PROCID",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_LOCALID",
        "srun",
    ),
    (
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "mpirun",
    ),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "PMI"),
];

fn env_opt(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// This process's place in a multi-process job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct World {
    /// 0-based rank.
    pub rank: u32,
    /// Number of ranks.
    pub size: u32,
    /// Rank on this node, when the launcher says.
    pub local_rank: Option<u32>,
    /// Where it came from (`"torchrun"`, `"srun"`, `"mpirun"`, `"PMI"`, `"CKPT_RANK"`, `"api"`).
    pub source: &'static str,
}

impl World {
    /// An explicit world; `rank` must be below `size`.
    pub fn new(rank: u32, size: u32) -> Result<World> {
        if size == 0 || rank >= size {
            return Err(Error::Usage(format!(
                "rank {rank} of a world of {size}: the rank must be below the world size"
            )));
        }
        Ok(World {
            rank,
            size,
            local_rank: None,
            source: "api",
        })
    }

    /// The rank and world size from the launcher's environment (`CKPT_RANK`/`CKPT_WORLD_SIZE`,
    /// torchrun's `RANK`/`WORLD_SIZE`, srun's `SLURM_PROCID`/`SLURM_STEP_NUM_TASKS`, Open MPI's
    /// `OMPI_COMM_WORLD_RANK`/`OMPI_COMM_WORLD_SIZE`, `PMI_RANK`/`PMI_SIZE`); `None` when no
    /// launcher set them.
    pub fn from_env() -> Result<Option<World>> {
        for &(r, s, l, source) in SOURCES {
            let (Some(rv), Some(sv)) = (env_opt(r), env_opt(s)) else {
                continue;
            };
            let parse = |name: &'static str, v: &str| {
                v.trim().parse::<u32>().map_err(|_| Error::Env {
                    name,
                    value: v.to_string(),
                    why: "not a whole number".into(),
                })
            };
            // The names are 'static in SOURCES.
            let rank = parse(r, &rv)?;
            let size = parse(s, &sv)?;
            if size == 0 || rank >= size {
                return Err(Error::Env {
                    name: r,
                    value: rv,
                    why: format!("rank {rank} is not below the world size {s}={size}"),
                });
            }
            let local_rank = env_opt(l).and_then(|v| v.trim().parse().ok());
            return Ok(Some(World {
                rank,
                size,
                local_rank,
                source,
            }));
        }
        Ok(None)
    }

    /// The directory of this rank's shard inside a checkpoint: `rank-00003`.
    pub fn shard_dir(&self) -> String {
        shard_name(self.rank)
    }
}

/// `rank-NNNNN`: the directory of rank `rank`'s shard inside a checkpoint.
pub fn shard_name(rank: u32) -> String {
    format!("rank-{rank:05}")
}

/// Refuses a restore checkpoint saved with another world size (unless resharding).
pub fn check_world(manifest: &Manifest, path: &Path, size: u32, reshard: bool) -> Result<()> {
    let saved = manifest.world_size.unwrap_or(1);
    if saved == size || reshard {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "cannot restore {}: it was saved by a job of {saved} rank(s), this job runs with {size} rank(s); ckpt restores a checkpoint only with the world size that saved it; hint: run with {saved} rank(s), or set {ENV_RESHARD}=1 and reshard it yourself (read every shard with read_shard_file)",
        path.display()
    )))
}

/// The identifier of this launch, shared by all its ranks: `CKPT_RUN_ID`, else the
/// supervisor's restart count and pid, else the launcher's job id. The text after the last dot
/// is a pid (`0` when unknown): the supervisor removes rounds of dead supervisors at start.
pub fn epoch_from_env() -> Result<String> {
    fn clean(s: &str) -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(96)
            .collect()
    }
    if let Some(id) = env_opt(ENV_RUN_ID) {
        return Ok(format!("{}.0", clean(&id)));
    }
    if let Some(pid) = env_opt(crate::protocol::ENV_SUPERVISOR_PID) {
        let restart = env_opt(crate::protocol::ENV_RESTART_COUNT).unwrap_or_else(|| "0".into());
        return Ok(format!("r{}.{}", clean(&restart), clean(&pid)));
    }
    for (a, b) in [
        ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"),
        ("SLURM_JOB_ID", "SLURM_STEP_ID"),
        ("OMPI_MCA_ess_base_jobid", "OMPI_MCA_orte_ess_jobid"),
        ("PMIX_NAMESPACE", "PMIX_NAMESPACE"),
    ] {
        if let Some(x) = env_opt(a) {
            return Ok(format!(
                "{}-{}.0",
                clean(&x),
                clean(&env_opt(b).unwrap_or_default())
            ));
        }
    }
    Err(Error::Usage(format!(
        "a multi-rank job needs an identifier shared by all its ranks; hint: run it under `ckpt run`, or set {ENV_RUN_ID} to the same value on every rank (a new value for each launch)"
    )))
}

/// `CKPT_ROUND_TIMEOUT`: a positive number of seconds (`300`, `2.5`), or a number followed
/// by `ms`, `s` or `m` (`500ms`, `2s`, `5m`); the Python client accepts the same forms.
pub fn parse_round_timeout(v: &str) -> Option<Duration> {
    let t = v.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        (t, 1.0)
    };
    let num = num.trim_end();
    let digits = num.bytes().filter(u8::is_ascii_digit).count();
    if digits == 0 || num.bytes().any(|b| !(b.is_ascii_digit() || b == b'.')) {
        return None;
    }
    let secs = num.parse::<f64>().ok()? * scale;
    (secs > 0.0 && secs < 1e9).then(|| Duration::from_secs_f64(secs))
}

/// What the ranks agreed on in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// The step at which every rank saves: the highest proposal.
    pub step: u64,
    /// Some rank was asked to stop: every rank stops after the round publishes.
    pub stop: bool,
}

#[derive(Serialize, Deserialize)]
struct ShardDone {
    rank: u32,
    step: u64,
    checksum: Algo,
    files: Vec<FileEntry>,
}

#[derive(Serialize, Deserialize)]
struct Published {
    seq: u64,
}

/// `R/horizon`: the coordinator moved the round's bound on to `step` (no agreement yet).
#[derive(Serialize, Deserialize)]
struct Horizon {
    step: u64,
}

enum State {
    Open,
    Agreed(Target),
    Aborted,
    /// No agreement yet, but the coordinator moved the round's horizon to this step: a rank
    /// waiting at its bound may run on to it (`docs/multi-rank.md`, "Late ranks").
    Horizon(u64),
}

struct Joined {
    target: Option<Target>,
    /// When this rank proposed: the round timeout and the stop bound count from it.
    since: Instant,
    /// The step this rank may reach before it knows the agreed one: its proposal, raised by
    /// the coordinator's horizon.
    bound: u64,
    /// The coordinator: the horizon it wrote last (the agreed step is at least that), and
    /// the next extension.
    horizon: Option<u64>,
    ext: u64,
    /// Since when this rank has waited at its bound (the coordinator extends after a while).
    at_bound: Option<Instant>,
    /// When this rank learned the agreed step (its own save's time counts from it).
    agreed_at: Option<Instant>,
}

/// Asked to stop? The client's stop timeout if so (`CKPT_STOP_TIMEOUT`, or its default: the
/// SIGTERM bound of `docs/protocol.md` section 3).
pub type StopProbe = Box<dyn Fn() -> Option<Duration> + Send + Sync>;

/// One rank's side of the save rounds (held by [`crate::Checkpointer`]).
pub struct MultiRank {
    world: World,
    store: Store,
    /// `DIR/.ckpt/rounds/<epoch>`.
    dir: PathBuf,
    /// The round this rank is in or will join next.
    k: u64,
    joined: Option<Joined>,
    last_poll: Option<Instant>,
    timeout: Duration,
    lookahead: u64,
    /// The last round this rank took part in published with `stop`.
    stop_agreed: bool,
    /// This rank published the last round (it alone tells the supervisor).
    published_last: bool,
    /// Some rank of this launch left (`<epoch>/left` exists): no round can complete.
    left_seen: bool,
    /// The position at which [`MultiRank::poll`] returned true in the current round: this
    /// rank's save point, its first position at or past the agreed step.
    at_target: Option<u64>,
    /// The position rule (`docs/multi-rank.md`, "Which step"): `should_checkpoint` calls
    /// since the restore, counted from the restored checkpoint's step (`base`); a step given
    /// explicitly since the previous call wins.
    calls: u64,
    base: u64,
    explicit: Option<u64>,
    pos: Option<u64>,
    /// Whether the job was asked to stop, and its stop timeout ([`MultiRank::set_stop_probe`]).
    stop_probe: Option<StopProbe>,
    /// When this rank first saw the stop request in a round.
    stop_seen: Option<Instant>,
}

impl std::fmt::Debug for MultiRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MultiRank")
            .field("world", &self.world)
            .field("dir", &self.dir)
            .field("round", &self.k)
            .finish()
    }
}

impl MultiRank {
    /// Joins the rounds of this launch (`epoch`). Rank 0 removes the rounds of earlier
    /// launches (their processes are gone: a launch ends with all its ranks).
    pub fn new(store: &Store, world: World, epoch: &str) -> Result<MultiRank> {
        let rounds = store.private().join("rounds");
        store.real_dir(&rounds)?;
        let dir = rounds.join(epoch);
        store.real_dir(&dir)?;
        if world.rank == 0 {
            if let Ok(rd) = fs::read_dir(&rounds) {
                for ent in rd.flatten() {
                    if ent.file_name().to_str() != Some(epoch) {
                        let _ = store.io().remove_dir_all(&ent.path());
                    }
                }
            }
        }
        let timeout = env_opt(ENV_ROUND_TIMEOUT)
            .map(|v| {
                parse_round_timeout(&v).ok_or_else(|| Error::Env {
                    name: ENV_ROUND_TIMEOUT,
                    value: v.clone(),
                    why: "not a positive duration: seconds (`300`, `2.5`) or a number with `ms`, `s` or `m` (`500ms`, `2s`, `5m`)".into(),
                })
            })
            .transpose()?
            .unwrap_or(Duration::from_secs(300));
        let lookahead = env_opt(ENV_ROUND_LOOKAHEAD)
            .map(|v| {
                v.parse::<u64>().map_err(|_| Error::Env {
                    name: ENV_ROUND_LOOKAHEAD,
                    value: v.clone(),
                    why: "not a whole number of steps".into(),
                })
            })
            .transpose()?
            .unwrap_or(DEFAULT_LOOKAHEAD);
        Ok(MultiRank {
            world,
            store: store.clone(),
            dir,
            k: 1,
            joined: None,
            last_poll: None,
            timeout,
            lookahead,
            stop_agreed: false,
            published_last: false,
            left_seen: false,
            at_target: None,
            calls: 0,
            base: 0,
            explicit: None,
            pos: None,
            stop_probe: None,
            stop_seen: None,
        })
    }

    /// How the rounds learn that the job was asked to stop and its stop timeout: a rank asked
    /// to stop waits for the other ranks at most that long, then exits with status 143
    /// without a checkpoint (`docs/multi-rank.md`, "A stop that cannot complete").
    pub fn set_stop_probe(&mut self, probe: StopProbe) {
        self.stop_probe = Some(probe);
    }

    /// The stop timeout when the job was asked to stop (and when this rank first saw it).
    fn stop_bound(&mut self) -> Option<(Duration, Instant)> {
        let b = (self.stop_probe.as_ref()?)()?;
        let seen = *self.stop_seen.get_or_insert_with(Instant::now);
        Some((b, seen))
    }

    /// This rank.
    pub fn world(&self) -> World {
        self.world
    }

    /// A round with stop published (every rank then stops).
    pub fn stop_agreed(&self) -> bool {
        self.stop_agreed
    }

    /// This rank published the last checkpoint.
    pub fn published_last(&self) -> bool {
        self.published_last
    }

    /// Some rank of this launch has left (finished or is exiting): no checkpoint of this
    /// launch can complete any more, so a rank asked to stop stops without one.
    pub fn rank_left(&self) -> bool {
        self.left_seen
    }

    /// The marker a leaving rank creates in the launch's directory.
    fn left_marker(&self) -> PathBuf {
        self.dir.join("left")
    }

    /// Whether some rank left; sticky once seen (one `stat` per call until then).
    fn someone_left(&mut self) -> bool {
        if !self.left_seen && fs::symlink_metadata(self.left_marker()).is_ok() {
            self.left_seen = true;
        }
        self.left_seen
    }

    /// The step of the restored checkpoint: the count of `should_checkpoint` calls continues
    /// from it (`docs/multi-rank.md`, "Which step").
    pub fn set_base(&mut self, step: u64) {
        self.base = step;
    }

    /// The job gave its step explicitly (`should_checkpoint_at`, `progress`, `set_step`): the
    /// next position is that step.
    pub fn set_explicit(&mut self, step: u64) {
        self.explicit = Some(step);
    }

    /// This rank's position at a `should_checkpoint` call: the explicit step given since the
    /// previous call, else the number of calls since the restore plus the restored step. The
    /// same on every rank of an SPMD loop, which is all the rounds need.
    pub fn next_position(&mut self) -> u64 {
        self.calls += 1;
        let p = self
            .explicit
            .take()
            .unwrap_or(self.base.saturating_add(self.calls));
        self.pos = Some(p);
        p
    }

    /// This rank's position now (for a save without a request).
    fn position(&self) -> u64 {
        self.explicit
            .or(self.pos)
            .unwrap_or(self.base.saturating_add(self.calls))
    }

    /// Overrides the round timeout.
    pub fn set_timeout(&mut self, t: Duration) {
        self.timeout = t;
    }

    fn round(&self, k: u64) -> PathBuf {
        self.dir.join(format!("{k:08}"))
    }

    /// The safe-point decision. `want`: this rank has a request of its own (signal, stop,
    /// interval); `stop`: it was asked to stop; `step`: this rank's position, the step just
    /// completed ([`MultiRank::next_position`]). Returns true at the save point of the round
    /// this rank is in: its first position at or past the agreed step `T` (`T` itself when
    /// positions count calls; an explicit step may skip it, `10 x iteration` say). Every rank
    /// makes the same calls with the same positions, and none passes its bound (at most `T`)
    /// before it knows `T`, so this is the same call on every rank.
    pub fn poll(&mut self, want: bool, stop: bool, step: u64) -> Result<bool> {
        if self.joined.is_none() {
            if !want
                && self
                    .last_poll
                    .is_some_and(|t| t.elapsed() < self.idle_poll())
            {
                return Ok(false);
            }
            self.last_poll = Some(Instant::now());
            if !want && !self.round(self.k).exists() {
                return Ok(false);
            }
            if !self.join(step.saturating_add(self.lookahead), stop, want)? {
                return Ok(false);
            }
        }
        let Some(j) = &self.joined else {
            return Ok(false);
        };
        if j.target.is_none() {
            let state = if step >= j.bound {
                // This rank may not pass its bound before it knows the agreed step.
                self.wait_target(step, true)?
            } else if self
                .last_poll
                .is_none_or(|t| t.elapsed() >= self.look_every())
            {
                self.last_poll = Some(Instant::now());
                self.look(step, true)?
            } else {
                State::Open
            };
            match state {
                State::Open | State::Horizon(_) => return Ok(false),
                State::Aborted => {
                    self.conclude();
                    return Ok(false);
                }
                State::Agreed(t) => {
                    if let Some(j) = self.joined.as_mut() {
                        j.target = Some(t);
                        j.agreed_at = Some(Instant::now());
                    }
                }
            }
        }
        let t = self
            .joined
            .as_ref()
            .and_then(|j| j.target)
            .expect("target set above");
        match self.at_target {
            None if step >= t.step => {
                self.at_target = Some(step);
                Ok(true)
            }
            None => Ok(false),
            Some(p) if p == step => Ok(true),
            Some(p) => {
                // The job went on past its save point without saving; never save elsewhere.
                self.abort(self.k);
                self.conclude();
                Err(Error::Usage(format!(
                    "rank {} is at step {step}, past its save point {p} (the agreed step {}) without saving; the save round was abandoned (hint: save when should_checkpoint() says so)",
                    self.world.rank, t.step
                )))
            }
        }
    }

    /// Proposes in the current round (creating it if needed); skips rounds that concluded.
    /// Returns false when the round is already concluded and this rank has no request.
    fn join(&mut self, proposal: u64, stop: bool, want: bool) -> Result<bool> {
        if self.someone_left() {
            // A rank that left never writes a shard again: nothing can be published.
            return Ok(false);
        }
        loop {
            let r = self.round(self.k);
            self.ensure_round(&r)?;
            if r.join("aborted").exists() || r.join("published").exists() {
                // Concluded without this rank: it cannot have published (this rank's shard
                // is missing); skip it.
                self.k += 1;
                if !want {
                    return Ok(false);
                }
                continue;
            }
            let name = format!("propose-{:05}", self.world.rank);
            let tmp = r.join(format!(".{name}.{}", crate::store::token()));
            let body = serde_json::to_vec(&Target {
                step: proposal,
                stop,
            })
            .expect("serialises");
            self.store
                .io()
                .write_new(&tmp, &body)
                .ctx("write proposal", &tmp)?;
            self.store
                .io()
                .rename_replace(&tmp, &r.join(&name))
                .ctx("write proposal", &r.join(&name))?;
            self.joined = Some(Joined {
                target: None,
                since: Instant::now(),
                bound: proposal,
                horizon: None,
                ext: self.lookahead.max(1),
                at_bound: None,
                agreed_at: None,
            });
            return Ok(true);
        }
    }

    /// Creates round directory `r` with its `stage/` in one rename (so that a stage removed by
    /// an abort is never re-created).
    fn ensure_round(&self, r: &Path) -> Result<()> {
        if fs::symlink_metadata(r).is_ok() {
            return Ok(());
        }
        let tmp = self.dir.join(format!(".new-{}", crate::store::token()));
        let io = self.store.io();
        io.create_dir(&tmp).ctx("create round", &tmp)?;
        io.create_dir(&tmp.join("stage"))
            .ctx("create round", &tmp)?;
        match io.rename_noreplace(&tmp, r) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let _ = io.remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => {
                let _ = io.remove_dir_all(&tmp);
                Err(Error::io("create round", r, e))
            }
        }
    }

    /// This rank coordinates the rounds ([`COORDINATOR`]).
    fn coordinator(&self) -> bool {
        self.world.rank == COORDINATOR
    }

    /// How often a rank that has proposed but is not yet at its proposal looks at the round:
    /// the coordinator at every call, since the other ranks may already be waiting for its
    /// `agreed` (a rank that proposed one step earlier blocks at its proposal; if the
    /// coordinator then went on into a collective without gathering, neither would move
    /// until the round timeout: `docs/multi-rank.md`, "Waiting"). At most lookahead + 1
    /// listings per round (plus the horizon's steps), since it blocks at its bound anyway.
    fn look_every(&self) -> Duration {
        if self.coordinator() {
            Duration::ZERO
        } else {
            self.idle_poll()
        }
    }

    /// How often a rank without a request looks for a new round: 100 ms, or 0.25 ms per rank
    /// from 400 ranks on, so that the ranks of a job make at most about 4 000 such lookups a
    /// second in all between rounds (`docs/multi-rank.md`, "Scale").
    fn idle_poll(&self) -> Duration {
        Duration::from_micros(250 * u64::from(self.world.size)).max(POLL)
    }

    /// The longest pause between two looks of a waiting rank: 20 ms, or 0.25 ms per rank from
    /// 80 ranks on, so that all ranks waiting together look at most about 4 000 times a
    /// second in all, whatever their number (`docs/multi-rank.md`, "Waiting").
    fn max_pause(&self) -> Duration {
        Duration::from_micros(250 * u64::from(self.world.size)).max(Duration::from_millis(20))
    }

    /// The names in round directory `r`: one `readdir`, the coordinator's only look at the
    /// other ranks' files while it waits for them.
    fn list(&self, r: &Path) -> Result<Vec<String>> {
        let rd = fs::read_dir(r).ctx("read round", r)?;
        let mut v = Vec::new();
        for e in rd {
            let e = e.ctx("read round", r)?;
            if let Ok(n) = e.file_name().into_string() {
                v.push(n);
            }
        }
        Ok(v)
    }

    /// How many of `names` are `<prefix><rank>` for distinct ranks of this world.
    fn count_ranks(&self, names: &[String], prefix: &str) -> u32 {
        names
            .iter()
            .filter(|n| {
                n.strip_prefix(prefix)
                    .and_then(|d| d.parse::<u32>().ok().map(|r| (r, d)))
                    .is_some_and(|(r, d)| r < self.world.size && d == format!("{r:05}"))
            })
            .count() as u32
    }

    /// One look at round `k`'s agreement. Every rank but the coordinator reads the one file
    /// `agreed` (and `aborted`, `left`); the coordinator lists the round and, once every
    /// rank's proposal is there, reads them (once), and writes `agreed`.
    fn state(&mut self, k: u64) -> Result<State> {
        let r = self.round(k);
        if self.coordinator() {
            return self.gather_proposals(k);
        }
        if r.join("aborted").exists() {
            return Ok(State::Aborted);
        }
        if self.someone_left() {
            // The rank that left will never propose: abandon rather than wait for it.
            self.abort(k);
            return Ok(State::Aborted);
        }
        let p = r.join("agreed");
        match crate::store::io::read_small(&p, 64 << 10) {
            Ok(b) => {
                let t: Target = serde_json::from_slice(&b)
                    .map_err(|e| Error::Usage(format!("bad agreement {}: {e}", p.display())))?;
                return Ok(State::Agreed(t));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("read agreement", p, e)),
        }
        // Not agreed yet: has the coordinator moved the horizon on ("Late ranks")?
        let p = r.join("horizon");
        match crate::store::io::read_small(&p, 64 << 10) {
            Ok(b) => {
                let h: Horizon = serde_json::from_slice(&b)
                    .map_err(|e| Error::Usage(format!("bad horizon {}: {e}", p.display())))?;
                Ok(State::Horizon(h.step))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(State::Open),
            Err(e) => Err(Error::io("read horizon", p, e)),
        }
    }

    /// The coordinator's look at round `k`: one `readdir`; once all `world_size` proposals
    /// are there, it reads each once, and writes the agreed position `agreed` (temporary name,
    /// then rename) for every other rank to read.
    fn gather_proposals(&mut self, k: u64) -> Result<State> {
        let r = self.round(k);
        let names = self.list(&r)?;
        if names.iter().any(|n| n == "aborted") {
            return Ok(State::Aborted);
        }
        if self.someone_left() {
            self.abort(k);
            return Ok(State::Aborted);
        }
        if self.count_ranks(&names, "propose-") < self.world.size {
            return Ok(State::Open);
        }
        // At least the horizon the coordinator gave: ranks may already be there.
        let mut t = Target {
            step: self.joined.as_ref().and_then(|j| j.horizon).unwrap_or(0),
            stop: false,
        };
        for rank in 0..self.world.size {
            let p = r.join(format!("propose-{rank:05}"));
            let b = crate::store::io::read_small(&p, 64 << 10).ctx("read proposal", &p)?;
            let x: Target = serde_json::from_slice(&b)
                .map_err(|e| Error::Usage(format!("bad proposal {}: {e}", p.display())))?;
            t.step = t.step.max(x.step);
            t.stop |= x.stop;
        }
        let io = self.store.io();
        let tmp = r.join(format!(".agreed.{}", crate::store::token()));
        let agreed = r.join("agreed");
        io.write_new(&tmp, &serde_json::to_vec(&t).expect("serialises"))
            .ctx("write agreement", &tmp)?;
        io.rename_replace(&tmp, &agreed)
            .ctx("write agreement", &agreed)?;
        Ok(State::Agreed(t))
    }

    /// Waits at `step`, this rank's bound, for the agreed step. Returns [`State::Open`] when
    /// the bound moved past `step` (`movable`: the coordinator's horizon, or the coordinator
    /// extending it; a save without a request cannot move), and [`State::Aborted`] after the
    /// round timeout.
    fn wait_target(&mut self, step: u64, movable: bool) -> Result<State> {
        let start = Instant::now();
        loop {
            match self.look(step, movable)? {
                State::Open | State::Horizon(_) => {
                    if movable && self.joined.as_ref().is_some_and(|j| j.bound > step) {
                        return Ok(State::Open);
                    }
                }
                s => return Ok(s),
            }
            std::thread::sleep(self.pause(start.elapsed()));
        }
    }

    /// One look at the current round's agreement from a rank at `step`, with the rules of an
    /// open round: a horizon raises this rank's bound (`movable`); a rank asked to stop gives
    /// up after its stop timeout ([`MultiRank::stop_expired`]); the round is abandoned
    /// `CKPT_ROUND_TIMEOUT` after this rank proposed; the coordinator, waiting at its bound
    /// for a while with proposals missing, moves the horizon on (`docs/multi-rank.md`, "Late
    /// ranks").
    fn look(&mut self, step: u64, movable: bool) -> Result<State> {
        let k = self.k;
        match self.state(k)? {
            State::Horizon(h) => {
                if let Some(j) = self.joined.as_mut().filter(|_| movable) {
                    if h > j.bound {
                        j.bound = h;
                        j.at_bound = None;
                    }
                }
            }
            State::Open => {}
            State::Aborted => {
                self.stop_abandoned(k);
                return Ok(State::Aborted);
            }
            s => return Ok(s),
        }
        let Some(since) = self.joined.as_ref().map(|j| j.since) else {
            return Ok(State::Open);
        };
        if let Some((bound, seen)) = self.stop_bound() {
            if seen.max(since).elapsed() >= bound {
                self.stop_expired(k, "propose-", bound);
            }
        }
        if since.elapsed() >= self.timeout {
            eprintln!(
                "ckpt: warning: rank {}: not every rank proposed a step in save round {k} within {:?}; abandoning the round",
                self.world.rank, self.timeout
            );
            self.abort(k);
            return Ok(State::Aborted);
        }
        let wait = self.max_pause();
        let extend = self.coordinator() && movable;
        let mut horizon = None;
        if let Some(j) = self.joined.as_mut().filter(|j| extend && step >= j.bound) {
            if j.at_bound.get_or_insert_with(Instant::now).elapsed() >= wait {
                let h = j.bound.saturating_add(j.ext);
                j.ext = j.ext.saturating_mul(2);
                j.bound = h;
                j.horizon = Some(h);
                j.at_bound = None;
                horizon = Some(h);
            }
        }
        if let Some(h) = horizon {
            let r = self.round(k);
            let io = self.store.io();
            let tmp = r.join(format!(".horizon.{}", crate::store::token()));
            let body = serde_json::to_vec(&Horizon { step: h }).expect("serialises");
            io.write_new(&tmp, &body).ctx("write horizon", &tmp)?;
            io.rename_replace(&tmp, &r.join("horizon"))
                .ctx("write horizon", &r.join("horizon"))?;
        }
        Ok(State::Open)
    }

    /// A rank asked to stop whose round did not complete within its stop timeout (`bound`):
    /// some rank never joined (`prefix`: no `propose-` or no `done-` marker: it is gone or
    /// blocked), so the stop checkpoint can never be published. It abandons the round, leaves
    /// the launch, names the missing ranks and exits with status 143, as a single process
    /// that reached no safe point within the stop timeout (`docs/multi-rank.md`, "A stop that
    /// cannot complete"). Returns only if the round was published meanwhile.
    fn stop_expired(&mut self, k: u64, prefix: &str, bound: Duration) {
        let r = self.round(k);
        let names = self.list(&r).unwrap_or_default();
        let mut missing: Vec<String> = (0..self.world.size)
            .filter(|rank| !names.iter().any(|n| *n == format!("{prefix}{rank:05}")))
            .map(|rank| rank.to_string())
            .collect();
        let won = self.abort(k);
        if !won && r.join("published").exists() {
            return;
        }
        let n = missing.len();
        missing.truncate(16);
        let what = if prefix == "done-" {
            "saved their shard"
        } else {
            "proposed"
        };
        let within = format!(
            "in save round {k} of {} within the stop timeout of {:.1}s",
            self.dir.display(),
            bound.as_secs_f64()
        );
        self.exit_stop(if n == 0 {
            format!("rank {COORDINATOR} (the coordinator) never concluded the round (every rank {what} {within}: it is gone or blocked)")
        } else {
            let more = if n > missing.len() {
                format!(" and {} more", n - missing.len())
            } else {
                String::new()
            };
            format!(
                "rank(s) {}{more} never joined it (not {what} {within}: gone or blocked)",
                missing.join(", ")
            )
        });
    }

    /// A rank asked to stop whose round was abandoned by another rank (which gave up on a
    /// missing rank, or left): the stop checkpoint cannot complete either; it exits as in
    /// [`MultiRank::stop_expired`]. Returns when the job was not asked to stop.
    fn stop_abandoned(&mut self, k: u64) {
        if self.stop_bound().is_some() {
            self.exit_stop(format!(
                "save round {k} of {} was abandoned by another rank (a rank is gone or left: see its message)",
                self.dir.display()
            ));
        }
    }

    /// Leaves the launch, says why on stderr and exits with status 143 (a stop without a
    /// checkpoint).
    fn exit_stop(&mut self, why: String) -> ! {
        self.leave();
        eprintln!(
            "ckpt: SIGTERM: rank {}: the stop checkpoint cannot complete: {why}; exiting now with status 143 without a checkpoint (hint: set {} to wait longer)",
            self.world.rank,
            crate::client::ENV_STOP_TIMEOUT
        );
        std::process::exit(128 + libc::SIGTERM);
    }

    /// How long a waiting rank sleeps before its next look: a tenth of the time it has waited
    /// so far, between 0.5 ms and [`MultiRank::max_pause`] (both clients; `docs/multi-rank.md`,
    /// "Waiting").
    fn pause(&self, waited: Duration) -> Duration {
        (waited / 10).clamp(Duration::from_micros(500), self.max_pause())
    }

    /// Abandons round `k`: the stage (and every shard in it) goes, `aborted` records it. The
    /// rename of the stage is the arbiter against a concurrent publish.
    /// Returns whether this rank's rename won (false: the round had already concluded).
    fn abort(&self, k: u64) -> bool {
        let r = self.round(k);
        let io = self.store.io();
        let trash = r.join(format!("trash-{}", crate::store::token()));
        if io.rename_noreplace(&r.join("stage"), &trash).is_ok() {
            let _ = io.write_new(&r.join("aborted"), b"");
            let _ = io.remove_dir_all(&trash);
            return true;
        }
        false
    }

    /// This rank leaves the launch (its `Checkpointer` is dropped: it finished or is
    /// exiting). A round it is in is abandoned (it will never write its shard), and it creates
    /// `<epoch>/left`: every other rank then abandons the round it waits in and joins no
    /// further round, since no checkpoint of this launch can hold every shard any more. (One
    /// marker for every later round: a "never" proposal in the next round only, as before,
    /// left the rounds after that one waiting for the departed rank until the round timeout.)
    pub fn leave(&mut self) {
        if self.joined.is_some() {
            self.abort(self.k);
            self.conclude();
        }
        let marker = self.left_marker();
        match self
            .store
            .io()
            .write_new(&marker, format!("{}\n", self.world.rank).as_bytes())
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => eprintln!(
                "ckpt: warning: rank {}: cannot mark that it left ({}: {e}); the other ranks' next save round will time out",
                self.world.rank,
                marker.display()
            ),
        }
        self.left_seen = true;
    }

    fn conclude(&mut self) {
        self.joined = None;
        self.at_target = None;
        self.k += 1;
        self.last_poll = None;
    }

    /// Saves this rank's shard: `stage` (filled by the job) becomes `rank-NNNNN/` of the
    /// round's checkpoint. `step`: the step the job gave to the save, recorded in the manifest
    /// (`None`: the agreed position). Returns once every shard is durable and the checkpoint is
    /// visible, or an error when the round was abandoned: on the coordinator (rank 0, which
    /// publishes) the checkpoint's manifest, on every other rank the checkpoint's `seq`,
    /// `step`, `world_size` and checksum with only this rank's files (without reading the
    /// whole manifest, whose size grows with the number of ranks).
    pub fn commit_shard(
        &mut self,
        stage: Stage,
        algo: Algo,
        step: Option<u64>,
        stop: bool,
        writer: &str,
    ) -> Result<Manifest> {
        self.published_last = false;
        // Where this save is, when it is not the save should_checkpoint asked for: the
        // explicit step wins, else the position.
        let here = step.unwrap_or_else(|| self.position());
        if self.joined.is_none() {
            // A save without a request: every rank must make it at the same position.
            if !self.join(here, stop, true)? {
                return Err(Error::Usage(format!(
                    "no multi-rank checkpoint can be saved any more in this launch: a rank left it (its client was dropped or closed; see {}); hint: keep every rank's client open until the job's last save",
                    self.left_marker().display()
                )));
            }
        }
        let k = self.k;
        let t = match self.joined.as_ref().and_then(|j| j.target) {
            Some(t) => t,
            None => match self.wait_target(here, false)? {
                State::Agreed(t) => {
                    if let Some(j) = self.joined.as_mut() {
                        j.agreed_at = Some(Instant::now());
                    }
                    t
                }
                _ => {
                    self.conclude();
                    return Err(self.abandoned(k, "not every rank proposed a step"));
                }
            },
        };
        if self.at_target.is_none() && t.step != here {
            self.abort(k);
            self.conclude();
            return Err(Error::Usage(format!(
                "rank {} saved at step {here} but the ranks agreed on step {} in save round {k}; the round was abandoned, nothing was published (hint: call save only when should_checkpoint() says so, or at the same step on every rank)",
                self.world.rank, t.step
            )));
        }
        // The manifest records the step the job gave (the publisher checks that every rank
        // gave the same one), else the save point's position (the agreed one, or the first
        // explicit step past it).
        let rec = Target {
            step: step.unwrap_or(self.at_target.unwrap_or(t.step)),
            stop: t.stop,
        };
        let res = self.write_shard(k, stage, algo, rec, writer);
        self.conclude();
        let m = res?;
        if t.stop {
            self.stop_agreed = true;
        }
        Ok(m)
    }

    fn abandoned(&self, k: u64, why: &str) -> Error {
        Error::Usage(format!(
            "save round {k} of {} was abandoned ({why}): no checkpoint was published, the shards were removed",
            self.dir.display()
        ))
    }

    fn write_shard(
        &mut self,
        k: u64,
        stage: Stage,
        algo: Algo,
        t: Target,
        writer: &str,
    ) -> Result<Manifest> {
        let r = self.round(k);
        let io = self.store.io();
        let (src, known) = stage.into_parts();
        // Seal the shard: sums, fsync of every file and directory, like a single-rank stage.
        let sealed = (|| {
            let mut files = Vec::new();
            let mut dirs = Vec::new();
            dirs.push(src.clone());
            crate::store::commit::walk(&src, &src, &mut files, &mut dirs)?;
            let mut entries = Vec::with_capacity(files.len());
            for (name, path) in files {
                crate::store::manifest::check_name(&name).map_err(Error::Name)?;
                let e = match known.iter().find(|e| e.name == name) {
                    Some(e) => e.clone(),
                    None => {
                        let (size, sum) = crate::store::commit::checksum_file(&path, algo)?;
                        FileEntry { name, size, sum }
                    }
                };
                io.fsync_file(&path).ctx("fsync", &path)?;
                entries.push(e);
            }
            if entries.is_empty() {
                return Err(Error::Usage(format!(
                    "rank {} saved an empty shard: every rank's shard must hold at least one file (a checkpoint without it would not verify); the save round was abandoned",
                    self.world.rank
                )));
            }
            for d in dirs.iter().rev() {
                io.fsync_dir(d).ctx("fsync", d)?;
            }
            Ok::<_, Error>(entries)
        })();
        let entries = match sealed {
            Ok(e) => e,
            Err(e) => {
                let _ = io.remove_dir_all(&src);
                self.abort(k);
                return Err(e);
            }
        };
        let dest = r.join("stage").join(self.world.shard_dir());
        if let Err(e) = io.rename_noreplace(&src, &dest) {
            let _ = io.remove_dir_all(&src);
            if !r.join("stage").exists() {
                return Err(self.abandoned(k, "another rank gave up waiting"));
            }
            self.abort(k);
            return Err(Error::io("move the shard into", &dest, e));
        }
        let done_tmp = r.join(format!(".done.{}", crate::store::token()));
        let done = r.join(format!("done-{:05}", self.world.rank));
        // What this rank returns once the checkpoint is published, unless it publishes it: its
        // own shard's entries, as the manifest names them.
        let prefix = self.world.shard_dir();
        let own: Vec<FileEntry> = entries
            .iter()
            .map(|f| FileEntry {
                name: format!("{prefix}/{}", f.name),
                ..f.clone()
            })
            .collect();
        let body = serde_json::to_vec(&ShardDone {
            rank: self.world.rank,
            step: t.step,
            checksum: algo,
            files: entries,
        })
        .expect("serialises");
        let marked = (|| {
            // The shard's directory entry in the stage must be durable before it counts: both
            // parents of its rename (a rename is durable only once both are fsynced; the
            // crash-state test found a lost shard without the staging directory's fsync).
            io.fsync_dir(&dest).ctx("fsync", &dest)?;
            io.fsync_dir(&r.join("stage"))
                .ctx("fsync", &r.join("stage"))?;
            if let Some(parent) = src.parent() {
                io.fsync_dir(parent).ctx("fsync", parent)?;
            }
            io.write_new(&done_tmp, &body).ctx("write", &done_tmp)?;
            io.rename_replace(&done_tmp, &done).ctx("write", &done)
        })();
        if let Err(e) = marked {
            self.abort(k);
            return Err(e);
        }
        if self.coordinator() {
            return self.gather_done(k, t, writer);
        }
        // Wait for the outcome: two files, whatever the number of ranks.
        let start = Instant::now();
        let own_time = self.own_save_time();
        let mut gave_up = false;
        loop {
            if let Ok(b) = crate::store::io::read_small(&r.join("published"), 64 << 10) {
                let p: Published = serde_json::from_slice(&b)
                    .map_err(|e| Error::Usage(format!("bad round outcome: {e}")))?;
                // Not the whole manifest, which lists every rank's files (its size grows with
                // the number of ranks): the checkpoint's number, step and world size, and this
                // rank's own files (`docs/multi-rank.md`, step 7 of the commit).
                let mut m = Manifest::new(p.seq, Some(t.step), writer, algo, own);
                m.world_size = Some(self.world.size);
                return Ok(m);
            }
            if r.join("aborted").exists() {
                self.someone_left();
                self.stop_abandoned(k);
                return Err(self.abandoned(k, "a rank did not finish its shard in time"));
            }
            self.outcome_stop_check(k, start, own_time);
            if start.elapsed() >= self.timeout {
                if gave_up {
                    return Err(
                        self.abandoned(k, "its outcome is unknown: the publishing rank vanished")
                    );
                }
                eprintln!(
                    "ckpt: warning: rank {}: not every shard of save round {k} was durable within {:?}; abandoning the round",
                    self.world.rank, self.timeout
                );
                self.abort(k);
                gave_up = true;
                continue;
            }
            std::thread::sleep(self.pause(start.elapsed()));
        }
    }

    /// How long this rank's own save took, from learning the agreed step to its done marker:
    /// the other ranks' shards, as large in an SPMD job, take about as long.
    fn own_save_time(&self) -> Duration {
        self.joined
            .as_ref()
            .and_then(|j| j.agreed_at)
            .map_or(Duration::ZERO, |t| t.elapsed())
    }

    /// A rank asked to stop that waits for the round's outcome gives up after its stop
    /// timeout plus its own save's time (`own`), counted from its done marker (`start`) or
    /// the stop request, whichever came later ([`MultiRank::stop_expired`]).
    fn outcome_stop_check(&mut self, k: u64, start: Instant, own: Duration) {
        if let Some((bound, seen)) = self.stop_bound() {
            if seen.max(start).elapsed() >= bound + own {
                self.stop_expired(k, "done-", bound + own);
            }
        }
    }

    /// The coordinator, its own shard durable, waits for every rank's done marker (one
    /// `readdir` of the round per look), then publishes; abandons the round after the timeout.
    fn gather_done(&mut self, k: u64, t: Target, writer: &str) -> Result<Manifest> {
        let r = self.round(k);
        let start = Instant::now();
        let own = self.own_save_time();
        loop {
            let names = self.list(&r)?;
            if names.iter().any(|n| n == "aborted") {
                self.someone_left();
                self.stop_abandoned(k);
                return Err(self.abandoned(
                    k,
                    "another rank abandoned it: a shard was late, failed or was refused",
                ));
            }
            if self.count_ranks(&names, "done-") == self.world.size {
                return match self.publish(k, t, writer) {
                    Ok(m) => {
                        self.published_last = true;
                        // Every rank has finished with the previous round (it joined this one).
                        if k > 1 {
                            let _ = self.store.io().remove_dir_all(&self.round(k - 1));
                        }
                        Ok(m)
                    }
                    Err(e) => {
                        self.abort(k);
                        Err(e)
                    }
                };
            }
            self.outcome_stop_check(k, start, own);
            if start.elapsed() >= self.timeout {
                eprintln!(
                    "ckpt: warning: rank {}: not every shard of save round {k} was durable within {:?}; abandoning the round",
                    self.world.rank, self.timeout
                );
                self.abort(k);
                return Err(self.abandoned(k, "a rank did not finish its shard in time"));
            }
            std::thread::sleep(self.pause(start.elapsed()));
        }
    }

    /// Writes the top-level manifest listing every shard's files and publishes the stage with
    /// the single atomic rename.
    fn publish(&self, k: u64, t: Target, writer: &str) -> Result<Manifest> {
        let r = self.round(k);
        let io = self.store.io();
        let stage = r.join("stage");
        let mut entries = Vec::new();
        let mut algo = None;
        for rank in 0..self.world.size {
            let p = r.join(format!("done-{rank:05}"));
            let b = crate::store::io::read_small(&p, 64 << 20).ctx("read", &p)?;
            let d: ShardDone = serde_json::from_slice(&b)
                .map_err(|e| Error::Usage(format!("bad shard record {}: {e}", p.display())))?;
            if d.rank != rank || d.step != t.step || algo.is_some_and(|a| a != d.checksum) {
                return Err(Error::Usage(format!(
                    "shard record {} does not match the round (rank {}, step {})",
                    p.display(),
                    d.rank,
                    d.step
                )));
            }
            algo = Some(d.checksum);
            let prefix = shard_name(rank);
            entries.extend(d.files.into_iter().map(|f| FileEntry {
                name: format!("{prefix}/{}", f.name),
                ..f
            }));
        }
        let algo = algo.unwrap_or(Algo::Crc32c);
        let mut manifest = Manifest::new(0, Some(t.step), writer, algo, entries);
        manifest.world_size = Some(self.world.size);
        // The one publish path (store/commit.rs), shared with every other save.
        crate::store::commit::publish(&self.store, &stage, &mut manifest, &[])?;
        let body = serde_json::to_vec(&Published { seq: manifest.seq }).expect("serialises");
        let tmp = r.join(format!(".published.{}", crate::store::token()));
        io.write_new(&tmp, &body).ctx("write", &tmp)?;
        let published = r.join("published");
        io.rename_replace(&tmp, &published)
            .ctx("write", &published)?;
        Ok(manifest)
    }
}
