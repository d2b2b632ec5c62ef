//! The local Slurm cluster of the Slurm and multi-rank tests (`scripts/slurm/`): where it
//! lives, commands that talk to it, and starting it when needed (failing under `CI`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{output_deadline, text};

pub fn cluster_dir() -> PathBuf {
    PathBuf::from(std::env::var("CKPT_SLURM_DIR").unwrap_or_else(|_| "/tmp/ckpt-slurm".into()))
}

pub fn slurm_conf() -> PathBuf {
    cluster_dir().join("etc/slurm.conf")
}

pub fn slurm_cmd(prog: &str) -> Command {
    let mut c = Command::new(prog);
    c.env("SLURM_CONF", slurm_conf());
    super::clear_ckpt_env(&mut c);
    c
}

pub fn cluster_up() -> bool {
    if !slurm_conf().exists() {
        return false;
    }
    let out = slurm_cmd("sinfo").args(["-h", "-o", "%T"]).output();
    matches!(out, Ok(o) if o.status.success() && ["idle", "mixed", "allocated", "completing"].iter().any(|s| text(&o.stdout).contains(s)))
}

/// True when a cluster answers (starting it if we may); false to skip. Panics under CI.
pub fn ensure_cluster(test: &str) -> bool {
    if cluster_up() {
        return true;
    }
    let ci = std::env::var_os("CI").is_some();
    let root = unsafe { libc::geteuid() } == 0;
    let mut why = String::from("not root, cannot start one");
    if root {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/slurm/start-local-slurm.sh");
        let t = Instant::now();
        let out = output_deadline(
            Command::new(&script).arg(cluster_dir()),
            Duration::from_secs(900),
        );
        eprintln!(
            "{test}: start-local-slurm.sh took {:?}: {}",
            t.elapsed(),
            text(&out.stderr)
        );
        if out.status.success() && cluster_up() {
            return true;
        }
        why = format!(
            "start-local-slurm.sh failed ({}): {}",
            out.status,
            text(&out.stderr)
        );
    }
    assert!(
        !ci,
        "{test}: CI is set but no Slurm cluster is available: {why}"
    );
    eprintln!("{test}: SKIPPED: no Slurm cluster ({why})");
    false
}
