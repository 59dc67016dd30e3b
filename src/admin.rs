//! The admin API, on its own listener (keep it on loopback or a private network): set, add and
//! read stock per SKU, and read a sale's status. Every call but `/healthz` needs
//! `Authorization: Bearer <token>`, the token coming from an environment variable.
//!
//! | call | body | answer |
//! |---|---|---|
//! | `GET /v1/stock/{sku}` | | `{"sku","stock"}`, 404 `not_configured` |
//! | `PUT /v1/stock/{sku}` | `{"stock": N}` | `{"sku","stock"}` |
//! | `POST /v1/stock/{sku}/add` | `{"delta": N}` (may be negative) | `{"sku","stock"}` |
//! | `GET /v1/sales/{sku}` | | stock, buyers, reservations and units by state |

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::body::{self, Body};
use crate::sale::validate_sku;
use crate::state::App;
use crate::store::StoreError;

/// Admin request bodies are tiny.
const MAX_ADMIN_BODY: usize = 4096;

/// Serves the admin API until `shutdown` resolves.
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    token: String,
    shutdown: impl Future<Output = ()>,
) {
    let token: Arc<str> = token.into();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "admin API listening");
    }
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
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
        let (app, token) = (app.clone(), token.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (app, token) = (app.clone(), token.clone());
                async move { Ok::<_, Infallible>(handle(&app, &token, req).await) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn handle(app: &App, token: &str, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path == "/healthz" {
        return reply(StatusCode::OK, json!({"status": "ok"}));
    }
    if !authorized(&req, token) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "missing or wrong bearer token",
        );
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let (sku, action) = match segments.as_slice() {
        ["v1", "stock", sku] => (*sku, "stock"),
        ["v1", "stock", sku, "add"] => (*sku, "add"),
        ["v1", "sales", sku] => (*sku, "sale"),
        _ => return error(StatusCode::NOT_FOUND, "not_found", "no such admin call"),
    };
    let sku = sku.to_owned();
    if let Err(r) = validate_sku(&sku) {
        return r.into_response();
    }
    let body = match read_json(req).await {
        Ok(v) => v,
        Err(resp) => return resp,
    };
    let store = &app.store;
    let result = match (method, action) {
        (Method::GET, "stock") => match store.get_stock(&sku).await {
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
        (Method::PUT, "stock") => {
            let Some(n) = body.get("stock").and_then(Value::as_u64) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "body must be {\"stock\": N}, N >= 0",
                );
            };
            store.set_stock(&sku, n).await.map(|n| {
                app.sold_out.clear(&sku);
                info!(%sku, stock = n, "stock set");
                json!({"sku": sku, "stock": n})
            })
        }
        (Method::POST, "add") => {
            let Some(d) = body.get("delta").and_then(Value::as_i64) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "body must be {\"delta\": N}",
                );
            };
            store.add_stock(&sku, d).await.map(|n| {
                if d > 0 {
                    app.sold_out.clear(&sku);
                }
                info!(%sku, delta = d, stock = n, "stock added");
                json!({"sku": sku, "stock": n})
            })
        }
        (Method::GET, "sale") => store
            .status(&sku)
            .await
            .map(|s| serde_json::to_value(s).unwrap_or(Value::Null)),
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
        Err(StoreError::Invalid(m)) => error(StatusCode::BAD_REQUEST, "bad_request", &m),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            &e.to_string(),
        ),
    }
}

/// Constant-time comparison: the token must not leak through response timing.
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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

/// The client side, used by `flashgate stock …` and `flashgate sale status …`.
pub mod client {
    use bytes::Bytes;
    use http::{Method, Request, StatusCode};
    use http_body_util::{BodyExt, Full};
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    /// Sends one admin call; returns the status and the body text.
    pub async fn call(
        admin: &str,
        token: &str,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, String), String> {
        let url = format!("{}{}", admin.trim_end_matches('/'), path);
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(
                body.map(|b| b.to_string()).unwrap_or_default(),
            )))
            .map_err(|e| format!("bad admin URL `{url}`: {e}"))?;
        let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.request(req))
            .await
            .map_err(|_| format!("{url}: no answer within 10s"))?
            .map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let text = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&text).trim_end().to_owned()))
    }
}
