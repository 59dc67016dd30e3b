//! The client side of the admin API, used by `flashgate stock …` and `flashgate sale …`:
//! the call (verifying that flashgate answered), the SKU's path segment, and the
//! human-readable rendering of answers.

use std::fmt;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

use super::ADMIN_HEADER;

/// Bytes left as they are in a path segment: RFC 3986 unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// `sku` as one path segment, refused (with the reason) when the API could not take it.
/// `.` and `..` are encoded so nothing on the way can read them as dot segments.
pub fn sku_segment(sku: &str) -> Result<String, String> {
    crate::ids::Sku::parse(sku).map_err(|e| format!("SKU {sku:?}: {e}"))?;
    Ok(match sku {
        "." => "%2E".to_owned(),
        ".." => "%2E%2E".to_owned(),
        _ => utf8_percent_encode(sku, SEGMENT).to_string(),
    })
}

/// What answered one call.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    /// The answer carried `X-Flashgate-Admin: 1`: flashgate's admin API sent it.
    pub from_admin: bool,
    /// The `Server` header, to say what answered when it was not flashgate.
    pub server: Option<String>,
    pub body: String,
}

/// Why a call got no answer.
#[derive(Debug)]
pub enum CallError {
    /// The URL is not `http://host:port[/…]`.
    BadUrl {
        url: String,
        why: String,
    },
    /// Nothing listens at `addr`.
    Refused {
        url: String,
        addr: String,
    },
    /// No answer in time.
    Timeout {
        url: String,
    },
    Failed {
        url: String,
        error: String,
    },
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::BadUrl { url, why } => write!(
                f,
                "bad admin URL `{url}` ({why}): use http://host:port, e.g. http://127.0.0.1:9090"
            ),
            CallError::Refused { url, addr } => {
                write!(f, "{url}: connection refused: nothing listens on {addr}")
            }
            CallError::Timeout { url } => write!(f, "{url}: no answer within 10s"),
            CallError::Failed { url, error } => write!(f, "{url}: {error}"),
        }
    }
}

/// Sends one call to `base` + `path`; any answer is returned, whatever its status.
pub async fn call(
    base: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Answer, CallError> {
    let url = format!("{}{}", base.trim_end_matches('/'), path);
    let bad = |why: String| CallError::BadUrl {
        url: base.to_owned(),
        why,
    };
    let uri: Uri = url.parse().map_err(|e| bad(format!("{e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("not an http:// URL".into()));
    }
    let addr = uri.authority().map_or_else(String::new, |a| a.to_string());
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = Request::builder()
        .method(method)
        .uri(uri)
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            body.map(|b| b.to_string()).unwrap_or_default(),
        )))
        .map_err(|e| bad(e.to_string()))?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| CallError::Timeout { url: url.clone() })?
        .map_err(|e| {
            if refused(&e) {
                CallError::Refused {
                    url: url.clone(),
                    addr,
                }
            } else {
                CallError::Failed {
                    url: url.clone(),
                    error: chain(&e),
                }
            }
        })?;
    let status = resp.status();
    let from_admin = resp.headers().get(ADMIN_HEADER).is_some_and(|v| v == "1");
    let server = resp
        .headers()
        .get(http::header::SERVER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| CallError::Failed {
            url: url.clone(),
            error: e.to_string(),
        })?
        .to_bytes();
    Ok(Answer {
        status,
        from_admin,
        server,
        body: String::from_utf8_lossy(&text).trim_end().to_owned(),
    })
}

/// Whether the connect was refused (the legacy client wraps the io error).
fn refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// An error and its causes on one line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

/// `flashgate sale status`, for people, with the audit checked.
pub fn sale_status(sku: &str, v: &Value) -> String {
    let counts = |kind: &str| {
        let c = &v[kind];
        let n = |s: &str| c[s].as_u64().unwrap_or(0);
        format!(
            "held {}, sold {}, released {}, uncertain {}",
            n("held"),
            n("sold"),
            n("released"),
            n("uncertain")
        )
    };
    let state = if v["closed"] == true {
        "closed"
    } else {
        "open"
    };
    let stock = v["stock"].as_u64();
    let added = v["added"].as_u64();
    let units = &v["units"];
    let u = |s: &str| units[s].as_u64().unwrap_or(0);
    let audit = match (added, stock) {
        (Some(added), Some(stock)) => {
            let total = u128::from(stock)
                + u128::from(u("held"))
                + u128::from(u("sold"))
                + u128::from(u("uncertain"));
            let verdict = if u128::from(added) == total {
                "ok"
            } else {
                "MISMATCH"
            };
            format!(
                "{verdict}: added {added} {} stock {stock} + held {} + sold {} + uncertain {}{}",
                if verdict == "ok" { "=" } else { "!=" },
                u("held"),
                u("sold"),
                u("uncertain"),
                if verdict == "ok" {
                    String::new()
                } else {
                    format!(" (= {total}); reconcile `uncertain` orders and check Redis")
                },
            )
        }
        (None, Some(_)) => "not recorded yet: the next stock set or add starts it".to_owned(),
        _ => "n/a (not configured)".to_owned(),
    };
    format!(
        "sale {sku}: {state}\n\
         \x20 stock         {}\n\
         \x20 added         {}\n\
         \x20 buyers        {}\n\
         \x20 units         {}\n\
         \x20 reservations  {}\n\
         \x20 audit         {audit}",
        stock.map_or("not configured".to_owned(), |s| s.to_string()),
        added.map_or("not recorded".to_owned(), |a| a.to_string()),
        v["buyers"].as_u64().unwrap_or(0),
        counts("units"),
        counts("reservations"),
    )
}

/// A refusal from the admin API, for people: the status, the reason, what to do.
pub fn human_error(status: http::StatusCode, sku: &str, v: &Value) -> String {
    let reason = v["error"].as_str().unwrap_or("error");
    let message = v["message"].as_str().unwrap_or("");
    if reason == "stock_changed" {
        let current = v["stock"]
            .as_u64()
            .map_or("not configured".to_owned(), |c| c.to_string());
        let expected = v["expected"]
            .as_u64()
            .map_or("?".to_owned(), |e| e.to_string());
        return format!(
            "{sku}: stock changed: it is {current}, not {expected}; nothing was set ({status} {reason})"
        );
    }
    match v["field"].as_str() {
        Some(field) => format!("{status} {reason}: {field}: {message}"),
        None => format!("{status} {reason}: {message}"),
    }
}
