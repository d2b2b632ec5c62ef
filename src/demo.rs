//! The toy training job behind `ckpt demo` and the test suite's trainer: a linear model
//! fitted with Adam on a synthetic data stream. Deterministic to the bit: the same steps
//! give the same weights, however often the run is interrupted and resumed, as long as the
//! whole state (weights, both Adam moments, the RNG, the data position, the step) is saved.

use serde::{Deserialize, Serialize};

use crate::Checkpointer;

/// Everything the job must save to resume exactly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    pub step: u64,
    pub weights: Vec<f64>,
    pub adam_m: Vec<f64>,
    pub adam_v: Vec<f64>,
    /// State of the dropout RNG (splitmix64).
    pub rng: u64,
    /// Position in the synthetic data stream.
    pub data_pos: u64,
    pub loss: f64,
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(x: &mut u64) -> f64 {
    (splitmix(x) >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
}

impl TrainState {
    /// A fresh model of `dim` weights.
    pub fn new(dim: usize, seed: u64) -> TrainState {
        let mut r = seed;
        let weights = (0..dim).map(|_| unit(&mut r) * 0.1).collect();
        TrainState {
            step: 0,
            weights,
            adam_m: vec![0.0; dim],
            adam_v: vec![0.0; dim],
            rng: seed ^ 0xDEAD_BEEF,
            data_pos: 0,
            loss: f64::NAN,
        }
    }

    /// One optimisation step on a batch of 8 samples.
    #[allow(clippy::needless_range_loop)] // index loops keep the arithmetic order obvious
    pub fn step(&mut self) {
        let dim = self.weights.len();
        let mut grad = vec![0.0; dim];
        let mut loss = 0.0;
        const BATCH: u64 = 8;
        for _ in 0..BATCH {
            let mut d = self.data_pos.wrapping_mul(0x2545_F491_4F6C_DD1D);
            self.data_pos += 1;
            let x: Vec<f64> = (0..dim).map(|_| unit(&mut d)).collect();
            // The target: a fixed "true" weight vector plus noise.
            let y: f64 = x
                .iter()
                .enumerate()
                .map(|(i, xi)| xi * ((i % 7) as f64 - 3.0) / 3.0)
                .sum::<f64>()
                + 0.01 * unit(&mut d);
            let pred: f64 = x.iter().zip(&self.weights).map(|(a, b)| a * b).sum();
            let err = pred - y;
            loss += err * err;
            for i in 0..dim {
                // Dropout on the gradient, driven by the saved RNG.
                if splitmix(&mut self.rng) % 10 != 0 {
                    grad[i] += 2.0 * err * x[i] / BATCH as f64;
                }
            }
        }
        self.step += 1;
        let (lr, b1, b2, eps) = (0.01, 0.9, 0.999, 1e-8);
        let t = self.step as i32;
        for i in 0..dim {
            self.adam_m[i] = b1 * self.adam_m[i] + (1.0 - b1) * grad[i];
            self.adam_v[i] = b2 * self.adam_v[i] + (1.0 - b2) * grad[i] * grad[i];
            let mh = self.adam_m[i] / (1.0 - f64::powi(b1, t));
            let vh = self.adam_v[i] / (1.0 - f64::powi(b2, t));
            self.weights[i] -= lr * mh / (vh.sqrt() + eps);
        }
        self.loss = loss / BATCH as f64;
    }

    /// A 128-bit hex digest of the weights and the optimizer state (two independent
    /// hashes: crc32c-extended and FNV-1a 64).
    pub fn digest(&self) -> String {
        let mut bytes = Vec::with_capacity(self.weights.len() * 24 + 16);
        for v in self.weights.iter().chain(&self.adam_m).chain(&self.adam_v) {
            bytes.extend_from_slice(&v.to_bits().to_le_bytes());
        }
        bytes.extend_from_slice(&self.step.to_le_bytes());
        bytes.extend_from_slice(&self.rng.to_le_bytes());
        let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
        for b in &bytes {
            fnv = (fnv ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let c1 = crc32c::crc32c(&bytes);
        let c2 = crc32c::crc32c_append(c1, &bytes);
        format!("{fnv:016x}{c1:08x}{c2:08x}")
    }
}

/// Settings of one trainer run.
#[derive(Debug, Clone)]
pub struct TrainerArgs {
    pub steps: u64,
    pub dim: usize,
    pub seed: u64,
    /// Sleep this long per step (to make a short job interruptible).
    pub step_ms: u64,
    /// Abort (SIGABRT) when reaching this step, on the first launch only.
    pub crash_at: Option<u64>,
    /// Write the final digest here (as well as printing it).
    pub digest_file: Option<std::path::PathBuf>,
}

/// An uninterrupted run, in memory: the reference digest.
pub fn reference_digest(a: &TrainerArgs) -> String {
    let mut s = TrainState::new(a.dim, a.seed);
    while s.step < a.steps {
        s.step();
    }
    s.digest()
}

/// The trainer as a job under `ckpt run`. Returns the process exit code.
pub fn run_trainer(a: &TrainerArgs) -> Result<i32, crate::Error> {
    let mut ck = Checkpointer::from_env()?;
    let mut s: TrainState = match ck.restore()? {
        Some(s) => s,
        None => TrainState::new(a.dim, a.seed),
    };
    if s.weights.len() != a.dim {
        return Err(crate::Error::Usage(format!(
            "checkpoint has {} weights but --dim is {}",
            s.weights.len(),
            a.dim
        )));
    }
    let resumed_at = s.step;
    if resumed_at > 0 {
        eprintln!("trainer: resumed at step {resumed_at}");
    }
    while s.step < a.steps {
        s.step();
        ck.set_step(s.step);
        if a.crash_at == Some(s.step) && ck.restart_count() == 0 {
            eprintln!("trainer: crashing on purpose at step {} (abort)", s.step);
            std::process::abort();
        }
        if a.step_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(a.step_ms));
        }
        if ck.should_checkpoint() {
            ck.save_at(s.step, &s)?;
        }
        if ck.should_stop() {
            eprintln!("trainer: stopping at step {} as asked", s.step);
            return Ok(0);
        }
    }
    let d = s.digest();
    println!("digest {d} step {} loss {:.6}", s.step, s.loss);
    if let Some(p) = &a.digest_file {
        std::fs::write(p, format!("{d}\n")).map_err(|e| crate::Error::io("write", p, e))?;
    }
    Ok(0)
}
