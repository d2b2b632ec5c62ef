//! Cloud preemption notices end to end: a small HTTP server on 127.0.0.1 serves the
//! documented answers of AWS (IMDSv2 token, `spot/instance-action`), GCP
//! (`instance/preempted`, long poll) and Azure (`scheduledevents`, approval), including
//! requests without the required header, malformed and slow answers. Each test checks that
//! the job's checkpoint is durable before the deadline the notice states, the exit code 75,
//! and that a second run (the rebooted VM) resumes. Also `ckpt service`'s unit, checked with
//! `systemd-analyze verify` and run the way systemd would.
//!
//! Nothing here reaches any address but 127.0.0.1.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ckpt::integrations::cloud;
use common::*;

const T: Duration = Duration::from_secs(60);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

// ---------------------------------------------------------------------------------------
// A tiny HTTP/1.1 server: one thread per connection, one request per connection.

#[derive(Debug, Clone)]
struct Req {
    method: String,
    /// Path with the query.
    path: String,
    headers: Vec<(String, String)>,
    body: String,
    t_ms: u64,
}

impl Req {
    fn header(&self, k: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(k))
            .map(|(_, v)| v.as_str())
    }
    fn route(&self) -> &str {
        self.path.split('?').next().unwrap_or("")
    }
    fn query(&self, k: &str) -> Option<&str> {
        self.path
            .split_once('?')?
            .1
            .split('&')
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
    }
}

struct Resp {
    status: u16,
    body: String,
    headers: Vec<(&'static str, String)>,
    delay: Duration,
}

fn resp(status: u16, body: impl Into<String>) -> Resp {
    Resp {
        status,
        body: body.into(),
        headers: Vec::new(),
        delay: Duration::ZERO,
    }
}

type Handler = Arc<dyn Fn(&Req) -> Resp + Send + Sync>;

struct Server {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
}

impl Server {
    fn start(handler: impl Fn(&Req) -> Resp + Send + Sync + 'static) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Handler = Arc::new(handler);
        let (l2, s2) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (h, l) = (handler.clone(), l2.clone());
                        std::thread::spawn(move || serve(conn, h, l));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server { addr, log, stop }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    fn count(&self, route: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.route() == route)
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn serve(conn: TcpStream, h: Handler, log: Arc<Mutex<Vec<Req>>>) {
    conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut l = String::new();
        if r.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    let _ = r.read_exact(&mut body);
    let req = Req {
        method,
        path,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
        t_ms: now_ms(),
    };
    log.lock().unwrap().push(req.clone());
    let a = h(&req);
    if !a.delay.is_zero() {
        std::thread::sleep(a.delay);
    }
    let mut out = format!(
        "HTTP/1.1 {} X\r\nContent-Length: {}\r\nConnection: close\r\n",
        a.status,
        a.body.len()
    );
    for (k, v) in &a.headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&a.body);
    let mut conn = conn;
    let _ = conn.write_all(out.as_bytes());
}

/// A test's notice state: the phase and, for a notice, its deadline.
#[derive(Default)]
struct Phase {
    n: AtomicU64,
    deadline: Mutex<Option<SystemTime>>,
}

impl Phase {
    fn get(&self) -> u64 {
        self.n.load(Ordering::SeqCst)
    }
    fn set(&self, n: u64) {
        self.n.store(n, Ordering::SeqCst)
    }
    fn notice(&self, n: u64, left: Duration) -> SystemTime {
        let d = SystemTime::now() + left;
        *self.deadline.lock().unwrap() = Some(d);
        self.set(n);
        d
    }
    fn deadline(&self) -> SystemTime {
        self.deadline.lock().unwrap().expect("no notice yet")
    }
}

// ---------------------------------------------------------------------------------------
// The clouds.

const AWS_TOKEN: &str = "AQAEAtoken-for-tests==";

/// AWS IMDSv2. Phases: 0 nothing scheduled, 1 notice, 2 malformed, 3 slow (800 ms).
fn aws(phase: Arc<Phase>) -> Server {
    Server::start(move |r| match (r.method.as_str(), r.route()) {
        ("PUT", "/latest/api/token") => match r.header("X-aws-ec2-metadata-token-ttl-seconds") {
            Some(_) => resp(200, AWS_TOKEN),
            None => resp(400, "missing ttl"),
        },
        ("GET", "/latest/meta-data/spot/instance-action") => {
            if r.header("X-aws-ec2-metadata-token") != Some(AWS_TOKEN) {
                return resp(401, "");
            }
            match phase.get() {
                1 => {
                    let t = cloud::rfc3339(phase.deadline());
                    resp(200, format!(r#"{{"action": "terminate", "time": "{t}"}}"#))
                }
                2 => resp(200, "<html>proxy error</html>"),
                3 => Resp {
                    delay: Duration::from_millis(800),
                    ..resp(404, "")
                },
                _ => resp(
                    404,
                    "<?xml version=\"1.0\"?><Error><Code>NotFound</Code></Error>",
                ),
            }
        }
        _ => resp(404, ""),
    })
}

/// GCP, with long polls (`wait_for_change` + `last_etag`). Phases: 0 FALSE, 1 TRUE.
fn gcp(phase: Arc<Phase>) -> Server {
    Server::start(move |r| {
        if r.header("Metadata-Flavor") != Some("Google") {
            return resp(403, "Missing Metadata-Flavor:Google header.");
        }
        if r.route() != "/computeMetadata/v1/instance/preempted" {
            return resp(404, "");
        }
        let etag = |p: u64| format!("e7a1c{p}");
        if r.query("wait_for_change") == Some("true") {
            let secs: u64 = r
                .query("timeout_sec")
                .and_then(|s| s.parse().ok())
                .unwrap_or(60);
            let until = Instant::now() + Duration::from_secs(secs.min(60));
            while r.query("last_etag") == Some(etag(phase.get()).as_str()) && Instant::now() < until
            {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        let p = phase.get();
        Resp {
            headers: vec![("ETag", etag(p)), ("Metadata-Flavor", "Google".into())],
            ..resp(200, if p == 1 { "TRUE" } else { "FALSE" })
        }
    })
}

/// Azure scheduled events. Phases: 0 none, 1 a Preempt for another VM, 2 one for this VM.
fn azure(phase: Arc<Phase>) -> Server {
    Server::start(move |r| {
        if r.header("Metadata") != Some("true") {
            return resp(
                400,
                r#"{"error": "Bad request. Required metadata header not specified"}"#,
            );
        }
        match (r.method.as_str(), r.route()) {
            ("GET", "/metadata/instance/compute/name") => resp(200, "vm-under-test"),
            ("GET", "/metadata/scheduledevents") => {
                let ev = |id: &str, vm: &str, nb: String| {
                    format!(
                        r#"{{"EventId": "{id}", "EventStatus": "Scheduled", "EventType": "Preempt", "ResourceType": "VirtualMachine", "Resources": ["{vm}"], "NotBefore": "{nb}", "Description": "", "EventSource": "Platform", "DurationInSeconds": -1}}"#
                    )
                };
                let events = match phase.get() {
                    1 => ev(
                        "ev-other",
                        "other-vm",
                        cloud::http_date(SystemTime::now() + Duration::from_secs(30)),
                    ),
                    2 => ev(
                        "ev-ours",
                        "vm-under-test",
                        cloud::http_date(phase.deadline()),
                    ),
                    _ => String::new(),
                };
                resp(
                    200,
                    format!(
                        r#"{{"DocumentIncarnation": {}, "Events": [{events}]}}"#,
                        phase.get() + 1
                    ),
                )
            }
            ("POST", "/metadata/scheduledevents") => resp(200, ""),
            _ => resp(404, ""),
        }
    })
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn slow_saver(save_ms: u64) -> Vec<String> {
    vec![
        test_bin("slow_saver").display().to_string(),
        "--save-ms".into(),
        save_ms.to_string(),
    ]
}

fn spawn_run(dir: &Path, opts: &[&str], cmd: &[String]) -> Running {
    ckpt()
        .arg("run")
        .arg("--dir")
        .arg(dir)
        .args(["--every", "off"])
        .args(opts)
        .arg("--")
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn_guarded()
}

/// Waits for the exit with a hard deadline; returns the code and stderr.
fn finish(mut child: Running) -> (Option<i32>, String) {
    let mut err = child.stderr.take().unwrap();
    let t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let st = wait_deadline(&mut child, T);
    (st.code(), t.join().unwrap())
}

fn wait_event(dir: &Path, name: &str, n: usize) {
    wait_until(T, &format!("{n} `{name}` event(s)"), || {
        events(dir, name).len() >= n
    });
}

/// The one `notice_checkpoint` event: asserts it was durable before `deadline`; returns
/// (notice to durable, save) in ms.
fn assert_durable_before(dir: &Path, deadline: SystemTime, err: &str) -> (u64, Option<u64>) {
    let nc = events(dir, "notice_checkpoint");
    assert_eq!(nc.len(), 1, "{err}");
    let ev = &nc[0];
    assert_eq!(ev["in_time"], true, "{ev} {err}");
    let seq = ev["seq"].as_u64().unwrap();
    let committed = events(dir, "committed")
        .into_iter()
        .find(|e| e["seq"] == seq)
        .expect("committed event");
    assert!(
        committed["t_ms"].as_u64().unwrap() <= ms(deadline),
        "checkpoint {seq} durable at {} after the deadline {}: {err}",
        committed["t_ms"],
        ms(deadline)
    );
    assert!(checkpoints(dir).contains(&seq), "{err}");
    let v = ckpt().args(["verify", "--dir"]).arg(dir).output().unwrap();
    assert!(v.status.success(), "verify: {}", text(&v.stderr));
    (
        ev["notice_to_durable_ms"].as_u64().unwrap(),
        ev["save_ms"].as_u64(),
    )
}

/// Splits an `ExecStart=` line the way systemd does (double quotes, backslash escapes, `$$`
/// and `%%`), enough for the units `ckpt service` writes.
fn exec_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let (mut inq, mut any) = (false, false);
    let mut it = line.chars();
    while let Some(c) = it.next() {
        match c {
            '"' => {
                inq = !inq;
                any = true;
            }
            '\\' if inq => match it.next() {
                Some('n') => cur.push('\n'),
                Some('t') => cur.push('\t'),
                Some(c) => cur.push(c),
                None => {}
            },
            c if c.is_whitespace() && !inq => {
                if any || !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                any = false;
            }
            c => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        words.push(cur);
    }
    words
        .into_iter()
        .map(|w| w.replace("$$", "$").replace("%%", "%"))
        .collect()
}

fn service_unit(args: &[&str]) -> String {
    let out = output_deadline(ckpt().arg("service").args(args), T);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}

fn unit_value<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Tests.

/// AWS: the job runs from the unit `ckpt service` writes, exactly as systemd would start it.
/// A spot notice comes: the checkpoint is durable before the notice's time, ckpt exits 75.
/// The "rebooted VM" (no notice) runs the same command and resumes to a bit-identical end.
#[test]
fn aws_notice_checkpoints_before_the_deadline_and_the_unit_resumes() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let digest = tmp.path().join("digest");
    let phase = Arc::new(Phase::default());
    let srv = aws(phase.clone());
    let steps = 1500;
    let mut args: Vec<String> = vec![
        "--name".into(),
        "train".into(),
        "--dir".into(),
        dir.display().to_string(),
        "--".into(),
        "--preemption-notice".into(),
        "aws".into(),
        "--metadata-url".into(),
        srv.url(),
        "--preemption-poll".into(),
        "100ms".into(),
        "--every".into(),
        "off".into(),
        "--".into(),
    ];
    args.extend(trainer_args(steps, 64, 2, &digest));
    let unit = service_unit(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let exec = exec_words(unit_value(&unit, "ExecStart")[0]);
    assert_eq!(
        Path::new(&exec[0]).canonicalize().unwrap(),
        ckpt_bin().canonicalize().unwrap()
    );
    assert_eq!(unit_value(&unit, "RestartForceExitStatus"), ["75"]);
    let boot = |phase_at_boot: u64| {
        phase.set(phase_at_boot);
        ckpt()
            .args(&exec[1..])
            .current_dir(tmp.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn_guarded()
    };

    let child = boot(0);
    wait_event(&dir, "hello", 1);
    wait_until(T, "a few polls", || {
        srv.count("/latest/meta-data/spot/instance-action") >= 2
    });
    let deadline = phase.notice(1, Duration::from_secs(20));
    let (code, err) = finish(child);
    assert_eq!(code, Some(75), "{err}");
    assert!(
        err.contains("AWS spot interruption notice: terminate"),
        "{err}"
    );
    let (to_durable, save) = assert_durable_before(&dir, deadline, &err);
    eprintln!("aws: notice to durable checkpoint {to_durable} ms (save {save:?} ms), poll 100 ms");
    assert_no_survivors(&dir);
    let reqs = srv.requests();
    assert!(reqs
        .iter()
        .any(|r| r.method == "PUT"
            && r.header("X-aws-ec2-metadata-token-ttl-seconds") == Some("21600")));
    assert!(
        reqs.iter()
            .filter(|r| r.route() == "/latest/meta-data/spot/instance-action")
            .all(|r| r.header("X-aws-ec2-metadata-token") == Some(AWS_TOKEN)),
        "a poll went out without the IMDSv2 token"
    );

    // The rebooted VM: systemd runs the same command; no notice now.
    let (code, err) = finish(boot(0));
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("resuming from checkpoint"), "{err}");
    let want = reference(steps, 64);
    assert_eq!(std::fs::read_to_string(&digest).unwrap().trim(), want);
    assert_no_survivors(&dir);
}

/// An AWS service that wants its token (401 without), then answers malformed, then slowly
/// (past --metadata-timeout), then properly: each trouble is logged once, not on every poll;
/// the job keeps running through it, and the notice after it is acted on.
#[test]
fn aws_malformed_and_slow_answers_are_logged_once_and_ignored() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let phase = Arc::new(Phase::default());
    let srv = aws(phase.clone());
    let route = "/latest/meta-data/spot/instance-action";
    phase.set(2);
    let child = spawn_run(
        &dir,
        &[
            "--preemption-notice",
            "aws",
            "--metadata-url",
            &srv.url(),
            "--preemption-poll",
            "30ms",
            "--metadata-timeout",
            "200ms",
        ],
        &slow_saver(50),
    );
    wait_event(&dir, "hello", 1);
    let n = srv.count(route);
    wait_until(T, "malformed answers", || srv.count(route) >= n + 5);
    phase.set(3);
    let n = srv.count(route);
    wait_until(T, "slow answers", || srv.count(route) >= n + 4);
    phase.set(0);
    let n = srv.count(route);
    wait_until(T, "good answers", || srv.count(route) >= n + 3);
    assert_eq!(status(&dir).unwrap()["state"], "running");
    let deadline = phase.notice(1, Duration::from_secs(20));
    let (code, err) = finish(child);
    assert_eq!(code, Some(75), "{err}");
    let warned = events(&dir, "metadata_unavailable");
    assert_eq!(warned.len(), 2, "one line per kind of trouble: {err}");
    assert!(
        warned[0]["error"].as_str().unwrap().contains("proxy error"),
        "{err}"
    );
    assert!(
        warned[1]["error"].as_str().unwrap().contains("timed out"),
        "{err}"
    );
    assert_eq!(events(&dir, "metadata_ok").len(), 1, "{err}");
    assert_eq!(err.matches("metadata service:").count(), 2, "{err}");
    assert_durable_before(&dir, deadline, &err);
    assert_no_survivors(&dir);
}

/// GCP: `instance/preempted` with `Metadata-Flavor: Google`, long-polled: with a 30 s poll
/// interval the notice is still seen at once. The job gets the 30 s window.
#[test]
fn gcp_long_poll_sees_the_notice_at_once() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let phase = Arc::new(Phase::default());
    let srv = gcp(phase.clone());
    let child = spawn_run(
        &dir,
        &[
            "--preemption-notice",
            "gcp",
            "--metadata-url",
            &srv.url(),
            "--preemption-poll",
            "30s",
        ],
        &slow_saver(200),
    );
    wait_event(&dir, "hello", 1);
    wait_until(T, "a long poll waiting", || {
        srv.requests()
            .iter()
            .any(|r| r.query("wait_for_change") == Some("true") && r.query("last_etag").is_some())
    });
    let t0 = now_ms();
    let deadline = phase.notice(1, Duration::from_secs(30));
    let (code, err) = finish(child);
    assert_eq!(code, Some(75), "{err}");
    let seen = events(&dir, "preemption_notice")[0]["t_ms"]
        .as_u64()
        .unwrap()
        - t0;
    assert!(
        seen < 2000,
        "long poll took {seen} ms to see the notice: {err}"
    );
    let (to_durable, save) = assert_durable_before(&dir, deadline, &err);
    eprintln!(
        "gcp: notice seen after {seen} ms; durable {to_durable} ms after it (save {save:?} ms)"
    );
    assert!(srv
        .requests()
        .iter()
        .all(|r| r.header("Metadata-Flavor") == Some("Google")));
    assert_no_survivors(&dir);
}

/// Azure: `scheduledevents` with `Metadata: true`; a Preempt event for another VM is
/// ignored, one for this VM stops the job before its NotBefore, and the event is approved
/// once the checkpoint is durable.
#[test]
fn azure_preempt_for_this_vm_stops_and_is_approved() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let phase = Arc::new(Phase::default());
    let srv = azure(phase.clone());
    let route = "/metadata/scheduledevents";
    let mut child = spawn_run(
        &dir,
        &[
            "--preemption-notice",
            "azure",
            "--metadata-url",
            &srv.url(),
            "--preemption-poll",
            "50ms",
        ],
        &slow_saver(100),
    );
    wait_event(&dir, "hello", 1);
    phase.set(1);
    let n = srv.count(route);
    wait_until(T, "polls seeing another VM's event", || {
        srv.count(route) >= n + 4
    });
    wait_event(&dir, "notice_ignored", 1);
    assert!(
        child.try_wait().unwrap().is_none(),
        "stopped for another VM's event"
    );
    let deadline = phase.notice(2, Duration::from_secs(15));
    let (code, err) = finish(child);
    assert_eq!(code, Some(75), "{err}");
    assert_durable_before(&dir, deadline, &err);
    let reqs = srv.requests();
    let acks: Vec<&Req> = reqs.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(acks.len(), 1, "{err}");
    let body: serde_json::Value = serde_json::from_str(&acks[0].body).unwrap();
    assert_eq!(body["StartRequests"][0]["EventId"], "ev-ours");
    let durable = events(&dir, "notice_checkpoint")[0]["t_ms"]
        .as_u64()
        .unwrap();
    assert!(
        acks[0].t_ms >= durable,
        "approved before the checkpoint was durable"
    );
    assert!(reqs.iter().all(|r| r.header("Metadata") == Some("true")));
    assert!(reqs
        .iter()
        .filter(|r| r.route() == route && r.method == "GET")
        .all(|r| r.query("api-version") == Some("2020-07-01")));
    assert_no_survivors(&dir);
}

/// A save that cannot fit in the window is reported at start-up (from the last run's log)
/// and again when a notice comes; a checkpoint that lands after the deadline says so.
#[test]
fn a_save_longer_than_the_window_is_reported_at_start_up_and_on_notice() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let phase = Arc::new(Phase::default());
    let srv = aws(phase.clone());
    let opts = [
        "--preemption-notice",
        "aws",
        "--metadata-url",
        &srv.url(),
        "--preemption-poll",
        "50ms",
        "--preemption-window",
        "1s",
    ];
    // Run 1: a 1.5 s save after a notice with 20 s left.
    let child = spawn_run(&dir, &opts, &slow_saver(1500));
    wait_event(&dir, "hello", 1);
    let deadline = phase.notice(1, Duration::from_secs(20));
    let (code, err) = finish(child);
    assert_eq!(code, Some(75), "{err}");
    assert_durable_before(&dir, deadline, &err);
    assert_eq!(events(&dir, "notice_no_fit").len(), 1, "{err}");
    // The 1.5 s save (longer on a loaded machine) against the 1 s window.
    assert!(
        err.contains("the last checkpoint took 1.") || err.contains("the last checkpoint took 2."),
        "{err}"
    );

    // Run 2: warned at start-up, before any new checkpoint; then a notice with 1 s left.
    phase.set(0);
    let child = spawn_run(&dir, &opts, &slow_saver(1500));
    wait_event(&dir, "notice_no_fit", 2);
    assert_eq!(events(&dir, "committed").len(), 1);
    wait_event(&dir, "hello", 2);
    phase.notice(1, Duration::from_secs(1));
    let (code, err) = finish(child);
    assert_eq!(code, Some(75), "{err}");
    assert!(
        err.contains("to save; with up to 2.0s to see a notice it cannot fit in the 1.0s warning"),
        "{err}"
    );
    assert!(
        err.contains("longer than that: it may not be durable in time"),
        "{err}"
    );
    assert!(err.contains("AFTER the deadline"), "{err}");
    assert_no_survivors(&dir);
}

/// An unreachable metadata service is logged once and the job runs to its end; `auto`
/// off-cloud polls nothing.
#[test]
fn unreachable_service_is_logged_once_and_auto_stays_quiet_off_cloud() {
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let url = format!("http://{closed}");
    let tmp = tempdir();
    let dir = tmp.path().join("ck");
    let plain = [
        test_bin("plain").display().to_string(),
        "--ms".into(),
        "1200".into(),
    ];
    let child = spawn_run(
        &dir,
        &[
            "--preemption-notice",
            "gcp",
            "--metadata-url",
            &url,
            "--preemption-poll",
            "30ms",
            "--metadata-timeout",
            "200ms",
        ],
        &plain,
    );
    let (code, err) = finish(child);
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(events(&dir, "metadata_unavailable").len(), 1, "{err}");
    assert_eq!(err.matches("metadata service:").count(), 1, "{err}");

    let dir2 = tmp.path().join("ck2");
    let child = spawn_run(
        &dir2,
        &[
            "--preemption-notice",
            "auto",
            "--metadata-url",
            &url,
            "--preemption-poll",
            "30ms",
        ],
        &plain,
    );
    let (code, err) = finish(child);
    assert_eq!(code, Some(0), "{err}");
    if cloud::detect(Path::new("/sys/class/dmi/id")).is_none() {
        assert_eq!(events(&dir2, "notice_off").len(), 1, "{err}");
        assert!(!err.contains("warning"), "{err}");
    } else {
        eprintln!("this machine looks like a cloud VM: `auto` polled {url} (a closed port)");
    }
    assert_no_survivors(&dir);
    assert_no_survivors(&dir2);
}

/// `ckpt service`: the exit-code contract, quoting, `systemd-analyze verify`, and --install.
#[test]
fn service_unit_has_the_exit_code_contract_and_verifies() {
    let tmp = tempdir();
    let dir = tmp.path().join("ck dir");
    let unit = service_unit(&[
        "--name",
        "train",
        "--dir",
        dir.to_str().unwrap(),
        "--env",
        "OMP_NUM_THREADS=4",
        "--",
        "--every",
        "5m",
        "--",
        "/bin/sh",
        "-c",
        "echo $HOME 100% \"done\"",
    ]);
    for (k, v) in [
        ("Restart", "on-failure"),
        ("SuccessExitStatus", "75"),
        ("RestartForceExitStatus", "75"),
        ("RestartPreventExitStatus", "64 65 73 126 127"),
        ("KillMode", "mixed"),
        ("Type", "exec"),
        ("WantedBy", "multi-user.target"),
        ("TimeoutStopSec", "35"),
        ("Environment", "OMP_NUM_THREADS=4"),
    ] {
        assert_eq!(unit_value(&unit, k), [v], "{k} in\n{unit}");
    }
    let exec = exec_words(unit_value(&unit, "ExecStart")[0]);
    assert_eq!(
        exec[1..],
        [
            "run",
            "--dir",
            dir.to_str().unwrap(),
            "--preemption-notice",
            "auto",
            "--every",
            "5m",
            "--",
            "/bin/sh",
            "-c",
            "echo $HOME 100% \"done\""
        ]
    );
    // Mistakes in the run options show at generation time.
    let bad = output_deadline(
        ckpt().args([
            "service",
            "--name",
            "x",
            "--",
            "--grace",
            "soon",
            "--",
            "/bin/true",
        ]),
        T,
    );
    assert_eq!(bad.status.code(), Some(64), "{}", text(&bad.stderr));

    // --install writes the same text.
    let units = tmp.path().join("units");
    std::fs::create_dir(&units).unwrap();
    let inst = output_deadline(
        ckpt()
            .args(["service", "--install", "--unit-dir"])
            .arg(&units)
            .args([
                "--name",
                "train",
                "--dir",
                dir.to_str().unwrap(),
                "--env",
                "OMP_NUM_THREADS=4",
                "--",
                "--every",
                "5m",
                "--",
                "/bin/sh",
                "-c",
                "echo $HOME 100% \"done\"",
            ]),
        T,
    );
    assert!(inst.status.success(), "{}", text(&inst.stderr));
    let path = units.join("train.service");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), unit);

    match Command::new("systemd-analyze").arg("--version").output() {
        Ok(o) if o.status.success() => {
            let v = output_deadline(Command::new("systemd-analyze").arg("verify").arg(&path), T);
            let all = format!("{}{}", text(&v.stdout), text(&v.stderr));
            assert!(
                v.status.success() && !all.contains("train.service"),
                "systemd-analyze verify:\n{all}\n{unit}"
            );
        }
        _ => {
            eprintln!("systemd-analyze not installed: unit not verified (apt-get install systemd)")
        }
    }
}
