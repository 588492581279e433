//! Following a job to its end: the one function every `--wait` uses ([`wait`]).
//! It streams the job's server-sent events (`GET /v1/jobs/{id}/events`),
//! reconnects with `Last-Event-ID` when the connection drops, falls back to polling
//! `GET /v1/jobs/{id}` every 250 ms when the stream cannot be used, and shows
//! progress on stderr: an indicatif spinner on a terminal, a line per change
//! otherwise (so a log keeps the history).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;

use super::output::{self, Output};
use super::{CliError, SiteOpts};
use crate::api::client::Client;
use crate::api::{full, ApiError, Body};
use crate::site::model::{Job, JobEvent, JobState};

/// Polling period when the event stream cannot be used.
const POLL: Duration = Duration::from_millis(250);
/// Spinner frame period.
const SPIN: Duration = Duration::from_millis(100);
/// Reconnections of a broken event stream in a row before polling instead.
const RECONNECTS: u32 = 5;
/// Failed polls in a row (the site unreachable) before giving up: about 10 s.
const POLL_FAILURES: u32 = 40;

/// How much progress [`wait`] shows on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    /// A spinner on a terminal, a line per change otherwise.
    Progress,
    /// A spinner on a terminal, nothing otherwise (for commands whose stderr
    /// carries other output, like `vm exec`).
    SpinnerOnly,
}

/// Follows job `id` until it ends, showing progress on stderr; returns the final
/// job, whatever its state (see [`outcome`]).
pub async fn wait(site: &SiteOpts, client: &Client, id: &str, show: Show) -> Result<Job, CliError> {
    let path = format!("/v1/jobs/{id}");
    let job: Job = client.get(&path).await?;
    let mut progress = Progress::new(&job, show);
    if job.state.is_terminal() {
        progress.finish(&job);
        return Ok(job);
    }
    follow(site, id, |seen| match seen {
        Some(ev) => progress.event(ev),
        None => progress.tick(),
    })
    .await;
    // After the terminal event this reads the final job at once; after a stream
    // that could not be followed it polls.
    let mut failures = 0;
    loop {
        match client.get::<Job>(&path).await {
            Ok(j) => {
                failures = 0;
                progress.state(j.state);
                if j.state.is_terminal() {
                    progress.finish(&j);
                    return Ok(j);
                }
            }
            Err(e) if unreachable(&e) && failures < POLL_FAILURES => failures += 1,
            Err(e) => {
                progress.clear();
                return Err(e.into());
            }
        }
        let until = Instant::now() + POLL;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            tokio::time::sleep(left.min(SPIN)).await;
            progress.tick();
        }
    }
}

/// A final job as a result: `Ok` when it succeeded, its typed error otherwise.
pub fn outcome(job: Job) -> Result<Job, CliError> {
    match job.state {
        JobState::Succeeded => Ok(job),
        JobState::Cancelled => Err(CliError::JobCancelled(job.id)),
        _ => {
            let (kind, message) = job.error.map(|e| (e.kind, e.message)).unwrap_or_else(|| {
                (
                    "backend".into(),
                    format!("it ended {}", state_name(job.state)),
                )
            });
            Err(CliError::JobFailed {
                job: job.id,
                kind,
                message,
            })
        }
    }
}

/// What a job-producing command does with the job the site accepted. Without
/// `wait` it prints the job's id (table) or the job (JSON) and returns `None`.
/// With `wait` it follows the job, prints the final job in JSON mode, and returns
/// it when it succeeded (the caller prints a table of the result) or its error.
pub async fn submitted(
    site: &SiteOpts,
    client: &Client,
    job: Job,
    wait_for_it: bool,
) -> Result<Option<Job>, CliError> {
    if !wait_for_it {
        match site.output {
            Output::Table => println!("{}", job.id),
            Output::Json => output::json(&job),
        }
        return Ok(None);
    }
    let done = wait(site, client, &job.id, Show::Progress).await?;
    if site.output == Output::Json {
        output::json(&done);
    }
    outcome(done).map(Some)
}

/// True for the error the client reports when the site cannot be reached.
fn unreachable(e: &ApiError) -> bool {
    e.status == 503 && e.kind == "unavailable"
}

/// Streams the events of job `id` to `seen` (`Some(event)`; `None` every 100 ms
/// meanwhile, to animate a spinner) until the terminal one. A connection that
/// drops is reopened with `Last-Event-ID`, so nothing is seen twice. True when the
/// terminal event arrived; false when the stream ended, broke for good or was
/// refused before it: the caller then reads (or polls) the job itself, which
/// reports any real error (no such job, bad token).
pub async fn follow(site: &SiteOpts, id: &str, mut seen: impl FnMut(Option<&JobEvent>)) -> bool {
    let stream = EventStream::new(site, id);
    let mut last = 0u64;
    let mut failures = 0u32;
    let mut ticker = tokio::time::interval(SPIN);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let broken = match stream.open(last).await {
            Err(e) if unreachable(&e) => true,
            Err(_) => return false,
            Ok(mut body) => {
                let mut parser = SseParser::default();
                loop {
                    tokio::select! {
                        frame = body.frame() => match frame {
                            None => break false,
                            Some(Err(_)) => break true,
                            Some(Ok(frame)) => {
                                let Ok(bytes) = frame.into_data() else { continue };
                                for data in parser.push(&bytes) {
                                    let Ok(ev) = serde_json::from_str::<JobEvent>(&data) else {
                                        continue;
                                    };
                                    if ev.seq <= last {
                                        continue;
                                    }
                                    last = ev.seq;
                                    failures = 0;
                                    seen(Some(&ev));
                                    if ev.state.is_terminal() {
                                        return true;
                                    }
                                }
                            }
                        },
                        _ = ticker.tick() => seen(None),
                    }
                }
            }
        };
        // The site ends a stream itself only once the job is over (its events
        // may have been trimmed): the caller reads the job.
        if !broken {
            return false;
        }
        failures += 1;
        if failures > RECONNECTS {
            return false;
        }
        let until = Instant::now() + POLL * failures;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            tokio::time::sleep(left.min(SPIN)).await;
            seen(None);
        }
    }
}

/// Opens a job's event stream, with `Last-Event-ID` after a reconnection (the
/// plain client sends no extra headers on streamed GETs).
struct EventStream {
    http: HyperClient<HttpConnector, Body>,
    url: String,
    token: Option<String>,
}

impl EventStream {
    fn new(site: &SiteOpts, id: &str) -> EventStream {
        EventStream {
            http: HyperClient::builder(TokioExecutor::new()).build_http(),
            url: format!(
                "{}/v1/jobs/{id}/events",
                site.base_url().trim_end_matches('/')
            ),
            token: site.token.clone(),
        }
    }

    async fn open(&self, after: u64) -> Result<Incoming, ApiError> {
        let mut req = Request::get(&self.url).header(hyper::header::ACCEPT, "text/event-stream");
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        if after > 0 {
            req = req.header("last-event-id", after.to_string());
        }
        let req = req
            .body(full(bytes::Bytes::new()))
            .map_err(|e| ApiError::bad_request(format!("bad request for {}: {e}", self.url)))?;
        let resp = self.http.request(req).await.map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("GET {}: {e}", self.url),
            )
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.into_body());
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Err(ApiError::from_body(status.as_u16(), &body))
    }
}

/// Splits a server-sent event stream into the `data` of each event (comments,
/// `id:` and `event:` lines are skipped: the data carries the sequence number).
#[derive(Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: String,
}

impl SseParser {
    /// Feeds received bytes; returns the data of the events they completed.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() {
                    out.push(std::mem::take(&mut self.data));
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            if field == "data" {
                if !self.data.is_empty() {
                    self.data.push('\n');
                }
                self.data.push_str(value);
            }
        }
        out
    }
}

/// Progress of one job on stderr: an indicatif spinner on a terminal, a line per
/// change otherwise.
struct Progress {
    /// The spinner (terminal only).
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    /// On a terminal, end the spinner with a summary line.
    summary: bool,
    start: Instant,
    state: JobState,
    /// The last state printed as a line.
    printed: Option<JobState>,
}

impl Progress {
    fn new(job: &Job, show: Show) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let lines = !tty && show == Show::Progress;
        if lines {
            eprintln!("waiting for job {} ({})", job.id, job.kind.as_str());
        }
        let bar = tty.then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{spinner} {prefix} {msg} {elapsed}")
            {
                bar.set_style(style);
            }
            bar.set_prefix(job.id.clone());
            bar.set_message(state_name(job.state));
            bar.enable_steady_tick(SPIN);
            bar
        });
        Progress {
            bar,
            lines,
            summary: tty && show == Show::Progress,
            start: Instant::now(),
            state: job.state,
            printed: None,
        }
    }

    fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn show(&self, state: JobState, note: &str) {
        if let Some(bar) = &self.bar {
            let sep = if note.is_empty() { "" } else { " " };
            bar.set_message(format!(
                "{}{sep}{}",
                state_name(state),
                output::clip(note, 50)
            ));
        }
    }

    fn event(&mut self, ev: &JobEvent) {
        self.state = ev.state;
        let note = note(ev);
        if self.lines {
            let sep = if note.is_empty() { "" } else { ": " };
            eprintln!(
                "[{:>6.1}s] {}{sep}{note}",
                self.elapsed(),
                state_name(ev.state)
            );
            self.printed = Some(ev.state);
        }
        self.show(ev.state, note);
    }

    /// A state seen by polling (no message).
    fn state(&mut self, state: JobState) {
        if state == self.state {
            return;
        }
        self.state = state;
        if self.lines {
            eprintln!("[{:>6.1}s] {}", self.elapsed(), state_name(state));
            self.printed = Some(state);
        }
        self.show(state, "");
    }

    /// The spinner ticks by itself; nothing to do between changes.
    fn tick(&mut self) {}

    fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn finish(&mut self, job: &Job) {
        self.clear();
        // A job that had ended before it was followed still gets its line.
        if self.lines && self.printed != Some(job.state) {
            eprintln!("[{:>6.1}s] {}", self.elapsed(), state_name(job.state));
            self.printed = Some(job.state);
        }
        if self.summary {
            eprintln!(
                "job {} {} after {:.1}s",
                job.id,
                state_name(job.state),
                self.elapsed()
            );
        }
    }
}

/// What an event says beyond its state (the site's messages often repeat it).
pub fn note(ev: &JobEvent) -> &str {
    let state = state_name(ev.state);
    match ev.message.strip_prefix(state) {
        Some("") => "",
        Some(rest) if rest.starts_with(": ") => &rest[2..],
        _ => &ev.message,
    }
}

/// A job state's name as the API writes it.
pub fn state_name(s: JobState) -> &'static str {
    match s {
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_are_split_across_chunks_and_comments_skipped() {
        let mut p = SseParser::default();
        assert!(p.push(b": keep-alive\n\nid: 1\nevent: job\nda").is_empty());
        assert_eq!(
            p.push(b"ta: {\"a\":1}\n\nid: 2\r\ndata: x\r\n\r\n"),
            ["{\"a\":1}", "x"]
        );
    }
}
