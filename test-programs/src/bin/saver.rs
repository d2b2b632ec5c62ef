//! A job that keeps running when a save fails (disk full, read-only or vanished directory):
//! it appends one line per save attempt to --progress (`saved <seq> <bytes>` or
//! `failed <error>`) and one `step <n>` line every 20 steps, so a test can see that it was
//! told and went on. Each requested save writes a state of the next size of --sizes (bytes,
//! comma-separated, cycling). Ends after --steps steps (or when asked to stop) with exit 0.
use std::io::Write;

use ckpt_test_programs::{arg, num};

fn main() {
    let sizes: Vec<usize> = arg("--sizes")
        .unwrap_or_else(|| "1000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("--sizes: comma-separated byte counts")
        })
        .collect();
    let progress = arg("--progress").expect("--progress FILE");
    let steps = num("--steps", 1_000_000);
    let step_ms = num("--step-ms", 5);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&progress)
        .expect("open --progress");
    let mut line = |s: String| {
        let _ = out.write_all(format!("{s}\n").as_bytes());
    };
    let mut ck = match ckpt::Checkpointer::from_env() {
        Ok(c) => c,
        Err(e) => {
            line(format!("init-failed {e}"));
            std::process::exit(1);
        }
    };
    let mut step: u64 = match ck.restore::<(u64, Vec<u8>)>() {
        Ok(Some((s, _))) => s,
        Ok(None) => 0,
        Err(e) => {
            line(format!("restore-failed {e}"));
            std::process::exit(1);
        }
    };
    line(format!("start {step}"));
    let mut attempt = 0usize;
    while step < steps {
        step += 1;
        if step.is_multiple_of(20) {
            line(format!("step {step}"));
        }
        std::thread::sleep(std::time::Duration::from_millis(step_ms));
        if ck.should_checkpoint() {
            let size = sizes[attempt % sizes.len()];
            attempt += 1;
            match ck.save_at(step, &(step, vec![0xA5u8; size])) {
                Ok(s) => line(format!("saved {} {}", s.seq, s.bytes)),
                Err(e) => line(format!("failed {e}")),
            }
        }
        if ck.should_stop() {
            line(format!("stopped {step}"));
            return;
        }
    }
    line(format!("done {step}"));
}
