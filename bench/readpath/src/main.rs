use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::time::Instant;

fn drop_caches() { unsafe { libc::sync() }; std::fs::write("/proc/sys/vm/drop_caches", "3\n").unwrap(); }

fn fill(f: &mut File, buf: &mut [u8]) -> usize {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) { Ok(0) => break, Ok(n) => filled += n, Err(e) => panic!("{e}") }
    }
    filled
}

fn fadv(f: &File, adv: i32) { if adv >= 0 { unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, adv); } } }

// read into dest in `chunk` pieces, crc on helper thread (current design)
fn threaded(f: &mut File, dest: &mut [u8], chunk: usize) -> u32 {
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<&[u8]>(4);
        let h = s.spawn(move || { let mut c = 0; for x in rx { c = crc32c::crc32c_append(c, x); } c });
        for ch in dest.chunks_mut(chunk) { let n = fill(f, ch); assert_eq!(n, ch.len()); let c: &[u8] = ch; tx.send(c).unwrap(); }
        drop(tx); h.join().unwrap()
    })
}
fn bounce(f: &mut File, dest: &mut [u8], bsz: usize) -> u32 {
    let mut v = vec![0u8; bsz + 4096]; let off = v.as_ptr().align_offset(4096); let b = &mut v[off..off + bsz];
    std::thread::scope(|s| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<&[u8]>(4);
        let h = s.spawn(move || { let mut c = 0; for x in rx { c = crc32c::crc32c_append(c, x); } c });
        for ch in dest.chunks_mut(bsz) { let bb = &mut b[..ch.len()]; let n = fill(f, bb); assert_eq!(n, ch.len()); ch.copy_from_slice(bb); let c: &[u8] = ch; tx.send(c).unwrap(); }
        drop(tx); h.join().unwrap()
    })
}
fn bounceinl(f: &mut File, dest: &mut [u8], bsz: usize, ra: usize) -> u32 {
    let mut v = vec![0u8; bsz + 4096]; let off = v.as_ptr().align_offset(4096); let b = &mut v[off..off + bsz];
    let mut c = 0; let mut pos = 0usize; let mut ra_to = 0usize; let size = dest.len();
    for ch in dest.chunks_mut(bsz) {
        if ra > 0 && pos + ra / 2 >= ra_to && ra_to < size { let n = ra.min(size - ra_to); unsafe { libc::readahead(f.as_raw_fd(), ra_to as i64, n); } ra_to += n; }
        let bb = &mut b[..ch.len()]; let n = fill(f, bb); assert_eq!(n, ch.len()); c = crc32c::crc32c_append(c, bb); ch.copy_from_slice(bb); pos += n;
    }
    c
}
fn inline(f: &mut File, dest: &mut [u8], chunk: usize, crc: bool) -> u32 {
    let mut c = 0;
    for ch in dest.chunks_mut(chunk) { let n = fill(f, ch); assert_eq!(n, ch.len()); if crc { c = crc32c::crc32c_append(c, ch); } }
    c
}
fn reused(f: &mut File, chunk: usize, crc: bool) -> u32 {
    let mut buf = vec![1u8; chunk]; let mut c = 0;
    loop { let n = fill(f, &mut buf); if n == 0 { break; } if crc { c = crc32c::crc32c_append(c, &buf[..n]); } }
    c
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let path = &a[1]; let variant = a[2].as_str(); let chunk: usize = a.get(3).map(|s| s.parse::<usize>().unwrap() << 20).unwrap_or(8 << 20);
    let adv: i32 = match a.get(4).map(|s| s.as_str()).unwrap_or("seq") { "seq" => libc::POSIX_FADV_SEQUENTIAL, "none" => -1, "willneed" => libc::POSIX_FADV_WILLNEED, _ => panic!() };
    let size = std::fs::metadata(path).unwrap().len() as usize;
    let layout = std::alloc::Layout::from_size_align(size, 4096).unwrap();
    let touched: &mut [u8] = if variant == "direct" { unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc_zeroed(layout), size) } } else { Box::leak(vec![0u8; size].into_boxed_slice()) };
    for i in (0..size).step_by(4096) { touched[i] = 1; }
    if std::env::var_os("WARM").is_none() { drop_caches(); } else { let mut f = File::open(path).unwrap(); reused(&mut f, 4<<20, false); }
    let t = Instant::now();
    let c = match variant {
        "dd" => { let st = std::process::Command::new("dd").arg(format!("if={path}")).args(["of=/dev/null","bs=4M"]).stderr(std::process::Stdio::null()).status().unwrap(); assert!(st.success()); 0 }
        "thr" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); threaded(&mut f, touched, chunk) }
        "thrfresh" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); let mut v = vec![0u8; size]; let c = threaded(&mut f, &mut v, chunk); std::hint::black_box(&v); c }
        "bounce" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); bounce(&mut f, touched, chunk) }
        "bouncefresh" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); let mut v = vec![0u8; size]; let c = bounce(&mut f, &mut v, chunk); std::hint::black_box(&v); c }
        "bounceinl" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); bounceinl(&mut f, touched, chunk, 0) }
        "bouncera" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); bounceinl(&mut f, touched, chunk, std::env::var("RA").map(|s| s.parse::<usize>().unwrap() << 20).unwrap_or(32 << 20)) }
        "bouncefreshpf" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); let mut v = vec![0u8; size];
            let (p, n) = (v.as_mut_ptr() as usize, v.len());
            let c = std::thread::scope(|s| {
                s.spawn(move || { let start = (p + 4095) & !4095; let end = (p + n) & !4095; let mut a = start;
                    while a < end { let l = (8usize << 20).min(end - a); unsafe { libc::madvise(a as *mut _, l, 23); } a += l; } });
                bounce(&mut f, &mut v, chunk) });
            std::hint::black_box(&v); c }
        "inl" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); inline(&mut f, touched, chunk, true) }
        "nocrc" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); inline(&mut f, touched, chunk, false) }
        "reuse" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); reused(&mut f, chunk, false) }
        "reusecrc" => { let mut f = File::open(path).unwrap(); fadv(&f, adv); reused(&mut f, chunk, true) }
        "direct" => {
            let mut f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).unwrap();
            // touched is from vec -> mmap, page aligned for big allocs
            assert_eq!(touched.as_ptr() as usize % 4096, 0);
            threaded(&mut f, touched, chunk)
        }
        _ => panic!(),
    };
    let dt = t.elapsed().as_secs_f64();
    println!("{variant} chunk={}M adv={} {:.3} GB/s ({:.3}s) crc={c:08x}", chunk >> 20, a.get(4).map(|s| s.as_str()).unwrap_or("seq"), size as f64 / dt / 1e9, dt);
}
