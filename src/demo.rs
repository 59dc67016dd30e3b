//! `flashgate demo-upstream`: a stand-in shop backend for trying flashgate out. It answers every
//! request 200 with what it received and logs the `X-Flashgate-*` headers of each winner.
//! NOT for production: it sells nothing, it only shows what reaches the backend.

use std::convert::Infallible;
use std::net::SocketAddr;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::body::{self, Body};

pub async fn run(listen: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    info!(addr = %listener.local_addr()?, "demo upstream listening (NOT for production)");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        tokio::spawn(async move {
            let svc = service_fn(|req| async { Ok::<_, Infallible>(answer(req).await) });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(req: Request<Incoming>) -> Response<Body> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let flashgate = json!({
        "reservation": header("x-flashgate-reservation"),
        "sku": header("x-flashgate-sku"),
        "user": header("x-flashgate-user"),
        "quantity": header("x-flashgate-quantity"),
    });
    let line = format!("{} {}", req.method(), req.uri());
    if let Some(reservation) = flashgate["reservation"].as_str() {
        let (user, sku) = (
            flashgate["user"].as_str().unwrap_or("-"),
            flashgate["sku"].as_str().unwrap_or("-"),
        );
        info!(request = %line, reservation, user, sku, "order received");
    } else {
        info!(request = %line, "request received");
    }
    let body_bytes = req
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes().len())
        .unwrap_or(0);
    let v = json!({"ok": true, "request": line, "body_bytes": body_bytes, "flashgate": flashgate});
    let mut r = Response::new(body::full(format!("{v}\n")));
    *r.status_mut() = StatusCode::OK;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}
