//! A client job that saves asynchronously: its state is `--mib` MiB of f32 weights filled
//! with the step number, plus the step (postcard). On stop it reports on stdout whether the
//! background save was still being written when it asked `should_stop()` (which must wait
//! for it), then exits 0. On start it checks the restored weights match the restored step.
use ckpt_test_programs::num;

fn main() {
    let mut ck = ckpt::Checkpointer::from_env().expect("client");
    let n = (num("--mib", 32) as usize) << 18; // f32s
    let mut step: u64 = ck.restore().expect("restore").unwrap_or(0);
    let mut w = vec![0f32; n];
    if step > 0 {
        ck.read_pod_into("weights.f32", &mut w)
            .expect("read weights");
        assert!(
            w.iter().all(|&x| x == step as f32),
            "weights match step {step}"
        );
        println!("restored step {step}");
    }
    loop {
        step += 1;
        w.iter_mut().for_each(|x| *x = step as f32);
        std::thread::sleep(std::time::Duration::from_millis(5));
        if ck.should_checkpoint() {
            ck.save_async_with(Some(step), |s| {
                s.put_pod("weights.f32", &w)?;
                s.put_serde(ckpt::client::STATE_FILE, &step)
            })
            .expect("save_async");
        }
        let pending = ck.save_pending();
        if ck.should_stop() {
            assert!(!ck.save_pending(), "should_stop waited for the save");
            println!("stopped at step {step} pending_before_stop={pending}");
            return;
        }
    }
}
