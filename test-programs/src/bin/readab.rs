//! A/B of ckpt's restore paths against cold `dd`, in one process, in random order per round
//! (`docs/benchmarks.md` run G):
//!
//!   readab --dir DIR [--mib 1024] [--rounds 8] [--settle-ms 0] [--seed N]
//!          [--variants into,into-direct,into-direct1,into-runj,into-nt1,fresh-cache,fresh-direct,fresh-runj,dd-direct,...]
//!
//! Saves one `--mib` MiB f32 array with ckpt, then each round drops the page cache (root)
//! before every read, waits `--settle-ms`, and reads the file with `dd bs=4M of=/dev/null`
//! and with each variant: `into`/`into-direct` = `read_pod_into` an existing buffer with
//! direct I/O off/on, `fresh-cache`/`fresh-direct` = `read_f32s` (a fresh allocation) with direct
//! I/O off/on (`pod::set_direct_io`); a `1` after `-direct` = one reader thread
//! (`pod::set_direct_readers(1)`; the default, and `2`, has two reads in flight); `-runj` = the
//! direct reader of run J (two readers, the caller's thread copying and then checksumming every
//! piece: `pod::set_direct_workers(1, false)`), `-nt1` = one copying thread with streaming
//! stores (`set_direct_workers(1, true)`), the others run M's default (two copying threads,
//! streaming stores); `dd-direct` = `dd bs=4M iflag=direct` (the disk alone). A restore into
//! the job's buffer is done once, untimed, before the first round (so that every timed one
//! writes into touched memory, as a job's restore into its existing arrays does). Prints each round's GB/s and ratio to that round's
//! dd, then the median ratio per variant as JSON. The order is drawn from `--seed` (printed).
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ckpt_test_programs::{arg, incompressible_f32s, num};

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn drop_caches(settle: Duration) {
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n")
        .expect("drop the page cache (needs root): /proc/sys/vm/drop_caches");
    std::thread::sleep(settle);
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let dir = std::path::PathBuf::from(arg("--dir").expect("--dir DIR"));
    let mib = num("--mib", 1024) as usize;
    let rounds = num("--rounds", 8) as usize;
    let settle = Duration::from_millis(num("--settle-ms", 0));
    let variants: Vec<String> = arg("--variants")
        .unwrap_or_else(|| "into,fresh-cache,fresh-direct".into())
        .split(',')
        .map(str::to_string)
        .collect();
    for v in &variants {
        assert!(
            [
                "into",
                "into-direct",
                "into-direct1",
                "into-direct2",
                "into-runj",
                "into-nt1",
                "fresh-cache",
                "fresh-runj",
                "fresh-direct",
                "fresh-direct1",
                "fresh-direct2",
                "dd-direct"
            ]
            .contains(&v.as_str()),
            "unknown variant {v}: into, into-direct[1|2], into-runj, into-nt1, fresh-cache, fresh-direct[1|2], fresh-runj, dd-direct"
        );
    }
    let seed = num(
        "--seed",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    eprintln!("readab: seed {seed} (--seed {seed} replays the order)");
    let mut rng = seed;
    let n = mib << 18;
    let state = incompressible_f32s(n);
    let mut ck = ckpt::Checkpointer::open(&dir).expect("open --dir");
    ck.save_with(Some(1), |st| st.write_f32s("w.f32", &state).map(|_| ()))
        .expect("save");
    drop(ck);
    let ck = ckpt::Checkpointer::open(&dir).expect("open --dir");
    let file = ck
        .restore_dir()
        .expect("the saved checkpoint")
        .join("w.f32");
    let mut dest = vec![0f32; n];
    ck.read_pod_into("w.f32", &mut dest).expect("restore"); // touches `dest`, untimed
    let gb = (n * 4) as f64 / 1e9;
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for r in 0..rounds {
        let mut order: Vec<usize> = (0..=variants.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, (splitmix64(&mut rng) % (i as u64 + 1)) as usize);
        }
        let mut speed = vec![0.0; variants.len() + 1];
        for &k in &order {
            drop_caches(settle);
            let t = Instant::now();
            if k == 0 {
                let ok = Command::new("dd")
                    .arg(format!("if={}", file.display()))
                    .args(["of=/dev/null", "bs=4M"])
                    .stderr(Stdio::null())
                    .status()
                    .expect("run dd")
                    .success();
                assert!(ok, "dd failed");
            } else {
                let v = variants[k - 1].as_str();
                ckpt::pod::set_direct_io(
                    v.contains("direct") || v.ends_with("-runj") || v.ends_with("-nt1"),
                );
                match v.rsplit('-').next() {
                    Some("runj") => ckpt::pod::set_direct_workers(1, false),
                    Some("nt1") => ckpt::pod::set_direct_workers(1, true),
                    _ => ckpt::pod::set_direct_workers(0, true),
                }
                // `...-direct1`: one reader thread; otherwise the default (two).
                ckpt::pod::set_direct_readers(if v.ends_with("direct1") { 1 } else { 2 });
                if v == "dd-direct" {
                    let ok = Command::new("dd")
                        .arg(format!("if={}", file.display()))
                        .args(["of=/dev/null", "bs=4M", "iflag=direct"])
                        .stderr(Stdio::null())
                        .status()
                        .expect("run dd")
                        .success();
                    assert!(ok, "dd failed");
                } else if v.starts_with("fresh") {
                    let w = ck.read_f32s("w.f32").expect("restore");
                    assert!(w == state, "restored state differs");
                } else {
                    ck.read_pod_into("w.f32", &mut dest).expect("restore");
                }
            }
            speed[k] = gb / t.elapsed().as_secs_f64();
        }
        let line: Vec<String> = variants
            .iter()
            .enumerate()
            .map(|(i, v)| {
                ratios[i].push(speed[i + 1] / speed[0]);
                format!(
                    "{v} {:.2} GB/s ({:.2})",
                    speed[i + 1],
                    speed[i + 1] / speed[0]
                )
            })
            .collect();
        eprintln!("round {r}: dd {:.2} GB/s | {}", speed[0], line.join(" | "));
    }
    assert!(dest == state, "restored state differs");
    // Also against `dd iflag=direct` of the same round (the disk alone), when it ran.
    let ddd = variants.iter().position(|v| v == "dd-direct");
    let to_direct: Vec<String> = match ddd {
        Some(j) => variants
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != j)
            .map(|(i, v)| {
                let r: Vec<f64> = (0..rounds).map(|k| ratios[i][k] / ratios[j][k]).collect();
                let (lo, hi) = r
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
                format!(
                    "\"{v}\":{{\"median\":{:.3},\"min\":{lo:.3},\"max\":{hi:.3}}}",
                    median(r.clone())
                )
            })
            .collect(),
        None => Vec::new(),
    };
    let med: Vec<String> = variants
        .iter()
        .zip(ratios)
        .map(|(v, r)| format!("\"{v}\":{:.3}", median(r)))
        .collect();
    println!(
        "{{\"bench\":\"readab\",\"mib\":{mib},\"rounds\":{rounds},\"settle_ms\":{},\"seed\":{seed},\"median_ratio_to_dd\":{{{}}},\"ratio_to_dd_direct\":{{{}}}}}",
        settle.as_millis(),
        med.join(","),
        to_direct.join(",")
    );
}
