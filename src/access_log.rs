//! The access log: one JSON line per request (a sampled share of them), written through a
//! non-blocking writer so a slow disk or a full pipe never stalls the request path (lines past
//! the writer's buffer are dropped, as for the diagnostic log). The buffer is tracing-appender's
//! default, 128,000 lines: an access log at full sampling writes a line per request, and rides
//! out a few seconds of a slow disk with it, at 4 MiB allocated when the log is opened.
//!
//! ```json
//! {"time":"2026-12-24T10:00:00.123Z","route":"flash-buy","method":"POST","path":"/api/flash/tee/buy",
//!  "status":410,"reason":"sold_out","duration_ms":0.41,"client_ip":"203.0.113.9",
//!  "user":"u:5e884898da280471","trace_id":"4bf92f3577b34da6a3ce929d0e0e4736"}
//! ```
//! `reason` is there for flashgate's own answers; `upstream_status` and `upstream_ms` for a
//! request that reached the backend. `path` is the path as the client sent it, without the
//! query (which may carry tokens). User ids are logged as `u:` and the first 16 hex digits of
//! their SHA-256 — the same buyer gives the same hash on every instance, but the log does not
//! hold the id (a pseudonym: a short id space can be guessed) — unless `log_user_ids: true`.

use std::io::Write as _;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use http::Method;
use sha2::{Digest, Sha256};
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};

use crate::config;
use crate::ids::UserId;
use crate::trace::Trace;

pub struct AccessLog {
    writer: NonBlocking,
    _guard: WorkerGuard,
    /// Requests whose trace id falls under this threshold are logged.
    threshold: u64,
    log_user_ids: bool,
}

/// One request, as the log line tells it.
pub struct Entry<'a> {
    pub route: &'a str,
    pub method: &'a Method,
    pub path: &'a str,
    pub status: u16,
    /// flashgate's own answer's reason.
    pub reason: Option<&'static str>,
    pub duration: Duration,
    /// The backend's status (if it answered) and how long it took.
    pub upstream: Option<(Option<u16>, Duration)>,
    pub client_ip: IpAddr,
    pub user: Option<&'a UserId>,
    pub trace_id: &'a str,
}

impl AccessLog {
    /// Opens the log's destination (the file is created or appended to).
    pub fn open(cfg: &config::AccessLog) -> Result<AccessLog, String> {
        let (writer, guard) = match &cfg.path {
            None => tracing_appender::non_blocking(std::io::stdout()),
            Some(path) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("cannot open the access log {}: {e}", path.display()))?;
                tracing_appender::non_blocking(file)
            }
        };
        // `sample` is checked to be within 0..=1 at config load.
        let threshold = if cfg.sample >= 1.0 {
            u64::MAX
        } else {
            (cfg.sample * u64::MAX as f64) as u64
        };
        Ok(AccessLog {
            writer,
            _guard: guard,
            threshold,
            log_user_ids: cfg.log_user_ids,
        })
    }

    /// Whether this request's line is written: decided by its trace id, so a trace that
    /// crosses several instances is logged by all of them or by none.
    pub fn sampled(&self, trace: &Trace) -> bool {
        self.threshold == u64::MAX || trace.sample_key() < self.threshold
    }

    pub fn write(&self, e: &Entry<'_>) {
        let mut line = String::with_capacity(256);
        line.push_str("{\"time\":\"");
        line.push_str(&humantime::format_rfc3339_millis(SystemTime::now()).to_string());
        line.push('"');
        field(&mut line, "route", e.route);
        field(&mut line, "method", e.method.as_str());
        field(&mut line, "path", e.path);
        raw(&mut line, "status", &e.status.to_string());
        if let Some(reason) = e.reason {
            field(&mut line, "reason", reason);
        }
        raw(&mut line, "duration_ms", &millis(e.duration));
        if let Some((status, took)) = e.upstream {
            if let Some(status) = status {
                raw(&mut line, "upstream_status", &status.to_string());
            }
            raw(&mut line, "upstream_ms", &millis(took));
        }
        field(
            &mut line,
            "client_ip",
            &e.client_ip.to_canonical().to_string(),
        );
        if let Some(user) = e.user {
            if self.log_user_ids {
                field(&mut line, "user", user.as_str());
            } else {
                field(&mut line, "user", &pseudonym(user.as_str()));
            }
        }
        field(&mut line, "trace_id", e.trace_id);
        line.push_str("}\n");
        // A full buffer drops the line rather than wait (see the module comment).
        let _ = self.writer.clone().write_all(line.as_bytes());
    }
}

/// `u:` and the first 16 hex digits of the id's SHA-256.
pub fn pseudonym(user: &str) -> String {
    let digest = Sha256::digest(user.as_bytes());
    let mut out = String::from("u:");
    for b in &digest[..8] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

fn millis(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// `,"name":"value"` with the value JSON-escaped.
fn field(line: &mut String, name: &str, value: &str) {
    line.push_str(",\"");
    line.push_str(name);
    line.push_str("\":");
    // Serializing a &str cannot fail.
    line.push_str(&serde_json::to_string(value).unwrap_or_default());
}

/// `,"name":value` for a number.
fn raw(line: &mut String, name: &str, value: &str) {
    line.push_str(",\"");
    line.push_str(name);
    line.push_str("\":");
    line.push_str(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_and_hide_the_id() {
        let a = pseudonym("alice");
        assert_eq!(a, pseudonym("alice"));
        assert_ne!(a, pseudonym("alicf"));
        assert!(!a.contains("alice"));
        assert_eq!(a.len(), 2 + 16);
    }
}
