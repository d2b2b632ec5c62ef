//! A client job that blocks outside ckpt's code forever after `--steps` safe points (like a
//! rank stuck in a collective whose peer died): a SIGTERM finds no safe point. Writes its pid
//! to `--pid-file` once blocked.
use ckpt_test_programs::{arg, num};

fn main() {
    let mut ck = ckpt::Checkpointer::from_env().expect("client");
    for step in 0..num("--steps", 3) {
        let _ = ck.should_checkpoint_at(step);
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if let Some(p) = arg("--pid-file") {
        std::fs::write(p, std::process::id().to_string()).unwrap();
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
