//! A client job that sees every checkpoint request (`should_checkpoint()` returns true) but
//! never saves: runs `--ms` (default 3000) in 10 ms steps, then exits 0.
use ckpt_test_programs::num;

fn main() {
    let mut ck = ckpt::Checkpointer::from_env().expect("client");
    let end = std::time::Instant::now() + std::time::Duration::from_millis(num("--ms", 3000));
    let mut step = 0;
    while std::time::Instant::now() < end {
        step += 1;
        let _ = ck.should_checkpoint_at(step);
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
