//! `ckpt check`: the real binary checks real jobs (the demo trainer, the `resumer` job with
//! switchable resume bugs, shell jobs) by driving the real `ckpt run`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;

const DEADLINE: Duration = Duration::from_secs(60);

/// `ckpt check` with its runs kept under `work`, the seed given, and `args` before `--`.
fn check(work: &Path, seed: u64, args: &[&str], cmd: &[String]) -> std::process::Output {
    let mut c = ckpt();
    c.arg("check")
        .arg("--work")
        .arg(work)
        .arg("--seed")
        .arg(seed.to_string())
        .args(args)
        .arg("--")
        .args(cmd);
    let out = output_deadline(&mut c, DEADLINE);
    eprintln!(
        "stderr:\n{}\nstdout:\n{}",
        text(&out.stderr),
        text(&out.stdout)
    );
    out
}

/// No process of any run's job survives.
fn no_survivors(work: &Path) {
    for e in std::fs::read_dir(work).unwrap().flatten() {
        assert_no_survivors(&e.path().join("ckpt"));
    }
}

fn resumer(extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        test_bin("resumer").display().to_string(),
        "--steps".into(),
        "150".into(),
        "--step-ms".into(),
        "3".into(),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

#[test]
fn deterministic_trainer_passes() {
    let seed = seed("deterministic_trainer_passes");
    let tmp = tempdir();
    let work = tmp.path().join("w");
    let cmd: Vec<String> = vec![
        test_bin("trainer").display().to_string(),
        "--steps".into(),
        "150".into(),
        "--step-ms".into(),
        "3".into(),
        "--digest-file".into(),
        "digest".into(),
    ];
    let out = check(&work, seed, &["--kills", "5", "--output", "digest"], &cmd);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("MATCH: all 5 interrupted runs"),
        "{stdout}"
    );
    assert!(!stdout.contains("problem"), "no false finding: {stdout}");
    let stderr = text(&out.stderr);
    // Every kind of interruption ran, and progress lines named them.
    for kind in [
        "mid-step",
        "mid-save",
        "after-commit",
        "after-resume",
        "stop",
    ] {
        assert!(
            stderr.contains(&format!("-{kind}: ")),
            "no {kind} run: {stderr}"
        );
    }
    assert!(stderr.contains(&format!("seed {seed}")), "{stderr}");
    // The resumed runs really resumed from a checkpoint.
    let resumed = std::fs::read_dir(&work)
        .unwrap()
        .flatten()
        .filter(|e| {
            events(&e.path().join("ckpt"), "launch")
                .iter()
                .any(|l| !l["restore_seq"].is_null())
        })
        .count();
    assert!(resumed >= 3, "only {resumed} runs resumed");
    no_survivors(&work);
}

#[test]
fn forgotten_rng_is_caught_with_the_element_index() {
    let seed = seed("forgotten_rng_is_caught_with_the_element_index");
    let tmp = tempdir();
    let work = tmp.path().join("w");
    let out = check(
        &work,
        seed,
        &["--kills", "3", "--output", "out/weights.npy", "--json"],
        &resumer(&["--forget", "rng"]),
    );
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json output");
    assert_eq!(doc["verdict"], "differs");
    assert_eq!(doc["exit_code"], 1);
    assert_eq!(doc["seed"], seed);
    assert_eq!(doc["kept"], true);
    let d = &doc["first_difference"];
    assert_eq!(d["file"], "out/weights.npy", "{d}");
    assert_eq!(d["format"], "npy");
    let idx = d["index"].as_array().expect("index");
    assert_eq!(idx.len(), 1, "{d}");
    assert!(idx[0].as_u64().unwrap() < 16, "{d}");
    assert_ne!(d["expected"], d["actual"]);
    assert!(
        d["message"]
            .as_str()
            .unwrap()
            .contains("dtype <f8 shape (16,)"),
        "{d}"
    );
    let runs = doc["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 5);
    assert_eq!(runs[0]["result"], "reference");
    assert_eq!(runs[1]["result"], "match");
    // Every run that resumed differs; kept for inspection.
    assert!(runs[2..].iter().any(|r| r["result"] == "differs"));
    assert!(work.join("uninterrupted-1/job/out/weights.npy").exists());
    no_survivors(&work);
}

#[test]
fn forgotten_rng_in_the_final_checkpoint_is_caught() {
    let seed = seed("forgotten_rng_in_the_final_checkpoint_is_caught");
    let tmp = tempdir();
    let work = tmp.path().join("w");
    let out = check(
        &work,
        seed,
        &["--kills", "2"],
        &resumer(&["--forget", "rng"]),
    );
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("DIFFERS: "), "{stdout}");
    // The checkpoint's members sort as summary.json, weights.npy: the JSON key is named.
    assert!(
        stdout.contains("checkpoint:summary.json: first difference at key $."),
        "{stdout}"
    );
    assert!(stdout.contains(&format!("--seed {seed}")), "{stdout}");
    no_survivors(&work);
}

#[test]
fn nondeterministic_job_is_reported_as_such() {
    let seed = seed("nondeterministic_job_is_reported_as_such");
    let tmp = tempdir();
    let work = tmp.path().join("w");
    let out = check(&work, seed, &["--json"], &resumer(&["--nondet"]));
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json output");
    assert_eq!(doc["verdict"], "nondeterministic");
    assert_eq!(doc["first_difference"]["key"], "$.time_ns");
    assert_eq!(
        doc["runs"].as_array().unwrap().len(),
        2,
        "no interrupted run"
    );
    no_survivors(&work);
}

#[test]
fn a_job_killed_by_the_request_signal_is_reported() {
    let seed = seed("a_job_killed_by_the_request_signal_is_reported");
    let tmp = tempdir();
    let work = tmp.path().join("w");
    // A shell job that does not trap USR1: it dies of every request.
    let cmd: Vec<String> = ["bash", "-c", "sleep 0.6; echo done > out"]
        .map(String::from)
        .to_vec();
    let out = check(
        &work,
        seed,
        &[
            "--kills",
            "1",
            "--output",
            "out",
            "--run-opt=--signal=USR1",
            "--run-opt=--max-failures=2",
            "--json",
        ],
        &cmd,
    );
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json output");
    let run = &doc["runs"][2];
    assert_eq!(run["result"], "failed", "{run}");
    let findings = run["findings"].as_array().unwrap();
    assert!(
        findings.iter().any(|f| f["kind"] == "request_unanswered"
            && f["message"]
                .as_str()
                .unwrap()
                .contains("signal 10 (SIGUSR1)")),
        "{run}"
    );
    no_survivors(&work);
}

#[test]
fn usage_errors_and_failing_jobs() {
    let tmp = tempdir();
    let out = output_deadline(
        ckpt()
            .args(["check", "--run-opt=--every=1s", "--", "true"])
            .current_dir(tmp.path()),
        DEADLINE,
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("use ckpt check --every"));
    // A job that fails uninterrupted: nothing to check (3), the log tail is shown.
    let work = tmp.path().join("w");
    let out = check(&work, 1, &[], &["false".to_string()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(text(&out.stdout).starts_with("CANNOT CHECK: "));
    // A job that does not finish within --timeout: stopped, nothing to check (3).
    let work = tmp.path().join("w3");
    let t0 = std::time::Instant::now();
    let out = check(
        &work,
        1,
        &["--timeout", "1s"],
        &["sleep".into(), "30".into()],
    );
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stdout).contains("(stopped after --timeout 1.0s)"),
        "{}",
        text(&out.stdout)
    );
    assert!(t0.elapsed() < Duration::from_secs(15));
    assert_no_survivors(&work.join("uninterrupted-1/ckpt"));
    // Arguments naming the caller's files are made absolute (the job runs elsewhere),
    // also as `--flag=FILE`; the job's own relative paths are left alone.
    std::fs::write(tmp.path().join("data.txt"), "payload\n").unwrap();
    let work = tmp.path().join("w4");
    let mut c = ckpt();
    c.current_dir(tmp.path())
        .args(["check", "--seed", "1", "--output", "out", "--work"])
        .arg(&work)
        .args(["--", "sh", "-c", r#"cat "$1" "${2#--in=}" > out"#, "sh"])
        .args(["data.txt", "--in=data.txt"]);
    let out = output_deadline(&mut c, DEADLINE);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("made data.txt, data.txt absolute"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(work.join("uninterrupted-1/job/out")).unwrap(),
        "payload\npayload\n"
    );
    // A job that writes nothing and saves nothing: nothing to compare (3).
    let work = tmp.path().join("w2");
    let out = check(&work, 1, &[], &["true".to_string()]);
    assert_eq!(out.status.code(), Some(3));
    assert!(
        text(&out.stdout).contains("left no checkpoint"),
        "{}",
        text(&out.stdout)
    );
}

/// `python3` with numpy, or `None` (the test is then skipped, saying so).
fn python_with_numpy() -> Option<()> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("skipped: python3 with numpy is not available");
    }
    ok.then_some(())
}

#[test]
fn python_pickled_state_is_compared_by_key_and_index() {
    if python_with_numpy().is_none() {
        return;
    }
    let seed = seed("python_pickled_state_is_compared_by_key_and_index");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempdir();
    let run = |work: &Path, extra: &[&str]| {
        let mut c = ckpt();
        c.current_dir(root)
            .env("PYTHONPATH", root.join("python/src"))
            .args(["check", "--kills", "2", "--json", "--seed"])
            .arg(seed.to_string())
            .arg("--work")
            .arg(work)
            .args(["--output", "state.pickle", "--", "python3"])
            // Relative to the caller's directory: ckpt check makes it absolute.
            .arg("test-programs/python_trainer.py")
            .args(["--steps", "120", "--step-ms", "3", "--dim", "8"])
            .args(["--state-out", "state.pickle"])
            .args(extra);
        let out = output_deadline(&mut c, DEADLINE);
        eprintln!("{}", text(&out.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json output");
        (out.status.code(), doc)
    };
    let work = tmp.path().join("good");
    let (code, doc) = run(&work, &[]);
    assert_eq!(code, Some(0), "{doc}");
    assert_eq!(doc["verdict"], "match");
    no_survivors(&work);
    let work = tmp.path().join("bad");
    let (code, doc) = run(&work, &["--forget", "rng"]);
    assert_eq!(code, Some(1), "{doc}");
    let d = &doc["first_difference"];
    assert_eq!(d["format"], "pickle", "{d}");
    // Keys in order: adam_m is the first array the forgotten dropout stream changes.
    assert_eq!(d["key"], "$.adam_m", "{d}");
    assert_eq!(d["index"].as_array().map(Vec::len), Some(1), "{d}");
    no_survivors(&work);
}

// ---------------------------------------------------------------------------------------
// The recipes of docs/check.md and README.md, extracted from the documents (not copied).

/// The repository root.
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The code blocks fenced as ```lang in `doc` (relative to the repository), in order; with
/// `after`, only those after that line (a heading).
fn doc_blocks(doc: &str, lang: &str, after: Option<&str>) -> Vec<String> {
    let text = std::fs::read_to_string(repo().join(doc)).unwrap();
    let text = match after {
        Some(h) => text
            .split_once(&format!("\n{h}\n"))
            .unwrap_or_else(|| panic!("{doc} has no heading {h:?}"))
            .1
            .to_string(),
        None => text,
    };
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    for line in text.lines() {
        match &mut cur {
            None if line.trim_start() == format!("```{lang}") => cur = Some(String::new()),
            Some(b) if line.trim_start() == "```" => {
                out.push(std::mem::take(b));
                cur = None;
            }
            Some(b) => {
                b.push_str(line);
                b.push('\n');
            }
            None => {}
        }
    }
    out
}

/// Runs a shell recipe with bash in `dir`, with the binaries under test first on PATH. The
/// documents build with `cargo build --workspace --release` and use `target/release/`: the
/// test runs them against the binaries it was built with instead.
fn run_recipe(script: &str, dir: &Path) -> (Option<i32>, String, String) {
    let bin = ckpt_bin().parent().unwrap().to_path_buf();
    let script: String = script
        .lines()
        .filter(|l| !l.trim_start().starts_with("cargo build"))
        .map(|l| l.replace("$PWD/target/release", &bin.display().to_string()))
        .map(|l| l.replace("target/release", &bin.display().to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("recipe:\n{script}");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = std::process::Command::new("bash");
    clear_ckpt_env(&mut c);
    c.args(["-e", "-c", &script])
        .current_dir(dir)
        .env("PATH", path);
    let out = output_deadline(&mut c, DEADLINE);
    let (o, e) = (text(&out.stdout), text(&out.stderr));
    eprintln!("stdout:\n{o}\nstderr:\n{e}");
    // A failing check keeps its runs (and says where): clean up.
    for line in o.lines() {
        if let Some(rest) = line.trim().strip_prefix("runs kept under ") {
            let dir = rest.split(" (").next().unwrap();
            if dir.starts_with(std::env::temp_dir().to_str().unwrap()) {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
    (out.status.code(), o, e)
}

#[test]
fn docs_check_md_trainer_recipe_works() {
    let blocks = doc_blocks("docs/check.md", "sh", Some("## Try it"));
    let (code, out, _) = run_recipe(&blocks[0], repo());
    assert_eq!(code, Some(0));
    assert!(out.starts_with("MATCH: all 4 interrupted runs"), "{out}");
}

#[test]
fn readme_check_recipe_works() {
    let blocks = doc_blocks(
        "README.md",
        "sh",
        Some("### Checking that a job resumes exactly"),
    );
    let (code, out, _) = run_recipe(&blocks[0], repo());
    assert_eq!(code, Some(0));
    assert!(out.starts_with("MATCH: "), "{out}");
}

#[test]
fn docs_check_md_forgotten_rng_recipe_works() {
    if python_with_numpy().is_none() {
        return;
    }
    let blocks = doc_blocks("docs/check.md", "sh", Some("## Try it"));
    let (code, out, _) = run_recipe(&blocks[1], repo());
    assert_eq!(code, Some(0), "the recipe ends with || echo");
    assert!(out.starts_with("DIFFERS: "), "{out}");
    assert!(
        out.contains("state.pickle: first difference at key $."),
        "{out}"
    );
    assert!(out.contains("$.rng"), "{out}");
    assert!(out.trim_end().ends_with("exit 1"), "{out}");
}

#[test]
fn docs_check_md_shell_recipe_keeps_in_flight_work() {
    let heading = "### Shell traps that record in-flight work as done";
    let job = &doc_blocks("docs/check.md", "bash", Some(heading))[0];
    let cmd = &doc_blocks("docs/check.md", "sh", Some(heading))[0];
    let tmp = tempdir();
    let path = tmp.path().join("job.sh");
    std::fs::write(&path, job).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let seed = seed("docs_check_md_shell_recipe_keeps_in_flight_work");
    let cmd = cmd.replace(
        "ckpt check ",
        &format!("ckpt check --seed {seed} --kills 5 "),
    );
    let (code, out, err) = run_recipe(&cmd, tmp.path());
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("MATCH: all 5 interrupted runs"), "{out}");
    assert!(!out.contains("problem"), "no false finding: {out}");
}

/// The README's shell recipe, as written there, under `ckpt check` with the options of its
/// "run with:" line: the request goes to the script alone (`--signal-to leader`, the
/// default), so the background worker is not killed by it, and the trap records only
/// completed items. (With the old recipe and `--signal-to group` the item in flight was lost
/// at every checkpoint: "DIFFERS: 5 of 5".)
#[test]
fn readme_shell_recipe_resumes_exactly() {
    let job = &doc_blocks("README.md", "bash", Some("### Shell"))[0];
    assert!(job.starts_with("#!"), "{job}");
    // The recipe as written; its item count comes from N (60, so that the check is short).
    let script = job.clone();
    let run_line = job
        .lines()
        .find(|l| l.contains("ckpt run"))
        .expect("a `run with: ckpt run ...` line");
    let opts: Vec<&str> = run_line
        .split("ckpt run")
        .nth(1)
        .unwrap()
        .split(" -- ")
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    let mut run_opts = Vec::new();
    let mut i = 0;
    while i < opts.len() {
        if opts[i] == "--every" {
            i += 2;
            continue;
        }
        run_opts.push(format!("--run-opt={}", opts[i]));
        i += 1;
    }
    let tmp = tempdir();
    let path = tmp.path().join("job.sh");
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let seed = seed("readme_shell_recipe_resumes_exactly");
    let work = tmp.path().join("w");
    let mut args: Vec<&str> = vec!["--kills", "5", "--output", "results.txt"];
    args.extend(run_opts.iter().map(String::as_str));
    let mut c = ckpt();
    let bin = ckpt_bin().parent().unwrap().to_path_buf();
    c.env(
        "PATH",
        format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        ),
    )
    .env("N", "60")
    .current_dir(tmp.path())
    .arg("check")
    .arg("--work")
    .arg(&work)
    .arg("--seed")
    .arg(seed.to_string())
    .args(&args)
    .args(["--", "./job.sh"]);
    let out = output_deadline(&mut c, DEADLINE);
    eprintln!("{}\n{}", text(&out.stderr), text(&out.stdout));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    no_survivors(&work);
}

#[test]
fn a_resume_that_starts_over_is_reported_and_fails_with_strict() {
    let seed = seed("a_resume_that_starts_over_is_reported_and_fails_with_strict");
    let tmp = tempdir();
    let work = tmp.path().join("w");
    // Ignores its checkpoint: the result is right (deterministic), the resume is not.
    let out = check(
        &work,
        seed,
        &["--kills", "5", "--output", "out", "--strict", "--json"],
        &resumer(&["--forget", "all"]),
    );
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("--json output");
    assert_eq!(doc["verdict"], "differs");
    assert!(doc["first_difference"].is_null(), "{doc}");
    assert!(
        doc["summary"].as_str().unwrap().contains("--strict"),
        "{doc}"
    );
    // Every run ends right; starting over shows when the first checkpoint after the resume
    // is older than the one restored, which the after-commit kill always provokes (it
    // kills right after a second or later checkpoint; the restarted job's first checkpoint
    // comes one interval after its launch).
    let runs = &doc["runs"].as_array().unwrap()[2..];
    for run in runs {
        assert_eq!(run["result"], "match", "{run}");
    }
    let after_commit = runs.iter().find(|r| r["kind"] == "after-commit").unwrap();
    assert!(
        after_commit["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["kind"] == "resume_went_back" || f["kind"] == "resume_from_step_0"),
        "{after_commit}"
    );
    no_survivors(&work);
}

#[test]
fn a_job_that_never_checkpoints_cannot_be_checked() {
    let seed = seed("a_job_that_never_checkpoints_cannot_be_checked");
    let tmp = tempdir();
    let work = tmp.path().join("w");
    let cmd: Vec<String> = ["bash", "-c", "sleep 0.3; echo done > out"]
        .map(String::from)
        .to_vec();
    let out = check(&work, seed, &["--kills", "2", "--output", "out"], &cmd);
    assert_eq!(out.status.code(), Some(3));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("CANNOT CHECK: none of the 2 runs could be interrupted"),
        "{stdout}"
    );
    assert!(stdout.contains("never announced a ckpt client"), "{stdout}");
    no_survivors(&work);
}

#[test]
fn killing_ckpt_check_leaves_no_job_behind() {
    let tmp = tempdir();
    let work = tmp.path().join("w");
    let mut c = ckpt();
    c.arg("check")
        .arg("--work")
        .arg(&work)
        .args(["--seed", "1", "--output", "out", "--"])
        .args(resumer(&["--steps", "100000"]))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn_guarded();
    let dir = work.join("uninterrupted-1/ckpt");
    wait_until(Duration::from_secs(20), "the first run's job runs", || {
        !events(&dir, "hello").is_empty()
    });
    assert!(
        !job_processes(&dir).is_empty(),
        "the job is found by its CKPT_DIR"
    );
    signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
    // `ckpt run` got SIGTERM (parent-death signal) and stopped its job.
    assert_no_survivors(&dir);
    wait_until(Duration::from_secs(20), "ckpt run stops", || {
        !events(&dir, "stopped").is_empty()
    });
}
