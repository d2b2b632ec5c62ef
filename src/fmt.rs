//! How ckpt prints durations, sizes and signals for humans (one place, used by the
//! supervisor, the integrations and every subcommand).

use std::time::Duration;

/// `1.2s`, `3m04s`, `250ms`.
pub fn fmt_dur(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60)
    }
}

/// `512 B`, `1.5 MiB`.
pub fn fmt_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `SIGUSR1`, `SIGRTMIN+2`, or `signal 999` for a number that is no signal.
pub fn signame(s: i32) -> String {
    match nix::sys::signal::Signal::try_from(s) {
        Ok(sig) => sig.as_str().to_string(),
        Err(_) if (34..=64).contains(&s) => format!("SIGRTMIN+{}", s - 34),
        Err(_) => format!("signal {s}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(signame(libc::SIGUSR1), "SIGUSR1");
        assert_eq!(signame(36), "SIGRTMIN+2");
        assert_eq!(signame(999), "signal 999");
        assert_eq!(signame(-1), "signal -1");
        assert_eq!(fmt_dur(Duration::from_millis(61_500)), "1m01s");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
    }
}
