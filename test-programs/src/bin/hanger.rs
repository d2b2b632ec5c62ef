//! A client job that reports progress for `--beats` heartbeats, then hangs (sleeps forever
//! without calling the client) on its first launch; on a relaunch it exits 0 at once.
use ckpt_test_programs::num;

fn main() {
    let mut ck = ckpt::Checkpointer::from_env().expect("client");
    if ck.restart_count() > 0 {
        return;
    }
    for step in 0..num("--beats", 3) {
        ck.progress(step);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
