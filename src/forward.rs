//! Forwarding to the shop backend: one pooled keep-alive client, bodies streamed both ways,
//! hop-by-hop headers stripped, `X-Forwarded-*` set, `Upgrade` (WebSocket) spliced end to end.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, CONNECTION, HOST, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use thread_local::ThreadLocal;
use tracing::debug;

use crate::body::{self, Body};
use crate::config;
use crate::interim::{Interim, OnlyInterim, Outbox};
use crate::metrics::Metrics;

/// Why a forward failed. The distinction matters to a sale: `Connect` means the backend
/// certainly never saw the request (the unit can be released); the others are uncertain.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream connect failed: {0}")]
    Connect(String),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("upstream request failed: {0}")]
    Failed(String),
    /// The backend answered something flashgate cannot pass on (a response head over
    /// `upstream.max_response_headers` / `max_response_head_bytes`, or malformed). It may
    /// have taken the request.
    #[error("upstream response unreadable: {0}")]
    BadResponse(String),
    /// The client's request body failed while it was being sent on (malformed chunked
    /// framing, or the client went away): the backend got part of it.
    #[error("request body failed: {0}")]
    ClientBody(String),
}

impl ForwardError {
    /// The `kind` label of `flashgate_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ForwardError::Connect(_) => "connect",
            ForwardError::Timeout(_) => "timeout",
            ForwardError::Failed(_) => "failed",
            ForwardError::BadResponse(_) => "bad_response",
            ForwardError::ClientBody(_) => "client_body",
        }
    }
}

/// The pooled client to the one upstream.
///
/// One pool per thread: a pooled connection's task lives on the runtime that opened it, so a
/// pool shared across threads would hand every request to another thread and back (measured:
/// two worker threads sharing one pool served fewer requests per second than one thread).
/// With a runtime per core, each core keeps its own keep-alive connections.
pub struct Upstream {
    cfg: config::Upstream,
    metrics: Arc<Metrics>,
    clients: ThreadLocal<Client<HttpConnector, Body>>,
    /// The orders' pool: connections idle for less than `order_idle_timeout` only.
    order_clients: ThreadLocal<Client<HttpConnector, Body>>,
}

/// What the forwarder needs to know about the client connection.
#[derive(Debug, Clone)]
pub struct Peer {
    pub ip: IpAddr,
    /// The peer is a configured trusted proxy: its `X-Forwarded-*` headers are kept.
    pub trusted: bool,
    /// Where the backend's `103 Early Hints` go; `None` when the client cannot take them.
    pub hints: Option<Arc<Outbox>>,
}

/// Whether a request may be sent to the backend a second time when its connection closed
/// before any answer came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Again {
    /// An admitted order: sent once, whatever happens (a second copy could sell twice), on
    /// the orders' own pool (`upstream.order_idle_timeout`).
    Never,
    /// Pass-through traffic: a request with an idempotent method (RFC 9110 §9.2.2) and no body
    /// is sent once more, as RFC 9112 §9.3.1.1 allows and Go's `net/http` and nginx do. A
    /// backend closing an idle keep-alive connection (its keep-alive timeout) just as
    /// flashgate sends on it otherwise costs the client a 502.
    IfIdempotent,
}

/// How many times a request safe to repeat is sent at most.
const MAX_SENDS: usize = 3;

/// A copy of a request that may be sent again (see [`Again::IfIdempotent`]).
struct Replay {
    method: http::Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Replay {
    /// The copy, for an idempotent method and a body known to be empty; else `None`.
    fn of(req: &Request<Body>) -> Option<Replay> {
        use http::Method;
        let idempotent = matches!(
            *req.method(),
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        (idempotent && http_body::Body::size_hint(req.body()).exact() == Some(0)).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
        })
    }

    fn request(&self) -> Request<Body> {
        let mut req = Request::new(body::empty());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// The backend's side closed (or reset) the connection before any answer: the request may or
/// may not have reached it, so only a request safe to repeat is sent again.
fn closed_before_answer(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        if let Some(h) = inner.downcast_ref::<hyper::Error>()
            && h.is_incomplete_message()
        {
            return true;
        }
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        source = inner.source();
    }
    false
}

/// RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies still see.
// Header names, not strings: a `&str` key is parsed and hashed on every lookup, and these
// are removed from every request and response.
// `connection` first: `strip_hop_by_hop` reads its slot.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

impl Upstream {
    pub fn new(cfg: &config::Upstream, metrics: Arc<Metrics>) -> Upstream {
        Upstream {
            cfg: cfg.clone(),
            metrics,
            clients: ThreadLocal::new(),
            order_clients: ThreadLocal::new(),
        }
    }

    /// The path and query the backend receives for `path_and_query` (with the upstream's
    /// path prefix).
    pub fn forwarded_path(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.cfg.url.path_prefix)
    }

    /// This thread's pool: pass-through traffic's, or the orders' (see [`Again`]).
    fn client(&self, again: Again) -> &Client<HttpConnector, Body> {
        match again {
            Again::IfIdempotent => self
                .clients
                .get_or(|| self.build(self.cfg.pool_idle_timeout)),
            Again::Never => self
                .order_clients
                .get_or(|| self.build(self.cfg.pool_idle_timeout.min(self.cfg.order_idle_timeout))),
        }
    }

    fn build(&self, idle_timeout: Duration) -> Client<HttpConnector, Body> {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(self.cfg.connect_timeout));
        http.set_nodelay(true);
        http.enforce_http(true);
        Client::builder(TokioExecutor::new())
            .http1_max_headers(self.cfg.max_response_headers)
            // hyper's floor; the config refuses less.
            .http1_max_buf_size(self.cfg.max_response_head_bytes.max(8192))
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(idle_timeout)
            .pool_max_idle_per_host(self.cfg.pool_max_idle)
            .build(http)
    }

    /// Forwards `req` (already routed and admitted) and returns the upstream's response with
    /// its body still streaming.
    pub async fn forward(
        &self,
        req: Request<Body>,
        peer: Peer,
        again: Again,
    ) -> Result<Response<Body>, ForwardError> {
        let started = std::time::Instant::now();
        let result = self.exchange(req, peer, again).await;
        let kind = result.as_ref().err().map(ForwardError::kind);
        self.metrics.upstream_call(started.elapsed(), kind);
        result
    }

    async fn exchange(
        &self,
        mut req: Request<Body>,
        peer: Peer,
        again: Again,
    ) -> Result<Response<Body>, ForwardError> {
        let client_upgrade = wants_upgrade(req.headers()).then(|| hyper::upgrade::on(&mut req));
        let mut interim = Interim::watch(&mut req, peer.hints.clone());
        self.rewrite(&mut req, &peer)?;
        let replay = match again {
            Again::IfIdempotent if client_upgrade.is_none() => Replay::of(&req),
            _ => None,
        };

        let response = interim.until_final(self.send(req, again, replay), self.cfg.interim_timeout);
        let sent = match tokio::time::timeout(self.cfg.request_timeout, response).await {
            Err(_) => return Err(ForwardError::Timeout(self.cfg.request_timeout)),
            Ok(Err(OnlyInterim(silence))) => {
                return Err(ForwardError::BadResponse(format!(
                    "the backend sent an informational (1xx) answer, then nothing for {silence:?}"
                )));
            }
            Ok(Ok(sent)) => sent,
        };
        let mut resp = match sent {
            Err(e) if e.is_connect() => return Err(ForwardError::Connect(error_chain(&e))),
            Err(e) if unreadable_response(&e) || interim.saw_bare() => {
                return Err(ForwardError::BadResponse(error_chain(&e)));
            }
            Err(e) if client_body_failed(&e) => {
                return Err(ForwardError::ClientBody(innermost(&e)));
            }
            Err(e) => return Err(ForwardError::Failed(error_chain(&e))),
            Ok(resp) => resp,
        };

        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut resp);
                tokio::spawn(splice(client_upgrade, upstream_upgrade));
            }
        } else {
            strip_hop_by_hop(resp.headers_mut());
        }
        Ok(resp.map(body::stream::<Incoming>))
    }

    /// Sends `req`; when the connection closed before any answer and `replay` holds a copy
    /// (a body-less request with an idempotent method), sends the copy again, up to
    /// [`MAX_SENDS`] in all (the next pooled connection may be closing too).
    async fn send(
        &self,
        req: Request<Body>,
        again: Again,
        replay: Option<Replay>,
    ) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
        let mut sent = self.client(again).request(req).await;
        let Some(replay) = replay else {
            return sent;
        };
        for _ in 1..MAX_SENDS {
            match &sent {
                Err(e) if closed_before_answer(e) => {
                    debug!(error = %error_chain(e), "upstream closed the connection before answering: sending the request again");
                    self.metrics.upstream_retried();
                    sent = self.client(again).request(replay.request()).await;
                }
                _ => break,
            }
        }
        sent
    }

    fn rewrite(&self, req: &mut Request<Body>, peer: &Peer) -> Result<(), ForwardError> {
        let upgrade = wants_upgrade(req.headers());
        // The target's authority wins over `Host` (RFC 9112 §3.2.2 for an absolute-form
        // target; h2 carries `:authority` there, RFC 9113 §8.3.1), else `Host`.
        let host = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| req.headers().get(HOST).cloned());

        let pq = match req.uri().path_and_query() {
            // The common case: no prefix, reuse the parsed path (a cheap, shared clone).
            Some(pq) if self.cfg.url.path_prefix.is_empty() => pq.clone(),
            pq => {
                let path = pq.map_or("/", PathAndQuery::as_str);
                PathAndQuery::try_from(self.forwarded_path(path))
                    .map_err(|e| ForwardError::Failed(format!("cannot build upstream URI: {e}")))?
            }
        };
        let uri = Uri::builder()
            .scheme(self.cfg.url.scheme.clone())
            .authority(self.cfg.url.authority.clone())
            .path_and_query(pq)
            .build()
            .map_err(|e| ForwardError::Failed(format!("cannot build upstream URI: {e}")))?;
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;

        let upgrade_proto = req.headers().get(UPGRADE).cloned();
        let te_trailers = req
            .headers()
            .get_all(header::TE)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        // hyper answered the client's `Expect: 100-continue` itself (when the body was first
        // read); the backend gets the body at once, so any `100` from it is unsolicited.
        headers.remove(header::EXPECT);
        if upgrade && let Some(proto) = upgrade_proto {
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, proto);
        }
        if te_trailers {
            // The one TE value that is end-to-end in meaning: the client accepts trailers.
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(host) = &host {
            headers.insert(HOST, host.clone());
        }
        join_cookies(headers);
        set_forwarded(headers, peer, host.as_ref());
        Ok(())
    }
}

fn set_forwarded(headers: &mut HeaderMap, peer: &Peer, host: Option<&HeaderValue>) {
    const XFF: HeaderName = HeaderName::from_static("x-forwarded-for");
    const XFP: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const XFH: HeaderName = HeaderName::from_static("x-forwarded-host");

    use std::fmt::Write as _;
    let mut chain = String::new();
    if peer.trusted {
        for prior in headers.get_all(&XFF).iter().filter_map(|v| v.to_str().ok()) {
            chain.push_str(prior);
            chain.push_str(", ");
        }
    }
    // From an untrusted peer the chain is whatever the client typed: dropped.
    let _ = write!(chain, "{}", peer.ip.to_canonical());
    headers.remove(&XFF);
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(chain)) {
        headers.insert(XFF, v);
    }
    if !peer.trusted || !headers.contains_key(&XFP) {
        headers.insert(XFP, HeaderValue::from_static("http"));
    }
    if (!peer.trusted || !headers.contains_key(&XFH))
        && let Some(host) = host
    {
        headers.insert(XFH, host.clone());
    }
}

/// One `Cookie` line for the backend. HTTP/2 clients send each cookie as its own field (browsers
/// all do); RFC 9113 §8.2.3 says they MUST be joined with `"; "` before the request goes on as
/// HTTP/1.1, where a second `Cookie` line is read as part of the first cookie's value (httpbin
/// reads `a=1, b=2` as one cookie `a`).
fn join_cookies(headers: &mut HeaderMap) {
    let mut cookies = headers.get_all(header::COOKIE).iter();
    if cookies.next().is_none() || cookies.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v.as_bytes());
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(joined)) {
        headers.insert(header::COOKIE, v);
    }
}

/// Removes the fields named in `Connection`, then the fixed hop-by-hop list.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names present (a handful) finds what to remove: eight lookups by
    // name, on every request and response, each hashed the name and probed the map.
    let mut present = [false; HOP_BY_HOP.len()];
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
        }
    }
    if present[0] {
        // Most messages name only fixed hop-by-hop fields (`Connection: keep-alive`), which
        // are removed below anyway: collect (and allocate) only for other names.
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|n| {
                !HOP_BY_HOP
                    .iter()
                    .any(|h| h.as_str().eq_ignore_ascii_case(n))
            })
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (name, present) in HOP_BY_HOP.iter().zip(present) {
        if present {
            headers.remove(name);
        }
    }
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Copies bytes both ways between the client's and the upstream's upgraded connections.
async fn splice(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        debug!(error = %e, "upgraded connection ended");
    }
}

/// The request went out and what came back could not be parsed (too large or malformed).
fn unreadable_response(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = e.source();
    while let Some(inner) = source {
        if let Some(h) = inner.downcast_ref::<hyper::Error>() {
            return h.is_parse() || h.is_parse_too_large();
        }
        source = inner.source();
    }
    false
}

/// The request body (the client's bytes) failed, not the exchange with the backend.
fn client_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = e.source();
    while let Some(inner) = source {
        if let Some(h) = inner.downcast_ref::<hyper::Error>() {
            // hyper's "error from user's Body stream", carrying the body's own error.
            return h.is_user() && std::error::Error::source(h).is_some();
        }
        source = inner.source();
    }
    false
}

/// The root cause alone (what the client did), for an answer to the client.
fn innermost(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_cookies_are_joined_into_one_line() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2; c=3"));
        join_cookies(&mut h);
        let all: Vec<_> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);

        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookies(&mut h);
        assert_eq!(h[header::COOKIE], "a=1");
    }

    #[test]
    fn strips_fixed_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn xff_is_replaced_for_untrusted_and_appended_for_trusted() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        let peer = Peer {
            ip: "10.0.0.9".parse().unwrap(),
            trusted: false,
            hints: None,
        };
        set_forwarded(&mut h, &peer, None);
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        h.append("x-forwarded-for", HeaderValue::from_static("2.2.2.2"));
        set_forwarded(
            &mut h,
            &Peer {
                trusted: true,
                ..peer
            },
            None,
        );
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
    }
}
