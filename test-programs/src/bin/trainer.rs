//! The deterministic toy trainer (the same one as `ckpt demo`).
use ckpt_test_programs::{arg, num};

fn main() {
    let a = ckpt::demo::TrainerArgs {
        steps: num("--steps", 300),
        dim: num("--dim", 64) as usize,
        seed: num("--seed", 42),
        step_ms: num("--step-ms", 2),
        crash_at: arg("--crash-at").map(|v| v.parse().expect("--crash-at")),
        digest_file: arg("--digest-file").map(Into::into),
    };
    match ckpt::demo::run_trainer(&a) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("trainer: error: {e}");
            std::process::exit(1);
        }
    }
}
