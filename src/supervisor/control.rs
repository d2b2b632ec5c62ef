//! The control endpoint of a running supervisor: a Unix stream socket
//! (`DIR/.ckpt/control.sock`, or a private temp directory when that path is too long; the
//! path in use is in `status.json` as `control_socket`). Owner-only, and every peer's uid is
//! checked with SO_PEERCRED: anyone but the supervisor's own uid is refused and logged.
//!
//! Wire format (specified in `docs/protocol.md`, "Control socket"): the client sends one JSON
//! object terminated by `\n` (at most 64 KiB), the supervisor answers with one JSON object
//! terminated by `\n` and closes. Every answer has `"ok": true|false`; errors carry `"error"`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Largest request accepted.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Connections served at once; more are answered with an error.
const MAX_CONNECTIONS: usize = 32;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// The supervisor's and the job's state. (A struct variant, so that unknown fields are
    /// refused like everywhere else.)
    Status {},
    /// Request a checkpoint now; with `wait`, answer once it is durable (or failed).
    Checkpoint {
        #[serde(default)]
        wait: bool,
    },
    /// Stop: checkpoint first unless `checkpoint` is false; the supervisor then exits 75.
    Stop {
        #[serde(default = "yes")]
        checkpoint: bool,
    },
}

fn yes() -> bool {
    true
}

/// What the control thread hands to the supervisor's loop.
pub enum ControlEvent {
    /// A request from an authorised peer and where to send the answer.
    Request(Request, Sender<Value>),
    /// A peer of another uid was refused.
    Refused { uid: u32, pid: i32 },
    /// A malformed or oversized request (already answered with an error).
    Malformed(String),
}

/// Parses one request line.
pub fn parse_request(bytes: &[u8]) -> Result<Request, String> {
    if bytes.len() > MAX_REQUEST_BYTES {
        return Err(format!("request exceeds {MAX_REQUEST_BYTES} bytes"));
    }
    serde_json::from_slice(bytes).map_err(|e| {
        format!("not a valid control request ({e}); expected e.g. {{\"cmd\":\"status\"}}")
    })
}

fn peer(stream: &UnixStream) -> Option<(u32, i32)> {
    let cred =
        nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials).ok()?;
    Some((cred.uid(), cred.pid()))
}

fn answer(mut stream: &UnixStream, v: &Value) {
    let mut line = v.to_string();
    line.push('\n');
    let _ = stream.write_all(line.as_bytes());
}

/// How long a connection waits for the supervisor's loop before `fallback` answers: the loop
/// may be stuck in disk I/O (a frozen file system), and `status` and `stop --no-checkpoint`
/// must still work then.
pub const LOOP_ANSWER_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a request that needs the loop (`checkpoint`, `stop` with a checkpoint) waits for
/// it when it did not answer within [`LOOP_ANSWER_TIMEOUT`]: the loop may be publishing or
/// verifying a large checkpoint.
pub const SLOW_ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// How long such a request waits for a loop that says it is busy with a known, bounded task
/// (a CRIU dump of a large job) before it is answered as stuck.
pub const BUSY_ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// The answer to a request the loop ended without acting on (`"code": "ended"`).
pub const ENDED: &str =
    "the supervisor ended before acting on the request (the job finished or stopped meanwhile)";

/// What the control thread does with a request the loop did not answer in time.
pub enum Fallback {
    /// Answer this now.
    Answer(Value),
    /// Wait this much longer for the loop's own answer; answer this if it does not come.
    Wait(Duration, Value),
}

/// Binds the socket (removing a stale one: the caller holds the directory lock) and serves it
/// on a thread. `forward` returns false once the supervisor is gone; `fallback` says what to
/// do with a request the loop did not answer within [`LOOP_ANSWER_TIMEOUT`].
pub fn serve<F, G>(path: &Path, forward: F, fallback: G) -> std::io::Result<()>
where
    F: Fn(ControlEvent) -> bool + Send + Sync + 'static,
    G: Fn(&Request) -> Fallback + Send + Sync + 'static,
{
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let me = nix::unistd::geteuid().as_raw();
    let forward = Arc::new(forward);
    let fallback = Arc::new(fallback);
    let active = Arc::new(AtomicUsize::new(0));
    std::thread::Builder::new().name("ckpt-control".into()).spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let Some((uid, pid)) = peer(&stream) else { continue };
            if uid != me {
                answer(&stream, &json!({ "ok": false, "error": format!("permission denied: this supervisor belongs to uid {me}, you are uid {uid}") }));
                if !forward(ControlEvent::Refused { uid, pid }) {
                    return;
                }
                continue;
            }
            if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                answer(&stream, &json!({ "ok": false, "error": "too many control connections; try again" }));
                continue;
            }
            active.fetch_add(1, Ordering::SeqCst);
            let (forward, fallback, active) = (forward.clone(), fallback.clone(), active.clone());
            let _ = std::thread::Builder::new().name("ckpt-control-conn".into()).spawn(move || {
                handle(stream, &*forward, &*fallback);
                active.fetch_sub(1, Ordering::SeqCst);
            });
        }
    })?;
    Ok(())
}

fn handle(
    stream: UnixStream,
    forward: &(dyn Fn(ControlEvent) -> bool + Send + Sync),
    fallback: &(dyn Fn(&Request) -> Fallback + Send + Sync),
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = Vec::new();
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST_BYTES as u64 + 1));
    let req = match reader.read_until(b'\n', &mut line) {
        Ok(_) if line.len() > MAX_REQUEST_BYTES => {
            Err(format!("request exceeds {MAX_REQUEST_BYTES} bytes"))
        }
        Ok(0) => Err("empty request".to_string()),
        Ok(_) => parse_request(line.strip_suffix(b"\n").unwrap_or(&line)),
        Err(e) => Err(format!("cannot read the request: {e}")),
    };
    match req {
        Ok(req) => {
            let (tx, rx) = mpsc::channel();
            if !forward(ControlEvent::Request(req.clone(), tx)) {
                answer(
                    &stream,
                    &json!({ "ok": false, "error": "the supervisor is shutting down" }),
                );
                return;
            }
            let v = match rx.recv_timeout(LOOP_ANSWER_TIMEOUT) {
                Ok(v) => v,
                // `checkpoint --wait` answers come when the checkpoint does.
                Err(mpsc::RecvTimeoutError::Timeout)
                    if matches!(req, Request::Checkpoint { wait: true }) =>
                {
                    rx.recv().unwrap_or_else(|_| {
                        json!({ "ok": false, "error": "the supervisor ended before answering" })
                    })
                }
                Err(mpsc::RecvTimeoutError::Timeout) => match fallback(&req) {
                    Fallback::Answer(v) => v,
                    Fallback::Wait(d, v) => match rx.recv_timeout(d) {
                        Ok(answer) => answer,
                        Err(mpsc::RecvTimeoutError::Timeout) => v,
                        // The loop ended (the job finished or stopped) without acting on it.
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            json!({ "ok": false, "code": "ended", "error": ENDED })
                        }
                    },
                },
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    json!({ "ok": false, "error": "the supervisor ended before answering" })
                }
            };
            answer(&stream, &v);
        }
        Err(e) => {
            answer(&stream, &json!({ "ok": false, "error": e }));
            forward(ControlEvent::Malformed(e));
        }
    }
}

/// Client side: sends `req`, returns the answer. `timeout` bounds the whole exchange.
pub fn call(socket: &Path, req: &Request, timeout: Option<Duration>) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(timeout)?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut line = serde_json::to_vec(req).map_err(std::io::Error::other)?;
    line.push(b'\n');
    // A supervisor that refuses the peer answers and closes without reading: the write may
    // then fail with EPIPE while its answer is already waiting to be read.
    let written = s.write_all(&line);
    let mut resp = Vec::new();
    BufReader::new((&s).take(16 << 20)).read_until(b'\n', &mut resp)?;
    if resp.is_empty() {
        written?;
        // The supervisor exited while the request waited (its process, threads and all).
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            ENDED,
        ));
    }
    serde_json::from_slice(&resp).map_err(|e| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("bad answer from the supervisor: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(
            parse_request(br#"{"cmd":"status"}"#),
            Ok(Request::Status {})
        );
        assert_eq!(
            parse_request(br#"{"cmd":"checkpoint","wait":true}"#),
            Ok(Request::Checkpoint { wait: true })
        );
        assert_eq!(
            parse_request(br#"{"cmd":"stop"}"#),
            Ok(Request::Stop { checkpoint: true })
        );
        for bad in [
            &b"{"[..],
            b"{\"cmd\":\"rm -rf\"}",
            b"{\"cmd\":\"status\",\"x\":1}",
            b"\xff\xfe",
            b"[]",
            b"null",
        ] {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
        assert!(parse_request(&vec![b' '; MAX_REQUEST_BYTES + 1]).is_err());
    }
}
