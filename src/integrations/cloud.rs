//! Cloud preemption notices: AWS spot, GCP spot/preemptible and Azure spot VMs get 2 minutes
//! (AWS) or about 30 s (GCP, Azure) of warning before the machine goes away. With
//! `ckpt run --preemption-notice aws|gcp|azure|auto` a thread polls the cloud's metadata
//! service with the documented requests and, on a notice, tells the supervisor to checkpoint
//! at once and stop (exit 75); the supervisor logs how long the checkpoint took against the
//! window. What each cloud is asked, and the setup that resumes after a reboot:
//! `docs/cloud.md`.
//!
//! HTTP goes through `ureq` (no TLS, no proxy: metadata services are plain http on a
//! link-local address) with short timeouts. An unreachable or misbehaving service is logged
//! once, and again only once it answers properly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::supervisor::stop_soon::{Ack, Notifier};

/// Which cloud to watch (`--preemption-notice`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    Aws,
    Gcp,
    Azure,
    /// Detect the cloud from the machine's DMI data (no network); do nothing off-cloud.
    Auto,
}

/// A cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cloud {
    Aws,
    Gcp,
    Azure,
}

impl Cloud {
    pub fn name(self) -> &'static str {
        match self {
            Cloud::Aws => "AWS spot",
            Cloud::Gcp => "GCP spot/preemptible",
            Cloud::Azure => "Azure spot",
        }
    }

    /// The metadata service's documented base URL.
    pub fn default_base(self) -> &'static str {
        match self {
            Cloud::Aws | Cloud::Azure => "http://169.254.169.254",
            Cloud::Gcp => "http://metadata.google.internal",
        }
    }

    /// The documented warning.
    pub fn window(self) -> Duration {
        match self {
            Cloud::Aws => Duration::from_secs(120),
            Cloud::Gcp | Cloud::Azure => Duration::from_secs(30),
        }
    }
}

/// `ckpt run`'s preemption settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub choice: Choice,
    /// Base URL of the metadata service (`--metadata-url`), instead of the cloud's own.
    pub base_url: Option<String>,
    /// Poll interval (`--preemption-poll`).
    pub poll: Duration,
    /// Timeout of one request (`--metadata-timeout`); a GCP long poll adds its own wait.
    pub timeout: Duration,
    /// Warning to plan for, instead of the cloud's documented one (`--preemption-window`).
    pub window: Option<Duration>,
    /// Where the DMI identification lives (`/sys/class/dmi/id`).
    pub dmi_dir: PathBuf,
}

impl Settings {
    pub fn new(choice: Choice) -> Settings {
        Settings {
            choice,
            base_url: None,
            poll: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            window: None,
            dmi_dir: PathBuf::from("/sys/class/dmi/id"),
        }
    }
}

/// How long a GCP long poll waits on the server before answering "no change".
pub const GCP_LONG_POLL: Duration = Duration::from_secs(60);
/// Azure's scheduled-events API version (field notes §4).
pub const AZURE_API: &str = "2020-07-01";
/// AWS IMDSv2 token lifetime asked for (the maximum, 6 h); renewed a minute before.
pub const AWS_TOKEN_TTL_S: u64 = 21600;

/// The cloud this machine runs on, from DMI data alone (no network, so it is cheap and
/// quiet off-cloud). Azure VMs carry a fixed chassis asset tag.
pub fn detect(dmi: &Path) -> Option<Cloud> {
    let read = |f: &str| {
        std::fs::read_to_string(dmi.join(f))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    let vendor = read("sys_vendor");
    let product = read("product_name");
    let bios = read("bios_vendor");
    let board = read("board_vendor");
    let tag = read("chassis_asset_tag");
    let any = |needle: &str| {
        [&vendor, &product, &bios, &board]
            .iter()
            .any(|v| v.contains(needle))
    };
    if any("Amazon EC2") || bios.starts_with("Amazon") || product.starts_with("EC2") {
        Some(Cloud::Aws)
    } else if any("Google") {
        Some(Cloud::Gcp)
    } else if tag == "7783-7084-3265-9085-8269-3286-77" {
        Some(Cloud::Azure)
    } else {
        None
    }
}

/// A preemption notice.
pub struct Notice {
    pub reason: String,
    pub deadline: SystemTime,
    pub ack: Option<Ack>,
}

/// Why a poll did not give an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollError {
    /// No answer (refused, timed out) or a server error.
    Unreachable(String),
    /// An answer that does not follow the documented format.
    Malformed(String),
}

impl std::fmt::Display for PollError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PollError::Unreachable(m) => write!(f, "no answer: {m}"),
            PollError::Malformed(m) => write!(f, "unexpected answer: {m}"),
        }
    }
}

type PollResult = Result<Option<Notice>, PollError>;

/// One HTTP exchange.
struct Http {
    agent: ureq::Agent,
    timeout: Duration,
}

struct Answer {
    status: u16,
    body: String,
    etag: Option<String>,
}

impl Http {
    fn new(timeout: Duration) -> Http {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .max_redirects(0)
            .timeout_connect(Some(timeout))
            .timeout_global(Some(timeout))
            .user_agent(format!("ckpt/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .new_agent();
        Http { agent, timeout }
    }

    /// Sends a request; `wait` extends the timeout (long poll).
    fn call(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
        wait: Duration,
    ) -> Result<Answer, PollError> {
        let total = Some(self.timeout + wait);
        let mut resp = match method {
            "GET" => {
                let mut r = self.agent.get(url);
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                r.config().timeout_global(total).build().call()
            }
            _ => {
                let mut r = if method == "PUT" {
                    self.agent.put(url)
                } else {
                    self.agent.post(url)
                };
                for (k, v) in headers {
                    r = r.header(*k, *v);
                }
                let r = r.config().timeout_global(total).build();
                match body {
                    Some(b) => r.send(b),
                    None => r.send_empty(),
                }
            }
        }
        .map_err(|e| classify(url, e))?;
        let status = resp.status().as_u16();
        let etag = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .map_err(|e| classify(url, e))?;
        Ok(Answer { status, body, etag })
    }
}

fn classify(url: &str, e: ureq::Error) -> PollError {
    match e {
        ureq::Error::Protocol(_)
        | ureq::Error::BodyExceedsLimit(_)
        | ureq::Error::LargeResponseHeader(..) => {
            PollError::Malformed(format!("{url}: broken HTTP: {e}"))
        }
        ureq::Error::Timeout(_) => PollError::Unreachable(format!("{url}: timed out ({e})")),
        _ => PollError::Unreachable(format!("{url}: {e}")),
    }
}

fn snippet(s: &str) -> String {
    let t: String = s.trim().chars().take(120).collect();
    format!("{t:?}")
}

/// Polls one cloud.
trait Poller: Send {
    /// One poll; may block up to the timeout (or the long-poll wait).
    fn poll(&mut self) -> PollResult;
    /// What is asked, for the log.
    fn what(&self) -> String;
    /// Lines for the log gathered during polls.
    fn take_notes(&mut self) -> Vec<String> {
        Vec::new()
    }
    /// Whether to wait the poll interval before the next poll (not before a long poll).
    fn pause(&self) -> bool {
        true
    }
}

/// AWS: IMDSv2 token, then `spot/instance-action` (404 = nothing scheduled).
struct Aws {
    http: Http,
    base: String,
    token: Option<(String, Instant)>,
}

impl Aws {
    fn token(&mut self) -> Result<String, PollError> {
        if let Some((t, at)) = &self.token {
            if at.elapsed() < Duration::from_secs(AWS_TOKEN_TTL_S - 60) {
                return Ok(t.clone());
            }
        }
        let url = format!("{}/latest/api/token", self.base);
        let ttl = AWS_TOKEN_TTL_S.to_string();
        let a = self.http.call(
            "PUT",
            &url,
            &[("X-aws-ec2-metadata-token-ttl-seconds", &ttl)],
            None,
            Duration::ZERO,
        )?;
        match a.status {
            200 if !a.body.trim().is_empty() && !a.body.trim().contains(char::is_whitespace) => {
                let t = a.body.trim().to_string();
                self.token = Some((t.clone(), Instant::now()));
                Ok(t)
            }
            200 => Err(PollError::Malformed(format!(
                "{url}: token {}",
                snippet(&a.body)
            ))),
            s => Err(PollError::Unreachable(format!("{url}: HTTP {s}"))),
        }
    }
}

impl Poller for Aws {
    fn what(&self) -> String {
        format!("{}/latest/meta-data/spot/instance-action", self.base)
    }

    fn poll(&mut self) -> PollResult {
        let url = self.what();
        for attempt in 0..2 {
            let token = self.token()?;
            let a = self.http.call(
                "GET",
                &url,
                &[("X-aws-ec2-metadata-token", &token)],
                None,
                Duration::ZERO,
            )?;
            match a.status {
                404 => return Ok(None),
                401 if attempt == 0 => {
                    // The token expired or the service restarted: get a new one.
                    self.token = None;
                    continue;
                }
                200 => return parse_aws(&url, &a.body).map(Some),
                s => return Err(PollError::Unreachable(format!("{url}: HTTP {s}"))),
            }
        }
        Err(PollError::Unreachable(format!(
            "{url}: HTTP 401 even with a fresh token"
        )))
    }
}

/// `{"action": "terminate"|"stop"|"hibernate", "time": "2017-09-18T08:22:00Z"}`.
pub fn parse_aws(url: &str, body: &str) -> Result<Notice, PollError> {
    let bad = || PollError::Malformed(format!("{url}: {}", snippet(body)));
    let v: Value = serde_json::from_str(body).map_err(|_| bad())?;
    let action = v["action"].as_str().ok_or_else(bad)?;
    if !["terminate", "stop", "hibernate"].contains(&action) {
        return Err(bad());
    }
    let time = v["time"].as_str().ok_or_else(bad)?;
    let deadline = humantime::parse_rfc3339_weak(time).map_err(|_| bad())?;
    Ok(Notice {
        reason: format!("AWS spot interruption notice: {action} at {time}"),
        deadline,
        ack: None,
    })
}

/// GCP: `instance/preempted` (`TRUE`/`FALSE`), long-polled once the ETag is known.
struct Gcp {
    http: Http,
    base: String,
    etag: Option<String>,
    /// Cleared when a long poll comes back at once without a change: the server does not
    /// long-poll, so plain polls every interval follow.
    long_poll: bool,
    window: Duration,
}

impl Poller for Gcp {
    fn what(&self) -> String {
        format!("{}/computeMetadata/v1/instance/preempted", self.base)
    }

    fn pause(&self) -> bool {
        !(self.long_poll && self.etag.is_some())
    }

    fn poll(&mut self) -> PollResult {
        let base = self.what();
        let began = Instant::now();
        let (url, wait) = match self.etag.as_ref().filter(|_| self.long_poll) {
            Some(e) => (
                format!(
                    "{base}?wait_for_change=true&last_etag={e}&timeout_sec={}",
                    GCP_LONG_POLL.as_secs()
                ),
                GCP_LONG_POLL,
            ),
            None => (base.clone(), Duration::ZERO),
        };
        let a = self
            .http
            .call("GET", &url, &[("Metadata-Flavor", "Google")], None, wait);
        let a = match a {
            Ok(a) => a,
            Err(e) => {
                // Next time, a plain request first (the server may not long-poll).
                self.etag = None;
                return Err(e);
            }
        };
        if a.status != 200 {
            self.etag = None;
            return Err(PollError::Unreachable(format!("{base}: HTTP {}", a.status)));
        }
        self.etag = a
            .etag
            .filter(|e| !e.is_empty() && e.bytes().all(|b| b.is_ascii_alphanumeric()));
        match a.body.trim() {
            "TRUE" => Ok(Some(Notice {
                reason: "GCP preemption notice (instance/preempted = TRUE)".into(),
                deadline: SystemTime::now() + self.window,
                ack: None,
            })),
            "FALSE" => {
                if wait > Duration::ZERO && began.elapsed() < Duration::from_secs(1) {
                    self.long_poll = false;
                }
                Ok(None)
            }
            _ => {
                self.etag = None;
                Err(PollError::Malformed(format!(
                    "{base}: {}",
                    snippet(&a.body)
                )))
            }
        }
    }
}

/// Azure: scheduled events of type `Preempt` (or `Terminate`) naming this VM.
struct Azure {
    http: Http,
    base: String,
    /// This VM's name, once known (`None` inside: could not be read).
    vm: Option<Option<String>>,
    /// Events already reported as not ours.
    ignored: Vec<String>,
    notes: Vec<String>,
}

impl Azure {
    fn vm_name(&mut self) -> Option<String> {
        if let Some(v) = &self.vm {
            return v.clone();
        }
        let url = format!(
            "{}/metadata/instance/compute/name?api-version=2021-02-01&format=text",
            self.base
        );
        let name = self
            .http
            .call("GET", &url, &[("Metadata", "true")], None, Duration::ZERO)
            .ok()
            .filter(|a| a.status == 200 && !a.body.trim().is_empty())
            .map(|a| a.body.trim().to_string());
        self.vm = Some(name.clone());
        name
    }
}

impl Poller for Azure {
    fn what(&self) -> String {
        format!(
            "{}/metadata/scheduledevents?api-version={AZURE_API}",
            self.base
        )
    }

    fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    fn poll(&mut self) -> PollResult {
        let url = self.what();
        let a = self
            .http
            .call("GET", &url, &[("Metadata", "true")], None, Duration::ZERO)?;
        if a.status != 200 {
            return Err(PollError::Unreachable(format!("{url}: HTTP {}", a.status)));
        }
        let bad = || PollError::Malformed(format!("{url}: {}", snippet(&a.body)));
        let v: Value = serde_json::from_str(&a.body).map_err(|_| bad())?;
        let incarnation = v["DocumentIncarnation"].as_u64();
        let events = v["Events"].as_array().ok_or_else(bad)?;
        for ev in events {
            let kind = ev["EventType"].as_str().unwrap_or_default();
            if kind != "Preempt" && kind != "Terminate" {
                continue;
            }
            let id = ev["EventId"].as_str().ok_or_else(bad)?.to_string();
            let resources: Vec<&str> = ev["Resources"]
                .as_array()
                .map(|r| r.iter().filter_map(|x| x.as_str()).collect())
                .unwrap_or_default();
            if !resources.is_empty() {
                if let Some(vm) = self.vm_name() {
                    if !resources.contains(&vm.as_str()) {
                        if !self.ignored.contains(&id) {
                            self.notes.push(format!(
                                "ignoring Azure {kind} event {id}: it is for {}, not this VM ({vm})", resources.join(", ")
                            ));
                            self.ignored.push(id);
                        }
                        continue;
                    }
                }
            }
            let not_before = ev["NotBefore"].as_str().unwrap_or_default();
            let deadline = parse_http_date(not_before)
                .unwrap_or_else(|| SystemTime::now() + Cloud::Azure.window());
            let http = Http::new(self.http.timeout);
            let ack_url = url.clone();
            let ack_id = id.clone();
            let ack: Ack = Box::new(move || {
                let mut body = json!({ "StartRequests": [{ "EventId": ack_id }] });
                if let Some(i) = incarnation {
                    body["DocumentIncarnation"] = json!(i);
                }
                match http.call(
                    "POST",
                    &ack_url,
                    &[("Metadata", "true"), ("Content-Type", "application/json")],
                    Some(&body.to_string()),
                    Duration::ZERO,
                ) {
                    Ok(a) if a.status == 200 => Ok(format!(
                        "approved Azure event {ack_id}: the platform may go ahead now"
                    )),
                    Ok(a) => Err(format!(
                        "approving Azure event {ack_id} answered HTTP {}",
                        a.status
                    )),
                    Err(e) => Err(format!("cannot approve Azure event {ack_id}: {e}")),
                }
            });
            return Ok(Some(Notice {
                reason: format!(
                    "Azure {kind} event {id}{}",
                    if not_before.is_empty() {
                        String::new()
                    } else {
                        format!(" not before {not_before}")
                    }
                ),
                deadline,
                ack: Some(ack),
            }));
        }
        Ok(None)
    }
}

/// Starts the watcher thread (nothing off-cloud with `auto`).
pub fn start(s: Settings, notifier: Notifier) {
    let _ = std::thread::Builder::new()
        .name("ckpt-preemption".into())
        .spawn(move || watch(s, notifier));
}

fn watch(s: Settings, n: Notifier) {
    let cloud = match s.choice {
        Choice::Aws => Cloud::Aws,
        Choice::Gcp => Cloud::Gcp,
        Choice::Azure => Cloud::Azure,
        Choice::Auto => match detect(&s.dmi_dir) {
            Some(c) => c,
            None => {
                n.event(
                    "notice_off",
                    format!(
                        "no cloud detected (from {}): not polling for preemption notices",
                        s.dmi_dir.display()
                    ),
                    json!({}),
                );
                return;
            }
        },
    };
    let base = s
        .base_url
        .clone()
        .unwrap_or_else(|| cloud.default_base().to_string())
        .trim_end_matches('/')
        .to_string();
    let window = s.window.unwrap_or(cloud.window());
    let http = Http::new(s.timeout);
    let mut poller: Box<dyn Poller> = match cloud {
        Cloud::Aws => Box::new(Aws {
            http,
            base,
            token: None,
        }),
        Cloud::Gcp => Box::new(Gcp {
            http,
            base,
            etag: None,
            long_poll: true,
            window,
        }),
        Cloud::Azure => Box::new(Azure {
            http,
            base,
            vm: None,
            ignored: Vec::new(),
            notes: Vec::new(),
        }),
    };
    // GCP answers a long poll the moment the value changes.
    let detect_delay = if cloud == Cloud::Gcp {
        s.timeout
    } else {
        s.poll + s.timeout
    };
    if !n.armed(cloud.name(), window, detect_delay) {
        return;
    }
    let mut failing: Option<PollError> = None;
    loop {
        let began = Instant::now();
        let r = poller.poll();
        for note in poller.take_notes() {
            n.event("notice_ignored", note, json!({}));
        }
        match r {
            Ok(notice) => {
                if failing.take().is_some() {
                    n.event(
                        "metadata_ok",
                        format!("the metadata service answers again ({})", poller.what()),
                        json!({}),
                    );
                }
                if let Some(notice) = notice {
                    let late = SystemTime::now()
                        .duration_since(notice.deadline)
                        .unwrap_or_default();
                    if late > Duration::from_secs(600) {
                        // A notice for a stop long past (e.g. after a hibernate and resume).
                        n.warn(
                            "notice_stale",
                            format!(
                                "ignoring a stale notice: {} ({} s ago)",
                                notice.reason,
                                late.as_secs()
                            ),
                            json!({ "deadline_ms": epoch_ms(notice.deadline) }),
                        );
                        return;
                    }
                    n.stop_soon(notice.reason, Some(notice.deadline), notice.ack);
                    return;
                }
            }
            Err(e) => {
                let same_kind = matches!(
                    (&failing, &e),
                    (Some(PollError::Unreachable(_)), PollError::Unreachable(_))
                        | (Some(PollError::Malformed(_)), PollError::Malformed(_))
                );
                if !same_kind {
                    let alive = n.warn(
                        "metadata_unavailable",
                        format!(
                            "{} metadata service: {e}; still polling every {} (logged once, until it answers properly)",
                            cloud.name(),
                            crate::supervisor::fmt_dur(s.poll)
                        ),
                        json!({ "url": poller.what(), "error": e.to_string() }),
                    );
                    if !alive {
                        return;
                    }
                }
                failing = Some(e);
            }
        }
        let spent = began.elapsed();
        if spent < s.poll && (failing.is_some() || poller.pause()) {
            std::thread::sleep(s.poll - spent);
        }
    }
}

fn epoch_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];
const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Parses an RFC 1123 date as Azure's `NotBefore` has it: `Mon, 19 Sep 2016 18:29:47 GMT`.
pub fn parse_http_date(s: &str) -> Option<SystemTime> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, day, mon, year, hms, zone] = parts.as_slice() else {
        return None;
    };
    if *zone != "GMT" && *zone != "UTC" {
        return None;
    }
    let m = MONTHS.iter().position(|x| x == mon)? as i64 + 1;
    let d: i64 = day.parse().ok()?;
    let y: i64 = year.parse().ok()?;
    let t: Vec<i64> = hms
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, mi, se] = t.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&d) || *h > 23 || *mi > 59 || *se > 60 {
        return None;
    }
    let secs = days_from_civil(y, m, d) * 86400 + h * 3600 + mi * 60 + se;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

/// Formats an RFC 1123 date (`Mon, 19 Sep 2016 18:29:47 GMT`).
pub fn http_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{}, {d:02} {} {y} {:02}:{:02}:{:02} GMT",
        DAYS[days.rem_euclid(7) as usize],
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Formats an RFC 3339 time in seconds, as AWS's `instance-action` has it.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_round_trip() {
        let t = parse_http_date("Mon, 19 Sep 2016 18:29:47 GMT").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().as_secs(), 1474309787);
        assert_eq!(http_date(t), "Mon, 19 Sep 2016 18:29:47 GMT");
        for s in [0u64, 951782400, 1709164800, 4102444799] {
            let t = UNIX_EPOCH + Duration::from_secs(s);
            assert_eq!(parse_http_date(&http_date(t)), Some(t), "{s}");
        }
        assert_eq!(parse_http_date(""), None);
        assert_eq!(parse_http_date("Mon, 19 Sep 2016 18:29:47 CEST"), None);
        assert_eq!(parse_http_date("Mon, 19 Foo 2016 18:29:47 GMT"), None);
    }

    #[test]
    fn aws_notice_parses() {
        let n = parse_aws(
            "u",
            r#"{"action": "terminate", "time": "2017-09-18T08:22:00Z"}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            n.deadline.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1505722920
        );
        for bad in [
            "",
            "{",
            r#"{"action": "reboot", "time": "2017-09-18T08:22:00Z"}"#,
            r#"{"action": "stop"}"#,
            r#"{"action": "stop", "time": "soon"}"#,
        ] {
            assert!(
                matches!(parse_aws("u", bad), Err(PollError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn detects_clouds_from_dmi_only() {
        let t = std::env::temp_dir().join(format!("ckpt-dmi-{}", std::process::id()));
        let case = |files: &[(&str, &str)]| {
            let _ = std::fs::remove_dir_all(&t);
            std::fs::create_dir_all(&t).unwrap();
            for (f, v) in files {
                std::fs::write(t.join(f), format!("{v}\n")).unwrap();
            }
            detect(&t)
        };
        assert_eq!(case(&[("sys_vendor", "Amazon EC2")]), Some(Cloud::Aws));
        assert_eq!(
            case(&[
                ("sys_vendor", "Google"),
                ("product_name", "Google Compute Engine")
            ]),
            Some(Cloud::Gcp)
        );
        assert_eq!(
            case(&[
                ("sys_vendor", "Microsoft Corporation"),
                ("chassis_asset_tag", "7783-7084-3265-9085-8269-3286-77")
            ]),
            Some(Cloud::Azure)
        );
        assert_eq!(
            case(&[
                ("sys_vendor", "Microsoft Corporation"),
                ("product_name", "Surface")
            ]),
            None
        );
        assert_eq!(case(&[("sys_vendor", "QEMU")]), None);
        assert_eq!(case(&[]), None);
        let _ = std::fs::remove_dir_all(&t);
        assert_eq!(detect(Path::new("/nonexistent/dmi")), None);
    }
}
