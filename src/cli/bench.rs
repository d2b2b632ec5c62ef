//! `ckpt bench`: measures checkpoint costs on the user's own storage, side by side with the
//! raw baselines, and recommends an interval. Method and figures: `docs/benchmarks.md`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::parse_duration;
use crate::store::{Algo, Stage, Store};
use crate::supervisor::interval::{auto_choice, auto_interval, ASYNC_HEADROOM, DEFAULT_MTBF};
use crate::supervisor::{fmt_bytes, fmt_dur, Fatal};

/// Measure checkpoint costs on this storage.
///
/// Runs, in one go and on the same directory: raw sequential write+fsync (`dd bs=4M
/// conv=fsync`, and `dd oflag=direct` past the page cache as ckpt's bulk writes go; an
/// equivalent in-process writer when dd is missing) and cold read baselines; ckpt's save
/// (bulk array path) and restore (verified inline); the stall of an asynchronous save next
/// to a plain in-memory copy of the state; the latency of a small durable commit. Prints
/// medians over --runs, the ratios (also the median of the per-round ratios, steadier on a
/// noisy disk), and the interval the Young/Daly rule recommends. Cold reads need root (to drop the page cache); otherwise reads are warm
/// and marked so. On a VM that reports freed memory to its host and shows the count
/// (/sys/module/page_reporting/parameters/reported_kib), each cold read waits until the
/// report of the dropped cache is finished ("cold, settled"), so that every read starts alike.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Directory on the storage to measure (a temporary sub-directory is used and removed).
    #[arg(long, short = 'd', default_value = ".", value_name = "DIR")]
    pub dir: PathBuf,
    /// State size (e.g. 256MiB, 1GiB).
    #[arg(long, default_value = "256MiB", value_parser = parse_size, value_name = "SIZE")]
    pub size: u64,
    /// Rounds; the medians are printed.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..), value_name = "N")]
    pub runs: u32,
    /// Mean time between failures for the recommended interval (default 24h).
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub mtbf: Option<Duration>,
    /// Print the results as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// The save path to measure, the one the job uses: `rust` (the Rust client's bulk arrays,
    /// `Stage::write_f32s`; also restores, async saves, small commits), `file` (`ckpt save
    /// FILE` of a SIZE-byte file, the real command; restore: `ckpt verify`, what a resume
    /// reads), `python` (the Python client's `Checkpointer.save` of a numpy array of SIZE
    /// bytes in a python3 child, next to the job's own `np.save` + fsync; restore:
    /// `Checkpointer.restore`), `torch` (`ckpt.torch.TrainState.save` of a state dict holding
    /// one float32 tensor of SIZE bytes, next to the job's own `torch.save` + fsync; restore:
    /// `TrainState.restore` into fresh objects, and into a `torch.nn.Module` that has its
    /// parameter already, as a training job resumes; needs --python with torch, e.g.
    /// /opt/ckpt-torch/bin/python), `saving` (files the job writes itself inside the Python
    /// client's `ck.saving()`: `np.save` of the array into `ck.direct_file`, and, reported
    /// beside it, `np.save` into a plain file of the checkpoint's directory; next to the job's
    /// own `np.save` + fsync; restore: `ckpt verify`, what the supervisor runs before a
    /// resume, then `np.load` of the file by the job).
    /// `file`, `python`, `torch` and `saving` are measured against `dd bs=4M oflag=direct` of the same
    /// bytes and cold `dd` reads (`bs=4M`, and `iflag=direct`) in the same rounds. For `rust`,
    /// `python` and `torch` the restore alone is a one-read resume (`ckpt run --restore-check
    /// client`, and the default `auto` once the job's client has vouched for a restore); a
    /// resume under the full check (the supervisor's verify, then the restore: `full`, and
    /// `auto`'s first resume) is measured beside it.
    #[arg(long, value_enum, default_value = "rust")]
    pub path: BenchPath,
    /// Python interpreter for `--path python|torch` (needs numpy, torch for `torch`, and the ckpt package; the package
    /// of this source tree is found when ckpt runs from its target/ directory).
    #[arg(long, default_value = "python3", value_name = "PYTHON")]
    pub python: PathBuf,
}

/// What `ckpt bench --path` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchPath {
    /// The Rust client's bulk arrays.
    Rust,
    /// `ckpt save FILE`.
    File,
    /// The Python client's `Checkpointer.save` of numpy arrays.
    Python,
    /// `ckpt.torch.TrainState.save` of a state dict (torch.save through `ck.direct_file`).
    Torch,
    /// Files the job writes itself in `ck.saving()` (`np.save` into `ck.direct_file`, and
    /// into a plain file of the checkpoint's directory).
    Saving,
}

/// Parses `256MiB`, `1GiB`, `512M`, `1G`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 256MiB or 1GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit (use KiB, MiB, GiB)")),
    };
    let v = (n * mult as f64) as u64;
    if v < 1 << 20 {
        return Err(format!("{s:?}: at least 1MiB"));
    }
    Ok(v)
}

fn io_fail(what: &str, p: &Path, e: impl std::fmt::Display) -> Fatal {
    Fatal::io(format!("bench: {what} {}: {e}", p.display()))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Drops the page cache (root only), then waits for free-page reporting to settle. Returns
/// whether the drop worked.
fn drop_caches() -> bool {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    let ok = fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok();
    if ok {
        settle_page_reporting();
    }
    ok
}

/// Where a guest kernel that reports freed memory to its hypervisor (virtio-balloon free
/// page reporting) counts what it reported, when it exposes the count.
const REPORTED_KIB: &str = "/sys/module/page_reporting/parameters/reported_kib";

/// After a cache drop, a VM with free page reporting hands the freed memory back to its host
/// in batches over a second or two; a read that starts meanwhile gets pages the host still
/// backs, and one that starts later faults each new page in on the host: the same cold read
/// then varies 3x (docs/benchmarks.md run G). Waits until the reported count has stayed still
/// for 1.5 s (at most 10 s), so that every cold read starts from the same state: all freed
/// memory returned, as after a reboot or a long-dead job. A no-op where the count is absent.
fn settle_page_reporting() {
    let read = || {
        fs::read_to_string(REPORTED_KIB)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let Some(mut last) = read() else {
        return;
    };
    let (start, mut since) = (Instant::now(), Instant::now());
    while start.elapsed() < Duration::from_secs(10) && since.elapsed() < Duration::from_millis(1500)
    {
        std::thread::sleep(Duration::from_millis(100));
        match read() {
            Some(v) if v != last => (last, since) = (v, Instant::now()),
            Some(_) => {}
            None => return,
        }
    }
}

fn dd_available() -> bool {
    Command::new("dd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Raw sequential write + fsync of `size` bytes: `dd if=SRC bs=4M conv=fsync` from a file of
/// random bytes in the page cache (not /dev/zero: virtual disks may special-case zeros), or
/// the same pattern in process (4 MiB writes from one reused buffer, then fsync). `direct`
/// adds `oflag=direct` (dd only): the stricter baseline, past the page cache like ckpt's
/// bulk writes.
fn raw_write(
    path: &Path,
    src: &Path,
    size: u64,
    use_dd: bool,
    direct: bool,
) -> Result<Duration, Fatal> {
    let _ = fs::remove_file(path);
    // The source must come from the page cache (the cold reads dropped it), untimed.
    raw_read(src, false)?;
    let t = Instant::now();
    if use_dd {
        let st = Command::new("dd")
            .arg(format!("if={}", src.display()))
            .arg(format!("of={}", path.display()))
            .args(["bs=4M", "conv=fsync"])
            .args(direct.then_some("oflag=direct"))
            .arg(format!("count={}", size.div_ceil(4 << 20)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| io_fail("run dd for", path, e))?;
        if !st.success() {
            return Err(io_fail("dd failed writing", path, st));
        }
    } else {
        let mut f = File::create(path).map_err(|e| io_fail("create", path, e))?;
        let buf = vec![0u8; 4 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            f.write_all(&buf[..n])
                .map_err(|e| io_fail("write", path, e))?;
            left -= n as u64;
        }
        f.sync_all().map_err(|e| io_fail("fsync", path, e))?;
    }
    Ok(t.elapsed())
}

/// Raw sequential read (4 MiB reads into one reused buffer), like `dd bs=4M of=/dev/null`.
fn raw_read(path: &Path, use_dd: bool) -> Result<Duration, Fatal> {
    raw_read_dd(path, use_dd, false)
}

/// Resets the process's peak RSS (`VmHWM`) to its current RSS; false where the kernel
/// does not allow it.
fn hwm_reset() -> bool {
    fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`).
fn status_kib(key: &str) -> Option<u64> {
    let s = fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with(key) && l[key.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A read of `path` to /dev/null: `dd bs=4M` (with `iflag=direct` when `direct`), or an
/// in-process 4 MiB read loop without dd.
fn raw_read_dd(path: &Path, use_dd: bool, direct: bool) -> Result<Duration, Fatal> {
    let t = Instant::now();
    if use_dd {
        let st = Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["of=/dev/null", "bs=4M"])
            .args(direct.then_some("iflag=direct"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| io_fail("run dd for", path, e))?;
        if !st.success() {
            return Err(io_fail("dd failed reading", path, st));
        }
    } else {
        let mut f = File::open(path).map_err(|e| io_fail("open", path, e))?;
        let mut buf = vec![0u8; 4 << 20];
        while f.read(&mut buf).map_err(|e| io_fail("read", path, e))? > 0 {}
    }
    Ok(t.elapsed())
}

struct Progress(bool);
impl Progress {
    fn say(&self, s: &str) {
        if self.0 {
            eprint!("\rckpt bench: {s:<60}");
            let _ = std::io::stderr().flush();
        }
    }
    fn done(&self) {
        if self.0 {
            eprint!("\r{:<75}\r", "");
        }
    }
}

pub fn run(a: BenchArgs) -> Result<i32, Fatal> {
    // Measure standalone even when started under `ckpt run`.
    for k in ["CKPT_SOCKET", "CKPT_DIR", "CKPT_RESTORE"] {
        std::env::remove_var(k);
    }
    let work = a.dir.join(format!(".ckpt-bench.{}", std::process::id()));
    fs::create_dir_all(&work).map_err(|e| io_fail("create", &work, e))?;
    let res = match a.path {
        BenchPath::Rust => measure(&a, &work),
        BenchPath::File | BenchPath::Python | BenchPath::Torch | BenchPath::Saving => {
            measure_path(&a, &work)
        }
    };
    let _ = fs::remove_dir_all(&work);
    res
}

fn measure(a: &BenchArgs, work: &Path) -> Result<i32, Fatal> {
    use std::io::IsTerminal;
    let prog = Progress(
        std::io::stderr().is_terminal() || std::env::var_os("CKPT_BENCH_PROGRESS").is_some(),
    );
    let size = a.size - a.size % 4;
    let n = (size / 4) as usize;
    let use_dd = dd_available();
    let root = drop_caches();
    let gb = |d: Duration| size as f64 / d.as_secs_f64() / 1e9;

    prog.say("preparing the state");
    // A deterministic, incompressible state, touched (like a job's weights).
    let mut x: u32 = 0x9e37_79b9;
    let state: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f32::from_bits(x & 0xbfff_ffff)
        })
        .collect();
    let mut copy = vec![0f32; n];
    let mut restored = vec![0f32; n];

    let store = Store::new(work.join("ck"));
    store
        .create()
        .map_err(|e| io_fail("create", store.dir(), e))?;
    let raw = work.join("raw.bin");
    let src = work.join("src.bin");
    {
        // dd's source: the state's bytes, in the page cache and on disk before timing.
        let mut f = File::create(&src).map_err(|e| io_fail("create", &src, e))?;
        f.write_all(crate::pod::as_bytes(&state))
            .and_then(|_| f.sync_all())
            .map_err(|e| io_fail("write", &src, e))?;
    }
    let mut r_ddd: Vec<f64> = Vec::new();
    let (mut w_dd, mut w_ck, mut r_dd, mut r_ck, mut r_ck_fresh) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut w_direct = vec![];
    let (mut memcpy, mut stall, mut stall_first, mut async_total, mut commit) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut serde_save = vec![];
    // A resume under the full check (`--restore-check full`, `auto`'s first resume): the
    // supervisor's verify, then the job's read (`r_ck` is the one-read resume).
    let mut resume_full: Vec<f64> = vec![];
    let (mut peak_into, mut peak_fresh): (Vec<f64>, Vec<f64>) = (vec![], vec![]);
    let mut peak_save: Vec<f64> = vec![];
    let mut ck = crate::Checkpointer::open(work.join("async"))
        .map_err(|e| Fatal::io(format!("bench: {e}")))?;

    for round in 1..=a.runs {
        let tag = format!("round {round}/{}", a.runs);
        // Alternate the order so that neither side always runs first (the disk is bursty).
        if round % 2 == 1 {
            prog.say(&format!("{tag}: raw write+fsync"));
            w_dd.push(gb(raw_write(&raw, &src, size, use_dd, false)?));
            if use_dd {
                w_direct.push(gb(raw_write(&raw, &src, size, true, true)?));
            }
        }
        prog.say(&format!("{tag}: ckpt save"));
        // Peak memory above what the process held (the state is in it already).
        let rss0 = hwm_reset().then(|| status_kib("VmRSS")).flatten();
        let t = Instant::now();
        let mut stage = Stage::new(&store, Algo::Crc32c).map_err(|e| fail(&e))?;
        stage
            .write_f32s("weights.f32", &state)
            .map_err(|e| fail(&e))?;
        let m = stage
            .commit(Some(round as u64), "ckpt-bench", Default::default())
            .map_err(|e| fail(&e))?;
        w_ck.push(gb(t.elapsed()));
        if let (Some(b), Some(h)) = (rss0, status_kib("VmHWM")) {
            peak_save.push(h.saturating_sub(b) as f64 / 1024.0);
        }
        let cpath = store.path_of(m.seq);
        if round % 2 == 0 {
            prog.say(&format!("{tag}: raw write+fsync"));
            w_dd.push(gb(raw_write(&raw, &src, size, use_dd, false)?));
            if use_dd {
                w_direct.push(gb(raw_write(&raw, &src, size, true, true)?));
            }
        }

        // The read side alternates its order too (after a cache drop the VM may still be
        // handing the freed memory back to its host: whoever reads first pays for it).
        if round % 2 == 1 {
            prog.say(&format!("{tag}: raw read"));
            drop_caches();
            r_dd.push(gb(raw_read(&raw, use_dd)?));
            if use_dd {
                drop_caches();
                r_ddd.push(gb(raw_read_dd(&raw, true, true)?));
            }
        }
        prog.say(&format!("{tag}: ckpt restore"));
        drop_caches();
        let entry = m.files[0].clone();
        // A resume into the job's buffer: the supervisor's check (`Sizes` under
        // the light check, `Full` under the full one), then the job's verified read.
        let resume = |check, dest: &mut [f32]| -> Result<Duration, Fatal> {
            let t = Instant::now();
            crate::store::check_path(&cpath, Some(m.seq), check).map_err(|e| fail(&e))?;
            let mut f =
                File::open(cpath.join(&entry.name)).map_err(|e| io_fail("open", &cpath, e))?;
            crate::pod::read_verified(
                &mut f,
                &cpath,
                &entry,
                m.checksum,
                crate::pod::as_bytes_mut(dest),
            )
            .map_err(|e| fail(&e))?;
            Ok(t.elapsed())
        };
        // Peak memory above what the process held (the buffer is touched from round 2 on).
        let rss0 = hwm_reset().then(|| status_kib("VmRSS")).flatten();
        r_ck.push(gb(resume(crate::store::Check::Sizes, &mut restored)?));
        if let (Some(b), Some(h), true) = (rss0, status_kib("VmHWM"), round > 1) {
            peak_into.push(h.saturating_sub(b) as f64 / 1024.0);
        }
        if round == 1 && restored != state {
            return Err(fail(&"restored state differs from the saved state (a bug)"));
        }
        if round % 2 == 0 {
            prog.say(&format!("{tag}: raw read"));
            drop_caches();
            r_dd.push(gb(raw_read(&raw, use_dd)?));
            if use_dd {
                drop_caches();
                r_ddd.push(gb(raw_read_dd(&raw, true, true)?));
            }
        }
        drop_caches();
        let rss0 = hwm_reset().then(|| status_kib("VmRSS")).flatten();
        let t = Instant::now();
        let mut f = File::open(cpath.join(&entry.name)).map_err(|e| io_fail("open", &cpath, e))?;
        let mut fresh = vec![0f32; n];
        crate::pod::read_verified_fresh(
            &mut f,
            &cpath,
            &entry,
            m.checksum,
            crate::pod::as_bytes_mut(&mut fresh),
        )
        .map_err(|e| fail(&e))?;
        r_ck_fresh.push(gb(t.elapsed()));
        if let (Some(b), Some(h)) = (rss0, status_kib("VmHWM")) {
            // Above the restored state itself.
            peak_fresh.push((h.saturating_sub(b) as f64 - size as f64 / 1024.0) / 1024.0);
        }
        drop(fresh);

        prog.say(&format!("{tag}: resume with the full check first"));
        drop_caches();
        resume_full.push(gb(resume(crate::store::Check::Full, &mut restored)?));

        prog.say(&format!("{tag}: memcpy and async save"));
        let t = Instant::now();
        copy.copy_from_slice(&state);
        memcpy.push(t.elapsed().as_secs_f64());
        std::hint::black_box(&copy);
        // The async save: the stall is the call; the rest runs in the background.
        let t = Instant::now();
        ck.save_async_with(Some(round as u64), |s| s.put_pod("weights.f32", &state))
            .map_err(|e| fail(&e))?;
        let d = t.elapsed().as_secs_f64();
        if round == 1 {
            stall_first.push(d);
        } else {
            stall.push(d);
        }
        let saved = ck.wait().map_err(|e| fail(&e))?.expect("a pending save");
        async_total.push(saved.duration.as_secs_f64());

        prog.say(&format!("{tag}: small commits"));
        for i in 0..10 {
            let t = Instant::now();
            let mut stage = Stage::new(&store, Algo::Crc32c).map_err(|e| fail(&e))?;
            stage
                .write_file("step", &[i as u8; 4096])
                .map_err(|e| fail(&e))?;
            stage
                .commit(None, "ckpt-bench", Default::default())
                .map_err(|e| fail(&e))?;
            commit.push(t.elapsed().as_secs_f64() * 1e3);
        }
        // Keep the directory small between rounds.
        let _ = store.prune(1, None, &[]);
        let _ = Store::new(work.join("async")).prune(1, None, &[]);
        if round == 1 {
            prog.say(&format!("{tag}: serde (postcard) save, for comparison"));
            let t = Instant::now();
            let bytes = postcard::to_stdvec(&state).map_err(|e| fail(&e))?;
            let mut stage = Stage::new(&store, Algo::Crc32c).map_err(|e| fail(&e))?;
            stage
                .write_large("state.postcard", &bytes)
                .map_err(|e| fail(&e))?;
            stage
                .commit(None, "ckpt-bench", Default::default())
                .map_err(|e| fail(&e))?;
            serde_save.push(gb(t.elapsed()));
            let _ = store.prune(1, None, &[]);
        }
    }
    prog.done();
    let _ = fs::remove_file(&raw);
    let _ = fs::remove_file(&src);

    // Per-round ratios (each side measured minutes apart at most): their median is steadier
    // than the ratio of the medians on a noisy disk.
    let per_round = |a: &[f64], b: &[f64]| -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x / y * 1000.0).round() / 1000.0)
            .collect()
    };
    let (w_rounds, r_rounds, f_rounds) = (
        per_round(&w_ck, &w_dd),
        per_round(&r_ck, &r_dd),
        per_round(&r_ck_fresh, &r_dd),
    );
    let full_rounds = per_round(&resume_full, &r_dd);
    let full_direct_rounds = per_round(&resume_full, &r_ddd);
    let resume_full = median(&mut resume_full);
    let med_of = |v: &[f64]| median(&mut v.to_vec());
    let wd_rounds = per_round(&w_ck, &w_direct);
    let w_dd = median(&mut w_dd);
    let w_direct = (!w_direct.is_empty()).then(|| median(&mut w_direct));
    let w_ck = median(&mut w_ck);
    let rd_rounds = per_round(&r_ck, &r_ddd);
    let fd_rounds = per_round(&r_ck_fresh, &r_ddd);
    let r_ddd = (!r_ddd.is_empty()).then(|| median(&mut r_ddd));
    let r_dd = median(&mut r_dd);
    let r_ck = median(&mut r_ck);
    let r_ck_fresh = median(&mut r_ck_fresh);
    let memcpy = median(&mut memcpy);
    let stall_first = median(&mut stall_first);
    let stall = if stall.is_empty() {
        stall_first
    } else {
        median(&mut stall)
    };
    let async_total = median(&mut async_total);
    let commit = median(&mut commit);
    let serde_save = median(&mut serde_save);
    let save_s = size as f64 / (w_ck * 1e9);
    let mtbf = a.mtbf.unwrap_or(DEFAULT_MTBF);
    let rec_sync = auto_interval(Duration::from_secs_f64(save_s), mtbf);
    let rec_async = auto_choice(
        Duration::from_secs_f64(async_total),
        Some(Duration::from_secs_f64(stall)),
        mtbf,
    );
    let out = json!({
        "size_bytes": size,
        "runs": a.runs,
        "baseline": if use_dd { "dd bs=4M conv=fsync (if=a random file in the page cache), the same with oflag=direct; dd bs=4M of=/dev/null" } else { "in-process 4 MiB writes + fsync; 4 MiB reads (dd not found)" },
        "cold_reads": root,
        "page_reporting_settled": root && Path::new(REPORTED_KIB).exists(),
        "write_gbps": { "raw": w_dd, "ckpt_save": w_ck, "ratio": w_ck / w_dd, "raw_direct": w_direct, "ratio_direct": w_direct.map(|d| w_ck / d), "serde_postcard_save": serde_save, "ratio_per_round": w_rounds, "ratio_median_per_round": med_of(&w_rounds), "ratio_direct_per_round": wd_rounds, "ratio_direct_median_per_round": (!wd_rounds.is_empty()).then(|| med_of(&wd_rounds)) },
        "read_gbps": { "raw": r_dd, "ckpt_restore_into": r_ck, "ratio": r_ck / r_dd, "ckpt_restore_fresh_alloc": r_ck_fresh, "ratio_per_round": r_rounds, "ratio_median_per_round": med_of(&r_rounds), "fresh_ratio_per_round": f_rounds, "fresh_ratio_median_per_round": med_of(&f_rounds), "raw_iflag_direct": r_ddd, "ratio_direct_per_round": rd_rounds, "ratio_direct_median_per_round": (!rd_rounds.is_empty()).then(|| med_of(&rd_rounds)), "fresh_ratio_direct_per_round": fd_rounds, "fresh_ratio_direct_median_per_round": (!fd_rounds.is_empty()).then(|| med_of(&fd_rounds)) },
        "resume_gbps": { "client_check": r_ck, "full_check": resume_full, "full_check_ratio_per_round": full_rounds, "full_check_ratio_median_per_round": med_of(&full_rounds), "full_check_ratio_direct_per_round": full_direct_rounds, "full_check_ratio_direct_median_per_round": (!full_direct_rounds.is_empty()).then(|| med_of(&full_direct_rounds)), "note": "client_check is the restore above (ckpt run --restore-check client, and every resume under the default auto once the job's client has vouched for one: manifest and sizes, then the job's verified read); full_check adds the supervisor's full verify before the read (--restore-check full, and the first resume under auto)" },
        "save_peak_extra_mib": peak_save.iter().copied().reduce(f64::max),
        "restore_peak_extra_mib": { "into": peak_into.iter().copied().reduce(f64::max), "fresh_above_state": peak_fresh.iter().copied().reduce(f64::max) },
        "async_save": { "memcpy_s": memcpy, "stall_s": stall, "stall_first_s": stall_first, "ratio": stall / memcpy, "total_s": async_total },
        "commit_ms_median": commit,
        "overhead_at_60s": { "sync_save": save_s / 60.0, "async_save": stall / 60.0 },
        "mtbf_s": mtbf.as_secs_f64(),
        "recommended_every_s": { "sync": rec_sync.as_secs_f64(), "async": rec_async.every.as_secs_f64() },
    });
    if a.json {
        println!("{out:#}");
        return Ok(0);
    }
    let rd = if root && Path::new(REPORTED_KIB).exists() {
        "cold, settled"
    } else if root {
        "cold"
    } else {
        "WARM (not root: page cache not dropped)"
    };
    let base = if use_dd { "dd" } else { "raw" };
    println!(
        "ckpt bench: {} state in {}, median of {} round(s)",
        fmt_bytes(size),
        a.dir.display(),
        a.runs
    );
    println!("  write+fsync  {base:<4} {w_dd:>6.2} GB/s   ckpt save    {w_ck:>6.2} GB/s   ratio {:.2}  (serde/postcard save: {serde_save:.2} GB/s)", w_ck / w_dd);
    if let Some(d) = w_direct {
        println!("  write+fsync  dd oflag=direct {d:>6.2} GB/s   ratio {:.2}, median per round {:.2}  (the stricter baseline: past the page cache, like ckpt's bulk writes)", w_ck / d, med_of(&wd_rounds));
    }
    println!("  read ({rd}) {base} {r_dd:>6.2} GB/s   ckpt restore {r_ck:>6.2} GB/s   ratio {:.2}  (into a fresh allocation: {r_ck_fresh:.2} GB/s)", r_ck / r_dd);
    if let Some(d) = r_ddd {
        println!("  read ({rd}) dd iflag=direct {d:>6.2} GB/s   per-round ratios (median): restore {:.2}, fresh restore {:.2}", med_of(&rd_rounds), med_of(&fd_rounds));
    }
    println!(
        "  resume       one read (client; auto once vouched) {r_ck:>6.2} GB/s (the restore above)   full (verify, then read: auto's first resume) {resume_full:>6.2} GB/s   per-round ratio to the cold read: {:.2}{}",
        med_of(&full_rounds),
        if full_direct_rounds.is_empty() {
            String::new()
        } else {
            format!(", to dd iflag=direct {:.2}", med_of(&full_direct_rounds))
        }
    );
    if let (Some(i), Some(f)) = (
        peak_into.iter().copied().reduce(f64::max),
        peak_fresh.iter().copied().reduce(f64::max),
    ) {
        println!("  peak extra memory of a restore: {i:.0} MiB into the job's buffer, {f:.0} MiB above the state into a fresh one");
    }
    if let Some(p) = peak_save.iter().copied().reduce(f64::max) {
        println!("  peak extra memory of a save: {p:.0} MiB above the state (VmHWM)");
    }
    println!(
        "  per-round ratios (median): save {:.2}, restore {:.2}, fresh restore {:.2}",
        med_of(&w_rounds),
        med_of(&r_rounds),
        med_of(&f_rounds)
    );
    println!(
        "  async save   memcpy {}   stall {}   ratio {:.2}   (first save, fresh buffers: {}; in background: {})",
        fmt_secs(memcpy),
        fmt_secs(stall),
        stall / memcpy,
        fmt_secs(stall_first),
        fmt_secs(async_total)
    );
    println!("  small commit {commit:.2} ms (median; 4 KiB file, fsyncs, rename, dir fsync)");
    println!(
        "  overhead at --every 60s: {:.2}% with save, {:.3}% with save_async",
        100.0 * save_s / 60.0,
        100.0 * stall / 60.0
    );
    println!(
        "  recommended --every (Young/Daly sqrt(2 x C x MTBF), MTBF {}{}): {} for synchronous saves (C = {}), {} for save_async (C = {}{})",
        fmt_dur(mtbf),
        if a.mtbf.is_none() { ", default; set --mtbf" } else { "" },
        fmt_dur(rec_sync),
        fmt_secs(save_s),
        fmt_dur(rec_async.every),
        fmt_secs(rec_async.cost.as_secs_f64()),
        match rec_async.floor {
            Some(f) if rec_async.every == f => format!("; sqrt gives {}, raised to {ASYNC_HEADROOM} x the background save", fmt_dur(rec_async.young_daly)),
            _ if rec_async.every != rec_async.young_daly => format!("; unclamped {}", fmt_dur(rec_async.young_daly)),
            _ => String::new(),
        },
    );
    Ok(0)
}

fn fmt_secs(s: f64) -> String {
    if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn fail(e: &dyn std::fmt::Display) -> Fatal {
    Fatal::io(format!("bench: {e}"))
}

/// The child of `ckpt bench --path python`: holds one numpy array (the bytes of `argv[2]`),
/// and on each command from stdin runs one timed operation, answering one JSON line. The
/// parent drops the page cache between commands, so that every read is cold.
const PY_CHILD: &str = r#"
import json, os, sys, time
import numpy as np
import ckpt
d, src, scratch, kind = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
w = np.fromfile(src, dtype="<f4")
state = {"weights": w}
ck = ckpt.Checkpointer(d)  # the parent prunes, untimed (under ckpt run the supervisor does)
if kind == "torch":
    import torch
    import ckpt.torch as ckt
    w = torch.from_numpy(w)
    class Holder:
        def __init__(self, sd):
            self.sd = sd
        def state_dict(self):
            return self.sd
        def load_state_dict(self, sd):
            self.sd = sd
    ts = ckt.TrainState(models={"model": Holder({"weights": w})})
    # The way a training job restores: into a model that exists (its parameter touched).
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = torch.nn.Parameter(torch.ones(w.shape, dtype=w.dtype))
    existing = Model()
    ts_existing = ckt.TrainState(models={"model": existing})
def kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
def hwm_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
reader = None
h = None
print(json.dumps({"ready": True, "numpy": np.__version__, "checksum": ck.checksum,
                  "direct_io": os.environ.get("CKPT_DIRECT_IO", "1")}), flush=True)
for line in sys.stdin:
    cmd = line.strip()
    out = {}
    if cmd == "save":
        ok = hwm_reset()
        before = kib("VmRSS")
        t = time.perf_counter()
        if kind == "torch":
            ts.save(ck)
        else:
            ck.save(state)
        out["s"] = time.perf_counter() - t
        if ok:
            out["peak_extra_mib"] = (kib("VmHWM") - before) / 1024
    elif cmd in ("saving-direct", "saving-plain"):
        ok = hwm_reset()
        before = kib("VmRSS")
        t = time.perf_counter()
        with ck.saving() as sd:
            if cmd == "saving-direct":
                with ck.direct_file("weights.npy") as f:
                    np.save(f, w)
            else:
                np.save(sd / "weights.npy", w)
        out["s"] = time.perf_counter() - t
        if ok:
            out["peak_extra_mib"] = (kib("VmHWM") - before) / 1024
    elif cmd in ("npload", "npload-check"):
        # What the job does after the supervisor verified the checkpoint: np.load of the file.
        h = None
        newest = ckpt.Store(d).list()[-1][1]
        t = time.perf_counter()
        got = np.load(os.path.join(newest, "weights.npy"))
        out["s"] = time.perf_counter() - t
        if cmd == "npload-check":
            out["same"] = bool(got.dtype == w.dtype and np.array_equal(got, w))
        del got
    elif cmd in ("ckload", "ckload-check"):
        # The job's resume through the client: ck.load_array of the file (one verified read).
        h = None
        t = time.perf_counter()
        got = reader.load_array("weights.npy")
        out["s"] = time.perf_counter() - t
        if cmd == "ckload-check":
            out["same"] = bool(got.dtype == w.dtype and np.array_equal(got, w))
        del got
        reader.close()
        reader = None
    elif cmd == "npsave":
        try:
            os.unlink(scratch)
        except FileNotFoundError:
            pass
        t = time.perf_counter()
        with open(scratch, "wb") as f:
            if kind == "torch":
                torch.save({"weights": w}, f)
            else:
                np.save(f, w)
            f.flush()
            os.fsync(f.fileno())
        out["s"] = time.perf_counter() - t
    elif cmd == "open":
        reader = ckpt.Checkpointer(d)
    elif cmd in ("restore-existing", "restore-existing-check"):
        ok = hwm_reset()
        before = kib("VmRSS")
        t = time.perf_counter()
        ts_existing.restore(reader)
        out["s"] = time.perf_counter() - t
        if ok:
            # Above the process before the restore, which held the model's tensor already.
            out["peak_extra_mib"] = (kib("VmHWM") - before) / 1024
        if cmd == "restore-existing-check":
            out["same"] = bool(existing.weights.dtype == w.dtype and torch.equal(existing.weights.detach(), w))
        reader.close()
        reader = None
    elif cmd in ("restore", "restore-check"):
        h = None  # the state the last restore made is freed before the clock starts
        ok = hwm_reset()
        before = kib("VmRSS")
        t = time.perf_counter()
        if kind == "torch":
            h = Holder(None)
            ckt.TrainState(models={"model": h}).restore(reader)
            got = h.sd
        else:
            got = reader.restore()
        out["s"] = time.perf_counter() - t
        if ok:
            # Above the restored state itself (the array, or the state dict's tensor).
            nbytes = got["weights"].nbytes if kind != "torch" else got["weights"].numel() * got["weights"].element_size()
            out["peak_extra_mib"] = (kib("VmHWM") - before) / 1024 - nbytes / 2**20
        if cmd == "restore-check":
            if kind == "torch":
                out["same"] = bool(got["weights"].dtype == w.dtype and torch.equal(got["weights"], w))
            else:
                out["same"] = bool(got["weights"].dtype == w.dtype and np.array_equal(got["weights"], w))
        del got
        reader.close()
        reader = None
    elif cmd == "quit":
        break
    print(json.dumps(out), flush=True)
"#;

/// The `python` child: its stdin and stdout.
struct PyChild {
    child: std::process::Child,
    out: std::io::BufReader<std::process::ChildStdout>,
}

impl PyChild {
    fn ask(&mut self, cmd: &str) -> Result<serde_json::Value, Fatal> {
        let stdin = self.child.stdin.as_mut().expect("piped");
        writeln!(stdin, "{cmd}").map_err(|e| fail(&format!("python child: {e}")))?;
        self.answer(cmd)
    }

    fn answer(&mut self, cmd: &str) -> Result<serde_json::Value, Fatal> {
        use std::io::BufRead;
        let mut line = String::new();
        self.out
            .read_line(&mut line)
            .map_err(|e| fail(&format!("python child: {e}")))?;
        serde_json::from_str(&line).map_err(|_| {
            fail(&format!(
                "python child failed on {cmd:?} (its error is above){}",
                if line.is_empty() {
                    ""
                } else {
                    ": unexpected output"
                }
            ))
        })
    }
}

/// Starts the Python child of `--path python`. The ckpt package comes from the environment,
/// else from this source tree (`<repo>/python/src` when ckpt runs from `<repo>/target/*/`).
fn spawn_python(a: &BenchArgs, store: &Path, src: &Path, scratch: &Path) -> Result<PyChild, Fatal> {
    let mut cmd = Command::new(&a.python);
    cmd.arg("-c")
        .arg(PY_CHILD)
        .arg(store)
        .arg(src)
        .arg(scratch)
        .arg(if a.path == BenchPath::Torch {
            "torch"
        } else {
            "numpy"
        })
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let importable = Command::new(&a.python)
        .args(["-c", "import ckpt, numpy"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        let tree = std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.parent()?.parent()?.join("python/src")))
            .filter(|p| p.join("ckpt/__init__.py").is_file());
        if let Some(tree) = tree {
            let mut pp = std::ffi::OsString::from(tree.as_os_str());
            if let Some(old) = std::env::var_os("PYTHONPATH") {
                pp.push(":");
                pp.push(old);
            }
            cmd.env("PYTHONPATH", pp);
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(&format!("cannot run {}: {e}", a.python.display())))?;
    let out = std::io::BufReader::new(child.stdout.take().expect("piped"));
    let mut c = PyChild { child, out };
    let hello = c.answer("start").map_err(|_| {
        fail(&format!(
            "{} could not start the benchmark (needs numpy{} and the ckpt package: pip install numpy, and python/ of ckpt's source on PYTHONPATH)",
            a.python.display(),
            if a.path == BenchPath::Torch { ", torch" } else { "" }
        ))
    });
    if hello?.get("ready").is_none() {
        return Err(fail(&"python child: no greeting"));
    }
    Ok(c)
}

fn loadavg() -> Option<f64> {
    fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Median, min and max of per-round ratios, rounded.
fn spread(v: &[f64]) -> serde_json::Value {
    let mut s = v.to_vec();
    let med = median(&mut s);
    json!({
        "median": (med * 1000.0).round() / 1000.0,
        "min": s.first().copied(),
        "max": s.last().copied(),
        "per_round": v,
    })
}

/// Runs `ckpt verify --dir DIR` (what the supervisor does before a resume); its peak RSS in MiB.
fn verify_cmd(exe: &Path, dir: &Path) -> Result<Option<f64>, Fatal> {
    ckpt_cmd(
        exe,
        &["verify".as_ref(), "--dir".as_ref(), dir.as_os_str()],
        "verify",
    )
}

/// Runs this ckpt with `args` (no control socket inherited); its stderr in the error. Returns
/// the command's peak RSS in MiB (`ru_maxrss` of its `wait4`: its whole memory, as the
/// command holds no state of the job's), `None` where the kernel does not say.
fn ckpt_cmd(exe: &Path, args: &[&std::ffi::OsStr], what: &str) -> Result<Option<f64>, Fatal> {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::null())
        .env_remove("CKPT_SOCKET")
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| fail(&e))?;
    let mut err = Vec::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_end(&mut err);
    }
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 writes into the two locals it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = loop {
        // SAFETY: pid is our own unwaited child; the pointers are to live locals.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break r;
    };
    if r != pid {
        return Err(fail(&format!(
            "ckpt {what}: waiting for it failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    // Reaped here: the std handle must not wait for it again.
    std::mem::forget(child);
    if !std::process::ExitStatus::from_raw(status).success() {
        return Err(fail(&format!(
            "ckpt {what} failed: {}",
            String::from_utf8_lossy(&err)
        )));
    }
    Ok((ru.ru_maxrss > 0).then(|| ru.ru_maxrss as f64 / 1024.0))
}

/// `ckpt bench --path file|python`: the save (and restore) of the path a job uses, against
/// `dd bs=4M oflag=direct` of the same bytes and a cold `dd` read, in interleaved rounds
/// (the order rotates every round; every read after a cache drop, settled).
fn measure_path(a: &BenchArgs, work: &Path) -> Result<i32, Fatal> {
    use std::io::IsTerminal;
    let prog = Progress(
        std::io::stderr().is_terminal() || std::env::var_os("CKPT_BENCH_PROGRESS").is_some(),
    );
    if !dd_available() {
        return Err(fail(
            &"--path file|python compares with dd oflag=direct: dd not found",
        ));
    }
    let size = a.size - a.size % 4;
    let root = drop_caches();
    let load_start = loadavg();
    let gb = |s: f64| size as f64 / s / 1e9;
    prog.say("preparing the state");
    let src = work.join("state.bin");
    {
        let mut x: u32 = 0x9e37_79b9;
        let mut f = File::create(&src).map_err(|e| io_fail("create", &src, e))?;
        let mut buf = vec![0u8; 4 << 20];
        let mut left = size as usize;
        while left > 0 {
            let n = left.min(buf.len());
            for c in buf[..n].chunks_exact_mut(4) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                c.copy_from_slice(&(x & 0xbfff_ffff).to_le_bytes());
            }
            f.write_all(&buf[..n])
                .map_err(|e| io_fail("write", &src, e))?;
            left -= n;
        }
        f.sync_all().map_err(|e| io_fail("fsync", &src, e))?;
    }
    let store_dir = work.join("ck");
    let raw = work.join("raw.bin");
    let scratch = work.join("own.npy");
    let exe = std::env::current_exe().map_err(|e| fail(&e))?;
    let mut py = match a.path {
        BenchPath::Python | BenchPath::Torch | BenchPath::Saving => {
            Some(spawn_python(a, &store_dir, &src, &scratch)?)
        }
        _ => None,
    };
    let (mut w_dd, mut w_ck, mut w_own, mut r_dd, mut r_ddd, mut r_ck) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut peak: Vec<f64> = vec![];
    // `--path saving`: `np.save` into a plain file of `ck.saving()`'s directory.
    let saving = a.path == BenchPath::Saving;
    let (mut w_plain, mut plain_peak): (Vec<f64>, Vec<f64>) = (vec![], vec![]);
    // `--path saving`: the job's own cold `np.load` of the file (its unprotected restore).
    let mut r_own: Vec<f64> = vec![];
    let mut r_peak: Vec<f64> = vec![];
    // `--path torch`: the restore into the model the job has (next to the fresh objects).
    let existing = a.path == BenchPath::Torch;
    let (mut r_ex, mut r_ex_peak): (Vec<f64>, Vec<f64>) = (vec![], vec![]);
    // `--path python|torch`: the resume under the full check (verify, then restore).
    let mut r_full: Vec<f64> = vec![];
    let mut r_ex_full: Vec<f64> = vec![];
    // `--path saving`: the resume through `ck.load_array` (one read; 8: after `ckpt verify`).
    let (mut r_load, mut r_load_full): (Vec<f64>, Vec<f64>) = (vec![], vec![]);
    let store = Store::new(&store_dir);
    for round in 1..=a.runs {
        let tag = format!("round {round}/{}", a.runs);
        // Writes, in an order rotated every round: dd, ckpt, (the job's own way).
        let mut order: Vec<u8> = if saving {
            vec![0, 1, 2, 3]
        } else if py.is_some() {
            vec![0, 1, 2]
        } else {
            vec![0, 1]
        };
        let k = order.len();
        order.rotate_left((round as usize - 1) % k);
        for which in order {
            // Every writer starts alike: its source in memory, the disk settled.
            raw_read(&src, false)?;
            // SAFETY: sync(2) has no preconditions.
            unsafe { libc::sync() };
            match which {
                0 => {
                    prog.say(&format!("{tag}: dd oflag=direct"));
                    w_dd.push(raw_write(&raw, &src, size, true, true)?.as_secs_f64());
                }
                1 => {
                    prog.say(&format!("{tag}: ckpt save"));
                    let s = match &mut py {
                        Some(c) => {
                            let v = c.ask(if saving { "saving-direct" } else { "save" })?;
                            if let Some(p) = v["peak_extra_mib"].as_f64() {
                                peak.push(p);
                            }
                            let _ = store.prune(1, None, &[]);
                            v["s"].as_f64().unwrap_or(f64::NAN)
                        }
                        None => {
                            let t = Instant::now();
                            let rss = ckpt_cmd(
                                &exe,
                                &[
                                    "save".as_ref(),
                                    "--dir".as_ref(),
                                    store_dir.as_os_str(),
                                    src.as_os_str(),
                                ],
                                "save",
                            )?;
                            let d = t.elapsed().as_secs_f64();
                            peak.extend(rss);
                            let _ = store.prune(1, None, &[]);
                            d
                        }
                    };
                    w_ck.push(s);
                }
                3 => {
                    prog.say(&format!("{tag}: ck.saving() + np.save into a plain file"));
                    let c = py.as_mut().expect("python");
                    let v = c.ask("saving-plain")?;
                    if let Some(p) = v["peak_extra_mib"].as_f64() {
                        plain_peak.push(p);
                    }
                    let _ = store.prune(1, None, &[]);
                    w_plain.push(v["s"].as_f64().unwrap_or(f64::NAN));
                }
                _ => {
                    prog.say(&format!("{tag}: the job's own save + fsync"));
                    let c = py.as_mut().expect("python");
                    w_own.push(c.ask("npsave")?["s"].as_f64().unwrap_or(f64::NAN));
                    let _ = fs::remove_file(&scratch);
                }
            }
        }
        // Reads, cold and settled, the order rotated every round: dd, dd iflag=direct, ckpt
        // (and, for torch, ckpt into the existing model).
        // 5: a resume under the full check (the supervisor's `ckpt verify`, then the client's
        // read): the restore of 2 is the one-read resume (light check); 6: the
        // same into the existing model (3 is its one-read resume).
        let mut reads: Vec<u8> = if existing {
            vec![0, 1, 2, 3, 5, 6]
        } else if saving {
            vec![0, 1, 2, 4, 7, 8]
        } else if py.is_some() {
            vec![0, 1, 2, 5]
        } else {
            vec![0, 1, 2]
        };
        let nr = reads.len();
        reads.rotate_left((round as usize - 1) % nr);
        for which in reads {
            if which == 5 || which == 6 {
                prog.say(&format!(
                    "{tag}: resume with the full check first{}",
                    if which == 6 {
                        ", into the existing model"
                    } else {
                        ""
                    }
                ));
                let c = py.as_mut().expect("python");
                c.ask("open")?;
                drop_caches();
                let t = Instant::now();
                verify_cmd(&exe, &store_dir)?;
                let verify_s = t.elapsed().as_secs_f64();
                let v = c.ask(if which == 6 {
                    "restore-existing"
                } else {
                    "restore"
                })?;
                let s = verify_s + v["s"].as_f64().unwrap_or(f64::NAN);
                if which == 6 {
                    r_ex_full.push(s);
                } else {
                    r_full.push(s);
                }
                continue;
            }
            if which == 7 || which == 8 {
                prog.say(&format!(
                    "{tag}: ck.load_array{}",
                    if which == 8 { " after ckpt verify" } else { "" }
                ));
                let c = py.as_mut().expect("python");
                c.ask("open")?;
                drop_caches();
                let t = Instant::now();
                if which == 8 {
                    verify_cmd(&exe, &store_dir)?;
                }
                let verify_s = t.elapsed().as_secs_f64();
                let v = c.ask(if round == 1 { "ckload-check" } else { "ckload" })?;
                if round == 1 && v["same"].as_bool() != Some(true) {
                    return Err(fail(
                        &"the array ck.load_array read differs from the saved one (a bug)",
                    ));
                }
                let s = verify_s + v["s"].as_f64().unwrap_or(f64::NAN);
                if which == 8 {
                    r_load_full.push(s);
                } else {
                    r_load.push(s);
                }
                continue;
            }
            if which == 4 {
                prog.say(&format!("{tag}: the job's own cold np.load"));
                let c = py.as_mut().expect("python");
                drop_caches();
                r_own.push(c.ask("npload")?["s"].as_f64().unwrap_or(f64::NAN));
                continue;
            }
            if which == 3 {
                prog.say(&format!("{tag}: ckpt restore into the existing model"));
                let c = py.as_mut().expect("python");
                c.ask("open")?;
                drop_caches();
                let v = c.ask(if round == 1 {
                    "restore-existing-check"
                } else {
                    "restore-existing"
                })?;
                if let Some(p) = v["peak_extra_mib"].as_f64() {
                    r_ex_peak.push(p);
                }
                if round == 1 && v["same"].as_bool() != Some(true) {
                    return Err(fail(
                        &"the model restored in place differs from the saved state (a bug)",
                    ));
                }
                r_ex.push(v["s"].as_f64().unwrap_or(f64::NAN));
                continue;
            }
            if which < 2 {
                prog.say(&format!(
                    "{tag}: dd read{}",
                    if which == 1 { " iflag=direct" } else { "" }
                ));
                drop_caches();
                let t = raw_read_dd(&raw, true, which == 1)?.as_secs_f64();
                if which == 1 {
                    r_ddd.push(t);
                } else {
                    r_dd.push(t);
                }
                continue;
            }
            prog.say(&format!("{tag}: ckpt restore"));
            let s = match &mut py {
                Some(c) if saving => {
                    drop_caches();
                    let t = Instant::now();
                    verify_cmd(&exe, &store_dir)?;
                    let v = c.ask(if round == 1 { "npload-check" } else { "npload" })?;
                    if round == 1 && v["same"].as_bool() != Some(true) {
                        return Err(fail(&"the loaded array differs from the saved one (a bug)"));
                    }
                    t.elapsed().as_secs_f64()
                }
                Some(c) => {
                    c.ask("open")?;
                    drop_caches();
                    let v = c.ask(if round == 1 {
                        "restore-check"
                    } else {
                        "restore"
                    })?;
                    if let Some(p) = v["peak_extra_mib"].as_f64() {
                        r_peak.push(p);
                    }
                    if round == 1 && v["same"].as_bool() != Some(true) {
                        return Err(fail(
                            &"the restored array differs from the saved one (a bug)",
                        ));
                    }
                    v["s"].as_f64().unwrap_or(f64::NAN)
                }
                None => {
                    drop_caches();
                    let t = Instant::now();
                    let rss = verify_cmd(&exe, &store_dir)?;
                    let d = t.elapsed().as_secs_f64();
                    r_peak.extend(rss);
                    d
                }
            };
            r_ck.push(s);
        }
    }
    if let Some(mut c) = py.take() {
        let _ = c.ask("quit");
        let _ = c.child.wait();
    }
    prog.done();
    let load_end = loadavg();
    // Ratios of speeds (baseline time / ckpt time), per round.
    let ratio = |base: &[f64], ck: &[f64]| -> Vec<f64> {
        base.iter()
            .zip(ck)
            .map(|(b, c)| (b / c * 1000.0).round() / 1000.0)
            .collect()
    };
    let w_ratio = ratio(&w_dd, &w_ck);
    let r_ratio = ratio(&r_dd, &r_ck);
    let rd_ratio = ratio(&r_ddd, &r_ck);
    let own_ratio = ratio(&w_own, &w_ck);
    let ex_ratio = ratio(&r_dd, &r_ex);
    let plain_ratio = ratio(&w_dd, &w_plain);
    let plain_own_ratio = ratio(&w_own, &w_plain);
    let r_own_ratio = ratio(&r_own, &r_ck);
    let exd_ratio = ratio(&r_ddd, &r_ex);
    let full_ratio = ratio(&r_dd, &r_full);
    let fulld_ratio = ratio(&r_ddd, &r_full);
    let ex_full_ratio = ratio(&r_dd, &r_ex_full);
    let ex_fulld_ratio = ratio(&r_ddd, &r_ex_full);
    let (load_ratio, loadd_ratio, load_own_ratio) = (
        ratio(&r_dd, &r_load),
        ratio(&r_ddd, &r_load),
        ratio(&r_own, &r_load),
    );
    let (loadf_ratio, loadfd_ratio, loadf_own_ratio) = (
        ratio(&r_dd, &r_load_full),
        ratio(&r_ddd, &r_load_full),
        ratio(&r_own, &r_load_full),
    );
    let speeds = |v: &[f64]| -> serde_json::Value {
        let mut g: Vec<f64> = v
            .iter()
            .map(|&s| (gb(s) * 1000.0).round() / 1000.0)
            .collect();
        let per = g.clone();
        let med = median(&mut g);
        json!({ "median": med, "min": g.first(), "max": g.last(), "per_round": per })
    };
    let save_s = median(&mut w_ck.clone());
    let mtbf = a.mtbf.unwrap_or(DEFAULT_MTBF);
    let rec = auto_interval(Duration::from_secs_f64(save_s), mtbf);
    let name = match a.path {
        BenchPath::File => "file",
        BenchPath::Torch => "torch",
        BenchPath::Saving => "saving",
        _ => "python",
    };
    let out = json!({
        "path": name,
        "size_bytes": size,
        "runs": a.runs,
        "cold_reads": root,
        "page_reporting_settled": root && Path::new(REPORTED_KIB).exists(),
        "loadavg": [load_start, load_end],
        "ckpt_save": match a.path { BenchPath::File => "ckpt save FILE (the command, a file in the page cache)", BenchPath::Torch => "ckpt.torch.TrainState.save of {'weights': f32 tensor} (torch.save into ck.direct_file) in a python child", BenchPath::Saving => "with ck.saving(): np.save(ck.direct_file('weights.npy'), w) in a python3 child; saving_plain: np.save(d / 'weights.npy', w) into the saving() directory", _ => "Checkpointer.save({'weights': numpy f32 array}) in a python3 child" },
        "ckpt_restore": match a.path { BenchPath::File => "ckpt verify (what a resume reads: every byte checksummed)", BenchPath::Saving => "ckpt verify (the supervisor, before a resume), then np.load of the file in the python child (the job)", BenchPath::Torch => "TrainState.restore into fresh objects (the whole file read into memory of its own past the page cache and verified, torch's tensors views of it), cold; restore_existing: into a model that has its tensor", _ => "Checkpointer.restore() (verified), cold" },
        "write_gbps": { "dd_oflag_direct": speeds(&w_dd), "ckpt": speeds(&w_ck), "own_save_fsync": (!w_own.is_empty()).then(|| speeds(&w_own)) },
        "write_ratio_to_dd_direct": spread(&w_ratio),
        "write_ratio_to_own": (!own_ratio.is_empty()).then(|| spread(&own_ratio)),
        "read_gbps": { "dd_cold": speeds(&r_dd), "dd_iflag_direct_cold": speeds(&r_ddd), "ckpt": speeds(&r_ck) },
        "read_ratio_to_dd": spread(&r_ratio),
        "read_ratio_to_dd_direct": spread(&rd_ratio),
        "resume_full_check": (!r_full.is_empty()).then(|| json!({
            "what": "a resume under ckpt run --restore-check full (and the first one under the default auto): ckpt verify (the supervisor), then the restore above (the client reads again, from the page cache); the restore above alone is the one-read resume of --restore-check client and of auto once the job's client has vouched",
            "read_gbps": speeds(&r_full),
            "read_ratio_to_dd": spread(&full_ratio),
            "read_ratio_to_dd_direct": spread(&fulld_ratio),
        })),
        "restore_existing": existing.then(|| json!({
            "what": "TrainState.restore into a torch.nn.Module that has the parameter already (its memory touched), as a training job resumes: the file read once, past the page cache, each tensor's bytes copied into the model's as they arrive (run V; run K's copy after a verify in runs P-U, zero-copy in runs L-P); the fields above are the restore into fresh objects",
            "read_gbps": speeds(&r_ex),
            "read_ratio_to_dd": spread(&ex_ratio),
            "read_ratio_to_dd_direct": spread(&exd_ratio),
            "resume_full_check": (!r_ex_full.is_empty()).then(|| json!({
                "what": "the same under --restore-check full (auto's first resume): ckpt verify, then the restore into the model (from the page cache)",
                "read_gbps": speeds(&r_ex_full),
                "read_ratio_to_dd": spread(&ex_full_ratio),
                "read_ratio_to_dd_direct": spread(&ex_fulld_ratio),
            })),
            "peak_extra_mib": (!r_ex_peak.is_empty()).then(|| r_ex_peak.iter().copied().fold(f64::MIN, f64::max)),
        })),
        "load_array": saving.then(|| json!({
            "what": "the resume through the client: ck.load_array('weights.npy') of a Checkpointer opened before the cache drop (one verified read: --restore-check client, or auto once vouched); resume_full_check: ckpt verify first (full, or auto's first resume)",
            "read_gbps": speeds(&r_load),
            "read_ratio_to_dd": spread(&load_ratio),
            "read_ratio_to_dd_direct": spread(&loadd_ratio),
            "read_ratio_to_own": spread(&load_own_ratio),
            "resume_full_check": json!({
                "read_gbps": speeds(&r_load_full),
                "read_ratio_to_dd": spread(&loadf_ratio),
                "read_ratio_to_dd_direct": spread(&loadfd_ratio),
                "read_ratio_to_own": spread(&loadf_own_ratio),
            }),
        })),
        "saving_plain": saving.then(|| json!({
            "what": "with ck.saving() as d: np.save(d / 'weights.npy', w): the file written through the page cache by numpy, then read back for its checksum and fsynced by ckpt",
            "write_gbps": speeds(&w_plain),
            "write_ratio_to_dd_direct": spread(&plain_ratio),
            "write_ratio_to_own": spread(&plain_own_ratio),
            "own_restore": "the job's own cold np.load of the same file (what it does without ckpt)",
            "own_restore_gbps": speeds(&r_own),
            "read_ratio_to_own": spread(&r_own_ratio),
            "peak_extra_mib": (!plain_peak.is_empty()).then(|| plain_peak.iter().copied().fold(0.0, f64::max)),
        })),
        "save_peak_extra_mib": (!peak.is_empty()).then(|| peak.iter().copied().fold(0.0, f64::max)),
        "restore_peak_extra_mib": (!r_peak.is_empty()).then(|| r_peak.iter().copied().fold(f64::MIN, f64::max)),
        "mtbf_s": mtbf.as_secs_f64(),
        "save_s_median": save_s,
        "recommended_every_s": rec.as_secs_f64(),
    });
    if a.json {
        println!("{out:#}");
        return Ok(0);
    }
    let med = |v: &[f64]| median(&mut v.to_vec());
    let mm = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        (s[0], s[s.len() - 1])
    };
    println!(
        "ckpt bench --path {name}: {} in {}, {} round(s), order rotated, reads {}",
        fmt_bytes(size),
        a.dir.display(),
        a.runs,
        if root { "cold" } else { "WARM (not root)" }
    );
    let gbs = |v: &[f64]| -> Vec<f64> { v.iter().map(|&s| gb(s)).collect() };
    let (lo, hi) = mm(&gbs(&w_dd));
    println!("  save     dd oflag=direct {:>6.2} GB/s ({lo:.2}-{hi:.2})   ckpt {:>6.2} GB/s   ratio {:.2} (per round {:.2}-{:.2})", med(&gbs(&w_dd)), med(&gbs(&w_ck)), med(&w_ratio), mm(&w_ratio).0, mm(&w_ratio).1);
    if !w_plain.is_empty() {
        println!("  save     ck.saving() + np.save into a plain file {:>6.2} GB/s   / dd oflag=direct {:.2} (per round {:.2}-{:.2})   / own {:.2} (per round {:.2}-{:.2})", med(&gbs(&w_plain)), med(&plain_ratio), mm(&plain_ratio).0, mm(&plain_ratio).1, med(&plain_own_ratio), mm(&plain_own_ratio).0, mm(&plain_own_ratio).1);
    }
    if !w_own.is_empty() {
        println!("  save     the job's own {} + fsync {:>6.2} GB/s   ckpt / own {:.2} (per round {:.2}-{:.2})", if a.path == BenchPath::Torch { "torch.save" } else { "np.save" }, med(&gbs(&w_own)), med(&own_ratio), mm(&own_ratio).0, mm(&own_ratio).1);
    }
    let (lo, hi) = mm(&gbs(&r_dd));
    println!("  restore  dd read {:>6.2} GB/s ({lo:.2}-{hi:.2})   ckpt {:>6.2} GB/s   ratio {:.2} (per round {:.2}-{:.2})", med(&gbs(&r_dd)), med(&gbs(&r_ck)), med(&r_ratio), mm(&r_ratio).0, mm(&r_ratio).1);
    let (lo, hi) = mm(&gbs(&r_ddd));
    println!("  restore  dd iflag=direct {:>6.2} GB/s ({lo:.2}-{hi:.2})   ratio {:.2} (per round {:.2}-{:.2})", med(&gbs(&r_ddd)), med(&rd_ratio), mm(&rd_ratio).0, mm(&rd_ratio).1);
    if !r_own.is_empty() {
        println!("  restore  the job's own cold np.load {:>6.2} GB/s   ckpt / own {:.2} (per round {:.2}-{:.2})", med(&gbs(&r_own)), med(&r_own_ratio), mm(&r_own_ratio).0, mm(&r_own_ratio).1);
    }
    if !r_load.is_empty() {
        println!("  restore  ck.load_array (one read) {:>6.2} GB/s   / dd {:.2} (per round {:.2}-{:.2})   / dd iflag=direct {:.2}   / own np.load {:.2}", med(&gbs(&r_load)), med(&load_ratio), mm(&load_ratio).0, mm(&load_ratio).1, med(&loadd_ratio), med(&load_own_ratio));
        println!("  resume   ckpt verify + ck.load_array {:>6.2} GB/s   / dd {:.2} (per round {:.2}-{:.2})   / own np.load {:.2}", med(&gbs(&r_load_full)), med(&loadf_ratio), mm(&loadf_ratio).0, mm(&loadf_ratio).1, med(&loadf_own_ratio));
    }
    if !r_full.is_empty() {
        println!("  resume   full check (ckpt verify, then the restore: auto's first resume) {:>6.2} GB/s   / dd {:.2} (per round {:.2}-{:.2})   / dd iflag=direct {:.2}; the restore above is the one-read resume (client, auto once vouched)", med(&gbs(&r_full)), med(&full_ratio), mm(&full_ratio).0, mm(&full_ratio).1, med(&fulld_ratio));
    }
    if !r_ex.is_empty() {
        println!("  restore  into the existing model: ckpt {:>6.2} GB/s   / dd {:.2} (per round {:.2}-{:.2})   / dd iflag=direct {:.2} (per round {:.2}-{:.2})", med(&gbs(&r_ex)), med(&ex_ratio), mm(&ex_ratio).0, mm(&ex_ratio).1, med(&exd_ratio), mm(&exd_ratio).0, mm(&exd_ratio).1);
        if !r_ex_full.is_empty() {
            println!("  resume   into the existing model, full check {:>6.2} GB/s   / dd {:.2} (per round {:.2}-{:.2})   / dd iflag=direct {:.2}", med(&gbs(&r_ex_full)), med(&ex_full_ratio), mm(&ex_full_ratio).0, mm(&ex_full_ratio).1, med(&ex_fulld_ratio));
        }
    }
    // `--path file`: the `ckpt save` and `ckpt verify` processes hold none of the job's
    // state, so their whole peak RSS is what they add.
    let how = if a.path == BenchPath::File {
        (
            "the whole peak RSS of `ckpt save`",
            "the whole peak RSS of `ckpt verify`",
        )
    } else {
        ("VmHWM above the state", "VmHWM above the restored state")
    };
    if !peak.is_empty() {
        println!(
            "  peak extra memory of a save: {:.0} MiB ({})",
            peak.iter().copied().fold(0.0, f64::max),
            how.0
        );
    }
    if !r_peak.is_empty() {
        println!(
            "  peak extra memory of a restore: {:.0} MiB ({})",
            r_peak.iter().copied().fold(f64::MIN, f64::max),
            how.1
        );
    }
    if !r_ex_peak.is_empty() {
        println!(
            "  peak extra memory of a restore into the existing model: {:.0} MiB (VmHWM above the process before it)",
            r_ex_peak.iter().copied().fold(f64::MIN, f64::max)
        );
    }
    println!(
        "  recommended --every (Young/Daly, MTBF {}{}): {} (C = {})",
        fmt_dur(mtbf),
        if a.mtbf.is_none() {
            ", default; set --mtbf"
        } else {
            ""
        },
        fmt_dur(rec),
        fmt_secs(save_s)
    );
    Ok(0)
}
