//! The direct restore into fresh memory (`pod::read_direct`, issue 19): two reader threads,
//! pieces k, k + 2, ... each, consumed in order. Exact at sizes of several pieces around the
//! piece size; damage in any piece (a flipped bit, a file cut at or inside a piece, a file
//! grown by a byte) is refused, past the page cache. No timing here (docs/benchmarks.md).

mod common;

use std::path::Path;
use std::time::Duration;

use ckpt::pod::CHUNK;
use ckpt::Checkpointer;
use common::*;

fn open(dir: &Path) -> Checkpointer {
    for k in ["CKPT_DIR", "CKPT_SOCKET", "CKPT_RESTORE", "CKPT_SIGNAL"] {
        assert!(
            std::env::var_os(k).is_none(),
            "run the tests without {k} set"
        );
    }
    Checkpointer::open(dir).expect("open")
}

/// Writes `file` back and drops it from the page cache (retried while a read-ahead holds
/// pages), so that the restore reads past the cache.
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
fn direct_restores_with_two_readers_are_exact_and_refuse_damage_in_any_piece() {
    ckpt::pod::set_direct_io(true);
    let seed = seed("direct-read");
    let mut rng = fastrand::Rng::with_seed(seed);
    let before = ckpt::pod::direct_reads();
    for len in [
        2 * CHUNK - 1,
        3 * CHUNK,
        3 * CHUNK + 4096 + 5,
        4 * CHUNK + 1,
        5 * CHUNK - 4096,
    ] {
        let tmp = tempdir();
        let data: Vec<u8> = (0..len).map(|_| rng.u8(..)).collect();
        let mut ck = open(tmp.path());
        let saved = ck
            .save_with(None, |st| st.write_large("blob", &data).map(|_| ()))
            .unwrap();
        drop(ck);
        let ck = open(tmp.path());
        let file = saved.path.join("blob");
        uncache(&file);
        assert!(ck.read_file("blob").unwrap() == data, "{len} bytes");
        let pieces = len.div_ceil(CHUNK);
        // A flipped bit in every piece in turn (the readers alternate pieces).
        for k in 0..pieces {
            let at = (k * CHUNK + rng.usize(..CHUNK)).min(len - 1);
            let mut bad = data.clone();
            bad[at] ^= 0x10;
            std::fs::write(&file, &bad).unwrap();
            uncache(&file);
            let err = ck.read_file("blob").unwrap_err();
            assert!(
                err.to_string().contains("checksum"),
                "{len} bytes, bit {at}: {err}"
            );
        }
        // Cut at a piece boundary, inside the second and the last piece, and grown by a byte.
        for cut in [CHUNK, CHUNK + 4096 + 3, len - 1, len + 1] {
            let mut v = data.clone();
            v.resize(cut, 7);
            std::fs::write(&file, &v).unwrap();
            uncache(&file);
            let err = ck.read_file("blob").unwrap_err();
            assert!(
                matches!(err, ckpt::Error::Invalid { .. }),
                "{len} bytes cut to {cut}: {err}"
            );
        }
        std::fs::write(&file, &data).unwrap();
        uncache(&file);
        assert!(ck.read_file("blob").unwrap() == data, "{len} bytes again");
    }
    assert!(
        ckpt::pod::direct_reads() > before,
        "no restore went past the page cache"
    );
}
