//! The README's recipes, extracted from README.md (never a copy) and run as written, killed
//! at random instants, compared with an uninterrupted run.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(60);

/// The first fenced block of `lang` after the heading `heading` in README.md.
fn readme_block(heading: &str, lang: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let after = readme
        .split(&format!("\n{heading}\n"))
        .nth(1)
        .unwrap_or_else(|| panic!("README.md has no heading {heading:?}"));
    let start = after
        .find(&format!("```{lang}\n"))
        .unwrap_or_else(|| panic!("no ```{lang} block under {heading:?}"))
        + lang.len()
        + 4;
    let end = after[start..].find("```").unwrap() + start;
    after[start..end].to_string()
}

/// PATH with the directory of the `ckpt` binary first (recipes call `ckpt save`).
fn path_with_ckpt() -> String {
    format!(
        "{}:{}",
        ckpt_bin().parent().unwrap().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn write_job(dir: &Path, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let job = dir.join("job.sh");
    std::fs::write(&job, body).unwrap();
    std::fs::set_permissions(&job, std::fs::Permissions::from_mode(0o755)).unwrap();
    job
}

#[test]
fn the_shell_recipe_loses_no_work_under_requests_and_kills() {
    let seed = seed("shell_recipe");
    let mut rng = fastrand::Rng::with_seed(seed);
    let recipe = readme_block("### Shell", "bash");
    let n = 60;

    // Uninterrupted, without ckpt (`ckpt save` is then never called).
    let plain = tempdir();
    let job = write_job(plain.path(), &recipe);
    let out = output_deadline(
        std::process::Command::new(&job)
            .current_dir(plain.path())
            .env("N", n.to_string())
            .env("PATH", path_with_ckpt()),
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = std::fs::read_to_string(plain.path().join("results.txt")).unwrap();
    assert_eq!(want.lines().count(), n);

    // Under `ckpt run` as the recipe says (with a short interval), the job's leader SIGKILLed
    // at random instants.
    let work = tempdir();
    let job = write_job(work.path(), &recipe);
    let dir = work.path().join("ck");
    let mut sup = ckpt()
        .args([
            "run",
            "--signal",
            "USR1",
            "--every",
            "150ms",
            "--backoff",
            "10ms..50ms",
            "--dir",
        ])
        .arg(&dir)
        .arg("--")
        .arg(&job)
        .current_dir(work.path())
        .env("N", n.to_string())
        .env("PATH", path_with_ckpt())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let deadline = Instant::now() + T;
    for kill in 0..3 {
        std::thread::sleep(Duration::from_millis(rng.u64(200..700)));
        let launches = events(&dir, "launch");
        let Some(pid) = launches.last().and_then(|l| l["pid"].as_i64()) else {
            continue;
        };
        if sup.try_wait().unwrap().is_some() {
            break;
        }
        eprintln!("seed {seed}: kill {kill} of the job's leader {pid}");
        signal(pid as u32, libc::SIGKILL);
        wait_until(T, "the relaunch", || {
            events(&dir, "launch").len() > launches.len() || sup.try_wait().unwrap().is_some()
        });
        assert!(Instant::now() < deadline);
    }
    let st = wait_deadline(&mut sup, T);
    let mut err = String::new();
    use std::io::Read;
    let _ = sup.stderr.take().unwrap().read_to_string(&mut err);
    assert_eq!(st.code(), Some(0), "seed {seed}: {err}");
    let got = std::fs::read_to_string(work.path().join("results.txt")).unwrap();
    assert_eq!(
        got, want,
        "seed {seed}: results differ from an uninterrupted run\n{err}"
    );
    assert!(
        !events(&dir, "committed").is_empty(),
        "seed {seed}: no checkpoint was taken: {err}"
    );
    assert_no_survivors(&dir);
}

#[test]
fn the_rust_recipe_resumes_bit_identical_under_kills() {
    // test-programs/build.rs compiles the README's Rust block as written (`readme_rust`).
    let seed = seed("rust_recipe");
    let mut rng = fastrand::Rng::with_seed(seed);
    let plain = tempdir();
    let out = output_deadline(
        std::process::Command::new(test_bin("readme_rust"))
            .current_dir(plain.path())
            .env_remove("CKPT_DIR"),
        T,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let want = text(&out.stdout);
    assert!(want.starts_with("final "), "{want}");

    let work = tempdir();
    let dir = work.path().join("ck");
    let mut sup = ckpt()
        .args([
            "run",
            "--every",
            "100ms",
            "--backoff",
            "10ms..50ms",
            "--dir",
        ])
        .arg(&dir)
        .arg("--")
        .arg(test_bin("readme_rust"))
        .current_dir(work.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_guarded();
    for kill in 0..2 {
        let commits = events(&dir, "committed").len();
        wait_until(T, "a checkpoint", || {
            events(&dir, "committed").len() > commits || sup.try_wait().unwrap().is_some()
        });
        std::thread::sleep(Duration::from_millis(rng.u64(0..300)));
        let launches = events(&dir, "launch");
        if sup.try_wait().unwrap().is_some() {
            break;
        }
        let pid = launches.last().unwrap()["pid"].as_u64().unwrap() as u32;
        eprintln!("seed {seed}: kill {kill} of the job {pid}");
        signal(pid, libc::SIGKILL);
        wait_until(T, "the relaunch", || {
            events(&dir, "launch").len() > launches.len() || sup.try_wait().unwrap().is_some()
        });
    }
    let st = wait_deadline(&mut sup, T);
    let mut stdout = String::new();
    let mut err = String::new();
    use std::io::Read;
    let _ = sup.stdout.take().unwrap().read_to_string(&mut stdout);
    let _ = sup.stderr.take().unwrap().read_to_string(&mut err);
    assert_eq!(st.code(), Some(0), "seed {seed}: {err}");
    assert!(
        events(&dir, "launch")
            .iter()
            .any(|l| l["restore_step"].as_u64().is_some()),
        "seed {seed}: no launch resumed: {err}"
    );
    assert_eq!(
        stdout.lines().last().unwrap_or_default(),
        want.trim(),
        "seed {seed}: {err}"
    );
    assert_no_survivors(&dir);
}
