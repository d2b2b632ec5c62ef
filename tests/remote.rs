//! Remote checkpoints (`ckpt run --remote`) end to end, with the real binary and real
//! processes: against a real S3-protocol server (moto's server mode, started here on a free
//! 127.0.0.1 port; the tests say SKIPPED when `moto_server` is not installed, which
//! `scripts/setup` does, and fail instead when `CI` is set) and against `file://` remotes
//! (no server).
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
/// Further credentials that must never be shown (`remote::redact` hides the access key id
/// too): set by [`WithSessionToken`], checked everywhere [`SECRET`] is.
const SESSION_TOKEN: &str = "t0ken-ckpt-remote-test-session-value";
const ACCESS_KEY_ID: &str = "AKIACKPTREMOTETEST01";

/// Every credential value a test sets (the Azurite account key too).
fn secrets() -> [&'static str; 4] {
    [SECRET, SESSION_TOKEN, ACCESS_KEY_ID, AZ_KEY]
}

fn assert_no_secret(what: &str, text: &str) {
    for s in secrets() {
        assert!(!text.contains(s), "a credential reached {what}: {text}");
    }
}

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

/// Skips the test when moto is missing, except under `CI`: a CI run must not pass with
/// the remote tests silently skipped.
macro_rules! need_moto {
    () => {
        if !moto_installed() {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI is set but moto_server is not installed (scripts/setup installs it: pip install 'moto[server]')"
            );
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
fn ckpt_remote(dir: &Path, home: &Path, url: &str, moto: Option<&dyn Server>) -> Command {
    let mut c = ckpt_env(home, moto);
    c.arg("run")
        .arg("--dir")
        .arg(dir)
        .args(["--remote", url, "--backoff", "10ms..20ms"]);
    c
}

/// A `ckpt` command with its key under `home` and, with `moto`, the credentials and the
/// endpoint of that server.
fn ckpt_env(home: &Path, moto: Option<&dyn Server>) -> Command {
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
    for k in [
        "AZURE_STORAGE_USE_EMULATOR",
        "AZURITE_BLOB_STORAGE_URL",
        "AZURE_STORAGE_ACCOUNT_NAME",
        "AZURE_STORAGE_ACCOUNT_KEY",
        "AZURE_STORAGE_ENDPOINT",
    ] {
        c.env_remove(k);
    }
    if let Some(m) = moto {
        m.env(&mut c);
    }
    c
}

/// An object-storage server the tests run on loopback: what ckpt needs in its environment.
trait Server {
    fn env(&self, c: &mut Command);
}

impl Server for Moto {
    fn env(&self, c: &mut Command) {
        c.env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", SECRET)
            .env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_REGION", "us-east-1");
    }
}

/// Moto with temporary credentials: an access key id of its own and a session token (moto
/// accepts any), so that the test can look for each in the logs.
struct WithSessionToken<'a>(&'a Moto);

impl Server for WithSessionToken<'_> {
    fn env(&self, c: &mut Command) {
        self.0.env(c);
        c.env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SESSION_TOKEN", SESSION_TOKEN);
    }
}

fn trainer_cmd(c: &mut Command, steps: u64, step_ms: u64, digest: &Path) {
    c.arg("--").args(trainer_args(steps, DIM, step_ms, digest));
}

/// Runs the trainer under `ckpt run --remote` with periodic saves until at least `uploads`
/// checkpoints are uploaded, then stops it (exit 75).
fn run_and_stop(dir: &Path, home: &Path, url: &str, moto: Option<&dyn Server>, uploads: usize) {
    run_and_stop_with(dir, home, url, moto, uploads, &[])
}

fn run_and_stop_with(
    dir: &Path,
    home: &Path,
    url: &str,
    moto: Option<&dyn Server>,
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
    assert_no_secret("ckpt status --json", &st);
    let v: serde_json::Value = serde_json::from_str(&st).unwrap();
    assert!(
        v["remote"]["newest_uploaded"].as_u64().unwrap() >= 1,
        "{st}"
    );
    assert!(
        v["remote"]["last_upload"]["bytes"].as_u64().unwrap() > 0,
        "{st}"
    );
    assert!(v["remote"].get("behind_ms").is_some(), "{st}");
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
    moto: Option<&dyn Server>,
    steps: u64,
) -> (Option<u64>, String) {
    new_vm_finish_with(dir, home, url, moto, steps, &["--every", "off"])
}

fn new_vm_finish_with(
    dir: &Path,
    home: &Path,
    url: &str,
    moto: Option<&dyn Server>,
    steps: u64,
    extra: &[&str],
) -> (Option<u64>, String) {
    let _ = std::fs::remove_dir_all(dir);
    let digest = dir.with_extension("digest2");
    let mut c = ckpt_remote(dir, home, url, moto);
    c.args(extra);
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
    // `ckpt gc --remote --keep 1`: older authentic ones go, planted ones are left alone, and
    // so does a leftover without a manifest older than the checkpoint kept (an upload cut
    // short).
    let leftover = root.join(format!("ckpt-{:012}", newest + 5));
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("state.bin"), b"partial").unwrap();
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
    assert_eq!(
        v["leftovers_removed"],
        serde_json::json!([newest + 5]),
        "{v}"
    );
    assert!(!leftover.exists(), "{v}");
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
    // A leftover without a manifest older than every kept checkpoint (an upload cut short,
    // a multi-rank checkpoint whose shards never all came) goes with the next retention.
    let oldest = remote_seqs(&root)[0];
    let left = root.join(format!("ckpt-{:012}", oldest - 1));
    std::fs::create_dir_all(left.join("rank-00000")).unwrap();
    std::fs::write(left.join("rank-00000/state.bin"), b"partial").unwrap();
    let step = the_step(&root.join(format!("ckpt-{:012}", remote_seqs(&root)[1])));
    let mut c = ckpt_remote(&dir, t.path(), &url, None);
    c.args(["--every", "100ms", "--remote-keep", "2"]);
    trainer_cmd(&mut c, step + 100, 5, &dir.with_extension("digest3"));
    let out = output_deadline(&mut c, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !left.exists(),
        "{:?}",
        std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect::<Vec<_>>()
    );
    assert!(remote_seqs(&root).len() <= 2, "{:?}", remote_seqs(&root));

    let mut c = ckpt();
    c.args(["run", "--dir"])
        .arg(t.path().join("x"))
        .args(["--remote-required", "--", "true"])
        .env_remove("CKPT_REMOTE");
    let out = output_deadline(&mut c, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(64), "{}", text(&out.stderr));
}

/// A `ckpt` command with its key under `home` (no server) and its output, within a deadline.
fn run_ckpt(home: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> std::process::Output {
    let mut c = ckpt_env(home, None);
    c.args(args.iter().map(|a| a.as_ref()));
    output_deadline(&mut c, Duration::from_secs(60))
}

/// `ckpt gc --json --dry-run --keep 1 --remote URL --dir DIR`: what retention would remove.
fn gc_dry_run_keep_1(home: &Path, url: &str, dir: &Path) -> std::process::Output {
    run_ckpt(
        home,
        &[
            &"gc",
            &"--json",
            &"--dry-run",
            &"--keep",
            &"1",
            &"--remote",
            &url,
            &"--dir",
            &dir,
        ],
    )
}

fn ok_json(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    json_of(out)
}

fn seqs_of(v: &serde_json::Value) -> Vec<u64> {
    let mut s: Vec<u64> = v
        .as_array()
        .unwrap_or(&Vec::new())
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    s.sort();
    s
}

/// Tags travel with the remote: a tag made while the directory is uploaded somewhere is
/// recorded there (signed), so remote retention on a new machine, whose directory holds no
/// tag, still keeps the tagged checkpoint; a tag only in the local directory is kept by
/// retention run there; `ckpt untag` on the new machine removes the remote's tag; a tag
/// record that does not authenticate protects nothing and is not overwritten.
#[test]
fn remote_retention_keeps_tagged_checkpoints_on_a_new_vm_with_an_empty_directory() {
    let t = tempdir();
    let home = t.path();
    let dir = t.path().join("d");
    let root = t.path().join("remote");
    let url = format!("file://{}", root.display());
    run_and_stop(&dir, home, &url, None, 4);
    let all = remote_seqs(&root);
    // Tags name local checkpoints (local retention has removed the oldest ones here).
    let local = remote_seqs(&dir);
    assert!(local.len() >= 3 && all.len() >= 4, "{local:?} {all:?}");
    let (best, mine, newest) = (local[0], local[1], *all.last().unwrap());
    assert_eq!(newest, *local.last().unwrap());
    // A tag made while no remote is known (remotes.json aside): local only.
    let remembered = dir.join(".ckpt/remotes.json");
    std::fs::rename(&remembered, t.path().join("remotes.json")).unwrap();
    let out = run_ckpt(
        home,
        &[
            &"tag",
            &"--json",
            &"--dir",
            &dir,
            &mine.to_string(),
            &"mine",
        ],
    );
    assert_eq!(ok_json(&out)["remote"], serde_json::json!([]));
    std::fs::rename(t.path().join("remotes.json"), &remembered).unwrap();
    // A tag made with the remote known: recorded there too.
    let out = run_ckpt(
        home,
        &[
            &"tag",
            &"--json",
            &"--dir",
            &dir,
            &best.to_string(),
            &"best",
        ],
    );
    let v = ok_json(&out);
    assert_eq!(v["remote"][0]["recorded"], true, "{v}");
    assert!(root.join("TAGS.ckpt.sig").exists());
    let out = run_ckpt(home, &[&"list", &"--json", &"--remote", &url]);
    let rows = ok_json(&out);
    let row = |s: u64| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["seq"] == s)
            .unwrap()
            .clone()
    };
    assert_eq!(row(best)["tags"], serde_json::json!(["best"]), "{rows}");
    assert_eq!(row(mine)["tags"], serde_json::json!([]), "{rows}");
    // The remote's tag names its checkpoint in commands that read one.
    let out = run_ckpt(home, &[&"show", &"--json", &"--remote", &url, &"best"]);
    assert_eq!(ok_json(&out)["seq"], best);
    // Retention by hand on this machine keeps both tags (the local-only one too).
    let out = gc_dry_run_keep_1(home, &url, &dir);
    let v = ok_json(&out);
    let expect: Vec<u64> = all
        .iter()
        .copied()
        .filter(|s| ![best, mine, newest].contains(s))
        .collect();
    assert!(!expect.is_empty());
    assert_eq!(seqs_of(&v["would_remove"]), expect, "{v}");
    assert_eq!(seqs_of(&v["tagged"]), vec![best, mine], "{v}");

    // A new VM: the directory is gone; the job resumes from the remote with --remote-keep 1.
    std::fs::remove_dir_all(&dir).unwrap();
    run_and_stop_with(&dir, home, &url, None, 2, &["--remote-keep", "1"]);
    assert!(!events(&dir, "remote_pruned").is_empty());
    let last = events(&dir, "uploaded")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap();
    assert!(last > newest);
    // The tagged one survives (the remote's record), the rest (the local-only tag was on
    // the lost machine) is pruned.
    assert_eq!(remote_seqs(&root), vec![best, last]);
    // `ckpt untag` on the new machine removes a tag only the remote holds.
    let out = run_ckpt(home, &[&"untag", &"--json", &"--dir", &dir, &"best"]);
    let v = ok_json(&out);
    assert_eq!(v["seq"], best, "{v}");
    assert_eq!(v["remote"][0]["changed"], true, "{v}");
    let out = gc_dry_run_keep_1(home, &url, &dir);
    assert_eq!(seqs_of(&ok_json(&out)["would_remove"]), vec![best]);
    // A tag record that does not authenticate (planted: another key) protects nothing, and
    // `ckpt tag` does not overwrite it (exit 77, the local tag stands).
    let body = format!("{{\"v\":1,\"kind\":\"tags\",\"tags\":{{\"evil\":{best}}},\"t_ms\":0}}");
    let forged = serde_json::json!({ "alg": "hmac-sha256", "key": "0123456789abcdef", "body": body, "tag": "00".repeat(32) });
    std::fs::write(root.join("TAGS.ckpt.sig"), forged.to_string()).unwrap();
    let out = run_ckpt(home, &[&"tag", &"--dir", &dir, &"latest", &"x"]);
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("not overwritten"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(root.join("TAGS.ckpt.sig")).unwrap(),
        forged.to_string()
    );
    let out = run_ckpt(
        home,
        &[
            &"gc",
            &"--json",
            &"--keep",
            &"1",
            &"--remote",
            &url,
            &"--dir",
            &dir,
        ],
    );
    let v = ok_json(&out);
    assert_eq!(seqs_of(&v["removed"]), vec![best], "{v}");
    assert!(v["tags_invalid"].is_string(), "{v}");
    assert_eq!(remote_seqs(&root), vec![last]);
}

/// Key rotation (`--remote-key NEW --remote-key OLD`): checkpoints signed with the old key
/// still verify and restore, the new key signs everything new; a checkpoint signed only
/// with a key not given is refused, naming the fix.
#[test]
fn key_rotation_old_checkpoints_restore_new_ones_are_signed_with_the_new_key() {
    let t = tempdir();
    let home = t.path();
    let dir = t.path().join("d");
    let root = t.path().join("remote");
    let url = format!("file://{}", root.display());
    let keys = t.path().join("keys");
    let (old, new) = (keys.join("old.key"), keys.join("new.key"));
    let (old_s, new_s) = (
        old.to_string_lossy().to_string(),
        new.to_string_lossy().to_string(),
    );
    run_and_stop_with(&dir, home, &url, None, 2, &["--remote-key", &old_s]);
    let key_old = events(&dir, "remote")[0]["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    let signer = |s: u64| -> String {
        let raw = std::fs::read(root.join(format!("ckpt-{s:012}/MANIFEST.ckpt.sig"))).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        v["key"].as_str().unwrap().to_string()
    };
    let before = remote_seqs(&root);
    assert!(before.iter().all(|s| signer(*s) == key_old), "{before:?}");
    let newest = *before.last().unwrap();
    let step = the_step(&root.join(format!("ckpt-{newest:012}")));
    // The switch: a new VM with both keys (the new one created on first use) restores the
    // old-signed newest checkpoint and finishes bit-identical.
    let (restored, err) = new_vm_finish_with(
        &dir,
        home,
        &url,
        None,
        step + 200,
        &[
            "--every",
            "off",
            "--remote-key",
            &new_s,
            "--remote-key",
            &old_s,
        ],
    );
    assert_eq!(restored, Some(newest), "{err}");
    let key_new = events(&dir, "remote")[0]["key_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(key_new, key_old);
    // A checkpoint made after the switch is signed with the new key.
    let f = t.path().join("after.bin");
    std::fs::write(&f, b"after the switch").unwrap();
    let out = run_ckpt(
        home,
        &[
            &"save",
            &"--json",
            &"--remote",
            &url,
            &"--remote-key",
            &new_s,
            &"--remote-key",
            &old_s,
            &"--dir",
            &dir,
            &f,
        ],
    );
    assert_eq!(ok_json(&out)["remote"]["uploaded"], true);
    let after: Vec<u64> = remote_seqs(&root)
        .into_iter()
        .filter(|s| !before.contains(s))
        .collect();
    assert!(!after.is_empty(), "{err}");
    assert!(after.iter().all(|s| signer(*s) == key_new), "{after:?}");
    let fin: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.join("FINISHED.ckpt.sig")).unwrap()).unwrap();
    assert_eq!(fin["key"], key_new.as_str());
    // Both keys: everything authenticates.
    let out = run_ckpt(
        home,
        &[
            &"list",
            &"--json",
            &"--remote",
            &url,
            &"--remote-key",
            &new_s,
            &"--remote-key",
            &old_s,
        ],
    );
    let rows = ok_json(&out);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .all(|r| r["authentic"] == true),
        "{rows}"
    );
    // The new key alone: the old-signed checkpoints are refused, naming the fix.
    let out = run_ckpt(
        home,
        &[
            &"list",
            &"--json",
            &"--remote",
            &url,
            &"--remote-key",
            &new_s,
        ],
    );
    let rows = ok_json(&out);
    for r in rows.as_array().unwrap() {
        let s = r["seq"].as_u64().unwrap();
        assert_eq!(
            r["authentic"],
            serde_json::json!(after.contains(&s)),
            "{rows}"
        );
        if !after.contains(&s) {
            let e = r["error"].as_str().unwrap();
            assert!(e.contains(&key_old) && e.contains("--remote-key"), "{e}");
        }
    }
    let to = t.path().join("exp");
    let out = run_ckpt(
        home,
        &[
            &"export",
            &"--remote",
            &url,
            &newest.to_string(),
            &"--remote-key",
            &new_s,
            &"--to",
            &to,
        ],
    );
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("copy the key file"),
        "{}",
        text(&out.stderr)
    );
    assert!(!to.exists());
    let out = run_ckpt(
        home,
        &[
            &"verify",
            &"--remote",
            &url,
            &newest.to_string(),
            &"--remote-key",
            &new_s,
        ],
    );
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
    // With the old key listed too it exports.
    let out = run_ckpt(
        home,
        &[
            &"export",
            &"--remote",
            &url,
            &newest.to_string(),
            &"--remote-key",
            &new_s,
            &"--remote-key",
            &old_s,
            &"--to",
            &to,
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(the_step(&to), step);
    // A key that signed nothing here: nothing authenticates.
    let other = keys.join("other.key").to_string_lossy().to_string();
    let out = run_ckpt(
        home,
        &[&"verify", &"--remote", &url, &"--remote-key", &other],
    );
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
}

/// Two machines share a job's key as docs/cloud.md says: the key file copied from A's key
/// path to B's. Before the copy B refuses A's checkpoints, naming the fix; after it, B
/// exports and restores them.
#[test]
fn two_machines_need_the_same_key_file_and_work_once_it_is_copied() {
    let t = tempdir();
    let (a, b) = (t.path().join("vm-a"), t.path().join("vm-b"));
    let root = t.path().join("remote");
    let url = format!("file://{}", root.display());
    let f = t.path().join("weights.bin");
    std::fs::write(&f, b"weights of machine A").unwrap();
    let out = run_ckpt(
        &a,
        &[
            &"save",
            &"--json",
            &"--remote",
            &url,
            &"--dir",
            &a.join("d"),
            &f,
        ],
    );
    assert_eq!(ok_json(&out)["remote"]["uploaded"], true);
    let key_a = a.join("config/ckpt/remote.key");
    assert!(key_a.exists());
    // B without A's key (its own is made on first use): refused, naming the fix.
    let to = b.join("exp");
    let out = run_ckpt(&b, &[&"export", &"--remote", &url, &"1", &"--to", &to]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    let key_b = b.join("config/ckpt/remote.key");
    assert!(
        err.contains("copy the key file") && err.contains(&*key_b.to_string_lossy()),
        "{err}"
    );
    assert!(!to.exists());
    let out = run_ckpt(&b, &[&"export", &"--remote", &url, &"latest", &"--to", &to]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("copy the key file"),
        "{}",
        text(&out.stderr)
    );
    // The key copied to B's key path (mode 0600, as docs/cloud.md says).
    std::fs::copy(&key_a, &key_b).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_b, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = run_ckpt(&b, &[&"export", &"--remote", &url, &"latest", &"--to", &to]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(to.join("weights.bin")).unwrap(),
        b"weights of machine A"
    );
    let out = run_ckpt(&b, &[&"import", &"--json", &"--dir", &b.join("d"), &to]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // And a run on B restores A's checkpoint before its job starts.
    let db = b.join("run");
    let out = run_ckpt(
        &b,
        &[&"run", &"--remote", &url, &"--dir", &db, &"--", &"true"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        events(&db, "remote_restored").len(),
        1,
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read(db.join("ckpt-000000000001/weights.bin")).unwrap(),
        b"weights of machine A"
    );
    assert_no_survivors(&db);
}

/// Every file under `root` with its bytes (a remote's state, to compare before and after).
fn tree_bytes(root: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if e.file_type().unwrap().is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A new VM without the job's key file: `ckpt run --remote` warns once (`remote_not_ours`,
/// naming the count, A's key id, B's key path and the fix), starts the job from scratch, and
/// its checkpoints numbered like A's are conflicts: not uploaded, never `remote_safe`, A's
/// objects untouched; the stop with `--remote-required` exits 77 naming the conflict. Past
/// A's numbers B uploads, and its `--remote-keep` removes none of A's. With A's key copied,
/// B restores A's newest checkpoint. (Before the fix, B's uploader took A's
/// same-numbered checkpoints as its own: `upload_present`, `remote_safe`, exit 75.)
#[test]
fn a_vm_without_the_key_warns_and_never_takes_anothers_checkpoints_as_uploaded() {
    let t = tempdir();
    let (a, b) = (t.path().join("vm-a"), t.path().join("vm-b"));
    let root = t.path().join("remote");
    let url = format!("file://{}", root.display());
    let (da, db) = (a.join("d"), b.join("d"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    run_and_stop(&da, &a, &url, None, 6);
    let theirs = remote_seqs(&root);
    let newest = *theirs.last().unwrap();
    assert!(theirs.len() >= 6, "{theirs:?}");
    let before = tree_bytes(&root);
    let key_a = a.join("config/ckpt/remote.key");
    let key_b = b.join("config/ckpt/remote.key");
    let id_a = {
        let sig: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join(format!("ckpt-{newest:012}/MANIFEST.ckpt.sig"))).unwrap(),
        )
        .unwrap();
        sig["key"].as_str().unwrap().to_string()
    };

    // B: its own (new) key, an empty directory, the same job and remote.
    let log = db.with_extension("log1");
    let mut c = ckpt_remote(&db, &b, &url, None);
    c.args([
        "--every",
        "150ms",
        "--remote-required",
        "--remote-stop-timeout",
        "20s",
    ]);
    trainer_cmd(&mut c, 100_000, 5, &db.with_extension("digest1"));
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut sup = c.spawn_guarded();
    wait_until(
        Duration::from_secs(60),
        "two checkpoints handled by B's uploader",
        || {
            ["remote_conflict", "upload_present", "uploaded"]
                .iter()
                .map(|e| events(&db, e).len())
                .sum::<usize>()
                >= 2
        },
    );
    signal(sup.id(), libc::SIGTERM);
    let st = wait_deadline(&mut sup, Duration::from_secs(60));
    let err = std::fs::read_to_string(&log).unwrap();
    assert_no_survivors(&db);
    assert!(key_b.exists());
    let key_b_s = key_b.display().to_string();
    // Nothing of B's counts as off the machine: A's same-numbered checkpoints are not B's.
    for ev in ["uploaded", "upload_present", "remote_safe"] {
        assert!(events(&db, ev).is_empty(), "{ev}: {err}");
    }
    assert_eq!(st.code(), Some(77), "{err}");

    // The launch warning: once, with the count, A's key id, B's key path and the fix.
    let warned = events(&db, "remote_not_ours");
    assert_eq!(warned.len(), 1, "{err}");
    assert_eq!(
        warned[0]["count"].as_u64(),
        Some(theirs.len() as u64),
        "{err}"
    );
    assert_eq!(warned[0]["keys"], serde_json::json!([id_a]), "{err}");
    assert_eq!(warned[0]["key_path"].as_str(), Some(&*key_b_s), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("none authenticates with this machine's key"))
        .unwrap_or_else(|| panic!("no warning: {err}"));
    for want in [
        &*format!("holds {} checkpoints", theirs.len()),
        &id_a,
        &key_b_s,
        "copy the key file",
        "--remote-key FILE",
        "starts from its beginning",
    ] {
        assert!(line.contains(want), "{want:?} not in {line}");
    }
    assert!(events(&db, "remote_restored").is_empty(), "{err}");
    // One warning: each checkpoint's `remote_invalid` is in the events, not on stderr.
    assert_eq!(events(&db, "remote_invalid").len(), theirs.len(), "{err}");
    assert!(!err.contains("is not restored"), "{err}");

    // B's checkpoints numbered like A's: conflicts, never uploaded nor safe.
    let b_final = ckpt::store::parse_seq(
        std::fs::read_dir(&db)
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with("ckpt-"))
            .max()
            .unwrap()
            .as_str(),
        false,
    )
    .unwrap();
    assert!(
        b_final <= newest,
        "B's final checkpoint {b_final} is above A's {newest}: {err}"
    );
    let conflicts = events(&db, "remote_conflict");
    assert!(
        conflicts.iter().any(|e| e["seq"].as_u64() == Some(b_final)),
        "{err}"
    );
    for e in &conflicts {
        assert_eq!(e["key"].as_str(), Some(&*id_a), "{e}");
        assert_eq!(e["key_path"].as_str(), Some(&*key_b_s), "{e}");
    }
    assert!(
        err.contains(&format!("checkpoint {b_final} is NOT uploaded")),
        "{err}"
    );
    // The stop: exit 77, naming the conflict.
    let missing = events(&db, "remote_missing");
    assert_eq!(missing.len(), 1, "{err}");
    assert_eq!(missing[0]["seq"].as_u64(), Some(b_final), "{err}");
    assert!(missing[0]["conflict"].as_str().is_some(), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains(&format!("checkpoint {b_final} is NOT on")))
        .unwrap_or_else(|| panic!("no stop line: {err}"));
    assert!(
        line.contains("already holds a different checkpoint") && line.contains("--remote-required"),
        "{line}"
    );
    // A's records are untouched, byte for byte.
    assert_eq!(remote_seqs(&root), theirs);
    assert!(tree_bytes(&root) == before, "the remote changed");

    // B again, with `--remote-keep 1`, until its numbers pass A's: those are uploaded
    // (signed with B's key), and B's retention leaves A's checkpoints alone (they do not
    // authenticate with B's key: they are not B's to remove).
    let mut c = ckpt_remote(&db, &b, &url, None);
    c.args(["--every", "150ms", "--remote-keep", "1"]);
    trainer_cmd(&mut c, 100_000, 5, &db.with_extension("digest1"));
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut sup = c.spawn_guarded();
    wait_until(Duration::from_secs(60), "two uploads on B", || {
        events(&db, "uploaded").len() >= 2
    });
    signal(sup.id(), libc::SIGTERM);
    let st = wait_deadline(&mut sup, Duration::from_secs(60));
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(st.code(), Some(75), "{err}");
    assert_no_survivors(&db);
    assert!(
        events(&db, "uploaded")
            .iter()
            .all(|e| e["seq"].as_u64().unwrap() > newest),
        "{err}"
    );
    let after = tree_bytes(&root);
    for (p, bytes) in &before {
        assert!(
            after.get(p) == Some(bytes),
            "{} changed or went: {err}",
            p.display()
        );
    }
    let mine = remote_seqs(&root);
    assert!(mine.len() == theirs.len() + 1, "{mine:?}: {err}");

    // A's key copied to B: B restores A's newest, and the job finishes from there.
    std::fs::copy(&key_a, &key_b).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key_b, std::fs::Permissions::from_mode(0o600)).unwrap();
    let steps = steps_after(&root.join(format!("ckpt-{newest:012}")));
    let (restored, err) = new_vm_finish(&db, &b, &url, None, steps);
    assert_eq!(restored, Some(newest), "{err}");
    assert!(!err.contains("none authenticates"), "{err}");
    assert_no_survivors(&db);
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
    let creds = WithSessionToken(&moto);
    run_and_stop(&dir, t.path(), url, Some(&creds), 2);
    let keys = moto.keys("jobs/a/");
    let newest = keys
        .iter()
        .filter(|k| k.ends_with("/MANIFEST.ckpt"))
        .filter_map(|k| ckpt::store::parse_seq(k.split('/').nth(2).unwrap(), false))
        .max()
        .unwrap();
    let step = the_step(&dir.join(format!("ckpt-{newest:012}")));
    let log1 = std::fs::read_to_string(dir.with_extension("log1")).unwrap();
    let (restored, err) = new_vm_finish(&dir, t.path(), url, Some(&creds), step + 200);
    assert_eq!(restored, Some(newest), "{err}");
    let ev = std::fs::read_to_string(dir.join(".ckpt/events.jsonl")).unwrap();
    assert_no_secret("the first run's stderr", &log1);
    assert_no_secret("the new VM's stderr", &err);
    assert_no_secret("events.jsonl", &ev);
    // An error from the server (a missing bucket) and a failed upload, with every
    // credential in the environment: none of them is shown.
    let bad = "s3://no-such-bucket-ckpt/x";
    let f = t.path().join("f.bin");
    std::fs::write(&f, b"x").unwrap();
    let out = output_deadline(
        ckpt_env(t.path(), Some(&creds))
            .args(["save", "--json", "--remote", bad, "--dir"])
            .arg(t.path().join("d3"))
            .arg(&f),
        Duration::from_secs(120),
    );
    assert_eq!(out.status.code(), Some(77), "{}", text(&out.stderr));
    assert_no_secret("a failed upload's stderr", &text(&out.stderr));
    assert_no_secret("a failed upload's --json", &text(&out.stdout));
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

// ---------------------------------------------------------------------------------------
// save / show / export / import with --remote (moto)

fn moto_get(moto: &Moto, key: &str) -> Vec<u8> {
    let (code, body) = moto.http("GET", &format!("/ckpt-remote-test/{key}"), b"");
    assert_eq!(code, 200, "GET {key}");
    body
}

fn moto_put(moto: &Moto, key: &str, body: &[u8]) {
    let (code, _) = moto.http("PUT", &format!("/ckpt-remote-test/{key}"), body);
    assert_eq!(code, 200, "PUT {key}");
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}\nstderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    })
}

#[test]
fn s3_save_show_export_import_with_remote() {
    need_moto!();
    let seed = seed("s3_save_show_export_import_with_remote");
    let mut rng = fastrand::Rng::with_seed(seed);
    let moto = Moto::start();
    let t = tempdir();
    let home = t.path();
    let url = "s3://ckpt-remote-test/cli/a";
    let dir = t.path().join("d");
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("data")).unwrap();
    let small: Vec<u8> = (0..1000).map(|_| rng.u8(..)).collect();
    let big: Vec<u8> = (0..(12 << 20)).map(|_| rng.u8(..)).collect();
    std::fs::write(src.join("small.bin"), &small).unwrap();
    std::fs::write(src.join("data/big.bin"), &big).unwrap();
    let run = |moto: &Moto, args: &[&str], extra: &[&Path]| {
        let mut c = ckpt_env(home, Some(moto));
        c.args(args);
        for p in extra {
            c.arg(p);
        }
        output_deadline(&mut c, Duration::from_secs(120))
    };

    // `ckpt save --remote`: durable locally, then uploaded (multipart for the 12 MiB file)
    // and reported; the job-facing command waits for the upload.
    let d = dir.to_str().unwrap();
    let out = run(
        &moto,
        &["save", "--json", "--step", "5", "--remote", url, "--dir", d],
        &[&src.join("small.bin"), &src.join("data")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = json_of(&out);
    assert_eq!(v["seq"], 1, "{v}");
    assert_eq!(v["remote"]["uploaded"], true, "{v}");
    assert!(v["remote"]["bytes"].as_u64().unwrap() > 12 << 20, "{v}");
    let keys = moto.keys("cli/a/");
    for k in [
        "data/big.bin",
        "small.bin",
        "MANIFEST.ckpt.sig",
        "MANIFEST.ckpt",
    ] {
        assert!(
            keys.contains(&format!("cli/a/ckpt-000000000001/{k}")),
            "{k} not uploaded: {keys:?}"
        );
    }
    // Human form, a second checkpoint.
    let out = run(
        &moto,
        &["save", "--step", "6", "--remote", url, "--dir", d],
        &[&src.join("small.bin")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("uploaded checkpoint 2 to s3://ckpt-remote-test/cli/a"),
        "{err}"
    );
    assert!(!err.contains(SECRET), "{err}");

    // `ckpt show --remote`: the authenticated manifest; --verify reads every byte.
    let out = run(&moto, &["show", "--json", "--remote", url, "1"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = json_of(&out);
    assert_eq!(v["step"], 5, "{v}");
    assert_eq!(v["remote"]["authenticated"], true, "{v}");
    let mut names: Vec<&str> = v["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["data/big.bin", "small.bin"], "{v}");
    let out = run(&moto, &["show", "--verify", "--remote", url, "latest"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let so = text(&out.stdout);
    assert!(
        so.contains("checkpoint 2") && so.contains("step:     6"),
        "{so}"
    );
    assert!(
        so.contains("authenticated") && so.contains("verified: ok"),
        "{so}"
    );

    // `ckpt export --remote`: downloaded, checked, and bit-identical; `ckpt import` takes it.
    let exp = t.path().join("exp");
    let e = exp.to_str().unwrap();
    let out = run(
        &moto,
        &["export", "--json", "--remote", url, "1", "--to", e],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(exp.join("small.bin")).unwrap(), small);
    assert!(std::fs::read(exp.join("data/big.bin")).unwrap() == big);
    let d2 = t.path().join("d2");
    let out = run(
        &moto,
        &["import", "--json", "--dir", d2.to_str().unwrap(), e],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // `ckpt import --remote`: committed locally, then uploaded to (another) remote.
    let url2 = "s3://ckpt-remote-test/cli/b";
    let d3 = t.path().join("d3");
    let out = run(
        &moto,
        &[
            "import",
            "--json",
            "--remote",
            url2,
            "--dir",
            d3.to_str().unwrap(),
            e,
        ],
        &[],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v = json_of(&out);
    assert_eq!(v["remote"]["uploaded"], true, "{v}");
    let out = run(&moto, &["list", "--json", "--remote", url2], &[]);
    let rows = json_of(&out);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["authentic"], true, "{rows}");
    // A second writer on that prefix: its checkpoint 1 is another one, never overwritten;
    // the local checkpoint stays, the command fails with 77.
    let d4 = t.path().join("d4");
    let out = run(
        &moto,
        &["save", "--remote", url2, "--dir", d4.to_str().unwrap()],
        &[&src.join("small.bin")],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("another checkpoint 1"), "{err}");
    assert_eq!(checkpoints(&d4), vec![1]);

    // A corrupted remote object: the manifest still authenticates (show says so), but
    // --verify and export download every byte and refuse it; nothing is left at --to.
    let mut bad = small.clone();
    let i = rng.usize(..bad.len());
    bad[i] ^= 1 << rng.u8(..8);
    moto_put(&moto, "cli/a/ckpt-000000000001/small.bin", &bad);
    let out = run(&moto, &["show", "--remote", url, "1", "--verify"], &[]);
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("verified: INVALID"));
    let exp2 = t.path().join("exp2");
    let out = run(
        &moto,
        &[
            "export",
            "--remote",
            url,
            "1",
            "--to",
            exp2.to_str().unwrap(),
        ],
        &[],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!exp2.exists());
    let leftovers: Vec<String> = std::fs::read_dir(t.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".export."))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A planted checkpoint 9 (checkpoint 2's files and manifest, renumbered, no valid
    // record): show and export refuse it by number; `latest` skips it and says so.
    let mut m =
        Manifest::decode(&moto_get(&moto, "cli/a/ckpt-000000000002/MANIFEST.ckpt")).unwrap();
    m.seq = 9;
    moto_put(&moto, "cli/a/ckpt-000000000009/small.bin", &small);
    moto_put(
        &moto,
        "cli/a/ckpt-000000000009/MANIFEST.ckpt.sig",
        &moto_get(&moto, "cli/a/ckpt-000000000002/MANIFEST.ckpt.sig"),
    );
    moto_put(&moto, "cli/a/ckpt-000000000009/MANIFEST.ckpt", &m.encode());
    let out = run(&moto, &["show", "--remote", url, "9"], &[]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains("NOT RESTORABLE"), "{err}");
    let out = run(
        &moto,
        &[
            "export",
            "--remote",
            url,
            "9",
            "--to",
            exp2.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(65), "{}", text(&out.stderr));
    assert!(!exp2.exists());
    let out = run(&moto, &["show", "--json", "--remote", url, "latest"], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json_of(&out)["seq"], 2);
    assert!(text(&out.stderr).contains("skipped remote checkpoint 9"));

    // The server down: the save is durable locally, the upload fails, exit 77.
    let mut moto = moto;
    moto.kill();
    let out = run(
        &moto,
        &["save", "--json", "--remote", url, "--dir", d],
        &[&src.join("small.bin")],
    );
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(
        err.contains("checkpoint 3 is saved in") && err.contains("NOT uploaded"),
        "{err}"
    );
    assert_eq!(json_of(&out)["remote"]["uploaded"], false);
    assert_eq!(checkpoints(&dir), vec![1, 2, 3]);
    assert!(!err.contains(SECRET), "{err}");
}

// ---------------------------------------------------------------------------------------
// The finished marker, stats and log

#[test]
fn file_remote_finished_job_is_not_run_again_on_a_new_vm() {
    let t = tempdir();
    let dir = t.path().join("d");
    let root = t.path().join("remote");
    let url = format!("file://{}", root.display());
    let digest = dir.with_extension("digest");
    let finish = |extra: &[&str]| {
        let _ = std::fs::remove_file(&digest);
        let mut c = ckpt_remote(&dir, t.path(), &url, None);
        c.args(["--every", "100ms"]).args(extra);
        trainer_cmd(&mut c, 100, 5, &digest);
        let out = output_deadline(&mut c, Duration::from_secs(120));
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_no_survivors(&dir);
        text(&out.stderr)
    };
    let err = finish(&[]);
    assert_eq!(events(&dir, "remote_finished").len(), 1, "{err}");
    assert!(root.join("FINISHED.ckpt.sig").exists());
    let uploads = events(&dir, "uploaded");
    assert!(!uploads.is_empty(), "{err}");

    // `ckpt stats` sums the uploads; `ckpt log --uploads` shows only the remote's events.
    let out = output_deadline(
        ckpt().args(["stats", "--json", "--dir"]).arg(&dir),
        Duration::from_secs(30),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = json_of(&out);
    let r = &s["remote"];
    assert_eq!(r["uploads"].as_u64().unwrap(), uploads.len() as u64, "{s}");
    let bytes: u64 = uploads.iter().map(|e| e["bytes"].as_u64().unwrap()).sum();
    assert_eq!(r["bytes_uploaded"].as_u64().unwrap(), bytes, "{s}");
    let mut lags: Vec<u64> = uploads
        .iter()
        .map(|e| e["lag_ms"].as_u64().unwrap())
        .collect();
    lags.sort();
    assert_eq!(r["lag_ms_max"].as_u64(), lags.last().copied(), "{s}");
    assert_eq!(
        r["lag_ms_median"].as_u64(),
        Some(lags[lags.len() / 2]),
        "{s}"
    );
    assert_eq!(
        r["newest_uploaded"].as_u64(),
        uploads.iter().filter_map(|e| e["seq"].as_u64()).max(),
        "{s}"
    );
    assert!(r["url"].as_str().unwrap().starts_with("file://"), "{s}");
    let out = output_deadline(
        ckpt().args(["stats", "--dir"]).arg(&dir),
        Duration::from_secs(30),
    );
    let so = text(&out.stdout);
    assert!(
        so.contains(&format!("uploads:            {} to file://", uploads.len())),
        "{so}"
    );
    let out = output_deadline(
        ckpt()
            .args(["log", "--uploads", "--json", "--dir"])
            .arg(&dir),
        Duration::from_secs(30),
    );
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = lines.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert!(
        names.contains(&"uploaded") && names.contains(&"remote_finished"),
        "{names:?}"
    );
    assert!(
        names
            .iter()
            .all(|n| *n == "uploaded" || n.starts_with("upload_") || n.starts_with("remote")),
        "{names:?}"
    );
    let out = output_deadline(
        ckpt().args(["log", "--uploads", "--dir"]).arg(&dir),
        Duration::from_secs(30),
    );
    let so = text(&out.stdout);
    assert!(so.lines().last().unwrap().starts_with("uploads:"), "{so}");

    // A new VM: the disk is gone; the remote says the job finished: exit 0 at once, the
    // job is not run again.
    std::fs::remove_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(&digest);
    let mut c = ckpt_remote(&dir, t.path(), &url, None);
    trainer_cmd(&mut c, 100, 5, &digest);
    let out = output_deadline(&mut c, Duration::from_secs(60));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("already finished"), "{err}");
    assert!(!digest.exists(), "the job ran again: {err}");
    assert!(dir.join(".ckpt/finished").exists());
    assert_eq!(events(&dir, "already_finished").len(), 1);

    // A finished record someone else signed (another key) counts for nothing: the job
    // runs, resumes from the newest remote checkpoint, and finishes.
    let ohome = t.path().join("other");
    let oroot = t.path().join("oremote");
    let mut c = ckpt_remote(
        &t.path().join("od"),
        &ohome,
        &format!("file://{}", oroot.display()),
        None,
    );
    c.args(["--", "true"]);
    let out = output_deadline(&mut c, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    std::fs::copy(
        oroot.join("FINISHED.ckpt.sig"),
        root.join("FINISHED.ckpt.sig"),
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let err = finish(&[]);
    assert_eq!(events(&dir, "remote_finished_invalid").len(), 1, "{err}");
    assert_eq!(events(&dir, "remote_restored").len(), 1, "{err}");
    assert!(digest.exists());

    // `--again` on a new VM: the remote record is removed and the job runs once more.
    std::fs::remove_dir_all(&dir).unwrap();
    let err = finish(&["--again"]);
    assert!(events(&dir, "already_finished").is_empty(), "{err}");
    assert!(digest.exists());
    assert_eq!(events(&dir, "remote_finished").len(), 1, "{err}");
}

// ---------------------------------------------------------------------------------------
// az:// against Azurite, Azure's official storage emulator (npm package `azurite`)

struct Azurite {
    child: Option<Child>,
    port: u16,
    _data: tempfile::TempDir,
}

fn azurite_installed() -> bool {
    Command::new("azurite-blob")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Azurite's documented development account and key.
const AZ_ACCOUNT: &str = "devstoreaccount1";
const AZ_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64_encode(b: &[u8]) -> String {
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn b64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for ch in s.bytes().filter(|c| *c != b'=') {
        acc = acc << 6 | B64.iter().position(|x| *x == ch).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// The current time as HTTP wants it (RFC 1123, GMT).
fn http_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let wd = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let mon = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(m - 1) as usize];
    format!(
        "{wd}, {d:02} {mon} {y} {:02}:{:02}:{:02} GMT",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

impl Azurite {
    fn start(container: &str) -> Azurite {
        let data = tempdir();
        let port = free_port();
        let child = Command::new("azurite-blob")
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(data.path())
            .args(["--silent", "--skipApiVersionCheck"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start azurite-blob");
        let az = Azurite {
            child: Some(child),
            port,
            _data: data,
        };
        wait_until(Duration::from_secs(60), "azurite to listen", || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        // Create the container (object_store does not): Put Container, signed with the
        // emulator's shared key.
        use hmac::Mac;
        let date = http_date();
        let version = "2021-08-06";
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{AZ_ACCOUNT}/{AZ_ACCOUNT}/{container}\nrestype:container"
        );
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&b64_decode(AZ_KEY)).unwrap();
        mac.update(to_sign.as_bytes());
        let sig = b64_encode(&mac.finalize().into_bytes());
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            s,
            "PUT /{AZ_ACCOUNT}/{container}?restype=container HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nx-ms-date: {date}\r\nx-ms-version: {version}\r\nAuthorization: SharedKey {AZ_ACCOUNT}:{sig}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let resp = String::from_utf8_lossy(&resp).to_string();
        assert!(resp.starts_with("HTTP/1.1 201"), "create container: {resp}");
        az
    }
}

impl Server for Azurite {
    fn env(&self, c: &mut Command) {
        // The account and its key given explicitly (the emulator's own), so that the test can
        // look for the key in the logs.
        c.env("AZURE_STORAGE_USE_EMULATOR", "true")
            .env(
                "AZURITE_BLOB_STORAGE_URL",
                format!("http://127.0.0.1:{}", self.port),
            )
            .env("AZURE_STORAGE_ACCOUNT_NAME", AZ_ACCOUNT)
            .env("AZURE_STORAGE_ACCOUNT_KEY", AZ_KEY);
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

#[test]
fn az_azurite_new_vm_resumes_bit_identical_save_and_export_round_trip() {
    if !azurite_installed() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set but azurite-blob is not installed (scripts/setup installs it: npm install -g azurite)"
        );
        eprintln!(
            "SKIPPED: azurite is not installed (scripts/setup installs it: npm install -g azurite)"
        );
        return;
    }
    let az = Azurite::start("ckpt");
    let t = tempdir();
    let dir = t.path().join("d");
    let url = "az://ckpt/jobs/a";
    run_and_stop(&dir, t.path(), url, Some(&az), 2);
    let newest = events(&dir, "uploaded")
        .iter()
        .filter_map(|e| e["seq"].as_u64())
        .max()
        .unwrap();
    let step = the_step(&dir.join(format!("ckpt-{newest:012}")));
    // Listed and authenticated through the emulator.
    let out = output_deadline(
        ckpt_env(t.path(), Some(&az)).args(["list", "--json", "--remote", url]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows = json_of(&out);
    assert!(
        rows.as_array()
            .unwrap()
            .iter()
            .any(|r| r["seq"] == newest && r["authentic"] == true),
        "{rows}"
    );
    // A new VM resumes from it, bit-identical; the job's finish is recorded there too.
    let log1 = std::fs::read_to_string(dir.with_extension("log1")).unwrap();
    let (restored, err) = new_vm_finish(&dir, t.path(), url, Some(&az), step + 200);
    assert_eq!(restored, Some(newest), "{err}");
    assert_eq!(events(&dir, "remote_finished").len(), 1, "{err}");
    // The account key (the secret here; `run_and_stop` checked `ckpt status --json`) is in
    // no log.
    assert_no_secret("the first run's stderr", &log1);
    assert_no_secret("the new VM's stderr", &err);
    assert_no_secret(
        "events.jsonl",
        &std::fs::read_to_string(dir.join(".ckpt/events.jsonl")).unwrap(),
    );
    // `ckpt save --remote az://` and `ckpt export --remote az://` round trip.
    let f = t.path().join("blob.bin");
    std::fs::write(&f, b"hello azurite").unwrap();
    let d2 = t.path().join("d2");
    let out = output_deadline(
        ckpt_env(t.path(), Some(&az))
            .args(["save", "--json", "--remote", "az://ckpt/saves", "--dir"])
            .arg(&d2)
            .arg(&f),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(json_of(&out)["remote"]["uploaded"], true);
    let exp = t.path().join("exp");
    let out = output_deadline(
        ckpt_env(t.path(), Some(&az))
            .args(["export", "--remote", "az://ckpt/saves", "latest", "--to"])
            .arg(&exp),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        std::fs::read(exp.join("blob.bin")).unwrap(),
        b"hello azurite"
    );
}

// ---------------------------------------------------------------------------------------
// Multi-rank: each shard uploaded by its rank's node, the manifest when every shard is up

fn rank_trainer_args(steps: u64, out: &Path) -> Vec<String> {
    vec![
        test_bin("rank_trainer").display().to_string(),
        "--steps".into(),
        steps.to_string(),
        "--step-ms".into(),
        "3".into(),
        "--save-ms".into(),
        "20".into(),
        "--pad-kib".into(),
        "64".into(),
        "--out".into(),
        out.display().to_string(),
    ]
}

fn rank_job(c: &mut Command, world: u32, steps: u64, out: &Path) {
    c.arg("--")
        .arg(test_bin("rank_launcher"))
        .args(["--n", &world.to_string(), "--"])
        .args(rank_trainer_args(steps, out));
}

/// Remote checkpoint numbers under `prefix` with (a) a manifest, (b) the shard record of
/// each rank.
fn remote_parts(moto: &Moto, prefix: &str) -> (Vec<u64>, Vec<(u64, u32)>) {
    let mut manifests = Vec::new();
    let mut shards = Vec::new();
    for k in moto.keys(prefix) {
        let mut it = k.trim_start_matches(prefix).split('/');
        let (Some(d), Some(name)) = (it.next(), it.next()) else {
            continue;
        };
        let Some(seq) = ckpt::store::parse_seq(d, false) else {
            continue;
        };
        if name == "MANIFEST.ckpt" {
            manifests.push(seq);
        } else if let Some(r) = name
            .strip_prefix("MANIFEST.ckpt.rank-")
            .and_then(|r| r.strip_suffix(".sig"))
        {
            shards.push((seq, r.parse().unwrap()));
        }
    }
    manifests.sort();
    shards.sort();
    (manifests, shards)
}

#[test]
fn s3_multi_rank_each_node_uploads_its_shards_and_the_manifest_waits_for_all() {
    need_moto!();
    let moto = Moto::start();
    let t = tempdir();
    let home = t.path();
    let dir = t.path().join("d");
    let out = t.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let url = "s3://ckpt-remote-test/mr";

    // "Node A": the supervisor, uploading rank 0's shards only. Nobody uploads rank 1's:
    // shard records of rank 0 appear, never a manifest.
    let log = t.path().join("sup.log");
    let mut c = ckpt_remote(&dir, home, url, Some(&moto));
    c.args([
        "--every",
        "150ms",
        "--remote-ranks",
        "0",
        "--remote-stop-timeout",
        "30s",
    ]);
    rank_job(&mut c, 2, 1_000_000, &out);
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut sup = c.spawn_guarded();
    wait_until(
        Duration::from_secs(90),
        "rank 0's shards of two checkpoints",
        || {
            remote_parts(&moto, "mr/")
                .1
                .iter()
                .filter(|(_, r)| *r == 0)
                .count()
                >= 2
        },
    );
    let (manifests, shards) = remote_parts(&moto, "mr/");
    assert!(
        manifests.is_empty(),
        "a manifest without rank 1's shard: {manifests:?}"
    );
    assert!(shards.iter().all(|(_, r)| *r == 0), "{shards:?}");
    assert!(
        moto.keys("mr/").iter().all(|k| !k.contains("/rank-00001/")),
        "rank 1's files were uploaded by node A"
    );

    // "Node B": `ckpt upload --follow --ranks 1` uploads rank 1's shards; whichever node
    // completes a checkpoint writes its manifest.
    let mut agent = ckpt_env(home, Some(&moto));
    agent
        .env("CKPT_NODE", "node-b")
        .args([
            "upload", "--follow", "--json", "--poll", "100ms", "--ranks", "1",
        ])
        .args(["--remote", url, "--dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut agent = agent.spawn_guarded();
    wait_until(Duration::from_secs(90), "a remote manifest", || {
        !remote_parts(&moto, "mr/").0.is_empty()
    });
    // Stop the job: its final checkpoint gets off the machine once node B's shard is up.
    signal(sup.id(), libc::SIGTERM);
    let st = wait_deadline(&mut sup, Duration::from_secs(90));
    let err = std::fs::read_to_string(&log).unwrap();
    assert_eq!(st.code(), Some(75), "{err}");
    assert_eq!(events(&dir, "remote_safe").len(), 1, "{err}");
    signal(agent.id(), libc::SIGTERM);
    let st = wait_deadline(&mut agent, Duration::from_secs(30));
    assert_eq!(st.code(), Some(0));
    assert_no_survivors(&dir);
    let (manifests, shards) = remote_parts(&moto, "mr/");
    for m in &manifests {
        assert!(
            shards.contains(&(*m, 0)) && shards.contains(&(*m, 1)),
            "manifest {m} without both shard records: {shards:?}"
        );
    }
    let newest = *manifests.last().unwrap();
    assert_eq!(Some(newest), checkpoints(&dir).last().copied());

    // Deterministic: to a second prefix, node B alone: the manifest is not written; `ckpt
    // list --remote` shows nothing; then node C takes every unclaimed shard and completes it.
    let url2 = "s3://ckpt-remote-test/mr2";
    let seq = newest.to_string();
    let up = |node: &str, extra: &[&str]| {
        let out = output_deadline(
            ckpt_env(home, Some(&moto))
                .env("CKPT_NODE", node)
                .args(["upload", "--json", "--remote", url2, "--dir"])
                .arg(&dir)
                .args(extra)
                .arg(&seq),
            Duration::from_secs(60),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        json_of(&out)
    };
    let v = up("node-b", &["--ranks", "1"]);
    assert_eq!(v["uploaded"], serde_json::json!([1]), "{v}");
    assert_eq!(v["published"], false, "{v}");
    assert_eq!(v["missing"], serde_json::json!([0]), "{v}");
    let (m2, s2) = remote_parts(&moto, "mr2/");
    assert!(m2.is_empty(), "{m2:?}");
    assert_eq!(s2, vec![(newest, 1)]);
    assert!(!moto
        .keys("mr2/")
        .iter()
        .any(|k| k.ends_with("MANIFEST.ckpt.sig")));
    let out = output_deadline(
        ckpt_env(home, Some(&moto)).args(["list", "--json", "--remote", url2]),
        Duration::from_secs(30),
    );
    assert_eq!(json_of(&out), serde_json::json!([]));
    let v = up("node-c", &[]);
    assert_eq!(v["uploaded"], serde_json::json!([0]), "{v}");
    assert_eq!(v["others"][0]["rank"], 1, "{v}");
    assert!(
        v["others"][0]["holder"]
            .as_str()
            .unwrap()
            .starts_with("node-b"),
        "{v}"
    );
    assert_eq!(v["published"], true, "{v}");
    assert_eq!(remote_parts(&moto, "mr2/").0, vec![newest]);

    // A new machine resumes the two-rank job from the remote and ends bit-identical.
    let step = {
        let m = Manifest::decode(&moto_get(
            &moto,
            &format!("mr2/ckpt-{newest:012}/MANIFEST.ckpt"),
        ))
        .unwrap();
        assert_eq!(m.world_size, Some(2));
        m.step.unwrap()
    };
    let steps = step + 100;
    let dir2 = t.path().join("d2");
    let out2 = t.path().join("out2");
    std::fs::create_dir_all(&out2).unwrap();
    let mut c = ckpt_remote(&dir2, home, url2, Some(&moto));
    c.args(["--every", "off"]);
    rank_job(&mut c, 2, steps, &out2);
    let o = output_deadline(&mut c, Duration::from_secs(120));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(events(&dir2, "remote_restored").len(), 1, "{err}");
    assert_eq!(
        ranks::combined(2, &out2),
        ranks::reference(2, steps),
        "{err}"
    );
    assert_no_survivors(&dir2);
}

/// docs/cloud.md's "By hand" recipe, line by line as written (the bucket and /tmp replaced).
#[test]
fn cloud_md_by_hand_recipe_runs_as_written() {
    need_moto!();
    let moto = Moto::start();
    let t = tempdir();
    let home = t.path().join("home");
    let cwd = t.path().join("work");
    std::fs::create_dir_all(cwd.join("data")).unwrap();
    std::fs::write(cwd.join("model.pt"), b"weights 7000").unwrap();
    std::fs::write(cwd.join("data/shard-0"), b"data").unwrap();
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/cloud.md"))
        .unwrap();
    let block = doc
        .split("6. **By hand")
        .nth(1)
        .unwrap()
        .split("```")
        .nth(1)
        .unwrap();
    let tmp = t.path().join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let mut ran = 0;
    for line in block
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("ckpt "))
    {
        let cmd = line.split('#').next().unwrap().trim();
        let cmd = cmd
            .replace("s3://my-bucket", "s3://ckpt-remote-test")
            .replace("/tmp/", &format!("{}/", tmp.display()));
        let args: Vec<&str> = cmd.split_whitespace().skip(1).collect();
        let out = output_deadline(
            ckpt_env(&home, Some(&moto)).current_dir(&cwd).args(&args),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "{line}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        ran += 1;
    }
    assert_eq!(ran, 6, "{block}");
    assert_eq!(
        std::fs::read(tmp.join("model-7000/model.pt")).unwrap(),
        b"weights 7000"
    );
    for prefix in ["train/", "other/", "third/"] {
        assert!(
            moto.keys(prefix)
                .contains(&format!("{prefix}ckpt-000000000001/MANIFEST.ckpt")),
            "{prefix}: {:?}",
            moto.keys(prefix)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Multi-rank: an uploader that dies holding a claim; nodes with node-local directories

/// A two-rank job on `dir` (no remote) stopped once it has at least `n` checkpoints; returns
/// them.
fn two_rank_checkpoints(home: &Path, dir: &Path, out: &Path, n: usize) -> Vec<u64> {
    std::fs::create_dir_all(out).unwrap();
    let log = dir.with_extension("log");
    let mut c = ckpt_env(home, None);
    c.arg("run")
        .arg("--dir")
        .arg(dir)
        .args(["--every", "150ms", "--backoff", "10ms..20ms"]);
    rank_job(&mut c, 2, 1_000_000, out);
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut sup = c.spawn_guarded();
    wait_until(Duration::from_secs(90), "two-rank checkpoints", || {
        checkpoints(dir).len() >= n
    });
    signal(sup.id(), libc::SIGTERM);
    let st = wait_deadline(&mut sup, Duration::from_secs(60));
    assert_eq!(
        st.code(),
        Some(75),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert_no_survivors(dir);
    checkpoints(dir)
}

/// `ckpt upload --json` of checkpoint `seq` of `dir` to `url` as node `node`, with `lease`
/// as `CKPT_UPLOAD_LEASE` if given.
fn upload_as(
    (home, moto): (&Path, &Moto),
    node: &str,
    dir: &Path,
    url: &str,
    seq: u64,
    extra: &[&str],
    lease: Option<&str>,
) -> serde_json::Value {
    let mut c = ckpt_env(home, Some(moto));
    c.env("CKPT_NODE", node)
        .envs(lease.map(|l| ("CKPT_UPLOAD_LEASE", l)))
        .args(["upload", "--json", "--remote", url, "--dir"])
        .arg(dir)
        .args(extra)
        .arg(seq.to_string());
    let out = output_deadline(&mut c, Duration::from_secs(90));
    assert!(out.status.success(), "{}", text(&out.stderr));
    json_of(&out)
}

/// A new machine resumes the two-rank job from remote checkpoint `seq` under `prefix` and
/// ends with the uninterrupted run's digest.
fn new_vm_two_ranks(
    home: &Path,
    moto: &Moto,
    url: &str,
    prefix: &str,
    seq: u64,
    at: &Path,
    extra: &[&str],
) {
    let m = Manifest::decode(&moto_get(
        moto,
        &format!("{prefix}ckpt-{seq:012}/MANIFEST.ckpt"),
    ))
    .unwrap();
    assert_eq!(m.world_size, Some(2));
    let steps = m.step.unwrap() + 100;
    let dir = at.join("d");
    let out = at.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let mut c = ckpt_remote(&dir, home, url, Some(moto));
    c.args(["--every", "off"]).args(extra);
    rank_job(&mut c, 2, steps, &out);
    let o = output_deadline(&mut c, Duration::from_secs(120));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let restored = events(&dir, "remote_restored");
    assert_eq!(restored.len(), 1, "{err}");
    assert_eq!(restored[0]["remote_seq"], seq, "{err}");
    assert_eq!(
        ranks::combined(2, &out),
        ranks::reference(2, steps),
        "{err}"
    );
    assert_no_survivors(&dir);
}

/// The claim files of `dir` (names).
fn claim_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join(".ckpt/uploads"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("ckpt-"))
                .collect()
        })
        .unwrap_or_default()
}

/// An uploader of node `node` claims rank `rank`'s shard of checkpoint `seq` and dies before
/// its shard record is up: the server is down meanwhile (its requests are being retried),
/// so the claim is certainly made and the record certainly not; then the uploader is
/// SIGKILLed and the server restarted.
fn die_holding_claim(
    home: &Path,
    moto: &mut Moto,
    dir: &Path,
    url: &str,
    seq: u64,
    rank: u32,
    node: &str,
) {
    moto.kill();
    let mut b = ckpt_env(home, Some(moto));
    b.env("CKPT_NODE", node)
        .args([
            "upload",
            "--json",
            "--ranks",
            &rank.to_string(),
            "--remote",
            url,
            "--dir",
        ])
        .arg(dir)
        .arg(seq.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut b = b.spawn_guarded();
    wait_until(Duration::from_secs(30), "the uploader's claim", || {
        claim_files(dir)
            .iter()
            .any(|n| n.starts_with(&format!("ckpt-{seq:012}.rank-{rank:05}.")))
    });
    signal(b.id(), libc::SIGKILL);
    let _ = wait_deadline(&mut b, Duration::from_secs(10));
    moto.restart();
}

#[test]
fn s3_a_shard_claimed_by_an_uploader_that_died_is_taken_over_after_its_lease() {
    need_moto!();
    let mut moto = Moto::start();
    let t = tempdir();
    let home = t.path();
    let dir = t.path().join("d");
    let url = "s3://ckpt-remote-test/lease";
    let seq = *two_rank_checkpoints(home, &dir, &t.path().join("out"), 2)
        .last()
        .unwrap();

    // Node B's uploader claims rank 1's shard and dies before its shard record is up.
    die_holding_claim(home, &mut moto, &dir, url, seq, 1, "node-b");

    // Node A uploads rank 0: the manifest waits for rank 1, whose claim is node B's.
    let v = upload_as(
        (home, &moto),
        "node-a",
        &dir,
        url,
        seq,
        &["--ranks", "0"],
        None,
    );
    assert_eq!(v["uploaded"], serde_json::json!([0]), "{v}");
    assert_eq!(v["published"], false, "{v}");
    assert_eq!(v["missing"], serde_json::json!([1]), "{v}");
    // While node B's lease runs, its claim is respected by every other node.
    let v = upload_as((home, &moto), "node-c", &dir, url, seq, &[], Some("10m"));
    assert_eq!(v["published"], false, "{v}");
    assert!(
        v["others"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["rank"] == 1 && o["holder"].as_str().unwrap().starts_with("node-b")),
        "{v}"
    );
    assert_eq!(remote_parts(&moto, "lease/").0, Vec::<u64>::new());

    // Once it ran out (no renewal: node B is dead), node C checks its copy of the shard,
    // takes the claim over, uploads it and writes the manifest.
    let v = upload_as((home, &moto), "node-c", &dir, url, seq, &[], Some("1ms"));
    assert_eq!(v["published"], true, "{v}");
    let took = v["taken_over"].as_array().unwrap();
    assert!(
        took.iter().any(|o| o["rank"] == 1
            && o["from"].as_str().unwrap().starts_with("node-b")
            && o["from"].as_str().unwrap().contains("lease")),
        "{v}"
    );
    let (manifests, shards) = remote_parts(&moto, "lease/");
    assert_eq!(manifests, vec![seq]);
    assert!(shards.contains(&(seq, 0)) && shards.contains(&(seq, 1)));
    let out = output_deadline(
        ckpt_env(home, Some(&moto)).args(["verify", "--remote", url]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));

    // A new machine resumes from it and ends bit-identical.
    new_vm_two_ranks(home, &moto, url, "lease/", seq, &t.path().join("vm2"), &[]);
}

/// Copies checkpoint `seq` of `from` into `to` with rank `rank`'s shard only (a node-local
/// disk holds its own ranks' shards).
fn copy_node_local(from: &Path, to: &Path, seq: u64, rank: u32) {
    let name = format!("ckpt-{seq:012}");
    let st = Command::new("cp")
        .arg("-a")
        .arg(from.join(&name))
        .arg(to.join(&name))
        .status()
        .unwrap();
    assert!(st.success());
    for e in std::fs::read_dir(to.join(&name)).unwrap().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("rank-") && n != format!("rank-{rank:05}") {
            std::fs::remove_dir_all(e.path()).unwrap();
        }
    }
}

/// A `ckpt upload --follow --ranks R` agent of node `node` on `dir`.
fn follower(home: &Path, moto: &Moto, node: &str, dir: &Path, url: &str, rank: u32) -> Running {
    let mut c = ckpt_env(home, Some(moto));
    c.env("CKPT_NODE", node)
        .args(["upload", "--follow", "--poll", "100ms", "--ranks"])
        .arg(rank.to_string())
        .args(["--remote", url, "--dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.with_extension(format!("{node}.log"))).unwrap());
    c.spawn_guarded()
}

#[test]
fn s3_two_nodes_with_node_local_directories_killed_and_restarted_independently() {
    need_moto!();
    let mut moto = Moto::start();
    let t = tempdir();
    let home = t.path();
    let shared = t.path().join("shared");
    let url = "s3://ckpt-remote-test/nl";
    let seqs = two_rank_checkpoints(home, &shared, &t.path().join("out"), 3);
    let (old, new) = (seqs[seqs.len() - 2], seqs[seqs.len() - 1]);
    // Two "nodes": their own directories, each with its own rank's shard of `old` only.
    let (da, db) = (t.path().join("node-a"), t.path().join("node-b"));
    for (d, rank) in [(&da, 0), (&db, 1)] {
        std::fs::create_dir_all(d.join(".ckpt")).unwrap();
        copy_node_local(&shared, d, old, rank);
    }

    // Node B's uploader claims rank 1 of `old` while the server is down, and is SIGKILLed.
    moto.kill();
    let mut b = follower(home, &moto, "node-b", &db, url, 1);
    wait_until(Duration::from_secs(60), "node B's claim", || {
        claim_files(&db)
            .iter()
            .any(|n| n.starts_with(&format!("ckpt-{old:012}.rank-00001.")))
    });
    signal(b.id(), libc::SIGKILL);
    let _ = wait_deadline(&mut b, Duration::from_secs(10));
    moto.restart();

    // `new` lands on both nodes. Node A's uploader (started only now) uploads rank 0 of
    // both: no manifest (rank 1 is on node B alone); then it is SIGKILLed too.
    copy_node_local(&shared, &da, new, 0);
    copy_node_local(&shared, &db, new, 1);
    let mut a = follower(home, &moto, "node-a", &da, url, 0);
    wait_until(Duration::from_secs(60), "rank 0's records of both", || {
        let s = remote_parts(&moto, "nl/").1;
        s.contains(&(old, 0)) && s.contains(&(new, 0))
    });
    signal(a.id(), libc::SIGKILL);
    let _ = wait_deadline(&mut a, Duration::from_secs(10));
    let (manifests, shards) = remote_parts(&moto, "nl/");
    assert!(manifests.is_empty(), "{manifests:?}");
    assert!(shards.iter().all(|(_, r)| *r == 0), "{shards:?}");
    assert!(
        moto.keys("nl/").iter().all(|k| !k.contains("/rank-00001/")),
        "node A sent rank 1's files, which it does not have"
    );
    // Node A alone, without --ranks: it takes what it holds, never what it does not.
    let v = upload_as(
        (home, &moto),
        "node-a",
        &da,
        "s3://ckpt-remote-test/nl-a",
        new,
        &[],
        None,
    );
    assert_eq!(v["uploaded"], serde_json::json!([0]), "{v}");
    assert_eq!(v["absent"], serde_json::json!([1]), "{v}");
    assert_eq!(v["published"], false, "{v}");

    // Node B's uploader restarts: it uploads rank 1 of `new`, and of `old` (its own claim,
    // left by its dead predecessor): both manifests are written.
    let mut b = follower(home, &moto, "node-b", &db, url, 1);
    wait_until(Duration::from_secs(90), "both manifests", || {
        remote_parts(&moto, "nl/").0 == vec![old, new]
    });
    // Node A's restarts too and finds both done.
    let mut a = follower(home, &moto, "node-a", &da, url, 0);
    let alog = da.with_extension("node-a.log");
    wait_until(Duration::from_secs(60), "node A to find both done", || {
        std::fs::read_to_string(&alog)
            .unwrap_or_default()
            .matches("the remote manifest is written")
            .count()
            >= 2
    });
    for p in [&mut a, &mut b] {
        signal(p.id(), libc::SIGTERM);
        let st = wait_deadline(p, Duration::from_secs(30));
        assert_eq!(st.code(), Some(0));
    }
    let (manifests, shards) = remote_parts(&moto, "nl/");
    assert_eq!(manifests, vec![old, new]);
    for s in [old, new] {
        assert!(
            shards.contains(&(s, 0)) && shards.contains(&(s, 1)),
            "{shards:?}"
        );
    }
    let out = output_deadline(
        ckpt_env(home, Some(&moto)).args(["verify", "--remote", url]),
        Duration::from_secs(60),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    new_vm_two_ranks(home, &moto, url, "nl/", new, &t.path().join("vm2"), &[]);
}

/// A trainer run to its end under `ckpt run --remote file://ROOT --every 100ms` in `T/d`:
/// (the directory, ROOT, the URL, the digest file).
fn finished_run_with_a_file_remote(t: &Path) -> (PathBuf, PathBuf, String, PathBuf) {
    let dir = t.join("d");
    let root = t.join("remote");
    let url = format!("file://{}", root.display());
    let digest = dir.with_extension("digest");
    let mut c = ckpt_remote(&dir, t, &url, None);
    c.args(["--every", "100ms"]);
    trainer_cmd(&mut c, 100, 5, &digest);
    let out = output_deadline(&mut c, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    (dir, root, url, digest)
}

#[test]
fn file_remote_rollback_rolls_the_remote_back_and_a_new_vm_resumes_the_rolled_back_run() {
    let t = tempdir();
    let (dir, root, url, digest) = finished_run_with_a_file_remote(t.path());
    assert!(root.join("FINISHED.ckpt.sig").exists());
    let before = remote_seqs(&root);
    assert!(before.len() >= 3, "{before:?}");

    // Roll back two checkpoints: the remote loses the finished record and the newer ones.
    let out = output_deadline(
        ckpt()
            .args(["rollback", "--json", "--dir"])
            .arg(&dir)
            .arg("latest~2")
            .env("XDG_CONFIG_HOME", t.path().join("config"))
            .env("HOME", t.path()),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json_of(&out);
    let target = v["seq"].as_u64().unwrap();
    let newer: Vec<u64> = before.iter().copied().filter(|s| *s > target).collect();
    assert_eq!(newer.len(), 2, "{v}");
    assert_eq!(v["remote"][0]["removed"], serde_json::json!(newer), "{v}");
    assert_eq!(v["remote"][0]["finished_cleared"], true, "{v}");
    assert!(!root.join("FINISHED.ckpt.sig").exists());
    assert_eq!(*remote_seqs(&root).last().unwrap(), target);
    let target_step = the_step(&root.join(format!("ckpt-{target:012}")));

    // On this machine, the next run resumes from the target: the rolled-back checkpoints
    // are not restored from the remote (they are no longer there).
    let launches = events(&dir, "launch").len();
    let _ = std::fs::remove_file(&digest);
    let mut c = ckpt_remote(&dir, t.path(), &url, None);
    c.args(["--every", "off"]);
    trainer_cmd(&mut c, 100, 0, &digest);
    let out = output_deadline(&mut c, Duration::from_secs(120));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(events(&dir, "remote_restored").is_empty(), "{err}");
    let launch = &events(&dir, "launch")[launches];
    assert_eq!(launch["restore_seq"], target, "{err}");
    assert_eq!(
        std::fs::read_to_string(&digest).unwrap().trim(),
        reference(100, DIM).trim(),
        "{err}"
    );
    assert!(root.join("FINISHED.ckpt.sig").exists());
    // Roll back to the same target again (the run above finished and uploaded).
    let out = output_deadline(
        ckpt()
            .args(["rollback", "--json", "--dir"])
            .arg(&dir)
            .arg(target.to_string())
            .env("XDG_CONFIG_HOME", t.path().join("config"))
            .env("HOME", t.path()),
        Duration::from_secs(60),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(json_of(&out)["remote"][0]["finished_cleared"], true);
    assert!(!root.join("FINISHED.ckpt.sig").exists());
    assert_eq!(*remote_seqs(&root).last().unwrap(), target);

    // A new VM resumes the rolled-back run (from the rollback target), not "finished".
    std::fs::remove_dir_all(&dir).unwrap();
    let _ = std::fs::remove_file(&digest);
    let mut c = ckpt_remote(&dir, t.path(), &url, None);
    c.args(["--every", "off"]);
    trainer_cmd(&mut c, 100, 0, &digest);
    let out = output_deadline(&mut c, Duration::from_secs(120));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(events(&dir, "already_finished").is_empty(), "{err}");
    let restored = events(&dir, "remote_restored");
    assert_eq!(restored.len(), 1, "{err}");
    assert_eq!(restored[0]["remote_seq"], target, "{err}");
    assert_eq!(restored[0]["step"], target_step, "{err}");
    assert_eq!(
        std::fs::read_to_string(&digest).unwrap().trim(),
        reference(100, DIM).trim(),
        "{err}"
    );
    assert_no_survivors(&dir);
}

#[test]
fn s3_the_next_ckpt_run_takes_over_a_shard_whose_uploader_died() {
    need_moto!();
    let mut moto = Moto::start();
    let t = tempdir();
    let home = t.path();
    let dir = t.path().join("d");
    let out = t.path().join("out");
    let url = "s3://ckpt-remote-test/sup";
    let seq = *two_rank_checkpoints(home, &dir, &out, 2).last().unwrap();
    die_holding_claim(home, &mut moto, &dir, url, seq, 1, "node-b");
    let step = the_step(&dir.join(format!("ckpt-{seq:012}")));

    // The job's next `ckpt run --remote` (its steps already done: it resumes and exits at
    // once) re-offers checkpoint `seq`: it uploads rank 0, respects node B's claim while its
    // lease runs, then takes it over and writes the manifest before it exits.
    let mut c = ckpt_remote(&dir, home, url, Some(&moto));
    c.env("CKPT_UPLOAD_LEASE", "2s")
        .args(["--every", "off", "--remote-stop-timeout", "60s"]);
    rank_job(&mut c, 2, step, &out);
    let o = output_deadline(&mut c, Duration::from_secs(120));
    let err = text(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let took = events(&dir, "upload_taken_over");
    assert_eq!(took.len(), 1, "{err}");
    assert_eq!(took[0]["seq"], seq, "{err}");
    assert_eq!(took[0]["rank"], 1, "{err}");
    assert!(
        took[0]["from"].as_str().unwrap().starts_with("node-b"),
        "{err}"
    );
    let up = events(&dir, "uploaded");
    assert!(up.iter().any(|e| e["seq"] == seq), "{err}");
    assert_eq!(events(&dir, "remote_safe").len(), 1, "{err}");
    let (manifests, shards) = remote_parts(&moto, "sup/");
    assert_eq!(manifests, vec![seq]);
    assert!(shards.contains(&(seq, 0)) && shards.contains(&(seq, 1)));
    assert_no_survivors(&dir);
    // The job finished: a new machine resumes it only with --again.
    new_vm_two_ranks(
        home,
        &moto,
        url,
        "sup/",
        seq,
        &t.path().join("vm2"),
        &["--again"],
    );
}

#[test]
fn s3_rollback_with_the_remote_unreachable_says_so_and_exits_77_then_completes() {
    need_moto!();
    let moto = Moto::start();
    let t = tempdir();
    let dir = t.path().join("d");
    let url = "s3://ckpt-remote-test/rb";
    run_and_stop(&dir, t.path(), url, Some(&moto), 3);
    let before = remote_parts(&moto, "rb/").0;
    let target = before[before.len() - 2];
    let rollback = |endpoint: Option<String>| {
        let mut c = ckpt_env(t.path(), Some(&moto));
        if let Some(e) = endpoint {
            c.env("AWS_ENDPOINT_URL", e);
        }
        c.args(["rollback", "--json", "--dir"])
            .arg(&dir)
            .arg(target.to_string());
        output_deadline(&mut c, Duration::from_secs(120))
    };
    // The remote cannot be reached from here (nothing listens at the endpoint): the local
    // rollback stands, the remote one is reported, exit 77; the remote is untouched.
    let out = rollback(Some(format!("http://127.0.0.1:{}", free_port())));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(77), "{err}");
    assert!(err.contains("NOT fully rolled back"), "{err}");
    assert!(!err.contains(SECRET), "{err}");
    assert!(json_of(&out)["remote"][0]["error"].is_string());
    assert_eq!(*checkpoints(&dir).last().unwrap(), target);
    assert_eq!(remote_parts(&moto, "rb/").0, before);
    // Reachable again: the same command rolls the remote back.
    let out = rollback(None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v = json_of(&out);
    assert!(v["remote"][0]["error"].is_null(), "{v}");
    assert_eq!(
        v["remote"][0]["removed"],
        serde_json::json!([before[before.len() - 1]]),
        "{v}"
    );
    assert_eq!(*remote_parts(&moto, "rb/").0.last().unwrap(), target);
}

#[test]
fn file_remote_run_from_rolls_the_remote_back_too() {
    let t = tempdir();
    let (dir, root, url, digest) = finished_run_with_a_file_remote(t.path());
    let before = remote_seqs(&root);
    let local = checkpoints(&dir);
    assert!(local.len() >= 3, "{local:?}");
    let target = local[local.len() - 3];

    // `ckpt run --from latest~2`: rolled back locally and remotely, then resumed from the
    // target (not from a rolled-back checkpoint restored from the remote).
    let _ = std::fs::remove_file(&digest);
    let launches = events(&dir, "launch").len();
    let mut c = ckpt_remote(&dir, t.path(), &url, None);
    c.args(["--every", "off", "--from", "latest~2"]);
    trainer_cmd(&mut c, 100, 0, &digest);
    let out = output_deadline(&mut c, Duration::from_secs(120));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let rb = events(&dir, "remote_rolled_back");
    assert_eq!(rb.len(), 1, "{err}");
    let newer: Vec<u64> = before.iter().copied().filter(|s| *s > target).collect();
    assert_eq!(rb[0]["removed"], serde_json::json!(newer), "{err}");
    assert_eq!(rb[0]["finished_cleared"], true, "{err}");
    assert!(events(&dir, "remote_restored").is_empty(), "{err}");
    assert_eq!(
        events(&dir, "launch")[launches]["restore_seq"],
        target,
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&digest).unwrap().trim(),
        reference(100, DIM).trim(),
        "{err}"
    );
    assert_no_survivors(&dir);
}
