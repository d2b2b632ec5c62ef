//! The demo trainer with switchable resume bugs, for `ckpt check`'s tests. It trains like
//! `trainer` and, at the end, writes `--out DIR` (relative to its working directory):
//! `weights.npy` (float64, shape (dim,)) and `summary.json`, and saves a final checkpoint of
//! the same two files. A relaunch that finds that final checkpoint exits 0 at once.
//!
//! `--forget rng`: on resume, reset the dropout RNG to its initial state instead of
//! restoring it (a resumed run then differs). `--forget all`: ignore the checkpoint and
//! start over (the result is right, the resume is not). `--nondet`: put the clock into the summary
//! (the job is not deterministic even uninterrupted).
use std::path::Path;

use ckpt::demo::TrainState;
use ckpt_test_programs::{arg, num};

fn npy(weights: &[f64]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '<f8', 'fortran_order': False, 'shape': ({},), }}",
        weights.len()
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for w in weights {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

fn write_outputs(dir: &Path, s: &TrainState, nondet: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("weights.npy"), npy(&s.weights))?;
    let clock = if nondet {
        format!(
            ", \"time_ns\": {}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )
    } else {
        String::new()
    };
    std::fs::write(
        dir.join("summary.json"),
        format!(
            "{{\"step\": {}, \"rng\": {}, \"data_pos\": {}, \"loss\": {:?}{clock}}}\n",
            s.step, s.rng, s.data_pos, s.loss
        ),
    )
}

fn main() {
    let steps = num("--steps", 200);
    let dim = num("--dim", 16) as usize;
    let seed = num("--seed", 42);
    let step_ms = num("--step-ms", 2);
    let forget = arg("--forget");
    let forget_rng = forget.as_deref() == Some("rng");
    let forget_all = forget.as_deref() == Some("all");
    let nondet = std::env::args().any(|a| a == "--nondet");
    let out = std::path::PathBuf::from(arg("--out").unwrap_or_else(|| "out".into()));

    let mut ck = ckpt::Checkpointer::from_env().expect("ckpt client");
    if ck
        .restore_dir()
        .is_some_and(|d| d.join("summary.json").exists())
    {
        eprintln!("resumer: the final checkpoint exists: done");
        return;
    }
    let mut s = match ck.restore::<TrainState>().expect("restore") {
        Some(_) if forget_all => TrainState::new(dim, seed),
        Some(mut s) => {
            if forget_rng {
                s.rng = TrainState::new(dim, seed).rng;
            }
            eprintln!("resumer: resumed at step {}", s.step);
            s
        }
        None => TrainState::new(dim, seed),
    };
    while s.step < steps {
        s.step();
        ck.set_step(s.step);
        std::thread::sleep(std::time::Duration::from_millis(step_ms));
        if ck.should_checkpoint() {
            ck.save_at(s.step, &s).expect("save");
        }
        if ck.should_stop() {
            eprintln!("resumer: stopping at step {} as asked", s.step);
            return;
        }
    }
    write_outputs(&out, &s, nondet).expect("write --out");
    ck.save_files(s.step, |d| write_outputs(d, &s, nondet))
        .expect("final save");
}
