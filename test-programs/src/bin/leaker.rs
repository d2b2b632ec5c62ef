//! Leaves processes behind: forks a grandchild that calls setsid() (escaping the job's
//! process group) and sleeps forever, writes its pid to `--pid-file`, then either exits
//! (`--exit`) or sleeps forever itself.
fn main() {
    let pid_file = ckpt_test_programs::arg("--pid-file").expect("--pid-file");
    unsafe {
        let child = libc::fork();
        if child == 0 {
            let grandchild = libc::fork();
            if grandchild == 0 {
                libc::setsid();
                for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                    libc::signal(s, libc::SIG_IGN);
                }
                loop {
                    libc::pause();
                }
            }
            std::fs::write(&pid_file, grandchild.to_string()).unwrap();
            libc::_exit(0);
        }
        libc::waitpid(child, std::ptr::null_mut(), 0);
    }
    if std::env::args().any(|a| a == "--exit") {
        return;
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
