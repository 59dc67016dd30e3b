//! The client side of the admin API, used by the CLI (`admin/cli.rs`): the call (verifying
//! that flashgate answered) and the SKU's path segment. Answers are rendered for people by
//! `admin/render.rs`.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

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
        after: Duration,
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
            CallError::Timeout { url, after } => {
                write!(
                    f,
                    "{url}: no answer within {}",
                    humantime::format_duration(*after)
                )
            }
            CallError::Failed { url, error } => write!(f, "{url}: {error}"),
        }
    }
}

/// How long [`call`] waits for an answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends one call to `base` + `path`; any answer is returned, whatever its status. Waits at
/// most [`CALL_TIMEOUT`].
pub async fn call(
    base: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> Result<Answer, CallError> {
    call_within(base, token, method, path, body, CALL_TIMEOUT).await
}

/// [`call`], waiting at most `timeout` (an audit of many sales takes longer than a stock set).
pub async fn call_within(
    base: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<serde_json::Value>,
    timeout: Duration,
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
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .map_err(|_| CallError::Timeout {
            url: url.clone(),
            after: timeout,
        })?
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
