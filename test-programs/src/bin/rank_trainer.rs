//! One rank of a deterministic multi-rank toy trainer: each rank trains its own slice (a
//! digest chain seeded by its rank); the job's result is the global digest of all ranks.
//! Saves its shard (`state.bin`, plus `--pad-kib` of data) when ckpt asks, at the step the
//! ranks agreed on; logs every restore (with the number of shards the checkpoint holds) and
//! every save under `--out`; writes `digest-<rank>` at the end.
//!
//! `rank_trainer --steps 400 --step-ms 2 --save-ms 20 --out DIR`
//! `rank_trainer --reference --world 4 --steps 400`: prints the uninterrupted global digest.
//!
//! `--barrier DIR`: a collective every step, as DDP's all-reduce: after its step's work, a rank
//! creates `DIR/<step>.<rank>` and waits until every rank's file for that step exists (so a
//! rank blocked at a safe point blocks the others inside the next step's barrier).
//!
//! `--readme step|none`: the README's single-process loop unchanged, `if ck.should_checkpoint()`
//! without a step (the ranks agree on the count of calls, `docs/multi-rank.md` "Which step"),
//! then a save with the step (`step`) or without one (`none`: the manifest records the count,
//! which equals the step here).
//!
//! `--step-scale K`: the step given to ckpt (`should_checkpoint_at`, the save) is `K` times the
//! loop's step, so it differs from the count of calls (`K` > 1); `state.bin` keeps the loop's.
use std::io::Write;
use std::time::Duration;

use ckpt_test_programs::{arg, num};

fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn start(rank: u64) -> u64 {
    mix(0xc0ffee ^ (rank << 32))
}

fn step_digest(d: u64, rank: u64, step: u64) -> u64 {
    mix(d ^ mix(step.wrapping_mul(31).wrapping_add(rank)))
}

/// The global digest of a job of `world` ranks from its per-rank digests (rank order).
fn global(ds: &[u64]) -> u64 {
    ds.iter().fold(0x5eed, |g, &d| mix(g ^ d))
}

fn log(out: &str, file: &str, line: &str) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(format!("{out}/{file}"))
        .expect("open log");
    f.write_all(format!("{line}\n").as_bytes()).expect("log");
}

/// The file-system barrier of `--barrier DIR` for `step` (see the module comment).
fn barrier(dir: &str, step: u64, rank: u64, world: u64) {
    std::fs::write(format!("{dir}/{step}.{rank}"), b"").expect("barrier file");
    if step > 2 {
        // Every rank left the barrier of `step - 2` (it reached `step - 1`'s).
        let _ = std::fs::remove_file(format!("{dir}/{}.{rank}", step - 2));
    }
    let t = std::time::Instant::now();
    for r in 0..world {
        while !std::path::Path::new(&format!("{dir}/{step}.{r}")).exists() {
            if t.elapsed() > Duration::from_secs(600) {
                eprintln!("rank_trainer: rank {rank}: barrier {step} timed out");
                std::process::exit(3);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn main() {
    let steps = num("--steps", 400);
    if arg("--reference").is_some() || std::env::args().any(|a| a == "--reference") {
        let world = num("--world", 4);
        let ds: Vec<u64> = (0..world)
            .map(|r| (1..=steps).fold(start(r), |d, s| step_digest(d, r, s)))
            .collect();
        println!("{:016x}", global(&ds));
        return;
    }
    if let Some(ds) = arg("--combine") {
        let ds: Vec<u64> = ds
            .split(',')
            .map(|h| u64::from_str_radix(h, 16).expect("hex"))
            .collect();
        println!("{:016x}", global(&ds));
        return;
    }
    let step_ms = num("--step-ms", 2);
    let save_ms = num("--save-ms", 0);
    let pad = num("--pad-kib", 0) as usize * 1024;
    let out = arg("--out").expect("--out DIR");
    let readme = arg("--readme");
    let bar = arg("--barrier");
    let scale = num("--step-scale", 1);
    let mut ck = match ckpt::Checkpointer::from_env() {
        Ok(ck) => ck,
        Err(e) => {
            eprintln!("rank_trainer: {e}");
            std::process::exit(2);
        }
    };
    let world = ck.world().expect("rank_trainer runs under a launcher");
    let rank = world.rank as u64;
    let (mut step, mut d) = (0u64, start(rank));
    if let Some(rp) = ck.restore_point() {
        let shards = rp
            .manifest
            .files
            .iter()
            .filter(|f| f.name.ends_with("/state.bin"))
            .count();
        log(
            &out,
            "restores.log",
            &format!(
                "rank {rank} seq {} step {} world {} shards {shards}",
                rp.seq,
                rp.manifest.step.unwrap_or(0),
                rp.manifest.world_size.unwrap_or(1)
            ),
        );
        let b = ck.read_file("state.bin").expect("read own shard");
        step = u64::from_le_bytes(b[0..8].try_into().unwrap());
        d = u64::from_le_bytes(b[8..16].try_into().unwrap());
        assert_eq!(
            u64::from_le_bytes(b[16..24].try_into().unwrap()),
            rank,
            "restored another rank's shard"
        );
        assert_eq!(
            Some(step * scale),
            rp.manifest.step,
            "shard step (x {scale}) != checkpoint step"
        );
    }
    while step < steps {
        step += 1;
        d = step_digest(d, rank, step);
        std::thread::sleep(Duration::from_millis(step_ms));
        if let Some(b) = &bar {
            barrier(b, step, rank, u64::from(world.size));
        }
        let asked = match readme.as_deref() {
            Some(_) => ck.should_checkpoint(),
            None => ck.should_checkpoint_at(step * scale),
        };
        if asked {
            let mut b = Vec::with_capacity(24);
            b.extend_from_slice(&step.to_le_bytes());
            b.extend_from_slice(&d.to_le_bytes());
            b.extend_from_slice(&rank.to_le_bytes());
            let label = match readme.as_deref() {
                Some("none") => None,
                _ => Some(step * scale),
            };
            let r = ck.save_with(label, |stage| {
                stage.write_file("state.bin", &b)?;
                if pad > 0 {
                    let v: Vec<u8> = (0..pad).map(|i| (i as u64 ^ d) as u8).collect();
                    stage.write_file("pad.bin", &v)?;
                }
                std::thread::sleep(Duration::from_millis(save_ms));
                Ok(())
            });
            match r {
                Ok(s) => log(
                    &out,
                    "saves.log",
                    &format!("rank {rank} step {step} seq {}", s.seq),
                ),
                Err(e) => eprintln!("rank_trainer: rank {rank}: save failed: {e}"),
            }
        }
        if ck.should_stop() {
            drop(ck);
            std::process::exit(0);
        }
    }
    drop(ck);
    let tmp = format!("{out}/.digest-{rank}.tmp");
    std::fs::write(&tmp, format!("{d:016x}")).unwrap();
    std::fs::rename(&tmp, format!("{out}/digest-{rank}")).unwrap();
}
