//! Benchmark helper (scripts/bench): time `Store::latest_verified` (what a supervisor or a
//! standalone client does at start) and `Store::list` on a directory. Prints JSON medians.
use std::time::Instant;

fn main() {
    let dir = std::env::args().nth(1).expect("DIR");
    let runs = ckpt_test_programs::num("--runs", 7);
    let store = ckpt::store::Store::new(&dir);
    let (mut lv, mut ls) = (Vec::new(), Vec::new());
    let mut count = 0;
    let mut seq = 0;
    for _ in 0..runs {
        let t = Instant::now();
        count = store.list().unwrap().len();
        ls.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        seq = store
            .latest_verified(false, |b| eprintln!("{b}"))
            .unwrap()
            .map(|f| f.seq)
            .unwrap_or(0);
        lv.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lv.sort_by(|a, b| a.total_cmp(b));
    ls.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{{\"checkpoints\": {count}, \"newest_valid\": {seq}, \"latest_verified_ms\": {:.2}, \"list_ms\": {:.2}, \"runs\": {runs}}}",
        lv[lv.len() / 2],
        ls[ls.len() / 2]
    );
}
