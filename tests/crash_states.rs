//! Crash-consistency test of the store, in the spirit of ALICE / CrashMonkey and redb's crash
//! backend. The protocol under test is walked through in `docs/commit-protocol.md`.
//!
//! 1. A scenario (create the directory, several saves, retention, an externally corrupted
//!    checkpoint set aside by recovery, more saves and pruning) runs against a real directory
//!    through a *recording* [`Io`]: every directory-entry operation (mkdir, create, rename,
//!    unlink), every data write and every fsync is logged, in terms of inodes.
//! 2. For **every** prefix of that log (a crash right after operation k), and for each
//!    allowed loss of what was not yet durable, the directory a crash could leave is rebuilt:
//!    - an entry operation (create, mkdir, rename, unlink) is durable once every directory it
//!      touched was fsynced after it (a rename touches both parents and is atomic);
//!      until then it may be lost, independently of the others (no ordering assumed);
//!    - a file's data is durable once the file was fsynced after the write; until then its
//!      tail may be dropped (kept whole, emptied, halved, or cut by one byte).
//!      With few pending operations every subset is enumerated; with more, a structured set
//!      (none, all, each alone, all but each, every newest-n and oldest-n run).
//! 3. On each distinct state, recovery runs exactly as `ckpt run` does it (clean leftovers,
//!    newest verified checkpoint with quarantine), and the test checks that the checkpoint
//!    chosen verifies and has the bytes that were saved under its number, that it is at least
//!    the newest one whose commit had returned (was durable), that every earlier durable
//!    checkpoint not yet being pruned is still there and verifies, that a corrupted one was
//!    moved aside rather than deleted, that no staging or trash is left, and that recovery is
//!    idempotent.
//!
//! The number of crash states checked is printed (and recorded in docs/commit-protocol.md).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ckpt::store::{Algo, Io, RealIo, Stage, Store};

type Ino = usize;
const ROOT: Ino = 0;

#[derive(Clone, Debug)]
enum Node {
    Dir(BTreeMap<String, Ino>),
    File(Vec<u8>),
}

#[derive(Clone, Debug)]
enum Op {
    Mkdir {
        parent: Ino,
        name: String,
        ino: Ino,
    },
    Create {
        parent: Ino,
        name: String,
        ino: Ino,
        data: Vec<u8>,
    },
    Rename {
        from: Ino,
        fname: String,
        to: Ino,
        tname: String,
        ino: Ino,
    },
    Unlink {
        parent: Ino,
        name: String,
        ino: Ino,
    },
    FsyncFile(Ino),
    FsyncDir(Ino),
    /// Damage from outside (a bad disk): on disk at once.
    Corrupt {
        ino: Ino,
        data: Vec<u8>,
    },
}

impl Op {
    /// Directories whose fsync makes this entry operation durable (all of them needed).
    fn touched(&self) -> Vec<Ino> {
        match self {
            Op::Mkdir { parent, .. } | Op::Create { parent, .. } | Op::Unlink { parent, .. } => {
                vec![*parent]
            }
            Op::Rename { from, to, .. } => vec![*from, *to],
            _ => vec![],
        }
    }
}

/// The live model: kept in step with the real directory by the recorder.
#[derive(Default)]
struct Live {
    nodes: HashMap<Ino, Node>,
    next: Ino,
    log: Vec<Op>,
}

impl Live {
    fn lookup(&self, comps: &[String]) -> Option<Ino> {
        let mut cur = ROOT;
        for c in comps {
            match self.nodes.get(&cur) {
                Some(Node::Dir(m)) => cur = *m.get(c)?,
                _ => return None,
            }
        }
        Some(cur)
    }
    fn new_ino(&mut self, n: Node) -> Ino {
        self.next += 1;
        self.nodes.insert(self.next, n);
        self.next
    }
    fn apply(&mut self, op: Op) {
        apply(&mut self.nodes, &op);
        self.log.push(op);
    }
}

fn dir_mut(nodes: &mut HashMap<Ino, Node>, ino: Ino) -> &mut BTreeMap<String, Ino> {
    match nodes.get_mut(&ino) {
        Some(Node::Dir(m)) => m,
        other => panic!("inode {ino} is not a directory: {other:?}"),
    }
}

/// Applies an entry or data operation. Inodes exist independently of their names (a lost
/// mkdir orphans what was put in it; a durable rename of it re-attaches it).
fn apply(nodes: &mut HashMap<Ino, Node>, op: &Op) {
    match op {
        Op::Mkdir { parent, name, ino } => {
            nodes.entry(*ino).or_insert(Node::Dir(BTreeMap::new()));
            dir_mut(nodes, *parent).insert(name.clone(), *ino);
        }
        Op::Create {
            parent,
            name,
            ino,
            data,
        } => {
            nodes.entry(*ino).or_insert(Node::File(data.clone()));
            dir_mut(nodes, *parent).insert(name.clone(), *ino);
        }
        Op::Rename {
            from,
            fname,
            to,
            tname,
            ino,
        } => {
            let src = dir_mut(nodes, *from);
            if src.get(fname) == Some(ino) {
                src.remove(fname);
            }
            dir_mut(nodes, *to).insert(tname.clone(), *ino);
        }
        Op::Unlink { parent, name, ino } => {
            let d = dir_mut(nodes, *parent);
            if d.get(name) == Some(ino) {
                d.remove(name);
            }
        }
        Op::Corrupt { ino, data } => {
            nodes.insert(*ino, Node::File(data.clone()));
        }
        Op::FsyncFile(_) | Op::FsyncDir(_) => {}
    }
}

/// The recording [`Io`]: performs each operation on the real directory, then logs it.
struct Recorder {
    root: PathBuf,
    real: RealIo,
    live: Mutex<Live>,
}

impl Recorder {
    fn new(root: &Path) -> Recorder {
        let mut live = Live::default();
        live.nodes.insert(ROOT, Node::Dir(BTreeMap::new()));
        Recorder {
            root: root.to_path_buf(),
            real: RealIo,
            live: Mutex::new(live),
        }
    }
    fn comps(&self, p: &Path) -> Vec<String> {
        let rel = p
            .strip_prefix(&self.root)
            .unwrap_or_else(|_| panic!("{} is outside the recorded root", p.display()));
        rel.components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect()
    }
    fn split(&self, p: &Path) -> (Ino, String) {
        let mut c = self.comps(p);
        let name = c.pop().expect("not the root");
        let live = self.live.lock().unwrap();
        let parent = live
            .lookup(&c)
            .unwrap_or_else(|| panic!("parent of {} unknown", p.display()));
        (parent, name)
    }
    fn ino(&self, p: &Path) -> Ino {
        let c = self.comps(p);
        self.live
            .lock()
            .unwrap()
            .lookup(&c)
            .unwrap_or_else(|| panic!("{} unknown", p.display()))
    }
    fn log(&self) -> Vec<Op> {
        self.live.lock().unwrap().log.clone()
    }
    fn len(&self) -> usize {
        self.live.lock().unwrap().log.len()
    }
    fn corrupt(&self, p: &Path, data: Vec<u8>) {
        std::fs::write(p, &data).unwrap();
        let ino = self.ino(p);
        self.live.lock().unwrap().apply(Op::Corrupt { ino, data });
    }
}

impl Io for Recorder {
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        self.real.create_dir_all(path)?;
        let comps = self.comps(path);
        let mut live = self.live.lock().unwrap();
        for i in 1..=comps.len() {
            if live.lookup(&comps[..i]).is_none() {
                let parent = live.lookup(&comps[..i - 1]).unwrap();
                let ino = live.new_ino(Node::Dir(BTreeMap::new()));
                live.apply(Op::Mkdir {
                    parent,
                    name: comps[i - 1].clone(),
                    ino,
                });
            }
        }
        Ok(())
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.real.create_dir(path)?;
        let (parent, name) = self.split(path);
        let mut live = self.live.lock().unwrap();
        let ino = live.new_ino(Node::Dir(BTreeMap::new()));
        live.apply(Op::Mkdir { parent, name, ino });
        Ok(())
    }
    fn write_new(&self, path: &Path, data: &[u8]) -> io::Result<()> {
        self.real.write_new(path, data)?;
        let (parent, name) = self.split(path);
        let mut live = self.live.lock().unwrap();
        let ino = live.new_ino(Node::File(data.to_vec()));
        live.apply(Op::Create {
            parent,
            name,
            ino,
            data: data.to_vec(),
        });
        Ok(())
    }
    fn fsync_file(&self, path: &Path) -> io::Result<()> {
        self.real.fsync_file(path)?;
        let ino = self.ino(path);
        self.live.lock().unwrap().apply(Op::FsyncFile(ino));
        Ok(())
    }
    fn fsync_dir(&self, path: &Path) -> io::Result<()> {
        self.real.fsync_dir(path)?;
        let ino = self.ino(path);
        self.live.lock().unwrap().apply(Op::FsyncDir(ino));
        Ok(())
    }
    fn rename_noreplace(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.real.rename_noreplace(from, to)?;
        let (f, fname) = self.split(from);
        let (t, tname) = self.split(to);
        let mut live = self.live.lock().unwrap();
        let ino = match live.nodes.get(&f) {
            Some(Node::Dir(m)) => m[&fname],
            _ => unreachable!(),
        };
        live.apply(Op::Rename {
            from: f,
            fname,
            to: t,
            tname,
            ino,
        });
        Ok(())
    }
    fn rename_replace(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.real.rename_replace(from, to)?;
        let (f, fname) = self.split(from);
        let (t, tname) = self.split(to);
        let mut live = self.live.lock().unwrap();
        let ino = match live.nodes.get(&f) {
            Some(Node::Dir(m)) => m[&fname],
            _ => unreachable!(),
        };
        live.apply(Op::Rename {
            from: f,
            fname,
            to: t,
            tname,
            ino,
        });
        Ok(())
    }
    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        // Logged as the unlinks the kernel performs: children first.
        let (parent, name) = self.split(path);
        let top = self.ino(path);
        let mut unlinks = Vec::new();
        {
            let live = self.live.lock().unwrap();
            fn post(live: &Live, dir: Ino, out: &mut Vec<Op>) {
                if let Some(Node::Dir(m)) = live.nodes.get(&dir) {
                    for (n, &i) in m {
                        post(live, i, out);
                        out.push(Op::Unlink {
                            parent: dir,
                            name: n.clone(),
                            ino: i,
                        });
                    }
                }
            }
            post(&live, top, &mut unlinks);
        }
        unlinks.push(Op::Unlink {
            parent,
            name,
            ino: top,
        });
        self.real.remove_dir_all(path)?;
        let mut live = self.live.lock().unwrap();
        for op in unlinks {
            live.apply(op);
        }
        Ok(())
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.real.remove_file(path)?;
        let (parent, name) = self.split(path);
        let ino = self.ino(path);
        self.live
            .lock()
            .unwrap()
            .apply(Op::Unlink { parent, name, ino });
        Ok(())
    }
}

/// What the scenario knows about each checkpoint.
#[derive(Default)]
struct Facts {
    /// seq -> files saved under it (known for every commit, acknowledged or not).
    content: BTreeMap<u64, Vec<(String, Vec<u8>)>>,
    /// seq -> log length when its commit returned (durable from then on).
    acked: BTreeMap<u64, usize>,
    /// seq -> index of the rename that took it out of the directory (prune or quarantine).
    removed: BTreeMap<u64, usize>,
    /// seq -> log length when it was damaged.
    corrupted: BTreeMap<u64, usize>,
}

fn save(store: &Store, rec: &Recorder, facts: &mut Facts, files: &[(&str, Vec<u8>)]) -> u64 {
    let mut st = Stage::new(store, Algo::Crc32c).unwrap();
    for (n, d) in files {
        st.write_file(n, d).unwrap();
    }
    let m = st
        .commit(Some(0), "crash-test", Default::default())
        .unwrap();
    facts.acked.insert(m.seq, rec.len());
    facts.content.insert(
        m.seq,
        files
            .iter()
            .map(|(n, d)| (n.to_string(), d.clone()))
            .collect(),
    );
    m.seq
}

fn payload(seq: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seq.wrapping_mul(97))
        .collect()
}

/// Runs the scenario through the recorder; returns the log, the facts and the store's path
/// inside the root.
fn record(root: &Path) -> (Vec<Op>, Facts, &'static str) {
    let rec = Arc::new(Recorder::new(root));
    let store = Store::with_io(root.join("ckpts"), rec.clone());
    let mut f = Facts::default();
    store.create().unwrap();
    // Three saves (one with a sub-directory), then retention keeps two.
    save(&store, &rec, &mut f, &[("state", payload(1, 40))]);
    save(
        &store,
        &rec,
        &mut f,
        &[("state", payload(2, 50)), ("opt/moments", payload(12, 20))],
    );
    let s3 = save(&store, &rec, &mut f, &[("state", payload(3, 60))]);
    let newest = store.latest_verified(false, |_| {}).unwrap().unwrap().seq;
    store.prune(2, None, &[newest]).unwrap();
    // The newest is damaged on disk; retention with a corrupt newest must keep the newest
    // that verifies; recovery sets the damaged one aside.
    let state3 = store.path_of(s3).join("state");
    let mut bad = payload(3, 60);
    bad[7] ^= 0x40;
    rec.corrupt(&state3, bad);
    f.corrupted.insert(s3, rec.len());
    let good = store.latest_verified(false, |_| {}).unwrap().unwrap().seq;
    store.prune(1, None, &[good]).unwrap();
    let found = store.latest_verified(true, |_| {}).unwrap().unwrap();
    assert_eq!(found.seq, 2);
    // Two more saves with retention after each, as the supervisor does.
    let s4 = save(
        &store,
        &rec,
        &mut f,
        &[("state", payload(4, 70)), ("opt/moments", payload(14, 30))],
    );
    store.prune(1, None, &[s4]).unwrap();
    let s5 = save(&store, &rec, &mut f, &[("state", payload(5, 33))]);
    store.prune(1, None, &[s5]).unwrap();
    // A multi-rank save (a world of one rank): its round, shard and publish go through the
    // same Io and the same publish path.
    let world = ckpt::World::new(0, 1).unwrap();
    let mut mr = ckpt::multi_rank::MultiRank::new(&store, world, "crash.1").unwrap();
    let mut st = Stage::new(&store, Algo::Crc32c).unwrap();
    st.write_file("state", &payload(6, 44)).unwrap();
    let m = mr
        .commit_shard(st, Algo::Crc32c, Some(6), false, "crash-test")
        .unwrap();
    f.acked.insert(m.seq, rec.len());
    f.content.insert(
        m.seq,
        vec![("rank-00000/state".to_string(), payload(6, 44))],
    );
    store.prune(1, None, &[m.seq]).unwrap();

    let log = rec.log();
    // Where each checkpoint left the directory.
    let ckdir = {
        let live = rec.live.lock().unwrap();
        live.lookup(&["ckpts".to_string()]).unwrap()
    };
    for (i, op) in log.iter().enumerate() {
        if let Op::Rename { from, fname, .. } = op {
            if *from == ckdir {
                if let Some(seq) = ckpt::store::parse_seq(fname, false) {
                    f.removed.entry(seq).or_insert(i);
                }
            }
        }
    }
    (log, f, "ckpts")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Tail {
    Whole,
    Empty,
    Half,
    LastByteLost,
}
const TAILS: [Tail; 4] = [Tail::Whole, Tail::Empty, Tail::Half, Tail::LastByteLost];

fn cut(data: &[u8], t: Tail) -> &[u8] {
    match t {
        Tail::Whole => data,
        Tail::Empty => &[],
        Tail::Half => &data[..data.len() / 2],
        Tail::LastByteLost => &data[..data.len().saturating_sub(1)],
    }
}

/// Every subset when small; otherwise a structured family of subsets.
fn loss_sets(pending: &[usize], full_limit: usize) -> Vec<Vec<usize>> {
    let n = pending.len();
    let mut out: Vec<Vec<usize>> = Vec::new();
    if n <= full_limit {
        for mask in 0u32..(1 << n) {
            out.push(
                (0..n)
                    .filter(|b| mask & (1 << b) != 0)
                    .map(|b| pending[b])
                    .collect(),
            );
        }
        return out;
    }
    out.push(vec![]);
    out.push(pending.to_vec());
    for i in 0..n {
        out.push(vec![pending[i]]);
        out.push(
            pending
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, &p)| p)
                .collect(),
        );
    }
    for m in 1..n {
        out.push(pending[n - m..].to_vec());
        out.push(pending[..m].to_vec());
    }
    out
}

const DEAD_PID: &str = "2147480000";

/// The tree a replay leaves, as (path, None for a dir / Some(file inode)).
fn walk(nodes: &HashMap<Ino, Node>, dir: Ino, prefix: &str, out: &mut Vec<(String, Option<Ino>)>) {
    if let Some(Node::Dir(m)) = nodes.get(&dir) {
        for (name, &ino) in m {
            // The recording process is alive; in the crash state its staging is a dead
            // writer's.
            let me = format!(".{}", std::process::id());
            let name = match name.strip_suffix(&me) {
                Some(stem) => format!("{stem}.{DEAD_PID}"),
                None => name.clone(),
            };
            let p = format!("{prefix}/{name}");
            match nodes.get(&ino) {
                Some(Node::Dir(_)) => {
                    out.push((p.clone(), None));
                    walk(nodes, ino, &p, out);
                }
                Some(Node::File(_)) => out.push((p, Some(ino))),
                None => {}
            }
        }
    }
}

fn materialize(
    at: &Path,
    nodes: &HashMap<Ino, Node>,
    tree: &[(String, Option<Ino>)],
    tails: &HashMap<Ino, Tail>,
) {
    let _ = std::fs::remove_dir_all(at);
    std::fs::create_dir_all(at).unwrap();
    for (p, ino) in tree {
        let full = at.join(p.trim_start_matches('/'));
        match ino {
            None => std::fs::create_dir(&full).unwrap(),
            Some(i) => {
                let Some(Node::File(d)) = nodes.get(i) else {
                    unreachable!()
                };
                let t = tails.get(i).copied().unwrap_or(Tail::Whole);
                std::fs::write(&full, cut(d, t)).unwrap();
            }
        }
    }
}

struct Stats {
    prefixes: usize,
    enumerated: u64,
    distinct: u64,
    max_pending: usize,
}

fn check_state(dir: &Path, k: usize, facts: &Facts, what: &str) {
    let store = Store::new(dir);
    let ctx = || format!("crash after op {k} ({what})");
    if !dir.exists() {
        // The directory's own creation was not durable yet: then nothing was acknowledged.
        assert!(
            facts.acked.values().all(|&a| a > k),
            "{}: the checkpoint directory vanished although a commit had returned",
            ctx()
        );
        return;
    }
    store
        .clean_leftovers()
        .unwrap_or_else(|e| panic!("{}: cleaning leftovers failed: {e}", ctx()));
    let found = store
        .latest_verified(true, |_| {})
        .unwrap_or_else(|e| panic!("{}: recovery failed: {e}", ctx()));
    let live = |seq: &u64| facts.acked[seq] <= k && facts.removed.get(seq).is_none_or(|&r| r >= k);
    let corrupt = |seq: &u64| facts.corrupted.get(seq).is_some_and(|&c| c <= k);
    let newest_durable = facts
        .acked
        .keys()
        .filter(|s| live(s) && !corrupt(s))
        .max()
        .copied();
    if let Some(e) = newest_durable {
        let f = found
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no checkpoint recovered, {e} was durable", ctx()));
        assert!(
            f.seq >= e,
            "{}: recovered {} but {e} was durable",
            ctx(),
            f.seq
        );
    }
    if let Some(f) = &found {
        let expect = facts
            .content
            .get(&f.seq)
            .unwrap_or_else(|| panic!("{}: recovered unknown checkpoint {}", ctx(), f.seq));
        assert!(!corrupt(&f.seq), "{}: recovered damaged {}", ctx(), f.seq);
        for (name, data) in expect {
            let got = std::fs::read(f.path.join(name)).unwrap();
            assert_eq!(&got, data, "{}: checkpoint {} file {name}", ctx(), f.seq);
        }
    }
    // Every earlier durable checkpoint is still there and verifies.
    for seq in facts.acked.keys().filter(|s| live(s)) {
        if corrupt(seq) {
            // Damaged: still in place, or moved aside; never deleted.
            let in_q = std::fs::read_dir(dir.join("quarantine"))
                .map(|rd| {
                    rd.flatten().any(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.starts_with(&format!("ckpt-{seq:012}.")) && !n.ends_with(".txt")
                    })
                })
                .unwrap_or(false);
            assert!(
                in_q || store.path_of(*seq).exists(),
                "{}: damaged checkpoint {seq} was deleted",
                ctx()
            );
        } else if let Err(e) = store.verify(*seq) {
            panic!("{}: durable checkpoint {seq} does not verify: {e}", ctx());
        }
    }
    for sub in ["staging", "trash"] {
        let left: Vec<_> = std::fs::read_dir(dir.join(".ckpt").join(sub))
            .map(|rd| rd.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "{}: {sub} not cleaned: {left:?}", ctx());
    }
    // Idempotent: a second recovery (a crash right after the first) agrees and moves nothing.
    let mut moved = 0;
    let again = store.latest_verified(true, |_| moved += 1).unwrap();
    assert_eq!(again.map(|f| f.seq), found.map(|f| f.seq), "{}", ctx());
    assert_eq!(moved, 0, "{}: second recovery quarantined more", ctx());
}

#[test]
fn every_crash_state_recovers() {
    let base = if Path::new("/dev/shm").is_dir() {
        tempfile::Builder::new()
            .prefix("ckpt-crash-")
            .tempdir_in("/dev/shm")
            .unwrap()
    } else {
        tempfile::Builder::new()
            .prefix("ckpt-crash-")
            .tempdir()
            .unwrap()
    };
    let live_root = base.path().join("live");
    std::fs::create_dir(&live_root).unwrap();
    let (log, facts, sub) = record(&live_root);
    let full_limit: usize = std::env::var("CKPT_CRASH_FULL_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    eprintln!(
        "recorded {} operations; checkpoints {:?} acknowledged at {:?}, removed at {:?}, corrupted at {:?}",
        log.len(),
        facts.content.keys().collect::<Vec<_>>(),
        facts.acked,
        facts.removed,
        facts.corrupted
    );
    let state_dir = base.path().join("state");
    let mut stats = Stats {
        prefixes: 0,
        enumerated: 0,
        distinct: 0,
        max_pending: 0,
    };
    let mut seen: HashSet<u64> = HashSet::new();
    let started = std::time::Instant::now();
    for k in 0..=log.len() {
        stats.prefixes += 1;
        let prefix = &log[..k];
        // Which entry operations and which file data are durable after op k.
        let mut pending = Vec::new();
        let mut volatile_data: HashSet<Ino> = HashSet::new();
        for (i, op) in prefix.iter().enumerate() {
            let t = op.touched();
            if !t.is_empty() {
                let durable = t.iter().all(|d| {
                    prefix[i + 1..]
                        .iter()
                        .any(|o| matches!(o, Op::FsyncDir(x) if x == d))
                });
                if !durable {
                    pending.push(i);
                }
            }
            if let Op::Create { ino, .. } = op {
                if !prefix[i + 1..]
                    .iter()
                    .any(|o| matches!(o, Op::FsyncFile(x) if x == ino))
                {
                    volatile_data.insert(*ino);
                }
            }
        }
        stats.max_pending = stats.max_pending.max(pending.len());
        for lost in loss_sets(&pending, full_limit) {
            let lost: HashSet<usize> = lost.into_iter().collect();
            let mut nodes: HashMap<Ino, Node> = HashMap::new();
            nodes.insert(ROOT, Node::Dir(BTreeMap::new()));
            for (i, op) in prefix.iter().enumerate() {
                if !lost.contains(&i) {
                    apply(&mut nodes, op);
                } else {
                    // The name is lost but the inode (and what was put in it) exists.
                    match op {
                        Op::Mkdir { ino, .. } => {
                            nodes.entry(*ino).or_insert(Node::Dir(BTreeMap::new()));
                        }
                        Op::Create { ino, data, .. } => {
                            nodes.entry(*ino).or_insert(Node::File(data.clone()));
                        }
                        _ => {}
                    }
                }
            }
            let mut tree = Vec::new();
            walk(&nodes, ROOT, "", &mut tree);
            let vol: Vec<Ino> = tree
                .iter()
                .filter_map(|(_, i)| *i)
                .filter(|i| volatile_data.contains(i))
                .collect();
            let mut variants: Vec<HashMap<Ino, Tail>> = Vec::new();
            if vol.len() <= 3 {
                let n = vol.len() as u32;
                for code in 0..4usize.pow(n) {
                    let mut m = HashMap::new();
                    let mut c = code;
                    for &i in &vol {
                        m.insert(i, TAILS[c % 4]);
                        c /= 4;
                    }
                    variants.push(m);
                }
            } else {
                variants.push(HashMap::new());
                variants.push(vol.iter().map(|&i| (i, Tail::Empty)).collect());
                for &i in &vol {
                    for t in &TAILS[1..] {
                        variants.push([(i, *t)].into_iter().collect());
                    }
                }
            }
            for tails in variants {
                stats.enumerated += 1;
                let mut h = std::collections::hash_map::DefaultHasher::new();
                for (p, ino) in &tree {
                    p.hash(&mut h);
                    if let Some(i) = ino {
                        if let Some(Node::File(d)) = nodes.get(i) {
                            cut(d, tails.get(i).copied().unwrap_or(Tail::Whole)).hash(&mut h);
                        }
                    }
                }
                // The same directory contents after a different prefix expect the same, except
                // for what was acknowledged: key on the prefix's acknowledgements too.
                let acked_now: Vec<u64> = facts
                    .acked
                    .iter()
                    .filter(|(_, &a)| a <= k)
                    .map(|(s, _)| *s)
                    .collect();
                let removed_now: Vec<u64> = facts
                    .removed
                    .iter()
                    .filter(|(_, &r)| r < k)
                    .map(|(s, _)| *s)
                    .collect();
                (acked_now, removed_now).hash(&mut h);
                if !seen.insert(h.finish()) {
                    continue;
                }
                stats.distinct += 1;
                materialize(&state_dir, &nodes, &tree, &tails);
                let what = format!(
                    "lost ops {:?}, tails {:?}",
                    {
                        let mut l: Vec<_> = lost.iter().collect();
                        l.sort();
                        l
                    },
                    tails
                );
                check_state(&state_dir.join(sub), k, &facts, &what);
            }
        }
    }
    eprintln!(
        "crash states: {} prefixes of {} recorded operations, {} crash states enumerated, {} distinct states checked (max {} pending entry operations at one point; every subset enumerated up to {full_limit}), in {:.1}s",
        stats.prefixes,
        log.len(),
        stats.enumerated,
        stats.distinct,
        stats.max_pending,
        started.elapsed().as_secs_f64()
    );
    assert!(stats.distinct > 1000, "too few states checked");
}
