//! Talking to a running supervisor: `ckpt status/checkpoint/stop/log/stats`, the control
//! socket's defences (malformed input, other uids), hang detection, completions and man page.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(60);

fn start(dir: &Path, extra: &[&str], job: &str, job_args: &[&str]) -> Running {
    let child = ckpt()
        .arg("run")
        .args(extra)
        .arg("--dir")
        .arg(dir)
        .arg("--")
        .arg(test_bin(job))
        .args(job_args)
        .stderr(Stdio::null())
        .spawn_guarded();
    wait_until(T, "the job's client to announce itself", || {
        !events(dir, "hello").is_empty()
    });
    child
}

fn ctl(dir: &Path, args: &[&str]) -> std::process::Output {
    output_deadline(ckpt().args(args).arg("--dir").arg(dir), T)
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {} / {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

#[test]
fn status_checkpoint_wait_and_stop() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let mut sup = start(
        &dir,
        &["--every", "off"],
        "slow_saver",
        &["--save-ms", "100"],
    );
    let st = json_of(&ctl(&dir, &["status", "--json"]));
    assert_eq!(st["ok"], true);
    assert_eq!(st["state"], "running");
    assert_eq!(st["supervisor_pid"], sup.id());
    assert!(st["job"]["pid"].as_u64().is_some());
    assert_eq!(st["job"]["clients"].as_array().unwrap().len(), 1);
    assert!(st["tree"]["processes"].as_u64().unwrap() >= 1);
    assert!(st["command"][0].as_str().unwrap().ends_with("slow_saver"));
    let human = ctl(&dir, &["status"]);
    assert!(
        text(&human.stdout).contains("last checkpoint: none"),
        "{}",
        text(&human.stdout)
    );

    // --wait returns once the checkpoint is durable.
    let out = ctl(&dir, &["checkpoint", "--wait", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = json_of(&out);
    let seq = v["checkpoint"]["seq"].as_u64().unwrap();
    assert!(
        checkpoints(&dir).contains(&seq),
        "answered before the checkpoint was published"
    );
    let st = json_of(&ctl(&dir, &["status", "--json"]));
    assert_eq!(st["last_checkpoint"]["seq"], seq);

    // stop: checkpoint, stop, supervisor exits 75; `ckpt stop` waits for that.
    let out = ctl(&dir, &["stop"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(wait_deadline(&mut sup, T).code(), Some(75));
    assert!(
        checkpoints(&dir).iter().any(|s| *s > seq),
        "stop must checkpoint first"
    );
    assert_no_survivors(&dir);
    // Nobody is listening any more: a clear error and a distinct code.
    let out = ctl(&dir, &["status"]);
    assert_eq!(out.status.code(), Some(69));
    assert!(
        text(&out.stderr).contains("no ckpt supervisor is running"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn stop_without_checkpoint_and_several_supervisors() {
    let tmp = tempdir();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut sa = start(&a, &["--every", "off"], "slow_saver", &["--save-ms", "0"]);
    let mut sb = start(&b, &["--every", "off"], "slow_saver", &["--save-ms", "0"]);
    assert_eq!(
        json_of(&ctl(&a, &["status", "--json"]))["supervisor_pid"],
        sa.id()
    );
    assert_eq!(
        json_of(&ctl(&b, &["status", "--json"]))["supervisor_pid"],
        sb.id()
    );
    assert!(ctl(&a, &["stop", "--no-checkpoint"]).status.success());
    assert_eq!(wait_deadline(&mut sa, T).code(), Some(75));
    assert!(
        checkpoints(&a).is_empty(),
        "--no-checkpoint must not checkpoint"
    );
    // The other one is untouched.
    assert_eq!(json_of(&ctl(&b, &["status", "--json"]))["state"], "running");
    assert!(ctl(&b, &["stop", "--no-wait"]).status.success());
    assert_eq!(wait_deadline(&mut sb, T).code(), Some(75));
    assert_no_survivors(&a);
    assert_no_survivors(&b);
}

#[test]
fn hostile_input_on_both_sockets_never_disturbs_the_supervisor() {
    let seed = seed("hostile_input_on_both_sockets_never_disturbs_the_supervisor");
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let mut sup = start(&dir, &["--every", "off"], "slow_saver", &["--save-ms", "0"]);
    let control = dir.join(".ckpt/control.sock");
    let mut inputs: Vec<Vec<u8>> = vec![
        b"{\n".to_vec(),
        b"{\"cmd\":\"rm -rf /\"}\n".to_vec(),
        b"{\"cmd\":\"status\",\"extra\":1}\n".to_vec(),
        b"\xff\xfe\x00\n".to_vec(),
        b"null\n".to_vec(),
        vec![b'a'; 70 * 1024],
        b"".to_vec(),
    ];
    for _ in 0..30 {
        let n = rng.usize(0..300);
        inputs.push((0..n).map(|_| rng.u8(..)).chain([b'\n']).collect());
    }
    for input in &inputs {
        let mut s = UnixStream::connect(&control).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(input);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        let v: serde_json::Value = serde_json::from_str(answer.trim())
            .unwrap_or_else(|e| panic!("answer to {input:?} is not JSON ({e}): {answer:?}"));
        assert_eq!(v["ok"], false, "{input:?} -> {v}");
        assert!(v["error"].as_str().is_some());
    }
    // Garbage datagrams on the job socket, too.
    let job_sock = dir.join(".ckpt/sock");
    let d = UnixDatagram::unbound().unwrap();
    for _ in 0..50 {
        let n = rng.usize(0..2000);
        let junk: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
        let _ = d.send_to(&junk, &job_sock);
    }
    let _ = d.send_to(
        br#"{"type":"hello","v":1,"pid":1,"signal":10,"client":"forged"}"#,
        &job_sock,
    );
    let _ = d.send_to(
        br#"{"type":"committed","v":1,"pid":1,"seq":999,"step":1,"bytes":1,"duration_ms":1}"#,
        &job_sock,
    );
    // Still answering, still supervising, and the forged messages changed nothing.
    let st = json_of(&ctl(&dir, &["status", "--json"]));
    assert_eq!(st["state"], "running", "seed {seed}");
    assert_eq!(
        st["job"]["clients"].as_array().unwrap().len(),
        1,
        "a forged hello from pid 1 must be ignored"
    );
    assert!(
        st["last_checkpoint"].is_null(),
        "a forged `committed` must not be believed"
    );
    assert!(
        !events(&dir, "bad_control").is_empty()
            && !events(&dir, "bad_message").is_empty()
            && !events(&dir, "bad_hello").is_empty()
    );
    assert!(ctl(&dir, &["stop"]).status.success());
    assert_eq!(wait_deadline(&mut sup, T).code(), Some(75));
}

#[test]
fn another_uid_is_refused() {
    if !nix_is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs as root: this test must run"
        );
        eprintln!("skipped: needs root to act as another uid");
        return;
    }
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let mut sup = start(&dir, &["--every", "off"], "slow_saver", &["--save-ms", "0"]);
    // Open the path up so that only SO_PEERCRED stands in the way.
    use std::os::unix::fs::PermissionsExt;
    for p in [tmp.path(), &dir, &dir.join(".ckpt")] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::set_permissions(
        dir.join(".ckpt/control.sock"),
        std::fs::Permissions::from_mode(0o777),
    )
    .unwrap();
    let mut cmd = ckpt();
    std::os::unix::process::CommandExt::uid(&mut cmd, 65534);
    let out = output_deadline(cmd.args(["status", "--dir"]).arg(&dir), T);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("permission denied"),
        "{}",
        text(&out.stderr)
    );
    wait_until(T, "the refusal to be logged", || {
        events(&dir, "control_refused")
            .iter()
            .any(|e| e["uid"] == 65534)
    });
    assert!(ctl(&dir, &["stop"]).status.success());
    assert_eq!(wait_deadline(&mut sup, T).code(), Some(75));
}

fn nix_is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn a_hung_job_is_killed_and_restarted() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let out = output_deadline(
        ckpt()
            .args([
                "run",
                "--hang-timeout",
                "400ms",
                "--hang-signal",
                "USR2",
                "--backoff",
                "10ms..20ms",
                "--dir",
            ])
            .arg(&dir)
            .arg("--")
            .arg(test_bin("hanger")),
        T,
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("the job is hung: no progress reported")
            && err.contains("sending SIGUSR2 for a stack dump"),
        "{err}"
    );
    assert_eq!(events(&dir, "hang").len(), 1);
    assert_eq!(events(&dir, "launch").len(), 2);
    assert_no_survivors(&dir);
}

#[test]
fn a_checkpoint_that_never_commits_counts_as_a_hang() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let mut sup = start(
        &dir,
        &[
            "--every",
            "off",
            "--checkpoint-timeout",
            "300ms",
            "--max-failures",
            "1",
        ],
        "slow_saver",
        &["--save-ms", "60000"],
    );
    let out = ctl(&dir, &["checkpoint", "--wait"]);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        text(&out.stderr).contains("did not commit within --checkpoint-timeout"),
        "{}",
        text(&out.stderr)
    );
    // --max-failures 1: the hang is a failure without progress, so ckpt gives up.
    let st = wait_deadline(&mut sup, T);
    assert_eq!(st.code(), Some(128 + 9));
    assert_no_survivors(&dir);
}

#[test]
fn log_and_stats_tell_what_happened() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let out = output_deadline(
        ckpt()
            .args(["run", "--backoff", "1ms..2ms", "--dir"])
            .arg(&dir)
            .arg("--")
            .arg(test_bin("crasher"))
            .args(["--save", "--succeed-after", "3"]),
        T,
    );
    assert!(out.status.success());
    let log = ctl(&dir, &["log", "--json"]);
    let lines: Vec<serde_json::Value> = text(&log.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines
        .iter()
        .all(|e| e["t_ms"].as_u64().is_some() && e["event"].as_str().is_some()));
    assert_eq!(lines.iter().filter(|e| e["event"] == "launch").count(), 4);
    let human = ctl(&dir, &["log", "-n", "2"]);
    assert_eq!(text(&human.stdout).lines().count(), 2);
    assert!(text(&human.stdout).contains("finished"));
    let s = json_of(&ctl(&dir, &["stats", "--json"]));
    assert_eq!(s["launches"], 4);
    assert_eq!(s["restarts"], 3);
    assert_eq!(s["failures"], 3);
    assert_eq!(s["checkpoints"], 3);
    assert!(s["goodput_percent"].as_f64().is_some());
    assert!(ctl(&dir, &["stats"]).status.success());
}

/// Copies everything `r` yields into a shared buffer on a thread (until end of file or an
/// error, e.g. EIO on a terminal whose other side closed); returns the buffer's text reader
/// and the thread.
fn pump(mut r: impl Read + Send + 'static) -> (impl Fn() -> String, std::thread::JoinHandle<()>) {
    let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = buf.clone();
    let t = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = r.read(&mut chunk) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (
        move || String::from_utf8_lossy(&buf.lock().unwrap()).into_owned(),
        t,
    )
}

#[test]
fn log_follow_prints_new_events() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let mut sup = start(&dir, &["--every", "off"], "slow_saver", &["--save-ms", "0"]);
    let mut follow = ckpt()
        .args(["log", "--follow", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn_guarded();
    let (seen, _reader) = pump(follow.stdout.take().unwrap());
    assert!(ctl(&dir, &["checkpoint", "--wait"]).status.success());
    wait_until(T, "log --follow to show the commit", || {
        seen().contains("committed")
    });
    let _ = follow.kill();
    let _ = follow.wait();
    assert!(ctl(&dir, &["stop"]).status.success());
    assert_eq!(wait_deadline(&mut sup, T).code(), Some(75));
}

#[test]
fn completions_and_man_page() {
    for shell in ["bash", "zsh", "fish"] {
        let out = output_deadline(ckpt().args(["completions", shell]), T);
        assert!(out.status.success());
        assert!(text(&out.stdout).contains("checkpoint"), "{shell}");
    }
    let out = output_deadline(ckpt().arg("man"), T);
    assert!(out.status.success());
    let man = text(&out.stdout);
    assert!(man.contains(".TH") && man.contains("ckpt"), "{man}");
}

#[test]
fn status_watch_follows_the_supervisor_until_it_exits() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let mut sup = start(&dir, &["--every", "off"], "slow_saver", &["--save-ms", "0"]);
    let mut watch = ckpt()
        .args(["status", "--watch", "100ms", "--json", "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn_guarded();
    let (lines, reader) = pump(watch.stdout.take().unwrap());
    wait_until(T, "a first status from --watch", || {
        lines().contains("\"ok\":true")
    });
    assert!(ctl(&dir, &["checkpoint", "--wait"]).status.success());
    let seq = *checkpoints(&dir).last().unwrap();
    wait_until(T, "a refresh showing the new checkpoint", || {
        lines()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .any(|a| a["last_checkpoint"]["seq"] == seq)
    });
    assert!(ctl(&dir, &["stop"]).status.success());
    assert_eq!(wait_deadline(&mut sup, T).code(), Some(75));
    // The supervisor is gone: the watcher says so and exits 0 on its own.
    let code = wait_deadline(&mut watch, T).code();
    let mut err = String::new();
    let _ = watch.stderr.take().unwrap().read_to_string(&mut err);
    reader.join().unwrap();
    let seen = lines();
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("has exited"), "{err}");
    let answers: Vec<serde_json::Value> = seen
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(answers.len() >= 2, "refreshed: {seen}");
    assert!(answers.iter().all(|a| a["ok"] == true), "{seen}");
    assert!(
        answers.iter().any(|a| a["last_checkpoint"]["seq"] == seq),
        "the refreshes show the new checkpoint: {seen}"
    );
    // Without a supervisor it fails at once, as plain `status` does.
    let out = ctl(&dir, &["status", "--watch"]);
    assert_eq!(out.status.code(), Some(69), "{}", text(&out.stderr));
}

/// Drops terminal escape sequences: OSC (`ESC ] ... BEL`) and CSI (`ESC [ ... final byte`).
fn strip_escapes(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some(']') => {
                for c in it.by_ref() {
                    if c == '\u{7}' {
                        break;
                    }
                }
            }
            Some('[') => {
                for c in it.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

#[test]
fn on_a_terminal_the_live_status_goes_to_the_title_never_into_the_jobs_lines() {
    use std::os::fd::FromRawFd;
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty fills two descriptors we then own.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are fresh and owned here.
    let (master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    // The job prints a line every 100 ms for 3 s: the status is refreshed every second.
    let mut cmd = ckpt();
    cmd.args(["run", "--every", "off", "--dir"])
        .arg(&dir)
        .args(["--", "sh", "-c"])
        .arg("i=0; while [ $i -lt 30 ]; do i=$((i+1)); echo job line $i; sleep 0.1; done")
        .env("TERM", "xterm-256color")
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    let mut sup = cmd.spawn_guarded();
    drop(cmd); // the parent's copies of the terminal's slave side
               // Read until EIO: every holder of the slave side is gone.
    let (text_of, reader) = pump(master);
    assert_eq!(wait_deadline(&mut sup, T).code(), Some(0));
    assert_no_survivors(&dir);
    wait_until(T, "the terminal to close", || reader.is_finished());
    reader.join().unwrap();
    let seen = text_of();
    let mut job_lines = 0;
    for line in strip_escapes(&seen).lines() {
        let line = line.trim_matches('\r');
        if let Some(at) = line.find("job line") {
            assert_eq!(
                at, 0,
                "the job's line was glued to other text: {line:?} in {seen:?}"
            );
            job_lines += 1;
        }
    }
    assert_eq!(job_lines, 30, "{seen:?}");
    let title_at = seen
        .rfind("\u{1b}]2;ckpt: job pid")
        .unwrap_or_else(|| panic!("no status in the title: {seen:?}"));
    assert!(
        seen[title_at..].contains("\u{1b}[23;0t"),
        "the terminal's own title is given back at the end: {seen:?}"
    );
}
