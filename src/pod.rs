//! Bulk numeric arrays (weights, optimizer moments) written and read as raw little-endian
//! bytes, in large chunks, with the checksum computed inline: no per-element serde.
//!
//! A file written with [`Stage::write_pod`] is an ordinary checkpoint file (opaque bytes in
//! the manifest): `n * size_of::<T>()` bytes, each element little-endian. Any client can read
//! it back (`numpy.fromfile(path, "<f4")`). On little-endian targets the slice itself is
//! written (a byte view, no copy); on big-endian targets elements are converted through one
//! reused buffer.
//!
//! Performance notes (measured figures in `docs/benchmarks.md`): whole pages are written
//! past the page cache (`O_DIRECT`, [`CHUNK`]-byte writes on a helper thread while the next
//! piece is checksummed; [`StageWriter::write_bulk`]), the last partial page and file systems
//! without `O_DIRECT` through the cache with write-behind (`sync_file_range`); a cold member
//! of at least [`CHUNK`] bytes is read past the page cache in [`DIRECT_PIECE`]-byte
//! `O_DIRECT` pieces by two reader threads, checksummed and copied into the destination
//! (streaming stores) by the caller's thread and a helper (`read_direct`); otherwise reads
//! go in [`CHUNK`]-byte `read(2)` calls straight into the destination with the checksum
//! computed behind them, or in [`BOUNCE`]-byte reads through a page-aligned scratch buffer
//! when the destination sits where the kernel copies slowly (`read_verified`); a fresh
//! destination has its pages faulted in by a helper thread (`read_verified_fresh`).

use std::fs::File;
use std::io;
use std::path::Path;

use crate::error::{Error, Invalid, Result};
use crate::store::manifest::FileEntry;
use crate::store::{Algo, Stage, StageWriter};

/// Size of one `write(2)`/`read(2)` of the bulk paths: large enough to amortise the
/// syscall and the write-behind hint, small enough to stay in cache for the checksum.
pub const CHUNK: usize = 8 << 20;

/// Environment variable: `0` makes bulk writes and large restores go through the page cache
/// (no `O_DIRECT`), for a file system whose `O_DIRECT` misbehaves; see [`direct_io`].
pub const ENV_DIRECT_IO: &str = "CKPT_DIRECT_IO";

static DIRECT_IO: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether bulk writes ([`StageWriter::write_bulk`]: their whole pages) and large restores
/// into fresh memory (members of at least [`CHUNK`] bytes not already in the page cache, read
/// by `read_file`, `read_pod`, `read_f32s`) bypass the page cache
/// (`O_DIRECT`, with a buffered fallback where the file system refuses it): yes unless
/// [`ENV_DIRECT_IO`] is `0` or [`set_direct_io`] said no.
pub fn direct_io() -> bool {
    use std::sync::atomic::Ordering;
    match DIRECT_IO.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var(ENV_DIRECT_IO).map_or(true, |v| v.trim() != "0");
            DIRECT_IO.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Overrides [`direct_io`] for this process (tests and benchmarks compare both paths).
pub fn set_direct_io(on: bool) {
    DIRECT_IO.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Alignment of offsets, lengths and buffers for `O_DIRECT` reads and writes: a page, which
/// satisfies 512-byte and 4 KiB logical blocks alike (a device that wants more refuses the
/// first direct write or read with `EINVAL`, and ckpt goes back to the page cache).
pub(crate) const DIRECT_ALIGN: usize = 4096;

/// Size of one read through the page-aligned scratch buffer of `read_verified` when the
/// destination is at a slow alignment: small enough to stay in cache for the copy out.
pub const BOUNCE: usize = 4 << 20;

/// Plain numeric types whose every bit pattern is valid: they can be viewed as bytes and
/// filled from bytes.
///
/// # Safety
/// Implementors must be `Copy`, have no padding and no invalid bit patterns.
pub unsafe trait Pod: Copy + Send + Sync + 'static {
    /// The element's bytes in little-endian order, into `out` (`size_of::<Self>()` bytes).
    fn put_le(self, out: &mut [u8]);
    /// Converts an element read as little-endian bytes in native memory to native order.
    fn le_to_native(self) -> Self;
}

macro_rules! pod {
    ($($t:ty),*) => {$(
        unsafe impl Pod for $t {
            #[inline]
            fn put_le(self, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            #[inline]
            fn le_to_native(self) -> Self {
                <$t>::from_le_bytes(self.to_ne_bytes())
            }
        }
    )*};
}
pod!(u8, i8, u16, i16, u32, i32, u64, i64, u128, i128, f32, f64);

/// The bytes of a slice of plain numbers (native order).
pub fn as_bytes<T: Pod>(s: &[T]) -> &[u8] {
    // SAFETY: Pod types have no padding; the length is the slice's size in bytes.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// The bytes of a mutable slice of plain numbers (native order); any bytes written are a
/// valid value.
pub fn as_bytes_mut<T: Pod>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as above, and every bit pattern is a valid Pod value.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Calls `f` with consecutive little-endian byte chunks of `data` (at most [`CHUNK`] bytes
/// each, whole elements). On little-endian targets these are views of `data` itself.
pub(crate) fn le_chunks<T: Pod>(
    data: &[T],
    mut f: impl FnMut(&[u8]) -> io::Result<()>,
) -> io::Result<()> {
    let per = (CHUNK / std::mem::size_of::<T>().max(1)).max(1);
    if cfg!(target_endian = "little") {
        for c in data.chunks(per) {
            f(as_bytes(c))?;
        }
    } else {
        let sz = std::mem::size_of::<T>();
        let mut buf = vec![0u8; per.min(data.len()) * sz];
        for c in data.chunks(per) {
            let out = &mut buf[..std::mem::size_of_val(c)];
            for (x, o) in c.iter().zip(out.chunks_exact_mut(sz)) {
                x.put_le(o);
            }
            f(out)?;
        }
    }
    Ok(())
}

impl StageWriter<'_> {
    /// Appends `data` as little-endian bytes in [`CHUNK`]-sized writes (checksum inline),
    /// bypassing the page cache where the file system allows it
    /// ([`StageWriter::write_bulk`]).
    pub fn write_pod<T: Pod>(&mut self, data: &[T]) -> io::Result<()> {
        le_chunks(data, |b| self.write_bulk(b))
    }
}

impl Stage {
    /// Writes a whole file from a slice of plain numbers (little-endian bytes), streaming in
    /// [`CHUNK`]-byte writes with the checksum inline and write-behind. Returns the size.
    /// The fastest way to save weights and optimizer state.
    pub fn write_pod<T: Pod>(&mut self, name: &str, data: &[T]) -> Result<u64> {
        let mut w = self.create(name)?;
        w.write_pod(data)
            .map_err(|e| Error::io("write", w.file_path(), e))?;
        w.finish()
    }

    /// [`Stage::write_pod`] for `f32` arrays.
    pub fn write_f32s(&mut self, name: &str, data: &[f32]) -> Result<u64> {
        self.write_pod(name, data)
    }

    /// [`Stage::write_pod`] for `f64` arrays.
    pub fn write_f64s(&mut self, name: &str, data: &[f64]) -> Result<u64> {
        self.write_pod(name, data)
    }

    /// Writes a whole file from bytes through the streaming path ([`CHUNK`]-byte writes,
    /// checksum inline, write-behind). Prefer it to [`Stage::write_file`] above a few MiB.
    pub fn write_large(&mut self, name: &str, data: &[u8]) -> Result<u64> {
        self.write_pod(name, data)
    }
}

/// Whether `read(2)` straight into memory at `addr` hits the slow kernel copy: the page
/// cache hands out page-aligned data, and the kernel's `copy_to_user` (`rep movsb` on CPUs
/// with FSRM) runs several times slower when the destination sits 1..63 bytes past a page
/// boundary (measured on AMD EPYC: about 1.5 GB/s at +1..+31 against 7-11 GB/s at +0 or
/// +32..+4095; `docs/benchmarks.md`). glibc places every large allocation (`Vec` of more
/// than 128 KiB) exactly 16 bytes past a page boundary, so this is the common case for a
/// job's arrays, not a corner case.
pub(crate) fn slow_copy_alignment(addr: *const u8) -> bool {
    (1..64).contains(&(addr as usize % 4096))
}

/// A page-aligned scratch buffer of `len` bytes (the kernel copies into it at full speed;
/// the user-space copy out of it does not care about alignment).
pub(crate) struct Bounce {
    buf: Vec<u8>,
    off: usize,
    len: usize,
}

impl Bounce {
    pub(crate) fn new(len: usize) -> Bounce {
        let buf = vec![0u8; len + DIRECT_ALIGN];
        let off = buf.as_ptr().align_offset(DIRECT_ALIGN);
        Bounce { buf, off, len }
    }
    pub(crate) fn get(&mut self) -> &mut [u8] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// How far ahead of the reader a restore through the page cache reads ([`prefetch`]).
pub const READ_AHEAD: u64 = 32 << 20;

/// Reads `file` ahead of a restore, on a helper thread: [`CHUNK`]-byte positional reads
/// into a scratch buffer (thrown away), up to [`READ_AHEAD`] bytes past `progress` (what
/// the reader has consumed; `u64::MAX` when it stops), parking in between. The kernel's own
/// read-ahead stays at most `read_ahead_kb` ahead of a sequential reader, so the disk idled
/// while the reader copied and checksummed a chunk; the prefetcher keeps it busy, and
/// because it reads like any reader, the kernel fills the cache with large folios.
/// `POSIX_FADV_WILLNEED` for the same window was tried first: its pages are added one by one,
/// and `ckpt bench` restored 256 MiB at 0.57-0.72 x cold `dd` with it against 0.98-1.08 with
/// this thread (1 GiB: 0.67 against 1.00-1.21; median per-round ratios, `docs/benchmarks.md`
/// run G).
fn prefetch(file: &File, len: u64, progress: &std::sync::atomic::AtomicU64) {
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::Ordering;
    let mut scratch = Bounce::new(CHUNK);
    let mut off = 0u64;
    while off < len {
        let done = progress.load(Ordering::Acquire);
        if done == u64::MAX {
            return;
        }
        if off >= done.saturating_add(READ_AHEAD) {
            // Woken by the reader after each chunk; the timeout only bounds a missed wake-up.
            std::thread::park_timeout(std::time::Duration::from_millis(5));
            continue;
        }
        match file.read_at(scratch.get(), off) {
            Ok(0) | Err(_) => return, // the reader meets the end or the error itself
            Ok(n) => off += n as u64,
        }
    }
}

/// Faults in the pages of `len` bytes at `addr` (writable, contents unchanged) with
/// `MADV_POPULATE_WRITE`, [`CHUNK`] bytes per call; stops at the first error (kernels before
/// 5.14 do not know the advice: the reader then faults the pages in itself, as before).
fn prefault(addr: usize, len: usize) {
    #[cfg(target_os = "linux")]
    {
        let start = (addr + 4095) & !4095;
        let end = (addr + len) & !4095;
        let mut at = start;
        while at < end {
            let n = CHUNK.min(end - at);
            // SAFETY: the range lies inside a live buffer this process owns for the whole
            // read; MADV_POPULATE_WRITE only maps its pages, it never changes their contents.
            if unsafe { libc::madvise(at as *mut libc::c_void, n, libc::MADV_POPULATE_WRITE) } != 0
            {
                return;
            }
            at += n;
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (addr, len);
}

/// [`read_verified`] into a buffer just allocated for it (never touched: every page would be
/// faulted in by the kernel's copy, one at a time, on the reading thread). A helper thread
/// faults the pages in ahead of the reader (`MADV_POPULATE_WRITE`), so that this work runs
/// next to the reads instead of in series with them: a fresh 1 GiB restore went from 1.17
/// to 1.96 GB/s warm on this VM (`docs/benchmarks.md`).
pub(crate) fn read_verified_fresh(
    file: &mut File,
    path: &Path,
    entry: &FileEntry,
    algo: Algo,
    dest: &mut [u8],
) -> Result<()> {
    read_verified_opt(file, path, entry, algo, dest, true)
}

/// Reads the member `entry` of checkpoint `dir` into `dest` (exactly `entry.size` bytes),
/// verifying size and checksum inline. The checksum of chunk i runs on a helper thread while
/// chunk i+1 is read, so verification costs no extra time on a multi-core machine.
/// A helper reads up to [`READ_AHEAD`] bytes ahead of the reader ([`prefetch`]).
///
/// When `dest` starts at an address the kernel copies into slowly
/// ([`slow_copy_alignment`], e.g. any large `Vec` from glibc), each chunk is read into a
/// page-aligned buffer of [`BOUNCE`] bytes and copied into `dest` in user space: two fast
/// copies instead of one slow one (1 GiB restore: 0.6 s of kernel copy -> about 0.2 s).
pub(crate) fn read_verified(
    file: &mut File,
    path: &Path,
    entry: &FileEntry,
    algo: Algo,
    dest: &mut [u8],
) -> Result<()> {
    read_verified_opt(file, path, entry, algo, dest, false)
}

fn read_verified_opt(
    file: &mut File,
    path: &Path,
    entry: &FileEntry,
    algo: Algo,
    dest: &mut [u8],
    fresh: bool,
) -> Result<()> {
    let inval = |reason| Error::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    debug_assert_eq!(dest.len() as u64, entry.size);
    let len = file
        .metadata()
        .map_err(|e| Error::io("inspect", path.join(&entry.name), e))?
        .len();
    if len != entry.size {
        return Err(inval(Invalid::Size {
            name: entry.name.clone(),
            expected: entry.size,
            actual: len,
        }));
    }
    let member = path.join(&entry.name);
    let got = match read_direct(file, dest, algo, fresh) {
        Some(got) => got,
        None => read_buffered(file, dest, algo, fresh),
    };
    let (sum, read_err, short_at) = (got.sum, got.err, got.short_at);
    if let Some(e) = read_err {
        return Err(Error::io("read", member, e));
    }
    if let Some(actual) = short_at {
        return Err(inval(Invalid::Size {
            name: entry.name.clone(),
            expected: entry.size,
            actual,
        }));
    }
    // Nothing may follow (the file grew after the size check).
    let mut one = [0u8; 1];
    if got.more
        || matches!(std::os::unix::fs::FileExt::read_at(&*file, &mut one, entry.size), Ok(n) if n > 0)
    {
        return Err(inval(Invalid::Size {
            name: entry.name.clone(),
            expected: entry.size,
            actual: entry.size + 1,
        }));
    }
    if sum != entry.sum {
        return Err(inval(Invalid::Checksum {
            name: entry.name.clone(),
            expected: entry.sum,
            actual: sum,
        }));
    }
    Ok(())
}

/// Restores that went past the page cache in this process (for tests and benchmarks).
static DIRECT_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many restores of this process read past the page cache ([`direct_io`]).
#[doc(hidden)]
pub fn direct_reads() -> u64 {
    DIRECT_READS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether the page cache already holds the start and the middle of `file` (`len` bytes):
/// a 64 KiB `preadv2(RWF_NOWAIT)` at each succeeds only from the cache. A cached file is
/// read through the cache (memory speed), anything else past it.
fn cached(file: &File, len: usize) -> bool {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        let mut probe = vec![0u8; 64 << 10];
        [0, (len / 2) & !(DIRECT_ALIGN - 1)].iter().all(|&off| {
            let want = probe.len().min(len - off);
            let iov = libc::iovec {
                iov_base: probe.as_mut_ptr().cast(),
                iov_len: want,
            };
            // SAFETY: one iovec over a live buffer of `want` bytes.
            let n = unsafe {
                libc::preadv2(
                    file.as_raw_fd(),
                    &iov,
                    1,
                    off as libc::off_t,
                    libc::RWF_NOWAIT,
                )
            };
            n == want as isize
        })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, len);
        true
    }
}

/// Sets `O_DIRECT` on an open descriptor, and clears it again when dropped.
struct DirectMode<'a> {
    file: &'a File,
    flags: libc::c_int,
}

impl<'a> DirectMode<'a> {
    /// `None` where the file system refuses `O_DIRECT` (tmpfs before Linux 6.6, some FUSE).
    fn set(file: &'a File) -> Option<DirectMode<'a>> {
        use std::os::unix::io::AsRawFd;
        // SAFETY: fcntl on an open descriptor with integer arguments.
        let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
        if flags < 0
            || unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_DIRECT) } != 0
        {
            return None;
        }
        Some(DirectMode { file, flags })
    }
}

impl Drop for DirectMode<'_> {
    fn drop(&mut self) {
        use std::os::unix::io::AsRawFd;
        // SAFETY: as in `set`.
        unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETFL, self.flags) };
    }
}

/// Reader threads of a direct restore, each with one [`DIRECT_PIECE`]-byte read in flight
/// (pieces k, k + readers, ...). Run J (`docs/benchmarks.md`, `readab`, 6 interleaved
/// rounds, load 4-7): into the job's memory two readers ran at a median 0.94 x a cold `dd
/// bs=4M iflag=direct` of the same round, one reader at 0.88.
const DIRECT_READERS: usize = 2;
/// Buffers per reader: one being read, the others ready or being copied out and checksummed
/// (slack for a consumer that the scheduler holds back on a loaded machine).
const DIRECT_BUFFERS: usize = 3;
/// Bytes per direct read of a restore (was [`CHUNK`], 8 MiB, up to run I).
pub const DIRECT_PIECE: usize = 4 << 20;
/// The checksum and the copy into the destination go by this many bytes at a time, so that
/// the copy reads what the checksum just brought into the L2 cache (one pass over the
/// buffer from memory instead of two).
const DIRECT_STEP: usize = 256 << 10;
/// Threads that copy the pieces of a direct restore into the destination and checksum them
/// (run M): the caller's and one helper, each taking the pieces of its own readers (the
/// pieces' checksums combined in file order), so that on a loaded machine the CPU work of a
/// restore is not held up behind one thread's turn on a core; one on a one-CPU machine.
const DIRECT_WORKERS: usize = 2;

static READERS_NOW: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(DIRECT_READERS);
/// 0: the default ([`DIRECT_WORKERS`], one on a single CPU).
static WORKERS_NOW: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static STREAMING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Sets the number of reader threads of a direct restore (1..=4; the default is
/// [`DIRECT_READERS`]), for benchmarks comparing them (`test-programs` `readab`).
#[doc(hidden)]
pub fn set_direct_readers(n: usize) {
    READERS_NOW.store(n.clamp(1, 4), std::sync::atomic::Ordering::Relaxed);
}

/// Sets how many threads copy and checksum the pieces of a direct restore (1..=4, at most one
/// per reader; 0 = the default, [`DIRECT_WORKERS`] or one on a single CPU) and whether the
/// copy uses non-temporal stores (the default; off with one worker = run J's reader), for
/// benchmarks and tests comparing them (`readab`).
#[doc(hidden)]
pub fn set_direct_workers(n: usize, streaming: bool) {
    WORKERS_NOW.store(n.min(4), std::sync::atomic::Ordering::Relaxed);
    STREAMING.store(streaming, std::sync::atomic::Ordering::Relaxed);
}

fn direct_workers(readers: usize) -> usize {
    let n = match WORKERS_NOW.load(std::sync::atomic::Ordering::Relaxed) {
        0 => {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            if cpus > 1 {
                DIRECT_WORKERS
            } else {
                1
            }
        }
        n => n,
    };
    n.clamp(1, readers)
}

/// Copies `src` into `dst` (same length) with non-temporal stores on x86-64 (the
/// destination's cache lines are written without being read first, and do not push the
/// buffers out of the cache): 1 GiB of copy + crc32c in 256 KiB steps took 0.16 s instead of
/// 0.22 s on this VM's CPU (`docs/benchmarks.md` run M). Elsewhere a plain copy. The caller
/// runs [`store_fence`] before another thread may read `dst`.
pub(crate) fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
        let n = dst.len();
        let (d, s) = (dst.as_mut_ptr(), src.as_ptr());
        // Plain stores up to the first 64-byte boundary of the destination, then whole cache
        // lines of streaming stores (16-byte aligned), then the tail.
        let head = (d as usize).wrapping_neg() % 64;
        let head = head.min(n);
        // SAFETY: both slices are `n` bytes long and do not overlap (one is borrowed mutably);
        // every access below stays inside [0, n); `_mm_stream_si128` gets 16-byte aligned
        // addresses (d + i with d + head 64-byte aligned and i - head a multiple of 64); SSE2
        // is part of x86-64.
        unsafe {
            std::ptr::copy_nonoverlapping(s, d, head);
            let mut i = head;
            while i + 64 <= n {
                let a = _mm_loadu_si128(s.add(i).cast::<__m128i>());
                let b = _mm_loadu_si128(s.add(i + 16).cast::<__m128i>());
                let c = _mm_loadu_si128(s.add(i + 32).cast::<__m128i>());
                let e = _mm_loadu_si128(s.add(i + 48).cast::<__m128i>());
                _mm_stream_si128(d.add(i).cast::<__m128i>(), a);
                _mm_stream_si128(d.add(i + 16).cast::<__m128i>(), b);
                _mm_stream_si128(d.add(i + 32).cast::<__m128i>(), c);
                _mm_stream_si128(d.add(i + 48).cast::<__m128i>(), e);
                i += 64;
            }
            std::ptr::copy_nonoverlapping(s.add(i), d.add(i), n - i);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// Orders the streaming stores of [`copy_streaming`] before anything this thread does next
/// (a channel send, a thread's end): another thread then sees the copied bytes.
pub(crate) fn store_fence() {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: SSE is part of x86-64; a fence has no other effect.
    unsafe {
        std::arch::x86_64::_mm_sfence()
    };
}

/// One piece of a direct restore as a worker consumed it.
struct PieceDone {
    /// Piece index (its offset is `k * DIRECT_PIECE`).
    k: usize,
    /// Bytes read into the buffer (may exceed what the member has left: it grew).
    n: usize,
    /// Bytes copied into the destination.
    take: usize,
    err: Option<io::Error>,
    /// Checksum of the copied bytes.
    h: crate::store::manifest::Hasher,
}

/// The read pass past the page cache, for a member of at least [`CHUNK`] bytes not in the
/// cache, into fresh memory (`read_file`, `read_pod`, `read_f32s`) or memory the job owns
/// (`read_into`, `read_pod_into`): [`DIRECT_READERS`] helper threads read
/// [`DIRECT_PIECE`]-byte pieces with `O_DIRECT` into page-aligned buffers, back to back,
/// while [`DIRECT_WORKERS`] threads (this one and a helper, each serving its own readers)
/// checksum each finished piece and copy it into `dest` ([`copy_streaming`]), [`DIRECT_STEP`]
/// bytes at a time; the pieces' checksums are combined in file order; for fresh memory a
/// further helper faults `dest` in ahead. (The reads cannot go straight into `dest`:
/// `O_DIRECT` wants 512-byte aligned memory, and glibc puts every large allocation 16 bytes
/// past a page.) No page-cache page is allocated: a fresh restore pays for one set of new
/// pages instead of two, a restore into the job's memory for none. Extra memory:
/// [`DIRECT_BUFFERS`] buffers per reader (24 MiB).
/// `None`: not applicable or refused (the caller reads through the cache); a refusal of the
/// first read falls back the same way.
fn read_direct(file: &File, dest: &mut [u8], algo: Algo, fresh: bool) -> Option<Filled> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let len = dest.len();
    if !direct_io() || len < CHUNK || cached(file, len) {
        return None;
    }
    let _direct = DirectMode::set(file)?;
    let (addr, total) = (dest.as_ptr() as usize, len);
    // (buffer, offset, bytes read, error)
    type Piece = (Bounce, usize, usize, Option<io::Error>);
    let readers = READERS_NOW.load(Ordering::Relaxed);
    let workers = direct_workers(readers);
    let streaming = STREAMING.load(Ordering::Relaxed);
    // The first piece at which a worker met the end of what can be read (an error, a short
    // piece): no worker goes past it.
    let stop = AtomicUsize::new(usize::MAX);
    let done_all = std::thread::scope(|s| {
        if fresh {
            s.spawn(move || prefault(addr, total));
        }
        // Worker w serves readers w, w + workers, ...: (reader, its free-buffer sender, its
        // full-piece receiver).
        type Lane = (
            usize,
            std::sync::mpsc::SyncSender<Bounce>,
            std::sync::mpsc::Receiver<Piece>,
        );
        let mut lanes: Vec<Vec<Lane>> = (0..workers).map(|_| Vec::new()).collect();
        for r in 0..readers {
            let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Bounce>(DIRECT_BUFFERS);
            let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Piece>(DIRECT_BUFFERS);
            for _ in 0..DIRECT_BUFFERS {
                let _ = free_tx.send(Bounce::new(DIRECT_PIECE));
            }
            lanes[r % workers].push((r, free_tx, full_rx));
            s.spawn(move || {
                let mut off = r * DIRECT_PIECE;
                for mut b in free_rx {
                    if off >= len {
                        return;
                    }
                    // Whole pages: the last piece asks for up to a page more than the member
                    // has (a direct read stops at the end of the file; more than asked = it
                    // grew).
                    let want = DIRECT_PIECE
                        .min(len - off)
                        .next_multiple_of(DIRECT_ALIGN)
                        .min(DIRECT_PIECE);
                    let (n, err) = fill_at(file, &mut b.get()[..want], off);
                    let last = err.is_some() || off + n >= len || n < want;
                    if full_tx.send((b, off, n, err)).is_err() || last {
                        return;
                    }
                    off += readers * DIRECT_PIECE;
                }
            });
        }
        // Each worker gets the destination's pieces of its own readers (disjoint ranges).
        let dest_addr = dest.as_mut_ptr() as usize;
        let stop = &stop;
        let work = move |lanes: Vec<Lane>| -> Vec<PieceDone> {
            let mut out = Vec::new();
            // The pieces of these lanes' readers, in order.
            for k in (0..).filter(|k| lanes.iter().any(|l| l.0 == k % readers)) {
                if k > stop.load(Ordering::Relaxed) {
                    break;
                }
                let lane = lanes.iter().find(|l| l.0 == k % readers).expect("a lane");
                let Ok((mut b, off, n, err)) = lane.2.recv() else {
                    break;
                };
                debug_assert_eq!(off, k * DIRECT_PIECE);
                let take = n.min(len - off);
                // SAFETY: [off, off + take) lies inside `dest` (take <= len - off), and piece
                // k is consumed by this worker only: no two workers touch the same bytes, and
                // `dest` stays borrowed for the whole scope.
                let d = unsafe {
                    std::slice::from_raw_parts_mut((dest_addr as *mut u8).add(off), take)
                };
                let mut h = algo.hasher();
                for (d, src) in d
                    .chunks_mut(DIRECT_STEP)
                    .zip(b.get()[..take].chunks(DIRECT_STEP))
                {
                    if streaming {
                        h.update(src);
                        copy_streaming(d, src);
                    } else {
                        d.copy_from_slice(src);
                        h.update(src);
                    }
                }
                let cut = err.is_some() || n < DIRECT_PIECE.min(len - off);
                let last = off + take >= len;
                out.push(PieceDone { k, n, take, err, h });
                if cut {
                    stop.fetch_min(k, Ordering::Relaxed);
                }
                if cut || last {
                    break;
                }
                // The reader may be gone already (it stops after its last piece).
                let _ = lane.1.send(b);
            }
            store_fence();
            // Dropping the lanes stops their readers.
            out
        };
        let mut lanes = lanes.into_iter();
        let mine = lanes.next().expect("one worker at least");
        let helpers: Vec<_> = lanes.map(|l| s.spawn(move || work(l))).collect();
        let mut all = work(mine);
        for h in helpers {
            all.extend(h.join().expect("a restore worker panicked"));
        }
        all
    });
    let mut pieces = done_all;
    pieces.sort_by_key(|p| p.k);
    let mut h = algo.hasher();
    let mut got = Filled {
        sum: 0,
        err: None,
        short_at: None,
        more: false,
    };
    let mut done = 0;
    for (want_k, p) in pieces.into_iter().enumerate() {
        if p.k != want_k {
            break; // a piece before it was not read: short (below)
        }
        let off = p.k * DIRECT_PIECE;
        h.combine(&p.h);
        done = off + p.take;
        if let Some(e) = p.err {
            if off == 0 && e.raw_os_error() == Some(libc::EINVAL) {
                return None; // O_DIRECT accepted, then refused: read through the cache
            }
            got.err = Some(e);
            break;
        }
        if p.n > p.take {
            got.more = true;
        }
        if done >= len {
            break;
        }
        if p.n < DIRECT_PIECE.min(len - off) {
            got.short_at = Some(done as u64);
            break;
        }
    }
    if got.err.is_none() && got.short_at.is_none() && done < len {
        got.short_at = Some(done as u64);
    }
    got.sum = h.finish();
    DIRECT_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Some(got)
}

/// Size of one source read of [`copy_into`]: several [`CHUNK`]s, so that
/// [`StageWriter::write_bulk`] overlaps the checksum of one chunk with the write of the
/// previous one inside each piece.
pub const COPY_PIECE: usize = 2 * CHUNK;

/// Pieces of a [`copy_into`] in flight: one being read, one being written, one ready.
const COPY_BUFFERS: usize = 3;

/// Why [`copy_into`] stopped.
#[derive(Debug)]
pub(crate) enum CopyError {
    /// Reading the source failed.
    Read(io::Error),
    /// Writing the checkpoint file failed.
    Write(io::Error),
}

/// Copies all of `input` into `w` (`ckpt save FILE`, [`Stage::copy_bytes`]): a helper thread
/// reads [`COPY_PIECE`]-byte pieces into page-aligned buffers (with `O_DIRECT` when the
/// source is at least [`CHUNK`] bytes and not in the page cache, so a cold source allocates
/// no cache pages; a refusal falls back to the cache), while this thread hands each piece to
/// [`StageWriter::write_bulk`]: whole pages past the page cache, checksum overlapped, the
/// last partial page through the cache. Returns the bytes copied.
pub(crate) fn copy_into(
    input: &File,
    w: &mut StageWriter<'_>,
) -> std::result::Result<u64, CopyError> {
    let len = input.metadata().map_err(CopyError::Read)?.len() as usize;
    let direct = (direct_io() && len >= CHUNK && !cached(input, len))
        .then(|| DirectMode::set(input))
        .flatten();
    let is_direct = std::sync::atomic::AtomicBool::new(direct.is_some());
    let piece = COPY_PIECE.min(len.next_multiple_of(DIRECT_ALIGN).max(DIRECT_ALIGN));
    // (buffer, bytes read, error)
    type Piece = (Bounce, usize, Option<io::Error>);
    std::thread::scope(|s| {
        let (free_tx, free_rx) = std::sync::mpsc::sync_channel::<Bounce>(COPY_BUFFERS);
        let (full_tx, full_rx) = std::sync::mpsc::sync_channel::<Piece>(COPY_BUFFERS);
        for _ in 0..COPY_BUFFERS.min(len.div_ceil(piece).max(1) + 1) {
            let _ = free_tx.send(Bounce::new(piece));
        }
        let is_direct = &is_direct;
        s.spawn(move || {
            let mut off = 0;
            for mut b in free_rx {
                let (mut n, mut err) = fill_at(input, b.get(), off);
                if err.as_ref().and_then(|e| e.raw_os_error()) == Some(libc::EINVAL)
                    && is_direct.swap(false, std::sync::atomic::Ordering::Relaxed)
                {
                    // O_DIRECT accepted at open, refused on reading: through the cache.
                    clear_direct(input);
                    let (m, e) = fill_at(input, &mut b.get()[n..], off + n);
                    (n, err) = (n + m, e);
                }
                let last = err.is_some() || n < piece;
                if full_tx.send((b, n, err)).is_err() || last {
                    return;
                }
                off += n;
            }
        });
        let mut total = 0u64;
        for (mut b, n, err) in full_rx.iter() {
            if n > 0 {
                w.write_bulk(&b.get()[..n]).map_err(CopyError::Write)?;
                total += n as u64;
            }
            if let Some(e) = err {
                return Err(CopyError::Read(e));
            }
            if n < piece {
                break;
            }
            // The reader may be gone already (it stops after the last piece).
            let _ = free_tx.send(b);
        }
        Ok(total)
    })
}

/// Clears `O_DIRECT` on an open descriptor.
fn clear_direct(file: &File) {
    use std::os::unix::io::AsRawFd;
    // SAFETY: fcntl on an open descriptor with integer arguments.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_DIRECT);
        }
    }
}

/// Fills `buf` from `file` at `off` until it is full or the file ends (positional reads);
/// returns the bytes read and the error that stopped it, if any.
fn fill_at(file: &File, buf: &mut [u8], off: usize) -> (usize, Option<io::Error>) {
    use std::os::unix::fs::FileExt;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], (off + filled) as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (filled, Some(e)),
        }
    }
    (filled, None)
}

/// What a read pass over a member produced.
struct Filled {
    /// Checksum of the bytes read into the destination.
    sum: u32,
    /// The read error that stopped it.
    err: Option<io::Error>,
    /// The file ended after this many bytes, before the destination was full.
    short_at: Option<u64>,
    /// The file went on past the destination's end.
    more: bool,
}

/// The read pass through the page cache: [`CHUNK`] reads (or [`BOUNCE`] reads through an
/// aligned buffer), a [`prefetch`] thread [`READ_AHEAD`] bytes ahead, checksums on a helper
/// thread.
fn read_buffered(file: &File, dest: &mut [u8], algo: Algo, fresh: bool) -> Filled {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::io::AsRawFd;
        // SAFETY: a hint on an open descriptor.
        unsafe {
            libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
        }
    }
    let mut read_err: Option<io::Error> = None;
    let mut short_at: Option<u64> = None;
    let mut bounce = slow_copy_alignment(dest.as_ptr()).then(|| Bounce::new(BOUNCE));
    let step = if bounce.is_some() { BOUNCE } else { CHUNK };
    let (addr, len) = (dest.as_ptr() as usize, dest.len());
    let progress = std::sync::atomic::AtomicU64::new(0);
    let sum = std::thread::scope(|s| {
        if fresh && len > CHUNK {
            s.spawn(move || prefault(addr, len));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel::<&[u8]>(4);
        let summer = s.spawn(move || {
            let mut h = algo.hasher();
            for c in rx {
                h.update(c);
            }
            h.finish()
        });
        let mut done = 0u64;
        // A second descriptor for the prefetcher (none if the process is out of them: the
        // restore then runs without it). Not for a member already in the page cache: there
        // it would only copy every byte once more.
        let ahead = (len > 2 * step && !cached(file, len))
            .then(|| file.try_clone().ok())
            .flatten()
            .map(|f| {
                let p = &progress;
                s.spawn(move || prefetch(&f, len as u64, p))
            });
        for chunk in dest.chunks_mut(step) {
            progress.store(done, std::sync::atomic::Ordering::Release);
            if let Some(t) = &ahead {
                t.thread().unpark();
            }
            let (filled, err) = match &mut bounce {
                Some(b) => {
                    let b = &mut b.get()[..chunk.len()];
                    let (n, err) = fill_at(file, b, done as usize);
                    chunk[..n].copy_from_slice(&b[..n]);
                    (n, err)
                }
                None => fill_at(file, chunk, done as usize),
            };
            done += filled as u64;
            if err.is_some() || filled < chunk.len() {
                read_err = err;
                short_at = Some(done);
                break;
            }
            let c: &[u8] = chunk;
            if tx.send(c).is_err() {
                break;
            }
        }
        progress.store(u64::MAX, std::sync::atomic::Ordering::Release);
        if let Some(t) = &ahead {
            t.thread().unpark();
        }
        drop(tx);
        summer.join().unwrap_or(0)
    });
    Filled {
        sum,
        err: read_err,
        short_at,
        more: false,
    }
}

/// Converts elements read as little-endian bytes to native order (a no-op on little-endian).
pub(crate) fn fix_endian<T: Pod>(data: &mut [T]) {
    if cfg!(target_endian = "big") {
        for x in data {
            *x = x.le_to_native();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The streaming copy is exact at every alignment of source and destination around a
    /// cache line and at lengths around the 64-byte blocks (head, body, tail), and writes
    /// nothing outside the destination.
    #[test]
    fn copy_streaming_is_exact_at_every_alignment_and_length() {
        let src: Vec<u8> = (0..9000u32).map(|i| (i * 131 + i / 7) as u8).collect();
        let mut buf = vec![0u8; 9300];
        for so in 0..70 {
            for dof in 0..70 {
                for n in [
                    0,
                    1,
                    15,
                    16,
                    63,
                    64,
                    65,
                    127,
                    128,
                    129,
                    200,
                    4096 + 33,
                    8191,
                ] {
                    buf.fill(0xEE);
                    copy_streaming(&mut buf[dof..dof + n], &src[so..so + n]);
                    store_fence();
                    assert_eq!(
                        &buf[dof..dof + n],
                        &src[so..so + n],
                        "src+{so} dst+{dof} n {n}"
                    );
                    assert!(
                        buf[..dof].iter().all(|&b| b == 0xEE),
                        "before: +{dof} n {n}"
                    );
                    assert!(
                        buf[dof + n..].iter().all(|&b| b == 0xEE),
                        "after: +{dof} n {n}"
                    );
                }
            }
        }
    }
}
