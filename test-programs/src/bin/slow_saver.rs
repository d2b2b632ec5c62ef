//! A client job whose saves take `--save-ms` (default 2000): checkpoints on request, stops
//! cleanly when asked. Each save holds a counter file; progress goes to `--progress-file`.
use ckpt_test_programs::{arg, num};

fn main() {
    let mut ck = ckpt::Checkpointer::from_env().expect("client");
    let mut n: u64 = ck.restore().expect("restore").unwrap_or(0);
    let save_ms = num("--save-ms", 2000);
    loop {
        n += 1;
        std::thread::sleep(std::time::Duration::from_millis(10));
        if let Some(p) = arg("--progress-file") {
            let _ = std::fs::write(p, n.to_string());
        }
        if ck.should_checkpoint() {
            std::thread::sleep(std::time::Duration::from_millis(save_ms));
            ck.save_at(n, &n).expect("save");
        }
        if ck.should_stop() {
            std::process::exit(0);
        }
    }
}
