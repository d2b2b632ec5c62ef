//! The cost of periodic asynchronous checkpoints to a running job, measured directly (A/B):
//! one process runs the same single-threaded compute loop over its state in alternating
//! phases of `--every` seconds: phase A computes only; phase B first calls `save_async` of
//! the whole state (`--mib` MiB of f32, the state the loop updates), then computes while the
//! save is written in the background. Overhead = 1 - (work done in B) / (work done in A).
//! This is exactly the loss of a job checkpointing every `--every` seconds (one save per
//! interval), without the interval's length of waiting for a single data point.
//!
//!   overhead --dir DIR [--mib 512] [--every 60] [--pairs 3] [--seed N]
//!
//! Which phase of a pair runs first is drawn at random (seed printed; `--seed` replays an
//! order), so neither side systematically follows a save or inherits the disk's write-back
//! of the previous phase.
//!
//! One untimed save first: a job's first save allocates the snapshot buffers (page faults);
//! every later save reuses them, which is the steady state measured here. After each B phase
//! the save is waited for outside the timed phases, so an A phase never shares the machine
//! with a background save. Prints one JSON object.
use std::time::{Duration, Instant};

use ckpt_test_programs::{arg, num};

/// One unit of work: a few multiply-adds over the next 64 Ki elements of the state.
fn unit(state: &mut [f32], at: &mut usize) {
    const BLOCK: usize = 1 << 16;
    if *at + BLOCK > state.len() {
        *at = 0;
    }
    for x in &mut state[*at..*at + BLOCK] {
        let mut v = *x;
        for _ in 0..8 {
            v = v.mul_add(0.999_9, 1e-4);
        }
        *x = v;
    }
    *at += BLOCK;
}

/// Runs units for `d`; returns how many.
fn compute(state: &mut [f32], at: &mut usize, d: Duration) -> u64 {
    let t = Instant::now();
    let mut n = 0;
    while t.elapsed() < d {
        for _ in 0..16 {
            unit(state, at);
        }
        n += 16;
    }
    n
}

/// SplitMix64: enough to shuffle the phase order reproducibly from a printed seed.
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

fn main() {
    let dir = arg("--dir").expect("--dir DIR");
    let mib = num("--mib", 512) as usize;
    let every = Duration::from_secs_f64(
        arg("--every").map_or(60.0, |s| s.parse().expect("--every SECONDS")),
    );
    let pairs = num("--pairs", 3);
    let seed = num(
        "--seed",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    );
    let mut rng = seed;
    let mut ck = ckpt::Checkpointer::open(&dir).expect("open").with_keep(2);
    let mut state: Vec<f32> = (0..mib << 18).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let mut at = 0;
    let load_start = loadavg();
    // Untimed first save (allocates the snapshot buffers) and a short warm-up.
    ck.save_async_with(Some(0), |s| s.put_pod("weights.f32", &state))
        .expect("save");
    ck.wait().expect("first save");
    compute(&mut state, &mut at, Duration::from_secs(1));
    let (mut a, mut b, mut stalls, mut totals, mut ratios) =
        (vec![], vec![], vec![], vec![], vec![]);
    let mut late = 0;
    let mut order = String::new();
    for p in 0..pairs {
        let phases = if splitmix64(&mut rng) & 1 == 0 {
            ["A", "B"]
        } else {
            ["B", "A"]
        };
        order.push_str(phases[0]);
        order.push_str(phases[1]);
        order.push(' ');
        for phase in phases {
            if phase == "A" {
                a.push(compute(&mut state, &mut at, every));
                continue;
            }
            let t = Instant::now();
            ck.save_async_with(Some(p + 1), |s| s.put_pod("weights.f32", &state))
                .expect("save_async");
            stalls.push(t.elapsed().as_secs_f64());
            let n = compute(&mut state, &mut at, every - t.elapsed());
            b.push(n);
            if ck.save_pending() {
                late += 1;
            }
            let saved = ck.wait().expect("background save").expect("a save");
            totals.push(saved.duration.as_secs_f64());
        }
        ratios.push(*b.last().unwrap() as f64 / *a.last().unwrap() as f64);
    }
    let sa: u64 = a.iter().sum();
    let sb: u64 = b.iter().sum();
    let mut sorted = ratios.clone();
    sorted.sort_by(f64::total_cmp);
    let k = sorted.len();
    let med = (sorted[(k - 1) / 2] + sorted[k / 2]) / 2.0;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "{{\"measure\":\"checkpoint_overhead_ab\",\"state_mib\":{mib},\"every_s\":{},\"pairs\":{pairs},\
\"units_a\":{a:?},\"units_b\":{b:?},\"overhead_percent\":{:.3},\"overhead_percent_median_pair\":{:.3},\
\"stall_s_mean\":{:.4},\"stall_s_max\":{:.4},\"background_save_s_mean\":{:.3},\"saves_still_running_at_phase_end\":{late},\
\"stall_over_interval_percent\":{:.3},\"ratios_b_over_a\":{ratios:?},\"order\":\"{}\",\"seed\":{seed},\
\"loadavg_start\":{load_start},\"loadavg_end\":{}}}",
        every.as_secs_f64(),
        100.0 * (1.0 - sb as f64 / sa as f64),
        100.0 * (1.0 - med),
        mean(&stalls),
        stalls.iter().cloned().fold(0.0, f64::max),
        mean(&totals),
        100.0 * mean(&stalls) / every.as_secs_f64(),
        order.trim_end(),
        loadavg()
    );
}
