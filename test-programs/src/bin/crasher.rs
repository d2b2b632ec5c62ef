//! Exits with `--code` (default 3) after `--after-ms`. With `--save`, first commits a
//! checkpoint through the client (so each launch makes progress). With `--succeed-after N`,
//! exits 0 once CKPT_RESTART_COUNT reaches N.
use ckpt_test_programs::{arg, num};

fn main() {
    let restarts: u64 = std::env::var("CKPT_RESTART_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if arg("--succeed-after").is_some() && restarts >= num("--succeed-after", 0) {
        std::process::exit(0);
    }
    if std::env::args().any(|a| a == "--save") {
        let mut ck = ckpt::Checkpointer::from_env().expect("client");
        ck.save_at(restarts, &restarts).expect("save");
    }
    std::thread::sleep(std::time::Duration::from_millis(num("--after-ms", 0)));
    std::process::exit(num("--code", 3) as i32);
}
