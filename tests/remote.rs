//! Remote checkpoints (`ckpt run --remote`) end to end, with the real binary and real
//! processes: against a real S3-protocol server (moto's server mode, started here on a free
//! 127.0.0.1 port; the tests say SKIPPED when `moto_server` is not installed, which
//! `scripts/setup` does) and against `file://` remotes (no server).
//!
//! Covered: a new machine (the local directory wiped) resumes from the newest remote
//! checkpoint and ends bit-identical; the server killed mid-upload and restarted (the upload is
//! retried, nothing half-visible); ckpt SIGKILLed mid-upload (no remote manifest, the next
//! run uploads it); a corrupted or deleted remote object (never restored: the next older
//! one is); planted checkpoints without a valid tag (never restored); plain http refused off
//! loopback; no secret in any log line.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ckpt::store::{Manifest, MANIFEST_NAME};
use common::*;

const DIM: usize = 8;
const SECRET: &str = "s3cr3t-ckpt-remote-test-value";

// ---------------------------------------------------------------------------------------
// A moto server on loopback

struct Moto {
    child: Option<Child>,
    port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn moto_installed() -> bool {
    Command::new("moto_server")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

macro_rules! need_moto {
    () => {
        if !moto_installed() {
            eprintln!("SKIPPED: moto_server is not installed (scripts/setup installs it: pip install 'moto[server]')");
            return;
        }
    };
}

impl Moto {
    fn start() -> Moto {
        let mut m = Moto {
            child: None,
            port: free_port(),
        };
        m.restart();
        m
    }

    /// (Re)starts the server on the same port (its state is in memory: the bucket is made
    /// again, as a durable server would still have it).
    fn restart(&mut self) {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(30), "moto_server to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        let (code, _) = self.http("PUT", "/ckpt-remote-test", b"");
        assert_eq!(code, 200, "create bucket");
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
        let port = self.port;
        wait_until(Duration::from_secs(10), "moto_server to be gone", || {
            TcpStream::connect(("127.0.0.1", port)).is_err()
        });
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP/1.1 request (moto does not check signatures, but wants one for some
    /// requests).
    fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nAuthorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00\r\nConnection: close\r\n\r\n",
            self.port,
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let head_end = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("http response");
        let head = String::from_utf8_lossy(&resp[..head_end]).to_string();
        let code = head.split(' ').nth(1).unwrap().parse().unwrap();
        let mut body = resp[head_end + 4..].to_vec();
        if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            body = dechunk(&body);
        }
        (code, body)
    }

    /// Keys under `prefix` in the bucket.
    fn keys(&self, prefix: &str) -> Vec<String> {
        let (code, body) = self.http(
            "GET",
            &format!("/ckpt-remote-test?list-type=2&prefix={prefix}"),
            b"",
        );
        assert_eq!(code, 200);
        let text = String::from_utf8_lossy(&body).to_string();
        text.split("<Key>")
            .skip(1)
            .map(|s| s.split("</Key>").next().unwrap().to_string())
            .collect()
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(std::str::from_utf8(&b[..eol]).unwrap().trim(), 16).unwrap();
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + n]);
        b = &b[eol + 2 + n + 2..];
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

// ---------------------------------------------------------------------------------------
// Runs

/// A `ckpt run --remote URL` command on `dir` with its own key under `home`.
fn ckpt_remote(dir: &Path, home: &Path, url: &str, moto: Option<&Moto>) -> Command {
    let mut c = ckpt();
    c.env("XDG_CONFIG_HOME", home.join("config"))
        .env("HOME", home)
        .env_remove("CKPT_REMOTE");
    for k in [
        "AWS_ENDPOINT",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
    ] {
        c.env_remove(k);
    }
    if let Some(m) = moto {
        c.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_ENDPOINT_URL", m.endpoint())
            .env("AWS_REGION", "us-east-1");
    }
    c.arg("run")
        .arg("--dir")
        .arg(dir)
        .args(["--remote", url, "--backoff", "10ms..20ms"]);
    c
}

fn trainer_cmd(c: &mut Command, steps: u64, step_ms: u64, digest: &Path) {
    c.arg("--").args(trainer_args(steps, DIM, step_ms, digest));
}

/// Runs the trainer under `ckpt run --remote` with periodic saves until at least `uploads`
/// checkpoints are uploaded, then stops it (exit 75).
fn run_and_stop(dir: &Path, home: &Path, url: &str, moto: Option<&Moto>, uploads: usize) {
    run_and_stop_with(dir, home, url, moto, uploads, &[])
}

fn run_and_stop_with(
    dir: &Path,
    home: &Path,
    url: &str,
    moto: Option<&Moto>,
    uploads: usize,
    extra: &[&str],
) {
    let log = dir.with_extension("log1");
    let mut c = ckpt_remote(dir, home, url, moto);
    c.args(["--every", "150ms"]).args(extra);
    trainer_cmd(&mut c, 100_000, 5, &dir.with_extension("digest1"));
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut sup = c.spawn_guarded();
    wait_until(Duration::from_secs(60), "uploads", || {
        events(dir, "uploaded").len() >= uploads
    });
    // `ckpt status` shows the remote and its newest checkpoint, and no credential.
    let out = output_deadline(
        ckpt().args(["status", "--json", "--dir"]).arg(dir),
        Duration::from_secs(30),
    );
    let st = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!st.contains(SECRET), "{st}");
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert!(
        v["remote"]["newest_uploaded"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert!(
        v["remote"]["last_upload"]["bytes"].as_u64().unwrap() > 0,
        "{st}"
    );
    signal(sup.id(), libc::SIGTERM);
    let st = wait_deadline(&mut sup, Duration::from_secs(60));
    assert_eq!(
        st.code(),
        Some(75),
        "stop: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_no_survivors(dir);
    let safe = events(dir, "remote_safe");
    assert_eq!(safe.len(), 1, "the stop's final checkpoint is uploaded");
}

/// A new machine: `dir` is gone; `ckpt run --remote` resumes and runs the trainer to the
/// end. Returns (the restored remote seq, stderr).
fn new_vm_finish(
    dir: &Path,
    home: &Path,
    url: &str,
    moto: Option<&Moto>,
    steps: u64,
) -> (Option<u64>, String) {
    let _ = std::fs::remove_dir_all(dir);
    let digest = dir.with_extension("digest2");
    let mut c = ckpt_remote(dir, home, url, moto);
    c.args(["--every", "off"]);
    trainer_cmd(&mut c, steps, 0, &digest);
    let out = output_deadline(&mut c, Duration::from_secs(120));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_no_survivors(dir);
    let got = std::fs::read_to_string(&digest).unwrap();
    assert_eq!(got.trim(), reference(steps, DIM).trim(), "{err}");
    let restored = events(dir, "remote_restored")
        .first()
        .map(|e| e["remote_seq"].as_u64().unwrap());
    (restored, err)
}

fn remote_seqs(root: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = std::fs::read_dir(root)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join(MANIFEST_NAME).exists())
                .filter_map(|e| ckpt::store::parse_seq(e.file_name().to_str().unwrap(), false))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn the_step(dir_of_ckpt: &Path) -> u64 {
    let m = Manifest::decode(&std::fs::read(dir_of_ckpt.join(MANIFEST_NAME)).unwrap()).unwrap();
    m.step.unwrap()
}

/// Total steps that end well after any checkpoint of `run_and_stop`.
fn steps_after(root_seq_dir: &Path) -> u64 {
    the_step(root_seq_dir) + 200
}

// ---------------------------------------------------------------------------------------
// file:// remotes (no server)

#[test]
fn file_remote_new_vm_resumes_bit_identical() {
    let t = tempdir();
    let dir = t.path().join("d");
    let root = t.path().join("remote");
    let url = format!("file://{}", root.display());
    run_and_stop(&dir, t.path(), &url, None, 2);
    let seqs = remote_seqs(&root);
    assert!(seqs.len() >= 2, "{seqs:?}");
    let newest = *seqs.last().unwrap();
    let newest_dir = root.join(format!("ckpt-{newest:012}"));
    assert!(newest_dir.join("MANIFEST.ckpt.sig").exists());
    let steps = steps_after(&newest_dir);
    let (restored, err) = new_vm_finish(&dir, t.path(), &url, None, steps);
    assert_eq!(restored, Some(newest), "{err}");
    assert!(err.contains("restored remote checkpoint"), "{err}");
    // The key was created owner-only.
    use std::os::unix::fs::PermissionsExt;
    let key = t.path().join("config/ckpt/remote.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn file_remote_corrupt_or_deleted_objects_are_never_restored() {
    let seed = seed("file_remote_corrupt_or_deleted_objects_are_never_restored");
    let mut rng = fastrand::Rng::with_seed(seed);
    let t = tempdir();
    let dir = t.path().join("d");
    let root = t.path().join("remote");
    let url = format!("file://{}", root.display());
    run_and_stop(&dir, t.path(), &url, None, 3);
    let seqs = remote_seqs(&root);
    assert!(seqs.len() >= 3, "{seqs:?}");
    let n = seqs.len();
    let (newest, second, third) = (seqs[n - 1], seqs[n - 2], seqs[n - 3]);
    // The newest: one byte of its state flipped; the second: its state deleted.
    let state = root.join(format!("ckpt-{newest:012}/state.postcard"));
    let mut b = std::fs::read(&state).unwrap();
    let i = rng.usize(..b.len());
    b[i] ^= 1 << rng.u8(..8);
    std::fs::write(&state, &b).unwrap();
    std::fs::remove_file(root.join(format!("ckpt-{second:012}/state.postcard"))).unwrap();
    // `ckpt verify --remote` downloads and checks every byte, and names both.
    let out = output_deadline(
        ckpt()
            .env("XDG_CONFIG_HOME", t.path().join("config"))
            .args(["verify", "--json", "--remote", &url]),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let bad: Vec<u64> = rows
        .iter()
        .filter(|r| r["ok"] == false)
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(bad, vec![second, newest], "{rows:?}");
    let steps = steps_after(&root.join(format!("ckpt-{third:012}"))) + 100;
    let (restored, err) = new_vm_finish(&dir, t.path(), &url, None, steps);
    assert_eq!(restored, Some(third), "{err}");
    let invalid: Vec<u64> = events(&dir, "remote_invalid")
        .iter()
        .map(|e| e["remote_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(invalid, vec![newest, second], "{err}");
}

/// Copies remote checkpoint `from` to a new number `to` with its manifest renumbered.
fn plant(root: &Path, from: u64, to: u64, sig: Option<&[u8]>) {
    let src = root.join(format!("ckpt-{from:012}"));
    let dst = root.join(format!("ckpt-{to:012}"));
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("state.postcard"), dst.join("state.postcard")).unwrap();
    let mut m = Manifest::decode(&std::fs::read(src.join(MANIFEST_NAME)).unwrap()).unwrap();
    m.seq = to;
    std::fs::write(dst.join(MANIFEST_NAME), m.encode()).unwrap();
    if let Some(s) = sig {
        std::fs::write(dst.join("MANIFEST.ckpt.sig"), s).unwrap();
    }
}

#[test]
fn planted_checkpoints_without_a_valid_tag_are_never_restored() {
    let t = tempdir();
    let dir = t.path().join("d");
    let root = t.path().join("remote");
    let url = format!("file://{}", root.display());
    run_and_stop(&dir, t.path(), &url, None, 2);
    let seqs = remote_seqs(&root);
    let newest = *seqs.last().unwrap();
    let good_sig =
        std::fs::read(root.join(format!("ckpt-{newest:012}/MANIFEST.ckpt.sig"))).unwrap();
    // No record; another checkpoint's record; a record with its tag changed; a record
    // signed with someone else's key (a second ckpt key).
    plant(&root, newest, newest + 10, None);
    plant(&root, newest, newest + 11, Some(&good_sig));
    let mut doc: serde_json::Value = serde_json::from_slice(&good_sig).unwrap();
    let body = doc["body"].as_str().unwrap().replace(
        &format!("\"seq\":{newest}"),
        &format!("\"seq\":{}", newest + 12),
    );
    doc["body"] = body.into();
    plant(
        &root,
        newest,
        newest + 12,
        Some(&serde_json::to_vec(&doc).unwrap()),
    );
    // Someone else's key: a second supervisor with its own key uploads its own checkpoint.
    let other_home = t.path().join("other");
    let odir = t.path().join("od");
    let oroot = t.path().join("oremote");
    run_and_stop(
        &odir,
        &other_home,
        &format!("file://{}", oroot.display()),
        None,
        1,
    );
    let on = *remote_seqs(&oroot).last().unwrap();
    let osrc = oroot.join(format!("ckpt-{on:012}"));
    let odst = root.join(format!("ckpt-{:012}", newest + 13));
    std::fs::create_dir_all(&odst).unwrap();
    for f in ["state.postcard", "MANIFEST.ckpt.sig"] {
        std::fs::copy(osrc.join(f), odst.join(f)).unwrap();
    }
    let mut m = Manifest::decode(&std::fs::read(osrc.join(MANIFEST_NAME)).unwrap()).unwrap();
    m.seq = newest + 13;
    std::fs::write(odst.join(MANIFEST_NAME), m.encode()).unwrap();

    let steps = steps_after(&root.join(format!("ckpt-{newest:012}")));
    let (restored, err) = new_vm_finish(&dir, t.path(), &url, None, steps);
    assert_eq!(restored, Some(newest), "{err}");
    let invalid: Vec<u64> = events(&dir, "remote_invalid")
        .iter()
        .map(|e| e["remote_seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        invalid,
        vec![newest + 13, newest + 12, newest + 11, newest + 10],
        "{err}"
    );
    // `ckpt list --remote` shows which ones are restorable.
    let out = output_deadline(
        ckpt()
            .env("XDG_CONFIG_HOME", t.path().join("config"))
            .args(["list", "--json", "--remote", &url]),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let bad: Vec<u64> = rows
        .iter()
        .filter(|r| r["authentic"] == false)
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(
        bad,
        vec![newest + 10, newest + 11, newest + 12, newest + 13]
    );
    assert!(rows
        .iter()
        .any(|r| r["seq"] == newest && r["authentic"] == true));
    // `ckpt gc --remote --keep 1`: older authentic ones go, planted ones are left alone.
    let out = output_deadline(
        ckpt()
            .env("XDG_CONFIG_HOME", t.path().join("config"))
            .args(["gc", "--json", "--keep", "1", "--remote", &url, "--dir"])
            .arg(t.path().join("nowhere")),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let left = remote_seqs(&root);
    // The restored checkpoint was published (and uploaded again) above the planted numbers,
    // so the job's own checkpoints never take a planted one's number.
    let expect: Vec<u64> = (newest + 10..=newest + 14).collect();
    assert_eq!(left, expect, "{v}");
    assert_eq!(v["not_authentic"].as_array().unwrap().len(), 4, "{v}");
}

#[test]
fn remote_keep_prunes_the_remote_and_flags_need_remote() {
    let t = tempdir();
    let dir = t.path().join("d");
    let root = t.path().join("remote");
    let url = format!("file://{}", root.display());
    run_and_stop_with(&dir, t.path(), &url, None, 4, &["--remote-keep", "2"]);
    assert!(!events(&dir, "remote_pruned").is_empty());
    assert!(remote_seqs(&root).len() <= 2, "{:?}", remote_seqs(&root));

    let mut c = ckpt();
    c.args(["run", "--dir"])
        .arg(t.path().join("x"))
        .args(["--remote-required", "--", "true"])
        .env_remove("CKPT_REMOTE");
    let out = output_deadline(&mut c, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------------------
// s3:// against moto

#[test]
fn s3_new_vm_resumes_bit_identical_and_no_secret_is_logged() {
    need_moto!();
    let moto = Moto::start();
    let t = tempdir();
    let dir = t.path().join("d");
    let url = "s3://ckpt-remote-test/jobs/a";
    run_and_stop(&dir, t.path(), url, Some(&moto), 2);
    let keys = moto.keys("jobs/a/");
    let newest = keys
        .iter()
        .filter(|k| k.ends_with("/MANIFEST.ckpt"))
        .filter_map(|k| ckpt::store::parse_seq(k.split('/').nth(2).unwrap(), false))
        .max()
        .unwrap();
    let step = the_step(&dir.join(format!("ckpt-{newest:012}")));
    let log1 = std::fs::read_to_string(dir.with_extension("log1")).unwrap();
    let (restored, err) = new_vm_finish(&dir, t.path(), url, Some(&moto), step + 200);
    assert_eq!(restored, Some(newest), "{err}");
    let ev = std::fs::read_to_string(dir.join(".ckpt/events.jsonl")).unwrap();
    for text in [&log1, &err, &ev] {
        assert!(!text.contains(SECRET), "a secret reached a log: {text}");
    }
}

#[test]
fn s3_plain_http_off_loopback_is_refused() {
    let t = tempdir();
    let dir = t.path().join("d");
    let mut c = ckpt_remote(&dir, t.path(), "s3://ckpt-remote-test/x", None);
    c.env("AWS_ENDPOINT_URL", "http://192.0.2.1:9000")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .args(["--", "true"]);
    let out = output_deadline(&mut c, Duration::from_secs(20));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("--remote-allow-http"), "{err}");
    assert!(!err.contains(SECRET));
}

/// A checkpoint of `mib` MiB of seeded random bytes published in `dir` with `ckpt save`.
fn big_checkpoint(dir: &Path, mib: usize, seed: u64) -> PathBuf {
    let src = dir.with_extension("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut data = vec![0u8; mib << 20];
    rng.fill(&mut data);
    std::fs::write(src.join("big.bin"), &data).unwrap();
    let out = output_deadline(
        ckpt()
            .current_dir(&src)
            .args(["save", "--dir"])
            .arg(dir)
            .arg("big.bin"),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    src.join("big.bin")
}

/// `ckpt run --remote` of a job that only sleeps: uploads the newest local checkpoint.
fn sleeper(dir: &Path, home: &Path, url: &str, moto: &Moto, log: &Path) -> Running {
    let mut c = ckpt_remote(dir, home, url, Some(moto));
    c.args(["--every", "off", "--", "sleep", "600"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    c.spawn_guarded()
}

/// A restore of `url` into the empty `dir` must give back exactly `expect`.
fn restore_matches(dir: &Path, home: &Path, url: &str, moto: &Moto, expect: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    let mut c = ckpt_remote(dir, home, url, Some(moto));
    c.args(["--every", "off", "--", "true"]);
    let out = output_deadline(&mut c, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let got = std::fs::read(dir.join("ckpt-000000000001/big.bin")).unwrap();
    assert!(
        got == std::fs::read(expect).unwrap(),
        "restored bytes differ"
    );
}

#[test]
fn s3_server_killed_mid_upload_and_restarted_upload_is_retried() {
    need_moto!();
    let seed = seed("s3_server_killed_mid_upload_and_restarted_upload_is_retried");
    let mut moto = Moto::start();
    let t = tempdir();
    let dir = t.path().join("d");
    let big = big_checkpoint(&dir, 48, seed);
    let url = "s3://ckpt-remote-test/jobs/b";
    let log = t.path().join("log");
    let mut sup = sleeper(&dir, t.path(), url, &moto, &log);
    // Kill the server while the first parts are in flight.
    wait_until(Duration::from_secs(30), "the upload to start", || {
        !events(&dir, "remote").is_empty()
    });
    std::thread::sleep(Duration::from_millis(300 + seed % 700));
    assert!(
        events(&dir, "uploaded").is_empty(),
        "upload too fast to cut"
    );
    moto.kill();
    wait_until(Duration::from_secs(120), "a failed attempt", || {
        !events(&dir, "upload_failed").is_empty()
    });
    moto.restart();
    // Nothing of the checkpoint is visible until its manifest is; poll while it uploads.
    wait_until(Duration::from_secs(120), "the retried upload", || {
        let keys = moto.keys("jobs/b/");
        if keys.iter().any(|k| k.ends_with("/MANIFEST.ckpt")) {
            assert!(keys.iter().any(|k| k.ends_with("/big.bin")), "{keys:?}");
            assert!(
                keys.iter().any(|k| k.ends_with("/MANIFEST.ckpt.sig")),
                "{keys:?}"
            );
        }
        !events(&dir, "uploaded").is_empty()
    });
    signal(sup.id(), libc::SIGTERM);
    let st = wait_deadline(&mut sup, Duration::from_secs(60));
    assert_eq!(st.code(), Some(75));
    assert_no_survivors(&dir);
    restore_matches(&t.path().join("vm2"), t.path(), url, &moto, &big);
}

#[test]
fn s3_ckpt_sigkilled_mid_upload_leaves_nothing_visible_and_the_next_run_uploads() {
    need_moto!();
    let seed = seed("s3_ckpt_sigkilled_mid_upload_leaves_nothing_visible_and_the_next_run_uploads");
    let moto = Moto::start();
    let t = tempdir();
    let dir = t.path().join("d");
    let big = big_checkpoint(&dir, 48, seed);
    let url = "s3://ckpt-remote-test/jobs/c";
    let log = t.path().join("log");
    let mut sup = sleeper(&dir, t.path(), url, &moto, &log);
    wait_until(Duration::from_secs(30), "the upload to start", || {
        !events(&dir, "remote").is_empty()
    });
    std::thread::sleep(Duration::from_millis(200 + seed % 800));
    assert!(
        events(&dir, "uploaded").is_empty(),
        "upload too fast to cut"
    );
    signal(sup.id(), libc::SIGKILL);
    let _ = wait_deadline(&mut sup, Duration::from_secs(10));
    drop(sup);
    wait_until(Duration::from_secs(10), "the job to die with ckpt", || {
        job_processes(&dir).is_empty()
    });
    let keys = moto.keys("jobs/c/");
    assert!(
        !keys.iter().any(|k| k.ends_with("/MANIFEST.ckpt")),
        "a half-uploaded checkpoint is visible: {keys:?}"
    );
    // A new machine now would find nothing (a fresh start, not a broken restore).
    // The next run on this machine uploads it.
    let mut sup = sleeper(&dir, t.path(), url, &moto, &log);
    wait_until(Duration::from_secs(120), "the upload", || {
        !events(&dir, "uploaded").is_empty()
    });
    signal(sup.id(), libc::SIGTERM);
    let st = wait_deadline(&mut sup, Duration::from_secs(60));
    assert_eq!(st.code(), Some(75));
    assert_no_survivors(&dir);
    restore_matches(&t.path().join("vm2"), t.path(), url, &moto, &big);
}

#[test]
fn s3_deleted_remote_manifest_falls_back_and_required_stop_fails_loudly() {
    need_moto!();
    let mut moto = Moto::start();
    let t = tempdir();
    let dir = t.path().join("d");
    let url = "s3://ckpt-remote-test/jobs/d";
    run_and_stop(&dir, t.path(), url, Some(&moto), 2);
    let keys = moto.keys("jobs/d/");
    let mut seqs: Vec<u64> = keys
        .iter()
        .filter(|k| k.ends_with("/MANIFEST.ckpt"))
        .filter_map(|k| ckpt::store::parse_seq(k.split('/').nth(2).unwrap(), false))
        .collect();
    seqs.sort();
    let (newest, older) = (seqs[seqs.len() - 1], seqs[seqs.len() - 2]);
    // The newest's record deleted: it must not be restored; the older one is.
    let (code, _) = moto.http(
        "DELETE",
        &format!("/ckpt-remote-test/jobs/d/ckpt-{newest:012}/MANIFEST.ckpt.sig"),
        b"",
    );
    assert!(code == 204 || code == 200, "{code}");
    let step = the_step(&dir.join(format!("ckpt-{newest:012}")));
    let (restored, err) = new_vm_finish(&dir, t.path(), url, Some(&moto), step + 200);
    assert_eq!(restored, Some(older), "{err}");

    // --remote-required with the server gone: the stop fails with 77.
    moto.kill();
    let dir2 = t.path().join("d2");
    let mut c = ckpt_remote(&dir2, t.path(), url, Some(&moto));
    c.args([
        "--every",
        "150ms",
        "--remote-required",
        "--remote-stop-timeout",
        "2s",
    ]);
    trainer_cmd(&mut c, 100_000, 5, &dir2.with_extension("digest"));
    let log = t.path().join("log2");
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut sup = c.spawn_guarded();
    wait_until(Duration::from_secs(60), "a local commit", || {
        !events(&dir2, "committed").is_empty()
    });
    signal(sup.id(), libc::SIGTERM);
    let st = wait_deadline(&mut sup, Duration::from_secs(60));
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(st.code(), Some(77), "{err}");
    assert!(err.contains("is NOT on"), "{err}");
    assert_no_survivors(&dir2);
}

#[test]
fn service_unit_waits_for_the_final_upload() {
    let out = output_deadline(
        ckpt()
            .env_remove("CKPT_REMOTE")
            .args([
                "service",
                "--name",
                "train",
                "--dir",
                "/var/ckpt/train",
                "--",
            ])
            .args([
                "--remote",
                "s3://bucket/train",
                "--remote-stop-timeout",
                "30s",
            ])
            .args(["--", "python", "train.py"]),
        Duration::from_secs(20),
    );
    let unit = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // --grace 20s + --kill-after 5s + --remote-stop-timeout 30s + 10s.
    assert!(unit.contains("TimeoutStopSec=65\n"), "{unit}");
    assert!(unit.contains("--remote s3://bucket/train"), "{unit}");
}

/// The end of the machine an [`aws_notice`] server announces, once set.
type NoticeEnd = std::sync::Arc<std::sync::Mutex<Option<std::time::SystemTime>>>;

/// An AWS metadata service on loopback that, once its end is set, announces a spot
/// termination at that time (IMDSv2: a token, then `spot/instance-action`).
fn aws_notice() -> (String, NoticeEnd) {
    use std::io::BufRead;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let armed: NoticeEnd = Default::default();
    let end_at = armed.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            let _ = r.read_line(&mut first);
            loop {
                let mut h = String::new();
                if r.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
            }
            let body = if first.starts_with("PUT /latest/api/token") {
                "token".to_string()
            } else if first.starts_with("GET /latest/meta-data/spot/instance-action") {
                match *end_at.lock().unwrap() {
                    Some(end) => {
                        let t = ckpt::integrations::cloud::rfc3339(end);
                        format!(r#"{{"action": "terminate", "time": "{t}"}}"#)
                    }
                    None => String::new(),
                }
            } else {
                String::new()
            };
            let code = if body.is_empty() { 404 } else { 200 };
            let mut conn = conn;
            let _ = write!(
                conn,
                "HTTP/1.1 {code} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, armed)
}

#[test]
fn a_notice_stop_uploads_the_final_checkpoint_and_says_how_long_before_the_end() {
    let t = tempdir();
    let dir = t.path().join("d");
    let root = t.path().join("remote");
    let url = format!("file://{}", root.display());
    let (meta, arm) = aws_notice();
    let mut c = ckpt_remote(&dir, t.path(), &url, None);
    c.args(["--every", "off", "--preemption-notice", "aws"])
        .args(["--metadata-url", &meta, "--preemption-poll", "200ms"]);
    trainer_cmd(&mut c, 100_000, 5, &dir.with_extension("digest"));
    let log = t.path().join("log");
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut sup = c.spawn_guarded();
    wait_until(Duration::from_secs(30), "the job's client", || {
        !events(&dir, "hello").is_empty()
    });
    *arm.lock().unwrap() = Some(std::time::SystemTime::now() + Duration::from_secs(100));
    let st = wait_deadline(&mut sup, Duration::from_secs(60));
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(st.code(), Some(75), "{err}");
    assert_no_survivors(&dir);
    let safe = events(&dir, "remote_safe");
    assert_eq!(safe.len(), 1, "{err}");
    let seq = safe[0]["seq"].as_u64().unwrap();
    assert_eq!(remote_seqs(&root).last(), Some(&seq), "{err}");
    assert!(err.contains("before the machine's announced end"), "{err}");
}
