//! Ignores SIGTERM, SIGINT, SIGHUP and SIGUSR1 and sleeps forever: the job that must be
//! SIGKILLed after the grace period. Writes its pid to `--pid-file` once its dispositions
//! are set.
fn main() {
    for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1] {
        unsafe { libc::signal(s, libc::SIG_IGN) };
    }
    if let Some(p) = ckpt_test_programs::arg("--pid-file") {
        std::fs::write(p, std::process::id().to_string()).unwrap();
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
