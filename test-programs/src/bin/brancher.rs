//! A job for the versions tests: its state is (step, lr, value) and each step adds lr to
//! value. `--lr` applies on a fresh start and on a branch start (CKPT_START=branch); a resume
//! keeps the state's lr. Appends `start <CKPT_START> <step> <lr> <value>` when it starts and
//! `done <step> <value>` (or `stopped <step>`) to --progress.
use std::io::Write;

use ckpt_test_programs::{arg, num};

fn main() {
    let progress = arg("--progress").expect("--progress FILE");
    let lr = num("--lr", 1);
    let steps = num("--steps", 100);
    let step_ms = num("--step-ms", 2);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&progress)
        .expect("open --progress");
    let mut line = |s: String| {
        let _ = out.write_all(format!("{s}\n").as_bytes());
    };
    let mut ck = ckpt::Checkpointer::from_env().expect("client");
    let start = ck.start();
    let (mut step, mut cur_lr, mut value): (u64, u64, u64) =
        ck.restore().expect("restore").unwrap_or((0, lr, 0));
    if start == ckpt::Start::Branch {
        cur_lr = lr;
    }
    let env = std::env::var("CKPT_START").unwrap_or_default();
    line(format!("start {env} {step} {cur_lr} {value} {start:?}"));
    while step < steps {
        step += 1;
        value += cur_lr;
        std::thread::sleep(std::time::Duration::from_millis(step_ms));
        if ck.should_checkpoint() {
            ck.save_at(step, &(step, cur_lr, value)).expect("save");
        }
        if ck.should_stop() {
            line(format!("stopped {step}"));
            return;
        }
    }
    line(format!("done {step} {value}"));
}
