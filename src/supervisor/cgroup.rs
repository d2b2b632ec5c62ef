//! The job's own cgroup (v2), where the machine allows one: a child of the supervisor's
//! cgroup named `ckpt-<supervisor pid>-<nonce>`, which the job is placed in before it execs.
//! `cgroup.kill` then ends every process of the job, even ones that `setsid()` away or
//! double-fork, and even after ckpt itself was SIGKILLed: the next `ckpt run` on the
//! directory reads the record `DIR/.ckpt/cgroup` and kills what its dead predecessor left.
//!
//! Where no writable cgroup2 hierarchy exists (no root, no delegated subtree), ckpt falls
//! back to its process group + /proc walk (`spawn.rs`). Detection, not assumption: a pure v2
//! tree at /sys/fs/cgroup, a hybrid layout's /sys/fs/cgroup/unified, or none.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The record of the cgroup in use, in `DIR/.ckpt`.
const RECORD: &str = "cgroup";
const PREFIX: &str = "ckpt-";

/// A cgroup that holds the job.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    record: PathBuf,
}

/// The cgroup2 mount points listed in /proc/self/mountinfo.
fn cgroup2_mounts() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let mount = pre.split(' ').nth(4)?;
            (post.split(' ').next()? == "cgroup2").then(|| PathBuf::from(mount))
        })
        .collect()
}

/// This process's cgroup in the v2 hierarchy, as a directory.
fn own_cgroup_dir() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let rel = rel.trim_start_matches('/');
    cgroup2_mounts()
        .into_iter()
        .map(|m| m.join(rel))
        .find(|d| d.join("cgroup.procs").is_file())
}

impl Cgroup {
    /// Creates the job's cgroup and records it in `private` (`DIR/.ckpt`); `None` when the
    /// machine has no writable cgroup2 hierarchy for this process.
    pub fn create(private: &Path) -> Option<Cgroup> {
        let parent = own_cgroup_dir()?;
        let name = format!("{PREFIX}{}-{:08x}", std::process::id(), fastrand::u32(..));
        let path = parent.join(name);
        std::fs::create_dir(&path).ok()?;
        if !path.join("cgroup.procs").is_file() {
            let _ = std::fs::remove_dir(&path);
            return None;
        }
        let record = private.join(RECORD);
        let tmp = private.join(format!("{RECORD}.tmp"));
        // The record: a small owner-only file, made durable by the rename (the store's own
        // helper for ckpt's small files).
        let written = crate::store::io::write_owner_only(&tmp, path.as_os_str().as_encoded_bytes())
            .and_then(|()| std::fs::File::open(&tmp)?.sync_all())
            .and_then(|()| std::fs::rename(&tmp, &record));
        if written.is_err() {
            let _ = std::fs::remove_dir(&path);
            return None;
        }
        Some(Cgroup { path, record })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file a process writes "0" to in order to join the cgroup (done by the job's
    /// child between fork and exec).
    pub fn procs_path(&self) -> PathBuf {
        self.path.join("cgroup.procs")
    }

    /// SIGKILLs every process in the cgroup.
    pub fn kill(&self) {
        kill_dir(&self.path);
    }

    /// Kills what is left, waits for the cgroup to empty (2 s at most), removes it and the
    /// record.
    pub fn remove(self) {
        kill_dir(&self.path);
        wait_empty(&self.path, Duration::from_secs(2));
        let _ = std::fs::remove_dir(&self.path);
        let _ = std::fs::remove_file(&self.record);
    }
}

fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

fn kill_dir(dir: &Path) {
    if std::fs::write(dir.join("cgroup.kill"), b"1").is_err() {
        // Kernels before 5.14 have no cgroup.kill.
        for p in procs(dir) {
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
    }
}

fn wait_empty(dir: &Path, limit: Duration) -> bool {
    let start = Instant::now();
    loop {
        if procs(dir).is_empty() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Ends what a dead predecessor's job left running: reads the record in `private`, and if it
/// names a cgroup ckpt made (under a cgroup2 mount, named `ckpt-<pid>-<nonce>`) whose
/// supervisor pid is no longer alive, kills every process in it and removes it. Returns how
/// many processes it killed. A record that names anything else is ignored (and removed):
/// a planted record must not make ckpt kill other processes.
pub fn end_leftovers(private: &Path) -> usize {
    let record = private.join(RECORD);
    let Ok(meta) = std::fs::symlink_metadata(&record) else {
        return 0;
    };
    let remove_record = || {
        let _ = std::fs::remove_file(&record);
    };
    if !meta.is_file() || meta.len() > 4096 {
        remove_record();
        return 0;
    }
    let Ok(text) = std::fs::read_to_string(&record) else {
        remove_record();
        return 0;
    };
    let path = PathBuf::from(text.trim());
    let ours = path.is_absolute()
        && !path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        && cgroup2_mounts().iter().any(|m| path.starts_with(m))
        && path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
            .is_some_and(|pid| !crate::store::pid_alive(pid));
    if !ours || !path.join("cgroup.procs").is_file() {
        remove_record();
        return 0;
    }
    let n = procs(&path).len();
    kill_dir(&path);
    wait_empty(&path, Duration::from_secs(5));
    let _ = std::fs::remove_dir(&path);
    remove_record();
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn planted_records_are_ignored() {
        let d = tempfile::tempdir().unwrap();
        for planted in [
            "/sys/fs/cgroup",
            "/etc",
            "relative/ckpt-1-0",
            "/sys/fs/cgroup/../ckpt-1-0",
        ] {
            std::fs::write(d.path().join(RECORD), planted).unwrap();
            assert_eq!(end_leftovers(d.path()), 0, "{planted}");
            assert!(!d.path().join(RECORD).exists());
        }
        // A record of a live supervisor (this test process) is not touched.
        if let Some(own) = own_cgroup_dir() {
            let live = own.join(format!("{PREFIX}{}-0", std::process::id()));
            std::fs::write(d.path().join(RECORD), live.as_os_str().as_encoded_bytes()).unwrap();
            assert_eq!(end_leftovers(d.path()), 0);
        }
    }
}
