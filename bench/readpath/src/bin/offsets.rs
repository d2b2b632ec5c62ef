use std::io::Read;
use std::time::Instant;
fn rd(path: &str, buf: &mut [u8], what: &str, size: usize) {
    let mut f = std::fs::File::open(path).unwrap();
    let t = Instant::now();
    let mut tot = 0;
    loop { let n = f.read(buf).unwrap(); if n == 0 { break; } tot += n; }
    assert_eq!(tot, size);
    println!("{what} (ptr%4096={}): {:.2} GB/s", buf.as_ptr() as usize % 4096, size as f64 / t.elapsed().as_secs_f64() / 1e9);
}
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    let lay = std::alloc::Layout::from_size_align(16 << 20, 4096).unwrap();
    let big = unsafe { std::slice::from_raw_parts_mut(std::alloc::alloc(lay), 16 << 20) };
    big.fill(1);
    for _ in 0..1 {
    for off in std::env::args().skip(2).map(|s| s.parse::<usize>().unwrap()) {
        rd(&path, &mut big[off..off + (4 << 20)], &format!("4M at +{off}"), size);
    }
    }
}
