//! Benchmark helper (scripts/bench): request signal -> the client seeing it.
//! `siglat --n N` starts N clients one after the other; each spins on `should_checkpoint()`;
//! the parent stamps CLOCK_MONOTONIC, sends SIGUSR1, and the child prints the monotonic time
//! at which `should_checkpoint()` returned true. Prints JSON: median and max in microseconds.
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn main() {
    if std::env::args().any(|a| a == "--child") {
        let dir = std::env::args().next_back().unwrap();
        let mut ck = ckpt::Checkpointer::open(dir).expect("client");
        println!("ready");
        loop {
            if ck.should_checkpoint() {
                println!("{}", mono_ns());
                return;
            }
            std::hint::spin_loop();
        }
    }
    let n = ckpt_test_programs::num("--n", 30);
    let tmp = std::env::temp_dir().join(format!("siglat.{}", std::process::id()));
    let mut lat = Vec::new();
    for _ in 0..n {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .arg("--child")
            .arg(&tmp)
            .env_remove("CKPT_SOCKET")
            .env_remove("CKPT_DIR")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        std::thread::sleep(std::time::Duration::from_millis(20));
        let t0 = mono_ns();
        unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
        line.clear();
        out.read_line(&mut line).unwrap();
        let t1: u64 = line.trim().parse().unwrap();
        lat.push((t1.saturating_sub(t0)) as f64 / 1e3);
        child.wait().unwrap();
    }
    let _ = std::fs::remove_dir_all(&tmp);
    lat.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"n\": {}, \"median_us\": {:.1}, \"max_us\": {:.1}}}",
        lat.len(),
        lat[lat.len() / 2],
        lat[lat.len() - 1]
    );
}
