//! `ckpt save FILE` on a file system with reflinks (issue 19): the checkpoint's file is a
//! clone of the source (`FICLONE`: it shares the source's extents, no data copied), modifying
//! the source afterwards does not change the checkpoint (copy-on-write; `ckpt verify` passes,
//! the bytes are the original's), and on ext4 (no reflinks) the same command falls back to a
//! copy that shares nothing. Both file systems are loop-mounted images made in the test (root,
//! `mkfs.xfs` from xfsprogs and `mkfs.ext4`, which `scripts/setup` installs); without root or
//! those tools the test says it is skipped, as the frozen-file-system test in
//! tests/supervisor.rs does.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// A file system image loop-mounted at `mnt`, unmounted on drop.
struct LoopFs {
    mnt: PathBuf,
}

impl LoopFs {
    /// `mkfs` is the command and its options; `size` what `truncate -s` takes (XFS needs at
    /// least 300 MiB; the image is sparse).
    fn new(tmp: &Path, name: &str, mkfs: &[&str], size: &str) -> Option<LoopFs> {
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let img = tmp.join(format!("{name}.img"));
        let mnt = tmp.join(name);
        std::fs::create_dir(&mnt).ok()?;
        let ok = |c: &mut Command| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(Command::new("truncate").args(["-s", size]).arg(&img))
            || !ok(Command::new(mkfs[0]).args(&mkfs[1..]).arg(&img))
            || !ok(Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt))
        {
            return None;
        }
        Some(LoopFs { mnt })
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}

/// The extents of `path` per `filefrag -v`: (logical start, physical start, length, shared).
fn extents(path: &Path) -> Vec<(u64, u64, u64, bool)> {
    let out = Command::new("filefrag")
        .arg("-v")
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "filefrag -v {}: {out:?}",
        path.display()
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut v = Vec::new();
    // "   0:        0..    4095:         24..      4119:   4096:             last,shared,eof"
    for line in text.lines() {
        let cols: Vec<&str> = line.split(':').map(str::trim).collect();
        if cols.len() < 5 || cols[0].parse::<u64>().is_err() {
            continue;
        }
        let range = |s: &str| -> u64 { s.split("..").next().unwrap().trim().parse().unwrap() };
        let len: u64 = cols[3].parse().unwrap();
        let shared = cols[4..]
            .iter()
            .any(|c| c.split(',').any(|f| f.trim() == "shared"));
        v.push((range(cols[1]), range(cols[2]), len, shared));
    }
    assert!(!v.is_empty(), "no extents parsed from:\n{text}");
    v
}

/// The (logical start, physical start, length) runs of `ext`, adjacent extents merged
/// (`filefrag` splits a run where only the shared flag changes).
fn runs(ext: &[(u64, u64, u64, bool)]) -> Vec<(u64, u64, u64)> {
    let mut v: Vec<(u64, u64, u64)> = Vec::new();
    for &(l, p, n, _) in ext {
        match v.last_mut() {
            Some(last) if last.0 + last.2 == l && last.1 + last.2 == p => last.2 += n,
            _ => v.push((l, p, n)),
        }
    }
    v
}

/// Saves a random file with `ckpt save`, then overwrites part of the source in place; returns
/// the source's original bytes, the checkpoint's file and the source path.
fn save_then_modify(root: &Path, seed: u64) -> (Vec<u8>, PathBuf, PathBuf) {
    let mut rng = fastrand::Rng::with_seed(seed);
    // 24 MiB + 5 bytes: several extents' worth, and a partial last block.
    let data: Vec<u8> = (0..(24 << 20) + 5).map(|_| rng.u8(..)).collect();
    let src = root.join("weights.bin");
    std::fs::write(&src, &data).unwrap();
    let out = ckpt()
        .args(["save", "--json", "--step", "7", "--dir"])
        .arg(root.join("ck"))
        .arg(&src)
        .output()
        .unwrap();
    assert!(out.status.success(), "ckpt save: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ck = PathBuf::from(v["path"].as_str().unwrap()).join("weights.bin");
    assert_eq!(std::fs::read(&ck).unwrap(), data);
    (data, ck, src)
}

fn modify_and_check(root: &Path, data: &[u8], ck: &Path, src: &Path) {
    // Overwrite 1 MiB in the middle of the source in place (same inode, no truncation), durably.
    let mut f = std::fs::OpenOptions::new().write(true).open(src).unwrap();
    f.seek(SeekFrom::Start(8 << 20)).unwrap();
    f.write_all(&vec![0xA5u8; 1 << 20]).unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_ne!(std::fs::read(src).unwrap(), data, "the source was modified");
    // Read from the disk, not from the page cache the save left behind.
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
    assert_eq!(
        std::fs::read(ck).unwrap(),
        data,
        "the checkpoint changed with its source"
    );
    let out = ckpt()
        .args(["verify", "--dir"])
        .arg(root.join("ck"))
        .output()
        .unwrap();
    assert!(out.status.success(), "ckpt verify: {out:?}");
}

#[test]
fn save_file_reflinks_on_xfs_and_the_checkpoint_survives_source_changes() {
    let tmp = tempdir();
    let Some(fs) = LoopFs::new(
        tmp.path(),
        "xfs",
        &["mkfs.xfs", "-q", "-f", "-m", "reflink=1"],
        "512M",
    ) else {
        eprintln!(
            "skipped: needs root, a loop device and mkfs.xfs (xfsprogs; scripts/setup installs it)"
        );
        return;
    };
    let seed = seed("reflink-xfs");
    let (data, ck, src) = save_then_modify(&fs.mnt, seed);
    // The checkpoint's file is a clone: every extent shared, at the source's physical blocks.
    let (a, b) = (extents(&src), extents(&ck));
    assert!(
        b.iter().all(|e| e.3),
        "the checkpoint's extents are not shared: {b:?}"
    );
    assert_eq!(
        runs(&a),
        runs(&b),
        "source and checkpoint do not map the same blocks"
    );
    modify_and_check(&fs.mnt, &data, &ck, &src);
    // Copy-on-write moved the source's modified range; the checkpoint kept its blocks, now
    // no longer all shared.
    assert_ne!(
        runs(&extents(&src)),
        runs(&b),
        "the source's overwrite was not copied on write"
    );
    let ck_after = extents(&ck);
    assert_eq!(runs(&ck_after), runs(&b), "the checkpoint's blocks moved");
    assert!(
        ck_after.iter().any(|e| !e.3),
        "the overwritten range is still shared: {ck_after:?}"
    );
}

#[test]
fn save_file_on_ext4_falls_back_to_a_copy() {
    let tmp = tempdir();
    let Some(fs) = LoopFs::new(tmp.path(), "ext4", &["mkfs.ext4", "-q", "-F"], "128M") else {
        eprintln!("skipped: needs root, a loop device and mkfs.ext4");
        return;
    };
    let seed = seed("reflink-ext4");
    let (data, ck, src) = save_then_modify(&fs.mnt, seed);
    let (a, b) = (extents(&src), extents(&ck));
    assert!(b.iter().all(|e| !e.3), "ext4 has no reflinks, yet: {b:?}");
    let pa: Vec<u64> = a.iter().map(|e| e.1).collect();
    assert!(
        b.iter().all(|e| !pa.contains(&e.1)),
        "the copy shares blocks with its source: {a:?} {b:?}"
    );
    modify_and_check(&fs.mnt, &data, &ck, &src);
}
