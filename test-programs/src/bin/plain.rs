//! A job that never uses the client: sleeps `--ms` then exits with `--code` (default 0).
//! The checkpoint-request signal would kill it (SIGUSR1's default action), so it proves
//! that ckpt never sends one to a job that did not announce a client.
use ckpt_test_programs::num;

fn main() {
    std::thread::sleep(std::time::Duration::from_millis(num("--ms", 1000)));
    std::process::exit(num("--code", 0) as i32);
}
