//! A plain multi-process launcher, like torchrun/mpirun on one node: starts `--n` copies of
//! the command with RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE set, forwards SIGUSR1,
//! SIGUSR2, SIGTERM, SIGINT and SIGHUP to every rank, and when a rank fails kills the others
//! (SIGKILL) and exits 1. Exits 0 once every rank exited 0.
//!
//! `rank_launcher --n 4 -- prog args...`
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ckpt_test_programs::num;

static PENDING: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    PENDING.fetch_or(1 << sig, Ordering::SeqCst);
}

const FORWARD: [i32; 5] = [
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
];

fn main() {
    let n = num("--n", 4) as u32;
    let args: Vec<String> = std::env::args().collect();
    let cmd = match args.iter().position(|a| a == "--") {
        Some(i) if i + 1 < args.len() => args[i + 1..].to_vec(),
        _ => {
            eprintln!("usage: rank_launcher --n N -- command [args...]");
            std::process::exit(64);
        }
    };
    for &s in &FORWARD {
        // SAFETY: the handler only touches an atomic.
        unsafe { libc::signal(s, on_signal as *const () as libc::sighandler_t) };
    }
    let mut kids: Vec<Option<Child>> = (0..n)
        .map(|r| {
            let c = Command::new(&cmd[0])
                .args(&cmd[1..])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", n.to_string())
                .spawn()
                .unwrap_or_else(|e| {
                    eprintln!("rank_launcher: cannot start {}: {e}", cmd[0]);
                    std::process::exit(127)
                });
            Some(c)
        })
        .collect();
    let mut failed = false;
    loop {
        let pending = PENDING.swap(0, Ordering::SeqCst);
        for &s in &FORWARD {
            if pending & (1 << s) != 0 {
                for c in kids.iter().flatten() {
                    unsafe { libc::kill(c.id() as i32, s) };
                }
            }
        }
        for (r, slot) in kids.iter_mut().enumerate() {
            if let Some(c) = slot {
                if let Ok(Some(st)) = c.try_wait() {
                    if !st.success() {
                        eprintln!("rank_launcher: rank {r} failed ({st}); stopping the others");
                        failed = true;
                    }
                    *slot = None;
                }
            }
        }
        if failed {
            for c in kids.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
            std::process::exit(1);
        }
        if kids.iter().all(Option::is_none) {
            std::process::exit(0);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
