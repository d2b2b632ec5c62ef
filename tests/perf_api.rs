//! Correctness of the performance APIs: bulk arrays, inline-verified reads, asynchronous
//! saves (ordering, waiting, the stop path). No timing assertions here (figures live in
//! `docs/benchmarks.md`, measured by `ckpt bench` and `scripts/bench`).

mod common;

use std::path::Path;
use std::time::Duration;

use ckpt::{Checkpointer, Error};
use common::*;

const T: Duration = Duration::from_secs(30);

/// A standalone client on `dir` (no supervisor variables).
fn open(dir: &Path) -> Checkpointer {
    for k in ["CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE", "CKPT_SIGNAL"] {
        assert!(
            std::env::var_os(k).is_none(),
            "run the tests without {k} set"
        );
    }
    Checkpointer::open(dir).expect("open")
}

/// Publishes one checkpoint in `dir` filled by `fill`, then returns a client opened on the
/// directory (the checkpoint verified, ready to restore) and the checkpoint's path.
fn save_then_open(
    dir: &Path,
    fill: impl FnOnce(&mut ckpt::store::Stage) -> ckpt::Result<()>,
) -> (Checkpointer, std::path::PathBuf) {
    let mut ck = open(dir);
    let saved = ck.save_with(None, fill).unwrap();
    drop(ck);
    (open(dir), saved.path)
}

fn f32s(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (i as u32 ^ seed) as f32 * 0.5).collect()
}

#[test]
fn bulk_arrays_round_trip_across_chunk_boundaries() {
    let tmp = tempdir();
    // 2.5 M f32 = 10 MB: more than one 8 MiB chunk, not a multiple of it.
    let w = f32s(2_500_003, 7);
    let m: Vec<f64> = (0..100_001).map(|i| i as f64 / 3.0).collect();
    let ids: Vec<i64> = (0..4097).map(|i| -i * 1_000_003).collect();
    let mut ck = open(tmp.path());
    let saved = ck
        .save_with(Some(3), |st| {
            st.write_f32s("weights.f32", &w)?;
            st.write_f64s("opt/m.f64", &m)?;
            st.write_pod("ids.i64", &ids)?;
            st.write_large("empty", &[])?;
            Ok(())
        })
        .unwrap();
    assert_eq!(
        saved.bytes,
        (w.len() * 4 + m.len() * 8 + ids.len() * 8) as u64
    );
    drop(ck);
    let ck = open(tmp.path());
    assert_eq!(ck.restore_point().unwrap().seq, saved.seq);
    assert_eq!(ck.read_f32s("weights.f32").unwrap(), w);
    assert_eq!(ck.read_f64s("opt/m.f64").unwrap(), m);
    assert_eq!(ck.read_pod::<i64>("ids.i64").unwrap(), ids);
    assert_eq!(ck.read_file("empty").unwrap(), Vec::<u8>::new());
    // Raw little-endian bytes on disk: what numpy.fromfile(path, "<f4") reads.
    let raw = std::fs::read(saved.path.join("weights.f32")).unwrap();
    assert_eq!(&raw[4..8], &w[1].to_le_bytes());
    // Into a buffer the job owns; a wrong size is a usage error.
    let mut dest = vec![0f32; w.len()];
    ck.read_pod_into("weights.f32", &mut dest).unwrap();
    assert_eq!(dest, w);
    let mut short = vec![0f32; 3];
    assert!(matches!(
        ck.read_pod_into("weights.f32", &mut short),
        Err(Error::Usage(_))
    ));
    // The verified tree matches what `ckpt verify` checks.
    ckpt::store::Store::new(tmp.path())
        .verify(saved.seq)
        .unwrap();
}

#[test]
fn corrupt_or_truncated_bulk_files_are_refused_on_read() {
    let tmp = tempdir();
    let w = f32s(3_000_000, 1);
    let (ck, saved) = save_then_open(tmp.path(), |st| {
        st.write_f32s("a.f32", &w)?;
        st.write_f32s("b.f32", &w)?;
        Ok(())
    });
    // One flipped bit in the last chunk of a.
    let a = saved.join("a.f32");
    let mut bytes = std::fs::read(&a).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0x10;
    std::fs::write(&a, &bytes).unwrap();
    let err = ck.read_f32s("a.f32").unwrap_err();
    assert!(err.to_string().contains("checksum"), "{err}");
    // b truncated by one element.
    let b = saved.join("b.f32");
    let f = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    f.set_len((w.len() as u64 - 1) * 4).unwrap();
    let err = ck.read_f32s("b.f32").unwrap_err();
    assert!(matches!(err, Error::Invalid { .. }), "{err}");
}

/// Bulk writes bypass the page cache in whole pages (`O_DIRECT`) and write the rest through
/// it: every size around the page and chunk boundaries, from page-aligned and unaligned
/// memory, followed by ordinary writes into the same file, reads back byte for byte and
/// verifies; the same on tmpfs (`/dev/shm`), whatever its `O_DIRECT` support.
#[test]
fn bulk_writes_are_exact_at_every_size_and_source_alignment() {
    // Past the page cache (O_DIRECT) and through it (the fallback).
    for direct in [true, false] {
        ckpt::pod::set_direct_io(direct);
        let chunk = ckpt::pod::CHUNK;
        let sizes = [
            0,
            1,
            4095,
            4096,
            4097,
            3 * 4096 + 17,
            chunk - 1,
            chunk,
            chunk + 4096 + 7,
        ];
        let mut roots = vec![tempdir()];
        if Path::new("/dev/shm").is_dir() {
            roots.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        for root in &roots {
            let mut src = Vec::new();
            let mut expect = Vec::new();
            let mut ck = open(root.path());
            let saved = ck
                .save_with(Some(1), |st| {
                    for (i, &n) in sizes.iter().enumerate() {
                        for off in [0usize, 16] {
                            let data: Vec<u8> =
                                (0..n).map(|j| (j * 31 + i * 7 + off) as u8).collect();
                            let window = at_page_offset(&mut src, off, n);
                            window.copy_from_slice(&data);
                            let name = format!("f{i}-{off}");
                            let mut w = st.create(&name)?;
                            w.write_bulk(window)
                                .map_err(|e| ckpt::Error::io("write", w.file_path(), e))?;
                            // Ordinary writes after the bulk ones land after them.
                            std::io::Write::write_all(&mut w, b"tail")
                                .map_err(|e| ckpt::Error::io("write", w.file_path(), e))?;
                            w.finish()?;
                            let mut all = data;
                            all.extend_from_slice(b"tail");
                            expect.push((name, all));
                        }
                    }
                    Ok(())
                })
                .unwrap();
            ckpt::store::Store::new(root.path())
                .verify(saved.seq)
                .unwrap();
            for (name, all) in &expect {
                let got = std::fs::read(saved.path.join(name)).unwrap();
                assert!(
                    got == *all,
                    "{}: {name} differs ({} bytes written, {} read)",
                    root.path().display(),
                    all.len(),
                    got.len()
                );
            }
            drop(ck);
        }
    }
}

/// A window of `len` bytes starting `off` bytes past a page boundary (the fast read path
/// bounces through an aligned buffer when the destination is 1..63 bytes past one).
fn at_page_offset(buf: &mut Vec<u8>, off: usize, len: usize) -> &mut [u8] {
    buf.clear();
    buf.resize(len + 8192, 0xAA);
    let base = buf.as_ptr().align_offset(4096) + off;
    &mut buf[base..base + len]
}

/// Writes `file` back and drops it from the page cache, as after a reboot (the restore then
/// reads past the cache when direct I/O is on). Repeated until no page at the start or the
/// middle is cached: pages still under a read-ahead started earlier cannot be dropped yet.
fn uncache(file: &Path) {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::File::open(file).unwrap();
    f.sync_all().unwrap();
    let len = f.metadata().unwrap().len() as usize;
    let cached_at = |off: usize| {
        let mut page = [0u8; 4096];
        let iov = libc::iovec {
            iov_base: page.as_mut_ptr().cast(),
            iov_len: page.len().min(len - off),
        };
        // SAFETY: one iovec over a live local buffer.
        unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, off as i64, libc::RWF_NOWAIT) > 0 }
    };
    wait_until(
        Duration::from_secs(30),
        "the file to leave the page cache",
        || {
            // SAFETY: a hint on an open descriptor.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            !cached_at(0) && !cached_at((len / 2) & !4095)
        },
    );
}

#[test]
fn read_into_is_exact_at_every_destination_alignment() {
    // Past the page cache (O_DIRECT) and through it (the fallback).
    for direct in [true, false] {
        ckpt::pod::set_direct_io(direct);
        let tmp = tempdir();
        // Not a multiple of the read sizes (4 and 8 MiB): the last chunk is partial.
        let data: Vec<u8> = (0..9_437_201u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (ck, saved) =
            save_then_open(tmp.path(), |st| st.write_large("blob", &data).map(|_| ()));
        let blob = saved.join("blob");
        let mut buf = Vec::new();
        for off in [0, 1, 7, 16, 31, 32, 63, 64, 100, 4095] {
            uncache(&blob);
            let before = ckpt::pod::direct_reads();
            let dest = at_page_offset(&mut buf, off, data.len());
            ck.read_into("blob", dest).unwrap();
            // A cold member of >= 8 MiB is read past the cache iff direct I/O is on (since
            // run I: docs/benchmarks.md), into the job's memory through aligned buffers.
            assert_eq!(
                ckpt::pod::direct_reads() - before,
                u64::from(direct),
                "memory the job owns, direct I/O {direct}"
            );
            assert!(dest == &data[..], "wrong bytes read at page offset {off}");
            // Nothing written outside the window.
            let base = buf.as_ptr().align_offset(4096) + off;
            assert!(buf[..base].iter().all(|&b| b == 0xAA), "offset {off}");
            assert!(
                buf[base + data.len()..].iter().all(|&b| b == 0xAA),
                "offset {off}"
            );
        }
        // Into fresh memory, a cold member of 9 MiB is read past the cache iff direct I/O
        // is on; one already in the page cache is read from it, at memory speed.
        for cold in [true, false] {
            if cold {
                uncache(&blob);
            } else {
                let _ = std::fs::read(&blob).unwrap();
            }
            let before = ckpt::pod::direct_reads();
            assert!(ck.read_file("blob").unwrap() == data);
            assert_eq!(
                ckpt::pod::direct_reads() - before,
                u64::from(direct && cold),
                "cold {cold}"
            );
        }
        // Sizes around the piece size, read into fresh memory (bytes of a u32 array).
        for n in [
            (8 << 20) - 4,
            8 << 20,
            (8 << 20) + 4,
            (16 << 20) + 4096,
            (16 << 20) + 4100,
        ] {
            let words: Vec<u32> = (0..n as u32 / 4)
                .map(|i| i.wrapping_mul(2_654_435_761))
                .collect();
            let tmp = tempdir();
            let (ck, saved) =
                save_then_open(tmp.path(), |st| st.write_pod("w", &words).map(|_| ()));
            uncache(&saved.join("w"));
            let before = ckpt::pod::direct_reads();
            assert!(ck.read_pod::<u32>("w").unwrap() == words, "{n} bytes");
            // Members smaller than one piece always go through the cache.
            assert_eq!(
                ckpt::pod::direct_reads() - before,
                u64::from(direct && n >= ckpt::pod::CHUNK),
                "{n} bytes"
            );
        }
    }
}

#[test]
fn corruption_and_truncation_are_caught_on_both_read_paths() {
    // Past the page cache (O_DIRECT) and through it (the fallback).
    for direct in [true, false] {
        ckpt::pod::set_direct_io(direct);
        let before = ckpt::pod::direct_reads();
        let tmp = tempdir();
        let data: Vec<u8> = (0..(9 << 20) + 5).map(|i| (i * 7 + 3) as u8).collect();
        // Opened (and the checkpoint verified) before the damage: what the read path must catch.
        let (ck, saved) =
            save_then_open(tmp.path(), |st| st.write_large("blob", &data).map(|_| ()));
        let file = saved.join("blob");
        let mut buf = Vec::new();
        // Damaged contents are refused by every path: into the job's memory directly (+0) and
        // through the aligned bounce buffer (+16, where glibc puts large allocations), and into
        // fresh memory (past the cache when direct I/O is on).
        let mut refused = |content: &[u8], what: &str, is_expected: &dyn Fn(&Error) -> bool| {
            std::fs::write(&file, content).unwrap();
            for off in [0, 16] {
                uncache(&file);
                let err = ck
                    .read_into("blob", at_page_offset(&mut buf, off, data.len()))
                    .unwrap_err();
                assert!(is_expected(&err), "{what} +{off}: {err}");
            }
            uncache(&file);
            let err = ck.read_file("blob").unwrap_err();
            assert!(is_expected(&err), "{what} fresh: {err}");
        };
        // One flipped bit in the first and in the last chunk.
        for at in [10, data.len() - 3] {
            let mut bad = data.clone();
            bad[at] ^= 0x01;
            refused(&bad, &format!("bit flipped at {at}"), &|e| {
                e.to_string().contains("checksum")
            });
        }
        // Truncated by one byte, and grown by one byte.
        for len in [data.len() - 1, data.len() + 1] {
            let mut v = data.clone();
            v.resize(len, 0);
            refused(&v, &format!("{len} bytes"), &|e| {
                matches!(e, Error::Invalid { .. })
            });
        }
        // Intact again: both paths read it.
        std::fs::write(&file, &data).unwrap();
        for off in [0, 16] {
            uncache(&file);
            let dest = at_page_offset(&mut buf, off, data.len());
            ck.read_into("blob", dest).unwrap();
            assert!(dest == &data[..]);
        }
        uncache(&file);
        assert_eq!(ck.read_file("blob").unwrap(), data);
        assert_eq!(
            ckpt::pod::direct_reads() > before,
            direct,
            "the damage was met past the cache iff direct I/O is on"
        );
    }
}

#[test]
fn async_saves_publish_in_order_and_a_second_save_waits_for_the_first() {
    let tmp = tempdir();
    let store = ckpt::store::Store::new(tmp.path());
    let mut ck = open(tmp.path());
    let mut w = f32s(4_000_000, 2); // 16 MB: the save is still in flight when we look
    for round in 1..=4u64 {
        w[0] = round as f32;
        ck.save_async_with(Some(round), |s| {
            s.put_pod("w.f32", &w)?;
            s.put_serde(ckpt::client::STATE_FILE, &round)
        })
        .unwrap();
        // The job may change its state right away: the snapshot is a copy.
        w[0] = -1.0;
        // The previous save is published by the time this one was accepted.
        let listed: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(listed.len() as u64, round - 1, "listed {listed:?}");
    }
    let last = ck.wait().unwrap().expect("the last save's outcome");
    assert_eq!(last.step, Some(4));
    assert!(ck.wait().unwrap().is_none(), "nothing pending any more");
    let seqs: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs.len(), 4);
    assert_eq!(*seqs.last().unwrap(), last.seq);
    for (i, seq) in seqs.iter().enumerate() {
        let m = store.verify(*seq).unwrap();
        assert_eq!(m.step, Some(i as u64 + 1), "steps in commit order");
    }
    drop(ck);
    let ck = open(tmp.path());
    let restored: u64 = ck.restore().unwrap().unwrap();
    assert_eq!(restored, 4);
    let r = ck.read_f32s("w.f32").unwrap();
    assert_eq!(
        r[0], 4.0,
        "the snapshot, not the state changed after the call"
    );
    assert_eq!(r[1..], w[1..]);
}

#[test]
fn a_synchronous_save_and_drop_wait_for_a_pending_async_save() {
    let tmp = tempdir();
    let store = ckpt::store::Store::new(tmp.path());
    let w = f32s(4_000_000, 3);
    let mut ck = open(tmp.path());
    ck.save_async_with(Some(1), |s| s.put_pod("w.f32", &w))
        .unwrap();
    let s2 = ck.save_at(2, &2u64).unwrap();
    let seqs: Vec<u64> = store.list().unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(seqs.len(), 2);
    assert_eq!(s2.seq, seqs[1], "the synchronous save came second");
    assert_eq!(store.verify(seqs[0]).unwrap().step, Some(1));
    // The outcome of the async save is still reported.
    assert_eq!(ck.wait().unwrap().unwrap().step, Some(1));
    ck.save_async_with(Some(3), |s| s.put_pod("w.f32", &w))
        .unwrap();
    drop(ck); // waits
    let newest = store.list().unwrap().last().unwrap().0;
    assert_eq!(store.verify(newest).unwrap().step, Some(3));
}

#[test]
fn a_failed_async_save_is_reported_by_wait_and_the_job_goes_on() {
    let tmp = tempdir();
    let mut ck = open(tmp.path());
    // A bad name fails while copying, before anything runs in the background.
    let err = ck
        .save_async_with(None, |s| s.put("../evil", b"x"))
        .unwrap_err();
    assert!(matches!(err, Error::Name(_)), "{err}");
    // The same name twice in one snapshot is refused too.
    let err = ck
        .save_async_with(None, |s| {
            s.put("a", b"1")?;
            s.put("a", b"2")
        })
        .unwrap_err();
    assert!(err.to_string().contains("already has"), "{err}");
    // The staging directory vanishes: the background commit fails, wait() says so.
    ck.save_async_with(Some(1), |s| s.put("a", b"1")).unwrap();
    ck.wait().unwrap().unwrap();
    std::fs::remove_dir_all(tmp.path().join(".ckpt/staging")).unwrap();
    ck.save_async_with(Some(2), |s| s.put("a", b"2")).unwrap();
    assert!(ck.wait().is_err());
    std::fs::create_dir(tmp.path().join(".ckpt/staging")).unwrap();
    ck.save_async_with(Some(3), |s| s.put("a", b"3")).unwrap();
    assert_eq!(ck.wait().unwrap().unwrap().step, Some(3));
}

#[test]
fn stopping_under_ckpt_run_waits_for_the_pending_background_save() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let mut child = ckpt()
        .args(["run", "--every", "off", "-q", "--grace", "20s", "--dir"])
        .arg(&dir)
        .arg("--")
        .arg(test_bin("async_saver"))
        .args(["--mib", "64"])
        .stdout(std::process::Stdio::piped())
        .spawn_guarded();
    wait_until(T, "the job to announce its client", || {
        !events(&dir, "hello").is_empty()
    });
    signal(child.id(), libc::SIGTERM);
    let st = wait_deadline(&mut child, T);
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(st.code(), Some(75), "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("stopped at step"))
        .unwrap_or_else(|| panic!("job output: {out}"));
    let step: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    // The checkpoint of the stop step is published and verifies: the job's exit waited.
    let store = ckpt::store::Store::new(&dir);
    let newest = store.list().unwrap().last().expect("a checkpoint").0;
    let m = store.verify(newest).unwrap();
    assert_eq!(m.step, Some(step), "{out}");
    assert!(m.total_bytes() > 64 << 20, "weights + the step");
    assert!(!events(&dir, "committed").is_empty());
    assert_no_survivors(&dir);
    // And it restores: the weights match the step.
    let ck = open(&dir);
    assert_eq!(ck.restore::<u64>().unwrap(), Some(step));
    let w = ck.read_f32s("weights.f32").unwrap();
    assert!(w.iter().all(|&x| x == step as f32));
}

/// Runs `job` under `ckpt run --every auto --mtbf 2h`, requests one checkpoint, stops it
/// (exit 75) and returns the supervisor's first `interval` event.
fn first_auto_interval(dir: &Path, job: &[&str]) -> serde_json::Value {
    let mut child = ckpt()
        .args(["run", "--every", "auto", "--mtbf", "2h", "-q", "--dir"])
        .arg(dir)
        .arg("--")
        .args(job)
        .spawn_guarded();
    wait_until(T, "the job to announce its client", || {
        !events(dir, "hello").is_empty()
    });
    signal(child.id(), libc::SIGUSR1);
    wait_until(T, "the interval choice", || {
        !events(dir, "interval").is_empty()
    });
    signal(child.id(), libc::SIGTERM);
    assert_eq!(wait_deadline(&mut child, T).code(), Some(75));
    assert_no_survivors(dir);
    events(dir, "interval").swap_remove(0)
}

#[test]
fn every_auto_picks_the_young_daly_interval_from_the_measured_save_and_logs_why() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let ev = &first_auto_interval(
        &dir,
        &[test_bin("async_saver").to_str().unwrap(), "--mib", "4"],
    );
    let cost = ev["cost_ms"].as_f64().unwrap() / 1e3;
    let every = ev["every_ms"].as_f64().unwrap() / 1e3;
    assert_eq!(ev["mtbf_source"], "given");
    assert_eq!(ev["mtbf_ms"], 7_200_000);
    let yd = (2.0 * cost.max(0.001) * 7200.0).sqrt();
    assert!(
        (ev["young_daly_ms"].as_f64().unwrap() / 1e3 - yd).abs() < 0.01,
        "{ev}"
    );
    assert!(every >= 30.0 && (every - yd.max(30.0)).abs() < 0.01, "{ev}");
    // The saves are asynchronous: C is the time the job was blocked, not the whole save.
    let blocked = ev["blocked_ms"]
        .as_u64()
        .expect("an async save reports blocked_ms");
    let save = ev["save_ms"].as_u64().unwrap();
    assert!(blocked <= save, "{ev}");
    assert_eq!(ev["cost_ms"].as_u64().unwrap(), blocked.max(1), "{ev}");
    assert_eq!(ev["cost_of"], "blocked", "{ev}");
    assert!(ev["floor_ms"].as_u64().unwrap() >= 2 * save, "{ev}");

    // A foreground save (saver test job): C is the whole save.
    let dir2 = tmp.path().join("fg");
    let progress = tmp.path().join("progress");
    let saver = test_bin("saver");
    let job = [
        saver.to_str().unwrap(),
        "--progress",
        progress.to_str().unwrap(),
        "--sizes",
        "100000",
        "--steps",
        "100000000",
    ];
    let ev = &first_auto_interval(&dir2, &job);
    assert!(ev["blocked_ms"].is_null(), "{ev}");
    assert_eq!(ev["cost_of"], "save", "{ev}");
    assert!(ev["floor_ms"].is_null(), "{ev}");
    assert_eq!(
        ev["cost_ms"].as_u64().unwrap(),
        ev["save_ms"].as_u64().unwrap().max(1),
        "{ev}"
    );
    assert_no_survivors(&dir2);

    // A bad combination is a usage error.
    let out = output_deadline(
        ckpt()
            .args(["run", "--every", "10m", "--mtbf", "1h", "--dir"])
            .arg(&dir)
            .args(["--", "true"]),
        T,
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
}

/// `ckpt save FILE` (the real binary) copies files bit-exactly at sizes around pages, chunks
/// and copy pieces, through the bulk path past the page cache (a cold source read with
/// `O_DIRECT` too), with `CKPT_DIRECT_IO=0` (all through the cache), and on tmpfs; the
/// checkpoint verifies. (ext4 and tmpfs have no reflinks: `copy_from` falls back to the copy.)
#[test]
fn save_file_copies_are_exact_on_the_direct_and_buffered_paths() {
    let chunk = ckpt::pod::CHUNK;
    let piece = ckpt::pod::COPY_PIECE;
    let sizes = [
        0,
        1,
        4095,
        4096,
        4097,
        chunk - 1,
        chunk + 4096 + 7,
        piece,
        piece + 12_345,
    ];
    let mut roots = vec![tempdir()];
    if Path::new("/dev/shm").is_dir() {
        roots.push(tempfile::tempdir_in("/dev/shm").unwrap());
    }
    for root in &roots {
        let src = root.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let mut files = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let p = src.join(format!("f{i}.bin"));
            let data: Vec<u8> = (0..n)
                .map(|j| ((j as u64 * 2_654_435_761 + i as u64) >> 7) as u8)
                .collect();
            std::fs::write(&p, &data).unwrap();
            files.push((p, data));
        }
        for direct in [None, Some("0")] {
            // A cold source (read past the page cache when direct I/O is on).
            for (p, d) in &files {
                if d.len() >= chunk {
                    uncache(p);
                }
            }
            let dir = root.path().join(format!("ck-{}", direct.unwrap_or("1")));
            let mut c = ckpt();
            c.arg("save").arg("--dir").arg(&dir).arg("--json");
            c.args(files.iter().map(|(p, _)| p));
            match direct {
                Some(v) => c.env("CKPT_DIRECT_IO", v),
                None => c.env_remove("CKPT_DIRECT_IO"),
            };
            let out = output_deadline(&mut c, T);
            assert!(out.status.success(), "ckpt save: {}", text(&out.stderr));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let seq = v["seq"].as_u64().unwrap();
            let m = ckpt::store::Store::new(&dir).verify(seq).unwrap();
            assert_eq!(m.files.len(), files.len());
            for (p, data) in &files {
                let name = p.file_name().unwrap();
                let got = std::fs::read(Path::new(v["path"].as_str().unwrap()).join(name)).unwrap();
                assert!(
                    got == *data,
                    "{} (CKPT_DIRECT_IO={direct:?}): {name:?} differs ({} bytes, {} read)",
                    root.path().display(),
                    data.len(),
                    got.len()
                );
            }
        }
    }
}

/// `ckpt bench` on the Rust client's bulk arrays (the default path) runs every measurement,
/// reports ratios against `dd` of the same bytes, the memory a save and a restore add, an
/// interval, and removes its work directory. No figure is asserted (docs/benchmarks.md).
#[test]
fn ckpt_bench_rust_path_reports_ratios_and_memory_and_cleans_up() {
    let t = tempdir();
    let out = output_deadline(
        ckpt()
            .args(["bench", "--size", "4MiB", "--runs", "2", "--json", "--dir"])
            .arg(t.path()),
        Duration::from_secs(240),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["size_bytes"], 4 << 20);
    let w = &v["write_gbps"];
    assert_eq!(
        w["ratio_per_round"].as_array().map(|a| a.len()),
        Some(2),
        "{v:#}"
    );
    assert!(w["ckpt_save"].as_f64().is_some_and(|x| x > 0.0), "{v:#}");
    let r = &v["read_gbps"];
    assert_eq!(
        r["ratio_per_round"].as_array().map(|a| a.len()),
        Some(2),
        "{v:#}"
    );
    assert_eq!(
        r["fresh_ratio_per_round"].as_array().map(|a| a.len()),
        Some(2),
        "{v:#}"
    );
    // The resume both ways: one read (`--restore-check client`) and the full check first.
    let res = &v["resume_gbps"];
    assert!(res["full_check"].as_f64().is_some_and(|x| x > 0.0), "{v:#}");
    assert_eq!(res["client_check"], r["ckpt_restore_into"], "{v:#}");
    assert_eq!(
        res["full_check_ratio_per_round"]
            .as_array()
            .map(|a| a.len()),
        Some(2),
        "{v:#}"
    );
    // Memory: the save's buffers above the state, the restore's into the job's buffer (from
    // the second round, when the buffer is touched) and above the state into fresh memory.
    let save = v["save_peak_extra_mib"]
        .as_f64()
        .expect("save_peak_extra_mib");
    assert!((0.0..256.0).contains(&save), "{v:#}");
    assert!(
        v["restore_peak_extra_mib"]["into"].as_f64().is_some(),
        "{v:#}"
    );
    assert!(
        v["restore_peak_extra_mib"]["fresh_above_state"]
            .as_f64()
            .is_some(),
        "{v:#}"
    );
    assert!(
        v["recommended_every_s"]["sync"]
            .as_f64()
            .is_some_and(|x| x > 0.0),
        "{v:#}"
    );
    let left: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
    assert!(left.is_empty(), "the bench left {left:?}");
}
