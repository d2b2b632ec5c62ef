//! `ckpt demo`: the toy trainer, supervised, crashed twice on purpose, resumed, and its
//! digest compared with an uninterrupted run.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::demo::{reference_digest, run_trainer, TrainerArgs};
use crate::exit::ErrKind;
use crate::store::scan::read_manifest;
use crate::store::Store;
use crate::supervisor::Fatal;

/// Run the built-in demo.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Training steps.
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
    /// Model size (number of weights).
    #[arg(long, default_value_t = 256)]
    pub dim: usize,
    /// Milliseconds of sleep per step, so there is time to interrupt it.
    #[arg(long, default_value_t = 5)]
    pub step_ms: u64,
    /// Work directory (default: a new temporary directory, removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
}

/// The hidden `__trainer` subcommand.
#[derive(Debug, clap::Args)]
pub struct TrainerCli {
    #[arg(long, default_value_t = 600)]
    pub steps: u64,
    #[arg(long, default_value_t = 256)]
    pub dim: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 0)]
    pub step_ms: u64,
    #[arg(long)]
    pub crash_at: Option<u64>,
    #[arg(long)]
    pub digest_file: Option<PathBuf>,
}

pub fn trainer(a: TrainerCli) -> Result<i32, Fatal> {
    let args = TrainerArgs {
        steps: a.steps,
        dim: a.dim,
        seed: a.seed,
        step_ms: a.step_ms,
        crash_at: a.crash_at,
        digest_file: a.digest_file,
    };
    // The demo's job: a failure is the job's own (exit 1, as any program), not ckpt's.
    match run_trainer(&args) {
        Ok(code) => Ok(code),
        Err(e) => {
            eprintln!(
                "ckpt: error: {}",
                crate::store::escape_lines(&e.to_string())
            );
            Ok(1)
        }
    }
}

fn err(msg: String) -> Fatal {
    Fatal::new(ErrKind::Internal, msg)
}

pub fn run(a: DemoArgs) -> Result<i32, Fatal> {
    let exe =
        std::env::current_exe().map_err(|e| err(format!("cannot find my own executable: {e}")))?;
    let (work, temp) = match &a.workdir {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("ckpt-demo-{}", std::process::id())),
            true,
        ),
    };
    let _ = std::fs::remove_dir_all(work.join("checkpoints"));
    std::fs::create_dir_all(&work)
        .map_err(|e| err(format!("cannot create {}: {e}", work.display())))?;
    let dir = work.join("checkpoints");
    let digest_file = work.join("digest.txt");
    let _ = std::fs::remove_file(&digest_file);
    let crash_at = a.steps / 3;
    let targs = TrainerArgs {
        steps: a.steps,
        dim: a.dim,
        seed: 42,
        step_ms: a.step_ms,
        crash_at: Some(crash_at),
        digest_file: Some(digest_file.clone()),
    };

    println!(
        "== ckpt demo: a toy training job ({} weights, Adam, {} steps) ==",
        a.dim, a.steps
    );
    let t = Instant::now();
    let reference = reference_digest(&targs);
    println!(
        "1. uninterrupted run (in memory, {:.2}s): digest {reference}",
        t.elapsed().as_secs_f64()
    );
    println!("2. the same job under `ckpt run --every 300ms`: it aborts itself at step {crash_at}, then gets SIGKILLed later on");
    let mut child = Command::new(&exe)
        .arg("run")
        .arg("--dir")
        .arg(&dir)
        .args([
            "--every",
            "300ms",
            "--backoff",
            "200ms..1s",
            "--keep",
            "3",
            "--",
        ])
        .arg(&exe)
        .arg("__trainer")
        .args([
            "--steps",
            &a.steps.to_string(),
            "--dim",
            &a.dim.to_string(),
            "--step-ms",
            &a.step_ms.to_string(),
            "--crash-at",
            &crash_at.to_string(),
        ])
        .arg("--digest-file")
        .arg(&digest_file)
        .spawn()
        .map_err(|e| err(format!("cannot start `ckpt run`: {e}")))?;

    // Second interruption: SIGKILL the job once it has resumed and saved past 2/3 of the way.
    let store = Store::new(&dir);
    let kill_after_step = 2 * a.steps / 3;
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut killed = false;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| err(e.to_string()))? {
            break st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(err("the demo did not finish within 5 minutes".into()));
        }
        if !killed {
            let newest_step = store
                .list()
                .ok()
                .and_then(|l| l.last().and_then(|(_, p)| read_manifest(p).ok()))
                .and_then(|m| m.step)
                .unwrap_or(0);
            let status: Option<serde_json::Value> =
                crate::store::io::read_small(&store.private().join("status.json"), 1 << 20)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
            let restarts = status
                .as_ref()
                .and_then(|s| s["restarts"].as_u64())
                .unwrap_or(0);
            let pid = status.as_ref().and_then(|s| s["job_pid"].as_u64());
            if restarts >= 1 && newest_step >= kill_after_step {
                if let Some(pid) = pid {
                    println!("   demo: SIGKILL to the job (pid {pid}); newest checkpoint is at step {newest_step}");
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    killed = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let resumed = std::fs::read_to_string(&digest_file)
        .unwrap_or_default()
        .trim()
        .to_string();
    println!(
        "3. ckpt exited with {}",
        status
            .code()
            .map(|c| c.to_string())
            .unwrap_or_else(|| "a signal".into())
    );
    println!("   uninterrupted digest: {reference}");
    println!(
        "   resumed digest:       {}",
        if resumed.is_empty() {
            "(none)"
        } else {
            &resumed
        }
    );
    let ok = status.success() && resumed == reference && killed;
    if ok {
        println!("MATCH: the job was interrupted twice and ended bit-identical to the uninterrupted run.");
    } else if !killed {
        println!(
            "MISMATCH: the demo could not interrupt the job a second time (it finished too fast?)"
        );
    } else {
        println!("MISMATCH: the resumed run differs. This is a bug; please report it with the output above.");
    }
    if temp {
        let _ = std::fs::remove_dir_all(&work);
    } else {
        println!(
            "checkpoints kept in {} (try `ckpt list --dir {}`)",
            dir.display(),
            dir.display()
        );
    }
    Ok(if ok { 0 } else { 1 })
}
