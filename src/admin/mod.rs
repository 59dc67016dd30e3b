//! The admin API, on its own listener (keep it on loopback or a private network): set, add and
//! read stock per SKU, close and reopen a sale, read a sale's status, list the sales, audit
//! them and reconcile their reservations (`reconcile.rs`). Every call but
//! `/healthz` needs `Authorization: Bearer <token>`, the token coming from an environment
//! variable. Every answer carries `X-Flashgate-Admin: 1`, so the CLI can tell flashgate's
//! admin API from whatever else answers on that address.
//!
//! The `{sku}` segment is percent-decoded once, then parsed like a buyer's SKU
//! ([`Sku::parse`](crate::ids::Sku::parse)).
//! Stock, `expect` and `delta` are JSON integers within 2^53 − 1 ([`MAX_UNITS`]); anything
//! else, and any unknown field, is 400 `bad_request` with `"field"` naming it.
//!
//! | call | body | answer |
//! |---|---|---|
//! | `GET /v1/stock/{sku}` | | `{"sku","stock"}`; 404 `not_configured` |
//! | `PUT /v1/stock/{sku}` | `{"stock": N}`, optionally `"expect": M` (or `If-Match: M`) | `{"sku","stock"}`; 409 `stock_changed` with the current `"stock"` when it is not `M` (nothing changed) |
//! | `POST /v1/stock/{sku}/add` | `{"delta": N}` (may be negative) | `{"sku","stock"}`; 400 when the stock would leave 0..=2^53 − 1 |
//! | `GET /v1/sales/{sku}` | | stock, `added`, `closed`, buyers, reservations and units by state |
//! | `POST /v1/sales/{sku}/close` | none | `{"sku","closed":true}`: buyers get 410 `closed`, stock untouched |
//! | `POST /v1/sales/{sku}/open` | none | `{"sku","closed":false}` |
//! | `GET /v1/sales?limit=N` | | `{"sales":[status…],"truncated"}`: every SKU ever stocked, sorted (at most N, default 1000, up to 10000) |
//! | `GET /v1/audit?sku=A&sku=B&held_older_than=60s` | | `{"ok","held_older_than_ms","sales":[…],"truncated"}`: per SKU `added == stock + held + sold + uncertain` and no `held` reservation older than the threshold (default: 2 × `upstream.request_timeout`, at least 60s); every listed SKU when none is named. Always 200: `"ok"` is the verdict |
//! | `GET /v1/sales/{sku}/reservations?state=uncertain&older_than=0s&limit=100` | | `{"sku","state","reservations":[{"id","user","quantity","state","reserved_at_ms","age_ms"}…],"truncated"}`, oldest first; `state` `uncertain` (default) or `held`; `limit` up to 1000 |
//! | `POST /v1/sales/{sku}/reservations/{id}/resolve` | `{"to": "sold" \| "released"}` | `{"sku","id","from","to","quantity","stock"}`: an `uncertain` reservation, or a `held` one older than the audit's default threshold, settled once (`released`: units back to stock, the user's slot freed); 409 `not_resolvable` with its `"state"` (a second resolve included); 404 `unknown_reservation` |
//!
//! `GET` calls work with the read-only token too; every other call needs the write token.
//! Every write is logged at `info` with the token kind, the SKU and the value before and after.
//! | `GET /v1/rooms`, `GET /v1/rooms/{name}`, `POST /v1/rooms/{name}/pause\|resume\|drain` | | the waiting rooms ([`rooms`]) |
//! | `GET /v1/events` | | the live dashboard's server-sent events ([`events`]) |
//! | `GET /dashboard` (no token) | | the live dashboard page ([`dashboard`]) |
//!
//! The listener is served like the proxy's: HTTP/1.1 with the same `server.header_read_timeout`,
//! `server.max_header_bytes` and `server.max_headers`, so a half-sent head cannot hold an admin
//! connection open.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::admin::auth::{Access, Throttle, Tokens};
use crate::body::{self, Body};
use crate::ids::Sku;
use crate::reject::Reject;
use crate::state::App;
use crate::store::{MAX_UNITS, StockSet, StoreError};

mod reconcile;
pub mod rooms;

/// Admin request bodies are tiny.
const MAX_ADMIN_BODY: usize = 4096;

/// Set on every admin answer; the CLI refuses an answer without it.
pub const ADMIN_HEADER: HeaderName = HeaderName::from_static("x-flashgate-admin");

/// Serves the admin API until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    tokens: Tokens,
    shutdown: impl Future<Output = ()>,
) {
    let auth = Arc::new((tokens, Throttle::default()));
    // Ends the dashboard's event streams when the listener stops.
    let stopping = tokio_util::sync::CancellationToken::new();
    let _stop_streams = stopping.clone().drop_guard();
    let events = events::Events::start(app.clone(), stopping);
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin API listening");
    }
    // `server.*` needs a restart, so the limits read at start hold for the listener's life.
    let limits = app.snapshot().config.server.clone();
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .max_headers(limits.max_headers);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(pair) => pair,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let (app, auth, h1) = (app.clone(), auth.clone(), h1.clone());
        let events = events.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (app, auth, events) = (app.clone(), auth.clone(), events.clone());
                async move {
                    let mut resp = handle(&app, &auth, &events, peer.ip(), req).await;
                    resp.headers_mut()
                        .insert(ADMIN_HEADER, HeaderValue::from_static("1"));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = h1.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// `GET /metrics`: the SKU gauges refreshed from the store
/// ([`Metrics::refresh_skus`](crate::metrics::Metrics::refresh_skus)) and the heap gauges from
/// the allocator ([`crate::heap::observe`]), then the exposition:
/// OpenMetrics when the scraper asks for it (Prometheus does), else Prometheus' classic text
/// format.
async fn metrics(app: &App, headers: &http::HeaderMap) -> Response<Body> {
    let metrics = &app.metrics;
    metrics.refresh_skus(app.store.as_ref()).await;
    crate::heap::observe(metrics);
    let openmetrics = headers.get_all(http::header::ACCEPT).iter().any(|v| {
        v.as_bytes()
            .windows(19)
            .any(|w| w == b"application/openmet")
    });
    let (text, content_type) = if openmetrics {
        (
            metrics.encode_openmetrics(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        (
            metrics.encode_text(),
            "text/plain; version=0.0.4; charset=utf-8",
        )
    };
    let mut resp = Response::new(body::full(text));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static(content_type),
    );
    resp
}

/// Which call a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Stock,
    Add,
    Sale,
    Close,
    Open,
}

async fn handle(
    app: &App,
    (tokens, throttle): &(Tokens, Throttle),
    events: &events::Events,
    ip: IpAddr,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return reply(StatusCode::OK, json!({"status": "ok"}));
    }
    // The page holds no data: it asks for the token itself.
    if let Some(page) = dashboard::serve(&path, req.method()) {
        return page;
    }
    let metrics_open = app
        .snapshot()
        .config
        .admin
        .as_ref()
        .is_some_and(|a| a.metrics_open);
    if path == "/metrics" && metrics_open && req.method() == Method::GET {
        return metrics(app, req.headers()).await;
    }
    let now = Instant::now();
    if let Some(wait) = throttle.blocked(ip, now) {
        warn!(%ip, "admin API: too many failed attempts");
        let mut resp = error(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            "too many failed attempts from this address: wait before trying again",
        );
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from(wait.as_secs().max(1)),
        );
        return resp;
    }
    let Some(access) = tokens.access(req.headers().get(http::header::AUTHORIZATION)) else {
        throttle.failed(ip, now);
        warn!(%ip, path = %path, "admin API: missing or wrong bearer token");
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "missing or wrong bearer token",
        );
    };
    if access == Access::Read && req.method() != Method::GET {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the read-only token cannot change anything",
        );
    }
    let who = access.as_str();
    if path == "/metrics" && req.method() == Method::GET {
        return metrics(app, req.headers()).await;
    }
    if path == events::PATH {
        return events.subscribe(req.method());
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    // Waiting rooms: their own module.
    if let Some(call) = rooms::Call::from_path(&segments) {
        return rooms::handle(app, who, call, req.method()).await;
    }
    // Audit and reconciliation: their own module.
    if let Some(call) = reconcile::Call::from_path(&segments) {
        return match call {
            Ok(call) => reconcile::handle(app, who, call, req).await,
            Err(resp) => *resp,
        };
    }
    let method = req.method().clone();
    let (sku, call) = match segments.as_slice() {
        ["v1", "stock", sku] => (*sku, Call::Stock),
        ["v1", "stock", sku, "add"] => (*sku, Call::Add),
        ["v1", "sales", sku] => (*sku, Call::Sale),
        ["v1", "sales", sku, "close"] => (*sku, Call::Close),
        ["v1", "sales", sku, "open"] => (*sku, Call::Open),
        _ => return error(StatusCode::NOT_FOUND, "not_found", "no such admin call"),
    };
    let sku = match sku_segment(sku) {
        Ok(sku) => sku,
        Err(resp) => return *resp,
    };
    let if_match = req
        .headers()
        .get(http::header::IF_MATCH)
        .map(|v| v.to_str().map(str::to_owned));
    let body = match read_json(req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let store = &app.store;
    let result = match (method, call) {
        (Method::GET, Call::Stock) => match store.get_stock(&sku).await {
            Ok(Some(n)) => Ok(json!({"sku": sku, "stock": n})),
            Ok(None) => {
                return error(
                    StatusCode::NOT_FOUND,
                    "not_configured",
                    "no stock set for this SKU",
                );
            }
            Err(e) => Err(e),
        },
        (Method::PUT, Call::Stock) => {
            let fields = match fields(&body, &["stock", "expect"]) {
                Ok(f) => f,
                Err(e) => return e.response(),
            };
            let units = match units_field(fields, "stock") {
                Ok(Some(n)) => n,
                Ok(None) => return field_error("stock", "body must be {\"stock\": N}"),
                Err(e) => return e.response(),
            };
            let expect = match expected(fields, if_match) {
                Ok(e) => e,
                Err(e) => return e.response(),
            };
            let old = store.get_stock(&sku).await.ok().flatten();
            match store.set_stock_if(&sku, units, expect).await {
                Ok(StockSet::Set { stock }) => {
                    app.sold_out.clear(&sku);
                    app.stock_events.stock_set(&sku, stock);
                    info!(token = who, %sku, ?old, stock, ?expect, "admin write: stock set");
                    Ok(json!({"sku": sku, "stock": stock}))
                }
                Ok(StockSet::Changed { current }) => {
                    info!(token = who, %sku, ?current, ?expect, "admin write refused: stock changed");
                    let now = current.map_or("not configured".to_owned(), |c| c.to_string());
                    let expected = expect.map_or(String::new(), |e| e.to_string());
                    return reply(
                        StatusCode::CONFLICT,
                        json!({
                            "error": "stock_changed",
                            "message": format!("stock is {now}, not the expected {expected}: nothing changed"),
                            "sku": sku,
                            "stock": current,
                            "expected": expect,
                        }),
                    );
                }
                Err(e) => Err(e),
            }
        }
        (Method::POST, Call::Add) => {
            let fields = match fields(&body, &["delta"]) {
                Ok(f) => f,
                Err(e) => return e.response(),
            };
            let max = i64::try_from(MAX_UNITS).unwrap_or(i64::MAX);
            let Some(d) = fields
                .get("delta")
                .and_then(Value::as_i64)
                .filter(|d| (-max..=max).contains(d))
            else {
                return field_error(
                    "delta",
                    &format!(
                        "body must be {{\"delta\": N}}, N an integer from -{MAX_UNITS} to {MAX_UNITS}"
                    ),
                );
            };
            let old = store.get_stock(&sku).await.ok().flatten();
            store.add_stock(&sku, d).await.map(|n| {
                if d > 0 {
                    app.sold_out.clear(&sku);
                }
                app.stock_events.stock_set(&sku, n);
                info!(token = who, %sku, ?old, delta = d, stock = n, "admin write: stock added");
                json!({"sku": sku, "stock": n})
            })
        }
        (Method::GET, Call::Sale) => store
            .status(&sku)
            .await
            .map(|s| serde_json::to_value(s).unwrap_or(Value::Null)),
        (Method::POST, call @ (Call::Close | Call::Open)) => {
            if let Err(e) = fields(&body, &[]) {
                return e.response();
            }
            let closed = call == Call::Close;
            let was = store.status(&sku).await.map(|s| s.closed).ok();
            store.set_closed(&sku, closed).await.map(|()| {
                app.stock_events.closed(&sku, closed);
                let what = if closed {
                    "sale closed"
                } else {
                    "sale reopened"
                };
                info!(token = who, %sku, was_closed = ?was, closed, "admin write: {what}");
                json!({"sku": sku, "closed": closed})
            })
        }
        _ => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "wrong method for this call",
            );
        }
    };
    match result {
        Ok(v) => reply(StatusCode::OK, v),
        Err(e) => store_error(e),
    }
}

/// A `{sku}` path segment: one percent-decoding, then the buyers' SKU rule, so what the CLI
/// percent-encodes comes back whole.
/// (The refusal is boxed: a `Response` is large to carry in every `Result`.)
fn sku_segment(raw: &str) -> Result<Sku, Box<Response<Body>>> {
    let Ok(sku) = percent_encoding::percent_decode_str(raw).decode_utf8() else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "the SKU is not UTF-8 once percent-decoded",
        )));
    };
    Sku::parse(&sku).map_err(|e| Box::new(Reject::from(e).into_response()))
}

/// A store failure: 400 for what the store refused, else 503.
fn store_error(e: StoreError) -> Response<Body> {
    match e {
        StoreError::Invalid(m) => error(StatusCode::BAD_REQUEST, "bad_request", &m),
        e => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}

/// The body's fields, refusing any not in `allowed` (a misspelt `expect` must not turn a
/// compare-and-set into a plain set). An empty body has no fields.
fn fields<'v>(body: &'v Value, allowed: &[&str]) -> Result<&'v Map<String, Value>, BadField> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    let map = match body {
        Value::Null => EMPTY.get_or_init(Map::new),
        Value::Object(map) => map,
        _ => {
            return Err(BadField::new(
                "body",
                "the body must be a JSON object".into(),
            ));
        }
    };
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        let expected = match allowed {
            [] => "no fields".to_owned(),
            _ => allowed.join(", "),
        };
        return Err(BadField::new(
            unknown,
            format!("unknown field `{unknown}` (this call takes {expected})"),
        ));
    }
    Ok(map)
}

/// A field holding units: absent → `None`; present → an integer in 0..=[`MAX_UNITS`].
fn units_field(fields: &Map<String, Value>, name: &str) -> Result<Option<u64>, BadField> {
    match fields.get(name) {
        None => Ok(None),
        Some(v) => match v.as_u64().filter(|n| *n <= MAX_UNITS) {
            Some(n) => Ok(Some(n)),
            None => Err(BadField::new(
                name,
                format!("`{name}` must be an integer from 0 to {MAX_UNITS} (2^53 - 1), got {v}"),
            )),
        },
    }
}

/// The stock a set expects, from `"expect"` in the body or `If-Match` (`5` or `"5"`); both
/// must agree when both are given.
fn expected(
    fields: &Map<String, Value>,
    if_match: Option<Result<String, http::header::ToStrError>>,
) -> Result<Option<u64>, BadField> {
    let from_body = units_field(fields, "expect")?;
    let from_header = match if_match {
        None => None,
        Some(raw) => {
            let raw = raw.unwrap_or_default();
            let value = raw.trim().trim_matches('"');
            let n = value
                .parse::<u64>()
                .ok()
                .filter(|n| *n <= MAX_UNITS && value.bytes().all(|b| b.is_ascii_digit()));
            match n {
                Some(n) => Some(n),
                None => {
                    return Err(BadField::new(
                        "If-Match",
                        format!(
                            "If-Match must be the expected stock, an integer from 0 to {MAX_UNITS}, got {raw:?}"
                        ),
                    ));
                }
            }
        }
    };
    match (from_body, from_header) {
        (Some(a), Some(b)) if a != b => Err(BadField::new(
            "expect",
            format!("`expect` ({a}) and If-Match ({b}) disagree"),
        )),
        (a, b) => Ok(a.or(b)),
    }
}

/// A body field (or header) the call cannot take: 400 naming it.
#[derive(Debug)]
struct BadField {
    field: String,
    message: String,
}

impl BadField {
    fn new(field: &str, message: String) -> Self {
        BadField {
            field: field.to_owned(),
            message,
        }
    }

    fn response(self) -> Response<Body> {
        field_error(&self.field, &self.message)
    }
}

fn field_error(field: &str, message: &str) -> Response<Body> {
    reply(
        StatusCode::BAD_REQUEST,
        json!({"error": "bad_request", "field": field, "message": message}),
    )
}

async fn read_json(req: Request<Incoming>) -> Result<Value, Response<Body>> {
    let bytes: Bytes = http_body_util::Limited::new(req.into_body(), MAX_ADMIN_BODY)
        .collect()
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "admin body too large",
            )
        })?
        .to_bytes();
    if bytes.is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            &format!("invalid JSON: {e}"),
        )
    })
}

fn reply(status: StatusCode, v: Value) -> Response<Body> {
    let mut bytes = v.to_string().into_bytes();
    bytes.push(b'\n');
    let mut r = Response::new(body::full(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, reason: &str, message: &str) -> Response<Body> {
    reply(status, json!({"error": reason, "message": message}))
}

pub mod auth;
pub mod cli;
pub mod client;
pub mod dashboard;
pub mod events;
pub mod render;
