//! A process holding `--mib` MiB of incompressible state (f32s from a xorshift stream), for
//! the comparison with a transparent checkpointer (`scripts/bench-criu`):
//!
//!   bigstate --mib N --ready FILE   fill, write the pid to FILE, then wait for SIGKILL: the
//!                                   target of `criu dump`
//!   bigstate --mib N --save DIR     fill, then time one durable ckpt save of the state
//!                                   (`Stage::write_f32s` + commit) and print `{"save_s":S}`
//!   bigstate --restore DIR          time reading the newest checkpoint's state back into a
//!                                   fresh buffer (`read_f32s`, verified) and print
//!                                   `{"restore_s":S,"bytes":N}`
use std::time::Instant;

use ckpt_test_programs::{arg, incompressible_f32s, num};

fn fill(mib: u64) -> Vec<f32> {
    incompressible_f32s((mib as usize) << 18)
}

fn main() {
    if let Some(dir) = arg("--restore") {
        let ck = ckpt::Checkpointer::open(&dir).expect("open the checkpoint directory");
        let t = Instant::now();
        let v = ck.read_f32s("state.f32").expect("read the state back");
        let s = t.elapsed().as_secs_f64();
        println!("{{\"restore_s\":{s},\"bytes\":{}}}", v.len() * 4);
        return;
    }
    let state = fill(num("--mib", 1024));
    if let Some(dir) = arg("--save") {
        let mut ck = ckpt::Checkpointer::open(&dir).expect("open the checkpoint directory");
        let t = Instant::now();
        ck.save_with(Some(1), |st| st.write_f32s("state.f32", &state).map(|_| ()))
            .expect("save");
        println!("{{\"save_s\":{}}}", t.elapsed().as_secs_f64());
        return;
    }
    let ready = arg("--ready").expect("--ready FILE, --save DIR or --restore DIR");
    std::fs::write(&ready, format!("{}\n", std::process::id())).expect("write --ready");
    loop {
        // The state stays resident and untouched until the process is killed.
        std::thread::park();
        std::hint::black_box(&state);
    }
}
